//! tracefs: tracepoints are attached by id, and the ids live in tracefs. Many hosts (fresh VMs,
//! minimal images) do not mount it, so the agent mounts it itself where it may (CAP_SYS_ADMIN
//! in its mount namespace), and otherwise says in one line what to mount where. It must run
//! before the first tracepoint attach: aya looks tracefs up once and keeps the answer.

use std::{
    ffi::CStr,
    path::{Path, PathBuf},
};

/// Where the kernel puts tracefs, in the order aya looks.
pub const MOUNT_POINTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
#[error(
    "tracefs is not mounted and the agent cannot mount it at {target}; run \
     `mount -t tracefs nodev /sys/kernel/tracing` on the host, or mount the host's \
     /sys/kernel/tracing into the agent's container"
)]
pub struct TracefsError {
    pub target: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// How tracefs came to be available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tracefs {
    /// Already mounted here.
    Found(PathBuf),
    /// Mounted by the agent (left mounted: other tools share it and it costs nothing).
    Mounted(PathBuf),
}

/// tracefs is usable when its mount point lists the `events` directory.
fn usable(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is nowhere.
pub fn ensure() -> Result<Tracefs, TracefsError> {
    if let Some(found) = MOUNT_POINTS.iter().map(Path::new).find(|d| usable(d)) {
        return Ok(Tracefs::Found(found.to_path_buf()));
    }
    let target = MOUNT_POINTS[0];
    mount_tracefs(target).map_err(|source| TracefsError { target, source })?;
    tracing::info!(target, "tracefs was not mounted: mounted it");
    Ok(Tracefs::Mounted(PathBuf::from(target)))
}

fn mount_tracefs(target: &str) -> std::io::Result<()> {
    const SOURCE: &CStr = c"nodev";
    const FSTYPE: &CStr = c"tracefs";
    let target_c = std::ffi::CString::new(target).map_err(std::io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            SOURCE.as_ptr(),
            target_c.as_ptr(),
            FSTYPE.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if usable(Path::new(target)) {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "mounted, but it has no events directory",
        ))
    }
}
