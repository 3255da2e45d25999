//! Superblock: identifies a chronicle journal or history device, the volume it belongs to, its
//! geometry and where its areas lie (seed 001 FIG 4 configuration table 201 and JNL area
//! table 203, made self-describing so a device opened alone says what it is).
//!
//! Two copies, at byte 0 and byte 4096 of the device, written alternately; the valid copy with
//! the higher sequence wins, so a torn superblock write never loses the device.

use super::header::{seal, Header, HEADER_BYTES};
use super::{get_fixed_str, put_fixed_str, FormatError, Reader, Writer, METADATA_PAGE_BYTES};

pub const MAGIC: &[u8; 8] = b"CHRNSUPR";
const STRUCTURE: &str = "superblock";
/// Bytes covered by the superblock's checksum (the rest of its 4 KiB page is zero).
pub const SUPERBLOCK_BYTES: usize = 1024;
/// Byte offsets of the two superblock copies.
pub const SUPERBLOCK_OFFSETS: [u64; 2] = [0, METADATA_PAGE_BYTES as u64];
pub const MAX_AREAS: usize = 8;
pub const MAX_PEERS: usize = 4;
pub const PEER_NAME_BYTES: usize = 48;
pub const AREA_TABLE_OFFSET: usize = 128;
pub const AREA_ENTRY_BYTES: usize = 24;
pub const PEER_TABLE_OFFSET: usize = AREA_TABLE_OFFSET + MAX_AREAS * AREA_ENTRY_BYTES;
pub const PEER_ENTRY_BYTES: usize = 64;
/// Where the volume's name sits (format 1.1; zero in 1.0 superblocks: unnamed).
pub const VOLUME_NAME_OFFSET: usize = PEER_TABLE_OFFSET + MAX_PEERS * PEER_ENTRY_BYTES;
pub const VOLUME_NAME_BYTES: usize = 64;

/// Incompatible feature: the journal has an `OpenBitmap` area (journal-full policy
/// bitmap-only, FIG 36); a reader that does not know it must not open the volume, since it
/// would miss the blocks the bitmap tracks.
pub const FEATURE_INCOMPAT_OPEN_BITMAP: u64 = 1 << 0;
/// Incompatible features this build understands.
pub const KNOWN_INCOMPAT_FEATURES: u64 = FEATURE_INCOMPAT_OPEN_BITMAP;
/// Read-only-compatible features this build understands.
pub const KNOWN_RO_COMPAT_FEATURES: u64 = 0;

macro_rules! byte_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($variant = $value),+ }
        impl $name {
            pub fn from_byte(structure: &'static str, field: &'static str, value: u8) -> Result<Self, FormatError> {
                match value {
                    $($value => Ok($name::$variant),)+
                    other => Err(FormatError::invalid(structure, field, format!("unknown value {other}"))),
                }
            }
        }
    };
}
pub(crate) use byte_enum;

byte_enum!(
    /// What a device holds for the volume (ARCHITECTURE §2).
    DeviceRole { Base = 1, Journal = 2, Backup = 3, History = 4 }
);
byte_enum!(
    /// "Latest" overwrites a block's element within a generation; "All" appends every write.
    JournalMode { Latest = 0, All = 1 }
);
byte_enum!(
    /// What happens when the journal has no room for the open generation (ARCHITECTURE §6).
    JournalFullPolicy { Block = 0, Fail = 1, MergeOldest = 2, BitmapOnly = 3 }
);
byte_enum!(
    /// When a host write is acknowledged. `Flush`: on completion, durable after the next host
    /// flush (a volatile write cache, like a disk's). `WriteThrough`: durable when acknowledged.
    Durability { Flush = 0, WriteThrough = 1 }
);

/// Areas of a device. Journal devices use catalogs, sites, element index and elements (and the
/// open bitmap with the journal-full policy bitmap-only); history devices use catalogs, sort
/// cursors and units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AreaKind {
    CatalogA = 1,
    CatalogB = 2,
    Sites = 3,
    ElementIndex = 4,
    Elements = 5,
    SortCursors = 6,
    Units = 7,
    OpenBitmap = 8,
}

impl AreaKind {
    fn from_u32(value: u32) -> Result<Self, FormatError> {
        Ok(match value {
            1 => AreaKind::CatalogA,
            2 => AreaKind::CatalogB,
            3 => AreaKind::Sites,
            4 => AreaKind::ElementIndex,
            5 => AreaKind::Elements,
            6 => AreaKind::SortCursors,
            7 => AreaKind::Units,
            8 => AreaKind::OpenBitmap,
            other => return Err(FormatError::invalid(STRUCTURE, "area kind", format!("unknown area kind {other}"))),
        })
    }
}

