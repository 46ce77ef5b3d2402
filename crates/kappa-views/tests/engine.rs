//! The view engine on a real log in a temp directory: folds equal a reference fold,
//! transactions, upcasting, error policies, rebuild + cutover, resume, as-of.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kappa_views::{
    AsOf, EngineConfig, Event, EventError, Phase, Processor, Reducer, Schemas, StateAccess, View, ViewEngine, ViewError,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// key → {"count","total"} of the payload's `n`; a tombstone deletes the key.
struct Sum {
    factor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Totals {
    count: i64,
    total: i64,
}

impl Reducer for Sum {
    type State = Totals;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, state: Option<Totals>, event: &Event) -> Result<Option<Totals>, EventError> {
        let Some(payload) = event.payload()? else { return Ok(None) };
        let n =
            payload.get("n").and_then(Value::as_i64).ok_or_else(|| EventError::new("payload needs an integer n"))?;
        let mut totals = state.unwrap_or(Totals { count: 0, total: 0 });
        totals.count += 1;
        totals.total += n * self.factor;
        Ok(Some(totals))
    }
}

fn sum_view(version: u32, factor: i64) -> View {
    View::reducer("sums", version, &[TOPIC], Sum { factor })
}

/// The reference: the same fold written directly over the produced events.
fn reference(events: &[(String, Option<i64>)], factor: i64) -> BTreeMap<String, Value> {
    let mut state: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (key, n) in events {
        match n {
            Some(n) => {
                let entry = state.entry(key.clone()).or_default();
                entry.0 += 1;
                entry.1 += n * factor;
            }
            None => {
                state.remove(key);
            }
        }
    }
    state.into_iter().map(|(k, (count, total))| (k, json!({"count": count, "total": total}))).collect()
}

/// Writes events; a key always goes to the same partition (key index % partitions).
fn write_events(fixture: &Fixture, partitions: i32, events: &[(String, Option<i64>)], batch: usize) {
    let mut pending: BTreeMap<i32, Vec<kappa_log::records::NewRecord>> = BTreeMap::new();
    for (i, (key, n)) in events.iter().enumerate() {
        let index: i32 = key.trim_start_matches('k').parse().unwrap();
        let partition = index % partitions;
        pending.entry(partition).or_default().push(event(
            key,
            n.map(|n| json!({"n": n})),
            None,
            None,
            1_000 + i as i64,
        ));
        if pending[&partition].len() >= batch {
            fixture.append(partition, pending.remove(&partition).unwrap());
        }
    }
    for (partition, records) in pending {
        fixture.append(partition, records);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn a_reducer_view_equals_the_reference_fold_and_its_changelog(
        events in prop::collection::vec((0..12usize, prop::option::weighted(0.85, -50i64..50)), 1..400),
        batch in 1..40usize,
    ) {
        let events: Vec<(String, Option<i64>)> = events.into_iter().map(|(k, n)| (format!("k{k}"), n)).collect();
        let fixture = Fixture::new(3);
        write_events(&fixture, 3, &events, batch);
        let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
        wait_caught_up(&engine, "sums");
        let expected = reference(&events, 1);
        prop_assert_eq!(&dump(&engine, "sums"), &expected);
        prop_assert_eq!(&fold_changelog(&fixture.log, "__kappa.view.sums.v1"), &expected);
        let applied = engine.describe("sums").unwrap().versions[0].status.events_applied;
        prop_assert_eq!(applied, events.len() as i64);
        engine.shutdown();
        // Reopened: the same state, nothing applied again.
        let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
        wait_caught_up(&engine, "sums");
        prop_assert_eq!(&dump(&engine, "sums"), &expected);
        prop_assert_eq!(engine.describe("sums").unwrap().versions[0].status.events_applied, events.len() as i64);
        engine.shutdown();
    }
}

#[test]
fn aborted_transactions_never_reach_a_view_and_open_ones_wait_for_their_commit() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k0", Some(json!({"n": 1})), None, None, 1)]);
    fixture.append_transactional(0, 7, 0, vec![event("k0", Some(json!({"n": 100})), None, None, 2)]);
    fixture.append_transactional(0, 7, 1, vec![event("k1", Some(json!({"n": 100})), None, None, 2)]);
    fixture.end_transaction(0, 7, false);
    // An open transaction: its records wait for the marker.
    fixture.append_transactional(0, 8, 0, vec![event("k0", Some(json!({"n": 10})), None, None, 3)]);
    fixture.append_transactional(0, 8, 1, vec![event("k2", Some(json!({"n": 20})), None, None, 3)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k0".to_owned(), json!({"count": 1, "total": 1}))]));
    // Committing makes both of its records visible, in one step: one changelog batch.
    let changelog_before = engine.get("sums", "k0").unwrap().position;
    fixture.end_transaction(0, 8, true);
    wait_caught_up(&engine, "sums");
    assert_eq!(
        dump(&engine, "sums"),
        BTreeMap::from([
            ("k0".to_owned(), json!({"count": 2, "total": 11})),
            ("k2".to_owned(), json!({"count": 1, "total": 20})),
        ])
    );
    let k0 = engine.get("sums", "k0").unwrap().value.unwrap();
    let k2 = engine.get("sums", "k2").unwrap().value.unwrap();
    assert!(
        k0.changelog_offset >= changelog_before && k2.changelog_offset == k0.changelog_offset + 1,
        "both changes in one step"
    );
    engine.shutdown();
}

/// T1 writes at 0, T2 at 1 (and stays open), T1 again at 2 and commits at 3: the stable
/// offset is 1, so only T1's first record is readable; T1 must wait until it is whole.
#[test]
fn a_committed_transaction_interleaved_with_an_open_one_is_applied_whole() {
    let fixture = Fixture::new(1);
    fixture.append_transactional(0, 1, 0, vec![event("k1", Some(json!({"n": 1})), None, None, 1)]);
    fixture.append_transactional(0, 2, 0, vec![event("k9", Some(json!({"n": 9})), None, None, 2)]);
    fixture.append_transactional(0, 1, 1, vec![event("k2", Some(json!({"n": 2})), None, None, 3)]);
    fixture.end_transaction(0, 1, true);
    assert_eq!(fixture.log.partition(TOPIC, 0).unwrap().last_stable_offset(), 1);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while engine.describe("sums").unwrap().active.is_none() {
        assert!(std::time::Instant::now() < deadline, "the caught-up version never served reads");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dump(&engine, "sums"), BTreeMap::new(), "no half of T1");
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.positions.get("events/0"), None);
    fixture.end_transaction(0, 2, true);
    wait_caught_up(&engine, "sums");
    let expected: BTreeMap<String, Value> = [("k1", 1), ("k2", 2), ("k9", 9)]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), json!({"count": 1, "total": n})))
        .collect();
    assert_eq!(dump(&engine, "sums"), expected);
    let k1 = engine.get("sums", "k1").unwrap().value.unwrap();
    let k2 = engine.get("sums", "k2").unwrap().value.unwrap();
    assert_eq!(k2.changelog_offset, k1.changelog_offset + 1, "T1's changes in one step");
    engine.shutdown();
}

/// Reads `amount`, which only version 2 of `Paid` has.
struct Amounts;

impl Reducer for Amounts {
    type State = i64;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, state: Option<i64>, event: &Event) -> Result<Option<i64>, EventError> {
        assert_eq!(event.version(), 3, "views see only the current version");
        let amount = event.payload()?.and_then(|p| p.get("amount")).and_then(Value::as_i64);
        let amount = amount.ok_or_else(|| EventError::new("no amount"))?;
        Ok(Some(state.unwrap_or(0) + amount))
    }
}

fn paid_schemas() -> Schemas {
    Schemas::new()
        // v1 {"cents"} → v2 {"value"}; v2 {"value"} → v3 {"amount"}
        .upcaster("Paid", 1, |mut v| {
            let cents =
                v.as_object_mut().and_then(|o| o.remove("cents")).ok_or_else(|| EventError::new("v1 needs cents"))?;
            Ok(json!({"value": cents}))
        })
        .upcaster("Paid", 2, |v| {
            Ok(json!({"amount": v["value"].as_i64().ok_or_else(|| EventError::new("v2 needs value"))?}))
        })
}

#[test]
fn upcasters_lift_every_old_version_and_an_unknown_newer_version_stops_the_view_at_its_offset() {
    let fixture = Fixture::new(1);
    fixture.append(
        0,
        vec![
            event("a", Some(json!({"cents": 1})), Some("Paid"), Some(1), 1),
            event("a", Some(json!({"value": 10})), Some("Paid"), Some(2), 2),
            event("a", Some(json!({"amount": 100})), Some("Paid"), Some(3), 3),
            // No headers: type and version from the payload (kafka-node's way).
            event("a", Some(json!({"type": "Paid", "version": 1, "cents": 1000})), None, None, 4),
        ],
    );
    let engine = fixture.engine(paid_schemas(), vec![View::reducer("amounts", 1, &[TOPIC], Amounts)]);
    wait_caught_up(&engine, "amounts");
    assert_eq!(dump(&engine, "amounts"), BTreeMap::from([("a".to_owned(), json!(1111))]));
    let offset = fixture.append(0, vec![event("a", Some(json!({"amount": 5})), Some("Paid"), Some(4), 5)]);
    fixture.append(0, vec![event("a", Some(json!({"amount": 7})), Some("Paid"), Some(3), 6)]);
    let status = wait_for_phase(&engine, "amounts", |p| matches!(p, Phase::Failed(_)));
    let Phase::Failed(reason) = status else { unreachable!() };
    assert!(reason.contains(&format!("{TOPIC}/0 offset {offset}")), "{reason}");
    assert!(reason.contains("version 4 is newer"), "{reason}");
    // Stopped exactly before the bad event: the state holds everything before it.
    assert_eq!(engine.get("amounts", "a").unwrap().value.map(|i| i.json), Some(b"1111".to_vec()));
    assert_eq!(engine.describe("amounts").unwrap().versions[0].status.positions[&format!("{TOPIC}/0")], offset);
    engine.shutdown();
}

#[derive(serde::Deserialize)]
struct PaidV1 {
    cents: i64,
}

#[derive(serde::Serialize)]
struct PaidV2 {
    value: i64,
}

#[test]
fn a_typed_upcaster_chains_with_a_value_upcaster_and_a_payload_it_cannot_decode_stops_the_view() {
    let fixture = Fixture::new(1);
    fixture.append(
        0,
        vec![
            event("a", Some(json!({"cents": 1})), Some("Paid"), Some(1), 1),
            event("a", Some(json!({"value": 10})), Some("Paid"), Some(2), 2),
            event("a", Some(json!({"type": "Paid", "version": 1, "cents": 1000})), None, None, 3),
        ],
    );
    let schemas = Schemas::new().upcaster_typed("Paid", 1, |v1: PaidV1| Ok(PaidV2 { value: v1.cents })).upcaster(
        "Paid",
        2,
        |v| Ok(json!({"amount": v["value"].as_i64().ok_or_else(|| EventError::new("v2 needs value"))?})),
    );
    let engine = fixture.engine(schemas, vec![View::reducer("amounts", 1, &[TOPIC], Amounts)]);
    wait_caught_up(&engine, "amounts");
    assert_eq!(dump(&engine, "amounts"), BTreeMap::from([("a".to_owned(), json!(1011))]));
    let offset = fixture.append(0, vec![event("a", Some(json!({"cents": "many"})), Some("Paid"), Some(1), 4)]);
    let Phase::Failed(reason) = wait_for_phase(&engine, "amounts", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    assert!(reason.contains(&format!("{TOPIC}/0 offset {offset}")), "{reason}");
    assert!(reason.contains("upcasting Paid from version 1 failed"), "{reason}");
    assert!(reason.contains("does not have the expected shape"), "{reason}");
    assert_eq!(engine.get("amounts", "a").unwrap().value.map(|i| i.json), Some(b"1011".to_vec()));
    engine.shutdown();
}

/// An as-of answer's key → JSON value.
fn values(result: &kappa_views::AsOfView) -> BTreeMap<String, Value> {
    result.values.iter().map(|(k, v)| (k.clone(), serde_json::from_slice(v).unwrap())).collect()
}

/// Waits, up to 60 s (a loaded CI machine; as `wait_caught_up`), for the newest version of
/// `view` to reach a phase `want` accepts.
fn wait_for_phase(engine: &kappa_views::ViewEngine, view: &str, want: impl Fn(&Phase) -> bool) -> Phase {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let phase = engine.describe(view).unwrap().versions.last().unwrap().status.phase.clone();
        if want(&phase) {
            return phase;
        }
        assert!(
            Instant::now() < deadline,
            "view {view} did not reach the wanted phase within 60 s: {:?}",
            engine.describe(view)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_dead_letter_policy_skips_malformed_events_and_records_them_with_the_reason() {
    let fixture = Fixture::new(1);
    let mut bad = kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"{not json"), 2);
    bad = bad.header("trace", Some(b"abc"));
    fixture.append(
        0,
        vec![event("k1", Some(json!({"n": 1})), None, None, 1), bad, event("k1", Some(json!({"n": 2})), None, None, 3)],
    );
    fixture.append(0, vec![event("k1", Some(json!({"x": 1})), None, None, 4)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1).dead_letter("sums-dlq")]);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 2, "total": 3}))]));
    // An as-of replay skips them too, keeping nothing the failed apply did (it took k1).
    let result = engine.as_of("sums", None, &AsOf::Offsets(BTreeMap::from([("events/0".into(), 4)])), None).unwrap();
    assert_eq!(values(&result), dump(&engine, "sums"));
    let dlq = fixture.log.partition("sums-dlq", 0).unwrap();
    let read = dlq.read(0, 1 << 20, kappa_log::Isolation::ReadUncommitted).unwrap();
    let mut found = Vec::new();
    let mut rest = read.records.as_slice();
    while !rest.is_empty() {
        let len = kappa_log::batch::batch_total_len(rest, rest.len()).unwrap();
        let records = kappa_log::records::decode_records(&rest[..len], 1 << 20).unwrap();
        for r in records.iter() {
            let header = |n: &str| r.header(n).flatten().map(|v| String::from_utf8_lossy(v).into_owned());
            found.push((
                r.value.map(<[u8]>::to_vec),
                header("kappa.dlq.source"),
                header("kappa.dlq.reason"),
                header("trace"),
            ));
        }
        rest = &rest[len..];
    }
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0.as_deref(), Some(&b"{not json"[..]));
    assert_eq!(found[0].1.as_deref(), Some("events/0/1"));
    assert!(found[0].2.as_deref().unwrap().contains("not valid JSON"));
    assert_eq!(found[0].3.as_deref(), Some("abc"), "the original headers are kept");
    assert!(found[1].2.as_deref().unwrap().contains("integer n"));
    engine.shutdown();
}

