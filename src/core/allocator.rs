//! Space allocation in host-write-size units (seed 001 mechanism 5, JNL area table 203).
//!
//! Two allocators, one per way the journal areas are used:
//!
//! - [`SegmentAllocator`] for the **history** area: inter-generational and merge difference
//!   data are written by the sort and the merge into the *next contiguous segments* (S10004,
//!   S11007), and freed per generation in any order (JNL delete program, retention, merge).
//!   Free space is a set of address-ordered extents, coalesced on free; allocation is first-fit
//!   at the lowest address, which keeps each generation contiguous and the history area
//!   address-ordered (so it streams, and could be tiered to tape as seed 001 embodiment 5 says).
//! - [`RingAllocator`] for the **journal** (online update difference data): elements are
//!   appended and whole generations are released oldest first once sorted, so the area is a
//!   ring of monotonic virtual positions `tail..head`.
//!
//! Cost: allocation scans the free extents from the lowest address and `largest_free` visits
//! them all, so both are linear in the number of free extents. That number stays small because
//! history is freed a whole generation (one or a few extents) at a time and frees coalesce; an
//! allocator over millions of fragments would want a size index beside the address map.
//!
//! Both report a [`CapacityStatus`] against a threshold, table 203's "insufficient capacity
//! when free space < threshold" status.
//!
//! Neither persists anything: at open, the engine rebuilds them from the catalog
//! ([`SegmentAllocator::reserve`], [`RingAllocator::from_state`]).

use std::collections::BTreeMap;
use std::fmt;

/// A run of `units` consecutive units starting at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub start: u64,
    pub units: u64,
}

impl Extent {
    pub fn new(start: u64, units: u64) -> Self {
        Extent { start, units }
    }

    /// One past the last unit. Saturates: an extent whose end overflows is out of range of
    /// every allocator anyway.
    pub fn end(self) -> u64 {
        self.start.saturating_add(self.units)
    }

    pub fn range(self) -> std::ops::Range<u64> {
        self.start..self.end()
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "units {}..{} ({} units)", self.start, self.end(), self.units)
    }
}

/// Table 203's status of an area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityStatus {
    Normal,
    /// Free space is below the threshold: the engine should merge, age out or refuse.
    InsufficientCapacity,
}

/// Why space could not be allocated, freed or reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error(
        "no room for {requested} contiguous units: {free} units are free but the largest free run is {largest_free} units"
    )]
    NoSpace { requested: u64, largest_free: u64, free: u64 },
    #[error("cannot free {extent}: some of it is already free (freed twice, or never allocated)")]
    DoubleFree { extent: Extent },
    #[error("cannot reserve {extent}: some of it is already in use")]
    Overlap { extent: Extent },
    #[error("{extent} lies outside the area of {capacity} units")]
    OutOfRange { extent: Extent, capacity: u64 },
    #[error("an extent of zero units cannot be allocated, freed or reserved")]
    Empty,
    #[error(
        "journal ring state is impossible: tail {tail}, head {head} over {capacity} units (needs tail <= head <= tail + capacity, capacity > 0)"
    )]
    BadRingState { capacity: u64, tail: u64, head: u64 },
}

/// Address-ordered first-fit allocator over units `[0, capacity)` of the history area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentAllocator {
    capacity: u64,
    /// Free extents, start → units; never adjacent (coalesced), never empty.
    free: BTreeMap<u64, u64>,
    free_units: u64,
    threshold_units: u64,
}

