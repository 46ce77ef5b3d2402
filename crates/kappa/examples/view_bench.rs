//! View engine benchmark: rebuild speed of the channels views over an already-written log,
//! the log's raw sequential read rate from the same run, and live lag from a durable
//! append to the view's durable changelog (what a subscriber sees).
//!
//! ```text
//! cargo run --release -p kappa --example view_bench -- [--dir DIR] [--events N]
//!     [--channels C] [--runs R] [--live-rate PER_S] [--live-seconds S] [--only write,read,parse,rebuild,live]
//!     [--views channel_stats,channel_page,owner_channels,noop] [--allocator-defaults]
//! ```
//!
//! `noop` is a processor that reads nothing and writes nothing: the engine's own cost per
//! event (read, decode, upcast, step commits), the floor under every view's rebuild rate.
//!
//! The log is written once (`--events`, default 10M, over 4 partitions, the generator's
//! mix of event types and versions) and reused by later runs with the same `--dir`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kappa::channels;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogOptions};
use kappa_views::{EmbeddedLog, EngineConfig, Event, EventError, LogBackend, Processor, StateAccess, View, ViewEngine};
use serde_json::json;

/// mimalloc, configured as `App::main` does unless `--allocator-defaults`.
#[global_allocator]
static ALLOCATOR: kappa::allocator::MiMalloc = kappa::allocator::MiMalloc;

struct Args {
    dir: PathBuf,
    events: u64,
    channels: u64,
    runs: usize,
    live_rate: u64,
    live_seconds: u64,
    only: Vec<String>,
    views: Vec<String>,
    allocator_defaults: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: PathBuf::from("/var/tmp/kappa-view-bench"),
        events: 10_000_000,
        channels: 100_000,
        runs: 3,
        live_rate: 1000,
        live_seconds: 10,
        only: vec!["write".into(), "read".into(), "rebuild".into(), "live".into()],
        views: vec!["channel_stats".into(), "channel_page".into(), "owner_channels".into()],
        allocator_defaults: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()),
            "--events" => args.events = value().parse().expect("--events N"),
            "--channels" => args.channels = value().parse().expect("--channels N"),
            "--runs" => args.runs = value().parse().expect("--runs N"),
            "--live-rate" => args.live_rate = value().parse().expect("--live-rate N"),
            "--live-seconds" => args.live_seconds = value().parse().expect("--live-seconds N"),
            "--only" => args.only = value().split(',').map(str::to_owned).collect(),
            "--views" => args.views = value().split(',').map(str::to_owned).collect(),
            "--allocator-defaults" => args.allocator_defaults = true,
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// Event i of the benchmark's mix: 10% channel upserts, 45% content v1, 40% content v2,
/// 5% content removals.
fn event(i: u64, channels: u64, timestamp: i64) -> NewRecord {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    let channel = format!("c{}", x % channels);
    let content_id = format!("x{}", (x >> 20) % 20);
    let kind = (x >> 40) % 100;
    let (value, event_type, version) = if kind < 10 {
        let value =
            json!({"channelId": channel, "name": format!("name-{i}"), "ownerId": format!("u{}", (x >> 8) % 1000)});
        (Some(value), channels::CHANNEL_UPDATED, 1)
    } else if kind < 55 {
        let value = json!({"channelId": channel, "contentId": content_id, "op": "added", "text": format!("text {i}")});
        (Some(value), channels::CHANNEL_CONTENT_MUTATED, 1)
    } else if kind < 95 {
        let value = json!({"channelId": channel, "contentId": content_id, "action": "upsert", "content": {"title": format!("t{i}"), "body": format!("body {i}")}});
        (Some(value), channels::CHANNEL_CONTENT_MUTATED, 2)
    } else {
        (None, channels::CHANNEL_CONTENT_MUTATED, 1)
    };
    let bytes = value.map(|v| serde_json::to_vec(&v).unwrap());
    let mut record = NewRecord::new(Some(channel.as_bytes()), bytes.as_deref(), timestamp)
        .header("kappa.type", Some(event_type.as_bytes()))
        .header("kappa.version", Some(version.to_string().as_bytes()));
    if event_type == channels::CHANNEL_CONTENT_MUTATED {
        record = record.header(channels::CONTENT_ID, Some(content_id.as_bytes()));
    }
    record
}

