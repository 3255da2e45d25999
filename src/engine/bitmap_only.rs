//! Journal-full policy "bitmap-only" (seed 001 FIG 36, S36001–S36006; ARCHITECTURE §6).
//!
//! While the journal has no room, writes of the open generation go to the base only and set
//! their blocks' bits in the open generation's bitmap, made durable (group commit, FUA pages of
//! the journal's `OpenBitmap` area) before the base write, so the base never holds data that
//! neither the element index nor the bitmap names (the rule of FORMAT §14.3, widened). A block
//! whose bit is set is written to the base only until it is **resynced**: when journal space
//! frees (the sort finished a generation, or at open), a background task takes the block's unit
//! lock, copies it from the base into the open generation's journal (a new element, or its
//! existing one) and clears the bit once the element's index entry is durable. The volume is
//! back to journaling when the bitmap is empty.
//!
//! A **marker seals a generation only with an empty bitmap**: it waits, host writes held, while
//! the sort frees space and the resync empties the bitmap, or is refused with
//! [`EngineError::BitmapTracked`] when nothing can free enough space. So sealed generations never
//! depend on the base, and the sort, merges, restores and R-VOLs are unchanged. (The patent's
//! alternative — seal with the bitmap and let the sort copy from the base behind a
//! copy-before-write barrier, FIG 21 — is not built; docs/DESIGN.md says why.)
//!
//! Crash safety: a bit is durable before its base write; a bit is cleared only once the block
//! is in the index durably, and a durable bit of a block in the index is harmless because
//! recovery copies every indexed block of the open generation from the base anyway (FORMAT
//! §14.4). Open therefore reloads the pages of the open generation and drops the bits of
//! indexed blocks; what is left is resynced as space allows.

use std::sync::Arc;
use std::task::Poll;

use crate::core::bitmap::DifferenceBitmap;
use crate::core::checksum::crc32c;
use crate::core::format::open_bitmap::{self, OpenBitmapPage, BLOCKS_PER_PAGE, WORDS_PER_PAGE};
use crate::core::format::superblock::JournalFullPolicy;
use crate::device::IoError;

use super::io::{run_bounded, ControlIo, HostOwner, Role};
use super::meta::{IndexSet, Meta, PageState};
use super::volume::{HostRef, Shared, SharedRef};
use super::EngineError;

/// Blocks one resync step copies from the base into the journal.
const RESYNC_BATCH: usize = 64;
/// Resync copies in flight at once.
const RESYNC_IN_FLIGHT: usize = 16;
/// Set bits one resync step looks at before giving up for now (locked blocks, no space).
const RESYNC_SCAN: usize = 4096;

/// Counters of the bitmap-only mode (part of the volume's status).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BitmapCounters {
    /// Host writes that went to the base only, tracked by the bitmap.
    pub bitmap_writes: u64,
    /// Group commits of bitmap pages, and the pages they wrote.
    pub bitmap_commits: u64,
    pub bitmap_pages_written: u64,
    /// Blocks copied from the base into the journal once space freed.
    pub bitmap_resynced_blocks: u64,
    /// Markers refused because the bitmap could not be emptied.
    pub bitmap_markers_refused: u64,
}

/// A group commit of bitmap pages in flight.
pub(crate) struct BitmapCommit {
    /// `sets` when the commit started: every bit set before is durable when it completes.
    pub upto: u64,
    pub pending: u32,
    pub pages: Vec<(usize, u8, u64)>,
    pub error: Option<IoError>,
}

/// The open generation's bitmap of blocks whose current content is in the base only.
pub(crate) struct OpenBitmap {
    pub bits: DifferenceBitmap,
    /// Set bits.
    pub tracked: u64,
    /// Generation the bits (and the pages written) belong to: the open one.
    pub generation: u64,
    /// Per page: sequence and slot of its newest copy in this generation.
    pub pages: Vec<PageState>,
    /// Pages changed since they were last written.
    pub dirty: IndexSet,
    /// Bits newly set so far (monotonic): a write waits until `durable_sets` reaches the value
    /// after its own bits were set.
    pub sets: u64,
    pub durable_sets: u64,
    pub commit: Option<BitmapCommit>,
    /// Host writes waiting for their bits to be durable (hot-path ids).
    pub waiting: Vec<usize>,
    pub resync_running: bool,
    /// Space freed (or the volume opened, or a marker waits): try a resync.
    pub resync_due: bool,
    /// Where the next resync step starts looking (round robin over the volume).
    pub resync_cursor: u64,
    pub counters: BitmapCounters,
}

