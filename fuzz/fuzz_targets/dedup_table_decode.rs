//! Decoding any bytes as a dedup table returns a value or a typed error, never panics and never
//! allocates more entries than the bytes hold; every decoded entry has references, and the
//! table re-encodes (the encoder asserts the same) and decodes to itself.
#![no_main]

use chronicle::core::format::records::{DedupTable, DEDUP_ENTRY_BYTES, DEDUP_PREFIX_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = DedupTable::decode(data) else {
        return;
    };
    assert!(DEDUP_PREFIX_BYTES + decoded.entries.len() * DEDUP_ENTRY_BYTES <= data.len());
    assert!(decoded.entries.iter().all(|e| e.references > 0));
    let bytes = decoded.encode();
    assert_eq!(DedupTable::decode(&bytes).expect("an encoded dedup table decodes"), decoded);
});
