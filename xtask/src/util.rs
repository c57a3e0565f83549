use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root_dir()))
}

/// Runs `cargo test …`, passing its output through, and on failure returns the harness's failure
/// sections (each failing test's captured output and the failing binaries' summaries), so the
/// caller can print them again after everything that runs later: CI keeps only the tail of the log.
pub fn cargo_test(args: &[&str]) -> Result<(), (anyhow::Error, String)> {
    use std::io::{BufRead, Write};
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(root_dir())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| (anyhow::anyhow!("cannot run {cmd:?}: {e}"), String::new()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut kept = String::new();
    let mut in_failures = false;
    let mut out = std::io::stdout().lock();
    for line in std::io::BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let _ = out.write_all(&line);
        let _ = out.write_all(b"\n");
        let text = String::from_utf8_lossy(&line);
        if text.starts_with("failures:") {
            in_failures = true;
        }
        if in_failures && kept.len() < FAILURE_SUMMARY_BYTES {
            kept.push_str(&text);
            kept.push('\n');
        }
        if text.starts_with("test result:") {
            in_failures = false;
        }
    }
    drop(out);
    let status = child.wait().map_err(|e| {
        (
            anyhow::anyhow!("cannot wait for {cmd:?}: {e}"),
            kept.clone(),
        )
    })?;
    if status.success() {
        return Ok(());
    }
    Err((anyhow::anyhow!("{cmd:?} failed: {status}"), kept))
}

/// Enough for the panics of a handful of failing tests; the full output is above it in the log.
const FAILURE_SUMMARY_BYTES: usize = 64 * 1024;

pub fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
