//! Decoding never panics, whatever the bytes (ARCHITECTURE §8).
//!
//! Every decoder of an on-disk structure is fed, per `cargo test` run, 32 768 inputs (262 144 in
//! all): random bytes; random bytes behind a valid header (magic, version, length, crc), which
//! reach field validation; and mutations of valid encodings — bit flips, byte and word
//! overwrites with boundary values, truncations, extensions, length-field changes — most of them
//! re-sealed with a correct crc32c so that decoding goes past the checksum into field
//! validation. Every result must be `Ok` or a typed `FormatError`; a panic fails the test and
//! prints the seed, the iteration and the input. Inputs that decode `Ok` must re-encode to bytes
//! that decode to the same value (round-trip stability); unmutated valid encodings must decode
//! to exactly what was encoded.
//!
//! Decoded control blocks must also have every element address computable within 56 bits.
//! Regression tests for decoder bugs found so far close the file.
//!
//! Seed: `CHRONICLE_DECODER_SEED` (decimal or 0x-hex) or a fixed default, so a run is
//! reproducible. The replication delta frame (`chronicle::core::delta`) is a wire format, not a
//! `CHRN` structure; its own property tests and the `delta_decode` fuzz target cover it. The
//! libFuzzer targets in `fuzz/` run the same decoders for longer (fuzz/README.md).

use std::panic::{catch_unwind, AssertUnwindSafe};

