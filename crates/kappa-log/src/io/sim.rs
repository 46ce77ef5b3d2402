//! A simulated file system with fault injection and power-loss semantics (see the trait's
//! durability contract in the parent module).
//!
//! Model:
//! - Names map to inodes; open handles hold the inode, so a file removed or renamed over
//!   stays readable through a handle opened before, as on Linux.
//! - Directories are inodes too, with a `current` and a `durable` name→inode map.
//!   [`Storage::sync_dir`] copies `current` to `durable`. This applies to directories
//!   themselves: a directory made by `create_dir_all` is durable only once its parent is
//!   synced (the trait's contract, taken literally), and so are renames and removals.
//! - Files have `current` bytes, `durable` bytes, and the ordered log of changes (writes,
//!   `set_len`) made since the last `sync_data`, which copies `current` to `durable`.
//! - [`SimFs::crash`] simulates power loss from a seed: directories revert to their
//!   durable entries, unreachable inodes vanish, and each file keeps its durable bytes plus,
//!   decided per file by the seed, none of its change log, an in-order prefix of it whose
//!   last write is torn (a random prefix of that write, sometimes ending in garbage), or a
//!   scattered subset of changes, each kept whole, torn or dropped (the page cache writes
//!   back out of order). A file never grows past the extent something wrote. Every handle
//!   opened before the crash is then stale and fails every call.
//! - Faults are armed at run time through any clone of the handle: EIO on the nth (or
//!   every from the nth) `sync_data`/`sync_dir`/write, short writes, ENOSPC above a
//!   capacity, and a "device death" after a budget of mutating calls, which lets a test
//!   stop a procedure at every possible point and then crash.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{OpenMode, Storage, StorageFile};

type Ino = u64;

const ROOT: Ino = 0;
/// The region a torn write may garble at its end: about one disk sector.
const SECTOR: usize = 512;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

/// A deterministic random generator for simulation tests.
pub fn seeded_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// When an injected fault fires, counted in calls of the faulted kind made since it was
/// armed, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Only the nth call fails.
    Nth(u64),
    /// The nth call and every later one fail.
    FromNth(u64),
}

/// What an injected write fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Nothing is written; the call fails with EIO.
    Eio,
    /// The first `n` bytes (at most the whole buffer) are written; the call fails with EIO.
    Short(usize),
}

/// Counters for assertions. Failed calls count too, except those refused by
/// [`SimFs::kill_after_ops`] (they never reached the device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Mutating calls: creating opens, writes, `set_len`, syncs, directory changes.
    pub ops: u64,
    /// `write_all_at` calls.
    pub writes: u64,
    /// Bytes actually written.
    pub bytes_written: u64,
    /// `sync_data` calls.
    pub sync_data: u64,
    /// `sync_dir` calls.
    pub sync_dir: u64,
    /// Simulated power losses.
    pub crashes: u64,
}

/// An in-memory [`Storage`]. Clones share one file system.
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFs").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl SimFs {
    /// An empty file system holding only the (durable) root directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates power loss (see the module docs); deterministic for a seed and a history.
    /// Disarms every fault but keeps the capacity.
    pub fn crash(&self, seed: u64) {
        self.lock().crash(seed);
    }

    /// Caps the total length of linked files; writes growing past it fail with ENOSPC.
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.lock().faults.capacity = capacity;
    }

    /// Makes `sync_data` fail with EIO as `trigger` says (`None` disarms).
    pub fn fail_sync_data(&self, trigger: Option<Trigger>) {
        let mut state = self.lock();
        state.faults.sync_data = trigger.map(|t| Armed::new(t, state.stats.sync_data));
    }

    /// Makes `sync_dir` fail with EIO as `trigger` says (`None` disarms).
    pub fn fail_sync_dir(&self, trigger: Option<Trigger>) {
        let mut state = self.lock();
        state.faults.sync_dir = trigger.map(|t| Armed::new(t, state.stats.sync_dir));
    }

    /// Makes `write_all_at` fail as `fault` says when `trigger` fires (`None` disarms).
    pub fn fail_writes(&self, fault: Option<(Trigger, WriteFault)>) {
        let mut state = self.lock();
        state.faults.write = fault.map(|(t, f)| (Armed::new(t, state.stats.writes), f));
    }

    /// Lets `ops` more mutating calls through, then fails every one with EIO, as if the
    /// machine died there (`None` disarms). Reads keep working.
    pub fn kill_after_ops(&self, ops: Option<u64>) {
        self.lock().faults.ops_left = ops;
    }

    /// The counters so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// The total current length of the files reachable from the root.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used()
    }

    /// The current contents of every file reachable from the root, by path.
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let state = self.lock();
        let mut out = BTreeMap::new();
        state.collect_files(ROOT, &PathBuf::from("/"), &mut BTreeSet::new(), &mut out);
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Storage for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.lock().create_dir_all(&names(path)?)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        let ino = state.resolve(&names(path)?)?;
        Ok(state.dir(ino)?.current.keys().cloned().collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock();
        let ino = state.open(&names(path)?, mode)?;
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            ino,
            epoch: state.epoch,
            writable: mode != OpenMode::Read,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.lock().rename(&names(from)?, &names(to)?)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.lock().unlink(&names(path)?, false)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.lock().unlink(&names(path)?, true)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.lock().sync_dir(&names(path)?)
    }

    fn exists(&self, path: &Path) -> bool {
        names(path).is_ok_and(|names| self.lock().resolve(&names).is_ok())
    }

    fn available_bytes(&self, _path: &Path) -> Option<u64> {
        let state = self.lock();
        state.faults.capacity.map(|cap| cap.saturating_sub(state.used()))
    }
}

