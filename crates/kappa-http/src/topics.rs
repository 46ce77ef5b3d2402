//! `/v1/topics`: list, create, describe, and HTTP produce with optimistic concurrency.
//!
//! Records without a partition go where Kafka's default partitioner puts them
//! (`toPositive(murmur2(key)) % partitions`), so HTTP and Kafka producers agree.
//!
//! `expected_offset` is checked against a key → latest offset index per partition. The
//! index is derived from the log (built by reading the partition on first use, then kept
//! up to date by reading what was appended since), so it is as durable as the log itself,
//! and it is bounded (`KEY_INDEX_BYTES_MAX`). A request's check and its append are atomic
//! against every other writer, Kafka producers included: the batch is appended only if the
//! partition still ends where the index ends (`Partition::append_if_end`), else the index
//! catches up and the check runs again.
//!
//! A request whose records go to several partitions, or to one partition but more than fit
//! in one batch (the topic's `max.message.bytes`), is written as one Kafka transaction
//! (txn_produce.rs): read_committed readers see all of it or none of it, even if the
//! server dies between two appends.
//!
//! A guarded write waits for its partition's key index; an unguarded one only takes it when
//! it is free (to extend it), so it never queues behind a guarded write that is waiting for
//! an open transaction to end (at most `OPEN_TRANSACTION_WAIT_MS_MAX`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kappa_log::LogError;
use kappa_log::batch::HEADER_BYTES;
use kappa_log::records::{BatchBuilder, NewRecord};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// Records in one produce request.
pub const PRODUCE_RECORDS_MAX: usize = 10_000;
/// Memory one partition's key index may use (keys plus 8-byte offsets).
pub const KEY_INDEX_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How often a conditional append retries when other writers keep getting in first.
const CONDITIONAL_APPEND_ATTEMPTS: usize = 20;
/// How long a guarded write waits for a transaction open on its partition to end (the
/// key index can only be brought up to date past committed records) before answering 503.
pub const OPEN_TRANSACTION_WAIT_MS_MAX: u64 = 5_000;
const INDEX_READ_BYTES: usize = 1024 * 1024;

pub use kappa_log::partitioner::{default_partition, murmur2};

/// Produce-side state: per-partition key indexes and the round-robin counter for keyless
/// records.
pub struct ProduceState {
    indexes: Mutex<HashMap<(String, i32), SharedKeyIndex>>,
    round_robin: AtomicU32,
    /// [`KEY_INDEX_BYTES_MAX`], lowered by tests.
    key_index_bytes_max: AtomicUsize,
}

impl Default for ProduceState {
    fn default() -> Self {
        Self {
            indexes: Mutex::default(),
            round_robin: AtomicU32::default(),
            key_index_bytes_max: AtomicUsize::new(KEY_INDEX_BYTES_MAX),
        }
    }
}

type SharedKeyIndex = Arc<tokio::sync::Mutex<KeyIndex>>;

/// Latest offset per key of one partition, for every record below `next`.
#[derive(Default)]
struct KeyIndex {
    next: i64,
    latest: HashMap<Vec<u8>, i64>,
    bytes: usize,
}

impl ProduceState {
    /// Lowers the key index limit, for tests (it is [`KEY_INDEX_BYTES_MAX`], not a setting).
    #[doc(hidden)]
    pub fn set_key_index_bytes_max(&self, bytes: usize) {
        self.key_index_bytes_max.store(bytes, Ordering::Relaxed);
    }

    fn key_index_bytes_max(&self) -> usize {
        self.key_index_bytes_max.load(Ordering::Relaxed)
    }

    fn index(&self, topic: &str, partition: i32) -> SharedKeyIndex {
        let mut indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        indexes.entry((topic.to_owned(), partition)).or_default().clone()
    }