impl SegmentAllocator {
    /// An allocator with every unit of `[0, capacity)` free.
    pub fn new(capacity: u64) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        SegmentAllocator { capacity, free, free_units: capacity, threshold_units: 0 }
    }

    /// Reports [`CapacityStatus::InsufficientCapacity`] while fewer than `units` are free.
    pub fn with_threshold(mut self, units: u64) -> Self {
        self.threshold_units = units;
        self
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn free_units(&self) -> u64 {
        self.free_units
    }

    pub fn used_units(&self) -> u64 {
        self.capacity - self.free_units
    }

    /// Length of the largest free extent: the most one [`allocate`](Self::allocate) can give.
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    pub fn threshold(&self) -> u64 {
        self.threshold_units
    }

    pub fn status(&self) -> CapacityStatus {
        if self.free_units < self.threshold_units {
            CapacityStatus::InsufficientCapacity
        } else {
            CapacityStatus::Normal
        }
    }

    /// Free extents in address order.
    pub fn free_extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.free.iter().map(|(start, units)| Extent::new(*start, *units))
    }

    /// `count` contiguous units at the lowest address that has them.
    pub fn allocate(&mut self, count: u64) -> Result<Extent, AllocError> {
        if count == 0 {
            return Err(AllocError::Empty);
        }
        let found = self.free.iter().find(|(_, units)| **units >= count).map(|(start, units)| (*start, *units));
        let Some((start, units)) = found else {
            return Err(AllocError::NoSpace {
                requested: count,
                largest_free: self.largest_free(),
                free: self.free_units,
            });
        };
        self.free.remove(&start);
        if units > count {
            self.free.insert(start + count, units - count);
        }
        self.free_units -= count;
        self.check();
        Ok(Extent::new(start, count))
    }

    /// Up to `count` units from the lowest free extent: for a caller that can write a
    /// generation in pieces when no single run is long enough. Fails only when nothing is free.
    pub fn allocate_at_most(&mut self, count: u64) -> Result<Extent, AllocError> {
        if count == 0 {
            return Err(AllocError::Empty);
        }
        let Some((&start, &units)) = self.free.iter().next() else {
            return Err(AllocError::NoSpace { requested: count, largest_free: 0, free: 0 });
        };
        let taken = Extent::new(start, units.min(count));
        self.reserve(taken)?;
        Ok(taken)
    }

    /// Returns `extent` to free space, merging it with free neighbours. Refuses an extent any
    /// unit of which is already free.
    pub fn free(&mut self, extent: Extent) -> Result<(), AllocError> {
        self.check_range(extent)?;
        let (mut start, mut units) = (extent.start, extent.units);
        // The free extent starting at or before ours must end at or before our start.
        if let Some((&before, &before_units)) = self.free.range(..=extent.start).next_back() {
            if before + before_units > extent.start {
                return Err(AllocError::DoubleFree { extent });
            }
            if before + before_units == extent.start {
                start = before;
                units += before_units;
            }
        }
        // The next free extent must start at or after our end.
        if let Some((&after, &after_units)) = self.free.range(extent.start..).next() {
            if after < extent.end() {
                return Err(AllocError::DoubleFree { extent });
            }
            if after == extent.end() {
                self.free.remove(&after);
                units += after_units;
            }
        }
        if start != extent.start {
            // Coalesced with the extent before: it grows in place.
            *self.free.get_mut(&start).expect("predecessor exists") = units;
        } else {
            self.free.insert(start, units);
        }
        self.free_units += extent.units;
        self.check();
        Ok(())
    }

    /// Marks `extent` used, when rebuilding from the catalog at open. Refuses an extent any
    /// unit of which is already used.
    pub fn reserve(&mut self, extent: Extent) -> Result<(), AllocError> {
        self.check_range(extent)?;
        let Some((&start, &units)) = self.free.range(..=extent.start).next_back() else {
            return Err(AllocError::Overlap { extent });
        };
        if start + units < extent.end() {
            return Err(AllocError::Overlap { extent });
        }
        self.free.remove(&start);
        if extent.start > start {
            self.free.insert(start, extent.start - start);
        }
        if start + units > extent.end() {
            self.free.insert(extent.end(), start + units - extent.end());
        }
        self.free_units -= extent.units;
        self.check();
        Ok(())
    }

    fn check_range(&self, extent: Extent) -> Result<(), AllocError> {
        if extent.units == 0 {
            return Err(AllocError::Empty);
        }
        match extent.start.checked_add(extent.units) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(AllocError::OutOfRange { extent, capacity: self.capacity }),
        }
    }

    /// Invariants, in debug builds: extents in range, non-empty, not adjacent, sum = free.
    fn check(&self) {
        if cfg!(debug_assertions) {
            let mut previous_end = None;
            let mut sum = 0;
            for (&start, &units) in &self.free {
                assert!(units > 0 && start + units <= self.capacity);
                if let Some(end) = previous_end {
                    assert!(start > end, "free extents overlap or touch");
                }
                previous_end = Some(start + units);
                sum += units;
            }
            assert_eq!(sum, self.free_units);
        }
    }
}

