//! Scale-out (issue 6): the channels application's views run as three `work` processes
//! against a real `kappa serve` over TCP (librdkafka consumer group, cooperative-sticky,
//! Kafka transactions). One worker is SIGKILLed mid-stream and a replacement started. At
//! the end:
//! - each view's changelog, folded (read_committed, by `changelog_check.py`), equals the
//!   reference fold of everything produced (`channels_events.py expect`), and its step
//!   markers show every input offset applied exactly once (no step lost or duplicated);
//! - a surviving worker's HTTP reads (its read replica) equal the reference too;
//! - a subscription held on a surviving worker throughout saw its key's changes in order
//!   and ends at the reference value.
//!
//! Size: `EVENTS` (CI) or 1,000,000 with `SOAK=1`; `SEED=n` replays one run. The workers are
//! the `channels` example, which must be built with the `kafka` feature too (`cargo nextest
//! run -p kappa --features kafka` builds it; `--test scale_out` alone reuses whatever
//! example binary is on disk).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Server, example_binary, expected_views as expected, free_port, produce_channel_events as produce, repo_root, run,
};
use serde_json::Value;

/// Events produced in CI: enough for many steps and transactions per partition and a kill
/// in the middle, small enough for the 2-core CI budget (see the README's scale-out part).
const EVENTS: u64 = 200_000;
const CHUNKS: u64 = 4;
const VIEWS: [&str; 2] = ["channel_page", "channel_stats"];
const GROUP: &str = "scale-out-test";
/// The key the held subscription watches.
const WATCHED: &str = "c7";
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);

struct Worker {
    child: Option<Child>,
    http: SocketAddr,
    log: PathBuf,
}

impl Worker {
    fn start(server: &Server, dir: &Path, name: &str, views: &[&str]) -> Self {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(example_binary("channels"))
            .args(["work", "--bootstrap", &server.bootstrap(), "--group", GROUP, "--http-listen", &http.to_string()])
            .args(["--views", &views.join(",")])
            .args(["--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=500"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .spawn()
            .expect("start a worker");
        let mut worker = Self { child: Some(child), http, log };
        worker.wait_http();
        worker
    }

    fn wait_http(&mut self) {
        let started = Instant::now();
        while TcpStream::connect(self.http).is_err() {
            assert!(self.alive(), "the worker exited before serving HTTP; log:\n{}", self.log_text());
            assert!(started.elapsed() < Duration::from_secs(60), "worker HTTP not up; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn metric(&self, name: &str) -> i64 {
        let body = http_get(self.http, "/metrics").1;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Holds an SSE subscription, collecting its events (event name, data JSON).
fn subscribe(addr: SocketAddr, path: &str) -> Arc<Mutex<Vec<(String, Value)>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let mut stream = TcpStream::connect(addr).expect("connect");
    // HTTP/1.0: a close-delimited body, no chunk framing between the lines.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        let mut name = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(event) = line.strip_prefix("event: ") {
                name = event.to_owned();
            } else if let Some(Ok(value)) = line.strip_prefix("data: ").map(serde_json::from_str) {
                sink.lock().unwrap().push((name.clone(), value));
            }
        }
    });
    events
}

fn changelog_check(server: &Server, view: &str) -> Value {
    let mut command = Command::new("python3");
    command.arg(repo_root().join("tests/clients/python/changelog_check.py"));
    command.args([
        "--bootstrap",
        &server.bootstrap(),
        "--topic",
        &format!("__kappa.view.{view}.v1"),
        "--input",
        "channels",
    ]);
    serde_json::from_str(&run(&mut command, Duration::from_secs(600), server)).expect("changelog check JSON")
}

/// Every key of a view as a worker serves it.
fn served(worker: &Worker, view: &str) -> BTreeMap<String, Value> {
    let (status, body) = http_get(worker.http, &format!("/v1/views/{view}/keys?limit=10000"));
    assert_eq!(status, 200, "scan {view}: {body}");
    let body: Value = serde_json::from_str(&body).expect("scan JSON");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| (item["key"].as_str().expect("key").to_owned(), item["value"].clone()))
        .collect()
}

