//! Seeded power-loss simulation: random appends (plain and idempotent, random sizes and
//! codecs, clean restarts, deaths mid-operation) on a [`SimFs`], then a simulated power
//! loss and recovery. Whatever was acknowledged must come back intact, nothing corrupt
//! may be served, and the recovered partition must equal a full scan of its files.
//!
//! `SEED=n` reruns one seed; `SOAK=1` runs 50,000 seeds instead of the default 2,000.

mod common;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use kappa_log::batch::{BatchHeader, Compression};
use kappa_log::clock::ManualClock;
use kappa_log::io::sim::{SimFs, seeded_rng};
use kappa_log::io::{OpenMode, Storage};
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::segment::{parse_log_file_name, scan_batches};
use kappa_log::{Isolation, Log};
use rand::Rng;
use rand::rngs::StdRng;

const DEFAULT_SEEDS: u64 = 2_000;
const SOAK_SEEDS: u64 = 50_000;
const DATA_DIR: &str = "/data";
const TOPIC: &str = "t";
/// Small segments so rolls (and their index and snapshot writes) happen often.
const SEGMENT_BYTES: &str = "4096";
const PRODUCER_ID: i64 = 7_000;

/// An acknowledged append: where the log put it and what was sent.
#[derive(Clone)]
struct Acked {
    base_offset: i64,
    last_offset: i64,
    sent: Vec<u8>,
}

/// Everything the test knows about one simulated history.
struct World {
    seed: u64,
    rng: StdRng,
    fs: SimFs,
    clock: ManualClock,
    log: Option<Log>,
    partitions: i32,
    /// Acknowledged batches per partition, in offset order.
    acked: Vec<Vec<Acked>>,
    /// Batches whose append failed: each may be in the log (whole) or absent.
    unacked: Vec<Vec<Vec<u8>>>,
    /// The idempotent producer: epoch and next sequence per partition. The epoch is bumped
    /// after every restart, so recovery's view of the sequences never matters.
    epoch: i16,
    sequences: Vec<i32>,
    crashes: u64,
    coverage: Coverage,
}

/// What the seeds exercised, so a change that makes the simulation toothless fails.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    failed_appends: u64,
    unacked_survived: u64,
    retries: u64,
    rolled: u64,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.failed_appends += other.failed_appends;
        self.unacked_survived += other.unacked_survived;
        self.retries += other.retries;
        self.rolled += other.rolled;
    }
}

#[test]
fn acknowledged_appends_survive_power_loss() {
    let seeds: Vec<u64> = match (std::env::var("SEED"), std::env::var_os("SOAK")) {
        (Ok(seed), _) => vec![seed.parse().expect("SEED must be an integer")],
        (_, Some(_)) => (0..SOAK_SEEDS).collect(),
        _ => (0..DEFAULT_SEEDS).collect(),
    };
    let started = std::time::Instant::now();
    let mut coverage = Coverage::default();
    for &seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
            Ok(c) => coverage.add(c),
            Err(_) => {
                panic!("seed {seed} failed; rerun it alone with: SEED={seed} cargo test -p kappa-log --test power_loss")
            }
        }
    }
    eprintln!("power_loss: {} seeds in {:.1?}, {coverage:?}", seeds.len(), started.elapsed());
    if seeds.len() >= 100 {
        let c = coverage;
        assert!(c.failed_appends > 0 && c.unacked_survived > 0 && c.retries > 0 && c.rolled > 0, "{c:?}");
    }
}

