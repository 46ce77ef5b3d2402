//! One partition: an ordered list of segments, the producer state, and the durability
//! machinery (group commit, high watermark).
//!
//! Invariants:
//! - Offsets are assigned here, under `inner`, in append order; they only grow.
//! - The high watermark is the offset after the last *fsynced* batch (with the default
//!   policy): readers never see a record that a crash could take back.
//! - After a failed write or fsync the directory is poisoned; nothing is acknowledged again.
//!   Except a segment write refused for lack of space: it is cut off and only that append
//!   fails (see health.rs).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, TryLockError};

use crate::batch::{self, BatchHeader};
use crate::clock::Clock;
use crate::config::{MAX_MESSAGE_BYTES_LIMIT, TimestampType, TopicConfig};
use crate::error::{LogError, Result};
use crate::health::DirHealth;
use crate::io::{self, Storage, StorageFile};
use crate::producer::{AbortedTxn, Admission, Marker, ProducerState};
use crate::records::BATCH_UNCOMPRESSED_BYTES_MAX;
use crate::segment::{self, Segment, Trust, walk_headers};

/// When appends become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// An append completes after an fdatasync covers it; concurrent appends share syncs
    /// (group commit). The default.
    EveryAppend,
    /// Opt-in: an append completes once written; a background flush syncs every `ms`.
    /// A crash (power loss) can lose the last `ms` of acknowledged appends.
    IntervalMs(u64),
}

/// Which records a reader may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Up to the high watermark.
    ReadUncommitted,
    /// Up to the last stable offset, with the aborted transactions in range.
    ReadCommitted,
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The broker's timestamp when the topic uses LogAppendTime.
    pub log_append_time: Option<i64>,
    pub log_start_offset: i64,
    /// True when the batch was a producer retry of one already in the log.
    pub duplicate: bool,
}

/// Whole batches read from a partition plus the offsets a fetch response reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    pub records: Vec<u8>,
    pub high_watermark: i64,
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
    /// Aborted transactions overlapping the returned range (read_committed only).
    pub aborted: Vec<AbortedTxn>,
    /// The read looked at every offset below this one (it stops after `READ_SEGMENTS_MAX`
    /// segments): a read returning no batch found none from its offset up to here.
    pub scanned_to: i64,
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
}

/// What opening a partition found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionRecovery {
    pub segments: usize,
    pub bytes: u64,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    /// Opened from a clean-shutdown checkpoint without scanning.
    pub clean: bool,
    /// Bytes scanned to validate the tail.
    pub scanned_bytes: u64,
    /// Bytes cut off invalid tails, with the reason.
    pub truncated_bytes: u64,
    pub truncation_reasons: Vec<String>,
    /// Closed segments found damaged (kept as they are; reads stop at the damage).
    pub damaged_segments: Vec<String>,
}

/// Fixed facts about a partition given at open.
pub struct PartitionContext {
    pub topic: String,
    /// The topic's id (`topic.id`): which incarnation of a topic name this is.
    pub topic_id: [u8; crate::log::TOPIC_ID_BYTES],
    pub partition: i32,
    pub dir: PathBuf,
    pub fs: Arc<dyn Storage>,
    pub health: Arc<DirHealth>,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<RwLock<Arc<TopicConfig>>>,
    pub sync_policy: SyncPolicy,
    /// See [`crate::LogOptions::producer_id_expiration_ms`].
    pub producer_id_expiration_ms: i64,
    /// See [`crate::LogOptions::producers_per_partition_max`].
    pub producers_max: usize,
    /// See [`crate::LogOptions::compaction_map_bytes_max`].
    pub compaction_map_bytes_max: usize,
}

#[cfg(test)]
impl PartitionContext {
    /// Partition 0 of topic `t` in `/data` on `fs`, for the crate's unit tests.
    pub(crate) fn for_test(
        fs: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        config: TopicConfig,
        sync_policy: SyncPolicy,
    ) -> Self {
        Self {
            topic: "t".to_owned(),
            topic_id: [0; crate::log::TOPIC_ID_BYTES],
            partition: 0,
            dir: PathBuf::from("/data/t/0"),
            fs,
            health: Arc::new(DirHealth::new(PathBuf::from("/data"))),
            clock,
            config: Arc::new(RwLock::new(Arc::new(config))),
            sync_policy,
            producer_id_expiration_ms: i64::MAX,
            producers_max: 1000,
            compaction_map_bytes_max: crate::compaction::COMPACTION_MAP_BYTES_MAX,
        }
    }
}

pub struct Partition {
    pub(crate) ctx: PartitionContext,
    inner: Mutex<Inner>,
    /// One cleaning pass at a time; what the last one did and how far the log is clean.
    pub(crate) compaction_lock: Mutex<()>,
    /// How far the log is clean, and under which sub-key header (persisted in
    /// `clean_prefix.rs`, so a restart does not make the whole log dirty).
    pub(crate) clean_prefix: Mutex<crate::clean_prefix::CleanPrefix>,
    pub(crate) last_compaction: Mutex<Option<crate::compaction::CompactionOutcome>>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    high_watermark: AtomicI64,
    high_watermark_tx: tokio::sync::watch::Sender<i64>,
}

pub(crate) struct Inner {
    /// Sorted by base offset; the last is the active segment. Never empty.
    pub(crate) segments: Vec<Segment>,
    pub(crate) producers: ProducerState,
    /// The start a DeleteRecords moved past the first segment's base (persisted in
    /// `LOG_START_FILE`); i64::MIN when none did.
    deleted_before: i64,
    /// No producer limit pass before the producers number this many: set when a pass could
    /// not get far enough under the limit (the rest in open transactions), so appends do not
    /// scan every producer each time.
    producers_recheck_len: usize,
}

struct SyncState {
    in_flight: bool,
    synced_offset: i64,
    written_offset: i64,
    file: Arc<dyn StorageFile>,
}

/// Whether an append may wait for another thread or for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Allowed,
    /// Leave the append undone rather than wait for the partition lock or roll the segment.
    Never,
}

/// A batch starts with its base offset (`batch::set_base_offset`'s field).
const BASE_OFFSET_BYTES: usize = 8;
/// Snapshots of producer state older than the newest this many are deleted.
const SNAPSHOTS_KEPT: usize = 2;
const CHECKPOINT_FILE: &str = "clean.checkpoint";
/// The log start offset set by DeleteRecords (docs/format.md).
const LOG_START_FILE: &str = "log-start.offset";
const SNAPSHOT_SUFFIX: &str = ".snapshot";
/// Segments a single read looks at (bounds work per fetch on logs of tiny segments).
const READ_SEGMENTS_MAX: usize = 64;

impl Inner {
    fn active(&mut self) -> &mut Segment {
        self.segments.last_mut().expect("a partition always has an active segment")
    }
    fn log_end_offset(&self) -> i64 {
        self.segments.last().expect("a partition always has an active segment").next_offset
    }
    /// The first segment's base, or past it when records were deleted inside it.
    fn log_start_offset(&self) -> i64 {
        self.segments[0].base_offset.max(self.deleted_before)
    }
    /// Index of the segment that holds (or would hold) `offset`.
    fn segment_index_for(&self, offset: i64) -> usize {
        self.segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1)
    }
}

