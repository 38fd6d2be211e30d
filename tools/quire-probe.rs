//! quire-probe: probe a running quire server's limits with raw protocol frames.
//!
//! ```text
//! quire-probe big-op      --addr A --patches N --base-chars C [--bystander submit|ping]
//! quire-probe idle        --addr A --conns N [--hello] [--hold-secs S] [--pid PID]
//! quire-probe half-frames --addr A --conns N --bytes B [--pid PID]
//! quire-probe slow-reader --addr A --ops N --op-bytes K [--subscriber-reads] [--pid PID]
//! quire-probe docs        --addr A --conns N --docs M --chars C [--pid PID]
//! ```
//!
//! Each probe prints one summary line of `key=value` fields on stdout (notes go to
//! stderr). `--pid` names the server's process: its memory is read from
//! `/proc/PID/status` and printed as `VmRSS/RssAnon` in KiB (VmRSS counts the pages of
//! the mapped WAL too; per-connection figures use RssAnon).
//!
//! The probe has its own small codec (`protocol.md`) over blocking std sockets rather
//! than `quire::protocol`, so that it keeps working against a server that sends
//! messages this build does not know: it decodes only Welcome, Snapshot, Ops, Ack,
//! Reject, Pong and Error, and skips every other frame by its 4-byte length prefix
//! alone. A server that closes the connection, stops answering or answers with `Error`
//! is reported in the summary line, never a panic; every wait has a deadline.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};

// Message types (protocol.md).
const HELLO: u8 = 0x01;
const WELCOME: u8 = 0x02;
const OPEN: u8 = 0x10;
const SUBMIT: u8 = 0x11;
const PING: u8 = 0x15;
const SNAPSHOT: u8 = 0x20;
const OPS: u8 = 0x21;
const ACK: u8 = 0x22;
const REJECT: u8 = 0x23;
const PONG: u8 = 0x27;
const ERROR: u8 = 0x7F;
const MAGIC: &[u8; 4] = b"QUIR";
const PROTOCOL_VERSION: u16 = 2;

/// The types the probe decodes; any other frame is skipped by its length prefix.
const KEPT: [u8; 7] = [WELCOME, SNAPSHOT, OPS, ACK, REJECT, PONG, ERROR];
/// A kept frame longer than this is skipped too rather than buffered.
const KEPT_MAX_BYTES: usize = 64 << 20;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting, the handshake and opening documents, per probe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new client waits for Welcome when the probe checks the server still
/// takes clients.
const NEW_CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Opening every connection of the `idle` probe.
const OPEN_ALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive failed connections after which the `idle` probe stops opening more.
const CONSECUTIVE_FAILURES_MAX: u32 = 5;
/// One op or ping of the bystander, or one op of the slow reader's writer.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Characters per Submit of the big-op probe's base text.
const BASE_PIECE_CHARS: u64 = 8192;

#[derive(Parser)]
#[command(
    name = "quire-probe",
    about = "Probe a quire server's limits with raw protocol frames"
)]
struct Cli {
    #[command(subcommand)]
    probe: Probe,
}

#[derive(Args, Clone)]
struct Common {
    #[arg(long, default_value = "127.0.0.1:7420")]
    addr: SocketAddr,
    /// The access token to present (`quire token` mints one); empty for a server
    /// without a secret.
    #[arg(long, default_value = "", env = "QUIRE_TOKEN")]
    token: String,
    /// The server's process id: its VmRSS is read from /proc/PID/status.
    #[arg(long)]
    pid: Option<u32>,
    /// First client id used (default: from the clock, so that runs do not collide).
    #[arg(long)]
    client_base: Option<u64>,
}

#[derive(Subcommand)]
enum Probe {
    /// One Submit of many one-character inserts, timed to its reply, while a bystander
    /// on another document measures its own latency.
    BigOp(BigOpArgs),
    /// Many connections that send nothing (or only Hello), then: memory per connection,
    /// whether a new client still gets Welcome, how many the server closed.
    Idle(IdleArgs),
    /// Connections that announce a big frame and send all but 64 bytes of it.
    HalfFrames(HalfFramesArgs),
    /// A subscriber that never reads while a writer submits big ops to its document.
    SlowReader(SlowReaderArgs),
    /// Many connections keeping many written documents open: memory per connection and
    /// per open document, and what the server keeps once every connection is gone.
    Docs(DocsArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Bystander {
    /// One-character inserts to its own document, one in flight (durable: fsync).
    Submit,
    /// Ping round trips (no disk).
    Ping,
}

#[derive(Args)]
struct BigOpArgs {
    #[command(flatten)]
    common: Common,
    /// One-character inserts in the big Submit.
    #[arg(long, default_value_t = 60_000)]
    patches: u32,
    /// Characters of base text submitted first (in pieces).
    #[arg(long, default_value_t = 23_000)]
    base_chars: u64,
    /// Seed of the insert positions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value = "submit")]
    bystander: Bystander,
    /// The document (the bystander uses DOC-bystander).
    #[arg(long, default_value = "probe-x")]
    doc: String,
    /// How long to wait for the big op's reply.
    #[arg(long, default_value_t = 90)]
    timeout_secs: u64,
    /// Pause between the base text and the big op: on a fresh server the first op
    /// starts the background zero fill of the next WAL segment, which slows fsyncs.
    #[arg(long, default_value_t = 4)]
    settle_secs: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Complete the handshake on each connection, then stay idle.
    #[arg(long)]
    hello: bool,
    /// Wait this long before counting the connections the server still holds.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

#[derive(Args)]
struct HalfFramesArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 300)]
    conns: usize,
    /// The frame length announced; B - 64 bytes of the frame are sent.
    #[arg(long, default_value_t = (1 << 20) - 64)]
    bytes: u32,
    /// How long the half frames are held before the memory is read.
    #[arg(long, default_value_t = 1)]
    hold_secs: u64,
}

