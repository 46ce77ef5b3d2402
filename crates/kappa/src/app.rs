//! [`App`]: the views an application defines plus the command line that serves them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use kappa_broker::{Broker, BrokerConfig};
use kappa_coordinator::TxnConfig;
use kappa_log::{Log, LogError, LogOptions};
use kappa_views::{AsOf, EmbeddedLog, EngineConfig, Schemas, View, ViewEngine};

use crate::cli::{BadInput, NotFound, ServerArgs, outln};
use crate::settings::{ServeArgs, Settings};

/// Where view state lives inside the data directory.
pub const VIEWS_DIR: &str = "views";
/// Held (flock) while a process uses a data directory.
const LOCK_FILE: &str = ".lock";
/// The log's topics, which every data directory `kappa serve` opened has (docs/format.md,
/// "Directory layout"): what tells a data directory from any other directory.
const TOPICS_DIR: &str = "topics";

#[derive(Debug, Parser)]
#[command(
    name = "kappa",
    version,
    about = "A durable event log speaking the Kafka protocol, with materialized views and live subscriptions",
    after_help = "Examples:\n  kappa serve --data-dir ./kappa-data\n  kappa topic create events --partitions 4\n  \
        echo 'k1:hello' | kappa produce events --key-separator :\n  kappa consume events --format json --follow\n\n\
        Exit codes: 0 ok, 1 error, 2 bad usage or input, 3 conflict (e.g. expected offset mismatch),\n\
        4 not found (topic, group, view), 5 server unreachable."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server on a data directory.
    ///
    /// Example: kappa serve --data-dir ./kappa-data --kafka-listen 127.0.0.1:9092
    Serve(Box<ServeArgs>),
    /// Views: list, status, get, watch, switch, retire (a running server); dump (a
    /// stopped server's data directory).
    #[command(subcommand)]
    View(ViewCommand),
    /// Topics: create, list, describe, alter, delete-records, delete.
    #[command(subcommand)]
    Topic(crate::topic_cli::TopicCommand),
    /// Write records from stdin or a file (lines or JSON records).
    Produce(crate::produce_cli::ProduceArgs),
    /// Read records: from beginning, end, an offset or a time; in a group or not; text or
    /// JSON lines; optionally following new records.
    Consume(crate::consume_cli::ConsumeArgs),
    /// Consumer groups: list, describe, reset-offsets.
    #[command(subcommand)]
    Group(crate::group_cli::GroupCommand),
    /// Run the views as one worker of many against a Kafka-protocol cluster (Apache Kafka,
    /// Redpanda, or `kappa serve`): partitions shared through a consumer group, exactly once
    /// through Kafka transactions. Needs a build with the `kafka` feature.
    ///
    /// Example: channels work --bootstrap k1:9092,k2:9092 --group channels-views --http-listen 0.0.0.0:8080
    Work(crate::work::WorkArgs),
}

