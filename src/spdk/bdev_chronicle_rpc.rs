//! JSON-RPC methods of the `chronicle` module. Like SPDK's `vbdev_*_rpc.c`, this file only
//! decodes parameters and calls the module.

use std::ffi::CStr;

use serde::Deserialize;

use super::rpc::{self, RpcError, RpcMethod, RpcRequest, RpcState};
use super::{bdev_chronicle, Errno};

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
        bdev_chronicle::inspect(&params.bdev_name, move |result| match result {
            Ok(inspection) => request.respond(&inspection),
            Err(error) => request.error(RpcError::errno(error.errno(), error.to_string())),
        });
    }
}

/// Registers every `bdev_chronicle_*` method.
pub fn register() -> Result<(), Errno> {
    rpc::register::<GetVersion>()?;
    rpc::register::<Inspect>()
}
