//! The TCP server: accept loop, per-connection request pipeline, graceful shutdown.
//!
//! Shape borrowed from tokio's mini-redis: a semaphore bounds connections, a watch channel
//! tells connections to stop reading, and each connection holds a clone of an mpsc sender
//! so `run` knows when the last one has finished.
//!
//! Per connection, a reader task reads and decodes frames ahead into a bounded queue (Kafka
//! clients pipeline) while the connection task handles them **one at a time, in order**.
//! Sequential handling mirrors Kafka's channel muting: pipelined produces to one partition
//! must append in the order they were sent. A reply may still be pending (a produce waiting
//! for its fsync) while the next request is handled; the connection task writes replies
//! itself, in request order, as they complete.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseKind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::api_versions::{self, API_SUPPORT};
use crate::error::ProtocolError;
use crate::frame::{DEFAULT_REQUEST_BYTES_MAX, Frame, FrameBudget, ResponseFrame, read_frame};
use crate::request::{Request, Response, decode_request, encode_response_frame, expects_response, partitions_named};

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
// Not boxed: `Ready` is the common case, and boxing it would allocate once per request.
#[allow(clippy::large_enum_variant)]
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

/// Named limits of the listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request frame accepted (Kafka: socket.request.max.bytes).
    pub request_bytes_max: usize,
    /// Open connections; more are accepted and closed at once (Kafka: max.connections).
    pub connections_max: usize,
    /// Requests read ahead of the one being handled, per connection.
    pub in_flight_per_connection: usize,
    /// Replies still completing (produces waiting for their fsync) per connection before it
    /// takes no more requests. They are one group commit: the more requests one fsync covers,
    /// the closer a pipelining producer gets to the disk's sequential bandwidth. A waiting
    /// reply holds no request bytes (answers that are complete still count against
    /// `in_flight_per_connection`, as they may be large).
    pub pending_replies_per_connection: usize,
    /// Memory for frames being read or waiting to be handled, all connections together
    /// (Kafka: queued.max.request.bytes); a frame's first 64 KiB are not counted. Raised to
    /// `request_bytes_max` if below it, so the largest frame can always be read.
    pub request_bytes_buffered_max: usize,
    /// Once a frame's first byte has arrived, the rest of its 4-byte size must arrive within
    /// this, and then its body within this again, or the connection is closed (a stalled
    /// partial frame would hold its memory; `idle_timeout` bounds only the wait for a first
    /// byte). Kafka clients give up on a request after 30 s anyway.
    pub frame_read_timeout: Duration,
    /// A reply the peer takes none of for this long closes the connection: a peer that
    /// pipelines requests and never reads would otherwise hold its replies (up to
    /// `in_flight_per_connection` of them, each up to a 55 MiB fetch answer) and a
    /// connection slot forever. A slow reader that keeps taking bytes is not cut off, and
    /// the default is `idle_timeout`'s 10 min: a consumer that prefetched a large answer may
    /// leave it unread while its application works (for up to `max.poll.interval.ms`).
    pub response_write_timeout: Duration,
    /// A connection that starts no request for this long is closed (Kafka:
    /// connections.max.idle.ms). The time a request waits for its answer counts (a long
    /// JoinGroup's connection may close once answered); a request's bytes, once begun, are
    /// under `frame_read_timeout` instead.
    pub idle_timeout: Duration,
    /// Topics, partitions, groups or config resources one request may name
    /// ([`partitions_named`]); a request naming more closes its connection, logged. Kafka
    /// has no such limit, only the frame size, but a client naming 100,000 partitions in one
    /// request is already far beyond one node; the limit bounds the work one request makes.
    pub request_partitions_max: usize,
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
            pending_replies_per_connection: 256,
            request_bytes_buffered_max: 128 * 1024 * 1024,
            frame_read_timeout: Duration::from_secs(30),
            response_write_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(600),
            request_partitions_max: 100_000,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves Kafka connections on `listener` until `shutdown` completes, then stops accepting,
