//! Decoding any bytes as a site record returns a value or a typed error, never panics and never
//! allocates a bitmap larger than the bytes hold; what decodes re-encodes to itself.
#![no_main]

use chronicle::core::format::records::{SiteRecord, SITE_NAME_BYTES, SITE_PREFIX_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = SiteRecord::decode(data) else {
        return;
    };
    assert!(decoded.name.len() < SITE_NAME_BYTES);
    if let Some(bitmap) = &decoded.out_of_sync {
        assert!(SITE_PREFIX_BYTES + 8 * bitmap.words().len() <= data.len());
        assert_eq!(bitmap.iter_ones().count() as u64, bitmap.count_ones());
    }
    let bytes = decoded.encode();
    assert_eq!(SiteRecord::decode(&bytes).expect("an encoded site record decodes"), decoded);
});
