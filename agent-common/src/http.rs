//! Socket syscall records of the `http` family (`probes/http.rs` in agent-ebpf): accepted
//! connections of watched processes, the bytes read from and written to them, their close.

use crate::EventHeader;

/// Most payload bytes one record carries (the capture cap userspace sets is at most this).
pub const CAPTURE_MAX: usize = 4096;
/// Default capture cap: an HTTP header block and an SSE event fit.
pub const CAPTURE_DEFAULT: u32 = 4096;
/// Iovecs of one `readv`/`writev`/`recvmsg`/`sendmsg` whose bytes are captured, one after the
/// other, into the call's one record (HTTP/2 stacks write a frame in many small iovecs); the
/// bytes of further iovecs are part of the record's uncaptured rest.
pub const IOV_WALK: u32 = 64;

/// Bytes read by the watched process (the request side).
pub const DIR_IN: u32 = 0;
/// Bytes written by the watched process (the response side).
pub const DIR_OUT: u32 = 1;

/// The syscall moved more bytes than the record carries.
pub const FLAG_TRUNCATED: u32 = 1;
/// The bytes are the plaintext of an OpenSSL read or write of the connection (`probes/tls.rs`
/// in agent-ebpf), not what the socket carried.
pub const FLAG_TLS_PLAIN: u32 = 2;

/// Values of the watched-connection map: a connection whose bytes are copied as they are.
pub const CONN_PLAIN: u32 = 1;
/// A connection tied to an OpenSSL `SSL*`: its plaintext comes from the TLS probes, its
/// ciphertext is not copied.
pub const CONN_TLS: u32 = 2;

/// A followed connection: `HTTP_CONNS`' value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// [`CONN_PLAIN`] or [`CONN_TLS`].
    pub state: u32,
    pub _pad: u32,
    /// The socket's `struct file`, as the accept's exit read it from the process's fd table
    /// (0: seeded by userspace, or the kernel's layout unknown). The family sees `close` only
    /// when it returns, after the fd number was freed: another thread's `accept` may have
    /// taken the number meanwhile, and this tells that connection from the closed one.
    pub file: u64,
}
const _: () = assert!(core::mem::size_of::<ConnState>() == 16);

impl ConnState {
    pub const fn plain(file: u64) -> Self {
        Self {
            state: CONN_PLAIN,
            _pad: 0,
            file,
        }
    }
}

/// Offsets the exit program walks from the current task to a `struct file` (kernel BTF:
/// `task_struct.files`, `files_struct.fdt`, `fdtable.fd`, `fdtable.max_fds`), set by the
/// loader; `known` is 0 when the kernel's BTF did not give them all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdLayout {
    pub known: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
}

/// OpenSSL's calls in watched processes.
pub mod tls {
    /// Attach cookie bit: a write (`SSL_write`, `SSL_write_ex`).
    pub const CALL_WRITE: u64 = 1;
    /// Attach cookie bit: an `_ex` call (success is 1, the byte count is written through the
    /// fourth argument).
    pub const CALL_EX: u64 = 2;
    /// Attach cookie bit: the probe is on the internal function both of a direction's calls
    /// go through (`ssl_write_internal`, `ssl_read_internal`): success is a return above 0 and
    /// the byte count is written through the pointer in the fourth argument, or the fifth with
    /// [`CALL_OUT_ARG4`].
    pub const CALL_INNER: u64 = 4;
    /// Attach cookie bit, with [`CALL_INNER`]: the byte count's pointer is the fifth argument.
    pub const CALL_OUT_ARG4: u64 = 8;
    /// Attach cookie bits from this one on: how the probed first instruction is hit, one of
    /// the `TRAP_*` kinds, so that the entry program counts each call under its trap's kind
    /// (`super::cost::TLS_TRAPS`) for the family's budget to price.
    pub const TRAP_SHIFT: u64 = 8;
    /// A 5-byte nop, replaced by a call: the cheapest.
    pub const TRAP_NOP5: u64 = 0;
    /// An instruction the kernel emulates (`push`).
    pub const TRAP_EMULATED: u64 = 1;
    /// An instruction the kernel single-steps out of line: a second trap.
    pub const TRAP_SINGLE_STEP: u64 = 2;
    /// Kinds of trap.
    pub const TRAP_KINDS: u32 = 3;

