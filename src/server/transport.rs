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
