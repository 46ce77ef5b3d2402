//! `GET /v1/views/{view}/watch?key=..|prefix=..`: one subscription as Server-Sent Events.
//! Each event's `id:` is its resume token; a reconnecting `EventSource` sends it back as
//! `Last-Event-ID` (or pass `?resume=`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::AppState;
use crate::error::ApiError;
use crate::live::{Emit, LiveMessage, Target, Token, check_snapshot_size, run_subscription};
use crate::ws::{Queued, queue_within};

/// What `GET /v1/views/{view}/watch` accepts.
const WATCH_QUERY: &str =
    "?key=<key> or ?prefix=<key prefix>, and optionally &resume=<token> (or &lastEventId=<token>)";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    key: Option<String>,
    prefix: Option<String>,
    resume: Option<String>,
    /// What EventSource polyfills that cannot set headers (e.g. event-source-polyfill) send
    /// on a reconnect instead of the Last-Event-ID header; it means the same.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

pub async fn watch(
    State(state): State<Arc<AppState>>,
    Path(view): Path<String>,
    query: Result<Query<WatchQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return ApiError::invalid_query(e, WATCH_QUERY).into_response(),
    };
    match start(state, view, query, &headers) {
        Ok(sse) => sse.into_response(),
        Err(e) => e.into_response(),
    }
}

fn start(
    state: Arc<AppState>,
    view: String,
    query: WatchQuery,
    headers: &HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    if !state.origin_allowed(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not subscribe here; add it to --http-allowed-origins",
        ));
    }
    let target = match (query.key, query.prefix) {
        (Some(key), None) => Target::Key(key),
        (None, Some(prefix)) => Target::Prefix(prefix),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("give exactly one of ?key= or ?prefix=; expected {WATCH_QUERY}"),
            ));
        }
    };
    let last_event_id =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(query.last_event_id);
    // A reconnecting EventSource sends the URL it was opened with, `?resume=` included, and
    // the newer Last-Event-ID: that one says how far the client got.
    let resume = last_event_id.or(query.resume).map(|t| t.parse::<Token>()).transpose()?;
    state.engine.describe(&view)?;
    check_snapshot_size(&state, &view, &target)?;
    let (tx, rx) = mpsc::channel::<Event>(state.config.subscriber_queue_max);
    let stall = Duration::from_millis(state.config.subscriber_stall_ms_max);
    tokio::spawn(async move {
        let mut emit = SseEmit::new(tx.clone(), stall, |message: &LiveMessage| event(message));
        // A quiet subscription would notice a client that went away only at its next change.
        tokio::select! {
            _ = run_subscription(state, view, target, resume, &mut emit) => {}
            _ = tx.closed() => return,
        }
        if emit.stalled {
            let message = LiveMessage::Error {
                code: "slow_consumer",
                message: format!(
                    "this stream's queue stayed full for {} ms; reconnect with Last-Event-ID",
                    stall.as_millis()
                ),
            };
            let _ = tokio::time::timeout(stall, tx.send(event(&message))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (Ok(event), rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn event(message: &LiveMessage) -> Event {
    let data = crate::ws::frame(None, message);
    let (name, id) = match message {
        LiveMessage::Snapshot { token, .. } => ("snapshot", Some(token.to_string())),
        LiveMessage::Change { token, .. } => ("change", Some(token.to_string())),
        LiveMessage::Reset { .. } => ("reset", None),
        LiveMessage::Error { .. } => ("error", None),
    };
    let event = Event::default().event(name).data(data);
    match id {
        Some(id) => event.id(id),
        None => event,
    }
}

/// A subscription's messages as SSE events on the stream's bounded queue.
pub struct SseEmit<F> {
    queue: mpsc::Sender<Event>,
    stall: Duration,
    render: F,
    /// The queue stayed full for `stall`: the client is too slow.
    pub stalled: bool,
}

impl<F> SseEmit<F> {
    pub fn new(queue: mpsc::Sender<Event>, stall: Duration, render: F) -> Self {
        Self { queue, stall, render, stalled: false }
    }
}

impl<M, F: FnMut(&M) -> Event + Send> Emit<M> for SseEmit<F> {
    fn emit(&mut self, message: M) -> impl Future<Output = bool> + Send {
        let event = (self.render)(&message);
        async move {
            match queue_within(&self.queue, event, self.stall).await {
                Queued::Yes => true,
                Queued::Closed => false,
                Queued::Stalled => {
                    self.stalled = true;
                    false
                }
            }
        }
    }
}
