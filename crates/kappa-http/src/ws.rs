//! `GET /v1/ws`: many subscriptions over one WebSocket.
//!
//! Client → server: `{"op":"subscribe","id":"s1","view":"channel_page","key":"c1"}` (or
//! `"prefix"`), optionally `"resume":"<token>"`; `{"op":"unsubscribe","id":"s1"}`.
//! Server → client: `snapshot`, `change`, `reset`, `error` (see `frame`). A client whose
//! queue (`subscriber_queue_max` messages) stays full for `subscriber_stall_ms_max` — it
//! reads nothing meanwhile — gets an error and is disconnected; a burst larger than the
//! queue (a catch-up after a resume) only waits for the client's reading.
//!
//! The connection loop ([`multiplex`]: parsing, limits, the subscription table, the bounded
//! queue and the slow-consumer cut-off) serves any [`Subscriptions`]: `serve`'s views here,
//! and a work-mode worker's read replica (kappa-kafka), whose frames have the same shapes.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc};

use crate::AppState;
use crate::error::ApiError;
use crate::live::{Emit, LiveMessage, Target, Token, run_subscription};

/// How far over `ws_message_bytes_max` a client message may go and still be read (and
/// answered with `message_too_large`, keeping the connection); a larger one makes the
/// WebSocket layer close the connection (1009), so a connection buffers at most this
/// multiple of the configured limit, or [`WS_READ_MESSAGE_BYTES_MIN`] if that is more.
const WS_READ_MESSAGE_LIMIT_FACTOR: usize = 2;
/// ... but never less than this: a message this size is always answered with
/// `message_too_large` rather than a closed connection, which a client (kappa.js) would take
/// for a network failure and resend its subscriptions into, forever.
const WS_READ_MESSAGE_BYTES_MIN: usize = 1024 * 1024;
/// Room for one outgoing frame in the socket's write buffer; a larger one fails the write
/// and closes the connection. A snapshot's items are at most
/// [`crate::live::SNAPSHOT_BYTES_MAX`], leaving room for the frame's own fields.
pub(crate) const WS_WRITE_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
const _: () = assert!(crate::live::SNAPSHOT_BYTES_MAX <= WS_WRITE_FRAME_BYTES_MAX / 2);

/// Bytes read from a WebSocket at a time.
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Bytes a WebSocket may hold unsent beyond our queue before writes fail.
const WS_WRITE_BUFFER_BYTES_MAX: usize = 1024 * 1024;

/// WebSocket close code for a client that cannot keep up (RFC 6455 1008: policy violation).
const CLOSE_SLOW_CONSUMER: u16 = 1008;

pub async fn upgrade(State(state): State<Arc<AppState>>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    if !state.origin_allowed(&headers) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not open WebSockets here; add it to --http-allowed-origins",
        )
        .into_response();
    }
    let limits = WsLimits {
        queue_max: state.config.subscriber_queue_max,
        subscriptions_max: state.config.subscriptions_per_connection_max,
        message_bytes_max: state.config.ws_message_bytes_max,
        stall_ms_max: state.config.subscriber_stall_ms_max,
        silence_ms_max: state.config.ws_silence_ms_max,
    };
    configure(ws, limits.message_bytes_max).on_upgrade(move |socket| multiplex(state, socket, limits))
}

/// Applies kappa's WebSocket sizes to an upgrade. Small socket buffers: tungstenite's
/// defaults (128 KiB each way) would cost ~130 KiB per idle subscriber; [`multiplex`]'s
/// bounded queue does the buffering. A client message over `message_bytes_max` is answered
/// by [`parse_client_message`] with an error, keeping the connection, up to
/// [`WS_READ_MESSAGE_LIMIT_FACTOR`] times the limit and at least [`WS_READ_MESSAGE_BYTES_MIN`];
/// the WebSocket layer closes the connection on a larger one.
pub fn configure(ws: WebSocketUpgrade, message_bytes_max: usize) -> WebSocketUpgrade {
    let read_max = message_bytes_max.saturating_mul(WS_READ_MESSAGE_LIMIT_FACTOR).max(WS_READ_MESSAGE_BYTES_MIN);
    ws.max_message_size(read_max)
        .max_frame_size(read_max)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(WS_WRITE_BUFFER_BYTES_MAX.max(WS_WRITE_FRAME_BYTES_MAX))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Subscribe { id: String, view: String, key: Option<String>, prefix: Option<String>, resume: Option<String> },
    Unsubscribe { id: String },
}

