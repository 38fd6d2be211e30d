//! The sequencer on the local write-ahead log: per-document state machines (text,
//! version, dedupe table) whose ops are persisted in one [`Wal`] with group commit,
//! snapshotted by policy, and recovered at startup from snapshots plus the log.
//!
//! Recovery indexes and checks; it builds no text. Each op of the log must follow its
//! document's state (seq = version + 1) and apply, which is checked by lengths alone
//! (the text's length in code points: `pos + del` within it, the limits kept); the
//! version and the dedupe table are brought up to date. A document's text stays
//! deferred (`DocText` in `state.rs`): its snapshot's text, kept from startup, and
//! the ops after it, which the log keeps (truncation waits for a snapshot covering
//! them). The first submit or read of the document builds the text from those ops,
//! read back through the log's index: blocking I/O under the document's own lock. (A
//! snapshot builds it for itself alone, then keeps the document deferred on the new
//! snapshot.) If the log fails or no longer has them, that is an error, never a
//! shorter text.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::maintenance::{self, Request};
pub use super::state::LocalConfig;
use super::state::{lock_doc, DocRef, DocState, DocText, Shared};
use super::{
    Dedupe, DeleteRefused, Deletion, DocSummary, DocView, ReadAtError, Sequencer, StorageStats,
    SubmitError, SubmitOp, Submitted, Ticket,
};
use crate::op::{validate_doc_id, OpId, SequencedOp};
use crate::sequencer::state::Deferred;
use crate::wal::record::{Lsn, OpRecord, OpRecordRef, OpView, TombstoneRecord};
use crate::wal::snapshot::{load_snapshots, remove_leftovers, remove_snapshots, LoadedSnapshots};
use crate::wal::snapshot::{parse_snapshot_file_name, snapshot_file_name, Snapshot};
use crate::wal::stats::Summary;
use crate::wal::vfs::{at_path, OsFs, Vfs};
use crate::wal::{now_ms, Background, SegmentOp, SegmentRecord, Wal, WalError};

/// What startup recovery did, for the log and for `wal-inspect`.
#[derive(Debug, Clone)]
pub struct StartupReport {
    pub documents: usize,
    pub snapshots_loaded: usize,
    pub snapshots_invalid: usize,
    pub records_scanned: u64,
    /// Ops past their document's snapshot: each checked to follow and apply (by
    /// lengths), recorded in the version and dedupe table, its text deferred.
    pub ops_replayed: u64,
    pub bytes_scanned: u64,
    pub segments: usize,
    pub tail_cut: Option<String>,
    pub elapsed: Duration,
}

pub struct LocalSequencer {
    shared: Arc<Shared>,
    maintenance: Maintenance,
}

/// Who runs the snapshot and truncation policy, and where the submit path's snapshot
/// requests go.
enum Maintenance {
    /// The maintenance thread, sent the requests.
    Thread {
        requests: mpsc::Sender<Request>,
        thread: Mutex<Option<JoinHandle<()>>>,
    },
    /// The caller, through [`LocalSequencer::run_maintenance`] (`Background::Manual`):
    /// the documents to snapshot wait here, in the order requested.
    Manual(Mutex<VecDeque<Arc<str>>>),
}

