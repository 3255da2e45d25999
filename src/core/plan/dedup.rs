//! Dedup index for merges (seed 001 embodiment 6, FIG 39/40, FIG 31A–D, S39001–39005).
//!
//! A content hash (xxh3-128) leads to candidate addresses; an element is shared only after a
//! byte compare confirms equal contents. Candidates with the same hash but different contents
//! form the collision chain (the patent's type-2 pointers, FIG 31C/D), kept here as the list of
//! addresses under one hash in insertion order.
//!
//! Instead of the patent's bidirectional type-3 pointers and save-area moves on deletion (FIG 41/42)
//! the index keeps a **reference count per stored address**: the number of live maps pointing at
//! the element, its owner included. A map records a shared element as `address | ADDRESS_SHARED`.
//! When a record is deleted each of its references is released; a unit whose count stays above
//! zero outlives its owner's record ("retained") until the last reference goes, and an address
//! whose count reaches zero leaves the index.
//!
//! [`DedupIndex`] is that counted model, pure, with its round trip to the reserved on-disk
//! dedup table (`format::records::DedupTable`); the core model test (`tests/core_model.rs`)
//! runs it. **The engine does not keep counts**: it derives references from the records' maps
//! when records leave ([`super::delete::plan_retention`]) and finds candidates with the
//! bounded, in-memory [`ContentIndex`] (a hint; ownership and a byte compare decide) — see
//! `engine::dedup` and DESIGN.md "Space".

use std::collections::HashMap;

use super::PlanError;
/// One stored element as the index knows it: the on-disk dedup table's entry.
pub use crate::core::format::records::DedupEntry;

/// xxh3-128 of an element's contents.
pub fn content_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// What to do with an element offered to the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupDecision {
    /// No stored element has these contents: write it, then [`DedupIndex::insert`] its address.
    Store,
    /// The element at this address has byte-equal contents: point at it, then
    /// [`DedupIndex::add_reference`].
    Share(u64),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupIndex {
    /// Hash → addresses with that hash, oldest first; more than one means a collision chain.
    chains: HashMap<u128, Vec<u64>>,
    /// Address → (hash, references).
    entries: HashMap<u64, (u128, u32)>,
    /// Sum over entries of (references − 1): elements not stored thanks to sharing.
    saved: u64,
}

impl DedupIndex {
    pub fn new() -> Self {
        DedupIndex::default()
    }

    /// Rebuilds the index from its entries, e.g. after decoding. Entries of one hash keep their
    /// order as candidates, as [`DedupIndex::entries`] yields them.
    pub fn from_entries(entries: impl IntoIterator<Item = DedupEntry>) -> Result<Self, PlanError> {
        let mut index = DedupIndex::new();
        for entry in entries {
            if entry.references == 0 {
                return Err(PlanError::ZeroReferences { address: entry.address });
            }
            index.insert(entry.hash, entry.address)?;
            index.entries.insert(entry.address, (entry.hash, entry.references));
            index.saved += u64::from(entry.references - 1);
        }
        Ok(index)
    }

    /// Every entry, grouped by hash in ascending hash order, candidates of one hash in chain
    /// order: deterministic, and [`DedupIndex::from_entries`] restores the same index.
    pub fn entries(&self) -> impl Iterator<Item = DedupEntry> + '_ {
        let mut hashes: Vec<u128> = self.chains.keys().copied().collect();
        hashes.sort_unstable();
        hashes.into_iter().flat_map(move |hash| {
            self.chains[&hash].iter().map(move |&address| DedupEntry {
                hash,
                address,
                references: self.entries[&address].1,
            })
        })
    }

    /// Candidate addresses for `hash`, oldest first.
    pub fn lookup(&self, hash: u128) -> impl Iterator<Item = u64> + '_ {
        self.chains.get(&hash).into_iter().flatten().copied()
    }

    /// Decides store-or-share for an element with `content` and `hash`: each candidate is read
    /// with `read` and compared byte for byte; the first equal one is shared. A hash collision
    /// (same hash, different bytes) moves on to the next candidate and never shares.
    pub fn offer<R: AsRef<[u8]>>(&self, hash: u128, content: &[u8], mut read: impl FnMut(u64) -> R) -> DedupDecision {
        self.offer_by(hash, |address| read(address).as_ref() == content)
    }

    /// [`DedupIndex::offer`] with the comparison left to the caller: `same(address)` must return
    /// true only when the stored element's bytes equal the offered ones.
    pub fn offer_by(&self, hash: u128, mut same: impl FnMut(u64) -> bool) -> DedupDecision {
        for address in self.lookup(hash) {
            if same(address) {
                return DedupDecision::Share(address);
            }
        }
        DedupDecision::Store
    }

    /// Adds a newly stored element (after [`DedupDecision::Store`]) with one reference, its
    /// owner's. It joins the end of its hash's chain.
    pub fn insert(&mut self, hash: u128, address: u64) -> Result<(), PlanError> {
        if self.entries.contains_key(&address) {
            return Err(PlanError::DuplicateDedupAddress { address });
        }
        self.entries.insert(address, (hash, 1));
        self.chains.entry(hash).or_default().push(address);
        Ok(())
    }

    /// One more map points at the element at `address`; returns its references.
    pub fn add_reference(&mut self, address: u64) -> Result<u32, PlanError> {
        let (_, references) = self.entries.get_mut(&address).ok_or(PlanError::UnknownDedupAddress { address })?;
        *references = references.checked_add(1).ok_or(PlanError::TooManyReferences { address })?;
        self.saved += 1;
        Ok(*references)
    }

    /// One map no longer points at the element at `address`; returns the references left. At zero
    /// the element leaves the index (its unit may be freed).
    pub fn release(&mut self, address: u64) -> Result<u32, PlanError> {
        let (hash, references) = self.entries.get_mut(&address).ok_or(PlanError::UnknownDedupAddress { address })?;
        *references -= 1;
        let (hash, left) = (*hash, *references);
        if left == 0 {
            self.entries.remove(&address);
            let chain = self.chains.get_mut(&hash).expect("every entry is on its hash's chain");
            chain.retain(|candidate| *candidate != address);
            if chain.is_empty() {
                self.chains.remove(&hash);
            }
        } else {
            self.saved -= 1;
        }
        Ok(left)
    }

    /// References to the element at `address`; 0 when the index does not hold it.
    pub fn references(&self, address: u64) -> u32 {
        self.entries.get(&address).map_or(0, |(_, references)| *references)
    }

    /// Elements dedup avoided storing: over all stored elements, references beyond the first.
    pub fn saved_elements(&self) -> u64 {
        self.saved
    }

    /// Stored elements the index knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Candidates an index keeps per hash (more than one only after a collision).
