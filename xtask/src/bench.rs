//! `cargo xtask bench [--quick]`: runs the `inferscope-bench` binary (bench/), which measures
//! probe overhead and pipeline throughput, prints the tables and writes `docs/performance.md`.

use anyhow::bail;

use crate::{setup, util};

pub fn run(quick: bool) -> anyhow::Result<()> {
    if !util::is_root() {
        bail!("bench must run as root: it loads and attaches eBPF programs (try `sudo -E cargo xtask bench`)");
    }
    // The per-call table has a row on the real driver.
    setup::nvidia_driver()?;
    let mut args = vec!["run", "--release", "-p", "inferscope-bench", "--"];
    if quick {
        args.push("--quick");
    }
    util::cargo(&args)
}
