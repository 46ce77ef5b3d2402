//! Committed consumer-group offsets, kept in memory and stored in the internal compacted
//! topic `__consumer_offsets` (one record per group, topic and partition; a tombstone
//! deletes), so they survive restarts. Offsets committed inside a transaction are written
//! as transactional records and only take effect when the commit marker is written.
//!
//! Record key:   kind u8 (1) | group_len u16 | group | topic_len u16 | topic | partition i32
//! Record value: version u8 (1) | offset i64 | leader_epoch i32 | metadata_len u16 | metadata | commit_timestamp i64

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kappa_log::codec::{Reader, put_str};
use kappa_log::records::{self, BatchBuilder, NewRecord};
use kappa_log::{Log, LogError, Partition};

use crate::error::GroupError;
use crate::internal;

pub const CONSUMER_OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Kafka: offset.metadata.max.bytes.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// The longest group id or topic name an offset record can hold (a u16 length). Longer ones
/// are refused, never cut: a cut id would come back under another group's name at replay.
/// The group coordinator's `id_bytes_max` is the tighter limit for group ids.
pub const OFFSET_KEY_NAME_BYTES_MAX: usize = u16::MAX as usize;
const KEY_KIND_OFFSET: u8 = 1;
const VALUE_VERSION: u8 = 1;

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

/// (topic, partition)
pub type TopicPartition = (String, i32);

/// A partition's committed offset as [`OffsetStore::fetch_stable`] answers it.
pub type StableOffset = Result<Option<CommittedOffset>, GroupError>;

type Pending = Vec<(String, TopicPartition, Option<CommittedOffset>)>;

/// Offsets written inside open transactions.
#[derive(Default)]
struct PendingOffsets {
    by_producer: HashMap<i64, Pending>,
    /// group → partition → producers with an offset pending for it (OffsetFetch's
    /// require_stable asks per partition).
    by_partition: HashMap<String, HashMap<TopicPartition, HashSet<i64>>>,
}

impl PendingOffsets {
    fn add(&mut self, producer_id: i64, group: String, tp: TopicPartition, value: Option<CommittedOffset>) {
        self.by_partition.entry(group.clone()).or_default().entry(tp.clone()).or_default().insert(producer_id);
        self.by_producer.entry(producer_id).or_default().push((group, tp, value));
    }

    fn take(&mut self, producer_id: i64) -> Pending {
        let pending = self.by_producer.remove(&producer_id).unwrap_or_default();
        for (group, tp, _) in &pending {
            let Some(partitions) = self.by_partition.get_mut(group) else { continue };
            if let Some(producers) = partitions.get_mut(tp) {
                producers.remove(&producer_id);
                if producers.is_empty() {
                    partitions.remove(tp);
                }
            }
            if partitions.is_empty() {
                self.by_partition.remove(group);
            }
        }
        pending
    }

    fn is_pending(&self, group: &str, tp: &TopicPartition) -> bool {
        self.by_partition.get(group).is_some_and(|partitions| partitions.contains_key(tp))
    }
}

pub struct OffsetStore {
    partition: Arc<Partition>,
    committed: Mutex<HashMap<String, BTreeMap<TopicPartition, CommittedOffset>>>,
    /// Lock order: `pending` before `committed`.
    pending: Mutex<PendingOffsets>,
}

