//! The consumer-group member: owns the input partitions the group assigns it, restores
//! their views' state from the changelogs on assignment, and applies each partition's
//! records in steps, each step one Kafka transaction (changelog records of every view +
//! the input offset).
//!
//! Threading: one thread runs the consumer and every step; librdkafka calls the rebalance
//! callback inside `poll`, on the same thread, so a rebalance never meets a transaction in
//! flight (steps commit before the next poll) — revocation has nothing left to commit and
//! only releases the partition.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kappa_views::backend::{InputRecord, OutputRecord};
use kappa_views::partitioned::Placement;
use kappa_views::{PartitionView, PayloadCodec, Schemas, Step, View};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{STEP_RECORDS_MAX, STEP_WAIT, TRANSACTION_CALL_ATTEMPTS_MAX, TRANSACTION_OP_TIMEOUT, WorkConfig};
use crate::error::{Result, WorkError, kafka};
use crate::metrics::Metrics;
use crate::purge::Purger;
use crate::restore::{input_record, restore};

/// One stage of a view this worker runs: what it consumes, where its changelog goes.
pub struct ViewSpec {
    pub view: View,
    /// The topic this stage consumes (the view's input, or its repartition topic).
    pub input: String,
    /// Where this stage's changelog records go (partition = the consumed partition).
    pub changelog: String,
    /// The changelog's partitions: the consumed topic's partition count when the worker
    /// started (validated then).
    pub changelog_partitions: i32,
    pub placement: Placement,
    /// The repartition topic a stage 1 forwards to.
    pub repartition: Option<String>,
}

/// One owned input partition.
struct Task {
    producer: ThreadedProducer<DefaultProducerContext>,
    /// (index into `Shared::views`, the fold of this partition).
    views: Vec<(usize, PartitionView)>,
    buffer: Vec<InputRecord>,
    failed: bool,
}

impl Task {
    /// Where the consumer starts: the least advanced view's position.
    fn start(&self) -> i64 {
        self.views.iter().map(|(_, v)| v.position()).min().unwrap_or(0)
    }
}

type PartitionKey = (String, i32);

/// What the group thread and the rebalance callback share.
pub struct Shared {
    pub config: WorkConfig,
    pub views: Vec<ViewSpec>,
    pub schemas: Arc<Schemas>,
    pub codec: Arc<dyn PayloadCodec>,
    pub metrics: Arc<Metrics>,
    /// "topic/partition" → restoring | live | failed: why (for /health).
    pub status: Mutex<BTreeMap<String, String>>,
    tasks: Mutex<BTreeMap<PartitionKey, Task>>,
    /// An error inside the rebalance callback, returned by the group loop.
    fatal: Mutex<Option<WorkError>>,
    purger: Purger,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(
        config: WorkConfig,
        views: Vec<ViewSpec>,
        schemas: Arc<Schemas>,
        codec: Arc<dyn PayloadCodec>,
        metrics: Arc<Metrics>,
        purger: Purger,
    ) -> Self {
        Self {
            config,
            views,
            schemas,
            codec,
            metrics,
            status: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(BTreeMap::new()),
            fatal: Mutex::new(None),
            purger,
        }
    }

    /// True when `topic` is a repartition topic this worker's stage 2 consumes.
    fn is_repartition_input(&self, topic: &str) -> bool {
        self.views.iter().any(|s| s.input == topic && matches!(s.placement, Placement::RepartitionSink { .. }))
    }

    fn set_status(&self, topic: &str, partition: i32, status: impl Into<String>) {
        lock(&self.status).insert(format!("{topic}/{partition}"), status.into());
    }

