//! The `chronicle` command on real files: format's refusals, the demo, crash consistency under
//! SIGKILL, damaged metadata, offline tools that change nothing, and the benches' output.
//!
//! Volumes are 16 MiB files in a temporary directory (`CHRONICLE_TEST_DIR`, default the system's
//! temporary directory). `CHRONICLE_KILL_ROUNDS` sets the rounds of the SIGKILL test (default 5)
//! and `CHRONICLE_KILL_SEED` its seed, for a longer soak:
//!
//! ```text
//! CHRONICLE_KILL_ROUNDS=200 cargo test --profile soak --test cli sigkill -- --nocapture
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chronicle::core::format::superblock::{self, AreaKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BIN: &str = env!("CARGO_BIN_EXE_chronicle");
const FILES: [&str; 4] = ["base.img", "journal.img", "backup.img", "history.img"];
/// No command in these tests should take this long; a hang fails the test instead of the run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn test_dir() -> tempfile::TempDir {
    let base = std::env::var("CHRONICLE_TEST_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir());
    tempfile::Builder::new().prefix("chronicle-cli-").tempdir_in(base).expect("temporary directory")
}

/// A finished `chronicle` run.
struct Outcome {
    args: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status.success()
    }

    fn panicked(&self) -> bool {
        self.stderr.contains("panicked") || self.status.code() == Some(101) || self.status.signal().is_some()
    }

    /// Everything about the run, for assertion messages.
    fn describe(&self) -> String {
        format!(
            "chronicle {}\n  status: {}\n  stdout:\n{}\n  stderr:\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }

    #[track_caller]
    fn expect_ok(self) -> Self {
        assert!(self.ok(), "expected success:\n{}", self.describe());
        self
    }

    /// Refused cleanly: exit code 1, no panic, and a message on stderr.
    #[track_caller]
    fn expect_refused(self) -> Self {
        assert!(!self.panicked(), "panicked instead of refusing:\n{}", self.describe());
        assert_eq!(self.status.code(), Some(1), "expected exit code 1:\n{}", self.describe());
        assert!(!self.stderr.trim().is_empty(), "refused without a message:\n{}", self.describe());
        self
    }
}

fn read_all(mut file: File) -> String {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_to_string(&mut text).expect("utf-8 output");
    text
}

/// Runs `chronicle ARGS`, with output captured in files (no pipe can fill) and a time limit.
fn chronicle<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    let (stdout, stderr) = (tempfile::tempfile().expect("tempfile"), tempfile::tempfile().expect("tempfile"));
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("dup"))
        .stderr(stderr.try_clone().expect("dup"))
        .spawn()
        .expect("chronicle starts");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().expect("kill");
            child.wait().expect("wait");
            panic!(
                "chronicle {:?} did not finish in {COMMAND_TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
                read_all(stdout),
                read_all(stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        args: args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "),
        status,
        stdout: read_all(stdout),
        stderr: read_all(stderr),
    }
}

/// `chronicle format DIR --size 16M EXTRA...`, which must succeed.
fn format(dir: &Path, extra: &[&str]) {
    let mut args: Vec<&OsStr> = vec!["format".as_ref(), dir.as_ref(), "--size".as_ref(), "16M".as_ref()];
    args.extend(extra.iter().map(OsStr::new));
    chronicle(&args).expect_ok();
}

/// Content hashes of every file in `dir`, by name.
fn file_hashes(dir: &Path) -> Vec<(String, u64)> {
    let mut hashes: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("read");
            (path.file_name().expect("name").to_string_lossy().into_owned(), xxhash_rust::xxh3::xxh3_64(&data))
        })
        .collect();
    hashes.sort();
    hashes
}

fn copy_volume(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for name in FILES {
        std::fs::copy(from.join(name), to.join(name)).expect("copy");
    }
}

fn inspect_json(dir: &Path) -> serde_json::Value {
    let outcome = chronicle(&["inspect".as_ref(), dir.as_os_str(), "--json".as_ref()]).expect_ok();
    serde_json::from_str(&outcome.stdout)
        .unwrap_or_else(|e| panic!("inspect --json is not JSON ({e}):\n{}", outcome.stdout))
}

/// XORs each `(offset, mask)` (mask nonzero) into the bytes of `path`. Buffered writes: the
/// kernel writes them back before the engine's O_DIRECT reads of the same range.
fn flip(path: &Path, flips: &[(u64, u8)]) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    for (offset, mask) in flips {
        assert_ne!(*mask, 0);
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, *offset).expect("read");
        byte[0] ^= mask;
        file.write_all_at(&byte, *offset).expect("write");
    }
}

/// Where the journal's areas are, from its superblock (as the engine finds them).
struct JournalMap {
    file_bytes: u64,
    catalogs: [u64; 2],
    index_start: u64,
    index_pages: u64,
    elements_start: u64,
    element_capacity: u64,
    unit: u64,
}

impl JournalMap {
    fn read(dir: &Path) -> JournalMap {
        let bytes = std::fs::read(dir.join("journal.img")).expect("read journal");
        let superblock = superblock::choose(&bytes[..4096], &bytes[4096..8192]).expect("a valid journal superblock");
        let area = |kind| superblock.area(kind).unwrap_or_else(|| panic!("journal superblock lacks {kind:?}"));
        let (index, elements) = (area(AreaKind::ElementIndex), area(AreaKind::Elements));
        let unit = u64::from(superblock.host_write_size);
        JournalMap {
            file_bytes: bytes.len() as u64,
            catalogs: [area(AreaKind::CatalogA).start_bytes, area(AreaKind::CatalogB).start_bytes],
            index_start: index.start_bytes,
            index_pages: index.length_bytes / 8192,
            elements_start: elements.start_bytes,
            element_capacity: elements.length_bytes / unit,
            unit,
        }
    }

    /// Byte offset of slot `slot` of virtual index page `page` (FORMAT.md §3).
    fn index_slot(&self, page: u64, slot: u64) -> u64 {
        self.index_start + (2 * (page % self.index_pages) + slot) * 4096
    }

    /// Byte offset of virtual segment `segment`.
    fn segment(&self, segment: u64) -> u64 {
        self.elements_start + (segment % self.element_capacity) * self.unit
    }
}

