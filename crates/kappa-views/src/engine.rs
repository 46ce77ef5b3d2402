//! The view engine: every version of every view, which version serves reads, switching and
//! retiring versions, reads, status and as-of queries.
//!
//! On disk (under the engine's directory): `<view>/v<version>/state.redb` per version and
//! `<view>/active` naming the version that serves reads. Versions whose code is in this
//! build run on their own thread; versions found on disk without code stay readable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use kappa_log::io::{RealFs, Storage, write_file_atomic};

use crate::asof::{self, AsOf, AsOfView};
use crate::backend::LogBackend;
use crate::error::{InputPosition, Result, ViewError};
use crate::event::{JsonCodec, PayloadCodec};
use crate::runner::{CaughtUp, Phase, Runner, RunnerStatus, VersionShared, run_restarting};
use crate::schema::Schemas;
use crate::store::{ScanLimit, Scope, Snapshot, Store, StoreOpener, StoredValue, file_store_opener};
use crate::view::View;

const ACTIVE_FILE: &str = "active";
/// In a version's directory: an operator switched reads away from this version, so it does
/// not take them over by itself when it (again) first catches up.
const NO_AUTO_SWITCH_FILE: &str = "no-auto-switch";

/// How the engine is set up.
pub struct EngineConfig {
    /// Where view state lives (e.g. `<data-dir>/views`).
    pub dir: PathBuf,
    pub schemas: Schemas,
    pub codec: Arc<dyn PayloadCodec>,
    /// How often each version's store is made durable (`CHECKPOINT_INTERVAL` by default):
    /// it bounds how much changelog a restart replays.
    pub checkpoint_interval: std::time::Duration,
    /// How each version's state store is opened ([`file_store_opener`] by default).
    pub store_opener: StoreOpener,
}

impl EngineConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            schemas: Schemas::new(),
            codec: Arc::new(JsonCodec),
            checkpoint_interval: crate::runner::CHECKPOINT_INTERVAL,
            store_opener: file_store_opener(),
        }
    }
}

/// One value read from a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    /// The value as JSON.
    pub json: Vec<u8>,
    /// The changelog offset of the change that wrote this value.
    pub changelog_offset: i64,
}

/// One scan's keys.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Item>,
    /// The scan stopped at its [`ScanLimit`]: more keys may follow the last one.
    pub more: bool,
}

/// A read's answer with the version and changelog position it is consistent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<T> {
    pub version: u32,
    /// Every change before this changelog offset is reflected, none after.
    pub position: i64,
    pub value: T,
}

/// What a version is doing.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub version: u32,
    pub serving: bool,
    /// True when this build has the version's code (it follows its inputs).
    pub running: bool,
    pub changelog_topic: String,
    pub status: RunnerStatus,
    /// False once an operator switched reads away from this version (`v<N>/no-auto-switch`):
    /// it does not take reads over by itself when it catches up while another version
    /// serves. Cleared by switching to it, retiring it, or deleting that file.
    pub auto_switch: bool,
}

/// A view with its versions.
#[derive(Debug, Clone)]
pub struct ViewInfo {
    pub name: String,
    pub active: Option<u32>,
    pub inputs: Vec<String>,
    pub versions: Vec<VersionInfo>,
}

struct ViewEntry {
    name: String,
    dir: PathBuf,
    definitions: BTreeMap<u32, View>,
    active: RwLock<Option<u32>>,
    versions: RwLock<BTreeMap<u32, Arc<VersionShared>>>,
    /// Serializes switch, retire and auto-switch.
    admin: Mutex<()>,
}

struct Inner {
    backend: Arc<dyn LogBackend>,
    schemas: Arc<Schemas>,
    codec: Arc<dyn PayloadCodec>,
    checkpoint_interval: std::time::Duration,
    store_opener: StoreOpener,
    views: BTreeMap<String, Arc<ViewEntry>>,
    threads: Mutex<Vec<(String, u32, JoinHandle<()>)>>,
    /// Set by [`ViewEngine::shutdown`] before it stops anything: a read waiting for input
    /// offsets then fails with [`ViewError::ShuttingDown`].
    shutting_down: std::sync::atomic::AtomicBool,
}

/// Runs views and answers reads. Cheap to clone.
#[derive(Clone)]
pub struct ViewEngine {
    inner: Arc<Inner>,
}

impl ViewEngine {
    /// Opens every version on disk and starts every version defined in `views`.
    pub fn start(backend: Arc<dyn LogBackend>, config: EngineConfig, views: Vec<View>) -> Result<Self> {
        Self::open(backend, config, views, true)
    }

    /// Opens every version on disk without processing anything (for offline inspection and
    /// as-of queries while the server is stopped); a defined version with no state on disk is
    /// not opened (opening it would create its store), but its code still answers `as_of`.
    pub fn open_offline(backend: Arc<dyn LogBackend>, config: EngineConfig, views: Vec<View>) -> Result<Self> {
        Self::open(backend, config, views, false)
    }

