//! An in-memory [`Store`] with etcd's semantics (see [`super::store`]), for tests and the
//! model test: deterministic, and with a clock of its own that only the test moves
//! ([`MemStore::advance`]), so a lease expires exactly when a schedule says it does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use super::store::{
    duplicate_key, Compare, KeyValue, LeaseId, Op, OpResult, Range, Revision, Store, StoreError,
    Target, TxnError, TxnResponse, MAX_TXN_OPS,
};

struct Lease {
    ttl: Duration,
    /// The lease expires when the clock reaches this.
    deadline: Duration,
    keys: BTreeSet<String>,
}

struct State {
    /// The revision of the newest change; 1 for an empty store, as in a new etcd.
    revision: Revision,
    now: Duration,
    next_lease: i64,
    kvs: BTreeMap<String, KeyValue>,
    leases: BTreeMap<LeaseId, Lease>,
    /// What happens to the next txn (a fault the test asked for).
    next_txn_fault: Option<Fault>,
    /// For each key a txn deleted whose response was lost ([`Fault::ResponseLost`]): how
    /// many such txns deleted it.
    deleted_unanswered: BTreeMap<String, u64>,
}

/// An uncertain outcome for the next txn: etcd's client sees an error (a timeout, a
/// dropped connection, a leader change) and cannot tell whether the txn was applied
/// (etcd.io/docs/v3.5/learning/api_guarantees, "Operation completed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The txn is applied; its response is lost.
    ResponseLost,
    /// The txn never reaches the store.
    RequestLost,
}

/// The in-memory stand-in for etcd.
pub struct MemStore {
    state: Mutex<State>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store at revision 1 and time zero.
    pub fn new() -> Self {
        MemStore {
            state: Mutex::new(State {
                revision: 1,
                now: Duration::ZERO,
                next_lease: 1,
                kvs: BTreeMap::new(),
                leases: BTreeMap::new(),
                next_txn_fault: None,
                deleted_unanswered: BTreeMap::new(),
            }),
        }
    }

    /// Moves the store's clock on by `by`, expiring (in lease id order, one revision
    /// each) every lease whose deadline it reaches.
    pub fn advance(&self, by: Duration) {
        let mut state = self.lock();
        state.now += by;
        let now = state.now;
        let expired: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for lease in expired {
            state.remove_lease(lease);
        }
    }

    /// Makes the next txn fail with [`StoreError::Unavailable`], applied or not.
    pub fn fault_next_txn(&self, fault: Fault) {
        self.lock().next_txn_fault = Some(fault);
    }

