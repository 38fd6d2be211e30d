//! `Presence`: a client's selections, broadcast by the document (coalesced).

use super::Session;
use crate::protocol::message::{ErrorCode, Selection};
use crate::protocol::MAX_SELECTIONS;
use crate::sequencer::Sequencer;

impl<S: Sequencer> Session<S> {
    pub(super) fn presence(&self, rid: u32, doc: String, selections: Vec<Selection>) {
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
        match self.opened.get(doc.as_str()) {
            Some(document) => {
                document.presence(self.outbox.session, self.outbox.client_id, selections)
            }
            None => self.send_error(
                rid,
                ErrorCode::UnknownDocument,
                format!("presence for {doc:?}, which this connection has not opened"),
            ),
        }
    }
}
