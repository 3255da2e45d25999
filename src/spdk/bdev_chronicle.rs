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

use serde::Serialize;

use super::bdev::Bdev;
use super::bdev_module::{self, BdevModule, ExamineDone, ModuleSlot};
use super::log::LogFlag;
use super::{bdev_chronicle_rpc, Errno, SPDK_VERSION};
use crate::core::format::FORMAT_MAJOR;

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

/// Registers everything chronicle adds to an SPDK application. Runs once, from the ELF
/// constructor below, before `main` and before any SPDK thread exists.
extern "C" fn constructor() {
    LOG.register();
    bdev_module::register::<Chronicle>();
    bdev_chronicle_rpc::register();
}

/// The constructor entry: what `__attribute__((constructor))` emits in C. `#[used]` keeps it
/// through linking (rustc also keeps `#[used]` statics of rlibs), so any binary or shared
/// library that links chronicle with the `spdk` feature registers the module.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;
