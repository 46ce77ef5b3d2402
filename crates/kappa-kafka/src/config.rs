//! What a worker is told, and the librdkafka configurations built from it.

use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{Result, WorkError};

/// Input records collected into one step per partition (at most; a step also ends when
/// `STEP_WAIT` passes).
pub const STEP_RECORDS_MAX: usize = 50_000;
/// How long records are collected before the owned partitions' steps run.
pub const STEP_WAIT: Duration = Duration::from_millis(50);
/// One call of `init_transactions` or `send_offsets_to_transaction` may block this long
/// before it is called again (`TRANSACTION_CALL_ATTEMPTS_MAX`). Commits and aborts use -1
/// instead: the transaction's remaining time, as librdkafka recommends.
pub const TRANSACTION_OP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a transactional call that librdkafka reports retriable (a timeout: the
/// operation goes on in the background) is made before the worker stops.
pub const TRANSACTION_CALL_ATTEMPTS_MAX: u32 = 5;
/// Default `transaction.timeout.ms`: how long a crashed worker's open transaction can hold
/// back read_committed readers before the broker aborts it (a new owner aborts it sooner).
pub const TRANSACTION_TIMEOUT_MS_DEFAULT: u32 = 10_000;
/// Default `session.timeout.ms`: how soon a crashed worker's partitions move.
pub const SESSION_TIMEOUT_MS_DEFAULT: u32 = 10_000;
/// Default `max.poll.interval.ms` of the group consumer (librdkafka's is 300,000). A
/// partition's restore runs inside the rebalance callback, i.e. between two polls, so a
/// restore longer than this would get the worker thrown out of the group, rejoin and restore
/// again for ever. The price: a worker whose group thread hangs keeps its partitions this
/// long, and a rebalance may wait this long for a member that is restoring.
pub const MAX_POLL_INTERVAL_MS_DEFAULT: u32 = 3_600_000;
/// Default `WorkConfig::repartition_purge_interval` (Kafka Streams' default too).
pub const REPARTITION_PURGE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// `max.message.bytes` of a changelog topic (a step's batch; as the embedded changelogs).
pub const CHANGELOG_MESSAGE_BYTES_MAX: usize = 33 * 1024 * 1024;

/// A worker's settings (`work` on the command line).
#[derive(Debug, Clone)]
pub struct WorkConfig {
    /// `host:port,...` of the Kafka cluster.
    pub bootstrap: String,
    /// The consumer group the workers share; also the prefix of their transactional ids.
    /// One group per view set and version: [`crate::default_group`] derives one from them.
    pub group: String,
    pub http_listen: SocketAddr,
    /// HTTP connections served at once; more wait in the kernel's backlog
    /// (`kappa_http::CONNECTIONS_MAX_DEFAULT`).
    pub http_connections_max: usize,
    /// When an HTTP connection that sends no request is closed (`kappa_http::ConnectionTimeouts`).
    pub http_timeouts: kappa_http::ConnectionTimeouts,
    /// Passed to every librdkafka client as is (security settings, timeouts); they win
    /// over kappa's defaults.
    pub kafka_config: Vec<(String, String)>,
    /// Views to run (all of the application's when None).
    pub views: Option<Vec<String>>,
    /// Views keyed differently from their input: run through a repartition topic.
    pub repartition: Vec<String>,
    /// How often what stage 2 has consumed is deleted from the repartition topics
    /// (`REPARTITION_PURGE_INTERVAL_DEFAULT`, as Kafka Streams' `repartition.purge.interval.ms`).
    pub repartition_purge_interval: Duration,
}

impl WorkConfig {
    /// Parses one `--kafka-config key=value`.
    pub fn parse_kafka_config(text: &str) -> Result<(String, String)> {
        match text.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
            _ => Err(WorkError::BadConfig(text.to_owned())),
        }
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config.set("client.id", format!("kappa-work-{}", self.group));
        config
    }

    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.kafka_config {
            config.set(key, value);
        }
        config
    }

    /// The group member: cooperative-sticky, read_committed, offsets only through
    /// transactions.
    pub fn group_consumer(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", &self.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS_DEFAULT.to_string())
            .set("max.poll.interval.ms", MAX_POLL_INTERVAL_MS_DEFAULT.to_string())
            // As for changelog readers: no 1 s pause between fetches of a partition with a
            // backlog (a rebuild); memory stays bounded by `queued.max.messages.kbytes`.
            .set("queued.min.messages", "10000000")
            .set("fetch.queue.backoff.ms", "0");
        self.finish(config)
    }

    /// A reader of changelog partitions (restore, read replica): assigned, not a group
    /// member; read_committed so aborted steps are never seen.
    pub fn changelog_reader(&self, eof: bool) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", format!("{}.readers", self.group))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", if eof { "true" } else { "false" })
            .set("fetch.wait.max.ms", "100")
            .set("auto.offset.reset", "earliest")
            .set("fetch.max.bytes", (64 * 1024 * 1024).to_string())
            .set("max.partition.fetch.bytes", (16 * 1024 * 1024).to_string())
            .set("queued.max.messages.kbytes", (256 * 1024).to_string())
            // librdkafka ≥ 2.2 postpones the next fetch by `fetch.queue.backoff.ms` (1 s by
            // default) while more than `queued.min.messages` (100,000) are queued: a restore
            // of 1 M records then waits ~1 s per fetch. Keep fetching while under the byte
            // bound instead.
            .set("queued.min.messages", "10000000")
            .set("fetch.queue.backoff.ms", "0");
        self.finish(config)
    }

    /// The transactional producer of one input partition.
    pub fn producer(&self, transactional_id: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.max.bytes", CHANGELOG_MESSAGE_BYTES_MAX.to_string())
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS_DEFAULT.to_string());
        self.finish(config)
    }

    /// The admin client (topics).
    pub fn admin(&self) -> ClientConfig {
        self.finish(self.base())
    }

    /// The transactional id of an input partition's producer: group + topic + partition, so
    /// the next owner's `init_transactions` fences the previous one (a zombie) and aborts
    /// its open transaction.
    pub fn transactional_id(&self, topic: &str, partition: i32) -> String {
        format!("kappa-{}-{topic}-{partition}", self.group)
    }
}
