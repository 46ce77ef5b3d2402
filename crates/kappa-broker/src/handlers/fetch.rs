//! Fetch (long polling, read_committed with aborted transactions) and ListOffsets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{AbortedTransaction, FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
use kafka_protocol::messages::{
    FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse, ProducerId, TopicName,
};
use kappa_log::{Isolation, LogError, Partition, ReadOutcome};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::errors::{self, log_code};
use super::produce::has_compressed_batch;
use super::{Broker, ByTopic, blocking, str_bytes};
use crate::legacy::{self, message_set};

/// ListOffsets' special timestamps.
const LATEST_TIMESTAMP: i64 = -1;
const EARLIEST_TIMESTAMP: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

/// One partition a fetch asks for.
struct Wanted {
    topic: String,
    index: i32,
    offset: i64,
    max_bytes: usize,
    partition: Result<Arc<Partition>, LogError>,
}

fn isolation(level: i8) -> Isolation {
    if level == 1 { Isolation::ReadCommitted } else { Isolation::ReadUncommitted }
}

impl Broker {
    pub(super) async fn fetch(&self, request: FetchRequest, version: i16) -> FetchResponse {
        let isolation = if version >= 4 { isolation(request.isolation_level) } else { Isolation::ReadUncommitted };
        let wanted: Vec<Wanted> = request
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| Wanted {
                    topic: t.topic.0.as_str().to_owned(),
                    index: p.partition,
                    offset: p.fetch_offset,
                    max_bytes: p.partition_max_bytes.max(0) as usize,
                    partition: self.log.partition(t.topic.0.as_str(), p.partition),
                })
            })
            .collect();
        let response_max = if version >= 3 {
            (request.max_bytes.max(0) as usize).min(self.config.fetch_response_bytes_max)
        } else {
            self.config.fetch_response_bytes_max
        };
        let min_bytes = request.min_bytes.max(0) as usize;
        let deadline = Instant::now()
            + Duration::from_millis((request.max_wait_ms.max(0) as u64).min(self.config.fetch_wait_ms_max));
        let wanted = Arc::new(wanted);
        loop {
            // Subscribe before reading so an append between the read and the wait wakes us.
            let watches: Vec<_> =
                wanted.iter().filter_map(|w| w.partition.as_ref().ok().map(|p| p.watch_high_watermark())).collect();
            let reads = {
                let wanted = wanted.clone();
                let legacy = version <= LAST_LEGACY_FETCH_VERSION;
                blocking(move || read_all(&wanted, isolation, response_max, legacy)).await
            };
            let bytes: usize = reads.iter().map(|r| r.records.len()).sum();
            let errored = reads.iter().any(|r| r.error_code != errors::NONE);
            let waited_out = Instant::now() >= deadline || watches.is_empty();
            // min_bytes 0 asks for an answer now, data or not (Kafka too).
            if bytes >= min_bytes || errored || waited_out {
                let reads = match version {
                    0..=LAST_LEGACY_FETCH_VERSION => {
                        let answer_bytes_max = response_max.min(legacy::DOWN_CONVERTED_ANSWER_BYTES_MAX);
                        let magic = legacy::fetch::magic_for(version);
                        self.down_convert(wanted.clone(), reads, magic, answer_bytes_max).await
                    }
                    _ => reads,
                };
                if waited_out || min_bytes == 0 || !converted_to_nothing(version, &reads) {
                    return build_fetch_response(&wanted, reads, isolation);
                }
            }
            wait_for_any(watches, deadline).await;
        }
    }

    /// Fetch v0-3 answers as message sets of `magic` (0 or 1), the format those clients
    /// read, each starting at its fetch offset, within the request's limits and
    /// `answer_bytes_max` ([`down_convert_reads`]). Converting re-encodes every
    /// record (CRC-32 included), so it runs on a blocking thread, never on a runtime worker;
    /// an answer holding any compressed batch also waits for a turn from the budget
    /// compressed produces take: converting inflates each batch, up to 64 MiB. Uncompressed
    /// answers take no turn: what they convert is what was read.
    async fn down_convert(
        &self,
        wanted: Arc<Vec<Wanted>>,
        reads: Vec<PartitionRead>,
        magic: i8,
        answer_bytes_max: usize,
    ) -> Vec<PartitionRead> {
        let inflates = reads.iter().any(|read| has_compressed_batch(&read.records));
        let turn = match inflates {
            true => Some(self.inflating_turn().await),
            false => None,
        };
        blocking(move || {
            let _turn = turn;
            down_convert_reads(&wanted, reads, magic, answer_bytes_max)
        })
        .await
    }

    pub(super) async fn list_offsets(&self, request: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
        let isolation = if version >= 2 { isolation(request.isolation_level) } else { Isolation::ReadUncommitted };
        let mut response = ListOffsetsResponse::default();
        for topic in request.topics {
            let name = topic.name.0.as_str().to_owned();
            let mut out = ListOffsetsTopicResponse::default();
            out.name = TopicName(str_bytes(name.clone()));
            for p in topic.partitions {
                let mut r = ListOffsetsPartitionResponse::default();
                r.partition_index = p.partition_index;
                if version >= 4 {
                    r.leader_epoch = 0;
                }
                let partition = self.log.partition(&name, p.partition_index);
                let answer = match partition {
                    Ok(partition) => blocking(move || offset_for(&partition, p.timestamp, isolation, version)).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok((offset, timestamp)) => {
                        r.offset = offset;
                        r.timestamp = timestamp;
                    }
                    Err(e) => {
                        r.error_code = log_code(&e);
                        r.offset = -1;
                        r.timestamp = -1;
                    }
                }
                out.partitions.push(r);
            }
            response.topics.push(out);
        }
        response
    }
}