/// With a checkpoint started after every step, most steps commit while one runs: their
/// store writes wait in memory, and a step re-applied after a malformed event (on an empty
/// cache) must read them from there, not the older store.
#[test]
fn steps_committed_while_a_checkpoint_runs_are_read_back_and_survive_a_restart() {
    let fixture = Fixture::new(1);
    let start = || {
        let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
        let config = kappa_views::EngineConfig {
            checkpoint_interval: Duration::ZERO,
            ..kappa_views::EngineConfig::new(fixture.views_dir())
        };
        kappa_views::ViewEngine::start(backend, config, vec![sum_view(1, 1).dead_letter("sums-dlq")]).unwrap()
    };
    let engine = start();
    wait_caught_up(&engine, "sums");
    let mut events = Vec::new();
    for round in 0..300i64 {
        let key = format!("k{}", round % 7);
        let mut batch = vec![event(&key, Some(json!({"n": round})), None, None, round)];
        events.push((key.clone(), Some(round)));
        if round % 3 == 0 {
            batch.push(kappa_log::records::NewRecord::new(Some(key.as_bytes()), Some(b"{bad"), round));
        }
        fixture.append(0, batch);
        if round % 50 == 49 {
            wait_caught_up(&engine, "sums");
        }
    }
    wait_caught_up(&engine, "sums");
    let expected = reference(&events, 1);
    assert_eq!(dump(&engine, "sums"), expected);
    assert_eq!(fold_changelog(&fixture.log, "__kappa.view.sums.v1"), expected);
    engine.shutdown();
    let engine = start();
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), expected);
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.events_applied, events.len() as i64);
    engine.shutdown();
}

#[test]
fn a_stop_policy_stops_at_the_malformed_event_and_keeps_what_came_before() {
    let fixture = Fixture::new(1);
    let bad = kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"[1,"), 2);
    fixture.append(
        0,
        vec![event("k1", Some(json!({"n": 1})), None, None, 1), event("k2", Some(json!({"n": 5})), None, None, 1), bad],
    );
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    let Phase::Failed(reason) = wait_for_phase(&engine, "sums", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    assert!(reason.contains("events/0 offset 2") && reason.contains("not valid JSON"), "{reason}");
    // Never caught up, so no version serves; the stopped version's state is still there.
    assert!(matches!(engine.get("sums", "k1"), Err(ViewError::NotReady { .. })));
    let info = engine.describe("sums").unwrap();
    assert_eq!(info.versions[0].status.positions["events/0"], 2);
    assert_eq!(info.versions[0].status.events_applied, 2);
    // Nothing serves and nothing else runs: waiting for it fails at once, naming why.
    let waited = engine.wait_caught_up("sums", Duration::from_secs(60));
    assert!(
        matches!(&waited, Err(ViewError::VersionFailed { version: 1, reason, .. }) if reason.contains("not valid JSON")),
        "{waited:?}"
    );
    engine.shutdown();
}

#[test]
fn a_new_version_rebuilds_beside_the_serving_one_and_reads_switch_atomically() {
    let fixture = Fixture::new(2);
    let events: Vec<(String, Option<i64>)> =
        (0..20_000).map(|i| (format!("k{}", i % 50), Some((i % 7) as i64))).collect();
    write_events(&fixture, 2, &events, 100);
    let v1 = reference(&events, 1);
    let v2 = reference(&events, 10);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), v1);
    engine.shutdown();

    // Deploy version 2 beside version 1: reads keep coming from v1 until v2 has caught up,
    // and never from a half-built v2.
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    let stop = Arc::new(AtomicBool::new(false));
    // Set by the reader once one of its reads came from version 2.
    let read_v2 = Arc::new(AtomicBool::new(false));
    let reader = {
        let engine = engine.clone();
        let (stop, read_v2, v1, v2) = (stop.clone(), read_v2.clone(), v1.clone(), v2.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeMap::<u32, usize>::new();
            while !stop.load(Ordering::Acquire) {
                let read = engine.get("sums", "k7").unwrap();
                let value: Value = serde_json::from_slice(&read.value.unwrap().json).unwrap();
                let expected = if read.version == 1 { &v1["k7"] } else { &v2["k7"] };
                assert_eq!(&value, expected, "a read from version {} saw a half-built state", read.version);
                *seen.entry(read.version).or_default() += 1;
                if read.version == 2 {
                    read_v2.store(true, Ordering::Release);
                }
            }
            seen
        })
    };
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    wait_caught_up(&engine, "sums");
    // Keep reading until a read has come from version 2 (or the reader failed).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read_v2.load(Ordering::Acquire) && !reader.is_finished() {
        assert!(Instant::now() < deadline, "no read came from version 2 within 60 s of it serving");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    let seen = reader.join().expect("reads never saw a half-built version");
    assert!(seen.contains_key(&2), "reads switched to version 2: {seen:?}");
    let info = engine.describe("sums").unwrap();
    assert_eq!(info.active, Some(2));
    assert_eq!(dump(&engine, "sums"), v2);
    // Both versions are kept: roll back, then forward, then retire the old one.
    engine.switch("sums", 1, false).unwrap();
    assert_eq!(dump(&engine, "sums"), v1);
    assert!(matches!(engine.retire("sums", 1), Err(ViewError::RetireActive { .. })));
    engine.switch("sums", 2, false).unwrap();
    engine.retire("sums", 1).unwrap();
    assert!(fixture.log.topic("__kappa.view.sums.v1").is_err(), "the retired version's changelog is deleted");
    assert!(!fixture.views_dir().join("sums/v1").exists());
    assert!(matches!(engine.switch("sums", 1, false), Err(ViewError::UnknownVersion { .. })));
    engine.shutdown();
    // The choice survives a restart.
    let engine = fixture.engine(Schemas::new(), vec![sum_view(2, 10)]);
    assert_eq!(engine.describe("sums").unwrap().active, Some(2));
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), v2);
    engine.shutdown();
}

#[test]
fn a_restart_mid_rebuild_resumes_where_it_stopped() {
    let fixture = Fixture::new(1);
    let events: Vec<(String, Option<i64>)> = (0..300_000).map(|i| (format!("k{}", i % 1000), Some(1))).collect();
    write_events(&fixture, 1, &events, 500);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    let mut applied = 0;
    for _ in 0..10_000 {
        applied = engine.describe("sums").unwrap().versions[0].status.events_applied;
        if applied > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    engine.shutdown();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    let resumed_at = engine.describe("sums").unwrap().versions[0].status.events_applied;
    assert!(
        resumed_at >= applied && resumed_at > 0,
        "the restarted version starts from its committed progress ({resumed_at}), not from 0"
    );
    if resumed_at == events.len() as i64 {
        eprintln!("the rebuild finished before the restart; resuming mid-way was not exercised by this run");
    }
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), reference(&events, 1));
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.events_applied, events.len() as i64);
    engine.shutdown();
}

#[test]
fn as_of_answers_equal_a_replay_truncated_at_that_point() {
    let fixture = Fixture::new(2);
    let events: Vec<(String, Option<i64>)> =
        (0..600).map(|i| (format!("k{}", i % 9), if i % 37 == 0 { None } else { Some(i as i64) })).collect();
    // Timestamps: event i has 1_000 + i.
    write_events(&fixture, 2, &events, 7);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    for cut in [0usize, 1, 100, 333, 599, 600] {
        // By timestamp: everything written at or before event cut-1's timestamp.
        let at = AsOf::Timestamp(1_000 + cut as i64 - 1);
        let result = engine.as_of("sums", None, &at, None).unwrap();
        let got: BTreeMap<String, Value> =
            result.values.iter().map(|(k, v)| (k.clone(), serde_json::from_slice(v).unwrap())).collect();
        assert_eq!(got, reference(&events[..cut], 1), "as of timestamp before event {cut}");
        // By offsets: the same point expressed as positions.
        let result = engine.as_of("sums", None, &AsOf::Offsets(result.positions.clone()), Some("k4")).unwrap();
        let expected = reference(&events[..cut], 1).remove("k4");
        assert_eq!(result.values.first().map(|(_, v)| serde_json::from_slice::<Value>(v).unwrap()), expected);
    }
    let missing = engine.as_of("sums", None, &AsOf::Offsets(BTreeMap::from([("events/0".into(), 1)])), None);
    assert!(
        matches!(&missing, Err(ViewError::AsOfInvalid { reason, .. }) if reason.contains("events/1")),
        "{missing:?}"
    );
    let beyond = engine.as_of(
        "sums",
        None,
        &AsOf::Offsets(BTreeMap::from([("events/0".into(), 10_000), ("events/1".into(), 0)])),
        None,
    );
    assert!(matches!(&beyond, Err(ViewError::AsOfInvalid { reason, .. }) if reason.contains("outside")), "{beyond:?}");
    // A partition that is not an input (a typo'd topic, one past the count) is named, not
    // ignored or reported as a missing input partition.
    let all_given = |extra: &str| -> BTreeMap<String, i64> {
        let partitions = fixture.log.topic(TOPIC).unwrap().partition_count();
        (0..partitions).map(|p| (format!("events/{p}"), 0)).chain([(extra.to_owned(), 0)]).collect()
    };
    for extra in ["events/99", "evnts/0"] {
        let unknown = engine.as_of("sums", None, &AsOf::Offsets(all_given(extra)), None);
        assert!(
            matches!(&unknown, Err(ViewError::AsOfInvalid { reason, .. }) if reason.contains(&format!("{extra} is not an input partition")) && reason.contains("its inputs: events/0 to events/")),
            "{unknown:?}"
        );
    }
    engine.shutdown();
}

#[test]
fn as_of_refuses_history_that_compaction_removed() {
    let fixture = Fixture::with_configs(
        1,
        &[("cleanup.policy", "compact"), ("segment.bytes", "1024"), ("min.cleanable.dirty.ratio", "0.01")],
    );
    for i in 0..200 {
        fixture.append(0, vec![event(&format!("k{}", i % 3), Some(json!({"n": i})), None, None, 1_000 + i)]);
    }
    fixture.log.compact().unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    let result = engine.as_of("sums", None, &AsOf::Timestamp(1_050), None);
    assert!(matches!(&result, Err(ViewError::AsOf { reason, .. }) if reason.contains("compacted")), "{result:?}");
    engine.shutdown();
}

