//! quire: a server for real-time collaborative text editing.
//!
//! Data flows one way: socket → frame → session → document → sequencer → WAL → ack and
//! broadcast. [`wal`] knows nothing of sockets or protocol, nor does the document core
//! ([`server::document`]): only the session builds messages.

pub mod admin;
pub mod auth;
pub mod backup;
mod bounded_http;
pub mod client;
pub mod cluster;
pub mod op;
pub mod ot;
pub mod progress;
pub mod protocol;
pub mod sequencer;
pub mod server;
mod sync;
pub mod text;
#[cfg(feature = "trace")]
pub mod trace;
pub mod wal;
pub mod web;
