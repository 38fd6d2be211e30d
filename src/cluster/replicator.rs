//! The replicated group commit: a node's sequenced ops go to the store's journal in one
//! fenced txn per batch ([`Member::commit`]), and the lease that makes the node an owner
//! is kept alive and watched by the node's own clock. An op may be acknowledged once
//! [`Replicator::outcome`] says `Ok` (and the local log has it): its txn committed,
//! its document was not lost since, and the lease was valid when asked.
//!
//! **Tenures.** A document is served in a *tenure*: from the moment this node loaded it
//! from the store (after claiming it) until it loses it. Every tenure has a number of
//! its own ([`Replicator::begin_tenure`]); its ops carry it. A tenure ends for good
//! when its document is lost: a commit's compare failed (someone else owns it now), a
//! commit's outcome stayed unknown until the lease ran out (the node cannot know what
//! the journal holds, so its in-memory state may be ahead of it), or the lease lapsed
//! (by the node's own clock: see [`super`]). Every tenure begun before a lapse is lost,
//! even if the lease is renewed afterwards: the node then claims its documents again
//! (the claim finds them still its own, in the same epoch) and reloads them from the
//! store, which is what makes "never serve what the store does not have" hold. The
//! epoch alone cannot play this part: a reload after a lapse keeps the epoch.
//!
//! **Order.** Ops are committed in the order submitted, in batches that are a prefix of
//! the queue, so "every op up to id n is resolved" is one number (the watermark) that
//! waiters watch. An op of a lost tenure is resolved without a txn.
//!
//! **Unknown outcomes.** A txn that fails in transport may have been applied. It is
//! sent again as it was (the same keys and values; a journal written twice is written
//! once) until it succeeds, its compare fails, or the lease is no longer valid by the
//! node's clock; then the batch's tenures are lost, because whether the journal has
//! their ops is unknown.
//!
//! **Bounds.** A batch holds at most [`MAX_TXN_OPS`] ops and [`MAX_COMMIT_BYTES`] of keys
//! and values, the limits [`Member::commit`] enforces. The queue is bounded by the
//! caller: the server holds a permit for an op's bytes until the op is acknowledged
//! (`--unsynced-mib`), and an op is in this queue only until then.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::entry::JournalEntry;
use super::ownership::{ClusterError, CommitError, Epoch, JournalWrite, Member, MAX_COMMIT_BYTES};
use super::store::{Store, MAX_TXN_OPS};

/// A monotonic clock: the time since some fixed start.
pub trait Clock: Send + Sync + 'static {
    /// The time since the clock's start; never goes back.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A document's tenure on this node (module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenure(pub u64);

/// Why an op will not be acknowledged by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationError {
    /// The op's tenure ended (the reason says why): the document may be owned elsewhere
    /// now, or owned here again after a reload. The client resends its op wherever the
    /// document is served; the dedupe table answers it if the journal has it.
    Lost(String),
    /// This node's lease is gone from the store: it acknowledges nothing until it has
    /// registered again (the keep-alive loop does so), and nothing of before then.
    LeaseExpired,
}

impl std::fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicationError::Lost(reason) => write!(f, "the document moved: {reason}"),
            ReplicationError::LeaseExpired => {
                f.write_str("this node's cluster lease expired; it registers again")
            }
        }
    }
}

impl std::error::Error for ReplicationError {}

/// What [`Replicator`] tells its owner about tenures that ended, so that it drops the
/// documents' in-memory state and redirects their clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// One tenure of one document ended.
    Document {
        /// The document.
        doc: Arc<str>,
        /// The tenure that ended.
        tenure: Tenure,
        /// Why.
        reason: String,
    },
    /// Every tenure begun before now ended (the lease lapsed or expired).
    All {
        /// Why.
        reason: String,
    },
}

/// The timing of the lease, by this node's clock.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// The lease's TTL, as granted.
    pub ttl: Duration,
    /// How long before the TTL has passed (since the newest keep-alive sent) the node
    /// stops serving: covers the drift between its clock and etcd's leader over a TTL.
    pub margin: Duration,
    /// How often a keep-alive is sent (a third of the TTL is usual).
    pub renew_every: Duration,
    /// The pause between two attempts of a txn whose outcome was unknown.
    pub retry_every: Duration,
}