#[derive(Args)]
struct SlowReaderArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 200)]
    ops: u32,
    /// Bytes (ASCII characters) inserted by each op.
    #[arg(long, default_value_t = 500_000)]
    op_bytes: usize,
    #[arg(long, default_value = "probe-y")]
    doc: String,
    /// Control run: the subscriber reads everything as it comes (the memory the
    /// document itself costs, without a slow reader).
    #[arg(long)]
    subscriber_reads: bool,
    /// Bound on the writer's whole run.
    #[arg(long, default_value_t = 90)]
    timeout_secs: u64,
}

#[derive(Args)]
struct DocsArgs {
    #[command(flatten)]
    common: Common,
    /// Connections, each completing the handshake.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Documents: document j is opened, written once and kept open by connection
    /// j mod conns.
    #[arg(long, default_value_t = 10_000)]
    docs: usize,
    /// Characters (ASCII) written to each document by its one op.
    #[arg(long, default_value_t = 1_000)]
    chars: u64,
    /// Document ids are PREFIX-j.
    #[arg(long, default_value = "probe-d")]
    doc_prefix: String,
}

/// Why a connection could not do what the probe asked.
#[derive(Debug)]
enum Fail {
    /// The server closed the connection.
    Closed(&'static str),
    /// No answer before the deadline.
    Timeout,
    /// The server answered with `Error`.
    Server {
        code: u16,
        message: String,
    },
    /// Bytes that do not follow protocol.md.
    Protocol(String),
    Io(String),
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Closed(how) => write!(f, "closed by the server ({how})"),
            Fail::Timeout => write!(f, "no reply before the deadline"),
            Fail::Server { code, message } => write!(f, "Error code {code} {message:?}"),
            Fail::Protocol(m) => write!(f, "protocol violation: {m}"),
            Fail::Io(m) => write!(f, "{m}"),
        }
    }
}

fn io_fail(e: std::io::Error) -> Fail {
    match e.kind() {
        ErrorKind::BrokenPipe => Fail::Closed("broken pipe"),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Fail::Closed("reset"),
        ErrorKind::UnexpectedEof => Fail::Closed("EOF"),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Fail::Timeout,
        _ => Fail::Io(e.to_string()),
    }
}

// ---- encoding ----

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_str16(b: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("str16 longer than 65535 bytes");
    put_u16(b, len);
    b.extend_from_slice(s.as_bytes());
}
fn put_str32(b: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).expect("str32 longer than 4 GiB");
    put_u32(b, len);
    b.extend_from_slice(s.as_bytes());
}

/// A Submit body up to its patches; the caller appends exactly `patch_count` patches.
fn submit_header(doc: &str, local_seq: u64, base_version: u64, patch_count: u32) -> Vec<u8> {
    let mut b = Vec::new();
    put_str16(&mut b, doc);
    put_u64(&mut b, local_seq);
    put_u64(&mut b, base_version);
    put_u32(&mut b, patch_count);
    b
}

fn put_patch(b: &mut Vec<u8>, pos: u32, del: u32, ins: &str) {
    put_u32(b, pos);
    put_u32(b, del);
    put_str32(b, ins);
}

/// `len` ASCII letters, cycling from `offset`.
fn letters(offset: u64, len: u64) -> String {
    (0..len)
        .map(|i| (b'a' + ((offset + i) % 26) as u8) as char)
        .collect()
}

// ---- decoding ----

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Fail> {
        if self.bytes.len() < n {
            return Err(Fail::Protocol(format!(
                "a body ends {} bytes early",
                n - self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, Fail> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, Fail> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, Fail> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn text(&mut self, len: usize) -> Result<&'a str, Fail> {
        std::str::from_utf8(self.take(len)?).map_err(|_| Fail::Protocol("invalid UTF-8".into()))
    }
    fn str16(&mut self) -> Result<&'a str, Fail> {
        let len = self.u16()? as usize;
        self.text(len)
    }
    fn str32(&mut self) -> Result<&'a str, Fail> {
        let len = self.u32()? as usize;
        self.text(len)
    }
    /// Reads `patches`; returns the change of the text's length in code points.
    fn patches_len_delta(&mut self) -> Result<i64, Fail> {
        let count = self.u32()?;
        let mut delta = 0i64;
        for _ in 0..count {
            let _pos = self.u32()?;
            let del = self.u32()?;
            let ins = self.str32()?;
            delta += ins.chars().count() as i64 - i64::from(del);
        }
        Ok(delta)
    }
}

/// The server messages the probe reads (bodies may carry more bytes than these
/// fields: a newer server's extension is ignored, not refused).
#[derive(Debug)]
enum Reply {
    Welcome {
        max_frame: u32,
    },
    Snapshot {
        version: u64,
        chars: u64,
    },
    Ops {
        last_seq: Option<u64>,
        chars_delta: i64,
    },
    Ack {
        local_seq: u64,
        seq: u64,
    },
    Reject {
        local_seq: u64,
        code: u16,
        message: String,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: u16,
        message: String,
    },
}

fn decode(message_type: u8, body: &[u8]) -> Result<Reply, Fail> {
    let mut c = Cursor { bytes: body };
    Ok(match message_type {
        WELCOME => {
            let _version = c.u16()?;
            Reply::Welcome {
                max_frame: c.u32()?,
            }
        }
        SNAPSHOT => {
            let _doc = c.str16()?;
            let version = c.u64()?;
            let chars = c.str32()?.chars().count() as u64;
            Reply::Snapshot { version, chars }
        }
        OPS => {
            let _doc = c.str16()?;
            let count = c.u32()?;
            let (mut last_seq, mut chars_delta) = (None, 0);
            for _ in 0..count {
                last_seq = Some(c.u64()?);
                let _client_id = c.u64()?;
                let _local_seq = c.u64()?;
                chars_delta += c.patches_len_delta()?;
            }
            Reply::Ops {
                last_seq,
                chars_delta,
            }
        }
        ACK => {
            let _doc = c.str16()?;
            Reply::Ack {
                local_seq: c.u64()?,
                seq: c.u64()?,
            }
        }
        REJECT => {
            let _doc = c.str16()?;
            Reply::Reject {
                local_seq: c.u64()?,
                code: c.u16()?,
                message: c.str16()?.to_owned(),
            }
        }
        PONG => Reply::Pong { nonce: c.u64()? },
        ERROR => Reply::Error {
            code: c.u16()?,
            message: c.str16()?.to_owned(),
        },
        other => unreachable!("type {other:#04x} is not kept"),
    })
}

struct Frame {
    request_id: u32,
    reply: Reply,
}

enum Outcome {
    Acked { seq: u64 },
    Rejected { code: u16, message: String },
}

#[derive(Clone, Copy)]
struct DocState {
    version: u64,
    chars: u64,
}

/// One connection: a blocking socket and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of a skipped frame still to come.
    skip_bytes: u64,
    /// Frames skipped (types the probe does not read, such as Remote).
    skipped_frames: u64,
    request_last: u32,
}

