//! The processing loop of one view version: read committed input records, decode and
//! upcast them, apply them, and commit each step.
//!
//! A step's commit happens in two places, in this order:
//! 1. one batch appended to the version's changelog: every changed key, then a step marker
//!    with the input positions after the step (`changelog.rs`);
//! 2. one redb transaction with the same changes, the same positions and the changelog
//!    offset after the batch (`store.rs`), committed without fsync.
//!
//! The changelog is the source of truth; the store is a cache of it that is made durable
//! every `CHECKPOINT_INTERVAL`, and only after the changelog is durable up to the store's
//! position (synced then if the log's sync policy has not yet: `LogBackend::make_durable`).
//! A checkpoint runs on its own thread so the view keeps going (subscribers see no
//! stall): steps still append to the changelog, and their store writes wait in memory
//! (`InFlight`, which steps also read from) until the checkpoint's transaction is done.
//! So after any crash the durable store is a prefix of the durable changelog:
//! recovery replays the changelog from the store's position (changes and positions), and
//! processing resumes from the positions of the last step in the changelog. No step is
//! applied twice (its marker moved the positions) or lost (it is in the changelog, or it
//! never happened and is processed again from the inputs, deterministically).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use kappa_log::LogError;
use redb::Durability;

use crate::backend::{InputChunk, InputRecord, LogBackend, OutputRecord, TopicId};
use crate::changelog::{self, Change, Entry, StepMarker};
use crate::error::{EventError, InputPosition, Result, ViewError};
use crate::event::{PayloadCodec, decode_event};
use crate::schema::Schemas;
use crate::store::{Progress, Scope, Snapshot, Store, StoreWrite, StoredValue};
use crate::view::{Applier, ErrorPolicy, StoreRead, View};

/// How far ahead of the record being applied a later record's state is prefetched: far
/// enough for a DRAM load to finish (~1 µs of work per event), near enough that the
/// line is still in cache when used (4–16 measured alike, 32 slower: BENCHMARKS.md run 17).
const PREFETCH_RECORDS_AHEAD: usize = 8;

/// Input bytes read at a time (more when a transaction's records continue further on).
pub const STEP_READ_BYTES: usize = 1024 * 1024;
/// Records applied per step while a version builds (big steps: fewer commits, and a key
/// changed many times is written once per step).
pub const STEP_RECORDS_BUILD_MAX: usize = 1_000_000;
/// Records applied per step once caught up (small steps: low latency).
pub const STEP_RECORDS_LIVE_MAX: usize = 10_000;
/// Changed keys per step; a step ends once it has changed this many.
pub const STEP_DIRTY_KEYS_MAX: usize = 50_000;
/// A transaction's records are applied in one step up to this many bytes of input; a
/// larger one is applied in pieces of about this size.
pub const STEP_TRANSACTION_BYTES_MAX: usize = 64 * 1024 * 1024;
/// One step's changelog batch (its changes, counted as key + value + 32 bytes each). A step
/// whose changes are larger is applied again shortened to about half, repeatedly: cut
/// between input transactions where it holds more than one, else inside its one
/// transaction (with a warning; reads then see that transaction in pieces). Only an event
/// whose changes alone are larger fails the version (`ViewError::StepTooLarge`).
pub const CHANGELOG_STEP_BYTES_MAX: usize = 32 * 1024 * 1024;
/// The largest value one view key may hold; an event that makes a value larger fails (and
/// is handled by the view's error policy). Judged on a step's final values, not after
/// every event: see `oversized_change`.
pub const VIEW_VALUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Keys found over `VIEW_VALUE_BYTES_MAX` whose size the runner then checks after every
/// event that changes them (until a step leaves them under
/// `OVERSIZED_KEY_UNWATCH_BYTES_MAX`), so the event that makes one too large again fails
/// at once; further ones are found at the end of a step (by applying the step again,
/// halving it). Only the live runner watches; as-of and work-mode folds do not.
pub const OVERSIZED_KEYS_WATCHED_MAX: usize = 16;
/// A watched key whose value ends a step at most this large (or deleted) is watched no
/// more: checking costs serializing its whole value per event, for the runner's life.
pub const OVERSIZED_KEY_UNWATCH_BYTES_MAX: usize = VIEW_VALUE_BYTES_MAX / 2;
/// Decoded state kept in memory between steps (about half the clean entries are dropped
/// when there are more).
pub const CACHE_ENTRIES_MAX: usize = 500_000;
/// How often the store is made durable. It bounds how much changelog a restart replays,
/// not correctness; each checkpoint fsyncs the store (tens to hundreds of ms on a large
/// store) on its own thread while the view goes on.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Keys with store writes held back while a checkpoint runs; past this the view waits for it.
pub const DEFERRED_WRITES_MAX: usize = 500_000;
/// How long an idle runner waits for input before checking for shutdown.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// How long a version that caught up waits before trying again to record it when its
/// `CaughtUp` call failed (e.g. the active file could not be written on a full disk).
pub const CAUGHT_UP_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The first pause before a version that failed on something transient starts again.
pub const RESTART_PAUSE_MIN: Duration = Duration::from_secs(1);
/// The longest such pause (it doubles while failures come quickly).
pub const RESTART_PAUSE_MAX: Duration = Duration::from_secs(60);
/// How often a runner looks for partitions added to its input topics (CreatePartitions):
/// a new partition's records wait at most this long, busy or idle.
pub const INPUT_PARTITIONS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Where a version is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Replaying its changelog into the store after a restart.
    Restoring,
    /// Applying inputs, not yet caught up for the first time.
    Building,
    /// Caught up with its inputs (and following them).
    Live,
    /// Stopped at an event it could not apply, or by an error; stays stopped until a
    /// restart.
    Failed(String),
    /// Stopped by something that may pass (`ViewError::is_transient`, e.g. a full disk):
    /// started again by itself at `retry_at`, recovering from its changelog.
    Restarting { reason: String, retry_at: SystemTime },
    /// Its code is not in this build: readable, not following its inputs.
    Stopped,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Restoring => "restoring",
            Phase::Building => "building",
            Phase::Live => "live",
            Phase::Failed(_) => "failed",
            Phase::Restarting { .. } => "restarting",
            Phase::Stopped => "stopped",
        }
    }
}

/// A version's progress as the runner last reported it.
#[derive(Debug, Clone)]
pub struct RunnerStatus {
    pub phase: Phase,
    pub events_applied: i64,
    /// "topic/partition" → next offset to apply.
    pub positions: BTreeMap<String, i64>,
    /// "topic/partition" → last stable offset when last looked at.
    pub ends: BTreeMap<String, i64>,
    /// The changelog offset after the last committed step.
    pub changelog_next: i64,
    /// Input offsets per second over recent steps.
    pub rate_per_second: f64,
}

impl RunnerStatus {
    /// Input records not yet applied.
    pub fn lag(&self) -> i64 {
        self.ends.iter().map(|(key, end)| (end - self.positions.get(key).copied().unwrap_or(0)).max(0)).sum()
    }

    /// Seconds until caught up at the current rate.
    pub fn eta_seconds(&self) -> Option<f64> {
        let lag = self.lag();
        if lag == 0 {
            Some(0.0)
        } else if self.rate_per_second > 0.0 {
            Some(lag as f64 / self.rate_per_second)
        } else {
            None
        }
    }
}

