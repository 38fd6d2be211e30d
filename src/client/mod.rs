//! The native client. Depends on `ot` (and, for I/O, on `protocol`) only.
//!
//! - [`state`]: the client's OT state machine for one document, with no I/O: local
//!   text, the op in flight, the buffered local edits, rebasing over remote ops.
//! - [`connection`]: a TCP connection speaking the protocol, and [`connection::SyncedDoc`],
//!   a document kept in sync over it.

pub mod connection;
pub mod state;