    /// Forgets a deleted topic's indexes.
    pub fn forget(&self, topic: &str) {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).retain(|(t, _), _| t != topic);
    }
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let topics: Vec<Value> = state
        .log
        .topics()
        .iter()
        .map(|t| json!({"name": t.name(), "partitions": t.partition_count(), "internal": t.name().starts_with("__")}))
        .collect();
    Json(json!({"topics": topics}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopic {
    name: String,
    #[serde(default = "one")]
    partitions: i32,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// A JSON body, or the error that says which shape was expected (413 when too large).
pub(crate) fn body<T>(body: Result<Json<T>, JsonRejection>, shape: &str) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| match e {
        JsonRejection::BytesRejection(e) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{e}; raise --http-request-body-bytes-max (setting http_request_body_bytes_max) or send less"),
        ),
        e => ApiError::bad_request("invalid_body", format!("expected {shape}: {e}")),
    })
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    request: Result<Json<CreateTopic>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = body(request, "{\"name\", \"partitions\"?, \"configs\"?: {\"key\": \"value\"}}")?;
    if request.name.starts_with("__") {
        return Err(ApiError::bad_request(
            "invalid_topic_name",
            "names starting with '__' are reserved for kappa's internal topics",
        ));
    }
    let log = state.log.clone();
    let topic =
        tokio::task::spawn_blocking(move || log.create_topic(&request.name, request.partitions, &request.configs))
            .await
            .map_err(internal)??;
    Ok((StatusCode::CREATED, Json(topic_json(&topic))))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

fn topic_json(topic: &kappa_log::Topic) -> Value {
    let compacted = topic.config().cleanup_policy.compact;
    let partitions: Vec<Value> = topic
        .partitions()
        .iter()
        .map(|p| {
            let mut partition = json!({
                "partition": p.index(),
                "start_offset": p.log_start_offset(),
                "end_offset": p.log_end_offset(),
                "high_watermark": p.high_watermark(),
                "last_stable_offset": p.last_stable_offset(),
                "size_bytes": p.size_bytes(),
                "segments": p.segment_count(),
            });
            if compacted {
                partition["compaction"] = compaction_json(&p.compaction_status());
            }
            partition
        })
        .collect();
    let configs: BTreeMap<&str, String> = topic.config().entries().into_iter().map(|(k, v, _)| (k, v)).collect();
    json!({"name": topic.name(), "partitions": partitions, "configs": configs})
}

/// The cleaner's state of a compacted partition: how dirty it is and what the last pass did.
fn compaction_json(status: &kappa_log::compaction::CompactionStatus) -> Value {
    json!({
        // Null until the cleaner has run on this partition.
        "cleaned_up_to": (status.cleaned_up_to >= 0).then_some(status.cleaned_up_to),
        "dirty_bytes": status.dirty_bytes,
        "cleanable_bytes": status.cleanable_bytes,
        "dirty_ratio": status.dirty_ratio,
        "last_pass": status.last.map(|last| json!({
            "segments_cleaned": last.segments_cleaned,
            "bytes_before": last.bytes_before,
            "bytes_after": last.bytes_after,
            "records_removed": last.records_removed,
            "tombstones_removed": last.tombstones_removed,
        })),
    })
}

pub async fn describe(State(state): State<Arc<AppState>>, Path(topic): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(topic_json(&*state.log.topic(&topic)?)))
}

