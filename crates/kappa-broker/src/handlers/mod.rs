//! What each Kafka request does: the [`Broker`] handler, one file per group of APIs.
//!
//! kappa is a single-node cluster: node 0 leads every partition and coordinates every
//! group and transactional id. Requests reach the log and the coordinators through their
//! typed APIs; blocking log calls run on the blocking thread pool.

mod admin;
pub mod errors;
mod fetch;
mod groups;
mod metadata;
mod produce;
mod txn;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::{RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::StrBytes;
use kappa_coordinator::{GroupConfig, GroupCoordinator, OffsetStore, TxnConfig, TxnCoordinator};
use kappa_log::{Log, LogError};

use crate::server::{BoxFuture, Handler, Peer, Reply};

/// The node id kappa reports for itself.
pub const NODE_ID: i32 = 0;
/// Idle transactional ids are looked for once a minute (the housekeeping tick is 1 s).
const TXN_ID_EXPIRY_TICKS: u64 = 60;

/// Broker-level settings (topic-level ones live in the log's topic configs).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Host and port clients are told to connect to (Metadata, FindCoordinator).
    pub advertised_host: String,
    pub advertised_port: i32,
    pub cluster_id: String,
    /// Kafka: auto.create.topics.enable.
    pub auto_create_topics: bool,
    /// Kafka: num.partitions — partitions of an auto-created topic.
    pub default_partitions: i32,
    /// Longest a fetch may wait for data, whatever the client asks.
    pub fetch_wait_ms_max: u64,
    /// Largest fetch response, whatever the client asks (Kafka: fetch.max.bytes).
    pub fetch_response_bytes_max: usize,
    /// Requests that inflate compressed records, at once; more wait their turn. Produce
    /// requests with compressed batches (to check them the log inflates each, up to
    /// `BATCH_UNCOMPRESSED_BYTES_MAX`, 64 MiB, one batch at a time per request) or v0/v1
    /// message sets (converted first), and fetch v0-3 answers holding compressed batches
    /// (inflated to down-convert them, one batch at a time) share this one budget, so it
    /// bounds the memory being inflated at once: 8 × 64 MiB. (The name is older than the
    /// fetches; `--kafka-compressed-appends-max` sets it.)
    /// Kafka bounds the same work by its request handler threads (num.io.threads, 8).
    pub compressed_appends_max: usize,
    pub group: GroupConfig,
    pub txn: TxnConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            advertised_host: "127.0.0.1".to_owned(),
            advertised_port: 9092,
            cluster_id: "kappa-cluster".to_owned(),
            auto_create_topics: true,
            default_partitions: 1,
            fetch_wait_ms_max: 30_000,
            fetch_response_bytes_max: 55 * 1024 * 1024,
            compressed_appends_max: COMPRESSED_APPENDS_MAX_DEFAULT,
            group: GroupConfig::default(),
            txn: TxnConfig::default(),
        }
    }
}

/// [`BrokerConfig::compressed_appends_max`]'s default.
pub const COMPRESSED_APPENDS_MAX_DEFAULT: usize = 8;

/// The request handler behind `kappa serve`'s Kafka listener.
/// Counters the broker keeps for `/metrics` (monotonic since start).
#[derive(Debug, Default)]
pub struct BrokerStats {
    pub produce_requests: std::sync::atomic::AtomicU64,
    /// Record-batch bytes received in produce requests.
    pub produce_bytes: std::sync::atomic::AtomicU64,
    /// Partitions answered with an error in produce responses.
    pub produce_errors: std::sync::atomic::AtomicU64,
    /// Small produce requests begun on the connection's task whose next append would have
    /// waited (the partition lock held elsewhere, or a segment roll), so went on to a
    /// blocking thread.
    pub produce_inline_fallbacks: std::sync::atomic::AtomicU64,
    pub fetch_requests: std::sync::atomic::AtomicU64,
    /// Record bytes returned by fetches.
    pub fetch_bytes: std::sync::atomic::AtomicU64,
    /// Partitions answered with an error in fetch responses.
    pub fetch_errors: std::sync::atomic::AtomicU64,
}