/// A client → server message, checked (size, shape, exactly one of key/prefix, resume
/// token) but not yet acted on.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest<T = Token> {
    Subscribe { id: String, view: String, target: Target, resume: Option<T> },
    Unsubscribe { id: String },
}

/// Why a message was refused: the subscription id it named, if it got that far, and the
/// error sent back.
pub type HandleError = (Option<String>, ApiError);

/// Parses one client message of at most `max_bytes` (`ws_message_bytes_max`), with resume
/// tokens of type `T`. Everything here is a pure function of the text: public (doc-hidden)
/// for the `subscription_parse` fuzz target.
#[doc(hidden)]
pub fn parse_client_message<T: FromStr<Err: Display>>(
    text: &str,
    max_bytes: usize,
) -> Result<ClientRequest<T>, HandleError> {
    if text.len() > max_bytes {
        return Err((
            None,
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                format!(
                    "a message may have at most {max_bytes} bytes (kappa serve: --http-ws-message-bytes-max); this one has {}",
                    text.len()
                ),
            ),
        ));
    }
    let message: ClientMessage = serde_json::from_str(text).map_err(|e| {
        (None, ApiError::bad_request("invalid_message", format!("expected {{\"op\":\"subscribe\",\"id\",\"view\",\"key\"|\"prefix\",\"resume\"?}} or {{\"op\":\"unsubscribe\",\"id\"}}: {e}")))
    })?;
    match message {
        ClientMessage::Unsubscribe { id } => Ok(ClientRequest::Unsubscribe { id }),
        ClientMessage::Subscribe { id, view, key, prefix, resume } => {
            let target = match (key, prefix) {
                (Some(key), None) => Target::Key(key),
                (None, Some(prefix)) => Target::Prefix(prefix),
                _ => {
                    return Err((
                        Some(id),
                        ApiError::bad_request(
                            "invalid_message",
                            "a subscription names exactly one of \"key\" or \"prefix\"",
                        ),
                    ));
                }
            };
            match resume.map(|t| t.parse::<T>()).transpose() {
                Ok(resume) => Ok(ClientRequest::Subscribe { id, view, target, resume }),
                Err(e) => Err((Some(id), ApiError::bad_request("invalid_token", e.to_string()))),
            }
        }
    }
}

#[derive(Serialize)]
struct Item<'a> {
    key: &'a str,
    value: &'a RawValue,
}

/// One server → client message as JSON text.
pub(crate) fn frame(id: Option<&str>, message: &LiveMessage) -> String {
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "lowercase")]
    enum Frame<'a> {
        Snapshot { id: Option<&'a str>, version: u32, items: Vec<Item<'a>>, token: String },
        Change { id: Option<&'a str>, key: &'a str, value: Option<&'a RawValue>, token: String },
        Reset { id: Option<&'a str>, reason: &'a str },
        Error { id: Option<&'a str>, code: &'a str, message: &'a str },
    }
    let frame = match message {
        LiveMessage::Snapshot { version, items, token } => Frame::Snapshot {
            id,
            version: *version,
            items: items.iter().map(|(key, value)| Item { key, value }).collect(),
            token: token.to_string(),
        },
        LiveMessage::Change { key, value, token } => {
            Frame::Change { id, key, value: value.as_deref(), token: token.to_string() }
        }
        LiveMessage::Reset { reason } => Frame::Reset { id, reason },
        LiveMessage::Error { code, message } => Frame::Error { id, code, message },
    };
    serde_json::to_string(&frame).expect("frames serialize")
}

