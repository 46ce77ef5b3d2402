//! Events: a log record decoded into event type, schema version and payload.
//!
//! Type and version come from the headers `kappa.type` / `kappa.version`; a record without
//! them (kafka-node's protocol version carries no headers) may name them in its payload's
//! `type` / `version` fields instead. A record without a version is version 1.
//!
//! JSON payloads are parsed lazily: a view that decodes the payload into its own type
//! ([`Event::decode`]) never builds a `serde_json::Value`, and one that reads no payload
//! never parses it. A typed upcaster's result stays a Rust value: a view that knows its
//! type reads it as it is ([`Event::payload_as`]), and it is encoded as JSON only when
//! something asks for JSON.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use compact_str::CompactString;
use serde::Deserialize;
use serde_json::Value;

use crate::backend::{InputRecord, RecordHeaders};
use crate::error::EventError;

pub const TYPE_HEADER: &str = "kappa.type";
pub const VERSION_HEADER: &str = "kappa.version";
/// A payload's fields naming its type and version when the record has no headers.
pub const TYPE_FIELD: &str = "type";
pub const VERSION_FIELD: &str = "version";

/// One event as views see it: where it is in the log, what it is, and its payload
/// (already upcast to the current schema version when the view sees it).
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    key: Option<Bytes>,
    headers: RecordHeaders,
    /// Checked to be UTF-8 when decoded; short type names are stored inline.
    event_type: Option<CompactString>,
    version: u32,
    payload: Payload,
}

#[derive(Debug, Clone)]
enum Payload {
    /// A null record value.
    Tombstone,
    /// JSON bytes, parsed into a `Value` the first time one is asked for.
    Json(Bytes, OnceLock<Result<Value, EventError>>),
    /// Already a value: upcast, or from a codec that is not lazy.
    Value(Value),
    /// A typed upcaster's result.
    Typed(Typed),
}

/// A payload produced as a Rust value (by [`crate::Schemas::upcaster_typed`]).
pub trait TypedPayload: Any + Send + Sync {
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
}

impl<T: serde::Serialize + Any + Send + Sync> TypedPayload for T {
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// A typed payload and, once asked for, its JSON encoding and parse.
#[derive(Clone)]
struct Typed {
    value: Arc<dyn TypedPayload>,
    json: OnceLock<Result<Bytes, EventError>>,
    parsed: OnceLock<Result<Value, EventError>>,
}

impl Typed {
    fn json(&self) -> Result<&Bytes, EventError> {
        let encode = || {
            self.value
                .to_json()
                .map(Bytes::from)
                .map_err(|e| EventError(format!("encoding an upcast payload as JSON failed: {e}")))
        };
        self.json.get_or_init(encode).as_ref().map_err(Clone::clone)
    }

    fn parsed(&self) -> Result<&Value, EventError> {
        let bytes = self.json()?;
        self.parsed.get_or_init(|| parse_json(bytes)).as_ref().map_err(Clone::clone)
    }
}

impl fmt::Debug for Typed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed").field("json", &self.json.get()).finish_non_exhaustive()
    }
}

