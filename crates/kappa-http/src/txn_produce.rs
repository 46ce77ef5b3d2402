//! HTTP produce requests that span several partitions are written as one Kafka transaction,
//! so they are all-or-nothing for every read_committed reader (views, HTTP reads,
//! read_committed consumers) — across a crash too: a transaction that kill -9 left open is
//! aborted when its transactional id is initialised again at the next start
//! ([`TxnProducers::recover`]), and the coordinator's timeout aborts it in any case.
//!
//! kappa keeps a small pool of reserved transactional ids, `__kappa.http.<n>` (the broker
//! refuses ids with the `__kappa.` prefix to Kafka clients). Each id serves one request at
//! a time; its producer id, epoch and per-partition sequences live here. Any failure
//! forgets the producer, so the next request re-initialises the id, which aborts whatever
//! was left open and fences the old epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kappa_coordinator::{RESERVED_TRANSACTIONAL_ID_PREFIX, TxnCoordinator, TxnError};
use kappa_log::records::BatchBuilder;

/// Multi-partition HTTP produce requests written at the same time.
pub const TRANSACTIONAL_PRODUCERS: usize = 4;
/// After this long an HTTP transaction left open is aborted by the coordinator.
const TRANSACTION_TIMEOUT_MS: i32 = 60_000;
/// Re-initialise the producer (sequences restart at 0) before a sequence could wrap.
const SEQUENCE_MAX: i32 = i32::MAX - 1_000_000;

/// The pool of transactional producers multi-partition HTTP produce requests use.
pub struct TxnProducers {
    coordinator: Arc<TxnCoordinator>,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next_slot: AtomicUsize,
}

struct Slot {
    transactional_id: String,
    /// (producer id, epoch) once initialised; None forces a re-initialisation.
    producer: Option<(i64, i16)>,
    /// Next sequence per (topic, partition) for the current epoch.
    sequences: HashMap<(String, i32), i32>,
}

impl TxnProducers {
    pub fn new(coordinator: Arc<TxnCoordinator>) -> Self {
        let slots = (0..TRANSACTIONAL_PRODUCERS)
            .map(|n| {
                tokio::sync::Mutex::new(Slot {
                    transactional_id: format!("{RESERVED_TRANSACTIONAL_ID_PREFIX}http.{n}"),
                    producer: None,
                    sequences: HashMap::new(),
                })
            })
            .collect();
        Self { coordinator, slots, next_slot: AtomicUsize::new(0) }
    }

    /// Initialises every transactional id now, which aborts any transaction a crash left
    /// open — so read_committed readers are not held back until it times out.
    pub async fn recover(&self) -> Result<(), TxnError> {
        for slot in &self.slots {
            let mut slot = slot.lock().await;
            self.initialise(&mut slot).await?;
        }
        Ok(())
    }

    async fn initialise(&self, slot: &mut Slot) -> Result<(i64, i16), TxnError> {
        slot.producer = None;
        let producer =
            self.coordinator.init_producer_id(Some(&slot.transactional_id), TRANSACTION_TIMEOUT_MS, None).await?;
        slot.sequences.clear();
        slot.producer = Some(producer);
        Ok(producer)
    }

    /// Starts a transaction over `partitions` of `topic`.
    pub async fn begin(&self, topic: &str, partitions: &[i32]) -> Result<Txn<'_>, TxnError> {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[index].lock().await;
        let worn_out = slot.sequences.values().any(|s| *s > SEQUENCE_MAX);
        let producer = match slot.producer {
            Some(producer) if !worn_out => producer,
            _ => self.initialise(&mut slot).await?,
        };
        let txn = Txn { slot, coordinator: &self.coordinator, producer, finished: false };
        let list: Vec<(String, i32)> = partitions.iter().map(|p| (topic.to_owned(), *p)).collect();
        // On failure `txn` drops unfinished: the producer is forgotten and re-initialised.
        self.coordinator.add_partitions(&txn.slot.transactional_id, producer.0, producer.1, &list).await?;
        Ok(txn)
    }
}

/// One open transaction. Commit or abort it; dropped unfinished, its producer is forgotten
/// so the next use aborts it.
pub struct Txn<'a> {
    slot: tokio::sync::MutexGuard<'a, Slot>,
    coordinator: &'a TxnCoordinator,
    producer: (i64, i16),
    finished: bool,
}

impl Txn<'_> {
    /// Marks `builder` as this transaction's next batch on `topic`/`partition`.
    pub fn stamp(&self, topic: &str, partition: i32, builder: BatchBuilder) -> BatchBuilder {
        let sequence = self.slot.sequences.get(&(topic.to_owned(), partition)).copied().unwrap_or(0);
        builder.producer(self.producer.0, self.producer.1, sequence).transactional(true)
    }

    /// Records that a stamped batch of `records` records was appended.
    pub fn appended(&mut self, topic: &str, partition: i32, records: usize) {
        *self.slot.sequences.entry((topic.to_owned(), partition)).or_insert(0) += records as i32;
    }

    pub async fn commit(self) -> Result<(), TxnError> {
        self.end(true).await
    }

    /// Aborts; if even that fails the producer is forgotten, so its next use aborts.
    pub async fn abort(self) {
        if let Err(e) = self.end(false).await {
            tracing::warn!(error = %e, "aborting an HTTP produce transaction failed; it is aborted when its id is next used");
        }
    }

    async fn end(mut self, commit: bool) -> Result<(), TxnError> {
        let (producer_id, epoch) = self.producer;
        let result = self.coordinator.end(&self.slot.transactional_id, producer_id, epoch, commit).await;
        self.finished = result.is_ok();
        result
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.slot.producer = None;
        }
    }
}
