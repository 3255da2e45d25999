//! Base-only writes of the journal-full policy bitmap-only (seed 001 FIG 36, S36001–S36006):
//! the write sets its blocks' bits in the open generation's bitmap, waits until a group commit
//! has made them durable (one FUA page write per changed bitmap page, for every write that set
//! bits meanwhile — the same shape as the element index's commit), then goes to the base alone.
//! The resync that brings such blocks back into the journal is `engine/bitmap_only.rs`.

use std::sync::Arc;

use crate::core::unit_index::UnitIndex;
use crate::device::{Completion, IoBuffers, Operation};

use super::super::bitmap_only::BitmapCommit;
use super::super::io::Role;
use super::super::meta::{Meta, PageState};
use super::{HostRef, HotPath, HotStep, WriteState};

impl HotPath {
    /// Takes `unit`'s lock for the resync if no write holds it (`entry_of` is the open
    /// generation's: a rewrite's lock is there).
    pub(crate) fn try_lock_unit(&mut self, entry_of: &UnitIndex, unit: u64) -> bool {
        if self.locked_units.contains_key(&unit) || entry_of.is_locked(unit) {
            return false;
        }
        self.locked_units.insert(unit, RESYNC_HOLDER);
        true
    }

    /// Releases a lock taken by [`try_lock_unit`](Self::try_lock_unit).
    pub(crate) fn unlock_unit(&mut self, unit: u64) {
        let holder = self.locked_units.remove(&unit);
        debug_assert_eq!(holder, Some(RESYNC_HOLDER), "unit {unit} was locked by the resync");
    }

    /// Entries of the open generation whose index page has been (or is being) written: a
    /// checksum changed below this makes its page stale.
    pub(crate) fn index_written_upto(&self, meta: &Meta) -> usize {
        self.commit.as_ref().map_or(meta.open.durable, |commit| commit.upto)
    }
}

/// The holder recorded for units the resync has locked (no host write has this id).
const RESYNC_HOLDER: usize = usize::MAX;

impl HotStep<'_> {
    /// Sets the write's bits; the base write follows once they are durable.
    pub(super) fn write_base_only(&mut self, id: usize) {
        let widening = self.shared.hot.writes[id].widening;
        let bitmap = self.shared.meta.open_bitmap.as_mut().expect("base-only writes need the bitmap");
        for unit in widening.units() {
            bitmap.set(unit);
        }
        bitmap.counters.bitmap_writes += 1;
        let needed = bitmap.sets;
        if needed > bitmap.durable_sets {
            bitmap.waiting.push(id);
            let write = &mut self.shared.hot.writes[id];
            write.needed_bitmap_sets = needed;
            write.state = WriteState::WaitingBitmap;
            self.maybe_commit_bitmap();
        } else {
            self.submit_base(id);
        }
    }

    /// Writes the changed bitmap pages, if bits wait to be durable and no commit is in flight.
    pub(crate) fn maybe_commit_bitmap(&mut self) {
        if self.shared.failed.is_some() {
            return;
        }
        let meta = &mut self.shared.meta;
        let Some(bitmap) = meta.open_bitmap.as_mut() else { return };
        if bitmap.commit.is_some() || bitmap.sets <= bitmap.durable_sets {
            return;
        }
        let dirty = bitmap.dirty.drain_sorted();
        debug_assert!(!dirty.is_empty(), "bits set since the last commit dirtied their pages");
        let mut pages = Vec::with_capacity(dirty.len());
        let mut writes = Vec::with_capacity(dirty.len());
        for page in dirty {
            let (slot, sequence, bytes) = bitmap.next_page(page);
            let offset = meta.journal.open_bitmap_slot_bytes(page as u64, slot).expect("a bitmap has its area");
            let mut buffer = self.hub.alloc(Role::Journal, bytes.len());
            buffer.as_mut_slice().copy_from_slice(&bytes);
            writes.push((offset / meta.block_size[1], Arc::new(IoBuffers::single(buffer))));
            pages.push((page, slot, sequence));
        }
        bitmap.counters.bitmap_commits += 1;
        bitmap.counters.bitmap_pages_written += pages.len() as u64;
        bitmap.commit = Some(BitmapCommit { upto: bitmap.sets, pending: writes.len() as u32, pages, error: None });
        for (offset_blocks, buffers) in writes {
            self.hub.submit(
                Role::Journal,
                Operation::Write { offset_blocks, buffers, fua: true },
                Some(HostRef::BitmapCommit),
            );
        }
    }

    /// One page of a bitmap commit completed; when all have, the writes it covered go on.
    pub(super) fn on_bitmap_commit(&mut self, completion: Completion) {
        let bitmap = self.shared.meta.open_bitmap.as_mut().expect("a bitmap commit needs the bitmap");
        let commit = bitmap.commit.as_mut().expect("a bitmap commit is in flight");
        commit.pending -= 1;
        if let Err(error) = completion.result {
            commit.error.get_or_insert(*error);
        }
        if commit.pending > 0 {
            return;
        }
        let commit = bitmap.commit.take().expect("checked above");
        if let Some(error) = commit.error {
            // Bits not durable: their writes must not reach the base, and none may follow.
            self.shared.failed.get_or_insert(format!("open bitmap write failed: {error}"));
            let waiting = std::mem::take(&mut bitmap.waiting);
            self.fail_uncommitted(waiting, &error);
            return;
        }
        for (page, slot, sequence) in commit.pages {
            bitmap.pages[page] = PageState { sequence, newest_slot: Some(slot) };
        }
        debug_assert!(commit.upto >= bitmap.durable_sets);
        bitmap.durable_sets = commit.upto;
        let durable = bitmap.durable_sets;
        let waiting = std::mem::take(&mut bitmap.waiting);
        for id in waiting {
            if self.shared.hot.writes[id].needed_bitmap_sets <= durable {
                self.submit_base(id);
            } else {
                self.shared.meta.open_bitmap.as_mut().expect("still there").waiting.push(id);
            }
        }
        self.maybe_commit_bitmap();
    }
}
