//! Redis Streams over raw RESP: pipelined `XADD <key> * v <payload>`, and `XRANGE` from
//! the start in pages of `fetch_bytes / size` entries (each page starts after the last id).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::args::Args;
use crate::driver::{self, AckReader, Encoder, Outcome, Plan};

/// Largest bulk string accepted from the server.
const BULK_BYTES_MAX: usize = 64 << 20;

struct Resp {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Resp {
    fn new(stream: TcpStream) -> Self {
        Resp { reader: BufReader::with_capacity(1 << 20, stream), line: Vec::new() }
    }

    /// Reads one `<type><text>\r\n` line; a `-` error line fails.
    fn read_line(&mut self) -> Result<(u8, i64)> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        ensure!(n >= 3, "Redis closed the connection");
        let text = std::str::from_utf8(&self.line[1..n - 2]).context("non-UTF-8 reply")?;
        match self.line[0] {
            b'-' => bail!("Redis: {text}"),
            b'+' => Ok((b'+', 0)),
            kind => Ok((kind, text.parse().with_context(|| format!("bad reply line {text}"))?)),
        }
    }

    fn expect(&mut self, kind: u8) -> Result<i64> {
        let (k, n) = self.read_line()?;
        ensure!(k == kind, "expected '{}' reply, got '{}'", kind as char, k as char);
        Ok(n)
    }

    /// A bulk string: kept in `out` or skipped.
    fn bulk(&mut self, out: Option<&mut Vec<u8>>) -> Result<()> {
        let len = self.expect(b'$')?;
        ensure!((0..=BULK_BYTES_MAX as i64).contains(&len), "bulk of {len} bytes");
        let n = len as usize + 2;
        match out {
            Some(out) => {
                out.resize(n, 0);
                self.reader.read_exact(out)?;
                out.truncate(len as usize);
            }
            None => driver::skip(&mut self.reader, n)?,
        }
        Ok(())
    }
}

fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct XaddEncoder(Vec<u8>);

impl Encoder for XaddEncoder {
    fn encode(&mut self, _i: u64, out: &mut Vec<u8>) -> u64 {
        out.extend_from_slice(&self.0);
        1
    }
}

struct XaddAcks(Resp);

impl AckReader for XaddAcks {
    fn read_ack(&mut self) -> Result<()> {
        self.0.bulk(None) // the new entry's id
    }
}

fn connect(addr: &str) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Produce (and latency): one XADD per message, pipelined up to `window` replies pending.
pub fn produce(args: &Args) -> Result<Outcome> {
    let stream = connect(&args.addr)?;
    let payload = vec![b'x'; args.size];
    let encoder = XaddEncoder(command(&[b"XADD", args.topic.as_bytes(), b"*", b"v", &payload]));
    let plan = Plan::new(args, args.count, 4000);
    let mut acks = XaddAcks(Resp::new(stream.try_clone()?));
    driver::publish(&stream, encoder, &mut acks, &plan)
}

/// Sequential read with XRANGE pages, one request at a time (the next page starts after
/// the last id of this one, so pages cannot be pipelined).
pub fn read(args: &Args) -> Result<Outcome> {
    let mut writer = connect(&args.addr)?;
    let mut resp = Resp::new(writer.try_clone()?);
    let count = args.read_batch().to_string();
    let mut start_id = b"-".to_vec();
    let mut last_id = Vec::new();
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < args.count {
        writer.write_all(&command(&[b"XRANGE", args.topic.as_bytes(), &start_id, b"+", b"COUNT", count.as_bytes()]))?;
        let entries = resp.expect(b'*')?;
        ensure!(entries > 0, "stream ends after {seen} of {} entries", args.count);
        for _ in 0..entries {
            resp.expect(b'*')?; // [id, [field, value]]
            resp.bulk(Some(&mut last_id))?;
            let fields = resp.expect(b'*')?;
            for _ in 0..fields {
                resp.bulk(None)?;
            }
        }
        seen += entries as u64;
        start_id = [b"(".as_slice(), &last_id].concat();
    }
    Ok(Outcome { messages: seen, bytes: seen * args.size as u64, elapsed: started.elapsed(), latencies_us: Vec::new() })
}
