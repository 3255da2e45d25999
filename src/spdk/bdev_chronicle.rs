//! The `chronicle` bdev module: registration, module init/fini, examine, the chronicle bdev's
//! hooks (channels, submit, destruct, info and config JSON) and superblock reading.
//!
//! Loading `libchronicle.so` (e.g. `LD_PRELOAD` into `spdk_tgt`, `bdevperf` or fio's
//! `spdk_bdev` plugin) runs [`constructor`] before the application's `main`: it registers the
//! log component `chronicle`, the bdev module `chronicle` and the `bdev_chronicle_*` RPC
//! methods, as SPDK's `SPDK_LOG_REGISTER_COMPONENT`, `SPDK_BDEV_MODULE_REGISTER` and
//! `SPDK_RPC_REGISTER` constructors do for modules written in C.
//!
//! Volumes themselves (create, format or open, the poller, close) live in
//! [`bdev_chronicle_volume`](super::bdev_chronicle_volume); this file is what SPDK calls.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::bdev::{bdev_exists, Bdev, BdevDesc, BdevIo, IoChannel, IoStatus, IoType, SharedDesc};
use super::bdev_chronicle_volume::{self as volume, CreateMode, VolumeConfig};
use super::bdev_module::{self, BdevModule, ExamineDone, ModuleSlot};
use super::dma::DmaBuf;
use super::json::JsonWriter;
use super::log::LogFlag;
use super::thread::ThreadHandle;
use super::vbdev::{DestructDone, VirtualBdev};
use super::{bdev_chronicle_rpc, Errno, SPDK_VERSION};
use crate::core::format::superblock::{self, DeviceRole, Superblock, SUPERBLOCK_OFFSETS};
use crate::core::format::{FormatError, FORMAT_MAJOR, METADATA_PAGE_BYTES};
use crate::engine::RestoreId;

/// Log component `chronicle` (`--logflag chronicle`, `log_set_flag chronicle`).
pub static LOG: LogFlag = LogFlag::new(c"chronicle");

static MODULE: ModuleSlot = ModuleSlot::new();

/// The `chronicle` bdev module.
pub struct Chronicle;

impl BdevModule for Chronicle {
    const NAME: &'static std::ffi::CStr = c"chronicle";
    // Every new bdev is looked at: it may hold a chronicle volume's superblock.
    const EXAMINE_DISK: bool = true;
    // A host I/O carries its request to the volume's thread and its status back in here.
    type IoCtx = volume::HostIoCtx;

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
        volume::clear();
        spdk_info!(LOG, "chronicle: module stopped");
    }

    fn examine_disk(bdev: Bdev<'_>, done: ExamineDone) {
        if bdev.module_name() == "chronicle" {
            return done.finish();
        }
        examine(bdev.name(), done);
    }
}

/// A volume seen by examine, waiting for its four bdevs (named in its superblocks).
#[derive(Debug, Clone)]
struct Candidate {
    volume_name: String,
    /// Base, journal, backup, history.
    names: [String; 4],
}

thread_local! {
    /// Volumes whose journal or history examine found, by volume uuid (app thread).
    static CANDIDATES: RefCell<FxHashMap<[u8; 16], Candidate>> = RefCell::new(FxHashMap::default());
}

/// examine: a bdev holding a chronicle superblock names its volume and the volume's other
/// bdevs; once all four exist the volume is opened (recovering, never formatting) and its
/// bdev registered under the name recorded at format. `done` is held until then, so
/// `bdev_wait_for_examine` and startup wait for the volume.
fn examine(name: String, done: ExamineDone) {
    read_superblocks(&name, move |read| {
        if let Ok(SuperblockRead { state: SuperblockState::Chronicle(superblock), bdev_name, .. }) = &read {
            remember(bdev_name, superblock);
        }
        assemble(done);
    });
}

fn remember(bdev_name: &str, superblock: &Superblock) {
    let mut names: [String; 4] = Default::default();
    let index = |role: DeviceRole| role as usize - 1;
    names[index(superblock.role)] = bdev_name.to_string();
    for peer in &superblock.peers {
        names[index(peer.role)].clone_from(&peer.name);
    }
    if superblock.volume_name.is_empty() {
        spdk_notice!(
            "chronicle: {bdev_name} holds the {:?} device of an unnamed volume {}; create it with bdev_chronicle_create",
            superblock.role,
            uuid::Uuid::from_bytes(superblock.volume_uuid)
        );
        return;
    }
    spdk_info!(
        LOG,
        "chronicle: {bdev_name} holds the {:?} device of volume {}",
        superblock.role,
        superblock.volume_name
    );
    CANDIDATES.with(|candidates| {
        candidates
            .borrow_mut()
            .insert(superblock.volume_uuid, Candidate { volume_name: superblock.volume_name.clone(), names });
    });
}

