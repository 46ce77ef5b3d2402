//! A worker's HTTP API: the same view paths as `serve` (`/v1/views/{view}/keys/{key}`,
//! `/v1/views/{view}/keys?prefix=`), and the same subscriptions — `/v1/views/{view}/watch`
//! (Server-Sent Events) and `/v1/ws` (WebSocket, `{"op":"subscribe","id","view","key"|"prefix",
//! "resume"?}`), each a snapshot then every change in order, resumable — answered from the
//! read replica; `/health` (liveness) and `/ready` (readiness) per owned partition, and `/metrics`.
//!
//! Positions are `<changelog partition>.<offset>`: a key lives in one changelog partition,
//! so its changes are totally ordered by offset. A prefix spans partitions: its changes come
//! in each partition's order (interleaved as the replica reads them), and its resume token
//! holds one offset per partition (`<version>.<o0>_<o1>_...`, see [`Cursor`]). Frames are
//! those of `serve` (`type`: snapshot, change, reset, error); a change frame also carries its
//! `position`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use kappa_http::ApiError;
use kappa_http::live::Emit;
use kappa_http::live::Target as LiveTarget;
use kappa_http::sse::SseEmit;
use kappa_http::views::PAGE_BYTES_MAX;
use kappa_http::ws::{self, FrameSender, FramedEmit, Subscriptions, WsLimits};
use kappa_views::ScanLimit;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::replica::{Cursor, KeyEntry, Replica, ReplicaChange, Start, Target};

/// Keys one prefix read returns at most (a larger `limit` is refused, as `serve` refuses one
/// past `--http-page-items-max`).
pub const SCAN_LIMIT_MAX: usize = 10_000;
/// Keys a prefix read returns without `limit` (`serve`'s default too).
pub const SCAN_LIMIT_DEFAULT: usize = 100;
/// Keys a prefix subscription's snapshot may hold.
pub const SNAPSHOT_ITEMS_MAX: usize = 10_000;
/// Messages queued per SSE stream or WebSocket before the client is cut off as too slow.
pub const SUBSCRIBER_QUEUE_MAX: usize = 10_000;
/// Subscriptions one WebSocket may hold.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 100;
/// Largest client message on a WebSocket.
pub const WS_MESSAGE_BYTES_MAX: usize = 64 * 1024;

pub struct HttpState {
    pub replica: Arc<Replica>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>,
}

pub fn router(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/views/{view}/keys", get(scan))
        .route("/v1/views/{view}/keys/{key}", get(get_key))
        .route("/v1/views/{view}/watch", get(watch))
        .route("/v1/ws", get(ws_upgrade))
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

/// Liveness, as `serve`'s: 200 while the worker runs, `degraded` when an owned partition
/// stopped at a view's error. Restarting the worker would not help — the partition's next
/// owner stops at the same event — so a liveness probe must not see a failure here.
async fn health(State(state): State<Arc<HttpState>>) -> Response {
    let (_, body) = health_report(&state);
    (StatusCode::OK, Json(body)).into_response()
}

/// Readiness: the same body, 503 while an owned partition is stopped (the view's keys from
/// it are frozen where it stopped).
async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    let (failing, body) = health_report(&state);
    let code = if failing { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, Json(body)).into_response()
}

/// The health body, and whether an owned partition has stopped.
fn health_report(state: &HttpState) -> (bool, Value) {
    let partitions = (state.status)();
    let failing = partitions.values().any(|s| s.starts_with("failed"));
    let status = if failing { "degraded" } else { "ok" };
    (failing, json!({"status": status, "mode": "work", "partitions": partitions}))
}

async fn metrics(State(state): State<Arc<HttpState>>) -> String {
    state.metrics.render()
}

/// `serve`'s read-your-writes parameters, which a worker cannot honour yet: its reads come
/// from the changelog replica, which knows changelog positions, not the input offsets a
/// produce answered. Refused rather than ignored, so a client never takes a read that did
/// not wait for its writes for one that did.
#[derive(Debug, Default, Deserialize)]
struct ReadWaitQuery {
    after_offsets: Option<String>,
    wait_ms: Option<String>,
}

/// The answer to a read that asks to wait for input offsets (`after_offsets`, `wait_ms`).
fn read_wait_refusal(after_offsets: &Option<String>, wait_ms: &Option<String>) -> Option<Response> {
    (after_offsets.is_some() || wait_ms.is_some()).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "unsupported_in_work_mode",
            "after_offsets and wait_ms (read your own writes) are served by `kappa serve` only; \
             a work-mode worker's reads answer from its changelog replica at once: read without them \
             and retry until the value reflects the write"
                .to_owned(),
        )
    })
}

