//! Builds the bench's C TLS server and load client (`c/tls_sse.c`, against the system's OpenSSL:
//! `cargo xtask setup` installs `libssl-dev`) next to the bench's other outputs; the bench finds
//! it through `TLS_SSE_BIN`.

use std::{path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("c/tls_sse.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let bin = out.join("tls_sse");
    let cc = std::env::var("CC")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gcc".to_string());
    let status = Command::new(&cc)
        .args(["-Wall", "-Wextra", "-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .args(["-lssl", "-lcrypto"])
        .status()
        .unwrap_or_else(|e| panic!("failed to run {cc}: {e}"));
    assert!(
        status.success(),
        "{cc} failed to build {} (is libssl-dev installed? `cargo xtask setup`)",
        src.display()
    );
    println!("cargo:rustc-env=TLS_SSE_BIN={}", bin.display());
}
