//! `Fetch`: durable ops after a seq, up to a limit.

use super::ops::Sent;
use super::Session;
use crate::protocol::message::{ErrorCode, Message};
use crate::sequencer::Sequencer;

/// Most ops in one `Fetch` reply, whatever its `limit`.
pub const FETCH_MAX_OPS: u32 = 10_000;

impl<S: Sequencer> Session<S> {
    pub(super) async fn fetch(&self, rid: u32, doc: String, after_seq: u64, limit: u32) -> bool {
        match self.served_elsewhere(&doc).await {
            Some(Ok(owner)) => {
                self.send_redirect(rid, &doc, &owner);
                return true;
            }
            Some(Err(why)) => {
                self.send_error(rid, ErrorCode::Unavailable, why);
                return true;
            }
            None => {}
        }
        let limit = u64::from(limit.min(FETCH_MAX_OPS));
        let incarnation = self.server.sequencer.incarnation(&doc);
        match self.send_ops(rid, &doc, after_seq, limit).await {
            Sent::Done => true,
            Sent::Closing => false,
            Sent::Truncated => {
                self.send(
                    rid,
                    Message::Reload {
                        doc,
                        reason: format!("ops after seq {after_seq} are no longer kept"),
                    },
                );
                true
            }
            Sent::Cut(reason) => {
                self.send(rid, Message::Reload { doc, reason });
                true
            }
            Sent::Failed(reason) => {
                self.send_read_failure(rid, &doc, incarnation, reason).await;
                true
            }
        }
    }
}
