//! kappa's HTTP API (axum): health and metrics, view reads, WebSocket and Server-Sent
//! Events subscriptions that resume without gaps, topics, and HTTP produce with optimistic
//! concurrency.
//!
//! Code map: `views.rs` (view reads and admin), `topics.rs` (topics: create, alter,
//! delete, and produce with the key → latest offset index), `txn_produce.rs`
//! (multi-partition produce as a Kafka transaction), `records.rs` (reading records and
//! offsets), `groups.rs` (consumer groups through [`groups::GroupAdmin`]), `live.rs` (the
//! per-view changelog hub and the subscription
//! protocol both transports share), `ws.rs`, `sse.rs`, `metrics.rs`, `error.rs`.
//! `page.html` is the page served at `/`; it imports the JavaScript client
//! (`clients/js/kappa.js`), served at `/kappa.js`.
//!
//! Invariant: this is the only crate that knows the API's JSON shapes. It reads views
//! through `kappa_views::ViewEngine` and their changelogs through the engine's backend.

pub mod error;
pub mod groups;
pub mod live;
pub mod metrics;
pub mod records;
pub mod sse;
pub mod topics;
pub mod txn_produce;
pub mod views;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use kappa_log::Log;
use kappa_views::ViewEngine;
use tokio::net::TcpListener;

pub use crate::error::ApiError;

/// [`HttpConfig::subscriber_stall_ms_max`]'s default.
pub const SUBSCRIBER_STALL_MS_MAX_DEFAULT: u64 = 10_000;
/// [`HttpConfig::ws_silence_ms_max`]'s default: pings every 30 s.
pub const WS_SILENCE_MS_MAX_DEFAULT: u64 = 90_000;

/// The HTTP API's limits and policies.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Open connections (HTTP, WebSocket and SSE together).
    pub connections_max: usize,
    /// Subscriptions one WebSocket connection may hold.
    pub subscriptions_per_connection_max: usize,
    /// The largest WebSocket message a client may send.
    pub ws_message_bytes_max: usize,
    /// Messages queued for one connection; a client that falls this far behind is sent an
    /// error and disconnected.
    pub subscriber_queue_max: usize,
    /// How long a connection's full queue waits for the client to read before the client
    /// is cut off as too slow (a burst bigger than the queue just waits for its reading).
    pub subscriber_stall_ms_max: u64,
    /// How long a WebSocket client may send nothing, not even the pongs a WebSocket sends
    /// on its own for the server's pings (every third of this), before it is taken for gone.
    pub ws_silence_ms_max: u64,
    /// Items in one snapshot (a prefix matching more is refused).
    pub snapshot_items_max: usize,
    /// Largest request body (HTTP produce, topic creation).
    pub request_body_bytes_max: usize,
    /// Items per page of `GET /v1/views/{view}/keys`.
    pub page_items_max: usize,
    /// As-of reads (`?as_of=`) running at once; each replays the view's inputs and may
    /// hold the view's whole past state in memory. More are answered 503 `as_of_busy`.
    pub as_of_concurrency_max: usize,
    /// Browser origins allowed to open WebSockets and read with CORS; `*` allows any. A
    /// request without `Origin` (not a browser) or from this server's own origin is always
    /// allowed.
    pub allowed_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            subscriptions_per_connection_max: 100,
            ws_message_bytes_max: 64 * 1024,
            subscriber_queue_max: 1024,
            subscriber_stall_ms_max: SUBSCRIBER_STALL_MS_MAX_DEFAULT,
            ws_silence_ms_max: WS_SILENCE_MS_MAX_DEFAULT,
            snapshot_items_max: 10_000,
            request_body_bytes_max: 8 * 1024 * 1024,
            page_items_max: 1000,
            as_of_concurrency_max: 2,
            allowed_origins: Vec::new(),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub log: Arc<Log>,
    pub engine: ViewEngine,
    pub config: HttpConfig,
    pub hubs: live::Hubs,
    pub produce: topics::ProduceState,
    pub metrics: metrics::Metrics,
    /// The consumer groups, when the application runs a Kafka broker.
    pub groups: Option<Arc<dyn groups::GroupAdmin>>,
    /// Writes multi-partition produce requests as transactions; without it such requests
    /// are refused.
    pub transactions: Option<txn_produce::TxnProducers>,
    connections: Arc<tokio::sync::Semaphore>,
    /// One permit per as-of read running ([`HttpConfig::as_of_concurrency_max`]).
    as_of_reads: Arc<tokio::sync::Semaphore>,
}

