//! The protocol layer over real sockets: ApiVersions, framing limits, bad input, ordering,
//! legacy requests, acks=0, connection limit, graceful shutdown, and kcat if installed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, FetchResponse, MetadataRequest, MetadataResponse,
    ProduceResponse, RequestHeader, RequestKind, ResponseKind,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kappa_broker::legacy::message_set;
use kappa_broker::{API_SUPPORT, BoxFuture, Handler, Limits, Peer, Request, Response};
use kappa_log::records::{BatchBuilder, NewRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod common;

/// Answers Metadata (one broker: itself) and Produce (offset 0), recording what it saw.
/// A client id of `sleep-N` delays the answer by N ms.
struct TestHandler {
    port: u16,
    /// Correlation ids of the requests the handler has begun on (before any `sleep-N`).
    begun: Mutex<Vec<i32>>,
    seen: Mutex<Vec<(RequestHeader, Request)>>,
}

impl Handler for TestHandler {
    fn handle<'a>(&'a self, request: Request, header: &'a RequestHeader, _peer: &'a Peer) -> BoxFuture<'a, Response> {
        Box::pin(async move {
            self.begun.lock().unwrap().push(header.correlation_id);
            if let Some(ms) = header.client_id.as_deref().and_then(|c| c.strip_prefix("sleep-")) {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            }
            self.seen.lock().unwrap().push((header.clone(), request.clone()));
            match request {
                RequestKind::Produce(p) => ResponseKind::Produce(
                    ProduceResponse::default().with_responses(
                        p.topic_data
                            .iter()
                            .map(|t| {
                                TopicProduceResponse::default().with_name(t.name.clone()).with_partition_responses(
                                    t.partition_data
                                        .iter()
                                        .map(|pd| {
                                            PartitionProduceResponse::default().with_index(pd.index).with_base_offset(0)
                                        })
                                        .collect(),
                                )
                            })
                            .collect(),
                    ),
                ),
                RequestKind::Fetch(f) => {
                    let mut batch = BatchBuilder::new()
                        .record(NewRecord::new(Some(b"k"), Some(b"v"), 5000))
                        .record(NewRecord::new(None, Some(b"w"), 5001));
                    batch.base_offset = f.topics[0].partitions[0].fetch_offset;
                    let batch = Bytes::from(batch.build());
                    // Old clients read message sets: the handler converts, as the broker's does.
                    let version = header.request_api_version;
                    let records = match kappa_broker::legacy::handles(ApiKey::Fetch, version) {
                        true => {
                            let magic = kappa_broker::legacy::fetch::magic_for(version);
                            let offset = f.topics[0].partitions[0].fetch_offset;
                            message_set::down_convert(&batch, magic, offset, 1 << 20, message_set::SetLimit::NONE)
                                .unwrap()
                        }
                        false => batch,
                    };
                    ResponseKind::Fetch(FetchResponse::default().with_responses(vec![
                        FetchableTopicResponse::default().with_topic(f.topics[0].topic.clone()).with_partitions(vec![
                                    PartitionData::default()
                                        .with_partition_index(0)
                                        .with_high_watermark(f.topics[0].partitions[0].fetch_offset + 2)
                                        .with_records(Some(records)),
                                ]),
                    ]))
                }
                _ => ResponseKind::Metadata(MetadataResponse::default().with_controller_id(BrokerId(0)).with_brokers(
                    vec![
                            MetadataResponseBroker::default()
                                .with_node_id(BrokerId(0))
                                .with_host(StrBytes::from_static_str("127.0.0.1"))
                                .with_port(self.port as i32),
                        ],
                )),
            }
        })
    }
}

struct Server {
    addr: SocketAddr,
    handler: Arc<TestHandler>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler =
        Arc::new(TestHandler { port: addr.port(), begun: Mutex::new(Vec::new()), seen: Mutex::new(Vec::new()) });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(kappa_broker::run(listener, handler.clone(), limits, async {
        let _ = stopped.await;
    }));
    Server { addr, handler, stop, task }
}

fn header(key: ApiKey, version: i16, correlation_id: i32, client_id: &'static str) -> RequestHeader {
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(client_id)))
}

