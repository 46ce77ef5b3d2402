//! The cleaner: rewrites closed segments of compacted topics keeping the latest record per
//! compaction key. The compaction key is the record key, or (key, sub-key) when the topic
//! names a sub-key header (`kappa.compaction.subkey.header`).
//!
//! Rules (a record at offset `o` with key `k` and sub-key `s`):
//! - removed if a later record in the cleaned range has the same (k, s);
//! - with a sub-key header: removed if a later *whole-key tombstone* (key `k`, null value,
//!   no sub-key header) exists in the cleaned range — "delete the channel and its items";
//! - a tombstone that is the latest for its key is kept until its segment's last append
//!   (broker time, see [`Segment::last_append_ms`]) is older than `delete.retention.ms`,
//!   then removed;
//! - records of aborted transactions are removed; control batches (markers) are kept;
//! - records without a key are kept.
//!
//! Offsets never change: a cleaned batch keeps its base offset and offset deltas, and a
//! segment keeps its base offset even when cleaning empties it.
//!
//! Memory: the cleaned segment is written as it is produced, through a buffer of at most
//! [`CLEANED_BUFFER_BYTES_MAX`] (a larger batch is written straight from where it lies).
//!
//! Crash safety: the cleaned segment is written to `{base}.log.cleaned` and fsynced; the
//! old indexes are removed; the cleaned file is renamed over `{base}.log`; the directory is
//! fsynced. A crash leaves the old or the new segment (a leftover `.cleaned` is deleted on
//! open, a missing index is rebuilt by a scan).
//!
//! Invariant: the cleaned range is always a prefix of the log that ends before the active
//! segment, the last stable offset, any damaged segment, and any segment younger than
//! `min.compaction.lag.ms`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::BatchHeader;
use crate::clean_prefix::{self, CleanPrefix};
use crate::config::MAX_MESSAGE_BYTES_LIMIT;
use crate::error::{LogError, Result};
use crate::io::{OpenMode, StorageFile};
use crate::partition::Partition;
use crate::records::{self, Record};
use crate::segment::{self, Segment, Trust};

/// Default of `LogOptions::compaction_map_bytes_max`, the size of one cleaning pass's key
/// map (see there for how it is counted); a larger dirty range is cleaned in part (up to
/// the record where the map filled) and the rest on later passes.
pub const COMPACTION_MAP_BYTES_MAX: usize = 256 * 1024 * 1024;
/// What one map entry is counted as besides its key and sub-key bytes: about its hash
/// table slot (56 bytes) and control byte. `LogOptions::compaction_map_bytes_max` says 64.
const MAP_ENTRY_OVERHEAD_BYTES: usize = 64;
/// Most cleaned bytes held in memory before they are written to the `.cleaned` file: a
/// segment may be up to `segment.bytes` (1 GiB by default), too much to build in memory.
pub const CLEANED_BUFFER_BYTES_MAX: usize = 4 * 1024 * 1024;

/// What one cleaning pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionOutcome {
    pub segments_cleaned: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_removed: u64,
    pub tombstones_removed: u64,
    /// Offset up to which the log is now clean.
    pub cleaned_up_to: i64,
}

/// The cleaner's view of a partition, for status calls.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompactionStatus {
    pub cleanable_bytes: u64,
    pub dirty_bytes: u64,
    pub dirty_ratio: f64,
    pub cleaned_up_to: i64,
    pub last: Option<CompactionOutcome>,
}

/// The compaction key of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CompactionKey {
    key: Vec<u8>,
    subkey: Option<Vec<u8>>,
}

/// Latest offsets seen in the cleanable range.
#[derive(Default)]
struct KeyMap {
    latest: HashMap<CompactionKey, i64>,
    /// With a sub-key header: key -> offset of its latest whole-key tombstone.
    whole_key_tombstones: HashMap<Vec<u8>, i64>,
    bytes: usize,
    /// Set when the map filled up: the offset after the last record observed. Records from
    /// there on were not observed, so this pass neither removes them as superseded (no
    /// later record is in the map) nor expires their tombstones (an older value of the key
    /// could outlive them).
    end: Option<i64>,
}

