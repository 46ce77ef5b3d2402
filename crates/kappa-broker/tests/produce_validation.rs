//! What a client may not produce, and how produce and fetch answer at their edges, over a
//! real socket: the cases stock clients do not send but Kafka still refuses or handles.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, MetadataRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::records::{BatchBuilder, ControlType, NewRecord};
use kappa_log::{Log, LogOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

const PRODUCE_VERSION: i16 = 9;
const INVALID_TOPIC_EXCEPTION: i16 = 17;
const INVALID_RECORD: i16 = 87;
const CORRUPT_MESSAGE: i16 = 2;

struct Running {
    _dir: tempfile::TempDir,
    log: Arc<Log>,
    addr: std::net::SocketAddr,
}

async fn start(config: BrokerConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("t", 1, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(log.clone(), config).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    Running { _dir: dir, log, addr }
}

async fn produce(addr: std::net::SocketAddr, topic: &'static str, batch: Vec<u8>) -> i16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = common::produce_request(topic, batch, None);
    let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, PRODUCE_VERSION, &request).await;
    response.responses[0].partition_responses[0].error_code
}

fn record() -> NewRecord {
    NewRecord::new(Some(b"k"), Some(b"v"), 1)
}

/// Kafka tells a batch damaged on the way (CORRUPT_MESSAGE, which clients retry) from an
/// intact one that breaks the format's rules (INVALID_RECORD, which they give up on: the
/// same bytes would fail again).
#[tokio::test]
async fn a_damaged_batch_is_corrupt_and_an_intact_invalid_one_is_an_invalid_record() {
    let kappa = start(BrokerConfig::default()).await;
    let good = BatchBuilder::new().record(record()).record(record()).build();

    let mut damaged = good.clone();
    *damaged.last_mut().unwrap() ^= 1;
    assert_eq!(produce(kappa.addr, "t", damaged).await, CORRUPT_MESSAGE, "a flipped bit: the CRC fails");

    let mut miscounted = good.clone();
    miscounted[57..61].copy_from_slice(&3i32.to_be_bytes());
    kappa_log::batch::rewrite_crc(&mut miscounted);
    assert_eq!(produce(kappa.addr, "t", miscounted).await, INVALID_RECORD, "3 records, offset deltas 0..=1");

    // The first record claims 63 bytes (zigzag 0x7e) where two records of 9 bytes follow.
    let mut undecodable = good.clone();
    undecodable[61] = 0x7e;
    kappa_log::batch::rewrite_crc(&mut undecodable);
    assert_eq!(produce(kappa.addr, "t", undecodable).await, INVALID_RECORD, "records that do not decode");

    let truncated = good[..good.len() - 1].to_vec();
    assert_eq!(produce(kappa.addr, "t", truncated).await, INVALID_RECORD, "a partial batch: sent that way");

    assert_eq!(kappa.log.partition("t", 0).unwrap().log_end_offset(), 0, "nothing was written");
    assert_eq!(produce(kappa.addr, "t", good).await, 0);
}

/// Sends a produce v2 request (kafka-node's) of one message set to partition 0 of `t`: its
/// partition's error code.
async fn legacy_produce(addr: std::net::SocketAddr, set: &[u8]) -> i16 {
    use bytes::Buf;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&common::legacy_produce_v2_frame("t", -1, 5, set)).await.unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).await.unwrap();
    let mut answer = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut answer).await.unwrap();
    // correlation id, [topics], name "t", [partitions], index, then the error code.
    let mut answer = &answer[..];
    assert_eq!(answer.get_i32(), 5);
    answer.advance(4 + 2 + 1 + 4 + 4);
    answer.get_i16()
}

