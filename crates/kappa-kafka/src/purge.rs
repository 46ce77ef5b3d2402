//! Purging repartition topics: once stage 2 has committed its offset on a repartition
//! partition, the records before it are never read again (stage 2 restores from its
//! changelog, a new view version gets its own repartition topic), so they are deleted with
//! DeleteRecords every `repartition_purge_interval` — Kafka Streams'
//! `repartition.purge.interval.ms`. Without it a repartition topic (`retention.ms=-1`, so a
//! stopped stage 2 loses nothing) would grow for ever.
//!
//! Housekeeping only: a failed purge is logged and retried at the next interval with the
//! newer offsets; it never stops the worker.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
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
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Handle,
    interval: Duration,
    state: Mutex<State>,
}

struct State {
    /// (repartition topic, partition) → the offset stage 2 committed last.
    committed: BTreeMap<(String, i32), i64>,
    last_purge: Instant,
}

impl Purger {
    pub fn new(config: &WorkConfig, runtime: tokio::runtime::Handle) -> Result<Self> {
        let admin = config.admin().create().map_err(kafka("admin client for purging repartition topics"))?;
        let state = State { committed: BTreeMap::new(), last_purge: Instant::now() };
        Ok(Self { admin, runtime, interval: config.repartition_purge_interval, state: Mutex::new(state) })
    }

    /// Stage 2 committed `offset` on a repartition partition: what is before it may go.
    pub fn committed(&self, topic: &str, partition: i32, offset: i64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.committed.insert((topic.to_owned(), partition), offset);
    }

    /// Deletes what stage 2 committed since the last purge, if the interval has passed.
    pub fn maybe_purge(&self, metrics: &Metrics) {
        let due = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.committed.is_empty() || state.last_purge.elapsed() < self.interval {
                return;
            }
            state.last_purge = Instant::now();
            std::mem::take(&mut state.committed)
        };
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in &due {
            if let Err(e) = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(topic, partition, offset, error = %e, "purge: bad offset");
            }
        }
        let options = AdminOptions::new().request_timeout(Some(PURGE_TIMEOUT)).operation_timeout(Some(PURGE_TIMEOUT));
        match self.runtime.block_on(self.admin.delete_records(&offsets, &options)) {
            Ok(result) => {
                for element in result.elements() {
                    match element.error() {
                        Ok(()) => {
                            metrics.repartition_purges.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(topic = element.topic(), partition = element.partition(), low_watermark = ?element.offset(), "purged repartition records");
                        }
                        Err(e) => {
                            tracing::warn!(topic = element.topic(), partition = element.partition(), error = %e, "purging repartition records failed; retrying at the next interval")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "purging repartition topics failed; retrying at the next interval"),
        }
    }
}