#[test]
fn format_refuses_bad_input_and_changes_nothing() {
    let root = test_dir();
    let fresh = root.path().join("fresh");
    let refusals: [(&[&str], &[&str]); 4] = [
        (&["--size", "16777000"], &["16777000", "multiple of the host write size"]),
        (&["--size", "16M", "--host-write-size", "3000"], &["3000", "power of two"]),
        (&["--size", "16M", "--journal-size", "100K"], &["journal", "100 KiB", "needs at least", "16 MiB volume"]),
        (&["--size", "16M", "--history-size", "100K"], &["history", "100 KiB", "needs at least", "16 MiB volume"]),
    ];
    for (args, words) in refusals {
        let mut all: Vec<&OsStr> = vec!["format".as_ref(), fresh.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        let outcome = chronicle(&all).expect_refused();
        for word in words {
            assert!(outcome.stderr.contains(word), "the message should name {word:?}:\n{}", outcome.describe());
        }
        assert!(!fresh.exists(), "a refused format left {} behind:\n{}", fresh.display(), outcome.describe());
    }

    // An existing volume is kept: without --force, and with --force but impossible sizes.
    let volume = root.path().join("volume");
    format(&volume, &["--journal-size", "20M"]);
    chronicle(&["load".as_ref(), volume.as_os_str(), "--seconds".as_ref(), "0.2".as_ref()]).expect_ok();
    let before = file_hashes(&volume);
    let outcome =
        chronicle(&["format".as_ref(), volume.as_os_str(), "--size".as_ref(), "16M".as_ref()]).expect_refused();
    assert!(
        outcome.stderr.contains("already holds volume files") && outcome.stderr.contains("--force"),
        "{}",
        outcome.describe()
    );
    assert_eq!(file_hashes(&volume), before, "a refused format changed the volume");
    let outcome = chronicle(&[
        "format".as_ref(),
        volume.as_os_str(),
        "--size".as_ref(),
        "16M".as_ref(),
        "--journal-size".as_ref(),
        "100K".as_ref(),
        "--force".as_ref(),
    ])
    .expect_refused();
    assert!(outcome.stderr.contains("journal"), "{}", outcome.describe());
    assert_eq!(file_hashes(&volume), before, "format --force with an impossible journal destroyed the volume");
    chronicle(&["verify".as_ref(), volume.as_os_str()]).expect_ok();

    // --force with good sizes replaces it with an empty volume.
    format(&volume, &["--force"]);
    let description = inspect_json(&volume);
    assert_eq!(description["open_generation"]["generation"], 1, "{description:#}");
    assert_eq!(description["open_generation"]["elements"], 0, "{description:#}");
}

#[test]
fn demo_verifies_three_generations() {
    let root = test_dir();
    let dir = root.path().join("demo");
    let outcome = chronicle(&[
        "demo".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
        "--size".as_ref(),
        "16M".as_ref(),
        "--generations".as_ref(),
        "3".as_ref(),
    ])
    .expect_ok();
    assert!(outcome.stdout.lines().any(|line| line == "verified"), "{}", outcome.describe());
    assert!(!outcome.stderr.contains("MISMATCH"), "{}", outcome.describe());
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text} is not a number")),
        Err(_) => default,
    }
}

/// Rounds on one volume before a fresh one is formatted (bounds history space and check time).
const ROUNDS_PER_VOLUME: u64 = 10;

/// `load` is killed with SIGKILL at a random moment, over and over; after each kill, `check`
/// recovers the volume and finds every acknowledged write (or a newer one) in the newest
/// generation, every generation self-consistent and none older than the one before.
#[test]
fn sigkill_during_load_loses_no_acknowledged_write() {
    let rounds = env_number("CHRONICLE_KILL_ROUNDS", 5);
    let seed = env_number("CHRONICLE_KILL_SEED", 20_241_105);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let root = test_dir();
    let (mut dir, mut log) = (PathBuf::new(), PathBuf::new());
    // Generations before the backup generation of the previous check were checked then; only
    // newer ones (whose images new history records can change) are checked again.
    let mut since_generation = 0u64;
    let mut interrupted_sorts = 0u64;
    for round in 0..rounds {
        if round % ROUNDS_PER_VOLUME == 0 {
            let epoch = round / ROUNDS_PER_VOLUME;
            dir = root.path().join(format!("volume-{epoch}"));
            log = root.path().join(format!("acknowledged-{epoch}.log"));
            if epoch > 0 {
                std::fs::remove_dir_all(root.path().join(format!("volume-{}", epoch - 1))).expect("remove");
            }
            // A journal that holds every block of the volume (20 MiB: 16 MiB of elements plus
            // metadata) never fills in latest mode; a large (sparse) history keeps every
            // generation of ten rounds.
            format(&dir, &["--journal-size", "20M", "--history-size", "1G"]);
            since_generation = 0;
        }
        let delay = Duration::from_millis(rng.random_range(300..=1500));
        let mut child = Command::new(BIN)
            .arg("load")
            .arg(&dir)
            .args(["--seconds", "30", "--queue-depth", "16", "--marker-every-ms", "50", "--seed"])
            .arg((round + 1).to_string())
            .arg("--ack-log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("load starts");
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stderr = String::new();
            child.stderr.take().expect("piped").read_to_string(&mut stderr).expect("stderr");
            panic!("round {round} (seed {seed}): load ended by itself before the kill: {status}\n{stderr}");
        }
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}: load was not killed");

        let before = inspect_json(&dir);
        let cursor = &before["history"]["sort_cursor"];
        if cursor["state"] == "Running"
            && cursor["generation"].as_u64() > before["history"]["backup_generation"].as_u64()
        {
            interrupted_sorts += 1;
        }
        let outcome = chronicle(&[
            "check".as_ref(),
            dir.as_os_str(),
            "--ack-log".as_ref(),
            log.as_os_str(),
            "--since-generation".as_ref(),
            since_generation.to_string().as_ref(),
        ]);
        assert!(
            outcome.ok(),
            "round {round} (seed {seed}, killed after {delay:?}): check failed:\n{}",
            outcome.describe()
        );
        let after = inspect_json(&dir);
        since_generation = after["history"]["backup_generation"].as_u64().expect("backup generation");
        println!(
            "round {round}: killed after {} ms; {}",
            delay.as_millis(),
            outcome.stdout.lines().next().unwrap_or("").chars().take(120).collect::<String>()
        );
    }
    println!("{rounds} rounds (seed {seed}); {interrupted_sorts} kills interrupted a sort");
}

