//! Decoding whole requests and encoding whole responses.
//!
//! `Request`/`Response` are kafka-protocol's `RequestKind`/`ResponseKind`: legacy versions
//! decode into the same structs as modern ones, so handlers see one shape per API.
//!
//! kafka-protocol 0.18 pre-sizes vectors from wire counts before checking them (a tiny
//! frame announcing ~2^31 elements aborts the process); the workspace uses a patched copy
//! (vendor/kafka-protocol/KAPPA-PATCH.md) and `huge_array_counts_are_errors_not_aborts`
//! guards it. The patch also bounds what a decode builds in memory, which requests here
//! tie to their frame's size (`tests/decode_memory.rs`). The legacy codecs here check
//! every count first.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::Encodable;

use crate::api_versions::API_SUPPORT;
use crate::error::ProtocolError;
use crate::frame::{self, ResponseFrame};
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
    let budget = frame.len().saturating_mul(DECODED_BYTES_PER_FRAME_BYTE_MAX).saturating_add(DECODED_BYTES_FLOOR);
    kafka_protocol::protocol::budget::with_decode_budget(budget, || decode_within_budget(frame))
}

/// Memory a request's arrays and tagged fields may take, per byte of its frame. Real
/// clients' requests take under 8 (a Fetch partition: ~90 bytes for its 33 on the wire);
/// a frame of 2-byte elements would take ~50 per byte — gigabytes from one 100 MiB frame.
const DECODED_BYTES_PER_FRAME_BYTE_MAX: usize = 16;
/// What any request may take regardless of its size (many tiny elements in a small request).
const DECODED_BYTES_FLOOR: usize = 4 * 1024 * 1024;

fn decode_within_budget(frame: Bytes) -> Result<(RequestHeader, Request), ProtocolError> {
    let mut buf = frame;
    let (api_key, header) = decode_request_header(&mut buf)?;
    let version = header.request_api_version;
    let supported = API_SUPPORT.supports(api_key, version);
    if api_key == ApiKey::ApiVersions && !supported {
        return Ok((header, RequestKind::ApiVersions(ApiVersionsRequest::default())));
    }
    if !supported {
        return Err(ProtocolError::UnsupportedVersion { api_key: api_key as i16, version });
    }
    let body_error = |reason: String| ProtocolError::Body { api_key: api_key as i16, version, reason };
    let request = if legacy::handles(api_key, version) {
        legacy::decode_request(api_key, version, &mut buf).map_err(|e| body_error(e.to_string()))?
    } else {
        // kafka-protocol is generated code fed untrusted bytes: a panic in it must cost one
        // connection, not a worker thread.
        catch_unwind(AssertUnwindSafe(|| RequestKind::decode(api_key, &mut buf, version)))
            .map_err(|_| body_error("decoder panicked".into()))?
            .map_err(|e| body_error(e.to_string()))?
    };
    Ok((header, request))
}

/// How many topics, partitions, groups or resources a request names, counting a topic with
/// partitions by its partitions: what its handling costs is linear in this, and
/// [`crate::Limits::request_partitions_max`] bounds it.
pub fn partitions_named(request: &Request) -> usize {
    use RequestKind as Q;
    fn each<T>(items: &[T], parts: impl Fn(&T) -> usize) -> usize {
        items.iter().map(|item| parts(item).max(1)).sum()
    }
    match request {
        Q::Produce(r) => each(&r.topic_data, |t| t.partition_data.len()),
        Q::Fetch(r) => each(&r.topics, |t| t.partitions.len()) + each(&r.forgotten_topics_data, |t| t.partitions.len()),
        Q::ListOffsets(r) => each(&r.topics, |t| t.partitions.len()),
        Q::Metadata(r) => r.topics.as_ref().map_or(0, Vec::len),
        Q::OffsetCommit(r) => each(&r.topics, |t| t.partitions.len()),
        Q::OffsetFetch(r) => {
            r.topics.as_ref().map_or(0, |ts| each(ts, |t| t.partition_indexes.len()))
                + each(&r.groups, |g| g.topics.as_ref().map_or(0, |ts| each(ts, |t| t.partition_indexes.len())))
        }
        Q::TxnOffsetCommit(r) => each(&r.topics, |t| t.partitions.len()),
        Q::AddPartitionsToTxn(r) => each(&r.v3_and_below_topics, |t| t.partitions.len()),
        Q::DeleteRecords(r) => each(&r.topics, |t| t.partitions.len()),
        Q::OffsetDelete(r) => each(&r.topics, |t| t.partitions.len()),
        Q::CreateTopics(r) => each(&r.topics, |t| t.assignments.len()),
        Q::DeleteTopics(r) => r.topic_names.len() + r.topics.len(),
        Q::CreatePartitions(r) => each(&r.topics, |t| t.assignments.as_ref().map_or(0, Vec::len)),
        Q::DescribeConfigs(r) => each(&r.resources, |c| c.configuration_keys.as_ref().map_or(0, Vec::len)),
        Q::AlterConfigs(r) => each(&r.resources, |c| c.configs.len()),
        Q::IncrementalAlterConfigs(r) => each(&r.resources, |c| c.configs.len()),
        Q::DescribeGroups(r) => r.groups.len(),
        Q::DeleteGroups(r) => r.groups_names.len(),
        Q::ListGroups(r) => r.states_filter.len() + r.types_filter.len(),
        Q::LeaveGroup(r) => r.members.len(),
        Q::JoinGroup(r) => r.protocols.len(),
        Q::SyncGroup(r) => r.assignments.len(),
        _ => 0,
    }
}

