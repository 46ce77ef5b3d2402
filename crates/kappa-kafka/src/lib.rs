//! kappa's work mode: an application's views run as many worker processes against a
//! Kafka-protocol cluster (Apache Kafka, Redpanda, or `kappa serve`) through librdkafka.
//!
//! - Partitions are the unit of work: the consumer group (cooperative-sticky) assigns each
//!   input partition to one worker. View `<name>` version N has a changelog topic
//!   `__kappa.view.<name>.v<N>` with one partition per input partition; changelog
//!   partition p holds exactly the state of input partition p (`worker.rs`).
//! - On assignment the worker fences the partition's previous owner (`init_transactions`
//!   with the partition's transactional id), restores each view's state from changelog
//!   partition p (`restore.rs`) and starts consuming at the restored position.
//! - A step is one Kafka transaction: the changelog records of every view (changes + step
//!   marker, `kappa_views::changelog` format) and the input offset
//!   (`send_offsets_to_transaction`); inputs are read read_committed.
//! - Every worker serves HTTP reads and subscriptions for every key from a read replica of
//!   all changelog partitions (`replica.rs`, `http.rs`).
//!
//! The view code is the application's, unchanged; the fold of one partition is
//! `kappa_views::PartitionView`. This crate is the only one that knows librdkafka.

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod purge;
pub mod replica;
pub mod restore;
pub mod topics;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kappa_views::partitioned::{self, Placement};
use kappa_views::{PayloadCodec, Schemas, View, ViewError};

pub use crate::config::WorkConfig;
pub use crate::error::{Result, WorkError};
use crate::http::{HttpState, router};
use crate::metrics::Metrics;
use crate::purge::Purger;
use crate::replica::{Replica, run_replica};
use crate::topics::{TopicSpec, Topics};
use crate::worker::{Shared, ViewSpec, run_group};

/// What an application brings to work mode.
pub struct WorkApp {
    /// Topics the application declares: (name, partitions, configs), created when missing.
    pub topics: Vec<(String, i32, BTreeMap<String, String>)>,
    pub views: Vec<View>,
    pub schemas: Schemas,
    pub codec: Arc<dyn PayloadCodec>,
}

/// Runs one worker until `stop` is set (or an error).
pub fn run(config: WorkConfig, app: WorkApp, stop: Arc<AtomicBool>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| WorkError::Http { addr: config.http_listen.to_string(), source })?;
    let views = select_views(config.views.as_deref(), app.views)?;
    tracing::info!(group = %config.group, "work mode: consumer group (and transactional-id prefix)");
    let topics = Topics::new(&config, runtime.handle().clone())?;
    let mut specs = Vec::new();
    let mut changelogs = Vec::new();
    let mut served = Vec::new();
    for view in views {
        let partitions = input_partitions(&topics, &app.topics, &view)?;
        let input = view.inputs()[0].clone();
        let changelog = kappa_views::changelog::topic_name(view.name(), view.version());
        let mut changelog_spec = TopicSpec::changelog(changelog.clone(), partitions);
        if config.repartition.iter().any(|name| name == view.name()) {
            changelog_spec = changelog_spec.derived_with(&[
                partitioned::repartition_topic(view.name(), view.version()),
                partitioned::repartition_state_topic(view.name(), view.version()),
                changelog.clone(),
            ]);
        }
        topics.ensure(&changelog_spec)?;
        changelogs.push((changelog.clone(), view.name().to_owned(), partitions));
        served.push((view.name().to_owned(), view.version(), partitions));
        if config.repartition.iter().any(|name| name == view.name()) {
            // Stage 1 on the input partitions, stage 2 on the repartition topic's.
            let repartition = partitioned::repartition_topic(view.name(), view.version());
            let state = partitioned::repartition_state_topic(view.name(), view.version());
            // Derived from one another: a mismatch is fixed by deleting all three together.
            let together = [repartition.clone(), state.clone(), changelog.clone()];
            topics.ensure(&TopicSpec::repartition(repartition.clone(), partitions).derived_with(&together))?;
            topics.ensure(&TopicSpec::changelog(state.clone(), partitions).derived_with(&together))?;
            tracing::info!(view = view.name(), version = view.version(), %repartition, %state, %changelog, partitions, "view ready for work mode through a repartition topic");
            specs.push(ViewSpec {
                view: view.clone(),
                input,
                changelog: state,
                changelog_partitions: partitions,
                placement: Placement::RepartitionSource { partitions },
                repartition: Some(repartition.clone()),
            });
            specs.push(ViewSpec {
                view,
                input: repartition,
                changelog,
                changelog_partitions: partitions,
                placement: Placement::RepartitionSink { partitions },
                repartition: None,
            });
        } else {
            tracing::info!(view = view.name(), version = view.version(), %changelog, partitions, "view ready for work mode");
            specs.push(ViewSpec {
                view,
                input,
                changelog,
                changelog_partitions: partitions,
                placement: Placement::CoPartitioned,
                repartition: None,
            });
        }
    }
    for name in &config.repartition {
        if !changelogs.iter().any(|(_, view, _)| view == name) {
            return Err(WorkError::UnknownView(name.clone()));
        }
    }
    let metrics = Arc::new(Metrics::default());
    let replica = Replica::new(served);
    let purger = Purger::new(&config, runtime.handle().clone())?;
    let shared =
        Arc::new(Shared::new(config.clone(), specs, Arc::new(app.schemas), app.codec, metrics.clone(), purger));
    serve_http(&runtime, &config, &shared, replica.clone())?;
    let replica_thread = {
        let (config, metrics, stop) = (config.clone(), metrics.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kappa-replica".to_owned())
            .spawn(move || run_replica(&config, &changelogs, &replica, &metrics, &stop))
            .expect("spawn the replica thread")
    };
    let result = run_group(shared, &stop);
    stop.store(true, Ordering::Release);
    let replica_result = replica_thread.join().unwrap_or(Ok(()));
    result.and(replica_result)
}