impl Partition {
    /// Opens (or creates) the partition in `ctx.dir`, recovering it: an invalid tail is
    /// truncated, indexes rebuilt when needed, producer state restored.
    pub fn open(ctx: PartitionContext) -> Result<(Self, PartitionRecovery)> {
        let fs = ctx.fs.clone();
        let dir = ctx.dir.clone();
        fs.create_dir_all(&dir).map_err(|e| LogError::io(&dir, e))?;
        let names = fs.list_dir(&dir).map_err(|e| LogError::io(&dir, e))?;
        remove_leftovers(fs.as_ref(), &dir, &names)?;
        let checkpoint = take_checkpoint(fs.as_ref(), &dir)?;
        let mut bases: Vec<i64> = names.iter().filter_map(|n| segment::parse_log_file_name(n)).collect();
        bases.sort_unstable();

        let mut report = PartitionRecovery { clean: checkpoint.is_some(), ..Default::default() };
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for (i, &base) in bases.iter().enumerate() {
            let is_last = i + 1 == bases.len();
            // Closed segments were synced with their indexes when they were rolled; the
            // active one is trusted only after a clean shutdown.
            let trust = match (is_last, checkpoint) {
                (false, _) => Trust::IndexesIfValid,
                (true, Some((active, size))) if active == base => Trust::Size(size),
                (true, _) => Trust::Nothing,
            };
            let (mut seg, outcome) = Segment::open(fs.as_ref(), &dir, base, trust)?;
            if outcome.scanned {
                report.scanned_bytes += outcome.valid_bytes;
            }
            match outcome.stop_reason {
                // A torn tail of the active segment is an interrupted write: cut it off.
                Some(reason) if is_last => {
                    let cut = outcome.file_bytes - outcome.valid_bytes;
                    tracing::warn!(topic = %ctx.topic, partition = ctx.partition, segment = base, cut_bytes = cut, %reason, "truncating invalid tail of segment");
                    seg.truncate(outcome.valid_bytes)?;
                    report.truncated_bytes += cut;
                    report.truncation_reasons.push(format!("segment {base}: {reason}"));
                }
                // Damage inside a closed segment was synced data once: keep the bytes (an
                // operator may repair them) and make reads stop there instead of skipping.
                Some(reason) => {
                    tracing::error!(topic = %ctx.topic, partition = ctx.partition, segment = base, valid_bytes = outcome.valid_bytes, %reason, "closed segment is damaged; reads past the damage will fail");
                    report
                        .damaged_segments
                        .push(format!("segment {base} after byte {}: {reason}", outcome.valid_bytes));
                    seg.damage = Some(reason);
                }
                None => {}
            }
            if is_last
                && outcome.scanned
                && let Some((position, reason)) = first_offset_gap(&seg)?
            {
                let cut = seg.size - position;
                tracing::warn!(topic = %ctx.topic, partition = ctx.partition, segment = base, cut_bytes = cut, %reason, "truncating invalid tail of segment");
                seg.truncate(position)?;
                seg.rebuild_from_scan(position)?;
                report.truncated_bytes += cut;
                report.truncation_reasons.push(format!("segment {base}: {reason}"));
            }
            if is_last && trust == Trust::Nothing {
                // What a crashed process left in the page cache is durable only after this.
                seg.file.sync_data().map_err(|e| LogError::io(&seg.path, e))?;
            }
            // Without a file time, records lacking timestamps age from now, never from -1.
            if seg.size > 0 {
                seg.last_append_ms.get_or_insert(ctx.clock.now_ms());
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(Segment::create(fs.as_ref(), &dir, 0)?);
        }
        let mut deleted_before = read_log_start(fs.as_ref(), &dir)?.unwrap_or(i64::MIN);
        let end = segments.last().expect("non-empty").next_offset;
        if deleted_before > end {
            // The records up to it were lost (a power loss under the interval sync policy):
            // records appended from here on must not be hidden behind the old start.
            tracing::warn!(topic = %ctx.topic, partition = ctx.partition, log_start_offset = deleted_before, log_end_offset = end, "the log ends before its recorded start; moving the start back to the end");
            let path = dir.join(LOG_START_FILE);
            io::write_file_atomic(fs.as_ref(), &path, &encode_log_start(end)).map_err(|e| LogError::io(&path, e))?;
            deleted_before = end;
        }
        let clean_prefix = crate::clean_prefix::read(fs.as_ref(), &dir, &ctx.topic_id, end)?;
        let mut inner =
            Inner { segments, producers: ProducerState::default(), deleted_before, producers_recheck_len: 0 };
        // Not limited here: a tool opening the directory with other options (the offline
        // commands) must not forget producers; a lowered limit applies at the next append.
        restore_producer_state(fs.as_ref(), &dir, &names, &mut inner, ctx.clock.now_ms())?;

        let log_end_offset = inner.log_end_offset();
        report.segments = inner.segments.len();
        report.bytes = inner.segments.iter().map(|s| s.size).sum();
        report.log_start_offset = inner.log_start_offset();
        report.log_end_offset = log_end_offset;
        let file = inner.segments.last().expect("non-empty").file.clone();
        let (high_watermark_tx, _) = tokio::sync::watch::channel(log_end_offset);
        let partition = Self {
            ctx,
            inner: Mutex::new(inner),
            compaction_lock: Mutex::new(()),
            clean_prefix: Mutex::new(clean_prefix),
            last_compaction: Mutex::new(None),
            sync: Mutex::new(SyncState {
                in_flight: false,
                synced_offset: log_end_offset,
                written_offset: log_end_offset,
                file,
            }),
            synced: Condvar::new(),
            high_watermark: AtomicI64::new(log_end_offset),
            high_watermark_tx,
        };
        Ok((partition, report))
    }

    pub fn topic(&self) -> &str {
        &self.ctx.topic
    }

    pub fn index(&self) -> i32 {
        self.ctx.partition
    }

    pub fn config(&self) -> Arc<TopicConfig> {
        self.ctx.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Offset after the last durable (visible) record.
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever the high watermark moves (long-poll wake-ups).
    pub fn watch_high_watermark(&self) -> tokio::sync::watch::Receiver<i64> {
        self.high_watermark_tx.subscribe()
    }

    pub fn log_start_offset(&self) -> i64 {
        self.lock_inner().log_start_offset()
    }

    /// Offset the next appended record will get.
    pub fn log_end_offset(&self) -> i64 {
        self.lock_inner().log_end_offset()
    }

    pub fn last_stable_offset(&self) -> i64 {
        let hw = self.high_watermark();
        self.lock_inner().producers.last_stable_offset(hw)
    }

    /// Total bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.lock_inner().segments.iter().map(|s| s.size).sum()
    }

    /// The largest record timestamp in the partition, if it holds any record.
    pub fn max_timestamp(&self) -> Option<i64> {
        self.lock_inner().segments.iter().map(|s| s.max_timestamp).max().filter(|&t| t >= 0)
    }

    pub fn segment_count(&self) -> usize {
        self.lock_inner().segments.len()
    }

    /// The current epoch of a producer, if this partition has seen it.
    pub fn producer_epoch(&self, producer_id: i64) -> Option<i16> {
        self.lock_inner().producers.producer_epoch(producer_id)
    }

    pub(crate) fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `inner`, or None when `wait` is [`Wait::Never`] and another thread holds it.
    fn lock_inner_unless_held(&self, wait: Wait) -> Option<MutexGuard<'_, Inner>> {
        match wait {
            Wait::Allowed => Some(self.lock_inner()),
            Wait::Never => match self.inner.try_lock() {
                Ok(inner) => Some(inner),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            },
        }
    }

