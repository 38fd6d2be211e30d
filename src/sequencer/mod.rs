//! The sequencing seam: "assign the next seq and persist" for one document.
//!
//! The server (the document layer) transforms a late op to the current version, then
//! hands it to a [`Sequencer`], which assigns the seq, applies it to the document's
//! authoritative state, persists it and says when it is durable. The local WAL is one
//! implementation ([`local::LocalSequencer`]); a replicated sequencer (a consensus
//! group running the same per-document state machine) can replace it without the
//! server changing.

mod backup;
pub mod client_ids;
pub mod cluster;
mod dedupe;
pub mod local;
mod maintenance;
mod state;

pub use dedupe::{Dedupe, Seen};

use std::future::Future;
use std::sync::Arc;

use crate::op::{OpId, Patch, SequencedOp};
use crate::text::ApplyError;

/// An op ready to be sequenced: already transformed to apply on the document's
/// current version (`expected_version`).
#[derive(Debug, Clone)]
pub struct SubmitOp {
    pub op_id: OpId,
    /// The version the client made the op against (kept in the log for reference).
    pub base_version: u64,
    /// The version the patches apply to. A resend of an applied op is answered as such
    /// whatever this says; a new op made for another version than the document's is
    /// refused with [`SubmitError::VersionMismatch`]. The server's copy of a document
    /// sequences every op of it under its lock, so for the server a mismatch means the
    /// sequencer reloaded the document under that copy (cluster mode), and the op goes
    /// to where the document is now.
    pub expected_version: u64,
    /// The load of the document the patches were transformed for
    /// ([`Sequencer::incarnation`]), if the caller holds a copy of it (the server does;
    /// `None`: any load). A sequencer serving another load refuses the op, a resend
    /// too, with [`SubmitError::Moved`] to itself, checked atomically with the version:
    /// the copy belongs to a load that ended (its version can match the new load's while
    /// the ops before it differ), and its clients open the document again. A single
    /// node never reloads a document (its load is always 0) and ignores it.
    pub expected_incarnation: Option<u64>,
    /// A digest of the op as the client sent it (its base version and patches): a
    /// resend under the same id must match it, or it is a different op (refused).
    pub fingerprint: u64,
    pub patches: Vec<Patch>,
}

/// The digest of an op as its client sent it, for [`SubmitOp::fingerprint`]. The log and
/// snapshots keep it (`wal-format.md`), so it is a fixed function, the same in every
/// build and release: the first 8 bytes, read as a little-endian u64, of the SHA-256 of
/// `base_version u64 LE, patch_count u32 LE, then per patch pos u32 LE, del u32 LE,
/// ins_len u32 LE (bytes), ins (UTF-8)`. (Not `std`'s `DefaultHasher`, whose algorithm
/// may change between Rust releases: a fingerprint that changed under an upgrade would
/// refuse every true resend of an op made before it.)
pub fn fingerprint(base_version: u64, patches: &[Patch]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(base_version.to_le_bytes());
    hasher.update((patches.len() as u32).to_le_bytes());
    for patch in patches {
        hasher.update(patch.pos.to_le_bytes());
        hasher.update(patch.del.to_le_bytes());
        hasher.update((patch.ins.len() as u32).to_le_bytes());
        hasher.update(patch.ins.as_bytes());
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

/// Ops of one client remembered per document for answering resends: a client has at
/// most this many ops in flight (`protocol::MAX_OPS_IN_FLIGHT`), so a true resend is
/// always among them.
pub const RECENT_OPS_PER_CLIENT: usize = crate::protocol::MAX_OPS_IN_FLIGHT;

/// A handle to wait on for durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Applied as `seq`; acknowledge after `ticket` is durable.
    Applied { seq: u64, ticket: Ticket },
    /// The same op was applied before, as `seq`. Acknowledge after `ticket` is durable,
    /// as for the original.
    Duplicate { seq: u64, ticket: Ticket },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The patches do not apply to the document (a bad position or length).
    Invalid(ApplyError),
    VersionMismatch {
        expected: u64,
        actual: u64,
    },
    /// The storage failed; nothing more will be acknowledged.
    Storage(Arc<str>),
    /// The op does not fit in a log record.
    TooLarge(String),
    InvalidDocId(String),
    /// The op id was used before for a different op (or for an op this server cannot
    /// match: below the client's newest and not among its recent ones).
    OpIdReused(String),
    /// The document was deleted (or is being deleted): nothing was applied.
    Deleted(String),
    /// The document cannot take the op now, for a while (its deletion's outcome is not
    /// known yet): nothing was applied; the client retries later.
    Unavailable(String),
    /// Another node serves the document now (cluster mode: this node lost it, or is
    /// draining): nothing was applied, and nothing more of it is acknowledged here. The
    /// session sends `Redirect` (protocol.md), not an ack or a reject: the client
    /// resends the op under the same id at `Owner`.
    Moved(Owner),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Invalid(e) => write!(f, "{e}"),
            SubmitError::VersionMismatch { expected, actual } => write!(
                f,
                "op was transformed to version {expected} but the document is at {actual}"
            ),
            SubmitError::Storage(reason) => write!(f, "storage failed: {reason}"),
            SubmitError::Moved(owner) => write!(f, "the document moved to {}", owner.addr),
            SubmitError::TooLarge(m)
            | SubmitError::InvalidDocId(m)
            | SubmitError::OpIdReused(m)
            | SubmitError::Deleted(m)
            | SubmitError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// The node that serves a document, as a client reaches it: what a `Redirect` carries
/// (protocol.md). Cheap to clone (a session sends it to each of its subscribers).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `host:port` of its TCP client listener.
    pub addr: Arc<str>,
    /// Its WebSocket URL (`ws://host:port/ws`), empty if it serves none.
    pub ws_url: Arc<str>,
}

/// Where a document is served, as [`Sequencer::route`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node serves it: sequence its ops here.
    Here,
    /// Another node does: the client is redirected there.
    Elsewhere(Owner),
}

