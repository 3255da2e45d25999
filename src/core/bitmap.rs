//! The difference bitmap (seed 001 "difference BM", FIG 4–6): one bit per host-write-size
//! block of the volume; a set bit means the block belongs to the generation. Iteration walks a
//! word at a time and skips zero words, so sparse bitmaps scan at memory speed.
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
        let word_index = (start / WORD_BITS) as usize;
        let current = if start < end { self.words[word_index] & (u64::MAX << (start % WORD_BITS)) } else { 0 };
        Ones { words: &self.words, word_index, current, end }
    }

    /// First set bit at or after `bit`.
    pub fn next_one(&self, bit: u64) -> Option<u64> {
        self.iter_ones_in(bit..self.len).next()
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

/// Iterator over set bits, a word at a time.
pub struct Ones<'a> {
    words: &'a [u64],
    word_index: usize,
    current: u64,
    end: u64,
}

impl Iterator for Ones<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        loop {
            if self.current != 0 {
                let bit = self.word_index as u64 * WORD_BITS + u64::from(self.current.trailing_zeros());
                if bit >= self.end {
                    self.current = 0;
                    return None;
                }
                self.current &= self.current - 1;
                return Some(bit);
            }
            self.word_index += 1;
            if self.word_index as u64 * WORD_BITS >= self.end {
                return None;
            }
            // Skip runs of zero words four at a time: sparse bitmaps are the common case.
            while self.word_index + 4 <= self.words.len()
                && (self.words[self.word_index]
                    | self.words[self.word_index + 1]
                    | self.words[self.word_index + 2]
                    | self.words[self.word_index + 3])
                    == 0
            {
                self.word_index += 4;
                if self.word_index as u64 * WORD_BITS >= self.end {
                    return None;
                }
            }
            if self.word_index >= self.words.len() {
                return None;
            }
            self.current = self.words[self.word_index];
        }
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