/// Compaction removed an aborted transaction (which lost nothing) and, after it, records
/// superseded later: history before the first removed committed record is intact.
#[test]
fn as_of_answers_before_the_first_compacted_record_and_across_removed_aborted_transactions() {
    let fixture = Fixture::with_configs(
        1,
        &[("cleanup.policy", "compact"), ("segment.bytes", "1024"), ("min.cleanable.dirty.ratio", "0.01")],
    );
    let mut events = Vec::new();
    for i in 0..100 {
        events.push((format!("k{i}"), Some(i)));
        fixture.append(0, vec![event(&format!("k{i}"), Some(json!({"n": i})), None, None, 1_000 + i)]);
    }
    for sequence in 0..3 {
        fixture.append_transactional(0, 7, sequence, vec![event("k0", Some(json!({"n": 1000})), None, None, 1_100)]);
    }
    fixture.end_transaction(0, 7, false);
    let first_superseded = fixture.append(0, vec![event("k500", Some(json!({"n": 1})), None, None, 1_104)]);
    for i in 0..40 {
        fixture.append(0, vec![event(&format!("k{}", 500 + i % 2), Some(json!({"n": i})), None, None, 1_105 + i)]);
    }
    fixture.log.compact().unwrap();
    let read =
        fixture.log.partition(TOPIC, 0).unwrap().read(100, 1 << 20, kappa_log::Isolation::ReadUncommitted).unwrap();
    let first = kappa_log::batch::BatchHeader::parse(&read.records).unwrap();
    assert_eq!(first.base_offset, 103, "compaction removed the aborted records; the abort marker is next");
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    let at =
        |offset: i64| engine.as_of("sums", None, &AsOf::Offsets(BTreeMap::from([("events/0".into(), offset)])), None);
    assert_eq!(values(&at(first_superseded).unwrap()), reference(&events, 1));
    let result = at(first_superseded + 1);
    assert!(
        matches!(&result, Err(ViewError::AsOf { reason, .. }) if reason.contains(&format!("offset {first_superseded} was compacted"))),
        "{result:?}"
    );
    engine.shutdown();
}

/// Compaction removed the records that end the readable history: a value and the expired
/// tombstone that deleted it, just before an open transaction that pins the stable offset.
#[test]
fn as_of_refuses_a_point_whose_history_ends_in_removed_records() {
    let fixture = Fixture::with_configs(
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.bytes", "1024"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("delete.retention.ms", "0"),
        ],
    );
    // Each record fills a segment of its own.
    let pad = "p".repeat(1024);
    for i in 0..5 {
        fixture.append(0, vec![event(&format!("k{i}"), Some(json!({"n": i, "pad": pad})), None, None, 1_000 + i)]);
    }
    let value = fixture.append(0, vec![event("kz", Some(json!({"n": 9, "pad": pad})), None, None, 1_005)]);
    fixture.append(0, vec![event("kz", None, None, None, 1_006)]);
    let open =
        fixture.append_transactional(0, 7, 0, vec![event("k0", Some(json!({"n": 1, "pad": pad})), None, None, 1_007)]);
    assert_eq!(fixture.log.partition(TOPIC, 0).unwrap().last_stable_offset(), open);
    fixture.log.compact().unwrap();
    let read =
        fixture.log.partition(TOPIC, 0).unwrap().read(value, 1 << 20, kappa_log::Isolation::ReadCommitted).unwrap();
    assert!(read.records.is_empty(), "compaction removed the value and its tombstone");
    let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::open_offline(backend, config, vec![sum_view(1, 1)]).unwrap();
    let at =
        |offset: i64| engine.as_of("sums", None, &AsOf::Offsets(BTreeMap::from([("events/0".into(), offset)])), None);
    assert_eq!(at(value).unwrap().values.len(), 5);
    let result = at(value + 1);
    assert!(
        matches!(&result, Err(ViewError::AsOf { reason, .. }) if reason.contains(&format!("offset {value} was compacted"))),
        "{result:?}"
    );
    engine.shutdown();
    // A running view steps over the removed tail and catches up (it used to re-read the
    // empty range forever, spinning, with a lag of 1).
    let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::start(backend, config, vec![sum_view(1, 1)]).unwrap();
    assert!(engine.wait_caught_up("sums", Duration::from_secs(30)).unwrap(), "the view never caught up");
    engine.shutdown();
}

/// A view reads past more segments that compaction emptied than one log read looks at
/// (64): it steps over the empty ones it saw, not to the end, and finds what follows.
#[test]
fn a_view_reads_past_many_segments_compaction_emptied() {
    let fixture = Fixture::with_configs(
        1,
        &[("cleanup.policy", "compact"), ("segment.bytes", "1024"), ("min.cleanable.dirty.ratio", "0.01")],
    );
    let pad = "p".repeat(1024);
    // Each record fills a segment of its own: 80 versions of "k", then "j".
    for i in 0..80 {
        fixture.append(0, vec![event("k", Some(json!({"n": i, "pad": pad})), None, None, 1_000 + i)]);
    }
    fixture.append(0, vec![event("j", Some(json!({"n": 7, "pad": pad})), None, None, 2_000)]);
    fixture.append(0, vec![event("last", Some(json!({"n": 1, "pad": pad})), None, None, 2_001)]);
    fixture.log.compact().unwrap();
    let read = fixture.log.partition(TOPIC, 0).unwrap().read(0, 1 << 20, kappa_log::Isolation::ReadCommitted).unwrap();
    assert!(
        read.records.is_empty() && read.scanned_to < read.last_stable_offset,
        "the first read sees only empty segments"
    );
    let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::start(backend, config, vec![sum_view(1, 1)]).unwrap();
    assert!(engine.wait_caught_up("sums", Duration::from_secs(30)).unwrap(), "the view never caught up");
    for (key, n) in [("k", 79), ("j", 7), ("last", 1)] {
        let item = engine.get("sums", key).unwrap().value.unwrap_or_else(|| panic!("{key} is missing"));
        let value: Value = serde_json::from_slice(&item.json).unwrap();
        assert_eq!(value["total"], n, "{key}: {value}");
    }
    engine.shutdown();
}

/// Fans one event out to a key per tag, and keeps the tags of each record key internally.
struct Tags;

impl Processor for Tags {
    type State = Vec<String>;
    type Internal = Vec<String>;

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Vec<String>, Vec<String>>) -> Result<(), EventError> {
        let key = event.key_str().unwrap_or_default().to_owned();
        let old: Vec<String> = state.get_internal(&key)?.unwrap_or_default();
        for tag in &old {
            let mut members = state.take(tag)?.unwrap_or_default();
            members.retain(|m| m != &key);
            if members.is_empty() { state.delete(tag) } else { state.put(tag, members) }
        }
        #[derive(Deserialize)]
        struct Tagged {
            #[serde(default)]
            tags: Vec<String>,
        }
        let tags = event.decode::<Tagged>()?.map(|t| t.tags).unwrap_or_default();
        for tag in &tags {
            let mut members = state.take(tag)?.unwrap_or_default();
            members.push(key.clone());
            members.sort();
            state.put(tag, members);
        }
        state.put_internal(&key, tags);
        Ok(())
    }
}

#[test]
fn a_processor_fans_out_to_many_keys_and_its_internal_keys_stay_private() {
    let fixture = Fixture::new(2);
    fixture.append(0, vec![event("doc1", Some(json!({"tags": ["red", "blue"]})), None, None, 1)]);
    fixture.append(1, vec![event("doc2", Some(json!({"tags": ["blue"]})), None, None, 2)]);
    let engine = fixture.engine(Schemas::new(), vec![View::processor("tags", 1, &[TOPIC], Tags)]);
    wait_caught_up(&engine, "tags");
    assert_eq!(
        dump(&engine, "tags"),
        BTreeMap::from([("blue".to_owned(), json!(["doc1", "doc2"])), ("red".to_owned(), json!(["doc1"]))])
    );
    fixture.append(0, vec![event("doc1", Some(json!({"tags": ["green"]})), None, None, 3)]);
    wait_caught_up(&engine, "tags");
    assert_eq!(
        dump(&engine, "tags"),
        BTreeMap::from([("blue".to_owned(), json!(["doc2"])), ("green".to_owned(), json!(["doc1"]))])
    );
    assert!(engine.get("tags", "doc1").unwrap().value.is_none(), "internal keys are not view keys");
    engine.shutdown();
    // Internal state survives a restart (it is in the store and the changelog).
    let engine = fixture.engine(Schemas::new(), vec![View::processor("tags", 1, &[TOPIC], Tags)]);
    fixture.append(0, vec![event("doc1", Some(json!({"tags": []})), None, None, 4)]);
    wait_caught_up(&engine, "tags");
    assert_eq!(dump(&engine, "tags"), BTreeMap::from([("blue".to_owned(), json!(["doc2"]))]));
    engine.shutdown();
}