pub struct Broker {
    stats: Arc<BrokerStats>,
    log: Arc<Log>,
    config: BrokerConfig,
    groups: GroupCoordinator,
    offsets: Arc<OffsetStore>,
    txns: Arc<TxnCoordinator>,
    /// Transactional id -> the newest connection that sent a request for it (see txn.rs).
    txn_connections: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Ids in `txn_connections` the coordinator did not know at the last expiry pass.
    txn_ids_unknown: std::sync::Mutex<HashSet<String>>,
    /// One permit per request inflating compressed records: a produce being appended or a
    /// legacy fetch answer being down-converted (`compressed_appends_max`).
    inflating: Arc<tokio::sync::Semaphore>,
}

impl Broker {
    /// Opens the coordinators on the log (restoring committed offsets and transaction
    /// state) and starts their background work: session expiry and transaction timeouts.
    pub async fn open(log: Arc<Log>, config: BrokerConfig) -> Result<Arc<Self>, LogError> {
        let offsets = {
            let log = log.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || OffsetStore::open(&log))
                    .await
                    .map_err(|e| LogError::InvalidRecords(e.to_string()))??,
            )
        };
        let txns = TxnCoordinator::open(log.clone(), offsets.clone(), config.txn.clone()).await?;
        let groups = GroupCoordinator::new(config.group.clone());
        groups.spawn_session_reaper(Duration::from_millis(500));
        let inflating = Arc::new(tokio::sync::Semaphore::new(
            config.compressed_appends_max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let broker = Arc::new(Self {
            stats: Arc::default(),
            log,
            config,
            groups,
            offsets,
            txns,
            txn_connections: Default::default(),
            txn_ids_unknown: Default::default(),
            inflating,
        });
        let weak = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            for tick in 0u64.. {
                ticker.tick().await;
                let Some(broker) = weak.upgrade() else { return };
                broker.txns.abort_expired().await;
                if tick % TXN_ID_EXPIRY_TICKS == 0 {
                    broker.expire_transactional_ids(true).await;
                } else if broker.txns.over_ids_max() {
                    broker.expire_transactional_ids(false).await;
                }
            }
        });
        Ok(broker)
    }

    /// Forgets idle transactional ids (Kafka's `transactional.id.expiration.ms`, and
    /// `transactional_ids_max`) with their newest-connection records and, with
    /// `prune_unknown` (the regular passes, a minute apart), the records of ids the
    /// coordinator did not know at two passes in a row (InitProducerId refused, or not
    /// finished, at the first) — so neither map grows with every id a client ever used.
    async fn expire_transactional_ids(&self, prune_unknown: bool) {
        let expired = self.txns.expire_transactional_ids().await;
        let mut connections = self.txn_connections.lock().unwrap_or_else(|e| e.into_inner());
        for id in &expired {
            connections.remove(id);
        }
        if !prune_unknown {
            return;
        }
        let unknown: HashSet<String> = connections.keys().filter(|id| !self.txns.knows(id)).cloned().collect();
        let mut unknown_before = self.txn_ids_unknown.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|id, _| !(unknown.contains(id) && unknown_before.contains(id)));
        *unknown_before = unknown.into_iter().filter(|id| connections.contains_key(id)).collect();
    }

    /// Waits for a turn to inflate compressed records (`compressed_appends_max`); the turn
    /// is kept until the returned permit is dropped, on whatever thread does the inflating.
    async fn inflating_turn(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.inflating.clone().acquire_owned().await.expect("the semaphore is never closed")
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The transaction coordinator (HTTP produce writes multi-partition requests through it).
    pub fn transactions(&self) -> Arc<TxnCoordinator> {
        self.txns.clone()
    }

    pub fn stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }

    /// Group membership, for administration outside the wire protocol (the HTTP API).
    pub fn groups(&self) -> &GroupCoordinator {
        &self.groups
    }

    /// Committed offsets, for administration outside the wire protocol (the HTTP API).
    pub fn offsets(&self) -> &Arc<OffsetStore> {
        &self.offsets
    }

    /// Every committed offset: (group, topic, partition, offset).
    pub fn committed_offsets(&self) -> Vec<(String, String, i32, i64)> {
        let mut out = Vec::new();
        for group in self.offsets.groups() {
            for (tp, committed) in self.offsets.fetch(&group, None) {
                if let Some(committed) = committed {
                    out.push((group.clone(), tp.0, tp.1, committed.offset));
                }
            }
        }
        out
    }

    fn count_produce(&self, request: &kafka_protocol::messages::ProduceRequest) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.produce_requests.fetch_add(1, Relaxed);
        let bytes: usize = request
            .topic_data
            .iter()
            .flat_map(|t| t.partition_data.iter())
            .map(|p| p.records.as_ref().map_or(0, |r| r.len()))
            .sum();
        self.stats.produce_bytes.fetch_add(bytes as u64, Relaxed);
    }

    fn count_produce_response(&self, response: &kafka_protocol::messages::ProduceResponse) {
        let errors =
            response.responses.iter().flat_map(|t| t.partition_responses.iter()).filter(|p| p.error_code != 0).count();
        self.stats.produce_errors.fetch_add(errors as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn count_fetch(&self, response: &kafka_protocol::messages::FetchResponse) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.fetch_requests.fetch_add(1, Relaxed);
        let partitions = response.responses.iter().flat_map(|t| t.partitions.iter());
        let (bytes, errors) = partitions.fold((0usize, 0u64), |(bytes, errors), p| {
            (bytes + p.records.as_ref().map_or(0, |r| r.len()), errors + u64::from(p.error_code != 0))
        });
        self.stats.fetch_bytes.fetch_add(bytes as u64, Relaxed);
        self.stats.fetch_errors.fetch_add(errors, Relaxed);
    }

    async fn dispatch(&self, request: RequestKind, header: &RequestHeader, peer: &Peer) -> ResponseKind {
        let version = header.request_api_version;
        let client_id = header.client_id.as_ref().map(|c| c.as_str().to_owned()).unwrap_or_default();
        use RequestKind as Q;
        use ResponseKind as R;
        match request {
            Q::Metadata(r) => R::Metadata(self.metadata(r, version).await),
            Q::Produce(r) => {
                self.count_produce(&r);
                let response = self.produce(r, version).await;
                self.count_produce_response(&response);
                R::Produce(response)
            }
            Q::Fetch(r) => {
                let response = self.fetch(r, version).await;
                self.count_fetch(&response);
                R::Fetch(response)
            }
            Q::ListOffsets(r) => R::ListOffsets(self.list_offsets(r, version).await),
            Q::CreateTopics(r) => R::CreateTopics(self.create_topics(r, version).await),
            Q::DeleteTopics(r) => R::DeleteTopics(self.delete_topics(r).await),
            Q::CreatePartitions(r) => R::CreatePartitions(self.create_partitions(r).await),
            Q::DeleteRecords(r) => R::DeleteRecords(self.delete_records(r).await),
            Q::DescribeConfigs(r) => R::DescribeConfigs(self.describe_configs(r)),
            Q::AlterConfigs(r) => R::AlterConfigs(self.alter_configs(r).await),
            Q::IncrementalAlterConfigs(r) => R::IncrementalAlterConfigs(self.incremental_alter_configs(r).await),
            Q::FindCoordinator(r) => R::FindCoordinator(self.find_coordinator(r, version)),
            Q::JoinGroup(r) => R::JoinGroup(self.join_group(r, version, client_id, peer).await),
            Q::SyncGroup(r) => R::SyncGroup(self.sync_group(r).await),
            Q::Heartbeat(r) => R::Heartbeat(self.heartbeat(r)),
            Q::LeaveGroup(r) => R::LeaveGroup(self.leave_group(r, version)),
            Q::OffsetCommit(r) => R::OffsetCommit(self.offset_commit(r).await),
            Q::OffsetFetch(r) => R::OffsetFetch(self.offset_fetch(r, version)),
            Q::ListGroups(r) => R::ListGroups(self.list_groups(r)),
            Q::DescribeGroups(r) => R::DescribeGroups(self.describe_groups(r)),
            Q::DeleteGroups(r) => R::DeleteGroups(self.delete_groups(r).await),
            Q::OffsetDelete(r) => R::OffsetDelete(self.offset_delete(r).await),
            Q::InitProducerId(r) => R::InitProducerId(self.init_producer_id(r, peer).await),
            Q::AddPartitionsToTxn(r) => R::AddPartitionsToTxn(self.add_partitions_to_txn(r, peer).await),
            Q::AddOffsetsToTxn(r) => R::AddOffsetsToTxn(self.add_offsets_to_txn(r, peer).await),
            Q::TxnOffsetCommit(r) => R::TxnOffsetCommit(self.txn_offset_commit(r).await),
            Q::EndTxn(r) => R::EndTxn(self.end_txn(r, peer).await),
            other => {
                unreachable!("the API table admits only implemented requests, got {:?}", std::mem::discriminant(&other))
            }
        }
    }
}

