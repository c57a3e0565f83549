//! The quick reading of a streamed event's JSON (`inferscope::http::event_skim::skim`)
//! against serde_json's (`payload::parsed_event_info`), which defines the answer: wherever the
//! quick one answers, the bytes are UTF-8 (it checks them itself) and the two agree.
//!
//! Input: one event's `data`. Seeds: `fuzz/seeds/event_skim` (TGI and OpenAI events).

#![no_main]

use inferscope::http::{event_skim::skim, payload::parsed_event_info};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(quick) = skim(data) {
        let text = std::str::from_utf8(data).expect("skim answered for bytes that are not UTF-8");
        assert_eq!(quick, parsed_event_info(text), "{text:?}");
    }
});
