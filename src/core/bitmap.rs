//! The difference bitmap (seed 001 "difference BM", FIG 4–6): one bit per host-write-size
//! block of the volume; a set bit means the block belongs to the generation. Iteration skips
//! all-zero 32-byte chunks, so sparse bitmaps scan near memory speed; dense ones cost a few
//! nanoseconds per set bit.
//!
//! Serialised form (`CHRNBMAP`, see `docs/FORMAT.md` §Difference bitmap): header, bit count,
//! population count, then the words little-endian.

use std::ops::Range;

use super::format::header::{seal, Header, HEADER_BYTES};
use super::format::{FormatError, Reader, Writer};

const WORD_BITS: u64 = 64;
const MAGIC: &[u8; 8] = b"CHRNBMAP";
const STRUCTURE: &str = "difference bitmap";
/// Bytes before the words in the serialised form: header, bit count, population count.
pub const BITMAP_PREFIX_BYTES: usize = HEADER_BYTES + 16;

#[derive(Clone, PartialEq, Eq)]
pub struct DifferenceBitmap {
    words: Vec<u64>,
    len: u64,
}

impl std::fmt::Debug for DifferenceBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DifferenceBitmap {{ len: {}, ones: {} }}", self.len, self.count_ones())
    }
}

fn words_for(len: u64) -> usize {
    usize::try_from(len.div_ceil(WORD_BITS)).expect("bitmap length fits in memory")
}

