//! Fetch v0-3 (kafka-node) against the real broker over a socket: stored record batches,
//! compressed or not, come back as message sets of the magic the version reads, from the
//! fetch offset on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ProduceResponse, RequestHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kappa_broker::legacy::message_set;
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::batch::Compression;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Log, LogOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

/// A fetch v0-3 request of partition 0 of `topic` from `offset`, as a size-prefixed frame
/// (kafka-protocol no longer encodes these versions).
fn legacy_fetch_frame(version: i16, correlation_id: i32, topic: &str, offset: i64) -> Vec<u8> {
    legacy_fetch_frame_within(version, correlation_id, topic, offset, 1 << 20, 1 << 20)
}

/// [`legacy_fetch_frame`] with the request's `max_bytes` (v3) and `partition_max_bytes`.
fn legacy_fetch_frame_within(
    version: i16,
    correlation_id: i32,
    topic: &str,
    offset: i64,
    max_bytes: i32,
    partition_max_bytes: i32,
) -> Vec<u8> {
    legacy_fetch_frame_waiting(version, correlation_id, topic, offset, max_bytes, partition_max_bytes, 100)
}

/// [`legacy_fetch_frame_within`] with the request's `max_wait_ms` (min_bytes is 1).
fn legacy_fetch_frame_waiting(
    version: i16,
    correlation_id: i32,
    topic: &str,
    offset: i64,
    max_bytes: i32,
    partition_max_bytes: i32,
    max_wait_ms: i32,
) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("kafka-node")));
    let mut body = BytesMut::new();
    header.encode(&mut body, 1).unwrap();
    body.put_i32(-1); // replica id
    body.put_i32(max_wait_ms);
    body.put_i32(1); // min bytes
    if version >= 3 {
        body.put_i32(max_bytes);
    }
    body.put_i32(1);
    body.put_i16(topic.len() as i16);
    body.put_slice(topic.as_bytes());
    body.put_i32(1);
    body.put_i32(0);
    body.put_i64(offset);
    body.put_i32(partition_max_bytes);
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Reads a fetch v0-3 answer of one partition: its error code and message set.
async fn read_legacy_fetch(stream: &mut TcpStream, version: i16, correlation_id: i32) -> (i16, Bytes) {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).await.unwrap();
    let mut answer = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut answer).await.unwrap();
    let mut answer = Bytes::from(answer);
    assert_eq!(answer.get_i32(), correlation_id);
    if version >= 1 {
        assert_eq!(answer.get_i32(), 0, "throttle_time_ms");
    }
    assert_eq!(answer.get_i32(), 1, "one topic");
    let name_len = answer.get_i16() as usize;
    answer.advance(name_len);
    assert_eq!(answer.get_i32(), 1, "one partition");
    assert_eq!(answer.get_i32(), 0, "partition 0");
    let error_code = answer.get_i16();
    answer.advance(8); // high watermark
    let set_len = answer.get_i32() as usize;
    assert_eq!(answer.len(), set_len, "the message set is the rest of the answer");
    (error_code, answer)
}

/// A broker serving topic "t" (one partition); its address.
async fn start() -> (tempfile::TempDir, std::net::SocketAddr) {
    let (dir, addr, _) = start_with_log().await;
    (dir, addr)
}

/// [`start`], also handing out the broker's log.
async fn start_with_log() -> (tempfile::TempDir, std::net::SocketAddr, Arc<Log>) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("t", 1, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(log.clone(), BrokerConfig::default()).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    (dir, addr, log)
}

/// Partition 0 of "t": a committed transaction of producer 7 (offsets 0..2), its commit
/// marker at 2 — the log's end is a control batch.
fn committed_transaction(log: &Log) {
    use kappa_log::records::ControlType;
    let partition = log.partition("t", 0).unwrap();
    let data = BatchBuilder::new()
        .producer(7, 0, 0)
        .transactional(true)
        .record(NewRecord::new(Some(b"k"), Some(b"v0"), 1_000))
        .record(NewRecord::new(Some(b"k"), Some(b"v1"), 1_000))
        .build();
    partition.append(data).unwrap();
    partition.append(BatchBuilder::control_marker(7, 0, ControlType::Commit, 0, 1_000).build()).unwrap();
    assert_eq!((partition.high_watermark(), partition.last_stable_offset()), (3, 3));
}

