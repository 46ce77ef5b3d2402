//! MessageSet v0/v1 (magic 0 and 1): decoding, up-conversion to RecordBatch v2 for
//! produce, and down-conversion from RecordBatch v2 for old fetches.
//!
//! ```text
//! entry:   offset i64, message_size i32, message
//! message: crc u32 (CRC-32/IEEE of magic..end), magic i8, attributes i8,
//!          [timestamp i64 if magic 1], key bytes (i32 length, -1 null), value bytes
//! ```
//! A compressed "wrapper" message holds a whole inner message set in its value. Inner
//! magic-1 offsets are relative (0..n-1) and the wrapper carries the last absolute offset.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kappa_log::batch::{BatchHeader, LENGTH_PREFIX_BYTES};
use kappa_log::records::{BatchBuilder, NewRecord};
use thiserror::Error;

use kappa_log::batch::Compression;
use kappa_log::records::{self, RecordError};

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// offset (8) + message_size (4).
const ENTRY_OVERHEAD: usize = 12;
/// crc (4) + magic (1) + attributes (1) + key length (4) + value length (4).
const MESSAGE_V0_MIN: usize = 14;
const ATTR_CODEC_MASK: u8 = 0x07;
const ATTR_LOG_APPEND_TIME: u8 = 0x08;
/// Timestamp of magic 0 messages, which have none.
pub const NO_TIMESTAMP: i64 = -1;

/// Why a message set could not be read or converted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageSetError {
    #[error("message set is truncated")]
    Truncated,
    #[error("invalid length {0} in message set")]
    BadLength(i64),
    #[error("message magic {0} is not 0 or 1")]
    BadMagic(i8),
    #[error("message CRC mismatch: header says {expected:#010x}, contents hash to {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("unknown compression codec {0}")]
    BadCodec(u8),
    #[error("compressed message inside a compressed message")]
    NestedCompression,
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed data exceeds {max} bytes")]
    TooLarge { max: usize },
    #[error("message set holds no messages")]
    Empty,
    #[error("malformed varint in record batch")]
    BadVarint,
    #[error("record batch: {0}")]
    Batch(String),
}

/// One message of a flattened (decompressed) message set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMessage {
    pub offset: i64,
    pub magic: i8,
    /// -1 for magic 0.
    pub timestamp: i64,
    pub log_append_time: bool,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// Decodes a message set, expanding compressed wrappers. A trailing partial entry is an
/// error unless `allow_partial` (fetch responses may end mid-message).
pub fn decode(
    data: &Bytes,
    max_decompressed: usize,
    allow_partial: bool,
) -> Result<Vec<LegacyMessage>, MessageSetError> {
    decode_with_codec(data, max_decompressed, allow_partial).map(|(messages, _)| messages)
}

/// [`decode`], also returning the codec of the first compressed wrapper (None if none).
fn decode_with_codec(
    data: &Bytes,
    max_decompressed: usize,
    allow_partial: bool,
) -> Result<(Vec<LegacyMessage>, Compression), MessageSetError> {
    let mut out = Vec::new();
    let mut budget = max_decompressed;
    let mut buf = data.clone();
    let mut first_codec = Compression::None;
    while buf.has_remaining() {
        let Some(entry) = next_entry(&mut buf, allow_partial)? else {
            break;
        };
        let (wrapper, codec, inner) = parse_message(entry.0, entry.1)?;
        match codec {
            Compression::None => out.push(wrapper),
            _ => {
                if first_codec == Compression::None {
                    first_codec = codec;
                }
                expand_wrapper(&wrapper, codec, inner, &mut budget, &mut out)?
            }
        }
    }
    Ok((out, first_codec))
}

/// Splits the next `(offset, message bytes)` off `buf`.
fn next_entry(buf: &mut Bytes, allow_partial: bool) -> Result<Option<(i64, Bytes)>, MessageSetError> {
    let partial = |allow: bool| {
        if allow { Ok(None) } else { Err(MessageSetError::Truncated) }
    };
    if buf.remaining() < ENTRY_OVERHEAD {
        return partial(allow_partial);
    }
    let offset = i64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
    let size = i32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
    if size < MESSAGE_V0_MIN as i32 {
        return Err(MessageSetError::BadLength(size as i64));
    }
    if buf.remaining() - ENTRY_OVERHEAD < size as usize {
        return partial(allow_partial);
    }
    buf.advance(ENTRY_OVERHEAD);
    Ok(Some((offset, buf.split_to(size as usize))))
}