    fn lock_sync(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one producer batch: validates it, assigns offsets, writes it, and returns
    /// once it is durable under the sync policy. A retried idempotent batch returns its
    /// original offsets without being written again.
    pub fn append(&self, bytes: Vec<u8>) -> Result<AppendOutcome> {
        let outcome = self.append_unsynced(bytes)?;
        self.wait_durable(outcome.last_offset + 1)?;
        Ok(outcome)
    }

    /// The first half of [`Self::append`]: validates, assigns offsets and writes, without
    /// waiting for durability. The batch is *not* acknowledged until
    /// [`Self::wait_until_durable`] returns for `outcome.last_offset + 1`: callers that
    /// pipeline appends (one connection's produce requests) write in order, then wait for
    /// all of them together so they share fsyncs. The batch may be borrowed (a slice of a
    /// request): it is written from where it lies, never copied whole.
    pub fn append_unsynced(&self, bytes: impl AsRef<[u8]>) -> Result<AppendOutcome> {
        self.append_checked(bytes.as_ref(), None, Wait::Allowed).map(appended)
    }

    /// [`Self::append_unsynced`] for a caller that must not block (an async runtime's
    /// worker): `Ok(None)`, with nothing changed, when the append would wait — for the
    /// partition lock, which another thread may hold through a roll's fsync, or to roll the
    /// segment itself (a roll fsyncs the closing segment, after any fsync in flight).
    /// Otherwise the same checks, outcome and errors. The write into the page cache is
    /// still done here.
    pub fn try_append_unsynced(&self, bytes: impl AsRef<[u8]>) -> Result<Option<AppendOutcome>> {
        self.append_checked(bytes.as_ref(), None, Wait::Never)
    }

    /// [`Self::append`], but only if the log still ends at `expected_end` when the batch
    /// would be written (checked under the partition lock): a conditional append for
    /// optimistic concurrency. Fails with [`LogError::EndMoved`] otherwise, writing nothing.
    pub fn append_if_end(&self, bytes: Vec<u8>, expected_end: i64) -> Result<AppendOutcome> {
        let outcome = self.append_checked(&bytes, Some(expected_end), Wait::Allowed).map(appended)?;
        self.wait_durable(outcome.last_offset + 1)?;
        Ok(outcome)
    }

    /// Validates the batch, then writes it (None: left undone, as `wait` asked).
    fn append_checked(&self, bytes: &[u8], expected_end: Option<i64>, wait: Wait) -> Result<Option<AppendOutcome>> {
        self.ctx.health.check()?;
        let config = self.config();
        if bytes.len() > config.max_message_bytes {
            return Err(LogError::MessageTooLarge { size: bytes.len(), max: config.max_message_bytes });
        }
        let header = batch::validate_produced(bytes, MAX_MESSAGE_BYTES_LIMIT)?;
        let marker = if header.is_control() { Some(control_marker(bytes)?) } else { None };
        if !header.is_control() {
            check_records(&header, bytes, config.cleanup_policy.compact)?;
        }
        self.write(bytes, header, marker, &config, expected_end, wait)
    }

    /// Blocks until everything below `offset` is durable under the sync policy (or fails
    /// if the directory was poisoned first).
    pub fn wait_until_durable(&self, offset: i64) -> Result<()> {
        self.wait_durable(offset)
    }

    /// Assigns offsets and writes under the partition lock (no fsync here, except a roll's).
    /// With [`Wait::Never`], returns None before changing anything when it would wait: the
    /// lock is held elsewhere, or the segment must roll. Nothing else here waits: `sync` is
    /// held only briefly, never across an fsync or a wait.
    fn write(
        &self,
        bytes: &[u8],
        mut header: BatchHeader,
        marker: Option<Marker>,
        config: &TopicConfig,
        expected_end: Option<i64>,
        wait: Wait,
    ) -> Result<Option<AppendOutcome>> {
        let now = self.ctx.clock.now_ms();
        let Some(mut inner) = self.lock_inner_unless_held(wait) else {
            return Ok(None);
        };
        self.ctx.health.check()?;
        if let Some(expected) = expected_end.filter(|e| *e != inner.log_end_offset()) {
            return Err(LogError::EndMoved { expected, actual: inner.log_end_offset() });
        }
        if let Admission::Duplicate { base_offset, last_offset } = inner.producers.admit(&header)? {
            return Ok(Some(AppendOutcome {
                base_offset,
                last_offset,
                log_append_time: None,
                log_start_offset: inner.log_start_offset(),
                duplicate: true,
            }));
        }
        let roll = must_roll(inner.segments.last().expect("non-empty"), bytes.len() as u64, config, now);
        if roll && wait == Wait::Never {
            return Ok(None);
        }
        let base_offset = inner.log_end_offset();
        header.base_offset = base_offset;
        // The base offset (outside the CRC) is written from a patched copy of its 8 bytes and
        // the rest of the batch from where it lies. LogAppendTime also rewrites covered fields
        // and the CRC: that (rare) case patches a copy of the whole batch.
        let base_offset_bytes = base_offset.to_be_bytes();
        let log_append_time = (config.message_timestamp_type == TimestampType::LogAppendTime).then_some(now);
        let rewritten = match log_append_time {
            Some(now) => {
                let mut copy = bytes.to_vec();
                batch::set_base_offset(&mut copy, base_offset);
                batch::set_log_append_time(&mut copy, now);
                header = BatchHeader::parse(&copy)?;
                Some(copy)
            }
            None => None,
        };
        let parts: [&[u8]; 2] = match &rewritten {
            Some(copy) => [copy, &[]],
            None => [&base_offset_bytes, &bytes[BASE_OFFSET_BYTES..]],
        };
        if roll {
            self.roll(&mut inner).inspect_err(|e| self.ctx.health.poison(e))?;
        }
        let active = inner.active();
        if let Err(e) = active.append_parts(&parts, &header, now) {
            let out_of_space = is_out_of_space(&e);
            let err = LogError::io(&active.path, e);
            // A full disk refuses the write itself: no page the kernel accepted is lost, so
            // once the partial write is cut off the directory stays healthy and appends
            // resume as soon as there is room (see health.rs). Anything else poisons.
            if out_of_space && active.discard_failed_append().is_ok() {
                return Err(err);
            }
            self.ctx.health.poison(&err);
            return Err(err);
        }
        inner.producers.apply(&header, marker, now);
        if inner.producers.len() > self.ctx.producers_max.max(inner.producers_recheck_len) {
            self.forget_least_recent_producers(&mut inner);
        }
        let next = header.next_offset();
        let mut sync = self.lock_sync();
        sync.written_offset = next;
        drop(sync);
        if let SyncPolicy::IntervalMs(_) = self.ctx.sync_policy {
            self.publish_high_watermark(next);
        }
        Ok(Some(AppendOutcome {
            base_offset,
            last_offset: header.last_offset(),
            log_append_time,
            log_start_offset: inner.log_start_offset(),
            duplicate: false,
        }))
    }

    /// Blocks until `offset` (exclusive) is durable. With group commit, one caller becomes
    /// the sync leader and its fdatasync covers everything written so far; the others wait.
    fn wait_durable(&self, offset: i64) -> Result<()> {
        if let SyncPolicy::IntervalMs(_) = self.ctx.sync_policy {
            return Ok(());
        }
        self.sync_through(offset)
    }

    /// Blocks until everything below `offset` is durable under any sync policy: under the
    /// interval policy it syncs now instead of returning at once. For a writer whose other
    /// durable state must never be ahead of this log (a view's state store checkpoint);
    /// under the default policy it is [`Self::wait_until_durable`], at the same cost.
    pub fn make_durable(&self, offset: i64) -> Result<()> {
        self.sync_through(offset)
    }

    /// The offset below which everything is durable (fsynced), under any sync policy.
    pub fn durable_offset(&self) -> i64 {
        self.lock_sync().synced_offset
    }

    /// Group commit up to `offset`: leads an fdatasync or waits for the one in flight.
    fn sync_through(&self, offset: i64) -> Result<()> {
        let mut sync = self.lock_sync();
        // No fsync reaches what was never written: waiting for it would loop for good.
        if offset > sync.written_offset {
            return Err(LogError::NotWritten { offset, written: sync.written_offset });
        }
        loop {
            // An offset below `synced_offset` was made durable by an fsync that succeeded
            // before any failed (finish_sync advances nothing once the directory is
            // poisoned), so it is acknowledged even now: acknowledged batches stay a prefix of
            // the log, never an earlier one refused while a later one was accepted.
            if sync.synced_offset >= offset {
                return Ok(());
            }
            self.ctx.health.check()?;
            if sync.in_flight {
                sync = self.synced.wait(sync).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            (sync, _) = self.lead_sync(sync);
        }
    }

    /// Runs one fdatasync for everything written so far, outside the lock.
    fn lead_sync<'a>(&'a self, mut sync: MutexGuard<'a, SyncState>) -> (MutexGuard<'a, SyncState>, Result<()>) {
        sync.in_flight = true;
        let target = sync.written_offset;
        let file = sync.file.clone();
        drop(sync);
        let result = file.sync_data();
        let mut sync = self.lock_sync();
        let result = self.finish_sync(&mut sync, result, target, &self.ctx.dir);
        (sync, result)
    }

    /// Ends the fsync marked in flight, which covered everything below `target`. A failure
    /// poisons the directory before `in_flight` clears, so no waiter can see the sync done
    /// without seeing the poison; a success counts only if no fsync failed meanwhile (Linux
    /// reports a writeback error to just one fsync of an open file).
    fn finish_sync(&self, sync: &mut SyncState, result: std::io::Result<()>, target: i64, path: &Path) -> Result<()> {
        let result = result.map_err(|e| {
            let err = LogError::io(path, e);
            self.ctx.health.poison(&err);
            err
        });
        if result.is_ok() && !self.ctx.health.is_poisoned() {
            sync.synced_offset = sync.synced_offset.max(target);
            self.publish_high_watermark(sync.synced_offset);
        }
        sync.in_flight = false;
        self.synced.notify_all();
        result
    }

    /// Waits until no fsync is in flight and marks one: the caller then owns the active
    /// file's fsync and must end it with [`Self::finish_sync`].
    fn begin_exclusive_sync(&self) -> MutexGuard<'_, SyncState> {
        let mut sync = self.lock_sync();
        while sync.in_flight {
            sync = self.synced.wait(sync).unwrap_or_else(|e| e.into_inner());
        }
        sync.in_flight = true;
        sync
    }

