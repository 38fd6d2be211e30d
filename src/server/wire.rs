//! What the document core's messages and refusals become on the wire: the session side
//! of [`super::document`]. A session's [`Outbox`] is a document [`Subscriber`]: its
//! messages are frames (`Bytes`, built once per message and cloned to every
//! subscriber), and each [`RefusalKind`] has one wire code.

use bytes::Bytes;

use super::document::{CloseReason, Event, RefusalKind, SessionId, Subscriber};
use super::outbox::{encode, encode_with, Outbox};
use crate::protocol::message::{encode_ack_into, Envelope, ErrorCode, Message, Selection, WireOp};

/// The wire code of a refused op (`protocol.md`, "Error and reject codes").
/// The type byte of `PresenceState` (protocol.md).
const PRESENCE_STATE: u8 = 0x25;

pub fn refusal_code(kind: RefusalKind) -> ErrorCode {
    match kind {
        RefusalKind::TooLarge => ErrorCode::TooLarge,
        RefusalKind::OutOfRange => ErrorCode::OutOfRange,
        RefusalKind::InvalidDocId => ErrorCode::InvalidDocId,
        RefusalKind::PipelineConflict => ErrorCode::PipelineConflict,
        RefusalKind::TooOld => ErrorCode::TooOld,
        RefusalKind::FutureVersion => ErrorCode::FutureVersion,
        RefusalKind::OpIdReused => ErrorCode::OpIdReused,
        RefusalKind::StorageFailed => ErrorCode::StorageFailed,
        RefusalKind::Deleted => ErrorCode::DocumentDeleted,
        RefusalKind::Unavailable => ErrorCode::Unavailable,
        // A broken invariant: the client is told its op is malformed, as a version
        // mismatch always was.
        RefusalKind::Internal => ErrorCode::Malformed,
        // Like a storage failure: the op may be resent.
        RefusalKind::Crashed => ErrorCode::StorageFailed,
    }
}

/// What a session that had `doc` open is told when it is deleted (`Error` 32). Bounded
/// by construction (a document id is at most 100 bytes; its debug form at most 600).
fn deleted_message(doc: &str, version: u64) -> String {
    format!(
        "document {doc:?} was deleted at version {version}; ops sent to it since are \
         refused (code 32). Opening it again starts it anew: empty, at version 0"
    )
}

impl Subscriber for Outbox {
    type Frame = Bytes;
    type Presence = Vec<Selection>;

    fn session(&self) -> SessionId {
        self.session
    }

    fn client_id(&self) -> u64 {
        self.client_id
    }

    fn frame(doc: &str, event: Event<Vec<Selection>>, max_frame: usize) -> Bytes {
        let (request_id, message) = match event {
            // One per op: written from the borrowed document id.
            Event::Ack {
                request_id,
                local_seq,
                seq,
            } => {
                return encode_with(max_frame, 0x22, |buf| {
                    encode_ack_into(buf, request_id, doc, local_seq, seq)
                })
            }
            Event::Op(op) => (
                0,
                Message::Remote {
                    doc: doc.to_owned(),
                    op: WireOp {
                        seq: op.seq,
                        client_id: op.id.client_id,
                        local_seq: op.id.local_seq,
                        patches: op.patches,
                    },
                },
            ),
            Event::Presence {
                client_id,
                presence,
            } => (
                0,
                Message::PresenceState {
                    doc: doc.to_owned(),
                    client_id,
                    selections: presence,
                },
            ),
            Event::Moved(owner) => (
                0,
                Message::Redirect {
                    doc: doc.to_owned(),
                    addr: owner.addr.to_string(),
                    ws_url: owner.ws_url.to_string(),
                },
            ),
            Event::Deleted { version } => (
                0,
                Message::Error {
                    code: ErrorCode::DocumentDeleted,
                    message: deleted_message(doc, version),
                },
            ),
        };
        encode(
            &Envelope {
                request_id,
                message,
            },
            max_frame,
        )
    }

    fn frame_len(frame: &Bytes) -> usize {
        frame.len()
    }

    fn push_capacity(&self) -> usize {
        Outbox::push_capacity(self)
    }

    fn send(&self, frame: Bytes) -> bool {
        // The type byte follows the length field: presence sent is counted per
        // recipient.
        if frame.get(4) == Some(&PRESENCE_STATE) {
            self.metrics().presence_out();
        }
        Outbox::send(self, frame)
    }

    fn close(&self, reason: CloseReason) {
        match reason {
            CloseReason::HeldPiledUp => self.close_with(
                ErrorCode::TooSlow,
                "too slow: the document's updates piled up while its snapshot was sent",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_wire_code() {
        let codes = [
            (RefusalKind::TooLarge, 24),
            (RefusalKind::OutOfRange, 21),
            (RefusalKind::InvalidDocId, 23),
            (RefusalKind::PipelineConflict, 25),
            (RefusalKind::TooOld, 27),
            (RefusalKind::FutureVersion, 22),
            (RefusalKind::OpIdReused, 26),
            (RefusalKind::StorageFailed, 30),
            (RefusalKind::Internal, 1),
            (RefusalKind::Crashed, 30),
            (RefusalKind::Deleted, 32),
            (RefusalKind::Unavailable, 33),
        ];
        for (kind, code) in codes {
            assert_eq!(refusal_code(kind).to_u16(), code, "{kind:?}");
        }
    }

    #[test]
    fn an_ack_frame_is_the_encoded_ack_message() {
        let frame = <Outbox as Subscriber>::frame(
            "doc-1",
            Event::Ack {
                request_id: 11,
                local_seq: 4,
                seq: 70,
            },
            1 << 10,
        );
        let expected = encode(
            &Envelope {
                request_id: 11,
                message: Message::Ack {
                    doc: "doc-1".into(),
                    local_seq: 4,
                    seq: 70,
                },
            },
            1 << 10,
        );
        assert_eq!(frame, expected);
    }

    #[test]
    fn a_subscriber_that_overflows_while_held_is_closed_as_too_slow() {
        let (outbox, _writer) = super::super::outbox::outbox(1, 7, 1 << 16, 1 << 10);
        outbox.close(CloseReason::HeldPiledUp);
        let closing = outbox.closing().expect("closed");
        assert_eq!(closing.code.to_u16(), 8);
    }
}
