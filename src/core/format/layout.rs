//! Where the areas of a journal or history device lie, and whether a device is big enough —
//! capacity planning (seed 001 table 203) with errors that name the numbers.
//!
//! Journal device: superblock ×2 | catalog A | catalog B | sites | [open bitmap] | element index |
//! elements (the open bitmap only with the journal-full policy bitmap-only).
//! History device: superblock ×2 | catalog A | catalog B | sort cursor ×2 | units.

use super::catalog::Catalog;
use super::control_block::ControlBlock;
use super::element_index::{entries_per_page, SLOT_BYTES};
use super::records::SiteRecord;
use super::superblock::{Area, AreaKind, JournalMode};
use super::METADATA_PAGE_BYTES;

const PAGE: u64 = METADATA_PAGE_BYTES as u64;
/// The journal must hold at least this many elements.
pub const MIN_JOURNAL_ELEMENTS: u64 = 64;
/// The most elements a journal has (a generation's entries are numbered in 31 bits, the
/// open generation's unit index keeps a lock bit beside them): a larger device leaves the rest
/// unused (8 TiB of elements at 4 KiB units, 1 TiB at 512 B).
pub const MAX_JOURNAL_ELEMENTS: u64 = crate::core::unit_index::MAX_ENTRY as u64 + 1;
/// The history must hold at least this many elements besides two full control blocks.
pub const MIN_HISTORY_ELEMENTS: u64 = 64;

/// What the layout depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeShape {
    pub host_write_size: u32,
    pub volume_blocks: u64,
}

