//! The HTTP API against a real log, view engine and loopback socket: every endpoint and
//! its errors, optimistic concurrency, WebSocket and SSE subscriptions, resume under churn,
//! cutover, slow consumers.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use kappa_http::HttpConfig;
use kappa_log::records::{BatchBuilder, NewRecord};
use serde_json::{Value, json};

fn started() -> Kappa {
    let kappa = Kappa::start(vec![latest(1)], HttpConfig::default());
    kappa.wait_caught_up("latest");
    kappa
}

/// A view version that stopped at an event it cannot apply makes `/health` say `degraded`,
/// naming it and why (it said `ok` while the view answered reads frozen where it stopped) —
/// still 200, as a liveness probe must not restart the server for it — and `/ready` 503; its
/// status reads `failed`, not `serving`, though it still serves.
#[test]
fn a_stopped_view_makes_health_degraded_ready_503_and_its_status_failed() {
    let kappa = started();
    kappa.produce(json!([{"key": "k", "value": 1}]));
    kappa.post(
        "/v1/topics/items/records",
        &json!({"records": [{"key": "bad", "value": "not json"}], "text_values": true}),
    );
    let started = std::time::Instant::now();
    let body = loop {
        let (status, body) = kappa.get("/ready");
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the view never stopped: {body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(kappa.get("/health"), (200, body.clone()), "liveness: the server itself is fine");
    let failed = &body["views_failed"][0];
    assert_eq!(
        (failed["view"].as_str(), failed["version"].as_u64(), failed["serving"].as_bool()),
        (Some("latest"), Some(1), Some(true)),
        "{body}"
    );
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("not valid JSON") && error.contains("dead-letter"), "{error}");
    let (_, view) = kappa.get("/v1/views/latest");
    assert_eq!(
        (view["versions"][0]["status"].as_str(), view["versions"][0]["serving"].as_bool()),
        (Some("failed"), Some(true)),
        "{view}"
    );
}

/// Fails at the record keyed `boom`: a new version that cannot be built.
struct FailsAtBoom;

impl kappa_views::Reducer for FailsAtBoom {
    type State = Value;

    fn key(&self, event: &kappa_views::Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &kappa_views::Event) -> Result<Option<Value>, kappa_views::EventError> {
        match event.key_str() {
            Some("boom") => Err(kappa_views::EventError::new("boom")),
            _ => Ok(Some(json!(1))),
        }
    }
}

/// A version that does not serve (a rebuild) and stopped is listed, but `/ready` (and
/// `/health`) stay 200: the reads are fine.
#[test]
fn a_stopped_version_that_does_not_serve_leaves_ready_200_and_degraded() {
    let kappa = started();
    kappa.produce(json!([{"key": "boom", "value": 1}]));
    kappa.wait_caught_up("latest");
    let dir = kappa.stop();
    let rebuild = kappa_views::View::reducer("latest", 2, &[TOPIC], FailsAtBoom);
    let kappa = Kappa::start_in(dir, vec![latest(1), rebuild], HttpConfig::default());
    let started = Instant::now();
    let body = loop {
        let (status, body) = kappa.get("/ready");
        if body["status"] == "degraded" {
            assert_eq!(status, 200, "{body}");
            assert_eq!(kappa.get("/health").0, 200);
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "v2 never stopped: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let failed = &body["views_failed"][0];
    assert_eq!((failed["version"].as_u64(), failed["serving"].as_bool()), (Some(2), Some(false)), "{body}");
}

/// A new view whose only version stopped before it ever caught up serves nothing, and will
/// not until an operator acts: `/ready` is 503 (it stayed 200 — only a stopped *serving*
/// version counted — so a server whose view answers nothing but `view_not_ready` stayed in
/// rotation); `/health` stays 200.
#[test]
fn a_view_nothing_serves_whose_only_version_stopped_makes_ready_503() {
    let kappa = started();
    kappa.produce(json!([{"key": "boom", "value": 1}]));
    kappa.wait_caught_up("latest");
    let dir = kappa.stop();
    let unbuildable = kappa_views::View::reducer("unbuildable", 1, &[TOPIC], FailsAtBoom);
    let kappa = Kappa::start_in(dir, vec![latest(1), unbuildable], HttpConfig::default());
    let started = Instant::now();
    let body = loop {
        let (status, body) = kappa.get("/ready");
        if status == 503 {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never unready: {status} {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(kappa.get("/health"), (200, body.clone()), "liveness: the server itself is fine");
    let failed = &body["views_failed"][0];
    assert_eq!(
        (failed["view"].as_str(), failed["version"].as_u64(), failed["serving"].as_bool()),
        (Some("unbuildable"), Some(1), Some(false)),
        "{body}"
    );
    let (status, read) = kappa.get("/v1/views/unbuildable/keys/boom");
    assert_eq!((status, read["error"]["code"].as_str()), (503, Some("view_not_ready")), "{read}");
}

#[test]
fn health_metrics_and_errors_are_json_with_stable_codes() {
    let kappa = started();
    assert_eq!(kappa.get("/health"), (200, json!({"status": "ok"})));
    let (status, body) = kappa.get("/nope");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("no_route")));
    let (status, body) = kappa.get("/v1/views/nope/keys/k");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_view")));
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"));
    let (status, text) = request_text(kappa.addr, "GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    assert!(text.contains("kappa_view_lag_records{view=\"latest\",version=\"1\"} 0"), "{text}");
    assert!(text.contains("kappa_partition_end_offset{topic=\"items\",partition=\"0\"}"), "{text}");
    assert!(text.contains("# TYPE kappa_subscriptions gauge"));
}

#[test]
fn topics_are_listed_created_and_described_and_bad_requests_say_why() {
    let kappa = started();
    let (status, body) =
        kappa.post("/v1/topics", &json!({"name": "orders", "partitions": 2, "configs": {"cleanup.policy": "compact"}}));
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["partitions"].as_array().unwrap().len(), 2);
    assert_eq!(body["configs"]["cleanup.policy"], "compact");
    let (_, list) = kappa.get("/v1/topics");
    let names: Vec<&str> = list["topics"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"orders") && names.contains(&"items"), "{names:?}");
    let cases = [
        (json!({"name": "orders"}), 409, "topic_exists"),
        (json!({"name": "bad name"}), 400, "invalid_topic_name"),
        (json!({"name": "x", "partitions": 0}), 400, "invalid_partitions"),
        (json!({"name": "y", "configs": {"cleanup.policy": "sometimes"}}), 400, "invalid_config"),
        (json!({"name": "z", "configs": {"no.such": "1"}}), 400, "unknown_config"),
        (json!({"name": "s", "configs": {"kappa.compaction.subkey.header": "contentId"}}), 400, "invalid_config"),
        (json!({"name": "__kappa.x"}), 400, "invalid_topic_name"),
        (json!({"nam": "typo"}), 400, "invalid_body"),
    ];
    for (request, status, code) in cases {
        let (got, body) = kappa.post("/v1/topics", &request);
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{request} → {body}");
    }
    let (status, body) = kappa.post_raw("/v1/topics", b"{not json");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_body")));
    let names = ["y", "z", "s"];
    assert!(names.iter().all(|name| kappa.log.topic(name).is_err()), "nothing created by bad requests");
    let (status, body) = kappa.get("/v1/topics/orders");
    assert_eq!(status, 200);
    assert_eq!(body["partitions"][1]["end_offset"], 0);
    assert_eq!(kappa.get("/v1/topics/missing").0, 404);
}

#[test]
fn produced_records_land_where_kafkas_partitioner_puts_them_and_reach_the_view() {
    let kappa = started();
    let body = kappa.produce(json!([
        {"key": "a", "value": {"n": 1}, "headers": {"kappa.type": "Thing"}},
        {"key": "b", "value": {"n": 2}},
        {"key": "c", "value": [1, 2], "partition": 2},
    ]));
    let offsets = body["offsets"].as_array().unwrap();
    assert_eq!(offsets[0]["partition"], kappa_http::topics::default_partition(b"a", 3));
    assert_eq!(offsets[1]["partition"], kappa_http::topics::default_partition(b"b", 3));
    assert_eq!(offsets[2]["partition"], 2);
    kappa.wait_caught_up("latest");
    let (status, a) = kappa.get("/v1/views/latest/keys/a");
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["value"], json!({"n": 1}));
    assert!(a["position"].as_str().unwrap().starts_with("1."), "a resume token: {a}");
    let (_, page) = kappa.get("/v1/views/latest/keys?limit=2");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["cursor"], "b");
    let (_, rest) = kappa.get("/v1/views/latest/keys?limit=2&after=b");
    assert_eq!(rest["items"], json!([{"key": "c", "value": [1, 2]}]));
    assert_eq!(rest["cursor"], Value::Null);
    let (_, prefixed) = kappa.get("/v1/views/latest/keys?prefix=b");
    assert_eq!(prefixed["items"], json!([{"key": "b", "value": {"n": 2}}]));
    // A tombstone deletes; the key then answers 404 with a JSON error.
    kappa.produce(json!([{"key": "a", "value": null}]));
    kappa.wait_caught_up("latest");
    let (status, body) = kappa.get("/v1/views/latest/keys/a");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_key")));
    let bad = [
        (json!({"records": []}), "invalid_records"),
        (json!({"records": [{"value": 1, "expected_offset": 3}]}), "invalid_records"),
        (json!({"records": [{"key": "k", "colour": 1}]}), "invalid_body"),
    ];
    for (request, code) in bad {
        let (status, body) = kappa.post("/v1/topics/items/records", &request);
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some(code)), "{request}");
    }
    assert_eq!(kappa.post("/v1/topics/nope/records", &json!({"records": [{"key": "k"}]})).0, 404);
    // A partition the topic does not have is not found, as for every other request.
    let (status, body) =
        kappa.post("/v1/topics/items/records", &json!({"records": [{"key": "k", "value": 1, "partition": 9}]}));
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_partition")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no partition 9; it has 3 partitions (0 to 2)"), "{message}");
    // A record without "value" is refused, never taken for a tombstone (on a compacted
    // topic a tombstone deletes the key): the message names the record and says how to send one.
    let ends = || -> Vec<i64> { (0..3).map(|p| kappa.log.partition(TOPIC, p).unwrap().log_end_offset()).collect() };
    let before = ends();
    let request = json!({"records": [{"key": "b", "value": 3}, {"key": "b", "headers": {"h": "v"}}]});
    let (status, body) = kappa.post("/v1/topics/items/records", &request);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_records")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("record 1 has no \"value\"") && message.contains("\"value\": null"), "{message}");
    assert_eq!(ends(), before, "nothing written");
    let (_, b) = kappa.get("/v1/views/latest/keys/b");
    assert_eq!(b["value"], json!({"n": 2}), "the key is still there");
    let (_, list) = kappa.get("/v1/views");
    assert_eq!(list["views"][0]["versions"][0]["status"], "serving");
}

