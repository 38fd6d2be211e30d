//! The simulated network: in-memory connections with latency, bounded buffers (a
//! reader that does not read holds its writer back, as TCP's windows do), and cuts.
//! A connection's server end is the server's `Transport` (a TCP client's), or a byte
//! stream for the HTTP layer to read and upgrade (a WebSocket client's).
//!
//! Written here rather than taken from turmoil: the server already reads through its own
//! `Transport` seam (readiness, then a non-blocking read, so idle connections hold no
//! buffer), which turmoil's `TcpStream` would need an adapter for anyway, and time comes
//! from tokio's paused clock, which turmoil would replace with its own. What is modelled:
//! per connection, bytes arrive in order after a latency drawn per write (so messages on
//! different connections overtake each other), writers wait while `capacity` bytes are
//! unread, a cut loses what is in flight and fails both ends, and a stall delivers
//! nothing and fails nothing (a silent network: packets dropped, no reset), until it
//! ends, when what was held arrives, or for ever (the ends learn of it only by their
//! own deadlines).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quire::client::websocket::WsStream;
use quire::server::transport::{Listener, ReadHalf, Transport, WriteHalf};
use quire::wal::vfs::sim::SplitMix;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// One direction of a connection.
struct Pipe {
    /// Written, not yet read: when each piece arrives, and the piece.
    queue: VecDeque<(Instant, Bytes)>,
    unread: usize,
    /// The writer is done (after what is queued, the reader sees the end).
    closed: bool,
    /// Cut: both ends fail at once; what was queued is lost.
    reset: bool,
    /// Stalled: nothing arrives, and neither end learns of anything the other does (its
    /// close, its going away) until the stall ends.
    stalled: bool,
    reader_gone: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// Latency of each write, drawn from this connection's own generator.
    rng: SplitMix,
    min_latency_us: u64,
    max_latency_us: u64,
    capacity: usize,
    last_arrival: Option<Instant>,
}

type Shared = Arc<Mutex<Pipe>>;

fn lock(p: &Shared) -> std::sync::MutexGuard<'_, Pipe> {
    p.lock().unwrap()
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

/// What a reader finds now.
enum Ready {
    Data,
    End,
    Reset,
    /// Nothing yet; the next piece arrives then (if any is on its way).
    Wait(Option<Instant>),
}

impl Pipe {
    fn ready(&self, now: Instant) -> Ready {
        if self.reset {
            return Ready::Reset;
        }
        if self.stalled {
            return Ready::Wait(None);
        }
        match self.queue.front() {
            Some((at, _)) if *at <= now => Ready::Data,
            Some((at, _)) => Ready::Wait(Some(*at)),
            None if self.closed => Ready::End,
            None => Ready::Wait(None),
        }
    }

    /// Moves what has arrived into `out` (up to `max` bytes).
    fn take(&mut self, now: Instant, max: usize, out: &mut impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < max {
            let Some((at, piece)) = self.queue.front_mut() else {
                break;
            };
            if *at > now {
                break;
            }
            let k = piece.len().min(max - n);
            out(&piece[..k]);
            piece.advance(k);
            n += k;
            if piece.is_empty() {
                self.queue.pop_front();
            }
        }
        self.unread -= n;
        if n > 0 {
            wake(&mut self.write_waker);
        }
        n
    }

