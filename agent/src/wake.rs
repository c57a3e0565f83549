//! A descriptor another thread makes readable to end a thread's `poll` early: the probe
//! manager sleeps in `poll` until its next tick, a discovery record, a change of the watched
//! servers or its stop, instead of waking every 100 ms to look for the last two (each wakeup
//! costs tens of µs on a VM, and an idle agent had ten a second from this alone).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An `eventfd`: [`Wake::ring`] makes it readable until [`Wake::clear`].
#[derive(Debug)]
pub struct Wake(OwnedFd);

impl Wake {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: no pointer is passed; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our descriptor. A full counter (2^64 - 2
        // rings unread) fails with EAGAIN and leaves it readable, which is all a ring means.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Makes it unreadable again (after a `poll` that found it readable).
    pub fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; EAGAIN when not rung.
        unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

impl AsRawFd for Wake {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(w: &Wake) -> bool {
        let mut pfd = libc::pollfd {
            fd: w.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    #[test]
    fn rung_until_cleared() {
        let w = Wake::new().unwrap();
        assert!(!readable(&w));
        w.ring();
        w.ring();
        assert!(readable(&w));
        w.clear();
        assert!(!readable(&w));
        w.clear();
        assert!(!readable(&w));
    }
}
