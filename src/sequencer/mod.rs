//! The sequencing seam: "assign the next seq and persist" for one document.
//!
//! The server (the document layer) transforms a late op to the current version, then
//! hands it to a [`Sequencer`], which assigns the seq, applies it to the document's
//! authoritative state, persists it and says when it is durable. The local WAL is one
//! implementation ([`local::LocalSequencer`]); a replicated sequencer (a consensus
//! group running the same per-document state machine) can replace it without the
//! server changing.

pub mod local;
mod maintenance;

use std::future::Future;
use std::sync::Arc;

use crate::op::{OpId, Patch};
use crate::text::ApplyError;
use crate::wal::record::OpRecord;

/// An op ready to be sequenced: already transformed to apply on the document's
/// current version (`expected_version`).
#[derive(Debug, Clone)]
pub struct SubmitOp {
    pub op_id: OpId,
    /// The version the client made the op against (kept in the log for reference).
    pub base_version: u64,
    /// The version the patches apply to. If the document moved on meanwhile, the
    /// submit is refused with [`SubmitError::VersionMismatch`] and the caller
    /// transforms again.
    pub expected_version: u64,
    pub patches: Vec<Patch>,
}

/// A handle to wait on for durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Applied as `seq`; acknowledge after `ticket` is durable.
    Applied { seq: u64, ticket: Ticket },
    /// The op was applied before. `seq` is its seq when known (the client's latest op);
    /// for an older retry only the fact that it was applied is known. Acknowledge after
    /// `ticket` is durable, as for the original.
    Duplicate { seq: Option<u64>, ticket: Ticket },
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
            SubmitError::TooLarge(m) | SubmitError::InvalidDocId(m) => f.write_str(m),
        }
    }
}

/// A document's state as of a durable version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocView {
    pub text: String,
    pub version: u64,
}

/// Assign seq and persist. Per document, calls to `submit` are serialised by the
/// implementation; the returned seqs are consecutive. Callers are generic over it
/// (static dispatch: no allocation per op on the hot path).
pub trait Sequencer: Send + Sync + 'static {
    /// Sequences `op` on `doc_id` (creating the document at version 0 if new).
    fn submit(&self, doc_id: &str, op: SubmitOp) -> Result<Submitted, SubmitError>;

    /// If `op_id` was already applied to `doc_id`, what [`Sequencer::submit`] would answer
    /// for it (a [`Submitted::Duplicate`]). Checked before an op is transformed: a retry
    /// is answered from the dedupe table however old its base version is.
    fn applied(&self, doc_id: &str, op_id: OpId) -> Option<Submitted>;

    /// Resolves once everything up to `ticket` is durable (or the storage failed).
    fn wait_durable(&self, ticket: Ticket) -> impl Future<Output = Result<(), Arc<str>>> + Send;

    /// The document's text and version, including only durable ops. `None` if the
    /// document has no ops and no snapshot.
    fn read(&self, doc_id: &str) -> impl Future<Output = Option<DocView>> + Send;

    /// Up to `limit` ops of `doc_id` after `after_seq`, if the log still holds them
    /// (`None`: truncated; the caller must start from [`Sequencer::read`]).
    fn ops_after(&self, doc_id: &str, after_seq: u64, limit: usize) -> Option<Vec<OpRecord>>;
}
