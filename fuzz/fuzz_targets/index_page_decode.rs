//! Decoding any bytes as an element index page returns a value or a typed error, never panics;
//! what decodes fits a page (252 / 126 entries), has zero entry flags by construction, and
//! re-encodes into one 4 KiB slot that decodes to itself.
#![no_main]

use chronicle::core::format::element_index::{self, entries_per_page, IndexPage, SLOT_BYTES};
use chronicle::core::format::superblock::JournalMode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = IndexPage::decode(data) else {
        return;
    };
    assert!(decoded.entries.len() <= entries_per_page(decoded.mode));
    if decoded.mode == JournalMode::Latest {
        assert!(decoded.entries.iter().all(|e| e.sequence == 0 && e.time_ns == 0));
    }
    let slot = decoded.encode();
    assert_eq!(slot.len(), SLOT_BYTES);
    assert_eq!(IndexPage::decode(&slot).expect("an encoded page decodes"), decoded);
    assert_eq!(element_index::choose(data, &[]).expect("one valid slot"), decoded);
});
