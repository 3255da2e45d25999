//! `chronicle`: the standalone host — format a volume on files, run the demo, load and check it,
//! inspect and verify it offline, and benchmark it (host I/O, history and restore volumes).

mod bench;
mod bench_history;
mod demo;
mod history;
mod host;
mod load;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use chronicle::core::format::layout::{self, human, LayoutOptions, VolumeShape};
use chronicle::core::format::superblock::{Durability, JournalFullPolicy, JournalMode};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{self, FormatOptions};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "chronicle", version, about = "A block journal with generations, a sorted backup and history.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    /// Writes are acknowledged on completion and durable after the next flush (like a disk cache).
    Flush,
    /// Writes are acknowledged only once durable.
    WriteThrough,
}

#[derive(Clone, Copy, ValueEnum)]
enum JournalFullArg {
    /// Hold writes until the sort frees journal space (fail them if nothing can).
    Block,
    /// Fail writes with a no-space error.
    Fail,
    /// Like block, and when the history is full the oldest generations are given up so the
    /// sort keeps going.
    MergeOldest,
    /// Writes the journal has no room for go to the base only, tracked by a durable bitmap,
    /// and come into the journal as the sort frees space; a marker waits for them (FIG 36).
    BitmapOnly,
}

#[derive(Clone, Copy, ValueEnum)]
enum JournalModeArg {
    /// A rewrite of a block within a generation replaces its element: restore targets are
    /// generations.
    Latest,
    /// Every write appends an element with its sequence and time: restore can target any
    /// write (`restore --sequence`); the journal fills faster under overwrites.
    All,
}

