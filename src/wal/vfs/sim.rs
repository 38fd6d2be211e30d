//! A simulated disk for tests: the model of the disk is part of the test suite.
//!
//! Every file keeps two versions: what was written (what reads see) and what is
//! durable (what a completed `sync_data` covered). Directory entries are likewise only
//! durable after `sync_dir` of the directory holding them, directories included: a
//! directory whose entry was never synced is lost in a crash with everything in it.
//! [`SimFs::crash`] returns the disk as a machine would find
//! it after power loss: durable bytes, plus (optionally) some of the unsynced writes
//! with the last one torn at 512-byte granularity. Faults: fsync failing with EIO after
//! a countdown, bit flips anywhere, and a panic in a chosen call (a bug under the log).

use std::any::Any;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FileBuf, Region, Vfs, VfsFile};

pub const SECTOR: usize = 512;

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

fn apply(target: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if target.len() < end {
                target.resize(end, 0);
            }
            target[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => target.resize(*len as usize, 0),
    }
}

type InodeRef = Arc<Mutex<Inode>>;

#[derive(Debug, Default)]
struct State {
    names: BTreeMap<PathBuf, InodeRef>,
    durable_names: BTreeMap<PathBuf, InodeRef>,
    /// Directories (the root is implicit and always there).
    dirs: HashSet<PathBuf>,
    /// Directories whose entry in their parent was synced.
    durable_dirs: HashSet<PathBuf>,
    locked: HashSet<PathBuf>,
    /// `Some(n)`: n more syncs succeed, then every sync fails with EIO.
    syncs_before_failure: Option<u64>,
    syncs: u64,
    panic_at: Option<PanicAt>,
    /// Bytes files may still grow by (`None`: unlimited); past it, ENOSPC.
    space_left: Option<u64>,
}

/// A simulated bug in the file layer: the next call of this kind panics, in whichever
/// thread makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicAt {
    /// `sync_data`: the writer's `fdatasync` after a batch (segment preparation and
    /// snapshots use `sync_all`).
    SyncData,
    /// `allocate`: the segment preparer, once per new segment.
    Allocate,
}

/// How a crash treats writes that were not yet synced.
#[derive(Debug, Clone, Copy)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    LoseUnsynced,
    /// Per file, a prefix of the unsynced writes survives (its length chosen by `seed`)
    /// and the last surviving write is torn: a random subset of the 512-byte sectors it
    /// touches reaches the disk.
    TearUnsynced { seed: u64 },
}

/// The simulated disk. Cloning gives another handle to the same disk.
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
    /// While `true`, every sync waits (a disk that is slow to flush, on demand).
    held: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root(path: &Path) -> bool {
    path.parent().is_none()
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: not found", path.display()),
    )
}