fn error_frame(id: Option<&str>, e: &ApiError) -> String {
    frame(id, &LiveMessage::Error { code: e.code, message: e.message.clone() })
}

/// The limits of one WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// Frames queued for the client before it is cut off as a slow consumer.
    pub queue_max: usize,
    /// Subscriptions one connection may hold.
    pub subscriptions_max: usize,
    /// Largest client message (answered with an error, the connection stays).
    pub message_bytes_max: usize,
    /// How long a full queue may wait for the client to read before it is cut off as slow
    /// (and how long one frame may take to reach the socket).
    pub stall_ms_max: u64,
    /// How long a client may send nothing — not even the pong a WebSocket answers the
    /// server's pings with (every third of this) on its own — before the connection is
    /// taken for dead (a vanished network path is otherwise noticed only when TCP gives up).
    pub silence_ms_max: u64,
}

/// Where a connection's subscriptions come from: `serve`'s views, or a worker's replica.
pub trait Subscriptions: Send + Sync + 'static {
    /// What a client sends back in `resume` (printed into every snapshot and change).
    type Token: FromStr<Err: Display> + Send + 'static;

    /// Starts subscription `id`: a task sending its frames (JSON text in [`frame`]'s shapes)
    /// through `out` until `out` refuses one. Refusing (an unknown view, say) sends the error
    /// to the client for that id.
    fn subscribe(
        source: &Arc<Self>,
        id: &str,
        view: String,
        target: Target,
        resume: Option<Self::Token>,
        out: FrameSender,
    ) -> Result<tokio::task::JoinHandle<()>, ApiError>;
}

/// A connection's bounded outgoing queue, shared by its subscriptions.
#[derive(Clone)]
pub struct FrameSender {
    tx: mpsc::Sender<String>,
    /// Tells the writer the client is too slow (a permit is kept if it is busy writing).
    slow: Arc<Notify>,
    stall: Duration,
}

impl FrameSender {
    /// Queues one frame, waiting while the queue is full; false once the connection is
    /// gone, or the queue stayed full for the stall limit (the client is then sent
    /// `slow_consumer` and disconnected).
    pub async fn send(&self, text: String) -> bool {
        match queue_within(&self.tx, text, self.stall).await {
            Queued::Yes => true,
            Queued::Closed => false,
            Queued::Stalled => {
                self.slow.notify_one();
                false
            }
        }
    }
}

/// A subscription's messages, rendered by `render` onto its connection's queue.
pub struct FramedEmit<F> {
    pub out: FrameSender,
    pub render: F,
}

impl<M, F: FnMut(&M) -> String + Send> Emit<M> for FramedEmit<F> {
    fn emit(&mut self, message: M) -> impl Future<Output = bool> + Send {
        let text = (self.render)(&message);
        self.out.send(text)
    }
}

/// How [`queue_within`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    /// The receiving side is gone.
    Closed,
    /// The queue stayed full for the whole wait: the client reads too slowly or not at all.
    Stalled,
}

/// Queues `item`, waiting at most `stall` for room.
pub async fn queue_within<T>(tx: &mpsc::Sender<T>, item: T, stall: Duration) -> Queued {
    match tokio::time::timeout(stall, tx.send(item)).await {
        Ok(Ok(())) => Queued::Yes,
        Ok(Err(_)) => Queued::Closed,
        Err(_) => Queued::Stalled,
    }
}

