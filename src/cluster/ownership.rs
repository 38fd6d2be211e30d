//! Membership, ownership and the replicated journal, on a [`Store`].
//!
//! **Key layout**, every key under the cluster's prefix `{p}`:
//!
//! ```text
//! {p}/nodes/{node}                 the node's advertised address; bound to its lease
//! {p}/owner/{doc}                  the owning node's id; bound to the owner's lease;
//!                                  its create revision is the document's epoch
//! {p}/journal/{doc}/{seq:020}      one sequenced op (entry.rs), not leased
//! {p}/snap/{doc}/{seq:020}         a snapshot's manifest as of seq, not leased
//! {p}/chunk/{doc}/{seq:020}/{i:010} piece i of that snapshot's bytes, not leased
//! ```
//!
//! Why this shape: each concept is one prefix, so a node lists the members with one
//! range read and loads a document with one (paged) range read; seqs are zero-padded to
//! 20 digits (all of `u64`) so that byte order is seq order, which is the order etcd
//! returns ranges in; the journal and snapshots are not leased, because they must
//! outlive their writer (that is the point of replicating them), while an owner key is,
//! so that a dead owner's documents free themselves. A snapshot is written in pieces
//! (a document's text may be 64 MiB; etcd takes 1.5 MiB per request), each piece in a
//! txn of its own, then its manifest (length, piece count, crc32c of the whole): a
//! snapshot exists once its manifest does, so one cut short by a crash is never read,
//! and its pieces are deleted by the next snapshot's write. A document id may contain `/`, so
//! ids are escaped in keys (`%` → `%25`, `/` → `%2F`): otherwise the journal of `a`
//! (`{p}/journal/a/`) would be a prefix of that of `a/b`.
//!
//! **Epochs.** A claim creates the owner key in a txn that requires it absent; the
//! key's create revision is then unique to that claim (revisions never repeat, and a
//! key deleted and created again gets a new one), so it fences: every journal write
//! compares the owner key's create revision with the writer's epoch, and a writer that
//! lost the document (its lease expired, it released it, and someone else may have
//! claimed it since) fails that compare however late its request arrives. Comparing
//! the owner's node id instead would not do: a node that lost a document and claimed it
//! again must not let writes from its first tenure through.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::entry::JournalEntry;
use super::store::{Compare, LeaseId, Op, OpResult, Revision, Store, StoreError, MAX_TXN_OPS};
use crate::op::OpId;

/// The most bytes of keys and values one commit txn may carry: under etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for the request's framing.
pub const MAX_COMMIT_BYTES: usize = 1_400_000;

/// The bytes of one snapshot piece: one piece per txn, under [`MAX_COMMIT_BYTES`].
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The largest snapshot: a document's text (64 MiB of UTF-8) with its dedupe table and
/// framing.
pub const MAX_SNAPSHOT_BYTES: usize = 80 << 20;

/// A snapshot's manifest (module notes): version 1, then the whole's length (u64), its
/// piece count (u32) and its crc32c (u32), little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Manifest {
    len: u64,
    chunks: u32,
    crc: u32,
}

impl Manifest {
    const VERSION: u8 = 1;
    const LEN: usize = 17;

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::LEN);
        bytes.push(Self::VERSION);
        bytes.extend_from_slice(&self.len.to_le_bytes());
        bytes.extend_from_slice(&self.chunks.to_le_bytes());
        bytes.extend_from_slice(&self.crc.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != Self::LEN || bytes[0] != Self::VERSION {
            return Err(format!(
                "a manifest of {} bytes, version {:?}",
                bytes.len(),
                bytes.first()
            ));
        }
        let manifest = Manifest {
            len: u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes")),
            chunks: u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(bytes[13..17].try_into().expect("4 bytes")),
        };
        if manifest.len.div_ceil(SNAPSHOT_CHUNK_BYTES as u64) != u64::from(manifest.chunks) {
            return Err(format!(
                "{} pieces for {} bytes",
                manifest.chunks, manifest.len
            ));
        }
        Ok(manifest)
    }
}

/// Keys read per page when listing members or loading a journal.
const PAGE_KEYS: usize = 128;

/// A document's fencing token: the create revision of its owner key for one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub Revision);

/// Who holds a document, as [`Member::claim`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns it, in this epoch.
    Owned(Epoch),
    /// Another node owns it (`addr`: its advertised address, `None` if it has just left).
    OwnedBy {
        /// The owner's node id.
        node: String,
        /// The owner's advertised address.
        addr: Option<String>,
    },
}

/// A live node, as its membership key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// The address it advertises to clients.
    pub addr: String,
}

/// Why a cluster request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// The store failed the request (its outcome may be unknown: [`StoreError::Unavailable`]).
    Store(StoreError),
    /// This node's lease is gone: it must stop acknowledging at once and register anew.
    LeaseExpired,
    /// Another live process is registered under this node id.
    NodeIdTaken {
        /// The address the live node advertises.
        addr: String,
    },
    /// A node or document id that cannot be used in a key.
    InvalidId(String),
    /// A journal or snapshot in the store does not decode or has a gap.
    Corrupt(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Store(e) => write!(f, "{e}"),
            ClusterError::LeaseExpired => f.write_str("this node's lease expired"),
            ClusterError::NodeIdTaken { addr } => {
                write!(f, "the node id is registered by a live node at {addr}")
            }
            ClusterError::InvalidId(m) | ClusterError::Corrupt(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClusterError {}

/// Why [`Member::commit`] wrote nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// These documents' owner keys no longer have the epochs the batch was written in:
    /// the node lost them and must acknowledge nothing more for them. No op of the
    /// batch was written, for any document.
    Lost(Vec<String>),
    /// The batch does not fit in one txn (too many ops or bytes): split it.
    TooLarge {
        /// Ops in the branch (the larger of compares and puts).
        ops: usize,
        /// Bytes of keys and values.
        bytes: usize,
    },
    /// The request failed.
    Cluster(ClusterError),
}

impl From<ClusterError> for CommitError {
    fn from(e: ClusterError) -> Self {
        CommitError::Cluster(e)
    }
}

/// One op of a group commit: its document, the epoch the node holds it in, the entry.
#[derive(Debug, Clone, Copy)]
pub struct JournalWrite<'a> {
    /// The document.
    pub doc: &'a str,
    /// The epoch this node claimed it in.
    pub epoch: Epoch,
    /// The op.
    pub entry: &'a JournalEntry,
}

