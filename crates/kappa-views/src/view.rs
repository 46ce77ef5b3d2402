//! How an application defines a view: a reducer (one key per event, a pure fold) or a
//! general processor (read and write any key), with a name, a version and input topics.

use std::hash::BuildHasher;
use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashTable};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::changelog::Change;
use crate::error::{EventError, Result, ViewError};
use crate::event::Event;
use crate::store::Scope;

/// Longest view name; names are `[a-z0-9_-]` so they fit in topic and file names.
pub const VIEW_NAME_BYTES_MAX: usize = 64;

/// A view as a fold: each event names at most one view key and turns its state into the
/// next (None deletes the key). Must be deterministic: a replay gives the same state.
pub trait Reducer: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Clone + Send + 'static;

    /// The view key this event updates, or None to ignore the event.
    fn key(&self, event: &Event) -> Option<String>;

    /// The key's next state.
    fn apply(&self, state: Option<Self::State>, event: &Event) -> Result<Option<Self::State>, EventError>;
}

/// A view as a general processor: one event may read and write any number of keys (fan-out,
/// secondary indexes). Internal keys (of type `Internal`) hold the processor's own
/// bookkeeping: committed and restored with the view, but not readable by clients. Must be
/// deterministic.
pub trait Processor: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Clone + Send + 'static;
    /// Use `()` when the processor keeps nothing private.
    type Internal: Serialize + DeserializeOwned + Clone + Send + 'static;

    fn process(
        &self,
        event: &Event,
        state: &mut dyn StateAccess<Self::State, Self::Internal>,
    ) -> Result<(), EventError>;
}

/// A processor's access to the view's state while it handles one event.
pub trait StateAccess<S, I> {
    /// A copy of the key's value.
    fn get(&mut self, key: &str) -> Result<Option<S>, EventError>;
    /// The key's value, borrowed (no copy).
    fn peek(&mut self, key: &str) -> Result<Option<&S>, EventError>;
    /// Moves the value out (no copy); put or delete the key afterwards.
    fn take(&mut self, key: &str) -> Result<Option<S>, EventError>;
    fn put(&mut self, key: &str, value: S);
    fn delete(&mut self, key: &str);
    fn get_internal(&mut self, key: &str) -> Result<Option<I>, EventError>;
    fn peek_internal(&mut self, key: &str) -> Result<Option<&I>, EventError>;
    /// Moves an internal value out; put or delete it afterwards.
    fn take_internal(&mut self, key: &str) -> Result<Option<I>, EventError>;
    fn put_internal(&mut self, key: &str, value: I);
    fn delete_internal(&mut self, key: &str);
}

/// What happens to an event the view cannot apply (bad payload, unknown schema version,
/// failing upcaster, logic error).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Stop the view version at that event, with an error naming topic/partition/offset.
    #[default]
    Stop,
    /// Skip the event and append it, with the reason, to this dead-letter topic.
    DeadLetter(String),
}

/// One version of a view.
#[derive(Clone)]
pub struct View {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) inputs: Vec<String>,
    pub(crate) logic: Arc<dyn Logic>,
    pub(crate) on_error: ErrorPolicy,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("inputs", &self.inputs)
            .finish()
    }
}

impl View {
    pub fn reducer<R: Reducer>(name: &str, version: u32, inputs: &[&str], reducer: R) -> Self {
        Self::processor(name, version, inputs, ReducerProcessor(reducer))
    }

    pub fn processor<P: Processor>(name: &str, version: u32, inputs: &[&str], processor: P) -> Self {
        Self {
            name: name.to_owned(),
            version,
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            logic: Arc::new(ProcessorLogic(Arc::new(processor))),
            on_error: ErrorPolicy::Stop,
        }
    }

    /// Skip events the view cannot apply, recording them in `topic`.
    pub fn dead_letter(mut self, topic: &str) -> Self {
        self.on_error = ErrorPolicy::DeadLetter(topic.to_owned());
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(ViewError::Definition { view: self.name.clone(), reason });
        if self.name.is_empty()
            || self.name.len() > VIEW_NAME_BYTES_MAX
            || !self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return fail(format!("a view name is 1..={VIEW_NAME_BYTES_MAX} characters of a-z, 0-9, '_' and '-'"));
        }
        if self.version == 0 {
            return fail("versions start at 1".to_owned());
        }
        if self.inputs.is_empty() {
            return fail("a view needs at least one input topic".to_owned());
        }
        if let ErrorPolicy::DeadLetter(topic) = &self.on_error {
            kappa_log::log::validate_topic_name(topic).map_err(|e| ViewError::Definition {
                view: self.name.clone(),
                reason: format!("dead-letter topic: {e}"),
            })?;
        }
        Ok(())
    }
}

