//! Request and response headers.
//!
//! The header version follows from the api key and version (flexible versions use request
//! header v2 with tagged fields, older ones v1). ApiVersions responses always use response
//! header v0 so that a client can read the error even when it sent a version we don't know.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::Decodable;

use crate::error::ProtocolError;

/// Reads api key and version without consuming them.
pub fn peek_key_version(frame: &[u8]) -> Result<(i16, i16), ProtocolError> {
    if frame.len() < 4 {
        return Err(ProtocolError::Header(format!("{} bytes is too short", frame.len())));
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    Ok((key, version))
}

/// Request header version for a request; v0 (no client id) is never used by supported APIs.
pub fn request_header_version(api_key: ApiKey, version: i16) -> i16 {
    api_key.request_header_version(version).max(1)
}

/// Response header version: v0 is `correlation_id`, v1 adds an (empty) tag buffer.
pub fn response_header_version(api_key: ApiKey, version: i16) -> i16 {
    if api_key == ApiKey::ApiVersions {
        return 0;
    }
    api_key.response_header_version(version)
}

/// Decodes the request header from the front of `frame`, leaving the body in it.
pub fn decode_request_header(frame: &mut Bytes) -> Result<(ApiKey, RequestHeader), ProtocolError> {
    let (key, version) = peek_key_version(frame)?;
    let api_key = ApiKey::try_from(key).map_err(|_| ProtocolError::UnknownApiKey(key))?;
    let header = RequestHeader::decode(frame, request_header_version(api_key, version))
        .map_err(|e| ProtocolError::Header(e.to_string()))?;
    Ok((api_key, header))
}

/// Writes a response header; no tagged fields are ever emitted.
pub fn encode_response_header(out: &mut BytesMut, correlation_id: i32, header_version: i16) {
    out.put_i32(correlation_id);
    if header_version >= 1 {
        out.put_u8(0);
    }
}

/// Reads a response header (client side, for tests and tools).
pub fn decode_response_header(buf: &mut Bytes, header_version: i16) -> Option<i32> {
    if buf.remaining() < 4 {
        return None;
    }
    let correlation_id = buf.get_i32();
    if header_version >= 1 {
        // Skip the tag buffer; we only ever see empty ones from ourselves.
        let count = buf.try_get_u8().ok()?;
        if count != 0 {
            return None;
        }
    }
    Some(correlation_id)
}
