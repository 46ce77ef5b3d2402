//! Requests against a real broker over sockets: per-request limits, the answers Kafka gives
//! for edge cases (admin, groups, legacy ListOffsets). Raw protocol, real log.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableReplicaAssignment, CreatableTopic};
use kafka_protocol::messages::delete_records_request::{DeleteRecordsPartition, DeleteRecordsTopic};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::offset_delete_request::{OffsetDeleteRequestPartition, OffsetDeleteRequestTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteRecordsRequest, DeleteRecordsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    DescribeGroupsRequest, DescribeGroupsResponse, GroupId, ListGroupsRequest, ListGroupsResponse, MetadataRequest,
    MetadataResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse,
    ProduceResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Log, LogOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

use common::call;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;

struct Running {
    _dir: tempfile::TempDir,
    log: Arc<Log>,
    addr: SocketAddr,
}

impl Running {
    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }
}

/// A broker on a loopback port (topic "in", 2 partitions) with `limits`.
async fn serve(limits: Limits) -> Running {
    serve_with(BrokerConfig::default(), limits).await
}

/// [`serve`] with broker settings; also a compacted topic "compacted".
async fn serve_with(config: BrokerConfig, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("in", 2, &Default::default()).unwrap();
    let compact = [("cleanup.policy".to_owned(), "compact".to_owned())].into_iter().collect();
    log.create_topic("compacted", 1, &compact).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = BrokerConfig { advertised_port: i32::from(addr.port()), ..config };
    let broker = Broker::open(log.clone(), config).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, limits, std::future::pending::<()>()));
    Running { _dir: dir, log, addr }
}

fn s(value: impl Into<String>) -> StrBytes {
    StrBytes::from_string(value.into())
}

fn topic_name(value: impl Into<String>) -> TopicName {
    TopicName(s(value))
}

/// Whether the broker closed `stream` (EOF or reset) rather than answering.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut byte)).await;
    matches!(read.expect("the broker answers or closes in time"), Ok(0) | Err(_))
}

/// An OffsetCommit v2 for partition 0 of each of `topics`.
fn offset_commit(topics: impl Iterator<Item = String>) -> OffsetCommitRequest {
    let mut request = OffsetCommitRequest::default();
    request.group_id = GroupId(s("g"));
    request.generation_id_or_member_epoch = -1;
    request.retention_time_ms = -1;
    request.topics = topics
        .map(|name| {
            let mut p = OffsetCommitRequestPartition::default();
            p.partition_index = 0;
            p.committed_offset = 1;
            let mut t = OffsetCommitRequestTopic::default();
            t.name = topic_name(name);
            t.partitions = vec![p];
            t
        })
        .collect();
    request
}

/// 100,000 topics in one request: each is answered, in order. (Finding each topic's answer
/// by a scan made this quadratic: minutes of a core, past the response timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_many_topics_is_answered_for_each() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let count = Limits::default().request_partitions_max;
    let request = offset_commit((0..count).map(|i| format!("missing-{i}")));
    let response: OffsetCommitResponse = call(&mut stream, ApiKey::OffsetCommit, 2, &request).await;
    assert_eq!(response.topics.len(), count);
    for (i, topic) in response.topics.iter().enumerate() {
        assert_eq!(topic.name.0.as_str(), format!("missing-{i}"));
        assert_eq!(topic.partitions.len(), 1);
        assert_eq!(topic.partitions[0].error_code, UNKNOWN_TOPIC_OR_PARTITION);
    }
}