/// A small deterministic generator (splitmix64) so that crash shapes are reproducible
/// from a seed without a dependency.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// After `n` more successful syncs (file or directory), every sync fails with EIO
    /// and makes nothing durable.
    pub fn fail_syncs_after(&self, n: u64) {
        lock(&self.state).syncs_before_failure = Some(n);
    }

    /// The disk fills up: files may grow by `bytes` more in all (writes past a file's
    /// end, `allocate`, `set_len`), then growing fails with `StorageFull` (ENOSPC).
    /// Writes inside a file's length (a preallocated segment) still succeed, as on a
    /// real file system. A crash gives a disk with room again.
    pub fn fill_after(&self, bytes: u64) {
        lock(&self.state).space_left = Some(bytes);
    }

    /// Takes `bytes` of free space, or fails as a full disk does. The caller holds the
    /// disk's state, taken before the file's inode: the one lock order (as `crash`).
    fn grow(state: &mut State, bytes: u64) -> io::Result<()> {
        match &mut state.space_left {
            Some(left) if *left < bytes => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated ENOSPC: no space left on device",
            )),
            Some(left) => {
                *left -= bytes;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The next call of kind `at` panics.
    pub fn panic_at_next(&self, at: PanicAt) {
        lock(&self.state).panic_at = Some(at);
    }

    fn maybe_panic(&self, at: PanicAt) {
        let armed = {
            let mut state = lock(&self.state);
            state.panic_at.take_if(|armed| *armed == at).is_some()
        };
        if armed {
            panic!("simulated panic in {at:?}");
        }
    }

    /// How many syncs succeeded so far.
    pub fn sync_count(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// The disk as found after a power loss at this moment.
    pub fn crash(&self, mode: CrashMode) -> SimFs {
        let state = lock(&self.state);
        let mut rng = SplitMix(match mode {
            CrashMode::LoseUnsynced => 0,
            CrashMode::TearUnsynced { seed } => seed,
        });
        // A directory survives if its entry and every ancestor's entry were synced.
        let dirs: HashSet<PathBuf> = state
            .durable_dirs
            .iter()
            .filter(|d| {
                d.ancestors()
                    .skip(1)
                    .all(|a| is_root(a) || state.durable_dirs.contains(a))
            })
            .cloned()
            .collect();
        let mut names = BTreeMap::new();
        for (path, inode) in &state.durable_names {
            if !path
                .parent()
                .is_some_and(|p| is_root(p) || dirs.contains(p))
            {
                continue;
            }
            let inode = lock(inode);
            let mut data = inode.durable.clone();
            if let CrashMode::TearUnsynced { .. } = mode {
                let keep = rng.below(inode.pending.len() as u64 + 1) as usize;
                for (i, op) in inode.pending[..keep].iter().enumerate() {
                    let last = i + 1 == keep;
                    match op {
                        Pending::Write {
                            offset,
                            data: bytes,
                        } if last => {
                            // Tear at absolute sector boundaries, as a disk does: each
                            // sector the write touches reaches the disk whole or not at all.
                            let start = *offset as usize;
                            let end = start + bytes.len();
                            let mut piece = start;
                            while piece < end {
                                let piece_end = ((piece / SECTOR + 1) * SECTOR).min(end);
                                if rng.below(2) == 1 {
                                    let op = Pending::Write {
                                        offset: piece as u64,
                                        data: bytes[piece - start..piece_end - start].to_vec(),
                                    };
                                    apply(&mut data, &op);
                                }
                                piece = piece_end;
                            }
                        }
                        _ => apply(&mut data, op),
                    }
                }
            }
            let fresh = Inode {
                durable: data.clone(),
                data,
                pending: Vec::new(),
            };
            names.insert(path.clone(), Arc::new(Mutex::new(fresh)));
        }
        SimFs {
            state: Arc::new(Mutex::new(State {
                durable_names: names.clone(),
                names,
                durable_dirs: dirs.clone(),
                dirs,
                ..State::default()
            })),
            held: Arc::default(),
        }
    }

    /// Flips one bit of a file, in what reads see and in what is durable.
    pub fn flip_bit(&self, path: &Path, byte: usize, bit: u8) -> io::Result<()> {
        let state = lock(&self.state);
        let inode = state.names.get(path).ok_or_else(|| not_found(path))?;
        let mut inode = lock(inode);
        if byte >= inode.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset past end",
            ));
        }
        inode.data[byte] ^= 1 << bit;
        if byte < inode.durable.len() {
            inode.durable[byte] ^= 1 << bit;
        }
        Ok(())
    }

    /// Paths of all files, current namespace.
    pub fn files(&self) -> Vec<PathBuf> {
        lock(&self.state).names.keys().cloned().collect()
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        lock(&self.state)
            .names
            .get(path)
            .map(|i| lock(i).data.len())
    }

    /// Makes every sync wait until [`SimFs::release_syncs`]: ops stay sequenced but not
    /// durable for as long as a test needs.
    pub fn hold_syncs(&self) {
        *lock(&self.held.0) = true;
    }

    pub fn release_syncs(&self) {
        *lock(&self.held.0) = false;
        self.held.1.notify_all();
    }

    fn take_sync(&self) -> io::Result<()> {
        let mut held = lock(&self.held.0);
        while *held {
            held = self.held.1.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        drop(held);
        let mut state = lock(&self.state);
        match state.syncs_before_failure {
            Some(0) => Err(io::Error::other("simulated EIO from fsync")),
            Some(ref mut n) => {
                *n -= 1;
                state.syncs += 1;
                Ok(())
            }
            None => {
                state.syncs += 1;
                Ok(())
            }
        }
    }

    fn inode(&self, path: &Path) -> io::Result<InodeRef> {
        lock(&self.state)
            .names
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))
    }
}

