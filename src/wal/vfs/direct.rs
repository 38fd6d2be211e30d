//! Reading a whole file on a real disk ([`super::Vfs::read_file`] of [`super::OsFs`]):
//! recovery reads every segment once, front to back, and is bound by how fast it can.
//!
//! Why not the page cache (a memory map, or plain reads): from a cold cache, the
//! kernel's readahead feeds a sequential reader in windows of its `read_ahead_kb`
//! (128 KiB by default), and on the VM quire was measured on that capped a cold start
//! near 740 MB/s, where the disk gives 1.7 to 2.0 GB/s to 1 MiB `O_DIRECT` reads (fio,
//! same sitting). So what the cache does not hold is read with `O_DIRECT`, in
//! chunks of [`CHUNK`] straight into the caller's page-aligned buffer. What the cache
//! does hold (a restart of the process, not of the machine) is not read from the disk
//! again, which would be slower than memory: a file wholly cached is mapped, its page
//! table filled here (`MAP_POPULATE`, on the reading thread, not the scan's), which
//! costs less than copying it (measured: 8 MiB copies from the cache ran at 1.5 to
//! 2 GB/s on that VM); a chunk wholly cached of a file partly cached is copied.
//! `mincore` on a mapping of the file tells which.
//!
//! What bounds this read (measured on that VM, one sitting, 2 cores idle): not the
//! disk alone but where its bytes land. fio's `O_DIRECT` sequential read of 1 GiB ran
//! at 2.0 GB/s with a 1 MiB buffer used over and over, 1.6 with 8 MiB and 1.35 to 1.4
//! with 64 MiB; reading every segment of a 1.2 GB log into 64 MiB buffers of 4 KiB
//! pages, with nothing else running, went at 1.4 to 1.6 GB/s (one 1 MiB read at a
//! time or this file's two 8 MiB ones alike), into one 1 MiB buffer used over and
//! over at 2.4, and into 64 MiB buffers of huge pages at 2.2 to 2.3. A segment has to
//! land whole in memory (replay keeps its records, grouped by document), so the
//! buffers are in huge pages ([`FileBuf::reserve_total_unpopulated`]).
//!
//! Where `O_DIRECT` is refused (EINVAL: tmpfs, some FUSE and network file systems, or
//! a device whose blocks are larger than a page), plain reads do the whole job.
//! Either way the bytes read are the file's: a chunk whose pages are all cached is
//! read through the cache, and a direct read first writes back the dirty cached pages
//! of its range.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use super::{FileBuf, Region};

/// Bytes per read. Reads of 1, 2 and 8 MiB made no measurable difference to the
/// rate (the kernel splits each into requests of the device's size); the larger, the
/// fewer calls.
pub const CHUNK: usize = 8 << 20;

/// Alignment of the buffer, offsets and lengths of an `O_DIRECT` read: the page size,
/// a multiple of every logical block size up to it.
const DIRECT_ALIGN: usize = 4096;

pub(super) fn read_file(path: &Path, mut buf: FileBuf) -> io::Result<Region> {
    buf.clear();
    let file = File::open(path)?;
    let size = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file larger than memory"))?;
    let cache = CacheProbe::new(&file, size);
    if cache.holds(0, size) {
        // SAFETY: as for `OsFs::map`: the map is read-only, and quire changes no byte
        // of a segment while recovery reads it (a torn tail is cut after the scan,
        // once the scan's maps are gone).
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
        return Ok(Region::Mapped(map));
    }
    let aligned = size.next_multiple_of(DIRECT_ALIGN);
    // Populated a chunk at a time, by the thread about to read it: see below.
    buf.reserve_total_unpopulated(aligned)?;
    let direct = open_direct(path)?;
    let reader = ChunkReader {
        file: &file,
        direct: direct.as_ref(),
        cache: &cache,
        size,
    };
    // Two reads in flight, the chunks taken in turn by this thread and a helper: the
    // disk serves two at once faster than one (fio, O_DIRECT, 8 MiB blocks: 2.5 GB/s
    // at queue depth 2 against 2.1 at 1; this read of a 1.2 GB log: 1.4 to 1.7 GB/s
    // against 1.3 to 1.4, on the VM measured). Memory is what it was: one buffer.
    // Each thread populates its chunk of a new buffer just before reading into it
    // ([`populate`]): while one does, the other's read keeps the disk busy.
    let chunks = Mutex::new(buf.unfilled()[..aligned].chunks_mut(CHUNK).enumerate());
    let read_chunks = || -> io::Result<()> {
        loop {
            let next = chunks.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((index, chunk)) = next else {
                return Ok(());
            };
            populate(chunk);
            reader.read_chunk(index * CHUNK, chunk)?;
        }
    };
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("quire-wal-read".into())
            .spawn_scoped(scope, read_chunks);
        let mine = read_chunks();
        match helper {
            Ok(helper) => {
                let theirs = helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                mine.and(theirs)
            }
            // No second thread: this one has read every chunk.
            Err(_) => mine,
        }
    })?;
    buf.filled(size);
    Ok(Region::Read(buf))
}