impl LeaseTiming {
    /// The usual timing for a TTL: renew every third of it, a margin of a fifth.
    pub fn for_ttl(ttl: Duration) -> Self {
        assert!(
            ttl >= Duration::from_secs(1),
            "etcd leases count whole seconds"
        );
        LeaseTiming {
            ttl,
            margin: ttl / 5,
            renew_every: ttl / 3,
            retry_every: Duration::from_millis(50),
        }
    }
}

/// Who runs the commit and keep-alive loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Two threads of the replicator's own.
    Threads,
    /// The caller, through [`Replicator::commit_next`] and [`Replicator::renew`]
    /// (deterministic tests).
    Manual,
}

struct Queued {
    id: u64,
    doc: Arc<str>,
    tenure: Tenure,
    epoch: Epoch,
    entry: JournalEntry,
    /// The key's and value's bytes in the txn.
    bytes: usize,
}

struct State {
    next_id: u64,
    queue: VecDeque<Queued>,
    /// Every op with an id below this is resolved.
    resolved_below: u64,
    next_tenure: u64,
    /// Tenures below this ended with a lapse of the lease.
    lapsed_below: u64,
    /// Tenures ended one by one (kept while the node runs: one entry per lost tenure,
    /// a few dozen bytes; a node that loses documents for weeks restarts first).
    lost: HashSet<Tenure>,
    /// By the node's clock: the lease is valid until then.
    valid_until: Duration,
    /// Whether the current lapse was reported (reset by a renewal).
    lapse_reported: bool,
    expired: bool,
    shutdown: bool,
}

struct Shared<S> {
    member: Member<S>,
    clock: Arc<dyn Clock>,
    drive: Drive,
    /// [`Drive::Manual`]: the batch whose txn's outcome was unknown, tried again at the
    /// next [`Replicator::commit_next`] before any other (the caller's clock moves
    /// between two calls, not within one).
    retry: Mutex<Option<Vec<Queued>>>,
    timing: LeaseTiming,
    state: Mutex<State>,
    work: Condvar,
    /// Wakes the keep-alive loop to stop.
    stop: Condvar,
    /// The watermark (`resolved_below`), for async waiters.
    resolved: tokio::sync::watch::Sender<u64>,
    on_loss: Box<dyn Fn(Loss) + Send + Sync>,
}