    fn publish_high_watermark(&self, offset: i64) {
        if self.high_watermark.fetch_max(offset, Ordering::AcqRel) < offset {
            self.high_watermark_tx.send_replace(offset);
        }
    }

    /// Makes everything written durable now (the interval policy's background flush, and
    /// shutdown). A partition with nothing written since its last sync is skipped: an
    /// fdatasync of a clean file may still flush the disk's write cache, so a round over a
    /// few hundred mostly idle partitions would otherwise delay the ones holding data by
    /// as many cache flushes.
    pub fn flush(&self) -> Result<()> {
        let written = {
            let sync = self.lock_sync();
            if sync.synced_offset >= sync.written_offset {
                // Nothing to make durable, so nothing to acknowledge: fine even when poisoned.
                return Ok(());
            }
            sync.written_offset
        };
        match self.ctx.sync_policy {
            SyncPolicy::EveryAppend => self.wait_durable(written),
            SyncPolicy::IntervalMs(_) => self.sync_written(),
        }
    }

    /// The interval policy's sync: one fdatasync covering everything written so far, if
    /// anything was written since the last one. It takes part in the group-commit protocol
    /// so it never overlaps a roll's fsync of the same file.
    fn sync_written(&self) -> Result<()> {
        let mut sync = self.lock_sync();
        while sync.in_flight {
            sync = self.synced.wait(sync).unwrap_or_else(|e| e.into_inner());
        }
        if sync.synced_offset >= sync.written_offset {
            return Ok(());
        }
        self.lead_sync(sync).1
    }

    /// Starts a new segment (see [`must_roll`]). The closed segment is synced with its
    /// indexes and a producer-state snapshot, so recovery after a crash only has to scan the
    /// new active segment.
    fn roll(&self, inner: &mut Inner) -> Result<()> {
        let fs = self.ctx.fs.as_ref();
        let dir = &self.ctx.dir;
        let closing = inner.segments.last().expect("non-empty");
        self.sync_closing(closing)?;
        closing.write_indexes(fs, dir)?;
        let next = closing.next_offset;
        write_snapshot(fs, dir, &inner.producers, next)?;
        let fresh = Segment::create(fs, dir, next)?;
        self.lock_sync().file = fresh.file.clone();
        inner.segments.push(fresh);
        prune_snapshots(fs, dir)?;
        tracing::debug!(topic = %self.ctx.topic, partition = self.ctx.partition, base_offset = next, "rolled segment");
        Ok(())
    }

    /// Fsyncs the segment being closed as a group-commit sync. A leader may be fsyncing the
    /// same open file outside every lock; two overlapping fsyncs could split a writeback
    /// error between them (one fails, the other succeeds and acknowledges), so this one
    /// waits for the leader and holds off the next. The caller holds `inner`, so nothing is
    /// written meanwhile and this fsync covers everything written.
    fn sync_closing(&self, closing: &Segment) -> Result<()> {
        let mut sync = self.begin_exclusive_sync();
        let target = sync.written_offset;
        drop(sync);
        let result = closing.file.sync_data();
        sync = self.lock_sync();
        self.finish_sync(&mut sync, result, target, &closing.path)
    }

    /// Reads whole batches starting at the batch that holds `offset`, up to `max_bytes`
    /// (but always at least one whole batch), never past the high watermark (or the last
    /// stable offset for read_committed). Every returned batch passed its CRC check.
    pub fn read(&self, offset: i64, max_bytes: usize, isolation: Isolation) -> Result<ReadOutcome> {
        let high_watermark = self.high_watermark();
        let (plan, upper, mut outcome) = {
            let inner = self.lock_inner();
            let log_start_offset = inner.log_start_offset();
            let log_end_offset = inner.log_end_offset();
            if offset < log_start_offset || offset > log_end_offset {
                return Err(LogError::OffsetOutOfRange { offset, log_start_offset, log_end_offset });
            }
            let last_stable_offset = inner.producers.last_stable_offset(high_watermark);
            let upper = match isolation {
                Isolation::ReadUncommitted => high_watermark,
                Isolation::ReadCommitted => last_stable_offset,
            };
            let mut outcome = ReadOutcome {
                records: Vec::new(),
                high_watermark,
                last_stable_offset,
                log_start_offset,
                aborted: Vec::new(),
                scanned_to: upper.max(offset),
            };
            if offset >= upper {
                return Ok(outcome);
            }
            let first = inner.segment_index_for(offset);
            if let Some(unread) = inner.segments.get(first + READ_SEGMENTS_MAX) {
                outcome.scanned_to = unread.base_offset.min(upper);
            }
            let plan: Vec<ReadPlan> = inner.segments[first..]
                .iter()
                .take(READ_SEGMENTS_MAX)
                .map(|s| ReadPlan {
                    file: s.file.clone(),
                    path: s.path.clone(),
                    start: s.position_for(offset),
                    end: s.size,
                    damage: s.damage.clone(),
                })
                .collect();
            (plan, upper, outcome)
        };
        outcome.records.reserve(max_bytes.min(plan.iter().map(|p| (p.end - p.start) as usize).sum()));
        let mut last_read = None;
        for step in plan {
            let budget = max_bytes.saturating_sub(outcome.records.len());
            if budget == 0 && !outcome.records.is_empty() {
                break;
            }
            let (last, whole_segment) = step.read_into(offset, upper, budget, &mut outcome.records)?;
            last_read = last.or(last_read);
            if let Some(reason) = step.damage.as_ref().filter(|_| whole_segment) {
                // Never skip over damage to the next segment: return what precedes it, and
                // fail when nothing does, so the reader sees the problem instead of a gap.
                if outcome.records.is_empty() {
                    return Err(LogError::Corrupt {
                        path: step.path.clone(),
                        position: step.end,
                        reason: format!(
                            "{reason}; records after this point are unreadable until the segment is repaired or removed"
                        ),
                    });
                }
                break;
            }
            if !whole_segment {
                // The budget, the upper bound or damage stopped this segment part-way: the
                // next segment's batches would leave a gap in the returned offsets.
                break;
            }
        }
        if isolation == Isolation::ReadCommitted
            && let Some(last) = last_read
        {
            outcome.aborted = self.lock_inner().producers.aborted_in_range(offset, last + 1);
        }
        Ok(outcome)
    }

    /// The first offset whose record timestamp is >= `timestamp`, with that timestamp, among
    /// records visible under `isolation`; None when there is none (Kafka ListOffsets).
    pub fn offset_for_timestamp(&self, timestamp: i64, isolation: Isolation) -> Result<Option<(i64, i64)>> {
        let high_watermark = self.high_watermark();
        let (candidates, upper, log_start_offset) = {
            let inner = self.lock_inner();
            let upper = match isolation {
                Isolation::ReadUncommitted => high_watermark,
                Isolation::ReadCommitted => inner.producers.last_stable_offset(high_watermark),
            };
            let candidates: Vec<(Arc<dyn StorageFile>, u64, u64)> = inner
                .segments
                .iter()
                .filter(|s| s.max_timestamp >= timestamp)
                .filter_map(|s| s.position_for_timestamp(timestamp).map(|p| (s.file.clone(), p, s.size)))
                .collect();
            (candidates, upper, inner.log_start_offset())
        };
        for (file, start, end) in candidates {
            let search = TimestampSearch { file: file.as_ref(), upper, timestamp, dir: &self.ctx.dir };
            if let Some((offset, at)) = search.first_at_or_after(start, end)? {
                // Records below a DeleteRecords start are gone, even inside this batch.
                return Ok(Some((offset.max(log_start_offset), at)));
            }
        }
        Ok(None)
    }

