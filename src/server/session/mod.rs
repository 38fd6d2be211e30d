//! One client connection: handshake, then requests in, replies and broadcasts out.
//!
//! Reading and decoding happen here; a separate task writes the session's outbox
//! ([`super::outbox`]). A malformed stream gets an `Error` and the connection is
//! closed; a bad request on a good stream gets a `Reject` or `Error` and the session
//! goes on. Nothing a client sends can affect another client, except through the ops it
//! is allowed to submit.
//!
//! Limits enforced here (protocol.md, "Limits"): the handshake and idle deadlines, the
//! bytes of one frame being received (a frame above [`super::SMALL_FRAME`] must get
//! room in the server-wide budget before its body is buffered), the size and patch
//! count of an op, the ops in flight, the selections in a presence update. Replies are
//! built to fit a frame: a snapshot goes in pieces, a catch-up or fetch in several
//! `Ops` frames.
//!
//! This file reads, decodes and dispatches; each request kind has its own file:
//! `hello.rs` (the handshake), `open.rs` (subscribe, snapshot or catch-up), `fetch.rs`,
//! `presence.rs`, `submit.rs` (an op on its way through the document core to its ack
//! or `Reject`), `ops.rs` (replies of logged ops in frames that fit), and `access.rs`
//! (the access token's word on each request about a document).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use super::document::Document;
use super::outbox::{self, encode, Outbox, SessionId};
use super::transport::{ReadHalf, Refused, Transport};
use super::{Server, SMALL_FRAME};
use crate::auth::{Access, Grant};
use crate::op::validate_doc_id;
use crate::protocol::frame::{FrameCodec, FrameError};
use crate::protocol::message::{Envelope, ErrorCode, Message};
use crate::sequencer::{Owner, Route, RouteError, Sequencer};

mod access;
mod fetch;
mod hello;
mod open;
mod ops;
mod presence;
mod submit;

pub use fetch::FETCH_MAX_OPS;
pub use open::CATCHUP_MAX_OPS;

/// The largest frame a Hello can be (type, request id, magic, version, client id, a
/// token of up to 65,535 bytes).
const MAX_HELLO_FRAME: usize = 1 + 4 + 4 + 2 + 8 + 2 + 65_535;

/// Refused connections whose close may linger at once ([`refuse_busy`]); past this many
/// (a flood of connections), a refusal is [`refuse_busy_now`].
pub const MAX_REFUSALS_LINGERING: usize = 1024;

/// How long a refused connection may take to take its `Error`, and then to close.
pub const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes read and dropped from a refused connection before it is closed anyway.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

fn busy_frame(max_frame: usize, message: String) -> Bytes {
    encode(
        &Envelope {
            request_id: 0,
            message: Message::Error {
                code: ErrorCode::Busy,
                message,
            },
        },
        max_frame,
    )
}

