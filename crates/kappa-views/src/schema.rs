//! Event schemas: the current version of each event type and the upcasters that lift older
//! versions to it, so views only ever see current shapes — and a replay from offset 0 works
//! against every shape ever written.

use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use hashbrown::HashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::EventError;
use crate::event::{Event, TypedPayload};

/// Lifts a payload from one version to the next.
#[derive(Clone)]
enum Upcaster {
    /// On a JSON value: any shape in, any shape out.
    Value(Arc<dyn Fn(Value) -> Result<Value, EventError> + Send + Sync>),
    /// Between two typed shapes: decodes the event's payload into the old type and returns
    /// the new one as a Rust value, which a view knowing its type reads without JSON
    /// ([`Event::payload_as`]) and any other reads as JSON encoded on demand. Builds no
    /// `Value`: a few allocations per event instead of one per field (BENCHMARKS.md, run 10).
    Typed(Arc<TypedUpcast>),
}

/// Decodes an event's payload as the old type and returns the new one.
type TypedUpcast = dyn Fn(&Event) -> Result<Arc<dyn TypedPayload>, EventError> + Send + Sync;

/// The registered event types. Types that were never registered pass through unchanged.
#[derive(Clone, Default)]
pub struct Schemas {
    /// Looked up for every event: hashed, not compared along a tree.
    types: HashMap<String, TypeSchema>,
}

#[derive(Clone, Default)]
struct TypeSchema {
    current: u32,
    /// from-version → the function producing from-version + 1.
    upcasters: BTreeMap<u32, Upcaster>,
}

impl Schemas {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares an event type and its current version (an event with a newer version stops
    /// the view: it was written by code this build does not know).
    pub fn event_type(mut self, name: &str, current_version: u32) -> Self {
        let entry = self.types.entry(name.to_owned()).or_default();
        entry.current = entry.current.max(current_version.max(1));
        self
    }

    /// Registers the upcaster from `from_version` to `from_version + 1` of `event_type`;
    /// the type's current version becomes at least `from_version + 1`.
    pub fn upcaster(
        mut self,
        event_type: &str,
        from_version: u32,
        upcast: impl Fn(Value) -> Result<Value, EventError> + Send + Sync + 'static,
    ) -> Self {
        let entry = self.types.entry(event_type.to_owned()).or_default();
        entry.current = entry.current.max(from_version + 1);
        entry.upcasters.insert(from_version, Upcaster::Value(Arc::new(upcast)));
        self
    }

    /// Like [`Self::upcaster`], between typed shapes: `upcast` gets the payload decoded as
    /// `Old` and returns the `New` one. Fields `Old` does not name are dropped.
    pub fn upcaster_typed<Old, New>(
        mut self,
        event_type: &str,
        from_version: u32,
        upcast: impl Fn(Old) -> Result<New, EventError> + Send + Sync + 'static,
    ) -> Self
    where
        Old: DeserializeOwned,
        New: Serialize + Send + Sync + 'static,
    {
        let entry = self.types.entry(event_type.to_owned()).or_default();
        entry.current = entry.current.max(from_version + 1);
        let typed = move |event: &Event| -> Result<Arc<dyn TypedPayload>, EventError> {
            let old = event.decode::<Old>()?.ok_or_else(|| EventError::new("a tombstone has no payload to upcast"))?;
            Ok(Arc::new(upcast(old)?))
        };
        entry.upcasters.insert(from_version, Upcaster::Typed(Arc::new(typed)));
        self
    }

    /// The current version of a registered type.
    pub fn current_version(&self, event_type: &str) -> Option<u32> {
        self.types.get(event_type).map(|t| t.current)
    }

    /// Lifts `event` to its type's current version, one step at a time. Tombstones carry no
    /// payload and are passed through.
    pub fn upcast(&self, mut event: Event) -> Result<Event, EventError> {
        self.upcast_in_place(&mut event)?;
        Ok(event)
    }

    /// [`Self::upcast`] without moving the event (a few hundred bytes) in and out: the
    /// engine upcasts every event it reads. On an error the event is spent (a JSON
    /// upcaster may have taken its payload): drop it, never apply or upcast it again.
    pub(crate) fn upcast_in_place(&self, event: &mut Event) -> Result<(), EventError> {
        let Some(schema) = event.event_type().and_then(|t| self.types.get(t)) else {
            return Ok(());
        };
        if event.version() == schema.current || (event.is_tombstone() && event.version() < schema.current) {
            return Ok(());
        }
        let name = CompactString::from(event.event_type().unwrap_or_default());
        if event.version() > schema.current {
            return Err(EventError(format!(
                "{} version {} is newer than this build knows (current version {}); deploy code that knows it, or skip the event with a dead-letter policy",
                name,
                event.version(),
                schema.current
            )));
        }
        while event.version() < schema.current {
            let version = event.version();
            let upcaster = schema
                .upcasters
                .get(&version)
                .ok_or_else(|| EventError(format!("no upcaster from {name} version {version} to {}", version + 1)))?;
            let failed = |e: EventError| EventError(format!("upcasting {name} from version {version} failed: {}", e.0));
            match upcaster {
                Upcaster::Value(upcast) => {
                    let payload = event.take_value()?.expect("not a tombstone");
                    event.set_value(upcast(payload).map_err(failed)?, version + 1);
                }
                Upcaster::Typed(upcast) => {
                    let value = upcast(event).map_err(failed)?;
                    event.set_typed(value, version + 1);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize)]
    struct V1 {
        cents: i64,
    }

    #[derive(Debug, PartialEq, Serialize)]
    struct V2 {
        value: i64,
        note: &'static str,
    }

    fn schemas() -> Schemas {
        Schemas::new().upcaster_typed("Paid", 1, |v1: V1| Ok(V2 { value: v1.cents, note: "from v1" }))
    }

    #[test]
    fn a_typed_upcast_is_read_as_its_type_or_as_the_same_json() {
        let v1 = Event::new("t", 0, 7, Some("k"), Some("Paid"), 1, Some(json!({"cents": 250})));
        let upcast = schemas().upcast(v1).unwrap();
        assert_eq!(upcast.version(), 2);
        assert_eq!(upcast.payload_as::<V2>(), Some(&V2 { value: 250, note: "from v1" }));
        assert_eq!(upcast.payload_as::<V1>().map(|v| v.cents), None, "only the upcaster's own type");
        let expected = json!({"value": 250, "note": "from v1"});
        assert_eq!(upcast.decode::<Value>().unwrap(), Some(expected.clone()));
        assert_eq!(upcast.payload().unwrap(), Some(&expected));
        assert_eq!(upcast.decode::<Value>().unwrap(), Some(expected.clone()), "decoding again after the parse");
        let copy = upcast.clone();
        assert_eq!(copy.payload_as::<V2>().map(|v| v.value), Some(250));
        assert_eq!(copy.payload().unwrap(), Some(&expected));
    }

    #[test]
    fn current_versions_and_other_types_pass_through_as_json() {
        let v2 = Event::new("t", 0, 8, Some("k"), Some("Paid"), 2, Some(json!({"value": 3, "note": "v2"})));
        let same = schemas().upcast(v2).unwrap();
        assert_eq!(same.payload_as::<V2>().map(|v| v.value), None, "written as v2: JSON, not a typed value");
        assert_eq!(same.decode::<Value>().unwrap(), Some(json!({"value": 3, "note": "v2"})));
    }
}
