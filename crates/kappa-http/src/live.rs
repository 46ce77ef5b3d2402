//! Live subscriptions, shared by WebSocket and SSE.
//!
//! A subscription follows one key or a key prefix of a view's serving version: a
//! snapshot consistent with one changelog position, then every change after that position
//! in changelog order. Positions are tokens `"<version>.<changelog offset>"`; a client that
//! resumes with a token gets exactly the changes after it — or, when that is impossible
//! (another version now serves, the token is outside the changelog, compaction removed
//! records after it), a `reset` and a fresh snapshot. Never a silent gap.
//!
//! One hub task per view tails the serving version's durable changelog and broadcasts each
//! chunk of changes; a subscription catches up from its own position by reading the
//! changelog itself, then follows the broadcast, skipping what it has already sent.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kappa_views::changelog::{self, Entry};
use kappa_views::store::Scope;
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

/// A position in a view version's changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub version: u32,
    pub offset: i64,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.version, self.offset)
    }
}

impl FromStr for Token {
    type Err = ApiError;

    fn from_str(text: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "invalid_token",
                format!("'{text}' is not a resume token (\"<version>.<offset>\" from a snapshot or change)"),
            )
        };
        let (version, offset) = text.split_once('.').ok_or_else(bad)?;
        Ok(Self { version: version.parse().map_err(|_| bad())?, offset: offset.parse().map_err(|_| bad())? })
    }
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
    /// The view keys changed in changelog offsets `from..next` of `version`.
    Changes { version: u32, from: i64, next: i64, changes: Vec<ChangeItem> },
    /// Another version serves now.
    Switched { version: u32 },
}

/// The hubs, one per view, started on first use.
#[derive(Default)]
pub struct Hubs {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    /// Open subscriptions across all views.
    pub subscriptions: AtomicUsize,
}

pub struct Hub {
    events: broadcast::Sender<Arc<HubEvent>>,
}

impl Hubs {
    fn get_or_start(&self, state: &Arc<AppState>, view: &str) -> Arc<Hub> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        hubs.entry(view.to_owned())
            .or_insert_with(|| {
                let (events, _) = broadcast::channel(HUB_BUFFER_CHUNKS);
                let hub = Arc::new(Hub { events });
                tokio::spawn(run_hub(state.clone(), view.to_owned(), hub.clone()));
                hub
            })
            .clone()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking changelog read panicked")
}

/// Reads changelog view changes from `from`; returns them with the next offset and whether
/// compaction removed records in the range.
async fn read_changes(state: &Arc<AppState>, topic: &str, from: i64) -> Result<(Vec<ChangeItem>, i64, bool), ApiError> {
    let backend = state.engine.backend().clone();
    let topic = topic.to_owned();
    let chunk = blocking(move || backend.read_committed(&topic, 0, from, CHANGELOG_READ_BYTES)).await?;
    let mut changes = Vec::new();
    for record in &chunk.records {
        if let Ok(Entry::Change { offset, change, .. }) = changelog::decode(record)
            && change.scope == Scope::View
        {
            let value = change.value.map(|json| Arc::from(crate::views::raw(json)));
            changes.push(ChangeItem { offset, key: change.key, value });
        }
    }
    Ok((changes, chunk.next_offset.max(from), chunk.history_gap))
}

