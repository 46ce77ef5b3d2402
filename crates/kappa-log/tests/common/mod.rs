//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kappa_log::batch::{self as batch_codec, BatchHeader};
use kappa_log::clock::ManualClock;
use kappa_log::io::Storage;
use kappa_log::records::{BatchBuilder, NewRecord, decode_records};
use kappa_log::{Isolation, Log, LogOptions, Partition, SyncPolicy};

pub const T0: i64 = 1_700_000_000_000;

pub fn options(fs: Arc<dyn Storage>, clock: &ManualClock) -> LogOptions {
    LogOptions { sync_policy: SyncPolicy::EveryAppend, fs, clock: Arc::new(clock.clone()) }
}

pub fn open(dir: &Path, clock: &ManualClock) -> Log {
    Log::open(dir, options(Arc::new(kappa_log::io::RealFs), clock)).expect("open log").0
}

pub fn overrides(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A batch of `n` records with keys `k{i}` and values `v{tag}-{i}`.
pub fn batch(tag: &str, n: usize, timestamp: i64) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for i in 0..n {
        builder.push(NewRecord::new(
            Some(format!("k{i}").as_bytes()),
            Some(format!("v{tag}-{i}").as_bytes()),
            timestamp + i as i64,
        ));
    }
    builder.build()
}

/// Splits a read's bytes into batch headers.
pub fn headers(mut bytes: &[u8]) -> Vec<BatchHeader> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let header = kappa_log::batch::validate(&bytes[..BatchHeader::parse(bytes).unwrap().total_bytes()], usize::MAX)
            .expect("every returned batch is valid");
        bytes = &bytes[header.total_bytes()..];
        out.push(header);
    }
    out
}

/// Every batch a partition serves, read in small steps so reads cross segments and start
/// at many index positions. Each returned batch must pass full validation.
pub fn read_all(p: &Partition) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = p.log_start_offset();
    loop {
        let read =
            p.read(offset, 700, Isolation::ReadUncommitted).unwrap_or_else(|e| panic!("read at {offset} failed: {e}"));
        if read.records.is_empty() {
            return out;
        }
        let batches = split_batches(&read.records);
        offset = BatchHeader::parse(batches.last().unwrap()).unwrap().next_offset();
        out.extend(batches);
    }
}

/// Splits read bytes into batches; each must pass full validation.
pub fn split_batches(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let total = batch_codec::batch_total_len(bytes, usize::MAX).expect("batch length");
        batch_codec::validate(&bytes[..total], usize::MAX).expect("served batches are valid");
        out.push(bytes[..total].to_vec());
        bytes = &bytes[total..];
    }
    out
}

/// A record as the producer sent it: key, value, headers, timestamp, offset delta.
pub type RecordFields = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(Vec<u8>, Option<Vec<u8>>)>, i64, i32);

/// The records of a batch, independent of the base offset the log assigned.
pub fn records_of(bytes: &[u8]) -> Vec<RecordFields> {
    let decoded = decode_records(bytes, 1 << 24).expect("stored batches decode");
    decoded
        .iter()
        .map(|r| {
            (
                r.key.map(<[u8]>::to_vec),
                r.value.map(<[u8]>::to_vec),
                r.headers.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect(),
                r.timestamp(),
                r.offset_delta,
            )
        })
        .collect()
}

/// Checks a partition after a restart: it holds exactly the acknowledged batches (same
/// offsets and records), optionally followed by whole batches from `unacked`, and nothing
/// else. Returns how many unacknowledged batches survived.
pub fn assert_acked_prefix(p: &Partition, acked: &[(i64, Vec<u8>)], unacked: &[Vec<u8>]) -> usize {
    let stored = read_all(p);
    assert!(stored.len() >= acked.len(), "{} batches stored, {} acknowledged", stored.len(), acked.len());
    for ((base, sent), got) in acked.iter().zip(&stored) {
        assert_eq!(BatchHeader::parse(got).unwrap().base_offset, *base, "acknowledged batch moved");
        assert_eq!(records_of(got), records_of(sent), "acknowledged batch at {base} changed");
    }
    let extra = &stored[acked.len()..];
    for got in extra {
        assert!(unacked.iter().any(|u| records_of(u) == records_of(got)), "a batch that was never sent is stored");
    }
    let mut next = 0;
    for got in &stored {
        let h = BatchHeader::parse(got).unwrap();
        assert_eq!(h.base_offset, next, "offsets are contiguous");
        next = h.next_offset();
    }
    assert_eq!(p.high_watermark(), next, "everything below the high watermark is served");
    extra.len()
}
