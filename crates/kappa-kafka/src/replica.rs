//! The read replica: every worker folds *every* partition of the served views' changelogs
//! (read_committed) into memory, so HTTP reads and subscriptions work on any worker for any
//! key without knowing who owns it. Reads lag the owner by the replica's tail latency and
//! never show an aborted step.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use kappa_http::live::{SNAPSHOT_BYTES_MAX, snapshot_bytes};
use kappa_views::{ScanLimit, changelog};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::broadcast;

use crate::config::WorkConfig;
use crate::error::{Result, kafka};
use crate::metrics::Metrics;

/// Changes queued for subscribers before a slow one must resume from the history.
pub const REPLICA_BROADCAST_MAX: usize = 65_536;
/// Recent changes (all views) kept so a subscription can resume after a disconnect or after
/// falling behind; one older than this gets `reset` and a fresh snapshot.
pub const REPLICA_HISTORY_MAX: usize = 200_000;
/// How long the replica waits for a changelog partition's end offset at start.
const REPLICA_WATERMARKS_TIMEOUT: Duration = Duration::from_secs(30);

/// A view key's latest value and where it came from.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub partition: i32,
    pub offset: i64,
    pub value: Bytes,
}

/// One change as subscribers see it.
#[derive(Debug, Clone)]
pub struct ReplicaChange {
    pub view: Arc<str>,
    pub key: String,
    pub partition: i32,
    pub offset: i64,
    /// None: the key was deleted.
    pub value: Option<Bytes>,
}

/// A subscription's position: per changelog partition, the offset before which every
/// change has been sent (or was in the snapshot). As a token: `<version>.<o0>_<o1>_...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub version: u32,
    pub offsets: Vec<i64>,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.", self.version)?;
        for (i, offset) in self.offsets.iter().enumerate() {
            if i > 0 {
                f.write_str("_")?;
            }
            write!(f, "{offset}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{text}' is not a work-mode resume token (\"<version>.<offset>_<offset>...\", one offset per changelog partition, from a snapshot or change)"
            )
        };
        let (version, offsets) = text.split_once('.').ok_or_else(bad)?;
        let version = version.parse().map_err(|_| bad())?;
        let offsets = offsets.split('_').map(|o| o.parse::<i64>().map_err(|_| bad())).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { version, offsets })
    }
}

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Key(String),
    Prefix(String),
}

impl Target {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            Target::Key(k) => k == key,
            Target::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// How a subscription starts.
pub enum Start {
    /// The target's keys now, consistent with `cursor`.
    Snapshot { items: Vec<(String, KeyEntry)>, cursor: Cursor },
    /// The target's changes after the resume token, from the history, in replica order.
    Resume { replay: Vec<Arc<ReplicaChange>>, cursor: Cursor },
    /// The token cannot be resumed: send `reset`, then start with a snapshot.
    Reset { reason: String },
}

struct ViewState {
    version: u32,
    keys: BTreeMap<String, KeyEntry>,
    /// Per changelog partition: the next offset to read (everything before is applied).
    positions: Vec<i64>,
    /// Per partition: every change at or after this offset is in the history. At least the
    /// partition's end when the replica started: before it, compaction may have removed
    /// superseded changes and tombstones, so a replay from there would not be exact.
    floors: Vec<i64>,
}

struct Inner {
    views: BTreeMap<String, ViewState>,
    history: VecDeque<Arc<ReplicaChange>>,
}

pub struct Replica {
    inner: RwLock<Inner>,
    changes: broadcast::Sender<Arc<ReplicaChange>>,
}

impl Replica {
    /// (view, version, changelog partitions) of every served view.
    pub fn new(views: impl IntoIterator<Item = (String, u32, i32)>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(REPLICA_BROADCAST_MAX);
        let views = views
            .into_iter()
            .map(|(view, version, partitions)| {
                let n = partitions.max(0) as usize;
                (view, ViewState { version, keys: BTreeMap::new(), positions: vec![0; n], floors: vec![0; n] })
            })
            .collect();
        Arc::new(Self { inner: RwLock::new(Inner { views, history: VecDeque::new() }), changes })
    }