/// A document as the store holds it, for a new owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The newest snapshot, as `(seq, bytes)`.
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// The journal's ops after the snapshot, in seq order, contiguous.
    pub ops: Vec<JournalEntry>,
    /// The op ids of `ops`, with their seq and fingerprint: a resend of one of them is
    /// answered with its original seq, never applied again. (The snapshot carries the
    /// dedupe table for the ops it covers.)
    pub applied: HashMap<OpId, (u64, u64)>,
}

impl Loaded {
    /// The document's version: the seq of its newest op (0: none).
    pub fn version(&self) -> u64 {
        self.ops
            .last()
            .map(|e| e.seq)
            .or(self.snapshot.as_ref().map(|(seq, _)| *seq))
            .unwrap_or(0)
    }
}

/// The escaping of ids in keys (module notes): `%` and `/` become `%25` and `%2F`.
fn escape(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

/// The cluster's keys under a prefix (module notes).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (no trailing `/`).
    pub fn new(prefix: &str) -> Self {
        assert!(!prefix.ends_with('/'));
        Keys {
            prefix: prefix.to_owned(),
        }
    }
    /// The prefix of the membership keys.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    /// A node's membership key.
    pub fn node(&self, node: &str) -> String {
        format!("{}{}", self.nodes(), escape(node))
    }
    /// A document's owner key.
    pub fn owner(&self, doc: &str) -> String {
        format!("{}/owner/{}", self.prefix, escape(doc))
    }
    /// The prefix of a document's journal keys.
    pub fn journal(&self, doc: &str) -> String {
        format!("{}/journal/{}/", self.prefix, escape(doc))
    }
    /// The journal key of a document's op `seq`.
    pub fn journal_entry(&self, doc: &str, seq: u64) -> String {
        format!("{}{seq:020}", self.journal(doc))
    }
    /// The prefix of a document's snapshot keys.
    pub fn snapshots(&self, doc: &str) -> String {
        format!("{}/snap/{}/", self.prefix, escape(doc))
    }
    /// The key of a document's snapshot manifest as of `seq`.
    pub fn snapshot(&self, doc: &str, seq: u64) -> String {
        format!("{}{seq:020}", self.snapshots(doc))
    }
    /// The prefix of every snapshot piece of a document.
    pub fn chunks(&self, doc: &str) -> String {
        format!("{}/chunk/{}/", self.prefix, escape(doc))
    }
    /// The prefix of the pieces of a document's snapshot as of `seq`.
    pub fn snapshot_chunks(&self, doc: &str, seq: u64) -> String {
        format!("{}{seq:020}/", self.chunks(doc))
    }
    /// The key of piece `index` of a document's snapshot as of `seq`.
    pub fn chunk(&self, doc: &str, seq: u64, index: u32) -> String {
        format!("{}{index:010}", self.snapshot_chunks(doc, seq))
    }
}

/// A node registered in the cluster: its lease, and the requests it makes as a member.
pub struct Member<S> {
    store: S,
    keys: Keys,
    node: String,
    /// The current lease (a new one after [`Member::reregister`]).
    lease: std::sync::atomic::AtomicI64,
    addr: String,
    ttl: Duration,
    registered_at: Revision,
}

fn store_error(e: StoreError, lease: LeaseId) -> ClusterError {
    match e {
        StoreError::LeaseNotFound(l) if l == lease => ClusterError::LeaseExpired,
        e => ClusterError::Store(e),
    }
}