/// Why [`Sequencer::route`] cannot say where a document is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No node serves it right now (its owner is not known or not reachable, or it is
    /// being handed over): the client retries later (protocol.md, code 33).
    Unavailable(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// What the storage under a sequencer reports, for metrics and readiness: read at
/// scrape time, so that instrumenting the log costs the write path nothing more.
#[derive(Debug, Clone, Default)]
pub struct StorageStats {
    /// Why the log stopped accepting writes, once it has (an fsync or write error).
    pub failure: Option<Arc<str>>,
    /// Why the log's next segment cannot be prepared (a full disk, most often): the log
    /// fails when the current one is full, unless space returns first.
    pub next_segment_warning: Option<String>,
    /// Whether the log's next segment is prepared (zero-filled, synced) and waiting: the
    /// active one rolls over to it without a wait.
    pub next_segment_prepared: bool,
    pub records_written: u64,
    pub bytes_written: u64,
    pub batches: u64,
    /// `fdatasync` latency, seconds.
    pub fsync_seconds: crate::wal::stats::Distribution,
    /// Records per group-commit batch.
    pub batch_records: crate::wal::stats::Distribution,
    /// Records appended and not yet taken by the writer.
    pub queue_depth: u64,
    pub snapshots_written: u64,
    /// Time to write one snapshot file, seconds.
    pub snapshot_seconds: crate::wal::stats::Distribution,
    pub segments_truncated: u64,
}

/// A document as listed: its id, version and length (code points).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocSummary {
    pub id: Arc<str>,
    pub version: u64,
    pub chars: u64,
}

/// Why [`Sequencer::read_at`] could not give a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAtError {
    /// The version is newer than the document's newest durable one.
    Future { newest: u64 },
    /// The ops up to it were truncated away; `oldest` is the oldest version available.
    NotRetained { oldest: u64 },
    /// The storage failed to read it.
    Storage(Arc<str>),
}

impl std::fmt::Display for ReadAtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadAtError::Future { newest } => {
                write!(f, "the document's newest durable version is {newest}")
            }
            ReadAtError::NotRetained { oldest } => write!(
                f,
                "the ops up to that version were truncated; the oldest version available is \
                 {oldest}"
            ),
            ReadAtError::Storage(e) => write!(f, "{e}"),
        }
    }
}

/// What [`Sequencer::delete`] did: the document's tombstone is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    /// The version the document was deleted at (the seq of its last op).
    pub version: u64,
    /// The tombstone's ticket: the deletion holds once it is durable.
    pub ticket: Ticket,
}

/// Why [`Sequencer::delete`] deleted nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteRefused {
    /// Not now, nothing being wrong with the document or the storage (cluster mode: the
    /// document is moving, or no thread could be had for its erasure): retry.
    Unavailable(Arc<str>),
    /// The storage failed (the log), or cannot delete documents.
    Failed(Arc<str>),
}

impl std::fmt::Display for DeleteRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeleteRefused::Unavailable(m) | DeleteRefused::Failed(m) => f.write_str(m),
        }
    }
}

/// A document's state as of a durable version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocView {
    pub text: String,
    pub version: u64,
}