/// What the application adds to the API from parts this crate does not know (the Kafka
/// broker and its coordinators).
#[derive(Default)]
pub struct Extensions {
    pub metrics: Option<ExtraMetrics>,
    pub groups: Option<Arc<dyn groups::GroupAdmin>>,
    /// The transaction coordinator multi-partition HTTP produce requests go through.
    pub transactions: Option<Arc<kappa_coordinator::TxnCoordinator>>,
}

/// Writes more Prometheus text into `/metrics` (the application's other parts, such as the
/// Kafka broker, which this crate does not know).
pub type ExtraMetrics = Box<dyn Fn(&mut String) + Send + Sync>;

impl AppState {
    pub fn new(log: Arc<Log>, engine: ViewEngine, config: HttpConfig) -> Arc<Self> {
        Self::with_extensions(log, engine, config, Extensions::default())
    }

    pub fn with_metrics(
        log: Arc<Log>,
        engine: ViewEngine,
        config: HttpConfig,
        extra: Option<ExtraMetrics>,
    ) -> Arc<Self> {
        Self::with_extensions(log, engine, config, Extensions { metrics: extra, ..Extensions::default() })
    }

    pub fn with_extensions(log: Arc<Log>, engine: ViewEngine, config: HttpConfig, extensions: Extensions) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(permits(config.connections_max)),
            as_of_reads: Arc::new(permits(config.as_of_concurrency_max)),
            hubs: live::Hubs::default(),
            produce: topics::ProduceState::default(),
            metrics: metrics::Metrics { extra: extensions.metrics, ..metrics::Metrics::default() },
            groups: extensions.groups,
            transactions: extensions.transactions.map(txn_produce::TxnProducers::new),
            log,
            engine,
            config,
        })
    }

    /// A slot for one as-of read, held until the permit drops; 503 `as_of_busy` when all
    /// `as_of_concurrency_max` are taken.
    pub fn try_as_of_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.as_of_reads.clone().try_acquire_owned().map_err(|_| {
            let max = self.config.as_of_concurrency_max;
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "as_of_busy",
                format!(
                    "{max} as-of reads are running (the server's --http-as-of-concurrency-max); retry when one finishes"
                ),
            )
        })
    }

    /// Whether a browser request from `headers` may use the API.
    pub fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
        if self.config.allowed_origins.iter().any(|o| o == "*" || o == origin) {
            return true;
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
        origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
    }
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    let body_max = state.config.request_body_bytes_max;
    Router::new()
        .route("/", get(page))
        .route("/kappa.js", get(client_js))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::render))
        .route("/v1/views", get(views::list))
        .route("/v1/views/{view}", get(views::describe))
        .route("/v1/views/{view}/keys", get(views::scan))
        .route("/v1/views/{view}/keys/{key}", get(views::get_key))
        .route("/v1/views/{view}/switch", post(views::switch))
        .route("/v1/views/{view}/versions/{version}", delete(views::retire))
        .route("/v1/views/{view}/watch", get(sse::watch))
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/topics", get(topics::list).post(topics::create))
        .route("/v1/topics/{topic}", get(topics::describe).delete(topics::delete))
        .route("/v1/topics/{topic}/configs", post(topics::alter_configs))
        .route("/v1/topics/{topic}/partitions", post(topics::add_partitions))
        .route("/v1/topics/{topic}/delete-records", post(topics::delete_records))
        .route("/v1/topics/{topic}/offsets", get(records::offsets))
        .route("/v1/topics/{topic}/records", post(topics::produce))
        .route("/v1/topics/{topic}/partitions/{partition}/records", get(records::read))
        .route("/v1/groups", get(groups::list))
        .route("/v1/groups/{group}", get(groups::describe))
        .route("/v1/groups/{group}/offsets", post(groups::commit))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(state)
}