/// What the runner thread shares with readers and the engine.
pub(crate) struct VersionShared {
    pub view: String,
    pub version: u32,
    pub store: Store,
    pub changelog_topic: String,
    pub stop: AtomicBool,
    status: Mutex<RunnerStatus>,
    /// Dead-letter topic → the offset after the last dead letter appended to it: every
    /// checkpoint makes them durable before the store. Kept across the runners of a
    /// restarting version, as their store (with its steps not yet durable) is.
    dead_letters: Mutex<BTreeMap<String, i64>>,
    /// Bumped when the positions or the phase change (not for the ends and rate each idle
    /// pass refreshes), and by the engine when which version serves changes or it shuts
    /// down: readers waiting for input offsets to be applied (`ViewEngine::get_after`) wait
    /// on it instead of polling.
    published: tokio::sync::watch::Sender<()>,
}

impl VersionShared {
    pub fn new(view: &str, version: u32, store: Store, phase: Phase) -> Result<Self> {
        let progress = store.progress()?;
        Ok(Self {
            view: view.to_owned(),
            version,
            changelog_topic: changelog::topic_name(view, version),
            stop: AtomicBool::new(false),
            dead_letters: Mutex::new(BTreeMap::new()),
            published: tokio::sync::watch::Sender::new(()),
            status: Mutex::new(RunnerStatus {
                phase,
                events_applied: progress.events_applied,
                positions: progress.positions,
                ends: BTreeMap::new(),
                changelog_next: progress.changelog_next,
                rate_per_second: 0.0,
            }),
            store,
        })
    }

    pub fn status(&self) -> RunnerStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> MutexGuard<'_, RunnerStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `f` of the status, read under its lock: a reader that needs a few positions or the
    /// phase looks at them without cloning the whole status.
    pub fn with_status<R>(&self, f: impl FnOnce(&RunnerStatus) -> R) -> R {
        f(&self.lock_status())
    }

    pub fn phase(&self) -> Phase {
        self.with_status(|status| status.phase.clone())
    }

    pub fn set_phase(&self, phase: Phase) {
        let changed = {
            let mut status = self.lock_status();
            let changed = status.phase != phase;
            status.phase = phase;
            changed
        };
        if changed {
            self.wake();
        }
    }

    /// A receiver that sees every change of the positions or the phase after this call
    /// (and every [`Self::wake`]).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.published.subscribe()
    }

    /// Wakes the readers waiting on this version (`subscribe`): its positions or phase
    /// changed, or the engine's did (a switch, a retire, a shutdown).
    pub fn wake(&self) {
        self.published.send_replace(());
    }

    /// Reopens the store after a full disk left redb refusing every call on it, publishing
    /// the progress it reopened at — its last durable commit, maybe behind what was
    /// published — before readers see the reopened state; the next runner recovers the rest
    /// from the changelog.
    fn reopen_store(&self) -> Result<()> {
        self.store.reopen(|progress| {
            {
                let mut status = self.lock_status();
                status.positions.clone_from(&progress.positions);
                status.events_applied = progress.events_applied;
                status.changelog_next = progress.changelog_next;
            }
            self.wake();
        })?;
        tracing::info!(view = %self.view, version = self.version, "reopened the view state store after a full disk");
        Ok(())
    }
}

/// Called when a version first catches up with its inputs, before that is recorded: an
/// error (its auto-switch could not be saved) leaves the version not caught up, and the
/// call is made again (`CAUGHT_UP_RETRY_INTERVAL`, or after a restart).
pub(crate) type CaughtUp = Arc<dyn Fn(&str, u32) -> Result<()> + Send + Sync>;

pub(crate) struct Runner {
    pub shared: Arc<VersionShared>,
    pub backend: Arc<dyn LogBackend>,
    pub schemas: Arc<Schemas>,
    pub codec: Arc<dyn PayloadCodec>,
    pub view: View,
    pub on_caught_up: CaughtUp,
    applier: Box<dyn Applier>,
    /// Every partition of every input topic, extended when a topic gains partitions.
    inputs: Vec<(Arc<str>, i32)>,
    /// When `inputs` was last compared with the topics' partition counts.
    inputs_checked: Instant,
    /// Each input topic's id as recorded when this version first read it (none from a log
    /// without topic ids): a topic deleted and created again has another.
    topic_ids: HashMap<String, TopicId>,
    /// Per input: the last stable offset at which its next records were found to belong to
    /// a transaction that ends past it; read again once that offset moves.
    held: Vec<i64>,
    progress: Progress,
    next_input: usize,
    /// The largest input timestamp of the step being applied.
    step_timestamp: Option<i64>,
    /// Keys once found too large (up to `OVERSIZED_KEYS_WATCHED_MAX`), checked per event.
    oversized: Vec<(Scope, String)>,
    last_checkpoint: Instant,
    checkpoint_interval: Duration,
    /// When a failed `on_caught_up` may be tried again.
    caught_up_retry_at: Option<Instant>,
    /// A checkpoint running on its own thread, and the store writes waiting for it.
    in_flight: Option<InFlight>,
    /// What the store holds (behind `progress` while writes are deferred); published.
    store_progress: Progress,
    rate_window: (Instant, i64),
}

/// A store checkpoint on its own thread (redb allows one write transaction at a time, so
/// steps committed meanwhile wait here).
struct InFlight {
    thread: std::thread::JoinHandle<Result<()>>,
    /// The latest held-back write per key (None: deleted), indexed by scope: committed once
    /// the checkpoint is done, and read by steps meanwhile (what the store would hold).
    deferred: Arc<Deferred>,
}

type Deferred = [HashMap<String, Option<StoredValue>>; 2];

fn scope_index(scope: Scope) -> usize {
    match scope {
        Scope::View => 0,
        Scope::Internal => 1,
    }
}

/// The "topic/partition" key of an input position.
pub fn position_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

impl Runner {
    pub fn new(
        shared: Arc<VersionShared>,
        backend: Arc<dyn LogBackend>,
        schemas: Arc<Schemas>,
        codec: Arc<dyn PayloadCodec>,
        view: View,
        on_caught_up: CaughtUp,
        checkpoint_interval: Duration,
    ) -> Self {
        let applier = view.logic.applier();
        Self {
            shared,
            backend,
            schemas,
            codec,
            view,
            on_caught_up,
            applier,
            inputs: Vec::new(),
            inputs_checked: Instant::now(),
            topic_ids: HashMap::new(),
            held: Vec::new(),
            progress: Progress::default(),
            next_input: 0,
            step_timestamp: None,
            oversized: Vec::new(),
            last_checkpoint: Instant::now(),
            checkpoint_interval,
            caught_up_retry_at: None,
            in_flight: None,
            store_progress: Progress::default(),
            rate_window: (Instant::now(), 0),
        }
    }

