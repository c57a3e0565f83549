//! The CUDA driver double, loaded into the bench process with `dlopen` by path, so that each
//! variant (first instruction nop5 / push / endbr) is a separate library with its own state.

use std::{
    ffi::{c_void, CStr, CString},
    os::unix::ffi::OsStrExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

type CuInit = unsafe extern "C" fn(u32) -> u32;
type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> u32;
type CuPrimaryCtxRetain = unsafe extern "C" fn(*mut *mut c_void, i32) -> u32;
type CuCtxSetCurrent = unsafe extern "C" fn(*mut c_void) -> u32;
type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> u32;
type CuMemFree = unsafe extern "C" fn(u64) -> u32;

/// Bytes per benchmark allocation.
pub const ALLOC_SIZE: usize = 4096;

pub struct Driver {
    handle: *mut c_void,
    device_get: CuDeviceGet,
    retain: CuPrimaryCtxRetain,
    set_current: CuCtxSetCurrent,
    alloc: CuMemAlloc,
    free: CuMemFree,
}

// SAFETY: the handle is only used by `Drop`; the double's functions are thread-safe (a mutex
// guards its tables, contexts are per thread).
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

impl Driver {
    /// Loads the library at `path` and calls `cuInit(0)`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let driver = Self::open_uninit(path)?;
        // SAFETY: the library's cuInit, of that C signature (cuda.h).
        let init: CuInit = unsafe { sym(driver.handle, c"cuInit")? };
        // SAFETY: no preconditions.
        check("cuInit", unsafe { init(0) })?;
        Ok(driver)
    }

    /// Loads the library at `path` without `cuInit`: every allocation then fails with
    /// `CUDA_ERROR_NOT_INITIALIZED`, on the double as on the real driver without a GPU.
    pub fn open_uninit(path: &Path) -> anyhow::Result<Self> {
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a valid C string; the double has no constructors with preconditions.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            bail!("dlopen {}: {}", path.display(), dl_error());
        }
        // SAFETY: each symbol is the library's function of that C signature (cuda.h).
        let driver = unsafe {
            Driver {
                handle,
                device_get: sym(handle, c"cuDeviceGet")?,
                retain: sym(handle, c"cuDevicePrimaryCtxRetain")?,
                set_current: sym(handle, c"cuCtxSetCurrent")?,
                alloc: sym(handle, c"cuMemAlloc_v2")?,
                free: sym(handle, c"cuMemFree_v2")?,
            }
        };
        Ok(driver)
    }

    /// Makes device 0's primary context current on the calling thread (`cuDeviceGet`,
    /// `cuDevicePrimaryCtxRetain`, `cuCtxSetCurrent`, as cudarc does). Called again once the
    /// agent's probes are attached, so that they learn the thread's device as in a real server.
    pub fn bind_context(&self) -> anyhow::Result<()> {
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointers; the double's documented signatures.
        unsafe {
            check("cuDeviceGet", (self.device_get)(&mut dev, 0))?;
            check("cuDevicePrimaryCtxRetain", (self.retain)(&mut ctx, dev))?;
            check("cuCtxSetCurrent", (self.set_current)(ctx))?;
        }
        Ok(())
    }

    /// One `cuMemAlloc_v2(&ptr, 4096)` + `cuMemFree_v2(ptr)` pair; a failing allocation is the
    /// only call.
    #[inline]
    pub fn pair(&self) -> u32 {
        self.pair_of(ALLOC_SIZE)
    }

    /// The same pair, allocating `size` bytes.
    #[inline]
    pub fn pair_of(&self, size: usize) -> u32 {
        let mut ptr = 0u64;
        // SAFETY: valid out-pointer; frees what was just allocated.
        unsafe {
            let r = (self.alloc)(&mut ptr, size);
            if r != 0 {
                return r;
            }
            (self.free)(ptr)
        }
    }

    /// Checks that a pair succeeds (a context is current).
    pub fn check_pair(&self) -> anyhow::Result<()> {
        check("cuMemAlloc_v2/cuMemFree_v2", self.pair())
    }

    /// Wall time of `n` pairs on the calling thread.
    pub fn time_pairs(&self, n: u64) -> Duration {
        self.time_pairs_of(n, ALLOC_SIZE)
    }

    /// Wall time of `n` pairs of `size` bytes on the calling thread.
    pub fn time_pairs_of(&self, n: u64, size: usize) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(self.pair_of(size));
        }
        start.elapsed()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and no function pointer outlives `self`.
        unsafe { libc::dlclose(self.handle) };
    }
}

/// # Safety
/// `T` must be the function pointer type of the symbol's real signature.
unsafe fn sym<T: Copy>(handle: *mut c_void, name: &CStr) -> anyhow::Result<T> {
    // SAFETY: valid handle and C string.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        bail!("dlsym {}: {}", name.to_string_lossy(), dl_error());
    }
    assert_eq!(size_of::<T>(), size_of::<*mut c_void>());
    // SAFETY: the caller names the real signature; sizes checked.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

fn check(what: &str, r: u32) -> anyhow::Result<()> {
    if r != 0 {
        bail!("{what} returned CUresult {r}");
    }
    Ok(())
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a valid C string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null C string from dlerror.
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// The real NVIDIA `libcuda.so.1` that `cargo xtask setup` extracts (`NVIDIA_DRIVER_DIR`).
pub fn real_driver_path() -> anyhow::Result<std::path::PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/nvidia-driver/usr/lib/x86_64-linux-gnu/nvidia/current/libcuda.so.1");
    std::fs::canonicalize(&lib).with_context(|| {
        format!(
            "the real driver is not at {} (`cargo xtask setup` extracts it)",
            lib.display()
        )
    })
}

/// Opens the double of `variant`, with a context current on the calling thread.
pub fn open_variant(variant: cuda_workload::Variant) -> anyhow::Result<Driver> {
    let path = variant.lib_path();
    let d = Driver::open(&path).with_context(|| format!("double {}", variant.name()))?;
    d.bind_context()?;
    d.check_pair()?;
    Ok(d)
}