/// Whether `--views` leaves out some of the application's views: such a pool must have a
/// group of its own, since the members of one group split its input partitions.
pub fn runs_a_subset(views: &[View], only: Option<&[String]>) -> bool {
    only.is_some_and(|only| views.iter().any(|view| !only.iter().any(|name| name == view.name())))
}

/// The application's views, or those named by `--views`; the highest version of each (work
/// mode deploys one version at a time).
fn select_views(only: Option<&[String]>, views: Vec<View>) -> Result<Vec<View>> {
    let mut latest: BTreeMap<String, View> = BTreeMap::new();
    for view in views {
        if latest.get(view.name()).is_none_or(|v| v.version() < view.version()) {
            latest.insert(view.name().to_owned(), view);
        }
    }
    match only {
        None => Ok(latest.into_values().collect()),
        Some(names) => {
            names.iter().map(|name| latest.remove(name).ok_or_else(|| WorkError::UnknownView(name.clone()))).collect()
        }
    }
}

/// The view's one input topic's partition count, creating the topic when the
/// application declares it.
fn input_partitions(topics: &Topics, declared: &[(String, i32, BTreeMap<String, String>)], view: &View) -> Result<i32> {
    let [input] = view.inputs() else {
        return Err(ViewError::Definition {
            view: view.name().to_owned(),
            reason: format!("in work mode a view reads exactly one input topic; it reads {:?}", view.inputs()),
        }
        .into());
    };
    if let Some(partitions) = topics.partitions(input)? {
        return Ok(partitions);
    }
    let Some((_, partitions, configs)) = declared.iter().find(|(name, _, _)| name == input) else {
        return Err(WorkError::MissingInput { topic: input.clone() });
    };
    topics.ensure(&TopicSpec {
        name: input.clone(),
        partitions: *partitions,
        configs: configs.clone(),
        must_match: Vec::new(),
        derived_with: Vec::new(),
    })?;
    Ok(*partitions)
}

/// Binds (failing fast on a bad address) and serves on `runtime`, which lives as long as
/// the worker.
fn serve_http(
    runtime: &tokio::runtime::Runtime,
    config: &WorkConfig,
    shared: &Arc<Shared>,
    replica: Arc<Replica>,
) -> Result<()> {
    let addr = config.http_listen;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| WorkError::Http { addr: addr.to_string(), source })?;
    let status_source = shared.clone();
    let state = Arc::new(HttpState {
        replica,
        metrics: shared.metrics.clone(),
        status: Arc::new(move || status_source.status.lock().unwrap_or_else(|e| e.into_inner()).clone()),
    });
    tracing::info!(%addr, "HTTP API listening");
    let (connections_max, timeouts) = (config.http_connections_max, config.http_timeouts);
    runtime.spawn(async move {
        let serving =
            kappa_http::serve_router(listener, router(state), connections_max, timeouts, std::future::pending());
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}
