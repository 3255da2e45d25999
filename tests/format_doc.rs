//! `docs/FORMAT.md` matches the code, byte for byte.
//!
//! Every ``Layout: `name` — N bytes`` table of the document is parsed. For each structure an
//! instance with distinctive field values is encoded through the public API, and every documented
//! field is checked at its documented offset and size: fields the test sets must hold their value
//! (little-endian), `reserved` fields must be zero, nested tables (header, area entries, catalog
//! entries, …) are checked recursively at their documented positions. The fixed rows of every
//! table must tile `[0, N)` exactly, and N must equal the code's constant. So an offset edited in
//! the document alone, or in the code alone, fails this test.

use std::collections::HashMap;

use chronicle::core::bitmap::{DifferenceBitmap, BITMAP_PREFIX_BYTES};
use chronicle::core::element_map::{Addressing, ElementMap, ADDRESS_MASK, ADDRESS_SHARED};
use chronicle::core::format::catalog::{
    self, Catalog, CatalogEntry, EntryKind, EntryState, CATALOG_PREFIX_BYTES, COMMENT_BYTES, ENTRY_BYTES,
};
use chronicle::core::format::control_block::{ControlBlock, CONTROL_PREFIX_BYTES};
use chronicle::core::format::element_index::{
    IndexEntry, IndexPage, ALL_ENTRIES_PER_PAGE, ALL_ENTRY_BYTES, LATEST_ENTRIES_PER_PAGE, LATEST_ENTRY_BYTES,
    PAGE_PREFIX_BYTES, SLOT_BYTES,
};
use chronicle::core::format::frame_table::{
    FrameEntry, FrameTable, CODEC_LZ4, FRAME_ENTRY_BYTES, FRAME_RAW, FRAME_TABLE_PREFIX_BYTES,
};
use chronicle::core::format::layout::{
    plan_history, plan_journal, recommended_history_bytes, recommended_journal_bytes, LayoutOptions, VolumeShape,
};
use chronicle::core::format::open_bitmap::{OpenBitmapPage, BLOCKS_PER_PAGE, OPEN_BITMAP_PREFIX_BYTES, WORDS_PER_PAGE};
use chronicle::core::format::records::{
    DedupEntry, DedupTable, SiteMode, SiteRecord, SiteState, SiteTransfer, SortCursor, SortState, DEDUP_ENTRY_BYTES,
    DEDUP_PREFIX_BYTES, SITE_NAME_BYTES, SITE_PREFIX_BYTES, SORT_CURSOR_BYTES,
};
use chronicle::core::format::superblock::{
    Area, AreaKind, DeviceRole, Durability, JournalFullPolicy, JournalMode, PeerDevice, Superblock, AREA_ENTRY_BYTES,
    AREA_TABLE_OFFSET, MAX_AREAS, MAX_PEERS, PEER_ENTRY_BYTES, PEER_NAME_BYTES, PEER_TABLE_OFFSET, SUPERBLOCK_BYTES,
    VOLUME_NAME_BYTES, VOLUME_NAME_OFFSET,
};
use chronicle::core::format::version_table::{VersionEntry, VersionTable, VERSION_ENTRY_BYTES, VERSION_PREFIX_BYTES};
use chronicle::core::format::{HEADER_BYTES, METADATA_PAGE_BYTES};

const FORMAT_MD: &str = include_str!("../docs/FORMAT.md");

// ---------------------------------------------------------------------------------------------
// Parsing the document
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    /// Numeric offset, or `None` for a variable-length row whose offset is a formula or a field.
    offset: Option<usize>,
    offset_text: String,
    /// Numeric size, or `None` for a variable-length row (`8 × words`).
    size: Option<usize>,
    field: String,
    meaning: String,
}

#[derive(Debug, Clone)]
struct Layout {
    name: String,
    bytes: usize,
    rows: Vec<Row>,
}

impl Layout {
    fn row(&self, field: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.field == field)
            .unwrap_or_else(|| panic!("FORMAT.md layout `{}` documents no field `{field}`", self.name))
    }

    /// Documented offset of a fixed field, or of a variable row with a numeric offset.
    fn offset(&self, field: &str) -> usize {
        let row = self.row(field);
        row.offset.unwrap_or_else(|| panic!("layout `{}`: `{field}` has no numeric offset", self.name))
    }

    fn size(&self, field: &str) -> usize {
        let row = self.row(field);
        row.size.unwrap_or_else(|| panic!("layout `{}`: `{field}` has no numeric size", self.name))
    }

    fn fixed_rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.offset.is_some() && r.size.is_some())
    }
}

fn cells(line: &str) -> Vec<String> {
    let trimmed = line.trim().trim_start_matches('|').trim_end_matches('|');
    trimmed.split('|').map(|c| c.trim().to_string()).collect()
}

fn strip_ticks(text: &str) -> String {
    text.trim().trim_matches('`').to_string()
}

/// Parses the number after "—" in a heading line like "Layout: `name` — 32 bytes".
fn heading(line: &str, prefix: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix(prefix)?;
    let rest = rest.strip_prefix('`')?;
    let end = rest.find('`')?;
    let name = rest[..end].to_string();
    let tail = rest[end + 1..].trim().trim_start_matches('—').trim().to_string();
    Some((name, tail))
}

fn leading_number(text: &str) -> usize {
    let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap_or_else(|_| panic!("expected a number at the start of {text:?}"))
}

/// The table that follows line `start` (header, separator, rows).
fn table_after(lines: &[&str], start: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let mut i = start + 1;
    while i < lines.len() && !lines[i].trim_start().starts_with('|') {
        assert!(
            lines[i].trim().is_empty(),
            "FORMAT.md line {}: expected a table after line {}, found {:?}",
            i + 1,
            start + 1,
            lines[i]
        );
        i += 1;
    }
    let header = cells(lines[i]);
    let separator = cells(lines[i + 1]);
    assert!(separator.iter().all(|c| c.chars().all(|ch| matches!(ch, '-' | ':'))), "line {}", i + 2);
    let mut rows = Vec::new();
    let mut j = i + 2;
    while j < lines.len() && lines[j].trim_start().starts_with('|') {
        rows.push(cells(lines[j]));
        j += 1;
    }
    (header, rows)
}

fn parse_layouts() -> HashMap<String, Layout> {
    let lines: Vec<&str> = FORMAT_MD.lines().collect();
    let mut layouts = HashMap::new();
    for (index, line) in lines.iter().enumerate() {
        let Some((name, tail)) = heading(line, "Layout: ") else { continue };
        assert!(tail.ends_with("bytes"), "FORMAT.md line {}: layout heading must end in `N bytes`", index + 1);
        let bytes = leading_number(&tail);
        let (header, table) = table_after(&lines, index);
        assert_eq!(
            &header[..4],
            &["offset", "size", "field", "meaning"],
            "FORMAT.md line {}: layout tables have columns offset | size | field | meaning",
            index + 1
        );
        let rows = table
            .iter()
            .map(|cells| {
                assert_eq!(cells.len(), 4, "layout `{name}`: row {cells:?} must have 4 cells");
                Row {
                    offset: cells[0].parse().ok(),
                    offset_text: strip_ticks(&cells[0]),
                    size: cells[1].parse().ok(),
                    field: strip_ticks(&cells[2]),
                    meaning: cells[3].clone(),
                }
            })
            .collect();
        let layout = Layout { name: name.clone(), bytes, rows };
        assert!(layouts.insert(name.clone(), layout).is_none(), "layout `{name}` documented twice");
    }
    layouts
}

fn layouts() -> &'static HashMap<String, Layout> {
    use std::sync::OnceLock;
    static LAYOUTS: OnceLock<HashMap<String, Layout>> = OnceLock::new();
    LAYOUTS.get_or_init(parse_layouts)
}

fn layout(name: &str) -> &'static Layout {
    layouts().get(name).unwrap_or_else(|| panic!("FORMAT.md has no ``Layout: `{name}` `` table"))
}

// ---------------------------------------------------------------------------------------------
// Checking bytes against a layout
// ---------------------------------------------------------------------------------------------

/// `value` little-endian in exactly `size` bytes; the value must fit.
fn le(value: u64, size: usize) -> Vec<u8> {
    assert!(size <= 8);
    if size < 8 {
        assert!(value < 1u64 << (8 * size), "value {value:#x} does not fit {size} bytes");
    }
    value.to_le_bytes()[..size].to_vec()
}

enum Expect {
    /// An integer, little-endian in the documented size.
    Int(u64),
    /// Exact bytes (uuids, magic, strings padded to the field size).
    Bytes(Vec<u8>),
}

fn int(field: &'static str, value: u64) -> (&'static str, Expect) {
    (field, Expect::Int(value))
}

fn raw(field: &'static str, value: &[u8]) -> (&'static str, Expect) {
    (field, Expect::Bytes(value.to_vec()))
}

