//! A view version's changelog: a compacted topic `__kappa.view.<name>.v<version>` with one
//! partition. Each processing step appends exactly one batch: one record per changed key,
//! then a step marker holding every input position after the step. The batch is atomic in
//! the log, so a step is in the changelog entirely or not at all; the marker makes the
//! changelog alone enough to rebuild the state store (`runner.rs`).
//!
//! Record keys: a view key is its UTF-8 bytes; a processor-internal key is 0xFE followed by
//! its UTF-8 bytes; the step marker's key is 0xFF "kappa.step". UTF-8 never contains 0xFE
//! or 0xFF, so the three never collide — and compaction keeps the latest of each.

use std::collections::BTreeMap;

use crate::backend::{InputRecord, OutputRecord};
use crate::error::EventError;
use crate::store::Scope;

pub const INTERNAL_KEY_PREFIX: u8 = 0xFE;
pub const MARKER_KEY: &[u8] = b"\xffkappa.step";

/// The changelog topic of a view version.
pub fn topic_name(view: &str, version: u32) -> String {
    format!("__kappa.view.{view}.v{version}")
}

/// One changed key of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub scope: Scope,
    pub key: String,
    /// JSON; None deletes the key.
    pub value: Option<Vec<u8>>,
}

/// What one changelog record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Change {
        offset: i64,
        timestamp: i64,
        change: Change,
    },
    /// The input positions after the step that ends here.
    Step {
        offset: i64,
        marker: StepMarker,
    },
}

/// The value of a step marker.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepMarker {
    /// "topic/partition" → the next input offset to apply.
    pub positions: BTreeMap<String, i64>,
    /// Events applied from the beginning up to here.
    pub events_applied: i64,
    /// Input topic → its topic id (32 hex digits) as the version read it: a version whose
    /// store is gone restores from here and stops if a topic has another id now (deleted
    /// and created again). Empty from a log without topic ids, and in older changelogs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_ids: BTreeMap<String, String>,
}

/// A topic id as step markers hold it: 32 lowercase hex digits.
pub fn topic_id_hex(id: &crate::backend::TopicId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The records of one step: its changes, then its marker.
pub fn encode_step(changes: &[Change], marker: &StepMarker, timestamp: i64) -> Vec<OutputRecord> {
    let mut records = Vec::with_capacity(changes.len() + 1);
    for change in changes {
        let key = match change.scope {
            Scope::View => change.key.as_bytes().to_vec(),
            Scope::Internal => {
                let mut key = Vec::with_capacity(change.key.len() + 1);
                key.push(INTERNAL_KEY_PREFIX);
                key.extend_from_slice(change.key.as_bytes());
                key
            }
        };
        records.push(OutputRecord { timestamp, key, value: change.value.clone(), headers: Vec::new() });
    }
    let marker = serde_json::to_vec(marker).expect("a step marker serializes");
    records.push(OutputRecord { timestamp, key: MARKER_KEY.to_vec(), value: Some(marker), headers: Vec::new() });
    records
}

/// Reads one changelog record back.
pub fn decode(record: &InputRecord) -> Result<Entry, EventError> {
    let key = record.key.as_deref().ok_or_else(|| EventError::new("changelog record without a key"))?;
    if key == MARKER_KEY {
        let value = record.value.as_deref().ok_or_else(|| EventError::new("step marker without a value"))?;
        let marker = serde_json::from_slice(value)?;
        return Ok(Entry::Step { offset: record.offset, marker });
    }
    let (scope, key) = match key.split_first() {
        Some((&INTERNAL_KEY_PREFIX, rest)) => (Scope::Internal, rest),
        _ => (Scope::View, key),
    };
    let key = std::str::from_utf8(key).map_err(|_| EventError::new("changelog key is not UTF-8"))?.to_owned();
    Ok(Entry::Change {
        offset: record.offset,
        timestamp: record.timestamp,
        change: Change { scope, key, value: record.value.as_ref().map(|v| v.to_vec()) },
    })
}
