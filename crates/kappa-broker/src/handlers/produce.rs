//! Produce: each partition's batches are appended to the log (which validates them,
//! deduplicates idempotent retries, and acknowledges only after fsync). Partitions of one
//! request are written in order and wait for durability together; errors are per partition.

use bytes::Bytes;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kappa_log::batch::{self, BatchHeader};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use kappa_coordinator::OngoingTxn;
use kappa_log::{AppendOutcome, LogError, Partition};

use crate::server::BoxFuture;

use super::errors::{self, log_code, txn_code};
use super::metadata::is_internal;
use super::{Broker, ByTopic, blocking, str_bytes};
use crate::legacy;

/// Largest produce request (record bytes) appended on the connection's own task rather than
/// on a blocking thread.
const INLINE_APPEND_BYTES_MAX: usize = 64 * 1024;

/// One partition's part of a produce request: topic, partition, where it goes (or why it
/// is refused before any look at its batches), its records.
type PartitionWork = (String, i32, Result<Arc<Partition>, Refusal>, Bytes);

/// The first produce version that carries record batches (magic 2) only.
const RECORD_BATCHES_ONLY_VERSION_MIN: i16 = 3;
/// The first produce version that may carry zstd-compressed batches (KIP-110).
const ZSTD_PRODUCE_VERSION_MIN: i16 = 7;

impl Broker {
    /// Produce, both phases: write in order, then wait for durability.
    pub(super) async fn produce(&self, request: ProduceRequest, version: i16) -> ProduceResponse {
        self.produce_in_order(request, version).await.await
    }

