//! The WebSocket transport: a connection upgraded at `GET /ws` of the HTTP listener
//! ([`crate::web`]) carries exactly the frames of protocol.md, one frame per binary
//! message, and is served by the same session code as a TCP connection
//! ([`super::transport`]).
//!
//! - **Reading**: the session polls the WebSocket itself (no task in between). A binary
//!   message must hold exactly one frame (its length field equal to the message's
//!   length minus 4); a text message or anything else is refused with the error a bad
//!   frame gets on TCP (`Malformed`), and a message longer than the frame limit with
//!   `FrameTooLarge`, before its body is buffered (the WebSocket layer is told the limit).
//! - **Writing**: the session's outbox writes a byte stream of frames; [`WsWriter`] cuts
//!   it back into frames and hands each to a task of this connection that owns the
//!   sending half, which also sends a WebSocket Ping every [`WS_PING_INTERVAL`] so that
//!   proxies see an idle connection as alive (browsers answer pings by themselves).
//!   At most [`WS_QUEUED_FRAMES`] frames wait between the two, on top of the outbox's
//!   own bound.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::transport::{Listener, ReadHalf, Refused, Transport, WriteHalf};
use crate::protocol::frame::{bytes_to_complete, length_field};
use crate::protocol::message::ErrorCode;

/// The server sends a WebSocket Ping this often on every WebSocket connection: below
/// the 60 s after which common proxies (nginx's `proxy_read_timeout`) close a quiet one.
pub const WS_PING_INTERVAL: Duration = Duration::from_secs(20);

/// Frames cut from the outbox's stream that wait for the connection's sending task.
pub const WS_QUEUED_FRAMES: usize = 2;

/// Upgraded connections waiting for the server's accept loop.
pub const WS_ACCEPT_QUEUE: usize = 64;

/// One WebSocket connection, upgraded and ready for a session.
pub struct WsConn {
    reader: WsReader,
    writer: WsWriter,
}

impl WsConn {
    /// Wraps an upgraded socket whose messages are limited to `max_frame` + 4 bytes
    /// (told to the WebSocket layer at the upgrade), and starts its sending task.
    pub fn new(socket: WebSocket, max_frame: usize, ping_every: Duration) -> WsConn {
        let (sink, stream) = socket.split();
        let (tx, rx) = mpsc::channel(WS_QUEUED_FRAMES);
        tokio::spawn(send_frames(sink, rx, ping_every));
        WsConn {
            reader: WsReader {
                state: Mutex::new(ReadState {
                    stream,
                    next: None,
                    ended: false,
                }),
                max_frame,
            },
            writer: WsWriter {
                tx: PollSender::new(tx),
                assembling: BytesMut::new(),
            },
        }
    }
}

impl Transport for WsConn {
    type Reader = WsReader;
    type Writer = WsWriter;

    fn into_split(self) -> (WsReader, WsWriter) {
        (self.reader, self.writer)
    }

