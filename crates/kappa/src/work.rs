//! `work`: the application's views as a worker against a Kafka cluster (crate
//! `kappa-kafka`, built with the `kafka` feature so the embedded build does not compile
//! librdkafka).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use clap::Args;
use kappa_views::{Schemas, View};

#[derive(Debug, Args)]
pub struct WorkArgs {
    /// The cluster's bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAPPA_BOOTSTRAP")]
    bootstrap: String,
    /// The consumer group the workers share (also the prefix of their transactional ids).
    /// Its members split the input partitions, so they must run the same views: a pool
    /// running only some of them (--views) must name its own group. [default: kappa-views]
    #[arg(long, env = "KAPPA_GROUP")]
    group: Option<String>,
    /// Where this worker serves the HTTP API (reads and subscriptions for every key).
    #[arg(long, env = "KAPPA_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// HTTP connections served at once; more wait in the kernel's backlog until one closes.
    #[arg(long, env = "KAPPA_HTTP_CONNECTIONS_MAX", default_value_t = kappa_http::CONNECTIONS_MAX_DEFAULT, value_parser = at_least_one)]
    http_connections_max: usize,
    /// How long a new HTTP connection may take to send its first request header.
    #[arg(long, env = "KAPPA_HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = kappa_http::HEADER_READ_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    http_header_read_timeout_ms: u64,
    /// How long an HTTP connection may sit between requests (never during a long-poll, an
    /// SSE stream or a WebSocket) before it is closed.
    #[arg(long, env = "KAPPA_HTTP_IDLE_CONNECTION_TIMEOUT_MS", default_value_t = kappa_http::IDLE_CONNECTION_TIMEOUT_MS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    http_idle_connection_timeout_ms: u64,
    /// A librdkafka setting for every client (security, timeouts), key=value; repeatable.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE")]
    kafka_config: Vec<String>,
    /// Run only these views (comma-separated); default: all of the application's.
    #[arg(long, value_delimiter = ',')]
    views: Option<Vec<String>>,
    /// Views keyed differently from their input (e.g. `owner_channels`, keyed by owner): run
    /// them through a repartition topic (comma-separated).
    #[arg(long, env = "KAPPA_REPARTITION", value_delimiter = ',')]
    repartition: Vec<String>,
    /// How often records stage 2 has committed are deleted from repartition topics
    /// (DeleteRecords; Kafka Streams' repartition.purge.interval.ms).
    #[arg(long, env = "KAPPA_REPARTITION_PURGE_INTERVAL_MS", default_value_t = 30_000)]
    repartition_purge_interval_ms: u64,
}

type Topics = Vec<(String, i32, BTreeMap<String, String>)>;

/// A count that must be at least 1 (no connection could be served at 0).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{text}' is not a whole number of at least 1")),
    }
}

/// The group of workers that run all of the application's views.
#[cfg(feature = "kafka")]
const DEFAULT_GROUP: &str = "kappa-views";

#[cfg(feature = "kafka")]
pub fn run(args: WorkArgs, topics: Topics, views: Vec<View>, schemas: Schemas) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use kappa_kafka::{WorkApp, WorkConfig};

    let kafka_config =
        args.kafka_config.iter().map(|kv| WorkConfig::parse_kafka_config(kv)).collect::<Result<_, _>>()?;
    let group = match args.group {
        Some(group) => group,
        None if kappa_kafka::runs_a_subset(&views, args.views.as_deref()) => anyhow::bail!(
            "--views runs only some of the application's views: give this pool its own --group \
             (the members of one group split its input partitions, so they must all run the same \
             views; in the default group `{DEFAULT_GROUP}` this pool's views would be built from \
             only the partitions it was given)"
        ),
        None => DEFAULT_GROUP.to_owned(),
    };
    let config = WorkConfig {
        bootstrap: args.bootstrap,
        group,
        http_listen: args.http_listen,
        http_connections_max: args.http_connections_max,
        http_timeouts: kappa_http::ConnectionTimeouts {
            header_read_timeout_ms: args.http_header_read_timeout_ms,
            idle_connection_timeout_ms: args.http_idle_connection_timeout_ms,
        },
        kafka_config,
        views: args.views,
        repartition: args.repartition,
        repartition_purge_interval: std::time::Duration::from_millis(args.repartition_purge_interval_ms),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("signal runtime");
            runtime.block_on(crate::app::shutdown_signal());
            tracing::info!("stopping: leaving the consumer group");
            stop.store(true, Ordering::Release);
        });
    }
    let app = WorkApp { topics, views, schemas, codec: Arc::new(kappa_views::JsonCodec) };
    kappa_kafka::run(config, app, stop)?;
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(not(feature = "kafka"))]
pub fn run(_: WorkArgs, _: Topics, _: Vec<View>, _: Schemas) -> anyhow::Result<()> {
    anyhow::bail!(
        "this binary was built without work mode: rebuild with the `kafka` feature, e.g. `cargo run --release --features kafka --example channels -- work ...`"
    )
}
