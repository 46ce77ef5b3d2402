//! Per-partition producer state: idempotent-producer sequences, open transactions (which
//! set the last stable offset) and the aborted-transaction index read_committed readers
//! need. It is rebuilt on open from the newest snapshot plus a replay of the batches after
//! it, so it survives restarts.
//!
//! Snapshot file `{offset:020}.snapshot` (big-endian), the state as of `offset`:
//! ```text
//! magic "KPST" | version u8 (2; 1 is read too) | 3 reserved | offset i64 | producer_count u32
//! per producer: id i64 | epoch i16 | txn_first_offset i64 (-1 none) | last_timestamp i64 | n u8 | n x (first_seq i32, last_seq i32, base_offset i64, last_offset i64)
//! (`last_timestamp`: when the producer last appended, by the log's clock. Version 1 stored
//! the largest record timestamp there, which a client sets: it is read as unknown, and
//! unknown times — and producers rebuilt by replaying batches — count from the open.)
//! aborted_count u32 | per aborted transaction: producer_id i64 | first_offset i64 | last_offset i64
//! crc32c u32 of everything before it
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::batch::BatchHeader;
use crate::codec::Reader;
use crate::error::{LogError, Result};

/// How many recent batches per producer are remembered for duplicate detection (Kafka: 5,
/// matching max.in.flight.requests.per.connection for idempotent producers).
pub const PRODUCER_BATCHES_CACHED: usize = 5;
/// A last append time not known (read from a version-1 snapshot) until
/// [`ProducerState::settle_unknown_append_times`].
const LAST_APPEND_UNKNOWN: i64 = i64::MIN;
const SNAPSHOT_VERSION: u8 = 2;

/// Upper bound on producers one snapshot may describe; larger counts mean damage.
const SNAPSHOT_PRODUCERS_MAX: usize = 10_000_000;

/// Whether a control batch commits or aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Abort,
    Commit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchMeta {
    first_seq: i32,
    last_seq: i32,
    base_offset: i64,
    last_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMeta>,
    txn_first_offset: Option<i64>,
    /// When it last appended (ms): what expiration goes by.
    last_timestamp: i64,
}