/// The replicated group commit and the lease of one node (module notes).
pub struct Replicator<S: Store + Send + Sync + 'static> {
    shared: Arc<Shared<S>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl<S: Store + Send + Sync + 'static> Replicator<S> {
    /// Starts replicating for `member`, whose lease was granted (or renewed) no earlier
    /// than `clock.now()` minus nothing: the lease counts as valid for `ttl - margin`
    /// from now. `on_loss` is called (from the replicator's threads or the caller's, with
    /// no lock held) whenever tenures end.
    pub fn start(
        member: Member<S>,
        clock: Arc<dyn Clock>,
        timing: LeaseTiming,
        drive: Drive,
        on_loss: Box<dyn Fn(Loss) + Send + Sync>,
    ) -> Self {
        assert!(timing.margin < timing.ttl && timing.renew_every < timing.ttl - timing.margin);
        let valid_until = clock.now() + timing.ttl - timing.margin;
        let shared = Arc::new(Shared {
            member,
            clock,
            drive,
            retry: Mutex::new(None),
            timing,
            state: Mutex::new(State {
                next_id: 0,
                queue: VecDeque::new(),
                resolved_below: 0,
                next_tenure: 0,
                lapsed_below: 0,
                lost: HashSet::new(),
                valid_until,
                lapse_reported: false,
                expired: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            stop: Condvar::new(),
            resolved: tokio::sync::watch::Sender::new(0),
            on_loss,
        });
        let mut threads = Vec::new();
        if drive == Drive::Threads {
            let committer = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("quire-replicate".into())
                    .spawn(move || committer.commit_loop())
                    .expect("spawn the replication thread"),
            );
            let renewer = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("quire-lease".into())
                    .spawn(move || renewer.renew_loop())
                    .expect("spawn the lease thread"),
            );
        }
        Replicator {
            shared,
            threads: Mutex::new(threads),
        }
    }

    /// The member this node is.
    pub fn member(&self) -> &Member<S> {
        &self.shared.member
    }

    /// A new tenure, for a document just loaded from the store. Refused once the lease
    /// expired, or while it is not valid by this node's clock.
    pub fn begin_tenure(&self) -> Result<Tenure, ReplicationError> {
        let shared = &self.shared;
        let (lease, loss) = shared.lease(&mut shared.lock());
        if let Some(loss) = loss {
            (shared.on_loss)(loss);
        }
        lease?;
        let mut state = shared.lock();
        let tenure = Tenure(state.next_tenure);
        state.next_tenure += 1;
        Ok(tenure)
    }

    /// Whether `tenure` may still serve: its document is not lost and the lease is valid
    /// now by this node's clock. Reads from memory check this first.
    pub fn serving(&self, tenure: Tenure) -> Result<(), ReplicationError> {
        let shared = &self.shared;
        let loss;
        let result = {
            let mut state = shared.lock();
            let lease;
            (lease, loss) = shared.lease(&mut state);
            lease.and_then(|()| state.tenure_result(tenure))
        };
        if let Some(loss) = loss {
            (shared.on_loss)(loss);
        }
        result
    }

    /// Queues an op of `doc`, sequenced in `tenure` (claimed in `epoch`), for the
    /// journal: its id, for [`Replicator::outcome`] and [`Replicator::wait`]. Refused if
    /// the tenure ended.
    pub fn submit(
        &self,
        doc: Arc<str>,
        tenure: Tenure,
        epoch: Epoch,
        entry: JournalEntry,
    ) -> Result<u64, ReplicationError> {
        let bytes = self
            .shared
            .member
            .keys()
            .journal_entry(&doc, entry.seq)
            .len()
            + entry.encoded_len();
        assert!(
            bytes <= MAX_COMMIT_BYTES,
            "an op fits one txn (entry::MAX_BODY_BYTES)"
        );
        let mut state = self.shared.lock();
        state.tenure_result(tenure)?;
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Queued {
            id,
            doc,
            tenure,
            epoch,
            entry,
            bytes,
        });
        drop(state);
        self.shared.work.notify_one();
        Ok(id)
    }

    /// The outcome of op `id` of `tenure`, once resolved: `Ok` if its txn committed, its
    /// tenure has not ended since, and the lease is valid now. `None` while pending.
    pub fn outcome(&self, id: u64, tenure: Tenure) -> Option<Result<(), ReplicationError>> {
        if !self.resolved(id) {
            return None;
        }
        Some(self.serving(tenure))
    }

    /// Whether op `id` is resolved: its txn committed, or it never will be written (its
    /// compare failed, its tenure ended before it was sent, or its outcome stayed unknown
    /// until the lease was no longer valid). Whatever it wrote is in the store by then.
    pub fn resolved(&self, id: u64) -> bool {
        *self.shared.resolved.borrow() > id
    }

    /// Waits for op `id`'s outcome ([`Replicator::outcome`]).
    pub async fn wait(&self, id: u64, tenure: Tenure) -> Result<(), ReplicationError> {
        let mut resolved = self.shared.resolved.subscribe();
        // The sender lives as long as `self`, so this only ends with the condition.
        let _ = resolved.wait_for(|&below| below > id).await;
        self.serving(tenure)
    }

    /// Commits the next batch, if any op is queued ([`Drive::Manual`]): whether there was
    /// one. A batch whose outcome was unknown is tried again at the next call, before
    /// any other, until it resolves or the lease is no longer valid (by the clock, which
    /// the caller moves between calls).
    pub fn commit_next(&self) -> bool {
        let retry = self
            .shared
            .retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(batch) = retry.or_else(|| self.shared.next_batch(false)) else {
            return false;
        };
        self.shared.commit(batch);
        true
    }

    /// Sends one keep-alive ([`Drive::Manual`]).
    pub fn renew(&self) {
        self.shared.renew();
    }

    /// Ops queued and not yet resolved.
    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Stops the threads once the queue is empty (what is queued is committed first).
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        self.shared.stop.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl<S: Store + Send + Sync + 'static> Drop for Replicator<S> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl State {
    fn tenure_result(&self, tenure: Tenure) -> Result<(), ReplicationError> {
        if self.expired {
            return Err(ReplicationError::LeaseExpired);
        }
        if tenure.0 < self.lapsed_below {
            return Err(ReplicationError::Lost(
                "this node's lease lapsed by its own clock".into(),
            ));
        }
        if self.lost.contains(&tenure) {
            return Err(ReplicationError::Lost(
                "another node owns the document, or its journal is unknown".into(),
            ));
        }
        Ok(())
    }
}