pub const CONTENT_CHAIN_MAX: usize = 4;

/// The volume-wide index of stored contents that merges consult to share an element with an
/// equal one in **another** record (embodiment 6 across records).
///
/// It is a hint, never an authority: an address it yields may have been freed, merged away or
/// reused since, so the engine shares only with an address a live record or a retained extent
/// owns, and only after a byte compare. That is what lets it live in memory only, bounded
/// (`capacity` addresses, oldest forgotten first), rebuilt from what the sort and merges write
/// after the volume opens — the allocator and the references never depend on it.
#[derive(Debug, Clone)]
pub struct ContentIndex {
    /// Hash → addresses stored with it, oldest first, at most [`CONTENT_CHAIN_MAX`].
    chains: HashMap<u128, Vec<u64>>,
    /// Insertion order, for forgetting the oldest; may name addresses already displaced.
    order: std::collections::VecDeque<(u128, u64)>,
    capacity: usize,
    addresses: usize,
}

impl ContentIndex {
    pub fn new(capacity: usize) -> Self {
        ContentIndex { chains: HashMap::new(), order: std::collections::VecDeque::new(), capacity, addresses: 0 }
    }

    /// Remembers that `address` holds contents with `hash`. A full chain forgets its oldest
    /// candidate; a full index forgets its oldest insertion.
    pub fn insert(&mut self, hash: u128, address: u64) {
        if self.capacity == 0 {
            return;
        }
        let chain = self.chains.entry(hash).or_default();
        if chain.contains(&address) {
            return;
        }
        if chain.len() == CONTENT_CHAIN_MAX {
            chain.remove(0);
            self.addresses -= 1;
        }
        chain.push(address);
        self.addresses += 1;
        self.order.push_back((hash, address));
        while self.order.len() > self.capacity {
            let (old_hash, old_address) = self.order.pop_front().expect("longer than capacity");
            self.forget(old_hash, old_address);
        }
    }

    /// Candidates for `hash`, newest first (the newest record is the likeliest to stay).
    pub fn candidates(&self, hash: u128) -> Vec<u64> {
        self.chains.get(&hash).map_or_else(Vec::new, |chain| chain.iter().rev().copied().collect())
    }

    /// Drops `address` from `hash`'s candidates (it proved stale).
    pub fn forget(&mut self, hash: u128, address: u64) {
        if let Some(chain) = self.chains.get_mut(&hash) {
            if let Some(at) = chain.iter().position(|a| *a == address) {
                chain.remove(at);
                self.addresses -= 1;
            }
            if chain.is_empty() {
                self.chains.remove(&hash);
            }
        }
    }

    /// Addresses the index holds.
    pub fn len(&self) -> usize {
        self.addresses
    }

