//! One view applied to one input partition, for a runner outside this crate (work mode,
//! `kappa-kafka`): the caller reads the input, writes the changelog and owns the
//! transactions; this type owns the fold — the state of that partition's keys, the input
//! position, and the changelog records of each step.
//!
//! The protocol of a step: [`PartitionView::apply`] folds records into a pending step and
//! returns its changelog records (changes, then a step marker — the format of
//! `changelog.rs`, the marker holding this one partition's position); the caller writes
//! them together with the input offset in one transaction, then calls
//! [`PartitionView::commit`], or [`PartitionView::abort`] when the transaction failed.
//!
//! Why this is correct without a global order: every key a step changes must be the record
//! key of an input record of the step (checked), so a key's whole history lives in one
//! input partition and one changelog partition. A view keyed by something else (e.g.
//! `owner_channels`, keyed by owner) fails with [`ViewError::NotCoPartitioned`] — unless it
//! runs through a repartition topic ([`Placement`]):
//!
//! - **Stage 1** ([`Placement::RepartitionSource`], on input partition p) runs the view's
//!   unchanged code once per event against its *internal* keys (which must be keyed by the
//!   record key, so they live here) with every *view* key reading as absent, and records
//!   which view keys the event touched (read or written). It keeps the internal changes (its
//!   own changelog, `__kappa.repartition-state.<view>.v<N>`) and forwards the event to
//!   `__kappa.repartition.<view>.v<N>` — once per repartition partition that holds a touched
//!   key (Kafka's murmur2 partitioner of the view key; the record key is such a key) — with
//!   the pre-event values of the internal keys it read.
//! - **Stage 2** ([`Placement::RepartitionSink`], on repartition partition q) runs the same
//!   code again per forwarded event, with those internal values, the real values of its own
//!   view keys (keys of partition q) and the other view keys absent, and keeps the changes to
//!   its own keys: the view's changelog partition q.
//!
//! This is exact when each view key's next value depends only on that key's value, the event
//! and internal state (a grouped aggregation, as `owner_channels`: remove the channel from
//! the old owner, add it to the new one) and the keys an event touches do not depend on view
//! values. Stage 2 checks the second (a key outside the forwarded set fails with
//! [`ViewError::NotRepartitionable`]); the first is the view's contract in work mode.
//! Ordering: a key's changes from one input partition keep their order; changes from
//! different input partitions to one key interleave (as with Kafka Streams' repartitioning).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::backend::{InputRecord, OutputRecord};
use crate::changelog::{self, Change, Entry, StepMarker};
use crate::error::{EventError, InputPosition, Result, ViewError};
use crate::event::{PayloadCodec, decode_event};
use crate::runner::{CACHE_ENTRIES_MAX, VIEW_VALUE_BYTES_MAX, now_ms, oversized_change, position_key, value_too_large};
use crate::schema::Schemas;
use crate::store::Scope;
use crate::view::{Applier, ErrorPolicy, StoreRead, View};

/// The repartition topic of a view version keyed differently from its input.
pub fn repartition_topic(view: &str, version: u32) -> String {
    format!("__kappa.repartition.{view}.v{version}")
}

/// The changelog of stage 1 of a repartitioned view version (its internal keys).
pub fn repartition_state_topic(view: &str, version: u32) -> String {
    format!("__kappa.repartition-state.{view}.v{version}")
}

/// The repartition partition of a view key: Kafka's default partitioner.
pub fn key_partition(key: &[u8], partitions: i32) -> i32 {
    kappa_log::partitioner::default_partition(key, partitions)
}

/// Headers stage 1 adds to a forwarded event (removed again before stage 2 decodes it).
pub const REPARTITION_HEADER_PREFIX: &str = "kappa.repartition.";
const SOURCE_HEADER: &str = "kappa.repartition.source";
const KEY_HEADER: &str = "kappa.repartition.key";
const KEYS_HEADER: &str = "kappa.repartition.keys";
const INTERNAL_HEADER: &str = "kappa.repartition.internal";

/// Where a view's fold of one partition stands relative to its keys (work mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Keyed by the input's record key: state and changelog partition p = input partition p.
    CoPartitioned,
    /// Stage 1 of a view keyed otherwise, on an input partition: internal keys here, events
    /// forwarded to the repartition topic of `partitions` partitions.
    RepartitionSource { partitions: i32 },
    /// Stage 2, on repartition partition p of `partitions`: the view keys of p.
    RepartitionSink { partitions: i32 },
}