fn refuse_internal(topic: &str) -> Result<(), ApiError> {
    if topic.starts_with("__") {
        return Err(ApiError::bad_request(
            "internal_topic",
            format!("{topic} is one of kappa's internal topics; it is managed by kappa, not over the API"),
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlterConfigs {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    delete: Vec<String>,
}

/// `POST /v1/topics/{topic}/configs` `{"set": {key: value}, "delete": [key]}`: Kafka's
/// IncrementalAlterConfigs, validated by the log as a whole (nothing changes on error).
pub async fn alter_configs(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    request: Result<Json<AlterConfigs>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, "{\"set\"?: {\"key\": \"value\"}, \"delete\"?: [\"key\"]}")?;
    let mut changes: BTreeMap<String, Option<String>> =
        request.set.into_iter().map(|(key, value)| (key, Some(value))).collect();
    for key in request.delete {
        if changes.insert(key.clone(), None).is_some() {
            return Err(ApiError::bad_request("invalid_body", format!("config '{key}' is both set and deleted")));
        }
    }
    admin_op(&state, &topic, move |log, name| log.alter_topic_config(name, &changes)).await?;
    Ok(Json(topic_json(&*state.log.topic(&topic)?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPartitions {
    count: i32,
}

/// `POST /v1/topics/{topic}/partitions` `{"count": N}`: grows the topic to N partitions
/// (Kafka's CreatePartitions; never shrinks).
pub async fn add_partitions(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    request: Result<Json<AddPartitions>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, "{\"count\": <total partitions>}")?;
    admin_op(&state, &topic, move |log, name| log.add_partitions(name, request.count)).await?;
    Ok(Json(topic_json(&*state.log.topic(&topic)?)))
}

/// Partitions one `delete-records` request may name (a topic has at most
/// `kappa_log::log::PARTITIONS_MAX`).
const DELETE_RECORDS_PARTITIONS_MAX: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRecords {
    partitions: Vec<DeleteBefore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBefore {
    partition: i32,
    /// Records before this offset go; -1: every record (up to the high watermark).
    before: i64,
}

/// `POST /v1/topics/{topic}/delete-records` `{"partitions":[{"partition":0,"before":100}]}`:
/// Kafka's DeleteRecords. Each partition's start offset moves to `before` (-1: its high
/// watermark) durably; reads below it then fail. Every partition and offset is checked
/// before any is changed; answers with the topic as `GET` describes it.
pub async fn delete_records(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    request: Result<Json<DeleteRecords>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, "{\"partitions\": [{\"partition\": <n>, \"before\": <offset, or -1 for all>}]}")?;
    if request.partitions.is_empty() || request.partitions.len() > DELETE_RECORDS_PARTITIONS_MAX {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("name between 1 and {DELETE_RECORDS_PARTITIONS_MAX} partitions"),
        ));
    }
    refuse_internal(&topic)?;
    let log_topic = state.log.topic(&topic)?;
    let mut targets = Vec::with_capacity(request.partitions.len());
    for DeleteBefore { partition, before } in request.partitions {
        let p = state.log.partition(&topic, partition)?;
        if before < -1 || before > p.high_watermark() {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "offset_out_of_range",
                format!(
                    "partition {partition} holds offsets {}..{}: give an offset up to its high watermark, or -1 for all",
                    p.log_start_offset(),
                    p.high_watermark()
                ),
            ));
        }
        targets.push((p, before));
    }
    tokio::task::spawn_blocking(move || targets.iter().try_for_each(|(p, before)| p.delete_records(*before).map(drop)))
        .await
        .map_err(internal)??;
    Ok(Json(topic_json(&log_topic)))
}

/// `DELETE /v1/topics/{topic}`: deletes the topic and all its records.
pub async fn delete(State(state): State<Arc<AppState>>, Path(topic): Path<String>) -> Result<StatusCode, ApiError> {
    admin_op(&state, &topic, |log, name| log.delete_topic(name)).await?;
    state.produce.forget(&topic);
    Ok(StatusCode::NO_CONTENT)
}

/// Runs an administrative change of a topic (not an internal one) on the blocking pool.
async fn admin_op(
    state: &AppState,
    topic: &str,
    op: impl FnOnce(&kappa_log::Log, &str) -> Result<(), LogError> + Send + 'static,
) -> Result<(), ApiError> {
    refuse_internal(topic)?;
    let (log, name) = (state.log.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || op(&log, &name)).await.map_err(internal)??;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProduceRequest {
    records: Vec<ProduceRecord>,
    /// Store a JSON string value as its text (`"hi"` → `hi`) instead of as JSON (`"hi"`);
    /// other values are stored as their JSON text either way. The CLI sends lines this way.
    #[serde(default)]
    text_values: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProduceRecord {
    key: Option<String>,
    /// Any JSON; stored as its JSON text. Required: `null` is a tombstone, and a record
    /// without `value` is refused (`None` here), not taken for one — on a compacted topic
    /// a tombstone deletes the key.
    #[serde(default, deserialize_with = "present")]
    value: Option<Box<RawValue>>,
    #[serde(default)]
    headers: BTreeMap<String, Option<String>>,
    partition: Option<i32>,
    expected_offset: Option<i64>,
}

/// A field that is present, `null` included (`Some` of the JSON text `null`): serde reads
/// an `Option` field's `null` as `None`, like a missing field. (`kappa produce` reads its
/// records' `value` with it too.)
pub fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

/// A topic's partitions for people: "1 partition (0)", "4 partitions (0 to 3)".
pub fn partitions_phrase(count: i32) -> String {
    match count {
        1 => "1 partition (0)".to_owned(),
        n if n > 1 => format!("{n} partitions (0 to {})", n - 1),
        _ => "no partitions".to_owned(),
    }
}

/// One partition's part of a request.
struct PartitionWrite {
    partition: i32,
    /// (index in the request, record)
    records: Vec<(usize, ProduceRecord)>,
    /// The records, in order, as batches that each fit the topic's `max.message.bytes`
    /// (producer fields unset).
    batches: Vec<BatchBuilder>,
}

impl PartitionWrite {
    /// Whether any record carries an `expected_offset` to check.
    fn guarded(&self) -> bool {
        self.records.iter().any(|(_, r)| r.expected_offset.is_some())
    }
}

pub async fn produce(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    request: Result<Json<ProduceRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(
        request,
        "{\"records\": [{\"key\", \"value\", \"headers\"?, \"partition\"?, \"expected_offset\"?}], \"text_values\"?}",
    )?;
    refuse_internal(&topic)?;
    let n = request.records.len();
    if n == 0 || n > PRODUCE_RECORDS_MAX {
        return Err(ApiError::bad_request(
            "invalid_records",
            format!("send 1 to {PRODUCE_RECORDS_MAX} records per request"),
        ));
    }
    let log_topic = state.log.topic(&topic)?;
    let partition_count = log_topic.partition_count();
    let max_message_bytes = log_topic.config().max_message_bytes;
    let mut by_partition: BTreeMap<i32, PartitionWrite> = BTreeMap::new();
    let mut guarded_keys = std::collections::HashSet::new();
    for (index, record) in request.records.into_iter().enumerate() {
        if record.value.is_none() {
            return Err(ApiError::bad_request(
                "invalid_records",
                format!(
                    "record {index} has no \"value\"; nothing was written. Send \"value\": null for a tombstone (it deletes the key), else the value to write"
                ),
            ));
        }
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if (0..partition_count).contains(&p) => p,
            (Some(p), _) => {
                // As any other request naming a partition the topic lacks: 404.
                let has = partitions_phrase(partition_count);
                return Err(ApiError::not_found(
                    "unknown_partition",
                    format!("record {index}: topic {topic} has no partition {p}; it has {has}. Nothing was written"),
                ));
            }
            (None, Some(key)) => default_partition(key.as_bytes(), partition_count),
            (None, None) => (state.produce.round_robin.fetch_add(1, Ordering::Relaxed) % partition_count as u32) as i32,
        };
        if let Some(expected) = record.expected_offset {
            let Some(key) = &record.key else {
                return Err(ApiError::bad_request(
                    "invalid_records",
                    format!("record {index}: expected_offset needs a key"),
                ));
            };
            if expected < -1 {
                return Err(ApiError::bad_request(
                    "invalid_records",
                    format!("record {index}: expected_offset is an offset or -1 (no record with this key yet)"),
                ));
            }
            if !guarded_keys.insert((partition, key.clone())) {
                return Err(ApiError::bad_request(
                    "invalid_records",
                    format!("record {index}: a request may give expected_offset for key '{key}' only once"),
                ));
            }
        }
        by_partition
            .entry(partition)
            .or_insert_with(|| PartitionWrite { partition, records: Vec::new(), batches: Vec::new() })
            .records
            .push((index, record));
    }
    let now = now_ms();
    for write in by_partition.values_mut() {
        write.batches = build_batches(&topic, &write.records, now, request.text_values, max_message_bytes)?;
    }
    // Finish the write even if the client goes away: a request abandoned between two
    // partitions' appends would otherwise leave its transaction to the timeout.
    let task = tokio::spawn(write(state.clone(), topic, by_partition, n));
    let offsets = task.await.map_err(internal)??;
    state.metrics.records_produced.fetch_add(n as u64, Ordering::Relaxed);
    Ok(Json(json!({"offsets": offsets})))
}

/// Checks every condition, then appends: one partition's single batch directly, anything
/// more (several partitions, or several batches) as one transaction (see txn_produce.rs).
/// Returns each record's partition and offset, in request order.
async fn write(
    state: Arc<AppState>,
    topic: String,
    by_partition: BTreeMap<i32, PartitionWrite>,
    n: usize,
) -> Result<Vec<Value>, ApiError> {
    // Lock the guarded partitions' key indexes in order, so requests never deadlock. An
    // unguarded write takes its index only if it is free (never waiting, so never part of
    // a deadlock), to extend it afterwards; otherwise the next catch-up reads its records.
    let mut guards = Vec::new();
    for write in by_partition.values() {
        let index = state.produce.index(&topic, write.partition);
        guards.push(if write.guarded() { Some(index.lock_owned().await) } else { index.try_lock_owned().ok() });
    }
    let writes: Vec<&PartitionWrite> = by_partition.values().collect();
    for (write, guard) in writes.iter().zip(guards.iter_mut()) {
        if let (true, Some(guard)) = (write.guarded(), guard) {
            catch_up(&state, &topic, write.partition, guard).await?;
            check(&topic, write, guard)?;
        }
    }
    // Per partition, each batch's base offset.
    let mut bases: Vec<Vec<i64>> = Vec::with_capacity(writes.len());
    if let [write] = writes[..]
        && let [batch] = &write.batches[..]
    {
        bases.push(vec![append(&state, &topic, batch.build(), write, guards[0].as_deref_mut(), None).await?]);
    } else {
        let producers = state.transactions.as_ref().ok_or_else(|| {
            ApiError::bad_request(
                "multi_partition_unavailable",
                "this server cannot write one request to several partitions, or more records than fit in one batch (the topic's max.message.bytes), atomically; send one request per partition, each within max.message.bytes",
            )
        })?;
        let partitions: Vec<i32> = by_partition.keys().copied().collect();
        let mut txn = producers.begin(&topic, &partitions).await.map_err(transaction_failed)?;
        for (write, guard) in writes.iter().zip(guards.iter_mut()) {
            let mut partition_bases: Vec<i64> = Vec::with_capacity(write.batches.len());
            for batch in &write.batches {
                let bytes = txn.stamp(&topic, write.partition, batch.clone()).build();
                // A guarded partition's later batches must follow the one before directly.
                let follows =
                    partition_bases.last().map(|base| base + write.batches[partition_bases.len() - 1].len() as i64);
                match append(&state, &topic, bytes, write, guard.as_deref_mut(), follows).await {
                    Ok(base) => {
                        txn.appended(&topic, write.partition, batch.len());
                        partition_bases.push(base);
                    }
                    Err(e) => {
                        txn.abort().await;
                        return Err(e);
                    }
                }
            }
            bases.push(partition_bases);
        }
        txn.commit().await.map_err(transaction_failed)?;
    }
    let mut offsets = vec![json!(null); n];
    let bytes_max = state.produce.key_index_bytes_max();
    for ((write, guard), bases) in writes.iter().zip(guards.iter_mut()).zip(bases) {
        let mut records = write.records.iter();
        for (batch, base) in write.batches.iter().zip(bases) {
            // The index covers everything below `next`: extend it when this batch follows
            // on directly (always so for a guarded append); otherwise a later catch-up
            // reads it.
            let mut extend = guard.as_deref_mut().filter(|index| index.next == base);
            let mut full = false;
            for (i, (index, record)) in records.by_ref().take(batch.len()).enumerate() {
                let offset = base + i as i64;
                offsets[*index] = json!({"partition": write.partition, "offset": offset});
                if let (Some(key_index), Some(key), false) = (extend.as_deref_mut(), &record.key, full) {
                    full = !remember(key_index, key.as_bytes(), offset, bytes_max);
                }
            }
            match extend {
                // Over the limit: drop the index; the next guarded write rebuilds it and is
                // refused with key_index_full.
                Some(key_index) if full => *key_index = KeyIndex::default(),
                Some(key_index) => key_index.next = base + batch.len() as i64,
                None => {}
            }
        }
    }
    Ok(offsets)
}

fn transaction_failed(e: kappa_coordinator::TxnError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "transaction_failed",
        format!("the records could not be written atomically ({e}); nothing was committed, retry"),
    )
}

/// Bytes a record can take in a batch at most: its fields plus the largest varints.
fn record_bytes_max(record: &NewRecord) -> usize {
    const VARINT_MAX: usize = 5;
    const VARLONG_MAX: usize = 10;
    let field = |bytes: Option<&[u8]>| VARINT_MAX + bytes.map_or(0, <[u8]>::len);
    VARINT_MAX // length
        + 1 // attributes
        + VARLONG_MAX // timestamp delta
        + VARINT_MAX // offset delta
        + field(record.key.as_deref())
        + field(record.value.as_deref())
        + VARINT_MAX // header count
        + record.headers.iter().map(|(name, value)| field(Some(name.as_bytes())) + field(value.as_deref())).sum::<usize>()
}

/// One partition's records as batches, in order, each at most `max_message_bytes` (the
/// topic's `max.message.bytes`); a record too large for a batch of its own is refused.
fn build_batches(
    topic: &str,
    records: &[(usize, ProduceRecord)],
    now: i64,
    text_values: bool,
    max_message_bytes: usize,
) -> Result<Vec<BatchBuilder>, ApiError> {
    let mut batches = Vec::new();
    let mut builder = BatchBuilder::new();
    let mut builder_bytes = HEADER_BYTES;
    for (index, record) in records {
        let json = record.value.as_ref().map(|v| v.get()).filter(|v| *v != "null");
        let value = match json {
            Some(text) if text_values && text.starts_with('"') => Some(
                serde_json::from_str::<String>(text)
                    .map_err(|e| ApiError::bad_request("invalid_records", format!("record {index}: value: {e}")))?,
            ),
            other => other.map(str::to_owned),
        };
        let mut new =
            NewRecord::new(record.key.as_deref().map(str::as_bytes), value.as_deref().map(str::as_bytes), now);
        for (name, value) in &record.headers {
            new = new.header(name, value.as_deref().map(str::as_bytes));
        }
        let bytes = record_bytes_max(&new);
        if HEADER_BYTES + bytes > max_message_bytes {
            // The bound is loose by a few bytes: measure the record alone in a batch.
            let alone = BatchBuilder::new().record(new.clone()).build().len();
            if alone > max_message_bytes {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "records_too_large",
                    format!(
                        "record {index} takes {alone} bytes as a batch of its own, over topic {topic}'s max.message.bytes of {max_message_bytes}; nothing was written. Send a smaller record, or raise the topic's max.message.bytes"
                    ),
                ));
            }
        }
        if !builder.is_empty() && builder_bytes + bytes > max_message_bytes {
            batches.push(std::mem::take(&mut builder));
            builder_bytes = HEADER_BYTES;
        }
        builder.push(new);
        builder_bytes += bytes;
    }
    if !builder.is_empty() {
        batches.push(builder);
    }
    Ok(batches)
}