fn partition_of(record: &NewRecord) -> i32 {
    (crc32c::crc32c(record.key.as_deref().unwrap_or_default()) % channels::PARTITIONS as u32) as i32
}

fn open_log(dir: &Path) -> Arc<Log> {
    let log = Log::open(&dir.join("log"), LogOptions::default()).expect("open log").0;
    Arc::new(log)
}

fn write(args: &Args, log: &Log) {
    if log.topic(channels::TOPIC).is_ok() {
        let end: i64 = log.topic(channels::TOPIC).unwrap().partitions().iter().map(|p| p.log_end_offset()).sum();
        println!("write: reusing {end} events in {}", args.dir.display());
        return;
    }
    log.create_topic(channels::TOPIC, channels::PARTITIONS, &BTreeMap::new()).unwrap();
    let started = Instant::now();
    let mut batches: Vec<BatchBuilder> = (0..channels::PARTITIONS).map(|_| BatchBuilder::new()).collect();
    let mut bytes = 0u64;
    for i in 0..args.events {
        let record = event(i, args.channels, 1_700_000_000_000 + i as i64);
        let partition = partition_of(&record) as usize;
        batches[partition].push(record);
        if batches[partition].len() == 1000 {
            let batch = std::mem::take(&mut batches[partition]).build();
            bytes += batch.len() as u64;
            log.partition(channels::TOPIC, partition as i32).unwrap().append(batch).unwrap();
        }
    }
    for (partition, batch) in batches.into_iter().enumerate().filter(|(_, b)| !b.is_empty()) {
        let batch = batch.build();
        bytes += batch.len() as u64;
        log.partition(channels::TOPIC, partition as i32).unwrap().append(batch).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "write: {} events, {:.0} MB in {secs:.1} s ({:.0} events/s)",
        args.events,
        bytes as f64 / 1e6,
        args.events as f64 / secs
    );
}

fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn read(args: &Args, log: &Arc<Log>) {
    let backend = EmbeddedLog::new(log.clone());
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    for _ in 0..args.runs {
        // Raw: whole batches, CRC-checked, as a consumer fetch reads them.
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut records = 0u64;
        for p in 0..channels::PARTITIONS {
            let partition = log.partition(channels::TOPIC, p).unwrap();
            let mut offset = 0;
            while offset < partition.high_watermark() {
                let out = partition.read(offset, 1 << 20, Isolation::ReadCommitted).unwrap();
                bytes += out.records.len() as u64;
                let mut rest = out.records.as_slice();
                while !rest.is_empty() {
                    let len = kappa_log::batch::batch_total_len(rest, rest.len()).unwrap();
                    let header = kappa_log::batch::BatchHeader::parse(rest).unwrap();
                    records += header.records_count as u64;
                    offset = header.last_offset() + 1;
                    rest = &rest[len..];
                }
            }
        }
        raw.push((records as f64 / started.elapsed().as_secs_f64(), bytes as f64 / started.elapsed().as_secs_f64()));
        // Decoded: records as the view engine receives them.
        let started = Instant::now();
        let mut records = 0u64;
        for p in 0..channels::PARTITIONS {
            let mut offset = 0;
            let end = backend.end_offset(channels::TOPIC, p).unwrap();
            while offset < end {
                let chunk = backend.read_committed(channels::TOPIC, p, offset, 1 << 20).unwrap();
                records += chunk.records.len() as u64;
                offset = chunk.next_offset;
            }
        }
        decoded.push(records as f64 / started.elapsed().as_secs_f64());
    }
    let (rate, lo, hi) = median(raw.iter().map(|r| r.0).collect());
    let (mbps, _, _) = median(raw.iter().map(|r| r.1 / 1e6).collect());
    println!("read raw (batches, CRC-checked): {rate:.0} records/s [{lo:.0}-{hi:.0}], {mbps:.0} MB/s");
    let (rate, lo, hi) = median(decoded);
    println!("read decoded (engine records): {rate:.0} records/s [{lo:.0}-{hi:.0}]");
}

