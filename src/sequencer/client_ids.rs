//! Client ids the server gives out (a `Hello` with client id 0), unique for the life of
//! the data directory: they come from a counter whose high-water mark is on disk, in
//! the file `client-ids` (format in wal-format.md), reserved a block at a time so that
//! one fsync covers [`BLOCK`] ids. After a crash the unused rest of the block is
//! skipped, never handed out twice.
//!
//! Server-given ids are at or above [`FIRST_ASSIGNED`] (the top bit set): a program that
//! still picks its own id picks one below it (protocol.md, Handshake), so the two kinds
//! never meet.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::wal::vfs::{at_path, Vfs};

/// The first id the server gives out.
pub const FIRST_ASSIGNED: u64 = 1 << 63;
/// Ids reserved on disk at once.
pub const BLOCK: u64 = 1024;
const MAGIC: [u8; 4] = *b"QCID";
const FILE_LEN: usize = 16;

pub struct ClientIds {
    vfs: Arc<dyn Vfs>,
    path: PathBuf,
    dir: PathBuf,
    /// (the next id to give, the first id not reserved on disk).
    next: Mutex<(u64, u64)>,
}

impl ClientIds {
    /// Reads the high-water mark of `data_dir` (none yet: ids start at
    /// [`FIRST_ASSIGNED`]). A damaged file is an error: guessing could repeat an id.
    pub fn open(vfs: Arc<dyn Vfs>, data_dir: &Path) -> io::Result<Self> {
        let path = data_dir.join("client-ids");
        let start = match vfs.open(&path) {
            Ok(file) => {
                let mut buf = [0u8; FILE_LEN];
                let len = file.file_len().map_err(at_path("reading", &path))?;
                if len != FILE_LEN as u64 {
                    return Err(damaged(&path, format!("{len} bytes, not {FILE_LEN}")));
                }
                file.read_exact_at(&mut buf, 0)
                    .map_err(at_path("reading", &path))?;
                decode(&buf).map_err(|why| damaged(&path, why))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => FIRST_ASSIGNED,
            Err(e) => return Err(at_path("opening", &path)(e)),
        };
        Ok(ClientIds {
            vfs,
            dir: data_dir.to_path_buf(),
            path,
            // Nothing of the block from `start` is reserved until the first id is given.
            next: Mutex::new((start, start)),
        })
    }

    /// A client id never given before. Blocking (one write and fsync per [`BLOCK`]
    /// ids, holding this allocator's lock only: nothing else waits on it).
    pub fn assign(&self) -> io::Result<u64> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let (id, reserved) = *next;
        if id == reserved {
            let mark = reserved.checked_add(BLOCK).ok_or_else(|| {
                io::Error::other("every client id this data directory can give is used")
            })?;
            self.write(mark)?;
            next.1 = mark;
        }
        next.0 = id + 1;
        Ok(id)
    }

    /// Skips `gap` ids past every id reserved so far, on disk: no id below the new mark
    /// is given. A restored backup does this, since the server it was taken from may
    /// have given more ids after it, to clients that may come back. Returns the new mark.
    pub fn skip(&self, gap: u64) -> io::Result<u64> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let mark = next.1.max(next.0).checked_add(gap).ok_or_else(|| {
            io::Error::other("every client id this data directory can give is used")
        })?;
        self.write(mark)?;
        *next = (mark, mark);
        Ok(mark)
    }

    /// Replaces the file with one that reserves ids below `mark`: a new file, synced,
    /// renamed over the old one, and the directory synced.
    fn write(&self, mark: u64) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let file = self.vfs.create(&tmp).map_err(at_path("creating", &tmp))?;
        file.write_all_at(&encode(mark), 0)
            .map_err(at_path("writing", &tmp))?;
        file.sync_all().map_err(at_path("syncing", &tmp))?;
        drop(file);
        self.vfs
            .rename(&tmp, &self.path)
            .map_err(at_path("renaming", &tmp))?;
        self.vfs
            .sync_dir(&self.dir)
            .map_err(at_path("syncing", &self.dir))
    }
}

fn encode(mark: u64) -> [u8; FILE_LEN] {
    let mut buf = [0u8; FILE_LEN];
    buf[..4].copy_from_slice(&MAGIC);
    buf[4..12].copy_from_slice(&mark.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..12]);
    buf[12..].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn decode(buf: &[u8; FILE_LEN]) -> Result<u64, String> {
    if buf[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(buf[12..].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&buf[..12]) {
        return Err("checksum mismatch".into());
    }
    let mark = u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes"));
    if mark < FIRST_ASSIGNED {
        return Err(format!("high-water mark {mark} below the first id"));
    }
    Ok(mark)
}

fn damaged(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is damaged ({why}); it holds the highest client id given out: restore it \
             from a backup, or remove it only if no client keeps an id from this server",
            path.display()
        ),
    )
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::wal::vfs::sim::{CrashMode, SimFs};

    #[test]
    fn ids_are_unique_across_restarts_and_crashes() {
        let mut fs = SimFs::new();
        let dir = Path::new("/data");
        fs.create_dir_all(dir).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        let mut seen = std::collections::HashSet::new();
        for round in 0..3 {
            let ids = ClientIds::open(Arc::new(fs.clone()), dir).unwrap();
            for _ in 0..(BLOCK + 5) {
                let id = ids.assign().unwrap();
                assert!(id >= FIRST_ASSIGNED);
                assert!(seen.insert(id), "id {id} given twice (round {round})");
            }
            // What was not synced is lost; the reserved mark was synced.
            fs = fs.crash(CrashMode::TearUnsynced { seed: round });
        }
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let fs = SimFs::new();
        let dir = Path::new("/data");
        fs.create_dir_all(dir).unwrap();
        let ids = ClientIds::open(Arc::new(fs.clone()), dir).unwrap();
        ids.assign().unwrap();
        let file = fs.open(&dir.join("client-ids")).unwrap();
        file.write_all_at(&[0xFF], 5).unwrap();
        let err = ClientIds::open(Arc::new(fs.clone()), dir).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
