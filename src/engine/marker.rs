//! Marker (seed 001 FIG 9, S9001–S9005): seal the open generation and open the next.
//!
//! Host writes submitted after the marker are held while every write submitted before it
//! completes (so the generation holds exactly the writes that preceded the marker); then the
//! elements rewritten since their checksum was computed are read back and checksummed (the
//! write path leaves that to the marker, FORMAT.md §9.1), the pages whose element checksums
//! changed are rewritten, base and journal are flushed (the generation's elements and the
//! base's image are durable), and the journal catalog is written with the generation sealed
//! and the next one open — that write is the seal. Held writes then go to the new generation.
//! The hold lasts one drain, one read of the rewritten elements, one flush and one catalog
//! write.

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use crate::device::IoBuffers;

use super::io::{run_bounded, ControlIo, Role};
use super::meta::{OpenGeneration, PageState, SealedGeneration};
use super::volume::{elapsed_us, write_journal_catalog, HostRef, MarkerHandle, SharedRef};
use super::{now_ns, EngineError};

pub(crate) async fn run_marker(
    shared: SharedRef,
    io: ControlIo<HostRef>,
    comment: String,
    barrier: u64,
    handle: MarkerHandle,
) {
    wait_for_turn(&shared, barrier).await;
    let result = mark(&shared, &io, comment, barrier).await;
    end_turn(&shared, barrier);
    if let Err(error) = &result {
        let mut s = shared.borrow_mut();
        if matches!(error, EngineError::Io(_)) {
            s.failed.get_or_insert(format!("marker failed: {error}"));
        }
    }
    handle.set(result);
}

/// Markers and rollbacks run one at a time, in call order: `barrier` is first of the holds.
pub(crate) async fn wait_for_turn(shared: &SharedRef, barrier: u64) {
    std::future::poll_fn(
        |_| {
            if shared.borrow().holds.front() == Some(&barrier) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        },
    )
    .await;
}

/// Releases the writes `barrier` held (to the next hold, if any).
pub(crate) fn end_turn(shared: &SharedRef, barrier: u64) {
    let released = shared.borrow_mut().holds.pop_front();
    assert_eq!(released, Some(barrier), "the running hold is the first");
}

/// Seals the open generation with every write submitted before `barrier`; the caller holds
/// the writes at or after it (its turn, [`wait_for_turn`]).
pub(crate) async fn mark(
    shared: &SharedRef,
    io: &ControlIo<HostRef>,
    comment: String,
    barrier: u64,
) -> Result<u64, EngineError> {
    if comment.len() >= crate::core::format::catalog::COMMENT_BYTES || comment.contains('\0') {
        return Err(EngineError::Invalid(format!(
            "a marker comment is at most {} bytes of UTF-8 without NUL; this one has {} bytes",
            crate::core::format::catalog::COMMENT_BYTES - 1,
            comment.len()
        )));
    }
    let held_since = Instant::now();
    let result = seal(shared, io, comment, barrier).await;
    let mut s = shared.borrow_mut();
    if result.is_ok() {
        let hold = elapsed_us(held_since);
        s.control.markers += 1;
        s.control.marker_hold_last_us = hold;
        s.control.marker_hold_max_us = s.control.marker_hold_max_us.max(hold);
    }
    result
}

async fn seal(shared: &SharedRef, io: &ControlIo<HostRef>, comment: String, barrier: u64) -> Result<u64, EngineError> {
    {
        let s = shared.borrow();
        if let Some(failed) = &s.failed {
            return Err(EngineError::Failed(failed.clone()));
        }
        let limit = s.meta.options.max_online_generations as usize;
        if s.meta.sealed.len() + 2 > limit {
            return Err(EngineError::TooManyGenerations { count: s.meta.sealed.len(), limit: limit - 1 });
        }
    }
    // Drain: every write submitted before the marker completes in this generation; then
    // blocks the journal had no room for (policy bitmap-only) come into it, or the marker is
    // refused — a sealed generation never depends on the base (bitmap_only.rs).
    std::future::poll_fn(|_| {
        let mut s = shared.borrow_mut();
        // The idle checksum task stops at its next step once a hold is set (checksums.rs).
        if s.hot.writes_before(barrier) || s.hot.commit_in_flight() || s.checksums_running {
            return Poll::Pending;
        }
        super::bitmap_only::poll_sealable(&mut s)
    })
    .await?;

    super::checksums::checksum_pending(shared, io).await?;

    // Pages whose element checksums changed since they were written.
    let stale = {
        let mut s = shared.borrow_mut();
        let meta = &mut s.meta;
        let upto = meta.open.blocks.len();
        meta.open
            .stale_pages
            .drain_sorted()
            .into_iter()
            .map(|index| {
                let (page, slot, sequence, bytes) = meta.next_index_page(index, upto);
                (index, slot, sequence, meta.index_slot_bytes(page, slot), bytes)
            })
            .collect::<Vec<_>>()
    };
    let writes = stale.iter().map(|(_, _, _, offset, bytes)| {
        let mut buffer = io.alloc(Role::Journal, bytes.len());
        buffer.as_mut_slice().copy_from_slice(bytes);
        let lba = offset / io.block_size(Role::Journal);
        io.write(Role::Journal, lba, Arc::new(IoBuffers::single(buffer)), false)
    });
    run_bounded(writes, 32).await?;
    {
        let mut s = shared.borrow_mut();
        for (index, slot, sequence, _, _) in &stale {
            s.meta.open.pages[*index] = PageState { sequence: *sequence, newest_slot: Some(*slot) };
        }
    }
    let (base, journal) = (io.flush(Role::Base), io.flush(Role::Journal));
    base.await?;
    journal.await?;

    let generation = {
        let mut s = shared.borrow_mut();
        let meta = &mut s.meta;
        // One instant: the sealed generation ends when the next one opens.
        let sealed_ns = now_ns();
        // Writes of the generation were submitted before the barrier, later ones after; a
        // rollback's own writes carry the barrier itself (rollback.rs).
        let last_sequence =
            meta.open.versions.iter().map(|v| v.sequence).max().unwrap_or(0).max(barrier.saturating_sub(1));
        let mut next = OpenGeneration::new(meta.open.generation + 1, meta.ring.head(), meta.pages.head());
        next.opened_ns = sealed_ns;
        let open = std::mem::replace(&mut meta.open, next);
        if let Some(bitmap) = meta.open_bitmap.as_mut() {
            bitmap.reset(open.generation + 1);
        }
        debug_assert_eq!(open.durable, open.blocks.len(), "drained writes left every entry durable");
        debug_assert!(open.crc_pending.is_empty(), "every checksum was computed before the seal");
        debug_assert_eq!(open.entry_of.locked(), 0, "drained writes left no unit locked");
        meta.sealed.push_back(SealedGeneration {
            generation: open.generation,
            time_ns: sealed_ns,
            comment,
            element_start: open.element_start,
            page_start: open.page_start,
            page_count: open.pages.len() as u64,
            blocks: open.blocks,
            crcs: open.crcs,
            versions: open.versions,
            last_sequence,
            durable: false,
        });
        open.generation
    };
    write_journal_catalog(shared, io).await?;
    let mut s = shared.borrow_mut();
    let sealed = s.meta.sealed.back_mut().expect("sealed above");
    debug_assert_eq!(sealed.generation, generation);
    sealed.durable = true;
    Ok(generation)
}
