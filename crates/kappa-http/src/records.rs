//! Reading records over HTTP (what `kappa consume` uses):
//!
//! - `GET /v1/topics/{topic}/partitions/{p}/records?offset=&max_records=&max_bytes=&isolation=&wait_ms=`
//!   — records from `offset`, read_committed by default (aborted transactions and markers
//!   left out), long-polling up to `wait_ms` when there is nothing yet.
//! - `GET /v1/topics/{topic}/offsets?at=earliest|latest|<ms since the epoch>&isolation=` —
//!   every partition's offset for that point (Kafka's ListOffsets).
//!
//! Keys and values are JSON strings when they are UTF-8, else `key_base64` / `value_base64`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use base64::Engine as _;
use kappa_log::batch::{self, BatchHeader};
use kappa_log::records::{Headers, decode_records};
use kappa_log::{Isolation, LogError, Partition};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::error::ApiError;

/// Records in one read response.
pub const READ_RECORDS_MAX: usize = 10_000;
/// Record-batch bytes read for one response (the JSON is larger: escaping, field names).
pub const READ_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Longest a read waits for records to arrive.
pub const READ_WAIT_MS_MAX: u64 = 30_000;
/// Default records per response.
const READ_RECORDS_DEFAULT: usize = 500;
/// Largest uncompressed batch a read decodes (the view engine's bound too): a compressed
/// batch that inflates beyond it is refused rather than allowed to exhaust memory.
const BATCH_UNCOMPRESSED_BYTES_MAX: usize = 128 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    offset: i64,
    max_records: Option<usize>,
    max_bytes: Option<usize>,
    isolation: Option<String>,
    wait_ms: Option<u64>,
}

fn isolation(name: Option<&str>) -> Result<Isolation, ApiError> {
    match name {
        None | Some("read_committed") => Ok(Isolation::ReadCommitted),
        Some("read_uncommitted") => Ok(Isolation::ReadUncommitted),
        Some(other) => Err(ApiError::bad_request(
            "invalid_isolation",
            format!("isolation '{other}': use read_committed or read_uncommitted"),
        )),
    }
}

fn upper(p: &Partition, isolation: Isolation) -> i64 {
    match isolation {
        Isolation::ReadCommitted => p.last_stable_offset(),
        Isolation::ReadUncommitted => p.high_watermark(),
    }
}

/// `GET /v1/topics/{topic}/partitions/{partition}/records`
pub async fn read(
    State(state): State<Arc<AppState>>,
    path: Result<Path<(String, i32)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path((topic, partition)) = path
        .map_err(|e| ApiError::invalid_path(e, "/v1/topics/<topic>/partitions/<partition number, from 0>/records"))?;
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("{e}; expected ?offset=N[&max_records=][&max_bytes=][&isolation=][&wait_ms=]"),
        )
    })?;
    let isolation = isolation(query.isolation.as_deref())?;
    let max_records = query.max_records.unwrap_or(READ_RECORDS_DEFAULT).clamp(1, READ_RECORDS_MAX);
    let max_bytes = query.max_bytes.unwrap_or(READ_BYTES_MAX).clamp(1, READ_BYTES_MAX);
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(0).min(READ_WAIT_MS_MAX));
    let p = state.log.partition(&topic, partition)?;
    wait_for_records(&p, query.offset, isolation, wait).await;
    let (reader, offset) = (p.clone(), query.offset);
    let outcome = tokio::task::spawn_blocking(move || reader.read(offset, max_bytes, isolation))
        .await
        .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| match e {
            LogError::OffsetOutOfRange { .. } => ApiError::new(
                axum::http::StatusCode::RANGE_NOT_SATISFIABLE,
                "offset_out_of_range",
                format!("{e}; read from start_offset (kappa topic describe {topic}) or later"),
            ),
            e => e.into(),
        })?;
    let (records, next_offset) = decode(&outcome, query.offset, max_records, isolation)?;
    Ok(Json(json!({
        "topic": topic,
        "partition": partition,
        "records": records,
        "next_offset": next_offset,
        "start_offset": outcome.log_start_offset,
        "high_watermark": outcome.high_watermark,
        "last_stable_offset": outcome.last_stable_offset,
    })))
}

/// Waits until the partition has something at or after `offset` for this isolation level,
/// or `wait` passes.
async fn wait_for_records(p: &Partition, offset: i64, isolation: Isolation, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut watermark = p.watch_high_watermark();
    while upper(p, isolation) <= offset && tokio::time::Instant::now() < deadline {
        // The last stable offset moves with transaction markers, which also move the
        // high watermark; poll briefly in case a marker lands without new data after it.
        let poll = deadline.min(tokio::time::Instant::now() + Duration::from_millis(100));
        if let Ok(Err(_)) = tokio::time::timeout_at(poll, watermark.changed()).await {
            return; // The partition is gone (topic deleted): the read will say so.
        }
    }
}