async fn get_key(
    State(state): State<Arc<HttpState>>,
    Path((view, key)): Path<(String, String)>,
    Query(wait): Query<ReadWaitQuery>,
) -> Response {
    if let Some(refusal) = read_wait_refusal(&wait.after_offsets, &wait.wait_ms) {
        return refusal;
    }
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
    // Not `#[serde(flatten)]`: flattened query values reach `limit` as strings and fail.
    after_offsets: Option<String>,
    wait_ms: Option<String>,
}

async fn scan(
    State(state): State<Arc<HttpState>>,
    Path(view): Path<String>,
    Query(query): Query<ScanQuery>,
) -> Response {
    if let Some(refusal) = read_wait_refusal(&query.after_offsets, &query.wait_ms) {
        return refusal;
    }
    if !state.replica.has_view(&view) {
        return unknown_view(&view);
    }
    let limit = query.limit.unwrap_or(SCAN_LIMIT_DEFAULT);
    if limit == 0 || limit > SCAN_LIMIT_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            format!("limit must be between 1 and {SCAN_LIMIT_MAX} (SCAN_LIMIT_MAX)"),
        );
    }
    let page_limit = ScanLimit { items: limit, bytes: PAGE_BYTES_MAX };
    let (items, more) = state.replica.scan(&view, &query.prefix, query.after.as_deref(), page_limit);
    let next = if more { items.last().map(|(k, _)| k.clone()) } else { None };
    let items: Vec<Value> = items
        .iter()
        .map(|(key, entry)| json!({"key": key, "value": value_json(entry), "position": position(entry)}))
        .collect();
    Json(json!({"items": items, "cursor": next})).into_response()
}

#[derive(Debug, Deserialize)]
struct WatchQuery {
    key: Option<String>,
    prefix: Option<String>,
    resume: Option<String>,
}