/// FIFO allocator over a ring of `capacity` units: the journal. Positions are *virtual* and
/// only grow; the unit on the device is `virtual % capacity`. Units `[tail, head)` are in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAllocator {
    capacity: u64,
    tail: u64,
    head: u64,
    threshold_units: u64,
}

impl RingAllocator {
    /// An empty ring of `capacity` units (at least one).
    pub fn new(capacity: u64) -> Result<Self, AllocError> {
        RingAllocator::from_state(capacity, 0, 0)
    }

    /// A ring rebuilt from the positions the catalog recorded.
    pub fn from_state(capacity: u64, tail: u64, head: u64) -> Result<Self, AllocError> {
        if capacity == 0 || tail > head || head - tail > capacity {
            return Err(AllocError::BadRingState { capacity, tail, head });
        }
        Ok(RingAllocator { capacity, tail, head, threshold_units: 0 })
    }

    /// Reports [`CapacityStatus::InsufficientCapacity`] while fewer than `units` are free.
    pub fn with_threshold(mut self, units: u64) -> Self {
        self.threshold_units = units;
        self
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Oldest virtual position still in use.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Next virtual position to be appended.
    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn used(&self) -> u64 {
        self.head - self.tail
    }

    pub fn free(&self) -> u64 {
        self.capacity - self.used()
    }

    pub fn status(&self) -> CapacityStatus {
        if self.free() < self.threshold_units {
            CapacityStatus::InsufficientCapacity
        } else {
            CapacityStatus::Normal
        }
    }

    /// Appends `count` units and returns the virtual position of the first. The run may wrap
    /// the end of the ring: see [`physical_runs`](Self::physical_runs).
    pub fn append(&mut self, count: u64) -> Result<u64, AllocError> {
        if count == 0 {
            return Err(AllocError::Empty);
        }
        if count > self.free() {
            // Runs may wrap, so all free space is one run.
            return Err(AllocError::NoSpace { requested: count, largest_free: self.free(), free: self.free() });
        }
        let start = self.head;
        self.head = self.head.checked_add(count).expect("virtual journal positions do not reach 2^64");
        Ok(start)
    }

    /// Releases every unit before `new_tail` (a generation sorted and no longer needed).
    pub fn release_to(&mut self, new_tail: u64) {
        assert!(
            self.tail <= new_tail && new_tail <= self.head,
            "release to {new_tail} outside the journal's used positions {}..{}",
            self.tail,
            self.head
        );
        self.tail = new_tail;
    }

    /// The device unit of virtual position `virtual_position`.
    pub fn physical(&self, virtual_position: u64) -> u64 {
        virtual_position % self.capacity
    }

    /// The device runs `(physical start, length)` of `count` units from virtual position
    /// `virtual_start`, in order: one run, or two when they wrap the end of the ring.
    pub fn physical_runs(&self, virtual_start: u64, count: u64) -> PhysicalRuns {
        assert!(count <= self.capacity, "{count} units do not fit a ring of {} units", self.capacity);
        PhysicalRuns { capacity: self.capacity, next: self.physical(virtual_start), remaining: count }
    }
}

/// Iterator of [`RingAllocator::physical_runs`].
#[derive(Debug, Clone)]
pub struct PhysicalRuns {
    capacity: u64,
    next: u64,
    remaining: u64,
}

impl Iterator for PhysicalRuns {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.remaining == 0 {
            return None;
        }
        let length = self.remaining.min(self.capacity - self.next);
        let run = (self.next, length);
        self.remaining -= length;
        self.next = (self.next + length) % self.capacity;
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocates_lowest_address_first_and_coalesces() {
        let mut allocator = SegmentAllocator::new(100);
        let a = allocator.allocate(10).unwrap();
        let b = allocator.allocate(20).unwrap();
        let c = allocator.allocate(30).unwrap();
        assert_eq!((a, b, c), (Extent::new(0, 10), Extent::new(10, 20), Extent::new(30, 30)));
        allocator.free(b).unwrap();
        // First fit: a 5-unit request goes into the hole left by b, not after c.
        assert_eq!(allocator.allocate(5).unwrap(), Extent::new(10, 5));
        allocator.free(Extent::new(10, 5)).unwrap();
        allocator.free(a).unwrap();
        allocator.free(c).unwrap();
        assert_eq!(allocator.free_extents().collect::<Vec<_>>(), vec![Extent::new(0, 100)]);
        assert_eq!(allocator.free_units(), 100);
    }