/// The current offset of each guarded key must be what the request expects.
fn check(topic: &str, write: &PartitionWrite, index: &KeyIndex) -> Result<(), ApiError> {
    for (i, record) in &write.records {
        let (Some(expected), Some(key)) = (record.expected_offset, &record.key) else { continue };
        let current = index.latest.get(key.as_bytes()).copied().unwrap_or(-1);
        if current != expected {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "offset_mismatch",
                format!(
                    "record {i}: the latest record with key '{key}' in {topic}/{} is at offset {current}, not {expected}; nothing was written. Read the current state and retry with expected_offset {current}",
                    write.partition
                ),
            ));
        }
    }
    Ok(())
}

/// Records that `key`'s latest record is at `offset`; false (and nothing recorded) when a new
/// key would take the index past `bytes_max`.
fn remember(index: &mut KeyIndex, key: &[u8], offset: i64, bytes_max: usize) -> bool {
    match index.latest.get_mut(key) {
        Some(latest) => *latest = offset,
        None => {
            // The key, its offset and the hash table's share.
            let bytes = key.len() + 8 + 16;
            if index.bytes + bytes > bytes_max {
                return false;
            }
            index.latest.insert(key.to_vec(), offset);
            index.bytes += bytes;
        }
    }
    true
}

/// Brings the index up to the partition's end (waiting for appends in flight to become
/// durable, so everything in the log is indexed).
async fn catch_up(state: &Arc<AppState>, topic: &str, partition: i32, index: &mut KeyIndex) -> Result<(), ApiError> {
    let log_partition = state.log.partition(topic, partition)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(OPEN_TRANSACTION_WAIT_MS_MAX);
    loop {
        let start = log_partition.log_start_offset();
        if index.next < start {
            index.next = start;
        }
        let end = log_partition.log_end_offset();
        if index.next >= end {
            return Ok(());
        }
        if log_partition.high_watermark() < end {
            let p = log_partition.clone();
            tokio::task::spawn_blocking(move || p.wait_until_durable(end)).await.map_err(internal)??;
        }
        let backend = state.engine.backend().clone();
        let (name, from) = (topic.to_owned(), index.next);
        let chunk =
            tokio::task::spawn_blocking(move || backend.read_committed(&name, partition, from, INDEX_READ_BYTES))
                .await
                .map_err(internal)??;
        if chunk.next_offset <= from {
            // Only an open transaction's records are left (read_committed stops there):
            // wait for it to end, for a while.
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "open_transaction",
                    format!(
                        "partition {partition} of {topic} has a transaction open since offset {}, so expected_offset cannot be checked (waited {OPEN_TRANSACTION_WAIT_MS_MAX} ms); nothing was written. Retry when the transaction ends",
                        log_partition.last_stable_offset()
                    ),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        }
        let bytes_max = state.produce.key_index_bytes_max();
        for record in &chunk.records {
            if let Some(key) = &record.key
                && !remember(index, key, record.offset, bytes_max)
            {
                *index = KeyIndex::default();
                return Err(key_index_full(topic, partition, bytes_max));
            }
        }
        index.next = chunk.next_offset;
    }
}

