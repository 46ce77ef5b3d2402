//! One lean client for `bench/compare.sh`: the same workloads against kappa (Kafka wire
//! protocol), NATS JetStream (raw text protocol) and Redis Streams (raw RESP), with no
//! client library in the way. Blocking sockets and two threads per connection (a writer
//! that keeps a window of requests in flight, a reader that takes the acks; one request at
//! a time runs on one thread, so no thread hand-off adds to its latency), so the client
//! costs little CPU; it reports its own CPU and, given `--server-pid`, the server's.
//!
//! ```text
//! peer-client <kafka|nats|redis> <produce|read|latency> --addr HOST:PORT --topic NAME
//!     [--count N] [--size BYTES] [--batch-bytes B] [--window W] [--rate MSGS_PER_S]
//!     [--seconds S] [--fetch-bytes B] [--server-pid PID] [--label TEXT]
//! ```
//! Prints one line of `key=value` fields.

mod args;
mod cpu;
mod driver;
mod kafka;
mod nats;
mod redis;

use anyhow::{Result, bail};

use args::Args;
use driver::Outcome;

fn main() -> Result<()> {
    let args = Args::parse(std::env::args().skip(1))?;
    let server_before = args.server_pid.map(cpu::process_seconds).transpose()?;
    let client_before = cpu::self_seconds()?;
    let outcome = run(&args)?;
    let client_cpu = cpu::self_seconds()? - client_before;
    let server_cpu = match (args.server_pid, server_before) {
        (Some(pid), Some(before)) => Some(cpu::process_seconds(pid)? - before),
        _ => None,
    };
    println!("{}", report(&args, &outcome, client_cpu, server_cpu));
    Ok(())
}

fn run(args: &Args) -> Result<Outcome> {
    match (args.system.as_str(), args.workload.as_str()) {
        ("kafka", "produce" | "latency") => kafka::produce(args),
        ("kafka", "read") => kafka::read(args),
        ("nats", "produce" | "latency") => nats::produce(args),
        ("nats", "read") => nats::read(args),
        ("redis", "produce" | "latency") => redis::produce(args),
        ("redis", "read") => redis::read(args),
        (system, workload) => bail!("unknown system/workload {system}/{workload}"),
    }
}

fn report(args: &Args, o: &Outcome, client_cpu: f64, server_cpu: Option<f64>) -> String {
    let secs = o.elapsed.as_secs_f64();
    let mut line = format!(
        "label={} system={} workload={} size={} msgs={} bytes={} secs={:.3} msgs_per_s={:.0} mb_per_s={:.1} client_cpu_s={:.3}",
        args.label,
        args.system,
        args.workload,
        args.size,
        o.messages,
        o.bytes,
        secs,
        o.messages as f64 / secs,
        o.bytes as f64 / secs / 1e6,
        client_cpu,
    );
    if let Some(server) = server_cpu {
        line +=
            &format!(" server_cpu_s={server:.3} server_cpu_s_per_1m={:.3}", server * 1e6 / o.messages.max(1) as f64);
    }
    if !o.latencies_us.is_empty() {
        let mut l = o.latencies_us.clone();
        l.sort_unstable_by(f64::total_cmp);
        let q = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
        line += &format!(" p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}", q(0.5), q(0.99), q(0.999), q(1.0));
    }
    line
}
