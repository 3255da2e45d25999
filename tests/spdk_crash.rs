//! Crash consistency of the chronicle bdev inside `spdk_tgt`, with its four bdevs on files
//! (`bdev_aio`, so they outlive the application):
//!
//! - markers under load: `bdev_chronicle_load` writes self-identifying payloads and cuts a
//!   generation every 150 ms; after a clean stop, `chronicle check` proves offline that every
//!   generation is self-consistent and no older than the one before, and that every
//!   acknowledged write is in the volume; `chronicle verify` checks every structure;
//! - `kill -9` during writes: the application is killed mid-load; a new one configured with
//!   only the four file bdevs finds the volume by examine (recovering it) and registers it under
//!   its name; every acknowledged write reads back through it (`bdev_chronicle_verify_load`),
//!   and `chronicle check` agrees offline.
//!
//! - hot-remove: deleting one of the four bdevs under a running volume closes it cleanly and
//!   unregisters the chronicle bdev; the bdev coming back lets examine open the volume again,
//!   every acknowledged write still there;
//! - `save_config` → restart with `--json`: the same volume, with the same options, registered
//!   again (also when examine finds it first);
//! - a restore volume (R-VOL) of a history generation, opened by the fio plugin's own
//!   configuration: fio writes it with crc32c verify while a second fio job writes the volume;
//!   afterwards every generation is still exact offline (the R-VOL's writes went to units of
//!   its own) and the R-VOL read the generation's image (a read-only fio pass, compared with
//!   `chronicle restore`).
//!
//! Needs SPDK (skipped with a message otherwise, see `support/spdk.rs`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::spdk::{fio_binary, module_library, require_spdk, rpc, say, scratch_dir, serial, App, AppOptions};

const ROLES: [&str; 4] = ["base", "journal", "backup", "history"];
const VOLUME_BYTES: u64 = 64 << 20;

/// A volume directory as the `chronicle` command knows it: base.img, journal.img, backup.img,
/// history.img (new, zero files).
fn volume_dir(name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    for role in ROLES {
        let bytes = if role == "journal" { VOLUME_BYTES * 5 / 4 } else { VOLUME_BYTES };
        let file = std::fs::File::create(dir.join(format!("{role}.img"))).expect("create image");
        file.set_len(bytes).expect("size image");
    }
    dir
}

fn aio_bdevs(dir: &Path) -> Vec<Value> {
    ROLES
        .iter()
        .map(|role| {
            json!({"method": "bdev_aio_create", "params": {
                "name": format!("{role}0"),
                "filename": dir.join(format!("{role}.img")).to_str().expect("utf-8 path"),
                "block_size": 4096,
            }})
        })
        .collect()
}

/// `spdk_tgt` whose startup config creates only the four file bdevs.
fn start_target(spdk_dir: &Path, module: &Path, dir: &Path) -> App {
    let config = dir.join(format!("bdevs-{}.json", std::process::id()));
    let subsystems = json!({"subsystems": [{"subsystem": "bdev", "config": aio_bdevs(dir)}]});
    std::fs::write(&config, subsystems.to_string()).expect("write config");
    let mut options = AppOptions::spdk_tgt();
    options.args = vec!["--json".into(), config.to_str().expect("utf-8 path").into()];
    App::start(spdk_dir, module, options)
}

fn create_volume(target: &App) {
    create_volume_with(target, json!({}));
}

fn create_volume_with(target: &App, options: Value) {
    let mut params = json!({
        "name": "Chronicle0",
        "base_bdev": "base0", "journal_bdev": "journal0", "backup_bdev": "backup0", "history_bdev": "history0",
        "copy_base_to_backup": false,
    });
    for (key, value) in options.as_object().expect("an object") {
        params[key] = value.clone();
    }
    assert_eq!(target.result("bdev_chronicle_create", Some(params)), json!("Chronicle0"));
}