    /// How many txns deleted `key` and had their response lost ([`Fault::ResponseLost`]):
    /// callers told "unavailable" whose deletion of it took effect all the same. A test
    /// that finds a key gone after a failed deletion asks this, so that only a lost answer
    /// of a txn that deleted that very key excuses it (not one of any other txn).
    pub fn deleted_unanswered(&self, key: &str) -> u64 {
        self.lock()
            .deleted_unanswered
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The store's clock: the time advanced since it was made.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// The revision of the newest change.
    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    /// Whether the lease exists (granted, and neither expired nor revoked).
    pub fn lease_alive(&self, lease: LeaseId) -> bool {
        self.lock().leases.contains_key(&lease)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under the lock (a failed assertion in a test) leaves consistent state:
        // every change below is made after its checks.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn remove_lease(&mut self, lease: LeaseId) -> bool {
        let Some(removed) = self.leases.remove(&lease) else {
            return false;
        };
        if !removed.keys.is_empty() {
            self.revision += 1;
            for key in &removed.keys {
                let kv = self.kvs.remove(key);
                assert_eq!(kv.and_then(|kv| kv.lease), Some(lease));
            }
        }
        true
    }

    fn compare_holds(&self, compare: &Compare) -> bool {
        let kv = self.kvs.get(&compare.key);
        match &compare.target {
            Target::CreateRevision(rev) => kv.map_or(0, |kv| kv.create_revision) == *rev,
            Target::ModRevision(rev) => kv.map_or(0, |kv| kv.mod_revision) == *rev,
            Target::Value(value) => kv.is_some_and(|kv| kv.value == *value),
        }
    }

    /// What etcd checks before evaluating a txn (in its gRPC layer), for each branch.
    fn check_branch(ops: &[Op]) -> Result<(), StoreError> {
        if ops.len() > MAX_TXN_OPS {
            return Err(StoreError::Txn(TxnError::TooManyOps(ops.len())));
        }
        match duplicate_key(ops) {
            Some(key) => Err(StoreError::Txn(TxnError::DuplicateKey(key.to_owned()))),
            None => Ok(()),
        }
    }

    /// What etcd checks when it applies the branch taken: every lease a put binds to
    /// exists.
    fn check_leases(&self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
            {
                if !self.leases.contains_key(lease) {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
            }
        }
        Ok(())
    }

    /// Runs a checked branch at revision `self.revision + 1`, which becomes the store's
    /// revision if anything changed: each op's result, and the keys it deleted.
    fn apply(&mut self, ops: &[Op]) -> (Vec<OpResult>, Vec<String>) {
        let rev = self.revision + 1;
        let mut changed = false;
        let mut results = Vec::with_capacity(ops.len());
        let mut deleted = Vec::new();
        for op in ops {
            let result = match op {
                Op::Put { key, value, lease } => {
                    self.put(key, value, *lease, rev);
                    changed = true;
                    OpResult::Put
                }
                Op::Delete { key } => {
                    let found = self.delete(key);
                    if found {
                        deleted.push(key.clone());
                    }
                    OpResult::Deleted(u64::from(found))
                }
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<String> = self
                        .kvs
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in &keys {
                        self.delete(key);
                    }
                    let n = keys.len() as u64;
                    deleted.extend(keys);
                    OpResult::Deleted(n)
                }
                Op::Get { key } => OpResult::Got(self.kvs.get(key).cloned()),
            };
            if matches!(result, OpResult::Deleted(n) if n > 0) {
                changed = true;
            }
            results.push(result);
        }
        if changed {
            self.revision = rev;
        }
        (results, deleted)
    }

    fn put(&mut self, key: &str, value: &[u8], lease: Option<LeaseId>, rev: Revision) {
        let previous = self.kvs.get(key).cloned();
        if let Some(old) = previous.as_ref().and_then(|kv| kv.lease) {
            if let Some(old) = self.leases.get_mut(&old) {
                old.keys.remove(key);
            }
        }
        if let Some(lease) = lease {
            let lease = self
                .leases
                .get_mut(&lease)
                .expect("checked before applying");
            lease.keys.insert(key.to_owned());
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: previous.as_ref().map_or(rev, |kv| kv.create_revision),
            mod_revision: rev,
            version: previous.as_ref().map_or(1, |kv| kv.version + 1),
            lease,
        };
        self.kvs.insert(key.to_owned(), kv);
    }

    fn delete(&mut self, key: &str) -> bool {
        let Some(kv) = self.kvs.remove(key) else {
            return false;
        };
        if let Some(lease) = kv.lease.and_then(|lease| self.leases.get_mut(&lease)) {
            lease.keys.remove(key);
        }
        true
    }
}

