//! One document on the client, as an OT state machine with no I/O (the Jupiter /
//! ShareDB client model): local edits apply at once; one op is in flight to
//! the server (or, [`ClientDoc::pipelined`], several sent without waiting); edits made meanwhile are composed into one buffered op; a remote op is
//! rebased over the in-flight and buffered ops before it is applied locally, and they
//! over it. The server sequences the in-flight op after every remote op the client
//! received before its ack, so both sides transform the same pairs with the same
//! tie-break (see `ot`: the later-sequenced op's insert goes left).

use std::collections::VecDeque;

use crate::op::Patch;
use crate::ot::{Side, TextOp};
use crate::protocol::{max_op_bytes, patches_wire_len, DEFAULT_MAX_FRAME};
use crate::text::Text;

/// An op to send: its local sequence number (with the client id, its op id), the
/// server version it was made against, and its patches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub local_seq: u64,
    pub base_version: u64,
    pub patches: Vec<Patch>,
}

#[derive(Clone, Debug)]
pub struct ClientDoc {
    /// A rope: local edits and remote ops cost O(log n), not a copy of the document.
    text: Text,
    /// The last server seq this client has applied.
    version: u64,
    /// Sent, not yet acknowledged, oldest first (at most `max_in_flight`).
    in_flight: VecDeque<(Outgoing, TextOp)>,
    max_in_flight: usize,
    /// Local edits not yet sent: one composed op, or (without composing) one op per edit.
    buffer: VecDeque<TextOp>,
    next_local_seq: u64,
    compose: bool,
    /// The largest op the server takes (its `max_frame` less the frame's overhead).
    max_op_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// A local edit does not apply to the local text.
    OutOfRange,
    /// A local edit larger than the server takes in one op: split it.
    TooLarge { bytes: usize, max: usize },
    /// An ack for something not in flight, or a remote op out of order.
    Protocol(String),
}

impl ClientDoc {
    /// A document as the server sent it: `text` at `version`. `next_local_seq` continues
    /// the client's op numbering (it must never reuse an op id).
    pub fn new(text: String, version: u64, next_local_seq: u64) -> Self {
        ClientDoc {
            text: Text::from(text.as_str()),
            version,
            in_flight: VecDeque::new(),
            max_in_flight: 1,
            buffer: VecDeque::new(),
            next_local_seq: next_local_seq.max(1),
            compose: true,
            max_op_bytes: max_op_bytes(DEFAULT_MAX_FRAME),
        }
    }

    /// Ops are kept below `max_op_bytes` bytes of patches (what the server's `Welcome`
    /// allows: [`crate::protocol::max_op_bytes`] of its `max_frame`).
    pub fn with_max_op_bytes(mut self, max: usize) -> Self {
        self.max_op_bytes = max;
        self
    }

    /// As [`ClientDoc::with_max_op_bytes`], on a reconnect (edits already buffered stay
    /// as they are).
    pub fn set_max_op_bytes(&mut self, max: usize) {
        self.max_op_bytes = max;
    }

    /// Keeps every local edit as its own op instead of composing the edits made while
    /// an op is in flight (a trace replay needs each edit to reach the server alone).
    pub fn without_composing(mut self) -> Self {
        self.compose = false;
        self
    }

