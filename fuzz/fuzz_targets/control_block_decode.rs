//! Decoding any bytes as a control block returns a value or a typed error, never panics; every
//! element address of what decodes is computable (contiguous ranges end at or below 2^56,
//! explicit addresses use no reserved bit), and it re-encodes and decodes to itself.
#![no_main]

use chronicle::core::element_map::{Addressing, ADDRESS_MASK, ADDRESS_SHARED};
use chronicle::core::format::control_block::ControlBlock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(decoded) = ControlBlock::decode(data) else {
        return;
    };
    let map = &decoded.map;
    assert!(decoded.through_generation >= decoded.generation);
    assert_eq!(map.bitmap().count_ones(), map.len());
    let mut count = 0u64;
    for (block, raw) in map.iter() {
        assert_eq!(raw & !(ADDRESS_MASK | ADDRESS_SHARED), 0, "reserved address bits");
        assert_eq!(map.address_of(block), Some(raw & ADDRESS_MASK));
        count += 1;
    }
    assert_eq!(count, map.len());
    if let Addressing::Contiguous { first } = map.addressing() {
        assert!(first.checked_add(count).is_some_and(|end| end <= ADDRESS_MASK + 1));
    }
    let bytes = decoded.encode();
    assert_eq!(ControlBlock::decode(&bytes).expect("an encoded control block decodes"), decoded);
});
