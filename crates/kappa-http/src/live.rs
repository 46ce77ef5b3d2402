//! Live subscriptions, shared by WebSocket and SSE.
//!
//! A subscription follows one key or a key prefix of a view's serving version: a
//! snapshot consistent with one changelog position, then every change after that position
//! in changelog order. Positions are tokens `"<version>.<changelog id>.<changelog offset>"`;
//! a client that resumes with a token gets exactly the changes after it — or, when that is
//! impossible (another version now serves, the changelog was deleted and created again
//! since — a wiped or restored data directory — so its offsets name other changes, the
//! token is outside the changelog, compaction removed records after it), a `reset` and a
//! fresh snapshot. Never a silent gap.
//!
//! A changelog record whose value is not JSON was not written by the view engine (a Kafka
//! client produced it; the engine's state never saw it): it is logged and skipped.
//!
//! One hub task per view tails the serving version's durable changelog and broadcasts each
//! chunk of changes; a subscription catches up from its own position by reading the
//! changelog itself, then follows the broadcast, skipping what it has already sent. The
//! broadcast has no gaps from where the hub started following a changelog (its `Switched`
//! names that offset) on; a subscription behind that point — it took its snapshot before the
//! hub's first look at the changelog — reads the changes in between itself.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kappa_views::ScanLimit;
use kappa_views::changelog::{self, Entry};
use kappa_views::store::Scope;
use kappa_views::view::json_bytes;
use serde_json::value::RawValue;
use tokio::sync::broadcast;

use crate::AppState;
use crate::error::ApiError;

/// Changes read from the changelog per read.
const CHANGELOG_READ_BYTES: usize = 1024 * 1024;
/// Chunks a hub buffers for slow subscriptions before they must catch up themselves.
const HUB_BUFFER_CHUNKS: usize = 256;
/// How often a hub checks which version serves when nothing is appended.
const HUB_IDLE_CHECK: Duration = Duration::from_millis(200);
/// A snapshot's items as JSON (keys and values), at most: a snapshot is one WebSocket frame,
/// and the socket refuses a frame over [`crate::ws::WS_WRITE_FRAME_BYTES_MAX`] (16 MiB) by
/// closing the connection with every subscription on it. Two view values of
/// `VIEW_VALUE_BYTES_MAX` (4 MiB) fit.
pub const SNAPSHOT_BYTES_MAX: usize = 8 * 1024 * 1024;
/// A snapshot item's JSON besides its key and value: `{"key":,"value":},`.
const SNAPSHOT_ITEM_OVERHEAD_BYTES: usize = 18;

/// A position in one incarnation of a view version's changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub version: u32,
    /// Which changelog: [`changelog_id`] of the topic the offset is in. None: a token from
    /// before tokens named it (`<version>.<offset>`), never resumable.
    pub changelog: Option<u64>,
    pub offset: i64,
}

/// Hex digits of a token's changelog id.
const CHANGELOG_ID_HEX_DIGITS: usize = 16;

/// A changelog topic's incarnation in a token: the first 64 bits of its random topic id,
/// which a topic deleted and created again under the same name does not keep.
pub fn changelog_id(topic_id: [u8; kappa_log::log::TOPIC_ID_BYTES]) -> u64 {
    let mut first = [0; 8];
    first.copy_from_slice(&topic_id[..8]);
    u64::from_be_bytes(first)
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.changelog {
            Some(id) => write!(f, "{}.{id:016x}.{}", self.version, self.offset),
            None => write!(f, "{}.{}", self.version, self.offset),
        }
    }
}

impl FromStr for Token {
    type Err = ApiError;

    fn from_str(text: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "invalid_token",
                format!(
                    "'{text}' is not a resume token (\"<version>.<changelog id>.<offset>\" from a snapshot or change)"
                ),
            )
        };
        let parts: Vec<&str> = text.splitn(4, '.').collect();
        let (version, changelog, offset) = match parts[..] {
            [version, offset] => (version, None, offset),
            [version, id, offset]
                if id.len() == CHANGELOG_ID_HEX_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                (version, Some(u64::from_str_radix(id, 16).map_err(|_| bad())?), offset)
            }
            _ => return Err(bad()),
        };
        Ok(Self { version: version.parse().map_err(|_| bad())?, changelog, offset: offset.parse().map_err(|_| bad())? })
    }
}

