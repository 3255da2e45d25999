//! Running SPDK applications in tests: finding SPDK, building and preloading the module,
//! starting `spdk_tgt` / `bdevperf` / fio with unique shared-memory ids and RPC sockets, and
//! talking JSON-RPC to them with serde_json (no Python needed).
//!
//! Every SPDK test starts with [`require_spdk`]: without an installed SPDK (`SPDK_DIR`,
//! default `/opt/spdk`) it prints why the test is skipped (to stderr, which libtest does not
//! capture) and the test returns. `CHRONICLE_SPDK_TESTS=skip` skips them where SPDK exists.
#![allow(dead_code)] // each test binary uses a part of this module

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Memory for an SPDK application (`-s`, MiB, no hugepages). 512 MiB is too little for the
/// bdev layer's pools.
pub const APP_MEMORY_MB: u32 = 2048;
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes straight to the process's stderr: libtest does not capture this, so a skip is always
/// visible, also when the test passes.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

pub fn spdk_dir() -> PathBuf {
    std::env::var_os("SPDK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/spdk"))
}

/// The installed SPDK, or `None` after printing why the test is skipped.
pub fn require_spdk(test: &str) -> Option<PathBuf> {
    if std::env::var("CHRONICLE_SPDK_TESTS").is_ok_and(|value| value == "skip") {
        say(&format!("{test}: skipped: CHRONICLE_SPDK_TESTS=skip"));
        return None;
    }
    let spdk_dir = spdk_dir();
    if !spdk_dir.join("bin/spdk_tgt").is_file() || !spdk_dir.join("lib/pkgconfig/spdk_bdev.pc").is_file() {
        say(&format!(
            "{test}: skipped: SPDK not found at {} (needs bin/spdk_tgt and lib/pkgconfig/spdk_bdev.pc; set SPDK_DIR)",
            spdk_dir.display()
        ));
        return None;
    }
    Some(spdk_dir)
}

/// SPDK applications busy-poll a core each: tests of one binary take turns.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The module to preload (`libchronicle.so` with `--features spdk`), built once per test binary:
/// - `CHRONICLE_SPDK_MODULE=/path/libchronicle.so` uses that file;
/// - under `cargo test --features spdk`, the one built beside the test (`target/<profile>/deps`);
/// - under a plain `cargo test`, `cargo build --release --lib --features spdk` into
///   `target/tmp/spdk-module` (a few minutes the first time, then seconds). Release, because
///   the tests drive real I/O through it.
pub fn module_library() -> PathBuf {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    MODULE
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CHRONICLE_SPDK_MODULE") {
                let path = PathBuf::from(path);
                assert!(path.is_file(), "CHRONICLE_SPDK_MODULE={} does not exist", path.display());
                return path;
            }
            if cfg!(feature = "spdk") {
                let exe = std::env::current_exe().expect("test executable path");
                let path = exe.parent().expect("deps directory").join("libchronicle.so");
                assert!(path.is_file(), "{} was not built with this test", path.display());
                return path;
            }
            let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("spdk-module");
            say(&format!("building libchronicle.so with --features spdk into {}", target_dir.display()));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--release", "--lib", "--features", "spdk", "--manifest-path"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target_dir)
                .status()
                .expect("run cargo");
            assert!(status.success(), "cargo build --features spdk failed: {status}");
            target_dir.join("release/libchronicle.so")
        })
        .clone()
}

/// A fresh shared-memory id for an SPDK application of this test process.
pub fn unique_shm_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    20_000 + (std::process::id() % 1_000) * 10 + NEXT.fetch_add(1, Ordering::Relaxed) % 10
}

/// Scratch directory of a test (under `target/tmp`), empty.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A running SPDK application with an RPC socket; killed (and its runtime files removed) if
/// the test ends early. Its output goes to a log file, quoted when something fails.
pub struct App {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub shm_id: u32,
    pub name: String,
}

/// How to start an [`App`].
pub struct AppOptions {
    /// Binary under `$SPDK_DIR/bin` (`spdk_tgt`, `bdevperf`).
    pub binary: &'static str,
    /// Arguments after the common ones (`--no-pci --no-huge -s … -i … -r …`).
    pub args: Vec<String>,
    /// Wait until `framework_wait_init` answers (not for `bdevperf` without `-z`).
    pub wait_for_rpc: bool,
    /// Core mask (`-m`).
    pub core_mask: &'static str,
}

impl AppOptions {
    pub fn spdk_tgt() -> Self {
        AppOptions { binary: "spdk_tgt", args: Vec::new(), wait_for_rpc: true, core_mask: "0x1" }
    }
}