#[test]
fn bad_definitions_are_rejected_with_the_reason() {
    let fixture = Fixture::new(1);
    let config = || kappa_views::EngineConfig::new(fixture.views_dir());
    let backend = || Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
    let bad_name = kappa_views::ViewEngine::start(
        backend(),
        config(),
        vec![View::reducer("Bad Name", 1, &[TOPIC], Sum { factor: 1 })],
    );
    assert!(matches!(bad_name, Err(ViewError::Definition { reason, .. }) if reason.contains("a-z")));
    let twice = kappa_views::ViewEngine::start(backend(), config(), vec![sum_view(1, 1), sum_view(1, 2)]);
    assert!(matches!(twice, Err(ViewError::Definition { reason, .. }) if reason.contains("defined twice")));
    let engine = kappa_views::ViewEngine::start(
        backend(),
        config(),
        vec![View::reducer("nope", 1, &["missing-topic"], Sum { factor: 1 })],
    )
    .unwrap();
    let Phase::Failed(reason) = wait_for_phase(&engine, "nope", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    assert!(reason.contains("missing-topic") && reason.contains("create the topic"), "{reason}");
    assert!(matches!(engine.get("unknown", "k"), Err(ViewError::UnknownView(_))));
    engine.shutdown();
}

#[test]
fn as_of_refuses_history_that_retention_deleted_and_the_live_view_continues_from_what_is_left() {
    let fixture = Fixture::with_configs(1, &[("segment.bytes", "1024"), ("retention.bytes", "2048")]);
    for i in 0..100 {
        fixture.append(0, vec![event(&format!("k{}", i % 3), Some(json!({"n": 1})), None, None, 1_000 + i)]);
    }
    fixture.log.enforce_retention().unwrap();
    let start = fixture.log.partition(TOPIC, 0).unwrap().log_start_offset();
    assert!(start > 0, "retention removed the oldest segments");
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    let applied = engine.describe("sums").unwrap().versions[0].status.events_applied;
    assert_eq!(applied, 100 - start, "the view applied what retention left");
    let result = engine.as_of("sums", None, &AsOf::Timestamp(1_050), None);
    assert!(
        matches!(&result, Err(ViewError::AsOf { reason, .. }) if reason.contains("deleted by retention")),
        "{result:?}"
    );
    engine.shutdown();
}

/// Every record of a partition deleted before a view read them: the view keeps the
/// partition's start as its position (nothing to apply), shows no lag and waits for
/// records. It used to retry its old position in a busy loop (a warning each turn, ~170,000
/// a second) with a lag that never went to 0, until a record arrived.
#[test]
fn a_view_behind_a_partition_whose_records_were_all_deleted_waits_at_its_start() {
    let fixture = Fixture::new(1);
    for i in 0..10 {
        fixture.append(0, vec![event(&format!("k{i}"), Some(json!({"n": 1})), None, None, 1_000 + i)]);
    }
    fixture.log.partition(TOPIC, 0).unwrap().delete_records(10).unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    let started = Instant::now();
    while engine.describe("sums").unwrap().versions[0].status.lag() != 0 {
        let status = &engine.describe("sums").unwrap().versions[0].status;
        assert!(started.elapsed() < Duration::from_secs(10), "lag never reached 0: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    fixture.append(0, vec![event("k0", Some(json!({"n": 5})), None, None, 2_000)]);
    wait_applied(&engine, "sums", 1, 1);
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k0".to_owned(), json!({"count": 1, "total": 5}))]));
    engine.shutdown();
}

/// Each key's value is "v".
struct Constant;

impl Reducer for Constant {
    type State = String;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<String>, _: &Event) -> Result<Option<String>, EventError> {
        Ok(Some("v".to_owned()))
    }
}

/// A checkpoint starts after every step, so the step on partition 1 fails (its changelog
/// append is refused) while the one started after partition 0's step runs; finishing it
/// must not store partition 1's position past the events whose step never reached the
/// changelog.
#[test]
fn a_step_whose_commit_fails_is_applied_again_after_a_restart() {
    let fixture = Fixture::new(2);
    fixture.append(0, vec![event("k0", Some(json!({})), None, None, 1)]);
    fixture.append(1, vec![event("k1", Some(json!({})), None, None, 2), event("k2", Some(json!({})), None, None, 3)]);
    let start = |refuse: bool| {
        let backend = Arc::new(Gated {
            log: kappa_views::EmbeddedLog::new(fixture.log.clone()),
            topic: String::new(),
            entered: AtomicBool::new(false),
            released: AtomicBool::new(true),
            refused_key: refuse.then(|| b"k2".to_vec()),
            refusing: AtomicBool::new(true),
        });
        let config = kappa_views::EngineConfig {
            checkpoint_interval: Duration::ZERO,
            ..kappa_views::EngineConfig::new(fixture.views_dir())
        };
        let view = View::reducer("constant", 1, &[TOPIC], Constant);
        kappa_views::ViewEngine::start(backend, config, vec![view]).unwrap()
    };
    let engine = start(true);
    let Phase::Restarting { reason, .. } =
        wait_for_phase(&engine, "constant", |p| matches!(p, Phase::Restarting { .. }))
    else {
        unreachable!()
    };
    assert!(reason.contains("refused append"), "{reason}");
    engine.shutdown();
    let engine = start(false);
    wait_caught_up(&engine, "constant");
    assert_eq!(
        dump(&engine, "constant"),
        BTreeMap::from([("k0".to_owned(), json!("v")), ("k1".to_owned(), json!("v")), ("k2".to_owned(), json!("v"))])
    );
    engine.shutdown();
}

/// A changelog created with a smaller `max.message.bytes` would refuse a large step.
#[test]
fn an_existing_changelog_takes_batches_as_large_as_a_step() {
    let fixture = Fixture::new(1);
    let configs = BTreeMap::from([
        ("cleanup.policy".to_owned(), "compact".to_owned()),
        ("max.message.bytes".to_owned(), (17 * 1024 * 1024).to_string()),
    ]);
    fixture.log.create_topic("__kappa.view.sums.v1", 1, &configs).unwrap();
    fixture.append(0, vec![event("k1", Some(json!({"n": 1})), None, None, 1)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    let changelog = fixture.log.topic("__kappa.view.sums.v1").unwrap();
    assert_eq!(changelog.config().max_message_bytes, kappa_views::runner::CHANGELOG_STEP_BYTES_MAX + 1024 * 1024);
    engine.shutdown();
}

/// The embedded log, except that waiting for one topic to be durable blocks until released,
/// and appends of records with `refused_key` fail.
struct Gated {
    log: kappa_views::EmbeddedLog,
    topic: String,
    entered: AtomicBool,
    released: AtomicBool,
    refused_key: Option<Vec<u8>>,
    /// While false, nothing is refused.
    refusing: AtomicBool,
}

impl Gated {
    /// Waits on `topic` until released.
    fn gate(&self, topic: &str) {
        if topic == self.topic {
            self.entered.store(true, Ordering::Release);
            while !self.released.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl kappa_views::LogBackend for Gated {
    fn partition_count(&self, topic: &str) -> kappa_views::Result<i32> {
        self.log.partition_count(topic)
    }
    fn read_committed(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        max_bytes: usize,
    ) -> kappa_views::Result<kappa_views::backend::InputChunk> {
        self.log.read_committed(topic, partition, from, max_bytes)
    }
    fn start_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.start_offset(topic, partition)
    }
    fn end_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.end_offset(topic, partition)
    }
    fn offset_for_timestamp(&self, topic: &str, partition: i32, timestamp: i64) -> kappa_views::Result<Option<i64>> {
        self.log.offset_for_timestamp(topic, partition, timestamp)
    }
    fn wait_for_input(&self, inputs: &[(&str, i32, i64)], timeout: Duration) -> kappa_views::Result<()> {
        self.log.wait_for_input(inputs, timeout)
    }
    fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        configs: &BTreeMap<String, String>,
    ) -> kappa_views::Result<()> {
        self.log.ensure_topic(topic, partitions, configs)
    }
    fn delete_topic(&self, topic: &str) -> kappa_views::Result<()> {
        self.log.delete_topic(topic)
    }
    fn append(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<kappa_views::backend::OutputRecord>,
    ) -> kappa_views::Result<(i64, i64)> {
        let refused = self.refused_key.as_ref().is_some_and(|refused| records.iter().any(|r| &r.key == refused));
        if refused && self.refusing.load(Ordering::Acquire) {
            let source = std::io::Error::new(std::io::ErrorKind::StorageFull, "refused append (test)");
            return Err(ViewError::Io { path: topic.into(), source });
        }
        self.log.append(topic, partition, records)
    }
    fn wait_durable(&self, topic: &str, partition: i32, offset: i64) -> kappa_views::Result<()> {
        self.gate(topic);
        self.log.wait_durable(topic, partition, offset)
    }
    fn make_durable(&self, topic: &str, partition: i32, offset: i64) -> kappa_views::Result<()> {
        self.gate(topic);
        self.log.make_durable(topic, partition, offset)
    }
    fn durable_end_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.durable_end_offset(topic, partition)
    }
}

/// Retiring a version while its runner is about to report catching up (which takes the
/// view's admin lock) must not wait for that runner while holding the lock.
#[test]
fn retiring_a_version_as_it_catches_up_does_not_deadlock() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k1", Some(json!({"n": 1})), None, None, 1)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(2, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    // Version 1 builds beside the serving version 2; its checkpoint before catching up waits.
    let gated = Arc::new(Gated {
        log: kappa_views::EmbeddedLog::new(fixture.log.clone()),
        topic: "__kappa.view.sums.v1".to_owned(),
        entered: AtomicBool::new(false),
        released: AtomicBool::new(false),
        refused_key: None,
        refusing: AtomicBool::new(false),
    });
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::start(gated.clone(), config, vec![sum_view(1, 1), sum_view(2, 1)]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !gated.entered.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "version 1 never reached its checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    }
    let retire = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.retire("sums", 1))
    };
    // Let retire stop the runner first (if it is slower, the runner simply finishes first).
    std::thread::sleep(Duration::from_millis(200));
    gated.released.store(true, Ordering::Release);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !retire.is_finished() {
        assert!(std::time::Instant::now() < deadline, "retire deadlocked with the runner's catch-up");
        std::thread::sleep(Duration::from_millis(5));
    }
    retire.join().unwrap().unwrap();
    assert!(fixture.log.topic("__kappa.view.sums.v1").is_err(), "the retired version's changelog is deleted");
    assert_eq!(engine.describe("sums").unwrap().active, Some(2));
    engine.shutdown();
}

/// Each key's value is a 1 MiB string, so a few dozen events make a step's changes larger
/// than one changelog batch may be (`CHANGELOG_STEP_BYTES_MAX`).
struct Mebibyte;

const MEBIBYTE: usize = 1024 * 1024;

impl Reducer for Mebibyte {
    type State = String;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<String>, _: &Event) -> Result<Option<String>, EventError> {
        Ok(Some("x".repeat(MEBIBYTE)))
    }
}

/// Appends one transaction of producer `producer` setting `keys` and commits it; returns
/// the offset of its marker.
fn commit_transaction(fixture: &Fixture, producer: i64, sequence: i32, keys: &[String]) -> i64 {
    let records = keys.iter().map(|k| event(k, Some(json!({})), None, None, 1)).collect();
    let first = fixture.append_transactional(0, producer, sequence, records);
    fixture.end_transaction(0, producer, true);
    first + keys.len() as i64
}

/// The input position "events/0" of every step marker in a changelog, in order.
fn step_positions(fixture: &Fixture, changelog: &str) -> Vec<i64> {
    use kappa_views::LogBackend;
    let backend = kappa_views::EmbeddedLog::new(fixture.log.clone());
    let end = backend.durable_end_offset(changelog, 0).unwrap();
    let (mut from, mut positions) = (0, Vec::new());
    while from < end {
        let chunk = backend.read_committed(changelog, 0, from, MEBIBYTE).unwrap();
        for record in &chunk.records {
            if let kappa_views::changelog::Entry::Step { marker, .. } = kappa_views::changelog::decode(record).unwrap()
            {
                positions.push(marker.positions["events/0"]);
            }
        }
        assert!(chunk.next_offset > from, "the changelog read moves on");
        from = chunk.next_offset;
    }
    positions
}

/// Two committed transactions (25 + 15 MiB of changes) are read in one step, which is too
/// large for one changelog batch: the shortened step must end between them, not halfway
/// through the first (20 events) — and must not leave the partition waiting for the open
/// transaction further on, which the first reading stopped at, with the second
/// transaction not applied.
#[test]
fn a_step_too_large_for_the_changelog_is_shortened_between_transactions() {
    let fixture = Fixture::new(1);
    let first: Vec<String> = (0..25).map(|i| format!("a{i:02}")).collect();
    let second: Vec<String> = (0..15).map(|i| format!("b{i:02}")).collect();
    let first_marker = commit_transaction(&fixture, 1, 0, &first);
    let second_marker = commit_transaction(&fixture, 1, 25, &second);
    assert_eq!((first_marker, second_marker), (25, 41));
    // Producer 3's transaction is committed but interleaved with producer 2's, left open:
    // the step stops before it (the last stable offset is producer 2's first record).
    fixture.append_transactional(0, 3, 0, vec![event("c", Some(json!({})), None, None, 1)]);
    fixture.append_transactional(0, 2, 0, vec![event("open", Some(json!({})), None, None, 1)]);
    fixture.append_transactional(0, 3, 1, vec![event("c", Some(json!({})), None, None, 1)]);
    fixture.end_transaction(0, 3, true);
    assert_eq!(fixture.log.partition(TOPIC, 0).unwrap().last_stable_offset(), 43);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("big", 1, &[TOPIC], Mebibyte)]);
    wait_for_phase(&engine, "big", |p| *p == Phase::Live);
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.describe("big").unwrap().active.is_none() {
        assert!(Instant::now() < deadline, "the caught-up version never served reads");
        std::thread::sleep(Duration::from_millis(5));
    }
    let keys: Vec<String> = dump(&engine, "big").into_keys().collect();
    let expected: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_eq!(keys, expected, "both transactions applied once the view is live");
    assert_eq!(
        step_positions(&fixture, "__kappa.view.big.v1"),
        vec![first_marker + 1, 42],
        "steps end between transactions"
    );
    engine.shutdown();
}

/// One transaction whose changes alone (40 MiB) are larger than a changelog batch may be
/// is applied in pieces, cut inside it, rather than failing the version: the input cannot
/// be rewritten, so a failed version could never recover.
#[test]
fn a_transaction_too_large_for_one_step_is_applied_in_pieces() {
    let fixture = Fixture::new(1);
    let keys: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    let marker = commit_transaction(&fixture, 1, 0, &keys);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("big", 1, &[TOPIC], Mebibyte)]);
    let phase = wait_for_phase(&engine, "big", |p| matches!(p, Phase::Live | Phase::Failed(_)));
    assert_eq!(phase, Phase::Live);
    wait_caught_up(&engine, "big");
    assert_eq!(dump(&engine, "big").into_keys().collect::<Vec<_>>(), keys, "every key of the transaction applied");
    assert_eq!(step_positions(&fixture, "__kappa.view.big.v1"), vec![20, marker + 1], "the transaction halved");
    engine.shutdown();
}

/// The first reading stops before a committed transaction interleaved with an open one;
/// an event before that fails and is skipped into the dead-letter topic, so the step ends
/// at it: the events between it and the transaction must still be applied.
#[test]
fn events_after_a_dead_lettered_one_are_applied_while_an_open_transaction_waits() {
    let fixture = Fixture::new(1);
    let bad = kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"{bad"), 2);
    fixture.append(
        0,
        vec![event("k1", Some(json!({"n": 1})), None, None, 1), bad, event("k1", Some(json!({"n": 2})), None, None, 3)],
    );
    fixture.append_transactional(0, 3, 0, vec![event("k3", Some(json!({"n": 3})), None, None, 4)]);
    fixture.append_transactional(0, 2, 0, vec![event("k2", Some(json!({"n": 4})), None, None, 5)]);
    fixture.append_transactional(0, 3, 1, vec![event("k3", Some(json!({"n": 5})), None, None, 6)]);
    fixture.end_transaction(0, 3, true);
    assert_eq!(fixture.log.partition(TOPIC, 0).unwrap().last_stable_offset(), 4);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1).dead_letter("sums-dlq")]);
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.describe("sums").unwrap().active.is_none() {
        assert!(Instant::now() < deadline, "the caught-up version never served reads");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 2, "total": 3}))]));
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.positions["events/0"], 3);
    engine.shutdown();
}

/// key → a string of "x": each event appends as many as its payload's `add`.
struct Growing;

impl Reducer for Growing {
    type State = String;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, state: Option<String>, event: &Event) -> Result<Option<String>, EventError> {
        let add = event.payload()?.and_then(|p| p.get("add")).and_then(Value::as_u64).unwrap_or(0);
        let mut value = state.unwrap_or_default();
        value.push_str(&"x".repeat(add as usize));
        Ok(Some(value))
    }
}