/// The [`changelog_id`] of changelog topic `topic`.
pub(crate) fn changelog_of(state: &AppState, topic: &str) -> Result<u64, ApiError> {
    Ok(changelog_id(state.log.topic(topic)?.id()))
}

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Key(String),
    Prefix(String),
}

impl Target {
    fn matches(&self, key: &str) -> bool {
        match self {
            Target::Key(k) => k == key,
            Target::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// What a subscription sends, before a transport frames it.
#[derive(Debug, Clone)]
pub enum LiveMessage {
    Snapshot { version: u32, items: Vec<(String, Arc<RawValue>)>, token: Token },
    Change { key: String, value: Option<Arc<RawValue>>, token: Token },
    Reset { reason: String },
    Error { code: &'static str, message: String },
}

/// One changed view key in the changelog.
#[derive(Debug, Clone)]
pub struct ChangeItem {
    pub offset: i64,
    pub key: String,
    pub value: Option<Arc<RawValue>>,
}

/// What a hub broadcasts.
#[derive(Debug)]
pub enum HubEvent {
    /// The view keys changed in changelog offsets `from..next` of `version`, in the changelog
    /// with id `changelog`; `first_missing`: the first offset in that range whose record
    /// compaction removed before the hub read it (the hub fell behind the cleaner).
    Changes { version: u32, changelog: u64, from: i64, next: i64, first_missing: Option<i64>, changes: Vec<ChangeItem> },
    /// The hub follows `version`'s changelog `changelog` from offset `from` on (the
    /// changelog's end at its look): it started, another version serves now, or the serving
    /// changelog was deleted and created again. Its chunks of that changelog start at `from`,
    /// so a subscription of it whose position is before `from` catches up by itself.
    Switched { version: u32, changelog: u64, from: i64 },
}

/// The hubs, one per view, started on first use. A hub that ends (it should not: it logs
/// and goes on after any failure) unregisters itself, so the next subscriber starts another.
#[derive(Default)]
pub struct Hubs {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    /// Open subscriptions across all views.
    pub subscriptions: AtomicUsize,
    /// A hub waits for it before its first look; [`Hubs::hold_first_looks`] holds it.
    first_looks: tokio::sync::RwLock<()>,
}

/// One view's hub. Only the map and the hub's task hold it, so when the task ends and
/// unregisters, the sender drops and subscribers see `Closed`.
pub struct Hub {
    events: broadcast::Sender<Arc<HubEvent>>,
    /// Its task, for [`Hubs::stop`].
    task: OnceLock<tokio::task::AbortHandle>,
}

impl Hubs {
    /// Follows `view`'s hub, starting one if none runs.
    fn subscribe(&self, state: &Arc<AppState>, view: &str) -> broadcast::Receiver<Arc<HubEvent>> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hub) = hubs.get(view) {
            return hub.events.subscribe();
        }
        let (events, receiver) = broadcast::channel(HUB_BUFFER_CHUNKS);
        let hub = Arc::new(Hub { events, task: OnceLock::new() });
        hubs.insert(view.to_owned(), hub.clone());
        let registration = HubRegistration { state: state.clone(), view: view.to_owned(), hub: hub.clone() };
        // Spawned after the lock is released: a runtime shutting down drops the task at once,
        // on this thread, and the registration's drop takes the same lock.
        drop(hubs);
        let task = tokio::spawn(async move {
            run_hub(&registration.state, &registration.view, &registration.hub).await;
        });
        let _ = hub.task.set(task.abort_handle());
        receiver
    }

    /// Ends `view`'s hub at once, as a failure would: its subscriptions follow the next one.
    #[doc(hidden)]
    pub fn stop(&self, view: &str) {
        let hub = self.hubs.lock().unwrap_or_else(|e| e.into_inner()).get(view).cloned();
        if let Some(task) = hub.as_ref().and_then(|hub| hub.task.get()) {
            task.abort();
        }
    }

    /// Whether a hub runs for `view`.
    #[doc(hidden)]
    pub fn running(&self, view: &str) -> bool {
        self.hubs.lock().unwrap_or_else(|e| e.into_inner()).contains_key(view)
    }

    /// Keeps every hub that has not yet taken its first look from taking it until the
    /// guard drops, so a test can order what a subscription does against its hub's start
    /// (as a hub started while its view was not yet serving looks only a moment later).
    /// Blocks the calling thread, which must not be a runtime's.
    #[doc(hidden)]
    pub fn hold_first_looks(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.first_looks.blocking_write()
    }
}

/// A running hub's entry in [`Hubs`], removed when its task ends however it ends (a panic
/// unwinds through this drop too).
struct HubRegistration {
    state: Arc<AppState>,
    view: String,
    hub: Arc<Hub>,
}

impl Drop for HubRegistration {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(view = self.view, "a view's subscription hub failed; the next subscriber starts another");
        }
        let mut hubs = self.state.hubs.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if hubs.get(&self.view).is_some_and(|hub| Arc::ptr_eq(hub, &self.hub)) {
            hubs.remove(&self.view);
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking changelog read panicked")
}

/// Reads changelog view changes from `from`; returns them with the next offset and the first
/// offset in the range whose record compaction removed, if any.
async fn read_changes(
    state: &Arc<AppState>,
    topic: &str,
    from: i64,
) -> Result<(Vec<ChangeItem>, i64, Option<i64>), ApiError> {
    let backend = state.engine.backend().clone();
    let name = topic.to_owned();
    let chunk = blocking(move || backend.read_committed(&name, 0, from, CHANGELOG_READ_BYTES)).await?;
    let mut changes = Vec::new();
    for record in &chunk.records {
        if let Ok(Entry::Change { offset, change, .. }) = changelog::decode(record)
            && change.scope == Scope::View
        {
            let value = match change.value.map(crate::views::raw).transpose() {
                Ok(value) => value.map(Arc::from),
                Err(e) => {
                    // Not the view engine's (it writes JSON only): a Kafka client produced it.
                    // The engine's state never saw it, so subscribers skip it too.
                    tracing::error!(topic, offset, key = change.key, error = %e, "skipping a changelog record whose value is not JSON");
                    continue;
                }
            };
            changes.push(ChangeItem { offset, key: change.key, value });
        }
    }
    Ok((changes, chunk.next_offset.max(from), chunk.first_missing))
}

/// The changelog a hub follows: which version's, which incarnation, and how far it got.
struct Following {
    version: u32,
    changelog: u64,
    cursor: i64,
}

/// The serving version, its changelog topic and that topic's id, or None for now.
fn serving(state: &AppState, view: &str) -> Option<(u32, String, u64)> {
    let (version, topic) = state.engine.serving_changelog(view).ok()?;
    let changelog = changelog_of(state, &topic).ok()?;
    Some((version, topic, changelog))
}

async fn run_hub(state: &Arc<AppState>, view: &str, hub: &Hub) {
    drop(state.hubs.first_looks.read().await);
    let mut current: Option<Following> = None;
    loop {
        let Some((version, topic, changelog)) = serving(state, view) else {
            tokio::time::sleep(HUB_IDLE_CHECK).await;
            continue;
        };
        let backend = state.engine.backend().clone();
        let end = match backend.durable_end_offset(&topic, 0) {
            Ok(end) => end,
            Err(_) => {
                tokio::time::sleep(HUB_IDLE_CHECK).await;
                continue;
            }
        };
        let cursor = match &current {
            Some(following) if following.version == version && following.changelog == changelog => following.cursor,
            _ => {
                // Said on the hub's first look too: a subscription that took its snapshot
                // from another version (before this hub started, or while a failed one was
                // down) would otherwise hear nothing until the followed changelog changes;
                // and one of this changelog whose snapshot is older than `end` would not
                // hear of the changes before `end` until the next one.
                tracing::debug!(view, version, changelog = %format!("{changelog:016x}"), from = end, "a subscription hub follows a changelog");
                let _ = hub.events.send(Arc::new(HubEvent::Switched { version, changelog, from: end }));
                current = Some(Following { version, changelog, cursor: end });
                end
            }
        };
        if cursor < end && hub.events.receiver_count() > 0 {
            match read_changes(state, &topic, cursor).await {
                Ok((changes, next, first_missing)) if next > cursor => {
                    let event = HubEvent::Changes { version, changelog, from: cursor, next, first_missing, changes };
                    let _ = hub.events.send(Arc::new(event));
                    current = Some(Following { version, changelog, cursor: next });
                    continue;
                }
                // Nothing readable past the cursor: an open transaction holds the changelog's
                // stable end there. Reading again at once would spin until it ends.
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(view, error = %e.message, "reading a view changelog for subscribers failed");
                    tokio::time::sleep(HUB_IDLE_CHECK).await;
                    continue;
                }
            }
        } else {
            // Nobody listening: skip ahead (subscriptions catch up by themselves).
            current = Some(Following { version, changelog, cursor: end });
        }
        wait_for_appends(state, &topic, end).await;
    }
}

/// Waits until `topic` grows past `end` (an append, or a transaction's end marker), or at
/// most [`HUB_IDLE_CHECK`], when the hub checks again which version serves.
async fn wait_for_appends(state: &AppState, topic: &str, end: i64) {
    let Ok(partition) = state.log.partition(topic, 0) else {
        tokio::time::sleep(HUB_IDLE_CHECK).await;
        return;
    };
    let mut watch = partition.watch_high_watermark();
    if partition.high_watermark() > end {
        return;
    }
    let _ = tokio::time::timeout(HUB_IDLE_CHECK, watch.changed()).await;
}

/// Why a subscription ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The transport went away or could not keep up (the emitter said stop).
    Gone,
    /// The subscription failed with an error already sent.
    Failed,
}