/// A volume with sealed generations that stay in the journal (the history is too small for
/// their sort) and an open generation spanning several element index pages, written by `load`
/// with an acknowledgement log.
fn damage_volume(root: &Path) -> (PathBuf, PathBuf) {
    let dir = root.join("pristine");
    let log = root.join("acknowledged.log");
    format(&dir, &["--journal-size", "64M", "--history-size", "1M"]);
    let load = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec!["load".as_ref(), dir.as_os_str(), "--ack-log".as_ref(), log.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        chronicle(&args).expect_ok()
    };
    // Generations of a few hundred blocks each: the first sort needs more history than 1 MiB.
    load(&["--seconds", "0.4", "--queue-depth", "16", "--marker-every-ms", "100", "--seed", "11"]);
    // Then the open generation grows past one index page (504 entries) without markers.
    for seed in 12..17 {
        if inspect_json(&dir)["open_generation"]["elements"].as_u64().expect("elements") > 2 * 504 {
            break;
        }
        load(&["--seconds", "0.5", "--queue-depth", "16", "--seed", &seed.to_string()]);
    }
    (dir, log)
}

/// Damage that no copy can make up for is refused by `verify`, `check` and `inspect`, with a
/// message that says what is damaged, and never with a panic.
#[test]
fn damaged_journal_metadata_is_refused_with_a_message() {
    let root = test_dir();
    let (pristine, log) = damage_volume(root.path());
    chronicle(&["verify".as_ref(), pristine.as_os_str()]).expect_ok();
    let map = JournalMap::read(&pristine);
    let description = inspect_json(&pristine);
    let entries = description["journal"]["entries"].as_array().expect("journal entries").clone();

    // Each case: name, the byte offsets to flip, and words the refusal must contain.
    let mut cases: Vec<(&str, Vec<u64>, Vec<String>)> = vec![
        ("both journal superblock copies", vec![40, 4096 + 40], vec!["journal".into()]),
        ("both journal catalog slots", vec![map.catalogs[0] + 64, map.catalogs[1] + 64], vec!["journal".into()]),
    ];
    let mut skipped = Vec::new();
    let open = entries.iter().find(|e| e["state"] == "Open").expect("an open generation");
    let open_elements = description["open_generation"]["elements"].as_u64().expect("elements");
    if open_elements > 504 {
        // Page 0 of the open generation in both slots, while page 1 is intact: the engine must
        // not mistake the damage for the end of the generation.
        let page = open["control_start"].as_u64().expect("control_start");
        cases.push((
            "open generation's first index page, both slots",
            vec![map.index_slot(page, 0) + 100, map.index_slot(page, 1) + 100],
            vec!["element index page 0".into(), "later pages".into()],
        ));
    } else {
        skipped.push(format!("the open generation has only {open_elements} elements (one index page)"));
    }
    match entries.iter().find(|e| e["state"] == "Sealed" && e["element_count"].as_u64() > Some(0)) {
        Some(sealed) => {
            let segment = sealed["element_start"].as_u64().expect("element_start");
            cases.push((
                "a sealed generation's journal element",
                vec![map.segment(segment) + 1000],
                vec![format!("sealed generation {}", sealed["generation"])],
            ));
        }
        // The sort caught up with every sealed generation (it should not: the history is
        // smaller than one generation); the case is skipped, not passed.
        None => skipped.push("no sealed generation with elements is left in the journal".into()),
    }
    assert!(cases.len() >= 3, "too few damage cases could be built: {skipped:?}\n{description:#}");
    for why in &skipped {
        println!("skipped: {why}");
    }

    for (index, (name, offsets, words)) in cases.iter().enumerate() {
        let dir = root.path().join(format!("case-{index}"));
        copy_volume(&pristine, &dir);
        flip(&dir.join("journal.img"), &offsets.iter().map(|offset| (*offset, 0x5A)).collect::<Vec<_>>());
        let verify = chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_refused();
        for word in words {
            assert!(
                verify.stderr.contains(word.as_str()),
                "{name}: verify should say {word:?}:\n{}",
                verify.describe()
            );
        }
        let inspect = chronicle(&["inspect".as_ref(), dir.as_os_str()]).expect_refused();
        assert!(inspect.stderr.contains(words[0].as_str()), "{name}:\n{}", inspect.describe());
        let before = file_hashes(&dir);
        let check =
            chronicle(&["check".as_ref(), dir.as_os_str(), "--ack-log".as_ref(), log.as_os_str()]).expect_refused();
        assert!(check.stderr.contains(words[0].as_str()), "{name}:\n{}", check.describe());
        assert_eq!(file_hashes(&dir), before, "{name}: a refused open changed the volume");
        println!("{name}: refused: {}", verify.stderr.trim());
    }
}

/// Many random flipped bytes: `verify` and `check` answer (0 or 1), never panic, and whenever
/// `verify` finds the volume sound, `check` recovers it and finds every acknowledged write.
#[test]
fn random_flips_never_panic_and_verify_ok_implies_check_ok() {
    let root = test_dir();
    let (pristine, log) = damage_volume(root.path());
    let map = JournalMap::read(&pristine);
    // The undamaged volume passes, so a failure below is the damage's.
    let intact = root.path().join("intact");
    copy_volume(&pristine, &intact);
    chronicle(&["check".as_ref(), intact.as_os_str(), "--ack-log".as_ref(), log.as_os_str()]).expect_ok();
    let (mut sound, mut damaged) = (0, 0);
    for seed in 0..6u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Even seeds flip anywhere in the journal file; odd ones only in its metadata (before
        // the elements), where most decoders are.
        let end = if seed % 2 == 0 { map.file_bytes } else { map.elements_start };
        let dir = root.path().join(format!("seed-{seed}"));
        copy_volume(&pristine, &dir);
        let flips: Vec<(u64, u8)> = (0..200).map(|_| (rng.random_range(0..end), rng.random_range(1..=255u8))).collect();
        flip(&dir.join("journal.img"), &flips);
        let verify = chronicle(&["verify".as_ref(), dir.as_os_str()]);
        assert!(
            !verify.panicked() && matches!(verify.status.code(), Some(0 | 1)),
            "seed {seed}:\n{}",
            verify.describe()
        );
        let check = chronicle(&["check".as_ref(), dir.as_os_str(), "--ack-log".as_ref(), log.as_os_str()]);
        assert!(!check.panicked() && matches!(check.status.code(), Some(0 | 1)), "seed {seed}:\n{}", check.describe());
        if verify.ok() {
            sound += 1;
            assert!(check.ok(), "seed {seed}: verify found the volume sound, check did not:\n{}", check.describe());
        } else {
            damaged += 1;
        }
        println!("seed {seed}: verify {}, check {}", verify.status, check.status);
    }
    println!("{sound} volumes verified sound, {damaged} refused");
}