    pub fn has_view(&self, view: &str) -> bool {
        self.read().views.contains_key(view)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, view: &str, key: &str) -> Option<KeyEntry> {
        self.read().views.get(view).and_then(|v| v.keys.get(key).cloned())
    }

    /// Keys starting with `prefix`, after `after`, up to `limit`; the bool says the scan
    /// stopped at the limit (more keys may follow).
    pub fn scan(
        &self,
        view: &str,
        prefix: &str,
        after: Option<&str>,
        limit: ScanLimit,
    ) -> (Vec<(String, KeyEntry)>, bool) {
        let inner = self.read();
        let Some(state) = inner.views.get(view) else { return (Vec::new(), false) };
        scan_keys(&state.keys, prefix, after, limit)
    }

    /// Err (why) when a snapshot of `target` would hold more than `snapshot_max` keys or
    /// [`SNAPSHOT_BYTES_MAX`]: what [`Self::start`] refuses, checked before an SSE stream
    /// answers 200.
    pub fn check_snapshot(&self, view: &str, target: &Target, snapshot_max: usize) -> Result<(), String> {
        // One key's value (at most VIEW_VALUE_BYTES_MAX) is always under the byte limit.
        let Target::Prefix(prefix) = target else { return Ok(()) };
        check_snapshot_items(prefix, &self.scan(view, prefix, None, snapshot_scan_limit(snapshot_max)).0, snapshot_max)
    }

