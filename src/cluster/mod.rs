//! Cluster mode's foundation (issue 13): documents owned across nodes, coordinated
//! through etcd. Protocol-free, and independent of `server/` and `wal/`: this is the
//! part whose correctness is a matter of etcd's semantics alone, so it is tested
//! against a stand-in with the same semantics, under a model of failures.
//!
//! **What exists.** [`store`]: the slice of etcd's API the design needs (revisions,
//! leases, one-revision txns), each semantic cited from etcd's documentation;
//! [`mem_store`]: a deterministic in-memory implementation with its own clock, which
//! can also make a txn's outcome unknown (applied with its answer lost, or not);
//! `etcd` (feature `cluster`): the adapter to a real etcd cluster, with `etcd-client`;
//! `conformance`: the semantics as checks that both stores pass (tests/cluster_etcd.rs
//! runs them on a real 3-member etcd);
//! [`hashing`]: rendezvous hashing for a document's preferred owner; [`entry`]: a
//! journal entry's checksummed encoding; [`ownership`]: membership, claims, the
//! replicated journal (one txn per group commit), snapshots, truncation, release;
//! [`replicator`]: the group commit of a node's ops to the journal on its own thread,
//! with unknown outcomes sent again, and the lease kept alive and watched by the node's
//! own clock, answering whether an op may be acknowledged; and `model_tests`, which
//! runs nodes, documents and resending clients through pauses, lease expiries,
//! crashes, failovers, handoffs and unknown outcomes, checking after every step that no
//! acknowledged op is lost or applied twice.
//!
//! **Where it is used.** `sequencer::cluster::ClusterSequencer` implements
//! [`crate::sequencer::Sequencer`] on these: it claims a document at its first `Open`,
//! loads it from the store into the local sequencer (whose log is a cache), sequences
//! ops as the local sequencer does, and acknowledges an op only once the replicator
//! says its journal txn committed and the local log has it; an `Open` at a node that
//! does not own the document gets the protocol's `Redirect` to the owner's address.
//! **What comes later:** the drain on SIGTERM (commit, [`ownership::Member::release`],
//! redirect to the preferred owner), proactive claims by rendezvous hashing, and
//! snapshots with truncation of the journal by policy.
//!
//! **Why epochs.** A lease expiring does not stop the process that held it: a node
//! paused (by SIGSTOP, a long GC-like stall, a partition from etcd) wakes up believing
//! it owns its documents and carries on committing. Every journal write therefore
//! compares the owner key's create revision with the epoch the writer claimed in, and
//! etcd evaluates that compare when it applies the txn, so a late write from a replaced
//! owner fails however late it arrives (see [`ownership`] for the key layout and why
//! create revisions fence).
//!
//! **Why a node with an expired lease must stop acknowledging at once, by its own
//! clock.** The fence protects the journal, not what a node says without writing to
//! etcd: reads served from memory, ops broadcast to other clients before their commit,
//! resends answered from a dedupe table that a new owner has since extended. Once the
//! lease may have expired, another node may be serving the document, and two owners
//! answering clients is a split brain even if only one can write. So a node stops
//! serving a document once `TTL - margin` has passed on its own monotonic clock since
//! the newest keep-alive it *sent* (not since etcd answered: the lease was renewed at
//! some point in between), the margin covering the clock drift between it and etcd's
//! leader over one TTL. etcd only ever extends a lease past its TTL (a new leader
//! renews them all), never shortens it, so stopping early is always on the safe side;
//! the fence is what remains correct if the local check is late (a process stopped
//! between its check and its txn).

#![warn(missing_docs)]

// The checks of etcd's semantics that both stores pass: for the unit tests and for
// tests/cluster_etcd.rs (which needs the `cluster` feature anyway).
#[cfg(any(test, feature = "cluster"))]
#[doc(hidden)]
pub mod conformance;
pub mod entry;
#[cfg(feature = "cluster")]
pub mod etcd;
pub mod hashing;
pub mod mem_store;
#[cfg(test)]
mod model_tests;
pub mod ownership;
pub mod replicator;
pub mod store;
