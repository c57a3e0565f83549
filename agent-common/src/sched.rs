//! Process lifecycle records (`sched` tracepoints).

use crate::EventHeader;

/// A process that had CUDA activity exited (its whole thread group is gone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
    pub comm: [u8; 16],
    /// The exit status, when the process exited by itself (see `flags`).
    pub exit_code: i32,
    /// The signal that ended it, 0 if none.
    pub signal: i32,
    /// `EXIT_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ProcessExitEvent>() == 56);

/// `exit_code` holds the status the process exited with.
pub const EXIT_CODE_KNOWN: u32 = 1;
