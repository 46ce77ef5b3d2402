//! The coordinators' storage: single-partition compacted internal topics, written with
//! the log's durable appends and replayed from the start when a coordinator opens.

use std::sync::Arc;

use kappa_log::batch::BatchHeader;
use kappa_log::{Isolation, Log, LogError, Partition};

/// Bytes read per step when replaying an internal topic.
const REPLAY_READ_BYTES: usize = 4 * 1024 * 1024;
/// Internal topics roll at 100 MiB: they are compacted, so closed segments shrink.
const SEGMENT_BYTES: &str = "104857600";

/// The single partition of internal topic `name`, created (compacted) if missing.
pub(crate) fn open_topic(log: &Log, name: &str) -> Result<Arc<Partition>, LogError> {
    let topic = match log.topic(name) {
        Ok(topic) => topic,
        Err(LogError::UnknownTopic(_)) => {
            let configs = [("cleanup.policy", "compact"), ("segment.bytes", SEGMENT_BYTES)];
            log.create_topic(name, 1, &configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())?
        }
        Err(e) => return Err(e),
    };
    topic.partition(0)
}

/// Calls `visit(header, batch bytes)` for every batch from the log start to the high
/// watermark, in offset order.
pub(crate) fn replay(
    partition: &Partition,
    mut visit: impl FnMut(&BatchHeader, &[u8]) -> Result<(), LogError>,
) -> Result<(), LogError> {
    let mut offset = partition.log_start_offset();
    while offset < partition.high_watermark() {
        let read = partition.read(offset, REPLAY_READ_BYTES, Isolation::ReadUncommitted)?;
        if read.records.is_empty() {
            break;
        }
        let mut bytes = read.records.as_slice();
        while !bytes.is_empty() {
            let header = BatchHeader::parse(bytes)?;
            let (batch, rest) = bytes.split_at(header.total_bytes());
            bytes = rest;
            offset = header.next_offset();
            visit(&header, batch)?;
        }
    }
    Ok(())
}
