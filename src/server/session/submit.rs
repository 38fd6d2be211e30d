//! `Submit`: an op checked against the limits, transformed over what it missed and
//! sequenced by the document core, acknowledged once durable; a refusal becomes a
//! `Reject` with its wire code.

use std::ops::ControlFlow;
use std::sync::Arc;

use super::access::Permit;
use super::Session;
use crate::auth::Access;
use crate::op::Patch;
use crate::protocol::message::{Envelope, ErrorCode, Message};
use crate::protocol::{max_op_bytes, patches_wire_len, MAX_OPS_IN_FLIGHT, MAX_OP_PATCHES};
use crate::sequencer::Sequencer;
use crate::server::document::{
    read_missed, DeletionAnswer, Document, Job, OpLimit, Refusal, RefusalKind, Step, Submission,
    SubmitOutcome,
};
use crate::server::durability::Action;
use crate::server::outbox::{encode, Outbox};
use crate::server::wire::refusal_code;

/// An op with more patches than this is put in component form on a blocking thread.
const LARGE_OP_PATCHES: usize = 1024;

/// A transform costing more component steps than this runs on a blocking thread.
const HEAVY_TRANSFORM: u64 = 1 << 20;

impl<S: Sequencer> Session<S> {
    pub(super) async fn submit(
        &self,
        rid: u32,
        doc: String,
        local_seq: u64,
        base_version: u64,
        patches: Vec<Patch>,
    ) {
        let received = std::time::Instant::now();
        let reject = |code: ErrorCode, message: String| {
            self.server.metrics().op_rejected(code);
            self.send(
                rid,
                Message::Reject {
                    doc: doc.clone(),
                    local_seq,
                    code,
                    message,
                },
            )
        };
        match self.permit(&doc, Access::Write) {
            Permit::Granted => {}
            Permit::Refused(code, message) => {
                // As any refused op: later ones wait for the document to be opened
                // again (they may have been made on top of this one).
                if let Some(document) = self.open_doc(&doc) {
                    document.break_pipeline(self.outbox.session);
                }
                return reject(code, message);
            }
            Permit::Expired => return,
        }
        let Some(document) = self.open_doc(&doc).cloned() else {
            return match self.served_elsewhere(&doc).await {
                Some(Ok(owner)) => self.send_redirect(rid, &doc, &owner),
                Some(Err(why)) => reject(ErrorCode::Unavailable, why),
                None => reject(
                    ErrorCode::UnknownDocument,
                    "open the document before submitting to it".into(),
                ),
            };
        };
        let max_bytes = max_op_bytes(self.max_frame());
        let bytes = patches_wire_len(&patches);
        if patches.len() > MAX_OP_PATCHES || bytes > max_bytes {
            document.break_pipeline(self.outbox.session);
            return reject(
                ErrorCode::TooLarge,
                format!(
                    "the op has {} patches in {bytes} bytes; the limits are {MAX_OP_PATCHES} \
                     patches and {max_bytes} bytes",
                    patches.len()
                ),
            );
        }
        if !self.outbox.begin_op(MAX_OPS_IN_FLIGHT) {
            document.break_pipeline(self.outbox.session);
            return reject(
                ErrorCode::TooManyInFlight,
                format!("{MAX_OPS_IN_FLIGHT} ops of this connection are in flight already"),
            );
        }
        let submission = Submission {
            session: self.outbox.session,
            request_id: rid,
            client_id: self.outbox.client_id,
            local_seq,
            base_version,
            patches,
        };
        // The op's bytes wait in memory until durable: a share of the server's budget,
        // waited for (a disk that falls behind slows submitters, not memory).
        let budget = self.server.unsynced.clone();
        let share = u32::try_from(bytes).expect("an op is below 4 GiB");
        let permit = tokio::select! {
            biased;
            permit = budget.acquire_many_owned(share) => permit.expect("never closed"),
            _ = self.outbox.closed() => {
                self.outbox.end_op();
                return;
            }
        };
        let outcome = self.sequence(&document, submission, max_bytes).await;
        let durable = &self.server.durable;
        match outcome {
            // Acks and broadcasts leave only once the op is durable.
            SubmitOutcome::Applied { seq, ticket } => durable.push(
                ticket,
                Action::Deliver {
                    document,
                    seq,
                    outbox: self.outbox.clone(),
                    request_id: rid,
                    local_seq,
                    received,
                },
                permit,
            ),
            SubmitOutcome::Duplicate { seq, ticket } => durable.push(
                ticket,
                Action::AckDuplicate {
                    document: document.clone(),
                    outbox: self.outbox.clone(),
                    request_id: rid,
                    local_seq,
                    seq,
                },
                permit,
            ),
            SubmitOutcome::Refused(Refusal { kind, message }) => {
                self.outbox.end_op();
                reject(refusal_code(kind), message);
            }
            SubmitOutcome::Moved(owner) => {
                self.outbox.end_op();
                // Every session that has it open is told (this one too, unasked, unless
                // it was told already), then this op is answered: not applied here.
                self.server.redirect(&document, owner.clone());
                self.send_redirect(rid, &doc, &owner);
            }
            // Answered once the deletion is durable (`Reject` 32) or failed (`Redirect`,
            // or `Reject` 30): protocol.md, "Deleted documents". On a task of its own,
            // so the session goes on reading meanwhile; the op stays in flight (the
            // connection's bound) until then. Never written, it gives its bytes back
            // to the server's unsynced budget at once.
            SubmitOutcome::AfterDeletion(wait) => {
                drop(permit);
                let (server, outbox) = (self.server.clone(), self.outbox.clone());
                let max_frame = self.max_frame();
                tokio::spawn(async move {
                    let answer = tokio::select! {
                        biased;
                        answer = wait.answer() => Some(answer),
                        _ = outbox.closed() => None,
                    };
                    outbox.end_op();
                    let message = match answer {
                        None => return,
                        Some(DeletionAnswer::Refused(Refusal { kind, message })) => {
                            let code = refusal_code(kind);
                            server.metrics().op_rejected(code);
                            Message::Reject {
                                doc,
                                local_seq,
                                code,
                                message,
                            }
                        }
                        Some(DeletionAnswer::Moved(owner)) => {
                            server.redirect(&document, owner.clone());
                            Message::Redirect {
                                doc,
                                addr: owner.addr.to_string(),
                                ws_url: owner.ws_url.to_string(),
                            }
                        }
                    };
                    let envelope = Envelope {
                        request_id: rid,
                        message,
                    };
                    outbox.send(encode(&envelope, max_frame));
                });
            }
        }
    }