/// kafka-node sends v0/v1 message sets; the broker converts them to record batches (under
/// the turn compressed batches take, since converting inflates), and one that fails its
/// checks is CORRUPT_MESSAGE for its partition.
#[tokio::test]
async fn a_message_set_is_converted_and_a_corrupt_one_is_a_corrupt_message() {
    use kappa_broker::legacy::message_set;
    let kappa = start(BrokerConfig::default()).await;
    let mut set = bytes::BytesMut::new();
    message_set::encode_message(&mut set, 0, 1, 0, 1234, Some(b"key"), Some(b"value"));
    assert_eq!(legacy_produce(kappa.addr, &set).await, 0);
    let partition = kappa.log.partition("t", 0).unwrap();
    assert_eq!(partition.log_end_offset(), 1);
    let read = partition.read(0, 1 << 20, kappa_log::Isolation::ReadCommitted).unwrap();
    let decoded = kappa_log::records::decode_records(&read.records, 1 << 20).unwrap();
    let record = decoded.get(0).unwrap();
    assert_eq!((record.key, record.value), (Some(&b"key"[..]), Some(&b"value"[..])));

    let mut corrupt = set.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert_eq!(legacy_produce(kappa.addr, &corrupt).await, CORRUPT_MESSAGE, "a message CRC that fails");
    assert_eq!(partition.log_end_offset(), 1);
}

/// Produce v3+ carries record batches only: Kafka refuses a v0/v1 message there with
/// INVALID_RECORD for its partition (`ProduceRequest.validateRecords`), even behind a record
/// batch, rather than converting it as for produce v0-2. The request's other partitions are
/// written; from v8 the answer says why.
#[tokio::test]
async fn a_message_set_in_produce_v3_or_later_is_an_invalid_record() {
    use kafka_protocol::messages::produce_request::PartitionProduceData;
    use kappa_broker::legacy::message_set;
    let kappa = start(BrokerConfig::default()).await;
    kappa.log.create_topic("two", 2, &Default::default()).unwrap();
    let mut v1 = bytes::BytesMut::new();
    message_set::encode_message(&mut v1, 0, 1, 0, 1234, Some(b"key"), Some(b"value"));
    let mut v0 = bytes::BytesMut::new();
    message_set::encode_message(&mut v0, 0, 0, 0, -1, Some(b"key"), Some(b"value"));
    let batch = BatchBuilder::new().record(record()).build();
    let behind_a_batch = [&batch[..], &v1[..]].concat();
    // Refused before its transaction is looked at: not INVALID_TXN_STATE (for the missing
    // transactional id, or the unknown one) nor holding the transaction meanwhile.
    let transactional = BatchBuilder::new().producer(9, 0, 0).transactional(true).record(record()).build();
    let behind_a_transactional_batch = [&transactional[..], &v1[..]].concat();
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    for version in [3, PRODUCE_VERSION] {
        for (what, set, transactional_id) in [
            ("magic 1", v1.to_vec(), None),
            ("magic 0", v0.to_vec(), None),
            ("magic 1", behind_a_batch.clone(), None),
            ("magic 1", behind_a_transactional_batch.clone(), None),
            ("magic 1", behind_a_transactional_batch.clone(), Some("unknown")),
        ] {
            let mut request = common::produce_request("two", set, transactional_id);
            let mut good = PartitionProduceData::default();
            good.index = 1;
            good.records = Some(batch.clone().into());
            request.topic_data[0].partition_data.push(good);
            let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, version, &request).await;
            let mut answers = response.responses[0].partition_responses.clone();
            answers.sort_by_key(|answer| answer.index);
            let context = format!("v{version}, {what}, transactional id {transactional_id:?}");
            assert_eq!((answers[0].index, answers[0].error_code), (0, INVALID_RECORD), "{context}");
            assert_eq!((answers[1].index, answers[1].error_code), (1, 0), "{context}");
            let message = answers[0].error_message.as_deref().map(str::to_owned);
            if version >= 8 {
                let message = message.unwrap_or_default();
                assert!(message.contains(&format!("version {version}")), "{message}");
                assert!(message.contains(what) && message.contains("record batches (magic 2)"), "{message}");
            } else {
                assert_eq!(message, None, "v{version} has no error message");
            }
        }
    }
    assert_eq!(kappa.log.partition("two", 0).unwrap().log_end_offset(), 0, "nothing was written");
    assert_eq!(kappa.log.partition("two", 1).unwrap().log_end_offset(), 10, "the other partition was");
    // Produce v2 (kafka-node) still converts the same message sets.
    assert_eq!(legacy_produce(kappa.addr, &v1).await, 0);
    assert_eq!(legacy_produce(kappa.addr, &v0).await, 0);
}