impl OpenBitmap {
    pub fn new(volume_blocks: u64, generation: u64) -> Self {
        OpenBitmap {
            bits: DifferenceBitmap::new(volume_blocks),
            tracked: 0,
            generation,
            pages: vec![PageState::default(); open_bitmap::pages_for(volume_blocks) as usize],
            dirty: IndexSet::default(),
            sets: 0,
            durable_sets: 0,
            commit: None,
            waiting: Vec::new(),
            resync_running: false,
            resync_due: false,
            resync_cursor: 0,
            counters: BitmapCounters::default(),
        }
    }

    /// Sets `block`'s bit; true when it was not set.
    pub fn set(&mut self, block: u64) -> bool {
        if self.bits.set(block) {
            return false;
        }
        self.tracked += 1;
        self.sets += 1;
        self.dirty.insert((block / BLOCKS_PER_PAGE) as usize);
        true
    }

    pub fn clear(&mut self, block: u64) {
        if self.bits.clear(block) {
            self.tracked -= 1;
            self.dirty.insert((block / BLOCKS_PER_PAGE) as usize);
        }
    }

    /// Any of `blocks` tracked (its content in the base only)?
    pub fn tracks_any(&self, mut blocks: std::ops::Range<u64>) -> bool {
        self.tracked > 0 && blocks.any(|b| self.bits.test(b))
    }

    /// The next generation opens (a marker sealed this one, with an empty bitmap): pages of
    /// the old generation stop counting, nothing is written.
    pub fn reset(&mut self, generation: u64) {
        assert_eq!(self.tracked, 0, "a generation is sealed only with an empty bitmap");
        assert!(self.commit.is_none() && self.waiting.is_empty(), "no bitmap write in flight at a seal");
        self.generation = generation;
        self.pages.fill(PageState::default());
        self.dirty.drain_sorted();
        self.durable_sets = self.sets;
    }

    /// Encoded page `page` with the next sequence, and the slot it goes to.
    pub fn next_page(&self, page: usize) -> (u8, u64, Vec<u8>) {
        let state = self.pages[page];
        let slot = state.newest_slot.map_or(0, |slot| 1 - slot);
        let first = page * WORDS_PER_PAGE;
        let words = self.bits.words();
        let last = (first + WORDS_PER_PAGE).min(words.len());
        let encoded = OpenBitmapPage {
            sequence: state.sequence + 1,
            generation: self.generation,
            page: page as u64,
            words: words[first..last].to_vec(),
        }
        .encode();
        (slot, state.sequence + 1, encoded)
    }
}

impl Meta {
    /// Whether a write the journal has no room for goes to the base only (policy bitmap-only).
    pub fn bitmap_only(&self) -> bool {
        self.journal_full_policy() == JournalFullPolicy::BitmapOnly && self.open_bitmap.is_some()
    }

    /// Room in the journal for one more element of the open generation (segment and index).
    fn room_for_one(&self) -> bool {
        let per_page = self.entries_per_page();
        self.ring.free() > 0 && (self.open.blocks.len() % per_page != 0 || self.pages.free() > 0)
    }
}

/// Whether a marker may seal now as far as the bitmap goes: `Ready(Ok)` when it is empty and no
/// resync runs, `Pending` while the resync or the sort can still empty it, `Ready(Err)` when
/// nothing can.
pub(crate) fn poll_sealable(s: &mut Shared) -> Poll<Result<(), EngineError>> {
    let sort_will_free = !s.meta.sealed.is_empty()
        && s.options.sort.automatic
        && !s.sort_paused
        && s.sort_error.is_none()
        && s.failed.is_none();
    let room = s.meta.room_for_one();
    let meta = &mut s.meta;
    let Some(bitmap) = meta.open_bitmap.as_mut() else { return Poll::Ready(Ok(())) };
    if bitmap.tracked == 0 && !bitmap.resync_running && bitmap.commit.is_none() {
        return Poll::Ready(Ok(()));
    }
    if let Some(failed) = &s.failed {
        return Poll::Ready(Err(EngineError::Failed(failed.clone())));
    }
    if bitmap.resync_running || bitmap.commit.is_some() {
        return Poll::Pending;
    }
    if room {
        bitmap.resync_due = true;
        return Poll::Pending;
    }
    if sort_will_free {
        return Poll::Pending; // The sort's freed space sets `resync_due`.
    }
    // Stuck unless every tracked block is in the index already (its element is rewritten in
    // place, no space needed). One pass over the bitmap, only on this path.
    let needed = bitmap.bits.iter_ones().filter(|b| !meta.open.entry_of.contains(*b)).count() as u64;
    if needed == 0 {
        bitmap.resync_due = true;
        return Poll::Pending;
    }
    bitmap.counters.bitmap_markers_refused += 1;
    Poll::Ready(Err(EngineError::BitmapTracked {
        generation: meta.open.generation,
        tracked: bitmap.tracked,
        needed,
        free: meta.ring.free(),
        capacity: meta.ring.capacity(),
    }))
}

