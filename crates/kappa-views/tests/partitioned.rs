//! `PartitionView`, the fold work mode runs per input partition: steps, commit and abort,
//! restore from the changelog records it produced, and the co-partitioning check.

use std::sync::Arc;

use bytes::Bytes;
use kappa_views::backend::{InputRecord, OutputRecord};
use kappa_views::{
    Event, EventError, JsonCodec, PartitionView, Processor, Reducer, Schemas, StateAccess, View, ViewError,
};

struct Count;

impl Reducer for Count {
    type State = u64;
    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }
    fn apply(&self, state: Option<u64>, event: &Event) -> Result<Option<u64>, EventError> {
        Ok(if event.is_tombstone() { None } else { Some(state.unwrap_or(0) + 1) })
    }
}

/// Writes a key derived from the record key: not co-partitioned.
struct ByOwner;

impl Processor for ByOwner {
    type State = u64;
    type Internal = ();
    fn process(&self, event: &Event, state: &mut dyn StateAccess<u64, ()>) -> Result<(), EventError> {
        let owner = format!("owner-of-{}", event.key_str().unwrap_or_default());
        state.put(&owner, 1);
        Ok(())
    }
}

fn record(offset: i64, key: &str, value: Option<&str>) -> InputRecord {
    InputRecord {
        offset,
        timestamp: 1_000 + offset,
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        headers: vec![(Bytes::from_static(b"kappa.type"), Some(Bytes::from_static(b"Counted")))].into(),
    }
}

fn fold(view: View) -> PartitionView {
    let schemas = Arc::new(Schemas::new().event_type("Counted", 1));
    PartitionView::new(&view, schemas, Arc::new(JsonCodec), "events", 2).expect("partition view")
}

/// The changelog records as a reader of the changelog partition sees them.
fn as_read(records: &[OutputRecord], first_offset: i64) -> Vec<InputRecord> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| InputRecord {
            offset: first_offset + i as i64,
            timestamp: r.timestamp,
            key: Some(Bytes::from(r.key.clone())),
            value: r.value.clone().map(Bytes::from),
            headers: Default::default(),
        })
        .collect()
}

#[test]
fn steps_commit_abort_and_restore() {
    let mut view = fold(View::reducer("counts", 1, &["events"], Count));
    let first = [record(0, "a", Some("{}")), record(1, "b", Some("{}")), record(2, "a", Some("{}"))];
    let step = view.apply(&first).unwrap().expect("a step");
    assert_eq!(step.next_offset, 3);
    assert_eq!(step.changelog.len(), 3, "two changed keys and the marker");
    view.commit();
    let mut changelog = step.changelog;
    assert_eq!(view.get("a"), Some(&b"2"[..]));

    // An aborted step leaves nothing behind; the same records apply again.
    let second = [record(3, "a", Some("{}")), record(4, "b", None)];
    view.apply(&second).unwrap().expect("a step");
    view.abort();
    assert_eq!(view.get("a"), Some(&b"2"[..]));
    assert_eq!(view.position(), 3);
    // Records below the position are skipped (a redelivery after a rebalance).
    let step = view.apply(&[first[2].clone(), second[0].clone(), second[1].clone()]).unwrap().expect("a step");
    view.commit();
    changelog.extend(step.changelog);
    assert_eq!((view.get("a"), view.get("b")), (Some(&b"3"[..]), None));
    assert_eq!((view.position(), view.events_applied()), (5, 5));
    assert!(view.apply(&first).unwrap().is_none(), "nothing new to apply");

    let mut restored = fold(View::reducer("counts", 1, &["events"], Count));
    for record in as_read(&changelog, 0) {
        restored.restore(&record).unwrap();
    }
    assert_eq!((restored.get("a"), restored.get("b")), (Some(&b"3"[..]), None));
    assert_eq!((restored.position(), restored.events_applied()), (5, 5));
}

#[test]
fn a_view_not_keyed_by_record_keys_is_refused() {
    let mut view = fold(View::processor("owners", 1, &["events"], ByOwner));
    match view.apply(&[record(0, "a", Some("{}"))]) {
        Err(ViewError::NotCoPartitioned { view, key, position }) => {
            assert_eq!((view.as_str(), key.as_str(), position.partition), ("owners", "owner-of-a", 2));
        }
        other => panic!("expected NotCoPartitioned, got {:?}", other.map(|s| s.map(|s| s.next_offset))),
    }
}

#[test]
fn a_restore_from_another_partitions_changelog_fails() {
    let mut other = PartitionView::new(
        &View::reducer("counts", 1, &["events"], Count),
        Arc::new(Schemas::new().event_type("Counted", 1)),
        Arc::new(JsonCodec),
        "events",
        1,
    )
    .unwrap();
    let step = other.apply(&[record(0, "a", Some("{}"))]).unwrap().unwrap();
    let mut view = fold(View::reducer("counts", 1, &["events"], Count));
    let marker = as_read(&step.changelog, 0).pop().unwrap();
    let error = view.restore(&marker).unwrap_err().to_string();
    assert!(error.contains("events/2"), "{error}");
}
