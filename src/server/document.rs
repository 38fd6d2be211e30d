//! One open document on the server: the window of recent ops that late ops are
//! transformed over, the subscribed sessions, and delivery of acks and broadcasts in
//! seq order once each op is durable.
//!
//! The document core knows nothing of the protocol: it speaks domain types (ops, seqs,
//! [`Refusal`]s) and reaches its subscribers through the [`Subscriber`] trait, which the
//! session side implements (`server/wire.rs`: it builds the frames and maps refusals
//! to wire codes). A message is built once ([`Subscriber::frame`]) and the same built value
//! goes to every subscriber: a broadcast is encoded once, whatever the number of
//! subscribers.
//!
//! The authoritative text, version and dedupe table live in the [`Sequencer`]; this
//! keeps only what transformation and fan-out need. The version is the sequencer's
//! ([`Sequencer::version`]); the document stores none, and derives the one it checks
//! an op against from the ops it sequenced (`State::sequenced`).
//!
//! **Late ops.** An op made on `base_version` is transformed over every op sequenced
//! after it, each exactly once and in seq order (`Job::over` checks the seqs are
//! consecutive). The newest ops are in memory (the window); the window only lets go of
//! ops already delivered, so every op older than the window is durable and can be read
//! from the log ([`Step::ReadLog`]; the caller reads it off the async workers). The
//! transform runs outside the document's lock; only the ops sequenced meanwhile are
//! transformed under it, right before the op is sequenced.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// The subscriber table's hasher: fixed keys, so that a broadcast reaches subscribers in
/// the same order on every run (the simulator replays a seed exactly). Session ids are
/// the server's own numbers, so fixed keys give a client nothing to collide on; the
/// table stays a `HashMap` (a `BTreeMap` node is about 900 bytes per open document).
type SessionHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

use crate::op::{OpId, Patch, SequencedOp};
use crate::ot::{Side, TextOp};
use crate::sequencer::{
    fingerprint, Deletion, Owner, Sequencer, SubmitError, SubmitOp, Submitted, Ticket,
};

/// Identifies a session (a connection) among a document's subscribers.
pub type SessionId = u64;

/// Ops read back from the log at a time for a late op (it steps again for the rest).
pub const LOG_READ_BATCH: u64 = 256;

/// How far behind the document an op's base may be: past it, the op is refused as
/// [`RefusalKind::TooOld`] (the client catches up and rebases itself, as after a
/// catch-up of more than as many ops). Bounds the work one op can cause.
pub const MAX_OPS_BEHIND: u64 = 10_000;

/// Slots of a document's deque of ops waiting for the disk kept when it empties (the
/// first growth of a `VecDeque` of these makes 4; a few hundred bytes per document).
const PENDING_SLOTS_KEPT: usize = 4;

/// What a document sends its subscribers, before it is built into a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// The subscriber's own op (its `Submit` numbered `request_id`) is sequenced as
    /// `seq` and durable.
    Ack {
        request_id: u32,
        local_seq: u64,
        seq: u64,
    },
    /// Another client's op, sequenced and durable.
    Op(SequencedOp),
    /// A client's presence; `P::default()` when it left.
    Presence { client_id: u64, presence: P },
    /// The document was deleted at `version` (after every op up to it was delivered).
    Deleted { version: u64 },
    /// Another node serves the document now: the subscriber goes there (the last
    /// message of the document it gets here).
    Moved(Owner),
}

/// Why a document closes a subscriber's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// What the document held for it while its snapshot was sent outgrew its queue.
    HeldPiledUp,
}

/// A session subscribed to a document, as the document sees it. Implemented by the
/// session side (a session's `Outbox`, in `server/wire.rs`), which builds frames.
/// Cheap to clone: a document holds one per subscriber.
pub trait Subscriber: Clone + Send + Sync + 'static {
    /// A message ready to send, built once by [`Subscriber::frame`] and cloned to every
    /// subscriber it goes to (cloning it must be cheap and must not allocate).
    type Frame: Clone + Send + Sync + 'static;
    /// What a client's presence holds (opaque to the document); the default is none.
    type Presence: Clone + Default + Send + Sync + 'static;

    fn session(&self) -> SessionId;
    fn client_id(&self) -> u64;

    /// Builds the message for `event` on document `doc`, at most `max_frame` bytes.
    fn frame(doc: &str, event: Event<Self::Presence>, max_frame: usize) -> Self::Frame;
    /// The bytes a built message takes in a subscriber's queue.
    fn frame_len(frame: &Self::Frame) -> usize;
    /// The most bytes of pushed messages the subscriber's queue holds.
    fn push_capacity(&self) -> usize;
    /// Queues a message without waiting. Returns whether it was queued (a subscriber
    /// that does not read is closed by its queue).
    fn send(&self, frame: Self::Frame) -> bool;
    /// Closes the subscriber's session (the first reason given wins).
    fn close(&self, reason: CloseReason);
}

/// Why an op is refused. The session maps each kind to its wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The op is too large (once transformed, or for the text or the log).
    TooLarge,
    /// The op's patches do not fit the document's text.
    OutOfRange,
    /// The document id is not valid.
    InvalidDocId,
    /// The op was made on top of an op that was refused, or conflicts with ops
    /// sequenced between the client's pipelined ops: open the document again.
    PipelineConflict,
    /// The op's base is older than the ops the server keeps or transforms over.
    TooOld,
    /// The op's base is ahead of the document.
    FutureVersion,
    /// The op id was used before for another op.
    OpIdReused,
    /// The log failed (or returned other ops than asked for).
    StorageFailed,
    /// An invariant of the core broke: the op is refused rather than misapplied.
    Internal,
    /// The work on the op panicked where it ran (off the async workers).
    Crashed,
    /// The document was deleted: the op is not applied.
    Deleted,
    /// The document cannot take the op now (its deletion's outcome is not known yet):
    /// not applied; the client retries later.
    Unavailable,
}

/// An op refused, and why in words for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }
}

/// One sequenced op as late ops are transformed over it.
struct Sequenced {
    seq: u64,
    client_id: u64,
    op: Arc<TextOp>,
}

struct Pending<S: Subscriber> {
    op: SequencedOp,
    submitter: SessionId,
    request_id: u32,
    durable: bool,
    /// Its submitter was told it is not applied ([`Document::refuse_unacknowledged`]):
    /// when it is delivered all the same, its ack is not sent.
    refused: bool,
    /// Acks for resends of this op, sent right after it is delivered.
    resent: Vec<(S, S::Frame)>,
}

/// Messages for a session whose snapshot is not out yet, and their bytes.
struct Held<F> {
    frames: Vec<F>,
    bytes: usize,
}

impl<F> Default for Held<F> {
    fn default() -> Self {
        Held {
            frames: Vec::new(),
            bytes: 0,
        }
    }
}

struct State<S: Subscriber> {
    /// The newest ops, consecutive seqs ending at the document's version, oldest first.
    /// Every op older than the first one is delivered, hence durable.
    history: VecDeque<Sequenced>,
    /// Sessions whose pipelined op conflicted: their later ops are refused until they
    /// open the document again (they were made on top of the refused one).
    broken_pipelines: HashSet<SessionId>,
    /// Sequenced ops waiting for durability or for earlier seqs, in seq order: the
    /// first is `delivered + 1` (seqs are consecutive). A deque, not a map: a document
    /// with one op in flight at a time allocates a few hundred bytes per op, where a
    /// `BTreeMap`'s node (over 1 KiB) made glibc consolidate its fast bins each time.
    pending: VecDeque<Pending<S>>,
    /// Highest seq delivered to subscribers.
    delivered: u64,
    /// With fixed hash keys ([`SessionHasher`]): the same order on every run.
    subscribers: HashMap<SessionId, S, SessionHasher>,
    /// Messages for sessions that subscribed but have not been sent their snapshot yet:
    /// released by [`Document::activate`], so that no broadcast overtakes the snapshot.
    /// Bounded like the session's queue.
    held: HashMap<SessionId, Held<S::Frame>>,
    presence: BTreeMap<u64, Presence<S::Presence>>,
    /// The version the document was deleted at, once the deletion is durable: every op
    /// after is refused ([`RefusalKind::Deleted`]).
    deleted: Option<u64>,
    /// A deletion under way, not durable yet ([`Document::delete`]): the ops that reach
    /// the document meanwhile wait for its outcome ([`SubmitOutcome::AfterDeletion`]).
    deleting: Option<tokio::sync::watch::Sender<Option<DeletionEnd>>>,
    /// Why the deletion under way failed ([`Document::deletion_failed`]): the server
    /// dropped this copy, which the sequencer no longer holds as it was; every op
    /// that still reaches it is refused ([`RefusalKind::StorageFailed`]).
    deletion_failure: Option<Arc<str>>,
    /// The node that serves the document now, once this one stopped
    /// ([`Document::moved`]): nothing more is sequenced, acknowledged or broadcast here.
    moved: Option<Owner>,
}

