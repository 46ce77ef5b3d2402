//! Errors of the protocol layer. Every variant says what was wrong with which request.

use thiserror::Error;

/// Why a frame or request could not be read, decoded or answered.
///
/// All of these close the offending connection (Kafka has no way to answer a request it
/// cannot parse), except where the server says otherwise (ApiVersions answers error 35).
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("request frame of {size} bytes exceeds request_bytes_max ({max} bytes)")]
    FrameTooLarge { size: i64, max: usize },
    #[error("request frame size {0} is too small to hold a request header")]
    FrameTooSmall(i32),
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error("frame of {size} bytes not complete within {timeout:?} of its size ({received} bytes arrived)")]
    FrameReadTimeout { size: usize, received: usize, timeout: std::time::Duration },
    #[error("a frame's 4-byte size not complete within {timeout:?} of its first byte ({received} bytes arrived)")]
    SizeReadTimeout { received: usize, timeout: std::time::Duration },
    #[error(
        "the peer took no bytes of a reply for {timeout:?} (response_write_timeout); closing the connection, which a client that stopped reading holds open"
    )]
    ResponseWriteTimeout { timeout: std::time::Duration },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("unknown api key {0}")]
    UnknownApiKey(i16),
    #[error("api key {api_key} version {version} is not supported by this broker")]
    UnsupportedVersion { api_key: i16, version: i16 },
    #[error(
        "request names {named} topics/partitions/groups, more than request_partitions_max ({max}); split it into smaller requests"
    )]
    TooManyPartitions { named: usize, max: usize },
    #[error("malformed request header: {0}")]
    Header(String),
    #[error("malformed request body (api key {api_key} version {version}): {reason}")]
    Body { api_key: i16, version: i16, reason: String },
    #[error("cannot encode response (api key {api_key} version {version}): {reason}")]
    Encode { api_key: i16, version: i16, reason: String },
    #[error("handler answered api key {request} with a response for api key {response}")]
    ResponseMismatch { request: i16, response: i16 },
    /// As Kafka does: an acks=0 producer gets no answer, so a closed connection is how it
    /// learns to refresh its metadata (a deleted topic, a missing partition).
    #[error(
        "an acks=0 produce failed with error {code} on {topic}-{partition}; closing the connection so the producer notices"
    )]
    UnansweredProduceFailed { code: i16, topic: String, partition: i32 },
}
