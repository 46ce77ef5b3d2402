//! Sparse per-segment indexes, kept in memory and written beside a segment when it is
//! closed (or at a clean shutdown). A missing or damaged index file is rebuilt by scanning
//! its segment, so index files are an optimisation, never the source of truth.
//!
//! File layout (big-endian):
//! ```text
//! magic "KIDX" | version u8 (1) | kind u8 (1 offset, 2 time) | reserved u16 | count u32 | crc32c u32 of entries | entries
//! offset entry (8 bytes):  relative_offset u32, position u32
//! time entry  (12 bytes):  max_timestamp_so_far i64, relative_offset u32
//! ```

use crate::batch::{be_i64, be_u32};

const MAGIC: &[u8; 4] = b"KIDX";
const VERSION: u8 = 1;
const KIND_OFFSET: u8 = 1;
const KIND_TIME: u8 = 2;
const FILE_HEADER_BYTES: usize = 16;

/// Offset index: for every ~`index_interval_bytes` of log, the first offset of a batch and
/// its byte position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetIndex {
    entries: Vec<(u32, u32)>,
}

/// Time index: entries whose timestamp is the largest seen so far in the segment, with the
/// base offset of the batch that carried it; monotonic in both fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeIndex {
    entries: Vec<(i64, u32)>,
}

impl OffsetIndex {
    pub fn push(&mut self, relative_offset: u32, position: u32) {
        debug_assert!(
            self.entries.last().is_none_or(|&(o, p)| o < relative_offset && p < position),
            "offset index must grow"
        );
        self.entries.push((relative_offset, position));
    }

    /// Position of the last indexed batch starting at or before `relative_offset` (0 if none).
    pub fn floor_position(&self, relative_offset: u32) -> u32 {
        let i = self.entries.partition_point(|&(o, _)| o <= relative_offset);
        if i == 0 { 0 } else { self.entries[i - 1].1 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops entries at or past a byte position (after a truncation).
    pub fn truncate_to_position(&mut self, position: u32) {
        self.entries.retain(|&(_, p)| p < position);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * 8);
        for &(o, p) in &self.entries {
            body.extend_from_slice(&o.to_be_bytes());
            body.extend_from_slice(&p.to_be_bytes());
        }
        encode_file(KIND_OFFSET, self.entries.len(), body)
    }

    /// Decodes and checks an index file against its segment's size: entries must be
    /// strictly increasing and point inside the segment.
    pub fn decode(bytes: &[u8], segment_bytes: u64) -> Option<Self> {
        let body = decode_file(bytes, KIND_OFFSET, 8)?;
        let entries: Vec<(u32, u32)> = body.chunks_exact(8).map(|c| (be_u32(c, 0), be_u32(c, 4))).collect();
        let increasing = entries.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        let inside = entries.last().is_none_or(|&(_, p)| u64::from(p) < segment_bytes);
        (increasing && inside).then_some(Self { entries })
    }
}

impl TimeIndex {
    /// Records `max_timestamp` for a batch if it is the largest so far.
    pub fn observe(&mut self, max_timestamp: i64, relative_offset: u32) {
        if self.entries.last().is_none_or(|&(t, _)| max_timestamp > t) {
            self.entries.push((max_timestamp, relative_offset));
        }
    }

    /// Relative offset of the first batch that may hold a timestamp >= `timestamp`, or None
    /// when every timestamp in the segment is smaller.
    pub fn lookup(&self, timestamp: i64) -> Option<u32> {
        let i = self.entries.partition_point(|&(t, _)| t < timestamp);
        self.entries.get(i).map(|&(_, o)| o)
    }

    pub fn max_timestamp(&self) -> Option<i64> {
        self.entries.last().map(|&(t, _)| t)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * 12);
        for &(t, o) in &self.entries {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&o.to_be_bytes());
        }
        encode_file(KIND_TIME, self.entries.len(), body)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let body = decode_file(bytes, KIND_TIME, 12)?;
        let entries: Vec<(i64, u32)> = body.chunks_exact(12).map(|c| (be_i64(c, 0), be_u32(c, 8))).collect();
        entries.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1).then_some(Self { entries })
    }
}

fn encode_file(kind: u8, count: usize, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILE_HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_file(bytes: &[u8], kind: u8, entry_bytes: usize) -> Option<&[u8]> {
    if bytes.len() < FILE_HEADER_BYTES || &bytes[0..4] != MAGIC || bytes[4] != VERSION || bytes[5] != kind {
        return None;
    }
    let count = be_u32(bytes, 8) as usize;
    let body = &bytes[FILE_HEADER_BYTES..];
    (body.len() == count.checked_mul(entry_bytes)? && crc32c::crc32c(body) == be_u32(bytes, 12)).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_floor_and_round_trip() {
        let mut index = OffsetIndex::default();
        index.push(0, 0);
        index.push(10, 4096);
        index.push(25, 9000);
        assert_eq!(index.floor_position(0), 0);
        assert_eq!(index.floor_position(9), 0);
        assert_eq!(index.floor_position(10), 4096);
        assert_eq!(index.floor_position(1000), 9000);
        let bytes = index.encode();
        assert_eq!(OffsetIndex::decode(&bytes, 10_000), Some(index.clone()));
        assert_eq!(OffsetIndex::decode(&bytes, 9000), None, "entry past the segment end is rejected");
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(OffsetIndex::decode(&flipped, 10_000), None, "CRC catches a flipped bit");
        assert_eq!(OffsetIndex::decode(&bytes[..bytes.len() - 1], 10_000), None);
    }

    #[test]
    fn time_index_keeps_running_maximum() {
        let mut index = TimeIndex::default();
        index.observe(100, 0);
        index.observe(90, 1);
        index.observe(200, 5);
        assert_eq!(index.lookup(50), Some(0));
        assert_eq!(index.lookup(100), Some(0));
        assert_eq!(index.lookup(101), Some(5));
        assert_eq!(index.lookup(201), None);
        assert_eq!(TimeIndex::decode(&index.encode()), Some(index));
    }
}