async fn run_hub(state: Arc<AppState>, view: String, hub: Arc<Hub>) {
    let mut current: Option<(u32, String, i64)> = None;
    loop {
        let serving = state.engine.serving_changelog(&view).ok();
        let Some((version, topic)) = serving else {
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
            Some((v, _, cursor)) if *v == version => *cursor,
            previous => {
                if previous.is_some() {
                    let _ = hub.events.send(Arc::new(HubEvent::Switched { version }));
                }
                current = Some((version, topic.clone(), end));
                end
            }
        };
        if cursor < end && hub.events.receiver_count() > 0 {
            match read_changes(&state, &topic, cursor).await {
                Ok((changes, next, _)) => {
                    let _ = hub.events.send(Arc::new(HubEvent::Changes { version, from: cursor, next, changes }));
                    current = Some((version, topic, next));
                }
                Err(e) => {
                    tracing::warn!(view, error = %e.message, "reading a view changelog for subscribers failed");
                    tokio::time::sleep(HUB_IDLE_CHECK).await;
                }
            }
            continue;
        }
        // Nobody listening: skip ahead (subscriptions catch up by themselves).
        current = Some((version, topic.clone(), end));
        let Ok(partition) = state.log.partition(&topic, 0) else {
            tokio::time::sleep(HUB_IDLE_CHECK).await;
            continue;
        };
        let mut watch = partition.watch_high_watermark();
        if partition.high_watermark() > end {
            continue;
        }
        let _ = tokio::time::timeout(HUB_IDLE_CHECK, watch.changed()).await;
    }
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
    let hub = state.hubs.get_or_start(state, view);
    'restart: loop {
        let mut events = hub.events.subscribe();
        let (version, topic) = match state.engine.serving_changelog(view) {
            Ok(serving) => serving,
            Err(e) => return fail(emit, e.into()).await,
        };
        let mut cursor = match resume.take() {
            Some(token) => match resumable(state, &topic, version, token) {
                Ok(true) => token.offset,
                Ok(false) => {
                    let reason = if token.version == version {
                        format!("token {token} is outside the changelog of version {version}")
                    } else {
                        format!("version {version} serves now (the token is from version {})", token.version)
                    };
                    if !emit.emit(LiveMessage::Reset { reason }).await {
                        return Ended::Gone;
                    }
                    continue 'restart;
                }
                Err(e) => return fail(emit, e).await,
            },
            None => match snapshot(state, view, target, version) {
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
        match catch_up_or_reset(state, &topic, version, target, cursor, emit).await {
            Next::Cursor(next) => cursor = next,
            Next::Restart => continue 'restart,
            Next::End(ended) => return ended,
        }
        loop {
            match events.recv().await {
                Ok(event) => match &*event {
                    HubEvent::Changes { version: v, from, next, changes } if *v == version => {
                        if *from > cursor {
                            match catch_up_or_reset(state, &topic, version, target, cursor, emit).await {
                                Next::Cursor(next) => cursor = next,
                                Next::Restart => continue 'restart,
                                Next::End(ended) => return ended,
                            }
                        }
                        for change in changes.iter().filter(|c| c.offset >= cursor && target.matches(&c.key)) {
                            let token = Token { version, offset: change.offset + 1 };
                            if !emit
                                .emit(LiveMessage::Change {
                                    key: change.key.clone(),
                                    value: change.value.clone(),
                                    token,
                                })
                                .await
                            {
                                return Ended::Gone;
                            }
                        }
                        cursor = cursor.max(*next);
                    }
                    // The switch to this subscription's own version, or a chunk of the old
                    // version still in flight when it started: nothing changed for it.
                    HubEvent::Switched { version: v } if *v == version => {}
                    HubEvent::Changes { .. } if still_serving(state, view, version) => {}
                    HubEvent::Changes { version: v, .. } | HubEvent::Switched { version: v } => {
                        if !emit.emit(LiveMessage::Reset { reason: format!("the view switched to version {v}") }).await
                        {
                            return Ended::Gone;
                        }
                        continue 'restart;
                    }
                },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match catch_up_or_reset(state, &topic, version, target, cursor, emit).await {
                        Next::Cursor(next) => cursor = next,
                        Next::Restart => continue 'restart,
                        Next::End(ended) => return ended,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Ended::Gone,
            }
        }
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
    topic: &str,
    version: u32,
    target: &Target,
    cursor: i64,
    emit: &mut impl Emit<LiveMessage>,
) -> Next {
    match catch_up(state, topic, version, target, cursor, emit).await {
        Ok(Some(next)) => Next::Cursor(next),
        Ok(None) => Next::End(Ended::Gone),
        Err(CatchUp::Gap) => {
            let reason = "the changelog was compacted after the resume point".to_owned();
            if emit.emit(LiveMessage::Reset { reason }).await { Next::Restart } else { Next::End(Ended::Gone) }
        }
        Err(CatchUp::Failed(e)) => Next::End(fail(emit, e).await),
    }
}

fn still_serving(state: &Arc<AppState>, view: &str, version: u32) -> bool {
    state.engine.serving_changelog(view).is_ok_and(|(serving, _)| serving == version)
}

/// Whether changes after `token` can be replayed from the serving changelog.
fn resumable(state: &Arc<AppState>, topic: &str, version: u32, token: Token) -> Result<bool, ApiError> {
    if token.version != version {
        return Ok(false);
    }
    let backend = state.engine.backend();
    let start = backend.start_offset(topic, 0)?;
    let end = backend.durable_end_offset(topic, 0)?;
    Ok(token.offset >= start && token.offset <= end)
}

/// The snapshot message, or None when another version started serving meanwhile.
fn snapshot(state: &Arc<AppState>, view: &str, target: &Target, version: u32) -> Result<Option<LiveMessage>, ApiError> {
    let max = state.config.snapshot_items_max;
    let (read_version, position, items) = match target {
        Target::Key(key) => {
            let read = state.engine.get(view, key)?;
            let items = read.value.into_iter().map(|i| (i.key, Arc::from(crate::views::raw(i.json)))).collect();
            (read.version, read.position, items)
        }
        Target::Prefix(prefix) => {
            let read = state.engine.scan(view, prefix, None, max + 1)?;
            if read.value.len() > max {
                return Err(snapshot_too_large(prefix, max));
            }
            let items = read.value.into_iter().map(|i| (i.key, Arc::from(crate::views::raw(i.json)))).collect();
            (read.version, read.position, items)
        }
    };
    if read_version != version {
        return Ok(None);
    }
    Ok(Some(LiveMessage::Snapshot { version, items, token: Token { version, offset: position } }))
}

fn snapshot_too_large(prefix: &str, max: usize) -> ApiError {
    ApiError::bad_request(
        "snapshot_too_large",
        format!("prefix '{prefix}' matches more than {max} keys (snapshot_items_max); subscribe to a longer prefix"),
    )
}

/// Refuses a prefix whose snapshot would be too large before a stream starts: an SSE
/// stream that has answered 200 can only end, and EventSource retries every stream that
/// ends, but not a 4xx.
pub fn check_snapshot_size(state: &AppState, view: &str, target: &Target) -> Result<(), ApiError> {
    let Target::Prefix(prefix) = target else { return Ok(()) };
    let max = state.config.snapshot_items_max;
    if state.engine.scan(view, prefix, None, max + 1)?.value.len() > max {
        return Err(snapshot_too_large(prefix, max));
    }
    Ok(())
}

enum CatchUp {
    Gap,
    Failed(ApiError),
}

/// Sends the matching changes from `cursor` to the changelog's current durable end;
/// returns the new cursor (None: the emitter said stop).
async fn catch_up(
    state: &Arc<AppState>,
    topic: &str,
    version: u32,
    target: &Target,
    mut cursor: i64,
    emit: &mut impl Emit<LiveMessage>,
) -> Result<Option<i64>, CatchUp> {
    let end = state.engine.backend().durable_end_offset(topic, 0).map_err(|e| CatchUp::Failed(e.into()))?;
    while cursor < end {
        let (changes, next, gap) = read_changes(state, topic, cursor).await.map_err(CatchUp::Failed)?;
        if gap {
            return Err(CatchUp::Gap);
        }
        for change in changes.into_iter().filter(|c| target.matches(&c.key)) {
            let token = Token { version, offset: change.offset + 1 };
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