fn claimed(target: &App, bdev: &str) -> bool {
    let bdevs = target.result("bdev_get_bdevs", Some(json!({"name": bdev})));
    bdevs[0]["claimed"].as_bool().expect("claimed is reported")
}

/// Runs the `chronicle` command; panics with its output unless it succeeds.
fn chronicle(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_chronicle")).args(args).output().expect("run chronicle");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "chronicle {args:?} failed ({}):\n{text}", output.status);
    text
}

/// Copies bdev `bdev` of the application `config` (JSON) describes into file `output`, with
/// `spdk_dd` (the module preloaded).
fn copy_bdev(spdk_dir: &Path, module: &Path, config: &Path, bdev: &str, output: &Path) {
    let socket = config.with_extension("dd.sock");
    let result = Command::new("timeout")
        .arg("120")
        .arg("env")
        .arg(format!("LD_PRELOAD={}", module.display()))
        .arg(spdk_dir.join("bin/spdk_dd"))
        .args(["--no-huge", "-s", "1024", "--no-pci", "--disable-cpumask-locks", "-i"])
        .arg((std::process::id() % 30_000 + 2_000).to_string())
        .arg("-r")
        .arg(&socket)
        .arg("--json")
        .arg(config)
        .args(["--ib", bdev, "--bs", "1048576", "--of"])
        .arg(output)
        .output()
        .expect("run spdk_dd");
    let text = format!("{}{}", String::from_utf8_lossy(&result.stdout), String::from_utf8_lossy(&result.stderr));
    assert!(result.status.success(), "spdk_dd exited with {}:\n{text}", result.status);
}