/// A step's output: what the caller writes in the step's transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// For the view's changelog (the stage-1 state changelog for a repartition source),
    /// partition = the partition this fold runs on: changes, then the marker.
    pub changelog: Vec<OutputRecord>,
    /// (repartition partition, record) for the repartition topic (stage 1 only).
    pub repartition: Vec<(i32, OutputRecord)>,
    /// (topic, record) for the view's dead-letter topic (`ErrorPolicy::DeadLetter`).
    pub dead_letters: Vec<(String, OutputRecord)>,
    /// The input offset after the step (what the consumer group commits).
    pub next_offset: i64,
}

/// What folding a step's records produced.
struct Folded {
    dead_letters: Vec<(String, OutputRecord)>,
    repartition: Vec<(i32, OutputRecord)>,
    applied: i64,
    /// The largest input timestamp.
    timestamp: Option<i64>,
}

struct Pending {
    changes: Vec<Change>,
    position: i64,
    events_applied: i64,
}

/// The committed state of one partition's keys, as JSON.
#[derive(Default)]
pub(crate) struct MemoryState {
    pub(crate) view: HashMap<String, Vec<u8>>,
    pub(crate) internal: HashMap<String, Vec<u8>>,
}

impl MemoryState {
    fn map(&mut self, scope: Scope) -> &mut HashMap<String, Vec<u8>> {
        match scope {
            Scope::View => &mut self.view,
            Scope::Internal => &mut self.internal,
        }
    }

    pub(crate) fn write(&mut self, change: Change) {
        match change.value {
            Some(json) => {
                self.map(change.scope).insert(change.key, json);
            }
            None => {
                self.map(change.scope).remove(&change.key);
            }
        }
    }
}

impl StoreRead for MemoryState {
    fn get(&self, scope: Scope, key: &str) -> Result<Option<Vec<u8>>, EventError> {
        let map = match scope {
            Scope::View => &self.view,
            Scope::Internal => &self.internal,
        };
        Ok(map.get(key).cloned())
    }
}

/// One view version's fold of one input partition.
pub struct PartitionView {
    view: String,
    version: u32,
    topic: Arc<str>,
    partition: i32,
    position_key: String,
    schemas: Arc<Schemas>,
    codec: Arc<dyn PayloadCodec>,
    on_error: ErrorPolicy,
    applier: Box<dyn Applier>,
    state: MemoryState,
    position: i64,
    events_applied: i64,
    pending: Option<Pending>,
    placement: Placement,
    /// A repartition sink's source topics, interned.
    source_topics: BTreeMap<String, Arc<str>>,
}

impl PartitionView {
    /// An empty fold of `topic`/`partition`, which must be the view's only input.
    pub fn new(
        view: &View,
        schemas: Arc<Schemas>,
        codec: Arc<dyn PayloadCodec>,
        topic: &str,
        partition: i32,
    ) -> Result<Self> {
        Self::with_placement(view, schemas, codec, topic, partition, Placement::CoPartitioned)
    }

    /// A fold of `topic`/`partition` placed as `placement`: for a repartition sink, `topic`
    /// is the view's repartition topic; otherwise the view's only input.
    pub fn with_placement(
        view: &View,
        schemas: Arc<Schemas>,
        codec: Arc<dyn PayloadCodec>,
        topic: &str,
        partition: i32,
        placement: Placement,
    ) -> Result<Self> {
        view.validate()?;
        if let Placement::RepartitionSink { .. } = placement {
            let wanted = repartition_topic(&view.name, view.version);
            if topic != wanted {
                return Err(ViewError::Definition {
                    view: view.name.clone(),
                    reason: format!("stage 2 of a repartitioned view reads '{wanted}', not '{topic}'"),
                });
            }
        } else if view.inputs != [topic] {
            return Err(ViewError::Definition {
                view: view.name.clone(),
                reason: format!(
                    "in work mode a view reads exactly one input topic (its partitions are the unit of work); it reads {:?}",
                    view.inputs
                ),
            });
        }
        Ok(Self {
            view: view.name.clone(),
            version: view.version,
            topic: Arc::from(topic),
            partition,
            position_key: position_key(topic, partition),
            schemas,
            codec,
            on_error: view.on_error.clone(),
            applier: view.logic.applier(),
            state: MemoryState::default(),
            position: 0,
            events_applied: 0,
            pending: None,
            placement,
            source_topics: BTreeMap::new(),
        })
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The next input offset to apply.
    pub fn position(&self) -> i64 {
        self.position
    }

    pub fn events_applied(&self) -> i64 {
        self.events_applied
    }

    /// View keys held (not internal keys).
    pub fn len(&self) -> usize {
        self.state.view.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.view.is_empty()
    }

    /// A view key's committed value (JSON).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.state.view.get(key).map(Vec::as_slice)
    }