fn wait_owned(workers: &mut [&mut Worker], partitions: i64) {
    let started = Instant::now();
    loop {
        let owned: i64 = workers.iter().map(|w| w.metric("kappa_work_owned_partitions")).sum();
        if owned == partitions {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "workers own {owned} of {partitions} partitions after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_workers_survive_kill9_exactly_once() {
    let soak = std::env::var("SOAK").is_ok_and(|v| v == "1");
    let events = if soak { 1_000_000 } else { EVENTS };
    let seed: u64 = std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11);
    eprintln!("scale_out: seed {seed}, {events} events; replay with SEED={seed}");
    let started = Instant::now();
    let temp = tempfile::tempdir().expect("temp dir");
    let server = Server::start_in(&temp.path().join("data"), &[]);
    let mut w0 = Worker::start(&server, temp.path(), "w0", &VIEWS);
    let mut w1 = Worker::start(&server, temp.path(), "w1", &VIEWS);
    let mut w2 = Worker::start(&server, temp.path(), "w2", &VIEWS);
    wait_owned(&mut [&mut w0, &mut w1, &mut w2], 4);
    let watch = subscribe(w0.http, &format!("/v1/views/channel_page/watch?key={WATCHED}"));
    let per_chunk = events / CHUNKS;
    let mut replacement = None;
    for chunk in 0..CHUNKS {
        produce(&server, seed, chunk * per_chunk, per_chunk);
        if chunk == CHUNKS / 2 - 1 {
            // Mid-stream: w1 is applying what was just produced.
            let applied_before = w1.metric("kappa_work_transactions_committed_total");
            w1.kill9();
            eprintln!("scale_out: killed w1 after {applied_before} of its transactions; starting w3");
            replacement = Some(Worker::start(&server, temp.path(), "w3", &VIEWS));
        }
    }
    let mut w3 = replacement.expect("replacement worker");
    eprintln!("scale_out: produced {events} events in {:?}", started.elapsed());
    let expected = expected(&server, seed, events);
    // Caught up: the surviving worker's replica serves the reference state.
    let caught_up = Instant::now();
    loop {
        if VIEWS.iter().all(|view| served(&w0, view) == expected[*view]) {
            break;
        }
        assert!(
            w0.alive() && w2.alive() && w3.alive(),
            "a worker exited:\n{}\n{}\n{}",
            w0.log_text(),
            w2.log_text(),
            w3.log_text()
        );
        assert!(
            caught_up.elapsed() < CATCH_UP_TIMEOUT,
            "views did not reach the reference state within {CATCH_UP_TIMEOUT:?}; w0 log:\n{}\nw3 log:\n{}",
            w0.log_text(),
            w3.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("scale_out: caught up {:?} after producing", caught_up.elapsed());
    for view in VIEWS {
        let check = changelog_check(&server, view);
        assert_eq!(check["errors"], serde_json::json!([]), "view {view}: changelog step markers");
        let positions: i64 =
            check["positions"].as_object().expect("positions").values().map(|v| v.as_i64().unwrap()).sum();
        assert_eq!(positions, events as i64, "view {view}: the changelog's markers cover every input offset");
        let state: BTreeMap<String, Value> = serde_json::from_value(check["state"].clone()).expect("state");
        assert_eq!(state, expected[view], "view {view}: the folded changelog differs from the reference fold");
    }
    // The held subscription: changes in changelog order, ending at the reference value.
    let watched = watch.lock().unwrap().clone();
    assert_eq!(watched.first().map(|(name, _)| name.as_str()), Some("snapshot"), "subscription: {watched:?}");
    let mut last: Option<(i64, i64)> = None;
    for (name, data) in &watched[1..] {
        assert_eq!(name, "change", "subscription: unexpected event {name}: {data}");
        let (partition, offset) = data["position"].as_str().and_then(|p| p.split_once('.')).expect("position");
        let position = (partition.parse().unwrap(), offset.parse().unwrap());
        assert!(
            last.is_none_or(|l| l.0 == position.0 && l.1 < position.1),
            "subscription out of order: {last:?} then {position:?}"
        );
        last = Some(position);
    }
    assert!(watched.len() > 10, "the subscription saw only {} events", watched.len());
    assert_eq!(watched.last().unwrap().1["value"], expected["channel_page"][WATCHED], "subscription's last value");
    // w1's partitions moved: their new owners restored their (non-empty) changelogs.
    let restored: i64 = [&w0, &w2, &w3].iter().map(|w| w.metric("kappa_work_restored_records_total")).sum();
    assert!(restored > 0, "no worker restored state from a changelog after the kill");
    let owned: i64 = [&w0, &w2, &w3].iter().map(|w| w.metric("kappa_work_owned_partitions")).sum();
    assert_eq!(owned, 4, "the survivors and the replacement own every partition");
    eprintln!(
        "scale_out: passed in {:?}; {} subscription events; {restored} changelog records restored after the kill",
        started.elapsed(),
        watched.len()
    );
}

/// A view keyed by something other than its input's record key (`owner_channels`, keyed by
/// owner) is refused in work mode with an error that says why, and the partition stops.
#[test]
fn view_not_keyed_by_its_input_is_refused() {
    let temp = tempfile::tempdir().expect("temp dir");
    let server = Server::start_in(&temp.path().join("data"), &[]);
    let mut worker = Worker::start(&server, temp.path(), "w", &["owner_channels"]);
    wait_owned(&mut [&mut worker], 4);
    produce(&server, 5, 0, 200);
    let started = Instant::now();
    loop {
        let (status, body) = http_get(worker.http, "/health");
        if status == 503 {
            assert!(body.contains("owner_channels") && body.contains("repartition"), "health: {body}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no failure reported; log:\n{}", worker.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(worker.log_text().contains("must be keyed by its input's record key"), "log:\n{}", worker.log_text());
}
