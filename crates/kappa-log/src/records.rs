//! Records inside a RecordBatch v2: building batches (producers' encoding, used by tests,
//! benchmarks and internal topics) and reading records back (compaction, key indexes).
//!
//! Record layout (all integers zig-zag varints unless noted):
//! ```text
//! length, attributes (i8), timestamp_delta (varlong), offset_delta, key_length, key,
//! value_length, value, header_count, [header_key_length, header_key, header_value_length, header_value]...
//! ```
//! A length of -1 means null.

use std::borrow::Cow;

use thiserror::Error;

use crate::batch::{self, BatchError, BatchHeader, Compression, HEADER_BYTES, LENGTH_PREFIX_BYTES, MAGIC_V2};
use crate::compression::{compress, decompress};

/// One record to put into a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    pub timestamp: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl NewRecord {
    pub fn new(key: Option<&[u8]>, value: Option<&[u8]>, timestamp: i64) -> Self {
        Self { timestamp, key: key.map(<[u8]>::to_vec), value: value.map(<[u8]>::to_vec), headers: Vec::new() }
    }

    pub fn header(mut self, name: &str, value: Option<&[u8]>) -> Self {
        self.headers.push((name.to_owned(), value.map(<[u8]>::to_vec)));
        self
    }
}

/// Builds one RecordBatch v2 the way a producer would.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    pub base_offset: i64,
    pub compression: Compression,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
    pub control: bool,
    pub partition_leader_epoch: i32,
    records: Vec<NewRecord>,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self {
            base_offset: 0,
            compression: Compression::None,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
            control: false,
            partition_leader_epoch: -1,
            records: Vec::new(),
        }
    }
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the batch as coming from an idempotent producer.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    pub fn transactional(mut self, transactional: bool) -> Self {
        self.transactional = transactional;
        self
    }

    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    pub fn record(mut self, record: NewRecord) -> Self {
        self.records.push(record);
        self
    }

    pub fn push(&mut self, record: NewRecord) {
        self.records.push(record);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// A transaction marker batch as the transaction coordinator has the partition leader
    /// write it: transactional + control, no sequence, one record whose key is
    /// `(version 0, type)` and whose value is `(version 0, coordinator_epoch)`.
    /// Set `base_offset` / `partition_leader_epoch` on the result before building.
    pub fn control_marker(
        producer_id: i64,
        producer_epoch: i16,
        control: ControlType,
        coordinator_epoch: i32,
        timestamp: i64,
    ) -> Self {
        let mut key = Vec::with_capacity(4);
        key.extend_from_slice(&CONTROL_RECORD_VERSION.to_be_bytes());
        key.extend_from_slice(&control.type_id().to_be_bytes());
        let mut value = Vec::with_capacity(6);
        value.extend_from_slice(&END_TXN_MARKER_VERSION.to_be_bytes());
        value.extend_from_slice(&coordinator_epoch.to_be_bytes());
        let mut builder = Self::new().producer(producer_id, producer_epoch, -1).transactional(true);
        builder.control = true;
        builder.record(NewRecord::new(Some(&key), Some(&value), timestamp))
    }

    /// Encodes the batch with a valid CRC. Panics on an empty batch (a caller bug).
    pub fn build(&self) -> Vec<u8> {
        assert!(!self.records.is_empty(), "a record batch needs at least one record");
        let base_timestamp = self.records[0].timestamp;
        let max_timestamp = self.records.iter().map(|r| r.timestamp).max().unwrap_or(base_timestamp);
        let mut body = Vec::new();
        for (delta, record) in self.records.iter().enumerate() {
            encode_record(&mut body, record, base_timestamp, delta as i32);
        }
        let body = compress(self.compression, &body);
        let mut attributes = self.compression.attribute_bits();
        if self.transactional {
            attributes |= 0x10;
        }
        if self.control {
            attributes |= 0x20;
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(&self.base_offset.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes()); // batch_length, patched below
        out.extend_from_slice(&self.partition_leader_epoch.to_be_bytes());
        out.push(MAGIC_V2);
        out.extend_from_slice(&0u32.to_be_bytes()); // crc, patched below
        out.extend_from_slice(&attributes.to_be_bytes());
        out.extend_from_slice(&(self.records.len() as i32 - 1).to_be_bytes());
        out.extend_from_slice(&base_timestamp.to_be_bytes());
        out.extend_from_slice(&max_timestamp.to_be_bytes());
        out.extend_from_slice(&self.producer_id.to_be_bytes());
        out.extend_from_slice(&self.producer_epoch.to_be_bytes());
        out.extend_from_slice(&self.base_sequence.to_be_bytes());
        out.extend_from_slice(&(self.records.len() as i32).to_be_bytes());
        out.extend_from_slice(&body);
        let batch_length = (out.len() - batch::LENGTH_PREFIX_BYTES) as i32;
        out[8..12].copy_from_slice(&batch_length.to_be_bytes());
        batch::rewrite_crc(&mut out);
        out
    }
}

fn encode_record(out: &mut Vec<u8>, record: &NewRecord, base_timestamp: i64, offset_delta: i32) {
    let mut body = Vec::new();
    body.push(0); // attributes
    put_varlong(&mut body, record.timestamp - base_timestamp);
    put_varint(&mut body, offset_delta);
    put_bytes(&mut body, record.key.as_deref());
    put_bytes(&mut body, record.value.as_deref());
    put_varint(&mut body, record.headers.len() as i32);
    for (name, value) in &record.headers {
        put_bytes(&mut body, Some(name.as_bytes()));
        put_bytes(&mut body, value.as_deref());
    }
    put_varint(out, body.len() as i32);
    out.extend_from_slice(&body);
}

fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i32);
            out.extend_from_slice(b);
        }
    }
}

