//! One open document on the server: the window of recent ops that late ops are
//! transformed over, the subscribed sessions, and delivery of acks and broadcasts in
//! seq order once each op is durable.
//!
//! The authoritative text, version and dedupe table live in the [`Sequencer`]; this
//! keeps only what transformation and fan-out need.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::op::Patch;
use crate::ot::{Side, TextOp};
use crate::protocol::message::{Envelope, ErrorCode, Message, Selection, WireOp};
use crate::sequencer::{Sequencer, SubmitError, SubmitOp, Submitted};

/// Ops kept in memory per document for transforming late ops; older ones are read from
/// the log.
pub const HISTORY_WINDOW: usize = 4096;

pub type SessionId = u64;

/// A session's outbound queue, bounded: a subscriber that cannot keep up is dropped.
#[derive(Clone)]
pub struct Outbox {
    pub session: SessionId,
    pub client_id: u64,
    pub tx: mpsc::Sender<Arc<Envelope>>,
    /// Told when this session overflowed and must close.
    pub kick: Arc<tokio::sync::Notify>,
}

impl Outbox {
    /// Queues without waiting; on overflow the session is kicked (it resyncs on reconnect).
    pub fn send(&self, env: Arc<Envelope>) -> bool {
        match self.tx.try_send(env) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

struct Durable {
    op: WireOp,
    submitter: SessionId,
    request_id: u32,
    durable: bool,
}

struct State {
    /// The version after the newest op in `history`.
    version: u64,
    /// (seq, client id, op) of the newest ops, oldest first.
    history: VecDeque<(u64, u64, TextOp)>,
    /// Sessions whose pipelined op conflicted: their later ops are refused until they
    /// open the document again (they were made on top of the refused one).
    broken_pipelines: HashSet<SessionId>,
    /// Sequenced ops waiting for durability or for earlier seqs, by seq.
    pending: BTreeMap<u64, Durable>,
    /// Highest seq delivered to subscribers.
    delivered: u64,
    subscribers: HashMap<SessionId, Outbox>,
    /// Messages for sessions that subscribed but have not been sent their snapshot yet:
    /// released by [`Document::activate`], so that no broadcast overtakes the snapshot.
    held: HashMap<SessionId, Vec<Arc<Envelope>>>,
    presence: HashMap<u64, Presence>,
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

/// Sends to one subscriber, or holds the message while its snapshot is not out yet.
fn deliver(
    held: &mut HashMap<SessionId, Vec<Arc<Envelope>>>,
    outbox: &Outbox,
    env: &Arc<Envelope>,
) {
    match held.get_mut(&outbox.session) {
        Some(queue) if queue.len() < outbox.tx.max_capacity() => queue.push(env.clone()),
        Some(_) => outbox.kick.notify_one(),
        None => {
            outbox.send(env.clone());
        }
    }
}

impl State {
    fn deliver_all(&mut self, except: Option<SessionId>, env: &Arc<Envelope>) {
        let State {
            subscribers, held, ..
        } = self;
        for outbox in subscribers.values().filter(|o| Some(o.session) != except) {
            deliver(held, outbox, env);
        }
    }
}

pub struct Document {
    pub id: Arc<str>,
    state: Mutex<State>,
    /// A client's presence is broadcast at most once per interval; updates in between
    /// are coalesced into the latest one.
    presence_interval: Duration,
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

pub enum SubmitOutcome {
    /// The ack goes out through [`Document::mark_durable`] in seq order.
    Applied {
        seq: u64,
        ticket: crate::sequencer::Ticket,
    },
    Duplicate {
        seq: Option<u64>,
        ticket: crate::sequencer::Ticket,
    },
    Rejected(ErrorCode, String),
}

/// Transforms `op` of `client_id` over the ops it missed, oldest first. The client's own
/// ops among them were pipelined before this one, which was made on top of them: they
/// are skipped. That is exact only while they precede every other client's op there
/// (each was then sequenced as made); an own op after another client's op means this
/// one was made on a state the server never had, and it is refused.
fn rebase<T: std::borrow::Borrow<TextOp>>(
    mut op: TextOp,
    client_id: u64,
    missed: impl Iterator<Item = (u64, T)>,
) -> Result<TextOp, String> {
    let mut others_seen = false;
    for (by, over) in missed {
        if by == client_id {
            if others_seen {
                return Err(
                    "a pipelined op conflicts with a concurrent op sequenced between \
                            this client's ops; open the document again and resend"
                        .into(),
                );
            }
            continue;
        }
        others_seen = true;
        op = op.transform(over.borrow(), Side::Left);
    }
    Ok(op)
}

impl Document {
    pub fn new(id: Arc<str>, version: u64, presence_interval: Duration) -> Self {
        Document {
            id,
            presence_interval,
            state: Mutex::new(State {
                version,
                history: VecDeque::new(),
                broken_pipelines: HashSet::new(),
                pending: BTreeMap::new(),
                delivered: version,
                subscribers: HashMap::new(),
                held: HashMap::new(),
                presence: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes a session. Broadcasts for it are held until [`Document::activate`].
    pub fn subscribe(&self, outbox: Outbox) {
        let mut state = self.lock();
        state.held.insert(outbox.session, Vec::new());
        state.broken_pipelines.remove(&outbox.session);
        state.subscribers.insert(outbox.session, outbox);
    }

    /// The session's snapshot or catch-up is queued: release what was held for it, in
    /// order, then send it the current presence of the others.
    pub fn activate(&self, session: SessionId) {
        let mut state = self.lock();
        let held = state.held.remove(&session).unwrap_or_default();
        let Some(outbox) = state.subscribers.get(&session).cloned() else {
            return;
        };
        for env in held {
            outbox.send(env);
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
        if state.subscribers.remove(&session).is_some()
            && state.presence.remove(&client_id).is_some()
        {
            let env = self.presence_state(client_id, Vec::new());
            state.deliver_all(None, &env);
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

    fn presence_state(&self, client_id: u64, selections: Vec<Selection>) -> Arc<Envelope> {
        Arc::new(Envelope {
            request_id: 0,
            message: Message::PresenceState {
                doc: self.id.to_string(),
                client_id,
                selections,
            },
        })
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
            Some(p) if now < p.sent_at + self.presence_interval => {
                p.selections = selections;
                p.session = session;
                if !p.dirty {
                    p.dirty = true;
                    let due = p.sent_at + self.presence_interval;
                    let doc = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due.into()).await;
                        doc.flush_presence(client_id);
                    });
                }
            }
            _ => {
                let env = self.presence_state(client_id, selections.clone());
                state.presence.insert(
                    client_id,
                    Presence {
                        selections,
                        session,
                        sent_at: now,
                        dirty: false,
                    },
                );
                state.deliver_all(Some(session), &env);
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
        let env = self.presence_state(client_id, selections);
        state.deliver_all(Some(session), &env);
    }

    /// Transforms the op over what it missed and sequences it.
    pub fn submit<S: Sequencer>(&self, sequencer: &S, submission: Submission) -> SubmitOutcome {
        let Submission {
            session,
            request_id,
            client_id,
            local_seq,
            base_version,
            patches,
        } = submission;
        let mut state = self.lock();
        if base_version > state.version {
            return SubmitOutcome::Rejected(
                ErrorCode::FutureVersion,
                format!(
                    "base version {base_version} is ahead of the document (version {})",
                    state.version
                ),
            );
        }
        let op_id = crate::op::OpId {
            client_id,
            local_seq,
        };
        // A retry is answered before anything else: its base may be long gone, or its
        // connection's pipeline broken since. (An op made on the current version needs
        // no early look: the sequencer's submit answers a retry the same way.)
        let needs_early_look =
            base_version < state.version || state.broken_pipelines.contains(&session);
        if needs_early_look {
            if let Some(Submitted::Duplicate { seq, ticket }) = sequencer.applied(&self.id, op_id) {
                return SubmitOutcome::Duplicate { seq, ticket };
            }
        }
        if state.broken_pipelines.contains(&session) {
            return SubmitOutcome::Rejected(
                ErrorCode::PipelineConflict,
                "an earlier pipelined op of this connection was refused; open the document again"
                    .into(),
            );
        }
        let mut op = TextOp::from_patches(&patches);
        if base_version < state.version {
            let oldest = state
                .history
                .front()
                .map_or(state.version + 1, |(s, _, _)| *s);
            let rebased = if base_version + 1 < oldest {
                // Older than the window: read the missed ops from the log.
                let Some(missed) = sequencer.ops_after(&self.id, base_version, usize::MAX) else {
                    return SubmitOutcome::Rejected(
                        ErrorCode::FutureVersion,
                        format!("base version {base_version} is older than the server keeps; reload the document"),
                    );
                };
                rebase(
                    op,
                    client_id,
                    missed
                        .iter()
                        .filter(|m| m.server_seq <= state.version)
                        .map(|m| (m.client_id, TextOp::from_patches(&m.patches))),
                )
            } else {
                // The window holds consecutive seqs ending at `version`: the ops after
                // `base_version` are its last `version - base_version` entries.
                let missed = (state.version - base_version) as usize;
                let start = state.history.len() - missed;
                rebase(
                    op,
                    client_id,
                    state.history.range(start..).map(|(_, c, over)| (*c, over)),
                )
            };
            op = match rebased {
                Ok(op) => op,
                Err(message) => {
                    state.broken_pipelines.insert(session);
                    return SubmitOutcome::Rejected(ErrorCode::PipelineConflict, message);
                }
            };
        }
        let transformed = op.to_patches();
        let submit = SubmitOp {
            op_id,
            base_version,
            expected_version: state.version,
            patches: transformed.clone(),
        };
        match sequencer.submit(&self.id, submit) {
            Ok(Submitted::Applied { seq, ticket }) => {
                debug_assert_eq!(seq, state.version + 1);
                state.version = seq;
                state.history.push_back((seq, client_id, op));
                if state.history.len() > HISTORY_WINDOW {
                    state.history.pop_front();
                }
                state.pending.insert(
                    seq,
                    Durable {
                        op: WireOp {
                            seq,
                            client_id,
                            local_seq,
                            patches: transformed,
                        },
                        submitter: session,
                        request_id,
                        durable: false,
                    },
                );
                SubmitOutcome::Applied { seq, ticket }
            }
            Ok(Submitted::Duplicate { seq, ticket }) => SubmitOutcome::Duplicate { seq, ticket },
            Err(SubmitError::Invalid(e)) => {
                SubmitOutcome::Rejected(ErrorCode::OutOfRange, e.to_string())
            }
            Err(SubmitError::InvalidDocId(m)) => {
                SubmitOutcome::Rejected(ErrorCode::InvalidDocId, m)
            }
            Err(SubmitError::TooLarge(m)) => SubmitOutcome::Rejected(ErrorCode::TooLarge, m),
            Err(SubmitError::Storage(m)) => {
                SubmitOutcome::Rejected(ErrorCode::StorageFailed, m.to_string())
            }
            Err(e @ SubmitError::VersionMismatch { .. }) => {
                SubmitOutcome::Rejected(ErrorCode::Malformed, format!("internal: {e}"))
            }
        }
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
            let ack = Arc::new(Envelope {
                request_id: p.request_id,
                message: Message::Ack {
                    doc: doc.clone(),
                    local_seq: p.op.local_seq,
                    seq: p.op.seq,
                },
            });
            let remote = Arc::new(Envelope {
                request_id: 0,
                message: Message::Remote { doc, op: p.op },
            });
            let State {
                subscribers, held, ..
            } = &mut *state;
            for outbox in subscribers.values() {
                let env = if outbox.session == p.submitter {
                    &ack
                } else {
                    &remote
                };
                deliver(held, outbox, env);
            }
        }
    }
}
