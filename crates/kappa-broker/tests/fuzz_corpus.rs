//! Replays the request decoder's fuzz corpus (`fuzz/corpus/request_decode/`) and seeds for
//! every advertised API key and version — a default-valued request, its truncations, and
//! seeded random bodies — through the function the fuzz target calls. Nothing may panic.

use std::path::Path;

use bytes::BytesMut;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::Encodable;
use kappa_broker::API_SUPPORT;
use kappa_broker::fuzzing::request_decode;

/// A default-valued request body for an advertised API, encoded at `version`.
fn default_body(key: ApiKey, version: i16) -> Option<Vec<u8>> {
    fn enc<T: Encodable + Default>(version: i16) -> Option<Vec<u8>> {
        let mut out = BytesMut::new();
        T::default().encode(&mut out, version).ok()?;
        Some(out.to_vec())
    }
    match key {
        ApiKey::Produce => enc::<ProduceRequest>(version),
        ApiKey::Fetch => enc::<FetchRequest>(version),
        ApiKey::ListOffsets => enc::<ListOffsetsRequest>(version),
        ApiKey::Metadata => enc::<MetadataRequest>(version),
        ApiKey::OffsetCommit => enc::<OffsetCommitRequest>(version),
        ApiKey::OffsetFetch => enc::<OffsetFetchRequest>(version),
        ApiKey::FindCoordinator => enc::<FindCoordinatorRequest>(version),
        ApiKey::JoinGroup => enc::<JoinGroupRequest>(version),
        ApiKey::Heartbeat => enc::<HeartbeatRequest>(version),
        ApiKey::LeaveGroup => enc::<LeaveGroupRequest>(version),
        ApiKey::SyncGroup => enc::<SyncGroupRequest>(version),
        ApiKey::DescribeGroups => enc::<DescribeGroupsRequest>(version),
        ApiKey::ListGroups => enc::<ListGroupsRequest>(version),
        ApiKey::ApiVersions => enc::<ApiVersionsRequest>(version),
        ApiKey::CreateTopics => enc::<CreateTopicsRequest>(version),
        ApiKey::DeleteTopics => enc::<DeleteTopicsRequest>(version),
        ApiKey::InitProducerId => enc::<InitProducerIdRequest>(version),
        ApiKey::AddPartitionsToTxn => enc::<AddPartitionsToTxnRequest>(version),
        ApiKey::AddOffsetsToTxn => enc::<AddOffsetsToTxnRequest>(version),
        ApiKey::EndTxn => enc::<EndTxnRequest>(version),
        ApiKey::TxnOffsetCommit => enc::<TxnOffsetCommitRequest>(version),
        ApiKey::DescribeConfigs => enc::<DescribeConfigsRequest>(version),
        ApiKey::AlterConfigs => enc::<AlterConfigsRequest>(version),
        ApiKey::CreatePartitions => enc::<CreatePartitionsRequest>(version),
        ApiKey::DeleteGroups => enc::<DeleteGroupsRequest>(version),
        ApiKey::OffsetDelete => enc::<OffsetDeleteRequest>(version),
        ApiKey::IncrementalAlterConfigs => enc::<IncrementalAlterConfigsRequest>(version),
        _ => None,
    }
}

/// A tiny deterministic generator, so seeds are the same on every run.
fn xorshift(state: &mut u64) -> u8 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state as u8
}

#[test]
fn every_advertised_key_and_version_decodes_without_panicking() {
    let mut pairs = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for (index, range) in API_SUPPORT.0.iter().enumerate() {
        for version in range.min..=range.max {
            let prefix = [index as u8, (version - range.min) as u8];
            let body = default_body(range.key, version).unwrap_or_default();
            // The whole default request, every truncation of it, and random bodies.
            for cut in 0..=body.len() {
                request_decode(&[&prefix[..], &body[..cut]].concat());
            }
            for len in [1usize, 7, 64, 300] {
                let random: Vec<u8> = (0..len).map(|_| xorshift(&mut rng)).collect();
                request_decode(&[&prefix[..], &random[..]].concat());
            }
            pairs += 1;
        }
    }
    assert!(pairs > 100, "expected every advertised version to be seeded, got {pairs}");
}

#[test]
fn the_committed_corpus_replays_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/request_decode");
    let Ok(entries) = std::fs::read_dir(&dir) else { panic!("missing corpus directory {}", dir.display()) };
    let mut replayed = 0;
    for entry in entries {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        request_decode(&bytes);
        replayed += 1;
    }
    assert!(replayed > 0, "the corpus is empty");
}
