//! The log's typed errors. Each message says what was wrong and, where there is one, what
//! to do about it.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::batch::BatchError;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error(
        "record batch of {size} bytes exceeds max.message.bytes = {max}; send smaller batches or raise the topic's max.message.bytes"
    )]
    MessageTooLarge { size: usize, max: usize },
    #[error("offset {offset} is out of range: the partition holds offsets {log_start_offset}..{log_end_offset}")]
    OffsetOutOfRange { offset: i64, log_start_offset: i64, log_end_offset: i64 },
    #[error(
        "producer {producer_id} used epoch {epoch} but epoch {current_epoch} is current: this producer was fenced by a newer instance with the same transactional id"
    )]
    ProducerFenced { producer_id: i64, epoch: i16, current_epoch: i16 },
    #[error(
        "producer {producer_id} (epoch {epoch}) sent sequence {received}, expected {expected}: batches arrived out of order or one was lost"
    )]
    OutOfOrderSequence { producer_id: i64, epoch: i16, received: i32, expected: i32 },
    #[error("transaction marker for producer {producer_id} is invalid: {reason}")]
    InvalidTxnMarker { producer_id: i64, reason: String },
    #[error(
        "log directory {dir} stopped accepting writes after an I/O error ({cause}); restart the process once the disk is healthy"
    )]
    Poisoned { dir: PathBuf, cause: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt data in {path} at byte {position}: {reason}")]
    Corrupt { path: PathBuf, position: u64, reason: String },
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error("topic '{topic}' has no partition {partition} (it has {partitions})")]
    UnknownPartition { topic: String, partition: i32, partitions: i32 },
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("invalid topic name '{name}': {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    #[error("invalid partition count {count}: {reason}")]
    InvalidPartitions { count: i32, reason: String },
    #[error("unknown topic config '{0}'; see docs/format.md for the supported keys")]
    UnknownConfig(String),
    #[error("invalid value '{value}' for topic config '{key}': {reason}")]
    InvalidConfig { key: String, value: String, reason: String },
    #[error(
        "record {index} of the batch has no key; a compacted topic keeps the latest record per key, so every record needs one"
    )]
    MissingKey { index: usize },
    #[error("the batch's records cannot be read: {0}")]
    InvalidRecords(String),
    #[error(
        "records of partition {topic}-{partition} cannot be deleted: the topic's cleanup.policy has no 'delete' (a compacted topic's records go only by compaction); set cleanup.policy=compact,delete to allow it"
    )]
    DeleteRecordsPolicy { topic: String, partition: i32 },
    #[error("the log is closed")]
    Closed,
    #[error(
        "cannot make offset {offset} durable: the partition's records end at {written} (was the topic deleted and created again?)"
    )]
    NotWritten { offset: i64, written: i64 },
    #[error("the partition ended at offset {actual}, not {expected}: another append came first; check again and retry")]
    EndMoved { expected: i64, actual: i64 },
}

impl LogError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;
