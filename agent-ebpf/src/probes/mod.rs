pub mod cuda;
pub mod discovery;
pub mod floor;
pub mod http;
pub mod oom;
pub mod sched;
pub mod tls;
