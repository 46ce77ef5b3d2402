//! A request's element counts never size an allocation beyond what decodes. This file is
//! its own test binary on purpose: the test caps its process's address space.

use std::sync::Arc;

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, RequestHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kappa_broker::{Broker, BrokerConfig, Limits};
use kappa_log::{Log, LogOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

/// The address space the test process may use: plenty for the broker and a 100 MB frame,
/// below what pre-sizing from the wire counts asks for (~7 GB for Metadata, ~1.6 GB for a
/// legacy Fetch).
const ADDRESS_SPACE_BYTES_MAX: u64 = 3 << 29;

/// Caps this process's address space (nextest runs each test in its own process; this file
/// holds one test, so `cargo test` does too), as a small machine's memory would.
fn cap_address_space() {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--as={ADDRESS_SPACE_BYTES_MAX}"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit failed: {status}");
}

/// A Metadata v1 frame announcing `count` topics, followed by `count` bytes of 0xff: the
/// count passes the "no more elements than bytes left" check, and the first name's length
/// (-1) is read as a null name, so each 2 bytes decode into a ~100-byte element.
fn metadata_v1_announcing(count: i32) -> Vec<u8> {
    announcing(ApiKey::Metadata, 1, &[], count, count as usize)
}

/// A legacy Fetch v0 frame announcing `count` topics, then `bytes` bytes of 0xff (the first
/// topic's name length, -1, is refused): nothing but pre-sizing could cost memory.
fn legacy_fetch_v0_announcing(count: i32, bytes: usize) -> Vec<u8> {
    // replica id, max wait, min bytes
    announcing(ApiKey::Fetch, 0, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0], count, bytes)
}

fn announcing(key: ApiKey, version: i16, before: &[u8], count: i32, bytes: usize) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("t")));
    let mut payload = bytes::BytesMut::new();
    header.encode(&mut payload, key.request_header_version(version)).unwrap();
    payload.extend_from_slice(before);
    payload.extend_from_slice(&count.to_be_bytes());
    payload.resize(payload.len() + bytes, 0xff);
    let mut frame = (payload.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_announced_array_costs_no_memory_up_front() {
    cap_address_space();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = BrokerConfig { advertised_port: i32::from(addr.port()), ..BrokerConfig::default() };
    let broker = Broker::open(log, config).await.unwrap();
    tokio::spawn(kappa_broker::run(listener, broker, Limits::default(), std::future::pending::<()>()));

    // Without the bounds the broker asks for 100M × ~100 bytes at once here (or builds
    // 50M elements one by one), or 16M × ~100 bytes for the legacy Fetch, and aborts.
    let bytes = 100_000_000;
    for frame in [metadata_v1_announcing(bytes as i32), legacy_fetch_v0_announcing((bytes / 6) as i32, bytes)] {
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(&frame).await.unwrap();
        drop(frame);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(std::time::Duration::from_secs(60), bad.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an undecodable request closes its connection");
    }

    // The broker is still there.
    let mut good = TcpStream::connect(addr).await.unwrap();
    let response: MetadataResponse =
        common::call(&mut good, ApiKey::Metadata, 1, &MetadataRequest::default().with_topics(Some(vec![]))).await;
    assert_eq!(response.brokers.len(), 1);
}
