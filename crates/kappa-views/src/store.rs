//! A view version's state: one redb database holding the view's keys, the processor's
//! internal keys, the input positions and how far the changelog is applied — all changed in
//! one atomic commit per processing step.
//!
//! Stored value layout: 8 bytes big-endian changelog offset of the change that wrote it,
//! then the JSON value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{Result, ViewError};

const VIEW_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("view_state");
const INTERNAL_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("internal_state");
/// "topic/partition" → the next input offset to apply.
const POSITIONS: TableDefinition<&str, i64> = TableDefinition::new("input_positions");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Input topic name → its topic id when the version first read it (absent in stores from
/// before topic ids, until their next start).
const INPUT_TOPIC_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("input_topic_ids");

/// The changelog offset up to which (exclusive) the state reflects the changelog.
const META_CHANGELOG_NEXT: &str = "changelog_next";
const META_EVENTS_APPLIED: &str = "events_applied";
/// Set once the version first caught up with its inputs.
const META_CAUGHT_UP: &str = "caught_up";

pub const STATE_FILE: &str = "state.redb";

/// How much one scan holds: at most `items` keys, and it stops after the key that brings
/// the keys' and values' bytes past `bytes` (so it returns at least one key, however
/// large): a page of large values is bounded by bytes, not by its count of keys alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimit {
    pub items: usize,
    pub bytes: usize,
}

impl ScanLimit {
    /// Whether a scan holding `items` keys of `bytes` (keys and values) stops here.
    pub fn reached(&self, items: usize, bytes: usize) -> bool {
        items >= self.items || bytes > self.bytes
    }
}

/// Which keyspace a key lives in: the view's (read by clients) or the processor's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    View,
    Internal,
}

/// One stored value with the changelog offset that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    pub changelog_offset: i64,
    pub json: Vec<u8>,
}

impl StoredValue {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.json.len());
        out.extend_from_slice(&self.changelog_offset.to_be_bytes());
        out.extend_from_slice(&self.json);
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        // Invariant: every value this module writes starts with the 8-byte offset.
        assert!(bytes.len() >= 8, "stored view value shorter than its 8-byte header");
        let (offset, json) = bytes.split_at(8);
        Self { changelog_offset: i64::from_be_bytes(offset.try_into().expect("8 bytes")), json: json.to_vec() }
    }
}

/// One write of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreWrite {
    pub scope: Scope,
    pub key: String,
    /// None deletes the key.
    pub value: Option<StoredValue>,
}

/// Where a view version's processing stands, as last committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub positions: BTreeMap<String, i64>,
    pub changelog_next: i64,
    pub events_applied: i64,
    pub caught_up: bool,
}

/// Opens (or creates) a version's redb database at a path: `Database::create` (see
/// [`file_store_opener`]) unless a test runs real redb over a storage backend of its own,
/// one that fails reads or writes as a failing disk would (`EngineConfig::store_opener`).
pub type StoreOpener = Arc<dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The default [`StoreOpener`]: a file on disk (as `Database::create`), whose failed fsyncs
/// are never taken for a full disk ([`FsyncFailuresAreNotFull`]).
pub fn file_store_opener() -> StoreOpener {
    Arc::new(|path: &Path| {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        redb::Builder::new().create_with_backend(FsyncFailuresAreNotFull(redb::backends::FileBackend::new(file)?))
    })
}

/// A file backend whose failed fsync never reports ENOSPC or EDQUOT: after a failed fsync
/// the kernel may have dropped the dirty pages, so reopening and going on could take lost
/// writes for durable ones (the log poisons its directory for the same error). Reported as
/// another error, it fails the version until a restart instead of restarting it.
#[derive(Debug)]
struct FsyncFailuresAreNotFull(redb::backends::FileBackend);

type LockBound = std::ops::Bound<u64>;

impl redb::StorageBackend for FsyncFailuresAreNotFull {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data().map_err(|e| std::io::Error::other(format!("fsync failed: {e}")))
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
    fn try_lock_range(&self, start: LockBound, end: LockBound) -> std::result::Result<bool, redb::BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(&self, start: LockBound, end: LockBound) -> std::result::Result<bool, redb::BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: LockBound, end: LockBound) -> std::result::Result<(), redb::BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: LockBound, end: LockBound) -> std::result::Result<(), redb::BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: LockBound, end: LockBound) -> std::result::Result<(), redb::BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: LockBound, end: LockBound) -> std::result::Result<bool, redb::BackendError> {
        self.0.query_lock_range(start, end)
    }
}