/// Parses one message; for a wrapper, also returns its codec and compressed value.
fn parse_message(offset: i64, msg: Bytes) -> Result<(LegacyMessage, Compression, Bytes), MessageSetError> {
    let expected = u32::from_be_bytes(msg[..4].try_into().expect("4 bytes"));
    let actual = CRC32.checksum(&msg[4..]);
    if expected != actual {
        return Err(MessageSetError::BadCrc { expected, actual });
    }
    let mut b = msg.slice(4..);
    let magic = b.get_i8();
    let attributes = b.get_u8();
    if magic != 0 && magic != 1 {
        return Err(MessageSetError::BadMagic(magic));
    }
    let timestamp = if magic == 1 { take_i64(&mut b)? } else { NO_TIMESTAMP };
    let key = take_bytes(&mut b)?;
    let value = take_bytes(&mut b)?;
    let codec = codec_of(attributes)?;
    let log_append_time = magic == 1 && attributes & ATTR_LOG_APPEND_TIME != 0;
    let inner = value.clone().unwrap_or_default();
    Ok((LegacyMessage { offset, magic, timestamp, log_append_time, key, value }, codec, inner))
}

fn take_i64(b: &mut Bytes) -> Result<i64, MessageSetError> {
    if b.remaining() < 8 {
        return Err(MessageSetError::Truncated);
    }
    Ok(b.get_i64())
}

fn take_bytes(b: &mut Bytes) -> Result<Option<Bytes>, MessageSetError> {
    if b.remaining() < 4 {
        return Err(MessageSetError::Truncated);
    }
    match b.get_i32() {
        -1 => Ok(None),
        n if n < 0 => Err(MessageSetError::BadLength(n as i64)),
        n if n as usize > b.remaining() => Err(MessageSetError::Truncated),
        n => Ok(Some(b.split_to(n as usize))),
    }
}

/// Decompresses a wrapper's inner set and appends its messages with absolute offsets.
fn expand_wrapper(
    wrapper: &LegacyMessage,
    codec: Compression,
    compressed: Bytes,
    budget: &mut usize,
    out: &mut Vec<LegacyMessage>,
) -> Result<(), MessageSetError> {
    let raw = Bytes::from(decompress(codec, &compressed, *budget)?);
    *budget -= raw.len();
    let mut inner = Vec::new();
    let mut buf = raw;
    while buf.has_remaining() {
        let Some((offset, msg)) = next_entry(&mut buf, false)? else {
            break;
        };
        let (mut m, inner_codec, _) = parse_message(offset, msg)?;
        if inner_codec != Compression::None {
            return Err(MessageSetError::NestedCompression);
        }
        if wrapper.log_append_time {
            m.timestamp = wrapper.timestamp;
            m.log_append_time = true;
        }
        inner.push(m);
    }
    // Magic 1 inner offsets are relative; the wrapper holds the last absolute offset.
    if let (1, Some(last)) = (wrapper.magic, inner.last().map(|m| m.offset)) {
        for m in &mut inner {
            m.offset += wrapper.offset - last;
        }
    }
    out.extend(inner);
    Ok(())
}

/// Up-converts a produced message set into one RecordBatch v2, compressed with the codec of
/// its (first) compressed wrapper, uncompressed otherwise (base offset 0;
/// the log assigns offsets). Magic 0 messages get timestamp -1 (none).
pub fn up_convert(data: &Bytes, max_decompressed: usize) -> Result<Vec<u8>, MessageSetError> {
    let (messages, codec) = decode_with_codec(data, max_decompressed, false)?;
    if messages.is_empty() {
        return Err(MessageSetError::Empty);
    }
    // Keep the producer's compression: the stored batch should not grow on disk.
    let mut builder = BatchBuilder::new().compression(codec);
    for m in messages {
        builder.push(NewRecord {
            timestamp: m.timestamp,
            key: m.key.map(|k| k.to_vec()),
            value: m.value.map(|v| v.to_vec()),
            headers: Vec::new(),
        });
    }
    Ok(builder.build())
}