/// Whether the client waits for an answer: Produce with acks=0 gets none.
pub fn expects_response(request: &Request) -> bool {
    !matches!(request, RequestKind::Produce(p) if p.acks == 0)
}

/// Encodes a response to `header` as a complete frame (size prefix, header, body).
pub fn encode_response(header: &RequestHeader, response: &Response) -> Result<Bytes, ProtocolError> {
    encode_response_frame(header, response).map(|frame| frame.to_bytes())
}

/// [`encode_response`] as the pieces to write: a fetch answer's large record sets are not
/// copied into the encoded fields but written from the buffers the log read them into.
pub fn encode_response_frame(header: &RequestHeader, response: &Response) -> Result<ResponseFrame, ProtocolError> {
    let key = header.request_api_key;
    let version = header.request_api_version;
    let api_key = ApiKey::try_from(key).map_err(|_| ProtocolError::UnknownApiKey(key))?;
    let mismatch = || ProtocolError::ResponseMismatch { request: key, response: response_key(response).unwrap_or(-1) };
    let encode_error = |reason: String| ProtocolError::Encode { api_key: key, version, reason };
    let header_version = response_header_version(api_key, version);
    let spliced_buf = |fetch: &kafka_protocol::messages::FetchResponse| {
        let records: Vec<Bytes> =
            fetch.responses.iter().flat_map(|t| &t.partitions).filter_map(|p| p.records.clone()).collect();
        let spliced: usize = records.iter().filter(|r| r.len() >= frame::SPLICE_BYTES_MIN).map(Bytes::len).sum();
        let mut out = frame::SpliceBuf::new(encoded_bytes_hint(response) - spliced, records);
        encode_response_header(out.head_mut(), header.correlation_id, header_version);
        out
    };
    if legacy::handles(api_key, version) {
        if let (ApiKey::Fetch, ResponseKind::Fetch(fetch)) = (api_key, response) {
            // Down-converted message sets, spliced as a modern answer's stored batches are.
            let mut out = spliced_buf(fetch);
            legacy::fetch::encode_response(version, fetch, &mut out);
            return Ok(out.finish());
        }
        let mut out = frame::start_frame(encoded_bytes_hint(response));
        encode_response_header(&mut out, header.correlation_id, header_version);
        legacy::encode_response(api_key, version, response, &mut out).map_err(|e| match e {
            legacy::LegacyError::Mismatch => mismatch(),
            other => encode_error(other.to_string()),
        })?;
        return Ok(frame::finish_frame(out).into());
    }
    if response_key(response) != Some(key) {
        return Err(mismatch());
    }
    if let ResponseKind::Fetch(fetch) = response {
        let mut out = spliced_buf(fetch);
        fetch.encode(&mut out, version).map_err(|e| encode_error(e.to_string()))?;
        return Ok(out.finish());
    }
    let mut out = frame::start_frame(encoded_bytes_hint(response));
    encode_response_header(&mut out, header.correlation_id, header_version);
    response.encode(&mut out, version).map_err(|e| encode_error(e.to_string()))?;
    Ok(frame::finish_frame(out).into())
}

/// Bytes reserved for a response's fields other than record data.
const RESPONSE_FIELDS_BYTES: usize = 1024;