    #[test]
    fn no_space_names_free_and_largest_run() {
        let mut allocator = SegmentAllocator::new(10);
        let a = allocator.allocate(4).unwrap();
        allocator.allocate(2).unwrap();
        allocator.free(a).unwrap();
        let error = allocator.allocate(5).unwrap_err();
        assert_eq!(error, AllocError::NoSpace { requested: 5, largest_free: 4, free: 8 });
        assert_eq!(
            error.to_string(),
            "no room for 5 contiguous units: 8 units are free but the largest free run is 4 units"
        );
        assert_eq!(allocator.allocate_at_most(5).unwrap(), Extent::new(0, 4));
        assert_eq!(allocator.allocate_at_most(5).unwrap(), Extent::new(6, 4));
        assert!(matches!(allocator.allocate_at_most(1), Err(AllocError::NoSpace { free: 0, .. })));
    }

    #[test]
    fn double_free_overlap_and_range_are_refused() {
        let mut allocator = SegmentAllocator::new(50);
        let a = allocator.allocate(10).unwrap();
        allocator.free(a).unwrap();
        assert_eq!(allocator.free(a), Err(AllocError::DoubleFree { extent: a }));
        allocator.reserve(Extent::new(20, 5)).unwrap();
        assert_eq!(allocator.free(Extent::new(18, 5)), Err(AllocError::DoubleFree { extent: Extent::new(18, 5) }));
        assert_eq!(allocator.reserve(Extent::new(24, 2)), Err(AllocError::Overlap { extent: Extent::new(24, 2) }));
        assert!(matches!(allocator.reserve(Extent::new(45, 10)), Err(AllocError::OutOfRange { .. })));
        assert!(matches!(allocator.free(Extent::new(u64::MAX, 2)), Err(AllocError::OutOfRange { .. })));
        assert_eq!(allocator.allocate(0), Err(AllocError::Empty));
        assert_eq!(allocator.used_units(), 5);
        assert!(allocator.free(a).unwrap_err().to_string().contains("units 0..10"));
    }

    #[test]
    fn status_follows_the_threshold() {
        let mut allocator = SegmentAllocator::new(100).with_threshold(30);
        assert_eq!(allocator.status(), CapacityStatus::Normal);
        let e = allocator.allocate(70).unwrap();
        assert_eq!(allocator.status(), CapacityStatus::Normal);
        allocator.allocate(1).unwrap();
        assert_eq!(allocator.status(), CapacityStatus::InsufficientCapacity);
        allocator.free(e).unwrap();
        assert_eq!(allocator.status(), CapacityStatus::Normal);
    }