    /// Sends up to `n` ops without waiting for acks (see "Pipelining" in protocol.md:
    /// exact while nobody else edits the document meanwhile; a conflict is refused by
    /// the server with code 25 and the document must be reloaded).
    pub fn pipelined(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The local text (materialized: O(n)).
    pub fn text(&self) -> String {
        self.text.to_string()
    }

    pub fn len_chars(&self) -> u32 {
        self.text.len_chars()
    }

    /// The local sequence number the next op will get (persist it to keep op ids unique
    /// across restarts of the client).
    pub fn next_local_seq(&self) -> u64 {
        self.next_local_seq
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The oldest op in flight (the next to be acknowledged).
    pub fn in_flight(&self) -> Option<&Outgoing> {
        self.in_flight.front().map(|(o, _)| o)
    }

    /// Every op in flight, oldest first.
    pub fn all_in_flight(&self) -> impl Iterator<Item = &Outgoing> {
        self.in_flight.iter().map(|(o, _)| o)
    }

    pub fn has_pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.buffer.is_empty()
    }

    /// Applies a local edit at once and queues it for the server.
    ///
    /// Edits made while an op is in flight are composed into one, up to half the op
    /// limit (a composed op that outgrew it could never be sent, and transforming it
    /// over remote ops may add patches); past that a new op starts.
    pub fn local_edit(&mut self, patches: &[Patch]) -> Result<(), ClientError> {
        let bytes = patches_wire_len(patches);
        if bytes > self.max_op_bytes {
            return Err(ClientError::TooLarge {
                bytes,
                max: self.max_op_bytes,
            });
        }
        self.text
            .apply(patches)
            .map_err(|_| ClientError::OutOfRange)?;
        let op = TextOp::from_patches(patches);
        if op.is_noop() {
            return Ok(());
        }
        match self.buffer.back_mut() {
            Some(buffered) if self.compose => {
                let composed = buffered.compose(&op);
                if patches_wire_len(&composed.to_patches()) <= self.max_op_bytes / 2 {
                    *buffered = composed;
                } else {
                    self.buffer.push_back(op);
                }
            }
            _ => self.buffer.push_back(op),
        }
        Ok(())
    }

    /// The next op to send, if fewer than the allowed number are in flight.
    pub fn take_to_send(&mut self) -> Option<Outgoing> {
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let op = self.buffer.pop_front()?;
        let outgoing = Outgoing {
            local_seq: self.next_local_seq,
            base_version: self.version,
            patches: op.to_patches(),
        };
        self.next_local_seq += 1;
        self.in_flight.push_back((outgoing.clone(), op));
        Some(outgoing)
    }

    /// The server acknowledged the oldest in-flight op, `local_seq`, as `seq`.
    pub fn on_ack(&mut self, local_seq: u64, seq: u64) -> Result<(), ClientError> {
        match self.in_flight.front() {
            Some((out, _)) if out.local_seq == local_seq => {}
            _ => {
                return Err(ClientError::Protocol(format!(
                    "ack for op {local_seq}, which is not in flight"
                )))
            }
        }
        if seq != self.version + 1 {
            return Err(ClientError::Protocol(format!(
                "ack at seq {seq} but the client is at version {}",
                self.version
            )));
        }
        self.in_flight.pop_front();
        self.version = seq;
        Ok(())
    }

    /// A remote op sequenced as `seq`. Returns the patches applied to the local text.
    pub fn on_remote(&mut self, seq: u64, patches: &[Patch]) -> Result<Vec<Patch>, ClientError> {
        if seq <= self.version {
            // Already in the snapshot this client opened with (a broadcast can overlap it).
            return Ok(Vec::new());
        }
        if seq != self.version + 1 {
            return Err(ClientError::Protocol(format!(
                "remote op at seq {seq} but the client is at version {}",
                self.version
            )));
        }
        let mut remote = TextOp::from_patches(patches);
        let pending = self
            .in_flight
            .iter_mut()
            .map(|(_, op)| op)
            .chain(self.buffer.iter_mut());
        for buffered in pending {
            let rebased = remote.transform(buffered, Side::Right);
            *buffered = buffered.transform(&remote, Side::Left);
            remote = rebased;
        }
        let patches = remote.to_patches();
        self.text.apply(&patches).map_err(|e| {
            ClientError::Protocol(format!("remote op at seq {seq} does not apply: {e}"))
        })?;
        self.version = seq;
        Ok(patches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(pos: u32, text: &str) -> Patch {
        Patch {
            pos,
            del: 0,
            ins: text.into(),
        }
    }

    /// Found by the simulator (seed 79): edits made while an op was in flight were
    /// composed into one op larger than a frame, which could then never be sent.
    #[test]
    fn composed_ops_stay_under_the_op_limit() {
        let max = 200;
        let mut doc = ClientDoc::new(String::new(), 0, 1).with_max_op_bytes(max);
        doc.local_edit(&[insert(0, "x")]).unwrap();
        let first = doc.take_to_send().expect("an op to send");
        assert_eq!(first.patches, vec![insert(0, "x")]);
        // In flight: the next edits are buffered, composed while they stay small.
        for i in 0..40 {
            doc.local_edit(&[insert(1 + i * 10, "0123456789")]).unwrap();
        }
        assert!(doc.buffer.len() > 1, "the buffer was split");
        doc.on_ack(first.local_seq, 1).unwrap();
        let mut sent = 0;
        while let Some(out) = doc.take_to_send() {
            assert!(
                crate::protocol::patches_wire_len(&out.patches) <= max,
                "an op of {} bytes, over {max}",
                crate::protocol::patches_wire_len(&out.patches)
            );
            sent += 1;
            doc.on_ack(out.local_seq, 1 + sent).unwrap();
        }
        assert_eq!(doc.text().chars().count(), 401);
    }

    #[test]
    fn an_edit_over_the_op_limit_is_refused_and_not_applied() {
        let mut doc = ClientDoc::new("abc".into(), 0, 1).with_max_op_bytes(100);
        let big = "y".repeat(100);
        assert_eq!(
            doc.local_edit(&[insert(0, &big)]),
            Err(ClientError::TooLarge {
                bytes: 4 + 12 + 100,
                max: 100
            })
        );
        assert_eq!(doc.text(), "abc");
        assert!(!doc.has_pending());
    }
}