/// Reads committed state that is not in the applier's cache.
pub(crate) trait StoreRead {
    fn get(&self, scope: Scope, key: &str) -> Result<Option<Vec<u8>>, EventError>;
}

/// A view's logic with its state type erased, so the engine can hold many kinds.
pub(crate) trait Logic: Send + Sync {
    fn applier(&self) -> Box<dyn Applier>;
}

/// Applies events to a write-back cache of typed state over the store.
pub(crate) trait Applier: Send {
    fn apply(&mut self, event: &Event, store: &dyn StoreRead) -> Result<(), EventError>;
    /// Serializes the keys changed since the last call, marking them clean.
    fn take_changes(&mut self) -> Result<Vec<Change>, EventError>;
    /// Forgets everything cached, including unsaved changes.
    fn discard(&mut self);
    /// Keeps the cache under `entries_max` entries by dropping clean ones.
    fn trim(&mut self, entries_max: usize);
    fn cached_entries(&self) -> usize;
    /// Keys changed since the last `take_changes`.
    fn dirty_entries(&self) -> usize;
    /// A hint that an event for state key `key` comes soon: starts loading its cached
    /// entry into the CPU cache. Only a hint — the key may be the wrong one.
    fn prefetch(&self, key: &[u8]);
    /// The serialized size of the key's value when the last event applied put or took it
    /// (None when it did not, or deleted the key).
    fn touched_value_bytes(&self, scope: Scope, key: &str) -> Result<Option<usize>, EventError>;
}

struct ReducerProcessor<R>(R);

impl<R: Reducer> Processor for ReducerProcessor<R> {
    type State = R::State;
    type Internal = ();

    fn process(&self, event: &Event, state: &mut dyn StateAccess<Self::State, ()>) -> Result<(), EventError> {
        let Some(key) = self.0.key(event) else { return Ok(()) };
        let current = state.take(&key)?;
        match self.0.apply(current, event)? {
            Some(next) => state.put(&key, next),
            None => state.delete(&key),
        }
        Ok(())
    }
}

struct ProcessorLogic<P>(Arc<P>);

impl<P: Processor> Logic for ProcessorLogic<P> {
    fn applier(&self) -> Box<dyn Applier> {
        Box::new(TypedApplier { processor: self.0.clone(), entries: Entries::default(), dirty: 0, event: 0 })
    }
}

/// One scope's cached value of a key.
struct Slot<T> {
    value: Option<T>,
    /// False until the store was read for this scope (the entry may exist for the other).
    loaded: bool,
    dirty: bool,
    /// The applier's `event` when it was last put or taken.
    touched: u64,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self { value: None, loaded: false, dirty: false, touched: 0 }
    }
}

/// A key's cached view value and internal value in one entry: processors often touch
/// both for the same key (a count and its bookkeeping), and one lookup misses the CPU
/// cache where two would miss twice.
struct Entry<S, I> {
    view: Slot<S>,
    internal: Slot<I>,
}

impl<S, I> Default for Entry<S, I> {
    fn default() -> Self {
        Self { view: Slot::default(), internal: Slot::default() }
    }
}

impl<S, I> Entry<S, I> {
    fn is_dirty(&self) -> bool {
        self.view.dirty || self.internal.dirty
    }
}

/// The applier's cache: each key's entry, looked up by hash. A table rather than a map so
/// that [`Entries::prefetch`] can find where a key's entry lives without reading it.
struct Entries<S, I> {
    table: HashTable<(CompactString, Entry<S, I>)>,
    hasher: DefaultHashBuilder,
}

impl<S, I> Default for Entries<S, I> {
    fn default() -> Self {
        Self { table: HashTable::new(), hasher: DefaultHashBuilder::default() }
    }
}