/// Header + body, size-prefixed. The header version is the one the api key implies.
fn request_frame<T: Encodable>(h: &RequestHeader, body: &T) -> Vec<u8> {
    let key = ApiKey::try_from(h.request_api_key).unwrap();
    let mut payload = BytesMut::new();
    h.encode(&mut payload, key.request_header_version(h.request_api_version)).unwrap();
    body.encode(&mut payload, h.request_api_version).unwrap();
    raw_frame(&payload)
}

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Reads one response frame; None if the server closed the connection.
async fn recv(stream: &mut TcpStream) -> Option<Bytes> {
    let mut size = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut size)).await.expect("response in time").ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(Bytes::from(body))
}

/// Polls `done` every 10 ms until it holds; fails after 30 s (a loaded CI machine).
async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after 30 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An ApiVersions v0 round trip on a new connection; None if the server closed it instead.
async fn try_api_versions(addr: SocketAddr) -> Option<ApiVersionsResponse> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&request_frame(&header(ApiKey::ApiVersions, 0, 9, "t"), &ApiVersionsRequest::default())).await.ok()?;
    let mut frame = recv(&mut s).await?;
    assert_eq!(frame.get_i32(), 9, "correlation id");
    Some(ApiVersionsResponse::decode(&mut frame, 0).unwrap())
}

async fn api_versions(addr: SocketAddr, version: i16) -> (i32, ApiVersionsResponse, Bytes) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("test"))
        .with_client_software_version(StrBytes::from_static_str("1.0"));
    s.write_all(&request_frame(&header(ApiKey::ApiVersions, version, 7, "t"), &req)).await.unwrap();
    let frame = recv(&mut s).await.expect("a response");
    let mut body = frame.clone();
    let correlation_id = body.get_i32(); // response header v0, always
    let decode_version = if version > API_SUPPORT.range(ApiKey::ApiVersions).unwrap().max { 0 } else { version };
    (correlation_id, ApiVersionsResponse::decode(&mut body, decode_version).unwrap(), frame)
}