    /// How a subscription starts, and a receiver of every later change with no gap between
    /// them (both taken under the lock the writer holds while it applies and sends).
    /// Err: the snapshot would hold more than `snapshot_max` keys or [`SNAPSHOT_BYTES_MAX`].
    pub fn start(
        &self,
        view: &str,
        target: &Target,
        resume: Option<&Cursor>,
        snapshot_max: usize,
    ) -> Result<(Start, broadcast::Receiver<Arc<ReplicaChange>>), String> {
        let inner = self.read();
        let state = inner.views.get(view).ok_or_else(|| format!("this worker serves no view named '{view}'"))?;
        let receiver = self.changes.subscribe();
        let current = Cursor { version: state.version, offsets: state.positions.clone() };
        if let Some(token) = resume {
            let start = if token.version != state.version {
                Start::Reset {
                    reason: format!(
                        "version {} serves now (the token is from version {})",
                        state.version, token.version
                    ),
                }
            } else if token.offsets.len() != state.positions.len() {
                Start::Reset {
                    reason: format!(
                        "the token has {} partitions; the changelog has {}",
                        token.offsets.len(),
                        state.positions.len()
                    ),
                }
            } else if token.offsets.iter().zip(&state.floors).any(|(t, floor)| t < floor) {
                Start::Reset {
                    reason: format!(
                        "the token is older than this worker's history of changes (since the worker started, at most {REPLICA_HISTORY_MAX} changes)"
                    ),
                }
            } else if token.offsets.iter().zip(&state.positions).any(|(t, end)| t > end) {
                Start::Reset {
                    reason: "the token is ahead of this worker's replica (from another worker, further along)"
                        .to_owned(),
                }
            } else {
                let replay = inner
                    .history
                    .iter()
                    .filter(|c| {
                        *c.view == *view && c.offset >= token.offsets[c.partition as usize] && target.matches(&c.key)
                    })
                    .cloned()
                    .collect();
                let mut cursor = token.clone();
                for (p, end) in state.positions.iter().enumerate() {
                    cursor.offsets[p] = cursor.offsets[p].max(*end);
                }
                // The replayed changes carry their own cursors; `cursor` is where they end.
                Start::Resume { replay, cursor }
            };
            return Ok((start, receiver));
        }
        let items = match target {
            Target::Key(key) => state.keys.get(key).map(|e| vec![(key.clone(), e.clone())]).unwrap_or_default(),
            Target::Prefix(prefix) => {
                let (items, _) = scan_keys(&state.keys, prefix, None, snapshot_scan_limit(snapshot_max));
                check_snapshot_items(prefix, &items, snapshot_max)?;
                items
            }
        };
        Ok((Start::Snapshot { items, cursor: current }, receiver))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn apply(&self, view: &Arc<str>, partition: i32, offset: i64, key: String, value: Option<Bytes>) {
        let mut inner = self.write();
        let Inner { views, history } = &mut *inner;
        let Some(state) = views.get_mut(&**view) else { return };
        let p = partition as usize;
        if p >= state.positions.len() || offset < state.positions[p] {
            return;
        }
        state.positions[p] = offset + 1;
        match &value {
            Some(value) => {
                state.keys.insert(key.clone(), KeyEntry { partition, offset, value: value.clone() });
            }
            None => {
                state.keys.remove(&key);
            }
        }
        let change = Arc::new(ReplicaChange { view: view.clone(), key, partition, offset, value });
        history.push_back(change.clone());
        if history.len() > REPLICA_HISTORY_MAX
            && let Some(old) = history.pop_front()
            && let Some(state) = views.get_mut(&*old.view)
        {
            let floor = &mut state.floors[old.partition as usize];
            *floor = (*floor).max(old.offset + 1);
        }
        let _ = self.changes.send(change);
    }

    /// Changes of `view`'s changelog `partition` before `offset` may be incomplete (read
    /// from its compacted part): tokens before it get `reset` and a snapshot.
    pub fn history_starts_at(&self, view: &str, partition: i32, offset: i64) {
        let mut inner = self.write();
        if let Some(state) = inner.views.get_mut(view)
            && let Some(floor) = state.floors.get_mut(partition as usize)
        {
            *floor = (*floor).max(offset);
        }
    }

    /// A record that is not a view change (a step marker, an internal key) was read.
    fn advance(&self, view: &str, partition: i32, offset: i64) {
        let mut inner = self.write();
        if let Some(state) = inner.views.get_mut(view)
            && let Some(position) = state.positions.get_mut(partition as usize)
        {
            *position = (*position).max(offset + 1);
        }
    }
}

fn scan_keys(
    keys: &BTreeMap<String, KeyEntry>,
    prefix: &str,
    after: Option<&str>,
    limit: ScanLimit,
) -> (Vec<(String, KeyEntry)>, bool) {
    let start = after.filter(|a| *a >= prefix).unwrap_or(prefix).to_owned();
    let matching = keys
        .range(start..)
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
        .take_while(|(k, _)| k.starts_with(prefix));
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for (key, entry) in matching {
        bytes += key.len() + entry.value.len();
        out.push((key.clone(), entry.clone()));
        if limit.reached(out.len(), bytes) {
            return (out, true);
        }
    }
    (out, false)
}

/// A snapshot's scan, as `serve`'s: one key past `snapshot_max` to tell there are more, and
/// it stops once keys and values pass [`SNAPSHOT_BYTES_MAX`].
fn snapshot_scan_limit(snapshot_max: usize) -> ScanLimit {
    ScanLimit { items: snapshot_max + 1, bytes: SNAPSHOT_BYTES_MAX }
}

/// Tails every partition of the changelogs (changelog topic → view name) until `stop`.
pub fn run_replica(
    config: &WorkConfig,
    changelogs: &[(String, String, i32)],
    replica: &Replica,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<()> {
    let consumer: BaseConsumer = config.changelog_reader(false).create().map_err(kafka("replica consumer"))?;
    let mut assignment = TopicPartitionList::new();
    let mut names: BTreeMap<String, Arc<str>> = BTreeMap::new();
    for (topic, view, partitions) in changelogs {
        names.insert(topic.clone(), Arc::from(view.as_str()));
        for partition in 0..*partitions {
            // The high watermark, not the read_committed end: at least as far, so at worst a
            // few more tokens get a snapshot.
            let (_, end) = consumer
                .fetch_watermarks(topic, partition, REPLICA_WATERMARKS_TIMEOUT)
                .map_err(kafka(format!("end offset of {topic}/{partition}")))?;
            replica.history_starts_at(view, partition, end);
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(kafka("replica assignment"))?;
        }
    }
    consumer.assign(&assignment).map_err(kafka("replica assign"))?;
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                metrics.replica_records.fetch_add(1, Ordering::Relaxed);
                let Some(view) = names.get(message.topic()) else { continue };
                let (partition, offset) = (message.partition(), message.offset());
                // Straight from the borrowed message: a view key is UTF-8 bytes; markers
                // (0xFF) and internal keys (0xFE) only advance the position.
                match message.key() {
                    Some(key)
                        if !key.starts_with(&[changelog::INTERNAL_KEY_PREFIX]) && key != changelog::MARKER_KEY =>
                    {
                        match std::str::from_utf8(key) {
                            Ok(key) => {
                                let value = message.payload().map(Bytes::copy_from_slice);
                                replica.apply(view, partition, offset, key.to_owned(), value);
                            }
                            Err(_) => {
                                tracing::warn!(view = %view, partition, offset, "changelog key is not UTF-8: skipped by the read replica");
                                replica.advance(view, partition, offset);
                            }
                        }
                    }
                    _ => replica.advance(view, partition, offset),
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "replica consumer"),
            None => {}
        }
    }
    Ok(())
}

/// A snapshot item's frame besides its key and value: its position and JSON punctuation
/// (`{"key":,"value":,"position":"<partition>.<offset>"},`), rounded up.
const SNAPSHOT_ITEM_OVERHEAD_BYTES: usize = 64;

/// Err (why) when `items` (scanned up to `snapshot_max` + 1) are too many for one snapshot,
/// or too large for one message: a WebSocket refuses a frame over 16 MiB by closing the
/// connection with every subscription on it.
fn check_snapshot_items(prefix: &str, items: &[(String, KeyEntry)], snapshot_max: usize) -> Result<(), String> {
    if items.len() > snapshot_max {
        return Err(format!(
            "prefix '{prefix}' matches more than {snapshot_max} keys (the snapshot limit); subscribe to a longer prefix"
        ));
    }
    let sizes = items.iter().map(|(key, entry)| (key.as_str(), entry.value.len()));
    let bytes = snapshot_bytes(sizes, SNAPSHOT_ITEM_OVERHEAD_BYTES);
    if bytes > SNAPSHOT_BYTES_MAX {
        return Err(format!(
            "the snapshot of prefix '{prefix}' would take {bytes} bytes; a snapshot may take at most {SNAPSHOT_BYTES_MAX} bytes (SNAPSHOT_BYTES_MAX, a fixed limit: it is sent as one message); subscribe to a longer prefix"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Cursor, KeyEntry, Replica, SNAPSHOT_BYTES_MAX, Start, Target, check_snapshot_items};

    fn resume(replica: &Replica, offsets: Vec<i64>) -> Start {
        let token = Cursor { version: 1, offsets };
        replica.start("v", &Target::Prefix(String::new()), Some(&token), 100).expect("start").0
    }

    #[test]
    fn tokens_from_before_the_replica_started_get_a_snapshot() {
        let replica = Replica::new([("v".to_owned(), 1, 1)]);
        // The changelog ended at 10 when the replica started; 0..10 is its compacted part.
        replica.history_starts_at("v", 0, 10);
        let view: std::sync::Arc<str> = "v".into();
        for offset in [3, 7, 12] {
            replica.apply(&view, 0, offset, format!("k{offset}"), Some("1".into()));
        }
        assert!(matches!(resume(&replica, vec![4]), Start::Reset { .. }), "a token inside the compacted part");
        let Start::Resume { replay, .. } = resume(&replica, vec![10]) else { panic!("a token at the start end") };
        assert_eq!(replay.iter().map(|c| c.offset).collect::<Vec<_>>(), [12]);
    }

    /// A snapshot is limited by the bytes it is sent as: a control character in a key
    /// takes six bytes as JSON (`\u0001`), so keys that fit by their raw length may not.
    #[test]
    fn snapshot_bytes_count_keys_as_json() {
        // 100 keys of 40,000 bytes: 4 MB raw, 24 MB escaped; the limit is 8 MiB.
        let items = |filler: char| -> Vec<(String, KeyEntry)> {
            (0..100)
                .map(|i| {
                    let key = format!("{i:03}{}", String::from(filler).repeat(40_000 - 3));
                    (key, KeyEntry { partition: 0, offset: i, value: "1".into() })
                })
                .collect()
        };
        check_snapshot_items("", &items('a'), usize::MAX).expect("plain keys under the limit");
        let refused = check_snapshot_items("", &items('\u{1}'), usize::MAX).expect_err("escaped keys over it");
        assert!(refused.contains(&format!("at most {SNAPSHOT_BYTES_MAX} bytes")), "{refused}");
    }
}
