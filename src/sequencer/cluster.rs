//! The sequencer of cluster mode (issue 13): the local sequencer, whose log is a cache,
//! under a [`Replicator`] that puts every op in the coordination store's journal before
//! it may be acknowledged. The server does not change: this is the [`Sequencer`] seam.
//!
//! **Placement.** A document nobody owns is claimed by its preferred owner among the
//! live nodes (rendezvous hashing, [`crate::cluster::hashing`]): an `Open` elsewhere is
//! redirected there. A node that joins takes the documents it is now preferred for: each
//! node looks every second, on a thread of its own, and hands those over
//! ([`ClusterSequencer::rebalance`]), as a draining node hands over all of its documents
//! ([`ClusterSequencer::drain`]).
//!
//! **A document's life on a node.** [`Sequencer::route`] (at `Open`) claims the
//! document if nobody owns it and this node is its preferred owner; if this node owns it
//! (now or already), it loads it from
//! the store (the newest snapshot and the journal after it) and installs it in the local
//! sequencer in place of whatever the local log had of it ([`LocalSequencer::install`]),
//! in a new tenure. From then on a submit is sequenced by the local sequencer (the
//! transform, the dedupe table, the log) and queued for the journal, under the
//! document's own lock so that the journal receives its ops in seq order. An op is
//! acknowledged once both the local log has it on disk and the replicator says its
//! txn committed, its tenure still holds and the lease is valid ([`Replicator::wait`]).
//! When the tenure ends (another node owns the document, an unknown outcome, the lease
//! lapsed), the document is evicted from the local sequencer and the server is told to
//! redirect its sessions ([`ClusterSequencer::moved`]); a later `Open` claims and loads
//! it again, from the store, never from the local log.
//!
//! **Lock order.** The tenancy map, then one document's tenancy, then the local
//! sequencer's locks, then the replicator's. The loss handler takes them in the same
//! order; it runs on a thread of its own, as eviction is blocking I/O.
//!
//! **Client ids** given out here must be unique in the whole cluster: they are built
//! from this node's registration revision, which no other registration shares (see
//! [`ClusterSequencer::assign_client_id`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::local::LocalSequencer;
use super::{
    DeleteRefused, DocSummary, DocView, Owner, ReadAtError, Route, RouteError, Sequencer,
    StorageStats, SubmitError, SubmitOp, Submitted, Ticket,
};
use crate::cluster::entry::JournalEntry;
use crate::cluster::ownership::{Claim, ClusterError, CommitError, Epoch, Loaded};
use crate::cluster::replicator::{Loss, ReplicationError, Replicator, Tenure};
use crate::cluster::store::Store;
use crate::op::{OpId, SequencedOp};
use crate::wal::record::{OpRecord, OpRecordRef, RecordType};
use crate::wal::snapshot::Snapshot;

/// The first client id of the cluster's (the top bit, as a single node's).
const FIRST_ASSIGNED: u64 = super::client_ids::FIRST_ASSIGNED;
/// Client ids one registration gives out: the low bits of an id.
const IDS_PER_REGISTRATION: u64 = 1 << 24;

/// A document served here: the tenure it is served in and its newest op's place in the
/// replicator's queue.
#[derive(Debug, Clone)]
struct Serving {
    epoch: Epoch,
    tenure: Tenure,
    /// The replicator's id of the newest op sequenced in this tenure (`None`: none yet;
    /// what was loaded is in the store already).
    last_op: Option<u64>,
    /// Ops sequenced since the newest snapshot written in this tenure (or the load).
    since_snapshot: u64,
    /// A snapshot is queued for the background thread.
    snapshot_queued: bool,
    /// The seq of the newest snapshot in the store as this tenure knows it: the journal
    /// is truncated through it once a newer one is written.
    last_snapshot: Option<u64>,
    /// The ops sequenced in this tenure whose journal write was not seen resolved yet,
    /// oldest first: `(seq, the replicator's id)`. The resolved ones leave at each submit
    /// and read ([`Inner::journaled_upto`]), so it holds about the ops in flight.
    unjournaled: std::collections::VecDeque<(u64, u64)>,
}

impl Serving {
    /// This load's [`Sequencer::incarnation`]: tenure numbers start at 0, so one more,
    /// so that "not served" (0) differs.
    fn incarnation(&self) -> u64 {
        self.tenure.0 + 1
    }
}

/// A document's tenancy here, as one entry of [`Inner::docs`].
#[derive(Default)]
struct TenancyCell {
    /// Whether, and in which tenure, the document is served here. Locked briefly, and
    /// by async workers too (a submit, a route, the server's `incarnation` under its
    /// documents' lock), so never across a request to the store or a wait: a placement
    /// waiting on a slow store would otherwise stall those workers and that lock, and
    /// with them every connection of the node (found in CI: a node taking a drained
    /// node's documents answered nothing, not even a `Hello`, for over a minute).
    serving: Mutex<Option<Serving>>,
    /// Held for the whole of a placement ([`Inner::place`]: the claim, the load and the
    /// install, with their store requests and waits), on blocking threads only, so
    /// that one placement of the document runs at a time. `serving` stays `None`
    /// meanwhile: submits, reads, handovers, losses and deletions find the document
    /// not served, and a route waits for the placement off the async workers.
    placing: Mutex<()>,
}

type Tenancy = Arc<TenancyCell>;

impl TenancyCell {
    /// The document's state, locked (counted in [`STATE_LOCKS_HELD`]).
    fn state(&self) -> StateGuard<'_> {
        let guard = lock(&self.serving);
        STATE_LOCKS_HELD.with(|n| n.set(n.get() + 1));
        StateGuard(guard)
    }
}