/// Parsing JSON alone, the least any view reading the payload must do: each payload of the
/// first `PARSE_SAMPLE_EVENTS` events of partition 0, already in memory, checked and
/// skipped (`IgnoredAny`) by serde_json; tombstones count as events parsed for free.
fn parse(args: &Args, log: &Arc<Log>) {
    const PARSE_SAMPLE_EVENTS: usize = 1_000_000;
    let backend = EmbeddedLog::new(log.clone());
    let mut values = Vec::with_capacity(PARSE_SAMPLE_EVENTS);
    let end = backend.end_offset(channels::TOPIC, 0).unwrap();
    let mut offset = 0;
    while offset < end && values.len() < PARSE_SAMPLE_EVENTS {
        let chunk = backend.read_committed(channels::TOPIC, 0, offset, 1 << 20).unwrap();
        values.extend(chunk.records.into_iter().map(|r| r.value).take(PARSE_SAMPLE_EVENTS - values.len()));
        offset = chunk.next_offset;
    }
    let mut rates = Vec::new();
    for _ in 0..args.runs {
        let started = Instant::now();
        for value in values.iter().flatten() {
            serde_json::from_slice::<serde::de::IgnoredAny>(value).expect("a JSON payload");
        }
        rates.push(values.len() as f64 / started.elapsed().as_secs_f64());
    }
    let (rate, lo, hi) = median(rates);
    println!("parse JSON payloads alone (serde_json, in memory): {rate:.0} events/s [{lo:.0}-{hi:.0}]");
}

fn engine(log: &Arc<Log>, dir: &Path, views: Vec<View>) -> ViewEngine {
    let config = EngineConfig { schemas: channels::schemas(), ..EngineConfig::new(dir) };
    ViewEngine::start(Arc::new(EmbeddedLog::new(log.clone())), config, views).expect("start views")
}

/// Applies nothing: what a rebuild costs before any view logic runs.
struct Noop;

impl Processor for Noop {
    type State = ();
    type Internal = ();

    fn process(&self, _: &Event, _: &mut dyn StateAccess<(), ()>) -> Result<(), EventError> {
        Ok(())
    }
}

fn bench_view(name: &str) -> View {
    if name == "noop" {
        return View::processor("noop", 1, &[channels::TOPIC], Noop);
    }
    channels::views().into_iter().find(|v| v.name() == name).unwrap_or_else(|| panic!("unknown view {name}"))
}