struct SimFile {
    fs: SimFs,
    inode: InodeRef,
}

impl SimFile {
    /// What a completed sync does: every write so far becomes durable.
    fn sync(&self) -> io::Result<()> {
        self.fs.take_sync()?;
        let mut inode = lock(&self.inode);
        let pending = std::mem::take(&mut inode.pending);
        for op in &pending {
            apply(&mut inode.durable, op);
        }
        Ok(())
    }
}

impl Vfs for SimFs {
    fn create_dir(&self, dir: &Path) -> io::Result<bool> {
        let mut state = lock(&self.state);
        if is_root(dir) || state.dirs.contains(dir) {
            return Ok(false);
        }
        if state.names.contains_key(dir) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let parent = dir.parent().expect("not the root");
        if !is_root(parent) && !state.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        state.dirs.insert(dir.to_path_buf());
        Ok(true)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = lock(&self.state);
        if !state.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(state
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let mut state = lock(&self.state);
        if state.names.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let inode = InodeRef::default();
        state.names.insert(path.to_path_buf(), inode.clone());
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode: self.inode(path)?,
        }))
    }

    fn map(&self, path: &Path) -> io::Result<Region> {
        let inode = self.inode(path)?;
        let data = lock(&inode).data.clone();
        Ok(Region::Owned(data))
    }

    fn reads_wait(&self) -> bool {
        false
    }

    fn read_file(&self, path: &Path, mut buf: FileBuf) -> io::Result<Region> {
        let inode = self.inode(path)?;
        buf.clear();
        buf.extend_from_slice(&lock(&inode).data)?;
        Ok(Region::Read(buf))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        let inode = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        if state.names.contains_key(to) || state.dirs.contains(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let parent = to.parent().expect("a file is not the root");
        if !is_root(parent) && !state.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        // One inode under two names (a crash gives each surviving name a copy of its own:
        // nothing here links files in a directory that is synced).
        let inode = state
            .names
            .get(from)
            .cloned()
            .ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.state)
            .names
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if !is_root(dir) && !lock(&self.state).dirs.contains(dir) {
            return Err(not_found(dir));
        }
        self.take_sync()?;
        let mut state = lock(&self.state);
        let State {
            names,
            durable_names,
            dirs,
            durable_dirs,
            ..
        } = &mut *state;
        durable_names.retain(|p, _| p.parent() != Some(dir));
        for (p, inode) in names.iter() {
            if p.parent() == Some(dir) {
                durable_names.insert(p.clone(), inode.clone());
            }
        }
        durable_dirs.extend(dirs.iter().filter(|d| d.parent() == Some(dir)).cloned());
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        struct Guard(SimFs, PathBuf);
        impl Drop for Guard {
            fn drop(&mut self) {
                lock(&self.0.state).locked.remove(&self.1);
            }
        }
        if !lock(&self.state).locked.insert(dir.to_path_buf()) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "directory is locked",
            ));
        }
        Ok(Box::new(Guard(self.clone(), dir.to_path_buf())))
    }
}

