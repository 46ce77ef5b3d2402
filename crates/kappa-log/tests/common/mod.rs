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
    LogOptions { sync_policy: SyncPolicy::EveryAppend, fs, clock: Arc::new(clock.clone()), ..LogOptions::default() }
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

/// One record as a test model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp: i64,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Decodes every record of a read's bytes (every batch is validated on the way).
pub fn records_of(bytes: &[u8]) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let total = BatchHeader::parse(rest).expect("batch header").total_bytes();
        let decoded = kappa_log::records::decode_records(&rest[..total], usize::MAX).expect("decodable batch");
        if !decoded.header().is_control() {
            for r in decoded.iter() {
                out.push(Rec {
                    offset: r.offset(),
                    key: r.key.map(<[u8]>::to_vec),
                    value: r.value.map(<[u8]>::to_vec),
                    timestamp: r.timestamp(),
                    headers: r.headers.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect(),
                });
            }
        }
        rest = &rest[total..];
    }
    out
}

/// Proptest cases: `base`, or `soak` when the env var SOAK is set.
pub fn cases(base: u32, soak: u32) -> u32 {
    if std::env::var_os("SOAK").is_some() { soak } else { base }
}

/// The `.log` files of a partition directory on the real file system: (base offset, size).
pub fn segment_files(dir: &Path) -> Vec<(i64, u64)> {
    let mut out: Vec<(i64, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let base = kappa_log::segment::parse_log_file_name(&name)?;
            Some((base, e.metadata().ok()?.len()))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Reads a partition from `from` to its high watermark with a large budget, page by page.
pub fn read_all(p: &kappa_log::Partition, from: i64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < p.high_watermark() {
        let read = p.read(offset, 1 << 20, kappa_log::Isolation::ReadUncommitted).expect("read");
        let hs = headers(&read.records);
        let Some(last) = hs.last() else { break };
        offset = last.next_offset();
        out.extend_from_slice(&read.records);
    }
    out
}

/// Every batch a partition serves, read in small steps so reads cross segments and start
/// at many index positions. Each returned batch must pass full validation.
pub fn read_all_batches(p: &Partition) -> Vec<Vec<u8>> {
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
pub fn batch_records(bytes: &[u8]) -> Vec<RecordFields> {
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
    let stored = read_all_batches(p);
    assert!(stored.len() >= acked.len(), "{} batches stored, {} acknowledged", stored.len(), acked.len());
    for ((base, sent), got) in acked.iter().zip(&stored) {
        assert_eq!(BatchHeader::parse(got).unwrap().base_offset, *base, "acknowledged batch moved");
        assert_eq!(batch_records(got), batch_records(sent), "acknowledged batch at {base} changed");
    }
    let extra = &stored[acked.len()..];
    for got in extra {
        assert!(
            unacked.iter().any(|u| batch_records(u) == batch_records(got)),
            "a batch that was never sent is stored"
        );
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
