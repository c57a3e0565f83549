//! `cuda-workload`: drives libcuda (normally the test double) through `cudarc` following
//! a plan and prints its own ground truth of the memory-API calls it made.
//!
//! Usage: `cuda-workload (--plan "step; step; ..." | --plan-file F) [--pause] [-- ARG...]`
//! (the arguments after `--` are ignored: they stand for an inference server's own options
//! on its command line, `--api-key …`, for tests of what the agent makes of them).
//! See README.md for the plan language and the output format.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io::{BufRead, Write};
use std::sync::Arc;

use cuda_workload::{error_name, ApiStats, Truth, Variant};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

type CuResult = sys::CUresult;

const USAGE: &str =
    "usage: cuda-workload (--plan \"step; step; ...\" | --plan-file FILE) [--pause] [-- IGNORED...]
       cuda-workload --double-dir (nop5|push|endbr|novmm|nvml)";

// ------------------------------------------------------------------ plan

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Alloc {
        dev: u32,
        size: u64,
        count: u64,
    },
    Pitch {
        dev: u32,
        width: u64,
        height: u64,
        count: u64,
    },
    Managed {
        dev: u32,
        size: u64,
        count: u64,
    },
    Async {
        dev: u32,
        size: u64,
        count: u64,
    },
    Pool {
        dev: u32,
        size: u64,
        count: u64,
    },
    Vmm {
        dev: u32,
        size: u64,
        count: u64,
    },
    Host {
        size: u64,
        count: u64,
    },
    HostAlloc {
        size: u64,
        count: u64,
    },
    Free {
        count: Option<u64>,
    },
    BadFree {
        count: u64,
    },
    Zero {
        dev: u32,
        count: u64,
    },
    /// `cuMemAlloc_v2` through a pointer that returns a plain `u32`: safe for result codes
    /// `CUresult` does not have (the double's `FAKEGPU_ALLOC_RESULTS`).
    RawAlloc {
        dev: u32,
        size: u64,
        count: u64,
    },
    Exhaust {
        dev: u32,
        size: u64,
    },
    /// `cuInit(0)`, then `cuMemAlloc_v2` with no context: what a process sees of a driver with
    /// no GPU (the real userspace driver answers `no_device`, then `not_initialized`).
    Uninit {
        size: u64,
        count: u64,
    },
    Threads {
        n: u64,
        devs: Vec<u32>,
        size: u64,
        count: u64,
    },
    Sleep {
        ms: u64,
    },
    Checkpoint {
        name: String,
    },
    Exit {
        code: i32,
    },
    Kill,
}

fn parse_num(s: &str) -> Result<u64, String> {
    let s = s.trim().replace('_', "");
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1u64 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1u64 << 30),
        _ => (&s[..], 1),
    };
    let v = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|e| format!("bad number {s:?}: {e}"))?;
    v.checked_mul(mult)
        .ok_or_else(|| format!("number {s:?} overflows"))
}

struct Args<'a> {
    step: &'a str,
    kv: BTreeMap<&'a str, &'a str>,
}

impl<'a> Args<'a> {
    fn num(&mut self, key: &str, default: Option<u64>) -> Result<u64, String> {
        match self.kv.remove(key) {
            Some(v) => parse_num(v).map_err(|e| format!("{}: {key}: {e}", self.step)),
            None => default.ok_or_else(|| format!("{}: missing {key}=", self.step)),
        }
    }
    fn dev(&mut self) -> Result<u32, String> {
        let d = self.num("dev", Some(0))?;
        u32::try_from(d).map_err(|_| format!("{}: bad dev", self.step))
    }
    fn finish(self) -> Result<(), String> {
        match self.kv.keys().next() {
            Some(k) => Err(format!("{}: unknown argument {k:?}", self.step)),
            None => Ok(()),
        }
    }
}