/// Past `request_partitions_max` a request closes its connection; at it, it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_more_partitions_than_the_limit_closes_its_connection() {
    let broker = serve(Limits { request_partitions_max: 10, ..Limits::default() }).await;
    let metadata = |n: usize| {
        MetadataRequest::default().with_topics(Some(
            (0..n)
                .map(|i| {
                    kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                        .with_name(Some(topic_name(format!("in{i}"))))
                })
                .collect(),
        ))
    };
    let mut stream = broker.connect().await;
    let response: MetadataResponse = call(&mut stream, ApiKey::Metadata, 1, &metadata(10)).await;
    assert_eq!(response.topics.len(), 10);

    let mut stream = broker.connect().await;
    stream.write_all(&common::frame(ApiKey::Metadata, 1, 1, &metadata(11))).await.unwrap();
    assert!(closed(&mut stream).await);
    let mut stream = broker.connect().await;
    let request = offset_commit((0..11).map(|i| format!("t{i}")));
    stream.write_all(&common::frame(ApiKey::OffsetCommit, 2, 1, &request)).await.unwrap();
    assert!(closed(&mut stream).await);
    // Only those connections.
    let mut stream = broker.connect().await;
    let response: MetadataResponse = call(&mut stream, ApiKey::Metadata, 1, &metadata(1)).await;
    assert_eq!(response.topics.len(), 1);
}

const INVALID_TOPIC_EXCEPTION: i16 = 17;
const INVALID_PARTITIONS: i16 = 37;
const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
const INVALID_REQUEST: i16 = 42;
const POLICY_VIOLATION: i16 = 44;
const GROUP_ID_NOT_FOUND: i16 = 69;
const INVALID_RECORD: i16 = 87;
const UNKNOWN_TOPIC_ID: i16 = 100;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn describe_broker(name: &str, keys: Option<&[&'static str]>) -> DescribeConfigsResource {
    let mut resource = DescribeConfigsResource::default();
    resource.resource_type = RESOURCE_BROKER;
    resource.resource_name = s(name);
    resource.configuration_keys = keys.map(|keys| keys.iter().map(|k| StrBytes::from_static_str(k)).collect());
    resource
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_configs_answers_this_brokers_settings() {
    let config = BrokerConfig { default_partitions: 3, ..BrokerConfig::default() };
    let broker = serve_with(config, Limits::default()).await;
    let mut stream = broker.connect().await;
    let mut request = DescribeConfigsRequest::default();
    request.resources = vec![
        describe_broker("0", None),
        describe_broker("0", Some(&["num.partitions"])),
        describe_broker("", None),
        describe_broker("7", None),
    ];
    for version in [1, 4] {
        let response: DescribeConfigsResponse = call(&mut stream, ApiKey::DescribeConfigs, version, &request).await;
        let [all, one, cluster, other] = &response.results[..] else { panic!("four results") };
        let entry = |name: &str| {
            let c = all.configs.iter().find(|c| c.name.as_str() == name).unwrap_or_else(|| panic!("{name} listed"));
            (c.value.as_ref().map(|v| v.as_str().to_owned()).unwrap(), c.config_source, c.read_only)
        };
        assert_eq!(all.error_code, 0);
        assert_eq!(entry("num.partitions"), ("3".to_owned(), SOURCE_STATIC_BROKER, true));
        assert_eq!(entry("auto.create.topics.enable"), ("true".to_owned(), SOURCE_DEFAULT, true));
        assert_eq!(entry("broker.id").0, "0");
        assert_eq!(entry("default.replication.factor").0, "1");
        assert_eq!(entry("offsets.topic.replication.factor").0, "1");
        assert_eq!(entry("transaction.state.log.replication.factor").0, "1");
        assert_eq!(entry("min.insync.replicas").0, "1");
        assert!(entry("message.max.bytes").0.parse::<i64>().unwrap() > 0);
        assert!(entry("log.retention.ms").0.parse::<i64>().is_ok());
        let names: Vec<&str> = one.configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["num.partitions"]);
        assert_eq!((cluster.error_code, cluster.configs.len()), (0, 0), "no dynamic cluster defaults");
        assert_eq!(other.error_code, INVALID_REQUEST);
        assert!(other.error_message.as_ref().unwrap().contains("Unexpected broker id"));
    }
}

/// Produces `count` records with timestamps 1000, 1001, ... to partition 0 of `topic`.
async fn produce_records(stream: &mut TcpStream, topic: &'static str, count: i64) {
    let mut batch = BatchBuilder::new();
    for i in 0..count {
        batch.push(NewRecord::new(Some(b"k"), Some(b"v"), 1000 + i));
    }
    let response: ProduceResponse =
        call(stream, ApiKey::Produce, 7, &common::produce_request(topic, batch.build(), None)).await;
    assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
}

/// A raw ListOffsets v0 for partition 0 of "in": the old-style offsets answered.
async fn list_offsets_v0(stream: &mut TcpStream, timestamp: i64) -> Vec<i64> {
    let mut body = BytesMut::new();
    let header = kafka_protocol::messages::RequestHeader::default()
        .with_request_api_key(ApiKey::ListOffsets as i16)
        .with_request_api_version(0)
        .with_correlation_id(3)
        .with_client_id(Some(s("kafka-node")));
    header.encode(&mut body, 1).unwrap();
    body.put_i32(-1); // replica id
    body.put_i32(1);
    body.put_i16(2);
    body.put_slice(b"in");
    body.put_i32(1);
    body.put_i32(0); // partition
    body.put_i64(timestamp);
    body.put_i32(1); // max_num_offsets
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await.unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).await.unwrap();
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut response).await.unwrap();
    let mut r = bytes::Bytes::from(response);
    assert_eq!(r.get_i32(), 3, "correlation id");
    assert_eq!(r.get_i32(), 1, "one topic");
    let name_len = r.get_i16() as usize;
    r.advance(name_len);
    assert_eq!(r.get_i32(), 1, "one partition");
    assert_eq!((r.get_i32(), r.get_i16()), (0, 0), "partition 0, no error");
    (0..r.get_i32()).map(|_| r.get_i64()).collect()
}

