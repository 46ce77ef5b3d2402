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

    /// A builder with room for `records` records (a large batch grows its list once).
    pub fn with_capacity(records: usize) -> Self {
        Self { records: Vec::with_capacity(records), ..Self::default() }
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
        // Uncompressed records go straight into the batch, sized up front: a view's step
        // can be tens of MB, and growing it by doubling (and copying each record through a
        // buffer of its own) showed in rebuild profiles.
        let records_bytes: usize = self
            .records
            .iter()
            .enumerate()
            .map(|(delta, r)| encoded_record_bytes(r, base_timestamp, delta as i32))
            .sum();
        let mut attributes = self.compression.attribute_bits();
        if self.transactional {
            attributes |= 0x10;
        }
        if self.control {
            attributes |= 0x20;
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + records_bytes);
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
        if self.compression == Compression::None {
            for (delta, record) in self.records.iter().enumerate() {
                encode_record(&mut out, record, base_timestamp, delta as i32);
            }
        } else {
            let mut body = Vec::with_capacity(records_bytes);
            for (delta, record) in self.records.iter().enumerate() {
                encode_record(&mut body, record, base_timestamp, delta as i32);
            }
            out.extend_from_slice(&compress(self.compression, &body));
        }
        debug_assert!(self.compression != Compression::None || out.len() == HEADER_BYTES + records_bytes);
        let batch_length = (out.len() - batch::LENGTH_PREFIX_BYTES) as i32;
        out[8..12].copy_from_slice(&batch_length.to_be_bytes());
        batch::rewrite_crc(&mut out);
        out
    }
}

/// A record's body: everything after its length prefix.
fn record_body_bytes(record: &NewRecord, base_timestamp: i64, offset_delta: i32) -> usize {
    let field = |bytes: Option<&[u8]>| bytes.map_or(varint_bytes(-1), |b| varint_bytes(b.len() as i32) + b.len());
    1 // attributes
        + varlong_bytes(record.timestamp - base_timestamp)
        + varint_bytes(offset_delta)
        + field(record.key.as_deref())
        + field(record.value.as_deref())
        + varint_bytes(record.headers.len() as i32)
        + record.headers.iter().map(|(name, value)| field(Some(name.as_bytes())) + field(value.as_deref())).sum::<usize>()
}

/// A record as encoded in a batch, length prefix included.
fn encoded_record_bytes(record: &NewRecord, base_timestamp: i64, offset_delta: i32) -> usize {
    let body = record_body_bytes(record, base_timestamp, offset_delta);
    varint_bytes(body as i32) + body
}

fn encode_record(out: &mut Vec<u8>, record: &NewRecord, base_timestamp: i64, offset_delta: i32) {
    let body = record_body_bytes(record, base_timestamp, offset_delta);
    put_varint(out, body as i32);
    let body_start = out.len();
    out.push(0); // attributes
    put_varlong(out, record.timestamp - base_timestamp);
    put_varint(out, offset_delta);
    put_bytes(out, record.key.as_deref());
    put_bytes(out, record.value.as_deref());
    put_varint(out, record.headers.len() as i32);
    for (name, value) in &record.headers {
        put_bytes(out, Some(name.as_bytes()));
        put_bytes(out, value.as_deref());
    }
    assert_eq!(out.len() - body_start, body, "a record's encoded length matches its computed length");
}

/// Bytes of a zig-zag varint.
fn varint_bytes(value: i32) -> usize {
    unsigned_varint_bytes(zigzag32(value))
}

/// Bytes of a zig-zag varlong.
fn varlong_bytes(value: i64) -> usize {
    unsigned_varint_bytes(zigzag64(value))
}

fn unsigned_varint_bytes(v: u64) -> usize {
    // 7 bits per byte; zero still takes one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
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
    put_unsigned_varint(out, zigzag32(value));
}

/// Zig-zag varlong (i64).
pub fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_unsigned_varint(out, zigzag64(value));
}

fn zigzag32(value: i32) -> u64 {
    ((value << 1) ^ (value >> 31)) as u32 as u64
}

fn zigzag64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
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
    #[error(
        "record {index} has offset delta {offset_delta}, expected {index}: a producer's batch numbers its records 0, 1, 2, ... (a consumer reads a record's offset from its delta, so a gap would skip later records); re-encode the batch with consecutive offset deltas"
    )]
    UnexpectedOffsetDelta { index: usize, offset_delta: i32 },
    #[error(
        "the batch's last record has offset delta {last}, but its header's last_offset_delta is {last_offset_delta}; they must be equal"
    )]
    LastOffsetDeltaMismatch { last: i32, last_offset_delta: i32 },
    #[error("batch is not a control batch (attributes {attributes:#06x})")]
    NotControl { attributes: u16 },
    #[error("control record key is {0}; expected 4 bytes (version i16, type i16)")]
    BadControlKey(String),
    #[error("control record key version is {0}; it must not be negative")]
    BadControlVersion(i16),
    #[error("control record type {0} is not a transaction marker (0 = abort, 1 = commit)")]
    UnknownControlType(i16),
}

