//! Events: a log record decoded into event type, schema version and payload.
//!
//! Type and version come from the headers `kappa.type` / `kappa.version`; a record without
//! them (kafka-node's protocol version carries no headers) may name them in its payload's
//! `type` / `version` fields instead. A record without a version is version 1.

use std::sync::Arc;

use serde_json::Value;

use crate::backend::InputRecord;
use crate::error::EventError;

pub const TYPE_HEADER: &str = "kappa.type";
pub const VERSION_HEADER: &str = "kappa.version";
/// A payload's fields naming its type and version when the record has no headers.
pub const TYPE_FIELD: &str = "type";
pub const VERSION_FIELD: &str = "version";

/// One event as views see it: where it is in the log, what it is, and its payload
/// (already upcast to the current schema version when the view sees it).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// None for a record that names no type (e.g. a bare tombstone).
    pub event_type: Option<String>,
    pub version: u32,
    /// None for a tombstone (a record with a null value).
    pub payload: Option<Value>,
}

impl Event {
    /// The record key as UTF-8, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value of the last header called `name` as UTF-8 (None when absent, null or not UTF-8).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn is_tombstone(&self) -> bool {
        self.payload.is_none()
    }

    pub fn is_type(&self, event_type: &str) -> bool {
        self.event_type.as_deref() == Some(event_type)
    }

    /// A payload field as a string.
    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.payload.as_ref().and_then(|p| p.get(name)).and_then(Value::as_str)
    }
}

/// Turns record values into JSON values. JSON is the default; Avro or Protobuf decoders can
/// implement this to produce the same `Value` shape.
pub trait PayloadCodec: Send + Sync + 'static {
    fn decode(&self, bytes: &[u8]) -> Result<Value, EventError>;
}

/// Record values are JSON documents.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonCodec;

impl PayloadCodec for JsonCodec {
    fn decode(&self, bytes: &[u8]) -> Result<Value, EventError> {
        serde_json::from_slice(bytes).map_err(|e| EventError(format!("the value is not valid JSON: {e}")))
    }
}

/// Decodes one record into an event, before upcasting.
pub fn decode_event(topic: &Arc<str>, partition: i32, record: InputRecord, codec: &dyn PayloadCodec) -> Result<Event, EventError> {
    let payload = record.value.as_deref().map(|bytes| codec.decode(bytes)).transpose()?;
    let header = |name: &str| -> Option<&[u8]> {
        record.headers.iter().rev().find(|(key, _)| key == name).and_then(|(_, value)| value.as_deref())
    };
    let event_type = match header(TYPE_HEADER) {
        Some(bytes) => Some(
            std::str::from_utf8(bytes)
                .map_err(|_| EventError::new(format!("header {TYPE_HEADER} is not UTF-8")))?
                .to_owned(),
        ),
        None => payload.as_ref().and_then(|p| p.get(TYPE_FIELD)).and_then(Value::as_str).map(str::to_owned),
    };
    let version = match header(VERSION_HEADER) {
        Some(bytes) => parse_version(std::str::from_utf8(bytes).unwrap_or(""))
            .ok_or_else(|| EventError::new(format!("header {VERSION_HEADER} must be a positive integer")))?,
        None => match payload.as_ref().and_then(|p| p.get(VERSION_FIELD)) {
            None | Some(Value::Null) => 1,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {n}")))?,
            Some(Value::String(s)) => parse_version(s)
                .ok_or_else(|| EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {s:?}")))?,
            Some(other) => {
                return Err(EventError::new(format!("payload field '{VERSION_FIELD}' must be a positive integer, not {other}")));
            }
        },
    };
    Ok(Event {
        topic: topic.clone(),
        partition,
        offset: record.offset,
        timestamp: record.timestamp,
        key: record.key,
        headers: record.headers,
        event_type,
        version,
        payload,
    })
}

fn parse_version(text: &str) -> Option<u32> {
    text.trim().parse::<u32>().ok().filter(|v| *v > 0)
}
