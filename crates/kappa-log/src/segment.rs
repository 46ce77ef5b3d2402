//! One segment: a file of whole RecordBatch v2 batches starting at `base_offset`, with its
//! sparse offset and time indexes.
//!
//! Files: `{base_offset:020}.log`, `.index`, `.timeindex` (see docs/format.md).
//! Invariant: bytes below `size` are whole batches that passed validation; a segment is
//! only appended to at `size`, so readers may read any range below a `size` they observed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::{self, BatchHeader, LENGTH_PREFIX_BYTES};
use crate::config::MAX_MESSAGE_BYTES_LIMIT;
use crate::error::{LogError, Result};
use crate::index::{OffsetIndex, TimeIndex};
use crate::io::{self, OpenMode, Storage, StorageFile};

/// Bytes of log between two offset-index entries.
pub const INDEX_INTERVAL_BYTES: u64 = 4096;
/// Largest batch recovery will accept: anything larger is damage, not data.
pub const RECOVERY_BATCH_BYTES_MAX: usize = MAX_MESSAGE_BYTES_LIMIT + 64 * 1024;
/// Bytes read per I/O while scanning a segment.
const SCAN_CHUNK_BYTES: usize = 1024 * 1024;

pub fn log_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.log")
}
pub fn offset_index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.index")
}
pub fn time_index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.timeindex")
}

/// Parses `{base_offset:020}.log` back into the base offset.
pub fn parse_log_file_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// A segment's file and what is known about its contents.
pub struct Segment {
    pub base_offset: i64,
    pub file: Arc<dyn StorageFile>,
    pub path: PathBuf,
    /// Bytes of whole, valid batches.
    pub size: u64,
    /// Offset after the last batch (`base_offset` when empty).
    pub next_offset: i64,
    /// Largest batch max_timestamp, or -1 when empty.
    pub max_timestamp: i64,
    /// When the first batch was appended (wall clock ms), for `segment.ms`; None when empty.
    pub first_append_ms: Option<i64>,
    /// Broker time (ms) of the last append, or of the file's last change when it was opened;
    /// None when unknown. What retention counts from for records without a timestamp.
    pub last_append_ms: Option<i64>,
    pub offset_index: OffsetIndex,
    pub time_index: TimeIndex,
    /// Why bytes past `size` could not be read when a closed segment was opened. Such a
    /// segment keeps its file untouched; reads stop at the damage.
    pub damage: Option<String>,
    bytes_since_index_entry: u64,
}

/// How far [`Segment::open`] may trust what is on disk without scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Scan and validate every batch.
    Nothing,
    /// Use the index files if present and valid (a segment synced when it was closed).
    IndexesIfValid,
    /// Use the index files if valid and the file has exactly this size (clean shutdown).
    Size(u64),
}

/// What opening a segment found: where the valid prefix ends and why the scan stopped there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Whether the batches were read and validated (false when the indexes were trusted).
    pub scanned: bool,
    /// Why bytes past `valid_bytes` were not accepted (None when the whole file is valid).
    pub stop_reason: Option<String>,
}

impl Segment {
    /// Creates an empty segment file and makes its directory entry durable.
    pub fn create(fs: &dyn Storage, dir: &Path, base_offset: i64) -> Result<Self> {
        let path = dir.join(log_file_name(base_offset));
        let file = fs.open(&path, OpenMode::Create).map_err(|e| LogError::io(&path, e))?;
        fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
        Ok(Self::empty(base_offset, file, path))
    }

    fn empty(base_offset: i64, file: Arc<dyn StorageFile>, path: PathBuf) -> Self {
        Self {
            base_offset,
            file,
            path,
            size: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            first_append_ms: None,
            last_append_ms: None,
            offset_index: OffsetIndex::default(),
            time_index: TimeIndex::default(),
            damage: None,
            bytes_since_index_entry: 0,
        }
    }