impl Event {
    /// An event built by hand (tests, tools); `payload` None is a tombstone.
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&str>,
        event_type: Option<&str>,
        version: u32,
        payload: Option<Value>,
    ) -> Self {
        Self {
            topic: Arc::from(topic),
            partition,
            offset,
            timestamp: 0,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            headers: RecordHeaders::default(),
            event_type: event_type.map(CompactString::from),
            version,
            payload: payload.map_or(Payload::Tombstone, Payload::Value),
        }
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The record key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Headers in wire order, duplicates kept.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.headers.iter()
    }

    /// The value of the last header called `name` (None when absent or null).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.last(name.as_bytes()).flatten()
    }

    /// [`Self::header`] as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// None for a record that names no type (e.g. a bare tombstone).
    pub fn event_type(&self) -> Option<&str> {
        self.event_type.as_deref()
    }

    pub fn is_type(&self, event_type: &str) -> bool {
        self.event_type.as_deref() == Some(event_type)
    }

    /// The schema version (after upcasting: the type's current version).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// True for a record with a null value.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.payload, Payload::Tombstone)
    }

    /// The payload as a JSON value (None for a tombstone); an error when it is not JSON.
    pub fn payload(&self) -> Result<Option<&Value>, EventError> {
        match &self.payload {
            Payload::Tombstone => Ok(None),
            Payload::Value(value) => Ok(Some(value)),
            Payload::Json(bytes, parsed) => match parsed.get_or_init(|| parse_json(bytes)) {
                Ok(value) => Ok(Some(value)),
                Err(e) => Err(e.clone()),
            },
            Payload::Typed(typed) => typed.parsed().map(Some),
        }
    }

    /// The payload as the Rust value a typed upcaster produced, when it is a `T`: no JSON
    /// is encoded or parsed. None for any other payload (read it with [`Self::decode`]).
    pub fn payload_as<T: Any>(&self) -> Option<&T> {
        match &self.payload {
            Payload::Typed(typed) => (&*typed.value as &dyn Any).downcast_ref::<T>(),
            _ => None,
        }
    }

    /// The payload decoded into `T` straight from its bytes (None for a tombstone).
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<Option<T>, EventError> {
        match &self.payload {
            Payload::Tombstone => Ok(None),
            Payload::Value(value) => T::deserialize(value).map(Some).map_err(|e| self.decode_error(e)),
            Payload::Json(bytes, parsed) => match parsed.get() {
                Some(Ok(value)) => T::deserialize(value).map(Some).map_err(|e| self.decode_error(e)),
                _ => serde_json::from_str(json_text(bytes)?).map(Some).map_err(|e| self.decode_error(e)),
            },
            Payload::Typed(typed) => match typed.parsed.get() {
                Some(Ok(value)) => T::deserialize(value).map(Some).map_err(|e| self.decode_error(e)),
                _ => serde_json::from_str(json_text(typed.json()?)?).map(Some).map_err(|e| self.decode_error(e)),
            },
        }
    }

    fn decode_error(&self, e: serde_json::Error) -> EventError {
        let what = self.event_type().unwrap_or("event");
        if e.is_syntax() || e.is_eof() {
            EventError(format!("the value is not valid JSON: {e}"))
        } else {
            EventError(format!("{what} v{} payload does not have the expected shape: {e}", self.version))
        }
    }

    /// A payload field as a string (None when absent, not a string, or not JSON).
    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.payload().ok().flatten().and_then(|p| p.get(name)).and_then(Value::as_str)
    }

    /// Takes the payload as a value, for upcasting.
    pub(crate) fn take_value(&mut self) -> Result<Option<Value>, EventError> {
        match std::mem::replace(&mut self.payload, Payload::Tombstone) {
            Payload::Tombstone => Ok(None),
            Payload::Value(value) => Ok(Some(value)),
            Payload::Json(bytes, parsed) => match parsed.into_inner() {
                Some(result) => result.map(Some),
                None => parse_json(&bytes).map(Some),
            },
            Payload::Typed(typed) => typed.parsed().cloned().map(Some),
        }
    }

    /// A typed upcaster's result, kept as it is.
    pub(crate) fn set_typed(&mut self, value: Arc<dyn TypedPayload>, version: u32) {
        self.payload = Payload::Typed(Typed { value, json: OnceLock::new(), parsed: OnceLock::new() });
        self.version = version;
    }

    pub(crate) fn set_value(&mut self, value: Value, version: u32) {
        self.payload = Payload::Value(value);
        self.version = version;
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, EventError> {
    serde_json::from_str(json_text(bytes)?).map_err(|e| EventError(format!("the value is not valid JSON: {e}")))
}

/// The payload as text, checked to be UTF-8 once (JSON is UTF-8, RFC 8259): parsed from a
/// `&str`, serde_json does not check each string again, as it does parsing bytes (about ten
/// strings, keys included, in a small event).
fn json_text(bytes: &[u8]) -> Result<&str, EventError> {
    std::str::from_utf8(bytes).map_err(|e| EventError(format!("the value is not valid JSON: it is not UTF-8 ({e})")))
}

/// Turns record values into JSON values. JSON is the default (parsed lazily); Avro or
/// Protobuf decoders can implement `decode` to produce the same `Value` shape.
pub trait PayloadCodec: Send + Sync + 'static {
    fn decode(&self, bytes: &[u8]) -> Result<Value, EventError>;

    /// True when record values are JSON text that can be parsed on demand.
    fn is_lazy_json(&self) -> bool {
        false
    }
}

