//! The simulator's protocol-level clients: a document kept in sync over one
//! connection with the real client state machine (`ClientDoc`), driven step by step.
//!
//! Unlike the library's `Client` (driven in `app.rs`), these do what a correct client
//! never does, on purpose: a "lazy" one forgets its op counter on a restart and reuses
//! op ids, which the server must refuse; some pipeline several ops. They reach the
//! server's paths for such clients, which no well-behaved client would.

use std::collections::VecDeque;

use quire::client::connection::{ClientError, Connection, Stream};
use quire::client::state::ClientDoc;
use quire::op::Patch;
use quire::protocol::message::{Envelope, Message, Selection};

/// What the server told a [`RawDoc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Another client's op, as applied to the local text: the patches are in the
    /// coordinates of the local text just before (already rebased over this client's
    /// unacknowledged edits).
    Remote {
        seq: u64,
        client_id: u64,
        patches: Vec<Patch>,
    },
    /// One of this client's ops is durable on the server as `seq`.
    Acked { local_seq: u64, seq: u64 },
    /// Another client's cursors and selections on this document (none: it left).
    Presence {
        client_id: u64,
        selections: Vec<Selection>,
    },
}

/// A document kept in sync with the server over one connection: local edits apply at
/// once and are sent with at most one op in flight (later edits are composed); remote
/// ops are rebased over the pending ones. What others did is queued as [`Event`]s.
pub struct RawDoc<T: Stream> {
    pub conn: Connection<T>,
    pub name: String,
    pub doc: ClientDoc,
    /// Ops sent (one per round trip, composed).
    pub ops_sent: u64,
    events: VecDeque<Event>,
}

impl<T: Stream> RawDoc<T> {
    /// Opens `name` from scratch (snapshot, then the ops after it).
    pub async fn open(
        mut conn: Connection<T>,
        name: &str,
        next_local_seq: u64,
    ) -> Result<Self, ClientError> {
        conn.send(Message::Open {
            doc: name.into(),
            known_version: 0,
        })
        .await?;
        // Broadcasts can overtake the snapshot (the server subscribes this connection
        // before it reads the snapshot): keep them, and apply those newer than it.
        let mut early = Vec::new();
        let mut snapshot: Option<(String, u64, u64)> = None;
        let (text, version) = loop {
            let env = conn.recv().await?;
            match env.message {
                // A snapshot comes in pieces, in order, until `total_len` bytes.
                Message::Snapshot {
                    version,
                    total_len,
                    text,
                    ..
                } => {
                    let (so_far, _, _) =
                        snapshot.get_or_insert_with(|| (String::new(), version, total_len));
                    so_far.push_str(&text);
                    if so_far.len() as u64 >= total_len {
                        let (text, version, total_len) = snapshot.take().expect("set above");
                        if text.len() as u64 != total_len {
                            return Err(ClientError::Protocol(format!(
                                "snapshot of {} bytes where {total_len} were announced",
                                text.len()
                            )));
                        }
                        break (text, version);
                    }
                }
                Message::Error { code, message } => {
                    return Err(ClientError::Refused(format!("{code:?}: {message}")))
                }
                Message::Remote { .. } => early.push(env),
                _ => {}
            }
        };
        let max_op_bytes = quire::protocol::max_op_bytes(conn.max_frame);
        let mut synced = RawDoc {
            conn,
            name: name.into(),
            doc: ClientDoc::new(text, version, next_local_seq).with_max_op_bytes(max_op_bytes),
            ops_sent: 0,
            events: VecDeque::new(),
        };
        for env in early {
            synced.apply(env)?;
        }
        // The Ops that follow the snapshot.
        loop {
            let env = synced.conn.recv().await?;
            let last = matches!(env.message, Message::Ops { more: false, .. });
            synced.apply(env)?;
            if last {
                break;
            }
        }
        Ok(synced)
    }