/// An open file: the inode and the power cycle ("epoch") it was opened in.
struct SimFile {
    state: Arc<Mutex<State>>,
    ino: Ino,
    epoch: u64,
    writable: bool,
}

impl SimFile {
    /// Runs `f` on the file unless a crash has happened since it was opened.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> io::Result<R>) -> io::Result<R> {
        let mut state = lock(&self.state);
        if state.epoch != self.epoch {
            return Err(io::Error::other("stale handle after simulated crash"));
        }
        f(&mut state)
    }

    fn writable(&self) -> io::Result<()> {
        match self.writable {
            true => Ok(()),
            false => Err(io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only")),
        }
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|s| Ok(s.file(self.ino)?.read_at(buf, offset)))
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|s| s.write(self.ino, buf, offset))
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|s| Ok(s.file(self.ino)?.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.with(|s| {
            s.spend_op()?;
            s.file_mut(self.ino)?.set_len(to_usize(len)?);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|s| s.sync_data(self.ino))
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let ino = self.ino;
        // A stale handle's inode may be gone; the crash already reset the open counts.
        let _ = self.with(|s| {
            let file = s.file_mut(ino)?;
            file.open = file.open.saturating_sub(1);
            Ok(())
        });
    }
}

/// An armed fault: its trigger and the call count when it was armed.
#[derive(Debug, Clone, Copy)]
struct Armed {
    trigger: Trigger,
    base: u64,
}

impl Armed {
    fn new(trigger: Trigger, base: u64) -> Self {
        Self { trigger, base }
    }

    /// Whether the call that brought the counter to `count` fails.
    fn fires(self, count: u64) -> bool {
        let n = count.saturating_sub(self.base);
        match self.trigger {
            Trigger::Nth(k) => n == k,
            Trigger::FromNth(k) => n >= k,
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    sync_data: Option<Armed>,
    sync_dir: Option<Armed>,
    write: Option<(Armed, WriteFault)>,
    capacity: Option<u64>,
    ops_left: Option<u64>,
}

enum Node {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Default)]
struct DirNode {
    current: BTreeMap<String, Ino>,
    durable: BTreeMap<String, Ino>,
}

#[derive(Default)]
struct FileNode {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Changes since the last `sync_data`, in order: what power loss may keep or lose.
    pending: Vec<Change>,
    /// Open handles in this power cycle; an open inode outlives its names.
    open: usize,
}

enum Change {
    Write { offset: usize, bytes: Vec<u8> },
    SetLen(usize),
}

struct State {
    nodes: BTreeMap<Ino, Node>,
    next_ino: Ino,
    /// Bumped by every crash; handles from an older epoch are stale.
    epoch: u64,
    faults: Faults,
    stats: SimStats,
}

impl Default for State {
    fn default() -> Self {
        let nodes = BTreeMap::from([(ROOT, Node::Dir(DirNode::default()))]);
        Self { nodes, next_ino: ROOT + 1, epoch: 0, faults: Faults::default(), stats: SimStats::default() }
    }
}

impl State {
    // --- lookup ---

