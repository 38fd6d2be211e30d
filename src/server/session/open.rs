//! `Open`: subscribe to a document and send its snapshot or a catch-up, in frames
//! that fit; broadcasts are held until then.

use super::ops::Sent;
use super::Session;
use crate::protocol::message::{ErrorCode, Message};
use crate::protocol::{MAX_OPEN_DOCS, OP_FRAME_OVERHEAD};
use crate::sequencer::{DocView, Route, RouteError, Sequencer};

/// A catch-up longer than this many ops is sent as a snapshot instead.
pub const CATCHUP_MAX_OPS: u64 = 10_000;

impl<S: Sequencer> Session<S> {
    /// Subscribes to `doc` and sends the snapshot or catch-up, in frames that fit.
    pub(super) async fn open(&mut self, rid: u32, doc: String, known_version: u64) -> bool {
        // The one place a served document meets the route (cluster mode): once it is
        // open, the sequencer or the server says when it moves.
        let elsewhere = match self.server.sequencer.route(&doc).await {
            Ok(Route::Here) => None,
            Ok(Route::Elsewhere(owner)) => Some(Ok(owner)),
            Err(RouteError::Unavailable(why)) => Some(Err(why)),
        };
        if let Some(answer) = elsewhere {
            // Open here no longer (an `Open` of a document open here opens it again).
            if let Some(document) = self.opened.remove(doc.as_str()) {
                document.unsubscribe(self.outbox.session, self.outbox.client_id);
                self.server.release(&document);
            }
            match answer {
                Ok(owner) => self.send_redirect(rid, &doc, &owner),
                Err(why) => self.send_error(rid, ErrorCode::Unavailable, why),
            }
            return true;
        }
        if self.opened.len() >= MAX_OPEN_DOCS && !self.opened.contains_key(doc.as_str()) {
            let message = format!(
                "cannot open {doc:?}: this connection has {MAX_OPEN_DOCS} documents open, \
                 the most it may; close one first"
            );
            self.send_error(rid, ErrorCode::TooManyOpen, message);
            return true;
        }
        let document = self.server.subscribe(&doc, self.outbox.clone());
        self.opened.insert(document.id.clone(), document.clone());
        assert!(self.opened.len() <= MAX_OPEN_DOCS);
        let version = document.version(&*self.server.sequencer);
        let mut sent = Sent::Truncated;
        if known_version > 0
            && known_version <= version
            && version - known_version <= CATCHUP_MAX_OPS
        {
            // Up to the version at subscription: later ops come as held broadcasts.
            sent = self
                .send_ops(rid, &doc, known_version, version - known_version)
                .await;
        }
        if let Sent::Truncated = sent {
            sent = self.send_snapshot(rid, &doc).await;
        }
        match sent {
            Sent::Done => {
                document.activate(self.outbox.session);
                true
            }
            Sent::Closing => false,
            Sent::Truncated => unreachable!("a snapshot is never truncated"),
            Sent::Cut(reason) => {
                document.unsubscribe(self.outbox.session, self.outbox.client_id);
                self.opened.remove(document.id.as_ref());
                self.server.release(&document);
                self.send(rid, Message::Reload { doc, reason });
                true
            }
            Sent::Failed(reason) => {
                document.unsubscribe(self.outbox.session, self.outbox.client_id);
                self.opened.remove(document.id.as_ref());
                self.server.release(&document);
                let reason = format!("cannot open {doc:?}: {reason}");
                self.send_read_failure(rid, &doc, document.incarnation, reason)
                    .await;
                true
            }
        }
    }

    /// The document's durable text, in pieces that each fit a frame, then an empty `Ops`.
    pub(super) async fn send_snapshot(&self, rid: u32, doc: &str) -> Sent {
        // Copying the text (and, after a restart, building it from the log) is blocking
        // work: off the async workers.
        let sequencer = self.server.sequencer.clone();
        let (id, reader) = (doc.to_owned(), self.outbox.client_id);
        let view = match self
            .server
            .blocking(move || sequencer.read_now(&id, Some(reader)))
            .await
        {
            Ok(Ok(Some((view, ticket)))) => {
                // The view holds only durable ops once its newest op is durable.
                if let Err(reason) = self.server.sequencer.wait_durable(ticket).await {
                    return Sent::Failed(reason.to_string());
                }
                view
            }
            Ok(Ok(None)) => DocView::default(),
            Ok(Err(reason)) => return Sent::Failed(reason.to_string()),
            Err(panic) => return Sent::Failed(format!("internal: {panic}")),
        };
        let total_len = view.text.len() as u64;
        let piece_max = self.max_frame() - OP_FRAME_OVERHEAD;
        let mut rest = view.text.as_str();
        loop {
            let mut end = rest.len().min(piece_max);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            let (piece, tail) = rest.split_at(end);
            let frame = self.reply(
                rid,
                Message::Snapshot {
                    doc: doc.to_owned(),
                    version: view.version,
                    total_len,
                    text: piece.to_owned(),
                },
            );
            if !self.outbox.send_wait(frame).await {
                return Sent::Closing;
            }
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        self.send_ops_frame(rid, doc, false, Vec::new()).await
    }
}
