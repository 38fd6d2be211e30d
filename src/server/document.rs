//! One open document on the server: the window of recent ops that late ops are
//! transformed over, the subscribed sessions, and delivery of acks and broadcasts in
//! seq order once each op is durable.
//!
//! The authoritative text, version and dedupe table live in the [`Sequencer`]; this
//! keeps only what transformation and fan-out need.
//!
//! **Late ops.** An op made on `base_version` is transformed over every op sequenced
//! after it, each exactly once and in seq order ([`Rebase::over`] asserts the seqs are
//! consecutive). The newest ops are in memory (the window); the window only lets go of
//! ops already delivered, so every op older than the window is durable and can be read
//! from the log ([`Step::ReadLog`]; the caller reads it off the async workers). The
//! transform runs outside the document's lock; only the ops sequenced meanwhile are
//! transformed under it, right before the op is sequenced.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;

use super::outbox::{encode, Outbox, SessionId};
use crate::op::{OpId, Patch, SequencedOp};
use crate::ot::{Side, TextOp};
use crate::protocol::message::{Envelope, ErrorCode, Message, Selection, WireOp};
use crate::sequencer::{fingerprint, Sequencer, SubmitError, SubmitOp, Submitted};

/// Ops read back from the log at a time for a late op (it steps again for the rest).
pub const LOG_READ_BATCH: u64 = 256;

/// How far behind the document an op's base may be: past it, the op is refused with
/// code 27 (the client catches up and rebases itself, as after a catch-up of more than
/// as many ops). Bounds the work one op can cause.
pub const MAX_OPS_BEHIND: u64 = 10_000;

/// One sequenced op as late ops are transformed over it.
struct Sequenced {
    seq: u64,
    client_id: u64,
    op: Arc<TextOp>,
}

struct Pending {
    op: WireOp,
    submitter: SessionId,
    request_id: u32,
    durable: bool,
    /// Acks for resends of this op, sent right after it is delivered.
    resent: Vec<(Outbox, Bytes)>,
}

/// Frames for a session whose snapshot is not out yet, and their bytes.
#[derive(Default)]
struct Held {
    frames: Vec<Bytes>,
    bytes: usize,
}

struct State {
    /// The document's version: the seq of its newest op (durable or not).
    version: u64,
    /// The newest ops, consecutive seqs ending at `version`, oldest first. Every op
    /// older than the first one is durable.
    history: VecDeque<Sequenced>,
    /// Sessions whose pipelined op conflicted: their later ops are refused until they
    /// open the document again (they were made on top of the refused one).
    broken_pipelines: HashSet<SessionId>,
    /// Sequenced ops waiting for durability or for earlier seqs, by seq.
    pending: BTreeMap<u64, Pending>,
    /// Highest seq delivered to subscribers.
    delivered: u64,
    /// Ordered, so that a broadcast reaches subscribers in the same order on every run
    /// (the simulator replays a seed exactly).
    subscribers: BTreeMap<SessionId, Outbox>,
    /// Messages for sessions that subscribed but have not been sent their snapshot yet:
    /// released by [`Document::activate`], so that no broadcast overtakes the snapshot.
    /// Bounded like the session's outbox.
    held: HashMap<SessionId, Held>,
    presence: BTreeMap<u64, Presence>,
}

/// One client's presence on the document, and its coalescing state.
struct Presence {
    selections: Vec<Selection>,
    session: SessionId,
    /// When it was last broadcast.
    sent_at: Instant,
    /// Changed since it was last broadcast (a flush is scheduled).
    dirty: bool,
}

/// Sends to one subscriber, or holds the frame while its snapshot is not out yet.
fn deliver(held: &mut HashMap<SessionId, Held>, outbox: &Outbox, frame: &Bytes) {
    match held.get_mut(&outbox.session) {
        Some(h) if h.bytes + frame.len() <= outbox.push_capacity() => {
            h.bytes += frame.len();
            h.frames.push(frame.clone());
        }
        Some(_) => outbox.close_with(
            ErrorCode::TooSlow,
            "too slow: the document's updates piled up while its snapshot was sent",
        ),
        None => {
            outbox.send(frame.clone());
        }
    }
}