/// How many bytes a down-converted message set may hold. Inflated and uncompressed, it can
/// be many times the bytes read, so it is bounded by what it converts to, not by those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetLimit {
    /// Bytes the whole set may hold.
    pub bytes_max: usize,
    /// Bytes its first message may take even past `bytes_max`: a message larger than the
    /// limit must still go, or its consumer could never get past it.
    pub first_message_max: usize,
}

impl SetLimit {
    /// No limit.
    pub const NONE: Self = Self { bytes_max: usize::MAX, first_message_max: usize::MAX };

    /// At most `bytes_max`, or the first message whatever its size.
    pub fn at_least_one_message(bytes_max: usize) -> Self {
        Self { bytes_max, first_message_max: usize::MAX }
    }

    /// Whether a message of `size` fits after `set_len` bytes.
    fn fits(&self, set_len: usize, size: usize) -> bool {
        set_len.saturating_add(size) <= self.bytes_max || (set_len == 0 && size <= self.first_message_max)
    }
}

/// Down-converts concatenated RecordBatch v2 bytes (as a fetch returns them) into an
/// uncompressed message set of `magic` 0 or 1, from `from_offset` on: records before it
/// (the first batch read may start before the fetch offset) are left out, as Kafka does
/// (`RecordsUtil.downConvert`); kafka-node hands every message it gets to the application,
/// so it would deliver them again. Control batches are skipped; a trailing partial batch is
/// dropped, as a fetch may end mid-batch.
///
/// The set holds whole messages up to `limit` (an old client fetches on from the last
/// offset it got); batches past the end, and those wholly before `from_offset`, are not
/// inflated. A batch that cannot be converted ends the set: its error is returned only
/// when no message was converted before it, so a consumer gets what precedes a broken
/// batch and, fetching from it, the error. zstd batches are converted too (to
/// uncompressed messages, as every batch is): Kafka refuses them (KIP-110), which leaves a
/// kafka-node consumer unable to read what librdkafka or KafkaJS wrote with zstd.
pub fn down_convert(
    batches: &[u8],
    magic: i8,
    from_offset: i64,
    max_decompressed: usize,
    limit: SetLimit,
) -> Result<Bytes, MessageSetError> {
    if magic != 0 && magic != 1 {
        return Err(MessageSetError::BadMagic(magic));
    }
    let mut out = BytesMut::with_capacity(batches.len().min(limit.bytes_max));
    let ended = |out: BytesMut, error: MessageSetError| match out.is_empty() {
        true => Err(error),
        false => Ok(out.freeze()),
    };
    let mut rest = batches;
    while rest.len() >= LENGTH_PREFIX_BYTES && limit.fits(out.len(), ENTRY_OVERHEAD + MESSAGE_V0_MIN) {
        let Ok(header) = BatchHeader::parse(rest) else {
            break;
        };
        if header.batch_length < 0 {
            return ended(out, MessageSetError::BadLength(header.batch_length as i64));
        }
        let total = header.total_bytes();
        if total > rest.len() {
            break;
        }
        if header.magic != 2 {
            return ended(out, MessageSetError::Batch(format!("stored batch has magic {}", header.magic)));
        }
        if !header.is_control() && header.last_offset() >= from_offset {
            let decoded = match records::decode_records(&rest[..total], max_decompressed) {
                Ok(decoded) => decoded,
                Err(e) => return ended(out, MessageSetError::Batch(e.to_string())),
            };
            let log_append_time = header.has_log_append_time();
            for r in decoded.iter().filter(|r| r.offset() >= from_offset) {
                if !limit.fits(out.len(), message_bytes(magic, r.key, r.value)) {
                    return Ok(out.freeze());
                }
                put_message(&mut out, magic, &r, log_append_time);
            }
        }
        rest = &rest[total..];
    }
    Ok(out.freeze())
}

/// Bytes one message entry of `magic` takes in a message set.
fn message_bytes(magic: i8, key: Option<&[u8]>, value: Option<&[u8]>) -> usize {
    let timestamp = if magic == 1 { 8 } else { 0 };
    ENTRY_OVERHEAD + MESSAGE_V0_MIN + timestamp + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len)
}

