//! The HPACK decoder (`inferscope::http::h2::hpack::Table`) on arbitrary header blocks, with
//! an exact table and with a window (a connection picked up mid-way), block after block on
//! one table; and the gRPC message reader and protobuf field reader on the same bytes.
//!
//! Input: blocks separated by `#`; a block whose first byte is odd is also fed to the message
//! reader as a hole of that many bytes. Seeds: `fuzz/seeds/hpack`.

#![no_main]

use inferscope::http::h2::{grpc, hpack::Table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut exact = Table::new();
    let mut window = Table::joined();
    let mut messages = grpc::Messages::default();
    for block in data.split(|&b| b == b'#') {
        for table in [&mut exact, &mut window] {
            let mut fields = 0usize;
            let _ = table.decode(block, &mut |_| fields += 1);
            assert!(fields <= 128, "{fields} fields kept from one block");
            assert!(table.state_bytes() <= 1024 * 1024);
        }
        let (hole, bytes) = match block.split_first() {
            Some((&b, rest)) if b & 1 == 1 => (u64::from(b), None),
            _ => (0, Some(block)),
        };
        messages.feed(bytes, bytes.map_or(hole, |b| b.len() as u64));
        assert!(messages.first.len() <= grpc::PEEK);
        let _ = grpc::string_field(block, 1);
    }
});