impl Handler for Broker {
    fn handle<'a>(
        &'a self,
        request: RequestKind,
        header: &'a RequestHeader,
        peer: &'a Peer,
    ) -> BoxFuture<'a, ResponseKind> {
        Box::pin(self.dispatch(request, header, peer))
    }

    /// Produce is the one request with a slow second half (the fsync): appends happen in
    /// request order, and the connection moves on while the durability wait completes.
    fn handle_ordered<'a>(
        &'a self,
        request: RequestKind,
        header: &'a RequestHeader,
        peer: &'a Peer,
    ) -> BoxFuture<'a, Reply> {
        Box::pin(async move {
            match request {
                RequestKind::Produce(produce) => {
                    self.count_produce(&produce);
                    let durable = self.produce_in_order(produce, header.request_api_version).await;
                    let stats = self.stats.clone();
                    Reply::Pending(Box::pin(async move {
                        let response = durable.await;
                        let errors = response
                            .responses
                            .iter()
                            .flat_map(|t| t.partition_responses.iter())
                            .filter(|p| p.error_code != 0)
                            .count();
                        stats.produce_errors.fetch_add(errors as u64, std::sync::atomic::Ordering::Relaxed);
                        ResponseKind::Produce(response)
                    }))
                }
                other => Reply::Ready(self.dispatch(other, header, peer).await),
            }
        })
    }
}

pub(crate) fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// Runs a blocking log operation on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking log task panicked")
}

/// A response's per-topic entries, found by name through an index: answers list each topic
/// once, and a scan per partition would make a request naming many topics quadratic.
pub(crate) struct ByTopic<T> {
    index: std::collections::HashMap<String, usize>,
    topics: Vec<T>,
}

impl<T> ByTopic<T> {
    pub(crate) fn new() -> Self {
        Self { index: std::collections::HashMap::new(), topics: Vec::new() }
    }

    /// `name`'s entry, made by `new` the first time.
    pub(crate) fn entry(&mut self, name: &str, new: impl FnOnce() -> T) -> &mut T {
        let at = match self.index.get(name) {
            Some(&at) => at,
            None => {
                self.topics.push(new());
                self.index.insert(name.to_owned(), self.topics.len() - 1);
                self.topics.len() - 1
            }
        };
        &mut self.topics[at]
    }

    /// The entries in the order their topics first appeared.
    pub(crate) fn into_vec(self) -> Vec<T> {
        self.topics
    }
}
