//! The `chronicle` SPDK module loaded into a stock `spdk_tgt` with `LD_PRELOAD`: the module
//! initialises, its RPC answers and refuses bad parameters, its log component exists, examine
//! of a new bdev finishes, and the application stops cleanly with it loaded.
//!
//! Needs an installed SPDK (`SPDK_DIR`, default `/opt/spdk`, with `bin/spdk_tgt` and shared
//! libraries). Without it the test prints "skipped: SPDK not found at …" and passes;
//! `CHRONICLE_SPDK_TESTS=skip` skips it (and says so) where SPDK exists.
//!
//! The module is `libchronicle.so` built with `--features spdk`:
//! - `CHRONICLE_SPDK_MODULE=/path/libchronicle.so` uses that file;
//! - under `cargo test --features spdk`, the `libchronicle.so` built beside this test (in
//!   `target/<profile>/deps`) is used;
//! - under a plain `cargo test`, the test builds it (`cargo build --lib --features spdk`) into
//!   its own target directory under `target/tmp` (a few minutes the first time, then seconds).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chronicle::core::format::layout::{self, LayoutOptions, VolumeShape};
use chronicle::device::memory::{MemoryDevice, MemoryOptions};
use chronicle::device::{Channel, Device};
use chronicle::engine::{format, FormatOptions};
use serde_json::{json, Value};

/// Memory for the target (`-s`, MiB, no hugepages). 512 MiB is too little for the bdev pools.
const TARGET_MEMORY_MB: u32 = 1024;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Writes straight to the process's stderr: libtest does not capture this, so a skip is always
/// visible, also when the test passes.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn spdk_dir() -> PathBuf {
    std::env::var_os("SPDK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/spdk"))
}

/// The module to preload, building it if needed.
fn module_library() -> PathBuf {
    if let Some(path) = std::env::var_os("CHRONICLE_SPDK_MODULE") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHRONICLE_SPDK_MODULE={} does not exist", path.display());
        return path;
    }
    if cfg!(feature = "spdk") {
        // target/<profile>/deps/spdk_module-<hash> → target/<profile>/deps/libchronicle.so, built
        // in the same cargo invocation as this test, with the same features. (The copy in
        // target/<profile>/ is only refreshed by `cargo build`, and may lack the feature.)
        let exe = std::env::current_exe().expect("test executable path");
        let path = exe.parent().expect("deps directory").join("libchronicle.so");
        assert!(path.is_file(), "{} was not built with this test", path.display());
        return path;
    }
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("spdk-module");
    say(&format!("building libchronicle.so with --features spdk into {}", target_dir.display()));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--lib", "--features", "spdk", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build --features spdk failed: {status}");
    target_dir.join("debug/libchronicle.so")
}

/// A running `spdk_tgt`; killed (and its runtime files removed) if the test ends early.
struct Target {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    shm_id: u32,
}

impl Target {
    fn start(spdk_dir: &Path, module: &Path) -> Target {
        let shm_id = 20_000 + std::process::id() % 10_000;
        let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Unix socket paths are limited to 108 bytes: keep it in /tmp.
        let socket = std::env::temp_dir().join(format!("chronicle-spdk-{}.sock", std::process::id()));
        let log = scratch.join(format!("spdk_tgt-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(spdk_dir.join("bin/spdk_tgt"))
            .args(["--no-pci", "--no-huge", "-s", &TARGET_MEMORY_MB.to_string(), "-i", &shm_id.to_string(), "-r"])
            .arg(&socket)
            .env("LD_PRELOAD", module)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start spdk_tgt");
        let mut target = Target { child: Some(child), socket, log, shm_id };
        target.wait_ready();
        target
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the RPC server answers and the subsystems are up (`framework_wait_init`).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!("spdk_tgt exited during startup ({status}):\n{}", self.log_text());
            }
            if self.socket.exists() {
                if let Ok(answer) = self.try_call("framework_wait_init", None) {
                    if answer.get("result").is_some() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "spdk_tgt not ready after {STARTUP_TIMEOUT:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One JSON-RPC call over the target's Unix socket; the whole answer object.
    fn try_call(&self, method: &str, params: Option<Value>) -> std::io::Result<Value> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(RPC_TIMEOUT))?;
        let mut request = json!({"jsonrpc": "2.0", "id": 1, "method": method});
        if let Some(params) = params {
            request["params"] = params;
        }
        stream.write_all(request.to_string().as_bytes())?;
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            received.extend_from_slice(&chunk[..n]);
            match serde_json::from_slice::<Value>(&received) {
                Ok(answer) => return Ok(answer),
                Err(error) if error.is_eof() => continue,
                Err(error) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, error)),
            }
        }
    }

    fn call(&self, method: &str, params: Option<Value>) -> Value {
        self.try_call(method, params).unwrap_or_else(|error| panic!("{method}: {error}\n{}", self.log_text()))
    }

    /// The `result` of a call that must succeed.
    fn result(&self, method: &str, params: Option<Value>) -> Value {
        let answer = self.call(method, params);
        match answer.get("result") {
            Some(result) => result.clone(),
            None => panic!("{method} failed: {answer}\n{}", self.log_text()),
        }
    }

    /// Asks the target to stop (`spdk_kill_instance SIGTERM`), waits for its exit, and returns
    /// how it exited with its whole log.
    fn stop(mut self) -> (ExitStatus, String) {
        let _ = self.try_call("spdk_kill_instance", Some(json!({"sig_name": "SIGTERM"})));
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let mut child = self.child.take().expect("running target");
        loop {
            if let Some(status) = child.try_wait().expect("wait spdk_tgt") {
                return (status, self.log_text());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spdk_tgt did not exit within {EXIT_TIMEOUT:?} of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        // Keep the target's log when the test fails (the panic message quotes it too).
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
        // DPDK's runtime directory for this instance (`--file-prefix spdk<shm id>`).
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/spdk{}", self.shm_id));
    }
}

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
    if std::env::var("CHRONICLE_SPDK_TESTS").is_ok_and(|value| value == "skip") {
        say("skipped: CHRONICLE_SPDK_TESTS=skip");
        return;
    }
    let spdk_dir = spdk_dir();
    if !spdk_dir.join("bin/spdk_tgt").is_file() || !spdk_dir.join("lib/pkgconfig/spdk_bdev.pc").is_file() {
        say(&format!(
            "skipped: SPDK not found at {} (needs bin/spdk_tgt and lib/pkgconfig/spdk_bdev.pc; set SPDK_DIR)",
            spdk_dir.display()
        ));
        return;
    }
    let module = module_library();
    say(&format!("spdk_module: LD_PRELOAD={} {}/bin/spdk_tgt", module.display(), spdk_dir.display()));
    let target = Target::start(&spdk_dir, &module);

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