/// What a subscription sends, before a transport frames it.
enum Live {
    Snapshot { version: u32, items: Vec<(String, KeyEntry)>, token: Cursor },
    Change { change: Arc<ReplicaChange>, token: Cursor },
    Reset { reason: String },
    Error { code: &'static str, message: String },
}

/// One message as JSON text, in `serve`'s frame shapes (plus `position` on a change).
fn frame(id: Option<&str>, message: &Live) -> String {
    let value = match message {
        Live::Snapshot { version, items, token } => json!({
            "type": "snapshot",
            "id": id,
            "version": version,
            "items": items.iter().map(|(key, entry)| json!({"key": key, "value": value_json(entry), "position": position(entry)})).collect::<Vec<_>>(),
            "token": token.to_string(),
        }),
        Live::Change { change, token } => json!({
            "type": "change",
            "id": id,
            "key": change.key,
            "value": change.value.as_ref().map(|v| serde_json::from_slice::<Value>(v).unwrap_or(Value::Null)),
            "position": format!("{}.{}", change.partition, change.offset),
            "token": token.to_string(),
        }),
        Live::Reset { reason } => json!({"type": "reset", "id": id, "reason": reason}),
        Live::Error { code, message } => json!({"type": "error", "id": id, "code": code, "message": message}),
    };
    value.to_string()
}

/// Sends a subscription's messages through `emit` (which waits while the client's queue is
/// full; false: stop) until the client goes away
/// or the replica stops: a snapshot (or the changes after the resume token), then every
/// change; after falling behind the broadcast it resumes from the replica's history, or
/// sends `reset` and a fresh snapshot — never a silent gap.
async fn follow(
    replica: Arc<Replica>,
    view: String,
    target: Target,
    mut resume: Option<Cursor>,
    emit: &mut impl Emit<Live>,
) {
    loop {
        let (start, mut receiver) = match replica.start(&view, &target, resume.as_ref(), SNAPSHOT_ITEMS_MAX) {
            Ok(started) => started,
            Err(message) => {
                emit.emit(Live::Error { code: "snapshot_too_large", message }).await;
                return;
            }
        };
        let mut cursor = match start {
            Start::Snapshot { items, cursor } => {
                if !emit.emit(Live::Snapshot { version: cursor.version, items, token: cursor.clone() }).await {
                    return;
                }
                cursor
            }
            Start::Resume { replay, cursor: end } => {
                let mut cursor = resume.take().expect("resumed from a token");
                for change in replay {
                    cursor.offsets[change.partition as usize] = change.offset + 1;
                    if !emit.emit(Live::Change { change, token: cursor.clone() }).await {
                        return;
                    }
                }
                end
            }
            Start::Reset { reason } => {
                if !emit.emit(Live::Reset { reason }).await {
                    return;
                }
                resume = None;
                continue;
            }
        };
        loop {
            match receiver.recv().await {
                Ok(change) if *change.view == *view => {
                    let p = change.partition as usize;
                    if p >= cursor.offsets.len() || change.offset < cursor.offsets[p] {
                        continue;
                    }
                    cursor.offsets[p] = change.offset + 1;
                    if target.matches(&change.key) && !emit.emit(Live::Change { change, token: cursor.clone() }).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    resume = Some(cursor);
                    break;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Exactly one of key or prefix.
fn target(key: Option<String>, prefix: Option<String>) -> Option<Target> {
    match (key, prefix) {
        (Some(key), None) => Some(Target::Key(key)),
        (None, Some(prefix)) => Some(Target::Prefix(prefix)),
        _ => None,
    }
}

/// SSE: `snapshot`, then a `change` per change, each with its resume token as the event id
/// (a reconnecting `EventSource` sends it back as `Last-Event-ID`; or pass `?resume=`).
async fn watch(
    State(state): State<Arc<HttpState>>,
    Path(view): Path<String>,
    Query(query): Query<WatchQuery>,
    headers: HeaderMap,
) -> Response {
    if !state.replica.has_view(&view) {
        return unknown_view(&view);
    }
    let Some(target) = target(query.key, query.prefix) else {
        return error(StatusCode::BAD_REQUEST, "invalid_query", "give exactly one of ?key= or ?prefix=".to_owned());
    };
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    // A reconnecting EventSource sends its original URL and the newer Last-Event-ID.
    let resume = match last_event_id.or(query.resume).map(|t| t.parse::<Cursor>()).transpose() {
        Ok(resume) => resume,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_token", message),
    };
    // Refused before the 200, as `serve` does: a stream that ends is retried by EventSource
    // forever, a 4xx is not.
    if let Err(message) = state.replica.check_snapshot(&view, &target, SNAPSHOT_ITEMS_MAX) {
        return error(StatusCode::BAD_REQUEST, "snapshot_too_large", message);
    }
    let (tx, rx) = mpsc::channel::<Event>(SUBSCRIBER_QUEUE_MAX);
    let replica = state.replica.clone();
    let stall = Duration::from_millis(kappa_http::SUBSCRIBER_STALL_MS_MAX_DEFAULT);
    tokio::spawn(async move {
        let mut emit = SseEmit::new(tx.clone(), stall, |message: &Live| sse_event(message));
        // A quiet subscription would notice a client that went away only at its next change.
        tokio::select! {
            _ = follow(replica, view, target, resume, &mut emit) => {}
            _ = tx.closed() => return,
        }
        if emit.stalled {
            let message = Live::Error {
                code: "slow_consumer",
                message: format!(
                    "this stream's queue ({SUBSCRIBER_QUEUE_MAX} events) stayed full for {} ms; reconnect with Last-Event-ID",
                    stall.as_millis()
                ),
            };
            let _ = tokio::time::timeout(stall, tx.send(sse_event(&message))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    sse(stream)
}

fn sse(stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn sse_event(message: &Live) -> Event {
    let (name, id) = match message {
        Live::Snapshot { token, .. } => ("snapshot", Some(token.to_string())),
        Live::Change { token, .. } => ("change", Some(token.to_string())),
        Live::Reset { .. } => ("reset", None),
        Live::Error { .. } => ("error", None),
    };
    let event = Event::default().event(name).data(frame(None, message));
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

async fn ws_upgrade(State(state): State<Arc<HttpState>>, ws: WebSocketUpgrade) -> Response {
    let limits = WsLimits {
        queue_max: SUBSCRIBER_QUEUE_MAX,
        subscriptions_max: SUBSCRIPTIONS_PER_CONNECTION_MAX,
        message_bytes_max: WS_MESSAGE_BYTES_MAX,
        stall_ms_max: kappa_http::SUBSCRIBER_STALL_MS_MAX_DEFAULT,
        silence_ms_max: kappa_http::WS_SILENCE_MS_MAX_DEFAULT,
    };
    ws::configure(ws, limits.message_bytes_max).on_upgrade(move |socket| ws::multiplex(state, socket, limits))
}

/// Many subscriptions over one WebSocket, as `serve`'s `/v1/ws` (the same connection loop).
impl Subscriptions for HttpState {
    type Token = Cursor;

    fn subscribe(
        state: &Arc<Self>,
        id: &str,
        view: String,
        target: LiveTarget,
        resume: Option<Cursor>,
        out: FrameSender,
    ) -> Result<tokio::task::JoinHandle<()>, ApiError> {
        if !state.replica.has_view(&view) {
            return Err(ApiError::not_found("unknown_view", format!("this worker serves no view named '{view}'")));
        }
        let target = match target {
            LiveTarget::Key(key) => Target::Key(key),
            LiveTarget::Prefix(prefix) => Target::Prefix(prefix),
        };
        let (replica, id) = (state.replica.clone(), id.to_owned());
        Ok(tokio::spawn(async move {
            let mut emit = FramedEmit { out, render: move |message: &Live| frame(Some(&id), message) };
            follow(replica, view, target, resume, &mut emit).await;
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Serves `replica`'s HTTP API on a loopback port.
    fn serve(replica: Arc<Replica>, runtime: &tokio::runtime::Runtime) -> std::net::SocketAddr {
        let status = Arc::new(BTreeMap::<String, String>::new);
        let state = Arc::new(HttpState { replica, metrics: Arc::new(Metrics::default()), status });
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, router(state)).await });
        addr
    }

    /// A prefix whose snapshot would not fit in one message is refused by its byte size too,
    /// before the stream starts (a WebSocket subscription gets the same error from
    /// `Replica::start`, instead of a frame that closes the connection).
    #[test]
    fn sse_refuses_a_snapshot_over_the_byte_limit_before_answering_200() {
        let replica = Replica::new([("v".to_owned(), 1, 1)]);
        let view: Arc<str> = "v".into();
        // 9 values of 1 MiB: 9 MiB, over the 8 MiB limit, far under the key limit.
        let value = format!("\"{}\"", "x".repeat(1024 * 1024));
        for offset in 0..9 {
            replica.apply(&view, 0, offset, format!("k{offset}"), Some(value.clone().into()));
        }
        let target = Target::Prefix("k".to_owned());
        let started = replica.start("v", &target, None, SNAPSHOT_ITEMS_MAX).map(drop);
        assert!(started.is_err_and(|e| e.contains("SNAPSHOT_BYTES_MAX")), "a WebSocket subscription is refused too");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = serve(replica, &runtime);
        let answer = get(addr, "/v1/views/v/watch?prefix=k");
        assert!(answer.starts_with("HTTP/1.1 400"), "{}", &answer[..answer.len().min(300)]);
        assert!(answer.contains("snapshot_too_large") && answer.contains("SNAPSHOT_BYTES_MAX"), "{answer}");
    }

    /// Sends a GET to `addr` and reads the answer until the server closes.
    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    /// A prefix over the snapshot limit is answered 400 before the stream starts, as in
    /// `serve`: EventSource retries a stream that ends, forever, but not a 4xx.
    #[test]
    fn sse_refuses_a_snapshot_over_the_limit_before_answering_200() {
        let replica = Replica::new([("v".to_owned(), 1, 1)]);
        let view: Arc<str> = "v".into();
        for offset in 0..=SNAPSHOT_ITEMS_MAX as i64 {
            replica.apply(&view, 0, offset, format!("k{offset}"), Some("1".into()));
        }
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = serve(replica, &runtime);
        let answer = get(addr, "/v1/views/v/watch?prefix=k");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("snapshot_too_large") && answer.contains("longer prefix"), "{answer}");
    }

    /// A page of keys ends after the value that takes it past `PAGE_BYTES_MAX`, with a
    /// cursor, as on `serve`; paging on returns every key once.
    #[test]
    fn a_page_of_large_values_ends_at_the_byte_limit_with_a_cursor() {
        let replica = Replica::new([("v".to_owned(), 1, 1)]);
        let view: Arc<str> = "v".into();
        // 20 values of just over 1 MiB (quotes, key): 8 of them pass the 8 MiB page limit.
        let value = format!("\"{}\"", "x".repeat(1024 * 1024));
        for offset in 0..20 {
            replica.apply(&view, 0, offset, format!("k{offset:02}"), Some(value.clone().into()));
        }
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let addr = serve(replica, &runtime);
        let (mut sizes, mut keys, mut after) = (Vec::new(), Vec::new(), String::new());
        loop {
            let answer = get(addr, &format!("/v1/views/v/keys?prefix=k&limit=10000&after={after}"));
            assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..answer.len().min(300)]);
            let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
            let items = body["items"].as_array().unwrap();
            sizes.push(items.len());
            keys.extend(items.iter().map(|i| i["key"].as_str().unwrap().to_owned()));
            match body["cursor"].as_str() {
                Some(cursor) => after = cursor.to_owned(),
                None => break,
            }
        }
        assert_eq!(sizes, [8, 8, 4], "keys per page");
        assert_eq!(keys, (0..20).map(|i| format!("k{i:02}")).collect::<Vec<_>>());
    }
}