/// About how large `response` encodes, so its buffer is sized once: record data dominates
/// a fetch answer and would otherwise be copied again each time the buffer grows.
fn encoded_bytes_hint(response: &Response) -> usize {
    let records = match response {
        ResponseKind::Fetch(fetch) => fetch
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.records.as_ref().map_or(0, |r| r.len()) + RESPONSE_FIELDS_BYTES / 4)
            .sum(),
        _ => 0,
    };
    records + RESPONSE_FIELDS_BYTES
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, BufMut, BytesMut};
    use kafka_protocol::messages::{MetadataRequest, MetadataResponse, ProduceResponse};
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use proptest::prelude::*;

    fn frame_of(key: ApiKey, version: i16, tagged: bool, body: &[u8]) -> Bytes {
        let mut header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(42)
            .with_client_id(Some(StrBytes::from_static_str("c")));
        if tagged {
            header = header.with_unknown_tagged_field(7, Bytes::from_static(b"xy"));
        }
        let mut out = BytesMut::new();
        header.encode(&mut out, key.request_header_version(version)).unwrap();
        out.put_slice(body);
        out.freeze()
    }

    #[test]
    fn flexible_header_with_tagged_fields_decodes() {
        let mut body = BytesMut::new();
        MetadataRequest::default().with_topics(None).encode(&mut body, 12).unwrap();
        let (header, request) = decode_request(frame_of(ApiKey::Metadata, 12, true, &body)).unwrap();
        assert_eq!((header.correlation_id, header.request_api_version), (42, 12));
        assert_eq!(header.unknown_tagged_fields.get(&7).map(|b| &b[..]), Some(&b"xy"[..]));
        assert!(matches!(request, RequestKind::Metadata(m) if m.topics.is_none()));
    }

    #[test]
    fn response_header_v0_and_v1() {
        let header =
            |v| RequestHeader::default().with_request_api_key(3).with_request_api_version(v).with_correlation_id(9);
        let resp = ResponseKind::Metadata(MetadataResponse::default());
        let mut v1 = encode_response(&header(1), &resp).unwrap();
        let mut v12 = encode_response(&header(12), &resp).unwrap();
        v1.advance(4);
        v12.advance(4);
        assert_eq!(v1.get_i32(), 9);
        assert_eq!(v12.get_i32(), 9);
        assert_eq!(v12.get_u8(), 0, "flexible response header: empty tag buffer");
    }

    #[test]
    fn fetch_answers_splice_large_record_sets_and_encode_the_same_bytes() {
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let partition = |index, records: Bytes| {
            let mut p = PartitionData::default();
            p.partition_index = index;
            p.records = Some(records);
            p
        };
        let big = Bytes::from(vec![7u8; frame::SPLICE_BYTES_MIN * 2]);
        let small = Bytes::from(vec![9u8; 100]);
        for version in [4, 11, 12, 16] {
            let mut topic = FetchableTopicResponse::default();
            topic.topic = kafka_protocol::messages::TopicName(StrBytes::from_static_str("t"));
            topic.topic_id = uuid::Uuid::from_u128(1);
            topic.partitions =
                vec![partition(0, big.clone()), partition(1, small.clone()), partition(2, big.slice(1..))];
            let mut fetch = FetchResponse::default();
            fetch.responses = vec![topic];
            let header = RequestHeader::default().with_request_api_key(1).with_request_api_version(version);
            let resp = ResponseKind::Fetch(fetch);
            let frame = encode_response_frame(&header, &resp).unwrap();
            // The large record sets are written from their own buffers, uncopied.
            let spliced = frame.parts.iter().filter(|p| p.as_ptr() == big.as_ptr() || p.as_ptr() == big[1..].as_ptr());
            assert_eq!(spliced.count(), 2, "v{version}");
            // Byte for byte what an encode into one buffer gives.
            let mut whole = BytesMut::new();
            whole.put_i32(0);
            encode_response_header(&mut whole, 0, response_header_version(ApiKey::Fetch, version));
            resp.encode(&mut whole, version).unwrap();
            let size = (whole.len() - 4) as i32;
            whole[..4].copy_from_slice(&size.to_be_bytes());
            assert_eq!(frame.to_bytes(), whole.freeze(), "v{version}");
            assert_eq!(frame.len(), frame.to_bytes().len());
        }
    }

    /// A fetch v0-3 answer's down-converted message sets are spliced too, not copied again
    /// into the frame.
    #[test]
    fn legacy_fetch_answers_splice_large_message_sets_and_encode_the_same_bytes() {
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        let partition = |index, records: Bytes| {
            let mut p = PartitionData::default();
            p.partition_index = index;
            p.records = Some(records);
            p
        };
        let mut set = BytesMut::new();
        for offset in 0..4 {
            legacy::message_set::encode_message(
                &mut set,
                offset,
                1,
                0,
                1,
                None,
                Some(&[7u8; frame::SPLICE_BYTES_MIN / 2]),
            );
        }
        let big = set.freeze();
        let mut small = BytesMut::new();
        legacy::message_set::encode_message(&mut small, 0, 1, 0, 1, None, Some(b"v"));
        for version in 0..=3 {
            let mut topic = FetchableTopicResponse::default();
            topic.topic = kafka_protocol::messages::TopicName(StrBytes::from_static_str("t"));
            topic.partitions = vec![partition(0, big.clone()), partition(1, small.clone().freeze())];
            let mut fetch = FetchResponse::default();
            fetch.responses = vec![topic];
            let header = RequestHeader::default().with_request_api_key(1).with_request_api_version(version);
            let resp = ResponseKind::Fetch(fetch);
            let frame = encode_response_frame(&header, &resp).unwrap();
            assert_eq!(frame.parts.iter().filter(|p| p.as_ptr() == big.as_ptr()).count(), 1, "v{version}");
            let mut whole = BytesMut::new();
            whole.put_i32(0);
            encode_response_header(&mut whole, 0, response_header_version(ApiKey::Fetch, version));
            legacy::encode_response(ApiKey::Fetch, version, &resp, &mut whole).unwrap();
            let size = (whole.len() - 4) as i32;
            whole[..4].copy_from_slice(&size.to_be_bytes());
            assert_eq!(frame.to_bytes(), whole.freeze(), "v{version}");
            assert_eq!(frame.len(), frame.to_bytes().len());
        }
    }

    #[test]
    fn mismatched_response_is_an_error() {
        let header = RequestHeader::default().with_request_api_key(3).with_request_api_version(1);
        let resp = ResponseKind::Produce(ProduceResponse::default());
        assert!(matches!(encode_response(&header, &resp), Err(ProtocolError::ResponseMismatch { .. })));
        let legacy = RequestHeader::default().with_request_api_key(0).with_request_api_version(2);
        let resp = ResponseKind::Metadata(MetadataResponse::default());
        assert!(matches!(encode_response(&legacy, &resp), Err(ProtocolError::ResponseMismatch { .. })));
    }

    #[test]
    fn unsupported_versions_are_errors_except_api_versions() {
        let err = decode_request(frame_of(ApiKey::Fetch, 13, false, &[])).unwrap_err();
        assert!(matches!(err, ProtocolError::UnsupportedVersion { api_key: 1, version: 13 }));
        let (header, req) = decode_request(frame_of(ApiKey::ApiVersions, 4, false, &[1, 2, 3])).unwrap();
        assert_eq!(header.request_api_version, 4);
        assert!(matches!(req, RequestKind::ApiVersions(_)));
        assert!(matches!(
            decode_request(Bytes::from_static(&[0x03, 0xe7, 0, 0])),
            Err(ProtocolError::UnknownApiKey(999))
        ));
    }

    /// Without the vendored kafka-protocol patch this aborts the test process.
    #[test]
    fn huge_array_counts_are_errors_not_aborts() {
        let frame = frame_of(ApiKey::Metadata, 0, false, &[0x7f, 0xff, 0xff, 0xff, 0]);
        assert!(matches!(decode_request(frame), Err(ProtocolError::Body { .. })));
        // Flexible: compact array length as an unsigned varint (0xffffffff).
        let frame = frame_of(ApiKey::Metadata, 12, false, &[0xff, 0xff, 0xff, 0xff, 0x0f, 0]);
        assert!(matches!(decode_request(frame), Err(ProtocolError::Body { .. })));
        let frame = frame_of(
            ApiKey::JoinGroup,
            5,
            false,
            &[0, 1, b'g', 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff],
        );
        assert!(matches!(decode_request(frame), Err(ProtocolError::Body { .. })));
    }

    const LEGACY: [(ApiKey, i16); 13] = [
        (ApiKey::Produce, 0),
        (ApiKey::Produce, 1),
        (ApiKey::Produce, 2),
        (ApiKey::Fetch, 0),
        (ApiKey::Fetch, 1),
        (ApiKey::Fetch, 2),
        (ApiKey::Fetch, 3),
        (ApiKey::ListOffsets, 0),
        (ApiKey::OffsetCommit, 0),
        (ApiKey::OffsetCommit, 1),
        (ApiKey::OffsetFetch, 0),
        (ApiKey::CreateTopics, 0),
        (ApiKey::DeleteTopics, 0),
    ];

    proptest! {
        // Fuzz-style: random bodies for every legacy codec must fail cleanly, never panic.
        #[test]
        fn legacy_decoders_never_panic(which in 0usize..13, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (key, version) = LEGACY[which];
            let _ = decode_request(frame_of(key, version, false, &body));
        }
    }
}
