//! Decoding any bytes as a catalog returns a value or a typed error, never panics and never
//! allocates more entries than the bytes hold; what decodes is valid, re-encodes and decodes
//! to itself.
#![no_main]

use chronicle::core::format::catalog::{self, Catalog, CATALOG_PREFIX_BYTES, ENTRY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = Catalog::decode(data) else {
        return;
    };
    assert!(CATALOG_PREFIX_BYTES + decoded.entries.len() * ENTRY_BYTES <= data.len());
    decoded.validate().expect("a decoded catalog is valid");
    let bytes = decoded.encode();
    assert_eq!(Catalog::decode(&bytes).expect("an encoded catalog decodes"), decoded);
    assert_eq!(catalog::choose(&bytes, data).expect("both copies valid"), decoded);
});
