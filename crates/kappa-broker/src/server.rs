//! The TCP server: accept loop, per-connection request pipeline, graceful shutdown.
//!
//! Shape borrowed from tokio's mini-redis: a semaphore bounds connections, a watch channel
//! tells connections to stop reading, and each connection holds a clone of an mpsc sender
//! so `run` knows when the last one has finished.
//!
//! Per connection, a reader task reads and decodes frames ahead into a bounded queue (Kafka
//! clients pipeline) while the connection task handles them **one at a time, in order** and
//! writes each response before taking the next. Sequential handling mirrors Kafka's channel
//! muting: pipelined produces to one partition must append in the order they were sent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestHeader};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::api_versions::{self, API_SUPPORT};
use crate::error::ProtocolError;
use crate::frame::{DEFAULT_REQUEST_BYTES_MAX, Frame, FrameBudget, read_frame};
use crate::request::{Request, Response, decode_request, encode_response, expects_response};

/// A boxed, sendable future, so `Handler` stays object-safe without async-trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The connection a request arrived on. Ids grow in accept order, so a higher id is a
/// newer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub connection_id: u64,
    pub addr: SocketAddr,
}

/// A handler's answer: ready now, or still completing (e.g. waiting for an fsync).
pub enum Reply {
    Ready(Response),
    Pending(BoxFuture<'static, Response>),
}

/// Answers decoded requests. ApiVersions never reaches it (the protocol layer answers).
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, request: Request, header: &'a RequestHeader, peer: &'a Peer) -> BoxFuture<'a, Response>;

    /// Two-phase handling. The returned future runs in request order, one request of a
    /// connection at a time (what must happen in order, such as appends, happens here);
    /// the [`Reply`] it yields may still be pending, and the next request starts while it
    /// completes. Replies are written in request order. The default does all the work in
    /// the first phase.
    fn handle_ordered<'a>(
        &'a self,
        request: Request,
        header: &'a RequestHeader,
        peer: &'a Peer,
    ) -> BoxFuture<'a, Reply> {
        Box::pin(async move { Reply::Ready(self.handle(request, header, peer).await) })
    }
}

/// What the connection task hands its writer, in request order.
enum Outgoing {
    Frame(Bytes),
    Reply { header: RequestHeader, wants_answer: bool, reply: Reply },
}

/// Named limits of the listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request frame accepted (Kafka: socket.request.max.bytes).
    pub request_bytes_max: usize,
    /// Open connections; more are accepted and closed at once (Kafka: max.connections).
    pub connections_max: usize,
    /// Requests read ahead of the one being handled, per connection.
    pub in_flight_per_connection: usize,
    /// Memory for frames being read or waiting to be handled, all connections together
    /// (Kafka: queued.max.request.bytes); a frame's first 64 KiB are not counted. Raised to
    /// `request_bytes_max` if below it, so the largest frame can always be read.
    pub request_bytes_buffered_max: usize,
    /// Once a frame's size has arrived, its body must arrive within this, or the
    /// connection is closed (a stalled partial frame would hold its memory until
    /// `idle_timeout`). Kafka clients give up on a request after 30 s anyway.
    pub frame_read_timeout: Duration,
    /// A connection with no complete request for this long is closed
    /// (Kafka: connections.max.idle.ms).
    pub idle_timeout: Duration,
    /// How long shutdown waits for connections to finish their in-flight requests; a peer
    /// that stopped reading could otherwise hold shutdown forever.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: DEFAULT_REQUEST_BYTES_MAX,
            connections_max: 1024,
            in_flight_per_connection: 16,
            request_bytes_buffered_max: 128 * 1024 * 1024,
            frame_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves Kafka connections on `listener` until `shutdown` completes, then stops accepting,
/// lets every connection finish the requests it has read, and returns.
pub async fn run(listener: TcpListener, handler: Arc<dyn Handler>, limits: Limits, shutdown: impl Future) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let budget = FrameBudget::new(limits.request_bytes_buffered_max.max(limits.request_bytes_max));
    let limits = Arc::new(limits);
    let mut next_connection_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(%peer, max = limits.connections_max, "connections_max reached, closing new connection");
            continue;
        };
        next_connection_id += 1;
        let conn = Connection {
            handler: handler.clone(),
            limits: limits.clone(),
            budget: budget.clone(),
            stop: stop_rx.clone(),
            _done: done_tx.clone(),
            _permit: permit,
            peer,
            id: next_connection_id,
        };
        tokio::spawn(conn.serve(socket));
    }
    drop(listener);
    info!("kafka listener stopped accepting; draining connections");
    let _ = stop_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(limits.shutdown_grace, done_rx.recv()).await.is_err() {
        warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace period");
    }
}

struct Connection {
    handler: Arc<dyn Handler>,
    limits: Arc<Limits>,
    budget: FrameBudget,
    stop: watch::Receiver<bool>,
    /// Dropped when the connection ends; `run` waits for all of them.
    _done: mpsc::Sender<()>,
    _permit: OwnedSemaphorePermit,
    peer: SocketAddr,
    id: u64,
}

