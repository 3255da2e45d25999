//! Decoding any bytes as a sort cursor returns a value or a typed error, never panics; what
//! decodes never has a block applied before it is saved, and re-encodes to itself.
#![no_main]

use chronicle::core::format::records::SortCursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = SortCursor::decode(data) else {
        return;
    };
    assert!(decoded.applied_through <= decoded.saved_through);
    let page = decoded.encode();
    assert_eq!(SortCursor::decode(&page).expect("an encoded cursor decodes"), decoded);
});