/// (offset, timestamp) for a ListOffsets timestamp; (-1, -1) when no record qualifies —
/// except in v0, which asks for the offsets *before* a time (Kafka's
/// `legacyFetchOffsetsBefore`): there every record is before a time past the newest one, so
/// the answer is the end of the log (kafka-node's `Offset.fetch` asks with `Date.now()`).
fn offset_for(
    partition: &Partition,
    timestamp: i64,
    isolation: Isolation,
    version: i16,
) -> Result<(i64, i64), LogError> {
    let latest = match isolation {
        Isolation::ReadUncommitted => partition.high_watermark(),
        Isolation::ReadCommitted => partition.last_stable_offset(),
    };
    Ok(match timestamp {
        EARLIEST_TIMESTAMP => (partition.log_start_offset(), -1),
        LATEST_TIMESTAMP => (latest, -1),
        // The record with the largest timestamp is the first one at or after it.
        MAX_TIMESTAMP => match partition.max_timestamp() {
            Some(max) => partition.offset_for_timestamp(max, isolation)?.unwrap_or((-1, -1)),
            None => (-1, -1),
        },
        t => {
            let none_qualifies = if version == 0 { (latest, -1) } else { (-1, -1) };
            partition.offset_for_timestamp(t, isolation)?.unwrap_or(none_qualifies)
        }
    })
}

/// Fetch v0-3 answers are down-converted to message sets (magic 0/1).
const LAST_LEGACY_FETCH_VERSION: i16 = 3;

/// Whether a fetch v0-3 answer read bytes but converted them to no message and no error:
/// control batches (transaction markers) only, which magic 0/1 cannot carry. Kafka judges
/// min_bytes on the bytes read and answers at once; but such a client (kafka-node) cannot
/// move past a marker it never sees, so at a trailing marker it would fetch again at once,
/// forever. Waiting (up to max_wait, or until more is written) is what min_bytes asks for.
/// Fetch v4+ gets the marker itself and moves past it, so it is answered as Kafka does.
fn converted_to_nothing(version: i16, reads: &[PartitionRead]) -> bool {
    version <= LAST_LEGACY_FETCH_VERSION
        && reads.iter().all(|read| read.error_code == errors::NONE && read.records.is_empty())
}

/// Every partition's read as a message set of `magic` from its fetch offset on, bounded by
/// what it converts to, as Kafka bounds a down-converted answer by the bytes it read
/// (`LazyDownConversionRecordsSend`): each partition at most its `partition_max_bytes`, all
/// of them at most `answer_bytes_max` (the request's `max_bytes` where the version has one,
/// and [`legacy::DOWN_CONVERTED_ANSWER_BYTES_MAX`]), whole messages only. The answer's first
/// message goes whatever its size, and so does a partition's first one while the answer
/// has room for it, so a consumer always moves on; once the answer is full the remaining
/// partitions get none (their consumers fetch them again), and are not inflated.
fn down_convert_reads(
    wanted: &[Wanted],
    reads: Vec<PartitionRead>,
    magic: i8,
    answer_bytes_max: usize,
) -> Vec<PartitionRead> {
    let mut answer_bytes = 0usize;
    wanted
        .iter()
        .zip(reads)
        .map(|(w, read)| {
            let left = answer_bytes_max.saturating_sub(answer_bytes);
            let limit = message_set::SetLimit {
                bytes_max: w.max_bytes.min(left),
                first_message_max: if answer_bytes == 0 { usize::MAX } else { left },
            };
            let read = down_convert_read(w, read, magic, limit);
            answer_bytes += read.records.len();
            read
        })
        .collect()
}

