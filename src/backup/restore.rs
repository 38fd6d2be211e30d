//! `quire restore`: a backup directory made into a data directory, every checksum
//! checked first.
//!
//! The files are copied into a temporary directory beside the target, each checked
//! against the manifest's length and SHA-256 as it is copied (a mismatch names the
//! file); the segment cut at the backup's LSN gets its zeros back (the length it had
//! on the server, as a preallocated segment). Every snapshot is decoded (its own
//! CRC32C), then the directory is opened as the server opens one
//! ([`LocalSequencer::open`]: every record's CRC32C, LSN continuity, each document's
//! ops applying), and must come back with a log ending exactly at the manifest's LSN,
//! no tail to cut, and every document at the manifest's version. Only then is the
//! temporary directory renamed to the target.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::client::sync_dir;
use super::{hex, io_at, BackupError, Manifest, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION};
use crate::sequencer::client_ids::ClientIds;
use crate::sequencer::local::{LocalConfig, LocalSequencer};
use crate::sequencer::Sequencer;
use crate::wal::snapshot::{parse_snapshot_file_name, Snapshot};
use crate::wal::vfs::{OsFs, Vfs};
use crate::wal::WalConfig;

/// Largest manifest read.
const MANIFEST_BYTES_MAX: u64 = 256 << 20;
/// Bytes between two progress reports.
const PROGRESS_EVERY_BYTES: u64 = 4 << 20;

/// What a restore brought back.
#[derive(Debug, Clone)]
pub struct Restored {
    pub lsn: u64,
    pub documents: usize,
    pub files: usize,
    pub bytes: u64,
}

/// Reads and checks `from/manifest.json`.
pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let path = from.join(MANIFEST_FILE);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MANIFEST_BYTES_MAX).read_to_string(&mut text))
        .map_err(io_at("reading", &path))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| BackupError::Manifest(format!("{}: {e}", path.display())))?;
    if manifest.format != MANIFEST_FORMAT || manifest.version != MANIFEST_VERSION {
        return Err(BackupError::Manifest(format!(
            "{}: format {:?} version {}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}",
            path.display(),
            manifest.format,
            manifest.version
        )));
    }
    let mut names = std::collections::HashSet::new();
    for file in &manifest.files {
        if !super::valid_file_name(&file.name) || !names.insert(file.name.as_str()) {
            return Err(BackupError::Manifest(format!(
                "{}: file {:?} is not a segment or snapshot name, or is listed twice",
                path.display(),
                file.name
            )));
        }
        if file.sha256.is_none() || file.restored_len < file.len {
            return Err(BackupError::Manifest(format!(
                "{}: file {:?} has no checksum or a restored length below its length",
                path.display(),
                file.name
            )));
        }
    }
    Ok(manifest)
}

/// Restores the backup in `from` into `data_dir`, which must not exist or be empty
/// (a refused restore leaves it as it was).
/// `progress(bytes_done, bytes)` is called every 4 MiB and after the last file.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Restored, BackupError> {
    let manifest = read_manifest(from)?;
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty(data_dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at("reading", data_dir)(e)),
    }
    let staging = staging_path(data_dir)?;
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_at("removing", &staging))?;
    }
    let restored = build(from, &staging, &manifest, &mut progress);
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        return restored;
    }
    // The target is an empty directory (or absent): rename(2) replaces it.
    std::fs::rename(&staging, data_dir).map_err(io_at("renaming into place", data_dir))?;
    if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    restored
}

/// `.<name>.restoring` beside `data_dir`.
fn staging_path(data_dir: &Path) -> Result<PathBuf, BackupError> {
    let name = data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BackupError::Manifest(format!("{} has no file name", data_dir.display())))?;
    Ok(data_dir.with_file_name(format!(".{name}.restoring")))
}

fn build(
    from: &Path,
    staging: &Path,
    manifest: &Manifest,
    progress: &mut impl FnMut(u64, u64),
) -> Result<Restored, BackupError> {
    for sub in ["wal", "snapshots"] {
        let dir = staging.join(sub);
        std::fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
    }
    let total: u64 = manifest.files.iter().map(|f| f.len).sum();
    let mut done = 0u64;
    let mut reported = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for file in &manifest.files {
        let source = from.join(&file.name);
        let target = staging.join(&file.name);
        let mut input = std::fs::File::open(&source).map_err(io_at("opening", &source))?;
        let mut output = std::fs::File::create(&target).map_err(io_at("creating", &target))?;
        let mut hasher = Sha256::new();
        let mut copied = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io_at("reading", &source))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            output
                .write_all(&buf[..n])
                .map_err(io_at("writing", &target))?;
            copied += n as u64;
            done += n as u64;
            if done - reported >= PROGRESS_EVERY_BYTES {
                reported = done;
                progress(done, total);
            }
        }
        if copied != file.len {
            return Err(BackupError::Length {
                file: file.name.clone(),
                expected: file.len,
                found: copied,
            });
        }
        let found = hex(&hasher.finalize());
        let expected = file.sha256.clone().expect("checked by read_manifest");
        if found != expected {
            return Err(BackupError::Checksum {
                file: file.name.clone(),
                expected,
                found,
            });
        }
        if file.restored_len > file.len {
            // Zeros past the backup's LSN, as the preallocated segment had.
            output
                .set_len(file.restored_len)
                .map_err(io_at("extending", &target))?;
        }
        output.sync_all().map_err(io_at("syncing", &target))?;
    }
    progress(done, total);
    for sub in ["wal", "snapshots"] {
        sync_dir(&staging.join(sub))?;
    }
    sync_dir(staging)?;
    finish(Arc::new(OsFs), staging, manifest, LocalConfig::default())?;
    Ok(Restored {
        lsn: manifest.lsn,
        documents: manifest.docs.len(),
        files: manifest.files.len(),
        bytes: total,
    })
}

