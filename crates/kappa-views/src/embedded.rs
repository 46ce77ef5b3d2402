//! [`LogBackend`] over kappa's own embedded log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kappa_log::batch;
use kappa_log::records::{BatchBuilder, MIN_RECORD_BYTES, NewRecord, decode_records};
use kappa_log::{Isolation, Log, LogError};

use crate::backend::{InputChunk, InputRecord, LogBackend, OutputRecord, RecordHeaders, TopicId};
use crate::error::{Result, ViewError};

/// Caps decompression of one batch while reading inputs.
const BATCH_UNCOMPRESSED_BYTES_MAX: usize = 128 * 1024 * 1024;

/// The embedded log as a view backend.
#[derive(Clone)]
pub struct EmbeddedLog {
    log: Arc<Log>,
}

impl EmbeddedLog {
    pub fn new(log: Arc<Log>) -> Self {
        Self { log }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }
}

impl LogBackend for EmbeddedLog {
    fn partition_count(&self, topic: &str) -> Result<i32> {
        Ok(self.log.topic(topic)?.partition_count())
    }

    fn topic_id(&self, topic: &str) -> Result<Option<TopicId>> {
        Ok(Some(self.log.topic(topic)?.id()))
    }

    fn read_committed(&self, topic: &str, partition: i32, from: i64, max_bytes: usize) -> Result<InputChunk> {
        let outcome = self.log.partition(topic, partition)?.read(from, max_bytes, Isolation::ReadCommitted)?;
        let scanned_to = outcome.scanned_to;
        let mut chunk = InputChunk {
            records: Vec::new(),
            next_offset: from,
            end_offset: outcome.last_stable_offset,
            open_transaction: false,
            pending_transactions: Vec::new(),
            ended_transactions: Vec::new(),
            transaction_spans: Vec::new(),
            history_gap: false,
            first_missing: None,
        };
        // Producer id → the offset of its transaction's first record in the chunk.
        let mut open: HashMap<i64, i64> = HashMap::new();
        // Offsets [missing_from, missing_to) are not in the read: the first of them no aborted
        // transaction explains was a committed record compaction removed.
        let note_missing = |chunk: &mut InputChunk, mut missing_from: i64, missing_to: i64| {
            while chunk.first_missing.is_none() && missing_from < missing_to {
                match outcome.aborted.iter().find(|a| a.first_offset <= missing_from && missing_from < a.last_offset) {
                    Some(aborted) => missing_from = aborted.last_offset,
                    None => chunk.first_missing = Some(missing_from),
                }
            }
        };
        let mut expected = from;
        let buffer = Bytes::from(outcome.records);
        // Sized once from the batch headers: grown batch by batch, the list (~120 bytes a
        // record, ~800 KB for a 1 MiB read) was copied again at every doubling.
        chunk.records.reserve_exact(records_hint(&buffer, from)?);
        for batch in batch::batches(&buffer) {
            let (header, batch_bytes) = batch.map_err(LogError::from)?;
            let last_offset = header.last_offset();
            if last_offset < from {
                continue;
            }
            note_missing(&mut chunk, expected, header.base_offset);
            // Compaction keeps a batch's offsets but may remove records inside it.
            let cleaned = i64::from(header.records_count) < i64::from(header.last_offset_delta) + 1;
            let mut expected_in_batch = expected.max(header.base_offset);
            expected = last_offset + 1;
            chunk.next_offset = last_offset + 1;
            if header.is_control() {
                if let Some(first) = open.remove(&header.producer_id) {
                    chunk.transaction_spans.push((first, header.base_offset));
                }
                chunk.ended_transactions.push((header.producer_id, header.base_offset));
                continue;
            }
            if header.is_transactional() {
                let aborted = outcome.aborted.iter().any(|a| {
                    a.producer_id == header.producer_id
                        && a.first_offset <= header.base_offset
                        && header.base_offset <= a.last_offset
                });
                if aborted {
                    continue;
                }
                open.entry(header.producer_id).or_insert(header.base_offset.max(from));
            }
            let records = decode_records(batch_bytes, BATCH_UNCOMPRESSED_BYTES_MAX)
                .map_err(|e| LogError::InvalidRecords(e.to_string()))?;
            // Records share one buffer: the read's own bytes, or the decompressed body.
            let body = records.body();
            let shared = if header.compression().map_err(LogError::from)? == kappa_log::batch::Compression::None {
                buffer.slice_ref(body)
            } else {
                Bytes::copy_from_slice(body)
            };
            let base = body.as_ptr() as usize;
            let slice = |part: &[u8]| {
                let start = part.as_ptr() as usize - base;
                shared.slice(start..start + part.len())
            };
            for record in records.iter() {
                if record.offset() < from {
                    continue;
                }
                if cleaned {
                    note_missing(&mut chunk, expected_in_batch, record.offset());
                    expected_in_batch = record.offset() + 1;
                }
                chunk.records.push(InputRecord {
                    offset: record.offset(),
                    timestamp: record.timestamp(),
                    key: record.key.map(slice),
                    value: record.value.map(slice),
                    headers: {
                        let (bytes, count) = record.headers.encoded();
                        RecordHeaders::Encoded { bytes: slice(bytes), count }
                    },
                });
            }
            if cleaned {
                note_missing(&mut chunk, expected_in_batch, last_offset + 1);
            }
        }
        if chunk.next_offset == from && from < chunk.end_offset {
            // No batch where the log looked (it returns at least one when there is one, but
            // looks at a bounded number of segments): compaction removed everything there.
            // Step over that gap only (a reader would otherwise never get past it) and
            // report it.
            let end = scanned_to.min(chunk.end_offset);
            note_missing(&mut chunk, from, end);
            chunk.next_offset = end;
        }
        chunk.history_gap = chunk.first_missing.is_some();
        chunk.open_transaction = !open.is_empty() && chunk.next_offset < chunk.end_offset;
        chunk.pending_transactions = open.into_iter().collect();
        chunk.pending_transactions.sort_unstable();
        Ok(chunk)
    }

