//! Bounds-checked primitives for the hand-written (non-flexible) legacy layouts.
//!
//! Every length read from the wire is checked against the bytes that remain before it is
//! used, so a lying length is an error, never an allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;

use super::LegacyError;

/// Reads big-endian primitives from a request body.
pub struct Reader<'a> {
    buf: &'a mut Bytes,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a mut Bytes) -> Self {
        Self { buf }
    }

    fn need(&self, n: usize) -> Result<(), LegacyError> {
        if self.buf.remaining() < n {
            return Err(LegacyError::Truncated { needed: n, available: self.buf.remaining() });
        }
        Ok(())
    }

    pub fn i8(&mut self) -> Result<i8, LegacyError> {
        self.need(1)?;
        Ok(self.buf.get_i8())
    }

    pub fn i16(&mut self) -> Result<i16, LegacyError> {
        self.need(2)?;
        Ok(self.buf.get_i16())
    }

    pub fn i32(&mut self) -> Result<i32, LegacyError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }

    pub fn i64(&mut self) -> Result<i64, LegacyError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }

    pub fn bool(&mut self) -> Result<bool, LegacyError> {
        Ok(self.i8()? != 0)
    }

    /// `i16` length then UTF-8; -1 is null.
    pub fn nullable_string(&mut self, field: &'static str) -> Result<Option<StrBytes>, LegacyError> {
        let len = self.i16()?;
        if len < 0 {
            return if len == -1 { Ok(None) } else { Err(LegacyError::BadLength { field, length: len as i64 }) };
        }
        self.need(len as usize)?;
        let raw = self.buf.split_to(len as usize);
        StrBytes::from_utf8(raw).map(Some).map_err(|_| LegacyError::BadUtf8(field))
    }

    pub fn string(&mut self, field: &'static str) -> Result<StrBytes, LegacyError> {
        self.nullable_string(field)?.ok_or(LegacyError::Null(field))
    }

    /// `i32` length then bytes; -1 is null.
    pub fn nullable_bytes(&mut self, field: &'static str) -> Result<Option<Bytes>, LegacyError> {
        let len = self.i32()?;
        if len < 0 {
            return if len == -1 { Ok(None) } else { Err(LegacyError::BadLength { field, length: len as i64 }) };
        }
        self.need(len as usize)?;
        Ok(Some(self.buf.split_to(len as usize)))
    }

    /// `i32` element count; each element takes at least `min_element_bytes`, so a count the
    /// remaining bytes cannot hold is rejected before anything is sized from it.
    pub fn array_len(&mut self, field: &'static str, min_element_bytes: usize) -> Result<usize, LegacyError> {
        let count = self.i32()?;
        if count < 0 {
            return Err(LegacyError::BadLength { field, length: count as i64 });
        }
        let count = count as usize;
        if count.saturating_mul(min_element_bytes.max(1)) > self.buf.remaining() {
            return Err(LegacyError::BadLength { field, length: count as i64 });
        }
        Ok(count)
    }

    /// Reads `count` elements with `read`.
    pub fn array<T>(
        &mut self,
        field: &'static str,
        min_element_bytes: usize,
        mut read: impl FnMut(&mut Self) -> Result<T, LegacyError>,
    ) -> Result<Vec<T>, LegacyError> {
        let count = self.array_len(field, min_element_bytes)?;
        // The request's decode budget (`request::decode_request`): an element in memory is
        // many times its bytes on the wire, so the count alone could ask for gigabytes.
        kafka_protocol::protocol::budget::charge(count, std::mem::size_of::<T>())
            .map_err(|_| LegacyError::TooLarge { field, count })?;
        let mut out = Vec::with_capacity(count.min(PRESIZED_ELEMENTS_MAX));
        for _ in 0..count {
            out.push(read(self)?);
        }
        Ok(out)
    }
}

/// Most elements an array is pre-sized for; longer ones grow as elements decode.
const PRESIZED_ELEMENTS_MAX: usize = 1024;

pub fn put_string<B: BufMut>(out: &mut B, s: &str) {
    out.put_i16(s.len() as i16);
    out.put_slice(s.as_bytes());
}

pub fn put_nullable_string(out: &mut BytesMut, s: Option<&str>) {
    match s {
        None => out.put_i16(-1),
        Some(s) => put_string(out, s),
    }
}

pub fn put_array_len<B: BufMut>(out: &mut B, len: usize) {
    out.put_i32(len as i32);
}

/// Non-nullable bytes as the old Fetch wrote MessageSets: length then data (one
/// `put_slice` of it, which a [`crate::frame::SpliceBuf`] splices).
pub fn put_bytes<B: BufMut>(out: &mut B, data: &[u8]) {
    out.put_i32(data.len() as i32);
    out.put_slice(data);
}