/// An aborted transaction: a read_committed reader drops this producer's records from
/// `first_offset` up to the abort marker at `last_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New data: assign offsets and write it.
    Append,
    /// A retry of a batch already written at these offsets: acknowledge, write nothing.
    Duplicate { base_offset: i64, last_offset: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerState {
    producers: HashMap<i64, ProducerEntry>,
    /// Open transactions: first offset -> producer id.
    ongoing: BTreeMap<i64, i64>,
    /// Aborted transactions in marker order.
    aborted: Vec<AbortedTxn>,
}

impl ProducerState {
    /// Decides whether a producer's batch is new, a duplicate, or an error, before any
    /// offsets are assigned.
    pub fn admit(&self, header: &BatchHeader) -> Result<Admission> {
        if !header.has_producer_id() {
            return Ok(Admission::Append);
        }
        let Some(entry) = self.producers.get(&header.producer_id) else {
            return Ok(Admission::Append);
        };
        if header.producer_epoch < entry.epoch {
            return Err(LogError::ProducerFenced {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                current_epoch: entry.epoch,
            });
        }
        if header.is_control() || header.base_sequence < 0 {
            return Ok(Admission::Append);
        }
        if header.producer_epoch > entry.epoch {
            return match header.base_sequence {
                0 => Ok(Admission::Append),
                received => Err(LogError::OutOfOrderSequence {
                    producer_id: header.producer_id,
                    epoch: header.producer_epoch,
                    received,
                    expected: 0,
                }),
            };
        }
        let last_seq = header.last_sequence();
        if let Some(dup) = entry.batches.iter().find(|b| b.first_seq == header.base_sequence && b.last_seq == last_seq)
        {
            return Ok(Admission::Duplicate { base_offset: dup.base_offset, last_offset: dup.last_offset });
        }
        // No batch at this epoch yet (an end marker with a newer epoch cleared them): the
        // epoch's first sequence must be 0 (Kafka's `ProducerAppendInfo.checkSequence`). A
        // producer this partition does not know at all may start anywhere (returned above).
        let expected = entry.batches.back().map_or(0, |b| next_sequence(b.last_seq));
        if header.base_sequence != expected {
            return Err(LogError::OutOfOrderSequence {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                received: header.base_sequence,
                expected,
            });
        }
        Ok(Admission::Append)
    }

    /// Records a batch that was written with its final offsets at `at_ms` (also used to
    /// replay the log on recovery). `marker` is set for control batches.
    pub fn apply(&mut self, header: &BatchHeader, marker: Option<Marker>, at_ms: i64) {
        if !header.has_producer_id() {
            return;
        }
        let entry = self.producers.entry(header.producer_id).or_insert_with(|| ProducerEntry {
            epoch: header.producer_epoch,
            batches: VecDeque::new(),
            txn_first_offset: None,
            last_timestamp: -1,
        });
        if header.producer_epoch > entry.epoch {
            entry.batches.clear();
        }
        entry.epoch = entry.epoch.max(header.producer_epoch);
        entry.last_timestamp = entry.last_timestamp.max(at_ms);
        if let Some(marker) = marker {
            if let Some(first_offset) = entry.txn_first_offset.take() {
                self.ongoing.remove(&first_offset);
                if marker == Marker::Abort {
                    self.aborted.push(AbortedTxn {
                        producer_id: header.producer_id,
                        first_offset,
                        last_offset: header.base_offset,
                    });
                }
            }
            return;
        }
        if header.base_sequence >= 0 {
            entry.batches.push_back(BatchMeta {
                first_seq: header.base_sequence,
                last_seq: header.last_sequence(),
                base_offset: header.base_offset,
                last_offset: header.last_offset(),
            });
            while entry.batches.len() > PRODUCER_BATCHES_CACHED {
                entry.batches.pop_front();
            }
        }
        if header.is_transactional() && entry.txn_first_offset.is_none() {
            entry.txn_first_offset = Some(header.base_offset);
            self.ongoing.insert(header.base_offset, header.producer_id);
        }
    }

    /// First offset of the oldest open transaction, capped at `high_watermark`.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.ongoing.keys().next().map_or(high_watermark, |&first| first.min(high_watermark))
    }

    /// The producer's open transaction, if any (its first offset).
    pub fn open_transaction(&self, producer_id: i64) -> Option<i64> {
        self.producers.get(&producer_id).and_then(|e| e.txn_first_offset)
    }

    /// The current epoch of a producer this partition has seen.
    pub fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.producers.get(&producer_id).map(|e| e.epoch)
    }

    /// Aborted transactions that overlap offsets `[from, to)`, in marker order.
    pub fn aborted_in_range(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        // Entries are sorted by last_offset; those ending before `from` cannot overlap.
        let start = self.aborted.partition_point(|a| a.last_offset < from);
        self.aborted[start..].iter().filter(|a| a.first_offset < to).copied().collect()
    }

    /// Forgets producers without an open transaction whose last append is at least
    /// `expiration_ms` before `now_ms` (Kafka's producer.id.expiration.ms). Returns how many.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, e| {
            e.txn_first_offset.is_some()
                || e.last_timestamp == LAST_APPEND_UNKNOWN
                || now_ms.saturating_sub(e.last_timestamp) < expiration_ms
        });
        before - self.producers.len()
    }

    /// Keeps at most `producers_max` producers: past it, forgets the idle ones (no open
    /// transaction) that appended least recently, down to nine tenths of `producers_max`
    /// so the next forgetting is many appends away. What a forgotten producer loses is what
    /// expiration takes (duplicate detection of its retries). Producers with open
    /// transactions are kept, even past the limit. Returns how many were forgotten.
    pub fn limit(&mut self, producers_max: usize) -> usize {
        if self.producers.len() <= producers_max {
            return 0;
        }
        let keep = producers_max - producers_max / 10;
        // Least recently appended first: by append time, then by the offset of the last
        // batch (after a crash every replayed producer has the open as its time, and the
        // offsets keep the order they appended in), then by id.
        let mut idle: Vec<(i64, i64, i64)> = self
            .producers
            .iter()
            .filter(|(_, e)| e.txn_first_offset.is_none())
            .map(|(id, e)| (e.last_timestamp, e.batches.back().map_or(-1, |b| b.last_offset), *id))
            .collect();
        let excess = (self.producers.len() - keep).min(idle.len());
        if excess == 0 {
            return 0;
        }
        idle.select_nth_unstable(excess - 1);
        for (_, _, id) in &idle[..excess] {
            self.producers.remove(id);
        }
        excess
    }

    /// How many producers this partition remembers.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Gives producers whose last append time is unknown (a version-1 snapshot) `now_ms`,
    /// so expiration counts from the open instead of from a client's record timestamps.
    pub fn settle_unknown_append_times(&mut self, now_ms: i64) {
        for entry in self.producers.values_mut().filter(|e| e.last_timestamp == LAST_APPEND_UNKNOWN) {
            entry.last_timestamp = now_ms;
        }
    }

    /// Forgets aborted transactions that ended before the log start (retention removed them).
    pub fn forget_before(&mut self, log_start_offset: i64) {
        self.aborted.retain(|a| a.last_offset >= log_start_offset);
    }

    pub fn encode(&self, offset: i64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"KPST");
        out.extend_from_slice(&[SNAPSHOT_VERSION, 0, 0, 0]);
        out.extend_from_slice(&offset.to_be_bytes());
        let mut ids: Vec<_> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let entry = &self.producers[&id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.extend_from_slice(&entry.txn_first_offset.unwrap_or(-1).to_be_bytes());
            out.extend_from_slice(&entry.last_timestamp.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for b in &entry.batches {
                out.extend_from_slice(&b.first_seq.to_be_bytes());
                out.extend_from_slice(&b.last_seq.to_be_bytes());
                out.extend_from_slice(&b.base_offset.to_be_bytes());
                out.extend_from_slice(&b.last_offset.to_be_bytes());
            }
        }
        out.extend_from_slice(&(self.aborted.len() as u32).to_be_bytes());
        for a in &self.aborted {
            out.extend_from_slice(&a.producer_id.to_be_bytes());
            out.extend_from_slice(&a.first_offset.to_be_bytes());
            out.extend_from_slice(&a.last_offset.to_be_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a snapshot; returns the offset it describes and the state, or None when the
    /// file is damaged (the caller then replays from further back).
    pub fn decode(bytes: &[u8]) -> Option<(i64, Self)> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut r = Reader(body);
        if r.take(4)? != b"KPST" {
            return None;
        }
        let version = r.take(4)?[0];
        if version != 1 && version != SNAPSHOT_VERSION {
            return None;
        }
        let offset = r.i64()?;
        let mut state = Self::default();
        let producers = r.u32()? as usize;
        if producers > SNAPSHOT_PRODUCERS_MAX {
            return None;
        }
        for _ in 0..producers {
            let id = r.i64()?;
            let epoch = r.i16()?;
            let txn_first_offset = Some(r.i64()?).filter(|&o| o >= 0);
            let last_timestamp = match r.i64()? {
                _ if version == 1 => LAST_APPEND_UNKNOWN,
                stored => stored,
            };
            let n = r.u8()? as usize;
            let mut batches = VecDeque::with_capacity(n.min(PRODUCER_BATCHES_CACHED));
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    first_seq: r.i32()?,
                    last_seq: r.i32()?,
                    base_offset: r.i64()?,
                    last_offset: r.i64()?,
                });
            }
            if let Some(first) = txn_first_offset {
                state.ongoing.insert(first, id);
            }
            state.producers.insert(id, ProducerEntry { epoch, batches, txn_first_offset, last_timestamp });
        }
        let aborted = r.u32()? as usize;
        for _ in 0..aborted {
            state.aborted.push(AbortedTxn { producer_id: r.i64()?, first_offset: r.i64()?, last_offset: r.i64()? });
        }
        r.is_empty().then_some((offset, state))
    }
}

