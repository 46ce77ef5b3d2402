//! Robustness of the API against what is outside its control: resume tokens from a changelog
//! that was deleted and created again, records (and open transactions) in a changelog that
//! the view engine did not write, snapshots too large for one message, key indexes fed by unguarded writes, unknown query parameters, oversized WebSocket
//! messages, and clients that open connections and send nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use kappa_http::HttpConfig;
use kappa_log::records::{BatchBuilder, ControlType, NewRecord};
use serde_json::{Value, json};

const CHANGELOG: &str = "__kappa.view.latest.v1";

fn started(config: HttpConfig) -> Kappa {
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    kappa
}

fn offset(token: &str) -> i64 {
    token.rsplit_once('.').unwrap().1.parse().unwrap()
}

/// A kappa on a new data directory (a wiped or restored one) has changelogs created anew:
/// their offsets count from 0 again and name other changes. A token from before must get
/// `reset` and a fresh snapshot, even once the new changelog is longer than the token's
/// offset — never the changes after that offset in the other history.
#[test]
fn a_token_from_a_changelog_created_again_gets_reset_and_a_snapshot() {
    let first = started(HttpConfig::default());
    first.produce(json!([{"key": "k", "value": 1}]));
    first.wait_caught_up("latest");
    let mut ws = Ws::connect(first.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k"}));
    let snapshot = ws.next();
    assert_eq!((snapshot["type"].as_str(), snapshot["items"][0]["value"].as_i64()), (Some("snapshot"), Some(1)));
    let token = snapshot["token"].as_str().unwrap().to_owned();
    drop(ws);
    drop(first.stop());

    let second = started(HttpConfig::default());
    let changelog = second.log.partition(CHANGELOG, 0).unwrap();
    let mut value = 100;
    while changelog.high_watermark() <= offset(&token) + 2 {
        value += 1;
        second.produce(json!([{"key": "k", "value": value}]));
        second.wait_caught_up("latest");
    }
    let mut ws = Ws::connect(second.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k", "resume": token}));
    let reset = ws.next();
    assert_eq!(reset["type"], "reset", "{reset}");
    assert!(reset["reason"].as_str().unwrap().contains("created again"), "{reset}");
    let snapshot = ws.next();
    assert_eq!((snapshot["type"].as_str(), snapshot["items"][0]["value"].as_i64()), (Some("snapshot"), Some(value)));
    assert_ne!(snapshot["token"].as_str().unwrap().rsplit_once('.').unwrap().0, token.rsplit_once('.').unwrap().0);

    // A token of an older server (no changelog id) is never resumed either.
    let old_format = format!("1.{}", offset(&token));
    ws.send(&json!({"op": "subscribe", "id": "old", "view": "latest", "key": "k", "resume": old_format}));
    let reset = ws.next();
    assert_eq!((reset["id"].as_str(), reset["type"].as_str()), (Some("old"), Some("reset")), "{reset}");
    assert_eq!(ws.next()["type"], "snapshot");

    // Reads hand out positions in the same form, and they resume.
    let (status, read) = second.get("/v1/views/latest/keys/k");
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["position"], snapshot["token"], "a read's position names its changelog");
    let mut fresh = Ws::connect(second.addr);
    fresh.send(&json!({"op": "subscribe", "id": "read", "view": "latest", "key": "k", "resume": read["position"]}));
    second.produce(json!([{"key": "k", "value": -1}]));
    let change = fresh.next();
    assert_eq!((change["id"].as_str(), change["type"].as_str()), (Some("read"), Some("change")), "{change}");
}

/// Appends one record straight to the view's changelog, as a Kafka client could.
fn forge(kappa: &Kappa, key: &str, value: &[u8]) -> i64 {
    let batch = BatchBuilder::new().record(NewRecord::new(Some(key.as_bytes()), Some(value), 0)).build();
    kappa.log.partition(CHANGELOG, 0).unwrap().append(batch).unwrap().base_offset
}

/// A changelog record whose value is not JSON (a Kafka client wrote it; the view engine
/// writes JSON only) is skipped: live subscribers, subscribers catching up over it and new
/// subscribers all go on getting the view's changes.
#[test]
fn a_changelog_record_that_is_not_json_is_skipped_and_subscribers_keep_going() {
    let kappa = started(HttpConfig::default());
    kappa.produce(json!([{"key": "a", "value": 1}]));
    kappa.wait_caught_up("latest");
    let mut live = Ws::connect(kappa.addr);
    live.send(&json!({"op": "subscribe", "id": "all", "view": "latest", "prefix": ""}));
    let snapshot = live.next();
    assert_eq!(snapshot["type"], "snapshot");
    forge(&kappa, "a", b"not json {");
    kappa.produce(json!([{"key": "b", "value": 2}]));
    let change = live.next();
    assert_eq!((change["key"].as_str(), change["value"].as_i64()), (Some("b"), Some(2)), "{change}");

    // Catching up over the record, from a token before it.
    let mut resumed = Ws::connect(kappa.addr);
    resumed.send(&json!({"op": "subscribe", "id": "r", "view": "latest", "prefix": "", "resume": snapshot["token"]}));
    let change = resumed.next();
    assert_eq!((change["key"].as_str(), change["value"].as_i64()), (Some("b"), Some(2)), "{change}");

    // Both keep following.
    kappa.produce(json!([{"key": "c", "value": 3}]));
    for ws in [&mut live, &mut resumed] {
        let change = ws.next();
        assert_eq!((change["key"].as_str(), change["value"].as_i64()), (Some("c"), Some(3)), "{change}");
    }
    let (status, body) = kappa.get("/v1/views/latest/keys/a");
    assert_eq!((status, body["value"].as_i64()), (200, Some(1)), "{body}");
}

/// A changelog holding an open transaction (a Kafka client began one there and has not
/// ended it): the hub, which can read nothing past it, waits for the log to move instead of
/// reading again at once, and the changes behind it reach subscribers when it ends.
#[test]
fn an_open_transaction_in_a_changelog_does_not_make_the_hub_spin() {
    let kappa = started(HttpConfig::default());
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "all", "view": "latest", "prefix": ""}));
    assert_eq!(ws.next()["type"], "snapshot");
    let changelog = kappa.log.partition(CHANGELOG, 0).unwrap();
    let open = BatchBuilder::new().producer(7, 0, 0).transactional(true);
    changelog.append(open.record(NewRecord::new(Some(b"forged"), Some(b"not json {"), 0)).build()).unwrap();
    kappa.produce(json!([{"key": "a", "value": 1}]));
    kappa.wait_caught_up("latest");
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    assert!(used < Duration::from_millis(300), "{used:?} of CPU in 1 s with nothing readable");
    changelog.append(BatchBuilder::control_marker(7, 0, ControlType::Commit, 0, 0).build()).unwrap();
    let change = ws.next();
    assert_eq!((change["key"].as_str(), change["value"].as_i64()), (Some("a"), Some(1)), "{change}");
}