/// A byte range of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    pub kind: AreaKind,
    pub start_bytes: u64,
    pub length_bytes: u64,
}

impl Area {
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes + self.length_bytes
    }
}

/// Another device of the volume, recorded so that a device opened alone names its partners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDevice {
    pub role: DeviceRole,
    pub bytes: u64,
    /// Bdev name or file name, at most 47 bytes of UTF-8.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub sequence: u64,
    pub volume_uuid: [u8; 16],
    pub device_uuid: [u8; 16],
    pub role: DeviceRole,
    pub journal_mode: JournalMode,
    pub journal_full_policy: JournalFullPolicy,
    pub durability: Durability,
    pub device_block_size: u32,
    pub host_write_size: u32,
    pub volume_blocks: u64,
    pub device_bytes: u64,
    pub features_compat: u64,
    pub features_incompat: u64,
    pub features_ro_compat: u64,
    pub created_ns: u64,
    pub areas: Vec<Area>,
    pub peers: Vec<PeerDevice>,
    /// Name the volume is exposed under (the SPDK bdev name), at most 63 bytes of UTF-8; empty
    /// when unnamed. Lets a restarted application register the volume under the same name.
    pub volume_name: String,
    /// Host writes must be whole host-write-size units (refused otherwise) instead of being
    /// widened by read-modify-write. Recorded so a restarted application exposes the volume
    /// the same way.
    pub strict: bool,
}

impl Superblock {
    pub fn area(&self, kind: AreaKind) -> Option<Area> {
        self.areas.iter().copied().find(|a| a.kind == kind)
    }

    pub fn peer(&self, role: DeviceRole) -> Option<&PeerDevice> {
        self.peers.iter().find(|p| p.role == role)
    }

    /// Bytes the volume exposes.
    pub fn volume_bytes(&self) -> u64 {
        self.volume_blocks * u64::from(self.host_write_size)
    }

