//! What a session reads from and writes to, and where connections come from: TCP in
//! production, an in-memory network in the deterministic simulator (`tests/sim/`).
//!
//! The read side is "wait until readable, then take what is there" rather than
//! `AsyncRead`: an idle connection then holds no read buffer (see the session's read
//! loop), which is what keeps 10,000 idle connections small.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};

/// One accepted connection.
pub trait Transport: Send + 'static {
    type Reader: ReadHalf;
    type Writer: WriteHalf;

    /// The two directions, to be used by two tasks.
    fn into_split(self) -> (Self::Reader, Self::Writer);

    /// Writes what fits now without waiting (a refusal to a connection over the limit:
    /// a fresh connection takes a small frame at once).
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// The sending direction of a connection.
pub trait WriteHalf: AsyncWrite + Send + Unpin + 'static {
    /// Writes what fits now without waiting: `WouldBlock` if nothing does. Used by a
    /// sender while the session's writer has nothing queued (see [`super::outbox`]).
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// The receiving direction of a connection.
pub trait ReadHalf: Send + Sync + 'static {
    /// Resolves when bytes (or the end of the stream) can be read. May wake spuriously:
    /// [`ReadHalf::try_read_buf`] then reports `WouldBlock`.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Appends what has arrived to `buf`: `Ok(0)` at the end of the stream,
    /// `WouldBlock` if nothing is there yet.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
}

/// Where connections come from.
pub trait Listener: Send + 'static {
    type Conn: Transport;

    /// The next connection and a description of its peer (for the log).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Conn, String)>> + Send;
}

impl Transport for TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;

    fn into_split(self) -> (Self::Reader, Self::Writer) {
        // Frames are written whole; Nagle would only delay acks.
        let _ = self.set_nodelay(true);
        TcpStream::into_split(self)
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl WriteHalf for tokio::net::tcp::OwnedWriteHalf {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write(self, buf)
    }
}

impl ReadHalf for tokio::net::tcp::OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedReadHalf::readable(self)
    }

    /// A read that does not fill the buffer took everything the socket had: the
    /// socket's readiness is cleared with it, so that the next `readable` waits for new
    /// bytes instead of returning at once for a read that would find none (one system
    /// call less per request). Cleared only if no readiness event came since the read
    /// began (tokio compares the event's tick), so bytes that arrive meanwhile still
    /// wake the reader.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let mut read = None;
        let outcome = self.as_ref().try_io(tokio::io::Interest::READABLE, || {
            let n = tokio::net::tcp::OwnedReadHalf::try_read_buf(self, buf)?;
            read = Some(n);
            if n > 0 && n < room {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match (outcome, read) {
            (Ok(n), _) => Ok(n),
            (Err(_), Some(n)) => Ok(n),
            (Err(e), None) => Err(e),
        }
    }
}

impl Listener for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        Ok((stream, peer.to_string()))
    }
}

/// What a transport refused in what the peer sent (a WebSocket text message, a message
/// that is not exactly one frame), carried inside the `io::Error` of
/// [`ReadHalf::try_read_buf`] (kind `InvalidData`): the session answers it with
/// `Error(code)` and closes, as it does a malformed frame read from TCP.
#[derive(Debug)]
pub struct Refused {
    pub code: crate::protocol::message::ErrorCode,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    pub fn error(
        code: crate::protocol::message::ErrorCode,
        message: impl Into<String>,
    ) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            Refused {
                code,
                message: message.into(),
            },
        )
    }

    /// The refusal inside `e`, if it carries one.
    pub fn of(e: &io::Error) -> Option<&Refused> {
        e.get_ref()?.downcast_ref::<Refused>()
    }
}

/// Connections of two kinds served by one server (TCP and WebSocket): the listener
/// takes from both, and each connection is served by the one session implementation.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

impl<A: Transport, B: Transport> Transport for Either<A, B> {
    type Reader = Either<A::Reader, B::Reader>;
    type Writer = Either<A::Writer, B::Writer>;

    fn into_split(self) -> (Self::Reader, Self::Writer) {
        match self {
            Either::Left(a) => {
                let (r, w) = a.into_split();
                (Either::Left(r), Either::Left(w))
            }
            Either::Right(b) => {
                let (r, w) = b.into_split();
                (Either::Right(r), Either::Right(w))
            }
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Either::Left(a) => a.try_write(buf),
            Either::Right(b) => b.try_write(buf),
        }
    }
}

impl<A: ReadHalf, B: ReadHalf> ReadHalf for Either<A, B> {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Either::Left(a) => a.readable().await,
            Either::Right(b) => b.readable().await,
        }
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Either::Left(a) => a.try_read_buf(buf),
            Either::Right(b) => b.try_read_buf(buf),
        }
    }
}

impl<A: WriteHalf, B: WriteHalf> WriteHalf for Either<A, B> {
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Either::Left(a) => a.try_write(buf),
            Either::Right(b) => b.try_write(buf),
        }
    }
}

impl<A: WriteHalf, B: WriteHalf> AsyncWrite for Either<A, B> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Either::Left(a) => std::pin::Pin::new(a).poll_write(cx, buf),
            Either::Right(b) => std::pin::Pin::new(b).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(a) => std::pin::Pin::new(a).poll_flush(cx),
            Either::Right(b) => std::pin::Pin::new(b).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Left(a) => std::pin::Pin::new(a).poll_shutdown(cx),
            Either::Right(b) => std::pin::Pin::new(b).poll_shutdown(cx),
        }
    }
}

/// Two listeners as one: connections from either, as they come; when both have one
/// waiting, they take turns (so neither starves the other, and the order is the same in
/// every run of the deterministic simulator, where an unbiased `select!` would draw it
/// from tokio's random seed).
pub struct Both<A, B> {
    a: A,
    b: B,
    /// The next accept tries `b` first.
    b_first: bool,
}

impl<A, B> Both<A, B> {
    pub fn new(a: A, b: B) -> Both<A, B> {
        Both {
            a,
            b,
            b_first: false,
        }
    }
}

impl<A: Listener, B: Listener> Listener for Both<A, B> {
    type Conn = Either<A::Conn, B::Conn>;

    /// Both accepts are cancel-safe (a TCP accept, a channel receive), so the one that
    /// loses the race loses nothing.
    async fn accept(&mut self) -> io::Result<(Self::Conn, String)> {
        let b_first = self.b_first;
        self.b_first = !b_first;
        let (a, b) = (&mut self.a, &mut self.b);
        if b_first {
            tokio::select! {
                biased;
                got = b.accept() => got.map(|(c, p)| (Either::Right(c), p)),
                got = a.accept() => got.map(|(c, p)| (Either::Left(c), p)),
            }
        } else {
            tokio::select! {
                biased;
                got = a.accept() => got.map(|(c, p)| (Either::Left(c), p)),
                got = b.accept() => got.map(|(c, p)| (Either::Right(c), p)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With connections waiting on both listeners, `Both` takes one from each in turn:
    /// neither starves the other, and the order does not depend on tokio's random seed.
    #[tokio::test]
    async fn both_listeners_take_turns_when_both_have_connections_waiting() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(a_addr).await.unwrap());
            held.push(TcpStream::connect(b_addr).await.unwrap());
        }
        let mut both = Both::new(a, b);
        let mut order = Vec::new();
        for _ in 0..6 {
            let (conn, _) = both.accept().await.unwrap();
            order.push(matches!(conn, Either::Left(_)));
        }
        assert_eq!(order, [true, false, true, false, true, false]);
    }
}