/// A string in a zero-padded field of `size` bytes.
fn padded(value: &str, size: usize) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    assert!(bytes.len() <= size);
    bytes.resize(size, 0);
    bytes
}

/// Checks every fixed field of `layout` in `bytes[base..]`: expected fields hold their value,
/// `reserved` fields are zero, `nested` fields are the caller's to check. A documented field the
/// test does not know, or an expected field the document does not list, fails.
fn check(layout: &Layout, bytes: &[u8], base: usize, expected: &[(&str, Expect)], nested: &[&str]) {
    for (field, _) in expected {
        let row = layout.row(field);
        assert!(row.offset.is_some() && row.size.is_some(), "layout `{}`: `{field}` must be fixed", layout.name);
    }
    for row in layout.fixed_rows() {
        let (offset, size) = (row.offset.unwrap(), row.size.unwrap());
        let at = &bytes[base + offset..base + offset + size];
        let here = format!("layout `{}` field `{}` at offset {offset}, size {size}", layout.name, row.field);
        if row.field == "reserved" {
            assert!(at.iter().all(|b| *b == 0), "{here}: reserved bytes are not zero: {at:02x?}");
        } else if nested.contains(&row.field.as_str()) {
            continue;
        } else {
            let value = expected
                .iter()
                .find(|(field, _)| *field == row.field)
                .unwrap_or_else(|| panic!("{here}: documented but not checked by tests/format_doc.rs"))
                .1
                .as_bytes(size);
            assert_eq!(at, &value[..], "{here}: bytes differ from the encoded value");
        }
    }
}

impl Expect {
    fn as_bytes(&self, size: usize) -> Vec<u8> {
        match self {
            Expect::Int(value) => le(*value, size),
            Expect::Bytes(bytes) => {
                assert_eq!(bytes.len(), size, "expected bytes have the wrong size for the field");
                bytes.clone()
            }
        }
    }
}

/// The fixed rows of every layout tile `[0, bytes)` in order; variable rows come after them.
#[test]
fn every_layout_tiles_its_documented_size() {
    assert!(layouts().len() >= 15, "FORMAT.md documents only {} layouts", layouts().len());
    for layout in layouts().values() {
        let mut end = 0;
        let mut variable_seen = false;
        for row in &layout.rows {
            match (row.offset, row.size) {
                (Some(offset), Some(size)) => {
                    assert!(!variable_seen, "layout `{}`: fixed row `{}` after a variable one", layout.name, row.field);
                    assert_eq!(
                        offset, end,
                        "layout `{}`: `{}` does not start where the previous field ends",
                        layout.name, row.field
                    );
                    assert!(size > 0, "layout `{}`: `{}` is empty", layout.name, row.field);
                    end = offset + size;
                }
                _ => {
                    variable_seen = true;
                    if let Some(offset) = row.offset {
                        assert_eq!(
                            offset, layout.bytes,
                            "layout `{}`: variable `{}` must follow the prefix",
                            layout.name, row.field
                        );
                    }
                }
            }
        }
        assert_eq!(
            end, layout.bytes,
            "layout `{}`: fields cover {end} bytes, heading says {}",
            layout.name, layout.bytes
        );
        let mut names: Vec<&str> = layout.rows.iter().map(|r| r.field.as_str()).filter(|f| *f != "reserved").collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "layout `{}` names a field twice", layout.name);
    }
}

/// The documented sizes are the code's constants and the numbers the format promises.
#[test]
fn documented_sizes_match_the_code() {
    let sizes: [(&str, usize, usize); 20] = [
        ("header", HEADER_BYTES, 32),
        ("superblock", SUPERBLOCK_BYTES, 1024),
        ("superblock.area", AREA_ENTRY_BYTES, 24),
        ("superblock.peer", PEER_ENTRY_BYTES, 64),
        ("catalog", CATALOG_PREFIX_BYTES, 128),
        ("catalog.entry", ENTRY_BYTES, 256),
        ("control_block", CONTROL_PREFIX_BYTES, 128),
        ("index_page", PAGE_PREFIX_BYTES, 64),
        ("index_entry.latest", LATEST_ENTRY_BYTES, 16),
        ("index_entry.all", ALL_ENTRY_BYTES, 32),
        ("sort_cursor", SORT_CURSOR_BYTES, 128),
        ("site_record", SITE_PREFIX_BYTES, 192),
        ("dedup_table", DEDUP_PREFIX_BYTES, 64),
        ("dedup_entry", DEDUP_ENTRY_BYTES, 32),
        ("bitmap", BITMAP_PREFIX_BYTES, 48),
        ("version_table", VERSION_PREFIX_BYTES, 128),
        ("version_entry", VERSION_ENTRY_BYTES, 32),
        ("open_bitmap_page", OPEN_BITMAP_PREFIX_BYTES, 64),
        ("frame_table", FRAME_TABLE_PREFIX_BYTES, 96),
        ("frame_table.frame", FRAME_ENTRY_BYTES, 24),
    ];
    for (name, code, promised) in sizes {
        assert_eq!(layout(name).bytes, code, "FORMAT.md `{name}` size differs from the code");
        assert_eq!(code, promised, "`{name}` is no longer {promised} bytes");
    }
    // Entries per page follow from the documented prefix and entry sizes, fill a page exactly,
    // and are the numbers the text states.
    let room = METADATA_PAGE_BYTES - layout("index_page").bytes;
    assert_eq!(room / layout("index_entry.latest").bytes, LATEST_ENTRIES_PER_PAGE);
    assert_eq!(room / layout("index_entry.all").bytes, ALL_ENTRIES_PER_PAGE);
    assert_eq!(room % layout("index_entry.latest").bytes, 0);
    assert_eq!(room % layout("index_entry.all").bytes, 0);
    assert_eq!((LATEST_ENTRIES_PER_PAGE, ALL_ENTRIES_PER_PAGE), (252, 126));
    let entry_count = layout("index_page").row("entry_count");
    assert_eq!(entry_count.offset, Some(56));
    for stated in [
        format!("(4096 − 64) / 16 = {LATEST_ENTRIES_PER_PAGE}"),
        format!("(4096 − 64) / 32 = {ALL_ENTRIES_PER_PAGE}"),
        format!("at most {LATEST_ENTRIES_PER_PAGE} (latest) or {ALL_ENTRIES_PER_PAGE} (all)"),
        format!("{LATEST_ENTRIES_PER_PAGE} / {ALL_ENTRIES_PER_PAGE} per page"),
        format!("`entries_per_page` is {LATEST_ENTRIES_PER_PAGE} in \"latest\" mode and {ALL_ENTRIES_PER_PAGE} in \"all\" mode"),
    ] {
        assert!(FORMAT_MD.contains(&stated), "FORMAT.md must state {stated:?}");
    }
    assert_eq!(SLOT_BYTES, METADATA_PAGE_BYTES);
    // Tables inside the superblock.
    let superblock = layout("superblock");
    assert_eq!(superblock.offset("area_table"), AREA_TABLE_OFFSET);
    assert_eq!(superblock.size("area_table"), MAX_AREAS * layout("superblock.area").bytes);
    assert_eq!(superblock.offset("peer_table"), PEER_TABLE_OFFSET);
    assert_eq!(superblock.size("peer_table"), MAX_PEERS * layout("superblock.peer").bytes);
    assert_eq!(layout("superblock.peer").size("name"), PEER_NAME_BYTES);
    assert_eq!(layout("catalog.entry").size("comment"), COMMENT_BYTES);
    assert_eq!(layout("site_record").size("name"), SITE_NAME_BYTES);
    // Catalog slot of the default capacity is 256 KiB, as §3 says.
    assert_eq!(Catalog::slot_bytes(catalog::DEFAULT_CAPACITY_ENTRIES), 256 * 1024);
}

// ---------------------------------------------------------------------------------------------
// crc32c, written from the document's definition (not the code's)
// ---------------------------------------------------------------------------------------------

fn crc32c_by_definition(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    crc ^ 0xFFFF_FFFF
}

#[test]
fn crc32c_definition_has_the_documented_check_value() {
    assert_eq!(crc32c_by_definition(b"123456789"), 0xE306_9283);
    assert!(FORMAT_MD.contains("0xE3069283") && FORMAT_MD.contains("0x82F63B78"));
}

/// Checks the common header at the start of `bytes`, including the crc by the documented rule.
fn check_header(bytes: &[u8], magic: &[u8; 8], length: usize, sequence: u64) {
    let header = layout("header");
    let crc_at = header.offset("crc");
    let crc_size = header.size("crc");
    let mut zeroed = bytes[..length].to_vec();
    zeroed[crc_at..crc_at + crc_size].fill(0);
    let crc = crc32c_by_definition(&zeroed);
    check(
        header,
        bytes,
        0,
        &[
            raw("magic", magic),
            int("major", 1),
            int("minor", u64::from(chronicle::core::format::FORMAT_MINOR)),
            int("length", length as u64),
            int("sequence", sequence),
            int("crc", u64::from(crc)),
        ],
        &[],
    );
}

