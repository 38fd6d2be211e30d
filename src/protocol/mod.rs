//! The wire protocol, as `protocol.md` specifies it. Knows nothing of storage.
//!
//! - [`message`]: the messages and their explicit byte encoding.
//! - [`frame`]: the length-prefixed frame codec (tokio-util), bounded before allocation.

pub mod frame;
pub mod message;

pub const PROTOCOL_VERSION: u16 = 1;
pub const MAGIC: [u8; 4] = *b"QUIR";
/// Default upper bound on a frame's length field.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
