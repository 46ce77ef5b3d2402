//! Throughput benchmark for kappa-log on the real file system.
//!
//! ```text
//! cargo run --release -p kappa-log --example log_bench -- [--dir DIR] [--runs N] [--seconds S]
//!     [--recovery-mib M] [--interval-ms MS] [--only append,read,recovery,crc] [--tsv FILE]
//! ```
//!
//! Sections:
//! - append: durable appends (SyncPolicy::EveryAppend, fdatasync per append with group
//!   commit) and SyncPolicy::IntervalMs, for 1 and 8 appender threads on one partition,
//!   records of 100 B and 1 KiB, batches of 1 and 1000 records. Each configuration runs
//!   for `--seconds` (or until 1 GiB is written), `--runs` times; the table shows the
//!   median and [min-max].
//! - read: sequential reads of 1 MiB from a ~`--recovery-mib` partition that is in the page
//!   cache (it was just written).
//! - recovery: `Log::open` of that partition after a clean close (checkpoint + indexes) and
//!   after an unclean stop (the active segment is scanned and every CRC checked).
//! - crc: crc32c over the bytes of each append configuration's batch versus the measured
//!   time per append.
//!
//! The storage is wrapped in a counter so the table can show how many bytes each
//! fdatasync covered (the effective write size of group commit).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kappa_log::clock::SystemClock;
use kappa_log::io::{OpenMode, RealFs, Storage, StorageFile};
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogOptions, SyncPolicy};

// ---------------------------------------------------------------------------------------
// A counting wrapper around RealFs.

#[derive(Default)]
struct Counters {
    sync_data: AtomicU64,
    bytes_written: AtomicU64,
}

struct CountingFs {
    inner: RealFs,
    counters: Arc<Counters>,
}

struct CountingFile {
    inner: Arc<dyn StorageFile>,
    counters: Arc<Counters>,
}

impl Storage for CountingFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(CountingFile { inner: self.inner.open(path, mode)?, counters: self.counters.clone() }))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
}

impl StorageFile for CountingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.counters.bytes_written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_all_at(buf, offset)
    }
    // Forwarded so the benchmark measures the real file's vectored write and uninitialised
    // read, not the trait's copying defaults.
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
        let bytes: usize = parts.iter().map(|p| p.len()).sum();
        self.counters.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
        self.inner.write_all_vectored_at(parts, offset)
    }
    fn read_exact_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_append(out, len, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.counters.sync_data.fetch_add(1, Ordering::Relaxed);
        self.inner.sync_data()
    }
}

// ---------------------------------------------------------------------------------------
// Arguments.