#[derive(Debug)]
pub enum OpenError {
    Wal(WalError),
    /// An I/O error on `snapshots/` or a file in it (the message names the path).
    Snapshots(std::io::Error),
    /// The snapshots and the log do not fit together.
    Inconsistent(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Wal(e) => write!(f, "{e}"),
            OpenError::Snapshots(e) => write!(f, "{e}"),
            OpenError::Inconsistent(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for OpenError {}

/// What replaying some ops did: how many were applied. (An op that could not be is
/// kept in its document's state, [`DocState::replay_error`]: a later tombstone of the
/// document forgives it.)
#[derive(Debug, Default)]
struct Replayed {
    replayed: u64,
}

impl Replayed {
    fn merge(self, other: Replayed) -> Replayed {
        Replayed {
            replayed: self.replayed + other.replayed,
        }
    }
}

/// The first op (by LSN) of the replayed documents that could not be applied, and why.
fn first_inconsistency(states: &[(Arc<str>, DocState)]) -> Option<(Lsn, String)> {
    states
        .iter()
        .filter_map(|(_, state)| state.replay_error.clone())
        .min_by_key(|(lsn, _)| *lsn)
}

/// A segment's ops below this count are replayed on the calling thread alone: a thread
/// costs more than they do.
const PARALLEL_REPLAY_MIN_OPS: usize = 4096;

/// Replays one segment's ops (`order`: indices into `ops` grouped by document, as
/// [`crate::wal::SegmentOps::by_document`]) onto `states`, indexed by ordinal. Documents
/// are independent, so with two threads or more the documents are split in two halves
/// (whole documents each side, about as many ops each) and the second half is replayed
/// on a scoped thread (an error if it cannot be started).
fn replay_segment(
    ops: &[SegmentOp<'_>],
    order: &[u32],
    states: &mut [(Arc<str>, DocState)],
    threads: usize,
) -> std::io::Result<Replayed> {
    if threads < 2 || order.len() < PARALLEL_REPLAY_MIN_OPS {
        return Ok(replay_documents(ops, order, states, 0));
    }
    let ordinal_at = |k: usize| ops[order[k] as usize].ordinal;
    let mut middle = order.len() / 2;
    while middle < order.len() && ordinal_at(middle) == ordinal_at(middle - 1) {
        middle += 1;
    }
    if middle == order.len() {
        return Ok(replay_documents(ops, order, states, 0));
    }
    let split = ordinal_at(middle) as usize;
    let (first, second) = states.split_at_mut(split);
    let (first_order, second_order) = order.split_at(middle);
    std::thread::scope(|scope| {
        let other = std::thread::Builder::new()
            .name("quire-replay".into())
            .spawn_scoped(scope, || replay_documents(ops, second_order, second, split));
        let other = other?;
        let mine = replay_documents(ops, first_order, first, 0);
        let theirs = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok(mine.merge(theirs))
    })
}

/// Applies `ops[order[..]]` to `states` (`states[0]` is ordinal `first_ordinal`). A
/// document stops at its first op that does not follow its state (noted in its
/// [`DocState::replay_error`]) until a tombstone of it, which starts it anew: the ops
/// before a tombstone belong to the deleted incarnation, whatever they were. The other
/// documents go on, so that the inconsistency reported is the first by LSN (as a
/// replay in LSN order would find it), however the documents were split.
fn replay_documents(
    ops: &[SegmentOp<'_>],
    order: &[u32],
    states: &mut [(Arc<str>, DocState)],
    first_ordinal: usize,
) -> Replayed {
    let mut outcome = Replayed::default();
    for &i in order {
        let SegmentOp {
            ordinal,
            location,
            record,
        } = &ops[i as usize];
        let state = &mut states[*ordinal as usize - first_ordinal].1;
        match record {
            SegmentRecord::Tombstone { .. } => {
                // Its snapshot (of this incarnation or a later one) is not used: every
                // op after a tombstone still in the log is in the log too (segments
                // are deleted oldest first).
                *state = DocState {
                    tombstoned: true,
                    ..DocState::deferred(String::new(), 0)
                };
            }
            SegmentRecord::Op(_) if state.replay_error.is_some() => {}
            SegmentRecord::Op(op) => match replay_op(state, op, location.lsn) {
                Ok(true) => outcome.replayed += 1,
                Ok(false) => {}
                Err(message) => state.replay_error = Some((location.lsn, message)),
            },
        }
    }
    outcome
}

/// Replays one op onto its document's state (`Ok(true)`): checks that it follows the
/// state and applies (by lengths: the text itself is deferred), and records its seq and
/// id; unless a snapshot covers it (`Ok(false)`). Or says why it does not follow.
fn replay_op(state: &mut DocState, op: &OpView<'_>, lsn: Lsn) -> Result<bool, String> {
    if op.server_seq <= state.version {
        return Ok(false); // covered by the snapshot
    }
    if op.server_seq != state.version + 1 {
        return Err(format!(
            "document {:?}: the log continues at seq {} (LSN {lsn}) but its state is at version {}; \
             ops {}..{} are in neither a valid snapshot nor the log. Restore the data \
             directory from a backup.",
            op.doc_id,
            op.server_seq,
            state.version,
            state.version + 1,
            op.server_seq - 1
        ));
    }
    // Checked by lengths alone: the text is built when first needed (`DocText`).
    let applies = match &mut state.text {
        DocText::Deferred(deferred) => deferred.check(&op.patches, op.ascii),
        DocText::Built(text) => text.apply(&op.patches),
    };
    if let Err(e) = applies {
        return Err(format!(
            "document {:?}: op at seq {} (LSN {lsn}) does not apply: {e}",
            op.doc_id, op.server_seq
        ));
    }
    state.version = op.server_seq;
    // The fingerprint of a type-2 record; a type-1 record's is unknown (`None`), and the
    // table never takes an id matching it for a resend.
    state
        .dedupe
        .record(op.client_id, op.local_seq, op.server_seq, op.fingerprint);
    Ok(true)
}

impl LocalSequencer {
    /// Opens the data directory on the real file system.
    pub fn open(data_dir: &Path, config: LocalConfig) -> Result<(Self, StartupReport), OpenError> {
        Self::open_with(Arc::new(OsFs), data_dir, config)
    }

    /// Opens with any file layer (tests pass a simulated disk).
    pub fn open_with(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        config: LocalConfig,
    ) -> Result<(Self, StartupReport), OpenError> {
        let started = Instant::now();
        let snapshot_dir = data_dir.join("snapshots");
        vfs.create_dir_all(&snapshot_dir)
            .map_err(at_path("creating", &snapshot_dir))
            .map_err(OpenError::Snapshots)?;
        // Every check comes before the first write: the snapshots are read, the log is
        // scanned (each record validated, a torn tail told from corruption) and replayed
        // onto them, and only a start with no objection left cuts the tail, starts the
        // writer and removes snapshot leftovers. A refused start leaves the directory as
        // it was (a fresh one only gets its empty `wal/` and `snapshots/`).
        let LoadedSnapshots {
            by_doc,
            invalid,
            leftovers,
        } = load_snapshots(&*vfs, &snapshot_dir).map_err(OpenError::Snapshots)?;
        let snapshots_loaded = by_doc.len();
        let mut docs: HashMap<Arc<str>, DocState> = by_doc
            .into_values()
            .map(|snapshot| {
                // Fingerprints as the snapshot keeps them (version 3); unknown from a
                // version 1 or 2 snapshot.
                let mut dedupe = Dedupe::default();
                for entry in &snapshot.dedupe {
                    for op in entry.ops() {
                        dedupe.record(entry.client_id, op.local_seq, op.seq, op.fingerprint);
                    }
                }
                // The snapshot's text is kept as it is (the file may be replaced before
                // the text is built): the base of the deferred text.
                let state = DocState {
                    dedupe,
                    last_snapshot_ms: snapshot.created_ms,
                    ..DocState::deferred(snapshot.text, snapshot.last_included_seq)
                };
                (Arc::from(snapshot.doc_id.as_str()), state)
            })
            .collect();

        let mut replayed = 0u64;
        // Each document's state while the log is replayed, by the ordinal the scan gave
        // it (taken out of `docs` at its first op): no id is hashed per record.
        let mut replaying: Vec<(Arc<str>, DocState)> = Vec::new();
        let mut thread_error: Option<std::io::Error> = None;
        // A manual log starts no thread, so neither does its replay.
        let threads = match config.wal.background {
            Background::Threads => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Background::Manual => 1,
        };
        let scanned = Wal::scan_segments(
            vfs.clone(),
            &data_dir.join("wal"),
            config.wal.clone(),
            |segment| {
                if thread_error.is_some() {
                    return;
                }
                // Ordinals are given in order of first appearance: the new ones of this
                // segment are the ones past the end of `replaying`.
                if let Some(&last) = segment.by_document.last() {
                    let newest = segment.ops[last as usize].ordinal as usize;
                    while replaying.len() <= newest {
                        let id = segment.slot(replaying.len() as u32).id.clone();
                        let state = docs
                            .remove(&*id)
                            .unwrap_or_else(|| DocState::deferred(String::new(), 0));
                        replaying.push((id, state));
                    }
                }
                match replay_segment(segment.ops, segment.by_document, &mut replaying, threads) {
                    Ok(outcome) => replayed += outcome.replayed,
                    Err(error) => thread_error = Some(error),
                }
            },
        )
        .map_err(OpenError::Wal)?;
        if let Some(error) = thread_error {
            return Err(OpenError::Wal(WalError::Io {
                context: "starting a replay thread".into(),
                error,
            }));
        }
        if let Some((_, message)) = first_inconsistency(&replaying) {
            return Err(OpenError::Inconsistent(message));
        }
        // A document deleted and not used since is gone; the snapshot files of one
        // whose tombstone the log holds are removed once the start is sure (below).
        let tombstoned: Vec<Arc<str>> = replaying
            .iter()
            .filter(|(_, state)| state.tombstoned)
            .map(|(id, _)| id.clone())
            .collect();
        replaying.retain(|(_, state)| !(state.tombstoned && state.version == 0));
        // An op that might have made a text longer than `MAX_DOC_BYTES` (only one near
        // the limit, or after many multi-byte deletions): the text itself tells, built now.
        for (id, state) in &mut replaying {
            if let DocText::Deferred(deferred) = &state.text {
                if deferred.unsure_bytes {
                    let text = deferred
                        .build(id, state.version, |after, limit| {
                            scanned.read_ops_after(id, after, limit)
                        })
                        .map_err(OpenError::Inconsistent)?;
                    state.text = DocText::Built(text);
                }
            }
        }
        docs.reserve(replaying.len());
        for (id, state) in replaying {
            let previous = docs.insert(id, state);
            assert!(
                previous.is_none(),
                "a document replayed was taken out of docs"
            );
        }
        let client_ids = super::client_ids::ClientIds::open(vfs.clone(), data_dir)
            .map_err(OpenError::Snapshots)?;
        let (wal, report) = scanned.start().map_err(OpenError::Wal)?;
        remove_leftovers(&*vfs, &leftovers).map_err(OpenError::Snapshots)?;
        for id in &tombstoned {
            remove_snapshots(&*vfs, &snapshot_dir, id).map_err(OpenError::Snapshots)?;
        }
        let startup = StartupReport {
            documents: docs.len(),
            snapshots_loaded,
            snapshots_invalid: invalid.len(),
            records_scanned: report.records,
            ops_replayed: replayed,
            bytes_scanned: report.bytes_scanned,
            segments: report.segments.len(),
            tail_cut: report.tail_cut.as_ref().map(|c| {
                format!(
                    "segment {} at offset {}: {} ({} bytes zeroed, {} segment files removed)",
                    c.segment_id,
                    c.offset,
                    c.reason,
                    c.bytes_zeroed,
                    c.segments_removed.len()
                )
            }),
            elapsed: started.elapsed(),
        };
        tracing::info!(
            documents = startup.documents,
            snapshots = startup.snapshots_loaded,
            invalid_snapshots = startup.snapshots_invalid,
            segments = startup.segments,
            records = startup.records_scanned,
            replayed = startup.ops_replayed,
            mib_scanned = startup.bytes_scanned as f64 / (1 << 20) as f64,
            tail_cut = startup.tail_cut.as_deref().unwrap_or("none"),
            elapsed_ms = startup.elapsed.as_millis() as u64,
            "recovered"
        );
        let docs = docs
            .into_iter()
            .map(|(id, state)| (id, Arc::new(Mutex::new(state))))
            .collect();
        let shared = Arc::new(Shared {
            vfs,
            snapshot_dir,
            wal,
            docs: RwLock::new(docs),
            config,
            snapshot_us: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
            ),
            snapshots_written: Default::default(),
            client_ids,
            backup_pins: Default::default(),
            next_pin: std::sync::atomic::AtomicU64::new(1),
            deleting: Default::default(),
            deletions: Default::default(),
            snapshot_files: Mutex::new(()),
        });
        let maintenance = match shared.config.wal.background {
            Background::Threads => {
                let (requests, rx) = mpsc::channel();
                let thread_shared = shared.clone();
                let thread = std::thread::Builder::new()
                    .name("quire-maintenance".into())
                    .spawn(move || maintenance::run(thread_shared, rx))
                    .map_err(|e| {
                        OpenError::Wal(WalError::Io {
                            context: "starting the maintenance thread".into(),
                            error: e,
                        })
                    })?;
                Maintenance::Thread {
                    requests,
                    thread: Mutex::new(Some(thread)),
                }
            }
            Background::Manual => Maintenance::Manual(Mutex::new(VecDeque::new())),
        };
        Ok((
            LocalSequencer {
                shared,
                maintenance,
            },
            startup,
        ))
    }

    pub fn wal(&self) -> &Wal {
        &self.shared.wal
    }

    fn doc(&self, doc_id: &str) -> Option<DocRef> {
        self.shared
            .docs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc_id)
            .cloned()
    }

    /// The refusal of an op to `doc_id`, deleted at `version` by the tombstone at `lsn`
    /// (`None`: the deletion is finished), made on the deleted document or (`of_deleted`
    /// false) on a new one under the same id. With the log failed, whether the deletion
    /// holds is known only after the restart: a storage failure (the client keeps the op
    /// and resends it then), never "deleted", which has the client drop its edits. While
    /// the tombstone is not durable, it may still fail: "retry" (code 33). Once it is,
    /// an op of the deleted document is refused as deleted; one of a new document is told
    /// to retry until the deletion is finished (its id is then free again).
    fn refusal_during_deletion(
        &self,
        doc_id: &str,
        lsn: Option<Lsn>,
        version: u64,
        of_deleted: bool,
    ) -> SubmitError {
        if let Some(failure) = self.shared.wal.failure() {
            return SubmitError::Storage(failure);
        }
        let durable = lsn.is_none_or(|lsn| self.shared.wal.durability().outcome(lsn) == Some(true));
        match (durable, of_deleted) {
            (true, true) => deleted(doc_id, version),
            (true, false) => SubmitError::Unavailable(format!(
                "document {doc_id:?} was deleted at version {version} and the deletion is \
                 being finished; nothing was applied: retry (it then starts anew, empty, at \
                 version 0)"
            )),
            (false, _) => SubmitError::Unavailable(format!(
                "document {doc_id:?} is being deleted and whether it will be is not known \
                 yet; nothing was applied: retry"
            )),
        }
    }

    fn doc_or_create(&self, doc_id: &str) -> Result<DocRef, SubmitError> {
        if let Some(doc) = self.doc(doc_id) {
            return Ok(doc);
        }
        let mut docs = self.shared.docs.write().unwrap_or_else(|p| p.into_inner());
        // Checked under the map's write lock, which a deletion holds while it moves the
        // document from the map to `deleting`.
        if let Some(&(lsn, version)) = self
            .shared
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc_id)
        {
            // An op of a new document under the id (not of the deleted one: its session
            // opened the id after the tombstone).
            return Err(self.refusal_during_deletion(doc_id, Some(lsn), version, false));
        }
        Ok(docs
            .entry(Arc::from(doc_id))
            .or_insert_with(|| Arc::new(Mutex::new(DocState::empty())))
            .clone())
    }

    /// Document ids known to the store.
    pub fn doc_ids(&self) -> Vec<Arc<str>> {
        let docs = self.shared.docs.read().unwrap_or_else(|p| p.into_inner());
        docs.keys().cloned().collect()
    }

    /// Writes a snapshot of `doc_id` now (after its latest op is durable).
    pub fn snapshot_now(&self, doc_id: &str) -> std::io::Result<bool> {
        maintenance::snapshot_doc(&self.shared, doc_id)
    }

    /// Runs one pass of the snapshot and truncation policy now.
    pub fn maintain_now(&self) -> std::io::Result<usize> {
        maintenance::tick(&self.shared)
    }

    /// With `Background::Manual`, the maintenance thread's work, run now on the calling
    /// thread: the snapshots the submit path requested, each in the order requested,
    /// then one pass of the policy ([`LocalSequencer::maintain_now`]: snapshots due by
    /// time, truncation). Returns what that pass returns, the number of segments
    /// removed. A snapshot of ops not yet durable first writes them ([`Wal::step`]),
    /// as the thread would wait for the writer.
    ///
    /// Stops at the first error and returns it: that request is dropped (the document
    /// asks again at its next op, as after the thread's failed snapshot), later ones stay
    /// queued, and the pass is not run. With threads, the thread does this work: only
    /// the pass is run.
    pub fn run_maintenance(&self) -> std::io::Result<usize> {
        if let Maintenance::Manual(queue) = &self.maintenance {
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some(doc_id) = next else { break };
                maintenance::snapshot_doc(&self.shared, &doc_id)?;
            }
        }
        maintenance::tick(&self.shared)
    }

    /// Snapshot requests waiting for [`LocalSequencer::run_maintenance`] (always 0 with
    /// threads).
    pub fn maintenance_pending(&self) -> usize {
        match &self.maintenance {
            Maintenance::Manual(queue) => queue.lock().unwrap_or_else(|p| p.into_inner()).len(),
            Maintenance::Thread { .. } => 0,
        }
    }

    /// [`Wal::step`]: writes the next batch of the log (`Background::Manual` only).
    pub fn step(&self) -> bool {
        self.shared.wal.step()
    }

    /// Snapshot write latency (microseconds).
    pub fn snapshot_us(&self) -> Summary {
        let h = self
            .shared
            .snapshot_us
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Summary {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }

    /// Stops the maintenance thread and closes the log (queued appends finish first).
    /// With `Background::Manual` there is no thread to stop, and the log writes nothing
    /// more: see [`Wal::close`].
    pub fn close(&self) {
        if let Maintenance::Thread { requests, thread } = &self.maintenance {
            let _ = requests.send(Request::Stop);
            if let Some(thread) = thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = thread.join();
            }
        }
        self.shared.wal.close();
    }
}

impl crate::backup::BackupSource for LocalSequencer {
    fn begin_backup(
        &self,
        staging: &Path,
        lease: Duration,
    ) -> Result<crate::backup::Capture, crate::backup::BackupError> {
        super::backup::begin(&self.shared, staging, lease)
    }