/// Assign seq and persist. Per document, calls to `submit` are serialised by the
/// implementation; the returned seqs are consecutive. Callers are generic over it
/// (static dispatch: no allocation per op on the hot path).
pub trait Sequencer: Send + Sync + 'static {
    /// This node, as a client reaches it, if documents can move between nodes (cluster
    /// mode); `None` for a single node. The server redirects a document's sessions here
    /// when its state and the sequencer's disagree: the sequencer reloaded the document
    /// under it (a tenure ended and began anew), so the server's copy is stale and its
    /// clients must open the document again.
    fn here(&self) -> Option<Owner> {
        None
    }

    /// Which load of `doc_id` the sequencer serves now: 0 for a single node (a document
    /// is never reloaded under the server); in cluster mode a number of its tenure, new
    /// each time the document is loaded from the store. The server's copy of a document
    /// remembers the one it was opened under and is replaced when it differs: its
    /// history and pending ops belong to a load that ended.
    fn incarnation(&self, doc_id: &str) -> u64 {
        let _ = doc_id;
        0
    }

    /// Whether this node serves `doc_id` (cluster mode: one owner node per document),
    /// asked when a session opens the document (and on other requests about a document
    /// the session does not have open), never per op: once a document is open, the
    /// sequencer says it moved by refusing a submit with [`SubmitError::Moved`], or the
    /// server is told ([`crate::server::Server::redirect_document`]). Async, because a
    /// cluster implementation may have to claim the document first (a round trip to its
    /// coordination store); it must never block the calling worker. The default serves
    /// every document here (a single node), at the cost of a ready future.
    fn route(&self, doc_id: &str) -> impl Future<Output = Result<Route, RouteError>> + Send {
        let _ = doc_id;
        std::future::ready(Ok(Route::Here))
    }

    /// What the storage reports for metrics and readiness.
    fn storage_stats(&self) -> StorageStats;

    /// Up to `limit` documents in id order, after `after` (exclusive) if given: a page
    /// of the documents this sequencer holds, each with its newest sequenced version
    /// (as [`Sequencer::version`]: durable or not, and in cluster mode journaled or not).
    fn list_documents(&self, after: Option<&str>, limit: usize) -> Vec<DocSummary>;

    /// `doc_id` as of version `seq` (durable), while the storage still holds what it
    /// takes: `Ok(None)` for a document it does not hold, an error naming the oldest
    /// version available for one truncated away. Blocking (reads the log).
    fn read_at(&self, doc_id: &str, seq: u64) -> Result<Option<DocView>, ReadAtError>;
    /// The storage's online backup, if it has one (the admin endpoint's `/backup`).
    fn backup_source(&self) -> Option<&dyn crate::backup::BackupSource> {
        None
    }

    /// Deletes `doc_id`: appends its tombstone (`wal-format.md`, record type 3) and
    /// forgets the document at once (it is no longer listed or read; a submit to it is
    /// refused until [`Sequencer::finish_delete`]: [`SubmitError::Unavailable`] while the
    /// tombstone is not durable, then [`SubmitError::Deleted`] for an op of the deleted
    /// document and `Unavailable` for one of a new document under the id).
    /// `Ok(None)`: no such document. Deleting a document being deleted gives the first
    /// deletion again. The deletion holds once the ticket is durable; then call
    /// [`Sequencer::finish_delete`]. Blocking (the append may wait for the log).
    fn delete(&self, doc_id: &str) -> Result<Option<Deletion>, DeleteRefused> {
        let _ = doc_id;
        Err(DeleteRefused::Failed(Arc::from(
            "this storage cannot delete documents",
        )))
    }

    /// Completes a deletion once its tombstone is durable: removes the document's
    /// snapshot files, after which its id may be used again for a new, empty document.
    /// Blocking (file removals and a directory sync).
    fn finish_delete(&self, doc_id: &str) -> Result<(), Arc<str>> {
        let _ = doc_id;
        Ok(())
    }

    /// Sequences `op` on `doc_id` (creating the document at version 0 if new).
    /// Borrowed: the caller keeps the patches (a server broadcasts them once durable).
    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError>;

    /// If `op_id` was already used on `doc_id`, what [`Sequencer::submit`] would answer
    /// for it: a [`Submitted::Duplicate`] for a true resend (same `fingerprint`), or
    /// [`SubmitError::OpIdReused`]. Checked before an op is transformed: a retry is
    /// answered from the dedupe table however old its base version is.
    fn applied(
        &self,
        doc_id: &str,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>>;

    /// A client id never given before, for a client that asked for one (`Hello` with
    /// client id 0). Blocking (now and then it writes and syncs a file): call it off
    /// the async workers.
    fn assign_client_id(&self) -> Result<u64, Arc<str>>;

    /// The document's version: the seq of its newest op, durable or not (0: no ops).
    fn version(&self, doc_id: &str) -> u64;

    /// Resolves once everything up to `ticket` is durable (or the storage failed).
    fn wait_durable(&self, ticket: Ticket) -> impl Future<Output = Result<(), Arc<str>>> + Send;

    /// [`Sequencer::wait_durable`] for the ticket of a [`Deletion`]: resolves once the
    /// deletion holds, or says why not: [`DeleteRefused::Unavailable`] if nothing was
    /// deleted and asking again may succeed (cluster mode: the document moved, or its
    /// journal writes did not resolve), [`DeleteRefused::Failed`] otherwise (the storage
    /// failed, or whether it was deleted is not known).
    fn wait_deleted(
        &self,
        ticket: Ticket,
    ) -> impl Future<Output = Result<(), DeleteRefused>> + Send {
        let durable = self.wait_durable(ticket);
        async move { durable.await.map_err(DeleteRefused::Failed) }
    }

    /// The document's text and version now, and the ticket of its newest op: the view
    /// holds only durable ops once [`Sequencer::wait_durable`] says so for that ticket.
    /// `Ok(None)` if the document has no ops and no snapshot; an error if the storage
    /// failed (never an empty document in its place). Blocking: it copies the text, and
    /// the local sequencer builds a document's text from the log on its first use after
    /// a restart; call it off the async workers.
    ///
    /// `reader` is the client id of the session that reads (`None`: not a client, such
    /// as an administrator's read). **After the log failed**, a document holding ops that
    /// never became durable is read as of its newest durable op, except by a client
    /// with such an op: the view's ticket then fails. Those ops may still be found in
    /// the log after a restart (written, not synced), and a client's ops are taken to
    /// be made on top of its earlier ones (protocol.md, Pipelining): a view without its
    /// own op would make its next op's meaning differ between it and the server.
    fn read_now(
        &self,
        doc_id: &str,
        reader: Option<u64>,
    ) -> Result<Option<(DocView, Ticket)>, Arc<str>>;

    /// [`Sequencer::read_now`] (as no client), then waits until the view is durable
    /// (blocking the calling thread for the first part: for tests and tools).
    fn read(&self, doc_id: &str) -> impl Future<Output = Result<Option<DocView>, Arc<str>>> + Send {
        let now = self.read_now(doc_id, None);
        async move {
            let Some((view, ticket)) = now? else {
                return Ok(None);
            };
            // Everything in the view is durable once its newest op is; if the log failed
            // first, the view may hold ops that never became durable: an error.
            self.wait_durable(ticket).await?;
            Ok(Some(view))
        }
    }

    /// Up to `limit` durable ops of `doc_id` after `after_seq`, in seq order, if the
    /// log still holds them (`Ok(None)`: truncated; start from [`Sequencer::read`]).
    /// Durable as an acknowledgement means it (in cluster mode: in the journal too):
    /// a client takes its own op in a catch-up as acknowledged.
    /// Blocking (it reads the log): call it off the async workers.
    fn ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Option<Vec<SequencedOp>>, Arc<str>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_the_documented_function_and_tells_ops_apart() {
        // Pinned: the log and snapshots keep fingerprints, so this value must never
        // change (it is SHA-256 of the bytes wal-format.md lists, its first 8 bytes LE).
        let patches = [Patch::new(3, 1, "h\u{e9}"), Patch::new(0, 0, "")];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(&2u32.to_le_bytes());
        for (pos, del, ins) in [(3u32, 1u32, "h\u{e9}"), (0, 0, "")] {
            bytes.extend_from_slice(&pos.to_le_bytes());
            bytes.extend_from_slice(&del.to_le_bytes());
            bytes.extend_from_slice(&(ins.len() as u32).to_le_bytes());
            bytes.extend_from_slice(ins.as_bytes());
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&bytes);
        let expected = u64::from_le_bytes(digest[..8].try_into().unwrap());
        assert_eq!(fingerprint(7, &patches), expected);
        assert_eq!(fingerprint(7, &patches), 0xe7ab_775c_9973_a88a);
        assert_ne!(fingerprint(8, &patches), expected);
        assert_ne!(fingerprint(7, &patches[..1]), expected);
        assert_ne!(
            fingerprint(7, &[Patch::new(3, 1, "h"), Patch::new(0, 0, "\u{e9}")]),
            expected
        );
    }
}