impl<S, I> Entries<S, I> {
    /// The key's entry, inserted empty when missing.
    fn entry(&mut self, key: &str) -> &mut Entry<S, I> {
        let hasher = &self.hasher;
        let (_, entry) = self
            .table
            .entry(
                hash_key(hasher, key.as_bytes()),
                |(k, _)| k.as_str() == key,
                |(k, _)| hash_key(hasher, k.as_bytes()),
            )
            .or_insert_with(|| (CompactString::from(key), Entry::default()))
            .into_mut();
        entry
    }

    fn get(&self, key: &str) -> Option<&Entry<S, I>> {
        self.table.find(hash_key(&self.hasher, key.as_bytes()), |(k, _)| k.as_str() == key).map(|(_, entry)| entry)
    }

    /// Asks the CPU to load the cache lines of `key`'s entry, if it has one, without
    /// waiting for them: the probe reads only the table's control bytes (which stay in
    /// cache), never an entry. A rebuild over more keys than the CPU cache holds misses
    /// on nearly every entry; started a few events ahead, the load overlaps other work.
    fn prefetch(&self, key: &[u8]) {
        self.table.find(hash_key(&self.hasher, key), |candidate| {
            prefetch_lines(candidate);
            false
        });
    }
}

/// Keys are hashed as bytes, so a hint from a record key needs no UTF-8 check.
fn hash_key(hasher: &DefaultHashBuilder, key: &[u8]) -> u64 {
    hasher.hash_one(key)
}

/// Cache lines of an entry prefetched at most: a key and both slots of a small state.
const PREFETCH_LINES_MAX: usize = 4;

/// Starts loading the cache lines `value` spans (up to `PREFETCH_LINES_MAX`).
#[cfg(target_arch = "x86_64")]
fn prefetch_lines<T>(value: &T) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let start = (value as *const T).cast::<i8>();
    let lines = (start as usize % 64 + size_of::<T>()).div_ceil(64).min(PREFETCH_LINES_MAX);
    for line in 0..lines {
        // SAFETY: SSE is part of every x86_64 CPU, and a prefetch reads nothing the
        // program sees: it cannot fault, even on an address that is not mapped.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line * 64)) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_lines<T>(_value: &T) {}

struct TypedApplier<P: Processor> {
    processor: Arc<P>,
    entries: Entries<P::State, P::Internal>,
    /// Upper bound of the slots marked dirty since the last `take_changes`.
    dirty: usize,
    /// Events applied (numbered from 1), to tell which slots the last one changed.
    event: u64,
}

struct Access<'a, S, I> {
    entries: &'a mut Entries<S, I>,
    store: &'a dyn StoreRead,
    dirty: &'a mut usize,
    event: u64,
}

/// Which of an entry's two slots a scope means.
trait ScopeSlot<S, I> {
    type Value: DeserializeOwned;
    const SCOPE: Scope;
    fn slot(entry: &mut Entry<S, I>) -> &mut Slot<Self::Value>;
}

struct ViewScope;
struct InternalScope;

impl<S: DeserializeOwned, I> ScopeSlot<S, I> for ViewScope {
    type Value = S;
    const SCOPE: Scope = Scope::View;
    fn slot(entry: &mut Entry<S, I>) -> &mut Slot<S> {
        &mut entry.view
    }
}

impl<S, I: DeserializeOwned> ScopeSlot<S, I> for InternalScope {
    type Value = I;
    const SCOPE: Scope = Scope::Internal;
    fn slot(entry: &mut Entry<S, I>) -> &mut Slot<I> {
        &mut entry.internal
    }
}

/// The key's slot in scope `W`, read from the store the first time.
fn load<'m, S, I, W: ScopeSlot<S, I>>(
    entries: &'m mut Entries<S, I>,
    store: &dyn StoreRead,
    key: &str,
) -> Result<&'m mut Slot<W::Value>, EventError> {
    let slot = W::slot(entries.entry(key));
    if !slot.loaded {
        slot.value = match store.get(W::SCOPE, key)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                EventError(format!("the stored value of key '{key}' does not fit the view's state type ({e}); bump the view's version when its state shape changes"))
            })?),
            None => None,
        };
        slot.loaded = true;
    }
    Ok(slot)
}