fn key_index_full(topic: &str, partition: i32, bytes_max: usize) -> ApiError {
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "key_index_full",
        format!(
            "the keys of {topic}/{partition} take more than the key index's fixed limit of {bytes_max} bytes (not a setting), so expected_offset is unavailable on this partition; nothing was written. Write without expected_offset, or spread the keys over more partitions"
        ),
    )
}

/// Appends one batch of `write`. Unguarded: anywhere. Guarded: right behind `follows` (the
/// end of the partition's batch before it in this request) when given, else only if nothing
/// was appended since the index caught up.
async fn append(
    state: &Arc<AppState>,
    topic: &str,
    batch: Vec<u8>,
    write: &PartitionWrite,
    index: Option<&mut KeyIndex>,
    follows: Option<i64>,
) -> Result<i64, ApiError> {
    let partition = write.partition;
    let log_partition = state.log.partition(topic, partition)?;
    let (true, Some(index)) = (write.guarded(), index) else {
        let p = log_partition.clone();
        let outcome = tokio::task::spawn_blocking(move || p.append(batch)).await.map_err(internal)??;
        return Ok(outcome.base_offset);
    };
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition_busy",
            format!(
                "{topic}/{partition} kept changing while this request waited to append; nothing was written, retry"
            ),
        )
    };
    if let Some(expected_end) = follows {
        // If another writer got in after this request's previous batch, a guarded key may
        // have changed since it was checked: fail (the caller aborts the transaction).
        let p = log_partition.clone();
        return match tokio::task::spawn_blocking(move || p.append_if_end(batch, expected_end))
            .await
            .map_err(internal)?
        {
            Ok(outcome) => Ok(outcome.base_offset),
            Err(LogError::EndMoved { .. }) => Err(busy()),
            Err(e) => Err(e.into()),
        };
    }
    for _ in 0..CONDITIONAL_APPEND_ATTEMPTS {
        let (p, bytes, expected_end) = (log_partition.clone(), batch.clone(), index.next);
        match tokio::task::spawn_blocking(move || p.append_if_end(bytes, expected_end)).await.map_err(internal)? {
            Ok(outcome) => return Ok(outcome.base_offset),
            Err(LogError::EndMoved { .. }) => {
                catch_up(state, topic, partition, index).await?;
                check(topic, write, index)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(busy())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