/// How long a fetch took to be answered.
async fn timed<T>(fetch: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let answer = fetch.await;
    (answer, started.elapsed())
}

/// A read_committed consumer (fetch v4+) that has the transaction's records fetches from the
/// marker: it gets the marker at once (min_bytes counts it, as Kafka does) and so moves
/// past it; from there, the log's end, the fetch waits max_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_committed_fetch_gets_a_trailing_marker_at_once_then_waits_at_the_end() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
    let (_dir, addr, log) = start_with_log().await;
    committed_transaction(&log);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut fetch = async |offset: i64| {
        let mut partition = FetchPartition::default();
        partition.fetch_offset = offset;
        partition.partition_max_bytes = 1 << 20;
        let mut topic = FetchTopic::default();
        topic.topic = TopicName(StrBytes::from_static_str("t"));
        topic.partitions = vec![partition];
        let mut request = FetchRequest::default();
        request.max_wait_ms = MAX_WAIT.as_millis() as i32;
        request.min_bytes = 1;
        request.max_bytes = 1 << 20;
        request.isolation_level = 1;
        request.topics = vec![topic];
        let response: FetchResponse = common::call(&mut stream, ApiKey::Fetch, 11, &request).await;
        response.responses[0].partitions[0].clone()
    };
    let (at_marker, took) = timed(fetch(2)).await;
    assert!(took < MAX_WAIT / 2, "the marker is answered at once, took {took:?}");
    assert_eq!(at_marker.error_code, 0);
    let marker = kappa_log::batch::BatchHeader::parse(at_marker.records.as_ref().unwrap()).unwrap();
    assert!(marker.is_control() && marker.base_offset == 2, "the client sees the marker, so moves on to 3");
    let (at_end, took) = timed(fetch(3)).await;
    assert!(took >= MAX_WAIT - SLACK, "at the end the fetch waits max_wait, took {took:?}");
    assert_eq!((at_end.error_code, at_end.records.unwrap_or_default().len()), (0, 0));
}

/// Fetch v0-3 (kafka-node) cannot carry a marker, so a consumer at a trailing one never
/// moves past it: answering it at once, on the marker's stored bytes, made it poll hot.
/// It waits max_wait instead — and is answered as soon as a record is written after the
/// marker, which it then gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_fetch_at_a_trailing_marker_waits_for_max_wait_or_new_records() {
    let (_dir, addr, log) = start_with_log().await;
    committed_transaction(&log);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let wait_ms = MAX_WAIT.as_millis() as i32;
    for version in [0, 2] {
        let frame = legacy_fetch_frame_waiting(version, 7, "t", 2, 1 << 20, 1 << 20, wait_ms);
        stream.write_all(&frame).await.unwrap();
        let ((error_code, set), took) = timed(read_legacy_fetch(&mut stream, version, 7)).await;
        assert_eq!((error_code, set.len()), (0, 0), "v{version}");
        assert!(took >= MAX_WAIT - SLACK, "v{version}: waits max_wait at the marker, took {took:?}");
    }

    let frame = legacy_fetch_frame_waiting(2, 8, "t", 2, 1 << 20, 1 << 20, 30_000);
    stream.write_all(&frame).await.unwrap();
    let answer = tokio::spawn(async move { timed(read_legacy_fetch(&mut stream, 2, 8)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let record = BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(b"after"), 2_000)).build();
    log.partition("t", 0).unwrap().append(record).unwrap();
    let ((error_code, set), took) = answer.await.unwrap();
    assert!(took < Duration::from_secs(10), "answered once a record is written, took {took:?}");
    assert_eq!(error_code, 0);
    let offsets: Vec<i64> = message_set::decode(&set, 1 << 20, false).unwrap().iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [3], "past the marker");
}