/// Largest records body a compressed batch may inflate to on append (Kafka decompresses
/// every batch on append too, `LogValidator`). Every reader decodes at least this much
/// (compaction 100 MiB, views and HTTP 128 MiB, legacy down-conversion 64 MiB), so what the
/// log accepts can always be read; 4 KiB of zstd can claim gigabytes. An uncompressed
/// body is bounded by `max.message.bytes` instead.
pub const BATCH_UNCOMPRESSED_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Version of the control record key Kafka writes.
const CONTROL_RECORD_VERSION: i16 = 0;
/// Version of the end-transaction marker value Kafka writes.
const END_TXN_MARKER_VERSION: i16 = 0;
/// Control batches hold one tiny record; this only bounds a hostile compressed one.
const CONTROL_BATCH_MAX_UNCOMPRESSED: usize = 64 * 1024;
/// Large enough for any batch whose length fits the i32 `batch_length` field.
const ANY_BATCH_BYTES: usize = i32::MAX as usize + LENGTH_PREFIX_BYTES;
/// The smallest encoded record: seven one-byte varints/fields.
pub const MIN_RECORD_BYTES: usize = 7;

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
    /// In wire order, duplicates kept; parsed on demand (checked when the batch was decoded).
    pub headers: Headers<'a>,
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
        self.headers.last(name.as_ref())
    }
}

/// A record's headers as the bytes they were encoded in (after the count), already checked
/// by [`decode_records`], so iterating cannot fail and allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Headers<'a> {
    /// Headers from the encoded bytes that follow a record's header count. Panics on
    /// bytes [`decode_records`] did not check: the encoding is trusted here.
    pub fn from_checked(bytes: &'a [u8], count: usize) -> Self {
        Self { bytes, count }
    }

    /// The encoded bytes (after the count) and the count, for a caller that keeps them.
    pub fn encoded(&self) -> (&'a [u8], usize) {
        (self.bytes, self.count)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// In wire order, duplicates kept.
    pub fn iter(&self) -> HeaderIter<'a> {
        HeaderIter { cursor: Cursor { buf: self.bytes, pos: 0 }, left: self.count }
    }

    /// The value of the last header called `name`: `None` when absent, `Some(None)` when null.
    pub fn last(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        self.iter().filter(|(key, _)| *key == name).last().map(|(_, value)| value)
    }
}

impl PartialEq for Headers<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.iter().eq(other.iter())
    }
}

impl Eq for Headers<'_> {}

impl<'a> IntoIterator for &Headers<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);
    type IntoIter = HeaderIter<'a>;

    fn into_iter(self) -> HeaderIter<'a> {
        self.iter()
    }
}

