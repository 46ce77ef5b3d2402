//! `PartitionView`, the fold work mode runs per input partition: steps, commit and abort,
//! restore from the changelog records it produced, the co-partitioning check, and the two
//! stages of a view run through a repartition topic.

use std::sync::Arc;

use bytes::Bytes;
use kappa_views::backend::{InputRecord, OutputRecord};
use kappa_views::partitioned::{self, Placement};
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

/// `owner_channels` in miniature: internal key = the record key (an item) → its owner; view
/// key = owner → the number of items it owns. Payload `{"owner": "o1"}`, a tombstone deletes.
struct OwnerCounts;

impl Processor for OwnerCounts {
    type State = u64;
    type Internal = String;
    fn process(&self, event: &Event, state: &mut dyn StateAccess<u64, String>) -> Result<(), EventError> {
        let Some(item) = event.key_str() else { return Ok(()) };
        let new = event.field_str("owner").map(str::to_owned);
        let old = state.get_internal(item)?;
        if old == new {
            return Ok(());
        }
        if let Some(old) = &old {
            match state.take(old)?.unwrap_or(1) {
                1 => state.delete(old),
                n => state.put(old, n - 1),
            }
        }
        match new {
            Some(new) => {
                let n = state.take(&new)?.unwrap_or(0);
                state.put(&new, n + 1);
                state.put_internal(item, new);
            }
            None => state.delete_internal(item),
        }
        Ok(())
    }
}

fn placed(view: &View, topic: &str, partition: i32, placement: Placement) -> PartitionView {
    let schemas = Arc::new(Schemas::new().event_type("Counted", 1));
    PartitionView::with_placement(view, schemas, Arc::new(JsonCodec), topic, partition, placement).expect("fold")
}

