//! Ring-buffer records → typed records. Records come from the kernel, but a version skew or a
//! bug must not take the agent down: short or unknown records are errors the caller counts.
//! The header is read once and its kind picks the family's type: [`Event`] for the ledger's
//! records, [`HttpRecord`] for the `http` family's (decoded in `http.rs`).

use agent_common::{
    cuda::CudaMemEvent,
    discovery::{DriverLoadedEvent, ListenEvent, ProcessExecEvent},
    oom::OomKillEvent,
    sched::ProcessExitEvent,
    EventHeader, EventKind,
};

use super::http::HttpRecord;

/// A decoded record, by family: the reader sends each family to its own subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Event(Event),
    Http(HttpRecord),
    Discovery(Discovery),
}

/// What the kernel tells discovery (read from its own ring by the probe manager).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discovery {
    DriverLoaded(DriverLoadedEvent),
    Exec(ProcessExecEvent),
    Listen(ListenEvent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    CudaMem(CudaMemEvent),
    ProcessExit(ProcessExitEvent),
    OomKill(OomKillEvent),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its header")]
    Short { len: usize },
    #[error("record kind {kind} is unknown")]
    UnknownKind { kind: u32 },
    #[error("record of kind {kind} has {len} bytes, expected {expected}")]
    Truncated {
        kind: u32,
        len: usize,
        expected: usize,
    },
}

impl DecodeError {
    /// Label value for the dropped-records counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Short { .. } => "short",
            Self::UnknownKind { .. } => "unknown_kind",
            Self::Truncated { .. } => "truncated",
        }
    }
}

impl Event {
    pub fn source(&self) -> &'static str {
        match self {
            Event::CudaMem(_) => "cuda",
            Event::ProcessExit(_) => "sched",
            Event::OomKill(_) => "oom",
        }
    }
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    decode_in(bytes, &mut super::http::Arena::default())
}

/// [`decode()`], a data record's payload copied into `arena`.
pub fn decode_in(bytes: &[u8], arena: &mut super::http::Arena) -> Result<Decoded, DecodeError> {
    let header: EventHeader = read(bytes).ok_or(DecodeError::Short { len: bytes.len() })?;
    let kind =
        EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind { kind: header.kind })?;
    let truncated = |expected| truncated(&header, bytes, expected);
    Ok(Decoded::Event(match kind {
        EventKind::CudaMem => {
            Event::CudaMem(read(bytes).ok_or_else(|| truncated(size_of::<CudaMemEvent>()))?)
        }
        EventKind::ProcessExit => {
            Event::ProcessExit(read(bytes).ok_or_else(|| truncated(size_of::<ProcessExitEvent>()))?)
        }
        EventKind::OomKill => {
            Event::OomKill(read(bytes).ok_or_else(|| truncated(size_of::<OomKillEvent>()))?)
        }
        EventKind::HttpData => return super::http::data(header, bytes, arena).map(Decoded::Http),
        EventKind::HttpAccept => return super::http::accept(header, bytes).map(Decoded::Http),
        EventKind::HttpClose => return super::http::close(header, bytes).map(Decoded::Http),
        EventKind::DriverLoaded => {
            return Ok(Decoded::Discovery(Discovery::DriverLoaded(
                read(bytes).ok_or_else(|| truncated(size_of::<DriverLoadedEvent>()))?,
            )))
        }
        EventKind::ProcessExec => {
            return Ok(Decoded::Discovery(Discovery::Exec(
                read(bytes).ok_or_else(|| truncated(size_of::<ProcessExecEvent>()))?,
            )))
        }
        EventKind::Listen => {
            return Ok(Decoded::Discovery(Discovery::Listen(
                read(bytes).ok_or_else(|| truncated(size_of::<ListenEvent>()))?,
            )))
        }
    }))
}

pub(super) fn truncated(header: &EventHeader, bytes: &[u8], expected: usize) -> DecodeError {
    DecodeError::Truncated {
        kind: header.kind,
        len: bytes.len(),
        expected,
    }
}

/// Reads a plain-data record from the start of `bytes` (ring-buffer records are 8-byte aligned,
/// but a copy is cheap and spares the alignment argument).
pub(super) fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is one of the `#[repr(C)]` plain-data records of agent-common,
    // valid for every bit pattern.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
pub(super) fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: reading the bytes of a plain-data value.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_cuda_record() {
        let mut ev = CudaMemEvent::default();
        ev.header.kind = EventKind::CudaMem as u32;
        ev.header.tgid = 42;
        ev.size = 1 << 20;
        ev.result = 2;
        let bytes = as_bytes(&ev);
        assert_eq!(decode(&bytes), Ok(Decoded::Event(Event::CudaMem(ev))));
    }

    #[test]
    fn bad_records_are_errors() {
        assert_eq!(decode(&[1, 2, 3]), Err(DecodeError::Short { len: 3 }));
        let mut h = EventHeader {
            kind: 7777,
            ..Default::default()
        };
        assert_eq!(
            decode(&as_bytes(&h)),
            Err(DecodeError::UnknownKind { kind: 7777 })
        );
        h.kind = EventKind::CudaMem as u32;
        assert!(matches!(
            decode(&as_bytes(&h)),
            Err(DecodeError::Truncated { expected: 80, .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every length and a spread of kinds.
        let mut state = 0x9e3779b97f4a7c15u64;
        for len in 0..200 {
            for _ in 0..50 {
                let mut buf = vec![0u8; len];
                for b in buf.iter_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = state as u8;
                }
                if len >= 4 && state.is_multiple_of(3) {
                    buf[..4].copy_from_slice(&[100, 0, 0, 0]);
                }
                let _ = decode(&buf);
            }
        }
    }
}
