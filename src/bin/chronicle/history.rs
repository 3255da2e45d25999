//! `chronicle generations`, `restore`, `merge`, `delete-generation` and `rollback`: a volume's history
//! from the command line (seed 001 FIG 11–14).

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
        "{:>10}  {:<8}  {:<19}  {:>8}  {:<10}  comment\n",
        "generation", "state", "time (UTC)", "blocks", "restorable"
    );
    for generation in &list {
        let name = if generation.through_generation != generation.generation {
            format!("{}..{}", generation.generation, generation.through_generation)
        } else {
            generation.generation.to_string()
        };
        let restorable = if reader.source(generation.generation).is_some() { "yes" } else { "no" };
        out += &format!(
            "{name:>10}  {:<8}  {:<19}  {:>8}  {restorable:<10}  {}\n",
            generation.state,
            crate::format_time(generation.time_ns),
            generation.blocks,
            generation.comment
        );
    }
    crate::print_out(&out)
}

/// Writes the image of `generation` to `output` (a file, created or truncated, or an existing
/// block device), streaming: memory holds one 4 MiB chunk and the list of changed blocks.
pub fn restore(dir: &Path, generation: u64, output: &Path) -> Result<ExitCode> {
    let reader = VolumeReader::open(host::open_channels(dir, None, true, None)?)
        .with_context(|| format!("cannot open {}", dir.display()))?;
    if reader.source(generation).is_none() {
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
    reader.restore_to(generation, &mut |_, chunk| {
        file.write_all(chunk)?;
        progress.inc(chunk.len() as u64);
        Ok(())
    })?;
    file.sync_all().with_context(|| format!("cannot sync {}", output.display()))?;
    progress.finish_and_clear();
    println!("restored generation {generation} of {} to {} ({volume_bytes} bytes)", dir.display(), output.display());
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
                "  dedup: {} units saved (elements sharing the unit of an equal one); {} hash matches with different contents kept apart",
                report.dedup_shared, report.dedup_mismatches
            );
        }
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