fn parse_step(text: &str) -> Result<Option<Step>, String> {
    let text = text.split('#').next().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let mut words = text.split_whitespace();
    let step = words.next().unwrap_or_default();
    let mut kv = BTreeMap::new();
    let mut flags = Vec::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) => {
                kv.insert(k, v);
            }
            None => flags.push(w),
        }
    }
    if step == "free" && flags == ["all"] {
        if !kv.is_empty() {
            return Err("free all takes no arguments".into());
        }
        return Ok(Some(Step::Free { count: None }));
    }
    if let Some(f) = flags.first() {
        return Err(format!("{step}: unexpected word {f:?}"));
    }
    let mut a = Args { step, kv };
    let s = match step {
        "alloc" => Step::Alloc {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "pitch" => Step::Pitch {
            dev: a.dev()?,
            width: a.num("width", None)?,
            height: a.num("height", None)?,
            count: a.num("count", Some(1))?,
        },
        "managed" => Step::Managed {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "async" => Step::Async {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "pool" => Step::Pool {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "vmm" => Step::Vmm {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "host" => Step::Host {
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "hostalloc" => Step::HostAlloc {
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "free" => Step::Free {
            count: Some(a.num("count", Some(1))?),
        },
        "badfree" => Step::BadFree {
            count: a.num("count", Some(1))?,
        },
        "zero" => Step::Zero {
            dev: a.dev()?,
            count: a.num("count", Some(1))?,
        },
        "rawalloc" => Step::RawAlloc {
            dev: a.dev()?,
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "exhaust" => Step::Exhaust {
            dev: a.dev()?,
            size: a.num("size", None)?,
        },
        "uninit" => Step::Uninit {
            size: a.num("size", None)?,
            count: a.num("count", Some(1))?,
        },
        "threads" => {
            let devs = match a.kv.remove("devs") {
                Some(list) => list
                    .split(',')
                    .map(|d| parse_num(d).and_then(|d| u32::try_from(d).map_err(|e| e.to_string())))
                    .collect::<Result<Vec<u32>, String>>()
                    .map_err(|e| format!("threads: devs: {e}"))?,
                None => vec![0],
            };
            if devs.is_empty() {
                return Err("threads: empty devs".into());
            }
            Step::Threads {
                n: a.num("n", None)?,
                devs,
                size: a.num("size", None)?,
                count: a.num("count", Some(1))?,
            }
        }
        "sleep" => Step::Sleep {
            ms: a.num("ms", None)?,
        },
        "checkpoint" => Step::Checkpoint {
            name: a
                .kv
                .remove("name")
                .ok_or("checkpoint: missing name=")?
                .to_string(),
        },
        "exit" => Step::Exit {
            code: i32::try_from(a.num("code", Some(0))?)
                .map_err(|_| "exit: bad code".to_string())?,
        },
        "kill" => Step::Kill,
        other => return Err(format!("unknown step {other:?}")),
    };
    a.finish()?;
    Ok(Some(s))
}

fn parse_plan(text: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for part in text.split([';', '\n']) {
        if let Some(s) = parse_step(part)? {
            steps.push(s);
        }
    }
    Ok(steps)
}

fn devices_of(steps: &[Step]) -> Vec<u32> {
    let mut devs = std::collections::BTreeSet::new();
    for s in steps {
        match s {
            Step::Alloc { dev, .. }
            | Step::Pitch { dev, .. }
            | Step::Managed { dev, .. }
            | Step::Async { dev, .. }
            | Step::Pool { dev, .. }
            | Step::Vmm { dev, .. }
            | Step::Zero { dev, .. }
            | Step::RawAlloc { dev, .. }
            | Step::Exhaust { dev, .. } => {
                devs.insert(*dev);
            }
            Step::Threads { devs: d, .. } => devs.extend(d.iter().copied()),
            _ => {}
        }
    }
    // A plan of calls without a device (`uninit`) must not create a context: there may be no
    // GPU at all.
    let uninit = steps.iter().any(|s| matches!(s, Step::Uninit { .. }));
    if devs.is_empty() && !uninit {
        devs.insert(0);
    }
    devs.into_iter().collect()
}

// ------------------------------------------------------------------ truth

#[derive(Default)]
struct Acc {
    apis: BTreeMap<String, ApiStats>,
    live_device_bytes: BTreeMap<u32, u64>,
    live_host_bytes: u64,
}

/// The codes the real userspace driver answers without a GPU, by their header names; others
/// as `code_<n>`.
fn driver_code_name(r: u32) -> String {
    match r {
        3 => result_name(CuResult::CUDA_ERROR_NOT_INITIALIZED),
        100 => result_name(CuResult::CUDA_ERROR_NO_DEVICE),
        _ => format!("code_{r}"),
    }
}

fn result_name(r: CuResult) -> String {
    error_name(&format!("{r:?}"))
}

impl Acc {
    /// Records one call; returns whether it succeeded.
    fn rec(&mut self, api: &str, r: CuResult, bytes: u64) -> bool {
        let st = self.apis.entry(api.to_string()).or_default();
        st.calls += 1;
        if r == CuResult::CUDA_SUCCESS {
            st.ok += 1;
            st.bytes += bytes;
            true
        } else {
            *st.failures.entry(result_name(r)).or_default() += 1;
            false
        }
    }

    /// Records one call whose result is a raw code: failures are named `code_<n>`.
    fn rec_raw(&mut self, api: &str, r: u32, bytes: u64) -> bool {
        let st = self.apis.entry(api.to_string()).or_default();
        st.calls += 1;
        if r == 0 {
            st.ok += 1;
            st.bytes += bytes;
            true
        } else {
            *st.failures.entry(format!("code_{r}")).or_default() += 1;
            false
        }
    }

    /// As [`Acc::rec_raw`], naming the codes a driver without a GPU answers as the driver's
    /// header names them.
    fn rec_named(&mut self, api: &str, r: u32, bytes: u64) -> bool {
        let st = self.apis.entry(api.to_string()).or_default();
        st.calls += 1;
        if r == 0 {
            st.ok += 1;
            st.bytes += bytes;
            return true;
        }
        *st.failures.entry(driver_code_name(r)).or_default() += 1;
        false
    }

    fn dev_add(&mut self, dev: u32, bytes: u64) {
        *self.live_device_bytes.entry(dev).or_default() += bytes;
    }

    fn dev_sub(&mut self, dev: u32, bytes: u64) {
        let e = self.live_device_bytes.entry(dev).or_default();
        *e = e.saturating_sub(bytes);
    }

    fn merge(&mut self, other: Acc) {
        for (api, s) in other.apis {
            let st = self.apis.entry(api).or_default();
            st.calls += s.calls;
            st.ok += s.ok;
            st.bytes += s.bytes;
            for (k, v) in s.failures {
                *st.failures.entry(k).or_default() += v;
            }
        }
        for (d, b) in other.live_device_bytes {
            *self.live_device_bytes.entry(d).or_default() += b;
        }
        self.live_host_bytes += other.live_host_bytes;
    }
}

// ------------------------------------------------------------------ allocations

#[derive(Debug)]
enum Alloc {
    /// cuMemAlloc_v2 / Pitch / Managed: freed with cuMemFree_v2.
    Device {
        dev: u32,
        ptr: sys::CUdeviceptr,
        size: u64,
    },
    /// cuMemAllocAsync / cuMemAllocFromPoolAsync: freed with cuMemFreeAsync on `stream`.
    Async {
        dev: u32,
        ptr: sys::CUdeviceptr,
        size: u64,
        stream: usize,
    },
    /// cuMemAddressReserve + cuMemCreate + cuMemMap.
    Vmm {
        dev: u32,
        va: sys::CUdeviceptr,
        size: u64,
        handle: sys::CUmemGenericAllocationHandle,
    },
    /// cuMemAllocHost_v2 / cuMemHostAlloc: freed with cuMemFreeHost.
    Host { ptr: usize, size: u64 },
}

fn bind(ctx: &CudaContext) {
    // Raw cuCtxSetCurrent: makes the device's primary context current on this thread.
    let r = unsafe { sys::cuCtxSetCurrent(ctx.cu_ctx()) };
    if r != CuResult::CUDA_SUCCESS {
        fatal(&format!("cuCtxSetCurrent failed: {r:?}"));
    }
}

/// Frees one allocation with the matching call(s).  Thread-agnostic.
fn free_one(acc: &mut Acc, ctxs: &BTreeMap<u32, Arc<CudaContext>>, a: Alloc) {
    match a {
        Alloc::Device { dev, ptr, size } => {
            bind(&ctxs[&dev]);
            let r = unsafe { sys::cuMemFree_v2(ptr) };
            if acc.rec("cuMemFree_v2", r, size) {
                acc.dev_sub(dev, size);
            }
        }
        Alloc::Async {
            dev,
            ptr,
            size,
            stream,
        } => {
            bind(&ctxs[&dev]);
            let r = unsafe { sys::cuMemFreeAsync(ptr, stream as sys::CUstream) };
            if acc.rec("cuMemFreeAsync", r, size) {
                acc.dev_sub(dev, size);
            }
        }
        Alloc::Vmm {
            dev,
            va,
            size,
            handle,
        } => {
            let r = unsafe { sys::cuMemUnmap(va, size as usize) };
            acc.rec("cuMemUnmap", r, size);
            let r = unsafe { sys::cuMemRelease(handle) };
            if acc.rec("cuMemRelease", r, size) {
                acc.dev_sub(dev, size);
            }
            let r = unsafe { sys::cuMemAddressFree(va, size as usize) };
            acc.rec("cuMemAddressFree", r, size);
        }
        Alloc::Host { ptr, size } => {
            let r = unsafe { sys::cuMemFreeHost(ptr as *mut c_void) };
            if acc.rec("cuMemFreeHost", r, size) {
                acc.live_host_bytes = acc.live_host_bytes.saturating_sub(size);
            }
        }
    }
}

// ------------------------------------------------------------------ output

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let line = serde_json::to_string(v).expect("serialize");
    // A closed stdout is not worth a panic; the test harness may have gone away.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fatal(msg: &str) -> ! {
    eprintln!("cuda-workload: {msg}");
    let _ = std::io::stdout().flush();
    std::process::exit(2);
}

fn wait_stdin_line() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn has_symbol(name: &str) -> bool {
    // SAFETY: culib() loads (once) the same library every sys::cu* call uses.
    unsafe {
        sys::culib()
            .get::<unsafe extern "C" fn()>(name.as_bytes())
            .is_ok()
    }
}

extern "C" {
    fn raise(sig: std::ffi::c_int) -> std::ffi::c_int;
}
const SIGKILL: std::ffi::c_int = 9;

// ------------------------------------------------------------------ workload

struct Workload {
    pid: u32,
    pause: bool,
    ctxs: BTreeMap<u32, Arc<CudaContext>>,
    streams: BTreeMap<u32, Arc<CudaStream>>,
    pools: BTreeMap<u32, usize>,
    live: Vec<Alloc>,
    acc: Acc,
    bad_ptr: u64,
}

impl Workload {
    fn ctx(&mut self, dev: u32) -> Arc<CudaContext> {
        if let std::collections::btree_map::Entry::Vacant(e) = self.ctxs.entry(dev) {
            let ctx = CudaContext::new(dev as usize)
                .unwrap_or_else(|e| fatal(&format!("CudaContext::new({dev}) failed: {e:?}")));
            e.insert(ctx);
            self.acc.live_device_bytes.entry(dev).or_default();
        }
        let ctx = self.ctxs[&dev].clone();
        bind(&ctx);
        ctx
    }

    fn stream(&mut self, dev: u32) -> sys::CUstream {
        let ctx = self.ctx(dev);
        let s = self.streams.entry(dev).or_insert_with(|| {
            ctx.new_stream()
                .unwrap_or_else(|e| fatal(&format!("new_stream({dev}) failed: {e:?}")))
        });
        let raw = s.cu_stream();
        bind(&ctx);
        raw
    }

    fn pool(&mut self, dev: u32) -> sys::CUmemoryPool {
        if let Some(p) = self.pools.get(&dev) {
            return *p as sys::CUmemoryPool;
        }
        let ctx = self.ctx(dev);
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        if r != CuResult::CUDA_SUCCESS {
            fatal(&format!("cuDeviceGetDefaultMemPool({dev}) failed: {r:?}"));
        }
        self.pools.insert(dev, pool as usize);
        pool
    }

    fn truth(&self) -> serde_json::Value {
        let t = Truth {
            pid: self.pid,
            apis: self.acc.apis.clone(),
            live_device_bytes: self.acc.live_device_bytes.clone(),
            live_host_bytes: self.acc.live_host_bytes,
        };
        serde_json::to_value(t).expect("truth to json")
    }

    fn missing(&self, step: &str, symbols: &[&str]) -> bool {
        if let Some(sym) = symbols.iter().find(|s| !has_symbol(s)) {
            emit(&serde_json::json!({"skipped": step, "reason": format!("missing symbol {sym}")}));
            return true;
        }
        false
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Alloc { dev, size, count } => {
                self.ctx(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { sys::cuMemAlloc_v2(&mut p, size as usize) };
                    if self.acc.rec("cuMemAlloc_v2", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Device { dev, ptr: p, size });
                    }
                }
            }
            Step::Pitch {
                dev,
                width,
                height,
                count,
            } => {
                self.ctx(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let mut pitch: usize = 0;
                    let r = unsafe {
                        sys::cuMemAllocPitch_v2(
                            &mut p,
                            &mut pitch,
                            width as usize,
                            height as usize,
                            4,
                        )
                    };
                    let size = (pitch as u64).saturating_mul(height);
                    if self.acc.rec("cuMemAllocPitch_v2", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Device { dev, ptr: p, size });
                    }
                }
            }
            Step::Managed { dev, size, count } => {
                self.ctx(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let flags = sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32;
                    let r = unsafe { sys::cuMemAllocManaged(&mut p, size as usize, flags) };
                    if self.acc.rec("cuMemAllocManaged", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Device { dev, ptr: p, size });
                    }
                }
            }
            Step::Async { dev, size, count } => {
                let stream = self.stream(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { sys::cuMemAllocAsync(&mut p, size as usize, stream) };
                    if self.acc.rec("cuMemAllocAsync", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Async {
                            dev,
                            ptr: p,
                            size,
                            stream: stream as usize,
                        });
                    }
                }
            }
            Step::Pool { dev, size, count } => {
                if self.missing("pool", &["cuMemAllocFromPoolAsync"]) {
                    return;
                }
                let pool = self.pool(dev);
                let stream = self.stream(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe {
                        sys::cuMemAllocFromPoolAsync(&mut p, size as usize, pool, stream)
                    };
                    if self.acc.rec("cuMemAllocFromPoolAsync", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Async {
                            dev,
                            ptr: p,
                            size,
                            stream: stream as usize,
                        });
                    }
                }
            }
            Step::Vmm { dev, size, count } => {
                let syms = [
                    "cuMemAddressReserve",
                    "cuMemCreate",
                    "cuMemMap",
                    "cuMemUnmap",
                    "cuMemRelease",
                    "cuMemAddressFree",
                ];
                if self.missing("vmm", &syms) {
                    return;
                }
                self.ctx(dev);
                // SAFETY: plain C struct; all-zero is valid (INVALID/NONE enum values).
                let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
                prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
                prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
                prop.location.id = dev as i32;
                let sz = size as usize;
                for _ in 0..count {
                    let mut va: sys::CUdeviceptr = 0;
                    let r = unsafe { sys::cuMemAddressReserve(&mut va, sz, 0, 0, 0) };
                    if !self.acc.rec("cuMemAddressReserve", r, size) {
                        continue;
                    }
                    let mut handle: sys::CUmemGenericAllocationHandle = 0;
                    let r = unsafe { sys::cuMemCreate(&mut handle, sz, &prop, 0) };
                    if !self.acc.rec("cuMemCreate", r, size) {
                        let r = unsafe { sys::cuMemAddressFree(va, sz) };
                        self.acc.rec("cuMemAddressFree", r, size);
                        continue;
                    }
                    self.acc.dev_add(dev, size);
                    let r = unsafe { sys::cuMemMap(va, sz, 0, handle, 0) };
                    if !self.acc.rec("cuMemMap", r, size) {
                        let r = unsafe { sys::cuMemRelease(handle) };
                        if self.acc.rec("cuMemRelease", r, size) {
                            self.acc.dev_sub(dev, size);
                        }
                        let r = unsafe { sys::cuMemAddressFree(va, sz) };
                        self.acc.rec("cuMemAddressFree", r, size);
                        continue;
                    }
                    self.live.push(Alloc::Vmm {
                        dev,
                        va,
                        size,
                        handle,
                    });
                }
            }
            Step::Host { size, count } | Step::HostAlloc { size, count } => {
                let hostalloc = matches!(step, Step::HostAlloc { .. });
                let api = if hostalloc {
                    "cuMemHostAlloc"
                } else {
                    "cuMemAllocHost_v2"
                };
                for _ in 0..count {
                    let mut p: *mut c_void = std::ptr::null_mut();
                    let r = unsafe {
                        if hostalloc {
                            sys::cuMemHostAlloc(&mut p, size as usize, 0)
                        } else {
                            sys::cuMemAllocHost_v2(&mut p, size as usize)
                        }
                    };
                    if self.acc.rec(api, r, size) {
                        self.acc.live_host_bytes += size;
                        self.live.push(Alloc::Host {
                            ptr: p as usize,
                            size,
                        });
                    }
                }
            }
            Step::Free { count } => {
                let n = count.map_or(self.live.len(), |c| (c as usize).min(self.live.len()));
                for _ in 0..n {
                    let a = self.live.pop().expect("live allocation");
                    free_one(&mut self.acc, &self.ctxs, a);
                }
            }
            Step::BadFree { count } => {
                if self.ctxs.is_empty() {
                    self.ctx(0);
                }
                for _ in 0..count {
                    // Far away from the double's device (0x7e..) and VA (0x7a..) ranges.
                    self.bad_ptr += 1;
                    let p = 0x0bad_0000_0000u64 + self.bad_ptr * 0x1000;
                    let r = unsafe { sys::cuMemFree_v2(p) };
                    self.acc.rec("cuMemFree_v2", r, 0);
                }
            }
            Step::Zero { dev, count } => {
                self.ctx(dev);
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { sys::cuMemAlloc_v2(&mut p, 0) };
                    if self.acc.rec("cuMemAlloc_v2", r, 0) {
                        self.live.push(Alloc::Device {
                            dev,
                            ptr: p,
                            size: 0,
                        });
                    }
                }
            }
            Step::RawAlloc { dev, size, count } => {
                self.ctx(dev);
                // SAFETY: the symbol has this C signature; `CUresult` is a 32-bit enum, read
                // here as the integer it is so that any value the library returns is valid.
                let alloc = unsafe {
                    *sys::culib()
                        .get::<unsafe extern "C" fn(*mut sys::CUdeviceptr, usize) -> u32>(
                            b"cuMemAlloc_v2",
                        )
                        .unwrap_or_else(|e| fatal(&format!("rawalloc: {e}")))
                };
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { alloc(&mut p, size as usize) };
                    if self.acc.rec_raw("cuMemAlloc_v2", r, size) {
                        self.acc.dev_add(dev, size);
                        self.live.push(Alloc::Device { dev, ptr: p, size });
                    }
                }
            }
            Step::Uninit { size, count } => {
                // SAFETY: these symbols have these C signatures; results are read as the
                // integers they are, so any code the library returns is valid.
                let (init, alloc) = unsafe {
                    let lib = sys::culib();
                    let get = |name: &[u8]| {
                        lib.get::<unsafe extern "C" fn(*mut sys::CUdeviceptr, usize) -> u32>(name)
                            .map(|f| *f)
                            .unwrap_or_else(|e| fatal(&format!("uninit: {e}")))
                    };
                    let init = *lib
                        .get::<unsafe extern "C" fn(u32) -> u32>(b"cuInit")
                        .unwrap_or_else(|e| fatal(&format!("uninit: {e}")));
                    (init, get(b"cuMemAlloc_v2"))
                };
                // Its answer is not part of the truth: the agent does not probe cuInit.
                let _ = unsafe { init(0) };
                for _ in 0..count {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { alloc(&mut p, size as usize) };
                    if self.acc.rec_named("cuMemAlloc_v2", r, size) {
                        // A driver that has a device after all: keep it to be freed.
                        self.acc.dev_add(0, size);
                        self.live.push(Alloc::Device {
                            dev: 0,
                            ptr: p,
                            size,
                        });
                    }
                }
            }
            Step::Exhaust { dev, size } => {
                self.ctx(dev);
                if size == 0 {
                    fatal("exhaust: size must be > 0");
                }
                loop {
                    let mut p: sys::CUdeviceptr = 0;
                    let r = unsafe { sys::cuMemAlloc_v2(&mut p, size as usize) };
                    if !self.acc.rec("cuMemAlloc_v2", r, size) {
                        break;
                    }
                    self.acc.dev_add(dev, size);
                    self.live.push(Alloc::Device { dev, ptr: p, size });
                }
            }
            Step::Threads {
                n,
                devs,
                size,
                count,
            } => self.threads(n, &devs, size, count),
            Step::Sleep { ms } => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Step::Checkpoint { name } => {
                emit(&serde_json::json!({"checkpoint": name, "truth": self.truth()}));
                if self.pause {
                    wait_stdin_line();
                }
            }
            Step::Exit { code } => {
                let _ = std::io::stdout().flush();
                std::process::exit(code);
            }
            Step::Kill => {
                let _ = std::io::stdout().flush();
                // SAFETY: raise is async-signal-safe; SIGKILL cannot be caught.
                unsafe { raise(SIGKILL) };
                unreachable!("SIGKILL did not kill the process");
            }
        }
    }

    fn threads(&mut self, n: u64, devs: &[u32], size: u64, count: u64) {
        for d in devs {
            self.ctx(*d);
        }
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let dev = devs[i as usize % devs.len()];
                let ctx = self.ctxs[&dev].clone();
                let ctxs = self.ctxs.clone();
                std::thread::spawn(move || {
                    bind(&ctx);
                    let mut acc = Acc::default();
                    let mut mine = Vec::new();
                    for _ in 0..count {
                        let mut p: sys::CUdeviceptr = 0;
                        let r = unsafe { sys::cuMemAlloc_v2(&mut p, size as usize) };
                        if acc.rec("cuMemAlloc_v2", r, size) {
                            acc.dev_add(dev, size);
                            mine.push(Alloc::Device { dev, ptr: p, size });
                        }
                    }
                    // Free every second successful allocation (indices 1, 3, 5, ...).
                    let mut kept = Vec::new();
                    for (j, a) in mine.into_iter().enumerate() {
                        if j % 2 == 1 {
                            free_one(&mut acc, &ctxs, a);
                        } else {
                            kept.push(a);
                        }
                    }
                    (acc, kept)
                })
            })
            .collect();
        for h in handles {
            let (acc, kept) = h.join().unwrap_or_else(|_| fatal("worker thread panicked"));
            self.acc.merge(acc);
            self.live.extend(kept);
        }
    }
}