/// CORS for the allowed browser origins: preflights are answered here, and responses to an
/// allowed cross-origin request carry `Access-Control-Allow-Origin`. Other origins get no
/// CORS headers, so browsers keep their pages from reading the API.
async fn cors(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = origin.is_some() && state.origin_allowed(request.headers());
    if let (true, Some(origin)) = (request.method() == axum::http::Method::OPTIONS, &origin) {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if allowed {
            add_cors_headers(response.headers_mut(), origin.clone());
            response
                .headers_mut()
                .insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST, DELETE"));
            response.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                header::HeaderValue::from_static("content-type, last-event-id"),
            );
            response.headers_mut().insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
        }
        return response;
    }
    let mut response = next.run(request).await;
    if let (true, Some(origin)) = (allowed, origin) {
        add_cors_headers(response.headers_mut(), origin);
    }
    response
}

fn add_cors_headers(headers: &mut HeaderMap, origin: header::HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(header::VARY, header::HeaderValue::from_static("Origin"));
}

/// How long an HTTP connection may go without a request: hyper's defaults wait forever,
/// and every open connection holds one of the `connections_max` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// How long a new connection may take to send its first complete request header; it is
    /// closed after that (a client that connects and sends nothing, or too slowly).
    pub header_read_timeout_ms: u64,
    /// How long a connection may sit without a request in flight — from the end of its last
    /// response until the next request header is complete — before it is closed. Never while
    /// a request is in flight (a long-poll read, an SSE stream), nor for a WebSocket, which
    /// leaves HTTP at its upgrade (`ws_silence_ms_max` applies there).
    pub idle_connection_timeout_ms: u64,
}

/// [`HttpConfig::connections_max`]'s default (work mode's too).
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;

/// [`ConnectionTimeouts::header_read_timeout_ms`]'s default.
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// [`ConnectionTimeouts::idle_connection_timeout_ms`]'s default: longer than common client
/// pools keep an idle connection (hyper/reqwest 90 s, nginx upstream 75 s), so the client
/// closes first and never sends a request into a connection the server is closing.
pub const IDLE_CONNECTION_TIMEOUT_MS_DEFAULT: u64 = 120_000;

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            idle_connection_timeout_ms: IDLE_CONNECTION_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes — first aborting any
/// multi-partition produce transaction a crash left open — with the default
/// [`ConnectionTimeouts`].
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, state, ConnectionTimeouts::default(), shutdown).await
}

/// [`run`] with the given connection timeouts. On `shutdown` it stops accepting, lets each
/// connection finish its request in flight, and returns once all have closed (upgraded
/// WebSockets run on by themselves, as with `axum::serve`).
pub async fn run_with(
    listener: TcpListener,
    state: Arc<AppState>,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(transactions) = &state.transactions {
        transactions.recover().await.map_err(std::io::Error::other)?;
    }
    let limiter = state.connections.clone();
    serve_limited(listener, router(state), limiter, timeouts, shutdown).await
}

/// Serves any `app` as [`run_with`] serves the API: at most `connections_max` connections
/// at once (more wait in the kernel's backlog), each closed after `timeouts`, until
/// `shutdown` completes (work mode's HTTP API uses it too).
pub async fn serve_router(
    listener: TcpListener,
    app: Router,
    connections_max: usize,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limiter = Arc::new(permits(connections_max));
    serve_limited(listener, app, limiter, timeouts, shutdown).await
}

/// A semaphore of `count` permits; a count past tokio's maximum (~2^61, which would panic)
/// is that maximum: no limit in practice.
fn permits(count: usize) -> tokio::sync::Semaphore {
    tokio::sync::Semaphore::new(count.min(tokio::sync::Semaphore::MAX_PERMITS))
}