/// Eight distinct bytes derived from `tag`, so a field read at a wrong offset never matches.
fn distinct(tag: u8) -> u64 {
    u64::from_le_bytes(std::array::from_fn(|i| tag.wrapping_mul(8).wrapping_add(i as u8 * 3 + 1)))
}

// ---------------------------------------------------------------------------------------------
// Structures
// ---------------------------------------------------------------------------------------------

fn superblock_variant(variant: u8) -> Superblock {
    let (role, mode, policy, durability) = if variant == 0 {
        (DeviceRole::History, JournalMode::All, JournalFullPolicy::BitmapOnly, Durability::Flush)
    } else {
        (DeviceRole::Journal, JournalMode::Latest, JournalFullPolicy::MergeOldest, Durability::WriteThrough)
    };
    let kinds = [AreaKind::Units, AreaKind::CatalogB, AreaKind::Sites, AreaKind::CatalogA, AreaKind::SortCursors];
    let areas: Vec<Area> = kinds
        .iter()
        .enumerate()
        .take(if variant == 0 { 5 } else { 3 })
        .map(|(i, kind)| Area {
            kind: *kind,
            start_bytes: 0x0003_0000_0000 * (i as u64 + 1) + 0x5_0000 * u64::from(variant + 1),
            length_bytes: 0x1_2345_6000 + 0x1000 * i as u64,
        })
        .collect();
    let peers = vec![
        PeerDevice { role: DeviceRole::Base, bytes: distinct(40 + variant), name: "nvme0n1-base".into() },
        PeerDevice { role: DeviceRole::Backup, bytes: distinct(41 + variant), name: "b".repeat(47) },
        PeerDevice { role: DeviceRole::Journal, bytes: distinct(42), name: "journal ünï".into() },
    ];
    Superblock {
        sequence: distinct(1 + variant),
        volume_uuid: std::array::from_fn(|i| 0x10 + i as u8 + variant),
        device_uuid: std::array::from_fn(|i| 0xC0 + i as u8 - variant),
        role,
        journal_mode: mode,
        journal_full_policy: policy,
        durability,
        device_block_size: if variant == 0 { 2048 } else { 512 },
        host_write_size: if variant == 0 { 1 << 16 } else { 1 << 13 },
        volume_blocks: distinct(3 + variant) & 0x0000_FFFF_FFFF_FFFF,
        device_bytes: 0x00FF_0000_0000_0000 + u64::from(variant),
        features_compat: distinct(5 + variant),
        features_incompat: 0,
        features_ro_compat: distinct(7 + variant),
        created_ns: distinct(9 + variant),
        areas,
        peers: peers.into_iter().take(2 + usize::from(variant)).collect(),
        volume_name: if variant == 0 { String::new() } else { "Chronicle0".into() },
        strict: variant == 1,
    }
}

#[test]
fn superblock_fields_sit_where_the_document_says() {
    let doc = layout("superblock");
    let area = layout("superblock.area");
    let peer = layout("superblock.peer");
    for variant in 0..2 {
        let s = superblock_variant(variant);
        let bytes = s.encode();
        assert_eq!(bytes.len(), METADATA_PAGE_BYTES, "a superblock copy is one 4 KiB page");
        assert!(bytes[doc.bytes..].iter().all(|b| *b == 0), "the page after the checksummed bytes is zero");
        assert_eq!(Superblock::decode(&bytes).unwrap(), s);
        check_header(&bytes[doc.offset("header")..], b"CHRNSUPR", doc.bytes, s.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                raw("volume_uuid", &s.volume_uuid),
                raw("device_uuid", &s.device_uuid),
                int("role", s.role as u64),
                int("journal_mode", s.journal_mode as u64),
                int("journal_full_policy", s.journal_full_policy as u64),
                int("durability", s.durability as u64),
                int("device_block_size", s.device_block_size.into()),
                int("host_write_size", s.host_write_size.into()),
                int("area_count", s.areas.len() as u64),
                int("peer_count", s.peers.len() as u64),
                int("strict", u64::from(s.strict)),
                int("volume_blocks", s.volume_blocks),
                int("device_bytes", s.device_bytes),
                int("features_compat", s.features_compat),
                int("features_incompat", s.features_incompat),
                int("features_ro_compat", s.features_ro_compat),
                int("created_ns", s.created_ns),
            ],
            &["header", "area_table", "peer_table", "volume_name"],
        );
        for index in 0..MAX_AREAS {
            let base = doc.offset("area_table") + index * area.bytes;
            match s.areas.get(index) {
                Some(a) => check(
                    area,
                    &bytes,
                    base,
                    &[
                        int("kind", a.kind as u64),
                        int("start_bytes", a.start_bytes),
                        int("length_bytes", a.length_bytes),
                    ],
                    &[],
                ),
                None => assert!(bytes[base..base + area.bytes].iter().all(|b| *b == 0), "unused area entry {index}"),
            }
        }
        for index in 0..MAX_PEERS {
            let base = doc.offset("peer_table") + index * peer.bytes;
            match s.peers.get(index) {
                Some(p) => check(
                    peer,
                    &bytes,
                    base,
                    &[
                        int("role", p.role as u64),
                        int("bytes", p.bytes),
                        raw("name", &padded(&p.name, peer.size("name"))),
                    ],
                    &[],
                ),
                None => assert!(bytes[base..base + peer.bytes].iter().all(|b| *b == 0), "unused peer entry {index}"),
            }
        }
        let name_at = doc.offset("volume_name");
        assert_eq!(name_at, VOLUME_NAME_OFFSET);
        assert_eq!(doc.size("volume_name"), VOLUME_NAME_BYTES);
        assert_eq!(&bytes[name_at..name_at + VOLUME_NAME_BYTES], padded(&s.volume_name, VOLUME_NAME_BYTES).as_slice());
    }
}

fn catalog_variant(variant: u8) -> Catalog {
    let mut entries = Vec::new();
    if variant == 0 {
        let mut sealed = CatalogEntry::new(distinct(20) >> 8, EntryKind::Online, EntryState::Sealed);
        sealed.comment = "before upgrade — ünïcode".into();
        let mut open = CatalogEntry::new((distinct(20) >> 8) + 1, EntryKind::Online, EntryState::Open);
        open.flags = catalog::flags::FAILED | catalog::flags::COMPRESSED;
        entries.extend([sealed, open]);
    } else {
        let mut merged = CatalogEntry::new(distinct(21) >> 9, EntryKind::Merged, EntryState::Merging);
        merged.through_generation = (distinct(21) >> 9) + 77;
        merged.flags = catalog::flags::DEDUPLICATED
            | catalog::flags::EXTERNAL
            | catalog::flags::PATH_OFFLINE
            | catalog::flags::SHARES_ACROSS;
        merged.comment = "m".repeat(COMMENT_BYTES - 1);
        let mut restore = CatalogEntry::new(5, EntryKind::RestoreVolume, EntryState::Active);
        restore.comment = "rvol-gen5".into();
        let history = CatalogEntry::new(4, EntryKind::History, EntryState::Live);
        let dedup = CatalogEntry::new(0, EntryKind::DedupIndex, EntryState::Live);
        let retained = CatalogEntry::new(2, EntryKind::Retained, EntryState::Held);
        let mut backup = CatalogEntry::new(distinct(22) >> 10, EntryKind::Backup, EntryState::Live);
        backup.comment = "nightly".into();
        let versions = CatalogEntry::new(5, EntryKind::Versions, EntryState::Live);
        entries.extend([merged, restore, history, dedup, retained, backup, versions]);
    }
    for (index, entry) in entries.iter_mut().enumerate() {
        let tag = 60 + 16 * index as u8 + variant;
        entry.time_ns = distinct(tag);
        entry.first_sequence = distinct(tag + 1);
        entry.last_sequence = distinct(tag + 2);
        entry.element_start = distinct(tag + 3);
        entry.element_count = distinct(tag + 4);
        entry.control_start = distinct(tag + 5);
        entry.control_count = distinct(tag + 6);
        entry.stored_bytes = distinct(tag + 7);
        entry.dedup_saved = distinct(tag + 8);
        entry.blocks = distinct(tag + 9);
        entry.last_time_ns = distinct(tag + 10);
        entry.shared_across = distinct(tag + 11);
        entry.original_bytes = distinct(tag + 12);
    }
    Catalog {
        sequence: distinct(30 + variant),
        role: if variant == 0 { DeviceRole::Journal } else { DeviceRole::History },
        next_generation: distinct(31 + variant),
        backup_generation: distinct(33 + variant),
        write_sequence: distinct(35 + variant),
        ring_tail: distinct(37 + variant),
        index_tail: distinct(39 + variant),
        capacity_entries: 0x0102_0304 + u32::from(variant),
        entries,
    }
}