/// One partition's read as a message set of `magic` from its fetch offset on, within
/// `limit`. A stored batch that does not decode ends the set; with no message before it,
/// the partition is UNKNOWN_SERVER_ERROR, as Kafka answers a failed down-conversion,
/// without records.
fn down_convert_read(w: &Wanted, mut read: PartitionRead, magic: i8, limit: message_set::SetLimit) -> PartitionRead {
    let records = std::mem::take(&mut read.records);
    match message_set::down_convert(&records, magic, w.offset, legacy::DECOMPRESSED_BYTES_MAX, limit) {
        Ok(set) => read.records = set,
        Err(e) => {
            tracing::warn!(topic = %w.topic, partition = w.index, error = %e, "down-conversion failed");
            read.error_code = errors::UNKNOWN_SERVER_ERROR;
        }
    }
    read
}

struct PartitionRead {
    error_code: i16,
    records: Bytes,
    high_watermark: i64,
    last_stable_offset: i64,
    log_start_offset: i64,
    aborted: Vec<kappa_log::producer::AbortedTxn>,
}

/// Reads every wanted partition within the response budget. The first partition with data
/// gets at least one whole batch even if it is larger than the budget (Kafka semantics).
/// For fetch v0-3 (`legacy`) a partition's read starts past leading transaction markers,
/// which those versions cannot carry ([`read_past_markers`]).
fn read_all(wanted: &[Wanted], isolation: Isolation, response_max: usize, legacy: bool) -> Vec<PartitionRead> {
    let mut remaining = response_max;
    let mut any_data = false;
    wanted
        .iter()
        .map(|w| {
            let empty = |code| PartitionRead {
                error_code: code,
                records: Bytes::new(),
                high_watermark: -1,
                last_stable_offset: -1,
                log_start_offset: -1,
                aborted: Vec::new(),
            };
            let partition = match &w.partition {
                Ok(p) => p,
                Err(e) => return empty(log_code(e)),
            };
            let budget = w.max_bytes.min(remaining);
            if budget == 0 && any_data {
                let mut read = empty(errors::NONE);
                read.high_watermark = partition.high_watermark();
                read.last_stable_offset = partition.last_stable_offset();
                read.log_start_offset = partition.log_start_offset();
                return read;
            }
            let read = match legacy {
                true => read_past_markers(partition, w.offset, budget.max(1), isolation),
                false => partition.read(w.offset, budget.max(1), isolation),
            };
            match read {
                Ok(read) => {
                    remaining = remaining.saturating_sub(read.records.len());
                    any_data |= !read.records.is_empty();
                    PartitionRead {
                        error_code: errors::NONE,
                        records: Bytes::from(read.records),
                        high_watermark: read.high_watermark,
                        last_stable_offset: read.last_stable_offset,
                        log_start_offset: read.log_start_offset,
                        aborted: read.aborted,
                    }
                }
                Err(e) => {
                    let mut read = empty(log_code(&e));
                    read.high_watermark = partition.high_watermark();
                    read.last_stable_offset = partition.last_stable_offset();
                    read.log_start_offset = partition.log_start_offset();
                    read
                }
            }
        })
        .collect()
}

/// How many reads of transaction markers only a fetch v0-3 partition read skips before it
/// answers with what it has (the consumer then fetches again from the same offset).
const LEGACY_MARKER_READS_MAX: usize = 64;