/// Transaction markers and sequence-less producer batches come from the broker only
/// (Kafka's LogValidator): a forged ABORT marker would end another producer's transaction
/// and hide its committed records from read_committed consumers.
#[tokio::test]
async fn clients_may_not_write_control_batches_or_producer_batches_without_a_sequence() {
    let kappa = start(BrokerConfig::default()).await;
    let marker = BatchBuilder::control_marker(7, 0, ControlType::Abort, 0, 1).transactional(false).build();
    assert_eq!(produce(kappa.addr, "t", marker).await, INVALID_RECORD, "a control batch");
    let transactional_marker = BatchBuilder::control_marker(7, 0, ControlType::Commit, 0, 1).build();
    // (Refused before its records are looked at: no transaction vouches for it.)
    assert_ne!(produce(kappa.addr, "t", transactional_marker).await, 0, "a transactional control batch");
    let no_sequence = BatchBuilder::new().producer(7, 0, -1).record(record()).build();
    assert_eq!(produce(kappa.addr, "t", no_sequence).await, INVALID_RECORD, "a producer batch with sequence -1");
    // A request whose second batch is refused writes nothing, not its first batch.
    let mut two = BatchBuilder::new().record(record()).build();
    two.extend(BatchBuilder::control_marker(7, 0, ControlType::Abort, 0, 1).transactional(false).build());
    assert_eq!(produce(kappa.addr, "t", two).await, INVALID_RECORD, "a good batch then a marker");
    assert_eq!(kappa.log.partition("t", 0).unwrap().log_end_offset(), 0, "nothing was written");
    // A transactional batch after a plain one is checked like a first one: no transaction
    // vouches for it here, so it is refused (it would hold back the last stable offset).
    let mut hidden = BatchBuilder::new().record(record()).build();
    hidden.extend(BatchBuilder::new().producer(9, 0, 0).transactional(true).record(record()).build());
    assert_ne!(produce(kappa.addr, "t", hidden).await, 0, "a transactional batch behind a plain one");
    let partition = kappa.log.partition("t", 0).unwrap();
    assert_eq!(partition.last_stable_offset(), partition.log_end_offset(), "no transaction was opened");
    let fine = BatchBuilder::new().record(record()).build();
    assert_eq!(produce(kappa.addr, "t", fine).await, 0);
}

/// `__consumer_offsets` and `__transaction_state` are replayed into group offsets and
/// transactions at start: a client's record there would rewrite them.
#[tokio::test]
async fn clients_may_not_produce_to_internal_topics() {
    let kappa = start(BrokerConfig::default()).await;
    for topic in ["__consumer_offsets", "__transaction_state"] {
        let batch = BatchBuilder::new().record(record()).build();
        assert_eq!(produce(kappa.addr, topic, batch).await, INVALID_TOPIC_EXCEPTION, "{topic}");
    }
}

/// A fetch with min_bytes 0 asks for an answer now, data or not: an idle poll must not wait
/// out max_wait_ms (KafkaJS `minBytes: 0`, Java `fetch.min.bytes=0`).
#[tokio::test]
async fn a_fetch_with_min_bytes_zero_answers_at_once() {
    let wait_ms_max = 120_000;
    let kappa = start(BrokerConfig { fetch_wait_ms_max: wait_ms_max, ..BrokerConfig::default() }).await;
    let mut partition = FetchPartition::default();
    partition.partition = 0;
    partition.fetch_offset = 0;
    partition.partition_max_bytes = 1 << 20;
    let mut topic = FetchTopic::default();
    topic.topic = TopicName(StrBytes::from_static_str("t"));
    topic.partitions = vec![partition];
    let mut request = FetchRequest::default();
    request.replica_id = kafka_protocol::messages::BrokerId(-1);
    request.max_wait_ms = wait_ms_max as i32;
    request.min_bytes = 0;
    request.max_bytes = 1 << 20;
    request.topics = vec![topic];
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    // A quarter of the wait the broker would otherwise take: no timing is measured, only
    // that the answer did not wait out max_wait_ms.
    let answer = tokio::time::timeout(
        Duration::from_millis(wait_ms_max / 4),
        common::call::<_, FetchResponse>(&mut stream, ApiKey::Fetch, 11, &request),
    )
    .await
    .expect("min_bytes 0 answers without waiting out max_wait_ms");
    assert_eq!(answer.responses[0].partitions[0].error_code, 0);
}