#[test]
fn catalog_fields_sit_where_the_document_says() {
    let doc = layout("catalog");
    let entry_doc = layout("catalog.entry");
    for variant in 0..2 {
        let c = catalog_variant(variant);
        let bytes = c.encode();
        let length = doc.bytes + c.entries.len() * entry_doc.bytes;
        assert_eq!(bytes.len() % METADATA_PAGE_BYTES, 0);
        assert_eq!(Catalog::decode(&bytes).unwrap(), c);
        check_header(&bytes, b"CHRNCATL", length, c.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                int("role", c.role as u64),
                int("next_generation", c.next_generation),
                int("backup_generation", c.backup_generation),
                int("write_sequence", c.write_sequence),
                int("ring_tail", c.ring_tail),
                int("index_tail", c.index_tail),
                int("entry_count", c.entries.len() as u64),
                int("entry_bytes", entry_doc.bytes as u64),
                int("capacity_entries", c.capacity_entries.into()),
            ],
            &["header"],
        );
        assert_eq!(doc.row("entries").offset, Some(doc.bytes));
        for (index, e) in c.entries.iter().enumerate() {
            check(
                entry_doc,
                &bytes,
                doc.offset("entries") + index * entry_doc.bytes,
                &[
                    int("generation", e.generation),
                    int("kind", e.kind as u64),
                    int("state", e.state as u64),
                    int("flags", e.flags.into()),
                    int("comment_length", e.comment.len() as u64),
                    int("time_ns", e.time_ns),
                    int("first_sequence", e.first_sequence),
                    int("last_sequence", e.last_sequence),
                    int("through_generation", e.through_generation),
                    int("element_start", e.element_start),
                    int("element_count", e.element_count),
                    int("control_start", e.control_start),
                    int("control_count", e.control_count),
                    int("stored_bytes", e.stored_bytes),
                    int("dedup_saved", e.dedup_saved),
                    int("blocks", e.blocks),
                    int("last_time_ns", e.last_time_ns),
                    int("shared_across", e.shared_across),
                    int("original_bytes", e.original_bytes),
                    raw("comment", &padded(&e.comment, entry_doc.size("comment"))),
                ],
                &[],
            );
        }
        assert!(bytes[length..].iter().all(|b| *b == 0), "page padding is zero");
    }
}

fn sample_bitmap(blocks: u64, seed: u64) -> DifferenceBitmap {
    let mut bitmap = DifferenceBitmap::new(blocks);
    let mut x = seed;
    for block in 0..blocks {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if (x >> 61) < 3 || block + 1 == blocks {
            bitmap.set(block);
        }
    }
    bitmap
}

#[test]
fn control_block_fields_sit_where_the_document_says() {
    let doc = layout("control_block");
    let bitmap = sample_bitmap(1000, 7);
    let ones = bitmap.count_ones();
    let table: Vec<u64> =
        (0..ones).map(|k| (distinct(k as u8) & ADDRESS_MASK) | if k % 3 == 0 { ADDRESS_SHARED } else { 0 }).collect();
    let blocks = [
        ControlBlock {
            generation: distinct(50),
            through_generation: distinct(50) + 1,
            map: ElementMap::new(bitmap.clone(), Addressing::Contiguous { first: distinct(52) & ADDRESS_MASK })
                .unwrap(),
        },
        ControlBlock {
            generation: distinct(53) >> 1,
            through_generation: distinct(54),
            map: ElementMap::new(bitmap.clone(), Addressing::Explicit(table.clone())).unwrap(),
        },
    ];
    for block in &blocks {
        let bytes = block.encode();
        let explicit = matches!(block.map.addressing(), Addressing::Explicit(_));
        let words = bitmap.words().len();
        let table_offset = doc.bytes + 8 * words;
        let length = table_offset + if explicit { 8 * table.len() } else { 0 };
        assert_eq!(block.encoded_len(), length);
        assert_eq!(ControlBlock::decode(&bytes).unwrap(), *block);
        check_header(&bytes, b"CHRNCTRL", length, 0);
        let first = match block.map.addressing() {
            Addressing::Contiguous { first } => *first,
            Addressing::Explicit(_) => 0,
        };
        check(
            doc,
            &bytes,
            0,
            &[
                int("generation", block.generation),
                int("through_generation", block.through_generation),
                int("blocks", bitmap.len()),
                int("elements", ones),
                int("addressing", u64::from(explicit)),
                int("first_address", first),
                int("table_offset", table_offset as u64),
            ],
            &["header"],
        );
        assert_eq!(doc.row("bitmap_words").offset, Some(doc.bytes));
        for (i, word) in bitmap.words().iter().enumerate() {
            let at = doc.offset("bitmap_words") + 8 * i;
            assert_eq!(&bytes[at..at + 8], &word.to_le_bytes(), "bitmap word {i}");
        }
        // The address table sits at the offset the `table_offset` field names.
        assert_eq!(doc.row("address_table").offset_text, "table_offset");
        if explicit {
            for (k, address) in table.iter().enumerate() {
                let at = table_offset + 8 * k;
                assert_eq!(&bytes[at..at + 8], &address.to_le_bytes(), "address {k}");
            }
        }
    }
    // The documented address flags.
    assert_eq!(ADDRESS_SHARED, 1 << 63);
    assert_eq!(ADDRESS_MASK, (1 << 56) - 1);
    let first_shared = table.iter().position(|a| a & ADDRESS_SHARED != 0).unwrap() as u64;
    let map = blocks[1].map.clone();
    let block_of_first_shared = map.bitmap().iter_ones().nth(first_shared as usize).unwrap();
    assert_eq!(map.address_of(block_of_first_shared), Some(table[first_shared as usize] & ADDRESS_MASK));
    // Contiguous addressing: the k-th set bit's element is at first + k.
    let contiguous = &blocks[0].map;
    for (k, block) in bitmap.iter_ones().enumerate() {
        assert_eq!(contiguous.address_of(block), Some((distinct(52) & ADDRESS_MASK) + k as u64));
    }
}

#[test]
fn version_table_fields_sit_where_the_document_says() {
    let doc = layout("version_table");
    let entry_doc = layout("version_entry");
    let table = VersionTable {
        generation: distinct(110),
        cut_sequence: distinct(111),
        first_address: distinct(112) >> 9,
        entries: (0..5u8)
            .map(|k| VersionEntry {
                block: (distinct(113) >> 4) + u64::from(k / 2),
                sequence: u64::from(k % 2) + distinct(114 + k) % 1000,
                time_ns: distinct(120 + k),
                crc: distinct(126 + k) as u32,
            })
            .collect(),
    };
    let mut table = table;
    table.cut_sequence = table.entries.iter().map(|e| e.sequence).max().unwrap() + 7;
    table.entries.sort_by_key(|e| (e.block, e.sequence));
    table.entries.dedup_by_key(|e| (e.block, e.sequence));
    let bytes = table.encode();
    let length = doc.bytes + table.entries.len() * entry_doc.bytes;
    assert_eq!(VersionTable::decode(&bytes).unwrap(), table);
    check_header(&bytes, b"CHRNVERS", length, 0);
    check(
        doc,
        &bytes,
        0,
        &[
            int("generation", table.generation),
            int("cut_sequence", table.cut_sequence),
            int("first_address", table.first_address),
            int("entry_count", table.entries.len() as u64),
        ],
        &["header"],
    );
    assert_eq!(doc.row("entries").offset, Some(doc.bytes));
    for (k, entry) in table.entries.iter().enumerate() {
        check(
            entry_doc,
            &bytes,
            doc.offset("entries") + k * entry_doc.bytes,
            &[
                int("block", entry.block),
                int("sequence", entry.sequence),
                int("time_ns", entry.time_ns),
                int("crc", entry.crc.into()),
            ],
            &[],
        );
    }
    // A set reserved word of an entry is refused, as documented.
    let mut flagged = bytes.clone();
    flagged[doc.offset("entries") + entry_doc.offset("reserved")] = 1;
    reseal_by_definition(&mut flagged);
    assert!(VersionTable::decode(&flagged).is_err(), "a set reserved entry word must be refused");
}

