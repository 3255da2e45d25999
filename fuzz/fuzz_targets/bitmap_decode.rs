//! Decoding any bytes as a difference bitmap returns a value or a typed error, never panics;
//! what decodes is self-consistent and survives a re-encode.
#![no_main]

use chronicle::core::bitmap::DifferenceBitmap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(bitmap) = DifferenceBitmap::decode(data) else {
        return;
    };
    let ones = bitmap.count_ones();
    assert_eq!(bitmap.iter_ones().count() as u64, ones);
    let mut visited = 0u64;
    bitmap.for_each_one(|bit| {
        assert!(bit < bitmap.len());
        visited += 1;
    });
    assert_eq!(visited, ones);
    let again = DifferenceBitmap::decode(&bitmap.encode()).expect("an encoded bitmap decodes");
    assert_eq!(again, bitmap);
});
