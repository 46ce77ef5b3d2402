//! kill -9 loop with a real process: `crash_writer` (src/bin) appends from several
//! threads and prints each acknowledged append; the test SIGKILLs it at seeded random
//! moments, restarts, and checks that every acknowledged batch is still there with the
//! same contents (its CRC covers every record) and that recovery served nothing else but
//! whole, valid, contiguous batches.
//!
//! 20 cycles by default, `SOAK=1` for 200. A kill loses no page cache, so this tests
//! process death (a write cut off mid-batch, recovery of a dirty shutdown, group commit),
//! not power loss; power loss is tests/power_loss.rs.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;

use common::*;
use kappa_log::batch::BatchHeader;
use kappa_log::clock::ManualClock;
use kappa_log::io::RealFs;
use kappa_log::io::sim::seeded_rng;
use kappa_log::{Isolation, Log};
use rand::Rng;

const WRITER: &str = env!("CARGO_BIN_EXE_crash_writer");

/// An acknowledged append as the writer printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    last_offset: i64,
    crc: u32,
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let cycles = if std::env::var_os("SOAK").is_some() { 200 } else { 20 };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = seeded_rng(9);
    // (partition, base offset) -> ack, over all cycles.
    let mut acked: BTreeMap<(i32, i64), Ack> = BTreeMap::new();
    let started = std::time::Instant::now();
    for cycle in 0..cycles {
        // Sometimes kill during start-up (recovery, topic creation), else after n acks.
        let kill_after = if rng.random_bool(0.1) { 0 } else { rng.random_range(1..150) };
        let lines = run_and_kill(dir.path(), cycle, kill_after);
        for line in lines {
            let (key, ack) = parse(&line);
            assert!(acked.insert(key, ack).is_none(), "cycle {cycle}: offset {key:?} acknowledged twice");
        }
        verify(dir.path(), &acked, cycle);
    }
    eprintln!("kill9: {cycles} cycles, {} acknowledged batches, {:.1?}", acked.len(), started.elapsed());
}

/// Starts the writer, waits for `kill_after` acknowledged lines, SIGKILLs it, and returns
/// every complete line it printed (including those still in the pipe).
fn run_and_kill(dir: &Path, cycle: u64, kill_after: usize) -> Vec<String> {
    let mut child = Command::new(WRITER)
        .arg(dir)
        .arg(cycle.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crash_writer");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < kill_after {
        match rx.recv() {
            Ok(line) => lines.push(line),
            Err(_) => writer_died(&mut child, cycle),
        }
    }
    child.kill().expect("SIGKILL the writer");
    child.wait().unwrap();
    reader.join().unwrap();
    // A line cut short by the kill would still be yielded by lines(): drop a last line
    // that is not four fields (each line is one small pipe write, so this is defensive).
    lines.extend(rx.try_iter());
    if lines.last().is_some_and(|l| l.split(' ').count() != 4 || l.split(' ').any(|f| f.is_empty())) {
        lines.pop();
    }
    lines
}

fn writer_died(child: &mut Child, cycle: u64) -> ! {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    panic!("cycle {cycle}: crash_writer exited on its own ({status}): {stderr}");
}

fn parse(line: &str) -> ((i32, i64), Ack) {
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 4, "malformed writer line {line:?}");
    fn field<T: std::str::FromStr>(line: &str, s: &str) -> T {
        s.parse().unwrap_or_else(|_| panic!("malformed writer line {line:?}"))
    }
    let key = (field(line, fields[0]), field(line, fields[1]));
    (key, Ack { last_offset: field(line, fields[2]), crc: field(line, fields[3]) })
}

/// Recovers the directory and checks it against every acknowledgement so far.
fn verify(dir: &Path, acked: &BTreeMap<(i32, i64), Ack>, cycle: u64) {
    let clock = ManualClock::new(T0);
    let Ok((log, _)) = Log::open(dir, options(Arc::new(RealFs), &clock)) else {
        panic!("cycle {cycle}: recovery failed");
    };
    let Ok(topic) = log.topic("t") else {
        assert!(acked.is_empty(), "cycle {cycle}: the topic vanished after acknowledgements");
        return;
    };
    for p in topic.partitions() {
        // Whole, valid, contiguous batches only.
        let mut next = 0;
        for bytes in read_all_batches(&p) {
            let h = BatchHeader::parse(&bytes).unwrap();
            assert_eq!(h.base_offset, next, "cycle {cycle} p{}: offsets not contiguous", p.index());
            next = h.next_offset();
        }
        let acks = acked.range((p.index(), i64::MIN)..=(p.index(), i64::MAX));
        for (&(_, base), ack) in acks {
            let read = p.read(base, 1, Isolation::ReadUncommitted).unwrap();
            let first = split_batches(&read.records).into_iter().next();
            let h = first.map(|b| BatchHeader::parse(&b).unwrap());
            assert!(
                h.is_some_and(|h| h.base_offset == base && h.last_offset() == ack.last_offset && h.crc == ack.crc),
                "cycle {cycle} p{}: acknowledged batch at {base} is missing or changed: {h:?} vs {ack:?}",
                p.index()
            );
        }
    }
    // Alternate clean and dirty shutdowns of the verifying process too.
    if cycle.is_multiple_of(2) {
        log.close().expect("clean close");
    }
}