#[test]
fn markers_under_load_leave_exact_generations_checked_offline() {
    let Some(spdk_dir) = require_spdk("markers_under_load") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-markers");
    let ack_log = dir.join("ack.log");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume(&target);

    // At most 12,000 writes: the sorts then need at most 47 MiB of the 64 MiB history, however
    // fast the stack runs (3 s unbounded at 13,000 IOPS filled it and writes failed, correctly,
    // with "journal full … the sort … stopped: history full").
    let load = json!({
        "name": "Chronicle0", "seconds": 3.0, "writes": 12_000, "queue_depth": 32, "marker_every_ms": 50,
        "seed": 7, "ack_log": ack_log.to_str().expect("utf-8 path"),
    });
    let report = target.result("bdev_chronicle_load", Some(load));
    say(&format!("markers_under_load: {report}"));
    let acknowledged = report["writes_acknowledged"].as_u64().unwrap_or_default();
    let markers = report["markers"].as_u64().unwrap_or_default();
    assert!(acknowledged > 1000, "too few writes to say anything: {report}");
    assert_eq!(report["writes_failed"], json!(0), "{report}");
    assert!(markers >= 5, "markers were cut under load: {report}");
    assert_eq!(report["markers_failed"], json!(0), "{report}");

    // Every marker made a generation; the sort keeps the backup one generation behind.
    let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
    let list = generations.as_array().expect("a list");
    let comments = list.iter().filter(|g| g["comment"].as_str().unwrap_or_default().starts_with("load marker")).count();
    assert_eq!(comments as u64, markers, "{generations}");
    assert!(list.iter().any(|g| g["blocks"].as_u64().unwrap_or_default() > 0), "{generations}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");

    // Offline, from the files alone: every generation and every acknowledged write.
    let check = chronicle(&["check", dir.to_str().unwrap(), "--ack-log", ack_log.to_str().unwrap()]);
    assert!(check.contains("chronicle check: ok"), "{check}");
    assert!(check.contains(&format!("{acknowledged} acknowledged writes")), "{check}");
    let verify = chronicle(&["verify", dir.to_str().unwrap()]);
    assert!(verify.contains(": ok"), "{verify}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigkill_during_writes_loses_no_acknowledged_write() {
    let Some(spdk_dir) = require_spdk("sigkill_during_writes") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-sigkill");
    let ack_log = dir.join("ack.log");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume(&target);

    // The load answers only when it ends, long after the kill: run it from its own thread.
    let socket = target.socket.clone();
    let load = json!({
        "name": "Chronicle0", "seconds": 60.0, "queue_depth": 32, "marker_every_ms": 250, "seed": 11,
        "ack_log": ack_log.to_str().expect("utf-8 path"),
    });
    let loader = std::thread::spawn(move || rpc(&socket, "bdev_chronicle_load", Some(load), Duration::from_secs(120)));
    // Kill once writes, markers and sorts are all under way (both counted, not timed: how
    // much one takes depends on the machine).
    let mut waited = Duration::ZERO;
    let before = loop {
        let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
        let logged = std::fs::metadata(&ack_log).map_or(0, |m| m.len());
        let generation = status["volume"]["open_generation"].as_u64().unwrap_or_default();
        if (logged >= 200_000 && generation > 2) || waited >= Duration::from_secs(60) {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    };
    assert!(before["volume"]["open_generation"].as_u64().unwrap_or_default() > 2, "markers ran: {before}");
    target.kill();
    let _ = loader.join();
    let acknowledged = std::fs::read_to_string(&ack_log).expect("ack log").lines().count();
    assert!(acknowledged > 1000, "too few acknowledged writes before the kill: {acknowledged}");

    // A new application with only the four file bdevs: examine finds the volume, recovers it
    // and registers it under its recorded name before startup completes.
    let target = start_target(&spdk_dir, &module, &dir);
    assert_eq!(target.result("bdev_wait_for_examine", None), json!(true));
    let bdevs = target.result("bdev_get_bdevs", Some(json!({"name": "Chronicle0"})));
    assert_eq!(bdevs[0]["product_name"], json!("chronicle"), "{bdevs}");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
    assert_eq!(status["state"], json!("running"), "{status}");
    assert!(
        status["volume"]["open_generation"].as_u64() >= before["volume"]["open_generation"].as_u64(),
        "generations sealed before the kill survive: {before} then {status}"
    );

    let verified = target.result(
        "bdev_chronicle_verify_load",
        Some(json!({"name": "Chronicle0", "ack_log": ack_log.to_str().expect("utf-8 path")})),
    );
    say(&format!("sigkill_during_writes: {acknowledged} acknowledged before the kill; read back: {verified}"));
    assert_eq!(verified["acknowledged"].as_u64(), Some(acknowledged as u64), "{verified}");
    assert!(verified["blocks_checked"].as_u64().unwrap_or_default() > 0, "{verified}");
    assert_eq!(verified["missing"], json!(0), "acknowledged writes lost: {verified}");
    assert_eq!(verified["invalid"], json!(0), "damaged blocks: {verified}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");

    // And offline, generation by generation.
    let check = chronicle(&["check", dir.to_str().unwrap(), "--ack-log", ack_log.to_str().unwrap()]);
    assert!(check.contains("chronicle check: ok"), "{check}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hot_remove_of_a_bdev_below_closes_the_volume_and_examine_brings_it_back() {
    let Some(spdk_dir) = require_spdk("hot_remove") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-hot-remove");
    let ack_log = dir.join("ack.log");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume(&target);
    let load = json!({
        "name": "Chronicle0", "seconds": 60.0, "writes": 4000, "queue_depth": 16, "marker_every_writes": 1500,
        "seed": 5, "ack_log": ack_log.to_str().expect("utf-8 path"),
    });
    let report = target.result("bdev_chronicle_load", Some(load));
    assert_eq!((&report["writes_failed"], &report["markers"]), (&json!(0), &json!(2)), "{report}");

    // The journal goes away under the volume: the volume closes (flushing what it can) and
    // its bdev is unregistered; the other three are released.
    assert_eq!(target.result("bdev_aio_delete", Some(json!({"name": "journal0"}))), json!(true));
    let gone = target.call("bdev_get_bdevs", Some(json!({"name": "Chronicle0"})));
    assert_eq!(gone["error"]["code"], json!(-libc::ENODEV), "the chronicle bdev is gone: {gone}");
    for bdev in ["base0", "backup0", "history0"] {
        assert!(!claimed(&target, bdev), "{bdev} is released");
    }
    let status = target.call("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
    assert_eq!(status["error"]["code"], json!(-libc::ENODEV), "{status}");

    // The journal comes back: examine finds the volume and registers it again.
    let journal =
        json!({"name": "journal0", "filename": dir.join("journal.img").to_str().unwrap(), "block_size": 4096});
    assert_eq!(target.result("bdev_aio_create", Some(journal)), json!("journal0"));
    assert_eq!(target.result("bdev_wait_for_examine", None), json!(true));
    let verified = target.result(
        "bdev_chronicle_verify_load",
        Some(json!({"name": "Chronicle0", "ack_log": ack_log.to_str().expect("utf-8 path")})),
    );
    assert_eq!(verified["missing"], json!(0), "{verified}");
    assert_eq!(verified["invalid"], json!(0), "{verified}");
    assert!(verified["blocks_checked"].as_u64().unwrap_or_default() > 0, "{verified}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_config_replays_the_same_volume_with_its_options() {
    let Some(spdk_dir) = require_spdk("save_config_replay") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-save-config");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume_with(
        &target,
        json!({"host_write_size": 8192, "strict": true, "automatic_sort": false, "sort_rate_limit_bytes_per_second": 1048576,
            "marker_read_back_bytes": 65536}),
    );
    let generation = target.result("bdev_chronicle_mark", Some(json!({"name": "Chronicle0", "comment": "saved"})));
    assert_eq!(generation, json!(1));
    // What rpc.py's save_config writes, for the bdev subsystem.
    let bdev_config = target.result("framework_get_config", Some(json!({"name": "bdev"})));
    let saved = json!({"subsystems": [{"subsystem": "bdev", "config": bdev_config}]});
    let text = saved.to_string();
    assert!(text.contains("bdev_chronicle_create"), "{text}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");

    // Restart from the saved configuration alone: the aio bdevs come first (examine may find
    // the volume), then the replayed create, which must end with the volume as it was.
    let config = dir.join("saved.json");
    std::fs::write(&config, saved.to_string()).expect("write saved config");
    let mut options = AppOptions::spdk_tgt();
    options.args = vec!["--json".into(), config.to_str().expect("utf-8 path").into()];
    let target = App::start(&spdk_dir, &module, options);
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
    assert_eq!(status["state"], json!("running"), "{status}");
    let config = &status["config"];
    assert_eq!(config["host_write_size"], json!(8192), "{status}");
    assert_eq!(config["strict"], json!(true), "{status}");
    assert_eq!(config["automatic_sort"], json!(false), "{status}");
    assert_eq!(config["sort_rate_limit_bytes_per_second"], json!(1048576), "{status}");
    assert_eq!(config["marker_read_back_bytes"], json!(65536), "{status}");
    let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
    assert!(generations.as_array().unwrap().iter().any(|g| g["comment"] == json!("saved")), "{generations}");
    // A create with an option fixed at format that differs is refused, the volume untouched.
    let (code, message) = target.error(
        "bdev_chronicle_create",
        Some(json!({"name": "Chronicle0", "base_bdev": "base0", "journal_bdev": "journal0", "backup_bdev": "backup0",
                    "history_bdev": "history0", "host_write_size": 4096})),
    );
    assert_eq!(code, -i64::from(libc::EINVAL), "{message}");
    assert!(message.contains("host_write_size"), "{message}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn history_is_merged_deleted_and_retained_through_rpc() {
    let Some(spdk_dir) = require_spdk("history_maintenance") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-history");
    let ack_log = dir.join("ack.log");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume(&target);
    // Rounds of a bounded load, each followed by a marker: the same history whatever the
    // machine's speed (a timed load once wrote more than the history could merge).
    let load = |target: &App, rounds: u64, seed: u64| {
        for round in 0..rounds {
            let params = json!({
                "name": "Chronicle0", "seconds": 60.0, "writes": 300, "queue_depth": 16, "seed": seed * 100 + round,
                "ack_log": ack_log.to_str().expect("utf-8 path"),
            });
            let report = target.result("bdev_chronicle_load", Some(params));
            assert_eq!(
                (&report["writes_acknowledged"], &report["writes_failed"]),
                (&json!(300), &json!(0)),
                "{report}"
            );
            let comment = format!("load {seed} round {round}");
            target.result("bdev_chronicle_mark", Some(json!({"name": "Chronicle0", "comment": comment})));
        }
    };
    load(&target, 10, 21);
    // Bounds of zero are refused, nothing written.
    for bad in [json!({"writes": 0}), json!({"marker_every_writes": 0})] {
        let mut params = json!({"name": "Chronicle0", "seconds": 1.0});
        params.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let (code, message) = target.error("bdev_chronicle_load", Some(params));
        assert_eq!(code, -i64::from(libc::EINVAL), "{message}");
        assert!(message.contains("must be at least 1"), "{message}");
    }
    let records = |target: &App| -> Vec<(u64, u64, String)> {
        let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
        generations
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["state"] == json!("history") || g["state"] == json!("merged"))
            .map(|g| {
                (g["generation"].as_u64().unwrap(), g["through_generation"].as_u64().unwrap(), g["state"].to_string())
            })
            .collect()
    };
    let before = records(&target);
    assert!(before.len() >= 4, "markers made history records: {before:?}");
    let image = |generation: u64| {
        let output = dir.join(format!("generation-{generation}.img"));
        chronicle(&[
            "restore",
            dir.to_str().unwrap(),
            "--generation",
            &generation.to_string(),
            "--output",
            output.to_str().unwrap(),
        ]);
        std::fs::read(&output).expect("restored image")
    };

    // Compression by RPC (embodiment 8): H(0) holds the zeros the first generation overwrote.
    let params = json!({"name": "Chronicle0", "generation": 0});
    let report = target.result("bdev_chronicle_compress_generation", Some(params.clone()));
    eprintln!("bdev_chronicle_compress_generation: {report}");
    assert_eq!(report["compressed"], json!(true), "{report}");
    assert!(report["stored_bytes"].as_u64() < report["original_bytes"].as_u64(), "{report}");
    let (code, message) = target.error("bdev_chronicle_compress_generation", Some(params.clone()));
    assert_eq!(code, -i64::from(libc::EINVAL), "twice is refused: {message}");
    let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
    let record = generations.as_array().unwrap()[0].clone();
    assert_eq!((&record["compressed"], &record["stored_bytes"]), (&json!(true), &report["stored_bytes"]), "{record}");
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
    assert!(status["volume"]["history_compression_saved_bytes"].as_u64() > Some(0), "{status}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    let zeros = image(0);
    assert!(zeros.len() as u64 == VOLUME_BYTES && zeros.iter().all(|b| *b == 0), "generation 0 is the zero volume");
    let verified = chronicle(&["verify", dir.to_str().unwrap()]);
    assert!(verified.contains("1 compressed records"), "{verified}");
    let target = start_target(&spdk_dir, &module, &dir);
    assert_eq!(target.result("bdev_wait_for_examine", None), json!(true));
    let report = target.result("bdev_chronicle_decompress_generation", Some(params.clone()));
    eprintln!("bdev_chronicle_decompress_generation: {report}");
    assert_eq!(
        (&report["compressed"], &report["stored_bytes"]),
        (&json!(false), &report["original_bytes"]),
        "{report}"
    );
    // Compressed again: the deletion below drops a compressed record.
    let report = target.result("bdev_chronicle_compress_generation", Some(params));
    assert_eq!(report["compressed"], json!(true), "{report}");

    // Merge the second and third record; image of the second stays.
    let (from, through) = (before[1].0, before[2].1);
    let report =
        target.result("bdev_chronicle_merge", Some(json!({"name": "Chronicle0", "from": from, "through": through})));
    assert_eq!(report["records"], json!(2), "{report}");
    let after = records(&target);
    assert_eq!(after[1], (from, through, "\"merged\"".to_string()), "{after:?}");
    // A range that is not whole records is refused, nothing changes.
    let (code, message) = target
        .error("bdev_chronicle_merge", Some(json!({"name": "Chronicle0", "from": from + 1, "through": through + 5})));
    assert_eq!(code, -i64::from(libc::EINVAL), "{message}");
    // (The sort may still be adding records of the load's last generations behind them.)
    assert_eq!(records(&target)[..after.len()], after[..]);
    // The oldest record is dropped.
    let report = target
        .result("bdev_chronicle_delete_generation", Some(json!({"name": "Chronicle0", "generation": after[0].0})));
    assert_eq!(report["units_after"], json!(0), "{report}");
    assert_eq!(records(&target)[0], after[1]);

    // Retention: keep the last two records, merge the older ones; it runs now and after sorts.
    let policy = target.result(
        "bdev_chronicle_set_retention",
        Some(json!({"name": "Chronicle0", "keep_last": 2, "merge_older": true})),
    );
    assert_eq!(policy["keep_last"], json!(2), "{policy}");
    load(&target, 5, 22);
    let mut kept = records(&target);
    for _ in 0..50 {
        if kept.len() <= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        kept = records(&target);
    }
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Chronicle0"})));
    assert!(kept.len() <= 3 && kept[0].2 == "\"merged\"", "retention merged the older records: {kept:?}\n{status}");
    assert_eq!(status["config"]["retention"]["keep_last"], json!(2), "saved with the volume: {status}");
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");

    // Offline: every restorable generation is consistent, every acknowledged write is there.
    let check = chronicle(&["check", dir.to_str().unwrap(), "--ack-log", ack_log.to_str().unwrap()]);
    assert!(check.contains("chronicle check: ok"), "{check}");

    // Rollback through RPC (examine brings the volume back): a generation the volume does
    // not hold is refused; the newest history record's image becomes a new generation.
    let target = start_target(&spdk_dir, &module, &dir);
    assert_eq!(target.result("bdev_wait_for_examine", None), json!(true));
    let (code, message) =
        target.error("bdev_chronicle_rollback", Some(json!({"name": "Chronicle0", "generation": 1_000_000})));
    assert_eq!(code, -i64::from(libc::EINVAL), "{message}");
    let wanted = records(&target).last().expect("a history record").0;
    let rolled = target
        .result("bdev_chronicle_rollback", Some(json!({"name": "Chronicle0", "generation": wanted, "comment": "back"})))
        .as_u64()
        .expect("the new generation");
    let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
    assert!(
        generations
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["generation"] == json!(rolled) && g["comment"] == json!("back")),
        "{generations}"
    );
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    assert!(image(rolled) == image(wanted), "generation {rolled} holds the image of generation {wanted}");

    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fio_verifies_a_restore_volume_while_the_volume_takes_writes() {
    let Some(spdk_dir) = require_spdk("restore volume fio") else { return };
    let _serial = serial();
    let Some(fio) = fio_binary() else {
        say("restore volume fio: skipped: no fio (/usr/local/bin/fio or fio on PATH)");
        return;
    };
    let plugin = spdk_dir.join("fio/spdk_bdev");
    if !plugin.is_file() {
        say(&format!("restore volume fio: skipped: no SPDK fio plugin at {}", plugin.display()));
        return;
    }
    let module = module_library();
    let dir = volume_dir("spdk-restore");
    // History first: a load with markers, then a clean stop.
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume(&target);
    // Counted markers: the same history however fast the machine is.
    let params = json!({
        "name": "Chronicle0", "seconds": 60.0, "writes": 6000, "queue_depth": 16, "marker_every_writes": 600, "seed": 5,
    });
    let report = target.result("bdev_chronicle_load", Some(params));
    assert_eq!((&report["writes_failed"], &report["markers"]), (&json!(0), &json!(9)), "{report}");
    let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
    let shown = generations
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == json!("history"))
        .map(|g| g["generation"].as_u64().unwrap())
        .nth(1)
        .unwrap_or_else(|| panic!("history records: {generations}"));
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    let expected = dir.join("expected.img");
    chronicle(&[
        "restore",
        dir.to_str().unwrap(),
        "--generation",
        &shown.to_string(),
        "--output",
        expected.to_str().unwrap(),
    ]);

    // fio's own application: the four files, examine opens the volume, the R-VOL is created.
    let mut methods = aio_bdevs(&dir);
    methods.push(json!({"method": "bdev_wait_for_examine"}));
    methods.push(json!({"method": "bdev_chronicle_restore",
        "params": {"name": "Chronicle0", "generation": shown, "restore_name": "Restore0"}}));
    let config = dir.join("fio-bdev.json");
    std::fs::write(&config, json!({"subsystems": [{"subsystem": "bdev", "config": methods}]}).to_string())
        .expect("write config");
    let run_fio = |name: &str, jobs: &str| {
        let job = dir.join(format!("{name}.fio"));
        let text = format!(
            "[global]\n\
             ioengine=spdk_bdev\n\
             spdk_json_conf={config}\n\
             env_context=--no-huge --legacy-mem --no-pci\n\
             spdk_mem=1024\n\
             thread=1\n\
             direct=1\n\
             verify_state_save=0\n\
             {jobs}",
            config = config.display()
        );
        std::fs::write(&job, text).expect("write fio job");
        let output = Command::new("timeout")
            .arg("300")
            .arg("env")
            .arg(format!("LD_PRELOAD={} {}", plugin.display(), module.display()))
            .arg(&fio)
            .arg(&job)
            .current_dir(&dir)
            .output()
            .expect("run fio");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "fio {name} exited with {}:\n{text}", output.status);
        text
    };

    // 1. The R-VOL reads the generation's image: spdk_dd copies it into a file.
    let image = dir.join("restore0.img");
    copy_bdev(&spdk_dir, &module, &config, "Restore0", &image);
    assert!(
        std::fs::read(&image).unwrap() == std::fs::read(&expected).unwrap(),
        "the R-VOL reads generation {shown}'s image"
    );

    // 2. fio writes the R-VOL with crc32c verify while a second job writes the volume.
    let text = run_fio(
        "verify",
        "[volume]\nfilename=Chronicle0\nrw=randwrite\nbs=4k\niodepth=16\nsize=32M\n\
         time_based=1\nruntime=4\n\
         [restore]\nfilename=Restore0\nrw=randwrite\nbs=4k\niodepth=16\nsize=16M\n\
         verify=crc32c\ndo_verify=1\nverify_fatal=1\n",
    );
    assert!(text.contains("err= 0"), "fio reports errors:\n{text}");
    assert!(!text.contains("verify: bad") && !text.contains("crc32c: verify failed"), "{text}");
    say(&format!("restore volume fio: verified R-VOL of generation {shown} beside volume writes"));

    // Offline: the volume is consistent and generation `shown` is what it was.
    let verify = chronicle(&["verify", dir.to_str().unwrap()]);
    assert!(verify.contains(": ok —") && !verify.contains("differ from the base"), "{verify}");
    let after = dir.join("after.img");
    chronicle(&[
        "restore",
        dir.to_str().unwrap(),
        "--generation",
        &shown.to_string(),
        "--output",
        after.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&after).unwrap() == std::fs::read(&expected).unwrap(), "generation {shown} unchanged");
    std::fs::remove_dir_all(&dir).ok();
}

/// "All" journal mode end to end (seed 001 embodiment 4): a volume created with journal_mode
/// "all" takes a load with markers; R-VOLs opened by RPC at a sequence inside a sorted
/// generation and at a time (from `get_generations`' version ranges) read exactly the images
/// `chronicle restore --sequence/--time` writes offline from the same files.
#[test]
fn restore_volumes_by_sequence_and_time_read_the_images_restored_offline() {
    let Some(spdk_dir) = require_spdk("restore volume by sequence") else { return };
    let _serial = serial();
    let module = module_library();
    let dir = volume_dir("spdk-any-point");
    let target = start_target(&spdk_dir, &module, &dir);
    create_volume_with(&target, json!({"journal_mode": "all"}));
    // Targets inside a generation with versions: a sequence between its first and last write,
    // and the time of its first write. Loads of 0.1 s with a marker every 20 ms until two
    // sealed generations hold more than two versions (markers on files flush them: on a busy
    // machine one load may cut generations of a write or two only).
    let with_versions = |generations: &Value| -> Vec<Value> {
        generations
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["state"] != json!("open") && g["versions"]["elements"].as_u64().unwrap_or(0) > 2)
            .cloned()
            .collect()
    };
    let mut loads = 0;
    let inside = loop {
        let params =
            json!({"name": "Chronicle0", "seconds": 0.1, "queue_depth": 2, "marker_every_ms": 20, "seed": 9 + loads});
        let report = target.result("bdev_chronicle_load", Some(params));
        assert_eq!(report["writes_failed"], json!(0), "{report}");
        target.result("bdev_chronicle_mark", Some(json!({"name": "Chronicle0", "comment": "last"})));
        loads += 1;
        let generations = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Chronicle0"})));
        if let Some(inside) = with_versions(&generations).into_iter().nth(1) {
            break inside;
        }
        assert!(loads < 20, "two generations with versions after {loads} loads: {generations}");
    };
    let versions = &inside["versions"];
    let sequence = (versions["first_sequence"].as_u64().unwrap() + versions["last_sequence"].as_u64().unwrap()) / 2;
    let time = versions["first_time"].as_str().unwrap().to_string();
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    let expected_sequence = dir.join("expected-sequence.img");
    let expected_time = dir.join("expected-time.img");
    let volume = dir.to_str().unwrap();
    chronicle(&[
        "restore",
        volume,
        "--sequence",
        &sequence.to_string(),
        "--output",
        expected_sequence.to_str().unwrap(),
    ]);
    chronicle(&["restore", volume, "--time", &time, "--output", expected_time.to_str().unwrap()]);
    assert!(
        std::fs::read(&expected_sequence).unwrap() != std::fs::read(&expected_time).unwrap(),
        "two different targets (else the comparison below could not tell them apart)"
    );

    // An application that opens the volume (examine) and both R-VOLs from its configuration.
    let mut methods = aio_bdevs(&dir);
    methods.push(json!({"method": "bdev_wait_for_examine"}));
    methods.push(json!({"method": "bdev_chronicle_restore",
        "params": {"name": "Chronicle0", "sequence": sequence, "restore_name": "Sequence0"}}));
    methods.push(json!({"method": "bdev_chronicle_restore",
        "params": {"name": "Chronicle0", "time": time, "restore_name": "Time0"}}));
    let config = dir.join("dd-bdev.json");
    std::fs::write(&config, json!({"subsystems": [{"subsystem": "bdev", "config": methods}]}).to_string())
        .expect("write config");
    for (bdev, expected) in [("Sequence0", &expected_sequence), ("Time0", &expected_time)] {
        let image = dir.join(format!("{bdev}.img"));
        copy_bdev(&spdk_dir, &module, &config, bdev, &image);
        assert!(std::fs::read(&image).unwrap() == std::fs::read(expected).unwrap(), "{bdev} reads its image");
    }
    say(&format!("restore volumes at sequence {sequence} and time {time} read their offline images"));
    std::fs::remove_dir_all(&dir).ok();
}