    /// Encodes into one metadata page (4 KiB, zero padded).
    pub fn encode(&self) -> Vec<u8> {
        self.validate().expect("only valid superblocks are encoded");
        let mut bytes = vec![0u8; METADATA_PAGE_BYTES];
        Header::write(&mut bytes, MAGIC, SUPERBLOCK_BYTES, self.sequence);
        let mut w = Writer::at(&mut bytes, HEADER_BYTES);
        w.put_bytes(&self.volume_uuid);
        w.put_bytes(&self.device_uuid);
        w.put_u8(self.role as u8);
        w.put_u8(self.journal_mode as u8);
        w.put_u8(self.journal_full_policy as u8);
        w.put_u8(self.durability as u8);
        w.put_u32(self.device_block_size);
        w.put_u32(self.host_write_size);
        w.put_u8(self.areas.len() as u8);
        w.put_u8(self.peers.len() as u8);
        w.put_u8(u8::from(self.strict));
        w.put_u8(0);
        w.put_u64(self.volume_blocks);
        w.put_u64(self.device_bytes);
        w.put_u64(self.features_compat);
        w.put_u64(self.features_incompat);
        w.put_u64(self.features_ro_compat);
        w.put_u64(self.created_ns);
        debug_assert_eq!(w.position(), AREA_TABLE_OFFSET);
        for index in 0..MAX_AREAS {
            match self.areas.get(index) {
                Some(area) => {
                    w.put_u32(area.kind as u32);
                    w.put_u32(0);
                    w.put_u64(area.start_bytes);
                    w.put_u64(area.length_bytes);
                }
                None => w.skip(AREA_ENTRY_BYTES),
            }
        }
        debug_assert_eq!(w.position(), PEER_TABLE_OFFSET);
        for index in 0..MAX_PEERS {
            match self.peers.get(index) {
                Some(peer) => {
                    w.put_u8(peer.role as u8);
                    w.skip(7);
                    w.put_u64(peer.bytes);
                    put_fixed_str(&mut w, &peer.name, PEER_NAME_BYTES);
                }
                None => w.skip(PEER_ENTRY_BYTES),
            }
        }
        debug_assert_eq!(w.position(), VOLUME_NAME_OFFSET);
        put_fixed_str(&mut w, &self.volume_name, VOLUME_NAME_BYTES);
        seal(&mut bytes, SUPERBLOCK_BYTES);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let (header, body) = Header::read(STRUCTURE, MAGIC, bytes, SUPERBLOCK_BYTES)?;
        let mut r = Reader::at(STRUCTURE, body, HEADER_BYTES);
        let volume_uuid = r.array()?;
        let device_uuid = r.array()?;
        let role = DeviceRole::from_byte(STRUCTURE, "role", r.u8()?)?;
        let journal_mode = JournalMode::from_byte(STRUCTURE, "journal mode", r.u8()?)?;
        let journal_full_policy = JournalFullPolicy::from_byte(STRUCTURE, "journal full policy", r.u8()?)?;
        let durability = Durability::from_byte(STRUCTURE, "durability", r.u8()?)?;
        let device_block_size = r.u32()?;
        let host_write_size = r.u32()?;
        let area_count = r.u8()? as usize;
        let peer_count = r.u8()? as usize;
        let strict = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(FormatError::invalid(STRUCTURE, "strict", format!("{other} is neither 0 nor 1"))),
        };
        r.u8()?;
        let volume_blocks = r.u64()?;
        let device_bytes = r.u64()?;
        let features_compat = r.u64()?;
        let features_incompat = r.u64()?;
        let features_ro_compat = r.u64()?;
        let created_ns = r.u64()?;
        if area_count > MAX_AREAS || peer_count > MAX_PEERS {
            return Err(FormatError::invalid(STRUCTURE, "area or peer count", "more entries than the tables hold"));
        }
        let mut areas = Vec::with_capacity(area_count);
        for _ in 0..area_count {
            let kind = AreaKind::from_u32(r.u32()?)?;
            r.u32()?;
            areas.push(Area { kind, start_bytes: r.u64()?, length_bytes: r.u64()? });
        }
        r.skip((MAX_AREAS - area_count) * AREA_ENTRY_BYTES)?;
        let mut peers = Vec::with_capacity(peer_count);
        for _ in 0..peer_count {
            let role = DeviceRole::from_byte(STRUCTURE, "peer role", r.u8()?)?;
            r.skip(7)?;
            let bytes = r.u64()?;
            let name = get_fixed_str(&mut r, STRUCTURE, "peer name", PEER_NAME_BYTES)?;
            peers.push(PeerDevice { role, bytes, name });
        }
        r.skip((MAX_PEERS - peer_count) * PEER_ENTRY_BYTES)?;
        let volume_name = get_fixed_str(&mut r, STRUCTURE, "volume name", VOLUME_NAME_BYTES)?;
        let superblock = Superblock {
            sequence: header.sequence,
            volume_uuid,
            device_uuid,
            role,
            journal_mode,
            journal_full_policy,
            durability,
            device_block_size,
            host_write_size,
            volume_blocks,
            device_bytes,
            features_compat,
            features_incompat,
            features_ro_compat,
            created_ns,
            areas,
            peers,
            volume_name,
            strict,
        };
        superblock.validate()?;
        Ok(superblock)
    }

    /// Checks everything a reader relies on.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |field, reason: String| Err(FormatError::invalid(STRUCTURE, field, reason));
        if self.features_incompat & !KNOWN_INCOMPAT_FEATURES != 0 {
            return Err(FormatError::UnknownFeatures {
                structure: STRUCTURE,
                flags: self.features_incompat & !KNOWN_INCOMPAT_FEATURES,
            });
        }
        if !matches!(self.role, DeviceRole::Journal | DeviceRole::History) {
            return bad("role", format!("{:?} devices carry no superblock", self.role));
        }
        let block = self.device_block_size;
        if !block.is_power_of_two() || !(512..=4096).contains(&block) {
            return bad("device block size", format!("{block} bytes is not a power of two from 512 to 4096"));
        }
        let unit = self.host_write_size;
        if !unit.is_power_of_two() || !(512..=1 << 20).contains(&unit) || unit % block != 0 {
            return bad(
                "host write size",
                format!(
                    "{unit} bytes is not a power of two from 512 B to 1 MiB and a multiple of the {block}-byte block"
                ),
            );
        }
        if self.volume_blocks == 0 {
            return bad("volume blocks", "zero".into());
        }
        if self.areas.len() > MAX_AREAS || self.peers.len() > MAX_PEERS {
            return bad("areas", "too many areas or peers".into());
        }
        let mut sorted = self.areas.clone();
        sorted.sort_by_key(|a| a.start_bytes);
        let mut end = 2 * METADATA_PAGE_BYTES as u64;
        for area in &sorted {
            if area.start_bytes < end || area.start_bytes % METADATA_PAGE_BYTES as u64 != 0 {
                return bad("areas", format!("{:?} at byte {} overlaps or is misaligned", area.kind, area.start_bytes));
            }
            end = area.start_bytes.saturating_add(area.length_bytes);
            if end > self.device_bytes {
                return bad(
                    "areas",
                    format!("{:?} ends at byte {end}, beyond the device's {} bytes", area.kind, self.device_bytes),
                );
            }
        }
        for peer in &self.peers {
            if peer.name.len() >= PEER_NAME_BYTES || peer.name.contains('\0') {
                return bad("peer name", format!("{:?} is longer than {} bytes", peer.name, PEER_NAME_BYTES - 1));
            }
        }
        if self.volume_name.len() >= VOLUME_NAME_BYTES || self.volume_name.contains('\0') {
            return bad(
                "volume name",
                format!("{:?} is longer than {} bytes or holds a NUL", self.volume_name, VOLUME_NAME_BYTES - 1),
            );
        }
        Ok(())
    }
}