impl<S: Store> Member<S> {
    /// Registers `node` at `addr` under a new lease of `ttl`. Fails with
    /// [`ClusterError::NodeIdTaken`] while another process holds the id (a restarted
    /// node waits for its previous lease to expire: two processes under one id would
    /// each believe the other's claims theirs).
    pub fn register(
        store: S,
        keys: Keys,
        node: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<Self, ClusterError> {
        if node.is_empty() {
            return Err(ClusterError::InvalidId("a node id is empty".into()));
        }
        let (lease, revision) = Self::put_membership(&store, &keys, node, addr, ttl)?;
        Ok(Member {
            store,
            keys,
            node: node.to_owned(),
            lease: std::sync::atomic::AtomicI64::new(lease.0),
            addr: addr.to_owned(),
            ttl,
            registered_at: revision,
        })
    }

    /// After its lease expired (etcd revoked it: a partition, a pause, etcd without a
    /// majority for longer than the TTL): registers again under a new lease. Every
    /// document this node owned is free by then (its owner keys went with the lease);
    /// the caller treats everything it served as lost and claims anew.
    pub fn reregister(&self) -> Result<(), ClusterError> {
        let (lease, _) =
            Self::put_membership(&self.store, &self.keys, &self.node, &self.addr, self.ttl)?;
        self.lease
            .store(lease.0, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// A new lease and the membership key bound to it, if no live process holds the id.
    fn put_membership(
        store: &S,
        keys: &Keys,
        node: &str,
        addr: &str,
        ttl: Duration,
    ) -> Result<(LeaseId, Revision), ClusterError> {
        let lease = store.grant_lease(ttl).map_err(ClusterError::Store)?;
        let key = keys.node(node);
        let response = store
            .txn(
                &[Compare::absent(key.clone())],
                &[Op::Put {
                    key: key.clone(),
                    value: addr.as_bytes().to_vec(),
                    lease: Some(lease),
                }],
                &[Op::Get { key }],
            )
            .map_err(|e| store_error(e, lease))?;
        if !response.succeeded {
            // Best effort: the lease would expire anyway.
            let _ = store.revoke(lease);
            let addr = match response.results.first() {
                Some(OpResult::Got(Some(kv))) => String::from_utf8_lossy(&kv.value).into_owned(),
                _ => String::new(),
            };
            return Err(ClusterError::NodeIdTaken { addr });
        }
        Ok((lease, response.revision))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The revision of this registration: unique to it in the cluster's life (revisions
    /// never repeat), so it can make other ids unique (client ids, for one).
    pub fn registered_at(&self) -> Revision {
        self.registered_at
    }

    /// The cluster's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This node's lease.
    pub fn lease(&self) -> LeaseId {
        LeaseId(self.lease.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Renews the lease; [`ClusterError::LeaseExpired`] once it is gone.
    pub fn keep_alive(&self) -> Result<(), ClusterError> {
        self.store
            .keep_alive(self.lease())
            .map_err(|e| store_error(e, self.lease()))
    }

    /// Leaves the cluster: revokes the lease, which frees every document this node owns
    /// and its membership key in one revision.
    pub fn leave(self) -> Result<(), ClusterError> {
        self.resign()
    }

    /// [`Member::leave`] through a shared reference (the member is inside a running
    /// replicator): the caller makes sure nothing is committed with it afterwards (every
    /// commit would fail its compare anyway, the owner keys being gone).
    pub fn resign(&self) -> Result<(), ClusterError> {
        self.store
            .revoke(self.lease())
            .map_err(|e| store_error(e, self.lease()))
    }

    /// Stops being a live node for placement (the drain at SIGTERM): the membership key
    /// is deleted, the lease and the documents owned under it stay until each is
    /// released (or [`Member::resign`]). Other nodes then place no new document here,
    /// and see the documents still owned here as owned by a node that is leaving.
    pub fn withdraw(&self) -> Result<(), ClusterError> {
        self.store
            .txn(
                &[],
                &[Op::Delete {
                    key: self.keys.node(&self.node),
                }],
                &[],
            )
            .map_err(|e| store_error(e, self.lease()))?;
        Ok(())
    }

    /// The live nodes, in id order (escaped), for rendezvous hashing.
    pub fn live_nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let prefix = self.keys.nodes();
        let mut nodes = Vec::new();
        self.for_each_key(&prefix, |kv| {
            let escaped = &kv.key[prefix.len()..];
            let node = escaped.replace("%2F", "/").replace("%25", "%");
            nodes.push(NodeInfo {
                node,
                addr: String::from_utf8_lossy(&kv.value).into_owned(),
            });
            Ok(())
        })?;
        Ok(nodes)
    }

    /// Calls `f` with every key under `prefix`, in key order, reading a page at a time.
    fn for_each_key(
        &self,
        prefix: &str,
        mut f: impl FnMut(&super::store::KeyValue) -> Result<(), ClusterError>,
    ) -> Result<(), ClusterError> {
        let mut from: Option<String> = None;
        loop {
            let page = self
                .store
                .get_prefix(prefix, from.as_deref(), PAGE_KEYS)
                .map_err(ClusterError::Store)?;
            for kv in &page.kvs {
                f(kv)?;
            }
            match (page.more, page.kvs.last()) {
                (true, Some(last)) => from = Some(format!("{}\0", last.key)),
                _ => return Ok(()),
            }
        }
    }

    /// Claims `doc` if nobody owns it. A document this node already owns under its
    /// current lease is returned with its epoch (a retry after an unknown outcome).
    /// The caller loads the document ([`Member::load`]) before serving it.
    pub fn claim(&self, doc: &str) -> Result<Claim, ClusterError> {
        let key = self.keys.owner(doc);
        let response = self
            .store
            .txn(
                &[Compare::absent(key.clone())],
                &[Op::Put {
                    key: key.clone(),
                    value: self.node.as_bytes().to_vec(),
                    lease: Some(self.lease()),
                }],
                &[Op::Get { key }],
            )
            .map_err(|e| store_error(e, self.lease()))?;
        if response.succeeded {
            // The put is the txn's only change: its revision is the key's create revision.
            return Ok(Claim::Owned(Epoch(response.revision)));
        }
        let Some(OpResult::Got(Some(owner))) = response.results.first() else {
            return Err(ClusterError::Corrupt(format!(
                "a failed claim of {doc:?} read no owner: {:?}",
                response.results
            )));
        };
        if owner.lease == Some(self.lease()) {
            return Ok(Claim::Owned(Epoch(owner.create_revision)));
        }
        let node = String::from_utf8_lossy(&owner.value).into_owned();
        let addr = self
            .store
            .get(&self.keys.node(&node))
            .map_err(ClusterError::Store)?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        Ok(Claim::OwnedBy { node, addr })
    }

    /// Who owns `doc` now, as the store says (`None`: nobody, or an owner whose
    /// membership key is gone: it is leaving). A read, for redirecting clients.
    pub fn owner(&self, doc: &str) -> Result<Option<NodeInfo>, ClusterError> {
        let Some(owner) = self
            .store
            .get(&self.keys.owner(doc))
            .map_err(ClusterError::Store)?
        else {
            return Ok(None);
        };
        let node = String::from_utf8_lossy(&owner.value).into_owned();
        let addr = self
            .store
            .get(&self.keys.node(&node))
            .map_err(ClusterError::Store)?;
        Ok(addr.map(|kv| NodeInfo {
            node,
            addr: String::from_utf8_lossy(&kv.value).into_owned(),
        }))
    }

    /// Gives up `doc` if this node still owns it in `epoch` (a handoff: the caller has
    /// committed everything first). `Ok(false)`: it did not own it any more.
    pub fn release(&self, doc: &str, epoch: Epoch) -> Result<bool, ClusterError> {
        let key = self.keys.owner(doc);
        let response = self
            .store
            .txn(
                &[Compare::created_at(key.clone(), epoch.0)],
                &[Op::Delete { key }],
                &[],
            )
            .map_err(|e| store_error(e, self.lease()))?;
        Ok(response.succeeded)
    }

    /// Writes a group commit: every op's journal key, in one txn that holds only if
    /// every document's owner key still has the batch's epoch for it. On success the
    /// ops are durable in the store and may be acknowledged (once the local log has them
    /// too); on [`CommitError::Lost`] nothing was written.
    ///
    /// A batch that was written whole before (a retry after an unknown outcome) writes
    /// the same values again: the journal is unchanged, so no compare guards against
    /// the keys existing.
    pub fn commit(&self, batch: &[JournalWrite<'_>]) -> Result<Revision, CommitError> {
        let mut epochs: BTreeMap<&str, Epoch> = BTreeMap::new();
        let mut puts = Vec::with_capacity(batch.len());
        let mut bytes = 0;
        for write in batch {
            let previous = epochs.insert(write.doc, write.epoch);
            assert!(
                previous.is_none_or(|e| e == write.epoch),
                "one document in two epochs in one batch"
            );
            let key = self.keys.journal_entry(write.doc, write.entry.seq);
            let value = write.entry.encode();
            bytes += key.len() + value.len();
            puts.push(Op::Put {
                key,
                value,
                lease: None,
            });
        }
        let ops = puts.len().max(epochs.len());
        if ops > MAX_TXN_OPS || bytes > MAX_COMMIT_BYTES {
            return Err(CommitError::TooLarge { ops, bytes });
        }
        let compares: Vec<Compare> = epochs
            .iter()
            .map(|(doc, epoch)| Compare::created_at(self.keys.owner(doc), epoch.0))
            .collect();
        let gets: Vec<Op> = epochs
            .keys()
            .map(|doc| Op::Get {
                key: self.keys.owner(doc),
            })
            .collect();
        let response = self
            .store
            .txn(&compares, &puts, &gets)
            .map_err(|e| CommitError::Cluster(store_error(e, self.lease())))?;
        if response.succeeded {
            return Ok(response.revision);
        }
        let lost = epochs
            .iter()
            .zip(&response.results)
            .filter(|((_, epoch), result)| {
                !matches!(result, OpResult::Got(Some(kv)) if kv.create_revision == epoch.0)
            })
            .map(|((doc, _), _)| (*doc).to_owned())
            .collect::<Vec<_>>();
        assert!(!lost.is_empty(), "a failed compare names a document");
        Err(CommitError::Lost(lost))
    }

    /// Stores a snapshot of `doc` as of `seq` if this node still owns it in `epoch`, and
    /// deletes the older snapshots but the newest of them (and the pieces of any cut
    /// short). The journal keys it
    /// covers may be deleted after this succeeded ([`Member::truncate`]), never before.
    /// The bytes are the sequencer's (text, seq, dedupe table), of any length up to
    /// [`MAX_SNAPSHOT_BYTES`]: written in pieces of [`SNAPSHOT_CHUNK_BYTES`], one txn
    /// each, then the manifest that makes them a snapshot (module notes).
    pub fn write_snapshot(
        &self,
        doc: &str,
        epoch: Epoch,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), CommitError> {
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(CommitError::TooLarge {
                ops: bytes.len().div_ceil(SNAPSHOT_CHUNK_BYTES),
                bytes: bytes.len(),
            });
        }
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            Vec::new()
        } else {
            bytes.chunks(SNAPSHOT_CHUNK_BYTES).collect()
        };
        for (index, chunk) in chunks.iter().enumerate() {
            let key = self.keys.chunk(doc, seq, index as u32);
            self.fenced(
                doc,
                epoch,
                vec![Op::Put {
                    key,
                    value: chunk.to_vec(),
                    lease: None,
                }],
            )?;
        }
        let manifest = Manifest {
            len: bytes.len() as u64,
            chunks: chunks.len() as u32,
            crc: crc32c::crc32c(bytes),
        };
        // The newest older snapshot is kept (a new owner loads from it while the journal
        // still continues from it, for the history a late op is transformed over); the
        // manifests before it and every piece of neither (older ones, and those of a
        // write cut short) go in the same txn as the manifest.
        let mut older = self.snapshot_keys(doc)?;
        older.retain(|(s, _)| *s < seq);
        let kept = older.pop().map(|(s, _)| s);
        let mut ops: Vec<Op> = older
            .into_iter()
            .map(|(_, key)| Op::Delete { key })
            .collect();
        for other in self.chunk_seqs(doc)? {
            if other != seq && Some(other) != kept {
                ops.push(Op::DeletePrefix {
                    prefix: self.keys.snapshot_chunks(doc, other),
                });
            }
        }
        // Bounded by what a document leaves behind: one older snapshot and the pieces of
        // at most a few writes cut short; past the txn's limit, the next write deletes
        // the rest.
        ops.truncate(MAX_TXN_OPS - 1);
        ops.push(Op::Put {
            key: self.keys.snapshot(doc, seq),
            value: manifest.encode(),
            lease: None,
        });
        self.fenced(doc, epoch, ops)
    }

    /// The seqs that snapshot pieces of `doc` are kept under.
    fn chunk_seqs(&self, doc: &str) -> Result<Vec<u64>, ClusterError> {
        let prefix = self.keys.chunks(doc);
        let mut seqs: Vec<u64> = Vec::new();
        self.for_each_key(&prefix, |kv| {
            let seq = kv.key[prefix.len()..]
                .split('/')
                .next()
                .and_then(|digits| key_seq(digits, ""))
                .ok_or_else(|| ClusterError::Corrupt(format!("bad piece key {:?}", kv.key)))?;
            if seqs.last() != Some(&seq) {
                seqs.push(seq);
            }
            Ok(())
        })?;
        Ok(seqs)
    }

    /// The bytes of `doc`'s snapshot as of `seq`, from its manifest and pieces, checked.
    fn read_snapshot(&self, doc: &str, seq: u64, manifest: &[u8]) -> Result<Vec<u8>, ClusterError> {
        let key = self.keys.snapshot(doc, seq);
        let manifest =
            Manifest::decode(manifest).map_err(|e| ClusterError::Corrupt(format!("{key}: {e}")))?;
        let mut bytes = Vec::with_capacity(manifest.len as usize);
        for index in 0..manifest.chunks {
            let piece = self.keys.chunk(doc, seq, index);
            let kv = self
                .store
                .get(&piece)
                .map_err(ClusterError::Store)?
                .ok_or_else(|| ClusterError::Corrupt(format!("{piece} is missing")))?;
            bytes.extend_from_slice(&kv.value);
        }
        if bytes.len() as u64 != manifest.len || crc32c::crc32c(&bytes) != manifest.crc {
            return Err(ClusterError::Corrupt(format!(
                "the snapshot {key} does not match its manifest ({} bytes read, {} expected, \
                 or its checksum differs)",
                bytes.len(),
                manifest.len
            )));
        }
        Ok(bytes)
    }

    /// Deletes the journal keys of `doc` up to `through_seq` (covered by a snapshot
    /// written first), at most [`MAX_TXN_OPS`] per call: the number deleted.
    pub fn truncate(&self, doc: &str, epoch: Epoch, through_seq: u64) -> Result<u64, CommitError> {
        let prefix = self.keys.journal(doc);
        let page = self
            .store
            .get_prefix(&prefix, None, MAX_TXN_OPS)
            .map_err(|e| CommitError::Cluster(ClusterError::Store(e)))?;
        let ops: Vec<Op> = page
            .kvs
            .into_iter()
            .filter(|kv| key_seq(&kv.key, &prefix).is_some_and(|s| s <= through_seq))
            .map(|kv| Op::Delete { key: kv.key })
            .collect();
        let deleted = ops.len() as u64;
        if deleted > 0 {
            self.fenced(doc, epoch, ops)?;
        }
        Ok(deleted)
    }

    /// Deletes `doc` from the store if this node still owns it in `epoch`: its journal,
    /// its snapshots and their pieces, and its owner key, in one txn (four ranges,
    /// whatever their sizes), so that it is gone whole or not at all. Its id is then free:
    /// the next claim starts it anew, empty. On [`CommitError::Lost`] nothing was deleted
    /// (another node serves it, with everything).
    pub fn erase(&self, doc: &str, epoch: Epoch) -> Result<(), CommitError> {
        let ops = vec![
            Op::DeletePrefix {
                prefix: self.keys.journal(doc),
            },
            Op::DeletePrefix {
                prefix: self.keys.snapshots(doc),
            },
            Op::DeletePrefix {
                prefix: self.keys.chunks(doc),
            },
            Op::Delete {
                key: self.keys.owner(doc),
            },
        ];
        self.fenced(doc, epoch, ops)
    }

    fn fenced(&self, doc: &str, epoch: Epoch, ops: Vec<Op>) -> Result<(), CommitError> {
        let compares = [Compare::created_at(self.keys.owner(doc), epoch.0)];
        let response = self
            .store
            .txn(&compares, &ops, &[])
            .map_err(|e| CommitError::Cluster(store_error(e, self.lease())))?;
        if response.succeeded {
            Ok(())
        } else {
            Err(CommitError::Lost(vec![doc.to_owned()]))
        }
    }

    fn snapshot_keys(&self, doc: &str) -> Result<Vec<(u64, String)>, ClusterError> {
        let prefix = self.keys.snapshots(doc);
        let page = self
            .store
            .get_prefix(&prefix, None, MAX_TXN_OPS)
            .map_err(ClusterError::Store)?;
        page.kvs
            .into_iter()
            .map(|kv| {
                let seq = key_seq(&kv.key, &prefix).ok_or_else(|| {
                    ClusterError::Corrupt(format!("bad snapshot key {:?}", kv.key))
                })?;
                Ok((seq, kv.key))
            })
            .collect()
    }

    /// `doc` as the store holds it: the oldest of its snapshots that the journal continues
    /// from (or none, if the journal runs from seq 1), and the journal after it; so that a
    /// new owner has as much history as the store keeps. Call it after claiming the
    /// document: then nobody else writes it meanwhile, so the pages read one after
    /// another see one journal.
    pub fn load(&self, doc: &str) -> Result<Loaded, ClusterError> {
        let snapshots = self.snapshot_keys(doc)?;
        let journal = self.journal_entries(doc)?;
        let head = journal
            .last()
            .map(|e| e.seq)
            .max(snapshots.last().map(|(s, _)| *s))
            .unwrap_or(0);
        // The journal from `base + 1` on runs without a gap to the head.
        let continues_from = |base: u64| {
            let mut next = base + 1;
            for entry in journal.iter().filter(|e| e.seq > base) {
                if entry.seq != next {
                    return false;
                }
                next += 1;
            }
            next == head + 1
        };
        let base = std::iter::once((0, None))
            .chain(snapshots.iter().map(|(s, key)| (*s, Some(key))))
            .find(|(s, _)| continues_from(*s))
            .ok_or_else(|| {
                ClusterError::Corrupt(format!(
                    "the journal of {doc:?} jumps: it continues from none of its snapshots \
                     (at {:?}; journal seqs {:?}..={:?})",
                    snapshots.iter().map(|(s, _)| s).collect::<Vec<_>>(),
                    journal.first().map(|e| e.seq),
                    journal.last().map(|e| e.seq),
                ))
            })?;
        let mut loaded = Loaded::default();
        if let (seq, Some(key)) = base {
            let kv = self.store.get(key).map_err(ClusterError::Store)?;
            let kv = kv.ok_or_else(|| ClusterError::Corrupt(format!("snapshot {key} vanished")))?;
            loaded.snapshot = Some((seq, self.read_snapshot(doc, seq, &kv.value)?));
        }
        for entry in journal.into_iter().filter(|e| e.seq > base.0) {
            let previous = loaded
                .applied
                .insert(entry.op_id, (entry.seq, entry.fingerprint));
            if let Some((seq, _)) = previous {
                return Err(ClusterError::Corrupt(format!(
                    "op {} is in the journal of {doc:?} twice (seqs {seq} and {})",
                    entry.op_id, entry.seq
                )));
            }
            loaded.ops.push(entry);
        }
        Ok(loaded)
    }

    /// Every journal entry of `doc`, in seq order, each checked against its key.
    fn journal_entries(&self, doc: &str) -> Result<Vec<JournalEntry>, ClusterError> {
        let prefix = self.keys.journal(doc);
        let mut entries = Vec::new();
        self.for_each_key(&prefix, |kv| {
            let entry = JournalEntry::decode(&kv.value)
                .map_err(|e| ClusterError::Corrupt(format!("{}: {e}", kv.key)))?;
            if key_seq(&kv.key, &prefix) != Some(entry.seq) {
                return Err(ClusterError::Corrupt(format!(
                    "{} holds seq {}",
                    kv.key, entry.seq
                )));
            }
            entries.push(entry);
            Ok(())
        })?;
        Ok(entries)
    }
}

/// The seq a journal or snapshot key ends with.
fn key_seq(key: &str, prefix: &str) -> Option<u64> {
    let digits = key.strip_prefix(prefix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cluster::mem_store::MemStore;

    const TTL: Duration = Duration::from_secs(5);

    fn member(store: &Arc<MemStore>, node: &str) -> Member<Arc<MemStore>> {
        Member::register(
            store.clone(),
            Keys::new("/q"),
            node,
            &format!("{node}:1"),
            TTL,
        )
        .unwrap()
    }

    fn entry(seq: u64, client_id: u64, local_seq: u64) -> JournalEntry {
        JournalEntry {
            seq,
            op_id: OpId {
                client_id,
                local_seq,
            },
            fingerprint: local_seq * 7,
            body: vec![seq as u8],
        }
    }

    /// The live nodes' ids, as `member` reads them.
    fn live(member: &Member<Arc<MemStore>>) -> Vec<String> {
        member
            .live_nodes()
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect()
    }

    fn owned(claim: Claim) -> Epoch {
        match claim {
            Claim::Owned(epoch) => epoch,
            other => panic!("not owned: {other:?}"),
        }
    }

    #[test]
    fn a_node_id_is_registered_once_until_its_lease_expires() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let e = Member::register(store.clone(), Keys::new("/q"), "a", "other:1", TTL);
        assert_eq!(
            e.err(),
            Some(ClusterError::NodeIdTaken { addr: "a:1".into() })
        );
        member(&store, "b/x");
        let live = a.live_nodes().unwrap();
        let ids: Vec<&str> = live.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(ids, ["a", "b/x"]);
        store.advance(TTL);
        assert_eq!(a.keep_alive(), Err(ClusterError::LeaseExpired));
        assert!(a.live_nodes().unwrap().is_empty());
        let a = member(&store, "a");
        assert_eq!(a.node(), "a");
        let e = Member::register(store.clone(), Keys::new("/q"), "", "x:1", TTL);
        assert!(matches!(e.err(), Some(ClusterError::InvalidId(_))));
    }

    #[test]
    fn a_node_that_leaves_frees_its_documents_and_membership_at_once() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        owned(a.claim("d").unwrap());
        assert!(matches!(b.claim("d").unwrap(), Claim::OwnedBy { .. }));
        a.leave().unwrap();
        assert_eq!(live(&b), ["b"]);
        owned(b.claim("d").unwrap());
    }

    #[test]
    fn a_withdrawn_node_is_not_live_and_keeps_its_documents_until_it_releases_them() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        let epoch = owned(a.claim("d").unwrap());
        a.withdraw().unwrap();
        assert_eq!(live(&b), ["b"]);
        // Still a's, as a node that is leaving: no address to send clients to.
        assert_eq!(b.owner("d").unwrap(), None);
        assert_eq!(
            b.claim("d").unwrap(),
            Claim::OwnedBy {
                node: "a".into(),
                addr: None
            }
        );
        // a's lease holds (its commits are still fenced by it) until it releases.
        a.keep_alive().unwrap();
        assert!(a.release("d", epoch).unwrap());
        assert!(owned(b.claim("d").unwrap()) > epoch);
    }

    #[test]
    fn a_claim_gives_the_owner_keys_create_revision_and_names_the_owner_to_others() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        let epoch = owned(a.claim("d").unwrap());
        let kv = store.get(&Keys::new("/q").owner("d")).unwrap().unwrap();
        assert_eq!(epoch, Epoch(kv.create_revision));
        // Claiming again under the same lease (a retry) gives the same epoch.
        assert_eq!(a.claim("d").unwrap(), Claim::Owned(epoch));
        assert_eq!(
            b.claim("d").unwrap(),
            Claim::OwnedBy {
                node: "a".into(),
                addr: Some("a:1".into())
            }
        );
        // The owner's lease expires: b claims in a newer epoch, and a's write is fenced.
        store.advance(Duration::from_secs(3));
        b.keep_alive().unwrap();
        store.advance(Duration::from_secs(3));
        let newer = owned(b.claim("d").unwrap());
        assert!(newer > epoch);
        let e = entry(1, 9, 1);
        let write = |epoch| {
            [JournalWrite {
                doc: "d",
                epoch,
                entry: &e,
            }]
        };
        assert_eq!(
            a.commit(&write(epoch)),
            Err(CommitError::Lost(vec!["d".into()]))
        );
        assert!(b.load("d").unwrap().ops.is_empty());
        b.commit(&write(newer)).unwrap();
        assert_eq!(b.load("d").unwrap().ops, vec![e.clone()]);
    }

    #[test]
    fn a_group_commit_is_all_or_nothing_and_names_the_lost_documents() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        let (d1, d2) = (owned(a.claim("d1").unwrap()), owned(a.claim("d2").unwrap()));
        let entries = [entry(1, 1, 1), entry(2, 1, 2), entry(1, 2, 1)];
        let batch = [
            JournalWrite {
                doc: "d1",
                epoch: d1,
                entry: &entries[0],
            },
            JournalWrite {
                doc: "d1",
                epoch: d1,
                entry: &entries[1],
            },
            JournalWrite {
                doc: "d2",
                epoch: d2,
                entry: &entries[2],
            },
        ];
        let revision = a.commit(&batch).unwrap();
        assert_eq!(revision, store.revision());
        // d2 is released and taken by b: a's next batch writes nothing, even for d1.
        assert!(a.release("d2", d2).unwrap());
        assert!(!a.release("d2", d2).unwrap());
        owned(b.claim("d2").unwrap());
        let more = [entry(3, 1, 3), entry(2, 2, 2)];
        let batch = [
            JournalWrite {
                doc: "d1",
                epoch: d1,
                entry: &more[0],
            },
            JournalWrite {
                doc: "d2",
                epoch: d2,
                entry: &more[1],
            },
        ];
        assert_eq!(a.commit(&batch), Err(CommitError::Lost(vec!["d2".into()])));
        let loaded = a.load("d1").unwrap();
        assert_eq!(loaded.ops, entries[..2].to_vec());
        assert_eq!(loaded.version(), 2);
        assert_eq!(
            loaded.applied[&OpId {
                client_id: 1,
                local_seq: 2
            }],
            (2, 14),
            "a resend is answered with its original seq and checked by its fingerprint"
        );
        assert_eq!(b.load("d2").unwrap().ops, entries[2..].to_vec());
    }