    /// Runs until stopped or failed, and returns the failure; the caller records it in the
    /// status (failed, or restarting).
    pub fn run(mut self) -> Option<ViewError> {
        let result = self.run_until_stopped();
        // The checkpoint thread joined first: its error is what marks the store full, which
        // decides below and in the caller. After a failure the writes it deferred are
        // dropped: `progress` may hold a step whose changes were not deferred (it failed
        // after its changelog append), and the changelog replays them anyway.
        let finished = match result {
            Ok(()) => self.finish_checkpoint(true),
            Err(_) => self.join_checkpoint(),
        };
        // A store that failed on a full disk refuses every call until it is reopened: no
        // store checkpoint, but the outputs are still made durable.
        if self.shared.store.needs_reopen() {
            if let Err(e) = outputs_durable(self.backend.as_ref(), &self.shared, self.progress.changelog_next) {
                tracing::error!(view = %self.shared.view, version = self.shared.version, error = %e, "making the changelog durable after the state store failed");
            }
            // The runner may have met redb's refusal before the checkpoint met the full disk:
            // the full disk is the reason to give.
            return match (result, finished) {
                (Err(ViewError::Store { source, .. }), Err(full)) if matches!(*source, redb::Error::PreviousIo) => {
                    Some(full)
                }
                (result, _) => result.err(),
            };
        }
        if let Err(e) = finished.and_then(|()| self.checkpoint()) {
            tracing::error!(view = %self.shared.view, version = self.shared.version, error = %e, "final view checkpoint failed");
        }
        result.err()
    }

    fn run_until_stopped(&mut self) -> Result<()> {
        self.resolve_inputs()?;
        self.recover()?;
        self.shared.set_phase(if self.progress.caught_up { Phase::Live } else { Phase::Building });
        while !self.shared.stop.load(Ordering::Acquire) {
            if self.inputs_checked.elapsed() >= INPUT_PARTITIONS_CHECK_INTERVAL {
                self.add_new_partitions()?;
            }
            let progressed = self.step()?;
            self.finish_checkpoint(false)?;
            if self.last_checkpoint.elapsed() >= self.checkpoint_interval {
                self.start_checkpoint();
            }
            if progressed {
                continue;
            }
            // Idle: nothing to stall, so let deferred writes reach the store now.
            self.finish_checkpoint(true)?;
            if !self.progress.caught_up && self.caught_up_retry_at.is_none_or(|at| Instant::now() >= at) {
                self.catch_up()?;
            }
            self.update_rate(true);
            let waiting: Vec<(&str, i32, i64)> = self
                .inputs
                .iter()
                .zip(&self.held)
                .map(|((topic, partition), held)| (&**topic, *partition, self.position(topic, *partition).max(*held)))
                .collect();
            self.backend.wait_for_input(&waiting, IDLE_WAIT)?;
        }
        Ok(())
    }

    /// Records that the version caught up, after `on_caught_up` (its auto-switch) succeeded:
    /// recorded first, a crash or a failed switch in between would leave it caught up but
    /// never switched to, since the switch is made only on this first catch-up. In this
    /// order a crash makes it catch up and switch again (a no-op if the switch was saved).
    fn catch_up(&mut self) -> Result<()> {
        // What it serves once switched to must not be lost by a crash.
        self.checkpoint()?;
        if let Err(e) = (self.on_caught_up)(&self.shared.view, self.shared.version) {
            tracing::error!(view = %self.shared.view, version = self.shared.version, error = %e, retry_in = ?CAUGHT_UP_RETRY_INTERVAL, "view version caught up but could not take over reads; it stays building and tries again");
            self.caught_up_retry_at = Some(Instant::now() + CAUGHT_UP_RETRY_INTERVAL);
            return Ok(());
        }
        self.caught_up_retry_at = None;
        self.progress.caught_up = true;
        self.commit_store(Vec::new())?;
        self.checkpoint()?;
        self.shared.set_phase(Phase::Live);
        tracing::info!(view = %self.shared.view, version = self.shared.version, events = self.progress.events_applied, "view version caught up with its inputs");
        Ok(())
    }

    fn resolve_inputs(&mut self) -> Result<()> {
        for topic in self.view.inputs.clone() {
            let count = self.backend.partition_count(&topic).map_err(|e| ViewError::Definition {
                view: self.view.name.clone(),
                reason: format!("input topic '{topic}': {e}; create the topic before starting the view"),
            })?;
            self.extend_inputs(&topic, count);
            self.resolve_topic_id(&topic)?;
        }
        self.inputs_checked = Instant::now();
        Ok(())
    }

    /// Compares `topic`'s id with the one recorded when this version first read it, or
    /// records it (a new version, or a store from before topic ids).
    fn resolve_topic_id(&mut self, topic: &str) -> Result<()> {
        let Some(id) = self.backend.topic_id(topic)? else { return Ok(()) };
        match self.shared.store.input_topic_id(topic)? {
            Some(recorded) if recorded != id => return Err(self.topic_recreated(topic)),
            Some(_) => {}
            None => self.shared.store.record_input_topic_id(topic, &id)?,
        }
        self.topic_ids.insert(topic.to_owned(), id);
        Ok(())
    }

    /// Fails when input `topic` is no longer the topic this version read (deleted and
    /// created again): its positions would name records of another topic. Called before
    /// each step and after each read: a read followed by a check that passes came from
    /// the recorded topic (a topic's id never comes back).
    fn check_topic_id(&self, topic: &str) -> Result<()> {
        let Some(recorded) = self.topic_ids.get(topic) else { return Ok(()) };
        match self.backend.topic_id(topic)? {
            Some(id) if id != *recorded => Err(self.topic_recreated(topic)),
            _ => Ok(()),
        }
    }

    /// Fails when a step marker being restored names another id for an input topic than
    /// the topic has now: the store (which records the ids) may be gone, rebuilt from this
    /// changelog, whose positions then name records of the old topic. Checked before the
    /// step reaches the store, so every restart stops here again.
    fn check_marker_topic_ids(&self, marker: &StepMarker) -> Result<()> {
        for (topic, id) in &self.topic_ids {
            if marker.topic_ids.get(topic).is_some_and(|read| *read != changelog::topic_id_hex(id)) {
                return Err(self.topic_recreated(topic));
            }
        }
        Ok(())
    }

    fn topic_recreated(&self, topic: &str) -> ViewError {
        ViewError::InputTopicRecreated {
            view: self.shared.view.clone(),
            version: self.shared.version,
            topic: topic.to_owned(),
        }
    }

    /// Follows partitions added to an input topic since they were last counted. A new
    /// partition has no position yet: it is read from its start offset (`position`, then
    /// `step`), and its position enters the step markers and the store with its first step.
    fn add_new_partitions(&mut self) -> Result<()> {
        for topic in self.view.inputs.clone() {
            let count = self.backend.partition_count(&topic)?;
            let added = self.extend_inputs(&topic, count);
            if added > 0 {
                tracing::info!(view = %self.shared.view, version = self.shared.version, %topic, added, partitions = count, "input topic gained partitions; following them");
            }
        }
        self.inputs_checked = Instant::now();
        Ok(())
    }

    /// Adds the partitions of `topic` below `count` not yet among the inputs (a topic
    /// never shrinks); returns how many.
    fn extend_inputs(&mut self, topic: &str, count: i32) -> i32 {
        let known = self.inputs.iter().filter(|(t, _)| &**t == topic).count() as i32;
        if count <= known {
            return 0;
        }
        let topic: Arc<str> = Arc::from(topic);
        self.inputs.extend((known..count).map(|p| (topic.clone(), p)));
        self.held.resize(self.inputs.len(), -1);
        count - known
    }

    fn position(&self, topic: &str, partition: i32) -> i64 {
        self.progress.positions.get(&position_key(topic, partition)).copied().unwrap_or(0)
    }