    /// Phase one runs in request order on a connection: every partition's batches are
    /// validated, given offsets and written. The returned future is phase two: it waits
    /// until all of them are durable (sharing fsyncs with whatever else is in flight) and
    /// builds the response, so a connection's next request need not wait for this fsync.
    pub(super) async fn produce_in_order(
        &self,
        request: ProduceRequest,
        version: i16,
    ) -> BoxFuture<'static, ProduceResponse> {
        let acks_valid = matches!(request.acks, -1..=1);
        let transactional_id = request.transactional_id.as_ref().map(|t| t.0.as_str().to_owned());
        let work: Vec<PartitionWork> = request
            .topic_data
            .into_iter()
            .flat_map(|topic| {
                let name = topic.name.0.as_str().to_owned();
                topic
                    .partition_data
                    .into_iter()
                    .map(|data| {
                        let records = data.records.unwrap_or_default();
                        let partition = if is_internal(&name) {
                            // Only the coordinators write there (through the log): a client's
                            // record would be replayed into group offsets or transactions.
                            Err(failure(LogError::InvalidTopicName {
                                name: name.clone(),
                                reason: "internal topics are written by kappa's coordinators only",
                            }))
                        } else {
                            self.log.partition(&name, data.index).map_err(failure).and_then(|partition| {
                                record_batches_only(version, &records)?;
                                zstd_allowed(version, &records)?;
                                Ok(partition)
                            })
                        };
                        (name.clone(), data.index, partition, records)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        // Inflating (to check a compressed batch, or to convert a v0/v1 message set) is what
        // costs memory: at most `compressed_appends_max` such requests at once (down-converting
        // legacy fetch answers takes turns from the same budget). The turn is
        // taken before a transaction is held (the coordinator's expiry pass waits for held
        // ones) and moves into the append, so it is kept until the inflating is done even if
        // the connection goes away meanwhile.
        // (A request with invalid acks appends nothing, so inflates nothing.)
        let inflates = acks_valid
            && work.iter().any(|(_, _, partition, records)| {
                partition.is_ok() && (legacy::produce::is_message_set(records) || has_compressed_batch(records))
            });
        let turn = match inflates {
            true => Some(self.inflating_turn().await),
            false => None,
        };
        // Held until the batches are written, and moved to the blocking thread that writes
        // them: a connection that goes away mid-await must not let the transaction end while
        // its batches are still being appended.
        let (work, refused, ongoing) = self.verify_transactional(transactional_id.as_deref(), work).await;
        let bytes: usize = work.iter().map(|(_, _, _, records)| records.len()).sum();
        let to_append = move |(name, index, partition, records): PartitionWork| -> PartitionAppend {
            let appending = if acks_valid {
                partition.and_then(|p| Appending::new(p, record_batches(records)?))
            } else {
                Err((errors::INVALID_REQUIRED_ACKS, "acks must be -1, 0 or 1".to_owned()).into())
            };
            (name, index, appending)
        };
        // A small append that need not wait is a write into the page cache (the fsync, if
        // any, happens in phase two): done on this task it saves two thread hand-offs per
        // request, most of a small produce's latency. At the first batch that would wait —
        // for a partition another thread holds (perhaps through a roll's fsync), or to roll
        // the segment itself — it and the rest of the request go on in order on a blocking
        // thread: waiting here would stall every connection this runtime worker serves.
        // Larger requests go there whole, and so do the ones that inflate (a compressed
        // batch is inflated to check every record, a message set to convert it: up to
        // 64 MiB per batch), converted there under their turn.
        let mut written = if !inflates && bytes <= INLINE_APPEND_BYTES_MAX {
            append_all(work.into_iter().map(to_append).collect(), ongoing, &self.stats).await
        } else {
            blocking(move || {
                let (_turn, _ongoing) = (turn, ongoing);
                let mut appends: Vec<PartitionAppend> = work.into_iter().map(to_append).collect();
                append_waiting(&mut appends);
                into_written(appends)
            })
            .await
        };
        written.extend(refused);
        Box::pin(async move {
            let mut durable = Vec::with_capacity(written.len());
            for (name, index, result) in written {
                durable.push((name, index, wait_durable(result)));
            }
            let mut topics = ByTopic::new();
            for (name, index, wait) in durable {
                let result = match wait {
                    Durability::Done(result) => result,
                    Durability::Waiting(wait) => {
                        wait.await.unwrap_or_else(|e| Err((errors::KAFKA_STORAGE_ERROR, e.to_string()).into()))
                    }
                };
                add_partition_response(&mut topics, name, index, result);
            }
            let mut response = ProduceResponse::default();
            response.responses = topics.into_vec();
            response
        })
    }
}

type Written = Result<(Arc<Partition>, AppendOutcome, i64), Refusal>;

/// Why a partition's records were refused: Kafka's code and message and, when one record
/// is to blame, its index in its batch (Produce v8+ `record_errors`, KIP-467).
#[derive(Debug, Clone)]
struct Refusal {
    code: i16,
    message: String,
    record_index: Option<usize>,
}

impl From<(i16, String)> for Refusal {
    fn from((code, message): (i16, String)) -> Self {
        Self { code, message, record_index: None }
    }
}

impl Broker {
    /// Splits off the transactional batches the coordinator does not vouch for: their
    /// transaction must be ongoing, owned by the batch's producer id and epoch, and include
    /// the partition (AddPartitionsToTxn first, as every stock client does). Returns the
    /// work to append, the refusals, and the transaction to hold while appending. Partitions
    /// already refused (unknown, or a message set in produce v3+) are passed on as they are:
    /// they append nothing, so they neither need a transaction nor may change their answer.
    async fn verify_transactional(
        &self,
        transactional_id: Option<&str>,
        work: Vec<PartitionWork>,
    ) -> (Vec<PartitionWork>, Vec<(String, i32, Written)>, Option<OngoingTxn>) {
        let Some((producer_id, epoch)) = work
            .iter()
            .filter(|(_, _, partition, _)| partition.is_ok())
            .find_map(|(_, _, _, records)| transactional_producer(records).ok().flatten())
        else {
            return (work, Vec::new(), None);
        };
        let ongoing = match transactional_id {
            Some(id) => self.txns.lock_ongoing(id, producer_id, epoch).await.map_err(|e| (txn_code(&e), e.to_string())),
            None => Err((
                errors::INVALID_TXN_STATE,
                "a transactional batch needs the request's transactional id".to_owned(),
            )),
        };
        let mut accepted = Vec::with_capacity(work.len());
        let mut refused = Vec::new();
        for item in work {
            if item.2.is_err() {
                accepted.push(item);
                continue;
            }
            let producer = match transactional_producer(&item.3) {
                Ok(None) => {
                    accepted.push(item);
                    continue;
                }
                Ok(Some(producer)) => Some(producer),
                Err(()) => None,
            };
            let refusal = match &ongoing {
                Err(e) => Some(e.clone()),
                _ if producer != Some((producer_id, epoch)) => Some((
                    errors::INVALID_TXN_STATE,
                    "one request's transactional batches must come from one producer".to_owned(),
                )),
                Ok(txn) if !txn.includes(&item.0, item.1) => Some((
                    errors::INVALID_TXN_STATE,
                    format!(
                        "{}/{} is not part of the transaction: add it with AddPartitionsToTxn first",
                        item.0, item.1
                    ),
                )),
                Ok(_) => None,
            };
            match refusal {
                Some((code, message)) => {
                    tracing::warn!(topic = %item.0, partition = item.1, producer_id, epoch, code, %message, "refused a transactional produce");
                    refused.push((item.0, item.1, Err((code, message).into())));
                }
                None => accepted.push(item),
            }
        }
        (accepted, refused, ongoing.ok())
    }
}

/// The headers of a partition's batches in order, as far as they parse (framing errors are
/// left to the append's own checks).
fn batch_headers(records: &[u8]) -> impl Iterator<Item = BatchHeader> + '_ {
    let mut rest = Some(records);
    std::iter::from_fn(move || {
        let header = BatchHeader::parse(rest?).ok()?;
        let len = header.total_bytes();
        rest = if len < batch::HEADER_BYTES { None } else { Some(rest?.get(len..).unwrap_or_default()) };
        Some(header)
    })
}

/// Whether any batch of a partition's records is compressed.
pub(super) fn has_compressed_batch(records: &[u8]) -> bool {
    batch_headers(records).any(|header| !matches!(header.compression(), Ok(batch::Compression::None)))
}

/// The producer (id, epoch) of a partition's transactional batches, if it has any; `Err`
/// when they name more than one. Every batch is looked at: a transactional batch after a
/// plain one needs the coordinator's word as much as a first one (unchecked, it would open
/// a transaction no coordinator knows, holding back the last stable offset).
fn transactional_producer(records: &[u8]) -> Result<Option<(i64, i16)>, ()> {
    let mut found = None;
    for header in batch_headers(records).filter(BatchHeader::is_transactional) {
        let producer = (header.producer_id, header.producer_epoch);
        if found.is_some_and(|f| f != producer) {
            return Err(());
        }
        found = Some(producer);
    }
    Ok(found)
}

/// A partition's answer: known now, or waiting for an fsync on a blocking thread.
enum Durability {
    Done(Result<AppendOutcome, Refusal>),
    Waiting(tokio::task::JoinHandle<Result<AppendOutcome, Refusal>>),
}

/// Starts waiting until a written partition is durable. Already durable (the interval sync
/// policy, or a group commit that covered it meanwhile): answered at once, without a task
/// and a blocking thread, which is most of a small produce's latency.
fn wait_durable(result: Written) -> Durability {
    match result {
        Err(e) => Durability::Done(Err(e)),
        Ok((partition, outcome, end)) if partition.high_watermark() >= end => Durability::Done(Ok(outcome)),
        Ok((partition, outcome, end)) => Durability::Waiting(tokio::spawn(async move {
            blocking(move || partition.wait_until_durable(end)).await.map_err(failure)?;
            Ok(outcome)
        })),
    }
}

fn failure(e: LogError) -> Refusal {
    let record_index = match e {
        LogError::MissingKey { index } => Some(index),
        _ => None,
    };
    Refusal { code: log_code(&e), message: e.to_string(), record_index }
}

fn add_partition_response(
    topics: &mut ByTopic<TopicProduceResponse>,
    name: String,
    index: i32,
    result: Result<AppendOutcome, Refusal>,
) {
    let mut p = PartitionProduceResponse::default();
    p.index = index;
    p.log_append_time_ms = -1;
    match result {
        Ok(outcome) => {
            p.base_offset = outcome.base_offset;
            p.log_append_time_ms = outcome.log_append_time.unwrap_or(-1);
            p.log_start_offset = outcome.log_start_offset;
        }
        Err(Refusal { code, message, record_index }) => {
            tracing::debug!(topic = %name, partition = index, code, %message, "produce rejected");
            p.error_code = code;
            p.base_offset = -1;
            // Encoded from v8 on; older versions have the message only.
            p.record_errors = record_index
                .map(|at| {
                    let mut e = BatchIndexAndErrorMessage::default();
                    e.batch_index = i32::try_from(at).unwrap_or(i32::MAX);
                    e.batch_index_error_message = Some(str_bytes(message.clone()));
                    e
                })
                .into_iter()
                .collect();
            p.error_message = Some(str_bytes(message));
        }
    }
    let topic = topics.entry(&name, || {
        let mut topic = TopicProduceResponse::default();
        topic.name = kafka_protocol::messages::TopicName(str_bytes(name.clone()));
        topic
    });
    topic.partition_responses.push(p);
}

/// Refuses v0/v1 messages in produce v3+ with INVALID_RECORD, as Kafka does
/// (`ProduceRequest.validateRecords`): only produce v0-2 carry message sets, which are
/// converted; a client that sends them with a newer version is broken, not old.
fn record_batches_only(version: i16, records: &[u8]) -> Result<(), Refusal> {
    if version < RECORD_BATCHES_ONLY_VERSION_MIN {
        return Ok(());
    }
    match legacy::produce::message_set_magic(records) {
        None => Ok(()),
        Some(magic) => Err((
            errors::INVALID_RECORD,
            format!(
                "produce requests of version {version} may carry only record batches (magic 2), \
                 but this partition's records hold magic {magic} messages: send record batches, \
                 or send message sets with produce v{} or older",
                RECORD_BATCHES_ONLY_VERSION_MIN - 1
            ),
        )
            .into()),
    }
}

/// Refuses zstd in produce v0-6 with UNSUPPORTED_COMPRESSION_TYPE, as Kafka does for v3-6
/// (`ProduceRequest.validateRecords`; KIP-110: a client that can compress with zstd must send
/// v7). Message sets (v0-2) are looked at too: magic 0/1 cannot carry zstd (Kafka refuses
/// such a wrapper as an invalid record), and one code for "zstd, too old" says more.
fn zstd_allowed(version: i16, records: &[u8]) -> Result<(), Refusal> {
    if version >= ZSTD_PRODUCE_VERSION_MIN {
        return Ok(());
    }
    let zstd = match legacy::produce::is_message_set(records) {
        true => legacy::produce::has_zstd_wrapper(records),
        false => batch_headers(records).any(|header| matches!(header.compression(), Ok(batch::Compression::Zstd))),
    };
    match zstd {
        false => Ok(()),
        true => Err((
            errors::UNSUPPORTED_COMPRESSION_TYPE,
            format!(
                "zstd-compressed batches need produce v{ZSTD_PRODUCE_VERSION_MIN} or newer, and this request is \
                 v{version}: upgrade the client, or compress with gzip, snappy or lz4"
            ),
        )
            .into()),
    }
}

/// A partition's records as record batches: a v0/v1 message set (produce v0-2, e.g.
/// kafka-node) is converted, and one that cannot be is CORRUPT_MESSAGE, as Kafka answers a
/// message set that fails its checks.
fn record_batches(records: Bytes) -> Result<Bytes, Refusal> {
    if !legacy::produce::is_message_set(&records) {
        return Ok(records);
    }
    legacy::produce::up_convert(&records).map(Bytes::from).map_err(|e| {
        let message = format!("the v0/v1 message set could not be converted to a record batch: {e}");
        (errors::CORRUPT_MESSAGE, message).into()
    })
}

/// One partition's part of a produce request, from its batches to what writing them did.
type PartitionAppend = (String, i32, Result<Appending, Refusal>);

/// Writes every partition's batches in request order: on this task while no append would
/// wait, the rest on a blocking thread.
async fn append_all(
    mut appends: Vec<PartitionAppend>,
    ongoing: Option<OngoingTxn>,
    stats: &super::BrokerStats,
) -> Vec<(String, i32, Written)> {
    for (_, _, appending) in &mut appends {
        if !append_left(appending, |p, batch| p.try_append_unsynced(batch)) {
            break;
        }
    }
    if appends.iter().any(|(_, _, appending)| appending.as_ref().is_ok_and(|a| !a.left.is_empty())) {
        stats.produce_inline_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        appends = blocking(move || {
            let _ongoing = ongoing;
            append_waiting(&mut appends);
            appends
        })
        .await;
    }
    into_written(appends)
}

/// Writes what is left of every partition's batches, waiting as appends may (a blocking
/// thread's work).
fn append_waiting(appends: &mut [PartitionAppend]) {
    for (_, _, appending) in appends {
        append_left(appending, |p, batch| p.append_unsynced(batch).map(Some));
    }
}

fn into_written(appends: Vec<PartitionAppend>) -> Vec<(String, i32, Written)> {
    appends.into_iter().map(|(name, index, appending)| (name, index, appending.map(Appending::written))).collect()
}

/// A partition's batches being written in order, without waiting for durability: those
/// left, and what the ones written so far did.
struct Appending {
    partition: Arc<Partition>,
    records: Bytes,
    /// Where each batch not yet written lies in `records`, in order.
    left: VecDeque<Range<usize>>,
    first: Option<AppendOutcome>,
    end: i64,
}

/// Appends one batch; None when it was left undone (it would have waited).
type AppendOne = fn(&Partition, &[u8]) -> kappa_log::Result<Option<AppendOutcome>>;

impl Appending {
    /// Checks every batch's framing and header first: a request refused for its third batch
    /// has not written the first two.
    fn new(partition: Arc<Partition>, records: Bytes) -> Result<Self, Refusal> {
        let left = client_batches(&records)?.into();
        Ok(Self { partition, records, left, first: None, end: 0 })
    }

    /// Appends the batches left in order with `append`, up to the first it leaves undone.
    fn append_left(&mut self, append: AppendOne) -> Result<(), Refusal> {
        while let Some(range) = self.left.front() {
            let Some(outcome) = append(&self.partition, &self.records[range.clone()]).map_err(failure)? else {
                return Ok(());
            };
            self.left.pop_front();
            self.end = self.end.max(outcome.last_offset + 1);
            self.first.get_or_insert(outcome);
        }
        Ok(())
    }

    /// The first batch's outcome (Kafka's produce response carries one base offset per
    /// partition) and the offset everything written ends before.
    fn written(self) -> (Arc<Partition>, AppendOutcome, i64) {
        debug_assert!(self.left.is_empty(), "every batch was written");
        (self.partition, self.first.expect("at least one batch"), self.end)
    }
}

/// [`Appending::append_left`] for a partition not refused yet; a refused batch ends its
/// append with that refusal. Returns whether the partition is done (nothing left undone).
fn append_left(appending: &mut Result<Appending, Refusal>, append: AppendOne) -> bool {
    let Ok(a) = appending else { return true };
    match a.append_left(append) {
        Ok(()) => a.left.is_empty(),
        Err(refusal) => {
            *appending = Err(refusal);
            true
        }
    }
}

/// Splits a partition's records into batches (where each lies) and refuses what only the
/// broker may write (Kafka's LogValidator): control batches — transaction markers, which
/// end a producer's transaction in the partition — and producer batches without a sequence.
fn client_batches(records: &[u8]) -> Result<Vec<Range<usize>>, Refusal> {
    let mut rest = records;
    if rest.is_empty() {
        return Err(failure(LogError::InvalidBatch(batch::BatchError::Truncated {
            needed: batch::HEADER_BYTES,
            available: 0,
        })));
    }
    let mut batches = Vec::new();
    while !rest.is_empty() {
        let len =
            batch::batch_total_len(rest, kappa_log::config::MAX_MESSAGE_BYTES_LIMIT).map_err(|e| failure(e.into()))?;
        if len > rest.len() {
            let truncated = batch::BatchError::Truncated { needed: len, available: rest.len() };
            return Err(failure(LogError::InvalidBatch(truncated)));
        }
        let (one, tail) = rest.split_at(len);
        let header = BatchHeader::parse(one).map_err(|e| failure(e.into()))?;
        if header.is_control() {
            return Err((
                errors::INVALID_RECORD,
                "clients may not write control records (transaction markers): end a transaction with EndTxn".into(),
            )
                .into());
        }
        if header.producer_id >= 0 && header.base_sequence < 0 {
            return Err((
                errors::INVALID_RECORD,
                format!(
                    "a batch of producer id {} needs a base sequence (it has {})",
                    header.producer_id, header.base_sequence
                ),
            )
                .into());
        }
        let start = records.len() - rest.len();
        batches.push(start..start + one.len());
        rest = tail;
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::thread::ThreadId;

    use super::*;
    use crate::BrokerConfig;
    use kappa_log::batch::Compression;
    use kappa_log::io::{OpenMode, RealFs, Storage, StorageFile};
    use kappa_log::records::{BatchBuilder, NewRecord};
    use kappa_log::{Isolation, Log, LogOptions};

    /// A produce version librdkafka sends, and kafka-node's (message sets).
    const VERSION: i16 = 9;
    const LEGACY_VERSION: i16 = 2;

    fn batch(compression: Compression) -> Vec<u8> {
        BatchBuilder::new().compression(compression).record(NewRecord::new(Some(b"k"), Some(b"v"), 1)).build()
    }

    fn produce_request(topic: &str, records: Vec<u8>) -> ProduceRequest {
        use kafka_protocol::messages::TopicName;
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        let mut data = PartitionProduceData::default();
        data.index = 0;
        data.records = Some(Bytes::from(records));
        let mut topic_data = TopicProduceData::default();
        topic_data.name = TopicName(str_bytes(topic));
        topic_data.partition_data = vec![data];
        let mut request = ProduceRequest::default();
        request.acks = -1;
        request.topic_data = vec![topic_data];
        request
    }

    fn error_codes(response: &ProduceResponse) -> Vec<i16> {
        response.responses.iter().flat_map(|t| &t.partition_responses).map(|p| p.error_code).collect()
    }

    #[tokio::test]
    async fn compressed_produces_past_compressed_appends_max_wait_for_a_turn() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(kappa_log::Log::open(dir.path(), kappa_log::LogOptions::default()).unwrap().0);
        log.create_topic("t", 1, &Default::default()).unwrap();
        let config = crate::BrokerConfig { compressed_appends_max: 1, ..Default::default() };
        let broker = Broker::open(log.clone(), config).await.unwrap();

        // Another compressed append holds the only turn.
        let turn = broker.inflating.acquire().await.unwrap();
        let waiting = tokio::spawn({
            let broker = broker.clone();
            async move { broker.produce(produce_request("t", batch(Compression::Zstd)), VERSION).await }
        });
        // A v0/v1 message set (kafka-node) inflates too, to be converted.
        let mut set = bytes::BytesMut::new();
        crate::legacy::message_set::encode_message(&mut set, 0, 1, 0, 5, Some(b"k"), Some(b"v"));
        let legacy = tokio::spawn({
            let broker = broker.clone();
            async move { broker.produce(produce_request("t", set.to_vec()), LEGACY_VERSION).await }
        });
        let plain = broker.produce(produce_request("t", batch(Compression::None)), VERSION).await;
        assert_eq!(error_codes(&plain), [0], "an uncompressed produce does not wait");
        let end = || log.partition("t", 0).unwrap().log_end_offset();
        assert_eq!(end(), 1);
        let gave_up = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while !waiting.is_finished() && !legacy.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(gave_up.is_err(), "the compressed and the legacy produce wait while the turn is taken");
        assert_eq!(end(), 1, "and have written nothing");

        drop(turn);
        assert_eq!(error_codes(&waiting.await.unwrap()), [0]);
        assert_eq!(error_codes(&legacy.await.unwrap()), [0]);
        assert_eq!(end(), 3, "once the turn is free both are appended, one after the other");
    }

    #[test]
    fn a_request_with_any_compressed_batch_is_not_appended_inline() {
        let plain = batch(Compression::None);
        assert!(!has_compressed_batch(&plain));
        assert!(!has_compressed_batch(&[plain.clone(), plain.clone()].concat()));
        assert!(has_compressed_batch(&[plain.clone(), batch(Compression::Zstd)].concat()));
        assert!(has_compressed_batch(&batch(Compression::Lz4)));
    }

    /// A write or fsync of a segment file: which, of which file, on which thread.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Write,
        Sync,
    }

    type Ops = Arc<Mutex<Vec<(Op, PathBuf, ThreadId)>>>;

    /// The real file system, recording the thread of every write and fsync of a segment.
    struct ThreadRecordingFs {
        ops: Ops,
    }

    struct ThreadRecordingFile {
        file: Arc<dyn StorageFile>,
        path: PathBuf,
        ops: Option<Ops>,
    }

    impl ThreadRecordingFile {
        fn record(&self, op: Op) {
            if let Some(ops) = &self.ops {
                ops.lock().unwrap().push((op, self.path.clone(), std::thread::current().id()));
            }
        }
    }

    impl Storage for ThreadRecordingFs {
        fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
            RealFs.create_dir_all(path)
        }
        fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
            RealFs.list_dir(path)
        }
        fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn StorageFile>> {
            let file = RealFs.open(path, mode)?;
            let is_segment = path.extension().is_some_and(|e| e == "log");
            Ok(Arc::new(ThreadRecordingFile { file, path: path.to_owned(), ops: is_segment.then(|| self.ops.clone()) }))
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            RealFs.rename(from, to)
        }
        fn remove_file(&self, path: &Path) -> std::io::Result<()> {
            RealFs.remove_file(path)
        }
        fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
            RealFs.remove_dir_all(path)
        }
        fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
            RealFs.sync_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            RealFs.exists(path)
        }
    }

    impl StorageFile for ThreadRecordingFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.file.read_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.record(Op::Write);
            self.file.write_all_at(buf, offset)
        }
        fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
            self.record(Op::Write);
            self.file.write_all_vectored_at(parts, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.record(Op::Sync);
            self.file.sync_data()
        }
        fn modified_ms(&self) -> Option<i64> {
            self.file.modified_ms()
        }
        fn set_modified_ms(&self, ms: i64) -> std::io::Result<()> {
            self.file.set_modified_ms(ms)
        }
    }

    /// About 370 bytes: two fit in a 1 KiB segment, a third rolls it.
    fn batch_of(value: u8) -> Vec<u8> {
        BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(&[value; 300]), 1)).build()
    }

    /// The current-thread runtime runs on the test's thread: what runs there would stall
    /// every connection of a runtime worker. An inline-sized produce whose second batch rolls
    /// the segment writes its first batch here, and the roll (an fsync) and the second batch
    /// on a blocking thread, in order.
    #[tokio::test]
    async fn an_inline_produce_that_rolls_the_segment_fsyncs_off_the_runtime_thread() {
        let dir = tempfile::tempdir().unwrap();
        let ops = Ops::default();
        let log_options = LogOptions { fs: Arc::new(ThreadRecordingFs { ops: ops.clone() }), ..LogOptions::default() };
        let log = Arc::new(Log::open(dir.path(), log_options).unwrap().0);
        let overrides =
            std::collections::BTreeMap::from([(kappa_log::config::SEGMENT_BYTES.to_owned(), "1024".to_owned())]);
        log.create_topic("p", 1, &overrides).unwrap();
        let partition = log.partition("p", 0).unwrap();
        let broker = Broker::open(log, BrokerConfig::default()).await.unwrap();
        let first = broker.produce(produce_request("p", batch_of(0)), VERSION).await;
        assert_eq!(first.responses[0].partition_responses[0].error_code, 0);
        let fallbacks = || broker.stats().produce_inline_fallbacks.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(fallbacks(), 0, "the first batch was appended inline");
        ops.lock().unwrap().clear();

        let second = broker.produce(produce_request("p", [batch_of(1), batch_of(2)].concat()), VERSION).await;
        let answer = &second.responses[0].partition_responses[0];
        assert_eq!((answer.error_code, answer.base_offset), (0, 1));
        assert_eq!(partition.segment_count(), 2, "the second batch rolled the segment");
        assert_eq!(fallbacks(), 1, "counted for /metrics");
        let runtime = std::thread::current().id();
        let ops: Vec<(Op, bool)> = ops
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, path, _)| path.starts_with(partition.dir()))
            .map(|&(op, _, thread)| (op, thread == runtime))
            .collect();
        let writes: Vec<bool> = ops.iter().filter(|(op, _)| *op == Op::Write).map(|&(_, here)| here).collect();
        assert_eq!(writes, [true, false], "first batch on the runtime thread, the rolled one off it: {ops:?}");
        assert!(ops.contains(&(Op::Sync, false)), "the roll fsynced the closing segment: {ops:?}");
        assert!(!ops.contains(&(Op::Sync, true)), "an fsync ran on the runtime thread: {ops:?}");
        let read = partition.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap().records;
        let mut values = Vec::new();
        let mut rest = read.as_slice();
        while !rest.is_empty() {
            let len = BatchHeader::parse(rest).unwrap().total_bytes();
            let records = kappa_log::records::decode_records(&rest[..len], 1 << 20).unwrap();
            values.extend(records.iter().map(|r| r.value.unwrap()[0]));
            rest = &rest[len..];
        }
        assert_eq!(values, [0, 1, 2], "appended in request order");
    }
}
