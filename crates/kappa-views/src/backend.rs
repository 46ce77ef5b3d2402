//! The narrow interface between the view engine and a log: read committed records of a
//! partition, append to a changelog, wait. The embedded log implements it here
//! (`embedded.rs`); an external Kafka cluster can implement it too.
//!
//! Invariant: the engine sees records (offset, timestamp, key, value, headers), never
//! record batches or the wire protocol.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use kappa_log::records::{HeaderIter, Headers};

use crate::error::Result;

/// One committed record of an input partition. Its byte fields share the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: RecordHeaders,
}

/// A record's headers, in wire order with duplicates kept, sharing the read buffer.
#[derive(Debug, Clone)]
pub enum RecordHeaders {
    /// As encoded in a record batch (after the count), already checked by the reader:
    /// nothing is allocated per header until one is asked for.
    Encoded { bytes: Bytes, count: usize },
    /// Headers a backend received one by one (e.g. from librdkafka).
    List(Vec<(Bytes, Option<Bytes>)>),
}

impl Default for RecordHeaders {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

impl From<Vec<(Bytes, Option<Bytes>)>> for RecordHeaders {
    fn from(list: Vec<(Bytes, Option<Bytes>)>) -> Self {
        Self::List(list)
    }
}

impl FromIterator<(Bytes, Option<Bytes>)> for RecordHeaders {
    fn from_iter<I: IntoIterator<Item = (Bytes, Option<Bytes>)>>(iter: I) -> Self {
        Self::List(iter.into_iter().collect())
    }
}

impl RecordHeaders {
    pub fn len(&self) -> usize {
        match self {
            Self::Encoded { count, .. } => *count,
            Self::List(list) => list.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (name, value) pairs in wire order.
    pub fn iter(&self) -> RecordHeaderIter<'_> {
        match self {
            Self::Encoded { bytes, count } => RecordHeaderIter::Encoded(Headers::from_checked(bytes, *count).iter()),
            Self::List(list) => RecordHeaderIter::List(list.iter()),
        }
    }

    /// The last header called `name`: None when absent, Some(None) when its value is null.
    pub fn last(&self, name: &[u8]) -> Option<Option<&[u8]>> {
        match self {
            Self::Encoded { bytes, count } => Headers::from_checked(bytes, *count).last(name),
            Self::List(list) => list.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_deref()),
        }
    }
}

/// Iterates [`RecordHeaders`] without allocating.
pub enum RecordHeaderIter<'a> {
    Encoded(HeaderIter<'a>),
    List(std::slice::Iter<'a, (Bytes, Option<Bytes>)>),
}

impl<'a> Iterator for RecordHeaderIter<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Encoded(iter) => iter.next(),
            Self::List(iter) => iter.next().map(|(k, v)| (&k[..], v.as_deref())),
        }
    }
}

impl PartialEq for RecordHeaders {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for RecordHeaders {}

/// Records read from one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputChunk {
    /// Committed records at or after the requested offset, in offset order (aborted
    /// transactional records and transaction markers removed).
    pub records: Vec<InputRecord>,
    /// Where the next read continues.
    pub next_offset: i64,
    /// The last stable offset: everything below it is committed or aborted.
    pub end_offset: i64,
    /// A transaction whose records this chunk holds has its marker further on: a reader
    /// that wants a transaction's records together reads on from `next_offset`.
    pub open_transaction: bool,
    /// (producer id, offset of its first record here) of each transaction whose records
    /// this chunk holds but whose marker it does not. When the chunk reaches `end_offset`,
    /// such a transaction's marker is past the last stable offset (another transaction
    /// interleaved with it is still open), so its other records are not readable yet.
    pub pending_transactions: Vec<(i64, i64)>,
    /// (producer id, offset of the marker) of each transaction marker this chunk holds.
    pub ended_transactions: Vec<(i64, i64)>,
    /// (offset of its first record here, offset of its marker) of each committed
    /// transaction whose records and marker this chunk both holds: a step cut at an offset
    /// inside such a span would apply half of the transaction.
    pub transaction_spans: Vec<(i64, i64)>,
    /// Offsets in the read range are missing (compaction removed records), so a replay of
    /// this range does not see everything that was written (`first_missing.is_some()`).
    pub history_gap: bool,
    /// The first offset in the read range whose committed record compaction removed. Gaps
    /// left by removing an aborted transaction's records lost nothing and are not counted;
    /// records removed after the last batch read are not seen.
    pub first_missing: Option<i64>,
}

/// One record to append (to a changelog or dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub timestamp: i64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A topic's id: a topic deleted and created again under the same name gets a new one
/// (Kafka's topic ids, KIP-516).
pub type TopicId = [u8; 16];

/// A log the view engine can run against.
pub trait LogBackend: Send + Sync + 'static {
    /// How many partitions `topic` has (an error when it does not exist).
    fn partition_count(&self, topic: &str) -> Result<i32>;

    /// The id of `topic` (an error when it does not exist), or None from a log without
    /// topic ids: then an input topic deleted and created again goes unnoticed, and a view
    /// reads the new topic from the offsets it reached in the old one.
    fn topic_id(&self, topic: &str) -> Result<Option<TopicId>> {
        self.partition_count(topic).map(|_| None)
    }

    /// Committed records of a partition from `from`, about `max_bytes` of them (at least
    /// one batch when there is one).
    fn read_committed(&self, topic: &str, partition: i32, from: i64, max_bytes: usize) -> Result<InputChunk>;

    /// The first offset still in the partition (retention may have removed earlier ones).
    fn start_offset(&self, topic: &str, partition: i32) -> Result<i64>;

    /// The last stable offset: the end of what `read_committed` can return now.
    fn end_offset(&self, topic: &str, partition: i32) -> Result<i64>;

    /// The first offset whose timestamp is >= `timestamp`, if any.
    fn offset_for_timestamp(&self, topic: &str, partition: i32, timestamp: i64) -> Result<Option<i64>>;

    /// Blocks until one of the partitions may have records at or after the given offset,
    /// or `timeout` passes.
    fn wait_for_input(&self, inputs: &[(&str, i32, i64)], timeout: Duration) -> Result<()>;

    /// Creates the topic when missing; checks partitions and cleanup policy when present,
    /// and raises its `max.message.bytes` to the one given.
    fn ensure_topic(&self, topic: &str, partitions: i32, configs: &BTreeMap<String, String>) -> Result<()>;

    /// Deletes a topic (a retired view's changelog); no error when it is already gone.
    fn delete_topic(&self, topic: &str) -> Result<()>;

    /// Appends records as one atomic batch, returning the first and last offsets. The batch
    /// may not be durable yet: [`Self::wait_durable`] says when it is.
    fn append(&self, topic: &str, partition: i32, records: Vec<OutputRecord>) -> Result<(i64, i64)>;

    /// Blocks until everything below `offset` is durable under the log's sync policy (with
    /// a relaxed one, e.g. kappa's `--sync interval:<ms>`, that may be at once).
    fn wait_durable(&self, topic: &str, partition: i32, offset: i64) -> Result<()>;

    /// Blocks until everything below `offset` is durable whatever the sync policy (syncing
    /// now if the policy would not yet). A state store checkpoint calls it first: a store
    /// made durable ahead of its changelog cannot be recovered after a power loss.
    fn make_durable(&self, topic: &str, partition: i32, offset: i64) -> Result<()>;

    /// The end of what readers may see (the high watermark): appended and durable.
    fn durable_end_offset(&self, topic: &str, partition: i32) -> Result<i64>;
}