/// A closed segment in the cleanable range.
struct Candidate {
    base_offset: i64,
    file: Arc<dyn StorageFile>,
    size: u64,
    /// Offset after the segment's last batch before cleaning.
    next_offset: i64,
    /// See [`Segment::last_append_ms`].
    last_append_ms: Option<i64>,
    path: PathBuf,
    /// Bytes not yet cleaned: all of them, none, or — the segment where a pass stopped
    /// because its key map filled — those from the offset index's entry at or before the
    /// cleaned end (at most one index interval more than the exact tail).
    dirty_bytes: u64,
}

impl KeyMap {
    fn observe(&mut self, record: &Record<'_>, subkey_header: Option<&str>) {
        let Some(key) = record.key else { return };
        let subkey = subkey_header.and_then(|name| record.header(name)).map(|v| v.unwrap_or_default().to_vec());
        if subkey_header.is_some()
            && subkey.is_none()
            && record.value.is_none()
            && self.whole_key_tombstones.insert(key.to_vec(), record.offset()).is_none()
        {
            self.bytes += key.len() + MAP_ENTRY_OVERHEAD_BYTES;
        }
        let entry = CompactionKey { key: key.to_vec(), subkey };
        let added = entry.key.len() + entry.subkey.as_ref().map_or(0, Vec::len) + MAP_ENTRY_OVERHEAD_BYTES;
        if self.latest.insert(entry, record.offset()).is_none() {
            self.bytes += added;
        }
    }

    /// Whether the record lies before where the map stopped (see [`KeyMap::end`]): observed,
    /// or in the prefix a previous pass cleaned, where it is its key's only record.
    fn observed(&self, offset: i64) -> bool {
        self.end.is_none_or(|end| offset < end)
    }

    /// Whether a record survives cleaning (before the tombstone-expiry rule).
    fn is_latest(&self, record: &Record<'_>, subkey_header: Option<&str>) -> bool {
        let Some(key) = record.key else { return true };
        let subkey = subkey_header.and_then(|name| record.header(name)).map(|v| v.unwrap_or_default().to_vec());
        let offset = record.offset();
        if subkey.is_some() && self.whole_key_tombstones.get(key).is_some_and(|&t| t > offset) {
            return false;
        }
        let entry = CompactionKey { key: key.to_vec(), subkey };
        self.latest.get(&entry).is_none_or(|&latest| latest <= offset)
    }
}

impl Partition {
    /// The closed segments the cleaner may rewrite now: a prefix of the log ending before
    /// the active segment, the last stable offset, and segments younger than the lag.
    fn cleanable_segments(&self) -> Vec<Candidate> {
        let config = self.config();
        let now = self.ctx.clock.now_ms();
        let last_stable_offset = self.last_stable_offset();
        let cleaned_up_to = self.clean_prefix_end(config.compaction_subkey_header.as_deref());
        let inner = self.lock_inner();
        let closed = &inner.segments[..inner.segments.len() - 1];
        closed
            .iter()
            // A damaged segment's unreadable tail must not be rewritten away: stop before it.
            .take_while(|s| {
                s.damage.is_none()
                    && s.next_offset <= last_stable_offset
                    && s.max_timestamp <= now - config.min_compaction_lag_ms
            })
            .map(|s| Candidate {
                base_offset: s.base_offset,
                file: s.file.clone(),
                size: s.size,
                next_offset: s.next_offset,
                last_append_ms: s.last_append_ms,
                path: s.path.clone(),
                dirty_bytes: dirty_bytes(s, cleaned_up_to),
            })
            .collect()
    }

    /// How dirty the log is: bytes written past the last cleaning, over all cleanable bytes.
    pub fn compaction_status(&self) -> CompactionStatus {
        let candidates = self.cleanable_segments();
        let cleaned_up_to = self.clean_prefix_end(self.config().compaction_subkey_header.as_deref());
        let cleanable_bytes: u64 = candidates.iter().map(|c| c.size).sum();
        let dirty_bytes: u64 = candidates.iter().map(|c| c.dirty_bytes).sum();
        let dirty_ratio = if cleanable_bytes == 0 { 0.0 } else { dirty_bytes as f64 / cleanable_bytes as f64 };
        let last = *self.last_compaction.lock().unwrap_or_else(|e| e.into_inner());
        CompactionStatus { cleanable_bytes, dirty_bytes, dirty_ratio, cleaned_up_to, last }
    }

