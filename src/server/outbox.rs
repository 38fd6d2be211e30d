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
//!
//! **Direct writes.** A frame sent while the writer has nothing queued or being written
//! is written by the sender at once, with one non-blocking write (an ack or broadcast
//! from the durability task, a reply from the session): no hand-off to the writer task
//! and no wake-up. Its room is taken first as for any frame, and what the socket took is
//! given back at once; only what it did not take (and every frame after it) goes
//! through the queue and the writer, with its deadline, counted against the same half.
//! Every frame passes through `Line`'s lock, which says who may write (the senders
//! while the writer has nothing, else the writer), so frames leave in the order they
//! were sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::stop::StopSignal;
use super::transport::WriteHalf;
use crate::protocol::message::{Envelope, ErrorCode, Message};

pub use super::document::SessionId;

/// Why a session is being closed by the server, sent to the client as its last frame.
#[derive(Debug, Clone)]
pub struct Closing {
    pub code: ErrorCode,
    pub message: String,
}

/// Encodes one frame (length prefix included), in one buffer: the same bytes as
/// [`crate::protocol::frame::FrameCodec`]'s encoder, without its separate body and copy. Every caller builds
/// messages that fit `max_frame` by construction; this asserts it.
pub fn encode(env: &Envelope, max_frame: usize) -> Bytes {
    encode_with(max_frame, env.message.type_byte(), |buf| {
        env.encode_into(buf)
    })
}

/// A frame whose content (type, request id, body) `content` writes after the length
/// field. Asserts that it fits `max_frame`. Encoded in the thread's scratch buffer:
/// `content` must not encode another frame itself (the buffer is borrowed meanwhile, and
/// a nested call panics).
pub fn encode_with(max_frame: usize, type_byte: u8, content: impl FnOnce(&mut BytesMut)) -> Bytes {
    ENCODE_SCRATCH.with_borrow_mut(|buf| {
        // Empty unless a `content` panicked midway.
        buf.clear();
        buf.put_u32_le(0);
        content(buf);
        let len = buf.len() - 4;
        assert!(
            len <= max_frame,
            "a {type_byte:#04x} frame of {len} bytes does not fit max_frame {max_frame}"
        );
        let len = u32::try_from(len).expect("max_frame is far below 4 GiB");
        buf[..4].copy_from_slice(&len.to_le_bytes());
        if buf.len() <= SMALL_ENCODED_FRAME {
            // One allocation of exactly the frame's length (`Bytes` of a full `Vec` needs
            // no shared header), where freezing a buffer with room to spare takes two.
            let frame = Bytes::copy_from_slice(&buf[..]);
            buf.clear();
            frame
        } else {
            // A large frame is not copied: it takes the buffer with it, and the thread
            // starts a small one again (keeping none of the large one's memory).
            std::mem::replace(buf, BytesMut::with_capacity(SMALL_ENCODED_FRAME)).freeze()
        }
    })
}

/// Frames up to this many bytes (acks, broadcasts of small ops, presence) are encoded
/// in a buffer each thread keeps, then copied out.
const SMALL_ENCODED_FRAME: usize = 1024;

thread_local! {
    static ENCODE_SCRATCH: std::cell::RefCell<BytesMut> =
        std::cell::RefCell::new(BytesMut::with_capacity(SMALL_ENCODED_FRAME));
}

/// The sending side of a session's queue (cheap to clone: documents hold one per
/// subscriber, and every op in flight holds one; a clone is one reference count).
#[derive(Clone)]
pub struct Outbox {
    pub session: SessionId,
    pub client_id: u64,
    inner: Arc<Inner>,
}

/// What every clone of a session's [`Outbox`] shares.
struct Inner {
    tx: mpsc::UnboundedSender<Queued>,
    line: Arc<std::sync::Mutex<Line>>,
    /// One permit per byte that may still be queued: pushes, and replies.
    room: Arc<Semaphore>,
    reply_room: Arc<Semaphore>,
    capacity: usize,
    /// Cancelled when the session must close; `closing` says why.
    close: CancellationToken,
    closing: Arc<std::sync::Mutex<Option<Closing>>>,
    /// Fired with `close`: the session's read loop waits on it (see `server/stop.rs`).
    stop: Arc<StopSignal>,
    /// Submits of this session not answered yet.
    in_flight: AtomicUsize,
    /// The server's metrics (none recorded until the session sets them).
    metrics: Arc<Metrics>,
}