/// Where a subscription's messages go: a WebSocket's queue ([`crate::ws::FramedEmit`]), an
/// SSE stream ([`crate::sse::SseEmit`]).
pub trait Emit<M>: Send {
    /// Queues `message`, waiting while the client's queue is full; false: stop (the client
    /// went away, or read nothing for too long).
    fn emit(&mut self, message: M) -> impl Future<Output = bool> + Send;
}

/// Sends a subscription's messages through `emit` until it ends. `emit` waits while the
/// client's queue is full (so a catch-up burst is paced by the client's reading) and
/// answers false to stop: the client went away, or read nothing for too long.
pub async fn run_subscription(
    state: Arc<AppState>,
    view: String,
    target: Target,
    mut resume: Option<Token>,
    emit: &mut impl Emit<LiveMessage>,
) -> Ended {
    // Counted down however the subscription ends: WebSocket tasks are aborted mid-await.
    let _open = OpenSubscription::count(&state.hubs.subscriptions);
    follow(&state, &view, &target, &mut resume, emit).await
}

/// One open subscription in the `kappa_subscriptions` gauge, for as long as it lives.
struct OpenSubscription<'a>(&'a AtomicUsize);

impl<'a> OpenSubscription<'a> {
    fn count(open: &'a AtomicUsize) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for OpenSubscription<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn fail(emit: &mut impl Emit<LiveMessage>, e: ApiError) -> Ended {
    emit.emit(LiveMessage::Error { code: e.code, message: e.message }).await;
    Ended::Failed
}

async fn follow(
    state: &Arc<AppState>,
    view: &str,
    target: &Target,
    resume: &mut Option<Token>,
    emit: &mut impl Emit<LiveMessage>,
) -> Ended {
    'restart: loop {
        let mut events = state.hubs.subscribe(state, view);
        let (version, topic) = match state.engine.serving_changelog(view) {
            Ok(serving) => serving,
            Err(e) => return fail(emit, e.into()).await,
        };
        let changelog = match changelog_of(state, &topic) {
            Ok(changelog) => changelog,
            Err(e) => return fail(emit, e).await,
        };
        let followed = Followed { topic: &topic, version, changelog };
        let mut cursor = match resume.take() {
            Some(token) => match resumable(state, &followed, token) {
                Ok(None) => token.offset,
                Ok(Some(reason)) => {
                    if !emit.emit(LiveMessage::Reset { reason }).await {
                        return Ended::Gone;
                    }
                    continue 'restart;
                }
                Err(e) => return fail(emit, e).await,
            },
            None => match snapshot(state, view, target, &followed) {
                Ok(Some(message)) => {
                    let LiveMessage::Snapshot { token, .. } = &message else { unreachable!() };
                    let offset = token.offset;
                    if !emit.emit(message).await {
                        return Ended::Gone;
                    }
                    offset
                }
                Ok(None) => continue 'restart,
                Err(e) => return fail(emit, e).await,
            },
        };
        match catch_up_or_reset(state, &followed, target, cursor, emit).await {
            Next::Cursor(next) => cursor = next,
            Next::Restart => continue 'restart,
            Next::End(ended) => return ended,
        }
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match catch_up_or_reset(state, &followed, target, cursor, emit).await {
                        Next::Cursor(next) => cursor = next,
                        Next::Restart => continue 'restart,
                        Next::End(ended) => return ended,
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The hub ended: follow a new one, catching up on what it skipped.
                    events = state.hubs.subscribe(state, view);
                    match catch_up_or_reset(state, &followed, target, cursor, emit).await {
                        Next::Cursor(next) => cursor = next,
                        Next::Restart => continue 'restart,
                        Next::End(ended) => return ended,
                    }
                    continue;
                }
            };
            match &*event {
                HubEvent::Changes { version: v, changelog: c, from, next, first_missing, changes }
                    if *v == version && *c == changelog =>
                {
                    // Behind the chunk, or compaction removed records of a chunk holding
                    // changes it has not sent (the chunk names only its first gap, which may
                    // lie before the cursor while a later one does not): its own read from
                    // the cursor replays what is there, or says reset.
                    if *from > cursor || (first_missing.is_some() && *next > cursor) {
                        match catch_up_or_reset(state, &followed, target, cursor, emit).await {
                            Next::Cursor(next) => cursor = next,
                            Next::Restart => continue 'restart,
                            Next::End(ended) => return ended,
                        }
                    }
                    for change in changes.iter().filter(|c| c.offset >= cursor && target.matches(&c.key)) {
                        let token = followed.token(change.offset + 1);
                        let message =
                            LiveMessage::Change { key: change.key.clone(), value: change.value.clone(), token };
                        if !emit.emit(message).await {
                            return Ended::Gone;
                        }
                    }
                    cursor = cursor.max(*next);
                }
                // The hub follows this subscription's own changelog from `from` on: it
                // started (a new hub, or one whose view was not serving yet) or noticed the
                // switch to it after this subscription took its snapshot. Changes before
                // `from` are in no chunk: a subscription behind it reads them itself, up to
                // the changelog's end (past `from` by now), or it would hear of them only
                // with the next change, which may never come.
                HubEvent::Switched { version: v, changelog: c, from } if *v == version && *c == changelog => {
                    if *from > cursor {
                        tracing::debug!(
                            view,
                            version,
                            from,
                            cursor,
                            "a subscription behind its hub's start catches up"
                        );
                        match catch_up_or_reset(state, &followed, target, cursor, emit).await {
                            Next::Cursor(next) => cursor = next,
                            Next::Restart => continue 'restart,
                            Next::End(ended) => return ended,
                        }
                    }
                }
                // A hub's look from before the switch this subscription already follows, or
                // a chunk of an old changelog still in flight when it started.
                HubEvent::Changes { .. } | HubEvent::Switched { .. } if still_serving(state, view, &followed) => {}
                HubEvent::Changes { version: v, changelog: c, .. }
                | HubEvent::Switched { version: v, changelog: c, .. } => {
                    let reason = if *v == version && *c != changelog {
                        format!("the changelog of version {v} was deleted and created again")
                    } else {
                        format!("the view switched to version {v}")
                    };
                    if !emit.emit(LiveMessage::Reset { reason }).await {
                        return Ended::Gone;
                    }
                    continue 'restart;
                }
            }
        }
    }
}

