//! JSON-RPC methods (`spdk_rpc_register_method`).
//!
//! A method is a type implementing [`RpcMethod`]; [`register`] installs one monomorphised
//! `extern "C"` handler for it (no context pointer is needed, so no forked SPDK and no boxed
//! state behind a persistent callback argument). The handler decodes the parameters with serde
//! into [`RpcMethod::Params`] — a decoding error is answered with JSON-RPC "invalid params" and
//! the exact serde message — and passes an [`RpcRequest`] to [`RpcMethod::call`]. The request
//! is answered by value, now or later from a completion callback, exactly once.

use std::ffi::{CStr, CString};
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::json::{self, JsonWriter};
use super::thread::Thread;
use super::{ffi, Errno, NotSend};

/// JSON-RPC error codes (as SPDK uses them).
pub mod code {
    use super::ffi;
    pub const INVALID_PARAMS: i32 = ffi::SPDK_JSONRPC_ERROR_INVALID_PARAMS;
    pub const INTERNAL_ERROR: i32 = ffi::SPDK_JSONRPC_ERROR_INTERNAL_ERROR;
    pub const INVALID_STATE: i32 = ffi::SPDK_JSONRPC_ERROR_INVALID_STATE;
}

/// An error answer: a JSON-RPC code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError { code: code::INVALID_PARAMS, message: message.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        RpcError { code: code::INTERNAL_ERROR, message: message.into() }
    }

    /// SPDK's convention for errno failures: the code is `-errno`.
    pub fn errno(errno: Errno, message: impl Into<String>) -> Self {
        RpcError { code: -errno.0, message: message.into() }
    }
}

/// When a method may be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcState {
    /// Only before `framework_start_init` (`--wait-for-rpc`).
    Startup,
    /// Only once the subsystems are initialised.
    Runtime,
    /// Both (e.g. in a JSON config loaded at startup and at runtime).
    StartupAndRuntime,
}

impl RpcState {
    fn mask(self) -> u32 {
        match self {
            RpcState::Startup => ffi::SPDK_RPC_STARTUP,
            RpcState::Runtime => ffi::SPDK_RPC_RUNTIME,
            RpcState::StartupAndRuntime => ffi::SPDK_RPC_STARTUP | ffi::SPDK_RPC_RUNTIME,
        }
    }
}

/// A JSON-RPC method.
pub trait RpcMethod: 'static {
    /// The method's name, e.g. `bdev_chronicle_get_version`.
    const NAME: &'static CStr;
    const STATE: RpcState = RpcState::Runtime;
    /// Typed parameters. Absent `params` decode as `{}`; use `#[serde(deny_unknown_fields)]` so
    /// that a misspelt parameter is refused instead of ignored.
    type Params: DeserializeOwned;

    /// Handles one call, on the app thread. `request` must be answered, now or later.
    fn call(request: RpcRequest, params: Self::Params);
}

/// Registers `M` with SPDK's RPC server: from a constructor (before SPDK's threads exist) or
/// on the app thread, which owns the method list; `EPERM` elsewhere. SPDK logs an error and
/// refuses a duplicate name.
pub fn register<M: RpcMethod>() -> Result<(), Errno> {
    if !on_registration_thread() {
        return Err(Errno::EPERM);
    }
    // SAFETY: `M::NAME` is 'static, `handler::<M>` matches spdk_rpc_method_handler; SPDK keeps
    // both pointers for the life of the process. No other thread walks the list (checked above).
    unsafe { ffi::spdk_rpc_register_method(M::NAME.as_ptr(), Some(handler::<M>), M::STATE.mask()) };
    Ok(())
}

/// Before SPDK's thread library is up (constructors, `main` before `spdk_app_start`), or on
/// the app thread: where SPDK's global lists of modules, methods and flags may be changed.
pub(crate) fn on_registration_thread() -> bool {
    match Thread::app() {
        None => true,
        Some(app) => app.is_current(),
    }
}

unsafe extern "C" fn handler<M: RpcMethod>(raw: *mut ffi::spdk_jsonrpc_request, params: *const ffi::spdk_json_val) {
    // SAFETY: SPDK passes a live request that awaits exactly one answer; RpcRequest answers it
    // once (by value, or on drop).
    let request = unsafe { RpcRequest::from_raw(raw) };
    let value = if params.is_null() {
        Ok(serde_json::Value::Object(serde_json::Map::new()))
    } else {
        // SAFETY: `params` is the first token of the request's parsed parameters, alive for the
        // duration of this call.
        unsafe { json::value_from_tokens(params) }
    };
    let decoded = value
        .map_err(|error| error.to_string())
        .and_then(|value| serde_json::from_value::<M::Params>(value).map_err(|error| error.to_string()));
    match decoded {
        Ok(params) => M::call(request, params),
        Err(detail) => request
            .error(RpcError::invalid_params(format!("{}: invalid parameters: {detail}", M::NAME.to_string_lossy()))),
    }
}

/// A request waiting for its answer. Answered exactly once: [`respond`](Self::respond) and
/// [`error`](Self::error) take it by value; dropping it unanswered sends an internal error, so a
/// client never waits forever. `!Send`: answer it on the app thread.
pub struct RpcRequest {
    raw: *mut ffi::spdk_jsonrpc_request,
    _not_send: NotSend,
    _unique: PhantomData<ffi::spdk_jsonrpc_request>,
}

impl RpcRequest {
    /// # Safety
    /// `raw` must be a live request not yet answered, and no other RpcRequest may wrap it.
    unsafe fn from_raw(raw: *mut ffi::spdk_jsonrpc_request) -> Self {
        RpcRequest { raw, _not_send: NotSend::default(), _unique: PhantomData }
    }

    /// Answers with `result`.
    pub fn respond<T: Serialize + ?Sized>(self, result: &T) {
        let text = match serde_json::to_vec(result) {
            Ok(text) => text,
            Err(error) => return self.error(RpcError::internal(format!("cannot encode the result: {error}"))),
        };
        let raw = self.into_raw();
        // SAFETY: `raw` is live and unanswered; begin_result returns the response writer (NULL
        // for a notification, which needs no answer).
        let writer = unsafe { ffi::spdk_jsonrpc_begin_result(raw) };
        if writer.is_null() {
            return;
        }
        // SAFETY: `writer` belongs to this request until end_result.
        let mut json = unsafe { JsonWriter::from_raw(writer) };
        // The writer reports write errors again at end_result; SPDK then closes the connection.
        let _ = json.write_raw(&text);
        // SAFETY: ends the response begun above, exactly once.
        unsafe { ffi::spdk_jsonrpc_end_result(raw, writer) };
    }

    /// Answers with an error.
    pub fn error(self, error: RpcError) {
        // Interior NULs cannot be sent as a C string; replace them.
        let message = CString::new(error.message.replace('\0', " ")).unwrap_or_default();
        let raw = self.into_raw();
        // SAFETY: `raw` is live and unanswered; SPDK copies the message.
        unsafe { ffi::spdk_jsonrpc_send_error_response(raw, error.code, message.as_ptr()) };
    }

    fn into_raw(self) -> *mut ffi::spdk_jsonrpc_request {
        let raw = self.raw;
        std::mem::forget(self);
        raw
    }
}

impl Drop for RpcRequest {
    fn drop(&mut self) {
        let message = c"chronicle: the RPC handler dropped the request without answering it";
        // SAFETY: a dropped RpcRequest was never answered (answers consume it via into_raw).
        unsafe { ffi::spdk_jsonrpc_send_error_response(self.raw, code::INTERNAL_ERROR, message.as_ptr()) };
    }
}