use chronicle::core::bitmap::DifferenceBitmap;
use chronicle::core::checksum::{crc32c, crc32c_append};
use chronicle::core::element_map::{Addressing, ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use chronicle::core::format::catalog::{self, Catalog, CatalogEntry, EntryKind, EntryState};
use chronicle::core::format::control_block::ControlBlock;
use chronicle::core::format::element_index::{entries_per_page, IndexEntry, IndexPage};
use chronicle::core::format::records::{
    DedupEntry, DedupTable, SiteMode, SiteRecord, SiteState, SiteTransfer, SortCursor, SortState,
};
use chronicle::core::format::superblock::{
    Area, AreaKind, DeviceRole, Durability, JournalFullPolicy, JournalMode, PeerDevice, Superblock,
};
use chronicle::core::format::version_table::{VersionEntry, VersionTable};
use chronicle::core::format::FormatError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inputs per decoder per run.
const INPUTS_PER_DECODER: usize = 32_768;
/// Valid encodings generated per decoder and then mutated.
const VALID_SAMPLES: usize = 48;
const DEFAULT_SEED: u64 = 0x00C4_0A1C_1E5E_ED01;

const CRC_OFFSET: usize = 24;
const LENGTH_OFFSET: usize = 12;
const HEADER_BYTES: usize = 32;

fn seed() -> u64 {
    match std::env::var("CHRONICLE_DECODER_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CHRONICLE_DECODER_SEED={text:?} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// Seals `bytes` as the header documents: crc32c over `[0, length)` with bytes 24..28 taken as
/// zero, stored little-endian at 24. `length` is read from the header; nothing is done when the
/// header is incomplete or the length does not fit the buffer.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_BYTES {
        return;
    }
    let length = u32::from_le_bytes(bytes[LENGTH_OFFSET..LENGTH_OFFSET + 4].try_into().unwrap()) as usize;
    if !(CRC_OFFSET + 4..=bytes.len()).contains(&length) {
        return;
    }
    let crc = crc32c(&bytes[..CRC_OFFSET]);
    let crc = crc32c_append(crc, &[0; 4]);
    let crc = crc32c_append(crc, &bytes[CRC_OFFSET + 4..length]);
    bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

fn set_length(bytes: &mut [u8], length: u32) {
    if bytes.len() >= LENGTH_OFFSET + 4 {
        bytes[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&length.to_le_bytes());
    }
}

fn header_length(bytes: &[u8]) -> Option<usize> {
    bytes.get(LENGTH_OFFSET..LENGTH_OFFSET + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
}

// ---------------------------------------------------------------------------------------------
// One decoder under test
// ---------------------------------------------------------------------------------------------

/// A structure's codec, seen uniformly.
trait Codec {
    type Value: PartialEq + std::fmt::Debug;
    const NAME: &'static str;
    const MAGIC: &'static [u8; 8];
    fn decode(bytes: &[u8]) -> Result<Self::Value, FormatError>;
    /// Encodes a value (every structure here has an encoder).
    fn encode(value: &Self::Value) -> Vec<u8>;
    /// A random valid value.
    fn sample(rng: &mut ChaCha8Rng) -> Self::Value;
    /// What must hold of any decoded value beyond the round trip (e.g. every address of a
    /// control block can be computed without overflow).
    fn check(_value: &Self::Value) {}
}

#[derive(Default, Debug)]
struct Tally {
    inputs: usize,
    ok: usize,
    errors: usize,
    round_trips: usize,
    past_checksum: usize,
}

fn hex_prefix(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(256).map(|b| format!("{b:02x}")).collect();
    format!("{} bytes: {}{}", bytes.len(), shown.join(""), if bytes.len() > 256 { "…" } else { "" })
}

/// Decodes `input`, checking that it neither panics nor, when Ok, fails to round-trip.
fn exercise<C: Codec>(input: &[u8], seed: u64, iteration: usize, how: &str, tally: &mut Tally) {
    let context = || {
        format!(
            "{}: seed {seed:#x} (CHRONICLE_DECODER_SEED), iteration {iteration}, input from {how}, {}",
            C::NAME,
            hex_prefix(input)
        )
    };
    tally.inputs += 1;
    let decoded = match catch_unwind(AssertUnwindSafe(|| C::decode(input))) {
        Ok(result) => result,
        Err(_) => panic!("decoder panicked — {}", context()),
    };
    match decoded {
        Err(error) => {
            tally.errors += 1;
            if !matches!(
                error,
                FormatError::Truncated { .. }
                    | FormatError::BadMagic { .. }
                    | FormatError::ChecksumMismatch { .. }
                    | FormatError::BadLength { .. }
                    | FormatError::UnsupportedVersion { .. }
            ) {
                tally.past_checksum += 1;
            }
            // The message must render (Display never panics either).
            let _ = error.to_string();
        }
        Ok(value) => {
            tally.ok += 1;
            tally.past_checksum += 1;
            if catch_unwind(AssertUnwindSafe(|| C::check(&value))).is_err() {
                panic!("a decoded value is inconsistent: {value:?} — {}", context());
            }
            let encoded = match catch_unwind(AssertUnwindSafe(|| C::encode(&value))) {
                Ok(bytes) => bytes,
                Err(_) => panic!("re-encoding a decoded value panicked: {value:?} — {}", context()),
            };
            match C::decode(&encoded) {
                Ok(again) => assert_eq!(again, value, "round trip changed the value — {}", context()),
                Err(error) => panic!("re-encoded value does not decode ({error}) — {}", context()),
            }
            tally.round_trips += 1;
        }
    }
}

/// Interesting values for overwritten words.
const BOUNDARY_U64: [u64; 14] =
    [0, 1, 2, 63, 64, 65, 127, 128, 4096, u32::MAX as u64, 1 << 32, (1 << 56) - 1, 1 << 63, u64::MAX];

fn mutate(rng: &mut ChaCha8Rng, valid: &[u8]) -> (Vec<u8>, &'static str) {
    let mut bytes = valid.to_vec();
    if bytes.is_empty() {
        bytes.push(rng.random());
        return (bytes, "one random byte");
    }
    // Work mostly inside the checksummed part, where the fields are.
    let length = header_length(&bytes).unwrap_or(bytes.len()).clamp(1, bytes.len().max(1));
    let how = match rng.random_range(0..9u32) {
        0 => {
            for _ in 0..rng.random_range(1..=4) {
                let bit = rng.random_range(0..length * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
            "bit flips"
        }
        1 => {
            for _ in 0..rng.random_range(1..=3) {
                let at = rng.random_range(0..length);
                bytes[at] = [0u8, 1, 2, 0x7F, 0x80, 0xFF, rng.random()][rng.random_range(0..7)];
            }
            "byte overwrite"
        }
        2 | 3 => {
            // Overwrite an aligned word of the body (fields are 8-aligned mostly) with a boundary
            // value, possibly only its low half.
            let words = length / 8;
            if words > 4 {
                let word = rng.random_range(4..words);
                let value = BOUNDARY_U64[rng.random_range(0..BOUNDARY_U64.len())]
                    .wrapping_add(rng.random_range(0..3u64))
                    .wrapping_sub(1);
                let size = if rng.random_bool(0.3) { 4 } else { 8 };
                bytes[word * 8..word * 8 + size].copy_from_slice(&value.to_le_bytes()[..size]);
            }
            "word overwrite"
        }
        4 => {
            let keep = rng.random_range(0..=bytes.len());
            bytes.truncate(keep);
            "truncation"
        }
        5 => {
            // Shrink the recorded length (the tail falls outside the structure).
            let new = rng.random_range(0..=length) as u32;
            set_length(&mut bytes, new);
            "shorter length field"
        }
        6 => {
            // Extend: more bytes, and a length field that covers some of them.
            let extra = rng.random_range(1..600);
            let fill: u8 = if rng.random_bool(0.5) { 0 } else { rng.random() };
            bytes.extend(std::iter::repeat_n(fill, extra));
            if rng.random_bool(0.5) {
                let at = bytes.len() - extra;
                rng.fill(&mut bytes[at..]);
            }
            let new = rng.random_range(length..=bytes.len()) as u32;
            set_length(&mut bytes, new);
            "extension"
        }
        7 => {
            // Swap two 8-byte words of the body (fields in the wrong place).
            let words = length / 8;
            if words > 5 {
                let a = rng.random_range(4..words);
                let b = rng.random_range(4..words);
                for i in 0..8 {
                    bytes.swap(a * 8 + i, b * 8 + i);
                }
            }
            "word swap"
        }
        _ => {
            // Random bytes over a random run of the body.
            if length > HEADER_BYTES {
                let start = rng.random_range(HEADER_BYTES..length);
                let end = rng.random_range(start..=length.min(start + 64));
                rng.fill(&mut bytes[start..end]);
            }
            "random run"
        }
    };
    (bytes, how)
}

fn run<C: Codec>() -> Tally {
    let seed = seed() ^ fnv(C::NAME);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tally = Tally::default();
    let samples: Vec<(C::Value, Vec<u8>)> = (0..VALID_SAMPLES)
        .map(|_| {
            let value = C::sample(&mut rng);
            let bytes = C::encode(&value);
            (value, bytes)
        })
        .collect();
    // Every valid encoding decodes to exactly its value.
    for (index, (value, bytes)) in samples.iter().enumerate() {
        let decoded = C::decode(bytes)
            .unwrap_or_else(|e| panic!("{}: valid sample {index} (seed {seed:#x}) fails: {e}", C::NAME));
        assert_eq!(&decoded, value, "{}: valid sample {index} (seed {seed:#x})", C::NAME);
        tally.inputs += 1;
        tally.ok += 1;
    }
    let mut iteration = samples.len();
    while tally.inputs < INPUTS_PER_DECODER {
        iteration += 1;
        let (input, how): (Vec<u8>, &str) = match rng.random_range(0..10u32) {
            0 => {
                let len = if rng.random_bool(0.5) { rng.random_range(0..64) } else { rng.random_range(0..5000) };
                let mut bytes = vec![0u8; len];
                rng.fill(&mut bytes[..]);
                (bytes, "random bytes")
            }
            1 => {
                // Random body behind a valid header: reaches field validation with random fields.
                let len = rng.random_range(HEADER_BYTES..4200);
                let mut bytes = vec![0u8; len];
                rng.fill(&mut bytes[..]);
                if rng.random_bool(0.5) {
                    // Mostly-zero bodies decode further (small counts).
                    for b in bytes[HEADER_BYTES..].iter_mut() {
                        if rng.random_bool(0.9) {
                            *b = 0;
                        }
                    }
                }
                bytes[..8].copy_from_slice(C::MAGIC);
                bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
                let length = rng.random_range(HEADER_BYTES..=len) as u32;
                set_length(&mut bytes, length);
                reseal(&mut bytes);
                (bytes, "random body, valid header")
            }
            _ => {
                let (_, valid) = &samples[rng.random_range(0..samples.len())];
                let (mut bytes, how) = mutate(&mut rng, valid);
                if rng.random_bool(0.1) {
                    // A second mutation on top.
                    let (again, _) = mutate(&mut rng, &bytes.clone());
                    bytes = again;
                }
                if rng.random_bool(0.8) {
                    reseal(&mut bytes);
                }
                (bytes, how)
            }
        };
        exercise::<C>(&input, seed, iteration, how, &mut tally);
    }
    eprintln!("{}: {tally:?} (seed {seed:#x})", C::NAME);
    assert!(tally.inputs >= INPUTS_PER_DECODER);
    // The generator must actually drive decoding past the checksum, and some mutated inputs must
    // still decode (otherwise the round-trip check is vacuous).
    assert!(
        tally.past_checksum > INPUTS_PER_DECODER / 4,
        "{}: too few inputs reach field validation: {tally:?}",
        C::NAME
    );
    assert!(tally.round_trips > INPUTS_PER_DECODER / 50, "{}: too few round trips: {tally:?}", C::NAME);
    tally
}

fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

// ---------------------------------------------------------------------------------------------
// Random valid values
// ---------------------------------------------------------------------------------------------

fn random_text(rng: &mut ChaCha8Rng, max: usize) -> String {
    const PIECES: [&str; 8] = ["a", "Z", "0", "-", " ", "é", "ü", "—"];
    let mut text = String::new();
    let target = rng.random_range(0..=max);
    while text.len() < target {
        let piece = PIECES[rng.random_range(0..PIECES.len())];
        if text.len() + piece.len() > max {
            break;
        }
        text.push_str(piece);
    }
    text
}

fn random_u64(rng: &mut ChaCha8Rng) -> u64 {
    match rng.random_range(0..4u32) {
        0 => rng.random_range(0..100),
        1 => BOUNDARY_U64[rng.random_range(0..BOUNDARY_U64.len())],
        _ => rng.random(),
    }
}

fn random_bitmap(rng: &mut ChaCha8Rng, max_blocks: u64) -> DifferenceBitmap {
    let blocks = rng.random_range(1..=max_blocks);
    let mut bitmap = DifferenceBitmap::new(blocks);
    let density: f64 = [0.0, 0.01, 0.2, 0.9][rng.random_range(0..4)];
    for block in 0..blocks {
        if rng.random_bool(density) {
            bitmap.set(block);
        }
    }
    bitmap
}

struct SuperblockCodec;
impl Codec for SuperblockCodec {
    type Value = Superblock;
    const NAME: &'static str = "Superblock::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNSUPR";
    fn decode(bytes: &[u8]) -> Result<Superblock, FormatError> {
        Superblock::decode(bytes)
    }
    fn encode(value: &Superblock) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> Superblock {
        let block = 512u32 << rng.random_range(0..4);
        let unit = block << rng.random_range(0..=(20 - block.trailing_zeros()));
        let kinds = [
            AreaKind::CatalogA,
            AreaKind::CatalogB,
            AreaKind::Sites,
            AreaKind::ElementIndex,
            AreaKind::Elements,
            AreaKind::SortCursors,
            AreaKind::Units,
        ];
        let mut start = 8192u64;
        let mut areas = Vec::new();
        for _ in 0..rng.random_range(0..=8) {
            start += 4096 * rng.random_range(0..4u64);
            let length = rng.random_range(0..1u64 << 30);
            areas.push(Area {
                kind: kinds[rng.random_range(0..kinds.len())],
                start_bytes: start,
                length_bytes: length,
            });
            start = (start + length).div_ceil(4096) * 4096;
        }
        let roles = [DeviceRole::Base, DeviceRole::Journal, DeviceRole::Backup, DeviceRole::History];
        let peers = (0..rng.random_range(0..=4))
            .map(|_| PeerDevice {
                role: roles[rng.random_range(0..4)],
                bytes: random_u64(rng),
                name: random_text(rng, 47),
            })
            .collect();
        Superblock {
            sequence: random_u64(rng),
            volume_uuid: rng.random(),
            device_uuid: rng.random(),
            role: if rng.random_bool(0.5) { DeviceRole::Journal } else { DeviceRole::History },
            journal_mode: if rng.random_bool(0.5) { JournalMode::Latest } else { JournalMode::All },
            journal_full_policy: [
                JournalFullPolicy::Block,
                JournalFullPolicy::Fail,
                JournalFullPolicy::MergeOldest,
                JournalFullPolicy::BitmapOnly,
            ][rng.random_range(0..4)],
            durability: if rng.random_bool(0.5) { Durability::Flush } else { Durability::WriteThrough },
            device_block_size: block,
            host_write_size: unit,
            volume_blocks: rng.random_range(1..u64::MAX),
            device_bytes: start + rng.random_range(0..1u64 << 40),
            features_compat: random_u64(rng),
            features_incompat: 0,
            features_ro_compat: random_u64(rng),
            created_ns: rng.random(),
            areas,
            peers,
            volume_name: random_text(rng, 63),
            strict: rng.random_bool(0.5),
        }
    }
}

fn random_entry(rng: &mut ChaCha8Rng, online: bool, generation: u64) -> CatalogEntry {
    use EntryKind::*;
    use EntryState::*;
    let (kind, state) = if online {
        (Online, [Open, Sealed, Sorting][rng.random_range(0..3)])
    } else {
        [
            (History, Live),
            (History, Merging),
            (History, Deleting),
            (Merged, Live),
            (Merged, Merging),
            (Merged, Deleting),
            (RestoreVolume, Active),
            (RestoreVolume, Deleting),
            (DedupIndex, Live),
            (Retained, Held),
            (Versions, Live),
        ][rng.random_range(0..11)]
    };
    let mut entry = CatalogEntry::new(generation, kind, state);
    entry.flags = rng.random_range(0..=catalog::flags::KNOWN);
    entry.time_ns = random_u64(rng);
    entry.first_sequence = random_u64(rng);
    entry.last_sequence = random_u64(rng);
    entry.through_generation = generation.saturating_add(rng.random_range(0..3));
    entry.element_start = random_u64(rng);
    entry.element_count = random_u64(rng);
    entry.control_start = random_u64(rng);
    entry.control_count = random_u64(rng);
    entry.stored_bytes = random_u64(rng);
    entry.dedup_saved = random_u64(rng);
    entry.last_time_ns = random_u64(rng);
    entry.blocks = random_u64(rng);
    entry.original_bytes = random_u64(rng);
    entry.comment = random_text(rng, 127);
    entry
}

struct CatalogCodec;
impl Codec for CatalogCodec {
    type Value = Catalog;
    const NAME: &'static str = "catalog::Catalog::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNCATL";
    fn decode(bytes: &[u8]) -> Result<Catalog, FormatError> {
        Catalog::decode(bytes)
    }
    fn encode(value: &Catalog) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> Catalog {
        let journal = rng.random_bool(0.5);
        let mut catalog = Catalog::new(if journal { DeviceRole::Journal } else { DeviceRole::History }, 0);
        let count = rng.random_range(0..12);
        let mut generation = rng.random_range(0..1000);
        for _ in 0..count {
            generation += rng.random_range(1..4);
            catalog.entries.push(random_entry(rng, journal, generation));
        }
        catalog.capacity_entries = count as u32 + rng.random_range(0..2000);
        catalog.sequence = random_u64(rng);
        catalog.next_generation = random_u64(rng);
        catalog.backup_generation = random_u64(rng);
        catalog.write_sequence = random_u64(rng);
        catalog.ring_tail = random_u64(rng);
        catalog.index_tail = random_u64(rng);
        catalog
    }
}

struct ControlBlockCodec;
impl Codec for ControlBlockCodec {
    type Value = ControlBlock;
    const NAME: &'static str = "ControlBlock::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNCTRL";
    fn decode(bytes: &[u8]) -> Result<ControlBlock, FormatError> {
        ControlBlock::decode(bytes)
    }
    fn encode(value: &ControlBlock) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> ControlBlock {
        let bitmap = random_bitmap(rng, 3000);
        let addressing = if rng.random_bool(0.5) {
            Addressing::Contiguous { first: rng.random_range(0..1u64 << 40) }
        } else {
            Addressing::Explicit(
                (0..bitmap.count_ones())
                    .map(|_| {
                        (rng.random::<u64>() & ADDRESS_MASK) | if rng.random_bool(0.2) { ADDRESS_SHARED } else { 0 }
                    })
                    .collect(),
            )
        };
        let generation = rng.random_range(0..1u64 << 40);
        ControlBlock {
            generation,
            through_generation: generation + rng.random_range(0..5),
            map: ElementMap::new(bitmap, addressing).unwrap(),
        }
    }
    fn check(value: &ControlBlock) {
        // Every element's address is computable and within 56 bits plus the shared flag.
        let mut count = 0u64;
        for (block, raw) in value.map.iter() {
            assert_eq!(raw & !(ADDRESS_MASK | ADDRESS_SHARED), 0, "reserved address bits of block {block}");
            assert_eq!(value.map.address_of(block), Some(raw & ADDRESS_MASK));
            count += 1;
        }
        assert_eq!(count, value.map.len());
        if let Addressing::Contiguous { first } = value.map.addressing() {
            assert!(first.checked_add(count).is_some_and(|end| end <= ADDRESS_MASK + 1));
        }
    }
}

struct IndexPageCodec;
impl Codec for IndexPageCodec {
    type Value = IndexPage;
    const NAME: &'static str = "IndexPage::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNIDXP";
    fn decode(bytes: &[u8]) -> Result<IndexPage, FormatError> {
        IndexPage::decode(bytes)
    }
    fn encode(value: &IndexPage) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> IndexPage {
        let mode = if rng.random_bool(0.5) { JournalMode::Latest } else { JournalMode::All };
        let per_page = entries_per_page(mode);
        let count = if rng.random_bool(0.2) { per_page } else { rng.random_range(0..=per_page) };
        let all = mode == JournalMode::All;
        IndexPage {
            sequence: random_u64(rng),
            generation: random_u64(rng),
            page: random_u64(rng),
            first_segment: random_u64(rng),
            mode,
            entries: (0..count)
                .map(|_| IndexEntry {
                    block: random_u64(rng),
                    crc: random_u64(rng) as u32,
                    sequence: if all { random_u64(rng) } else { 0 },
                    time_ns: if all { random_u64(rng) } else { 0 },
                    lost: all && rng.random_bool(0.3),
                })
                .collect(),
        }
    }
}

struct SortCursorCodec;
impl Codec for SortCursorCodec {
    type Value = SortCursor;
    const NAME: &'static str = "SortCursor::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNSORT";
    fn decode(bytes: &[u8]) -> Result<SortCursor, FormatError> {
        SortCursor::decode(bytes)
    }
    fn encode(value: &SortCursor) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> SortCursor {
        let saved = random_u64(rng);
        SortCursor {
            sequence: random_u64(rng),
            generation: random_u64(rng),
            record_generation: random_u64(rng),
            state: [SortState::Idle, SortState::Running, SortState::Finished][rng.random_range(0..3)],
            saved_through: saved,
            applied_through: rng.random_range(0..=saved),
            history_start: random_u64(rng),
            history_units: random_u64(rng),
            control_start: random_u64(rng),
            control_units: random_u64(rng),
            elements_saved: random_u64(rng),
        }
    }
}

struct VersionTableCodec;
impl Codec for VersionTableCodec {
    type Value = VersionTable;
    const NAME: &'static str = "VersionTable::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNVERS";
    fn decode(bytes: &[u8]) -> Result<VersionTable, FormatError> {
        VersionTable::decode(bytes)
    }
    fn encode(value: &VersionTable) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> VersionTable {
        let count = rng.random_range(0..200u64);
        let mut block = rng.random_range(0..1u64 << 40);
        let mut sequence = rng.random_range(0..1u64 << 40);
        let mut entries = Vec::new();
        for _ in 0..count {
            if rng.random_bool(0.5) {
                block += rng.random_range(1..10);
            }
            sequence += rng.random_range(1..10);
            entries.push(VersionEntry { block, sequence, time_ns: random_u64(rng), crc: random_u64(rng) as u32 });
        }
        VersionTable {
            generation: random_u64(rng),
            cut_sequence: sequence + rng.random_range(0..5),
            first_address: rng.random_range(0..1u64 << 50),
            entries,
        }
    }
}

struct SiteRecordCodec;
impl Codec for SiteRecordCodec {
    type Value = SiteRecord;
    const NAME: &'static str = "SiteRecord::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNSITE";
    fn decode(bytes: &[u8]) -> Result<SiteRecord, FormatError> {
        SiteRecord::decode(bytes)
    }
    fn encode(value: &SiteRecord) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> SiteRecord {
        SiteRecord {
            sequence: random_u64(rng),
            site_uuid: rng.random(),
            mode: if rng.random_bool(0.5) { SiteMode::Sync } else { SiteMode::Async },
            state: [
                SiteState::InSync,
                SiteState::Shipping,
                SiteState::OutOfSync,
                SiteState::Resyncing,
                SiteState::Failed,
                SiteState::Detached,
            ][rng.random_range(0..6)],
            transfer: if rng.random_bool(0.5) { SiteTransfer::PerWrite } else { SiteTransfer::PerMarker },
            delta: rng.random_bool(0.5),
            shipped_sequence: random_u64(rng),
            shipped_generation: random_u64(rng),
            acknowledged_generation: random_u64(rng),
            lag_limit_bytes: random_u64(rng),
            lag_limit_ms: random_u64(rng),
            out_of_sync_since_generation: random_u64(rng),
            name: random_text(rng, 63),
            out_of_sync: if rng.random_bool(0.6) { Some(random_bitmap(rng, 5000)) } else { None },
        }
    }
}

struct DedupTableCodec;
impl Codec for DedupTableCodec {
    type Value = DedupTable;
    const NAME: &'static str = "DedupTable::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNDDUP";
    fn decode(bytes: &[u8]) -> Result<DedupTable, FormatError> {
        DedupTable::decode(bytes)
    }
    fn encode(value: &DedupTable) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> DedupTable {
        DedupTable {
            sequence: random_u64(rng),
            entries: (0..rng.random_range(0..150))
                .map(|_| DedupEntry {
                    hash: rng.random(),
                    address: rng.random::<u64>() & ADDRESS_MASK,
                    references: rng.random_range(1..=u32::MAX),
                })
                .collect(),
        }
    }
}

struct BitmapCodec;
impl Codec for BitmapCodec {
    type Value = DifferenceBitmap;
    const NAME: &'static str = "DifferenceBitmap::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNBMAP";
    fn decode(bytes: &[u8]) -> Result<DifferenceBitmap, FormatError> {
        DifferenceBitmap::decode(bytes)
    }
    fn encode(value: &DifferenceBitmap) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> DifferenceBitmap {
        random_bitmap(rng, 4000)
    }
}

struct FrameTableCodec;
impl Codec for FrameTableCodec {
    type Value = chronicle::core::format::frame_table::FrameTable;
    const NAME: &'static str = "FrameTable::decode";
    const MAGIC: &'static [u8; 8] = b"CHRNFRMT";
    fn decode(bytes: &[u8]) -> Result<Self::Value, FormatError> {
        chronicle::core::format::frame_table::FrameTable::decode(bytes)
    }
    fn encode(value: &Self::Value) -> Vec<u8> {
        value.encode()
    }
    fn sample(rng: &mut ChaCha8Rng) -> Self::Value {
        use chronicle::core::format::frame_table::{FrameEntry, FrameTable, CODEC_LZ4};
        let frame_units = rng.random_range(1..100u32);
        let unit_bytes = [512u32, 4096][rng.random_range(0..2)];
        let logical_units = rng.random_range(1..2000u64);
        let count = FrameTable::frame_count(logical_units, frame_units) as usize;
        let data_offset = FrameTable::encoded_len(count) as u64 + rng.random_range(0..5000);
        let mut table = FrameTable {
            generation: rng.random_range(0..1000),
            through_generation: 0,
            logical_units,
            unit_bytes,
            frame_units,
            codec: CODEC_LZ4,
            data_offset,
            frames: Vec::new(),
        };
        table.through_generation = table.generation + rng.random_range(0..3);
        let mut next = data_offset;
        for index in 0..count {
            let full = table.frame_raw_bytes(index) as u32;
            let raw = full == 1 || rng.random_bool(0.3);
            let stored_bytes = if raw { full } else { rng.random_range(1..full) };
            let offset_bytes = next + rng.random_range(0..3);
            next = offset_bytes + u64::from(stored_bytes);
            table.frames.push(FrameEntry { offset_bytes, stored_bytes, crc: rng.random(), raw });
        }
        table
    }
}

#[test]
fn frame_table_decoding_never_panics() {
    run::<FrameTableCodec>();
}

#[test]
fn superblock_decoding_never_panics() {
    run::<SuperblockCodec>();
}

#[test]
fn catalog_decoding_never_panics() {
    run::<CatalogCodec>();
}

#[test]
fn control_block_decoding_never_panics() {
    run::<ControlBlockCodec>();
}

#[test]
fn index_page_decoding_never_panics() {
    run::<IndexPageCodec>();
}

#[test]
fn version_table_decoding_never_panics() {
    run::<VersionTableCodec>();
}

#[test]
fn sort_cursor_decoding_never_panics() {
    run::<SortCursorCodec>();
}

#[test]
fn site_record_decoding_never_panics() {
    run::<SiteRecordCodec>();
}

#[test]
fn dedup_table_decoding_never_panics() {
    run::<DedupTableCodec>();
}

#[test]
fn difference_bitmap_decoding_never_panics() {
    run::<BitmapCodec>();
}

/// Regression: a site name filling all 64 bytes of its field (no terminating zero) must be
/// refused by the decoder, since the encoder cannot write it back.
#[test]
fn site_name_without_terminating_zero_is_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut site = SiteRecordCodec::sample(&mut rng);
    site.name = "n".repeat(10);
    let mut bytes = site.encode();
    bytes[112..176].fill(b'n');
    reseal(&mut bytes);
    assert!(matches!(SiteRecord::decode(&bytes), Err(FormatError::Invalid { .. })));
}

/// A valid control block with three elements (blocks 1, 64, 199 of 200).
fn three_element_control_block(addressing: Addressing) -> ControlBlock {
    let mut bitmap = DifferenceBitmap::new(200);
    for block in [1u64, 64, 199] {
        bitmap.set(block);
    }
    ControlBlock { generation: 3, through_generation: 3, map: ElementMap::new(bitmap, addressing).unwrap() }
}

/// Overwrites the u64 at `at` and reseals.
fn patched(bytes: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    reseal(&mut bytes);
    bytes
}

fn invalid_field(result: Result<ControlBlock, FormatError>) -> &'static str {
    match result {
        Err(FormatError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

/// Regression: a contiguous control block whose `first_address + elements` passes 2^56 (or
/// overflows u64) decoded, and computing its last element's address then overflowed.
#[test]
fn contiguous_control_block_past_2_pow_56_is_refused() {
    const FIRST_ADDRESS_AT: usize = 72;
    let limit = ADDRESS_MASK + 1 - 3; // three elements end exactly at 2^56
    let valid = three_element_control_block(Addressing::Contiguous { first: limit });
    let bytes = valid.encode();
    assert_eq!(ControlBlock::decode(&bytes).unwrap(), valid);
    for first in [limit + 1, ADDRESS_MASK, 1 << 56, 1 << 63, u64::MAX - 1, u64::MAX] {
        let bytes = patched(&bytes, FIRST_ADDRESS_AT, first);
        assert_eq!(invalid_field(ControlBlock::decode(&bytes)), "first address", "first address {first:#x}");
    }
    // The encoder refuses to write one (it asserts what the decoder checks); such a map
    // cannot even be built.
    assert!(ElementMap::new(valid.map.bitmap().clone(), Addressing::Contiguous { first: limit + 1 }).is_err());
}

/// Regression: explicit addresses with reserved bits 56..62 set decoded; bit 63 (shared) is
/// the only flag.
#[test]
fn explicit_address_with_reserved_bits_is_refused() {
    let valid = three_element_control_block(Addressing::Explicit(vec![9, 4, ADDRESS_SHARED | 2]));
    let bytes = valid.encode();
    let table_at = 128 + 4 * 8;
    for bit in 56..63 {
        let bytes = patched(&bytes, table_at + 8, 4 | 1 << bit);
        assert_eq!(invalid_field(ControlBlock::decode(&bytes)), "address table", "bit {bit}");
    }
    let shared = patched(&bytes, table_at + 8, 4 | ADDRESS_SHARED);
    assert!(ControlBlock::decode(&shared).is_ok(), "the shared flag is allowed");
    assert!(ElementMap::new(valid.map.bitmap().clone(), Addressing::Explicit(vec![9, 4 | 1 << 60, 2])).is_err());
}

/// Regression: `DedupTable::encode` wrote entries with zero references, which `decode` refuses.
#[test]
fn dedup_table_encoder_refuses_zero_references() {
    let table = DedupTable { sequence: 1, entries: vec![DedupEntry { hash: 5, address: 77, references: 0 }] };
    let result = catch_unwind(AssertUnwindSafe(|| table.encode()));
    assert!(result.is_err(), "encoding a zero reference count must panic");
    let mut valid = table.clone();
    valid.entries[0].references = 1;
    let mut bytes = valid.encode();
    bytes[64 + 24..64 + 28].fill(0);
    reseal(&mut bytes);
    assert!(matches!(DedupTable::decode(&bytes), Err(FormatError::Invalid { field: "references", .. })));
}