fn next_sequence(sequence: i32) -> i32 {
    if sequence == i32::MAX { 0 } else { sequence + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, base: i64, count: i32, txn: bool) -> BatchHeader {
        BatchHeader {
            base_offset: base,
            batch_length: 100,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: if txn { 0x10 } else { 0 },
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: count,
        }
    }

    #[test]
    fn duplicates_out_of_order_and_fencing() {
        let mut state = ProducerState::default();
        let first = header(7, 0, 0, 0, 3, false);
        assert_eq!(state.admit(&first).unwrap(), Admission::Append);
        state.apply(&first, None, 0);
        assert_eq!(
            state.admit(&header(7, 0, 0, 99, 3, false)).unwrap(),
            Admission::Duplicate { base_offset: 0, last_offset: 2 }
        );
        assert!(matches!(
            state.admit(&header(7, 0, 5, 3, 1, false)),
            Err(LogError::OutOfOrderSequence { expected: 3, .. })
        ));
        assert_eq!(state.admit(&header(7, 0, 3, 3, 1, false)).unwrap(), Admission::Append);
        state.apply(&header(7, 1, 0, 3, 1, false), None, 0);
        assert!(matches!(
            state.admit(&header(7, 0, 4, 4, 1, false)),
            Err(LogError::ProducerFenced { current_epoch: 1, .. })
        ));
    }

    #[test]
    fn the_first_sequence_after_an_epoch_bump_by_a_marker_must_be_zero() {
        let mut state = ProducerState::default();
        state.apply(&header(7, 0, 0, 0, 5, true), None, 0);
        let mut abort = header(7, 1, -1, 5, 1, true);
        abort.attributes |= 0x20;
        assert_eq!(state.admit(&abort).unwrap(), Admission::Append);
        state.apply(&abort, Some(Marker::Abort), 0);
        assert!(matches!(
            state.admit(&header(7, 1, 7, 6, 1, true)),
            Err(LogError::OutOfOrderSequence { received: 7, expected: 0, .. })
        ));
        assert_eq!(state.admit(&header(7, 1, 0, 6, 1, true)).unwrap(), Admission::Append);
        // A producer this partition has never seen may start at any sequence (its earlier
        // batches may have been expired or deleted), as in Kafka.
        assert_eq!(state.admit(&header(8, 0, 42, 6, 1, false)).unwrap(), Admission::Append);
    }

    #[test]
    fn transactions_set_lso_and_abort_index_and_snapshot_round_trips() {
        let mut state = ProducerState::default();
        state.apply(&header(1, 0, 0, 10, 2, true), None, 0);
        state.apply(&header(2, 0, 0, 12, 1, true), None, 0);
        assert_eq!(state.last_stable_offset(100), 10);
        let mut abort = header(1, 0, -1, 13, 1, true);
        abort.attributes |= 0x20;
        state.apply(&abort, Some(Marker::Abort), 0);
        assert_eq!(state.last_stable_offset(100), 12);
        assert_eq!(
            state.aborted_in_range(0, 100),
            vec![AbortedTxn { producer_id: 1, first_offset: 10, last_offset: 13 }]
        );
        assert!(state.aborted_in_range(14, 100).is_empty());
        assert!(state.aborted_in_range(0, 10).is_empty());
        let bytes = state.encode(14);
        assert_eq!(ProducerState::decode(&bytes), Some((14, state.clone())));
        for cut in 0..bytes.len() {
            assert_eq!(ProducerState::decode(&bytes[..cut]), None, "truncated at {cut}");
        }
    }

    #[test]
    fn past_the_limit_the_least_recently_appended_idle_producers_are_forgotten() {
        let mut state = ProducerState::default();
        // Producer 1 opens a transaction first: the oldest, but never forgotten for that.
        state.apply(&header(1, 0, 0, 0, 1, true), None, 0);
        for pid in 2..=20 {
            state.apply(&header(pid, 0, 0, pid, 1, false), None, pid * 10);
            assert_eq!(state.limit(20), 0, "at or under the limit nothing is forgotten");
        }
        // Producer 2 appends again: now the most recent.
        state.apply(&header(2, 0, 1, 21, 1, false), None, 500);
        state.apply(&header(21, 0, 0, 22, 1, false), None, 600);
        assert_eq!(state.len(), 21);
        assert_eq!(state.limit(20), 3, "down to nine tenths of the limit");
        assert_eq!(state.len(), 18);
        for gone in [3, 4, 5] {
            assert_eq!(state.producer_epoch(gone), None, "producer {gone} appended least recently");
            assert_eq!(state.admit(&header(gone, 0, 0, 30, 1, false)).unwrap(), Admission::Append);
        }
        assert_eq!(state.open_transaction(1), Some(0), "the open transaction keeps its producer");
        assert_eq!(state.last_stable_offset(100), 0);
        assert_eq!(
            state.admit(&header(2, 0, 1, 99, 1, false)).unwrap(),
            Admission::Duplicate { base_offset: 21, last_offset: 21 },
            "a recent producer still has its duplicate detection"
        );

        // After a crash every replayed producer has the open as its append time: the offsets
        // of their batches keep the order they appended in (not their ids).
        let mut replayed = ProducerState::default();
        for (offset, pid) in [9, 1, 5].into_iter().enumerate() {
            replayed.apply(&header(pid, 0, 0, offset as i64, 1, false), None, 777);
        }
        assert_eq!(replayed.limit(2), 1);
        assert_eq!(replayed.producer_epoch(9), None, "producer 9 appended first");
        assert!(replayed.producer_epoch(1).is_some() && replayed.producer_epoch(5).is_some());

        // Only producers in transactions: nothing can be forgotten, nothing is lost.
        let mut busy = ProducerState::default();
        for pid in 0..5 {
            busy.apply(&header(pid, 0, 0, pid, 1, true), None, 0);
        }
        assert_eq!(busy.limit(2), 0);
        assert_eq!(busy.len(), 5);
    }

    #[test]
    fn idle_producers_expire_but_not_during_a_transaction() {
        let mut state = ProducerState::default();
        state.apply(&header(1, 0, 0, 0, 2, false), None, 1_000);
        state.apply(&header(2, 0, 0, 2, 1, true), None, 1_000);
        state.apply(&header(3, 0, 0, 3, 1, false), None, 5_000);
        assert_eq!(state.expire(10_999, 10_000), 0, "nothing idle for 10 s yet");
        assert_eq!(state.expire(11_000, 10_000), 1, "producer 1 is forgotten; 2 has an open transaction");
        assert_eq!(state.producer_epoch(1), None);
        assert_eq!(state.producer_epoch(2), Some(0));
        assert_eq!(state.last_stable_offset(100), 2, "the open transaction still holds the LSO");
        assert_eq!(state.admit(&header(1, 0, 0, 99, 2, false)).unwrap(), Admission::Append, "no longer a duplicate");
        let mut commit = header(2, 0, -1, 4, 1, true);
        commit.attributes |= 0x20;
        state.apply(&commit, Some(Marker::Commit), 12_000);
        assert_eq!(state.expire(20_000, 10_000), 1, "producer 3 (idle since 5 s) goes; 2 appended at 12 s");
        assert_eq!(state.expire(22_000, 10_000), 1, "then producer 2");
        assert_eq!(state.encode(5), ProducerState::default().encode(5));
    }

    /// A version-1 snapshot stored record timestamps: its producers' append times are read
    /// as unknown and settled to the open time, so none expires at the first pass.
    #[test]
    fn version_1_snapshots_count_idle_time_from_the_open() {
        let mut state = ProducerState::default();
        state.apply(&header(1, 0, 0, 0, 2, false), None, 5);
        let mut v1 = state.encode(2);
        v1[4] = 1;
        let body = v1.len() - 4;
        let crc = crc32c::crc32c(&v1[..body]);
        v1[body..].copy_from_slice(&crc.to_be_bytes());
        let (_, mut read) = ProducerState::decode(&v1).unwrap();
        assert_eq!(read.expire(1_000_000, 10), 0, "unknown append times never expire before they are settled");
        read.settle_unknown_append_times(1_000_000);
        assert_eq!(read.expire(1_000_009, 10), 0);
        assert_eq!(read.expire(1_000_010, 10), 1);
        let mut v3 = state.encode(2);
        v3[4] = 3;
        let crc = crc32c::crc32c(&v3[..body]);
        v3[body..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(ProducerState::decode(&v3), None, "an unknown version is not guessed at");
    }
}
