//! A crash-consistency load inside the SPDK application — the SPDK counterpart of
//! `chronicle load` / `chronicle check`, for proving on a user's own stack that no
//! acknowledged write is lost:
//!
//! - [`run_load`] (`bdev_chronicle_load`) writes self-identifying payloads
//!   ([`core::payload`](crate::core::payload)) through a chronicle bdev at a queue depth, cuts
//!   a generation every `marker_every_ms`, and appends every acknowledged write to an ack log
//!   (`block sequence` per line, handed to the kernel as it is acknowledged, so a `kill -9` of
//!   the application loses no line of it);
//! - [`run_verify`] (`bdev_chronicle_verify_load`) reads every block named in an ack log back
//!   through a chronicle bdev (after a restart, examine and recovery) and checks that each holds
//!   its newest acknowledged write or a newer one.
//!
//! `chronicle check DIR --ack-log FILE` checks the same log offline, generation by generation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::bdev::{BdevDesc, BlockRequest, IoChannel, IoDone};
use super::bdev_chronicle_volume as volume;
use super::dma::DmaBuf;
use super::poller::{PollStatus, Poller};
use super::Errno;
use crate::core::payload::{self, Content};

/// Writes in flight at most (the bdev layer's default pool is far larger).
pub const QUEUE_DEPTH_MAX: usize = 256;
/// Reads in flight while verifying.
const VERIFY_IN_FLIGHT: usize = 32;

fn default_seed() -> u64 {
    1
}

fn default_queue_depth() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    /// The chronicle bdev to write to.
    pub name: String,
    pub seconds: f64,
    /// Stop after this many writes, if sooner than `seconds`: a test's volume then needs room
    /// for this much, however fast the stack runs.
    #[serde(default)]
    pub writes: Option<u64>,
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Cut a generation this often (none if absent).
    #[serde(default)]
    pub marker_every_ms: Option<u64>,
    /// Cut a generation after every so many writes submitted, exactly: the same generations
    /// however fast the stack is.
    #[serde(default)]
    pub marker_every_writes: Option<u64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// File to append acknowledged writes to (`block sequence` lines).
    #[serde(default)]
    pub ack_log: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub writes_acknowledged: u64,
    pub writes_failed: u64,
    pub markers: u64,
    pub markers_failed: u64,
    pub seconds: f64,
    pub iops: f64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot open bdev {name}: {errno}")]
    Open { name: String, errno: Errno },
    #[error("{0}")]
    File(String),
    #[error("{0}")]
    Io(String),
}

impl LoadError {
    pub fn errno(&self) -> Errno {
        match self {
            LoadError::Invalid(_) | LoadError::File(_) => Errno::EINVAL,
            LoadError::Open { errno, .. } => *errno,
            LoadError::Io(_) => Errno(libc::EIO),
        }
    }
}

/// Where a load's or a verify's result goes.
type Answer<T> = Box<dyn FnOnce(Result<T, LoadError>)>;

/// Shape of the chronicle bdev, in host-write-size units.
struct Target {
    // Field order is drop order: the channel is put back before the descriptor closes.
    channel: IoChannel,
    desc: BdevDesc,
    unit_bytes: usize,
    blocks_per_unit: u64,
    units: u64,
}

fn open_target(name: &str) -> Result<Target, LoadError> {
    if !volume::exists(name) {
        return Err(LoadError::Invalid(format!("{name} is not a chronicle bdev")));
    }
    let desc =
        BdevDesc::open(name, true, |_, _| {}).map_err(|errno| LoadError::Open { name: name.to_string(), errno })?;
    let channel = desc.io_channel().map_err(|errno| LoadError::Open { name: name.to_string(), errno })?;
    let bdev = desc.bdev();
    let blocks_per_unit = u64::from(bdev.write_unit_size().max(1));
    let unit_bytes = (blocks_per_unit * u64::from(bdev.block_size())) as usize;
    let units = bdev.num_blocks() / blocks_per_unit;
    Ok(Target { channel, desc, unit_bytes, blocks_per_unit, units })
}

