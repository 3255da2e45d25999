//! Decoding any bytes as a superblock returns a value or a typed error, never panics; what
//! decodes re-encodes to a page that decodes to the same value, and `choose` agrees.
#![no_main]

use chronicle::core::format::superblock::{self, Superblock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = Superblock::decode(data) else {
        return;
    };
    let page = decoded.encode();
    let again = Superblock::decode(&page).expect("an encoded superblock decodes");
    assert_eq!(again, decoded);
    // The other copy invalid: choose takes the valid one.
    assert_eq!(superblock::choose(data, &[]).expect("one valid copy"), decoded);
});
