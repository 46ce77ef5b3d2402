//! `ViewEngine::get_after`: a read that waits until the serving version has applied given
//! input offsets — against a real log, with an open transaction holding the view behind.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kappa_views::{Event, EventError, InputPosition, Reducer, Schemas, View, ViewError};
use serde_json::{Value, json};

/// key → the latest JSON value.
struct Latest;

impl Reducer for Latest {
    type State = Value;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &Event) -> Result<Option<Value>, EventError> {
        Ok(event.payload()?.cloned())
    }
}

fn at(topic: &str, partition: i32, offset: i64) -> InputPosition {
    InputPosition { topic: topic.to_owned(), partition, offset }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
}

#[test]
fn get_after_waits_for_the_offsets_to_be_applied_and_says_how_far_the_view_is_when_it_times_out() {
    let fixture = Fixture::new(2);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("latest", 1, &[TOPIC], Latest)]);
    wait_caught_up(&engine, "latest");
    let rt = runtime();

    let offset = fixture.append(0, vec![event("a", Some(json!(1)), None, None, 1)]);
    let read = rt.block_on(engine.get_after("latest", "a", &[at(TOPIC, 0, offset)], Duration::from_secs(5))).unwrap();
    assert_eq!(read.value.map(|item| item.json), Some(b"1".to_vec()));

    for (asked, says) in [(at("other", 0, 0), "does not read other/0"), (at(TOPIC, 2, 0), "events (partitions 0 to 1)")]
    {
        let error = rt.block_on(engine.get_after("latest", "a", &[asked], Duration::from_secs(5))).unwrap_err();
        assert!(matches!(error, ViewError::NotAnInput { .. }) && error.to_string().contains(says), "{error}");
    }

    // An open transaction holds partition 1 behind: the read times out, saying where it is.
    let held = fixture.append_transactional(1, 7, 0, vec![event("b", Some(json!(2)), None, None, 2)]);
    let started = Instant::now();
    let error =
        rt.block_on(engine.get_after("latest", "b", &[at(TOPIC, 1, held)], Duration::from_millis(200))).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    match &error {
        ViewError::ReadBehind { view, version: 1, waited_ms: 200, behind } => {
            assert_eq!(view, "latest");
            assert_eq!((behind.len(), behind[0].partition, behind[0].offset), (1, 1, held), "{error}");
            assert!(behind[0].position <= held, "{error}");
            assert!(error.to_string().contains("read again"), "{error}");
        }
        other => panic!("expected ReadBehind, got {other}"),
    }

    // A read already waiting returns as soon as the commit lets the view apply it.
    let waiting = engine.clone();
    let waiter = std::thread::spawn(move || {
        runtime().block_on(waiting.get_after("latest", "b", &[at(TOPIC, 1, held)], Duration::from_secs(20)))
    });
    std::thread::sleep(Duration::from_millis(100));
    fixture.end_transaction(1, 7, true);
    let committed = Instant::now();
    let read = waiter.join().unwrap().unwrap();
    assert_eq!(read.value.map(|item| item.json), Some(b"2".to_vec()));
    // Woken by the step's notification, not by its 20 s timeout's last look.
    assert!(committed.elapsed() < Duration::from_secs(5), "woke {:?} after the commit", committed.elapsed());
    engine.shutdown();
}

/// A read waiting when the engine shuts down fails at once with `ShuttingDown` — not at the
/// end of its wait, nor as an unknown version once the versions are closed.
#[test]
fn a_read_waiting_when_the_engine_shuts_down_fails_with_shutting_down_at_once() {
    let fixture = Fixture::new(2);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("latest", 1, &[TOPIC], Latest)]);
    wait_caught_up(&engine, "latest");
    // An open transaction holds partition 1 behind: the read waits.
    let held = fixture.append_transactional(1, 7, 0, vec![event("b", Some(json!(2)), None, None, 2)]);
    let waiting = engine.clone();
    let waiter = std::thread::spawn(move || {
        let started = Instant::now();
        let read = runtime().block_on(waiting.get_after("latest", "b", &[at(TOPIC, 1, held)], Duration::from_secs(20)));
        (read, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "the read did not wait");
    engine.shutdown();
    let (read, waited) = waiter.join().unwrap();
    assert!(matches!(read, Err(ViewError::ShuttingDown)), "{:?}", read.map(|r| r.value));
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    // A read started after the shutdown fails the same way.
    let read = runtime().block_on(engine.get_after("latest", "b", &[at(TOPIC, 1, held)], Duration::from_secs(20)));
    assert!(matches!(read, Err(ViewError::ShuttingDown)), "{:?}", read.map(|r| r.value));
}

/// `latest`, but applying the record keyed `slow` takes 1.5 s: a version held building.
struct Slow;

impl Reducer for Slow {
    type State = Value;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &Event) -> Result<Option<Value>, EventError> {
        if event.key_str() == Some("slow") {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(event.payload()?.cloned())
    }
}

/// While nothing serves yet, a read waits for the newest version this build runs — not for
/// a newer one on disk it has no code for (stopped: it never moves), which failed the read.
#[test]
fn while_nothing_serves_a_read_follows_the_newest_version_this_build_runs() {
    let fixture = Fixture::new(1);
    // v2 ran once (a newer build) and left its state; nothing serves when this build starts.
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("latest", 2, &[TOPIC], Latest)]);
    wait_caught_up(&engine, "latest");
    engine.shutdown();
    std::fs::remove_file(fixture.views_dir().join("latest").join("active")).unwrap();
    fixture.append(0, vec![event("slow", Some(json!(0)), None, None, 1)]);
    let offset = fixture.append(0, vec![event("mine", Some(json!(1)), None, None, 2)]);

    let engine = fixture.engine(Schemas::new(), vec![View::reducer("latest", 1, &[TOPIC], Slow)]);
    let read = runtime().block_on(engine.get_after("latest", "mine", &[at(TOPIC, 0, offset)], Duration::from_secs(20)));
    match read {
        Ok(read) => assert_eq!((read.version, read.value.map(|item| item.json)), (1, Some(b"1".to_vec()))),
        Err(e) => panic!("{e}"),
    }
    // One partition is named as one (not "partitions 0 to 0").
    let error = runtime().block_on(engine.get_after("latest", "mine", &[at(TOPIC, 1, 0)], Duration::ZERO)).unwrap_err();
    assert!(error.to_string().contains("its inputs are events (partition 0);"), "{error}");
    engine.shutdown();
}

