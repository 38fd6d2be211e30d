//! Capturing a consistent backup of the local sequencer's data directory while it
//! serves (see `crate::backup` for the whole design).
//!
//! Order matters: (1) pin the log from its oldest segment, so that truncation deletes
//! nothing from then on; (2) hard-link every snapshot file into the staging directory
//! (a snapshot renamed over or deleted afterwards stays readable as it was); (3) only
//! then read the durable LSN `L`: a snapshot is written after its ops are durable, so
//! every snapshot captured is at or before `L`. Each document's ops after its newest
//! snapshot at pin time were in the log then (truncation waits for a snapshot covering
//! them) and are still there; the snapshots captured are that one or newer. So the
//! snapshots plus the log from the pinned segment to `L` give every document as of `L`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::state::{BackupPin, Shared};
use crate::backup::{io_at, BackupError, Capture, CapturedFile, DocVersion, CLIENT_IDS_FILE};
use crate::wal::now_ms;
use crate::wal::record::{decode_frame, RECORD_HEADER_LEN};
use crate::wal::segment::{segment_file_name, segment_path};
use crate::wal::snapshot::parse_snapshot_file_name;
use crate::wal::vfs::Vfs;

/// Rounds of listing `snapshots/` before the capture gives up: each round links what
/// the previous one had not seen; one that finds nothing new ends it.
const CAPTURE_ROUNDS_MAX: usize = 64;

/// Backups pinning the log at once.
pub(crate) const PINS_MAX: usize = 8;

pub(crate) fn begin(
    shared: &Shared,
    staging: &Path,
    lease: Duration,
) -> Result<Capture, BackupError> {
    let pin = {
        let mut pins = shared.backup_pins.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        pins.retain(|_, pin| pin.expires > now);
        if pins.len() >= PINS_MAX {
            return Err(BackupError::Busy);
        }
        let first_segment = shared.wal.with_index(|index| {
            index
                .segments()
                .keys()
                .next()
                .copied()
                .unwrap_or_else(|| shared.wal.active_segment())
        });
        let id = shared.next_pin.fetch_add(1, Ordering::Relaxed);
        pins.insert(
            id,
            BackupPin {
                first_segment,
                expires: now + lease,
            },
        );
        (id, first_segment)
    };
    let captured = capture(shared, pin, staging);
    if captured.is_err() {
        end(shared, pin.0);
    }
    captured
}

pub(crate) fn renew(shared: &Shared, pin: u64, lease: Duration) -> bool {
    let mut pins = shared.backup_pins.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    match pins.get_mut(&pin) {
        Some(held) if held.expires > now => {
            held.expires = now + lease;
            true
        }
        _ => false,
    }
}

pub(crate) fn end(shared: &Shared, pin: u64) {
    shared
        .backup_pins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pin);
}

fn capture(
    shared: &Shared,
    (pin, first_segment): (u64, u64),
    staging: &Path,
) -> Result<Capture, BackupError> {
    // A deletion under way (or begun during the capture) makes the listed versions
    // unknowable: its snapshot may be linked while the index has forgotten its ops.
    // Refused; it takes milliseconds, so the backup can be started again at once (unless
    // the log failed under it: the restart settles it).
    let deletions = shared.deletions.load(std::sync::atomic::Ordering::SeqCst);
    let deleting = || {
        !shared
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
            || shared.deletions.load(std::sync::atomic::Ordering::SeqCst) != deletions
    };
    let refused = || BackupError::DeletionUnderWay {
        log_failed: shared.wal.failure().map(|f| f.to_string()),
    };
    if deleting() {
        return Err(refused());
    }
    let vfs = &*shared.vfs;
    let staged = staging.join("snapshots");
    create_staging_dirs(vfs, &staged)?;
    let snapshots = link_snapshots(vfs, &shared.snapshot_dir, &staged)?;
    // After the snapshots: every one of them is at or before it.
    let lsn = shared.wal.durability().durable_lsn;
    let created_ms = now_ms();
    // After the LSN: the mark covers every client with an op at or before it (an id is
    // reserved on disk before it is given, and given before its client's first op).
    let client_ids = link_client_ids(vfs, &shared.snapshot_dir, staging)?;

    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut files = Vec::new();
    for (name, len) in &snapshots {
        let (doc, seq) = parse_snapshot_file_name(name).expect("only snapshot names are linked");
        let version = versions.entry(doc).or_default();
        *version = (*version).max(seq);
        files.push(CapturedFile {
            name: format!("snapshots/{name}"),
            path: staged.join(name),
            len: *len,
            restored_len: *len,
        });
    }
    // Each document's version at `lsn`, and where the record of `lsn` is.
    let (segments, last) = shared.wal.with_index(|index| {
        let mut last = None;
        for doc in index.doc_ids() {
            if let Some((seq, location)) = index.last_op_at_or_before(doc, lsn) {
                let version = versions.entry(doc.to_string()).or_default();
                *version = (*version).max(seq);
                if last.is_none_or(|l: crate::wal::index::Location| l.lsn < location.lsn) {
                    last = Some(location);
                }
            }
        }
        // The record of `lsn` may be a tombstone rather than an op.
        if let Some(tombstone) = index.tombstone_at(lsn) {
            last = Some(tombstone);
        }
        let segments: Vec<u64> = index
            .segments()
            .range(first_segment..)
            .filter(|(_, meta)| meta.first_lsn <= lsn && meta.last_lsn.is_some())
            .map(|(&id, _)| id)
            .collect();
        (segments, last)
    });
    if lsn > 0 {
        let last = last.filter(|l| l.lsn == lsn).ok_or_else(|| {
            BackupError::Inconsistent(format!("the log's index has no record at LSN {lsn}"))
        })?;
        if segments.last() != Some(&last.segment_id) {
            return Err(BackupError::Inconsistent(format!(
                "LSN {lsn} is in segment {} but the segments held are {segments:?}",
                last.segment_id
            )));
        }
        for &id in &segments {
            let path = segment_path(shared.wal.dir(), id);
            let file = shared.vfs.open(&path).map_err(io_at("opening", &path))?;
            let file_len = file.file_len().map_err(io_at("reading", &path))?;
            let len = if id == last.segment_id {
                record_end(&*file, &path, last.offset, lsn)?
            } else {
                file_len
            };
            files.push(CapturedFile {
                name: format!("wal/{}", segment_file_name(id)),
                path,
                len,
                restored_len: file_len,
            });
        }
    }
    files.extend(client_ids);
    if deleting() {
        return Err(refused());
    }
    let docs = versions
        .into_iter()
        .filter(|&(_, version)| version > 0)
        .map(|(id, version)| DocVersion { id, version })
        .collect();
    Ok(Capture {
        pin,
        lsn,
        created_ms,
        files,
        docs,
    })
}