/// Zig-zag varint (i32), as Kafka's records use.
pub fn put_varint(out: &mut Vec<u8>, value: i32) {
    put_unsigned_varint(out, ((value << 1) ^ (value >> 31)) as u32 as u64);
}

/// Zig-zag varlong (i64).
pub fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_unsigned_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Why a batch's records could not be read. Every variant names what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("{codec:?} records body decompresses to more than the {limit}-byte limit")]
    DecompressedTooLarge { codec: Compression, limit: usize },
    #[error("cannot decompress {codec:?} records body: {reason}")]
    Decompress { codec: Compression, reason: String },
    #[error("record {field} is truncated: need {needed} bytes, have {available}")]
    Truncated { field: &'static str, needed: usize, available: usize },
    #[error("record {field} varint is truncated")]
    VarintTruncated { field: &'static str },
    #[error("record {field} varint does not fit in {bits} bits")]
    VarintOverflow { field: &'static str, bits: u32 },
    #[error("record {field} length is {length}; only -1 (null) may be negative")]
    NegativeLength { field: &'static str, length: i32 },
    #[error("record header key is null; header keys must be present")]
    NullHeaderKey,
    #[error("record declares {declared} bytes but its fields take {consumed}")]
    RecordLengthMismatch { declared: usize, consumed: usize },
    #[error("batch header declares {declared} records but the body holds only {found}")]
    TooFewRecords { declared: i32, found: usize },
    #[error("batch body has {extra} bytes left after the {declared} records its header declares")]
    TrailingBytes { declared: i32, extra: usize },
    #[error("batch is not a control batch (attributes {attributes:#06x})")]
    NotControl { attributes: u16 },
    #[error("control record key is {0}; expected 4 bytes (version i16, type i16)")]
    BadControlKey(String),
    #[error("control record key version is {0}; it must not be negative")]
    BadControlVersion(i16),
    #[error("control record type {0} is not a transaction marker (0 = abort, 1 = commit)")]
    UnknownControlType(i16),
}

/// Version of the control record key Kafka writes.
const CONTROL_RECORD_VERSION: i16 = 0;
/// Version of the end-transaction marker value Kafka writes.
const END_TXN_MARKER_VERSION: i16 = 0;
/// Control batches hold one tiny record; this only bounds a hostile compressed one.
const CONTROL_BATCH_MAX_UNCOMPRESSED: usize = 64 * 1024;
/// Large enough for any batch whose length fits the i32 `batch_length` field.
const ANY_BATCH_BYTES: usize = i32::MAX as usize + LENGTH_PREFIX_BYTES;
/// The smallest encoded record: seven one-byte varints/fields.
const MIN_RECORD_BYTES: usize = 7;
/// The smallest encoded header: empty key and null value.
const MIN_HEADER_BYTES: usize = 2;

/// The transaction outcome a control batch records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    Abort,
    Commit,
}

impl ControlType {
    /// The type id in the control record key.
    pub fn type_id(self) -> i16 {
        match self {
            Self::Abort => 0,
            Self::Commit => 1,
        }
    }

    /// Parses a control record key: i16 version (newer versions keep the layout), i16 type.
    pub fn from_key(key: Option<&[u8]>) -> Result<Self, RecordError> {
        let key = key.ok_or_else(|| RecordError::BadControlKey("null".to_owned()))?;
        let [v0, v1, t0, t1, ..] = *key else {
            return Err(RecordError::BadControlKey(format!("{} bytes", key.len())));
        };
        let version = i16::from_be_bytes([v0, v1]);
        if version < 0 {
            return Err(RecordError::BadControlVersion(version));
        }
        match i16::from_be_bytes([t0, t1]) {
            0 => Ok(Self::Abort),
            1 => Ok(Self::Commit),
            other => Err(RecordError::UnknownControlType(other)),
        }
    }
}

/// Reads the transaction outcome of a control (marker) batch from its first record.
pub fn control_type(batch_bytes: &[u8]) -> Result<ControlType, RecordError> {
    let header = BatchHeader::parse(batch_bytes)?;
    if !header.is_control() {
        return Err(RecordError::NotControl { attributes: header.attributes });
    }
    let records = decode_records(batch_bytes, CONTROL_BATCH_MAX_UNCOMPRESSED)?;
    // validate() guarantees at least one record.
    let first = records.iter().next().ok_or(RecordError::TooFewRecords { declared: header.records_count, found: 0 })?;
    ControlType::from_key(first.key)
}

/// One record of a decoded batch, borrowing from the batch (or its decompressed body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub attributes: i8,
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// In wire order, duplicates kept.
    pub headers: Vec<(&'a [u8], Option<&'a [u8]>)>,
    /// The whole encoded record including its leading length varint; compaction copies
    /// these bytes verbatim.
    pub raw: &'a [u8],
    batch: BatchContext,
}

/// The batch header fields that turn a record's deltas into absolute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchContext {
    base_offset: i64,
    base_timestamp: i64,
    /// `Some(max_timestamp)` when the batch has LogAppendTime.
    log_append_time: Option<i64>,
}