/// Serves one WebSocket: subscribe and unsubscribe requests from `source`, every
/// subscription's frames through one bounded queue, until the client closes or falls too
/// far behind.
pub async fn multiplex<S: Subscriptions>(source: Arc<S>, socket: WebSocket, limits: WsLimits) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel::<String>(limits.queue_max);
    let slow = Arc::new(Notify::new());
    let stall = Duration::from_millis(limits.stall_ms_max);
    let out = FrameSender { tx, slow: slow.clone(), stall };
    let silence_max = Duration::from_millis(limits.silence_ms_max);
    let ping_every = silence_max / 3;
    let mut writer = tokio::spawn(write_frames(sink, rx, slow, stall, ping_every, limits.queue_max));
    let mut writer_done = false;
    let mut subscriptions: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut heard = tokio::time::Instant::now();
    let mut silence_check = tokio::time::interval_at(heard + ping_every, ping_every);
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            // The writer gave up on the client (slow, or the socket failed): stop reading too,
            // so the connection closes instead of idling until the client speaks.
            _ = &mut writer => {
                writer_done = true;
                break;
            }
            _ = silence_check.tick() => {
                if heard.elapsed() > silence_max {
                    tracing::debug!(silence_ms = heard.elapsed().as_millis() as u64, "closing a WebSocket whose client went silent");
                    break;
                }
                continue;
            }
        };
        let Some(Ok(message)) = message else { break };
        heard = tokio::time::Instant::now();
        let text = match message {
            Message::Text(text) => text.to_string(),
            Message::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        subscriptions.retain(|_, task| !task.is_finished());
        if let Err((id, e)) = handle(&source, &text, &limits, &mut subscriptions, &out) {
            out.send(error_frame(id.as_deref(), &e)).await;
        }
    }
    for (_, task) in subscriptions {
        task.abort();
    }
    drop(out);
    if !writer_done {
        let _ = writer.await;
    }
}

/// How long a closing connection waits to send its close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long a client cut off as slow has to read the error saying so before the socket is
/// dropped (it may read again, just too late).
const SLOW_GOODBYE_WAIT: Duration = Duration::from_secs(30);

/// Writes queued frames to the client until the queue closes or a subscription found the
/// queue full for the stall limit; then it tells the client why and closes.
async fn write_frames(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<String>,
    slow: Arc<Notify>,
    stall: Duration,
    ping_every: Duration,
    queue_max: usize,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let frame = tokio::select! {
            biased;
            _ = slow.notified() => break,
            text = rx.recv() => match text {
                Some(text) => Message::Text(text.into()),
                None => {
                    // The connection is over: end it with a close frame (after a client's
                    // close, the reply that completes its handshake), not a dropped socket,
                    // which clients see as an abnormal close (1006).
                    let _ = tokio::time::timeout(CLOSE_WAIT, sink.close()).await;
                    return;
                }
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        // A client that stopped reading blocks this write; the subscriptions then find the
        // queue full, and the first to wait out the stall limit says so.
        tokio::select! {
            sent = sink.send(frame) => if sent.is_err() { return },
            _ = slow.notified() => break,
        }
    }
    let message = format!(
        "this connection's queue ({queue_max} messages) stayed full for {} ms; reconnect and resume from your last token",
        stall.as_millis()
    );
    let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "slow_consumer", message);
    let goodbye = async {
        sink.send(Message::Text(error_frame(None, &e).into())).await?;
        sink.send(Message::Close(Some(CloseFrame { code: CLOSE_SLOW_CONSUMER, reason: "slow consumer".into() }))).await
    };
    let _ = tokio::time::timeout(SLOW_GOODBYE_WAIT, goodbye).await;
}