    fn start_offset(&self, topic: &str, partition: i32) -> Result<i64> {
        Ok(self.log.partition(topic, partition)?.log_start_offset())
    }

    fn end_offset(&self, topic: &str, partition: i32) -> Result<i64> {
        Ok(self.log.partition(topic, partition)?.last_stable_offset())
    }

    fn offset_for_timestamp(&self, topic: &str, partition: i32, timestamp: i64) -> Result<Option<i64>> {
        let partition = self.log.partition(topic, partition)?;
        Ok(partition.offset_for_timestamp(timestamp, Isolation::ReadCommitted)?.map(|(offset, _)| offset))
    }

    fn wait_for_input(&self, inputs: &[(&str, i32, i64)], timeout: Duration) -> Result<()> {
        let mut watches = Vec::with_capacity(inputs.len());
        for (topic, index, position) in inputs {
            let partition = self.log.partition(topic, *index)?;
            // Subscribe before checking, so an append in between is not missed.
            let watch = partition.watch_high_watermark();
            if partition.last_stable_offset() > *position {
                return Ok(());
            }
            watches.push(watch);
        }
        if watches.is_empty() {
            std::thread::sleep(timeout);
            return Ok(());
        }
        WAITER.with(|runtime| {
            runtime.block_on(async {
                // The futures must live across polls: dropping one unregisters its waker.
                let mut changes: Vec<_> = watches.iter_mut().map(|watch| Box::pin(watch.changed())).collect();
                let any_changed = std::future::poll_fn(|cx| {
                    for changed in changes.iter_mut() {
                        if changed.as_mut().poll(cx).is_ready() {
                            return std::task::Poll::Ready(());
                        }
                    }
                    std::task::Poll::Pending
                });
                let _ = tokio::time::timeout(timeout, any_changed).await;
            })
        });
        Ok(())
    }