fn main() {
    let mut plan: Option<String> = None;
    let mut pause = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--plan" => plan = Some(args.next().unwrap_or_else(|| fatal(USAGE))),
            "--plan-file" => {
                let f = args.next().unwrap_or_else(|| fatal(USAGE));
                plan = Some(
                    std::fs::read_to_string(&f)
                        .unwrap_or_else(|e| fatal(&format!("cannot read {f}: {e}"))),
                );
            }
            "--pause" => pause = true,
            "--" => break,
            // For scripts that cannot link this crate: where the double of a variant lives.
            "--double-dir" => {
                let name = args.next().unwrap_or_else(|| fatal(USAGE));
                let dir = match name.as_str() {
                    "nvml" => cuda_workload::nvml_double_dir(),
                    _ => Variant::from_name(&name)
                        .unwrap_or_else(|| fatal(&format!("unknown variant {name:?}")))
                        .dir(),
                };
                println!("{}", dir.display());
                return;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fatal(&format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let plan = plan.unwrap_or_else(|| fatal(USAGE));
    let steps = parse_plan(&plan).unwrap_or_else(|e| fatal(&format!("bad plan: {e}")));

    if !unsafe { sys::is_culib_present() } {
        fatal("cannot load libcuda (libcuda.so / libcuda.so.1); set LD_LIBRARY_PATH to the double's directory");
    }
    let mut w = Workload {
        pid: std::process::id(),
        pause,
        ctxs: BTreeMap::new(),
        streams: BTreeMap::new(),
        pools: BTreeMap::new(),
        live: Vec::new(),
        acc: Acc::default(),
        bad_ptr: 0,
    };
    // Initialise (cuInit, primary contexts) for every device the plan uses before
    // announcing readiness, so libcuda is mapped when a test attaches its probes.
    for dev in devices_of(&steps) {
        w.ctx(dev);
    }
    emit(&serde_json::json!({"ready": true, "pid": w.pid}));
    if pause {
        wait_stdin_line();
    }
    for step in steps {
        w.run(step);
    }
    emit(&serde_json::json!({"final": true, "truth": w.truth()}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plan() {
        let steps = parse_plan(
            "alloc dev=1 size=1M count=3; free all\n# comment\nthreads n=4 devs=0,1 size=0x1000 count=2; free; exit code=3",
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Alloc {
                    dev: 1,
                    size: 1 << 20,
                    count: 3
                },
                Step::Free { count: None },
                Step::Threads {
                    n: 4,
                    devs: vec![0, 1],
                    size: 4096,
                    count: 2
                },
                Step::Free { count: Some(1) },
                Step::Exit { code: 3 },
            ]
        );
        assert!(parse_plan("alloc dev=0").is_err());
        assert!(parse_plan("alloc size=1 bogus=2").is_err());
        assert!(parse_plan("frobnicate").is_err());
    }

    #[test]
    fn error_names() {
        assert_eq!(
            result_name(CuResult::CUDA_ERROR_OUT_OF_MEMORY),
            "out_of_memory"
        );
        assert_eq!(
            result_name(CuResult::CUDA_ERROR_INVALID_VALUE),
            "invalid_value"
        );
    }
}
