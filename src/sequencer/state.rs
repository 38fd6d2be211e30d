//! What the local sequencer and its maintenance thread share: the settings, each
//! document's authoritative state, and the handle to the log. Both modules use this one;
//! neither imports the other's internals (the maintenance thread is started by the
//! sequencer, which is all `local` needs of `maintenance`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use super::dedupe::{Dedupe, Seen};
use super::{SubmitError, Submitted, Ticket};
use crate::op::OpId;
use crate::text::Text;
use crate::wal::record::Lsn;
use crate::wal::snapshot::DedupeEntry;
use crate::wal::vfs::Vfs;
use crate::wal::{now_ms, Wal, WalConfig};

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

/// One document's authoritative state.
#[derive(Debug)]
pub(crate) struct DocState {
    pub text: Text,
    pub version: u64,
    /// Which op ids were applied (each client's recent ops).
    pub dedupe: Dedupe,
    /// LSN of the newest op (0: nothing appended since startup; all durable).
    pub last_lsn: Lsn,
    /// `last_included_seq` of the newest durable snapshot (0: none).
    pub snapshot_seq: u64,
    pub last_snapshot_ms: u64,
    pub snapshot_queued: bool,
}

impl DocState {
    pub(crate) fn empty() -> Self {
        DocState {
            text: Text::new(),
            version: 0,
            dedupe: Dedupe::default(),
            last_lsn: 0,
            snapshot_seq: 0,
            last_snapshot_ms: now_ms(),
            snapshot_queued: false,
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
}