    fn dir(&self, ino: Ino) -> io::Result<&DirNode> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(dir)) => Ok(dir),
            Some(Node::File(_)) => Err(kind(io::ErrorKind::NotADirectory, "not a directory")),
            None => Err(not_found()),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(dir)) => Ok(dir),
            Some(Node::File(_)) => Err(kind(io::ErrorKind::NotADirectory, "not a directory")),
            None => Err(not_found()),
        }
    }

    fn file(&self, ino: Ino) -> io::Result<&FileNode> {
        match self.nodes.get(&ino) {
            Some(Node::File(file)) => Ok(file),
            Some(Node::Dir(_)) => Err(kind(io::ErrorKind::IsADirectory, "is a directory")),
            None => Err(not_found()),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(file)) => Ok(file),
            Some(Node::Dir(_)) => Err(kind(io::ErrorKind::IsADirectory, "is a directory")),
            None => Err(not_found()),
        }
    }

    fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.nodes.get(&ino), Some(Node::Dir(_)))
    }

    /// The inode a path names, through the current entries.
    fn resolve(&self, names: &[&str]) -> io::Result<Ino> {
        names.iter().try_fold(ROOT, |ino, name| self.dir(ino)?.current.get(*name).copied().ok_or_else(not_found))
    }

    /// The directory holding a path's last component, and that component.
    fn resolve_parent<'a>(&self, names: &[&'a str]) -> io::Result<(Ino, &'a str)> {
        let (last, parents) = names.split_last().ok_or_else(|| invalid("the root has no parent"))?;
        let parent = self.resolve(parents)?;
        self.dir(parent)?;
        Ok((parent, last))
    }

    /// Every inode reachable from `start` through current (and, if asked, durable) entries.
    fn reachable(&self, start: Ino, durable_too: bool) -> BTreeSet<Ino> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(ino) = stack.pop() {
            if !seen.insert(ino) {
                continue;
            }
            if let Some(Node::Dir(dir)) = self.nodes.get(&ino) {
                stack.extend(dir.current.values());
                if durable_too {
                    stack.extend(dir.durable.values());
                }
            }
        }
        seen
    }

    fn used(&self) -> u64 {
        let files = self.reachable(ROOT, false);
        files.iter().filter_map(|ino| self.file(*ino).ok()).map(|f| f.current.len() as u64).sum()
    }

    fn collect_files(&self, ino: Ino, path: &Path, seen: &mut BTreeSet<Ino>, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        // `seen` guards against cycles that mixing durable and current entries can create.
        if !seen.insert(ino) {
            return;
        }
        match self.nodes.get(&ino) {
            Some(Node::File(file)) => {
                out.insert(path.to_path_buf(), file.current.clone());
            }
            Some(Node::Dir(dir)) => {
                for (name, child) in &dir.current {
                    self.collect_files(*child, &path.join(name), seen, out);
                }
            }
            None => {}
        }
    }

    // --- faults and counters ---

    /// Charges one mutating call against the device-death budget.
    fn spend_op(&mut self) -> io::Result<()> {
        if let Some(left) = self.faults.ops_left.as_mut() {
            if *left == 0 {
                return Err(io::Error::from_raw_os_error(EIO));
            }
            *left -= 1;
        }
        self.stats.ops += 1;
        Ok(())
    }

    /// ENOSPC when growing `ino` to `end` would take the linked files past the capacity.
    fn check_space(&self, ino: Ino, end: usize) -> io::Result<()> {
        let Some(capacity) = self.faults.capacity else {
            return Ok(());
        };
        let growth = end.saturating_sub(self.file(ino)?.current.len()) as u64;
        match growth > 0 && self.used().saturating_add(growth) > capacity {
            true => Err(io::Error::from_raw_os_error(ENOSPC)),
            false => Ok(()),
        }
    }

    // --- operations ---

    fn create_dir_all(&mut self, names: &[&str]) -> io::Result<()> {
        self.spend_op()?;
        let mut ino = ROOT;
        for (i, name) in names.iter().enumerate() {
            ino = match self.dir(ino)?.current.get(*name).copied() {
                Some(child) if self.is_dir(child) => child,
                // Like std: a file as the last component "exists", in the middle it is no directory.
                Some(_) if i + 1 == names.len() => {
                    return Err(kind(io::ErrorKind::AlreadyExists, "a file exists there"));
                }
                Some(_) => return Err(kind(io::ErrorKind::NotADirectory, "not a directory")),
                None => self.link_new(ino, name, Node::Dir(DirNode::default()))?,
            };
        }
        Ok(())
    }

    /// Creates an inode and names it in `parent`'s current entries only: not yet durable.
    fn link_new(&mut self, parent: Ino, name: &str, node: Node) -> io::Result<Ino> {
        let ino = self.next_ino;
        self.dir_mut(parent)?.current.insert(name.to_owned(), ino);
        self.nodes.insert(ino, node);
        self.next_ino += 1;
        Ok(ino)
    }

    fn open(&mut self, names: &[&str], mode: OpenMode) -> io::Result<Ino> {
        let ino = match mode {
            OpenMode::Read | OpenMode::ReadWrite => self.resolve(names)?,
            OpenMode::Create => self.create(names)?,
        };
        self.file_mut(ino)?.open += 1;
        Ok(ino)
    }

    /// O_CREAT|O_TRUNC: an existing name keeps its inode and is truncated (an unsynced change).
    fn create(&mut self, names: &[&str]) -> io::Result<Ino> {
        self.spend_op()?;
        let (parent, name) = self.resolve_parent(names)?;
        match self.dir(parent)?.current.get(name).copied() {
            Some(ino) => {
                self.file_mut(ino)?.set_len(0);
                Ok(ino)
            }
            None => self.link_new(parent, name, Node::File(FileNode::default())),
        }
    }

    fn rename(&mut self, from: &[&str], to: &[&str]) -> io::Result<()> {
        self.spend_op()?;
        let (from_dir, from_name) = self.resolve_parent(from)?;
        let ino = self.dir(from_dir)?.current.get(from_name).copied().ok_or_else(not_found)?;
        let (to_dir, to_name) = self.resolve_parent(to)?;
        if let Some(existing) = self.dir(to_dir)?.current.get(to_name).copied() {
            if existing == ino {
                return Ok(()); // POSIX: two names for one inode, nothing to do.
            }
            self.check_replace(ino, existing)?;
        }
        if self.is_dir(ino) && self.reachable(ino, false).contains(&to_dir) {
            return Err(invalid("cannot move a directory into itself"));
        }
        self.dir_mut(from_dir)?.current.remove(from_name);
        self.dir_mut(to_dir)?.current.insert(to_name.to_owned(), ino);
        Ok(())
    }

    /// Whether `ino` may replace `existing` in a rename, with the errors rename(2) gives.
    fn check_replace(&self, ino: Ino, existing: Ino) -> io::Result<()> {
        match (self.is_dir(ino), self.is_dir(existing)) {
            (false, true) => Err(kind(io::ErrorKind::IsADirectory, "is a directory")),
            (true, false) => Err(kind(io::ErrorKind::NotADirectory, "not a directory")),
            (true, true) if !self.dir(existing)?.current.is_empty() => {
                Err(kind(io::ErrorKind::DirectoryNotEmpty, "directory not empty"))
            }
            _ => Ok(()),
        }
    }

    /// Removes a name (a file, or a directory with everything under it).
    fn unlink(&mut self, names: &[&str], dir: bool) -> io::Result<()> {
        self.spend_op()?;
        let (parent, name) = self.resolve_parent(names)?;
        let ino = self.dir(parent)?.current.get(name).copied().ok_or_else(not_found)?;
        match (dir, self.is_dir(ino)) {
            (false, true) => return Err(kind(io::ErrorKind::IsADirectory, "is a directory")),
            (true, false) => return Err(kind(io::ErrorKind::NotADirectory, "not a directory")),
            _ => {}
        }
        // The subtree's own entries stay as they are: nothing can sync them any more, and
        // if the removal is lost to a crash the subtree comes back with its durable entries.
        self.dir_mut(parent)?.current.remove(name);
        Ok(())
    }

    fn write(&mut self, ino: Ino, buf: &[u8], offset: u64) -> io::Result<()> {
        self.spend_op()?;
        self.stats.writes += 1;
        let fault = self.faults.write.filter(|(armed, _)| armed.fires(self.stats.writes)).map(|(_, f)| f);
        let keep = match fault {
            None => buf.len(),
            Some(WriteFault::Eio) => 0,
            Some(WriteFault::Short(n)) => n.min(buf.len()),
        };
        let start = to_usize(offset)?;
        let end = start.checked_add(keep).ok_or_else(too_large)?;
        self.check_space(ino, end)?;
        if keep > 0 {
            self.file_mut(ino)?.write(start, &buf[..keep]);
            self.stats.bytes_written += keep as u64;
        }
        match fault {
            Some(_) => Err(io::Error::from_raw_os_error(EIO)),
            None => Ok(()),
        }
    }

    /// A failed sync changes nothing: the changes stay pending and may still reach the disk.
    fn sync_data(&mut self, ino: Ino) -> io::Result<()> {
        self.spend_op()?;
        self.stats.sync_data += 1;
        if self.faults.sync_data.is_some_and(|a| a.fires(self.stats.sync_data)) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        let file = self.file_mut(ino)?;
        file.durable.clone_from(&file.current);
        file.pending.clear();
        Ok(())
    }

    fn sync_dir(&mut self, names: &[&str]) -> io::Result<()> {
        self.spend_op()?;
        let ino = self.resolve(names)?;
        self.dir(ino)?;
        self.stats.sync_dir += 1;
        if self.faults.sync_dir.is_some_and(|a| a.fires(self.stats.sync_dir)) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        let dir = self.dir_mut(ino)?;
        dir.durable.clone_from(&dir.current);
        self.collect_garbage();
        Ok(())
    }

    /// Drops inodes no name (current or durable) and no open handle refers to.
    fn collect_garbage(&mut self) {
        let live = self.reachable(ROOT, true);
        self.nodes.retain(|ino, node| live.contains(ino) || matches!(node, Node::File(f) if f.open > 0));
    }

    fn crash(&mut self, seed: u64) {
        self.epoch += 1;
        self.stats.crashes += 1;
        self.faults = Faults { capacity: self.faults.capacity, ..Faults::default() };
        for node in self.nodes.values_mut() {
            match node {
                Node::Dir(dir) => dir.current.clone_from(&dir.durable),
                Node::File(file) => file.open = 0,
            }
        }
        self.collect_garbage();
        // One generator walked in inode order: the same seed and history, the same outcome.
        let mut rng = seeded_rng(seed);
        for node in self.nodes.values_mut() {
            if let Node::File(file) = node {
                file.lose_power(&mut rng);
            }
        }
    }
}

