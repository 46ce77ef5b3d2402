//! Test helper for `tests/kill9.rs` (not a user tool): appends batches to a log from
//! several threads (so group commit shares fsyncs) until it is killed, printing one line
//! per acknowledged append: `partition base_offset last_offset crc`, flushed at once, so
//! every printed line is a promise the log made before the process died.
//!
//! Usage: `crash_writer <data-dir> <run-id>`. It lives in src/bin because integration
//! tests can locate binaries (CARGO_BIN_EXE_*) but not examples.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Log, LogError, LogOptions};

const TOPIC: &str = "t";
const PARTITIONS: i32 = 2;
const THREADS: usize = 4;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: crash_writer <data-dir> <run-id>"));
    let run: u64 = args.next().and_then(|a| a.parse().ok()).expect("run id");
    if let Err(e) = run_writer(&dir, run) {
        eprintln!("crash_writer: {e}");
        std::process::exit(1);
    }
}

fn run_writer(dir: &std::path::Path, run: u64) -> Result<(), LogError> {
    let (log, _) = Log::open(dir, LogOptions::default())?;
    if log.topic(TOPIC).is_err() {
        let overrides = BTreeMap::from([("segment.bytes".to_owned(), "16384".to_owned())]);
        log.create_topic(TOPIC, PARTITIONS, &overrides)?;
    }
    let log = Arc::new(log);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || append_forever(&log, run, t))
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer thread panicked")?;
    }
    Ok(())
}

/// Appends until an error (or the kill); prints each acknowledged append.
fn append_forever(log: &Log, run: u64, thread: usize) -> Result<(), LogError> {
    for i in 0u64.. {
        let partition = ((thread as u64 + i) % PARTITIONS as u64) as i32;
        let sent = make_batch(run, thread, i);
        let crc = kappa_log::batch::BatchHeader::parse(&sent)?.crc;
        let outcome = log.partition(TOPIC, partition)?.append(sent)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{partition} {} {} {crc}", outcome.base_offset, outcome.last_offset)
            .and_then(|()| out.flush())
            .map_err(|e| LogError::Io { path: "stdout".into(), source: e })?;
    }
    Ok(())
}

/// A batch whose contents (and so its CRC) are unique to this run, thread and counter.
fn make_batch(run: u64, thread: usize, i: u64) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    let records = 1 + (i % 7) as usize;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    for r in 0..records {
        let key = format!("run{run}-t{thread}-{i}-{r}");
        let value = key.repeat(1 + (i as usize * 31 + r) % 40);
        builder.push(NewRecord::new(Some(key.as_bytes()), Some(value.as_bytes()), now));
    }
    builder.build()
}