/// One history: a few sessions of appends ended by deaths, clean restarts or power
/// losses, then a final power loss, a recovery check and appends after recovery.
fn run_seed(seed: u64) -> Coverage {
    let mut world = World::new(seed);
    let steps = world.rng.random_range(8..32);
    for _ in 0..steps {
        match world.rng.random_range(0..100) {
            0..4 => world.clean_restart(),
            4..8 => world.die_mid_operation(),
            8..11 => world.power_loss(),
            11..15 => world.retry_last_idempotent(),
            _ => {
                let partition = world.rng.random_range(0..world.partitions);
                world.append(partition);
            }
        }
    }
    world.power_loss();
    world.append_after_recovery();
    world.coverage
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = seeded_rng(seed);
        let partitions = rng.random_range(1..=3);
        let clock = ManualClock::new(T0);
        let fs = SimFs::new();
        let log = Log::open(Path::new(DATA_DIR), options(Arc::new(fs.clone()), &clock)).expect("open empty log").0;
        log.create_topic(TOPIC, partitions, &overrides(&[("segment.bytes", SEGMENT_BYTES)])).expect("create topic");
        let n = partitions as usize;
        Self {
            seed,
            rng,
            fs,
            clock,
            log: Some(log),
            partitions,
            acked: vec![Vec::new(); n],
            unacked: vec![Vec::new(); n],
            epoch: 0,
            sequences: vec![0; n],
            crashes: 0,
            coverage: Coverage::default(),
        }
    }

    fn log(&self) -> &Log {
        self.log.as_ref().expect("log is open")
    }

    /// Appends one random batch and records whether it was acknowledged.
    fn append(&mut self, partition: i32) -> bool {
        let idempotent = self.rng.random_bool(0.3);
        let sent = self.random_batch(partition, idempotent);
        self.clock.advance(self.rng.random_range(0..50));
        let p = self.log().partition(TOPIC, partition).expect("partition exists");
        let i = partition as usize;
        match p.append(sent.clone()) {
            Ok(outcome) => {
                assert!(!outcome.duplicate, "seed {}: a fresh batch was taken for a retry", self.seed);
                let expected_base = self.acked[i].last().map_or(0, |a| a.last_offset + 1);
                assert!(
                    outcome.base_offset >= expected_base,
                    "seed {}: offsets went backwards: {} after {expected_base}",
                    self.seed,
                    outcome.base_offset
                );
                let header = BatchHeader::parse(&sent).unwrap();
                assert_eq!(outcome.last_offset - outcome.base_offset, i64::from(header.last_offset_delta));
                if idempotent {
                    self.sequences[i] += header.records_count;
                }
                self.acked[i].push(Acked { base_offset: outcome.base_offset, last_offset: outcome.last_offset, sent });
                true
            }
            Err(_) => {
                self.coverage.failed_appends += 1;
                self.unacked[i].push(sent);
                false
            }
        }
    }

    /// A producer retry of the last acknowledged idempotent batch (in this session) must
    /// be recognised and answered with its original offsets, writing nothing.
    fn retry_last_idempotent(&mut self) {
        let partition = self.rng.random_range(0..self.partitions);
        let i = partition as usize;
        let Some(last) = self.acked[i].last().cloned() else { return };
        let header = BatchHeader::parse(&last.sent).unwrap();
        if header.producer_id != PRODUCER_ID || header.producer_epoch != self.epoch {
            return;
        }
        let p = self.log().partition(TOPIC, partition).unwrap();
        let end = p.log_end_offset();
        let outcome = p.append(last.sent.clone()).unwrap_or_else(|e| panic!("seed {}: retry failed: {e}", self.seed));
        assert!(outcome.duplicate, "seed {}: retry not detected", self.seed);
        self.coverage.retries += 1;
        assert_eq!((outcome.base_offset, outcome.last_offset), (last.base_offset, last.last_offset));
        assert_eq!(p.log_end_offset(), end, "seed {}: a retry was written again", self.seed);
    }

    fn random_batch(&mut self, partition: i32, idempotent: bool) -> Vec<u8> {
        let rng = &mut self.rng;
        let count = rng.random_range(1..=8);
        let codec = match rng.random_range(0..10) {
            0 => Compression::Gzip,
            1 => Compression::Snappy,
            2 => Compression::Lz4,
            3 => Compression::Zstd,
            _ => Compression::None,
        };
        let mut builder = BatchBuilder::new().compression(codec);
        if idempotent {
            builder = builder.producer(PRODUCER_ID, self.epoch, self.sequences[partition as usize]);
        }
        let now = kappa_log::clock::Clock::now_ms(&self.clock);
        for _ in 0..count {
            let key: Option<Vec<u8>> = rng.random_bool(0.8).then(|| random_bytes(rng, 0..16));
            let value: Option<Vec<u8>> = rng.random_bool(0.95).then(|| random_bytes(rng, 0..300));
            let mut record = NewRecord::new(key.as_deref(), value.as_deref(), now + rng.random_range(-5..5));
            if rng.random_bool(0.2) {
                record = record.header("h", Some(&random_bytes(rng, 0..8)));
            }
            builder.push(record);
        }
        builder.build()
    }

    /// close() then a fresh open, as a clean shutdown and restart.
    fn clean_restart(&mut self) {
        let log = self.log.take().unwrap();
        log.close().unwrap_or_else(|e| panic!("seed {}: close failed: {e}", self.seed));
        drop(log);
        self.reopen();
        self.verify();
    }

    /// The machine dies a few mutating calls from now: whatever is in flight fails, then
    /// the power goes.
    fn die_mid_operation(&mut self) {
        let budget = self.rng.random_range(0..12);
        self.fs.kill_after_ops(Some(budget));
        for _ in 0..self.rng.random_range(1..6) {
            let partition = self.rng.random_range(0..self.partitions);
            if !self.append(partition) {
                break;
            }
        }
        self.power_loss();
    }

    /// Pulls the plug, recovers (sometimes dying during recovery too) and checks the log.
    fn power_loss(&mut self) {
        drop(self.log.take());
        self.crash();
        if self.rng.random_bool(0.15) {
            // Recovery itself is interrupted: it must be safe to redo.
            self.fs.kill_after_ops(Some(self.rng.random_range(0..6)));
            let _ = Log::open(Path::new(DATA_DIR), options(Arc::new(self.fs.clone()), &self.clock));
            self.crash();
        }
        self.reopen();
        self.verify();
    }

    fn crash(&mut self) {
        self.crashes += 1;
        self.fs.crash(self.seed.wrapping_mul(1_000).wrapping_add(self.crashes));
    }

    fn reopen(&mut self) {
        let (log, _) = Log::open(Path::new(DATA_DIR), options(Arc::new(self.fs.clone()), &self.clock))
            .unwrap_or_else(|e| panic!("seed {}: recovery failed: {e}", self.seed));
        let count = log.topic(TOPIC).unwrap().partition_count();
        assert_eq!(count, self.partitions, "seed {}: partitions lost", self.seed);
        self.log = Some(log);
        // A new producer session: epoch bump, sequences from 0.
        self.epoch += 1;
        self.sequences.iter_mut().for_each(|s| *s = 0);
    }

    /// Checks every partition against the acknowledged history and a scan of its files.
    fn verify(&mut self) {
        for partition in 0..self.partitions {
            let i = partition as usize;
            let p = self.log().partition(TOPIC, partition).unwrap();
            let batches = read_all_batches(&p);
            let scanned = scan_partition_files(&self.fs, p.dir());
            assert_eq!(
                summary(&batches),
                summary(&scanned),
                "seed {} p{partition}: reads (left) differ from a scan of the files (right)",
                self.seed
            );
            assert!(batches == scanned, "seed {} p{partition}: read bytes differ from the files", self.seed);
            check_contiguous(&batches, self.seed);
            let end = batches.last().map_or(0, |b| header_of(b).next_offset());
            assert_eq!(p.high_watermark(), end, "seed {} p{partition}: high watermark", self.seed);
            assert_eq!(p.log_end_offset(), end, "seed {} p{partition}: log end offset", self.seed);
            if let Some(last) = self.acked[i].last() {
                assert!(end > last.last_offset, "seed {} p{partition}: acknowledged offsets lost", self.seed);
            }
            check_acked_present(&batches, &self.acked[i], self.seed);
            check_others_were_sent(&batches, &self.acked[i], &self.unacked[i], self.seed);
            check_every_offset_is_found(&p, &batches, self.seed);
            self.coverage.unacked_survived += (batches.len() - self.acked[i].len()) as u64;
            self.coverage.rolled += u64::from(p.segment_count() > 1);
            // What survived is now part of history: later crashes must keep it only if it
            // is acknowledged, so adopt survivors as acknowledged-by-recovery (recovery
            // synced them) and forget what did not survive.
            self.acked[i] = batches
                .iter()
                .map(|b| {
                    let h = header_of(b);
                    Acked { base_offset: h.base_offset, last_offset: h.last_offset(), sent: b.clone() }
                })
                .collect();
            self.unacked[i].clear();
        }
    }

    /// Appends after recovery work and continue the offsets.
    fn append_after_recovery(&mut self) {
        for partition in 0..self.partitions {
            let end = self.log().partition(TOPIC, partition).unwrap().log_end_offset();
            assert!(self.append(partition), "seed {}: append after recovery failed", self.seed);
            let acked = self.acked[partition as usize].last().unwrap();
            assert_eq!(acked.base_offset, end, "seed {}: offsets do not continue after recovery", self.seed);
        }
        self.clean_restart();
    }
}