impl Store for MemStore {
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        assert!(!ttl.is_zero(), "a lease needs a positive TTL");
        let mut state = self.lock();
        let id = LeaseId(state.next_lease);
        state.next_lease += 1;
        let deadline = state.now + ttl;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut state = self.lock();
        let now = state.now;
        let lease_state = state
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        lease_state.deadline = now + lease_state.ttl;
        Ok(())
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self.lock().remove_lease(lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    fn get_prefix(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        assert!(limit > 0, "an unbounded read");
        let state = self.lock();
        let start = from.filter(|from| *from > prefix).unwrap_or(prefix);
        let mut matching = state
            .kvs
            .range(start.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        let kvs: Vec<KeyValue> = matching
            .by_ref()
            .take(limit)
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Range {
            kvs,
            more: matching.next().is_some(),
            revision: state.revision,
        })
    }

    fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError> {
        let mut state = self.lock();
        let fault = state.next_txn_fault.take();
        if fault == Some(Fault::RequestLost) {
            return Err(StoreError::Unavailable(
                "request lost (a test's fault)".into(),
            ));
        }
        if compares.len() > MAX_TXN_OPS {
            return Err(StoreError::Txn(TxnError::TooManyOps(compares.len())));
        }
        // etcd checks both branches before evaluating (a malformed txn fails whatever
        // the compares say); a lease is checked in the branch taken, when it is applied.
        for branch in [success, failure] {
            State::check_branch(branch)?;
        }
        let succeeded = compares.iter().all(|c| state.compare_holds(c));
        let branch = if succeeded { success } else { failure };
        state.check_leases(branch)?;
        let (results, deleted) = state.apply(branch);
        if fault == Some(Fault::ResponseLost) {
            for key in deleted {
                *state.deleted_unanswered.entry(key).or_default() += 1;
            }
            return Err(StoreError::Unavailable(
                "response lost (a test's fault)".into(),
            ));
        }
        Ok(TxnResponse {
            succeeded,
            revision: state.revision,
            results,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            lease: None,
        }
    }

    fn put_leased(key: &str, lease: LeaseId) -> Op {
        Op::Put {
            key: key.into(),
            value: b"x".to_vec(),
            lease: Some(lease),
        }
    }

    #[test]
    fn a_txns_puts_share_one_revision_and_reads_do_not_advance_it() {
        let store = MemStore::new();
        assert_eq!(store.revision(), 1);
        let r = store
            .txn(&[], &[put("a", "1"), put("b", "2")], &[])
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, 2);
        let a = store.get("a").unwrap().unwrap();
        let b = store.get("b").unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 2, 1));
        assert_eq!((b.create_revision, b.mod_revision), (2, 2));
        let r = store.txn(&[], &[Op::Get { key: "a".into() }], &[]).unwrap();
        assert_eq!(r.revision, 2);
        assert_eq!(r.results, vec![OpResult::Got(Some(a))]);
        // Deleting nothing changes nothing.
        let r = store
            .txn(&[], &[Op::Delete { key: "zz".into() }], &[])
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (2, &[OpResult::Deleted(0)][..])
        );
    }

    #[test]
    fn a_put_to_an_existing_key_keeps_its_create_revision_and_counts_a_version() {
        let store = MemStore::new();
        store.txn(&[], &[put("a", "1")], &[]).unwrap();
        store.txn(&[], &[put("a", "2")], &[]).unwrap();
        let a = store.get("a").unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
        assert_eq!(a.value, b"2");
    }

    #[test]
    fn a_key_deleted_and_put_again_has_a_new_create_revision() {
        let store = MemStore::new();
        store.txn(&[], &[put("a", "1")], &[]).unwrap();
        let r = store
            .txn(&[], &[Op::Delete { key: "a".into() }], &[])
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (3, &[OpResult::Deleted(1)][..])
        );
        assert!(store.get("a").unwrap().is_none());
        store.txn(&[], &[put("a", "1")], &[]).unwrap();
        let a = store.get("a").unwrap().unwrap();
        assert_eq!((a.create_revision, a.version), (4, 1));
        // The old create revision no longer matches: a fence.
        let r = store
            .txn(&[Compare::created_at("a", 2)], &[put("b", "1")], &[])
            .unwrap();
        assert!(!r.succeeded);
        assert!(store.get("b").unwrap().is_none());
    }

    #[test]
    fn a_failed_compare_runs_the_failure_branch_and_nothing_of_the_success_one() {
        let store = MemStore::new();
        store.txn(&[], &[put("a", "1")], &[]).unwrap();
        let compares = [
            Compare::created_at("a", 2),
            Compare {
                key: "a".into(),
                target: Target::Value(b"2".to_vec()),
            },
        ];
        let r = store
            .txn(
                &compares,
                &[put("b", "1"), put("c", "1")],
                &[Op::Get { key: "a".into() }],
            )
            .unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.revision, 2);
        assert!(matches!(&r.results[..], [OpResult::Got(Some(kv))] if kv.value == b"1"));
        assert!(store.get("b").unwrap().is_none());
        assert!(store.get("c").unwrap().is_none());
    }

    #[test]
    fn compares_see_absent_keys_as_revision_zero_and_never_equal_to_a_value() {
        let store = MemStore::new();
        let absent = |target| Compare {
            key: "nope".into(),
            target,
        };
        for (target, holds) in [
            (Target::CreateRevision(0), true),
            (Target::ModRevision(0), true),
            (Target::Value(Vec::new()), false),
            (Target::CreateRevision(1), false),
        ] {
            let r = store.txn(&[absent(target.clone())], &[], &[]).unwrap();
            assert_eq!(r.succeeded, holds, "{target:?}");
        }
        store.txn(&[], &[put("a", "v")], &[]).unwrap();
        let mod_rev = |rev| Compare {
            key: "a".into(),
            target: Target::ModRevision(rev),
        };
        assert!(store.txn(&[mod_rev(2)], &[], &[]).unwrap().succeeded);
        assert!(!store.txn(&[mod_rev(1)], &[], &[]).unwrap().succeeded);
        assert!(
            !store
                .txn(&[Compare::absent("a")], &[], &[])
                .unwrap()
                .succeeded
        );
    }

    #[test]
    fn malformed_txns_are_refused_whole() {
        let store = MemStore::new();
        let e = store.txn(&[], &[put("a", "1"), put("a", "2")], &[]);
        assert_eq!(e, Err(StoreError::Txn(TxnError::DuplicateKey("a".into()))));
        let delete_prefix = Op::DeletePrefix {
            prefix: "p/".into(),
        };
        let e = store.txn(&[], &[], &[put("p/a", "1"), delete_prefix.clone()]);
        assert_eq!(
            e,
            Err(StoreError::Txn(TxnError::DuplicateKey("p/a".into())))
        );
        // Deletes may overlap, as in etcd.
        let delete = Op::Delete { key: "p/a".into() };
        assert!(
            store
                .txn(&[], &[delete, delete_prefix], &[])
                .unwrap()
                .succeeded
        );
        let many: Vec<Op> = (0..=MAX_TXN_OPS)
            .map(|i| put(&format!("k{i}"), ""))
            .collect();
        let e = store.txn(&[], &many, &[]);
        assert_eq!(
            e,
            Err(StoreError::Txn(TxnError::TooManyOps(MAX_TXN_OPS + 1)))
        );
        // The limit is per branch: exactly MAX_TXN_OPS fits.
        assert!(store.txn(&[], &many[..MAX_TXN_OPS], &[]).unwrap().succeeded);
        let e = store.txn(&[], &[put("x", "1"), put_leased("y", LeaseId(99))], &[]);
        assert_eq!(e, Err(StoreError::LeaseNotFound(LeaseId(99))));
        assert!(store.get("x").unwrap().is_none());
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn delete_prefix_removes_only_keys_under_the_prefix_in_one_revision() {
        let store = MemStore::new();
        store
            .txn(
                &[],
                &[put("p/a", ""), put("p/b", ""), put("pq", ""), put("o", "")],
                &[],
            )
            .unwrap();
        let r = store
            .txn(
                &[],
                &[Op::DeletePrefix {
                    prefix: "p/".into(),
                }],
                &[],
            )
            .unwrap();
        assert_eq!(
            (r.revision, &r.results[..]),
            (3, &[OpResult::Deleted(2)][..])
        );
        assert!(store.get("pq").unwrap().is_some());
        assert!(store.get("o").unwrap().is_some());
        assert!(store.get("p/a").unwrap().is_none());
    }

    #[test]
    fn get_prefix_is_ordered_limited_and_resumable() {
        let store = MemStore::new();
        let ops: Vec<Op> = ["p/c", "p/a", "p/b", "q/a", "p"]
            .iter()
            .map(|k| put(k, k))
            .collect();
        store.txn(&[], &ops, &[]).unwrap();
        let page = store.get_prefix("p/", None, 2).unwrap();
        let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!((keys, page.more), (vec!["p/a", "p/b"], true));
        let page = store.get_prefix("p/", Some("p/b\0"), 2).unwrap();
        let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!((keys, page.more), (vec!["p/c"], false));
    }

    #[test]
    fn an_expired_lease_deletes_its_keys_in_one_revision_and_cannot_be_renewed() {
        let store = MemStore::new();
        let lease = store.grant_lease(Duration::from_secs(5)).unwrap();
        let other = store.grant_lease(Duration::from_secs(60)).unwrap();
        store
            .txn(
                &[],
                &[
                    put_leased("a", lease),
                    put_leased("b", lease),
                    put_leased("c", other),
                ],
                &[],
            )
            .unwrap();
        store.advance(Duration::from_secs(4));
        store.keep_alive(lease).unwrap();
        store.advance(Duration::from_secs(4));
        // Renewed at 4 s, so alive until 9 s.
        assert!(store.get("a").unwrap().is_some());
        assert_eq!(store.revision(), 2);
        store.advance(Duration::from_secs(1));
        assert!(store.get("a").unwrap().is_none());
        assert!(store.get("b").unwrap().is_none());
        assert!(store.get("c").unwrap().is_some());
        assert_eq!(store.revision(), 3);
        assert_eq!(
            store.keep_alive(lease),
            Err(StoreError::LeaseNotFound(lease))
        );
        // A put bound to the expired lease is refused, and changes nothing.
        let e = store.txn(&[], &[put_leased("a", lease)], &[]);
        assert_eq!(e, Err(StoreError::LeaseNotFound(lease)));
        assert_eq!(store.revision(), 3);
    }

    #[test]
    fn a_faulted_txn_answers_unavailable_whether_or_not_it_was_applied() {
        let store = MemStore::new();
        store.fault_next_txn(Fault::RequestLost);
        assert!(matches!(
            store.txn(&[], &[put("a", "1")], &[]),
            Err(StoreError::Unavailable(_))
        ));
        assert!(store.get("a").unwrap().is_none());
        store.fault_next_txn(Fault::ResponseLost);
        assert!(matches!(
            store.txn(&[], &[put("a", "1")], &[]),
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(store.get("a").unwrap().unwrap().create_revision, 2);
        // One fault, one txn.
        assert!(store.txn(&[], &[put("b", "1")], &[]).unwrap().succeeded);
    }

    #[test]
    fn a_lost_answer_records_the_keys_its_txn_deleted_and_no_others() {
        let store = MemStore::new();
        let keys = [
            put("p/a", "1"),
            put("p/b", "1"),
            put("q", "1"),
            put("r", "1"),
        ];
        store.txn(&[], &keys, &[]).unwrap();
        // Deleted with its answer: not recorded.
        store
            .txn(&[], &[Op::Delete { key: "r".into() }], &[])
            .unwrap();
        store.fault_next_txn(Fault::ResponseLost);
        let ops = [
            Op::DeletePrefix {
                prefix: "p/".into(),
            },
            Op::Delete { key: "q".into() },
            Op::Delete {
                key: "absent".into(),
            },
        ];
        assert!(store.txn(&[], &ops, &[]).is_err());
        for (key, times) in [("p/a", 1), ("p/b", 1), ("q", 1), ("r", 0), ("absent", 0)] {
            assert_eq!(store.deleted_unanswered(key), times, "{key}");
        }
        // A lost request deleted nothing.
        store.txn(&[], &[put("q", "2")], &[]).unwrap();
        store.fault_next_txn(Fault::RequestLost);
        assert!(store
            .txn(&[], &[Op::Delete { key: "q".into() }], &[])
            .is_err());
        assert_eq!(store.deleted_unanswered("q"), 1);
        store.fault_next_txn(Fault::ResponseLost);
        assert!(store
            .txn(&[], &[Op::Delete { key: "q".into() }], &[])
            .is_err());
        assert_eq!(store.deleted_unanswered("q"), 2);
    }

    #[test]
    fn a_revoked_lease_deletes_its_keys_and_a_key_put_without_it_is_freed() {
        let store = MemStore::new();
        let lease = store.grant_lease(Duration::from_secs(5)).unwrap();
        store
            .txn(&[], &[put_leased("a", lease), put_leased("b", lease)], &[])
            .unwrap();
        // Put again without a lease: the key no longer belongs to the lease.
        store.txn(&[], &[put("b", "kept")], &[]).unwrap();
        store.revoke(lease).unwrap();
        assert!(store.get("a").unwrap().is_none());
        assert_eq!(store.get("b").unwrap().unwrap().value, b"kept");
        assert_eq!(store.revoke(lease), Err(StoreError::LeaseNotFound(lease)));
        assert!(!store.lease_alive(lease));
    }
}
