//! Replies of durable ops read from the log (a catch-up, a fetch), in `Ops` frames
//! that each fit, sent at the pace the client reads.

use super::Session;
use crate::protocol::message::{Message, WireOp};
use crate::protocol::patches_wire_len;
use crate::sequencer::Sequencer;
use crate::server::wire_op;

/// Ops read from the log at a time for a catch-up or fetch.
const READ_BATCH: usize = 256;

impl<S: Sequencer> Session<S> {
    /// Sends up to `limit` durable ops after `after` in `Ops` frames that each fit,
    /// reading the log off the async workers. `Truncated` if the log no longer holds
    /// them (or one would not fit a frame of this server's size).
    pub(super) async fn send_ops(&self, rid: u32, doc: &str, mut after: u64, limit: u64) -> Sent {
        let max_frame = self.max_frame();
        let header = 5 + 2 + doc.len() + 1 + 4;
        let mut frame_ops: Vec<WireOp> = Vec::new();
        let mut frame_len = header;
        let mut left = limit;
        let mut first = true;
        // No frame of the reply sent yet: it can still become another kind of reply.
        let mut first_frame = true;
        loop {
            let want = left.min(READ_BATCH as u64) as usize;
            let ops = if want == 0 {
                Vec::new()
            } else {
                let sequencer = self.server.sequencer.clone();
                let id = doc.to_owned();
                let read = self
                    .server
                    .blocking(move || sequencer.ops_after(&id, after, want))
                    .await;
                match read {
                    Ok(Ok(Some(ops))) => ops,
                    Ok(Ok(None)) if first => return Sent::Truncated,
                    Ok(Ok(None)) => {
                        return Sent::Cut(format!(
                            "ops after {after} were truncated while being sent; open the document again"
                        ))
                    }
                    Ok(Err(reason)) => return Sent::Failed(reason.to_string()),
                    Err(e) => return Sent::Failed(format!("reading the log: {e}")),
                }
            };
            first = false;
            let done = ops.len() < want || want == 0;
            left -= ops.len() as u64;
            for op in ops {
                after = op.seq;
                let op = wire_op(op);
                let len = 24 + patches_wire_len(&op.patches);
                if header + len > max_frame {
                    // Written under a larger --max-frame: it cannot be sent as an op.
                    if first_frame {
                        return Sent::Truncated;
                    }
                    return Sent::Cut(format!(
                        "op {after} does not fit this server's frames; open the document again"
                    ));
                }
                if frame_len + len > max_frame {
                    first_frame = false;
                    let full = std::mem::take(&mut frame_ops);
                    frame_len = header;
                    if let Sent::Closing = self.send_ops_frame(rid, doc, true, full).await {
                        return Sent::Closing;
                    }
                }
                frame_len += len;
                frame_ops.push(op);
            }
            if done {
                break;
            }
        }
        self.send_ops_frame(rid, doc, false, frame_ops).await
    }

    /// Queues one `Ops` frame of a reply (waiting for room).
    pub(super) async fn send_ops_frame(
        &self,
        rid: u32,
        doc: &str,
        more: bool,
        ops: Vec<WireOp>,
    ) -> Sent {
        let frame = self.reply(
            rid,
            Message::Ops {
                doc: doc.to_owned(),
                more,
                ops,
            },
        );
        if self.outbox.send_wait(frame).await {
            Sent::Done
        } else {
            Sent::Closing
        }
    }
}

/// How a reply of several frames went.
pub(super) enum Sent {
    Done,
    /// The session is closing.
    Closing,
    /// The log no longer holds the ops (nothing of the reply was sent).
    Truncated,
    /// Frames of the reply were sent, then it could not go on: it ends with `Reload`.
    Cut(String),
    /// The storage failed.
    Failed(String),
}