    /// Brings the store up to the end of the changelog.
    fn recover(&mut self) -> Result<()> {
        let topic = self.shared.changelog_topic.clone();
        let configs = BTreeMap::from([
            (kappa_log::config::CLEANUP_POLICY.to_owned(), "compact".to_owned()),
            (kappa_log::config::MAX_MESSAGE_BYTES.to_owned(), (CHANGELOG_STEP_BYTES_MAX + 1024 * 1024).to_string()),
        ]);
        self.backend.ensure_topic(&topic, 1, &configs)?;
        self.progress = self.shared.store.progress()?;
        let end = self.backend.durable_end_offset(&topic, 0)?;
        let start = self.backend.start_offset(&topic, 0)?;
        if self.progress.changelog_next > end {
            return Err(self.changelog_error(format!(
                "the state store is at changelog offset {} but the changelog ends at {end}: the changelog lost records. To rebuild from the inputs: retire this version if it does not serve; if it serves, define a version numbered above every existing one (it builds beside this one and takes over once caught up), or stop kappa and delete this version's directory and changelog topic",
                self.progress.changelog_next
            )));
        }
        let mut from = self.progress.changelog_next.max(start);
        if from < end {
            self.shared.set_phase(Phase::Restoring);
            tracing::info!(view = %self.shared.view, version = self.shared.version, from, end, "restoring view state from its changelog");
        }
        while from < end {
            let chunk = self.backend.read_committed(&topic, 0, from, STEP_READ_BYTES)?;
            if chunk.next_offset <= from {
                break;
            }
            let mut writes = Vec::with_capacity(chunk.records.len());
            for record in &chunk.records {
                match changelog::decode(record)
                    .map_err(|e| self.changelog_error(format!("offset {}: {e}", record.offset)))?
                {
                    Entry::Change { offset, change, .. } => writes.push(store_write(change, offset)),
                    Entry::Step { marker, .. } => {
                        self.check_marker_topic_ids(&marker)?;
                        self.progress.positions = marker.positions;
                        self.progress.events_applied = marker.events_applied;
                    }
                }
            }
            from = chunk.next_offset;
            self.progress.changelog_next = from;
            self.commit_store(writes)?;
        }
        self.store_progress = self.progress.clone();
        self.checkpoint()?;
        self.publish(|_| {});
        Ok(())
    }

    fn changelog_error(&self, reason: String) -> ViewError {
        ViewError::Changelog { view: self.shared.view.clone(), version: self.shared.version, reason }
    }

