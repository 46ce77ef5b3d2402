//! The `kappa` binary: `kappa serve` runs the log (and, as they land, the broker, the view
//! engine and the HTTP API) in one process.

mod settings;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kappa_broker::server::Limits;
use kappa_broker::{Broker, BrokerConfig};
use kappa_log::{Log, LogOptions};

use crate::settings::{ServeArgs, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "kappa",
    version,
    about = "A durable event log speaking the Kafka protocol, with materialized views and live subscriptions"
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
    Serve(ServeArgs),
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(Settings::resolve(args)?),
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let options = LogOptions { sync_policy: settings.sync_policy, ..LogOptions::default() };
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
        let log = Arc::new(log);
        let maintenance = tokio::spawn(maintain(log.clone(), settings.maintenance_interval));
        let listener = tokio::net::TcpListener::bind(settings.kafka_listen)
            .await
            .with_context(|| format!("binding the Kafka listener on {} (is another broker running there?)", settings.kafka_listen))?;
        let kafka_port = listener.local_addr()?.port();
        let config = BrokerConfig {
            advertised_host: settings.advertised_host.clone(),
            advertised_port: i32::from(kafka_port),
            auto_create_topics: settings.auto_create_topics,
            default_partitions: settings.num_partitions,
            ..BrokerConfig::default()
        };
        let broker = Broker::open(log.clone(), config).await.context("opening the group and transaction coordinators")?;
        tracing::info!(kafka_listen = %listener.local_addr()?, advertised = %format!("{}:{kafka_port}", settings.advertised_host), http_listen = %settings.http_listen, "kappa is running; stop with Ctrl-C or SIGTERM");
        kappa_broker::run(listener, broker, Limits::default(), shutdown_signal()).await;
        tracing::info!("shutting down: flushing and writing checkpoints");
        maintenance.abort();
        tokio::task::spawn_blocking(move || log.close()).await?.context("writing the clean-shutdown checkpoint")?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}

/// Periodic background work: the interval flush policy, retention and compaction.
async fn maintain(log: Arc<Log>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let log = log.clone();
        let result = tokio::task::spawn_blocking(move || {
            log.flush()?;
            log.enforce_retention()?;
            log.compact()
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "background maintenance failed"),
            Err(e) => tracing::error!(error = %e, "background maintenance panicked"),
        }
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
