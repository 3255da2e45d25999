//! `chronicle generations`, `restore`, `merge`, `delete-generation`, `rollback`, `compress` and
//! `decompress`: a volume's history from the command line (seed 001 FIG 11–14, 50).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use chronicle::engine::reader::VolumeReader;
use chronicle::engine::{Volume, VolumeOptions};

use crate::host;

/// Lists every generation: its state, time, comment and blocks; merged records show the
/// generations they stand for.
pub fn generations(dir: &Path, json: bool) -> Result<ExitCode> {
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let list = reader.generations();
    if json {
        return crate::print_out(&(serde_json::to_string_pretty(&list)? + "\n"));
    }
    let mut out = format!(
        "{:>10}  {:<8}  {:<19}  {:>8}  {:>7}  {:<10}  {:>10}  comment\n",
        "generation", "state", "time (UTC)", "blocks", "stored", "restorable", "sequence"
    );
    for generation in &list {
        let name = if generation.through_generation != generation.generation {
            format!("{}..{}", generation.generation, generation.through_generation)
        } else {
            generation.generation.to_string()
        };
        let restorable = if reader.source(generation.generation).is_some() { "yes" } else { "no" };
        // The sequence the image is cut at (the open generation has no cut yet).
        let cut = if generation.state == "open" { "-".to_string() } else { generation.last_sequence.to_string() };
        // Compressed records: stored bytes as a share of the original (embodiment 8).
        let stored = if generation.compressed {
            format!("{:.0}%", 100.0 * generation.stored_bytes as f64 / generation.original_bytes.max(1) as f64)
        } else {
            "-".to_string()
        };
        out += &format!(
            "{name:>10}  {:<8}  {:<19}  {:>8}  {stored:>7}  {restorable:<10}  {cut:>10}  {}\n",
            generation.state,
            crate::format_time(generation.time_ns),
            generation.blocks,
            generation.comment
        );
        // "All" mode: the writes kept for any-point restore.
        if let Some(versions) = generation.versions {
            out += &format!(
                "{:>10}  versions: {} block versions, sequences {}..={}, written {} .. {}\n",
                "",
                versions.elements,
                versions.first_sequence,
                versions.last_sequence,
                crate::format_time(versions.first_time_ns),
                crate::format_time(versions.last_time_ns)
            );
        }
    }
    if reader.journal_mode_all() {
        out += &format!("any-point restore (--sequence): {}\n", reader.restorable_sequences());
    }
    crate::print_out(&out)
}

/// What `restore` writes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A generation's image.
    Generation(u64),
    /// The image after every host write up to a sequence ("all" journal mode).
    Sequence(u64),
    /// The image after every host write taken at or before a time, Unix nanoseconds.
    Time(u64),
}

/// Writes the image of `target` to `output` (a file, created or truncated, or an existing
/// block device), streaming: memory holds one 4 MiB chunk and the list of changed blocks.
pub fn restore(dir: &Path, target: Target, output: &Path) -> Result<ExitCode> {
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("cannot open {}", dir.display()))?;
    // A time is the sequence of the newest write taken by then.
    let target = match target {
        Target::Time(time_ns) => Target::Sequence(reader.sequence_at_time(time_ns)?),
        other => other,
    };
    let generation = match target {
        Target::Generation(generation) => generation,
        Target::Sequence(sequence) | Target::Time(sequence) => {
            // Refused before the output is touched.
            reader.check_sequence(sequence)?;
            u64::MAX
        }
    };
    if generation != u64::MAX && reader.source(generation).is_none() {
        let restorable: Vec<String> = reader
            .generations()
            .iter()
            .filter(|g| reader.source(g.generation).is_some())
            .map(|g| g.generation.to_string())
            .collect();
        bail!(
            "generation {generation} cannot be restored from {} (restorable: {})",
            dir.display(),
            restorable.join(" ")
        );
    }
    let volume_bytes = reader.volume_bytes();
    let is_device = output.metadata().map(|m| !m.is_file()).unwrap_or(false);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        .open(output)
        .with_context(|| format!("cannot open {}", output.display()))?;
    if is_device {
        let size = file.seek(SeekFrom::End(0))?;
        if size < volume_bytes {
            bail!("{} holds {size} bytes, the image needs {volume_bytes}", output.display());
        }
        file.seek(SeekFrom::Start(0))?;
    }
    let progress = indicatif::ProgressBar::new(volume_bytes);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("a valid template"),
    );
    let mut sink = |_, chunk: &[u8]| {
        file.write_all(chunk)?;
        progress.inc(chunk.len() as u64);
        Ok(())
    };
    let what = match target {
        Target::Generation(generation) => {
            reader.restore_to(generation, &mut sink)?;
            format!("generation {generation}")
        }
        Target::Sequence(sequence) | Target::Time(sequence) => {
            reader.restore_sequence_to(sequence, &mut sink)?;
            format!("sequence {sequence}")
        }
    };
    file.sync_all().with_context(|| format!("cannot sync {}", output.display()))?;
    progress.finish_and_clear();
    println!("restored {what} of {} to {} ({volume_bytes} bytes)", dir.display(), output.display());
    Ok(ExitCode::SUCCESS)
}

