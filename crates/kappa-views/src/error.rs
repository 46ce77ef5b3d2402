//! The view engine's errors. Every message names the view, version or input position it is
//! about and says what to do.

use std::path::PathBuf;

/// Where in the inputs something happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for InputPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} offset {}", self.topic, self.partition, self.offset)
    }
}

/// An input partition a read waited for, and how far the view had applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    pub topic: String,
    pub partition: i32,
    /// The offset asked for (a produce's answer): the read waits until it is applied.
    pub offset: i64,
    /// The view's position there: the next offset it applies.
    pub position: i64,
}

impl std::fmt::Display for Behind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} at offset {} (asked to apply offset {})",
            self.topic, self.partition, self.position, self.offset
        )
    }
}

fn behind_list(behind: &[Behind]) -> String {
    behind.iter().map(Behind::to_string).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("log: {0}")]
    Log(#[from] kappa_log::LogError),
    /// `out_of_space`: the store's handle failed on a full disk (this error, or one before
    /// it that left redb refusing calls): a reopen, once there is room, recovers it.
    #[error("view state store {path}: {source}")]
    Store { path: PathBuf, source: Box<redb::Error>, out_of_space: bool },
    #[error(
        "view state store {path} is closed until it is reopened after a failed write; retry in a moment (after a full disk its view version restarts by itself once there is room; its status says why it stopped)"
    )]
    StoreReopening { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no view named '{0}'; list the views with `GET /v1/views` or `kappa view list`")]
    UnknownView(String),
    #[error("view '{view}' has no version {version}; its versions are {known:?}")]
    UnknownVersion { view: String, version: u32, known: Vec<u32> },
    #[error("view '{view}' has no serving version yet: version {version} is still building ({progress})")]
    NotReady { view: String, version: u32, progress: String },
    #[error(
        "view '{view}' v{version} is {status}: only a version that has caught up with its inputs can serve reads; wait, or pass force"
    )]
    VersionNotCaughtUp { view: String, version: u32, status: String },
    #[error("view '{view}' v{version} failed and stays stopped until kappa restarts (fix the cause first): {reason}")]
    VersionFailed { view: String, version: u32, reason: String },
    #[error("view '{view}' v{version} serves reads: switch to another version before retiring it")]
    RetireActive { view: String, version: u32 },
    #[error("invalid view definition '{view}': {reason}")]
    Definition { view: String, reason: String },
    #[error(
        "view '{view}' v{version} stopped at {position}: {reason}. It stays stopped (a restart stops at the same event) until the view's code or upcasters accept the event, the view skips such events into a dead-letter topic (`View::dead_letter`), or the record is deleted (`kappa topic delete-records`, on a topic whose cleanup.policy includes delete); then restart"
    )]
    EventFailed { view: String, version: u32, position: InputPosition, reason: String },
    #[error("as-of query on view '{view}': {reason}")]
    AsOf { view: String, reason: String },
    /// An as-of point that names no point of the view's inputs (a client's mistake, where
    /// [`ViewError::AsOf`] is history that is gone).
    #[error("as-of query on view '{view}': {reason}")]
    AsOfInvalid { view: String, reason: String },
    #[error("view '{view}' v{version}: {reason}")]
    Changelog { view: String, version: u32, reason: String },
    #[error(
        "view '{view}' v{version}: the value of key '{key}' after the step from {position} is {bytes} bytes; a view value may be at most {max} bytes (VIEW_VALUE_BYTES_MAX, a fixed limit): keep less under one key, e.g. split it over several keys"
    )]
    ValueTooLarge { view: String, version: u32, key: String, position: InputPosition, bytes: usize, max: usize },
    #[error(
        "view '{view}' v{version}: {unit} from {position} changes {bytes} bytes of view state, more than one step may change ({max} bytes, CHANGELOG_STEP_BYTES_MAX, a fixed limit), and one event cannot be split: change less state per event"
    )]
    StepTooLarge { view: String, version: u32, position: InputPosition, unit: String, bytes: usize, max: usize },
    #[error(
        "view '{view}' changed key '{key}' while applying {position}, which is not the key of a record it applied: in work mode a view must be keyed by its input's record key (each key's history in one partition); a view keyed otherwise goes through a repartition topic: run the worker with `work --repartition {view}`"
    )]
    NotCoPartitioned { view: String, key: String, position: InputPosition },
    #[error(
        "view '{view}' cannot run through a repartition topic (at {position}): {reason}; run it with `serve`, or leave it out with `work --views`"
    )]
    NotRepartitionable { view: String, position: InputPosition, reason: String },
    #[error(
        "view '{view}' v{version}: input topic '{topic}' was deleted and created again after this version first read it (its topic id changed), so the input positions it recorded name records of the old topic. To read the new topic, define a new version of the view numbered above every existing one: it builds from the new topic's start beside this one (which keeps serving its last state if it serves) and takes over reads once caught up; then retire v{version}"
    )]
    InputTopicRecreated { view: String, version: u32, topic: String },
    /// A read asked to wait for an offset of a partition the view does not read.
    #[error(
        "view '{view}' does not read {topic}/{partition}: its inputs are {inputs}; wait only for offsets of the view's input partitions"
    )]
    NotAnInput { view: String, topic: String, partition: i32, inputs: String },
    /// A read asked to wait for an offset at or past its partition's high watermark: no
    /// produce answered it (a typo, another topic's offset, a topic deleted and created
    /// again), so waiting would never see it applied.
    #[error(
        "view '{view}': {topic}/{partition} ends at {end}, so it has no offset {offset} yet; after_offsets takes offsets a produce answered (each below its partition's end)"
    )]
    OffsetNotWritten { view: String, topic: String, partition: i32, offset: i64, end: i64 },
    /// A read waited its whole timeout for input offsets the serving version had not applied yet.
    #[error(
        "view '{view}' v{version} had not applied every offset asked for within {waited_ms} ms: it is at {}; the records are in the log and are applied in order, so read again (with a longer wait_ms, at most 30000, or later)",
        behind_list(.behind)
    )]
    ReadBehind { view: String, version: u32, waited_ms: u64, behind: Vec<Behind> },
    #[error("the view engine is shutting down: read again once kappa has restarted")]
    ShuttingDown,
}

