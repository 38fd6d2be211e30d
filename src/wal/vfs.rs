//! The file layer under the log. Everything the WAL does to the disk goes through
//! [`Vfs`], so tests can swap in `sim::SimFs` (feature `sim`), a disk model that keeps written bytes
//! apart from durable ones and can crash, tear writes, flip bits and fail fsync.
//!
//! Trait objects, not generics: every call here is a syscall or an fsync, so dynamic
//! dispatch costs nothing measurable and keeps the WAL's types simple.

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::Path;

mod direct;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

/// What a file system offers the WAL.
pub trait Vfs: Send + Sync + fmt::Debug {
    /// Creates one directory; its parent must exist. `Ok(false)` if it already exists
    /// as a directory. The new entry is durable only once its parent is synced.
    fn create_dir(&self, dir: &Path) -> io::Result<bool>;
    /// Creates `dir` and whichever of its ancestors are missing, syncing the parent of
    /// each one created: a directory entry survives a power cut only once the
    /// directory holding it is synced, and a data directory that vanishes takes every
    /// acknowledged op in it along.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let parent = match dir.parent() {
            None => return Ok(()), // the root
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
        };
        match self.create_dir(dir) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dir_all(parent)?;
                self.create_dir(dir)?;
            }
            Err(e) => return Err(e),
        }
        self.sync_dir(parent)
    }
    /// Names (not paths) of the regular files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new file (fails if it exists), open for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// The whole file, read-only: memory-mapped on a real disk.
    fn map(&self, path: &Path) -> io::Result<Region>;
    /// The whole file, for one pass front to back (recovery's scan of every segment):
    /// read into `buf` (its old contents replaced) in large chunks, or, on a real disk
    /// whose page cache holds all of it, mapped with its pages already in place
    /// (`buf` is then dropped). What the cache does not hold is read with `O_DIRECT`.
    fn read_file(&self, path: &Path, buf: FileBuf) -> io::Result<Region>;
    /// Whether a read waits on a device (worth a thread that reads ahead). A simulated
    /// disk copies bytes from memory: no.
    fn reads_wait(&self) -> bool {
        true
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Gives the file `from` a second name `to` (a hard link: one file, so a later
    /// rename over `from` or its removal leaves `to` as it was). `to` must not exist.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `dir`, held while the returned guard lives. A second
    /// holder (another process) gets `WouldBlock`.
    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
}

/// An open file. Positional I/O only: the WAL always knows where it writes.
pub trait VfsFile: Send + Sync {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far is durable when this returns `Ok`.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: data and metadata (size) durable.
    fn sync_all(&self) -> io::Result<()>;
    /// Reserves `len` bytes with `fallocate`, extending the file. `Ok(false)` means the
    /// file system does not support it (EOPNOTSUPP); the caller falls back to zeros.
    fn allocate(&self, len: u64) -> io::Result<bool>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn file_len(&self) -> io::Result<u64>;
}

/// `error`, of the same kind, with what was done to which path in front of its message
/// ("reading /data/snapshots: Not a directory"): the OS's own message names no path.
pub fn at_path<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |error| io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

/// Bytes of a whole file: a read-only memory map, a copy from a simulated disk, or the
/// file read into a buffer ([`Vfs::read_file`]).
pub enum Region {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
    Read(FileBuf),
}

impl Region {
    /// A hint that the `len` bytes from `offset` are about to be read: a mapped file's
    /// pages there that are not in memory start coming from the disk now, alongside the
    /// other ranges hinted at, rather than one page fault after another. Nothing to do
    /// for bytes already in memory; errors are not the caller's business (the read
    /// itself reports them).
    pub fn will_need(&self, offset: usize, len: usize) {
        if let Region::Mapped(map) = self {
            let end = offset.saturating_add(len).min(map.len());
            if offset < end {
                let _ = map.advise_range(memmap2::Advice::WillNeed, offset, end - offset);
            }
        }
    }

    /// The buffer the bytes were read into, for the next file, if they were.
    pub fn into_buffer(self) -> Option<FileBuf> {
        match self {
            Region::Read(buf) => Some(buf),
            Region::Mapped(_) | Region::Owned(_) => None,
        }
    }
}

impl Deref for Region {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Region::Mapped(map) => map,
            Region::Owned(bytes) => bytes,
            Region::Read(buf) => buf,
        }
    }
}

/// A whole file's bytes in memory ([`Vfs::read_file`]), in page-aligned memory (as
/// `O_DIRECT` reads want), kept from one file to the next: memory new to the process
/// costs the kernel a fault and a page of zeros per 4 KiB at its first use.
#[derive(Default)]
pub struct FileBuf {
    /// Anonymous memory, hand-written rather than `std::alloc`: the kernel hands it out
    /// zeroed and page-aligned (so every byte may be read as initialised), populated in
    /// one call (`MAP_POPULATE`, or `MADV_POPULATE_WRITE` a part at a time: see
    /// [`FileBuf::reserve_total_unpopulated`]) rather than a fault per page during the
    /// first read into it (measured: the first segment reached the scan 20-25 ms
    /// sooner, of about 115). `None` until first grown.
    memory: Option<memmap2::MmapMut>,
    /// Bytes filled, from the start.
    len: usize,
}