/// CPU time this process has used, all threads (Linux: /proc/self/stat, in USER_HZ = 100
/// ticks a second). Only this test's own under nextest, which runs each test in a process
/// of its own (as scripts/test-all does); `cargo test` would count its neighbours too.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The key index behind `expected_offset` stays within its limit when unguarded writes
/// extend it: past the limit it is dropped, and the next guarded write is refused with
/// `key_index_full` instead of checking against an index that outgrew it.
#[test]
fn unguarded_writes_do_not_grow_the_key_index_past_its_limit() {
    let kappa = started(HttpConfig::default());
    let (status, body) = kappa.post("/v1/topics", &json!({"name": "indexed", "partitions": 1}));
    assert_eq!(status, 201, "{body}");
    kappa.state.produce.set_key_index_bytes_max(200);
    let write = |records: Value| kappa.post("/v1/topics/indexed/records", &json!({ "records": records }));
    let (status, body) = write(json!([{"key": "a", "value": 1, "expected_offset": -1}]));
    assert_eq!(status, 200, "{body}");
    // Five new 50-byte keys: about 370 bytes of index, each write alone well within 200.
    for i in 0..5 {
        let (status, body) = write(json!([{"key": format!("{i:050}"), "value": i}]));
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = write(json!([{"key": "a", "value": 2, "expected_offset": 0}]));
    assert_eq!((status, body["error"]["code"].as_str()), (507, Some("key_index_full")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not a setting") && message.contains("without expected_offset"), "{message}");
    // Unguarded writes go on.
    let (status, body) = write(json!([{"key": "a", "value": 3}]));
    assert_eq!(status, 200, "{body}");
}

/// `/watch` refuses a query parameter it does not take with the JSON error every route
/// uses, instead of ignoring it and streaming.
#[test]
fn watch_refuses_unknown_query_parameters_with_a_json_error() {
    let kappa = started(HttpConfig::default());
    for query in ["key=a&bogus=1", "key=a&key=b", "keys=a"] {
        let (status, body) = kappa.get(&format!("/v1/views/latest/watch?{query}"));
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_query")), "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("?key="), "{query}: {body}");
    }
    // EventSource polyfills that cannot set headers send the last event id in the URL: it is
    // read as a token (this one is malformed, so it is refused as a token, not as a parameter).
    let (status, body) = kappa.get("/v1/views/latest/watch?key=a&lastEventId=nonsense");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_token")), "{body}");
}

/// Limits name the flag that sets them.
#[test]
fn limit_errors_name_the_flag_that_sets_the_limit() {
    let config = HttpConfig { request_body_bytes_max: 1024, ..HttpConfig::default() };
    let kappa = started(config);
    let (status, body) = kappa.get("/v1/views/latest/keys?limit=100000");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--http-page-items-max"), "{body}");
    let big = json!({"records": [{"key": "k", "value": "x".repeat(2000)}]});
    let (status, body) = kappa.post("/v1/topics/items/records", &big);
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("--http-request-body-bytes-max"), "{body}");
}

/// A WebSocket message over `ws_message_bytes_max` is answered with an error and the
/// connection stays, up to twice the limit or 1 MiB, whichever is more (what the WebSocket
/// layer buffers); a larger one closes the connection.
#[test]
fn the_websocket_layer_buffers_messages_up_to_twice_the_limit_or_1_mib() {
    let config = HttpConfig { ws_message_bytes_max: 1024, ..HttpConfig::default() };
    let kappa = started(config);
    let mut ws = Ws::connect(kappa.addr);
    let subscribe = |key_bytes: usize| {
        format!(r#"{{"op":"subscribe","id":"big","view":"latest","key":"{}"}}"#, "k".repeat(key_bytes))
    };
    ws.send_text(&subscribe(1500));
    let error = ws.next();
    assert_eq!(error["code"], "message_too_large", "{error}");
    assert!(error["message"].as_str().unwrap().contains("--http-ws-message-bytes-max"), "{error}");
    // Far over the configured limit but under the 1 MiB floor: still an answer, not a close
    // (kappa.js would take a close for a network failure and resend it forever).
    ws.send_text(&subscribe(100_000));
    let error = ws.next();
    assert_eq!(error["code"], "message_too_large", "{error}");
    // Past the floor the server closes while the message is still arriving: the send itself
    // may fail with a reset.
    let sent = ws.socket.send(tungstenite::Message::text(subscribe(2 * 1024 * 1024)));
    let ended = if sent.is_err() {
        "closed"
    } else {
        loop {
            match ws.socket.read() {
                Ok(tungstenite::Message::Close(_)) => break "closed",
                Ok(tungstenite::Message::Text(text)) => panic!("answered instead of closing: {text}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break "still open",
                Err(_) => break "closed",
            }
        }
    };
    assert_eq!(ended, "closed");
}

/// A prefix whose snapshot would not fit in one WebSocket frame (16 MiB) is refused for that
/// subscription alone with `snapshot_too_large`, naming the byte limit; the connection and
/// its other subscriptions go on (the frame used to fail the socket's write, closing the
/// connection, and kappa.js reconnected and asked again, forever). SSE refuses it before the
/// stream starts.
#[test]
fn a_snapshot_over_the_byte_limit_is_refused_and_the_connection_stays() {
    let kappa = started(HttpConfig::default());
    // 24 values of 750 KiB (under the input topic's 1 MiB records): 17.6 MiB under "big",
    // 7.3 MiB under "big0".
    let value = "x".repeat(750 * 1024);
    for i in 0..24 {
        kappa.produce(json!([{"key": format!("big{i:02}"), "value": value}]));
    }
    kappa.produce(json!([{"key": "small", "value": 1}]));
    kappa.wait_caught_up("latest");
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "small", "view": "latest", "key": "small"}));
    assert_eq!(ws.next()["type"], "snapshot");
    ws.send(&json!({"op": "subscribe", "id": "big", "view": "latest", "prefix": "big"}));
    let refused = ws.next();
    assert_eq!(
        (refused["id"].as_str(), refused["type"].as_str(), refused["code"].as_str()),
        (Some("big"), Some("error"), Some("snapshot_too_large")),
        "{}",
        &refused.to_string()[..refused.to_string().len().min(300)]
    );
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("at most 8388608 bytes (SNAPSHOT_BYTES_MAX") && message.contains("longer prefix"),
        "{message}"
    );
    kappa.produce(json!([{"key": "small", "value": 2}]));
    let change = ws.next();
    assert_eq!((change["id"].as_str(), change["value"].as_i64()), (Some("small"), Some(2)), "{change}");
    // Under the limit, a snapshot of several large values still goes out.
    ws.send(&json!({"op": "subscribe", "id": "some", "view": "latest", "prefix": "big0"}));
    let snapshot = ws.next();
    assert_eq!((snapshot["id"].as_str(), snapshot["items"].as_array().map(Vec::len)), (Some("some"), Some(10)));
    let (status, body) = kappa.get("/v1/views/latest/watch?prefix=big");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("snapshot_too_large")), "{body}");
}

