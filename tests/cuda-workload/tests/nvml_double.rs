//! Tests of the NVML double (tests/nvml-double/libnvml.c) through the real
//! `nvml-wrapper` crate.
//!
//! The double reads its environment at `nvmlInit` and keeps process-global state, and
//! every test wants its own environment, so each test body runs in a child process:
//! the test re-runs this test binary filtered to itself, with a fresh temp dir whose
//! `control` and `state` files are passed as `FAKEGPU_NVML_CONTROL` and
//! `FAKEGPU_STATE`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use cuda_workload::{
    double_dir, nvml_double_path, nvml_old_double_path, NvmlControl, OutputLine, Variant,
    DEFAULT_NVML_CTX_OVERHEAD, ENV_GPU_COUNT, ENV_GPU_MEM, ENV_GPU_STATE, ENV_NVML_CONTROL,
    ENV_NVML_CTX_OVERHEAD, ENV_NVML_FAIL_INIT,
};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Brand, Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

const CHILD_TEST: &str = "NVML_DOUBLE_TEST_CHILD";
const CHILD_DIR: &str = "NVML_DOUBLE_TEST_DIR";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What a test body gets, in the child process.
struct Fx {
    dir: PathBuf,
    control: NvmlControl,
}

impl Fx {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// Runs `body` in a child process with the given environment (plus fresh control and
/// state files).  Call it with the test function's own name.
fn isolated(name: &str, env: &[(&str, &str)], body: fn(&Fx)) {
    if std::env::var(CHILD_TEST).as_deref() == Ok(name) {
        let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("child dir"));
        let control = NvmlControl::new(dir.join("control"));
        body(&Fx { dir, control });
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_TEST, name)
        .env(CHILD_DIR, tmp.path())
        .env(ENV_NVML_CONTROL, tmp.path().join("control"))
        .env(ENV_GPU_STATE, tmp.path().join("state"));
    for var in [
        ENV_GPU_COUNT,
        ENV_GPU_MEM,
        ENV_NVML_CTX_OVERHEAD,
        ENV_NVML_FAIL_INIT,
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child test {name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

fn init(path: &Path) -> Nvml {
    Nvml::builder()
        .lib_path(path.as_os_str())
        .init()
        .expect("init NVML double")
}

fn nvml() -> Nvml {
    init(&nvml_double_path())
}

/// A running `cuda-workload --pause` on the libcuda double, sharing `state`.
struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Workload {
    fn start(plan: &str, state: &Path) -> Workload {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cuda-workload"))
            .args(["--plan", plan, "--pause"])
            .env("LD_LIBRARY_PATH", double_dir(Variant::Push))
            .env(ENV_GPU_STATE, state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cuda-workload");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut w = Workload {
            child,
            stdin,
            stdout,
            pid: 0,
        };
        match w.line() {
            OutputLine::Ready { pid, .. } => w.pid = pid,
            other => panic!("expected ready, got {other:?}"),
        }
        w
    }

    fn line(&mut self) -> OutputLine {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read workload stdout");
        assert!(!s.is_empty(), "workload exited early");
        OutputLine::parse(s.trim()).unwrap_or_else(|e| panic!("bad line {s:?}: {e}"))
    }

    /// Lets the paused workload go on to its next pause point.
    fn resume(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        self.resume();
        drop(self.stdin.take());
        loop {
            if let OutputLine::Final { .. } = self.line() {
                break;
            }
        }
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn system_and_identity() {
    isolated(
        "system_and_identity",
        &[(ENV_GPU_COUNT, "2"), (ENV_GPU_MEM, "80G")],
        |fx| {
            let nvml = nvml();
            assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
            assert_eq!(nvml.sys_nvml_version().unwrap(), "12.550.54.15");
            assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12040);
            assert_eq!(nvml.device_count().unwrap(), 2);
            for i in 0..2u32 {
                let d = nvml.device_by_index(i).unwrap();
                assert_eq!(d.index().unwrap(), i);
                assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
                let uuid = format!("GPU-00000000-1111-2222-3333-4444444444{i:02}");
                assert_eq!(d.uuid().unwrap(), uuid);
                assert_eq!(
                    nvml.device_by_uuid(uuid.as_str()).unwrap().index().unwrap(),
                    i
                );
                assert_eq!(d.brand().unwrap(), Brand::Nvidia);
                let pci = d.pci_info().unwrap();
                assert_eq!(pci.bus, 0x18 + i);
                assert_eq!(pci.bus_id, format!("00000000:{:02X}:00.0", 0x18 + i));
                assert_eq!(d.memory_info().unwrap().total, 80 * GIB);
            }
            assert!(matches!(
                nvml.device_by_index(2),
                Err(NvmlError::InvalidArg)
            ));
            assert!(matches!(
                nvml.device_by_uuid("GPU-nope"),
                Err(NvmlError::NotFound)
            ));

            fx.control.set("driver_version", "535.104.05").unwrap();
            fx.control.set("cuda_driver_version", 12020).unwrap();
            fx.control
                .set_gpu(1, "name", "NVIDIA A100-SXM4-40GB")
                .unwrap();
            fx.control.set_gpu(1, "uuid", "GPU-abc").unwrap();
            assert_eq!(nvml.sys_driver_version().unwrap(), "535.104.05");
            assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12020);
            let d1 = nvml.device_by_uuid("GPU-abc").unwrap();
            assert_eq!(d1.index().unwrap(), 1);
            assert_eq!(d1.name().unwrap(), "NVIDIA A100-SXM4-40GB");
            nvml.shutdown().unwrap();
        },
    );
}

#[test]
fn defaults_and_controlled_metrics() {
    isolated(
        "defaults_and_controlled_metrics",
        &[(ENV_GPU_COUNT, "2")],
        |fx| {
            let nvml = nvml();
            let d0 = nvml.device_by_index(0).unwrap();
            let d1 = nvml.device_by_index(1).unwrap();
            // defaults
            let u = d0.utilization_rates().unwrap();
            assert_eq!((u.gpu, u.memory), (0, 0));
            assert_eq!(d0.temperature(TemperatureSensor::Gpu).unwrap(), 35);
            assert_eq!(d0.power_usage().unwrap(), 70_000);
            assert_eq!(d0.enforced_power_limit().unwrap(), 700_000);
            assert_eq!(d0.power_management_limit().unwrap(), 700_000);
            assert_eq!(d0.total_energy_consumption().unwrap(), 1_000_000);
            assert_eq!(d0.clock_info(Clock::SM).unwrap(), 1980);
            assert_eq!(d0.clock_info(Clock::Graphics).unwrap(), 1980);
            assert_eq!(d0.clock_info(Clock::Memory).unwrap(), 2619);
            assert_eq!(
                d0.current_throttle_reasons().unwrap(),
                ThrottleReasons::empty()
            );
            assert_eq!(d0.pcie_throughput(PcieUtilCounter::Send).unwrap(), 0);
            let mig = d0.mig_mode().unwrap();
            assert_eq!((mig.current, mig.pending), (0, 0));
            let m = d0.memory_info().unwrap();
            assert_eq!((m.total, m.used, m.free), (GIB, 0, GIB));
            assert!(d0.running_compute_processes().unwrap().is_empty());

            // controlled values, device 1 only
            let c = &fx.control;
            for (k, v) in [
                ("utilization", "87"),
                ("memory_utilization", "41"),
                ("temperature", "71"),
                ("power_mw", "512345"),
                ("power_limit_mw", "650000"),
                ("energy_mj", "123456789012"),
                ("sm_clock_mhz", "1755"),
                ("mem_clock_mhz", "2600"),
                ("pcie_tx_kbs", "1000"),
                ("pcie_rx_kbs", "0x800"),
                ("ecc_corrected", "5"),
                ("ecc_uncorrected", "2"),
                ("mig", "1"),
                ("reserved_bytes", "64M"),
            ] {
                c.set_gpu(1, k, v).unwrap();
            }
            let u = d1.utilization_rates().unwrap();
            assert_eq!((u.gpu, u.memory), (87, 41));
            assert_eq!(d1.temperature(TemperatureSensor::Gpu).unwrap(), 71);
            assert_eq!(d1.power_usage().unwrap(), 512_345);
            assert_eq!(d1.enforced_power_limit().unwrap(), 650_000);
            assert_eq!(d1.total_energy_consumption().unwrap(), 123_456_789_012);
            assert_eq!(d1.clock_info(Clock::SM).unwrap(), 1755);
            assert_eq!(d1.clock_info(Clock::Memory).unwrap(), 2600);
            assert_eq!(d1.pcie_throughput(PcieUtilCounter::Send).unwrap(), 1000);
            assert_eq!(d1.pcie_throughput(PcieUtilCounter::Receive).unwrap(), 2048);
            for counter in [EccCounter::Volatile, EccCounter::Aggregate] {
                assert_eq!(
                    d1.total_ecc_errors(MemoryError::Corrected, counter)
                        .unwrap(),
                    5
                );
                assert_eq!(
                    d1.total_ecc_errors(MemoryError::Uncorrected, counter)
                        .unwrap(),
                    2
                );
            }
            let mig = d1.mig_mode().unwrap();
            assert_eq!((mig.current, mig.pending), (1, 1));
            let m = d1.memory_info().unwrap();
            assert_eq!((m.used, m.free), (64 * MIB, GIB - 64 * MIB));
            // device 0 unchanged
            assert_eq!(d0.temperature(TemperatureSensor::Gpu).unwrap(), 35);

            // a counter the test raises is re-read
            c.set_gpu(1, "energy_mj", 123_456_799_012u64).unwrap();
            assert_eq!(d1.total_energy_consumption().unwrap(), 123_456_799_012);
            // removing a key restores the default
            c.remove("gpu.1.temperature").unwrap();
            assert_eq!(d1.temperature(TemperatureSensor::Gpu).unwrap(), 35);

            // energy growing at a rate: 1 kW is 1000 mJ per ms, continuous across a rate change
            c.set_gpu(1, "energy_rate_mw", 1_000_000).unwrap();
            let t0 = std::time::Instant::now();
            let e0 = d1.total_energy_consumption().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            let e1 = d1.total_energy_consumption().unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            let grown = (e1 - e0) as f64;
            assert!(
                grown >= 100_000.0 && grown <= (ms + 1.0) * 1000.0,
                "{grown} mJ in {ms} ms"
            );
            c.set_gpu(1, "energy_rate_mw", 0).unwrap();
            let e2 = d1.total_energy_consumption().unwrap();
            assert!(e2 >= e1);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(d1.total_energy_consumption().unwrap(), e2);
        },
    );
}

#[test]
fn memory_and_processes_from_workload() {
    isolated(
        "memory_and_processes_from_workload",
        &[(ENV_GPU_COUNT, "2"), (ENV_GPU_MEM, "80G")],
        |fx| {
            let nvml = nvml();
            let d0 = nvml.device_by_index(0).unwrap();
            let d1 = nvml.device_by_index(1).unwrap();
            fx.control.set_gpu(0, "reserved_bytes", 1 << 30).unwrap();

            let mut w = Workload::start(
                "alloc dev=0 size=1048576 count=3; checkpoint name=x",
                &fx.state(),
            );
            // At "ready" the workload holds a context on device 0 but no memory.
            let procs = d0.running_compute_processes().unwrap();
            assert_eq!(procs.len(), 1, "{procs:?}");
            assert_eq!(procs[0].pid, w.pid);
            assert_eq!(
                procs[0].used_gpu_memory,
                UsedGpuMemory::Used(DEFAULT_NVML_CTX_OVERHEAD)
            );
            w.resume();
            let truth = w.line().truth().cloned().expect("checkpoint");
            assert_eq!(truth.live_device_bytes[&0], 3 * MIB);

            let want = 3 * MIB + DEFAULT_NVML_CTX_OVERHEAD;
            let procs = d0.running_compute_processes().unwrap();
            assert_eq!(procs.len(), 1);
            assert_eq!(procs[0].pid, w.pid);
            assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(want));
            assert_eq!(procs[0].gpu_instance_id, None);
            assert_eq!(d0.running_compute_processes_count().unwrap(), 1);
            let m = d0.memory_info().unwrap();
            assert_eq!(m.total, 80 * GIB);
            assert_eq!(m.used, want + GIB);
            assert_eq!(m.free, 80 * GIB - want - GIB);
            // nothing on device 1
            assert!(d1.running_compute_processes().unwrap().is_empty());
            assert_eq!(d1.memory_info().unwrap().used, 0);

            w.finish();
            assert!(d0.running_compute_processes().unwrap().is_empty());
            assert_eq!(d0.memory_info().unwrap().used, GIB);
        },
    );
}

#[test]
fn killed_workload_disappears_and_overhead_is_configurable() {
    isolated(
        "killed_workload_disappears_and_overhead_is_configurable",
        &[(ENV_NVML_CTX_OVERHEAD, "100M")],
        |fx| {
            let nvml = nvml();
            let d0 = nvml.device_by_index(0).unwrap();
            let mut w = Workload::start(
                "alloc dev=0 size=2097152 count=1; checkpoint name=x",
                &fx.state(),
            );
            w.resume();
            w.line();
            let procs = d0.running_compute_processes().unwrap();
            assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(102 * MIB));
            assert_eq!(d0.memory_info().unwrap().used, 102 * MIB);
            // SIGKILL: no destructor runs, the slot stays in the state file, but NVML
            // must ignore the dead pid.
            w.child.kill().unwrap();
            w.child.wait().unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            while !d0.running_compute_processes().unwrap().is_empty() {
                assert!(Instant::now() < deadline, "dead process still listed");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(d0.memory_info().unwrap().used, 0);
        },
    );
}

#[test]
fn throttle_reasons() {
    isolated("throttle_reasons", &[], |fx| {
        let nvml = nvml();
        let d = nvml.device_by_index(0).unwrap();
        assert_eq!(
            d.supported_throttle_reasons().unwrap(),
            ThrottleReasons::all()
        );
        fx.control.set_gpu(0, "throttle", "0x44").unwrap();
        assert_eq!(
            d.current_throttle_reasons().unwrap(),
            ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_THERMAL_SLOWDOWN
        );
        fx.control.set_gpu(0, "supported_throttle", "0x5").unwrap();
        assert_eq!(
            d.supported_throttle_reasons().unwrap(),
            ThrottleReasons::GPU_IDLE | ThrottleReasons::SW_POWER_CAP
        );
    });
}

#[test]
fn lost_gpu() {
    isolated("lost_gpu", &[(ENV_GPU_COUNT, "2")], |fx| {
        let nvml = nvml();
        let d0 = nvml.device_by_index(0).unwrap();
        let d1 = nvml.device_by_index(1).unwrap();
        fx.control.set_gpu(1, "lost", 1).unwrap();
        assert!(matches!(d1.memory_info(), Err(NvmlError::GpuLost)));
        assert!(matches!(d1.power_usage(), Err(NvmlError::GpuLost)));
        assert!(matches!(d1.name(), Err(NvmlError::GpuLost)));
        assert!(matches!(
            d1.temperature(TemperatureSensor::Gpu),
            Err(NvmlError::GpuLost)
        ));
        assert!(matches!(
            d1.running_compute_processes(),
            Err(NvmlError::GpuLost)
        ));
        assert!(matches!(nvml.device_by_index(1), Err(NvmlError::GpuLost)));
        assert_eq!(nvml.device_count().unwrap(), 2);
        assert_eq!(d0.power_usage().unwrap(), 70_000);
        fx.control.set_gpu(1, "lost", 0).unwrap();
        assert_eq!(d1.power_usage().unwrap(), 70_000);
    });
}

#[test]
fn unsupported_groups() {
    isolated("unsupported_groups", &[(ENV_GPU_COUNT, "2")], |fx| {
        let nvml = nvml();
        let d0 = nvml.device_by_index(0).unwrap();
        let d1 = nvml.device_by_index(1).unwrap();
        fx.control
            .set_gpu(
                0,
                "unsupported",
                "process_utilization, ecc,pcie,energy,mig,clocks_event_reasons,power_limit",
            )
            .unwrap();
        let ns =
            |r: Result<(), NvmlError>| assert!(matches!(r, Err(NvmlError::NotSupported)), "{r:?}");
        ns(d0.process_utilization_stats(None).map(drop));
        ns(d0
            .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
            .map(drop));
        ns(d0.pcie_throughput(PcieUtilCounter::Receive).map(drop));
        ns(d0.total_energy_consumption().map(drop));
        ns(d0.mig_mode().map(drop));
        ns(d0.current_throttle_reasons().map(drop));
        ns(d0.supported_throttle_reasons().map(drop));
        ns(d0.enforced_power_limit().map(drop));
        ns(d0.power_management_limit().map(drop));
        // ECC events are no longer offered either
        let ev = d0.supported_event_types().unwrap();
        assert!(ev.contains(EventTypes::CRITICAL_XID_ERROR));
        assert!(!ev.contains(EventTypes::SINGLE_BIT_ECC_ERROR));
        // the rest works, and device 1 is unaffected
        assert_eq!(d0.power_usage().unwrap(), 70_000);
        assert_eq!(d0.memory_info().unwrap().total, GIB);
        assert_eq!(d1.total_energy_consumption().unwrap(), 1_000_000);
        assert!(d1.mig_mode().is_ok());
    });
}

#[test]
fn hung_groups_block_until_released() {
    isolated(
        "hung_groups_block_until_released",
        &[(ENV_GPU_COUNT, "2")],
        |fx| {
            let nvml = nvml();
            let d0 = nvml.device_by_index(0).unwrap();
            let d1 = nvml.device_by_index(1).unwrap();
            fx.control.set_gpu(0, "hang", "temperature").unwrap();
            std::thread::scope(|s| {
                let hung = s.spawn(|| d0.temperature(TemperatureSensor::Gpu));
                std::thread::sleep(Duration::from_millis(300));
                assert!(!hung.is_finished(), "the call returned while hung");
                // Other groups, the other device and the event API go on meanwhile.
                assert_eq!(d0.power_usage().unwrap(), 70_000);
                assert_eq!(d1.temperature(TemperatureSensor::Gpu).unwrap(), 35);
                assert!(d0.name().is_ok());
                fx.control.remove("gpu.0.hang").unwrap();
                assert_eq!(hung.join().unwrap().unwrap(), 35);
            });
        },
    );
}

#[test]
fn an_event_wait_on_a_lost_gpu_fails() {
    isolated(
        "an_event_wait_on_a_lost_gpu_fails",
        &[(ENV_GPU_COUNT, "2")],
        |fx| {
            let nvml = nvml();
            let d1 = nvml.device_by_index(1).unwrap();
            let set = nvml.create_event_set().unwrap();
            let set = d1
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .unwrap();
            fx.control.set_gpu(0, "lost", 1).unwrap();
            assert!(matches!(set.wait(20), Err(NvmlError::Timeout)));
            fx.control.set_gpu(1, "lost", 1).unwrap();
            assert!(matches!(set.wait(20), Err(NvmlError::GpuLost)));
            fx.control.set_gpu(1, "lost", 0).unwrap();
            assert!(matches!(set.wait(20), Err(NvmlError::Timeout)));
        },
    );
}

#[test]
fn process_utilization_samples() {
    isolated("process_utilization_samples", &[], |fx| {
        let nvml = nvml();
        let d = nvml.device_by_index(0).unwrap();
        // no samples: NVML_ERROR_NOT_FOUND, like the real library
        assert!(matches!(
            d.process_utilization_stats(None),
            Err(NvmlError::NotFound)
        ));
        fx.control.set_gpu(0, "proc_sm_util.4242", 73).unwrap();
        fx.control.set_gpu(0, "proc_mem_util.4242", 12).unwrap();
        fx.control.set_gpu(0, "proc_sm_util.777", 5).unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let mut s = d.process_utilization_stats(None).unwrap();
        s.sort_by_key(|s| s.pid);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].pid, s[0].sm_util, s[0].mem_util), (777, 5, 0));
        assert_eq!((s[1].pid, s[1].sm_util, s[1].mem_util), (4242, 73, 12));
        assert_eq!((s[1].enc_util, s[1].dec_util), (0, 0));
        assert!(s[0].timestamp >= before && s[0].timestamp < before + 10_000_000);
        // samples are always "new": a later query since the returned timestamp sees them
        std::thread::sleep(Duration::from_millis(2));
        let again = d.process_utilization_stats(s[0].timestamp).unwrap();
        assert_eq!(again.len(), 2);
        assert!(again[0].timestamp > s[0].timestamp);
    });
}

