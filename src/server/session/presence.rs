//! `Presence`: a client's selections, broadcast by the document (coalesced).

use super::Session;
use crate::protocol::message::{ErrorCode, Selection};
use crate::protocol::MAX_SELECTIONS;
use crate::sequencer::Owner;
use crate::sequencer::Sequencer;

impl<S: Sequencer> Session<S> {
    pub(super) async fn presence(&self, rid: u32, doc: String, selections: Vec<Selection>) {
        self.server.metrics().presence_in();
        if selections.len() > MAX_SELECTIONS {
            self.send_error(
                rid,
                ErrorCode::TooLarge,
                format!(
                    "{} selections; the limit is {MAX_SELECTIONS}",
                    selections.len()
                ),
            );
            return;
        }
        let moved: Option<Owner> = match self.open_doc(&doc) {
            Some(document) => document
                .presence(self.outbox.session, self.outbox.client_id, selections)
                .err(),
            None => match self.served_elsewhere(&doc).await {
                Some(Ok(owner)) => Some(owner),
                Some(Err(why)) => return self.send_error(rid, ErrorCode::Unavailable, why),
                None => {
                    return self.send_error(
                        rid,
                        ErrorCode::UnknownDocument,
                        format!("presence for {doc:?}, which this connection has not opened"),
                    )
                }
            },
        };
        if let Some(owner) = moved {
            self.send_redirect(rid, &doc, &owner);
        }
    }
}
