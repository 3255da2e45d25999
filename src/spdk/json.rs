//! JSON between SPDK and serde.
//!
//! SPDK hands RPC parameters over as a flat array of `spdk_json_val` tokens (strings already
//! unescaped in place). [`value_from_tokens`] walks them into a `serde_json::Value`, which serde
//! then decodes into a typed parameter struct; [`JsonWriter`] writes any `Serialize` value into
//! an SPDK JSON write context (RPC results, `save_config`, `bdev_get_bdevs` info). Why serde and
//! not `spdk_json_decode_object`: see docs/SPDK.md.

use std::ffi::c_void;
use std::marker::PhantomData;

use serde_json::{Map, Number, Value};

use super::{ffi, Errno, NotSend};

/// Why SPDK's JSON tokens could not be turned into a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("invalid JSON")]
    Invalid,
    #[error("incomplete JSON")]
    Incomplete,
    #[error("JSON nested too deeply")]
    TooDeep,
    #[error("malformed JSON token stream at token {index}: {detail}")]
    Tokens { index: usize, detail: &'static str },
    #[error("JSON string is not UTF-8 at token {index}")]
    NotUtf8 { index: usize },
    #[error("JSON number {text:?} at token {index} is out of range")]
    Number { index: usize, text: String },
}

/// Builds the value whose first token is `first`.
///
/// # Safety
/// `first` must point to a token produced by `spdk_json_parse` (e.g. an RPC's `params`), with
/// the tokens of the whole value following it in the same array, and their `start` pointers
/// valid for the duration of the call.
pub(crate) unsafe fn value_from_tokens(first: *const ffi::spdk_json_val) -> Result<Value, JsonError> {
    // SAFETY: `first` is a valid token (caller contract); spdk_json_val_len only reads it.
    let count = unsafe { ffi::spdk_json_val_len(first) };
    // SAFETY: a value of `count` tokens starts at `first` in one array (caller contract).
    let tokens = unsafe { std::slice::from_raw_parts(first, count) };
    let (value, next) = walk(tokens, 0)?;
    if next != tokens.len() {
        return Err(JsonError::Tokens { index: next, detail: "tokens left after the value" });
    }
    Ok(value)
}

/// The bytes of a string, name or number token.
fn token_bytes(token: &ffi::spdk_json_val) -> &[u8] {
    if token.len == 0 {
        return &[];
    }
    // SAFETY: for string, name and number tokens SPDK sets `start`/`len` to the (decoded) bytes
    // inside the parsed buffer, which outlives the tokens (value_from_tokens' contract).
    unsafe { std::slice::from_raw_parts(token.start.cast::<u8>(), token.len as usize) }
}

fn token_str(tokens: &[ffi::spdk_json_val], index: usize) -> Result<String, JsonError> {
    let bytes = token_bytes(&tokens[index]);
    String::from_utf8(bytes.to_vec()).map_err(|_| JsonError::NotUtf8 { index })
}

/// The value starting at `tokens[index]`, and the index just past it.
fn walk(tokens: &[ffi::spdk_json_val], index: usize) -> Result<(Value, usize), JsonError> {
    let token = tokens.get(index).ok_or(JsonError::Tokens { index, detail: "value expected" })?;
    match token.type_ {
        ffi::SPDK_JSON_VAL_NULL => Ok((Value::Null, index + 1)),
        ffi::SPDK_JSON_VAL_TRUE => Ok((Value::Bool(true), index + 1)),
        ffi::SPDK_JSON_VAL_FALSE => Ok((Value::Bool(false), index + 1)),
        ffi::SPDK_JSON_VAL_STRING => Ok((Value::String(token_str(tokens, index)?), index + 1)),
        ffi::SPDK_JSON_VAL_NUMBER => {
            let text = std::str::from_utf8(token_bytes(token)).map_err(|_| JsonError::NotUtf8 { index })?;
            let number: Number = text.parse().map_err(|_| JsonError::Number { index, text: text.to_string() })?;
            Ok((Value::Number(number), index + 1))
        }
        ffi::SPDK_JSON_VAL_OBJECT_BEGIN => {
            let end = index + 1 + token.len as usize;
            let mut map = Map::new();
            let mut at = index + 1;
            while at < end {
                if tokens[at].type_ != ffi::SPDK_JSON_VAL_NAME {
                    return Err(JsonError::Tokens { index: at, detail: "object member name expected" });
                }
                let name = token_str(tokens, at)?;
                let (value, next) = walk(tokens, at + 1)?;
                map.insert(name, value);
                at = next;
            }
            match tokens.get(end) {
                Some(token) if at == end && token.type_ == ffi::SPDK_JSON_VAL_OBJECT_END => {
                    Ok((Value::Object(map), end + 1))
                }
                _ => Err(JsonError::Tokens { index: end, detail: "object end expected" }),
            }
        }
        ffi::SPDK_JSON_VAL_ARRAY_BEGIN => {
            let end = index + 1 + token.len as usize;
            let mut items = Vec::new();
            let mut at = index + 1;
            while at < end {
                let (value, next) = walk(tokens, at)?;
                items.push(value);
                at = next;
            }
            match tokens.get(end) {
                Some(token) if at == end && token.type_ == ffi::SPDK_JSON_VAL_ARRAY_END => {
                    Ok((Value::Array(items), end + 1))
                }
                _ => Err(JsonError::Tokens { index: end, detail: "array end expected" }),
            }
        }
        _ => Err(JsonError::Tokens { index, detail: "unexpected token type" }),
    }
}