fn grow(key: &str, add: usize) -> kappa_log::records::NewRecord {
    event(key, Some(json!({ "add": add })), None, None, 1)
}

/// k2 grows by 3 MiB, then 2 MiB (offset 2: 5 MiB is past VIEW_VALUE_BYTES_MAX), ...
fn write_growing(fixture: &Fixture) {
    fixture.append(
        0,
        vec![
            grow("k1", 10),
            grow("k2", 3 * MEBIBYTE),
            grow("k2", 2 * MEBIBYTE),
            grow("k3", 1),
            grow("k2", 2 * MEBIBYTE),
            grow("k2", 5),
        ],
    );
}

/// How often a `Counted` value was serialized.
static SERIALIZED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A string that counts its serializations.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
struct Counted(String);

impl Serialize for Counted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        SERIALIZED.fetch_add(1, Ordering::Relaxed);
        self.0.serialize(serializer)
    }
}

/// As `Growing`, with a value that counts its serializations; `{"reset": true}` empties it.
struct CountedGrowing;

impl Reducer for CountedGrowing {
    type State = Counted;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, state: Option<Counted>, event: &Event) -> Result<Option<Counted>, EventError> {
        let payload = event.payload()?;
        if payload.and_then(|p| p.get("reset")).is_some() {
            return Ok(Some(Counted(String::new())));
        }
        let add = payload.and_then(|p| p.get("add")).and_then(Value::as_u64).unwrap_or(0);
        let mut value = state.map_or_else(String::new, |c| c.0);
        value.push_str(&"x".repeat(add as usize));
        Ok(Some(Counted(value)))
    }
}

/// A key found too large is watched (its value serialized after every event touching it)
/// only until a step leaves it well under the limit: once emptied, 100 more events on it
/// serialize it about once per step, not once per event.
#[test]
fn a_key_found_too_large_is_no_longer_watched_once_it_shrinks() {
    let fixture = Fixture::new(1);
    // Offset 1 (5 MiB) is dead-lettered and k watched; k is emptied in a later step.
    fixture.append(0, vec![grow("k", 3 * MEBIBYTE), grow("k", 2 * MEBIBYTE)]);
    let view = View::reducer("counted", 1, &[TOPIC], CountedGrowing).dead_letter("counted-dlq");
    let engine = fixture.engine(Schemas::new(), vec![view]);
    let wait_for = |offset: i64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = engine.describe("counted").unwrap();
            if info.versions[0].status.positions.get("events/0").is_some_and(|&p| p >= offset) {
                return;
            }
            assert!(Instant::now() < deadline, "offset {offset} never reached: {info:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(2);
    fixture.append(0, vec![event("k", Some(json!({"reset": true})), None, None, 1)]);
    wait_for(3);
    SERIALIZED.store(0, Ordering::Relaxed);
    fixture.append(0, (0..100).map(|_| grow("k", 1)).collect());
    wait_for(103);
    let serialized = SERIALIZED.load(Ordering::Relaxed);
    assert!(serialized < 20, "k serialized {serialized} times for 100 events: still watched");
    assert_eq!(dump(&engine, "counted")["k"], json!("x".repeat(100)));
    engine.shutdown();
}

/// Not deterministic: every other application of an event makes a 5 MiB value (past
/// VIEW_VALUE_BYTES_MAX), the others a small one.
#[derive(Default)]
struct Flaky {
    calls: std::sync::atomic::AtomicUsize,
}

impl Reducer for Flaky {
    type State = String;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<String>, _: &Event) -> Result<Option<String>, EventError> {
        let even = self.calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
        Ok(Some(if even { "x".repeat(5 * MEBIBYTE) } else { "x".to_owned() }))
    }
}

/// Looking again for the event that made a value too large finds none: the version fails
/// saying the view is not deterministic (the runner used to panic, which left the version
/// looking alive), and so does an as-of replay (which used to panic its caller).
#[test]
fn a_view_that_is_not_deterministic_about_a_too_large_value_fails_the_version() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![grow("k1", 1)]);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("flaky", 1, &[TOPIC], Flaky::default())]);
    let Phase::Failed(reason) = wait_for_phase(&engine, "flaky", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    assert!(reason.contains("not deterministic") && reason.contains("events/0 offsets 0 to 0"), "{reason}");
    let at = AsOf::Offsets(BTreeMap::from([("events/0".into(), 1)]));
    match engine.as_of("flaky", Some(1), &at, None) {
        Err(ViewError::AsOf { reason, .. }) => assert!(reason.contains("not deterministic"), "{reason}"),
        other => panic!("expected an as-of error, got {:?}", other.map(|r| r.values.len())),
    }
    engine.shutdown();
}

#[test]
fn an_event_making_a_value_too_large_stops_a_stop_policy_view_at_that_event() {
    let fixture = Fixture::new(1);
    write_growing(&fixture);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("growing", 1, &[TOPIC], Growing)]);
    let Phase::Failed(reason) = wait_for_phase(&engine, "growing", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    let bytes = 5 * MEBIBYTE + 2; // a JSON string: its quotes
    assert!(
        reason.contains("events/0 offset 2")
            && reason.contains("key 'k2'")
            && reason.contains(&format!("{bytes} bytes"))
            && reason.contains("VIEW_VALUE_BYTES_MAX"),
        "{reason}"
    );
    let info = engine.describe("growing").unwrap();
    assert_eq!(info.versions[0].status.positions["events/0"], 2, "the events before it are applied");
    engine.shutdown();
}

#[test]
fn an_event_making_a_value_too_large_is_dead_lettered_and_its_changes_undone() {
    let fixture = Fixture::new(1);
    write_growing(&fixture);
    let view = View::reducer("growing", 1, &[TOPIC], Growing).dead_letter("growing-dlq");
    let engine = fixture.engine(Schemas::new(), vec![view]);
    wait_caught_up(&engine, "growing");
    let lengths: BTreeMap<String, usize> =
        dump(&engine, "growing").into_iter().map(|(k, v)| (k, v.as_str().unwrap().len())).collect();
    // Both events that would take k2 past the limit are skipped, the others applied.
    let expected = BTreeMap::from([("k1".to_owned(), 10), ("k2".to_owned(), 3 * MEBIBYTE + 5), ("k3".to_owned(), 1)]);
    assert_eq!(lengths, expected);
    // An as-of replay skips them too.
    let at = AsOf::Offsets(BTreeMap::from([("events/0".into(), 6)]));
    let result = engine.as_of("growing", None, &at, None).unwrap();
    assert_eq!(values(&result), dump(&engine, "growing"));
    let dlq = fixture.log.partition("growing-dlq", 0).unwrap();
    let read = dlq.read(0, 1 << 20, kappa_log::Isolation::ReadUncommitted).unwrap();
    let mut found = Vec::new();
    let mut rest = read.records.as_slice();
    while !rest.is_empty() {
        let len = kappa_log::batch::batch_total_len(rest, rest.len()).unwrap();
        for r in kappa_log::records::decode_records(&rest[..len], 1 << 20).unwrap().iter() {
            let header = |n: &str| r.header(n).flatten().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap();
            found.push((header("kappa.dlq.source"), header("kappa.dlq.reason")));
        }
        rest = &rest[len..];
    }
    assert_eq!(found.iter().map(|(source, _)| source.as_str()).collect::<Vec<_>>(), ["events/0/2", "events/0/4"]);
    for (_, reason) in &found {
        assert!(reason.contains("key 'k2'") && reason.contains("VIEW_VALUE_BYTES_MAX"), "{reason}");
    }
    engine.shutdown();
}

/// Partitions added to an input topic while a view runs (CreatePartitions) are followed
/// without a restart: their events are applied, and positions, lag and catching up
/// cover them.
#[test]
fn a_partition_added_to_an_input_topic_is_read_without_a_restart() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k0", Some(json!({"n": 1})), None, None, 1)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    fixture.log.add_partitions(TOPIC, 3).unwrap();
    fixture.append(2, vec![event("k2", Some(json!({"n": 5})), None, None, 2)]);
    fixture.append(0, vec![event("k0", Some(json!({"n": 2})), None, None, 3)]);
    assert!(
        engine.wait_caught_up("sums", Duration::from_secs(15)).unwrap(),
        "the event on the added partition was not applied: {:?}",
        engine.describe("sums")
    );
    let expected = BTreeMap::from([
        ("k0".to_owned(), json!({"count": 2, "total": 3})),
        ("k2".to_owned(), json!({"count": 1, "total": 5})),
    ]);
    assert_eq!(dump(&engine, "sums"), expected);
    let status = engine.describe("sums").unwrap().versions[0].status.clone();
    assert_eq!(status.positions.get("events/2"), Some(&1), "{status:?}");
    assert_eq!(status.lag(), 0);
    assert_eq!(fold_changelog(&fixture.log, "__kappa.view.sums.v1"), expected);
    engine.shutdown();
    // Reopened: every partition resumes from its stored position, nothing applied twice.
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    fixture.append(1, vec![event("k1", Some(json!({"n": 7})), None, None, 4)]);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums")["k0"], json!({"count": 2, "total": 3}));
    assert_eq!(dump(&engine, "sums")["k1"], json!({"count": 1, "total": 7}));
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.events_applied, 4);
    engine.shutdown();
}

