//! Server settings from, in order of precedence: command-line flags, `KAPPA_*` environment
//! variables, a TOML config file (`--config`), and defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kappa_log::SyncPolicy;
use serde::Deserialize;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of: data_dir, kafka_listen, http_listen, advertised_host, sync,
    /// maintenance_interval_ms, auto_create_topics, num_partitions, http_allowed_origins,
    /// http_connections_max, http_subscriber_queue_max, http_subscriber_stall_ms_max,
    /// http_subscriptions_per_connection_max, http_ws_message_bytes_max,
    /// http_ws_silence_ms_max, http_snapshot_items_max, http_page_items_max,
    /// http_request_body_bytes_max, http_as_of_concurrency_max, http_header_read_timeout_ms,
    /// http_idle_connection_timeout_ms, kafka_connections_max, kafka_request_bytes_max,
    /// kafka_idle_connection_timeout_ms, kafka_request_partitions_max,
    /// kafka_compressed_appends_max, kafka_requests_in_flight_per_connection_max,
    /// kafka_pending_replies_per_connection_max, kafka_request_bytes_buffered_max,
    /// kafka_frame_read_timeout_ms, kafka_response_write_timeout_ms,
    /// transactional_id_expiration_ms, transactional_ids_max, producer_id_expiration_ms,
    /// producers_per_partition_max.
    #[arg(long, env = "KAPPA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the log lives [default: ./kappa-data]
    #[arg(long, env = "KAPPA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Kafka protocol listener [default: 127.0.0.1:9092]
    #[arg(long, env = "KAPPA_KAFKA_LISTEN")]
    pub kafka_listen: Option<SocketAddr>,
    /// HTTP API listener [default: 127.0.0.1:8080]
    #[arg(long, env = "KAPPA_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Host name clients are told to connect to [default: the Kafka listener's IP]
    #[arg(long, env = "KAPPA_ADVERTISED_HOST")]
    pub advertised_host: Option<String>,
    /// Durability: "fsync" (acknowledge after fdatasync, with group commit) or
    /// "interval:<ms>" (acknowledge after write; sync every <ms>) [default: fsync]
    #[arg(long, env = "KAPPA_SYNC")]
    pub sync: Option<String>,
    /// How often retention and background flushes run, in ms [default: 30000]
    #[arg(long, env = "KAPPA_MAINTENANCE_INTERVAL_MS")]
    pub maintenance_interval_ms: Option<u64>,
    /// Create a topic when a client first asks for it (Kafka: auto.create.topics.enable)
    /// [default: true]
    #[arg(long, env = "KAPPA_AUTO_CREATE_TOPICS")]
    pub auto_create_topics: Option<bool>,
    /// Partitions of an auto-created topic (Kafka: num.partitions) [default: 1]
    #[arg(long, env = "KAPPA_NUM_PARTITIONS")]
    pub num_partitions: Option<i32>,
    /// Browser origins (comma-separated, or *) allowed to use the HTTP API besides the
    /// server's own [default: none]
    #[arg(long, env = "KAPPA_HTTP_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub http_allowed_origins: Option<Vec<String>>,
    /// Open HTTP connections, WebSockets included [default: 10000]
    #[arg(long, env = "KAPPA_HTTP_CONNECTIONS_MAX")]
    pub http_connections_max: Option<usize>,
    /// Messages queued per WebSocket/SSE connection [default: 1024]
    #[arg(long, env = "KAPPA_HTTP_SUBSCRIBER_QUEUE_MAX")]
    pub http_subscriber_queue_max: Option<usize>,
    /// How long a connection's full queue waits for its client to read before the client is
    /// cut off as too slow [default: 10000]
    #[arg(long, env = "KAPPA_HTTP_SUBSCRIBER_STALL_MS_MAX")]
    pub http_subscriber_stall_ms_max: Option<u64>,
    /// Subscriptions per WebSocket connection [default: 100]
    #[arg(long, env = "KAPPA_HTTP_SUBSCRIPTIONS_PER_CONNECTION_MAX")]
    pub http_subscriptions_per_connection_max: Option<usize>,
    /// The largest message a WebSocket client may send [default: 65536]
    #[arg(long, env = "KAPPA_HTTP_WS_MESSAGE_BYTES_MAX")]
    pub http_ws_message_bytes_max: Option<usize>,
    /// How long a WebSocket client may send nothing, not even the pongs to the server's pings
    /// (every third of this), before it is taken for gone [default: 90000]
    #[arg(long, env = "KAPPA_HTTP_WS_SILENCE_MS_MAX")]
    pub http_ws_silence_ms_max: Option<u64>,
    /// Keys in one subscription snapshot; a prefix matching more is refused [default: 10000]
    #[arg(long, env = "KAPPA_HTTP_SNAPSHOT_ITEMS_MAX")]
    pub http_snapshot_items_max: Option<usize>,
    /// Items per page of a view's key listing [default: 1000]
    #[arg(long, env = "KAPPA_HTTP_PAGE_ITEMS_MAX")]
    pub http_page_items_max: Option<usize>,
    /// The largest HTTP request body (produce, topic creation) [default: 8388608]
    #[arg(long, env = "KAPPA_HTTP_REQUEST_BODY_BYTES_MAX")]
    pub http_request_body_bytes_max: Option<usize>,
    /// As-of reads (each replays a view) running at once; more are answered 503 [default: 2]
    #[arg(long, env = "KAPPA_HTTP_AS_OF_CONCURRENCY_MAX")]
    pub http_as_of_concurrency_max: Option<usize>,
    /// How long a new HTTP connection may take to send its first request header before it is
    /// closed [default: 10000]
    #[arg(long, env = "KAPPA_HTTP_HEADER_READ_TIMEOUT_MS")]
    pub http_header_read_timeout_ms: Option<u64>,
    /// How long an HTTP connection may wait between requests (none in flight) before it is
    /// closed; never cuts a long-poll, an SSE stream or a WebSocket [default: 120000]
    #[arg(long, env = "KAPPA_HTTP_IDLE_CONNECTION_TIMEOUT_MS")]
    pub http_idle_connection_timeout_ms: Option<u64>,
    /// Open Kafka-protocol connections; more are accepted and closed at once (Kafka:
    /// max.connections) [default: 1024]
    #[arg(long, env = "KAPPA_KAFKA_CONNECTIONS_MAX")]
    pub kafka_connections_max: Option<usize>,
    /// The largest Kafka request frame; a larger one closes its connection (Kafka:
    /// socket.request.max.bytes) [default: 104857600]
    #[arg(long, env = "KAPPA_KAFKA_REQUEST_BYTES_MAX")]
    pub kafka_request_bytes_max: Option<usize>,
    /// How long a Kafka connection may go without a complete request before it is closed
    /// (Kafka: connections.max.idle.ms) [default: 600000]
    #[arg(long, env = "KAPPA_KAFKA_IDLE_CONNECTION_TIMEOUT_MS")]
    pub kafka_idle_connection_timeout_ms: Option<u64>,
    /// Topics, partitions, groups or config resources one Kafka request may name; a request
    /// naming more closes its connection [default: 100000]
    #[arg(long, env = "KAPPA_KAFKA_REQUEST_PARTITIONS_MAX")]
    pub kafka_request_partitions_max: Option<usize>,
    /// Kafka requests that inflate at once: produce requests with compressed batches (checking
    /// one inflates it, up to 64 MiB) or v0/v1 message sets, and fetch v0-3 answers holding
    /// compressed batches (down-converted for old clients); more wait their turn
    /// [default: 8]
    #[arg(long, env = "KAPPA_KAFKA_COMPRESSED_APPENDS_MAX")]
    pub kafka_compressed_appends_max: Option<usize>,
    /// Requests a Kafka connection may send ahead of the one being handled; past it the
    /// connection is not read until one is answered [default: 16]
    #[arg(long, env = "KAPPA_KAFKA_REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX")]
    pub kafka_requests_in_flight_per_connection_max: Option<usize>,
    /// Replies a Kafka connection may have waiting for their fsync (pipelined produces:
    /// one group commit) before it takes no more requests [default: 256]
    #[arg(long, env = "KAPPA_KAFKA_PENDING_REPLIES_PER_CONNECTION_MAX")]
    pub kafka_pending_replies_per_connection_max: Option<usize>,
    /// Memory for Kafka request frames being read or waiting to be handled, all connections
    /// together; raised to kafka_request_bytes_max if below it (Kafka:
    /// queued.max.request.bytes) [default: 134217728]
    #[arg(long, env = "KAPPA_KAFKA_REQUEST_BYTES_BUFFERED_MAX")]
    pub kafka_request_bytes_buffered_max: Option<usize>,
    /// Once a Kafka request's first byte has arrived, its size and then its body must each
    /// arrive within this, or the connection is closed [default: 30000]
    #[arg(long, env = "KAPPA_KAFKA_FRAME_READ_TIMEOUT_MS")]
    pub kafka_frame_read_timeout_ms: Option<u64>,
    /// A Kafka reply the peer takes no byte of for this long closes the connection
    /// [default: 600000]
    #[arg(long, env = "KAPPA_KAFKA_RESPONSE_WRITE_TIMEOUT_MS")]
    pub kafka_response_write_timeout_ms: Option<u64>,
    /// How long a transactional id with no transaction is remembered (Kafka:
    /// transactional.id.expiration.ms) [default: 604800000, 7 days]
    #[arg(long, env = "KAPPA_TRANSACTIONAL_ID_EXPIRATION_MS")]
    pub transactional_id_expiration_ms: Option<u64>,
    /// Transactional ids kept at most; past it the ones idle longest are forgotten early,
    /// as if expired [default: 100000]
    #[arg(long, env = "KAPPA_TRANSACTIONAL_IDS_MAX")]
    pub transactional_ids_max: Option<usize>,
    /// How long a partition remembers an idle producer's sequence numbers (duplicate
    /// detection) when it has no open transaction (Kafka: producer.id.expiration.ms)
    /// [default: 86400000, 1 day]
    #[arg(long, env = "KAPPA_PRODUCER_ID_EXPIRATION_MS")]
    pub producer_id_expiration_ms: Option<u64>,
    /// Producers a partition remembers at most; past it the least recently appending idle
    /// ones are forgotten early, as if expired [default: 100000]
    #[arg(long, env = "KAPPA_PRODUCERS_PER_PARTITION_MAX")]
    pub producers_per_partition_max: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    kafka_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    advertised_host: Option<String>,
    sync: Option<String>,
    maintenance_interval_ms: Option<u64>,
    auto_create_topics: Option<bool>,
    num_partitions: Option<i32>,
    http_allowed_origins: Option<Vec<String>>,
    http_connections_max: Option<usize>,
    http_subscriber_queue_max: Option<usize>,
    http_subscriber_stall_ms_max: Option<u64>,
    http_subscriptions_per_connection_max: Option<usize>,
    http_ws_message_bytes_max: Option<usize>,
    http_ws_silence_ms_max: Option<u64>,
    http_snapshot_items_max: Option<usize>,
    http_page_items_max: Option<usize>,
    http_request_body_bytes_max: Option<usize>,
    http_as_of_concurrency_max: Option<usize>,
    http_header_read_timeout_ms: Option<u64>,
    http_idle_connection_timeout_ms: Option<u64>,
    kafka_connections_max: Option<usize>,
    kafka_request_bytes_max: Option<usize>,
    kafka_idle_connection_timeout_ms: Option<u64>,
    kafka_request_partitions_max: Option<usize>,
    kafka_compressed_appends_max: Option<usize>,
    kafka_requests_in_flight_per_connection_max: Option<usize>,
    kafka_pending_replies_per_connection_max: Option<usize>,
    kafka_request_bytes_buffered_max: Option<usize>,
    kafka_frame_read_timeout_ms: Option<u64>,
    kafka_response_write_timeout_ms: Option<u64>,
    transactional_id_expiration_ms: Option<u64>,
    transactional_ids_max: Option<usize>,
    producer_id_expiration_ms: Option<u64>,
    producers_per_partition_max: Option<usize>,
}