/// Faults in the pages of `chunk` that are not yet (memory new to the process) in one
/// call, `MADV_POPULATE_WRITE`, rather than leaving it to the read: an `O_DIRECT` read
/// pins its buffer's pages before the request goes to the disk, faulting them in one
/// at a time, so a chunk populated here, while another is being read, is ready for the
/// disk at once. Nothing to do for pages already there (a buffer reused). Errors are
/// ignored: on a kernel without it (before 5.14: EINVAL) the read faults the pages in,
/// as it would have.
fn populate(chunk: &mut [u8]) {
    if chunk.is_empty() {
        return;
    }
    // SAFETY: `chunk` is memory this thread holds exclusively (a `&mut`), starting on
    // a page boundary (chunks are multiples of the page size from the page-aligned
    // buffer: asserted). MADV_POPULATE_WRITE only faults the range's pages in as if
    // written, keeping their contents; it changes no byte. Hand-written: memmap2's
    // advice takes the whole map, which the reading threads share as disjoint `&mut`
    // chunks; neither std nor nix 0.32 has this advice.
    assert_eq!(
        chunk.as_ptr() as usize % DIRECT_ALIGN,
        0,
        "chunks are page-aligned"
    );
    unsafe {
        libc::madvise(
            chunk.as_mut_ptr() as *mut libc::c_void,
            chunk.len(),
            libc::MADV_POPULATE_WRITE,
        );
    }
}

/// Reads chunks of one file.
struct ChunkReader<'a> {
    file: &'a File,
    /// The file opened with `O_DIRECT`, where the file system takes it.
    direct: Option<&'a File>,
    cache: &'a CacheProbe,
    /// The file's length: every byte up to it is read.
    size: usize,
}