fn assert_matches_table(resp: &ApiVersionsResponse) {
    let got: Vec<(i16, i16, i16)> = resp.api_keys.iter().map(|k| (k.api_key, k.min_version, k.max_version)).collect();
    let want: Vec<(i16, i16, i16)> = API_SUPPORT.iter().map(|r| (r.key as i16, r.min, r.max)).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn api_versions_v0_and_v3() {
    let server = start(Limits::default()).await;
    let (cid, v0, _) = api_versions(server.addr, 0).await;
    assert_eq!((cid, v0.error_code), (7, 0));
    assert_matches_table(&v0);
    let (cid, v3, frame) = api_versions(server.addr, 3).await;
    assert_eq!((cid, v3.error_code), (7, 0));
    assert_matches_table(&v3);
    // No tagged fields anywhere: the body ends with throttle_time_ms then an empty tag buffer.
    assert_eq!(&frame[frame.len() - 5..], &[0, 0, 0, 0, 0]);
    assert!(server.handler.seen.lock().unwrap().is_empty(), "ApiVersions is answered by the protocol layer");
}

#[tokio::test]
async fn unsupported_api_versions_gets_error_35_in_v0_layout() {
    let server = start(Limits::default()).await;
    // v4 is what kafka-python 3 sends first.
    let (cid, resp, frame) = api_versions(server.addr, 4).await;
    assert_eq!((cid, resp.error_code), (7, 35));
    assert_matches_table(&resp);
    // v0 layout exactly: correlation id, error, array of (key, min, max), nothing else.
    let v0_len = 4 + 2 + 4 + 6 * API_SUPPORT.iter().count();
    assert_eq!(frame.len(), v0_len);
    // A far-future version with a body we cannot parse gets the same answer.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut p = BytesMut::new();
    header(ApiKey::ApiVersions, 127, 8, "t").encode(&mut p, 2).unwrap();
    p.put_slice(&[0xde, 0xad, 0xbe, 0xef]);
    s.write_all(&raw_frame(&p)).await.unwrap();
    let mut frame = recv(&mut s).await.unwrap();
    assert_eq!(frame.len(), v0_len);
    assert_eq!(frame.get_i32(), 8);
    assert_eq!(ApiVersionsResponse::decode(&mut frame, 0).unwrap().error_code, 35);
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection() {
    let server = start(Limits { request_bytes_max: 1024, ..Limits::default() }).await;
    let mut bad = TcpStream::connect(server.addr).await.unwrap();
    bad.write_all(&(200 * 1024 * 1024i32).to_be_bytes()).await.unwrap();
    assert!(recv(&mut bad).await.is_none());
    let (_, resp, _) = api_versions(server.addr, 3).await;
    assert_eq!(resp.error_code, 0);
}

#[tokio::test]
async fn garbage_after_valid_header_closes_only_that_connection() {
    let server = start(Limits::default()).await;
    let mut bad = TcpStream::connect(server.addr).await.unwrap();
    let mut payload = BytesMut::new();
    header(ApiKey::Metadata, 1, 1, "t").encode(&mut payload, 1).unwrap();
    payload.put_slice(&[0, 0, 0, 5, 0xff]); // five topics promised, one byte given
    bad.write_all(&raw_frame(&payload)).await.unwrap();
    assert!(recv(&mut bad).await.is_none());
    // An unknown api key and an unsupported version close the connection too.
    for (key, version) in [(999i16, 0i16), (ApiKey::Fetch as i16, 99)] {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let mut p = BytesMut::new();
        p.put_i16(key);
        p.put_i16(version);
        p.put_i32(1);
        p.put_i16(-1);
        s.write_all(&raw_frame(&p)).await.unwrap();
        assert!(recv(&mut s).await.is_none(), "key {key} v{version}");
    }
    let (_, resp, _) = api_versions(server.addr, 0).await;
    assert_eq!(resp.error_code, 0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(Limits::default()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut all = Vec::new();
    // The first is the slowest; its answer must still come first.
    for (cid, client) in [(1, "sleep-150"), (2, "sleep-0"), (3, "sleep-50")] {
        all.extend(request_frame(&header(ApiKey::Metadata, 1, cid, client), &MetadataRequest::default()));
    }
    all.extend(request_frame(&header(ApiKey::ApiVersions, 0, 4, "t"), &ApiVersionsRequest::default()));
    s.write_all(&all).await.unwrap();
    for expected in 1..=4 {
        let mut frame = recv(&mut s).await.unwrap();
        assert_eq!(frame.get_i32(), expected);
        if expected < 4 {
            let resp = MetadataResponse::decode(&mut frame, 1).unwrap();
            assert_eq!(resp.brokers[0].port, server.addr.port() as i32);
        }
    }
}

/// Limits now come from flags, so any value may arrive: ones past what tokio's channels
/// and semaphores can count are served as that maximum, not a panic in each connection.
#[tokio::test]
async fn limits_past_what_tokio_counts_still_serve() {
    let huge = Limits {
        in_flight_per_connection: usize::MAX,
        pending_replies_per_connection: usize::MAX,
        request_bytes_buffered_max: usize::MAX,
        connections_max: usize::MAX,
        ..Limits::default()
    };
    let server = start(huge).await;
    let (cid, answer, _) = api_versions(server.addr, 3).await;
    assert_eq!((cid, answer.error_code), (7, 0));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request_frame(&header(ApiKey::Metadata, 1, 1, "sleep-0"), &MetadataRequest::default())).await.unwrap();
    let mut frame = recv(&mut s).await.expect("a Metadata answer");
    assert_eq!(frame.get_i32(), 1);
}

#[tokio::test]
async fn legacy_produce_v2_reaches_the_handler_as_sent_and_is_answered_in_v2_layout() {
    let server = start(Limits::default()).await;
    let mut set = BytesMut::new();
    message_set::encode_message(&mut set, 0, 1, 0, 1234, Some(b"key"), Some(b"value"));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&common::legacy_produce_v2_frame("events", 1, 11, &set)).await.unwrap();
    let mut frame = recv(&mut s).await.unwrap();
    assert_eq!(frame.get_i32(), 11);
    // [topic "events", [partition 0, error 0, base_offset 0, log_append_time -1]], throttle 0
    let mut expected = BytesMut::new();
    expected.put_i32(1);
    expected.put_i16(6);
    expected.put_slice(b"events");
    expected.put_i32(1);
    expected.put_i32(0);
    expected.put_i16(0);
    expected.put_i64(0);
    expected.put_i64(-1);
    expected.put_i32(0);
    assert_eq!(frame, expected.freeze());
    let seen = server.handler.seen.lock().unwrap();
    let RequestKind::Produce(p) = &seen[0].1 else { panic!("not a produce") };
    // The message set reaches the handler as sent; the broker's produce converts it.
    let set = p.topic_data[0].partition_data[0].records.clone().unwrap();
    assert!(kappa_broker::legacy::produce::is_message_set(&set));
    let batch = kappa_broker::legacy::produce::up_convert(&set).unwrap();
    kappa_log::batch::validate(&batch, 1 << 20).unwrap();
    let records = kappa_log::records::decode_records(&batch, 1 << 20).unwrap();
    let first = records.get(0).unwrap();
    assert_eq!(first.key, Some(&b"key"[..]));
    assert_eq!(first.timestamp(), 1234);
}

#[tokio::test]
async fn legacy_fetch_v0_and_v2_answers_are_written_in_their_layouts() {
    let server = start(Limits::default()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    for version in [0i16, 2] {
        let mut p = BytesMut::new();
        header(ApiKey::Fetch, version, 20 + version as i32, "kafka-node").encode(&mut p, 1).unwrap();
        p.put_i32(-1); // replica
        p.put_i32(100); // max wait
        p.put_i32(1); // min bytes
        p.put_i32(1);
        p.put_i16(6);
        p.put_slice(b"events");
        p.put_i32(1);
        p.put_i32(0); // partition
        p.put_i64(40); // fetch offset
        p.put_i32(1 << 20);
        s.write_all(&raw_frame(&p)).await.unwrap();
        let mut frame = recv(&mut s).await.unwrap();
        assert_eq!(frame.get_i32(), 20 + version as i32);
        if version >= 1 {
            assert_eq!(frame.get_i32(), 0, "throttle_time_ms");
        }
        assert_eq!(frame.get_i32(), 1);
        assert_eq!(frame.get_i16(), 6);
        frame.advance(6);
        assert_eq!(frame.get_i32(), 1);
        assert_eq!((frame.get_i32(), frame.get_i16(), frame.get_i64()), (0, 0, 42));
        let len = frame.get_i32() as usize;
        assert_eq!(frame.len(), len);
        let msgs = message_set::decode(&frame, 1 << 20, false).unwrap();
        let magic = if version >= 2 { 1 } else { 0 };
        let ts = |t| if magic == 1 { t } else { -1 };
        let got: Vec<_> = msgs.iter().map(|m| (m.offset, m.magic, m.timestamp, m.value.clone().unwrap())).collect();
        assert_eq!(
            got,
            vec![(40, magic, ts(5000), Bytes::from_static(b"v")), (41, magic, ts(5001), Bytes::from_static(b"w"))]
        );
    }
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let server = start(Limits { idle_timeout: Duration::from_millis(100), ..Limits::default() }).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(recv(&mut s).await.is_none());
}

/// The idle timeout bounds only the wait for a request to begin: a request whose bytes come
/// slowly but within `frame_read_timeout` is answered even past the idle timeout (it used to
/// close the connection: the idle clock covered the whole frame).
#[tokio::test]
async fn a_request_that_has_begun_is_not_cut_by_the_idle_timeout() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        frame_read_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let server = start(limits).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let frame = request_frame(&header(ApiKey::ApiVersions, 0, 7, "t"), &ApiVersionsRequest::default());
    let (first, rest) = frame.split_at(6);
    s.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(rest).await.unwrap();
    let mut answer = recv(&mut s).await.expect("an answer, not a closed connection");
    assert_eq!(answer.get_i32(), 7, "the ApiVersions answer");
}

/// True when the broker closes `s` within `within`: end of stream, or a reset (it closed
/// with bytes unread). Anything it sends first is read and dropped.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(within, async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} }).await.is_ok()
}

/// A peer that stalls inside a frame's 4-byte size is closed after `frame_read_timeout`,
/// not the (here longer) idle timeout.
#[tokio::test]
async fn a_stall_inside_the_size_field_is_closed_after_the_frame_read_timeout() {
    let limits = Limits {
        idle_timeout: Duration::from_secs(60),
        frame_read_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let server = start(limits).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[0, 0]).await.unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await,
        "a connection stalled inside its size field was still open after 10 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(150), "closed before the frame read timeout");
}

/// Torture F2: a peer that sent part of a big frame and stalled kept the connection (and
/// the bytes it sent) until the idle timeout, 10 minutes by default.
#[tokio::test]
async fn stalled_partial_frames_pinned_memory_without_bound() {
    let limits = Limits { frame_read_timeout: Duration::from_millis(200), ..Limits::default() };
    let server = start(limits).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&(10_000_000i32).to_be_bytes()).await.unwrap();
    s.write_all(&vec![0u8; 1_000_000]).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await, "the stalled connection was still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(150), "closed before the frame read timeout");
}

