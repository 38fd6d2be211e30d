//! A client connection speaking the protocol (over TCP, or any byte stream: the
//! simulator's in-memory network): the handshake, and frames in and out. The
//! [`Client`](super::Client) runs its documents over one; tests of the server's
//! handling of raw input use it directly.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::frame::FrameCodec;
use crate::protocol::message::{Envelope, Message};
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
            // Nothing for TCP; a stream that buffers (a WebSocket's messages) sends.
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// As [`Connection::flush`], giving up (an error of kind `TimedOut`) once the peer
    /// takes nothing for `stall`: a stopped server whose socket buffers are full would
    /// otherwise hold the writer for ever. A slow one that takes something now and then
    /// is waited for, however long all of it takes.
    pub async fn flush_within(&mut self, stall: std::time::Duration) -> Result<(), ClientError> {
        let stalled = || {
            ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer took nothing of what was sent for {stall:?}"),
            ))
        };
        let mut sent = 0;
        while sent < self.write_buf.len() {
            match tokio::time::timeout(stall, self.stream.write(&self.write_buf[sent..])).await {
                Ok(Ok(0)) => return Err(ClientError::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(stalled()),
            }
        }
        if sent > 0 {
            self.write_buf.clear();
            // Nothing for TCP; a stream that buffers (a WebSocket's messages) sends.
            tokio::time::timeout(stall, self.stream.flush())
                .await
                .map_err(|_| stalled())??;
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
        self.stream.flush().await?;
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

    /// A message, if one has arrived; else registers `cx` to be woken when bytes come
    /// (several connections are waited on at once this way). Cancel-safe: what was read
    /// stays in the buffer.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Envelope, ClientError>> {
        use std::task::Poll;
        loop {
            if let Some(env) = self
                .codec
                .decode(&mut self.read_buf)
                .map_err(|e| ClientError::Protocol(format!("from the server: {e}")))?
            {
                return Poll::Ready(Ok(env));
            }
            match tokio_util::io::poll_read_buf(
                std::pin::Pin::new(&mut self.stream),
                cx,
                &mut self.read_buf,
            ) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(ClientError::Io(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    )))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => return Poll::Pending,
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
