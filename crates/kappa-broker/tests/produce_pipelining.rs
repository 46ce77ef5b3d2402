//! Produce requests pipelined on one connection: appended in request order, answered in
//! request order, each answered only once durable — while the durability waits overlap.

use std::sync::Arc;

use kafka_protocol::messages::{ApiKey, ProduceResponse};
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

mod common;

const VERSION: i16 = 7;
const REQUESTS: i32 = 100;

fn produce_frame(correlation_id: i32) -> Vec<u8> {
    let batch =
        BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(correlation_id.to_string().as_bytes()), 1)).build();
    common::frame(ApiKey::Produce, VERSION, correlation_id, &common::produce_request("p", batch, None))
}

async fn read_response(stream: &mut TcpStream) -> (i32, ProduceResponse) {
    common::read_response(stream, ApiKey::Produce, VERSION).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_produces_are_ordered_durable_and_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let fs = kappa_log::io::sim::SimFs::new();
    let options = LogOptions { fs: Arc::new(fs.clone()), ..LogOptions::default() };
    let log = Arc::new(Log::open(dir.path(), options).unwrap().0);
    log.create_topic("p", 1, &Default::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(log.clone(), BrokerConfig::default()).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));
    let syncs_before = fs.stats().sync_data;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let all: Vec<u8> = (0..REQUESTS).flat_map(produce_frame).collect();
    stream.write_all(&all).await.unwrap();
    let partition = log.partition("p", 0).unwrap();
    for expected in 0..REQUESTS {
        let (correlation_id, response) = read_response(&mut stream).await;
        assert_eq!(correlation_id, expected, "responses come back in request order");
        let p = &response.responses[0].partition_responses[0];
        assert_eq!((p.error_code, p.base_offset), (0, i64::from(expected)), "appended in request order");
        assert!(partition.high_watermark() > i64::from(expected), "answered only once durable");
    }
    let syncs = fs.stats().sync_data - syncs_before;
    assert!(syncs < REQUESTS as u64, "{syncs} fdatasyncs for {REQUESTS} pipelined requests: waits did not overlap");
    let read = partition.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    let decoded_values: Vec<i64> = {
        let mut values = Vec::new();
        let mut rest = read.records.as_slice();
        while !rest.is_empty() {
            let header = kappa_log::batch::BatchHeader::parse(rest).unwrap();
            let batch = kappa_log::records::decode_records(&rest[..header.total_bytes()], 1 << 20).unwrap();
            values.extend(batch.iter().map(|r| std::str::from_utf8(r.value.unwrap()).unwrap().parse::<i64>().unwrap()));
            rest = &rest[header.total_bytes()..];
        }
        values
    };
    assert_eq!(decoded_values, (0..i64::from(REQUESTS)).collect::<Vec<_>>());
}
