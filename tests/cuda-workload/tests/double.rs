//! Smoke tests of the libcuda double and the workload (no GPU needed).

use std::process::Command;

use cuda_workload::{double_dir, OutputLine, Truth, Variant};

fn run_plan(v: Variant, plan: &str, gpus: u32) -> Vec<OutputLine> {
    let out = Command::new(env!("CARGO_BIN_EXE_cuda-workload"))
        .args(["--plan", plan])
        .env("LD_LIBRARY_PATH", double_dir(v))
        .env("FAKEGPU_COUNT", gpus.to_string())
        .env("FAKEGPU_MEM", "1073741824")
        .env_remove("FAKEGPU_STATE")
        .output()
        .expect("run cuda-workload");
    assert!(
        out.status.success(),
        "workload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| OutputLine::parse(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

fn final_truth(lines: &[OutputLine]) -> Truth {
    match lines.last() {
        Some(OutputLine::Final { truth, .. }) => truth.clone(),
        other => panic!("no final line: {other:?}"),
    }
}

#[test]
fn truth_matches_double_semantics() {
    for v in Variant::ALL {
        let lines = run_plan(
            v,
            "alloc dev=0 size=1048576 count=10; free count=4; async dev=0 size=4096 count=3; \
             host size=8192 count=2; badfree count=1; zero dev=0 count=1; checkpoint name=a; \
             exhaust dev=0 size=268435456",
            2,
        );
        assert!(matches!(lines[0], OutputLine::Ready { ready: true, .. }));
        let t = final_truth(&lines);
        let alloc = t.api("cuMemAlloc_v2");
        // 10 + zero + 4 exhaust calls (3 fit into the remaining ~1014 MiB)
        assert_eq!(alloc.calls, 15, "{v:?}");
        assert_eq!(alloc.ok, 13);
        assert_eq!(alloc.failures["invalid_value"], 1);
        assert_eq!(alloc.failures["out_of_memory"], 1);
        let free = t.api("cuMemFree_v2");
        assert_eq!((free.calls, free.ok, free.bytes), (5, 4, 4 << 20));
        assert_eq!(
            t.live_device_bytes[&0],
            (6 << 20) + 3 * 4096 + 3 * (256 << 20)
        );
        assert_eq!(t.live_host_bytes, 16384);
    }
}

#[test]
fn vmm_and_threads() {
    let t = final_truth(&run_plan(
        Variant::Push,
        "vmm dev=1 size=4M count=2; pool dev=0 size=8192 count=2; threads n=4 devs=0,1 size=1M count=5; \
         checkpoint name=b; free all",
        2,
    ));
    assert_eq!(t.api("cuMemCreate").ok, 2);
    assert_eq!(t.api("cuMemMap").bytes, 8 << 20);
    assert_eq!(t.api("cuMemRelease").ok, 2);
    assert_eq!(t.api("cuMemAddressFree").ok, 2);
    assert_eq!(t.api("cuMemAllocFromPoolAsync").ok, 2);
    assert_eq!(t.api("cuMemFreeAsync").ok, 2);
    assert_eq!(t.api("cuMemAlloc_v2").ok, 20);
    assert_eq!(t.api("cuMemFree_v2").ok, 20);
    assert!(t.live_device_bytes.values().all(|b| *b == 0));

    // The old-driver variant lacks the symbols: the steps are skipped, not counted.
    let lines = run_plan(Variant::NoVmm, "vmm dev=0 size=2M; pool dev=0 size=4096", 1);
    assert_eq!(
        lines
            .iter()
            .filter(|l| matches!(l, OutputLine::Skipped { .. }))
            .count(),
        2
    );
    assert!(final_truth(&lines).apis.is_empty());
}

/// Checks the first instruction of every exported function, when binutils is installed.
#[test]
fn first_instructions() {
    for v in Variant::ALL {
        let Ok(out) = Command::new("objdump").arg("-d").arg(v.lib_path()).output() else {
            eprintln!("objdump not available; skipping");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let mut n = 0;
        while let Some(l) = lines.next() {
            if !(l.ends_with(">:") && l.contains(" <cu")) {
                continue;
            }
            let first = lines.next().unwrap_or_default();
            let ok = match v {
                Variant::Nop5 => first.contains("0f 1f 44 00 00") && first.contains("nop"),
                Variant::Push | Variant::NoVmm => first.contains("push") && first.contains("%rbp"),
                Variant::Endbr => first.contains("endbr64"),
            };
            assert!(ok, "{v:?}: {l} starts with {first:?}");
            n += 1;
        }
        assert!(n >= 40, "{v:?}: only {n} exported functions found");
    }
}