impl DifferenceBitmap {
    /// An empty bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        DifferenceBitmap { words: vec![0; words_for(len)], len }
    }

    /// Builds a bitmap from words; bits at or beyond `len` must be zero.
    pub fn from_words(len: u64, words: Vec<u64>) -> Result<Self, FormatError> {
        if words.len() != words_for(len) {
            return Err(FormatError::invalid(STRUCTURE, "words", "word count does not match the bit count"));
        }
        let bitmap = DifferenceBitmap { words, len };
        if bitmap.tail_garbage() {
            return Err(FormatError::invalid(STRUCTURE, "words", "bits set beyond the bit count"));
        }
        Ok(bitmap)
    }

    fn tail_garbage(&self) -> bool {
        let used = self.len % WORD_BITS;
        used != 0 && self.words.last().is_some_and(|w| w >> used != 0)
    }

    /// Number of bits (blocks of the volume).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    #[inline]
    fn locate(&self, bit: u64) -> (usize, u64) {
        assert!(bit < self.len, "bit {bit} out of range for a bitmap of {} bits", self.len);
        ((bit / WORD_BITS) as usize, 1u64 << (bit % WORD_BITS))
    }

    /// Sets `bit`; returns whether it was already set.
    #[inline]
    pub fn set(&mut self, bit: u64) -> bool {
        let (word, mask) = self.locate(bit);
        let was = self.words[word] & mask != 0;
        self.words[word] |= mask;
        was
    }

    /// Clears `bit`; returns whether it was set.
    #[inline]
    pub fn clear(&mut self, bit: u64) -> bool {
        let (word, mask) = self.locate(bit);
        let was = self.words[word] & mask != 0;
        self.words[word] &= !mask;
        was
    }

    #[inline]
    pub fn test(&self, bit: u64) -> bool {
        let (word, mask) = self.locate(bit);
        self.words[word] & mask != 0
    }

    /// Sets every bit in `range`.
    pub fn set_range(&mut self, range: Range<u64>) {
        self.apply_range(range, |word, mask| *word |= mask);
    }

    /// Clears every bit in `range`.
    pub fn clear_range(&mut self, range: Range<u64>) {
        self.apply_range(range, |word, mask| *word &= !mask);
    }

    fn apply_range(&mut self, range: Range<u64>, op: impl Fn(&mut u64, u64)) {
        assert!(range.end <= self.len, "range end {} beyond {} bits", range.end, self.len);
        let mut bit = range.start;
        while bit < range.end {
            let offset = bit % WORD_BITS;
            let take = (WORD_BITS - offset).min(range.end - bit);
            let mask = if take == WORD_BITS { u64::MAX } else { ((1u64 << take) - 1) << offset };
            op(&mut self.words[(bit / WORD_BITS) as usize], mask);
            bit += take;
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of set bits strictly below `bit` (the rank): the index of `bit`'s element in a
    /// generation whose elements are stored contiguously in address order.
    pub fn rank(&self, bit: u64) -> u64 {
        assert!(bit <= self.len);
        let whole = (bit / WORD_BITS) as usize;
        let mut count: u64 = self.words[..whole].iter().map(|w| u64::from(w.count_ones())).sum();
        let rest = bit % WORD_BITS;
        if rest != 0 {
            count += u64::from((self.words[whole] & ((1u64 << rest) - 1)).count_ones());
        }
        count
    }

    /// Set bits in ascending order.
    pub fn iter_ones(&self) -> Ones<'_> {
        self.iter_ones_in(0..self.len)
    }

    /// Set bits within `range`, ascending.
    pub fn iter_ones_in(&self, range: Range<u64>) -> Ones<'_> {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        if start == end {
            return Ones::new(&[], 0, 0, 0);
        }
        let first_word = (start / WORD_BITS) as usize;
        let end_word = end.div_ceil(WORD_BITS) as usize;
        let first_mask = u64::MAX << (start % WORD_BITS);
        let last_mask = if end % WORD_BITS == 0 { u64::MAX } else { (1u64 << (end % WORD_BITS)) - 1 };
        Ones::new(&self.words[first_word..end_word], first_word as u64 * WORD_BITS, first_mask, last_mask)
    }

    /// Calls `visit` with every set bit in ascending order: the fastest full walk (a plain
    /// loop over words, no iterator state carried between bits, no end check per bit since bits
    /// at or beyond `len` are always zero), and what the sort, merge and restore planners use.
    #[inline]
    pub fn for_each_one(&self, mut visit: impl FnMut(u64)) {
        let chunks = self.words.chunks_exact(SKIP_WORDS);
        let remainder = chunks.remainder();
        for (index, chunk) in chunks.enumerate() {
            // Sparse bitmaps are the common case: skip all-zero chunks with one test.
            if chunk.iter().fold(0, |any, word| any | word) == 0 {
                continue;
            }
            for (k, word) in chunk.iter().enumerate() {
                visit_word(*word, (index * SKIP_WORDS + k) as u64 * WORD_BITS, &mut visit);
            }
        }
        let first = self.words.len() - remainder.len();
        for (k, word) in remainder.iter().enumerate() {
            visit_word(*word, (first + k) as u64 * WORD_BITS, &mut visit);
        }
    }

    /// The words that have a bit set, as `(index of the word's first bit, word)`, ascending:
    /// for callers that process a word's bits together.
    pub fn nonzero_words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, word)| **word != 0)
            .map(|(index, word)| (index as u64 * WORD_BITS, *word))
    }

    /// First set bit at or after `bit`.
    pub fn next_one(&self, bit: u64) -> Option<u64> {
        if bit >= self.len {
            return None;
        }
        let first = (bit / WORD_BITS) as usize;
        let masked = self.words[first] & (u64::MAX << (bit % WORD_BITS));
        std::iter::once((first, masked))
            .chain(self.words[first + 1..].iter().copied().enumerate().map(|(k, word)| (first + 1 + k, word)))
            .find(|(_, word)| *word != 0)
            .map(|(index, word)| index as u64 * WORD_BITS + u64::from(word.trailing_zeros()))
    }

    /// `self |= other`.
    pub fn union_with(&mut self, other: &DifferenceBitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// `self &= !other`.
    pub fn difference_with(&mut self, other: &DifferenceBitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
    }

    /// `self &= other`.
    pub fn intersect_with(&mut self, other: &DifferenceBitmap) {
        self.check_same_len(other);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= *b;
        }
    }

    fn check_same_len(&self, other: &DifferenceBitmap) {
        assert_eq!(self.len, other.len, "bitmaps of different volumes");
    }

    /// Bytes of the serialised form.
    pub fn encoded_len(&self) -> usize {
        BITMAP_PREFIX_BYTES + self.words.len() * 8
    }

    /// Serialises into `bytes[..encoded_len()]`.
    pub fn encode_into(&self, bytes: &mut [u8]) {
        let length = self.encoded_len();
        assert!(bytes.len() >= length);
        Header::write(bytes, MAGIC, length, 0);
        let mut writer = Writer::at(bytes, HEADER_BYTES);
        writer.put_u64(self.len);
        writer.put_u64(self.count_ones());
        for word in &self.words {
            writer.put_u64(*word);
        }
        debug_assert_eq!(writer.position(), length);
        seal(bytes, length);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0; self.encoded_len()];
        self.encode_into(&mut bytes);
        bytes
    }

    /// Decodes a serialised bitmap from the start of `bytes`; trailing bytes are ignored.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (_, body) = Header::read(STRUCTURE, MAGIC, bytes, BITMAP_PREFIX_BYTES)?;
        let mut reader = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let len = reader.u64()?;
        let ones = reader.u64()?;
        let word_count = len.div_ceil(WORD_BITS);
        let expected = (BITMAP_PREFIX_BYTES as u64).checked_add(word_count.saturating_mul(8));
        if expected != Some(body.len() as u64) {
            return Err(FormatError::invalid(
                STRUCTURE,
                "bit count",
                format!("{len} bits do not fit {} bytes", body.len()),
            ));
        }
        let mut words = Vec::with_capacity(word_count as usize);
        for _ in 0..word_count {
            words.push(reader.u64()?);
        }
        let bitmap = DifferenceBitmap::from_words(len, words)?;
        if bitmap.count_ones() != ones {
            return Err(FormatError::invalid(STRUCTURE, "population count", "does not match the bits"));
        }
        Ok(bitmap)
    }
}