    /// Opens an existing segment. When `trust` allows, the index files are used if present
    /// and valid, and only the headers after the last index entry are walked; otherwise
    /// (or when the indexes are missing or damaged) the whole file is scanned and any
    /// invalid tail is reported in the outcome (the caller decides whether to truncate).
    pub fn open(fs: &dyn Storage, dir: &Path, base_offset: i64, trust: Trust) -> Result<(Self, ScanOutcome)> {
        let path = dir.join(log_file_name(base_offset));
        let file = fs.open(&path, OpenMode::ReadWrite).map_err(|e| LogError::io(&path, e))?;
        let file_bytes = file.len().map_err(|e| LogError::io(&path, e))?;
        let mut segment = Self::empty(base_offset, file, path);
        segment.last_append_ms = segment.file.modified_ms();
        let trusted_size = match trust {
            Trust::Nothing => None,
            Trust::IndexesIfValid => Some(file_bytes),
            Trust::Size(size) => Some(size).filter(|&s| s == file_bytes),
        };
        if let Some(size) = trusted_size
            && segment.load_indexes(fs, dir, size)
        {
            return Ok((segment, ScanOutcome { valid_bytes: size, file_bytes, scanned: false, stop_reason: None }));
        }
        let outcome = segment.rebuild_from_scan(file_bytes)?;
        Ok((segment, outcome))
    }

    /// Loads index files and the tail after the last offset-index entry. Returns false when
    /// they are missing, damaged, or disagree with the log.
    fn load_indexes(&mut self, fs: &dyn Storage, dir: &Path, size: u64) -> bool {
        let offset_bytes = io::read_file(fs, &dir.join(offset_index_file_name(self.base_offset)));
        let time_bytes = io::read_file(fs, &dir.join(time_index_file_name(self.base_offset)));
        let (Ok(offset_bytes), Ok(time_bytes)) = (offset_bytes, time_bytes) else { return false };
        let (Some(offset_index), Some(time_index)) =
            (OffsetIndex::decode(&offset_bytes, size.max(1)), TimeIndex::decode(&time_bytes))
        else {
            return false;
        };
        // The indexes say where batches start; find the last batch's end from the last entry.
        let from = u64::from(offset_index.floor_position(u32::MAX));
        let mut last: Option<BatchHeader> = None;
        let walked = walk_headers(self.file.as_ref(), from, size, |_, header| {
            last = Some(*header);
            true
        });
        if walked.ok() != Some(size) {
            return false;
        }
        self.size = size;
        self.next_offset = last.map_or(self.base_offset, |h| h.next_offset());
        self.max_timestamp = time_index.max_timestamp().unwrap_or(-1);
        self.offset_index = offset_index;
        self.time_index = time_index;
        true
    }

    /// Scans the file from the start, validating every batch, and rebuilds all in-memory
    /// state from the valid prefix.
    pub fn rebuild_from_scan(&mut self, file_bytes: u64) -> Result<ScanOutcome> {
        let mut fresh = Self::empty(self.base_offset, self.file.clone(), self.path.clone());
        let outcome = scan_batches(self.file.as_ref(), self.base_offset, file_bytes, |position, header, _| {
            fresh.record_batch(position, header);
        })
        .map_err(|e| LogError::io(&self.path, e))?;
        fresh.first_append_ms = self.first_append_ms;
        fresh.last_append_ms = self.last_append_ms;
        *self = fresh;
        Ok(outcome)
    }

    /// Updates in-memory state for a batch written at `position`.
    fn record_batch(&mut self, position: u64, header: &BatchHeader) {
        let relative = (header.base_offset - self.base_offset) as u32;
        if self.offset_index.is_empty() || self.bytes_since_index_entry >= INDEX_INTERVAL_BYTES {
            self.offset_index.push(relative, position as u32);
            self.bytes_since_index_entry = 0;
        }
        let total = header.total_bytes() as u64;
        self.bytes_since_index_entry += total;
        self.time_index.observe(header.max_timestamp, relative);
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        self.size = position + total;
        self.next_offset = header.next_offset();
    }