#[derive(Debug, Subcommand)]
enum ViewCommand {
    /// List views and their versions (status, lag, progress).
    ///
    /// Example: kappa view list            (a running server; or --data-dir for a stopped one)
    List(Target),
    /// Show a view's versions; while one rebuilds, a live progress bar (rate, ETA) until it
    /// has caught up.
    ///
    /// Example: kappa view status channel_page
    Status {
        view: String,
        /// Print once and exit instead of following a rebuild.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print one key of a view as JSON, now or as of a past point; with --after, once the
    /// view has applied the offsets a produce answered (read your own writes).
    ///
    /// Example: kappa view get channel_page c1 --as-of 2026-11-26T10:00:00Z
    /// Example: kappa view get channel_page c1 --after "$(kappa produce channels --print-after <events)"
    Get {
        view: String,
        key: String,
        /// An RFC 3339 time, milliseconds since the epoch, or topic/partition=offset,...
        #[arg(long, conflicts_with = "after")]
        as_of: Option<String>,
        /// Wait until the view has applied this offset of a produce: topic:partition:offset
        /// (repeatable, or comma-separated; `kappa produce --print-after` prints it). A
        /// running server only: offline, nothing applies records.
        #[arg(long, value_name = "TOPIC:PARTITION:OFFSET", conflicts_with = "data_dir")]
        after: Vec<String>,
        /// How long --after waits, in milliseconds [default: the server's, 5000; at most 30000].
        #[arg(long, requires = "after")]
        wait_ms: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Follow a key or a key prefix: the snapshot, then every change, as JSON lines.
    ///
    /// Example: kappa view watch channel_page --prefix c
    Watch {
        view: String,
        /// One key to follow.
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Follow every key starting with this.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Make a version serve reads (cutover or rollback).
    ///
    /// Example: kappa view switch channel_page 2
    Switch {
        view: String,
        version: u32,
        /// Switch even to a version that has not caught up.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Delete a version that does not serve reads (its state and changelog).
    ///
    /// Example: kappa view retire channel_page 1
    Retire {
        view: String,
        version: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print every key of a view as JSON lines `{"key":..,"value":..}`, in key order, from a
    /// stopped server's data directory.
    ///
    /// Example: kappa view dump channel_page --catch-up --data-dir ./kappa-data
    Dump {
        view: String,
        /// First apply every input record not yet applied (runs the view until caught up).
        #[arg(long)]
        catch_up: bool,
        /// Where to read: the state store, or the view's changelog folded from its start
        /// (checking that its steps never go back).
        #[arg(long, value_enum, default_value = "store")]
        source: DumpSource,
        #[command(flatten)]
        data: DataDirArgs,
    },
}

/// A running server (the default), or a stopped server's data directory.
#[derive(Debug, Clone, Args)]
struct Target {
    /// Read a stopped server's data directory instead of asking a running server.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DumpSource {
    Store,
    Changelog,
}

/// How long `view dump --catch-up` waits for a view to apply its inputs.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Args)]
struct DataDirArgs {
    /// The server's data directory [default: ./kappa-data]
    #[arg(long, env = "KAPPA_DATA_DIR", default_value = "./kappa-data")]
    data_dir: PathBuf,
}

/// A topic the application needs, created on start when missing.
#[derive(Debug, Clone)]
struct TopicSpec {
    name: String,
    partitions: i32,
    configs: BTreeMap<String, String>,
}

/// An application: its topics, event schemas and views.
#[derive(Default)]
pub struct App {
    topics: Vec<TopicSpec>,
    schemas: Schemas,
    views: Vec<View>,
}

impl App {
    pub fn new() -> Self {
        Self::default()
    }

    /// A topic to create on start if it does not exist.
    pub fn topic(mut self, name: &str, partitions: i32, configs: BTreeMap<String, String>) -> Self {
        self.topics.push(TopicSpec { name: name.to_owned(), partitions, configs });
        self
    }

    pub fn schemas(mut self, schemas: Schemas) -> Self {
        self.schemas = schemas;
        self
    }

    pub fn view(mut self, view: View) -> Self {
        self.views.push(view);
        self
    }

    pub fn views(mut self, views: impl IntoIterator<Item = View>) -> Self {
        self.views.extend(views);
        self
    }

    /// Parses the command line and runs it. On error, prints it and exits with a code
    /// scripts can test (see `cli.rs`: 1 error, 2 usage or bad input, 3 conflict, 4 not
    /// found, 5 server unreachable).
    pub fn main(self) -> anyhow::Result<()> {
        use std::io::IsTerminal;
        crate::allocator::configure();
        {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .finish()
                .with(log_filter(std::env::var("RUST_LOG").ok().as_deref()))
                .init();
        }
        let result = match Cli::parse().command {
            Command::Serve(args) => Settings::resolve(*args).and_then(|settings| self.serve(settings)),
            Command::View(command) => self.view_command(command),
            Command::Topic(command) => crate::topic_cli::run(command),
            Command::Produce(args) => crate::produce_cli::run(args),
            Command::Consume(args) => crate::consume_cli::run(args),
            Command::Group(command) => crate::group_cli::run(command),
            Command::Work(args) => {
                let topics = self.topics.into_iter().map(|t| (t.name, t.partitions, t.configs)).collect();
                crate::work::run(args, topics, self.views, self.schemas)
            }
        };
        if let Err(error) = result {
            // Stdout closed (`| head`): the reader has what it wanted; end quietly.
            if crate::cli::output_closed(&error) {
                return Ok(());
            }
            eprintln!("error: {error:#}");
            std::process::exit(crate::cli::exit_code(&error));
        }
        Ok(())
    }

    /// Runs the log, the broker and the views until SIGTERM or Ctrl-C.
    pub fn serve(self, settings: Settings) -> anyhow::Result<()> {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
        // Ports first: a port in use must fail before the data directory is created or locked.
        let ports = {
            let _runtime = runtime.enter();
            Ports::claim(&settings)?
        };
        let _lock = lock_data_dir(&settings.data_dir)?;
        runtime.block_on(self.serve_async(settings, ports))
    }

    async fn serve_async(self, settings: Settings, ports: Ports) -> anyhow::Result<()> {
        let Ports { kafka: kafka_socket, http: http_socket } = ports;
        let log = open_log(&settings).await?;
        let maintenance = tokio::spawn(maintain(log.clone(), settings.maintenance_interval));
        // `--sync interval:<ms>` acknowledges before fsync; this task bounds what a power
        // loss can take back to <ms>. Its own timer: the maintenance one runs every 30 s.
        let interval_sync = match settings.sync_policy {
            kappa_log::SyncPolicy::IntervalMs(ms) => {
                Some(tokio::spawn(sync_every(log.clone(), Duration::from_millis(ms))))
            }
            kappa_log::SyncPolicy::EveryAppend => None,
        };
        let kafka_port = kafka_socket.local_addr()?.port();
        let config = BrokerConfig {
            advertised_host: settings.advertised_host.clone(),
            advertised_port: i32::from(kafka_port),
            auto_create_topics: settings.auto_create_topics,
            default_partitions: settings.num_partitions,
            compressed_appends_max: settings.kafka_compressed_appends_max,
            txn: TxnConfig {
                id_expiration_ms: settings.transactional_id_expiration_ms,
                ids_max: settings.transactional_ids_max,
                ..TxnConfig::default()
            },
            ..BrokerConfig::default()
        };
        let broker =
            Broker::open(log.clone(), config).await.context("opening the group and transaction coordinators")?;
        let engine = {
            let log = log.clone();
            let data_dir = settings.data_dir.clone();
            tokio::task::spawn_blocking(move || self.start_views(&log, &data_dir, true)).await??
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let extensions = kappa_http::Extensions {
            metrics: Some(broker_metrics(&broker)),
            groups: Some(Arc::new(crate::group_admin::BrokerGroups(broker.clone()))),
            transactions: Some(broker.transactions()),
        };
        let http_state =
            kappa_http::AppState::with_extensions(log.clone(), engine.clone(), settings.http.clone(), extensions);
        tracing::info!(kafka_listen = %kafka_socket.local_addr()?, advertised = %format!("{}:{kafka_port}", settings.advertised_host), http_listen = %http_socket.local_addr()?, views = engine.list().len(), "kappa is running; stop with Ctrl-C or SIGTERM");
        let http_listener = start_listening(http_socket, settings.http_listen)?;
        let listener = start_listening(kafka_socket, settings.kafka_listen)?;
        let http = tokio::spawn(kappa_http::run_with(
            http_listener,
            http_state,
            settings.http_timeouts,
            stopped(stop_rx.clone()),
        ));
        kappa_broker::run(listener, broker, settings.kafka_limits.clone(), stopped(stop_rx)).await;
        http.abort();
        tracing::info!("shutting down: stopping views, flushing and writing checkpoints");
        tokio::task::spawn_blocking(move || engine.shutdown()).await?;
        maintenance.abort();
        if let Some(task) = interval_sync {
            task.abort();
        }
        tokio::task::spawn_blocking(move || log.close()).await?.context("writing the clean-shutdown checkpoint")?;
        tracing::info!("stopped cleanly");
        Ok(())
    }

    /// Creates the application's topics and starts (or, offline, only opens) its views.
    fn start_views(self, log: &Arc<Log>, data_dir: &Path, run: bool) -> anyhow::Result<ViewEngine> {
        if run {
            for topic in &self.topics {
                match log.create_topic(&topic.name, topic.partitions, &topic.configs) {
                    Ok(_) => {
                        tracing::info!(topic = %topic.name, partitions = topic.partitions, "created the application's topic")
                    }
                    Err(LogError::TopicExists(_)) => warn_if_topic_differs(log, topic),
                    Err(e) => return Err(e).with_context(|| format!("creating topic {}", topic.name)),
                }
            }
        }
        let backend = Arc::new(EmbeddedLog::new(log.clone()));
        let config = EngineConfig { schemas: self.schemas, ..EngineConfig::new(data_dir.join(VIEWS_DIR)) };
        let engine = if run {
            ViewEngine::start(backend, config, self.views)
        } else {
            ViewEngine::open_offline(backend, config, self.views)
        };
        engine.context("starting the views")
    }

    fn view_command(self, command: ViewCommand) -> anyhow::Result<()> {
        match command {
            ViewCommand::List(Target { data_dir: None, server }) => crate::view_cli::list(&server.server),
            ViewCommand::Status { view, once, server } => crate::view_cli::status(&server.server, &view, once),
            ViewCommand::Get { view, key, as_of, after, wait_ms, target: Target { data_dir: None, server } } => {
                let read = crate::view_cli::Read { as_of: as_of.as_deref(), after: &after, wait_ms };
                crate::view_cli::get(&server.server, &view, &key, read)
            }
            ViewCommand::Watch { view, key, prefix, server } => {
                crate::view_cli::watch(&server.server, &view, key.as_deref(), prefix.as_deref())
            }
            ViewCommand::Switch { view, version, force, server } => {
                crate::view_cli::switch(&server.server, &view, version, force)
            }
            ViewCommand::Retire { view, version, server } => crate::view_cli::retire(&server.server, &view, version),
            ViewCommand::List(Target { data_dir: Some(dir), .. }) => self.offline(&dir, None, false, |engine| {
                for view in engine.list() {
                    for version in &view.versions {
                        outln!(
                            "{}\tv{}\t{}{}\tevents={}\tlag={}{}",
                            view.name,
                            version.version,
                            version.status.phase.name(),
                            if version.serving { " (serving)" } else { "" },
                            version.status.events_applied,
                            version.status.lag(),
                            if version.auto_switch { "" } else { crate::view_cli::NO_AUTO_SWITCH_NOTE }
                        )?;
                    }
                }
                Ok(())
            }),
            ViewCommand::Get { view, key, as_of, target: Target { data_dir: Some(dir), .. }, .. } => {
                // As of a point it replays the inputs: it reads no state, so a view that never
                // ran here answers too.
                let reads_state = as_of.is_none().then_some(view.as_str());
                self.offline(&dir, reads_state, false, |engine| match as_of {
                    Some(at) => {
                        let at = AsOf::parse(&at).map_err(|e| BadInput(format!("--as-of: {e}")))?;
                        let result = engine.as_of(&view, None, &at, Some(&key))?;
                        match result.values.first() {
                            Some((_, json)) => outln!("{}", sorted_json(json)?),
                            None => {
                                Err(NotFound(format!("view {view} had no key '{key}' as of {:?}", result.positions)))?
                            }
                        }
                    }
                    None => match engine.get(&view, &key)?.value {
                        Some(item) => outln!("{}", sorted_json(&item.json)?),
                        None => Err(NotFound(format!("view {view} has no key '{key}'")))?,
                    },
                })
            }
            ViewCommand::Dump { view, catch_up, source, data } => {
                // With --catch-up it runs the views, building a view's state if it has none.
                let reads_state = (!catch_up).then_some(view.as_str());
                self.offline(&data.data_dir, reads_state, catch_up, |engine| {
                    if catch_up && !engine.wait_caught_up(&view, CATCH_UP_TIMEOUT)? {
                        bail!("view {view} did not catch up with its inputs within {CATCH_UP_TIMEOUT:?}");
                    }
                    dump_view(engine, &view, source)
                })
            }
        }
    }

    /// Opens a stopped server's data directory, runs `f` on its views, closes it. A view
    /// `reads_state` (whose stored state `f` reads) that has no state there is refused;
    /// without `run` only the versions with state are opened (opening one creates its state
    /// store, and reading must create nothing), while every definition is kept: an as-of
    /// read replays a view's inputs with its code, state or not.
    fn offline(
        self,
        data_dir: &Path,
        reads_state: Option<&str>,
        run: bool,
        f: impl FnOnce(&ViewEngine) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        check_data_dir(data_dir)?;
        let on_disk = views_on_disk(&data_dir.join(VIEWS_DIR))?;
        if let Some(view) = reads_state.filter(|view| !on_disk.contains_key(*view)) {
            let there: Vec<&str> = on_disk.keys().map(String::as_str).collect();
            let there = if there.is_empty() { "none".to_owned() } else { there.join(", ") };
            return Err(NotFound(format!(
                "view {view} has no state in data directory {} (views there: {there}): it never ran on it; run `kappa serve` on it first (or check the view's name)",
                data_dir.display()
            ))
            .into());
        }
        let _lock = lock_data_dir(data_dir)?;
        let log = Arc::new(
            Log::open(data_dir, LogOptions::default())
                .with_context(|| format!("opening data directory {}", data_dir.display()))?
                .0,
        );
        let engine = self.start_views(&log, data_dir, run)?;
        let result = f(&engine);
        engine.shutdown();
        log.close().context("closing the data directory")?;
        result
    }
}

/// An application's topic that already exists is kept as it is (it may have been altered on
/// purpose), but a partition count or config that differs from what the application asks
/// for is named: a topic auto-created by a client's first produce has neither.
fn warn_if_topic_differs(log: &Log, spec: &TopicSpec) {
    let differences = topic_differences(log, spec);
    if !differences.is_empty() {
        tracing::warn!(
            topic = %spec.name,
            differences = %differences.join(", "),
            "the application's topic already exists with another shape and is kept as it is; to get the \
             application's shape, alter it (kappa topic alter) or delete it before starting"
        );
    }
}

/// How an existing topic differs from the application's spec, one phrase per difference.
fn topic_differences(log: &Log, spec: &TopicSpec) -> Vec<String> {
    let Ok(topic) = log.topic(&spec.name) else { return Vec::new() };
    let config = topic.config();
    // Both sides as the config reads them back (`delete,compact` is `compact,delete`); the
    // wish read key by key, so one the rules between keys refuse is still compared.
    let wanted = kappa_log::TopicConfig::from_keys(&spec.configs).ok();
    let mut differences: Vec<String> = spec
        .configs
        .keys()
        .filter(|key| config.get(key) != wanted.as_ref().and_then(|w| w.get(key)))
        .map(|key| {
            let asked = wanted.as_ref().and_then(|w| w.get(key)).unwrap_or_else(|| spec.configs[key].clone());
            format!("{key}={} (asks for {asked})", config.get(key).unwrap_or_default())
        })
        .collect();
    if topic.partition_count() != spec.partitions {
        differences.insert(0, format!("{} partitions (asks for {})", topic.partition_count(), spec.partitions));
    }
    differences
}

/// How much of a view `kappa view dump` holds in memory at once.
const DUMP_PAGE: kappa_views::ScanLimit = kappa_views::ScanLimit { items: 1000, bytes: 8 * 1024 * 1024 };

fn dump_view(engine: &ViewEngine, view: &str, source: DumpSource) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = |key: &str, json: &[u8]| -> anyhow::Result<()> {
        let value: serde_json::Value = serde_json::from_slice(json).context("a stored view value is not JSON")?;
        writeln!(out, "{}", serde_json::json!({"key": key, "value": value})).map_err(crate::cli::stdout_error)
    };
    match source {
        DumpSource::Store => {
            let mut after: Option<String> = None;
            loop {
                let page = engine.scan(view, "", after.as_deref(), DUMP_PAGE)?.value;
                for item in &page.items {
                    line(&item.key, &item.json)?;
                }
                match page.items.last() {
                    Some(last) if page.more => after = Some(last.key.clone()),
                    _ => break,
                }
            }
        }
        DumpSource::Changelog => {
            let fold = engine.fold_changelog(view)?;
            for (key, json) in &fold.values {
                line(key, json)?;
            }
            tracing::info!(
                view,
                version = fold.version,
                steps = fold.steps,
                changes = fold.changes,
                "folded the changelog"
            );
        }
    }
    out.flush().map_err(crate::cli::stdout_error)
}

/// The views with state under `views_dir` and their versions (`<view>/v<N>/` directories).
fn views_on_disk(views_dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<u32>>> {
    let mut views = BTreeMap::new();
    let entries = match std::fs::read_dir(views_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(views),
        other => other.with_context(|| format!("reading {}", views_dir.display()))?,
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", views_dir.display()))?;
        let Ok(versions) = std::fs::read_dir(entry.path()) else { continue };
        let versions: Vec<u32> = versions
            .filter_map(|v| v.ok()?.file_name().to_str()?.strip_prefix('v')?.parse().ok())
            .filter(|v| entry.path().join(format!("v{v}")).is_dir())
            .collect();
        if !versions.is_empty() {
            views.insert(entry.file_name().to_string_lossy().into_owned(), versions);
        }
    }
    Ok(views)
}

/// A stored view value printed as `view get` prints it over HTTP: JSON with sorted keys.
fn sorted_json(json: &[u8]) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_json::from_slice(json).context("a stored view value is not JSON")?;
    Ok(value.to_string())
}

/// Refuses, creating nothing, a directory an offline command must not open: one that does
/// not exist (a typo'd --data-dir would otherwise become an empty data directory) or that
/// holds no kappa data. Only `serve` creates a data directory.
fn check_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    let shown = data_dir.display();
    let hint = "give the directory `kappa serve` ran on (--data-dir or KAPPA_DATA_DIR); `kappa serve` creates a \
                data directory, the offline commands only read one";
    match std::fs::metadata(data_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(BadInput(format!("data directory {shown} does not exist; {hint}")).into())
        }
        Err(e) => Err(e).with_context(|| format!("reading data directory {shown}")),
        Ok(meta) if !meta.is_dir() => Err(BadInput(format!("{shown} is not a directory; {hint}")).into()),
        Ok(_) if !data_dir.join(TOPICS_DIR).is_dir() => {
            Err(BadInput(format!("{shown} holds no kappa data (it has no {TOPICS_DIR}/ directory); {hint}")).into())
        }
        Ok(_) => Ok(()),
    }
}

/// Takes the data directory's lock for the life of the process: two processes on one
/// directory would corrupt it.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "data directory {} is in use by another kappa process; stop it first (or use another --data-dir)",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Which log lines to write: `RUST_LOG`'s directives (`info`, `warn,kappa_views=debug`, …,
/// without env_logger's regex filters, so no regex engine in the binary), `info` when unset.
/// A value that does not parse is reported and the default used: a typo must not silence
/// the log.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;
    let default = Targets::new().with_default(tracing::Level::INFO);
    match rust_log.map(str::trim).filter(|value| !value.is_empty()) {
        None => default,
        Some(value) => value.parse().unwrap_or_else(|error| {
            eprintln!(
                "warning: RUST_LOG={value:?} is not a list of log directives ({error}); logging at info. \
                 Expected e.g. RUST_LOG=debug or RUST_LOG=warn,kappa_views=debug"
            );
            default
        }),
    }
}

/// Both listeners' sockets, bound but not listening.
struct Ports {
    kafka: tokio::net::TcpSocket,
    http: tokio::net::TcpSocket,
}

impl Ports {
    /// Claims both ports before anything slow (a second kappa on them fails at once, and a
    /// client that finds one open finds the other open too); they listen only when ready.
    fn claim(settings: &Settings) -> anyhow::Result<Self> {
        let kafka = claim_port(settings.kafka_listen).with_context(|| {
            format!("binding the Kafka listener on {} (is another broker running there?)", settings.kafka_listen)
        })?;
        let http = claim_port(settings.http_listen).with_context(|| {
            format!(
                "binding the HTTP listener on {} (is another server running there? pick another with --http-listen)",
                settings.http_listen
            )
        })?;
        Ok(Self { kafka, http })
    }
}

/// Connections the kernel queues for kappa to accept (tokio's own default).
const LISTEN_BACKLOG_CONNECTIONS: u32 = 1024;

/// Binds `addr` without listening: until [`start_listening`] a connection attempt is
/// refused, which clients retry, instead of being accepted into a queue nobody reads while
/// the log recovers and the views start. (kafka-node gives a connection's first ApiVersions
/// 500 ms; past that it speaks Kafka 0.9 on that connection for good, where Metadata names
/// no controller and creating topics fails.)
fn claim_port(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restart is not refused for the last run's closed
    // connections; a socket listening on `addr` still is.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn start_listening(
    socket: tokio::net::TcpSocket,
    addr: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpListener> {
    socket
        .listen(LISTEN_BACKLOG_CONNECTIONS)
        .with_context(|| format!("listening on {addr} (did another server start listening there meanwhile?)"))
}

async fn open_log(settings: &Settings) -> anyhow::Result<Arc<Log>> {
    let options = LogOptions {
        sync_policy: settings.sync_policy,
        producer_id_expiration_ms: settings.producer_id_expiration_ms,
        producers_per_partition_max: settings.producers_per_partition_max,
        ..LogOptions::default()
    };
    let dir = settings.data_dir.clone();
    let (log, report) = tokio::task::spawn_blocking(move || Log::open(&dir, options))
        .await?
        .with_context(|| format!("opening data directory {}", settings.data_dir.display()))?;
    tracing::info!(
        data_dir = %settings.data_dir.display(),
        topics = report.topics(),
        partitions = report.partitions.len(),
        bytes = report.bytes(),
        scanned_bytes = report.scanned_bytes(),
        truncated_bytes = report.truncated_bytes(),
        clean = report.all_clean(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "recovered data directory"
    );
    for (topic, partition, recovery) in &report.partitions {
        for reason in &recovery.truncation_reasons {
            tracing::warn!(topic, partition, %reason, "truncated an invalid tail during recovery");
        }
    }
    Ok(Arc::new(log))
}

/// The `interval:<ms>` sync policy's flush: fdatasync every partition every `period`.
/// A slow sync delays the next tick rather than queueing a burst of them.
async fn sync_every(log: Arc<Log>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let log = log.clone();
        match tokio::task::spawn_blocking(move || log.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "interval sync failed"),
            Err(e) => tracing::error!(error = %e, "interval sync panicked"),
        }
    }
}

/// Periodic background work: retention, compaction, and a flush as a safety net (the
/// interval sync policy has its own timer, `sync_every`).
async fn maintain(log: Arc<Log>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let log = log.clone();
        // Each pass goes on past a failing partition (logging it), and a failing retention
        // pass does not hold back compaction. A failed flush poisoned the directory: then
        // nothing else is worth trying.
        let result = tokio::task::spawn_blocking(move || {
            log.flush()?;
            let retention = log.enforce_retention().map(drop);
            let compaction = log.compact().map(drop);
            retention.and(compaction)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "background maintenance failed"),
            Err(e) => tracing::error!(error = %e, "background maintenance panicked"),
        }
    }
}

/// The broker's counters and consumer-group lag in Prometheus text, for `/metrics`.
fn broker_metrics(broker: &Arc<Broker>) -> kappa_http::ExtraMetrics {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let broker = broker.clone();
    Box::new(move |out: &mut String| {
        let stats = broker.stats();
        let counters = [
            ("kappa_kafka_produce_requests_total", "Kafka produce requests.", &stats.produce_requests),
            ("kappa_kafka_produce_bytes_total", "Record-batch bytes received by Kafka produce.", &stats.produce_bytes),
            (
                "kappa_kafka_produce_errors_total",
                "Partitions answered with an error by produce.",
                &stats.produce_errors,
            ),
            (
                "kappa_kafka_produce_inline_fallbacks_total",
                "Small produce requests whose append would have waited on the connection's task (partition lock held elsewhere, or a segment roll) and went on a blocking thread.",
                &stats.produce_inline_fallbacks,
            ),
            ("kappa_kafka_fetch_requests_total", "Kafka fetch requests.", &stats.fetch_requests),
            ("kappa_kafka_fetch_bytes_total", "Record bytes returned by Kafka fetch.", &stats.fetch_bytes),
            ("kappa_kafka_fetch_errors_total", "Partitions answered with an error by fetch.", &stats.fetch_errors),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP kappa_consumer_group_lag_records End offset minus committed offset.\n# TYPE kappa_consumer_group_lag_records gauge"
        );
        for (group, topic, partition, committed) in broker.committed_offsets() {
            let Ok(p) = broker.log().partition(&topic, partition) else { continue };
            let lag = (p.high_watermark() - committed).max(0);
            let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "kappa_consumer_group_lag_records{{group=\"{}\",topic=\"{}\",partition=\"{partition}\"}} {lag}",
                escape(&group),
                escape(&topic)
            );
        }
    })
}

/// Resolves once the shutdown flag is set.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

pub(crate) async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TopicSpec {
        TopicSpec {
            name: "channels".to_owned(),
            partitions: 4,
            configs: BTreeMap::from([("cleanup.policy".to_owned(), "compact".to_owned())]),
        }
    }

    #[test]
    fn an_existing_topic_of_another_shape_is_named_and_one_of_the_same_shape_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), LogOptions::default()).unwrap();
        log.create_topic("channels", 1, &BTreeMap::new()).unwrap();
        assert_eq!(
            topic_differences(&log, &spec()),
            ["1 partitions (asks for 4)", "cleanup.policy=delete (asks for compact)"]
        );
        log.delete_topic("channels").unwrap();
        log.create_topic("channels", 4, &spec().configs).unwrap();
        assert!(topic_differences(&log, &spec()).is_empty());
        // The same shape spelled otherwise is the same shape.
        let mut spelled = spec();
        spelled.configs.insert("cleanup.policy".to_owned(), "delete,compact".to_owned());
        log.delete_topic("channels").unwrap();
        log.create_topic("channels", 4, &spelled.configs).unwrap();
        assert!(topic_differences(&log, &spelled).is_empty(), "{:?}", topic_differences(&log, &spelled));
    }
}