    fn renew_backup(&self, pin: u64, lease: Duration) -> bool {
        super::backup::renew(&self.shared, pin, lease)
    }

    fn end_backup(&self, pin: u64) {
        super::backup::end(&self.shared, pin)
    }
}

impl Drop for LocalSequencer {
    fn drop(&mut self) {
        self.close();
    }
}

impl LocalSequencer {
    /// Appends `record`, the next op of its document, and applies it to `state` (the
    /// document's, locked): checked first, so that a refusal leaves the state as it was.
    /// The first op after a restart builds the text (a blocking read of the log, as the
    /// append may block).
    fn append(&self, state: &mut DocState, record: OpRecordRef<'_>) -> Result<Lsn, SubmitError> {
        let doc_id = record.doc_id;
        assert_eq!(
            record.server_seq,
            state.version + 1,
            "ops follow their document"
        );
        state
            .text(doc_id, &self.shared.wal)
            .map_err(|e| SubmitError::Storage(Arc::from(e)))?
            .check(record.patches)
            .map_err(SubmitError::Invalid)?;
        // Append first: if the log refuses, the state is untouched.
        let lsn = self.shared.wal.append_op_ref(record).map_err(|e| match e {
            WalError::RecordTooLarge { .. } => SubmitError::TooLarge(e.to_string()),
            other => SubmitError::Storage(Arc::from(other.to_string())),
        })?;
        state
            .text(doc_id, &self.shared.wal)
            .expect("built above, under the same lock")
            .apply(record.patches)
            .expect("patches were checked under the same lock");
        state.version = record.server_seq;
        state.dedupe.record(
            record.client_id,
            record.local_seq,
            record.server_seq,
            record.fingerprint,
        );
        state.last_lsn = lsn;
        Ok(lsn)
    }

    /// `doc_id` as a snapshot holds it now (cluster mode writes it to the store): its
    /// text (built first if deferred: a blocking read of the log), version and dedupe
    /// table. `None`: no such document.
    pub fn snapshot_of(&self, doc_id: &str) -> Result<Option<Snapshot>, Arc<str>> {
        let Some(doc) = self.doc(doc_id) else {
            return Ok(None);
        };
        let mut state = lock_doc(&doc);
        let text = state.text(doc_id, &self.shared.wal)?.to_string();
        Ok(Some(Snapshot {
            doc_id: doc_id.to_owned(),
            last_included_seq: state.version,
            created_ms: now_ms(),
            text,
            dedupe: state.dedupe_entries(),
        }))
    }

    /// Forgets `doc_id` (cluster mode: this node lost it): a tombstone, its snapshot
    /// files removed, its id free for [`LocalSequencer::install`]. Blocking: it waits
    /// for the tombstone to be durable.
    pub fn evict(&self, doc_id: &str) -> Result<(), Arc<str>> {
        self.delete(doc_id).map_err(|e| Arc::from(e.to_string()))?;
        self.finish_delete(doc_id)
    }

    /// Installs `doc_id` as another store holds it (cluster mode: loaded after a claim),
    /// in place of whatever this log had of it: its snapshot (`None`: empty at 0) and
    /// the ops after it, in seq order. Each op is checked to follow and apply, appended
    /// to the log, and the install returns once they are durable: the document's
    /// version. Blocking.
    ///
    /// The local log is then a cache of the other store: a restart must not recover
    /// from it (a tombstone before an install removes the installed snapshot's file at
    /// a restart's recovery too), so cluster mode starts on an empty directory.
    pub fn install(
        &self,
        doc_id: &str,
        snapshot: Option<Snapshot>,
        ops: &[OpRecord],
    ) -> Result<u64, Arc<str>> {
        let failed = |e: String| Arc::<str>::from(format!("installing {doc_id:?}: {e}"));
        validate_doc_id(doc_id).map_err(failed)?;
        self.evict(doc_id)?;
        let state = match snapshot {
            None => DocState::empty(),
            Some(snapshot) => {
                if snapshot.doc_id != doc_id {
                    return Err(failed(format!("a snapshot of {:?}", snapshot.doc_id)));
                }
                let _files = self
                    .shared
                    .snapshot_files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                crate::wal::snapshot::write_snapshot(
                    &*self.shared.vfs,
                    &self.shared.snapshot_dir,
                    &snapshot,
                )
                .map_err(|e| failed(e.to_string()))?;
                let mut dedupe = Dedupe::default();
                for entry in &snapshot.dedupe {
                    for op in entry.ops() {
                        dedupe.record(entry.client_id, op.local_seq, op.seq, op.fingerprint);
                    }
                }
                DocState {
                    dedupe,
                    last_snapshot_ms: snapshot.created_ms,
                    ..DocState::deferred(snapshot.text, snapshot.last_included_seq)
                }
            }
        };
        let doc = Arc::new(Mutex::new(state));
        let mut state = lock_doc(&doc);
        {
            let mut docs = self.shared.docs.write().unwrap_or_else(|p| p.into_inner());
            if docs.contains_key(doc_id) {
                return Err(failed("it was created meanwhile".into()));
            }
            docs.insert(Arc::from(doc_id), doc.clone());
        }
        // Under the document's lock from its insertion on: no submit sees it half
        // installed.
        for record in ops {
            if record.doc_id != doc_id || record.server_seq != state.version + 1 {
                let (got, seq) = (&record.doc_id, record.server_seq);
                let expected = state.version + 1;
                drop(state);
                let _ = self.evict(doc_id);
                return Err(failed(format!(
                    "op {got:?} seq {seq} where seq {expected} was expected"
                )));
            }
            if let Err(e) = self.append(&mut state, record.borrowed()) {
                drop(state);
                let _ = self.evict(doc_id);
                return Err(failed(e.to_string()));
            }
        }
        let (version, lsn) = (state.version, state.last_lsn);
        drop(state);
        maintenance::wait_durable_blocking(&self.shared, lsn).map_err(|e| failed(e.to_string()))?;
        Ok(version)
    }
}

impl LocalSequencer {
    /// `doc_id` as of its newest durable op: its snapshot (which holds only durable
    /// ops) and the ops after it in the log's index (which has only durable ones).
    fn durable_view(&self, doc_id: &str, state: &DocState) -> Result<DocView, Arc<str>> {
        let fail =
            |e: String| Arc::<str>::from(format!("reading {doc_id:?} after the log failed: {e}"));
        let (base, base_seq) = if state.snapshot_seq == 0 {
            (String::new(), 0)
        } else {
            let path = self
                .shared
                .snapshot_dir
                .join(snapshot_file_name(doc_id, state.snapshot_seq));
            let bytes = self
                .shared
                .vfs
                .map(&path)
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            let snapshot = Snapshot::decode(&bytes).map_err(|e| fail(e.to_string()))?;
            (snapshot.text, snapshot.last_included_seq)
        };
        let wal = &self.shared.wal;
        let version = wal
            .with_index(|index| {
                index
                    .ops_after(doc_id, base_seq, usize::MAX)
                    .last()
                    .map(|&(seq, _)| seq)
            })
            .unwrap_or(base_seq);
        let text = Deferred::new(base, base_seq)
            .build(doc_id, version, |after, limit| {
                wal.read_ops_after(doc_id, after, limit)
            })
            .map_err(fail)?;
        Ok(DocView {
            text: text.to_string(),
            version,
        })
    }
}

impl Sequencer for LocalSequencer {
    fn list_documents(&self, after: Option<&str>, limit: usize) -> Vec<DocSummary> {
        // The page's ids first (a sort of the ids past `after`: an admin request, not a
        // hot path), then each document's figures under its own lock.
        let docs: Vec<(Arc<str>, DocRef)> = {
            let map = self.shared.docs.read().unwrap_or_else(|p| p.into_inner());
            let mut ids: Vec<&Arc<str>> = map
                .keys()
                .filter(|id| after.is_none_or(|a| &***id > a))
                .collect();
            ids.sort_unstable();
            ids.truncate(limit);
            ids.into_iter()
                .map(|id| (id.clone(), map[id].clone()))
                .collect()
        };
        docs.into_iter()
            .map(|(id, doc)| {
                let state = lock_doc(&doc);
                DocSummary {
                    id,
                    version: state.version,
                    chars: state.len_chars(),
                }
            })
            .collect()
    }

