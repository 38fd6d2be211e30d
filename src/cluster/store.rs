//! The coordination-store seam: the part of etcd v3's API the cluster uses, and nothing
//! more, so that the etcd adapter is a thin translation and [`MemStore`](super::mem_store::MemStore) (the model
//! tests' stand-in) can implement the same semantics exactly.
//!
//! The trait is synchronous: the cluster calls the store from its commit thread (a group
//! commit blocks on it, as the local log's writer blocks on `fdatasync`), and the etcd
//! adapter will block on its client there. What each method relies on, and where etcd
//! documents it (`api` is etcd.io/docs/v3.5/learning/api, `guarantees` is
//! etcd.io/docs/v3.5/learning/api_guarantees):
//!
//! - **Linearizability** (`guarantees`, "Linearizability"): every request sees every
//!   change acknowledged before it was sent. etcd's default, except for a txn without
//!   ops, which it answers from one member's own state (its `isTxnSerializable` holds
//!   vacuously); the etcd adapter adds a read to such a txn to make it linearizable.
//! - **Revisions** (`guarantees`, "Revision"): one counter for the whole store. Every
//!   request that modifies the store gets the next revision, and a transaction gets one
//!   revision however many keys it changes. A request that changes nothing (a read, a
//!   txn whose branch only reads, a delete of an absent key) does not advance it.
//! - **Key metadata** (`api`, "Key-Value pair"): `create_revision` is the revision of the
//!   key's last creation, `mod_revision` of its last change, `version` counts changes
//!   since that creation. Deleting a key resets all three: an absent key compares as
//!   `create_revision == 0`, `mod_revision == 0`, `version == 0`, so a key deleted and
//!   put again has a new, larger `create_revision`. That is what makes a create
//!   revision usable as a fencing token ([`super::ownership`]'s epochs).
//! - **Transactions** (`api`, "Transaction"): `If(compares) Then(success) Else(failure)`,
//!   all compares ANDed, evaluated and applied atomically at one revision. etcd refuses
//!   a txn that puts a key twice in one branch, or puts and deletes it ("duplicate key
//!   given in txn request"; overlapping deletes are allowed), and one with more than
//!   `--max-txn-ops` (default 128) compares or ops in a branch: [`TxnError`]. A value compare on an absent key is false whatever
//!   the value (etcd's `applyCompare`: a missing key has no value, not an empty one).
//! - **Ranges** (`api`, "Range"): a prefix read returns keys in byte order, at most
//!   `limit` of them, and says whether more were left.
//! - **Leases** (`api`, "Lease API"): `grant` gives a lease with a TTL; a put may attach a
//!   key to a lease that exists, and fails if it does not ("requested lease not found");
//!   when the lease expires or is revoked, all of its keys are deleted in one revision.
//!   A keep-alive of an expired lease fails (etcd answers TTL 0). etcd may keep a lease
//!   alive *longer* than its TTL (a new leader renews every lease), never shorter: the
//!   cluster relies only on "a key bound to an expired lease is gone", never on "a key
//!   is gone as soon as the TTL has passed" (see [`super`]'s notes on clocks).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// etcd's default `--max-txn-ops`: the most compares, or ops in one branch, a txn may
/// carry. [`MemStore`](super::mem_store::MemStore) enforces it so that code tested against it fits real etcd.
pub const MAX_TXN_OPS: usize = 128;

/// A store revision. Revision 0 never names a change: it is what an absent key's
/// `create_revision` and `mod_revision` compare as.
pub type Revision = i64;

/// A lease id (etcd's are positive 64-bit integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// A key, its value and its metadata, as a read returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the key's latest creation.
    pub create_revision: Revision,
    /// The revision of the key's latest change.
    pub mod_revision: Revision,
    /// Changes since the key's latest creation (1 after the first put).
    pub version: i64,
    /// The lease the key is bound to, if any: it is deleted when the lease goes.
    pub lease: Option<LeaseId>,
}

/// What a compare looks at, for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The key's create revision: `CreateRevision(0)` means "the key is absent".
    CreateRevision(Revision),
    /// The key's mod revision (0: absent).
    ModRevision(Revision),
    /// Never true for an absent key.
    Value(Vec<u8>),
}

/// One condition of a txn: the key's `target` equals the given one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// What it must equal.
    pub target: Target,
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare {
            key: key.into(),
            target: Target::CreateRevision(0),
        }
    }

    /// The key exists and was created at `revision` (a fencing check).
    pub fn created_at(key: impl Into<String>, revision: Revision) -> Self {
        assert!(
            revision > 0,
            "an existing key's create revision is positive"
        );
        Compare {
            key: key.into(),
            target: Target::CreateRevision(revision),
        }
    }
}