    /// Restores from one record of the view's changelog partition (read committed, in
    /// offset order, before any `apply`).
    pub fn restore(&mut self, record: &InputRecord) -> Result<()> {
        let entry =
            changelog::decode(record).map_err(|e| self.changelog_error(format!("offset {}: {e}", record.offset)))?;
        match entry {
            Entry::Change { change, .. } => self.state.write(change),
            Entry::Step { marker, offset } => self.restore_marker(offset, &marker)?,
        }
        Ok(())
    }

    /// [`Self::restore`] from a record's borrowed parts (the restore path: no `InputRecord`,
    /// one copy of the key and value).
    pub fn restore_parts(&mut self, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()> {
        let key =
            key.ok_or_else(|| self.changelog_error(format!("offset {offset}: changelog record without a key")))?;
        if key == changelog::MARKER_KEY {
            let value =
                value.ok_or_else(|| self.changelog_error(format!("offset {offset}: step marker without a value")))?;
            let marker: StepMarker = serde_json::from_slice(value)
                .map_err(|e| self.changelog_error(format!("offset {offset}: step marker: {e}")))?;
            return self.restore_marker(offset, &marker);
        }
        let (scope, key) = match key.split_first() {
            Some((&changelog::INTERNAL_KEY_PREFIX, rest)) => (Scope::Internal, rest),
            _ => (Scope::View, key),
        };
        let key = std::str::from_utf8(key)
            .map_err(|_| self.changelog_error(format!("offset {offset}: changelog key is not UTF-8")))?;
        let map = self.state.map(scope);
        match value {
            Some(value) => {
                map.insert(key.to_owned(), value.to_vec());
            }
            None => {
                map.remove(key);
            }
        }
        Ok(())
    }

    /// Makes room for `additional` more view keys (a restore knows the changelog's size).
    pub fn reserve(&mut self, additional: usize) {
        self.state.view.reserve(additional);
    }

    fn restore_marker(&mut self, offset: i64, marker: &StepMarker) -> Result<()> {
        let position = marker.positions.get(&self.position_key).copied().ok_or_else(|| {
            self.changelog_error(format!(
                "the step marker at offset {offset} has no position for {} (positions {:?}): this changelog partition belongs to another input partition or topic",
                self.position_key, marker.positions
            ))
        })?;
        self.position = position;
        self.events_applied = marker.events_applied;
        Ok(())
    }

    /// Folds the records at or after the position into a pending step; None when there was
    /// nothing to apply. A pending step must be committed or aborted before the next one.
    pub fn apply(&mut self, records: &[InputRecord]) -> Result<Option<Step>> {
        assert!(self.pending.is_none(), "apply with a step pending: commit or abort it first");
        let first = records.partition_point(|r| r.offset < self.position);
        let records = &records[first..];
        let Some(last) = records.last() else { return Ok(None) };
        if records[0].offset != self.position && self.events_applied > 0 {
            tracing::debug!(view = %self.view, partition = self.partition, position = self.position, first = records[0].offset, "input offsets skip ahead (compaction or retention)");
        }
        let (Folded { dead_letters, repartition, applied, timestamp }, changes) = match self.placement {
            Placement::CoPartitioned => {
                let (folded, changes) = self.fold(records)?;
                self.check_changes(records, &changes)?;
                (folded, changes)
            }
            Placement::RepartitionSource { partitions } => self.fold_source(records, partitions)?,
            Placement::RepartitionSink { partitions } => self.fold_sink(records, partitions)?,
        };
        let position = last.offset + 1;
        let events_applied = self.events_applied + applied;
        let marker = StepMarker {
            positions: BTreeMap::from([(self.position_key.clone(), position)]),
            events_applied,
            topic_ids: BTreeMap::new(),
        };
        let changelog = changelog::encode_step(&changes, &marker, timestamp.unwrap_or_else(now_ms));
        self.pending = Some(Pending { changes, position, events_applied });
        Ok(Some(Step { changelog, repartition, dead_letters, next_offset: position }))
    }

    /// Stage 1: each event against the internal keys, view keys absent; the internal changes
    /// stay here, the event goes to the repartition partitions of the view keys it touched.
    fn fold_source(&mut self, records: &[InputRecord], partitions: i32) -> Result<(Folded, Vec<Change>)> {
        let step_keys: HashSet<&[u8]> = records.iter().filter_map(|r| r.key.as_deref()).collect();
        let mut overlay: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        let mut folded = Folded { dead_letters: Vec::new(), repartition: Vec::new(), applied: 0, timestamp: None };
        for record in records {
            let read = SourceRead {
                committed: &self.state.internal,
                overlay: &overlay,
                internal_reads: RefCell::new(BTreeMap::new()),
                view_keys: RefCell::new(BTreeSet::new()),
            };
            let outcome = apply_alone(
                &mut *self.applier,
                &self.schemas,
                self.codec.as_ref(),
                (&self.topic, self.partition),
                record,
                &read,
            );
            let (timestamp, changes) = match outcome {
                Ok(done) => done,
                Err(error) => {
                    self.on_event_error(record, error, &mut folded.dead_letters)?;
                    continue;
                }
            };
            let SourceRead { internal_reads, view_keys, .. } = read;
            let mut view_keys = view_keys.into_inner();
            let mut internal = Vec::new();
            for change in changes {
                match change.scope {
                    Scope::View => {
                        view_keys.insert(change.key);
                    }
                    Scope::Internal => {
                        if !step_keys.contains(change.key.as_bytes()) {
                            return Err(ViewError::NotRepartitionable {
                                view: self.view.clone(),
                                position: self.input_position(record.offset),
                                reason: format!(
                                    "it changed internal key '{}', which is not the key of a record it applied; a repartitioned view keeps its internal keys by its input's record key",
                                    change.key
                                ),
                            });
                        }
                        internal.push(change);
                    }
                }
            }
            for change in internal {
                overlay.insert(change.key, change.value);
            }
            folded.repartition.extend(self.forward(record, &internal_reads.into_inner(), &view_keys, partitions));
            folded.timestamp = Some(folded.timestamp.map_or(timestamp, |m: i64| m.max(timestamp)));
            folded.applied += 1;
        }
        let changes = overlay_changes(overlay, Scope::Internal);
        Ok((folded, changes))
    }

    /// One forwarded record per repartition partition holding a touched view key.
    fn forward(
        &self,
        record: &InputRecord,
        internal_reads: &BTreeMap<String, Option<Vec<u8>>>,
        view_keys: &BTreeSet<String>,
        partitions: i32,
    ) -> Vec<(i32, OutputRecord)> {
        let mut by_partition: BTreeMap<i32, Vec<&str>> = BTreeMap::new();
        for key in view_keys {
            by_partition.entry(key_partition(key.as_bytes(), partitions)).or_default().push(key);
        }
        if by_partition.is_empty() {
            return Vec::new();
        }
        let internal = encode_entries(internal_reads.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
        let source = format!("{}/{}/{}", self.topic, self.partition, record.offset);
        by_partition
            .into_iter()
            .map(|(partition, keys)| {
                let mut headers: Vec<(String, Option<Vec<u8>>)> = record
                    .headers
                    .iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.as_ref().map(|v| v.to_vec())))
                    .collect();
                headers.push((SOURCE_HEADER.to_owned(), Some(source.clone().into_bytes())));
                headers.push((KEY_HEADER.to_owned(), record.key.as_ref().map(|k| k.to_vec())));
                headers.push((KEYS_HEADER.to_owned(), Some(encode_entries(keys.iter().map(|k| (*k, None))))));
                headers.push((INTERNAL_HEADER.to_owned(), Some(internal.clone())));
                let output = OutputRecord {
                    timestamp: record.timestamp,
                    key: keys[0].as_bytes().to_vec(),
                    value: record.value.as_ref().map(|v| v.to_vec()),
                    headers,
                };
                (partition, output)
            })
            .collect()
    }