/// lets every connection finish the requests it has read, and returns.
pub async fn run(listener: TcpListener, handler: Arc<dyn Handler>, limits: Limits, shutdown: impl Future) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    // Past tokio's maximum (~2^61, which would panic) a limit is no limit in practice.
    let permits = Arc::new(Semaphore::new(limits.connections_max.min(Semaphore::MAX_PERMITS)));
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
        // A bounded channel counts with a semaphore: no more than its maximum.
        let in_flight = self.limits.in_flight_per_connection.clamp(1, Semaphore::MAX_PERMITS);
        let (tx, mut rx) = mpsc::channel::<Decoded>(in_flight);
        let reader =
            tokio::spawn(read_loop(read, tx, self.limits.clone(), self.budget.clone(), self.stop.clone(), self.peer));
        let mut replies = Replies::new(
            write,
            self.limits.pending_replies_per_connection.max(in_flight),
            in_flight,
            self.limits.response_write_timeout,
        );
        let peer = Peer { connection_id: self.id, addr: self.peer };
        'requests: loop {
            // Waiting for the next request, write replies as they complete.
            let next = tokio::select! {
                biased;
                () = replies.oldest_complete(), if replies.waiting() => {
                    if let Err(e) = replies.write_ready().await {
                        break 'requests replies.close(self.peer, &e);
                    }
                    continue;
                }
                next = rx.recv() => next,
            };
            let Some((header, request, _budget)) = next else { break };
            let reply = if header.request_api_key == ApiKey::ApiVersions as i16 {
                Queued::Frame(api_versions::answer(&API_SUPPORT, &header).into())
            } else {
                let wants_answer = expects_response(&request);
                let reply = {
                    let mut ordered = std::pin::pin!(self.handler.handle_ordered(request, &header, &peer));
                    // A long first phase (a fetch waiting for data) must not hold back the
                    // replies of earlier requests that complete meanwhile.
                    loop {
                        tokio::select! {
                            biased;
                            reply = &mut ordered => break reply,
                            () = replies.oldest_complete(), if replies.waiting() => {
                                if let Err(e) = replies.write_ready().await {
                                    break 'requests replies.close(self.peer, &e);
                                }
                            }
                        }
                    }
                };
                Queued::Reply { header, wants_answer, reply }
            };
            if let Err(e) = replies.push(reply).await {
                replies.close(self.peer, &e);
                break;
            }
        }
        reader.abort();
        // Requests already handled still get their replies (a produce's fsync included).
        replies.finish(self.peer).await;
        debug!(peer = %self.peer, "connection closed");
    }
}

/// What a connection owes its peer, in request order.
// Not boxed: one of these per request in flight; boxing the reply would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Frame(ResponseFrame),
    Reply { header: RequestHeader, wants_answer: bool, reply: Reply },
}

/// Replies not yet written, oldest first, and the socket they go to. The connection task
/// writes them itself: a separate writer task would cost a task wake-up (often a thread
/// hand-off) per request, most of a small request's latency.
struct Replies {
    writer: BufWriter<OwnedWriteHalf>,
    queue: VecDeque<Queued>,
    /// Replies waiting at most; the next request waits for the oldest to be written.
    queued_max: usize,
    /// Complete (possibly large) answers waiting behind an incomplete one, at most.
    ready_max: usize,
    /// Longest the peer may take no bytes of a reply.
    write_timeout: Duration,
}

impl Replies {
    fn new(write: OwnedWriteHalf, queued_max: usize, ready_max: usize, write_timeout: Duration) -> Self {
        Self { writer: BufWriter::new(write), queue: VecDeque::new(), queued_max, ready_max, write_timeout }
    }

    /// Writes `bytes`, failing once the peer has taken none of them for `write_timeout`.
    async fn write_within(&mut self, mut bytes: &[u8]) -> Result<(), ProtocolError> {
        while !bytes.is_empty() {
            let written = tokio::time::timeout(self.write_timeout, self.writer.write(bytes))
                .await
                .map_err(|_| ProtocolError::ResponseWriteTimeout { timeout: self.write_timeout })??;
            if written == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            bytes = &bytes[written..];
        }
        Ok(())
    }

    fn full(&self) -> bool {
        let ready =
            || self.queue.iter().filter(|q| !matches!(q, Queued::Reply { reply: Reply::Pending(_), .. })).count();
        self.queue.len() >= self.queued_max || ready() >= self.ready_max
    }

    fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Queues a reply and writes whatever is complete at the head of the queue; waits for
    /// the oldest while the queue is full.
    async fn push(&mut self, queued: Queued) -> Result<(), ProtocolError> {
        self.queue.push_back(queued);
        self.write_ready().await?;
        while self.full() {
            self.oldest_complete().await;
            self.write_ready().await?;
        }
        Ok(())
    }

    /// Waits until the oldest reply is complete. Cancel-safe (it only waits), so it can race
    /// the next request; the writing happens in [`Self::write_ready`], which is never raced:
    /// a write cut off half-way would corrupt the stream.
    async fn oldest_complete(&mut self) {
        if let Some(Queued::Reply { reply, .. }) = self.queue.front_mut()
            && let Reply::Pending(pending) = reply
        {
            *reply = Reply::Ready(pending.as_mut().await);
        }
    }

