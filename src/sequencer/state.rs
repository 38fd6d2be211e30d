//! What the local sequencer and its maintenance thread share: the settings, each
//! document's authoritative state, and the handle to the log. Both modules use this one;
//! neither imports the other's internals (the maintenance thread is started by the
//! sequencer, which is all `local` needs of `maintenance`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::dedupe::{Dedupe, Seen};
use super::{SubmitError, Submitted, Ticket};
use crate::op::{AsPatch, OpId, MAX_DOC_BYTES, MAX_DOC_CHARS};
use crate::text::{ApplyError, Text};
use crate::wal::record::{Lsn, OpRecord};
use crate::wal::snapshot::DedupeEntry;
use crate::wal::vfs::Vfs;
use crate::wal::{now_ms, Wal, WalConfig, WalError};

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub wal: WalConfig,
    /// Snapshot a document after this many ops since its last snapshot.
    pub snapshot_every_ops: u64,
    /// ...or this long after its last snapshot, if it changed.
    pub snapshot_every: Duration,
    /// Sealed segments younger than this are kept even when snapshots cover them, so
    /// that reconnecting clients can still be sent the ops they missed.
    pub retention: Duration,
    /// How often the maintenance thread looks at snapshots and truncation. Unused with
    /// `Background::Manual`: each `LocalSequencer::run_maintenance` is one look.
    pub maintenance_interval: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            wal: WalConfig::default(),
            snapshot_every_ops: 10_000,
            snapshot_every: Duration::from_secs(60),
            retention: Duration::from_secs(300),
            maintenance_interval: Duration::from_secs(1),
        }
    }
}

/// A document's text: built, or (after a restart) what building it takes.
///
/// Startup recovery does not build texts: it checks that each op of the log applies
/// by lengths alone ([`Deferred::check`]) and leaves the text [`DocText::Deferred`]:
/// the snapshot's text and its seq. The text is built the first time it is needed
/// ([`DocState::text`]) by applying the ops after the snapshot, read back from the
/// log through its index. Those ops stay in the log until then: truncation removes a
/// segment only once every document with ops in it has a snapshot at or past its
/// highest seq there, and a deferred document's newest snapshot is its base (a
/// snapshot of a deferred document builds its text for the snapshot alone, then makes
/// the snapshot's text the new base, under the lock that truncation's check takes).
#[derive(Debug)]
pub(crate) enum DocText {
    Built(Text),
    Deferred(Deferred),
}

/// A text not built yet: `base` (the snapshot's text at `base_seq`, or empty at 0) and
/// the ops `base_seq + 1..=version` in the log, of which only lengths were checked.
#[derive(Debug)]
pub(crate) struct Deferred {
    pub base: String,
    pub base_seq: u64,
    /// The text's length in code points after the ops checked so far.
    pub len_chars: u64,
    /// An upper bound of its length in bytes (an inserted string adds its bytes, a
    /// deleted code point takes at least one, a code point is at most four).
    pub bytes_max: u64,
    /// An op checked might make the text longer than [`MAX_DOC_BYTES`]: only building
    /// the text tells (startup builds such a text before it accepts the log).
    pub unsure_bytes: bool,
}

impl Deferred {
    pub fn new(base: String, base_seq: u64) -> Self {
        Deferred {
            len_chars: base.chars().count() as u64,
            bytes_max: base.len() as u64,
            base,
            base_seq,
            unsure_bytes: false,
        }
    }

    /// What [`Text::check`] says of `patches`, from the lengths alone, then their
    /// effect on the lengths. A byte count that may be over the limit is not an error
    /// here: it sets `unsure_bytes`.
    ///
    /// `ascii`: every inserted text is known to be ASCII ([`crate::wal::record::OpView::ascii`]), so that
    /// its code points need no counting (a pass over bytes long out of the cache).
    pub fn check<P: AsPatch>(&mut self, patches: &[P], ascii: bool) -> Result<(), ApplyError> {
        let (mut len, mut bytes) = (self.len_chars, self.bytes_max);
        for (i, p) in patches.iter().enumerate() {
            let p = p.as_patch();
            if u64::from(p.pos) + u64::from(p.del) > len {
                return Err(ApplyError::OutOfRange {
                    patch: i,
                    pos: p.pos,
                    del: p.del,
                    len: len as u32,
                });
            }
            let chars = if ascii {
                p.ins.len() as u64
            } else {
                p.ins.chars().count() as u64
            };
            len = len - u64::from(p.del) + chars;
            if len > u64::from(MAX_DOC_CHARS) {
                return Err(ApplyError::TooLong { len });
            }
            bytes = (bytes - u64::from(p.del) + p.ins.len() as u64).min(4 * len);
        }
        (self.len_chars, self.bytes_max) = (len, bytes);
        self.unsure_bytes |= bytes > MAX_DOC_BYTES;
        Ok(())
    }