/// The changelog a subscription follows.
struct Followed<'a> {
    topic: &'a str,
    version: u32,
    /// Its [`changelog_id`].
    changelog: u64,
}

impl Followed<'_> {
    fn token(&self, offset: i64) -> Token {
        Token { version: self.version, changelog: Some(self.changelog), offset }
    }
}

/// Where a subscription goes after catching up.
enum Next {
    Cursor(i64),
    /// The changes after the cursor are gone (compacted): `reset` was sent, start over.
    Restart,
    End(Ended),
}

/// [`catch_up`], with a compacted gap turned into a `reset` for the client.
async fn catch_up_or_reset(
    state: &Arc<AppState>,
    followed: &Followed<'_>,
    target: &Target,
    cursor: i64,
    emit: &mut impl Emit<LiveMessage>,
) -> Next {
    match catch_up(state, followed, target, cursor, emit).await {
        Ok(Some(next)) => Next::Cursor(next),
        Ok(None) => Next::End(Ended::Gone),
        Err(CatchUp::Gap) => {
            let reason = "the changelog was compacted after the resume point".to_owned();
            if emit.emit(LiveMessage::Reset { reason }).await { Next::Restart } else { Next::End(Ended::Gone) }
        }
        Err(CatchUp::Failed(e)) => Next::End(fail(emit, e).await),
    }
}