/// Stage 1 on two input partitions, the forwarded records delivered per repartition partition
/// (interleaved across sources, each source in order), stage 2 there: the union of the stage-2
/// states equals the reference count of items per owner; every key lands where Kafka's
/// partitioner puts it; a stage-1 restore from its own changelog gives back its position.
#[test]
fn a_repartitioned_view_equals_the_reference() {
    let view = View::processor("owners", 1, &["events"], OwnerCounts);
    let repartition = partitioned::repartition_topic("owners", 1);
    let partitions = 2;
    let mut sources: Vec<PartitionView> =
        (0..partitions).map(|p| placed(&view, "events", p, Placement::RepartitionSource { partitions })).collect();
    let mut sinks: Vec<PartitionView> =
        (0..partitions).map(|p| placed(&view, &repartition, p, Placement::RepartitionSink { partitions })).collect();
    let mut forwarded: Vec<Vec<InputRecord>> = vec![Vec::new(); partitions as usize];
    let mut reference: std::collections::BTreeMap<String, String> = Default::default();
    let mut state_changelog = Vec::new();
    let mut rng = 7u64;
    let mut next = |n: u64| {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n
    };
    let mut input_offsets = [0i64; 2];
    for _step in 0..30 {
        for p in 0..partitions as usize {
            let mut records = Vec::new();
            for _ in 0..next(6) {
                let item = format!("item{}-{}", p, next(5));
                let owner = (next(5) > 0).then(|| format!("o{}", next(4)));
                let value = owner.as_ref().map(|o| format!(r#"{{"owner":"{o}"}}"#));
                match owner {
                    Some(o) => reference.insert(item.clone(), o),
                    None => reference.remove(&item),
                };
                records.push(record(input_offsets[p], &item, value.as_deref()));
                input_offsets[p] += 1;
            }
            if let Some(step) = sources[p].apply(&records).unwrap() {
                for (target, out) in &step.repartition {
                    assert_eq!(*target, partitioned::key_partition(&out.key, partitions), "keyed by a view key");
                    let offset = forwarded[*target as usize].len() as i64;
                    forwarded[*target as usize].push(InputRecord {
                        offset,
                        timestamp: out.timestamp,
                        key: Some(Bytes::from(out.key.clone())),
                        value: out.value.clone().map(Bytes::from),
                        headers: out
                            .headers
                            .iter()
                            .map(|(k, v)| (Bytes::from(k.clone().into_bytes()), v.clone().map(Bytes::from)))
                            .collect(),
                    });
                }
                if p == 0 {
                    state_changelog.extend(step.changelog);
                }
                sources[p].commit();
            }
        }
        // Stage 2 consumes what has arrived so far.
        for q in 0..partitions as usize {
            if let Some(_step) = sinks[q].apply(&forwarded[q]).unwrap() {
                sinks[q].commit();
            }
        }
    }
    let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
    for owner in reference.values() {
        *expected.entry(owner.clone()).or_default() += 1;
    }
    let mut got: std::collections::BTreeMap<String, u64> = Default::default();
    for (q, sink) in sinks.iter().enumerate() {
        for owner in ["o0", "o1", "o2", "o3"] {
            if let Some(value) = sink.get(owner) {
                assert_eq!(partitioned::key_partition(owner.as_bytes(), partitions), q as i32, "{owner} on {q}");
                got.insert(owner.to_owned(), serde_json::from_slice(value).unwrap());
            }
        }
    }
    assert_eq!(got, expected, "stage 2's states against the reference");
    let mut restored = placed(&view, "events", 0, Placement::RepartitionSource { partitions });
    for record in as_read(&state_changelog, 0) {
        restored.restore_parts(record.offset, record.key.as_deref(), record.value.as_deref()).unwrap();
    }
    assert_eq!(restored.position(), sources[0].position());
}

/// Which keys an event touches must not depend on view values: stage 2 notices when it does.
#[test]
fn a_view_whose_keys_depend_on_view_values_is_refused_in_stage_2() {
    struct Chain;
    impl Processor for Chain {
        type State = u64;
        type Internal = ();
        fn process(&self, _: &Event, state: &mut dyn StateAccess<u64, ()>) -> Result<(), EventError> {
            // Absent in stage 1, present in stage 2: then it writes a key stage 1 never saw.
            if let Some(n) = state.get("k0")? {
                state.put(&format!("k{}", n + 1), 1);
            }
            state.put("k0", 1);
            Ok(())
        }
    }
    let view = View::processor("chain", 1, &["events"], Chain);
    let partitions = 1;
    let mut source = placed(&view, "events", 0, Placement::RepartitionSource { partitions });
    let mut sink =
        placed(&view, &partitioned::repartition_topic("chain", 1), 0, Placement::RepartitionSink { partitions });
    let mut forwarded = Vec::new();
    for offset in 0..2 {
        let step = source.apply(&[record(offset, "a", Some("{}"))]).unwrap().unwrap();
        source.commit();
        for (_, out) in step.repartition {
            forwarded.push(InputRecord {
                offset: forwarded.len() as i64,
                timestamp: out.timestamp,
                key: Some(Bytes::from(out.key)),
                value: out.value.map(Bytes::from),
                headers: out
                    .headers
                    .into_iter()
                    .map(|(k, v)| (Bytes::from(k.into_bytes()), v.map(Bytes::from)))
                    .collect(),
            });
        }
    }
    sink.apply(&forwarded[..1]).unwrap().unwrap();
    sink.commit();
    match sink.apply(&forwarded[1..]) {
        Err(ViewError::NotRepartitionable { view, reason, .. }) => {
            assert_eq!(view, "chain");
            assert!(reason.contains("k2"), "{reason}");
        }
        other => panic!("expected NotRepartitionable, got {:?}", other.map(|s| s.map(|s| s.next_offset))),
    }
}

/// key → a string of "x": each event appends as many as its payload's `add`.
struct Growing;

impl Reducer for Growing {
    type State = String;
    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }
    fn apply(&self, state: Option<String>, event: &Event) -> Result<Option<String>, EventError> {
        let add = event.payload()?.and_then(|p| p.get("add")).and_then(|a| a.as_u64()).unwrap_or(0);
        Ok(Some(state.unwrap_or_default() + &"x".repeat(add as usize)))
    }
}

const MEBIBYTE: usize = 1024 * 1024;

/// Offset 1 takes key a to 5 MiB, past `VIEW_VALUE_BYTES_MAX`.
fn growing_records() -> Vec<InputRecord> {
    [("a", 3 * MEBIBYTE), ("a", 2 * MEBIBYTE), ("b", 1), ("a", 5)]
        .iter()
        .enumerate()
        .map(|(offset, (key, add))| record(offset as i64, key, Some(&format!(r#"{{"add":{add}}}"#))))
        .collect()
}

#[test]
fn an_event_making_a_value_too_large_stops_a_stop_policy_fold_at_that_event() {
    let mut view = fold(View::reducer("growing", 1, &["events"], Growing));
    match view.apply(&growing_records()) {
        Err(ViewError::EventFailed { position, reason, .. }) => {
            assert_eq!(position.offset, 1);
            assert!(reason.contains("key 'a'") && reason.contains("VIEW_VALUE_BYTES_MAX"), "{reason}");
        }
        other => panic!("expected EventFailed, got {:?}", other.map(|s| s.map(|s| s.next_offset))),
    }
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
        let even = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(2);
        Ok(Some(if even { "x".repeat(5 * MEBIBYTE) } else { "x".to_owned() }))
    }
}

/// Looking again for the event that made a value too large finds none: the fold fails
/// saying the view is not deterministic (it used to panic the worker's thread).
#[test]
fn a_view_that_is_not_deterministic_about_a_too_large_value_fails_the_fold() {
    let mut view = fold(View::reducer("flaky", 1, &["events"], Flaky::default()));
    match view.apply(&[record(0, "a", Some(r#"{"add":1}"#))]) {
        Err(ViewError::EventFailed { position, reason, .. }) => {
            assert_eq!(position.offset, 0);
            assert!(reason.contains("not deterministic"), "{reason}");
        }
        other => panic!("expected EventFailed, got {:?}", other.map(|s| s.map(|s| s.next_offset))),
    }
}

#[test]
fn an_event_making_a_value_too_large_is_dead_lettered_by_a_fold() {
    let mut view = fold(View::reducer("growing", 1, &["events"], Growing).dead_letter("growing-dlq"));
    let step = view.apply(&growing_records()).unwrap().expect("a step");
    assert_eq!(step.next_offset, 4);
    let sources: Vec<_> = step
        .dead_letters
        .iter()
        .map(|(topic, r)| {
            let source = r.headers.iter().find(|(k, _)| k == "kappa.dlq.source").and_then(|(_, v)| v.clone());
            (topic.as_str(), String::from_utf8(source.unwrap()).unwrap())
        })
        .collect();
    assert_eq!(sources, [("growing-dlq", "events/2/1".to_owned())]);
    view.commit();
    // A JSON string: its quotes.
    assert_eq!(view.get("a").map(<[u8]>::len), Some(3 * MEBIBYTE + 5 + 2));
    assert_eq!(view.get("b").map(<[u8]>::len), Some(3));
}
