//! The coordinators' storage: single-partition compacted internal topics, written with
//! the log's durable appends and replayed from the start when a coordinator opens.

use std::collections::BTreeMap;
use std::sync::Arc;

use kappa_log::batch::BatchHeader;
use kappa_log::{Isolation, Log, LogError, Partition, config};

/// Bytes read per step when replaying an internal topic.
const REPLAY_READ_BYTES: usize = 4 * 1024 * 1024;
/// Internal topics roll at 100 MiB: they are compacted, so closed segments shrink.
const SEGMENT_BYTES: &str = "104857600";
/// The internal topics' `max.message.bytes`: the largest batch a coordinator writes. It must
/// hold the largest transaction record (10,000 partitions, the default `partitions_max`,
/// with 249-byte topic names take about 2.6 MB; `txn::TXN_PARTITIONS_MAX_LIMIT` is derived
/// from this), which Kafka's 1 MiB default would refuse, leaving that transaction unable to
/// end.
pub(crate) const INTERNAL_MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The single partition of internal topic `name`, created (compacted) if missing. A topic
/// created by an older version with a smaller `max.message.bytes` is raised to
/// [`INTERNAL_MESSAGE_BYTES_MAX`].
pub(crate) fn open_topic(log: &Log, name: &str) -> Result<Arc<Partition>, LogError> {
    let message_bytes_max = INTERNAL_MESSAGE_BYTES_MAX.to_string();
    let topic = match log.topic(name) {
        Ok(topic) => topic,
        Err(LogError::UnknownTopic(_)) => {
            let configs = [
                ("cleanup.policy", "compact"),
                ("segment.bytes", SEGMENT_BYTES),
                (config::MAX_MESSAGE_BYTES, message_bytes_max.as_str()),
            ];
            log.create_topic(name, 1, &configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())?
        }
        Err(e) => return Err(e),
    };
    if topic.config().max_message_bytes < INTERNAL_MESSAGE_BYTES_MAX {
        tracing::info!(
            topic = name,
            max_message_bytes = INTERNAL_MESSAGE_BYTES_MAX,
            "raising an internal topic's max.message.bytes"
        );
        let change = BTreeMap::from([(config::MAX_MESSAGE_BYTES.to_owned(), Some(message_bytes_max))]);
        log.alter_topic_config(name, &change)?;
    }
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
