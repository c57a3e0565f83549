//! Builds the eBPF object (agent-ebpf) for `bpfel-unknown-none` and hands it to the agent,
//! which embeds it. Picks the toolchain that is there:
//! 1. `INFERSCOPE_EBPF_OBJECT=path`: a prebuilt object, used as is;
//! 2. the standard aya toolchain: rustup nightly with `rust-src` and `bpf-linker`
//!    (`cargo +nightly build -Z build-std=core`);
//! 3. Debian's rustc with its precompiled BPF `core` (`libstd-rust-web-dev-bpf`) and
//!    `bpf-linker` (what `cargo xtask setup` installs where rust-src cannot be had).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    pod_resources_proto();
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let dest = out_dir.join("inferscope.bpf.o");
    println!("cargo:rerun-if-env-changed=INFERSCOPE_EBPF_OBJECT");

    if let Some(prebuilt) = env::var_os("INFERSCOPE_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        std::fs::copy(&prebuilt, &dest).expect("copy INFERSCOPE_EBPF_OBJECT");
        return;
    }
    for dir in ["agent-ebpf/src", "agent-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    for file in ["agent-ebpf/Cargo.toml", "agent-ebpf/Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    // <target>/<profile>/build/<pkg>/out → <target>/bpf, shared by every profile.
    let target_dir = out_dir.ancestors().nth(4).unwrap().join("bpf");
    let mut cmd = toolchain_command();
    cmd.current_dir(root.join("agent-ebpf"))
        .args(["build", "--release", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &target_dir);
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo for the eBPF build: {e}"));
    assert!(status.success(), "the eBPF build failed (see above)");
    let obj = target_dir
        .join(TARGET)
        .join("release")
        .join("inferscope-ebpf");
    std::fs::copy(&obj, &dest)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", obj.display(), dest.display()));
}

/// The kubelet's `PodResourcesLister` (v1) client.
fn pod_resources_proto() {
    let proto = "proto/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compile the pod-resources proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)
        .expect("generate the pod-resources client");
}

fn toolchain_command() -> Command {
    let btf_flags = "-Cdebuginfo=2\x1f-Clink-arg=--btf";
    if !on_path("bpf-linker") {
        panic!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (or `cargo install bpf-linker`)"
        );
    }
    if nightly_has_rust_src() {
        let mut cmd = Command::new("cargo");
        cmd.arg("+nightly")
            .args(["-Z", "build-std=core"])
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("CARGO_ENCODED_RUSTFLAGS", btf_flags);
        return cmd;
    }
    let debian_rustc = Path::new("/usr/bin/rustc");
    let debian_core = Path::new("/usr/lib/rustlib").join(TARGET);
    if debian_rustc.exists() && debian_core.exists() {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.env("RUSTC", debian_rustc)
            // aya-ebpf uses #![feature]; Debian's rustc is a stable build.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_ENCODED_RUSTFLAGS", btf_flags);
        return cmd;
    }
    panic!(
        "no eBPF toolchain: need rustup nightly with rust-src, or Debian's rustc-web + \
         libstd-rust-web-dev-bpf; run `cargo xtask setup`"
    );
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}