impl Conn {
    fn connect(addr: SocketAddr) -> Result<Conn, Fail> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(io_fail)?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(io_fail)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            skip_bytes: 0,
            skipped_frames: 0,
            request_last: 0,
        })
    }

    /// Sends one frame; returns its request id. If the server closed the connection,
    /// the Error it may have sent first is returned instead.
    fn send(&mut self, message_type: u8, body: &[u8]) -> Result<u32, Fail> {
        self.request_last = self.request_last.wrapping_add(1).max(1);
        let len = u32::try_from(5 + body.len())
            .map_err(|_| Fail::Protocol("frame longer than 4 GiB".into()))?;
        let mut frame = Vec::with_capacity(9 + body.len());
        put_u32(&mut frame, len);
        frame.push(message_type);
        put_u32(&mut frame, self.request_last);
        frame.extend_from_slice(body);
        match self.stream.write_all(&frame) {
            Ok(()) => Ok(self.request_last),
            Err(e) => Err(self.why_closed(io_fail(e))),
        }
    }

    /// Writes raw bytes (a deliberately incomplete frame).
    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        self.stream
            .write_all(bytes)
            .map_err(|e| self.why_closed(io_fail(e)))
    }

    /// After a failed write: an Error the server sent before closing, if one arrived.
    fn why_closed(&mut self, fail: Fail) -> Fail {
        if !matches!(fail, Fail::Closed(_)) {
            return fail;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.recv(deadline) {
                Ok(Frame {
                    reply: Reply::Error { code, message },
                    ..
                }) => return Fail::Server { code, message },
                Ok(_) => continue,
                Err(_) => return fail,
            }
        }
    }

    /// Reads more bytes, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant) -> Result<(), Fail> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::Timeout);
        }
        self.stream.set_read_timeout(Some(left)).map_err(io_fail)?;
        // A chunk on the stack: the buffer of each of thousands of idle connections
        // stays as small as what it received.
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let read = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => Err(Fail::Closed("EOF")),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(io_fail(e)),
        }
    }

    /// The next frame of a kept type, skipping the others by their length prefix.
    fn recv(&mut self, deadline: Instant) -> Result<Frame, Fail> {
        loop {
            if self.skip_bytes > 0 {
                let n = self.skip_bytes.min(self.buf.len() as u64) as usize;
                self.buf.drain(..n);
                self.skip_bytes -= n as u64;
            }
            if self.skip_bytes == 0 && self.buf.len() >= 5 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4")) as usize;
                if len < 5 {
                    return Err(Fail::Protocol(format!("frame length {len} is below 5")));
                }
                let message_type = self.buf[4];
                if !KEPT.contains(&message_type) || len > KEPT_MAX_BYTES {
                    self.skipped_frames += 1;
                    self.skip_bytes = 4 + len as u64;
                    continue;
                }
                if self.buf.len() >= 4 + len {
                    let request_id = u32::from_le_bytes(self.buf[5..9].try_into().expect("4"));
                    let reply = decode(message_type, &self.buf[9..4 + len]);
                    self.buf.drain(..4 + len);
                    return Ok(Frame {
                        request_id,
                        reply: reply?,
                    });
                }
            }
            self.fill(deadline)?;
        }
    }

    fn hello(&mut self, client_id: u64, token: &str, deadline: Instant) -> Result<u32, Fail> {
        let mut body = MAGIC.to_vec();
        put_u16(&mut body, PROTOCOL_VERSION);
        put_u64(&mut body, client_id);
        put_str16(&mut body, token);
        self.send(HELLO, &body)?;
        loop {
            match self.recv(deadline)?.reply {
                Reply::Welcome { max_frame } => return Ok(max_frame),
                Reply::Error { code, message } => return Err(Fail::Server { code, message }),
                _ => {}
            }
        }
    }

    /// Opens `doc` from scratch: its version and length once the reply is complete.
    fn open(&mut self, doc: &str, deadline: Instant) -> Result<DocState, Fail> {
        let mut body = Vec::new();
        put_str16(&mut body, doc);
        put_u64(&mut body, 0);
        let rid = self.send(OPEN, &body)?;
        let mut state = DocState {
            version: 0,
            chars: 0,
        };
        loop {
            let frame = self.recv(deadline)?;
            match frame.reply {
                Reply::Snapshot { version, chars } if frame.request_id == rid => {
                    state = DocState { version, chars };
                }
                Reply::Ops {
                    last_seq,
                    chars_delta,
                } if frame.request_id == rid => {
                    state.version = state.version.max(last_seq.unwrap_or(0));
                    state.chars = (state.chars as i64 + chars_delta).max(0) as u64;
                    return Ok(state);
                }
                Reply::Error { code, message } => return Err(Fail::Server { code, message }),
                _ => {}
            }
        }
    }

    fn submit(&mut self, body: &[u8], local_seq: u64, deadline: Instant) -> Result<Outcome, Fail> {
        self.send(SUBMIT, body)?;
        self.outcome(local_seq, deadline)
    }

    /// Waits for the Ack or Reject of `local_seq`.
    fn outcome(&mut self, local_seq: u64, deadline: Instant) -> Result<Outcome, Fail> {
        loop {
            match self.recv(deadline)?.reply {
                Reply::Ack { local_seq: l, seq } if l == local_seq => {
                    return Ok(Outcome::Acked { seq })
                }
                Reply::Reject {
                    local_seq: l,
                    code,
                    message,
                } if l == local_seq => return Ok(Outcome::Rejected { code, message }),
                Reply::Error { code, message } => return Err(Fail::Server { code, message }),
                _ => {}
            }
        }
    }

    fn ping(&mut self, nonce: u64, deadline: Instant) -> Result<(), Fail> {
        let mut body = Vec::new();
        put_u64(&mut body, nonce);
        self.send(PING, &body)?;
        loop {
            match self.recv(deadline)?.reply {
                Reply::Pong { nonce: n } if n == nonce => return Ok(()),
                Reply::Error { code, message } => return Err(Fail::Server { code, message }),
                _ => {}
            }
        }
    }

    /// Without waiting: whether the server still holds the connection, and the code
    /// of an Error it sent, if any.
    fn state_now(&mut self) -> (bool, Option<u16>) {
        if self.stream.set_nonblocking(true).is_err() {
            return (false, None);
        }
        let mut closed = false;
        let mut chunk = [0u8; 4096];
        for _ in 0..64 {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let _ = self.stream.set_nonblocking(false);
        let mut code = None;
        // Only what is buffered: a deadline of now never reads the socket.
        while let Ok(frame) = self.recv(Instant::now()) {
            if let Reply::Error { code: c, .. } = frame.reply {
                code = Some(c);
            }
        }
        (!closed, code)
    }
}