impl FileNode {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> usize {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.current.len());
        let n = buf.len().min(self.current.len() - start);
        buf[..n].copy_from_slice(&self.current[start..start + n]);
        n
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        write_at(&mut self.current, offset, bytes);
        self.pending.push(Change::Write { offset, bytes: bytes.to_vec() });
    }

    fn set_len(&mut self, len: usize) {
        self.current.resize(len, 0);
        self.pending.push(Change::SetLen(len));
    }

    /// Replaces the contents with what survives power loss; the result is durable.
    fn lose_power(&mut self, rng: &mut StdRng) {
        let pending = std::mem::take(&mut self.pending);
        let mut data = std::mem::take(&mut self.durable);
        if !pending.is_empty() {
            match rng.random_range(0..10) {
                0..3 => {} // nothing written since the last sync reached the disk
                3..8 => apply_in_order(&mut data, &pending, rng),
                _ => apply_scattered(&mut data, &pending, rng),
            }
        }
        self.current.clone_from(&data);
        self.durable = data;
    }
}

/// Writeback in order, cut off by the power: the first k changes whole, the next torn.
fn apply_in_order(data: &mut Vec<u8>, pending: &[Change], rng: &mut StdRng) {
    let whole = rng.random_range(0..=pending.len());
    for change in &pending[..whole] {
        apply(data, change);
    }
    if let Some(torn) = pending.get(whole) {
        apply_torn(data, torn, rng);
    }
}