fn still_serving(state: &Arc<AppState>, view: &str, followed: &Followed<'_>) -> bool {
    serving(state, view)
        .is_some_and(|(version, _, changelog)| version == followed.version && changelog == followed.changelog)
}

/// None when the changes after `token` can be replayed from the followed changelog, else
/// why not (the `reset` reason).
fn resumable(state: &Arc<AppState>, followed: &Followed<'_>, token: Token) -> Result<Option<String>, ApiError> {
    let version = followed.version;
    if token.version != version {
        return Ok(Some(format!("version {version} serves now (the token is from version {})", token.version)));
    }
    match token.changelog {
        None => return Ok(Some(format!("token {token} does not name its changelog (it is from an older server)"))),
        Some(id) if id != followed.changelog => {
            return Ok(Some(format!(
                "the changelog of version {version} was deleted and created again since token {token}; its offsets name other changes now"
            )));
        }
        Some(_) => {}
    }
    let backend = state.engine.backend();
    let start = backend.start_offset(followed.topic, 0)?;
    let end = backend.durable_end_offset(followed.topic, 0)?;
    if token.offset < start || token.offset > end {
        return Ok(Some(format!("token {token} is outside the changelog of version {version}")));
    }
    // Recreated while the offsets were read: they may be the new changelog's.
    if changelog_of(state, followed.topic)? != followed.changelog {
        return Ok(Some(format!("the changelog of version {version} was deleted and created again")));
    }
    Ok(None)
}