/// Should the volume start a resync task now? (Space the sort freed and the poll loop has not
/// seen yet counts as due.)
pub(crate) fn resync_wanted(s: &Shared) -> bool {
    s.meta.open_bitmap.as_ref().is_some_and(|b| (b.resync_due || s.space_freed) && b.tracked > 0 && !b.resync_running)
        && !s.stopping
        && s.failed.is_none()
}

/// One block of a resync step: its element (entry of the open generation).
struct ResyncCopy {
    block: u64,
    entry: usize,
}

/// Copies tracked blocks from the base into the open generation's journal while there is
/// room, clearing their bits (FIG 36's "read from the P-VOL", here into the journal).
pub(crate) async fn run_resync(shared: SharedRef, io: ControlIo<HostRef>) {
    loop {
        let batch = pick_batch(&shared);
        if batch.is_empty() {
            break;
        }
        let copied = copy_batch(&shared, &io, &batch).await;
        let durable = match copied {
            Ok(()) => wait_index_durable(&shared, &batch).await,
            Err(error) => Err(error),
        };
        let mut s = shared.borrow_mut();
        for copy in &batch {
            s.hot.unlock_unit(copy.block);
        }
        match durable {
            Ok(()) => {
                let bitmap = s.meta.open_bitmap.as_mut().expect("resync runs with a bitmap");
                for copy in &batch {
                    bitmap.clear(copy.block);
                }
                bitmap.counters.bitmap_resynced_blocks += batch.len() as u64;
            }
            Err(error) => {
                // The bits stay set (the base still holds the data); writes stop until reopen.
                s.failed.get_or_insert(format!("bitmap resync failed: {error}"));
                break;
            }
        }
    }
    let mut s = shared.borrow_mut();
    let bitmap = s.meta.open_bitmap.as_mut().expect("resync runs with a bitmap");
    bitmap.resync_running = false;
}

/// Takes the unit locks and journal elements of up to [`RESYNC_BATCH`] tracked blocks.
fn pick_batch(shared: &SharedRef) -> Vec<ResyncCopy> {
    let mut s = shared.borrow_mut();
    let s = &mut *s;
    if s.stopping || s.failed.is_some() {
        return Vec::new();
    }
    let meta = &mut s.meta;
    let per_page = meta.entries_per_page();
    let Some(bitmap) = meta.open_bitmap.as_mut() else { return Vec::new() };
    let mut batch = Vec::new();
    let mut cursor = bitmap.resync_cursor;
    let mut wrapped = false;
    for _ in 0..RESYNC_SCAN {
        if batch.len() == RESYNC_BATCH {
            break;
        }
        let block = match bitmap.bits.next_one(cursor) {
            Some(block) => block,
            None if !wrapped && cursor > 0 => {
                wrapped = true;
                cursor = 0;
                continue;
            }
            None => break,
        };
        if wrapped && block >= bitmap.resync_cursor {
            break; // Looked at every set bit once.
        }
        cursor = block + 1;
        if !s.hot.try_lock_unit(&meta.open.entry_of, block) {
            continue; // A host write has it; the next step comes back to it.
        }
        let entry = match meta.open.entry_of.get(block) {
            Some(entry) => entry as usize,
            None => {
                let entries_after = meta.open.blocks.len() + 1;
                let pages_needed = entries_after.div_ceil(per_page).saturating_sub(meta.open.pages.len());
                if meta.ring.free() == 0 || (pages_needed > 0 && meta.pages.free() == 0) {
                    s.hot.unlock_unit(block);
                    continue;
                }
                if pages_needed > 0 {
                    meta.pages.append(1).expect("page space checked");
                    meta.open.pages.push(PageState::default());
                }
                let segment = meta.ring.append(1).expect("journal space checked");
                let entry = meta.open.blocks.len();
                debug_assert_eq!(segment, meta.open.element_start + entry as u64);
                // The checksum follows once the element is copied (the page is then stale
                // if a commit wrote it meanwhile).
                meta.open.blocks.push(block);
                meta.open.crcs.push(0);
                meta.open.entry_of.insert(block, entry as u32);
                entry
            }
        };
        batch.push(ResyncCopy { block, entry });
    }
    bitmap.resync_cursor = cursor;
    if batch.is_empty() {
        bitmap.resync_due = false;
    }
    batch
}