/// A marker followed by a batch larger than the partition's `partition_max_bytes`: a read
/// from the marker held only the marker (the next batch did not fit), which converts to
/// nothing, so a v0-3 consumer fetched at the marker's offset forever (Kafka too). The read
/// starts past the marker instead, and the large batch comes whole, as a read's first does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_fetch_moves_past_a_marker_before_a_batch_larger_than_its_limit() {
    let (_dir, addr, log) = start_with_log().await;
    committed_transaction(&log);
    let value = vec![b'x'; 4_096];
    let large = BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(&value), 2_000)).build();
    log.partition("t", 0).unwrap().append(large).unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for version in [0, 1, 2, 3] {
        let frame = legacy_fetch_frame_waiting(version, 9, "t", 2, 1 << 20, 1_024, MAX_WAIT.as_millis() as i32);
        stream.write_all(&frame).await.unwrap();
        let (error_code, set) = read_legacy_fetch(&mut stream, version, 9).await;
        assert_eq!(error_code, 0, "v{version}");
        let messages = message_set::decode(&set, 1 << 20, false).unwrap();
        let got: Vec<(i64, usize)> =
            messages.iter().map(|m| (m.offset, m.value.as_ref().map_or(0, |v| v.len()))).collect();
        assert_eq!(got, [(3, 4_096)], "v{version}: the batch after the marker, whole");
    }
}

const MAX_WAIT: Duration = Duration::from_millis(1_000);
/// Timer granularity: a wait may end a little before its deadline as measured here.
const SLACK: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_fetches_get_compressed_and_plain_batches_as_message_sets_from_the_fetch_offset() {
    let (_dir, addr) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut offset = 0;
    for (compression, count) in [(Compression::Gzip, 4), (Compression::None, 2), (Compression::Lz4, 3)] {
        let mut batch = BatchBuilder::new().compression(compression);
        for i in offset..offset + count {
            batch.push(NewRecord::new(Some(b"k"), Some(format!("v{i}").as_bytes()), 1_000 + i));
        }
        let request = common::produce_request("t", batch.build(), None);
        let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, 9, &request).await;
        assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
        offset += count;
    }

    for version in 0..=3 {
        let magic = if version >= 2 { 1 } else { 0 };
        let correlation_id = 100 + i32::from(version);
        // From inside the gzip batch: the records before the fetch offset are left out.
        stream.write_all(&legacy_fetch_frame(version, correlation_id, "t", 2)).await.unwrap();
        let (error_code, set) = read_legacy_fetch(&mut stream, version, correlation_id).await;
        assert_eq!(error_code, 0, "v{version}");
        let messages = message_set::decode(&set, 1 << 20, false).unwrap();
        let got: Vec<(i64, i8, i64, Bytes)> =
            messages.into_iter().map(|m| (m.offset, m.magic, m.timestamp, m.value.unwrap())).collect();
        let expected: Vec<(i64, i8, i64, Bytes)> = (2..9)
            .map(|i| {
                let timestamp = if magic == 1 { 1_000 + i } else { message_set::NO_TIMESTAMP };
                (i, magic, timestamp, Bytes::from(format!("v{i}")))
            })
            .collect();
        assert_eq!(got, expected, "v{version}");
    }
}

