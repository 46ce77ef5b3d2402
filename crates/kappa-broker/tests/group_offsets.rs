//! Offsets against the group coordinator: KIP-447 generation checks on TxnOffsetCommit v3+,
//! OffsetFetch's require_stable while a transaction holds an offset, and ListGroups' state
//! filter. Real broker, real log, raw protocol over sockets.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, ApiKey, EndTxnRequest, EndTxnResponse, GroupId,
    InitProducerIdRequest, InitProducerIdResponse, JoinGroupRequest, JoinGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetFetchRequest, OffsetFetchResponse, ProducerId, TopicName, TransactionalId,
    TxnOffsetCommitRequest, TxnOffsetCommitResponse,
};
use kafka_protocol::protocol::StrBytes;
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_coordinator::GroupConfig;
use kappa_log::{Log, LogOptions};
use tokio::net::{TcpListener, TcpStream};

mod common;

use common::call;

const ILLEGAL_GENERATION: i16 = 22;
const UNKNOWN_MEMBER_ID: i16 = 25;
const FENCED_INSTANCE_ID: i16 = 82;
const UNSTABLE_OFFSET_COMMIT: i16 = 88;

/// A broker serving on a loopback port (topic "in", 4 partitions), and a connection to it.
async fn serve() -> (tempfile::TempDir, TcpStream) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("in", 4, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = BrokerConfig {
        advertised_port: i32::from(addr.port()),
        group: GroupConfig { initial_rebalance_delay_ms: 0, ..GroupConfig::default() },
        ..BrokerConfig::default()
    };
    let broker = Broker::open(log, config).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    (dir, TcpStream::connect(addr).await.unwrap())
}

fn s(value: &'static str) -> StrBytes {
    StrBytes::from_static_str(value)
}

/// JoinGroup v3, or v5 for a static member: neither gets MEMBER_ID_REQUIRED.
async fn join(stream: &mut TcpStream, group: &'static str, instance: Option<&'static str>) -> JoinGroupResponse {
    let mut protocol = JoinGroupRequestProtocol::default();
    protocol.name = s("range");
    protocol.metadata = Bytes::from_static(b"meta");
    let mut request = JoinGroupRequest::default();
    request.group_id = GroupId(s(group));
    request.session_timeout_ms = 10_000;
    request.rebalance_timeout_ms = 10_000;
    request.group_instance_id = instance.map(s);
    request.protocol_type = s("consumer");
    request.protocols = vec![protocol];
    let version = if instance.is_some() { 5 } else { 3 };
    let joined: JoinGroupResponse = call(stream, ApiKey::JoinGroup, version, &request).await;
    assert_eq!(joined.error_code, 0);
    joined
}

/// A transactional producer ("tx") with the offsets partition in its open transaction.
async fn begin_offsets_txn(stream: &mut TcpStream, group: &'static str) -> (i64, i16) {
    let mut init = InitProducerIdRequest::default();
    init.transactional_id = Some(TransactionalId(s("tx")));
    init.transaction_timeout_ms = 60_000;
    let init: InitProducerIdResponse = call(stream, ApiKey::InitProducerId, 1, &init).await;
    assert_eq!(init.error_code, 0);
    let (pid, epoch) = (init.producer_id.0, init.producer_epoch);
    let mut add = AddOffsetsToTxnRequest::default();
    add.transactional_id = TransactionalId(s("tx"));
    add.producer_id = ProducerId(pid);
    add.producer_epoch = epoch;
    add.group_id = GroupId(s(group));
    let added: AddOffsetsToTxnResponse = call(stream, ApiKey::AddOffsetsToTxn, 0, &add).await;
    assert_eq!(added.error_code, 0);
    (pid, epoch)
}

/// Member identity of a TxnOffsetCommit v3: (generation, member id, instance id).
type Member<'a> = (i32, &'a str, Option<&'a str>);

/// TxnOffsetCommit v3 of `offset` for partition `partition` of "in"; the partition's code.
async fn txn_commit(
    stream: &mut TcpStream,
    (pid, epoch): (i64, i16),
    group: &'static str,
    (generation, member, instance): Member<'_>,
    partition: i32,
    offset: i64,
) -> i16 {
    let mut p = TxnOffsetCommitRequestPartition::default();
    p.partition_index = partition;
    p.committed_offset = offset;
    let mut topic = TxnOffsetCommitRequestTopic::default();
    topic.name = TopicName(s("in"));
    topic.partitions = vec![p];
    let mut request = TxnOffsetCommitRequest::default();
    request.transactional_id = TransactionalId(s("tx"));
    request.group_id = GroupId(s(group));
    request.producer_id = ProducerId(pid);
    request.producer_epoch = epoch;
    request.generation_id = generation;
    request.member_id = StrBytes::from_string(member.to_owned());
    request.group_instance_id = instance.map(|i| StrBytes::from_string(i.to_owned()));
    request.topics = vec![topic];
    let response: TxnOffsetCommitResponse = call(stream, ApiKey::TxnOffsetCommit, 3, &request).await;
    response.topics[0].partitions[0].error_code
}

async fn end_txn(stream: &mut TcpStream, (pid, epoch): (i64, i16), committed: bool) {
    let mut request = EndTxnRequest::default();
    request.transactional_id = TransactionalId(s("tx"));
    request.producer_id = ProducerId(pid);
    request.producer_epoch = epoch;
    request.committed = committed;
    let ended: EndTxnResponse = call(stream, ApiKey::EndTxn, 1, &request).await;
    assert_eq!(ended.error_code, 0);
}

