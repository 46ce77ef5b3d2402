//! A worker's HTTP API: the same view paths as `serve` (`/v1/views/{view}/keys/{key}`,
//! `/v1/views/{view}/keys?prefix=`, `/v1/views/{view}/watch?key=` as Server-Sent Events),
//! answered from the read replica; `/health` (per owned partition) and `/metrics`.
//!
//! Positions are `<changelog partition>.<offset>`: a key lives in one changelog partition,
//! so its changes are totally ordered by offset.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::metrics::Metrics;
use crate::replica::{KeyEntry, Replica};

/// Keys one prefix read returns at most.
pub const SCAN_LIMIT_MAX: usize = 10_000;

pub struct HttpState {
    pub replica: Arc<Replica>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>,
}

pub fn router(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/views/{view}/keys", get(scan))
        .route("/v1/views/{view}/keys/{key}", get(get_key))
        .route("/v1/views/{view}/watch", get(watch))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

fn unknown_view(view: &str) -> Response {
    error(StatusCode::NOT_FOUND, "unknown_view", format!("this worker serves no view named '{view}'"))
}

fn value_json(entry: &KeyEntry) -> Value {
    serde_json::from_slice(&entry.value).unwrap_or(Value::Null)
}

fn position(entry: &KeyEntry) -> String {
    format!("{}.{}", entry.partition, entry.offset)
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let partitions = (state.status)();
    let failing = partitions.values().any(|s| s.starts_with("failed"));
    let status = if failing { "failing" } else { "ok" };
    let code = if failing { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(json!({"status": status, "mode": "work", "partitions": partitions}))).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> String {
    state.metrics.render()
}

async fn get_key(State(state): State<Arc<HttpState>>, Path((view, key)): Path<(String, String)>) -> Response {
    if !state.replica.has_view(&view) {
        return unknown_view(&view);
    }
    match state.replica.get(&view, &key) {
        Some(entry) => {
            Json(json!({"key": key, "value": value_json(&entry), "position": position(&entry)})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "unknown_key", format!("view {view} has no key '{key}'")),
    }
}

#[derive(Debug, Deserialize)]
struct ScanQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

async fn scan(
    State(state): State<Arc<HttpState>>,
    Path(view): Path<String>,
    Query(query): Query<ScanQuery>,
) -> Response {
    if !state.replica.has_view(&view) {
        return unknown_view(&view);
    }
    let limit = query.limit.unwrap_or(SCAN_LIMIT_MAX).min(SCAN_LIMIT_MAX);
    let items = state.replica.scan(&view, &query.prefix, query.after.as_deref(), limit);
    let next = (items.len() == limit).then(|| items.last().map(|(k, _)| k.clone())).flatten();
    let items: Vec<Value> = items
        .iter()
        .map(|(key, entry)| json!({"key": key, "value": value_json(entry), "position": position(entry)}))
        .collect();
    Json(json!({"items": items, "next_after": next})).into_response()
}

#[derive(Debug, Deserialize)]
struct WatchQuery {
    key: String,
}

/// SSE: `snapshot` (the key's value now, or null), then a `change` per change of the key,
/// in changelog order; `reset` and the end of the stream if this subscriber fell more than
/// `REPLICA_BROADCAST_MAX` changes behind (reconnect for a fresh snapshot).
async fn watch(
    State(state): State<Arc<HttpState>>,
    Path(view): Path<String>,
    Query(query): Query<WatchQuery>,
) -> Response {
    if !state.replica.has_view(&view) {
        return unknown_view(&view);
    }
    let (entry, receiver) = state.replica.subscribe(&view, &query.key);
    let snapshot = match &entry {
        Some(e) => json!({"key": query.key, "value": value_json(e), "position": position(e)}),
        None => json!({"key": query.key, "value": null, "position": null}),
    };
    let first = Event::default().event("snapshot").data(snapshot.to_string());
    let stream = changes(first, receiver, view, query.key);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn changes(
    first: Event,
    receiver: tokio::sync::broadcast::Receiver<Arc<crate::replica::ReplicaChange>>,
    view: String,
    key: String,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = (Some(first), Some(receiver));
    futures_util::stream::unfold(state, move |(first, receiver)| {
        let (view, key) = (view.clone(), key.clone());
        async move {
            if let Some(first) = first {
                return Some((Ok(first), (None, receiver)));
            }
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(change) if *change.view == *view && change.key == key => {
                        let value =
                            change.value.as_ref().map(|v| serde_json::from_slice::<Value>(v).unwrap_or(Value::Null));
                        let data = json!({"key": key, "value": value, "position": format!("{}.{}", change.partition, change.offset)});
                        return Some((
                            Ok(Event::default().event("change").data(data.to_string())),
                            (None, Some(receiver)),
                        ));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        let data =
                            json!({"reason": "this subscription fell too far behind; reconnect for a fresh snapshot"});
                        return Some((Ok(Event::default().event("reset").data(data.to_string())), (None, None)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
}
