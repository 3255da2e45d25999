//! The `chronicle` SPDK module loaded into a stock `spdk_tgt` with `LD_PRELOAD`: the module
//! initialises, its RPC answers and refuses bad parameters, its log component exists, examine
//! of a new bdev finishes, and the application stops cleanly with it loaded.
//!
//! Needs an installed SPDK (`SPDK_DIR`, default `/opt/spdk`, with `bin/spdk_tgt` and shared
//! libraries). Without it the test prints "skipped: SPDK not found at …" and passes;
//! `CHRONICLE_SPDK_TESTS=skip` skips it (and says so) where SPDK exists.
//!
//! The module is `libchronicle.so` built with `--features spdk` (see `support/spdk.rs`:
//! `CHRONICLE_SPDK_MODULE`, or the one beside the test under `--features spdk`, or a release
//! build into `target/tmp/spdk-module` under a plain `cargo test`).

mod support;

use std::path::{Path, PathBuf};

use support::spdk::{module_library, require_spdk, say, serial, App, AppOptions};

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device};
use chronicle::engine::{format, FormatOptions};
use serde_json::{json, Value};

/// Formats a small volume on memory devices and writes its journal and history devices to
/// files, for `bdev_aio` to serve. Returns the two paths.
fn formatted_device_files(dir: &Path) -> (PathBuf, PathBuf) {
    const BLOCK: u32 = 512;
    const VOLUME_BYTES: u64 = 1 << 20;
    let shape = VolumeShape { host_write_size: 4096, volume_blocks: VOLUME_BYTES / 4096 };
    let options = LayoutOptions::default();
    let sizes = [
        VOLUME_BYTES,
        layout::recommended_journal_bytes(&shape, &options),
        VOLUME_BYTES,
        layout::recommended_history_bytes(&shape, &options),
    ];
    let names = ["base", "journal", "backup", "history"];
    let devices: [MemoryDevice; 4] = std::array::from_fn(|i| {
        MemoryDevice::new(names[i], MemoryOptions::new(BLOCK, sizes[i].div_ceil(u64::from(BLOCK))))
    });
    let channels: Vec<Box<dyn Channel>> = devices.iter().map(|device| device.open_channel().unwrap()).collect();
    let format_options = FormatOptions {
        names: ["Base0", "Journal0", "Backup0", "History0"].map(String::from),
        ..FormatOptions::default()
    };
    format(channels, &format_options, &mut |_| {}).unwrap();
    let journal = dir.join(format!("journal-{}.img", std::process::id()));
    let history = dir.join(format!("history-{}.img", std::process::id()));
    std::fs::write(&journal, devices[1].snapshot()).unwrap();
    std::fs::write(&history, devices[3].snapshot()).unwrap();
    (journal, history)
}

