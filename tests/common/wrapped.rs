//! A sequencer for tests: the real [`LocalSequencer`], with a test's own rules asked
//! first where it has some (where a document is served, what a submit gets, whether a
//! read fails). Every other call goes to the store as it is.

use std::future::Future;
use std::sync::Arc;

use quire::op::{OpId, SequencedOp};
use quire::sequencer::local::LocalSequencer;
use quire::sequencer::{
    DocSummary, DocView, ReadAtError, Route, RouteError, Sequencer, StorageStats, SubmitError,
    SubmitOp, Submitted, Ticket,
};

/// What a test changes of the store's answers; each default is the store's own.
pub trait Rules: Send + Sync + 'static {
    /// Where `doc_id` is served (the default: here, as for a single node).
    fn route(&self, doc_id: &str) -> impl Future<Output = Result<Route, RouteError>> + Send {
        let _ = doc_id;
        std::future::ready(Ok(Route::Here))
    }

    /// A submit, given the store to pass it to.
    fn submit(
        &self,
        store: &LocalSequencer,
        doc_id: &str,
        op: &SubmitOp,
    ) -> Result<Submitted, SubmitError> {
        store.submit(doc_id, op)
    }

    /// Asked before each read of a document's text or ops (`read_now`, `ops_after`):
    /// an error fails the read.
    fn before_read(&self, doc_id: &str) -> Result<(), Arc<str>> {
        let _ = doc_id;
        Ok(())
    }
}

/// The store, under `rules`.
pub struct Wrapped<R> {
    pub store: Arc<LocalSequencer>,
    pub rules: R,
}

impl<R: Rules> Sequencer for Wrapped<R> {
    fn route(&self, doc_id: &str) -> impl Future<Output = Result<Route, RouteError>> + Send {
        self.rules.route(doc_id)
    }
    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        self.rules.submit(&self.store, doc_id, op)
    }
    fn storage_stats(&self) -> StorageStats {
        self.store.storage_stats()
    }
    fn list_documents(&self, after: Option<&str>, limit: usize) -> Vec<DocSummary> {
        self.store.list_documents(after, limit)
    }
    fn read_at(&self, doc_id: &str, seq: u64) -> Result<Option<DocView>, ReadAtError> {
        self.store.read_at(doc_id, seq)
    }
    fn applied(
        &self,
        doc_id: &str,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>> {
        self.store.applied(doc_id, op_id, fingerprint)
    }
    fn assign_client_id(&self) -> Result<u64, Arc<str>> {
        self.store.assign_client_id()
    }
    fn version(&self, doc_id: &str) -> u64 {
        self.store.version(doc_id)
    }
    fn wait_durable(&self, ticket: Ticket) -> impl Future<Output = Result<(), Arc<str>>> + Send {
        self.store.wait_durable(ticket)
    }
    fn read_now(
        &self,
        doc_id: &str,
        reader: Option<u64>,
    ) -> Result<Option<(DocView, Ticket)>, Arc<str>> {
        self.rules.before_read(doc_id)?;
        self.store.read_now(doc_id, reader)
    }
    fn ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Option<Vec<SequencedOp>>, Arc<str>> {
        self.rules.before_read(doc_id)?;
        self.store.ops_after(doc_id, after_seq, limit)
    }
}