fn store_in<S, I, W: ScopeSlot<S, I>>(access: &mut Access<'_, S, I>, key: &str, value: Option<W::Value>) {
    let slot = W::slot(access.entries.entry(key));
    slot.value = value;
    slot.loaded = true;
    slot.touched = access.event;
    *access.dirty += usize::from(!slot.dirty);
    slot.dirty = true;
}

fn take_from<S, I, W: ScopeSlot<S, I>>(
    access: &mut Access<'_, S, I>,
    key: &str,
) -> Result<Option<W::Value>, EventError> {
    let slot = load::<S, I, W>(access.entries, access.store, key)?;
    if slot.value.is_some() {
        // Taking a value marks the slot changed: the caller puts or deletes right after.
        *access.dirty += usize::from(!slot.dirty);
        slot.dirty = true;
        slot.touched = access.event;
    }
    Ok(slot.value.take())
}

impl<S: Clone + DeserializeOwned, I: Clone + DeserializeOwned> StateAccess<S, I> for Access<'_, S, I> {
    fn get(&mut self, key: &str) -> Result<Option<S>, EventError> {
        Ok(load::<S, I, ViewScope>(self.entries, self.store, key)?.value.clone())
    }

    fn peek(&mut self, key: &str) -> Result<Option<&S>, EventError> {
        Ok(load::<S, I, ViewScope>(self.entries, self.store, key)?.value.as_ref())
    }

    fn take(&mut self, key: &str) -> Result<Option<S>, EventError> {
        take_from::<S, I, ViewScope>(self, key)
    }

    fn put(&mut self, key: &str, value: S) {
        store_in::<S, I, ViewScope>(self, key, Some(value));
    }

    fn delete(&mut self, key: &str) {
        store_in::<S, I, ViewScope>(self, key, None);
    }

    fn get_internal(&mut self, key: &str) -> Result<Option<I>, EventError> {
        Ok(load::<S, I, InternalScope>(self.entries, self.store, key)?.value.clone())
    }

    fn peek_internal(&mut self, key: &str) -> Result<Option<&I>, EventError> {
        Ok(load::<S, I, InternalScope>(self.entries, self.store, key)?.value.as_ref())
    }

    fn take_internal(&mut self, key: &str) -> Result<Option<I>, EventError> {
        take_from::<S, I, InternalScope>(self, key)
    }

    fn put_internal(&mut self, key: &str, value: I) {
        store_in::<S, I, InternalScope>(self, key, Some(value));
    }

    fn delete_internal(&mut self, key: &str) {
        store_in::<S, I, InternalScope>(self, key, None);
    }
}

/// The slot's change, if it is dirty (marking it clean).
fn drain_slot<T: Serialize>(slot: &mut Slot<T>, scope: Scope, key: &str) -> Result<Option<Change>, EventError> {
    if !slot.dirty {
        return Ok(None);
    }
    slot.dirty = false;
    let value = slot.value.as_ref().map(serde_json::to_vec).transpose()?;
    Ok(Some(Change { scope, key: key.to_owned(), value }))
}

impl<P: Processor> Applier for TypedApplier<P> {
    fn apply(&mut self, event: &Event, store: &dyn StoreRead) -> Result<(), EventError> {
        self.event += 1;
        let mut access = Access { entries: &mut self.entries, store, dirty: &mut self.dirty, event: self.event };
        self.processor.process(event, &mut access)
    }

    fn take_changes(&mut self) -> Result<Vec<Change>, EventError> {
        let mut changes = Vec::with_capacity(self.dirty);
        for (key, entry) in self.entries.table.iter_mut().filter(|(_, entry)| entry.is_dirty()) {
            changes.extend(drain_slot(&mut entry.view, Scope::View, key)?);
            changes.extend(drain_slot(&mut entry.internal, Scope::Internal, key)?);
        }
        self.dirty = 0;
        // A deterministic changelog order (table order is not).
        changes.sort_unstable_by(|a, b| (a.scope, &a.key).cmp(&(b.scope, &b.key)));
        Ok(changes)
    }

    fn discard(&mut self) {
        self.entries.table.clear();
        self.dirty = 0;
    }

