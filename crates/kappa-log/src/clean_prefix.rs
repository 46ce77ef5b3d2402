//! How far a compacted partition is clean, kept across restarts (`cleaned-up-to.offset`,
//! as Kafka's cleaner-offset-checkpoint; the format is drawn in docs/format.md).
//!
//! A clean prefix is a claim the cleaner relies on: below its end no compaction key occurs
//! twice, so a record there that the key map lacks is its key's latest (and an expired
//! tombstone there may go). A claim larger than the truth would let a deleted key come
//! back, so the file names everything that makes it true — the topic's incarnation (its
//! id) and the sub-key header that defined the keys — and is dropped at open when any of
//! them no longer holds. A smaller claim is always safe: it only costs a longer pass.
//!
//! Invariant: this module knows nothing of segments or records; `compaction.rs` decides
//! what is clean, this module only keeps the claim.

use std::path::Path;

use crate::batch;
use crate::error::{LogError, Result};
use crate::io::{AtomicWriteError, Storage};
use crate::log::TOPIC_ID_BYTES;

/// The partition file holding the clean prefix.
pub(crate) const CLEAN_PREFIX_FILE: &str = "cleaned-up-to.offset";
const MAGIC: &[u8; 4] = b"KCLN";
/// A sub-key header name's length when the topic is compacted by key alone.
const NO_SUBKEY_HEADER: i32 = -1;
/// Longest sub-key header name the file holds (a Kafka header key is a string; one this
/// long is already absurd). A pass under a longer one records nothing clean.
const SUBKEY_HEADER_BYTES_MAX: usize = 4096;

/// How far the log is clean, and under which sub-key header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CleanPrefix {
    end: i64,
    subkey_header: Option<String>,
}

impl CleanPrefix {
    /// Nothing cleaned yet: the whole log is dirty.
    pub(crate) const NONE: Self = Self { end: i64::MIN, subkey_header: None };

    pub(crate) fn new(end: i64, subkey_header: Option<&str>) -> Self {
        Self { end, subkey_header: subkey_header.map(str::to_owned) }
    }

    /// Where the clean prefix ends for passes under `subkey_header`: nowhere when the
    /// header changed since (the prefix's keys were distinct under the old one), so the
    /// whole log counts as dirty and is read again.
    pub(crate) fn end_under(&self, subkey_header: Option<&str>) -> i64 {
        if self.subkey_header.as_deref() == subkey_header { self.end } else { i64::MIN }
    }

    /// `magic | end i64 | topic id | header length i32 (-1: none) | header | crc32c`.
    fn encode(&self, topic_id: &[u8; TOPIC_ID_BYTES]) -> Option<Vec<u8>> {
        let header = self.subkey_header.as_deref().map(str::as_bytes);
        if header.is_some_and(|h| h.len() > SUBKEY_HEADER_BYTES_MAX) {
            return None;
        }
        let mut out = Vec::with_capacity(4 + 8 + TOPIC_ID_BYTES + 4 + header.map_or(0, <[u8]>::len) + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.end.to_be_bytes());
        out.extend_from_slice(topic_id);
        let length = header.map_or(NO_SUBKEY_HEADER, |h| h.len() as i32);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(header.unwrap_or_default());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        Some(out)
    }

