//! Protocol messages and their byte encoding (`protocol.md`). Explicit, with `bytes`:
//! every count is checked against the bytes present before anything is allocated, and
//! decoding never panics on any input (fuzzed by `fuzz/fuzz_targets/frame_decode.rs`).

use bytes::{Buf, BufMut};

use super::MAGIC;
use crate::op::Patch;

/// Error and reject codes (`protocol.md`, "Error and reject codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Malformed,
    FrameTooLarge,
    UnknownType,
    BadUtf8,
    HandshakeRequired,
    UnsupportedVersion,
    /// The access token is missing, malformed, or signed with no secret the server
    /// holds.
    InvalidToken,
    TooSlow,
    /// The server is at a limit (connections, or memory for large frames); retry later.
    Busy,
    /// No Hello within the handshake deadline, or no message within the idle deadline.
    Timeout,
    /// Another connection presented this client id; this one is closed.
    Replaced,
    /// The access token's time is over (at the handshake, or during the session).
    TokenExpired,
    UnknownDocument,
    OutOfRange,
    FutureVersion,
    InvalidDocId,
    TooLarge,
    StorageFailed,
    PipelineConflict,
    /// The op id was used before for a different op.
    OpIdReused,
    /// The op's base version is older than the ops the server keeps: reload.
    TooOld,
    /// More ops in flight on this connection than the server allows.
    TooManyInFlight,
    /// The access token does not name the document (said alike whether it exists).
    AccessDenied,
    /// The access token names the document for reading only.
    ReadOnly,
    /// The document was deleted (by the admin endpoint): sent unasked to the sessions
    /// that had it open, and as the `Reject` of an op that came too late.
    DocumentDeleted,
    /// No node serves the document right now (cluster mode: its owner is not known or
    /// not reachable, or it is being handed over): retry later, with backoff.
    Unavailable,
    /// The connection has [`super::MAX_OPEN_DOCS`] documents open: close one first.
    TooManyOpen,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::UnknownType => 3,
            ErrorCode::BadUtf8 => 4,
            ErrorCode::HandshakeRequired => 5,
            ErrorCode::UnsupportedVersion => 6,
            ErrorCode::InvalidToken => 7,
            ErrorCode::TooSlow => 8,
            ErrorCode::Busy => 9,
            ErrorCode::Timeout => 10,
            ErrorCode::Replaced => 11,
            ErrorCode::TokenExpired => 12,
            ErrorCode::UnknownDocument => 20,
            ErrorCode::OutOfRange => 21,
            ErrorCode::FutureVersion => 22,
            ErrorCode::InvalidDocId => 23,
            ErrorCode::TooLarge => 24,
            ErrorCode::StorageFailed => 30,
            ErrorCode::PipelineConflict => 25,
            ErrorCode::OpIdReused => 26,
            ErrorCode::TooOld => 27,
            ErrorCode::TooManyInFlight => 28,
            ErrorCode::AccessDenied => 29,
            ErrorCode::ReadOnly => 31,
            ErrorCode::DocumentDeleted => 32,
            ErrorCode::Unavailable => 33,
            ErrorCode::TooManyOpen => 34,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(code: u16) -> ErrorCode {
        match code {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::UnknownType,
            4 => ErrorCode::BadUtf8,
            5 => ErrorCode::HandshakeRequired,
            6 => ErrorCode::UnsupportedVersion,
            7 => ErrorCode::InvalidToken,
            8 => ErrorCode::TooSlow,
            9 => ErrorCode::Busy,
            10 => ErrorCode::Timeout,
            11 => ErrorCode::Replaced,
            12 => ErrorCode::TokenExpired,
            20 => ErrorCode::UnknownDocument,
            21 => ErrorCode::OutOfRange,
            22 => ErrorCode::FutureVersion,
            23 => ErrorCode::InvalidDocId,
            24 => ErrorCode::TooLarge,
            30 => ErrorCode::StorageFailed,
            25 => ErrorCode::PipelineConflict,
            26 => ErrorCode::OpIdReused,
            27 => ErrorCode::TooOld,
            28 => ErrorCode::TooManyInFlight,
            29 => ErrorCode::AccessDenied,
            31 => ErrorCode::ReadOnly,
            32 => ErrorCode::DocumentDeleted,
            33 => ErrorCode::Unavailable,
            34 => ErrorCode::TooManyOpen,
            c => ErrorCode::Other(c),
        }
    }

    /// Whether the connection is closed after this error (the stream cannot be trusted).
    pub fn closes_connection(self) -> bool {
        matches!(self.to_u16(), 1..=12)
    }
}