    /// Kafka's DeleteRecords: moves the log start offset to `before` (-1: the high
    /// watermark), so reads below it fail with [`LogError::OffsetOutOfRange`] and
    /// ListOffsets' earliest is `before`; closed segments wholly below it are deleted. The
    /// new start is persisted before this returns. Returns the log start offset after it
    /// (unchanged when `before` is not past it). Fails when `before` is past the high
    /// watermark, and (as Kafka's `deleteRecordsOnLeader` does) when the topic's
    /// cleanup.policy lacks `delete`.
    pub fn delete_records(&self, before: i64) -> Result<i64> {
        self.ctx.health.check()?;
        if !self.config().cleanup_policy.delete {
            return Err(LogError::DeleteRecordsPolicy { topic: self.ctx.topic.clone(), partition: self.ctx.partition });
        }
        let high_watermark = self.high_watermark();
        let before = if before == -1 { high_watermark } else { before };
        let mut inner = self.lock_inner();
        if before < 0 || before > high_watermark {
            return Err(LogError::OffsetOutOfRange {
                offset: before,
                log_start_offset: inner.log_start_offset(),
                log_end_offset: high_watermark,
            });
        }
        if before <= inner.log_start_offset() {
            return Ok(inner.log_start_offset());
        }
        let path = self.ctx.dir.join(LOG_START_FILE);
        io::write_file_atomic(self.ctx.fs.as_ref(), &path, &encode_log_start(before)).map_err(|e| {
            let err = LogError::io(&path, e);
            self.ctx.health.poison(&err);
            err
        })?;
        inner.deleted_before = before;
        let active = inner.segments.len() - 1;
        let doomed = inner.segments[..active].iter().take_while(|s| s.next_offset <= before).count();
        let (log_start_offset, removed) = self.drop_leading_segments(inner, doomed)?;
        tracing::info!(topic = %self.ctx.topic, partition = self.ctx.partition, log_start_offset, segments_deleted = removed.len(), "deleted records");
        Ok(log_start_offset)
    }

    /// Keeps the producer state within `producers_max` (see [`ProducerState::limit`]).
    fn forget_least_recent_producers(&self, inner: &mut Inner) {
        let max = self.ctx.producers_max;
        let forgotten = inner.producers.limit(max);
        let left = inner.producers.len();
        inner.producers_recheck_len = if left > max - max / 10 { left + (max / 10).max(1) } else { 0 };
        if forgotten > 0 {
            tracing::warn!(topic = %self.ctx.topic, partition = self.ctx.partition, forgotten, producers_max = self.ctx.producers_max, "more producers than producers_per_partition_max: forgot the least recently appending idle ones early (their retries are no longer detected as duplicates)");
        }
    }

    /// Deletes closed segments past `retention.ms` (by their largest timestamp) or beyond
    /// `retention.bytes`, moving the log start offset forward. The active segment stays.
    /// Also forgets producers idle for `producer_id_expiration_ms` (any cleanup policy).
    pub fn enforce_retention(&self) -> Result<RetentionOutcome> {
        let now = self.ctx.clock.now_ms();
        let expired = self.lock_inner().producers.expire(now, self.ctx.producer_id_expiration_ms);
        if expired > 0 {
            tracing::debug!(topic = %self.ctx.topic, partition = self.ctx.partition, expired, "forgot idle producers");
        }
        let config = self.config();
        if !config.cleanup_policy.delete {
            return Ok(RetentionOutcome::default());
        }
        let now = self.ctx.clock.now_ms();
        let inner = self.lock_inner();
        let mut total: u64 = inner.segments.iter().map(|s| s.size).sum();
        let mut doomed = 0;
        for segment in &inner.segments[..inner.segments.len() - 1] {
            let expired =
                config.retention_ms >= 0 && segment.retention_time_ms().is_some_and(|t| t < now - config.retention_ms);
            let oversize = config.retention_bytes >= 0 && total - segment.size >= config.retention_bytes as u64;
            if !(expired || oversize) {
                break;
            }
            total -= segment.size;
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(RetentionOutcome::default());
        }
        let (log_start_offset, removed) = self.drop_leading_segments(inner, doomed)?;
        let outcome =
            RetentionOutcome { segments_deleted: removed.len(), bytes_deleted: removed.iter().map(|s| s.size).sum() };
        tracing::info!(topic = %self.ctx.topic, partition = self.ctx.partition, segments = outcome.segments_deleted, bytes = outcome.bytes_deleted, log_start_offset, "retention deleted segments");
        Ok(outcome)
    }

    /// Removes the first `count` (closed) segments, forgets producer state below the new
    /// log start, and deletes the files once the lock is released. Returns the new log
    /// start offset and the removed segments.
    fn drop_leading_segments(&self, mut inner: MutexGuard<'_, Inner>, count: usize) -> Result<(i64, Vec<Segment>)> {
        debug_assert!(count < inner.segments.len(), "the active segment stays");
        let removed: Vec<Segment> = inner.segments.drain(..count).collect();
        let log_start_offset = inner.log_start_offset();
        inner.producers.forget_before(log_start_offset);
        drop(inner);
        self.delete_segment_files(&removed)?;
        Ok((log_start_offset, removed))
    }

    fn delete_segment_files(&self, segments: &[Segment]) -> Result<()> {
        let fs = self.ctx.fs.as_ref();
        for segment in segments {
            for name in segment.file_names() {
                let path = self.ctx.dir.join(name);
                match fs.remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(LogError::io(path, e)),
                }
            }
        }
        fs.sync_dir(&self.ctx.dir).map_err(|e| self.poison(LogError::io(&self.ctx.dir, e)))
    }

    /// Poisons the directory with `err` and returns it: for failed fsyncs outside the
    /// append path (cleaning, retention), which are no more forgivable than an append's.
    pub(crate) fn poison(&self, err: LogError) -> LogError {
        self.ctx.health.poison(&err);
        err
    }

    /// Syncs, writes the active segment's indexes, a producer snapshot and the
    /// clean-shutdown checkpoint, so the next open needs no scan.
    pub fn close(&self) -> Result<()> {
        self.ctx.health.check()?;
        self.flush()?;
        let inner = self.lock_inner();
        let fs = self.ctx.fs.as_ref();
        let dir = &self.ctx.dir;
        let active = inner.segments.last().expect("non-empty");
        active.write_indexes(fs, dir)?;
        write_snapshot(fs, dir, &inner.producers, active.next_offset)?;
        let checkpoint = encode_checkpoint(active.base_offset, active.size);
        let path = dir.join(CHECKPOINT_FILE);
        io::write_file_atomic(fs, &path, &checkpoint).map_err(|e| LogError::io(path, e))
    }

    /// Directory of this partition.
    pub fn dir(&self) -> &Path {
        &self.ctx.dir
    }
}

/// One segment's part of a read.
struct ReadPlan {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    start: u64,
    end: u64,
    /// Why the segment's bytes past `end` could not be read (closed segments only).
    damage: Option<String>,
}

impl ReadPlan {
    /// Appends whole valid batches with `last_offset >= offset` and `base_offset < upper`
    /// to `out`, up to `budget` bytes (at least one batch when `out` is empty). Returns the
    /// last offset appended, and whether every batch up to the segment's end was appended.
    fn read_into(&self, offset: i64, upper: i64, budget: usize, out: &mut Vec<u8>) -> Result<(Option<i64>, bool)> {
        let corrupt = |position: u64, reason: String| LogError::Corrupt { path: self.path.clone(), position, reason };
        // Find the first batch that ends at or after `offset` (a few headers past the index entry).
        // A negative last-offset delta can only be damage (the field is under the CRC, which
        // the walk does not check): stop there, so the batch is validated below instead of
        // being skipped as "before `offset`" with everything after it served.
        let mut first = None;
        let mut skipped = None;
        walk_headers(self.file.as_ref(), self.start, self.end, |position, header| {
            if header.last_offset() >= offset || header.last_offset_delta < 0 {
                first = Some((position, header.base_offset));
                return false;
            }
            skipped = Some((position, header.total_bytes()));
            true
        })
        .map_err(|e| corrupt(self.start, e.to_string()))?;
        // `offset` in a gap after the last skipped batch: compaction makes gaps, but so does
        // damage that lowered that batch's last offset, hiding the records asked for. Check
        // its CRC, and start there when it fails, so the read stops instead of skipping.
        let in_gap = first.is_none_or(|(_, base_offset)| base_offset > offset);
        if in_gap
            && let Some((position, total)) = skipped
            && !self.batch_is_intact(position, total)?
        {
            first = Some((position, offset));
        }
        let Some((start, _)) = first else { return Ok((None, true)) };
        let available = (self.end - start) as usize;
        let first_len = {
            let mut prefix = [0u8; batch::LENGTH_PREFIX_BYTES];
            self.file.read_exact_at(&mut prefix, start).map_err(|e| LogError::io(&self.path, e))?;
            batch::batch_total_len(&prefix, segment::RECOVERY_BATCH_BYTES_MAX)
                .map_err(|e| corrupt(start, e.to_string()))?
        };
        let want = if out.is_empty() { budget.max(first_len) } else { budget }.min(available);
        // Read straight into the caller's buffer and cut back to the whole batches accepted:
        // one copy from the file, no second buffer.
        let base = out.len();
        self.file.read_exact_append(out, want, start).map_err(|e| LogError::io(&self.path, e))?;
        let accepted = self.accept_batches(&mut out[base..], start, upper, base == 0);
        let (position, last) = match accepted {
            Ok(done) => done,
            Err(e) => {
                out.truncate(base);
                return Err(e);
            }
        };
        out.truncate(base + position);
        Ok((last, start + position as u64 == self.end))
    }