    fn write(&mut self, buf: &[u8], cx: Option<&mut Context<'_>>) -> Poll<io::Result<usize>> {
        if self.reset || (self.reader_gone && !self.stalled) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.closed {
            return Poll::Ready(Err(io::Error::other("write after shutdown")));
        }
        let room = self.capacity.saturating_sub(self.unread);
        if room == 0 {
            return match cx {
                Some(cx) => {
                    self.write_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                None => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
            };
        }
        let n = room.min(buf.len());
        let at = self.arrival();
        self.queue
            .push_back((at, Bytes::copy_from_slice(&buf[..n])));
        self.unread += n;
        wake(&mut self.read_waker);
        Poll::Ready(Ok(n))
    }

    /// When a piece sent now arrives: after a latency drawn for it, and not before the
    /// piece sent before it (in order within a connection, as TCP delivers).
    fn arrival(&mut self) -> Instant {
        let span = self.max_latency_us - self.min_latency_us;
        let latency = self.min_latency_us + self.rng.below(span + 1);
        let mut at = Instant::now() + Duration::from_micros(latency);
        if let Some(last) = self.last_arrival {
            at = at.max(last);
        }
        self.last_arrival = Some(at);
        at
    }

    /// Stalls this direction, or ends its stall: what it held then arrives in order,
    /// each piece after a latency from now, and each end learns what the other did
    /// meanwhile (its reader gone: the writer's next write fails).
    fn stall(&mut self, stalled: bool) {
        let was = std::mem::replace(&mut self.stalled, stalled);
        if was && !stalled {
            self.last_arrival = None;
            for i in 0..self.queue.len() {
                let at = self.arrival();
                self.queue[i].0 = at;
            }
            wake(&mut self.read_waker);
            wake(&mut self.write_waker);
        }
    }
}

/// Settings of the connections a [`Network`] makes.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    pub min_latency: Duration,
    pub max_latency: Duration,
    /// Unread bytes a direction holds before its writer waits.
    pub capacity: usize,
}

fn pipe(rng: &mut SplitMix, link: LinkConfig) -> Shared {
    Arc::new(Mutex::new(Pipe {
        queue: VecDeque::new(),
        unread: 0,
        closed: false,
        reset: false,
        stalled: false,
        reader_gone: false,
        read_waker: None,
        write_waker: None,
        rng: SplitMix(rng.next_u64()),
        min_latency_us: link.min_latency.as_micros() as u64,
        max_latency_us: link.max_latency.as_micros() as u64,
        capacity: link.capacity,
        last_arrival: None,
    }))
}

/// Both directions of one connection; held by the simulator to cut it.
#[derive(Clone)]
pub struct Wire {
    to_server: Shared,
    to_client: Shared,
}

impl Wire {
    /// A connection: the server's end, the client's end, and the wire itself.
    pub fn new(rng: &mut SplitMix, link: LinkConfig) -> (ServerEnd, StreamEnd, Wire) {
        let wire = Wire::pipes(rng, link);
        (ServerEnd(Some(wire.clone())), wire.client_end(), wire)
    }

    /// A connection whose server end is a byte stream too: one to the server's HTTP
    /// listener (a WebSocket client's), served by the HTTP layer before its session.
    pub fn streams(rng: &mut SplitMix, link: LinkConfig) -> (StreamEnd, StreamEnd, Wire) {
        let wire = Wire::pipes(rng, link);
        let server = StreamEnd {
            rx: wire.to_server.clone(),
            tx: wire.to_client.clone(),
            sleep: None,
        };
        (server, wire.client_end(), wire)
    }

    fn pipes(rng: &mut SplitMix, link: LinkConfig) -> Wire {
        Wire {
            to_server: pipe(rng, link),
            to_client: pipe(rng, link),
        }
    }

    fn client_end(&self) -> StreamEnd {
        StreamEnd {
            rx: self.to_client.clone(),
            tx: self.to_server.clone(),
            sleep: None,
        }
    }

    /// Stalls both directions (nothing arrives, neither end is told anything), or ends
    /// the stall (see [`Pipe::stall`]).
    pub fn stall(&self, stalled: bool) {
        for p in [&self.to_server, &self.to_client] {
            lock(p).stall(stalled);
        }
    }

    /// Whether the client still holds its end (it has not dropped it, and the wire was
    /// not cut).
    pub fn client_holds(&self) -> bool {
        let p = lock(&self.to_client);
        !p.reader_gone && !p.reset
    }

    /// The server's end is gone (its process ended), as when a [`ServerEnd`] is
    /// dropped: the client reads what was sent, then the end of the stream, and its
    /// writes fail (a stalled connection's client learns it only when the stall ends);
    /// whatever still holds the server's end can write nothing more.
    pub fn server_gone(&self) {
        close(&self.to_client);
        let mut p = lock(&self.to_server);
        p.reader_gone = true;
        wake(&mut p.write_waker);
    }