/// A partition's read from `offset`, moved past the transaction markers it starts with:
/// magic 0/1 cannot carry them, so a read of only markers converts to nothing. Were the
/// batch after a marker larger than `max_bytes`, the read would hold only the marker, and a
/// v0-3 consumer (kafka-node) would fetch at the marker's offset forever — as it would from
/// Kafka. Read from past the markers, the batch comes as the read's first, whatever its size.
fn read_past_markers(
    partition: &Partition,
    offset: i64,
    max_bytes: usize,
    isolation: Isolation,
) -> Result<ReadOutcome, LogError> {
    let mut read = partition.read(offset, max_bytes, isolation)?;
    for _ in 0..LEGACY_MARKER_READS_MAX {
        match markers_only_until(&read.records) {
            Some(next) if next < read.high_watermark => read = partition.read(next, max_bytes, isolation)?,
            _ => break,
        }
    }
    Ok(read)
}

/// Where the next batch starts, when `records` (whole batches) are transaction markers only.
fn markers_only_until(records: &[u8]) -> Option<i64> {
    let mut next = None;
    for batch in kappa_log::batch::batches(records) {
        let (header, _) = batch.ok()?;
        if !header.is_control() {
            return None;
        }
        next = Some(header.next_offset());
    }
    next
}

fn build_fetch_response(wanted: &[Wanted], reads: Vec<PartitionRead>, isolation: Isolation) -> FetchResponse {
    let mut topics = ByTopic::new();
    for (w, read) in wanted.iter().zip(reads) {
        let mut p = PartitionData::default();
        p.partition_index = w.index;
        p.error_code = read.error_code;
        p.high_watermark = read.high_watermark;
        p.last_stable_offset = read.last_stable_offset;
        p.log_start_offset = read.log_start_offset;
        p.preferred_read_replica = kafka_protocol::messages::BrokerId(-1);
        p.aborted_transactions = (isolation == Isolation::ReadCommitted).then(|| {
            read.aborted
                .iter()
                .map(|a| {
                    let mut t = AbortedTransaction::default();
                    t.producer_id = ProducerId(a.producer_id);
                    t.first_offset = a.first_offset;
                    t
                })
                .collect()
        });
        p.records = Some(read.records);
        let topic = topics.entry(&w.topic, || {
            let mut topic = FetchableTopicResponse::default();
            topic.topic = TopicName(str_bytes(w.topic.clone()));
            topic
        });
        topic.partitions.push(p);
    }
    let mut response = FetchResponse::default();
    response.responses = topics.into_vec();
    response
}