/// Record values are JSON documents.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonCodec;

impl PayloadCodec for JsonCodec {
    fn decode(&self, bytes: &[u8]) -> Result<Value, EventError> {
        parse_json(bytes)
    }

    fn is_lazy_json(&self) -> bool {
        true
    }
}

/// Decodes one record into an event, before upcasting.
pub fn decode_event(
    topic: &Arc<str>,
    partition: i32,
    record: InputRecord,
    codec: &dyn PayloadCodec,
) -> Result<Event, EventError> {
    let payload = match record.value {
        None => Payload::Tombstone,
        Some(bytes) if codec.is_lazy_json() => Payload::Json(bytes, OnceLock::new()),
        Some(bytes) => Payload::Value(codec.decode(&bytes)?),
    };
    let mut event = Event {
        topic: topic.clone(),
        partition,
        offset: record.offset,
        timestamp: record.timestamp,
        key: record.key,
        headers: record.headers,
        event_type: None,
        version: 1,
        payload,
    };
    // One pass over the headers for both (the last of each name wins, as in Kafka).
    let (mut type_header, mut version_header) = (None, None);
    for (name, value) in event.headers.iter() {
        if name == TYPE_HEADER.as_bytes() {
            type_header = Some(value);
        } else if name == VERSION_HEADER.as_bytes() {
            version_header = Some(value);
        }
    }
    event.event_type = match type_header.flatten() {
        Some(bytes) => Some(
            CompactString::from_utf8(bytes)
                .map_err(|_| EventError::new(format!("header {TYPE_HEADER} is not UTF-8")))?,
        ),
        None => event.field_str(TYPE_FIELD).map(CompactString::from),
    };
    event.version = match version_header.flatten() {
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(parse_version)
            .ok_or_else(|| EventError::new(format!("header {VERSION_HEADER} must be a positive integer")))?,
        None if type_header.flatten().is_some() => 1,
        None => version_field(&event)?,
    };
    Ok(event)
}

/// The payload's `version` field, for records without headers (1 when absent).
fn version_field(event: &Event) -> Result<u32, EventError> {
    let Ok(Some(payload)) = event.payload() else { return Ok(1) };
    match payload.get(VERSION_FIELD) {
        None | Some(Value::Null) => Ok(1),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0).ok_or_else(|| {
            EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {n}"))
        }),
        Some(Value::String(s)) => parse_version(s).ok_or_else(|| {
            EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {s:?}"))
        }),
        Some(other) => {
            Err(EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {other}")))
        }
    }
}

fn parse_version(text: &str) -> Option<u32> {
    text.trim().parse::<u32>().ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_with_value(value: &[u8]) -> Event {
        let record = InputRecord {
            offset: 3,
            timestamp: 0,
            key: None,
            value: Some(Bytes::copy_from_slice(value)),
            headers: vec![(Bytes::from_static(TYPE_HEADER.as_bytes()), Some(Bytes::from_static(b"T")))].into(),
        };
        decode_event(&Arc::from("t"), 0, record, &JsonCodec).unwrap()
    }

    #[derive(Debug, Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
    }

    #[test]
    fn payloads_are_utf8_json_even_where_a_view_skips_the_field() {
        let good = event_with_value("{\"name\":\"caf\u{e9}\",\"skipped\":\"\\u00e9\"}".as_bytes());
        assert_eq!(good.decode::<Named>().unwrap().unwrap().name, "caf\u{e9}");
        assert_eq!(good.payload().unwrap().unwrap()["skipped"], "\u{e9}");

        let bad = event_with_value(b"{\"name\":\"ok\",\"skipped\":\"\xff\"}");
        let error = bad.decode::<Named>().expect_err("invalid UTF-8 is not JSON");
        assert!(error.0.contains("not valid JSON") && error.0.contains("not UTF-8"), "{error}");
        let error = bad.payload().expect_err("invalid UTF-8 is not JSON");
        assert!(error.0.contains("not UTF-8"), "{error}");
    }
}