#[test]
fn inspect_json_names_generations_and_offline_tools_change_nothing() {
    let root = test_dir();
    let dir = root.path().join("volume");
    format(&dir, &["--journal-size", "20M"]);
    let log = root.path().join("acknowledged.log");
    chronicle(&[
        "load".as_ref(),
        dir.as_os_str(),
        // Counted, not timed: the same generations however fast the machine is (a timed load
        // once filled the history on a fast one).
        "--seconds".as_ref(),
        "30".as_ref(),
        "--writes".as_ref(),
        "4000".as_ref(),
        "--marker-every-writes".as_ref(),
        "1000".as_ref(),
        "--ack-log".as_ref(),
        log.as_os_str(),
    ])
    .expect_ok();
    let before = file_hashes(&dir);
    let description = inspect_json(&dir);
    let text = chronicle(&["inspect".as_ref(), dir.as_os_str()]).expect_ok();
    let verify = chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_ok();
    assert_eq!(file_hashes(&dir), before, "inspect or verify changed the volume");
    assert!(verify.stdout.contains(": ok"), "{}", verify.describe());

    let generations = description["generations"].as_array().expect("generations");
    let numbers: Vec<u64> = generations.iter().map(|g| g["generation"].as_u64().expect("number")).collect();
    let open = description["open_generation"]["generation"].as_u64().expect("open generation");
    assert_eq!(open, 4, "three markers in 4,000 writes seal generations 1 to 3:\n{description:#}");
    assert_eq!(numbers, (0..=open).collect::<Vec<_>>(), "every generation is named once, in order");
    assert_eq!(generations.last().expect("open")["state"], "open");
    assert_eq!(generations[0]["comment"], "format");
    for generation in &generations[1..generations.len() - 1] {
        assert!(generation["comment"].as_str().expect("comment").starts_with("load marker"), "{generation}");
        assert!(["history", "backup", "sealed"].contains(&generation["state"].as_str().expect("state")));
    }
    for number in &numbers {
        assert!(
            text.stdout.lines().any(|line| line.split_whitespace().next() == Some(number.to_string().as_str())),
            "inspect names generation {number}:\n{}",
            text.stdout
        );
    }
    // check (recovery) may write, but then the volume verifies again.
    chronicle(&["check".as_ref(), dir.as_os_str(), "--ack-log".as_ref(), log.as_os_str()]).expect_ok();
    chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_ok();
}

#[test]
fn bench_randwrite_prints_a_json_last_line() {
    let root = test_dir();
    let dir = root.path().join("volume");
    // A journal that holds every block of the volume (plus metadata) never fills in latest
    // mode; 16 MiB would hold only 3798 of the 4096 blocks.
    format(&dir, &["--journal-size", "20M"]);
    let outcome = chronicle(&[
        "bench".as_ref(),
        dir.as_os_str(),
        "--workload".as_ref(),
        "randwrite".as_ref(),
        "--seconds".as_ref(),
        "1".as_ref(),
        "--queue-depth".as_ref(),
        "16".as_ref(),
        "--json".as_ref(),
    ])
    .expect_ok();
    let last = outcome.stdout.lines().last().expect("output");
    let result: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}):\n{}", outcome.describe()));
    for field in ["iops", "mib_per_s", "p50_us", "p99_us"] {
        let value = result[field].as_f64().unwrap_or_else(|| panic!("{field} missing:\n{result:#}"));
        assert!(value > 0.0, "{field} = {value}:\n{result:#}");
    }
    assert_eq!(result["errors"], 0, "{result:#}");
    assert!(result["p99_us"].as_f64() >= result["p50_us"].as_f64(), "{result:#}");
    chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_ok();
}