    #[test]
    fn ring_wraps_and_releases_in_order() {
        let mut ring = RingAllocator::new(10).unwrap().with_threshold(3);
        assert_eq!(ring.append(6).unwrap(), 0);
        assert_eq!(ring.append(2).unwrap(), 6);
        assert_eq!(ring.status(), CapacityStatus::InsufficientCapacity);
        assert!(matches!(ring.append(3), Err(AllocError::NoSpace { requested: 3, free: 2, .. })));
        ring.release_to(6);
        let start = ring.append(5).unwrap();
        assert_eq!(start, 8);
        assert_eq!(ring.physical_runs(start, 5).collect::<Vec<_>>(), vec![(8, 2), (0, 3)]);
        assert_eq!(ring.physical(start + 4), 2);
        assert_eq!((ring.tail(), ring.head(), ring.used(), ring.free()), (6, 13, 7, 3));
        assert_eq!(ring.physical_runs(10, 10).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(ring.physical_runs(3, 0).count(), 0);
    }

    #[test]
    fn ring_state_is_validated() {
        assert!(RingAllocator::from_state(0, 0, 0).is_err());
        assert!(RingAllocator::from_state(10, 5, 4).is_err());
        assert!(RingAllocator::from_state(10, 5, 16).is_err());
        let ring = RingAllocator::from_state(10, 5, 15).unwrap();
        assert_eq!(ring.free(), 0);
    }

    #[test]
    #[should_panic(expected = "outside the journal's used positions")]
    fn ring_release_beyond_head_is_a_bug() {
        let mut ring = RingAllocator::new(10).unwrap();
        ring.append(3).unwrap();
        ring.release_to(4);
    }

    /// The model: one bool per unit, true when used.
    fn model_free_run(model: &[bool], count: u64) -> Option<u64> {
        let mut run = 0;
        for (unit, used) in model.iter().enumerate() {
            run = if *used { 0 } else { run + 1 };
            if run == count {
                return Some(unit as u64 + 1 - count);
            }
        }
        None
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u64),
        Free(usize),
        FreeArbitrary(u64, u64),
        Reserve(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..20).prop_map(Op::Allocate),
            2 => (0usize..64).prop_map(Op::Free),
            1 => (0u64..130, 1u64..10).prop_map(|(s, n)| Op::FreeArbitrary(s, n)),
            1 => (0u64..130, 1u64..10).prop_map(|(s, n)| Op::Reserve(s, n)),
        ]
    }