#[tokio::test]
async fn produce_with_acks_0_gets_no_response() {
    let server = start(Limits::default()).await;
    let mut set = BytesMut::new();
    message_set::encode_message(&mut set, 0, 1, 0, 1, None, Some(b"v"));
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let mut both = common::legacy_produce_v2_frame("events", 0, 11, &set);
    both.extend(request_frame(&header(ApiKey::ApiVersions, 0, 12, "t"), &ApiVersionsRequest::default()));
    s.write_all(&both).await.unwrap();
    let mut frame = recv(&mut s).await.unwrap();
    assert_eq!(frame.get_i32(), 12, "the first answer is the ApiVersions one");
    assert_eq!(server.handler.seen.lock().unwrap().len(), 1, "the produce was still handled");
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let server = start(Limits { connections_max: 1, ..Limits::default() }).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    first
        .write_all(&request_frame(&header(ApiKey::ApiVersions, 0, 1, "t"), &ApiVersionsRequest::default()))
        .await
        .unwrap();
    assert!(recv(&mut first).await.is_some());
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    let _ =
        second.write_all(&request_frame(&header(ApiKey::ApiVersions, 0, 2, "t"), &ApiVersionsRequest::default())).await;
    assert!(recv(&mut second).await.is_none());
    drop(first);
    // The permit comes back when the server has seen the first connection end: until then
    // a new connection is closed as over the limit, so try until one is answered.
    let mut answered = None;
    wait_until("a connection to be answered once the first one ended", async || {
        answered = try_api_versions(server.addr).await;
        answered.is_some()
    })
    .await;
    assert_eq!(answered.unwrap().error_code, 0);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops() {
    let server = start(Limits::default()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&request_frame(&header(ApiKey::Metadata, 1, 5, "sleep-200"), &MetadataRequest::default()))
        .await
        .unwrap();
    // Stop only once the request is in flight: the handler has begun on it (and sleeps 200 ms).
    wait_until("the handler to begin on the request", async || server.handler.begun.lock().unwrap().contains(&5)).await;
    server.stop.send(()).unwrap();
    let mut frame = recv(&mut s).await.expect("in-flight request answered");
    assert_eq!(frame.get_i32(), 5);
    assert!(recv(&mut s).await.is_none(), "then the connection closes");
    tokio::time::timeout(Duration::from_secs(5), server.task).await.expect("run returns").unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err(), "no longer accepting");
}

/// librdkafka 2.0.2 (Debian kcat) skips tagged fields wrongly; a metadata listing proves the
/// ApiVersions v3 handshake and flexible headers work with it. Skipped without kcat.
#[tokio::test]
async fn kcat_lists_metadata() {
    if std::process::Command::new("kcat").arg("-V").output().is_err() {
        eprintln!("kcat not installed; skipping");
        return;
    }
    let server = start(Limits::default()).await;
    let brokers = server.addr.to_string();
    let out = tokio::process::Command::new("kcat").args(["-L", "-b", &brokers, "-m", "5"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kcat failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 brokers"), "{stdout}");
}