    /// Newly assigned partitions: fence, restore, and set each one's start offset in `tpl`.
    fn assign(&self, tpl: &mut TopicPartitionList) {
        let parts: Vec<PartitionKey> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        for (topic, partition) in parts {
            self.set_status(&topic, partition, "restoring");
            match self.open_task(&topic, partition) {
                Ok(task) => {
                    let start = task.start();
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, Offset::Offset(start)) {
                        self.fail(kafka("set the start offset")(e));
                    }
                    tracing::info!(topic, partition, start, "assigned: state restored, consuming");
                    self.set_status(&topic, partition, "live");
                    lock(&self.tasks).insert((topic, partition), task);
                    self.metrics.owned_partitions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.set_status(&topic, partition, format!("failed: {e}"));
                    self.fail(e);
                }
            }
        }
    }

    fn open_task(&self, topic: &str, partition: i32) -> Result<Task> {
        self.check_partition_has_changelog(topic, partition)?;
        let transactional_id = self.config.transactional_id(topic, partition);
        let producer: ThreadedProducer<DefaultProducerContext> =
            self.config.producer(&transactional_id).create().map_err(kafka("transactional producer"))?;
        // Fences the partition's previous owner and aborts its open transaction, so the
        // read_committed end of the changelog is final before the restore reads it.
        retrying("init_transactions", || producer.init_transactions(TRANSACTION_OP_TIMEOUT))
            .map_err(kafka(format!("init_transactions for '{transactional_id}'")))?;
        let mut views = Vec::new();
        for (index, spec) in self.views.iter().enumerate() {
            if spec.input != topic {
                continue;
            }
            let mut fold = PartitionView::with_placement(
                &spec.view,
                self.schemas.clone(),
                self.codec.clone(),
                topic,
                partition,
                spec.placement,
            )?;
            restore(&self.config, &spec.changelog, partition, &mut fold, &self.metrics)?;
            self.metrics.restores.fetch_add(1, Ordering::Relaxed);
            views.push((index, fold));
        }
        Ok(Task { producer, views, buffer: Vec::new(), failed: false })
    }

    /// A partition added to an input topic after the worker started has no changelog
    /// partition, and the keys of the old partitions now partly land in it: the view's
    /// partitioning no longer holds (as in Kafka Streams, the application must be reset).
    fn check_partition_has_changelog(&self, topic: &str, partition: i32) -> Result<()> {
        let outgrown = self.views.iter().find(|spec| spec.input == topic && partition >= spec.changelog_partitions);
        match outgrown {
            Some(spec) => Err(WorkError::InputGrew {
                topic: topic.to_owned(),
                partition,
                partitions: spec.changelog_partitions,
                changelog: spec.changelog.clone(),
            }),
            None => Ok(()),
        }
    }

    fn revoke(&self, tpl: &TopicPartitionList) {
        let mut tasks = lock(&self.tasks);
        for element in tpl.elements() {
            if let Some(task) = tasks.remove(&(element.topic().to_owned(), element.partition())) {
                self.metrics.owned_partitions.fetch_sub(1, Ordering::Relaxed);
                if task.failed {
                    self.metrics.failed_partitions.fetch_sub(1, Ordering::Relaxed);
                }
            }
            lock(&self.status).remove(&format!("{}/{}", element.topic(), element.partition()));
            tracing::info!(topic = element.topic(), partition = element.partition(), "revoked: released");
        }
    }

    fn fail(&self, error: WorkError) {
        tracing::error!(%error, "worker failing");
        lock(&self.fatal).get_or_insert(error);
    }
}

/// Routes librdkafka's rebalance callback to [`Shared`].
pub struct GroupContext(pub Arc<Shared>);

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.0.assign(tpl);
                if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.0.revoke(tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.assign(&TopicPartitionList::new())
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            self.0.fail(kafka("apply the assignment")(e));
        }
    }
}