impl FileBuf {
    pub fn new() -> Self {
        FileBuf::default()
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn capacity(&self) -> usize {
        self.memory.as_ref().map_or(0, |memory| memory.len())
    }

    /// Room for at least `capacity` bytes in all, the filled ones kept.
    pub fn reserve_total(&mut self, capacity: usize) -> io::Result<()> {
        self.reserve(capacity, true)
    }

    /// [`FileBuf::reserve_total`], for `O_DIRECT` reads (`direct::read_file`): new
    /// memory is left for its user to populate a part at a time, just before each part
    /// is filled (64 MiB populated in one call took 28-30 ms on the VM measured, time
    /// in which no read was in flight; a part populated while another part is being
    /// read costs the disk nothing), and in huge pages where the kernel has them
    /// (`MADV_HUGEPAGE`; 2 MiB on x86-64).
    ///
    /// Why huge pages: a direct read lands its bytes where the buffer is, and on that
    /// VM the rate depended on it (fio, 1 GiB, one sitting: 2.0 GB/s into a 1 MiB
    /// buffer reused, 1.35-1.4 into 64 MiB). Reading the 18 segments of a 1.2 GB log
    /// into two 64 MiB buffers ran at 1.35-1.5 GB/s in 4 KiB pages and 2.2-2.3 GB/s in
    /// huge pages; the whole cold open (scan and replay) took 0.64-0.78 s instead of
    /// 0.90-0.95 after dropping the page cache, 0.96-1.09 s instead of 1.16-1.20 with
    /// 19 GB of page cache to compact around, and for a 3-segment log 0.14-0.16 s
    /// instead of 0.22-0.26. What huge pages cost is their first allocation in a
    /// process: 64 MiB populated in 130-140 ms instead of 16-21 (7-12 ms for the next
    /// 64 MiB), which the per-part populating spreads over the first reads. (An earlier
    /// measurement, populating the whole buffer before the first read, saw 250-440 ms.)
    pub fn reserve_total_unpopulated(&mut self, capacity: usize) -> io::Result<()> {
        self.reserve(capacity, false)
    }

    fn reserve(&mut self, capacity: usize, populate: bool) -> io::Result<()> {
        if capacity <= self.capacity() {
            return Ok(());
        }
        let mut options = memmap2::MmapOptions::new();
        options.len(capacity);
        if populate {
            options.populate();
        }
        let mut memory = options.map_anon()?;
        if !populate {
            // A hint: without huge pages (none free, or transparent huge pages turned
            // off) the memory is in 4 KiB pages, as before; nothing to report.
            let _ = memory.advise(memmap2::Advice::HugePage);
        }
        if let Some(old) = &self.memory {
            memory[..self.len].copy_from_slice(&old[..self.len]);
        }
        self.memory = Some(memory);
        Ok(())
    }

    /// The unfilled part, for a read to fill; [`FileBuf::filled`] then counts it.
    pub fn unfilled(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.memory {
            Some(memory) => &mut memory[len..],
            None => &mut [],
        }
    }

    /// `n` more bytes, at the start of [`FileBuf::unfilled`], hold the file's.
    pub fn filled(&mut self, n: usize) {
        assert!(self.len + n <= self.capacity());
        self.len += n;
    }

    /// Appends `bytes`, growing the buffer as needed.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reserve_total(self.len + bytes.len())?;
        self.unfilled()[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
        Ok(())
    }
}

impl Deref for FileBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.memory {
            Some(memory) => &memory[..self.len],
            None => &[],
        }
    }
}

impl fmt::Debug for FileBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFs;

struct OsFile(File);

impl Vfs for OsFs {
    fn create_dir(&self, dir: &Path) -> io::Result<bool> {
        match std::fs::create_dir(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn map(&self, path: &Path) -> io::Result<Region> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Region::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only. quire never truncates or rewrites the bytes of
        // a mapped region while it is mapped: sealed segments are immutable until they
        // are deleted (which unlinks, leaving the mapping valid), and snapshot files are
        // replaced by rename, never modified in place. The data directory is locked
        // against other quire processes; another program changing files under us is
        // outside what any storage engine can defend against.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Region::Mapped(map))
    }

    fn read_file(&self, path: &Path, buf: FileBuf) -> io::Result<Region> {
        direct::read_file(path, buf)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        use nix::fcntl::{Flock, FlockArg};
        let file = File::open(dir)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Box::new(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "data directory {} is locked by another quire process",
                    dir.display()
                ),
            )),
            Err((_, errno)) => Err(io::Error::from(errno)),
        }
    }
}

impl VfsFile for OsFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn allocate(&self, len: u64) -> io::Result<bool> {
        use nix::fcntl::{fallocate, FallocateFlags};
        match fallocate(&self.0, FallocateFlags::empty(), 0, len as i64) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}