    /// The prefix and the topic id it was recorded for; None when the bytes are not a
    /// whole, intact file.
    fn decode(bytes: &[u8]) -> Option<(Self, [u8; TOPIC_ID_BYTES])> {
        let fixed = 4 + 8 + TOPIC_ID_BYTES + 4;
        if bytes.len() < fixed + 4 || &bytes[..4] != MAGIC {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != batch::be_u32(crc, 0) {
            return None;
        }
        let end = batch::be_i64(body, 4);
        let topic_id: [u8; TOPIC_ID_BYTES] = body[12..12 + TOPIC_ID_BYTES].try_into().ok()?;
        let length = batch::be_i32(body, 12 + TOPIC_ID_BYTES);
        let name = &body[fixed..];
        let subkey_header = match length {
            NO_SUBKEY_HEADER if name.is_empty() => None,
            n if usize::try_from(n).ok() == Some(name.len()) => Some(String::from_utf8(name.to_vec()).ok()?),
            _ => return None,
        };
        Some((Self { end, subkey_header }, topic_id))
    }
}

/// The clean prefix recorded in `dir` for the topic incarnation `topic_id`. A file that is
/// damaged, was written for another incarnation (a pass still running while its topic was
/// deleted and created again), or ends past the log end (segments lost since) claims what
/// may be false: it is removed, and nothing counts as clean — only slower, never unsafe.
pub(crate) fn read(
    fs: &dyn Storage,
    dir: &Path,
    topic_id: &[u8; TOPIC_ID_BYTES],
    log_end_offset: i64,
) -> Result<CleanPrefix> {
    let path = dir.join(CLEAN_PREFIX_FILE);
    if !fs.exists(&path) {
        return Ok(CleanPrefix::NONE);
    }
    let why_dropped = match crate::io::read_file(fs, &path).ok().as_deref().and_then(CleanPrefix::decode) {
        None => "it is damaged".to_owned(),
        Some((_, recorded_for)) if recorded_for != *topic_id => {
            "it was written for an earlier topic of that name".to_owned()
        }
        Some((prefix, _)) if prefix.end > log_end_offset => {
            format!("it ends at {} and the log at {log_end_offset}", prefix.end)
        }
        Some((prefix, _)) => return Ok(prefix),
    };
    tracing::warn!(path = %path.display(), reason = %why_dropped, "dropping the clean prefix file; the next compaction pass reads the whole log");
    fs.remove_file(&path).map_err(|e| LogError::io(&path, e))?;
    fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
    Ok(CleanPrefix::NONE)
}

/// Why writing the prefix failed: an fsync, after which nothing on the directory may be
/// trusted (the caller poisons it), or anything else (a full disk), after which the file
/// holds the previous prefix — a smaller claim, still true.
pub(crate) enum WriteError {
    Sync(LogError),
    Other(LogError),
}

/// Writes `prefix` atomically ([`crate::io::write_file_atomic`]).
pub(crate) fn write(
    fs: &dyn Storage,
    dir: &Path,
    topic_id: &[u8; TOPIC_ID_BYTES],
    prefix: &CleanPrefix,
) -> std::result::Result<(), WriteError> {
    let path = dir.join(CLEAN_PREFIX_FILE);
    let Some(bytes) = prefix.encode(topic_id) else {
        // A header name too long to record: record nothing clean rather than a false claim.
        return match fs.exists(&path) {
            false => Ok(()),
            true => fs.remove_file(&path).map_err(|e| WriteError::Other(LogError::io(&path, e))),
        };
    };
    crate::io::write_file_atomic_telling(fs, &path, &bytes).map_err(|e| match e {
        AtomicWriteError::Sync(e) => WriteError::Sync(LogError::io(&path, e)),
        AtomicWriteError::Other(e) => WriteError::Other(LogError::io(&path, e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_reads_back_as_written_and_damage_reads_as_nothing() {
        let id = [7; TOPIC_ID_BYTES];
        for prefix in
            [CleanPrefix::new(42, None), CleanPrefix::new(7, Some("contentId")), CleanPrefix::new(0, Some(""))]
        {
            let bytes = prefix.encode(&id).unwrap();
            assert_eq!(CleanPrefix::decode(&bytes), Some((prefix.clone(), id)));
            for at in 0..bytes.len() {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x10;
                assert_eq!(CleanPrefix::decode(&damaged), None, "{prefix:?} with byte {at} flipped");
            }
            assert_eq!(CleanPrefix::decode(&bytes[..bytes.len() - 1]), None, "truncated");
        }
        let long = "h".repeat(SUBKEY_HEADER_BYTES_MAX + 1);
        assert_eq!(CleanPrefix::new(1, Some(&long)).encode(&id), None, "too long to record");
    }

    #[test]
    fn a_prefix_counts_only_under_the_header_it_was_cleaned_with() {
        let prefix = CleanPrefix::new(9, Some("a"));
        assert_eq!(prefix.end_under(Some("a")), 9);
        assert_eq!(prefix.end_under(Some("b")), i64::MIN);
        assert_eq!(prefix.end_under(None), i64::MIN);
        assert_eq!(CleanPrefix::new(9, None).end_under(None), 9);
    }
}