    /// Makes the dead letters and the changelog, then the store, durable up to `progress`, now.
    fn checkpoint(&mut self) -> Result<()> {
        self.finish_checkpoint(true)?;
        outputs_durable(self.backend.as_ref(), &self.shared, self.progress.changelog_next)?;
        self.shared.store.checkpoint()?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Starts a checkpoint on its own thread unless one is running. Nothing is deferred when
    /// it starts, so the store is at `progress` and the changelog (and the dead letters of
    /// its steps) must be durable to there.
    fn start_checkpoint(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let (shared, backend) = (self.shared.clone(), self.backend.clone());
        let changelog_next = self.progress.changelog_next;
        let thread = std::thread::Builder::new()
            .name(format!("kappa-checkpoint-{}-v{}", self.shared.view, self.shared.version))
            .spawn(move || {
                outputs_durable(backend.as_ref(), &shared, changelog_next)?;
                shared.store.checkpoint()
            });
        match thread {
            Ok(thread) => self.in_flight = Some(InFlight { thread, deferred: Arc::default() }),
            Err(e) => {
                // No thread to spare: checkpoint on this one at the next chance instead.
                tracing::warn!(view = %self.shared.view, error = %e, "could not start a checkpoint thread");
                return;
            }
        }
        self.last_checkpoint = Instant::now();
    }

    /// Waits for the running checkpoint, if any, and drops the writes that waited for it.
    fn join_checkpoint(&mut self) -> Result<()> {
        let Some(in_flight) = self.in_flight.take() else { return Ok(()) };
        in_flight.thread.join().unwrap_or_else(|_| {
            Err(self.changelog_error("the checkpoint thread panicked; restart to recover from the changelog".into()))
        })
    }

    /// Ends the running checkpoint if it is done (or, with `wait`, once it is), then commits
    /// the writes that waited for it.
    fn finish_checkpoint(&mut self, wait: bool) -> Result<()> {
        let Some(in_flight) = self.in_flight.take_if(|f| wait || f.thread.is_finished()) else { return Ok(()) };
        let outcome = in_flight.thread.join().unwrap_or_else(|_| {
            Err(self.changelog_error("the checkpoint thread panicked; restart to recover from the changelog".into()))
        });
        outcome?;
        let deferred = Arc::unwrap_or_clone(in_flight.deferred);
        let [view, internal] = deferred.map(HashMap::into_iter);
        let writes = view
            .map(|(key, value)| StoreWrite { scope: Scope::View, key, value })
            .chain(internal.map(|(key, value)| StoreWrite { scope: Scope::Internal, key, value }))
            .collect();
        self.commit_store(writes)
    }

    /// Commits `writes` and `progress` to the store (not durably), or holds them back while
    /// a checkpoint runs.
    fn commit_store(&mut self, writes: Vec<StoreWrite>) -> Result<()> {
        let Some(in_flight) = &mut self.in_flight else {
            self.shared.store.commit(&writes, &self.progress, Durability::None)?;
            self.store_progress.clone_from(&self.progress);
            return Ok(());
        };
        let deferred = Arc::make_mut(&mut in_flight.deferred);
        for write in writes {
            deferred[scope_index(write.scope)].insert(write.key, write.value);
        }
        if deferred.iter().map(HashMap::len).sum::<usize>() > DEFERRED_WRITES_MAX {
            self.finish_checkpoint(true)?;
        }
        Ok(())
    }

    /// Processes one step on one input partition that has records; false when every input
    /// is caught up.
    fn step(&mut self) -> Result<bool> {
        for _ in 0..self.inputs.len() {
            let index = self.next_input % self.inputs.len();
            self.next_input = index + 1;
            let (topic, partition) = self.inputs[index].clone();
            let key = position_key(&topic, partition);
            let mut position = self.position(&topic, partition);
            // Also while it waits for its position: a new topic may never reach it.
            self.check_topic_id(&topic)?;
            let start = self.backend.start_offset(&topic, partition)?;
            if position < start {
                tracing::warn!(view = %self.shared.view, version = self.shared.version, %key, position, start, "input records before {start} were deleted (retention or DeleteRecords) before this view applied them; continuing from {start}");
                position = start;
                // Kept, not only used for this step: with nothing left to read (start is the
                // end) no step would store it, and the idle wait, seeing records past the old
                // position, would return at once, forever.
                self.progress.positions.insert(key.clone(), start);
                self.commit_store(Vec::new())?;
            }
            let end = self.backend.end_offset(&topic, partition)?;
            self.publish(|status| {
                status.ends.insert(key.clone(), end);
            });
            if position >= end || self.held[index] >= end {
                continue;
            }
            if self.run_step(index, &topic, partition, position, end)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Applies records of one partition from `start` until the step's budget is used or the
    /// partition's end, then commits them as one step. False when there was nothing to read.
    fn run_step(&mut self, index: usize, topic: &Arc<str>, partition: i32, start: i64, end: i64) -> Result<bool> {
        let records_max = if self.progress.caught_up { STEP_RECORDS_LIVE_MAX } else { STEP_RECORDS_BUILD_MAX };
        let shared = self.shared.clone();
        let snapshot = shared.store.snapshot()?;
        let deferred = self.in_flight.as_ref().map(|f| f.deferred.clone());
        let store = StepRead::new(&snapshot, deferred.as_deref());
        self.step_timestamp = None;
        let mut position = start;
        let mut applied = 0usize;
        let mut failure = None;
        // Where the reading stopped before a transaction that ends past the last stable
        // offset, and that offset: the partition waits for it to move only if the step
        // ends there.
        let mut held_at = None;
        // The committed transactions read, which a shortened step cuts only when the step
        // is one of them.
        let mut spans = Vec::new();
        'read: while position < end && applied < records_max && self.applier.dirty_entries() < STEP_DIRTY_KEYS_MAX {
            let (mut chunk, held) = self.read_whole_transactions(topic, partition, position)?;
            if held {
                held_at = Some((chunk.next_offset, chunk.end_offset));
            }
            if chunk.next_offset <= position {
                break;
            }
            spans.append(&mut chunk.transaction_spans);
            let mut records = chunk.records.into_iter();
            while let Some(record) = records.next() {
                self.prefetch_ahead(records.as_slice());
                let offset = record.offset;
                if let Err(error) = self.apply_record(topic, partition, record, &store) {
                    failure = Some((offset, error));
                    break 'read;
                }
                applied += 1;
            }
            position = chunk.next_offset;
            if held {
                break;
            }
        }
        store.check()?;
        if position == start && failure.is_none() {
            self.held[index] = held_at.map_or(-1, |(_, stable)| stable);
            return Ok(false);
        }
        let mut found_oversized = Vec::new();
        // The changes of the step first read, when it was too large for one step.
        let mut shortened_from = None;
        // Any error from here on, if a read of the step failed, is the store's doing (e.g.
        // "not deterministic" from a re-applied event whose read failed): `cause`.
        let changes = (|| -> Result<Vec<Change>> {
            if let Some((offset, _)) = &failure {
                // The failing event may have changed keys before failing: apply the step
                // again without it.
                (position, applied) = self.reapply(topic, partition, start, *offset, usize::MAX, &store)?.done();
            }
            let mut changes = self.take_changes(topic, partition, start)?;
            loop {
                if oversized_change(&changes).is_some() {
                    // An earlier event than any failure found so far: the step ends before it.
                    let (offset, key, error) =
                        self.find_oversized_event(topic, partition, start, position, applied, &store)?;
                    found_oversized.push(key);
                    failure = Some((offset, error));
                    (position, applied) = self.reapply(topic, partition, start, offset, usize::MAX, &store)?.done();
                } else if changes_bytes(&changes) > CHANGELOG_STEP_BYTES_MAX {
                    failure = None;
                    shortened_from.get_or_insert(changes_bytes(&changes));
                    (position, applied) =
                        self.shorten_step(topic, partition, start, position, applied, &spans, &changes, &store)?;
                } else {
                    return Ok(changes);
                }
                changes = self.take_changes(topic, partition, start)?;
            }
        })()
        .map_err(|e| store.cause(e))?;
        if let Some(bytes) = shortened_from.filter(|_| failure.is_none()) {
            self.warn_split_transaction(topic, partition, start, position, &spans, bytes, changes_bytes(&changes));
        }
        self.unwatch_shrunk(&changes);
        // Watched only now: the step's records were applied again unwatched, as first.
        for key in found_oversized {
            if self.oversized.len() < OVERSIZED_KEYS_WATCHED_MAX && !self.oversized.contains(&key) {
                self.oversized.push(key);
            }
        }
        // Also when the view's code went on past a failed read: its result is not to be kept.
        store.check()?;
        drop(store);
        drop(snapshot);
        drop(deferred); // unshared again, so commit_store extends it in place
        let mut stop = None;
        if let Some((offset, error)) = failure {
            match self.view.on_error.clone() {
                ErrorPolicy::Stop => stop = Some(self.event_failed(topic, partition, offset, error)),
                ErrorPolicy::DeadLetter(dlq) => {
                    self.dead_letter(&dlq, topic, partition, offset, &error)?;
                    position = offset + 1;
                }
            }
        }
        // A step that ends before where the reading was held goes on at once next time.
        self.held[index] = match held_at {
            Some((at, stable)) if position >= at => stable,
            _ => -1,
        };
        // The step's progress reaches `self.progress` only once the changelog holds the
        // step: a checkpoint finishing after a failed commit must not store positions past
        // events that are in neither the changelog nor the store.
        let mut next = self.progress.clone();
        next.positions.insert(position_key(topic, partition), position);
        next.events_applied += applied as i64;
        let timestamp = self.step_timestamp.take().unwrap_or_else(now_ms);
        let step = InputPosition { topic: topic.to_string(), partition, offset: start };
        self.commit_step(changes, next, &step, timestamp)?;
        self.applier.trim(CACHE_ENTRIES_MAX);
        match stop {
            Some(error) => Err(error),
            None => Ok(true),
        }
    }

    /// Starts loading the cached state of the record `PREFETCH_RECORDS_AHEAD` records on,
    /// by its record key: most views key their state by it (a view that does not only
    /// loses the few nanoseconds of the hint).
    fn prefetch_ahead(&self, coming: &[InputRecord]) {
        if let Some(key) = coming.get(PREFETCH_RECORDS_AHEAD - 1).and_then(|r| r.key.as_deref()) {
            self.applier.prefetch(key);
        }
    }

    fn apply_record(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        record: InputRecord,
        store: &dyn StoreRead,
    ) -> Result<(), EventError> {
        let mut event = decode_event(topic, partition, record, self.codec.as_ref())?;
        self.schemas.upcast_in_place(&mut event)?;
        self.step_timestamp = Some(self.step_timestamp.map_or(event.timestamp, |t| t.max(event.timestamp)));
        self.applier.apply(&event, store)?;
        if self.oversized.is_empty() { Ok(()) } else { self.check_oversized() }
    }

    /// Applies again, from `start`, about half of the `applied` records before `position`
    /// whose `changes` are too large for one step, cut where it splits no transaction of
    /// `spans` — or, when the step is a single transaction, inside it (as past
    /// `STEP_TRANSACTION_BYTES_MAX`: the input cannot be rewritten, so failing would stop
    /// the version for good); returns the new position and count. Fails only when one
    /// event alone is too large.
    #[allow(clippy::too_many_arguments)]
    fn shorten_step(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        start: i64,
        position: i64,
        applied: usize,
        spans: &[(i64, i64)],
        changes: &[Change],
        store: &dyn StoreRead,
    ) -> Result<(i64, usize)> {
        if applied <= 1 {
            return Err(ViewError::StepTooLarge {
                view: self.shared.view.clone(),
                version: self.shared.version,
                position: InputPosition { topic: topic.to_string(), partition, offset: start },
                unit: "the event".to_owned(),
                bytes: changes_bytes(changes),
                max: CHANGELOG_STEP_BYTES_MAX,
            });
        }
        let (half, half_applied) = self.reapply(topic, partition, start, position, applied / 2, store)?.done();
        let mut cut = cut_before(spans, half);
        if cut <= start {
            // The first transaction holds the half: the step is that transaction if it is
            // not all of the step, else half of it.
            cut = cut_after(spans, half);
            if cut >= position {
                return Ok((half, half_applied));
            }
        }
        if cut == half {
            return Ok((half, half_applied));
        }
        Ok(self.reapply(topic, partition, start, cut, usize::MAX, store)?.done())
    }

    /// Warns when a step shortened from `bytes` of changes to `step_bytes` ends at `end`
    /// inside a committed transaction of `spans`: readers of the view (and its changelog)
    /// see that transaction's effects in pieces.
    #[allow(clippy::too_many_arguments)]
    fn warn_split_transaction(
        &self,
        topic: &str,
        partition: i32,
        start: i64,
        end: i64,
        spans: &[(i64, i64)],
        bytes: usize,
        step_bytes: usize,
    ) {
        let Some((first, marker)) = split_span(spans, end) else { return };
        tracing::warn!(
            view = %self.shared.view,
            version = self.shared.version,
            %topic,
            partition,
            transaction_first = first,
            transaction_marker = marker,
            step_start = start,
            step_end = end,
            read_changes_bytes = bytes,
            step_changes_bytes = step_bytes,
            max = CHANGELOG_STEP_BYTES_MAX,
            "a committed input transaction changes more view state than one step may (CHANGELOG_STEP_BYTES_MAX): it is applied in pieces, so reads may see part of it"
        );
    }

    /// The event of the step from `start` (`applied` records up to `position`) after which
    /// a value is first over `VIEW_VALUE_BYTES_MAX`, found by applying halves of the step
    /// again, the key and why the event fails. The step as a whole has such a value.
    fn find_oversized_event(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        start: i64,
        position: i64,
        applied: usize,
        store: &dyn StoreRead,
    ) -> Result<(i64, (Scope, String), EventError)> {
        // State after `fine` records has no value too large, after `over` records it has.
        let (mut fine, mut over) = (0, applied);
        while over - fine > 1 {
            let middle = fine + (over - fine) / 2;
            self.reapply(topic, partition, start, position, middle, store)?;
            let changes = self.take_changes(topic, partition, start)?;
            if oversized_change(&changes).is_some() {
                over = middle;
            } else {
                fine = middle;
            }
        }
        let again = self.reapply(topic, partition, start, position, over, store)?;
        let changes = self.take_changes(topic, partition, start)?;
        let Some(change) = oversized_change(&changes) else {
            return Err(self.changelog_error(format!(
                "re-applying {topic}/{partition} offsets {start} to {} left no value over {VIEW_VALUE_BYTES_MAX} bytes where applying them had: the view's logic is not deterministic",
                again.last
            )));
        };
        let bytes = change.value.as_ref().map_or(0, Vec::len);
        Ok((again.last, (change.scope, change.key.clone()), value_too_large(change.scope, &change.key, bytes)))
    }

    /// Stops watching the keys whose value the step's `changes` leave well under the
    /// limit (`OVERSIZED_KEY_UNWATCH_BYTES_MAX`) or delete.
    fn unwatch_shrunk(&mut self, changes: &[Change]) {
        if self.oversized.is_empty() {
            return;
        }
        for change in changes {
            if change.value.as_ref().is_none_or(|v| v.len() <= OVERSIZED_KEY_UNWATCH_BYTES_MAX) {
                self.oversized.retain(|(scope, key)| *scope != change.scope || *key != change.key);
            }
        }
    }

    /// Fails the event just applied if it made a watched key's value too large.
    fn check_oversized(&self) -> Result<(), EventError> {
        for (scope, key) in &self.oversized {
            match self.applier.touched_value_bytes(*scope, key)? {
                Some(bytes) if bytes > VIEW_VALUE_BYTES_MAX => return Err(value_too_large(*scope, key, bytes)),
                _ => {}
            }
        }
        Ok(())
    }

    fn take_changes(&mut self, topic: &str, partition: i32, start: i64) -> Result<Vec<Change>> {
        self.applier.take_changes().map_err(|e| self.event_failed(topic, partition, start, e))
    }

    /// Applies again, on an empty cache, the records of a partition from `start` up to
    /// (excluding) offset `until`, at most `records_max` of them.
    fn reapply(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        start: i64,
        until: i64,
        records_max: usize,
        store: &dyn StoreRead,
    ) -> Result<Reapplied> {
        self.applier.discard();
        self.step_timestamp = None;
        let mut position = start;
        let mut applied = 0;
        let mut last = start - 1;
        while position < until && applied < records_max {
            let (chunk, _) = self.read_whole_transactions(topic, partition, position)?;
            if chunk.next_offset <= position {
                break;
            }
            for record in chunk.records {
                let offset = record.offset;
                if offset >= until || applied >= records_max {
                    return Ok(Reapplied { position: offset, applied, last });
                }
                if let Err(error) = self.apply_record(topic, partition, record, store) {
                    // Applying is deterministic, so this means the view's logic is not.
                    return Err(self.changelog_error(format!(
                        "re-applying {topic}/{partition} offset {offset} failed ({error}) where it had succeeded: the view's logic is not deterministic"
                    )));
                }
                applied += 1;
                last = offset;
            }
            position = chunk.next_offset;
        }
        Ok(Reapplied { position: position.min(until), applied, last })
    }

    /// Reads a chunk, extended until every transaction in it has its marker in it (so a
    /// committed transaction's records on this partition are applied in one step, unless
    /// too large: `STEP_TRANSACTION_BYTES_MAX`, `CHANGELOG_STEP_BYTES_MAX`). True when the
    /// chunk stops before a transaction whose marker is past the last stable offset: its
    /// records are read once they all are.
    fn read_whole_transactions(&self, topic: &str, partition: i32, position: i64) -> Result<(InputChunk, bool)> {
        let mut chunk = self.backend.read_committed(topic, partition, position, STEP_READ_BYTES)?;
        let mut pending: HashMap<i64, i64> = chunk.pending_transactions.iter().copied().collect();
        let mut bytes = STEP_READ_BYTES;
        while !pending.is_empty() && chunk.next_offset < chunk.end_offset && bytes < STEP_TRANSACTION_BYTES_MAX {
            let more = self.backend.read_committed(topic, partition, chunk.next_offset, STEP_READ_BYTES)?;
            if more.next_offset <= chunk.next_offset {
                break;
            }
            // A marker ends the producer's earlier transaction; one it starts later is new.
            for (producer, marker) in &more.ended_transactions {
                if let Some(first) = pending.remove(producer) {
                    chunk.transaction_spans.push((first, *marker));
                }
            }
            for (producer, first) in &more.pending_transactions {
                pending.entry(*producer).or_insert(*first);
            }
            chunk.transaction_spans.extend(more.transaction_spans);
            chunk.ended_transactions.extend(more.ended_transactions);
            chunk.records.extend(more.records);
            chunk.next_offset = more.next_offset;
            chunk.end_offset = more.end_offset;
            chunk.open_transaction = more.open_transaction;
            bytes += STEP_READ_BYTES;
        }
        self.check_topic_id(topic)?;
        let unfinished = pending.values().min().copied().filter(|_| chunk.next_offset >= chunk.end_offset);
        if let Some(first) = unfinished {
            chunk.records.truncate(chunk.records.partition_point(|r| r.offset < first));
            chunk.next_offset = first;
        } else {
            // Past STEP_TRANSACTION_BYTES_MAX a transaction is applied in pieces, one per
            // chunk: a shortened step may end where this one does, not inside it.
            chunk.transaction_spans.extend(pending.values().map(|&first| (first, chunk.next_offset - 1)));
        }
        Ok((chunk, unfinished.is_some()))
    }

    fn event_failed(&self, topic: &str, partition: i32, offset: i64, error: EventError) -> ViewError {
        ViewError::EventFailed {
            view: self.shared.view.clone(),
            version: self.shared.version,
            position: InputPosition { topic: topic.to_owned(), partition, offset },
            reason: error.0,
        }
    }

    /// Appends the failed record, with why, to the dead-letter topic. At least once: a
    /// crash before the step commits appends it again; the `kappa.dlq.source` header
    /// identifies duplicates.
    ///
    /// Durable as the log's sync policy says before the step is appended to the changelog
    /// (an fsync under the default policy: a power loss must not keep the step and lose its
    /// dead letter; at once under `--sync interval:<ms>`), and under any policy before a
    /// checkpoint makes the step durable in the store (`outputs_durable`). Never later than
    /// the changelog append, so a crash (kill -9) that keeps the step keeps its dead letter.
    fn dead_letter(&self, dlq: &str, topic: &str, partition: i32, offset: i64, error: &EventError) -> Result<()> {
        self.backend.ensure_topic(dlq, 1, &BTreeMap::new())?;
        let chunk = self.backend.read_committed(topic, partition, offset, 1)?;
        self.check_topic_id(topic)?;
        let record = chunk.records.into_iter().find(|r| r.offset == offset);
        let (timestamp, key, value, mut headers) = match record {
            Some(r) => (
                r.timestamp,
                r.key.map(|k| k.to_vec()).unwrap_or_default(),
                r.value.map(|v| v.to_vec()),
                r.headers
                    .iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.map(<[u8]>::to_vec)))
                    .collect(),
            ),
            None => (now_ms(), Vec::new(), None, Vec::new()),
        };
        let source = format!("{topic}/{partition}/{offset}");
        headers.push(("kappa.dlq.source".to_owned(), Some(source.into_bytes())));
        headers.push((
            "kappa.dlq.view".to_owned(),
            Some(format!("{}.v{}", self.shared.view, self.shared.version).into_bytes()),
        ));
        headers.push(("kappa.dlq.reason".to_owned(), Some(error.0.clone().into_bytes())));
        tracing::warn!(view = %self.shared.view, version = self.shared.version, %topic, partition, offset, reason = %error, dlq, "skipped an event into the dead-letter topic");
        let (_, last) = self.backend.append(dlq, 0, vec![OutputRecord { timestamp, key, value, headers }])?;
        let mut appended = self.shared.dead_letters.lock().unwrap_or_else(|e| e.into_inner());
        let end = appended.entry(dlq.to_owned()).or_default();
        *end = (*end).max(last + 1);
        drop(appended);
        self.backend.wait_durable(dlq, 0, last + 1)
    }