/// Waits until `version` of `view` has applied `events` events (its catching up is then a
/// step or two away), then a little longer so its runner has been idle at least once.
fn wait_applied(engine: &kappa_views::ViewEngine, view: &str, version: u32, events: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = engine.describe(view).unwrap();
        let status = &info.versions.iter().find(|v| v.version == version).unwrap().status;
        if status.events_applied >= events {
            break;
        }
        assert!(Instant::now() < deadline, "version {version} did not apply {events} events: {info:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
}

fn wait_active(engine: &kappa_views::ViewEngine, view: &str, want: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if engine.describe(view).unwrap().active == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The switch to a version that caught up must not be lost when the active file cannot be
/// written (a full disk, or the process dying before it is): the version is marked caught
/// up only once the switch is made, so it is made again (by a retry, or after a restart).
/// A manual rollback made after the switch survives restarts.
#[test]
fn the_switch_to_a_caught_up_version_survives_a_failed_active_file_write_and_a_restart() {
    let fixture = Fixture::new(1);
    let events: Vec<(String, Option<i64>)> = (0..200).map(|i| (format!("k{}", i % 5), Some(i))).collect();
    write_events(&fixture, 1, &events, 20);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();

    // A directory where the active file's temporary copy goes: every write of it fails.
    let blocker = fixture.views_dir().join("sums/active.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    wait_applied(&engine, "sums", 2, events.len() as i64);
    let info = engine.describe("sums").unwrap();
    assert_eq!(info.active, Some(1), "{info:?}");
    assert_eq!(info.versions[1].status.phase, Phase::Building, "not caught up until it serves: {info:?}");
    engine.shutdown(); // as a crash would, leaving version 2 built but not serving

    // Restarted with the disk writable again: version 2 takes over once caught up.
    std::fs::remove_dir(&blocker).unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    assert!(wait_active(&engine, "sums", 2, Duration::from_secs(15)), "{:?}", engine.describe("sums"));
    assert_eq!(dump(&engine, "sums"), reference(&events, 10));
    // An operator rolls back; a restart keeps the rollback.
    engine.switch("sums", 1, false).unwrap();
    engine.shutdown();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(engine.describe("sums").unwrap().active, Some(1));
    assert_eq!(dump(&engine, "sums"), reference(&events, 1));
    engine.shutdown();
}

/// A view's first version serves once caught up even if the first write of the active
/// file failed: it retries while running.
#[test]
fn a_first_version_whose_active_file_write_failed_serves_once_it_can_be_written() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k0", Some(json!({"n": 1})), None, None, 1)]);
    std::fs::create_dir_all(fixture.views_dir().join("sums/active.tmp")).unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_applied(&engine, "sums", 1, 1);
    assert!(matches!(engine.get("sums", "k0"), Err(ViewError::NotReady { .. })));
    std::fs::remove_dir(fixture.views_dir().join("sums/active.tmp")).unwrap();
    assert!(wait_active(&engine, "sums", 1, Duration::from_secs(15)), "{:?}", engine.describe("sums"));
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k0".to_owned(), json!({"count": 1, "total": 1}))]));
    engine.shutdown();
}

/// Under the interval sync policy an append is durable only at the next interval sync; a
/// state store checkpoint must still never be durable ahead of its changelog (recovery
/// would find "the changelog lost records" after a power loss and the version would have
/// to be rebuilt).
#[test]
fn under_the_interval_sync_policy_a_checkpoint_makes_the_changelog_durable_first() {
    let dir = tempfile::tempdir().unwrap();
    // No interval sync runs in this test: only what the engine syncs is durable.
    let options =
        kappa_log::LogOptions { sync_policy: kappa_log::SyncPolicy::IntervalMs(3_600_000), ..Default::default() };
    let log = Arc::new(kappa_log::Log::open(&dir.path().join("log"), options).unwrap().0);
    log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    let mut builder = kappa_log::records::BatchBuilder::new();
    for i in 0..50 {
        builder.push(event(&format!("k{}", i % 7), Some(json!({"n": i})), None, None, i));
    }
    log.partition(TOPIC, 0).unwrap().append(builder.build()).unwrap();
    let views = dir.path().join("views");
    let config =
        kappa_views::EngineConfig { checkpoint_interval: Duration::ZERO, ..kappa_views::EngineConfig::new(&views) };
    let backend = Arc::new(kappa_views::EmbeddedLog::new(log.clone()));
    let engine = kappa_views::ViewEngine::start(backend, config, vec![sum_view(1, 1)]).unwrap();
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    engine.shutdown();
    let stored = kappa_views::store::Store::open(&views.join("sums/v1")).unwrap().progress().unwrap();
    assert!(stored.caught_up && stored.changelog_next > 0, "{stored:?}");
    let durable = log.partition("__kappa.view.sums.v1", 0).unwrap().durable_offset();
    assert!(
        durable >= stored.changelog_next,
        "the store is durable up to changelog offset {} but the changelog only up to {durable}",
        stored.changelog_next
    );
}

/// A step whose changelog append fails on something that passes (here refused while a
/// flag is set, as a full disk refuses until there is room) stops the version only until
/// it is started again by itself, recovering from its changelog: no restart needed.
#[test]
fn a_version_failed_by_a_transient_error_starts_again_by_itself() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k1", Some(json!({})), None, None, 1), event("k2", Some(json!({})), None, None, 2)]);
    let backend = Arc::new(Gated {
        log: kappa_views::EmbeddedLog::new(fixture.log.clone()),
        topic: String::new(),
        entered: AtomicBool::new(false),
        released: AtomicBool::new(true),
        refused_key: Some(b"k2".to_vec()),
        refusing: AtomicBool::new(true),
    });
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let view = View::reducer("constant", 1, &[TOPIC], Constant);
    let engine = kappa_views::ViewEngine::start(backend.clone(), config, vec![view]).unwrap();
    let Phase::Restarting { reason, .. } =
        wait_for_phase(&engine, "constant", |p| matches!(p, Phase::Restarting { .. }))
    else {
        unreachable!()
    };
    assert!(reason.contains("refused append"), "{reason}");
    backend.refusing.store(false, Ordering::Release);
    wait_for_phase(&engine, "constant", |p| *p == Phase::Live);
    wait_caught_up(&engine, "constant");
    assert_eq!(
        dump(&engine, "constant"),
        BTreeMap::from([("k1".to_owned(), json!("v")), ("k2".to_owned(), json!("v"))])
    );
    assert_eq!(engine.describe("constant").unwrap().versions[0].status.events_applied, 2);
    engine.shutdown();
}

/// An operator deletes the serving version's directory and changelog (as the error for a
/// changelog that lost records suggests): the version rebuilds from its inputs and serves
/// no reads before it has caught up, instead of a partial state.
#[test]
fn a_serving_version_whose_state_was_deleted_serves_again_only_once_rebuilt() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k1", Some(json!({"n": 2})), None, None, 1)]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    std::fs::remove_dir_all(fixture.views_dir().join("sums/v1")).unwrap();
    fixture.log.delete_topic("__kappa.view.sums.v1").unwrap();
    // The rebuilt version's catching up waits at its changelog's gate.
    let gated = Arc::new(Gated {
        log: kappa_views::EmbeddedLog::new(fixture.log.clone()),
        topic: "__kappa.view.sums.v1".to_owned(),
        entered: AtomicBool::new(false),
        released: AtomicBool::new(false),
        refused_key: None,
        refusing: AtomicBool::new(false),
    });
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::start(gated.clone(), config, vec![sum_view(1, 1)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gated.entered.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "version 1 never reached its catching up");
        std::thread::sleep(Duration::from_millis(1));
    }
    let read = engine.get("sums", "k1");
    assert!(matches!(read, Err(ViewError::NotReady { .. })), "{read:?}");
    // Not only ignored: a restart before it catches up finds its directory again.
    assert!(!fixture.views_dir().join("sums/active").exists());
    gated.released.store(true, Ordering::Release);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 1, "total": 2}))]));
    assert_eq!(engine.describe("sums").unwrap().active, Some(1));
    engine.shutdown();
}

/// A log on a simulated file system whose capacity a test sets (a full disk refuses writes
/// with ENOSPC, as a real one does), holding the topic `TOPIC` with one partition.
fn full_disk_log(fs: &kappa_log::io::sim::SimFs, sync_policy: kappa_log::SyncPolicy) -> Arc<kappa_log::Log> {
    use kappa_log::io::Storage;
    fs.create_dir_all(std::path::Path::new("/data")).unwrap();
    fs.sync_dir(std::path::Path::new("/")).unwrap();
    let options = kappa_log::LogOptions { fs: Arc::new(fs.clone()), sync_policy, ..Default::default() };
    let log = Arc::new(kappa_log::Log::open(std::path::Path::new("/data"), options).unwrap().0);
    log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    log
}

fn batch(records: Vec<kappa_log::records::NewRecord>) -> Vec<u8> {
    let mut builder = kappa_log::records::BatchBuilder::new();
    for record in records {
        builder.push(record);
    }
    builder.build()
}

/// The serving version's step is refused by a full disk (its changelog append gets ENOSPC):
/// while it pauses before starting again by itself, its status says restarting, with the
/// reason and when it tries again, and waiting for the view to catch up keeps waiting
/// instead of failing; once there is room it catches up.
#[test]
fn waiting_for_a_view_waits_through_its_restart_after_a_full_disk() {
    let fs = kappa_log::io::sim::SimFs::new();
    let log = full_disk_log(&fs, kappa_log::SyncPolicy::EveryAppend);
    let views = tempfile::tempdir().unwrap();
    log.partition(TOPIC, 0).unwrap().append(batch(vec![event("k1", Some(json!({"n": 1})), None, None, 1)])).unwrap();
    let backend = Arc::new(kappa_views::EmbeddedLog::new(log.clone()));
    let config = kappa_views::EngineConfig::new(views.path());
    let engine = kappa_views::ViewEngine::start(backend, config, vec![sum_view(1, 1)]).unwrap();
    wait_caught_up(&engine, "sums");

    // Room for the next input batch, and none for the step's changelog batch.
    let input = batch(vec![event("k1", Some(json!({"n": 2})), None, None, 2)]);
    fs.set_capacity(Some(fs.used_bytes() + input.len() as u64));
    let full_since = std::time::SystemTime::now();
    log.partition(TOPIC, 0).unwrap().append(input).unwrap();
    let phase = wait_for_phase(&engine, "sums", |p| !matches!(p, Phase::Live | Phase::Building | Phase::Restoring));
    let Phase::Restarting { reason, retry_at } = phase else {
        panic!("a full disk stops the version only until it starts again, but its status says {phase:?}")
    };
    assert!(reason.contains("os error 28"), "the reason names the full disk: {reason}");
    assert!(retry_at > full_since, "it starts again after the failure: {retry_at:?}");
    // The pause is at least RESTART_PAUSE_MIN (1 s); this looks once, within it or after.
    let waited = engine.wait_caught_up("sums", Duration::ZERO);
    assert!(matches!(waited, Ok(false)), "waiting for a restarting version does not fail: {waited:?}");

    let waiter = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.wait_caught_up("sums", Duration::from_secs(60)))
    };
    fs.set_capacity(None);
    assert!(waiter.join().unwrap().unwrap(), "the view did not catch up within 60 s of the disk having room");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 2, "total": 3}))]));
    engine.shutdown();
}

/// Under `--sync interval:<ms>` dead letters are made durable as the changelog is, by the
/// checkpoints (before the store), not one fsync each: a rebuild dead-lettering many events
/// syncs fewer times than it dead-letters, and once the store records that the version
/// caught up (a durable checkpoint) every dead letter is durable.
#[test]
fn under_the_interval_sync_policy_dead_letters_are_synced_by_checkpoints_not_one_by_one() {
    const BAD: usize = 50;
    let fs = kappa_log::io::sim::SimFs::new();
    // No interval sync runs in this test: only what the engine syncs is durable.
    let log = full_disk_log(&fs, kappa_log::SyncPolicy::IntervalMs(3_600_000));
    for i in 0..BAD as i64 {
        let bad = kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"{not json"), i);
        log.partition(TOPIC, 0)
            .unwrap()
            .append(batch(vec![event("k1", Some(json!({"n": 1})), None, None, i), bad]))
            .unwrap();
    }
    let views = tempfile::tempdir().unwrap();
    let backend = Arc::new(kappa_views::EmbeddedLog::new(log.clone()));
    let syncs_before = fs.stats().sync_data;
    let engine = kappa_views::ViewEngine::start(
        backend,
        kappa_views::EngineConfig::new(views.path()),
        vec![sum_view(1, 1).dead_letter("sums-dlq")],
    )
    .unwrap();
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    let syncs = fs.stats().sync_data - syncs_before;
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": BAD, "total": BAD}))]));
    let dlq = log.partition("sums-dlq", 0).unwrap();
    assert_eq!(dlq.log_end_offset(), BAD as i64, "one dead letter per malformed event");
    assert!(syncs < BAD as u64, "{syncs} fsyncs for {BAD} dead letters: they are synced one by one");
    assert_eq!(dlq.durable_offset(), BAD as i64, "the dead letters are durable once the store says caught up");
    engine.shutdown();
}

/// A dead-letter topic deleted and created again (holding fewer records) before the next
/// checkpoint: the checkpoint made the old end durable on the new topic, an fsync loop that
/// never ended (the view froze, shutdown hung). Those dead letters are gone with the old
/// topic; the checkpoint goes on, and the view with it.
#[test]
fn a_dead_letter_topic_deleted_and_created_again_does_not_stop_the_view() {
    let fixture = Fixture::new(1);
    let config =
        EngineConfig { checkpoint_interval: Duration::from_secs(3_600), ..EngineConfig::new(fixture.views_dir()) };
    let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
    let engine = ViewEngine::start(backend, config, vec![sum_view(1, 1).dead_letter("sums-dlq")]).unwrap();
    wait_caught_up(&engine, "sums");
    for i in 0..3 {
        fixture.append(0, vec![kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"{not json"), i)]);
    }
    let started = Instant::now();
    while fixture.log.partition("sums-dlq", 0).map_or(0, |p| p.log_end_offset()) < 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "the dead letters were not written");
        std::thread::sleep(Duration::from_millis(10));
    }
    fixture.log.delete_topic("sums-dlq").unwrap();
    fixture.log.create_topic("sums-dlq", 1, &BTreeMap::new()).unwrap();
    let one = kappa_log::records::NewRecord::new(Some(b"x"), Some(b"1"), 0);
    fixture.log.partition("sums-dlq", 0).unwrap().append(batch(vec![one])).unwrap();
    fixture.append(0, vec![event("k1", Some(json!({"n": 4})), None, None, 10)]);
    wait_applied(&engine, "sums", 1, 1);
    // The final checkpoint makes the dead letters durable: it must end.
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        engine.shutdown();
        let _ = done_tx.send(());
    });
    assert!(done.recv_timeout(Duration::from_secs(30)).is_ok(), "shutdown hung in the checkpoint");
}

/// A new version switches reads to itself when it first catches up, then records that it
/// caught up. An operator's rollback made in between must stick even when the record is
/// lost (a crash before it is durable; a full disk failing the step after it), though the
/// version then catches up again as if for the first time.
#[test]
fn a_rollback_made_before_the_new_version_recorded_catching_up_sticks() {
    let fixture = Fixture::new(1);
    let events: Vec<(String, Option<i64>)> = (0..100).map(|i| (format!("k{}", i % 5), Some(i))).collect();
    write_events(&fixture, 1, &events, 20);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    assert_eq!(engine.describe("sums").unwrap().active, Some(2));
    engine.switch("sums", 1, false).unwrap();
    engine.shutdown();

    // What a crash between the switch to version 2 and its durable caught-up record leaves
    // (a clean shutdown makes the record durable, so it is taken back here).
    let store = kappa_views::store::Store::open(&fixture.views_dir().join("sums/v2")).unwrap();
    let progress = kappa_views::store::Progress { caught_up: false, ..store.progress().unwrap() };
    store.commit(&[], &progress, redb::Durability::Immediate).unwrap();
    drop(store);

    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    // Live once it caught up again, after its switch on catching up was decided.
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    assert_eq!(engine.describe("sums").unwrap().active, Some(1), "the rollback to version 1 was undone");
    assert_eq!(dump(&engine, "sums"), reference(&events, 1));
    // A later explicit switch forward still works.
    engine.switch("sums", 2, false).unwrap();
    assert_eq!(dump(&engine, "sums"), reference(&events, 10));
    engine.shutdown();
}