    /// Whether the `total` bytes of the batch at `position` pass its CRC check.
    fn batch_is_intact(&self, position: u64, total: usize) -> Result<bool> {
        let mut bytes = Vec::new();
        self.file.read_exact_append(&mut bytes, total, position).map_err(|e| LogError::io(&self.path, e))?;
        Ok(batch::validate(&bytes, segment::RECOVERY_BATCH_BYTES_MAX).is_ok())
    }

    /// How many leading bytes of `buffer` (read from `start`) are whole valid batches below
    /// `upper`, and the last offset among them. Damage in the first batch of an empty read
    /// is an error; later damage ends the read before it.
    fn accept_batches(
        &self,
        buffer: &mut [u8],
        start: u64,
        upper: i64,
        nothing_yet: bool,
    ) -> Result<(usize, Option<i64>)> {
        let corrupt = |position: u64, reason: String| LogError::Corrupt { path: self.path.clone(), position, reason };
        let mut position = 0;
        let mut last = None;
        while position + batch::LENGTH_PREFIX_BYTES <= buffer.len() {
            let Ok(total) = batch::batch_total_len(&buffer[position..], segment::RECOVERY_BATCH_BYTES_MAX) else {
                break;
            };
            if position + total > buffer.len() {
                break;
            }
            let bytes = &buffer[position..position + total];
            let header = match batch::validate(bytes, segment::RECOVERY_BATCH_BYTES_MAX) {
                Ok(header) => header,
                Err(e) if nothing_yet && last.is_none() => {
                    return Err(corrupt(
                        start + position as u64,
                        format!(
                            "{e}; the records of this batch cannot be served: restore the segment file from a backup, or move the log start past them with DeleteRecords (`kappa topic delete-records`)"
                        ),
                    ));
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), position = start + position as u64, error = %e, "corrupt batch; returning the data before it");
                    break;
                }
            };
            if header.base_offset >= upper {
                break;
            }
            last = Some(header.last_offset());
            position += total;
        }
        Ok((position, last))
    }
}

/// A timestamp lookup in one segment: records below `upper` with a timestamp >= `timestamp`.
struct TimestampSearch<'a> {
    file: &'a dyn StorageFile,
    upper: i64,
    timestamp: i64,
    dir: &'a Path,
}

impl TimestampSearch<'_> {
    /// The first matching record in `start..end`: (offset, timestamp). A batch whose header
    /// promises a match may hold none (compaction removed it from a batch written before
    /// cleaning recomputed max timestamps): the search then goes on with the next batch.
    fn first_at_or_after(&self, mut start: u64, end: u64) -> Result<Option<(i64, i64)>> {
        while let Some((position, header)) = self.next_candidate(start, end)? {
            let mut bytes = vec![0; header.total_bytes()];
            self.file.read_exact_at(&mut bytes, position).map_err(|e| LogError::io(self.dir, e))?;
            if let Some(found) = first_record_at_or_after(&bytes, &header, self.timestamp) {
                return Ok(Some(found));
            }
            start = position + header.total_bytes() as u64;
        }
        Ok(None)
    }

    /// The next data batch from `start` whose header max timestamp is >= the one sought.
    fn next_candidate(&self, start: u64, end: u64) -> Result<Option<(u64, BatchHeader)>> {
        let mut found = None;
        walk_headers(self.file, start, end, |position, header| {
            if header.base_offset >= self.upper {
                return false;
            }
            if header.max_timestamp >= self.timestamp && !header.is_control() {
                found = Some((position, *header));
                return false;
            }
            true
        })
        .map_err(|e| LogError::Corrupt {
            path: self.dir.to_owned(),
            position: start,
            reason: e.to_string(),
        })?;
        Ok(found)
    }
}

/// The first record in a batch with a timestamp >= `timestamp`: (offset, timestamp).
fn first_record_at_or_after(bytes: &[u8], header: &BatchHeader, timestamp: i64) -> Option<(i64, i64)> {
    if header.has_log_append_time() {
        return Some((header.base_offset, header.max_timestamp));
    }
    match crate::records::record_timestamps(bytes, MAX_MESSAGE_BYTES_LIMIT) {
        Ok(stamps) => stamps.into_iter().find(|&(_, t)| t >= timestamp),
        // An undecodable body still has a trustworthy header: answer at batch granularity.
        Err(_) => Some((header.base_offset, header.max_timestamp)),
    }
}

/// The outcome of an append allowed to wait, which is never left undone.
fn appended(outcome: Option<AppendOutcome>) -> AppendOutcome {
    outcome.expect("an append allowed to wait is never left undone")
}

/// Whether an append of `incoming_bytes` at `now` starts a new segment first: the active
/// one is full or old enough (an empty one never rolls).
fn must_roll(active: &Segment, incoming_bytes: u64, config: &TopicConfig, now: i64) -> bool {
    let full = active.size + incoming_bytes > config.segment_bytes;
    let old = active.first_append_ms.is_some_and(|first| now - first >= config.segment_ms);
    active.size > 0 && (full || old)
}

/// The active segment is never compacted, so its batches are offset-contiguous from its
/// base offset. The CRC does not cover a batch's base offset: one damaged to jump forward
/// passes validation, and is caught here as the first batch out of sequence.
fn first_offset_gap(seg: &Segment) -> Result<Option<(u64, String)>> {
    let mut expected = seg.base_offset;
    let mut gap = None;
    walk_headers(seg.file.as_ref(), 0, seg.size, |position, header| {
        if header.base_offset != expected {
            gap = Some((
                position,
                format!(
                    "batch at byte {position} has base offset {} where {expected} was expected",
                    header.base_offset
                ),
            ));
            return false;
        }
        expected = header.next_offset();
        true
    })
    .map_err(|e| LogError::Corrupt { path: seg.path.clone(), position: 0, reason: e.to_string() })?;
    Ok(gap)
}

/// Every record of a data batch must decode (as Kafka's `LogValidator` checks on append):
/// a batch whose CRC matches but whose records do not parse, or which inflates past
/// [`BATCH_UNCOMPRESSED_BYTES_MAX`], would fail every reader of the partition forever.
/// Compacted topics keep the latest record per key, so there a record without one is
/// rejected too (as Kafka does).
fn check_records(header: &BatchHeader, bytes: &[u8], compacted: bool) -> Result<()> {
    let check = crate::records::check_records(header, bytes, BATCH_UNCOMPRESSED_BYTES_MAX)
        .map_err(|e| LogError::InvalidRecords(e.to_string()))?;
    match check.first_without_key {
        Some(index) if compacted => Err(LogError::MissingKey { index }),
        _ => Ok(()),
    }
}

/// Reads whether a control batch commits or aborts.
fn control_marker(bytes: &[u8]) -> Result<Marker> {
    match crate::records::control_type(bytes) {
        Ok(crate::records::ControlType::Commit) => Ok(Marker::Commit),
        Ok(crate::records::ControlType::Abort) => Ok(Marker::Abort),
        Err(e) => Err(LogError::InvalidTxnMarker { producer_id: batch::be_i64(bytes, 43), reason: e.to_string() }),
    }
}