/// One op as the server sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireOp {
    pub seq: u64,
    pub client_id: u64,
    pub local_seq: u64,
    pub patches: Vec<Patch>,
}

/// A cursor or selection: `anchor == head` is a caret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub anchor: u32,
    pub head: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        client_id: u64,
        token: String,
    },
    Welcome {
        version: u16,
        max_frame: u32,
        /// The client's id: the one it sent, or the one the server gave it (it sent 0).
        client_id: u64,
    },
    Open {
        doc: String,
        known_version: u64,
    },
    Submit {
        doc: String,
        local_seq: u64,
        base_version: u64,
        patches: Vec<Patch>,
    },
    Fetch {
        doc: String,
        after_seq: u64,
        limit: u32,
    },
    Presence {
        doc: String,
        selections: Vec<Selection>,
    },
    Close {
        doc: String,
    },
    Ping {
        nonce: u64,
    },
    /// One piece of a document's text at `version`: the pieces of one snapshot arrive
    /// in order, and the snapshot is complete once `total_len` bytes have arrived.
    Snapshot {
        doc: String,
        version: u64,
        total_len: u64,
        text: String,
    },
    /// Ops in seq order; `more`: another `Ops` frame of the same reply follows.
    Ops {
        doc: String,
        more: bool,
        ops: Vec<WireOp>,
    },
    Ack {
        doc: String,
        local_seq: u64,
        seq: u64,
    },
    Reject {
        doc: String,
        local_seq: u64,
        code: ErrorCode,
        message: String,
    },
    Remote {
        doc: String,
        op: WireOp,
    },
    PresenceState {
        doc: String,
        client_id: u64,
        selections: Vec<Selection>,
    },
    Reload {
        doc: String,
        reason: String,
    },
    Pong {
        nonce: u64,
    },
    /// Another node serves `doc` (cluster mode): its TCP client listener `addr`
    /// (`host:port`) and its WebSocket URL `ws_url` (empty: it serves none). Answers a
    /// request about a document this node does not serve, or comes unasked (request id
    /// 0) when the node stops serving a document the connection has open; either way
    /// the document is closed on this connection.
    Redirect {
        doc: String,
        addr: String,
        ws_url: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A message with the request id of its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub request_id: u32,
    pub message: Message,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    code: ErrorCode,
    detail: String,
}

impl DecodeError {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        DecodeError {
            code,
            detail: detail.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

fn short() -> DecodeError {
    DecodeError::new(ErrorCode::Malformed, "message ends early")
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.0.try_get_u8().map_err(|_| short())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.0.try_get_u16_le().map_err(|_| short())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.0.try_get_u32_le().map_err(|_| short())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.0.try_get_u64_le().map_err(|_| short())
    }
    fn bytes(&mut self, len: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < len {
            return Err(short());
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }
    fn text(&mut self, len: usize) -> Result<String, DecodeError> {
        let bytes = self.bytes(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| DecodeError::new(ErrorCode::BadUtf8, format!("invalid UTF-8: {e}")))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        self.text(len)
    }
    fn str32(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        self.text(len)
    }
    /// A count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > self.0.len() / min_size {
            return Err(DecodeError::new(
                ErrorCode::Malformed,
                format!("count {n} exceeds the message"),
            ));
        }
        Ok(n)
    }
    fn patches(&mut self) -> Result<Vec<Patch>, DecodeError> {
        let n = self.count(12)?;
        let mut patches = Vec::with_capacity(n);
        for _ in 0..n {
            let pos = self.u32()?;
            let del = self.u32()?;
            let ins = self.str32()?;
            patches.push(Patch { pos, del, ins });
        }
        Ok(patches)
    }
    fn selections(&mut self) -> Result<Vec<Selection>, DecodeError> {
        let n = self.count(8)?;
        (0..n)
            .map(|_| {
                Ok(Selection {
                    anchor: self.u32()?,
                    head: self.u32()?,
                })
            })
            .collect()
    }
    fn wire_op(&mut self) -> Result<WireOp, DecodeError> {
        Ok(WireOp {
            seq: self.u64()?,
            client_id: self.u64()?,
            local_seq: self.u64()?,
            patches: self.patches()?,
        })
    }
}

fn put_str16<B: BufMut>(out: &mut B, s: &str) {
    let len = u16::try_from(s.len()).expect("str16 fields are bounded by their callers");
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
}

/// An `Ack`'s body after its type and request id (shared with [`encode_ack_into`]).
fn put_ack_body<B: BufMut>(out: &mut B, doc: &str, local_seq: u64, seq: u64) {
    put_str16(out, doc);
    out.put_u64_le(local_seq);
    out.put_u64_le(seq);
}

