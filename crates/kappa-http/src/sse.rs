//! `GET /v1/views/{view}/watch?key=..|prefix=..`: one subscription as Server-Sent Events.
//! Each event's `id:` is its resume token; a reconnecting `EventSource` sends it back as
//! `Last-Event-ID` (or pass `?resume=`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::AppState;
use crate::error::ApiError;
use crate::live::{LiveMessage, Target, Token, run_subscription};

#[derive(Debug, Deserialize)]
pub struct WatchQuery {
    key: Option<String>,
    prefix: Option<String>,
    resume: Option<String>,
}

pub async fn watch(
    State(state): State<Arc<AppState>>,
    Path(view): Path<String>,
    Query(query): Query<WatchQuery>,
    headers: HeaderMap,
) -> Response {
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
        _ => return Err(ApiError::bad_request("invalid_query", "give exactly one of ?key= or ?prefix=")),
    };
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let resume = query.resume.or(last_event_id).map(|t| t.parse::<Token>()).transpose()?;
    state.engine.describe(&view)?;
    let (tx, rx) = mpsc::channel::<Event>(state.config.subscriber_queue_max);
    tokio::spawn(async move {
        let slow = tx.clone();
        let mut emit = |message: LiveMessage| match tx.try_send(event(&message)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        let ended = run_subscription(state, view, target, resume, &mut emit).await;
        if ended == crate::live::Ended::Gone && !slow.is_closed() {
            // The queue is full: say so once there is room, then end the stream.
            let message = LiveMessage::Error {
                code: "slow_consumer",
                message:
                    "this stream fell too far behind (subscriber_queue_max events queued); reconnect with Last-Event-ID"
                        .into(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), slow.send(event(&message))).await;
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