thread_local! {
    /// How many documents' state locks ([`TenancyCell::serving`]) this thread holds: a
    /// request to the store is never made under one ([`Inner::member`] asserts it).
    static STATE_LOCKS_HELD: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A document's state locked by [`TenancyCell::state`].
struct StateGuard<'a>(MutexGuard<'a, Option<Serving>>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = Option<Serving>;

    fn deref(&self) -> &Option<Serving> {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut Option<Serving> {
        &mut self.0
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        STATE_LOCKS_HELD.with(|n| n.set(n.get() - 1));
    }
}

/// Where a claim left a document.
enum Placed {
    /// Claimed here, in this epoch.
    Claimed(Epoch),
    /// Served (or to be claimed) by that node.
    Elsewhere(Owner),
}

/// How long a handover may wait for a document's queued journal writes to resolve, and
/// an `Open` for a document being handed over (here, or by a draining owner) for the
/// handover to finish. Past it the handover goes on (the journal's fencing refuses the
/// writes still queued) and the `Open` is answered "unavailable, retry".
pub const HAND_OVER_PATIENCE: Duration = Duration::from_secs(10);
/// Durability tickets kept for their waiters ([`Sequencer::wait_durable`]). A ticket is
/// waited for right after it is handed out (an op's ack, a read at `Open`), except when
/// its session ends in between: such a ticket is never waited for, so the oldest is
/// dropped past this bound (a wait on it then fails, which its session, gone, never
/// sees). Waited-for tickets are far fewer: at most `--max-connections` (10,000) ×
/// [`crate::protocol::MAX_OPS_IN_FLIGHT`] (64) ops, plus one read per `Open` in progress.
pub const MAX_PENDING_TICKETS: usize = 1 << 20;
/// The interval at which those waits look again.
const POLL: Duration = Duration::from_millis(2);
/// How often a node looks for documents whose preferred owner is now another node
/// ([`ClusterSequencer::rebalance`]).
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// A document that moved away from this node, and its owner as far as known.
pub type Moved = (Arc<str>, Owner);

/// What an acknowledgement waits for: the local log, and the journal.
#[derive(Debug, Clone, Copy)]
struct Pending {
    local: Ticket,
    journal: Option<u64>,
    tenure: Tenure,
}

struct Inner<S: Store + Send + Sync + 'static> {
    local: LocalSequencer,
    replicator: Replicator<S>,
    /// This node's advertised address, for a redirect to a document's owner unknown.
    here: Owner,
    docs: Mutex<HashMap<Arc<str>, Tenancy>>,
    /// Tickets handed out and not yet waited for, oldest first: at most
    /// [`MAX_PENDING_TICKETS`].
    tickets: Mutex<std::collections::BTreeMap<u64, Pending>>,
    next_ticket: AtomicU64,
    next_client: AtomicU64,
    /// Documents that moved, for the server (`ClusterSequencer::moved`).
    moved: tokio::sync::mpsc::UnboundedSender<Moved>,
    /// A document is snapshotted to the store after this many ops in a tenure, and its
    /// journal truncated through its previous snapshot.
    snapshot_every_ops: u64,
    /// Documents to snapshot, for the background thread.
    snapshots: Mutex<std::collections::VecDeque<Arc<str>>>,
    /// Draining ([`ClusterSequencer::drain`]): nothing new is placed here.
    draining: std::sync::atomic::AtomicBool,
    /// Documents being handed to another node ([`Inner::hand_over`]): not served here any
    /// more, still owned here until their queued journal writes resolved.
    handing_over: Mutex<HashSet<Arc<str>>>,
    /// Those of `handing_over` that leave because they are being deleted here
    /// ([`Inner::erase`]): an `Open` or a second deletion that waits for one past its
    /// patience is told that a deletion is under way.
    erasing: Mutex<HashSet<Arc<str>>>,
    /// Documents whose last tenure here ended with journal writes unresolved (a handover
    /// or a deletion past its patience), by the id of the last of them: not loaded again
    /// here until it resolved ([`Inner::settled`]).
    unsettled: Mutex<HashMap<Arc<str>, u64>>,
    /// The live nodes of the previous rebalance ([`ClusterSequencer::rebalance`]).
    seen_nodes: Mutex<Vec<String>>,
    /// [`HAND_OVER_PATIENCE`] in milliseconds, unless a test set it shorter
    /// ([`ClusterSequencer::set_hand_over_patience`]).
    hand_over_patience_ms: AtomicU64,
    /// Place documents on the calling task rather than a blocking thread
    /// ([`ClusterSequencer::place_inline`]).
    place_inline: std::sync::atomic::AtomicBool,
    /// The outcome of each deletion under way, by its ticket ([`Sequencer::delete`]):
    /// at most one per document, each taken by the ticket's wait.
    erasures: Mutex<HashMap<u64, tokio::sync::oneshot::Receiver<Result<(), DeleteRefused>>>>,
    /// No thread is had for an erasure ([`ClusterSequencer::refuse_erasure_threads`]).
    refuse_erasure_threads: std::sync::atomic::AtomicBool,
}

/// An erasure ([`Inner::erase`]) for the thread started for it ([`Inner::eraser`]).
type ErasureJob = Box<dyn FnOnce() + Send>;

/// The sequencer of cluster mode (module notes).
pub struct ClusterSequencer<S: Store + Send + Sync + 'static> {
    inner: Arc<Inner<S>>,
    moved: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Moved>>>,
    losses: Option<Mutex<mpsc::Receiver<Loss>>>,
}

