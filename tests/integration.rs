//! The integration tests, one module per file beside this one, built as one test binary.
//!
//! Every test binary links the whole crate and its dependencies (with debug info), so 28
//! of them took most of CI's build time; as modules of one binary they are compiled and
//! linked once. A test is still named by its file: `cargo test --release --test
//! integration client::` runs `tests/client.rs`. Tests of different files run in
//! parallel in one process: nothing here may rely on process-wide state (the current
//! directory, environment variables, a global registry) that another test changes.
//!
//! The crash test (`tests/crash.rs`) and the simulator (`tests/sim/`) stay binaries of
//! their own, with their own `main`; the cluster's end-to-end tests, which need the
//! `cluster` feature and an etcd, are `tests/cluster.rs`.

mod common;

mod admin;
mod auth;
mod backup;
mod client;
mod cluster_sequencer;
mod collaboration;
mod decode_fuzz;
mod demo_cast;
mod disk_full;
mod fault_injection;
mod format_sample;
mod late_ops_load;
mod ot_cases;
mod ot_convergence;
mod pipelining_model;
mod protocol_ot_examples;
mod redirect;
mod serve_binary;
mod server;
mod serving_core;
mod session_panic;
mod startup;
mod store_model;
mod tokio_floor;
mod trace_clients;
mod trace_tool;
mod truncation_over_tcp;
mod wal_basics;
mod wal_inspect;
mod websocket;