/// The resolved settings `serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub kafka_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub advertised_host: String,
    pub sync_policy: SyncPolicy,
    pub maintenance_interval: Duration,
    pub auto_create_topics: bool,
    pub num_partitions: i32,
    pub http: kappa_http::HttpConfig,
    pub http_timeouts: kappa_http::ConnectionTimeouts,
    /// The Kafka listener's limits (the rest at their defaults).
    pub kafka_limits: kappa_broker::server::Limits,
    pub kafka_compressed_appends_max: usize,
    pub transactional_id_expiration_ms: i64,
    pub transactional_ids_max: usize,
    pub producer_id_expiration_ms: i64,
    pub producers_per_partition_max: usize,
}

impl Settings {
    pub fn resolve(args: ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file_settings(path)?,
            None => FileSettings::default(),
        };
        let http = http_config(&args, &file)?;
        let http_timeouts = http_timeouts(&args, &file)?;
        let kafka_limits = kafka_limits(&args, &file)?;
        let kafka_listen =
            args.kafka_listen.or(file.kafka_listen).unwrap_or_else(|| "127.0.0.1:9092".parse().expect("valid default"));
        let sync = args.sync.or(file.sync).unwrap_or_else(|| "fsync".to_owned());
        let maintenance_interval_ms = args.maintenance_interval_ms.or(file.maintenance_interval_ms).unwrap_or(30_000);
        if maintenance_interval_ms == 0 {
            bail!("maintenance_interval_ms must be at least 1");
        }
        let num_partitions = args.num_partitions.or(file.num_partitions).unwrap_or(1);
        let transactional_id_expiration_ms = positive_ms(
            "transactional_id_expiration_ms",
            args.transactional_id_expiration_ms.or(file.transactional_id_expiration_ms),
            604_800_000,
        )?;
        let producer_id_expiration_ms = positive_ms(
            "producer_id_expiration_ms",
            args.producer_id_expiration_ms.or(file.producer_id_expiration_ms),
            kappa_log::log::PRODUCER_ID_EXPIRATION_MS_DEFAULT as u64,
        )?;
        let transactional_ids_max = positive(
            "transactional_ids_max",
            args.transactional_ids_max.or(file.transactional_ids_max),
            kappa_coordinator::txn::TRANSACTIONAL_IDS_MAX_DEFAULT,
        )?;
        let kafka_compressed_appends_max = positive(
            "kafka_compressed_appends_max",
            args.kafka_compressed_appends_max.or(file.kafka_compressed_appends_max),
            kappa_broker::COMPRESSED_APPENDS_MAX_DEFAULT,
        )?;
        let producers_per_partition_max = positive(
            "producers_per_partition_max",
            args.producers_per_partition_max.or(file.producers_per_partition_max),
            kappa_log::log::PRODUCERS_PER_PARTITION_MAX_DEFAULT,
        )?;
        if !(1..=kappa_log::log::PARTITIONS_MAX).contains(&num_partitions) {
            bail!("num_partitions must be between 1 and {}, got {num_partitions}", kappa_log::log::PARTITIONS_MAX);
        }
        Ok(Self {
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./kappa-data")),
            kafka_listen,
            http_listen: args
                .http_listen
                .or(file.http_listen)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid default")),
            advertised_host: args
                .advertised_host
                .or(file.advertised_host)
                .unwrap_or_else(|| kafka_listen.ip().to_string()),
            sync_policy: parse_sync_policy(&sync)?,
            maintenance_interval: Duration::from_millis(maintenance_interval_ms),
            auto_create_topics: args.auto_create_topics.or(file.auto_create_topics).unwrap_or(true),
            num_partitions,
            http,
            http_timeouts,
            kafka_limits,
            kafka_compressed_appends_max,
            transactional_id_expiration_ms,
            transactional_ids_max,
            producer_id_expiration_ms,
            producers_per_partition_max,
        })
    }
}