/// What the reader hands the connection task: the request and the frame budget it holds
/// until handled (its records still point into the frame).
type Decoded = (RequestHeader, Request, Option<OwnedSemaphorePermit>);

impl Connection {
    async fn serve(self, socket: TcpStream) {
        let _ = socket.set_nodelay(true);
        let (read, write) = socket.into_split();
        let in_flight = self.limits.in_flight_per_connection.max(1);
        let (tx, mut rx) = mpsc::channel::<Decoded>(in_flight);
        let reader =
            tokio::spawn(read_loop(read, tx, self.limits.clone(), self.budget.clone(), self.stop.clone(), self.peer));
        // Replies waiting to be written are bounded like the requests read ahead.
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(in_flight);
        let writer = tokio::spawn(write_loop(write, out_rx, self.peer));
        while let Some((header, request, _budget)) = rx.recv().await {
            let outgoing = if header.request_api_key == ApiKey::ApiVersions as i16 {
                Outgoing::Frame(api_versions::answer(&API_SUPPORT, &header))
            } else {
                let wants_answer = expects_response(&request);
                let peer = Peer { connection_id: self.id, addr: self.peer };
                let reply = self.handler.handle_ordered(request, &header, &peer).await;
                Outgoing::Reply { header, wants_answer, reply }
            };
            if out_tx.send(outgoing).await.is_err() {
                break; // the writer stopped: the connection is closing
            }
        }
        drop(out_tx);
        reader.abort();
        let _ = writer.await;
        debug!(peer = %self.peer, "connection closed");
    }
}

/// Completes replies in request order and writes them; stops at the first failure.
async fn write_loop(write: OwnedWriteHalf, mut out_rx: mpsc::Receiver<Outgoing>, peer: SocketAddr) {
    let mut writer = BufWriter::new(write);
    while let Some(outgoing) = out_rx.recv().await {
        let frame = match outgoing {
            Outgoing::Frame(frame) => Ok(Some(frame)),
            Outgoing::Reply { header, wants_answer, reply } => {
                let response = match reply {
                    Reply::Ready(response) => response,
                    Reply::Pending(pending) => pending.await,
                };
                wants_answer.then(|| encode_response(&header, &response)).transpose()
            }
        };
        let written = match frame {
            Ok(Some(frame)) => write_frame(&mut writer, &frame).await.map_err(ProtocolError::from),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            warn!(%peer, error = %e, "closing connection");
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Warnings about misbehaving peers logged per second; the rest go to debug. A flood of
/// malformed frames must not turn into a flood of log writes (they block the async worker
/// that makes them, stalling every connection on it — torture F2).
const PEER_WARNINGS_PER_SECOND_MAX: u32 = 10;

fn peer_warning(peer: SocketAddr, error: &dyn std::fmt::Display, what: &'static str) {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    static WINDOW_SECOND: AtomicU64 = AtomicU64::new(0);
    static IN_WINDOW: AtomicU32 = AtomicU32::new(0);
    static SUPPRESSED: AtomicU32 = AtomicU32::new(0);
    let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if WINDOW_SECOND.swap(second, Ordering::Relaxed) != second {
        IN_WINDOW.store(0, Ordering::Relaxed);
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            warn!(suppressed, "more peers sent bad frames; those warnings were logged at debug level");
        }
    }
    if IN_WINDOW.fetch_add(1, Ordering::Relaxed) < PEER_WARNINGS_PER_SECOND_MAX {
        warn!(%peer, error = %error, "{what}");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        debug!(%peer, error = %error, "{what}");
    }
}

/// Writes and flushes one frame: a finished reply never waits behind a pending one.
async fn write_frame(writer: &mut BufWriter<OwnedWriteHalf>, frame: &[u8]) -> std::io::Result<()> {
    writer.write_all(frame).await?;
    writer.flush().await
}

/// Reads and decodes frames until EOF, a bad frame, idle timeout or shutdown; dropping
/// `tx` then lets the connection task finish what was already queued and close.
async fn read_loop(
    mut read: OwnedReadHalf,
    tx: mpsc::Sender<Decoded>,
    limits: Arc<Limits>,
    budget: FrameBudget,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = tokio::time::timeout(
                limits.idle_timeout,
                read_frame(&mut read, limits.request_bytes_max, &budget, limits.frame_read_timeout),
            ) => r,
        };
        let frame = match next {
            Err(_) => return debug!(%peer, "idle timeout"),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(Frame { bytes, budget }))) => (bytes, budget),
            Ok(Err(e)) => return peer_warning(peer, &e, "bad frame, closing connection"),
        };
        let (frame, held) = frame;
        match decode_request(frame) {
            Ok((header, request)) => {
                if tx.send((header, request, held)).await.is_err() {
                    return;
                }
            }
            Err(e) => return peer_warning(peer, &e, "undecodable request, closing connection"),
        }
    }
}
