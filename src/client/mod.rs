//! The native client. Depends on `ot` and `protocol` only.
//!
//! - [`Client`] and [`DocHandle`] (in `handle`): what applications use. One background
//!   task owns the connection, reconnects with backoff, and keeps every open document
//!   in sync; edits apply locally at once, also offline, and survive a restart of the
//!   application with a persistence directory.
//! - [`state`]: one document's OT state machine, with no I/O: local text, the ops in
//!   flight, the buffered local edits, rebasing over remote ops, reloading.
//! - [`store`]: the persistence directory.
//! - [`connection`]: a connection speaking the protocol (handshake, frames), which
//!   [`Client`] runs over, and tests of raw input use directly.

pub mod connection;
mod handle;
pub mod state;
pub mod store;
pub mod websocket;

pub use handle::{
    Client, ClientConfig, ClientError, ConnectionState, Connector, DocHandle, EditView, Event,
    Events, TcpConnector,
};
