//! Decoding whole requests and encoding whole responses.
//!
//! `Request`/`Response` are kafka-protocol's `RequestKind`/`ResponseKind`: legacy versions
//! decode into the same structs as modern ones, so handlers see one shape per API.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, RequestHeader, RequestKind, ResponseKind,
};

use crate::api_versions::API_SUPPORT;
use crate::error::ProtocolError;
use crate::frame;
use crate::header::{decode_request_header, encode_response_header, response_header_version};
use crate::legacy;

/// A decoded request body.
pub type Request = RequestKind;
/// A response body, encoded at the request's version.
pub type Response = ResponseKind;

/// Decodes one frame body (without its size prefix) into header and request.
///
/// ApiVersions decodes even at versions the broker does not support (as an empty request)
/// because the answer to that is error 35, not a closed connection. Any other unsupported
/// version is an error. Trailing bytes after a body are ignored, as Kafka does.
pub fn decode_request(frame: Bytes) -> Result<(RequestHeader, Request), ProtocolError> {
    let mut buf = frame;
    let (api_key, header) = decode_request_header(&mut buf)?;
    let version = header.request_api_version;
    let supported = API_SUPPORT.supports(api_key, version);
    if api_key == ApiKey::ApiVersions && !supported {
        return Ok((
            header,
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ));
    }
    if !supported {
        return Err(ProtocolError::UnsupportedVersion {
            api_key: api_key as i16,
            version,
        });
    }
    let body_error = |reason: String| ProtocolError::Body {
        api_key: api_key as i16,
        version,
        reason,
    };
    let request = if legacy::handles(api_key, version) {
        legacy::decode_request(api_key, version, &mut buf).map_err(|e| body_error(e.to_string()))?
    } else {
        // kafka-protocol is generated code fed untrusted bytes: a panic in it must cost one
        // connection, not a worker thread.
        catch_unwind(AssertUnwindSafe(|| {
            RequestKind::decode(api_key, &mut buf, version)
        }))
        .map_err(|_| body_error("decoder panicked".into()))?
        .map_err(|e| body_error(e.to_string()))?
    };
    Ok((header, request))
}

/// Whether the client waits for an answer: Produce with acks=0 gets none.
pub fn expects_response(request: &Request) -> bool {
    !matches!(request, RequestKind::Produce(p) if p.acks == 0)
}

/// Encodes a response to `header` as a complete frame (size prefix, header, body).
pub fn encode_response(
    header: &RequestHeader,
    response: &Response,
) -> Result<Bytes, ProtocolError> {
    let key = header.request_api_key;
    let version = header.request_api_version;
    let api_key = ApiKey::try_from(key).map_err(|_| ProtocolError::UnknownApiKey(key))?;
    let mismatch = || ProtocolError::ResponseMismatch {
        request: key,
        response: response_key(response).unwrap_or(-1),
    };
    let encode_error = |reason: String| ProtocolError::Encode {
        api_key: key,
        version,
        reason,
    };
    let mut out = BytesMut::new();
    encode_response_header(
        &mut out,
        header.correlation_id,
        response_header_version(api_key, version),
    );
    if legacy::handles(api_key, version) {
        legacy::encode_response(api_key, version, response, &mut out).map_err(|e| match e {
            legacy::LegacyError::Mismatch => mismatch(),
            other => encode_error(other.to_string()),
        })?;
    } else {
        if response_key(response) != Some(key) {
            return Err(mismatch());
        }
        response
            .encode(&mut out, version)
            .map_err(|e| encode_error(e.to_string()))?;
    }
    Ok(frame::frame(&out))
}

/// The api key of a response, for the APIs the broker can advertise.
fn response_key(response: &Response) -> Option<i16> {
    use ResponseKind as R;
    let key = match response {
        R::Produce(_) => ApiKey::Produce,
        R::Fetch(_) => ApiKey::Fetch,
        R::ListOffsets(_) => ApiKey::ListOffsets,
        R::Metadata(_) => ApiKey::Metadata,
        R::OffsetCommit(_) => ApiKey::OffsetCommit,
        R::OffsetFetch(_) => ApiKey::OffsetFetch,
        R::FindCoordinator(_) => ApiKey::FindCoordinator,
        R::JoinGroup(_) => ApiKey::JoinGroup,
        R::Heartbeat(_) => ApiKey::Heartbeat,
        R::LeaveGroup(_) => ApiKey::LeaveGroup,
        R::SyncGroup(_) => ApiKey::SyncGroup,
        R::DescribeGroups(_) => ApiKey::DescribeGroups,
        R::ListGroups(_) => ApiKey::ListGroups,
        R::SaslHandshake(_) => ApiKey::SaslHandshake,
        R::ApiVersions(_) => ApiKey::ApiVersions,
        R::CreateTopics(_) => ApiKey::CreateTopics,
        R::DeleteTopics(_) => ApiKey::DeleteTopics,
        R::DeleteRecords(_) => ApiKey::DeleteRecords,
        R::InitProducerId(_) => ApiKey::InitProducerId,
        R::OffsetForLeaderEpoch(_) => ApiKey::OffsetForLeaderEpoch,
        R::AddPartitionsToTxn(_) => ApiKey::AddPartitionsToTxn,
        R::AddOffsetsToTxn(_) => ApiKey::AddOffsetsToTxn,
        R::EndTxn(_) => ApiKey::EndTxn,
        R::WriteTxnMarkers(_) => ApiKey::WriteTxnMarkers,
        R::TxnOffsetCommit(_) => ApiKey::TxnOffsetCommit,
        R::DescribeAcls(_) => ApiKey::DescribeAcls,
        R::DescribeConfigs(_) => ApiKey::DescribeConfigs,
        R::AlterConfigs(_) => ApiKey::AlterConfigs,
        R::CreatePartitions(_) => ApiKey::CreatePartitions,
        R::DeleteGroups(_) => ApiKey::DeleteGroups,
        R::OffsetDelete(_) => ApiKey::OffsetDelete,
        R::DescribeCluster(_) => ApiKey::DescribeCluster,
        R::DescribeProducers(_) => ApiKey::DescribeProducers,
        R::DescribeTransactions(_) => ApiKey::DescribeTransactions,
        R::ListTransactions(_) => ApiKey::ListTransactions,
        R::IncrementalAlterConfigs(_) => ApiKey::IncrementalAlterConfigs,
        _ => return None,
    };
    Some(key as i16)
}