/// One op of a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates or replaces the key, bound to `lease` if given (and to no lease if not).
    Put {
        /// The key written.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// The lease it is bound to.
        lease: Option<LeaseId>,
    },
    /// Deletes the key if it exists.
    Delete {
        /// The key deleted.
        key: String,
    },
    /// Deletes every key starting with `prefix`.
    DeletePrefix {
        /// The prefix.
        prefix: String,
    },
    /// Reads the key, as of the txn's changes before it.
    Get {
        /// The key read.
        key: String,
    },
}

/// What one op of the branch taken returned, in the order of the ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// The put was made.
    Put,
    /// How many keys were deleted.
    Deleted(u64),
    /// The key read, if it existed.
    Got(Option<KeyValue>),
}

/// What a txn did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Every compare held, and the success branch ran.
    pub succeeded: bool,
    /// The store's revision after the txn: the revision of its changes if it made any.
    pub revision: Revision,
    /// What each op of the branch taken returned, in order.
    pub results: Vec<OpResult>,
}

/// A page of a prefix read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The keys read, in byte order.
    pub kvs: Vec<KeyValue>,
    /// More keys under the prefix were left out by the limit.
    pub more: bool,
    /// The revision the read saw.
    pub revision: Revision,
}

/// Why a request failed. Nothing of a failed request was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The lease does not exist (it expired, was revoked, or never was).
    LeaseNotFound(LeaseId),
    /// The txn is malformed (see [`MAX_TXN_OPS`], duplicate keys).
    Txn(TxnError),
    /// The store could not be reached or did not answer: the request may or may not
    /// have been applied (etcd's "uncertain" outcome, `guarantees`).
    Unavailable(String),
}

/// A txn etcd refuses before evaluating it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    /// More than [`MAX_TXN_OPS`] compares, or ops in a branch.
    TooManyOps(usize),
    /// A branch puts a key twice, or puts and deletes it.
    DuplicateKey(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::LeaseNotFound(lease) => write!(f, "lease {} not found", lease.0),
            StoreError::Txn(TxnError::TooManyOps(n)) => {
                write!(f, "{n} operations in a txn; the limit is {MAX_TXN_OPS}")
            }
            StoreError::Txn(TxnError::DuplicateKey(key)) => {
                write!(f, "key {key:?} written twice in one txn")
            }
            StoreError::Unavailable(reason) => {
                write!(f, "coordination store unavailable: {reason}")
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// The key that makes a txn branch one etcd refuses as "duplicate key given in txn
/// request", if any: a key put twice, or put and deleted (by key or by a prefix). Deletes
/// may overlap each other. This is etcd's `checkIntervals`, shared by
/// [`MemStore`](super::mem_store::MemStore), which enforces it, and the etcd adapter,
/// which names the key in the error (etcd's message does not).
pub fn duplicate_key(ops: &[Op]) -> Option<&str> {
    let mut puts = std::collections::BTreeSet::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if !puts.insert(key.as_str()) {
                return Some(key);
            }
        }
    }
    ops.iter().find_map(|op| match op {
        Op::Delete { key } => puts.get(key.as_str()).copied(),
        Op::DeletePrefix { prefix } => puts
            .range(prefix.as_str()..)
            .next()
            .copied()
            .filter(|key| key.starts_with(prefix.as_str())),
        Op::Put { .. } | Op::Get { .. } => None,
    })
}

/// The coordination store: etcd v3's KV, Txn and Lease APIs as the cluster uses them
/// (semantics in the module notes).
pub trait Store {
    /// Grants a lease that expires `ttl` after its grant or latest keep-alive.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews the lease for its full TTL; fails once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Revokes the lease now, deleting its keys (one revision). Revoking a lease that
    /// is gone fails with [`StoreError::LeaseNotFound`].
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// The key, if it exists.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Up to `limit` keys starting with `prefix` and not below `from` (`None`: from the
    /// first), in byte order. `limit` must be positive (etcd reads 0 as "no limit"; we
    /// never want an unbounded read).
    fn get_prefix(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Range, StoreError>;
    /// Evaluates `compares` (ANDed) and runs `success` if they all hold, `failure`
    /// otherwise, atomically at one revision.
    fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError>;
}

/// Nodes in one process (the model test) share one store.
impl<T: Store + ?Sized> Store for Arc<T> {
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        (**self).grant_lease(ttl)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).keep_alive(lease)
    }
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        (**self).revoke(lease)
    }
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        (**self).get(key)
    }
    fn get_prefix(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        (**self).get_prefix(prefix, from, limit)
    }
    fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError> {
        (**self).txn(compares, success, failure)
    }
}