    /// Runs one cleaning pass if the topic is compacted and the log is dirty enough
    /// (`min.cleanable.dirty.ratio`), or unconditionally with `force`.
    pub fn compact(&self, force: bool) -> Result<Option<CompactionOutcome>> {
        let config = self.config();
        if !config.cleanup_policy.compact {
            return Ok(None);
        }
        let _one_pass_at_a_time = self.compaction_lock.lock().unwrap_or_else(|e| e.into_inner());
        let status = self.compaction_status();
        if status.dirty_bytes == 0 || (!force && status.dirty_ratio < config.min_cleanable_dirty_ratio) {
            return Ok(None);
        }
        let subkey_header = config.compaction_subkey_header.as_deref();
        let mut candidates = self.cleanable_segments();
        // Aborted records never happened: they must not shadow older committed ones, so
        // they are left out of the key map (a superset of the range is harmless here).
        let cleanable_end = candidates.last().map_or(0, |c| c.next_offset);
        let aborted = self.lock_inner().producers.aborted_in_range(i64::MIN, cleanable_end);
        let observe_from = self.clean_prefix_end(subkey_header);
        let map = self.build_key_map(&mut candidates, observe_from, subkey_header, &aborted)?;
        let cleaned_end = map.end.unwrap_or_else(|| candidates.last().map_or(0, |c| c.next_offset));
        let tombstone_horizon = self.ctx.clock.now_ms().saturating_sub(config.delete_retention_ms);
        let mut outcome = CompactionOutcome::default();
        for candidate in &candidates {
            // delete.retention.ms is how long consumers get to see a delete after it became
            // readable: broker time since the segment's last append, as Kafka measured it
            // before KIP-534 (file mtime). Record timestamps are the producer's claim: a
            // replayed tombstone with an old CreateTime (or -1) would go at the first pass,
            // one dated in the future would never go, so they are not consulted. Unknown
            // (an empty segment; open() fills it otherwise) counts as young.
            let expire_tombstones = candidate.last_append_ms.is_some_and(|t| t < tombstone_horizon);
            let cleaned_path = self.ctx.dir.join(format!("{}.cleaned", segment::log_file_name(candidate.base_offset)));
            let cleaned_bytes = self
                .write_cleaned(candidate, &cleaned_path, |out| {
                    clean_segment(candidate, &map, subkey_header, expire_tombstones, &aborted, &mut outcome, out)
                })
                .and_then(|bytes| self.swap_in(candidate, &cleaned_path).map(|()| bytes))
                .inspect_err(|_| self.remove_leftover(&cleaned_path))?;
            outcome.segments_cleaned += 1;
            outcome.bytes_before += candidate.size;
            outcome.bytes_after += cleaned_bytes;
        }
        outcome.cleaned_up_to = cleaned_end;
        self.record_clean_prefix(CleanPrefix::new(cleaned_end, subkey_header))?;
        *self.last_compaction.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        tracing::info!(
            topic = %self.ctx.topic, partition = self.ctx.partition, segments = outcome.segments_cleaned,
            bytes_before = outcome.bytes_before, bytes_after = outcome.bytes_after,
            records_removed = outcome.records_removed, tombstones_removed = outcome.tombstones_removed,
            "compacted"
        );
        Ok(Some(outcome))
    }

    /// Where the key map starts: the end of the prefix the last pass cleaned, in which no
    /// compaction key occurs twice (so a record there whose key the map lacks is its key's
    /// latest), as Kafka's cleaner starts at its first dirty offset. So a log with more keys
    /// than one map holds is cleaned a map's worth further each pass instead of stopping at
    /// the same offset every time. The whole log when the sub-key header changed since (the
    /// prefix's keys were distinct under the old one).
    fn clean_prefix_end(&self, subkey_header: Option<&str>) -> i64 {
        self.clean_prefix.lock().unwrap_or_else(|e| e.into_inner()).end_under(subkey_header)
    }

