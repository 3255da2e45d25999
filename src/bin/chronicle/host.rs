//! The standalone host: a volume's four devices as files in one directory, driven through
//! io_uring by a small polling loop. Not a second SPDK: just enough for the demo, tests,
//! benchmarks and offline tools.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use chronicle::device::uring::{UringContext, UringContextOptions, UringDevice, UringOptions};
use chronicle::device::{Channel, Device};
use chronicle::engine::{HostCompletion, HostError, Volume};

/// Files of a volume directory, in role order (base, journal, backup, history).
pub const FILES: [&str; 4] = ["base.img", "journal.img", "backup.img", "history.img"];

pub fn paths(dir: &Path) -> [PathBuf; 4] {
    FILES.map(|name| dir.join(name))
}

/// Opens the four files of `dir` as channels of one io_uring context. `create` gives the
/// sizes of files to create (format); `block_size` the device block size.
pub fn open_channels(
    dir: &Path,
    create: Option<[u64; 4]>,
    read_only: bool,
    block_size: Option<u32>,
) -> Result<Vec<Box<dyn Channel>>> {
    let ctx = UringContext::new(&UringContextOptions::default())
        .context("cannot set up io_uring (is it disabled on this system? see /proc/sys/kernel/io_uring_disabled)")?;
    open_channels_in(&ctx, dir, create, read_only, block_size)
}

pub fn open_channels_in(
    ctx: &Rc<UringContext>,
    dir: &Path,
    create: Option<[u64; 4]>,
    read_only: bool,
    block_size: Option<u32>,
) -> Result<Vec<Box<dyn Channel>>> {
    if create.is_none() {
        for path in paths(dir) {
            if !path.exists() {
                bail!(
                    "{} does not exist: {} is not a chronicle volume directory (create one with `chronicle format`)",
                    path.display(),
                    dir.display()
                );
            }
        }
    }
    let mut channels = Vec::with_capacity(4);
    for (index, path) in paths(dir).iter().enumerate() {
        let options = UringOptions {
            block_size,
            direct: true,
            allow_buffered: true,
            create_size: create.map(|sizes| sizes[index]),
            read_only,
            queue_depth: 256,
        };
        let device = UringDevice::open(path, &options, ctx.clone())
            .with_context(|| format!("cannot open {}", path.display()))?;
        channels.push(device.open_channel().with_context(|| format!("cannot open a channel to {}", path.display()))?);
    }
    Ok(channels)
}

/// Polls the volume until `done` says so; host completions go to `on_completion`.
pub fn drive(
    volume: &mut Volume,
    mut on_completion: impl FnMut(&mut Volume, HostCompletion),
    mut done: impl FnMut(&Volume) -> bool,
) {
    let mut completions = Vec::with_capacity(256);
    while !done(volume) {
        let progressed = volume.poll(&mut completions);
        let had = !completions.is_empty();
        for completion in completions.drain(..) {
            on_completion(volume, completion);
        }
        if progressed == 0 && !had {
            std::hint::spin_loop();
        }
    }
}

/// Parses sizes like `64M`, `1G`, `512K`, `4096` (bytes; binary multiples).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let (number, multiplier) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (text, 1u64),
        Some((at, _)) => {
            let multiplier = match text[at..].to_ascii_lowercase().as_str() {
                "b" => 1,
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                "t" | "tb" | "tib" => 1 << 40,
                other => return Err(format!("unknown size unit {other:?} (use K, M, G or T)")),
            };
            (&text[..at], multiplier)
        }
    };
    let value: u64 = number.trim().parse().map_err(|_| format!("{text:?} is not a size (try 64M or 1G)"))?;
    value.checked_mul(multiplier).ok_or_else(|| format!("{text} is too large"))
}

/// A short name for the kind of a failed host operation, for counting failures by kind.
pub fn error_kind(error: &HostError) -> &'static str {
    match error {
        HostError::Io(_) => "io",
        HostError::OutOfRange { .. } => "out_of_range",
        HostError::InvalidBuffers { .. } => "invalid_buffers",
        HostError::NotWholeUnits { .. } => "not_whole_units",
        HostError::NoSpace { .. } => "journal_full",
        HostError::Failed(_) => "volume_failed",
        HostError::NoRestoreVolume(_) => "no_restore_volume",
        HostError::RestoreSpace { .. } => "restore_space",
        HostError::Busy(_) => "busy",
        HostError::Damaged(_) => "damaged",
    }
}

/// Failures counted by kind, with the first message of each kind (to print once).
#[derive(Default)]
pub struct ErrorTally {
    counts: std::collections::BTreeMap<&'static str, (u64, String)>,
}

impl ErrorTally {
    /// Counts `error`; returns true the first time its kind is seen.
    pub fn add(&mut self, error: &HostError) -> bool {
        let entry = self.counts.entry(error_kind(error)).or_insert_with(|| (0, error.to_string()));
        entry.0 += 1;
        entry.0 == 1
    }

    pub fn total(&self) -> u64 {
        self.counts.values().map(|(count, _)| count).sum()
    }

    /// `{"journal_full": 12, ...}`
    pub fn to_json(&self) -> serde_json::Value {
        self.counts.iter().map(|(kind, (count, _))| ((*kind).to_owned(), serde_json::json!(count))).collect()
    }

    /// One line per kind: count and first message.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.counts.iter().map(|(kind, (count, first))| format!("{count} × {kind}, first: {first}"))
    }
}