    /// Nothing is written before the session's writer runs: a refusal over the
    /// connection limit goes through [`super::session::refuse_busy`] instead.
    fn try_write(&self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// The receiving half: the WebSocket's stream, polled by the session.
pub struct WsReader {
    state: Mutex<ReadState>,
    max_frame: usize,
}

struct ReadState {
    stream: SplitStream<WebSocket>,
    /// A message taken from the stream by `readable`, for the next `try_read_buf`.
    next: Option<io::Result<Bytes>>,
    ended: bool,
}

impl WsReader {
    fn state(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A received message as frame bytes, a refusal, or `None` for a message that
    /// carries no frame (a Ping, answered by the WebSocket layer, or a Pong).
    fn frame_of(&self, message: Message) -> Option<io::Result<Bytes>> {
        match message {
            Message::Binary(bytes) => Some(self.check(bytes)),
            Message::Text(_) => Some(Err(Refused::error(
                ErrorCode::Malformed,
                "a WebSocket text message: quire frames travel in binary messages",
            ))),
            Message::Ping(_) | Message::Pong(_) => None,
            Message::Close(_) => Some(Ok(Bytes::new())),
        }
    }

    /// A binary message holds exactly one frame: its length field, then that many bytes.
    fn check(&self, bytes: Bytes) -> io::Result<Bytes> {
        if bytes.len() < 4 {
            return Err(Refused::error(
                ErrorCode::Malformed,
                format!(
                    "a {}-byte WebSocket message is shorter than a frame's length field",
                    bytes.len()
                ),
            ));
        }
        let len = length_field(&bytes);
        if len > self.max_frame {
            return Err(Refused::error(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {len} bytes exceeds the limit of {}",
                    self.max_frame
                ),
            ));
        }
        if len != bytes.len() - 4 {
            return Err(Refused::error(
                ErrorCode::Malformed,
                format!(
                    "a WebSocket message must hold exactly one frame: its length field says \
                     {len} bytes and {} follow it",
                    bytes.len() - 4
                ),
            ));
        }
        Ok(bytes)
    }
}

/// The WebSocket layer's errors: a message over the limit it was told is the
/// protocol's `FrameTooLarge`, one that breaks RFC 6455's framing (an unmasked frame, a
/// reserved opcode or bit, a continuation of nothing, a text message not UTF-8) is
/// `Malformed`, as a bad frame on TCP; anything else (the connection failed) ends it.
fn read_error(e: axum::Error, max_frame: usize) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let text = e.to_string();
    match e.into_inner().downcast::<WsError>().map(|e| *e) {
        Ok(WsError::Capacity(_)) => Refused::error(
            ErrorCode::FrameTooLarge,
            format!(
                "a WebSocket message over the limit of one frame of {max_frame} bytes ({text})"
            ),
        ),
        Ok(WsError::Protocol(_) | WsError::Utf8(_)) => Refused::error(
            ErrorCode::Malformed,
            format!("a message that breaks WebSocket framing ({text})"),
        ),
        _ => io::Error::other(text),
    }
}

impl ReadHalf for WsReader {
    async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut state = self.state();
            loop {
                if state.next.is_some() || state.ended {
                    return Poll::Ready(Ok(()));
                }
                match state.stream.poll_next_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => state.ended = true,
                    Poll::Ready(Some(Err(e))) => {
                        state.next = Some(Err(read_error(e, self.max_frame)));
                    }
                    Poll::Ready(Some(Ok(message))) => state.next = self.frame_of(message),
                }
            }
        })
        .await
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut state = self.state();
        match state.next.take() {
            Some(Ok(frame)) if frame.is_empty() => {
                // A Close message: the end of the stream.
                state.ended = true;
                Ok(0)
            }
            Some(Ok(frame)) => {
                buf.extend_from_slice(&frame);
                Ok(frame.len())
            }
            Some(Err(e)) => {
                state.ended = true;
                Err(e)
            }
            None if state.ended => Ok(0),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// The sending half: cuts the outbox's byte stream into frames, one message each.
///
/// A write returns only what it has handed on: the bytes that complete a frame are
/// taken only once the queue has room for that frame, so nothing whole waits here for
/// a later write or flush (the outbox's writer does not flush: TCP needs none).
pub struct WsWriter {
    tx: PollSender<Bytes>,
    /// The frame being cut from the stream (its length field first), never whole.
    assembling: BytesMut,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket connection ended")
}

impl AsyncWrite for WsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut taken = 0;
        while taken < buf.len() {
            let rest = &buf[taken..];
            let header = this.assembling.len() < 4;
            let need = bytes_to_complete(&this.assembling);
            if header || rest.len() < need {
                // The length field, or part of the body: nothing to send yet.
                let take = need.min(rest.len());
                this.assembling.extend_from_slice(&rest[..take]);
                taken += take;
                continue;
            }
            // These bytes complete a frame: taken only with room to queue it.
            match this.tx.poll_reserve(cx) {
                Poll::Pending if taken == 0 => return Poll::Pending,
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(gone())),
                Poll::Ready(Ok(())) => {}
            }
            this.assembling.extend_from_slice(&rest[..need]);
            taken += need;
            let frame = this.assembling.split().freeze();
            this.tx.send_item(frame).map_err(|_| gone())?;
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every whole frame is queued already (see the type's comment).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The sending task sends a Close and ends once it has sent what is queued.
        self.get_mut().tx.close();
        Poll::Ready(Ok(()))
    }
}

impl WriteHalf for WsWriter {
    /// A whole frame goes straight into the queue if it has room.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let whole_frame = buf.len() >= 4 && 4 + length_field(buf) == buf.len();
        if !self.assembling.is_empty() || !whole_frame {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Some(tx) = self.tx.get_ref() else {
            return Err(gone());
        };
        match tx.try_send(Bytes::copy_from_slice(buf)) {
            Ok(()) => Ok(buf.len()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(gone()),
        }
    }
}

/// The connection's sending task: frames as binary messages (what is queued together
/// goes in one write), a Ping every `ping_every`, and a Close once the session's writer
/// is done (the answer to the client's Close, if it closed first). Ends at the first
/// error: the session's writer then finds the queue closed.
async fn send_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Bytes>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sent = tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(frame) => {
                    let mut sent = sink.feed(Message::Binary(frame)).await;
                    while sent.is_ok() {
                        match rx.try_recv() {
                            Ok(frame) => sent = sink.feed(Message::Binary(frame)).await,
                            Err(_) => break,
                        }
                    }
                    match sent {
                        Ok(()) => sink.flush().await,
                        Err(e) => Err(e),
                    }
                }
                None => {
                    // Not `send(Close)`: after the peer's Close the WebSocket layer
                    // refuses any send (it has queued the answering Close itself, to go
                    // out with the next write or flush). Closing the sink flushes that
                    // answer, or sends our Close first if the peer has not closed.
                    let _ = sink.close().await;
                    return;
                }
            },
            _ = ping.tick() => sink.send(Message::Ping(Bytes::new())).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Upgraded connections, handed from the HTTP listener to the server's accept loop.