/// Refuses a connection over the server's limit: one `Error` (code 9), the end of the
/// stream, then what the client sent (its Hello, typically) is read and dropped until
/// it closes, for at most `REFUSAL_LINGER` and `REFUSAL_DRAIN_BYTES`. Closing with
/// its Hello unread would make the kernel reset the connection, and the reset discards
/// the `Error` before the client reads it.
pub async fn refuse_busy<T: Transport>(stream: T, max_frame: usize, message: String) {
    use tokio::io::AsyncWriteExt;
    let frame = busy_frame(max_frame, message);
    let (reader, mut writer) = stream.into_split();
    let written = tokio::time::timeout(REFUSAL_LINGER, async {
        writer.write_all(&frame).await?;
        writer.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let mut sink = BytesMut::with_capacity(4096);
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut drained = 0;
        while drained <= REFUSAL_DRAIN_BYTES {
            if reader.readable().await.is_err() {
                return;
            }
            sink.clear();
            match reader.try_read_buf(&mut sink) {
                Ok(0) => return,
                Ok(n) => drained += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// Refuses a connection at once: the `Error` if the socket takes it without waiting (a
/// fresh one does), then closed.
pub fn refuse_busy_now<T: Transport>(stream: &T, max_frame: usize, message: String) {
    let _ = stream.try_write(&busy_frame(max_frame, message));
}

/// Bytes a connection's read buffer is given when bytes arrive and it has no room
/// (as much as one read takes in one system call; a frame that needs more gets its
/// length reserved by the codec).
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// The largest emptied read buffer kept for reuse ([`give_back_read_buffer`]).
const SPARE_READ_BUFFER_MAX_BYTES: usize = 8 * READ_CHUNK_BYTES;

thread_local! {
    /// An emptied read buffer of this worker thread, for the next connection that has
    /// bytes to read: a request then costs no allocation and free of a read chunk (an
    /// 8 KiB malloc also makes glibc consolidate its fast bins each time). Used only
    /// between two awaits, so a task that moves to another worker takes nothing along.
    static SPARE_READ_BUFFER: std::cell::Cell<Option<BytesMut>> = const { std::cell::Cell::new(None) };
}

/// Gives an emptied read buffer back to this thread's spare, if it can hold a chunk
/// without allocating (no frame still shares its block) and is not a large one.
fn give_back_read_buffer(mut buf: BytesMut) {
    debug_assert!(buf.is_empty());
    if buf.capacity() == 0 || !buf.try_reclaim(READ_CHUNK_BYTES) {
        return;
    }
    if buf.capacity() <= SPARE_READ_BUFFER_MAX_BYTES {
        SPARE_READ_BUFFER.set(Some(buf));
    }
}

/// What a read after readiness found.
enum Read {
    /// Bytes, or nothing yet (a spurious wake-up).
    More,
    /// The connection ended.
    Ended,
    /// The transport refused what the peer sent ([`Refused`]): answered with its code.
    Refused(ErrorCode, String),
}

/// Reads what the socket has, after it reported readable. A buffer with less than a quarter chunk of room gets a chunk more
/// (this thread's spare, if it has one), unless it holds part of a large frame: the
/// codec reserved that frame's whole length and growing it again would copy it.
fn read_ready<R: ReadHalf>(reader: &R, buf: &mut BytesMut, large_frame: bool) -> Read {
    if buf.capacity() == 0 {
        if let Some(spare) = SPARE_READ_BUFFER.take() {
            *buf = spare;
        }
    }
    if !large_frame && buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
        buf.reserve(READ_CHUNK_BYTES);
    }
    match reader.try_read_buf(buf) {
        Ok(0) => Read::Ended,
        Ok(_) => Read::More,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Read::More,
        Err(e) => match Refused::of(&e) {
            Some(refused) => Read::Refused(refused.code, refused.message.clone()),
            None => Read::Ended,
        },
    }
}

/// Up to this many documents open, a session finds one by comparing ids
/// ([`Session::open_doc`]).
const OPEN_DOCS_SCANNED: usize = 4;

struct Session<S: Sequencer> {
    server: Arc<Server<S>>,
    outbox: Outbox,
    /// Set by the handshake.
    client_id: Option<u64>,
    /// What the client's token grants (everything when the server has no secrets); set
    /// by the handshake, checked at each per-document request.
    grant: Grant,
    opened: HashMap<Arc<str>, Arc<Document<Outbox>>>,
}

fn error_frame(
    request_id: u32,
    code: ErrorCode,
    message: impl Into<String>,
    max_frame: usize,
) -> Bytes {
    encode(
        &Envelope {
            request_id,
            message: Message::Error {
                code,
                message: message.into(),
            },
        },
        max_frame,
    )
}

pub async fn run<S: Sequencer, T: Transport>(
    server: Arc<Server<S>>,
    stream: T,
    session: SessionId,
) {
    let config = server.config.clone();
    let (reader, writer) = stream.into_split();
    let (outbox, write_half) = outbox::outbox(session, 0, config.outbox_bytes, config.max_frame);
    let outbox = outbox.with_metrics(server.metrics().clone());
    // Aborted if this task is (a server dropped at once, as the simulator's crash
    // does): nothing may reach the client after its session is gone.
    let mut writer = AbortOnDrop(tokio::spawn(write_half.run(writer, config.write_timeout)));
    let mut s = Session {
        server,
        outbox,
        client_id: None,
        grant: Grant::anonymous(),
        opened: HashMap::new(),
    };
    // A panic here is a bug; it ends this connection, not the server, and what the
    // session holds is released below as at any end: left to the unwinding, its
    // documents would keep it subscribed, and keep its socket open, for ever (the
    // client would wait on a connection that nobody reads). Unwind safety: a
    // document's state is behind locks that are taken past poisoning, as is the
    // server's; the session's own state is dropped here.
    if let Err(panic) = AssertUnwindSafe(s.read_loop(reader)).catch_unwind().await {
        let reason = super::panic_message(&*panic);
        tracing::error!(
            session,
            "the session panicked, and its connection is closed: {reason}"
        );
    }
    // In document order, so that a seed of the simulator replays the same run.
    let mut opened: Vec<_> = s.opened.values().cloned().collect();
    opened.sort_by(|a, b| a.id.cmp(&b.id));
    for doc in &opened {
        doc.unsubscribe(session, s.client_id.unwrap_or(0));
        s.server.release(doc);
    }
    if s.client_id.is_some() {
        s.server.release_client_id(&s.outbox);
    }
    drop(s);
    let _ = (&mut writer.0).await;
}

/// Takes a session's stop signal off the server's list when its read loop ends (or is
/// dropped).
struct ForgetStop<S: Sequencer>(Arc<Server<S>>, SessionId);

impl<S: Sequencer> Drop for ForgetStop<S> {
    fn drop(&mut self) {
        self.0.forget_stop(self.1);
    }
}

/// A task that ends with its owner.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S: Sequencer> Session<S> {
    fn max_frame(&self) -> usize {
        self.server.config.max_frame
    }

    fn reply(&self, request_id: u32, message: Message) -> Bytes {
        encode(
            &Envelope {
                request_id,
                message,
            },
            self.max_frame(),
        )
    }

    /// Queues a reply that is small by construction.
    fn send(&self, request_id: u32, message: Message) {
        self.outbox.send(self.reply(request_id, message));
    }

    /// Queues an `Error` that keeps the connection open.
    fn send_error(&self, request_id: u32, code: ErrorCode, message: impl Into<String>) {
        self.outbox
            .send(error_frame(request_id, code, message, self.max_frame()));
    }

    /// Queues a `Redirect` of `doc` to `owner`.
    fn send_redirect(&self, request_id: u32, doc: &str, owner: &Owner) {
        self.send(
            request_id,
            Message::Redirect {
                doc: doc.to_owned(),
                addr: owner.addr.to_string(),
                ws_url: owner.ws_url.to_string(),
            },
        );
    }

    /// The session's copy of `doc`, if it has it open. Most sessions have one or a few
    /// documents open: those are compared by id (a memcmp each) instead of hashing the
    /// id with the map's SipHash, which is kept for larger maps (ids are the client's to
    /// choose). One lookup per submitted op: about 150 instructions, this about 30.
    fn open_doc(&self, doc: &str) -> Option<&Arc<Document<Outbox>>> {
        if self.opened.len() <= OPEN_DOCS_SCANNED {
            self.opened.values().find(|d| *d.id == *doc)
        } else {
            self.opened.get(doc)
        }
    }

    /// Whether another node serves `doc` for this session: `None` if this one does.
    /// For a document the session has open, what the document says (it moved, or not:
    /// no question to the sequencer per request); else the sequencer's route.
    /// `Some(Err)`: no node serves it right now (retry later, code 33).
    async fn served_elsewhere(&self, doc: &str) -> Option<Result<Owner, String>> {
        if let Some(document) = self.open_doc(doc) {
            return document.moved_to().map(Ok);
        }
        match self.server.sequencer.route(doc).await {
            Ok(Route::Here) => None,
            Ok(Route::Elsewhere(owner)) => Some(Ok(owner)),
            Err(RouteError::Unavailable(why)) => Some(Err(why)),
        }
    }

    /// A read for a reply about `doc` failed with `reason`. If the document moved
    /// meanwhile (cluster mode: this node's tenure of it ended while the reply was being
    /// read, which fails the read), the client is sent where it is served now, or told
    /// that no node serves it yet (code 33, retry), as for any request about a document
    /// served elsewhere; so too if this node serves it again, but under another tenure
    /// than `incarnation`, the one the read began under. Only a failure of this node's
    /// own storage is code 30.
    async fn send_read_failure(&self, rid: u32, doc: &str, incarnation: u64, reason: String) {
        let sequencer = &self.server.sequencer;
        match sequencer.route(doc).await {
            Ok(Route::Elsewhere(owner)) => self.send_redirect(rid, doc, &owner),
            Err(RouteError::Unavailable(why)) => self.send_error(rid, ErrorCode::Unavailable, why),
            Ok(Route::Here) if sequencer.incarnation(doc) != incarnation => self.send_error(
                rid,
                ErrorCode::Unavailable,
                format!("{doc:?} was handed over while it was read; retry"),
            ),
            Ok(Route::Here) => self.send_error(rid, ErrorCode::StorageFailed, reason),
        }
    }

    /// Reads frames until the connection ends or must close.
    async fn read_loop<R: ReadHalf>(&mut self, reader: R) {
        let config = self.server.config.clone();
        let mut codec = FrameCodec::new(config.max_frame);
        // Empty while the connection is idle: a buffer is taken when bytes arrive and
        // given back once every frame in it is decoded (see `read_ready`).
        let mut buf = BytesMut::new();
        // The futures the reads race with are made once per connection, not per frame:
        // the idle timer is armed at the first deadline and, when it fires early (frames
        // came since), moved to the current one, so a frame costs no timer update and
        // no waiter registrations.
        // Fired when the session closes or the server shuts down: a flag and a waker
        // slot, polled at every wait (see `server/stop.rs`).
        let stop = self.outbox.stop_signal();
        self.server
            .stop_at_shutdown(self.outbox.session, stop.clone());
        let _forget = ForgetStop(self.server.clone(), self.outbox.session);
        let mut large: Option<OwnedSemaphorePermit> = None;
        let mut deadline = Instant::now() + config.handshake_timeout;
        let idle = tokio::time::sleep_until(deadline);
        // Armed by the handshake when the token expires: the connection is closed then
        // (code 12), whatever it is doing.
        let expiry = tokio::time::sleep_until(deadline);
        let mut expiry_armed = false;
        tokio::pin!(idle, expiry);
        loop {
            // Decode every complete frame already buffered.
            loop {
                if large.is_none() && buf.len() >= 4 {
                    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if self.client_id.is_none() && len > MAX_HELLO_FRAME {
                        // No Hello is that large: refused before it takes any budget.
                        self.send_error(
                            0,
                            ErrorCode::FrameTooLarge,
                            format!("a {len}-byte first frame cannot be a Hello"),
                        );
                        return;
                    }
                    if len <= config.max_frame && len + 4 > SMALL_FRAME {
                        // Room for its body in the server-wide budget, before it is buffered.
                        match self
                            .server
                            .large_frames
                            .clone()
                            .try_acquire_many_owned(len as u32)
                        {
                            Ok(permit) => large = Some(permit),
                            Err(_) => {
                                self.outbox.close_with(
                                    ErrorCode::Busy,
                                    format!(
                                        "the server holds {} bytes of large frames being received \
                                         and has no room for this one of {len}; retry later",
                                        config.large_frame_budget
                                    ),
                                );
                                return;
                            }
                        }
                    }
                }
                let env = match codec.decode(&mut buf) {
                    Ok(Some(env)) => env,
                    Ok(None) => break,
                    Err(e) => {
                        let code = match &e {
                            FrameError::TooLarge => ErrorCode::FrameTooLarge,
                            other => other.code(),
                        };
                        self.send_error(0, code, e.to_string());
                        return;
                    }
                };
                if large.take().is_some() {
                    // The large frame's block would live on in `buf` (it shares the
                    // allocation): keep only what follows it, in a small buffer.
                    let mut fresh = BytesMut::with_capacity(buf.len());
                    fresh.extend_from_slice(&buf);
                    buf = fresh;
                }
                // Boxed: a request's future (an open, a submit, a fetch) is far larger
                // than the idle wait below, and every connection's task would otherwise
                // be sized for it while it waits.
                let greeted = self.client_id.is_some();
                if !Box::pin(self.handle(env)).await {
                    return;
                }
                if !greeted && !expiry_armed && self.grant.expires_unix_secs != u64::MAX {
                    let left = self
                        .grant
                        .expires_unix_secs
                        .saturating_sub(crate::auth::now_unix_secs());
                    // A time too far to represent is never reached.
                    if let Some(at) =
                        Instant::now().checked_add(std::time::Duration::from_secs(left))
                    {
                        expiry.as_mut().reset(at);
                        expiry_armed = true;
                    }
                }
                if self.outbox.is_closing() {
                    // Replaced or cut off: frames already buffered are not handled.
                    return;
                }
                deadline = Instant::now() + config.idle_timeout;
            }
            if buf.is_empty() {
                // Every frame read is decoded: an idle connection holds no read buffer
                // (10,000 idle connections would otherwise keep 80 MiB); the thread
                // keeps one for the next reader.
                give_back_read_buffer(std::mem::take(&mut buf));
            }
            tokio::select! {
                // In a fixed order, so that a seed of the simulator replays the same run;
                // the deadline before the socket, so that a peer trickling bytes that
                // never complete a frame still meets it.
                biased;
                () = stop.fired() => {
                    // Closing, or the server is shutting down (then there is no reason).
                    if let Some(closing) = self.outbox.closing() {
                        tracing::info!(session = self.outbox.session, code = ?closing.code, "{}", closing.message);
                    }
                    return;
                }
                () = &mut expiry, if expiry_armed => {
                    self.close_expired();
                    return;
                }
                () = &mut idle => {
                    if Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    let (what, limit) = if self.client_id.is_none() {
                        ("complete Hello", config.handshake_timeout)
                    } else {
                        ("complete message (send Ping when idle)", config.idle_timeout)
                    };
                    self.outbox.close_with(
                        ErrorCode::Timeout,
                        format!("no {what} within {limit:?}"),
                    );
                    return;
                }
                ready = reader.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    match read_ready(&reader, &mut buf, large.is_some()) {
                        Read::More => {}
                        Read::Ended => return,
                        Read::Refused(code, message) => {
                            self.send_error(0, code, message);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Handles one request. Returns false when the connection must close.
    async fn handle(&mut self, env: Envelope) -> bool {
        let rid = env.request_id;
        if self.client_id.is_none() {
            return self.hello(env).await;
        }
        match env.message {
            Message::Open { doc, known_version } => {
                if let Err(e) = validate_doc_id(&doc) {
                    self.send_error(rid, ErrorCode::InvalidDocId, e);
                    return true;
                }
                if let Some(keep_open) = self.refuse_unless(rid, &doc, Access::Read) {
                    return keep_open;
                }
                self.open(rid, doc, known_version).await
            }
            Message::Submit {
                doc,
                local_seq,
                base_version,
                patches,
            } => {
                self.submit(rid, doc, local_seq, base_version, patches)
                    .await;
                true
            }
            Message::Fetch {
                doc,
                after_seq,
                limit,
            } => {
                if let Err(e) = validate_doc_id(&doc) {
                    self.send_error(rid, ErrorCode::InvalidDocId, e);
                    return true;
                }
                if let Some(keep_open) = self.refuse_unless(rid, &doc, Access::Read) {
                    return keep_open;
                }
                self.fetch(rid, doc, after_seq, limit).await
            }
            Message::Presence { doc, selections } => {
                if let Some(keep_open) = self.refuse_unless(rid, &doc, Access::Read) {
                    return keep_open;
                }
                self.presence(rid, doc, selections).await;
                true
            }
            Message::Close { doc } => {
                if let Some(document) = self.opened.remove(doc.as_str()) {
                    document.unsubscribe(self.outbox.session, self.outbox.client_id);
                    self.server.release(&document);
                }
                true
            }
            Message::Ping { nonce } => {
                self.send(rid, Message::Pong { nonce });
                true
            }
            Message::Hello { .. } => {
                self.send_error(0, ErrorCode::Malformed, "Hello after the handshake");
                false
            }
            other => {
                self.send_error(
                    0,
                    ErrorCode::UnknownType,
                    format!("type {:#04x} is not a request", other.type_byte()),
                );
                false
            }
        }
    }
}
