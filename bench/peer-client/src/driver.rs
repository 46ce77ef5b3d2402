//! The publishing loop shared by all systems: a writer thread keeps up to `window`
//! requests in flight (or sends at a fixed rate), the calling thread reads the acks in
//! order and times each one.

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};

/// Bytes buffered by the writer before it writes them out (when not flushing per request).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

pub struct Outcome {
    pub messages: u64,
    /// Payload bytes (messages × size).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-request ack latency, only for the latency workload.
    pub latencies_us: Vec<f64>,
}

/// Encodes request `i` of a run; one request gets exactly one ack.
pub trait Encoder: Send + 'static {
    /// Appends request `i` to `out` and returns how many messages it carries.
    fn encode(&mut self, i: u64, out: &mut Vec<u8>) -> u64;
}

/// Reads the next ack, failing on a negative one.
pub trait AckReader {
    fn read_ack(&mut self) -> Result<()>;
}

pub struct Plan {
    pub requests: u64,
    pub window: usize,
    /// Messages per second, open loop; 0 = closed loop (window only).
    pub rate: u64,
    pub time_limit: Duration,
    pub size: usize,
    pub record_latency: bool,
}

impl Plan {
    /// The plan `args` ask for: `requests` requests, the system's default window unless set.
    pub fn new(args: &crate::args::Args, requests: u64, default_window: usize) -> Self {
        Plan {
            requests,
            window: args.window_or(default_window),
            rate: args.rate,
            time_limit: Duration::from_secs_f64(args.seconds),
            size: args.size,
            record_latency: args.workload == "latency",
        }
    }
}

/// What the writer hands the reader per request: when it was (to be) sent and its messages.
type Token = Option<(Instant, u64)>;

pub fn publish(stream: &TcpStream, encoder: impl Encoder, acks: &mut impl AckReader, plan: &Plan) -> Result<Outcome> {
    if plan.window == 1 && plan.rate == 0 {
        return lockstep(stream, encoder, acks, plan);
    }
    let (tx, rx) = sync_channel::<Token>(plan.window.max(1) - 1);
    let writer_stream = stream.try_clone()?;
    let start = Instant::now();
    let (requests, rate, limit) = (plan.requests, plan.rate, plan.time_limit);
    let flush_each = rate > 0 || plan.window == 1;
    let writer = thread::spawn(move || write_loop(writer_stream, encoder, tx, requests, rate, limit, flush_each));
    let (messages, latencies_us) = read_loop(&rx, acks, plan.record_latency)?;
    let elapsed = start.elapsed();
    writer.join().map_err(|_| anyhow!("writer thread panicked"))??;
    Ok(Outcome { messages, bytes: messages * plan.size as u64, elapsed, latencies_us })
}

/// One request at a time on one thread: send, read the ack, repeat. A writer thread would
/// add a thread hand-off per request to the client's own latency and CPU.
fn lockstep(stream: &TcpStream, mut encoder: impl Encoder, acks: &mut impl AckReader, plan: &Plan) -> Result<Outcome> {
    let mut stream = stream;
    let mut buf = Vec::new();
    let (mut messages, mut latencies) = (0, Vec::new());
    let start = Instant::now();
    for i in 0..plan.requests {
        if start.elapsed() > plan.time_limit {
            break;
        }
        buf.clear();
        let count = encoder.encode(i, &mut buf);
        let sent = Instant::now();
        stream.write_all(&buf).context("writing a request")?;
        acks.read_ack()?;
        if plan.record_latency {
            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
        }
        messages += count;
    }
    Ok(Outcome { messages, bytes: messages * plan.size as u64, elapsed: start.elapsed(), latencies_us: latencies })
}

fn read_loop(rx: &Receiver<Token>, acks: &mut impl AckReader, record: bool) -> Result<(u64, Vec<f64>)> {
    let mut messages = 0;
    let mut latencies = Vec::new();
    while let Ok(Some((sent, count))) = rx.recv() {
        acks.read_ack()?;
        messages += count;
        if record {
            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((messages, latencies))
}

fn write_loop(
    mut stream: TcpStream,
    mut encoder: impl Encoder,
    tx: SyncSender<Token>,
    requests: u64,
    rate: u64,
    limit: Duration,
    flush_each: bool,
) -> Result<()> {
    let mut buf = Vec::with_capacity(2 * WRITE_BUFFER_BYTES);
    let start = Instant::now();
    let mut sent_messages = 0u64;
    for i in 0..requests {
        let mut at = Instant::now();
        if at - start > limit {
            break;
        }
        if rate > 0 {
            // Open loop: request i is due at start + messages_before / rate, whatever the acks do.
            let due = start + Duration::from_secs_f64(sent_messages as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(at) {
                thread::sleep(wait);
            }
            at = due;
        }
        let before = buf.len();
        let count = encoder.encode(i, &mut buf);
        sent_messages += count;
        // The token goes first so the reader always knows about a request before its ack.
        match tx.try_send(Some((at, count))) {
            Ok(()) => {}
            Err(TrySendError::Full(token)) => {
                // Window full: what is buffered must go out before we wait for acks. The new
                // request is held back so it does not exceed the window.
                stream.write_all(&buf[..before]).context("writing requests")?;
                buf.drain(..before);
                // Closed loop: the request is sent now, after the wait, so time it from here.
                let token = if rate > 0 { token } else { Some((Instant::now(), count)) };
                tx.send(token).map_err(|_| anyhow!("reader stopped"))?;
            }
            Err(TrySendError::Disconnected(_)) => return Err(anyhow!("reader stopped")),
        }
        if flush_each || buf.len() >= WRITE_BUFFER_BYTES {
            stream.write_all(&buf).context("writing requests")?;
            buf.clear();
        }
    }
    stream.write_all(&buf).context("writing requests")?;
    let _ = tx.send(None);
    Ok(())
}

/// Consumes `n` bytes from `reader` without copying them anywhere (payloads a read
/// workload only counts).
pub fn skip(reader: &mut impl BufRead, n: usize) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let available = reader.fill_buf()?.len();
        ensure!(available > 0, "the server closed the connection");
        let step = available.min(left);
        reader.consume(step);
        left -= step;
    }
    Ok(())
}