/// `chronicle bench-history` (issue 5) with tiny sizes: the JSON has every section with
/// positive numbers, the merged record holds exactly the blocks the generations wrote, merging
/// saves more the more generations overlap, dedup shares more the more contents repeat, the
/// table prints every section, nothing is left in DIR, and impossible parameters are refused
/// before anything is written.
#[test]
fn bench_history_measures_every_section() {
    let root = test_dir();
    let dir = root.path().join("bench");
    // Three generations of 48 blocks on 2 MiB volumes (8 MiB for the second R-VOL size).
    let args = |json: bool, seconds: &str| {
        let mut args = vec![OsString::from("bench-history"), dir.clone().into_os_string()];
        let sizes = ["--size", "2M", "--latency-size", "2M", "--rvol-sizes", "2M,8M", "--rvol-opens", "2"];
        let history = ["--generations", "3", "--writes", "48", "--marker-every-ms", "30"];
        let durations = ["--read-seconds", seconds, "--latency-seconds", seconds];
        args.extend(sizes.iter().chain(&history).chain(&durations).map(OsString::from));
        if json {
            args.push("--json".into());
        }
        args
    };
    let outcome = chronicle(&args(true, "0.3")).expect_ok();
    let report: serde_json::Value = serde_json::from_str(&outcome.stdout)
        .unwrap_or_else(|e| panic!("output is not JSON ({e}):\n{}", outcome.describe()));
    let positive = |value: &serde_json::Value, path: &str| {
        let number = path.split('.').fold(value, |v, key| &v[key]).as_f64();
        assert!(number.is_some_and(|n| n > 0.0), "{path} = {number:?}, expected > 0:\n{value:#}");
    };

    let merge = &report["merge"];
    for path in ["source_elements", "output_elements", "seconds", "source_mib_per_s", "source_elements_per_s"] {
        positive(merge, path);
    }
    assert_eq!(merge["records"], 3, "{merge:#}");

    let overlap = report["overlap"].as_array().expect("overlap rows");
    assert_eq!(overlap.len(), 5, "{overlap:#?}");
    for row in overlap {
        positive(row, "units_before");
        positive(row, "units_after");
        positive(row, "saved_percent");
        assert_eq!(
            row["merged_elements"], row["distinct_blocks"],
            "the merged record holds every written block: {row:#}"
        );
    }
    let saved = |row: &serde_json::Value| row["saved_percent"].as_f64().unwrap();
    assert!(saved(&overlap[4]) > saved(&overlap[2]) && saved(&overlap[2]) > saved(&overlap[0]), "{overlap:#?}");

    // Dedup: nothing shared without repeated contents; with every block repeating one of 16
    // contents all but at most 16 elements are shared; more repetition, more shared.
    let dedup = report["dedup"].as_array().expect("dedup rows");
    assert_eq!(dedup.len(), 5, "{dedup:#?}");
    let shared = |row: &serde_json::Value| row["dedup_shared"].as_u64().unwrap();
    let elements = |row: &serde_json::Value| row["merged_elements"].as_u64().unwrap();
    assert_eq!(shared(&dedup[0]), 0, "{dedup:#?}");
    assert!(shared(&dedup[4]) + 16 >= elements(&dedup[4]) && elements(&dedup[4]) > 16, "{dedup:#?}");
    assert!(shared(&dedup[4]) > shared(&dedup[2]) && shared(&dedup[2]) > shared(&dedup[0]), "{dedup:#?}");
    for row in dedup {
        assert_eq!(row["dedup_mismatches"], 0, "xxh3-128 never collides here: {row:#}");
    }
    // Dedup across records: nothing shared or declined when every rewrite changes its block;
    // blocks rewritten unchanged at random (25 %, 50 %) match one by one, scattered, and are
    // stored all the same (declined); all of them unchanged match in one run, shared but for
    // its first 15 units; units kept for them when their record goes are counted as retained.
    let across = report["dedup_across"].as_array().expect("dedup across rows");
    assert_eq!(across.len(), 5, "{across:#?}");
    let shared_across = |row: &serde_json::Value| row["shared_across"].as_u64().unwrap();
    let declined = |row: &serde_json::Value| row["declined_scattered"].as_u64().unwrap();
    assert_eq!((shared_across(&across[0]), declined(&across[0])), (0, 0), "{across:#?}");
    assert_eq!(across[0]["retained_units"], 0, "{across:#?}");
    assert!(declined(&across[1]) > 0 && declined(&across[2]) > declined(&across[1]), "{across:#?}");
    assert!(shared_across(&across[4]) > shared_across(&across[2]), "{across:#?}");
    // Pointing at a record that is merged away later costs its shared units as retained ones:
    // dedup never leaves the history bigger than storing them.
    for row in [&across[1], &across[2], &across[4]] {
        assert!(row["units_after"].as_u64() <= across[0]["units_after"].as_u64(), "{across:#?}");
    }
    assert!(across[4]["retained_units"].as_u64() > Some(0), "{across:#?}");
    for row in across {
        positive(row, "merged_elements");
        positive(row, "merged_elements_per_s");
    }

    let sizes = report["rvol_open"]["sizes"].as_array().expect("R-VOL sizes");
    assert_eq!(sizes.len(), 2, "{sizes:#?}");
    for size in sizes {
        positive(size, "total_ms_median");
        positive(size, "control_block_bytes");
        assert_eq!(size["records"], 3, "{size:#}");
        for series in ["open_ms", "first_read_ms", "total_ms"] {
            let values = size[series].as_array().expect("one value per open");
            assert!(values.len() == 2 && values.iter().all(|v| v.as_f64() > Some(0.0)), "{series}: {size:#}");
        }
    }
    positive(&report["rvol_open"], "growth");

    let read = &report["rvol_read"];
    for path in ["history_percent", "volume.iops", "volume.p99_us", "rvol.iops", "rvol.p99_us", "ratio"] {
        positive(read, path);
    }

    // Compression: random contents do not shrink (every record left as it was); the more
    // text-like blocks, the higher the ratio; R-VOL reads of compressed records work.
    let compress = report["compress"].as_array().expect("compress rows");
    assert_eq!(compress.len(), 3, "{compress:#?}");
    assert_eq!(compress[0]["records_left"], compress[0]["records"], "{compress:#?}");
    let ratio = |row: &serde_json::Value| row["ratio"].as_f64().unwrap();
    assert!(ratio(&compress[2]) > ratio(&compress[1]) && ratio(&compress[1]) > 1.0, "{compress:#?}");
    for row in &compress[1..] {
        assert_eq!(row["records_left"], 0, "{row:#}");
        for path in ["compress_mib_per_s", "decompress_mib_per_s", "rvol_compressed.iops", "rvol_uncompressed.iops"] {
            positive(row, path);
        }
    }

    let latency = &report["latency"];
    let phases = latency["phases"].as_array().expect("latency phases");
    let names: Vec<&str> = phases.iter().map(|p| p["phase"].as_str().unwrap_or("?")).collect();
    assert_eq!(names, ["idle", "markers", "markers+sort", "markers+sort+merge"]);
    for phase in phases {
        positive(phase, "writes.iops");
        positive(phase, "writes.p50_us");
        assert!(phase["writes"]["p99_us"].as_f64() >= phase["writes"]["p50_us"].as_f64(), "{phase:#}");
    }
    for phase in &phases[1..] {
        positive(phase, "markers");
    }
    positive(&phases[3], "merges");
    positive(&phases[3], "during_merge.ios");
    positive(&phases[3], "during_merge.p99_us");
    positive(latency, "merge_p99_over_idle");
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "bench-history left volumes in {}", dir.display());

    // The table: every section's heading, each followed by numbers.
    let table = chronicle(&args(false, "0.1")).expect_ok().stdout;
    for heading in [
        "1. merge throughput",
        "2. history units",
        "3. time to the first R-VOL read",
        "4. random",
        "5. host write latency",
        "6. history units a merge stores",
        "6b. dedup across records",
        "7. compression",
    ] {
        let at = table.find(heading).unwrap_or_else(|| panic!("no section {heading:?}:\n{table}"));
        let body = table[at..].lines().nth(2).unwrap_or_default();
        assert!(
            body.split_whitespace().any(|w| w.parse::<f64>().is_ok_and(|n| n > 0.0)),
            "{heading}: {body:?}\n{table}"
        );
    }

    for bad in
        [&["--generations", "1"][..], &["--rvol-sizes", "4095"], &["--latency-seconds", "nan"], &["--writes", "0"]]
    {
        let mut args: Vec<&OsStr> = vec!["bench-history".as_ref(), dir.as_os_str()];
        args.extend(bad.iter().map(OsStr::new));
        chronicle(&args).expect_refused();
    }
}