    /// Appends the step to the changelog, then commits it to the store; `next` (the progress
    /// after the step) becomes the runner's progress once the changelog holds the step.
    /// `step` is where the step's records start (for errors).
    fn commit_step(
        &mut self,
        changes: Vec<Change>,
        mut next: Progress,
        step: &InputPosition,
        timestamp: i64,
    ) -> Result<()> {
        let mut writes = Vec::with_capacity(changes.len());
        if !changes.is_empty() {
            // The last guard: `run_step` already failed the event that made a value this large.
            for change in &changes {
                let bytes = change.value.as_ref().map_or(0, Vec::len);
                if bytes > VIEW_VALUE_BYTES_MAX {
                    return Err(ViewError::ValueTooLarge {
                        view: self.shared.view.clone(),
                        version: self.shared.version,
                        key: change.key.clone(),
                        position: step.clone(),
                        bytes,
                        max: VIEW_VALUE_BYTES_MAX,
                    });
                }
            }
            let marker = StepMarker {
                positions: next.positions.clone(),
                events_applied: next.events_applied,
                topic_ids: self.topic_ids.iter().map(|(t, id)| (t.clone(), changelog::topic_id_hex(id))).collect(),
            };
            let records = changelog::encode_step(&changes, &marker, timestamp);
            let (base, last) = self.backend.append(&self.shared.changelog_topic, 0, records)?;
            assert_eq!(last - base, changes.len() as i64, "a step's changelog batch is its changes plus one marker");
            // In the changelog now: recovery replays it even if what follows fails.
            next.changelog_next = last + 1;
            self.progress = next;
            if self.progress.caught_up {
                // Live: subscribers see a change once it is durable, so wait now (later
                // steps grow while this waits). Building: the checkpoint waits (CHECKPOINT_INTERVAL).
                self.backend.wait_durable(&self.shared.changelog_topic, 0, last + 1)?;
            }
            writes.extend(changes.into_iter().enumerate().map(|(i, change)| store_write(change, base + i as i64)));
        } else {
            self.progress = next;
        }
        self.commit_store(writes)?;
        self.update_rate(false);
        Ok(())
    }