// Why walking set bits is a plain loop: on this project's bench machine (shared, baseline
// x86-64 target without BMI1/POPCNT) branch-free batch decoders (unrolled "trailing zeros,
// clear lowest bit" into a buffer, then a flat visit loop) measured no faster at 1 % density
// and slower at 0.1 % and 10 % than this loop with a zero-chunk skip; see BENCHMARKS.md §Core.
// At high density the walk is bound by its cost per set bit, not by bytes of bitmap.

/// Words tested together when skipping zeros (32 bytes).
const SKIP_WORDS: usize = 4;

#[inline(always)]
fn visit_word(word: u64, base: u64, visit: &mut impl FnMut(u64)) {
    let mut rest = word;
    while rest != 0 {
        visit(base + u64::from(rest.trailing_zeros()));
        rest &= rest - 1;
    }
}

/// Iterator over set bits in ascending order, a word at a time. For the fastest full walk
/// use [`DifferenceBitmap::for_each_one`].
pub struct Ones<'a> {
    /// The words of the range; the first is masked at construction, the last by `last_mask`
    /// when loaded, so no bit needs an end check.
    words: &'a [u64],
    /// Bit number of `words[0]`'s lowest bit.
    first_bit: u64,
    last_mask: u64,
    /// Next index of `words` to load.
    next_word: usize,
    /// Bits of the current word not yet returned, and the bit number of its lowest bit.
    current: u64,
    current_base: u64,
}

impl<'a> Ones<'a> {
    fn new(words: &'a [u64], first_bit: u64, first_mask: u64, last_mask: u64) -> Self {
        let mut current = words.first().map_or(0, |word| word & first_mask);
        if words.len() == 1 {
            current &= last_mask;
        }
        Ones { words, first_bit, last_mask, next_word: 1, current, current_base: first_bit }
    }
}