/// Reads each block from the base and writes it to its journal element; sets the checksums.
async fn copy_batch(shared: &SharedRef, io: &ControlIo<HostRef>, batch: &[ResyncCopy]) -> Result<(), EngineError> {
    let (unit, lbas) = {
        let s = shared.borrow();
        let meta = &s.meta;
        let lbas: Vec<(u64, u64)> = batch
            .iter()
            .map(|c| (meta.volume_lba(0, c.block), meta.segment_lba(meta.open.element_start + c.entry as u64)))
            .collect();
        (meta.unit_bytes() as usize, lbas)
    };
    let copies = lbas.into_iter().map(|(base_lba, journal_lba)| async move {
        let data = io.read(Role::Base, base_lba, unit).await?;
        let crc = crc32c(&data.to_vec());
        io.write(Role::Journal, journal_lba, Arc::new(data), false).await?;
        Ok::<u32, EngineError>(crc)
    });
    let crcs = run_bounded(copies, RESYNC_IN_FLIGHT).await?;
    let mut s = shared.borrow_mut();
    let written_upto = s.hot.index_written_upto(&s.meta);
    let meta = &mut s.meta;
    let per_page = meta.entries_per_page();
    for (copy, crc) in batch.iter().zip(crcs) {
        meta.open.set_crc(copy.entry, crc, written_upto, per_page);
    }
    Ok(())
}

/// Waits until the batch's index entries are durable (the hot path's group commit).
async fn wait_index_durable(shared: &SharedRef, batch: &[ResyncCopy]) -> Result<(), EngineError> {
    let needed = batch.iter().map(|c| c.entry + 1).max().unwrap_or(0);
    std::future::poll_fn(|_| {
        let s = shared.borrow();
        if let Some(failed) = &s.failed {
            Poll::Ready(Err(EngineError::Failed(failed.clone())))
        } else if s.meta.open.durable >= needed {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Reads the open generation's bitmap back at open (pages of other generations do not count)
/// and drops the bits of blocks in its element index, whose elements recovery has just copied
/// from the base.
pub(crate) async fn load<O: HostOwner>(io: &ControlIo<O>, meta: &mut Meta) -> Result<(), EngineError> {
    if meta.journal.open_bitmap.is_none() {
        if meta.journal_full_policy() == JournalFullPolicy::BitmapOnly {
            return Err(EngineError::Damaged(
                "journal-full policy bitmap-only but the journal has no bitmap area".into(),
            ));
        }
        return Ok(());
    }
    if meta.mode() != crate::core::format::superblock::JournalMode::Latest {
        // Format refuses the combination: "all" mode keeps every write's version.
        return Err(EngineError::Unsupported("journal-full policy bitmap-only with journal mode \"all\"".into()));
    }
    let volume_blocks = meta.shape.volume_blocks;
    let generation = meta.open.generation;
    let mut bitmap = OpenBitmap::new(volume_blocks, generation);
    let pages = bitmap.pages.len() as u64;
    let journal = &meta.journal;
    let reads = (0..pages).map(|page| {
        let offset = journal.open_bitmap_slot_bytes(page, 0).expect("area checked");
        async move {
            let bytes = io.read_bytes(Role::Journal, offset, 2 * open_bitmap::SLOT_BYTES).await?;
            Ok::<_, EngineError>((page, bytes))
        }
    });
    let mut words = Vec::with_capacity(volume_blocks.div_ceil(64) as usize);
    for (page, bytes) in run_bounded(reads, 16).await? {
        let expected_words = open_bitmap::words_in_page(volume_blocks, page);
        let (slot_a, slot_b) = bytes.split_at(open_bitmap::SLOT_BYTES);
        let belongs = |p: &OpenBitmapPage| p.generation == generation && p.page == page;
        let a = OpenBitmapPage::decode(slot_a).ok().filter(belongs);
        let b = OpenBitmapPage::decode(slot_b).ok().filter(belongs);
        let chosen = match (a, b) {
            (Some(a), Some(b)) if b.sequence > a.sequence => Some((b, 1u8)),
            (Some(a), _) => Some((a, 0u8)),
            (None, Some(b)) => Some((b, 1u8)),
            (None, None) => None,
        };
        match chosen {
            Some((found, slot)) => {
                if found.words.len() != expected_words {
                    return Err(EngineError::Damaged(format!(
                        "open bitmap page {page} of generation {generation} holds {} words, the volume needs {expected_words}",
                        found.words.len()
                    )));
                }
                bitmap.pages[page as usize] = PageState { sequence: found.sequence, newest_slot: Some(slot) };
                words.extend(found.words);
            }
            None => words.extend(std::iter::repeat_n(0, expected_words)),
        }
    }
    bitmap.bits = DifferenceBitmap::from_words(volume_blocks, words)
        .map_err(|e| EngineError::Damaged(format!("open bitmap of generation {generation}: {e}")))?;
    bitmap.tracked = bitmap.bits.count_ones();
    let indexed: Vec<u64> = bitmap.bits.iter_ones().filter(|b| meta.open.entry_of.contains(*b)).collect();
    for block in indexed {
        bitmap.clear(block);
    }
    bitmap.resync_due = bitmap.tracked > 0;
    meta.open_bitmap = Some(bitmap);
    Ok(())
}