    /// Stage 2: each forwarded event again, with the internal values stage 1 read and this
    /// partition's view keys; keeps the changes to this partition's keys.
    fn fold_sink(&mut self, records: &[InputRecord], partitions: i32) -> Result<(Folded, Vec<Change>)> {
        let mut overlay: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        let mut folded = Folded { dead_letters: Vec::new(), repartition: Vec::new(), applied: 0, timestamp: None };
        for forwarded in records {
            let (source, record, keys, internal) = self.unwrap_forwarded(forwarded)?;
            let read = SinkRead {
                committed: &self.state.view,
                overlay: &overlay,
                internal: &internal,
                partition: self.partition,
                partitions,
                view_keys: RefCell::new(BTreeSet::new()),
                missing_internal: RefCell::new(None),
            };
            let outcome = apply_alone(
                &mut *self.applier,
                &self.schemas,
                self.codec.as_ref(),
                (&source.0, source.1),
                &record,
                &read,
            );
            let (timestamp, changes) = match outcome {
                Ok(done) => done,
                Err(error) => {
                    self.on_event_error(&record, error, &mut folded.dead_letters)?;
                    continue;
                }
            };
            let SinkRead { view_keys, missing_internal, .. } = read;
            let position = || InputPosition { topic: source.0.to_string(), partition: source.1, offset: record.offset };
            if let Some(key) = missing_internal.into_inner() {
                return Err(ViewError::NotRepartitionable {
                    view: self.view.clone(),
                    position: position(),
                    reason: format!(
                        "applied again it read internal key '{key}', which it did not read the first time: the view is not deterministic"
                    ),
                });
            }
            let mut touched = view_keys.into_inner();
            let mut own = Vec::new();
            for change in changes {
                if change.scope == Scope::View && key_partition(change.key.as_bytes(), partitions) == self.partition {
                    touched.insert(change.key.clone());
                    own.push(change);
                }
            }
            for key in &touched {
                if key_partition(key.as_bytes(), partitions) == self.partition && !keys.contains(key) {
                    return Err(ViewError::NotRepartitionable {
                        view: self.view.clone(),
                        position: position(),
                        reason: format!(
                            "with its real state it touched view key '{key}', which it did not touch with view keys absent: which keys an event touches must not depend on view values"
                        ),
                    });
                }
            }
            for change in own {
                let bytes = change.value.as_ref().map_or(0, Vec::len);
                if bytes > VIEW_VALUE_BYTES_MAX {
                    return Err(ViewError::ValueTooLarge {
                        view: self.view.clone(),
                        version: self.version,
                        key: change.key,
                        position: position(),
                        bytes,
                        max: VIEW_VALUE_BYTES_MAX,
                    });
                }
                overlay.insert(change.key, change.value);
            }
            folded.timestamp = Some(folded.timestamp.map_or(timestamp, |m: i64| m.max(timestamp)));
            folded.applied += 1;
        }
        Ok((folded, overlay_changes(overlay, Scope::View)))
    }