impl Iterator for Ones<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            // Skip runs of zero words a chunk at a time: sparse bitmaps are the common case.
            while self.next_word + SKIP_WORDS <= self.words.len()
                && self.words[self.next_word..self.next_word + SKIP_WORDS].iter().fold(0, |any, word| any | word) == 0
            {
                self.next_word += SKIP_WORDS;
            }
            let index = self.next_word;
            let word = *self.words.get(index)?;
            self.current = if index + 1 == self.words.len() { word & self.last_mask } else { word };
            self.current_base = self.first_bit + index as u64 * WORD_BITS;
            self.next_word += 1;
        }
        let bit = self.current_base + u64::from(self.current.trailing_zeros());
        self.current &= self.current - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn matches_a_set_model(len in 1u64..600, ops in proptest::collection::vec((0u8..4, 0u64..600, 0u64..80), 0..60)) {
            let mut bitmap = DifferenceBitmap::new(len);
            let mut model = BTreeSet::new();
            for (op, at, width) in ops {
                let at = at % len;
                let end = (at + width).min(len);
                match op {
                    0 => { prop_assert_eq!(bitmap.set(at), !model.insert(at)); }
                    1 => { prop_assert_eq!(bitmap.clear(at), model.remove(&at)); }
                    2 => { bitmap.set_range(at..end); model.extend(at..end); }
                    _ => { bitmap.clear_range(at..end); for b in at..end { model.remove(&b); } }
                }
            }
            prop_assert_eq!(bitmap.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(bitmap.count_ones(), model.len() as u64);
            let mut visited = Vec::new();
            bitmap.for_each_one(|bit| visited.push(bit));
            prop_assert_eq!(visited, model.iter().copied().collect::<Vec<_>>());
            let lo = len / 3;
            let hi = 2 * len / 3 + 1;
            prop_assert_eq!(bitmap.iter_ones_in(lo..hi).collect::<Vec<_>>(), model.range(lo..hi).copied().collect::<Vec<_>>());
            prop_assert_eq!(bitmap.rank(hi.min(len)), model.range(..hi.min(len)).count() as u64);
            let decoded = DifferenceBitmap::decode(&bitmap.encode()).unwrap();
            prop_assert_eq!(decoded, bitmap);
        }

        #[test]
        fn set_operations_match_sets(len in 1u64..300, a in proptest::collection::btree_set(0u64..300, 0..100), b in proptest::collection::btree_set(0u64..300, 0..100)) {
            let a: BTreeSet<u64> = a.into_iter().filter(|x| *x < len).collect();
            let b: BTreeSet<u64> = b.into_iter().filter(|x| *x < len).collect();
            let make = |s: &BTreeSet<u64>| { let mut m = DifferenceBitmap::new(len); for x in s { m.set(*x); } m };
            let mut union = make(&a); union.union_with(&make(&b));
            let mut diff = make(&a); diff.difference_with(&make(&b));
            let mut inter = make(&a); inter.intersect_with(&make(&b));
            prop_assert_eq!(union.iter_ones().collect::<BTreeSet<_>>(), a.union(&b).copied().collect());
            prop_assert_eq!(diff.iter_ones().collect::<BTreeSet<_>>(), a.difference(&b).copied().collect());
            prop_assert_eq!(inter.iter_ones().collect::<BTreeSet<_>>(), a.intersection(&b).copied().collect());
        }
    }

    proptest! {
        /// Every way of walking the set bits agrees with testing each bit, at densities from
        /// empty to full (so both unrolled decoders and the per-word tail loop run) and on
        /// ranges that start and end inside words and chunks.
        #[test]
        fn walks_agree_with_testing_each_bit(len in 1u64..3000, density in 0u32..=100, seed in any::<u64>(), start in 0u64..3000, width in 0u64..3000) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut bitmap = DifferenceBitmap::new(len);
            for bit in 0..len {
                if rng.random_range(0..100) < density {
                    bitmap.set(bit);
                }
            }
            let expected: Vec<u64> = (0..len).filter(|bit| bitmap.test(*bit)).collect();
            prop_assert_eq!(bitmap.iter_ones().collect::<Vec<_>>(), expected.clone());
            let mut visited = Vec::new();
            bitmap.for_each_one(|bit| visited.push(bit));
            prop_assert_eq!(&visited, &expected);
            let start = start % (len + 1);
            let end = (start + width).min(len + 5);
            let in_range: Vec<u64> = expected.iter().copied().filter(|bit| (start..end).contains(bit)).collect();
            prop_assert_eq!(bitmap.iter_ones_in(start..end).collect::<Vec<_>>(), in_range);
            prop_assert_eq!(bitmap.next_one(start), expected.iter().copied().find(|bit| *bit >= start));
            let from_words: Vec<u64> = bitmap.nonzero_words().flat_map(|(base, word)| (0..64).filter(move |k| word >> k & 1 == 1).map(move |k| base + k)).collect();
            prop_assert_eq!(from_words, expected);
        }
    }

    #[test]
    fn decode_refuses_bits_beyond_the_length() {
        let mut bitmap = DifferenceBitmap::new(70);
        bitmap.set(69);
        let mut bytes = bitmap.encode();
        // Set bit 70 (beyond the length) in the second word and reseal.
        bytes[BITMAP_PREFIX_BYTES + 8] |= 1 << 6;
        seal(&mut bytes, bitmap.encoded_len());
        assert!(matches!(DifferenceBitmap::decode(&bytes), Err(FormatError::Invalid { .. })));
    }
}