impl App {
    pub fn start(spdk_dir: &Path, module: &Path, options: AppOptions) -> App {
        let shm_id = unique_shm_id();
        // Unix socket paths are limited to 108 bytes: keep it in /tmp.
        let socket = std::env::temp_dir().join(format!("chronicle-{}-{shm_id}.sock", options.binary));
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{shm_id}.log", options.binary));
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(spdk_dir.join("bin").join(options.binary))
            .args(["--no-pci", "--no-huge", "-s", &APP_MEMORY_MB.to_string(), "-i", &shm_id.to_string()])
            // Other SPDK applications (another test binary, a developer's) may poll the same
            // core: do not take SPDK's per-core lock files.
            .args(["-m", options.core_mask, "--disable-cpumask-locks", "-r"])
            .arg(&socket)
            .args(&options.args)
            .env("LD_PRELOAD", module)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", options.binary));
        let mut app = App { child: Some(child), socket, log, shm_id, name: options.binary.to_string() };
        if options.wait_for_rpc {
            app.wait_ready();
        }
        app
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the RPC server answers and the subsystems are up (`framework_wait_init`).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!("{} exited during startup ({status}):\n{}", self.name, self.log_text());
            }
            if self.socket.exists() {
                if let Ok(answer) = self.try_call("framework_wait_init", None) {
                    if answer.get("result").is_some() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after {STARTUP_TIMEOUT:?}:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// One JSON-RPC call over the application's Unix socket; the whole answer object.
    pub fn try_call(&self, method: &str, params: Option<Value>) -> std::io::Result<Value> {
        rpc(&self.socket, method, params, RPC_TIMEOUT)
    }

    pub fn call(&self, method: &str, params: Option<Value>) -> Value {
        self.try_call(method, params).unwrap_or_else(|error| panic!("{method}: {error}\n{}", self.log_text()))
    }

    /// The `result` of a call that must succeed.
    pub fn result(&self, method: &str, params: Option<Value>) -> Value {
        let answer = self.call(method, params);
        match answer.get("result") {
            Some(result) => result.clone(),
            None => panic!("{method} failed: {answer}\n{}", self.log_text()),
        }
    }

    /// The `error` of a call that must fail: `(code, message)`.
    pub fn error(&self, method: &str, params: Option<Value>) -> (i64, String) {
        let answer = self.call(method, params);
        match answer.get("error") {
            Some(error) => {
                (error["code"].as_i64().unwrap_or_default(), error["message"].as_str().unwrap_or_default().to_string())
            }
            None => panic!("{method} should have failed: {answer}"),
        }
    }

    /// Waits for the application to exit by itself (bdevperf at the end of its run).
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("running application");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, self.log_text());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {timeout:?}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the application to stop (`spdk_kill_instance SIGTERM`), waits for its exit, and
    /// returns how it exited with its whole log.
    pub fn stop(self) -> (ExitStatus, String) {
        let _ = self.try_call("spdk_kill_instance", Some(json!({"sig_name": "SIGTERM"})));
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// `kill -9`: nothing of the application runs after this (a crash, for recovery tests).
    pub fn kill(mut self) -> String {
        let mut child = self.child.take().expect("running application");
        let _ = child.kill();
        let _ = child.wait();
        self.log_text()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
        // Keep the application's log when the test fails (the panic message quotes it too).
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
        // DPDK's runtime directory for this instance (`--file-prefix spdk<shm id>`).
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/spdk{}", self.shm_id));
    }
}

/// One JSON-RPC call over an SPDK application's Unix socket; the whole answer object.
pub fn rpc(socket: &Path, method: &str, params: Option<Value>, timeout: Duration) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut request = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if let Some(params) = params {
        request["params"] = params;
    }
    stream.write_all(request.to_string().as_bytes())?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 65536];
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

// ---- Chronicle volumes over malloc bdevs, JSON configs, bdevperf and fio (spdk_volume.rs,
// ---- spdk_io.rs).

/// A chronicle volume over four fresh malloc bdevs named `<name>Base`, `<name>Journal`,
/// `<name>Backup`, `<name>History`: the backup the size of the base; the journal and the
/// history 1.25 × the base, room for metadata plus one generation that writes every block
/// (the open one in the journal, its record in the history once the next one is sorted).
/// Volumes that sort several such generations need a larger history
/// ([`with_history_blocks`](Self::with_history_blocks)): history is never reclaimed yet.
#[derive(Debug, Clone)]
pub struct MallocVolume {
    pub name: String,
    pub block_size: u32,
    pub base_blocks: u64,
    pub history_blocks: u64,
}

impl MallocVolume {
    pub fn new(name: &str, base_blocks: u64, block_size: u32) -> Self {
        MallocVolume { name: name.to_string(), block_size, base_blocks, history_blocks: base_blocks * 5 / 4 }
    }

    pub fn with_history_blocks(mut self, history_blocks: u64) -> Self {
        self.history_blocks = history_blocks;
        self
    }

