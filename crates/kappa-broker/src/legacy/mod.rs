//! Hand-written codecs for the request versions kafka-protocol 0.18 dropped (KIP-896) but
//! kafka-node still sends, plus the MessageSet v0/v1 format they carry.
//!
//! Requests decode into the same kafka-protocol structs the modern versions use, so the
//! handler never sees a version difference; responses are the same structs written in the
//! old layout. The payloads are where the handlers see an old version, and convert on a
//! blocking thread, under the turn compressed batches take when converting inflates: old
//! Produce payloads (MessageSets) are up-converted to RecordBatch v2
//! (`produce::up_convert`), old Fetch answers down-converted from it
//! (`message_set::down_convert`); the encoder writes them as they are.

pub mod create_topics;
pub mod delete_topics;
pub mod fetch;
pub mod list_offsets;
pub mod message_set;
pub mod offset_commit;
pub mod offset_fetch;
pub mod produce;
pub mod wire;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestKind, ResponseKind};
use thiserror::Error;

/// Cap on decompressed bytes per legacy payload (one partition's message set in a produce
/// request, or one fetched batch being down-converted), far above Kafka's 1 MiB default `max.message.bytes`.
pub const DECOMPRESSED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Most message-set bytes one fetch v0-3 answer holds, all its partitions together, below
/// the request's own limits (each partition's `partition_max_bytes`, v3's `max_bytes`), which
/// bound the converted bytes too (the rest waits for the next fetch; the first message
/// always goes, so a consumer moves on). Down-converted records are inflated and re-framed:
/// without it an answer could be many times the bytes read (each small compressed batch up
/// to 64 MiB), so neither an answer's memory nor what one inflating turn holds would be
/// bounded.
pub const DOWN_CONVERTED_ANSWER_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Why a legacy request could not be decoded or a response encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LegacyError {
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("invalid length {length} for {field}")]
    BadLength { field: &'static str, length: i64 },
    #[error("{count} elements of {field} would take more memory than the request's decode budget allows")]
    TooLarge { field: &'static str, count: usize },
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("{0} must not be null")]
    Null(&'static str),
    #[error("response does not match the request's api key")]
    Mismatch,
    #[error("{0:?} v{1} has no legacy codec")]
    NoCodec(ApiKey, i16),
}

/// Whether `key` at `version` goes through a legacy codec.
pub fn handles(key: ApiKey, version: i16) -> bool {
    let max_legacy = match key {
        ApiKey::Produce => 2,
        ApiKey::Fetch => 3,
        ApiKey::ListOffsets => 0,
        ApiKey::OffsetCommit => 1,
        ApiKey::OffsetFetch => 0,
        ApiKey::CreateTopics => 1,
        ApiKey::DeleteTopics => 0,
        _ => return false,
    };
    (0..=max_legacy).contains(&version)
}

/// Decodes a legacy request body into the modern request struct.
pub fn decode_request(key: ApiKey, version: i16, body: &mut Bytes) -> Result<RequestKind, LegacyError> {
    Ok(match key {
        ApiKey::Produce => RequestKind::Produce(produce::decode_request(version, body)?),
        ApiKey::Fetch => RequestKind::Fetch(fetch::decode_request(version, body)?),
        ApiKey::ListOffsets => RequestKind::ListOffsets(list_offsets::decode_request(body)?),
        ApiKey::OffsetCommit => RequestKind::OffsetCommit(offset_commit::decode_request(version, body)?),
        ApiKey::OffsetFetch => RequestKind::OffsetFetch(offset_fetch::decode_request(body)?),
        ApiKey::CreateTopics => RequestKind::CreateTopics(create_topics::decode_request(version, body)?),
        ApiKey::DeleteTopics => RequestKind::DeleteTopics(delete_topics::decode_request(body)?),
        other => return Err(LegacyError::NoCodec(other, version)),
    })
}

/// Encodes a response body (no header) in the legacy layout of `version`.
pub fn encode_response(
    key: ApiKey,
    version: i16,
    response: &ResponseKind,
    out: &mut BytesMut,
) -> Result<(), LegacyError> {
    match (key, response) {
        (ApiKey::Produce, ResponseKind::Produce(r)) => produce::encode_response(version, r, out),
        (ApiKey::Fetch, ResponseKind::Fetch(r)) => fetch::encode_response(version, r, out),
        (ApiKey::ListOffsets, ResponseKind::ListOffsets(r)) => list_offsets::encode_response(r, out),
        (ApiKey::OffsetCommit, ResponseKind::OffsetCommit(r)) => offset_commit::encode_response(r, out),
        (ApiKey::OffsetFetch, ResponseKind::OffsetFetch(r)) => offset_fetch::encode_response(r, out),
        (ApiKey::CreateTopics, ResponseKind::CreateTopics(r)) => create_topics::encode_response(version, r, out),
        (ApiKey::DeleteTopics, ResponseKind::DeleteTopics(r)) => delete_topics::encode_response(r, out),
        _ => return Err(LegacyError::Mismatch),
    }
    Ok(())
}
