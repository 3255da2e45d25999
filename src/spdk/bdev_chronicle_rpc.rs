//! JSON-RPC methods of the `chronicle` module. Like SPDK's `vbdev_*_rpc.c`, this file only
//! decodes parameters and calls the module.

use std::ffi::CStr;

use serde::Deserialize;

use super::bdev_chronicle;
use super::rpc::{self, RpcMethod, RpcRequest, RpcState};

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

/// Registers every `bdev_chronicle_*` method.
pub fn register() {
    rpc::register::<GetVersion>();
}
