//! The chronicle bdev's control plane in a stock `spdk_tgt` (module preloaded): the RPC
//! lifecycle of a volume (create, mark, generations, status, save_config, delete, create
//! again), bad parameters refused with nothing left behind, and requests about volumes that do
//! not exist.
//!
//! Needs an installed SPDK (`SPDK_DIR`, default `/opt/spdk`); without it every test prints
//! "skipped: SPDK not found at …" and passes. See `support/spdk.rs` for how the module is built
//! and how applications are started (no hugepages, unique shm ids and sockets).

mod support;

use serde_json::{json, Value};
use support::spdk::{module_library, require_spdk, serial, App, AppOptions, MallocVolume};

/// 64 MiB volumes of 4 KiB blocks for the lifecycle; 16 MiB ones where many are made.
const LIFECYCLE_BLOCKS: u64 = 16_384;
const SMALL_BLOCKS: u64 = 4_096;
const BLOCK: u32 = 4096;

const ENODEV: i64 = -(libc::ENODEV as i64);
const EINVAL: i64 = -(libc::EINVAL as i64);
const EBUSY: i64 = -(libc::EBUSY as i64);
const INVALID_PARAMS: i64 = -32602;

fn bdev(app: &App, name: &str) -> Value {
    let bdevs = app.result("bdev_get_bdevs", Some(json!({"name": name})));
    assert_eq!(bdevs.as_array().map(Vec::len), Some(1), "bdev_get_bdevs {name}: {bdevs}");
    bdevs[0].clone()
}

fn is_claimed(app: &App, name: &str) -> bool {
    bdev(app, name)["claimed"].as_bool().unwrap_or_else(|| panic!("no `claimed` for {name}"))
}

/// Names of the chronicle bdevs registered in the application.
fn chronicle_bdevs(app: &App) -> Vec<String> {
    let bdevs = app.result("bdev_get_bdevs", None);
    bdevs
        .as_array()
        .expect("bdev list")
        .iter()
        .filter(|bdev| bdev["product_name"] == json!("chronicle"))
        .map(|bdev| bdev["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `(generation, state, comment)` of every generation of a volume.
fn generations(app: &App, name: &str) -> Vec<(u64, String, String)> {
    let list = app.result("bdev_chronicle_get_generations", Some(json!({"name": name})));
    list.as_array()
        .unwrap_or_else(|| panic!("generations of {name}: {list}"))
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().expect("generation number"),
                g["state"].as_str().expect("state").to_string(),
                g["comment"].as_str().expect("comment").to_string(),
            )
        })
        .collect()
}

/// A refused create leaves nothing behind: no chronicle bdev named `volume`, the module has
/// forgotten it, none of `bdevs` is claimed, and the journal and history carry no superblock
/// (nothing was written to them, so a later create formats them as new).
fn assert_nothing_left_behind(app: &App, volume: &MallocVolume, case: &str) {
    assert!(
        !chronicle_bdevs(app).contains(&volume.name),
        "{case}: a chronicle bdev {} is registered after a refused create",
        volume.name
    );
    let (code, message) = app.error("bdev_chronicle_get_status", Some(json!({"name": volume.name})));
    assert_eq!(code, ENODEV, "{case}: the module still knows {}: {message}", volume.name);
    for name in volume.bdevs() {
        assert!(!is_claimed(app, &name), "{case}: {name} is still claimed:\n{}", bdev(app, &name));
    }
    for name in [volume.journal(), volume.history()] {
        let inspection = app.result("bdev_chronicle_inspect", Some(json!({"bdev_name": name})));
        assert_eq!(inspection["chronicle"], Value::Null, "{case}: {name} was written to: {inspection}");
    }
}