impl OffsetStore {
    /// Opens the store, creating the internal topic if needed and replaying it.
    pub fn open(log: &Log) -> Result<Self, LogError> {
        let partition = internal::open_topic(log, CONSUMER_OFFSETS_TOPIC)?;
        let store = Self { partition, committed: Mutex::new(HashMap::new()), pending: Mutex::default() };
        store.replay()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<TopicPartition, CommittedOffset>>> {
        self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pending(&self) -> MutexGuard<'_, PendingOffsets> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replay(&self) -> Result<(), LogError> {
        let mut count = 0usize;
        internal::replay(&self.partition, |header, batch| {
            if header.is_control() {
                let commit = records::control_type(batch).map(|t| t == records::ControlType::Commit).unwrap_or(false);
                self.complete_transaction(header.producer_id, commit);
                return Ok(());
            }
            let decoded =
                records::decode_records(batch, usize::MAX).map_err(|e| LogError::InvalidRecords(e.to_string()))?;
            for record in decoded.iter() {
                let Some((group, tp)) = record.key.and_then(decode_key) else { continue };
                let value = record.value.and_then(decode_value);
                count += 1;
                if header.is_transactional() {
                    self.lock_pending().add(header.producer_id, group, tp, value);
                } else {
                    self.apply(group, tp, value);
                }
            }
            Ok(())
        })?;
        tracing::info!(records = count, groups = self.lock().len(), "restored committed offsets");
        Ok(())
    }

    fn apply(&self, group: String, tp: TopicPartition, value: Option<CommittedOffset>) {
        let mut committed = self.lock();
        match value {
            Some(value) => {
                committed.entry(group).or_default().insert(tp, value);
            }
            None => {
                if let Some(offsets) = committed.get_mut(&group) {
                    offsets.remove(&tp);
                    if offsets.is_empty() {
                        committed.remove(&group);
                    }
                }
            }
        }
    }

    /// Stores offsets durably, then makes them visible. All or nothing.
    pub async fn commit(&self, group: &str, offsets: Vec<(TopicPartition, CommittedOffset)>) -> Result<(), GroupError> {
        check_names(group, offsets.iter().map(|(tp, _)| tp))?;
        check_metadata(&offsets)?;
        let entries: Vec<_> = offsets.into_iter().map(|(tp, v)| (tp, Some(v))).collect();
        self.append(group, &entries, None).await?;
        for (tp, value) in entries {
            self.apply(group.to_owned(), tp, value);
        }
        Ok(())
    }

    /// Stores offsets as part of a producer's transaction (TxnOffsetCommit); they take
    /// effect when [`Self::complete_transaction`] is called with `commit = true`.
    pub async fn commit_transactional(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        group: &str,
        offsets: Vec<(TopicPartition, CommittedOffset)>,
    ) -> Result<(), GroupError> {
        check_names(group, offsets.iter().map(|(tp, _)| tp))?;
        check_metadata(&offsets)?;
        let entries: Vec<_> = offsets.into_iter().map(|(tp, v)| (tp, Some(v))).collect();
        self.append(group, &entries, Some((producer_id, producer_epoch))).await?;
        let mut pending = self.lock_pending();
        for (tp, value) in entries {
            pending.add(producer_id, group.to_owned(), tp, value);
        }
        Ok(())
    }

    /// Applies (commit) or drops (abort) a producer's transactional offsets.
    pub fn complete_transaction(&self, producer_id: i64, commit: bool) {
        // Held while applying, so a require_stable fetch never sees an offset neither
        // pending nor committed yet (and answers the old one as stable).
        let mut pending = self.lock_pending();
        let offsets = pending.take(producer_id);
        if commit {
            for (group, tp, value) in offsets {
                self.apply(group, tp, value);
            }
        }
    }

    /// The partition transaction markers for this store go to.
    pub fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    /// Committed offsets of a group: the given partitions, or all of them.
    pub fn fetch(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
    ) -> Vec<(TopicPartition, Option<CommittedOffset>)> {
        let committed = self.lock();
        let offsets = committed.get(group);
        match partitions {
            Some(partitions) => {
                partitions.iter().map(|tp| (tp.clone(), offsets.and_then(|o| o.get(tp)).cloned())).collect()
            }
            None => {
                offsets.map(|o| o.iter().map(|(tp, v)| (tp.clone(), Some(v.clone()))).collect()).unwrap_or_default()
            }
        }
    }

    /// [`Self::fetch`] for OffsetFetch with require_stable (Kafka's read_committed
    /// consumers): a partition with an offset pending in an open transaction is
    /// `Err(UnstableOffsetCommit)` until that transaction ends, rather than the committed
    /// offset the transaction is about to replace.
    pub fn fetch_stable(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
    ) -> Vec<(TopicPartition, StableOffset)> {
        let pending = self.lock_pending();
        self.fetch(group, partitions)
            .into_iter()
            .map(|(tp, committed)| {
                let committed =
                    if pending.is_pending(group, &tp) { Err(GroupError::UnstableOffsetCommit) } else { Ok(committed) };
                (tp, committed)
            })
            .collect()
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.lock().keys().cloned().collect();
        groups.sort();
        groups
    }

    /// Deletes offsets (OffsetDelete), or all of a group's offsets with `None` (DeleteGroups).
    pub async fn delete(&self, group: &str, partitions: Option<Vec<TopicPartition>>) -> Result<(), GroupError> {
        let partitions = partitions.unwrap_or_else(|| self.fetch(group, None).into_iter().map(|(tp, _)| tp).collect());
        check_names(group, partitions.iter())?;
        if partitions.is_empty() {
            return Ok(());
        }
        let entries: Vec<_> = partitions.into_iter().map(|tp| (tp, None)).collect();
        self.append(group, &entries, None).await?;
        for (tp, value) in entries {
            self.apply(group.to_owned(), tp, value);
        }
        Ok(())
    }

    async fn append(
        &self,
        group: &str,
        entries: &[(TopicPartition, Option<CommittedOffset>)],
        txn: Option<(i64, i16)>,
    ) -> Result<(), GroupError> {
        let mut builder = BatchBuilder::new();
        if let Some((producer_id, epoch)) = txn {
            builder = builder.producer(producer_id, epoch, -1).transactional(true);
        }
        let now = entries.iter().find_map(|(_, v)| v.as_ref().map(|v| v.commit_timestamp)).unwrap_or(0);
        for (tp, value) in entries {
            builder.push(NewRecord::new(
                Some(&encode_key(group, tp)),
                value.as_ref().map(encode_value).as_deref(),
                now,
            ));
        }
        let partition = self.partition.clone();
        let bytes = builder.build();
        tokio::task::spawn_blocking(move || partition.append(bytes))
            .await
            .map_err(|e| GroupError::Storage(e.to_string()))?
            .map_err(|e| GroupError::Storage(e.to_string()))?;
        Ok(())
    }
}

/// Refuses names an offset record cannot hold whole (see [`OFFSET_KEY_NAME_BYTES_MAX`]).
fn check_names<'a>(group: &str, mut partitions: impl Iterator<Item = &'a TopicPartition>) -> Result<(), GroupError> {
    if group.len() > OFFSET_KEY_NAME_BYTES_MAX {
        return Err(GroupError::InvalidGroupId(format!(
            "the group id is {} bytes; group ids are limited to {OFFSET_KEY_NAME_BYTES_MAX} bytes",
            group.len()
        )));
    }
    match partitions.find(|(topic, _)| topic.len() > OFFSET_KEY_NAME_BYTES_MAX) {
        // No such topic can exist (the log limits names to 249 bytes).
        Some((topic, _)) => Err(GroupError::Storage(format!(
            "a topic name of {} bytes cannot be stored (at most {OFFSET_KEY_NAME_BYTES_MAX}); commit offsets of existing topics only",
            topic.len()
        ))),
        None => Ok(()),
    }
}