#[test]
fn expected_offsets_guard_writes_and_exactly_one_of_two_racing_writers_wins() {
    let kappa = started();
    let first = kappa.produce(json!([{"key": "acct", "value": {"balance": 1}, "expected_offset": -1}]));
    let offset = first["offsets"][0]["offset"].as_i64().unwrap();
    let partition = first["offsets"][0]["partition"].as_i64().unwrap();
    // Wrong expectation: 409 with the current offset, and nothing written (the whole request).
    let end_before = kappa.log.partition(TOPIC, partition as i32).unwrap().log_end_offset();
    let (status, body) = kappa.post(
        "/v1/topics/items/records",
        &json!({"records": [{"key": "other", "value": 1}, {"key": "acct", "value": {"balance": 9}, "expected_offset": -1}]}),
    );
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("offset_mismatch")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&format!("offset {offset}")));
    assert_eq!(kappa.log.partition(TOPIC, partition as i32).unwrap().log_end_offset(), end_before, "nothing written");
    // Records written by anyone else count too (here: straight into the log, like a Kafka producer).
    let direct = kappa_log::records::BatchBuilder::new()
        .record(kappa_log::records::NewRecord::new(Some(b"acct"), Some(b"{\"balance\":5}"), 1))
        .build();
    let latest = kappa.log.partition(TOPIC, partition as i32).unwrap().append(direct).unwrap().base_offset;
    let (status, _) = kappa.post(
        "/v1/topics/items/records",
        &json!({"records": [{"key": "acct", "value": 2, "expected_offset": offset}]}),
    );
    assert_eq!(status, 409, "a Kafka producer's newer record is seen");
    kappa.produce(json!([{"key": "acct", "value": {"balance": 6}, "expected_offset": latest}]));
    // Races: two writers with the same expectation, many rounds: exactly one wins each.
    for round in 0..20 {
        let key = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|writer| {
                let (addr, barrier, key) = (kappa.addr, barrier.clone(), key.clone());
                std::thread::spawn(move || {
                    let body = json!({"records": [{"key": key, "value": {"writer": writer}, "expected_offset": -1}]})
                        .to_string();
                    barrier.wait();
                    request(addr, "POST", "/v1/topics/items/records", Some(body.as_bytes()), &[]).0
                })
            })
            .collect();
        let mut statuses: Vec<u16> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        statuses.sort();
        assert_eq!(statuses, vec![200, 409], "round {round}");
    }
}