/// Appends one uncompressed message entry with a fresh CRC.
fn put_message(out: &mut BytesMut, magic: i8, r: &records::Record<'_>, log_append_time: bool) {
    let attributes = if magic == 1 && log_append_time { ATTR_LOG_APPEND_TIME } else { 0 };
    encode_message(out, r.offset(), magic, attributes, r.timestamp(), r.key, r.value);
}

/// The codec of a magic 0/1 message (the same numbering as RecordBatch v2 attributes).
fn codec_of(attributes: u8) -> Result<Compression, MessageSetError> {
    let bits = attributes & ATTR_CODEC_MASK;
    Compression::from_attributes(u16::from(bits)).map_err(|_| MessageSetError::BadCodec(bits))
}

/// Bounded decompression through the log's codecs (gzip, snappy raw and xerial, lz4, zstd).
fn decompress(codec: Compression, data: &[u8], max: usize) -> Result<Vec<u8>, MessageSetError> {
    kappa_log::compression::decompress(codec, data, max).map_err(|e| match e {
        RecordError::DecompressedTooLarge { .. } => MessageSetError::TooLarge { max },
        other => MessageSetError::Decompress(other.to_string()),
    })
}

fn put_nullable(out: &mut BytesMut, data: Option<&[u8]>) {
    match data {
        None => out.put_i32(-1),
        Some(d) => {
            out.put_i32(d.len() as i32);
            out.put_slice(d);
        }
    }
}