/// Parses `text` with SPDK's own tokenizer (`spdk_json_parse`) and walks the tokens. Used to
/// test the walker against the parser that produces RPC parameters; needs no SPDK environment.
pub fn parse(text: &str) -> Result<Value, JsonError> {
    let mut buffer = text.as_bytes().to_vec();
    let parse_error = |rc: isize| match rc as i32 {
        ffi::SPDK_JSON_PARSE_INCOMPLETE => JsonError::Incomplete,
        ffi::SPDK_JSON_PARSE_MAX_DEPTH_EXCEEDED => JsonError::TooDeep,
        _ => JsonError::Invalid,
    };
    // SAFETY: counting pass: no tokens are written, the buffer is only read (no decode flag).
    let count = unsafe {
        ffi::spdk_json_parse(buffer.as_mut_ptr().cast(), buffer.len(), std::ptr::null_mut(), 0, std::ptr::null_mut(), 0)
    };
    if count < 0 {
        return Err(parse_error(count));
    }
    let mut tokens = vec![ffi::spdk_json_val::default(); count as usize];
    // SAFETY: `tokens` has room for `count` values; strings are decoded in place inside
    // `buffer`, which outlives `tokens`.
    let parsed = unsafe {
        ffi::spdk_json_parse(
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            tokens.as_mut_ptr(),
            tokens.len(),
            std::ptr::null_mut(),
            ffi::SPDK_JSON_PARSE_FLAG_DECODE_IN_PLACE,
        )
    };
    if parsed != count {
        return Err(if parsed < 0 { parse_error(parsed) } else { JsonError::Invalid });
    }
    // SAFETY: `tokens` came from spdk_json_parse over `buffer`, both alive here.
    unsafe { value_from_tokens(tokens.as_ptr()) }
}

/// An SPDK JSON write context (`spdk_json_write_ctx`), borrowed for one callback or one RPC
/// result.
pub struct JsonWriter<'a> {
    raw: *mut ffi::spdk_json_write_ctx,
    _borrow: PhantomData<&'a mut ffi::spdk_json_write_ctx>,
    _not_send: NotSend,
}

impl JsonWriter<'_> {
    /// # Safety
    /// `raw` must be a live write context that nobody else writes to during `'a`.
    pub(crate) unsafe fn from_raw(raw: *mut ffi::spdk_json_write_ctx) -> Self {
        JsonWriter { raw, _borrow: PhantomData, _not_send: NotSend::default() }
    }

    /// Writes `value` as the next JSON value (SPDK adds separators and indentation).
    pub fn write<T: serde::Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Errno> {
        let text = serde_json::to_vec(value).map_err(|_| Errno::EINVAL)?;
        self.write_raw(&text)
    }

    /// Writes `"name": value` inside an object (e.g. `bdev_get_bdevs`' `driver_specific`).
    pub fn write_named<T: serde::Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<(), Errno> {
        let name = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `raw` is live (constructor contract); SPDK copies the name.
        let rc = unsafe { ffi::spdk_json_write_name(self.raw, name.as_ptr()) };
        Errno::check(rc)?;
        self.write(value)
    }

    /// Writes `text`, which must be one complete JSON value (serde_json output).
    pub(crate) fn write_raw(&mut self, text: &[u8]) -> Result<(), Errno> {
        // SAFETY: `raw` is live (constructor contract); SPDK copies `text` to its output.
        let rc = unsafe { ffi::spdk_json_write_val_raw(self.raw, text.as_ptr().cast::<c_void>(), text.len()) };
        Errno::check(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spdk_tokens_walk_back_to_the_same_value() {
        let cases = [
            json!({}),
            json!([]),
            json!(null),
            json!({"name": "Chronicle0", "host_write_size": 4096, "strict": true, "comment": null}),
            json!({"nested": {"list": [1, -2, 3.5, "a\"b\\c\u{e9}", [], {}], "big": 18446744073709551615u64}}),
            json!(["x", false, {"k": [{"deep": [1]}]}]),
        ];
        for case in cases {
            let text = serde_json::to_string(&case).unwrap();
            assert_eq!(parse(&text).unwrap(), case, "{text}");
        }
    }

    #[test]
    fn broken_json_is_an_error_not_a_value() {
        assert_eq!(parse("{\"a\": "), Err(JsonError::Incomplete));
        assert_eq!(parse("{\"a\" 1}"), Err(JsonError::Invalid));
    }
}