    /// Base, journal, backup, history.
    pub fn bdevs(&self) -> [String; 4] {
        ["Base", "Journal", "Backup", "History"].map(|role| format!("{}{role}", self.name))
    }

    pub fn base(&self) -> String {
        self.bdevs()[0].clone()
    }
    pub fn journal(&self) -> String {
        self.bdevs()[1].clone()
    }
    pub fn backup(&self) -> String {
        self.bdevs()[2].clone()
    }
    pub fn history(&self) -> String {
        self.bdevs()[3].clone()
    }

    /// The `bdev_malloc_create` calls (`{"method", "params"}`) of the four bdevs.
    pub fn malloc_methods(&self) -> Vec<Value> {
        let blocks = [self.base_blocks, self.base_blocks * 5 / 4, self.base_blocks, self.history_blocks];
        self.bdevs()
            .iter()
            .zip(blocks)
            .map(|(name, num_blocks)| {
                json!({"method": "bdev_malloc_create",
                       "params": {"name": name, "num_blocks": num_blocks, "block_size": self.block_size}})
            })
            .collect()
    }

    /// `bdev_chronicle_create` parameters: the four bdevs, no copy of the (zeroed) base to
    /// the backup, and every field of `extra` added or replaced.
    pub fn create_params(&self, extra: Value) -> Value {
        let [base, journal, backup, history] = self.bdevs();
        let mut params = json!({
            "name": self.name, "base_bdev": base, "journal_bdev": journal, "backup_bdev": backup,
            "history_bdev": history, "copy_base_to_backup": false,
        });
        if let Value::Object(extra) = extra {
            for (key, value) in extra {
                params[key] = value;
            }
        }
        params
    }

    /// The four malloc bdevs and the chronicle bdev, as one JSON config's bdev calls.
    pub fn config_methods(&self, extra: Value) -> Vec<Value> {
        let mut methods = self.malloc_methods();
        methods.push(json!({"method": "bdev_chronicle_create", "params": self.create_params(extra)}));
        methods
    }

    /// Creates the four malloc bdevs in a running application.
    pub fn create_bdevs(&self, app: &App) {
        for method in self.malloc_methods() {
            let name = method["params"]["name"].clone();
            assert_eq!(app.result("bdev_malloc_create", Some(method["params"].clone())), name);
        }
    }

    /// Creates the bdevs and the volume; returns the RPC's result (the bdev's name).
    pub fn create(&self, app: &App, extra: Value) -> Value {
        self.create_bdevs(app);
        app.result("bdev_chronicle_create", Some(self.create_params(extra)))
    }
}

/// An SPDK JSON config (`--json`, fio's `spdk_json_conf`) whose bdev subsystem makes these
/// calls, written to `path`.
pub fn write_bdev_config(path: &Path, methods: Vec<Value>) {
    let config = json!({"subsystems": [{"subsystem": "bdev", "config": methods}]});
    std::fs::write(path, serde_json::to_string_pretty(&config).expect("json")).expect("write JSON config");
}

impl AppOptions {
    /// `bdevperf` running its workload at once (no `-z`) and exiting at the end.
    pub fn bdevperf(args: &[&str], core_mask: &'static str) -> Self {
        AppOptions {
            binary: "bdevperf",
            args: args.iter().map(|arg| arg.to_string()).collect(),
            wait_for_rpc: false,
            core_mask,
        }
    }
}

/// bdevperf's "Total" line: `Total : IOPS MiB/s Fail/s TO/s Average min max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BdevperfTotal {
    pub iops: f64,
    pub mib_per_second: f64,
    pub fails_per_second: f64,
    pub timeouts_per_second: f64,
}

/// The last "Total" line of a bdevperf log, if it has one.
pub fn bdevperf_total(log: &str) -> Option<BdevperfTotal> {
    let line = log.lines().rev().find(|line| line.trim_start().starts_with("Total"))?;
    let numbers: Vec<f64> =
        line.split_once(':')?.1.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
    match numbers[..] {
        [iops, mib_per_second, fails_per_second, timeouts_per_second, ..] => {
            Some(BdevperfTotal { iops, mib_per_second, fails_per_second, timeouts_per_second })
        }
        _ => None,
    }
}

/// Lines of an application's log that are errors logged by or about chronicle.
pub fn chronicle_errors(log: &str) -> Vec<&str> {
    log.lines().filter(|line| line.contains("*ERROR*") && line.contains("chronicle")).collect()
}

/// The fio binary: `/usr/local/bin/fio` (built against the plugin's fio sources), else `fio`
/// on `PATH`.
pub fn fio_binary() -> Option<PathBuf> {
    let local = PathBuf::from("/usr/local/bin/fio");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join("fio")).find(|path| path.is_file())
}