/// The last steps of a restore, once the backup's files are in `dir` (each checked
/// against the manifest's length and SHA-256, the cut segment given its zeros back):
/// every snapshot is decoded and must match its name; the client ids are moved
/// [`super::RESTORE_CLIENT_ID_GAP`] past the backup's mark (ids the original server
/// gave after the backup, to clients that may connect to the restored one, are never
/// given again); and the directory must recover (every record's checksum) to exactly
/// the manifest's LSN and versions, opened with `config` but for its segment size (that
/// of the backup's segments). Public so that the simulator restores its backups with
/// the same checks, on its simulated disk (and with the log's writer run by its caller).
pub fn finish(
    vfs: Arc<dyn Vfs>,
    dir: &Path,
    manifest: &Manifest,
    config: LocalConfig,
) -> Result<(), BackupError> {
    for file in &manifest.files {
        if let Some(name) = file.name.strip_prefix("snapshots/") {
            check_snapshot(&*vfs, &dir.join(&file.name), name, &file.name)?;
        }
    }
    let ids = ClientIds::open(vfs.clone(), dir).map_err(io_at("reading the client ids in", dir))?;
    ids.skip(super::RESTORE_CLIENT_ID_GAP)
        .map_err(io_at("writing the client ids in", dir))?;
    check_recovers(vfs, dir, manifest, config)
}

fn check_snapshot(vfs: &dyn Vfs, path: &Path, name: &str, file: &str) -> Result<(), BackupError> {
    let bytes = vfs.map(path).map_err(io_at("reading", path))?;
    let invalid = |reason: String| BackupError::Snapshot {
        file: file.to_owned(),
        reason,
    };
    let snapshot = Snapshot::decode(&bytes).map_err(|e| invalid(e.0))?;
    match parse_snapshot_file_name(name) {
        Some((doc, seq)) if doc == snapshot.doc_id && seq == snapshot.last_included_seq => Ok(()),
        _ => Err(invalid("its contents do not match its file name".into())),
    }
}

/// Opens `dir` as the server would and checks it against `manifest`.
fn check_recovers(
    vfs: Arc<dyn Vfs>,
    dir: &Path,
    manifest: &Manifest,
    config: LocalConfig,
) -> Result<(), BackupError> {
    let segment_size = manifest
        .files
        .iter()
        .filter(|f| f.name.starts_with("wal/"))
        .map(|f| f.restored_len)
        .max()
        .unwrap_or(config.wal.segment_size);
    let config = LocalConfig {
        wal: WalConfig {
            segment_size,
            ..config.wal
        },
        ..config
    };
    let (store, report) =
        LocalSequencer::open_with(vfs, dir, config).map_err(BackupError::Recovery)?;
    let checked = (|| {
        if let Some(cut) = &report.tail_cut {
            return Err(BackupError::LogEnd(format!(
                "recovery had to cut the restored log ({cut}): the backup's last segment is damaged"
            )));
        }
        let durable = store.wal().durability().durable_lsn;
        if durable != manifest.lsn {
            return Err(BackupError::LogEnd(format!(
                "the restored log ends at LSN {durable}, the manifest says {}",
                manifest.lsn
            )));
        }
        for doc in &manifest.docs {
            let found = store.version(&doc.id);
            if found != doc.version {
                return Err(BackupError::Version {
                    doc: doc.id.clone(),
                    expected: doc.version,
                    found,
                });
            }
        }
        let listed: std::collections::HashSet<&str> =
            manifest.docs.iter().map(|d| d.id.as_str()).collect();
        for id in store.doc_ids() {
            let found = store.version(&id);
            if found > 0 && !listed.contains(&*id) {
                return Err(BackupError::Version {
                    doc: id.to_string(),
                    expected: 0,
                    found,
                });
            }
        }
        Ok(())
    })();
    store.close();
    checked
}