struct Args {
    dir: PathBuf,
    runs: usize,
    seconds: f64,
    recovery_mib: u64,
    interval_ms: u64,
    only: Vec<String>,
    tsv: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: PathBuf::from("/var/tmp/kappa-log-bench"),
        runs: 3,
        seconds: 2.0,
        recovery_mib: 1024,
        interval_ms: 100,
        only: vec!["append".into(), "read".into(), "recovery".into(), "crc".into()],
        tsv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = PathBuf::from(value()),
            "--runs" => args.runs = value().parse().expect("--runs N"),
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--recovery-mib" => args.recovery_mib = value().parse().expect("--recovery-mib M"),
            "--interval-ms" => args.interval_ms = value().parse().expect("--interval-ms MS"),
            "--only" => args.only = value().split(',').map(str::to_owned).collect(),
            "--tsv" => args.tsv = Some(PathBuf::from(value())),
            "-h" | "--help" => {
                println!(
                    "log_bench [--dir DIR] [--runs N] [--seconds S] [--recovery-mib M] [--interval-ms MS] [--only append,read,recovery,crc] [--tsv FILE]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// One batch of `records` records whose values are `record_bytes` of pseudo-random data.
fn make_batch(records: usize, record_bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut builder = BatchBuilder::new();
    let ts = now_ms();
    for _ in 0..records {
        let value: Vec<u8> = (0..record_bytes)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        builder.push(NewRecord::new(None, Some(&value), ts));
    }
    builder.build()
}

fn overrides(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().next().unwrap_or("?").to_owned())
        .unwrap_or_default()
}

/// Median, min, max.
fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (median, v[0], v[n - 1])
}

fn fmt_range(values: &[f64], digits: usize) -> String {
    let (m, lo, hi) = stats(values);
    if values.len() == 1 { format!("{m:.digits$}") } else { format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]") }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

struct Tsv(Option<std::fs::File>);

impl Tsv {
    fn row(&mut self, fields: &[String]) {
        if let Some(f) = self.0.as_mut() {
            writeln!(f, "{}", fields.join("\t")).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Append.

#[derive(Clone, Copy)]
struct AppendConfig {
    policy: SyncPolicy,
    threads: usize,
    record_bytes: usize,
    batch_records: usize,
}

struct AppendRun {
    records_per_s: f64,
    mb_per_s: f64,
    appends_per_s: f64,
    bytes_per_sync: f64,
    p50_us: f64,
    p99_us: f64,
    /// Mean wall time per append of one thread (µs).
    mean_us: f64,
    load: String,
}

const APPEND_BYTES_CAP: u64 = 1 << 30;

fn run_append(args: &Args, cfg: AppendConfig, run: usize) -> AppendRun {
    let dir = args.dir.join(format!("append-{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    let counters = Arc::new(Counters::default());
    let fs = Arc::new(CountingFs { inner: RealFs, counters: counters.clone() });
    let (log, _) = Log::open(
        &dir,
        LogOptions { sync_policy: cfg.policy, fs, clock: Arc::new(SystemClock), ..LogOptions::default() },
    )
    .expect("open log");
    let log = Arc::new(log);
    log.create_topic("bench", 1, &overrides(&[("max.message.bytes", "16777216"), ("segment.bytes", "2147483647")]))
        .expect("create topic");
    let partition = log.partition("bench", 0).unwrap();
    let batches: Vec<Vec<u8>> =
        (0..cfg.threads).map(|t| make_batch(cfg.batch_records, cfg.record_bytes, t as u64 + 1)).collect();
    let batch_bytes = batches[0].len() as u64;

    // The interval policy's background flusher (the server runs one like it).
    let stop_flusher = Arc::new(AtomicBool::new(false));
    let flusher = if let SyncPolicy::IntervalMs(ms) = cfg.policy {
        let log = log.clone();
        let stop = stop_flusher.clone();
        Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(ms));
                log.flush().expect("flush");
            }
        }))
    } else {
        None
    };

    let per_thread_cap = APPEND_BYTES_CAP / cfg.threads as u64 / batch_bytes.max(1);
    let deadline = Duration::from_secs_f64(args.seconds);
    let barrier = Arc::new(Barrier::new(cfg.threads + 1));
    let syncs_before = counters.sync_data.load(Ordering::Relaxed);
    let handles: Vec<_> = batches
        .into_iter()
        .map(|batch| {
            let partition = partition.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(4096);
                barrier.wait();
                let start = Instant::now();
                let mut n = 0u64;
                while n < per_thread_cap && start.elapsed() < deadline {
                    let t = Instant::now();
                    partition.append(batch.clone()).expect("append");
                    latencies.push(t.elapsed().as_secs_f64() * 1e6);
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies: Vec<f64> = Vec::new();
    let mut per_thread_means = Vec::new();
    for h in handles {
        let l = h.join().unwrap();
        per_thread_means.push(l.iter().sum::<f64>() / l.len().max(1) as f64);
        latencies.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let syncs = counters.sync_data.load(Ordering::Relaxed) - syncs_before;
    stop_flusher.store(true, Ordering::Relaxed);
    if let Some(f) = flusher {
        f.join().unwrap();
    }
    let load = load();
    let appends = latencies.len() as f64;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    drop(partition);
    log.close().expect("close");
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    AppendRun {
        records_per_s: appends * cfg.batch_records as f64 / elapsed,
        mb_per_s: appends * batch_bytes as f64 / elapsed / 1e6,
        appends_per_s: appends / elapsed,
        bytes_per_sync: if syncs == 0 { f64::NAN } else { appends * batch_bytes as f64 / syncs as f64 },
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        mean_us: per_thread_means.iter().sum::<f64>() / per_thread_means.len() as f64,
        load,
    }
}

fn policy_name(p: SyncPolicy) -> String {
    match p {
        SyncPolicy::EveryAppend => "every-append".into(),
        SyncPolicy::IntervalMs(ms) => format!("interval-{ms}ms"),
    }
}

/// Returns (record_bytes, batch_records) -> mean µs per append, 1 thread, per policy.
fn bench_append(args: &Args, tsv: &mut Tsv) -> BTreeMap<(String, usize, usize), f64> {
    println!("\n## Append throughput (median [min-max] over {} runs, {} s or 1 GiB each)\n", args.runs, args.seconds);
    println!(
        "| policy | threads | record B | batch recs | batch B | records/s | MB/s | appends/s | B per fdatasync | p50 µs | p99 µs | load1 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut per_append = BTreeMap::new();
    for policy in [SyncPolicy::EveryAppend, SyncPolicy::IntervalMs(args.interval_ms)] {
        for threads in [1, 8] {
            for record_bytes in [100, 1024] {
                for batch_records in [1, 1000] {
                    let cfg = AppendConfig { policy, threads, record_bytes, batch_records };
                    let batch_bytes = make_batch(batch_records, record_bytes, 1).len();
                    let runs: Vec<AppendRun> = (0..args.runs).map(|r| run_append(args, cfg, r)).collect();
                    let col = |f: fn(&AppendRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
                    let loads: Vec<&str> = runs.iter().map(|r| r.load.as_str()).collect();
                    println!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        policy_name(policy),
                        threads,
                        record_bytes,
                        batch_records,
                        batch_bytes,
                        fmt_range(&col(|r| r.records_per_s), 0),
                        fmt_range(&col(|r| r.mb_per_s), 1),
                        fmt_range(&col(|r| r.appends_per_s), 0),
                        fmt_range(&col(|r| r.bytes_per_sync), 0),
                        fmt_range(&col(|r| r.p50_us), 0),
                        fmt_range(&col(|r| r.p99_us), 0),
                        loads.join(","),
                    );
                    let _ = std::io::stdout().flush();
                    let (mbs, mbs_lo, mbs_hi) = stats(&col(|r| r.mb_per_s));
                    let (rps, _, _) = stats(&col(|r| r.records_per_s));
                    let (bps, _, _) = stats(&col(|r| r.bytes_per_sync));
                    tsv.row(&[
                        "append".into(),
                        policy_name(policy),
                        threads.to_string(),
                        record_bytes.to_string(),
                        batch_records.to_string(),
                        batch_bytes.to_string(),
                        format!("{rps:.0}"),
                        format!("{mbs:.3}"),
                        format!("{mbs_lo:.3}"),
                        format!("{mbs_hi:.3}"),
                        format!("{bps:.0}"),
                    ]);
                    if threads == 1 {
                        let (mean, _, _) = stats(&col(|r| r.mean_us));
                        per_append.insert((policy_name(policy), record_bytes, batch_records), mean);
                    }
                }
            }
        }
    }
    per_append
}

// ---------------------------------------------------------------------------------------
// Read and recovery share one large partition.

fn write_big_partition(args: &Args, dir: &Path) -> (u64, i64) {
    let _ = std::fs::remove_dir_all(dir);
    let (log, _) = Log::open(
        dir,
        LogOptions {
            sync_policy: SyncPolicy::IntervalMs(1000),
            fs: Arc::new(RealFs),
            clock: Arc::new(SystemClock),
            ..LogOptions::default()
        },
    )
    .expect("open");
    // One segment holds everything, so an unclean open scans all of it.
    log.create_topic("big", 1, &overrides(&[("segment.bytes", "2147483647")])).expect("create");
    let p = log.partition("big", 0).unwrap();
    let batch = make_batch(100, 1024, 7); // ~100 KiB producer batches
    let target = args.recovery_mib << 20;
    let mut written = 0u64;
    while written < target {
        p.append(batch.clone()).expect("append");
        written += batch.len() as u64;
    }
    let end = p.log_end_offset();
    log.close().expect("close");
    (written, end)
}

fn bench_read(args: &Args, dir: &Path, bytes: u64, end: i64, tsv: &mut Tsv) {
    println!("\n## Sequential read from page cache (1 MiB reads, {:.0} MiB partition)\n", bytes as f64 / 1048576.0);
    let (log, _) = Log::open(dir, LogOptions::default()).expect("open");
    let p = log.partition("big", 0).unwrap();
    let pass = || {
        let start = Instant::now();
        let mut offset = 0;
        let mut total = 0u64;
        let mut reads = 0u64;
        while offset < end {
            let out = p.read(offset, 1 << 20, Isolation::ReadUncommitted).expect("read");
            // Next offset: walk the returned batch headers.
            let mut pos = 0;
            while pos < out.records.len() {
                let h = kappa_log::batch::BatchHeader::parse(&out.records[pos..]).unwrap();
                offset = h.next_offset();
                pos += h.total_bytes();
            }
            total += out.records.len() as u64;
            reads += 1;
        }
        (total, reads, start.elapsed().as_secs_f64())
    };
    pass(); // warm the page cache
    let mut gbs = Vec::new();
    let mut loads = Vec::new();
    let mut reads_n = 0;
    for _ in 0..args.runs.max(3) {
        let (total, reads, secs) = pass();
        gbs.push(total as f64 / secs / 1e9);
        loads.push(load());
        reads_n = reads;
    }
    println!("| reads per pass | GB/s | load1 |\n|---:|---:|---|");
    println!("| {} | {} | {} |", reads_n, fmt_range(&gbs, 2), loads.join(","));
    let (m, lo, hi) = stats(&gbs);
    tsv.row(&["read".into(), format!("{m:.3}"), format!("{lo:.3}"), format!("{hi:.3}")]);
    drop(p);
    log.close().expect("close");
}

fn bench_recovery(args: &Args, dir: &Path, bytes: u64, tsv: &mut Tsv) {
    println!("\n## Recovery: Log::open of a {:.0} MiB partition (page cache warm)\n", bytes as f64 / 1048576.0);
    println!("| shutdown | open ms | scanned MiB | scan GB/s | load1 |\n|---|---:|---:|---:|---|");
    for clean in [true, false] {
        let mut ms = Vec::new();
        let mut scanned = 0;
        let mut loads = Vec::new();
        for _ in 0..args.runs {
            if !clean {
                // Open and stop without close(): opening removes the checkpoint, so the next
                // open must scan the active segment.
                let (log, _) = Log::open(dir, LogOptions::default()).expect("open");
                drop(log);
            }
            let start = Instant::now();
            let (log, report) = Log::open(dir, LogOptions::default()).expect("open");
            ms.push(start.elapsed().as_secs_f64() * 1e3);
            loads.push(load());
            assert_eq!(report.all_clean(), clean);
            assert_eq!(report.truncated_bytes(), 0);
            scanned = report.scanned_bytes();
            if clean {
                log.close().expect("close");
            } else {
                drop(log);
            }
        }
        if !clean {
            // Leave it cleanly closed for the next user.
            let (log, _) = Log::open(dir, LogOptions::default()).expect("open");
            log.close().expect("close");
        }
        let (m, lo, hi) = stats(&ms);
        let scan_gbs = if scanned > 0 { format!("{:.2}", scanned as f64 / (m / 1e3) / 1e9) } else { "-".into() };
        println!(
            "| {} | {} | {:.0} | {} | {} |",
            if clean { "clean" } else { "unclean (scan)" },
            fmt_range(&ms, 1),
            scanned as f64 / 1048576.0,
            scan_gbs,
            loads.join(",")
        );
        tsv.row(&[
            "recovery".into(),
            if clean { "clean" } else { "unclean" }.into(),
            format!("{m:.2}"),
            format!("{lo:.2}"),
            format!("{hi:.2}"),
            scanned.to_string(),
        ]);
    }
}

// ---------------------------------------------------------------------------------------
// CRC.

fn bench_crc(per_append: &BTreeMap<(String, usize, usize), f64>, interval_ms: u64, tsv: &mut Tsv) {
    println!("\n## CRC-32C cost vs append time (1 appender thread)\n");
    println!(
        "| record B | batch recs | batch B | crc32c µs | crc GB/s | durable append µs | CRC % durable | interval append µs | CRC % interval |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for record_bytes in [100, 1024] {
        for batch_records in [1, 1000] {
            let batch = make_batch(batch_records, record_bytes, 3);
            let covered = &batch[21..];
            // Enough iterations for ~200 ms.
            let mut iters = 1u64;
            let per_call = loop {
                let start = Instant::now();
                let mut acc = 0u32;
                for _ in 0..iters {
                    acc ^= crc32c::crc32c(std::hint::black_box(covered));
                }
                std::hint::black_box(acc);
                let secs = start.elapsed().as_secs_f64();
                if secs > 0.2 {
                    break secs / iters as f64;
                }
                iters *= 4;
            };
            let crc_us = per_call * 1e6;
            let durable = per_append.get(&(policy_name(SyncPolicy::EveryAppend), record_bytes, batch_records));
            let interval =
                per_append.get(&(policy_name(SyncPolicy::IntervalMs(interval_ms)), record_bytes, batch_records));
            let pct = |t: Option<&f64>| t.map_or("-".to_string(), |t| format!("{:.2}%", crc_us / t * 100.0));
            let us = |t: Option<&f64>| t.map_or("-".to_string(), |t| format!("{t:.1}"));
            println!(
                "| {record_bytes} | {batch_records} | {} | {crc_us:.3} | {:.2} | {} | {} | {} | {} |",
                batch.len(),
                covered.len() as f64 / per_call / 1e9,
                us(durable),
                pct(durable),
                us(interval),
                pct(interval)
            );
            tsv.row(&[
                "crc".into(),
                record_bytes.to_string(),
                batch_records.to_string(),
                format!("{crc_us:.4}"),
                durable.map_or("nan".into(), |t| format!("{t:.3}")),
                interval.map_or("nan".into(), |t| format!("{t:.3}")),
            ]);
        }
    }
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir).expect("create bench dir");
    let mut tsv = Tsv(args.tsv.as_ref().map(|p| std::fs::File::create(p).expect("tsv file")));
    println!("# kappa-log bench: dir {} runs {} load1 at start {}", args.dir.display(), args.runs, load());
    let want = |s: &str| args.only.iter().any(|o| o == s);
    let mut per_append = BTreeMap::new();
    if want("append") {
        per_append = bench_append(&args, &mut tsv);
    }
    if want("read") || want("recovery") {
        let dir = args.dir.join("big");
        let start = Instant::now();
        let (bytes, end) = write_big_partition(&args, &dir);
        println!(
            "\n(wrote the {:.0} MiB read/recovery partition in {:.1} s)",
            bytes as f64 / 1048576.0,
            start.elapsed().as_secs_f64()
        );
        if want("read") {
            bench_read(&args, &dir, bytes, end, &mut tsv);
        }
        if want("recovery") {
            bench_recovery(&args, &dir, bytes, &mut tsv);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if want("crc") {
        bench_crc(&per_append, args.interval_ms, &mut tsv);
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    println!("\n# done; load1 at end {}", load());
}