/// The content of `Envelope { request_id, Message::Ack { doc, local_seq, seq } }` as
/// [`Envelope::encode_into`] writes it, from borrowed fields (an ack per op needs no
/// `String` for its document id).
pub fn encode_ack_into<B: BufMut>(
    out: &mut B,
    request_id: u32,
    doc: &str,
    local_seq: u64,
    seq: u64,
) {
    out.put_u8(0x22);
    out.put_u32_le(request_id);
    put_ack_body(out, doc, local_seq, seq);
}

fn put_str32<B: BufMut>(out: &mut B, s: &str) {
    out.put_u32_le(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn put_patches<B: BufMut>(out: &mut B, patches: &[Patch]) {
    out.put_u32_le(patches.len() as u32);
    for p in patches {
        out.put_u32_le(p.pos);
        out.put_u32_le(p.del);
        put_str32(out, &p.ins);
    }
}

fn put_selections<B: BufMut>(out: &mut B, selections: &[Selection]) {
    out.put_u32_le(selections.len() as u32);
    for s in selections {
        out.put_u32_le(s.anchor);
        out.put_u32_le(s.head);
    }
}

fn put_wire_op<B: BufMut>(out: &mut B, op: &WireOp) {
    out.put_u64_le(op.seq);
    out.put_u64_le(op.client_id);
    out.put_u64_le(op.local_seq);
    put_patches(out, &op.patches);
}

/// Messages longer than this in a `str16` field (error messages, reasons) are cut.
fn bounded(s: &str) -> &str {
    if s.len() <= 1024 {
        return s;
    }
    let mut end = 1024;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Message {
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => 0x01,
            Message::Welcome { .. } => 0x02,
            Message::Open { .. } => 0x10,
            Message::Submit { .. } => 0x11,
            Message::Fetch { .. } => 0x12,
            Message::Presence { .. } => 0x13,
            Message::Close { .. } => 0x14,
            Message::Ping { .. } => 0x15,
            Message::Snapshot { .. } => 0x20,
            Message::Ops { .. } => 0x21,
            Message::Ack { .. } => 0x22,
            Message::Reject { .. } => 0x23,
            Message::Remote { .. } => 0x24,
            Message::PresenceState { .. } => 0x25,
            Message::Reload { .. } => 0x26,
            Message::Pong { .. } => 0x27,
            Message::Redirect { .. } => 0x28,
            Message::Error { .. } => 0x7F,
        }
    }
}

impl Envelope {
    /// The frame's content (type, request id, body), without the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// [`Envelope::encode`] appended to `out` (a frame is built in one buffer, its
    /// length field in front).
    pub fn encode_into<B: BufMut>(&self, out: &mut B) {
        out.put_u8(self.message.type_byte());
        out.put_u32_le(self.request_id);
        match &self.message {
            Message::Hello {
                version,
                client_id,
                token,
            } => {
                out.put_slice(&MAGIC);
                out.put_u16_le(*version);
                out.put_u64_le(*client_id);
                put_str16(out, token);
            }
            Message::Welcome {
                version,
                max_frame,
                client_id,
            } => {
                out.put_u16_le(*version);
                out.put_u32_le(*max_frame);
                out.put_u64_le(*client_id);
            }
            Message::Open { doc, known_version } => {
                put_str16(out, doc);
                out.put_u64_le(*known_version);
            }
            Message::Submit {
                doc,
                local_seq,
                base_version,
                patches,
            } => {
                put_str16(out, doc);
                out.put_u64_le(*local_seq);
                out.put_u64_le(*base_version);
                put_patches(out, patches);
            }
            Message::Fetch {
                doc,
                after_seq,
                limit,
            } => {
                put_str16(out, doc);
                out.put_u64_le(*after_seq);
                out.put_u32_le(*limit);
            }
            Message::Presence { doc, selections } => {
                put_str16(out, doc);
                put_selections(out, selections);
            }
            Message::Close { doc } => put_str16(out, doc),
            Message::Ping { nonce } | Message::Pong { nonce } => out.put_u64_le(*nonce),
            Message::Snapshot {
                doc,
                version,
                total_len,
                text,
            } => {
                put_str16(out, doc);
                out.put_u64_le(*version);
                out.put_u64_le(*total_len);
                put_str32(out, text);
            }
            Message::Ops { doc, more, ops } => {
                put_str16(out, doc);
                out.put_u8(u8::from(*more));
                out.put_u32_le(ops.len() as u32);
                for op in ops {
                    put_wire_op(out, op);
                }
            }
            Message::Ack {
                doc,
                local_seq,
                seq,
            } => put_ack_body(out, doc, *local_seq, *seq),
            Message::Reject {
                doc,
                local_seq,
                code,
                message,
            } => {
                put_str16(out, doc);
                out.put_u64_le(*local_seq);
                out.put_u16_le(code.to_u16());
                put_str16(out, bounded(message));
            }
            Message::Remote { doc, op } => {
                put_str16(out, doc);
                put_wire_op(out, op);
            }
            Message::PresenceState {
                doc,
                client_id,
                selections,
            } => {
                put_str16(out, doc);
                out.put_u64_le(*client_id);
                put_selections(out, selections);
            }
            Message::Reload { doc, reason } => {
                put_str16(out, doc);
                put_str16(out, bounded(reason));
            }
            Message::Redirect { doc, addr, ws_url } => {
                put_str16(out, doc);
                put_str16(out, addr);
                put_str16(out, ws_url);
            }
            Message::Error { code, message } => {
                out.put_u16_le(code.to_u16());
                put_str16(out, bounded(message));
            }
        }
    }

    /// Decodes a frame's content. Never panics.
    pub fn decode(frame: &[u8]) -> Result<Envelope, DecodeError> {
        let mut r = Reader(frame);
        let type_byte = r.u8()?;
        let request_id = r.u32()?;
        let message = match type_byte {
            0x01 => {
                if r.bytes(4)? != MAGIC {
                    return Err(DecodeError::new(
                        ErrorCode::HandshakeRequired,
                        "bad magic: not a quire client",
                    ));
                }
                Message::Hello {
                    version: r.u16()?,
                    client_id: r.u64()?,
                    token: r.str16()?,
                }
            }
            0x02 => Message::Welcome {
                version: r.u16()?,
                max_frame: r.u32()?,
                client_id: r.u64()?,
            },
            0x10 => Message::Open {
                doc: r.str16()?,
                known_version: r.u64()?,
            },
            0x11 => Message::Submit {
                doc: r.str16()?,
                local_seq: r.u64()?,
                base_version: r.u64()?,
                patches: r.patches()?,
            },
            0x12 => Message::Fetch {
                doc: r.str16()?,
                after_seq: r.u64()?,
                limit: r.u32()?,
            },
            0x13 => Message::Presence {
                doc: r.str16()?,
                selections: r.selections()?,
            },
            0x14 => Message::Close { doc: r.str16()? },
            0x15 => Message::Ping { nonce: r.u64()? },
            0x20 => Message::Snapshot {
                doc: r.str16()?,
                version: r.u64()?,
                total_len: r.u64()?,
                text: r.str32()?,
            },
            0x21 => {
                let doc = r.str16()?;
                let more = match r.u8()? {
                    0 => false,
                    1 => true,
                    b => {
                        return Err(DecodeError::new(
                            ErrorCode::Malformed,
                            format!("Ops: more flag {b} is not 0 or 1"),
                        ))
                    }
                };
                let n = r.count(28)?;
                let ops = (0..n).map(|_| r.wire_op()).collect::<Result<_, _>>()?;
                Message::Ops { doc, more, ops }
            }
            0x22 => Message::Ack {
                doc: r.str16()?,
                local_seq: r.u64()?,
                seq: r.u64()?,
            },
            0x23 => Message::Reject {
                doc: r.str16()?,
                local_seq: r.u64()?,
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            },
            0x24 => Message::Remote {
                doc: r.str16()?,
                op: r.wire_op()?,
            },
            0x25 => Message::PresenceState {
                doc: r.str16()?,
                client_id: r.u64()?,
                selections: r.selections()?,
            },
            0x26 => Message::Reload {
                doc: r.str16()?,
                reason: r.str16()?,
            },
            0x27 => Message::Pong { nonce: r.u64()? },
            0x28 => Message::Redirect {
                doc: r.str16()?,
                addr: r.str16()?,
                ws_url: r.str16()?,
            },
            0x7F => Message::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            },
            other => {
                return Err(DecodeError::new(
                    ErrorCode::UnknownType,
                    format!("unknown message type {other:#04x}"),
                ))
            }
        };
        if !r.0.is_empty() {
            return Err(DecodeError::new(
                ErrorCode::Malformed,
                format!("{} bytes left over after the message", r.0.len()),
            ));
        }
        Ok(Envelope {
            request_id,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let op = WireOp {
            seq: 3,
            client_id: 9,
            local_seq: 2,
            patches: vec![Patch::new(1, 2, "\u{1F600}")],
        };
        let sel = vec![Selection { anchor: 1, head: 4 }];
        let doc = "d/\u{e9}".to_string();
        vec![
            Message::Hello {
                version: 1,
                client_id: 5,
                token: "t".into(),
            },
            Message::Welcome {
                version: 2,
                max_frame: 1 << 20,
                client_id: 1 << 63,
            },
            Message::Open {
                doc: doc.clone(),
                known_version: 4,
            },
            Message::Submit {
                doc: doc.clone(),
                local_seq: 1,
                base_version: 2,
                patches: op.patches.clone(),
            },
            Message::Fetch {
                doc: doc.clone(),
                after_seq: 1,
                limit: 10,
            },
            Message::Presence {
                doc: doc.clone(),
                selections: sel.clone(),
            },
            Message::Close { doc: doc.clone() },
            Message::Ping { nonce: 8 },
            Message::Snapshot {
                doc: doc.clone(),
                version: 2,
                total_len: 9,
                text: "x\u{10348}".into(),
            },
            Message::Ops {
                doc: doc.clone(),
                more: true,
                ops: vec![op.clone(), op.clone()],
            },
            Message::Ack {
                doc: doc.clone(),
                local_seq: 1,
                seq: 7,
            },
            Message::Reject {
                doc: doc.clone(),
                local_seq: 1,
                code: ErrorCode::OutOfRange,
                message: "no".into(),
            },
            Message::Remote {
                doc: doc.clone(),
                op,
            },
            Message::PresenceState {
                doc: doc.clone(),
                client_id: 3,
                selections: sel,
            },
            Message::Reload {
                doc,
                reason: "gone".into(),
            },
            Message::Pong { nonce: 8 },
            Message::Redirect {
                doc: "d".into(),
                addr: "10.0.0.2:7420".into(),
                ws_url: "ws://10.0.0.2:7421/ws".into(),
            },
            Message::Redirect {
                doc: "d".into(),
                addr: "[::1]:7420".into(),
                ws_url: String::new(),
            },
            Message::Error {
                code: ErrorCode::Other(999),
                message: "?".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_an_error() {
        for (i, message) in all().into_iter().enumerate() {
            let env = Envelope {
                request_id: i as u32,
                message,
            };
            let bytes = env.encode();
            assert_eq!(Envelope::decode(&bytes).unwrap(), env);
            for cut in 0..bytes.len() {
                assert!(
                    Envelope::decode(&bytes[..cut]).is_err(),
                    "{env:?} cut at {cut}"
                );
            }
            let mut extra = bytes.clone();
            extra.push(0);
            assert_eq!(
                Envelope::decode(&extra).unwrap_err().code(),
                ErrorCode::Malformed
            );
        }
    }

    #[test]
    fn a_redirect_is_the_bytes_protocol_md_gives() {
        // protocol.md's example, byte for byte: a client in another language is
        // written from it.
        let bytes = Envelope {
            request_id: 7,
            message: Message::Redirect {
                doc: "a".into(),
                addr: "h:1".into(),
                ws_url: String::new(),
            },
        }
        .encode();
        assert_eq!(
            bytes,
            [0x28, 7, 0, 0, 0, 1, 0, b'a', 3, 0, b'h', b':', b'1', 0, 0]
        );
        assert_eq!(ErrorCode::from_u16(33), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::Unavailable.to_u16(), 33);
        assert!(!ErrorCode::Unavailable.closes_connection());
    }

    #[test]
    fn every_code_is_its_own_number_and_only_1_to_12_close_the_connection() {
        for n in 0..=u16::from(u8::MAX) {
            let code = ErrorCode::from_u16(n);
            assert_eq!(code.to_u16(), n, "{code:?}");
            assert_eq!(code.closes_connection(), (1..=12).contains(&n), "{code:?}");
        }
        assert_eq!(ErrorCode::from_u16(34), ErrorCode::TooManyOpen);
    }

    #[test]
    fn bad_utf8_unknown_types_and_bad_magic_get_their_codes() {
        let mut bytes = Envelope {
            request_id: 1,
            message: Message::Close { doc: "ab".into() },
        }
        .encode();
        let n = bytes.len();
        bytes[n - 1] = 0xFF;
        assert_eq!(
            Envelope::decode(&bytes).unwrap_err().code(),
            ErrorCode::BadUtf8
        );
        assert_eq!(
            Envelope::decode(&[0x55, 0, 0, 0, 0]).unwrap_err().code(),
            ErrorCode::UnknownType
        );
        let mut hello = Envelope {
            request_id: 0,
            message: Message::Hello {
                version: 1,
                client_id: 1,
                token: String::new(),
            },
        }
        .encode();
        hello[5] = b'X';
        assert_eq!(
            Envelope::decode(&hello).unwrap_err().code(),
            ErrorCode::HandshakeRequired
        );
    }
}
