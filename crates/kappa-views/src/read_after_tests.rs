//! What wakes a read waiting for input offsets (`ViewEngine::get_after`), seen through the
//! version's watch channel — against a real log.

use std::sync::Arc;
use std::time::Duration;

use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Log, LogOptions};
use serde_json::Value;

use crate::{EmbeddedLog, EngineConfig, Event, EventError, Reducer, View, ViewEngine};

const TOPIC: &str = "events";

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

struct Fixture {
    _dir: tempfile::TempDir,
    log: Arc<Log>,
    engine: ViewEngine,
}

fn started() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(&dir.path().join("log"), LogOptions::default()).unwrap().0);
    log.create_topic(TOPIC, 2, &Default::default()).unwrap();
    let config = EngineConfig::new(dir.path().join("views"));
    let views = vec![View::reducer("latest", 1, &[TOPIC], Latest)];
    let engine = ViewEngine::start(Arc::new(EmbeddedLog::new(log.clone())), config, views).unwrap();
    assert!(engine.wait_caught_up("latest", Duration::from_secs(60)).unwrap());
    Fixture { _dir: dir, log, engine }
}

fn append(log: &Log, key: &str, value: &str) {
    let mut builder = BatchBuilder::new();
    builder.push(NewRecord::new(Some(key.as_bytes()), Some(value.as_bytes()), 1));
    log.partition(TOPIC, 0).unwrap().append(builder.build()).unwrap();
}

/// An idle runner passes over its inputs every 100 ms or so, publishing their ends and its
/// rate: that wakes no waiting reader (each would look at the status under the runner's
/// lock for nothing). A step that moves a position does.
#[test]
fn idle_passes_wake_no_waiting_reader_and_a_step_does() {
    let fixture = started();
    // Live (it reports that after it serves): no phase change to come.
    let live = std::time::Instant::now();
    while fixture.engine.describe("latest").unwrap().versions[0].status.phase != crate::Phase::Live {
        assert!(live.elapsed() < Duration::from_secs(10), "not live");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut woken = fixture.engine.subscribe_version("latest", 1).unwrap();
    woken.mark_unchanged();
    // Several idle passes (and their rate updates).
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!woken.has_changed().unwrap(), "an idle pass woke the waiting readers");

    append(&fixture.log, "a", "1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let changed = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), woken.changed()).await });
    assert!(matches!(changed, Ok(Ok(()))), "the step applying the record woke no reader");
    fixture.engine.shutdown();
}