#[test]
fn xid_events() {
    isolated("xid_events", &[(ENV_GPU_COUNT, "2")], |fx| {
        let nvml = nvml();
        let d0 = nvml.device_by_index(0).unwrap();
        let d1 = nvml.device_by_index(1).unwrap();
        assert!(d1
            .supported_event_types()
            .unwrap()
            .contains(EventTypes::CRITICAL_XID_ERROR));
        let mut set = nvml.create_event_set().unwrap();
        set = d0
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap();
        set = d1
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .unwrap();
        let t = Instant::now();
        assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));
        assert!(t.elapsed() >= Duration::from_millis(50));

        assert_eq!(fx.control.inject_xid(1, 79).unwrap(), 1);
        let e = set.wait(1000).unwrap();
        assert_eq!(e.device.index().unwrap(), 1);
        assert_eq!(e.event_type, EventTypes::CRITICAL_XID_ERROR);
        assert_eq!(e.event_data, Some(XidError::Value(79)));
        assert!(matches!(set.wait(30), Err(NvmlError::Timeout)));

        // in seq order, each once
        fx.control.inject_xid(0, 48).unwrap();
        fx.control.inject_xid(1, 94).unwrap();
        let a = set.wait(1000).unwrap();
        let b = set.wait(1000).unwrap();
        assert_eq!(
            (a.device.index().unwrap(), a.event_data),
            (0, Some(XidError::Value(48)))
        );
        assert_eq!(
            (b.device.index().unwrap(), b.event_data),
            (1, Some(XidError::Value(94)))
        );
        assert!(matches!(set.wait(0), Err(NvmlError::Timeout)));

        // an event injected while waiting wakes the waiter
        let control = fx.control.clone();
        let injector = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            control.inject_xid(0, 13).unwrap();
        });
        let t = Instant::now();
        let e = set.wait(5000).unwrap();
        assert_eq!(e.event_data, Some(XidError::Value(13)));
        assert!(t.elapsed() < Duration::from_secs(2));
        injector.join().unwrap();

        // a second set sees every event once, but only for its registered devices
        let mut only1 = nvml.create_event_set().unwrap();
        only1 = d1
            .register_events(EventTypes::CRITICAL_XID_ERROR, only1)
            .unwrap();
        let seen: Vec<_> = std::iter::from_fn(|| only1.wait(20).ok())
            .map(|e| e.event_data)
            .collect();
        assert_eq!(
            seen,
            vec![Some(XidError::Value(79)), Some(XidError::Value(94))]
        );
        only1.release_events().unwrap();
        drop(set);
    });
}

