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
//! The index is one per volume and shared across merges, so it deduplicates across generations.
//! Encoding it to disk is the format layer's job (`format::records::DedupTable`, whose
//! [`DedupEntry`] this index yields and accepts): [`DedupIndex::entries`] and
//! [`DedupIndex::from_entries`] are the round trip.

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
}