    /// Transforms the op over what it missed and sequences it. Log reads and heavy
    /// transforms run on a blocking thread, never under a lock another document needs.
    pub(super) async fn sequence(
        &self,
        document: &Arc<Document<Outbox>>,
        submission: Submission,
        max_bytes: usize,
    ) -> SubmitOutcome {
        let sequencer = &self.server.sequencer;
        let limit = OpLimit {
            max: max_bytes,
            measure: patches_wire_len,
        };
        // Putting a long patch list in component form is O(n log n): off the workers.
        let mut job = if submission.patches.len() > LARGE_OP_PATCHES {
            match self
                .server
                .blocking(move || Job::new(&submission, limit))
                .await
            {
                Ok(job) => job,
                Err(e) => return crashed(e),
            }
        } else {
            Job::new(&submission, limit)
        };
        let mut checked = match document.precheck(&**sequencer, &job) {
            ControlFlow::Continue(version) => Some(version),
            ControlFlow::Break(outcome) => return outcome,
        };
        let mut log = None;
        loop {
            // The precheck's version the first time (the document's lock was let go since:
            // an estimate, as any); read again after a step that read the log.
            let version = checked
                .take()
                .unwrap_or_else(|| document.version(&**sequencer));
            let behind = version.saturating_sub(job.at());
            let step = if log.is_some() || job.cost(behind) > HEAVY_TRANSFORM {
                let (doc, seq) = (document.clone(), sequencer.clone());
                let records = log.take();
                match self
                    .server
                    .blocking(move || {
                        let step = doc.step(&*seq, &mut job, records);
                        (job, step)
                    })
                    .await
                {
                    Ok((back, step)) => {
                        job = back;
                        step
                    }
                    Err(e) => return crashed(e),
                }
            } else {
                document.step(&**sequencer, &mut job, None)
            };
            match step {
                Step::Done(outcome) => return outcome,
                Step::ReadLog { after, upto } => {
                    let (seq, id) = (sequencer.clone(), document.id.clone());
                    let read = self
                        .server
                        .blocking(move || read_missed(&*seq, &id, after, upto))
                        .await;
                    match read {
                        Ok(Ok(records)) => log = Some(records),
                        Ok(Err(outcome)) => return outcome,
                        Err(e) => return crashed(e),
                    }
                }
            }
        }
    }
}

/// The refusal of an op whose work panicked off the async workers.
fn crashed(e: String) -> SubmitOutcome {
    SubmitOutcome::Refused(Refusal::new(RefusalKind::Crashed, format!("internal: {e}")))
}
