//! The one table of supported API versions, and the ApiVersions answer built from it.
//!
//! The same table answers ApiVersions and rejects unsupported versions of every other
//! request, so what is advertised is exactly what is accepted.

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse, RequestHeader};
use kafka_protocol::protocol::Encodable;

use crate::frame;
use crate::header::encode_response_header;

/// Room reserved for an encoded ApiVersions answer (it grows if the table ever outgrows it).
const API_VERSIONS_RESPONSE_BYTES: usize = 1024;

/// UNSUPPORTED_VERSION.
pub const UNSUPPORTED_VERSION: i16 = 35;

/// Supported versions of one API (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRange {
    pub key: ApiKey,
    pub min: i16,
    pub max: i16,
}

const fn range(key: ApiKey, min: i16, max: i16) -> ApiRange {
    ApiRange { key, min, max }
}

/// Which API versions the broker speaks, in key order.
#[derive(Debug, Clone, Copy)]
pub struct ApiSupport(pub &'static [ApiRange]);

/// The broker's advertised APIs (see /work/shared/kafka-clients.md, "suggested advertise").
///
/// Caps: Fetch ≤ 12 and Produce ≤ 11 keep clients on topic names (v13 = topic ids);
/// ListOffsets/OffsetCommit/OffsetFetch/CreateTopics/DeleteTopics start at 0 because the
/// legacy codecs cover the versions kafka-protocol dropped; min stays low because KafkaJS,
/// kafka-node and kafka-python ignore the broker's min.
pub const API_SUPPORT: ApiSupport = ApiSupport(&[
    range(ApiKey::Produce, 0, 11),
    range(ApiKey::Fetch, 0, 12),
    range(ApiKey::ListOffsets, 0, 7),
    range(ApiKey::Metadata, 0, 12),
    range(ApiKey::OffsetCommit, 0, 8),
    range(ApiKey::OffsetFetch, 0, 7),
    range(ApiKey::FindCoordinator, 0, 3),
    range(ApiKey::JoinGroup, 0, 7),
    range(ApiKey::Heartbeat, 0, 4),
    range(ApiKey::LeaveGroup, 0, 4),
    range(ApiKey::SyncGroup, 0, 5),
    range(ApiKey::DescribeGroups, 0, 4),
    range(ApiKey::ListGroups, 0, 4),
    range(ApiKey::ApiVersions, 0, 3),
    range(ApiKey::CreateTopics, 0, 7),
    range(ApiKey::DeleteTopics, 0, 5),
    range(ApiKey::DeleteRecords, 0, 2),
    range(ApiKey::InitProducerId, 0, 4),
    range(ApiKey::AddPartitionsToTxn, 0, 3),
    range(ApiKey::AddOffsetsToTxn, 0, 3),
    range(ApiKey::EndTxn, 0, 3),
    range(ApiKey::TxnOffsetCommit, 0, 3),
    range(ApiKey::DescribeConfigs, 1, 4), // v0 dropped by KIP-896; KafkaJS/kafka-node pick 2
    range(ApiKey::AlterConfigs, 0, 2),
    range(ApiKey::CreatePartitions, 0, 3),
    range(ApiKey::DeleteGroups, 0, 2),
    range(ApiKey::IncrementalAlterConfigs, 0, 1),
    range(ApiKey::OffsetDelete, 0, 0),
]);

impl ApiSupport {
    pub fn range(&self, key: ApiKey) -> Option<ApiRange> {
        self.0.iter().copied().find(|r| r.key == key)
    }

    pub fn supports(&self, key: ApiKey, version: i16) -> bool {
        self.range(key).is_some_and(|r| (r.min..=r.max).contains(&version))
    }

    pub fn iter(&self) -> impl Iterator<Item = ApiRange> + '_ {
        self.0.iter().copied()
    }

    fn api_keys(&self) -> Vec<ApiVersion> {
        self.iter()
            .map(|r| ApiVersion::default().with_api_key(r.key as i16).with_min_version(r.min).with_max_version(r.max))
            .collect()
    }

    /// The ApiVersions response body for this table, error 0.
    pub fn response(&self) -> ApiVersionsResponse {
        // Defaults leave every tagged field (features, epochs) unset, so none is emitted.
        ApiVersionsResponse::default().with_api_keys(self.api_keys())
    }
}

/// Answers an ApiVersions request as a complete frame (size prefix included).
///
/// A version outside the table gets error 35 in the v0 layout with the full key list, so
/// that librdkafka / kafka-python can retry with our max and KafkaJS can walk down.
pub fn answer(support: &ApiSupport, header: &RequestHeader) -> Bytes {
    let version = header.request_api_version;
    let (body, body_version) = if support.supports(ApiKey::ApiVersions, version) {
        (support.response(), version)
    } else {
        (support.response().with_error_code(UNSUPPORTED_VERSION), 0)
    };
    let mut out = frame::start_frame(API_VERSIONS_RESPONSE_BYTES);
    encode_response_header(&mut out, header.correlation_id, 0);
    body.encode(&mut out, body_version).expect("ApiVersions v0..=3 encodes any table");
    frame::finish_frame(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy;

    /// Every advertised version must be decodable: by kafka-protocol or by a legacy codec.
    #[test]
    fn every_advertised_version_has_a_codec() {
        for r in API_SUPPORT.iter() {
            let valid = r.key.valid_versions();
            for v in r.min..=r.max {
                let ok = (valid.min..=valid.max).contains(&v) || legacy::handles(r.key, v);
                assert!(ok, "{:?} v{v} is advertised but has no codec", r.key);
            }
        }
    }

    #[test]
    fn table_is_sorted_and_unique() {
        let keys: Vec<i16> = API_SUPPORT.iter().map(|r| r.key as i16).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(API_SUPPORT.iter().all(|r| r.min <= r.max));
    }
}