fn random_bytes(rng: &mut StdRng, len: std::ops::Range<usize>) -> Vec<u8> {
    let n = rng.random_range(len);
    // Compressible half the time, so codecs do real work.
    match rng.random_bool(0.5) {
        true => vec![rng.random(); n],
        false => (0..n).map(|_| rng.random()).collect(),
    }
}

fn header_of(bytes: &[u8]) -> BatchHeader {
    BatchHeader::parse(bytes).unwrap()
}

/// The batches of a partition directory found by scanning its segment files directly,
/// independent of the log's indexes and in-memory state.
fn scan_partition_files(fs: &SimFs, dir: &Path) -> Vec<Vec<u8>> {
    let segments: BTreeMap<i64, PathBuf> = fs
        .files()
        .into_keys()
        .filter(|path| path.parent() == Some(dir))
        .filter_map(|path| Some((parse_log_file_name(path.file_name()?.to_str()?)?, path)))
        .collect();
    let mut out = Vec::new();
    for (base, path) in segments {
        let file = fs.open(&path, OpenMode::Read).unwrap();
        let len = file.len().unwrap();
        let outcome = scan_batches(file.as_ref(), base, len, |_, _, bytes| out.push(bytes.to_vec())).unwrap();
        assert_eq!(outcome.stop_reason, None, "{}: recovery left an invalid tail", path.display());
    }
    out
}