/// Creates a volume on four malloc bdevs, cuts two generations, reads its generations, status,
/// bdev description and saved config, deletes it (the bdevs are released), and creates it
/// again on the same bdevs: that opens the volume they hold, generations and all.
#[test]
fn a_volume_is_created_marked_described_deleted_and_opened_again() {
    let Some(spdk_dir) = require_spdk("spdk_volume lifecycle") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    let volume = MallocVolume::new("Life", LIFECYCLE_BLOCKS, BLOCK);

    // Create: the answer is the new bdev's name.
    assert_eq!(volume.create(&target, json!({})), json!("Life"));

    // The chronicle bdev has the base's geometry and describes its volume.
    let described = bdev(&target, "Life");
    assert_eq!(described["product_name"], json!("chronicle"), "{described}");
    assert_eq!(described["block_size"], json!(BLOCK), "{described}");
    assert_eq!(described["num_blocks"], json!(LIFECYCLE_BLOCKS), "{described}");
    let info = &described["driver_specific"]["chronicle"];
    assert_eq!(info["state"], json!("running"), "{described}");
    assert_eq!(info["base_bdev"], json!(volume.base()), "{described}");
    assert_eq!(info["journal_bdev"], json!(volume.journal()), "{described}");
    assert_eq!(info["backup_bdev"], json!(volume.backup()), "{described}");
    assert_eq!(info["history_bdev"], json!(volume.history()), "{described}");
    assert_eq!(info["open_generation"], json!(1), "a new volume writes generation 1: {described}");
    // The volume's uuid is the bdev's.
    assert_eq!(info["volume_uuid"], described["uuid"], "{described}");
    // The four bdevs below are claimed by chronicle (one writer: the volume).
    for name in volume.bdevs() {
        let base = bdev(&target, &name);
        assert_eq!(base["claimed"], json!(true), "{base}");
        assert_eq!(base["claim_type"], json!("read_many_write_one"), "{base}");
    }

    // Markers seal generations 1 and 2, in order, with their comments.
    let first = target.result("bdev_chronicle_mark", Some(json!({"name": "Life", "comment": "first"})));
    let second = target.result("bdev_chronicle_mark", Some(json!({"name": "Life", "comment": "second"})));
    assert_eq!((first, second), (json!(1), json!(2)));
    let listed = generations(&target, "Life");
    let numbers: Vec<u64> = listed.iter().map(|(g, _, _)| *g).collect();
    assert_eq!(numbers, [0, 1, 2, 3], "generation 0 (format), the two sealed ones, the open one: {listed:?}");
    assert_eq!(listed[1].2, "first", "{listed:?}");
    assert_eq!(listed[2].2, "second", "{listed:?}");
    assert_eq!(listed[3].1, "open", "{listed:?}");
    // Sealed generations wait for the sort or have been sorted: never open.
    for (generation, state, _) in &listed[..3] {
        assert!(["sealed", "backup", "history"].contains(&state.as_str()), "generation {generation}: {listed:?}");
    }

    // Status: running, generation 3 open, journal and history sized and accounted.
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Life"})));
    assert_eq!(status["state"], json!("running"), "{status}");
    assert_eq!(status["name"], json!("Life"), "{status}");
    let engine = &status["volume"];
    assert_eq!(engine["open_generation"], json!(3), "{status}");
    assert_eq!(engine["volume_bytes"], json!(LIFECYCLE_BLOCKS * u64::from(BLOCK)), "{status}");
    assert_eq!(engine["host_write_size"], json!(4096), "{status}");
    assert!(engine["journal_capacity_elements"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(engine["history_capacity_units"].as_u64().unwrap_or(0) > 0, "{status}");
    assert!(engine["journal_used_elements"].as_u64().is_some(), "{status}");
    assert!(engine["history_used_units"].as_u64().is_some(), "{status}");
    assert_eq!(engine["control"]["markers"], json!(2), "{status}");
    assert_eq!(engine["failed"], Value::Null, "{status}");
    assert_eq!(status["io"]["completed_with_error"], json!(0), "{status}");

    // save_config (rpc.py builds it from framework_get_config) re-creates the same volume.
    let config = target.result("framework_get_config", Some(json!({"name": "bdev"})));
    let creates: Vec<&Value> =
        config.as_array().expect("bdev config").iter().filter(|m| m["method"] == "bdev_chronicle_create").collect();
    assert_eq!(creates.len(), 1, "{config}");
    let saved = &creates[0]["params"];
    for (key, value) in volume.create_params(json!({})).as_object().expect("params") {
        assert_eq!(&saved[key], value, "saved config differs in {key}: {saved}");
    }
    // What the volume is, recorded so that a replay opens exactly this volume.
    assert_eq!(saved["host_write_size"], json!(4096), "{saved}");
    assert_eq!(saved["durability"], json!("flush"), "{saved}");

    // Delete: the bdev goes, the bdevs below are released.
    assert_eq!(target.result("bdev_chronicle_delete", Some(json!({"name": "Life"}))), json!(true));
    let gone = target.call("bdev_get_bdevs", Some(json!({"name": "Life"})));
    assert_eq!(gone["error"]["code"], json!(ENODEV), "the chronicle bdev is still there: {gone}");
    assert!(chronicle_bdevs(&target).is_empty());
    for name in volume.bdevs() {
        assert!(!is_claimed(&target, &name), "{name} is still claimed after delete");
    }
    let (code, _) = target.error("bdev_chronicle_get_status", Some(json!({"name": "Life"})));
    assert_eq!(code, ENODEV);

    // Create again on the same bdevs opens the volume they hold: the data stayed there.
    let again = target.result("bdev_chronicle_create", Some(volume.create_params(json!({}))));
    assert_eq!(again, json!("Life"));
    let reopened = generations(&target, "Life");
    let sealed: Vec<(u64, &str)> = reopened.iter().map(|(g, _, c)| (*g, c.as_str())).take(3).collect();
    assert_eq!(sealed, [(0, "format"), (1, "first"), (2, "second")], "{reopened:?}");
    assert_eq!(reopened.last().map(|(_, state, _)| state.as_str()), Some("open"), "{reopened:?}");
    assert_eq!(bdev(&target, "Life")["uuid"], described["uuid"], "a reopened volume keeps its uuid");
    let log = target.log_text();
    assert!(log.contains("chronicle: opening Life"), "the second create did not open:\n{log}");

    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    assert!(!log.contains("*ERROR*"), "errors in the target's log:\n{log}");
}

/// Each kind of bad parameter is refused with a JSON-RPC error naming the problem, and leaves
/// nothing behind: no bdev registered, nothing claimed, nothing written; a correct create on
/// the same bdevs afterwards succeeds.
#[test]
fn bad_create_parameters_are_refused_and_leave_nothing_behind() {
    let Some(spdk_dir) = require_spdk("spdk_volume bad parameters") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    let volume = MallocVolume::new("Bad", SMALL_BLOCKS, BLOCK);
    volume.create_bdevs(&target);
    // A journal far smaller than metadata plus the minimum number of elements.
    let tiny = json!({"name": "Tiny", "num_blocks": 16, "block_size": BLOCK});
    assert_eq!(target.result("bdev_malloc_create", Some(tiny)), json!("Tiny"));
    // Another module's bdev on top of a spare bdev claims it.
    let spare = json!({"name": "Spare", "num_blocks": SMALL_BLOCKS, "block_size": BLOCK});
    assert_eq!(target.result("bdev_malloc_create", Some(spare)), json!("Spare"));
    let passthru = json!({"base_bdev_name": "Spare", "name": "SparePassthru"});
    assert_eq!(target.result("bdev_passthru_create", Some(passthru)), json!("SparePassthru"));
    // Another chronicle volume holds its own four bdevs.
    let other = MallocVolume::new("Other", SMALL_BLOCKS, BLOCK);
    assert_eq!(other.create(&target, json!({})), json!("Other"));

    // (code, words the message must contain, parameters).
    let cases: Vec<(&str, i64, Vec<&str>, Value)> = vec![
        ("a missing bdev", ENODEV, vec!["journal", "Nowhere", "does not exist"], json!({"journal_bdev": "Nowhere"})),
        ("a journal too small", EINVAL, vec!["journal", "needs at least"], json!({"journal_bdev": "Tiny"})),
        ("one bdev in two roles", EINVAL, vec!["BadBase", "base", "backup"], json!({"backup_bdev": volume.base()})),
        ("a host write size of 3000", EINVAL, vec!["host_write_size", "3000"], json!({"host_write_size": 3000})),
        ("an unknown parameter", INVALID_PARAMS, vec!["unknown field `bogus`"], json!({"bogus": 1})),
    ];
    for (case, code, words, bad) in cases {
        let (got, message) = target.error("bdev_chronicle_create", Some(volume.create_params(bad)));
        assert_eq!(got, code, "{case}: {message}");
        for word in words {
            assert!(message.contains(word), "{case}: the message does not say {word:?}: {message}");
        }
        assert_nothing_left_behind(&target, &volume, case);
        assert!(!is_claimed(&target, "Tiny"), "{case}: Tiny is claimed");
    }

    // Bdevs claimed by someone else are refused as busy, and their owners keep them.
    for (case, bad, claimed) in [
        ("a bdev claimed by passthru", json!({"backup_bdev": "Spare"}), "Spare"),
        ("the base bdev of another chronicle volume", json!({"base_bdev": other.base()}), "OtherBase"),
    ] {
        let (code, message) = target.error("bdev_chronicle_create", Some(volume.create_params(bad)));
        assert_eq!(code, EBUSY, "{case}: {message}");
        assert!(message.contains("already claimed"), "{case}: the message does not say claimed: {message}");
        assert!(message.contains(claimed), "{case}: the message does not name {claimed}: {message}");
        assert_nothing_left_behind(&target, &volume, case);
        assert!(is_claimed(&target, claimed), "{case}: {claimed} lost its owner's claim");
    }
    // A bdev of a running volume that holds its superblock (journal, history) is refused too,
    // with whatever reason comes first (see
    // `a_device_of_a_running_volume_is_refused_as_busy_not_as_foreign` for which it should be).
    let (code, message) =
        target.error("bdev_chronicle_create", Some(volume.create_params(json!({"history_bdev": other.history()}))));
    assert!(code < 0 && message.contains("OtherHistory"), "{code} {message}");
    assert_nothing_left_behind(&target, &volume, "the history bdev of another chronicle volume");
    assert!(is_claimed(&target, "OtherHistory"), "OtherHistory lost its owner's claim");
    // The other volume is untouched.
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Other"})));
    assert_eq!(status["state"], json!("running"), "{status}");
    assert_eq!(chronicle_bdevs(&target), ["Other"]);

    // A correct create on the same bdevs succeeds: nothing was left behind.
    assert_eq!(target.result("bdev_chronicle_create", Some(volume.create_params(json!({})))), json!("Bad"));
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Bad"})));
    assert_eq!(status["state"], json!("running"), "{status}");
    assert_eq!(bdev(&target, "Bad")["num_blocks"], json!(SMALL_BLOCKS));

    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
}

/// A journal or history bdev in use by a running volume, given to a new create, is refused as
/// busy (`-EBUSY`, "already claimed"), like any other claimed bdev: that it holds another
/// volume's superblock is true, but the reason nothing can be done with it is that it is in use.
#[test]
fn a_device_of_a_running_volume_is_refused_as_busy_not_as_foreign() {
    let Some(spdk_dir) = require_spdk("spdk_volume device of a running volume") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    let volume = MallocVolume::new("Want", SMALL_BLOCKS, BLOCK);
    volume.create_bdevs(&target);
    let other = MallocVolume::new("Other", SMALL_BLOCKS, BLOCK);
    assert_eq!(other.create(&target, json!({})), json!("Other"));
    for (case, bad, claimed) in [
        ("its journal", json!({"journal_bdev": other.journal()}), "OtherJournal"),
        ("its history", json!({"history_bdev": other.history()}), "OtherHistory"),
    ] {
        let (code, message) = target.error("bdev_chronicle_create", Some(volume.create_params(bad)));
        assert_eq!(code, EBUSY, "{case}: {message}");
        assert!(message.contains("already claimed") && message.contains(claimed), "{case}: {message}");
        assert_nothing_left_behind(&target, &volume, case);
    }
}

/// Requests about a volume that does not exist answer `-ENODEV` and say which name.
#[test]
fn requests_about_a_missing_volume_are_refused_with_enodev() {
    let Some(spdk_dir) = require_spdk("spdk_volume missing volume") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    // A bdev that exists but is no chronicle volume is not one either.
    let malloc = json!({"name": "Plain", "num_blocks": 1024, "block_size": BLOCK});
    assert_eq!(target.result("bdev_malloc_create", Some(malloc)), json!("Plain"));
    for name in ["Ghost", "Plain"] {
        for (method, params) in [
            ("bdev_chronicle_mark", json!({"name": name, "comment": "nothing to seal"})),
            ("bdev_chronicle_get_status", json!({"name": name})),
            ("bdev_chronicle_get_generations", json!({"name": name})),
            ("bdev_chronicle_delete", json!({"name": name})),
        ] {
            let (code, message) = target.error(method, Some(params));
            assert_eq!(code, ENODEV, "{method} {name}: {message}");
            assert!(message.contains(name), "{method} {name}: the message does not name it: {message}");
        }
    }
    // Nothing was deleted by mistake.
    assert_eq!(bdev(&target, "Plain")["name"], json!("Plain"));

    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    assert!(!log.contains("*ERROR*"), "errors in the target's log:\n{log}");
}

/// Restore volumes (R-VOLs) through the RPCs: one opens on a history generation as a bdev of
/// the volume's geometry that reads that generation's image (zeros here: nothing was written
/// before the first marker) and takes writes; bad requests are refused and register nothing;
/// deleting the R-VOL removes its bdev; deleting the volume takes its R-VOLs with it.
#[test]
fn restore_volumes_are_opened_refused_deleted_and_go_with_their_volume() {
    let Some(spdk_dir) = require_spdk("spdk_volume restore volumes") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    let volume = MallocVolume::new("Rv", SMALL_BLOCKS, BLOCK);
    assert_eq!(volume.create(&target, json!({})), json!("Rv"));
    // Generation 1 (empty) and 2 sealed; the sort takes 1 to history once 2 is sealed.
    for comment in ["one", "two", "three"] {
        target.result("bdev_chronicle_mark", Some(json!({"name": "Rv", "comment": comment})));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while generations(&target, "Rv").iter().any(|(g, state, _)| *g == 1 && state != "history") {
        assert!(
            std::time::Instant::now() < deadline,
            "generation 1 never reached history: {:?}",
            generations(&target, "Rv")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let opened =
        target.result("bdev_chronicle_restore", Some(json!({"name": "Rv", "generation": 1, "restore_name": "Rv-1"})));
    assert_eq!(opened, json!("Rv-1"));
    let described = bdev(&target, "Rv-1");
    assert_eq!(described["product_name"], json!("chronicle restore"), "{described}");
    assert_eq!(described["block_size"], json!(BLOCK), "{described}");
    assert_eq!(described["num_blocks"], json!(SMALL_BLOCKS), "{described}");
    assert_eq!(described["driver_specific"]["chronicle_restore"]["generation"], json!(1), "{described}");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Rv"})));
    assert_eq!(status["restore_bdevs"].as_array().map(Vec::len), Some(1), "{status}");

    // Refused, each with a message, and nothing registered.
    let before = target.result("bdev_get_bdevs", None).as_array().map(Vec::len);
    for (params, code, needle) in [
        (json!({"name": "Ghost", "generation": 1, "restore_name": "G-1"}), ENODEV, "Ghost"),
        (json!({"name": "Rv", "generation": 1, "restore_name": "Rv-1"}), EINVAL, "Rv-1"),
        (json!({"name": "Rv", "generation": 1, "restore_name": "Rv"}), EINVAL, "exists"),
        (json!({"name": "Rv", "generation": 1, "restore_name": ""}), EINVAL, "restore_name"),
        (json!({"name": "Rv", "generation": 99, "restore_name": "Rv-99"}), EINVAL, "99"),
        (json!({"name": "Rv", "restore_name": "Rv-x"}), INVALID_PARAMS, "generation"),
    ] {
        let (got, message) = target.error("bdev_chronicle_restore", Some(params.clone()));
        assert_eq!(got, code, "{params}: {message}");
        assert!(message.contains(needle), "{params}: the message does not say {needle:?}: {message}");
    }
    let after = target.result("bdev_get_bdevs", None).as_array().map(Vec::len);
    assert_eq!(before, after, "a refused restore registered a bdev");
    for name in ["Ghost", "Rv"] {
        let (got, message) = target.error("bdev_chronicle_delete_restore", Some(json!({"restore_name": name})));
        assert_eq!(got, ENODEV, "delete_restore {name}: {message}");
    }
    assert_eq!(bdev(&target, "Rv")["name"], json!("Rv"), "the volume survives a delete_restore naming it");

    // Delete the R-VOL: its bdev goes, the volume stays.
    assert_eq!(target.result("bdev_chronicle_delete_restore", Some(json!({"restore_name": "Rv-1"}))), json!(true));
    let gone = target.call("bdev_get_bdevs", Some(json!({"name": "Rv-1"})));
    assert_eq!(gone["error"]["code"], json!(ENODEV), "{gone}");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Rv"})));
    assert_eq!(status["restore_bdevs"].as_array().map(Vec::len), Some(0), "{status}");
    assert_eq!(status["volume"]["restores"].as_array().map(Vec::len), Some(0), "the engine still has it: {status}");

    // Two R-VOLs of the same generation, then delete the volume: both go with it.
    for name in ["Rv-a", "Rv-b"] {
        let params = json!({"name": "Rv", "generation": 1, "restore_name": name});
        assert_eq!(target.result("bdev_chronicle_restore", Some(params)), json!(name));
    }
    assert_eq!(target.result("bdev_chronicle_delete", Some(json!({"name": "Rv"}))), json!(true));
    for name in ["Rv", "Rv-a", "Rv-b"] {
        let gone = target.call("bdev_get_bdevs", Some(json!({"name": name})));
        assert_eq!(gone["error"]["code"], json!(ENODEV), "{name} outlived its volume: {gone}");
    }
    for name in volume.bdevs() {
        assert!(!is_claimed(&target, &name), "{name} is still claimed after delete");
    }

    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    assert!(!log.contains("*ERROR*"), "errors in the target's log:\n{log}");
}

/// Waits (at most 60 s) until the sort has taken every sealed generation of `name`.
fn wait_sorted(app: &App, name: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = app.result("bdev_chronicle_get_generations", Some(json!({"name": name})));
        if !list.as_array().expect("generations").iter().any(|g| g["state"] == json!("sealed")) {
            return list;
        }
        assert!(std::time::Instant::now() < deadline, "the sort never caught up: {list}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// "All" journal mode through RPC (seed 001 embodiment 4): `journal_mode` "all" is recorded at
/// format (save_config replays it; opening with "latest" is refused with nothing registered);
/// get_generations gives each generation's cut, versions and the sequences restore can open;
/// R-VOLs open by sequence, by RFC 3339 time and by Unix-ns time and say what they show; bad
/// targets are refused with nothing registered. (Their contents: spdk_crash.rs.)
#[test]
fn an_all_mode_volume_opens_restore_volumes_by_sequence_and_time() {
    let Some(spdk_dir) = require_spdk("spdk_volume any-point restore") else { return };
    let _serial = serial();
    let target = App::start(&spdk_dir, &module_library(), AppOptions::spdk_tgt());
    // "All" mode keeps a history unit per host write: room for the load's.
    let volume = MallocVolume::new("Every", SMALL_BLOCKS, BLOCK).with_history_blocks(SMALL_BLOCKS * 4);
    assert_eq!(volume.create(&target, json!({"journal_mode": "all"})), json!("Every"));
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Every"})));
    assert_eq!(status["config"]["journal_mode"], json!("all"), "{status}");
    let load = json!({"name": "Every", "seconds": 0.06, "queue_depth": 1, "marker_every_ms": 12, "seed": 3});
    let report = target.result("bdev_chronicle_load", Some(load));
    assert_eq!(report["writes_failed"], json!(0), "{report}");
    target.result("bdev_chronicle_mark", Some(json!({"name": "Every", "comment": "last"})));
    let listed = wait_sorted(&target, "Every");
    let listed = listed.as_array().expect("generations");
    // A history generation with several versions: the sequences inside it open.
    let inside = listed
        .iter()
        .find(|g| {
            g["state"] == json!("history")
                && g["versions"]["elements"].as_u64().unwrap_or(0) > 2
                && g["restore_sequences"]["through"].as_u64() > g["restore_sequences"]["from"].as_u64()
        })
        .unwrap_or_else(|| panic!("no history generation with versions: {listed:?}"));
    let generation = inside["generation"].as_u64().unwrap();
    let (from, through) = (
        inside["restore_sequences"]["from"].as_u64().unwrap(),
        inside["restore_sequences"]["through"].as_u64().unwrap(),
    );
    let previous = listed.iter().find(|g| g["generation"].as_u64() == Some(generation - 1)).expect("listed before");
    assert_eq!(previous["last_sequence"].as_u64(), Some(from), "ranges start at the cut before: {listed:?}");
    assert_eq!(inside["last_sequence"].as_u64(), Some(through), "{listed:?}");
    let versions = &inside["versions"];
    assert!(versions["first_sequence"].as_u64().unwrap() > from, "{inside}");
    assert!(versions["last_sequence"].as_u64().unwrap() <= through, "{inside}");

    // By sequence: the image under it is generation − 1's, with the versions on top.
    let sequence = (versions["first_sequence"].as_u64().unwrap() + versions["last_sequence"].as_u64().unwrap()) / 2;
    let params = json!({"name": "Every", "sequence": sequence, "restore_name": "Every-s"});
    assert_eq!(target.result("bdev_chronicle_restore", Some(params)), json!("Every-s"));
    let shown = &bdev(&target, "Every-s")["driver_specific"]["chronicle_restore"];
    assert_eq!(shown["sequence"], json!(sequence), "{shown}");
    assert_eq!(shown["generation"], json!(generation - 1), "{shown}");
    // By time, both spellings: the newest write taken by the generation's first write time.
    let mut by_time = Vec::new();
    for (key, value, name) in
        [("time", versions["first_time"].clone(), "Every-t"), ("time_ns", versions["first_time_ns"].clone(), "Every-n")]
    {
        let params = json!({"name": "Every", key: value, "restore_name": name});
        assert_eq!(target.result("bdev_chronicle_restore", Some(params)), json!(name));
        let shown = bdev(&target, name)["driver_specific"]["chronicle_restore"].clone();
        let at = shown["sequence"].as_u64().unwrap_or_else(|| panic!("{name} shows a sequence: {shown}"));
        assert!(at >= versions["first_sequence"].as_u64().unwrap() && at <= through, "{name}: {shown}");
        by_time.push(at);
    }
    assert_eq!(by_time[0], by_time[1], "time and time_ns name the same instant");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Every"})));
    let restore_bdevs = status["restore_bdevs"].as_array().expect("restore_bdevs");
    assert_eq!(restore_bdevs.len(), 3, "{status}");
    assert!(restore_bdevs.iter().any(|r| r["sequence"] == json!(sequence)), "{status}");

    // A write in the open generation: its sequence needs a marker first.
    let load = json!({"name": "Every", "seconds": 0.01, "queue_depth": 1, "seed": 4});
    target.result("bdev_chronicle_load", Some(load));
    let listed = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Every"})));
    let open = listed.as_array().unwrap().last().expect("the open generation").clone();
    assert_eq!(open["state"], json!("open"), "{listed}");
    assert!(open.get("restore_sequences").is_none(), "the open generation's writes need a marker: {open}");
    let newest = open["last_sequence"].as_u64().unwrap();
    // A latest-mode volume beside it.
    let latest = MallocVolume::new("Late", SMALL_BLOCKS, BLOCK);
    assert_eq!(latest.create(&target, json!({})), json!("Late"));

    let before = target.result("bdev_get_bdevs", None).as_array().map(Vec::len);
    for (params, code, needle) in [
        (
            json!({"name": "Every", "generation": 1, "sequence": sequence, "restore_name": "X"}),
            INVALID_PARAMS,
            "exactly one",
        ),
        (
            json!({"name": "Every", "time_ns": 1, "time": "2026-01-01T00:00:00Z", "restore_name": "X"}),
            INVALID_PARAMS,
            "exactly one",
        ),
        (json!({"name": "Every", "restore_name": "X"}), INVALID_PARAMS, "exactly one"),
        (json!({"name": "Every", "sequence": newest, "restore_name": "X"}), EINVAL, "open generation"),
        (json!({"name": "Every", "sequence": 1u64 << 40, "restore_name": "X"}), EINVAL, "future"),
        (json!({"name": "Every", "time": "yesterday", "restore_name": "X"}), INVALID_PARAMS, "RFC 3339"),
        (json!({"name": "Every", "time_ns": 1, "restore_name": "X"}), EINVAL, "older than every"),
        (json!({"name": "Every", "sequence": "5", "restore_name": "X"}), INVALID_PARAMS, "expected u64"),
        (json!({"name": "Late", "sequence": 1, "restore_name": "X"}), EINVAL, "\"latest\" journal mode"),
        (json!({"name": "Late", "time": "2026-01-01T00:00:00Z", "restore_name": "X"}), EINVAL, "\"latest\""),
        (json!({"name": "Every", "sequence": sequence, "restore_name": "Every-s"}), EINVAL, "exists"),
    ] {
        let (got, message) = target.error("bdev_chronicle_restore", Some(params.clone()));
        assert_eq!(got, code, "{params}: {message}");
        assert!(message.contains(needle), "{params}: the message does not say {needle:?}: {message}");
    }
    let after = target.result("bdev_get_bdevs", None).as_array().map(Vec::len);
    assert_eq!(before, after, "a refused restore registered a bdev");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Every"})));
    assert_eq!(status["volume"]["restores"].as_array().map(Vec::len), Some(3), "refusals open nothing: {status}");

    // journal_mode is the volume's: save_config replays it, opening as "latest" is refused.
    let config = target.result("framework_get_config", Some(json!({"name": "bdev"})));
    let saved: Vec<&Value> = config
        .as_array()
        .expect("bdev config")
        .iter()
        .filter(|m| m["method"] == "bdev_chronicle_create" && m["params"]["name"] == "Every")
        .map(|m| &m["params"])
        .collect();
    assert_eq!(saved.len(), 1, "{config}");
    assert_eq!(saved[0]["journal_mode"], json!("all"), "{config}");
    assert_eq!(target.result("bdev_chronicle_delete", Some(json!({"name": "Every"}))), json!(true));
    let (code, message) =
        target.error("bdev_chronicle_create", Some(volume.create_params(json!({"journal_mode": "latest"}))));
    assert_eq!(code, EINVAL, "{message}");
    assert!(message.contains("journal_mode") && message.contains("\"all\""), "{message}");
    assert!(!chronicle_bdevs(&target).contains(&"Every".to_string()), "a refused open registers nothing");
    let (code, message) =
        target.error("bdev_chronicle_create", Some(volume.create_params(json!({"journal_mode": "sometimes"}))));
    assert_eq!(code, INVALID_PARAMS, "{message}");
    assert!(message.contains("sometimes"), "{message}");
    assert_eq!(target.result("bdev_chronicle_create", Some(volume.create_params(json!({})))), json!("Every"));
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Every"})));
    assert_eq!(status["config"]["journal_mode"], json!("all"), "{status}");
    // The same sequence opens again after the reopen.
    let params = json!({"name": "Every", "sequence": sequence, "restore_name": "Every-again"});
    assert_eq!(target.result("bdev_chronicle_restore", Some(params)), json!("Every-again"));

    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
}
