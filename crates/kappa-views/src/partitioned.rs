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
//! `owner_channels`, keyed by owner) fails with [`ViewError::NotCoPartitioned`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use hashbrown::HashMap;

use crate::backend::{InputRecord, OutputRecord};
use crate::changelog::{self, Change, Entry, StepMarker};
use crate::error::{EventError, InputPosition, Result, ViewError};
use crate::event::{PayloadCodec, decode_event};
use crate::runner::{CACHE_ENTRIES_MAX, VIEW_VALUE_BYTES_MAX, now_ms, position_key};
use crate::schema::Schemas;
use crate::store::Scope;
use crate::view::{Applier, ErrorPolicy, StoreRead, View};

/// A step's output: what the caller writes in the step's transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// For the view's changelog, partition = the input partition: changes, then the marker.
    pub changelog: Vec<OutputRecord>,
    /// (topic, record) for the view's dead-letter topic (`ErrorPolicy::DeadLetter`).
    pub dead_letters: Vec<(String, OutputRecord)>,
    /// The input offset after the step (what the consumer group commits).
    pub next_offset: i64,
}

/// What folding a step's records produced.
struct Folded {
    dead_letters: Vec<(String, OutputRecord)>,
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
struct MemoryState {
    view: HashMap<String, Vec<u8>>,
    internal: HashMap<String, Vec<u8>>,
}

impl MemoryState {
    fn map(&mut self, scope: Scope) -> &mut HashMap<String, Vec<u8>> {
        match scope {
            Scope::View => &mut self.view,
            Scope::Internal => &mut self.internal,
        }
    }

    fn write(&mut self, change: Change) {
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
        view.validate()?;
        if view.inputs != [topic] {
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
        })
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
            Entry::Step { marker, offset } => {
                let position = marker.positions.get(&self.position_key).copied().ok_or_else(|| {
                    self.changelog_error(format!(
                        "the step marker at offset {offset} has no position for {} (positions {:?}): this changelog partition belongs to another input partition or topic",
                        self.position_key, marker.positions
                    ))
                })?;
                self.position = position;
                self.events_applied = marker.events_applied;
            }
        }
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
        let Folded { dead_letters, applied, timestamp } = self.fold(records)?;
        let changes = self.applier.take_changes().map_err(|e| self.failed(records[0].offset, e))?;
        self.check_changes(records, &changes)?;
        let position = last.offset + 1;
        let events_applied = self.events_applied + applied;
        let marker = StepMarker { positions: BTreeMap::from([(self.position_key.clone(), position)]), events_applied };
        let changelog = changelog::encode_step(&changes, &marker, timestamp.unwrap_or_else(now_ms));
        self.pending = Some(Pending { changes, position, events_applied });
        Ok(Some(Step { changelog, dead_letters, next_offset: position }))
    }

    /// Applies records in order; an event that fails is handled by the error policy after
    /// re-applying, on a clean cache, the records before it (it may have changed keys
    /// before failing).
    fn fold(&mut self, records: &[InputRecord]) -> Result<Folded> {
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
                        match self.on_error.clone() {
                            ErrorPolicy::Stop => return Err(self.failed(record.offset, error)),
                            ErrorPolicy::DeadLetter(topic) => {
                                dead_letters.push((topic, self.dead_letter(record, &error)));
                                skipped.insert(record.offset);
                                continue 'again;
                            }
                        }
                    }
                }
            }
            return Ok(Folded { dead_letters, applied, timestamp });
        }
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
                return Err(ViewError::ValueTooLarge { key: change.key.clone(), bytes, max: VIEW_VALUE_BYTES_MAX });
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