struct Load {
    target: Target,
    name: String,
    params: LoadParams,
    rng: ChaCha8Rng,
    ack_log: Option<File>,
    /// Sequences grow across runs: a run starts above every earlier run's sequences.
    base_sequence: u64,
    next: u64,
    in_flight: usize,
    started: Instant,
    deadline: Instant,
    next_marker: Option<Instant>,
    /// The write before which the next counted marker is cut (submission waits there for it).
    marker_write: u64,
    markers_in_flight: usize,
    report: LoadReport,
    log_error: Option<String>,
    poller: Option<Poller>,
    done: Option<Answer<LoadReport>>,
}

/// One payload write in flight.
struct PayloadWrite {
    load: Rc<RefCell<Load>>,
    block: u64,
    sequence: u64,
    _buffer: DmaBuf,
    _iovec: Box<libc::iovec>,
}

impl IoDone for PayloadWrite {
    fn done(self: Box<Self>, success: bool) {
        let mut load = self.load.borrow_mut();
        load.in_flight -= 1;
        if !success {
            load.report.writes_failed += 1;
            return;
        }
        load.report.writes_acknowledged += 1;
        let line = format!("{} {}\n", self.block, self.sequence);
        // One write(2) per acknowledgement: in the kernel before anything else happens.
        if let Some(Err(error)) = load.ack_log.as_mut().map(|file| file.write_all(line.as_bytes())) {
            load.log_error.get_or_insert_with(|| format!("cannot append to the ack log: {error}"));
        }
    }
}

/// Runs a load on chronicle bdev `params.name`; `done` gets the report when it ends.
pub fn run_load(params: LoadParams, done: impl FnOnce(Result<LoadReport, LoadError>) + 'static) {
    if !(params.seconds > 0.0 && params.seconds <= 86_400.0) {
        return done(Err(LoadError::Invalid(format!("seconds {} must be in (0, 86400]", params.seconds))));
    }
    if params.writes == Some(0) {
        return done(Err(LoadError::Invalid("writes 0 must be at least 1 (or absent)".into())));
    }
    if params.marker_every_writes == Some(0) {
        return done(Err(LoadError::Invalid("marker_every_writes 0 must be at least 1 (or absent)".into())));
    }
    if params.queue_depth == 0 || params.queue_depth > QUEUE_DEPTH_MAX {
        return done(Err(LoadError::Invalid(format!(
            "queue_depth {} must be 1 to {QUEUE_DEPTH_MAX}",
            params.queue_depth
        ))));
    }
    let target = match open_target(&params.name) {
        Ok(target) => target,
        Err(error) => return done(Err(error)),
    };
    let ack_log = match &params.ack_log {
        None => None,
        Some(path) => match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => Some(file),
            Err(error) => return done(Err(LoadError::File(format!("cannot open the ack log {path}: {error}")))),
        },
    };
    let now = Instant::now();
    let load = Rc::new(RefCell::new(Load {
        target,
        name: params.name.clone(),
        rng: ChaCha8Rng::seed_from_u64(params.seed),
        ack_log,
        base_sequence: crate::engine::now_ns(),
        next: 0,
        in_flight: 0,
        started: now,
        deadline: now + Duration::from_secs_f64(params.seconds),
        next_marker: params.marker_every_ms.map(|ms| now + Duration::from_millis(ms)),
        marker_write: params.marker_every_writes.unwrap_or(u64::MAX),
        markers_in_flight: 0,
        report: LoadReport::default(),
        log_error: None,
        poller: None,
        done: Some(Box::new(done)),
        params,
    }));
    let polled = load.clone();
    match Poller::register("chronicle_load", Duration::ZERO, move || poll_load(&polled)) {
        Ok(poller) => load.borrow_mut().poller = Some(poller),
        Err(errno) => {
            let done = load.borrow_mut().done.take().expect("not finished");
            done(Err(LoadError::Io(format!("cannot register the load's poller: {errno}"))));
        }
    }
}