    /// A forwarded record: (source topic and partition, the original record, the touched
    /// keys of this partition, the internal values stage 1 read).
    #[allow(clippy::type_complexity)]
    fn unwrap_forwarded(
        &mut self,
        forwarded: &InputRecord,
    ) -> Result<((Arc<str>, i32), InputRecord, BTreeSet<String>, HashMap<String, Option<Vec<u8>>>)> {
        let bad = |reason: &str| {
            self.changelog_error(format!(
                "repartition record at offset {} is malformed ({reason}); it was not written by a kappa worker",
                forwarded.offset
            ))
        };
        let header = |name: &str| forwarded.headers.last(name.as_bytes());
        let source = header(SOURCE_HEADER).flatten().ok_or_else(|| bad("no source header"))?;
        let source = std::str::from_utf8(source).map_err(|_| bad("source header not UTF-8"))?;
        let mut parts = source.rsplitn(3, '/');
        let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("source header is not topic/partition/offset"));
        };
        let offset: i64 = offset.parse().map_err(|_| bad("source offset"))?;
        let partition: i32 = partition.parse().map_err(|_| bad("source partition"))?;
        let key = header(KEY_HEADER).ok_or_else(|| bad("no key header"))?.map(Bytes::copy_from_slice);
        let keys = decode_entries(header(KEYS_HEADER).flatten().unwrap_or_default())
            .ok_or_else(|| bad("keys header"))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let internal = decode_entries(header(INTERNAL_HEADER).flatten().unwrap_or_default())
            .ok_or_else(|| bad("internal header"))?
            .into_iter()
            .collect();
        let headers = forwarded
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(REPARTITION_HEADER_PREFIX.as_bytes()))
            .map(|(k, v)| (Bytes::copy_from_slice(k), v.map(Bytes::copy_from_slice)))
            .collect();
        let record =
            InputRecord { offset, timestamp: forwarded.timestamp, key, value: forwarded.value.clone(), headers };
        let topic = self.source_topics.entry(topic.to_owned()).or_insert_with(|| Arc::from(topic)).clone();
        Ok(((topic, partition), record, keys, internal))
    }

    /// The error policy for one event of a repartitioned view (applied one at a time, so
    /// nothing of the failed event remains).
    fn on_event_error(
        &self,
        record: &InputRecord,
        error: EventError,
        dead_letters: &mut Vec<(String, OutputRecord)>,
    ) -> Result<()> {
        match &self.on_error {
            ErrorPolicy::Stop => Err(self.failed(record.offset, error)),
            ErrorPolicy::DeadLetter(topic) => {
                dead_letters.push((topic.clone(), self.dead_letter(record, &error)));
                Ok(())
            }
        }
    }

    fn input_position(&self, offset: i64) -> InputPosition {
        InputPosition { topic: self.topic.to_string(), partition: self.partition, offset }
    }

    /// Applies records in order, returning what they did and changed; an event that fails,
    /// or after which a value is first over `VIEW_VALUE_BYTES_MAX` (judged on the final
    /// values of `records`, see `runner::oversized_change`), is handled by the error policy
    /// after re-applying, on a clean cache, the records before it (it may have changed keys
    /// before failing).
    fn fold(&mut self, records: &[InputRecord]) -> Result<(Folded, Vec<Change>)> {
        let mut skipped: HashSet<i64> = HashSet::new();
        let mut dead_letters = Vec::new();
        'again: loop {
            let mut timestamp = None;
            let mut applied = 0;
            for record in records {
                if skipped.contains(&record.offset) {
                    continue;
                }
                match self.apply_record(record) {
                    Ok(t) => {
                        timestamp = Some(timestamp.map_or(t, |m: i64| m.max(t)));
                        applied += 1;
                    }
                    Err(error) => {
                        self.applier.discard();
                        self.on_event_error(record, error, &mut dead_letters)?;
                        skipped.insert(record.offset);
                        continue 'again;
                    }
                }
            }
            let changes = self.applier.take_changes().map_err(|e| self.failed(records[0].offset, e))?;
            if oversized_change(&changes).is_some() {
                let kept: Vec<&InputRecord> = records.iter().filter(|r| !skipped.contains(&r.offset)).collect();
                let (record, error) = self.find_oversized(&kept)?;
                self.applier.discard();
                self.on_event_error(record, error, &mut dead_letters)?;
                skipped.insert(record.offset);
                continue 'again;
            }
            return Ok((Folded { dead_letters, repartition: Vec::new(), applied, timestamp }, changes));
        }
    }

    /// The record of `kept` after which a value is first too large (applying all of them
    /// makes one), found by applying halves of them again, and why it fails.
    fn find_oversized<'r>(&mut self, kept: &[&'r InputRecord]) -> Result<(&'r InputRecord, EventError)> {
        let (mut fine, mut over) = (0, kept.len());
        while over - fine > 1 {
            let middle = fine + (over - fine) / 2;
            if oversized_change(&self.reapply(&kept[..middle])?).is_some() {
                over = middle;
            } else {
                fine = middle;
            }
        }
        let changes = self.reapply(&kept[..over])?;
        let Some(change) = oversized_change(&changes) else {
            let last = kept[over - 1];
            return Err(self.failed(
                last.offset,
                EventError(format!(
                    "re-applying the step's events up to it left no value over {VIEW_VALUE_BYTES_MAX} bytes where applying them had: the view's logic is not deterministic"
                )),
            ));
        };
        let error = value_too_large(change.scope, &change.key, change.value.as_ref().map_or(0, Vec::len));
        Ok((kept[over - 1], error))
    }

    /// The changes of `records` applied again on a clean cache.
    fn reapply(&mut self, records: &[&InputRecord]) -> Result<Vec<Change>> {
        self.applier.discard();
        for record in records {
            self.apply_record(record).map_err(|e| {
                self.failed(
                    record.offset,
                    EventError(format!(
                        "re-applying it failed ({e}) where it had succeeded: the view's logic is not deterministic"
                    )),
                )
            })?;
        }
        self.applier.take_changes().map_err(|e| self.failed(records.first().map_or(self.position, |r| r.offset), e))
    }

    fn apply_record(&mut self, record: &InputRecord) -> Result<i64, EventError> {
        let event = decode_event(&self.topic, self.partition, record.clone(), self.codec.as_ref())
            .and_then(|e| self.schemas.upcast(e))?;
        let timestamp = event.timestamp;
        self.applier.apply(&event, &self.state)?;
        Ok(timestamp)
    }

    /// Every changed key must be a record key of the step (co-partitioning) and fit the
    /// value limit.
    fn check_changes(&mut self, records: &[InputRecord], changes: &[Change]) -> Result<()> {
        let keys: HashSet<&[u8]> = records.iter().filter_map(|r| r.key.as_deref()).collect();
        for change in changes {
            if !keys.contains(change.key.as_bytes()) {
                self.applier.discard();
                return Err(ViewError::NotCoPartitioned {
                    view: self.view.clone(),
                    key: change.key.clone(),
                    position: InputPosition {
                        topic: self.topic.to_string(),
                        partition: self.partition,
                        offset: records[0].offset,
                    },
                });
            }
            let bytes = change.value.as_ref().map_or(0, Vec::len);
            if bytes > VIEW_VALUE_BYTES_MAX {
                self.applier.discard();
                return Err(ViewError::ValueTooLarge {
                    view: self.view.clone(),
                    version: self.version,
                    key: change.key.clone(),
                    position: self.input_position(records[0].offset),
                    bytes,
                    max: VIEW_VALUE_BYTES_MAX,
                });
            }
        }
        Ok(())
    }

    /// The pending step's transaction committed: its changes become the state.
    pub fn commit(&mut self) {
        let pending = self.pending.take().expect("commit without a pending step");
        for change in pending.changes {
            self.state.write(change);
        }
        self.position = pending.position;
        self.events_applied = pending.events_applied;
        self.applier.trim(CACHE_ENTRIES_MAX);
    }

    /// The pending step's transaction failed: forget it (the cache holds its values).
    pub fn abort(&mut self) {
        self.pending = None;
        self.applier.discard();
    }

    fn dead_letter(&self, record: &InputRecord, error: &EventError) -> OutputRecord {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = record
            .headers
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.as_ref().map(|v| v.to_vec())))
            .collect();
        let source = format!("{}/{}/{}", self.topic, self.partition, record.offset);
        headers.push(("kappa.dlq.source".to_owned(), Some(source.into_bytes())));
        headers.push(("kappa.dlq.view".to_owned(), Some(format!("{}.v{}", self.view, self.version).into_bytes())));
        headers.push(("kappa.dlq.reason".to_owned(), Some(error.0.clone().into_bytes())));
        OutputRecord {
            timestamp: record.timestamp,
            key: record.key.as_ref().map(|k| k.to_vec()).unwrap_or_default(),
            value: record.value.as_ref().map(|v| v.to_vec()),
            headers,
        }
    }

    fn failed(&self, offset: i64, error: EventError) -> ViewError {
        ViewError::EventFailed {
            view: self.view.clone(),
            version: self.version,
            position: InputPosition { topic: self.topic.to_string(), partition: self.partition, offset },
            reason: error.0,
        }
    }

    fn changelog_error(&self, reason: String) -> ViewError {
        ViewError::Changelog {
            view: self.view.clone(),
            version: self.version,
            reason: format!("changelog partition {}: {reason}", self.partition),
        }
    }
}

