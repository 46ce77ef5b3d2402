//! kappa over the Kafka wire protocol: Produce v7 with pre-built RecordBatch v2 bytes
//! (acks=all), Fetch v11 from offset 0, counting records from the batch headers.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kappa_log::batch::{BatchHeader, HEADER_BYTES};
use kappa_log::records::{BatchBuilder, NewRecord};

use crate::args::Args;
use crate::driver::{self, AckReader, Encoder, Outcome, Plan};

const PRODUCE_VERSION: i16 = 7;
const FETCH_VERSION: i16 = 11;
const CREATE_TOPICS_VERSION: i16 = 4;
/// Kafka's TOPIC_ALREADY_EXISTS: a rerun against the same server is fine.
const TOPIC_ALREADY_EXISTS: i16 = 36;
/// Largest response frame accepted (a 1 MiB fetch plus headers fits many times over).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// How long a fetch may wait on the server for data.
const FETCH_WAIT_MS: i32 = 500;

fn frame(key: ApiKey, version: i16, correlation_id: i32, body: &impl Encodable) -> Result<BytesMut> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("peer-client")));
    let mut out = BytesMut::new();
    out.extend_from_slice(&[0; 4]);
    header.encode(&mut out, key.request_header_version(version))?;
    body.encode(&mut out, version)?;
    let len = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

fn read_response<T: Decodable>(r: &mut impl Read, key: ApiKey, version: i16) -> Result<T> {
    let mut size = [0u8; 4];
    r.read_exact(&mut size).context("reading a response size")?;
    let size = i32::from_be_bytes(size) as usize;
    ensure!(size <= RESPONSE_BYTES_MAX, "response of {size} bytes");
    // read_to_end fills spare capacity: no zeroing of a 1 MiB fetch answer first.
    let mut body = Vec::with_capacity(size);
    r.take(size as u64).read_to_end(&mut body)?;
    ensure!(body.len() == size, "the server closed the connection inside a response");
    let mut body = Bytes::from(body);
    ResponseHeader::decode(&mut body, key.response_header_version(version))?;
    T::decode(&mut body, version)
}

fn topic_name(args: &Args) -> TopicName {
    TopicName(StrBytes::from_string(args.topic.clone()))
}

fn create_topic(stream: &mut TcpStream, args: &Args) -> Result<()> {
    let mut topic = CreatableTopic::default();
    topic.name = topic_name(args);
    topic.num_partitions = 1;
    topic.replication_factor = 1;
    let mut request = CreateTopicsRequest::default();
    request.topics = vec![topic];
    request.timeout_ms = 10_000;
    stream.write_all(&frame(ApiKey::CreateTopics, CREATE_TOPICS_VERSION, 0, &request)?)?;
    let response: CreateTopicsResponse = read_response(stream, ApiKey::CreateTopics, CREATE_TOPICS_VERSION)?;
    for t in response.topics {
        ensure!(matches!(t.error_code, 0 | TOPIC_ALREADY_EXISTS), "CreateTopics: error {}", t.error_code);
    }
    Ok(())
}

struct ProduceEncoder {
    topic: TopicName,
    full: Bytes,
    per_batch: u64,
    /// The last, shorter batch (if `count` is not a multiple of `per_batch`).
    tail: Option<(Bytes, u64)>,
    requests: u64,
}

fn build_batch(records: u64, size: usize) -> Bytes {
    let value = vec![b'x'; size];
    let mut builder = BatchBuilder::new();
    for _ in 0..records {
        builder.push(NewRecord::new(None, Some(&value), 0));
    }
    Bytes::from(builder.build())
}

impl Encoder for ProduceEncoder {
    fn encode(&mut self, i: u64, out: &mut Vec<u8>) -> u64 {
        let (records, count) = match &self.tail {
            Some((tail, n)) if i + 1 == self.requests => (tail.clone(), *n),
            _ => (self.full.clone(), self.per_batch),
        };
        let mut partition = PartitionProduceData::default();
        partition.index = 0;
        partition.records = Some(records);
        let mut topic = TopicProduceData::default();
        topic.name = self.topic.clone();
        topic.partition_data = vec![partition];
        let mut request = ProduceRequest::default();
        request.acks = -1;
        request.timeout_ms = 30_000;
        request.topic_data = vec![topic];
        let bytes = frame(ApiKey::Produce, PRODUCE_VERSION, i as i32, &request).expect("encodable request");
        out.extend_from_slice(&bytes);
        count
    }
}