fn handle<S: Subscriptions>(
    source: &Arc<S>,
    text: &str,
    limits: &WsLimits,
    subscriptions: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    out: &FrameSender,
) -> Result<(), HandleError> {
    match parse_client_message::<S::Token>(text, limits.message_bytes_max)? {
        ClientRequest::Unsubscribe { id } => match subscriptions.remove(&id) {
            Some(task) => {
                task.abort();
                Ok(())
            }
            None => Err((
                Some(id.clone()),
                ApiError::not_found("unknown_subscription", format!("no subscription '{id}' on this connection")),
            )),
        },
        ClientRequest::Subscribe { id, view, target, resume } => {
            let fail = |e: ApiError| (Some(id.clone()), e);
            if subscriptions.contains_key(&id) {
                return Err(fail(ApiError::bad_request(
                    "duplicate_subscription",
                    format!("subscription '{id}' exists on this connection; unsubscribe first or pick another id"),
                )));
            }
            let limit = limits.subscriptions_max;
            if subscriptions.len() >= limit {
                return Err(fail(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_subscriptions",
                    format!(
                        "at most {limit} subscriptions per connection (kappa serve: --http-subscriptions-per-connection-max); unsubscribe one or open another connection"
                    ),
                )));
            }
            let task = S::subscribe(source, &id, view, target, resume, out.clone()).map_err(fail)?;
            subscriptions.insert(id, task);
            Ok(())
        }
    }
}

/// `serve`'s subscriptions: the view engine's views, followed through their changelogs.
impl Subscriptions for AppState {
    type Token = Token;

    fn subscribe(
        state: &Arc<Self>,
        id: &str,
        view: String,
        target: Target,
        resume: Option<Token>,
        out: FrameSender,
    ) -> Result<tokio::task::JoinHandle<()>, ApiError> {
        state.engine.describe(&view)?;
        let (state, id) = (state.clone(), id.to_owned());
        Ok(tokio::spawn(async move {
            let mut emit = FramedEmit { out, render: move |message: &LiveMessage| frame(Some(&id), message) };
            run_subscription(state, view, target, resume, &mut emit).await;
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    fn refused(text: &str) -> (Option<String>, &'static str) {
        let (id, e) = parse_client_message::<Token>(text, MAX).expect_err(text);
        (id, e.code)
    }

    #[test]
    fn client_messages_parse_into_requests() {
        let sub = parse_client_message::<Token>(
            r#"{"op":"subscribe","id":"s1","view":"v","prefix":"c","resume":"2.17"}"#,
            MAX,
        );
        assert_eq!(
            sub.unwrap(),
            ClientRequest::Subscribe {
                id: "s1".into(),
                view: "v".into(),
                target: Target::Prefix("c".into()),
                resume: Some(Token { version: 2, changelog: None, offset: 17 })
            }
        );
        let unsub = parse_client_message::<Token>(r#"{"op":"unsubscribe","id":"s1"}"#, MAX).unwrap();
        assert_eq!(unsub, ClientRequest::Unsubscribe { id: "s1".into() });
    }

    #[test]
    fn bad_client_messages_get_a_code_and_the_id_when_known() {
        let one_of = r#"{"op":"subscribe","id":"s1","view":"v","key":"a","prefix":"b"}"#;
        assert_eq!(refused(one_of), (Some("s1".into()), "invalid_message"));
        assert_eq!(refused(r#"{"op":"subscribe","id":"s1","view":"v"}"#), (Some("s1".into()), "invalid_message"));
        let token = r#"{"op":"subscribe","id":"s1","view":"v","key":"k","resume":"1."}"#;
        assert_eq!(refused(token), (Some("s1".into()), "invalid_token"));
        assert_eq!(refused(r#"{"op":"unsubscribe","id":"s1","x":1}"#), (None, "invalid_message"));
        assert_eq!(refused(r#"{"op":"publish"}"#), (None, "invalid_message"));
        assert_eq!(refused(&"[".repeat(10_000)), (None, "invalid_message"));
        let long = format!(r#"{{"op":"unsubscribe","id":"{}"}}"#, "x".repeat(MAX));
        assert_eq!(refused(&long), (None, "message_too_large"));
    }

    /// The `subscription_parse` fuzz corpus replays here on stable Rust: nothing panics.
    #[test]
    fn the_subscription_parse_fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/subscription_parse");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let _ = parse_client_message::<Token>(&String::from_utf8_lossy(data.get(1..).unwrap_or_default()), MAX);
            replayed += 1;
        }
        assert!(replayed > 0, "the corpus is empty");
    }
}
