//! A sequencer for tests: a real one (the local sequencer, a cluster node), with a test's
//! own rules asked first where it has some (where a document is served, which load of it
//! is served, what a submit or a deletion gets, whether a read fails). Every other call
//! goes to the sequencer as it is: a method the trait gains is forwarded here, once,
//! rather than falling back to the trait's default in each test's own wrapper.
//!
//! Used by the integration tests (`mod common`) and by the simulator (`tests/sim/`,
//! which includes this file by its path).

use std::future::Future;
use std::sync::Arc;

use quire::backup::BackupSource;
use quire::op::{OpId, SequencedOp};
use quire::sequencer::{
    DeleteRefused, Deletion, DocSummary, DocView, Owner, ReadAtError, Route, RouteError, Sequencer,
    StorageStats, SubmitError, SubmitOp, Submitted, Ticket,
};

/// What a test changes of a sequencer's answers; each default is the sequencer's own.
pub trait Rules<S: Sequencer>: Send + Sync + 'static {
    /// This node, as a client reaches it (`None`: a single node).
    fn here(&self, store: &S) -> Option<Owner> {
        store.here()
    }

    /// Which load of `doc_id` is served now.
    fn incarnation(&self, store: &S, doc_id: &str) -> u64 {
        store.incarnation(doc_id)
    }

    /// Where `doc_id` is served.
    fn route(
        &self,
        store: &S,
        doc_id: &str,
    ) -> impl Future<Output = Result<Route, RouteError>> + Send {
        store.route(doc_id)
    }

    /// A submit, given the sequencer to pass it to.
    fn submit(&self, store: &S, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        store.submit(doc_id, op)
    }

    /// A deletion, given the sequencer to pass it to.
    fn delete(&self, store: &S, doc_id: &str) -> Result<Option<Deletion>, DeleteRefused> {
        store.delete(doc_id)
    }

    /// Asked before each read of a document's text or ops (`read_now`, `ops_after`, and
    /// so `read`): an error fails the read.
    fn before_read(&self, doc_id: &str) -> Result<(), Arc<str>> {
        let _ = doc_id;
        Ok(())
    }
}

/// The sequencer `store`, under `rules`.
pub struct Wrapped<S, R> {
    pub store: Arc<S>,
    pub rules: R,
}

impl<S: Sequencer, R: Rules<S>> Sequencer for Wrapped<S, R> {
    fn here(&self) -> Option<Owner> {
        self.rules.here(&self.store)
    }
    fn incarnation(&self, doc_id: &str) -> u64 {
        self.rules.incarnation(&self.store, doc_id)
    }
    fn route(&self, doc_id: &str) -> impl Future<Output = Result<Route, RouteError>> + Send {
        self.rules.route(&self.store, doc_id)
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
    fn backup_source(&self) -> Option<&dyn BackupSource> {
        self.store.backup_source()
    }
    fn delete(&self, doc_id: &str) -> Result<Option<Deletion>, DeleteRefused> {
        self.rules.delete(&self.store, doc_id)
    }
    fn finish_delete(&self, doc_id: &str) -> Result<(), Arc<str>> {
        self.store.finish_delete(doc_id)
    }
    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        self.rules.submit(&self.store, doc_id, op)
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
    fn wait_deleted(
        &self,
        ticket: Ticket,
    ) -> impl Future<Output = Result<(), DeleteRefused>> + Send {
        self.store.wait_deleted(ticket)
    }
    // `read` is the trait's own: its read goes through `read_now` below, and so through
    // the rules' `before_read`.
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