#[test]
fn index_page_fields_sit_where_the_document_says() {
    let doc = layout("index_page");
    for (mode, entry_doc, count) in [
        (JournalMode::Latest, layout("index_entry.latest"), LATEST_ENTRIES_PER_PAGE),
        (JournalMode::All, layout("index_entry.all"), ALL_ENTRIES_PER_PAGE),
        (JournalMode::All, layout("index_entry.all"), 5),
    ] {
        let entries: Vec<IndexEntry> = (0..count as u64)
            .map(|k| IndexEntry {
                block: distinct(k as u8) >> 4,
                crc: distinct(k as u8 + 3) as u32,
                sequence: if mode == JournalMode::All { distinct(k as u8 + 1) } else { 0 },
                time_ns: if mode == JournalMode::All { distinct(k as u8 + 2) } else { 0 },
                lost: mode == JournalMode::All && k % 2 == 1,
            })
            .collect();
        let page = IndexPage {
            sequence: distinct(90),
            generation: distinct(91),
            page: distinct(92),
            first_segment: distinct(93),
            mode,
            entries,
        };
        let bytes = page.encode();
        assert_eq!(bytes.len(), SLOT_BYTES);
        let length = doc.bytes + count * entry_doc.bytes;
        if count == entries_per_page_of(mode) {
            assert_eq!(length, METADATA_PAGE_BYTES, "a full page is exactly 4096 bytes");
        }
        assert_eq!(IndexPage::decode(&bytes).unwrap(), page);
        check_header(&bytes, b"CHRNIDXP", length, page.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                int("generation", page.generation),
                int("page", page.page),
                int("first_segment", page.first_segment),
                int("entry_count", count as u64),
                int("entry_format", mode as u64),
            ],
            &["header"],
        );
        assert_eq!(doc.row("entries").offset, Some(doc.bytes));
        for (k, entry) in page.entries.iter().enumerate() {
            let base = doc.offset("entries") + k * entry_doc.bytes;
            let flags = u64::from(entry.lost); // bit 0: lost in a power cut ("all" mode)
            let mut expected = vec![int("block", entry.block), int("crc", entry.crc.into()), int("flags", flags)];
            if mode == JournalMode::All {
                expected.push(int("sequence", entry.sequence));
                expected.push(int("time_ns", entry.time_ns));
            }
            check(entry_doc, &bytes, base, &expected, &[]);
        }
        // Entry flags other than the documented ones are refused: bit 0 ("lost") only in all
        // mode, no bit in latest mode.
        if count > 0 {
            let mut flagged = bytes.clone();
            let at = doc.offset("entries") + entry_doc.offset("flags");
            flagged[at] = if mode == JournalMode::All { 2 } else { 1 };
            reseal_by_definition(&mut flagged);
            assert!(IndexPage::decode(&flagged).is_err(), "an unknown entry flag must be refused");
        }
    }
}

/// Recomputes the header crc of `bytes` by the documented rule (crc32c over `[0, length)` with
/// the crc field taken as zero).
fn reseal_by_definition(bytes: &mut [u8]) {
    let header = layout("header");
    let (length_at, crc_at) = (header.offset("length"), header.offset("crc"));
    let length = u32::from_le_bytes(bytes[length_at..length_at + 4].try_into().unwrap()) as usize;
    bytes[crc_at..crc_at + 4].fill(0);
    let crc = crc32c_by_definition(&bytes[..length]);
    bytes[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn entries_per_page_of(mode: JournalMode) -> usize {
    chronicle::core::format::element_index::entries_per_page(mode)
}

#[test]
fn sort_cursor_fields_sit_where_the_document_says() {
    let doc = layout("sort_cursor");
    for (variant, state) in [SortState::Running, SortState::Finished, SortState::Idle].into_iter().enumerate() {
        let tag = 100 + 12 * variant as u8;
        let cursor = SortCursor {
            sequence: distinct(tag),
            generation: distinct(tag + 1),
            record_generation: distinct(tag + 2),
            state,
            saved_through: distinct(tag + 3) | (1 << 63),
            applied_through: distinct(tag + 4) & !(1 << 63),
            history_start: distinct(tag + 5),
            history_units: distinct(tag + 6),
            control_start: distinct(tag + 7),
            control_units: distinct(tag + 8),
            elements_saved: distinct(tag + 9),
        };
        let bytes = cursor.encode();
        assert_eq!(bytes.len(), METADATA_PAGE_BYTES);
        assert!(bytes[doc.bytes..].iter().all(|b| *b == 0));
        assert_eq!(SortCursor::decode(&bytes).unwrap(), cursor);
        check_header(&bytes, b"CHRNSORT", doc.bytes, cursor.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                int("generation", cursor.generation),
                int("record_generation", cursor.record_generation),
                int("state", cursor.state as u64),
                int("saved_through", cursor.saved_through),
                int("applied_through", cursor.applied_through),
                int("history_start", cursor.history_start),
                int("history_units", cursor.history_units),
                int("control_start", cursor.control_start),
                int("control_units", cursor.control_units),
                int("elements_saved", cursor.elements_saved),
            ],
            &["header"],
        );
    }
}

#[test]
fn site_record_fields_sit_where_the_document_says() {
    let doc = layout("site_record");
    for variant in 0..3u8 {
        let bitmap = match variant {
            0 => Some(sample_bitmap(1000, 3)),
            1 => Some(sample_bitmap(64 * 70 + 5, 11)),
            _ => None,
        };
        let tag = 140 + 10 * variant;
        let site = SiteRecord {
            sequence: distinct(tag),
            site_uuid: std::array::from_fn(|i| 0x40 + 3 * i as u8 + variant),
            mode: if variant == 1 { SiteMode::Sync } else { SiteMode::Async },
            state: [SiteState::OutOfSync, SiteState::Resyncing, SiteState::Detached][variant as usize],
            transfer: if variant == 0 { SiteTransfer::PerMarker } else { SiteTransfer::PerWrite },
            delta: variant != 1,
            shipped_sequence: distinct(tag + 1),
            shipped_generation: distinct(tag + 2),
            acknowledged_generation: distinct(tag + 3),
            lag_limit_bytes: distinct(tag + 4),
            lag_limit_ms: distinct(tag + 5),
            out_of_sync_since_generation: distinct(tag + 6),
            name: if variant == 1 { "s".repeat(SITE_NAME_BYTES - 1) } else { "dr-site-east".into() },
            out_of_sync: bitmap.clone(),
        };
        let bytes = site.encode();
        let words = bitmap.as_ref().map_or(0, |b| b.words().len());
        let length = doc.bytes + 8 * words;
        assert_eq!(SiteRecord::decode(&bytes).unwrap(), site);
        check_header(&bytes, b"CHRNSITE", length, site.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                raw("site_uuid", &site.site_uuid),
                int("mode", site.mode as u64),
                int("state", site.state as u64),
                int("transfer", site.transfer as u64),
                int("delta", u64::from(site.delta)),
                int("shipped_sequence", site.shipped_sequence),
                int("shipped_generation", site.shipped_generation),
                int("acknowledged_generation", site.acknowledged_generation),
                int("lag_limit_bytes", site.lag_limit_bytes),
                int("lag_limit_ms", site.lag_limit_ms),
                int("out_of_sync_since_generation", site.out_of_sync_since_generation),
                int("bitmap_blocks", bitmap.as_ref().map_or(0, |b| b.len())),
                raw("name", &padded(&site.name, doc.size("name"))),
            ],
            &["header"],
        );
        assert_eq!(doc.row("out_of_sync_words").offset, Some(doc.bytes));
        if let Some(bitmap) = &bitmap {
            for (i, word) in bitmap.words().iter().enumerate() {
                let at = doc.offset("out_of_sync_words") + 8 * i;
                assert_eq!(&bytes[at..at + 8], &word.to_le_bytes(), "out-of-sync word {i}");
            }
        }
    }
}

#[test]
fn dedup_table_fields_sit_where_the_document_says() {
    let doc = layout("dedup_table");
    let entry_doc = layout("dedup_entry");
    let table = DedupTable {
        sequence: distinct(170),
        entries: (0..7u8)
            .map(|i| DedupEntry {
                hash: u128::from(distinct(171 + 3 * i)) << 64 | u128::from(distinct(172 + 3 * i)),
                address: distinct(173 + 3 * i) & ADDRESS_MASK,
                references: 0x0A0B_0C00 + u32::from(i) + 1,
            })
            .collect(),
    };
    let bytes = table.encode();
    let length = doc.bytes + table.entries.len() * entry_doc.bytes;
    assert_eq!(DedupTable::decode(&bytes).unwrap(), table);
    check_header(&bytes, b"CHRNDDUP", length, table.sequence);
    check(doc, &bytes, 0, &[int("entry_count", table.entries.len() as u64)], &["header"]);
    assert_eq!(doc.row("entries").offset, Some(doc.bytes));
    for (i, entry) in table.entries.iter().enumerate() {
        check(
            entry_doc,
            &bytes,
            doc.offset("entries") + i * entry_doc.bytes,
            &[
                raw("hash", &entry.hash.to_le_bytes()),
                int("address", entry.address),
                int("references", entry.references.into()),
            ],
            &[],
        );
    }
}

