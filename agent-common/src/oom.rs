//! Host OOM kills (`oom/mark_victim`).

use crate::EventHeader;

/// The kernel's OOM killer chose a victim. Sizes in KiB, as the tracepoint gives them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomKillEvent {
    pub header: EventHeader,
    pub victim_pid: u32,
    pub uid: u32,
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub oom_score_adj: i32,
    pub _pad: u32,
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<OomKillEvent>() == 96);