/// OffsetFetch v7 of partitions `partitions` of "in": (partition, offset, code) each.
async fn fetch_offsets(
    stream: &mut TcpStream,
    group: &'static str,
    partitions: &[i32],
    require_stable: bool,
) -> Vec<(i32, i64, i16)> {
    let mut topic = OffsetFetchRequestTopic::default();
    topic.name = TopicName(s("in"));
    topic.partition_indexes = partitions.to_vec();
    let mut request = OffsetFetchRequest::default();
    request.group_id = GroupId(s(group));
    request.topics = Some(vec![topic]);
    request.require_stable = require_stable;
    let response: OffsetFetchResponse = call(stream, ApiKey::OffsetFetch, 7, &request).await;
    assert_eq!(response.error_code, 0);
    response.topics[0].partitions.iter().map(|p| (p.partition_index, p.committed_offset, p.error_code)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_offset_commits_from_outside_the_current_generation_are_refused() {
    let (_dir, mut stream) = serve().await;
    let joined = join(&mut stream, "g", None).await;
    let (generation, member) = (joined.generation_id, joined.member_id.to_string());
    let producer = begin_offsets_txn(&mut stream, "g").await;

    // A zombie whose consumer was rebalanced out: stale generation, or a member id the
    // group no longer knows. Neither offset may be stored.
    let stale = (generation - 1, member.as_str(), None);
    assert_eq!(txn_commit(&mut stream, producer, "g", stale, 0, 10).await, ILLEGAL_GENERATION);
    let gone = (generation, "gone-member", None);
    assert_eq!(txn_commit(&mut stream, producer, "g", gone, 1, 11).await, UNKNOWN_MEMBER_ID);
    // The current member, and a v0-2 style commit naming no member, are accepted.
    assert_eq!(txn_commit(&mut stream, producer, "g", (generation, &member, None), 2, 12).await, 0);
    assert_eq!(txn_commit(&mut stream, producer, "g", (-1, "", None), 3, 13).await, 0);

    // A static member replaced by a newer instance with the same group.instance.id.
    let first = join(&mut stream, "s", Some("instance-1")).await;
    let second = join(&mut stream, "s", Some("instance-1")).await;
    assert_ne!(first.member_id, second.member_id);
    let fenced = (second.generation_id, first.member_id.as_str(), Some("instance-1"));
    assert_eq!(txn_commit(&mut stream, producer, "s", fenced, 0, 20).await, FENCED_INSTANCE_ID);

    end_txn(&mut stream, producer, true).await;
    assert_eq!(
        fetch_offsets(&mut stream, "g", &[0, 1, 2, 3], false).await,
        vec![(0, -1, 0), (1, -1, 0), (2, 12, 0), (3, 13, 0)],
        "only the accepted commits took effect"
    );
    assert_eq!(fetch_offsets(&mut stream, "s", &[0], false).await, vec![(0, -1, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_stable_offset_fetch_waits_out_pending_transactional_offsets() {
    let (_dir, mut stream) = serve().await;
    let mut producer = begin_offsets_txn(&mut stream, "g").await;
    assert_eq!(txn_commit(&mut stream, producer, "g", (-1, "", None), 0, 10).await, 0);
    end_txn(&mut stream, producer, true).await;

    // Transaction 2 moves partition 0 on to 20 and is still open.
    producer = begin_offsets_txn(&mut stream, "g").await;
    assert_eq!(txn_commit(&mut stream, producer, "g", (-1, "", None), 0, 20).await, 0);
    assert_eq!(
        fetch_offsets(&mut stream, "g", &[0, 1], true).await,
        vec![(0, -1, UNSTABLE_OFFSET_COMMIT), (1, -1, 0)],
        "a read_committed consumer must not start from offset 10 and reprocess what transaction 2 consumed"
    );
    assert_eq!(fetch_offsets(&mut stream, "g", &[0], false).await, vec![(0, 10, 0)], "without require_stable");
    assert_eq!(fetch_offsets(&mut stream, "other", &[0], true).await, vec![(0, -1, 0)], "per group");

    end_txn(&mut stream, producer, false).await;
    assert_eq!(fetch_offsets(&mut stream, "g", &[0], true).await, vec![(0, 10, 0)], "aborted: stable again");
    producer = begin_offsets_txn(&mut stream, "g").await;
    assert_eq!(txn_commit(&mut stream, producer, "g", (-1, "", None), 0, 30).await, 0);
    end_txn(&mut stream, producer, true).await;
    assert_eq!(fetch_offsets(&mut stream, "g", &[0], true).await, vec![(0, 30, 0)]);
}

/// ListGroups v4 with `states` as the filter: the group ids listed, sorted.
async fn list_groups(stream: &mut TcpStream, states: &[&'static str]) -> Vec<String> {
    let mut request = ListGroupsRequest::default();
    request.states_filter = states.iter().map(|state| s(state)).collect();
    let response: ListGroupsResponse = call(stream, ApiKey::ListGroups, 4, &request).await;
    assert_eq!(response.error_code, 0);
    let mut groups: Vec<String> = response.groups.iter().map(|g| g.group_id.0.to_string()).collect();
    groups.sort();
    groups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_groups_v4_lists_only_the_states_asked_for() {
    let (_dir, mut stream) = serve().await;
    join(&mut stream, "joining", None).await;
    // "done" is known only by its committed offsets: Empty.
    let producer = begin_offsets_txn(&mut stream, "done").await;
    assert_eq!(txn_commit(&mut stream, producer, "done", (-1, "", None), 0, 5).await, 0);
    end_txn(&mut stream, producer, true).await;

    assert_eq!(list_groups(&mut stream, &[]).await, ["done", "joining"]);
    assert_eq!(list_groups(&mut stream, &["empty"]).await, ["done"], "matched case-insensitively");
    assert_eq!(list_groups(&mut stream, &["CompletingRebalance", "Stable"]).await, ["joining"]);
}
