//! Element map: which blocks a generation holds and where each element is stored — the
//! in-memory form of a JNCB (seed 001 FIG 6, "second JNL management table": difference BM plus
//! one data-storage address per element) and of an R-VOL access table (FIG 13, table 209).
//!
//! Addresses are in the unit of the area that holds the elements (host-write-size units of the
//! history area). A generation written by the sort is contiguous in address order, so its
//! addresses are implied by the bitmap's rank and cost no table at all.

use super::bitmap::DifferenceBitmap;

/// How the elements of a map are addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// Element of the k-th set bit (ascending block order) is at `first + k`.
    Contiguous { first: u64 },
    /// Element of the k-th set bit is at `table[k]`; `table.len()` equals the population count.
    Explicit(Vec<u64>),
}

/// Bits of an explicit address reserved for flags; the address itself is the low 56 bits.
pub const ADDRESS_MASK: u64 = (1 << 56) - 1;
/// Flag on an explicit address: the element is shared through dedup (another map owns it).
pub const ADDRESS_SHARED: u64 = 1 << 63;
/// Bits 56..62 of an explicit address: reserved, always zero.
pub const ADDRESS_RESERVED: u64 = !(ADDRESS_MASK | ADDRESS_SHARED);

const RANK_STRIDE_WORDS: usize = 8;

#[derive(Clone, PartialEq, Eq)]
pub struct ElementMap {
    bitmap: DifferenceBitmap,
    addressing: Addressing,
    /// Population count before each stride of 8 words: O(1) rank for lookups.
    rank_index: Vec<u64>,
}

impl std::fmt::Debug for ElementMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElementMap")
            .field("bitmap", &self.bitmap)
            .field("contiguous", &matches!(self.addressing, Addressing::Contiguous { .. }))
            .finish()
    }
}

/// Why an element map cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElementMapError {
    #[error("address table has {table} entries but the bitmap has {ones} set bits")]
    TableLength { table: u64, ones: u64 },
    #[error("contiguous addresses from {first} for {count} elements pass 2^56")]
    ContiguousOverflow { first: u64, count: u64 },
    #[error("address {address:#x} of element {index} has reserved bits 56..62 set")]
    ReservedAddressBits { index: u64, address: u64 },
}

impl ElementMap {
    /// Builds a map; refuses an address table whose length is not the population count, a
    /// contiguous range that passes 2^56 (`first + count` overflowing or above
    /// `ADDRESS_MASK + 1`), and explicit addresses with reserved bits 56..62 set.
    pub fn new(bitmap: DifferenceBitmap, addressing: Addressing) -> Result<Self, ElementMapError> {
        check_addressing(&bitmap, &addressing)?;
        let rank_index = build_rank_index(&bitmap);
        Ok(ElementMap { bitmap, addressing, rank_index })
    }

    /// Re-checks what [`ElementMap::new`] checked (encoders assert it before writing).
    pub fn validate(&self) -> Result<(), ElementMapError> {
        check_addressing(&self.bitmap, &self.addressing)
    }

    /// A map with no elements over a volume of `blocks` blocks.
    pub fn empty(blocks: u64) -> Self {
        ElementMap::new(DifferenceBitmap::new(blocks), Addressing::Explicit(Vec::new()))
            .expect("an empty table matches an empty bitmap")
    }

    pub fn bitmap(&self) -> &DifferenceBitmap {
        &self.bitmap
    }

    pub fn addressing(&self) -> &Addressing {
        &self.addressing
    }

