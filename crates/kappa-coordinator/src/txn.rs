//! The transaction coordinator: producer ids, transactional ids with their epochs, and the
//! two-phase end of a transaction (PrepareCommit/PrepareAbort is stored, the markers are
//! written to every partition, then CompleteCommit/CompleteAbort is stored). State lives
//! in the internal compacted topic `__transaction_state`, so a transaction caught between
//! the phases by a crash is completed when the coordinator opens again, and one whose
//! markers or Complete* record failed to write by the next expiry pass. A write that fails
//! leaves the in-memory state as stored: never Prepare* unless Prepare* was stored.
//!
//! Fencing: InitProducerId bumps the epoch of a transactional id (aborting any open
//! transaction with markers at the new epoch), so the log rejects the old producer's
//! writes and this coordinator rejects its requests.
//!
//! Record key:   kind u8 (1 = transactional id, 2 = producer id block) | id_len u16 | id
//! Record value (kind 1): version u8 (2; 1 is read too) | producer_id i64 | epoch i16 |
//!   timeout_ms i32 | status u8 | status_since_ms i64 | partition_count u32 |
//!   (topic_len u16, topic, partition i32)...
//!   (`status_since_ms`: when an Ongoing transaction started, or when the id last became
//!   idle. Version 1 stored only the start of the last transaction — 0 for an id that never
//!   had one — so an idle id read from version 1 counts as idle from the open.)
//! A null value (tombstone) forgets an expired transactional id.
//!
//! Expiration (Kafka's `transactional.id.expiration.ms`): an id idle (Empty or Complete*)
//! for longer than `TxnConfig::id_expiration_ms` is tombstoned and forgotten, so ids a
//! deployment stops using do not accumulate; a later InitProducerId for it starts afresh
//! with a new producer id. Past `TxnConfig::ids_max` ids, the ids idle longest go the same
//! way early (the broker runs the pass every second while over it).
//! Record value (kind 2): version u8 (1) | next_unallocated_producer_id i64

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use kappa_log::batch::HEADER_BYTES;
use kappa_log::codec::{Reader, put_str};
use kappa_log::log::TOPIC_NAME_BYTES_MAX;
use kappa_log::records::{self, BatchBuilder, ControlType, NewRecord};
use kappa_log::{Log, LogError, Partition};

use crate::error::TxnError;
use crate::internal;
use crate::offsets::{CONSUMER_OFFSETS_TOPIC, OffsetStore};

pub const TRANSACTION_STATE_TOPIC: &str = "__transaction_state";
/// Transactional ids starting with this are kappa's own (HTTP produce); the broker refuses
/// them to Kafka clients.
pub const RESERVED_TRANSACTIONAL_ID_PREFIX: &str = "__kappa.";
/// Producer ids are reserved durably in blocks of this many.
const PRODUCER_ID_BLOCK: i64 = 1000;
const KEY_TXN: u8 = 1;
const KEY_PID_BLOCK: u8 = 2;
const PID_BLOCK_KEY: &str = "producer-ids";
/// Tombstones of expired transactional ids written per batch, and the ids' bytes per batch
/// (well under the internal topics' `max.message.bytes`).
pub const EXPIRED_IDS_PER_BATCH: usize = 500;
const EXPIRED_ID_BYTES_PER_BATCH: usize = 512 * 1024;

/// Bytes one partition takes in a transaction record at most: topic_len u16, a topic name
/// of at most the log's [`TOPIC_NAME_BYTES_MAX`], partition i32.
const TXN_PARTITION_BYTES_MAX: usize = 2 + TOPIC_NAME_BYTES_MAX + 4;
/// A transaction record's batch without its partitions, at most: the batch header, the
/// record's framing (varints; 64 is generous), the key (kind u8, id_len u16, an id of at
/// most [`TRANSACTIONAL_ID_BYTES_LIMIT`]) and the value's fixed fields.
const TXN_RECORD_FIXED_BYTES_MAX: usize = HEADER_BYTES + 64 + 3 + TRANSACTIONAL_ID_BYTES_LIMIT + 28;
/// The most partitions one transaction may touch, whatever [`TxnConfig::partitions_max`]
/// says: the most whose record still fits the internal topic's `max.message.bytes`
/// (16,190). A record that could not be stored would leave its transaction unable to end.
pub const TXN_PARTITIONS_MAX_LIMIT: usize =
    (internal::INTERNAL_MESSAGE_BYTES_MAX - TXN_RECORD_FIXED_BYTES_MAX) / TXN_PARTITION_BYTES_MAX;
/// The longest transactional id storable, whatever [`TxnConfig::id_bytes_max`] says: ids
/// are stored with a u16 length.
pub const TRANSACTIONAL_ID_BYTES_LIMIT: usize = u16::MAX as usize;
const _: () = assert!(TXN_PARTITIONS_MAX_LIMIT >= 10_000, "the default partitions_max must fit");

