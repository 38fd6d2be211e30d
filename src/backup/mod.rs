//! Online backup and restore of a data directory, and what they exchange.
//!
//! A backup is taken from a running server through its admin endpoint
//! (`crate::admin`: `POST /backup`, `GET /backup/{id}/file/{name}`,
//! `DELETE /backup/{id}`): the server pins its log (truncation deletes nothing the
//! backup needs until it ends or its lease expires), hard-links every snapshot file
//! into a staging directory (a snapshot replaced meanwhile is read as it was), then
//! chooses the LSN `L` the backup holds: the log's durable end at that moment, so every
//! snapshot captured is at or before it. The log's segments are copied up to the end of
//! `L`'s record (sealed ones whole; the one holding `L` cut there, the rest of it zeros
//! once restored, as a preallocated segment looks), and `client-ids`, captured after
//! `L` (a restore moves its mark [`RESTORE_CLIENT_ID_GAP`] further). [`client::backup`] fetches the
//! files and writes a [`Manifest`] with each file's length and SHA-256.
//! [`restore::restore`] checks every checksum (the manifest's, then every record's and
//! snapshot's by recovering the restored directory) before it puts the directory in
//! place. [`export`] reads one document out of a data directory not in use.

pub mod client;
pub mod export;
pub mod restore;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `format` field of a manifest.
pub const MANIFEST_FORMAT: &str = "quire-backup";
/// The manifest's version; a reader refuses others.
pub const MANIFEST_VERSION: u32 = 1;
/// The manifest's file name in a backup directory (written last: a directory without
/// it is an unfinished backup).
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a backup holds: the LSN, every file with its length (and, once fetched, its
/// SHA-256), and each document's version as of that LSN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The backup holds the log up to and including this LSN, and nothing after it.
    pub lsn: u64,
    /// When the server chose `lsn`, ms since the Unix epoch.
    pub created_ms: u64,
    pub files: Vec<ManifestFile>,
    /// Every document with ops at or before `lsn`, and its version there.
    pub docs: Vec<DocVersion>,
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Its path in the data directory: `wal/<segment>.wal`, `snapshots/<name>.snap` or
    /// `client-ids`.
    pub name: String,
    /// Bytes in the backup.
    pub len: u64,
    /// The file's length once restored: the rest up to it is zeros (the part of the last
    /// segment past `lsn`). Equal to `len` for every other file.
    pub restored_len: u64,
    /// SHA-256 of the `len` bytes, lowercase hex; absent in the server's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocVersion {
    pub id: String,
    pub version: u64,
}

/// The reply to `POST /backup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// The backup's id in the routes.
    pub id: u64,
    /// The backup ends by itself after this many seconds without a request of its own.
    pub lease_secs: u64,
    pub manifest: Manifest,
}

/// A file a backup will send: its name in the manifest, where the server reads it, and
/// how many bytes of it.
#[derive(Debug, Clone)]
pub struct CapturedFile {
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
    pub restored_len: u64,
}

/// What [`BackupSource::begin_backup`] captured.
#[derive(Debug, Clone)]
pub struct Capture {
    /// The pin to renew and release.
    pub pin: u64,
    pub lsn: u64,
    pub created_ms: u64,
    pub files: Vec<CapturedFile>,
    pub docs: Vec<DocVersion>,
}

impl Capture {
    /// The manifest as the server sends it (no checksums: the client computes them from
    /// the bytes it writes).
    pub fn manifest(&self) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            lsn: self.lsn,
            created_ms: self.created_ms,
            files: self
                .files
                .iter()
                .map(|f| ManifestFile {
                    name: f.name.clone(),
                    len: f.len,
                    restored_len: f.restored_len,
                    sha256: None,
                })
                .collect(),
            docs: self.docs.clone(),
        }
    }
}

/// A storage that can be backed up while it serves.
pub trait BackupSource: Send + Sync {
    /// Pins the log for `lease`, captures the snapshot files (hard links in
    /// `staging`, which must be on the data directory's file system), and chooses the
    /// LSN. Blocking (file system work): call it off the async workers.
    fn begin_backup(&self, staging: &Path, lease: Duration) -> Result<Capture, BackupError>;
    /// Extends the pin's lease; `false` if it had expired (then the log is no longer
    /// held: the backup must start over).
    fn renew_backup(&self, pin: u64, lease: Duration) -> bool;
    /// Releases the pin.
    fn end_backup(&self, pin: u64);
}