#[test]
fn a_request_spanning_partitions_is_one_transaction_and_a_failure_aborts_all_of_it() {
    let kappa = started();
    let configs = BTreeMap::from([("cleanup.policy".to_owned(), "compact".to_owned())]);
    kappa.log.create_topic("pair", 2, &configs).unwrap();
    let committed_keys = |partition: i32| -> Vec<String> {
        let chunk = kappa.engine.backend().read_committed("pair", partition, 0, 1 << 20).unwrap();
        chunk.records.iter().map(|r| String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap()).collect()
    };
    // Partition 0's batch is appended, partition 1's is refused by the log (a compacted
    // topic needs keys): the whole request fails and partition 0's records are aborted
    // (present in the log, never visible committed).
    let (status, body) = kappa.post(
        "/v1/topics/pair/records",
        &json!({"records": [{"key": "a", "value": 1, "partition": 0}, {"value": 2, "partition": 1}]}),
    );
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("missing_key")), "{body}");
    let p0 = kappa.log.partition("pair", 0).unwrap();
    assert_eq!(p0.log_end_offset(), 2, "partition 0 holds the aborted record and its abort marker");
    assert_eq!(committed_keys(0), Vec::<String>::new());
    assert_eq!(committed_keys(1), Vec::<String>::new());
    // The next request spanning both partitions commits as one.
    let body = kappa.produce_to(
        "pair",
        json!([{"key": "c", "value": 1, "partition": 0}, {"key": "d", "value": 2, "partition": 1}, {"key": "e", "value": 3, "partition": 0}]),
    );
    let offsets: Vec<(i64, i64)> = body["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["partition"].as_i64().unwrap(), o["offset"].as_i64().unwrap()))
        .collect();
    // Partition 1 got only the abort marker (offset 0).
    assert_eq!(offsets, vec![(0, 2), (1, 1), (0, 3)]);
    assert_eq!(committed_keys(0), vec!["c", "e"]);
    assert_eq!(committed_keys(1), vec!["d"]);
    // expected_offset across partitions: the key index skips aborted records and markers.
    let (status, body) = kappa.post(
        "/v1/topics/pair/records",
        &json!({"records": [{"key": "a", "value": 2, "partition": 0, "expected_offset": -1}, {"key": "d", "value": 4, "partition": 1, "expected_offset": 1}]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(committed_keys(0), vec!["c", "e", "a"]);
    assert_eq!(committed_keys(1), vec!["d", "d"]);
}

/// Every committed record of `topic`/`partition` as (offset, key, value).
fn committed(kappa: &Kappa, topic: &str, partition: i32) -> Vec<(i64, String, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let chunk = kappa.engine.backend().read_committed(topic, partition, from, 1 << 20).unwrap();
        if chunk.next_offset <= from {
            return out;
        }
        for r in &chunk.records {
            let text = |b: &Option<_>| b.as_deref().map(|b: &[u8]| String::from_utf8(b.to_vec()).unwrap()).unwrap();
            out.push((r.offset, text(&r.key), text(&r.value)));
        }
        from = chunk.next_offset;
    }
}

#[test]
fn a_request_bigger_than_one_batch_is_split_and_written_atomically() {
    let kappa = started();
    kappa.log.create_topic("big", 1, &BTreeMap::new()).unwrap();
    // 1,000 records of 1,100 bytes: more than the default max.message.bytes (1 MiB + 12)
    // in one batch, well within the request body limit.
    let value = |i: usize| format!("{i:04}{}", "x".repeat(1096));
    let records: Vec<Value> = (0..1000).map(|i| json!({"key": format!("k{i:04}"), "value": value(i)})).collect();
    let (status, body) = kappa.post("/v1/topics/big/records", &json!({"records": records, "text_values": true}));
    assert_eq!(status, 200, "{body}");
    let offsets: Vec<i64> = body["offsets"].as_array().unwrap().iter().map(|o| o["offset"].as_i64().unwrap()).collect();
    let read = committed(&kappa, "big", 0);
    assert_eq!(read.len(), 1000);
    for (i, (offset, key, stored)) in read.iter().enumerate() {
        assert_eq!(
            (*offset, key.as_str(), stored.as_str()),
            (offsets[i], format!("k{i:04}").as_str(), value(i).as_str())
        );
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in request order");
    let p = kappa.log.partition("big", 0).unwrap();
    assert_eq!(p.log_end_offset(), 1001, "one transaction: the records and its commit marker");
    assert_eq!(p.last_stable_offset(), p.high_watermark(), "the transaction is committed");

    // A record that does not fit a batch of its own is refused, naming it and the limit.
    let configs = BTreeMap::from([("max.message.bytes".to_owned(), "1024".to_owned())]);
    kappa.log.create_topic("small", 1, &configs).unwrap();
    let (status, body) = kappa.post(
        "/v1/topics/small/records",
        &json!({"records": [{"key": "a", "value": 1}, {"key": "b", "value": "x".repeat(2000)}]}),
    );
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("records_too_large")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("record 1 ") && message.contains("max.message.bytes of 1024"), "{message}");
    assert_eq!(kappa.log.partition("small", 0).unwrap().log_end_offset(), 0, "nothing written");
    // Records that fit one by one but not together are split too.
    let records: Vec<Value> = (0..5).map(|i| json!({"key": format!("k{i}"), "value": "y".repeat(400)})).collect();
    kappa.produce_to("small", json!(records));
    assert_eq!(committed(&kappa, "small", 0).len(), 5);
}

#[test]
fn a_guarded_write_behind_an_open_transaction_answers_503_and_unguarded_writes_go_on() {
    let kappa = started();
    kappa.log.create_topic("held", 1, &BTreeMap::new()).unwrap();
    kappa.produce_to("held", json!([{"key": "a", "value": 1}]));
    // A transaction opened straight in the log (as a Kafka producer would) and never ended.
    let open = kappa_log::records::BatchBuilder::new()
        .producer(4242, 0, 0)
        .transactional(true)
        .record(kappa_log::records::NewRecord::new(Some(b"a"), Some(b"2"), 1))
        .build();
    let opened_at = kappa.log.partition("held", 0).unwrap().append(open).unwrap().base_offset;
    let addr = kappa.addr;
    // The guarded write waits (OPEN_TRANSACTION_WAIT_MS_MAX, 5 s) for the transaction to end,
    // then answers 503; an unguarded write sent meanwhile must not queue behind it. Only the
    // order of the two answers is checked, never a duration: a write that queues behind the
    // guarded one is answered after it, every time. One answered after it because it was
    // itself slower than the guarded one's whole wait (a stalled machine) proves nothing
    // either way, so that attempt is repeated, up to 3 in all.
    let mut inconclusive = Vec::new();
    for attempt in 0..3 {
        let guarded = std::thread::spawn(move || {
            let body = json!({"records": [{"key": "a", "value": 3, "expected_offset": 0}]}).to_string();
            let sent = Instant::now();
            let answer = request(addr, "POST", "/v1/topics/held/records", Some(body.as_bytes()), &[]);
            (answer, sent.elapsed(), Instant::now())
        });
        // Give the guarded write time to start waiting (if it has not, this write simply goes
        // first and the order below proves nothing, but cannot fail).
        std::thread::sleep(Duration::from_millis(300));
        let unguarded = json!({"records": [{"key": format!("b{attempt}"), "value": 4}]});
        let (status, body) = kappa.post("/v1/topics/held/records", &unguarded);
        assert_eq!(status, 200, "{body}");
        let unguarded_answered = Instant::now();
        let ((status, body), took, guarded_answered) = guarded.join().unwrap();
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("open_transaction")), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("since offset {opened_at}")) && message.contains("Retry"), "{message}");
        // It waited behind the transaction for as long as it says (a lower bound: a slow
        // machine only makes it longer).
        let waited_ms: u64 = message
            .split("(waited ")
            .nth(1)
            .and_then(|rest| rest.split(" ms)").next())
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no '(waited N ms)' in {message}"));
        assert!(waited_ms > 0 && took >= Duration::from_millis(waited_ms), "answered after {took:?}: {message}");
        if unguarded_answered < guarded_answered {
            return;
        }
        inconclusive.push(unguarded_answered.duration_since(guarded_answered));
    }
    panic!(
        "in 3 attempts the unguarded write was answered only after the guarded one had waited out the open \
         transaction (later by {inconclusive:?}): it queued behind it"
    );
}

