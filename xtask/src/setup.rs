//! Installs what is missing, idempotently. Two eBPF toolchains are accepted: the standard
//! aya one (rustup nightly with rust-src, bpf-linker), used when present; else Debian's
//! rustc-web with its precompiled `core` for the BPF targets, and bpf-linker built against
//! Debian's LLVM 22 (machines whose rustup cannot fetch rust-src).

use std::{path::Path, process::Command};

use anyhow::{bail, Context};

use crate::util::{self, succeeds};

const DEBIAN_EBPF: &[&str] = &["rustc-web", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// `for_tests`: also what only the test suite needs (Python fixtures, Chromium, the
/// deploy/ checkers).
pub fn run(for_tests: bool) -> anyhow::Result<()> {
    let aya_toolchain = nightly_has_rust_src();
    if !aya_toolchain && !debian_ebpf_present() {
        apt_install(DEBIAN_EBPF)?;
    }
    if !succeeds("gcc", &["--version"]) {
        apt_install(&["gcc", "libc6-dev"])?;
    }
    if !succeeds("bpf-linker", &["--version"]) {
        install_bpf_linker(aya_toolchain)?;
    }
    if for_tests {
        python_fixtures()?;
        // The forensics test renders an HTML report in headless Chromium.
        if !succeeds("chromium", &["--version"]) {
            apt_install(&["chromium"])?;
        }
        fuzzing()?;
        deploy_tools()?;
        otlp_collector()?;
    }
    Ok(())
}

/// tests/integration/tests/otlp.rs sends OTLP to a real collector: `rotel-agent`, shipped in
/// the `rotel` wheel (a static binary, no Python runtime needed beyond locating it).
fn otlp_collector() -> anyhow::Result<()> {
    let find = "import rotel, os, sys; \
                sys.exit(not os.path.exists(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent')))";
    if succeeds("python3", &["-c", find]) {
        return Ok(());
    }
    eprintln!("xtask setup: installing rotel (pip) for the OTLP tests");
    let pip = |extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .arg("rotel");
        util::run(&mut cmd)
    };
    // Debian's system Python refuses pip without the flag (PEP 668).
    pip(&[])
        .or_else(|_| pip(&["--break-system-packages"]))
        .context("pip install rotel failed")
}

/// tests/integration/tests/deploy.rs checks deploy/ offline: promtool (Debian's
/// `prometheus`), yamllint and kubernetes-validate (PyPI; schemas ship in the wheel).
fn deploy_tools() -> anyhow::Result<()> {
    if !succeeds("promtool", &["--version"]) {
        apt_install(&["prometheus"])?;
    }
    let missing: Vec<&str> = ["yamllint", "kubernetes-validate"]
        .into_iter()
        .filter(|tool| !succeeds(tool, &["--version"]))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {missing:?} (pip)");
    let pip = |extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .args(&missing);
        util::run(&mut cmd)
    };
    // Debian's system Python refuses pip without the flag (PEP 668).
    pip(&[])
        .or_else(|_| pip(&["--break-system-packages"]))
        .context("pip install yamllint kubernetes-validate failed")
}

/// `cargo xtask test` runs the fuzz targets (`fuzz/`) for a bounded time: cargo-fuzz on a
/// nightly toolchain (no rust-src needed: the sanitizers link against the prebuilt std).
fn fuzzing() -> anyhow::Result<()> {
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        eprintln!("xtask setup: installing the nightly toolchain (rustup) for cargo fuzz");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("rustup toolchain install nightly failed")?;
    }
    if !succeeds("cargo", &["fuzz", "--version"]) {
        eprintln!("xtask setup: installing cargo-fuzz");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        util::run(Command::new(cargo).args(["install", "cargo-fuzz", "--locked"]))
            .context("cargo install cargo-fuzz failed")?;
    }
    Ok(())
}

/// The http tests' stand-in server and clients: uvicorn + FastAPI (vLLM's stack) and the
/// official openai client.
fn python_fixtures() -> anyhow::Result<()> {
    if succeeds("python3", &["-c", "import fastapi, uvicorn, openai"]) {
        return Ok(());
    }
    if !succeeds("python3", &["-m", "pip", "--version"]) {
        apt_install(&["python3", "python3-pip"])?;
    }
    eprintln!("xtask setup: installing fastapi, uvicorn, openai (pip)");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m", "pip", "install", "--quiet", "fastapi", "uvicorn", "openai",
    ]);
    if util::run(&mut cmd).is_err() {
        // Debian's system Python refuses pip without this (PEP 668).
        util::run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--break-system-packages",
            "fastapi",
            "uvicorn",
            "openai",
        ]))
        .context("pip install fastapi uvicorn openai failed")?;
    }
    Ok(())
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    out.status.success()
        && Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
}

fn debian_ebpf_present() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists()
        && Path::new("/usr/lib/llvm-22/lib").exists()
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if !crate::util::is_root() {
        bail!(
            "missing Debian packages {packages:?}: run `cargo xtask setup` as root \
             (or install them yourself)"
        );
    }
    eprintln!("xtask setup: installing {packages:?}");
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed")
}

fn install_bpf_linker(aya_toolchain: bool) -> anyhow::Result<()> {
    eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION}");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
    ]);
    if !aya_toolchain {
        // Debian 12 ships LLVM 22, not bpf-linker's default LLVM 23.
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
    }
    util::run(&mut cmd)
}
