//! A session's outgoing frames, bounded in bytes, and the task that writes them.
//!
//! Frames are encoded once (a broadcast is encoded once for all its subscribers) and
//! queued as `Bytes`. The queue is bounded by bytes, not messages, in two halves: a
//! permit of a semaphore per queued byte, returned by the writer once the bytes are in
//! the socket. Pushed frames (broadcasts, acks, presence) have one half: one that does
//! not fit means the client is not reading, and the session is closed with `Error` code
//! 8 (it catches up when it reconnects). Replies to the session's own requests (snapshot
//! pieces, catch-ups, fetches) have the other half and wait for room, so a large
//! document is sent at the pace the client reads it, and never crowds out the pushes
//! of a client that reads.
//!
//! Writes have a deadline: a peer that takes nothing for `write_timeout` cannot hold the
//! writer (and so its socket, its slot, and server shutdown) beyond it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use crate::protocol::frame::FrameCodec;
use crate::protocol::message::{Envelope, ErrorCode, Message};

pub use super::document::SessionId;

/// Why a session is being closed by the server, sent to the client as its last frame.
#[derive(Debug, Clone)]
pub struct Closing {
    pub code: ErrorCode,
    pub message: String,
}

/// Encodes one frame (length prefix included). Every caller builds messages that fit
/// `max_frame` by construction; this asserts it.
pub fn encode(env: &Envelope, max_frame: usize) -> Bytes {
    let mut buf = BytesMut::new();
    FrameCodec::new(max_frame)
        .encode(env, &mut buf)
        .unwrap_or_else(|e| {
            panic!(
                "a {:#04x} frame does not fit max_frame {max_frame}: {e}",
                env.message.type_byte()
            )
        });
    buf.freeze()
}

/// The sending side of a session's queue (cheap to clone: documents hold one per
/// subscriber).
#[derive(Clone)]
pub struct Outbox {
    pub session: SessionId,
    pub client_id: u64,
    tx: mpsc::UnboundedSender<(Bytes, Budget)>,
    /// One permit per byte that may still be queued: pushes, and replies.
    room: Arc<Semaphore>,
    reply_room: Arc<Semaphore>,
    capacity: usize,
    /// Cancelled when the session must close; `closing` says why.
    close: CancellationToken,
    closing: Arc<std::sync::Mutex<Option<Closing>>>,
    /// Submits of this session not answered yet.
    in_flight: Arc<AtomicUsize>,
}

/// The receiving side, owned by the writer task.
pub struct Writer {
    rx: mpsc::UnboundedReceiver<(Bytes, Budget)>,
    room: Arc<Semaphore>,
    reply_room: Arc<Semaphore>,
    close: CancellationToken,
    closing: Arc<std::sync::Mutex<Option<Closing>>>,
    max_frame: usize,
}

/// Which half of the queue a frame's bytes count against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    Push,
    Reply,
}

/// A queue of at most `capacity` bytes for one session: half for pushes, half for
/// replies, each holding at least one frame.
pub fn outbox(
    session: SessionId,
    client_id: u64,
    capacity: usize,
    max_frame: usize,
) -> (Outbox, Writer) {
    assert!(
        capacity / 2 >= max_frame + 4,
        "each half of an outbox must hold at least one frame"
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(capacity / 2));
    let reply_room = Arc::new(Semaphore::new(capacity - capacity / 2));
    let close = CancellationToken::new();
    let closing = Arc::new(std::sync::Mutex::new(None));
    (
        Outbox {
            session,
            client_id,
            tx,
            room: room.clone(),
            reply_room: reply_room.clone(),
            capacity,
            close: close.clone(),
            closing: closing.clone(),
            in_flight: Arc::default(),
        },
        Writer {
            rx,
            room,
            reply_room,
            close,
            closing,
            max_frame,
        },
    )
}

fn permits(len: usize) -> u32 {
    u32::try_from(len).expect("a frame is far below 4 GiB")
}

impl Outbox {
    /// The same queue, sending as another client id (set once the handshake is done).
    pub fn with_client(&self, client_id: u64) -> Outbox {
        Outbox {
            client_id,
            ..self.clone()
        }
    }

    /// Queues a frame without waiting. If it does not fit, the client is not reading
    /// what it is sent: the session is closed with code 8. Returns whether it was queued.
    pub fn send(&self, frame: Bytes) -> bool {
        match self.room.try_acquire_many(permits(frame.len())) {
            Ok(permit) => {
                permit.forget();
                self.tx.send((frame, Budget::Push)).is_ok()
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.close_with(
                    ErrorCode::TooSlow,
                    format!(
                        "too slow: more than {} bytes of updates queued for this connection \
                         were not read",
                        self.capacity / 2
                    ),
                );
                false
            }
            Err(tokio::sync::TryAcquireError::Closed) => false,
        }
    }