/// Writeback out of order: each change independently whole, torn or lost.
fn apply_scattered(data: &mut Vec<u8>, pending: &[Change], rng: &mut StdRng) {
    for change in pending {
        match rng.random_range(0..3) {
            0 => apply(data, change),
            1 => apply_torn(data, change, rng),
            _ => {}
        }
    }
}

fn apply(data: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, bytes } => write_at(data, *offset, bytes),
        Change::SetLen(len) => data.resize(*len, 0),
    }
}

/// A write cut short: a strict prefix survives, sometimes ending in up to a sector of
/// garbage. A length change is metadata: all or nothing.
fn apply_torn(data: &mut Vec<u8>, change: &Change, rng: &mut StdRng) {
    match change {
        Change::SetLen(_) => {
            if rng.random_bool(0.5) {
                apply(data, change);
            }
        }
        Change::Write { offset, bytes } => {
            let keep = rng.random_range(0..bytes.len().max(1));
            let mut part = bytes[..keep].to_vec();
            if keep > 0 && rng.random_bool(0.5) {
                let garbage = rng.random_range(1..=keep.min(SECTOR));
                rng.fill_bytes(&mut part[keep - garbage..]);
            }
            write_at(data, *offset, &part);
        }
    }
}

/// Writes `bytes` at `offset`, zero-filling any gap past the end.
fn write_at(data: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let end = offset + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset..end].copy_from_slice(bytes);
}

