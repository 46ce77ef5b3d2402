//! Records inside a RecordBatch v2: building batches (producers' encoding, used by tests,
//! benchmarks and internal topics) and reading records back (compaction, key indexes).
//!
//! Record layout (all integers zig-zag varints unless noted):
//! ```text
//! length, attributes (i8), timestamp_delta (varlong), offset_delta, key_length, key,
//! value_length, value, header_count, [header_key_length, header_key, header_value_length, header_value]...
//! ```
//! A length of -1 means null.

use crate::batch::{self, Compression, HEADER_BYTES, MAGIC_V2};

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

/// Compresses a records body with a batch codec. (Only `None` until compression lands.)
fn compress(compression: Compression, body: &[u8]) -> Vec<u8> {
    match compression {
        Compression::None => body.to_vec(),
        other => unimplemented!("compression {other:?} is not implemented yet"),
    }
}