    /// Queues a frame, waiting for room (a reply to this session's own request, sent
    /// at the pace the client reads). Returns false if the session is closing.
    pub async fn send_wait(&self, frame: Bytes) -> bool {
        let acquired = tokio::select! {
            biased;
            permit = self.reply_room.acquire_many(permits(frame.len())) => permit,
            _ = self.close.cancelled() => return false,
        };
        match acquired {
            Ok(permit) => {
                permit.forget();
                self.tx.send((frame, Budget::Reply)).is_ok()
            }
            Err(_) => false,
        }
    }

    /// Closes the session: the writer drops what is queued, sends `Error(code)` as the
    /// last frame and shuts the socket. The first reason given wins.
    pub fn close_with(&self, code: ErrorCode, message: impl Into<String>) {
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        if closing.is_none() {
            *closing = Some(Closing {
                code,
                message: message.into(),
            });
        }
        drop(closing);
        self.close.cancel();
    }

    /// Resolves when the session must close.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    pub fn is_closing(&self) -> bool {
        self.close.is_cancelled()
    }

    /// Why the session is closing, if it is.
    pub fn closing(&self) -> Option<Closing> {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a submit as in flight, unless `limit` are already.
    pub fn begin_op(&self, limit: usize) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A submit counted by [`Outbox::begin_op`] is answered.
    pub fn end_op(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "more submits answered than begun");
    }

    /// The most bytes of pushed frames (broadcasts, acks) this queue holds.
    pub fn push_capacity(&self) -> usize {
        self.capacity / 2
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.capacity - self.room.available_permits() - self.reply_room.available_permits()
    }
}

impl Writer {
    /// Takes the oldest queued frame without waiting (an in-process consumer in place
    /// of a socket, as the model tests use).
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let (frame, budget) = self.rx.try_recv().ok()?;
        self.release(frame.len(), budget);
        Some(frame)
    }

    fn release(&self, len: usize, budget: Budget) {
        match budget {
            Budget::Push => self.room.add_permits(len),
            Budget::Reply => self.reply_room.add_permits(len),
        }
    }

    /// Writes queued frames until every sender is gone or the session is closed. Each
    /// write must complete within `write_timeout`.
    pub async fn run<W: tokio::io::AsyncWrite + Unpin>(self, socket: W, write_timeout: Duration) {
        let (close, room, reply_room) = (
            self.close.clone(),
            self.room.clone(),
            self.reply_room.clone(),
        );
        self.write(socket, write_timeout).await;
        // However the writer ended, nothing more can be queued, and a session waiting
        // for room (or reading) learns that the connection is gone.
        room.close();
        reply_room.close();
        close.cancel();
    }

    async fn write<W: tokio::io::AsyncWrite + Unpin>(
        mut self,
        mut socket: W,
        write_timeout: Duration,
    ) {
        let mut batch: Vec<(Bytes, Budget)> = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                _ = self.close.cancelled() => break,
                frame = self.rx.recv() => match frame {
                    Some(frame) => frame,
                    None => {
                        let _ = tokio::time::timeout(write_timeout, socket.shutdown()).await;
                        return;
                    }
                },
            };
            // Coalesce what else is queued into one write (bounded: 256 KiB or one frame).
            let mut len = first.0.len();
            batch.push(first);
            while len < 256 * 1024 {
                match self.rx.try_recv() {
                    Ok(frame) => {
                        len += frame.0.len();
                        batch.push(frame);
                    }
                    Err(_) => break,
                }
            }
            // Not interrupted by a close: a frame half written would garble the stream,
            // and the write is bounded by its deadline anyway.
            match write_batch(&mut socket, &batch, write_timeout).await {
                Ok(()) => {
                    for (frame, budget) in batch.drain(..) {
                        self.release(frame.len(), budget);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    tracing::info!(
                        "closing a connection whose peer took nothing for {write_timeout:?}"
                    );
                    return;
                }
                Err(_) => return,
            }
        }
        // Closed by the server: what is queued is dropped (the client catches up when it
        // reconnects); the reason goes out last, if the socket takes it in time.
        self.rx.close();
        self.room.close();
        self.reply_room.close();
        let closing = self
            .closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(Closing { code, message }) = closing {
            let frame = encode(
                &Envelope {
                    request_id: 0,
                    message: Message::Error { code, message },
                },
                self.max_frame,
            );
            let last = async {
                socket.write_all(&frame).await?;
                socket.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), last).await;
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.shutdown()).await;
        }
    }
}

/// Writes the batch; fails with `TimedOut` if the socket takes nothing for `timeout`
/// (a slow reader that makes progress is not cut off).
async fn write_batch<W: tokio::io::AsyncWrite + Unpin>(
    socket: &mut W,
    batch: &[(Bytes, Budget)],
    timeout: Duration,
) -> std::io::Result<()> {
    let joined;
    let bytes: &[u8] = if let [(one, _)] = batch {
        one
    } else {
        let mut buf = BytesMut::with_capacity(batch.iter().map(|(f, _)| f.len()).sum());
        for (frame, _) in batch {
            buf.extend_from_slice(frame);
        }
        joined = buf;
        &joined
    };
    let mut at = 0;
    while at < bytes.len() {
        match tokio::time::timeout(timeout, socket.write(&bytes[at..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => at += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}
