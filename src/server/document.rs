//! One open document on the server: the window of recent ops that late ops are
//! transformed over, the subscribed sessions, and delivery of acks and broadcasts in
//! seq order once each op is durable.
//!
//! The authoritative text, version and dedupe table live in the [`Sequencer`]; this
//! keeps only what transformation and fan-out need.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// (seq, op) of the newest ops, oldest first.
    history: VecDeque<(u64, TextOp)>,
    /// Sequenced ops waiting for durability or for earlier seqs, by seq.
    pending: BTreeMap<u64, Durable>,
    /// Highest seq delivered to subscribers.
    delivered: u64,
    subscribers: HashMap<SessionId, Outbox>,
    /// Messages for sessions that subscribed but have not been sent their snapshot yet:
    /// released by [`Document::activate`], so that no broadcast overtakes the snapshot.
    held: HashMap<SessionId, Vec<Arc<Envelope>>>,
    presence: HashMap<u64, Vec<Selection>>,
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

impl Document {
    pub fn new(id: Arc<str>, version: u64) -> Self {
        Document {
            id,
            state: Mutex::new(State {
                version,
                history: VecDeque::new(),
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
        for (client_id, selections) in &state.presence {
            if *client_id != outbox.client_id {
                outbox.send(Arc::new(Envelope {
                    request_id: 0,
                    message: Message::PresenceState {
                        doc: self.id.to_string(),
                        client_id: *client_id,
                        selections: selections.clone(),
                    },
                }));
            }
        }
    }

    /// Removes a session; tells the others its presence is gone.
    pub fn unsubscribe(&self, session: SessionId, client_id: u64) {
        let mut state = self.lock();
        state.held.remove(&session);
        if state.subscribers.remove(&session).is_some()
            && state.presence.remove(&client_id).is_some()
        {
            let env = Arc::new(Envelope {
                request_id: 0,
                message: Message::PresenceState {
                    doc: self.id.to_string(),
                    client_id,
                    selections: Vec::new(),
                },
            });
            state.deliver_all(None, &env);
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Broadcasts a presence update to the other subscribers. Never stored.
    pub fn presence(&self, session: SessionId, client_id: u64, selections: Vec<Selection>) {
        let mut state = self.lock();
        state.presence.insert(client_id, selections.clone());
        let env = Arc::new(Envelope {
            request_id: 0,
            message: Message::PresenceState {
                doc: self.id.to_string(),
                client_id,
                selections,
            },
        });
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
        let mut op = TextOp::from_patches(&patches);
        if base_version < state.version {
            let oldest = state.history.front().map_or(state.version + 1, |(s, _)| *s);
            if base_version + 1 < oldest {
                // Older than the window: read the missed ops from the log.
                let Some(missed) = sequencer.ops_after(&self.id, base_version, usize::MAX) else {
                    return SubmitOutcome::Rejected(
                        ErrorCode::FutureVersion,
                        format!("base version {base_version} is older than the server keeps; reload the document"),
                    );
                };
                for m in missed.iter().filter(|m| m.server_seq <= state.version) {
                    op = op.transform(&TextOp::from_patches(&m.patches), Side::Left);
                }
            } else {
                // The window holds consecutive seqs ending at `version`: the ops after
                // `base_version` are its last `version - base_version` entries.
                let missed = (state.version - base_version) as usize;
                let start = state.history.len() - missed;
                for (seq, over) in state.history.range(start..) {
                    debug_assert!(*seq > base_version);
                    op = op.transform(over, Side::Left);
                }
            }
        }
        let transformed = op.to_patches();
        let submit = SubmitOp {
            op_id: crate::op::OpId {
                client_id,
                local_seq,
            },
            base_version,
            expected_version: state.version,
            patches: transformed.clone(),
        };
        match sequencer.submit(&self.id, submit) {
            Ok(Submitted::Applied { seq, ticket }) => {
                debug_assert_eq!(seq, state.version + 1);
                state.version = seq;
                state.history.push_back((seq, op));
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