/// kafka-node's `Offset.fetch` asks v0 with `Date.now()`: Kafka answers the end of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_v0_answers_offsets_before_a_time() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    produce_records(&mut stream, "in", 3).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert_eq!(list_offsets_v0(&mut stream, now).await, [3]);
    assert_eq!(list_offsets_v0(&mut stream, -1).await, [3]);
    assert_eq!(list_offsets_v0(&mut stream, -2).await, [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_only_groups_are_listed_as_kafka_lists_them() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let mut delete = OffsetDeleteRequest::default();
    delete.group_id = GroupId(s("nobody"));
    let mut topic = OffsetDeleteRequestTopic::default();
    topic.name = topic_name("in");
    topic.partitions = vec![OffsetDeleteRequestPartition::default()];
    delete.topics = vec![topic];
    let response: OffsetDeleteResponse = call(&mut stream, ApiKey::OffsetDelete, 0, &delete).await;
    assert_eq!(response.error_code, GROUP_ID_NOT_FOUND, "a group with no offsets and no members");

    let committed: OffsetCommitResponse =
        call(&mut stream, ApiKey::OffsetCommit, 2, &offset_commit(["in".to_owned()].into_iter())).await;
    assert_eq!(committed.topics[0].partitions[0].error_code, 0);
    let listed: ListGroupsResponse = call(&mut stream, ApiKey::ListGroups, 4, &ListGroupsRequest::default()).await;
    let g = listed.groups.iter().find(|g| g.group_id.0.as_str() == "g").expect("g listed");
    assert_eq!((g.protocol_type.as_str(), g.group_state.as_str()), ("", "Empty"));
    let described: DescribeGroupsResponse = call(
        &mut stream,
        ApiKey::DescribeGroups,
        4,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    )
    .await;
    assert_eq!(described.groups[0].protocol_type.as_str(), "");
    delete.group_id = GroupId(s("g"));
    let response: OffsetDeleteResponse = call(&mut stream, ApiKey::OffsetDelete, 0, &delete).await;
    assert_eq!(response.error_code, 0, "a group with offsets exists");
}

async fn delete_records(stream: &mut TcpStream, topic: &str) -> i16 {
    let mut partition = DeleteRecordsPartition::default();
    partition.offset = 0;
    let mut t = DeleteRecordsTopic::default();
    t.name = topic_name(topic);
    t.partitions = vec![partition];
    let mut request = DeleteRecordsRequest::default();
    request.topics = vec![t];
    request.timeout_ms = 1000;
    let response: DeleteRecordsResponse = call(stream, ApiKey::DeleteRecords, 1, &request).await;
    response.topics[0].partitions[0].error_code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_records_refuses_internal_and_compacted_topics_as_kafka_does() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    assert_eq!(delete_records(&mut stream, "__consumer_offsets").await, INVALID_TOPIC_EXCEPTION);
    assert_eq!(delete_records(&mut stream, "compacted").await, POLICY_VIOLATION);
    assert_eq!(delete_records(&mut stream, "in").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_only_create_partitions_checks_what_the_real_call_does() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    for (count, validate_only, code) in
        [(20_000, true, INVALID_PARTITIONS), (1, true, INVALID_PARTITIONS), (3, true, 0)]
    {
        let mut topic = CreatePartitionsTopic::default();
        topic.name = topic_name("in");
        topic.count = count;
        let mut request = CreatePartitionsRequest::default();
        request.topics = vec![topic];
        request.validate_only = validate_only;
        let response: CreatePartitionsResponse = call(&mut stream, ApiKey::CreatePartitions, 1, &request).await;
        assert_eq!(response.results[0].error_code, code, "{count} partitions");
    }
}

fn assigned_topic(name: &str, partitions: i32, replication_factor: i16, brokers: &[i32]) -> CreatableTopic {
    let mut topic = CreatableTopic::default();
    topic.name = topic_name(name);
    topic.num_partitions = partitions;
    topic.replication_factor = replication_factor;
    topic.assignments = (0..2)
        .map(|index| {
            let mut a = CreatableReplicaAssignment::default();
            a.partition_index = index;
            a.broker_ids = brokers.iter().map(|&b| BrokerId(b)).collect();
            a
        })
        .collect();
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_topics_takes_assignments_to_this_node() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let mut request = CreateTopicsRequest::default();
    request.timeout_ms = 5000;
    request.topics = vec![
        assigned_topic("assigned", -1, -1, &[0]),
        assigned_topic("counted", 2, -1, &[0]),
        assigned_topic("elsewhere", -1, -1, &[1]),
        assigned_topic("replicated", -1, -1, &[0, 1]),
    ];
    let response: CreateTopicsResponse = call(&mut stream, ApiKey::CreateTopics, 5, &request).await;
    let codes: Vec<(i16, i32)> = response.topics.iter().map(|t| (t.error_code, t.num_partitions)).collect();
    assert_eq!(
        codes,
        [(0, 2), (INVALID_REQUEST, -1), (INVALID_REPLICA_ASSIGNMENT, -1), (INVALID_REPLICA_ASSIGNMENT, -1)]
    );
    assert_eq!(broker.log.topic("assigned").unwrap().partition_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_v8_names_the_record_a_batch_was_refused_for() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let batch = BatchBuilder::new()
        .record(NewRecord::new(Some(b"k"), Some(b"v"), 1000))
        .record(NewRecord::new(None, Some(b"v"), 1000))
        .build();
    let response: ProduceResponse =
        call(&mut stream, ApiKey::Produce, 8, &common::produce_request("compacted", batch, None)).await;
    let partition = &response.responses[0].partition_responses[0];
    assert_eq!(partition.error_code, INVALID_RECORD);
    let errors: Vec<i32> = partition.record_errors.iter().map(|e| e.batch_index).collect();
    assert_eq!(errors, [1]);
    assert!(partition.record_errors[0].batch_index_error_message.as_ref().unwrap().contains("no key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_answers_the_logs_topic_ids() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let id = uuid::Uuid::from_bytes(broker.log.topic("in").unwrap().id());
    let by_name = MetadataRequestTopic::default().with_name(Some(topic_name("in")));
    let by_id = MetadataRequestTopic::default().with_name(None).with_topic_id(id);
    let unknown = MetadataRequestTopic::default().with_name(None).with_topic_id(uuid::Uuid::from_u128(7));
    let request = MetadataRequest::default().with_topics(Some(vec![by_name, by_id, unknown]));
    let response: MetadataResponse = call(&mut stream, ApiKey::Metadata, 12, &request).await;
    let got: Vec<(Option<&str>, uuid::Uuid, i16)> =
        response.topics.iter().map(|t| (t.name.as_ref().map(|n| n.0.as_str()), t.topic_id, t.error_code)).collect();
    assert_eq!(got, [(Some("in"), id, 0), (Some("in"), id, 0), (None, uuid::Uuid::from_u128(7), UNKNOWN_TOPIC_ID)]);
}

const INVALID_CONFIG: i16 = 40;

/// A CreateTopics v5 (librdkafka's) of one single-partition topic with `configs`: its error
/// code and message.
async fn create_topic_with(stream: &mut TcpStream, name: &str, configs: &[(&str, &str)]) -> (i16, Option<String>) {
    use kafka_protocol::messages::create_topics_request::CreatableTopicConfig;
    let mut topic = CreatableTopic::default();
    topic.name = topic_name(name);
    topic.num_partitions = 1;
    topic.replication_factor = 1;
    topic.configs = configs
        .iter()
        .map(|(k, v)| {
            let mut c = CreatableTopicConfig::default();
            c.name = s(*k);
            c.value = Some(s(*v));
            c
        })
        .collect();
    let mut request = CreateTopicsRequest::default();
    request.timeout_ms = 5000;
    request.topics = vec![topic];
    let response: CreateTopicsResponse = call(stream, ApiKey::CreateTopics, 5, &request).await;
    let t = &response.topics[0];
    (t.error_code, t.error_message.as_ref().map(|m| m.to_string()))
}

/// An IncrementalAlterConfigs v1 SET of `key` on topic `name`: its error code and message.
async fn alter_topic_config(stream: &mut TcpStream, name: &str, key: &str, value: &str) -> (i16, Option<String>) {
    use kafka_protocol::messages::incremental_alter_configs_request::{AlterConfigsResource, AlterableConfig};
    use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};
    let mut config = AlterableConfig::default();
    config.name = s(key);
    config.config_operation = 0;
    config.value = Some(s(value));
    let mut resource = AlterConfigsResource::default();
    resource.resource_type = 2;
    resource.resource_name = s(name);
    resource.configs = vec![config];
    let mut request = IncrementalAlterConfigsRequest::default();
    request.resources = vec![resource];
    let response: IncrementalAlterConfigsResponse = call(stream, ApiKey::IncrementalAlterConfigs, 1, &request).await;
    let r = &response.responses[0];
    (r.error_code, r.error_message.as_ref().map(|m| m.to_string()))
}

/// The sub-key header only refines compaction: on a topic that is not compacted it would
/// silently do nothing, so creating such a topic, setting the header on one, and dropping
/// compaction while the header is set are each INVALID_CONFIG, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subkey_header_on_a_topic_that_is_not_compacted_is_refused() {
    let broker = serve(Limits::default()).await;
    let mut stream = broker.connect().await;
    let header = ("kappa.compaction.subkey.header", "contentId");
    let refused = |(code, message): (i16, Option<String>)| {
        let message = message.unwrap_or_default();
        assert_eq!(code, INVALID_CONFIG, "{message}");
        assert!(
            message.contains("only applies to compacted topics") && message.contains("set cleanup.policy=compact"),
            "{message}"
        );
    };
    refused(create_topic_with(&mut stream, "plain", &[header]).await);
    refused(create_topic_with(&mut stream, "deleted", &[header, ("cleanup.policy", "delete")]).await);
    assert!(broker.log.topic("plain").is_err() && broker.log.topic("deleted").is_err(), "nothing created");
    refused(alter_topic_config(&mut stream, "in", header.0, header.1).await);
    assert_eq!(broker.log.topic("in").unwrap().config().compaction_subkey_header, None);

    let created = create_topic_with(&mut stream, "channels", &[header, ("cleanup.policy", "compact")]).await;
    assert_eq!(created.0, 0, "{:?}", created.1);
    refused(alter_topic_config(&mut stream, "channels", "cleanup.policy", "delete").await);
    let config = broker.log.topic("channels").unwrap().config();
    assert!(config.cleanup_policy.compact && config.compaction_subkey_header.as_deref() == Some("contentId"));
    assert_eq!(alter_topic_config(&mut stream, "channels", "cleanup.policy", "compact,delete").await.0, 0);
}
