//! Kafka RecordBatch v2 headers: parsing, validation and the few fields the log rewrites.
//!
//! A batch is stored on disk exactly as a producer sent it, except for the base offset,
//! which the log assigns on append. The CRC (CRC-32C over `attributes..end`) does not
//! cover the base offset, so rewriting it keeps the CRC valid.
//!
//! ```text
//! offset  size  field
//!      0     8  base_offset
//!      8     4  batch_length            (bytes after this field)
//!     12     4  partition_leader_epoch
//!     16     1  magic                   (= 2)
//!     17     4  crc                     (CRC-32C of bytes 21..)
//!     21     2  attributes              (bits 0-2 codec, 3 timestamp type, 4 transactional, 5 control)
//!     23     4  last_offset_delta
//!     27     8  base_timestamp
//!     35     8  max_timestamp
//!     43     8  producer_id
//!     51     2  producer_epoch
//!     53     4  base_sequence
//!     57     4  records_count
//!     61     -  records
//! ```

use thiserror::Error;

/// Bytes before the records.
pub const HEADER_BYTES: usize = 61;
/// Bytes of `base_offset` plus `batch_length`: the prefix that says how long a batch is.
pub const LENGTH_PREFIX_BYTES: usize = 12;
/// The only batch format the log stores.
pub const MAGIC_V2: u8 = 2;
/// Offset of the CRC-covered region (attributes..end).
const CRC_START: usize = 21;

const ATTR_COMPRESSION_MASK: u16 = 0x07;
const ATTR_LOG_APPEND_TIME: u16 = 0x08;
const ATTR_TRANSACTIONAL: u16 = 0x10;
const ATTR_CONTROL: u16 = 0x20;

/// Why a batch was rejected. Every variant names what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("record batch is truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("record batch length {length} is invalid (must be between {min} and {max} bytes)")]
    BadLength { length: i64, min: usize, max: usize },
    #[error("record batch magic is {0}, only magic 2 (RecordBatch v2) is stored")]
    BadMagic(u8),
    #[error("record batch CRC mismatch: header says {expected:#010x}, contents hash to {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error(
        "record batch has {records_count} records but last_offset_delta {last_offset_delta}; a producer's batch must have last_offset_delta = records_count - 1"
    )]
    CountMismatch { records_count: i32, last_offset_delta: i32 },
    #[error("record batch has an unknown compression codec {0}")]
    BadCodec(u16),
    #[error("record batch has {0} records; a batch must hold at least one")]
    Empty(i32),
}

/// Compression codec from the batch attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn from_attributes(attributes: u16) -> Result<Self, BatchError> {
        Ok(match attributes & ATTR_COMPRESSION_MASK {
            0 => Self::None,
            1 => Self::Gzip,
            2 => Self::Snappy,
            3 => Self::Lz4,
            4 => Self::Zstd,
            other => return Err(BatchError::BadCodec(other)),
        })
    }

    pub fn attribute_bits(self) -> u16 {
        match self {
            Self::None => 0,
            Self::Gzip => 1,
            Self::Snappy => 2,
            Self::Lz4 => 3,
            Self::Zstd => 4,
        }
    }
}

/// The parsed fixed-size header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after the `batch_length` field.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: u8,
    pub crc: u32,
    pub attributes: u16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Parses the header at the start of `bytes` without checking the CRC.
    pub fn parse(bytes: &[u8]) -> Result<Self, BatchError> {
        if bytes.len() < HEADER_BYTES {
            return Err(BatchError::Truncated { needed: HEADER_BYTES, available: bytes.len() });
        }
        let header = Self {
            base_offset: be_i64(bytes, 0),
            batch_length: be_i32(bytes, 8),
            partition_leader_epoch: be_i32(bytes, 12),
            magic: bytes[16],
            crc: be_u32(bytes, 17),
            attributes: be_u16(bytes, 21),
            last_offset_delta: be_i32(bytes, 23),
            base_timestamp: be_i64(bytes, 27),
            max_timestamp: be_i64(bytes, 35),
            producer_id: be_i64(bytes, 43),
            producer_epoch: be_i16(bytes, 51),
            base_sequence: be_i32(bytes, 53),
            records_count: be_i32(bytes, 57),
        };
        if header.magic != MAGIC_V2 {
            return Err(BatchError::BadMagic(header.magic));
        }
        Ok(header)
    }

    /// Total bytes of the batch including the 12-byte length prefix.
    pub fn total_bytes(&self) -> usize {
        self.batch_length as usize + LENGTH_PREFIX_BYTES
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// The offset after this batch: where the next batch starts.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_attributes(self.attributes)
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    pub fn has_log_append_time(&self) -> bool {
        self.attributes & ATTR_LOG_APPEND_TIME != 0
    }

    /// Whether the batch carries an idempotent producer identity.
    pub fn has_producer_id(&self) -> bool {
        self.producer_id >= 0
    }

    /// The sequence number of the last record (sequences wrap at i32::MAX).
    pub fn last_sequence(&self) -> i32 {
        if self.base_sequence < 0 {
            return -1;
        }
        let last = i64::from(self.base_sequence) + i64::from(self.last_offset_delta);
        (last % (i64::from(i32::MAX) + 1)) as i32
    }
}