pub struct Store {
    /// The open database; `None` while [`Store::reopen`] replaces it.
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    opener: StoreOpener,
    /// Set once a call failed on a full disk (ENOSPC, EDQUOT): redb then refuses every later
    /// call on the handle ("previous I/O error") until it is reopened. Cleared by a reopen.
    out_of_space: AtomicBool,
    /// Bumped by every reopen, which may roll the state back (to the last durable commit):
    /// a reader that judged the state by positions published before it must look again.
    epoch: AtomicU64,
}

/// How long a reopen retries while the file is still locked by the handle it closed (redb
/// closes a dropped database at once — reads still running on it fail with `DatabaseClosed`
/// — so this is a bound, not an expected wait).
const REOPEN_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &file_store_opener())
    }

    /// Opens (or creates) the store in `dir` with `opener`.
    pub fn open_with(dir: &Path, opener: &StoreOpener) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| ViewError::io(dir, e))?;
        let path = dir.join(STATE_FILE);
        let store = Self {
            db: RwLock::new(None),
            path,
            opener: opener.clone(),
            out_of_space: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        };
        let db = store.open_database()?;
        *store.db.write().unwrap_or_else(PoisonError::into_inner) = Some(db);
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when a call failed on a full disk (ENOSPC, EDQUOT) since the handle was opened.
    pub fn marked_full(&self) -> bool {
        self.out_of_space.load(Ordering::Acquire)
    }

    /// True when the handle failed on a full disk (or is closed by a reopen that failed):
    /// [`Store::reopen`] is what recovers it.
    pub fn needs_reopen(&self) -> bool {
        self.out_of_space.load(Ordering::Acquire) || self.db.read().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// Closes the database and opens it again — back at its last durable commit, where
    /// redb's repair leaves it — after a full disk made redb refuse every call on the
    /// handle. `before_visible` gets the reopened progress before any reader can see the
    /// reopened state (the version's published positions must not claim what it lost).
    /// Meanwhile reads fail with [`ViewError::StoreReopening`]; after a failure too, until
    /// a later reopen succeeds.
    pub fn reopen(&self, before_visible: impl FnOnce(&Progress)) -> Result<()> {
        let old = self.db.write().unwrap_or_else(PoisonError::into_inner).take();
        // The full disk was the old handle's: the new one's errors are judged on their own
        // (a failing repair is no reason to keep trying). Still closed: `needs_reopen` holds.
        self.out_of_space.store(false, Ordering::Release);
        drop(old);
        let db = self.open_database().map_err(|e| match e {
            // Still locked by the handle it closed: tried again at the next restart.
            ViewError::Store { source, .. } if matches!(*source, redb::Error::DatabaseAlreadyOpen) => {
                ViewError::StoreReopening { path: self.path.clone() }
            }
            e => e,
        })?;
        before_visible(&read_progress(&db, &|e| self.err(e))?);
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        *slot = Some(db);
        Ok(())
    }

    /// Opens the database file, retrying up to [`REOPEN_WAIT_MAX`] while the handle it
    /// closed still locks it, and creates the tables a new one lacks.
    fn open_database(&self) -> Result<Arc<Database>> {
        let deadline = std::time::Instant::now() + REOPEN_WAIT_MAX;
        let db = loop {
            match (self.opener)(&self.path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other.map_err(|e| self.err(e))?,
            }
        };
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        for table in [VIEW_STATE, INTERNAL_STATE, INPUT_TOPIC_IDS] {
            txn.open_table(table).map_err(|e| self.err(e))?;
        }
        txn.open_table(META).map_err(|e| self.err(e))?;
        txn.open_table(POSITIONS).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(Arc::new(db))
    }

    /// The open database and its epoch, or `StoreReopening` while a reopen replaces it.
    fn database(&self) -> Result<(Arc<Database>, u64)> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let epoch = self.epoch.load(Ordering::Acquire);
        match &*db {
            Some(db) => Ok((db.clone(), epoch)),
            None => Err(ViewError::StoreReopening { path: self.path.clone() }),
        }
    }

    fn begin_read(&self) -> Result<(redb::ReadTransaction, u64)> {
        let (db, epoch) = self.database()?;
        Ok((db.begin_read().map_err(|e| self.err(e))?, epoch))
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction> {
        self.database()?.0.begin_write().map_err(|e| self.err(e))
    }

    /// The epoch: bumped by every reopen (see [`Snapshot::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn err(&self, e: impl Into<redb::Error>) -> ViewError {
        let source = e.into();
        if matches!(&source, redb::Error::Io(io) if crate::error::is_out_of_space(io)) {
            self.out_of_space.store(true, Ordering::Release);
        }
        ViewError::store(&self.path, source, self.out_of_space.load(Ordering::Acquire))
    }

    /// The committed progress.
    pub fn progress(&self) -> Result<Progress> {
        let (db, _) = self.database()?;
        read_progress(&db, &|e| self.err(e))
    }

    /// Applies `writes` and records `progress`, atomically. `Durability::None` commits
    /// survive a process crash only until the next durable one; see the module docs of
    /// `runner.rs` for why that is enough.
    pub fn commit(&self, writes: &[StoreWrite], progress: &Progress, durability: Durability) -> Result<()> {
        let mut txn = self.begin_write()?;
        txn.set_durability(durability).map_err(|e| self.err(e))?;
        // Saving the allocator state costs time proportional to the database's size; only
        // durable commits need it (a crash falls back to the last durable commit).
        txn.set_quick_repair(matches!(durability, Durability::Immediate));
        {
            let mut view = txn.open_table(VIEW_STATE).map_err(|e| self.err(e))?;
            let mut internal = txn.open_table(INTERNAL_STATE).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let mut positions = txn.open_table(POSITIONS).map_err(|e| self.err(e))?;
            {
                for write in writes {
                    let table = match write.scope {
                        Scope::View => &mut view,
                        Scope::Internal => &mut internal,
                    };
                    match &write.value {
                        Some(value) => {
                            table.insert(write.key.as_str(), value.encode().as_slice()).map_err(|e| self.err(e))?;
                        }
                        None => {
                            table.remove(write.key.as_str()).map_err(|e| self.err(e))?;
                        }
                    }
                }
                for (key, offset) in &progress.positions {
                    positions.insert(key.as_str(), *offset).map_err(|e| self.err(e))?;
                }
                meta.insert(META_CHANGELOG_NEXT, progress.changelog_next).map_err(|e| self.err(e))?;
                meta.insert(META_EVENTS_APPLIED, progress.events_applied).map_err(|e| self.err(e))?;
                meta.insert(META_CAUGHT_UP, i64::from(progress.caught_up)).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The recorded id of input topic `topic`, if any.
    pub fn input_topic_id(&self, topic: &str) -> Result<Option<Vec<u8>>> {
        let (txn, _) = self.begin_read()?;
        let ids = txn.open_table(INPUT_TOPIC_IDS).map_err(|e| self.err(e))?;
        Ok(ids.get(topic).map_err(|e| self.err(e))?.map(|id| id.value().to_vec()))
    }

    /// Records the id of input topic `topic`, not durably (as a step's commit: a durable
    /// one would also make earlier steps durable, maybe ahead of the changelog). It is
    /// durable by the time any position stored after it is.
    pub fn record_input_topic_id(&self, topic: &str, id: &[u8]) -> Result<()> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::None).map_err(|e| self.err(e))?;
        txn.open_table(INPUT_TOPIC_IDS).map_err(|e| self.err(e))?.insert(topic, id).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Makes every earlier commit durable.
    pub fn checkpoint(&self) -> Result<()> {
        let mut txn = self.begin_write()?;
        txn.set_quick_repair(true);
        txn.commit().map_err(|e| self.err(e))
    }

    /// A consistent snapshot for reads.
    pub fn snapshot(&self) -> Result<Snapshot<'_>> {
        let (txn, epoch) = self.begin_read()?;
        let view = txn.open_table(VIEW_STATE).map_err(|e| self.err(e))?;
        let internal = txn.open_table(INTERNAL_STATE).map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let changelog_next = meta.get(META_CHANGELOG_NEXT).map_err(|e| self.err(e))?.map_or(0, |v| v.value());
        Ok(Snapshot { store: self, view, internal, changelog_next, epoch })
    }
}