#[test]
fn bad_queries_and_paths_are_json_errors_naming_what_is_accepted() {
    let kappa = started();
    kappa.produce(json!([{"key": "a", "value": 1}, {"key": "b", "value": 2}]));
    kappa.wait_caught_up("latest");
    let cases = [
        ("/v1/views/latest/keys?limit=abc", "invalid_query", "limit="),
        // The response's field is `cursor`; the parameter is `after`.
        ("/v1/views/latest/keys?limit=1&cursor=a", "invalid_query", "after="),
        // The CLI spells it --as-of; the query parameter is as_of.
        ("/v1/views/latest/keys/a?as-of=1", "invalid_query", "as_of="),
        ("/v1/topics/items/partitions/x/records?offset=0", "invalid_path", "<partition number"),
    ];
    for (path, code, accepted) in cases {
        let (status, body) = kappa.get(path);
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some(code)), "{path} → {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(accepted), "{path}: {message}");
    }
}

/// Key `k` = 1 written under version 1, then both versions deployed and version 2 (built
/// beside version 1) serving.
fn two_versions_with_v2_serving() -> Kappa {
    let dir = tempfile::tempdir().unwrap();
    let kappa = Kappa::start_in(dir, vec![latest(1)], HttpConfig::default());
    kappa.produce(json!([{"key": "k", "value": 1}]));
    kappa.wait_caught_up("latest");
    let dir = kappa.stop();
    let kappa = Kappa::start_in(dir, vec![latest(1), latest(2)], HttpConfig::default());
    let deadline = Instant::now() + Duration::from_secs(30);
    while kappa.get("/v1/views/latest").1["active"] != 2 {
        assert!(Instant::now() < deadline, "version 2 never took over");
        std::thread::sleep(Duration::from_millis(10));
    }
    kappa
}

#[test]
fn switching_versions_and_retiring_follow_the_rules() {
    let kappa = two_versions_with_v2_serving();
    assert_eq!(kappa.get("/v1/views/latest/keys/k").1["value"], json!({"v2": 1}));
    let (status, body) = kappa.delete("/v1/views/latest/versions/2");
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("version_serving")));
    let auto_switch = |version: u64| {
        let (_, view) = kappa.get("/v1/views/latest");
        view["versions"].as_array().unwrap().iter().find(|v| v["version"] == version).unwrap()["auto_switch"].clone()
    };
    assert_eq!((auto_switch(1), auto_switch(2)), (json!(true), json!(true)));
    assert_eq!(kappa.post("/v1/views/latest/switch", &json!({"version": 1})).0, 200);
    assert_eq!(kappa.get("/v1/views/latest/keys/k").1["value"], json!(1));
    assert_eq!(auto_switch(2), json!(false), "switched away from: it does not take over by itself");
    let (status, body) = kappa.post("/v1/views/latest/switch", &json!({"version": 7}));
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_version")));
    let (status, body) = kappa.post("/v1/views/latest/switch", &json!({"versoin": 2}));
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_body")));
    assert_eq!(kappa.post("/v1/views/latest/switch", &json!({"version": 2})).0, 200);
    assert_eq!((auto_switch(1), auto_switch(2)), (json!(false), json!(true)), "switched to: the mark goes");
    assert_eq!(kappa.delete("/v1/views/latest/versions/1").0, 200);
    let (_, view) = kappa.get("/v1/views/latest");
    assert_eq!(view["versions"].as_array().unwrap().len(), 1);
}

