//! Compiles the CUDA driver double `../cuda-double/libcuda.c` into four variants that
//! differ only in the first instruction of every exported function:
//!
//! * `nop5`  – `-O2 -pg -mfentry` with the `__fentry__` call replaced by a 5-byte nop
//!   (`0f 1f 44 00 00`), i.e. what `-mnop-mcount` does; gcc refuses `-mnop-mcount`
//!   together with `-fPIC`, so the replacement is done on the assembly.
//! * `push`  – `-O2 -fno-omit-frame-pointer -fcf-protection=none`: `push %rbp`.
//! * `endbr` – `-O2 -fcf-protection=full`: `endbr64`.
//! * `novmm` – like `push` plus `-DOMIT_VMM` (no cuMemCreate/cuMemMap/... symbols).
//!
//! Each lands in `$OUT_DIR/<variant>/libcuda.so.1` with a `libcuda.so` symlink.
//!
//! It also compiles the NVML double `../nvml-double/libnvml.c` twice:
//! `$OUT_DIR/nvml/libnvidia-ml.so.1` and, with `-DOLD_DRIVER` (no energy counter,
//! process utilization or clocks event/throttle reasons symbols),
//! `$OUT_DIR/nvml-old/libnvidia-ml.so.1`, each with a `libnvidia-ml.so` symlink.

use std::path::{Path, PathBuf};
use std::process::Command;

const COMMON: &[&str] = &["-Wall", "-Wextra", "-fno-ipa-icf", "-fPIC"];
const LINK: &[&str] = &["-shared", "-Wl,-soname,libcuda.so.1"];
const FENTRY_CALL: &str = "call\t*__fentry__@GOTPCREL(%rip)";
const FENTRY_CALL_PLT: &str = "call\t__fentry__@PLT";
const NOP5: &str = ".byte\t0x0f, 0x1f, 0x44, 0x00, 0x00";

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn cc() -> String {
    std::env::var("CC")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "gcc".to_string())
}

fn link_dir(dir: &Path) {
    symlink(dir, "libcuda.so.1", "libcuda.so");
}

fn symlink(dir: &Path, target: &str, name: &str) {
    let link = dir.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link)
        .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

fn build_nvml(src: &Path, dir: &Path, flags: &[&str]) {
    std::fs::create_dir_all(dir).expect("create nvml dir");
    run(Command::new(cc())
        .args(["-Wall", "-Wextra", "-O2", "-fPIC", "-shared"])
        .arg("-Wl,-soname,libnvidia-ml.so.1")
        .args(flags)
        .arg("-o")
        .arg(dir.join("libnvidia-ml.so.1"))
        .arg(src)
        .arg("-lpthread"));
    symlink(dir, "libnvidia-ml.so.1", "libnvidia-ml.so");
}

fn build_direct(src: &Path, dir: &Path, flags: &[&str]) {
    let out = dir.join("libcuda.so.1");
    run(Command::new(cc())
        .args(COMMON)
        .args(flags)
        .args(LINK)
        .arg("-o")
        .arg(&out)
        .arg(src)
        .arg("-lpthread"));
}

fn build_nop5(src: &Path, dir: &Path) {
    let asm = dir.join("libcuda.s");
    run(Command::new(cc())
        .args(COMMON)
        .args(["-O2", "-pg", "-mfentry", "-fcf-protection=none", "-S", "-o"])
        .arg(&asm)
        .arg(src));
    let text = std::fs::read_to_string(&asm).expect("read generated assembly");
    let calls = text.matches(FENTRY_CALL).count() + text.matches(FENTRY_CALL_PLT).count();
    assert!(calls > 0, "no __fentry__ calls found in {}", asm.display());
    let patched = text
        .replace(FENTRY_CALL, NOP5)
        .replace(FENTRY_CALL_PLT, NOP5);
    assert!(
        !patched.contains("__fentry__"),
        "unpatched __fentry__ reference left in {}",
        asm.display()
    );
    std::fs::write(&asm, patched).expect("write patched assembly");
    let out = dir.join("libcuda.so.1");
    run(Command::new(cc())
        .args(LINK)
        .arg("-fPIC")
        .arg("-o")
        .arg(&out)
        .arg(&asm)
        .arg("-lpthread"));
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = manifest.join("../cuda-double/libcuda.c");
    let src = src.canonicalize().unwrap_or(src);
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let push = ["-O2", "-fno-omit-frame-pointer", "-fcf-protection=none"];
    for variant in ["nop5", "push", "endbr", "novmm"] {
        let dir = out.join(variant);
        std::fs::create_dir_all(&dir).expect("create variant dir");
        match variant {
            "nop5" => build_nop5(&src, &dir),
            "push" => build_direct(&src, &dir, &push),
            "endbr" => build_direct(&src, &dir, &["-O2", "-fcf-protection=full"]),
            "novmm" => {
                let mut flags = push.to_vec();
                flags.push("-DOMIT_VMM");
                build_direct(&src, &dir, &flags)
            }
            _ => unreachable!(),
        }
        link_dir(&dir);
    }

    let nvml_src = manifest.join("../nvml-double/libnvml.c");
    let nvml_src = nvml_src.canonicalize().unwrap_or(nvml_src);
    println!("cargo:rerun-if-changed={}", nvml_src.display());
    build_nvml(&nvml_src, &out.join("nvml"), &[]);
    build_nvml(&nvml_src, &out.join("nvml-old"), &["-DOLD_DRIVER"]);
}
