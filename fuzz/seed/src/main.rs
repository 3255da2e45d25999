//! Writes valid encodings of each decoder's structure into `<corpus>/<target>/seed-<n>`, so the
//! fuzzers start past the magic, version, length and crc32c checks instead of having to forge
//! them. Usage: `cargo run --manifest-path fuzz/seed/Cargo.toml -- fuzz/corpus`.

use std::path::Path;

use chronicle::core::bitmap::DifferenceBitmap;
use chronicle::core::element_map::{Addressing, ElementMap, ADDRESS_SHARED};
use chronicle::core::format::catalog::{flags, Catalog, CatalogEntry, EntryKind, EntryState};
use chronicle::core::format::control_block::ControlBlock;
use chronicle::core::format::element_index::{entries_per_page, IndexEntry, IndexPage};
use chronicle::core::format::layout::{plan_history, plan_journal, LayoutOptions, VolumeShape};
use chronicle::core::format::records::{
    DedupEntry, DedupTable, SiteMode, SiteRecord, SiteState, SiteTransfer, SortCursor, SortState,
};
use chronicle::core::format::superblock::{
    DeviceRole, Durability, JournalFullPolicy, JournalMode, PeerDevice, Superblock,
};

fn bitmap(blocks: u64, step: u64) -> DifferenceBitmap {
    let mut bitmap = DifferenceBitmap::new(blocks);
    for block in (0..blocks).step_by(step as usize) {
        bitmap.set(block);
    }
    bitmap
}

fn superblocks() -> Vec<Vec<u8>> {
    let shape = VolumeShape { host_write_size: 4096, volume_blocks: 16384 };
    let options = LayoutOptions::default();
    let journal = plan_journal(&shape, &options, 32 << 20).expect("journal fits");
    let history = plan_history(&shape, &options, 64 << 20).expect("history fits");
    let peer = |role, name: &str| PeerDevice { role, bytes: 64 << 20, name: name.into() };
    let make = |role, areas, peers| Superblock {
        sequence: 1,
        volume_uuid: [7; 16],
        device_uuid: [9; 16],
        role,
        journal_mode: JournalMode::Latest,
        journal_full_policy: JournalFullPolicy::Block,
        durability: Durability::Flush,
        device_block_size: 512,
        host_write_size: 4096,
        volume_blocks: 16384,
        device_bytes: 64 << 20,
        features_compat: 0,
        features_incompat: 0,
        features_ro_compat: 0,
        created_ns: 1_800_000_000_000_000_000,
        areas,
        peers,
        volume_name: "chronicle0".into(),
        strict: false,
    };
    vec![
        make(
            DeviceRole::Journal,
            journal.areas(),
            vec![peer(DeviceRole::Base, "base"), peer(DeviceRole::Backup, "backup")],
        ),
        make(DeviceRole::History, history.areas(), vec![peer(DeviceRole::Backup, "backup")]),
    ]
    .iter()
    .map(Superblock::encode)
    .collect()
}

fn catalogs() -> Vec<Vec<u8>> {
    let mut journal = Catalog::new(DeviceRole::Journal, 16);
    journal.sequence = 3;
    journal.next_generation = 3;
    let mut sealed = CatalogEntry::new(2, EntryKind::Online, EntryState::Sealed);
    sealed.element_count = 300;
    sealed.control_count = 2;
    sealed.comment = "g2".into();
    journal.entries = vec![sealed, CatalogEntry::new(3, EntryKind::Online, EntryState::Open)];
    let mut history = Catalog::new(DeviceRole::History, 16);
    history.sequence = 5;
    history.backup_generation = 2;
    let mut backup = CatalogEntry::new(2, EntryKind::Backup, EntryState::Live);
    backup.comment = "g2".into();
    let mut record = CatalogEntry::new(1, EntryKind::History, EntryState::Live);
    record.element_start = 8;
    record.element_count = 100;
    record.control_count = 1;
    let mut merged = CatalogEntry::new(0, EntryKind::Merged, EntryState::Live);
    merged.through_generation = 0;
    merged.flags = flags::DEDUPLICATED;
    history.entries = vec![
        backup,
        record,
        merged,
        CatalogEntry::new(0, EntryKind::DedupIndex, EntryState::Live),
        CatalogEntry::new(1, EntryKind::RestoreVolume, EntryState::Active),
        CatalogEntry::new(0, EntryKind::Retained, EntryState::Held),
    ];
    let empty = Catalog::new(DeviceRole::History, 4);
    [journal, history, empty].iter().map(Catalog::encode).collect()
}