/// An input topic deleted and created again (a new topic id; offsets start at 0 again)
/// while the server was stopped: the version stops with an error naming the topic instead
/// of applying the new topic's records from the offsets it reached in the old one.
#[test]
fn an_input_topic_created_again_stops_the_view_with_an_error_naming_it() {
    let fixture = Fixture::new(1);
    fixture.append(0, (0..5).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    let before = BTreeMap::from([("k1".to_owned(), json!({"count": 5, "total": 5}))]);

    fixture.log.delete_topic(TOPIC).unwrap();
    fixture.log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    fixture.append(0, (0..8).map(|i| event("k1", Some(json!({"n": 100})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    let phase = wait_for_phase(&engine, "sums", |p| !matches!(p, Phase::Building | Phase::Restoring));
    let Phase::Failed(reason) = &phase else { panic!("the view went on with the new topic: {phase:?}") };
    assert!(reason.contains("input topic 'events' was deleted and created again"), "{reason}");
    assert_eq!(dump(&engine, "sums"), before, "nothing of the new topic is applied");
    let waited = engine.wait_caught_up("sums", Duration::from_secs(60));
    assert!(matches!(waited, Err(ViewError::VersionFailed { .. })), "{waited:?}");
    engine.shutdown();
}

/// The recovery `InputTopicRecreated` advises, followed for a version that serves reads
/// (which `retire` refuses): a new version numbered above every existing one builds from
/// the new topic, takes over reads once caught up, and the stopped version is then retired.
#[test]
fn the_recovery_an_input_topic_created_again_advises_ends_with_the_view_reading_the_new_topic() {
    let fixture = Fixture::new(1);
    fixture.append(0, (0..5).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    fixture.log.delete_topic(TOPIC).unwrap();
    fixture.log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    fixture.append(0, (0..8).map(|i| event("k1", Some(json!({"n": 100})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    let Phase::Failed(reason) = wait_for_phase(&engine, "sums", |p| matches!(p, Phase::Failed(_))) else {
        unreachable!()
    };
    assert!(reason.contains("define a new version of the view"), "{reason}");
    assert!(matches!(engine.retire("sums", 1), Err(ViewError::RetireActive { .. })), "v1 serves: retire refuses it");
    engine.shutdown();

    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 1)]);
    assert!(wait_active(&engine, "sums", 2, Duration::from_secs(60)), "{:?}", engine.describe("sums"));
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 8, "total": 800}))]));
    engine.retire("sums", 1).unwrap();
    assert_eq!(engine.describe("sums").unwrap().versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2]);
    engine.shutdown();
}

/// The embedded log, except that once `swapped` is set the input topic's name leads to
/// another topic (`RECREATED`): an input topic deleted and created again between two looks
/// of a running view, with no moment without it.
struct Swapped {
    log: kappa_views::EmbeddedLog,
    swapped: AtomicBool,
}

const RECREATED: &str = "events-recreated";

impl Swapped {
    fn name<'a>(&self, topic: &'a str) -> &'a str {
        if topic == TOPIC && self.swapped.load(Ordering::Acquire) { RECREATED } else { topic }
    }
}

impl kappa_views::LogBackend for Swapped {
    fn partition_count(&self, topic: &str) -> kappa_views::Result<i32> {
        self.log.partition_count(self.name(topic))
    }
    fn topic_id(&self, topic: &str) -> kappa_views::Result<Option<kappa_views::backend::TopicId>> {
        self.log.topic_id(self.name(topic))
    }
    fn read_committed(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        max_bytes: usize,
    ) -> kappa_views::Result<kappa_views::backend::InputChunk> {
        self.log.read_committed(self.name(topic), partition, from, max_bytes)
    }
    fn start_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.start_offset(self.name(topic), partition)
    }
    fn end_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.end_offset(self.name(topic), partition)
    }
    fn offset_for_timestamp(&self, topic: &str, partition: i32, timestamp: i64) -> kappa_views::Result<Option<i64>> {
        self.log.offset_for_timestamp(self.name(topic), partition, timestamp)
    }
    fn wait_for_input(&self, inputs: &[(&str, i32, i64)], timeout: Duration) -> kappa_views::Result<()> {
        let inputs: Vec<_> = inputs.iter().map(|(t, p, o)| (self.name(t), *p, *o)).collect();
        self.log.wait_for_input(&inputs, timeout)
    }
    fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        configs: &BTreeMap<String, String>,
    ) -> kappa_views::Result<()> {
        self.log.ensure_topic(topic, partitions, configs)
    }
    fn delete_topic(&self, topic: &str) -> kappa_views::Result<()> {
        self.log.delete_topic(topic)
    }
    fn append(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<kappa_views::backend::OutputRecord>,
    ) -> kappa_views::Result<(i64, i64)> {
        self.log.append(topic, partition, records)
    }
    fn wait_durable(&self, topic: &str, partition: i32, offset: i64) -> kappa_views::Result<()> {
        self.log.wait_durable(topic, partition, offset)
    }
    fn make_durable(&self, topic: &str, partition: i32, offset: i64) -> kappa_views::Result<()> {
        self.log.make_durable(topic, partition, offset)
    }
    fn durable_end_offset(&self, topic: &str, partition: i32) -> kappa_views::Result<i64> {
        self.log.durable_end_offset(topic, partition)
    }
}

/// A running view whose input topic is created again (more records than the view had
/// applied, so its old position is inside the new topic) stops with the named error.
#[test]
fn a_running_view_stops_when_its_input_topic_is_created_again() {
    let fixture = Fixture::new(1);
    fixture.append(0, (0..5).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    fixture.log.create_topic(RECREATED, 1, &BTreeMap::new()).unwrap();
    let mut builder = kappa_log::records::BatchBuilder::new();
    for i in 0..8 {
        builder.push(event("k1", Some(json!({"n": 100})), None, None, i));
    }
    fixture.log.partition(RECREATED, 0).unwrap().append(builder.build()).unwrap();
    let backend =
        Arc::new(Swapped { log: kappa_views::EmbeddedLog::new(fixture.log.clone()), swapped: AtomicBool::new(false) });
    let config = kappa_views::EngineConfig::new(fixture.views_dir());
    let engine = kappa_views::ViewEngine::start(backend.clone(), config, vec![sum_view(1, 1)]).unwrap();
    wait_for_phase(&engine, "sums", |p| *p == Phase::Live);
    backend.swapped.store(true, Ordering::Release);
    let phase = wait_for_phase(&engine, "sums", |p| *p != Phase::Live);
    let Phase::Failed(reason) = &phase else { panic!("{phase:?}") };
    assert!(reason.contains("input topic 'events' was deleted and created again"), "{reason}");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 5, "total": 5}))]));
    engine.shutdown();
}

/// A manual switch away from a version marks it (`no-auto-switch`), which its status
/// shows; when nothing serves the view (the serving version's directory deleted, the marked
/// one the only version left), the marked version, caught up long ago, takes over anyway
/// instead of leaving the view unreadable.
#[test]
fn a_marked_version_shows_its_mark_and_takes_over_when_nothing_serves() {
    let fixture = Fixture::new(1);
    fixture.append(0, (0..5).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    assert!(wait_active(&engine, "sums", 2, Duration::from_secs(60)), "{:?}", engine.describe("sums"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.describe("sums").unwrap().versions.iter().any(|v| v.status.phase != Phase::Live) {
        assert!(Instant::now() < deadline, "{:?}", engine.describe("sums"));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(engine.auto_switch_enabled("sums", 2).unwrap());
    engine.switch("sums", 1, false).unwrap();
    assert!(!engine.auto_switch_enabled("sums", 2).unwrap(), "switched away from: marked");
    assert!(engine.auto_switch_enabled("sums", 1).unwrap());
    assert!(matches!(engine.auto_switch_enabled("sums", 3), Err(ViewError::UnknownVersion { .. })));
    engine.shutdown();

    // The serving version's state is gone but its code is not: it rebuilds and serves again;
    // the version switched away from does not take over meanwhile.
    std::fs::remove_dir_all(fixture.views_dir().join("sums/v1")).unwrap();
    fixture.log.delete_topic("__kappa.view.sums.v1").unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1), sum_view(2, 10)]);
    let serving = || engine.describe("sums").unwrap().versions.iter().find(|v| v.serving).map(|v| v.version);
    assert_ne!(serving(), Some(2), "the marked version took over while the other rebuilt");
    assert!(wait_active(&engine, "sums", 1, Duration::from_secs(60)), "{:?}", engine.describe("sums"));
    assert!(!engine.auto_switch_enabled("sums", 2).unwrap(), "still marked");
    engine.shutdown();

    // The serving version's code and state are gone; only the marked version is left.
    std::fs::remove_dir_all(fixture.views_dir().join("sums/v1")).unwrap();
    fixture.log.delete_topic("__kappa.view.sums.v1").unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(2, 10)]);
    assert!(wait_active(&engine, "sums", 2, Duration::from_secs(10)), "nothing serves: {:?}", engine.describe("sums"));
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), BTreeMap::from([("k1".to_owned(), json!({"count": 5, "total": 50}))]));
    engine.shutdown();
}

/// A version stopped at a bad event falls further behind as its input grows: its status
/// (and the lag metric made from it) follows the inputs' ends, not where they were when it
/// stopped, and gives no time until caught up.
#[test]
fn a_stopped_versions_lag_grows_with_its_input() {
    let fixture = Fixture::new(1);
    let bad = kappa_log::records::NewRecord::new(Some(b"k1"), Some(b"[1,"), 1);
    fixture.append(0, vec![event("k1", Some(json!({"n": 1})), None, None, 0), bad]);
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_for_phase(&engine, "sums", |p| matches!(p, Phase::Failed(_)));
    let lag = || engine.describe("sums").unwrap().versions[0].status.lag();
    assert_eq!(lag(), 1, "stopped before the bad event");
    fixture.append(0, (0..4).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    assert_eq!(lag(), 5, "the 4 events produced since it stopped count as lag");
    assert_eq!(engine.describe("sums").unwrap().versions[0].status.eta_seconds(), None);
    engine.shutdown();
}

/// The input topic ids are also in the changelog's step markers: a version whose directory
/// was deleted (its store, which records the ids, gone) restores from its changelog and
/// stops when an input topic was created again meanwhile, instead of reading the new topic
/// from the old topic's offsets. With the same topic it restores and serves as before.
#[test]
fn a_version_restored_from_its_changelog_stops_when_its_input_topic_was_created_again() {
    let fixture = Fixture::new(1);
    fixture.append(0, (0..5).map(|i| event("k1", Some(json!({"n": 1})), None, None, i)).collect());
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    let before = BTreeMap::from([("k1".to_owned(), json!({"count": 5, "total": 5}))]);

    std::fs::remove_dir_all(fixture.views_dir().join("sums/v1")).unwrap();
    let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
    wait_caught_up(&engine, "sums");
    assert_eq!(dump(&engine, "sums"), before, "restored from its changelog with the same topic");
    engine.shutdown();

    std::fs::remove_dir_all(fixture.views_dir().join("sums/v1")).unwrap();
    fixture.log.delete_topic(TOPIC).unwrap();
    fixture.log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    fixture.append(0, (0..8).map(|i| event("k1", Some(json!({"n": 100})), None, None, i)).collect());
    for _ in 0..2 {
        // Twice: the restart after the failure stops at the same marker.
        let engine = fixture.engine(Schemas::new(), vec![sum_view(1, 1)]);
        let phase = wait_for_phase(&engine, "sums", |p| matches!(p, Phase::Failed(_) | Phase::Live));
        let Phase::Failed(reason) = &phase else {
            panic!("the view went on with the new topic: {phase:?}, {:?}", dump(&engine, "sums"))
        };
        assert!(reason.contains("input topic 'events' was deleted and created again"), "{reason}");
        engine.shutdown();
    }
}

/// Real redb over a real file, except that while `unreadable` is set reads fail with EIO (a
/// disk that stopped reading), and while `full` is set writes and growing the file fail
/// with ENOSPC (a full disk).
#[derive(Debug, Default)]
struct Faults {
    unreadable: Arc<AtomicBool>,
    full: Arc<AtomicBool>,
}

#[derive(Debug)]
struct FaultyFile {
    file: redb::backends::FileBackend,
    faults: Arc<Faults>,
}

impl FaultyFile {
    /// A store opener of real redb over a `FaultyFile` with `faults`; `cache_bytes` None
    /// keeps redb's default read cache.
    fn opener(faults: &Arc<Faults>, cache_bytes: Option<usize>) -> kappa_views::store::StoreOpener {
        let faults = faults.clone();
        Arc::new(move |path: &std::path::Path| {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            let file = FaultyFile { file: redb::backends::FileBackend::new(file)?, faults: faults.clone() };
            let mut builder = redb::Builder::new();
            if let Some(bytes) = cache_bytes {
                builder.set_cache_size(bytes);
            }
            builder.create_with_backend(file)
        })
    }

    fn fail_if(flag: &AtomicBool, errno: i32) -> std::io::Result<()> {
        match flag.load(Ordering::Acquire) {
            true => Err(std::io::Error::from_raw_os_error(errno)),
            false => Ok(()),
        }
    }
}

type Bound = std::ops::Bound<u64>;

impl redb::StorageBackend for FaultyFile {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        Self::fail_if(&self.faults.unreadable, 5)?;
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.file.len()? {
            Self::fail_if(&self.faults.full, 28)?;
        }
        self.file.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        Self::fail_if(&self.faults.full, 28)?;
        self.file.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Bound, end: Bound) -> Result<bool, redb::BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: Bound, end: Bound) -> Result<bool, redb::BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound, end: Bound) -> Result<(), redb::BackendError> {
        self.file.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound, end: Bound) -> Result<bool, redb::BackendError> {
        self.file.query_lock_range(start, end)
    }
}

