//! Fetch v0-3 (kafka-node) against the real broker over a socket: stored record batches,
//! compressed or not, come back as message sets of the magic the version reads, from the
//! fetch offset on.

use std::sync::Arc;

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
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("kafka-node")));
    let mut body = BytesMut::new();
    header.encode(&mut body, 1).unwrap();
    body.put_i32(-1); // replica id
    body.put_i32(100); // max wait ms
    body.put_i32(1); // min bytes
    if version >= 3 {
        body.put_i32(1 << 20);
    }
    body.put_i32(1);
    body.put_i16(topic.len() as i16);
    body.put_slice(topic.as_bytes());
    body.put_i32(1);
    body.put_i32(0);
    body.put_i64(offset);
    body.put_i32(1 << 20);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_fetches_get_compressed_and_plain_batches_as_message_sets_from_the_fetch_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    log.create_topic("t", 1, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(log, BrokerConfig::default()).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut offset = 0;
    for (compression, count) in [(Compression::Gzip, 4), (Compression::None, 2), (Compression::Zstd, 3)] {
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