impl State {
    fn deliver_all(&mut self, except: Option<SessionId>, frame: &Bytes) {
        let State {
            subscribers, held, ..
        } = self;
        for outbox in subscribers.values().filter(|o| Some(o.session) != except) {
            deliver(held, outbox, frame);
        }
    }

    /// The window's ops after `at`, if the window still holds all of them; else the
    /// newest seq that must come from the log.
    fn window_after(&self, at: u64) -> Result<Vec<(u64, u64, Arc<TextOp>)>, u64> {
        let oldest = self.history.front().map_or(self.version + 1, |s| s.seq);
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

    /// Forgets the oldest ops beyond the window, but only those already delivered (so
    /// that every op older than the window is durable, hence readable from the log).
    /// Gives back the allocations of emptied tables, so that a quiet open document
    /// holds only its subscribers and its history: an emptied `BTreeMap` keeps its root
    /// node (about 0.9 KB of `Pending` slots here) and a `HashMap` its buckets. Called
    /// when a burst ends (every op delivered, a snapshot sent), not per op.
    fn release_spare(&mut self) {
        if self.pending.is_empty() {
            self.pending = BTreeMap::new();
        }
        if self.held.is_empty() && self.held.capacity() > 0 {
            self.held = HashMap::new();
        }
    }

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

pub struct Document {
    pub id: Arc<str>,
    state: Mutex<State>,
    limits: DocumentLimits,
}

/// What a document needs of the server's settings.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    /// A client's presence is broadcast at most once per interval; updates in between
    /// are coalesced into the latest one.
    pub presence_interval: Duration,
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

#[derive(Debug)]
pub enum SubmitOutcome {
    /// The ack goes out through [`Document::mark_durable`] in seq order.
    Applied {
        seq: u64,
        ticket: crate::sequencer::Ticket,
    },
    /// A resend of an applied op: its original seq, acknowledged once durable.
    Duplicate {
        seq: u64,
        ticket: crate::sequencer::Ticket,
    },
    Rejected(ErrorCode, String),
}

/// A submitted op on its way to being sequenced: transformed so far up to version `at`.
pub struct Job {
    session: SessionId,
    request_id: u32,
    op_id: OpId,
    base_version: u64,
    fingerprint: u64,
    /// Bytes the op's patch list may take once transformed (so its broadcasts fit).
    max_op_bytes: usize,
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

fn rejected(code: ErrorCode, message: impl Into<String>) -> SubmitOutcome {
    SubmitOutcome::Rejected(code, message.into())
}

impl Job {
    pub fn new(submission: &Submission, max_op_bytes: usize) -> Job {
        Job {
            session: submission.session,
            request_id: submission.request_id,
            op_id: OpId {
                client_id: submission.client_id,
                local_seq: submission.local_seq,
            },
            base_version: submission.base_version,
            fingerprint: fingerprint(submission.base_version, &submission.patches),
            max_op_bytes,
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
            return Err(rejected(
                ErrorCode::Malformed,
                format!(
                    "internal: op {} at version {} met op {seq}; resend it",
                    self.op_id, self.at
                ),
            ));
        }
        self.at = seq;
        if by == self.op_id.client_id {
            if self.others_seen {
                return Err(rejected(
                    ErrorCode::PipelineConflict,
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
/// or a refusal (the log no longer holds them: code 27; a storage error: code 30).
/// Blocking: call it off the async workers.
pub fn read_missed<S: Sequencer>(
    sequencer: &S,
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
            Err(rejected(
                ErrorCode::StorageFailed,
                format!("internal: the log holds {} of ops {}..={upto}", ops.len(), after + 1),
            ))
        }
        Ok(None) => Err(rejected(
            ErrorCode::TooOld,
            format!(
                "base version {after} is older than the ops the server keeps; open the document again"
            ),
        )),
        Err(reason) => Err(rejected(ErrorCode::StorageFailed, reason.to_string())),
    }
}

impl Document {
    pub fn new(id: Arc<str>, version: u64, limits: DocumentLimits) -> Self {
        Document {
            id,
            limits,
            state: Mutex::new(State {
                version,
                history: VecDeque::new(),
                broken_pipelines: HashSet::new(),
                pending: BTreeMap::new(),
                delivered: version,
                subscribers: BTreeMap::new(),
                held: HashMap::new(),
                presence: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn frame(&self, message: Message, request_id: u32) -> Bytes {
        encode(
            &Envelope {
                request_id,
                message,
            },
            self.limits.max_frame,
        )
    }

    /// The version of the newest op sequenced (durable or not).
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Subscribes a session. Broadcasts for it are held until [`Document::activate`].
    pub fn subscribe(&self, outbox: Outbox) {
        let mut state = self.lock();
        state.held.insert(outbox.session, Held::default());
        state.broken_pipelines.remove(&outbox.session);
        state.subscribers.insert(outbox.session, outbox);
    }

    /// The session's snapshot or catch-up is queued: release what was held for it, in
    /// order, then send it the current presence of the others.
    pub fn activate(&self, session: SessionId) {
        let mut state = self.lock();
        let held = state.held.remove(&session).unwrap_or_default();
        state.release_spare();
        let Some(outbox) = state.subscribers.get(&session).cloned() else {
            return;
        };
        for frame in held.frames {
            outbox.send(frame);
        }
        for (client_id, presence) in &state.presence {
            if *client_id != outbox.client_id {
                outbox.send(self.presence_state(*client_id, presence.selections.clone()));
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
            let frame = self.presence_state(client_id, Vec::new());
            state.deliver_all(None, &frame);
        }
    }

    /// No subscriber, and every op delivered.
    pub fn is_idle(&self) -> bool {
        let state = self.lock();
        state.subscribers.is_empty() && state.pending.is_empty()
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    fn presence_state(&self, client_id: u64, selections: Vec<Selection>) -> Bytes {
        self.frame(
            Message::PresenceState {
                doc: self.id.to_string(),
                client_id,
                selections,
            },
            0,
        )
    }

    /// Broadcasts a presence update to the other subscribers, at most once per
    /// `presence_interval` per client: an update sooner than that is held, and the
    /// latest one held goes out when the interval ends. Never stored.
    pub fn presence(
        self: &Arc<Self>,
        session: SessionId,
        client_id: u64,
        selections: Vec<Selection>,
    ) {
        let now = Instant::now();
        let mut state = self.lock();
        match state.presence.get_mut(&client_id) {
            Some(p) if now < p.sent_at + self.limits.presence_interval => {
                p.selections = selections;
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
                let frame = self.presence_state(client_id, selections.clone());
                state.presence.insert(
                    client_id,
                    Presence {
                        selections,
                        session,
                        sent_at: now,
                        dirty: false,
                    },
                );
                state.deliver_all(Some(session), &frame);
            }
        }
    }

    /// Broadcasts a held presence update (unless the client left meanwhile).
    fn flush_presence(&self, client_id: u64) {
        let mut state = self.lock();
        let Some(p) = state.presence.get_mut(&client_id).filter(|p| p.dirty) else {
            return;
        };
        p.dirty = false;
        p.sent_at = Instant::now();
        let (session, selections) = (p.session, p.selections.clone());
        let frame = self.presence_state(client_id, selections);
        state.deliver_all(Some(session), &frame);
    }

    /// Checks what can be answered before any transform: an op ahead of the document, a
    /// resend (answered from the dedupe table however old its base), a connection
    /// whose pipeline broke. `None`: go on with [`Document::step`].
    pub fn precheck<S: Sequencer>(&self, sequencer: &S, job: &Job) -> Option<SubmitOutcome> {
        let (version, broken) = {
            let state = self.lock();
            (state.version, state.broken_pipelines.contains(&job.session))
        };
        if version - job.base_version.min(version) > MAX_OPS_BEHIND && !broken {
            // A resend is answered however old its base; a new op that far behind is not
            // transformed.
            match sequencer.applied(&self.id, job.op_id, job.fingerprint) {
                Some(Ok(Submitted::Duplicate { seq, ticket })) => {
                    return Some(SubmitOutcome::Duplicate { seq, ticket })
                }
                Some(Err(e)) => return Some(outcome_of(e)),
                _ => {
                    self.break_pipeline(job.session);
                    return Some(rejected(
                        ErrorCode::TooOld,
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
            return Some(rejected(
                ErrorCode::FutureVersion,
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
                    return Some(SubmitOutcome::Duplicate { seq, ticket })
                }
                Some(Err(e)) => return Some(outcome_of(e)),
                Some(Ok(Submitted::Applied { .. })) | None => {}
            }
        }
        broken.then(|| {
            rejected(
                ErrorCode::PipelineConflict,
                "an earlier op of this connection was refused; open the document again",
            )
        })
    }

    /// Transforms the op over what it missed and sequences it. `log` holds the ops a
    /// previous step asked for with [`Step::ReadLog`].
    pub fn step<S: Sequencer>(
        &self,
        sequencer: &S,
        job: &mut Job,
        log: Option<Vec<SequencedOp>>,
    ) -> Step {
        match self.try_step(sequencer, job, log) {
            Ok(Step::Done(outcome @ SubmitOutcome::Rejected(..))) | Err(outcome) => {
                Step::Done(self.refused(sequencer, job, outcome))
            }
            Ok(step) => step,
        }
    }

    /// An op is refused: unless it turns out to be a resend of an op applied meanwhile
    /// (its original, sequenced by another session of the same client), the session's
    /// later ops to this document are refused too (they may have been made on top of
    /// it) until it opens the document again.
    fn refused<S: Sequencer>(
        &self,
        sequencer: &S,
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

    fn try_step<S: Sequencer>(
        &self,
        sequencer: &S,
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
        if state.broken_pipelines.contains(&job.session) {
            return Err(rejected(
                ErrorCode::PipelineConflict,
                "an earlier op of this connection was refused; open the document again",
            ));
        }
        if let Some(read_log) = job.over_window(state.window_after(job.at))? {
            return Ok(read_log);
        }
        assert_eq!(
            job.at, state.version,
            "transformed up to the current version"
        );
        let patches = job.op.to_patches();
        let bytes = crate::protocol::patches_wire_len(&patches);
        if bytes > job.max_op_bytes {
            return Err(rejected(
                ErrorCode::TooLarge,
                format!(
                    "the op takes {bytes} bytes once transformed over the ops it missed; the \
                     limit is {}: send it in smaller ops",
                    job.max_op_bytes
                ),
            ));
        }
        let submit = SubmitOp {
            op_id: job.op_id,
            base_version: job.base_version,
            expected_version: state.version,
            fingerprint: job.fingerprint,
            patches: patches.clone(),
        };
        let outcome = match sequencer.submit(&self.id, submit) {
            Ok(Submitted::Applied { seq, ticket }) => {
                assert_eq!(
                    seq,
                    state.version + 1,
                    "the sequencer's seqs are consecutive"
                );
                state.version = seq;
                state.history.push_back(Sequenced {
                    seq,
                    client_id: job.op_id.client_id,
                    op: Arc::new(std::mem::take(&mut job.op)),
                });
                state.trim_history(self.limits.history_window);
                state.pending.insert(
                    seq,
                    Pending {
                        op: WireOp {
                            seq,
                            client_id: job.op_id.client_id,
                            local_seq: job.op_id.local_seq,
                            patches,
                        },
                        submitter: job.session,
                        request_id: job.request_id,
                        durable: false,
                        resent: Vec::new(),
                    },
                );
                SubmitOutcome::Applied { seq, ticket }
            }
            Ok(Submitted::Duplicate { seq, ticket }) => SubmitOutcome::Duplicate { seq, ticket },
            Err(e) => outcome_of(e),
        };
        Ok(Step::Done(outcome))
    }

    /// [`Document::precheck`] then [`Document::step`] until done, reading the log on
    /// this thread when needed (blocking: for tests and callers off the async workers).
    pub fn submit<S: Sequencer>(&self, sequencer: &S, submission: Submission) -> SubmitOutcome {
        let mut job = Job::new(&submission, usize::MAX);
        if let Some(outcome) = self.precheck(sequencer, &job) {
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
    pub fn ack_resend(&self, outbox: &Outbox, request_id: u32, local_seq: u64, seq: u64) {
        let ack = self.frame(
            Message::Ack {
                doc: self.id.to_string(),
                local_seq,
                seq,
            },
            request_id,
        );
        let mut state = self.lock();
        if seq > state.delivered {
            if let Some(p) = state.pending.get_mut(&seq) {
                p.resent.push((outbox.clone(), ack));
                return;
            }
        }
        deliver(&mut state.held, outbox, &ack);
    }

    /// `seq` is durable: deliver every consecutive durable op, in seq order, as an ack
    /// to its submitter and a broadcast to the other subscribers.
    pub fn mark_durable(&self, seq: u64) {
        let mut state = self.lock();
        if let Some(p) = state.pending.get_mut(&seq) {
            p.durable = true;
        }
        loop {
            let next = state.delivered + 1;
            match state.pending.get(&next) {
                Some(p) if p.durable => {}
                _ => break,
            }
            let p = state.pending.remove(&next).expect("checked");
            state.delivered = next;
            let doc = self.id.to_string();
            let ack = self.frame(
                Message::Ack {
                    doc: doc.clone(),
                    local_seq: p.op.local_seq,
                    seq: p.op.seq,
                },
                p.request_id,
            );
            let remote = self.frame(Message::Remote { doc, op: p.op }, 0);
            let State {
                subscribers, held, ..
            } = &mut *state;
            for outbox in subscribers.values() {
                let frame = if outbox.session == p.submitter {
                    &ack
                } else {
                    &remote
                };
                deliver(held, outbox, frame);
            }
            for (outbox, ack) in &p.resent {
                deliver(held, outbox, ack);
            }
        }
        state.trim_history(self.limits.history_window);
        state.release_spare();
    }
}

/// The refusal a sequencer error becomes.
fn outcome_of(e: SubmitError) -> SubmitOutcome {
    match e {
        SubmitError::Invalid(e @ crate::text::ApplyError::OutOfRange { .. }) => {
            rejected(ErrorCode::OutOfRange, e.to_string())
        }
        SubmitError::Invalid(e) => rejected(ErrorCode::TooLarge, e.to_string()),
        SubmitError::InvalidDocId(m) => rejected(ErrorCode::InvalidDocId, m),
        SubmitError::TooLarge(m) => rejected(ErrorCode::TooLarge, m),
        SubmitError::OpIdReused(m) => rejected(ErrorCode::OpIdReused, m),
        SubmitError::Storage(m) => rejected(ErrorCode::StorageFailed, m.to_string()),
        e @ SubmitError::VersionMismatch { .. } => {
            rejected(ErrorCode::Malformed, format!("internal: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::outbox;

    const MAX_FRAME: usize = 1 << 20;

    fn document() -> Document {
        let limits = DocumentLimits {
            presence_interval: Duration::from_millis(50),
            max_frame: MAX_FRAME,
            history_window: 8,
        };
        Document::new(Arc::from("d"), 0, limits)
    }

    #[test]
    fn a_quiet_open_document_keeps_no_emptied_tables() {
        let doc = document();
        let (subscriber, _writer) = outbox::outbox(1, 7, 8 << 20, MAX_FRAME);
        doc.subscribe(subscriber);
        // Another client's op, sequenced before the subscriber's snapshot is out.
        {
            let mut state = doc.lock();
            let op = WireOp {
                seq: 1,
                client_id: 9,
                local_seq: 1,
                patches: vec![Patch::new(0, 0, "x")],
            };
            state.pending.insert(
                1,
                Pending {
                    op,
                    submitter: 2,
                    request_id: 1,
                    durable: false,
                    resent: Vec::new(),
                },
            );
            state.version = 1;
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