fn control_blocks() -> Vec<Vec<u8>> {
    let sparse = bitmap(200, 37);
    let table: Vec<u64> =
        (0..sparse.count_ones()).map(|k| if k % 2 == 0 { 40 + k } else { (9 + k) | ADDRESS_SHARED }).collect();
    [
        ControlBlock {
            generation: 4,
            through_generation: 4,
            map: ElementMap::new(bitmap(1000, 3), Addressing::Contiguous { first: 5000 }).unwrap(),
        },
        ControlBlock {
            generation: 2,
            through_generation: 5,
            map: ElementMap::new(sparse, Addressing::Explicit(table)).unwrap(),
        },
        ControlBlock { generation: 0, through_generation: 0, map: ElementMap::empty(64) },
    ]
    .iter()
    .map(ControlBlock::encode)
    .collect()
}

fn index_pages() -> Vec<Vec<u8>> {
    let page = |mode, count: usize| IndexPage {
        sequence: 2,
        generation: 3,
        page: 7,
        first_segment: 300,
        mode,
        entries: (0..count as u64)
            .map(|k| IndexEntry {
                block: k * 5,
                crc: 0x1234_5678 ^ k as u32,
                sequence: if mode == JournalMode::All { 1000 + k } else { 0 },
                time_ns: if mode == JournalMode::All { 5_000_000 + k } else { 0 },
            })
            .collect(),
    };
    vec![
        page(JournalMode::Latest, 3).encode(),
        page(JournalMode::Latest, entries_per_page(JournalMode::Latest)).encode(),
        page(JournalMode::All, 2).encode(),
        page(JournalMode::All, 0).encode(),
    ]
}

fn sort_cursors() -> Vec<Vec<u8>> {
    let running = SortCursor {
        sequence: 4,
        generation: 2,
        record_generation: 1,
        state: SortState::Running,
        saved_through: 4096,
        applied_through: 2048,
        history_start: 100,
        history_units: 300,
        control_start: 90,
        control_units: 1,
        elements_saved: 250,
    };
    vec![running.encode(), SortCursor::idle(1).encode()]
}

fn site_records() -> Vec<Vec<u8>> {
    let site = |out_of_sync| SiteRecord {
        sequence: 2,
        site_uuid: [3; 16],
        mode: SiteMode::Async,
        state: SiteState::OutOfSync,
        transfer: SiteTransfer::PerMarker,
        delta: true,
        shipped_sequence: 10,
        shipped_generation: 4,
        acknowledged_generation: 3,
        lag_limit_bytes: 1 << 30,
        lag_limit_ms: 5000,
        out_of_sync_since_generation: 4,
        name: "dr-site".into(),
        out_of_sync,
    };
    vec![site(Some(bitmap(1000, 99))).encode(), site(None).encode()]
}

fn dedup_tables() -> Vec<Vec<u8>> {
    let entries =
        (0..5u64).map(|k| DedupEntry { hash: u128::from(k) << 70 | 0xABCD, address: 77 + k, references: 1 + k as u32 });
    vec![
        DedupTable { sequence: 1, entries: entries.collect() }.encode(),
        DedupTable { sequence: 2, entries: vec![] }.encode(),
    ]
}

fn main() {
    let corpus = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let sets: [(&str, Vec<Vec<u8>>); 7] = [
        ("superblock_decode", superblocks()),
        ("catalog_decode", catalogs()),
        ("control_block_decode", control_blocks()),
        ("index_page_decode", index_pages()),
        ("sort_cursor_decode", sort_cursors()),
        ("site_record_decode", site_records()),
        ("dedup_table_decode", dedup_tables()),
    ];
    for (target, seeds) in sets {
        let dir = Path::new(&corpus).join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (n, bytes) in seeds.iter().enumerate() {
            // libFuzzer's default -max_len is 4096: keep seeds within it (the padding after
            // the checksummed length is ignored by every decoder).
            let keep = bytes.len().min(4096);
            std::fs::write(dir.join(format!("seed-{n}")), &bytes[..keep]).expect("write a seed");
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
}
