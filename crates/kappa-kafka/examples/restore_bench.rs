//! Restore rate: writes a changelog partition of `--keys` distinct keys (plus a step
//! marker) to a cluster, then times `restore` — what a worker does on assignment — into a
//! `PartitionView`.
//!
//! cargo run --release -p kappa-kafka --example restore_bench -- --bootstrap 127.0.0.1:9092 --keys 1000000

use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_kafka::WorkConfig;
use kappa_kafka::metrics::Metrics;
use kappa_kafka::restore::restore;
use kappa_kafka::topics::{TopicSpec, Topics};
use kappa_views::changelog::{MARKER_KEY, StepMarker};
use kappa_views::{Event, EventError, JsonCodec, PartitionView, Reducer, Schemas, View};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

struct Latest;

impl Reducer for Latest {
    type State = serde_json::Value;
    fn key(&self, event: &Event) -> Option<String> {
        event.key_str().map(str::to_owned)
    }
    fn apply(&self, _: Option<serde_json::Value>, _: &Event) -> Result<Option<serde_json::Value>, EventError> {
        Ok(None)
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_owned())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let bootstrap = arg("--bootstrap", "127.0.0.1:9092");
    let keys: u64 = arg("--keys", "1000000").parse()?;
    let runs: u32 = arg("--runs", "3").parse()?;
    let topic = format!("__kappa.view.restorebench{keys}.v1");
    let config = WorkConfig {
        bootstrap,
        group: "restore-bench".to_owned(),
        http_listen: "127.0.0.1:0".parse()?,
        http_connections_max: kappa_http::CONNECTIONS_MAX_DEFAULT,
        http_timeouts: kappa_http::ConnectionTimeouts::default(),
        kafka_config: Vec::new(),
        views: None,
        repartition: Vec::new(),
        repartition_purge_interval: kappa_kafka::config::REPARTITION_PURGE_INTERVAL_DEFAULT,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let topics = Topics::new(&config, runtime.handle().clone())?;
    let fresh = topics.partitions(&topic)?.is_none();
    topics.ensure(&TopicSpec::changelog(topic.clone(), 1))?;
    if fresh {
        write_changelog(&config, &topic, keys)?;
    }
    let view = View::reducer("restorebench", 1, &["bench-input"], Latest);
    for run in 1..=runs {
        let mut fold = PartitionView::new(&view, Arc::new(Schemas::new()), Arc::new(JsonCodec), "bench-input", 0)?;
        let restored = restore(&config, &topic, 0, &mut fold, &Metrics::default())?;
        println!(
            "run {run}: restored {} records ({} keys) in {:.2} s = {:.0} records/s",
            restored.records,
            fold.len(),
            restored.elapsed.as_secs_f64(),
            restored.records as f64 / restored.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// `keys` view changes with ~100-byte JSON values, then one step marker.
fn write_changelog(config: &WorkConfig, topic: &str, keys: u64) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    for i in 0..keys {
        let key = format!("channel-{i:08}");
        let value = format!(r#"{{"channelId":"{key}","name":"name {i}","ownerId":"u{}","content":{{}}}}"#, i % 1000);
        send(&producer, topic, key.as_bytes(), value.as_bytes());
    }
    let marker = StepMarker {
        positions: [("bench-input/0".to_owned(), keys as i64)].into_iter().collect(),
        events_applied: keys as i64,
        topic_ids: Default::default(),
    };
    send(&producer, topic, MARKER_KEY, &serde_json::to_vec(&marker)?);
    producer.flush(Duration::from_secs(300))?;
    println!("wrote {keys} changelog records in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &[u8], value: &[u8]) {
    let mut record = BaseRecord::to(topic).partition(0).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Restore progress (every 2 s) and the final rate go to stderr.
fn tracing_subscriber_init() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
}