/// A small metadata file (docs/format.md): a 4-byte magic, `fields` as big-endian i64s,
/// then the crc32c of everything before it, big-endian.
fn encode_framed(magic: &[u8; 4], fields: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * fields.len() + 4);
    out.extend_from_slice(magic);
    for field in fields {
        out.extend_from_slice(&field.to_be_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// The fields of a file written by [`encode_framed`]; None when its length, magic or CRC is
/// wrong.
fn decode_framed<const N: usize>(magic: &[u8; 4], bytes: &[u8]) -> Option<[i64; N]> {
    let crc_at = 4 + 8 * N;
    if bytes.len() != crc_at + 4
        || &bytes[..4] != magic
        || crc32c::crc32c(&bytes[..crc_at]) != batch::be_u32(bytes, crc_at)
    {
        return None;
    }
    Some(std::array::from_fn(|i| batch::be_i64(bytes, 4 + 8 * i)))
}

fn encode_log_start(offset: i64) -> Vec<u8> {
    encode_framed(b"KLSO", &[offset])
}

/// The persisted log start offset, if DeleteRecords ever set one. A damaged file stops the
/// open: serving from the first segment instead would bring deleted records back.
fn read_log_start(fs: &dyn Storage, dir: &Path) -> Result<Option<i64>> {
    let path = dir.join(LOG_START_FILE);
    if !fs.exists(&path) {
        return Ok(None);
    }
    let bytes = io::read_file(fs, &path).map_err(|e| LogError::io(&path, e))?;
    let Some([offset]) = decode_framed::<1>(b"KLSO", &bytes) else {
        return Err(LogError::Corrupt {
            path,
            position: 0,
            reason: "the log start offset file fails its magic or CRC check; delete it to serve the partition from its first segment again (records deleted with DeleteRecords reappear)".to_owned(),
        });
    };
    Ok(Some(offset))
}

fn encode_checkpoint(active_base: i64, active_size: u64) -> Vec<u8> {
    encode_framed(b"KCKP", &[active_base, active_size as i64])
}

fn decode_checkpoint(bytes: &[u8]) -> Option<(i64, u64)> {
    decode_framed::<2>(b"KCKP", bytes).map(|[base, size]| (base, size as u64))
}

/// Reads and removes the clean-shutdown checkpoint: it vouches for the files only until
/// the first write after opening, so it must not survive into the next crash.
fn take_checkpoint(fs: &dyn Storage, dir: &Path) -> Result<Option<(i64, u64)>> {
    let path = dir.join(CHECKPOINT_FILE);
    if !fs.exists(&path) {
        return Ok(None);
    }
    let checkpoint = io::read_file(fs, &path).ok().and_then(|b| decode_checkpoint(&b));
    fs.remove_file(&path).map_err(|e| LogError::io(&path, e))?;
    fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
    Ok(checkpoint)
}

/// Removes temporary files an interrupted write or cleaning pass left behind.
fn remove_leftovers(fs: &dyn Storage, dir: &Path, names: &[String]) -> Result<()> {
    let mut removed = false;
    for name in names.iter().filter(|n| n.ends_with(".tmp") || n.ends_with(".cleaned")) {
        let path = dir.join(name);
        fs.remove_file(&path).map_err(|e| LogError::io(&path, e))?;
        removed = true;
    }
    if removed {
        fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
    }
    Ok(())
}

fn snapshot_file_name(offset: i64) -> String {
    format!("{offset:020}{SNAPSHOT_SUFFIX}")
}

fn parse_snapshot_file_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(SNAPSHOT_SUFFIX)?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

fn write_snapshot(fs: &dyn Storage, dir: &Path, producers: &ProducerState, offset: i64) -> Result<()> {
    let path = dir.join(snapshot_file_name(offset));
    io::write_file_atomic(fs, &path, &producers.encode(offset)).map_err(|e| LogError::io(path, e))
}

fn prune_snapshots(fs: &dyn Storage, dir: &Path) -> Result<()> {
    let names = fs.list_dir(dir).map_err(|e| LogError::io(dir, e))?;
    let mut offsets: Vec<i64> = names.iter().filter_map(|n| parse_snapshot_file_name(n)).collect();
    offsets.sort_unstable();
    if offsets.len() <= SNAPSHOTS_KEPT {
        return Ok(());
    }
    for &offset in &offsets[..offsets.len() - SNAPSHOTS_KEPT] {
        let path = dir.join(snapshot_file_name(offset));
        fs.remove_file(&path).map_err(|e| LogError::io(&path, e))?;
    }
    fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))
}

/// Loads the newest usable snapshot and replays every batch after it. Producers seen in the
/// replay, and those whose last append time the snapshot does not know, count as active at
/// `now_ms` (the batches carry only client-set timestamps).
fn restore_producer_state(
    fs: &dyn Storage,
    dir: &Path,
    names: &[String],
    inner: &mut Inner,
    now_ms: i64,
) -> Result<()> {
    let log_end_offset = inner.log_end_offset();
    let mut offsets: Vec<i64> =
        names.iter().filter_map(|n| parse_snapshot_file_name(n)).filter(|&o| o <= log_end_offset).collect();
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    let (from, state) = offsets
        .iter()
        .find_map(|&o| {
            io::read_file(fs, &dir.join(snapshot_file_name(o)))
                .ok()
                .and_then(|b| ProducerState::decode(&b))
                .filter(|(at, _)| *at == o)
        })
        .unwrap_or((i64::MIN, ProducerState::default()));
    inner.producers = state;
    let first = if from == i64::MIN { 0 } else { inner.segment_index_for(from) };
    for segment in &inner.segments[first..] {
        let start = if from == i64::MIN { 0 } else { segment.position_for(from) };
        let mut replay = Vec::new();
        walk_headers(segment.file.as_ref(), start, segment.size, |position, header| {
            if header.base_offset >= from && header.has_producer_id() {
                replay.push((position, *header));
            }
            true
        })
        .map_err(|e| LogError::Corrupt {
            path: segment.path.clone(),
            position: start,
            reason: e.to_string(),
        })?;
        for (position, header) in replay {
            let marker = if header.is_control() {
                let mut bytes = vec![0; header.total_bytes()];
                segment.file.read_exact_at(&mut bytes, position).map_err(|e| LogError::io(&segment.path, e))?;
                control_marker(&bytes).ok()
            } else {
                None
            };
            inner.producers.apply(&header, marker, now_ms);
        }
    }
    inner.producers.settle_unknown_append_times(now_ms);
    Ok(())
}