    /// Remembers how far a pass cleaned and persists it. A failed fsync poisons the
    /// directory, as every failed fsync does; any other failure (a full disk) fails the
    /// pass without poisoning: the file keeps the previous, smaller claim, still true, and
    /// the cleaned segments stand.
    fn record_clean_prefix(&self, prefix: CleanPrefix) -> Result<()> {
        let written = clean_prefix::write(self.ctx.fs.as_ref(), &self.ctx.dir, &self.ctx.topic_id, &prefix);
        *self.clean_prefix.lock().unwrap_or_else(|e| e.into_inner()) = prefix;
        written.map_err(|e| match e {
            clean_prefix::WriteError::Sync(e) => self.poison(e),
            clean_prefix::WriteError::Other(e) => e,
        })
    }

    /// Reads every record of the candidates from offset `from` on into the key map,
    /// stopping after the record that takes the map past `compaction_map_bytes_max` (and
    /// shortening `candidates` to end with that record's segment): one segment of small
    /// unique keys can hold more keys than fit.
    fn build_key_map(
        &self,
        candidates: &mut Vec<Candidate>,
        from: i64,
        subkey_header: Option<&str>,
        aborted: &[crate::producer::AbortedTxn],
    ) -> Result<KeyMap> {
        let bytes_max = self.ctx.compaction_map_bytes_max;
        let mut map = KeyMap::default();
        for (i, candidate) in candidates.iter().enumerate() {
            if candidate.next_offset <= from {
                continue;
            }
            for_each_batch_while(candidate, |header, bytes| {
                if header.next_offset() <= from {
                    return Ok(true);
                }
                let decoded = records::decode_records(bytes, MAX_MESSAGE_BYTES_LIMIT)
                    .map_err(|e| corrupt(candidate, e.to_string()))?;
                if decoded.header().is_control() || is_aborted(decoded.header(), aborted) {
                    return Ok(true);
                }
                // Checked per record, not per batch: one batch of tiny distinct keys can
                // count far more than its own size (64 bytes of overhead per key).
                for record in decoded.iter().filter(|r| r.offset() >= from) {
                    map.observe(&record, subkey_header);
                    if map.bytes > bytes_max {
                        map.end = Some(record.offset() + 1);
                        return Ok(false);
                    }
                }
                Ok(true)
            })?;
            if let Some(end) = map.end {
                tracing::warn!(topic = %self.ctx.topic, partition = self.ctx.partition, end, "compaction key map is full; cleaning the log up to this offset this pass");
                candidates.truncate(i + 1);
                break;
            }
        }
        Ok(map)
    }