/// Iterates checked header bytes.
pub struct HeaderIter<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let checked = "header bytes were checked when the batch was decoded";
        let buf = self.cursor.buf;
        let name = self.cursor.nullable_bytes("header key").expect(checked).expect(checked);
        let value = self.cursor.nullable_bytes("header value").expect(checked);
        Some((name.of(buf), value.map(|v| v.of(buf))))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for HeaderIter<'_> {}

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
    /// The encoded headers after their count.
    headers: Span,
    header_count: usize,
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
            headers: Headers { bytes: index.headers.of(body), count: index.header_count },
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
    walk_records(body, declared, |_, record| {
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// Parses every record of `body` in order, handing each with its index to `each`, which
/// may refuse it. The body must hold exactly `declared` records and nothing after them.
fn walk_records(
    body: &[u8],
    declared: i32,
    mut each: impl FnMut(usize, RecordIndex) -> Result<(), RecordError>,
) -> Result<(), RecordError> {
    let expected = usize::try_from(declared).unwrap_or(0);
    let mut cursor = Cursor { buf: body, pos: 0 };
    for found in 0..expected {
        if cursor.pos == body.len() {
            return Err(RecordError::TooFewRecords { declared, found });
        }
        each(found, parse_record(&mut cursor)?)?;
    }
    if cursor.pos != body.len() {
        return Err(RecordError::TrailingBytes { declared, extra: body.len() - cursor.pos });
    }
    Ok(())
}

/// What [`check_records`] learnt about a batch whose records all decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordsCheck {
    /// The index of the first record without a key (compacted topics refuse it).
    pub first_without_key: Option<usize>,
}

/// Checks that every record of a producer's batch decodes, as [`decode_records`] would,
/// without keeping them: one pass over the record framing, no allocation per record (a
/// compressed body is decompressed once, into at most `max_uncompressed_bytes`). The
/// batch's header, length and CRC must already be validated (`header` is what
/// `batch::validate` returned): they are not checked again.
///
/// Record `i`'s offset delta must be `i`, and the last one the header's
/// `last_offset_delta`: the log stores the batch verbatim, and a consumer advances to a
/// record's offset + 1 and compaction keeps the highest offset per key, so one inflated
/// delta would make consumers skip everything after it and shadow later writes of its
/// key. Kafka's `LogValidator` re-encodes a compressed batch with such deltas (for old
/// clients' v1 message sets; kappa converts those to v2 itself, consecutively) and stores
/// an uncompressed one as it is; kappa never rewrites a producer's records, so it refuses
/// both. Batches a cleaner rebuilt have gaps: they never come through here.
pub fn check_records(
    header: &BatchHeader,
    batch_bytes: &[u8],
    max_uncompressed_bytes: usize,
) -> Result<RecordsCheck, RecordError> {
    let compressed = &batch_bytes[HEADER_BYTES..];
    let body = match header.compression()? {
        Compression::None => Cow::Borrowed(compressed),
        codec => Cow::Owned(decompress(codec, compressed, max_uncompressed_bytes)?),
    };
    let mut first_without_key = None;
    let mut last_delta = None;
    walk_records(&body, header.records_count, |index, record| {
        if i64::from(record.offset_delta) != index as i64 {
            return Err(RecordError::UnexpectedOffsetDelta { index, offset_delta: record.offset_delta });
        }
        if record.key.is_none() && first_without_key.is_none() {
            first_without_key = Some(index);
        }
        last_delta = Some(record.offset_delta);
        Ok(())
    })?;
    match last_delta {
        Some(last) if last != header.last_offset_delta => {
            Err(RecordError::LastOffsetDeltaMismatch { last, last_offset_delta: header.last_offset_delta })
        }
        _ => Ok(RecordsCheck { first_without_key }),
    }
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
    let headers_start = fields.pos;
    for _ in 0..header_count {
        fields.nullable_bytes("header key")?.ok_or(RecordError::NullHeaderKey)?;
        fields.nullable_bytes("header value")?;
    }
    if fields.pos != end {
        return Err(RecordError::RecordLengthMismatch { declared: length, consumed: fields.pos - fields_start });
    }
    let headers = Span { start: headers_start, end };
    Ok(RecordIndex {
        raw: Span { start, end },
        attributes,
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers,
        header_count,
    })
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

    #[inline]
    fn byte(&mut self, field: &'static str) -> Result<u8, RecordError> {
        let byte = *self.buf.get(self.pos).ok_or(RecordError::Truncated { field, needed: 1, available: 0 })?;
        self.pos += 1;
        Ok(byte)
    }

    /// Claims the next `len` bytes.
    #[inline]
    fn take(&mut self, field: &'static str, len: usize) -> Result<Span, RecordError> {
        if len > self.remaining() {
            return Err(RecordError::Truncated { field, needed: len, available: self.remaining() });
        }
        let span = Span { start: self.pos, end: self.pos + len };
        self.pos = span.end;
        Ok(span)
    }

    /// An unsigned LEB128 varint of at most `bits` significant bits.
    #[inline(always)]
    fn unsigned_varint(&mut self, field: &'static str, bits: u32) -> Result<u64, RecordError> {
        // Most varints in a record (deltas, short lengths) are one byte: that case is inlined
        // into every caller (a record has a dozen varints, its headers are walked again on
        // every lookup), the rest is a call.
        if let Some(&byte) = self.buf.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        self.multi_byte_varint(field, bits)
    }

    #[inline(never)]
    fn multi_byte_varint(&mut self, field: &'static str, bits: u32) -> Result<u64, RecordError> {
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
    #[inline]
    fn varint(&mut self, field: &'static str) -> Result<i32, RecordError> {
        let raw = self.unsigned_varint(field, 32)? as u32;
        Ok((raw >> 1) as i32 ^ -((raw & 1) as i32))
    }

    /// Zig-zag varlong (i64).
    #[inline]
    fn varlong(&mut self, field: &'static str) -> Result<i64, RecordError> {
        let raw = self.unsigned_varint(field, 64)?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A varint that must not be negative (lengths and counts).
    #[inline]
    fn length(&mut self, field: &'static str) -> Result<usize, RecordError> {
        let length = self.varint(field)?;
        usize::try_from(length).map_err(|_| RecordError::NegativeLength { field, length })
    }

    /// A varint length followed by that many bytes; -1 means null.
    #[inline]
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
/// verbatim. Header fields (base offset, last offset delta, base timestamp, producer
/// identity, attributes and codec) are kept so offsets and producer state survive; the
/// body is recompressed with the batch's codec and length, count and CRC recomputed. With
/// CreateTime the max timestamp becomes the kept records' largest (as Kafka's cleaner
/// does), so timestamp lookups and time indexes do not point at removed records; a
/// LogAppendTime batch keeps it, as it is the append time of every record.
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
    let mut kept_max_timestamp = i64::MIN;
    for record in decoded.iter() {
        if keep(&record) {
            kept_body.extend_from_slice(record.raw);
            kept += 1;
            kept_max_timestamp = kept_max_timestamp.max(record.timestamp());
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
    if !decoded.header().has_log_append_time() {
        out[35..43].copy_from_slice(&kept_max_timestamp.to_be_bytes());
    }
    batch::rewrite_crc(&mut out);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::compression::{compress, decompress};

    const CODECS: [Compression; 5] =
        [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
    const LIMIT: usize = 1 << 20;

    #[test]
    fn a_builder_with_capacity_builds_the_same_batch() {
        let (mut sized, mut grown) = (BatchBuilder::with_capacity(1), BatchBuilder::new());
        for record in sample_records() {
            sized.push(record.clone());
            grown.push(record);
        }
        assert_eq!(sized.build(), grown.build());
    }

    fn sample_records() -> Vec<NewRecord> {
        vec![
            NewRecord::new(Some(b"k1"), Some(b"v1"), 1_000).header("h", Some(b"a")).header("h", Some(b"b")),
            NewRecord::new(None, Some(b"value without key"), 1_005),
            NewRecord::new(Some(b"tombstone"), None, 999).header("null", None),
            NewRecord::new(Some(b""), Some(b""), 1_010).header("", Some(b"")),
        ]
    }

    #[test]
    fn varint_lengths_match_what_put_varint_writes() {
        let edges = [0i64, 1, -1, 63, 64, -64, -65, 127, 128, 8191, 8192, i32::MAX as i64, i32::MIN as i64];
        for value in edges.into_iter().chain((-70_000..70_000).step_by(97)) {
            let mut out = Vec::new();
            put_varlong(&mut out, value);
            assert_eq!(varlong_bytes(value), out.len(), "varlong {value}");
            if let Ok(small) = i32::try_from(value) {
                out.clear();
                put_varint(&mut out, small);
                assert_eq!(varint_bytes(small), out.len(), "varint {small}");
            }
        }
        for value in [i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            put_varlong(&mut out, value);
            assert_eq!(varlong_bytes(value), out.len(), "varlong {value}");
        }
    }

    #[test]
    fn an_uncompressed_batch_is_exactly_header_plus_its_records() {
        let records = sample_records();
        let bytes = build(Compression::None, &records);
        let expected: usize = records.iter().enumerate().map(|(i, r)| encoded_record_bytes(r, 1_000, i as i32)).sum();
        assert_eq!(bytes.len(), HEADER_BYTES + expected);
        assert_eq!(bytes.capacity(), bytes.len(), "sized up front, never grown");
    }

    fn build(codec: Compression, records: &[NewRecord]) -> Vec<u8> {
        let mut builder = BatchBuilder::new().compression(codec).producer(7, 3, 42);
        builder.base_offset = 100;
        for record in records {
            builder.push(record.clone());
        }
        builder.build()
    }

    /// A batch with a valid header (count, codec, length, CRC) around an arbitrary body.
    fn batch_with_body(codec: Compression, records_count: i32, body: &[u8]) -> Vec<u8> {
        let template = build(Compression::None, &[NewRecord::new(None, None, 0)]);
        let mut out = template[..HEADER_BYTES].to_vec();
        out.extend_from_slice(body);
        out[21..23].copy_from_slice(&codec.attribute_bits().to_be_bytes());
        out[23..27].copy_from_slice(&(records_count - 1).to_be_bytes());
        out[57..61].copy_from_slice(&records_count.to_be_bytes());
        let batch_length = (out.len() - LENGTH_PREFIX_BYTES) as i32;
        out[8..12].copy_from_slice(&batch_length.to_be_bytes());
        batch::rewrite_crc(&mut out);
        out
    }

    fn assert_matches(decoded: &DecodedRecords<'_>, expected: &[(i64, &NewRecord)]) {
        assert_eq!(decoded.len(), expected.len());
        for (record, (offset, want)) in decoded.iter().zip(expected) {
            assert_eq!(record.offset(), *offset);
            assert_eq!(record.timestamp(), want.timestamp);
            assert_eq!(record.key, want.key.as_deref());
            assert_eq!(record.value, want.value.as_deref());
            let headers: Vec<_> = want.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_deref())).collect();
            assert_eq!(record.headers.iter().collect::<Vec<_>>(), headers);
        }
    }

    #[test]
    fn every_codec_roundtrips_keys_values_nulls_and_duplicate_headers() {
        let records = sample_records();
        for codec in CODECS {
            let bytes = build(codec, &records);
            let header = batch::validate_produced(&bytes, usize::MAX >> 1).expect("built batch is valid");
            assert_eq!(header.compression(), Ok(codec));
            let decoded = decode_records(&bytes, LIMIT).expect("decodes");
            let expected: Vec<_> = records.iter().enumerate().map(|(i, r)| (100 + i as i64, r)).collect();
            assert_matches(&decoded, &expected);
            // The raw slices tile the uncompressed body exactly.
            let raw: Vec<u8> = decoded.iter().flat_map(|r| r.raw.to_vec()).collect();
            assert_eq!(raw, decoded.body(), "{codec:?}");
            let first = decoded.get(0).expect("first record");
            assert_eq!(first.header("h"), Some(Some(&b"b"[..])), "last duplicate wins");
            assert_eq!(decoded.get(2).expect("third").header(b"null"), Some(None));
            assert_eq!(first.header("missing"), None);
        }
    }

    #[test]
    fn codecs_roundtrip_multi_block_bodies() {
        // 300 KiB spans several LZ4 64 KiB blocks and snappy's 64 KiB fragments.
        let body: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect();
        for codec in CODECS {
            let packed = compress(codec, &body);
            assert_eq!(decompress(codec, &packed, body.len()).as_deref(), Ok(&body[..]), "{codec:?}");
        }
    }

    #[test]
    fn lz4_is_a_frame_with_independent_blocks() {
        let packed = compress(Compression::Lz4, b"hello hello hello");
        assert_eq!(packed[..4], 0x184D_2204u32.to_le_bytes(), "LZ4 frame magic");
        assert_ne!(packed[4] & 0x20, 0, "block independence flag (Kafka's Java reader needs it)");
    }

    fn xerial(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = b"\x82SNAPPY\x00".to_vec();
        out.extend_from_slice(&1i32.to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
        for chunk in chunks {
            let block = snap::raw::Encoder::new().compress_vec(chunk).expect("compress");
            out.extend_from_slice(&(block.len() as u32).to_be_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    #[test]
    fn snappy_decodes_xerial_framing() {
        let framed = xerial(&[b"first chunk ", b"", b"second chunk"]);
        assert_eq!(decompress(Compression::Snappy, &framed, LIMIT).as_deref(), Ok(&b"first chunk second chunk"[..]));

        // A whole batch whose body is xerial framed, split mid-record as Java may do.
        let records = sample_records();
        let plain = build(Compression::None, &records);
        let body = &plain[HEADER_BYTES..];
        let (a, b) = body.split_at(body.len() / 2);
        let bytes = batch_with_body(Compression::Snappy, records.len() as i32, &xerial(&[a, b]));
        let decoded = decode_records(&bytes, LIMIT).expect("xerial batch decodes");
        assert_eq!(decoded.body(), body);
        assert_eq!(decoded.len(), records.len());
    }

    #[test]
    fn malformed_xerial_frames_are_errors() {
        let framed = xerial(&[b"some data"]);
        assert!(matches!(decompress(Compression::Snappy, &framed[..12], LIMIT), Err(RecordError::Decompress { .. })));
        assert!(matches!(decompress(Compression::Snappy, &framed[..18], LIMIT), Err(RecordError::Decompress { .. })));
        assert!(matches!(
            decompress(Compression::Snappy, &framed[..framed.len() - 1], LIMIT),
            Err(RecordError::Decompress { .. })
        ));
        let over = xerial(&[&[7u8; 700], &[8u8; 700]]);
        assert_eq!(
            decompress(Compression::Snappy, &over, 1_000),
            Err(RecordError::DecompressedTooLarge { codec: Compression::Snappy, limit: 1_000 })
        );
    }

    #[test]
    fn decompression_stops_at_the_limit() {
        let bomb = vec![0u8; 10 << 20];
        for codec in CODECS {
            let packed = compress(codec, &bomb);
            let too_large = RecordError::DecompressedTooLarge { codec, limit: 1 << 20 };
            assert_eq!(decompress(codec, &packed, 1 << 20), Err(too_large.clone()), "{codec:?}");
            // The same through decode_records: the header is valid, only the size is not.
            // (An uncompressed body is borrowed, not inflated, so the limit does not apply.)
            if codec != Compression::None {
                let bytes = batch_with_body(codec, 1, &packed);
                assert_eq!(decode_records(&bytes, 1 << 20).map(|d| d.len()), Err(too_large), "{codec:?}");
            }
            // Exactly at the limit is fine.
            let small = compress(codec, &bomb[..4096]);
            assert_eq!(decompress(codec, &small, 4096).map(|v| v.len()), Ok(4096), "{codec:?}");
            assert!(decompress(codec, &small, 4095).is_err(), "{codec:?}");
        }
    }

    #[test]
    fn truncated_compressed_bodies_are_errors() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for codec in CODECS.into_iter().filter(|c| *c != Compression::None) {
            let packed = compress(codec, &body);
            let cut = &packed[..packed.len() / 2];
            assert!(
                matches!(decompress(codec, cut, LIMIT), Err(RecordError::Decompress { codec: c, .. }) if c == codec),
                "{codec:?}: {:?}",
                decompress(codec, cut, LIMIT).map(|v| v.len())
            );
            let garbage = [0x5au8; 64];
            assert!(decompress(codec, &garbage, LIMIT).is_err(), "{codec:?} accepted garbage");
        }
    }

    /// Writes one field of a hand-made record.
    type Field<'f> = &'f dyn Fn(&mut Vec<u8>);

    fn record_bytes(fields: &[Field<'_>]) -> Vec<u8> {
        let mut inner = Vec::new();
        for field in fields {
            field(&mut inner);
        }
        let mut out = Vec::new();
        put_varint(&mut out, inner.len() as i32);
        out.extend_from_slice(&inner);
        out
    }

    #[test]
    fn malformed_records_name_what_is_wrong() {
        let attrs = |b: &mut Vec<u8>| b.push(0);
        let zero = |b: &mut Vec<u8>| put_varint(b, 0);
        let null = |b: &mut Vec<u8>| put_varint(b, -1);
        let decode = |count: i32, body: &[u8]| {
            decode_records(&batch_with_body(Compression::None, count, body), LIMIT).map(|d| d.len())
        };

        let good = record_bytes(&[&attrs, &zero, &zero, &null, &null, &zero]);
        assert_eq!(decode(1, &good), Ok(1));
        assert_eq!(decode(2, &good), Err(RecordError::TooFewRecords { declared: 2, found: 1 }));
        let two = [good.clone(), good.clone()].concat();
        assert_eq!(decode(1, &two), Err(RecordError::TrailingBytes { declared: 1, extra: good.len() }));

        let negative_key = record_bytes(&[&attrs, &zero, &zero, &|b| put_varint(b, -2), &null, &zero]);
        assert_eq!(decode(1, &negative_key), Err(RecordError::NegativeLength { field: "key", length: -2 }));

        let long_value = record_bytes(&[&attrs, &zero, &zero, &null, &|b| put_varint(b, 50), &zero]);
        assert!(matches!(decode(1, &long_value), Err(RecordError::Truncated { field: "value", needed: 50, .. })));

        let null_header_key = record_bytes(&[&attrs, &zero, &zero, &null, &null, &|b| put_varint(b, 1), &null, &null]);
        assert_eq!(decode(1, &null_header_key), Err(RecordError::NullHeaderKey));

        let huge_header_count = record_bytes(&[&attrs, &zero, &zero, &null, &null, &|b| put_varint(b, i32::MAX)]);
        assert!(matches!(decode(1, &huge_header_count), Err(RecordError::VarintTruncated { field: "header key" })));

        let padded = record_bytes(&[&attrs, &zero, &zero, &null, &null, &zero, &|b| b.push(9)]);
        assert_eq!(decode(1, &padded), Err(RecordError::RecordLengthMismatch { declared: 7, consumed: 6 }));

        let overlong_varint = [0xffu8, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(decode(1, &overlong_varint), Err(RecordError::VarintOverflow { field: "record length", bits: 32 }));
        let endless_varint = [0x80u8; 12];
        assert!(matches!(decode(1, &endless_varint), Err(RecordError::VarintOverflow { .. })));
        assert_eq!(decode(1, &[0x80]), Err(RecordError::VarintTruncated { field: "record length" }));

        // A huge declared record count must not be trusted for allocation.
        assert_eq!(decode(i32::MAX, &good), Err(RecordError::TooFewRecords { declared: i32::MAX, found: 1 }));
    }

    #[test]
    fn corrupt_batches_are_rejected_before_parsing() {
        let mut bytes = build(Compression::None, &sample_records());
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(decode_records(&bytes, LIMIT), Err(RecordError::Batch(BatchError::BadCrc { .. }))));
        assert!(matches!(decode_records(&bytes[..40], LIMIT), Err(RecordError::Batch(BatchError::BadLength { .. }))));
    }

    #[test]
    fn varints_roundtrip_extremes() {
        for value in [0, 1, -1, 63, -64, 64, i32::MAX, i32::MIN] {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            let mut cursor = Cursor { buf: &buf, pos: 0 };
            assert_eq!(cursor.varint("v"), Ok(value));
            assert_eq!(cursor.pos, buf.len());
        }
        for value in [0, -1, i64::from(i32::MAX) + 1, i64::MAX, i64::MIN] {
            let mut buf = Vec::new();
            put_varlong(&mut buf, value);
            let mut cursor = Cursor { buf: &buf, pos: 0 };
            assert_eq!(cursor.varlong("v"), Ok(value));
            assert_eq!(cursor.pos, buf.len());
        }
    }

    #[test]
    fn log_append_time_overrides_record_timestamps() {
        let mut bytes = build(Compression::None, &sample_records());
        batch::set_log_append_time(&mut bytes, 55_555);
        let decoded = decode_records(&bytes, LIMIT).expect("decodes");
        assert!(decoded.iter().all(|r| r.timestamp() == 55_555));
        assert_eq!(decoded.get(1).map(|r| r.timestamp_delta), Some(5), "deltas are kept");
    }

    #[test]
    fn rebuild_keeps_header_offsets_and_only_chosen_records() {
        let records = sample_records();
        for codec in CODECS {
            let bytes = build(codec, &records);
            let original = BatchHeader::parse(&bytes).expect("header");
            let rebuilt =
                rebuild_batch(&bytes, |r| r.offset() % 2 == 1, LIMIT).expect("rebuilds").expect("some records kept");
            let header = batch::validate(&rebuilt, usize::MAX >> 1).expect("rebuilt batch is valid");
            assert_eq!(header.records_count, 2);
            assert_eq!(header.compression(), Ok(codec));
            assert_eq!(
                BatchHeader { records_count: original.records_count, batch_length: 0, crc: 0, ..header },
                BatchHeader { batch_length: 0, crc: 0, ..original },
                "{codec:?}: only count, length and CRC change"
            );
            let decoded = decode_records(&rebuilt, LIMIT).expect("decodes");
            assert_matches(&decoded, &[(101, &records[1]), (103, &records[3])]);

            assert_eq!(rebuild_batch(&bytes, |_| true, LIMIT), Ok(Some(bytes.clone())));
            assert_eq!(rebuild_batch(&bytes, |_| false, LIMIT), Ok(None));
        }
    }

    #[test]
    fn rebuild_recomputes_the_max_timestamp_of_create_time_batches() {
        let records = sample_records(); // timestamps 1_000, 1_005, 999, 1_010
        for codec in CODECS {
            let bytes = build(codec, &records);
            let rebuilt = rebuild_batch(&bytes, |r| r.offset() <= 101, LIMIT).expect("rebuilds").expect("kept");
            let header = batch::validate(&rebuilt, usize::MAX >> 1).expect("valid: the CRC covers the new value");
            assert_eq!(header.max_timestamp, 1_005, "{codec:?}: the removed record had the largest timestamp");
            assert_eq!(header.base_timestamp, 1_000, "{codec:?}: kept records' deltas stay valid");

            let mut log_append_time = bytes.clone();
            batch::set_log_append_time(&mut log_append_time, 5_000);
            let rebuilt =
                rebuild_batch(&log_append_time, |r| r.offset() <= 101, LIMIT).expect("rebuilds").expect("kept");
            assert_eq!(
                BatchHeader::parse(&rebuilt).expect("header").max_timestamp,
                5_000,
                "{codec:?}: the append time stays"
            );
        }
    }

    #[test]
    fn rebuild_propagates_decode_errors() {
        let bytes = batch_with_body(Compression::None, 2, &[0x80]);
        assert_eq!(
            rebuild_batch(&bytes, |_| true, LIMIT),
            Err(RecordError::VarintTruncated { field: "record length" })
        );
    }

    #[test]
    fn control_markers_roundtrip() {
        for (control, coordinator_epoch) in [(ControlType::Commit, 9), (ControlType::Abort, 0)] {
            let mut builder = BatchBuilder::control_marker(77, 4, control, coordinator_epoch, 123_456);
            builder.base_offset = 500;
            let bytes = builder.build();
            let header = batch::validate_produced(&bytes, usize::MAX >> 1).expect("valid marker");
            assert!(header.is_control() && header.is_transactional());
            assert_eq!((header.producer_id, header.producer_epoch, header.base_sequence), (77, 4, -1));
            assert_eq!(header.compression(), Ok(Compression::None));
            assert_eq!(control_type(&bytes), Ok(control));
            let decoded = decode_records(&bytes, LIMIT).expect("decodes");
            let record = decoded.get(0).expect("one record");
            assert_eq!(decoded.len(), 1);
            assert_eq!((record.offset(), record.timestamp()), (500, 123_456));
            let mut value = 0i16.to_be_bytes().to_vec();
            value.extend_from_slice(&coordinator_epoch.to_be_bytes());
            assert_eq!(record.value, Some(&value[..]));
        }
    }

    #[test]
    fn control_type_rejects_data_batches_and_bad_keys() {
        let data = build(Compression::None, &sample_records());
        assert!(matches!(control_type(&data), Err(RecordError::NotControl { .. })));

        let with_key = |key: Option<&[u8]>| {
            let mut builder = BatchBuilder::new().transactional(true).record(NewRecord::new(key, None, 0));
            builder.control = true;
            control_type(&builder.build())
        };
        assert_eq!(with_key(Some(&[0, 0, 0, 2])), Err(RecordError::UnknownControlType(2)));
        assert_eq!(with_key(Some(&[0xff, 0xff, 0, 1])), Err(RecordError::BadControlVersion(-1)));
        assert_eq!(with_key(Some(&[0, 0, 0])), Err(RecordError::BadControlKey("3 bytes".to_owned())));
        assert_eq!(with_key(None), Err(RecordError::BadControlKey("null".to_owned())));
        // Newer key versions keep the layout and may append fields.
        assert_eq!(with_key(Some(&[0, 1, 0, 1, 9])), Ok(ControlType::Commit));
    }

    fn codec() -> impl Strategy<Value = Compression> {
        proptest::sample::select(CODECS.to_vec())
    }

    fn new_record() -> impl Strategy<Value = NewRecord> {
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40));
        let headers = proptest::collection::vec(("[a-c]{0,2}", bytes()), 0..4);
        (any::<i32>(), bytes(), bytes(), headers).prop_map(|(timestamp, key, value, headers)| NewRecord {
            timestamp: i64::from(timestamp),
            key,
            value,
            headers,
        })
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(
            codec in codec(),
            records_count in 1i32..20,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let bytes = batch_with_body(codec, records_count, &body);
            if let Ok(decoded) = decode_records(&bytes, 64 * 1024) {
                prop_assert_eq!(decoded.len(), records_count as usize);
                let raw: Vec<u8> = decoded.iter().flat_map(|r| r.raw.to_vec()).collect();
                prop_assert_eq!(&raw[..], decoded.body());
                if codec == Compression::None {
                    prop_assert_eq!(decoded.body(), &body[..]);
                }
            }
        }

        #[test]
        fn built_batches_decode_to_their_records(
            codec in codec(),
            records in proptest::collection::vec(new_record(), 1..8),
        ) {
            let bytes = build(codec, &records);
            let decoded = decode_records(&bytes, LIMIT).expect("decodes");
            let expected: Vec<_> = records.iter().enumerate().map(|(i, r)| (100 + i as i64, r)).collect();
            assert_matches(&decoded, &expected);
        }

        #[test]
        fn rebuild_keeps_exactly_the_chosen_records(
            codec in codec(),
            records in proptest::collection::vec(new_record(), 1..8),
            mask in any::<u8>(),
        ) {
            let bytes = build(codec, &records);
            let keep = |offset: i64| mask & (1 << (offset - 100)) != 0;
            let expected: Vec<_> = records.iter().enumerate().map(|(i, r)| (100 + i as i64, r)).filter(|(o, _)| keep(*o)).collect();
            match rebuild_batch(&bytes, |r| keep(r.offset()), LIMIT).expect("rebuilds") {
                None => prop_assert!(expected.is_empty()),
                Some(rebuilt) => {
                    batch::validate(&rebuilt, usize::MAX >> 1).expect("valid");
                    assert_matches(&decode_records(&rebuilt, LIMIT).expect("decodes"), &expected);
                }
            }
        }
    }
}