/// The offset just past the record of `lsn` at `offset` (durable, so complete): read
/// back and checked.
fn record_end(
    file: &dyn crate::wal::vfs::VfsFile,
    path: &Path,
    offset: u64,
    lsn: u64,
) -> Result<u64, BackupError> {
    let mut header = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut header, offset)
        .map_err(io_at("reading", path))?;
    let payload_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let framed = crate::wal::record::framed_len(payload_len as usize);
    let mut record = vec![0u8; framed];
    file.read_exact_at(&mut record, offset)
        .map_err(io_at("reading", path))?;
    match decode_frame(&record) {
        Ok(raw) if raw.lsn == lsn => Ok(offset + framed as u64),
        Ok(raw) => Err(BackupError::Inconsistent(format!(
            "{} offset {offset}: LSN {} where the index says {lsn}",
            path.display(),
            raw.lsn
        ))),
        Err(e) => Err(BackupError::Inconsistent(format!(
            "{} offset {offset}: the record of LSN {lsn} does not decode: {e}",
            path.display()
        ))),
    }
}

/// Hard-links the data directory's `client-ids` (beside `snapshot_dir`) into `staging`,
/// if there is one (none: no id given yet).
fn link_client_ids(
    vfs: &dyn Vfs,
    snapshot_dir: &Path,
    staging: &Path,
) -> Result<Option<CapturedFile>, BackupError> {
    let Some(data_dir) = snapshot_dir.parent() else {
        return Ok(None);
    };
    let to = staging.join(CLIENT_IDS_FILE);
    match vfs.hard_link(&data_dir.join(CLIENT_IDS_FILE), &to) {
        Ok(()) => {
            let len = file_len(vfs, &to)?;
            Ok(Some(CapturedFile {
                name: CLIENT_IDS_FILE.into(),
                path: to,
                len,
                restored_len: len,
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at("linking", &to)(e)),
    }
}

fn file_len(vfs: &dyn Vfs, path: &Path) -> Result<u64, BackupError> {
    vfs.open(path)
        .and_then(|file| file.file_len())
        .map_err(io_at("reading", path))
}

/// Creates `staged` (the staging directory's `snapshots/`) and whichever of its
/// ancestors are missing, syncing none: a staging directory is of no use after a crash
/// (the next backup removes what is left of it).
fn create_staging_dirs(vfs: &dyn Vfs, staged: &Path) -> Result<(), BackupError> {
    let missing: Vec<&Path> = staged
        .ancestors()
        .take_while(|dir| !dir.as_os_str().is_empty() && dir.parent().is_some())
        .collect();
    for dir in missing.into_iter().rev() {
        vfs.create_dir(dir).map_err(io_at("creating", dir))?;
    }
    Ok(())
}

/// Hard-links every snapshot file of `dir` into `staged`, until a listing shows none
/// not linked yet and none vanished before it could be linked (a vanished one was
/// replaced by newer ones, which the next listing shows). Returns names and lengths.
fn link_snapshots(
    vfs: &dyn Vfs,
    dir: &Path,
    staged: &Path,
) -> Result<BTreeMap<String, u64>, BackupError> {
    let mut linked = BTreeMap::new();
    for _ in 0..CAPTURE_ROUNDS_MAX {
        let mut changed = false;
        for name in vfs.list(dir).map_err(io_at("reading", dir))? {
            if parse_snapshot_file_name(&name).is_none() || linked.contains_key(&name) {
                continue;
            }
            let to = staged.join(&name);
            match vfs.hard_link(&dir.join(&name), &to) {
                Ok(()) => {
                    let len = file_len(vfs, &to)?;
                    linked.insert(name, len);
                    changed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => changed = true,
                Err(e) => return Err(io_at("linking", &to)(e)),
            }
        }
        if !changed {
            return Ok(linked);
        }
    }
    Err(BackupError::Inconsistent(format!(
        "the snapshots in {} kept changing through {CAPTURE_ROUNDS_MAX} listings",
        dir.display()
    )))
}