/// The progress committed in `db`; `err` names the store in errors.
fn read_progress(db: &Database, err: &dyn Fn(redb::Error) -> ViewError) -> Result<Progress> {
    let txn = db.begin_read().map_err(|e| err(e.into()))?;
    let meta = txn.open_table(META).map_err(|e| err(e.into()))?;
    let positions = txn.open_table(POSITIONS).map_err(|e| err(e.into()))?;
    let meta_get =
        |key: &str| -> Result<i64> { Ok(meta.get(key).map_err(|e| err(e.into()))?.map(|v| v.value()).unwrap_or(0)) };
    let mut progress = Progress {
        positions: BTreeMap::new(),
        changelog_next: meta_get(META_CHANGELOG_NEXT)?,
        events_applied: meta_get(META_EVENTS_APPLIED)?,
        caught_up: meta_get(META_CAUGHT_UP)? != 0,
    };
    for entry in positions.iter().map_err(|e| err(e.into()))? {
        let (key, value) = entry.map_err(|e| err(e.into()))?;
        progress.positions.insert(key.value().to_owned(), value.value());
    }
    Ok(progress)
}

/// A read-only view of one committed state.
pub struct Snapshot<'s> {
    store: &'s Store,
    view: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    internal: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    changelog_next: i64,
    epoch: u64,
}