    /// Cuts the connection: bytes in flight are lost, both ends get errors.
    pub fn cut(&self) {
        for p in [&self.to_server, &self.to_client] {
            let mut p = lock(p);
            p.reset = true;
            p.queue.clear();
            p.unread = 0;
            wake(&mut p.read_waker);
            wake(&mut p.write_waker);
        }
    }
}

/// The server's side of a connection.
pub struct ServerEnd(Option<Wire>);

pub struct ServerReader(Shared);

pub struct ServerWriter(Shared);

impl Transport for ServerEnd {
    type Reader = ServerReader;
    type Writer = ServerWriter;

    fn into_split(mut self) -> (ServerReader, ServerWriter) {
        let wire = self.0.take().expect("split once");
        (ServerReader(wire.to_server), ServerWriter(wire.to_client))
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let wire = self.0.as_ref().expect("not split");
        match lock(&wire.to_client).write(buf, None) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("no context, no waiting"),
        }
    }
}

impl Drop for ServerEnd {
    fn drop(&mut self) {
        // Dropped unsplit (a refused connection): both directions end.
        if let Some(wire) = self.0.take() {
            close(&wire.to_client);
            let mut p = lock(&wire.to_server);
            p.reader_gone = true;
            wake(&mut p.write_waker);
        }
    }
}

/// Waits until `pipe` is readable (data arrived, its end, or a cut).
async fn readable(pipe: &Shared) -> io::Result<()> {
    loop {
        let ready = lock(pipe).ready(Instant::now());
        match ready {
            Ready::Data | Ready::End | Ready::Reset => return Ok(()),
            Ready::Wait(Some(at)) => tokio::time::sleep_until(at).await,
            Ready::Wait(None) => {
                std::future::poll_fn(|cx| {
                    let mut p = lock(pipe);
                    match p.ready(Instant::now()) {
                        Ready::Wait(None) => {
                            p.read_waker = Some(cx.waker().clone());
                            Poll::Pending
                        }
                        _ => Poll::Ready(()),
                    }
                })
                .await
            }
        }
    }
}

impl ReadHalf for ServerReader {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        readable(&self.0)
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut p = lock(&self.0);
        match p.ready(Instant::now()) {
            Ready::Reset => Err(io::ErrorKind::ConnectionReset.into()),
            Ready::End => Ok(0),
            Ready::Wait(_) => Err(io::ErrorKind::WouldBlock.into()),
            Ready::Data => {
                let room = buf.capacity() - buf.len();
                let room = if room == 0 { 8192 } else { room };
                Ok(p.take(Instant::now(), room, &mut |b| buf.extend_from_slice(b)))
            }
        }
    }
}

impl Drop for ServerReader {
    fn drop(&mut self) {
        let mut p = lock(&self.0);
        p.reader_gone = true;
        wake(&mut p.write_waker);
    }
}

fn close(pipe: &Shared) {
    let mut p = lock(pipe);
    p.closed = true;
    wake(&mut p.read_waker);
}

impl WriteHalf for ServerWriter {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match lock(&self.0).write(buf, None) {
            Poll::Ready(r) => r,
            Poll::Pending => unreachable!("no context, no waiting"),
        }
    }
}

impl AsyncWrite for ServerWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        lock(&self.0).write(buf, Some(cx))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        close(&self.0);
        Poll::Ready(Ok(()))
    }
}

impl Drop for ServerWriter {
    fn drop(&mut self) {
        close(&self.0);
    }
}

/// One end of a connection as a byte stream: a client's, or the server's end of a
/// connection to its HTTP listener (which reads and writes it as a byte stream before
/// the WebSocket upgrade hands it to a session).
pub struct StreamEnd {
    /// The direction it reads.
    rx: Shared,
    /// The direction it writes.
    tx: Shared,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl AsyncRead for StreamEnd {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let now = Instant::now();
        let pipe = self.rx.clone();
        let mut p = lock(&pipe);
        match p.ready(now) {
            Ready::Reset => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            Ready::End => Poll::Ready(Ok(())),
            Ready::Data => {
                let max = buf.remaining();
                p.take(now, max, &mut |b| buf.put_slice(b));
                Poll::Ready(Ok(()))
            }
            Ready::Wait(at) => {
                p.read_waker = Some(cx.waker().clone());
                drop(p);
                if let Some(at) = at {
                    let sleep = self
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    sleep.as_mut().reset(at);
                    if sleep.as_mut().poll(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                }
                Poll::Pending
            }
        }
    }
}

use std::future::Future as _;

impl AsyncWrite for StreamEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        lock(&self.tx).write(buf, Some(cx))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        close(&self.tx);
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        close(&self.tx);
        let mut p = lock(&self.rx);
        p.reader_gone = true;
        wake(&mut p.write_waker);
    }
}