/// Stage 1's view of the state: internal keys (committed, then this step's), recording the
/// values read; view keys absent, recording which were read.
struct SourceRead<'a> {
    committed: &'a HashMap<String, Vec<u8>>,
    overlay: &'a HashMap<String, Option<Vec<u8>>>,
    internal_reads: RefCell<BTreeMap<String, Option<Vec<u8>>>>,
    view_keys: RefCell<BTreeSet<String>>,
}

impl StoreRead for SourceRead<'_> {
    fn get(&self, scope: Scope, key: &str) -> Result<Option<Vec<u8>>, EventError> {
        match scope {
            Scope::Internal => {
                let value = match self.overlay.get(key) {
                    Some(value) => value.clone(),
                    None => self.committed.get(key).cloned(),
                };
                self.internal_reads.borrow_mut().entry(key.to_owned()).or_insert_with(|| value.clone());
                Ok(value)
            }
            Scope::View => {
                self.view_keys.borrow_mut().insert(key.to_owned());
                Ok(None)
            }
        }
    }
}

/// Stage 2's view of the state: the internal values stage 1 read; this partition's view keys
/// (committed, then this step's); other view keys absent.
struct SinkRead<'a> {
    committed: &'a HashMap<String, Vec<u8>>,
    overlay: &'a HashMap<String, Option<Vec<u8>>>,
    internal: &'a HashMap<String, Option<Vec<u8>>>,
    partition: i32,
    partitions: i32,
    view_keys: RefCell<BTreeSet<String>>,
    missing_internal: RefCell<Option<String>>,
}