fn poll_load(load: &Rc<RefCell<Load>>) -> PollStatus {
    let now = Instant::now();
    let mut state = load.borrow_mut();
    let below_writes = |state: &Load| state.params.writes.is_none_or(|writes| state.next < writes);
    let running = now < state.deadline && state.log_error.is_none() && below_writes(&state);
    let mut busy = false;
    while running
        && state.in_flight < state.params.queue_depth
        && below_writes(&state)
        && state.next < state.marker_write
    {
        let units = state.target.units;
        let block = state.rng.random_range(0..units);
        let sequence = state.base_sequence + state.next;
        let mut buffer = match DmaBuf::zeroed(state.target.unit_bytes, 4096) {
            Ok(buffer) => buffer,
            Err(_) => break, // No DMA memory now: try again next turn.
        };
        payload::fill(buffer.as_mut_slice(), block, sequence, state.params.seed);
        let mut iovec = Box::new(buffer.iovec());
        let request = BlockRequest::Write {
            iovs: &mut *iovec,
            iovcnt: 1,
            offset_blocks: block * state.target.blocks_per_unit,
            num_blocks: state.target.blocks_per_unit,
        };
        let write = Box::new(PayloadWrite { load: load.clone(), block, sequence, _buffer: buffer, _iovec: iovec });
        // SAFETY: the iovec and the buffer it describes are owned by `write`, which SPDK holds
        // until the completion runs.
        let submitted = unsafe { state.target.desc.submit(&state.target.channel, request, write) };
        match submitted {
            Ok(()) => {
                state.in_flight += 1;
                state.next += 1;
                busy = true;
            }
            // Out of bdev I/Os (ENOMEM) or anything else: try again next turn.
            Err((_, write)) => {
                drop(state);
                drop(write);
                return PollStatus::Busy;
            }
        }
    }
    // (Not after the last write: the load ends there.)
    let counted = state.next == state.marker_write && below_writes(&state);
    if running && (counted || state.next_marker.is_some_and(|at| now >= at)) {
        if counted {
            state.marker_write += state.params.marker_every_writes.expect("counted markers");
        } else {
            state.next_marker = state.params.marker_every_ms.map(|ms| now + Duration::from_millis(ms));
        }
        state.markers_in_flight += 1;
        let name = state.name.clone();
        let comment = format!("load marker {}", state.report.markers + state.report.markers_failed);
        drop(state);
        let counted = load.clone();
        volume::mark(
            &name,
            &comment,
            Box::new(move |result| {
                let mut state = counted.borrow_mut();
                state.markers_in_flight -= 1;
                match result {
                    Ok(_) => state.report.markers += 1,
                    Err(_) => state.report.markers_failed += 1,
                }
            }),
        );
        return PollStatus::Busy;
    }
    if running || state.in_flight > 0 || state.markers_in_flight > 0 {
        return if busy { PollStatus::Busy } else { PollStatus::Idle };
    }
    // Finished: stop polling, close the bdev, answer.
    let elapsed = state.started.elapsed().as_secs_f64();
    state.report.seconds = elapsed;
    state.report.iops = state.report.writes_acknowledged as f64 / elapsed.max(1e-9);
    let report = state.report.clone();
    let error = state.log_error.clone();
    let done = state.done.take();
    let poller = state.poller.take();
    drop(state);
    drop(poller);
    if let Some(done) = done {
        done(match error {
            Some(error) => Err(LoadError::File(error)),
            None => Ok(report),
        });
    }
    PollStatus::Busy
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyParams {
    /// The chronicle bdev to read from.
    pub name: String,
    /// Ack log written by `bdev_chronicle_load` (or `chronicle load`).
    pub ack_log: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Lines of the log (acknowledged writes).
    pub acknowledged: u64,
    /// Distinct blocks read back.
    pub blocks_checked: u64,
    /// Blocks holding an older write than the newest acknowledged one (lost writes).
    pub missing: u64,
    /// Blocks whose payload is damaged, torn or misplaced.
    pub invalid: u64,
    /// The first problems found, in words.
    pub problems: Vec<String>,
}

struct Verify {
    target: Target,
    expected: Vec<(u64, u64)>,
    next: usize,
    in_flight: usize,
    report: VerifyReport,
    poller: Option<Poller>,
    done: Option<Answer<VerifyReport>>,
}

/// Reads back every block of an ack log through chronicle bdev `params.name`.
pub fn run_verify(params: VerifyParams, done: impl FnOnce(Result<VerifyReport, LoadError>) + 'static) {
    let target = match open_target(&params.name) {
        Ok(target) => target,
        Err(error) => return done(Err(error)),
    };
    let file = match File::open(&params.ack_log) {
        Ok(file) => file,
        Err(error) => return done(Err(LoadError::File(format!("cannot open {}: {error}", params.ack_log)))),
    };
    let mut newest: HashMap<u64, u64> = HashMap::new();
    let mut acknowledged = 0;
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let mut fields = line.split_whitespace();
        // A torn last line (the writer was killed) is skipped.
        if let (Some(Ok(block)), Some(Ok(sequence)), None) =
            (fields.next().map(str::parse::<u64>), fields.next().map(str::parse::<u64>), fields.next())
        {
            let entry = newest.entry(block).or_default();
            *entry = (*entry).max(sequence);
            acknowledged += 1;
        }
    }
    let mut expected: Vec<(u64, u64)> = newest.into_iter().collect();
    expected.sort_unstable();
    if let Some((block, _)) = expected.iter().find(|(block, _)| *block >= target.units) {
        return done(Err(LoadError::Invalid(format!(
            "the ack log names block {block}, beyond the bdev's {} blocks: not this volume's log",
            target.units
        ))));
    }
    let verify = Rc::new(RefCell::new(Verify {
        target,
        expected,
        next: 0,
        in_flight: 0,
        report: VerifyReport { acknowledged, ..VerifyReport::default() },
        poller: None,
        done: Some(Box::new(done)),
    }));
    let polled = verify.clone();
    match Poller::register("chronicle_verify", Duration::ZERO, move || poll_verify(&polled)) {
        Ok(poller) => verify.borrow_mut().poller = Some(poller),
        Err(errno) => {
            let done = verify.borrow_mut().done.take().expect("not finished");
            done(Err(LoadError::Io(format!("cannot register the verify poller: {errno}"))));
        }
    }
}