/// (base offset, last offset, bytes, crc) per batch: readable in a failure message.
fn summary(batches: &[Vec<u8>]) -> Vec<(i64, i64, usize, u32)> {
    batches
        .iter()
        .map(|b| {
            let h = header_of(b);
            (h.base_offset, h.last_offset(), b.len(), h.crc)
        })
        .collect()
}

fn check_contiguous(batches: &[Vec<u8>], seed: u64) {
    let mut next = 0;
    for b in batches {
        let h = header_of(b);
        assert_eq!(h.base_offset, next, "seed {seed}: offsets not contiguous");
        next = h.next_offset();
    }
}

fn check_acked_present(batches: &[Vec<u8>], acked: &[Acked], seed: u64) {
    let by_base: BTreeMap<i64, &Vec<u8>> = batches.iter().map(|b| (header_of(b).base_offset, b)).collect();
    for a in acked {
        let found = by_base
            .get(&a.base_offset)
            .unwrap_or_else(|| panic!("seed {seed}: acknowledged batch at {} is missing", a.base_offset));
        assert_eq!(header_of(found).last_offset(), a.last_offset, "seed {seed}: batch at {} changed", a.base_offset);
        assert_same_batch(found, &a.sent, seed);
    }
}

/// A batch that was not acknowledged must still be one that was sent (whole), never a
/// mix or garbage that happens to pass the CRC.
fn check_others_were_sent(batches: &[Vec<u8>], acked: &[Acked], unacked: &[Vec<u8>], seed: u64) {
    let acked_bases: Vec<i64> = acked.iter().map(|a| a.base_offset).collect();
    for b in batches.iter().filter(|b| !acked_bases.contains(&header_of(b).base_offset)) {
        assert!(
            unacked.iter().any(|sent| batch_records(sent) == batch_records(b)),
            "seed {seed}: batch at {} was never sent",
            header_of(b).base_offset
        );
    }
}

/// Index lookups: a read starting at any offset returns first the batch that holds it.
fn check_every_offset_is_found(p: &kappa_log::Partition, batches: &[Vec<u8>], seed: u64) {
    for b in batches {
        let h = header_of(b);
        for offset in h.base_offset..=h.last_offset() {
            let read = p.read(offset, 1, Isolation::ReadUncommitted).unwrap();
            let first = split_batches(&read.records).into_iter().next();
            assert_eq!(first.as_ref(), Some(b), "seed {seed}: read at {offset} did not start at its batch");
        }
    }
}

/// Same records and producer fields; the base offset (assigned by the log) may differ.
fn assert_same_batch(stored: &[u8], sent: &[u8], seed: u64) {
    let (s, o) = (header_of(stored), header_of(sent));
    assert_eq!(
        (s.producer_id, s.producer_epoch, s.base_sequence, s.attributes, s.crc),
        (o.producer_id, o.producer_epoch, o.base_sequence, o.attributes, o.crc),
        "seed {seed}: batch header at {} differs from what was sent",
        s.base_offset
    );
    assert_eq!(batch_records(stored), batch_records(sent), "seed {seed}: records at {} differ", s.base_offset);
}