impl Record<'_> {
    /// The record's offset in the partition. Wraps like Java's arithmetic on hostile input.
    pub fn offset(&self) -> i64 {
        self.batch.base_offset.wrapping_add(i64::from(self.offset_delta))
    }

    /// The record's timestamp: the broker's append time when the batch uses LogAppendTime,
    /// otherwise the producer's `base_timestamp + timestamp_delta`.
    pub fn timestamp(&self) -> i64 {
        self.batch.log_append_time.unwrap_or_else(|| self.batch.base_timestamp.wrapping_add(self.timestamp_delta))
    }
}

impl<'a> Record<'a> {
    /// The value of the last header called `name` (Kafka's `lastHeader`): `None` when
    /// there is no such header, `Some(None)` when its value is null.
    pub fn header(&self, name: impl AsRef<[u8]>) -> Option<Option<&'a [u8]>> {
        let name = name.as_ref();
        self.headers.iter().rev().find(|(key, _)| *key == name).map(|(_, value)| *value)
    }
}

/// A byte range inside the records body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn of(self, body: &[u8]) -> &[u8] {
        &body[self.start..self.end]
    }
}

/// A record parsed once into byte ranges, so iteration cannot fail later.
#[derive(Debug, Clone)]
struct RecordIndex {
    raw: Span,
    attributes: i8,
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<Span>,
    value: Option<Span>,
    headers: Vec<(Span, Option<Span>)>,
}

/// The records of one batch, fully parsed and checked against the header.
#[derive(Debug, Clone)]
pub struct DecodedRecords<'a> {
    header: BatchHeader,
    /// The uncompressed records body: borrowed from the batch, or owned after decompression.
    body: Cow<'a, [u8]>,
    records: Vec<RecordIndex>,
}

