//! Reading a changelog partition from its beginning to its end (read_committed), for the
//! restore on assignment; and the message → `InputRecord` conversion every reader uses.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kappa_views::PartitionView;
use kappa_views::backend::InputRecord;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::WorkConfig;
use crate::error::{Result, WorkError, kafka};
use crate::metrics::Metrics;

/// How often restore progress is logged.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// A restore that receives nothing for this long while not at the end fails (the broker
/// is unreachable or a transaction stays open).
const RESTORE_STALL_MAX: Duration = Duration::from_secs(120);
/// Keys a restore reserves room for up front, at most.
const RESTORE_RESERVE_KEYS_MAX: usize = 4_000_000;

/// A consumed message as the view engine's record type.
pub fn input_record(message: &BorrowedMessage<'_>) -> InputRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (Bytes::copy_from_slice(h.key.as_bytes()), h.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default();
    InputRecord {
        offset: message.offset(),
        timestamp: message.timestamp().to_millis().unwrap_or(0),
        key: message.key().map(Bytes::copy_from_slice),
        value: message.payload().map(Bytes::copy_from_slice),
        headers,
    }
}

/// What one restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    pub records: u64,
    pub elapsed: Duration,
}

/// Replays `changelog`/`partition` into `view` from the beginning to the end. The caller
/// fenced the partition's previous owner first, so no transaction is left open on it and
/// the read_committed end is the true end.
pub fn restore(
    config: &WorkConfig,
    changelog: &str,
    partition: i32,
    view: &mut PartitionView,
    metrics: &Metrics,
) -> Result<Restored> {
    let consumer: BaseConsumer = config.changelog_reader(true).create().map_err(kafka("restore consumer"))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(changelog, partition, Offset::Beginning).map_err(kafka("restore assignment"))?;
    let started = Instant::now();
    let (low, high) = consumer
        .fetch_watermarks(changelog, partition, RESTORE_STALL_MAX)
        .map_err(kafka(format!("watermarks of {changelog}/{partition}")))?;
    if low >= high {
        // Empty: no fetch needed (a fetch would wait for data before reporting the end).
        return Ok(Restored { records: 0, elapsed: started.elapsed() });
    }
    consumer.assign(&assignment).map_err(kafka(format!("assign {changelog}/{partition}")))?;
    // An upper bound of the keys (compaction only lowers it), capped: no huge reservation
    // from a long uncompacted history.
    view.reserve(((high - low) as usize).min(RESTORE_RESERVE_KEYS_MAX));
    let mut last_progress = started;
    let mut last_record = started;
    let mut records = 0u64;
    let mut counted = 0u64;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                view.restore_parts(message.offset(), message.key(), message.payload())?;
                records += 1;
                // The clock and the shared counter every 4096 records: per record they cost
                // ~6% of a restore's CPU (perf).
                if records - counted >= 4096 {
                    last_record = Instant::now();
                    metrics.restored_records.fetch_add(records - counted, std::sync::atomic::Ordering::Relaxed);
                    counted = records;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => {
                return Err(WorkError::Restore { topic: changelog.to_owned(), partition, reason: e.to_string() });
            }
            None if records == counted && last_record.elapsed() > RESTORE_STALL_MAX => {
                return Err(WorkError::Restore {
                    topic: changelog.to_owned(),
                    partition,
                    reason: format!("nothing read for {RESTORE_STALL_MAX:?} before the end of the partition"),
                });
            }
            None => {
                // Records since the last count were received: not stalled.
                if records != counted {
                    metrics.restored_records.fetch_add(records - counted, std::sync::atomic::Ordering::Relaxed);
                    counted = records;
                    last_record = Instant::now();
                }
            }
        }
        if records.is_multiple_of(4096) && last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            tracing::info!(
                changelog,
                partition,
                records,
                rate_per_second = rate(records, started.elapsed()),
                "restoring view state"
            );
        }
    }
    metrics.restored_records.fetch_add(records - counted, std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed();
    tracing::info!(
        changelog,
        partition,
        records,
        elapsed_ms = elapsed.as_millis() as u64,
        rate_per_second = rate(records, elapsed),
        position = view.position(),
        "restored view state"
    );
    Ok(Restored { records, elapsed })
}

fn rate(records: u64, elapsed: Duration) -> u64 {
    (records as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}