/// The first client id of a registration at `revision`.
fn first_client_id(revision: crate::cluster::store::Revision) -> u64 {
    let block = (revision as u64)
        .checked_mul(IDS_PER_REGISTRATION)
        .filter(|ids| *ids < FIRST_ASSIGNED)
        .expect("a registration revision below 2^39");
    FIRST_ASSIGNED | block
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is made after its checks: a panic leaves them whole.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn moved_error(e: ReplicationError, here: &Owner) -> SubmitError {
    tracing::debug!("a document is no longer served here: {e}");
    SubmitError::Moved(here.clone())
}

impl<S: Store + Send + Sync + 'static> ClusterSequencer<S> {
    /// A cluster sequencer over `local` (on an empty data directory: module notes) and a
    /// replicator whose losses arrive on `losses` (the receiving end of the channel its
    /// `on_loss` sends to). With `handle_losses`, a thread of its own handles them;
    /// without, the caller does ([`ClusterSequencer::handle_losses`]).
    pub fn new(
        local: LocalSequencer,
        replicator: Replicator<S>,
        losses: mpsc::Receiver<Loss>,
        here: Owner,
        snapshot_every_ops: u64,
        handle_losses: bool,
    ) -> Self {
        assert!(snapshot_every_ops > 0);
        let first_client = first_client_id(replicator.member().registered_at());
        let (moved_tx, moved_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            local,
            replicator,
            here,
            docs: Mutex::new(HashMap::new()),
            tickets: Mutex::new(std::collections::BTreeMap::new()),
            next_ticket: AtomicU64::new(1),
            next_client: AtomicU64::new(first_client),
            moved: moved_tx,
            snapshot_every_ops,
            snapshots: Mutex::new(std::collections::VecDeque::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            handing_over: Mutex::new(HashSet::new()),
            erasing: Mutex::new(HashSet::new()),
            unsettled: Mutex::new(HashMap::new()),
            seen_nodes: Mutex::new(Vec::new()),
            hand_over_patience_ms: AtomicU64::new(HAND_OVER_PATIENCE.as_millis() as u64),
            place_inline: std::sync::atomic::AtomicBool::new(false),
            erasures: Mutex::new(HashMap::new()),
            refuse_erasure_threads: std::sync::atomic::AtomicBool::new(false),
        });
        let losses = if handle_losses {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("quire-losses".into())
                .spawn(move || loss_loop(weak, losses))
                .expect("spawn the loss handler");
            // A thread of its own: its store reads block while the store is unreachable,
            // which must not delay the handling of losses.
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("quire-rebalance".into())
                .spawn(move || rebalance_loop(weak))
                .expect("spawn the rebalancer");
            None
        } else {
            Some(Mutex::new(losses))
        };
        ClusterSequencer {
            inner,
            moved: Mutex::new(Some(moved_rx)),
            losses,
        }
    }

    /// The documents that moved away from this node, and where to: the server redirects
    /// their sessions ([`crate::server::Server::redirect_document`]). Taken once.
    pub fn moved(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Moved>> {
        lock(&self.moved).take()
    }

    /// Handles the losses reported so far (without a background thread): the count.
    pub fn handle_losses(&self) -> usize {
        let Some(losses) = &self.losses else {
            return 0;
        };
        let losses: Vec<Loss> = lock(losses).try_iter().collect();
        let count = losses.len();
        for loss in losses {
            self.inner.handle(loss);
        }
        count
    }

    /// Writes the snapshots queued so far (without a background thread): the count.
    pub fn write_snapshots(&self) -> usize {
        self.inner.write_snapshots()
    }

    /// Durability tickets handed out and not waited for yet (at most
    /// [`MAX_PENDING_TICKETS`]).
    pub fn pending_tickets(&self) -> usize {
        lock(&self.inner.tickets).len()
    }

    /// Documents whose last tenure here ended with journal writes unresolved, not loaded
    /// here again until they resolve; [`ClusterSequencer::rebalance`] forgets those
    /// that resolved.
    pub fn unsettled_documents(&self) -> usize {
        lock(&self.inner.unsettled).len()
    }

    /// Sets how long a handover and an `Open` waiting for one wait
    /// ([`HAND_OVER_PATIENCE`] by default): tests of what happens past it.
    pub fn set_hand_over_patience(&self, patience: Duration) {
        let ms = patience.as_millis().try_into().unwrap_or(u64::MAX);
        self.inner.hand_over_patience_ms.store(ms, Ordering::SeqCst);
    }

    /// Places documents (`Sequencer::route`) on the calling task, blocking it for the
    /// store's requests and the install's disk writes, rather than on a blocking
    /// thread: for the deterministic simulator, whose store and disk are in memory and
    /// whose one thread must run everything in an order its seed decides.
    pub fn place_inline(&self) {
        self.inner.place_inline.store(true, Ordering::SeqCst);
    }

    /// From now on no thread is had for a deletion's erasure, as when the system gives
    /// the process no more threads: tests of the deletion refused then.
    pub fn refuse_erasure_threads(&self) {
        self.inner
            .refuse_erasure_threads
            .store(true, Ordering::SeqCst);
    }

    /// The local sequencer (the cache).
    pub fn local(&self) -> &LocalSequencer {
        &self.inner.local
    }

    /// The replicator.
    pub fn replicator(&self) -> &Replicator<S> {
        &self.inner.replicator
    }

    /// Where `doc_id` is served, claiming and loading it if nobody owns it. Blocking
    /// (store requests, the install's disk writes).
    pub fn place(&self, doc_id: &str) -> Result<Route, RouteError> {
        self.inner.place(doc_id)
    }
}

fn loss_loop<S: Store + Send + Sync + 'static>(
    inner: Weak<Inner<S>>,
    losses: mpsc::Receiver<Loss>,
) {
    loop {
        let loss = match losses.recv_timeout(Duration::from_millis(200)) {
            Ok(loss) => Some(loss),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Some(loss) = loss {
            inner.handle(loss);
        }
        inner.write_snapshots();
    }
}

/// Looks for documents to hand to their preferred owners every [`REBALANCE_EVERY`], for
/// as long as the sequencer lives.
fn rebalance_loop<S: Store + Send + Sync + 'static>(inner: Weak<Inner<S>>) {
    loop {
        std::thread::sleep(REBALANCE_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.rebalance();
    }
}

impl<S: Store + Send + Sync + 'static> Inner<S> {
    fn hand_over_patience(&self) -> Duration {
        Duration::from_millis(self.hand_over_patience_ms.load(Ordering::SeqCst))
    }

    /// The cluster's store, for a request: never under a document's state lock, which
    /// async workers and the server's documents' lock wait for (a slow store would
    /// stall the whole node).
    fn member(&self) -> &crate::cluster::ownership::Member<S> {
        let held = STATE_LOCKS_HELD.with(std::cell::Cell::get);
        assert_eq!(
            held, 0,
            "a request to the store under a document's state lock"
        );
        self.replicator.member()
    }

    fn tenancy(&self, doc_id: &str) -> Option<Tenancy> {
        lock(&self.docs).get(doc_id).cloned()
    }

    fn place(&self, doc_id: &str) -> Result<Route, RouteError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            RouteError::Unavailable(format!("document {doc_id:?} cannot be served now: {e}"))
        };
        crate::op::validate_doc_id(doc_id).map_err(|e| unavailable(&e))?;
        if self.draining.load(Ordering::SeqCst) {
            return Ok(Route::Elsewhere(self.successor(doc_id)));
        }
        let tenancy = lock(&self.docs)
            .entry(Arc::from(doc_id))
            .or_default()
            .clone();
        // Every wait of this placement ends by one deadline, its turn included: `Open`s of
        // one document waiting together are answered together, not one patience after
        // another.
        let patience = Instant::now() + self.hand_over_patience();
        // One placement of the document at a time; the state is locked only to look
        // at and change it.
        let _placing = loop {
            match tenancy.placing.try_lock() {
                Ok(placing) => break placing,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() > patience => {
                    return Err(unavailable(&"another placement of it is under way; retry"));
                }
                Err(std::sync::TryLockError::WouldBlock) => std::thread::sleep(POLL),
            }
        };
        // Again under the placement lock: a drain that began meanwhile either waits for
        // this placement (it takes the lock to hand the document over, and found the
        // entry made above) or took the lock first, and then this sees it draining.
        if self.draining.load(Ordering::SeqCst) {
            self.forget_if_idle(doc_id, &tenancy);
            return Ok(Route::Elsewhere(self.successor(doc_id)));
        }
        // Being handed over (checked under the state's lock, which the handover takes to
        // begin): not claimed again before its queued writes resolved and it is
        // released. The `Open` waits for that rather than being refused (this runs on a
        // blocking thread). Likewise for the late writes of its last tenure here: loaded
        // before they resolved, the document would miss what they write, and they
        // would still pass the fence of the epoch it is claimed in again.
        let mut serving = loop {
            let serving = tenancy.state();
            if !lock(&self.handing_over).contains(doc_id) && self.settled(doc_id) {
                break serving;
            }
            drop(serving);
            if Instant::now() > patience {
                if lock(&self.erasing).contains(doc_id) {
                    return Err(unavailable(&"a deletion of it is under way; retry"));
                }
                return Err(unavailable(&"it is being handed to another node; retry"));
            }
            std::thread::sleep(POLL);
        };
        if let Some(s) = &*serving {
            if self.replicator.serving(s.tenure).is_ok() {
                return Ok(Route::Here);
            }
            // Lost, and not evicted yet: now, and the server is told to drop its copy
            // (sessions redirected here) before the document is loaded again; the client
            // retries its `Open` meanwhile.
            *serving = None;
            drop(serving);
            self.local.evict(doc_id).map_err(|e| unavailable(&e))?;
            let _ = self.moved.send((Arc::from(doc_id), self.here.clone()));
            return Err(unavailable(&"it is being reloaded; retry"));
        }
        // Not served, and nothing but this placement makes it served: the store's
        // requests below go without the state's lock.
        drop(serving);
        let member = self.member();
        // Placement: a document nobody serves is claimed by its preferred owner among the
        // live nodes (rendezvous hashing), so documents spread evenly over the nodes.
        let placed = match self.placed_elsewhere(doc_id).map_err(|e| unavailable(&e))? {
            Some(owner) => Placed::Elsewhere(owner),
            None => self.claim(doc_id, patience).map_err(|e| unavailable(&e))?,
        };
        let epoch = match placed {
            Placed::Claimed(epoch) => epoch,
            Placed::Elsewhere(owner) => {
                self.forget_if_idle(doc_id, &tenancy);
                return Ok(Route::Elsewhere(owner));
            }
        };
        // The tenure begins before the load: a lapse meanwhile ends it.
        let tenure = self
            .replicator
            .begin_tenure()
            .map_err(|e| unavailable(&e))?;
        let loaded = member.load(doc_id).map_err(|e| unavailable(&e))?;
        let (snapshot, ops) = decode_loaded(doc_id, loaded).map_err(|e| unavailable(&e))?;
        let snapshot_seq = snapshot.as_ref().map(|s| s.last_included_seq);
        self.local
            .install(doc_id, snapshot, &ops)
            .map_err(|e| unavailable(&e))?;
        // Served from here on, if the tenure still holds: checked under the state's lock,
        // so that a loss of the tenure is either seen here or handled after it (the
        // replicator marks a tenure lost before its handler takes this lock to evict).
        let mut serving = tenancy.state();
        self.replicator
            .serving(tenure)
            .map_err(|e| unavailable(&e))?;
        tracing::info!(
            doc = doc_id,
            epoch = epoch.0,
            snapshot = ?snapshot_seq,
            ops = ops.len(),
            "document claimed and loaded"
        );
        *serving = Some(Serving {
            epoch,
            tenure,
            last_op: None,
            unjournaled: std::collections::VecDeque::new(),
            since_snapshot: ops.len() as u64,
            snapshot_queued: false,
            last_snapshot: snapshot_seq,
        });
        Ok(Route::Here)
    }

    /// Where a document not served here goes if this node is not its preferred owner:
    /// its owner if it has one, else the preferred owner, which claims it at its `Open`
    /// (`None`: this node claims it).
    fn placed_elsewhere(&self, doc_id: &str) -> Result<Option<Owner>, ClusterError> {
        let member = self.member();
        let nodes = member.live_nodes()?;
        let preferred =
            crate::cluster::hashing::preferred_owner(doc_id, nodes.iter().map(|n| n.node.as_str()));
        let Some(preferred) = nodes.iter().find(|n| Some(n.node.as_str()) == preferred) else {
            return Ok(None);
        };
        if preferred.node == member.node() {
            return Ok(None);
        }
        Ok(match member.owner(doc_id)? {
            // Owned here under the current lease (a claim whose answer was lost): the
            // claim finds its epoch.
            Some(owner) if owner.node == member.node() => None,
            Some(owner) => Some(owner_at(&owner.addr)),
            None => Some(owner_at(&preferred.addr)),
        })
    }

    /// Claims `doc_id`, or finds where it is served. An owner that is leaving (draining:
    /// its ownership about to be released) is waited for, up to `patience` (the
    /// placement's deadline, [`HAND_OVER_PATIENCE`] after it began), rather than refusing
    /// the `Open`.
    fn claim(&self, doc_id: &str, patience: Instant) -> Result<Placed, String> {
        let member = self.member();
        loop {
            match member.claim(doc_id).map_err(|e| e.to_string())? {
                Claim::Owned(epoch) => return Ok(Placed::Claimed(epoch)),
                Claim::OwnedBy {
                    addr: Some(addr), ..
                } => return Ok(Placed::Elsewhere(owner_at(&addr))),
                Claim::OwnedBy { node, addr: None } => {
                    if Instant::now() > patience {
                        return Err(format!("its owner {node:?} is leaving; retry"));
                    }
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Whether every journal write of `doc_id`'s last tenure here resolved (module notes
    /// on [`Inner::unsettled`]); forgets it once it did.
    fn settled(&self, doc_id: &str) -> bool {
        let mut unsettled = lock(&self.unsettled);
        match unsettled.get(doc_id) {
            Some(&last) if !self.replicator.resolved(last) => false,
            Some(_) => {
                unsettled.remove(doc_id);
                true
            }
            None => true,
        }
    }

    /// Forgets the documents of [`Inner::unsettled`] whose journal writes resolved since.
    /// [`Inner::settled`] forgets one only when it is placed here again: a document
    /// never opened here again would keep its entry for as long as the node runs.
    fn prune_settled(&self) {
        lock(&self.unsettled).retain(|_, &mut last| !self.replicator.resolved(last));
    }

    /// A tenure of `doc` ended here with its journal writes up to `last` possibly
    /// unresolved: the document is not loaded here again before they are.
    fn unsettled(&self, doc: &Arc<str>, last: Option<u64>) {
        if let Some(last) = last.filter(|&last| !self.replicator.resolved(last)) {
            lock(&self.unsettled).insert(doc.clone(), last);
        }
    }

    /// Drops the tenancy entry of a document not served here (bounded memory: only
    /// documents served here, or being placed, have one).
    fn forget_if_idle(&self, doc_id: &str, tenancy: &Tenancy) {
        let mut docs = lock(&self.docs);
        // Under the map's lock nobody takes a new handle on the entry, so the handles
        // counted are the map's, the caller's, and those of the other calls that hold
        // one now: a placement (`place`), a loss or a handover. With any of those the
        // entry stays (a placement would otherwise serve the document from an entry
        // the map no longer has).
        if Arc::strong_count(tenancy) <= 2 && tenancy.state().is_none() {
            docs.remove(doc_id);
        }
    }

    /// The tenure `doc_id` is served in, locked for a submit or a read.
    fn serving<'a>(
        &self,
        doc_id: &str,
        tenancy: &'a Tenancy,
    ) -> Result<StateGuard<'a>, SubmitError> {
        let guard = tenancy.state();
        match &*guard {
            Some(s) => {
                self.replicator
                    .serving(s.tenure)
                    .map_err(|e| moved_error(e, &self.here))?;
                Ok(guard)
            }
            None => {
                tracing::debug!(doc = doc_id, "not served here");
                Err(SubmitError::Moved(self.here.clone()))
            }
        }
    }

    fn ticket(&self, pending: Pending) -> Ticket {
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let mut tickets = lock(&self.tickets);
        if tickets.len() >= MAX_PENDING_TICKETS {
            // Only a ticket nobody waits for gets this old (module notes on the bound).
            let (oldest, _) = tickets.pop_first().expect("full");
            tracing::warn!(
                ticket = oldest,
                "a durability ticket never waited for, dropped"
            );
        }
        tickets.insert(id, pending);
        Ticket(id)
    }

    /// The seq up to which every op of the document is in the journal (those after it
    /// are not known to be yet; `u64::MAX`: every op sequenced in the tenure is), for
    /// what only durable ops may answer (`ops_after`). Forgets the ops seen resolved.
    /// An error once the tenure is lost.
    fn journaled_upto(&self, s: &mut Serving) -> Result<u64, SubmitError> {
        while let Some(&(_, id)) = s.unjournaled.front() {
            match self.replicator.outcome(id, s.tenure) {
                None => break,
                Some(Ok(())) => {
                    s.unjournaled.pop_front();
                }
                Some(Err(e)) => return Err(moved_error(e, &self.here)),
            }
        }
        Ok(s.unjournaled.front().map_or(u64::MAX, |&(seq, _)| seq - 1))
    }

    /// [`Inner::journaled_upto`] of a document served here, the tenancy lock held only
    /// for that: the caller reads the local log after it (blocking reads under the lock
    /// would stall submits, and `incarnation`, which the server asks under its
    /// documents' lock). The ops up to it stay as they are: a reload from the store
    /// holds the same ones.
    fn journaled_upto_of(&self, doc_id: &str) -> Result<u64, String> {
        let Some(tenancy) = self.tenancy(doc_id) else {
            return Err(format!(
                "document {doc_id:?} is not served by this node; read it at its owner"
            ));
        };
        let mut serving = self
            .serving(doc_id, &tenancy)
            .map_err(|e| format!("document {doc_id:?}: {e}"))?;
        let s = serving.as_mut().expect("checked by serving()");
        self.journaled_upto(s)
            .map_err(|e| format!("document {doc_id:?}: {e}"))
    }

    /// A ticket for what `doc_id`'s newest op waits for (a resend's answer, a read).
    fn newest_ticket(&self, serving: &Serving, local: Ticket) -> Ticket {
        self.ticket(Pending {
            local,
            journal: serving.last_op,
            tenure: serving.tenure,
        })
    }

    /// Writes the queued snapshots: the count written.
    fn write_snapshots(&self) -> usize {
        let mut written = 0;
        loop {
            let Some(doc) = lock(&self.snapshots).pop_front() else {
                return written;
            };
            match self.snapshot(&doc) {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(doc = &*doc, "snapshot to the store: {e}"),
            }
        }
    }

    /// Writes `doc`'s state to the store as a snapshot, then truncates its journal
    /// through the previous snapshot (kept: a new owner loads from it while the journal
    /// continues from it). The state may hold ops whose journal write is still under way:
    /// the snapshot is fenced by the same epoch, so it lands only while this node owns
    /// the document, and a new owner that loads it has those ops, as if their journal
    /// writes had landed (their clients' resends are answered from its dedupe table).
    fn snapshot(&self, doc: &str) -> Result<bool, String> {
        let Some(tenancy) = self.tenancy(doc) else {
            return Ok(false);
        };
        let (epoch, snapshot, previous) = {
            let mut serving = tenancy.state();
            let Some(s) = serving.as_mut() else {
                return Ok(false);
            };
            s.snapshot_queued = false;
            if self.replicator.serving(s.tenure).is_err() {
                return Ok(false);
            }
            let Some(snapshot) = self.local.snapshot_of(doc).map_err(|e| e.to_string())? else {
                return Ok(false);
            };
            s.since_snapshot = 0;
            (s.epoch, snapshot, s.last_snapshot)
        };
        let seq = snapshot.last_included_seq;
        let member = self.member();
        member
            .write_snapshot(doc, epoch, seq, &snapshot.encode())
            .map_err(|e| format!("{e:?}"))?;
        if let Some(previous) = previous {
            loop {
                let deleted = member
                    .truncate(doc, epoch, previous)
                    .map_err(|e| format!("{e:?}"))?;
                if deleted < crate::cluster::store::MAX_TXN_OPS as u64 {
                    break;
                }
            }
        }
        if let Some(s) = tenancy.state().as_mut() {
            if s.epoch == epoch {
                s.last_snapshot = Some(seq);
            }
        }
        Ok(true)
    }

    fn handle(&self, loss: Loss) {
        let docs: Vec<(Arc<str>, Tenancy)> = match &loss {
            Loss::Document { doc, .. } => self
                .tenancy(doc)
                .map(|t| (doc.clone(), t))
                .into_iter()
                .collect(),
            Loss::All { .. } => lock(&self.docs)
                .iter()
                .map(|(d, t)| (d.clone(), t.clone()))
                .collect(),
        };
        for (doc, tenancy) in docs {
            let mut serving = tenancy.state();
            let Some(s) = &*serving else { continue };
            if self.replicator.serving(s.tenure).is_ok() {
                continue;
            }
            *serving = None;
            if let Err(e) = self.local.evict(&doc) {
                tracing::error!(doc = &*doc, "evicting a document this node lost: {e}");
            }
            drop(serving);
            let owner = self.owner_of(&doc);
            tracing::info!(doc = &*doc, to = &*owner.addr, "document moved: {loss:?}");
            let _ = self.moved.send((doc.clone(), owner));
            self.forget_if_idle(&doc, &tenancy);
        }
    }

    /// Hands `docs` over: each stops taking ops at once (a submit is answered
    /// [`SubmitError::Moved`], so its client comes back through `Open`); once its queued
    /// journal writes resolved (all documents waited for together, up to
    /// [`HAND_OVER_PATIENCE`]), its ownership is released in the store, it is evicted,
    /// and its sessions are sent to `to(doc)`, which claims it at their `Open`. Every op
    /// acknowledged here is in the journal the next owner loads; an op still queued past
    /// the patience fails its fence and is never acknowledged. Blocking. The count.
    fn hand_over(&self, docs: Vec<(Arc<str>, Tenancy)>, to: impl Fn(&str) -> Owner) -> usize {
        let mut stopped = Vec::with_capacity(docs.len());
        for (doc, tenancy) in docs {
            // A placement under way finishes first (this is a blocking thread): the
            // document it serves is handed over with the others.
            let placing = lock(&tenancy.placing);
            let mut serving = tenancy.state();
            // Lost already: the loss handler evicts it and says where it went.
            if serving
                .as_ref()
                .is_none_or(|s| self.replicator.serving(s.tenure).is_err())
            {
                continue;
            }
            let s = serving.take().expect("checked");
            // Before the tenancy lock goes: an `Open` here meanwhile waits (`place`).
            lock(&self.handing_over).insert(doc.clone());
            drop(serving);
            drop(placing);
            stopped.push((doc, tenancy, s));
        }
        let patience = Instant::now() + self.hand_over_patience();
        for (doc, _, s) in &stopped {
            let Some(last) = s.last_op else { continue };
            while self.replicator.outcome(last, s.tenure).is_none() {
                if Instant::now() > patience {
                    tracing::warn!(doc = &**doc, "handing over with journal writes unresolved");
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        let member = self.member();
        let handed = stopped.len();
        for (doc, tenancy, s) in stopped {
            if let Err(e) = member.release(&doc, s.epoch) {
                // Perhaps still owned here, in the same epoch: a late write would pass its
                // fence after a reload here.
                tracing::warn!(doc = &*doc, "releasing a document handed over: {e}");
                self.unsettled(&doc, s.last_op);
            }
            if let Err(e) = self.local.evict(&doc) {
                tracing::warn!(doc = &*doc, "evicting a document handed over: {e}");
            }
            lock(&self.handing_over).remove(&doc);
            self.forget_if_idle(&doc, &tenancy);
            let owner = to(&doc);
            tracing::info!(doc = &*doc, to = &*owner.addr, "document handed over");
            let _ = self.moved.send((doc, owner));
        }
        handed
    }

    /// Starts the thread that will run a deletion's erasure, waiting for it (gone, its
    /// work undone, if the sender is dropped). A thread of its own: not the caller's,
    /// which holds the server's lock on its documents, nor one the erasure's waiter
    /// drives, so the erasure finishes even if nobody waits; and one per deletion, so
    /// that a deletion waiting out its patience for a store that does not answer holds
    /// no other one back.
    fn eraser(&self) -> std::io::Result<std::sync::mpsc::SyncSender<ErasureJob>> {
        if self.refuse_erasure_threads.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "no thread (refused by the test hook)",
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<ErasureJob>(1);
        std::thread::Builder::new()
            .name("quire-erase".into())
            .spawn(move || {
                if let Ok(erase) = rx.recv() {
                    erase();
                }
            })?;
        Ok(tx)
    }

    /// The erasure of a document deleted here ([`Sequencer::delete`] of the cluster
    /// sequencer, which stopped serving it): its queued journal writes resolve (until
    /// `patience`, set when the deletion was asked: [`HAND_OVER_PATIENCE`] from then),
    /// then its keys go in one fenced txn. Either way it is not served here afterwards,
    /// and its local copy is gone. Blocking.
    fn erase(
        &self,
        doc: &Arc<str>,
        tenancy: &Tenancy,
        s: Serving,
        patience: Instant,
    ) -> Result<(), DeleteRefused> {
        let mut outcome = Ok(());
        if let Some(last) = s.last_op {
            outcome = loop {
                match self.replicator.outcome(last, s.tenure) {
                    Some(Ok(())) => break Ok(()),
                    Some(Err(e)) => break Err(format!("its journal write failed: {e}")),
                    None if Instant::now() > patience => {
                        // Still owned here, in the same epoch: not loaded again before
                        // they resolved (`place`).
                        self.unsettled(doc, Some(last));
                        break Err("its journal writes did not resolve in time".into());
                    }
                    None => std::thread::sleep(POLL),
                }
            };
        }
        // Nothing deleted, and asking again may succeed (here, or at the new owner).
        let not_deleted = |why: String| {
            DeleteRefused::Unavailable(Arc::from(format!(
                "document {doc:?} was not deleted: {why}"
            )))
        };
        let outcome = outcome.map_err(not_deleted).and_then(|()| {
            self.replicator
                .member()
                .erase(doc, s.epoch)
                .map_err(|e| match e {
                    CommitError::Lost(_) => not_deleted("another node serves it now".into()),
                    // The txn may have committed (its answer lost): say so, not "not
                    // deleted". Asking again tells (a document gone answers as one
                    // never written).
                    e => DeleteRefused::Failed(Arc::from(format!(
                        "whether document {doc:?} was deleted is not known (the store did \
                         not answer: {e:?}); delete it again to know"
                    ))),
                })
        });
        // The local copy is a cache: gone either way (its tombstone is in the log).
        if let Err(e) = self.local.finish_delete(doc) {
            tracing::warn!(
                doc = &**doc,
                "removing the local copy of a deleted document: {e}"
            );
        }
        // `erasing` first: a deletion of the document claimed again meanwhile marks it
        // anew only once it is out of `handing_over`.
        lock(&self.erasing).remove(doc);
        lock(&self.handing_over).remove(doc);
        self.forget_if_idle(doc, tenancy);
        match &outcome {
            Ok(()) => tracing::info!(doc = &**doc, "document deleted from the cluster"),
            Err(e) => tracing::warn!(doc = &**doc, "deleting the document: {e}"),
        }
        outcome
    }

    fn rebalance(&self) -> usize {
        self.prune_settled();
        if self.draining.load(Ordering::SeqCst) {
            return 0;
        }
        let member = self.member();
        let nodes = match member.live_nodes() {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!("rebalance: {e}");
                return 0;
            }
        };
        let ids: Vec<String> = nodes.iter().map(|n| n.node.clone()).collect();
        let previous = std::mem::replace(&mut *lock(&self.seen_nodes), ids);
        let steady: Vec<&crate::cluster::ownership::NodeInfo> = nodes
            .iter()
            .filter(|n| n.node == member.node() || previous.contains(&n.node))
            .collect();
        if !steady.iter().any(|n| n.node == member.node()) {
            // Not live itself (its lease lapsed and it registers again): the loss
            // handler deals with its documents.
            return 0;
        }
        let preferred = |doc: &str| {
            let id = crate::cluster::hashing::preferred_owner(
                doc,
                steady.iter().map(|n| n.node.as_str()),
            );
            steady.iter().find(|n| Some(n.node.as_str()) == id).copied()
        };
        let moving: Vec<(Arc<str>, Tenancy)> = lock(&self.docs)
            .iter()
            .filter(|(doc, _)| preferred(doc).is_some_and(|p| p.node != member.node()))
            .map(|(d, t)| (d.clone(), t.clone()))
            .collect();
        if moving.is_empty() {
            return 0;
        }
        tracing::info!(
            documents = moving.len(),
            "rebalancing: documents go to their preferred owners"
        );
        self.hand_over(moving, |doc| {
            preferred(doc).map_or_else(|| self.here.clone(), |p| owner_at(&p.addr))
        })
    }

    /// The node a drained document goes to: its preferred owner among the other live
    /// nodes; this node if there is none (its clients then come back and find it gone).
    fn successor(&self, doc: &str) -> Owner {
        let nodes = self.member().live_nodes().unwrap_or_default();
        self.successor_among(doc, &nodes)
    }

    /// [`Inner::successor`] among `nodes` (the live nodes, read once for many documents).
    fn successor_among(&self, doc: &str, nodes: &[crate::cluster::ownership::NodeInfo]) -> Owner {
        let member = self.member();
        let others = nodes.iter().filter(|n| n.node != member.node());
        let preferred =
            crate::cluster::hashing::preferred_owner(doc, others.clone().map(|n| n.node.as_str()));
        match preferred.and_then(|p| others.clone().find(|n| n.node == p)) {
            Some(node) => owner_at(&node.addr),
            None => self.here.clone(),
        }
    }

    /// Where `doc` is served now, as far as the store says; this node if nobody owns it
    /// or the store cannot say (an `Open` here then finds out).
    fn owner_of(&self, doc: &str) -> Owner {
        let member = self.member();
        match member.owner(doc) {
            Ok(Some(node)) if node.node != member.node() => owner_at(&node.addr),
            _ => self.here.clone(),
        }
    }
}

/// The owner a membership key advertises: `host:port`, then its WebSocket URL after a
/// space if it serves WebSockets ([`advertised`]).
fn owner_at(advertised: &str) -> Owner {
    let (addr, ws_url) = advertised.split_once(' ').unwrap_or((advertised, ""));
    Owner {
        addr: Arc::from(addr),
        ws_url: Arc::from(ws_url),
    }
}

/// What a node's membership key holds for `owner` (read by `owner_at`): the address
/// to pass to [`Member::register`](crate::cluster::ownership::Member::register) for a
/// node that serves at `owner`.
pub fn advertised(owner: &Owner) -> String {
    if owner.ws_url.is_empty() {
        owner.addr.to_string()
    } else {
        format!("{} {}", owner.addr, owner.ws_url)
    }
}

/// How a node of the cluster starts ([`ClusterSequencer::start`]).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's data directory: its `cluster-cache/` subdirectory holds the local
    /// sequencer, emptied at every start (module notes).
    pub data_dir: std::path::PathBuf,
    /// The local sequencer's settings.
    pub local: super::local::LocalConfig,
    /// Every key under this prefix (no trailing `/`).
    pub prefix: String,
    /// The node's id, unique in the cluster and kept across restarts.
    pub node_id: String,
    /// Where clients reach it.
    pub advertise: Owner,
    /// The lease's TTL.
    pub ttl: Duration,
    /// A document is snapshotted to the store after this many ops, and its journal
    /// truncated through its previous snapshot.
    pub snapshot_every_ops: u64,
}

impl<S: Store + Clone + Send + Sync + 'static> ClusterSequencer<S> {
    /// Starts a node: its cache emptied and opened, registered in the store (waiting up
    /// to one TTL for the lease of its previous run to expire if that run still holds
    /// the id), its replicator and loss handler running.
    pub fn start(store: S, config: NodeConfig) -> Result<Self, String> {
        let cache = config.data_dir.join("cluster-cache");
        match std::fs::remove_dir_all(&cache) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("emptying {}: {e}", cache.display())),
        }
        let (local, _) = LocalSequencer::open(&cache, config.local.clone())
            .map_err(|e| format!("opening {}: {e}", cache.display()))?;
        let keys = crate::cluster::ownership::Keys::new(&config.prefix);
        let advertise = advertised(&config.advertise);
        let deadline = std::time::Instant::now() + config.ttl + Duration::from_secs(1);
        let member = loop {
            match crate::cluster::ownership::Member::register(
                store.clone(),
                keys.clone(),
                &config.node_id,
                &advertise,
                config.ttl,
            ) {
                Ok(member) => break member,
                Err(ClusterError::NodeIdTaken { addr }) if std::time::Instant::now() < deadline => {
                    tracing::info!(%addr, "node id held by a previous run; waiting for its lease");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(format!("registering as {:?}: {e}", config.node_id)),
            }
        };
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let replicator = Replicator::start(
            member,
            Arc::new(crate::cluster::replicator::SystemClock::default()),
            crate::cluster::replicator::LeaseTiming::for_ttl(config.ttl),
            crate::cluster::replicator::Drive::Threads,
            Box::new(move |loss| {
                let _ = lock(&tx).send(loss);
            }),
        );
        tracing::info!(
            node = config.node_id,
            advertise,
            prefix = config.prefix,
            "registered in the cluster"
        );
        Ok(ClusterSequencer::new(
            local,
            replicator,
            rx,
            config.advertise,
            config.snapshot_every_ops,
            true,
        ))
    }
}