/// A page of keys is bounded by bytes as well as by `limit`: it ends after the value that
/// takes it past `PAGE_BYTES_MAX` (8 MiB), with a cursor, and paging on returns every key
/// once (a page of 1,000 values of up to 4 MiB was one answer of up to 4 GiB).
#[test]
fn a_page_of_large_values_ends_at_the_byte_limit_with_a_cursor() {
    let kappa = started(HttpConfig::default());
    // 24 values of 750 KiB: 17.6 MiB in all, 11 of them pass 8 MiB.
    let value = "x".repeat(750 * 1024);
    for i in 0..24 {
        kappa.produce(json!([{"key": format!("big{i:02}"), "value": value}]));
    }
    kappa.wait_caught_up("latest");
    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let (status, body) = kappa.get(&format!("/v1/views/latest/keys?prefix=big&limit=1000&after={after}"));
        assert_eq!(status, 200, "{}", &body.to_string()[..body.to_string().len().min(300)]);
        let keys: Vec<String> =
            body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_owned()).collect();
        pages.push(keys);
        match body["cursor"].as_str() {
            Some(cursor) => after = cursor.to_owned(),
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [11, 11, 2], "keys per page");
    let keys: Vec<String> = pages.concat();
    assert_eq!(keys, (0..24).map(|i| format!("big{i:02}")).collect::<Vec<_>>());
}