/// A duration in ms that must be at least 1 and fit an i64.
fn positive_ms(name: &str, value: Option<u64>, default: u64) -> anyhow::Result<i64> {
    match value.unwrap_or(default) {
        0 => bail!("{name} must be at least 1 ms"),
        ms => i64::try_from(ms).map_err(|_| anyhow::anyhow!("{name} must be at most {} ms, got {ms}", i64::MAX)),
    }
}

/// A count that must be at least 1.
fn positive(name: &str, value: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match value {
        Some(0) => bail!("{name} must be at least 1"),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn http_config(args: &ServeArgs, file: &FileSettings) -> anyhow::Result<kappa_http::HttpConfig> {
    let defaults = kappa_http::HttpConfig::default();
    Ok(kappa_http::HttpConfig {
        allowed_origins: checked_origins(
            args.http_allowed_origins.clone().or_else(|| file.http_allowed_origins.clone()).unwrap_or_default(),
        )?,
        connections_max: positive(
            "http_connections_max",
            args.http_connections_max.or(file.http_connections_max),
            defaults.connections_max,
        )?,
        subscriber_queue_max: positive(
            "http_subscriber_queue_max",
            args.http_subscriber_queue_max.or(file.http_subscriber_queue_max),
            defaults.subscriber_queue_max,
        )?,
        subscriber_stall_ms_max: positive_ms(
            "http_subscriber_stall_ms_max",
            args.http_subscriber_stall_ms_max.or(file.http_subscriber_stall_ms_max),
            defaults.subscriber_stall_ms_max,
        )? as u64,
        subscriptions_per_connection_max: positive(
            "http_subscriptions_per_connection_max",
            args.http_subscriptions_per_connection_max.or(file.http_subscriptions_per_connection_max),
            defaults.subscriptions_per_connection_max,
        )?,
        ws_message_bytes_max: positive(
            "http_ws_message_bytes_max",
            args.http_ws_message_bytes_max.or(file.http_ws_message_bytes_max),
            defaults.ws_message_bytes_max,
        )?,
        ws_silence_ms_max: positive_ms(
            "http_ws_silence_ms_max",
            args.http_ws_silence_ms_max.or(file.http_ws_silence_ms_max),
            defaults.ws_silence_ms_max,
        )? as u64,
        snapshot_items_max: positive(
            "http_snapshot_items_max",
            args.http_snapshot_items_max.or(file.http_snapshot_items_max),
            defaults.snapshot_items_max,
        )?,
        page_items_max: positive(
            "http_page_items_max",
            args.http_page_items_max.or(file.http_page_items_max),
            defaults.page_items_max,
        )?,
        request_body_bytes_max: positive(
            "http_request_body_bytes_max",
            args.http_request_body_bytes_max.or(file.http_request_body_bytes_max),
            defaults.request_body_bytes_max,
        )?,
        as_of_concurrency_max: positive(
            "http_as_of_concurrency_max",
            args.http_as_of_concurrency_max.or(file.http_as_of_concurrency_max),
            defaults.as_of_concurrency_max,
        )?,
    })
}

fn http_timeouts(args: &ServeArgs, file: &FileSettings) -> anyhow::Result<kappa_http::ConnectionTimeouts> {
    Ok(kappa_http::ConnectionTimeouts {
        header_read_timeout_ms: positive_ms(
            "http_header_read_timeout_ms",
            args.http_header_read_timeout_ms.or(file.http_header_read_timeout_ms),
            kappa_http::HEADER_READ_TIMEOUT_MS_DEFAULT,
        )? as u64,
        idle_connection_timeout_ms: positive_ms(
            "http_idle_connection_timeout_ms",
            args.http_idle_connection_timeout_ms.or(file.http_idle_connection_timeout_ms),
            kappa_http::IDLE_CONNECTION_TIMEOUT_MS_DEFAULT,
        )? as u64,
    })
}

fn kafka_limits(args: &ServeArgs, file: &FileSettings) -> anyhow::Result<kappa_broker::server::Limits> {
    let defaults = kappa_broker::server::Limits::default();
    let request_bytes_max = positive(
        "kafka_request_bytes_max",
        args.kafka_request_bytes_max.or(file.kafka_request_bytes_max),
        defaults.request_bytes_max,
    )?;
    // A frame's size is an i32 on the wire.
    if request_bytes_max > i32::MAX as usize {
        bail!("kafka_request_bytes_max must be at most {} (a Kafka frame's size is an i32)", i32::MAX);
    }
    let timeout = |name: &str, value: Option<u64>, default: Duration| {
        positive_ms(name, value, default.as_millis() as u64).map(|ms| Duration::from_millis(ms as u64))
    };
    Ok(kappa_broker::server::Limits {
        connections_max: positive(
            "kafka_connections_max",
            args.kafka_connections_max.or(file.kafka_connections_max),
            defaults.connections_max,
        )?,
        request_bytes_max,
        idle_timeout: timeout(
            "kafka_idle_connection_timeout_ms",
            args.kafka_idle_connection_timeout_ms.or(file.kafka_idle_connection_timeout_ms),
            defaults.idle_timeout,
        )?,
        request_partitions_max: positive(
            "kafka_request_partitions_max",
            args.kafka_request_partitions_max.or(file.kafka_request_partitions_max),
            defaults.request_partitions_max,
        )?,
        in_flight_per_connection: positive(
            "kafka_requests_in_flight_per_connection_max",
            args.kafka_requests_in_flight_per_connection_max.or(file.kafka_requests_in_flight_per_connection_max),
            defaults.in_flight_per_connection,
        )?,
        pending_replies_per_connection: positive(
            "kafka_pending_replies_per_connection_max",
            args.kafka_pending_replies_per_connection_max.or(file.kafka_pending_replies_per_connection_max),
            defaults.pending_replies_per_connection,
        )?,
        request_bytes_buffered_max: positive(
            "kafka_request_bytes_buffered_max",
            args.kafka_request_bytes_buffered_max.or(file.kafka_request_bytes_buffered_max),
            defaults.request_bytes_buffered_max,
        )?,
        frame_read_timeout: timeout(
            "kafka_frame_read_timeout_ms",
            args.kafka_frame_read_timeout_ms.or(file.kafka_frame_read_timeout_ms),
            defaults.frame_read_timeout,
        )?,
        response_write_timeout: timeout(
            "kafka_response_write_timeout_ms",
            args.kafka_response_write_timeout_ms.or(file.kafka_response_write_timeout_ms),
            defaults.response_write_timeout,
        )?,
        ..defaults
    })
}

fn read_file_settings(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    // An unknown key's error lists every key the file may hold (`deny_unknown_fields`).
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Browser origins as browsers send them (`scheme://host[:port]` with no path — any scheme:
/// `capacitor://localhost`, `chrome-extension://<id>` — or `null`), or `*`: an entry in
/// another shape would match no request, silently.
fn checked_origins(origins: Vec<String>) -> anyhow::Result<Vec<String>> {
    for origin in &origins {
        let scheme_ok = |scheme: &str| {
            scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        };
        let well_formed = origin == "*"
            || origin == "null"
            || origin.split_once("://").is_some_and(|(scheme, host)| {
                scheme_ok(scheme) && !host.is_empty() && !host.contains(['/', '?', '#', ' ', ','])
            });
        anyhow::ensure!(
            well_formed,
            "http_allowed_origins: '{origin}' is not a browser origin; write scheme://host[:port] with no path, e.g. https://app.example or http://localhost:3000 (or null, or * for any)"
        );
    }
    Ok(origins)
}

fn parse_sync_policy(value: &str) -> anyhow::Result<SyncPolicy> {
    if value == "fsync" {
        return Ok(SyncPolicy::EveryAppend);
    }
    if let Some(ms) = value.strip_prefix("interval:") {
        let ms: u64 = ms.parse().ok().filter(|&ms| ms > 0).with_context(|| {
            format!("sync policy '{value}': the interval must be a whole number of milliseconds >= 1")
        })?;
        return Ok(SyncPolicy::IntervalMs(ms));
    }
    bail!("unknown sync policy '{value}': use 'fsync' or 'interval:<ms>'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_origins_must_be_origins() {
        let ok = [
            "*",
            "null",
            "https://app.example",
            "http://localhost:3000",
            "capacitor://localhost",
            "chrome-extension://abcdef",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(checked_origins(ok.clone()).unwrap(), ok);
        for bad in ["not an origin", "app.example", "https://app.example/", "https://", "1http://x", "https://a b"] {
            let error = checked_origins(vec![bad.to_owned()]).unwrap_err().to_string();
            assert!(error.contains(&format!("'{bad}' is not a browser origin")), "{error}");
        }
    }

    #[test]
    fn an_unknown_config_file_key_is_named_with_the_keys_there_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kappa.toml");
        std::fs::write(&path, "http_page_item_max = 5\n").unwrap();
        let error = format!("{:#}", read_file_settings(&path).unwrap_err());
        assert!(error.contains("http_page_item_max") && error.contains("http_page_items_max"), "{error}");
        assert_eq!(error.matches("http_page_items_max").count(), 1, "the keys are listed once: {error}");
    }

    #[test]
    fn sync_policies_parse_and_bad_ones_say_what_to_use() {
        assert_eq!(parse_sync_policy("fsync").unwrap(), SyncPolicy::EveryAppend);
        assert_eq!(parse_sync_policy("interval:50").unwrap(), SyncPolicy::IntervalMs(50));
        assert!(parse_sync_policy("interval:0").is_err());
        assert!(parse_sync_policy("sometimes").unwrap_err().to_string().contains("interval:<ms>"));
    }

    #[test]
    fn expiration_times_default_to_kafkas_and_refuse_zero_and_overflow() {
        assert_eq!(positive_ms("x_ms", None, 7).unwrap(), 7);
        assert_eq!(positive_ms("x_ms", Some(1), 7).unwrap(), 1);
        assert!(positive_ms("x_ms", Some(0), 7).unwrap_err().to_string().contains("x_ms must be at least 1 ms"));
        assert!(positive_ms("x_ms", Some(u64::MAX), 7).unwrap_err().to_string().contains("at most"));
        let file: FileSettings = toml::from_str(
            "producer_id_expiration_ms = 5\ntransactional_id_expiration_ms = 6\nproducers_per_partition_max = 7\ntransactional_ids_max = 8",
        )
        .unwrap();
        assert_eq!(file.transactional_ids_max, Some(8));
        assert_eq!((file.producer_id_expiration_ms, file.transactional_id_expiration_ms), (Some(5), Some(6)));
        assert_eq!(file.producers_per_partition_max, Some(7));
        assert!(positive("n_max", Some(0), 3).unwrap_err().to_string().contains("n_max must be at least 1"));
    }

    #[test]
    fn http_limits_come_from_flags_then_the_file_then_defaults() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from(args).unwrap().serve;
        let flags = parse(&["kappa", "--http-page-items-max", "50", "--http-ws-silence-ms-max", "3000"]);
        let file: FileSettings = toml::from_str("http_page_items_max = 7\nhttp_snapshot_items_max = 9").unwrap();
        let config = http_config(&flags, &file).unwrap();
        assert_eq!((config.page_items_max, config.snapshot_items_max, config.ws_silence_ms_max), (50, 9, 3000));
        let defaults = kappa_http::HttpConfig::default();
        assert_eq!(config.request_body_bytes_max, defaults.request_body_bytes_max);
        assert_eq!(config.ws_message_bytes_max, defaults.ws_message_bytes_max);
        let zero = parse(&["kappa", "--http-snapshot-items-max", "0"]);
        let error = http_config(&zero, &file).unwrap_err().to_string();
        assert!(error.contains("http_snapshot_items_max must be at least 1"), "{error}");
        let file: FileSettings = toml::from_str("http_idle_connection_timeout_ms = 5000").unwrap();
        let timeouts = http_timeouts(&parse(&["kappa", "--http-header-read-timeout-ms", "2000"]), &file).unwrap();
        assert_eq!((timeouts.header_read_timeout_ms, timeouts.idle_connection_timeout_ms), (2000, 5000));
        assert_eq!(http_timeouts(&parse(&["kappa"]), &FileSettings::default()).unwrap(), Default::default());
    }

    #[test]
    fn kafka_limits_come_from_flags_then_the_file_then_defaults_and_refuse_bad_values() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from(args).unwrap().serve;
        let file: FileSettings = toml::from_str("kafka_connections_max = 9\nkafka_request_partitions_max = 5").unwrap();
        let flags = parse(&["kappa", "--kafka-connections-max", "3", "--kafka-idle-connection-timeout-ms", "1500"]);
        let limits = kafka_limits(&flags, &file).unwrap();
        assert_eq!((limits.connections_max, limits.request_partitions_max), (3, 5));
        assert_eq!(limits.idle_timeout, Duration::from_millis(1500));
        let defaults = kappa_broker::server::Limits::default();
        assert_eq!(limits.request_bytes_max, defaults.request_bytes_max);
        assert_eq!(limits.in_flight_per_connection, defaults.in_flight_per_connection);
        let error = kafka_limits(&parse(&["kappa", "--kafka-request-bytes-max", "0"]), &file).unwrap_err();
        assert!(error.to_string().contains("kafka_request_bytes_max must be at least 1"), "{error}");
        let huge = parse(&["kappa", "--kafka-request-bytes-max", "4294967296"]);
        assert!(kafka_limits(&huge, &file).unwrap_err().to_string().contains("i32"));

        let file: FileSettings = toml::from_str(
            "kafka_requests_in_flight_per_connection_max = 4\nkafka_request_bytes_buffered_max = 1000\nkafka_response_write_timeout_ms = 7000",
        )
        .unwrap();
        let flags = parse(&[
            "kappa",
            "--kafka-pending-replies-per-connection-max",
            "9",
            "--kafka-frame-read-timeout-ms",
            "250",
        ]);
        let limits = kafka_limits(&flags, &file).unwrap();
        assert_eq!((limits.in_flight_per_connection, limits.pending_replies_per_connection), (4, 9));
        assert_eq!(limits.request_bytes_buffered_max, 1000, "the server raises it to request_bytes_max itself");
        assert_eq!(limits.frame_read_timeout, Duration::from_millis(250));
        assert_eq!(limits.response_write_timeout, Duration::from_millis(7000));
        let error = kafka_limits(&parse(&["kappa", "--kafka-frame-read-timeout-ms", "0"]), &file).unwrap_err();
        assert!(error.to_string().contains("kafka_frame_read_timeout_ms must be at least 1 ms"), "{error}");

        let resolve = |args: &[&str]| Settings::resolve(parse(args)).map(|s| s.kafka_compressed_appends_max);
        assert_eq!(resolve(&["kappa"]).unwrap(), kappa_broker::COMPRESSED_APPENDS_MAX_DEFAULT);
        assert_eq!(resolve(&["kappa", "--kafka-compressed-appends-max", "2"]).unwrap(), 2);
        let error = resolve(&["kappa", "--kafka-compressed-appends-max", "0"]).unwrap_err().to_string();
        assert!(error.contains("kafka_compressed_appends_max must be at least 1"), "{error}");
        let file: FileSettings = toml::from_str("kafka_compressed_appends_max = 4").unwrap();
        assert_eq!(file.kafka_compressed_appends_max, Some(4));
    }
}