pub struct WsAcceptor {
    rx: mpsc::Receiver<(WsConn, String)>,
}

/// Where the HTTP listener puts upgraded connections.
pub type WsHandoff = mpsc::Sender<(WsConn, String)>;

/// The two ends of the hand-off.
pub fn acceptor() -> (WsHandoff, WsAcceptor) {
    let (tx, rx) = mpsc::channel(WS_ACCEPT_QUEUE);
    (tx, WsAcceptor { rx })
}

impl Listener for WsAcceptor {
    type Conn = WsConn;

    async fn accept(&mut self) -> io::Result<(WsConn, String)> {
        match self.rx.recv().await {
            Some(conn) => Ok(conn),
            // The HTTP listener is gone: no more connections come this way.
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame_of_len(len: usize, fill: u8) -> Vec<u8> {
        let mut f = (len as u32).to_le_bytes().to_vec();
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    /// Frames written as one byte stream, cut at arbitrary points (as the outbox's
    /// writer coalesces and a partial write resumes), come out one message per frame,
    /// whole and in order; a direct write of one whole frame too.
    #[test]
    fn the_writer_cuts_any_chunking_of_the_stream_into_whole_frames() {
        fn prop(lens: Vec<u16>, cuts: Vec<u8>) -> bool {
            let frames: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| frame_of_len(l as usize % 3000 + 1, i as u8))
                .collect();
            let stream: Vec<u8> = frames.concat();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let got = rt.block_on(async {
                let (tx, mut rx) = mpsc::channel(WS_QUEUED_FRAMES);
                let mut writer = WsWriter {
                    tx: PollSender::new(tx),
                    assembling: BytesMut::new(),
                };
                let reader = tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(m) = rx.recv().await {
                        got.push(m.to_vec());
                    }
                    got
                });
                let mut at = 0;
                let mut cuts = cuts.into_iter().cycle();
                while at < stream.len() {
                    let n = (cuts.next().unwrap_or(255) as usize * 7 + 1).min(stream.len() - at);
                    writer.write_all(&stream[at..at + n]).await.unwrap();
                    at += n;
                }
                // A whole frame written directly once the stream is cut to its end.
                writer.flush().await.unwrap();
                // (The reader drains the queue between yields: room comes within a few;
                // a writer stuck mid-frame never takes it, and the run fails.)
                let direct = frame_of_len(10, 0xAB);
                let mut taken = false;
                for _ in 0..1000 {
                    match WriteHalf::try_write(&mut writer, &direct) {
                        Ok(n) => {
                            assert_eq!(n, direct.len());
                            taken = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            tokio::task::yield_now().await
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                if !taken {
                    return Vec::new();
                }
                writer.shutdown().await.unwrap();
                drop(writer);
                reader.await.unwrap()
            });
            let mut want = frames;
            want.push(frame_of_len(10, 0xAB));
            got == want
        }
        quickcheck::QuickCheck::new()
            .tests(200)
            .quickcheck(prop as fn(Vec<u16>, Vec<u8>) -> bool);
    }

    /// A frame completed while the queue is full is not left behind: it goes out once
    /// the queue has room, with no further write or flush (the outbox's writer never
    /// flushes). Found by the TypeScript client's tests: an Ack held back until the
    /// client's next Ping. (Paused time: a frame that never comes fails the run.)
    #[tokio::test(start_paused = true)]
    async fn a_frame_completed_while_the_queue_is_full_goes_out_without_another_write() {
        let (tx, mut rx) = mpsc::channel(WS_QUEUED_FRAMES);
        let mut writer = WsWriter {
            tx: PollSender::new(tx),
            assembling: BytesMut::new(),
        };
        let frames: Vec<Vec<u8>> = (0..WS_QUEUED_FRAMES + 1)
            .map(|i| frame_of_len(8, i as u8))
            .collect();
        let stream = frames.concat();
        let writing = tokio::spawn(async move {
            writer.write_all(&stream).await.unwrap();
            writer
        });
        let mut got = Vec::new();
        for _ in 0..frames.len() {
            let frame = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("every frame is sent")
                .expect("the writer is open");
            got.push(frame.to_vec());
        }
        assert_eq!(got, frames);
        // Still open: nothing was sent by a close either.
        let _writer = writing.await.unwrap();
    }
}