#[derive(Subcommand)]
enum Command {
    /// Create a volume's four files in DIR and format them.
    Format {
        dir: PathBuf,
        /// Volume size, e.g. 64M, 1G.
        #[arg(long, value_parser = host::parse_size)]
        size: u64,
        /// Host write size in bytes: the journal's unit (power of two, 512 B to 1 MiB).
        #[arg(long, default_value_t = 4096)]
        host_write_size: u32,
        /// Journal file size (default: a quarter of the volume's blocks plus metadata).
        #[arg(long, value_parser = host::parse_size)]
        journal_size: Option<u64>,
        /// History file size (default: half the volume's blocks plus control blocks).
        #[arg(long, value_parser = host::parse_size)]
        history_size: Option<u64>,
        #[arg(long, value_enum, default_value_t = DurabilityArg::Flush)]
        durability: DurabilityArg,
        /// What happens when the journal (or, with merge-oldest, the history) is full.
        #[arg(long, value_enum, default_value_t = JournalFullArg::Block)]
        journal_full: JournalFullArg,
        /// Keep the latest element per block and generation, or every write (any-point restore).
        #[arg(long, value_enum, default_value_t = JournalModeArg::Latest)]
        journal_mode: JournalModeArg,
        /// Overwrite a volume that already exists in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Format a volume, write to it with markers, let the sorts run and verify every generation.
    Demo {
        /// Directory for the volume (default: a temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, value_parser = host::parse_size, default_value = "64M")]
        size: u64,
        #[arg(long, default_value_t = 6)]
        generations: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Random writes with self-identifying payloads, markers at intervals, and an optional
    /// log of acknowledged writes for `check`.
    Load {
        dir: PathBuf,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 32)]
        queue_depth: usize,
        #[arg(long)]
        marker_every_ms: Option<u64>,
        /// Cut a marker after every N writes submitted (the same generations on any machine).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        marker_every_writes: Option<u64>,
        /// Stop after N writes if that comes before --seconds (bounds what the history must
        /// hold, however fast the machine is).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        writes: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        ack_log: Option<PathBuf>,
    },
    /// Open (recover) the volume, let the sort catch up, and verify every generation against
    /// the payloads written by `load` (and the last one against the log of acknowledged writes).
    Check {
        dir: PathBuf,
        #[arg(long)]
        ack_log: Option<PathBuf>,
        /// Check only generations from this one on (older images were checked by an earlier
        /// `check`; history records added since are checked through the newer generations).
        #[arg(long, default_value_t = 0)]
        since_generation: u64,
        /// Readers working at once (reading an image from history is mostly waiting for I/O).
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Show a volume's superblocks, catalogs and generations (changes nothing).
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check every structure and checksum of a volume offline (changes nothing).
    Verify { dir: PathBuf },
    /// List the generations: state, time, comment, blocks, and whether each can be restored.
    Generations {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the image of a generation, or of any write's point in time (journal mode "all"),
    /// to a file or block device (changes nothing in DIR).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["generation", "sequence", "time"])))]
    Restore {
        dir: PathBuf,
        /// The generation whose image to write.
        #[arg(long)]
        generation: Option<u64>,
        /// The image after every host write with a sequence up to this one ("all" mode; see
        /// `generations` for the sequences each generation holds).
        #[arg(long)]
        sequence: Option<u64>,
        /// The image after every host write taken at or before this time ("all" mode): RFC 3339
        /// (2026-11-30T13:05:07.5Z) or Unix nanoseconds.
        #[arg(long, value_parser = parse_time)]
        time: Option<u64>,
        #[arg(long)]
        output: PathBuf,
    },
    /// Merge the history records of generations FROM..=THROUGH into one: image FROM stays
    /// restorable, the generations after it up to THROUGH are given up, space shared by
    /// their overlapping blocks comes back.
    Merge {
        dir: PathBuf,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        through: u64,
    },
    /// Give up the image of one history generation (the oldest is dropped, a younger one is
    /// merged into the one before it).
    DeleteGeneration {
        dir: PathBuf,
        #[arg(long)]
        generation: u64,
    },
    /// Compress the history record of GENERATION (lz4, in independent frames): it stays
    /// readable by restores, restore volumes, rollbacks and merges; a record that would not
    /// get smaller is left as it is.
    Compress {
        dir: PathBuf,
        #[arg(long)]
        generation: u64,
    },
    /// Decompress the history record of GENERATION back to its original size.
    Decompress {
        dir: PathBuf,
        #[arg(long)]
        generation: u64,
    },
    /// Roll the volume back to the image of GENERATION: the current state is sealed first (the
    /// undo point), the blocks changed since are rewritten through the journal, and the
    /// result is sealed as a new generation (undo by rolling back to the undo point).
    Rollback {
        dir: PathBuf,
        #[arg(long)]
        generation: u64,
        #[arg(long, default_value = "rollback")]
        comment: String,
    },
    /// Measure host I/O through the engine; the last line is JSON.
    Bench {
        dir: PathBuf,
        #[arg(long, value_enum)]
        workload: bench::Workload,
        #[arg(long, value_parser = host::parse_size, default_value = "4096")]
        block_size: u64,
        #[arg(long, default_value_t = 32)]
        queue_depth: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Mark a generation every this many milliseconds (the sort then frees journal space;
        /// "all" journal mode needs it under sustained writes).
        #[arg(long)]
        marker_every_ms: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Measure history maintenance and restore volumes on volumes of files: merge throughput,
    /// space a merge gives back by overlap, time to the first R-VOL read by volume size, R-VOL
    /// random reads, and host write latency while the sort and merges run.
    BenchHistory(bench_history::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("chronicle: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_time(text: &str) -> Result<u64, String> {
    chronicle::core::time::parse(text)
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Format {
            dir,
            size,
            host_write_size,
            journal_size,
            history_size,
            durability,
            journal_full,
            journal_mode,
            force,
        } => {
            let durability = match durability {
                DurabilityArg::Flush => Durability::Flush,
                DurabilityArg::WriteThrough => Durability::WriteThrough,
            };
            let journal_full = match journal_full {
                JournalFullArg::Block => JournalFullPolicy::Block,
                JournalFullArg::Fail => JournalFullPolicy::Fail,
                JournalFullArg::MergeOldest => JournalFullPolicy::MergeOldest,
                JournalFullArg::BitmapOnly => JournalFullPolicy::BitmapOnly,
            };
            let journal_mode = match journal_mode {
                JournalModeArg::Latest => JournalMode::Latest,
                JournalModeArg::All => JournalMode::All,
            };
            let sizes = (journal_size, history_size);
            format_dir(&dir, size, host_write_size, sizes, durability, (journal_full, journal_mode), force)?;
            println!("formatted {} ({} volume, {} B host write size)", dir.display(), human(size), host_write_size);
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, size, generations, seed } => demo::run(dir, size, generations, seed),
        Command::Load { dir, seconds, queue_depth, marker_every_ms, marker_every_writes, writes, seed, ack_log } => {
            let options =
                load::LoadOptions { seconds, queue_depth, marker_every_ms, marker_every_writes, writes, seed };
            load::load(&dir, &options, ack_log.as_deref())
        }
        Command::Check { dir, ack_log, since_generation, threads } => {
            load::check(&dir, ack_log.as_deref(), since_generation, threads)
        }
        Command::Inspect { dir, json } => inspect(&dir, json),
        Command::Verify { dir } => verify(&dir),
        Command::Generations { dir, json } => history::generations(&dir, json),
        Command::Restore { dir, generation, sequence, time, output } => {
            let target = match (generation, sequence, time) {
                (Some(generation), _, _) => history::Target::Generation(generation),
                (_, Some(sequence), _) => history::Target::Sequence(sequence),
                (_, _, Some(time_ns)) => history::Target::Time(time_ns),
                (None, None, None) => unreachable!("clap requires one target"),
            };
            history::restore(&dir, target, &output)
        }
        Command::Merge { dir, from, through } => history::merge(&dir, from, through),
        Command::DeleteGeneration { dir, generation } => history::delete_generation(&dir, generation),
        Command::Rollback { dir, generation, comment } => history::rollback(&dir, generation, &comment),
        Command::Compress { dir, generation } => history::compress(&dir, generation, true),
        Command::Decompress { dir, generation } => history::compress(&dir, generation, false),
        Command::Bench { dir, workload, block_size, queue_depth, seconds, marker_every_ms, json } => {
            bench::run(&dir, workload, block_size, queue_depth, seconds, marker_every_ms, json)
        }
        Command::BenchHistory(options) => bench_history::run(&options),
    }
}

/// Creates and formats the four files of a volume.
pub fn format_dir(
    dir: &Path,
    size: u64,
    host_write_size: u32,
    (journal_size, history_size): (Option<u64>, Option<u64>),
    durability: Durability,
    (journal_full_policy, journal_mode): (JournalFullPolicy, JournalMode),
    force: bool,
) -> Result<()> {
    if !host_write_size.is_power_of_two() || !(512..=1 << 20).contains(&host_write_size) {
        bail!("--host-write-size {host_write_size} must be a power of two from 512 to 1048576 bytes");
    }
    if size == 0 || size % u64::from(host_write_size) != 0 {
        bail!("--size {size} must be a positive multiple of the host write size ({host_write_size} bytes)");
    }
    let existing: Vec<_> = host::paths(dir).into_iter().filter(|p| p.exists()).collect();
    if !existing.is_empty() && !force {
        bail!(
            "{} already holds volume files ({}); pass --force to overwrite them",
            dir.display(),
            existing[0].display()
        );
    }
    let shape = VolumeShape { host_write_size, volume_blocks: size / u64::from(host_write_size) };
    let options = LayoutOptions { mode: journal_mode, ..LayoutOptions::default() };
    let round = |bytes: u64| bytes.div_ceil(4096) * 4096;
    let journal = round(journal_size.unwrap_or_else(|| layout::recommended_journal_bytes(&shape, &options)));
    let history = round(history_size.unwrap_or_else(|| layout::recommended_history_bytes(&shape, &options)));
    // Refuse devices that are too small before anything on disk changes (the engine would
    // refuse them too, but only after the files exist).
    layout::plan_journal(&shape, &options, journal).context("--journal-size is too small")?;
    layout::plan_history(&shape, &options, history).context("--history-size is too small")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for path in existing {
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let result = host::open_channels(dir, Some([size, journal, size, history]), false, None).and_then(|channels| {
        let names = host::FILES.map(String::from);
        let options = FormatOptions {
            host_write_size,
            durability,
            journal_full_policy,
            journal_mode,
            names,
            copy_base_to_backup: false,
            ..Default::default()
        };
        engine::format(channels, &options, &mut |_| {}).with_context(|| format!("cannot format {}", dir.display()))
    });
    if result.is_err() {
        // Half-formatted files are not a volume: leave no files that look like one.
        for path in host::paths(dir) {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

fn inspect(dir: &Path, json: bool) -> Result<ExitCode> {
    use std::fmt::Write as _;
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("{} cannot be opened", dir.display()))?;
    let description = reader.describe();
    if json {
        return print_out(&format!("{}\n", serde_json::to_string_pretty(&description)?));
    }
    let mut out = String::new();
    writeln!(out, "volume {}", description["volume_uuid"].as_str().unwrap_or("?"))?;
    writeln!(
        out,
        "  size {}, host write size {} B, journal mode {}, durability {}",
        human(reader.volume_bytes()),
        description["host_write_size"],
        description["journal_mode"].as_str().unwrap_or("?"),
        description["durability"].as_str().unwrap_or("?")
    )?;
    writeln!(
        out,
        "  journal: {} of {} elements used; history: {} of {} units used",
        description["journal"]["used_elements"],
        description["journal"]["capacity_elements"],
        description["history"]["used_units"],
        description["history"]["capacity_units"]
    )?;
    writeln!(
        out,
        "  journal-full policy {}; open generation {} is {} ({} blocks tracked by the bitmap only)",
        description["journal_full_policy"].as_str().unwrap_or("?"),
        description["open_generation"]["generation"],
        description["open_generation"]["journal_full_mode"].as_str().unwrap_or("?"),
        description["open_generation"]["bitmap_tracked_blocks"]
    )?;
    writeln!(out, "  generations:")?;
    for generation in reader.generations() {
        writeln!(
            out,
            "    {:>6}  {:<8} {:>8} blocks  {}  {}{}",
            generation.generation,
            generation.state,
            generation.blocks,
            format_time(generation.time_ns),
            generation.comment,
            if generation.compressed {
                format!("  [compressed: {} of {} bytes stored]", generation.stored_bytes, generation.original_bytes)
            } else {
                String::new()
            }
        )?;
    }
    print_out(&out)
}

/// Writes `text` to stdout; a closed pipe (`chronicle inspect DIR | head`) is not an error.
pub fn print_out(text: &str) -> Result<ExitCode> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error).context("cannot write to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn verify(dir: &Path) -> Result<ExitCode> {
    let channels = host::open_channels(dir, None, true, None)?;
    let reader = match VolumeReader::open(channels) {
        Ok(reader) => reader,
        Err(error) => {
            eprintln!("chronicle verify: {} is damaged: {error}", dir.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    match reader.verify() {
        Ok(report) => {
            println!(
                "{}: ok — {} history records ({} elements), {} sealed generations ({} elements), open generation {} elements",
                dir.display(),
                report.history_records,
                report.history_elements,
                report.sealed_generations,
                report.sealed_elements,
                report.open_elements
            );
            if report.shared_across_elements > 0 || report.retained_extents > 0 {
                println!(
                    "  dedup across records: {} elements point at other records' units, {} retained extents ({} units) kept for them; every pointer lands in owned units, every retained extent is pointed at",
                    report.shared_across_elements, report.retained_extents, report.retained_units
                );
            }
            if report.compressed_records > 0 {
                println!(
                    "  {} compressed records: {} frames read back, checksummed and decompressed",
                    report.compressed_records, report.compressed_frames
                );
            }
            if report.open_elements_differing > 0 {
                println!(
                    "  note: {} elements of the open generation differ from the base; opening the volume rebuilds them from the base (normal after a crash, damage after a clean shutdown)",
                    report.open_elements_differing
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("chronicle verify: {} is damaged: {error}", dir.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Unix nanoseconds as UTC `YYYY-MM-DD hh:mm:ss`.
pub fn format_time(ns: u64) -> String {
    chronicle::core::time::utc(ns)
}