    fn trim(&mut self, entries_max: usize) {
        if self.cached_entries() > entries_max {
            // Drop about half of the clean entries (an arbitrary half: table order).
            let mut keep = false;
            self.entries.table.retain(|(_, entry)| {
                keep = !keep;
                entry.is_dirty() || keep
            });
        }
    }

    fn cached_entries(&self) -> usize {
        self.entries.table.len()
    }

    fn dirty_entries(&self) -> usize {
        self.dirty
    }

    fn prefetch(&self, key: &[u8]) {
        self.entries.prefetch(key);
    }

    fn touched_value_bytes(&self, scope: Scope, key: &str) -> Result<Option<usize>, EventError> {
        let Some(entry) = self.entries.get(key) else { return Ok(None) };
        match scope {
            Scope::View => touched_bytes(&entry.view, self.event),
            Scope::Internal => touched_bytes(&entry.internal, self.event),
        }
    }
}

/// The serialized size of the slot's value if event `event` changed it.
fn touched_bytes<T: Serialize>(slot: &Slot<T>, event: u64) -> Result<Option<usize>, EventError> {
    let Some(value) = slot.value.as_ref().filter(|_| slot.touched == event) else { return Ok(None) };
    Ok(Some(json_bytes(value)?))
}

/// How many bytes `value` takes as JSON, counted without building the text (view values'
/// limits are in JSON bytes; so are the live API's snapshot limits).
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<usize> {
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, value)?;
    Ok(counter.0)
}

/// Counts what is written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Puts each event's offset under its record key.
    struct OffsetByKey;

    impl Processor for OffsetByKey {
        type State = i64;
        type Internal = ();

        fn process(&self, event: &Event, state: &mut dyn StateAccess<i64, ()>) -> Result<(), EventError> {
            state.put(event.key_str().unwrap_or_default(), event.offset);
            Ok(())
        }
    }

    struct EmptyStore;

    impl StoreRead for EmptyStore {
        fn get(&self, _: Scope, _: &str) -> Result<Option<Vec<u8>>, EventError> {
            Ok(None)
        }
    }

    fn event(key: &str, offset: i64) -> Event {
        Event::new("t", 0, offset, Some(key), Some("T"), 1, None)
    }

    #[test]
    fn changes_are_taken_once_in_key_order_and_a_trim_keeps_every_dirty_entry() {
        let mut applier = ProcessorLogic(Arc::new(OffsetByKey)).applier();
        for i in 0..10 {
            applier.apply(&event(&format!("k{i}"), i), &EmptyStore).unwrap();
        }
        let changes = applier.take_changes().unwrap();
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
        assert_eq!(changes[3].value.as_deref(), Some(&b"3"[..]));
        assert!(applier.take_changes().unwrap().is_empty(), "taken changes leave the entries clean");

        applier.apply(&event("k0", 42), &EmptyStore).unwrap();
        assert_eq!(applier.dirty_entries(), 1);
        applier.trim(5);
        let cached = applier.cached_entries();
        assert!((5..10).contains(&cached), "about half of the clean entries dropped, {cached} left");
        let changes = applier.take_changes().unwrap();
        assert_eq!(changes.len(), 1, "the dirty entry survives the trim");
        assert_eq!((changes[0].key.as_str(), changes[0].value.as_deref()), ("k0", Some(&b"42"[..])));
    }

    #[test]
    fn the_cache_finds_what_it_inserted_and_a_prefetch_changes_nothing() {
        let mut entries: Entries<u64, ()> = Entries::default();
        entries.prefetch(b"absent");
        assert_eq!(entries.table.len(), 0, "a prefetch of a missing key inserts nothing");
        for key in ["c1", "c2", "caf\u{e9}"] {
            entries.entry(key).view.value = Some(key.len() as u64);
        }
        entries.entry("c1").view.value = Some(7);
        for key in ["c1", "c2", "caf\u{e9}", "absent"] {
            entries.prefetch(key.as_bytes());
        }
        entries.prefetch(b"\xff not UTF-8");
        assert_eq!(entries.table.len(), 3);
        assert_eq!(entries.get("c1").and_then(|e| e.view.value), Some(7));
        assert_eq!(entries.get("caf\u{e9}").and_then(|e| e.view.value), Some(5), "five bytes");
        assert!(entries.get("c3").is_none());
    }
}
