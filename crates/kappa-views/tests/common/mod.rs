//! A real log in a temp directory plus helpers to write events and run the engine on it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kappa_log::records::{BatchBuilder, ControlType, NewRecord};
use kappa_log::{Log, LogOptions};
use kappa_views::{EmbeddedLog, EngineConfig, Schemas, View, ViewEngine};
use serde_json::Value;

pub const TOPIC: &str = "events";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub log: Arc<Log>,
}

impl Fixture {
    pub fn new(partitions: i32) -> Self {
        Self::with_configs(partitions, &[])
    }

    /// A fixture whose topic has these config overrides.
    pub fn with_configs(partitions: i32, configs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(Log::open(&dir.path().join("log"), LogOptions::default()).expect("open log").0);
        let configs: BTreeMap<String, String> =
            configs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        log.create_topic(TOPIC, partitions, &configs).expect("create topic");
        Self { dir, log }
    }

    pub fn views_dir(&self) -> PathBuf {
        self.dir.path().join("views")
    }

    pub fn engine(&self, schemas: Schemas, views: Vec<View>) -> ViewEngine {
        let config = EngineConfig { schemas, ..EngineConfig::new(self.views_dir()) };
        ViewEngine::start(Arc::new(EmbeddedLog::new(self.log.clone())), config, views).expect("start engine")
    }

    /// Appends one batch of plain records to a partition; returns the first offset.
    pub fn append(&self, partition: i32, records: Vec<NewRecord>) -> i64 {
        let mut builder = BatchBuilder::new();
        for record in records {
            builder.push(record);
        }
        self.log.partition(TOPIC, partition).unwrap().append(builder.build()).unwrap().base_offset
    }

    /// Appends a transactional batch for `producer_id` (no marker).
    pub fn append_transactional(
        &self,
        partition: i32,
        producer_id: i64,
        sequence: i32,
        records: Vec<NewRecord>,
    ) -> i64 {
        let mut builder = BatchBuilder::new().producer(producer_id, 0, sequence).transactional(true);
        for record in records {
            builder.push(record);
        }
        self.log.partition(TOPIC, partition).unwrap().append(builder.build()).unwrap().base_offset
    }

    pub fn end_transaction(&self, partition: i32, producer_id: i64, commit: bool) {
        let control = if commit { ControlType::Commit } else { ControlType::Abort };
        let marker = BatchBuilder::control_marker(producer_id, 0, control, 0, now_ms()).build();
        self.log.partition(TOPIC, partition).unwrap().append(marker).unwrap();
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A record with a JSON value and optional type/version headers.
pub fn event(
    key: &str,
    value: Option<Value>,
    event_type: Option<&str>,
    version: Option<u32>,
    timestamp: i64,
) -> NewRecord {
    let bytes = value.map(|v| serde_json::to_vec(&v).unwrap());
    let mut record = NewRecord::new(Some(key.as_bytes()), bytes.as_deref(), timestamp);
    if let Some(t) = event_type {
        record = record.header("kappa.type", Some(t.as_bytes()));
    }
    if let Some(v) = version {
        record = record.header("kappa.version", Some(v.to_string().as_bytes()));
    }
    record
}

pub fn wait_caught_up(engine: &ViewEngine, view: &str) {
    assert!(
        engine.wait_caught_up(view, Duration::from_secs(60)).expect("view failed"),
        "view {view} did not catch up within 60 s: {:?}",
        engine.describe(view)
    );
}

/// Every key → JSON value of the serving version.
pub fn dump(engine: &ViewEngine, view: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let limit = kappa_views::ScanLimit { items: 1000, bytes: 64 * 1024 * 1024 };
        let page = engine.scan(view, "", after.as_deref(), limit).expect("scan").value;
        after = page.items.last().map(|i| i.key.clone());
        for item in page.items {
            out.insert(item.key, serde_json::from_slice(&item.json).unwrap());
        }
        if !page.more {
            return out;
        }
    }
}

/// Folds a view's changelog topic into key → value (latest per key, deletions applied),
/// checking every step ends in a marker.
pub fn fold_changelog(log: &Log, topic: &str) -> BTreeMap<String, Value> {
    let partition = log.partition(topic, 0).unwrap();
    let mut out = BTreeMap::new();
    let mut offset = partition.log_start_offset();
    let end = partition.high_watermark();
    while offset < end {
        let read = partition.read(offset, 1 << 20, kappa_log::Isolation::ReadUncommitted).unwrap();
        let mut rest = read.records.as_slice();
        while !rest.is_empty() {
            let len = kappa_log::batch::batch_total_len(rest, rest.len()).unwrap();
            let (batch, tail) = rest.split_at(len);
            rest = tail;
            let records = kappa_log::records::decode_records(batch, 1 << 26).unwrap();
            let count = records.len();
            for (i, record) in records.iter().enumerate() {
                let key = record.key.unwrap();
                if i + 1 == count {
                    assert_eq!(
                        key,
                        kappa_views::changelog::MARKER_KEY,
                        "every changelog batch ends with a step marker"
                    );
                    continue;
                }
                assert_ne!(key, kappa_views::changelog::MARKER_KEY, "a step marker is the last record of its batch");
                if key.first() == Some(&kappa_views::changelog::INTERNAL_KEY_PREFIX) {
                    continue;
                }
                let key = String::from_utf8(key.to_vec()).unwrap();
                match record.value {
                    Some(v) => out.insert(key, serde_json::from_slice(v).unwrap()),
                    None => out.remove(&key),
                };
            }
            offset = kappa_log::batch::BatchHeader::parse(batch).unwrap().last_offset() + 1;
        }
    }
    out
}