/// Connects and completes the handshake.
fn connect_hello(addr: SocketAddr, client_id: u64, token: &str) -> Result<Conn, Fail> {
    let mut conn = Conn::connect(addr)?;
    conn.hello(client_id, token, Instant::now() + HELLO_TIMEOUT)?;
    Ok(conn)
}

/// How connections stand, counted.
#[derive(Default)]
struct Census {
    open: usize,
    closed: usize,
    error_codes: BTreeMap<u16, usize>,
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes: Vec<String> = self
            .error_codes
            .iter()
            .map(|(c, n)| format!("{c}x{n}"))
            .collect();
        write!(
            f,
            "open={} closed_by_server={} error_codes=[{}]",
            self.open,
            self.closed,
            codes.join(",")
        )
    }
}

fn census(conns: &mut [Conn]) -> Census {
    let mut census = Census::default();
    for conn in conns {
        let (open, code) = conn.state_now();
        if open {
            census.open += 1;
        } else {
            census.closed += 1;
        }
        if let Some(code) = code {
            *census.error_codes.entry(code).or_default() += 1;
        }
    }
    census
}

/// Whether a fresh client gets Welcome now, and what it got otherwise.
fn new_client(addr: SocketAddr, client_id: u64, token: &str) -> String {
    let started = Instant::now();
    let mut conn = match Conn::connect(addr) {
        Ok(conn) => conn,
        Err(e) => return format!("no(connect:{})", e.to_string().replace(' ', "_")),
    };
    match conn.hello(client_id, token, started + NEW_CLIENT_TIMEOUT) {
        Ok(_) => format!("yes({}ms)", started.elapsed().as_millis()),
        Err(Fail::Timeout) => format!(
            "no(connected,no_Welcome_in_{}s)",
            NEW_CLIENT_TIMEOUT.as_secs()
        ),
        Err(e) => format!("no({})", e.to_string().replace(' ', "_")),
    }
}

/// The server's memory, in KiB, from /proc/PID/status.
#[derive(Clone, Copy)]
struct Memory {
    /// VmRSS: resident, file-backed pages (the mapped WAL) included.
    rss: u64,
    /// RssAnon: resident heap and stacks.
    anon: u64,
    /// VmHWM: the peak of VmRSS.
    hwm: u64,
}

/// The server's memory, if `pid` is given and readable.
fn memory_kib(pid: Option<u32>) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        hwm: field("VmHWM:")?,
    })
}