    /// Writes a validated batch (offsets already assigned) at the end of the segment.
    pub fn append(&mut self, bytes: &[u8], header: &BatchHeader, now_ms: i64) -> std::io::Result<()> {
        self.append_parts(&[bytes], header, now_ms)
    }

    /// [`Self::append`] of a batch given as consecutive pieces (e.g. a patched copy of its
    /// first bytes, then the rest where it lies).
    pub fn append_parts(&mut self, parts: &[&[u8]], header: &BatchHeader, now_ms: i64) -> std::io::Result<()> {
        debug_assert_eq!(header.total_bytes(), parts.iter().map(|p| p.len()).sum::<usize>());
        debug_assert!(header.base_offset >= self.next_offset, "offsets must grow within a segment");
        self.file.write_all_vectored_at(parts, self.size)?;
        self.first_append_ms.get_or_insert(now_ms);
        self.last_append_ms = Some(now_ms);
        self.record_batch(self.size, header);
        Ok(())
    }

    /// Cuts off whatever part of a failed [`Self::append`] reached the file, so the segment
    /// ends where it did before (the failed append changed nothing in memory).
    pub fn discard_failed_append(&self) -> std::io::Result<()> {
        self.file.set_len(self.size)
    }

    /// Truncates the file to `valid_bytes` (recovery of a torn tail) and makes it durable.
    pub fn truncate(&mut self, valid_bytes: u64) -> Result<()> {
        self.file.set_len(valid_bytes).map_err(|e| LogError::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| LogError::io(&self.path, e))?;
        self.offset_index.truncate_to_position(valid_bytes as u32);
        Ok(())
    }

    /// Writes both index files durably (used when the segment is closed).
    pub fn write_indexes(&self, fs: &dyn Storage, dir: &Path) -> Result<()> {
        for (name, bytes) in [
            (offset_index_file_name(self.base_offset), self.offset_index.encode()),
            (time_index_file_name(self.base_offset), self.time_index.encode()),
        ] {
            let path = dir.join(name);
            io::write_file_atomic(fs, &path, &bytes).map_err(|e| LogError::io(&path, e))?;
        }
        Ok(())
    }

    /// Byte position to start scanning from to find `offset`.
    pub fn position_for(&self, offset: i64) -> u64 {
        let relative = (offset - self.base_offset).clamp(0, i64::from(u32::MAX)) as u32;
        u64::from(self.offset_index.floor_position(relative))
    }

    /// Byte position to start scanning from to find the first timestamp >= `timestamp`; None
    /// when the segment holds no such timestamp.
    pub fn position_for_timestamp(&self, timestamp: i64) -> Option<u64> {
        let relative = self.time_index.lookup(timestamp)?;
        Some(self.position_for(self.base_offset + i64::from(relative)))
    }

    /// The time `retention.ms` counts from (as Kafka): the largest record timestamp, or for
    /// records without one (-1, legacy data) the broker's time of the last append, so they
    /// are not deleted at the first pass. None when neither is known.
    pub fn retention_time_ms(&self) -> Option<i64> {
        if self.max_timestamp >= 0 { Some(self.max_timestamp) } else { self.last_append_ms }
    }

    /// Names of this segment's files, for deletion.
    pub fn file_names(&self) -> [String; 3] {
        [
            log_file_name(self.base_offset),
            offset_index_file_name(self.base_offset),
            time_index_file_name(self.base_offset),
        ]
    }
}

/// Scans whole batches of `file[0..file_bytes]`, validating each (length, magic, CRC,
/// offsets increasing from `base_offset`). Calls `visit(position, header, bytes)` for each
/// valid batch and stops at the first invalid byte.
pub fn scan_batches(
    file: &dyn StorageFile,
    base_offset: i64,
    file_bytes: u64,
    mut visit: impl FnMut(u64, &BatchHeader, &[u8]),
) -> std::io::Result<ScanOutcome> {
    scan_batches_while(file, base_offset, file_bytes, |position, header, bytes| {
        visit(position, header, bytes);
        true
    })
}

