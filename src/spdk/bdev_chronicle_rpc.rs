//! JSON-RPC methods of the `chronicle` module. Like SPDK's `vbdev_*_rpc.c`, this file only
//! decodes parameters and calls the module.

use std::ffi::CStr;

use serde::Deserialize;

use super::bdev_chronicle_load as load;
use super::bdev_chronicle_volume::{self as volume, CreateMode, VolumeConfig};
use super::rpc::{self, RpcError, RpcMethod, RpcRequest, RpcState};
use super::{bdev_chronicle, Errno};
use crate::engine::{RestoreTarget, RetentionPolicy};

/// A failure a method answers with: SPDK's `-errno` convention and the message.
trait Failure: std::fmt::Display {
    fn errno(&self) -> Errno;
}

impl Failure for volume::CreateError {
    fn errno(&self) -> Errno {
        volume::CreateError::errno(self)
    }
}

impl Failure for volume::VolumeError {
    fn errno(&self) -> Errno {
        volume::VolumeError::errno(self)
    }
}

impl Failure for load::LoadError {
    fn errno(&self) -> Errno {
        load::LoadError::errno(self)
    }
}

impl Failure for bdev_chronicle::InspectError {
    fn errno(&self) -> Errno {
        bdev_chronicle::InspectError::errno(self)
    }
}

/// Answers `request` with `result`.
fn answer<T: serde::Serialize, E: Failure>(request: RpcRequest, result: Result<T, E>) {
    match result {
        Ok(value) => request.respond(&value),
        Err(error) => request.error(RpcError::errno(error.errno(), error.to_string())),
    }
}

/// For methods without parameters: `{}` or no `params`; anything else is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `bdev_chronicle_get_version` → `{"version", "format_major", "spdk_version"}`.
pub struct GetVersion;

impl RpcMethod for GetVersion {
    const NAME: &'static CStr = c"bdev_chronicle_get_version";
    const STATE: RpcState = RpcState::StartupAndRuntime;
    type Params = NoParams;