/// "rss/anon" in KiB, or "-".
fn rss_text(m: Option<Memory>) -> String {
    m.map_or_else(|| "-".to_owned(), |m| format!("{}/{}", m.rss, m.anon))
}

/// The growth of RssAnon from `before` to `after`, in bytes per `n`, or "-".
fn per_item_bytes(before: Option<Memory>, after: Option<Memory>, n: usize) -> String {
    match (before, after) {
        (Some(b), Some(a)) if n > 0 => {
            format!("{}", (a.anon as i64 - b.anon as i64) * 1024 / n as i64)
        }
        _ => "-".to_owned(),
    }
}

fn client_base(given: Option<u64>) -> u64 {
    given.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // Room for a million clients below it.
        (nanos >> 20) << 20
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// splitmix64: deterministic positions from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn outcome_text(result: &Result<Outcome, Fail>) -> String {
    match result {
        Ok(Outcome::Acked { seq }) => format!("ack(seq={seq})"),
        Ok(Outcome::Rejected { code, message }) => {
            format!("reject(code={code},message={message:?})")
        }
        Err(Fail::Server { code, message }) => format!("error(code={code},message={message:?})"),
        Err(e) => format!("fail({e})"),
    }
}

// ---- big-op ----

#[derive(Default)]
struct BystanderReport {
    /// (sent at, latency) of every completed request.
    samples: Vec<(Instant, Duration)>,
    failure: Option<String>,
}

struct BystanderPlan {
    addr: SocketAddr,
    token: String,
    client_id: u64,
    doc: String,
    mode: Bystander,
    /// Set by the main thread to stop after the request in flight.
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    deadline: Instant,
}

fn bystander(plan: BystanderPlan) -> BystanderReport {
    let mut report = BystanderReport::default();
    if let Err(e) = bystander_loop(&plan, &mut report) {
        report.failure = Some(e);
    }
    plan.stop.store(true, Ordering::Relaxed);
    report
}

fn bystander_loop(plan: &BystanderPlan, report: &mut BystanderReport) -> Result<(), String> {
    let setup = Instant::now() + SETUP_TIMEOUT;
    let mut conn =
        connect_hello(plan.addr, plan.client_id, &plan.token).map_err(|e| format!("setup:{e}"))?;
    let mut version = match plan.mode {
        Bystander::Submit => conn
            .open(&plan.doc, setup)
            .map_err(|e| format!("open:{e}"))?,
        Bystander::Ping => DocState {
            version: 0,
            chars: 0,
        },
    }
    .version;
    let mut n = 0u64;
    while !plan.stop.load(Ordering::Relaxed) {
        n += 1;
        let sent = Instant::now();
        let deadline = (sent + OP_TIMEOUT).min(plan.deadline);
        let result = match plan.mode {
            Bystander::Submit => {
                let mut body = submit_header(&plan.doc, n, version, 1);
                put_patch(&mut body, 0, 0, "b");
                conn.submit(&body, n, deadline)
            }
            Bystander::Ping => conn
                .ping(n, deadline)
                .map(|()| Outcome::Acked { seq: version }),
        };
        match result {
            Ok(Outcome::Acked { seq }) => {
                version = seq;
                report.samples.push((sent, sent.elapsed()));
                plan.completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Outcome::Rejected { code, message }) => {
                return Err(format!("request {n} rejected: code {code} {message:?}"))
            }
            Err(e) => {
                return Err(format!(
                    "request {n} after {} ms: {e}",
                    sent.elapsed().as_millis()
                ))
            }
        }
    }
    Ok(())
}