/// `Sum`, except that once `armed`, taking the key of a `k1` event makes the disk fail
/// reads: the state read that follows, inside the step, is the one that fails.
struct SumOnFailingDisk {
    sum: Sum,
    armed: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
}

impl Reducer for SumOnFailingDisk {
    type State = Totals;

    fn key(&self, event: &Event) -> Option<String> {
        if event.key_str() == Some("k1") && self.armed.load(Ordering::Acquire) {
            self.failing.store(true, Ordering::Release);
        }
        self.sum.key(event)
    }

    fn apply(&self, state: Option<Totals>, event: &Event) -> Result<Option<Totals>, EventError> {
        self.sum.apply(state, event)
    }
}

/// The view's state store failing a read inside a step fails the version with the store's
/// error: the event is not blamed — under a dead-letter policy it was dead-lettered and
/// skipped for good, under `Stop` the version said the event was bad. After a restart on a
/// disk that reads again, the event is applied; nothing reached the dead-letter topic.
#[test]
fn a_state_store_read_failing_inside_a_step_fails_the_version_and_dead_letters_nothing() {
    let state = a_read_fails_inside_a_step(|armed, failing| {
        let reducer = SumOnFailingDisk { sum: Sum { factor: 1 }, armed: armed.clone(), failing: failing.clone() };
        View::reducer("sums", 1, &[TOPIC], reducer).dead_letter("sums-dlq")
    });
    assert_eq!(state["k1"], json!({"count": 2, "total": 3}));
}

/// Counts events per key, taking a key whose read fails for a new one: it swallows the
/// read's error (a view's code may).
struct CountOnFailingDisk {
    armed: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
}

impl Processor for CountOnFailingDisk {
    type State = i64;
    type Internal = ();

    fn process(&self, event: &Event, state: &mut dyn StateAccess<i64, ()>) -> Result<(), EventError> {
        let Some(key) = event.key_str() else { return Ok(()) };
        if key == "k1" && self.armed.load(Ordering::Acquire) {
            self.failing.store(true, Ordering::Release);
        }
        let count = state.get(key).unwrap_or(None).unwrap_or(0);
        state.put(key, count + 1);
        Ok(())
    }
}

/// A view's code that goes on past a failed state read computed its change from a value it
/// never saw: the step fails with the store's error instead of committing k1's count as 1.
#[test]
fn a_step_whose_code_ignored_a_failed_state_read_commits_nothing() {
    let state = a_read_fails_inside_a_step(|armed, failing| {
        let counts = CountOnFailingDisk { armed: armed.clone(), failing: failing.clone() };
        View::processor("sums", 1, &[TOPIC], counts).dead_letter("sums-dlq")
    });
    assert_eq!(state["k1"], json!(2), "k1 was counted from a value the failed read never gave");
}

/// A view `sums` (from `view`, given the flags that arm and make the disk fail reads) over
/// 3,000 keys and k1, on a disk that fails the read of k1's state inside the step of k1's
/// second event: the version fails with the store's error (EIO) and dead-letters nothing;
/// started again on a disk that reads, it applies the event. The final state.
fn a_read_fails_inside_a_step(view: impl Fn(&Arc<AtomicBool>, &Arc<AtomicBool>) -> View) -> BTreeMap<String, Value> {
    let fixture = Fixture::new(1);
    // Enough keys for a tree of several levels: k1's leaf is read only when looked up.
    let mut keys: Vec<_> =
        (0..3_000).map(|i| event(&format!("key{i:04}"), Some(json!({"n": i})), None, None, 0)).collect();
    keys.push(event("k1", Some(json!({"n": 1})), None, None, 1));
    fixture.append(0, keys);
    let (armed, faults) = (Arc::new(AtomicBool::new(false)), Arc::new(Faults::default()));
    let failing = &faults.unreadable;
    let start = |checkpoint_interval| {
        // No read cache: redb reads every page of a small database when it opens.
        let store_opener = FaultyFile::opener(&faults, Some(0));
        let config = EngineConfig { checkpoint_interval, store_opener, ..EngineConfig::new(fixture.views_dir()) };
        let backend = Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone()));
        ViewEngine::start(backend, config, vec![view(&armed, failing)]).unwrap()
    };
    let dead_letters = || fixture.log.partition("sums-dlq", 0).map_or(0, |p| p.high_watermark());
    // Durable at once, so the next start replays nothing into the store.
    let engine = start(Duration::ZERO);
    wait_caught_up(&engine, "sums");
    engine.shutdown();
    // Started again, so k1's state is in no cache of redb's: the step reads the disk. No
    // checkpoint while reads fail: only the step reads the store then.
    let engine = start(Duration::from_secs(3_600));
    wait_caught_up(&engine, "sums");
    armed.store(true, Ordering::Release);
    fixture.append(0, vec![event("k1", Some(json!({"n": 2})), None, None, 2)]);
    let phase = wait_for_phase(&engine, "sums", |p| !matches!(p, Phase::Live | Phase::Building | Phase::Restoring));
    assert_eq!(dead_letters(), 0, "a valid event was dead-lettered because the disk failed a read: {phase:?}");
    let Phase::Failed(reason) = phase else { panic!("a failing store read stops the version, not {phase:?}") };
    assert!(
        reason.contains("os error 5") && !reason.contains("offset"),
        "the store's error, not the event's: {reason}"
    );
    engine.shutdown();

    armed.store(false, Ordering::Release);
    failing.store(false, Ordering::Release);
    let engine = start(Duration::ZERO);
    wait_caught_up(&engine, "sums");
    let state = dump(&engine, "sums");
    assert_eq!(state.len(), 3_001);
    assert_eq!(dead_letters(), 0);
    engine.shutdown();
    state
}

/// The view's state store refusing a write with ENOSPC (a full disk): as when the log's
/// append does, the version pauses (`Restarting`, naming the full disk) and starts again
/// by itself with its store reopened — it failed until a restart, as redb refuses every
/// call on a handle after a failed write. Once there is room it catches up with nothing
/// lost, and reads answer again.
#[test]
fn a_full_disk_refusing_the_state_store_restarts_the_version_instead_of_failing_it() {
    let fixture = Fixture::new(1);
    fixture.append(0, vec![event("k1", Some(json!({"n": 1})), None, None, 1)]);
    let faults = Arc::new(Faults::default());
    let full = &faults.full;
    let config = EngineConfig {
        checkpoint_interval: Duration::from_millis(20),
        store_opener: FaultyFile::opener(&faults, None),
        ..EngineConfig::new(fixture.views_dir())
    };
    let engine =
        ViewEngine::start(Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone())), config, vec![sum_view(1, 1)])
            .unwrap();
    wait_caught_up(&engine, "sums");

    full.store(true, Ordering::Release);
    fixture.append(0, vec![event("k1", Some(json!({"n": 2})), None, None, 2)]);
    let phase = wait_for_phase(&engine, "sums", |p| !matches!(p, Phase::Live | Phase::Building | Phase::Restoring));
    let Phase::Restarting { reason, .. } = phase else {
        panic!("a full disk stops the version only until it starts again, but its status says {phase:?}")
    };
    assert!(reason.contains("os error 28"), "the reason names the full disk: {reason}");
    // Still full: it keeps trying (each try fails to reopen or to write), and does not fail.
    std::thread::sleep(Duration::from_millis(1_500));
    let phase = engine.describe("sums").unwrap().versions[0].status.phase.clone();
    assert!(matches!(phase, Phase::Restarting { .. }), "{phase:?}");

    // A read waiting for the event the full disk interrupted gets it once there is room —
    // not the state the reopened store rolled back to, nor an error meanwhile.
    let waiting = engine.clone();
    let waiter = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let after = [kappa_views::InputPosition { topic: TOPIC.to_owned(), partition: 0, offset: 1 }];
        runtime.block_on(waiting.get_after("sums", "k1", &after, Duration::from_secs(30)))
    });
    std::thread::sleep(Duration::from_millis(200));
    full.store(false, Ordering::Release);
    let read = waiter.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
    let value: Value = serde_json::from_slice(&read.value.unwrap().json).unwrap();
    assert_eq!(value, json!({"count": 2, "total": 3}), "read-your-writes after the reopen");
    fixture.append(0, vec![event("k2", Some(json!({"n": 5})), None, None, 3)]);
    assert!(engine.wait_caught_up("sums", Duration::from_secs(60)).unwrap(), "{:?}", engine.describe("sums"));
    assert_eq!(
        dump(&engine, "sums"),
        BTreeMap::from([
            ("k1".to_owned(), json!({"count": 2, "total": 3})),
            ("k2".to_owned(), json!({"count": 1, "total": 5}))
        ])
    );
    engine.shutdown();
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on a fresh directory, or says why it could not.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        match output.status.success() {
            true => Ok(Self { dir }),
            false => Err(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [1 << 16, 1 << 12, 1 << 8, 1] {
        while file.write_all(&vec![0u8; chunk]).is_ok() {}
    }
}

/// The same on a real file system: the views' state lives on a small tmpfs (the log does
/// not), which a filler file fills while events with new keys arrive. The version's store
/// hits ENOSPC, the version restarts instead of failing, and once the filler is deleted it
/// catches up with every event applied once.
#[test]
fn a_view_whose_state_disk_fills_up_goes_on_once_space_is_freed() {
    let tmpfs = match Tmpfs::mount("8m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!("skipping: cannot mount a tmpfs ({reason})");
            return;
        }
    };
    let fixture = Fixture::new(1);
    let config = EngineConfig {
        checkpoint_interval: Duration::from_millis(20),
        ..EngineConfig::new(tmpfs.dir.path().join("views"))
    };
    let engine =
        ViewEngine::start(Arc::new(kappa_views::EmbeddedLog::new(fixture.log.clone())), config, vec![sum_view(1, 1)])
            .unwrap();
    let mut events = Vec::new();
    let mut append = |from: usize, count: usize| {
        let batch: Vec<_> = (from..from + count).map(|i| (format!("k{i}"), Some(i as i64))).collect();
        fixture.append(0, batch.iter().map(|(k, n)| event(k, n.map(|n| json!({"n": n})), None, None, 1)).collect());
        events.extend(batch);
    };
    append(0, 100);
    wait_caught_up(&engine, "sums");

    let filler = tmpfs.dir.path().join("filler");
    fill(&filler);
    let mut next = 100;
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        append(next, 500);
        next += 500;
        std::thread::sleep(Duration::from_millis(50));
        if let Phase::Restarting { reason, .. } = engine.describe("sums").unwrap().versions[0].status.phase.clone() {
            break reason;
        }
        let phase = engine.describe("sums").unwrap().versions[0].status.phase.clone();
        assert!(!matches!(phase, Phase::Failed(_)), "the full disk failed the version: {phase:?}");
        assert!(Instant::now() < deadline, "the state store never hit the full disk");
    };
    assert!(reason.contains("os error 28"), "the reason names the full disk: {reason}");

    std::fs::remove_file(&filler).unwrap();
    assert!(engine.wait_caught_up("sums", Duration::from_secs(60)).unwrap(), "{:?}", engine.describe("sums"));
    assert_eq!(dump(&engine, "sums"), reference(&events, 1));
    engine.shutdown();
}
