//! What happens once a sequenced op is durable: one task per server waits on the
//! sequencer's tickets in submission order and delivers the acks and broadcasts.
//!
//! One waiter for everything instead of one task per op: a group commit of N ops wakes
//! one task, not N, and nothing is spawned per op. Tickets are waited on in the order
//! they were queued; the local sequencer's tickets are LSNs, which that order follows
//! up to races between documents, so a ticket found durable is almost always followed
//! by others already durable (their wait returns at once).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::document::Document;
use super::outbox::{encode, Outbox};
use super::Server;
use crate::protocol::message::{Envelope, ErrorCode, Message};
use crate::sequencer::{Sequencer, Ticket};

/// What to do once a ticket is durable (or the log failed).
pub enum Action {
    /// A new op: deliver its ack and broadcast in seq order, or tell the submitter
    /// that the log failed.
    Deliver {
        document: Arc<Document<Outbox>>,
        seq: u64,
        outbox: Outbox,
        request_id: u32,
        local_seq: u64,
        /// When its `Submit` arrived (for the ack latency metric).
        received: std::time::Instant,
    },
    /// A retried op: the original ack again, once the original is durable, in seq
    /// order with the document's other messages.
    AckDuplicate {
        document: Arc<Document<Outbox>>,
        outbox: Outbox,
        request_id: u32,
        local_seq: u64,
        seq: u64,
    },
}

#[derive(Default)]
pub struct DurabilityQueue {
    /// Each entry holds its op's share of the server's budget of bytes waiting for the
    /// disk, returned once the op is durable (or failed).
    waiting: Mutex<VecDeque<(Ticket, Action, OwnedSemaphorePermit)>>,
    added: Notify,
}

impl DurabilityQueue {
    pub fn push(&self, ticket: Ticket, action: Action, bytes: OwnedSemaphorePermit) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.push_back((ticket, action, bytes));
        if waiting.len() == 1 {
            // A permit is stored if the task is not waiting yet: no lost wake-up.
            self.added.notify_one();
        }
    }

    fn front(&self) -> Option<Ticket> {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.front().map(|(t, _, _)| *t)
    }

    fn pop(&self) -> Option<(Action, OwnedSemaphorePermit)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.pop_front().map(|(_, a, bytes)| (a, bytes))
    }

    /// Delivers until the queue is dropped by the server (runs as a task for the
    /// server's lifetime). Entries hold their session's outbox, so a session's writer
    /// finishes only after its pending acks went out.
    pub async fn run<S: Sequencer>(self: Arc<Self>, server: Arc<Server<S>>) {
        loop {
            let Some(ticket) = self.front() else {
                self.added.notified().await;
                continue;
            };
            let outcome = server.sequencer.wait_durable(ticket).await;
            let Some((action, bytes)) = self.pop() else {
                continue;
            };
            act(&server, action, outcome);
            drop(bytes);
        }
    }
}

fn act<S: Sequencer>(server: &Server<S>, action: Action, outcome: Result<(), Arc<str>>) {
    let max_frame = server.config.max_frame;
    // Every action answers one submit: counted as answered before its answer can go out,
    // so a client that sends its next op on the ack finds room for it.
    match &action {
        Action::Deliver { outbox, .. } | Action::AckDuplicate { outbox, .. } => outbox.end_op(),
    }
    match (action, outcome) {
        (
            Action::Deliver {
                document,
                seq,
                received,
                ..
            },
            Ok(()),
        ) => {
            // Counted before its ack can reach the client.
            server.metrics().op_accepted(received);
            document.mark_durable(seq);
            // Its last subscriber may have left while the op was on its way to disk.
            if document.subscriber_count() == 0 {
                server.release(&document);
            }
        }
        (
            Action::AckDuplicate {
                document,
                outbox,
                request_id,
                local_seq,
                seq,
            },
            Ok(()),
        ) => document.ack_resend(&outbox, request_id, local_seq, seq),
        // Delivered already (a deletion the store carried out while the local log
        // failed, cluster mode): acknowledged, and so not refused as well.
        (Action::Deliver { document, seq, .. }, Err(_)) if !document.refuse_unacknowledged(seq) => {
        }
        // A failed log acknowledges nothing more, and the client is told so.
        (
            Action::Deliver {
                document,
                outbox,
                request_id,
                local_seq,
                ..
            }
            | Action::AckDuplicate {
                document,
                outbox,
                request_id,
                local_seq,
                ..
            },
            Err(reason),
        ) => {
            server.metrics().op_rejected(ErrorCode::StorageFailed);
            outbox.send(encode(
                &Envelope {
                    request_id,
                    message: Message::Reject {
                        doc: document.id.to_string(),
                        local_seq,
                        code: ErrorCode::StorageFailed,
                        message: reason.to_string(),
                    },
                },
                max_frame,
            ));
        }
    }
}
