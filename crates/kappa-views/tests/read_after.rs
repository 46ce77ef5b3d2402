//! `ViewEngine::get_after`: a read that waits until the serving version has applied given
//! input offsets — against a real log, with an open transaction holding the view behind.

mod common;

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