/// Encodes one message entry with its CRC (also what tests use to play an old producer).
pub fn encode_message(
    out: &mut BytesMut,
    offset: i64,
    magic: i8,
    attributes: u8,
    timestamp: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) {
    let mut msg = BytesMut::new();
    msg.put_u32(0);
    msg.put_i8(magic);
    msg.put_u8(attributes);
    if magic == 1 {
        msg.put_i64(timestamp);
    }
    put_nullable(&mut msg, key);
    put_nullable(&mut msg, value);
    let crc = CRC32.checksum(&msg[4..]);
    msg[..4].copy_from_slice(&crc.to_be_bytes());
    out.put_i64(offset);
    out.put_i32(msg.len() as i32);
    out.put_slice(&msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_log::batch;
    use proptest::prelude::*;
    use std::io::Write;

    const MAX: usize = 1 << 20;

    /// A decoded v2 record, owned, for comparisons.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct V2Record {
        offset: i64,
        timestamp: i64,
        log_append_time: bool,
        key: Option<Bytes>,
        value: Option<Bytes>,
    }

    fn records_of(batch_bytes: &[u8]) -> Vec<V2Record> {
        let header = batch::validate(batch_bytes, MAX).unwrap();
        let decoded = records::decode_records(batch_bytes, MAX).unwrap();
        decoded
            .iter()
            .map(|r| V2Record {
                offset: r.offset(),
                timestamp: r.timestamp(),
                log_append_time: header.has_log_append_time(),
                key: r.key.map(Bytes::copy_from_slice),
                value: r.value.map(Bytes::copy_from_slice),
            })
            .collect()
    }

    fn magic1_set() -> BytesMut {
        let mut set = BytesMut::new();
        encode_message(&mut set, 0, 1, 0, 1000, Some(b"k1"), Some(b"v1"));
        encode_message(&mut set, 1, 1, 0, 1005, None, Some(b"v2"));
        encode_message(&mut set, 2, 1, 0, 999, Some(b"k3"), None);
        set
    }

    #[test]
    fn up_converts_magic1_keeping_keys_values_timestamps() {
        let batch = up_convert(&magic1_set().freeze(), MAX).unwrap();
        let got: Vec<_> = records_of(&batch).into_iter().map(|r| (r.offset, r.timestamp, r.key, r.value)).collect();
        let b = |s: &'static [u8]| Some(Bytes::from_static(s));
        assert_eq!(got, vec![(0, 1000, b(b"k1"), b(b"v1")), (1, 1005, None, b(b"v2")), (2, 999, b(b"k3"), None)]);
    }

    #[test]
    fn up_converts_magic0_without_timestamps() {
        let mut set = BytesMut::new();
        encode_message(&mut set, 0, 0, 0, 0, Some(b"k"), Some(b"v"));
        let batch = up_convert(&set.freeze(), MAX).unwrap();
        let r = &records_of(&batch)[0];
        assert_eq!(
            (r.timestamp, r.key.as_deref(), r.value.as_deref()),
            (NO_TIMESTAMP, Some(&b"k"[..]), Some(&b"v"[..]))
        );
    }

    fn wrapper(codec: u8, compressed: &[u8], last_offset: i64, log_append: Option<i64>) -> Bytes {
        let mut set = BytesMut::new();
        let attributes = codec | if log_append.is_some() { ATTR_LOG_APPEND_TIME } else { 0 };
        encode_message(&mut set, last_offset, 1, attributes, log_append.unwrap_or(0), None, Some(compressed));
        set.freeze()
    }

    #[test]
    fn gzip_wrapper_expands_with_absolute_offsets() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&magic1_set()).unwrap();
        let gz = enc.finish().unwrap();
        let msgs = decode(&wrapper(1, &gz, 52, None), MAX, false).unwrap();
        let offsets: Vec<i64> = msgs.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [50, 51, 52]);
        assert_eq!(msgs[1].timestamp, 1005);
        // LogAppendTime on the wrapper overrides the inner timestamps.
        let msgs = decode(&wrapper(1, &gz, 2, Some(7777)), MAX, false).unwrap();
        assert!(msgs.iter().all(|m| m.timestamp == 7777 && m.log_append_time));
        let batch = up_convert(&wrapper(1, &gz, 2, None), MAX).unwrap();
        assert_eq!(records_of(&batch).len(), 3);
        let header = batch::validate(&batch, MAX).unwrap();
        assert_eq!(header.compression().unwrap(), Compression::Gzip, "the producer's codec is kept");
        assert_eq!(records_of(&batch), records_of(&up_convert(&magic1_set().freeze(), MAX).unwrap()));
    }

    #[test]
    fn snappy_xerial_wrapper_expands() {
        let inner = magic1_set();
        let block = snap::raw::Encoder::new().compress_vec(&inner).unwrap();
        let mut xerial = b"\x82SNAPPY\0".to_vec();
        xerial.extend_from_slice(&1i32.to_be_bytes());
        xerial.extend_from_slice(&1i32.to_be_bytes());
        xerial.extend_from_slice(&(block.len() as u32).to_be_bytes());
        xerial.extend_from_slice(&block);
        let msgs = decode(&wrapper(2, &xerial, 2, None), MAX, false).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].key.as_deref(), Some(&b"k1"[..]));
        // Raw snappy (librdkafka) too.
        assert_eq!(decode(&wrapper(2, &block, 2, None), MAX, false).unwrap().len(), 3);
        let batch = up_convert(&wrapper(2, &xerial, 2, None), MAX).unwrap();
        assert_eq!(batch::validate(&batch, MAX).unwrap().compression().unwrap(), Compression::Snappy);
        assert_eq!(records_of(&batch).len(), 3);
    }

    #[test]
    fn rejects_bad_crc_magic_nesting_and_truncation() {
        let mut set = magic1_set();
        let last = set.len() - 1;
        set[last] ^= 1;
        assert!(matches!(decode(&set.freeze(), MAX, false), Err(MessageSetError::BadCrc { .. })));

        let mut bad_magic = BytesMut::new();
        encode_message(&mut bad_magic, 0, 2, 0, 0, None, Some(b"x"));
        assert!(matches!(decode(&bad_magic.freeze(), MAX, false), Err(MessageSetError::BadMagic(2))));

        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&wrapper(0, b"", 0, None)).unwrap(); // harmless inner
        let inner_wrapper = wrapper(1, &enc.finish().unwrap(), 0, None);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&inner_wrapper).unwrap();
        let nested = wrapper(1, &enc.finish().unwrap(), 0, None);
        assert_eq!(decode(&nested, MAX, false), Err(MessageSetError::NestedCompression));

        let full = magic1_set().freeze();
        let cut = full.slice(..full.len() - 3);
        assert_eq!(decode(&cut, MAX, false), Err(MessageSetError::Truncated));
        assert_eq!(decode(&cut, MAX, true).unwrap().len(), 2);
        assert_eq!(up_convert(&Bytes::new(), MAX), Err(MessageSetError::Empty));
    }

    /// (key, value, timestamp)
    type Rec<'a> = (Option<&'a [u8]>, Option<&'a [u8]>, i64);

    fn v2_batch(base_offset: i64, records: &[Rec<'_>]) -> Vec<u8> {
        let mut builder = BatchBuilder::new();
        builder.base_offset = base_offset;
        for (k, v, ts) in records {
            builder.push(NewRecord::new(*k, *v, *ts));
        }
        builder.build()
    }

    #[test]
    fn down_converts_to_magic0_and_magic1() {
        let mut batches = v2_batch(100, &[(Some(b"a"), Some(b"1"), 10), (None, Some(b"2"), 20)]);
        batches.extend(v2_batch(102, &[(Some(b"c"), None, 30)]));
        for magic in [0i8, 1] {
            let set = down_convert(&batches, magic, 0, MAX, SetLimit::NONE).unwrap();
            let msgs = decode(&set, MAX, false).unwrap();
            let got: Vec<_> =
                msgs.iter().map(|m| (m.offset, m.magic, m.timestamp, m.key.clone(), m.value.clone())).collect();
            let ts = |t: i64| if magic == 1 { t } else { NO_TIMESTAMP };
            let b = |s: &'static [u8]| Some(Bytes::from_static(s));
            assert_eq!(
                got,
                vec![
                    (100, magic, ts(10), b(b"a"), b(b"1")),
                    (101, magic, ts(20), None, b(b"2")),
                    (102, magic, ts(30), b(b"c"), None),
                ]
            );
        }
    }

    #[test]
    fn down_convert_drops_partial_tail_and_control_batches() {
        let mut batches = v2_batch(0, &[(Some(b"a"), Some(b"1"), 1)]);
        let mut control = BatchBuilder::new().record(NewRecord::new(Some(&[0, 0, 0, 0]), Some(&[0, 0, 0, 0, 0, 0]), 2));
        control.base_offset = 1;
        control.control = true;
        batches.extend(control.build());
        let tail = v2_batch(2, &[(Some(b"b"), Some(b"2"), 3)]);
        batches.extend_from_slice(&tail[..tail.len() - 5]);
        let msgs = decode(&down_convert(&batches, 1, 0, MAX, SetLimit::NONE).unwrap(), MAX, false).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].key.as_deref(), Some(&b"a"[..]));
    }

    /// Three one-record messages in two batches (offsets 0, 1 | 2) and a message's bytes.
    fn three_messages() -> (Vec<u8>, usize) {
        let mut batches = v2_batch(0, &[(Some(b"a"), Some(b"1"), 1), (Some(b"b"), Some(b"2"), 2)]);
        batches.extend(v2_batch(2, &[(Some(b"c"), Some(b"3"), 3)]));
        let all = down_convert(&batches, 1, 0, MAX, SetLimit::NONE).unwrap();
        assert_eq!(all.len() % 3, 0);
        assert_eq!(all.len() / 3, message_bytes(1, Some(b"a"), Some(b"1")));
        (batches, all.len() / 3)
    }

    fn offsets_of(set: &Bytes) -> Vec<i64> {
        decode(set, MAX, false).unwrap().iter().map(|m| m.offset).collect()
    }

    /// Converted bytes, not the bytes read, are what the limit bounds: whole messages up to
    /// it, the first one whatever its size, if the limit lets it.
    #[test]
    fn down_convert_holds_whole_messages_within_the_limit() {
        let (batches, message_bytes) = three_messages();
        let offsets = |limit| offsets_of(&down_convert(&batches, 1, 0, MAX, limit).unwrap());
        let at_most = |bytes_max| SetLimit { bytes_max, first_message_max: 0 };
        assert_eq!(offsets(at_most(0)), [0i64; 0], "nothing");
        assert_eq!(offsets(at_most(message_bytes - 1)), [0i64; 0], "not even the first message");
        assert_eq!(offsets(SetLimit::at_least_one_message(0)), [0], "the first message goes");
        assert_eq!(offsets(SetLimit::at_least_one_message(1)), [0]);
        assert_eq!(offsets(SetLimit { bytes_max: 0, first_message_max: message_bytes }), [0]);
        assert_eq!(offsets(SetLimit { bytes_max: 0, first_message_max: message_bytes - 1 }), [0i64; 0]);
        assert_eq!(offsets(at_most(message_bytes)), [0]);
        assert_eq!(offsets(at_most(2 * message_bytes - 1)), [0], "never past the limit");
        assert_eq!(offsets(at_most(2 * message_bytes)), [0, 1]);
        assert_eq!(offsets(at_most(3 * message_bytes)), [0, 1, 2], "on into the next batch");
        let set = down_convert(&batches, 1, 0, MAX, at_most(3 * message_bytes - 1)).unwrap();
        assert_eq!(set.len(), 2 * message_bytes);
    }

    /// A batch that breaks: its own truncated copy, its length prefix fixed to match.
    fn broken_batch(base_offset: i64) -> Vec<u8> {
        let mut broken = v2_batch(base_offset, &[(None, Some(b"4"), 4)]);
        broken.truncate(broken.len() - 3);
        let len = (broken.len() - LENGTH_PREFIX_BYTES) as i32;
        broken[8..12].copy_from_slice(&len.to_be_bytes());
        broken
    }

    /// The messages before a batch that cannot be converted go; its error is reported when
    /// there are none, which is when a consumer fetches from it. A batch past the end is not
    /// inflated.
    #[test]
    fn down_convert_answers_the_messages_before_a_broken_batch() {
        let (batches, message_bytes) = three_messages();
        let all = down_convert(&batches, 1, 0, MAX, SetLimit::NONE).unwrap();
        let with_broken = [&batches[..], &broken_batch(3)[..]].concat();
        assert_eq!(down_convert(&with_broken, 1, 0, MAX, SetLimit::NONE).unwrap(), all);
        assert!(down_convert(&with_broken, 1, 3, MAX, SetLimit::NONE).is_err(), "from the broken batch");
        assert!(down_convert(&broken_batch(0), 1, 0, MAX, SetLimit::NONE).is_err());
        let limit = SetLimit { bytes_max: 3 * message_bytes, first_message_max: 0 };
        assert_eq!(down_convert(&with_broken, 1, 0, MAX, limit).unwrap(), all, "full before the broken batch");
        // Nor is one wholly before the fetch offset.
        let after_broken = [&broken_batch(0)[..], &v2_batch(1, &[(None, Some(b"5"), 5)])[..]].concat();
        assert_eq!(offsets_of(&down_convert(&after_broken, 1, 1, MAX, SetLimit::NONE).unwrap()), [1]);
    }

    /// The set starts at the fetch offset, inside a (compressed) batch or not.
    #[test]
    fn down_convert_starts_at_the_fetch_offset() {
        for compression in [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let mut batches = Vec::new();
            for base in [10, 20] {
                let mut builder = BatchBuilder::new().compression(compression);
                builder.base_offset = base;
                for i in 0..10 {
                    builder.push(NewRecord::new(None, Some(format!("v{}", base + i).as_bytes()), 1));
                }
                batches.extend(builder.build());
            }
            let offsets = |from| offsets_of(&down_convert(&batches, 0, from, MAX, SetLimit::NONE).unwrap());
            assert_eq!(offsets(0), (10..30).collect::<Vec<_>>(), "{compression:?}");
            assert_eq!(offsets(13), (13..30).collect::<Vec<_>>(), "{compression:?}");
            assert_eq!(offsets(20), (20..30).collect::<Vec<_>>(), "{compression:?}");
            assert_eq!(offsets(29), [29], "{compression:?}");
            assert_eq!(offsets(30), [0i64; 0], "{compression:?}");
        }
    }

    proptest! {
        #[test]
        fn v2_to_magic1_to_v2_roundtrip(
            base in 0i64..1_000_000,
            recs in proptest::collection::vec(
                (proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
                 0i64..2_000_000_000_000),
                1..20),
        ) {
            let refs: Vec<Rec<'_>> =
                recs.iter().map(|(k, v, t)| (k.as_deref(), v.as_deref(), *t)).collect();
            let original = v2_batch(base, &refs);
            let set = down_convert(&original, 1, 0, MAX, SetLimit::NONE).unwrap();
            let back = up_convert(&set, MAX).unwrap();
            let a: Vec<_> = records_of(&original).into_iter().map(|r| (r.timestamp, r.key, r.value)).collect();
            let b: Vec<_> = records_of(&back).into_iter().map(|r| (r.timestamp, r.key, r.value)).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&Bytes::from(data.clone()), MAX, true);
            let _ = down_convert(&data, 1, 0, MAX, SetLimit::NONE);
        }
    }
}