/// One client's presence on the document, and its coalescing state.
struct Presence<P> {
    presence: P,
    session: SessionId,
    /// When it was last broadcast.
    sent_at: Instant,
    /// Changed since it was last broadcast (a flush is scheduled).
    dirty: bool,
}

/// Sends to one subscriber, or holds the message while its snapshot is not out yet.
fn deliver<S: Subscriber>(
    held: &mut HashMap<SessionId, Held<S::Frame>>,
    subscriber: &S,
    frame: S::Frame,
) {
    match held.get_mut(&subscriber.session()) {
        Some(h) if h.bytes + S::frame_len(&frame) <= subscriber.push_capacity() => {
            h.bytes += S::frame_len(&frame);
            h.frames.push(frame);
        }
        Some(_) => subscriber.close(CloseReason::HeldPiledUp),
        None => {
            subscriber.send(frame);
        }
    }
}

impl<S: Subscriber> State<S> {
    /// The seq of the newest op sequenced for this copy: on a single node, the
    /// sequencer's version of the document. Every op of it is sequenced under the copy's
    /// lock and queued as pending at once, so the copy knows it without a lookup in the
    /// sequencer's table (`of_sequencer`, asked only in debug builds and the simulator,
    /// which assert that the two agree). In a cluster the sequencer may be one op ahead
    /// of a copy whose op its journal refused (the load is ending); the submit's version
    /// check then refuses the next op as moved.
    fn sequenced(&self, of_sequencer: impl FnOnce() -> Option<u64>) -> u64 {
        let sequenced = self.delivered + self.pending.len() as u64;
        if cfg!(any(debug_assertions, feature = "sim")) {
            if let Some(version) = of_sequencer() {
                assert_eq!(
                    sequenced, version,
                    "the copy's newest seq against the sequencer's version"
                );
            }
        }
        sequenced
    }

    /// The pending op sequenced as `seq`, if it is not delivered yet.
    fn pending_mut(&mut self, seq: u64) -> Option<&mut Pending<S>> {
        let index = seq.checked_sub(self.delivered + 1)?;
        self.pending.get_mut(usize::try_from(index).ok()?)
    }

    /// Sends a presence update to the subscribers whose snapshot is out. One still
    /// waiting for it gets every client's current presence when it is activated, so
    /// holding the update too would tell it the same presence twice.
    fn deliver_presence(&mut self, except: Option<SessionId>, frame: &S::Frame) {
        let State {
            subscribers, held, ..
        } = self;
        for subscriber in subscribers.values() {
            let session = subscriber.session();
            if Some(session) != except && !held.contains_key(&session) {
                subscriber.send(frame.clone());
            }
        }
    }

    /// The window's ops after `at`, if the window still holds all of them; else the
    /// newest seq that must come from the log.
    fn window_after(&self, at: u64) -> Result<Vec<(u64, u64, Arc<TextOp>)>, u64> {
        // An empty window: every op sequenced was delivered (only delivered ops leave
        // it), so the next op is the one after the last delivered.
        let oldest = self.history.front().map_or(self.delivered + 1, |s| s.seq);
        if at + 1 < oldest {
            return Err(oldest - 1);
        }
        let skip = (at + 1 - oldest) as usize;
        Ok(self
            .history
            .range(skip.min(self.history.len())..)
            .map(|s| (s.seq, s.client_id, s.op.clone()))
            .collect())
    }

    /// Gives back the allocations of emptied tables, so that a quiet open document
    /// holds little beyond its subscribers and its history: an emptied deque keeps its slots
    /// and a `HashMap` its buckets. Called when a burst ends (every op delivered, a
    /// snapshot sent): per op for a document with one op in flight at a time, which is
    /// why `pending` is a deque of small slots. The first few slots of `pending` stay:
    /// freed and allocated again per op they cost more CPU than the bytes they hold.
    fn release_spare(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > PENDING_SLOTS_KEPT {
            self.pending = VecDeque::new();
        }
        if self.held.is_empty() && self.held.capacity() > 0 {
            self.held = HashMap::new();
        }
    }

    /// Forgets the oldest ops beyond the window, but only those already delivered (so
    /// that every op older than the window is durable, hence readable from the log).
    fn trim_history(&mut self, window: usize) {
        while self.history.len() > window
            && self
                .history
                .front()
                .is_some_and(|s| s.seq <= self.delivered)
        {
            self.history.pop_front();
        }
    }
}

pub struct Document<S: Subscriber> {
    pub id: Arc<str>,
    state: Mutex<State<S>>,
    /// The sequencer's incarnation of the document this copy was opened under.
    pub incarnation: u64,
    limits: DocumentLimits,
}

/// What a document needs of the server's settings.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    /// A client's presence is broadcast at most once per interval; updates in between
    /// are coalesced into the latest one.
    pub presence_interval: Duration,
    /// The largest message a subscriber takes (passed to [`Subscriber::frame`]).
    pub max_frame: usize,
    /// Ops kept in memory for transforming late ops (more while ops wait for
    /// durability); older ones are read from the log.
    pub history_window: usize,
}

/// A submit as a session received it.
pub struct Submission {
    pub session: SessionId,
    pub request_id: u32,
    pub client_id: u64,
    pub local_seq: u64,
    pub base_version: u64,
    pub patches: Vec<Patch>,
}

/// How large an op may be once transformed (a late op can grow past what its sender
/// sent), measured as the session measures it (its bytes on the wire).
#[derive(Debug, Clone, Copy)]
pub struct OpLimit {
    pub max: usize,
    pub measure: fn(&[Patch]) -> usize,
}

impl OpLimit {
    /// No limit.
    pub const NONE: OpLimit = OpLimit {
        max: usize::MAX,
        measure: |_| 0,
    };
}

#[derive(Debug)]
pub enum SubmitOutcome {
    /// The ack goes out through [`Document::mark_durable`] in seq order.
    Applied {
        seq: u64,
        ticket: Ticket,
    },
    /// A resend of an applied op: its original seq, acknowledged once durable.
    Duplicate {
        seq: u64,
        ticket: Ticket,
    },
    Refused(Refusal),
    /// Another node serves the document now ([`SubmitError::Moved`], or
    /// [`Document::moved`]): nothing was applied, and the session redirects the client.
    Moved(Owner),
    /// The document is being deleted and the deletion is not durable yet: nothing was
    /// applied, and the answer is the deletion's outcome ([`DeletionWait::answer`]).
    AfterDeletion(DeletionWait),
}

/// How a deletion under way ended, for the ops that reached the document meanwhile.
#[derive(Debug, Clone)]
enum DeletionEnd {
    /// Durable, at this version ([`Document::deleted`]).
    Deleted(u64),
    /// Not deleted, and served elsewhere now ([`Document::moved`]; cluster mode).
    Moved(Owner),
    /// The storage failed before the deletion was durable
    /// ([`Document::deletion_failed`]).
    Failed(Arc<str>),
}

/// An op that reached the document while it was being deleted, waiting for the
/// deletion's outcome: refused as deleted only once the deletion is durable, since one
/// that fails (cluster mode: the document moved meanwhile) leaves the document and the
/// op's client must resend it where it is served, not drop it.
#[derive(Debug)]
pub struct DeletionWait {
    id: Arc<str>,
    end: tokio::sync::watch::Receiver<Option<DeletionEnd>>,
}

/// What an op that waited for a deletion is told ([`DeletionWait::answer`]).
#[derive(Debug)]
pub enum DeletionAnswer {
    /// Not applied: the document was deleted, or the storage failed.
    Refused(Refusal),
    /// Not applied here: the document is served by `Owner` now; resend it there.
    Moved(Owner),
}

impl DeletionWait {
    /// Waits until the deletion is durable or failed.
    pub async fn answer(mut self) -> DeletionAnswer {
        let end = self
            .end
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|end| end.clone());
        match end {
            Some(DeletionEnd::Deleted(version)) => {
                DeletionAnswer::Refused(deleted_refusal(&self.id, version))
            }
            Some(DeletionEnd::Moved(owner)) => DeletionAnswer::Moved(owner),
            Some(DeletionEnd::Failed(why)) => DeletionAnswer::Refused(Refusal::new(
                RefusalKind::StorageFailed,
                format!(
                    "document {:?} was being deleted when the storage failed: {why}; the \
                     op is not applied",
                    self.id
                ),
            )),
            // The document was dropped with its deletion unresolved (the server stops).
            None => DeletionAnswer::Refused(Refusal::new(
                RefusalKind::StorageFailed,
                format!(
                    "document {:?} was being deleted when the server stopped; the op is \
                     not applied",
                    self.id
                ),
            )),
        }
    }
}