    /// Key of the `SSL*` → socket map.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SslKey {
        pub tgid: u32,
        pub _pad: u32,
        /// The `SSL*`, an address in that process.
        pub ssl: u64,
    }
    const _: () = assert!(core::mem::size_of::<SslKey>() == 16);
}

/// Slots of the family's per-CPU cost counters (`HTTP_COST`): what userspace turns into the
/// family's CPU time where the kernel's run-time statistics cannot be turned on.
pub mod cost {
    /// Program runs: every return of one of the family's syscalls on the node, watched or
    /// not, and every OpenSSL call probed.
    pub const RUNS: u32 = 0;
    /// Bytes copied from a watched process's buffers into the ring.
    pub const BYTES: u32 = 1;
    /// OpenSSL calls that moved bytes of an `SSL*` never tied to a socket (a connection
    /// older than the agent, not read from since): their bytes are not captured.
    pub const TLS_UNTIED: u32 = 2;
    /// OpenSSL calls probed, one slot per kind of entry trap (`TLS_TRAPS + tls::TRAP_*`),
    /// paused or not: each paid that trap and its return probe's, which the kernel's run-time
    /// statistics leave out (a trap is over before a program runs).
    pub const TLS_TRAPS: u32 = 3;
    pub const COUNT: u32 = TLS_TRAPS + super::tls::TRAP_KINDS;
}

/// Indexes of the family's own config array (`HTTP_CONFIG`).
pub mod config {
    /// Payload bytes captured per record (at most [`super::CAPTURE_MAX`]).
    pub const CAPTURE_BYTES: u32 = 0;
    /// 1 while the family is shed: the TLS probes (which the budget does not detach) return
    /// at once.
    pub const PAUSED: u32 = 1;
    pub const COUNT: u32 = 4;
}

/// Key of the watched-connection map: an accepted socket of a watched process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 8);

/// Bytes moved on a watched connection. Only the first 48 + `captured` bytes of the record
/// travel through the ring buffer: `data` is a maximum, not a fixed size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpDataEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// [`DIR_IN`] or [`DIR_OUT`].
    pub direction: u32,
    /// Bytes the syscall moved (all its iovecs' for a vectored call).
    pub len: u64,
    /// Bytes of `data` that are valid.
    pub captured: u32,
    pub flags: u32,
    pub data: [u8; CAPTURE_MAX],
}
pub const HTTP_DATA_PREFIX: usize = 48;
const _: () = assert!(core::mem::size_of::<HttpDataEvent>() == HTTP_DATA_PREFIX + CAPTURE_MAX);
const _: () = assert!(core::mem::offset_of!(HttpDataEvent, data) == HTTP_DATA_PREFIX);

impl Default for HttpDataEvent {
    fn default() -> Self {
        Self {
            header: EventHeader::default(),
            fd: 0,
            direction: 0,
            len: 0,
            captured: 0,
            flags: 0,
            data: [0; CAPTURE_MAX],
        }
    }
}

/// A watched process accepted a connection (`accept`/`accept4` returned `fd`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpAcceptEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// The listening socket.
    pub listen_fd: u32,
    /// The peer's `sockaddr_in`/`sockaddr_in6` as the kernel wrote it (zeros when the caller
    /// passed no address buffer).
    pub peer: [u8; 28],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<HttpAcceptEvent>() == 64);

/// A watched connection was closed by the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpCloseEvent {
    pub header: EventHeader,
    pub fd: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<HttpCloseEvent>() == 32);
