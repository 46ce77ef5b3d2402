//! Live-subscription benchmark client (against a running channels application).
//!
//! ```text
//! live_bench latency --http 127.0.0.1:8080 --seconds 10
//!     subscribes to channel_page prefix "lat-" over one WebSocket and, for each change whose
//!     name is "t-<unix ns when produced>", records now - then (same machine clock);
//!     prints p50/p99/max after --seconds without... after --seconds.
//! live_bench fanout --http 127.0.0.1:8080 --connections 10000 --server-pid PID
//!     opens N WebSockets each subscribed to channel_page key "hot", reads the server's RSS
//!     before and after, produces one change over HTTP and measures until the last
//!     subscriber has it.
//! ```

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn latency(http: &str, seconds: u64) {
    let stream = TcpStream::connect(http).expect("connect");
    stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let request = tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{http}/v1/ws")).unwrap();
    let (mut ws, _) = tungstenite::client::client(request, stream).expect("websocket");
    let subscribe = json!({"op": "subscribe", "id": "lat", "view": "channel_page", "prefix": "lat-"});
    ws.send(tungstenite::Message::Text(subscribe.to_string().into())).unwrap();
    println!("ready");
    let mut lags = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let text = match ws.read() {
            Ok(tungstenite::Message::Text(text)) => text,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("websocket: {e}"),
        };
        let received = now_ns();
        let message: Value = serde_json::from_str(&text).unwrap();
        if message["type"] == "change"
            && let Some(sent) =
                message["value"]["name"].as_str().and_then(|n| n.strip_prefix("t-")).and_then(|n| n.parse::<i64>().ok())
        {
            lags.push((received - sent) as f64 / 1e6);
        }
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if lags.is_empty() {
        println!("no changes received");
        return;
    }
    println!(
        "changes {} p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1]
    );
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn post(http: &str, path: &str, body: &Value) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(http).unwrap();
    let body = body.to_string();
    write!(stream, "POST {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

fn fanout(http: String, connections: usize, server_pid: String) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    post(
        &http,
        "/v1/topics/channels/records",
        &json!({"records": [{"key": "hot", "value": {"channelId": "hot", "name": "before", "ownerId": "u"}, "headers": {"kappa.type": "ChannelCreated"}}]}),
    );
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(&server_pid);
    let ready = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let started = Instant::now();
    runtime.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(200));
        for _ in 0..connections {
            let (http, ready, done, limit) = (http.clone(), ready.clone(), done_tx.clone(), limit.clone());
            let permit = limit.acquire_owned().await.unwrap();
            tokio::spawn(async move {
                let (mut ws, _) =
                    tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws")).await.expect("connect");
                let subscribe = json!({"op": "subscribe", "id": "h", "view": "channel_page", "key": "hot"});
                ws.send(tokio_tungstenite::tungstenite::Message::Text(subscribe.to_string().into())).await.unwrap();
                while let Some(Ok(message)) = ws.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
                    let message: Value = serde_json::from_str(&text).unwrap();
                    if message["type"] == "snapshot" {
                        ready.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        break;
                    }
                }
                while let Some(Ok(message)) = ws.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = message else { continue };
                    if text.contains("\"type\":\"change\"") {
                        let _ = done.send(Instant::now());
                        break;
                    }
                }
                // Keep the connection open until the benchmark ends.
                std::future::pending::<()>().await;
            });
        }
        while ready.load(Ordering::Relaxed) < connections {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let connect_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(&server_pid);
    let sent = Instant::now();
    post(
        &http,
        "/v1/topics/channels/records",
        &json!({"records": [{"key": "hot", "value": {"channelId": "hot", "name": "after", "ownerId": "u"}, "headers": {"kappa.type": "ChannelUpdated"}}]}),
    );
    let mut last = sent;
    let mut first = None;
    runtime.block_on(async {
        for _ in 0..connections {
            let at = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
                .await
                .expect("every subscriber gets the change")
                .unwrap();
            first.get_or_insert(at);
            last = last.max(at);
        }
    });
    println!(
        "fanout {connections} subscribers: connected+snapshots in {connect_secs:.1} s; server RSS {:.0} MiB -> {:.0} MiB ({:.1} KiB per subscriber); change delivered to the first after {:.1} ms, to the last after {:.1} ms",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before)) as f64 / connections as f64,
        first.unwrap().duration_since(sent).as_secs_f64() * 1e3,
        last.duration_since(sent).as_secs_f64() * 1e3
    );
    runtime.shutdown_background();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let http = arg(&args, "--http", "127.0.0.1:8080");
    match args.get(1).map(String::as_str) {
        Some("latency") => latency(&http, arg(&args, "--seconds", "10").parse().unwrap()),
        Some("fanout") => {
            fanout(http, arg(&args, "--connections", "10000").parse().unwrap(), arg(&args, "--server-pid", ""))
        }
        _ => eprintln!("usage: live_bench latency|fanout --http ADDR ..."),
    }
}