impl<'a> DecodedRecords<'a> {
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The uncompressed records body (every record's `raw` bytes, back to back).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<Record<'_>> {
        self.records.get(index).map(|record| self.view(record))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Record<'_>> + '_ {
        self.records.iter().map(|record| self.view(record))
    }

    fn view<'s>(&'s self, index: &RecordIndex) -> Record<'s> {
        let body: &'s [u8] = &self.body;
        Record {
            attributes: index.attributes,
            timestamp_delta: index.timestamp_delta,
            offset_delta: index.offset_delta,
            key: index.key.map(|span| span.of(body)),
            value: index.value.map(|span| span.of(body)),
            headers: index.headers.iter().map(|(key, value)| (key.of(body), value.map(|v| v.of(body)))).collect(),
            raw: index.raw.of(body),
            batch: BatchContext {
                base_offset: self.header.base_offset,
                base_timestamp: self.header.base_timestamp,
                log_append_time: self.header.has_log_append_time().then_some(self.header.max_timestamp),
            },
        }
    }
}

/// Validates one complete batch (length, magic, codec, CRC), decompresses its body with
/// at most `max_uncompressed_bytes` of output and parses every record. The body must hold
/// exactly `records_count` records and nothing after them.
pub fn decode_records(batch_bytes: &[u8], max_uncompressed_bytes: usize) -> Result<DecodedRecords<'_>, RecordError> {
    let header = batch::validate(batch_bytes, ANY_BATCH_BYTES)?;
    let compressed = &batch_bytes[HEADER_BYTES..];
    let body = match header.compression()? {
        Compression::None => Cow::Borrowed(compressed),
        codec => Cow::Owned(decompress(codec, compressed, max_uncompressed_bytes)?),
    };
    let records = index_records(&body, header.records_count)?;
    Ok(DecodedRecords { header, body, records })
}

fn index_records(body: &[u8], declared: i32) -> Result<Vec<RecordIndex>, RecordError> {
    let expected = usize::try_from(declared).unwrap_or(0);
    // The header's count is untrusted: never reserve more than the body could hold.
    let mut records = Vec::with_capacity(expected.min(body.len() / MIN_RECORD_BYTES));
    let mut cursor = Cursor { buf: body, pos: 0 };
    while records.len() < expected {
        if cursor.pos == body.len() {
            return Err(RecordError::TooFewRecords { declared, found: records.len() });
        }
        records.push(parse_record(&mut cursor)?);
    }
    if cursor.pos != body.len() {
        return Err(RecordError::TrailingBytes { declared, extra: body.len() - cursor.pos });
    }
    Ok(records)
}

/// Parses the record at the cursor. Its fields are read through a cursor that ends at
/// the record's declared length, so a lying field cannot reach into the next record.
fn parse_record(cursor: &mut Cursor<'_>) -> Result<RecordIndex, RecordError> {
    let start = cursor.pos;
    let length = cursor.length("record length")?;
    let fields_start = cursor.pos;
    let end = cursor.take("record", length)?.end;
    let mut fields = Cursor { buf: &cursor.buf[..end], pos: fields_start };
    let attributes = fields.byte("attributes")? as i8;
    let timestamp_delta = fields.varlong("timestamp delta")?;
    let offset_delta = fields.varint("offset delta")?;
    let key = fields.nullable_bytes("key")?;
    let value = fields.nullable_bytes("value")?;
    let header_count = fields.length("header count")?;
    let mut headers = Vec::with_capacity(header_count.min(fields.remaining() / MIN_HEADER_BYTES));
    for _ in 0..header_count {
        let name = fields.nullable_bytes("header key")?.ok_or(RecordError::NullHeaderKey)?;
        headers.push((name, fields.nullable_bytes("header value")?));
    }
    if fields.pos != end {
        return Err(RecordError::RecordLengthMismatch { declared: length, consumed: fields.pos - fields_start });
    }
    Ok(RecordIndex { raw: Span { start, end }, attributes, timestamp_delta, offset_delta, key, value, headers })
}

