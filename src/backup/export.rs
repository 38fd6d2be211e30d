//! `quire export`: one document's text out of a data directory that no server is using
//! (the log's lock says so), at its newest version or at an older one whose ops the log
//! still holds. Reads only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::text::Text;
use crate::wal::record::OpRecord;
use crate::wal::snapshot::{parse_snapshot_file_name, Snapshot};
use crate::wal::vfs::{OsFs, Vfs};
use crate::wal::{SegmentRecord, Wal, WalConfig, WalError};

/// A document's text at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub text: String,
    pub version: u64,
}

#[derive(Debug)]
pub enum ExportError {
    /// No `wal/` in the directory given.
    NotADataDir(PathBuf),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The log cannot be read: in use by a server, or corrupt (the message says).
    Wal(WalError),
    UnknownDocument(String),
    /// The version asked for is past the document's newest.
    PastHead {
        doc: String,
        at: u64,
        head: u64,
    },
    /// The ops up to the version asked for were truncated away; `oldest` is the oldest
    /// version still available.
    NotRetained {
        doc: String,
        at: u64,
        oldest: u64,
    },
    /// The log does not hold the document's ops in order, or one does not apply.
    Inconsistent(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::NotADataDir(dir) => {
                write!(
                    f,
                    "{} is not a quire data directory (no wal/ in it)",
                    dir.display()
                )
            }
            ExportError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            ExportError::Wal(e) => write!(f, "{e}"),
            ExportError::UnknownDocument(doc) => {
                write!(f, "no document {doc:?} in the data directory")
            }
            ExportError::PastHead { doc, at, head } => write!(
                f,
                "document {doc:?} is at version {head}; there is no version {at}"
            ),
            ExportError::NotRetained { doc, at, oldest } => write!(
                f,
                "version {at} of document {doc:?} is no longer retained (its ops were truncated); \
                 the oldest version available is {oldest}"
            ),
            ExportError::Inconsistent(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ExportError {}

/// `doc_id`'s text in the data directory `data_dir` at version `at` (its newest if
/// `None`). The directory must not be in use (the log's lock is taken while it is read).
pub fn export(data_dir: &Path, doc_id: &str, at: Option<u64>) -> Result<Exported, ExportError> {
    export_with(Arc::new(OsFs), data_dir, doc_id, at)
}

/// [`export`] through any file layer (the simulator exports from its restored backups).
pub fn export_with(
    vfs: Arc<dyn Vfs>,
    data_dir: &Path,
    doc_id: &str,
    at: Option<u64>,
) -> Result<Exported, ExportError> {
    let wal_dir = data_dir.join("wal");
    match vfs.list(&wal_dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ExportError::NotADataDir(data_dir.to_path_buf()));
        }
        Err(error) => {
            return Err(ExportError::Io {
                path: wal_dir,
                error,
            })
        }
    }
    let mut snapshots = valid_snapshots(&*vfs, &data_dir.join("snapshots"), doc_id)?;
    // Ops of the document, in seq order (the log holds them so), up to `at`; only those
    // after its last tombstone, if the log holds one (the ones before, and its
    // snapshots, belong to a deleted incarnation).
    let mut ops: Vec<OpRecord> = Vec::new();
    let mut head_in_log = 0u64;
    let mut tombstoned = false;
    let scanned = Wal::scan_segments(vfs, &wal_dir, WalConfig::default(), |segment| {
        for op in segment.ops {
            if &**segment.slot(op.ordinal).id != doc_id {
                continue;
            }
            match &op.record {
                SegmentRecord::Tombstone { .. } => {
                    tombstoned = true;
                    ops.clear();
                    head_in_log = 0;
                }
                SegmentRecord::Op(view) => {
                    head_in_log = head_in_log.max(view.server_seq);
                    if at.is_none_or(|at| view.server_seq <= at) {
                        ops.push(view.to_record());
                    }
                }
            }
        }
    })
    .map_err(ExportError::Wal)?;
    drop(scanned); // releases the lock; nothing was written
    if tombstoned {
        snapshots.clear();
    }
    let head = head_in_log.max(snapshots.last().map_or(0, |s| s.last_included_seq));
    if head == 0 {
        return Err(ExportError::UnknownDocument(doc_id.to_owned()));
    }
    let at = at.unwrap_or(head);
    if at > head {
        return Err(ExportError::PastHead {
            doc: doc_id.to_owned(),
            at,
            head,
        });
    }
    // The newest base at or before `at` from which the log's ops reach it: a snapshot,
    // or the empty text at 0.
    let first_in_log = ops.first().map(|op| op.server_seq);
    let reaches = |base: u64| base == at || first_in_log.is_some_and(|first| first <= base + 1);
    let base = snapshots
        .iter()
        .rev()
        .filter(|s| s.last_included_seq <= at)
        .map(|s| (s.last_included_seq, Some(s)))
        .chain(std::iter::once((0, None)))
        .find(|&(seq, _)| reaches(seq));
    let Some((base_seq, base)) = base else {
        let oldest = snapshots
            .iter()
            .map(|s| s.last_included_seq)
            .chain(first_in_log.filter(|&f| f == 1).map(|_| 0))
            .min()
            .unwrap_or(head);
        return Err(ExportError::NotRetained {
            doc: doc_id.to_owned(),
            at,
            oldest,
        });
    };
    let mut text = Text::from(base.map_or("", |s| s.text.as_str()));
    let mut version = base_seq;
    for op in ops.iter().filter(|op| op.server_seq > base_seq) {
        if op.server_seq != version + 1 {
            return Err(ExportError::Inconsistent(format!(
                "document {doc_id:?}: the log has seq {} where {} was expected",
                op.server_seq,
                version + 1
            )));
        }
        text.apply(&op.patches).map_err(|e| {
            ExportError::Inconsistent(format!(
                "document {doc_id:?}: op at seq {} does not apply: {e}",
                op.server_seq
            ))
        })?;
        version = op.server_seq;
    }
    if version != at {
        return Err(ExportError::Inconsistent(format!(
            "document {doc_id:?}: the log ends at seq {version}, short of {at}"
        )));
    }
    Ok(Exported {
        text: text.to_string(),
        version,
    })
}

/// The document's snapshots that pass their checksum, oldest first.
fn valid_snapshots(vfs: &dyn Vfs, dir: &Path, doc_id: &str) -> Result<Vec<Snapshot>, ExportError> {
    let names = match vfs.list(dir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(ExportError::Io {
                path: dir.to_path_buf(),
                error,
            })
        }
    };
    let mut found = Vec::new();
    for name in names {
        let Some((doc, seq)) = parse_snapshot_file_name(&name) else {
            continue;
        };
        if doc != doc_id {
            continue;
        }
        let path = dir.join(&name);
        let bytes = vfs.map(&path).map_err(|error| ExportError::Io {
            path: path.clone(),
            error,
        })?;
        match Snapshot::decode(&bytes) {
            Ok(s) if s.doc_id == doc && s.last_included_seq == seq => found.push(s),
            _ => tracing::warn!(file = %path.display(), "skipping an invalid snapshot"),
        }
    }
    found.sort_by_key(|s| s.last_included_seq);
    Ok(found)
}
