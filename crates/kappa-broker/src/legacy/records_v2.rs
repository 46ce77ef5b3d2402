//! Reading records out of RecordBatch v2 bytes, for down-conversion to magic 0/1.
//!
//! Only what down-conversion needs: absolute offset, timestamp, key and value. Headers are
//! skipped (magic 0/1 cannot carry them).

use bytes::Bytes;
use kappa_log::batch::{BatchHeader, HEADER_BYTES};

use super::compression::{Codec, decompress};
use super::message_set::MessageSetError;

/// One record of a v2 batch with absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Record {
    pub offset: i64,
    pub timestamp: i64,
    pub log_append_time: bool,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

/// Decodes the records of one complete v2 batch (`bytes` is exactly the batch).
pub fn batch_records(
    header: &BatchHeader,
    bytes: &[u8],
    max_decompressed: usize,
) -> Result<Vec<V2Record>, MessageSetError> {
    let codec = Codec::from_bits((header.attributes & 0x07) as u8)?;
    let body = Bytes::from(decompress(codec, &bytes[HEADER_BYTES..], max_decompressed)?);
    let count = header.records_count.max(0) as usize;
    // Each record takes at least 7 bytes, so the body bounds the count we pre-size for.
    let mut out = Vec::with_capacity(count.min(body.len() / 7));
    let mut cursor = Cursor { buf: body, pos: 0 };
    for _ in 0..count {
        out.push(read_record(&mut cursor, header)?);
    }
    Ok(out)
}

struct Cursor {
    buf: Bytes,
    pos: usize,
}

impl Cursor {
    fn byte(&mut self) -> Result<u8, MessageSetError> {
        let b = *self.buf.get(self.pos).ok_or(MessageSetError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn unsigned_varint(&mut self) -> Result<u64, MessageSetError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(MessageSetError::BadVarint)
    }

    fn varlong(&mut self) -> Result<i64, MessageSetError> {
        let v = self.unsigned_varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn varint(&mut self) -> Result<i32, MessageSetError> {
        i32::try_from(self.varlong()?).map_err(|_| MessageSetError::BadVarint)
    }

    fn take(&mut self, n: usize) -> Result<Bytes, MessageSetError> {
        if n > self.buf.len() - self.pos {
            return Err(MessageSetError::Truncated);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    fn nullable_bytes(&mut self) -> Result<Option<Bytes>, MessageSetError> {
        match self.varint()? {
            -1 => Ok(None),
            n if n < 0 => Err(MessageSetError::BadLength(n as i64)),
            n => self.take(n as usize).map(Some),
        }
    }
}

fn read_record(c: &mut Cursor, header: &BatchHeader) -> Result<V2Record, MessageSetError> {
    let length = c.varint()?;
    if length < 0 {
        return Err(MessageSetError::BadLength(length as i64));
    }
    let end = c.pos.checked_add(length as usize).filter(|&e| e <= c.buf.len()).ok_or(MessageSetError::Truncated)?;
    let _attributes = c.byte()?;
    let timestamp_delta = c.varlong()?;
    let offset_delta = c.varint()?;
    let key = c.nullable_bytes()?;
    let value = c.nullable_bytes()?;
    if c.pos > end {
        return Err(MessageSetError::BadLength(length as i64));
    }
    // Headers are dropped: jump to the end of the record.
    c.pos = end;
    let log_append_time = header.has_log_append_time();
    let timestamp =
        if log_append_time { header.max_timestamp } else { header.base_timestamp.wrapping_add(timestamp_delta) };
    Ok(V2Record { offset: header.base_offset + offset_delta as i64, timestamp, log_append_time, key, value })
}