fn big_op(a: &BigOpArgs) -> Result<String, String> {
    let c = &a.common;
    let base_id = client_base(c.client_base);
    let setup = Instant::now() + SETUP_TIMEOUT;
    let mut conn = connect_hello(c.addr, base_id, &c.token).map_err(|e| format!("connect:{e}"))?;
    let mut doc = conn.open(&a.doc, setup).map_err(|e| format!("open:{e}"))?;
    let mut local_seq = 0u64;
    let mut remaining = a.base_chars;
    while remaining > 0 {
        let piece = remaining.min(BASE_PIECE_CHARS);
        local_seq += 1;
        let mut body = submit_header(&a.doc, local_seq, doc.version, 1);
        put_patch(&mut body, doc.chars as u32, 0, &letters(doc.chars, piece));
        match conn.submit(&body, local_seq, setup) {
            Ok(Outcome::Acked { seq }) => {
                doc.version = seq;
                doc.chars += piece;
            }
            other => return Err(format!("base_text:{}", outcome_text(&other))),
        }
        remaining -= piece;
    }

    thread::sleep(Duration::from_secs(a.settle_secs));
    local_seq += 1;
    let mut rng = Rng(a.seed);
    let mut body = submit_header(&a.doc, local_seq, doc.version, a.patches);
    // Patch i applies to the text as the patches before it left it: doc.chars + i long.
    for len in (doc.chars..).take(a.patches as usize) {
        let pos = rng.next() % (len + 1);
        let ins = letters(rng.next(), 1);
        put_patch(&mut body, pos as u32, 0, &ins);
    }
    let frame_bytes = 9 + body.len();

    let timeout = Duration::from_secs(a.timeout_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let plan = BystanderPlan {
        addr: c.addr,
        token: c.token.clone(),
        client_id: base_id + 1,
        doc: format!("{}-bystander", a.doc),
        mode: a.bystander,
        stop: stop.clone(),
        completed: completed.clone(),
        deadline: Instant::now() + timeout + OP_TIMEOUT + SETUP_TIMEOUT,
    };
    let handle = thread::spawn(move || bystander(plan));
    // Start once the bystander runs (or has given up).
    let warm = Instant::now() + Duration::from_secs(5);
    while completed.load(Ordering::Relaxed) < 20
        && !stop.load(Ordering::Relaxed)
        && Instant::now() < warm
    {
        thread::sleep(Duration::from_millis(5));
    }

    let memory_before = memory_kib(c.pid);
    let started = Instant::now();
    let result = conn
        .send(SUBMIT, &body)
        .map(|_| Instant::now())
        .and_then(|sent| {
            conn.outcome(local_seq, started + timeout)
                .map(|o| (sent, o))
        });
    let finished = Instant::now();
    let memory_after = memory_kib(c.pid);
    stop.store(true, Ordering::Relaxed);
    let report = handle.join().unwrap_or_else(|_| BystanderReport {
        failure: Some("bystander thread panicked".into()),
        ..Default::default()
    });

    let (send_ms, outcome) = match result {
        Ok((sent, o)) => (
            format!("{:.1}", (sent - started).as_secs_f64() * 1e3),
            Ok(o),
        ),
        Err(e) => ("-".to_owned(), Err(e)),
    };
    // Requests whose time in flight overlaps the big op's wait.
    let mut window: Vec<u64> = report
        .samples
        .iter()
        .filter(|(sent, latency)| *sent <= finished && *sent + *latency >= started)
        .map(|(_, latency)| latency.as_micros() as u64)
        .collect();
    window.sort_unstable();
    let mode = match a.bystander {
        Bystander::Submit => "submit",
        Bystander::Ping => "ping",
    };
    Ok(format!(
        "big-op patches={} base_chars={} frame_bytes={frame_bytes} result={} wait_ms={:.1} \
         send_ms={send_ms} rss_anon_kib={}->{} | bystander={mode} in_window={} p50_us={} p99_us={} \
         max_us={} total={} bystander_error={}",
        a.patches,
        a.base_chars,
        outcome_text(&outcome),
        (finished - started).as_secs_f64() * 1e3,
        rss_text(memory_before),
        rss_text(memory_after),
        window.len(),
        percentile(&window, 50.0),
        percentile(&window, 99.0),
        window.last().copied().unwrap_or(0),
        report.samples.len(),
        report
            .failure
            .map_or_else(|| "-".to_owned(), |f| format!("{f:?}")),
    ))
}

// ---- idle ----

fn idle(a: &IdleArgs) -> Result<String, String> {
    let c = &a.common;
    let base_id = client_base(c.client_base);
    let memory_before = memory_kib(c.pid);
    let started = Instant::now();
    let open_deadline = started + OPEN_ALL_TIMEOUT;
    let mut conns = Vec::with_capacity(a.conns);
    let (mut failures, mut consecutive) = (0usize, 0u32);
    let mut first_failure: Option<String> = None;
    for i in 0..a.conns {
        if Instant::now() >= open_deadline || consecutive >= CONSECUTIVE_FAILURES_MAX {
            break;
        }
        let result = if a.hello {
            connect_hello(c.addr, base_id + i as u64, &c.token)
        } else {
            Conn::connect(c.addr)
        };
        match result {
            Ok(conn) => {
                conns.push(conn);
                consecutive = 0;
            }
            Err(e) => {
                failures += 1;
                consecutive += 1;
                first_failure.get_or_insert_with(|| format!("#{i}:{e}"));
            }
        }
    }
    let open_ms = started.elapsed().as_millis();
    eprintln!("idle: {} connections open after {open_ms} ms", conns.len());
    thread::sleep(Duration::from_secs(1));
    let memory_held = memory_kib(c.pid);
    let newcomer = new_client(c.addr, base_id + a.conns as u64, &c.token);
    thread::sleep(Duration::from_secs(a.hold_secs));
    let standing = census(&mut conns);
    let held = conns.len();
    drop(conns);
    thread::sleep(Duration::from_secs(2));
    let memory_after = memory_kib(c.pid);
    let newcomer_after = new_client(c.addr, base_id + a.conns as u64 + 1, &c.token);
    Ok(format!(
        "idle mode={} conns={} opened={held} failures={failures} first_failure={:?} \
         open_ms={open_ms} rss_anon_kib={}->{}->{} per_conn_bytes={} new_client={newcomer} \
         after_hold_{}s:{standing} new_client_after_close={newcomer_after}",
        if a.hello { "hello" } else { "plain" },
        a.conns,
        first_failure.unwrap_or_else(|| "-".into()),
        rss_text(memory_before),
        rss_text(memory_held),
        rss_text(memory_after),
        per_item_bytes(memory_before, memory_held, held),
        a.hold_secs,
    ))
}

// ---- half-frames ----

fn half_frames(a: &HalfFramesArgs) -> Result<String, String> {
    let c = &a.common;
    let base_id = client_base(c.client_base);
    // The length field announces `bytes`; the type, request id and body follow, all
    // but the last 64 bytes of them.
    let sent_len = (a.bytes as usize).saturating_sub(64).max(5);
    let mut partial = Vec::with_capacity(4 + sent_len);
    put_u32(&mut partial, a.bytes);
    partial.push(SUBMIT);
    put_u32(&mut partial, 1);
    partial.resize(4 + sent_len, 0);

    let memory_before = memory_kib(c.pid);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(a.conns);
    let mut failures = 0usize;
    let mut first_failure: Option<String> = None;
    for i in 0..a.conns {
        if Instant::now() >= started + OPEN_ALL_TIMEOUT {
            break;
        }
        let result = connect_hello(c.addr, base_id + i as u64, &c.token).and_then(|mut conn| {
            conn.send_raw(&partial)?;
            Ok(conn)
        });
        match result {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert_with(|| format!("#{i}:{e}"));
            }
        }
    }
    let send_ms = started.elapsed().as_millis();
    thread::sleep(Duration::from_secs(a.hold_secs));
    let memory_held = memory_kib(c.pid);
    let standing = census(&mut conns);
    let held = conns.len();
    drop(conns);
    thread::sleep(Duration::from_secs(2));
    let memory_after = memory_kib(c.pid);
    Ok(format!(
        "half-frames conns={} frame_len={} body_bytes_sent={} held={held} failures={failures} \
         first_failure={:?} send_ms={send_ms} rss_anon_kib={}->{}->{} held_per_conn_bytes={} \
         after_{}s:{standing} hwm_kib={}",
        a.conns,
        a.bytes,
        sent_len,
        first_failure.unwrap_or_else(|| "-".into()),
        rss_text(memory_before),
        rss_text(memory_held),
        rss_text(memory_after),
        per_item_bytes(memory_before, memory_held, held),
        a.hold_secs,
        memory_after.map_or_else(|| "-".into(), |m| m.hwm.to_string()),
    ))
}