    /// The text after the ops `base_seq + 1..=version` of `doc_id`, which `read` gives
    /// (`read(after, limit)`: up to `limit` ops after seq `after`, in seq order, as
    /// [`Wal::read_ops_after`]). Blocking: it reads the log. An op missing from the log,
    /// or one that does not apply, is an error (never a text without it).
    pub fn build(
        &self,
        doc_id: &str,
        version: u64,
        mut read: impl FnMut(u64, usize) -> Result<Vec<OpRecord>, WalError>,
    ) -> Result<Text, String> {
        /// Ops read per call: bounded memory for a long history.
        const BATCH: u64 = 4096;
        let mut text = Text::from(self.base.as_str());
        let mut at = self.base_seq;
        while at < version {
            let limit = (version - at).min(BATCH) as usize;
            let ops = read(at, limit).map_err(|e| {
                format!("building the text of document {doc_id:?} from the log: {e}")
            })?;
            if ops.is_empty() {
                return Err(format!(
                    "building the text of document {doc_id:?}: ops {}..={version} are not \
                     in the log (its snapshot is at seq {})",
                    at + 1,
                    self.base_seq
                ));
            }
            for op in ops {
                if op.server_seq != at + 1 {
                    return Err(format!(
                        "building the text of document {doc_id:?}: the log has seq {} where \
                         {} was expected (its snapshot is at seq {})",
                        op.server_seq,
                        at + 1,
                        self.base_seq
                    ));
                }
                text.apply(&op.patches).map_err(|e| {
                    format!(
                        "building the text of document {doc_id:?}: op at seq {} does not \
                         apply: {e}",
                        op.server_seq
                    )
                })?;
                at += 1;
                if at == version {
                    break;
                }
            }
        }
        Ok(text)
    }
}

/// One document's authoritative state.
#[derive(Debug)]
pub(crate) struct DocState {
    /// Use [`DocState::text`], which builds a deferred text first.
    pub text: DocText,
    pub version: u64,
    /// Which op ids were applied (each client's recent ops).
    pub dedupe: Dedupe,
    /// LSN of the newest op (0: nothing appended since startup; all durable).
    pub last_lsn: Lsn,
    /// `last_included_seq` of the newest durable snapshot (0: none).
    pub snapshot_seq: u64,
    pub last_snapshot_ms: u64,
    pub snapshot_queued: bool,
    /// The document was deleted (its tombstone appended) while this state was held:
    /// nothing more is applied to it or snapshotted from it.
    pub deleted: bool,
    /// Startup only: the first op of the log that did not follow this state, and why.
    /// Forgiven by a later tombstone of the document, else it refuses the start.
    pub replay_error: Option<(Lsn, String)>,
    /// Startup only: the log holds a tombstone of the document (its snapshot files are
    /// removed once the start is sure).
    pub tombstoned: bool,
}

impl DocState {
    /// The text's length in code points, built or not.
    pub fn len_chars(&self) -> u64 {
        match &self.text {
            DocText::Built(text) => u64::from(text.len_chars()),
            DocText::Deferred(deferred) => deferred.len_chars,
        }
    }

    pub(crate) fn empty() -> Self {
        DocState {
            text: DocText::Built(Text::new()),
            version: 0,
            dedupe: Dedupe::default(),
            last_lsn: 0,
            snapshot_seq: 0,
            last_snapshot_ms: now_ms(),
            snapshot_queued: false,
            deleted: false,
            replay_error: None,
            tombstoned: false,
        }
    }

    /// A document found at startup: its snapshot's text (`base`) at `base_seq` (0 and
    /// empty without a snapshot), the ops after it to be checked by lengths alone.
    pub(crate) fn deferred(base: String, base_seq: u64) -> Self {
        DocState {
            text: DocText::Deferred(Deferred::new(base, base_seq)),
            version: base_seq,
            snapshot_seq: base_seq,
            ..DocState::empty()
        }
    }