/// An acks=0 producer gets no answers, so when its produce fails the connection is closed
/// (Kafka too): the client notices and refreshes its metadata instead of writing into a
/// topic that is gone.
#[tokio::test]
async fn a_failed_acks_zero_produce_closes_the_connection() {
    let kappa = start(BrokerConfig { auto_create_topics: false, ..BrokerConfig::default() }).await;
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    let mut ok = common::produce_request("t", BatchBuilder::new().record(record()).build(), None);
    ok.acks = 0;
    let mut missing = common::produce_request("missing", BatchBuilder::new().record(record()).build(), None);
    missing.acks = 0;
    stream.write_all(&common::frame(ApiKey::Produce, PRODUCE_VERSION, 1, &ok)).await.unwrap();
    // A successful acks=0 produce keeps the connection: the Metadata request is answered.
    let metadata: kafka_protocol::messages::MetadataResponse =
        common::call(&mut stream, ApiKey::Metadata, 9, &MetadataRequest::default()).await;
    assert!(!metadata.brokers.is_empty());
    stream.write_all(&common::frame(ApiKey::Produce, PRODUCE_VERSION, 3, &missing)).await.unwrap();
    stream.write_all(&common::frame(ApiKey::Metadata, 9, 4, &MetadataRequest::default())).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await.expect("no answer, no close");
    assert!(matches!(read, Ok(0) | Err(_)), "the connection stayed open after a failed acks=0 produce: {read:?}");
}

const UNSUPPORTED_COMPRESSION_TYPE: i16 = 76;

/// zstd needs produce v7 (KIP-110): Kafka refuses a zstd batch in produce v3-6 with
/// UNSUPPORTED_COMPRESSION_TYPE for its partition (`ProduceRequest.validateRecords`), and a
/// zstd wrapper in a v0/v1 message set (produce v0-2) too; nothing is written. v7 takes it.
#[tokio::test]
async fn zstd_before_produce_v7_is_an_unsupported_compression_type() {
    use kappa_broker::legacy::message_set;
    use kappa_log::batch::Compression;
    let kappa = start(BrokerConfig::default()).await;
    let zstd = || BatchBuilder::new().compression(Compression::Zstd).record(record()).build();
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    let mut produce_as = async |version: i16, batch: Vec<u8>| {
        let request = common::produce_request("t", batch, None);
        let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, version, &request).await;
        response.responses[0].partition_responses[0].error_code
    };
    for version in 3..=6 {
        assert_eq!(produce_as(version, zstd()).await, UNSUPPORTED_COMPRESSION_TYPE, "v{version}");
        let gzip = BatchBuilder::new().compression(Compression::Gzip).record(record()).build();
        assert_eq!(produce_as(version, gzip).await, 0, "v{version}: other codecs are fine");
    }
    let partition = kappa.log.partition("t", 0).unwrap();
    assert_eq!(partition.log_end_offset(), 4, "no zstd batch was written");

    let mut inner = bytes::BytesMut::new();
    message_set::encode_message(&mut inner, 0, 1, 0, 1234, Some(b"key"), Some(b"value"));
    let compressed = kappa_log::compression::compress(Compression::Zstd, &inner);
    let mut wrapper = bytes::BytesMut::new();
    message_set::encode_message(&mut wrapper, 0, 1, 4, 1234, None, Some(&compressed));
    assert_eq!(legacy_produce(kappa.addr, &wrapper).await, UNSUPPORTED_COMPRESSION_TYPE, "a zstd message set");
    assert_eq!(partition.log_end_offset(), 4);

    assert_eq!(produce_as(7, zstd()).await, 0, "v7 carries zstd");
    assert_eq!(partition.log_end_offset(), 5);
}
