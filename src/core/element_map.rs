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
}

impl ElementMap {
    pub fn new(bitmap: DifferenceBitmap, addressing: Addressing) -> Result<Self, ElementMapError> {
        if let Addressing::Explicit(table) = &addressing {
            let ones = bitmap.count_ones();
            if table.len() as u64 != ones {
                return Err(ElementMapError::TableLength { table: table.len() as u64, ones });
            }
        }
        let rank_index = build_rank_index(&bitmap);
        Ok(ElementMap { bitmap, addressing, rank_index })
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
}