/// A path's components; relative paths are taken from the root, `..` is refused.
fn names(path: &Path) -> io::Result<Vec<&str>> {
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name.to_str().ok_or_else(|| invalid("path is not UTF-8"))?),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(invalid("`..` is not supported in simulated paths"));
            }
        }
    }
    Ok(out)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock leaves a usable state behind.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| too_large())
}

fn kind(kind: io::ErrorKind, msg: &'static str) -> io::Error {
    io::Error::new(kind, msg)
}

fn invalid(msg: &'static str) -> io::Error {
    kind(io::ErrorKind::InvalidInput, msg)
}

fn not_found() -> io::Error {
    kind(io::ErrorKind::NotFound, "no such file or directory")
}

fn too_large() -> io::Error {
    kind(io::ErrorKind::FileTooLarge, "file too large")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_file, write_file_atomic};

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// A file system with a durable directory `/d`.
    fn fs_with_dir() -> SimFs {
        let fs = SimFs::new();
        fs.create_dir_all(p("/d")).unwrap();
        fs.sync_dir(p("/")).unwrap();
        fs
    }

    /// Creates `path` with `bytes`, syncs its data and its directory.
    fn durable_file(fs: &SimFs, path: &str, bytes: &[u8]) {
        let file = fs.open(p(path), OpenMode::Create).unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(p(path).parent().unwrap()).unwrap();
    }

    fn read(fs: &SimFs, path: &str) -> Vec<u8> {
        read_file(fs, p(path)).unwrap()
    }

    #[test]
    fn synced_data_survives_crash() {
        for seed in 0..50 {
            let fs = fs_with_dir();
            durable_file(&fs, "/d/f", b"hello");
            fs.crash(seed);
            assert_eq!(read(&fs, "/d/f"), b"hello", "seed {seed}");
        }
    }

    #[test]
    fn unsynced_tail_may_vanish_but_never_exceeds_what_was_written() {
        let tail: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let (mut lost, mut kept, mut clean_prefix) = (false, false, false);
        for seed in 0..200 {
            let fs = fs_with_dir();
            durable_file(&fs, "/d/f", &[7; 100]);
            let file = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            file.write_all_at(&tail[..500], 100).unwrap();
            file.write_all_at(&tail[500..], 600).unwrap();
            fs.crash(seed);
            let after = read(&fs, "/d/f");
            assert!((100..=1100).contains(&after.len()), "seed {seed}: len {}", after.len());
            assert_eq!(after[..100], [7; 100], "seed {seed}: synced bytes damaged");
            lost |= after.len() == 100;
            kept |= after.len() > 100;
            clean_prefix |= after.len() > 100 && after[100..] == tail[..after.len() - 100];
        }
        assert!(lost && kept && clean_prefix, "the seeds should exercise loss and survival");
    }

    #[test]
    fn torn_writes_sometimes_leave_garbage() {
        let garbled = (0..200).any(|seed| {
            let fs = fs_with_dir();
            durable_file(&fs, "/d/f", b"");
            fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap().write_all_at(&[0xAA; 4096], 0).unwrap();
            fs.crash(seed);
            read(&fs, "/d/f").iter().any(|b| *b != 0xAA)
        });
        assert!(garbled);
    }

    #[test]
    fn file_created_without_sync_dir_vanishes() {
        let fs = fs_with_dir();
        let file = fs.open(p("/d/f"), OpenMode::Create).unwrap();
        file.write_all_at(b"data", 0).unwrap();
        file.sync_data().unwrap();
        fs.crash(1);
        assert!(!fs.exists(p("/d/f")));
        assert!(fs.list_dir(p("/d")).unwrap().is_empty());
    }

    #[test]
    fn directories_are_durable_once_their_parent_is_synced() {
        let fs = SimFs::new();
        fs.create_dir_all(p("/a/b")).unwrap();
        fs.crash(0);
        assert!(!fs.exists(p("/a")));

        fs.create_dir_all(p("/a/b")).unwrap();
        fs.sync_dir(p("/")).unwrap();
        fs.sync_dir(p("/a")).unwrap();
        fs.crash(0);
        assert!(fs.exists(p("/a/b")));
    }

    #[test]
    fn rename_without_sync_dir_reverts() {
        let fs = fs_with_dir();
        durable_file(&fs, "/d/a", b"A");
        fs.rename(p("/d/a"), p("/d/b")).unwrap();
        assert!(fs.exists(p("/d/b")) && !fs.exists(p("/d/a")));
        fs.crash(3);
        assert_eq!(read(&fs, "/d/a"), b"A");
        assert!(!fs.exists(p("/d/b")));
    }

    #[test]
    fn rename_with_sync_dir_persists() {
        let fs = fs_with_dir();
        durable_file(&fs, "/d/a", b"A");
        durable_file(&fs, "/d/b", b"old");
        fs.rename(p("/d/a"), p("/d/b")).unwrap();
        fs.sync_dir(p("/d")).unwrap();
        fs.crash(3);
        assert_eq!(read(&fs, "/d/b"), b"A");
        assert!(!fs.exists(p("/d/a")));
    }

    #[test]
    fn open_handles_survive_unlink_and_go_stale_after_crash() {
        let fs = fs_with_dir();
        durable_file(&fs, "/d/f", b"abc");
        let file = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        fs.remove_file(p("/d/f")).unwrap();
        fs.sync_dir(p("/d")).unwrap();
        let mut buf = [0; 3];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc", "an unlinked inode stays readable through its handle");

        fs.crash(0);
        assert!(file.read_at(&mut buf, 0).is_err());
        assert!(file.write_all_at(b"x", 0).is_err());
        assert!(file.len().is_err());
        assert!(file.set_len(0).is_err());
        assert!(file.sync_data().is_err());
        assert!(!fs.exists(p("/d/f")));
    }

    #[test]
    fn errors_use_os_error_kinds() {
        let fs = fs_with_dir();
        durable_file(&fs, "/d/f", b"x");
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(fs.open(p("/d/missing"), OpenMode::Read).err().unwrap().kind(), io::ErrorKind::NotFound);
        assert_eq!(fs.open(p("/nodir/f"), OpenMode::Create).err().unwrap().kind(), io::ErrorKind::NotFound);
        assert_eq!(fs.open(p("/d"), OpenMode::Read).err().unwrap().kind(), io::ErrorKind::IsADirectory);
        assert_eq!(fs.list_dir(p("/d/f")).unwrap_err().kind(), io::ErrorKind::NotADirectory);
        assert_eq!(kind(fs.remove_file(p("/d"))), io::ErrorKind::IsADirectory);
        assert_eq!(kind(fs.remove_dir_all(p("/d/f"))), io::ErrorKind::NotADirectory);
        assert_eq!(kind(fs.rename(p("/d/missing"), p("/d/g"))), io::ErrorKind::NotFound);
        assert_eq!(kind(fs.create_dir_all(p("/d/f"))), io::ErrorKind::AlreadyExists);
        assert_eq!(kind(fs.create_dir_all(p("/d/f/g"))), io::ErrorKind::NotADirectory);
        assert_eq!(kind(fs.rename(p("/d"), p("/d/sub"))), io::ErrorKind::InvalidInput);
        let read_only = fs.open(p("/d/f"), OpenMode::Read).unwrap();
        assert_eq!(kind(read_only.write_all_at(b"y", 0)), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn list_and_remove_dir_all() {
        let fs = fs_with_dir();
        fs.create_dir_all(p("/d/sub/x")).unwrap();
        durable_file(&fs, "/d/f", b"x");
        let mut names = fs.list_dir(p("/d")).unwrap();
        names.sort();
        assert_eq!(names, ["f", "sub"]);
        fs.remove_dir_all(p("/d")).unwrap();
        assert!(!fs.exists(p("/d/f")) && !fs.exists(p("/d")));
        fs.crash(0); // the removal was never synced
        assert_eq!(read(&fs, "/d/f"), b"x");
    }

    #[test]
    fn injected_sync_failures_return_eio() {
        let fs = fs_with_dir();
        let file = fs.open(p("/d/f"), OpenMode::Create).unwrap();
        fs.fail_sync_data(Some(Trigger::Nth(2)));
        fs.fail_sync_dir(Some(Trigger::FromNth(1)));
        assert!(file.sync_data().is_ok());
        assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        assert!(file.sync_data().is_ok());
        for _ in 0..3 {
            assert_eq!(fs.sync_dir(p("/d")).unwrap_err().raw_os_error(), Some(EIO));
        }
        let stats = fs.stats();
        assert_eq!((stats.sync_data, stats.sync_dir), (3, 4));
    }

    #[test]
    fn injected_write_faults() {
        let fs = fs_with_dir();
        let file = fs.open(p("/d/f"), OpenMode::Create).unwrap();
        fs.fail_writes(Some((Trigger::Nth(2), WriteFault::Short(3))));
        file.write_all_at(b"abcd", 0).unwrap();
        assert_eq!(file.write_all_at(b"efgh", 4).unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(read(&fs, "/d/f"), b"abcdefg", "a short write keeps its prefix");
        fs.fail_writes(Some((Trigger::Nth(1), WriteFault::Eio)));
        assert!(file.write_all_at(b"zz", 0).is_err());
        assert_eq!(read(&fs, "/d/f"), b"abcdefg");
        assert_eq!(fs.stats().writes, 3);
        assert_eq!(fs.stats().bytes_written, 7);
    }

    #[test]
    fn enospc_at_capacity_then_success_after_freeing_space() {
        let fs = fs_with_dir();
        fs.set_capacity(Some(100));
        durable_file(&fs, "/d/a", &[1; 80]);
        assert_eq!(fs.available_bytes(p("/d")), Some(20));
        let b = fs.open(p("/d/b"), OpenMode::Create).unwrap();
        b.write_all_at(&[2; 20], 0).unwrap();
        assert_eq!(b.write_all_at(&[2; 1], 20).unwrap_err().raw_os_error(), Some(ENOSPC));
        b.write_all_at(&[3; 20], 0).unwrap(); // overwriting in place needs no space
        fs.remove_file(p("/d/a")).unwrap();
        b.write_all_at(&[2; 50], 20).unwrap();
        assert_eq!(fs.used_bytes(), 70);
        assert_eq!(fs.available_bytes(p("/d")), Some(30));
    }

    /// Runs the same history on a fresh file system and crashes it with `seed`.
    fn crashed_history(seed: u64) -> BTreeMap<PathBuf, Vec<u8>> {
        let fs = fs_with_dir();
        for i in 0..5u8 {
            durable_file(&fs, &format!("/d/f{i}"), &[i; 64]);
            let file = fs.open(p(&format!("/d/f{i}")), OpenMode::ReadWrite).unwrap();
            file.write_all_at(&[0xF0 | i; 700], 32).unwrap();
            file.write_all_at(&[0x0F | i; 300], 732).unwrap();
        }
        fs.crash(seed);
        fs.files()
    }

    #[test]
    fn crash_is_deterministic_per_seed() {
        for seed in 0..20 {
            assert_eq!(crashed_history(seed), crashed_history(seed), "seed {seed}");
        }
        let outcomes: BTreeSet<_> = (0..20).map(crashed_history).collect();
        assert!(outcomes.len() > 1, "different seeds should give different outcomes");
    }

    #[test]
    fn write_file_atomic_keeps_old_or_new_contents_across_crashes() {
        let steps = {
            let fs = fs_with_dir();
            let before = fs.stats().ops;
            write_file_atomic(&fs, p("/d/meta"), b"new contents").unwrap();
            fs.stats().ops - before
        };
        for seed in 0..500 {
            let fs = fs_with_dir();
            write_file_atomic(&fs, p("/d/meta"), b"old").unwrap();
            // Stop the machine after every possible number of steps, then pull the plug.
            fs.kill_after_ops(Some(seed % (steps + 1)));
            let result = write_file_atomic(&fs, p("/d/meta"), b"new contents");
            fs.crash(seed);
            let after = read(&fs, "/d/meta");
            match result {
                Ok(()) => assert_eq!(after, b"new contents", "seed {seed}"),
                Err(_) => assert!(after == b"old" || after == b"new contents", "seed {seed}: {after:?}"),
            }
        }
    }
}
