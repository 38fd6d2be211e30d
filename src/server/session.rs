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

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use super::document::{
    read_missed, Document, Job, OpLimit, Refusal, RefusalKind, Step, Submission, SubmitOutcome,
};
use super::durability::Action;
use super::outbox::{self, encode, Outbox, SessionId};
use super::transport::{ReadHalf, Transport};
use super::wire::refusal_code;
use super::{Server, SMALL_FRAME};
use crate::op::{validate_doc_id, Patch};
use crate::protocol::frame::{FrameCodec, FrameError};
use crate::protocol::message::{Envelope, ErrorCode, Message, Selection, WireOp};
use crate::protocol::{
    max_op_bytes, patches_wire_len, MAX_OPS_IN_FLIGHT, MAX_OP_PATCHES, MAX_SELECTIONS,
    OP_FRAME_OVERHEAD, PROTOCOL_VERSION,
};
use crate::sequencer::Sequencer;

/// The largest frame a Hello can be (type, request id, magic, version, client id, a
/// token of up to 65,535 bytes).
const MAX_HELLO_FRAME: usize = 1 + 4 + 4 + 2 + 8 + 2 + 65_535;

/// A catch-up longer than this many ops is sent as a snapshot instead.
pub const CATCHUP_MAX_OPS: u64 = 10_000;

/// Most ops in one `Fetch` reply, whatever its `limit`.
pub const FETCH_MAX_OPS: u32 = 10_000;

/// Ops read from the log at a time for a catch-up or fetch.
const READ_BATCH: usize = 256;

/// An op with more patches than this is put in component form on a blocking thread.
const LARGE_OP_PATCHES: usize = 1024;

/// A transform costing more component steps than this runs on a blocking thread.
const HEAVY_TRANSFORM: u64 = 1 << 20;

/// Refuses a connection over the server's limit: one `Error` (code 9), then closed. A
/// fresh socket's send buffer takes the small frame without blocking.
pub fn refuse_busy<T: Transport>(stream: T, max_frame: usize, message: String) {
    let frame = encode(
        &Envelope {
            request_id: 0,
            message: Message::Error {
                code: ErrorCode::Busy,
                message,
            },
        },
        max_frame,
    );
    let _ = stream.try_write(&frame);
}

