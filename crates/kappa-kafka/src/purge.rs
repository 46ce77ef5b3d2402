//! Purging repartition topics: once stage 2 has committed its offset on a repartition
//! partition, the records before it are never read again (stage 2 restores from its
//! changelog, a new view version gets its own repartition topic), so they are deleted with
//! DeleteRecords every `repartition_purge_interval` — Kafka Streams'
//! `repartition.purge.interval.ms`. Without it a repartition topic (`retention.ms=-1`, so a
//! stopped stage 2 loses nothing) would grow for ever.
//!
//! Housekeeping only: a purge runs on the async runtime, never on the group thread (a slow
//! cluster must not hold back steps), one at a time; a failed one is logged and retried at
//! the next interval with the newer offsets; it never stops the worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::WorkConfig;
use crate::error::{Result, kafka};
use crate::metrics::Metrics;

/// How long one DeleteRecords request may take.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Purger {
    admin: Arc<AdminClient<DefaultClientContext>>,
    runtime: tokio::runtime::Handle,
    interval: Duration,
    state: Arc<Mutex<State>>,
    /// A purge is running; the next waits for it.
    in_flight: Arc<AtomicBool>,
}

struct State {
    /// (repartition topic, partition) → the offset stage 2 committed last, not purged yet.
    committed: BTreeMap<(String, i32), i64>,
    /// When the last purge started (the worker's start before the first): purges are at
    /// least one interval apart, the first one interval after start.
    last_purge: Instant,
}

impl State {
    /// Records `offset` unless a later one is already waiting.
    fn offer(&mut self, topic: &str, partition: i32, offset: i64) {
        let slot = self.committed.entry((topic.to_owned(), partition)).or_insert(offset);
        *slot = (*slot).max(offset);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Purger {
    pub fn new(config: &WorkConfig, runtime: tokio::runtime::Handle) -> Result<Self> {
        let admin = config.admin().create().map_err(kafka("admin client for purging repartition topics"))?;
        Ok(Self {
            admin: Arc::new(admin),
            runtime,
            interval: config.repartition_purge_interval,
            state: Arc::new(Mutex::new(State { committed: BTreeMap::new(), last_purge: Instant::now() })),
            in_flight: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Stage 2 committed `offset` on a repartition partition: what is before it may go.
    pub fn committed(&self, topic: &str, partition: i32, offset: i64) {
        lock(&self.state).offer(topic, partition, offset);
    }

    /// Starts deleting what stage 2 committed since the last purge, if the interval has
    /// passed and no purge is running.
    pub fn maybe_purge(&self, metrics: &Arc<Metrics>) {
        let due = {
            let mut state = lock(&self.state);
            let waited = state.last_purge.elapsed() >= self.interval;
            if state.committed.is_empty() || !waited || self.in_flight.swap(true, Ordering::AcqRel) {
                return;
            }
            state.last_purge = Instant::now();
            std::mem::take(&mut state.committed)
        };
        let (admin, state, in_flight, metrics) =
            (self.admin.clone(), self.state.clone(), self.in_flight.clone(), metrics.clone());
        self.runtime.spawn(async move {
            for ((topic, partition), offset) in purge(&admin, &due, &metrics).await {
                lock(&state).offer(&topic, partition, offset);
            }
            in_flight.store(false, Ordering::Release);
        });
    }
}

/// One DeleteRecords request for every partition in `due`; returns the ones that failed.
async fn purge(
    admin: &AdminClient<DefaultClientContext>,
    due: &BTreeMap<(String, i32), i64>,
    metrics: &Metrics,
) -> Vec<((String, i32), i64)> {
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), offset) in due {
        if let Err(e) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(topic, partition, offset, error = %e, "purge: bad offset");
        }
    }
    let options = AdminOptions::new().request_timeout(Some(PURGE_TIMEOUT)).operation_timeout(Some(PURGE_TIMEOUT));
    match admin.delete_records(&offsets, &options).await {
        Ok(result) => {
            let mut failed = Vec::new();
            for element in result.elements() {
                let key = (element.topic().to_owned(), element.partition());
                match element.error() {
                    Ok(()) => {
                        metrics.repartition_purges.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(topic = element.topic(), partition = element.partition(), low_watermark = ?element.offset(), "purged repartition records");
                    }
                    Err(e) => {
                        tracing::warn!(topic = element.topic(), partition = element.partition(), error = %e, "purging repartition records failed; retrying at the next interval");
                        if let Some(offset) = due.get(&key) {
                            failed.push((key, *offset));
                        }
                    }
                }
            }
            failed
        }
        Err(e) => {
            tracing::warn!(error = %e, "purging repartition topics failed; retrying at the next interval");
            due.iter().map(|(key, offset)| (key.clone(), *offset)).collect()
        }
    }
}
