//! The wire protocol, as `protocol.md` specifies it. Knows nothing of storage.
//!
//! - [`message`]: the messages and their explicit byte encoding.
//! - [`frame`]: the length-prefixed frame codec (tokio-util), bounded before allocation.

pub mod frame;
pub mod message;

/// Version 2: `Welcome` carries the client id (a client may ask for one with id 0).
pub const PROTOCOL_VERSION: u16 = 2;
pub const MAGIC: [u8; 4] = *b"QUIR";
/// Default upper bound on a frame's length field.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Bytes a frame needs besides an op's patch list in the largest message that carries
/// one op (`Ops` with one op: type, request id, a 100-byte document id, the more flag,
/// the count, seq, client id, local seq), rounded up with room to spare.
pub const OP_FRAME_OVERHEAD: usize = 256;

/// Most patches in one op. Bounds the work one op can cause (its transform and apply are
/// O(n log n) in its patches, and it is transformed over at most the ops since its base).
pub const MAX_OP_PATCHES: usize = 65_536;

/// Most ops one connection may have in flight (submitted, not yet answered).
pub const MAX_OPS_IN_FLIGHT: usize = 64;

/// Most documents one connection may have open at once: a connection's subscriptions,
/// and the documents it keeps loaded on the server, are bounded by it.
pub const MAX_OPEN_DOCS: usize = 1024;

/// Most selections in one `Presence` message.
pub const MAX_SELECTIONS: usize = 256;

/// Smallest `max_frame` a server accepts: room for an op of a useful size.
pub const MIN_MAX_FRAME: usize = 4096;

/// Largest `max_frame`: an op must fit in one log record (16 MiB payload).
pub const MAX_MAX_FRAME: usize = 8 << 20;

/// The most bytes an op's patch list may take on the wire (`u32` count, then per patch
/// 12 bytes plus the inserted text), so that every message carrying the op fits in a
/// frame of `max_frame` bytes.
pub fn max_op_bytes(max_frame: usize) -> usize {
    max_frame - OP_FRAME_OVERHEAD
}

/// The bytes `patches` take on the wire.
pub fn patches_wire_len(patches: &[crate::op::Patch]) -> usize {
    4 + patches.iter().map(|p| 12 + p.ins.len()).sum::<usize>()
}