impl StoreRead for SinkRead<'_> {
    fn get(&self, scope: Scope, key: &str) -> Result<Option<Vec<u8>>, EventError> {
        match scope {
            Scope::Internal => match self.internal.get(key) {
                Some(value) => Ok(value.clone()),
                None => {
                    self.missing_internal.borrow_mut().get_or_insert_with(|| key.to_owned());
                    Ok(None)
                }
            },
            Scope::View => {
                self.view_keys.borrow_mut().insert(key.to_owned());
                if key_partition(key.as_bytes(), self.partitions) != self.partition {
                    return Ok(None);
                }
                Ok(match self.overlay.get(key) {
                    Some(value) => value.clone(),
                    None => self.committed.get(key).cloned(),
                })
            }
        }
    }
}

/// A step's accumulated changes, in a deterministic order.
fn overlay_changes(overlay: HashMap<String, Option<Vec<u8>>>, scope: Scope) -> Vec<Change> {
    let mut changes: Vec<Change> = overlay.into_iter().map(|(key, value)| Change { scope, key, value }).collect();
    changes.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    changes
}

/// (key, optional value) pairs as bytes: per entry a u32 key length, the key, an i32 value
/// length (-1: none) and the value; big-endian.
fn encode_entries<'a>(entries: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in entries {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        match value {
            Some(value) => {
                out.extend_from_slice(&(value.len() as i32).to_be_bytes());
                out.extend_from_slice(value);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out
}