#[test]
fn frame_table_fields_sit_where_the_document_says() {
    let doc = layout("frame_table");
    let entry_doc = layout("frame_table.frame");
    // 5 frames of 0x30 units (the last one 0x11) of 512 bytes; frame 2 raw.
    let (frame_units, unit_bytes) = (0x30u32, 512u32);
    let logical_units = 4 * u64::from(frame_units) + 0x11;
    let data_offset = distinct(180) >> 40;
    let mut next = data_offset;
    let frames: Vec<FrameEntry> = (0..5u8)
        .map(|i| {
            let raw = i == 2;
            let full = if i == 4 { 0x11 * unit_bytes } else { frame_units * unit_bytes };
            let stored_bytes = if raw { full } else { 0x0101 + u32::from(i) * 0x10 };
            let entry =
                FrameEntry { offset_bytes: next + u64::from(i), stored_bytes, crc: distinct(181 + i) as u32, raw };
            next = entry.offset_bytes + u64::from(stored_bytes);
            entry
        })
        .collect();
    let table = FrameTable {
        generation: distinct(190) >> 8,
        through_generation: (distinct(190) >> 8) + 5,
        logical_units,
        unit_bytes,
        frame_units,
        codec: CODEC_LZ4,
        data_offset,
        frames,
    };
    let bytes = table.encode();
    let length = doc.bytes + table.frames.len() * entry_doc.bytes;
    assert_eq!(FrameTable::decode(&bytes).unwrap(), table);
    check_header(&bytes, b"CHRNFRMT", length, 0);
    check(
        doc,
        &bytes,
        0,
        &[
            int("generation", table.generation),
            int("through_generation", table.through_generation),
            int("logical_units", table.logical_units),
            int("unit_bytes", unit_bytes.into()),
            int("frame_units", frame_units.into()),
            int("frame_count", table.frames.len() as u64),
            int("codec", CODEC_LZ4.into()),
            int("data_offset", table.data_offset),
        ],
        &["header"],
    );
    assert_eq!(doc.row("frames").offset, Some(doc.bytes));
    for (i, frame) in table.frames.iter().enumerate() {
        check(
            entry_doc,
            &bytes,
            doc.offset("frames") + i * entry_doc.bytes,
            &[
                int("offset_bytes", frame.offset_bytes),
                int("stored_bytes", frame.stored_bytes.into()),
                int("crc", frame.crc.into()),
                int("flags", if frame.raw { FRAME_RAW.into() } else { 0 }),
            ],
            &[],
        );
    }
}

#[test]
fn difference_bitmap_fields_sit_where_the_document_says() {
    let doc = layout("bitmap");
    for (blocks, seed) in [(1u64, 1u64), (64, 2), (1000, 3), (64 * 33 + 17, 4)] {
        let bitmap = sample_bitmap(blocks, seed);
        let bytes = bitmap.encode();
        let length = doc.bytes + 8 * bitmap.words().len();
        assert_eq!(bytes.len(), length);
        assert_eq!(DifferenceBitmap::decode(&bytes).unwrap(), bitmap);
        check_header(&bytes, b"CHRNBMAP", length, 0);
        check(doc, &bytes, 0, &[int("bit_count", bitmap.len()), int("population", bitmap.count_ones())], &["header"]);
        assert_eq!(doc.row("words").offset, Some(doc.bytes));
        for (i, word) in bitmap.words().iter().enumerate() {
            let at = doc.offset("words") + 8 * i;
            assert_eq!(&bytes[at..at + 8], &word.to_le_bytes(), "word {i}");
        }
    }
}

#[test]
fn open_bitmap_page_fields_sit_where_the_document_says() {
    let doc = layout("open_bitmap_page");
    // A full page fills its slot; the document states the words and blocks per page.
    assert_eq!(doc.bytes + 8 * WORDS_PER_PAGE, METADATA_PAGE_BYTES);
    assert_eq!((WORDS_PER_PAGE, BLOCKS_PER_PAGE), (504, 32256));
    assert!(FORMAT_MD.contains("pages of 504 words (32256 blocks)"), "FORMAT.md states the page capacity");
    for count in [WORDS_PER_PAGE, 3, 0] {
        let page = OpenBitmapPage {
            sequence: distinct(80),
            generation: distinct(81),
            page: 7,
            words: (0..count as u64).map(|k| distinct((k % 200) as u8 + 10) ^ k).collect(),
        };
        let bytes = page.encode();
        let length = doc.bytes + 8 * count;
        assert_eq!(OpenBitmapPage::decode(&bytes).unwrap(), page);
        check_header(&bytes, b"CHRNOBMP", length, page.sequence);
        check(
            doc,
            &bytes,
            0,
            &[
                int("generation", page.generation),
                int("page", 7),
                int("first_block", 7 * BLOCKS_PER_PAGE),
                int("word_count", count as u64),
            ],
            &["header"],
        );
        assert_eq!(doc.row("words").offset, Some(doc.bytes));
        for (i, word) in page.words.iter().enumerate() {
            let at = doc.offset("words") + 8 * i;
            assert_eq!(&bytes[at..at + 8], &word.to_le_bytes(), "word {i}");
        }
        // `first_block` is checked against `page`, as documented.
        let mut moved = bytes.clone();
        moved[doc.offset("first_block")] ^= 1;
        reseal_by_definition(&mut moved);
        assert!(OpenBitmapPage::decode(&moved).is_err(), "a first block that is not the page's is refused");
    }
}

// ---------------------------------------------------------------------------------------------
// Device layouts: the worked examples of §3 and §4
// ---------------------------------------------------------------------------------------------

struct Example {
    device_bytes: u64,
    /// The numbers after the size in the heading (elements and index pages, or units).
    counts: Vec<u64>,
    areas: Vec<(String, u64, u64)>,
}

fn example(name: &str) -> Example {
    let lines: Vec<&str> = FORMAT_MD.lines().collect();
    let index = lines
        .iter()
        .position(|line| heading(line, "Example: ").is_some_and(|(n, _)| n == name))
        .unwrap_or_else(|| panic!("FORMAT.md has no ``Example: `{name}` `` table"));
    let (_, tail) = heading(lines[index], "Example: ").unwrap();
    let numbers: Vec<u64> =
        tail.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let (header, rows) = table_after(&lines, index);
    assert_eq!(header, ["area", "start", "length"]);
    Example {
        device_bytes: numbers[0],
        counts: numbers[1..].to_vec(),
        areas: rows.iter().map(|r| (strip_ticks(&r[0]), r[1].parse().unwrap(), r[2].parse().unwrap())).collect(),
    }
}

fn documented_areas(areas: &[Area]) -> Vec<(String, u64, u64)> {
    areas.iter().map(|a| (format!("{:?}", a.kind), a.start_bytes, a.length_bytes)).collect()
}

#[test]
fn worked_layout_examples_match_the_planner() {
    let shape = VolumeShape { host_write_size: 4096, volume_blocks: 16384 };
    let options = LayoutOptions::default();

    let journal = example("journal-64MiB-4KiB");
    assert_eq!(recommended_journal_bytes(&shape, &options), journal.device_bytes);
    let planned = plan_journal(&shape, &options, journal.device_bytes).unwrap();
    assert_eq!(journal.counts, vec![planned.element_capacity, planned.index_pages]);
    assert_eq!(journal.areas, documented_areas(&planned.areas()));
    assert_eq!(planned.catalogs[0].start_bytes, 2 * METADATA_PAGE_BYTES as u64, "catalog A follows two superblocks");
    assert_eq!(planned.index.length_bytes, planned.index_pages * 2 * SLOT_BYTES as u64, "two slots per index page");

    let history = example("history-64MiB-4KiB");
    assert_eq!(recommended_history_bytes(&shape, &options), history.device_bytes);
    let planned = plan_history(&shape, &options, history.device_bytes).unwrap();
    assert_eq!(history.counts, vec![planned.unit_count]);
    assert_eq!(history.areas, documented_areas(&planned.areas()));
}

// ---------------------------------------------------------------------------------------------
// Enumerations: the values listed in a field's meaning are exactly the code's
// ---------------------------------------------------------------------------------------------

/// `(value, name)` pairs listed after ``"`Enum`:"`` in the meaning of `layout.field`, e.g.
/// "`EntryKind`: 1 online, 2 history — …".
fn documented_values(layout_name: &str, field: &str, enum_name: &str) -> Vec<(u8, String)> {
    let meaning = &layout(layout_name).row(field).meaning;
    let marker = format!("`{enum_name}`:");
    let start = meaning
        .find(&marker)
        .unwrap_or_else(|| panic!("layout `{layout_name}` field `{field}` does not list `{enum_name}` values"))
        + marker.len();
    let list = meaning[start..].split(" — ").next().unwrap().split(" (").next().unwrap();
    list.split(',')
        .map(|item| {
            let item = item.trim();
            let value = leading_number(item);
            (value as u8, item[value.to_string().len()..].trim().to_lowercase())
        })
        .collect()
}

