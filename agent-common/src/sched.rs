//! Process lifecycle records (`sched` tracepoints).

use crate::EventHeader;

/// A process that had CUDA activity exited (its whole thread group is gone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ProcessExitEvent>() == 40);