fn decode_entries(mut bytes: &[u8]) -> Option<Vec<(String, Option<Vec<u8>>)>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(take(&mut bytes, len)?).ok()?.to_owned();
        let len = i32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        let value = if len < 0 { None } else { Some(take(&mut bytes, len as usize)?.to_vec()) };
        out.push((key, value));
    }
    Some(out)
}

/// Decodes, upcasts and applies one record on an empty cache: its timestamp and the
/// changes it made (the cache is left empty again either way).
fn apply_alone(
    applier: &mut dyn Applier,
    schemas: &Schemas,
    codec: &dyn PayloadCodec,
    (topic, partition): (&Arc<str>, i32),
    record: &InputRecord,
    read: &dyn StoreRead,
) -> std::result::Result<(i64, Vec<Change>), EventError> {
    let outcome =
        decode_event(topic, partition, record.clone(), codec).and_then(|e| schemas.upcast(e)).and_then(|event| {
            applier.apply(&event, read)?;
            Ok((event.timestamp, applier.take_changes()?))
        });
    applier.discard();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let entries = vec![("a".to_owned(), Some(b"1".to_vec())), ("b".to_owned(), None)];
        let bytes = encode_entries(entries.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
        assert_eq!(decode_entries(&bytes), Some(entries));
        assert_eq!(decode_entries(&bytes[..bytes.len() - 1]), None);
    }
}