/// Reads the total length of the batch starting at `bytes` (base offset + length prefix +
/// body) after checking it against `[HEADER_BYTES, max_batch_bytes]`.
pub fn batch_total_len(bytes: &[u8], max_batch_bytes: usize) -> Result<usize, BatchError> {
    if bytes.len() < LENGTH_PREFIX_BYTES {
        return Err(BatchError::Truncated { needed: LENGTH_PREFIX_BYTES, available: bytes.len() });
    }
    let length = i64::from(be_i32(bytes, 8));
    let total = length + LENGTH_PREFIX_BYTES as i64;
    let max = i64::try_from(max_batch_bytes).unwrap_or(i64::MAX);
    if total < HEADER_BYTES as i64 || total > max {
        return Err(BatchError::BadLength { length: total, min: HEADER_BYTES, max: max_batch_bytes });
    }
    Ok(total as usize)
}

/// The batches of `bytes`, whole batches back to back as a partition read returns them, in
/// order with their headers; a length or header that does not parse ends the walk with its
/// error.
pub fn batches(bytes: &[u8]) -> impl Iterator<Item = Result<(BatchHeader, &[u8]), BatchError>> + '_ {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = batch_total_len(rest, rest.len()).and_then(|length| {
            let (batch, after) = rest.split_at(length);
            BatchHeader::parse(batch).map(|header| (header, batch, after))
        });
        match parsed {
            Ok((header, batch, after)) => {
                rest = after;
                Some(Ok((header, batch)))
            }
            Err(e) => {
                rest = &[];
                Some(Err(e))
            }
        }
    })
}

/// Validates one complete batch (exactly `bytes`): length, magic, codec and CRC. Used on
/// append and by recovery, so a batch that fails here is never served to a reader.
pub fn validate(bytes: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, BatchError> {
    let total = batch_total_len(bytes, max_batch_bytes)?;
    if total != bytes.len() {
        return Err(BatchError::BadLength { length: bytes.len() as i64, min: total, max: total });
    }
    let header = BatchHeader::parse(bytes)?;
    header.compression()?;
    let actual = crc32c::crc32c(&bytes[CRC_START..]);
    if actual != header.crc {
        return Err(BatchError::BadCrc { expected: header.crc, actual });
    }
    if header.records_count < 1 || header.last_offset_delta < 0 {
        return Err(BatchError::Empty(header.records_count));
    }
    Ok(header)
}

/// Stricter check for batches arriving from a producer: records are contiguous, so the
/// record count must match the offset span.
pub fn validate_produced(bytes: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, BatchError> {
    let header = validate(bytes, max_batch_bytes)?;
    if i64::from(header.records_count) != i64::from(header.last_offset_delta) + 1 {
        return Err(BatchError::CountMismatch {
            records_count: header.records_count,
            last_offset_delta: header.last_offset_delta,
        });
    }
    Ok(header)
}

/// Overwrites the base offset (not covered by the CRC).
pub fn set_base_offset(bytes: &mut [u8], base_offset: i64) {
    bytes[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Sets LogAppendTime: the timestamp-type bit plus max_timestamp, then a fresh CRC.
pub fn set_log_append_time(bytes: &mut [u8], now_ms: i64) {
    let attributes = be_u16(bytes, 21) | ATTR_LOG_APPEND_TIME;
    bytes[21..23].copy_from_slice(&attributes.to_be_bytes());
    bytes[35..43].copy_from_slice(&now_ms.to_be_bytes());
    rewrite_crc(bytes);
}

/// Recomputes the CRC over attributes..end after a rewrite of covered fields.
pub fn rewrite_crc(bytes: &mut [u8]) {
    let crc = crc32c::crc32c(&bytes[CRC_START..]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
}

pub(crate) fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub(crate) fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{BatchBuilder, NewRecord};

    #[test]
    fn batches_walks_whole_batches_and_ends_at_a_torn_one_with_its_error() {
        let mut bytes = Vec::new();
        for (base_offset, count) in [(0, 3), (3, 2)] {
            let mut builder = BatchBuilder::new();
            builder.base_offset = base_offset;
            for _ in 0..count {
                builder.push(NewRecord::new(Some(b"k"), Some(b"v"), 0));
            }
            bytes.extend(builder.build());
        }
        let walked: Vec<(i64, i32, usize)> = batches(&bytes)
            .map(|b| b.map(|(h, batch)| (h.base_offset, h.records_count, batch.len())).unwrap())
            .collect();
        assert_eq!(walked.iter().map(|w| (w.0, w.1)).collect::<Vec<_>>(), [(0, 3), (3, 2)]);
        assert_eq!(walked.iter().map(|w| w.2).sum::<usize>(), bytes.len());

        let torn = &bytes[..bytes.len() - 1];
        let mut walk = batches(torn);
        assert!(walk.next().unwrap().is_ok());
        assert!(matches!(walk.next(), Some(Err(BatchError::BadLength { .. }))));
        assert!(walk.next().is_none(), "the walk ends after an error");
    }
}