impl<S: Store + Send + Sync + 'static> ClusterSequencer<S> {
    /// Hands every document served here to its preferred owner among the other live
    /// nodes (SIGTERM): from now on nothing new is placed here, `Open` is redirected and
    /// the other nodes no longer count this one as live; each document is handed over
    /// (each stops taking ops, finishes its journal writes, is released, and its sessions
    /// are redirected). Blocking. The number of documents handed over.
    pub fn drain(&self) -> usize {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::SeqCst);
        if let Err(e) = inner.member().withdraw() {
            tracing::warn!("withdrawing from placement: {e}");
        }
        let docs: Vec<(Arc<str>, Tenancy)> = lock(&inner.docs)
            .iter()
            .map(|(d, t)| (d.clone(), t.clone()))
            .collect();
        let nodes = inner.member().live_nodes().unwrap_or_default();
        inner.hand_over(docs, |doc| inner.successor_among(doc, &nodes))
    }

    /// Hands the documents served here whose preferred owner among the live nodes is now
    /// another node (one joined) to that node, as [`ClusterSequencer::drain`] does. Only
    /// nodes live at the previous call too count, so that a node coming and going does
    /// not pull documents back and forth. It also forgets the unsettled documents
    /// ([`ClusterSequencer::unsettled_documents`]) whose writes resolved. A background
    /// thread calls it every second; blocking. The number of documents handed over.
    pub fn rebalance(&self) -> usize {
        self.inner.rebalance()
    }

    /// Leaves the cluster: the queued ops are committed (or fail), then the lease is
    /// revoked, which frees every document this node owns at once (their next `Open`
    /// anywhere claims them), and the local log is closed.
    pub fn close(&self) {
        let replicator = &self.inner.replicator;
        replicator.shutdown();
        if let Err(e) = replicator.member().resign() {
            tracing::warn!("leaving the cluster: {e} (the lease expires by itself)");
        }
        self.inner.local.close();
    }
}