    fn read_at(&self, doc_id: &str, seq: u64) -> Result<Option<DocView>, ReadAtError> {
        let storage = |e: String| ReadAtError::Storage(Arc::from(e));
        if self.doc(doc_id).is_none() {
            return Ok(None);
        }
        let wal = &self.shared.wal;
        // What the log holds of the document: only durable ops are indexed.
        let (first, newest) = wal.with_index(|index| {
            let ops = index.ops_after(doc_id, 0, usize::MAX);
            (ops.first().map(|&(s, _)| s), ops.last().map(|&(s, _)| s))
        });
        // Its snapshots (each holds only durable ops), newest first.
        let prefix = format!(
            "{}.",
            snapshot_file_name(doc_id, 0)
                .split('.')
                .next()
                .unwrap_or("")
        );
        let mut snapshots: Vec<u64> = self
            .shared
            .vfs
            .list(&self.shared.snapshot_dir)
            .map_err(|e| storage(format!("listing snapshots: {e}")))?
            .iter()
            .filter(|name| name.starts_with(&prefix))
            .filter_map(|name| parse_snapshot_file_name(name))
            .filter(|(id, _)| id == doc_id)
            .map(|(_, s)| s)
            .collect();
        snapshots.sort_unstable_by(|a, b| b.cmp(a));
        let newest = newest.max(snapshots.first().copied()).unwrap_or(0);
        if seq > newest {
            return Err(ReadAtError::Future { newest });
        }
        // The newest snapshot at or before `seq`, else the start when the log still
        // holds op 1.
        let base = match snapshots.iter().find(|&&s| s <= seq) {
            Some(&s) => {
                let path = self.shared.snapshot_dir.join(snapshot_file_name(doc_id, s));
                let bytes = self
                    .shared
                    .vfs
                    .map(&path)
                    .map_err(|e| storage(format!("{}: {e}", path.display())))?;
                let snapshot = Snapshot::decode(&bytes).map_err(|e| storage(e.to_string()))?;
                Deferred::new(snapshot.text, snapshot.last_included_seq)
            }
            None if first == Some(1) || seq == 0 => Deferred::new(String::new(), 0),
            None => {
                let oldest = snapshots
                    .last()
                    .copied()
                    .into_iter()
                    .chain(first.map(|f| f - 1));
                return Err(ReadAtError::NotRetained {
                    oldest: oldest.min().unwrap_or(newest),
                });
            }
        };
        if base.base_seq < seq && first.is_none_or(|f| f > base.base_seq + 1) {
            return Err(ReadAtError::NotRetained {
                oldest: snapshots.last().copied().unwrap_or(newest),
            });
        }
        let text = base
            .build(doc_id, seq, |after, limit| {
                wal.read_ops_after(doc_id, after, limit)
            })
            .map_err(storage)?;
        Ok(Some(DocView {
            text: text.to_string(),
            version: seq,
        }))
    }

    fn backup_source(&self) -> Option<&dyn crate::backup::BackupSource> {
        Some(self)
    }

    fn storage_stats(&self) -> StorageStats {
        use crate::wal::stats::{Distribution, LATENCY_BOUNDS};
        use std::sync::atomic::Ordering::Relaxed;
        let wal = &self.shared.wal;
        let stats = wal.stats();
        let snapshot_seconds = {
            let h = self
                .shared
                .snapshot_us
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            Distribution::of(&h, LATENCY_BOUNDS, 1e6)
        };
        StorageStats {
            failure: wal.failure(),
            next_segment_warning: wal.next_segment_warning(),
            next_segment_prepared: wal.next_segment_prepared(),
            records_written: stats.records.load(Relaxed),
            bytes_written: stats.bytes.load(Relaxed),
            batches: stats.batches.load(Relaxed),
            fsync_seconds: stats.fsync_seconds(),
            batch_records: stats.batch_sizes(),
            queue_depth: wal.queue_depth().0 as u64,
            snapshots_written: self.shared.snapshots_written.load(Relaxed),
            snapshot_seconds,
            segments_truncated: stats.segments_removed.load(Relaxed),
        }
    }

    fn assign_client_id(&self) -> Result<u64, Arc<str>> {
        self.shared.client_ids.assign().map_err(|e| {
            tracing::error!("cannot give out a client id: {e}");
            Arc::from(format!("cannot give out a client id: {e}"))
        })
    }

    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        validate_doc_id(doc_id).map_err(SubmitError::InvalidDocId)?;
        let doc = self.doc_or_create(doc_id)?;
        let mut state = lock_doc(&doc);
        if state.deleted {
            // Taken from the map before a deletion took it out: the op is not applied.
            // (`deleting` after the document's lock is gone: `delete` takes them in the
            // other order.)
            let version = state.version;
            drop(state);
            let lsn = self
                .shared
                .deleting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(doc_id)
                .map(|&(lsn, _)| lsn);
            return Err(self.refusal_during_deletion(doc_id, lsn, version, true));
        }
        let client = op.op_id.client_id;
        if let Some(answer) = state.duplicate(op.op_id, op.fingerprint) {
            return answer;
        }
        if op.expected_version != state.version {
            return Err(SubmitError::VersionMismatch {
                expected: op.expected_version,
                actual: state.version,
            });
        }
        let seq = state.version + 1;
        let record = OpRecordRef {
            doc_id,
            client_id: client,
            local_seq: op.op_id.local_seq,
            server_seq: seq,
            base_version: op.base_version,
            timestamp_ms: now_ms(),
            patches: &op.patches,
            // Logged so that the dedupe table rebuilt at a restart still tells a resend
            // from a different op under this id.
            fingerprint: Some(op.fingerprint),
        };
        let lsn = self.append(&mut state, record)?;
        if seq - state.snapshot_seq >= self.shared.config.snapshot_every_ops
            && !state.snapshot_queued
        {
            state.snapshot_queued = true;
            let doc_id = Arc::from(doc_id);
            match &self.maintenance {
                Maintenance::Thread { requests, .. } => {
                    let _ = requests.send(Request::Snapshot(doc_id));
                }
                Maintenance::Manual(queue) => {
                    queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_back(doc_id);
                }
            }
        }
        Ok(Submitted::Applied {
            seq,
            ticket: Ticket(lsn),
        })
    }

    fn delete(&self, doc_id: &str) -> Result<Option<Deletion>, DeleteRefused> {
        // The map's write lock first (as `doc_or_create`), then `deleting`, then the
        // document's own lock: no op of it is sequenced between its tombstone and its
        // removal, and none is created anew until `finish_delete`.
        let mut docs = self.shared.docs.write().unwrap_or_else(|p| p.into_inner());
        let mut deleting = self
            .shared
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(&(lsn, version)) = deleting.get(doc_id) {
            return Ok(Some(Deletion {
                version,
                ticket: Ticket(lsn),
            }));
        }
        let Some(doc) = docs.get(doc_id).cloned() else {
            return Ok(None);
        };
        let mut state = lock_doc(&doc);
        let tombstone = TombstoneRecord {
            doc_id: doc_id.to_owned(),
            version: state.version,
            timestamp_ms: now_ms(),
        };
        let lsn =
            self.shared.wal.append_tombstone(&tombstone).map_err(|e| {
                DeleteRefused::Failed(Arc::from(format!("deleting {doc_id:?}: {e}")))
            })?;
        state.deleted = true;
        docs.remove(doc_id);
        deleting.insert(Arc::from(doc_id), (lsn, tombstone.version));
        self.shared
            .deletions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            doc = doc_id,
            version = tombstone.version,
            lsn,
            "document deleted"
        );
        Ok(Some(Deletion {
            version: tombstone.version,
            ticket: Ticket(lsn),
        }))
    }

    fn finish_delete(&self, doc_id: &str) -> Result<(), Arc<str>> {
        let failed = |e: std::io::Error| Arc::from(format!("deleting {doc_id:?}: {e}"));
        let Some(&(lsn, _)) = self
            .shared
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc_id)
        else {
            return Ok(());
        };
        // Files go only once the tombstone is durable: without it they are what
        // recovery builds the document from.
        maintenance::wait_durable_blocking(&self.shared, lsn).map_err(failed)?;
        let _files = self
            .shared
            .snapshot_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        remove_snapshots(&*self.shared.vfs, &self.shared.snapshot_dir, doc_id).map_err(failed)?;
        self.shared
            .deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(doc_id);
        Ok(())
    }

    fn applied(
        &self,
        doc_id: &str,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>> {
        lock_doc(&self.doc(doc_id)?).duplicate(op_id, fingerprint)
    }

    fn version(&self, doc_id: &str) -> u64 {
        self.doc(doc_id).map_or(0, |d| lock_doc(&d).version)
    }

    async fn wait_durable(&self, ticket: Ticket) -> Result<(), Arc<str>> {
        self.shared
            .wal
            .wait_durable(ticket.0)
            .await
            .map_err(|e| Arc::from(e.to_string()))
    }

    fn read_now(
        &self,
        doc_id: &str,
        reader: Option<u64>,
    ) -> Result<Option<(DocView, Ticket)>, Arc<str>> {
        let Some(doc) = self.doc(doc_id) else {
            return Ok(None);
        };
        // The first read after a restart builds the text: a blocking read of the log (the
        // ops after the document's snapshot), under the document's lock.
        let mut state = lock_doc(&doc);
        let durable_lsn = self.shared.wal.durability().durable_lsn;
        if state.last_lsn > durable_lsn && self.shared.wal.failure().is_some() {
            // The log failed under some of this document's ops: they were applied here
            // and will never be acknowledged. Reads go on, from what is: the snapshot
            // and the log's durable ops; but not for a client with one of those ops (see
            // the trait's notes), whose read fails with the log below.
            let view = self.durable_view(doc_id, &state)?;
            let reader_in_limbo = reader
                .and_then(|client| state.dedupe.newest_seq(client))
                .is_some_and(|seq| seq > view.version);
            if !reader_in_limbo {
                return Ok(Some((view, Ticket(durable_lsn))));
            }
        }
        let text = state.text(doc_id, &self.shared.wal)?.to_string();
        Ok(Some((
            DocView {
                text,
                version: state.version,
            },
            Ticket(state.last_lsn),
        )))
    }

    fn ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Option<Vec<SequencedOp>>, Arc<str>> {
        let first = self.shared.wal.with_index(|i| i.first_retained_seq(doc_id));
        let version = self.doc(doc_id).map_or(0, |d| lock_doc(&d).version);
        if after_seq >= version || limit == 0 {
            return Ok(Some(Vec::new()));
        }
        match first {
            Some(first) if first <= after_seq + 1 => self
                .shared
                .wal
                .read_ops_after(doc_id, after_seq, limit)
                .map(|records| Some(records.into_iter().map(sequenced).collect()))
                .map_err(|e| Arc::from(e.to_string())),
            _ => Ok(None),
        }
    }
}