/// Bytes a connection's read buffer is given when bytes arrive and it has no room
/// (as much as one read takes in one system call; a frame that needs more gets its
/// length reserved by the codec).
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// Reads what the socket has, after it reported readable. Returns false when the
/// connection ended. A buffer with less than a quarter chunk of room gets a chunk more,
/// unless it holds part of a large frame: the codec reserved that frame's whole length
/// and growing it again would copy it.
fn read_ready<R: ReadHalf>(reader: &R, buf: &mut BytesMut, large_frame: bool) -> bool {
    if !large_frame && buf.capacity() - buf.len() < READ_CHUNK_BYTES / 4 {
        buf.reserve(READ_CHUNK_BYTES);
    }
    match reader.try_read_buf(buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

struct Session<S: Sequencer> {
    server: Arc<Server<S>>,
    outbox: Outbox,
    /// Set by the handshake.
    client_id: Option<u64>,
    opened: BTreeMap<Arc<str>, Arc<Document<Outbox>>>,
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
    // Aborted if this task is (a server dropped at once, as the simulator's crash
    // does): nothing may reach the client after its session is gone.
    let mut writer = AbortOnDrop(tokio::spawn(write_half.run(writer, config.write_timeout)));
    let mut s = Session {
        server,
        outbox,
        client_id: None,
        opened: BTreeMap::new(),
    };
    s.read_loop(reader).await;
    for doc in s.opened.values() {
        doc.unsubscribe(session, s.client_id.unwrap_or(0));
        s.server.release(doc);
    }
    if s.client_id.is_some() {
        s.server.release_client_id(&s.outbox);
    }
    drop(s);
    let _ = (&mut writer.0).await;
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

    /// Reads frames until the connection ends or must close.
    async fn read_loop<R: ReadHalf>(&mut self, reader: R) {
        let config = self.server.config.clone();
        let mut codec = FrameCodec::new(config.max_frame);
        // Empty while the connection is idle: a buffer is taken when bytes arrive and
        // given back once every frame in it is decoded (see `read_ready`).
        let mut buf = BytesMut::new();
        let mut shutdown = self.server.shutdown.subscribe();
        let mut large: Option<OwnedSemaphorePermit> = None;
        let mut deadline = Instant::now() + config.handshake_timeout;
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
                if !Box::pin(self.handle(env)).await {
                    return;
                }
                if self.outbox.is_closing() {
                    // Replaced or cut off: frames already buffered are not handled.
                    return;
                }
                deadline = Instant::now() + config.idle_timeout;
            }
            if buf.is_empty() {
                // Every frame read is decoded: an idle connection holds no read buffer
                // (10,000 idle connections would otherwise keep 80 MiB).
                buf = BytesMut::new();
            }
            tokio::select! {
                // In a fixed order, so that a seed of the simulator replays the same run;
                // the deadline before the socket, so that a peer trickling bytes that
                // never complete a frame still meets it.
                biased;
                _ = shutdown.recv() => return,
                _ = self.outbox.closed() => {
                    if let Some(closing) = self.outbox.closing() {
                        tracing::info!(session = self.outbox.session, code = ?closing.code, "{}", closing.message);
                    }
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let (what, limit) = if self.client_id.is_none() {
                        ("a complete Hello", config.handshake_timeout)
                    } else {
                        ("a complete message (send Ping when idle)", config.idle_timeout)
                    };
                    self.outbox.close_with(
                        ErrorCode::Timeout,
                        format!("no {what} within {limit:?}"),
                    );
                    return;
                }
                ready = reader.readable() => {
                    if ready.is_err() || !read_ready(&reader, &mut buf, large.is_some()) {
                        return;
                    }
                }
            }
        }
    }

    /// Handles one request. Returns false when the connection must close.
    async fn handle(&mut self, env: Envelope) -> bool {
        let rid = env.request_id;
        if self.client_id.is_none() {
            return self.hello(env);
        }
        match env.message {
            Message::Open { doc, known_version } => {
                if let Err(e) = validate_doc_id(&doc) {
                    self.send_error(rid, ErrorCode::InvalidDocId, e);
                    return true;
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
                self.fetch(rid, doc, after_seq, limit).await
            }
            Message::Presence { doc, selections } => {
                self.presence(rid, doc, selections);
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

    fn hello(&mut self, env: Envelope) -> bool {
        let refuse = |s: &Self, code, message: String| {
            s.send_error(0, code, message);
            false
        };
        let Message::Hello {
            version,
            client_id,
            token,
        } = env.message
        else {
            return refuse(
                self,
                ErrorCode::HandshakeRequired,
                "the first message must be Hello".into(),
            );
        };
        if version != PROTOCOL_VERSION {
            return refuse(
                self,
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
            );
        }
        if token != self.server.config.token {
            return refuse(self, ErrorCode::WrongToken, "wrong access token".into());
        }
        self.client_id = Some(client_id);
        self.outbox = self.outbox.with_client(client_id);
        self.server.claim_client_id(&self.outbox);
        self.send(
            env.request_id,
            Message::Welcome {
                version: PROTOCOL_VERSION,
                max_frame: self.max_frame() as u32,
            },
        );
        true
    }

    /// Subscribes to `doc` and sends the snapshot or catch-up, in frames that fit.
    async fn open(&mut self, rid: u32, doc: String, known_version: u64) -> bool {
        let document = self.server.subscribe(&doc, self.outbox.clone());
        self.opened.insert(document.id.clone(), document.clone());
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
                self.send_error(
                    rid,
                    ErrorCode::StorageFailed,
                    format!("cannot open {doc:?}: {reason}"),
                );
                true
            }
        }
    }

    /// The document's durable text, in pieces that each fit a frame, then an empty `Ops`.
    async fn send_snapshot(&self, rid: u32, doc: &str) -> Sent {
        let view = match self.server.sequencer.read(doc).await {
            Ok(view) => view.unwrap_or_default(),
            Err(reason) => return Sent::Failed(reason.to_string()),
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

    /// Sends up to `limit` durable ops after `after` in `Ops` frames that each fit,
    /// reading the log off the async workers. `Truncated` if the log no longer holds
    /// them (or one would not fit a frame of this server's size).
    async fn send_ops(&self, rid: u32, doc: &str, mut after: u64, limit: u64) -> Sent {
        let max_frame = self.max_frame();
        let header = 5 + 2 + doc.len() + 1 + 4;
        let mut frame_ops: Vec<WireOp> = Vec::new();
        let mut frame_len = header;
        let mut left = limit;
        let mut first = true;
        // No frame of the reply sent yet: it can still become another kind of reply.
        let mut first_frame = true;
        loop {
            let want = left.min(READ_BATCH as u64) as usize;
            let ops = if want == 0 {
                Vec::new()
            } else {
                let sequencer = self.server.sequencer.clone();
                let id = doc.to_owned();
                let read = self
                    .server
                    .blocking(move || sequencer.ops_after(&id, after, want))
                    .await;
                match read {
                    Ok(Ok(Some(ops))) => ops,
                    Ok(Ok(None)) if first => return Sent::Truncated,
                    Ok(Ok(None)) => {
                        return Sent::Cut(format!(
                            "ops after {after} were truncated while being sent; open the document again"
                        ))
                    }
                    Ok(Err(reason)) => return Sent::Failed(reason.to_string()),
                    Err(e) => return Sent::Failed(format!("reading the log: {e}")),
                }
            };
            first = false;
            let done = ops.len() < want || want == 0;
            left -= ops.len() as u64;
            for op in ops {
                after = op.seq;
                let op = super::wire_op(op);
                let len = 24 + patches_wire_len(&op.patches);
                if header + len > max_frame {
                    // Written under a larger --max-frame: it cannot be sent as an op.
                    if first_frame {
                        return Sent::Truncated;
                    }
                    return Sent::Cut(format!(
                        "op {after} does not fit this server's frames; open the document again"
                    ));
                }
                if frame_len + len > max_frame {
                    first_frame = false;
                    let full = std::mem::take(&mut frame_ops);
                    frame_len = header;
                    if let Sent::Closing = self.send_ops_frame(rid, doc, true, full).await {
                        return Sent::Closing;
                    }
                }
                frame_len += len;
                frame_ops.push(op);
            }
            if done {
                break;
            }
        }
        self.send_ops_frame(rid, doc, false, frame_ops).await
    }

    /// Queues one `Ops` frame of a reply (waiting for room).
    async fn send_ops_frame(&self, rid: u32, doc: &str, more: bool, ops: Vec<WireOp>) -> Sent {
        let frame = self.reply(
            rid,
            Message::Ops {
                doc: doc.to_owned(),
                more,
                ops,
            },
        );
        if self.outbox.send_wait(frame).await {
            Sent::Done
        } else {
            Sent::Closing
        }
    }

    async fn fetch(&self, rid: u32, doc: String, after_seq: u64, limit: u32) -> bool {
        let limit = u64::from(limit.min(FETCH_MAX_OPS));
        match self.send_ops(rid, &doc, after_seq, limit).await {
            Sent::Done => true,
            Sent::Closing => false,
            Sent::Truncated => {
                self.send(
                    rid,
                    Message::Reload {
                        doc,
                        reason: format!("ops after seq {after_seq} are no longer kept"),
                    },
                );
                true
            }
            Sent::Cut(reason) => {
                self.send(rid, Message::Reload { doc, reason });
                true
            }
            Sent::Failed(reason) => {
                self.send_error(rid, ErrorCode::StorageFailed, reason);
                true
            }
        }
    }

    fn presence(&self, rid: u32, doc: String, selections: Vec<Selection>) {
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

    async fn submit(
        &self,
        rid: u32,
        doc: String,
        local_seq: u64,
        base_version: u64,
        patches: Vec<Patch>,
    ) {
        let reject = |code: ErrorCode, message: String| {
            self.send(
                rid,
                Message::Reject {
                    doc: doc.clone(),
                    local_seq,
                    code,
                    message,
                },
            )
        };
        let Some(document) = self.opened.get(doc.as_str()).cloned() else {
            return reject(
                ErrorCode::UnknownDocument,
                "open the document before submitting to it".into(),
            );
        };
        let max_bytes = max_op_bytes(self.max_frame());
        let bytes = patches_wire_len(&patches);
        if patches.len() > MAX_OP_PATCHES || bytes > max_bytes {
            document.break_pipeline(self.outbox.session);
            return reject(
                ErrorCode::TooLarge,
                format!(
                    "the op has {} patches in {bytes} bytes; the limits are {MAX_OP_PATCHES} \
                     patches and {max_bytes} bytes",
                    patches.len()
                ),
            );
        }
        if !self.outbox.begin_op(MAX_OPS_IN_FLIGHT) {
            document.break_pipeline(self.outbox.session);
            return reject(
                ErrorCode::TooManyInFlight,
                format!("{MAX_OPS_IN_FLIGHT} ops of this connection are in flight already"),
            );
        }
        let submission = Submission {
            session: self.outbox.session,
            request_id: rid,
            client_id: self.outbox.client_id,
            local_seq,
            base_version,
            patches,
        };
        // The op's bytes wait in memory until durable: a share of the server's budget,
        // waited for (a disk that falls behind slows submitters, not memory).
        let budget = self.server.unsynced.clone();
        let share = u32::try_from(bytes).expect("an op is below 4 GiB");
        let permit = tokio::select! {
            biased;
            permit = budget.acquire_many_owned(share) => permit.expect("never closed"),
            _ = self.outbox.closed() => {
                self.outbox.end_op();
                return;
            }
        };
        let outcome = self.sequence(&document, submission, max_bytes).await;
        let durable = &self.server.durable;
        match outcome {
            // Acks and broadcasts leave only once the op is durable.
            SubmitOutcome::Applied { seq, ticket } => durable.push(
                ticket,
                Action::Deliver {
                    document,
                    seq,
                    outbox: self.outbox.clone(),
                    request_id: rid,
                    local_seq,
                },
                permit,
            ),
            SubmitOutcome::Duplicate { seq, ticket } => durable.push(
                ticket,
                Action::AckDuplicate {
                    document: document.clone(),
                    outbox: self.outbox.clone(),
                    request_id: rid,
                    local_seq,
                    seq,
                },
                permit,
            ),
            SubmitOutcome::Refused(Refusal { kind, message }) => {
                self.outbox.end_op();
                reject(refusal_code(kind), message);
            }
        }
    }

    /// Transforms the op over what it missed and sequences it. Log reads and heavy
    /// transforms run on a blocking thread, never under a lock another document needs.
    async fn sequence(
        &self,
        document: &Arc<Document<Outbox>>,
        submission: Submission,
        max_bytes: usize,
    ) -> SubmitOutcome {
        let sequencer = &self.server.sequencer;
        let limit = OpLimit {
            max: max_bytes,
            measure: patches_wire_len,
        };
        // Putting a long patch list in component form is O(n log n): off the workers.
        let mut job = if submission.patches.len() > LARGE_OP_PATCHES {
            match self
                .server
                .blocking(move || Job::new(&submission, limit))
                .await
            {
                Ok(job) => job,
                Err(e) => return crashed(e),
            }
        } else {
            Job::new(&submission, limit)
        };
        if let Some(outcome) = document.precheck(&**sequencer, &job) {
            return outcome;
        }
        let mut log = None;
        loop {
            let behind = document.version(&**sequencer).saturating_sub(job.at());
            let step = if log.is_some() || job.cost(behind) > HEAVY_TRANSFORM {
                let (doc, seq) = (document.clone(), sequencer.clone());
                let records = log.take();
                match self
                    .server
                    .blocking(move || {
                        let step = doc.step(&*seq, &mut job, records);
                        (job, step)
                    })
                    .await
                {
                    Ok((back, step)) => {
                        job = back;
                        step
                    }
                    Err(e) => return crashed(e),
                }
            } else {
                document.step(&**sequencer, &mut job, None)
            };
            match step {
                Step::Done(outcome) => return outcome,
                Step::ReadLog { after, upto } => {
                    let (seq, id) = (sequencer.clone(), document.id.clone());
                    let read = self
                        .server
                        .blocking(move || read_missed(&*seq, &id, after, upto))
                        .await;
                    match read {
                        Ok(Ok(records)) => log = Some(records),
                        Ok(Err(outcome)) => return outcome,
                        Err(e) => return crashed(e),
                    }
                }
            }
        }
    }
}

/// The refusal of an op whose work panicked off the async workers.
fn crashed(e: String) -> SubmitOutcome {
    SubmitOutcome::Refused(Refusal::new(RefusalKind::Crashed, format!("internal: {e}")))
}

/// How a reply of several frames went.
enum Sent {
    Done,
    /// The session is closing.
    Closing,
    /// The log no longer holds the ops (nothing of the reply was sent).
    Truncated,
    /// Frames of the reply were sent, then it could not go on: it ends with `Reload`.
    Cut(String),
    /// The storage failed.
    Failed(String),
}