// ---- slow-reader ----

/// How the subscriber that never read stands once it reads: its state, the Remote
/// frames it got, and the Error it got, if any.
fn drain_subscriber(sub: &mut Conn) -> (String, Option<String>) {
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let mut error = None;
    let state = loop {
        let deadline = (Instant::now() + Duration::from_secs(3)).min(drain_deadline);
        match sub.recv(deadline) {
            Ok(Frame {
                reply: Reply::Error { code, message },
                ..
            }) => error = Some(format!("code={code},message={message:?}")),
            Ok(_) => {}
            Err(Fail::Timeout) if Instant::now() >= drain_deadline => {
                break "open(drain_incomplete_after_30s)".to_owned()
            }
            Err(Fail::Timeout) => break "open".to_owned(),
            Err(Fail::Closed(how)) => break format!("disconnected({how})"),
            Err(e) => break format!("failed({e})"),
        }
    };
    (state, error)
}

/// Reads (and skips) everything that arrives until `stop` is set or the connection
/// ends; `drain_subscriber` then says how it stands.
fn read_until(mut sub: Conn, stop: &AtomicBool) -> Conn {
    while !stop.load(Ordering::Relaxed) {
        match sub.recv(Instant::now() + Duration::from_millis(100)) {
            Ok(_) | Err(Fail::Timeout) => {}
            Err(_) => break,
        }
    }
    sub
}

fn slow_reader(a: &SlowReaderArgs) -> Result<String, String> {
    let c = &a.common;
    let base_id = client_base(c.client_base);
    let setup = Instant::now() + SETUP_TIMEOUT;
    let mut sub = connect_hello(c.addr, base_id, &c.token).map_err(|e| format!("sub:{e}"))?;
    sub.open(&a.doc, setup)
        .map_err(|e| format!("sub_open:{e}"))?;
    let mut writer =
        connect_hello(c.addr, base_id + 1, &c.token).map_err(|e| format!("writer:{e}"))?;
    let mut version = writer
        .open(&a.doc, setup)
        .map_err(|e| format!("writer_open:{e}"))?
        .version;
    let text = letters(0, a.op_bytes as u64);

    let stop = Arc::new(AtomicBool::new(false));
    // The subscriber: kept unread here, or read by a thread (the control run).
    let (unread, reader) = if a.subscriber_reads {
        let stop = stop.clone();
        (None, Some(thread::spawn(move || read_until(sub, &stop))))
    } else {
        (Some(sub), None)
    };
    let memory_before = memory_kib(c.pid);
    let mut anon_peak = memory_before.map_or(0, |m| m.anon);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.timeout_secs);
    let (mut acked, mut rejected) = (0u32, 0u32);
    let mut first_reject: Option<String> = None;
    let mut writer_stop: Option<String> = None;
    let mut latencies_us = Vec::new();
    for n in 1..=u64::from(a.ops) {
        let mut body = submit_header(&a.doc, n, version, 1);
        put_patch(&mut body, 0, 0, &text);
        let sent = Instant::now();
        match writer.submit(&body, n, (sent + OP_TIMEOUT).min(deadline)) {
            Ok(Outcome::Acked { seq }) => {
                version = seq;
                acked += 1;
                latencies_us.push(sent.elapsed().as_micros() as u64);
            }
            Ok(Outcome::Rejected { code, message }) => {
                rejected += 1;
                first_reject.get_or_insert_with(|| format!("op{n}:code={code},{message:?}"));
            }
            Err(e) => {
                writer_stop = Some(format!("op{n}:{e}"));
                break;
            }
        }
        if let Some(m) = memory_kib(c.pid) {
            anon_peak = anon_peak.max(m.anon);
        }
    }
    let writer_ms = started.elapsed().as_millis();
    thread::sleep(Duration::from_secs(1));
    let memory_held = memory_kib(c.pid);
    stop.store(true, Ordering::Relaxed);
    let (mut sub, mode) = match (unread, reader) {
        (Some(sub), _) => (sub, "never_read"),
        (None, Some(handle)) => match handle.join() {
            Ok(sub) => (sub, "read"),
            Err(_) => return Err("the subscriber's thread panicked".into()),
        },
        (None, None) => unreachable!("the subscriber is kept or read"),
    };
    let (sub_state, sub_error) = drain_subscriber(&mut sub);
    let remotes = sub.skipped_frames;
    drop(sub);
    drop(writer);
    thread::sleep(Duration::from_secs(2));
    let memory_after = memory_kib(c.pid);
    latencies_us.sort_unstable();
    Ok(format!(
        "slow-reader ops={} op_bytes={} acked={acked} rejected={rejected} first_reject={:?} \
         writer_stop={:?} writer_ms={writer_ms} ack_p50_ms={:.1} ack_max_ms={:.1} \
         rss_anon_kib={}->held:{}->after_close:{} anon_peak_kib={anon_peak} \
         anon_growth_kib={} subscriber={mode}:{sub_state} sub_error={} sub_remotes_read={remotes}",
        a.ops,
        a.op_bytes,
        first_reject.unwrap_or_else(|| "-".into()),
        writer_stop.unwrap_or_else(|| "-".into()),
        percentile(&latencies_us, 50.0) as f64 / 1e3,
        latencies_us.last().copied().unwrap_or(0) as f64 / 1e3,
        rss_text(memory_before),
        rss_text(memory_held),
        rss_text(memory_after),
        match (memory_before, memory_held) {
            (Some(b), Some(h)) => (h.anon as i64 - b.anon as i64).to_string(),
            _ => "-".into(),
        },
        sub_error.unwrap_or_else(|| "-".into()),
    ))
}