    #[test]
    fn a_batch_over_etcds_limits_is_refused_before_it_is_sent() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let epoch = owned(a.claim("d").unwrap());
        let entries: Vec<JournalEntry> = (1..=129).map(|s| entry(s, 1, s)).collect();
        let batch: Vec<JournalWrite<'_>> = entries
            .iter()
            .map(|entry| JournalWrite {
                doc: "d",
                epoch,
                entry,
            })
            .collect();
        assert!(matches!(
            a.commit(&batch),
            Err(CommitError::TooLarge { ops: 129, .. })
        ));
        a.commit(&batch[..128]).unwrap();
        assert_eq!(a.load("d").unwrap().version(), 128);
    }

    #[test]
    fn document_ids_with_slashes_do_not_share_a_journal() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let (e1, e2) = (owned(a.claim("x").unwrap()), owned(a.claim("x/y").unwrap()));
        let (one, two) = (entry(1, 1, 1), entry(1, 2, 1));
        a.commit(&[
            JournalWrite {
                doc: "x",
                epoch: e1,
                entry: &one,
            },
            JournalWrite {
                doc: "x/y",
                epoch: e2,
                entry: &two,
            },
        ])
        .unwrap();
        assert_eq!(a.load("x").unwrap().ops, vec![one]);
        assert_eq!(a.load("x/y").unwrap().ops, vec![two]);
    }

    #[test]
    fn load_refuses_a_journal_with_a_gap_or_a_repeated_op() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let epoch = owned(a.claim("d").unwrap());
        let (one, three) = (entry(1, 1, 1), entry(3, 1, 3));
        a.commit(&[
            JournalWrite {
                doc: "d",
                epoch,
                entry: &one,
            },
            JournalWrite {
                doc: "d",
                epoch,
                entry: &three,
            },
        ])
        .unwrap();
        assert!(matches!(a.load("d"), Err(ClusterError::Corrupt(m)) if m.contains("jumps")));
        let again = entry(2, 1, 1);
        a.commit(&[JournalWrite {
            doc: "d",
            epoch,
            entry: &again,
        }])
        .unwrap();
        assert!(matches!(a.load("d"), Err(ClusterError::Corrupt(m)) if m.contains("twice")));
    }

    #[test]
    fn a_snapshot_is_loaded_with_the_journal_after_it_and_truncation_is_fenced() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        let epoch = owned(a.claim("d").unwrap());
        let entries: Vec<JournalEntry> = (1..=5).map(|s| entry(s, 1, s)).collect();
        let batch: Vec<JournalWrite<'_>> = entries
            .iter()
            .map(|entry| JournalWrite {
                doc: "d",
                epoch,
                entry,
            })
            .collect();
        a.commit(&batch).unwrap();
        let huge = vec![0; MAX_SNAPSHOT_BYTES + 1];
        assert!(matches!(
            a.write_snapshot("d", epoch, 2, &huge),
            Err(CommitError::TooLarge { .. })
        ));
        a.write_snapshot("d", epoch, 2, b"at 2").unwrap();
        a.write_snapshot("d", epoch, 3, b"at 3").unwrap();
        // Before truncation the journal runs from seq 1: all of it, no snapshot.
        let whole = a.load("d").unwrap();
        assert_eq!(whole.snapshot, None);
        assert_eq!(whole.ops, entries);
        // Truncated through 2: from the snapshot at 2, the oldest it continues from.
        assert_eq!(a.truncate("d", epoch, 2).unwrap(), 2);
        let from_2 = a.load("d").unwrap();
        assert_eq!(from_2.snapshot, Some((2, b"at 2".to_vec())));
        assert_eq!(from_2.ops, entries[2..].to_vec());
        assert_eq!(from_2.version(), 5);
        // Through 3: from the snapshot at 3.
        assert_eq!(a.truncate("d", epoch, 3).unwrap(), 1);
        let loaded = a.load("d").unwrap();
        assert_eq!(loaded.snapshot, Some((3, b"at 3".to_vec())));
        assert_eq!(loaded.ops, entries[3..].to_vec());
        // A third snapshot deletes the first, keeping the one before it.
        a.write_snapshot("d", epoch, 4, b"at 4").unwrap();
        let snaps = store
            .get_prefix(&Keys::new("/q").snapshots("d"), None, 10)
            .unwrap();
        assert_eq!(
            snaps
                .kvs
                .iter()
                .map(|kv| kv.key.clone())
                .collect::<Vec<_>>(),
            vec![
                Keys::new("/q").snapshot("d", 3),
                Keys::new("/q").snapshot("d", 4)
            ]
        );
        assert_eq!(a.load("d").unwrap(), loaded, "the journal continues from 3");
        // A node that lost the document can neither snapshot nor truncate it.
        assert!(a.release("d", epoch).unwrap());
        owned(b.claim("d").unwrap());
        assert!(matches!(
            a.write_snapshot("d", epoch, 5, b"x"),
            Err(CommitError::Lost(_))
        ));
        assert!(matches!(
            a.truncate("d", epoch, 5),
            Err(CommitError::Lost(_))
        ));
        assert_eq!(b.load("d").unwrap(), loaded);
    }

    #[test]
    fn an_erased_document_is_gone_whole_its_neighbours_kept_and_a_claim_starts_it_empty() {
        let store = Arc::new(MemStore::new());
        let (a, b) = (member(&store, "a"), member(&store, "b"));
        let keys = Keys::new("/q");
        // `d`, and `d/x`, whose keys `d`'s prefixes must not reach (ids are escaped).
        let mut epochs = Vec::new();
        for doc in ["d", "d/x"] {
            let epoch = owned(a.claim(doc).unwrap());
            let entries: Vec<JournalEntry> = (1..=4).map(|s| entry(s, 1, s)).collect();
            let batch: Vec<JournalWrite<'_>> = entries
                .iter()
                .map(|entry| JournalWrite { doc, epoch, entry })
                .collect();
            a.commit(&batch).unwrap();
            a.write_snapshot(doc, epoch, 2, &vec![7; SNAPSHOT_CHUNK_BYTES + 1])
                .unwrap();
            a.write_snapshot(doc, epoch, 3, b"at 3").unwrap();
            epochs.push(epoch);
        }
        let kept = a.load("d/x").unwrap();
        let all_keys = || -> Vec<String> {
            let page = store.get_prefix("/q/", None, 1000).unwrap();
            page.kvs.into_iter().map(|kv| kv.key).collect()
        };
        let of = |doc: &str| -> Vec<String> {
            let escaped = keys.owner(doc)["/q/owner/".len()..].to_owned();
            all_keys()
                .into_iter()
                .filter(|k| k.split('/').nth(3) == Some(escaped.as_str()))
                .collect()
        };
        // Four journal keys, two manifests, three pieces and the owner key.
        assert_eq!(of("d").len(), 10, "{:?}", of("d"));
        // Fenced: an erasure in an epoch that is not the owner key's deletes nothing.
        assert!(matches!(
            a.erase("d", Epoch(epochs[0].0 + 1000)),
            Err(CommitError::Lost(_))
        ));
        assert_eq!(of("d").len(), 10);
        a.erase("d", epochs[0]).unwrap();
        assert_eq!(of("d"), Vec::<String>::new());
        assert_eq!(a.load("d/x").unwrap(), kept, "its neighbour is untouched");
        assert_eq!(b.owner("d").unwrap(), None);
        // Its id is free: the next claim, by any node, starts it empty, in a new epoch.
        let epoch = owned(b.claim("d").unwrap());
        assert!(epoch > epochs[1]);
        let loaded = b.load("d").unwrap();
        assert_eq!((loaded.snapshot, loaded.ops.len()), (None, 0));
        // Erasing it again (a retry whose answer was lost) is refused: another epoch.
        assert!(matches!(a.erase("d", epochs[0]), Err(CommitError::Lost(_))));
    }

    fn chunk_keys(store: &MemStore, doc: &str) -> Vec<String> {
        let page = store
            .get_prefix(&Keys::new("/q").chunks(doc), None, 1000)
            .unwrap();
        page.kvs.into_iter().map(|kv| kv.key).collect()
    }

    #[test]
    fn a_snapshot_larger_than_a_request_is_written_in_pieces_and_read_whole() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let epoch = owned(a.claim("d").unwrap());
        // Two and a half pieces, every byte telling where it was.
        let bytes: Vec<u8> = (0..SNAPSHOT_CHUNK_BYTES * 5 / 2)
            .map(|i| (i % 251) as u8)
            .collect();
        a.write_snapshot("d", epoch, 4, &bytes).unwrap();
        assert_eq!(chunk_keys(&store, "d").len(), 3);
        assert_eq!(a.load("d").unwrap().snapshot, Some((4, bytes.clone())));
        // An empty snapshot has no pieces at all.
        a.write_snapshot("e", owned(a.claim("e").unwrap()), 1, b"")
            .unwrap();
        assert_eq!(a.load("e").unwrap().snapshot, Some((1, Vec::new())));
        assert!(chunk_keys(&store, "e").is_empty());
    }

    #[test]
    fn a_snapshot_cut_short_is_never_read_and_its_pieces_go_with_the_next_write() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let epoch = owned(a.claim("d").unwrap());
        a.write_snapshot("d", epoch, 2, b"at 2").unwrap();
        // A write at 6 that stopped after its first piece (a crash): no manifest.
        store
            .txn(
                &[],
                &[Op::Put {
                    key: Keys::new("/q").chunk("d", 6, 0),
                    value: b"half of 6".to_vec(),
                    lease: None,
                }],
                &[],
            )
            .unwrap();
        assert_eq!(a.load("d").unwrap().snapshot, Some((2, b"at 2".to_vec())));
        a.write_snapshot("d", epoch, 4, b"at 4").unwrap();
        assert_eq!(a.load("d").unwrap().snapshot, Some((4, b"at 4".to_vec())));
        assert_eq!(
            chunk_keys(&store, "d"),
            vec![
                Keys::new("/q").chunk("d", 2, 0),
                Keys::new("/q").chunk("d", 4, 0)
            ],
            "the cut-short snapshot's piece is gone; the previous snapshot's is kept"
        );
    }

    #[test]
    fn a_snapshot_piece_that_does_not_match_its_manifest_is_an_error() {
        let store = Arc::new(MemStore::new());
        let a = member(&store, "a");
        let epoch = owned(a.claim("d").unwrap());
        let bytes = vec![7; SNAPSHOT_CHUNK_BYTES + 10];
        a.write_snapshot("d", epoch, 3, &bytes).unwrap();
        let piece = Keys::new("/q").chunk("d", 3, 1);
        let put = |value: &[u8]| {
            store
                .txn(
                    &[],
                    &[Op::Put {
                        key: piece.clone(),
                        value: value.to_vec(),
                        lease: None,
                    }],
                    &[],
                )
                .unwrap();
        };
        put(&[8; 10]);
        assert!(matches!(a.load("d"), Err(ClusterError::Corrupt(m)) if m.contains("manifest")));
        put(&[7; 9]);
        assert!(matches!(a.load("d"), Err(ClusterError::Corrupt(_))));
        store
            .txn(&[], &[Op::Delete { key: piece.clone() }], &[])
            .unwrap();
        assert!(matches!(a.load("d"), Err(ClusterError::Corrupt(m)) if m.contains("missing")));
        put(&[7; 10]);
        assert_eq!(a.load("d").unwrap().snapshot, Some((3, bytes)));
    }
}