#[test]
fn old_driver_lacks_symbols() {
    isolated("old_driver_lacks_symbols", &[], |_fx| {
        let nvml = init(&nvml_old_double_path());
        let d = nvml.device_by_index(0).unwrap();
        let missing = |r: Result<(), NvmlError>| {
            assert!(matches!(r, Err(NvmlError::FailedToLoadSymbol(_))), "{r:?}")
        };
        missing(d.total_energy_consumption().map(drop));
        missing(d.process_utilization_stats(None).map(drop));
        missing(d.current_throttle_reasons().map(drop));
        missing(d.supported_throttle_reasons().map(drop));
        assert_eq!(d.power_usage().unwrap(), 70_000);
        assert_eq!(d.memory_info().unwrap().total, GIB);
        assert_eq!(d.name().unwrap(), "NVIDIA H100 80GB HBM3");
    });
}

#[test]
fn fail_init_is_driver_not_loaded() {
    isolated(
        "fail_init_is_driver_not_loaded",
        &[(ENV_NVML_FAIL_INIT, "1")],
        |_fx| {
            let r = Nvml::builder()
                .lib_path(nvml_double_path().as_os_str())
                .init();
            assert!(
                matches!(r, Err(NvmlError::DriverNotLoaded)),
                "{:?}",
                r.err()
            );
        },
    );
}

#[test]
fn shutdown_then_uninitialized_and_refcounted_init() {
    isolated(
        "shutdown_then_uninitialized_and_refcounted_init",
        &[],
        |_fx| {
            let a = nvml();
            let b = nvml();
            a.shutdown().unwrap();
            // b still holds a reference (nvmlInit/nvmlShutdown are reference counted)
            assert_eq!(b.device_count().unwrap(), 1);
            let d = b.device_by_index(0).unwrap();
            // SAFETY: plain C call into the double; `b` is not used for anything that
            // needs an initialised library afterwards except the checks below.
            let r = unsafe { b.lib().nvmlShutdown() };
            assert_eq!(r, 0);
            assert!(matches!(b.device_count(), Err(NvmlError::Uninitialized)));
            assert!(matches!(d.power_usage(), Err(NvmlError::Uninitialized)));
        },
    );
}
