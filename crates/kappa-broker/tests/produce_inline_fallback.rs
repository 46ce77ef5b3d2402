//! Small produce requests are appended on the connection's task until an append would wait
//! (here: roll the segment); that batch and the rest of the request go on, in order, on a
//! blocking thread. Over a real socket: what a request spanning partitions, or naming one
//! partition twice, gets back and where its records land when that happens mid-request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kappa_broker::{Broker, BrokerConfig, BrokerStats, Limits};
use kappa_log::batch::BatchHeader;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogOptions};
use tokio::net::{TcpListener, TcpStream};

mod common;

const VERSION: i16 = 9;

struct Running {
    _dir: tempfile::TempDir,
    log: Arc<Log>,
    stats: Arc<BrokerStats>,
    addr: std::net::SocketAddr,
}

/// A broker whose topic `topic` has `partitions` partitions of 1 KiB segments: two
/// [`batch_of`] batches fit in one, a third rolls it.
async fn start(topic: &str, partitions: i32) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    let overrides =
        std::collections::BTreeMap::from([(kappa_log::config::SEGMENT_BYTES.to_owned(), "1024".to_owned())]);
    log.create_topic(topic, partitions, &overrides).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(log.clone(), BrokerConfig::default()).await.unwrap();
    let stats = broker.stats();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    Running { _dir: dir, log, stats, addr }
}

impl Running {
    fn fallbacks(&self) -> u64 {
        self.stats.produce_inline_fallbacks.load(Ordering::Relaxed)
    }

    /// Every record value's tag byte in `topic`/`index`, in offset order.
    fn tags(&self, topic: &str, index: i32) -> Vec<u8> {
        let read = self.log.partition(topic, index).unwrap().read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
        let mut tags = Vec::new();
        let mut rest = read.records.as_slice();
        while !rest.is_empty() {
            let len = BatchHeader::parse(rest).unwrap().total_bytes();
            let records = kappa_log::records::decode_records(&rest[..len], 1 << 20).unwrap();
            tags.extend(records.iter().map(|r| r.value.unwrap()[0]));
            rest = &rest[len..];
        }
        tags
    }
}

/// About 370 bytes, its record's value all `tag`.
fn batch_of(tag: u8) -> Vec<u8> {
    BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(&[tag; 300]), 1)).build()
}

/// One produce request (acks all) of `parts` — (topic, partition, batch tags) — in this
/// order, a topic's consecutive parts in one topic entry.
fn produce_request(parts: &[(&'static str, i32, &[u8])]) -> ProduceRequest {
    let mut topics: Vec<TopicProduceData> = Vec::new();
    for &(topic, index, tags) in parts {
        let mut data = PartitionProduceData::default();
        data.index = index;
        data.records = Some(Bytes::from(tags.iter().flat_map(|&t| batch_of(t)).collect::<Vec<u8>>()));
        match topics.last_mut() {
            Some(last) if &*last.name.0 == topic => last.partition_data.push(data),
            _ => {
                let mut entry = TopicProduceData::default();
                entry.name = TopicName(StrBytes::from_static_str(topic));
                entry.partition_data = vec![data];
                topics.push(entry);
            }
        }
    }
    let mut request = ProduceRequest::default();
    request.acks = -1;
    request.timeout_ms = 5_000;
    request.topic_data = topics;
    request
}

/// Every partition answer as (topic, partition, error code, base offset), in response order.
fn answers(response: &ProduceResponse) -> Vec<(String, i32, i16, i64)> {
    response
        .responses
        .iter()
        .flat_map(|t| {
            t.partition_responses.iter().map(|p| (t.name.0.to_string(), p.index, p.error_code, p.base_offset))
        })
        .collect()
}

async fn produce(stream: &mut TcpStream, parts: &[(&'static str, i32, &[u8])]) -> Vec<(String, i32, i16, i64)> {
    let response: ProduceResponse = common::call(stream, ApiKey::Produce, VERSION, &produce_request(parts)).await;
    answers(&response)
}

/// The first partition's second batch rolls its segment: it and everything after it —
/// all of the second partition — are appended on a blocking thread, in request order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_in_a_request_spanning_two_partitions_answers_both_in_order() {
    let kappa = start("two", 2).await;
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    assert_eq!(produce(&mut stream, &[("two", 0, &[0])]).await, [("two".to_owned(), 0, 0, 0)]);
    assert_eq!(kappa.fallbacks(), 0, "the first batch was appended inline");

    let answered = produce(&mut stream, &[("two", 0, &[1, 2]), ("two", 1, &[10, 11])]).await;
    assert_eq!(answered, [("two".to_owned(), 0, 0, 1), ("two".to_owned(), 1, 0, 0)]);
    assert_eq!(kappa.fallbacks(), 1, "the roll sent the request to a blocking thread");
    assert_eq!(kappa.log.partition("two", 0).unwrap().segment_count(), 2, "batch 2 rolled the segment");
    assert_eq!(kappa.tags("two", 0), [0, 1, 2]);
    assert_eq!(kappa.tags("two", 1), [10, 11]);
}

/// A request naming one partition twice gets an answer for each, each with the base offset
/// of its own first batch, and its records land in request order — whether the append
/// falls back in the second part, or already in the first and the second must follow it
/// on the blocking thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_in_a_request_naming_one_partition_twice_keeps_request_order() {
    let kappa = start("one", 1).await;
    let mut stream = TcpStream::connect(kappa.addr).await.unwrap();
    assert_eq!(produce(&mut stream, &[("one", 0, &[0])]).await, [("one".to_owned(), 0, 0, 0)]);
    let segments = || kappa.log.partition("one", 0).unwrap().segment_count();

    // Batch 1 is appended inline; batch 2 rolls the segment.
    let answered = produce(&mut stream, &[("one", 0, &[1]), ("one", 0, &[2, 3])]).await;
    assert_eq!(answered, [("one".to_owned(), 0, 0, 1), ("one".to_owned(), 0, 0, 2)]);
    assert_eq!(kappa.fallbacks(), 1, "the roll sent the request to a blocking thread");
    assert_eq!(segments(), 2, "batch 2 rolled the segment");
    assert_eq!(kappa.tags("one", 0), [0, 1, 2, 3]);

    // Batch 4 rolls at once (2 and 3 fill the segment), and batch 6 once more.
    let answered = produce(&mut stream, &[("one", 0, &[4, 5]), ("one", 0, &[6])]).await;
    assert_eq!(answered, [("one".to_owned(), 0, 0, 4), ("one".to_owned(), 0, 0, 6)]);
    assert_eq!(kappa.fallbacks(), 2);
    assert_eq!(segments(), 4, "batches 4 and 6 rolled the segment");
    assert_eq!(kappa.tags("one", 0), [0, 1, 2, 3, 4, 5, 6]);
}