async fn serve_limited(
    listener: TcpListener,
    app: Router,
    limiter: Arc<tokio::sync::Semaphore>,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut listener = LimitedListener { inner: listener, limiter };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a receiver; `closed` resolves when the last one ends.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            stream = listener.accept() => stream,
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(stream, app.clone(), timeouts, stop_rx.clone(), open_rx.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// Serves one connection (HTTP/1.1, upgradable to a WebSocket) until it closes, times out
/// (see [`ConnectionTimeouts`]) or finishes its request in flight after `stop`.
async fn serve_connection(
    stream: LimitedStream,
    app: Router,
    timeouts: ConnectionTimeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _open: tokio::sync::watch::Receiver<()>,
) {
    use hyper::service::Service as _;
    let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = {
        let requested = requested.clone();
        let app = hyper_util::service::TowerToHyperService::new(app);
        hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
            requested.store(true, std::sync::atomic::Ordering::Relaxed);
            app.call(request)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper runs its header read timer from the moment a connection waits for a request
    // head, including between requests: that is the idle timeout. A new connection's first
    // header gets the (shorter) header read timeout below.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(timeouts.idle_connection_timeout_ms));
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    // Ends when the first request header is late; never once it came.
    let first_header = async {
        tokio::time::sleep(Duration::from_millis(timeouts.header_read_timeout_ms)).await;
        if requested.load(std::sync::atomic::Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let mut first_header = std::pin::pin!(first_header);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "an HTTP connection ended with an error");
                }
                return;
            }
            () = &mut first_header => {
                tracing::debug!(timeout_ms = timeouts.header_read_timeout_ms, "closing an HTTP connection that sent no complete request header in time");
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Accepts at most `connections_max` connections at once; further ones wait in the
/// kernel's backlog until one closes.
struct LimitedListener {
    inner: TcpListener,
    limiter: Arc<tokio::sync::Semaphore>,
}

/// A connection holding one slot of the limit until it closes.
pub struct LimitedStream {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl LimitedListener {
    async fn accept(&mut self) -> LimitedStream {
        let permit = self.limiter.clone().acquire_owned().await.expect("the connection semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return LimitedStream { stream, _permit: permit };
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl tokio::io::AsyncRead for LimitedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Liveness: 503 `failed` only when the log refuses writes (after a failed fsync: a restart
/// is what recovers it); otherwise 200, `ok`, or `degraded` listing every view version that
/// stopped or waits to restart, with why. A stopped view is not a reason to restart the
/// server: it would stop at the same event again, and take the broker down meanwhile.
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let (_, body) = health_report(&state);
    let code = if body["status"] == "failed" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, axum::Json(body))
}

/// Readiness: as `/health`, but 503 also while a view's reads cannot follow its inputs — its
/// serving version is stopped or waits to restart (reads frozen where it stopped), or nothing
/// serves it and no version is left building (reads answer `view_not_ready` until an operator
/// acts): take the server out of rotation.
async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let (reads_stuck, body) = health_report(&state);
    let ready = body["status"] != "failed" && !reads_stuck;
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, axum::Json(body))
}

/// The health body, and whether some view's reads are stuck (see `ready`).
fn health_report(state: &AppState) -> (bool, serde_json::Value) {
    if let Err(e) = state.log.health().check() {
        return (false, serde_json::json!({"status": "failed", "reason": e.to_string()}));
    }
    let views = state.engine.list();
    let stopped: Vec<serde_json::Value> = views
        .iter()
        .flat_map(|view| view.versions.iter().map(move |v| (view, v)))
        .filter_map(|(view, v)| {
            let reason = stopped_reason(&v.status.phase)?;
            let phase = v.status.phase.name();
            Some(serde_json::json!({"view": view.name, "version": v.version, "phase": phase, "serving": v.serving, "error": reason}))
        })
        .collect();
    if stopped.is_empty() {
        return (false, serde_json::json!({"status": "ok"}));
    }
    let reads_stuck = views.iter().any(|view| {
        let stopped = |v: &kappa_views::VersionInfo| stopped_reason(&v.status.phase).is_some();
        match view.versions.iter().find(|v| v.serving) {
            Some(serving) => stopped(serving),
            // Nothing serves: stuck unless a version of this build is still building.
            None => !view.versions.iter().any(|v| v.running && !stopped(v)),
        }
    });
    (reads_stuck, serde_json::json!({"status": "degraded", "views_failed": stopped}))
}

/// Why a version is stopped (failed, or waiting to restart), or `None` while it runs.
fn stopped_reason(phase: &kappa_views::Phase) -> Option<&str> {
    match phase {
        kappa_views::Phase::Failed(reason) | kappa_views::Phase::Restarting { reason, .. } => Some(reason),
        _ => None,
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no_route", "no such endpoint; the API is under /v1 (see README.md: HTTP API)")
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("page.html"))
}

/// The JavaScript client (`clients/js/kappa.js`), which the page imports; an app on the
/// same origin can `import { Kappa } from '/kappa.js'` too.
async fn client_js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../../../clients/js/kappa.js"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_limit_past_tokios_maximum_is_that_maximum_not_a_panic() {
        assert_eq!(super::permits(usize::MAX).available_permits(), tokio::sync::Semaphore::MAX_PERMITS);
        assert_eq!(super::permits(3).available_permits(), 3);
    }
}
