//! NATS JetStream over the raw text protocol: PUB with a reply subject (JetStream answers
//! each stored message with a `{"stream":..,"seq":..}` ack there), and a durable pull
//! consumer with `ack_policy: none` for reads, two pull requests kept outstanding.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::args::Args;
use crate::driver::{self, AckReader, Encoder, Outcome, Plan};

const ACK_INBOX: &str = "_INBOX.ack";
const CONTROL_INBOX: &str = "_INBOX.ctl";
const READ_INBOX: &str = "_INBOX.read";
const ACK_SID: u32 = 1;
const CONTROL_SID: u32 = 2;
const READ_SID: u32 = 3;
/// Largest message payload accepted from the server (its default max_payload is 1 MiB).
const PAYLOAD_BYTES_MAX: usize = 8 << 20;

/// One message from the server (MSG or HMSG); the payload is in `Conn::payload`.
struct Msg {
    sid: u32,
    has_headers: bool,
}

struct Conn {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
    payload: Vec<u8>,
}

impl Conn {
    fn connect(addr: &str) -> Result<(Self, TcpStream)> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut writer = stream.try_clone()?;
        let mut conn =
            Conn { reader: BufReader::with_capacity(1 << 20, stream), line: Vec::new(), payload: Vec::new() };
        conn.read_line()?; // INFO
        writer.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1}\r\nPING\r\n")?;
        loop {
            conn.read_line()?;
            match conn.line.as_slice() {
                b"PONG" => break,
                l if l.starts_with(b"-ERR") => bail!("NATS: {}", String::from_utf8_lossy(l)),
                _ => {}
            }
        }
        Ok((conn, writer))
    }

    fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        ensure!(n > 0, "NATS server closed the connection");
        while self.line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            self.line.pop();
        }
        Ok(())
    }

    /// Next MSG/HMSG, skipping PING/PONG/+OK/INFO; -ERR is an error.
    fn next_msg(&mut self, keep_payload: bool) -> Result<Msg> {
        loop {
            self.read_line()?;
            let line = std::str::from_utf8(&self.line).context("non-UTF-8 protocol line")?;
            let mut words = line.split(' ');
            let op = words.next().unwrap_or_default();
            if op != "MSG" && op != "HMSG" {
                ensure!(!op.starts_with("-ERR"), "NATS: {line}");
                continue;
            }
            let words: Vec<&str> = words.collect();
            let sid: u32 = words.get(1).context("MSG without sid")?.parse()?;
            let total: usize = words.last().context("MSG without size")?.parse()?;
            let has_headers = op == "HMSG";
            ensure!(total <= PAYLOAD_BYTES_MAX, "message of {total} bytes");
            self.take_payload(total + 2, keep_payload)?;
            return Ok(Msg { sid, has_headers });
        }
    }

    fn take_payload(&mut self, n: usize, keep: bool) -> Result<()> {
        if keep {
            self.payload.resize(n, 0);
            return Ok(self.reader.read_exact(&mut self.payload)?);
        }
        driver::skip(&mut self.reader, n)
    }

    /// A JetStream API request; returns the JSON answer.
    fn request(&mut self, writer: &mut TcpStream, subject: &str, body: &str) -> Result<String> {
        write!(writer, "PUB {subject} {CONTROL_INBOX} {}\r\n{body}\r\n", body.len())?;
        loop {
            let msg = self.next_msg(true)?;
            if msg.sid == CONTROL_SID {
                ensure!(!msg.has_headers, "no JetStream responder for {subject} (is -js on?)");
                return Ok(String::from_utf8_lossy(&self.payload).trim_end().to_owned());
            }
        }
    }
}

fn setup(args: &Args) -> Result<(Conn, TcpStream)> {
    let (mut conn, mut writer) = Conn::connect(&args.addr)?;
    write!(writer, "SUB {CONTROL_INBOX} {CONTROL_SID}\r\n")?;
    let config = format!(
        r#"{{"name":"{0}","subjects":["{0}"],"storage":"file","retention":"limits","discard":"old","num_replicas":1,"max_msgs":-1,"max_bytes":-1,"max_msg_size":-1}}"#,
        args.topic
    );
    let answer = conn.request(&mut writer, &format!("$JS.API.STREAM.CREATE.{}", args.topic), &config)?;
    ensure!(!answer.contains("\"error\"") || answer.contains("already in use"), "stream create: {answer}");
    Ok((conn, writer))
}

struct PubEncoder {
    prefix: Vec<u8>,
    payload: Vec<u8>,
}

impl Encoder for PubEncoder {
    fn encode(&mut self, _i: u64, out: &mut Vec<u8>) -> u64 {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&self.payload);
        out.extend_from_slice(b"\r\n");
        1
    }
}

struct PubAcks(Conn);

impl AckReader for PubAcks {
    fn read_ack(&mut self) -> Result<()> {
        let msg = self.0.next_msg(true)?;
        ensure!(msg.sid == ACK_SID && !msg.has_headers, "unexpected message on sid {}", msg.sid);
        let text = &self.0.payload;
        ensure!(!text.windows(7).any(|w| w == b"\"error\""), "publish: {}", String::from_utf8_lossy(text));
        Ok(())
    }
}

/// Produce (and latency): one PUB per message, acks read in order, up to `window` pending
/// (nats.go's PublishAsync default limit 4 000).
pub fn produce(args: &Args) -> Result<Outcome> {
    let (conn, mut writer) = setup(args)?;
    write!(writer, "SUB {ACK_INBOX} {ACK_SID}\r\n")?;
    let encoder = PubEncoder {
        prefix: format!("PUB {} {ACK_INBOX} {}\r\n", args.topic, args.size).into_bytes(),
        payload: vec![b'x'; args.size],
    };
    let plan = Plan::new(args, args.count, 4000);
    let stream = writer.try_clone()?;
    driver::publish(&stream, encoder, &mut PubAcks(conn), &plan)
}

/// Sequential read of the stream from its first message through a fresh durable pull
/// consumer, in pull requests of `fetch_bytes / size` messages, two outstanding.
pub fn read(args: &Args) -> Result<Outcome> {
    let (mut conn, mut writer) = setup(args)?;
    let name = format!("r{}x{}", std::process::id(), Instant::now().elapsed().as_nanos());
    let config = format!(
        r#"{{"stream_name":"{0}","config":{{"durable_name":"{1}","deliver_policy":"all","ack_policy":"none","replay_policy":"instant"}}}}"#,
        args.topic, name
    );
    let answer =
        conn.request(&mut writer, &format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.{name}", args.topic), &config)?;
    ensure!(!answer.contains("\"error\""), "consumer create: {answer}");
    write!(writer, "SUB {READ_INBOX} {READ_SID}\r\n")?;
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{name}", args.topic);
    let batch = args.read_batch();
    let start = Instant::now();
    let (mut requested, mut seen) = (0u64, 0u64);
    while seen < args.count {
        // Keep two pull requests outstanding so the server never waits for the next one.
        while requested < args.count && requested < seen + 2 * batch {
            let n = batch.min(args.count - requested);
            let body = format!("{{\"batch\":{n}}}");
            write!(writer, "PUB {next} {READ_INBOX} {}\r\n{body}\r\n", body.len())?;
            requested += n;
        }
        let msg = conn.next_msg(false)?;
        if msg.sid == READ_SID && !msg.has_headers {
            seen += 1;
        }
    }
    Ok(Outcome { messages: seen, bytes: seen * args.size as u64, elapsed: start.elapsed(), latencies_us: Vec::new() })
}