impl Snapshot<'_> {
    /// The changelog position this snapshot is consistent with: every change below it is
    /// in the snapshot, none at or after it.
    pub fn changelog_next(&self) -> i64 {
        self.changelog_next
    }

    /// The store's epoch when this snapshot was taken ([`Store::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn get(&self, scope: Scope, key: &str) -> Result<Option<StoredValue>> {
        let table = match scope {
            Scope::View => &self.view,
            Scope::Internal => &self.internal,
        };
        Ok(table.get(key).map_err(|e| self.store.err(e))?.map(|v| StoredValue::decode(v.value())))
    }

    /// View keys starting with `prefix`, after `after` (exclusive), in key order, up to
    /// `limit`; the bool says the scan stopped at the limit (more keys may follow).
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: ScanLimit,
    ) -> Result<(Vec<(String, StoredValue)>, bool)> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = match after {
            Some(after) if after >= prefix => after,
            _ => prefix,
        };
        let range = self.view.range(start..).map_err(|e| self.store.err(e))?;
        for entry in range {
            let (key, value) = entry.map_err(|e| self.store.err(e))?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|after| key <= after) {
                continue;
            }
            let value = StoredValue::decode(value.value());
            bytes += key.len() + value.json.len();
            out.push((key.to_owned(), value));
            if limit.reached(out.len(), bytes) {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    pub fn len(&self) -> Result<u64> {
        self.view.len().map_err(|e| self.store.err(e))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before input topic ids (without their table) opens with its progress,
    /// records no id until one is recorded, and then keeps it.
    #[test]
    fn a_store_from_before_input_topic_ids_opens_and_records_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(STATE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(VIEW_STATE).unwrap();
            txn.open_table(INTERNAL_STATE).unwrap();
            txn.open_table(META).unwrap().insert(META_CHANGELOG_NEXT, 7).unwrap();
            txn.open_table(POSITIONS).unwrap().insert("events/0", 5).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let progress = store.progress().unwrap();
        assert_eq!((progress.changelog_next, progress.positions["events/0"]), (7, 5));
        assert_eq!(store.input_topic_id("events").unwrap(), None);
        store.record_input_topic_id("events", &[1; 16]).unwrap();
        store.checkpoint().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.input_topic_id("events").unwrap(), Some(vec![1; 16]));
    }

    /// What read-your-writes relies on: a reopen hands over the reopened progress while no
    /// reader can read the reopened state yet, and only then makes it readable, with a new
    /// epoch; a snapshot carries the epoch it was taken at.
    #[test]
    fn a_reopen_publishes_its_progress_before_its_state_is_readable_and_bumps_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let progress = Progress { changelog_next: 9, events_applied: 4, ..Progress::default() };
        store.commit(&[], &progress, Durability::Immediate).unwrap();
        let before = store.snapshot().unwrap().epoch();
        assert!(!store.needs_reopen());

        let mut seen = None;
        store
            .reopen(|reopened| {
                let read = store.snapshot().map(|_| ()).unwrap_err();
                assert!(
                    matches!(read, ViewError::StoreReopening { .. }),
                    "readable before its progress was handed over"
                );
                assert!(read.is_store_unavailable() && read.is_transient(), "{read}");
                seen = Some(reopened.changelog_next);
            })
            .unwrap();
        assert_eq!(seen, Some(9));
        let snapshot = store.snapshot().unwrap();
        assert_eq!((snapshot.epoch(), store.epoch(), snapshot.changelog_next()), (before + 1, before + 1, 9));
        assert!(!store.needs_reopen());
    }
}
