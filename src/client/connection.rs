//! A client connection (over TCP, or any byte stream: the simulator's in-memory
//! network), and a document kept in sync over it.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use super::state::ClientDoc;
use crate::op::Patch;
use crate::protocol::frame::FrameCodec;
use crate::protocol::message::{Envelope, Message, Selection};
use crate::protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

#[derive(Debug)]
pub enum ClientError {
    Io(std::io::Error),
    /// The server sent something this client cannot use.
    Protocol(String),
    /// The server refused (Error or Reject).
    Refused(String),
    /// The server refused the handshake (`Error` instead of `Welcome`), with its code.
    Handshake {
        code: crate::protocol::message::ErrorCode,
        message: String,
    },
    /// The server no longer holds the ops this client missed (the log was truncated
    /// past its version): open the document again from its snapshot.
    MustReload,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Protocol(m) | ClientError::Refused(m) => f.write_str(m),
            ClientError::Handshake { code, message } => write!(f, "{code:?}: {message}"),
            ClientError::MustReload => f.write_str(
                "the server no longer has the ops this client missed; open the document again",
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// A byte stream a client talks to the server over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Connection<T: Stream = TcpStream> {
    stream: T,
    codec: FrameCodec,
    read_buf: BytesMut,
    write_buf: BytesMut,
    next_request: u32,
    pub client_id: u64,
    /// The server's frame limit (from its `Welcome`).
    pub max_frame: usize,
}

impl Connection<TcpStream> {
    /// Connects and completes the handshake.
    pub async fn connect(
        addr: SocketAddr,
        client_id: u64,
        token: &str,
    ) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::handshake(stream, client_id, token).await
    }
}

impl<T: Stream> Connection<T> {
    /// Completes the handshake on a connected stream.
    pub async fn handshake(stream: T, client_id: u64, token: &str) -> Result<Self, ClientError> {
        let mut conn = Connection {
            stream,
            codec: FrameCodec::new(DEFAULT_MAX_FRAME),
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::new(),
            next_request: 1,
            client_id,
            max_frame: DEFAULT_MAX_FRAME,
        };
        conn.send(Message::Hello {
            version: PROTOCOL_VERSION,
            client_id,
            token: token.into(),
        })
        .await?;
        match conn.recv().await?.message {
            Message::Welcome {
                max_frame,
                client_id,
                ..
            } => {
                // The server builds every frame to fit its own limit.
                conn.codec = FrameCodec::new(max_frame as usize);
                conn.max_frame = max_frame as usize;
                // The id the server gave, if this client asked for one.
                conn.client_id = client_id;
                Ok(conn)
            }
            Message::Error { code, message } => Err(ClientError::Handshake { code, message }),
            other => Err(ClientError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }

    /// Queues a message (sent on the next `flush`); returns its request id.
    pub fn queue(&mut self, message: Message) -> Result<u32, ClientError> {
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        self.codec
            .encode(
                &Envelope {
                    request_id,
                    message,
                },
                &mut self.write_buf,
            )
            .map_err(|e| ClientError::Protocol(format!("cannot send a message: {e}")))?;
        Ok(request_id)
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.write_buf.is_empty() {
            self.stream.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        Ok(())
    }

    pub async fn send(&mut self, message: Message) -> Result<u32, ClientError> {
        let id = self.queue(message)?;
        self.flush().await?;
        Ok(id)
    }

    /// Sends raw bytes (tests of bad input use it).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// A message already received, without waiting (no timer: a zero timeout would
    /// wait for the timer wheel's next millisecond tick).
    pub fn try_recv(&mut self) -> Result<Option<Envelope>, ClientError> {
        loop {
            if let Some(env) = self
                .codec
                .decode(&mut self.read_buf)
                .map_err(|e| ClientError::Protocol(format!("from the server: {e}")))?
            {
                return Ok(Some(env));
            }
            // One poll that registers no interest: what has arrived, or nothing.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let read = tokio_util::io::poll_read_buf(
                std::pin::Pin::new(&mut self.stream),
                &mut cx,
                &mut self.read_buf,
            );
            match read {
                std::task::Poll::Ready(Ok(0)) => {
                    return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                }
                std::task::Poll::Ready(Ok(_)) => {}
                std::task::Poll::Ready(Err(e)) => return Err(e.into()),
                std::task::Poll::Pending => return Ok(None),
            }
        }
    }

    pub async fn recv(&mut self) -> Result<Envelope, ClientError> {
        loop {
            if let Some(env) = self
                .codec
                .decode(&mut self.read_buf)
                .map_err(|e| ClientError::Protocol(format!("from the server: {e}")))?
            {
                return Ok(env);
            }
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

impl super::state::Outgoing {
    /// The `Submit` message carrying this op.
    pub fn into_submit(self, doc: &str) -> Message {
        Message::Submit {
            doc: doc.to_owned(),
            local_seq: self.local_seq,
            base_version: self.base_version,
            patches: self.patches,
        }
    }
}

/// What happened to a [`SyncedDoc`] that the application did not do itself: an editor
/// applies `Remote` patches to its buffer and draws `Presence`.
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
pub struct SyncedDoc<T: Stream = TcpStream> {
    pub conn: Connection<T>,
    pub name: String,
    pub doc: ClientDoc,
    /// Ops sent (one per round trip, composed).
    pub ops_sent: u64,
    events: VecDeque<Event>,
    record_events: bool,
}

impl<T: Stream> SyncedDoc<T> {
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
        let max_op_bytes = crate::protocol::max_op_bytes(conn.max_frame);
        let mut synced = SyncedDoc {
            conn,
            name: name.into(),
            doc: ClientDoc::new(text, version, next_local_seq).with_max_op_bytes(max_op_bytes),
            ops_sent: 0,
            events: VecDeque::new(),
            record_events: true,
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
            .set_max_op_bytes(crate::protocol::max_op_bytes(conn.max_frame));
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

    /// Stops queueing [`Event`]s (a load generator that never reads them).
    pub fn ignore_events(mut self) -> Self {
        self.record_events = false;
        self.events.clear();
        self
    }

    /// The oldest event not yet taken.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Every event not yet taken, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn event(&mut self, event: Event) {
        if self.record_events {
            self.events.push_back(event);
        }
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

    /// Receives and applies one message, then sends what became sendable.
    pub async fn pump(&mut self) -> Result<(), ClientError> {
        let env = self.conn.recv().await?;
        self.apply(env)?;
        self.flush_ops().await
    }

    /// Applies whatever the server already sent, without waiting, then sends what became
    /// sendable.
    pub async fn poll(&mut self) -> Result<(), ClientError> {
        while let Some(env) = self.conn.try_recv()? {
            self.apply(env)?;
        }
        self.flush_ops().await
    }

    /// Waits until every local edit is acknowledged.
    pub async fn settle(&mut self) -> Result<(), ClientError> {
        self.flush_ops().await?;
        while self.doc.has_pending() {
            self.pump().await?;
        }
        Ok(())
    }
}