    fn open(backend: Arc<dyn LogBackend>, config: EngineConfig, views: Vec<View>, run: bool) -> Result<Self> {
        std::fs::create_dir_all(&config.dir).map_err(|e| ViewError::io(&config.dir, e))?;
        let mut definitions: BTreeMap<String, BTreeMap<u32, View>> = BTreeMap::new();
        for view in views {
            view.validate()?;
            let versions = definitions.entry(view.name.clone()).or_default();
            if versions.contains_key(&view.version) {
                return Err(ViewError::Definition {
                    view: view.name.clone(),
                    reason: format!("version {} is defined twice", view.version),
                });
            }
            versions.insert(view.version, view);
        }
        for name in list_dirs(&config.dir)? {
            definitions.entry(name).or_default();
        }
        let mut entries = BTreeMap::new();
        for (name, defined) in definitions {
            let dir = config.dir.join(&name);
            let active = match read_active(&dir)? {
                // Offline (`view dump`, `view list`) it only reads: nothing serves, nothing changes.
                Some(version) if !version_dir(&dir, version).is_dir() && !run => None,
                Some(version) if !version_dir(&dir, version).is_dir() => forget_active(&name, &dir, version)?,
                active => active,
            };
            let entry = ViewEntry {
                name: name.clone(),
                dir,
                definitions: defined,
                active: RwLock::new(active),
                versions: RwLock::new(BTreeMap::new()),
                admin: Mutex::new(()),
            };
            entries.insert(name, Arc::new(entry));
        }
        let engine = Self {
            inner: Arc::new(Inner {
                backend,
                schemas: Arc::new(config.schemas),
                codec: config.codec,
                checkpoint_interval: config.checkpoint_interval,
                store_opener: config.store_opener,
                views: entries,
                threads: Mutex::new(Vec::new()),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        for entry in engine.inner.views.values() {
            engine.open_versions(entry, run)?;
            if run {
                serve_caught_up_when_unserved(entry)?;
            }
        }
        Ok(engine)
    }

    fn open_versions(&self, entry: &Arc<ViewEntry>, run: bool) -> Result<()> {
        let mut versions: Vec<u32> = list_dirs(&entry.dir)?
            .iter()
            .filter_map(|name| name.strip_prefix('v').and_then(|v| v.parse().ok()))
            .collect();
        // Offline only the versions on disk: opening one creates its state store, and an
        // offline command (`view get --as-of` of a view that never ran) creates nothing.
        if run {
            versions.extend(entry.definitions.keys());
        }
        versions.sort_unstable();
        versions.dedup();
        for version in versions {
            let store = Store::open_with(&version_dir(&entry.dir, version), &self.inner.store_opener)?;
            let definition = entry.definitions.get(&version).filter(|_| run);
            let phase = if definition.is_some() { Phase::Building } else { Phase::Stopped };
            let shared = Arc::new(VersionShared::new(&entry.name, version, store, phase)?);
            write_lock(&entry.versions).insert(version, shared.clone());
            if let Some(view) = definition {
                self.spawn_runner(shared, view.clone())?;
            }
        }
        Ok(())
    }

    fn spawn_runner(&self, shared: Arc<VersionShared>, view: View) -> Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let on_caught_up: CaughtUp = Arc::new(move |name, version| match weak.upgrade() {
            Some(inner) => ViewEngine { inner }.auto_switch(name, version),
            None => Ok(()),
        });
        let (backend, schemas, codec) =
            (self.inner.backend.clone(), self.inner.schemas.clone(), self.inner.codec.clone());
        let checkpoint_interval = self.inner.checkpoint_interval;
        let make = {
            let shared = shared.clone();
            move || {
                let (backend, schemas, codec) = (backend.clone(), schemas.clone(), codec.clone());
                Runner::new(
                    shared.clone(),
                    backend,
                    schemas,
                    codec,
                    view.clone(),
                    on_caught_up.clone(),
                    checkpoint_interval,
                )
            }
        };
        let name = format!("view-{}-v{}", shared.view, shared.version);
        let runs = shared.clone();
        let handle = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || run_restarting(&runs, make))
            .map_err(|e| ViewError::io(Path::new(&name), e))?;
        lock(&self.inner.threads).push((shared.view.clone(), shared.version, handle));
        Ok(())
    }

    /// A newly built version takes over reads when it first catches up, if it is the
    /// newest version this build defines and newer than the one serving. Called before the
    /// version records that it caught up (so it is called again after a crash or an error
    /// here): an error means the switch was due but not saved.
    fn auto_switch(&self, name: &str, version: u32) -> Result<()> {
        let Some(entry) = self.inner.views.get(name) else { return Ok(()) };
        let _admin = lock(&entry.admin);
        // A version being retired (no longer listed) does not take over.
        if !read_lock(&entry.versions).contains_key(&version) {
            return Ok(());
        }
        let active = *read_lock(&entry.active);
        let newest = entry.definitions.keys().next_back().copied();
        // Nothing serving outranks an operator's mark: it would leave the view unreadable.
        if active.is_some() && no_auto_switch(&entry.dir, version)? {
            tracing::info!(view = name, version, serving = ?active, "view version caught up; it does not take over reads, as an operator switched them away from it");
            return Ok(());
        }
        if active.is_none() || (active < Some(version) && newest == Some(version)) {
            make_serving(entry, version)?;
            tracing::info!(view = name, version, previous = ?active, "view version caught up and now serves reads");
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Arc<ViewEntry>> {
        self.inner.views.get(name).ok_or_else(|| ViewError::UnknownView(name.to_owned()))
    }

    fn version(&self, entry: &ViewEntry, version: u32) -> Result<Arc<VersionShared>> {
        let versions = read_lock(&entry.versions);
        versions.get(&version).cloned().ok_or_else(|| ViewError::UnknownVersion {
            view: entry.name.clone(),
            version,
            known: versions.keys().copied().collect(),
        })
    }

    /// The version serving reads of `name`.
    fn serving(&self, name: &str) -> Result<Arc<VersionShared>> {
        let entry = self.entry(name)?;
        match *read_lock(&entry.active) {
            Some(version) => self.version(entry, version),
            None => {
                let versions = read_lock(&entry.versions);
                let (version, building) =
                    versions.iter().next_back().ok_or_else(|| ViewError::UnknownView(name.to_owned()))?;
                let status = building.status();
                Err(ViewError::NotReady {
                    view: name.to_owned(),
                    version: *version,
                    progress: format!("{} events applied, {} behind", status.events_applied, status.lag()),
                })
            }
        }
    }

    /// One key of the serving version.
    pub fn get(&self, name: &str, key: &str) -> Result<Read<Option<Item>>> {
        let shared = self.serving(name)?;
        read_key(shared.version, &shared.store.snapshot()?, key)
    }

    /// Keys of the serving version starting with `prefix`, after `after`, up to `limit`.
    pub fn scan(&self, name: &str, prefix: &str, after: Option<&str>, limit: ScanLimit) -> Result<Read<Page>> {
        let shared = self.serving(name)?;
        read_page(shared.version, &shared.store.snapshot()?, prefix, after, limit)
    }

    /// The changelog topic of the serving version (subscriptions follow it).
    pub fn serving_changelog(&self, name: &str) -> Result<(u32, String)> {
        let shared = self.serving(name)?;
        Ok((shared.version, shared.changelog_topic.clone()))
    }

    /// Every view with its versions.
    pub fn list(&self) -> Vec<ViewInfo> {
        self.inner.views.values().map(|entry| self.info(entry)).collect()
    }

    pub fn describe(&self, name: &str) -> Result<ViewInfo> {
        Ok(self.info(self.entry(name)?))
    }

    fn info(&self, entry: &ViewEntry) -> ViewInfo {
        let active = *read_lock(&entry.active);
        let versions = read_lock(&entry.versions)
            .values()
            .map(|shared| VersionInfo {
                version: shared.version,
                serving: active == Some(shared.version),
                running: entry.definitions.contains_key(&shared.version),
                changelog_topic: shared.changelog_topic.clone(),
                status: self.status_now(entry, shared),
                // A mark that cannot be read shows as none: status must not fail.
                auto_switch: !no_auto_switch(&entry.dir, shared.version).unwrap_or(false),
            })
            .collect();
        let inputs = entry.definitions.values().next_back().map(|v| v.inputs.clone()).unwrap_or_default();
        ViewInfo { name: entry.name.clone(), active, inputs, versions }
    }

    /// `shared`'s status, with the inputs' ends looked up now for a version whose runner
    /// does not (failed, or pausing before a restart): its lag then shows how far behind it
    /// falls as the inputs grow, not how far it was when it stopped.
    fn status_now(&self, entry: &ViewEntry, shared: &VersionShared) -> RunnerStatus {
        let mut status = shared.status();
        let stalled = matches!(status.phase, Phase::Failed(_) | Phase::Restarting { .. });
        let Some(view) = entry.definitions.get(&shared.version).filter(|_| stalled) else { return status };
        // It applies nothing meanwhile: no rate, so no time until caught up.
        status.rate_per_second = 0.0;
        for topic in &view.inputs {
            // A topic gone or unreadable keeps its last known ends: status must not fail.
            if let Ok(ends) = self.topic_ends(topic) {
                status.ends.extend(ends);
            }
        }
        status
    }

    /// Makes `version` serve reads (a cutover, or a rollback). Without `force` the version
    /// must have caught up with its inputs and be running. The version switched away from
    /// is marked first (`NO_AUTO_SWITCH_FILE`): it may have switched to itself on catching
    /// up without having recorded that yet (a crash or a full disk in between makes it catch
    /// up and switch again), and the operator's choice must stick.
    pub fn switch(&self, name: &str, version: u32, force: bool) -> Result<()> {
        let entry = self.entry(name)?;
        let _admin = lock(&entry.admin);
        // Looked up under `admin`: a version being retired is no longer listed.
        let shared = self.version(entry, version)?;
        let phase = shared.status().phase;
        if !force && phase != Phase::Live {
            return Err(ViewError::VersionNotCaughtUp {
                view: name.to_owned(),
                version,
                status: phase.name().to_owned(),
            });
        }
        let previous = *read_lock(&entry.active);
        // Before the active file: a crash in between leaves `previous` serving, marked. A
        // version whose directory is gone (deleted to rebuild it) has nothing to keep.
        let previous_kept = previous.filter(|p| *p != version && version_dir(&entry.dir, *p).is_dir());
        if let Some(previous) = previous_kept {
            write_no_auto_switch(&entry.dir, previous)?;
        }
        make_serving(entry, version)?;
        // Switched to: the operator's last word on this version is no longer "away from it".
        clear_no_auto_switch(&entry.dir, version)?;
        tracing::info!(view = name, version, ?previous, "switched the version serving reads");
        Ok(())
    }

    /// Stops a version that does not serve reads and deletes its state and changelog. A
    /// version this build still defines is rebuilt on the next start.
    pub fn retire(&self, name: &str, version: u32) -> Result<()> {
        let entry = self.entry(name)?;
        let shared = {
            let _admin = lock(&entry.admin);
            if *read_lock(&entry.active) == Some(version) {
                return Err(ViewError::RetireActive { view: name.to_owned(), version });
            }
            let shared = self.version(entry, version)?;
            // Unlisted first: neither switch nor auto_switch can pick it from here on.
            write_lock(&entry.versions).remove(&version);
            shared.stop.store(true, Ordering::Release);
            // A read waiting on it (the newest while nothing serves) looks again.
            shared.wake();
            shared
        };
        // Joined without `admin`: the runner may be waiting for it in auto_switch.
        self.join(name, Some(version));
        self.inner.backend.delete_topic(&shared.changelog_topic)?;
        let dir = version_dir(&entry.dir, version);
        std::fs::remove_dir_all(&dir).map_err(|e| ViewError::io(&dir, e))?;
        if entry.definitions.contains_key(&version) {
            tracing::warn!(
                view = name,
                version,
                "retired a version this build still defines; it is rebuilt on the next start"
            );
        }
        tracing::info!(view = name, version, "retired view version");
        Ok(())
    }

    /// The view (or one key of it) as of a past point, by replaying its inputs. Uses the
    /// serving version's code unless `version` is given.
    pub fn as_of(&self, name: &str, version: Option<u32>, at: &AsOf, key: Option<&str>) -> Result<AsOfView> {
        let entry = self.entry(name)?;
        let version = match version {
            Some(v) => v,
            None => (*read_lock(&entry.active))
                .or_else(|| entry.definitions.keys().next_back().copied())
                .ok_or_else(|| ViewError::UnknownView(name.to_owned()))?,
        };
        let view = entry.definitions.get(&version).ok_or_else(|| ViewError::AsOf {
            view: name.to_owned(),
            reason: format!("this build does not have the code of version {version}, so it cannot replay it"),
        })?;
        let mut result = asof::replay(&self.inner.backend, &self.inner.schemas, self.inner.codec.as_ref(), view, at)?;
        if let Some(key) = key {
            result.values.retain(|(k, _)| k == key);
        }
        Ok(result)
    }

    /// Stops every runner (each makes its state durable first) and closes the stores;
    /// reads afterwards fail.
    pub fn shutdown(&self) {
        // First, and waking them: reads waiting for input offsets fail now, not at the end
        // of their wait (or with the versions gone).
        self.inner.shutting_down.store(true, Ordering::Release);
        for entry in self.inner.views.values() {
            for shared in read_lock(&entry.versions).values() {
                shared.stop.store(true, Ordering::Release);
                shared.wake();
            }
        }
        self.join_all();
        for entry in self.inner.views.values() {
            write_lock(&entry.versions).clear();
        }
    }

    fn join(&self, name: &str, version: Option<u32>) {
        let handles: Vec<_> = {
            let mut threads = lock(&self.inner.threads);
            let (matching, rest) = std::mem::take(&mut *threads)
                .into_iter()
                .partition(|(n, v, _)| n == name && version.is_none_or(|version| *v == version));
            *threads = rest;
            matching
        };
        for (name, version, handle) in handles {
            if handle.join().is_err() {
                tracing::error!(view = %name, version, "view thread panicked");
            }
        }
    }

    fn join_all(&self) {
        let handles = std::mem::take(&mut *lock(&self.inner.threads));
        for (name, version, handle) in handles {
            if handle.join().is_err() {
                tracing::error!(view = %name, version, "view thread panicked");
            }
        }
    }

    /// Blocks until `name` has a serving version that has applied its inputs up to their
    /// current ends, or `timeout` passes; returns whether it did. Waits through a version's
    /// pause before it starts again by itself (`Phase::Restarting`, e.g. a full disk); fails
    /// when the serving version failed for good, or when nothing serves and every version
    /// this build runs failed for good.
    pub fn wait_caught_up(&self, name: &str, timeout: std::time::Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        let entry = self.entry(name)?;
        loop {
            match self.serving(name) {
                Ok(shared) => {
                    let status = shared.status();
                    let ends_now = self.current_ends(entry)?;
                    // A store closed for a reopen may come back behind what the status says.
                    let done = !shared.store.needs_reopen()
                        && ends_now.iter().all(|(key, end)| status.positions.get(key).copied().unwrap_or(0) >= *end);
                    if done {
                        return Ok(true);
                    }
                    if let Phase::Failed(reason) = status.phase {
                        return Err(ViewError::VersionFailed {
                            view: name.to_owned(),
                            version: shared.version,
                            reason,
                        });
                    }
                }
                Err(ViewError::NotReady { .. }) => {
                    if let Some(failed) = never_serving(entry) {
                        return Err(failed);
                    }
                }
                Err(_) => {}
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn current_ends(&self, entry: &ViewEntry) -> Result<BTreeMap<String, i64>> {
        let mut ends = BTreeMap::new();
        for topic in entry.definitions.values().next_back().map(|v| v.inputs.as_slice()).unwrap_or_default() {
            ends.extend(self.topic_ends(topic)?);
        }
        Ok(ends)
    }

    /// Each partition of `topic` (by its position key) with its end offset now.
    fn topic_ends(&self, topic: &str) -> Result<Vec<(String, i64)>> {
        (0..self.inner.backend.partition_count(topic)?)
            .map(|partition| {
                Ok((crate::runner::position_key(topic, partition), self.inner.backend.end_offset(topic, partition)?))
            })
            .collect()
    }

    /// Whether `version` of `name` takes over reads by itself when it (again) first catches
    /// up and is the newest version this build defines. False once an operator switched
    /// reads away from it (the file `v<N>/no-auto-switch`), so a rollback is not undone;
    /// cleared by switching to it, by deleting that file (read at each catch-up, no restart
    /// needed) or by retiring or rebuilding the version. When nothing serves the view a
    /// caught-up version may take over anyway (`serve_caught_up_when_unserved`). Also
    /// `VersionInfo::auto_switch`.
    pub fn auto_switch_enabled(&self, name: &str, version: u32) -> Result<bool> {
        let entry = self.entry(name)?;
        self.version(entry, version)?;
        Ok(!no_auto_switch(&entry.dir, version)?)
    }

    pub fn backend(&self) -> &Arc<dyn LogBackend> {
        &self.inner.backend
    }
}

/// Why a view with no serving version will not get one without a restart: every version
/// this build runs failed for good (the newest's failure). None while one may still catch up.
fn never_serving(entry: &ViewEntry) -> Option<ViewError> {
    let versions = read_lock(&entry.versions);
    let mut failed = None;
    for (version, shared) in versions.iter().filter(|(version, _)| entry.definitions.contains_key(version)) {
        match shared.phase() {
            Phase::Failed(reason) => {
                failed = Some(ViewError::VersionFailed { view: entry.name.clone(), version: *version, reason })
            }
            _ => return None,
        }
    }
    failed
}

/// Makes `version` serve `entry`'s reads: recorded on disk first (the `active` file), then
/// in memory, then the reads waiting on the view woken.
fn make_serving(entry: &ViewEntry, version: u32) -> Result<()> {
    write_active(&entry.dir, version)?;
    *write_lock(&entry.active) = Some(version);
    wake_waiters(entry);
    Ok(())
}

/// Wakes every read waiting on a version of `entry` ([`ViewEngine::get_after`]): which
/// version serves changed, so what it waits for may have too.
fn wake_waiters(entry: &ViewEntry) {
    for shared in read_lock(&entry.versions).values() {
        shared.wake();
    }
}

/// One key of `shared`'s store, with the changelog position the read reflects.
fn read_key(version: u32, snapshot: &Snapshot<'_>, key: &str) -> Result<Read<Option<Item>>> {
    let value = snapshot.get(Scope::View, key)?.map(|v| item(key.to_owned(), v));
    Ok(Read { version, position: snapshot.changelog_next(), value })
}

/// A page of `shared`'s keys starting with `prefix`, after `after`, up to `limit`.
fn read_page(
    version: u32,
    snapshot: &Snapshot<'_>,
    prefix: &str,
    after: Option<&str>,
    limit: ScanLimit,
) -> Result<Read<Page>> {
    let (items, more) = snapshot.scan(prefix, after, limit)?;
    let items = items.into_iter().map(|(k, v)| item(k, v)).collect();
    Ok(Read { version, position: snapshot.changelog_next(), value: Page { items, more } })
}

fn item(key: String, value: StoredValue) -> Item {
    Item { key, json: value.json, changelog_offset: value.changelog_offset }
}

fn version_dir(view_dir: &Path, version: u32) -> PathBuf {
    view_dir.join(format!("v{version}"))
}

fn read_active(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(ACTIVE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            ViewError::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not a version number; fix or delete the file"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ViewError::io(&path, e)),
    }
}

/// Deletes the active file naming `version` whose state directory is gone (an operator
/// deleted it to rebuild the version): rebuilt from an empty store, it must not serve reads
/// before it has caught up, so the view has no serving version until one catches up and is
/// switched to. Deleted rather than ignored: once the directory is created again, a restart
/// mid-rebuild would find the file valid.
fn forget_active(name: &str, dir: &Path, version: u32) -> Result<Option<u32>> {
    tracing::warn!(
        view = name,
        version,
        "the serving version's state directory is gone; it is rebuilt and serves reads once caught up"
    );
    let path = dir.join(ACTIVE_FILE);
    std::fs::remove_file(&path).map_err(|e| ViewError::io(&path, e))?;
    RealFs.sync_dir(dir).map_err(|e| ViewError::io(dir, e))?;
    Ok(None)
}

/// When nothing serves `entry` (its serving version's directory was deleted), the newest
/// version this build runs that has caught up before takes over reads: it starts live and
/// never catches up "for the first time" again, so without this the view would serve nothing
/// until an operator switched. A version an operator switched away from
/// (`NO_AUTO_SWITCH_FILE`) takes over only when no unmarked version this build runs is
/// left to do it — one still building takes over once caught up, as nothing serves.
/// Under `admin`: a runner already running may auto-switch meanwhile.
fn serve_caught_up_when_unserved(entry: &ViewEntry) -> Result<()> {
    let _admin = lock(&entry.admin);
    if read_lock(&entry.active).is_some() {
        return Ok(());
    }
    let versions = read_lock(&entry.versions);
    let mut caught_up_marked = None;
    let mut unmarked_left = false;
    for (version, shared) in versions.iter().rev().filter(|(v, _)| entry.definitions.contains_key(v)) {
        let marked = no_auto_switch(&entry.dir, *version)?;
        unmarked_left |= !marked;
        if !shared.store.progress()?.caught_up {
            continue;
        }
        if !marked {
            return take_over_unserved(entry, *version);
        }
        caught_up_marked = caught_up_marked.or(Some(*version));
    }
    match caught_up_marked {
        Some(version) if !unmarked_left => take_over_unserved(entry, version),
        _ => Ok(()),
    }
}

fn take_over_unserved(entry: &ViewEntry, version: u32) -> Result<()> {
    make_serving(entry, version)?;
    tracing::info!(view = %entry.name, version, "nothing served reads; this caught-up version now does");
    Ok(())
}

/// Whether an operator switched reads away from `version` (see `NO_AUTO_SWITCH_FILE`).
fn no_auto_switch(view_dir: &Path, version: u32) -> Result<bool> {
    let path = version_dir(view_dir, version).join(NO_AUTO_SWITCH_FILE);
    match std::fs::metadata(&path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ViewError::io(&path, e)),
    }
}

fn clear_no_auto_switch(view_dir: &Path, version: u32) -> Result<()> {
    let path = version_dir(view_dir, version).join(NO_AUTO_SWITCH_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ViewError::io(&path, e)),
    }
}

fn write_no_auto_switch(view_dir: &Path, version: u32) -> Result<()> {
    let path = version_dir(view_dir, version).join(NO_AUTO_SWITCH_FILE);
    let text =
        "An operator switched reads away from this version: it does not take them over by itself when it catches up.\n";
    write_file_atomic(&RealFs, &path, text.as_bytes()).map_err(|e| ViewError::io(&path, e))
}

fn write_active(dir: &Path, version: u32) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ViewError::io(dir, e))?;
    let path = dir.join(ACTIVE_FILE);
    write_file_atomic(&RealFs, &path, format!("{version}\n").as_bytes()).map_err(|e| ViewError::io(&path, e))
}

fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(ViewError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ViewError::io(dir, e))?;
        if entry.file_type().map_err(|e| ViewError::io(dir, e))?.is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The serving version's state rebuilt from its changelog alone, with checks that the
/// changelog is well formed: every batch ends with a step marker and steps never go back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogFold {
    pub version: u32,
    /// View key → JSON value (latest change per key; deletions applied).
    pub values: BTreeMap<String, Vec<u8>>,
    pub steps: u64,
    pub changes: u64,
}

impl ViewEngine {
    /// Folds the serving version's changelog from its start (see [`ChangelogFold`]).
    pub fn fold_changelog(&self, name: &str) -> Result<ChangelogFold> {
        let shared = self.serving(name)?;
        let backend = &self.inner.backend;
        let topic = &shared.changelog_topic;
        let fail = |reason: String| ViewError::Changelog { view: name.to_owned(), version: shared.version, reason };
        let mut fold = ChangelogFold { version: shared.version, values: BTreeMap::new(), steps: 0, changes: 0 };
        let mut last_marker: Option<crate::changelog::StepMarker> = None;
        let mut pending_changes = 0u64;
        let mut offset = backend.start_offset(topic, 0)?;
        let end = backend.durable_end_offset(topic, 0)?;
        while offset < end {
            let chunk = backend.read_committed(topic, 0, offset, crate::runner::STEP_READ_BYTES)?;
            if chunk.next_offset <= offset {
                break;
            }
            for record in &chunk.records {
                match crate::changelog::decode(record).map_err(|e| fail(format!("offset {}: {e}", record.offset)))? {
                    crate::changelog::Entry::Change { change, .. } => {
                        pending_changes += 1;
                        if change.scope == Scope::View {
                            match change.value {
                                Some(json) => fold.values.insert(change.key, json),
                                None => fold.values.remove(&change.key),
                            };
                        }
                    }
                    crate::changelog::Entry::Step { offset, marker } => {
                        if let Some(previous) = &last_marker {
                            let went_back =
                                previous.positions.iter().any(|(k, p)| marker.positions.get(k).is_none_or(|m| m < p));
                            if went_back || marker.events_applied <= previous.events_applied {
                                return Err(fail(format!(
                                    "the step marker at offset {offset} does not move forward from the previous one ({:?} → {:?}): a step was applied twice",
                                    previous, marker
                                )));
                            }
                        }
                        fold.changes += pending_changes;
                        pending_changes = 0;
                        fold.steps += 1;
                        last_marker = Some(marker);
                    }
                }
            }
            offset = chunk.next_offset;
        }
        if pending_changes > 0 {
            return Err(fail(format!("{pending_changes} changes after the last step marker: a torn step")));
        }
        Ok(fold)
    }
}

/// The longest a read waits for input offsets to be applied ([`ViewEngine::get_after`]): a
/// reader's wait holds its request open, and a view further behind than this is better
/// reported than waited for.
pub const READ_WAIT_MS_MAX: u64 = 30_000;

/// How often a waiting read looks again at a state store a full disk failed, until it is
/// reopened (rare: no wake-up is wired for it).
const STORE_REOPEN_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Read-your-writes: reads that first wait until the serving version has applied given input
/// offsets (those a produce answered), so a client sees its own writes.
impl ViewEngine {
    /// [`Self::get`] once the serving version has applied every offset of `after` (see
    /// [`Self::wait_applied`]).
    pub async fn get_after(
        &self,
        name: &str,
        key: &str,
        after: &[InputPosition],
        timeout: std::time::Duration,
    ) -> Result<Read<Option<Item>>> {
        self.read_applied(name, after, timeout, |version, snapshot| read_key(version, snapshot, key)).await
    }