/// [`scan_batches`], also stopping (with no stop reason) after a batch for which `visit`
/// returns false; `valid_bytes` is then the end of that batch.
pub fn scan_batches_while(
    file: &dyn StorageFile,
    base_offset: i64,
    file_bytes: u64,
    mut visit: impl FnMut(u64, &BatchHeader, &[u8]) -> bool,
) -> std::io::Result<ScanOutcome> {
    let mut chunk = ChunkReader::new(file, file_bytes);
    let mut position = 0u64;
    let mut expected_min_offset = base_offset;
    let stop_reason = loop {
        if position >= file_bytes {
            break None;
        }
        let Some(prefix) = chunk.bytes(position, LENGTH_PREFIX_BYTES)? else {
            break Some(format!("{} trailing bytes are too short for a batch", file_bytes - position));
        };
        let total = match batch::batch_total_len(prefix, RECOVERY_BATCH_BYTES_MAX) {
            Ok(total) => total,
            Err(e) => break Some(e.to_string()),
        };
        let Some(bytes) = chunk.bytes(position, total)? else {
            break Some(format!("batch at byte {position} claims {total} bytes but the file ends first (torn write)"));
        };
        let header = match batch::validate(bytes, RECOVERY_BATCH_BYTES_MAX) {
            Ok(header) => header,
            Err(e) => break Some(e.to_string()),
        };
        if header.base_offset < expected_min_offset {
            break Some(format!(
                "batch base offset {} goes backwards (expected >= {expected_min_offset})",
                header.base_offset
            ));
        }
        expected_min_offset = header.next_offset();
        let go_on = visit(position, &header, bytes);
        position += total as u64;
        if !go_on {
            break None;
        }
    };
    Ok(ScanOutcome { valid_bytes: position, file_bytes, scanned: true, stop_reason })
}

/// Walks batch headers in `[from, to)` without validating CRCs (the range was validated
/// when written). Stops when `visit` returns false. Returns the position where it stopped,
/// or an error when a header does not parse (the caller treats that as damage).
pub fn walk_headers(
    file: &dyn StorageFile,
    from: u64,
    to: u64,
    mut visit: impl FnMut(u64, &BatchHeader) -> bool,
) -> std::io::Result<u64> {
    let mut position = from;
    let mut header_bytes = [0u8; batch::HEADER_BYTES];
    while position < to {
        if to - position < batch::HEADER_BYTES as u64 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "partial batch header"));
        }
        file.read_exact_at(&mut header_bytes, position)?;
        let header =
            BatchHeader::parse(&header_bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let total = header.total_bytes() as u64;
        if header.batch_length < 0 || position + total > to {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "batch extends past the segment"));
        }
        if !visit(position, &header) {
            return Ok(position);
        }
        position += total;
    }
    Ok(position)
}

/// Reads a file in large chunks so scanning many small batches costs few system calls.
struct ChunkReader<'a> {
    file: &'a dyn StorageFile,
    file_bytes: u64,
    buffer: Vec<u8>,
    buffer_start: u64,
}

impl<'a> ChunkReader<'a> {
    fn new(file: &'a dyn StorageFile, file_bytes: u64) -> Self {
        Self { file, file_bytes, buffer: Vec::new(), buffer_start: 0 }
    }

    /// `len` bytes at `position`, or None when the file ends first.
    fn bytes(&mut self, position: u64, len: usize) -> std::io::Result<Option<&[u8]>> {
        if position + len as u64 > self.file_bytes {
            return Ok(None);
        }
        let buffered =
            position >= self.buffer_start && position + len as u64 <= self.buffer_start + self.buffer.len() as u64;
        if !buffered {
            let want = len.max(SCAN_CHUNK_BYTES).min((self.file_bytes - position) as usize);
            self.buffer.resize(want, 0);
            self.file.read_exact_at(&mut self.buffer, position)?;
            self.buffer_start = position;
        }
        let start = (position - self.buffer_start) as usize;
        Ok(Some(&self.buffer[start..start + len]))
    }
}