impl ChunkReader<'_> {
    /// Fills `chunk` with the file's bytes from `offset`, up to the file's end.
    fn read_chunk(&self, offset: usize, chunk: &mut [u8]) -> io::Result<()> {
        let expected = chunk.len().min(self.size - offset);
        let mut direct = self.direct.filter(|_| !self.cache.holds(offset, expected));
        let mut got = 0;
        while got < expected {
            let at = (offset + got) as u64;
            let read = match direct {
                // The whole rest of the chunk: a length that stays a multiple of the
                // alignment, even where the file ends short of it.
                Some(file) => file.read_at(&mut chunk[got..], at),
                None => self.file.read_at(&mut chunk[got..expected], at),
            };
            match read {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file became shorter while it was read",
                    ))
                }
                Ok(n) => got += n.min(expected - got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // O_DIRECT refused (alignment this file system will not take): plain
                // reads for the rest.
                Err(e) if direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The file opened again with `O_DIRECT`, or `None` where the file system refuses it.
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Which parts of a file the page cache holds.
struct CacheProbe {
    /// A mapping of the file that is never read through: `mincore` needs an address
    /// range, and reports the file's cached pages under it without faulting any in.
    map: Option<memmap2::Mmap>,
}

impl CacheProbe {
    fn new(file: &File, size: usize) -> CacheProbe {
        if size == 0 {
            return CacheProbe { map: None };
        }
        // SAFETY: no byte is ever read through this mapping (only its address is used,
        // by mincore), so a change to the file under it cannot be observed as one.
        let map = unsafe { memmap2::MmapOptions::new().len(size).map(file) }.ok();
        CacheProbe { map }
    }

    /// Whether every page of `offset..offset + len` is in the page cache. `false` when
    /// unknown (no mapping, or mincore failed): the disk is then read directly.
    fn holds(&self, offset: usize, len: usize) -> bool {
        let Some(map) = &self.map else {
            return false;
        };
        let end = (offset + len).min(map.len());
        if offset >= end {
            return false;
        }
        let pages = (end - offset).div_ceil(DIRECT_ALIGN);
        let mut resident = vec![0u8; pages];
        assert_eq!(offset % DIRECT_ALIGN, 0, "chunks start on page boundaries");
        // SAFETY: the range lies within the live mapping `map`; `resident` has a byte
        // for every 4 KiB page of it, as many as mincore writes (fewer with larger
        // pages). The start is a multiple of 4 KiB from the page-aligned mapping; where
        // pages are larger and it falls inside one, mincore fails (EINVAL), which reads
        // as "not cached". Hand-written: neither std, nix 0.32 nor memmap2 has mincore.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(offset) as *mut libc::c_void,
                end - offset,
                resident.as_mut_ptr(),
            )
        };
        rc == 0 && resident.iter().all(|&page| page & 1 == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A file of `len` bytes that no two chunks would share a pattern of.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8)
            .collect()
    }

    fn drop_from_cache(path: &Path) {
        let file = File::open(path).unwrap();
        // SAFETY: a valid open descriptor; DONTNEED only drops clean cached pages.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_direct_read_refused_with_einval_is_done_with_plain_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let len = 3 * DIRECT_ALIGN + 5;
        let bytes = pattern(len);
        std::fs::write(&path, &bytes).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        drop_from_cache(&path);
        let file = File::open(&path).unwrap();
        let direct = open_direct(&path).unwrap();
        let cache = CacheProbe::new(&file, len);
        let reader = ChunkReader {
            file: &file,
            direct: direct.as_ref(),
            cache: &cache,
            size: len,
        };
        // One byte past an allocation's start is never aligned: O_DIRECT refuses it.
        let mut memory = vec![0u8; 4 * DIRECT_ALIGN + 1];
        let chunk = &mut memory[1..];
        reader.read_chunk(0, chunk).unwrap();
        assert!(chunk[..len] == bytes[..]);
    }

    #[test]
    fn populating_memory_changes_no_byte_of_it_new_or_written() {
        let mut buf = FileBuf::new();
        buf.extend_from_slice(b"kept").unwrap();
        buf.reserve_total_unpopulated(2 * CHUNK).unwrap();
        assert_eq!(&buf[..], b"kept", "the filled bytes are kept");
        buf.clear();
        let memory = &mut buf.unfilled()[..2 * CHUNK];
        // New memory: populated, it reads as zeros past the bytes copied into it.
        populate(&mut memory[..CHUNK]);
        assert_eq!(&memory[..4], b"kept");
        assert!(memory[4..].iter().all(|&b| b == 0));
        // Written memory: populated again, it keeps what was written.
        let bytes = pattern(2 * CHUNK);
        memory.copy_from_slice(&bytes);
        populate(&mut memory[CHUNK..]);
        populate(&mut memory[..CHUNK]);
        assert!(memory[..] == bytes[..]);
    }

    #[test]
    fn a_file_reads_back_whole_cached_or_not_at_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = FileBuf::new();
        for len in [0, 1, 4095, 4096, 100_000, CHUNK, 2 * CHUNK + 12_345] {
            let path = dir.path().join(format!("{len}.bin"));
            let bytes = pattern(len);
            std::fs::write(&path, &bytes).unwrap();
            File::open(&path).unwrap().sync_all().unwrap();
            // Cached (just written), then read from the disk, then partly cached.
            for state in ["cached", "uncached", "partly cached"] {
                match state {
                    "uncached" => drop_from_cache(&path),
                    "partly cached" => {
                        let file = File::open(&path).unwrap();
                        let mut head = vec![0u8; len.min(CHUNK + 4096)];
                        file.read_exact_at(&mut head, 0).unwrap();
                    }
                    _ => {}
                }
                let region = read_file(&path, buf).unwrap();
                assert!(region[..] == bytes[..], "{len} bytes, {state}");
                buf = region.into_buffer().unwrap_or_default();
            }
        }
    }
}