    /// [`Self::scan`] once the serving version has applied every offset of `after`.
    pub async fn scan_after(
        &self,
        name: &str,
        page: (&str, Option<&str>, ScanLimit),
        after: &[InputPosition],
        timeout: std::time::Duration,
    ) -> Result<Read<Page>> {
        let (prefix, cursor, limit) = page;
        self.read_applied(name, after, timeout, |version, snapshot| read_page(version, snapshot, prefix, cursor, limit))
            .await
    }

    /// `read` of the serving version's state once it has applied `after` ([`Self::wait_applied`]).
    async fn read_applied<T>(
        &self,
        name: &str,
        after: &[InputPosition],
        timeout: std::time::Duration,
        read: impl Fn(u32, &Snapshot<'_>) -> Result<T>,
    ) -> Result<T> {
        let timeout = timeout.min(std::time::Duration::from_millis(READ_WAIT_MS_MAX));
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (shared, epoch) = self.wait_applied(name, after, deadline, timeout).await?;
            let answer = shared.store.snapshot().and_then(|snapshot| {
                // Reopened since the positions were judged: the state may be rolled back
                // behind them, and they were published again — look again (None).
                (snapshot.epoch() == epoch).then(|| read(shared.version, &snapshot)).transpose()
            });
            match answer {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => {}
                // A failed write closed the store: it is reopened once a full disk has room.
                Err(e) if e.is_store_unavailable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(STORE_REOPEN_POLL.min(deadline - tokio::time::Instant::now())).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout` (at most [`READ_WAIT_MS_MAX`]) until the serving version's
    /// committed positions are past every offset of `after`; returns that version, whose
    /// store then holds them (positions are published after the store commit). Woken by each
    /// published step or phase change, not by polling. Fails at once for a partition the
    /// view does not read (`NotAnInput`), for an offset its partition has not written
    /// (`OffsetNotWritten`: no produce answered it) and for a version that will not move without a
    /// restart (failed, or not run by this build); at the timeout with `ReadBehind` (or
    /// `NotReady` while nothing serves).
    async fn wait_applied(
        &self,
        name: &str,
        after: &[InputPosition],
        deadline: tokio::time::Instant,
        timeout: std::time::Duration,
    ) -> Result<(Arc<VersionShared>, u64)> {
        let entry = self.entry(name)?;
        loop {
            // Checked before looking at the versions: a shutdown clears them.
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return Err(ViewError::ShuttingDown);
            }
            let shared = match self.serving(name) {
                Ok(shared) => shared,
                Err(not_ready @ ViewError::NotReady { .. }) => {
                    if let Some(failed) = never_serving(entry) {
                        return Err(failed);
                    }
                    // Nothing serves yet: the steps of the newest version this build runs say
                    // when that changes (a newer one on disk without code here never moves).
                    let versions = read_lock(&entry.versions);
                    let mut running = versions.iter().rev().filter(|(v, _)| entry.definitions.contains_key(v));
                    match running.next() {
                        Some((_, newest)) => newest.clone(),
                        None => return Err(not_ready),
                    }
                }
                Err(e) => return Err(e),
            };
            // Subscribed before looking, so a step published in between still wakes us.
            let mut published = shared.subscribe();
            // Before the positions: a reopen publishes its own before it bumps the epoch.
            let epoch = shared.store.epoch();
            self.check_inputs(entry, &shared, after)?;
            // Only the phase and the positions asked for, read under the runner's lock.
            let (phase, applied) =
                shared.with_status(|status| (status.phase.clone(), behind(status, after).is_empty()));
            let serving = *read_lock(&entry.active) == Some(shared.version);
            if serving && applied {
                return Ok((shared, epoch));
            }
            match phase {
                Phase::Failed(reason) => {
                    return Err(ViewError::VersionFailed { view: name.to_owned(), version: shared.version, reason });
                }
                Phase::Stopped => {
                    let reason = "this build does not have its code, so it does not follow its inputs".to_owned();
                    return Err(ViewError::VersionFailed { view: name.to_owned(), version: shared.version, reason });
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, published.changed()).await.is_err() {
                if self.inner.shutting_down.load(Ordering::Acquire) {
                    return Err(ViewError::ShuttingDown);
                }
                // One last look: the serving version may have changed without a step.
                let serving = self.serving(name)?;
                let epoch = serving.store.epoch();
                let lagging = serving.with_status(|status| behind(status, after));
                if lagging.is_empty() {
                    return Ok((serving, epoch));
                }
                let waited_ms = timeout.as_millis() as u64;
                let version = serving.version;
                return Err(ViewError::ReadBehind { view: name.to_owned(), version, waited_ms, behind: lagging });
            }
        }
    }

    /// A receiver of what wakes the readers waiting on `version` of `name`.
    #[cfg(test)]
    pub(crate) fn subscribe_version(&self, name: &str, version: u32) -> Result<tokio::sync::watch::Receiver<()>> {
        Ok(self.version(self.entry(name)?, version)?.subscribe())
    }

    /// Fails when `after` names a partition `shared` does not read: one of its definition's
    /// input topics (or, without code, the topics it has positions for), below the topic's
    /// partition count — or an offset at or past its partition's high watermark.
    fn check_inputs(&self, entry: &ViewEntry, shared: &VersionShared, after: &[InputPosition]) -> Result<()> {
        let inputs: Vec<String> = match entry.definitions.get(&shared.version) {
            Some(view) => view.inputs.clone(),
            None => {
                let mut topics: Vec<String> = shared.with_status(|status| {
                    status
                        .positions
                        .keys()
                        .filter_map(|key| key.rsplit_once('/').map(|(topic, _)| topic.to_owned()))
                        .collect()
                });
                topics.sort();
                topics.dedup();
                topics
            }
        };
        for asked in after {
            let partitions =
                if inputs.contains(&asked.topic) { self.inner.backend.partition_count(&asked.topic)? } else { 0 };
            if !(0..partitions).contains(&asked.partition) {
                let mut described = Vec::new();
                for topic in &inputs {
                    described.push(match self.inner.backend.partition_count(topic) {
                        Ok(1) => format!("{topic} (partition 0)"),
                        Ok(count) if count > 1 => format!("{topic} (partitions 0 to {})", count - 1),
                        _ => format!("{topic} (which does not exist now)"),
                    });
                }
                let inputs =
                    if described.is_empty() { "unknown to this build".to_owned() } else { described.join(", ") };
                return Err(ViewError::NotAnInput {
                    view: entry.name.clone(),
                    topic: asked.topic.clone(),
                    partition: asked.partition,
                    inputs,
                });
            }
            // The high watermark, not the last stable offset: an open transaction's records
            // are below the one and above the other, and a produce's answer is below both
            // once it is acknowledged — at or past the high watermark nothing was answered.
            let end = self.inner.backend.durable_end_offset(&asked.topic, asked.partition)?;
            if asked.offset >= end {
                return Err(ViewError::OffsetNotWritten {
                    view: entry.name.clone(),
                    topic: asked.topic.clone(),
                    partition: asked.partition,
                    offset: asked.offset,
                    end,
                });
            }
        }
        Ok(())
    }
}

/// The offsets of `after` that `status` has not applied yet (its position is the next
/// offset to apply, so an offset is applied once the position is past it).
fn behind(status: &crate::runner::RunnerStatus, after: &[InputPosition]) -> Vec<crate::error::Behind> {
    after
        .iter()
        .filter_map(|asked| {
            let position =
                status.positions.get(&crate::runner::position_key(&asked.topic, asked.partition)).copied().unwrap_or(0);
            (position <= asked.offset).then(|| crate::error::Behind {
                topic: asked.topic.clone(),
                partition: asked.partition,
                offset: asked.offset,
                position,
            })
        })
        .collect()
}
