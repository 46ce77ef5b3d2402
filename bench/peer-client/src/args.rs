//! Command-line flags: `--name value` pairs after the system and the workload.

use anyhow::{Context, Result, bail};

pub struct Args {
    pub system: String,
    pub workload: String,
    pub addr: String,
    /// Stream / topic / key the workload uses.
    pub topic: String,
    /// Messages to send or read.
    pub count: u64,
    /// Payload bytes per message.
    pub size: usize,
    /// Kafka: record-batch bytes per produce request (records per batch = this / size).
    pub batch_bytes: usize,
    /// Requests (Kafka) or messages (NATS, Redis) in flight before waiting for an ack.
    pub window: usize,
    /// Open-loop send rate in messages/s; 0 = as fast as the window allows.
    pub rate: u64,
    /// Stop producing after this long even if `count` is not reached (slow configurations).
    pub seconds: f64,
    /// Bytes asked for per read request (Kafka fetch max; NATS / Redis: messages = this / size).
    pub fetch_bytes: usize,
    pub server_pid: Option<u32>,
    pub label: String,
}

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Self> {
        let system = it.next().context("usage: peer-client <kafka|nats|redis> <produce|read|latency> --addr ...")?;
        let workload = it.next().context("missing workload: produce, read or latency")?;
        let mut a = Args {
            system,
            workload,
            addr: String::new(),
            topic: "bench".into(),
            count: 1_000_000,
            size: 1024,
            batch_bytes: 256 * 1024,
            window: 0,
            rate: 0,
            seconds: 60.0,
            fetch_bytes: 1 << 20,
            server_pid: None,
            label: String::new(),
        };
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            let bad = || format!("bad value for {flag}: {value}");
            match flag.as_str() {
                "--addr" => a.addr = value,
                "--topic" => a.topic = value,
                "--count" => a.count = value.parse().with_context(bad)?,
                "--size" => a.size = value.parse().with_context(bad)?,
                "--batch-bytes" => a.batch_bytes = value.parse().with_context(bad)?,
                "--window" => a.window = value.parse().with_context(bad)?,
                "--rate" => a.rate = value.parse().with_context(bad)?,
                "--seconds" => a.seconds = value.parse().with_context(bad)?,
                "--fetch-bytes" => a.fetch_bytes = value.parse().with_context(bad)?,
                "--server-pid" => a.server_pid = Some(value.parse().with_context(bad)?),
                "--label" => a.label = value,
                _ => bail!("unknown flag {flag}"),
            }
        }
        if a.addr.is_empty() {
            bail!("--addr is required");
        }
        if a.workload == "latency" && a.window == 0 && a.rate == 0 {
            a.window = 1; // one at a time
        }
        Ok(a)
    }

    /// The window, or the system's default: Kafka's max.in.flight (5), and for per-message
    /// protocols nats.go's PublishAsync default pending limit (4 000).
    pub fn window_or(&self, default: usize) -> usize {
        if self.window > 0 { self.window } else { default }
    }

    /// Messages per read request for per-message protocols: the Kafka fetch size in messages.
    pub fn read_batch(&self) -> u64 {
        (self.fetch_bytes / self.size.max(1)).max(1) as u64
    }
}