#[test]
fn as_of_reads_answer_from_the_past() {
    let kappa = started();
    kappa.produce(json!([{"key": "k", "value": "old", "partition": 0}]));
    std::thread::sleep(Duration::from_millis(20));
    let between = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    std::thread::sleep(Duration::from_millis(20));
    kappa.produce(json!([{"key": "k", "value": "new", "partition": 0}]));
    kappa.wait_caught_up("latest");
    assert_eq!(kappa.get("/v1/views/latest/keys/k").1["value"], "new");
    let (status, body) = kappa.get(&format!("/v1/views/latest/keys/k?as_of={between}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["value"], "old");
    assert_eq!(body["position"]["items/0"], 1);
    let (status, body) = kappa.get("/v1/views/latest/keys/k?as_of=items/0=0,items/1=0,items/2=0");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_key")));
    let (status, body) = kappa.get("/v1/views/latest/keys/k?as_of=yesterday");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_as_of")));
}

#[test]
fn as_of_reads_beyond_the_concurrency_limit_answer_503() {
    let kappa = Kappa::start(vec![latest(1)], HttpConfig { as_of_concurrency_max: 1, ..HttpConfig::default() });
    kappa.wait_caught_up("latest");
    kappa.produce(json!([{"key": "k", "value": 1, "partition": 0}]));
    let path = "/v1/views/latest/keys/k?as_of=items/0=1,items/1=0,items/2=0";
    // The one slot taken, as by a long replay.
    let running = kappa.state.try_as_of_permit().unwrap();
    let (status, body) = kappa.get(path);
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("as_of_busy")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("1 as-of reads are running"), "{body}");
    drop(running);
    let (status, body) = kappa.get(path);
    assert_eq!((status, &body["value"]), (200, &json!(1)), "{body}");
    // The permit is released after each read.
    assert_eq!(kappa.get(path).0, 200);
}

#[test]
fn websocket_subscriptions_get_a_snapshot_then_every_change_and_bad_input_gets_errors() {
    let kappa = started();
    kappa.produce(json!([{"key": "p1", "value": 1}, {"key": "p2", "value": 2}, {"key": "q", "value": 3}]));
    kappa.wait_caught_up("latest");
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s1", "view": "latest", "prefix": "p"}));
    let snapshot = ws.next();
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["id"], "s1");
    assert_eq!(snapshot["items"], json!([{"key": "p1", "value": 1}, {"key": "p2", "value": 2}]));
    ws.send(&json!({"op": "subscribe", "id": "s2", "view": "latest", "key": "q"}));
    let q = ws.next();
    assert_eq!((q["type"].as_str(), q["items"][0]["value"].as_i64()), (Some("snapshot"), Some(3)));
    kappa.produce(json!([{"key": "p1", "value": 10}]));
    let change = ws.next();
    assert_eq!(
        (change["type"].as_str(), change["id"].as_str(), change["key"].as_str()),
        (Some("change"), Some("s1"), Some("p1"))
    );
    assert_eq!(change["value"], 10);
    kappa.produce(json!([{"key": "q", "value": null}]));
    let deleted = ws.next();
    assert_eq!((deleted["id"].as_str(), deleted["value"].clone()), (Some("s2"), Value::Null));
    // Bad input: an error each, and the connection keeps working.
    let bad: [(&str, &str); 6] = [
        ("{nope", "invalid_message"),
        (r#"{"op":"dance","id":"x"}"#, "invalid_message"),
        (r#"{"op":"subscribe","id":"x","view":"missing","key":"k"}"#, "unknown_view"),
        (r#"{"op":"subscribe","id":"x","view":"latest"}"#, "invalid_message"),
        (r#"{"op":"subscribe","id":"s1","view":"latest","key":"k"}"#, "duplicate_subscription"),
        (r#"{"op":"unsubscribe","id":"zz"}"#, "unknown_subscription"),
    ];
    for (text, code) in bad {
        ws.send_text(text);
        let error = ws.next();
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some(code)), "{text} → {error}");
    }
    ws.send_text(&format!(r#"{{"op":"subscribe","id":"big","view":"latest","key":"{}"}}"#, "k".repeat(70_000)));
    assert_eq!(ws.next()["code"], "message_too_large");
    ws.send(&json!({"op": "unsubscribe", "id": "s1"}));
    // A connection's messages are handled in order: this one's answer says s1 is gone.
    ws.send(&json!({"op": "unsubscribe", "id": "zz"}));
    assert_eq!(ws.next()["code"], "unknown_subscription");
    kappa.produce(json!([{"key": "p2", "value": 20}, {"key": "q", "value": 30}]));
    let next = ws.next();
    assert_eq!((next["id"].as_str(), next["value"].as_i64()), (Some("s2"), Some(30)), "s1 is gone, s2 still works");
    // A foreign Origin is refused; the server's own origin and non-browsers are allowed.
    assert!(Ws::connect_with_origin(kappa.addr, Some("http://evil.example")).is_err());
    assert!(Ws::connect_with_origin(kappa.addr, Some(&format!("http://{}", kappa.addr))).is_ok());
}

/// 10,000+ changes while the client disconnects at least 50 times and resumes from its last
/// token: it sees every change of its prefix exactly once, in changelog order.
#[test]
fn websocket_resume_under_churn_has_no_gap_and_no_duplicate() {
    let kappa = started();
    let producer = {
        let (addr, engine) = (kappa.addr, kappa.engine.clone());
        std::thread::spawn(move || {
            // 50 keys per request, one view step per request: 50 changes a step.
            for round in 0..250 {
                let records: Vec<Value> = (0..50).map(|k| json!({"key": format!("r{k}"), "value": round})).collect();
                let body = json!({"records": records}).to_string();
                let (status, _) = request(addr, "POST", "/v1/topics/items/records", Some(body.as_bytes()), &[]);
                assert_eq!(status, 200);
                assert!(engine.wait_caught_up("latest", Duration::from_secs(30)).unwrap());
            }
        })
    };
    let mut received: Vec<i64> = Vec::new();
    let mut token: Option<String> = None;
    let mut disconnects = 0;
    let mut first_position = None;
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "r", "view": "latest", "prefix": "r"}));
    let mut idle_since = Instant::now();
    loop {
        if producer.is_finished() {
            let end = kappa.log.partition("__kappa.view.latest.v1", 0).unwrap().high_watermark();
            if token.as_deref().is_some_and(|t| parse_token(t) >= end - 1) {
                break;
            }
        }
        ws.socket.get_ref().set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let Some(message) = ws.try_next() else {
            let end = kappa.log.partition("__kappa.view.latest.v1", 0).unwrap().high_watermark();
            assert!(
                idle_since.elapsed() < Duration::from_secs(30),
                "no message for 30 s: {} changes received, last token {token:?}, changelog end {end}, {disconnects} disconnects",
                received.len()
            );
            continue;
        };
        idle_since = Instant::now();
        match message["type"].as_str() {
            Some("snapshot") => {
                assert!(first_position.is_none(), "only the first connection gets a snapshot: {message}");
                first_position = Some(parse_token(message["token"].as_str().unwrap()));
                token = Some(message["token"].as_str().unwrap().to_owned());
            }
            Some("change") => {
                let t = message["token"].as_str().unwrap().to_owned();
                received.push(parse_token(&t) - 1);
                token = Some(t);
            }
            other => panic!("unexpected {other:?}: {message}"),
        }
        if received.len() % 200 == 199 {
            // Drop the connection abruptly and resume from the last token.
            drop(ws);
            disconnects += 1;
            ws = Ws::connect(kappa.addr);
            ws.send(&json!({"op": "subscribe", "id": "r", "view": "latest", "prefix": "r", "resume": token}));
        }
    }
    producer.join().unwrap();
    assert!(disconnects >= 50, "{disconnects} disconnects");
    // The truth: every view change of keys r* in the changelog after the snapshot.
    let expected = changelog_offsets(&kappa, "__kappa.view.latest.v1", first_position.unwrap(), "r");
    assert!(expected.len() >= 10_000, "{} changes", expected.len());
    let duplicates = received.len() - received.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!(duplicates, 0, "duplicates");
    assert!(received.windows(2).all(|w| w[0] < w[1]), "changelog order");
    let missing: Vec<_> = expected.iter().filter(|o| !received.contains(o)).take(5).collect();
    assert!(missing.is_empty(), "gaps at {missing:?}");
    assert_eq!(received, expected);
}

fn parse_token(token: &str) -> i64 {
    token.rsplit_once('.').unwrap().1.parse().unwrap()
}

/// Offsets of view changes to keys starting with `prefix`, from `from` to the end.
fn changelog_offsets(kappa: &Kappa, topic: &str, from: i64, prefix: &str) -> Vec<i64> {
    let partition = kappa.log.partition(topic, 0).unwrap();
    let mut offsets = Vec::new();
    let mut offset = from;
    while offset < partition.high_watermark() {
        let read = partition.read(offset, 1 << 20, kappa_log::Isolation::ReadUncommitted).unwrap();
        let mut rest = read.records.as_slice();
        while !rest.is_empty() {
            let len = kappa_log::batch::batch_total_len(rest, rest.len()).unwrap();
            let records = kappa_log::records::decode_records(&rest[..len], 1 << 26).unwrap();
            for r in records.iter() {
                if r.offset() >= from && r.key.is_some_and(|k| k.starts_with(prefix.as_bytes())) {
                    offsets.push(r.offset());
                }
                offset = r.offset() + 1;
            }
            rest = &rest[len..];
        }
    }
    offsets
}

#[test]
fn a_cutover_during_a_subscription_sends_reset_and_a_fresh_snapshot() {
    // Serve version 1 again, subscribe, then cut over to version 2.
    let kappa = two_versions_with_v2_serving();
    assert_eq!(kappa.post("/v1/views/latest/switch", &json!({"version": 1})).0, 200);
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k"}));
    let first = ws.next();
    assert_eq!((first["type"].as_str(), first["version"].as_u64()), (Some("snapshot"), Some(1)));
    assert_eq!(first["items"][0]["value"], 1);
    assert_eq!(kappa.post("/v1/views/latest/switch", &json!({"version": 2})).0, 200);
    let reset = ws.next();
    assert_eq!(reset["type"], "reset", "{reset}");
    let snapshot = ws.next();
    assert_eq!((snapshot["type"].as_str(), snapshot["version"].as_u64()), (Some("snapshot"), Some(2)));
    assert_eq!(snapshot["items"][0]["value"], json!({"v2": 1}));
    // A token from version 1 resumes into a reset on version 2.
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k", "resume": first["token"]}));
    assert_eq!(ws.next()["type"], "reset");
    assert_eq!(ws.next()["version"], 2);
}

/// A hub that ends (a panic) is replaced by the next; when another version started serving
/// before the new hub first looked, a subscription of the old version still gets `reset`
/// and a snapshot of the new one, even while nothing is written.
#[test]
fn a_cutover_before_a_new_hub_first_looks_still_resets_subscriptions() {
    let kappa = two_versions_with_v2_serving();
    assert_eq!(kappa.post("/v1/views/latest/switch", &json!({"version": 1})).0, 200);
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k"}));
    let first = ws.next();
    assert_eq!((first["type"].as_str(), first["version"].as_u64()), (Some("snapshot"), Some(1)));
    {
        // The old hub never runs again, so it cannot see the switch; its subscription
        // starts the next hub only after the switch completed.
        let _paused = kappa.pause();
        kappa.engine.switch("latest", 2, false).unwrap();
        kappa.state.hubs.stop("latest");
    }
    ws.socket.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reset = ws.try_next().expect("a reset after the cutover");
    assert_eq!(reset["type"], "reset", "{reset}");
    let snapshot = ws.next();
    assert_eq!((snapshot["type"].as_str(), snapshot["version"].as_u64()), (Some("snapshot"), Some(2)));
    assert_eq!(snapshot["items"][0]["value"], json!({"v2": 1}));
}

/// A subscription that took its snapshot before its hub first looked at the changelog (a
/// hub started by an earlier subscriber while the view was not yet serving looks only at
/// its next check) gets the changes written in between: the hub broadcasts from the
/// changelog's end at that look on, and the subscription reads what lies before it itself.
/// (They reached it only with the next change: a JS client that subscribed while its server
/// started waited for a change that never came.)
#[test]
fn changes_between_a_snapshot_and_the_hubs_first_look_reach_the_subscription() {
    let kappa = started();
    let mut ws = Ws::connect(kappa.addr);
    let snapshot = {
        let _held = kappa.state.hubs.hold_first_looks();
        ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k"}));
        let snapshot = ws.next();
        assert_eq!((snapshot["type"].as_str(), snapshot["items"].clone()), (Some("snapshot"), json!([])), "{snapshot}");
        assert!(kappa.state.hubs.running("latest"), "the subscription started the view's hub");
        kappa.produce(json!([{"key": "k", "value": 1}]));
        kappa.wait_caught_up("latest");
        snapshot
    };
    // The hub looks now, at a changelog that already holds the change.
    let change = ws.next_within(Duration::from_secs(30)).expect(
        "no message within 30 s: the change written after the snapshot and before the hub's first look was lost",
    );
    assert_eq!(
        (change["type"].as_str(), change["key"].as_str(), change["value"].as_i64()),
        (Some("change"), Some("k"), Some(1)),
        "{change}"
    );
    let (from, first) =
        (parse_token(snapshot["token"].as_str().unwrap()), parse_token(change["token"].as_str().unwrap()));
    assert!(first > from, "the change ({first}) is after the snapshot ({from})");
    // And the broadcast goes on from there: the next change once, in order.
    kappa.produce(json!([{"key": "k", "value": 2}]));
    let next = ws.next();
    assert_eq!((next["type"].as_str(), next["value"].as_i64()), (Some("change"), Some(2)), "{next}");
    assert!(parse_token(next["token"].as_str().unwrap()) > first, "{next} after {change}");
}

/// The hub fell behind the log cleaner: compaction removed changes it had not read yet. A
/// subscription following it gets `reset` and a fresh snapshot, not the surviving changes
/// with the superseded ones silently left out.
#[test]
fn changes_compacted_before_the_hub_read_them_reset_subscriptions() {
    const CHANGELOG: &str = "__kappa.view.latest.v1";
    let kappa = started();
    // A segment per change, so compaction can reach all but the last.
    let small_segments = BTreeMap::from([("segment.bytes".to_owned(), Some("1024".to_owned()))]);
    kappa.log.alter_topic_config(CHANGELOG, &small_segments).unwrap();
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "prefix": ""}));
    let snapshot = ws.next();
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let position = parse_token(snapshot["token"].as_str().unwrap());
    {
        // Five changes of key k written and compacted before the hub gets to read them.
        let _paused = kappa.pause();
        let input = kappa.log.partition(TOPIC, 0).unwrap();
        let pad = "p".repeat(1024);
        for n in 0..5 {
            let value = json!({"n": n, "pad": pad}).to_string();
            let record = NewRecord::new(Some(b"k"), Some(value.as_bytes()), now_ms());
            input.append(BatchBuilder::new().record(record).build()).unwrap();
            kappa.wait_caught_up("latest");
        }
        kappa.log.partition(CHANGELOG, 0).unwrap().compact(true).unwrap().expect("a compaction pass");
        let read = kappa.engine.backend().read_committed(CHANGELOG, 0, position, 1 << 20).unwrap();
        assert!(read.first_missing.is_some(), "compaction removed changes after the subscription's position");
    }
    ws.socket.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reset = ws.try_next().expect("a reset after the gap");
    assert_eq!(reset["type"], "reset", "{reset}");
    assert!(reset["reason"].as_str().unwrap().contains("compacted"), "{reset}");
    let snapshot = ws.next();
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["items"][0]["value"]["n"], 4, "{snapshot}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn a_slow_consumer_gets_an_error_and_is_disconnected_while_others_continue() {
    // Stalled this long with its queue full (it reads nothing while the records below are
    // produced), a client is cut off.
    let config = HttpConfig { subscriber_queue_max: 8, subscriber_stall_ms_max: 300, ..HttpConfig::default() };
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    let mut slow = Ws::connect(kappa.addr);
    slow.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "prefix": ""}));
    assert_eq!(slow.next()["type"], "snapshot");
    let mut fast = Ws::connect(kappa.addr);
    fast.send(&json!({"op": "subscribe", "id": "f", "view": "latest", "key": "last"}));
    assert_eq!(fast.next()["type"], "snapshot");
    // The slow client stops reading while thousands of changes arrive.
    for round in 0..200 {
        let records: Vec<Value> =
            (0..50).map(|k| json!({"key": format!("k{k}"), "value": "x".repeat(2000) + &round.to_string()})).collect();
        kappa.produce(Value::Array(records));
    }
    kappa.produce(json!([{"key": "last", "value": true}]));
    assert_eq!(fast.next()["value"], true, "the other client is unaffected");
    let mut saw_error = false;
    loop {
        match slow.socket.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if message["type"] == "error" {
                    assert_eq!(message["code"], "slow_consumer");
                    saw_error = true;
                }
            }
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(saw_error, "the slow client was told why before being disconnected");
}

