//! The read replica: every worker folds *every* partition of the served views' changelogs
//! (read_committed) into memory, so HTTP reads and subscriptions work on any worker for any
//! key without knowing who owns it. Reads lag the owner by the replica's tail latency and
//! never show an aborted step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use kappa_views::changelog::{self, Entry};
use kappa_views::store::Scope;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::broadcast;

use crate::config::WorkConfig;
use crate::error::{Result, kafka};
use crate::metrics::Metrics;
use crate::restore::input_record;

/// Changes queued for subscribers; a subscriber further behind is told to reset.
pub const REPLICA_BROADCAST_MAX: usize = 65_536;

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

pub struct Replica {
    views: RwLock<BTreeMap<String, BTreeMap<String, KeyEntry>>>,
    changes: broadcast::Sender<Arc<ReplicaChange>>,
}

impl Replica {
    pub fn new(views: impl IntoIterator<Item = String>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(REPLICA_BROADCAST_MAX);
        Arc::new(Self { views: RwLock::new(views.into_iter().map(|v| (v, BTreeMap::new())).collect()), changes })
    }

    pub fn has_view(&self, view: &str) -> bool {
        self.read().contains_key(view)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<String, KeyEntry>>> {
        self.views.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, view: &str, key: &str) -> Option<KeyEntry> {
        self.read().get(view).and_then(|keys| keys.get(key).cloned())
    }

    /// Up to `limit` keys starting with `prefix`, after `after`.
    pub fn scan(&self, view: &str, prefix: &str, after: Option<&str>, limit: usize) -> Vec<(String, KeyEntry)> {
        let views = self.read();
        let Some(keys) = views.get(view) else { return Vec::new() };
        let start = after.filter(|a| *a >= prefix).unwrap_or(prefix).to_owned();
        keys.range(start..)
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// The key's current entry and a receiver of every later change, with no gap between
    /// them (both taken under the lock the writer holds while it applies and sends).
    pub fn subscribe(&self, view: &str, key: &str) -> (Option<KeyEntry>, broadcast::Receiver<Arc<ReplicaChange>>) {
        let views = self.read();
        let entry = views.get(view).and_then(|keys| keys.get(key).cloned());
        (entry, self.changes.subscribe())
    }

    fn apply(&self, view: &Arc<str>, partition: i32, offset: i64, key: String, value: Option<Bytes>) {
        let mut views = self.views.write().unwrap_or_else(|e| e.into_inner());
        let Some(keys) = views.get_mut(&**view) else { return };
        match &value {
            Some(value) => {
                keys.insert(key.clone(), KeyEntry { partition, offset, value: value.clone() });
            }
            None => {
                keys.remove(&key);
            }
        }
        let _ = self.changes.send(Arc::new(ReplicaChange { view: view.clone(), key, partition, offset, value }));
    }
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
                let Some(view) = names.get(rdkafka::Message::topic(&message)) else { continue };
                let record = input_record(&message);
                match changelog::decode(&record) {
                    Ok(Entry::Change { change, offset, .. }) if change.scope == Scope::View => {
                        let partition = rdkafka::Message::partition(&message);
                        replica.apply(view, partition, offset, change.key, change.value.map(Bytes::from));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(view = %view, offset = record.offset, error = %e, "undecodable changelog record skipped by the read replica")
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "replica consumer"),
            None => {}
        }
    }
    Ok(())
}