/// Opens every remembered volume whose four bdevs now exist; `done` finishes when they are
/// registered (or failed).
fn assemble(done: ExamineDone) {
    let ready: Vec<Candidate> = CANDIDATES.with(|candidates| {
        let mut candidates = candidates.borrow_mut();
        let ready: Vec<[u8; 16]> = candidates
            .iter()
            .filter(|(_, c)| c.names.iter().all(|name| !name.is_empty() && bdev_exists(name)))
            .map(|(uuid, _)| *uuid)
            .collect();
        ready.iter().filter_map(|uuid| candidates.remove(uuid)).collect()
    });
    if ready.is_empty() {
        return done.finish();
    }
    // Every volume's callback holds the examine open; the last one to finish ends it.
    let done = Rc::new(done);
    for candidate in ready {
        let [base, journal, backup, history] = candidate.names;
        let config = VolumeConfig {
            name: candidate.volume_name,
            base_bdev: base,
            journal_bdev: journal,
            backup_bdev: backup,
            history_bdev: history,
            host_write_size: None,
            durability: None,
            journal_full: None,
            journal_mode: None,
            strict: None,
            copy_base_to_backup: false,
            automatic_sort: true,
            follow_submitter: true,
            sort_rate_limit_bytes_per_second: None,
            retention: None,
            marker_read_back_bytes: None,
        };
        let name = config.name.clone();
        let hold = done.clone();
        volume::create(
            config,
            CreateMode::OpenOnly,
            Box::new(move |result| {
                match result {
                    Ok(name) => spdk_notice!("chronicle: examine found volume {name} and registered it"),
                    Err(error) => spdk_error!("chronicle: examine found volume {name} but cannot open it: {error}"),
                }
                drop(hold);
            }),
        );
    }
    drop(done);
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
    /// The volume's name (recorded at format; empty if unnamed).
    pub volume_name: String,
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
            volume_name: superblock.volume_name.clone(),
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

/// Why a bdev's superblocks could not be read.
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

    pub fn bdev_name(&self) -> &str {
        match self {
            InspectError::Open { bdev_name, .. }
            | InspectError::Resources { bdev_name, .. }
            | InspectError::Read { bdev_name, .. } => bdev_name,
        }
    }
}

/// What a bdev's first 8 KiB say.
#[derive(Debug, Clone)]
pub enum SuperblockState {
    /// Neither copy is a chronicle superblock (no magic): not a chronicle device.
    Blank,
    /// Smaller than a superblock pair.
    TooSmall,
    /// The newest valid copy.
    Chronicle(Superblock),
    /// A chronicle superblock that cannot be used (checksum, version, fields).
    Damaged(FormatError),
}

/// The superblocks of one bdev.
#[derive(Debug, Clone)]
pub struct SuperblockRead {
    pub bdev_name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    pub state: SuperblockState,
}

type ReadDone = Box<dyn FnOnce(Result<SuperblockRead, InspectError>)>;

/// One superblock read in flight. Field order is drop order: the channel is put back before
/// the descriptor closes.
struct Reading {
    channel: IoChannel,
    desc: BdevDesc,
    read: SuperblockRead,
    num_blocks: u64,
    done: Cell<Option<ReadDone>>,
}

/// Reads both superblock copies of bdev `bdev_name` (read-only, unclaimed); `done` runs on
/// this thread, later, or now if the bdev cannot be opened.
pub fn read_superblocks(bdev_name: &str, done: impl FnOnce(Result<SuperblockRead, InspectError>) + 'static) {
    // Nothing to do on hot-remove: the read then fails, and the descriptor closes with it.
    let desc = match BdevDesc::open(bdev_name, false, |_, _| {}) {
        Ok(desc) => desc,
        Err(errno) => return done(Err(InspectError::Open { bdev_name: bdev_name.to_string(), errno })),
    };
    let bdev = desc.bdev();
    let mut read = SuperblockRead {
        bdev_name: bdev.name(),
        block_size: bdev.block_size(),
        num_blocks: bdev.num_blocks(),
        state: SuperblockState::TooSmall,
    };
    // Both copies, each a whole metadata page.
    let bytes_needed = SUPERBLOCK_OFFSETS[1] + METADATA_PAGE_BYTES as u64;
    let block_size = u64::from(read.block_size);
    if read.num_blocks.saturating_mul(block_size) < bytes_needed {
        return done(Ok(read));
    }
    read.state = SuperblockState::Blank;
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
    let reading = Reading { channel, desc, read, num_blocks, done: Cell::new(Some(Box::new(done))) };
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
            if let Err((errno, _retry)) = reading.desc.queue_io_wait(&reading.channel, move || submit(again, buffer)) {
                finish(reading, Err(errno));
            }
        }
        Err((errno, _)) => finish(reading, Err(errno)),
    }
}