    /// Publishes what the store holds (so a reader that waited for a position finds it).
    /// Waiting readers are woken only when the positions moved: each pass publishes the ends
    /// and each idle pass the rate, which no waiter needs.
    fn publish(&self, extra: impl FnOnce(&mut RunnerStatus)) {
        let moved = {
            let mut status = self.shared.lock_status();
            status.events_applied = self.store_progress.events_applied;
            let moved = status.positions != self.store_progress.positions;
            if moved {
                status.positions.clone_from(&self.store_progress.positions);
            }
            status.changelog_next = self.store_progress.changelog_next;
            extra(&mut status);
            moved
        };
        if moved {
            self.shared.wake();
        }
    }

    fn update_rate(&mut self, idle: bool) {
        let offsets: i64 = self.progress.positions.values().sum();
        let (since, at) = self.rate_window;
        let elapsed = since.elapsed().as_secs_f64();
        let rate = if elapsed >= 0.5 || idle {
            self.rate_window = (Instant::now(), offsets);
            Some(if idle || elapsed == 0.0 { 0.0 } else { (offsets - at) as f64 / elapsed })
        } else {
            None
        };
        self.publish(|status| {
            if let Some(rate) = rate {
                status.rate_per_second = rate;
            }
        });
    }
}

/// Runs a version's runners (`make` builds one) until stopped: after a transient failure
/// (`ViewError::is_transient`, e.g. a full disk refusing a step's append or the state
/// store's write) a new runner recovers from the changelog and goes on, after a pause that
/// doubles while failures come quickly; a store that failed on the full disk is reopened
/// first. Any other failure leaves the version failed until a restart.
/// During a pause its status says `Phase::Restarting`, with why and when it starts again, so
/// callers waiting for it (`ViewEngine::wait_caught_up`) tell the pause from a failure.
pub(crate) fn run_restarting(shared: &VersionShared, make: impl Fn() -> Runner) {
    let mut pause = RESTART_PAUSE_MIN;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        let (error, reopen_failed) = match shared.store.needs_reopen() {
            true => match shared.reopen_store() {
                Ok(()) => (make().run(), false),
                Err(e) => (Some(e), true),
            },
            false => (make().run(), false),
        };
        let Some(error) = error else { return };
        if !restartable(&error, &shared.store) {
            tracing::error!(view = %shared.view, version = shared.version, error = %error, "view version stopped");
            shared.set_phase(Phase::Failed(error.to_string()));
            return;
        }
        // Now, not after the pause: meanwhile reads answer from the store as last made
        // durable instead of failing. If the disk is still full, the next try reopens it.
        if !reopen_failed
            && shared.store.needs_reopen()
            && let Err(e) = shared.reopen_store()
        {
            tracing::debug!(view = %shared.view, version = shared.version, error = %e, "reopening the view state store failed; trying again after the pause");
        }
        if started.elapsed() > RESTART_PAUSE_MAX {
            pause = RESTART_PAUSE_MIN;
        }
        tracing::warn!(view = %shared.view, version = shared.version, error = %error, ?pause, "view version failed on what may pass; starting it again after a pause");
        shared.set_phase(Phase::Restarting { reason: error.to_string(), retry_at: SystemTime::now() + pause });
        let resume_at = Instant::now() + pause;
        while Instant::now() < resume_at {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(IDLE_WAIT);
        }
        pause = (pause * 2).min(RESTART_PAUSE_MAX);
    }
}