#[derive(Debug, Clone)]
pub struct TxnConfig {
    /// Kafka: transaction.max.timeout.ms.
    pub max_timeout_ms: i32,
    /// Partitions one transaction may touch (at most [`TXN_PARTITIONS_MAX_LIMIT`]; a larger
    /// value is lowered to it at open).
    pub partitions_max: usize,
    /// Longest transactional id accepted, in bytes (at most
    /// [`TRANSACTIONAL_ID_BYTES_LIMIT`]; a larger value is lowered to it at open).
    pub id_bytes_max: usize,
    /// Kafka: transactional.id.expiration.ms — how long an idle transactional id is kept.
    pub id_expiration_ms: i64,
    /// Transactional ids kept at most: past it, the expiry pass forgets the idle ones
    /// idle longest early, down to nine tenths of it (Kafka has no such limit; without it a
    /// client minting ids grows the map for `id_expiration_ms`).
    pub ids_max: usize,
}

impl Default for TxnConfig {
    fn default() -> Self {
        Self {
            max_timeout_ms: 900_000,
            partitions_max: 10_000,
            id_bytes_max: 1024,
            id_expiration_ms: 604_800_000,
            ids_max: TRANSACTIONAL_IDS_MAX_DEFAULT,
        }
    }
}

/// Default [`TxnConfig::ids_max`].
pub const TRANSACTIONAL_IDS_MAX_DEFAULT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Empty => "Empty",
            Self::Ongoing => "Ongoing",
            Self::PrepareCommit => "PrepareCommit",
            Self::PrepareAbort => "PrepareAbort",
            Self::CompleteCommit => "CompleteCommit",
            Self::CompleteAbort => "CompleteAbort",
        }
    }
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(code: u8) -> Option<Self> {
        [Self::Empty, Self::Ongoing, Self::PrepareCommit, Self::PrepareAbort, Self::CompleteCommit, Self::CompleteAbort]
            .get(code as usize)
            .copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TxnMetadata {
    producer_id: i64,
    epoch: i16,
    timeout_ms: i32,
    status: TxnStatus,
    /// When an Ongoing transaction started (for its timeout), or when the id last became
    /// idle (for its expiration).
    status_since_ms: i64,
    partitions: BTreeSet<(String, i32)>,
    /// Set (never persisted) when the id expired and left the map: whoever locked the entry
    /// before that must look the id up again.
    expired: bool,
    /// The epoch the last InitProducerId bumped from, until a transaction starts under the
    /// new one (in memory only): a retry of that InitProducerId whose answer was lost
    /// carries it, and gets the same answer instead of being fenced (Kafka's
    /// lastProducerEpoch, KIP-360).
    bumped_from: Option<i16>,
}

/// An ongoing transaction held locked while its batches are appended (see
/// [`TxnCoordinator::lock_ongoing`]).
pub struct OngoingTxn(tokio::sync::OwnedMutexGuard<TxnMetadata>);

impl OngoingTxn {
    /// Whether AddPartitionsToTxn added this partition to the transaction.
    pub fn includes(&self, topic: &str, partition: i32) -> bool {
        self.0.partitions.contains(&(topic.to_owned(), partition))
    }
}

pub struct TxnCoordinator {
    log: Arc<Log>,
    state: Arc<Partition>,
    offsets: Arc<OffsetStore>,
    config: TxnConfig,
    /// One async lock per transactional id: its operations run one at a time.
    txns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<TxnMetadata>>>>,
    /// (next id to hand out, end of the durably reserved block).
    producer_ids: tokio::sync::Mutex<(i64, i64)>,
    /// While over `ids_max`, no early expiry pass before this time (ms): set when a pass
    /// could not get under the limit (all the rest busy or reserved, or a failed write),
    /// so the broker's every-second check does not redo a pass that cannot help.
    early_pass_not_before_ms: AtomicI64,
}

/// How long after an expiry pass that could not get under `ids_max` the next early one waits.
const EARLY_PASS_BACKOFF_MS: i64 = 60_000;

impl TxnCoordinator {
    /// Opens the coordinator: creates or replays `__transaction_state`, then completes any
    /// transaction a crash left between its two phases.
    pub async fn open(log: Arc<Log>, offsets: Arc<OffsetStore>, mut config: TxnConfig) -> Result<Arc<Self>, LogError> {
        if config.partitions_max > TXN_PARTITIONS_MAX_LIMIT || config.id_bytes_max > TRANSACTIONAL_ID_BYTES_LIMIT {
            tracing::warn!(
                partitions_max = config.partitions_max,
                id_bytes_max = config.id_bytes_max,
                "transaction limits lowered to what one __transaction_state record can hold"
            );
            config.partitions_max = config.partitions_max.min(TXN_PARTITIONS_MAX_LIMIT);
            config.id_bytes_max = config.id_bytes_max.min(TRANSACTIONAL_ID_BYTES_LIMIT);
        }
        let state = internal::open_topic(&log, TRANSACTION_STATE_TOPIC)?;
        let (mut txns, reserved) = replay(&state)?;
        let opened_ms = log.clock().now_ms();
        for meta in txns.values_mut().filter(|m| m.status_since_ms == SINCE_UNKNOWN) {
            meta.status_since_ms = opened_ms;
        }
        let coordinator = Arc::new(Self {
            log,
            state,
            offsets,
            config,
            txns: Mutex::new(txns.into_iter().map(|(id, m)| (id, Arc::new(tokio::sync::Mutex::new(m)))).collect()),
            producer_ids: tokio::sync::Mutex::new((reserved, reserved)),
            early_pass_not_before_ms: AtomicI64::new(i64::MIN),
        });
        for (id, entry) in coordinator.entries() {
            let mut meta = entry.lock().await;
            if !matches!(meta.status, TxnStatus::PrepareCommit | TxnStatus::PrepareAbort) {
                continue;
            }
            tracing::info!(transactional_id = %id, status = meta.status.name(), "completing a transaction interrupted by a restart");
            if let Err(e) = coordinator.finish(&id, &mut meta).await {
                // The expiry pass tries again every second; the rest of the broker can start.
                tracing::error!(transactional_id = %id, error = %e, "could not complete a prepared transaction; will try again");
            }
        }
        Ok(coordinator)
    }

    fn entries(&self) -> Vec<(String, Arc<tokio::sync::Mutex<TxnMetadata>>)> {
        self.txns.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn entry(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<TxnMetadata>>> {
        self.txns.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// InitProducerId. Without a transactional id: a fresh producer id (idempotence).
    /// With one: the id's producer with a bumped epoch, after aborting its open transaction.
    /// `expected` is the (producer id, epoch) a v3+ client already holds, or None.
    pub async fn init_producer_id(
        &self,
        transactional_id: Option<&str>,
        timeout_ms: i32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), TxnError> {
        let Some(id) = transactional_id.filter(|id| !id.is_empty()) else {
            return Ok((self.allocate_producer_id().await?, 0));
        };
        if id.len() > self.config.id_bytes_max {
            return Err(TxnError::InvalidTransactionalId(format!("longer than {} bytes", self.config.id_bytes_max)));
        }
        if timeout_ms <= 0 || timeout_ms > self.config.max_timeout_ms {
            return Err(TxnError::InvalidTransactionTimeout {
                requested_ms: timeout_ms,
                max_ms: self.config.max_timeout_ms,
            });
        }
        let mut meta = loop {
            let meta = self.entry_or_fresh(id, timeout_ms).await?.lock_owned().await;
            if !meta.expired {
                break meta;
            }
        };
        // A fresh entry (epoch -1: the id was unknown or had expired) accepts whatever the
        // client held, as Kafka does; it gets the new producer id.
        if let Some((pid, epoch)) = expected.filter(|(pid, _)| *pid >= 0 && meta.epoch >= 0) {
            if pid != meta.producer_id || epoch > meta.epoch {
                return Err(TxnError::InvalidProducerIdMapping);
            }
            if epoch < meta.epoch && meta.bumped_from == Some(epoch) {
                // The answer to the bump from `epoch` was lost (or it failed after storing
                // its Prepare*) and this is the retry: finish what it started.
                if matches!(meta.status, TxnStatus::PrepareCommit | TxnStatus::PrepareAbort) {
                    self.finish(id, &mut meta).await?;
                }
                return Ok((meta.producer_id, meta.epoch));
            }
            if epoch < meta.epoch && meta.epoch >= 0 {
                return Err(TxnError::ProducerFenced);
            }
        }
        // Restored if nothing gets stored, so a failed bump leaves the id as it was.
        let before = meta.clone();
        // Only the producer holding the current epoch asking for a bump may retry it: a new
        // instance's bump (no expected epoch) fences the old one, retries included (Kafka too).
        meta.bumped_from =
            expected.filter(|held| meta.epoch >= 0 && *held == (meta.producer_id, meta.epoch)).map(|(_, epoch)| epoch);
        // Bump first: markers written below carry the new epoch, which fences the old producer.
        if meta.epoch >= i16::MAX - 1 {
            match self.allocate_producer_id().await {
                Ok(producer_id) => meta.producer_id = producer_id,
                Err(e) => {
                    *meta = before;
                    return Err(e);
                }
            }
            meta.epoch = 0;
        } else {
            meta.epoch += 1;
        }
        meta.timeout_ms = timeout_ms;
        let decided = match meta.status {
            TxnStatus::Ongoing | TxnStatus::PrepareAbort => Some(false),
            TxnStatus::PrepareCommit => Some(true),
            _ => None,
        };
        let stored = match decided {
            Some(commit) => self.prepare(id, &mut meta, commit).await,
            None => {
                meta.status = TxnStatus::Empty;
                meta.status_since_ms = self.now();
                self.persist(id, &meta).await
            }
        };
        if let Err(e) = stored {
            *meta = before;
            return Err(e);
        }
        if decided.is_some() {
            // On failure it stays prepared under the new epoch: a retry, or the expiry pass, finishes it.
            self.finish(id, &mut meta).await?;
        }
        tracing::debug!(
            transactional_id = id,
            producer_id = meta.producer_id,
            epoch = meta.epoch,
            "initialised transactional producer"
        );
        Ok((meta.producer_id, meta.epoch))
    }

    /// The id's entry, created (Empty, with a new producer id) when it has none.
    async fn entry_or_fresh(
        &self,
        id: &str,
        timeout_ms: i32,
    ) -> Result<Arc<tokio::sync::Mutex<TxnMetadata>>, TxnError> {
        if let Some(entry) = self.entry(id) {
            return Ok(entry);
        }
        let producer_id = self.allocate_producer_id().await?;
        let fresh = TxnMetadata {
            producer_id,
            epoch: -1,
            timeout_ms,
            status: TxnStatus::Empty,
            status_since_ms: self.now(),
            partitions: BTreeSet::new(),
            expired: false,
            bumped_from: None,
        };
        Ok(self
            .txns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(fresh)))
            .clone())
    }

    /// The id's metadata, locked. An id that expired while this waited is looked up again
    /// (and is then unknown, unless InitProducerId created it anew).
    async fn lock_known(&self, id: &str) -> Result<tokio::sync::OwnedMutexGuard<TxnMetadata>, TxnError> {
        loop {
            let meta = self.entry(id).ok_or(TxnError::InvalidProducerIdMapping)?.lock_owned().await;
            if !meta.expired {
                return Ok(meta);
            }
        }
    }

    async fn allocate_producer_id(&self) -> Result<i64, TxnError> {
        let mut ids = self.producer_ids.lock().await;
        if ids.0 >= ids.1 {
            let reserved = ids.1 + PRODUCER_ID_BLOCK;
            let record =
                NewRecord::new(Some(&key(KEY_PID_BLOCK, PID_BLOCK_KEY)), Some(&encode_pid_block(reserved)), self.now());
            self.append(&self.state, BatchBuilder::new().record(record).build()).await?;
            ids.1 = reserved;
        }
        ids.0 += 1;
        Ok(ids.0 - 1)
    }

    fn now(&self) -> i64 {
        self.log.clock().now_ms()
    }

    /// Checks a request's producer id and epoch against the transactional id.
    fn check(meta: &TxnMetadata, producer_id: i64, epoch: i16) -> Result<(), TxnError> {
        if producer_id != meta.producer_id {
            return Err(TxnError::InvalidProducerIdMapping);
        }
        if epoch < meta.epoch {
            return Err(TxnError::ProducerFenced);
        }
        if epoch > meta.epoch {
            return Err(TxnError::InvalidProducerIdMapping);
        }
        Ok(())
    }

    /// AddPartitionsToTxn (and AddOffsetsToTxn, which adds `__consumer_offsets`). Checks
    /// the limit before changing anything, and changes nothing unless the result is stored.
    pub async fn add_partitions(
        &self,
        id: &str,
        producer_id: i64,
        epoch: i16,
        partitions: &[(String, i32)],
    ) -> Result<(), TxnError> {
        let mut meta = self.lock_known(id).await?;
        Self::check(&meta, producer_id, epoch)?;
        let starting = match meta.status {
            TxnStatus::PrepareCommit | TxnStatus::PrepareAbort => return Err(TxnError::ConcurrentTransactions),
            TxnStatus::Ongoing => false,
            _ => true,
        };
        let added: BTreeSet<(String, i32)> =
            partitions.iter().filter(|p| starting || !meta.partitions.contains(*p)).cloned().collect();
        let count = if starting { 0 } else { meta.partitions.len() } + added.len();
        if count > self.config.partitions_max {
            return Err(TxnError::TooManyPartitions { count, max: self.config.partitions_max });
        }
        if !starting && added.is_empty() {
            return Ok(());
        }
        let before = (meta.status, meta.status_since_ms, meta.bumped_from);
        let before_partitions = if starting { std::mem::take(&mut meta.partitions) } else { BTreeSet::new() };
        if starting {
            meta.status = TxnStatus::Ongoing;
            meta.status_since_ms = self.now();
            meta.bumped_from = None;
        }
        meta.partitions.extend(added.iter().cloned());
        if let Err(e) = self.persist(id, &meta).await {
            // Not stored: the transaction stays as it was, so it can still end.
            if starting {
                meta.partitions = before_partitions;
            } else {
                meta.partitions.retain(|p| !added.contains(p));
            }
            (meta.status, meta.status_since_ms, meta.bumped_from) = before;
            return Err(e);
        }
        Ok(())
    }

    /// Produce verification (KIP-890's idea): the id's transaction, locked, when `producer_id`
    /// and `epoch` own it and it is ongoing. The produce path appends its transactional
    /// batches while holding it, so no marker can be written between the check and the
    /// append — a batch that lands after its transaction ended would open a transaction no
    /// marker ever closes, holding the partition's last stable offset forever.
    pub async fn lock_ongoing(&self, id: &str, producer_id: i64, epoch: i16) -> Result<OngoingTxn, TxnError> {
        let meta = self.lock_known(id).await?;
        Self::check(&meta, producer_id, epoch)?;
        if meta.status != TxnStatus::Ongoing {
            return Err(TxnError::InvalidTxnState(meta.status.name()));
        }
        Ok(OngoingTxn(meta))
    }

    /// AddOffsetsToTxn: the group's offsets will be committed with the transaction.
    pub async fn add_offsets(&self, id: &str, producer_id: i64, epoch: i16) -> Result<(), TxnError> {
        self.add_partitions(id, producer_id, epoch, &[(CONSUMER_OFFSETS_TOPIC.to_owned(), 0)]).await
    }

    /// TxnOffsetCommit: checks the producer belongs to an open transaction that includes
    /// the offsets partition.
    /// Held until the offsets are written: the transaction cannot end (by EndTxn or its
    /// timeout) in between, which would leave them pending after its marker for good.
    pub async fn check_offset_commit(&self, id: &str, producer_id: i64, epoch: i16) -> Result<OngoingTxn, TxnError> {
        let txn = self.lock_ongoing(id, producer_id, epoch).await?;
        if !txn.includes(CONSUMER_OFFSETS_TOPIC, 0) {
            return Err(TxnError::InvalidTxnState(TxnStatus::Ongoing.name()));
        }
        Ok(txn)
    }

    /// EndTxn: commits or aborts. A retry of an EndTxn that already completed succeeds.
    pub async fn end(&self, id: &str, producer_id: i64, epoch: i16, commit: bool) -> Result<(), TxnError> {
        let mut meta = self.lock_known(id).await?;
        Self::check(&meta, producer_id, epoch)?;
        match (meta.status, commit) {
            (TxnStatus::Ongoing, _) => self.complete(id, &mut meta, commit).await,
            (TxnStatus::CompleteCommit, true) | (TxnStatus::CompleteAbort, false) | (TxnStatus::Empty, _) => Ok(()),
            (TxnStatus::PrepareCommit, _) | (TxnStatus::PrepareAbort, _) => Err(TxnError::ConcurrentTransactions),
            (status, _) => Err(TxnError::InvalidTxnState(status.name())),
        }
    }

    /// Phase 2: store Prepare*, write a marker to every partition, store Complete*.
    async fn complete(&self, id: &str, meta: &mut TxnMetadata, commit: bool) -> Result<(), TxnError> {
        self.prepare(id, meta, commit).await?;
        self.finish(id, meta).await
    }

    /// Stores PrepareCommit/PrepareAbort: from then on the outcome is decided, and
    /// [`Self::finish`] (retried by [`Self::abort_expired`] and at open) completes it. When
    /// it cannot be stored the status stays what it was, so nothing waits on a decision
    /// that was never recorded.
    async fn prepare(&self, id: &str, meta: &mut TxnMetadata, commit: bool) -> Result<(), TxnError> {
        let before = meta.status;
        meta.status = if commit { TxnStatus::PrepareCommit } else { TxnStatus::PrepareAbort };
        if let Err(e) = self.persist(id, meta).await {
            meta.status = before;
            return Err(e);
        }
        Ok(())
    }

    /// Writes a prepared transaction's markers, then stores Complete*. On failure it stays
    /// prepared, with its partitions, for the next try (a partition accepts the same marker
    /// again: it ends nothing that is not open).
    async fn finish(&self, id: &str, meta: &mut TxnMetadata) -> Result<(), TxnError> {
        let commit = match meta.status {
            TxnStatus::PrepareCommit => true,
            TxnStatus::PrepareAbort => false,
            status => return Err(TxnError::InvalidTxnState(status.name())),
        };
        let control = if commit { ControlType::Commit } else { ControlType::Abort };
        let mut writes = Vec::new();
        for (topic, index) in &meta.partitions {
            let Ok(partition) = self.log.partition(topic, *index) else {
                tracing::warn!(
                    transactional_id = id,
                    topic,
                    partition = index,
                    "skipping the marker for a partition that no longer exists"
                );
                continue;
            };
            let marker = BatchBuilder::control_marker(meta.producer_id, meta.epoch, control, 0, self.now()).build();
            writes.push(tokio::task::spawn_blocking(move || partition.append(marker)));
        }
        let mut failed = None;
        for write in writes {
            // Every write is awaited, so none is still running when the next try starts.
            let result = write.await.map_err(|e| TxnError::Storage(e.to_string()));
            if let Err(e) = result.and_then(|r| r.map_err(|e| TxnError::Storage(e.to_string()))) {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if meta.partitions.contains(&(CONSUMER_OFFSETS_TOPIC.to_owned(), 0)) {
            self.offsets.complete_transaction(meta.producer_id, commit);
        }
        let prepared = (meta.status, meta.status_since_ms);
        let partitions = std::mem::take(&mut meta.partitions);
        meta.status = if commit { TxnStatus::CompleteCommit } else { TxnStatus::CompleteAbort };
        meta.status_since_ms = self.now();
        if let Err(e) = self.persist(id, meta).await {
            (meta.status, meta.status_since_ms) = prepared;
            meta.partitions = partitions;
            return Err(e);
        }
        tracing::debug!(transactional_id = id, commit, "transaction completed");
        Ok(())
    }

    /// Aborts open transactions older than their timeout, bumping the epoch so the
    /// abandoned producer is fenced, and completes prepared ones whose markers or Complete*
    /// record could not be written before (Kafka's coordinator retries markers too): a
    /// prepared transaction holds its partitions' last stable offset until it completes.
    /// Returns how many timed-out transactions were aborted.
    pub async fn abort_expired(&self) -> usize {
        let now = self.now();
        let mut aborted = 0;
        for (id, entry) in self.entries() {
            let mut meta = entry.lock().await;
            match meta.status {
                TxnStatus::PrepareCommit | TxnStatus::PrepareAbort if !meta.expired => {
                    match self.finish(&id, &mut meta).await {
                        Ok(()) => tracing::info!(transactional_id = %id, "completed a prepared transaction"),
                        Err(e) => {
                            tracing::error!(transactional_id = %id, error = %e, "could not complete a prepared transaction; will try again")
                        }
                    }
                    continue;
                }
                TxnStatus::Ongoing if now - meta.status_since_ms >= i64::from(meta.timeout_ms) => {}
                _ => continue,
            }
            tracing::info!(transactional_id = %id, producer_id = meta.producer_id, "aborting a transaction that exceeded transaction.timeout.ms");
            let epoch = meta.epoch;
            meta.epoch = meta.epoch.saturating_add(1);
            match self.complete(&id, &mut meta, false).await {
                Ok(()) => aborted += 1,
                Err(e) => {
                    if meta.status == TxnStatus::Ongoing {
                        meta.epoch = epoch; // nothing was stored under the new epoch
                    }
                    tracing::error!(transactional_id = %id, error = %e, "could not abort an expired transaction")
                }
            }
        }
        aborted
    }

    /// Forgets transactional ids idle (Empty or Complete*) for at least `id_expiration_ms`
    /// and, while more than `ids_max` are known, the ids idle longest down to nine tenths of
    /// it — never kappa's reserved ones: tombstones in `__transaction_state` (batches of at
    /// most [`EXPIRED_IDS_PER_BATCH`] ids), then out of memory. Returns the ids forgotten.
    /// Ids whose tombstones cannot be written are kept and tried again at the next pass.
    pub async fn expire_transactional_ids(&self) -> Vec<String> {
        let now = self.now();
        let entries = self.entries();
        let known = entries.len();
        let mut idle = Vec::new();
        for (id, entry) in entries {
            // A busy id is not idle: skip it rather than wait (and never hold a lock while
            // waiting for another).
            let Ok(meta) = entry.try_lock_owned() else { continue };
            let is_idle =
                matches!(meta.status, TxnStatus::Empty | TxnStatus::CompleteCommit | TxnStatus::CompleteAbort);
            // kappa's own ids (a fixed pool, held by a running server) never expire.
            let reserved = id.starts_with(RESERVED_TRANSACTIONAL_ID_PREFIX);
            if !meta.expired && !reserved && is_idle {
                idle.push((id, meta));
            }
        }
        // Idle longest first; the id breaks ties.
        idle.sort_unstable_by(|(a, ma), (b, mb)| (ma.status_since_ms, a).cmp(&(mb.status_since_ms, b)));
        let timed_out = idle.partition_point(|(_, m)| now - m.status_since_ms >= self.config.id_expiration_ms);
        let over = known.saturating_sub(self.config.ids_max - self.config.ids_max / 10);
        let doomed_count = if known > self.config.ids_max { timed_out.max(over) } else { timed_out };
        idle.truncate(doomed_count.min(idle.len())); // the others are unlocked here
        let early = idle.len().saturating_sub(timed_out);
        let mut forgotten = Vec::new();
        let mut doomed = Vec::new();
        let mut doomed_bytes = 0;
        let mut idle = idle.into_iter().peekable();
        while let Some((id, meta)) = idle.next() {
            doomed_bytes += id.len();
            doomed.push((id, meta));
            let full = doomed.len() == EXPIRED_IDS_PER_BATCH || doomed_bytes >= EXPIRED_ID_BYTES_PER_BATCH;
            if full || idle.peek().is_none() {
                let batch = self.forget(std::mem::take(&mut doomed), now).await;
                doomed_bytes = 0;
                if batch.is_empty() {
                    break; // the write failed (logged): the rest waits for the next pass
                }
                forgotten.extend(batch);
            }
        }
        if !forgotten.is_empty() {
            tracing::info!(
                forgotten = forgotten.len(),
                early,
                known,
                ids_max = self.config.ids_max,
                "forgot idle transactional ids (expired, or idle longest while more than transactional_ids_max are known)"
            );
        }
        if known.saturating_sub(forgotten.len()) > self.config.ids_max {
            self.early_pass_not_before_ms.store(now.saturating_add(EARLY_PASS_BACKOFF_MS), Ordering::Relaxed);
        }
        forgotten
    }

    /// True when more transactional ids are known than `ids_max` and an expiry pass may help
    /// now (not within a minute of one that could not get under it).
    pub fn over_ids_max(&self) -> bool {
        let over = self.txns.lock().unwrap_or_else(|e| e.into_inner()).len() > self.config.ids_max;
        over && self.now() >= self.early_pass_not_before_ms.load(Ordering::Relaxed)
    }

    /// Writes the tombstones of `doomed` (locked, idle ids) in one batch, then drops them.
    async fn forget(&self, doomed: Vec<(String, tokio::sync::OwnedMutexGuard<TxnMetadata>)>, now: i64) -> Vec<String> {
        if doomed.is_empty() {
            return Vec::new();
        }
        let mut batch = BatchBuilder::new();
        for (id, _) in &doomed {
            batch.push(NewRecord::new(Some(&key(KEY_TXN, id)), None, now));
        }
        if let Err(e) = self.append(&self.state, batch.build()).await {
            tracing::error!(ids = doomed.len(), error = %e, "could not expire idle transactional ids; will try again");
            return Vec::new();
        }
        let mut txns = self.txns.lock().unwrap_or_else(|e| e.into_inner());
        doomed
            .into_iter()
            .map(|(id, mut meta)| {
                meta.expired = true;
                txns.remove(&id);
                tracing::debug!(transactional_id = %id, producer_id = meta.producer_id, idle_ms = now - meta.status_since_ms, "forgot an idle transactional id");
                id
            })
            .collect()
    }

    /// Whether `id` is a transactional id this coordinator knows (not expired).
    pub fn knows(&self, id: &str) -> bool {
        self.entry(id).is_some()
    }

    /// (transactional id, producer id, epoch, status name) of every known transactional id.
    pub async fn describe(&self) -> Vec<(String, i64, i16, &'static str)> {
        let mut out = Vec::new();
        for (id, entry) in self.entries() {
            let meta = entry.lock().await;
            out.push((id, meta.producer_id, meta.epoch, meta.status.name()));
        }
        out.sort();
        out
    }

    async fn persist(&self, id: &str, meta: &TxnMetadata) -> Result<(), TxnError> {
        let record = NewRecord::new(Some(&key(KEY_TXN, id)), Some(&encode_txn(meta)), self.now());
        self.append(&self.state, BatchBuilder::new().record(record).build()).await
    }

    async fn append(&self, partition: &Arc<Partition>, bytes: Vec<u8>) -> Result<(), TxnError> {
        let partition = partition.clone();
        tokio::task::spawn_blocking(move || partition.append(bytes))
            .await
            .map_err(|e| TxnError::Storage(e.to_string()))?
            .map_err(|e| TxnError::Storage(e.to_string()))?;
        Ok(())
    }
}

fn key(kind: u8, id: &str) -> Vec<u8> {
    let mut out = vec![kind];
    put_str(&mut out, id);
    out
}

fn encode_pid_block(reserved: i64) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(&reserved.to_be_bytes());
    out
}

/// An idle time read from a version-1 record (not stored there), settled at open.
const SINCE_UNKNOWN: i64 = i64::MIN;

/// The version of a transactional id's record that [`encode_txn`] writes.
const TXN_RECORD_VERSION: u8 = 2;

fn encode_txn(meta: &TxnMetadata) -> Vec<u8> {
    let mut out = vec![TXN_RECORD_VERSION];
    out.extend_from_slice(&meta.producer_id.to_be_bytes());
    out.extend_from_slice(&meta.epoch.to_be_bytes());
    out.extend_from_slice(&meta.timeout_ms.to_be_bytes());
    out.push(meta.status.code());
    out.extend_from_slice(&meta.status_since_ms.to_be_bytes());
    out.extend_from_slice(&(meta.partitions.len() as u32).to_be_bytes());
    for (topic, partition) in &meta.partitions {
        put_str(&mut out, topic);
        out.extend_from_slice(&partition.to_be_bytes());
    }
    out
}

fn decode_txn(bytes: &[u8]) -> Option<TxnMetadata> {
    let mut c = Reader(bytes);
    let version = c.u8()?;
    (version == 1 || version == TXN_RECORD_VERSION).then_some(())?;
    let (producer_id, epoch, timeout_ms) = (c.i64()?, c.i16()?, c.i32()?);
    let status = TxnStatus::from_code(c.u8()?)?;
    let status_since_ms = match c.i64()? {
        _ if version == 1 && status != TxnStatus::Ongoing => SINCE_UNKNOWN,
        stored => stored,
    };
    let count = c.i32()? as u32 as usize;
    let mut partitions = BTreeSet::new();
    for _ in 0..count.min(bytes.len()) {
        partitions.insert((c.string()?, c.i32()?));
    }
    Some(TxnMetadata {
        producer_id,
        epoch,
        timeout_ms,
        status,
        status_since_ms,
        partitions,
        expired: false,
        bumped_from: None,
    })
}

/// Rebuilds the transactional ids and the reserved producer-id block from the topic.
fn replay(state: &Partition) -> Result<(HashMap<String, TxnMetadata>, i64), LogError> {
    let mut txns = HashMap::new();
    let mut reserved = 0i64;
    internal::replay(state, |_, batch| {
        let decoded =
            records::decode_records(batch, usize::MAX).map_err(|e| LogError::InvalidRecords(e.to_string()))?;
        for record in decoded.iter() {
            let Some(key) = record.key else { continue };
            let mut c = Reader(key);
            let (Some(kind), Some(id)) = (c.u8(), c.string()) else { continue };
            match (kind, record.value) {
                (KEY_PID_BLOCK, Some(value)) => {
                    let mut v = Reader(value);
                    if let (Some(1), Some(block_end)) = (v.u8(), v.i64()) {
                        reserved = reserved.max(block_end);
                    }
                }
                (KEY_TXN, Some(value)) => {
                    if let Some(meta) = decode_txn(value) {
                        txns.insert(id, meta);
                    }
                }
                (KEY_TXN, None) => {
                    txns.remove(&id);
                }
                _ => {}
            }
        }
        Ok(())
    })?;
    Ok((txns, reserved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::Isolation;

    /// A crash between "PrepareCommit stored" and "markers written": the next open writes
    /// the commit markers, so the transaction's records become visible to read_committed.
    #[tokio::test]
    async fn a_transaction_caught_in_prepare_commit_completes_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let open_log = || Arc::new(Log::open(dir.path(), kappa_log::LogOptions::default()).unwrap().0);
        let (pid, epoch) = {
            let log = open_log();
            log.create_topic("out", 1, &Default::default()).unwrap();
            let offsets = Arc::new(OffsetStore::open(&log).unwrap());
            let txns = TxnCoordinator::open(log.clone(), offsets, TxnConfig::default()).await.unwrap();
            let (pid, epoch) = txns.init_producer_id(Some("tx"), 60_000, None).await.unwrap();
            txns.add_partitions("tx", pid, epoch, &[("out".into(), 0)]).await.unwrap();
            let data = BatchBuilder::new()
                .producer(pid, epoch, 0)
                .transactional(true)
                .record(NewRecord::new(None, Some(b"v"), 1))
                .build();
            log.partition("out", 0).unwrap().append(data).unwrap();
            // Phase one only, as if the process died right after storing PrepareCommit.
            let entry = txns.entry("tx").unwrap();
            let mut meta = entry.lock().await;
            meta.status = TxnStatus::PrepareCommit;
            txns.persist("tx", &meta).await.unwrap();
            (pid, epoch)
        };
        let log = open_log();
        assert_eq!(log.partition("out", 0).unwrap().last_stable_offset(), 0, "still open before recovery");
        let offsets = Arc::new(OffsetStore::open(&log).unwrap());
        let txns = TxnCoordinator::open(log.clone(), offsets, TxnConfig::default()).await.unwrap();
        let partition = log.partition("out", 0).unwrap();
        assert_eq!(partition.last_stable_offset(), 2, "data and commit marker are stable");
        assert!(partition.read(0, 1 << 20, Isolation::ReadCommitted).unwrap().aborted.is_empty());
        assert_eq!(txns.describe().await, vec![("tx".to_owned(), pid, epoch, "CompleteCommit")]);
    }

    #[test]
    fn transaction_metadata_round_trips() {
        let meta = TxnMetadata {
            producer_id: 9,
            epoch: 3,
            timeout_ms: 60_000,
            status: TxnStatus::PrepareCommit,
            status_since_ms: 12,
            partitions: [("a".to_owned(), 0), ("b".to_owned(), 2)].into_iter().collect(),
            expired: false,
            bumped_from: None,
        };
        assert_eq!(decode_txn(&encode_txn(&meta)), Some(meta.clone()));
        let bytes = encode_txn(&meta);
        for cut in 0..bytes.len() {
            assert_eq!(decode_txn(&bytes[..cut]), None, "cut at {cut}");
        }
    }

    /// Version 1 stored the last transaction's start (0 for an id that never had one): an
    /// idle id's time is unknown (settled to the open time), an ongoing one's is its start.
    #[test]
    fn version_1_records_read_idle_times_as_unknown() {
        let mut meta = TxnMetadata {
            producer_id: 9,
            epoch: 0,
            timeout_ms: 60_000,
            status: TxnStatus::Empty,
            status_since_ms: 0,
            partitions: BTreeSet::new(),
            expired: false,
            bumped_from: None,
        };
        let mut v1 = encode_txn(&meta);
        v1[0] = 1;
        assert_eq!(decode_txn(&v1).map(|m| m.status_since_ms), Some(SINCE_UNKNOWN));
        meta.status = TxnStatus::Ongoing;
        meta.status_since_ms = 77;
        let mut v1 = encode_txn(&meta);
        v1[0] = 1;
        assert_eq!(decode_txn(&v1).map(|m| m.status_since_ms), Some(77));
        v1[0] = 3;
        assert_eq!(decode_txn(&v1), None, "an unknown version is not guessed at");
    }
}