/// A submitted op on its way to being sequenced: transformed so far up to version `at`.
pub struct Job {
    session: SessionId,
    request_id: u32,
    op_id: OpId,
    base_version: u64,
    fingerprint: u64,
    /// How large the op may be once transformed (so its broadcasts fit).
    limit: OpLimit,
    op: TextOp,
    /// The op applies to the document at this version.
    at: u64,
    /// An op of another client was transformed over (after it, an op of the sender
    /// itself means a pipeline conflict).
    others_seen: bool,
}

/// What [`Document::step`] needs next.
pub enum Step {
    Done(SubmitOutcome),
    /// Read the durable ops in `(after, upto]` from the log ([`read_missed`]) and step
    /// again with them.
    ReadLog {
        after: u64,
        upto: u64,
    },
}

fn refusal(kind: RefusalKind, message: impl Into<String>) -> SubmitOutcome {
    SubmitOutcome::Refused(Refusal::new(kind, message))
}

impl Job {
    pub fn new(submission: &Submission, limit: OpLimit) -> Job {
        Job {
            session: submission.session,
            request_id: submission.request_id,
            op_id: OpId {
                client_id: submission.client_id,
                local_seq: submission.local_seq,
            },
            base_version: submission.base_version,
            fingerprint: fingerprint(submission.base_version, &submission.patches),
            limit,
            op: TextOp::from_patches(&submission.patches),
            at: submission.base_version,
            others_seen: false,
        }
    }

    /// The version the op applies to now.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Work a transform over `ops_behind` ops would take, in components.
    pub fn cost(&self, ops_behind: u64) -> u64 {
        (self.op.components().len() as u64 + 1).saturating_mul(ops_behind)
    }

    /// Transforms the op over the op sequenced as `seq` by `by`. The client's own ops
    /// were pipelined before this one, which was made on top of them: they are skipped.
    /// That is exact only while they precede every other client's op since the base;
    /// an own op after another client's means this one was made on a state the server
    /// never had (a conflict).
    fn over(&mut self, seq: u64, by: u64, over: &TextOp) -> Result<(), SubmitOutcome> {
        if seq != self.at + 1 {
            // The mechanism's invariant: never transform over the wrong ops.
            tracing::error!(
                doc_op = %self.op_id,
                at = self.at,
                seq,
                "a late op would be transformed over a non-consecutive op; refused"
            );
            return Err(refusal(
                RefusalKind::Internal,
                format!(
                    "internal: op {} at version {} met op {seq}; resend it",
                    self.op_id, self.at
                ),
            ));
        }
        self.at = seq;
        if by == self.op_id.client_id {
            if self.others_seen {
                return Err(refusal(
                    RefusalKind::PipelineConflict,
                    "a pipelined op conflicts with a concurrent op sequenced between this \
                     client's ops; open the document again and resend",
                ));
            }
            return Ok(());
        }
        self.others_seen = true;
        self.op = self.op.transform(over, Side::Left);
        Ok(())
    }

    /// Transforms over the window's ops after `at` ([`State::window_after`]), or says
    /// which ops must first be read from the log.
    fn over_window(
        &mut self,
        missed: Result<Vec<(u64, u64, Arc<TextOp>)>, u64>,
    ) -> Result<Option<Step>, SubmitOutcome> {
        match missed {
            Ok(ops) => {
                for (seq, by, op) in ops {
                    self.over(seq, by, &op)?;
                }
                Ok(None)
            }
            Err(upto) => Ok(Some(Step::ReadLog {
                after: self.at,
                upto,
            })),
        }
    }

    /// Transforms over ops read from the log.
    pub fn over_records(&mut self, records: &[SequencedOp]) -> Result<(), SubmitOutcome> {
        for r in records {
            self.over(r.seq, r.id.client_id, &TextOp::from_patches(&r.patches))?;
        }
        Ok(())
    }
}

/// Reads the durable ops in `(after, upto]` of `doc` from the log: exactly those seqs,
/// or a refusal (the log no longer holds them: too old; a storage error).
/// Blocking: call it off the async workers.
pub fn read_missed<Q: Sequencer>(
    sequencer: &Q,
    doc: &str,
    after: u64,
    upto: u64,
) -> Result<Vec<SequencedOp>, SubmitOutcome> {
    debug_assert!(after < upto);
    // In batches: the op steps again and asks for the rest.
    let upto = upto.min(after + LOG_READ_BATCH);
    let wanted = (upto - after) as usize;
    match sequencer.ops_after(doc, after, wanted) {
        Ok(Some(ops))
            if ops.len() == wanted
                && ops
                    .iter()
                    .zip(after + 1..)
                    .all(|(op, seq)| op.seq == seq) =>
        {
            Ok(ops)
        }
        Ok(Some(ops)) => {
            tracing::error!(
                doc,
                after,
                upto,
                got = ops.len(),
                "the log returned other ops than the durable ones asked for"
            );
            Err(refusal(
                RefusalKind::StorageFailed,
                format!("internal: the log holds {} of ops {}..={upto}", ops.len(), after + 1),
            ))
        }
        Ok(None) => Err(refusal(
            RefusalKind::TooOld,
            format!(
                "base version {after} is older than the ops the server keeps; open the document again"
            ),
        )),
        Err(reason) => Err(refusal(RefusalKind::StorageFailed, reason.to_string())),
    }
}

impl<S: Subscriber> Document<S> {
    /// A document whose ops up to `delivered` (the sequencer's version when it is
    /// opened) are all durable: none waits for delivery.
    pub fn new(id: Arc<str>, delivered: u64, limits: DocumentLimits) -> Self {
        Self::with_incarnation(id, delivered, limits, 0)
    }