/// `latest`, but applying a record whose key has a gate here waits until the gate opens.
struct Gated(std::collections::BTreeMap<&'static str, Arc<AtomicBool>>);

impl Reducer for Gated {
    type State = Value;

    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }

    fn apply(&self, _: Option<Value>, event: &Event) -> Result<Option<Value>, EventError> {
        if let Some(gate) = event.key_str().and_then(|key| self.0.get(key)) {
            while !gate.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(event.payload()?.cloned())
    }
}

/// A waiting read follows the version serving reads: when another version takes reads over
/// — by catching up for the first time (auto-switch), or by `switch` — a read waiting on
/// the held one is woken and answered by the new one at once, not at the end of its wait.
#[test]
fn a_waiting_read_is_answered_by_the_version_reads_switch_to() {
    let gate = || Arc::new(AtomicBool::new(false));
    let (v1_gated, v2_gated, v2_held) = (gate(), gate(), gate());
    let views = || {
        vec![
            View::reducer("latest", 1, &[TOPIC], Gated([("gated", v1_gated.clone())].into())),
            View::reducer(
                "latest",
                2,
                &[TOPIC],
                Gated([("gated", v2_gated.clone()), ("held", v2_held.clone())].into()),
            ),
        ]
    };
    // v1 serves (it ran alone before); both versions are held at `gated`.
    let fixture = fixture_with_v1_serving();
    let offset = fixture.append(0, vec![event("gated", Some(json!(1)), None, None, 1)]);
    let engine = fixture.engine(Schemas::new(), views());
    let wait_for = |key: &'static str, offset: i64| {
        let waiting = engine.clone();
        std::thread::spawn(move || {
            let read =
                runtime().block_on(waiting.get_after("latest", key, &[at(TOPIC, 0, offset)], Duration::from_secs(30)));
            (read, Instant::now())
        })
    };

    let waiter = wait_for("gated", offset);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "v1 is held: the read waits");
    v2_gated.store(true, Ordering::Release); // v2 catches up and takes reads over
    let opened = Instant::now();
    let (read, answered) = waiter.join().unwrap();
    let read = read.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((read.version, read.value.map(|item| item.json)), (2, Some(b"1".to_vec())));
    assert!(answered - opened < Duration::from_secs(10), "woken by the auto-switch, not by its 30 s timeout");

    // v1 catches up; v2 is held at `held`, and reads are switched back to v1 meanwhile.
    v1_gated.store(true, Ordering::Release);
    let held = fixture.append(0, vec![event("held", Some(json!(2)), None, None, 2)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.describe("latest").unwrap().versions[0].status.positions.get("events/0") != Some(&(held + 1)) {
        assert!(Instant::now() < deadline, "v1 did not apply `held`: {:?}", engine.describe("latest"));
        std::thread::sleep(Duration::from_millis(5));
    }
    let waiter = wait_for("held", held);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "v2 serves and is held: the read waits");
    engine.switch("latest", 1, false).unwrap();
    let switched = Instant::now();
    let (read, answered) = waiter.join().unwrap();
    let read = read.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((read.version, read.value.map(|item| item.json)), (1, Some(b"2".to_vec())));
    assert!(answered - switched < Duration::from_secs(10), "woken by the switch, not by its 30 s timeout");
    v2_held.store(true, Ordering::Release);
    engine.shutdown();
}

/// A fixture whose view `latest` v1 (plain `Latest`) ran once, caught up and serves.
fn fixture_with_v1_serving() -> Fixture {
    let fixture = Fixture::new(1);
    let engine = fixture.engine(Schemas::new(), vec![View::reducer("latest", 1, &[TOPIC], Latest)]);
    wait_caught_up(&engine, "latest");
    engine.shutdown();
    fixture
}