/// Runs the group member until `stop` is set or an error stops the worker.
pub fn run_group(shared: Arc<Shared>, stop: &AtomicBool) -> Result<()> {
    let consumer: BaseConsumer<GroupContext> = shared
        .config
        .group_consumer()
        .create_with_context(GroupContext(shared.clone()))
        .map_err(kafka("group consumer"))?;
    let mut topics: Vec<&str> = shared.views.iter().map(|s| s.input.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    consumer.subscribe(&topics).map_err(kafka("subscribe"))?;
    tracing::info!(group = %shared.config.group, ?topics, "joined the consumer group");
    while !stop.load(Ordering::Acquire) {
        collect(&shared, &consumer);
        if let Some(error) = lock(&shared.fatal).take() {
            return Err(error);
        }
        let mut tasks = lock(&shared.tasks);
        // The partitions' steps run side by side: each is its own transaction with its own
        // producer, and a transaction mostly waits for the cluster (appends, markers), so a
        // worker owning n partitions no longer waits n transactions in a row.
        let ready: Vec<_> = tasks.iter_mut().filter(|(_, task)| !task.buffer.is_empty() && !task.failed).collect();
        let (shared, consumer) = (&*shared, &consumer);
        let results: Vec<Result<()>> = match ready.len() {
            0 => Vec::new(),
            1 => ready
                .into_iter()
                .map(|((topic, partition), task)| step(shared, consumer, topic, *partition, task))
                .collect(),
            _ => std::thread::scope(|scope| {
                let running: Vec<_> = ready
                    .into_iter()
                    .map(|((topic, partition), task)| {
                        scope.spawn(move || step(shared, consumer, topic, *partition, task))
                    })
                    .collect();
                running.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
            }),
        };
        results.into_iter().collect::<Result<()>>()?;
        shared.purger.maybe_purge(&shared.metrics);
    }
    tracing::info!("leaving the consumer group");
    consumer.unsubscribe();
    // Serve the revocation callback before the consumer closes.
    let _ = consumer.poll(Duration::from_millis(100));
    Ok(())
}

/// Polls records for up to `STEP_WAIT` (or `STEP_RECORDS_MAX` records) into the owned
/// partitions' buffers.
///
/// Once records have arrived it stops as soon as the consumer's queue is empty: a live event
/// does not wait out `STEP_WAIT` for company (while a rebuild's backlog keeps the queue full,
/// so its steps stay large).
fn collect(shared: &Shared, consumer: &BaseConsumer<GroupContext>) {
    let deadline = Instant::now() + STEP_WAIT;
    let mut count = 0;
    loop {
        let wait = if count > 0 { Duration::ZERO } else { deadline.saturating_duration_since(Instant::now()) };
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let key = (rdkafka::Message::topic(&message).to_owned(), rdkafka::Message::partition(&message));
                if let Some(task) = lock(&shared.tasks).get_mut(&key) {
                    task.buffer.push(input_record(&message));
                }
                count += 1;
                if count >= STEP_RECORDS_MAX {
                    return;
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer"),
            None if count > 0 => return,
            None => {}
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}

/// One step of one partition: fold every view, then one transaction.
fn step(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
    partition: i32,
    task: &mut Task,
) -> Result<()> {
    let records = std::mem::take(&mut task.buffer);
    let next = records.last().map_or(0, |r| r.offset + 1);
    let mut steps: Vec<(usize, Step)> = Vec::new();
    let mut error = None;
    for (slot, (_, fold)) in task.views.iter_mut().enumerate() {
        match fold.apply(&records) {
            Ok(Some(step)) => steps.push((slot, step)),
            Ok(None) => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    if let Some(error) = error {
        for (slot, _) in &steps {
            task.views[*slot].1.abort();
        }
        return stop_partition(shared, consumer, topic, partition, task, error);
    }
    if steps.is_empty() {
        return Ok(());
    }
    match transact(shared, consumer, topic, partition, task, &steps, next) {
        Ok(()) => {
            let mut applied = 0;
            for (slot, _) in &steps {
                let fold = &mut task.views[*slot].1;
                let before = fold.events_applied();
                fold.commit();
                applied += fold.events_applied() - before;
            }
            shared.metrics.transactions_committed.fetch_add(1, Ordering::Relaxed);
            shared.metrics.events_applied.fetch_add(applied as u64, Ordering::Relaxed);
            if shared.is_repartition_input(topic) {
                shared.purger.committed(topic, partition, next);
            }
            Ok(())
        }
        Err((op, e)) => match classify(&e) {
            Failure::Abort => {
                tracing::warn!(topic, partition, op, error = %e, "step transaction failed; aborting it and retrying from the last committed step");
                // -1: the transaction's remaining time (librdkafka's advice for aborts).
                retrying("abort_transaction", || task.producer.abort_transaction(Timeout::Never))
                    .map_err(|source| transaction_error(topic, partition, "abort_transaction", source))?;
                for (slot, _) in &steps {
                    task.views[*slot].1.abort();
                }
                shared.metrics.transactions_aborted.fetch_add(1, Ordering::Relaxed);
                consumer
                    .seek(topic, partition, Offset::Offset(task.start()), TRANSACTION_OP_TIMEOUT)
                    .map_err(kafka(format!("seek {topic}/{partition} back after an abort")))
            }
            Failure::Retry | Failure::Fenced | Failure::Fatal => Err(transaction_error(topic, partition, op, e)),
        },
    }
}

/// What a failed transactional call leaves to do (librdkafka's transactional API contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The call may be made again (a timeout: the operation goes on in the background).
    Retry,
    /// The transaction must be aborted; the producer stays usable.
    Abort,
    /// Another producer with this transactional id (the partition's new owner) took over.
    Fenced,
    /// The producer is unusable, or in a state nothing here can recover from.
    Fatal,
}

/// The librdkafka flags of a transactional error, as [`Failure`]. Errors that are not a
/// transaction's own (a failed send or flush inside the open transaction) are abortable.
fn classify(e: &KafkaError) -> Failure {
    match e {
        KafkaError::Transaction(rd) => {
            classify_flags(rd.code(), rd.is_fatal(), rd.is_retriable(), rd.txn_requires_abort())
        }
        _ => Failure::Abort,
    }
}

fn classify_flags(code: RDKafkaErrorCode, fatal: bool, retriable: bool, requires_abort: bool) -> Failure {
    let fencing = matches!(
        code,
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch
    );
    if fencing {
        Failure::Fenced
    } else if fatal {
        Failure::Fatal
    } else if retriable {
        Failure::Retry
    } else if requires_abort {
        Failure::Abort
    } else {
        // E.g. a state error: aborting could be one too (an abort while committing is).
        Failure::Fatal
    }
}

/// Makes `call` again while it fails retriably, at most `TRANSACTION_CALL_ATTEMPTS_MAX` times
/// in all (librdkafka: "call it again" continues the operation, not a new one).
fn retrying(op: &str, mut call: impl FnMut() -> KafkaResult<()>) -> KafkaResult<()> {
    let mut attempt = 1;
    loop {
        match call() {
            Err(e) if classify(&e) == Failure::Retry && attempt < TRANSACTION_CALL_ATTEMPTS_MAX => {
                tracing::warn!(op, attempt, error = %e, "transactional call did not complete; calling it again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A step's transaction that could be neither completed nor aborted, as the worker's error.
fn transaction_error(topic: &str, partition: i32, op: &'static str, source: KafkaError) -> WorkError {
    let topic = topic.to_owned();
    match classify(&source) {
        Failure::Fenced => WorkError::Fenced { topic, partition, source },
        Failure::Retry | Failure::Abort | Failure::Fatal => {
            WorkError::Transaction { topic, partition, op, source: Box::new(source) }
        }
    }
}

/// The transaction of one step: changelog records of every view, dead letters, the input
/// offset — committed together or not at all.
fn transact(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
    partition: i32,
    task: &Task,
    steps: &[(usize, Step)],
    next: i64,
) -> Result<(), (&'static str, KafkaError)> {
    let at = |op: &'static str| move |e: KafkaError| (op, e);
    task.producer.begin_transaction().map_err(at("begin_transaction"))?;
    for (slot, step) in steps {
        let spec = &shared.views[task.views[*slot].0];
        for record in &step.changelog {
            send(&task.producer, &spec.changelog, Some(partition), record).map_err(at("send"))?;
        }
        if let Some(repartition) = &spec.repartition {
            for (target, record) in &step.repartition {
                send(&task.producer, repartition, Some(*target), record).map_err(at("send"))?;
            }
        }
        for (dead_letter_topic, record) in &step.dead_letters {
            send(&task.producer, dead_letter_topic, None, record).map_err(at("send"))?;
        }
    }
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topic, partition, Offset::Offset(next)).map_err(at("send_offsets_to_transaction"))?;
    let metadata = consumer
        .group_metadata()
        .ok_or_else(|| KafkaError::Subscription("no consumer group metadata (not a group member)".to_owned()))
        .map_err(at("send_offsets_to_transaction"))?;
    retrying("send_offsets_to_transaction", || {
        task.producer.send_offsets_to_transaction(&offsets, &metadata, TRANSACTION_OP_TIMEOUT)
    })
    .map_err(at("send_offsets_to_transaction"))?;
    // -1: the transaction's remaining time; a retriable failure means the commit goes on in
    // the background and the same call must be made again — aborting now would be a state
    // error.
    retrying("commit_transaction", || task.producer.commit_transaction(Timeout::Never))
        .map_err(at("commit_transaction"))
}

/// Enqueues one record, waiting while the producer's queue is full.
fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: Option<i32>,
    record: &OutputRecord,
) -> KafkaResult<()> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header { key, value: value.as_ref() });
    }
    let mut base: BaseRecord<'_, [u8], [u8]> =
        BaseRecord::to(topic).key(&record.key[..]).timestamp(record.timestamp).headers(headers);
    if let Some(value) = &record.value {
        base = base.payload(&value[..]);
    }
    if let Some(partition) = partition {
        base = base.partition(partition);
    }
    loop {
        match producer.send(base) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                base = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// A view failed on this partition (its error policy is Stop, or it is not co-partitioned):
/// the partition stops here, visible in /health and the metrics; others go on.
fn stop_partition(
    shared: &Shared,
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
    partition: i32,
    task: &mut Task,
    error: kappa_views::ViewError,
) -> Result<()> {
    tracing::error!(topic, partition, %error, "a view failed: this partition stops until the worker restarts with a fixed view");
    task.failed = true;
    shared.metrics.failed_partitions.fetch_add(1, Ordering::Relaxed);
    shared.set_status(topic, partition, format!("failed: {error}"));
    let mut paused = TopicPartitionList::new();
    paused.add_partition(topic, partition);
    consumer.pause(&paused).map_err(kafka(format!("pause {topic}/{partition}")))
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::{Failure, classify, classify_flags};

    #[test]
    fn only_fencing_is_reported_as_fencing_and_timeouts_are_retried() {
        use RDKafkaErrorCode::*;
        // A commit that timed out goes on in the background: call it again, never abort.
        assert_eq!(classify_flags(OperationTimedOut, false, true, false), Failure::Retry);
        assert_eq!(classify_flags(OperationTimedOut, false, true, true), Failure::Retry);
        assert_eq!(classify_flags(InvalidTransactionalState, false, false, true), Failure::Abort);
        for fenced in [ProducerFenced, InvalidProducerEpoch, Fenced] {
            assert_eq!(classify_flags(fenced, true, false, false), Failure::Fenced);
        }
        // Fatal but not fenced (e.g. authorization), and a state error (an abort while the
        // commit is in progress): the worker stops, without blaming a new owner.
        assert_eq!(classify_flags(TransactionalIdAuthorizationFailed, true, false, false), Failure::Fatal);
        assert_eq!(classify_flags(State, false, false, false), Failure::Fatal);
        // A send or flush that failed inside the open transaction: abort it and go on.
        assert_eq!(classify(&KafkaError::MessageProduction(MessageSizeTooLarge)), Failure::Abort);
        assert_eq!(classify(&KafkaError::Flush(OperationTimedOut)), Failure::Abort);
    }
}