/// Connections handed to one server incarnation.
pub struct SimListener(pub mpsc::UnboundedReceiver<ServerEnd>);

impl Listener for SimListener {
    type Conn = ServerEnd;

    async fn accept(&mut self) -> io::Result<(ServerEnd, String)> {
        match self.0.recv().await {
            Some(end) => Ok((end, "sim".into())),
            // Nobody can connect any more: this incarnation is being torn down.
            None => std::future::pending().await,
        }
    }
}

/// A client's connection: TCP's byte stream, or frames in WebSocket messages over a
/// connection to the server's HTTP listener (protocol.md, "WebSocket").
pub type SimConn = tokio_util::either::Either<StreamEnd, WsStream<StreamEnd>>;

/// The way in to one server incarnation's HTTP listener (WebSocket clients'), served by
/// the server's real HTTP layer (`quire::web::serve_on`, with its connection bound and
/// idle close) on the [`SimHttpListener`]. When the incarnation
/// ends, the connections made through it end as a TCP connection's do when the server's
/// end is dropped ([`Wire::server_gone`]): their tasks are the HTTP layer's, not the
/// server's, and would otherwise go on, and close them in order with a WebSocket
/// Close, which a crashed server does not send.
#[derive(Clone)]
pub struct HttpDoor {
    tx: mpsc::UnboundedSender<StreamEnd>,
    wires: Arc<Mutex<Vec<Wire>>>,
}

impl HttpDoor {
    pub fn new() -> (HttpDoor, SimHttpListener) {
        let (tx, rx) = mpsc::unbounded_channel();
        let door = HttpDoor {
            tx,
            wires: Arc::default(),
        };
        (door, SimHttpListener(rx))
    }

    /// A connection to the listener, not yet upgraded: the client's end, and the wire.
    /// `None`: the listener is gone.
    pub fn dial(&self, rng: &mut SplitMix, link: LinkConfig) -> Option<(StreamEnd, Wire)> {
        let (server_end, client_end, wire) = Wire::streams(rng, link);
        self.tx.send(server_end).ok()?;
        let mut wires = self.wires.lock().unwrap();
        wires.retain(Wire::client_holds);
        wires.push(wire.clone());
        Some((client_end, wire))
    }

    /// The server's ends of every connection made through this door are gone (the
    /// server crashed).
    pub fn server_gone(&self) {
        for wire in self.wires.lock().unwrap().drain(..) {
            wire.server_gone();
        }
    }
}

/// The WebSocket URL of the server (or cluster node) at `addr`.
pub fn ws_url(addr: &str) -> String {
    format!("ws://{addr}/ws")
}

/// The WebSocket handshake, as a browser makes it, over a connection to the HTTP
/// listener at `url`.
pub async fn upgrade(client_end: StreamEnd, url: &str) -> io::Result<SimConn> {
    let ws = quire::client::websocket::connect_over(client_end, url).await?;
    Ok(SimConn::Right(ws))
}

/// Connections to one server incarnation's HTTP listener.
pub struct SimHttpListener(mpsc::UnboundedReceiver<StreamEnd>);
impl axum::serve::Listener for SimHttpListener {
    type Io = StreamEnd;
    type Addr = &'static str;

    async fn accept(&mut self) -> (StreamEnd, &'static str) {
        match self.0.recv().await {
            Some(end) => (end, "sim"),
            // Nobody can connect any more: this incarnation is being torn down.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<&'static str> {
        Ok("sim")
    }
}