/// The encoding of a journal entry's body: the op as the local log encodes it (a
/// type-2 record's payload, fingerprint included).
fn entry_body(record: OpRecordRef<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(record.encoded_len());
    record.encode(&mut body);
    body
}

/// The snapshot and ops of a document loaded from the store, decoded and checked
/// against their entries.
fn decode_loaded(
    doc_id: &str,
    loaded: Loaded,
) -> Result<(Option<Snapshot>, Vec<OpRecord>), ClusterError> {
    let corrupt = |m: String| ClusterError::Corrupt(format!("document {doc_id:?}: {m}"));
    let snapshot = match loaded.snapshot {
        None => None,
        Some((seq, bytes)) => {
            let snapshot = Snapshot::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
            if snapshot.last_included_seq != seq || snapshot.doc_id != doc_id {
                return Err(corrupt(format!(
                    "the snapshot under seq {seq} is of {:?} at seq {}",
                    snapshot.doc_id, snapshot.last_included_seq
                )));
            }
            Some(snapshot)
        }
    };
    let ops = loaded
        .ops
        .iter()
        .map(|entry| {
            let record = OpRecord::decode(RecordType::OpWithFingerprint, &entry.body)
                .map_err(|e| corrupt(format!("seq {}: {e}", entry.seq)))?;
            let id = OpId {
                client_id: record.client_id,
                local_seq: record.local_seq,
            };
            if record.server_seq != entry.seq
                || id != entry.op_id
                || record.fingerprint != Some(entry.fingerprint)
                || record.doc_id != doc_id
            {
                return Err(corrupt(format!(
                    "the entry at seq {} holds another op",
                    entry.seq
                )));
            }
            Ok(record)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((snapshot, ops))
}

impl<S: Store + Send + Sync + 'static> ClusterSequencer<S> {
    /// [`Sequencer::wait_durable`] and [`Sequencer::wait_deleted`]: a deletion's ticket
    /// resolves with its erasure's outcome; any other failure is `Failed`.
    async fn wait_ticket(&self, ticket: Ticket) -> Result<(), DeleteRefused> {
        let failed = |why: String| DeleteRefused::Failed(Arc::from(why));
        let pending = lock(&self.inner.tickets).remove(&ticket.0);
        let Some(pending) = pending else {
            return Err(failed(format!("unknown ticket {}", ticket.0)));
        };
        let erasure = lock(&self.inner.erasures).remove(&ticket.0);
        let local = self.inner.local.wait_durable(pending.local).await;
        if let Some(erasure) = erasure {
            // A deletion is what the store did: its erasure goes on whatever the local
            // log (a cache here) does, and the document is gone from the cluster iff
            // that txn committed. A local failure is reported by every op after it.
            if let Err(e) = &local {
                tracing::error!("the local log failed under a deletion: {e}");
            }
            return erasure
                .await
                .unwrap_or_else(|_| Err(failed("the deletion was abandoned".into())));
        }
        local.map_err(DeleteRefused::Failed)?;
        let replicator = &self.inner.replicator;
        match pending.journal {
            Some(id) => replicator.wait(id, pending.tenure).await,
            None => replicator.serving(pending.tenure),
        }
        .map_err(|e| failed(e.to_string()))
    }
}

impl<S: Store + Send + Sync + 'static> Sequencer for ClusterSequencer<S> {
    async fn route(&self, doc_id: &str) -> Result<Route, RouteError> {
        // Served here already: no store request, no thread.
        if let Some(tenancy) = self.inner.tenancy(doc_id) {
            if let Some(s) = &*tenancy.state() {
                if self.inner.replicator.serving(s.tenure).is_ok() {
                    return Ok(Route::Here);
                }
            }
        }
        if self.inner.place_inline.load(Ordering::SeqCst) {
            return self.inner.place(doc_id);
        }
        let inner = self.inner.clone();
        let doc = doc_id.to_owned();
        tokio::task::spawn_blocking(move || inner.place(&doc))
            .await
            .unwrap_or_else(|e| Err(RouteError::Unavailable(format!("placing failed: {e}"))))
    }

    fn here(&self) -> Option<Owner> {
        Some(self.inner.here.clone())
    }

    fn incarnation(&self, doc_id: &str) -> u64 {
        self.inner
            .tenancy(doc_id)
            .and_then(|t| t.state().as_ref().map(Serving::incarnation))
            .unwrap_or(0)
    }

    fn storage_stats(&self) -> StorageStats {
        self.inner.local.storage_stats()
    }

    fn list_documents(&self, after: Option<&str>, limit: usize) -> Vec<DocSummary> {
        self.inner.local.list_documents(after, limit)
    }

    fn read_at(&self, doc_id: &str, seq: u64) -> Result<Option<DocView>, ReadAtError> {
        // Only what the journal has (as `ops_after`), of a document served here (the
        // local log of any other is a cache, emptied when it left).
        let upto = self
            .inner
            .journaled_upto_of(doc_id)
            .map_err(|why| ReadAtError::Storage(Arc::from(why)))?;
        if seq > upto {
            return Err(ReadAtError::Future { newest: upto });
        }
        self.inner.local.read_at(doc_id, seq)
    }

    /// Deletes a document served here (the server routes it here first): it stops
    /// taking ops at once (as at a handover, an `Open` here waits), the local log gets its
    /// tombstone, and, once its queued journal writes resolved (the ops sequenced before
    /// the deletion are acknowledged, then deleted with it), one fenced txn deletes its
    /// journal, snapshots and owner key ([`crate::cluster::ownership::Member::erase`]).
    /// The ticket is durable once that txn committed; it fails if the document was lost
    /// first (then nothing was deleted: its new owner serves all of it). A document
    /// nobody wrote (version 0) is not deleted: `Ok(None)`.
    fn delete(&self, doc_id: &str) -> Result<Option<super::Deletion>, DeleteRefused> {
        let inner = &self.inner;
        // Routed here a moment ago: a document no longer served here moved meanwhile.
        let Some(tenancy) = inner.tenancy(doc_id) else {
            return Err(DeleteRefused::Unavailable(Arc::from(format!(
                "document {doc_id:?} is not served by this node; delete it at its owner"
            ))));
        };
        let mut serving = inner.serving(doc_id, &tenancy).map_err(|e| {
            DeleteRefused::Unavailable(Arc::from(format!("document {doc_id:?}: {e}")))
        })?;
        if inner.local.version(doc_id) == 0 {
            return Ok(None);
        }
        // The erasure's thread first: a deletion no thread can be had for is refused
        // before anything is deleted, rather than erased on the caller's thread.
        let eraser = if inner.place_inline.load(Ordering::SeqCst) {
            None
        } else {
            Some(inner.eraser().map_err(|e| {
                DeleteRefused::Unavailable(Arc::from(format!(
                    "document {doc_id:?} was not deleted: no thread for its erasure ({e}); \
                     retry"
                )))
            })?)
        };
        let Some(local) = inner.local.delete(doc_id)? else {
            return Ok(None);
        };
        let s = serving.take().expect("checked by serving()");
        // Before the tenancy lock goes, as at a handover: an `Open` here meanwhile waits
        // for the erasure (`place`), and the node keeps owning the document till then.
        lock(&inner.erasing).insert(Arc::from(doc_id));
        lock(&inner.handing_over).insert(Arc::from(doc_id));
        drop(serving);
        let ticket = inner.ticket(Pending {
            local: local.ticket,
            journal: None,
            tenure: s.tenure,
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&inner.erasures).insert(ticket.0, rx);
        // The erasure's patience runs from now, not from whenever its thread starts.
        let patience = Instant::now() + inner.hand_over_patience();
        let erase = {
            let (inner, doc) = (self.inner.clone(), Arc::<str>::from(doc_id));
            move || {
                let _ = tx.send(inner.erase(&doc, &tenancy, s, patience));
            }
        };
        match eraser {
            None => erase(),
            Some(eraser) => eraser
                .send(Box::new(erase))
                .expect("the erasure's thread waits for it"),
        }
        Ok(Some(super::Deletion {
            version: local.version,
            ticket,
        }))
    }

    fn submit(&self, doc_id: &str, op: &SubmitOp) -> Result<Submitted, SubmitError> {
        let inner = &self.inner;
        let Some(tenancy) = inner.tenancy(doc_id) else {
            return Err(SubmitError::Moved(inner.here.clone()));
        };
        let mut serving = inner.serving(doc_id, &tenancy)?;
        let s = serving.as_mut().expect("checked by serving()");
        // Transformed for a load that ended (the server's copy checked the load just
        // before the document was reloaded): the copy's clients open it again here.
        if op
            .expected_incarnation
            .is_some_and(|i| i != s.incarnation())
        {
            return Err(SubmitError::Moved(inner.here.clone()));
        }
        // Forgets the ops whose journal write resolved (bounded memory); a lost tenure
        // refuses the op before anything is applied.
        inner.journaled_upto(s)?;
        let (op_id, base_version, fingerprint) = (op.op_id, op.base_version, op.fingerprint);
        match inner.local.submit(doc_id, op)? {
            Submitted::Applied { seq, ticket } => {
                let record = OpRecordRef {
                    doc_id,
                    client_id: op_id.client_id,
                    local_seq: op_id.local_seq,
                    server_seq: seq,
                    base_version,
                    timestamp_ms: crate::wal::now_ms(),
                    patches: &op.patches,
                    fingerprint: Some(fingerprint),
                };
                let entry = JournalEntry {
                    seq,
                    op_id,
                    fingerprint,
                    body: entry_body(record),
                };
                // Under the document's tenancy lock: the journal gets its ops in seq
                // order. A refusal means the tenure just ended: the loss handler evicts
                // the document, with this op.
                // (A refusal leaves the op out of `unjournaled`: the tenure is lost for
                // good, so nothing reads the document through it again.)
                let id = inner
                    .replicator
                    .submit(Arc::from(doc_id), s.tenure, s.epoch, entry)
                    .map_err(|e| moved_error(e, &inner.here))?;
                s.last_op = Some(id);
                s.unjournaled.push_back((seq, id));
                s.since_snapshot += 1;
                if s.since_snapshot >= inner.snapshot_every_ops && !s.snapshot_queued {
                    s.snapshot_queued = true;
                    lock(&inner.snapshots).push_back(Arc::from(doc_id));
                }
                let ticket = inner.ticket(Pending {
                    local: ticket,
                    journal: Some(id),
                    tenure: s.tenure,
                });
                Ok(Submitted::Applied { seq, ticket })
            }
            Submitted::Duplicate { seq, ticket } => Ok(Submitted::Duplicate {
                seq,
                ticket: inner.newest_ticket(s, ticket),
            }),
        }
    }

    fn applied(
        &self,
        doc_id: &str,
        op_id: OpId,
        fingerprint: u64,
    ) -> Option<Result<Submitted, SubmitError>> {
        let inner = &self.inner;
        let tenancy = inner.tenancy(doc_id)?;
        let serving = match inner.serving(doc_id, &tenancy) {
            Ok(serving) => serving,
            Err(e) => return Some(Err(e)),
        };
        let s = serving.as_ref().expect("checked by serving()");
        Some(
            inner
                .local
                .applied(doc_id, op_id, fingerprint)?
                .map(|submitted| match submitted {
                    Submitted::Duplicate { seq, ticket } => Submitted::Duplicate {
                        seq,
                        ticket: inner.newest_ticket(s, ticket),
                    },
                    applied @ Submitted::Applied { .. } => applied,
                }),
        )
    }

    /// Client ids unique in the cluster: the top bit (as a single node's), this node's
    /// registration revision, then a counter of 2^24 ids; past it,
    /// the node gives out no more until it restarts (registers again).
    fn assign_client_id(&self) -> Result<u64, Arc<str>> {
        let id = self.inner.next_client.fetch_add(1, Ordering::Relaxed);
        let first = first_client_id(self.inner.replicator.member().registered_at());
        if id - first >= IDS_PER_REGISTRATION {
            return Err(Arc::from(
                "this node gave out every client id of its registration; restart it",
            ));
        }
        Ok(id)
    }

    fn version(&self, doc_id: &str) -> u64 {
        self.inner.local.version(doc_id)
    }

    async fn wait_durable(&self, ticket: Ticket) -> Result<(), Arc<str>> {
        self.wait_ticket(ticket).await.map_err(|e| match e {
            DeleteRefused::Unavailable(why) | DeleteRefused::Failed(why) => why,
        })
    }

    async fn wait_deleted(&self, ticket: Ticket) -> Result<(), DeleteRefused> {
        self.wait_ticket(ticket).await
    }

    fn read_now(
        &self,
        doc_id: &str,
        reader: Option<u64>,
    ) -> Result<Option<(DocView, Ticket)>, Arc<str>> {
        let inner = &self.inner;
        let Some(tenancy) = inner.tenancy(doc_id) else {
            return Err(Arc::from(format!("document {doc_id:?} is not served here")));
        };
        let serving = inner
            .serving(doc_id, &tenancy)
            .map_err(|e| Arc::from(e.to_string()))?;
        let s = serving.as_ref().expect("checked by serving()");
        let Some((view, local)) = inner.local.read_now(doc_id, reader)? else {
            return Ok(None);
        };
        Ok(Some((view, inner.newest_ticket(s, local))))
    }

    fn ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Option<Vec<SequencedOp>>, Arc<str>> {
        // Durable here means in the journal too: the local log has ops whose journal
        // write may never commit (a catch-up at `Open` sent them as if acknowledged).
        let upto = self.inner.journaled_upto_of(doc_id).map_err(Arc::from)?;
        let mut ops = self.inner.local.ops_after(doc_id, after_seq, limit)?;
        if let Some(ops) = &mut ops {
            ops.retain(|op| op.seq <= upto);
        }
        Ok(ops)
    }
}
