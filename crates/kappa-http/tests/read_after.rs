//! Read-your-writes: a view read with `after_offsets` (the offsets a produce answered) waits
//! until the serving version has applied them — against a real log, view engine and socket.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kappa_http::HttpConfig;
use kappa_views::{Event, EventError, Reducer, View};
use serde_json::{Value, json};

/// `latest` (key → value), but applying the record keyed `slow` waits until `open` is set
/// (at most `HELD_MAX`): a view held behind for as long as a test needs.
struct Held {
    open: Arc<AtomicBool>,
}

const HELD_MAX: Duration = Duration::from_secs(60);

impl Reducer for Held {
    type State = Value;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &Event) -> Result<Option<Value>, EventError> {
        match event.key_str() {
            Some("slow") => {
                let since = Instant::now();
                while !self.open.load(Ordering::Acquire) && since.elapsed() < HELD_MAX {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Some("boom") => return Err(EventError::new("boom")),
            _ => {}
        }
        Ok(event.payload()?.cloned())
    }
}

fn started() -> Kappa {
    started_held().0
}

/// [`started`], with the gate that lets the view past a `slow` record.
fn started_held() -> (Kappa, Arc<AtomicBool>) {
    let open = Arc::new(AtomicBool::new(false));
    let view = View::reducer("latest", 1, &[TOPIC], Held { open: open.clone() });
    let kappa = Kappa::start(vec![view], HttpConfig::default());
    kappa.wait_caught_up("latest");
    (kappa, open)
}

/// `topic:partition:offset,...` for every offset of a produce answer.
fn after(produced: &Value) -> String {
    let offsets = produced["offsets"].as_array().unwrap().iter();
    offsets.map(|o| format!("{TOPIC}:{}:{}", o["partition"], o["offset"])).collect::<Vec<_>>().join(",")
}

/// Without `after_offsets` such reads miss the write now and then (the view applies it a
/// moment later); with it, every key read and every page right after its produce has it.
#[test]
fn a_read_after_its_produce_sees_the_write_every_time() {
    let kappa = started();
    for i in 0..40 {
        let produced = kappa.produce(json!([{"key": format!("k{i}"), "value": i}]));
        let started = Instant::now();
        let (status, body) = kappa.get(&format!("/v1/views/latest/keys/k{i}?after_offsets={}", after(&produced)));
        assert_eq!((status, &body["value"]), (200, &json!(i)), "read {i}: {body}");
        // Woken by the view's step, not at the end of the 5 s default wait.
        assert!(started.elapsed() < Duration::from_secs(3), "read {i} took {:?}", started.elapsed());
        let (status, page) =
            kappa.get(&format!("/v1/views/latest/keys?prefix=k{i}&after_offsets={}&wait_ms=3000", after(&produced)));
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["items"], json!([{"key": format!("k{i}"), "value": i}]), "page {i}");
    }
    // One request over all three partitions (a transaction): one offset per partition.
    let records: Vec<Value> = (0..3).map(|p| json!({"key": format!("t{p}"), "value": p, "partition": p})).collect();
    let produced = kappa.produce(json!(records));
    let (status, page) = kappa.get(&format!("/v1/views/latest/keys?prefix=t&after_offsets={}", after(&produced)));
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");
}

/// A view behind the offsets for longer than `wait_ms` answers 504 `view_behind` with where
/// it is; the same read a moment later succeeds.
#[test]
fn a_view_held_behind_answers_504_with_its_position_and_a_retry_succeeds() {
    let (kappa, open) = started_held();
    kappa.produce(json!([{"key": "slow", "value": 0, "partition": 1}]));
    let produced = kappa.produce(json!([{"key": "mine", "value": 1, "partition": 1}]));
    let offset = produced["offsets"][0]["offset"].as_i64().unwrap();
    let started = Instant::now();
    let (status, body) = kappa.get(&format!("/v1/views/latest/keys/mine?after_offsets=items:1:{offset}&wait_ms=200"));
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(200), "answered before wait_ms passed");
    let error = &body["error"];
    assert_eq!(
        (error["code"].as_str(), error["view"].as_str(), error["version"].as_u64()),
        (Some("view_behind"), Some("latest"), Some(1)),
        "{body}"
    );
    assert_eq!(error["waited_ms"], 200, "{body}");
    let behind = &error["behind"][0];
    assert_eq!(
        (behind["topic"].as_str(), behind["partition"].as_i64(), behind["offset"].as_i64()),
        (Some(TOPIC), Some(1), Some(offset)),
        "{body}"
    );
    assert!(behind["position"].as_i64().unwrap() <= offset, "{body}");
    assert!(error["message"].as_str().unwrap().contains("read again"), "{body}");

    open.store(true, Ordering::Release);
    let (status, body) = kappa.get(&format!("/v1/views/latest/keys/mine?after_offsets=items:1:{offset}&wait_ms=10000"));
    assert_eq!((status, &body["value"]), (200, &json!(1)), "{body}");
}