pub type Result<T, E = ViewError> = std::result::Result<T, E>;

impl ViewError {
    pub(crate) fn store(path: &std::path::Path, source: impl Into<redb::Error>, out_of_space: bool) -> Self {
        Self::Store { path: path.to_owned(), source: Box::new(source.into()), out_of_space }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    /// True for a failure that passes by itself, so the version is started again after a
    /// pause: a full disk (or quota) refusing the log, a file or the state store a write —
    /// the log does not poison itself for that, the store is reopened (redb refuses every
    /// later call on a handle after a failed write), and once space returns the same step
    /// goes through. False for everything else, which a new runner would hit again or
    /// cannot recover from inside this process: an event, the changelog's content, a limit,
    /// the definition, a poisoned log directory (refuses appends until a restart), and any
    /// other state-store error (a failed read or fsync may mean a failing disk).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Log(kappa_log::LogError::Io { source, .. }) | Self::Io { source, .. } => is_out_of_space(source),
            Self::Store { out_of_space, .. } => *out_of_space,
            Self::StoreReopening { .. } => true,
            _ => false,
        }
    }
}

impl ViewError {
    /// True for a state store that cannot answer until it is reopened: closed for a reopen,
    /// failed on a full disk, or closed by a reopen under a read that was using it
    /// (`DatabaseClosed`). Reads answer "retry". Not `PreviousIo` as such: after any other
    /// failure the store stays refused until a restart.
    pub fn is_store_unavailable(&self) -> bool {
        match self {
            Self::StoreReopening { .. } => true,
            Self::Store { out_of_space, source, .. } => {
                *out_of_space || matches!(**source, redb::Error::DatabaseClosed)
            }
            _ => false,
        }
    }
}

pub(crate) fn is_out_of_space(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Why one event could not be applied: a bad payload, an unknown schema version, a failing
/// upcaster or the view's own logic refusing it. The engine adds the position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventError(pub String);

impl EventError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl From<serde_json::Error> for EventError {
    fn from(e: serde_json::Error) -> Self {
        Self(format!("JSON: {e}"))
    }
}