    /// Reopens after a reconnect at the version this client has, resending its pending
    /// op with the same op id (the server recognises a duplicate).
    pub async fn resume(&mut self, mut conn: Connection<T>) -> Result<(), ClientError> {
        conn.send(Message::Open {
            doc: self.name.clone(),
            known_version: self.doc.version(),
        })
        .await?;
        self.doc
            .set_max_op_bytes(quire::protocol::max_op_bytes(conn.max_frame));
        self.conn = conn;
        loop {
            let env = self.conn.recv().await?;
            if let Message::Snapshot { .. } = env.message {
                return Err(ClientError::MustReload);
            }
            let last = matches!(env.message, Message::Ops { more: false, .. });
            self.apply(env)?;
            if last {
                break;
            }
        }
        let resend: Vec<_> = self.doc.all_in_flight().cloned().collect();
        for out in resend {
            self.conn.queue(out.into_submit(&self.name))?;
        }
        self.flush_ops().await
    }

    /// Every event not yet taken, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn event(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// Sends this client's cursors and selections (code-point offsets in the local
    /// text) to the document's other subscribers. Ephemeral: never stored.
    pub async fn set_presence(&mut self, selections: Vec<Selection>) -> Result<(), ClientError> {
        self.conn
            .send(Message::Presence {
                doc: self.name.clone(),
                selections,
            })
            .await
            .map(|_| ())
    }

    /// Applies a local edit and sends it if nothing is in flight.
    pub async fn edit(&mut self, patches: &[Patch]) -> Result<(), ClientError> {
        self.doc
            .local_edit(patches)
            .map_err(|e| ClientError::Protocol(format!("{e:?}")))?;
        self.flush_ops().await
    }

    async fn flush_ops(&mut self) -> Result<(), ClientError> {
        while let Some(out) = self.doc.take_to_send() {
            self.ops_sent += 1;
            self.conn.queue(out.into_submit(&self.name))?;
        }
        self.conn.flush().await
    }

    fn sequenced(
        &mut self,
        seq: u64,
        client_id: u64,
        local_seq: u64,
        patches: &[Patch],
    ) -> Result<(), ClientError> {
        let mine = client_id == self.conn.client_id
            && self
                .doc
                .in_flight()
                .is_some_and(|o| o.local_seq == local_seq);
        let err = |e| ClientError::Protocol(format!("{e:?}"));
        if mine {
            self.doc.on_ack(local_seq, seq).map_err(err)?;
            self.event(Event::Acked { local_seq, seq });
        } else {
            let applied = self.doc.on_remote(seq, patches).map_err(err)?;
            if !applied.is_empty() {
                self.event(Event::Remote {
                    seq,
                    client_id,
                    patches: applied,
                });
            }
        }
        Ok(())
    }

    /// Applies one message from the server.
    pub fn apply(&mut self, env: Envelope) -> Result<(), ClientError> {
        match env.message {
            // An ack for an op no longer in flight is a duplicate's (after a resend).
            Message::Ack { local_seq, seq, .. }
                if self
                    .doc
                    .in_flight()
                    .is_some_and(|o| o.local_seq == local_seq) =>
            {
                self.doc
                    .on_ack(local_seq, seq)
                    .map_err(|e| ClientError::Protocol(format!("{e:?}")))?;
                self.event(Event::Acked { local_seq, seq });
            }
            Message::PresenceState {
                client_id,
                selections,
                ..
            } if client_id != self.conn.client_id => {
                self.event(Event::Presence {
                    client_id,
                    selections,
                });
            }
            Message::Remote { op, .. } => {
                self.sequenced(op.seq, op.client_id, op.local_seq, &op.patches)?
            }
            Message::Ops { ops, .. } => {
                for op in ops {
                    self.sequenced(op.seq, op.client_id, op.local_seq, &op.patches)?;
                }
            }
            Message::Reject { code, message, .. } => {
                return Err(ClientError::Refused(format!(
                    "op rejected ({code:?}): {message}"
                )))
            }
            Message::Error { code, message } => {
                return Err(ClientError::Refused(format!("{code:?}: {message}")))
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies whatever the server already sent, without waiting, then sends what became
    /// sendable.
    pub async fn poll(&mut self) -> Result<(), ClientError> {
        while let Some(env) = self.conn.try_recv()? {
            self.apply(env)?;
        }
        self.flush_ops().await
    }
}