/// The snapshot message, or None when another version started serving meanwhile.
fn snapshot(
    state: &Arc<AppState>,
    view: &str,
    target: &Target,
    followed: &Followed<'_>,
) -> Result<Option<LiveMessage>, ApiError> {
    let version = followed.version;
    let max = state.config.snapshot_items_max;
    let (read_version, position, items) = match target {
        Target::Key(key) => {
            let read = state.engine.get(view, key)?;
            (read.version, read.position, snapshot_items(view, read.value)?)
        }
        Target::Prefix(prefix) => {
            let read = state.engine.scan(view, prefix, None, snapshot_scan_limit(max))?;
            if read.value.items.len() > max {
                return Err(snapshot_too_large(prefix, max));
            }
            (read.version, read.position, snapshot_items(view, read.value.items)?)
        }
    };
    if read_version != version {
        return Ok(None);
    }
    check_snapshot_bytes(target, &items)?;
    Ok(Some(LiveMessage::Snapshot { version, items, token: followed.token(position) }))
}

/// A snapshot's items; a stored value that is not JSON (a forged changelog record a restart
/// recovered into the store) is left out with an error logged, as the live path skips the
/// record itself, so one bad key does not refuse every subscription over its prefix.
fn snapshot_items(
    view: &str,
    items: impl IntoIterator<Item = kappa_views::Item>,
) -> Result<Vec<(String, Arc<RawValue>)>, ApiError> {
    Ok(items
        .into_iter()
        .filter_map(|i| match crate::views::stored(i.json, view, &i.key) {
            Ok(value) => Some((i.key, Arc::from(value))),
            Err(e) => {
                tracing::error!(view, key = i.key, error = %e.message, "left out of a snapshot");
                None
            }
        })
        .collect())
}