    /// Writes the cleaned copy of a segment to `cleaned_path` as `produce` emits it, and
    /// makes it durable (the first step of the swap, see module docs). Returns its size.
    fn write_cleaned(
        &self,
        candidate: &Candidate,
        cleaned_path: &Path,
        produce: impl FnOnce(&mut CleanedWriter<'_>) -> Result<()>,
    ) -> Result<u64> {
        let file = self.ctx.fs.open(cleaned_path, OpenMode::Create).map_err(|e| LogError::io(cleaned_path, e))?;
        let mut out = CleanedWriter::new(file.as_ref(), cleaned_path, candidate.size);
        produce(&mut out)?;
        let size = out.finish()?;
        // The rewrite is not an append: after a restart the segment's age (retention of
        // records without timestamps, tombstone expiry) comes from this file's time, so it
        // keeps the original's. Advisory: if it is lost, the segment only looks younger.
        if let Some(ms) = candidate.last_append_ms
            && let Err(e) = file.set_modified_ms(ms)
        {
            tracing::warn!(path = %cleaned_path.display(), error = %e, "could not keep a cleaned segment's modification time; it will look younger after a restart");
        }
        file.sync_data().map_err(|e| self.poison(LogError::io(cleaned_path, e)))?;
        Ok(size)
    }

    /// Removes a cleaned copy a failed pass left behind (best effort: open() removes any
    /// leftover too), so a disk the cleaner filled does not stay full until a restart.
    /// After the rename there is nothing left at `cleaned_path` to remove.
    fn remove_leftover(&self, cleaned_path: &Path) {
        match self.ctx.fs.remove_file(cleaned_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %cleaned_path.display(), error = %e, "could not remove the cleaned copy of a failed compaction; it is removed at the next start")
            }
        }
    }

    /// Replaces a closed segment by its cleaned copy, written and synced at `cleaned_path`,
    /// crash-safely (see module docs).
    fn swap_in(&self, candidate: &Candidate, cleaned_path: &Path) -> Result<()> {
        let fs = self.ctx.fs.as_ref();
        let dir = &self.ctx.dir;
        let base = candidate.base_offset;
        let mut inner = self.lock_inner();
        let Some(position) =
            inner.segments.iter().position(|s| s.base_offset == base && Arc::ptr_eq(&s.file, &candidate.file))
        else {
            // Retention deleted the segment meanwhile: drop the cleaned copy.
            drop(inner);
            fs.remove_file(cleaned_path).map_err(|e| LogError::io(cleaned_path, e))?;
            return Ok(());
        };
        for name in [segment::offset_index_file_name(base), segment::time_index_file_name(base)] {
            match fs.remove_file(&dir.join(&name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io(dir.join(name), e)),
            }
        }
        fs.sync_dir(dir).map_err(|e| self.poison(LogError::io(dir, e)))?;
        fs.rename(cleaned_path, &candidate.path).map_err(|e| LogError::io(&candidate.path, e))?;
        fs.sync_dir(dir).map_err(|e| self.poison(LogError::io(dir, e)))?;
        let (fresh, outcome) = Segment::open(fs, dir, base, Trust::Nothing)?;
        if let Some(reason) = outcome.stop_reason {
            // We just wrote and synced these bytes: failing to read them back is a bug or a
            // failing disk, never something to serve.
            let err = LogError::Corrupt { path: candidate.path.clone(), position: outcome.valid_bytes, reason };
            self.ctx.health.poison(&err);
            return Err(err);
        }
        // Its atomic writes fsync: a failure there is not forgiven either.
        fresh.write_indexes(fs, dir).map_err(|e| self.poison(e))?;
        let mut fresh = fresh;
        fresh.first_append_ms = inner.segments[position].first_append_ms;
        // The rewrite is not an append: the cleaned file's time must not make it younger.
        fresh.last_append_ms = inner.segments[position].last_append_ms.or(fresh.last_append_ms);
        inner.segments[position] = fresh;
        Ok(())
    }
}

/// A closed segment's bytes past `cleaned_up_to` (see [`Candidate::dirty_bytes`]). A pass
/// that stopped at a full key map ends inside a segment: its unread tail is dirty, or the
/// next pass would never be due for it.
fn dirty_bytes(segment: &Segment, cleaned_up_to: i64) -> u64 {
    if segment.base_offset >= cleaned_up_to {
        segment.size
    } else if segment.next_offset <= cleaned_up_to {
        0
    } else {
        segment.size.saturating_sub(segment.position_for(cleaned_up_to))
    }
}

/// Writes the cleaned batches of one segment to `out`.
fn clean_segment(
    candidate: &Candidate,
    map: &KeyMap,
    subkey_header: Option<&str>,
    expire_tombstones: bool,
    aborted: &[crate::producer::AbortedTxn],
    outcome: &mut CompactionOutcome,
    out: &mut CleanedWriter<'_>,
) -> Result<()> {
    for_each_batch(candidate, |header, bytes| {
        if header.is_control() {
            return out.push(bytes);
        }
        let aborted_batch = is_aborted(header, aborted);
        let rebuilt = records::rebuild_batch(
            bytes,
            |record| {
                let superseded = aborted_batch || !map.is_latest(record, subkey_header);
                let expired_tombstone = !superseded
                    && expire_tombstones
                    && record.key.is_some()
                    && record.value.is_none()
                    && map.observed(record.offset());
                outcome.records_removed += u64::from(superseded || expired_tombstone);
                outcome.tombstones_removed += u64::from(expired_tombstone);
                !(superseded || expired_tombstone)
            },
            MAX_MESSAGE_BYTES_LIMIT,
        )
        .map_err(|e| corrupt(candidate, e.to_string()))?;
        match rebuilt {
            Some(batch) => out.push(&batch),
            None => Ok(()),
        }
    })
}

/// Appends to a `.cleaned` file through a buffer of at most [`CLEANED_BUFFER_BYTES_MAX`].
struct CleanedWriter<'a> {
    file: &'a dyn StorageFile,
    path: &'a Path,
    buffer: Vec<u8>,
    /// Bytes already in the file.
    written: u64,
}