/// A burst of changes far bigger than the connection's queue — live, then again as the
/// catch-up of a resume — reaches a client that keeps reading: only a client whose queue
/// stays full for the stall limit is cut off.
#[test]
fn bursts_bigger_than_the_queue_reach_a_client_that_keeps_reading() {
    let config = HttpConfig { subscriber_queue_max: 8, ..HttpConfig::default() };
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    let keys = 3_000;
    let burst =
        |round: i64| Value::Array((0..keys).map(|k| json!({"key": format!("b{k:04}"), "value": round})).collect());
    let read_burst = |ws: &mut Ws, round: i64| {
        let mut seen = std::collections::BTreeSet::new();
        let mut token = Value::Null;
        while seen.len() < keys {
            let change = ws.next();
            assert_eq!((change["type"].as_str(), change["value"].as_i64()), (Some("change"), Some(round)), "{change}");
            seen.insert(change["key"].as_str().unwrap().to_owned());
            token = change["token"].clone();
        }
        token
    };
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "prefix": "b"}));
    assert_eq!(ws.next()["type"], "snapshot");
    kappa.produce(burst(1));
    let token = read_burst(&mut ws, 1);
    drop(ws);
    kappa.produce(burst(2));
    kappa.wait_caught_up("latest");
    let mut ws = Ws::connect(kappa.addr);
    ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "prefix": "b", "resume": token}));
    read_burst(&mut ws, 2);
}

