//! Data through the chronicle bdev with SPDK's own tools: bdevperf's verify workload (also on
//! a strict volume, whose partial-unit writes SPDK refuses), fio's crc32c verify through the
//! `spdk_bdev` plugin, an NVMe/TCP export on 127.0.0.1 driven by a second application while
//! markers cut generations, and a generation too large for the history stopping the sort.
//!
//! Needs an installed SPDK (`SPDK_DIR`, default `/opt/spdk`); without it every test prints
//! "skipped: SPDK not found at …" and passes. The fio test also needs fio and SPDK's fio plugin
//! and says so when it skips. Applications run without hugepages, the target on core 0 and a
//! second application on core 1 (see `support/spdk.rs`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::spdk::{
    bdevperf_total, chronicle_errors, fio_binary, module_library, require_spdk, say, scratch_dir, serial,
    write_bdev_config, App, AppOptions, MallocVolume,
};

/// 64 MiB volumes of 4 KiB blocks.
const VOLUME_BLOCKS: u64 = 16_384;
const BLOCK: u32 = 4096;
/// Long enough for a bdevperf run of a few seconds to start, run and drain.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs bdevperf (on the cores of `core_mask`, module preloaded) over a JSON config creating
/// `volume`, with the workload `args`; returns how it exited and its output.
fn bdevperf(
    spdk_dir: &Path,
    volume: &MallocVolume,
    extra: Value,
    core_mask: &'static str,
    args: &[&str],
) -> (std::process::ExitStatus, String) {
    let dir = scratch_dir(&format!("spdk_io-bdevperf-{}", volume.name));
    let config = dir.join("bdevperf.json");
    write_bdev_config(&config, volume.config_methods(extra));
    let mut all = vec!["--json", config.to_str().expect("utf-8 path"), "-T", volume.name.as_str()];
    all.extend_from_slice(args);
    say(&format!("spdk_io: bdevperf {}", all.join(" ")));
    let app = App::start(spdk_dir, &module_library(), AppOptions::bdevperf(&all, core_mask));
    let result = app.wait_exit(RUN_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The bdevperf run succeeded, verified every read, failed nothing and did I/O.
fn assert_clean_bdevperf_run(status: std::process::ExitStatus, log: &str) {
    assert!(status.success(), "bdevperf exited with {status}:\n{log}");
    let total = bdevperf_total(log).unwrap_or_else(|| panic!("no Total line in bdevperf's output:\n{log}"));
    assert_eq!(total.fails_per_second, 0.0, "failed I/O: {total:?}\n{log}");
    assert_eq!(total.timeouts_per_second, 0.0, "timed-out I/O: {total:?}\n{log}");
    assert!(total.iops > 0.0, "no I/O: {total:?}\n{log}");
    assert!(!log.contains("with error"), "a job ended with an error:\n{log}");
    assert!(chronicle_errors(log).is_empty(), "chronicle logged errors:\n{log}");
    say(&format!("spdk_io: {:.0} IOPS, {:.1} MiB/s, 0 failures", total.iops, total.mib_per_second));
}

/// How the host I/Os of volume `name` reached it, from the line its close logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ways {
    /// On the app thread.
    local: u64,
    /// Directly from threads on the app thread's reactor.
    direct: u64,
    /// By message from other threads, and the messages that carried them.
    remote: u64,
    messages: u64,
    /// On the thread the volume moved to, and how often it moved there and came back.
    resident: u64,
    moves: u64,
    returns: u64,
    /// Of those taken in place, the ones sent from a completion callback while the volume's
    /// poll completed others, entered after it in one batch.
    gathered: u64,
}

fn ways_taken(log: &str, name: &str) -> Ways {
    let closed = format!("chronicle: {name} closed");
    let line = log
        .lines()
        .filter(|line| line.contains(&closed))
        .find_map(|line| line.split_once("; host I/Os taken: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("{name} did not log its close:\n{log}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|word| !word.is_empty())
        .map(|word| word.parse().expect("a count"))
        .collect();
    let [local, direct, remote, messages, resident, moves, returns, gathered] =
        numbers.try_into().unwrap_or_else(|numbers| panic!("eight counts expected in {line:?}: {numbers:?}"));
    Ways { local, direct, remote, messages, resident, moves, returns, gathered }
}

/// bdevperf's verify workload (write a pattern, read it back, compare) through a chronicle
/// volume with the default host write size of 4 KiB: no I/O fails, every read matches. On one
/// core bdevperf's job thread shares the app thread's reactor, so its I/Os enter the volume
/// directly; on two cores with a job per core (`-C`) the second job's I/Os come by message
/// beside the first one's direct ones, to the same blocks' neighbours.
#[test]
fn bdevperf_verify_through_a_chronicle_volume_finds_no_errors() {
    let Some(spdk_dir) = require_spdk("spdk_io bdevperf verify") else { return };
    let _serial = serial();
    let volume = MallocVolume::new("Perf", VOLUME_BLOCKS, BLOCK);
    let workload = ["-q", "32", "-o", "4096", "-w", "verify", "-t", "3"];
    let (status, log) = bdevperf(&spdk_dir, &volume, json!({}), "0x1", &workload);
    assert_clean_bdevperf_run(status, &log);
    assert!(log.contains("Job: Perf"), "bdevperf did not run on the chronicle bdev:\n{log}");
    let ways = ways_taken(&log, "Perf");
    say(&format!("spdk_io: one core: {ways:?}"));
    assert!(ways.direct > 0 && ways.remote == 0 && ways.messages == 0, "one core: {ways:?}");
    // verify sends each write from the completion of a read, which does not pass the volume.
    assert_eq!(ways.gathered, 0, "one core, verify: {ways:?}");

    // randwrite sends the next write from the completion callback of the last one: those
    // gather while the volume's poll completes writes, and enter after it, none failing.
    let random = ["-q", "32", "-o", "4096", "-w", "randwrite", "-t", "1"];
    let (status, log) = bdevperf(&spdk_dir, &volume, json!({}), "0x1", &random);
    assert_clean_bdevperf_run(status, &log);
    let ways = ways_taken(&log, "Perf");
    say(&format!("spdk_io: one core, randwrite: {ways:?}"));
    assert!(ways.gathered > ways.direct / 2 && ways.gathered <= ways.direct, "one core, randwrite: {ways:?}");

    let mut both = vec!["-C"];
    both.extend_from_slice(&workload);
    let (status, log) = bdevperf(&spdk_dir, &volume, json!({}), "0x3", &both);
    assert_clean_bdevperf_run(status, &log);
    assert!(log.contains("Core Mask 0x1") && log.contains("Core Mask 0x2"), "a job per core:\n{log}");
    let ways = ways_taken(&log, "Perf");
    say(&format!("spdk_io: two cores: {ways:?}"));
    let Ways { direct, remote, messages, .. } = ways;
    assert!(direct > 0 && remote > 0, "two cores: {ways:?}");
    assert!((1..=remote).contains(&messages), "two cores: {ways:?}");
    // Reactors never block between polls: no timer slack is touched (SleepWatch).
    assert!(!log.contains("timer slack"), "a reactor was taken for a host that sleeps:\n{log}");
    say(&format!("spdk_io: two cores: {direct} I/Os entered directly, {remote} by {messages} messages"));
}

/// bdevperf on two cores with its one job on core 1 (a job file's `cpumask`): the volume's only
/// channel is on another reactor's thread, so the volume moves there and takes the I/Os in
/// place. Markers and status requests through RPC call it home (each one answered with the
/// volume on the app thread) and it leaves again after its cool-down; through all of it the
/// verify workload finds no errors, every marker cuts a generation, and the volume closes at
/// home.
#[test]
fn a_volume_moves_to_its_one_submitter_and_comes_home_for_markers() {
    let Some(spdk_dir) = require_spdk("spdk_io volume move") else { return };
    let _serial = serial();
    let volume = MallocVolume::new("Move", VOLUME_BLOCKS, BLOCK);
    let dir = scratch_dir("spdk_io-move");
    let config = dir.join("bdevperf.json");
    write_bdev_config(&config, volume.config_methods(json!({})));
    let job = dir.join("job.conf");
    // The first 2,048 blocks only: five generations that write all of them fit the history.
    std::fs::write(&job, "[move]\nfilename=Move\ncpumask=0x2\noffset=0\nlength=2048\n").expect("write bdevperf job");
    let args = [
        "--json",
        config.to_str().expect("utf-8 path"),
        "-j",
        job.to_str().expect("utf-8 path"),
        "-q",
        "32",
        "-o",
        "4096",
        "-w",
        "verify",
        "-t",
        "4",
    ];
    say(&format!("spdk_io: bdevperf {}", args.join(" ")));
    let app = App::start(&spdk_dir, &module_library(), AppOptions::bdevperf(&args, "0x3"));

    // The volume exists once the RPC server answers for it; then markers and status requests
    // while the job runs.
    let name = json!({"name": "Move"});
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        match app.try_call("bdev_chronicle_get_status", Some(name.clone())) {
            Ok(answer) if answer.get("result").is_some() => break answer["result"].clone(),
            _ if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("the volume never answered: {other:?}\n{}", app.log_text()),
        }
    };
    assert_eq!(first["state"], json!("running"), "{first}");
    let mut marked = Vec::new();
    for round in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        let comment = format!("move {round}");
        let sealed = app.result("bdev_chronicle_mark", Some(json!({"name": "Move", "comment": comment})));
        marked.push((sealed.as_u64().expect("a generation number"), comment));
        std::thread::sleep(Duration::from_millis(300));
        let status = app.result("bdev_chronicle_get_status", Some(name.clone()));
        assert_eq!(status["state"], json!("running"), "{status}");
    }
    let generations = app.result("bdev_chronicle_get_generations", Some(name));
    for (generation, comment) in &marked {
        let listed = generations.as_array().expect("a list").iter().find(|g| g["generation"] == json!(generation));
        let listed = listed.unwrap_or_else(|| panic!("generation {generation} is not listed: {generations}"));
        assert_eq!(listed["comment"], json!(comment), "{generations}");
        assert!(listed["blocks"].as_u64().unwrap_or_default() > 0, "no writes in {generation}: {generations}");
    }

    let (status, log) = app.wait_exit(RUN_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    assert_clean_bdevperf_run(status, &log);
    let ways = ways_taken(&log, "Move");
    say(&format!("spdk_io: one job on core 1: {ways:?}"));
    // It moved, was called home by every marker (and status) at least once, and moved again.
    assert!(ways.resident > 0, "no I/O taken where the volume moved to: {ways:?}");
    assert!(ways.returns >= marked.len() as u64, "markers did not call the volume home: {ways:?}");
    assert!(ways.moves >= ways.returns, "moves and returns: {ways:?}");
    assert_eq!(ways.direct, 0, "no thread of the app thread's reactor submitted: {ways:?}");
}

/// A strict volume with 16 KiB host writes: SPDK splits writes at unit boundaries for it, so
/// bdevperf's verify with whole 16 KiB units runs clean, and 4 KiB writes (a quarter unit) are
/// refused rather than widened.
#[test]
fn bdevperf_verify_on_a_strict_volume_with_whole_units() {
    let Some(spdk_dir) = require_spdk("spdk_io bdevperf strict") else { return };
    let _serial = serial();
    let volume = MallocVolume::new("Strict", VOLUME_BLOCKS, BLOCK);
    let strict = json!({"strict": true, "host_write_size": 16384});
    let (status, log) =
        bdevperf(&spdk_dir, &volume, strict.clone(), "0x1", &["-q", "32", "-o", "16384", "-w", "verify", "-t", "3"]);
    assert_clean_bdevperf_run(status, &log);

    // The control: the same volume refuses partial units, and bdevperf sees the failures.
    let (status, log) =
        bdevperf(&spdk_dir, &volume, strict, "0x1", &["-q", "4", "-o", "4096", "-w", "write", "-t", "1"]);
    assert!(!status.success(), "4 KiB writes to a strict 16 KiB volume succeeded:\n{log}");
    let total = bdevperf_total(&log).unwrap_or_else(|| panic!("no Total line:\n{log}"));
    assert!(total.fails_per_second > 0.0, "{total:?}\n{log}");
    assert!(log.contains("does not match the write_unit_size 4"), "{log}");
}

/// fio through SPDK's `spdk_bdev` plugin: random 4 KiB writes with crc32c checksums over half
/// of a volume whose host write size is 16 KiB (so every write is a read-modify-write of its
/// unit, with neighbours in flight), then every block read back and verified.
#[test]
fn fio_crc32c_verify_through_the_spdk_bdev_plugin() {
    let Some(spdk_dir) = require_spdk("spdk_io fio verify") else { return };
    let _serial = serial();
    let Some(fio) = fio_binary() else {
        say("spdk_io fio verify: skipped: no fio (/usr/local/bin/fio or fio on PATH)");
        return;
    };
    let plugin = spdk_dir.join("fio/spdk_bdev");
    if !plugin.is_file() {
        say(&format!("spdk_io fio verify: skipped: no SPDK fio plugin at {}", plugin.display()));
        return;
    }
    let module = module_library();
    let dir = scratch_dir("spdk_io-fio");
    let volume = MallocVolume::new("Fio", VOLUME_BLOCKS, BLOCK);
    let config = dir.join("fio-bdev.json");
    write_bdev_config(&config, volume.config_methods(json!({"host_write_size": 16384})));
    let job = dir.join("verify.fio");
    let job_text = format!(
        "[global]\n\
         ioengine=spdk_bdev\n\
         spdk_json_conf={config}\n\
         env_context=--no-huge --legacy-mem --no-pci\n\
         spdk_mem=1024\n\
         thread=1\n\
         direct=1\n\
         group_reporting=1\n\
         verify_state_save=0\n\
         \n\
         [verify]\n\
         filename=Fio\n\
         rw=randwrite\n\
         bs=4k\n\
         iodepth=16\n\
         size=32M\n\
         verify=crc32c\n\
         do_verify=1\n\
         verify_fatal=1\n",
        config = config.display()
    );
    std::fs::write(&job, job_text).expect("write fio job");
    // `timeout` first: LD_PRELOAD must apply to fio only.
    let output = Command::new("timeout")
        .arg(RUN_TIMEOUT.as_secs().to_string())
        .arg("env")
        .arg(format!("LD_PRELOAD={} {}", plugin.display(), module.display()))
        .arg(&fio)
        .arg(&job)
        .current_dir(&dir)
        .output()
        .expect("run fio");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "fio exited with {}:\n{text}", output.status);
    assert!(text.contains("err= 0"), "fio reports errors:\n{text}");
    // "issued rwts: total=READS,WRITES,…": every written block was read back and verified.
    let issued = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("issued rwts: total="))
        .unwrap_or_else(|| panic!("no issued counts in fio's output:\n{text}"));
    let counts: Vec<u64> = issued.split([',', ' ']).take(2).map(|n| n.parse().expect("count")).collect();
    let blocks = 32 * 1024 * 1024 / 4096;
    assert_eq!(counts, [blocks, blocks], "writes and verify reads:\n{text}");
    assert!(!text.contains("verify: bad") && !text.contains("crc32c: verify failed"), "{text}");
    say(&format!("spdk_io: fio wrote and verified {blocks} blocks of 4 KiB"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chronicle volume exported over NVMe/TCP on 127.0.0.1 by `spdk_tgt` (core 0), driven by
/// bdevperf on core 1 through `bdev_nvme`, while markers cut generations: the verify workload
/// finds no errors, the I/O reached the volume from nvmf's own threads, the generations cut
/// during the run are listed in order with their comments and blocks, the sort keeps up, and
/// the target stops cleanly.
#[test]
fn nvme_tcp_export_is_driven_by_a_second_application_while_markers_cut_generations() {
    let Some(spdk_dir) = require_spdk("spdk_io nvme/tcp") else { return };
    let _serial = serial();
    let module = module_library();
    let port = (4420 + std::process::id() % 1000).to_string();
    let nqn = format!("nqn.2016-06.io.spdk:chronicle-{}", std::process::id());

    let target = App::start(&spdk_dir, &module, AppOptions::spdk_tgt());
    // Up to three generations that may each rewrite the whole volume are sorted: their
    // records need a history of three volumes and a little.
    let volume = MallocVolume::new("Net", VOLUME_BLOCKS, BLOCK).with_history_blocks(4 * VOLUME_BLOCKS);
    assert_eq!(volume.create(&target, json!({})), json!("Net"));
    assert_eq!(target.result("nvmf_create_transport", Some(json!({"trtype": "TCP"}))), json!(true));
    let subsystem =
        json!({"nqn": nqn, "allow_any_host": true, "serial_number": "CHRONICLE0001", "model_number": "chronicle"});
    assert_eq!(target.result("nvmf_create_subsystem", Some(subsystem)), json!(true));
    let namespace =
        target.result("nvmf_subsystem_add_ns", Some(json!({"nqn": nqn, "namespace": {"bdev_name": "Net"}})));
    assert_eq!(namespace, json!(1), "namespace id");
    let listen = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port});
    assert_eq!(
        target.result("nvmf_subsystem_add_listener", Some(json!({"nqn": nqn, "listen_address": listen}))),
        json!(true)
    );

    // The initiator: bdevperf on core 1 attaches the namespace as bdev RemoteNvmen1.
    let dir = scratch_dir("spdk_io-nvme-tcp");
    let config = dir.join("initiator.json");
    let attach = json!({"method": "bdev_nvme_attach_controller", "params": {
        "name": "RemoteNvme", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port,
        "subnqn": nqn}});
    write_bdev_config(&config, vec![attach]);
    let args = ["--json", config.to_str().expect("utf-8"), "-T", "RemoteNvmen1"];
    let workload = ["-q", "32", "-o", "4096", "-w", "verify", "-t", "4"];
    let all: Vec<&str> = args.iter().chain(&workload).copied().collect();
    say(&format!("spdk_io: bdevperf -m 0x2 {} against 127.0.0.1:{port}", all.join(" ")));
    let mut initiator = App::start(&spdk_dir, &module, AppOptions::bdevperf(&all, "0x2"));

    // While it runs: a marker each time new writes have reached the volume since the last one,
    // so every generation cut here holds writes.
    let mut marks: Vec<(u64, u64)> = Vec::new(); // (generation, host writes before the marker)
    while initiator.try_wait().is_none() && marks.len() < 3 {
        let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Net"})));
        let writes = status["volume"]["host"]["host_writes"].as_u64().expect("host_writes");
        if writes > marks.last().map_or(0, |&(_, w)| w) {
            let comment = format!("during I/O {}", marks.len() + 1);
            let sealed = target.result("bdev_chronicle_mark", Some(json!({"name": "Net", "comment": comment})));
            marks.push((sealed.as_u64().expect("generation"), writes));
        }
        // Spread the markers over the run.
        std::thread::sleep(Duration::from_millis(400));
    }
    let (status, log) = initiator.wait_exit(RUN_TIMEOUT);
    assert_clean_bdevperf_run(status, &log);
    assert!(log.contains("Job: RemoteNvmen1"), "bdevperf did not run on the NVMe/TCP namespace:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);

    // The markers sealed generations 1, 2, … in order.
    assert!(!marks.is_empty(), "bdevperf ended before any write reached the volume:\n{}", target.log_text());
    let numbers: Vec<u64> = marks.iter().map(|&(g, _)| g).collect();
    let expected: Vec<u64> = (1..=marks.len() as u64).collect();
    assert_eq!(numbers, expected, "markers during the run");

    // Every generation cut during the run is listed with its comment and is sealed (sorted
    // or waiting for the sort). `blocks` counts a sealed or backup generation's own writes and
    // a history generation's record (what the next generation overwrote): with writes in
    // every generation, some of them hold blocks.
    let listed = target.result("bdev_chronicle_get_generations", Some(json!({"name": "Net"})));
    let listed = listed.as_array().expect("generations").clone();
    let mut blocks = Vec::new();
    for (i, &(generation, _)) in marks.iter().enumerate() {
        let entry = listed
            .iter()
            .find(|g| g["generation"] == json!(generation))
            .unwrap_or_else(|| panic!("generation {generation} is not listed: {listed:?}"));
        assert_eq!(entry["comment"], json!(format!("during I/O {}", i + 1)), "{entry}");
        assert_ne!(entry["state"], json!("open"), "{entry}");
        blocks.push((generation, entry["blocks"].as_u64().expect("blocks")));
    }
    assert!(blocks.iter().any(|&(_, n)| n > 0), "no generation cut during the run holds blocks: {listed:?}");
    say(&format!("spdk_io: {} markers during NVMe/TCP I/O; blocks per generation: {blocks:?}", marks.len()));

    // The I/O reached the volume from nvmf's poll-group thread, which the target's one core
    // runs beside the app thread: directly, with no message either way. None failed.
    let status = target.result("bdev_chronicle_get_status", Some(json!({"name": "Net"})));
    assert!(status["io"]["direct_submissions"].as_u64().expect("direct_submissions") > 0, "{status}");
    assert_eq!(status["io"]["remote_submissions"], json!(0), "{status}");
    assert_eq!(status["io"]["reply_batches"], json!(0), "{status}");
    assert_eq!(status["io"]["completed_with_error"], json!(0), "{status}");
    assert_eq!(status["volume"]["host"]["write_errors"], json!(0), "{status}");
    assert_eq!(status["volume"]["failed"], Value::Null, "{status}");
    assert_eq!(status["volume"]["sort_error"], Value::Null, "{status}");

    // The target stops cleanly; nvmf may complain about the initiator leaving, chronicle not.
    let (status, log) = target.stop();
    assert!(status.success(), "spdk_tgt exited with {status}:\n{log}");
    let errors = chronicle_errors(&log);
    assert!(errors.is_empty(), "chronicle logged errors:\n{}\n\nwhole log:\n{log}", errors.join("\n"));
    assert!(log.contains("chronicle: Net closed"), "the volume did not close at stop:\n{log}");
}

/// A generation whose record does not fit in the history stops the sort, and the volume says
/// why everywhere it is asked: `get_status` carries the sort's error, the log has it, and the
/// writes of new blocks, which fail once the journal is full instead of waiting forever for
/// space the sort will never free, name it too.
///
/// bdevperf (which hosts the volume and serves RPC itself) writes every block of a 16 MiB
/// volume whose history is 16 MiB too (a record of every block plus its control block and the
/// history's metadata do not fit), and a marker seals that generation.
#[test]
fn a_generation_too_large_for_the_history_stops_the_sort_and_says_why() {
    let Some(spdk_dir) = require_spdk("spdk_io history full") else { return };
    let _serial = serial();
    const BLOCKS: u64 = 4096;
    let volume = MallocVolume::new("Full", BLOCKS, BLOCK).with_history_blocks(BLOCKS);
    let dir = scratch_dir("spdk_io-history-full");
    let config = dir.join("bdevperf.json");
    write_bdev_config(&config, volume.config_methods(json!({})));
    // `-f`: keep going after failed writes, so that the volume can still be asked about them.
    let workload = ["-q", "32", "-o", "4096", "-w", "write", "-t", "3", "-f"];
    let args: Vec<&str> =
        ["--json", config.to_str().expect("utf-8"), "-T", "Full"].iter().chain(&workload).copied().collect();
    let mut app = App::start(&spdk_dir, &module_library(), AppOptions::bdevperf(&args, "0x1"));
    app.wait_ready();
    let status = |app: &App| app.result("bdev_chronicle_get_status", Some(json!({"name": "Full"})));
    // Generation 1 holds every block once bdevperf's sequential writes went round once.
    loop {
        let report = status(&app);
        if report["volume"]["journal_used_elements"] == json!(BLOCKS) {
            break;
        }
        assert!(app.try_wait().is_none(), "bdevperf ended before writing every block: {report}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(app.result("bdev_chronicle_mark", Some(json!({"name": "Full", "comment": "every block"}))), json!(1));
    // The sort of generation 1 starts once its seal is durable, and stops at once.
    let sort_error = loop {
        let report = status(&app);
        if let Some(error) = report["volume"]["sort_error"].as_str() {
            break error.to_string();
        }
        assert_eq!(report["volume"]["backup_generation"], json!(0), "generation 1 was sorted: {report}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(sort_error.contains("history full") && sort_error.contains("generation 1"), "{sort_error}");
    assert!(sort_error.contains("enlarge the history"), "{sort_error}");

    // With -f bdevperf finishes its run whatever fails: its exit status says nothing here.
    let (_, log) = app.wait_exit(RUN_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    let total = bdevperf_total(&log).unwrap_or_else(|| panic!("no Total line:\n{log}"));
    assert!(total.fails_per_second > 0.0, "writes of new blocks did not fail: {total:?}\n{log}");
    let errors = chronicle_errors(&log);
    assert!(
        errors.iter().any(|line| line.contains("sort stopped") && line.contains("history full")),
        "the sort's stop is not logged:\n{log}"
    );
    let refused: Vec<&&str> = errors.iter().filter(|line| line.contains("journal full")).collect();
    assert!(!refused.is_empty(), "no write was refused for journal space:\n{log}");
    for line in refused {
        assert!(line.contains("history full"), "a refused write does not say why the journal stays full: {line}");
        assert!(!line.contains("nothing is waiting to be sorted"), "a sealed generation is waiting: {line}");
    }
}

/// The journal bdev is deleted while bdevperf writes through the volume from a job on the app
/// thread's core (direct entry) and one on the other core (by message): the volume closes and
/// unregisters, every I/O it held fails on its own thread (bdevperf counts failures and goes
/// on), nothing is dropped without completion, and the application ends cleanly.
#[test]
fn hot_remove_under_direct_and_hop_writes_fails_held_io_and_closes_cleanly() {
    let Some(spdk_dir) = require_spdk("spdk_io hot-remove under load") else { return };
    let _serial = serial();
    let volume = MallocVolume::new("Gone", VOLUME_BLOCKS, BLOCK);
    let dir = scratch_dir("spdk_io-hot-remove");
    let config = dir.join("bdevperf.json");
    write_bdev_config(&config, volume.config_methods(json!({})));
    // `-C`: a job per core; `-f`: keep going after failed writes.
    let workload = ["-C", "-q", "32", "-o", "4096", "-w", "randwrite", "-t", "4", "-f"];
    let args: Vec<&str> =
        ["--json", config.to_str().expect("utf-8"), "-T", "Gone"].iter().chain(&workload).copied().collect();
    let mut app = App::start(&spdk_dir, &module_library(), AppOptions::bdevperf(&args, "0x3"));
    app.wait_ready();
    // Both ways carry writes before the journal goes.
    loop {
        let status = app.result("bdev_chronicle_get_status", Some(json!({"name": "Gone"})));
        let taken = |way: &str| status["io"][way].as_u64().expect("a counter");
        if taken("direct_submissions") > 10_000 && taken("remote_submissions") > 10_000 {
            break;
        }
        assert!(app.try_wait().is_none(), "bdevperf ended early: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(app.result("bdev_malloc_delete", Some(json!({"name": volume.journal()}))), json!(true));
    let gone = app.call("bdev_get_bdevs", Some(json!({"name": "Gone"})));
    assert_eq!(gone["error"]["code"], json!(-libc::ENODEV), "the chronicle bdev is gone: {gone}");

    let (status, log) = app.wait_exit(RUN_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.code().is_some(), "bdevperf was killed by a signal ({status}):\n{log}");
    assert!(log.contains("the journal bdev of Gone is being removed"), "{log}");
    assert!(!log.contains("dropped without completion"), "an I/O was dropped:\n{log}");
    assert!(!log.contains("could not be sent home"), "an I/O stayed pending:\n{log}");
    if std::env::var_os("SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    let Ways { direct, remote, .. } = ways_taken(&log, "Gone");
    say(&format!("spdk_io: hot-remove under load: {direct} direct and {remote} remote writes before the close"));
}