/// Opens the volume (recovering it), runs one maintenance request, and closes it.
fn maintain(dir: &Path, request: impl FnOnce(&mut Volume) -> chronicle::engine::MaintenanceHandle) -> Result<()> {
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let mut completions = Vec::new();
    // The sort catches up first: only sorted generations are history records.
    volume.run_until_idle(&mut completions);
    let handle = request(&mut volume);
    let result = volume.wait_maintenance(&handle, &mut completions);
    volume.close()?;
    let report = result?;
    if report.units_after == 0 {
        println!(
            "dropped generations {}..{}: {} history units freed",
            report.generation, report.through_generation, report.units_before
        );
    } else {
        println!(
            "merged {} records into generation {}..{}: {} history units became {} (image {} stays restorable)",
            report.records,
            report.generation,
            report.through_generation,
            report.units_before,
            report.units_after,
            report.generation
        );
        if report.dedup_shared > 0 || report.dedup_mismatches > 0 {
            println!(
                "  dedup: {} units saved (elements sharing the unit of an equal one, {} of them another record's); {} hash matches with different contents kept apart",
                report.dedup_shared, report.dedup_shared_across, report.dedup_mismatches
            );
        }
        if report.dedup_declined_scattered > 0 {
            println!(
                "  dedup: {} elements equal to another record's were stored all the same (scattered: sharing them would have cost more retained extents than the merge's run budget)",
                report.dedup_declined_scattered
            );
        }
    }
    if report.retained_units > 0 {
        println!(
            "  {} history units are retained for live records that point at them (the records that stored them were deleted or merged away)",
            report.retained_units
        );
    }
    Ok(())
}

pub fn merge(dir: &Path, from: u64, through: u64) -> Result<ExitCode> {
    maintain(dir, |volume| volume.merge(from, through))?;
    Ok(ExitCode::SUCCESS)
}

pub fn delete_generation(dir: &Path, generation: u64) -> Result<ExitCode> {
    maintain(dir, |volume| volume.delete_generation(generation))?;
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(dir: &Path, generation: u64, comment: &str) -> Result<ExitCode> {
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let mut completions = Vec::new();
    volume.run_until_idle(&mut completions);
    let handle = volume.rollback(generation, comment);
    let result = loop {
        if let Some(result) = handle.result() {
            break result;
        }
        volume.poll(&mut completions);
    };
    volume.close()?;
    let rolled =
        result.map_err(|e| anyhow::anyhow!("rollback of {} to generation {generation}: {e}", dir.display()))?;
    println!(
        "rolled {} back to the image of generation {generation}: sealed as generation {rolled}; undo with --generation {}",
        dir.display(),
        rolled - 1
    );
    Ok(ExitCode::SUCCESS)
}

/// Compresses (or decompresses) the history record of `generation` (embodiment 8, FIG 50).
pub fn compress(dir: &Path, generation: u64, compress: bool) -> Result<ExitCode> {
    let mut volume = Volume::open(host::open_channels(dir, None, false, None)?, VolumeOptions::default())
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let mut completions = Vec::new();
    // The sort catches up first: only sorted generations are history records.
    volume.run_until_idle(&mut completions);
    let handle =
        if compress { volume.compress_generation(generation) } else { volume.decompress_generation(generation) };
    let result = volume.wait_compression(&handle, &mut completions);
    volume.close()?;
    let report = result?;
    let percent = 100.0 * report.stored_bytes as f64 / report.original_bytes.max(1) as f64;
    if compress && !report.compressed {
        println!(
            "generation {generation} left uncompressed: its {} frames would not take less space ({} of them do not shrink)",
            report.frames, report.raw_frames
        );
    } else if compress {
        println!(
            "compressed generation {generation}: {} bytes stored in {} ({percent:.1}%), {} frames ({} stored raw); {} history units became {}",
            report.original_bytes, report.stored_bytes, report.frames, report.raw_frames, report.units_before, report.units_after
        );
    } else {
        println!(
            "decompressed generation {generation}: {} bytes; {} history units became {}",
            report.original_bytes, report.units_before, report.units_after
        );
    }
    Ok(ExitCode::SUCCESS)
}
