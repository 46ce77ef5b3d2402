//! A peer that pipelines requests and never reads its replies loses its connection after
//! `response_write_timeout`, instead of pinning the replies and a connection slot forever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, FetchRequest, FetchResponse, RequestHeader, ResponseKind};
use kappa_broker::{BoxFuture, Handler, Limits, Peer, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

mod common;

/// Answers every request with a fetch answer of 1 MiB of records.
struct BigAnswers;

const ANSWER_BYTES: usize = 1 << 20;

impl Handler for BigAnswers {
    fn handle<'a>(&'a self, _request: Request, _header: &'a RequestHeader, _peer: &'a Peer) -> BoxFuture<'a, Response> {
        Box::pin(async move {
            let partition = PartitionData::default().with_records(Some(Bytes::from(vec![0u8; ANSWER_BYTES])));
            ResponseKind::Fetch(
                FetchResponse::default()
                    .with_responses(vec![FetchableTopicResponse::default().with_partitions(vec![partition])]),
            )
        })
    }
}

/// An ApiVersions round trip on a new connection; false if the server closed it instead.
async fn answered(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else { return false };
    let request = common::frame(ApiKey::ApiVersions, 0, 1, &ApiVersionsRequest::default());
    if stream.write_all(&request).await.is_err() {
        return false;
    }
    let mut size = [0u8; 4];
    matches!(tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut size)).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_disconnected() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // One connection: while the stuck one holds its slot, every other is turned away. The
    // timeout leaves the probe below seconds to be turned away before the slot frees (a
    // loaded machine may take hundreds of ms to accept it).
    let limits = Limits { connections_max: 1, response_write_timeout: Duration::from_secs(3), ..Limits::default() };
    tokio::spawn(kappa_broker::run(listener, Arc::new(BigAnswers), limits, std::future::pending::<()>()));

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(addr).await.unwrap();
    // Far more answers than the socket buffers hold; never read any of them.
    let fetch = common::frame(ApiKey::Fetch, 12, 1, &FetchRequest::default());
    for _ in 0..64 {
        stuck.write_all(&fetch).await.unwrap();
    }
    assert!(!answered(addr).await, "the stuck connection holds the only slot");

    // Once the broker gives up on the stuck connection, the slot is free again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !answered(addr).await {
        assert!(tokio::time::Instant::now() < deadline, "the connection that never reads was never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stuck);
}
