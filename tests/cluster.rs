//! Cluster mode end to end, against real etcd members (`etcd` on the PATH: Debian's
//! etcd-server), one module per file beside this one in one test binary (see
//! `tests/integration.rs` for why one): `cargo test --release --features cluster --test
//! cluster`.
//!
//! Its tests run in parallel threads, but one etcd cluster at a time
//! (`etcd_cluster::Slot`), so that no two share this machine at once.

#[path = "common/etcd_cluster.rs"]
mod etcd_cluster;
#[path = "common/quire_nodes.rs"]
mod quire_nodes;

mod cluster_delete;
mod cluster_etcd;
mod cluster_handoff;
mod cluster_nodes;