/// FORMAT.md §6 and §14.1: the superblock has two copies, so one damaged copy leaves a volume
/// that opens. Format writes only the copy at byte 0 (the page at 4096 stays zero).
#[test]
fn one_damaged_superblock_copy_is_survived() {
    let root = test_dir();
    let dir = root.path().join("volume");
    format(&dir, &["--journal-size", "20M"]);
    chronicle(&["load".as_ref(), dir.as_os_str(), "--seconds".as_ref(), "0.2".as_ref()]).expect_ok();
    for name in ["journal.img", "history.img"] {
        let copy = root.path().join(format!("copy-{name}"));
        copy_volume(&dir, &copy);
        flip(&copy.join(name), &[(40, 0x5A)]);
        let verify = chronicle(&["verify".as_ref(), copy.as_os_str()]);
        assert!(verify.ok(), "{name}: one damaged superblock copy made the volume unopenable:\n{}", verify.describe());
    }
}

/// `inspect DIR | head` ends quietly when the reader goes away.
#[test]
fn inspect_into_a_closed_pipe_does_not_panic() {
    let root = test_dir();
    let dir = root.path().join("volume");
    format(&dir, &[]);
    let mut child = Command::new(BIN)
        .args(["inspect".as_ref(), dir.as_os_str(), "--json".as_ref()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inspect starts");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A volume in `root`/vol with 64 MiB of journal and history, loaded with 6,000 writes and a
/// marker every `marker_every_writes`; its directory and ack log.
fn loaded_volume(root: &Path, marker_every_writes: &str) -> (PathBuf, PathBuf) {
    let dir = root.join("vol");
    format(&dir, &["--history-size", "64M", "--journal-size", "64M"]);
    let ack_log = root.join("ack.log");
    chronicle(&[
        OsStr::new("load"),
        dir.as_os_str(),
        OsStr::new("--seconds"),
        OsStr::new("30"),
        OsStr::new("--writes"),
        OsStr::new("6000"),
        OsStr::new("--marker-every-writes"),
        OsStr::new(marker_every_writes),
        OsStr::new("--ack-log"),
        ack_log.as_os_str(),
    ])
    .expect_ok();
    (dir, ack_log)
}

/// `chronicle generations DIR --json`, parsed.
fn generations_json(dir: &Path) -> serde_json::Value {
    let listed = chronicle(&[OsStr::new("generations"), dir.as_os_str(), OsStr::new("--json")]).expect_ok();
    serde_json::from_str(&listed.stdout).expect("JSON")
}

#[test]
fn history_commands_merge_delete_list_and_restore_generations() {
    let root = test_dir();
    let (dir, ack_log) = loaded_volume(root.path(), "500");
    let listed = chronicle(&[OsStr::new("generations"), dir.as_os_str()]).expect_ok();
    assert!(listed.stdout.contains("history") && listed.stdout.contains("load marker 0"), "{}", listed.describe());

    // Merge generations 1..3: image 1 stays, 2 and 3 are given up.
    let merged = chronicle(&[
        OsStr::new("merge"),
        dir.as_os_str(),
        OsStr::new("--from"),
        OsStr::new("1"),
        OsStr::new("--through"),
        OsStr::new("3"),
    ])
    .expect_ok();
    assert!(merged.stdout.contains("merged 3 records into generation 1..3"), "{}", merged.describe());
    let dropped =
        chronicle(&[OsStr::new("delete-generation"), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("0")]);
    dropped.expect_ok();
    let list = generations_json(&dir);
    let states: Vec<(u64, u64, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["generation"].as_u64().unwrap(), g["through_generation"].as_u64().unwrap(), g["state"].to_string()))
        .collect();
    assert_eq!(states[0], (1, 3, "\"merged\"".into()), "{states:?}");

    // Every generation still restorable is exact, every acknowledged write is there.
    let check = chronicle(&[OsStr::new("check"), dir.as_os_str(), OsStr::new("--ack-log"), ack_log.as_os_str()]);
    check.expect_ok();

    // restore writes exactly the image the volume holds for a generation; one given up is refused.
    let output = root.path().join("generation-4.img");
    let restored = chronicle(&[
        OsStr::new("restore"),
        dir.as_os_str(),
        OsStr::new("--generation"),
        OsStr::new("4"),
        OsStr::new("--output"),
        output.as_os_str(),
    ]);
    restored.expect_ok();
    let channels = {
        use chronicle::device::uring::{UringContext, UringContextOptions, UringDevice, UringOptions};
        use chronicle::device::Device;
        let context = UringContext::new(&UringContextOptions::default()).expect("io_uring");
        FILES
            .iter()
            .map(|name| {
                let options = UringOptions { read_only: true, allow_buffered: true, ..UringOptions::default() };
                UringDevice::open(dir.join(name), &options, context.clone()).unwrap().open_channel().unwrap()
            })
            .collect::<Vec<_>>()
    };
    let reader = chronicle::engine::reader::VolumeReader::open(channels).expect("reader");
    assert!(std::fs::read(&output).unwrap() == reader.read_image(4).unwrap(), "the restored file is generation 4");
    drop(reader);
    let refused = chronicle(&[
        OsStr::new("restore"),
        dir.as_os_str(),
        OsStr::new("--generation"),
        OsStr::new("2"),
        OsStr::new("--output"),
        output.as_os_str(),
    ]);
    assert!(!refused.ok() && !refused.panicked(), "{}", refused.describe());
    assert!(refused.stderr.contains("generation 2 cannot be restored"), "{}", refused.describe());

    // rollback makes the volume's image generation 4's again, as a new generation.
    let refused = chronicle(&[OsStr::new("rollback"), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("2")]);
    assert!(!refused.ok() && refused.stderr.contains("merged into generations 1..=3"), "{}", refused.describe());
    let rolled =
        chronicle(&[OsStr::new("rollback"), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("4")]).expect_ok();
    let generation: u64 = rolled
        .stdout
        .split("sealed as generation ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", rolled.describe()));
    let again = root.path().join("rolled.img");
    chronicle(&[
        OsStr::new("restore"),
        dir.as_os_str(),
        OsStr::new("--generation"),
        OsStr::new(&generation.to_string()),
        OsStr::new("--output"),
        again.as_os_str(),
    ])
    .expect_ok();
    assert!(
        std::fs::read(&again).unwrap() == std::fs::read(&output).unwrap(),
        "the rolled-back image is generation 4's"
    );
}

/// Opens the volume in `dir` read-only through io_uring, as the offline tools do.
fn open_reader(dir: &Path) -> chronicle::engine::reader::VolumeReader {
    use chronicle::device::uring::{UringContext, UringContextOptions, UringDevice, UringOptions};
    use chronicle::device::Device;
    let context = UringContext::new(&UringContextOptions::default()).expect("io_uring");
    let channels = FILES
        .iter()
        .map(|name| {
            let options = UringOptions { read_only: true, allow_buffered: true, ..UringOptions::default() };
            UringDevice::open(dir.join(name), &options, context.clone()).unwrap().open_channel().unwrap()
        })
        .collect::<Vec<_>>();
    chronicle::engine::reader::VolumeReader::open(channels).expect("reader")
}

#[test]
fn all_mode_restores_any_sequence_and_refuses_what_it_does_not_keep() {
    let root = test_dir();
    let dir = root.path().join("vol");
    // Every write is kept in "all" mode: a journal of eight volumes (large enough that an index
    // sized for "latest" entries would leave no room for online generations).
    format(&dir, &["--journal-mode", "all", "--journal-size", "128M", "--history-size", "128M"]);
    let load = [
        "load",
        dir.to_str().unwrap(),
        "--seconds",
        "30",
        "--writes",
        "4000",
        "--marker-every-writes",
        "1000",
        "--queue-depth",
        "8",
    ];
    chronicle(&load).expect_ok();
    let listed = chronicle(&[OsStr::new("generations"), dir.as_os_str()]).expect_ok();
    assert!(
        listed.stdout.contains("versions:") && listed.stdout.contains("any-point restore"),
        "{}",
        listed.describe()
    );
    let list = generations_json(&dir);
    let open = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!(open["state"], "open");
    let versions = &open["versions"];
    let (first, last) = (versions["first_sequence"].as_u64().unwrap(), versions["last_sequence"].as_u64().unwrap());
    assert!(first < last, "the load wrote after its last marker: {open}");

    // A sequence in the middle of the open generation: the file is the reader's image there.
    let target = (first + last) / 2;
    let output = root.path().join("at.img");
    let restore = |sequence: u64| {
        chronicle(&[
            OsStr::new("restore"),
            dir.as_os_str(),
            OsStr::new("--sequence"),
            OsStr::new(&sequence.to_string()),
            OsStr::new("--output"),
            output.as_os_str(),
        ])
    };
    let restored = restore(target).expect_ok();
    assert!(restored.stdout.contains(&format!("restored sequence {target}")), "{}", restored.describe());
    let reader = open_reader(&dir);
    assert!(std::fs::read(&output).unwrap() == reader.read_sequence(target).unwrap(), "the file is sequence {target}");
    // The backup generation's cut is its image.
    let backup = reader.backup_generation();
    let cut = reader.generations().iter().find(|g| g.generation == backup).unwrap().last_sequence;
    assert!(reader.read_sequence(cut).unwrap() == reader.read_image(backup).unwrap(), "the cut is the image");
    let next = reader.next_sequence();
    // A time: the newest write taken by then (RFC 3339 or Unix nanoseconds).
    let now = chronicle::engine::now_ns();
    let at_now = reader.read_sequence(reader.sequence_at_time(now).unwrap()).unwrap();
    drop(reader);
    for time in [chronicle::core::time::rfc3339(now), now.to_string()] {
        chronicle(&[
            OsStr::new("restore"),
            dir.as_os_str(),
            OsStr::new("--time"),
            OsStr::new(&time),
            OsStr::new("--output"),
            output.as_os_str(),
        ])
        .expect_ok();
        assert!(std::fs::read(&output).unwrap() == at_now, "the file is the image at {time}");
    }
    let garbled = chronicle(&[
        OsStr::new("restore"),
        dir.as_os_str(),
        OsStr::new("--time"),
        OsStr::new("yesterday"),
        OsStr::new("--output"),
        output.as_os_str(),
    ]);
    assert!(!garbled.ok() && !garbled.panicked() && garbled.stderr.contains("RFC 3339"), "{}", garbled.describe());

    // Beyond the newest write: refused, the output untouched.
    std::fs::write(&output, b"untouched").unwrap();
    let refused = restore(next + 10).expect_refused();
    assert!(
        refused.stderr.contains("in the future") && refused.stderr.contains("restorable:"),
        "{}",
        refused.describe()
    );
    assert_eq!(std::fs::read(&output).unwrap(), b"untouched");
    // Exactly one target.
    let both = chronicle(&[
        OsStr::new("restore"),
        dir.as_os_str(),
        OsStr::new("--generation"),
        OsStr::new("0"),
        OsStr::new("--sequence"),
        OsStr::new("0"),
        OsStr::new("--output"),
        output.as_os_str(),
    ]);
    assert!(!both.ok() && !both.panicked() && both.stderr.contains("cannot be used with"), "{}", both.describe());

    // A "latest" mode volume keeps no versions.
    let latest = root.path().join("latest");
    format(&latest, &[]);
    let refused = chronicle(&[
        OsStr::new("restore"),
        latest.as_os_str(),
        OsStr::new("--sequence"),
        OsStr::new("0"),
        OsStr::new("--output"),
        output.as_os_str(),
    ])
    .expect_refused();
    assert!(refused.stderr.contains("\"latest\" journal mode"), "{}", refused.describe());
}

/// `--journal-full bitmap-only` with a journal far smaller than the volume: `bench` keeps
/// writing with no error once the journal is full (the writes go to the base, tracked by the
/// bitmap: FIG 36), `load` with markers killed by SIGKILL loses no acknowledged write and
/// every generation `check` reads is consistent, and `inspect` shows the policy and the mode.
#[test]
fn bitmap_only_keeps_writing_with_a_tiny_journal_and_loses_nothing() {
    let root = test_dir();
    let dir = root.path().join("volume");
    format(&dir, &["--journal-full", "bitmap-only", "--journal-size", "2M", "--history-size", "64M"]);
    let described = inspect_json(&dir);
    assert_eq!(described["journal_full_policy"], "BitmapOnly", "{described:#}");
    assert_eq!(described["open_generation"]["journal_full_mode"], "journaling", "{described:#}");

    let outcome = chronicle(&[
        "bench".as_ref(),
        dir.as_os_str(),
        "--workload".as_ref(),
        "randwrite".as_ref(),
        "--seconds".as_ref(),
        "1".as_ref(),
        "--json".as_ref(),
    ])
    .expect_ok();
    let result: serde_json::Value = serde_json::from_str(outcome.stdout.lines().last().expect("output")).unwrap();
    assert_eq!(result["errors"], 0, "{result:#}");
    let capacity = result["journal_capacity_elements"].as_u64().unwrap();
    assert!(capacity < 1024, "a journal of {capacity} elements for 4096 blocks");
    assert!(result["ios"].as_u64().unwrap() > 4 * capacity, "the bench outran the journal: {result:#}");
    assert_eq!(result["journal_full_mode"], "bitmap-only", "{result:#}");
    assert!(result["bitmap_writes"].as_u64().unwrap() > 0 && result["bitmap_commits"].as_u64().unwrap() > 0);
    let tracked = result["bitmap_tracked_blocks"].as_u64().unwrap();
    // The tracked blocks survive the close: inspect reads them back from the journal.
    let described = inspect_json(&dir);
    assert_eq!(described["open_generation"]["bitmap_tracked_blocks"].as_u64(), Some(tracked), "{described:#}");
    let text = chronicle(&["inspect".as_ref(), dir.as_os_str()]).expect_ok().stdout;
    assert!(text.contains(&format!("is bitmap-only ({tracked} blocks tracked by the bitmap only)")), "{text}");
    chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_ok();

    // Markers every 50 ms with a journal this small: some wait for the sort, some are refused
    // (the generation is larger than the journal); writes never fail and nothing is lost. (A
    // volume of its own: `check` reads `load`'s payloads.)
    let dir = root.path().join("loaded");
    format(&dir, &["--journal-full", "bitmap-only", "--journal-size", "2M", "--history-size", "64M"]);
    let log = root.path().join("acknowledged.log");
    let mut child = Command::new(BIN)
        .arg("load")
        .arg(&dir)
        .args(["--seconds", "30", "--queue-depth", "16", "--marker-every-ms", "50", "--seed", "3", "--ack-log"])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load starts");
    std::thread::sleep(Duration::from_millis(1200));
    assert!(child.try_wait().expect("wait").is_none(), "load ended before the kill");
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let outcome = chronicle(&["check".as_ref(), dir.as_os_str(), "--ack-log".as_ref(), log.as_os_str()]);
    assert!(outcome.ok(), "check after SIGKILL in bitmap-only mode:\n{}", outcome.describe());
    chronicle(&["verify".as_ref(), dir.as_os_str()]).expect_ok();
    println!("{}", outcome.stdout.lines().next().unwrap_or(""));
}

#[test]
fn compress_and_decompress_a_generation_keep_its_image_and_show_the_space() {
    let root = test_dir();
    let (dir, ack_log) = loaded_volume(root.path(), "600");
    let restore = |generation: &str, name: &str| {
        let output = root.path().join(name);
        chronicle(&[
            OsStr::new("restore"),
            dir.as_os_str(),
            OsStr::new("--generation"),
            OsStr::new(generation),
            OsStr::new("--output"),
            output.as_os_str(),
        ])
        .expect_ok();
        std::fs::read(output).unwrap()
    };
    let generation = |command: &str| {
        chronicle(&[OsStr::new(command), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("0")]).expect_ok()
    };
    // H(0) holds the blocks the load overwrote as format left them (zeros): it compresses.
    let before = restore("0", "before.img");
    let compressed = generation("compress");
    assert!(compressed.stdout.contains("compressed generation 0:"), "{}", compressed.describe());
    let list = generations_json(&dir);
    let record = &list.as_array().unwrap()[0];
    assert_eq!(record["compressed"], true, "{record}");
    assert!(record["stored_bytes"].as_u64().unwrap() < record["original_bytes"].as_u64().unwrap(), "{record}");
    let table = chronicle(&[OsStr::new("generations"), dir.as_os_str()]).expect_ok();
    assert!(table.stdout.contains("stored") && table.stdout.contains('%'), "{}", table.describe());
    let inspect = chronicle(&[OsStr::new("inspect"), dir.as_os_str()]).expect_ok();
    assert!(inspect.stdout.contains("[compressed:"), "{}", inspect.describe());
    let verified = chronicle(&[OsStr::new("verify"), dir.as_os_str()]).expect_ok();
    assert!(verified.stdout.contains("1 compressed records"), "{}", verified.describe());
    assert!(restore("0", "compressed.img") == before, "the compressed record restores the same image");
    chronicle(&[OsStr::new("check"), dir.as_os_str(), OsStr::new("--ack-log"), ack_log.as_os_str()]).expect_ok();

    // Twice is refused with nothing changed; then back.
    let again = chronicle(&[OsStr::new("compress"), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("0")]);
    assert!(!again.ok() && !again.panicked() && again.stderr.contains("compressed already"), "{}", again.describe());
    let missing = chronicle(&[OsStr::new("compress"), dir.as_os_str(), OsStr::new("--generation"), OsStr::new("999")]);
    assert!(!missing.ok() && missing.stderr.contains("no history record"), "{}", missing.describe());
    let decompressed = generation("decompress");
    assert!(decompressed.stdout.contains("decompressed generation 0"), "{}", decompressed.describe());
    assert!(restore("0", "after.img") == before);
    chronicle(&[OsStr::new("verify"), dir.as_os_str()]).expect_ok();
}