/// A bounds-checked reader over a records body.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, RecordError> {
        let byte = *self.buf.get(self.pos).ok_or(RecordError::Truncated { field, needed: 1, available: 0 })?;
        self.pos += 1;
        Ok(byte)
    }

    /// Claims the next `len` bytes.
    fn take(&mut self, field: &'static str, len: usize) -> Result<Span, RecordError> {
        if len > self.remaining() {
            return Err(RecordError::Truncated { field, needed: len, available: self.remaining() });
        }
        let span = Span { start: self.pos, end: self.pos + len };
        self.pos = span.end;
        Ok(span)
    }

    /// An unsigned LEB128 varint of at most `bits` significant bits.
    fn unsigned_varint(&mut self, field: &'static str, bits: u32) -> Result<u64, RecordError> {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let byte = *self.buf.get(self.pos).ok_or(RecordError::VarintTruncated { field })?;
            self.pos += 1;
            let payload = u64::from(byte & 0x7f);
            // Bits that would land above `bits` mean the encoder overflowed (or lies).
            if shift + 7 > bits && payload >> (bits - shift) != 0 {
                return Err(RecordError::VarintOverflow { field, bits });
            }
            value |= payload << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift >= bits {
                return Err(RecordError::VarintOverflow { field, bits });
            }
        }
    }

    /// Zig-zag varint (i32).
    fn varint(&mut self, field: &'static str) -> Result<i32, RecordError> {
        let raw = self.unsigned_varint(field, 32)? as u32;
        Ok((raw >> 1) as i32 ^ -((raw & 1) as i32))
    }

    /// Zig-zag varlong (i64).
    fn varlong(&mut self, field: &'static str) -> Result<i64, RecordError> {
        let raw = self.unsigned_varint(field, 64)?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A varint that must not be negative (lengths and counts).
    fn length(&mut self, field: &'static str) -> Result<usize, RecordError> {
        let length = self.varint(field)?;
        usize::try_from(length).map_err(|_| RecordError::NegativeLength { field, length })
    }

    /// A varint length followed by that many bytes; -1 means null.
    fn nullable_bytes(&mut self, field: &'static str) -> Result<Option<Span>, RecordError> {
        match self.varint(field)? {
            -1 => Ok(None),
            length => {
                let len = usize::try_from(length).map_err(|_| RecordError::NegativeLength { field, length })?;
                self.take(field, len).map(Some)
            }
        }
    }
}

/// Every record's (offset, timestamp), in order: what ListOffsets-by-timestamp searches.
pub fn record_timestamps(batch_bytes: &[u8], max_uncompressed_bytes: usize) -> Result<Vec<(i64, i64)>, RecordError> {
    let decoded = decode_records(batch_bytes, max_uncompressed_bytes)?;
    Ok(decoded.iter().map(|r| (r.offset(), r.timestamp())).collect())
}

/// Compaction: rewrites a batch to hold only the records `keep` accepts, copied
/// verbatim. Header fields (base offset, last offset delta, timestamps, producer
/// identity, attributes and codec) are kept so offsets and producer state survive; the
/// body is recompressed with the batch's codec and length, count and CRC recomputed.
///
/// Returns `None` when no record is kept, and the original bytes when all are.
pub fn rebuild_batch(
    batch_bytes: &[u8],
    mut keep: impl FnMut(&Record<'_>) -> bool,
    max_uncompressed_bytes: usize,
) -> Result<Option<Vec<u8>>, RecordError> {
    let decoded = decode_records(batch_bytes, max_uncompressed_bytes)?;
    let mut kept_body = Vec::with_capacity(decoded.body().len());
    let mut kept = 0usize;
    for record in decoded.iter() {
        if keep(&record) {
            kept_body.extend_from_slice(record.raw);
            kept += 1;
        }
    }
    if kept == 0 {
        return Ok(None);
    }
    if kept == decoded.len() {
        return Ok(Some(batch_bytes.to_vec()));
    }
    let body = compress(decoded.header().compression()?, &kept_body);
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&batch_bytes[..HEADER_BYTES]);
    out.extend_from_slice(&body);
    // Recompression may (rarely) grow the body past what batch_length can express.
    let batch_length = i32::try_from(out.len() - LENGTH_PREFIX_BYTES).map_err(|_| BatchError::BadLength {
        length: out.len() as i64,
        min: HEADER_BYTES,
        max: ANY_BATCH_BYTES,
    })?;
    out[8..12].copy_from_slice(&batch_length.to_be_bytes());
    // kept < records_count, which is an i32.
    out[57..61].copy_from_slice(&(kept as i32).to_be_bytes());
    batch::rewrite_crc(&mut out);
    Ok(Some(out))
}