/// One read-back in flight.
struct PayloadRead {
    verify: Rc<RefCell<Verify>>,
    block: u64,
    sequence: u64,
    buffer: DmaBuf,
    _iovec: Box<libc::iovec>,
}

impl IoDone for PayloadRead {
    fn done(self: Box<Self>, success: bool) {
        let mut verify = self.verify.borrow_mut();
        verify.in_flight -= 1;
        verify.report.blocks_checked += 1;
        let problem = if !success {
            verify.report.invalid += 1;
            Some(format!("block {}: the read failed", self.block))
        } else {
            match payload::parse(self.buffer.as_slice(), self.block) {
                Content::Write { sequence } if sequence >= self.sequence => None,
                Content::Write { sequence } => {
                    verify.report.missing += 1;
                    Some(format!(
                        "block {}: acknowledged write {} is missing (holds {sequence})",
                        self.block, self.sequence
                    ))
                }
                Content::Zero => {
                    verify.report.missing += 1;
                    Some(format!(
                        "block {}: acknowledged write {} is missing (never written)",
                        self.block, self.sequence
                    ))
                }
                Content::Invalid(why) => {
                    verify.report.invalid += 1;
                    Some(format!("block {}: {why}", self.block))
                }
            }
        };
        if let Some(problem) = problem {
            if verify.report.problems.len() < 20 {
                verify.report.problems.push(problem);
            }
        }
    }
}

fn poll_verify(verify: &Rc<RefCell<Verify>>) -> PollStatus {
    let mut state = verify.borrow_mut();
    let mut busy = false;
    while state.in_flight < VERIFY_IN_FLIGHT && state.next < state.expected.len() {
        let (block, sequence) = state.expected[state.next];
        let Ok(mut buffer) = DmaBuf::zeroed(state.target.unit_bytes, 4096) else { break };
        let mut iovec = Box::new(buffer.iovec());
        let request = BlockRequest::Read {
            iovs: &mut *iovec,
            iovcnt: 1,
            offset_blocks: block * state.target.blocks_per_unit,
            num_blocks: state.target.blocks_per_unit,
        };
        let read = Box::new(PayloadRead { verify: verify.clone(), block, sequence, buffer, _iovec: iovec });
        // SAFETY: the iovec and its buffer are owned by `read`, which SPDK holds until the
        // completion runs; nothing reads the buffer before then.
        match unsafe { state.target.desc.submit(&state.target.channel, request, read) } {
            Ok(()) => {
                state.in_flight += 1;
                state.next += 1;
                busy = true;
            }
            Err((_, read)) => {
                drop(state);
                drop(read);
                return PollStatus::Busy;
            }
        }
    }
    if state.in_flight > 0 || state.next < state.expected.len() {
        return if busy { PollStatus::Busy } else { PollStatus::Idle };
    }
    let report = state.report.clone();
    let done = state.done.take();
    let poller = state.poller.take();
    drop(state);
    drop(poller);
    if let Some(done) = done {
        done(Ok(report));
    }
    PollStatus::Busy
}