/// A client's close gets the close frame that completes the handshake, with the client's
/// code: the server used to drop the socket, which clients report as an abnormal close (1006).
#[test]
fn a_websocket_closed_by_the_client_is_closed_cleanly() {
    let kappa = started(HttpConfig::default());
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "a", "view": "latest", "key": "k"}));
    assert_eq!(ws.next()["type"], "snapshot");
    let normal = tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.socket.close(Some(normal)).expect("send close");
    let reply = loop {
        match ws.socket.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close frame came back: {e}"),
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(tungstenite::protocol::frame::coding::CloseCode::Normal));
}

/// A second server on `kappa`'s state with short connection timeouts.
fn serve_with_timeouts(kappa: &Kappa, timeouts: kappa_http::ConnectionTimeouts) -> std::net::SocketAddr {
    let listener = kappa.runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    kappa.runtime.spawn(kappa_http::run_with(listener, kappa.state.clone(), timeouts, std::future::pending()));
    addr
}

/// Reads until the server closes the connection; false if it is still open after `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

const SHORT: kappa_http::ConnectionTimeouts =
    kappa_http::ConnectionTimeouts { header_read_timeout_ms: 300, idle_connection_timeout_ms: 500 };

/// Connections that send nothing, send half a header, or sit idle after a response are
/// closed, so idle sockets cannot hold every connection slot.
#[test]
fn connections_without_a_request_are_closed() {
    let kappa = started(HttpConfig::default());
    let addr = serve_with_timeouts(&kappa, SHORT);
    let mut silent = TcpStream::connect(addr).unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(30)), "a connection that sent nothing stayed open");

    let mut partial = TcpStream::connect(addr).unwrap();
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed_within(&mut partial, Duration::from_secs(30)), "a connection with half a header stayed open");

    // Keep-alive: a request is answered, then the idle connection is closed.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = [0; 12];
    idle.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert!(closed_within(&mut idle, Duration::from_secs(30)), "an idle keep-alive connection stayed open");
}

/// The timeouts never cut a request in flight or a WebSocket: a long-poll read longer than
/// both timeouts is answered, and a quiet WebSocket subscription (its client answering the
/// server's pings) outlives several of them and still gets changes.
#[test]
fn requests_in_flight_and_websockets_outlive_the_connection_timeouts() {
    // Pings every 500 ms, answered by the client's reads.
    let kappa = started(HttpConfig { ws_silence_ms_max: 1500, ..HttpConfig::default() });
    let addr = serve_with_timeouts(&kappa, SHORT);
    let started = Instant::now();
    let (status, body) = request(addr, "GET", "/v1/topics/items/partitions/0/records?offset=0&wait_ms=2000", None, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(2000), "the read did not wait: {body}");

    let mut ws = Ws::connect(addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "quiet"}));
    assert_eq!(ws.next()["type"], "snapshot");
    // Quiet for four idle timeouts: nothing but the server's pings arrives (each answered by
    // the next read), and the connection stays.
    let quiet_until = Instant::now() + Duration::from_millis(4 * SHORT.idle_connection_timeout_ms);
    ws.socket.get_mut().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while Instant::now() < quiet_until {
        match ws.socket.read() {
            Ok(tungstenite::Message::Text(text)) => panic!("nothing changed, yet: {text}"),
            Ok(tungstenite::Message::Close(frame)) => panic!("closed: {frame:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("the quiet WebSocket failed: {e}"),
        }
    }
    ws.socket.get_mut().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    kappa.produce(json!([{"key": "quiet", "value": 1}]));
    let change = ws.next();
    assert_eq!((change["type"].as_str(), change["value"].as_i64()), (Some("change"), Some(1)), "{change}");
}