impl VfsFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = lock(&self.fs.state);
        let mut inode = lock(&self.inode);
        let end = offset + buf.len() as u64;
        SimFs::grow(&mut state, end.saturating_sub(inode.data.len() as u64))?;
        drop(state);
        let op = Pending::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut inode.data, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inode = lock(&self.inode);
        let start = offset as usize;
        let end = start + buf.len();
        if end > inode.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        buf.copy_from_slice(&inode.data[start..end]);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.maybe_panic(PanicAt::SyncData);
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    fn allocate(&self, len: u64) -> io::Result<bool> {
        self.fs.maybe_panic(PanicAt::Allocate);
        let mut state = lock(&self.fs.state);
        let mut inode = lock(&self.inode);
        if (inode.data.len() as u64) < len {
            SimFs::grow(&mut state, len - inode.data.len() as u64)?;
            let op = Pending::SetLen(len);
            apply(&mut inode.data, &op);
            inode.pending.push(op);
        }
        Ok(true)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = lock(&self.fs.state);
        let mut inode = lock(&self.inode);
        SimFs::grow(&mut state, len.saturating_sub(inode.data.len() as u64))?;
        drop(state);
        let op = Pending::SetLen(len);
        apply(&mut inode.data, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(lock(&self.inode).data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_and_its_files_survive_a_crash_only_once_its_parent_is_synced() {
        let fs = SimFs::new();
        let (data, wal) = (Path::new("/data"), Path::new("/data/wal"));
        assert!(fs.create_dir(data).unwrap());
        assert!(fs.create_dir(wal).unwrap());
        let file = fs.create(&wal.join("1.wal")).unwrap();
        file.write_all_at(b"acked", 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(wal).unwrap();
        // The file and its name in wal/ are durable, but wal/ and /data are not.
        let crashed = fs.crash(CrashMode::LoseUnsynced);
        assert!(crashed.list(data).is_err() && crashed.list(wal).is_err());
        assert!(crashed.files().is_empty());

        fs.sync_dir(Path::new("/")).unwrap();
        let crashed = fs.crash(CrashMode::LoseUnsynced);
        assert!(
            crashed.list(data).unwrap().is_empty(),
            "wal/ is not in it yet"
        );
        assert!(crashed.list(wal).is_err());

        fs.sync_dir(data).unwrap();
        let crashed = fs.crash(CrashMode::LoseUnsynced);
        assert_eq!(crashed.list(wal).unwrap(), vec!["1.wal".to_string()]);
        assert_eq!(crashed.map(&wal.join("1.wal")).unwrap()[..], b"acked"[..]);
    }

    #[test]
    fn create_dir_all_syncs_the_parent_of_every_directory_it_creates() {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/a/b/c")).unwrap();
        assert_eq!(fs.sync_count(), 3);
        let crashed = fs.crash(CrashMode::LoseUnsynced);
        assert!(crashed.list(Path::new("/a/b/c")).is_ok());
        fs.create_dir_all(Path::new("/a/b/c")).unwrap();
        assert_eq!(fs.sync_count(), 3, "nothing created, nothing synced");
    }

    /// What the backup's capture relies on (`sequencer::backup`), on the real file
    /// system and the simulated one alike: a hard link keeps the file as it was when
    /// the original name is replaced by a rename or removed, and sees what is written
    /// to the file in place.
    fn hard_link_keeps_a_replaced_file(fs: &dyn Vfs, dir: &Path) {
        let (a, b, c) = (dir.join("a"), dir.join("b"), dir.join("c"));
        let written = fs.create(&a).unwrap();
        written.write_all_at(b"first", 0).unwrap();
        fs.hard_link(&a, &b).unwrap();
        written.write_all_at(b"F", 0).unwrap();
        assert_eq!(&fs.map(&b).unwrap()[..], b"First");
        let kind = |r: io::Result<()>| r.unwrap_err().kind();
        assert_eq!(kind(fs.hard_link(&a, &b)), io::ErrorKind::AlreadyExists);
        assert_eq!(
            kind(fs.hard_link(&c, &dir.join("d"))),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            kind(fs.hard_link(&a, &dir.join("no-such-dir/e"))),
            io::ErrorKind::NotFound
        );
        fs.create(&c).unwrap().write_all_at(b"second", 0).unwrap();
        fs.rename(&c, &a).unwrap();
        assert_eq!(&fs.map(&a).unwrap()[..], b"second");
        assert_eq!(&fs.map(&b).unwrap()[..], b"First");
        fs.remove(&a).unwrap();
        assert_eq!(&fs.map(&b).unwrap()[..], b"First");
        assert_eq!(fs.open(&b).unwrap().file_len().unwrap(), 5);
    }

    #[test]
    fn a_hard_link_keeps_a_replaced_file_on_the_real_and_the_simulated_disk() {
        let tmp = tempfile::tempdir().unwrap();
        hard_link_keeps_a_replaced_file(&crate::wal::vfs::OsFs, tmp.path());
        let fs = SimFs::new();
        fs.create_dir(Path::new("/d")).unwrap();
        hard_link_keeps_a_replaced_file(&fs, Path::new("/d"));
    }
}