/// The refusal of an op to a document deleted (or being deleted) at `version`.
fn deleted(doc_id: &str, version: u64) -> SubmitError {
    SubmitError::Deleted(format!(
        "document {doc_id:?} was deleted at version {version}; nothing was applied (once \
         the deletion is done, opening it again starts it anew, empty, at version 0)"
    ))
}

/// The domain op a log record holds (its document id is the caller's).
fn sequenced(record: OpRecord) -> SequencedOp {
    SequencedOp {
        seq: record.server_seq,
        id: OpId {
            client_id: record.client_id,
            local_seq: record.local_seq,
        },
        base_version: record.base_version,
        patches: record.patches,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::index::Location;
    use crate::wal::record::RecordType;

    /// `ops` encoded, then decoded in place as the scan would show them, in LSN order.
    fn segment_ops(payloads: &[Vec<u8>]) -> Vec<SegmentOp<'_>> {
        payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| {
                let op = OpView::decode(RecordType::OpWithFingerprint, payload).unwrap();
                SegmentOp {
                    ordinal: op.doc_id[1..].parse().unwrap(),
                    location: Location {
                        segment_id: 1,
                        offset: 64 + 8 * i as u64,
                        lsn: i as u64 + 1,
                    },
                    record: SegmentRecord::Op(op),
                }
            })
            .collect()
    }

    fn grouped(ops: &[SegmentOp<'_>]) -> Vec<u32> {
        let mut order: Vec<(u32, u32)> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| (op.ordinal, i as u32))
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, i)| i).collect()
    }

    fn states(docs: u32) -> Vec<(Arc<str>, DocState)> {
        (0..docs)
            .map(|d| {
                let id = Arc::from(format!("d{d}").as_str());
                (id, DocState::deferred(String::new(), 0))
            })
            .collect()
    }

    fn payloads(docs: u64, per_doc: u64, skip: Option<(u64, u64)>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for seq in 1..=per_doc {
            for d in 0..docs {
                if skip == Some((d, seq)) {
                    continue;
                }
                let record = OpRecord {
                    doc_id: format!("d{d}"),
                    client_id: d % 7,
                    local_seq: seq,
                    server_seq: seq,
                    base_version: seq - 1,
                    timestamp_ms: 0,
                    patches: vec![crate::op::Patch::new(0, 0, format!("{seq},"))],
                    fingerprint: Some(seq),
                };
                let mut payload = Vec::new();
                record.encode(&mut payload);
                out.push(payload);
            }
        }
        out
    }

    mod manual {
        use super::*;
        use crate::op::Patch;
        use crate::sequencer::fingerprint;
        use crate::wal::segment::SEGMENT_SIZE_MIN;
        use crate::wal::vfs::sim::{CrashMode, SimFs};
        use crate::wal::WalConfig;
        use std::sync::atomic::Ordering;

        fn config() -> LocalConfig {
            LocalConfig {
                wal: WalConfig {
                    segment_size: SEGMENT_SIZE_MIN,
                    background: Background::Manual,
                    ..WalConfig::default()
                },
                snapshot_every_ops: 3,
                snapshot_every: Duration::from_secs(3600),
                retention: Duration::from_secs(3600),
                maintenance_interval: Duration::from_secs(3600),
            }
        }

        fn open(fs: &SimFs) -> (LocalSequencer, StartupReport) {
            LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config())
                .unwrap_or_else(|e| panic!("open failed: {e}"))
        }

        fn submit(store: &LocalSequencer, seq: u64) -> Ticket {
            submit_patches(store, seq, vec![Patch::new(0, 0, format!("{seq},"))])
        }

        fn durable(store: &LocalSequencer, ticket: Ticket) -> bool {
            store.wal().durability().durable_lsn >= ticket.0
        }

        #[test]
        fn a_manual_sequencer_writes_and_snapshots_only_when_told_and_recovers() {
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            let first = submit(&store, 1);
            assert!(!durable(&store, first) && store.wal().has_pending());
            assert!(store.step());
            assert!(durable(&store, first));
            assert!(!store.step());
            // The third op asks for a snapshot; it waits for the caller, as do the ops.
            let tickets: Vec<Ticket> = (2..=3).map(|seq| submit(&store, seq)).collect();
            assert_eq!(store.maintenance_pending(), 1);
            assert!(!durable(&store, tickets[1]));
            // The snapshot makes its ops durable first, by stepping the log.
            assert_eq!(store.run_maintenance().unwrap(), 0);
            assert_eq!(store.maintenance_pending(), 0);
            assert!(durable(&store, tickets[1]));
            // A fourth op, durable, and a fifth never written.
            let fourth = submit(&store, 4);
            assert!(store.step());
            assert!(durable(&store, fourth));
            submit(&store, 5);
            let crashed = fs.crash(CrashMode::LoseUnsynced);
            drop(store); // returns at once: there is no thread to join
            let (store, report) = open(&crashed);
            assert_eq!(report.snapshots_loaded, 1);
            assert_eq!(report.ops_replayed, 1, "only the op after the snapshot");
            assert_eq!(store.version("doc"), 4);
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let view = rt.block_on(store.read("doc")).unwrap().unwrap();
            assert_eq!(view.text, "4,3,2,1,");
            let ops = store.ops_after("doc", 0, 10).unwrap().unwrap();
            assert_eq!(ops.len(), 4);
            // The recovered store goes on, still by steps.
            let again = submit(&store, 5);
            assert!(!durable(&store, again));
            assert!(store.step());
            rt.block_on(store.wait_durable(again)).unwrap();
        }

        /// Op A under id (7, 1), durable, then a crash. After the restart a different op
        /// under the same id must be refused (code 26), and A's resend acked as seq 1:
        /// with the op only in the log (`snapshot = false`: replay) and with a snapshot
        /// covering it (`snapshot = true`).
        fn a_reused_op_id_is_refused_after_a_restart(snapshot: bool) {
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            let id = OpId {
                client_id: 7,
                local_seq: 1,
            };
            let a = vec![Patch::new(0, 0, "a")];
            let b = vec![Patch::new(0, 0, "b")];
            let (fp_a, fp_b) = (fingerprint(0, &a), fingerprint(0, &b));
            assert_ne!(fp_a, fp_b);
            let op = SubmitOp {
                op_id: id,
                base_version: 0,
                expected_version: 0,
                expected_incarnation: None,
                fingerprint: fp_a,
                patches: a,
            };
            let ticket = match store.submit("doc", &op).unwrap() {
                Submitted::Applied { seq: 1, ticket } => ticket,
                other => panic!("{other:?}"),
            };
            assert!(store.step());
            assert!(durable(&store, ticket));
            if snapshot {
                assert!(store.snapshot_now("doc").unwrap());
            }
            store.close();
            let crashed = fs.crash(CrashMode::LoseUnsynced);
            drop(store);
            let (store, report) = open(&crashed);
            let expected = if snapshot { (1, 0) } else { (0, 1) };
            assert_eq!((report.snapshots_loaded, report.ops_replayed), expected);
            match store.applied("doc", id, fp_b) {
                Some(Err(SubmitError::OpIdReused(_))) => {}
                other => panic!("a different op under a used id after a restart: {other:?}"),
            }
            match store.applied("doc", id, fp_a) {
                Some(Ok(Submitted::Duplicate { seq: 1, .. })) => {}
                other => panic!("a true resend after a restart: {other:?}"),
            }
        }

        #[test]
        fn a_reused_op_id_is_refused_after_a_restart_from_the_log() {
            a_reused_op_id_is_refused_after_a_restart(false);
        }

        #[test]
        fn a_reused_op_id_is_refused_after_a_restart_from_a_snapshot() {
            a_reused_op_id_is_refused_after_a_restart(true);
        }

        /// Op `seq` of client 9 on "doc", made on the version before it; its ticket.
        fn submit_patches(store: &LocalSequencer, seq: u64, patches: Vec<Patch>) -> Ticket {
            let op = SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: seq,
                },
                base_version: seq - 1,
                expected_version: seq - 1,
                expected_incarnation: None,
                fingerprint: 0,
                patches,
            };
            match store.submit("doc", &op) {
                Ok(Submitted::Applied { seq: s, ticket }) if s == seq => ticket,
                other => panic!("op {seq}: {other:?}"),
            }
        }

        #[test]
        fn an_install_replaces_the_documents_state_and_history_and_checks_its_ops() {
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            // A local history of 5 ops that the other store never had beyond op 2.
            for seq in 1..=5 {
                submit(&store, seq);
            }
            store.step();
            let record = |seq: u64, client: u64, ins: &str| OpRecord {
                doc_id: "doc".into(),
                client_id: client,
                local_seq: seq,
                server_seq: seq,
                base_version: seq - 1,
                timestamp_ms: 0,
                patches: vec![Patch::new(0, 0, ins.to_owned())],
                fingerprint: Some(seq * 10),
            };
            let snapshot = Snapshot {
                doc_id: "doc".into(),
                last_included_seq: 2,
                created_ms: 0,
                text: "two".into(),
                dedupe: vec![crate::wal::snapshot::DedupeEntry {
                    client_id: 9,
                    last_local_seq: 2,
                    seq: 2,
                    fingerprint: Some(0),
                    older: vec![],
                }],
            };
            let ops = [record(3, 5, "a"), record(4, 5, "b")];
            assert_eq!(store.install("doc", Some(snapshot.clone()), &ops), Ok(4));
            let (view, _) = store.read_now("doc", None).unwrap().unwrap();
            assert_eq!((view.text.as_str(), view.version), ("batwo", 4));
            // The history is the installed one: ops 3 and 4, nothing of the local 3..=5.
            let after = store.ops_after("doc", 2, 10).unwrap().unwrap();
            assert_eq!(
                after
                    .iter()
                    .map(|op| (op.seq, op.id.client_id))
                    .collect::<Vec<_>>(),
                vec![(3, 5), (4, 5)]
            );
            // Resends are answered from the installed dedupe table, old and new.
            let resend = |client, local_seq, fingerprint| {
                store.applied(
                    "doc",
                    OpId {
                        client_id: client,
                        local_seq,
                    },
                    fingerprint,
                )
            };
            assert!(matches!(
                resend(9, 2, 0),
                Some(Ok(Submitted::Duplicate { seq: 2, .. }))
            ));
            assert!(matches!(
                resend(5, 4, 40),
                Some(Ok(Submitted::Duplicate { seq: 4, .. }))
            ));
            assert!(
                resend(9, 5, 0).is_none(),
                "the local ops 3..=5 of 9 are gone: a resend is a new op here"
            );
            // And it goes on from there.
            let op = SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: 6,
                },
                base_version: 4,
                expected_version: 4,
                expected_incarnation: None,
                fingerprint: 0,
                patches: vec![Patch::new(5, 0, "!".to_owned())],
            };
            assert!(matches!(
                store.submit("doc", &op),
                Ok(Submitted::Applied { seq: 5, .. })
            ));
            store.step();
            assert_eq!(
                store.read_now("doc", None).unwrap().unwrap().0.text,
                "batwo!"
            );
            // An install whose ops do not follow is refused and leaves nothing behind.
            let gap = [record(3, 5, "a"), record(5, 5, "c")];
            assert!(store.install("doc", Some(snapshot), &gap).is_err());
            assert_eq!(store.read_now("doc", None).unwrap(), None);
            // Nor one whose op does not apply.
            let mut far = record(1, 5, "x");
            far.patches = vec![Patch::new(3, 0, "x".to_owned())];
            assert!(store.install("doc", None, &[far]).is_err());
            assert_eq!(store.read_now("doc", None).unwrap(), None);
        }

        /// Ops 1..=3 (a snapshot after the third), 4..=6 in the log only; multi-byte
        /// text, deletes mid-text. The directory as a power cut leaves it, and its text.
        fn snapshot_and_later_ops() -> (SimFs, String) {
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            let mut model = String::new();
            for seq in 1..=6u64 {
                let ins = format!("{seq}\u{e9}\u{1F600},");
                let patches = if seq % 2 == 0 {
                    // Delete the second code point, insert after the first.
                    model = model
                        .chars()
                        .take(1)
                        .chain(ins.chars())
                        .chain(model.chars().skip(2))
                        .collect();
                    vec![Patch::new(1, 1, ins)]
                } else {
                    model.insert_str(0, &ins);
                    vec![Patch::new(0, 0, ins)]
                };
                submit_patches(&store, seq, patches);
                assert!(store.step());
                if seq == 3 {
                    assert_eq!(store.maintenance_pending(), 1);
                    store.run_maintenance().unwrap();
                }
            }
            store.close();
            let crashed = fs.crash(CrashMode::LoseUnsynced);
            drop(store);
            (crashed, model)
        }

        fn read_text(store: &LocalSequencer) -> Result<Option<DocView>, Arc<str>> {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(store.read("doc"))
        }

        #[test]
        fn a_deferred_text_is_right_on_first_read_and_on_first_submit() {
            let (fs, model) = snapshot_and_later_ops();
            // First need: a read.
            let (store, report) = open(&fs);
            assert_eq!((report.snapshots_loaded, report.ops_replayed), (1, 3));
            assert!(matches!(
                lock_doc(&store.doc("doc").unwrap()).text,
                DocText::Deferred(_)
            ));
            let view = read_text(&store).unwrap().unwrap();
            assert_eq!((view.text.as_str(), view.version), (model.as_str(), 6));
            store.close();
            drop(store);
            // First need: a submit, whose patch deletes the last code point (refused if
            // the length were wrong) and inserts at the end.
            let (store, _) = open(&fs);
            let len = model.chars().count() as u32;
            submit_patches(&store, 7, vec![Patch::new(len - 1, 1, "!")]);
            assert!(store.step());
            let mut expected: String = model.chars().take(len as usize - 1).collect();
            expected.push('!');
            let view = read_text(&store).unwrap().unwrap();
            assert_eq!((view.text.as_str(), view.version), (expected.as_str(), 7));
            // And a snapshot of it is the built text.
            assert!(store.snapshot_now("doc").unwrap());
            store.close();
            drop(store);
            let (store, report) = open(&fs);
            assert_eq!(report.ops_replayed, 0);
            assert_eq!(read_text(&store).unwrap().unwrap().text, expected);
        }

        #[test]
        fn a_snapshot_of_a_deferred_text_leaves_it_deferred_on_the_snapshot() {
            let (fs, model) = snapshot_and_later_ops();
            let (store, _) = open(&fs);
            assert!(store.snapshot_now("doc").unwrap());
            match &lock_doc(&store.doc("doc").unwrap()).text {
                DocText::Deferred(deferred) => {
                    assert_eq!(
                        (deferred.base_seq, deferred.base.as_str()),
                        (6, model.as_str())
                    );
                }
                DocText::Built(_) => panic!("a snapshot built the text for good"),
            }
            // Built from the new base alone: the log's ops are not read again.
            use crate::wal::vfs::Vfs;
            for path in fs.files() {
                if path.extension().is_some_and(|e| e == "wal") {
                    fs.remove(&path).unwrap();
                }
            }
            let view = read_text(&store).unwrap().unwrap();
            assert_eq!((view.text.as_str(), view.version), (model.as_str(), 6));
        }

        #[test]
        fn truncation_after_a_snapshot_of_a_deferred_text_keeps_it_buildable() {
            let fs = SimFs::new();
            let config = LocalConfig {
                retention: Duration::ZERO,
                snapshot_every_ops: u64::MAX,
                ..config()
            };
            let open_here = || {
                LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config.clone())
                    .unwrap()
                    .0
            };
            let store = open_here();
            // A quarter of a segment per op: three segments' worth, each op written alone.
            let big = "y".repeat(SEGMENT_SIZE_MIN as usize / 4);
            for seq in 1..=9 {
                submit_patches(&store, seq, vec![Patch::new(0, 0, big.clone())]);
                assert!(store.step());
            }
            store.close();
            drop(store);
            let store = open_here();
            let deferred = |store: &LocalSequencer| {
                matches!(
                    lock_doc(&store.doc("doc").unwrap()).text,
                    DocText::Deferred(_)
                )
            };
            assert!(deferred(&store));
            // The document pins the oldest segment: the pass snapshots it (its text built
            // for the snapshot alone) and removes nothing; the next pass removes it.
            assert_eq!(store.run_maintenance().unwrap(), 0);
            assert!(deferred(&store));
            assert!(store.run_maintenance().unwrap() >= 1);
            let view = read_text(&store).unwrap().unwrap();
            assert_eq!((view.text.len(), view.version), (9 * big.len(), 9));
        }

        #[test]
        fn a_deferred_text_whose_ops_left_the_log_is_an_error_not_an_empty_text() {
            use crate::wal::vfs::Vfs;
            let (fs, _) = snapshot_and_later_ops();
            let (store, _) = open(&fs);
            for path in fs.files() {
                if path.starts_with("/data/wal") && path.extension().is_some_and(|e| e == "wal") {
                    fs.remove(&path).unwrap();
                }
            }
            let err = read_text(&store).expect_err("a text without its ops");
            assert!(
                err.contains("building the text of document \"doc\""),
                "{err}"
            );
            // A submit is refused as a storage failure, and the text stays deferred.
            let op = SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: 7,
                },
                base_version: 6,
                expected_version: 6,
                expected_incarnation: None,
                fingerprint: 0,
                patches: vec![Patch::new(0, 0, "x")],
            };
            match store.submit("doc", &op) {
                Err(SubmitError::Storage(reason)) => {
                    assert!(reason.contains("building"), "{reason}")
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                lock_doc(&store.doc("doc").unwrap()).text,
                DocText::Deferred(_)
            ));
            assert!(store.snapshot_now("doc").is_err());
        }

        #[test]
        fn a_deferred_text_reports_ops_missing_from_the_index() {
            let deferred = crate::sequencer::state::Deferred::new("ab".into(), 2);
            let op = |seq: u64| OpRecord {
                doc_id: "doc".into(),
                client_id: 1,
                local_seq: seq,
                server_seq: seq,
                base_version: seq - 1,
                timestamp_ms: 0,
                patches: vec![Patch::new(0, 0, "x")],
                fingerprint: None,
            };
            // Nothing after seq 2: an error naming the ops missing.
            let err = deferred.build("doc", 4, |_, _| Ok(Vec::new())).unwrap_err();
            assert!(err.contains("ops 3..=4 are not in the log"), "{err}");
            // A gap: seq 4 where 3 was expected.
            let err = deferred
                .build("doc", 4, |_, _| Ok(vec![op(4)]))
                .unwrap_err();
            assert!(err.contains("seq 4 where 3 was expected"), "{err}");
            let text = deferred
                .build("doc", 4, |after, limit| {
                    Ok((after + 1..=4).take(limit).map(op).collect())
                })
                .unwrap();
            assert_eq!(text.to_string(), "xxab");
        }

        #[test]
        fn a_deferred_text_counts_code_points_not_bytes() {
            let mut deferred = crate::sequencer::state::Deferred::new("\u{e9}".into(), 1);
            assert_eq!((deferred.len_chars, deferred.bytes_max), (1, 2));
            deferred
                .check(&[Patch::new(1, 0, "\u{1F600}x")], false)
                .unwrap();
            assert_eq!((deferred.len_chars, deferred.bytes_max), (3, 7));
            // Position 3 is the end: deleting one code point from it is out of range.
            let err = deferred.check(&[Patch::new(3, 1, "")], false).unwrap_err();
            assert!(
                matches!(err, crate::text::ApplyError::OutOfRange { len: 3, .. }),
                "{err:?}"
            );
            deferred.check(&[Patch::new(0, 3, "ab")], true).unwrap();
            assert_eq!((deferred.len_chars, deferred.bytes_max), (2, 6));
            assert!(!deferred.unsure_bytes);
            // Near the byte limit, the bound cannot tell: the text must be built.
            use crate::op::MAX_DOC_BYTES;
            deferred.len_chars = MAX_DOC_BYTES / 2;
            deferred.bytes_max = MAX_DOC_BYTES - 1;
            deferred.check(&[Patch::new(0, 1, "")], true).unwrap();
            assert!(!deferred.unsure_bytes, "a delete takes a byte at least");
            deferred.check(&[Patch::new(0, 0, "ab")], true).unwrap();
            assert!(!deferred.unsure_bytes, "at the limit");
            deferred.check(&[Patch::new(0, 0, "c")], true).unwrap();
            assert!(deferred.unsure_bytes);
        }

        #[test]
        fn an_op_beyond_the_end_of_its_document_still_refuses_the_start() {
            // A snapshot of 3 code points at seq 2 (taken by the sequencer), then an op
            // written to the log directly: seq 3 deleting past the end.
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            submit_patches(&store, 1, vec![Patch::new(0, 0, "\u{e9}b")]);
            submit_patches(&store, 2, vec![Patch::new(2, 0, "c")]);
            assert!(store.snapshot_now("doc").unwrap());
            store.close();
            drop(store);
            let (wal, _) = Wal::open(
                Arc::new(fs.clone()),
                Path::new("/data/wal"),
                config().wal,
                |_, _| {},
            )
            .unwrap();
            let record = OpRecord {
                doc_id: "doc".into(),
                client_id: 9,
                local_seq: 3,
                server_seq: 3,
                base_version: 2,
                timestamp_ms: 0,
                patches: vec![Patch::new(2, 2, "z")],
                fingerprint: Some(0),
            };
            wal.append_op(&record).unwrap();
            assert!(wal.step());
            wal.close();
            drop(wal);
            let Err(err) =
                LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config())
            else {
                panic!("an op that does not apply must refuse the start");
            };
            assert!(matches!(err, OpenError::Inconsistent(_)), "{err}");
            let message = err.to_string();
            assert!(
                message.contains("document \"doc\": op at seq 3")
                    && message.contains("does not apply")
                    && message.contains("position 2 with delete length 2 is out of range for a document of 3 code points"),
                "{message}"
            );
        }

        /// A store with no retention holding nine ops of a quarter of a segment each on
        /// one document, each written alone: three segments' worth, the third active.
        fn three_segments_of_one_document() -> LocalSequencer {
            let fs = SimFs::new();
            let config = LocalConfig {
                retention: Duration::ZERO,
                ..config()
            };
            let (store, _) =
                LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config)
                    .unwrap();
            let big = "y".repeat(SEGMENT_SIZE_MIN as usize / 4);
            for seq in 1..=9 {
                let op = SubmitOp {
                    op_id: OpId {
                        client_id: 9,
                        local_seq: seq,
                    },
                    base_version: seq - 1,
                    expected_version: seq - 1,
                    expected_incarnation: None,
                    fingerprint: 0,
                    patches: vec![Patch::new(0, 0, big.clone())],
                };
                store.submit("doc", &op).unwrap();
                assert!(store.step());
            }
            assert_eq!(store.wal().active_segment(), 3);
            store
        }

        #[test]
        fn a_backup_pin_holds_truncation_back_until_released_or_expired() {
            let store = three_segments_of_one_document();
            let pin = |expires: Instant| {
                let id = store.shared.next_pin.fetch_add(1, Ordering::Relaxed);
                let first_segment = store
                    .wal()
                    .with_index(|i| *i.segments().keys().next().unwrap());
                store.shared.backup_pins.lock().unwrap().insert(
                    id,
                    crate::sequencer::state::BackupPin {
                        first_segment,
                        expires,
                    },
                );
                id
            };
            // Pinned from segment 1: the snapshot is written, nothing is removed.
            let held = pin(Instant::now() + Duration::from_secs(3600));
            assert_eq!(store.run_maintenance().unwrap(), 0);
            assert_eq!(store.wal().with_index(|i| i.segments().len()), 3);
            crate::sequencer::backup::end(&store.shared, held);
            // A pin whose lease ran out holds nothing (and cannot be renewed).
            let expired = pin(Instant::now());
            assert!(!crate::sequencer::backup::renew(
                &store.shared,
                expired,
                Duration::from_secs(60)
            ));
            assert_eq!(store.run_maintenance().unwrap(), 1);
            assert!(store.shared.backup_pins.lock().unwrap().is_empty());
        }

        /// A deletion whose tombstone the failed log never made durable stays under way
        /// until the restart (whether it holds is known only then): a backup begun
        /// meanwhile is refused saying so, not told to start again at once, and after the
        /// restart the backup is taken.
        #[test]
        fn a_backup_is_refused_while_a_deletion_is_stuck_in_a_failed_log_and_taken_after_the_restart(
        ) {
            use crate::backup::{BackupError, BackupSource, DocVersion};
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            submit(&store, 1);
            assert!(store.step());
            fs.fail_syncs_after(0);
            let deletion = store.delete("doc").unwrap().expect("the document exists");
            assert_eq!(deletion.version, 1);
            store.step();
            assert!(store.wal().failure().is_some());
            assert!(store.finish_delete("doc").is_err());
            let lease = Duration::from_secs(60);
            match store.begin_backup(Path::new("/staging/1"), lease) {
                Err(BackupError::DeletionUnderWay {
                    log_failed: Some(failure),
                }) => assert!(failure.contains("EIO"), "{failure}"),
                other => panic!("expected a refusal naming the failed log: {other:?}"),
            }
            assert!(store.shared.backup_pins.lock().unwrap().is_empty());
            drop(store);
            // The tombstone never reached the disk: the document is as it was.
            let (store, _) = open(&fs.crash(CrashMode::LoseUnsynced));
            let capture = store
                .begin_backup(Path::new("/staging/2"), lease)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                capture.docs,
                vec![DocVersion {
                    id: "doc".into(),
                    version: 1
                }]
            );
        }

        /// The snapshot files of `doc` in the store's directory.
        fn snapshot_files(store: &LocalSequencer, doc: &str) -> Vec<String> {
            let prefix = format!("{}.", snapshot_file_name(doc, 0).split('.').next().unwrap());
            store
                .shared
                .vfs
                .list(&store.shared.snapshot_dir)
                .unwrap()
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect()
        }

        fn read_doc(store: &LocalSequencer, doc: &str) -> Option<DocView> {
            store.read_now(doc, None).unwrap().map(|(view, _)| view)
        }

        #[test]
        fn a_deleted_document_stays_deleted_across_restarts_and_its_id_starts_anew() {
            let fs = SimFs::new();
            let (store, _) = open(&fs);
            // Ops 1..=4 of "doc" (a snapshot at 3), one of "other".
            for seq in 1..=4 {
                submit(&store, seq);
            }
            store.run_maintenance().unwrap();
            let other = OpId {
                client_id: 5,
                local_seq: 1,
            };
            store
                .submit(
                    "other",
                    &SubmitOp {
                        op_id: other,
                        base_version: 0,
                        expected_version: 0,
                        expected_incarnation: None,
                        fingerprint: 7,
                        patches: vec![Patch::new(0, 0, "kept")],
                    },
                )
                .unwrap();
            while store.step() {}
            assert_eq!(snapshot_files(&store, "doc").len(), 1);

            let deletion = store.delete("doc").unwrap().unwrap();
            assert_eq!(deletion.version, 4);
            // Gone at once: not listed, not read, version 0; a second delete gives the
            // same deletion while it is not finished.
            assert_eq!(store.version("doc"), 0);
            assert!(read_doc(&store, "doc").is_none());
            assert_eq!(store.read_at("doc", 2), Ok(None));
            let ids: Vec<String> = store
                .list_documents(None, 10)
                .iter()
                .map(|d| d.id.to_string())
                .collect();
            assert_eq!(ids, ["other"]);
            assert_eq!(store.delete("doc").unwrap(), Some(deletion));
            // An op racing the deletion (of a new document under the id) is refused, not
            // applied: told to retry, until the deletion is finished.
            let racing = || SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: 5,
                },
                base_version: 4,
                expected_version: 0,
                expected_incarnation: None,
                fingerprint: 0,
                patches: vec![Patch::new(0, 0, "lost")],
            };
            assert!(matches!(
                store.submit("doc", &racing()),
                Err(SubmitError::Unavailable(m)) if m.contains("whether")
            ));
            while !durable(&store, deletion.ticket) {
                assert!(store.step());
            }
            // Durable: a new document's op waits for the deletion to be finished.
            assert!(matches!(
                store.submit("doc", &racing()),
                Err(SubmitError::Unavailable(m)) if m.contains("being finished")
            ));
            // Finishing waits for the tombstone to be durable, then removes the snapshot
            // files.
            store.finish_delete("doc").unwrap();
            assert!(durable(&store, deletion.ticket));
            assert!(snapshot_files(&store, "doc").is_empty());
            assert_eq!(store.delete("doc").unwrap(), None);

            // A restart: still gone, the bystander intact.
            let crashed = fs.crash(CrashMode::LoseUnsynced);
            drop(store);
            let (store, report) = open(&crashed);
            assert_eq!(report.documents, 1);
            assert!(read_doc(&store, "doc").is_none());
            assert_eq!(store.version("doc"), 0);
            assert_eq!(read_doc(&store, "other").unwrap().text, "kept");

            // The id again: a new document from version 0. The old incarnation's op ids
            // are not duplicates in it (op 1 under the same id and fingerprint is new).
            let ticket = submit_patches(&store, 1, vec![Patch::new(0, 0, "new")]);
            assert!(store.step());
            assert!(durable(&store, ticket));
            assert_eq!(read_doc(&store, "doc").unwrap().text, "new");
            // Across a restart: the log holds old ops 1..=4, the tombstone, new op 1.
            let crashed = crashed.crash(CrashMode::LoseUnsynced);
            drop(store);
            let (store, _) = open(&crashed);
            let view = read_doc(&store, "doc").unwrap();
            assert_eq!((view.text.as_str(), view.version), ("new", 1));
            assert_eq!(store.ops_after("doc", 0, 10).unwrap().unwrap().len(), 1);
            // Its resend is known; the old incarnation's op 2 is not (a new op).
            let resend = SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: 1,
                },
                base_version: 0,
                expected_version: 1,
                expected_incarnation: None,
                fingerprint: 0,
                patches: vec![Patch::new(0, 0, "new")],
            };
            assert!(matches!(
                store.submit("doc", &resend),
                Ok(Submitted::Duplicate { seq: 1, .. })
            ));
            submit_patches(&store, 2, vec![Patch::new(3, 0, "er")]);
            assert_eq!(read_doc(&store, "doc").unwrap().text, "newer");
        }

        fn big_op(store: &LocalSequencer, doc: &str, seq: u64) {
            let op = SubmitOp {
                op_id: OpId {
                    client_id: 9,
                    local_seq: seq,
                },
                base_version: seq - 1,
                expected_version: seq - 1,
                expected_incarnation: None,
                fingerprint: 0,
                patches: vec![Patch::new(0, 0, "y".repeat(SEGMENT_SIZE_MIN as usize / 4))],
            };
            store.submit(doc, &op).unwrap();
            assert!(store.step());
        }

        #[test]
        fn a_tombstone_outlives_what_it_cancels_through_truncation_and_restarts() {
            let fs = SimFs::new();
            let config = LocalConfig {
                retention: Duration::ZERO,
                snapshot_every_ops: u64::MAX,
                ..config()
            };
            let open = |fs: &SimFs| {
                LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config.clone())
                    .unwrap()
                    .0
            };
            let store = open(&fs);
            for seq in 1..=5 {
                big_op(&store, "doc", seq);
            }
            assert!(store.snapshot_now("doc").unwrap());
            assert_eq!(store.delete("doc").unwrap().unwrap().version, 5);
            assert!(store.step());
            let holding = store.wal().active_segment();
            assert!(holding > 1);
            // Not finished (a crash before its snapshot file went): whatever else goes,
            // the segment holding the tombstone stays.
            let mut seq = 0;
            for _ in 0..3 {
                for _ in 0..4 {
                    seq += 1;
                    big_op(&store, "other", seq);
                }
                store.snapshot_now("other").unwrap();
                store.run_maintenance().unwrap();
            }
            let first = || {
                store
                    .wal()
                    .with_index(|i| *i.segments().keys().next().unwrap())
            };
            assert_eq!(first(), holding, "older segments go, the tombstone's stays");
            assert_eq!(snapshot_files(&store, "doc").len(), 1);
            let crashed = fs.crash(CrashMode::LoseUnsynced);
            drop(store);
            // Recovery replays the tombstone over the snapshot and removes the file.
            let store = open(&crashed);
            assert!(read_doc(&store, "doc").is_none());
            assert!(snapshot_files(&store, "doc").is_empty());
            assert_eq!(store.version("other"), seq);
            // Now the tombstone's segment may go too; restarted after, still gone.
            for _ in 0..3 {
                for _ in 0..4 {
                    seq += 1;
                    big_op(&store, "other", seq);
                }
                store.snapshot_now("other").unwrap();
                store.run_maintenance().unwrap();
            }
            assert!(
                store
                    .wal()
                    .with_index(|i| *i.segments().keys().next().unwrap())
                    > holding
            );
            let crashed = crashed.crash(CrashMode::LoseUnsynced);
            drop(store);
            let store = open(&crashed);
            assert!(read_doc(&store, "doc").is_none());
            assert_eq!(store.list_documents(None, 10).len(), 1);
            assert_eq!(store.version("other"), seq);
        }

        #[test]
        fn manual_maintenance_truncates_what_snapshots_cover() {
            let store = three_segments_of_one_document();
            // The third op asked for a snapshot (no op asks again while it waits), taken
            // at seq 9; the pass then removes segment 1 (the newest sealed one, 2, stays).
            assert_eq!(store.maintenance_pending(), 1);
            assert_eq!(store.run_maintenance().unwrap(), 1);
            assert_eq!(
                store.wal().with_index(|i| i.first_retained_seq("doc")),
                Some(4)
            );
        }
    }

    #[test]
    fn replay_on_two_threads_gives_every_document_what_one_thread_gives() {
        let payloads = payloads(50, 200, None);
        let ops = segment_ops(&payloads);
        let order = grouped(&ops);
        assert!(order.len() >= PARALLEL_REPLAY_MIN_OPS);
        let (mut one, mut two) = (states(50), states(50));
        let alone = replay_segment(&ops, &order, &mut one, 1).unwrap();
        let split = replay_segment(&ops, &order, &mut two, 2).unwrap();
        assert_eq!((alone.replayed, split.replayed), (10_000, 10_000));
        assert!(first_inconsistency(&one).is_none() && first_inconsistency(&two).is_none());
        for ((id, a), (_, b)) in one.iter().zip(&two) {
            assert_eq!(a.version, 200, "{id}");
            let len = |state: &DocState| match &state.text {
                DocText::Deferred(deferred) => (deferred.len_chars, deferred.bytes_max),
                DocText::Built(_) => panic!("{id}: replay builds no text"),
            };
            assert_eq!(len(a), len(b), "{id}");
            assert_eq!(a.dedupe.newest(), b.dedupe.newest(), "{id}");
        }
    }

    #[test]
    fn replay_on_two_threads_reports_the_first_gap_by_lsn_whichever_half_has_it() {
        // Document 40 (second half) misses seq 3, document 2 (first half) nothing; then
        // document 3 also misses seq 5, later in the log: 40's gap comes first by LSN.
        let mut payloads = payloads(50, 200, Some((40, 3)));
        let late = payloads.iter().position(|p| {
            let op = OpView::decode(RecordType::OpWithFingerprint, p).unwrap();
            op.doc_id == "d3" && op.server_seq == 5
        });
        payloads.remove(late.unwrap());
        let ops = segment_ops(&payloads);
        let order = grouped(&ops);
        let (mut one, mut two) = (states(50), states(50));
        replay_segment(&ops, &order, &mut one, 1).unwrap();
        replay_segment(&ops, &order, &mut two, 2).unwrap();
        let (single, split) = (one, two);
        let message = |r: &[(Arc<str>, DocState)]| first_inconsistency(r).unwrap().1;
        assert!(message(&split).contains("\"d40\""), "{}", message(&split));
        assert_eq!(message(&single), message(&split));
    }

    /// Startup on threads (the scan checks each segment's records on a thread of its
    /// own, a chunk ahead of the decode, and replays on two) and without them builds
    /// the same documents from the same log, torn or corrupted.
    mod threaded_scan {
        use super::*;
        use crate::wal::record::encode_frame;
        use crate::wal::segment::{segment_path, SegmentHeader};
        use crate::wal::vfs::sim::{CrashMode, SimFs};
        use crate::wal::WalConfig;

        const SEGMENT: usize = 4 << 20;

        fn config(background: Background) -> LocalConfig {
            LocalConfig {
                wal: WalConfig {
                    segment_size: SEGMENT as u64,
                    background,
                    ..WalConfig::default()
                },
                snapshot_every_ops: u64::MAX,
                snapshot_every: Duration::from_secs(3600),
                retention: Duration::from_secs(3600),
                maintenance_interval: Duration::from_secs(3600),
            }
        }

        /// 24 documents of 600 ops each (client `d % 7`), in two segments, each
        /// record a write of its own; with the offset of each segment's records.
        fn log() -> Vec<(Vec<u8>, Vec<usize>)> {
            let records = payloads(24, 600, None);
            let split = 8_000;
            let mut segments = Vec::new();
            for (i, part) in [&records[..split], &records[split..]]
                .into_iter()
                .enumerate()
            {
                let first_lsn = if i == 0 { 1 } else { split as u64 + 1 };
                let mut bytes = SegmentHeader {
                    segment_id: i as u64 + 1,
                    first_lsn,
                    created_ms: 0,
                }
                .encode()
                .to_vec();
                let mut offsets = Vec::new();
                for (k, payload) in part.iter().enumerate() {
                    let lsn = first_lsn + k as u64;
                    offsets.push(bytes.len());
                    encode_frame(&mut bytes, lsn, 0, RecordType::OpWithFingerprint, payload);
                }
                bytes.resize(SEGMENT, 0);
                segments.push((bytes, offsets));
            }
            segments
        }

        /// The segments on a simulated disk, synced.
        fn disk(segments: &[(Vec<u8>, Vec<usize>)]) -> SimFs {
            let fs = SimFs::new();
            let wal = Path::new("/data/wal");
            fs.create_dir_all(wal).unwrap();
            for (i, (bytes, _)) in segments.iter().enumerate() {
                let file = fs.create(&segment_path(wal, i as u64 + 1)).unwrap();
                file.write_all_at(bytes, 0).unwrap();
                file.sync_all().unwrap();
            }
            fs.sync_dir(wal).unwrap();
            fs
        }

        /// What opening a copy of `fs` gives: the startup report (its time left out)
        /// and every document's version, dedupe table, text and LSN; or the error.
        fn open_copy(fs: &SimFs, background: Background) -> String {
            let copy = fs.crash(CrashMode::LoseUnsynced);
            let (store, report) = match LocalSequencer::open_with(
                Arc::new(copy),
                Path::new("/data"),
                config(background),
            ) {
                Ok(opened) => opened,
                Err(e) => return format!("error: {e}"),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let mut ids = store.doc_ids();
            ids.sort();
            let mut found = format!(
                "{:?}\n",
                StartupReport {
                    elapsed: Duration::ZERO,
                    ..report
                }
            );
            for id in ids {
                let text = rt.block_on(store.read(&id)).unwrap().unwrap().text;
                let doc = store.doc(&id).unwrap();
                let state = lock_doc(&doc);
                found += &format!(
                    "{id}: version {}, last LSN {}, dedupe {:?}, text {text:?}\n",
                    state.version,
                    state.last_lsn,
                    state.dedupe_entries()
                );
            }
            store.close();
            found
        }

        #[test]
        fn startup_with_threads_and_without_builds_the_same_documents() {
            let clean = log();
            // The last segment ends inside a record: a torn tail.
            let mut torn = clean.clone();
            let at = torn[1].1[3_000] + 50;
            torn[1].0.truncate(at);
            // A flipped bit in the first segment, records of later writes after it.
            let mut corrupt = clean.clone();
            let at = corrupt[0].1[2_000] + 40;
            corrupt[0].0[at] ^= 8;
            for (name, segments) in [("clean", clean), ("torn", torn), ("corrupt", corrupt)] {
                let fs = disk(&segments);
                let threads = open_copy(&fs, Background::Threads);
                let manual = open_copy(&fs, Background::Manual);
                if threads != manual {
                    let line = threads.lines().zip(manual.lines()).find(|(a, b)| a != b);
                    panic!("{name}: startups differ, first in {line:?}");
                }
                match name {
                    "clean" => assert!(
                        threads.contains("ops_replayed: 14400")
                            && threads.contains("d23: version 600"),
                        "{threads}"
                    ),
                    "torn" => assert!(threads.contains("tail_cut: Some("), "{threads}"),
                    _ => assert!(
                        threads.starts_with("error:") && threads.contains("later write"),
                        "{threads}"
                    ),
                }
            }
        }
    }
}