fn check_metadata(offsets: &[(TopicPartition, CommittedOffset)]) -> Result<(), GroupError> {
    match offsets.iter().find(|(_, v)| v.metadata.len() > OFFSET_METADATA_BYTES_MAX) {
        Some((_, v)) => Err(GroupError::MetadataTooLarge { len: v.metadata.len(), max: OFFSET_METADATA_BYTES_MAX }),
        None => Ok(()),
    }
}

fn encode_key(group: &str, (topic, partition): &TopicPartition) -> Vec<u8> {
    let mut out = vec![KEY_KIND_OFFSET];
    put_str(&mut out, group);
    put_str(&mut out, topic);
    out.extend_from_slice(&partition.to_be_bytes());
    out
}

fn encode_value(value: &CommittedOffset) -> Vec<u8> {
    let mut out = vec![VALUE_VERSION];
    out.extend_from_slice(&value.offset.to_be_bytes());
    out.extend_from_slice(&value.leader_epoch.to_be_bytes());
    put_str(&mut out, &value.metadata);
    out.extend_from_slice(&value.commit_timestamp.to_be_bytes());
    out
}

fn decode_key(bytes: &[u8]) -> Option<(String, TopicPartition)> {
    let mut c = Reader(bytes);
    (c.u8()? == KEY_KIND_OFFSET).then_some(())?;
    Some((c.string()?, (c.string()?, c.i32()?)))
}

fn decode_value(bytes: &[u8]) -> Option<CommittedOffset> {
    let mut c = Reader(bytes);
    (c.u8()? == VALUE_VERSION).then_some(())?;
    Some(CommittedOffset {
        offset: c.i64()?,
        leader_epoch: c.i32()?,
        metadata: c.string()?,
        commit_timestamp: c.i64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip_and_garbage_is_ignored() {
        let tp = ("orders".to_owned(), 3);
        assert_eq!(decode_key(&encode_key("g1", &tp)), Some(("g1".to_owned(), tp)));
        let value = CommittedOffset { offset: 42, leader_epoch: -1, metadata: "m".into(), commit_timestamp: 7 };
        assert_eq!(decode_value(&encode_value(&value)), Some(value.clone()));
        let encoded = encode_value(&value);
        for cut in 0..encoded.len() {
            assert_eq!(decode_value(&encoded[..cut]), None);
        }
    }
}