    fn call(request: RpcRequest, _params: NoParams) {
        request.respond(&bdev_chronicle::version_info());
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectParams {
    pub bdev_name: String,
}

/// `bdev_chronicle_inspect {bdev_name}` → `{bdev_name, block_size, num_blocks, chronicle, detail}`:
/// reads the bdev's superblocks (without claiming it) and says whether it is a chronicle
/// journal or history device. Answered when the read completes.
pub struct Inspect;

impl RpcMethod for Inspect {
    const NAME: &'static CStr = c"bdev_chronicle_inspect";
    type Params = InspectParams;

    fn call(request: RpcRequest, params: InspectParams) {
        bdev_chronicle::inspect(&params.bdev_name, move |result| answer(request, result));
    }
}

/// `bdev_chronicle_create {name, base_bdev, journal_bdev, backup_bdev, history_bdev, …}` →
/// the bdev's name: formats blank journal and history bdevs or opens the volume they hold
/// (recovering it), claims the four bdevs and registers the chronicle bdev. Answered when the
/// bdev is registered, or with why nothing was created (nothing is left behind).
pub struct Create;

impl RpcMethod for Create {
    const NAME: &'static CStr = c"bdev_chronicle_create";
    type Params = VolumeConfig;

    fn call(request: RpcRequest, params: VolumeConfig) {
        volume::create(params, CreateMode::FormatOrOpen, Box::new(move |result| answer(request, result)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

/// `bdev_chronicle_delete {name}` → `true`: unregisters the bdev and closes the volume (the
/// sort stops at a resumable point, every device is flushed, the four bdevs are released).
/// The data stays on the devices: create (or examine) opens it again.
pub struct Delete;

impl RpcMethod for Delete {
    const NAME: &'static CStr = c"bdev_chronicle_delete";
    type Params = NameParams;

    fn call(request: RpcRequest, params: NameParams) {
        volume::delete(&params.name, move |result| answer(request, result.map(|()| true)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkParams {
    pub name: String,
    #[serde(default)]
    pub comment: String,
}

/// `bdev_chronicle_mark {name, comment?}` → the number of the generation the marker sealed.
pub struct Mark;

impl RpcMethod for Mark {
    const NAME: &'static CStr = c"bdev_chronicle_mark";
    type Params = MarkParams;

    fn call(request: RpcRequest, params: MarkParams) {
        volume::mark(&params.name, &params.comment, Box::new(move |result| answer(request, result)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackParams {
    pub name: String,
    pub generation: u64,
    #[serde(default = "rollback_comment")]
    pub comment: String,
}

fn rollback_comment() -> String {
    "rollback".into()
}

/// `bdev_chronicle_rollback {name, generation, comment?}` → the number of the generation that
/// holds the rolled-back image (the one before it is the undo point). Host writes wait while
/// the blocks changed since `generation` are rewritten through the journal.
pub struct Rollback;

impl RpcMethod for Rollback {
    const NAME: &'static CStr = c"bdev_chronicle_rollback";
    type Params = RollbackParams;

    fn call(request: RpcRequest, params: RollbackParams) {
        volume::rollback(
            &params.name,
            params.generation,
            &params.comment,
            Box::new(move |result| answer(request, result)),
        );
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreParams {
    pub name: String,
    /// Exactly one of `generation`, `sequence`, `time` and `time_ns`.
    #[serde(default)]
    pub generation: Option<u64>,
    /// "All" journal mode: the image right after the host write with this sequence.
    #[serde(default)]
    pub sequence: Option<u64>,
    /// "All" journal mode: the image after every host write taken by this time, RFC 3339
    /// (as `get_generations` prints times) …
    #[serde(default)]
    pub time: Option<String>,
    /// … or Unix nanoseconds (as its `time_ns`).
    #[serde(default)]
    pub time_ns: Option<u64>,
    pub restore_name: String,
}

impl RestoreParams {
    /// The target, or why the parameters do not name exactly one.
    fn target(&self) -> Result<RestoreTarget, String> {
        let time = match &self.time {
            Some(text) => Some(crate::core::time::parse(text).map_err(|why| format!("time: {why}"))?),
            None => None,
        };
        match (self.generation, self.sequence, time, self.time_ns) {
            (Some(generation), None, None, None) => Ok(RestoreTarget::Generation(generation)),
            (None, Some(sequence), None, None) => Ok(RestoreTarget::Sequence(sequence)),
            (None, None, Some(time_ns), None) | (None, None, None, Some(time_ns)) => Ok(RestoreTarget::TimeNs(time_ns)),
            _ => Err("give exactly one of generation, sequence, time (RFC 3339) and time_ns (Unix nanoseconds)".into()),
        }
    }
}

/// `bdev_chronicle_restore {name, generation | sequence | time | time_ns, restore_name}` → the
/// new bdev's name: generation `generation` of volume `name`, or ("all" journal mode) the image
/// right after write `sequence` or after every write taken by `time`, as a readable and
/// writable bdev (an R-VOL), at once, without copying the image. Answered when the bdev is
/// registered; a refused target registers nothing.
pub struct Restore;

impl RpcMethod for Restore {
    const NAME: &'static CStr = c"bdev_chronicle_restore";
    type Params = RestoreParams;

    fn call(request: RpcRequest, params: RestoreParams) {
        match params.target() {
            Ok(target) => volume::open_restore(
                &params.name,
                target,
                &params.restore_name,
                Box::new(move |result| answer(request, result)),
            ),
            Err(why) => request.error(RpcError::invalid_params(format!(
                "{}: invalid parameters: {why}",
                Self::NAME.to_string_lossy()
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRestoreParams {
    pub restore_name: String,
}

/// `bdev_chronicle_delete_restore {restore_name}` → `true`: deletes an R-VOL bdev (its writes
/// are given up; the volume's generations are untouched).
pub struct DeleteRestore;

impl RpcMethod for DeleteRestore {
    const NAME: &'static CStr = c"bdev_chronicle_delete_restore";
    type Params = DeleteRestoreParams;

    fn call(request: RpcRequest, params: DeleteRestoreParams) {
        volume::delete_restore(&params.restore_name, move |result| answer(request, result.map(|()| true)));
    }
}

/// `bdev_chronicle_get_generations {name}` → `[{generation, state, time, time_ns, comment, blocks}]`.
pub struct GetGenerations;

impl RpcMethod for GetGenerations {
    const NAME: &'static CStr = c"bdev_chronicle_get_generations";
    type Params = NameParams;

    fn call(request: RpcRequest, params: NameParams) {
        volume::generations(&params.name, Box::new(move |result| answer(request, result)))
    }
}

/// `bdev_chronicle_get_status {name}` → state, journal and history use, sort progress, counters.
pub struct GetStatus;

impl RpcMethod for GetStatus {
    const NAME: &'static CStr = c"bdev_chronicle_get_status";
    type Params = NameParams;

    fn call(request: RpcRequest, params: NameParams) {
        volume::status(&params.name, Box::new(move |result| answer(request, result)))
    }
}

/// `bdev_chronicle_load {name, seconds, writes?, queue_depth?, marker_every_ms?,
/// marker_every_writes?, seed?, ack_log?}` →
/// `{writes_acknowledged, writes_failed, markers, markers_failed, seconds, iops}`: writes
/// self-identifying payloads through the chronicle bdev and logs every acknowledged write, for
/// crash tests (`kill -9` the application, restart, then `bdev_chronicle_verify_load` or
/// `chronicle check DIR --ack-log FILE`). Answered when the load ends.
pub struct Load;

impl RpcMethod for Load {
    const NAME: &'static CStr = c"bdev_chronicle_load";
    type Params = load::LoadParams;

    fn call(request: RpcRequest, params: load::LoadParams) {
        load::run_load(params, move |result| answer(request, result));
    }
}

/// `bdev_chronicle_verify_load {name, ack_log}` → `{acknowledged, blocks_checked, missing,
/// invalid, problems}`: reads back every block of an ack log through the chronicle bdev.
pub struct VerifyLoad;

impl RpcMethod for VerifyLoad {
    const NAME: &'static CStr = c"bdev_chronicle_verify_load";
    type Params = load::VerifyParams;

    fn call(request: RpcRequest, params: load::VerifyParams) {
        load::run_verify(params, move |result| answer(request, result));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    pub name: String,
    pub from: u64,
    pub through: u64,
}

/// `bdev_chronicle_merge {name, from, through}` → `{generation, through_generation, records,
/// units_before, units_after}`: merges the history records of generations `from..=through`
/// (older element wins); image `from` stays restorable, the ones after it up to `through` are
/// given up. Answered when the merge has committed.
pub struct Merge;

impl RpcMethod for Merge {
    const NAME: &'static CStr = c"bdev_chronicle_merge";
    type Params = MergeParams;

    fn call(request: RpcRequest, params: MergeParams) {
        volume::merge(&params.name, params.from, params.through, Box::new(move |result| answer(request, result)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteGenerationParams {
    pub name: String,
    pub generation: u64,
}

/// `bdev_chronicle_delete_generation {name, generation}` → the same report: gives up image
/// `generation` (the oldest history record is dropped and its space freed; a younger one is
/// merged into the record before it).
pub struct DeleteGeneration;

impl RpcMethod for DeleteGeneration {
    const NAME: &'static CStr = c"bdev_chronicle_delete_generation";
    type Params = DeleteGenerationParams;

    fn call(request: RpcRequest, params: DeleteGenerationParams) {
        volume::delete_generation(&params.name, params.generation, Box::new(move |result| answer(request, result)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressGenerationParams {
    pub name: String,
    pub generation: u64,
}

/// `bdev_chronicle_compress_generation {name, generation}` → `{generation, through_generation,
/// compressed, original_bytes, stored_bytes, frames, raw_frames, units_before, units_after,
/// retained_for_others, shared_across}`:
/// compresses the history record of `generation` (embodiment 8); `compressed` false says it
/// would not have got smaller and was left as it was. Answered when it has committed.
pub struct CompressGeneration;

impl RpcMethod for CompressGeneration {
    const NAME: &'static CStr = c"bdev_chronicle_compress_generation";
    type Params = CompressGenerationParams;

    fn call(request: RpcRequest, params: CompressGenerationParams) {
        volume::compress_generation(&params.name, params.generation, true, Box::new(move |r| answer(request, r)));
    }
}

/// `bdev_chronicle_decompress_generation {name, generation}` → the same report: the history
/// record of `generation` back to its original size.
pub struct DecompressGeneration;

impl RpcMethod for DecompressGeneration {
    const NAME: &'static CStr = c"bdev_chronicle_decompress_generation";
    type Params = CompressGenerationParams;

    fn call(request: RpcRequest, params: CompressGenerationParams) {
        volume::compress_generation(&params.name, params.generation, false, Box::new(move |r| answer(request, r)));
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRetentionParams {
    pub name: String,
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub merge_older: bool,
    #[serde(default)]
    pub max_generations: Option<u32>,
    #[serde(default)]
    pub max_age_seconds: Option<u64>,
    #[serde(default)]
    pub compress_older: bool,
}

/// `bdev_chronicle_set_retention {name, keep_last?, merge_older?, max_generations?,
/// max_age_seconds?, compress_older?}` → the policy: applied now and after every sort; recorded by
/// `save_config`. No limits (all absent) keeps every generation.
pub struct SetRetention;

impl RpcMethod for SetRetention {
    const NAME: &'static CStr = c"bdev_chronicle_set_retention";
    type Params = SetRetentionParams;

    fn call(request: RpcRequest, params: SetRetentionParams) {
        let policy = RetentionPolicy {
            keep_last: params.keep_last,
            merge_older: params.merge_older,
            max_generations: params.max_generations,
            max_age_seconds: params.max_age_seconds,
            compress_older: params.compress_older,
        };
        volume::set_retention(&params.name, policy, Box::new(move |result| answer(request, result)))
    }
}

/// Registers every `bdev_chronicle_*` method.
pub fn register() -> Result<(), Errno> {
    rpc::register::<GetVersion>()?;
    rpc::register::<Inspect>()?;
    rpc::register::<Create>()?;
    rpc::register::<Delete>()?;
    rpc::register::<Mark>()?;
    rpc::register::<Rollback>()?;
    rpc::register::<Restore>()?;
    rpc::register::<DeleteRestore>()?;
    rpc::register::<GetGenerations>()?;
    rpc::register::<GetStatus>()?;
    rpc::register::<Merge>()?;
    rpc::register::<DeleteGeneration>()?;
    rpc::register::<SetRetention>()?;
    rpc::register::<CompressGeneration>()?;
    rpc::register::<DecompressGeneration>()?;
    rpc::register::<Load>()?;
    rpc::register::<VerifyLoad>()
}