/// Picks the superblock to use from the two copies: the valid one with the higher sequence.
/// Fails only when neither copy is valid, reporting the first copy's error.
pub fn choose(copy_a: &[u8], copy_b: &[u8]) -> Result<Superblock, FormatError> {
    newest(Superblock::decode(copy_a), Superblock::decode(copy_b), |s| s.sequence)
}

/// The newer of two double-buffered copies; shared by every double-buffered structure.
pub(crate) fn newest<T>(
    a: Result<T, FormatError>,
    b: Result<T, FormatError>,
    sequence: impl Fn(&T) -> u64,
) -> Result<T, FormatError> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if sequence(&b) > sequence(&a) { b } else { a }),
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(a), Err(_)) => Err(a),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            sequence: 3,
            volume_uuid: [7; 16],
            device_uuid: [9; 16],
            role: DeviceRole::Journal,
            journal_mode: JournalMode::Latest,
            journal_full_policy: JournalFullPolicy::Block,
            durability: Durability::Flush,
            device_block_size: 512,
            host_write_size: 4096,
            volume_blocks: 16384,
            device_bytes: 64 << 20,
            features_compat: 0,
            features_incompat: 0,
            features_ro_compat: 0,
            created_ns: 1_700_000_000_000_000_000,
            areas: vec![
                Area { kind: AreaKind::CatalogA, start_bytes: 8192, length_bytes: 4096 },
                Area { kind: AreaKind::CatalogB, start_bytes: 12288, length_bytes: 4096 },
                Area { kind: AreaKind::Elements, start_bytes: 1 << 20, length_bytes: 32 << 20 },
            ],
            peers: vec![PeerDevice { role: DeviceRole::Base, bytes: 64 << 20, name: "base.img".into() }],
            volume_name: "vol0".into(),
            strict: false,
        }
    }

    #[test]
    fn round_trips_and_sits_at_documented_offsets() {
        let superblock = sample();
        let bytes = superblock.encode();
        assert_eq!(bytes.len(), METADATA_PAGE_BYTES);
        assert_eq!(Superblock::decode(&bytes).unwrap(), superblock);
        assert_eq!(&bytes[0..8], MAGIC);
        assert_eq!(bytes[64], DeviceRole::Journal as u8);
        assert_eq!(u32::from_le_bytes(bytes[72..76].try_into().unwrap()), 4096);
        assert_eq!(u64::from_le_bytes(bytes[80..88].try_into().unwrap()), 16384);
        assert_eq!(u64::from_le_bytes(bytes[AREA_TABLE_OFFSET + 8..AREA_TABLE_OFFSET + 16].try_into().unwrap()), 8192);
        assert_eq!(bytes[PEER_TABLE_OFFSET], DeviceRole::Base as u8);
        assert_eq!(&bytes[PEER_TABLE_OFFSET + 16..PEER_TABLE_OFFSET + 24], b"base.img");
        assert!(bytes[SUPERBLOCK_BYTES..].iter().all(|b| *b == 0));
    }

    #[test]
    fn newer_valid_copy_wins_and_a_torn_copy_is_skipped() {
        let old = sample();
        let mut new = sample();
        new.sequence = 4;
        let mut torn = new.encode();
        torn[100] ^= 0xFF;
        assert_eq!(choose(&old.encode(), &new.encode()).unwrap().sequence, 4);
        assert_eq!(choose(&old.encode(), &torn).unwrap().sequence, 3);
        assert!(choose(&torn, &[0u8; 4096]).is_err());
    }

    #[test]
    fn unknown_incompatible_features_are_refused() {
        let mut superblock = sample();
        superblock.features_incompat = 1 << 5;
        let mut bytes = vec![0u8; METADATA_PAGE_BYTES];
        // Encode by hand around the validate() assertion: write valid then patch and reseal.
        superblock.features_incompat = 0;
        bytes.copy_from_slice(&superblock.encode());
        bytes[104..112].copy_from_slice(&(1u64 << 5).to_le_bytes());
        seal(&mut bytes, SUPERBLOCK_BYTES);
        assert!(matches!(Superblock::decode(&bytes), Err(FormatError::UnknownFeatures { .. })));
    }
}