/// Who may write to the socket. Every frame is written directly or queued under this
/// lock.
struct Line {
    /// The socket while the writer runs and has nothing to write; the writer takes it
    /// out for each of its writes. `Some` whenever `busy` is false.
    socket: Option<Box<dyn WriteHalf>>,
    /// The writer has frames queued or being written, or is not running (not started,
    /// or gone): a sender queues. False only while the queue is empty.
    busy: bool,
}

/// A queued frame, or what the socket did not take of one written directly.
struct Queued {
    bytes: Bytes,
    budget: Budget,
    /// The rest of a frame whose start is in the socket: it must go out even if the
    /// session closes meanwhile, or the closing `Error` would land inside it.
    partial: bool,
}

/// The receiving side, owned by the writer task.
pub struct Writer {
    rx: mpsc::UnboundedReceiver<Queued>,
    line: Arc<std::sync::Mutex<Line>>,
    room: Arc<Semaphore>,
    reply_room: Arc<Semaphore>,
    close: CancellationToken,
    closing: Arc<std::sync::Mutex<Option<Closing>>>,
    stop: Arc<StopSignal>,
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
    let stop = Arc::new(StopSignal::default());
    // No socket until the writer runs: frames are queued (the model tests take them
    // with `Writer::try_recv`).
    let line = Arc::new(std::sync::Mutex::new(Line {
        socket: None,
        busy: true,
    }));
    (
        Outbox {
            session,
            client_id,
            inner: Arc::new(Inner {
                tx,
                line: line.clone(),
                room: room.clone(),
                reply_room: reply_room.clone(),
                capacity,
                close: close.clone(),
                closing: closing.clone(),
                stop: stop.clone(),
                in_flight: AtomicUsize::new(0),
                metrics: Metrics::off(),
            }),
        },
        Writer {
            rx,
            line,
            room,
            reply_room,
            close,
            closing,
            stop,
            max_frame,
        },
    )
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Returns `len` bytes of room to the half `budget` took them from.
fn release(room: &Semaphore, reply_room: &Semaphore, len: usize, budget: Budget) {
    match budget {
        Budget::Push => room.add_permits(len),
        Budget::Reply => reply_room.add_permits(len),
    }
}

fn permits(len: usize) -> u32 {
    u32::try_from(len).expect("a frame is far below 4 GiB")
}

impl Outbox {
    /// The same queue, counting in `metrics` (slow-reader disconnects, presence sent).
    /// Set before the outbox is cloned (it panics after).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Outbox {
        Arc::get_mut(&mut self.inner)
            .expect("metrics are set before the outbox is shared")
            .metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

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
        match self.inner.room.try_acquire_many(permits(frame.len())) {
            Ok(permit) => {
                permit.forget();
                self.push(frame, Budget::Push)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.close_with(
                    ErrorCode::TooSlow,
                    format!(
                        "too slow: more than {} bytes of updates queued for this connection \
                         were not read",
                        self.inner.capacity / 2
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
            permit = self.inner.reply_room.acquire_many(permits(frame.len())) => permit,
            _ = self.inner.close.cancelled() => return false,
        };
        match acquired {
            Ok(permit) => {
                permit.forget();
                self.push(frame, Budget::Reply)
            }
            Err(_) => false,
        }
    }

    /// Writes a frame whose room is taken from `budget`: directly if the writer has
    /// nothing to write and the socket takes all of it at once, else (the rest of it)
    /// through the queue. What is written here goes back to `budget` at once; the rest
    /// counts against it until the writer has written it.
    fn push(&self, mut frame: Bytes, budget: Budget) -> bool {
        let mut line = lock(&self.inner.line);
        let mut partial = false;
        // Once the session is closing, frames are queued (and dropped by the writer).
        if !line.busy && !self.inner.close.is_cancelled() {
            let socket = line.socket.as_mut().expect("not busy only with a socket");
            // An error other than `WouldBlock` is met again by the writer's next write,
            // which ends the session; the frame is queued and dropped with the rest.
            let written = socket.try_write(&frame).unwrap_or(0);
            assert!(written <= frame.len());
            release(&self.inner.room, &self.inner.reply_room, written, budget);
            if written == frame.len() {
                return true;
            }
            frame.advance(written);
            partial = written > 0;
        }
        // The writer has bytes to write now: until it has written all of them, frames
        // sent after these (of either half) queue behind them.
        line.busy = true;
        self.inner
            .tx
            .send(Queued {
                bytes: frame,
                budget,
                partial,
            })
            .is_ok()
    }

    /// Closes the session: the writer drops what is queued, sends `Error(code)` as the
    /// last frame and shuts the socket. The first reason given wins.
    pub fn close_with(&self, code: ErrorCode, message: impl Into<String>) {
        let mut closing = self.inner.closing.lock().unwrap_or_else(|p| p.into_inner());
        if closing.is_none() {
            if code == ErrorCode::TooSlow {
                self.inner.metrics.slow_reader_disconnect();
            }
            *closing = Some(Closing {
                code,
                message: message.into(),
            });
        }
        drop(closing);
        self.inner.close.cancel();
        self.inner.stop.fire();
    }

    /// Resolves when the session must close.
    pub async fn closed(&self) {
        self.inner.close.cancelled().await
    }

    /// Fired when the session must close (as [`Outbox::closed`] resolves), for its read
    /// loop, which also has the server fire it at shutdown.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.inner.stop.clone()
    }

    pub fn is_closing(&self) -> bool {
        self.inner.close.is_cancelled()
    }

    /// Why the session is closing, if it is.
    pub fn closing(&self) -> Option<Closing> {
        self.inner
            .closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a submit as in flight, unless `limit` are already.
    pub fn begin_op(&self, limit: usize) -> bool {
        self.inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// A submit counted by [`Outbox::begin_op`] is answered.
    pub fn end_op(&self) {
        let before = self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "more submits answered than begun");
    }

    /// The most bytes of pushed frames (broadcasts, acks) this queue holds.
    pub fn push_capacity(&self) -> usize {
        self.inner.capacity / 2
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.inner.capacity
            - self.inner.room.available_permits()
            - self.inner.reply_room.available_permits()
    }
}

impl Writer {
    /// Takes the oldest queued frame without waiting (an in-process consumer in place
    /// of a socket, as the model tests use).
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let queued = self.rx.try_recv().ok()?;
        self.release(queued.bytes.len(), queued.budget);
        Some(queued.bytes)
    }

    fn release(&self, len: usize, budget: Budget) {
        release(&self.room, &self.reply_room, len, budget);
    }

    /// Writes queued frames until every sender is gone or the session is closed; while
    /// it has nothing to write, senders write to the socket directly. Each write of the
    /// writer must complete within `write_timeout`.
    pub async fn run<W: WriteHalf>(self, socket: W, write_timeout: Duration) {
        let (close, stop, room, reply_room, line) = (
            self.close.clone(),
            self.stop.clone(),
            self.room.clone(),
            self.reply_room.clone(),
            self.line.clone(),
        );
        {
            let mut held = lock(&line);
            held.socket = Some(Box::new(socket));
            // Frames queued before the writer ran are written first.
            held.busy = !self.rx.is_empty();
        }
        self.write(write_timeout).await;
        // However the writer ended, nothing more can be queued, and a session waiting
        // for room (or reading) learns that the connection is gone. The line stays busy:
        // no sender writes to the socket again, and the socket is dropped (if the writer
        // did not already).
        let socket = {
            let mut held = lock(&line);
            held.busy = true;
            held.socket.take()
        };
        drop(socket);
        room.close();
        reply_room.close();
        close.cancel();
        stop.fire();
    }

    /// The socket, for a write of the writer (only while the line is busy: no sender
    /// writes meanwhile).
    fn take_socket(&self) -> Box<dyn WriteHalf> {
        let mut line = lock(&self.line);
        assert!(line.busy, "the writer writes only while the line is busy");
        line.socket
            .take()
            .expect("the socket is in the line between writes")
    }

    async fn write(mut self, write_timeout: Duration) {
        let mut batch: Vec<Queued> = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                _ = self.close.cancelled() => break,
                frame = self.rx.recv() => match frame {
                    Some(frame) => frame,
                    None => {
                        let mut socket = self.take_socket_at_end();
                        let _ = tokio::time::timeout(write_timeout, socket.shutdown()).await;
                        return;
                    }
                },
            };
            // Coalesce what else is queued into one write (bounded: 256 KiB or one frame).
            let mut len = first.bytes.len();
            batch.push(first);
            while len < 256 * 1024 {
                match self.rx.try_recv() {
                    Ok(frame) => {
                        len += frame.bytes.len();
                        batch.push(frame);
                    }
                    Err(_) => break,
                }
            }
            let mut socket = self.take_socket();
            // Not interrupted by a close: a frame half written would garble the stream,
            // and the write is bounded by its deadline anyway.
            match write_batch(&mut socket, &batch, write_timeout).await {
                Ok(()) => {
                    for queued in batch.drain(..) {
                        self.release(queued.bytes.len(), queued.budget);
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
            // Everything queued is written: senders may write directly again.
            let mut line = lock(&self.line);
            line.socket = Some(socket);
            if self.rx.is_empty() {
                line.busy = false;
            }
        }
        // Closed by the server: what is queued is dropped (the client catches up when it
        // reconnects), except the rest of a frame begun by a direct write; the reason
        // goes out last, if the socket takes it in time. No sender writes meanwhile.
        let mut socket = self.take_socket_at_end();
        let rest = match self.rx.try_recv() {
            Ok(queued) if queued.partial => Some(queued.bytes),
            _ => None,
        };
        self.rx.close();
        self.room.close();
        self.reply_room.close();
        let closing = lock(&self.closing).clone();
        let last = async {
            if let Some(rest) = rest {
                socket.write_all(&rest).await?;
            }
            if let Some(Closing { code, message }) = closing {
                let frame = encode(
                    &Envelope {
                        request_id: 0,
                        message: Message::Error { code, message },
                    },
                    self.max_frame,
                );
                socket.write_all(&frame).await?;
            }
            socket.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), last).await;
    }

    /// The socket, once the writer stops: the line is made busy for good first.
    fn take_socket_at_end(&self) -> Box<dyn WriteHalf> {
        let mut line = lock(&self.line);
        line.busy = true;
        line.socket
            .take()
            .expect("the socket is in the line between writes")
    }
}

/// Writes the batch; fails with `TimedOut` if the socket takes nothing for `timeout`
/// (a slow reader that makes progress is not cut off).
async fn write_batch<W: tokio::io::AsyncWrite + Unpin>(
    socket: &mut W,
    batch: &[Queued],
    timeout: Duration,
) -> std::io::Result<()> {
    let joined;
    let bytes: &[u8] = if let [one] = batch {
        &one.bytes
    } else {
        let mut buf = BytesMut::with_capacity(batch.iter().map(|q| q.bytes.len()).sum());
        for queued in batch {
            buf.extend_from_slice(&queued.bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::FrameCodec;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    use tokio_util::codec::Decoder;

    /// Frames encoded one after another on a thread, small and large in turn (the large
    /// one leaves with the thread's buffer, a small one is copied out of it; a content
    /// that panicked leaves bytes behind): each is exactly its length field and content.
    #[test]
    fn frames_encoded_in_turn_are_each_whole() {
        let max_frame = 1 << 16;
        let panicked = std::panic::catch_unwind(|| {
            encode_with(max_frame, 0x01, |buf| {
                buf.put_slice(b"half");
                panic!("content failed");
            })
        });
        assert!(panicked.is_err());
        for (i, len) in [
            0usize,
            1,
            SMALL_ENCODED_FRAME - 4,
            SMALL_ENCODED_FRAME - 3,
            5000,
            7,
            70_000 - 4,
            3,
        ]
        .into_iter()
        .enumerate()
        {
            let len = len.min(max_frame);
            let byte = u8::try_from(i).unwrap() + 1;
            let frame = encode_with(max_frame, 0x01, |buf| buf.put_bytes(byte, len));
            assert_eq!(frame.len(), 4 + len, "frame {i}");
            assert_eq!(&frame[..4], &u32::try_from(len).unwrap().to_le_bytes());
            assert!(frame[4..].iter().all(|&b| b == byte), "frame {i}");
        }
    }

    /// A socket that takes at most `room` bytes (then `WouldBlock`, or `Pending` for the
    /// writer until the test gives it more room).
    #[derive(Clone, Default)]
    struct Socket(Arc<std::sync::Mutex<Wire>>);

    #[derive(Default)]
    struct Wire {
        taken: Vec<u8>,
        room: usize,
        writes: usize,
        direct_writes: usize,
        waker: Option<Waker>,
    }

    impl Socket {
        fn give_room(&self, room: usize) {
            let mut wire = lock(&self.0);
            wire.room = room;
            if let Some(waker) = wire.waker.take() {
                waker.wake();
            }
        }

        fn take(&self, buf: &[u8]) -> Option<usize> {
            let mut wire = lock(&self.0);
            let n = buf.len().min(wire.room);
            if n == 0 {
                return None;
            }
            wire.room -= n;
            wire.writes += 1;
            wire.taken.extend_from_slice(&buf[..n]);
            Some(n)
        }
    }

    impl tokio::io::AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.take(buf) {
                Some(n) => Poll::Ready(Ok(n)),
                None => {
                    lock(&self.0).waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl WriteHalf for Socket {
        fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self
                .take(buf)
                .ok_or(std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
            lock(&self.0).direct_writes += 1;
            Ok(n)
        }
    }

    fn ping(nonce: u64) -> Bytes {
        encode(
            &Envelope {
                request_id: 1,
                message: Message::Ping { nonce },
            },
            MAX_FRAME,
        )
    }

    fn decoded(bytes: &[u8]) -> Vec<Message> {
        let mut buf = BytesMut::from(bytes);
        let mut codec = FrameCodec::new(MAX_FRAME);
        let mut out = Vec::new();
        while let Some(env) = codec.decode(&mut buf).expect("well-formed frames") {
            out.push(env.message);
        }
        assert!(buf.is_empty(), "no partial frame left");
        out
    }

    const MAX_FRAME: usize = 1024;

    #[test]
    fn a_frame_is_encoded_as_the_frame_codec_encodes_it() {
        use tokio_util::codec::Encoder;
        let messages = [
            Message::Ack {
                doc: "d".into(),
                local_seq: 3,
                seq: 9,
            },
            Message::Remote {
                doc: "notes".into(),
                op: crate::protocol::message::WireOp {
                    seq: 4,
                    client_id: 7,
                    local_seq: 2,
                    patches: vec![crate::op::Patch {
                        pos: 1,
                        del: 2,
                        ins: "héllo".repeat(40),
                    }],
                },
            },
            Message::Error {
                code: ErrorCode::TooSlow,
                message: "slow".into(),
            },
        ];
        for message in messages {
            let env = Envelope {
                request_id: 5,
                message,
            };
            let mut expected = BytesMut::new();
            FrameCodec::new(MAX_FRAME)
                .encode(&env, &mut expected)
                .unwrap();
            assert_eq!(encode(&env, MAX_FRAME), expected.freeze());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_sent_while_nothing_is_queued_is_written_by_the_sender_and_in_order() {
        let (outbox, writer) = outbox(1, 7, 1 << 16, MAX_FRAME);
        let socket = Socket::default();
        socket.give_room(1 << 20);
        let task = tokio::spawn(writer.run(socket.clone(), Duration::from_secs(5)));
        tokio::task::yield_now().await;
        assert!(outbox.send(ping(1)));
        // Written before the writer task ran again, and its room is back.
        assert_eq!(lock(&socket.0).direct_writes, 1);
        assert_eq!(outbox.queued_bytes(), 0);
        // The socket is full: the rest of this frame and the next are queued, in order.
        socket.give_room(3);
        assert!(outbox.send(ping(2)));
        assert!(outbox.send(ping(3)));
        assert!(outbox.queued_bytes() > 0);
        socket.give_room(1 << 20);
        tokio::task::yield_now().await;
        assert_eq!(outbox.queued_bytes(), 0);
        // Idle again: the next frame is written directly.
        assert!(outbox.send(ping(4)));
        assert_eq!(lock(&socket.0).direct_writes, 3);
        drop(outbox);
        task.await.unwrap();
        let nonces: Vec<u64> = decoded(&lock(&socket.0).taken)
            .into_iter()
            .map(|m| match m {
                Message::Ping { nonce } => nonce,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(nonces, [1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_begun_by_a_direct_write_is_finished_before_the_closing_error() {
        let (outbox, writer) = outbox(1, 7, 1 << 16, MAX_FRAME);
        let socket = Socket::default();
        let task = tokio::spawn(writer.run(socket.clone(), Duration::from_secs(5)));
        tokio::task::yield_now().await;
        socket.give_room(3);
        assert!(outbox.send(ping(1)));
        // Queued whole, behind the rest of the first: dropped by the close.
        assert!(outbox.send(ping(2)));
        outbox.close_with(ErrorCode::TooSlow, "test");
        socket.give_room(1 << 20);
        task.await.unwrap();
        let messages = decoded(&lock(&socket.0).taken);
        assert!(
            matches!(messages[0], Message::Ping { nonce: 1 }),
            "{messages:?}"
        );
        assert!(
            matches!(
                messages[1],
                Message::Error {
                    code: ErrorCode::TooSlow,
                    ..
                }
            ),
            "{messages:?}"
        );
        assert_eq!(messages.len(), 2);
    }
}
