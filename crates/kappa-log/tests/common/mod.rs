//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kappa_log::batch::BatchHeader;
use kappa_log::clock::ManualClock;
use kappa_log::io::Storage;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Log, LogOptions, SyncPolicy};

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