#[cfg(test)]
thread_local! {
    /// Over the [`CleanedWriter`]s of this thread: the largest buffer capacity, and how
    /// many writes reached a file. What the memory-bound test checks.
    static CLEANED_BUFFER_PEAK_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static CLEANED_WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl<'a> CleanedWriter<'a> {
    fn new(file: &'a dyn StorageFile, path: &'a Path, segment_bytes: u64) -> Self {
        // Cleaned output rarely outgrows its segment: a small one gets a small buffer.
        let capacity =
            usize::try_from(segment_bytes).map_or(CLEANED_BUFFER_BYTES_MAX, |s| s.min(CLEANED_BUFFER_BYTES_MAX));
        Self { file, path, buffer: Vec::with_capacity(capacity), written: 0 }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<()> {
        if self.buffer.len() + bytes.len() > CLEANED_BUFFER_BYTES_MAX {
            self.flush()?;
        }
        if bytes.len() > CLEANED_BUFFER_BYTES_MAX {
            // Already whole in memory (a rebuilt batch, or the scanner's chunk): no copy.
            return self.write_at_end(bytes);
        }
        // Exact, so doubling never takes the buffer past the bound.
        if self.buffer.capacity() < self.buffer.len() + bytes.len() {
            self.buffer.reserve_exact(bytes.len());
        }
        self.buffer.extend_from_slice(bytes);
        #[cfg(test)]
        CLEANED_BUFFER_PEAK_BYTES.with(|peak| peak.set(peak.get().max(self.buffer.capacity())));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buffer.is_empty() {
            let buffer = std::mem::take(&mut self.buffer);
            let written = self.write_at_end(&buffer);
            self.buffer = buffer;
            self.buffer.clear();
            written?;
        }
        Ok(())
    }

    fn write_at_end(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, self.written).map_err(|e| LogError::io(self.path, e))?;
        self.written += bytes.len() as u64;
        #[cfg(test)]
        CLEANED_WRITES.with(|writes| writes.set(writes.get() + 1));
        Ok(())
    }

    /// Writes what is still buffered; returns the file's size.
    fn finish(mut self) -> Result<u64> {
        self.flush()?;
        Ok(self.written)
    }
}

/// Calls `visit` for every batch of a closed segment (validated while scanning).
fn for_each_batch(candidate: &Candidate, mut visit: impl FnMut(&BatchHeader, &[u8]) -> Result<()>) -> Result<()> {
    for_each_batch_while(candidate, |header, bytes| visit(header, bytes).map(|()| true))
}

/// [`for_each_batch`] until `visit` returns false.
fn for_each_batch_while(
    candidate: &Candidate,
    mut visit: impl FnMut(&BatchHeader, &[u8]) -> Result<bool>,
) -> Result<()> {
    let mut failure = None;
    let outcome = segment::scan_batches_while(
        candidate.file.as_ref(),
        candidate.base_offset,
        candidate.size,
        |_, header, bytes| match visit(header, bytes) {
            Ok(go_on) => go_on,
            Err(e) => {
                failure = Some(e);
                false
            }
        },
    )
    .map_err(|e| LogError::io(&candidate.path, e))?;
    if let Some(err) = failure {
        return Err(err);
    }
    match outcome.stop_reason {
        Some(reason) => Err(corrupt(candidate, reason)),
        None => Ok(()),
    }
}

/// Whether a data batch belongs to an aborted transaction.
fn is_aborted(header: &BatchHeader, aborted: &[crate::producer::AbortedTxn]) -> bool {
    header.is_transactional()
        && aborted.iter().any(|a| {
            a.producer_id == header.producer_id
                && a.first_offset <= header.base_offset
                && header.base_offset < a.last_offset
        })
}

fn corrupt(candidate: &Candidate, reason: String) -> LogError {
    LogError::Corrupt { path: candidate.path.clone(), position: 0, reason }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::{CleanupPolicy, TopicConfig};
    use crate::io::sim::SimFs;
    use crate::partition::{Isolation, PartitionContext, SyncPolicy};
    use crate::records::{BatchBuilder, NewRecord};

    const T0: i64 = 1_700_000_000_000;
    const MIB: usize = 1024 * 1024;

    fn compacted_partition(fs: &SimFs, clock: &ManualClock) -> Partition {
        let config = TopicConfig {
            cleanup_policy: CleanupPolicy { delete: false, compact: true },
            segment_bytes: 64 * MIB as u64,
            segment_ms: 1_000,
            min_compaction_lag_ms: 0,
            max_message_bytes: 8 * MIB,
            ..TopicConfig::default()
        };
        // Appends then cost no fsync, which on SimFs copies the whole file.
        let sync_policy = SyncPolicy::IntervalMs(u64::MAX);
        let ctx = PartitionContext::for_test(Arc::new(fs.clone()), Arc::new(clock.clone()), config, sync_policy);
        Partition::open(ctx).expect("open partition").0
    }

    /// Every (key, value) a consumer reading from the start gets.
    fn key_values(p: &Partition) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = p.log_start_offset();
        while offset < p.high_watermark() {
            let read = p.read(offset, 64 * MIB, Isolation::ReadUncommitted).unwrap();
            let mut rest = &read.records[..];
            while !rest.is_empty() {
                let header = BatchHeader::parse(rest).unwrap();
                let decoded = records::decode_records(&rest[..header.total_bytes()], usize::MAX).unwrap();
                out.extend(decoded.iter().map(|r| (r.key.unwrap().to_vec(), r.value.unwrap().to_vec())));
                offset = header.next_offset();
                rest = &rest[header.total_bytes()..];
            }
        }
        out
    }

    /// A segment whose cleaned copy is larger than the buffer is written in several writes
    /// of at most the buffer (or one batch larger than it), and cleans to the same records.
    #[test]
    fn a_cleaned_segment_larger_than_the_buffer_is_written_in_bounded_chunks() {
        let fs = SimFs::new();
        let clock = ManualClock::new(T0);
        let p = compacted_partition(&fs, &clock);
        let value = |round: u8, key: usize| vec![round.wrapping_add(key as u8); 32 * 1024];
        // Two rounds over the same keys, 8 records of 32 KiB a batch: the second survives,
        // 5 MiB of it. Then one 6 MiB batch, larger than the buffer on its own.
        for round in 0..2u8 {
            for batch in 0..20 {
                let mut b = BatchBuilder::new();
                for key in batch * 8..batch * 8 + 8 {
                    b.push(NewRecord::new(Some(format!("k{key}").as_bytes()), Some(&value(round, key)), T0));
                }
                p.append(b.build()).unwrap();
            }
        }
        let big = vec![7u8; 6 * MIB];
        p.append(BatchBuilder::new().record(NewRecord::new(Some(b"big"), Some(&big), T0)).build()).unwrap();
        clock.advance(1_000); // segment.ms: the next append rolls
        p.append(BatchBuilder::new().record(NewRecord::new(Some(b"next"), Some(b"x"), T0)).build()).unwrap();
        p.flush().unwrap();
        assert_eq!(p.segment_count(), 2);
        let mut expected: Vec<(Vec<u8>, Vec<u8>)> =
            (0..160).map(|key| (format!("k{key}").into_bytes(), value(1, key))).collect();
        expected.push((b"big".to_vec(), big));
        expected.push((b"next".to_vec(), b"x".to_vec()));

        CLEANED_BUFFER_PEAK_BYTES.with(|peak| peak.set(0));
        CLEANED_WRITES.with(|writes| writes.set(0));
        let writes_before = fs.stats().writes;
        let outcome = p.compact(true).unwrap().expect("a pass ran");

        assert_eq!(outcome.segments_cleaned, 1);
        assert_eq!(outcome.records_removed, 160);
        assert!(outcome.bytes_after > 2 * CLEANED_BUFFER_BYTES_MAX as u64, "{outcome:?}");
        assert_eq!(key_values(&p), expected);
        let peak = CLEANED_BUFFER_PEAK_BYTES.with(|peak| peak.get());
        assert!(peak > 0 && peak <= CLEANED_BUFFER_BYTES_MAX, "buffer peaked at {peak} bytes");
        // A full buffer, the rest of the 5 MiB, the big batch; plus the two index files and
        // the clean prefix.
        let cleaned_writes = CLEANED_WRITES.with(|writes| writes.get());
        assert_eq!(cleaned_writes, 3);
        assert_eq!(fs.stats().writes - writes_before, cleaned_writes as u64 + 3, "all of them reached the file");
    }
}