/// Waits until any partition's high watermark moves or the deadline passes.
async fn wait_for_any(watches: Vec<tokio::sync::watch::Receiver<i64>>, deadline: Instant) {
    let mut set = JoinSet::new();
    for mut watch in watches {
        set.spawn(async move {
            let _ = watch.changed().await;
        });
    }
    let _ = tokio::time::timeout_at(deadline, set.join_next()).await;
    set.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::batch::Compression;
    use kappa_log::records::{BatchBuilder, NewRecord};

    fn batch(base_offset: i64, count: usize, compression: Compression) -> Vec<u8> {
        let mut builder = BatchBuilder::new().compression(compression);
        builder.base_offset = base_offset;
        for i in 0..count {
            builder.push(NewRecord::new(Some(b"k"), Some(format!("v{}", base_offset + i as i64).as_bytes()), 1_000));
        }
        builder.build()
    }

    fn fetch_request(topic: &str, offset: i64) -> FetchRequest {
        use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
        let mut partition = FetchPartition::default();
        partition.fetch_offset = offset;
        partition.partition_max_bytes = 1 << 20;
        let mut wanted = FetchTopic::default();
        wanted.topic = TopicName(str_bytes(topic));
        wanted.partitions = vec![partition];
        let mut request = FetchRequest::default();
        request.min_bytes = 1;
        request.max_bytes = 1 << 20;
        request.topics = vec![wanted];
        request
    }

    fn records(response: &FetchResponse) -> Bytes {
        let partition = &response.responses[0].partitions[0];
        assert_eq!(partition.error_code, errors::NONE);
        partition.records.clone().unwrap_or_default()
    }

    /// (offset, magic, value) of every message of a down-converted answer.
    fn messages(response: &FetchResponse) -> Vec<(i64, i8, String)> {
        let set = message_set::decode(&records(response), 1 << 20, false).unwrap();
        set.iter().map(|m| (m.offset, m.magic, String::from_utf8(m.value.clone().unwrap().to_vec()).unwrap())).collect()
    }

    /// Down-converting a compressed batch inflates it: a legacy fetch of one takes a turn
    /// from the budget compressed produces take. A modern fetch of the same batch, and a
    /// legacy fetch of an uncompressed one, inflate nothing and do not wait.
    #[tokio::test]
    async fn a_legacy_fetch_of_a_compressed_batch_waits_for_an_inflating_turn() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(kappa_log::Log::open(dir.path(), kappa_log::LogOptions::default()).unwrap().0);
        for (topic, compression) in [("lz4", Compression::Lz4), ("plain", Compression::None)] {
            log.create_topic(topic, 1, &Default::default()).unwrap();
            log.partition(topic, 0).unwrap().append(batch(0, 3, compression)).unwrap();
        }
        let config = crate::BrokerConfig { compressed_appends_max: 1, ..Default::default() };
        let broker = Broker::open(log, config).await.unwrap();
        let expected = |magic| vec![(1, magic, "v1".to_owned()), (2, magic, "v2".to_owned())];

        // A compressed produce holds the only turn.
        let turn = broker.inflating.acquire().await.unwrap();
        let legacy = tokio::spawn({
            let broker = broker.clone();
            async move { broker.fetch(fetch_request("lz4", 1), 0).await }
        });
        // These take no turn: waiting for one would fail the test, not hang it.
        let at_once = |fetch| async move {
            tokio::time::timeout(Duration::from_secs(10), fetch).await.expect("answered without a turn")
        };
        let modern = at_once(broker.fetch(fetch_request("lz4", 1), 4)).await;
        let stored = kappa_log::batch::BatchHeader::parse(&records(&modern)).unwrap();
        assert_eq!(stored.compression().unwrap(), Compression::Lz4, "fetch v4+ answers the stored batch");
        let plain = at_once(broker.fetch(fetch_request("plain", 1), 2)).await;
        assert_eq!(messages(&plain), expected(1), "an uncompressed legacy fetch converts without a turn");
        let gave_up = tokio::time::timeout(Duration::from_secs(2), async {
            while !legacy.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(gave_up.is_err(), "the legacy fetch of a compressed batch waits while the turn is taken");

        drop(turn);
        assert_eq!(messages(&legacy.await.unwrap()), expected(0), "then it is converted, from the fetch offset");
    }

    /// Two partitions of "t", each 0..5 and 5..10 in two gzip batches, wanted from offset 1
    /// with `partition_max_bytes`.
    fn two_gzip_partitions(dir: &std::path::Path, partition_max_bytes: usize) -> Vec<Wanted> {
        let log = kappa_log::Log::open(dir, kappa_log::LogOptions::default()).unwrap().0;
        log.create_topic("t", 2, &Default::default()).unwrap();
        (0..2)
            .map(|index| {
                let partition = log.partition("t", index).unwrap();
                partition.append(batch(0, 5, Compression::Gzip)).unwrap();
                partition.append(batch(5, 5, Compression::Gzip)).unwrap();
                Wanted {
                    topic: "t".to_owned(),
                    index,
                    offset: 1,
                    max_bytes: partition_max_bytes,
                    partition: Ok(partition),
                }
            })
            .collect()
    }

    /// (offsets per partition, bytes per partition) of a down-converted answer.
    fn convert(wanted: &[Wanted], answer_bytes_max: usize) -> (Vec<Vec<i64>>, Vec<usize>) {
        let reads = read_all(wanted, Isolation::ReadUncommitted, 1 << 20, true);
        let converted = down_convert_reads(wanted, reads, 1, answer_bytes_max);
        converted
            .into_iter()
            .map(|read| {
                assert_eq!(read.error_code, errors::NONE);
                let set = message_set::decode(&read.records, 1 << 20, false).unwrap();
                (set.iter().map(|m| m.offset).collect::<Vec<_>>(), read.records.len())
            })
            .unzip()
    }

    /// A down-converted answer is inflated and re-framed, so it is bounded by its own
    /// bytes, not by the bytes read: the first partition's messages up to the answer's
    /// limit (the first message whatever its size), the next partition's only while they
    /// fit in what is left.
    #[test]
    fn a_legacy_answer_holds_its_limit_of_down_converted_bytes_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = two_gzip_partitions(dir.path(), 1 << 20);
        let (all, bytes) = convert(&wanted, usize::MAX);
        assert_eq!(all, [(1..10).collect::<Vec<_>>(), (1..10).collect()], "from the fetch offset, both batches");
        let message_bytes = bytes[0] / 9;
        assert_eq!(bytes, [9 * message_bytes, 9 * message_bytes]);
        assert_eq!(convert(&wanted, 0).0, [vec![1], vec![]], "the first message always goes, then nothing");
        assert_eq!(convert(&wanted, 1).0, [vec![1], vec![]]);
        assert_eq!(convert(&wanted, 7 * message_bytes - 1).0, [(1..7).collect::<Vec<_>>(), vec![]], "across a batch");
        assert_eq!(convert(&wanted, 10 * message_bytes - 1).0, [(1..10).collect::<Vec<_>>(), vec![]]);
        let (offsets, bytes) = convert(&wanted, 11 * message_bytes + 1);
        assert_eq!(offsets, [(1..10).collect::<Vec<_>>(), vec![1, 2]]);
        assert_eq!(bytes, [9 * message_bytes, 2 * message_bytes], "never past the limit");
    }

    /// Each partition holds at most its `partition_max_bytes` of converted messages, or its
    /// first message if larger and the answer has room for it (a compressed batch would
    /// otherwise come back as many times the bytes the client asked for).
    #[test]
    fn a_legacy_answer_holds_each_partitions_max_bytes_of_down_converted_bytes_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let message_bytes = {
            let wanted = two_gzip_partitions(dir.path(), 1 << 20);
            convert(&wanted, usize::MAX).1[0] / 9
        };
        for (partition_max_bytes, expected) in [
            (1, vec![1]),
            (message_bytes, vec![1]),
            (3 * message_bytes - 1, vec![1, 2]),
            (3 * message_bytes, vec![1, 2, 3]),
            (1 << 20, (1..10).collect()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let wanted = two_gzip_partitions(dir.path(), partition_max_bytes);
            let (offsets, bytes) = convert(&wanted, usize::MAX);
            assert_eq!(offsets, [expected.clone(), expected.clone()], "partition_max_bytes {partition_max_bytes}");
            assert!(bytes.iter().all(|&b| b <= partition_max_bytes.max(message_bytes)), "{bytes:?}");
            assert_eq!(bytes, [expected.len() * message_bytes; 2]);
            // The second partition's first message goes only if the answer has room for it.
            let answer = expected.len() * message_bytes;
            assert_eq!(convert(&wanted, answer + message_bytes).0[1], [1], "partition_max_bytes {partition_max_bytes}");
            assert_eq!(convert(&wanted, answer + message_bytes - 1).0[1], [0i64; 0]);
        }
    }

    /// A batch that does not convert ends its partition's set: the messages before it are
    /// answered (kafka-node moves on to it), and the error comes when nothing precedes it.
    #[test]
    fn a_broken_batch_fails_its_partition_only_when_no_message_precedes_it() {
        let mut broken = batch(10, 2, Compression::Gzip);
        broken.truncate(broken.len() - 3);
        let len = (broken.len() - kappa_log::batch::LENGTH_PREFIX_BYTES) as i32;
        broken[8..12].copy_from_slice(&len.to_be_bytes());
        let good_then_broken =
            [batch(0, 5, Compression::Gzip), batch(5, 5, Compression::Gzip), broken.clone()].concat();
        let wanted = |offset| Wanted {
            topic: "t".to_owned(),
            index: 0,
            offset,
            max_bytes: 1 << 20,
            partition: Err(LogError::UnknownTopic("t".to_owned())),
        };
        let read = |records: &[u8]| PartitionRead {
            error_code: errors::NONE,
            records: Bytes::copy_from_slice(records),
            high_watermark: 12,
            last_stable_offset: 12,
            log_start_offset: 0,
            aborted: Vec::new(),
        };
        let converted = down_convert_reads(&[wanted(2)], vec![read(&good_then_broken)], 1, usize::MAX);
        assert_eq!(converted[0].error_code, errors::NONE);
        let set = message_set::decode(&converted[0].records, 1 << 20, false).unwrap();
        assert_eq!(set.iter().map(|m| m.offset).collect::<Vec<_>>(), (2..10).collect::<Vec<_>>());
        let converted = down_convert_reads(&[wanted(10)], vec![read(&broken)], 1, usize::MAX);
        assert_eq!((converted[0].error_code, converted[0].records.len()), (errors::UNKNOWN_SERVER_ERROR, 0));
    }
}
