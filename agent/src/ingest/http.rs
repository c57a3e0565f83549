//! The `http` family's records. A data record is variable-length (only the captured prefix of
//! the payload travels), so its fields are read where the record's layout puts them; the
//! layout is checked at compile time in `agent_common::http`.

use std::mem::offset_of;

use agent_common::{
    http::{
        HttpAcceptEvent, HttpCloseEvent, HttpDataEvent, DIR_IN, FLAG_TLS_PLAIN, HTTP_DATA_PREFIX,
    },
    EventHeader,
};

use super::decode::{read, truncated, DecodeError};

/// A decoded record of the family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpRecord {
    Data {
        header: EventHeader,
        fd: u32,
        inbound: bool,
        /// Bytes the syscall moved for this record.
        len: u64,
        /// The captured prefix of them: a slice of the batch's arena (see [`Arena`]).
        bytes: bytes::Bytes,
        /// The plaintext of an OpenSSL call in the process, not the socket's bytes.
        plain: bool,
    },
    Accept {
        header: EventHeader,
        fd: u32,
        peer: Option<std::net::SocketAddr>,
    },
    Close {
        header: EventHeader,
        fd: u32,
    },
}

impl HttpRecord {
    pub fn header(&self) -> &EventHeader {
        match self {
            HttpRecord::Data { header, .. }
            | HttpRecord::Accept { header, .. }
            | HttpRecord::Close { header, .. } => header,
        }
    }
}

/// Where the captured payloads of a reader's records are copied: one allocation per
/// [`ARENA_CHUNK`] bytes instead of one per record (at tens of thousands of records a second,
/// the allocator was a tenth of the agent's time). A chunk is freed when the last record
/// slicing it is.
#[derive(Default)]
pub struct Arena(bytes::BytesMut);

/// Bytes an [`Arena`] allocates at a time: a few hundred SSE events' records.
const ARENA_CHUNK: usize = 64 * 1024;

impl Arena {
    fn copy(&mut self, data: &[u8]) -> bytes::Bytes {
        if self.0.capacity() < data.len() {
            self.0.reserve(ARENA_CHUNK.max(data.len()));
        }
        self.0.extend_from_slice(data);
        self.0.split().freeze()
    }
}

/// A record of kind `HttpData`, its `header` already read.
pub(super) fn data(
    header: EventHeader,
    bytes: &[u8],
    arena: &mut Arena,
) -> Result<HttpRecord, DecodeError> {
    if bytes.len() < HTTP_DATA_PREFIX {
        return Err(truncated(&header, bytes, HTTP_DATA_PREFIX));
    }
    // Only the prefix travels: the fields are read where the record's layout puts them, not
    // through a whole `HttpDataEvent`.
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let fd = u32_at(offset_of!(HttpDataEvent, fd));
    let direction = u32_at(offset_of!(HttpDataEvent, direction));
    let len_at = offset_of!(HttpDataEvent, len);
    let len = u64::from_ne_bytes(bytes[len_at..len_at + 8].try_into().unwrap_or([0; 8]));
    let captured = u32_at(offset_of!(HttpDataEvent, captured)) as usize;
    let flags = u32_at(offset_of!(HttpDataEvent, flags));
    let data = &bytes[HTTP_DATA_PREFIX..];
    if data.len() < captured {
        return Err(truncated(&header, bytes, HTTP_DATA_PREFIX + captured));
    }
    Ok(HttpRecord::Data {
        header,
        fd,
        inbound: direction == DIR_IN,
        len: len.max(captured as u64),
        bytes: arena.copy(&data[..captured]),
        plain: flags & FLAG_TLS_PLAIN != 0,
    })
}

/// A record of kind `HttpAccept`, its `header` already read.
pub(super) fn accept(header: EventHeader, bytes: &[u8]) -> Result<HttpRecord, DecodeError> {
    read::<HttpAcceptEvent>(bytes)
        .map(|e| HttpRecord::Accept {
            header,
            fd: e.fd,
            peer: sockaddr(&e.peer),
        })
        .ok_or_else(|| truncated(&header, bytes, size_of::<HttpAcceptEvent>()))
}

/// A record of kind `HttpClose`, its `header` already read.
pub(super) fn close(header: EventHeader, bytes: &[u8]) -> Result<HttpRecord, DecodeError> {
    read::<HttpCloseEvent>(bytes)
        .map(|e| HttpRecord::Close { header, fd: e.fd })
        .ok_or_else(|| truncated(&header, bytes, size_of::<HttpCloseEvent>()))
}

/// `sockaddr_in` / `sockaddr_in6` bytes as the kernel wrote them.
fn sockaddr(b: &[u8; 28]) -> Option<std::net::SocketAddr> {
    let family = u16::from_ne_bytes([b[0], b[1]]);
    let port = u16::from_be_bytes([b[2], b[3]]);
    match family as i32 {
        libc::AF_INET => {
            let ip = std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some((ip, port).into())
        }
        libc::AF_INET6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            Some((std::net::Ipv6Addr::from(a), port).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{decode, Decoded, Event};
    use agent_common::{cuda::CudaMemEvent, EventKind};

    fn data_record(captured: &[u8], len: u64) -> Vec<u8> {
        data_record_flagged(captured, len, 0)
    }

    fn data_record_flagged(captured: &[u8], len: u64, flags: u32) -> Vec<u8> {
        let mut ev = HttpDataEvent {
            flags,
            ..Default::default()
        };
        ev.header.kind = EventKind::HttpData as u32;
        ev.fd = 9;
        ev.direction = agent_common::http::DIR_OUT;
        ev.len = len;
        ev.captured = captured.len() as u32;
        ev.data[..captured.len()].copy_from_slice(captured);
        let all = crate::ingest::decode::as_bytes(&ev);
        all[..HTTP_DATA_PREFIX + captured.len()].to_vec()
    }

    #[test]
    fn decodes_variable_length_data() {
        let r = decode(&data_record(b"HTTP/1.1 200 OK\r\n", 5000)).unwrap();
        let Decoded::Http(HttpRecord::Data {
            fd,
            inbound,
            len,
            bytes,
            plain,
            ..
        }) = r
        else {
            panic!("{r:?}")
        };
        assert_eq!((fd, inbound, len, plain), (9, false, 5000, false));
        assert_eq!(&bytes[..], b"HTTP/1.1 200 OK\r\n");
        let flags = agent_common::http::FLAG_TLS_PLAIN | agent_common::http::FLAG_TRUNCATED;
        let r = decode(&data_record_flagged(b"HTTP/1.1", 20, flags)).unwrap();
        assert!(
            matches!(
                r,
                Decoded::Http(HttpRecord::Data {
                    plain: true,
                    len: 20,
                    ..
                })
            ),
            "{r:?}"
        );
        let mut cut = data_record(b"abcdef", 6);
        cut.truncate(HTTP_DATA_PREFIX + 2);
        assert!(matches!(decode(&cut), Err(DecodeError::Truncated { .. })));
        // Other families go their own way.
        let mut ev = CudaMemEvent::default();
        ev.header.kind = EventKind::CudaMem as u32;
        let bytes = crate::ingest::decode::as_bytes(&ev);
        assert!(matches!(
            decode(&bytes),
            Ok(Decoded::Event(Event::CudaMem(_)))
        ));
    }

    #[test]
    fn reads_sockaddrs() {
        let mut b = [0u8; 28];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&8080u16.to_be_bytes());
        b[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(sockaddr(&b), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(sockaddr(&[0; 28]), None);
    }
}
