//! A client's connection over WebSocket (`ws://HOST:PORT/ws` of a server started with
//! `--http-listen`; protocol.md, "WebSocket"), as the byte stream of frames a
//! [`Connection`](super::connection::Connection) speaks: each binary message read is one
//! frame's bytes, and each frame written goes out as one binary message.
//!
//! tokio-tungstenite gives messages, and the connection code reads and writes a byte
//! stream of frames; nothing maintained maps one onto the other (framing is quire's),
//! so this adapter is ours.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::frame::bytes_to_complete;

/// A WebSocket as a byte stream of frames, over `S` (a TCP connection by default; any
/// byte stream with [`connect_over`]: a TLS stream, a proxy's tunnel, a simulated
/// network).
pub struct WsStream<S = MaybeTlsStream<TcpStream>> {
    ws: WebSocketStream<S>,
    /// The rest of the last message read.
    read: Bytes,
    /// The frame being cut from what is written (its length field first).
    assembling: BytesMut,
}

/// Connects to `url` (`ws://127.0.0.1:7430/ws`).
pub async fn connect(url: &str) -> io::Result<WsStream> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .map_err(ws_error)?;
    if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        // Frames are written whole; Nagle would only delay them.
        tcp.set_nodelay(true)?;
    }
    Ok(WsStream::new(ws))
}

/// The WebSocket handshake for `url` (`ws://HOST/ws`: its host and path are what the
/// request names) over `stream`, a connection already made.
pub async fn connect_over<S>(stream: S, url: &str) -> io::Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .map_err(ws_error)?;
    Ok(WsStream::new(ws))
}

/// The WebSocket layer's error as an I/O error of its kind: the connection's own error
/// as it was (a reset is a reset); a server that ends the connection without a Close
/// `UnexpectedEof` (a killed server, a proxy's idle close); a breach of RFC 6455's
/// framing by the server (a masked or malformed frame, a message over the limit, text
/// that is not UTF-8, data after its Close) `InvalidData`, as a text message from the
/// server is; a send after the close `BrokenPipe`; anything else (a refused or broken
/// upgrade) `Other`.
fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::error::ProtocolError as P;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let e = match e {
        WsError::Io(e) => return e,
        other => other,
    };
    let kind = match &e {
        WsError::Protocol(P::ResetWithoutClosingHandshake) => io::ErrorKind::UnexpectedEof,
        WsError::Protocol(P::SendAfterClosing) | WsError::AlreadyClosed => {
            io::ErrorKind::BrokenPipe
        }
        WsError::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::MaskedFrameFromServer
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::ReceivedAfterClosing,
        )
        | WsError::Capacity(_)
        | WsError::Utf8(_) => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A small read buffer: the WebSocket layer zero-fills its free room before each read
/// (128 KiB by default, for every small message).
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 << 10)
}

impl<S> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            read: Bytes::new(),
            assembling: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.read.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.read = bytes,
                // Answered by the WebSocket layer (a Ping), or nothing to read.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the server sent a text message",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        // Up to the end of the frame being cut, so that at most one frame is sent here
        // (the sink was made ready for one).
        let take = bytes_to_complete(&this.assembling).min(buf.len());
        this.assembling.extend_from_slice(&buf[..take]);
        if this.assembling.len() >= 4 && bytes_to_complete(&this.assembling) == 0 {
            let frame = this.assembling.split().freeze();
            Pin::new(&mut this.ws)
                .start_send(Message::Binary(frame))
                .map_err(ws_error)?;
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_error)
    }
}
