//! How an application defines a view: a reducer (one key per event, a pure fold) or a
//! general processor (read and write any key), with a name, a version and input topics.

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use std::sync::Arc;

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

/// A store with nothing in it (as-of replays start from empty state).
pub(crate) struct EmptyStore;

impl StoreRead for EmptyStore {
    fn get(&self, _: Scope, _: &str) -> Result<Option<Vec<u8>>, EventError> {
        Ok(None)
    }
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
    /// Every view key's current value, serialized (as-of replays read their result here).
    fn view_values(&self) -> Result<Vec<(String, Vec<u8>)>, EventError>;
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
        Box::new(TypedApplier { processor: self.0.clone(), view: HashMap::new(), internal: HashMap::new(), dirty: 0 })
    }
}

struct Slot<T> {
    value: Option<T>,
    dirty: bool,
}

struct TypedApplier<P: Processor> {
    processor: Arc<P>,
    view: HashMap<String, Slot<P::State>>,
    internal: HashMap<String, Slot<P::Internal>>,
    /// Upper bound of the slots marked dirty since the last `take_changes`.
    dirty: usize,
}

struct Access<'a, S, I> {
    view: &'a mut HashMap<String, Slot<S>>,
    internal: &'a mut HashMap<String, Slot<I>>,
    store: &'a dyn StoreRead,
    dirty: &'a mut usize,
}

fn load<'m, T: DeserializeOwned>(
    map: &'m mut HashMap<String, Slot<T>>,
    store: &dyn StoreRead,
    scope: Scope,
    key: &str,
) -> Result<&'m mut Slot<T>, EventError> {
    match map.entry_ref(key) {
        EntryRef::Occupied(slot) => Ok(slot.into_mut()),
        EntryRef::Vacant(vacant) => {
            let value = match store.get(scope, key)? {
                Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                    EventError(format!("the stored value of key '{key}' does not fit the view's state type ({e}); bump the view's version when its state shape changes"))
                })?),
                None => None,
            };
            Ok(vacant.insert(Slot { value, dirty: false }))
        }
    }
}

fn store_in<T>(map: &mut HashMap<String, Slot<T>>, dirty: &mut usize, key: &str, value: Option<T>) {
    match map.entry_ref(key) {
        EntryRef::Occupied(mut slot) => {
            let slot = slot.get_mut();
            slot.value = value;
            *dirty += usize::from(!slot.dirty);
            slot.dirty = true;
        }
        EntryRef::Vacant(vacant) => {
            vacant.insert(Slot { value, dirty: true });
            *dirty += 1;
        }
    }
}

fn take_from<T: DeserializeOwned>(
    map: &mut HashMap<String, Slot<T>>,
    dirty: &mut usize,
    store: &dyn StoreRead,
    scope: Scope,
    key: &str,
) -> Result<Option<T>, EventError> {
    let slot = load(map, store, scope, key)?;
    if slot.value.is_some() {
        // Taking a value marks the slot changed: the caller puts or deletes right after.
        *dirty += usize::from(!slot.dirty);
        slot.dirty = true;
    }
    Ok(slot.value.take())
}

impl<S: Clone + DeserializeOwned, I: Clone + DeserializeOwned> StateAccess<S, I> for Access<'_, S, I> {
    fn get(&mut self, key: &str) -> Result<Option<S>, EventError> {
        Ok(load(self.view, self.store, Scope::View, key)?.value.clone())
    }

    fn peek(&mut self, key: &str) -> Result<Option<&S>, EventError> {
        Ok(load(self.view, self.store, Scope::View, key)?.value.as_ref())
    }

    fn take(&mut self, key: &str) -> Result<Option<S>, EventError> {
        take_from(self.view, self.dirty, self.store, Scope::View, key)
    }

    fn put(&mut self, key: &str, value: S) {
        store_in(self.view, self.dirty, key, Some(value));
    }

    fn delete(&mut self, key: &str) {
        store_in(self.view, self.dirty, key, None);
    }

    fn get_internal(&mut self, key: &str) -> Result<Option<I>, EventError> {
        Ok(load(self.internal, self.store, Scope::Internal, key)?.value.clone())
    }

    fn peek_internal(&mut self, key: &str) -> Result<Option<&I>, EventError> {
        Ok(load(self.internal, self.store, Scope::Internal, key)?.value.as_ref())
    }

    fn take_internal(&mut self, key: &str) -> Result<Option<I>, EventError> {
        take_from(self.internal, self.dirty, self.store, Scope::Internal, key)
    }

    fn put_internal(&mut self, key: &str, value: I) {
        store_in(self.internal, self.dirty, key, Some(value));
    }

    fn delete_internal(&mut self, key: &str) {
        store_in(self.internal, self.dirty, key, None);
    }
}

fn drain_dirty<T: Serialize>(
    map: &mut HashMap<String, Slot<T>>,
    scope: Scope,
    out: &mut Vec<Change>,
) -> Result<(), EventError> {
    for (key, slot) in map.iter_mut().filter(|(_, slot)| slot.dirty) {
        slot.dirty = false;
        let value = slot.value.as_ref().map(serde_json::to_vec).transpose()?;
        out.push(Change { scope, key: key.clone(), value });
    }
    Ok(())
}

impl<P: Processor> Applier for TypedApplier<P> {
    fn apply(&mut self, event: &Event, store: &dyn StoreRead) -> Result<(), EventError> {
        let mut access = Access { view: &mut self.view, internal: &mut self.internal, store, dirty: &mut self.dirty };
        self.processor.process(event, &mut access)
    }

    fn take_changes(&mut self) -> Result<Vec<Change>, EventError> {
        let mut changes = Vec::new();
        drain_dirty(&mut self.view, Scope::View, &mut changes)?;
        drain_dirty(&mut self.internal, Scope::Internal, &mut changes)?;
        self.dirty = 0;
        // A deterministic changelog order (HashMap order is not).
        changes.sort_unstable_by(|a, b| (a.scope, &a.key).cmp(&(b.scope, &b.key)));
        Ok(changes)
    }

    fn discard(&mut self) {
        self.view.clear();
        self.internal.clear();
        self.dirty = 0;
    }

    fn trim(&mut self, entries_max: usize) {
        if self.cached_entries() > entries_max {
            // Drop about half of the clean entries (an arbitrary half: HashMap order).
            let mut keep = false;
            self.view.retain(|_, slot| {
                keep = !keep;
                slot.dirty || keep
            });
            self.internal.retain(|_, slot| {
                keep = !keep;
                slot.dirty || keep
            });
        }
    }

    fn cached_entries(&self) -> usize {
        self.view.len() + self.internal.len()
    }

    fn dirty_entries(&self) -> usize {
        self.dirty
    }

    fn view_values(&self) -> Result<Vec<(String, Vec<u8>)>, EventError> {
        let mut out = Vec::new();
        for (key, slot) in &self.view {
            if let Some(value) = &slot.value {
                out.push((key.clone(), serde_json::to_vec(value)?));
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