    /// The document's text, built first if it is deferred: a blocking read of the
    /// log (the ops after the snapshot), under the document's lock. An error if the
    /// log fails or no longer has those ops; the text stays deferred then.
    pub(crate) fn text(&mut self, doc_id: &str, wal: &Wal) -> Result<&mut Text, String> {
        if let DocText::Deferred(deferred) = &self.text {
            let text = deferred.build(doc_id, self.version, |after, limit| {
                wal.read_ops_after(doc_id, after, limit)
            })?;
            self.text = DocText::Built(text);
        }
        match &mut self.text {
            DocText::Built(text) => Ok(text),
            DocText::Deferred(_) => unreachable!("built above"),
        }
    }

    /// The answer to an op id already used: the original's seq for a true resend (and
    /// the ticket of the document's newest op: the original is durable once that is),
    /// or a refusal for a different op under a used id. `None`: a new op.
    pub(crate) fn duplicate(
        &self,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>> {
        match self.dedupe.seen(op_id, fingerprint) {
            Seen::New => None,
            Seen::Resend { seq } => Some(Ok(Submitted::Duplicate {
                seq,
                ticket: Ticket(self.last_lsn),
            })),
            Seen::Reused { newest } => Some(Err(SubmitError::OpIdReused(format!(
                "op id {op_id} was used before for another op (this client's newest op here \
                 is local seq {newest}); a new op needs a local seq above it"
            )))),
        }
    }

    /// The dedupe table as a snapshot keeps it, fingerprints included.
    pub fn dedupe_entries(&self) -> Vec<DedupeEntry> {
        self.dedupe
            .remembered()
            .into_iter()
            .filter_map(|(client_id, mut ops)| {
                let last = ops.pop()?;
                Some(DedupeEntry {
                    client_id,
                    last_local_seq: last.local_seq,
                    seq: last.seq,
                    fingerprint: last.fingerprint,
                    older: ops,
                })
            })
            .collect()
    }
}

pub(crate) type DocRef = Arc<Mutex<DocState>>;

pub(crate) fn lock_doc(doc: &DocRef) -> MutexGuard<'_, DocState> {
    doc.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Shared {
    pub vfs: Arc<dyn Vfs>,
    pub snapshot_dir: PathBuf,
    pub wal: Wal,
    pub docs: RwLock<HashMap<Arc<str>, DocRef>>,
    pub config: LocalConfig,
    pub snapshot_us: Mutex<hdrhistogram::Histogram<u64>>,
    pub snapshots_written: std::sync::atomic::AtomicU64,
    pub client_ids: super::client_ids::ClientIds,
    /// Backups in progress, by pin id: truncation deletes no segment at or past the
    /// lowest `first_segment` of a pin whose lease has not expired. Truncation holds
    /// this lock from its decision to its last deletion, so a pin taken meanwhile sees
    /// every segment it pins still there.
    pub backup_pins: Mutex<BTreeMap<u64, BackupPin>>,
    pub next_pin: std::sync::atomic::AtomicU64,
    /// Documents deleted whose snapshot files may still be there: each one's tombstone
    /// LSN and the version it was deleted at. Truncation keeps the segment holding the
    /// tombstone (and every later one) while its document is here, and the id cannot
    /// be used again until it leaves (see `LocalSequencer::finish_delete`).
    pub deleting: Mutex<HashMap<Arc<str>, (Lsn, u64)>>,
    /// Deletions begun since startup: a backup's capture that saw one begin (or one
    /// unfinished) is refused, as the versions it lists could not be told.
    pub deletions: std::sync::atomic::AtomicU64,
    /// Held by whoever writes or removes snapshot files of a document, from the state
    /// it copies to the last file: a snapshot started before a deletion is written
    /// before the deletion removes the document's files, never after.
    pub snapshot_files: Mutex<()>,
}

/// A backup's hold on the log (see [`Shared::backup_pins`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BackupPin {
    /// The oldest segment when the backup began: it and every later one are kept.
    pub first_segment: crate::wal::segment::SegmentId,
    /// The pin counts until then; each request of the backup renews it, so a backup
    /// whose client went away stops holding the log back within one lease.
    pub expires: Instant,
}
