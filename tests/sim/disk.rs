//! The sequencer as the simulated server sees it: the real [`LocalSequencer`], with a
//! disk task told when there is something to write (a log in `Background::Manual` has
//! no thread of its own), so that long idle stretches of simulated time cost nothing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quire::op::{OpId, SequencedOp};
use quire::sequencer::local::LocalSequencer;
use quire::sequencer::Sequencer;
use quire::sequencer::{
    DeleteRefused, Deletion, DocSummary, DocView, ReadAtError, StorageStats, SubmitError, SubmitOp,
    Submitted, Ticket,
};
use quire::wal::vfs::sim::SplitMix;
use tokio::sync::Notify;

pub struct SimSequencer {
    pub inner: Arc<LocalSequencer>,
    work: Arc<Notify>,
}

impl SimSequencer {
    /// The sequencer, and the disk task that writes and syncs each batch after a
    /// latency drawn from `rng` (20 µs to 3 ms), and not while `paused` is set.
    pub fn new(
        inner: Arc<LocalSequencer>,
        mut rng: SplitMix,
        paused: Arc<AtomicBool>,
    ) -> (SimSequencer, impl Future<Output = ()>) {
        let work = Arc::new(Notify::new());
        let disk = {
            let (inner, work) = (inner.clone(), work.clone());
            async move {
                loop {
                    if !inner.wal().has_pending() {
                        work.notified().await;
                    }
                    let us = 20 + rng.below(3_000);
                    tokio::time::sleep(Duration::from_micros(us)).await;
                    while paused.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_micros(100)).await;
                    }
                    inner.step();
                }
            }
        };
        (SimSequencer { inner, work }, disk)
    }
}

impl Sequencer for SimSequencer {
    fn storage_stats(&self) -> StorageStats {
        self.inner.storage_stats()
    }

    fn list_documents(&self, after: Option<&str>, limit: usize) -> Vec<DocSummary> {
        self.inner.list_documents(after, limit)
    }

    fn read_at(&self, doc_id: &str, seq: u64) -> Result<Option<DocView>, ReadAtError> {
        self.inner.read_at(doc_id, seq)
    }

    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        let submitted = self.inner.submit(doc_id, op);
        self.work.notify_one();
        submitted
    }

    fn delete(&self, doc_id: &str) -> Result<Option<Deletion>, DeleteRefused> {
        let deleted = self.inner.delete(doc_id);
        self.work.notify_one();
        deleted
    }

    fn finish_delete(&self, doc_id: &str) -> Result<(), Arc<str>> {
        self.inner.finish_delete(doc_id)
    }

    fn applied(
        &self,
        doc_id: &str,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>> {
        self.inner.applied(doc_id, op_id, fingerprint)
    }

    fn assign_client_id(&self) -> Result<u64, Arc<str>> {
        self.inner.assign_client_id()
    }

    fn version(&self, doc_id: &str) -> u64 {
        self.inner.version(doc_id)
    }

    fn wait_durable(&self, ticket: Ticket) -> impl Future<Output = Result<(), Arc<str>>> + Send {
        self.inner.wait_durable(ticket)
    }

    fn read_now(
        &self,
        doc_id: &str,
        reader: Option<u64>,
    ) -> Result<Option<(DocView, Ticket)>, Arc<str>> {
        self.inner.read_now(doc_id, reader)
    }

    fn ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Option<Vec<SequencedOp>>, Arc<str>> {
        self.inner.ops_after(doc_id, after_seq, limit)
    }
}