fn finish(reading: Rc<Reading>, result: Result<DmaBuf, Errno>) {
    let Some(done) = reading.done.take() else { return };
    let mut read = reading.read.clone();
    // Last reference (the other went with the completion closure): put the channel back and
    // close the descriptor before answering.
    drop(reading);
    let buffer = match result {
        Ok(buffer) => buffer,
        Err(errno) => return done(Err(InspectError::Read { bdev_name: read.bdev_name, errno })),
    };
    let copy = |offset: u64| {
        let start = offset as usize;
        &buffer.as_slice()[start..start + METADATA_PAGE_BYTES]
    };
    let (a, b) = (copy(SUPERBLOCK_OFFSETS[0]), copy(SUPERBLOCK_OFFSETS[1]));
    read.state = match superblock::choose(a, b) {
        Ok(superblock) => SuperblockState::Chronicle(superblock),
        Err(error) => {
            let no_magic = |bytes: &[u8]| &bytes[..superblock::MAGIC.len()] != superblock::MAGIC;
            if no_magic(a) && no_magic(b) {
                SuperblockState::Blank
            } else {
                SuperblockState::Damaged(error)
            }
        }
    };
    spdk_debug!(LOG, "chronicle: superblocks of {}: {:?}", read.bdev_name, read.state);
    done(Ok(read));
}

/// Reads bdev `bdev_name`'s superblocks and reports what they say (`bdev_chronicle_inspect`).
pub fn inspect(bdev_name: &str, done: impl FnOnce(Result<Inspection, InspectError>) + 'static) {
    read_superblocks(bdev_name, move |read| {
        done(read.map(|read| {
            let (chronicle, detail) = match &read.state {
                SuperblockState::Chronicle(superblock) => (Some(SuperblockInfo::new(superblock)), None),
                SuperblockState::Blank => (None, Some("no chronicle superblock (no magic in either copy)".to_string())),
                SuperblockState::TooSmall => (
                    None,
                    Some(format!(
                        "smaller than the {} bytes of a chronicle superblock pair",
                        SUPERBLOCK_OFFSETS[1] + METADATA_PAGE_BYTES as u64
                    )),
                ),
                SuperblockState::Damaged(error) => (None, Some(format!("damaged chronicle superblock: {error}"))),
            };
            Inspection {
                bdev_name: read.bdev_name,
                block_size: read.block_size,
                num_blocks: read.num_blocks,
                chronicle,
                detail,
            }
        }))
    });
}

/// The chronicle bdev as SPDK sees it: shared by every thread that does I/O to it, so only
/// the volume's id and owner thread, and a read-only descriptor of the base; the volume itself
/// stays on its owner thread.
pub struct ChronicleBdev {
    id: u64,
    name: String,
    owner: ThreadHandle,
    /// Reads go straight to the base from the submitting thread: the base always holds the
    /// volume's newest completed writes (the write path writes it last), so a read needs
    /// neither the volume's thread nor its metadata — the cost of a passthru.
    base: SharedDesc,
    /// Rollbacks not finished. While there is one, reads go to the volume's thread instead,
    /// where the engine holds them until the rollback is done: no reader sees the image half
    /// rolled back.
    rollbacks: Arc<AtomicU32>,
    /// Open channels to the volume (this bdev's and its R-VOLs'): it moves only for a lone one.
    channels: Arc<AtomicUsize>,
}

impl ChronicleBdev {
    pub(crate) fn new(
        id: u64,
        name: String,
        owner: ThreadHandle,
        base: SharedDesc,
        rollbacks: Arc<AtomicU32>,
        channels: Arc<AtomicUsize>,
    ) -> Self {
        ChronicleBdev { id, name, owner, base, rollbacks, channels }
    }
}

/// A thread's channel to a chronicle bdev.
pub struct ChronicleChannel {
    /// Where writes (and reads during a rollback) go: the volume, or this thread's hop to it.
    path: volume::HostPath,
    /// This thread's channel to the base, for reads.
    base: IoChannel,
}

impl VirtualBdev for ChronicleBdev {
    type Module = Chronicle;
    type Channel = ChronicleChannel;

    fn create_channel(&self) -> Result<ChronicleChannel, Errno> {
        let path = volume::HostPath::new(self.id, None, self.owner, self.channels.clone())?;
        Ok(ChronicleChannel { path, base: self.base.desc().io_channel()? })
    }

