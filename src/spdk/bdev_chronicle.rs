//! The `chronicle` bdev module: registration, module init/fini, examine.
//!
//! Loading `libchronicle.so` (e.g. `LD_PRELOAD` into `spdk_tgt`, `bdevperf` or fio's
//! `spdk_bdev` plugin) runs [`constructor`] before the application's `main`: it registers the
//! log component `chronicle`, the bdev module `chronicle` and the `bdev_chronicle_*` RPC
//! methods, as SPDK's `SPDK_LOG_REGISTER_COMPONENT`, `SPDK_BDEV_MODULE_REGISTER` and
//! `SPDK_RPC_REGISTER` constructors do for modules written in C.
//!
//! Now: the module exists, initialises, answers `bdev_chronicle_get_version`, and finishes
//! examine at once. Next (docs/SPDK.md): chronicle bdevs over the engine, their channels and
//! I/O path, the create/delete/mark/get_generations/get_status RPCs, examine from superblocks,
//! and `write_config_json`.

use std::cell::Cell;
use std::rc::Rc;

use serde::Serialize;

use super::bdev::{Bdev, BdevDesc, IoChannel};
use super::bdev_module::{self, BdevModule, ExamineDone, ModuleSlot};
use super::dma::DmaBuf;
use super::log::LogFlag;
use super::{bdev_chronicle_rpc, Errno, SPDK_VERSION};
use crate::core::format::superblock::{self, Superblock, SUPERBLOCK_OFFSETS};
use crate::core::format::{FORMAT_MAJOR, METADATA_PAGE_BYTES};

/// Log component `chronicle` (`--logflag chronicle`, `log_set_flag chronicle`).
pub static LOG: LogFlag = LogFlag::new(c"chronicle");

static MODULE: ModuleSlot = ModuleSlot::new();

/// The `chronicle` bdev module.
pub struct Chronicle;

impl BdevModule for Chronicle {
    const NAME: &'static std::ffi::CStr = c"chronicle";
    // Installed now so the hook is exercised on every bdev; it finds nothing yet.
    const EXAMINE_DISK: bool = true;
    // No chronicle bdev yet, hence no per-I/O state.
    type IoCtx = ();

    fn slot() -> &'static ModuleSlot {
        &MODULE
    }

    fn init() -> Result<(), Errno> {
        let info = version_info();
        spdk_notice!(
            "chronicle {} loaded (on-disk format {}, built against SPDK {})",
            info.version,
            info.format_major,
            info.spdk_version
        );
        Ok(())
    }

    fn fini() {
        spdk_info!(LOG, "chronicle: module stopped");
    }

    fn examine_disk(bdev: Bdev<'_>, done: ExamineDone) {
        // Looking for chronicle superblocks on new bdevs (and re-registering the volumes found)
        // is later work; until then every examine finishes at once.
        spdk_debug!(LOG, "chronicle: examine {}: not looking for superblocks yet", bdev.name());
        done.finish();
    }
}

/// What `bdev_chronicle_get_version` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// The crate's version.
    pub version: &'static str,
    /// Major version of the on-disk format this build reads and writes.
    pub format_major: u16,
    /// SPDK release the module was built against.
    pub spdk_version: &'static str,
}

pub fn version_info() -> VersionInfo {
    VersionInfo { version: env!("CARGO_PKG_VERSION"), format_major: FORMAT_MAJOR, spdk_version: SPDK_VERSION }
}

/// What `bdev_chronicle_inspect` reports about a bdev.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub bdev_name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    /// The chronicle superblock on the bdev (journal and history devices carry one), if any.
    pub chronicle: Option<SuperblockInfo>,
    /// Why there is none, when there is none.
    pub detail: Option<String>,
}

/// The parts of a superblock a user needs to recognise a device.
#[derive(Debug, Clone, Serialize)]
pub struct SuperblockInfo {
    /// "journal" or "history".
    pub role: String,
    pub volume_uuid: String,
    pub device_uuid: String,
    /// Superblock sequence (the newer of the two copies wins).
    pub sequence: u64,
    pub host_write_size: u32,
    pub volume_blocks: u64,
    /// The volume's other devices, as recorded when it was formatted.
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub role: String,
    pub name: String,
    pub bytes: u64,
}

impl SuperblockInfo {
    fn new(superblock: &Superblock) -> Self {
        let role = |role: superblock::DeviceRole| format!("{role:?}").to_lowercase();
        SuperblockInfo {
            role: role(superblock.role),
            volume_uuid: uuid::Uuid::from_bytes(superblock.volume_uuid).to_string(),
            device_uuid: uuid::Uuid::from_bytes(superblock.device_uuid).to_string(),
            sequence: superblock.sequence,
            host_write_size: superblock.host_write_size,
            volume_blocks: superblock.volume_blocks,
            peers: superblock
                .peers
                .iter()
                .map(|peer| PeerInfo { role: role(peer.role), name: peer.name.clone(), bytes: peer.bytes })
                .collect(),
        }
    }
}

/// Why a bdev could not be inspected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    #[error("cannot open bdev {bdev_name}: {errno}")]
    Open { bdev_name: String, errno: Errno },
    #[error("bdev {bdev_name}: {what}: {errno}")]
    Resources { bdev_name: String, what: &'static str, errno: Errno },
    #[error("bdev {bdev_name}: reading the superblocks failed: {errno}")]
    Read { bdev_name: String, errno: Errno },
}