    proptest! {
        /// Against a Vec<bool>: allocations never overlap, are the lowest fitting run, the
        /// accounting is exact, freeing coalesces, and freeing unallocated space is refused.
        #[test]
        fn segment_allocator_matches_a_bool_model(capacity in 1u64..120, ops in proptest::collection::vec(op(), 1..80)) {
            let mut allocator = SegmentAllocator::new(capacity);
            let mut model = vec![false; capacity as usize];
            let mut live: Vec<Extent> = Vec::new();
            for op in ops {
                match op {
                    Op::Allocate(count) => {
                        let expected = model_free_run(&model, count);
                        match allocator.allocate(count) {
                            Ok(extent) => {
                                prop_assert_eq!(Some(extent.start), expected);
                                prop_assert_eq!(extent.units, count);
                                for unit in extent.range() {
                                    prop_assert!(!model[unit as usize], "overlap at {}", unit);
                                    model[unit as usize] = true;
                                }
                                live.push(extent);
                            }
                            Err(AllocError::NoSpace { .. }) => prop_assert_eq!(expected, None),
                            Err(other) => prop_assert!(false, "unexpected {}", other),
                        }
                    }
                    Op::Free(index) => {
                        if !live.is_empty() {
                            let extent = live.swap_remove(index % live.len());
                            allocator.free(extent).unwrap();
                            for unit in extent.range() { model[unit as usize] = false; }
                        }
                    }
                    Op::FreeArbitrary(start, units) => {
                        let extent = Extent::new(start, units);
                        let result = allocator.free(extent);
                        if extent.end() > capacity {
                            prop_assert!(matches!(result, Err(AllocError::OutOfRange { .. })), "{:?}", result);
                        } else if extent.range().any(|u| !model[u as usize]) {
                            prop_assert_eq!(result, Err(AllocError::DoubleFree { extent }));
                        } else {
                            prop_assert!(result.is_ok());
                            for unit in extent.range() { model[unit as usize] = false; }
                            // Part of some live extents is now free: forget those, they may not be freed again.
                            live.retain(|l| l.end() <= extent.start || l.start >= extent.end());
                        }
                    }
                    Op::Reserve(start, units) => {
                        let extent = Extent::new(start, units);
                        let result = allocator.reserve(extent);
                        if extent.end() > capacity {
                            prop_assert!(matches!(result, Err(AllocError::OutOfRange { .. })), "{:?}", result);
                        } else if extent.range().any(|u| model[u as usize]) {
                            prop_assert_eq!(result, Err(AllocError::Overlap { extent }));
                        } else {
                            prop_assert!(result.is_ok());
                            for unit in extent.range() { model[unit as usize] = true; }
                            live.push(extent);
                        }
                    }
                }
                let free = model.iter().filter(|u| !**u).count() as u64;
                prop_assert_eq!(allocator.free_units(), free);
                prop_assert_eq!(allocator.used_units(), capacity - free);
                // Coalesced: the free extents are exactly the maximal free runs of the model.
                let mut runs = Vec::new();
                let mut unit = 0;
                while unit < model.len() {
                    if model[unit] { unit += 1; continue; }
                    let start = unit;
                    while unit < model.len() && !model[unit] { unit += 1; }
                    runs.push(Extent::new(start as u64, (unit - start) as u64));
                }
                prop_assert_eq!(allocator.largest_free(), runs.iter().map(|r| r.units).max().unwrap_or(0));
                prop_assert_eq!(allocator.free_extents().collect::<Vec<_>>(), runs);
            }
        }

        /// Against a Vec<bool> of ring units: appended runs never overlap live units, release
        /// frees exactly the oldest units, and the physical runs cover exactly the appended units.
        #[test]
        fn ring_allocator_matches_a_bool_model(capacity in 1u64..40, ops in proptest::collection::vec((any::<bool>(), 1u64..15), 1..100)) {
            let mut ring = RingAllocator::new(capacity).unwrap();
            let mut model = vec![false; capacity as usize];
            let mut generations = std::collections::VecDeque::new();
            for (append, amount) in ops {
                if append {
                    match ring.append(amount) {
                        Ok(start) => {
                            let mut covered = 0;
                            for (physical, length) in ring.physical_runs(start, amount) {
                                prop_assert!(physical + length <= capacity);
                                for unit in physical..physical + length {
                                    prop_assert!(!model[unit as usize], "overlap at {}", unit);
                                    model[unit as usize] = true;
                                }
                                covered += length;
                            }
                            prop_assert_eq!(covered, amount);
                            generations.push_back((start, amount));
                        }
                        Err(AllocError::NoSpace { free, .. }) => prop_assert!(amount > free),
                        Err(other) => prop_assert!(false, "unexpected {}", other),
                    }
                } else if let Some((start, count)) = generations.pop_front() {
                    prop_assert_eq!(start, ring.tail());
                    ring.release_to(start + count);
                    for v in start..start + count { model[ring.physical(v) as usize] = false; }
                }
                let used = model.iter().filter(|u| **u).count() as u64;
                prop_assert_eq!(ring.used(), used);
                prop_assert_eq!(ring.free(), capacity - used);
                let rebuilt = RingAllocator::from_state(capacity, ring.tail(), ring.head()).unwrap();
                prop_assert_eq!(rebuilt, ring);
            }
        }
    }
}