/// A serving version stopped at an event before the offsets never applies them: the read
/// fails at once with why it stopped, rather than waiting out `wait_ms`.
#[test]
fn a_stopped_view_fails_the_read_at_once() {
    let kappa = started();
    kappa.produce(json!([{"key": "boom", "value": 0, "partition": 2}]));
    let produced = kappa.produce(json!([{"key": "after-boom", "value": 1, "partition": 2}]));
    let started = Instant::now();
    let path = format!("/v1/views/latest/keys/after-boom?after_offsets={}&wait_ms=20000", after(&produced));
    let (status, body) = kappa.get(&path);
    assert_eq!(status, 500, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10), "waited for a stopped view: {:?}", started.elapsed());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("failed") && message.contains("boom"), "{body}");
}

/// What is not a valid wait is a 400 saying what was wrong, before any waiting.
#[test]
fn bad_after_offsets_and_wait_ms_are_400() {
    let kappa = started();
    let cases = [
        ("after_offsets=items:3:0", "not_an_input", "items (partitions 0 to 2)"),
        ("after_offsets=other:0:0", "not_an_input", "does not read other/0"),
        ("after_offsets=items:0", "invalid_after_offsets", "topic>:<partition>:<offset>"),
        ("after_offsets=items:x:1", "invalid_after_offsets", "'items:x:1'"),
        ("after_offsets=items:0:-1", "invalid_after_offsets", "'items:0:-1'"),
        ("after_offsets=", "invalid_after_offsets", "''"),
        ("after_offsets=items:0:0&wait_ms=30001", "invalid_wait_ms", "wait_ms is at most 30000"),
        ("wait_ms=10", "invalid_wait_ms", "give after_offsets"),
        ("after_offsets=items:0:0&as_of=0", "invalid_query", "give one of them"),
    ];
    for (query, code, says) in cases {
        for path in [format!("/v1/views/latest/keys/k?{query}"), format!("/v1/views/latest/keys?{query}")] {
            if path.contains("as_of") && !path.contains("/keys/") {
                continue; // a page has no as_of
            }
            let started = Instant::now();
            let (status, body) = kappa.get(&path);
            assert_eq!((status, body["error"]["code"].as_str()), (400, Some(code)), "{path}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{path}: {message}");
            assert!(started.elapsed() < Duration::from_secs(2), "{path} waited");
        }
    }
}

/// An offset at or past its partition's end was answered by no produce (a typo, another
/// topic's offset, a topic created again): a 400 at once saying where the partition ends,
/// not a wait of `wait_ms` ending in a 504 that says to read again.
#[test]
fn an_offset_past_the_partitions_end_is_400_at_once() {
    let kappa = started();
    let produced = kappa.produce(json!([{"key": "k", "value": 1, "partition": 0}]));
    let end = produced["offsets"][0]["offset"].as_i64().unwrap() + 1;
    for (asked, says) in [
        (format!("items:0:{end}"), format!("items/0 ends at {end}")),
        (format!("items:0:{}", end + 1000), format!("items/0 ends at {end}")),
        ("items:2:0".to_owned(), "items/2 ends at 0".to_owned()),
    ] {
        for path in [
            format!("/v1/views/latest/keys/k?after_offsets={asked}&wait_ms=20000"),
            format!("/v1/views/latest/keys?after_offsets={asked}&wait_ms=20000"),
        ] {
            let started = Instant::now();
            let (status, body) = kappa.get(&path);
            assert_eq!((status, body["error"]["code"].as_str()), (400, Some("offset_not_written")), "{path}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(&says) && message.contains("a produce answered"), "{path}: {message}");
            assert!(started.elapsed() < Duration::from_secs(5), "{path} waited {:?}", started.elapsed());
        }
    }
    // The last offset written is still a wait that succeeds.
    let (status, body) = kappa.get(&format!("/v1/views/latest/keys/k?after_offsets=items:0:{}", end - 1));
    assert_eq!((status, &body["value"]), (200, &json!(1)), "{body}");
}