impl<S: Store + Send + Sync + 'static> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is made after its checks; a panic leaves it whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the lease is valid now by this node's clock. When it is not, every
    /// tenure begun so far ends; the first call that finds so returns the loss to report
    /// (once per lapse: a renewal starts a new period).
    fn lease(&self, state: &mut State) -> (Result<(), ReplicationError>, Option<Loss>) {
        let error = if state.expired {
            ReplicationError::LeaseExpired
        } else if self.clock.now() >= state.valid_until {
            ReplicationError::Lost("this node's lease lapsed by its own clock".into())
        } else {
            return (Ok(()), None);
        };
        let loss = (!state.lapse_reported).then(|| {
            state.lapse_reported = true;
            state.lapsed_below = state.next_tenure;
            Loss::All {
                reason: error.to_string(),
            }
        });
        (Err(error), loss)
    }

    /// Takes the next batch off the queue: a prefix, within the txn's limits, with at most
    /// one epoch per document. Ops of ended tenures are resolved on the way. With `block`,
    /// waits for work (`None`: shut down with nothing queued).
    fn next_batch(&self, block: bool) -> Option<Vec<Queued>> {
        let mut state = self.lock();
        loop {
            // Ops of ended tenures at the front resolve without a txn.
            while let Some(front) = state.queue.front() {
                if state.tenure_result(front.tenure).is_ok() {
                    break;
                }
                let id = front.id;
                state.queue.pop_front();
                state.resolved_below = id + 1;
            }
            self.resolved.send_replace(state.resolved_below);
            if !state.queue.is_empty() {
                break;
            }
            if !block || state.shutdown {
                return None;
            }
            state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let mut batch: Vec<Queued> = Vec::new();
        let mut bytes = 0;
        let mut docs: Vec<(Arc<str>, Epoch)> = Vec::new();
        while let Some(front) = state.queue.front() {
            if state.tenure_result(front.tenure).is_err() {
                // Resolved with the batch, without being written.
                batch.push(state.queue.pop_front().expect("a front"));
                continue;
            }
            let new_doc = !docs.iter().any(|(d, _)| *d == front.doc);
            if docs
                .iter()
                .any(|(d, e)| *d == front.doc && *e != front.epoch)
            {
                // One document in two epochs (a tenure ended, another began): a later
                // batch.
                break;
            }
            let live = batch
                .iter()
                .filter(|q| state.tenure_result(q.tenure).is_ok())
                .count();
            let ops = (live + 1).max(docs.len() + usize::from(new_doc));
            if !batch.is_empty() && (ops > MAX_TXN_OPS || bytes + front.bytes > MAX_COMMIT_BYTES) {
                break;
            }
            let front = state.queue.pop_front().expect("a front");
            bytes += front.bytes;
            if new_doc {
                docs.push((front.doc.clone(), front.epoch));
            }
            batch.push(front);
        }
        Some(batch)
    }

    /// Commits `batch` (from [`Shared::next_batch`]) and resolves it.
    fn commit(&self, mut batch: Vec<Queued>) {
        let last = batch.last().expect("a batch is not empty").id;
        let mut losses = Vec::new();
        loop {
            {
                let state = self.lock();
                batch.retain(|q| state.tenure_result(q.tenure).is_ok());
            }
            if batch.is_empty() {
                break;
            }
            let writes: Vec<JournalWrite<'_>> = batch
                .iter()
                .map(|q| JournalWrite {
                    doc: &q.doc,
                    epoch: q.epoch,
                    entry: &q.entry,
                })
                .collect();
            match self.member.commit(&writes) {
                Ok(_) => break,
                Err(CommitError::Lost(docs)) => {
                    let mut state = self.lock();
                    for q in &batch {
                        if docs.iter().any(|d| **d == *q.doc) && state.lost.insert(q.tenure) {
                            losses.push(Loss::Document {
                                doc: q.doc.clone(),
                                tenure: q.tenure,
                                reason: "another node owns it now".into(),
                            });
                        }
                    }
                }
                Err(CommitError::TooLarge { ops, bytes }) => {
                    unreachable!("next_batch keeps a batch within a txn: {ops} ops, {bytes} B")
                }
                Err(CommitError::Cluster(ClusterError::LeaseExpired)) => {
                    self.lock().expired = true;
                    break;
                }
                Err(CommitError::Cluster(e)) => {
                    // The outcome is unknown (module notes): again, while the lease
                    // holds; then the tenures are lost.
                    let mut state = self.lock();
                    let (lease, lapse) = self.lease(&mut state);
                    losses.extend(lapse);
                    if lease.is_err() {
                        for q in &batch {
                            if state.lost.insert(q.tenure) {
                                losses.push(Loss::Document {
                                    doc: q.doc.clone(),
                                    tenure: q.tenure,
                                    reason: format!("its journal write's outcome is unknown: {e}"),
                                });
                            }
                        }
                        break;
                    }
                    drop(state);
                    if self.drive == Drive::Manual {
                        // Again at the next `commit_next`: nothing resolves meanwhile,
                        // and no later batch goes before it.
                        *self.retry.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
                        for loss in losses {
                            (self.on_loss)(loss);
                        }
                        return;
                    }
                    std::thread::sleep(self.timing.retry_every);
                }
            }
        }
        let lapse = {
            let mut state = self.lock();
            state.resolved_below = last + 1;
            self.lease(&mut state).1
        };
        self.resolved.send_replace(last + 1);
        for loss in losses.into_iter().chain(lapse) {
            (self.on_loss)(loss);
        }
    }

    fn commit_loop(&self) {
        while let Some(batch) = self.next_batch(true) {
            self.commit(batch);
        }
    }

    /// One keep-alive: extends the lease's validity from the moment it was sent. Once
    /// the lease expired, a new registration instead (a new lease: every tenure before
    /// it stays lost, as the documents' owner keys went with the old lease).
    fn renew(&self) {
        let sent = self.clock.now();
        let expired = self.lock().expired;
        let result = if expired {
            self.member.reregister()
        } else {
            self.member.keep_alive()
        };
        let loss = {
            let mut state = self.lock();
            // Reported (every tenure ended) before anything is served on the new lease.
            let mut loss = self.lease(&mut state).1;
            match result {
                Ok(()) if expired => {
                    tracing::info!("registered again under a new lease after the old one expired");
                    state.expired = false;
                    state.lapsed_below = state.next_tenure;
                    state.valid_until = sent + self.timing.ttl - self.timing.margin;
                    state.lapse_reported = false;
                }
                Ok(()) => {
                    state.valid_until = state
                        .valid_until
                        .max(sent + self.timing.ttl - self.timing.margin);
                    if self.clock.now() < state.valid_until {
                        state.lapse_reported = false;
                    }
                }
                Err(ClusterError::LeaseExpired) => {
                    state.expired = true;
                    loss = loss.or(self.lease(&mut state).1);
                }
                // Not renewed: the validity runs out by itself if this goes on.
                Err(_) => {}
            }
            loss.or(self.lease(&mut state).1)
        };
        if let Some(loss) = loss {
            (self.on_loss)(loss);
        }
    }

    fn renew_loop(&self) {
        loop {
            {
                // The flag is checked before waiting too: a shutdown while this thread
                // was renewing (or not yet waiting) notified nobody.
                let state = self.lock();
                let (state, _) = self
                    .stop
                    .wait_timeout_while(state, self.timing.renew_every, |s| !s.shutdown)
                    .unwrap_or_else(|e| e.into_inner());
                if state.shutdown {
                    return;
                }
            }
            self.renew();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::cluster::mem_store::{Fault, MemStore};
    use crate::cluster::ownership::{Claim, Keys};
    use crate::cluster::store::{Compare, KeyValue, LeaseId, Op, Range, StoreError, TxnResponse};
    use crate::op::OpId;

    const TTL: Duration = Duration::from_secs(5);

    /// The store's clock, so that leases expire in the store and lapse here together.
    struct StoreClock(Arc<MemStore>);

    impl Clock for StoreClock {
        fn now(&self) -> Duration {
            self.0.now()
        }
    }

    /// A store whose txns fail in transport while `down`, each failure taking a second
    /// of the store's clock (as a timed-out request would).
    struct Flaky {
        store: Arc<MemStore>,
        down: AtomicBool,
    }

    impl Store for Flaky {
        fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.store.grant_lease(ttl)
        }
        fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.store.keep_alive(lease)
        }
        fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.store.revoke(lease)
        }
        fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
            self.store.get(key)
        }
        fn get_prefix(
            &self,
            prefix: &str,
            from: Option<&str>,
            limit: usize,
        ) -> Result<Range, StoreError> {
            self.store.get_prefix(prefix, from, limit)
        }
        fn txn(
            &self,
            compares: &[Compare],
            success: &[Op],
            failure: &[Op],
        ) -> Result<TxnResponse, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                self.store.advance(Duration::from_secs(1));
                return Err(StoreError::Unavailable("timed out".into()));
            }
            self.store.txn(compares, success, failure)
        }
    }

    struct Node {
        store: Arc<MemStore>,
        flaky: Arc<Flaky>,
        replicator: Replicator<Arc<Flaky>>,
        losses: Arc<Mutex<Vec<Loss>>>,
    }

    fn node(store: &Arc<MemStore>, name: &str, drive: Drive) -> Node {
        let flaky = Arc::new(Flaky {
            store: store.clone(),
            down: AtomicBool::new(false),
        });
        let member =
            Member::register(flaky.clone(), Keys::new("/q"), name, "addr", TTL).expect("register");
        let losses = Arc::new(Mutex::new(Vec::new()));
        let sink = losses.clone();
        let mut timing = LeaseTiming::for_ttl(TTL);
        timing.retry_every = Duration::from_millis(1);
        let replicator = Replicator::start(
            member,
            Arc::new(StoreClock(store.clone())),
            timing,
            drive,
            Box::new(move |loss| sink.lock().unwrap().push(loss)),
        );
        Node {
            store: store.clone(),
            flaky,
            replicator,
            losses,
        }
    }

    #[test]
    fn a_shutdown_right_after_the_start_does_not_wait_for_the_next_renewal() {
        // Renewals an hour apart: a shutdown the keep-alive thread missed would wait for
        // the next one, far past the patience below (a bound against hanging, not a
        // speed).
        const LONG: Duration = Duration::from_secs(3 * 3600);
        let store = Arc::new(MemStore::new());
        for i in 0..20 {
            let member =
                Member::register(store.clone(), Keys::new("/q"), &format!("s{i}"), "a", LONG)
                    .expect("register");
            let replicator = Replicator::start(
                member,
                Arc::new(StoreClock(store.clone())),
                LeaseTiming::for_ttl(LONG),
                Drive::Threads,
                Box::new(|_| {}),
            );
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                replicator.shutdown();
                let _ = done.send(());
            });
            finished
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("shutdown {i} waited for the next renewal"));
        }
    }

    impl Node {
        fn claim(&self, doc: &str) -> (Epoch, Tenure) {
            let Claim::Owned(epoch) = self.replicator.member().claim(doc).expect("claim") else {
                panic!("{doc} is owned elsewhere");
            };
            (epoch, self.replicator.begin_tenure().expect("a tenure"))
        }

        fn submit(&self, doc: &str, (epoch, tenure): (Epoch, Tenure), seq: u64) -> u64 {
            self.replicator
                .submit(doc.into(), tenure, epoch, entry(seq))
                .expect("submit")
        }

        fn journal(&self, doc: &str) -> Vec<u64> {
            let loaded = self.replicator.member().load(doc).expect("load");
            loaded.ops.iter().map(|e| e.seq).collect()
        }

        fn losses(&self) -> Vec<Loss> {
            self.losses.lock().unwrap().clone()
        }
    }

    fn entry(seq: u64) -> JournalEntry {
        JournalEntry {
            seq,
            op_id: OpId {
                client_id: 7,
                local_seq: seq,
            },
            fingerprint: seq * 31,
            body: vec![b'x'; 10],
        }
    }

    #[test]
    fn ops_are_acknowledged_only_once_their_batch_committed_in_order() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let doc = a.claim("d");
        let ids: Vec<u64> = (1..=3).map(|seq| a.submit("d", doc, seq)).collect();
        for &id in &ids {
            assert_eq!(a.replicator.outcome(id, doc.1), None, "not committed yet");
        }
        assert!(a.journal("d").is_empty());
        assert!(a.replicator.commit_next());
        assert!(!a.replicator.commit_next(), "one batch took all three");
        for &id in &ids {
            assert_eq!(a.replicator.outcome(id, doc.1), Some(Ok(())));
        }
        assert_eq!(a.journal("d"), vec![1, 2, 3]);
        assert!(a.losses().is_empty());
    }

    #[test]
    fn a_batch_stays_within_one_txn() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let docs: Vec<_> = (0..3).map(|d| a.claim(&format!("d{d}"))).collect();
        let total = MAX_TXN_OPS * 2 + 10;
        for i in 0..total {
            let d = i % 3;
            a.submit(&format!("d{d}"), docs[d], (i / 3) as u64 + 1);
        }
        let mut batches = 0;
        while a.replicator.queued() > 0 {
            let before = a.replicator.queued();
            assert!(a.replicator.commit_next());
            assert!(before - a.replicator.queued() <= MAX_TXN_OPS);
            batches += 1;
        }
        assert_eq!(batches, 3);
        let committed: usize = (0..3).map(|d| a.journal(&format!("d{d}")).len()).sum();
        assert_eq!(committed, total);
    }

    #[test]
    fn a_document_lost_to_another_node_acknowledges_nothing_more() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let b = node(&store, "b", Drive::Manual);
        let d = a.claim("d");
        let e = a.claim("e");
        let first = a.submit("d", d, 1);
        a.replicator.commit_next();
        assert_eq!(a.replicator.outcome(first, d.1), Some(Ok(())));
        // A handoff behind the replicator's back: a releases, b claims.
        assert!(a.replicator.member().release("d", d.0).unwrap());
        let b_doc = b.claim("d");
        let late = a.submit("d", d, 2);
        let other = a.submit("e", e, 1);
        a.replicator.commit_next();
        assert!(matches!(
            a.replicator.outcome(late, d.1),
            Some(Err(ReplicationError::Lost(_)))
        ));
        assert!(
            matches!(a.replicator.outcome(first, d.1), Some(Err(_))),
            "an op committed before the loss is not acknowledged after it"
        );
        assert_eq!(
            a.replicator.outcome(other, e.1),
            Some(Ok(())),
            "e is still a's"
        );
        assert_eq!(
            a.journal("d"),
            vec![1],
            "the late op never reached the journal"
        );
        assert_eq!(a.journal("e"), vec![1]);
        assert!(matches!(
            &a.losses()[..],
            [Loss::Document { doc, tenure, .. }] if &**doc == "d" && *tenure == d.1
        ));
        assert!(a.replicator.submit("d".into(), d.1, d.0, entry(3)).is_err());
        // b goes on from the journal.
        b.submit("d", b_doc, 2);
        b.replicator.commit_next();
        assert_eq!(b.journal("d"), vec![1, 2]);
    }

    #[test]
    fn an_unknown_outcome_is_sent_again_and_lands_once() {
        for fault in [Fault::ResponseLost, Fault::RequestLost] {
            let store = Arc::new(MemStore::new());
            let a = node(&store, "a", Drive::Manual);
            let d = a.claim("d");
            let id = a.submit("d", d, 1);
            store.fault_next_txn(fault);
            assert!(a.replicator.commit_next());
            assert_eq!(
                a.replicator.outcome(id, d.1),
                None,
                "unknown yet: {fault:?}"
            );
            // Sent again at the next call (the caller's clock moves between calls).
            assert!(a.replicator.commit_next());
            assert!(!a.replicator.commit_next());
            assert_eq!(a.replicator.outcome(id, d.1), Some(Ok(())), "{fault:?}");
            assert_eq!(a.journal("d"), vec![1]);
        }
    }

    #[test]
    fn an_outcome_unknown_until_the_lease_lapses_loses_the_tenure() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let d = a.claim("d");
        let id = a.submit("d", d, 1);
        a.flaky.down.store(true, Ordering::SeqCst);
        // Each call sends the batch once (each failure takes a second of the node's
        // clock here), until the lease is no longer valid by that clock.
        let mut calls = 0;
        while a.replicator.commit_next() {
            calls += 1;
            assert!(
                calls < 100,
                "an unknown outcome is given up on once the lease lapses"
            );
        }
        assert!(calls > 1, "{calls} calls");
        assert!(matches!(
            a.replicator.outcome(id, d.1),
            Some(Err(ReplicationError::Lost(_)))
        ));
        let losses = a.losses();
        assert!(losses.iter().any(|l| matches!(l, Loss::All { .. })));
        assert!(
            store.now() < TTL,
            "it gave up by its own clock, before the store expired the lease"
        );
        // Back, and renewed in time: the lease lives, and a reload starts a new tenure.
        a.flaky.down.store(false, Ordering::SeqCst);
        a.replicator.renew();
        let again = a.claim("d");
        assert_eq!(again.0, d.0, "the same epoch: the lease never expired");
        assert_ne!(again.1, d.1);
        assert!(
            a.replicator.serving(d.1).is_err(),
            "the old tenure stays lost"
        );
        let id = a.submit("d", again, 1);
        a.replicator.commit_next();
        assert_eq!(a.replicator.outcome(id, again.1), Some(Ok(())));
    }

    #[test]
    fn a_lapse_by_the_nodes_own_clock_stops_serving_before_the_store_expires_the_lease() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let d = a.claim("d");
        let id = a.submit("d", d, 1);
        a.replicator.commit_next();
        assert_eq!(a.replicator.outcome(id, d.1), Some(Ok(())));
        store.advance(TTL - TTL / 5);
        assert!(store.lease_alive(a.replicator.member().lease()));
        assert!(a.replicator.serving(d.1).is_err());
        assert!(a.replicator.outcome(id, d.1).unwrap().is_err());
        assert!(a.replicator.begin_tenure().is_err());
        assert_eq!(
            a.losses()
                .iter()
                .filter(|l| matches!(l, Loss::All { .. }))
                .count(),
            1,
            "one lapse, reported once"
        );
        a.replicator.renew();
        assert!(a.replicator.begin_tenure().is_ok());
        assert!(a.replicator.serving(d.1).is_err());
    }

    #[test]
    fn an_expired_lease_ends_everything() {
        let store = Arc::new(MemStore::new());
        let a = node(&store, "a", Drive::Manual);
        let d = a.claim("d");
        let id = a.submit("d", d, 1);
        store.advance(TTL);
        a.replicator.renew();
        a.replicator.commit_next();
        assert_eq!(
            a.replicator.outcome(id, d.1),
            Some(Err(ReplicationError::LeaseExpired))
        );
        assert_eq!(
            a.replicator.begin_tenure(),
            Err(ReplicationError::LeaseExpired)
        );
        assert!(a.journal("d").is_empty());
        // The next keep-alive registers anew: new tenures serve, the old one stays lost.
        a.replicator.renew();
        assert_ne!(a.replicator.member().lease(), LeaseId(0));
        assert!(store.lease_alive(a.replicator.member().lease()));
        let again = a.claim("d");
        assert!(a.replicator.serving(d.1).is_err());
        let id = a.submit("d", again, 1);
        a.replicator.commit_next();
        assert_eq!(a.replicator.outcome(id, again.1), Some(Ok(())));
        assert_eq!(a.journal("d"), vec![1]);
    }

    #[test]
    fn threads_commit_what_many_submitters_queue_and_wake_their_waiters() {
        let store = Arc::new(MemStore::new());
        let a = Arc::new(node(&store, "a", Drive::Threads));
        let docs: Vec<_> = (0..4).map(|d| a.claim(&format!("d{d}"))).collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let per_doc = 300u64;
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for (d, doc) in docs.iter().copied().enumerate() {
                let a = a.clone();
                tasks.push(tokio::spawn(async move {
                    let name = format!("d{d}");
                    for seq in 1..=per_doc {
                        let id = a.submit(&name, doc, seq);
                        if seq % 10 == 0 {
                            // Some acks waited one by one, most in a pipeline.
                            a.replicator.wait(id, doc.1).await.expect("committed");
                        }
                    }
                    let last = a.submit(&name, doc, per_doc + 1);
                    a.replicator.wait(last, doc.1).await.expect("committed");
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        });
        for d in 0..4 {
            let journal = a.journal(&format!("d{d}"));
            assert_eq!(journal, (1..=per_doc + 1).collect::<Vec<_>>());
        }
        assert!(a.losses().is_empty());
        let _ = &a.store;
    }
}
