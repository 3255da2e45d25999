//! Decoding any frame against any base returns an element or a typed error, never panics and
//! never allocates more than the element length a frame may declare.
//!
//! Input: one control byte, then the frame, then the base. The frame starts at a fixed offset
//! (so the fuzzer finds the magic and header fields quickly) and ends where its own header
//! says; when the control byte's high bit is set, its low four bits move that end by -8..=+7
//! bytes, to exercise truncated frames and trailing bytes.
#![no_main]

use chronicle::core::delta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let declared = delta::header(rest).map_or(rest.len(), |header| header.frame_bytes());
    let shift = if control & 0x80 != 0 { isize::from(control & 0x0f) - 8 } else { 0 };
    let end = declared.saturating_add_signed(shift).min(rest.len());
    let (frame, base) = rest.split_at(end);
    let Ok(element) = delta::decode(base, frame) else {
        return;
    };
    assert!(element.len() <= delta::MAX_ELEMENT_BYTES);
    let mut out = vec![0u8; element.len()];
    delta::decode_into(base, frame, &mut out).expect("decode_into agrees with decode");
    assert_eq!(out, element);
    // A raw frame needs no base; any other kind decodes only against a base of its size.
    if base.len() == element.len() {
        let frame_again = delta::encode(base, &element);
        assert_eq!(delta::decode(base, &frame_again).expect("round trip"), element);
    }
});