    fn submit_request(&self, channel: &mut ChronicleChannel, io: BdevIo<volume::HostIoCtx>) {
        // Reads go straight to the base, except while a rollback is pending (the engine holds
        // them until it is done).
        if io.io_type() == IoType::Read && self.rollbacks.load(Ordering::Acquire) == 0 {
            if let Err((errno, io)) = io.forward_read(self.base.desc(), &channel.base) {
                // ENOMEM: the bdev layer retries a NOMEM I/O when resources come back.
                let status = if errno == Errno::ENOMEM { IoStatus::NoMem } else { IoStatus::Failed };
                io.complete(status);
            }
            return;
        }
        volume::submit_io(&channel.path, io)
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        // Unmap and write-zeroes are journaled as writes of zeroes: supported whatever the base.
        matches!(io_type, IoType::Read | IoType::Write | IoType::Flush | IoType::Unmap | IoType::WriteZeroes)
    }

    fn destruct(&self, done: DestructDone) {
        spdk_info!(LOG, "chronicle: destruct {}", self.name);
        volume::destruct_by_id(self.id, done);
    }

    fn dump_info_json(&self, writer: &mut JsonWriter<'_>) {
        // bdev_get_bdevs runs on the app thread, the volume's owner.
        if !self.owner.is_current() {
            return;
        }
        let Some(config) = volume::config_by_id(self.id) else { return };
        // None while the volume is away on its submitter's thread (a synchronous callback cannot
        // call it home): then only what the app thread keeps; `bdev_chronicle_get_status` has
        // the rest.
        let report = volume::status_by_id(self.id);
        let engine = report.as_ref().and_then(|report| report.volume.as_ref());
        let summary = serde_json::json!({
            "state": report.as_ref().map_or("running", |report| report.state),
            "volume_uuid": report.as_ref().and_then(|report| report.volume_uuid.clone()),
            "base_bdev": config.base_bdev,
            "journal_bdev": config.journal_bdev,
            "backup_bdev": config.backup_bdev,
            "history_bdev": config.history_bdev,
            "open_generation": engine.map(|v| v.open_generation),
            "backup_generation": engine.map(|v| v.backup_generation),
            "residence": if report.is_some() { "home" } else { "away" },
        });
        let _ = writer.write_named("chronicle", &summary);
    }

    fn write_config_json(&self, writer: &mut JsonWriter<'_>) {
        if !self.owner.is_current() {
            return;
        }
        if let Some(config) = volume::config_by_id(self.id) {
            let _ = writer.write(&serde_json::json!({"method": "bdev_chronicle_create", "params": config}));
        }
    }
}

/// A restore volume (R-VOL, seed 001 FIG 13–15) of a chronicle volume as a bdev: every I/O
/// goes to the volume's thread, where the engine reads the generation's map and redirects
/// writes into the R-VOL's own units.
pub struct RestoreBdev {
    volume: u64,
    restore: RestoreId,
    name: String,
    owner: ThreadHandle,
    channels: Arc<AtomicUsize>,
}

impl RestoreBdev {
    pub(crate) fn new(
        volume: u64,
        restore: RestoreId,
        name: String,
        owner: ThreadHandle,
        channels: Arc<AtomicUsize>,
    ) -> Self {
        RestoreBdev { volume, restore, name, owner, channels }
    }
}

/// A thread's channel to an R-VOL bdev: where its I/O goes (the volume, or this thread's hop
/// to it).
pub struct RestoreChannel {
    path: volume::HostPath,
}

impl VirtualBdev for RestoreBdev {
    type Module = Chronicle;
    type Channel = RestoreChannel;

    fn create_channel(&self) -> Result<RestoreChannel, Errno> {
        Ok(RestoreChannel {
            path: volume::HostPath::new(self.volume, Some(self.restore), self.owner, self.channels.clone())?,
        })
    }

    fn submit_request(&self, channel: &mut RestoreChannel, io: BdevIo<volume::HostIoCtx>) {
        volume::submit_io(&channel.path, io)
    }

    fn io_type_supported(&self, io_type: IoType) -> bool {
        matches!(io_type, IoType::Read | IoType::Write | IoType::Flush | IoType::Unmap | IoType::WriteZeroes)
    }

    fn destruct(&self, done: DestructDone) {
        spdk_info!(LOG, "chronicle: destruct restore volume {}", self.name);
        volume::restore_destruct(self.volume, &self.name, done);
    }

    fn dump_info_json(&self, writer: &mut JsonWriter<'_>) {
        if !self.owner.is_current() {
            return;
        }
        if let Some(info) = volume::restore_info(self.volume, self.restore) {
            let _ = writer.write_named("chronicle_restore", &info);
        }
    }
    // No write_config_json: an R-VOL lives in memory (its writes end with it), so a replayed
    // configuration must not pretend to bring it back.
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