struct ProduceAcks(BufReader<TcpStream>);

impl AckReader for ProduceAcks {
    fn read_ack(&mut self) -> Result<()> {
        let response: ProduceResponse = read_response(&mut self.0, ApiKey::Produce, PRODUCE_VERSION)?;
        for p in response.responses.iter().flat_map(|t| &t.partition_responses) {
            ensure!(p.error_code == 0, "produce error {} {:?}", p.error_code, p.error_message);
        }
        Ok(())
    }
}

/// Produce (and latency): batches of `batch_bytes / size` records (one record for the
/// latency workload), up to `window` requests in flight (Kafka's max.in.flight default 5).
pub fn produce(args: &Args) -> Result<Outcome> {
    let mut stream = TcpStream::connect(&args.addr).with_context(|| format!("connecting to {}", args.addr))?;
    stream.set_nodelay(true)?;
    create_topic(&mut stream, args)?;
    let per_batch = if args.workload == "latency" { 1 } else { (args.batch_bytes / args.size.max(1)).max(1) as u64 };
    let requests = args.count.div_ceil(per_batch);
    let left = args.count % per_batch;
    let encoder = ProduceEncoder {
        topic: topic_name(args),
        full: build_batch(per_batch, args.size),
        per_batch,
        tail: (left > 0).then(|| (build_batch(left, args.size), left)),
        requests,
    };
    let plan = Plan::new(args, requests, 5);
    let mut acks = ProduceAcks(BufReader::with_capacity(1 << 16, stream.try_clone()?));
    driver::publish(&stream, encoder, &mut acks, &plan)
}

fn fetch_request(args: &Args, offset: i64, correlation_id: i32) -> Result<BytesMut> {
    let mut partition = FetchPartition::default();
    partition.partition = 0;
    partition.current_leader_epoch = -1;
    partition.fetch_offset = offset;
    partition.log_start_offset = -1;
    partition.partition_max_bytes = args.fetch_bytes as i32;
    let mut topic = FetchTopic::default();
    topic.topic = topic_name(args);
    topic.partitions = vec![partition];
    let mut request = FetchRequest::default();
    request.replica_id = BrokerId(-1);
    request.max_wait_ms = FETCH_WAIT_MS;
    request.min_bytes = 1;
    request.max_bytes = args.fetch_bytes as i32;
    request.session_epoch = -1;
    request.topics = vec![topic];
    frame(ApiKey::Fetch, FETCH_VERSION, correlation_id, &request)
}

/// Whole batches in `records` at or after `offset`: (records counted, next offset).
fn count_records(mut records: &[u8], offset: i64) -> Result<(u64, i64)> {
    let (mut count, mut next) = (0u64, offset);
    while records.len() >= HEADER_BYTES {
        let header = BatchHeader::parse(records)?;
        let total = header.total_bytes();
        if total > records.len() {
            break; // a partial batch at the end of the fetch: fetched again next time
        }
        if header.next_offset() > next {
            count += (header.next_offset() - next.max(header.base_offset)) as u64;
            next = header.next_offset();
        }
        records = &records[total..];
    }
    Ok((count, next))
}

/// Sequential read from offset 0 with one fetch in flight (what a consumer does), until
/// `count` records have been seen.
pub fn read(args: &Args) -> Result<Outcome> {
    let stream = TcpStream::connect(&args.addr).with_context(|| format!("connecting to {}", args.addr))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(1 << 16, stream);
    let start = Instant::now();
    let (mut seen, mut offset, mut fetches) = (0u64, 0i64, 0i32);
    while seen < args.count {
        writer.write_all(&fetch_request(args, offset, fetches)?)?;
        fetches += 1;
        let response: FetchResponse = read_response(&mut reader, ApiKey::Fetch, FETCH_VERSION)?;
        let partition = response.responses.first().and_then(|t| t.partitions.first()).context("empty fetch")?;
        ensure!(partition.error_code == 0, "fetch error {}", partition.error_code);
        let (n, next) = count_records(partition.records.as_deref().unwrap_or_default(), offset)?;
        if n == 0 && partition.high_watermark <= offset {
            bail!("topic ends at {offset} before {} records", args.count);
        }
        seen += n;
        offset = next;
    }
    Ok(Outcome { messages: seen, bytes: seen * args.size as u64, elapsed: start.elapsed(), latencies_us: Vec::new() })
}