    pub fn is_empty(&self) -> bool {
        self.addresses == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_contents_share_after_byte_compare() {
        // FIG 31A/B: A stored at x1, a second A shares x1.
        let mut store: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut index = DedupIndex::new();
        let a = b"contents A".to_vec();
        let hash = content_hash(&a);
        assert_eq!(index.offer(hash, &a, |addr| store[&addr].clone()), DedupDecision::Store);
        store.insert(10, a.clone());
        index.insert(hash, 10).unwrap();
        assert_eq!(index.offer(hash, &a, |addr| store[&addr].clone()), DedupDecision::Share(10));
        assert_eq!(index.add_reference(10).unwrap(), 2);
        assert_eq!(index.saved_elements(), 1);
    }

    /// FIG 31C/D: B has A's hash but different bytes. B must be stored (the byte compare refuses
    /// the share), joins the chain, and a second B finds it past A.
    #[test]
    fn a_hash_collision_chains_and_never_shares_different_contents() {
        let colliding_hash = 0xC0FFEE_u128;
        let mut store: HashMap<u64, &[u8]> = HashMap::new();
        let mut index = DedupIndex::new();
        let (a, b): (&[u8], &[u8]) = (b"AAAA", b"BBBB");
        store.insert(1, a);
        index.insert(colliding_hash, 1).unwrap();

        let mut compared = Vec::new();
        let decision = index.offer(colliding_hash, b, |addr| {
            compared.push(addr);
            store[&addr]
        });
        assert_eq!(decision, DedupDecision::Store, "different bytes under one hash must not share");
        assert_eq!(compared, vec![1]);
        store.insert(2, b);
        index.insert(colliding_hash, 2).unwrap();
        assert_eq!(index.lookup(colliding_hash).collect::<Vec<_>>(), vec![1, 2]);

        assert_eq!(index.offer(colliding_hash, b, |addr| store[&addr]), DedupDecision::Share(2));
        assert_eq!(index.offer(colliding_hash, a, |addr| store[&addr]), DedupDecision::Share(1));
        assert_eq!(index.offer(colliding_hash, b"CCCC", |addr| store[&addr]), DedupDecision::Store);
    }

    #[test]
    fn release_to_zero_removes_the_candidate() {
        let mut index = DedupIndex::new();
        index.insert(5, 100).unwrap();
        index.insert(5, 101).unwrap();
        index.add_reference(100).unwrap();
        assert_eq!(index.release(100).unwrap(), 1);
        assert_eq!(index.saved_elements(), 0);
        assert_eq!(index.release(100).unwrap(), 0);
        assert_eq!(index.references(100), 0);
        assert_eq!(index.lookup(5).collect::<Vec<_>>(), vec![101]);
        assert_eq!(index.release(100), Err(PlanError::UnknownDedupAddress { address: 100 }));
        assert_eq!(index.release(101).unwrap(), 0);
        assert!(index.is_empty());
        assert_eq!(index.lookup(5).count(), 0);
    }

    #[test]
    fn entries_round_trip_with_chain_order() {
        let mut index = DedupIndex::new();
        index.insert(9, 30).unwrap();
        index.insert(9, 20).unwrap();
        index.insert(3, 40).unwrap();
        index.add_reference(20).unwrap();
        index.add_reference(20).unwrap();
        let entries: Vec<_> = index.entries().collect();
        assert_eq!(
            entries,
            vec![
                DedupEntry { hash: 3, address: 40, references: 1 },
                DedupEntry { hash: 9, address: 30, references: 1 },
                DedupEntry { hash: 9, address: 20, references: 3 },
            ]
        );
        let rebuilt = DedupIndex::from_entries(entries).unwrap();
        assert_eq!(rebuilt, index);
        assert_eq!(rebuilt.saved_elements(), 2);
        assert_eq!(rebuilt.lookup(9).collect::<Vec<_>>(), vec![30, 20]);
    }

    #[test]
    fn from_entries_refuses_bad_input() {
        let zero = DedupEntry { hash: 1, address: 1, references: 0 };
        assert_eq!(DedupIndex::from_entries([zero]), Err(PlanError::ZeroReferences { address: 1 }));
        let one = DedupEntry { hash: 1, address: 1, references: 1 };
        assert_eq!(DedupIndex::from_entries([one, one]), Err(PlanError::DuplicateDedupAddress { address: 1 }));
    }

    #[test]
    fn content_hash_is_xxh3_128() {
        assert_eq!(content_hash(b"abc"), xxhash_rust::xxh3::xxh3_128(b"abc"));
        assert_ne!(content_hash(b"abc"), content_hash(b"abd"));
    }

    #[test]
    fn content_index_is_bounded_and_forgets_the_oldest() {
        let mut index = ContentIndex::new(3);
        index.insert(1, 10);
        index.insert(1, 10);
        index.insert(2, 20);
        index.insert(1, 11);
        assert_eq!(index.len(), 3);
        assert_eq!(index.candidates(1), vec![11, 10], "newest first");
        index.insert(3, 30);
        assert_eq!(index.len(), 3, "capacity holds");
        assert_eq!(index.candidates(1), vec![11], "the oldest insertion went first");
        index.forget(2, 20);
        assert!(index.candidates(2).is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn content_index_chains_are_bounded() {
        let mut index = ContentIndex::new(100);
        for address in 0..10 {
            index.insert(7, address);
        }
        assert_eq!(index.candidates(7), vec![9, 8, 7, 6]);
        assert_eq!(index.len(), CONTENT_CHAIN_MAX);
        assert!(ContentIndex::new(0).candidates(7).is_empty());
    }
}
