//! Discovery records: what the kernel tells the agent about driver loads, new processes and
//! new listening sockets, so that it never has to poll `/proc` for them. They travel in a
//! ring of their own (`DISCOVERY_EVENTS`), read by the probe manager.

use crate::EventHeader;

/// A process's dynamic loader has just loaded a `libcuda.so*` (the first time in this
/// program). With [`FLAG_HELD`] the process has been sent `SIGSTOP` and waits for the agent's
/// `SIGCONT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverLoadedEvent {
    pub header: EventHeader,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DriverLoadedEvent>() == 32);

/// The process was stopped (`SIGSTOP`) to be held until the agent has attached.
pub const FLAG_HELD: u32 = 1;
/// Not a driver: a process whose sockets are watched has loaded a `libssl.so*` (the first time
/// in this program). Never held.
pub const FLAG_TLS_LIBRARY: u32 = 2;

/// A process exec'd (`sched/sched_process_exec`): its command line and mappings are new.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExecEvent {
    pub header: EventHeader,
}
const _: () = assert!(core::mem::size_of::<ProcessExecEvent>() == 24);

/// A TCP socket entered `LISTEN` (`sock/inet_sock_set_state`), in the process that called
/// `listen()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenEvent {
    pub header: EventHeader,
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ListenEvent>() == 32);

/// The attach cookie of the loader probe: how far `_r_debug` lies from `_dl_debug_state` in
/// that `ld.so` (virtual addresses; the probe adds it to the address it fired at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderCookie(pub u64);

impl LoaderCookie {
    pub fn new(dl_debug_state: u64, r_debug: u64) -> Self {
        Self(r_debug.wrapping_sub(dl_debug_state))
    }

    pub fn r_debug_delta(self) -> i64 {
        self.0 as i64
    }
}

/// The basename the loader probe looks for: `libcuda.so` itself or `libcuda.so.<anything>`.
pub const DRIVER_NAME: &[u8; 10] = b"libcuda.so";

/// The basename of OpenSSL's TLS library, looked for in watched processes only.
pub const TLS_LIBRARY_NAME: &[u8; 9] = b"libssl.so";

/// How many of the newest loaded objects the probe looks at after each change: a `dlopen`
/// appends the library and its new dependencies at the tail.
pub const LOADER_TAIL: u32 = 8;

/// Bytes of an object's path the probe reads; a longer path is not recognised.
pub const NAME_MAX: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_points_back_or_forward() {
        let c = LoaderCookie::new(0x2060, 0x34118);
        assert_eq!(
            0x7f00_0000_2060u64.wrapping_add(c.r_debug_delta() as u64),
            0x7f00_0003_4118
        );
        let back = LoaderCookie::new(0x34118, 0x2060);
        assert_eq!(
            0x7f00_0003_4118u64.wrapping_add(back.r_debug_delta() as u64),
            0x7f00_0000_2060
        );
    }
}