#[test]
fn spdk_tgt_loads_the_chronicle_module_with_ld_preload() {
    let Some(spdk_dir) = require_spdk("spdk_module") else { return };
    let _serial = serial();
    let module = module_library();
    say(&format!("spdk_module: LD_PRELOAD={} {}/bin/spdk_tgt", module.display(), spdk_dir.display()));
    let target = App::start(&spdk_dir, &module, AppOptions::spdk_tgt());

    // The module's init ran inside the bdev subsystem's init.
    let log = target.log_text();
    let loaded = format!("chronicle {} loaded (on-disk format 1", env!("CARGO_PKG_VERSION"));
    assert!(log.contains(&loaded), "no {loaded:?} in the target's log:\n{log}");

    // The RPC is registered, answers, and its answer is exact.
    let methods = target.result("rpc_get_methods", None);
    assert!(methods.as_array().unwrap().contains(&json!("bdev_chronicle_get_version")), "{methods}");
    let version = target.result("bdev_chronicle_get_version", None);
    assert_eq!(version["version"], json!(env!("CARGO_PKG_VERSION")), "{version}");
    assert_eq!(version["format_major"], json!(1), "{version}");
    let spdk_version = version["spdk_version"].as_str().unwrap_or_default();
    assert!(
        spdk_version.split('.').count() == 2 && spdk_version.split('.').all(|part| part.parse::<u32>().is_ok()),
        "{version}"
    );
    assert_eq!(target.result("bdev_chronicle_get_version", Some(json!({}))), version);

    // Parameters are decoded strictly: an unknown one is refused with "invalid params".
    let refused = target.call("bdev_chronicle_get_version", Some(json!({"bogus": 1})));
    assert_eq!(refused["error"]["code"], json!(-32602), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown field `bogus`"), "{refused}");

    // The log component exists and can be turned on.
    let flags = target.result("log_get_flags", None);
    assert_eq!(flags["chronicle"], json!(false), "{flags}");
    assert_eq!(target.result("log_set_flag", Some(json!({"flag": "chronicle"}))), json!(true));

    // A new bdev is examined by every module, chronicle's examine_disk included, and examine
    // finishes (it would hang bdev_wait_for_examine otherwise).
    let created =
        target.result("bdev_malloc_create", Some(json!({"name": "Malloc0", "num_blocks": 8192, "block_size": 4096})));
    assert_eq!(created, json!("Malloc0"));
    assert_eq!(target.result("bdev_wait_for_examine", None), json!(true));
    let bdevs = target.result("bdev_get_bdevs", Some(json!({"name": "Malloc0"})));
    assert_eq!(bdevs[0]["claimed"], json!(false), "{bdevs}");

    // bdev_chronicle_inspect reads superblocks through the safe layer (descriptor, channel,
    // DMA buffer, read, answer from the completion): chronicle devices are recognised, others
    // are not, a missing bdev is an error.
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (journal_file, history_file) = formatted_device_files(scratch);
    for (name, file) in [("Journal0", &journal_file), ("History0", &history_file)] {
        let params = json!({"name": name, "filename": file.to_str().unwrap(), "block_size": 512});
        assert_eq!(target.result("bdev_aio_create", Some(params)), json!(name));
    }
    let journal = target.result("bdev_chronicle_inspect", Some(json!({"bdev_name": "Journal0"})));
    let history = target.result("bdev_chronicle_inspect", Some(json!({"bdev_name": "History0"})));
    assert_eq!(journal["chronicle"]["role"], json!("journal"), "{journal}");
    assert_eq!(history["chronicle"]["role"], json!("history"), "{history}");
    assert_eq!(journal["chronicle"]["volume_uuid"], history["chronicle"]["volume_uuid"], "{journal} {history}");
    assert_eq!(journal["chronicle"]["host_write_size"], json!(4096), "{journal}");
    let peers = journal["chronicle"]["peers"].as_array().cloned().unwrap_or_default();
    assert!(peers.iter().any(|peer| peer["name"] == json!("Base0")), "{journal}");
    let malloc = target.result("bdev_chronicle_inspect", Some(json!({"bdev_name": "Malloc0"})));
    assert_eq!(malloc["chronicle"], Value::Null, "{malloc}");
    assert!(malloc["detail"].as_str().unwrap_or_default().contains("no chronicle superblock"), "{malloc}");
    assert_eq!(malloc["num_blocks"], json!(8192), "{malloc}");
    let missing = target.call("bdev_chronicle_inspect", Some(json!({"bdev_name": "Nope0"})));
    assert_eq!(missing["error"]["code"], json!(-libc::ENODEV), "{missing}");
    let no_name = target.call("bdev_chronicle_inspect", None);
    assert_eq!(no_name["error"]["code"], json!(-32602), "{no_name}");
    assert!(
        no_name["error"]["message"].as_str().unwrap_or_default().contains("missing field `bdev_name`"),
        "{no_name}"
    );
    // Inspection claims nothing and leaves no descriptor open: the bdev can be deleted.
    assert_eq!(target.result("bdev_aio_delete", Some(json!({"name": "Journal0"}))), json!(true));
    std::fs::remove_file(&journal_file).unwrap();
    std::fs::remove_file(&history_file).unwrap();

    // Stops cleanly with the module loaded (module_fini runs during the bdev subsystem's fini).
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    assert!(!log.contains("*ERROR*"), "errors in the target's log:\n{log}");
}
