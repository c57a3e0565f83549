//! Root tier: GPU energy and busy time per model. Two FastAPI servers (one serving two models)
//! hold memory on two simulated GPUs and stream tokens at known rates; the NVML double's energy
//! counters grow at a known power. GPU 0 gives per-process utilization samples, GPU 1 does not
//! (the memory fallback).

use std::{io::Read, net::TcpStream, time::Duration};

use integration::*;

const MIB: u64 = 1 << 20;

/// Reads each stream to its end on a thread of its own, so that the server never waits on a
/// full socket.
fn drain(conns: Vec<TcpStream>) -> Vec<std::thread::JoinHandle<()>> {
    conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink);
            })
        })
        .collect()
}

/// A request to completion, so that the server's answer makes `model` a label value.
fn answered(server: &OpenAiServer, model: &str) {
    server.post(
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{model}","max_tokens":2,"messages":[{{"role":"user","content":"x"}}]}}"#
        ),
    );
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= tolerance * want.abs(),
        "{what}: {got}, expected {want} within {:.1} %",
        tolerance * 100.0
    );
}

#[root_test]
fn gpu_energy_and_time_are_split_between_processes_then_models_by_tokens() {
    let gpus = SimGpus::new(2, 8 << 30);
    // GPU 1 gives no per-process samples: its intervals are split by the memory each holds.
    gpus.control
        .set_gpu(1, "unsupported", "process_utilization")
        .unwrap();
    let lib = Variant::Push.lib_path().display().to_string();
    let env = gpus.cuda_env();
    let hold = |mib: u64| (mib * MIB).to_string();
    let (a_mem, b_mem) = (hold(288), hold(96));
    let a = OpenAiServer::start_with_env(
        "a1",
        &[
            "--also-serve",
            "a2",
            "--cuda-lib",
            &lib,
            "--cuda-mem",
            &a_mem,
            "--cuda-devices",
            "0,1",
        ],
        &str_pairs(&env),
    );
    let b = OpenAiServer::start_with_env(
        "b",
        &[
            "--cuda-lib",
            &lib,
            "--cuda-mem",
            &b_mem,
            "--cuda-devices",
            "0,1",
        ],
        &str_pairs(&env),
    );
    // GPU 0: server b does three times server a's work.
    gpus.control
        .set_gpu(0, &format!("proc_sm_util.{}", a.pid()), 20)
        .unwrap();
    gpus.control
        .set_gpu(0, &format!("proc_sm_util.{}", b.pid()), 60)
        .unwrap();
    let agent = gpus.agent(
        &[
            "--cuda-lib",
            &lib,
            "--watch-port",
            &a.port.to_string(),
            "--watch-port",
            &b.port.to_string(),
        ],
        // usedGpuMemory without the double's per-context overhead: the allocations alone.
        &[
            ("INFERSCOPE_NVML__INTERVAL_MS", "200"),
            ("FAKEGPU_NVML_CTX_OVERHEAD", "0"),
        ],
    );
    agent.wait_for("both servers watched and on both GPUs", |s| {
        s.sum("inferscope_http_watched_processes", &[]) == 2.0
            && s.sum("gpu_process_memory_used_bytes", &[]) > 0.0
    });
    for (server, model) in [(&a, "a1"), (&a, "a2"), (&b, "b")] {
        answered(server, model);
    }
    agent.wait_for("the three models admitted", |s| {
        ["a1", "a2", "b"]
            .iter()
            .all(|m| s.sum("llm_requests_total", &[("model", m)]) >= 1.0)
    });

    // Server a streams a1 on three connections and a2 on one, at the same pace: 3:1.
    let mut conns = Vec::new();
    for (server, model, n) in [(&a, "a1", 3), (&a, "a2", 1), (&b, "b", 1)] {
        conns.extend(server.streams(model, n, 2500, 2).0);
    }
    let readers = drain(conns);
    std::thread::sleep(Duration::from_millis(1000));
    // The GPUs draw power and compute only while the streams run.
    let set = |rate0: u32, rate1: u32, util0: u32, util1: u32| {
        gpus.control
            .set_many(&[
                ("gpu.0.energy_rate_mw".into(), rate0.to_string()),
                ("gpu.1.energy_rate_mw".into(), rate1.to_string()),
                ("gpu.0.utilization".into(), util0.to_string()),
                ("gpu.1.utilization".into(), util1.to_string()),
            ])
            .unwrap()
    };
    set(200_000, 100_000, 50, 100);
    std::thread::sleep(Duration::from_millis(2500));
    set(0, 0, 0, 0);
    std::thread::sleep(Duration::from_millis(800));
    let s = agent.scrape();
    for r in readers {
        r.join().unwrap();
    }

    let on = |name: &str, model: &str, gpu: &str| s.sum(name, &[("model", model), ("gpu", gpu)]);
    // (GPU, method, share of server a, its total power in W, utilization).
    for (gpu, method, a_share, watts, util) in [
        ("0", "process_utilization", 0.25, 200.0, 0.5),
        ("1", "memory", 0.75, 100.0, 1.0),
    ] {
        assert!(
            s.sum(
                "inferscope_gpu_cost_splits_total",
                &[("gpu", gpu), ("method", method)]
            ) > 0.0,
            "{}",
            s.text
        );
        for (name, unattributed, per_s) in [
            (
                "llm_gpu_energy_joules_total",
                "inferscope_gpu_unattributed_energy_joules_total",
                watts,
            ),
            (
                "llm_gpu_seconds_total",
                "inferscope_gpu_unattributed_seconds_total",
                util,
            ),
        ] {
            let models = ["a1", "a2", "b"].map(|m| on(name, m, gpu));
            let total: f64 = models.iter().sum();
            assert_eq!(
                s.sum(unattributed, &[("gpu", gpu)]),
                0.0,
                "{name} on GPU {gpu}: {}",
                s.text
            );
            // About 2.5 s of it (the sampler's intervals do not meet the control's changes).
            within(&format!("{name} on GPU {gpu}"), total, per_s * 2.5, 0.15);
            let want = [a_share * 0.75, a_share * 0.25, 1.0 - a_share];
            for (i, m) in ["a1", "a2", "b"].iter().enumerate() {
                within(
                    &format!("{name} of {m} on GPU {gpu}"),
                    models[i],
                    want[i] * total,
                    0.01,
                );
            }
        }
    }
    assert!(agent.stop().success());
}
