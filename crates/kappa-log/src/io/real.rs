//! [`Storage`] on the real file system (Unix: positional I/O, fdatasync, directory fsync).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{OpenMode, Storage, StorageFile};

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl Storage for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut options = OpenOptions::new();
        match mode {
            OpenMode::Read => options.read(true),
            OpenMode::ReadWrite => options.read(true).write(true),
            OpenMode::Create => options.read(true).write(true).create(true).truncate(true),
        };
        Ok(Arc::new(RealFile(options.open(path)?)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// Slices one `pwritev` takes at most (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

struct RealFile(File);

impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn modified_ms(&self) -> Option<i64> {
        let modified = self.0.metadata().ok()?.modified().ok()?;
        i64::try_from(modified.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()
    }

    fn set_modified_ms(&self, ms: i64) -> io::Result<()> {
        let since_epoch = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        self.0.set_modified(std::time::UNIX_EPOCH + since_epoch)
    }

    fn write_all_vectored_at(&self, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        io::IoSlice::advance_slices(&mut rest, 0); // drops leading empty slices
        while !rest.is_empty() {
            let position = file_position(offset)?;
            let count = rest.len().min(IOV_MAX);
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` (documented by std), and the
            // `count` slices it points to are live, initialised buffers pwritev only reads.
            let n = unsafe { libc::pwritev(self.0.as_raw_fd(), rest.as_ptr().cast(), count as libc::c_int, position) };
            let zero = || io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer");
            if let Some(n) = transferred(n, zero)? {
                offset += n as u64;
                io::IoSlice::advance_slices(&mut rest, n);
            }
        }
        Ok(())
    }

    fn read_exact_append(&self, out: &mut Vec<u8>, len: usize, mut offset: u64) -> io::Result<()> {
        out.reserve(len);
        let base = out.len();
        let mut filled = 0;
        while filled < len {
            let spare = &mut out.spare_capacity_mut()[filled..len];
            let position = file_position(offset)?;
            // SAFETY: pread writes at most `spare.len()` bytes into memory `out` owns (its spare
            // capacity, which std's `&mut [u8]` readers cannot take without zeroing it first)
            // and never reads it.
            let n = unsafe { libc::pread(self.0.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), position) };
            let zero = || io::Error::new(io::ErrorKind::UnexpectedEof, "file ended before the requested range");
            if let Some(n) = transferred(n, zero)? {
                filled += n;
                offset += n as u64;
            }
        }
        // SAFETY: pread initialised the first `len` bytes of the spare capacity above.
        unsafe { out.set_len(base + len) };
        Ok(())
    }
}

fn file_position(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::other("file offset out of range"))
}

/// What a positional read or write system call returned: the bytes it moved, None when a
/// signal interrupted it (call again), or the error (`zero` when it moved nothing).
fn transferred(n: isize, zero: impl FnOnce() -> io::Error) -> io::Result<Option<usize>> {
    match n {
        0 => Err(zero()),
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) }
        }
        n => Ok(Some(n as usize)),
    }
}