/// A WebSocket client that sends nothing — not even the pongs a WebSocket answers the
/// server's pings with — is taken for gone and closed; one that answers stays.
#[test]
fn a_silent_websocket_client_is_closed_and_one_that_answers_pings_stays() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tungstenite::Message;
    // 3 s of silence (pings every 1 s): long enough that a loaded machine does not make the
    // answering client look silent, short enough to watch it stay through several limits.
    const SILENCE: Duration = Duration::from_secs(3);
    let config = HttpConfig { ws_silence_ms_max: SILENCE.as_millis() as u64, ..HttpConfig::default() };
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    let mut silent = Ws::connect(kappa.addr);
    let mut answering = Ws::connect(kappa.addr);
    for ws in [&mut silent, &mut answering] {
        ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "k"}));
        assert_eq!(ws.next()["type"], "snapshot");
    }
    let timed_out = |e: &tungstenite::Error| matches!(e, tungstenite::Error::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    // The answering client reads on a thread of its own the whole time, so it answers every
    // ping (tungstenite queues the pong and sends it on the next read) whatever this thread
    // is doing; it hands its text messages over, or how its connection ended.
    let stop = Arc::new(AtomicBool::new(false));
    let (messages, received) = std::sync::mpsc::channel::<Result<Value, String>>();
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            answering.socket.get_mut().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut pings = 0;
            while !stop.load(Ordering::Acquire) {
                match answering.socket.read() {
                    Ok(Message::Ping(_)) => pings += 1,
                    Ok(Message::Text(text)) => {
                        let _ = messages.send(Ok(serde_json::from_str(&text).unwrap()));
                    }
                    Ok(Message::Close(frame)) => {
                        let _ = messages.send(Err(format!("the answering client was closed: {frame:?}")));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if timed_out(&e) => {}
                    Err(e) => {
                        let _ = messages.send(Err(format!("the answering client's connection failed: {e}")));
                        break;
                    }
                }
            }
            pings
        })
    };
    // Well past two silence limits: the silent client is closed by now, the answering one not.
    std::thread::sleep(SILENCE * 2 + Duration::from_secs(1));
    kappa.produce(json!([{"key": "k", "value": 1}]));
    match received.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(change)) => assert_eq!(change["value"], 1, "still subscribed: {change}"),
        Ok(Err(ended)) => panic!("{ended}"),
        Err(e) => panic!("no change reached the answering client within 60 s: {e}"),
    }
    stop.store(true, Ordering::Release);
    let pings = reader.join().unwrap();
    assert!(pings >= 2, "{pings} pings in over {:?} with a {SILENCE:?} silence limit", SILENCE * 2);
    // The silent client, reading only now, finds its connection closed (not merely quiet).
    silent.socket.get_mut().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let ended = loop {
        match silent.socket.read() {
            Ok(Message::Close(_)) => break "close frame",
            Ok(_) => {}
            Err(e) if timed_out(&e) => break "still open",
            Err(_) => break "connection closed",
        }
    };
    assert_ne!(ended, "still open", "the silent client was not disconnected");
}