/// "RestoreVolume" → "restore volume", "CatalogA" → "catalog a".
fn words(debug_name: &str) -> String {
    let mut out = String::new();
    for (i, c) in debug_name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Every documented value decodes to the documented name, and no other byte decodes.
fn check_enum<T: std::fmt::Debug>(documented: &[(u8, String)], decode: impl Fn(u8) -> Option<T>, what: &str) {
    assert!(!documented.is_empty());
    for (value, name) in documented {
        let decoded =
            decode(*value).unwrap_or_else(|| panic!("{what}: documented value {value} is refused by the code"));
        assert_eq!(&words(&format!("{decoded:?}")), name, "{what}: value {value}");
    }
    for value in 0..=u8::MAX {
        if !documented.iter().any(|(v, _)| *v == value) {
            assert!(decode(value).is_none(), "{what}: the code accepts value {value}, which FORMAT.md does not list");
        }
    }
}

#[test]
fn documented_enumerations_match_the_code() {
    check_enum(
        &documented_values("catalog.entry", "kind", "EntryKind"),
        |v| EntryKind::from_byte("test", "kind", v).ok(),
        "catalog entry kind",
    );
    check_enum(
        &documented_values("catalog.entry", "state", "EntryState"),
        |v| EntryState::from_byte("test", "state", v).ok(),
        "catalog entry state",
    );
    // Area kinds decode only inside a superblock: patch the kind of its single area.
    let mut superblock = superblock_variant(1);
    superblock.areas.truncate(1);
    let bytes = superblock.encode();
    let kind_at = layout("superblock").offset("area_table") + layout("superblock.area").offset("kind");
    check_enum(
        &documented_values("superblock.area", "kind", "AreaKind"),
        |v| {
            let mut patched = bytes.clone();
            patched[kind_at..kind_at + 4].copy_from_slice(&u32::from(v).to_le_bytes());
            reseal_by_definition(&mut patched);
            Superblock::decode(&patched).ok().map(|s| s.areas[0].kind)
        },
        "area kind",
    );
    assert_eq!(EntryKind::Backup as u8, 7);
}

// ---------------------------------------------------------------------------------------------
// The engine writes what the document says: format (§14.9), element checksums and the marker
// (§9.1, §14.5), reading the index back (§9.2), the sort's backup entry (§7.1, §14.6). Devices
// are read raw, by the placement rules of §3 and §4, and decoded with the documented structures.
// ---------------------------------------------------------------------------------------------

mod engine_on_disk {
    use std::sync::Arc;

    use chronicle::device::memory::{MemoryDevice, MemoryOptions};
    use chronicle::device::{Channel, Device, DmaBuf, IoBuffers};
    use chronicle::engine::{format, EngineError, FormatOptions, HostRequest, Volume, VolumeOptions};
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const DEVICE_BLOCK: u32 = 512;
    const UNIT: u32 = 4096;
    const VOLUME_BYTES: u64 = 4 << 20;
    const VOLUME_BLOCKS: u64 = VOLUME_BYTES / UNIT as u64;
    const JOURNAL: usize = 1;
    const HISTORY: usize = 3;

    /// Base, journal, backup and history; the journal and history start full of junk so that
    /// what format zeroes can be seen.
    fn devices() -> [MemoryDevice; 4] {
        let shape = VolumeShape { host_write_size: UNIT, volume_blocks: VOLUME_BLOCKS };
        let options = LayoutOptions::default();
        let sizes = [
            VOLUME_BYTES,
            recommended_journal_bytes(&shape, &options),
            VOLUME_BYTES,
            recommended_history_bytes(&shape, &options) * 4,
        ];
        let names = ["base", "journal", "backup", "history"];
        std::array::from_fn(|i| {
            let bytes = sizes[i].div_ceil(u64::from(DEVICE_BLOCK)) * u64::from(DEVICE_BLOCK);
            if i == JOURNAL || i == HISTORY {
                MemoryDevice::from_bytes(names[i], DEVICE_BLOCK, vec![0xA5; bytes as usize])
            } else {
                MemoryDevice::new(names[i], MemoryOptions::new(DEVICE_BLOCK, bytes / u64::from(DEVICE_BLOCK)))
            }
        })
    }

    fn channels(devices: &[MemoryDevice; 4]) -> Vec<Box<dyn Channel>> {
        devices.iter().map(|d| d.open_channel().unwrap()).collect()
    }

    fn manual_sort() -> VolumeOptions {
        let mut options = VolumeOptions::default();
        options.sort.automatic = false;
        options
    }

    /// Writes whole units with fresh random data and waits for them.
    fn write_units(volume: &mut Volume, rng: &mut ChaCha8Rng, units: &[u64]) {
        for unit in units {
            let mut data = vec![0u8; UNIT as usize];
            rng.fill_bytes(&mut data);
            let offset_blocks = unit * u64::from(UNIT / DEVICE_BLOCK);
            let buffers = Arc::new(IoBuffers::single(DmaBuf::copy_from(&data)));
            volume.submit(offset_blocks, HostRequest::Write { offset_blocks, buffers });
        }
        let mut completions = Vec::new();
        volume.run_until_idle(&mut completions);
        for completion in completions {
            completion.result.expect("host write succeeds");
        }
    }

    /// A device image read by the documented rules.
    struct Image {
        bytes: Vec<u8>,
        superblock: Superblock,
    }

    impl Image {
        fn of(device: &MemoryDevice) -> Image {
            let bytes = device.snapshot();
            let superblock = Superblock::decode(&bytes[..METADATA_PAGE_BYTES]).expect("superblock copy 0");
            Image { bytes, superblock }
        }

        fn area(&self, kind: AreaKind) -> Area {
            *self.superblock.areas.iter().find(|a| a.kind == kind).unwrap_or_else(|| panic!("no {kind:?} area"))
        }

        fn range(&self, start: u64, length: u64) -> &[u8] {
            &self.bytes[start as usize..(start + length) as usize]
        }

        fn area_bytes(&self, kind: AreaKind) -> &[u8] {
            let area = self.area(kind);
            self.range(area.start_bytes, area.length_bytes)
        }

        fn catalog(&self) -> Catalog {
            catalog::choose(self.area_bytes(AreaKind::CatalogA), self.area_bytes(AreaKind::CatalogB)).unwrap()
        }

        /// Slot `k` of virtual index page `page` (§3: physical page `page mod index_pages`).
        fn index_slot(&self, page: u64, k: u64) -> &[u8] {
            let index = self.area(AreaKind::ElementIndex);
            let pages = index.length_bytes / (2 * METADATA_PAGE_BYTES as u64);
            let at = index.start_bytes + (2 * (page % pages) + k) * METADATA_PAGE_BYTES as u64;
            self.range(at, METADATA_PAGE_BYTES as u64)
        }

        /// The element in virtual journal segment `segment` (§3).
        fn element(&self, segment: u64) -> &[u8] {
            let elements = self.area(AreaKind::Elements);
            let unit = u64::from(self.superblock.host_write_size);
            let capacity = elements.length_bytes / unit;
            self.range(elements.start_bytes + (segment % capacity) * unit, unit)
        }

        fn element_offset(&self, segment: u64) -> u64 {
            let elements = self.area(AreaKind::Elements);
            let unit = u64::from(self.superblock.host_write_size);
            elements.start_bytes + (segment % (elements.length_bytes / unit)) * unit
        }

        /// Page `j` of a generation by §9.2: the belonging slot with the higher sequence.
        fn index_page(&self, entry: &CatalogEntry, j: u64) -> Option<IndexPage> {
            let page = entry.control_start + j;
            let first = entry.element_start + j * LATEST_ENTRIES_PER_PAGE as u64;
            [0, 1]
                .into_iter()
                .filter_map(|k| IndexPage::decode(self.index_slot(page, k)).ok())
                .filter(|p| p.generation == entry.generation && p.page == page && p.first_segment == first)
                .max_by_key(|p| p.sequence)
        }
    }

    #[test]
    fn format_writes_the_documented_initial_state() {
        let devices = devices();
        format(channels(&devices), &FormatOptions::default(), &mut |_| {}).unwrap();
        let page = METADATA_PAGE_BYTES;
        let journal = Image::of(&devices[JOURNAL]);
        let history = Image::of(&devices[HISTORY]);
        for (image, role) in [(&journal, DeviceRole::Journal), (&history, DeviceRole::History)] {
            assert_eq!(image.superblock.role, role);
            assert_eq!(image.superblock.sequence, 1, "superblock copy 0 has sequence 1");
            assert_eq!(
                Superblock::decode(&image.bytes[page..2 * page]).unwrap(),
                image.superblock,
                "{role:?}: superblock copy 1 equals copy 0"
            );
            assert!(image.area_bytes(AreaKind::CatalogB).iter().all(|b| *b == 0), "{role:?}: catalog B is zero");
        }
        assert_eq!(journal.superblock.volume_uuid, history.superblock.volume_uuid);
        let created = journal.superblock.created_ns;
        for kind in [AreaKind::Sites, AreaKind::ElementIndex] {
            assert!(journal.area_bytes(kind).iter().all(|b| *b == 0), "journal {kind:?} area is zero");
        }
        // Journal catalog: slot A, sequence 1, generation 1 open at segment 0 and index page 0.
        let catalog = Catalog::decode(journal.area_bytes(AreaKind::CatalogA)).unwrap();
        assert_eq!((catalog.sequence, catalog.role, catalog.next_generation), (1, DeviceRole::Journal, 1));
        let mut open = CatalogEntry::new(1, EntryKind::Online, EntryState::Open);
        open.time_ns = created;
        assert_eq!(catalog.entries, vec![open]);
        // History catalog: slot A, sequence 1, one backup entry for generation 0 ("format").
        let catalog = Catalog::decode(history.area_bytes(AreaKind::CatalogA)).unwrap();
        assert_eq!((catalog.sequence, catalog.role, catalog.backup_generation), (1, DeviceRole::History, 0));
        let mut backup = CatalogEntry::new(0, EntryKind::Backup, EntryState::Live);
        backup.time_ns = created;
        backup.comment = "format".into();
        assert_eq!(catalog.entries, vec![backup]);
        // Sort cursor: slot 0 idle with sequence 1, slot 1 zero.
        let cursors = history.area_bytes(AreaKind::SortCursors);
        assert_eq!(SortCursor::decode(&cursors[..page]).unwrap(), SortCursor::idle(1));
        assert!(cursors[page..].iter().all(|b| *b == 0), "sort cursor slot 1 is zero");
    }

    #[test]
    fn index_entries_carry_element_crcs_and_the_sort_moves_the_backup_entry() {
        let devices = devices();
        format(channels(&devices), &FormatOptions::default(), &mut |_| {}).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let mut volume = Volume::open(channels(&devices), manual_sort()).unwrap();
        // 300 new blocks: two index pages (252 + 48 entries), both written by group commit.
        let units: Vec<u64> = (0..300).map(|k| (k * 7) % VOLUME_BLOCKS).collect();
        write_units(&mut volume, &mut rng, &units);
        // Rewrites after their pages were written: the crcs change in memory only, and the
        // marker must rewrite both (now stale) pages before sealing.
        write_units(&mut volume, &mut rng, &[units[5], units[251], units[260]]);
        let mut completions = Vec::new();
        assert_eq!(volume.mark_and_wait("g1", &mut completions).unwrap(), 1);
        // Generation 2: open, three pages' worth of entries (the last partly filled).
        let open_units: Vec<u64> = (0..600).map(|k| (k * 3 + 1) % VOLUME_BLOCKS).collect();
        write_units(&mut volume, &mut rng, &open_units);
        volume.close().unwrap();

        let journal = Image::of(&devices[JOURNAL]);
        let catalog = journal.catalog();
        assert_eq!(catalog.entries.len(), 2);
        let (sealed, open) = (&catalog.entries[0], &catalog.entries[1]);
        assert_eq!((sealed.generation, sealed.kind, sealed.state), (1, EntryKind::Online, EntryState::Sealed));
        assert_eq!(sealed.comment, "g1");
        assert_eq!((sealed.element_start, sealed.element_count, sealed.blocks), (0, 300, 300));
        assert_eq!((sealed.control_start, sealed.control_count), (0, 2));
        assert_eq!((open.generation, open.state), (2, EntryState::Open));
        assert_eq!((open.element_start, open.element_count, open.control_start, open.control_count), (300, 0, 2, 0));
        // Sealed: every entry's crc is the crc32c of its element, rewrites included.
        let mut blocks = Vec::new();
        for j in 0..sealed.control_count {
            let page = journal.index_page(sealed, j).unwrap_or_else(|| panic!("sealed page {j} reads back"));
            for (k, entry) in page.entries.iter().enumerate() {
                let segment = page.first_segment + k as u64;
                assert_eq!(entry.crc, crc32c_by_definition(journal.element(segment)), "segment {segment}");
                blocks.push(entry.block);
            }
        }
        assert_eq!(blocks, units, "entry k names the block in segment element_start + k");
        // Open: pages read until the first not-full page (600 = 252 + 252 + 96).
        let counts: Vec<usize> = (0..4).map(|j| journal.index_page(open, j).map_or(0, |p| p.entries.len())).collect();
        assert_eq!(counts, vec![252, 252, 96, 0]);

        // Open verifies every element of a sealed generation against its crc.
        let damaged_at = journal.element_offset(sealed.element_start + 123);
        let good = devices[JOURNAL].read_blocks(damaged_at / u64::from(DEVICE_BLOCK), 1);
        let mut bad = good.clone();
        bad[100] ^= 0x10;
        devices[JOURNAL].write_blocks(damaged_at / u64::from(DEVICE_BLOCK), &bad);
        match Volume::open(channels(&devices), manual_sort()) {
            Err(EngineError::Damaged(message)) => {
                assert!(
                    message.contains("sealed generation 1") && message.contains(&format!("block {}", units[123])),
                    "{message}"
                )
            }
            Err(other) => panic!("expected damage, got {other}"),
            Ok(_) => panic!("a damaged sealed element must refuse the open"),
        }
        devices[JOURNAL].write_blocks(damaged_at / u64::from(DEVICE_BLOCK), &good);

        // The sort of generation 1: H(0) takes the backup entry's time and comment ("format"),
        // the backup entry becomes generation 1 with marker 1's.
        let format_time = journal.superblock.created_ns;
        let mut volume = Volume::open(channels(&devices), VolumeOptions::default()).unwrap();
        volume.run_until_idle(&mut completions);
        assert_eq!(volume.status().backup_generation, 1);
        volume.close().unwrap();
        let history = Image::of(&devices[HISTORY]);
        let catalog = history.catalog();
        assert_eq!(catalog.backup_generation, 1);
        let backups: Vec<&CatalogEntry> = catalog.entries.iter().filter(|e| e.kind == EntryKind::Backup).collect();
        assert_eq!(backups.len(), 1, "exactly one backup entry");
        assert_eq!((backups[0].generation, backups[0].time_ns, backups[0].comment.as_str()), (1, sealed.time_ns, "g1"));
        let record = catalog.entry(0, EntryKind::History).expect("H(0)");
        assert_eq!((record.state, record.time_ns, record.comment.as_str()), (EntryState::Live, format_time, "format"));
        assert_eq!((record.blocks, record.element_count), (300, 300));
        let cursors = history.area_bytes(AreaKind::SortCursors);
        let (a, b) = cursors.split_at(METADATA_PAGE_BYTES);
        let cursor = [SortCursor::decode(a), SortCursor::decode(b)].into_iter().flatten().max_by_key(|c| c.sequence);
        assert_eq!(cursor.unwrap().state, SortState::Idle, "the finished sort leaves the cursor idle");
        let journal = Image::of(&devices[JOURNAL]);
        let catalog = journal.catalog();
        assert_eq!(catalog.entries.len(), 1, "generation 1 dropped from the journal");
        assert_eq!((catalog.ring_tail, catalog.index_tail), (300, 2));
    }

    /// §9.2: a missing page of the open generation followed by a valid one is damage.
    #[test]
    fn open_generation_with_a_gap_in_its_index_is_refused() {
        let devices = devices();
        format(channels(&devices), &FormatOptions::default(), &mut |_| {}).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut volume = Volume::open(channels(&devices), manual_sort()).unwrap();
        let units: Vec<u64> = (0..400).collect();
        write_units(&mut volume, &mut rng, &units);
        volume.close().unwrap();
        let journal = Image::of(&devices[JOURNAL]);
        let index = journal.area(AreaKind::ElementIndex);
        // Both slots of virtual page 0 (physical page 0) destroyed; page 1 still valid.
        let zero = vec![0u8; 2 * METADATA_PAGE_BYTES];
        let saved = journal.range(index.start_bytes, zero.len() as u64).to_vec();
        devices[JOURNAL].write_blocks(index.start_bytes / u64::from(DEVICE_BLOCK), &zero);
        match Volume::open(channels(&devices), manual_sort()) {
            Err(EngineError::Damaged(message)) => assert!(message.contains("later pages exist"), "{message}"),
            Err(other) => panic!("expected damage, got {other}"),
            Ok(_) => panic!("a gap in the open generation's index must refuse the open"),
        }
        devices[JOURNAL].write_blocks(index.start_bytes / u64::from(DEVICE_BLOCK), &saved);
        let volume = Volume::open(channels(&devices), manual_sort()).unwrap();
        assert_eq!(volume.status().journal_used_elements, 400);
        volume.close().unwrap();
    }
}
