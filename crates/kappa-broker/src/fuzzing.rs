//! The function the `request_decode` fuzz target calls, public so the corpus replay test
//! (`tests/fuzz_corpus.rs`) runs the same code on stable Rust. It must never panic or
//! abort, whatever the input.

use bytes::{BufMut, Bytes, BytesMut};

use crate::api_versions::API_SUPPORT;
use crate::header::request_header_version;
use crate::request::decode_request;

/// Input layout: byte 0 picks an advertised API, byte 1 a version within its range (so
/// the fuzzer reaches every supported key and version), the rest is the request body
/// after a well-formed header. A second pass decodes the raw input as a whole frame, to
/// cover header parsing too.
pub fn request_decode(data: &[u8]) {
    let _ = decode_request(Bytes::copy_from_slice(data));
    let [selector, version_byte, body @ ..] = data else { return };
    let range = API_SUPPORT.0[*selector as usize % API_SUPPORT.0.len()];
    let span = (range.max - range.min + 1) as u8;
    let version = range.min + i16::from(version_byte % span);
    let _ = decode_request(frame(range.key as i16, version, request_header_version(range.key, version), body));
}

/// A request header (v1, or v2 with an empty tag buffer) followed by `body`.
pub fn frame(api_key: i16, version: i16, header_version: i16, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + body.len());
    out.put_i16(api_key);
    out.put_i16(version);
    out.put_i32(7); // correlation id
    out.put_i16(4);
    out.put_slice(b"fuzz");
    if header_version >= 2 {
        out.put_u8(0); // no tagged fields
    }
    out.put_slice(body);
    out.freeze()
}