    pub fn len(&self) -> u64 {
        match &self.addressing {
            Addressing::Contiguous { .. } => self.bitmap.count_ones(),
            Addressing::Explicit(table) => table.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of blocks of the volume (bits of the bitmap).
    pub fn blocks(&self) -> u64 {
        self.bitmap.len()
    }

    /// Position of `block`'s element among the map's elements, if the block is present.
    pub fn rank_of(&self, block: u64) -> Option<u64> {
        if block >= self.bitmap.len() || !self.bitmap.test(block) {
            return None;
        }
        let word = (block / 64) as usize;
        let stride = word / RANK_STRIDE_WORDS;
        let words = self.bitmap.words();
        let mut rank = self.rank_index[stride];
        for w in &words[stride * RANK_STRIDE_WORDS..word] {
            rank += u64::from(w.count_ones());
        }
        let below = block % 64;
        if below != 0 {
            rank += u64::from((words[word] & ((1u64 << below) - 1)).count_ones());
        }
        Some(rank)
    }

    /// Raw stored address (with flags) of the element at `rank`.
    fn raw_at(&self, rank: u64) -> u64 {
        match &self.addressing {
            Addressing::Contiguous { first } => first + rank,
            Addressing::Explicit(table) => table[rank as usize],
        }
    }

    /// Address (flags stripped) of `block`'s element, if present.
    pub fn address_of(&self, block: u64) -> Option<u64> {
        self.rank_of(block).map(|rank| self.raw_at(rank) & ADDRESS_MASK)
    }

    /// Address with flags, if present.
    pub fn raw_address_of(&self, block: u64) -> Option<u64> {
        self.rank_of(block).map(|rank| self.raw_at(rank))
    }

    /// `(block, raw address)` for every element in ascending block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.bitmap.iter_ones().enumerate().map(move |(rank, block)| (block, self.raw_at(rank as u64)))
    }

    pub fn into_parts(self) -> (DifferenceBitmap, Addressing) {
        (self.bitmap, self.addressing)
    }
}

fn check_addressing(bitmap: &DifferenceBitmap, addressing: &Addressing) -> Result<(), ElementMapError> {
    let ones = bitmap.count_ones();
    match addressing {
        Addressing::Contiguous { first } => match first.checked_add(ones) {
            Some(end) if end <= ADDRESS_MASK + 1 => Ok(()),
            _ => Err(ElementMapError::ContiguousOverflow { first: *first, count: ones }),
        },
        Addressing::Explicit(table) => {
            if table.len() as u64 != ones {
                return Err(ElementMapError::TableLength { table: table.len() as u64, ones });
            }
            match table.iter().position(|address| address & ADDRESS_RESERVED != 0) {
                Some(index) => Err(ElementMapError::ReservedAddressBits { index: index as u64, address: table[index] }),
                None => Ok(()),
            }
        }
    }
}

fn build_rank_index(bitmap: &DifferenceBitmap) -> Vec<u64> {
    let words = bitmap.words();
    let mut index = Vec::with_capacity(words.len() / RANK_STRIDE_WORDS + 1);
    let mut total = 0u64;
    for chunk in words.chunks(RANK_STRIDE_WORDS) {
        index.push(total);
        total += chunk.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
    }
    index.push(total);
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_and_explicit_agree() {
        let mut bitmap = DifferenceBitmap::new(3000);
        for block in [0u64, 5, 63, 64, 511, 512, 1300, 2999] {
            bitmap.set(block);
        }
        let contiguous = ElementMap::new(bitmap.clone(), Addressing::Contiguous { first: 100 }).unwrap();
        let table: Vec<u64> = (0..8).map(|k| 100 + k).collect();
        let explicit = ElementMap::new(bitmap, Addressing::Explicit(table)).unwrap();
        for block in 0..3000 {
            assert_eq!(contiguous.address_of(block), explicit.address_of(block), "block {block}");
        }
        assert_eq!(contiguous.address_of(2999), Some(107));
        assert_eq!(contiguous.address_of(1), None);
        assert_eq!(contiguous.iter().collect::<Vec<_>>(), explicit.iter().collect::<Vec<_>>());
    }

    #[test]
    fn table_length_must_match() {
        let mut bitmap = DifferenceBitmap::new(10);
        bitmap.set(3);
        assert!(ElementMap::new(bitmap, Addressing::Explicit(vec![])).is_err());
    }

    #[test]
    fn contiguous_range_must_stay_below_2_pow_56() {
        let mut bitmap = DifferenceBitmap::new(10);
        bitmap.set(3);
        bitmap.set(7);
        let map = |first| ElementMap::new(bitmap.clone(), Addressing::Contiguous { first });
        assert!(map(ADDRESS_MASK - 1).is_ok(), "last element at 2^56 - 1");
        assert_eq!(
            map(ADDRESS_MASK).unwrap_err(),
            ElementMapError::ContiguousOverflow { first: ADDRESS_MASK, count: 2 }
        );
        assert!(map(u64::MAX - 1).is_err(), "first + count overflows u64");
        let empty = ElementMap::new(DifferenceBitmap::new(10), Addressing::Contiguous { first: ADDRESS_MASK + 1 });
        assert!(empty.is_ok(), "no element, nothing addressed");
    }

    #[test]
    fn explicit_reserved_bits_are_refused_and_the_shared_flag_allowed() {
        let mut bitmap = DifferenceBitmap::new(10);
        bitmap.set(3);
        bitmap.set(7);
        let map = |table: Vec<u64>| ElementMap::new(bitmap.clone(), Addressing::Explicit(table));
        assert!(map(vec![ADDRESS_MASK, 5 | ADDRESS_SHARED]).is_ok());
        for bit in 56..63 {
            assert_eq!(
                map(vec![1, 5 | 1 << bit]).unwrap_err(),
                ElementMapError::ReservedAddressBits { index: 1, address: 5 | 1 << bit },
                "bit {bit}"
            );
        }
    }
}