/// The read's records from `from` on, at most `max_records`, as JSON; and where the next
/// read starts (past skipped markers and aborted records, never past an unreturned record).
fn decode(
    outcome: &kappa_log::ReadOutcome,
    from: i64,
    max_records: usize,
    isolation: Isolation,
) -> Result<(Vec<Value>, i64), ApiError> {
    let mut records = Vec::new();
    let mut next = from;
    for batch in batch::batches(&outcome.records) {
        let (header, batch_bytes) = batch.map_err(LogError::from)?;
        if header.last_offset() < from {
            continue;
        }
        if header.is_control() || (isolation == Isolation::ReadCommitted && aborted(outcome, &header)) {
            next = header.last_offset() + 1;
            continue;
        }
        let decoded = decode_records(batch_bytes, BATCH_UNCOMPRESSED_BYTES_MAX)
            .map_err(|e| LogError::InvalidRecords(e.to_string()))?;
        for record in decoded.iter().filter(|r| r.offset() >= from) {
            if records.len() == max_records {
                return Ok((records, next));
            }
            records.push(record_json(record.offset(), record.timestamp(), record.key, record.value, &record.headers));
            next = record.offset() + 1;
        }
        next = next.max(header.last_offset() + 1);
    }
    Ok((records, next))
}

fn aborted(outcome: &kappa_log::ReadOutcome, header: &BatchHeader) -> bool {
    header.is_transactional()
        && outcome.aborted.iter().any(|a| {
            a.producer_id == header.producer_id
                && a.first_offset <= header.base_offset
                && header.base_offset <= a.last_offset
        })
}

/// One record as JSON: bytes as strings when UTF-8, else as base64 under `<name>_base64`.
fn record_json(offset: i64, timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &Headers<'_>) -> Value {
    let mut out = Map::new();
    out.insert("offset".into(), offset.into());
    out.insert("timestamp".into(), timestamp.into());
    put_bytes(&mut out, "key", key);
    put_bytes(&mut out, "value", value);
    let mut header_map = Map::new();
    for (name, value) in headers {
        let value = value.map(|v| match std::str::from_utf8(v) {
            Ok(text) => Value::from(text),
            Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD.encode(v)}),
        });
        header_map.insert(String::from_utf8_lossy(name).into_owned(), value.unwrap_or(Value::Null));
    }
    out.insert("headers".into(), header_map.into());
    Value::Object(out)
}

fn put_bytes(out: &mut Map<String, Value>, name: &str, bytes: Option<&[u8]>) {
    match bytes.map(std::str::from_utf8) {
        None => {
            out.insert(name.into(), Value::Null);
        }
        Some(Ok(text)) => {
            out.insert(name.into(), text.into());
        }
        Some(Err(_)) => {
            out.insert(
                format!("{name}_base64"),
                base64::engine::general_purpose::STANDARD.encode(bytes.unwrap()).into(),
            );
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetsQuery {
    at: String,
    isolation: Option<String>,
}

/// `GET /v1/topics/{topic}/offsets?at=earliest|latest|<ms>`: per partition, the offset a
/// reader starting at that point starts from. For a time: the first record at or after it,
/// or the end when there is none (as Kafka's offset reset tools do).
pub async fn offsets(
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    query: Result<Query<OffsetsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request("invalid_query", format!("{e}; expected ?at=earliest|latest|<ms since the epoch>"))
    })?;
    let isolation = isolation(query.isolation.as_deref())?;
    let timestamp = match query.at.as_str() {
        "earliest" | "latest" => None,
        ms => Some(ms.parse::<i64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("at={ms}: use earliest, latest or milliseconds since the epoch"),
            )
        })?),
    };
    let partitions = state.log.topic(&topic)?.partitions();
    let at = query.at.clone();
    let offsets = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, LogError> {
        partitions
            .iter()
            .map(|p| {
                let offset = match (at.as_str(), timestamp) {
                    ("earliest", _) => p.log_start_offset(),
                    (_, Some(ms)) => match p.offset_for_timestamp(ms, isolation)? {
                        Some((offset, _)) => offset,
                        None => upper(p, isolation),
                    },
                    _ => upper(p, isolation),
                };
                Ok(json!({"partition": p.index(), "offset": offset}))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(json!({"topic": topic, "offsets": offsets})))
}