impl InspectError {
    pub fn errno(&self) -> Errno {
        match self {
            InspectError::Open { errno, .. }
            | InspectError::Resources { errno, .. }
            | InspectError::Read { errno, .. } => *errno,
        }
    }
}

type InspectDone = Box<dyn FnOnce(Result<Inspection, InspectError>)>;

/// One inspection in flight. Field order is drop order: the channel is put back before the
/// descriptor closes.
struct Reading {
    channel: IoChannel,
    desc: BdevDesc,
    inspection: Inspection,
    num_blocks: u64,
    done: Cell<Option<InspectDone>>,
}

/// Reads both superblock copies of bdev `bdev_name` (read-only, unclaimed) and reports what
/// they say; `done` runs on this thread, later, or now if the bdev cannot be opened. This is
/// the first half of examine (which will also register the volumes it finds).
pub fn inspect(bdev_name: &str, done: impl FnOnce(Result<Inspection, InspectError>) + 'static) {
    // Nothing to do on hot-remove: the read then fails, and the descriptor closes with it.
    let desc = match BdevDesc::open(bdev_name, false, |_, _| {}) {
        Ok(desc) => desc,
        Err(errno) => return done(Err(InspectError::Open { bdev_name: bdev_name.to_string(), errno })),
    };
    let bdev = desc.bdev();
    let mut inspection = Inspection {
        bdev_name: bdev.name(),
        block_size: bdev.block_size(),
        num_blocks: bdev.num_blocks(),
        chronicle: None,
        detail: None,
    };
    // Both copies, each a whole metadata page.
    let bytes_needed = SUPERBLOCK_OFFSETS[1] + METADATA_PAGE_BYTES as u64;
    let block_size = u64::from(inspection.block_size);
    if inspection.num_blocks.saturating_mul(block_size) < bytes_needed {
        inspection.detail = Some(format!("smaller than the {bytes_needed} bytes of a chronicle superblock pair"));
        return done(Ok(inspection));
    }
    let num_blocks = bytes_needed.div_ceil(block_size);
    let resources =
        |what: &'static str, errno: Errno| InspectError::Resources { bdev_name: bdev_name.to_string(), what, errno };
    let buffer = match DmaBuf::zeroed((num_blocks * block_size) as usize, bdev.buffer_alignment()) {
        Ok(buffer) => buffer,
        Err(errno) => return done(Err(resources("no DMA memory for the superblocks", errno))),
    };
    let channel = match desc.io_channel() {
        Ok(channel) => channel,
        Err(errno) => return done(Err(resources("no I/O channel", errno))),
    };
    let reading = Reading { channel, desc, inspection, num_blocks, done: Cell::new(Some(Box::new(done))) };
    submit(Rc::new(reading), buffer);
}

fn submit(reading: Rc<Reading>, buffer: DmaBuf) {
    let completion = reading.clone();
    let submitted = reading.desc.read_blocks(&reading.channel, buffer, 0, reading.num_blocks, move |result, buffer| {
        finish(completion, result.map(|()| buffer))
    });
    match submitted {
        Ok(()) => {}
        // Back-pressure: resubmit when the bdev layer has room again.
        Err((Errno::ENOMEM, buffer)) => {
            let again = reading.clone();
            if let Err(errno) = reading.desc.queue_io_wait(&reading.channel, move || submit(again, buffer)) {
                finish(reading, Err(errno));
            }
        }
        Err((errno, _)) => finish(reading, Err(errno)),
    }
}

fn finish(reading: Rc<Reading>, result: Result<DmaBuf, Errno>) {
    let Some(done) = reading.done.take() else { return };
    let mut inspection = reading.inspection.clone();
    let bdev_name = inspection.bdev_name.clone();
    // Last reference (the other went with the completion closure): put the channel back and
    // close the descriptor before answering.
    drop(reading);
    let buffer = match result {
        Ok(buffer) => buffer,
        Err(errno) => return done(Err(InspectError::Read { bdev_name, errno })),
    };
    let copy = |offset: u64| {
        let start = offset as usize;
        &buffer.as_slice()[start..start + METADATA_PAGE_BYTES]
    };
    match superblock::choose(copy(SUPERBLOCK_OFFSETS[0]), copy(SUPERBLOCK_OFFSETS[1])) {
        Ok(superblock) => inspection.chronicle = Some(SuperblockInfo::new(&superblock)),
        Err(error) => inspection.detail = Some(format!("no chronicle superblock: {error}")),
    }
    spdk_info!(LOG, "chronicle: inspected {bdev_name}: {:?}", inspection.chronicle.as_ref().map(|info| &info.role));
    done(Ok(inspection));
}

/// Registers everything chronicle adds to an SPDK application. Runs once, from the ELF
/// constructor below, before `main` and before any SPDK thread exists.
extern "C" fn constructor() {
    if let Err(errno) = LOG.register() {
        spdk_error!("chronicle: cannot register the log component: {errno}");
    }
    if let Err(errno) = bdev_module::register::<Chronicle>() {
        spdk_error!("chronicle: cannot register the bdev module: {errno}");
    }
    if let Err(errno) = bdev_chronicle_rpc::register() {
        spdk_error!("chronicle: cannot register the RPC methods: {errno}");
    }
}

/// The constructor entry: what `__attribute__((constructor))` emits in C. `#[used]` keeps it
/// through linking (rustc also keeps `#[used]` statics of rlibs), so any binary or shared
/// library that links chronicle with the `spdk` feature registers the module.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;
