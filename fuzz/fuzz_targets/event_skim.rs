//! The quick reading of a streamed event's JSON (`inferscope::http::event_skim::skim`)
//! against serde_json's (`payload::parsed_event_info`), which defines the answer: wherever the
//! quick one answers, on UTF-8 text (what `payload::event_info` gives it), the two agree.
//!
//! Input: one event's `data`. Seeds: `fuzz/seeds/event_skim` (TGI and OpenAI events).

#![no_main]

use inferscope::http::{event_skim::skim, payload::parsed_event_info};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(quick) = skim(data) {
        assert_eq!(quick, parsed_event_info(text), "{text:?}");
    }
});