// ---- docs ----

/// Documents opened and written at once (each on a different connection), so that
/// their ops share fsyncs.
const DOCS_BATCH: usize = 256;
/// Opening and writing every document of the `docs` probe. Below the server's idle
/// deadline (60 s), which would close the connections that wait.
const DOCS_ALL_TIMEOUT: Duration = Duration::from_secs(50);

fn docs(a: &DocsArgs) -> Result<String, String> {
    let c = &a.common;
    if a.conns == 0 {
        return Err("--conns must be at least 1".into());
    }
    let base_id = client_base(c.client_base);
    let memory_before = memory_kib(c.pid);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        if started.elapsed() >= OPEN_ALL_TIMEOUT {
            return Err(format!(
                "{} connections after {OPEN_ALL_TIMEOUT:?}",
                conns.len()
            ));
        }
        let conn = connect_hello(c.addr, base_id + i as u64, &c.token)
            .map_err(|e| format!("connection #{i}: {e}"))?;
        conns.push(conn);
    }
    let conns_ms = started.elapsed().as_millis();
    eprintln!("docs: {} connections after {conns_ms} ms", conns.len());
    thread::sleep(Duration::from_secs(1));
    let memory_conns = memory_kib(c.pid);

    let started_docs = Instant::now();
    let deadline = started_docs + DOCS_ALL_TIMEOUT;
    let text = letters(0, a.chars);
    let batch = DOCS_BATCH.min(a.conns);
    let mut written = 0usize;
    for first in (0..a.docs).step_by(batch) {
        let last = (first + batch).min(a.docs);
        // Open and Submit pipelined: the session handles Open first, so the op's base
        // (version 0, a new document) is what the connection has.
        for j in first..last {
            let doc = format!("{}-{j}", a.doc_prefix);
            let conn = &mut conns[j % a.conns];
            let mut open = Vec::new();
            put_str16(&mut open, &doc);
            put_u64(&mut open, 0);
            conn.send(OPEN, &open)
                .map_err(|e| format!("open of document #{j}: {e}"))?;
            let mut submit = submit_header(&doc, 1, 0, 1);
            put_patch(&mut submit, 0, 0, &text);
            conn.send(SUBMIT, &submit)
                .map_err(|e| format!("submit to document #{j}: {e}"))?;
        }
        for j in first..last {
            match conns[j % a.conns].outcome(1, deadline) {
                Ok(Outcome::Acked { .. }) => written += 1,
                other => {
                    return Err(format!(
                        "document #{j} after {written} written: {}",
                        outcome_text(&other)
                    ))
                }
            }
        }
    }
    let docs_ms = started_docs.elapsed().as_millis();
    eprintln!("docs: {written} documents written after {docs_ms} ms");
    thread::sleep(Duration::from_secs(1));
    let memory_docs = memory_kib(c.pid);
    let standing = census(&mut conns);
    drop(conns);
    thread::sleep(Duration::from_secs(2));
    let memory_closed = memory_kib(c.pid);
    Ok(format!(
        "docs conns={} docs={} chars={} written={written} conns_ms={conns_ms} docs_ms={docs_ms} \
         rss_anon_kib={}->{}->{}->{} per_conn_bytes={} per_doc_bytes={} \
         kept_after_close_per_doc_bytes={} peak_rss_kib={} {standing}",
        a.conns,
        a.docs,
        a.chars,
        rss_text(memory_before),
        rss_text(memory_conns),
        rss_text(memory_docs),
        rss_text(memory_closed),
        per_item_bytes(memory_before, memory_conns, a.conns),
        per_item_bytes(memory_conns, memory_docs, written),
        per_item_bytes(memory_before, memory_closed, written),
        memory_docs.map_or_else(|| "-".to_owned(), |m| m.hwm.to_string()),
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match &cli.probe {
        Probe::BigOp(a) => ("big-op", big_op(a)),
        Probe::Idle(a) => ("idle", idle(a)),
        Probe::HalfFrames(a) => ("half-frames", half_frames(a)),
        Probe::SlowReader(a) => ("slow-reader", slow_reader(a)),
        Probe::Docs(a) => ("docs", docs(a)),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{name} setup_failed={e:?}");
            ExitCode::FAILURE
        }
    }
}
