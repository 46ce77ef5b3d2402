//! The file-system layer. Every byte the log reads or writes goes through [`Storage`] and
//! [`StorageFile`], so tests can swap the real file system ([`RealFs`]) for a simulated one
//! ([`sim::SimFs`]) that injects faults and simulates power loss.
//!
//! Invariant: nothing above this module calls `std::fs` directly.

mod real;
pub mod sim;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use real::RealFs;

/// How [`Storage::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file for reading only.
    Read,
    /// Open an existing file for reading and writing.
    ReadWrite,
    /// Create the file (truncating any existing one) for reading and writing. The new
    /// directory entry is durable only after [`Storage::sync_dir`] on its parent.
    Create,
}

/// A file system: directories, names and open files.
///
/// Durability contract (what [`sim::SimFs`] models on power loss):
/// - file contents are durable up to the last [`StorageFile::sync_data`];
/// - creating, renaming and removing a directory entry is durable only after
///   [`Storage::sync_dir`] on the directory that holds it.
pub trait Storage: Send + Sync + 'static {
    /// Creates a directory and its missing parents (not durable until `sync_dir` on the parent).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names (not full paths) of the entries in a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>>;
    /// Atomically replaces `to` with `from` (POSIX rename).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything under it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of a directory durable (creations, renames, removals).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether a file or directory exists.
    fn exists(&self, path: &Path) -> bool;
    /// Bytes available to new writes on the file system holding `path`, when known.
    fn available_bytes(&self, _path: &Path) -> Option<u64> {
        None
    }
}

/// An open file. Positional reads and writes, so readers never move a writer's cursor.
pub trait StorageFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file as needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The current length of the file.
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the contents durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// When the contents last changed (ms since the Unix epoch), if the file system keeps it.
    fn modified_ms(&self) -> Option<i64> {
        None
    }

    /// Sets when the contents last changed (ms since the Unix epoch), where the file system
    /// keeps it; a no-op elsewhere.
    fn set_modified_ms(&self, _ms: i64) -> io::Result<()> {
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`, failing with `UnexpectedEof` when the
    /// file is shorter.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, offset)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended before the requested range"));
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Writes `parts` one after another at `offset`, like [`Self::write_all_at`] of their
    /// concatenation. Implementations may write them with one vectored call, so a caller can
    /// patch a few bytes of a large buffer it does not own without copying all of it.
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_all_at(&parts.concat(), offset)
    }

    /// Appends exactly `len` bytes read at `offset` to `out` (on failure `out` is left as it
    /// was). Implementations that can read into `out`'s spare capacity skip zeroing it first:
    /// a fetch reads up to megabytes, and the zeroing cost as much as a sixth of its CPU.
    fn read_exact_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let base = out.len();
        out.resize(base + len, 0);
        self.read_exact_at(&mut out[base..], offset).inspect_err(|_| out.truncate(base))
    }
}

/// Joins a directory and a file name: a small helper so callers read as intent.
pub fn child(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, and
/// an fsync of the directory. After a crash the file holds the old or the new contents.
pub fn write_file_atomic(fs: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file_atomic_telling(fs, path, bytes).map_err(AtomicWriteError::into_io)
}

/// Where [`write_file_atomic`] failed, for a caller that treats them apart: an fsync (of the
/// file or its directory), after which what the file system holds is in doubt, or any other
/// step (a full disk), after which the file still holds its old contents.
#[derive(Debug)]
pub enum AtomicWriteError {
    Sync(io::Error),
    Other(io::Error),
}

impl AtomicWriteError {
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Sync(e) | Self::Other(e) => e,
        }
    }
}

/// [`write_file_atomic`], saying which kind of step failed.
pub fn write_file_atomic_telling(fs: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    let other = AtomicWriteError::Other;
    let dir = path
        .parent()
        .ok_or_else(|| other(io::Error::new(io::ErrorKind::InvalidInput, "path has no parent directory")))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| other(io::Error::new(io::ErrorKind::InvalidInput, "path has no file name")))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let file = fs.open(&tmp, OpenMode::Create).map_err(other)?;
    file.write_all_at(bytes, 0).map_err(other)?;
    file.sync_data().map_err(AtomicWriteError::Sync)?;
    drop(file);
    fs.rename(&tmp, path).map_err(other)?;
    fs.sync_dir(dir).map_err(AtomicWriteError::Sync)
}

/// Reads a whole file into memory.
pub fn read_file(fs: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = fs.open(path, OpenMode::Read)?;
    let len = usize::try_from(file.len()?).map_err(|_| io::Error::other("file too large to read into memory"))?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