/// ENOSPC or EDQUOT from a write: the file system had no room for it.
fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::io::OpenMode;
    use crate::io::sim::{SimFs, Trigger};
    use crate::records::{BatchBuilder, NewRecord};

    const T0: i64 = 1_700_000_000_000;

    type Hook = Box<dyn FnOnce() + Send>;

    /// A [`SimFs`] that runs a hook once, at the start of the next `sync_data` of a segment
    /// file: it lets a test act at an exact point inside a roll.
    #[derive(Clone, Default)]
    struct HookFs {
        fs: SimFs,
        hook: Arc<Mutex<Option<Hook>>>,
    }

    struct HookFile {
        file: Arc<dyn StorageFile>,
        hook: Option<Arc<Mutex<Option<Hook>>>>,
    }

    impl Storage for HookFs {
        fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
            self.fs.create_dir_all(path)
        }
        fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
            self.fs.list_dir(path)
        }
        fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn StorageFile>> {
            let file = self.fs.open(path, mode)?;
            let is_segment = path.extension().is_some_and(|e| e == "log");
            Ok(Arc::new(HookFile { file, hook: is_segment.then(|| self.hook.clone()) }))
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.fs.rename(from, to)
        }
        fn remove_file(&self, path: &Path) -> std::io::Result<()> {
            self.fs.remove_file(path)
        }
        fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
            self.fs.remove_dir_all(path)
        }
        fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
            self.fs.sync_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            self.fs.exists(path)
        }
    }

    impl StorageFile for HookFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.file.read_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.file.write_all_at(buf, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            let hook = self.hook.as_ref().and_then(|h| h.lock().unwrap().take());
            if let Some(hook) = hook {
                hook();
            }
            self.file.sync_data()
        }
    }

    fn open_partition(fs: &HookFs, segment_bytes: u64) -> Arc<Partition> {
        let config = TopicConfig { segment_bytes, ..TopicConfig::default() };
        open_with(fs, config, Arc::new(ManualClock::new(T0)))
    }

    fn open_with(fs: &HookFs, config: TopicConfig, clock: Arc<ManualClock>) -> Arc<Partition> {
        let ctx = PartitionContext::for_test(Arc::new(fs.clone()), clock, config, SyncPolicy::EveryAppend);
        Arc::new(Partition::open(ctx).expect("open partition").0)
    }

    fn one_record(key: &str) -> Vec<u8> {
        BatchBuilder::new().record(NewRecord::new(Some(key.as_bytes()), Some(b"v"), T0)).build()
    }

    /// A batch of producer 7 (epoch 0) with `sequence`.
    fn idempotent(sequence: i32, key: &str) -> Vec<u8> {
        BatchBuilder::new()
            .producer(7, 0, sequence)
            .record(NewRecord::new(Some(key.as_bytes()), Some(b"v"), T0))
            .build()
    }

    /// What an append changes, as seen from outside: log end offset, segments, bytes.
    fn shape(p: &Partition) -> (i64, usize, u64) {
        (p.log_end_offset(), p.segment_count(), p.size_bytes())
    }

    #[test]
    fn try_append_leaves_a_full_segment_to_a_caller_that_may_wait() {
        let fs = HookFs::default();
        let p = open_partition(&fs, 1);
        let first = p.try_append_unsynced(idempotent(0, "a")).unwrap().expect("an empty segment takes any batch");
        let before = (shape(&p), fs.fs.stats());
        assert_eq!(p.try_append_unsynced(idempotent(1, "b")).unwrap(), None, "appending would roll the full segment");
        assert_eq!((shape(&p), fs.fs.stats()), before, "nothing changed, written or synced");
        // A retry of a batch in the log writes nothing, so rolls nothing: answered at once.
        let retry = p.try_append_unsynced(idempotent(0, "a")).unwrap();
        assert_eq!(retry, Some(AppendOutcome { duplicate: true, ..first }));
        // The producer's sequence did not move: its next batch is new, at the next offset.
        let second = p.append_unsynced(idempotent(1, "b")).unwrap();
        assert_eq!((second.base_offset, second.duplicate, p.segment_count()), (1, false, 2));
    }

    #[test]
    fn try_append_leaves_an_old_segment_to_a_caller_that_may_wait() {
        let fs = HookFs::default();
        let clock = Arc::new(ManualClock::new(T0));
        let p = open_with(&fs, TopicConfig { segment_ms: 1_000, ..TopicConfig::default() }, clock.clone());
        p.append_unsynced(idempotent(0, "a")).unwrap();
        clock.advance(999);
        assert!(p.try_append_unsynced(idempotent(1, "b")).unwrap().is_some(), "segment.ms has not passed yet");
        clock.advance(1);
        let before = (shape(&p), fs.fs.stats());
        assert_eq!(p.try_append_unsynced(idempotent(2, "c")).unwrap(), None, "appending would roll the old segment");
        assert_eq!((shape(&p), fs.fs.stats()), before, "nothing changed, written or synced");
        let third = p.append_unsynced(idempotent(2, "c")).unwrap();
        assert_eq!((third.base_offset, third.duplicate, p.segment_count()), (2, false, 2));
    }

    /// Another thread holds the partition lock through its roll's fsync (a slow disk): a
    /// caller that must not block gets None at once instead of waiting for that fsync.
    #[test]
    fn try_append_does_not_wait_for_another_thread_rolling_the_segment() {
        let fs = HookFs::default();
        let clock = Arc::new(ManualClock::new(T0));
        // Rolled by age, so the new segment takes the tried batch: only the lock is in its way.
        let p = open_with(&fs, TopicConfig { segment_ms: 1_000, ..TopicConfig::default() }, clock.clone());
        p.append_unsynced(one_record("a")).unwrap();
        clock.advance(1_000);
        let (in_roll_tx, in_roll_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        // Runs inside the roll's fsync of the closing segment, with the partition lock held.
        *fs.hook.lock().unwrap() = Some(Box::new(move || {
            in_roll_tx.send(()).unwrap();
            let _ = release_rx.recv();
        }));
        let roller = {
            let p = p.clone();
            std::thread::spawn(move || p.append_unsynced(one_record("b")))
        };
        in_roll_rx.recv_timeout(Duration::from_secs(10)).expect("the roller reaches its fsync");
        let (tried_tx, tried_rx) = mpsc::channel();
        let trier = {
            let p = p.clone();
            std::thread::spawn(move || tried_tx.send(p.try_append_unsynced(one_record("c"))).unwrap())
        };
        let tried = tried_rx.recv_timeout(Duration::from_secs(10));
        release_tx.send(()).unwrap();
        let rolled = roller.join().unwrap().unwrap();
        trier.join().unwrap();
        assert!(matches!(tried, Ok(Ok(None))), "the try waited for the roll, or appended: {tried:?}");
        assert_eq!((rolled.base_offset, shape(&p).0, p.segment_count()), (1, 2, 2), "only the roller appended");
        let third = p.try_append_unsynced(one_record("c")).unwrap().expect("nothing to wait for any more");
        assert_eq!(third.base_offset, 2);
    }

    /// When nothing is in its way, the non-blocking append is `append_unsynced`: same
    /// outcomes, errors, bytes written, duplicate detection and poisoning.
    #[test]
    fn try_append_appends_what_append_unsynced_appends() {
        for message_timestamp_type in [TimestampType::CreateTime, TimestampType::LogAppendTime] {
            let config = TopicConfig { message_timestamp_type, ..TopicConfig::default() };
            let clock = Arc::new(ManualClock::new(T0 + 5));
            let waiting = open_with(&HookFs::default(), config.clone(), clock.clone());
            let trying = open_with(&HookFs::default(), config, clock);
            let batches = [
                one_record("a"),
                idempotent(0, "b"),
                idempotent(1, "c"),
                idempotent(0, "b"),
                idempotent(5, "d"),
                idempotent(2, "e"),
                b"not a batch".to_vec(),
            ];
            for batch in &batches {
                let expected = waiting.append_unsynced(batch).map_err(|e| e.to_string());
                let got = trying.try_append_unsynced(batch).map_err(|e| e.to_string());
                let got = got.map(|outcome| outcome.expect("nothing to wait for"));
                assert_eq!(got, expected, "{message_timestamp_type:?}");
            }
            let end = waiting.log_end_offset();
            assert_eq!((end, shape(&trying)), (4, shape(&waiting)));
            waiting.wait_until_durable(end).unwrap();
            trying.wait_until_durable(end).unwrap();
            let read = |p: &Arc<Partition>| p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap().records;
            assert_eq!(read(&trying), read(&waiting), "the same bytes were written");

            trying.ctx.health.poison(&"an fsync failed");
            let refused = trying.try_append_unsynced(one_record("f"));
            assert!(matches!(refused, Err(LogError::Poisoned { .. })), "{refused:?}");
        }
    }

    /// The race of the review: a group-commit leader fsyncs the active segment outside every
    /// lock while an append rolls it and fsyncs the same file. The roll's fsync fails (on
    /// Linux the writeback error goes to that fsync only), the leader's succeeds. The batch
    /// the failed fsync covered must not be acknowledged.
    #[test]
    fn a_batch_covered_by_a_failed_roll_fsync_is_not_acknowledged() {
        let fs = HookFs::default();
        let p = open_partition(&fs, 1);
        let first = p.append_unsynced(one_record("a")).unwrap();
        let leader: Arc<Mutex<Option<JoinHandle<Result<()>>>>> = Arc::default();
        let (hook_p, hook_fs, hook_leader) = (p.clone(), fs.fs.clone(), leader.clone());
        // Runs inside the roll's fsync of the closing segment, before it reaches the disk.
        *fs.hook.lock().unwrap() = Some(Box::new(move || {
            let roll_marked_in_flight = hook_p.lock_sync().in_flight;
            let waiter = hook_p.clone();
            let handle = std::thread::spawn(move || waiter.wait_until_durable(first.last_offset + 1));
            if !roll_marked_in_flight {
                // Nothing stops the leader's own fsync of this file: let it finish first,
                // the worst case of the race.
                let result = handle.join().unwrap();
                *hook_leader.lock().unwrap() = Some(std::thread::spawn(move || result));
            } else {
                *hook_leader.lock().unwrap() = Some(handle);
            }
            hook_fs.fail_sync_data(Some(Trigger::Nth(1)));
        }));

        let err = p.append_unsynced(one_record("b")).expect_err("the roll's fsync fails");
        assert!(err.to_string().contains("os error 5"), "{err}");
        let acked = leader.lock().unwrap().take().expect("the hook ran").join().unwrap();
        assert!(
            matches!(acked, Err(LogError::Poisoned { .. })),
            "the first batch was acknowledged after an fsync covering it failed: {acked:?}"
        );
        assert!(p.ctx.health.is_poisoned());
        assert_eq!(p.high_watermark(), 0, "nothing became visible");
    }

    /// A leader's fsync that succeeds after another fsync of the directory failed (here,
    /// while it ran) acknowledges nothing and publishes nothing.
    #[test]
    fn a_sync_ending_after_the_directory_was_poisoned_acknowledges_nothing() {
        let fs = HookFs::default();
        let p = open_partition(&fs, u64::MAX);
        let hook_p = p.clone();
        *fs.hook.lock().unwrap() = Some(Box::new(move || hook_p.ctx.health.poison(&"another fsync failed")));
        let err = p.append(one_record("a")).expect_err("poisoned while its fsync ran");
        assert!(matches!(err, LogError::Poisoned { .. }), "{err}");
        assert_eq!(p.high_watermark(), 0, "the batch must not become visible");
    }
}