fn rebuild(args: &Args, log: &Arc<Log>) {
    for name in args.views.iter().map(String::as_str) {
        let mut rates = Vec::new();
        for run in 0..args.runs {
            let dir = args.dir.join(format!("views-rebuild-{name}-{run}"));
            let _ = std::fs::remove_dir_all(&dir);
            for topic in log.topics() {
                if topic.name().starts_with("__kappa.view.") {
                    log.delete_topic(topic.name()).unwrap();
                }
            }
            let view = bench_view(name);
            let started = Instant::now();
            let engine = engine(log, &dir, vec![view]);
            assert!(engine.wait_caught_up(name, Duration::from_secs(3600)).unwrap());
            let secs = started.elapsed().as_secs_f64();
            let applied = engine.describe(name).unwrap().versions[0].status.events_applied;
            engine.shutdown();
            rates.push(applied as f64 / secs);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (rate, lo, hi) = median(rates);
        println!("rebuild {name}: {rate:.0} events/s [{lo:.0}-{hi:.0}] (one view thread)");
    }
}

/// Appends one durable event at a time at `--live-rate` and measures the time until the
/// change is in the view's durable changelog.
fn live(args: &Args, log: &Arc<Log>) {
    let dir = args.dir.join("views-live");
    let _ = std::fs::remove_dir_all(&dir);
    for topic in log.topics() {
        if topic.name().starts_with("__kappa.view.") {
            log.delete_topic(topic.name()).unwrap();
        }
    }
    let view = channels::views().into_iter().find(|v| v.name() == "channel_page").unwrap();
    let engine = engine(log, &dir, vec![view]);
    assert!(engine.wait_caught_up("channel_page", Duration::from_secs(3600)).unwrap());
    let sent: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (log, sent, done) = (log.clone(), sent.clone(), done.clone());
        std::thread::spawn(move || {
            let backend = EmbeddedLog::new(log.clone());
            let topic = "__kappa.view.channel_page.v1";
            let mut offset = backend.durable_end_offset(topic, 0).unwrap();
            let mut lags = Vec::new();
            while !done.load(Ordering::Acquire) || !sent.lock().unwrap().is_empty() {
                let end = backend.durable_end_offset(topic, 0).unwrap();
                if end <= offset {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                let chunk = backend.read_committed(topic, 0, offset, 1 << 20).unwrap();
                let now = Instant::now();
                for record in &chunk.records {
                    let Some(value) = &record.value else { continue };
                    let Ok(page) = serde_json::from_slice::<serde_json::Value>(value) else { continue };
                    if let Some(name) = page["name"].as_str()
                        && let Some(at) = sent.lock().unwrap().remove(name)
                    {
                        lags.push(now.duration_since(at).as_secs_f64() * 1e3);
                    }
                }
                offset = chunk.next_offset;
            }
            lags
        })
    };
    let partition_count = channels::PARTITIONS;
    let interval = Duration::from_secs_f64(1.0 / args.live_rate as f64);
    let total = args.live_rate * args.live_seconds;
    let started = Instant::now();
    for i in 0..total {
        let due = started + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let name = format!("live-{i}");
        let channel = format!("live-c{}", i % 100);
        let value = serde_json::to_vec(&json!({"channelId": channel, "name": name, "ownerId": "u1"})).unwrap();
        let record = NewRecord::new(Some(channel.as_bytes()), Some(&value), 0)
            .header("kappa.type", Some(channels::CHANNEL_UPDATED.as_bytes()));
        let partition = (crc32c::crc32c(channel.as_bytes()) % partition_count as u32) as i32;
        sent.lock().unwrap().insert(name, Instant::now());
        log.partition(channels::TOPIC, partition).unwrap().append(BatchBuilder::new().record(record).build()).unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    done.store(true, Ordering::Release);
    sent.lock().unwrap().clear();
    let mut lags = watcher.join().unwrap();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "live channel_page at {} events/s for {} s: {} of {total} seen; lag from append to durable changelog p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.live_rate,
        args.live_seconds,
        lags.len(),
        pct(0.5),
        pct(0.99),
        lags.last().copied().unwrap_or(0.0)
    );
    engine.shutdown();
}

fn main() {
    let args = parse_args();
    if !args.allocator_defaults {
        kappa::allocator::configure();
    }
    std::fs::create_dir_all(&args.dir).unwrap();
    let log = open_log(&args.dir);
    println!("view_bench: {} events over {} channels in {}", args.events, args.channels, args.dir.display());
    let only = |s: &str| args.only.iter().any(|o| o == s);
    if only("write") || only("read") || only("parse") || only("rebuild") || only("live") {
        write(&args, &log);
    }
    if only("read") {
        read(&args, &log);
    }
    if only("parse") {
        parse(&args, &log);
    }
    if only("rebuild") {
        rebuild(&args, &log);
    }
    if only("live") {
        live(&args, &log);
    }
    log.close().unwrap();
}