/// `kappa_subscriptions` counts open subscriptions: it goes back down when WebSocket
/// clients unsubscribe or leave and when an SSE client on a quiet key goes away.
#[test]
fn the_subscription_gauge_counts_down_when_clients_leave() {
    let kappa = started();
    let gauge = || {
        let (_, text) = request_text(kappa.addr, "GET", "/metrics", None, &[]);
        let line = text.lines().find(|l| l.starts_with("kappa_subscriptions{")).expect("the gauge").to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let wait_for = |expected: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while gauge() != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "kappa_subscriptions stayed {} (expected {expected})",
                gauge()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut left = Ws::connect(kappa.addr);
    let mut unsubscribed = Ws::connect(kappa.addr);
    for ws in [&mut left, &mut unsubscribed] {
        ws.send(&json!({"op": "subscribe", "id": "s", "view": "latest", "key": "quiet"}));
        assert_eq!(ws.next()["type"], "snapshot");
    }
    let mut sse = Sse::open(&kappa, "/v1/views/latest/watch?key=quiet", None);
    assert_eq!(sse.next().0, "snapshot");
    wait_for(3);
    unsubscribed.send(&json!({"op": "unsubscribe", "id": "s"}));
    wait_for(2);
    drop(left);
    wait_for(1);
    drop(sse);
    wait_for(0);
}

#[test]
fn sse_streams_a_snapshot_then_changes_and_resumes_from_last_event_id() {
    let kappa = started();
    kappa.produce(json!([{"key": "s1", "value": 1}]));
    kappa.wait_caught_up("latest");
    let mut events = Sse::open(&kappa, "/v1/views/latest/watch?key=s1", None);
    let (name, id, data) = events.next();
    assert_eq!(name, "snapshot");
    assert_eq!(data["items"][0]["value"], 1);
    kappa.produce(json!([{"key": "s1", "value": 2}]));
    let (name, change_id, data) = events.next();
    assert_eq!((name.as_str(), data["value"].as_i64()), ("change", Some(2)));
    drop(events);
    // One view step each (a step that saw both would publish only the latest value).
    kappa.produce(json!([{"key": "s1", "value": 3}]));
    kappa.wait_caught_up("latest");
    kappa.produce(json!([{"key": "s1", "value": 4}]));
    let mut resumed = Sse::open(&kappa, "/v1/views/latest/watch?key=s1", Some(&change_id));
    let values: Vec<i64> = (0..2).map(|_| resumed.next().2["value"].as_i64().unwrap()).collect();
    assert_eq!(values, vec![3, 4], "exactly the changes after Last-Event-ID");
    // An EventSource opened with ?resume= reconnects to the same URL with a newer
    // Last-Event-ID: that one counts.
    let (_, three_id, _) = Sse::open(&kappa, &format!("/v1/views/latest/watch?key=s1&resume={change_id}"), None).next();
    kappa.produce(json!([{"key": "s1", "value": 5}]));
    let path = format!("/v1/views/latest/watch?key=s1&resume={change_id}");
    let (_, _, data) = Sse::open(&kappa, &path, Some(&three_id)).next();
    assert_eq!(data["value"], 4, "the change after Last-Event-ID, not after ?resume=");
    assert!(!id.is_empty());
    let (status, body) = request(kappa.addr, "GET", "/v1/views/latest/watch", None, &[]);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_query")));
    // Refused before the stream starts (EventSource would retry a stream that ends).
    let big = Kappa::start(vec![latest(1)], HttpConfig { snapshot_items_max: 2, ..HttpConfig::default() });
    big.produce(json!([{"key": "p1", "value": 1}, {"key": "p2", "value": 2}, {"key": "p3", "value": 3}]));
    big.wait_caught_up("latest");
    let (status, body) = request(big.addr, "GET", "/v1/views/latest/watch?prefix=p", None, &[]);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("snapshot_too_large")), "{body}");
    let (status, body) =
        request(kappa.addr, "GET", "/v1/views/latest/watch?key=a", None, &[("Last-Event-ID", "garbage")]);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_token")));
}

/// A minimal Server-Sent Events reader.
struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    fn open(kappa: &Kappa, path: &str, last_event_id: Option<&str>) -> Self {
        let mut stream = TcpStream::connect(kappa.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n", kappa.addr);
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("200"), "{line}");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        Self { reader }
    }

    /// The next event: (name, id, data as JSON). Chunk-size lines and keep-alives skipped.
    fn next(&mut self) -> (String, String, Value) {
        let (mut name, mut id, mut data) = (String::new(), String::new(), String::new());
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("an SSE line within 30 s");
            assert!(n > 0, "the SSE stream ended (event so far: {name} {id} {data})");
            let line = line.trim_end_matches(['\r', '\n']);
            if std::env::var("SSE_DEBUG").is_ok() {
                eprintln!("sse line: {line:?}");
            }
            if let Some(v) = line.strip_prefix("event: ").or_else(|| line.strip_prefix("event:")) {
                name = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                id = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                data.push_str(v);
            } else if line.is_empty() && !data.is_empty() {
                return (name, id, serde_json::from_str(&data).unwrap());
            }
        }
    }
}

#[test]
fn cross_origin_browsers_get_cors_headers_only_when_allowed() {
    let config = HttpConfig { allowed_origins: vec!["http://app.example".into()], ..HttpConfig::default() };
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    let head = |origin: &str, method: &str| {
        let mut stream = TcpStream::connect(kappa.addr).unwrap();
        write!(stream, "{method} /v1/views HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n", kappa.addr).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text.to_ascii_lowercase()
    };
    let allowed = head("http://app.example", "GET");
    assert!(
        allowed.starts_with("http/1.1 200") && allowed.contains("access-control-allow-origin: http://app.example"),
        "{allowed}"
    );
    let preflight = head("http://app.example", "OPTIONS");
    assert!(preflight.starts_with("http/1.1 204") && preflight.contains("access-control-allow-methods"), "{preflight}");
    let other = head("http://evil.example", "GET");
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    assert!(Ws::connect_with_origin(kappa.addr, Some("http://app.example")).is_ok());
}

#[test]
fn limits_are_enforced_per_connection() {
    let config = HttpConfig { subscriptions_per_connection_max: 2, ..HttpConfig::default() };
    let kappa = Kappa::start(vec![latest(1)], config);
    kappa.wait_caught_up("latest");
    let mut ws = Ws::connect(kappa.addr);
    for id in ["a", "b"] {
        ws.send(&json!({"op": "subscribe", "id": id, "view": "latest", "key": id}));
        assert_eq!(ws.next()["type"], "snapshot");
    }
    ws.send(&json!({"op": "subscribe", "id": "c", "view": "latest", "key": "c"}));
    assert_eq!(ws.next()["code"], "too_many_subscriptions");
}
