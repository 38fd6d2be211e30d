//! Frames: `u32 LE length` then that many bytes (`type u8`, `request_id u32`, body).
//!
//! Built on tokio-util's `LengthDelimitedCodec`, which checks the length field against
//! the maximum before it reserves any buffer space, so an oversize frame costs nothing
//! but the error. The codec turns frames into [`Message`](super::message::Message)s and back.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use super::message::{DecodeError, Envelope, ErrorCode};

/// Why the byte stream can no longer be read.
#[derive(Debug)]
pub enum FrameError {
    /// The length field exceeds the maximum (code 2).
    TooLarge,
    /// The frame does not hold a valid message (its code says why).
    Message(DecodeError),
    Io(std::io::Error),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge => ErrorCode::FrameTooLarge,
            FrameError::Message(e) => e.code(),
            FrameError::Io(_) => ErrorCode::Malformed,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge => write!(f, "frame exceeds the maximum frame size"),
            FrameError::Message(e) => write!(f, "{e}"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        // LengthDelimitedCodec reports an oversize length as InvalidData.
        if e.kind() == std::io::ErrorKind::InvalidData {
            FrameError::TooLarge
        } else {
            FrameError::Io(e)
        }
    }
}

/// Decodes and encodes [`Envelope`]s.
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            inner: LengthDelimitedCodec::builder()
                .little_endian()
                .length_field_length(4)
                .max_frame_length(max_frame)
                .new_codec(),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Envelope;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>, FrameError> {
        match self.inner.decode(src)? {
            Some(frame) => Envelope::decode(&frame)
                .map(Some)
                .map_err(FrameError::Message),
            None => Ok(None),
        }
    }
}

impl Encoder<&Envelope> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Envelope, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body: Bytes = item.encode().into();
        self.inner.encode(body, dst)?;
        Ok(())
    }
}

/// The length field at the start of a frame's bytes (at least 4 of them).
pub fn length_field(frame: &[u8]) -> usize {
    u32::from_le_bytes(frame[..4].try_into().expect("a length field is 4 bytes")) as usize
}

/// Bytes still missing from the frame that `partial` begins (its length field first,
/// then that many bytes; `partial` holds no more than that frame): for cutting a byte
/// stream of frames back into frames, as a WebSocket sends each in a message of its own.
pub fn bytes_to_complete(partial: &[u8]) -> usize {
    if partial.len() < 4 {
        return 4 - partial.len();
    }
    4 + length_field(partial) - partial.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::Message;

    #[test]
    fn a_frame_round_trips_and_partial_input_waits() {
        let mut codec = FrameCodec::new(1024);
        let env = Envelope {
            request_id: 7,
            message: Message::Ping { nonce: 42 },
        };
        let mut buf = BytesMut::new();
        codec.encode(&env, &mut buf).unwrap();
        let mut partial = buf.split_to(buf.len() - 1);
        assert!(codec.decode(&mut partial).unwrap().is_none());
        partial.unsplit(buf);
        assert_eq!(codec.decode(&mut partial).unwrap(), Some(env));
    }

    #[test]
    fn an_oversize_length_is_refused_before_the_body_arrives() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&(1_000_000u32.to_le_bytes())[..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge));
        assert!(buf.capacity() < 1_000_000);
    }
}