    fn ensure_topic(&self, topic: &str, partitions: i32, configs: &BTreeMap<String, String>) -> Result<()> {
        match self.log.topic(topic) {
            Ok(existing) => {
                let count = existing.partition_count();
                let config = existing.config();
                let wants_compact =
                    configs.get(kappa_log::config::CLEANUP_POLICY).is_some_and(|p| p.contains("compact"));
                if count != partitions || (wants_compact && !config.cleanup_policy.compact) {
                    return Err(ViewError::Definition {
                        view: topic.to_owned(),
                        reason: format!(
                            "topic {topic} exists with {count} partitions (compacted: {}), but the view engine needs {partitions} partitions (compacted: {wants_compact}); delete the topic or fix its configuration",
                            config.cleanup_policy.compact
                        ),
                    });
                }
                // A changelog created by an older build may take smaller batches than a step writes.
                let wanted = configs.get(kappa_log::config::MAX_MESSAGE_BYTES);
                if let Some(wanted) = wanted.filter(|w| w.parse::<usize>().is_ok_and(|w| w > config.max_message_bytes))
                {
                    let change =
                        BTreeMap::from([(kappa_log::config::MAX_MESSAGE_BYTES.to_owned(), Some(wanted.clone()))]);
                    self.log.alter_topic_config(topic, &change)?;
                }
                Ok(())
            }
            Err(LogError::UnknownTopic(_)) => match self.log.create_topic(topic, partitions, configs) {
                Ok(_) | Err(LogError::TopicExists(_)) => Ok(()),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn delete_topic(&self, topic: &str) -> Result<()> {
        match self.log.delete_topic(topic) {
            Ok(()) | Err(LogError::UnknownTopic(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn append(&self, topic: &str, partition: i32, records: Vec<OutputRecord>) -> Result<(i64, i64)> {
        let mut builder = BatchBuilder::with_capacity(records.len());
        for record in records {
            builder.push(NewRecord {
                timestamp: record.timestamp,
                key: Some(record.key),
                value: record.value,
                headers: record.headers,
            });
        }
        let outcome = self.log.partition(topic, partition)?.append_unsynced(builder.build())?;
        Ok((outcome.base_offset, outcome.last_offset))
    }

    fn wait_durable(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        Ok(self.log.partition(topic, partition)?.wait_until_durable(offset)?)
    }

    fn make_durable(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        Ok(self.log.partition(topic, partition)?.make_durable(offset)?)
    }

    fn durable_end_offset(&self, topic: &str, partition: i32) -> Result<i64> {
        Ok(self.log.partition(topic, partition)?.high_watermark())
    }
}

/// How many records of `buffer` at or after `from` the chunk may hold: each data batch's
/// count, taken as at most what its bytes can encode (`MIN_RECORD_BYTES` each), so a
/// corrupt count (checked only when the batch is decoded) reserves no more than one
/// `InputRecord` per 7 bytes read. Only a hint for sizing the list: compaction and aborted
/// transactions leave fewer, and a compressed batch may hold more (the list then grows).
fn records_hint(buffer: &[u8], from: i64) -> Result<usize> {
    let mut records = 0usize;
    for batch in batch::batches(buffer) {
        let (header, bytes) = batch.map_err(LogError::from)?;
        if header.is_control() || header.last_offset() < from {
            continue;
        }
        let encodable = bytes.len().saturating_sub(batch::HEADER_BYTES) / MIN_RECORD_BYTES;
        records += usize::try_from(header.records_count).unwrap_or(0).min(encodable);
    }
    Ok(records)
}

thread_local! {
    /// Each view thread waits for appends on its own single-threaded runtime.
    static WAITER: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime for waiting on the log");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base_offset: i64, records: usize) -> Vec<u8> {
        let mut builder = BatchBuilder::with_capacity(records);
        builder.base_offset = base_offset;
        for i in 0..records {
            builder.push(NewRecord::new(Some(b"k"), Some(format!("v{i}").as_bytes()), 0));
        }
        builder.build()
    }

    #[test]
    fn the_record_hint_counts_what_a_read_applies_and_a_corrupt_count_stays_bounded() {
        let mut buffer = batch(0, 3);
        buffer.extend(batch(3, 2));
        assert_eq!(records_hint(&buffer, 0).unwrap(), 5);
        assert_eq!(records_hint(&buffer, 3).unwrap(), 2, "a batch before the read's offset adds nothing");

        // records_count sits at bytes 57..61 of a batch (docs/format.md).
        let mut corrupt = batch(0, 3);
        let length = corrupt.len();
        corrupt[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let hint = records_hint(&corrupt, 0).unwrap();
        assert!(hint <= (length - batch::HEADER_BYTES) / MIN_RECORD_BYTES, "{hint} for a {length}-byte batch");
    }
}