    /// Writes every complete reply at the head of the queue, then flushes them together.
    async fn write_ready(&mut self) -> Result<(), ProtocolError> {
        let mut wrote = false;
        while let Some(front) = self.queue.front_mut() {
            if let Queued::Reply { reply, .. } = front
                && let Reply::Pending(pending) = reply
            {
                match poll_once(pending).await {
                    Some(response) => *reply = Reply::Ready(response),
                    None => break,
                }
            }
            let frame = match self.queue.pop_front().expect("front exists") {
                Queued::Frame(frame) => Some(frame),
                Queued::Reply { header, wants_answer, reply: Reply::Ready(response) } => {
                    if !wants_answer {
                        refuse_failed_unanswered(&response)?;
                    }
                    wants_answer.then(|| encode_response_frame(&header, &response)).transpose()?
                }
                Queued::Reply { reply: Reply::Pending(_), .. } => unreachable!("completed above"),
            };
            if let Some(frame) = frame {
                for part in &frame.parts {
                    self.write_within(part).await?;
                }
                wrote = true;
            }
        }
        if wrote {
            // What is buffered is at most the BufWriter's capacity (8 KiB).
            tokio::time::timeout(self.write_timeout, self.writer.flush())
                .await
                .map_err(|_| ProtocolError::ResponseWriteTimeout { timeout: self.write_timeout })??;
        }
        Ok(())
    }

    /// Waits for and writes every queued reply (the connection is closing).
    async fn finish(&mut self, peer: SocketAddr) {
        while self.waiting() {
            self.oldest_complete().await;
            if let Err(e) = self.write_ready().await {
                return self.close(peer, &e);
            }
        }
        let _ = tokio::time::timeout(self.write_timeout, self.writer.shutdown()).await;
    }

    /// Logs why the connection closes early; the queued replies are dropped.
    fn close(&mut self, peer: SocketAddr, error: &ProtocolError) {
        warn!(%peer, error = %error, "closing connection");
        self.queue.clear();
    }
}

/// Polls a future once: its output if it is ready now.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *future).poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
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

/// Read buffer per connection (larger frame bodies are read around it, straight into the
/// frame).
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Reads and decodes frames until EOF, a bad frame, idle timeout or shutdown; dropping
/// `tx` then lets the connection task finish what was already queued and close.
async fn read_loop(
    read: OwnedReadHalf,
    tx: mpsc::Sender<Decoded>,
    limits: Arc<Limits>,
    budget: FrameBudget,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    // A small request's size prefix and body then arrive in one read system call, not two.
    let mut read = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = next_frame(&mut read, &limits, &budget) => r,
        };
        let frame = match next {
            Err(_) => return debug!(%peer, "idle timeout"),
            Ok(Ok(None)) => return,
            Ok(Ok(Some(Frame { bytes, budget }))) => (bytes, budget),
            Ok(Err(e)) => return peer_warning(peer, &e, "bad frame, closing connection"),
        };
        let (frame, held) = frame;
        match decode_request(frame) {
            Ok((_, request)) if partitions_named(&request) > limits.request_partitions_max => {
                let error = ProtocolError::TooManyPartitions {
                    named: partitions_named(&request),
                    max: limits.request_partitions_max,
                };
                return peer_warning(peer, &error, "request too large to handle, closing connection");
            }
            Ok((header, request)) => {
                if tx.send((header, request, held)).await.is_err() {
                    return;
                }
            }
            Err(e) => return peer_warning(peer, &e, "undecodable request, closing connection"),
        }
    }
}

/// The next request frame: `idle_timeout` bounds only the wait for its first byte (Kafka's
/// connections.max.idle.ms); once it has begun, `read_frame` gives its size and then its
/// body `frame_read_timeout` each, whatever the idle timeout is. Err: idle.
async fn next_frame(
    read: &mut BufReader<OwnedReadHalf>,
    limits: &Limits,
    budget: &FrameBudget,
) -> Result<Result<Option<Frame>, ProtocolError>, tokio::time::error::Elapsed> {
    match tokio::time::timeout(limits.idle_timeout, read.fill_buf()).await? {
        Ok([]) => return Ok(Ok(None)),
        Ok(_) => {}
        Err(e) => return Ok(Err(e.into())),
    }
    Ok(read_frame(read, limits.request_bytes_max, budget, limits.frame_read_timeout).await)
}

/// An unanswered (acks=0) produce that failed ends the connection, after the replies
/// before it were written.
fn refuse_failed_unanswered(response: &ResponseKind) -> Result<(), ProtocolError> {
    let ResponseKind::Produce(produce) = response else { return Ok(()) };
    for topic in &produce.responses {
        if let Some(p) = topic.partition_responses.iter().find(|p| p.error_code != 0) {
            return Err(ProtocolError::UnansweredProduceFailed {
                code: p.error_code,
                topic: topic.name.0.to_string(),
                partition: p.index,
            });
        }
    }
    Ok(())
}
