//! On-disk structures of chronicle, byte for byte as `docs/FORMAT.md` describes them.
//!
//! Every structure starts with the same 32-byte [`Header`] (magic, version, length, sequence,
//! crc32c) and is little-endian. Decoding any byte string returns a typed [`FormatError`] and
//! never panics; encoding asserts what decoding checks, so a structure that would not read back
//! is never written.

pub mod catalog;
pub mod control_block;
pub mod element_index;
pub mod frame_table;
pub mod header;
pub mod layout;
pub mod open_bitmap;
pub mod records;
pub mod superblock;
pub mod version_table;

pub use header::{Header, HEADER_BYTES};

/// Size of a metadata page. Every metadata structure is padded to a multiple of it, so any
/// device block size from 512 B to 4 KiB can hold it without read-modify-write.
pub const METADATA_PAGE_BYTES: usize = 4096;

/// The format's major version: a reader refuses any other major version.
pub const FORMAT_MAJOR: u16 = 1;
/// The format's minor version: a reader accepts higher minors (additions only, in reserved
/// space or behind compatible feature flags).
pub const FORMAT_MINOR: u16 = 1;

/// Why bytes could not be decoded as a chronicle structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{structure}: truncated, needs {needed} bytes but only {available} are present")]
    Truncated { structure: &'static str, needed: usize, available: usize },
    #[error("{structure}: bad magic {found:02x?} (not a chronicle {structure}, or overwritten)")]
    BadMagic { structure: &'static str, found: [u8; 8] },
    #[error("{structure}: format version {major}.{minor} is not supported (this build reads major version {supported_major})")]
    UnsupportedVersion { structure: &'static str, major: u16, minor: u16, supported_major: u16 },
    #[error("{structure}: recorded length {length} is impossible (at least {minimum}, at most {available} bytes)")]
    BadLength { structure: &'static str, length: u32, minimum: usize, available: usize },
    #[error("{structure}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the structure is damaged or torn")]
    ChecksumMismatch { structure: &'static str, stored: u32, computed: u32 },
    #[error("{structure}: field {field} is invalid: {reason}")]
    Invalid { structure: &'static str, field: &'static str, reason: String },
    #[error("{structure}: uses incompatible features {flags:#x} that this build does not know")]
    UnknownFeatures { structure: &'static str, flags: u64 },
}

impl FormatError {
    pub(crate) fn invalid(structure: &'static str, field: &'static str, reason: impl Into<String>) -> Self {
        FormatError::Invalid { structure, field, reason: reason.into() }
    }
}

/// Little-endian writer into a preallocated buffer. Writing past the end is a bug in the
/// encoder (sizes are computed before writing), so it asserts.
pub(crate) struct Writer<'a> {
    bytes: &'a mut [u8],
    position: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(bytes: &'a mut [u8]) -> Self {
        Writer { bytes, position: 0 }
    }
    pub(crate) fn at(bytes: &'a mut [u8], position: usize) -> Self {
        assert!(position <= bytes.len());
        Writer { bytes, position }
    }
    pub(crate) fn position(&self) -> usize {
        self.position
    }
    pub(crate) fn put_bytes(&mut self, value: &[u8]) {
        let end = self.position + value.len();
        assert!(end <= self.bytes.len(), "encoder overran its buffer");
        self.bytes[self.position..end].copy_from_slice(value);
        self.position = end;
    }
    pub(crate) fn put_u8(&mut self, value: u8) {
        self.put_bytes(&[value]);
    }
    pub(crate) fn put_u16(&mut self, value: u16) {
        self.put_bytes(&value.to_le_bytes());
    }
    pub(crate) fn put_u32(&mut self, value: u32) {
        self.put_bytes(&value.to_le_bytes());
    }
    pub(crate) fn put_u64(&mut self, value: u64) {
        self.put_bytes(&value.to_le_bytes());
    }
    pub(crate) fn skip(&mut self, count: usize) {
        let end = self.position + count;
        assert!(end <= self.bytes.len(), "encoder overran its buffer");
        self.bytes[self.position..end].fill(0);
        self.position = end;
    }
}

/// Little-endian reader that reports running out of bytes as [`FormatError::Truncated`].
pub(crate) struct Reader<'a> {
    structure: &'static str,
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(structure: &'static str, bytes: &'a [u8]) -> Self {
        Reader { structure, bytes, position: 0 }
    }
    pub(crate) fn at(structure: &'static str, bytes: &'a [u8], position: usize) -> Self {
        Reader { structure, bytes, position: position.min(bytes.len()) }
    }
    pub(crate) fn take(&mut self, count: usize) -> Result<&'a [u8], FormatError> {
        let end =
            self.position.checked_add(count).filter(|end| *end <= self.bytes.len()).ok_or(FormatError::Truncated {
                structure: self.structure,
                needed: self.position.saturating_add(count),
                available: self.bytes.len(),
            })?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    pub(crate) fn skip(&mut self, count: usize) -> Result<(), FormatError> {
        self.take(count).map(|_| ())
    }
}

/// Rounds `bytes` up to whole metadata pages.
pub fn pad_to_pages(bytes: usize) -> usize {
    bytes.div_ceil(METADATA_PAGE_BYTES) * METADATA_PAGE_BYTES
}

/// Encodes a UTF-8 string into a fixed, zero-padded field; refuses strings that do not fit.
pub(crate) fn put_fixed_str(writer: &mut Writer<'_>, value: &str, capacity: usize) {
    assert!(value.len() <= capacity, "string field overflow is checked before encoding");
    writer.put_bytes(value.as_bytes());
    writer.skip(capacity - value.len());
}

/// Decodes a fixed, zero-padded UTF-8 string field.
pub(crate) fn get_fixed_str(
    reader: &mut Reader<'_>,
    structure: &'static str,
    field: &'static str,
    capacity: usize,
) -> Result<String, FormatError> {
    let raw = reader.take(capacity)?;
    let end = raw.iter().position(|b| *b == 0).unwrap_or(capacity);
    if raw[end..].iter().any(|b| *b != 0) {
        return Err(FormatError::invalid(structure, field, "bytes after the terminating zero"));
    }
    std::str::from_utf8(&raw[..end]).map(str::to_owned).map_err(|_| FormatError::invalid(structure, field, "not UTF-8"))
}