/// A snapshot's scan: one key past `snapshot_items_max`, to tell that there are more; and it
/// stops once keys and values pass [`SNAPSHOT_BYTES_MAX`] (their JSON is no shorter), so a
/// prefix of large values is refused by bytes without loading `snapshot_items_max` of them.
fn snapshot_scan_limit(snapshot_items_max: usize) -> ScanLimit {
    ScanLimit { items: snapshot_items_max + 1, bytes: SNAPSHOT_BYTES_MAX }
}

fn snapshot_too_large(prefix: &str, max: usize) -> ApiError {
    ApiError::bad_request(
        "snapshot_too_large",
        format!(
            "prefix '{prefix}' matches more than {max} keys (the server's --http-snapshot-items-max); subscribe to a longer prefix"
        ),
    )
}

/// Refuses a target whose snapshot would be too large before a stream starts: an SSE
/// stream that has answered 200 can only end, and EventSource retries every stream that
/// ends, but not a 4xx.
pub fn check_snapshot_size(state: &AppState, view: &str, target: &Target) -> Result<(), ApiError> {
    // One key's value (at most VIEW_VALUE_BYTES_MAX) is always under the byte limit.
    let Target::Prefix(prefix) = target else { return Ok(()) };
    let max = state.config.snapshot_items_max;
    let items = state.engine.scan(view, prefix, None, snapshot_scan_limit(max))?.value.items;
    if items.len() > max {
        return Err(snapshot_too_large(prefix, max));
    }
    check_snapshot_bytes(target, &snapshot_items(view, items)?)
}

/// The bytes a snapshot of `items` (key, value's JSON bytes) takes as sent, each item's frame
/// taking `item_overhead_bytes` besides its key and value: keys count as JSON strings, where a
/// control character takes six bytes. Work mode's snapshots, framed otherwise, count with it too.
pub fn snapshot_bytes<'a>(items: impl IntoIterator<Item = (&'a str, usize)>, item_overhead_bytes: usize) -> usize {
    items
        .into_iter()
        .map(|(key, value_bytes)| item_overhead_bytes + json_bytes(key).expect("a string serializes") + value_bytes)
        .sum()
}

/// Refuses a snapshot over [`SNAPSHOT_BYTES_MAX`].
fn check_snapshot_bytes(target: &Target, items: &[(String, Arc<RawValue>)]) -> Result<(), ApiError> {
    let sizes = items.iter().map(|(key, value)| (key.as_str(), value.get().len()));
    let bytes = snapshot_bytes(sizes, SNAPSHOT_ITEM_OVERHEAD_BYTES);
    if bytes <= SNAPSHOT_BYTES_MAX {
        return Ok(());
    }
    let what = match target {
        Target::Key(key) => format!("key '{key}'"),
        Target::Prefix(prefix) => format!("prefix '{prefix}'"),
    };
    Err(ApiError::bad_request(
        "snapshot_too_large",
        format!(
            "the snapshot of {what} would take {bytes} bytes; a snapshot may take at most {SNAPSHOT_BYTES_MAX} bytes (SNAPSHOT_BYTES_MAX, a fixed limit: it is sent as one message); subscribe to fewer keys (a longer prefix, or single keys)"
        ),
    ))
}

enum CatchUp {
    Gap,
    Failed(ApiError),
}

/// Sends the matching changes from `cursor` to the changelog's current durable end;
/// returns the new cursor (None: the emitter said stop).
async fn catch_up(
    state: &Arc<AppState>,
    followed: &Followed<'_>,
    target: &Target,
    mut cursor: i64,
    emit: &mut impl Emit<LiveMessage>,
) -> Result<Option<i64>, CatchUp> {
    let topic = followed.topic;
    let end = state.engine.backend().durable_end_offset(topic, 0).map_err(|e| CatchUp::Failed(e.into()))?;
    while cursor < end {
        let (changes, next, first_missing) = read_changes(state, topic, cursor).await.map_err(CatchUp::Failed)?;
        if first_missing.is_some() {
            return Err(CatchUp::Gap);
        }
        for change in changes.into_iter().filter(|c| target.matches(&c.key)) {
            let token = followed.token(change.offset + 1);
            if !emit.emit(LiveMessage::Change { key: change.key, value: change.value, token }).await {
                return Ok(None);
            }
        }
        if next <= cursor {
            break;
        }
        cursor = next;
    }
    Ok(Some(cursor))
}
