//! Open-generation bitmap page: the journal-full policy "bitmap-only" (seed 001 FIG 36,
//! S36001–S36006, "set the BM bit, store asynchronously, acknowledge"). While the journal has no
//! room, a write of the open generation goes to the base only and sets its block's bit here; the
//! bit is durable before the write reaches the base, so after any crash every block whose base
//! copy may have changed since the last marker is in the open generation's element index or in
//! this bitmap.
//!
//! The bitmap of a whole volume is stored in 4 KiB pages in the journal's `OpenBitmap` area, each
//! page in two slots like an element index page: a commit writes a changed page into the slot not
//! holding its newest valid copy, with `sequence + 1`. A page counts only for the generation it
//! names, so a marker (which seals a generation only once its bitmap is empty) needs no write to
//! clear the bitmap: the pages of the old generation simply stop belonging.

use super::header::{seal, Header, HEADER_BYTES};
use super::{FormatError, Reader, Writer, METADATA_PAGE_BYTES};

pub const MAGIC: &[u8; 8] = b"CHRNOBMP";
const STRUCTURE: &str = "open bitmap page";
pub const OPEN_BITMAP_PREFIX_BYTES: usize = 64;
/// Bytes of one page slot; a page occupies two slots.
pub const SLOT_BYTES: usize = METADATA_PAGE_BYTES;
/// Bitmap words per page: (4096 − 64) / 8.
pub const WORDS_PER_PAGE: usize = (METADATA_PAGE_BYTES - OPEN_BITMAP_PREFIX_BYTES) / 8;
/// Blocks (bits) per page.
pub const BLOCKS_PER_PAGE: u64 = WORDS_PER_PAGE as u64 * 64;

/// Pages of the bitmap of a volume of `volume_blocks` blocks.
pub fn pages_for(volume_blocks: u64) -> u64 {
    volume_blocks.div_ceil(BLOCKS_PER_PAGE)
}

/// Words page `page` holds for a volume of `volume_blocks` blocks (the last page may hold fewer).
pub fn words_in_page(volume_blocks: u64, page: u64) -> usize {
    let first = page * BLOCKS_PER_PAGE;
    let blocks = volume_blocks.saturating_sub(first).min(BLOCKS_PER_PAGE);
    blocks.div_ceil(64) as usize
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBitmapPage {
    /// Write count of this page within its generation; of the two slots the valid one of the
    /// same generation with the higher value wins.
    pub sequence: u64,
    /// The open generation whose journal-less writes the bits track.
    pub generation: u64,
    /// Page number in the area; bit 0 is block `page × BLOCKS_PER_PAGE`.
    pub page: u64,
    /// Bitmap words, word `i` holds blocks `first + 64i .. first + 64i + 63`, LSB first.
    pub words: Vec<u64>,
}

impl OpenBitmapPage {
    pub fn first_block(&self) -> u64 {
        self.page * BLOCKS_PER_PAGE
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.words.len() <= WORDS_PER_PAGE, "open bitmap page overflow");
        assert!(self.page.checked_mul(BLOCKS_PER_PAGE).is_some(), "page number in range");
        let length = OPEN_BITMAP_PREFIX_BYTES + 8 * self.words.len();
        let mut bytes = vec![0u8; SLOT_BYTES];
        Header::write(&mut bytes, MAGIC, length, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_u64(self.generation);
        w.put_u64(self.page);
        w.put_u64(self.first_block());
        w.put_u32(self.words.len() as u32);
        w.skip(4);
        for word in &self.words {
            w.put_u64(*word);
        }
        debug_assert_eq!(w.position(), length);
        seal(&mut bytes, length);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (header, body) = Header::read(STRUCTURE, MAGIC, bytes, OPEN_BITMAP_PREFIX_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let generation = r.u64()?;
        let page = r.u64()?;
        let first_block = r.u64()?;
        let count = r.u32()? as usize;
        r.skip(4)?;
        if page.checked_mul(BLOCKS_PER_PAGE) != Some(first_block) {
            return Err(FormatError::invalid(STRUCTURE, "first block", format!("{first_block} is not page {page}'s")));
        }
        if count > WORDS_PER_PAGE || OPEN_BITMAP_PREFIX_BYTES + 8 * count != body.len() {
            return Err(FormatError::invalid(STRUCTURE, "word count", format!("{count} words do not fit the length")));
        }
        let mut words = Vec::with_capacity(count);
        for _ in 0..count {
            words.push(r.u64()?);
        }
        Ok(OpenBitmapPage { sequence: header.sequence, generation, page, words })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_damage_is_refused() {
        let page = OpenBitmapPage { sequence: 3, generation: 9, page: 2, words: vec![1, 0, u64::MAX, 1 << 63] };
        let bytes = page.encode();
        assert_eq!(bytes.len(), SLOT_BYTES);
        assert_eq!(OpenBitmapPage::decode(&bytes).unwrap(), page);
        assert_eq!(u64::from_le_bytes(bytes[48..56].try_into().unwrap()), 2 * BLOCKS_PER_PAGE, "first block at 48");
        let mut torn = bytes.clone();
        torn[70] ^= 1;
        assert!(matches!(OpenBitmapPage::decode(&torn), Err(FormatError::ChecksumMismatch { .. })));
        assert!(OpenBitmapPage::decode(&bytes[..40]).is_err());
        assert!(OpenBitmapPage::decode(&[0u8; 4096]).is_err());
    }

    #[test]
    fn page_counts_cover_the_volume() {
        assert_eq!(WORDS_PER_PAGE, 504);
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(BLOCKS_PER_PAGE), 1);
        assert_eq!(pages_for(BLOCKS_PER_PAGE + 1), 2);
        assert_eq!(words_in_page(BLOCKS_PER_PAGE + 65, 0), WORDS_PER_PAGE);
        assert_eq!(words_in_page(BLOCKS_PER_PAGE + 65, 1), 2);
    }
}