impl VolumeShape {
    pub fn volume_bytes(&self) -> u64 {
        self.volume_blocks * u64::from(self.host_write_size)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutOptions {
    pub catalog_entries: u32,
    pub site_slots: u32,
    /// Online generations (open + sealed, not yet sorted) the journal can hold at once.
    pub max_online_generations: u32,
    pub mode: JournalMode,
    /// Reserve the open-generation bitmap area (journal-full policy bitmap-only, FIG 36).
    pub open_bitmap: bool,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            catalog_entries: super::catalog::DEFAULT_CAPACITY_ENTRIES,
            site_slots: 4,
            max_online_generations: 64,
            mode: JournalMode::Latest,
            open_bitmap: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalLayout {
    pub catalogs: [Area; 2],
    pub sites: Area,
    pub site_slot_bytes: u64,
    /// Pages of the open generation's bitmap, two slots each (policy bitmap-only only).
    pub open_bitmap: Option<Area>,
    pub index: Area,
    pub index_pages: u64,
    pub elements: Area,
    pub element_capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryLayout {
    pub catalogs: [Area; 2],
    pub sort_cursors: Area,
    pub units: Area,
    pub unit_count: u64,
}

impl JournalLayout {
    pub fn areas(&self) -> Vec<Area> {
        let mut areas = vec![self.catalogs[0], self.catalogs[1], self.sites];
        areas.extend(self.open_bitmap);
        areas.extend([self.index, self.elements]);
        areas
    }

    /// Byte offset of slot `slot` of open-bitmap page `page`.
    pub fn open_bitmap_slot_bytes(&self, page: u64, slot: u8) -> Option<u64> {
        let area = self.open_bitmap?;
        Some(area.start_bytes + (2 * page + u64::from(slot)) * SLOT_BYTES as u64)
    }

    /// Rebuilds the layout from a superblock's areas.
    pub fn from_areas(areas: &[Area], shape: &VolumeShape, mode: JournalMode) -> Option<Self> {
        let find = |kind| areas.iter().copied().find(|a: &Area| a.kind == kind);
        let index = find(AreaKind::ElementIndex)?;
        let elements = find(AreaKind::Elements)?;
        let sites = find(AreaKind::Sites)?;
        let open_bitmap = find(AreaKind::OpenBitmap);
        if open_bitmap.is_some_and(|a| a.length_bytes < open_bitmap_bytes(shape)) {
            return None;
        }
        let layout = JournalLayout {
            catalogs: [find(AreaKind::CatalogA)?, find(AreaKind::CatalogB)?],
            sites,
            site_slot_bytes: SiteRecord::slot_bytes(shape.volume_blocks) as u64,
            open_bitmap,
            index,
            index_pages: index.length_bytes / (2 * SLOT_BYTES as u64),
            elements,
            element_capacity: elements.length_bytes / u64::from(shape.host_write_size),
        };
        (layout.max_online_generations(mode) > 0 && layout.element_capacity <= MAX_JOURNAL_ELEMENTS).then_some(layout)
    }

    /// Online generations the index has room for: the pages beyond those the elements need
    /// (each generation starts a page of its own).
    pub fn max_online_generations(&self, mode: JournalMode) -> u64 {
        self.index_pages.saturating_sub(self.element_capacity.div_ceil(entries_per_page(mode) as u64))
    }
}

impl HistoryLayout {
    pub fn areas(&self) -> Vec<Area> {
        vec![self.catalogs[0], self.catalogs[1], self.sort_cursors, self.units]
    }

    pub fn from_areas(areas: &[Area], shape: &VolumeShape) -> Option<Self> {
        let find = |kind| areas.iter().copied().find(|a: &Area| a.kind == kind);
        let units = find(AreaKind::Units)?;
        Some(HistoryLayout {
            catalogs: [find(AreaKind::CatalogA)?, find(AreaKind::CatalogB)?],
            sort_cursors: find(AreaKind::SortCursors)?,
            units,
            unit_count: units.length_bytes / u64::from(shape.host_write_size),
        })
    }
}

/// A device too small for the volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("the journal device is {}, needs at least {} for a {} volume at {} B host write size (metadata plus {} elements)", human(*have), human(*need), human(*volume_bytes), host_write_size, MIN_JOURNAL_ELEMENTS)]
    JournalTooSmall { have: u64, need: u64, volume_bytes: u64, host_write_size: u32 },
    #[error("the history device is {}, needs at least {} for a {} volume at {} B host write size (two control blocks plus {} elements)", human(*have), human(*need), human(*volume_bytes), host_write_size, MIN_HISTORY_ELEMENTS)]
    HistoryTooSmall { have: u64, need: u64, volume_bytes: u64, host_write_size: u32 },
}

/// Bytes as a short human string: "512 B", "64 KiB", "1.5 GiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn align_up(value: u64, alignment: u64) -> u64 {
    value.div_ceil(alignment) * alignment
}

/// Bytes of the open-bitmap area: two slots per page of the volume's bitmap.
pub fn open_bitmap_bytes(shape: &VolumeShape) -> u64 {
    2 * super::open_bitmap::pages_for(shape.volume_blocks) * SLOT_BYTES as u64
}

type FixedAreas = (u64, [Area; 2], Area, u64, Option<Area>);

fn journal_fixed(shape: &VolumeShape, options: &LayoutOptions) -> FixedAreas {
    let catalog_bytes = Catalog::slot_bytes(options.catalog_entries) as u64;
    let a = Area { kind: AreaKind::CatalogA, start_bytes: 2 * PAGE, length_bytes: catalog_bytes };
    let b = Area { kind: AreaKind::CatalogB, start_bytes: a.end_bytes(), length_bytes: catalog_bytes };
    let site_slot_bytes = SiteRecord::slot_bytes(shape.volume_blocks) as u64;
    let sites = Area {
        kind: AreaKind::Sites,
        start_bytes: b.end_bytes(),
        length_bytes: 2 * site_slot_bytes * u64::from(options.site_slots),
    };
    let open_bitmap = options.open_bitmap.then(|| Area {
        kind: AreaKind::OpenBitmap,
        start_bytes: sites.end_bytes(),
        length_bytes: open_bitmap_bytes(shape),
    });
    (open_bitmap.unwrap_or(sites).end_bytes(), [a, b], sites, site_slot_bytes, open_bitmap)
}

fn journal_with_capacity(shape: &VolumeShape, options: &LayoutOptions, capacity: u64) -> JournalLayout {
    let (fixed_end, catalogs, sites, site_slot_bytes, open_bitmap) = journal_fixed(shape, options);
    let per_page = entries_per_page(options.mode) as u64;
    let index_pages = capacity.div_ceil(per_page) + u64::from(options.max_online_generations);
    let index = Area {
        kind: AreaKind::ElementIndex,
        start_bytes: fixed_end,
        length_bytes: index_pages * 2 * SLOT_BYTES as u64,
    };
    let unit = u64::from(shape.host_write_size);
    let elements_start = align_up(index.end_bytes(), unit.max(PAGE));
    let elements = Area { kind: AreaKind::Elements, start_bytes: elements_start, length_bytes: capacity * unit };
    JournalLayout {
        catalogs,
        sites,
        site_slot_bytes,
        open_bitmap,
        index,
        index_pages,
        elements,
        element_capacity: capacity,
    }
}

/// Device bytes a journal of `capacity` elements needs.
pub fn journal_bytes_for(shape: &VolumeShape, options: &LayoutOptions, capacity: u64) -> u64 {
    journal_with_capacity(shape, options, capacity).elements.end_bytes()
}

/// Lays out a journal device of `device_bytes`, as many elements as fit (at most
/// [`MAX_JOURNAL_ELEMENTS`]).
pub fn plan_journal(
    shape: &VolumeShape,
    options: &LayoutOptions,
    device_bytes: u64,
) -> Result<JournalLayout, CapacityError> {
    let need = journal_bytes_for(shape, options, MIN_JOURNAL_ELEMENTS);
    if device_bytes < need {
        return Err(CapacityError::JournalTooSmall {
            have: device_bytes,
            need,
            volume_bytes: shape.volume_bytes(),
            host_write_size: shape.host_write_size,
        });
    }
    // Each element costs its unit plus its share of two index slots; start from that estimate
    // and step down until the layout fits (a few steps at most). A step can undershoot (index
    // pages and the elements area's alignment are not paid per element), so then step up one
    // element at a time to the largest capacity that fits.
    let per_element = u64::from(shape.host_write_size) + 2 * SLOT_BYTES as u64 / entries_per_page(options.mode) as u64;
    let mut capacity = (device_bytes / per_element).max(MIN_JOURNAL_ELEMENTS);
    while journal_bytes_for(shape, options, capacity) > device_bytes {
        let over = journal_bytes_for(shape, options, capacity) - device_bytes;
        capacity -= (over / per_element).max(1);
    }
    while capacity < MAX_JOURNAL_ELEMENTS && journal_bytes_for(shape, options, capacity + 1) <= device_bytes {
        capacity += 1;
    }
    let capacity = capacity.min(MAX_JOURNAL_ELEMENTS);
    let layout = journal_with_capacity(shape, options, capacity);
    debug_assert!(layout.elements.end_bytes() <= device_bytes);
    Ok(layout)
}

/// A journal that holds a quarter of the volume's blocks (at least 1024 elements).
pub fn recommended_journal_bytes(shape: &VolumeShape, options: &LayoutOptions) -> u64 {
    journal_bytes_for(shape, options, (shape.volume_blocks / 4).max(1024))
}

fn history_fixed(options: &LayoutOptions) -> ([Area; 2], Area) {
    let catalog_bytes = Catalog::slot_bytes(options.catalog_entries) as u64;
    let a = Area { kind: AreaKind::CatalogA, start_bytes: 2 * PAGE, length_bytes: catalog_bytes };
    let b = Area { kind: AreaKind::CatalogB, start_bytes: a.end_bytes(), length_bytes: catalog_bytes };
    let cursors = Area { kind: AreaKind::SortCursors, start_bytes: b.end_bytes(), length_bytes: 2 * PAGE };
    ([a, b], cursors)
}

fn history_with_units(shape: &VolumeShape, options: &LayoutOptions, unit_count: u64) -> HistoryLayout {
    let (catalogs, sort_cursors) = history_fixed(options);
    let unit = u64::from(shape.host_write_size);
    let start = align_up(sort_cursors.end_bytes(), unit.max(PAGE));
    let units = Area { kind: AreaKind::Units, start_bytes: start, length_bytes: unit_count * unit };
    HistoryLayout { catalogs, sort_cursors, units, unit_count }
}

/// Units one full-volume control block with no address table occupies.
pub fn control_block_units(shape: &VolumeShape, explicit_elements: u64) -> u64 {
    ControlBlock::disk_bytes(shape.volume_blocks, explicit_elements).div_ceil(u64::from(shape.host_write_size))
}

pub fn history_bytes_for(shape: &VolumeShape, options: &LayoutOptions, unit_count: u64) -> u64 {
    history_with_units(shape, options, unit_count).units.end_bytes()
}

pub fn plan_history(
    shape: &VolumeShape,
    options: &LayoutOptions,
    device_bytes: u64,
) -> Result<HistoryLayout, CapacityError> {
    let minimum_units = 2 * control_block_units(shape, 0) + MIN_HISTORY_ELEMENTS;
    let need = history_bytes_for(shape, options, minimum_units);
    if device_bytes < need {
        return Err(CapacityError::HistoryTooSmall {
            have: device_bytes,
            need,
            volume_bytes: shape.volume_bytes(),
            host_write_size: shape.host_write_size,
        });
    }
    let start = history_with_units(shape, options, 0).units.start_bytes;
    let unit_count = (device_bytes - start) / u64::from(shape.host_write_size);
    Ok(history_with_units(shape, options, unit_count))
}

/// A history that holds half the volume's blocks plus 32 control blocks.
pub fn recommended_history_bytes(shape: &VolumeShape, options: &LayoutOptions) -> u64 {
    let units = (shape.volume_blocks / 2).max(MIN_HISTORY_ELEMENTS) + 32 * control_block_units(shape, 0);
    history_bytes_for(shape, options, units)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: VolumeShape = VolumeShape { host_write_size: 4096, volume_blocks: 16384 };

    #[test]
    fn journal_layout_fills_the_device_without_overlap() {
        const TIB_4K: VolumeShape = VolumeShape { host_write_size: 4096, volume_blocks: 1 << 28 };
        const SMALL_UNITS: VolumeShape = VolumeShape { host_write_size: 512, volume_blocks: 16 << 20 };
        let mut cases: Vec<(VolumeShape, u64)> =
            [2u64 << 20, 16 << 20, 64 << 20, (64 << 20) + 12345].into_iter().map(|bytes| (SHAPE, bytes)).collect();
        for shape in [TIB_4K, SMALL_UNITS] {
            for mode in [JournalMode::Latest, JournalMode::All] {
                let options = LayoutOptions { mode, ..LayoutOptions::default() };
                let recommended = recommended_journal_bytes(&shape, &options);
                let minimum = journal_bytes_for(&shape, &options, MIN_JOURNAL_ELEMENTS);
                for bytes in [minimum, minimum + 4095, recommended, recommended + 8191, recommended * 3 + 12345] {
                    cases.push((shape, bytes));
                }
            }
        }
        // Room for more elements than a generation can number: the capacity stops at the limit.
        cases.push((SMALL_UNITS, 2 << 40));
        for (shape, device_bytes) in cases {
            for (mode, open_bitmap) in
                [(JournalMode::Latest, false), (JournalMode::All, false), (JournalMode::Latest, true)]
            {
                let options = LayoutOptions { mode, open_bitmap, ..LayoutOptions::default() };
                let Ok(layout) = plan_journal(&shape, &options, device_bytes) else {
                    assert!(device_bytes < journal_bytes_for(&shape, &options, MIN_JOURNAL_ELEMENTS));
                    continue;
                };
                let here = format!("{shape:?} {mode:?} on {device_bytes} bytes");
                let areas = layout.areas();
                for pair in areas.windows(2) {
                    assert!(pair[0].end_bytes() <= pair[1].start_bytes, "{here}: {pair:?}");
                }
                assert!(layout.elements.end_bytes() <= device_bytes, "{here}");
                assert_eq!(layout.element_capacity == MAX_JOURNAL_ELEMENTS, device_bytes == 2 << 40, "{here}");
                assert_eq!(layout.elements.start_bytes % 4096, 0, "{here}");
                assert_eq!(layout.elements.start_bytes % u64::from(shape.host_write_size), 0, "{here}");
                // Adding one more element would not fit (the capacity is the largest possible).
                assert!(
                    layout.element_capacity == MAX_JOURNAL_ELEMENTS
                        || journal_bytes_for(&shape, &options, layout.element_capacity + 1) > device_bytes,
                    "{here}"
                );
                assert!(layout.index_pages * entries_per_page(mode) as u64 >= layout.element_capacity, "{here}");
                assert_eq!(JournalLayout::from_areas(&areas, &shape, mode).unwrap(), layout, "{here}");
                assert_eq!(layout.open_bitmap.is_some(), open_bitmap, "{here}");
                if let Some(area) = layout.open_bitmap {
                    assert!(area.end_bytes() <= layout.index.start_bytes, "{here}");
                }
                assert_eq!(layout.max_online_generations(mode), u64::from(options.max_online_generations), "{here}");
            }
        }
    }

    #[test]
    fn too_small_devices_are_refused_with_numbers() {
        let options = LayoutOptions::default();
        let error = plan_journal(&SHAPE, &options, 256 << 10).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("256 KiB") && message.contains("64 MiB volume") && message.contains("4096 B"),
            "{message}"
        );
        let error = plan_history(&SHAPE, &options, 300 << 10).unwrap_err();
        assert!(matches!(error, CapacityError::HistoryTooSmall { .. }));
    }

    #[test]
    fn history_layout_and_recommendations_fit() {
        let options = LayoutOptions::default();
        let bytes = recommended_history_bytes(&SHAPE, &options);
        let layout = plan_history(&SHAPE, &options, bytes).unwrap();
        assert!(layout.unit_count >= SHAPE.volume_blocks / 2);
        assert_eq!(HistoryLayout::from_areas(&layout.areas(), &SHAPE).unwrap(), layout);
        let journal = plan_journal(&SHAPE, &options, recommended_journal_bytes(&SHAPE, &options)).unwrap();
        assert_eq!(journal.element_capacity, 4096);
        assert_eq!(human(1536 << 20), "1.5 GiB");
    }
}