/// A compressed batch inflates on down-conversion (here 64 KiB of zeros per record, stored
/// in a few hundred bytes): the answer is bounded by the converted bytes, as Kafka bounds
/// it by the bytes it read — at most the partition's `partition_max_bytes` and the request's
/// `max_bytes` (v3), whole messages, the first one whatever its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_fetch_answers_hold_the_requests_limits_of_converted_bytes() {
    const VALUE_BYTES: usize = 64 * 1024;
    let (_dir, addr) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut batch = BatchBuilder::new().compression(Compression::Gzip);
    for i in 0..32 {
        batch.push(NewRecord::new(Some(b"k"), Some(&vec![0u8; VALUE_BYTES][..]), 1_000 + i));
    }
    let batch = batch.build();
    assert!(batch.len() < 64 * 1024, "{} bytes stored", batch.len());
    let request = common::produce_request("t", batch, None);
    let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, 9, &request).await;
    assert_eq!(response.responses[0].partition_responses[0].error_code, 0);

    let mut correlation_id = 0;
    let mut fetch = async |version: i16, max_bytes: i32, partition_max_bytes: i32| -> (usize, Vec<i64>) {
        correlation_id += 1;
        let frame = legacy_fetch_frame_within(version, correlation_id, "t", 3, max_bytes, partition_max_bytes);
        stream.write_all(&frame).await.unwrap();
        let (error_code, set) = read_legacy_fetch(&mut stream, version, correlation_id).await;
        assert_eq!(error_code, 0, "v{version}");
        let messages = message_set::decode(&set, 1 << 30, false).unwrap();
        (set.len(), messages.iter().map(|m| m.offset).collect())
    };
    let one_mib = 1 << 20;
    for version in 0..=3 {
        let (bytes, offsets) = fetch(version, i32::MAX, 300 * 1024).await;
        assert!(bytes <= 300 * 1024, "v{version}: {bytes} bytes");
        assert_eq!(offsets, [3, 4, 5, 6], "v{version}: partition_max_bytes");
        let (bytes, offsets) = fetch(version, i32::MAX, 1).await;
        assert!(bytes > VALUE_BYTES, "v{version}");
        assert_eq!(offsets, [3], "v{version}: the first message whatever its size");
        let (bytes, offsets) = fetch(version, i32::MAX, one_mib).await;
        assert!(bytes <= one_mib as usize, "v{version}: {bytes} bytes");
        assert_eq!(offsets, (3..18).collect::<Vec<_>>(), "v{version}: 15 of 64 KiB and more in 1 MiB");
    }
    let (bytes, offsets) = fetch(3, 200 * 1024, one_mib).await;
    assert!(bytes <= 200 * 1024, "{bytes} bytes");
    assert_eq!(offsets, [3, 4, 5], "v3: max_bytes");
    assert_eq!(fetch(3, 1, one_mib).await.1, [3], "v3: the first message whatever its size");
}

/// zstd batches are down-converted for fetch v0-3 like any other (Kafka refuses them,
/// KIP-110, leaving kafka-node unable to read what librdkafka wrote with zstd), from inside
/// the batch too; fetch v4-9 gets the stored batch as it is, as Kafka answers them for a
/// topic whose `compression.type` is `producer` (the only one kappa has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_fetches_down_convert_zstd_and_newer_ones_get_it_as_stored() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
    let (_dir, addr) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for (compression, offsets) in [(Compression::Gzip, 0..3), (Compression::Zstd, 3..5)] {
        let mut batch = BatchBuilder::new().compression(compression);
        for i in offsets {
            batch.push(NewRecord::new(Some(b"k"), Some(format!("v{i}").as_bytes()), 1_000 + i));
        }
        let request = common::produce_request("t", batch.build(), None);
        let response: ProduceResponse = common::call(&mut stream, ApiKey::Produce, 9, &request).await;
        assert_eq!(response.responses[0].partition_responses[0].error_code, 0);
    }
    for version in 0..=3 {
        for (from, expected) in [(1, vec![1, 2, 3, 4]), (4, vec![4])] {
            let correlation_id = 200 + i32::from(version);
            stream.write_all(&legacy_fetch_frame(version, correlation_id, "t", from)).await.unwrap();
            let (error_code, set) = read_legacy_fetch(&mut stream, version, correlation_id).await;
            assert_eq!(error_code, 0, "v{version} from {from}");
            let messages = message_set::decode(&set, 1 << 20, false).unwrap();
            let offsets: Vec<i64> = messages.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, expected, "v{version} from {from}");
            let last = messages.last().unwrap();
            assert_eq!(last.value.as_deref(), Some(&b"v4"[..]), "v{version} from {from}: the zstd record's value");
        }
    }
    for version in 4..=9 {
        let mut partition = FetchPartition::default();
        partition.fetch_offset = 3;
        partition.partition_max_bytes = 1 << 20;
        let mut topic = FetchTopic::default();
        topic.topic = TopicName(StrBytes::from_static_str("t"));
        topic.partitions = vec![partition];
        let mut request = FetchRequest::default();
        request.max_bytes = 1 << 20;
        request.topics = vec![topic];
        let response: FetchResponse = common::call(&mut stream, ApiKey::Fetch, version, &request).await;
        let answer = &response.responses[0].partitions[0];
        assert_eq!(answer.error_code, 0, "v{version}");
        let stored = kappa_log::batch::BatchHeader::parse(answer.records.as_ref().unwrap()).unwrap();
        assert_eq!(stored.compression().unwrap(), Compression::Zstd, "v{version}");
    }
}