/// Whether a runner's `error` passes by itself ([`ViewError::is_transient`]) — or is the
/// store refusing calls after a failure that turned out to be a full disk: the runner may
/// meet the refusal (`PreviousIo`) before the checkpoint thread that met the full disk has
/// marked the store, so the mark is looked at now, with that thread joined.
fn restartable(error: &ViewError, store: &Store) -> bool {
    let refused = matches!(error, ViewError::Store { source, .. }
        if matches!(**source, redb::Error::PreviousIo | redb::Error::DatabaseClosed));
    error.is_transient() || (refused && store.marked_full())
}

/// Makes the dead letters appended so far, then the changelog below `changelog_next`,
/// durable before a checkpoint makes the store durable there, whatever the log's sync
/// policy: a store durable ahead of its changelog fails recovery ("the changelog lost
/// records") and the version must be rebuilt, and a step durable in the store is never
/// applied again, so its dead letters would never be written again.
fn outputs_durable(backend: &dyn LogBackend, shared: &VersionShared, changelog_next: i64) -> Result<()> {
    let dead_letters = shared.dead_letters.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (topic, end) in dead_letters {
        match backend.make_durable(&topic, 0, end) {
            Ok(()) => {}
            // Deleted since, or deleted and created again (its records end before `end`):
            // those dead letters are gone with it, and waiting for them would never end.
            Err(ViewError::Log(e @ (LogError::UnknownTopic(_) | LogError::NotWritten { .. }))) => {
                tracing::warn!(view = %shared.view, version = shared.version, %topic, error = %e, "the dead-letter topic was deleted; the dead letters written to it before are gone with it");
            }
            Err(e) => return Err(e),
        }
        // Durable (or gone): forgotten unless more were appended meanwhile.
        let mut appended = shared.dead_letters.lock().unwrap_or_else(|e| e.into_inner());
        if appended.get(&topic) == Some(&end) {
            appended.remove(&topic);
        }
    }
    if changelog_next > 0 { backend.make_durable(&shared.changelog_topic, 0, changelog_next) } else { Ok(()) }
}

/// A transaction of `spans` ((first record, marker) offsets) that a step ending before
/// `at` would apply only part of.
fn split_span(spans: &[(i64, i64)], at: i64) -> Option<(i64, i64)> {
    spans.iter().copied().find(|&(first, marker)| first < at && at <= marker)
}

/// The latest step end at or before `at` that splits no transaction.
fn cut_before(spans: &[(i64, i64)], mut at: i64) -> i64 {
    while let Some((first, _)) = split_span(spans, at) {
        at = first;
    }
    at
}

/// The earliest step end at or after `at` that splits no transaction.
fn cut_after(spans: &[(i64, i64)], mut at: i64) -> i64 {
    while let Some((_, marker)) = split_span(spans, at) {
        at = marker + 1;
    }
    at
}

/// What `Runner::reapply` applied.
struct Reapplied {
    /// Where the next step starts.
    position: i64,
    applied: usize,
    /// The offset of the last record applied (`start - 1` when none).
    last: i64,
}

impl Reapplied {
    fn done(self) -> (i64, usize) {
        (self.position, self.applied)
    }
}

/// A change whose value is over `VIEW_VALUE_BYTES_MAX`.
///
/// The 4 MiB rule is judged on a step's final values (then the event after which a value
/// is first over is found by applying parts of the step again): a value that goes over
/// and back under within one step is not caught (except on a key the runner watches,
/// `OVERSIZED_KEYS_WATCHED_MAX`), and which event is blamed can depend on where steps are
/// cut. The live runner, a rebuild (larger steps), an as-of replay (read chunks) and a
/// work-mode fold (polls) may cut differently, so they may blame different events or none.
pub(crate) fn oversized_change(changes: &[Change]) -> Option<&Change> {
    changes.iter().find(|c| c.value.as_ref().is_some_and(|v| v.len() > VIEW_VALUE_BYTES_MAX))
}

/// Why an event that made a value too large fails.
pub(crate) fn value_too_large(scope: Scope, key: &str, bytes: usize) -> EventError {
    let kind = match scope {
        Scope::View => "key",
        Scope::Internal => "internal key",
    };
    EventError(format!(
        "it makes the value of {kind} '{key}' {bytes} bytes; a view value may be at most {VIEW_VALUE_BYTES_MAX} bytes (VIEW_VALUE_BYTES_MAX, a fixed limit): keep less under one key, e.g. split it over several keys"
    ))
}

fn changes_bytes(changes: &[Change]) -> usize {
    changes.iter().map(|c| c.key.len() + c.value.as_ref().map_or(0, Vec::len) + 32).sum()
}

fn store_write(change: Change, offset: i64) -> StoreWrite {
    StoreWrite {
        scope: change.scope,
        key: change.key,
        value: change.value.map(|json| StoredValue { changelog_offset: offset, json }),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A step's reads: the writes held back behind a running checkpoint, else the store.
struct StepRead<'a, 's> {
    snapshot: &'a Snapshot<'s>,
    deferred: Option<&'a Deferred>,
    /// The first error the store gave a read. The view's code gets an `EventError` only so
    /// that it stops; the step fails with this instead of blaming the event, which the
    /// error policy would then dead-letter (skipping a valid event for good) or stop at.
    store_failure: RefCell<Option<ViewError>>,
}

impl<'a, 's> StepRead<'a, 's> {
    fn new(snapshot: &'a Snapshot<'s>, deferred: Option<&'a Deferred>) -> Self {
        Self { snapshot, deferred, store_failure: RefCell::new(None) }
    }

    /// Err with the store's error if a read of this step failed.
    fn check(&self) -> Result<()> {
        self.store_failure.borrow_mut().take().map_or(Ok(()), Err)
    }

    /// `error`, unless a read of this step failed first: then that store error, the cause.
    fn cause(&self, error: ViewError) -> ViewError {
        self.store_failure.borrow_mut().take().unwrap_or(error)
    }
}

impl StoreRead for StepRead<'_, '_> {
    fn get(&self, scope: Scope, key: &str) -> Result<Option<Vec<u8>>, EventError> {
        if let Some(value) = self.deferred.and_then(|d| d[scope_index(scope)].get(key)) {
            return Ok(value.as_ref().map(|v| v.json.clone()));
        }
        self.snapshot.get(scope, key).map(|v| v.map(|v| v.json)).map_err(|e| {
            let message = EventError(format!("reading view state: {e}"));
            self.store_failure.borrow_mut().get_or_insert(e);
            message
        })
    }
}
