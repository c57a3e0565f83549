pub mod cuda;
pub mod floor;
pub mod sched;