    /// [`Document::new`] for the sequencer's `incarnation` of the document
    /// ([`Sequencer::incarnation`]).
    pub fn with_incarnation(
        id: Arc<str>,
        delivered: u64,
        limits: DocumentLimits,
        incarnation: u64,
    ) -> Self {
        Document {
            id,
            limits,
            incarnation,
            state: Mutex::new(State {
                history: VecDeque::new(),
                broken_pipelines: HashSet::new(),
                pending: VecDeque::new(),
                delivered,
                subscribers: HashMap::default(),
                held: HashMap::new(),
                presence: BTreeMap::new(),
                deleted: None,
                deleting: None,
                deletion_failure: None,
                moved: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn frame(&self, event: Event<S::Presence>) -> S::Frame {
        S::frame(&self.id, event, self.limits.max_frame)
    }

    /// The version of the newest op sequenced (durable or not), as the sequencer (its
    /// one owner) has it. Read under the document's lock, which every op sequenced for
    /// the document holds: never between an op's sequencing and its queueing for
    /// delivery. Costs a lookup in the sequencer's table of documents.
    pub fn version<Q: Sequencer>(&self, sequencer: &Q) -> u64 {
        let _state = self.lock();
        sequencer.version(&self.id)
    }

    /// Subscribes a session. Broadcasts for it are held until [`Document::activate`].
    pub fn subscribe(&self, subscriber: S) {
        let mut state = self.lock();
        let session = subscriber.session();
        state.held.insert(session, Held::default());
        state.broken_pipelines.remove(&session);
        state.subscribers.insert(session, subscriber);
    }

    /// The session's snapshot or catch-up is queued: release what was held for it, in
    /// order, then send it the current presence of the others.
    pub fn activate(&self, session: SessionId) {
        let mut state = self.lock();
        let held = state.held.remove(&session).unwrap_or_default();
        state.release_spare();
        let Some(subscriber) = state.subscribers.get(&session).cloned() else {
            return;
        };
        for frame in held.frames {
            subscriber.send(frame);
        }
        if state.moved.is_some() {
            // Its last message was the redirect, held behind its snapshot.
            state.subscribers.remove(&session);
            return;
        }
        for (client_id, p) in &state.presence {
            if *client_id != subscriber.client_id() {
                subscriber.send(self.presence_frame(*client_id, p.presence.clone()));
            }
        }
    }

    /// Removes a session; tells the others its presence is gone.
    pub fn unsubscribe(&self, session: SessionId, client_id: u64) {
        let mut state = self.lock();
        state.held.remove(&session);
        state.broken_pipelines.remove(&session);
        state.release_spare();
        // A replaced session's client id may be live on its new session: only this
        // session's presence goes.
        if state.subscribers.remove(&session).is_some()
            && state
                .presence
                .get(&client_id)
                .is_some_and(|p| p.session == session)
        {
            state.presence.remove(&client_id);
            let frame = self.presence_frame(client_id, S::Presence::default());
            state.deliver_presence(None, &frame);
        }
    }

    /// The node that serves the document now, if it moved ([`Document::moved`]).
    pub fn moved_to(&self) -> Option<Owner> {
        self.lock().moved.clone()
    }

    /// No subscriber, and every op delivered.
    pub fn is_idle(&self) -> bool {
        let state = self.lock();
        state.subscribers.is_empty() && state.pending.is_empty()
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    fn presence_frame(&self, client_id: u64, presence: S::Presence) -> S::Frame {
        self.frame(Event::Presence {
            client_id,
            presence,
        })
    }

    /// Broadcasts a presence update to the other subscribers, at most once per
    /// `presence_interval` per client: an update sooner than that is held, and the
    /// latest one held goes out when the interval ends. Never stored.
    /// `Err`: the document moved ([`Document::moved`]); nothing is broadcast.
    pub fn presence(
        self: &Arc<Self>,
        session: SessionId,
        client_id: u64,
        presence: S::Presence,
    ) -> Result<(), Owner> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(owner) = &state.moved {
            return Err(owner.clone());
        }
        match state.presence.get_mut(&client_id) {
            Some(p) if now < p.sent_at + self.limits.presence_interval => {
                p.presence = presence;
                p.session = session;
                if !p.dirty {
                    p.dirty = true;
                    let due = p.sent_at + self.limits.presence_interval;
                    let doc = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        doc.flush_presence(client_id);
                    });
                }
            }
            _ => {
                let frame = self.presence_frame(client_id, presence.clone());
                state.presence.insert(
                    client_id,
                    Presence {
                        presence,
                        session,
                        sent_at: now,
                        dirty: false,
                    },
                );
                state.deliver_presence(Some(session), &frame);
            }
        }
        Ok(())
    }

    /// Broadcasts a held presence update (unless the client left meanwhile).
    fn flush_presence(&self, client_id: u64) {
        let mut state = self.lock();
        let Some(p) = state.presence.get_mut(&client_id).filter(|p| p.dirty) else {
            return;
        };
        p.dirty = false;
        p.sent_at = Instant::now();
        let (session, presence) = (p.session, p.presence.clone());
        let frame = self.presence_frame(client_id, presence);
        state.deliver_presence(Some(session), &frame);
    }

    /// Checks what can be answered before any transform: an op ahead of the document, a
    /// resend (answered from the dedupe table however old its base), a connection
    /// whose pipeline broke. `Continue(version)`: go on with [`Document::step`]; `version` is
    /// the document's as checked (the caller's first estimate of how far behind the op
    /// is, without asking the sequencer again).
    pub fn precheck<Q: Sequencer>(
        &self,
        sequencer: &Q,
        job: &Job,
    ) -> ControlFlow<SubmitOutcome, u64> {
        let (version, broken) = {
            let state = self.lock();
            if let Some(owner) = &state.moved {
                return Break(SubmitOutcome::Moved(owner.clone()));
            }
            if let Some(version) = state.deleted {
                return Break(SubmitOutcome::Refused(deleted_refusal(&self.id, version)));
            }
            if let Some(why) = &state.deletion_failure {
                return Break(refusal(RefusalKind::StorageFailed, why.to_string()));
            }
            if let Some(wait) = self.deletion_wait(&state) {
                return Break(wait);
            }
            // Cluster mode: the sequencer dropped or reloaded the document under this
            // copy (a handover, a loss) before the server was told: its version says
            // nothing about this copy's, so the op goes where the document is, as
            // `try_step` would send it, instead of being refused against it.
            if sequencer.incarnation(&self.id) != self.incarnation {
                if let Some(here) = sequencer.here() {
                    return Break(SubmitOutcome::Moved(here));
                }
            }
            (
                // Checked on a single node only: in a cluster the sequencer can be a
                // step ahead of the copy with its load unchanged (an op refused by the
                // journal after the local apply, until the loss is handled).
                state.sequenced(|| {
                    sequencer
                        .here()
                        .is_none()
                        .then(|| sequencer.version(&self.id))
                }),
                state.broken_pipelines.contains(&job.session),
            )
        };
        if version - job.base_version.min(version) > MAX_OPS_BEHIND && !broken {
            // A resend is answered however old its base; a new op that far behind is not
            // transformed.
            match sequencer.applied(&self.id, job.op_id, job.fingerprint) {
                Some(Ok(Submitted::Duplicate { seq, ticket })) => {
                    return Break(SubmitOutcome::Duplicate { seq, ticket })
                }
                Some(Err(e)) => return Break(outcome_of(e)),
                _ => {
                    self.break_pipeline(job.session);
                    return Break(refusal(
                        RefusalKind::TooOld,
                        format!(
                            "base version {} is more than {MAX_OPS_BEHIND} ops behind the document \
                             (version {version}); open it again and rebase",
                            job.base_version
                        ),
                    ));
                }
            }
        }
        if job.base_version > version {
            self.break_pipeline(job.session);
            return Break(refusal(
                RefusalKind::FutureVersion,
                format!(
                    "base version {} is ahead of the document (version {version})",
                    job.base_version
                ),
            ));
        }
        // An op made on the current version needs no early look: the sequencer's
        // submit answers a resend the same way.
        if job.base_version < version || broken {
            match sequencer.applied(&self.id, job.op_id, job.fingerprint) {
                Some(Ok(Submitted::Duplicate { seq, ticket })) => {
                    return Break(SubmitOutcome::Duplicate { seq, ticket })
                }
                Some(Err(e)) => return Break(outcome_of(e)),
                Some(Ok(Submitted::Applied { .. })) | None => {}
            }
        }
        if broken {
            return Break(refusal(
                RefusalKind::PipelineConflict,
                "an earlier op of this connection was refused; open the document again",
            ));
        }
        Continue(version)
    }

    /// Transforms the op over what it missed and sequences it. `log` holds the ops a
    /// previous step asked for with [`Step::ReadLog`].
    pub fn step<Q: Sequencer>(
        &self,
        sequencer: &Q,
        job: &mut Job,
        log: Option<Vec<SequencedOp>>,
    ) -> Step {
        match self.try_step(sequencer, job, log) {
            // Not a refusal: the op goes to the new owner, under the same id.
            Ok(Step::Done(moved @ SubmitOutcome::Moved(..)))
            | Err(moved @ SubmitOutcome::Moved(..)) => Step::Done(moved),
            Ok(Step::Done(outcome @ SubmitOutcome::Refused(..))) | Err(outcome) => {
                Step::Done(self.refused(sequencer, job, outcome))
            }
            Ok(step) => step,
        }
    }

    /// An op is refused: unless it turns out to be a resend of an op applied meanwhile
    /// (its original, sequenced by another session of the same client), the session's
    /// later ops to this document are refused too (they may have been made on top of
    /// it) until it opens the document again.
    fn refused<Q: Sequencer>(
        &self,
        sequencer: &Q,
        job: &Job,
        outcome: SubmitOutcome,
    ) -> SubmitOutcome {
        if let Some(Ok(Submitted::Duplicate { seq, ticket })) =
            sequencer.applied(&self.id, job.op_id, job.fingerprint)
        {
            return SubmitOutcome::Duplicate { seq, ticket };
        }
        self.break_pipeline(job.session);
        outcome
    }

    /// Refuses the session's later ops to this document until it opens it again.
    pub fn break_pipeline(&self, session: SessionId) {
        self.lock().broken_pipelines.insert(session);
    }

    fn try_step<Q: Sequencer>(
        &self,
        sequencer: &Q,
        job: &mut Job,
        log: Option<Vec<SequencedOp>>,
    ) -> Result<Step, SubmitOutcome> {
        if let Some(records) = log {
            job.over_records(&records)?;
        }
        // Outside the lock: the window's ops that the op missed.
        let missed = self.lock().window_after(job.at);
        if let Some(read_log) = job.over_window(missed)? {
            return Ok(read_log);
        }
        // Under the lock: the few ops sequenced meanwhile, then sequence.
        let mut state = self.lock();
        if let Some(owner) = &state.moved {
            return Err(SubmitOutcome::Moved(owner.clone()));
        }
        if let Some(version) = state.deleted {
            return Err(SubmitOutcome::Refused(deleted_refusal(&self.id, version)));
        }
        if let Some(why) = &state.deletion_failure {
            return Err(refusal(RefusalKind::StorageFailed, why.to_string()));
        }
        if let Some(wait) = self.deletion_wait(&state) {
            return Err(wait);
        }
        if state.broken_pipelines.contains(&job.session) {
            return Err(refusal(
                RefusalKind::PipelineConflict,
                "an earlier op of this connection was refused; open the document again",
            ));
        }
        if let Some(read_log) = job.over_window(state.window_after(job.at))? {
            return Ok(read_log);
        }
        // Cluster mode: the sequencer reloaded the document under this copy (see
        // `Sequencer::incarnation`): the copy is stale; its sessions open it again. (The
        // submit checks it again, atomically: a reload after this look refuses the op.)
        let reloaded = || sequencer.here().map(SubmitOutcome::Moved);
        if sequencer.incarnation(&self.id) != self.incarnation {
            if let Some(moved) = reloaded() {
                return Err(moved);
            }
        }
        let patches = job.op.to_patches();
        let bytes = (job.limit.measure)(&patches);
        if bytes > job.limit.max {
            return Err(refusal(
                RefusalKind::TooLarge,
                format!(
                    "the op takes {bytes} bytes once transformed over the ops it missed; the \
                     limit is {}: send it in smaller ops",
                    job.limit.max
                ),
            ));
        }
        // Every op of this document is sequenced under its lock, held here: the
        // sequencer's version is `job.at` (the op was transformed up to the newest op
        // in the window, and the window gets every op sequenced) unless the sequencer
        // reloaded the document under this copy. Its submit checks that (one lookup of
        // the document, not two).
        let submit = SubmitOp {
            op_id: job.op_id,
            base_version: job.base_version,
            expected_version: job.at,
            expected_incarnation: Some(self.incarnation),
            fingerprint: job.fingerprint,
            patches,
        };
        let outcome = match sequencer.submit(&self.id, &submit) {
            Err(SubmitError::VersionMismatch { expected, actual }) => match reloaded() {
                Some(moved) => return Err(moved),
                None => panic!(
                    "an op transformed up to version {expected} of {:?}, whose version is \
                     {actual}: every op of it is sequenced under its lock and kept in its \
                     window",
                    self.id
                ),
            },
            Ok(Submitted::Applied { seq, ticket }) => {
                assert_eq!(seq, job.at + 1, "the sequencer's seqs are consecutive");
                state.history.push_back(Sequenced {
                    seq,
                    client_id: job.op_id.client_id,
                    op: Arc::new(std::mem::take(&mut job.op)),
                });
                state.trim_history(self.limits.history_window);
                assert_eq!(
                    seq,
                    state.delivered + 1 + state.pending.len() as u64,
                    "pending ops are the consecutive seqs after the last delivered"
                );
                state.pending.push_back(Pending {
                    op: SequencedOp {
                        seq,
                        id: job.op_id,
                        base_version: job.base_version,
                        patches: submit.patches,
                    },
                    submitter: job.session,
                    request_id: job.request_id,
                    durable: false,
                    refused: false,
                    resent: Vec::new(),
                });
                SubmitOutcome::Applied { seq, ticket }
            }
            Ok(Submitted::Duplicate { seq, ticket }) => SubmitOutcome::Duplicate { seq, ticket },
            Err(e) => outcome_of(e),
        };
        Ok(Step::Done(outcome))
    }

    /// [`Document::precheck`] then [`Document::step`] until done, reading the log on
    /// this thread when needed (blocking: for tests and callers off the async workers).
    pub fn submit<Q: Sequencer>(&self, sequencer: &Q, submission: Submission) -> SubmitOutcome {
        let mut job = Job::new(&submission, OpLimit::NONE);
        if let Break(outcome) = self.precheck(sequencer, &job) {
            return outcome;
        }
        let mut log = None;
        loop {
            match self.step(sequencer, &mut job, log.take()) {
                Step::Done(outcome) => return outcome,
                Step::ReadLog { after, upto } => {
                    match read_missed(sequencer, &self.id, after, upto) {
                        Ok(ops) => log = Some(ops),
                        Err(outcome) => return outcome,
                    }
                }
            }
        }
    }

    /// A resend of the op sequenced as `seq` is answered with its original ack, in seq
    /// order with the document's other messages to that session: at once if `seq` was
    /// delivered, else right after it is.
    pub fn ack_resend(&self, subscriber: &S, request_id: u32, local_seq: u64, seq: u64) {
        let ack = self.frame(Event::Ack {
            request_id,
            local_seq,
            seq,
        });
        let mut state = self.lock();
        if state.moved.is_some() {
            // Acknowledged by the new owner, when the client resends it there.
            return;
        }
        if seq > state.delivered {
            if let Some(p) = state.pending_mut(seq) {
                p.resent.push((subscriber.clone(), ack));
                return;
            }
        }
        deliver(&mut state.held, subscriber, ack);
    }

    /// The op at `seq` will never be durable here (the log failed under it). Returns
    /// whether its submitter is still owed an answer, to be told it is not applied: not
    /// if the op was delivered (acknowledged) already, which can happen when a deletion
    /// the store carried out delivered it ([`Document::deleted`], cluster mode); one
    /// delivered later is then not acknowledged. Exactly one answer either way.
    pub fn refuse_unacknowledged(&self, seq: u64) -> bool {
        let mut state = self.lock();
        match state.pending_mut(seq) {
            Some(p) => {
                p.refused = true;
                true
            }
            None => seq > state.delivered,
        }
    }

    /// `seq` is durable: deliver every consecutive durable op, in seq order, as an ack
    /// to its submitter and a broadcast to the other subscribers (built once for all,
    /// and only if there are others).
    pub fn mark_durable(&self, seq: u64) {
        let mut state = self.lock();
        if let Some(p) = state.pending_mut(seq) {
            p.durable = true;
        }
        self.deliver_durable(&mut state);
    }

    /// Deletes the document: under its lock (no op is sequenced for it meanwhile), has
    /// the sequencer delete it; from then on no op is applied. One that comes before
    /// the deletion is durable waits for its outcome ([`SubmitOutcome::AfterDeletion`]):
    /// the caller reports it with [`Document::deleted`], [`Document::moved`] or
    /// [`Document::deletion_failed`]. `Ok(None)`: the sequencer does not hold it.
    pub fn delete<Q: Sequencer>(
        &self,
        sequencer: &Q,
    ) -> Result<Option<Deletion>, crate::sequencer::DeleteRefused> {
        let mut state = self.lock();
        let deletion = sequencer.delete(&self.id)?;
        if deletion.is_some() {
            state.deleting = Some(tokio::sync::watch::Sender::new(None));
        }
        Ok(deletion)
    }

    /// The wait of an op that reached the document while its deletion is under way.
    fn deletion_wait(&self, state: &State<S>) -> Option<SubmitOutcome> {
        state.deleting.as_ref().map(|deleting| {
            SubmitOutcome::AfterDeletion(DeletionWait {
                id: self.id.clone(),
                end: deleting.subscribe(),
            })
        })
    }

    /// The deletion under way failed before it was durable (the storage failed): the
    /// ops that waited for it, and every later one, are refused as not applied
    /// ([`RefusalKind::StorageFailed`]); the sessions that have it open find out so.
    pub fn deletion_failed(&self, why: &str) {
        let why: Arc<str> = Arc::from(why);
        let mut state = self.lock();
        state.deletion_failure = Some(why.clone());
        if let Some(deleting) = state.deleting.take() {
            deleting.send_replace(Some(DeletionEnd::Failed(why)));
        }
    }

    /// The deletion is durable: the ops sequenced before it (durable too, being older
    /// in the log) are delivered, then every subscriber is told
    /// ([`Event::Deleted`]), after its snapshot if that is still being sent.
    pub fn deleted(&self, version: u64) {
        let mut state = self.lock();
        for p in state.pending.iter_mut() {
            p.durable = true;
        }
        self.deliver_durable(&mut state);
        state.deleted = Some(version);
        if let Some(deleting) = state.deleting.take() {
            deleting.send_replace(Some(DeletionEnd::Deleted(version)));
        }
        let frame = self.frame(Event::Deleted { version });
        let State {
            subscribers, held, ..
        } = &mut *state;
        for subscriber in subscribers.values() {
            deliver(held, subscriber, frame.clone());
        }
    }

    /// Another node serves the document now: every subscriber is sent `Event::Moved`
    /// (one whose snapshot is not out yet, right after it) and dropped, presence is
    /// forgotten, and from now on nothing is sequenced (a submit gets
    /// [`SubmitOutcome::Moved`]), acknowledged or broadcast here: the clients resend
    /// their unacknowledged ops to the new owner under the same ids, and its dedupe
    /// answers those applied here with their seqs. The server takes the document out of
    /// its map first ([`crate::server::Server::redirect_document`]), so nobody
    /// subscribes to it again.
    pub fn moved(&self, owner: Owner) {
        let mut state = self.lock();
        if let Some(deleting) = state.deleting.take() {
            // Not deleted (cluster mode): the ops that waited go where it is served.
            deleting.send_replace(Some(DeletionEnd::Moved(owner.clone())));
        }
        if state.moved.is_some() {
            return;
        }
        let frame = self.frame(Event::Moved(owner.clone()));
        state.moved = Some(owner);
        state.presence.clear();
        state.broken_pipelines.clear();
        let State {
            subscribers, held, ..
        } = &mut *state;
        // One whose snapshot is being sent keeps its place until it is activated, which
        // releases the redirect after the snapshot and drops it.
        subscribers.retain(|session, subscriber| {
            deliver(held, subscriber, frame.clone());
            held.contains_key(session)
        });
        state.release_spare();
    }

    /// Delivers every consecutive durable op at the front of `pending`, in seq order.
    fn deliver_durable(&self, state: &mut State<S>) {
        loop {
            match state.pending.front() {
                Some(p) if p.durable => {}
                _ => break,
            }
            let p = state.pending.pop_front().expect("checked");
            state.delivered += 1;
            assert_eq!(p.op.seq, state.delivered, "delivered in seq order");
            if state.moved.is_some() {
                // Nothing more is acknowledged or broadcast here (the redirect went out).
                continue;
            }
            // The ack has one receiver: moved to it, not shared. None if the submitter
            // was told the op is not applied (one answer per op).
            let mut ack = (!p.refused).then(|| {
                self.frame(Event::Ack {
                    request_id: p.request_id,
                    local_seq: p.op.id.local_seq,
                    seq: p.op.seq,
                })
            });
            let mut op = Some(p.op);
            let mut remote = None;
            let State {
                subscribers, held, ..
            } = &mut *state;
            for subscriber in subscribers.values() {
                let frame = if subscriber.session() == p.submitter {
                    match ack.take() {
                        Some(ack) => ack,
                        None => {
                            assert!(p.refused, "one subscriber per session");
                            continue;
                        }
                    }
                } else {
                    remote
                        .get_or_insert_with(|| {
                            self.frame(Event::Op(op.take().expect("encoded once")))
                        })
                        .clone()
                };
                deliver(held, subscriber, frame);
            }
            for (subscriber, ack) in p.resent {
                deliver(held, &subscriber, ack);
            }
        }
        state.trim_history(self.limits.history_window);
        state.release_spare();
    }
}

/// The refusal of an op to a document deleted at `version`.
fn deleted_refusal(id: &str, version: u64) -> Refusal {
    Refusal::new(
        RefusalKind::Deleted,
        format!(
            "document {id:?} was deleted at version {version}; the op is not applied (open \
             the document again to start it anew, empty, at version 0)"
        ),
    )
}

/// The refusal a sequencer error becomes.
fn outcome_of(e: SubmitError) -> SubmitOutcome {
    match e {
        SubmitError::Invalid(e @ crate::text::ApplyError::OutOfRange { .. }) => {
            refusal(RefusalKind::OutOfRange, e.to_string())
        }
        SubmitError::Invalid(e) => refusal(RefusalKind::TooLarge, e.to_string()),
        SubmitError::InvalidDocId(m) => refusal(RefusalKind::InvalidDocId, m),
        SubmitError::TooLarge(m) => refusal(RefusalKind::TooLarge, m),
        SubmitError::OpIdReused(m) => refusal(RefusalKind::OpIdReused, m),
        SubmitError::Deleted(m) => refusal(RefusalKind::Deleted, m),
        SubmitError::Unavailable(m) => refusal(RefusalKind::Unavailable, m),
        SubmitError::Storage(m) => refusal(RefusalKind::StorageFailed, m.to_string()),
        SubmitError::Moved(owner) => SubmitOutcome::Moved(owner),
        e @ SubmitError::VersionMismatch { .. } => {
            refusal(RefusalKind::Internal, format!("internal: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequencer::local::{LocalConfig, LocalSequencer};
    use crate::wal::vfs::sim::SimFs;
    use std::cell::Cell;
    use std::path::Path;

    const MAX_FRAME: usize = 1 << 20;

    /// What a [`Recorder`] was sent, as built by [`Subscriber::frame`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Ack {
            request_id: u32,
            local_seq: u64,
            seq: u64,
        },
        Op {
            seq: u64,
            client_id: u64,
            patches: Vec<Patch>,
        },
        Presence {
            client_id: u64,
            presence: Vec<u32>,
        },
        Deleted {
            version: u64,
        },
        Moved(Owner),
    }

    thread_local! {
        /// Messages built on this thread (each test runs on its own).
        static BUILT: Cell<usize> = const { Cell::new(0) };
    }

    /// A subscriber that records what it is sent.
    #[derive(Clone)]
    struct Recorder {
        session: SessionId,
        client_id: u64,
        capacity: usize,
        got: Arc<Mutex<Vec<Got>>>,
        closed: Arc<Mutex<Option<CloseReason>>>,
    }

    impl Recorder {
        fn new(session: SessionId, client_id: u64) -> Recorder {
            Recorder {
                session,
                client_id,
                capacity: 1 << 20,
                got: Arc::default(),
                closed: Arc::default(),
            }
        }

        fn take(&self) -> Vec<Got> {
            std::mem::take(&mut *self.got.lock().unwrap())
        }
    }

    impl Subscriber for Recorder {
        type Frame = Arc<Got>;
        type Presence = Vec<u32>;

        fn session(&self) -> SessionId {
            self.session
        }

        fn client_id(&self) -> u64 {
            self.client_id
        }

        fn frame(doc: &str, event: Event<Vec<u32>>, _max_frame: usize) -> Arc<Got> {
            assert_eq!(doc, "d");
            BUILT.with(|b| b.set(b.get() + 1));
            Arc::new(match event {
                Event::Ack {
                    request_id,
                    local_seq,
                    seq,
                } => Got::Ack {
                    request_id,
                    local_seq,
                    seq,
                },
                Event::Op(op) => Got::Op {
                    seq: op.seq,
                    client_id: op.id.client_id,
                    patches: op.patches,
                },
                Event::Presence {
                    client_id,
                    presence,
                } => Got::Presence {
                    client_id,
                    presence,
                },
                Event::Deleted { version } => Got::Deleted { version },
                Event::Moved(owner) => Got::Moved(owner),
            })
        }

        fn frame_len(_frame: &Arc<Got>) -> usize {
            100
        }

        fn push_capacity(&self) -> usize {
            self.capacity
        }

        fn send(&self, frame: Arc<Got>) -> bool {
            self.got.lock().unwrap().push((*frame).clone());
            true
        }

        fn close(&self, reason: CloseReason) {
            self.closed.lock().unwrap().get_or_insert(reason);
        }
    }

    fn document(history_window: usize) -> Document<Recorder> {
        let limits = DocumentLimits {
            presence_interval: Duration::from_millis(50),
            max_frame: MAX_FRAME,
            history_window,
        };
        Document::new(Arc::from("d"), 0, limits)
    }

    /// A sequencer on a simulated disk, and a runtime to wait for durability.
    fn sequencer() -> (LocalSequencer, tokio::runtime::Runtime) {
        let (store, _) = LocalSequencer::open_with(
            Arc::new(SimFs::new()),
            Path::new("/data"),
            LocalConfig {
                maintenance_interval: Duration::from_secs(3600),
                ..LocalConfig::default()
            },
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (store, rt)
    }

    fn submission(
        session: SessionId,
        client_id: u64,
        local_seq: u64,
        base_version: u64,
        patch: Patch,
    ) -> Submission {
        Submission {
            session,
            request_id: local_seq as u32 + 100,
            client_id,
            local_seq,
            base_version,
            patches: vec![patch],
        }
    }

    /// Submits and waits for the op to be durable; returns its seq and ticket.
    fn applied(
        doc: &Document<Recorder>,
        store: &LocalSequencer,
        rt: &tokio::runtime::Runtime,
        submission: Submission,
    ) -> (u64, Ticket) {
        match doc.submit(store, submission) {
            SubmitOutcome::Applied { seq, ticket } => {
                rt.block_on(store.wait_durable(ticket)).unwrap();
                (seq, ticket)
            }
            other => panic!("not applied: {other:?}"),
        }
    }

    /// Op 1 of client 1 (session 10) inserts "x", is durable and delivered.
    fn first_op_delivered(
        doc: &Document<Recorder>,
        store: &LocalSequencer,
        rt: &tokio::runtime::Runtime,
    ) {
        let (seq, _) = applied(
            doc,
            store,
            rt,
            submission(1, 10, 1, 0, Patch::new(0, 0, "x")),
        );
        doc.mark_durable(seq);
    }

    #[test]
    fn a_deletion_delivers_the_ops_before_it_then_tells_and_refuses_every_later_op() {
        let (store, rt) = sequencer();
        let doc = document(8);
        let (a, b) = (Recorder::new(1, 10), Recorder::new(2, 20));
        for (recorder, session) in [(&a, 1), (&b, 2)] {
            doc.subscribe(recorder.clone());
            doc.activate(session);
        }
        first_op_delivered(&doc, &store, &rt);
        a.take();
        b.take();
        // Op 2 is sequenced, not yet delivered, when the deletion comes.
        let SubmitOutcome::Applied { seq: 2, .. } =
            doc.submit(&store, submission(1, 10, 2, 1, Patch::new(1, 0, "y")))
        else {
            panic!("op 2 not applied");
        };
        let deletion = doc.delete(&store).unwrap().unwrap();
        assert_eq!(deletion.version, 2);
        // From now on no op is applied, whatever its base: until the deletion is durable
        // each waits for it.
        let waits = after_deletion(&doc, &store);
        rt.block_on(store.wait_durable(deletion.ticket)).unwrap();
        doc.deleted(deletion.version);
        for wait in waits {
            match rt.block_on(wait.answer()) {
                DeletionAnswer::Refused(refusal) => {
                    assert_eq!(refusal.kind, RefusalKind::Deleted, "{}", refusal.message)
                }
                other => panic!("an op that waited for the deletion: {other:?}"),
            }
        }
        match doc.submit(&store, submission(2, 20, 2, 2, Patch::new(0, 0, "z"))) {
            SubmitOutcome::Refused(refusal) => {
                assert_eq!(refusal.kind, RefusalKind::Deleted, "{}", refusal.message)
            }
            other => panic!("an op after the deletion: {other:?}"),
        }
        // Op 2 is delivered (its ack, its broadcast), then the deletion is told.
        assert_eq!(
            a.take(),
            vec![
                Got::Ack {
                    request_id: 102,
                    local_seq: 2,
                    seq: 2
                },
                Got::Deleted { version: 2 }
            ]
        );
        let told = b.take();
        assert!(
            matches!(
                told[..],
                [Got::Op { seq: 2, .. }, Got::Deleted { version: 2 }]
            ),
            "{told:?}"
        );
        // The durability queue's later word on op 2 sends nothing more.
        doc.mark_durable(2);
        assert!(a.take().is_empty() && b.take().is_empty());
        store.finish_delete("d").unwrap();
        assert_eq!(store.version("d"), 0);
        assert!(store.read_now("d", None).unwrap().is_none());
    }

    /// Ops submitted (at two bases) while `doc` is being deleted: each waits.
    fn after_deletion(doc: &Document<Recorder>, store: &LocalSequencer) -> Vec<DeletionWait> {
        [2, 0]
            .into_iter()
            .map(|base| {
                match doc.submit(store, submission(2, 20, 1, base, Patch::new(0, 0, "z"))) {
                    SubmitOutcome::AfterDeletion(wait) => wait,
                    other => panic!("an op while the deletion is under way: {other:?}"),
                }
            })
            .collect()
    }

    /// A deletion that fails is no reason to drop an op that came meanwhile: with the
    /// document served elsewhere now (cluster mode) the op goes there; with the storage
    /// failed it is refused as a storage failure (resent after a restart), never as
    /// deleted.
    #[test]
    fn an_op_during_a_deletion_that_fails_is_not_refused_as_deleted() {
        let there = Owner {
            addr: Arc::from("there:1"),
            ws_url: Arc::from(""),
        };
        for moved in [true, false] {
            let (store, rt) = sequencer();
            let doc = document(8);
            first_op_delivered(&doc, &store, &rt);
            doc.delete(&store).unwrap().unwrap();
            let waits = after_deletion(&doc, &store);
            if moved {
                doc.moved(there.clone());
            } else {
                doc.deletion_failed("disk on fire");
            }
            for wait in waits {
                match rt.block_on(wait.answer()) {
                    DeletionAnswer::Moved(owner) => assert!(moved && owner == there),
                    DeletionAnswer::Refused(refusal) => {
                        assert!(!moved, "{refusal:?}");
                        assert_eq!(refusal.kind, RefusalKind::StorageFailed);
                        assert!(refusal.message.contains("disk on fire"), "{refusal:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_moved_document_redirects_its_subscribers_once_and_acknowledges_nothing_more() {
        let (store, rt) = sequencer();
        let doc = document(8);
        let (a, b, late) = (
            Recorder::new(1, 10),
            Recorder::new(2, 20),
            Recorder::new(3, 30),
        );
        for (recorder, session) in [(&a, 1), (&b, 2)] {
            doc.subscribe(recorder.clone());
            doc.activate(session);
        }
        // `late` subscribed; its snapshot is not out yet.
        doc.subscribe(late.clone());
        // Op 1 is sequenced, not yet delivered, when the document moves.
        let SubmitOutcome::Applied { seq: 1, ticket } =
            doc.submit(&store, submission(1, 10, 1, 0, Patch::new(0, 0, "x")))
        else {
            panic!("op 1 not applied");
        };
        let owner = Owner {
            addr: Arc::from("10.0.0.2:7420"),
            ws_url: Arc::from(""),
        };
        doc.moved(owner.clone());
        doc.moved(owner.clone());
        assert_eq!(a.take(), vec![Got::Moved(owner.clone())]);
        assert_eq!(b.take(), vec![Got::Moved(owner.clone())]);
        assert!(late.take().is_empty(), "held behind its snapshot");
        // Op 1 becomes durable: no ack, no broadcast (its resend is answered elsewhere).
        rt.block_on(store.wait_durable(ticket)).unwrap();
        doc.mark_durable(1);
        doc.ack_resend(&a, 7, 1, 1);
        assert!(a.take().is_empty() && b.take().is_empty());
        doc.activate(3);
        assert_eq!(late.take(), vec![Got::Moved(owner.clone())]);
        assert_eq!(doc.subscriber_count(), 0);
        // Every later op is redirected, not sequenced or refused.
        match doc.submit(&store, submission(2, 20, 1, 1, Patch::new(0, 0, "z"))) {
            SubmitOutcome::Moved(to) => assert_eq!(to, owner),
            other => panic!("an op after the move: {other:?}"),
        }
        assert_eq!(store.version("d"), 1);
        assert_eq!(doc.moved_to(), Some(owner));
    }

    /// Found by CI (tests/server.rs, presence_is_broadcast_and_gone_when_the_client_
    /// disconnects): a presence update that came while a subscriber's snapshot was being
    /// read was held for it, and sent again with the current presence on activation.
    #[tokio::test]
    async fn a_subscriber_waiting_for_its_snapshot_is_told_each_presence_once() {
        let doc = Arc::new(document(8));
        let (watcher, cursor) = (Recorder::new(1, 10), Recorder::new(2, 20));
        doc.subscribe(cursor.clone());
        doc.activate(2);
        doc.subscribe(watcher.clone());
        doc.presence(2, 20, vec![7]).unwrap();
        assert!(watcher.take().is_empty(), "nothing before its snapshot");
        doc.activate(1);
        let told = watcher.take();
        assert_eq!(
            told,
            vec![Got::Presence {
                client_id: 20,
                presence: vec![7]
            }]
        );
        // Gone: told once, and a subscriber still waiting is not told at all.
        let late = Recorder::new(3, 30);
        doc.subscribe(late.clone());
        doc.unsubscribe(2, 20);
        assert_eq!(
            watcher.take(),
            vec![Got::Presence {
                client_id: 20,
                presence: vec![]
            }]
        );
        doc.activate(3);
        assert!(late.take().is_empty(), "{:?}", late.take());
    }

    #[test]
    fn a_late_op_is_transformed_over_every_op_since_its_base() {
        let (store, rt) = sequencer();
        // A window of 2: most of the ops the late op missed come back from the log.
        let doc = document(2);
        let (a, b) = (Recorder::new(1, 10), Recorder::new(2, 20));
        for r in [&a, &b] {
            doc.subscribe(r.clone());
            doc.activate(r.session);
        }
        let (seq, _) = applied(
            &doc,
            &store,
            &rt,
            submission(1, 10, 1, 0, Patch::new(0, 0, "hello")),
        );
        doc.mark_durable(seq);
        for i in 1..=5u64 {
            // Client 10 prepends a digit, each on the newest version.
            let (seq, _) = applied(
                &doc,
                &store,
                &rt,
                submission(1, 10, 1 + i, i, Patch::new(0, 0, i.to_string())),
            );
            doc.mark_durable(seq);
        }
        assert_eq!(doc.version(&store), 6);
        // Client 20 appends to "hello", made on version 1: after the five prepends.
        let (seq, _) = applied(
            &doc,
            &store,
            &rt,
            submission(2, 20, 1, 1, Patch::new(5, 0, "X")),
        );
        assert_eq!(seq, 7);
        doc.mark_durable(seq);
        let got = a.take();
        assert_eq!(
            got.last(),
            Some(&Got::Op {
                seq: 7,
                client_id: 20,
                patches: vec![Patch::new(10, 0, "X")],
            }),
            "transformed over the five ops since its base"
        );
        let view = rt.block_on(store.read("d")).unwrap().unwrap();
        assert_eq!((view.text.as_str(), view.version), ("54321helloX", 7));
    }

    #[test]
    fn acks_and_broadcasts_go_out_in_seq_order_once_durable_and_built_once() {
        let (store, rt) = sequencer();
        let doc = document(8);
        let (a, b, c) = (
            Recorder::new(1, 10),
            Recorder::new(2, 20),
            Recorder::new(3, 30),
        );
        for r in [&a, &b, &c] {
            doc.subscribe(r.clone());
            doc.activate(r.session);
        }
        let (one, _) = applied(
            &doc,
            &store,
            &rt,
            submission(1, 10, 1, 0, Patch::new(0, 0, "a")),
        );
        let (two, _) = applied(
            &doc,
            &store,
            &rt,
            submission(2, 20, 1, 1, Patch::new(1, 0, "b")),
        );
        assert_eq!((one, two), (1, 2));
        assert!(
            a.take().is_empty() && b.take().is_empty(),
            "nothing before durable"
        );
        BUILT.with(|b| b.set(0));
        doc.mark_durable(2);
        assert!(a.take().is_empty() && b.take().is_empty(), "2 waits for 1");
        doc.mark_durable(1);
        let op = |seq, client_id, patch| Got::Op {
            seq,
            client_id,
            patches: vec![patch],
        };
        let ack = |request_id, seq| Got::Ack {
            request_id,
            local_seq: 1,
            seq,
        };
        assert_eq!(
            a.take(),
            vec![ack(101, 1), op(2, 20, Patch::new(1, 0, "b"))]
        );
        assert_eq!(
            b.take(),
            vec![op(1, 10, Patch::new(0, 0, "a")), ack(101, 2)]
        );
        assert_eq!(
            c.take(),
            vec![
                op(1, 10, Patch::new(0, 0, "a")),
                op(2, 20, Patch::new(1, 0, "b"))
            ]
        );
        assert_eq!(
            BUILT.with(Cell::get),
            4,
            "one ack and one broadcast per op, whatever the number of subscribers"
        );
    }

    #[test]
    fn a_resend_gets_its_original_ack_after_the_op_is_delivered() {
        let (store, rt) = sequencer();
        let doc = document(8);
        let (a, other) = (Recorder::new(1, 10), Recorder::new(2, 20));
        for r in [&a, &other] {
            doc.subscribe(r.clone());
            doc.activate(r.session);
        }
        let (seq, _) = applied(
            &doc,
            &store,
            &rt,
            submission(1, 10, 1, 0, Patch::new(0, 0, "a")),
        );
        // The same client resends on a new session before the op is delivered.
        let again = Recorder::new(3, 10);
        doc.subscribe(again.clone());
        doc.activate(again.session);
        match doc.submit(&store, submission(3, 10, 1, 0, Patch::new(0, 0, "a"))) {
            SubmitOutcome::Duplicate { seq: s, .. } => assert_eq!(s, seq),
            other => panic!("not a duplicate: {other:?}"),
        }
        doc.ack_resend(&again, 7, 1, seq);
        assert!(again.take().is_empty(), "not before the op is delivered");
        doc.mark_durable(seq);
        let ack = Got::Ack {
            request_id: 7,
            local_seq: 1,
            seq,
        };
        let broadcast = Got::Op {
            seq,
            client_id: 10,
            patches: vec![Patch::new(0, 0, "a")],
        };
        assert_eq!(again.take(), vec![broadcast, ack.clone()], "right after it");
        // Once delivered, a resend is answered at once.
        doc.ack_resend(&again, 7, 1, seq);
        assert_eq!(again.take(), vec![ack]);
        assert_eq!(a.take().len(), 1);
        assert_eq!(other.take().len(), 1);
    }

    #[test]
    fn updates_held_for_a_snapshot_are_released_in_order_or_close_a_slow_session() {
        let (store, rt) = sequencer();
        let doc = document(8);
        let mut slow = Recorder::new(2, 20);
        slow.capacity = 150;
        let held = Recorder::new(3, 30);
        doc.subscribe(Recorder::new(1, 10));
        doc.activate(1);
        doc.subscribe(slow.clone());
        doc.subscribe(held.clone());
        for i in 0..2u64 {
            let (seq, _) = applied(
                &doc,
                &store,
                &rt,
                submission(1, 10, 1 + i, i, Patch::new(0, 0, "a")),
            );
            doc.mark_durable(seq);
        }
        assert!(held.take().is_empty(), "held until its snapshot is out");
        assert_eq!(*slow.closed.lock().unwrap(), Some(CloseReason::HeldPiledUp));
        doc.activate(held.session);
        let seqs: Vec<u64> = held
            .take()
            .into_iter()
            .map(|g| match g {
                Got::Op { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn refusals_say_why() {
        let (store, _rt) = sequencer();
        let doc = document(8);
        doc.subscribe(Recorder::new(1, 10));
        let refused = |outcome| match outcome {
            SubmitOutcome::Refused(r) => r.kind,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            refused(doc.submit(&store, submission(1, 10, 1, 3, Patch::new(0, 0, "a")))),
            RefusalKind::FutureVersion
        );
        // The session's pipeline is broken until it opens the document again.
        assert_eq!(
            refused(doc.submit(&store, submission(1, 10, 2, 0, Patch::new(0, 0, "a")))),
            RefusalKind::PipelineConflict
        );
        doc.subscribe(Recorder::new(1, 10));
        assert_eq!(
            refused(doc.submit(&store, submission(1, 10, 3, 0, Patch::new(4, 0, "a")))),
            RefusalKind::OutOfRange
        );
        doc.subscribe(Recorder::new(1, 10));
        let mut job = Job::new(
            &submission(1, 10, 4, 0, Patch::new(0, 0, "abc")),
            OpLimit {
                max: 2,
                measure: |p| p.iter().map(|p| p.ins.len()).sum(),
            },
        );
        assert!(doc.precheck(&store, &job).is_continue());
        match doc.step(&store, &mut job, None) {
            Step::Done(outcome) => assert_eq!(refused(outcome), RefusalKind::TooLarge),
            Step::ReadLog { .. } => panic!("nothing to read"),
        }
    }

    #[test]
    fn a_quiet_open_document_keeps_no_emptied_tables() {
        let doc = document(8);
        let subscriber = Recorder::new(1, 7);
        doc.subscribe(subscriber);
        // Another client's op, sequenced before the subscriber's snapshot is out.
        {
            let mut state = doc.lock();
            let op = SequencedOp {
                seq: 1,
                id: OpId {
                    client_id: 9,
                    local_seq: 1,
                },
                base_version: 0,
                patches: vec![Patch::new(0, 0, "x")],
            };
            state.pending.push_back(Pending {
                op,
                submitter: 2,
                request_id: 1,
                durable: false,
                refused: false,
                resent: Vec::new(),
            });
        }
        doc.mark_durable(1);
        {
            let state = doc.lock();
            assert_eq!(state.delivered, 1);
            assert!(state.pending.is_empty());
            assert_eq!(state.held[&1].frames.len(), 1, "held until the snapshot");
        }
        doc.activate(1);
        let state = doc.lock();
        assert!(state.held.is_empty());
        assert_eq!(
            state.held.capacity(),
            0,
            "an emptied table of held frames gives its buckets back"
        );
        assert_eq!(state.subscribers.len(), 1);
    }
}