/// Why a backup, a restore or an export failed.
#[derive(Debug)]
pub enum BackupError {
    Io {
        context: String,
        error: std::io::Error,
    },
    /// The storage cannot be backed up online.
    Unsupported,
    /// Too many backups at once.
    Busy,
    /// A document was being deleted while the backup was captured (the versions to list
    /// are not known then). It ends within milliseconds and the backup can be started
    /// again at once, unless the log failed before the deletion was durable
    /// (`log_failed`, its reason): it stays under way until the server restarts.
    DeletionUnderWay { log_failed: Option<String> },
    /// The log and the index disagree, or snapshots kept changing under the capture.
    Inconsistent(String),
    /// The admin endpoint answered with an error status.
    Http { status: u16, body: String },
    /// The admin endpoint could not be reached, or the connection broke.
    Transport(String),
    /// A manifest that cannot be used (the reason says why).
    Manifest(String),
    /// The backup's target (or the restore's data directory) exists and is not empty.
    TargetNotEmpty(PathBuf),
    /// A file's bytes do not match the manifest.
    Checksum {
        file: String,
        expected: String,
        found: String,
    },
    Length {
        file: String,
        expected: u64,
        found: u64,
    },
    /// A snapshot file of the backup fails its own checksum.
    Snapshot { file: String, reason: String },
    /// Recovering the restored directory refused it (every record's CRC is checked).
    Recovery(crate::sequencer::local::OpenError),
    /// The restored log does not end cleanly at the manifest's LSN.
    LogEnd(String),
    /// A document came back at another version than the manifest says.
    Version {
        doc: String,
        expected: u64,
        found: u64,
    },
}

impl std::fmt::Display for BackupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupError::Io { context, error } => write!(f, "{context}: {error}"),
            BackupError::Unsupported => f.write_str("this server's storage has no online backup"),
            BackupError::Busy => f.write_str("too many backups in progress; try again later"),
            BackupError::DeletionUnderWay { log_failed: None } => f.write_str(
                "a document was being deleted while the backup was captured; start it again",
            ),
            BackupError::DeletionUnderWay {
                log_failed: Some(failure),
            } => write!(
                f,
                "a document's deletion was under way when the log failed ({failure}); whether \
                 it holds is known once the server restarts: back up after the restart"
            ),
            BackupError::Inconsistent(m) | BackupError::Manifest(m) | BackupError::LogEnd(m) => {
                f.write_str(m)
            }
            BackupError::Http { status, body } => {
                write!(f, "the admin endpoint answered {status}: {}", body.trim())
            }
            BackupError::Transport(m) => write!(f, "cannot reach the admin endpoint: {m}"),
            BackupError::TargetNotEmpty(path) => {
                write!(f, "{} exists and is not empty", path.display())
            }
            BackupError::Checksum {
                file,
                expected,
                found,
            } => write!(
                f,
                "{file}: SHA-256 {found} does not match the manifest's {expected}: the backup is damaged"
            ),
            BackupError::Length {
                file,
                expected,
                found,
            } => write!(
                f,
                "{file}: {found} bytes where the manifest says {expected}: the backup is damaged"
            ),
            BackupError::Snapshot { file, reason } => {
                write!(f, "{file}: invalid snapshot: {reason}")
            }
            BackupError::Recovery(e) => write!(f, "the restored log does not recover: {e}"),
            BackupError::Version {
                doc,
                expected,
                found,
            } => write!(
                f,
                "document {doc:?} restored at version {found}, the manifest says {expected}"
            ),
        }
    }
}

impl std::error::Error for BackupError {}

/// `error` with what was done to which path.
pub(crate) fn io_at(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = format!("{what} {}", path.display());
    move |error| BackupError::Io { context, error }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The data directory's file of client ids given out (wal-format.md).
pub const CLIENT_IDS_FILE: &str = "client-ids";

/// Client ids a restored data directory skips past its backup's high-water mark: the
/// server the backup was taken from may have given more after it (2^40: more than a
/// server gives in its life; the ids from 2^63 to 2^64 hold 2^23 such skips).
pub const RESTORE_CLIENT_ID_GAP: u64 = 1 << 40;

/// Whether `name` is a file a backup may hold: `client-ids`, `wal/<segment file>` or
/// `snapshots/<snapshot file>` (so that no name reaches outside the directory).
pub fn valid_file_name(name: &str) -> bool {
    if name == CLIENT_IDS_FILE {
        return true;
    }
    match name.split_once('/') {
        Some(("wal", file)) => crate::wal::segment::parse_segment_file_name(file).is_some(),
        Some(("snapshots", file)) => crate::wal::snapshot::parse_snapshot_file_name(file).is_some(),
        _ => false,
    }
}
