//! Process lifecycle records (`sched` tracepoints).

use crate::EventHeader;

/// A process that had CUDA activity exited (its whole thread group is gone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
    pub comm: [u8; 16],
    /// The `exit_group` status, when the process exited by itself (see `flags`).
    pub exit_code: i32,
    /// The fatal signal with its default action that ended it, 0 if none.
    pub signal: i32,
    /// `EXIT_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ProcessExitEvent>() == 56);

/// `exit_code` holds the status given to `exit_group`.
pub const EXIT_CODE_KNOWN: u32 = 1;

/// What the exit probes learnt about a process before its last thread went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub exit_code: i32,
    pub signal: i32,
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ExitInfo>() == 16);
