//! Checks that a [`Store`] has etcd's semantics (as [`super::store`] states them): run
//! against [`MemStore`](super::mem_store::MemStore) by the unit tests, and against a
//! real etcd cluster through [`EtcdStore`](super::etcd) by `tests/cluster_etcd.rs`, so
//! that the stand-in the model tests trust is held to what etcd does.
//!
//! Each check works under its own key prefix and compares revisions relative to the
//! store's revision when it starts, so the checks can share one store, one after
//! another. They assume nobody else writes to the store meanwhile. They panic on a
//! difference.

use std::time::Duration;

use super::store::{
    Compare, LeaseId, Op, OpResult, Revision, Store, StoreError, Target, TxnError, MAX_TXN_OPS,
};

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

/// The store's revision, by a txn that reads nothing and changes nothing.
fn revision<S: Store>(store: &S) -> Revision {
    store.txn(&[], &[], &[]).unwrap().revision
}

/// Every check, each under `{prefix}/{check}/`.
pub fn all<S: Store>(store: &S, prefix: &str) {
    revisions(store, &format!("{prefix}/revisions/"));
    compares(store, &format!("{prefix}/compares/"));
    malformed_txns(store, &format!("{prefix}/malformed/"));
    delete_prefix(store, &format!("{prefix}/delete-prefix/"));
    get_prefix_paging(store, &format!("{prefix}/paging/"));
    leases(store, &format!("{prefix}/leases/"));
}

/// One revision per txn, none for a read or a delete of nothing; create revisions,
/// mod revisions and versions as etcd keeps them; a deleted key comes back with a new
/// create revision, which fences the old one.
pub fn revisions<S: Store>(store: &S, p: &str) {
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let start = revision(store);
    let r = store.txn(&[], &[put(&a, "1"), put(&b, "2")], &[]).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, start + 1, "a txn's puts share one revision");
    let kv_a = store.get(&a).unwrap().unwrap();
    let kv_b = store.get(&b).unwrap().unwrap();
    let rev = start + 1;
    assert_eq!(
        (kv_a.create_revision, kv_a.mod_revision, kv_a.version),
        (rev, rev, 1)
    );
    assert_eq!(
        (kv_a.key.as_str(), &kv_a.value[..]),
        (a.as_str(), &b"1"[..])
    );
    assert_eq!((kv_b.create_revision, kv_b.mod_revision), (rev, rev));
    assert_eq!(kv_a.lease, None);
    let r = store.txn(&[], &[Op::Get { key: a.clone() }], &[]).unwrap();
    assert_eq!(r.revision, rev, "a read does not advance the revision");
    assert_eq!(r.results, vec![OpResult::Got(Some(kv_a.clone()))]);
    let r = store
        .txn(
            &[],
            &[Op::Delete {
                key: format!("{p}zz"),
            }],
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.revision, &r.results[..]),
        (rev, &[OpResult::Deleted(0)][..]),
        "deleting nothing changes nothing"
    );
    // A read after a put in one txn sees the put.
    let r = store
        .txn(&[], &[put(&a, "2"), Op::Get { key: a.clone() }], &[])
        .unwrap();
    assert_eq!(r.revision, rev + 1);
    let kv = match &r.results[..] {
        [OpResult::Put, OpResult::Got(Some(kv))] => kv.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            &kv.value[..]
        ),
        (rev, rev + 1, 2, &b"2"[..])
    );
    let r = store
        .txn(&[], &[Op::Delete { key: a.clone() }], &[])
        .unwrap();
    assert_eq!(
        (r.revision, &r.results[..]),
        (rev + 2, &[OpResult::Deleted(1)][..])
    );
    assert!(store.get(&a).unwrap().is_none());
    store.txn(&[], &[put(&a, "1")], &[]).unwrap();
    let kv = store.get(&a).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (rev + 3, 1));
    // The old create revision no longer matches: a fence.
    let r = store
        .txn(&[Compare::created_at(a.clone(), rev)], &[put(&b, "3")], &[])
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(store.get(&b).unwrap().unwrap().value, b"2");
    let r = store
        .txn(&[Compare::created_at(a, rev + 3)], &[put(&b, "3")], &[])
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(store.get(&b).unwrap().unwrap().value, b"3");
}

/// Compares on absent keys, all compares ANDed, and the failure branch.
pub fn compares<S: Store>(store: &S, p: &str) {
    let (a, nope) = (format!("{p}a"), format!("{p}nope"));
    let absent = |target| Compare {
        key: nope.clone(),
        target,
    };
    for (target, holds) in [
        (Target::CreateRevision(0), true),
        (Target::ModRevision(0), true),
        (Target::Value(Vec::new()), false),
        (Target::CreateRevision(1), false),
    ] {
        let r = store.txn(&[absent(target.clone())], &[], &[]).unwrap();
        assert_eq!(r.succeeded, holds, "an absent key compared with {target:?}");
    }
    let r = store.txn(&[], &[put(&a, "1")], &[]).unwrap();
    let rev = r.revision;
    let mod_rev = |rev| Compare {
        key: a.clone(),
        target: Target::ModRevision(rev),
    };
    let value = |v: &[u8]| Compare {
        key: a.clone(),
        target: Target::Value(v.to_vec()),
    };
    assert!(store.txn(&[mod_rev(rev)], &[], &[]).unwrap().succeeded);
    assert!(!store.txn(&[mod_rev(rev - 1)], &[], &[]).unwrap().succeeded);
    assert!(store.txn(&[value(b"1")], &[], &[]).unwrap().succeeded);
    assert!(!store.txn(&[value(b"")], &[], &[]).unwrap().succeeded);
    assert!(
        !store
            .txn(&[Compare::absent(a.clone())], &[], &[])
            .unwrap()
            .succeeded
    );
    // One false compare fails the txn: the failure branch runs, the success one does not.
    let (b, c) = (format!("{p}b"), format!("{p}c"));
    let r = store
        .txn(
            &[Compare::created_at(a.clone(), rev), value(b"2")],
            &[put(&b, "1"), put(&c, "1")],
            &[Op::Get { key: a.clone() }],
        )
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.revision, rev);
    assert!(matches!(&r.results[..], [OpResult::Got(Some(kv))] if kv.value == b"1"));
    assert!(store.get(&b).unwrap().is_none());
    assert!(store.get(&c).unwrap().is_none());
}

/// What etcd refuses whole: duplicate keys, too many ops or compares, a put bound to a
/// lease that does not exist (in the branch taken).
pub fn malformed_txns<S: Store>(store: &S, p: &str) {
    let start = revision(store);
    let (a, pa) = (format!("{p}a"), format!("{p}p/a"));
    let e = store.txn(&[], &[put(&a, "1"), put(&a, "2")], &[]);
    assert_eq!(e, Err(StoreError::Txn(TxnError::DuplicateKey(a.clone()))));
    let delete_prefix = Op::DeletePrefix {
        prefix: format!("{p}p/"),
    };
    // In the failure branch too, whatever the compares say.
    let e = store.txn(&[], &[], &[put(&pa, "1"), delete_prefix.clone()]);
    assert_eq!(e, Err(StoreError::Txn(TxnError::DuplicateKey(pa.clone()))));
    let e = store.txn(&[], &[put(&pa, "1"), Op::Delete { key: pa.clone() }], &[]);
    assert_eq!(e, Err(StoreError::Txn(TxnError::DuplicateKey(pa.clone()))));
    // Deletes may overlap.
    let delete = Op::Delete { key: pa.clone() };
    assert!(
        store
            .txn(&[], &[delete, delete_prefix], &[])
            .unwrap()
            .succeeded
    );
    let many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| put(&format!("{p}k{i:03}"), ""))
        .collect();
    let e = store.txn(&[], &many, &[]);
    assert_eq!(
        e,
        Err(StoreError::Txn(TxnError::TooManyOps(MAX_TXN_OPS + 1)))
    );
    let e = store.txn(&[], &[], &many);
    assert_eq!(
        e,
        Err(StoreError::Txn(TxnError::TooManyOps(MAX_TXN_OPS + 1)))
    );
    let compares: Vec<Compare> = (0..=MAX_TXN_OPS)
        .map(|i| Compare::absent(format!("{p}c{i}")))
        .collect();
    let e = store.txn(&compares, &[], &[]);
    assert_eq!(
        e,
        Err(StoreError::Txn(TxnError::TooManyOps(MAX_TXN_OPS + 1)))
    );
    assert_eq!(revision(store), start, "nothing refused was applied");
    // The limit is per branch: exactly MAX_TXN_OPS fits.
    let r = store.txn(&[], &many[..MAX_TXN_OPS], &[]).unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, start + 1);
    // A lease that does not exist, in the branch taken: refused, nothing applied.
    let gone = store.grant_lease(Duration::from_secs(60)).unwrap();
    store.revoke(gone).unwrap();
    let (x, y) = (format!("{p}x"), format!("{p}y"));
    let e = store.txn(&[], &[put(&x, "1"), put_leased(&y, gone)], &[]);
    assert_eq!(e, Err(StoreError::LeaseNotFound(gone)));
    assert!(store.get(&x).unwrap().is_none());
    assert_eq!(revision(store), start + 1);
    // The duplicate is refused before the lease is looked at, in either branch.
    let e = store.txn(&[], &[], &[put_leased(&y, gone), put(&y, "1")]);
    assert_eq!(e, Err(StoreError::Txn(TxnError::DuplicateKey(y.clone()))));
    // In the branch not taken, it is never looked at.
    let r = store
        .txn(
            &[Compare::absent(x.clone())],
            &[put(&x, "1")],
            &[put_leased(&y, gone)],
        )
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(r.revision, start + 2);
}

/// A prefix delete removes exactly the keys under the prefix, in one revision: the
/// highest code point under it too, and not the key just past it (`p0` after `p/`, the
/// range end etcd is given).
pub fn delete_prefix<S: Store>(store: &S, p: &str) {
    let k = |s: &str| format!("{p}{s}");
    let r = store
        .txn(
            &[],
            &[
                put(&k("p/a"), ""),
                put(&k("p/b"), ""),
                put(&k("p/\u{10ffff}"), ""),
                put(&k("p0"), ""),
                put(&k("pq"), ""),
                put(&k("o"), ""),
            ],
            &[],
        )
        .unwrap();
    let r = store
        .txn(&[], &[Op::DeletePrefix { prefix: k("p/") }], &[])
        .unwrap_or_else(|e| panic!("after revision {}: {e}", r.revision));
    let rev = r.revision;
    assert_eq!(&r.results[..], &[OpResult::Deleted(3)][..]);
    assert_eq!(revision(store), rev);
    assert!(store.get(&k("p0")).unwrap().is_some());
    assert!(store.get(&k("pq")).unwrap().is_some());
    assert!(store.get(&k("o")).unwrap().is_some());
    assert!(store.get(&k("p/a")).unwrap().is_none());
    assert!(store.get(&k("p/b")).unwrap().is_none());
}

/// Prefix reads are in byte order, limited, resumable from a key, and say whether more
/// keys were left; keys outside the prefix never show.
pub fn get_prefix_paging<S: Store>(store: &S, p: &str) {
    let k = |s: &str| format!("{p}{s}");
    let ops: Vec<Op> = ["p/c", "p/a", "p/b", "q/a", "p", "p0", "p/\u{10ffff}"]
        .iter()
        .map(|s| put(&k(s), s))
        .collect();
    let rev = store.txn(&[], &ops, &[]).unwrap().revision;
    let keys = |range: &super::store::Range| {
        range
            .kvs
            .iter()
            .map(|kv| kv.key[p.len()..].to_owned())
            .collect::<Vec<_>>()
    };
    let page = store.get_prefix(&k("p/"), None, 2).unwrap();
    assert_eq!(
        (keys(&page), page.more),
        (vec!["p/a".into(), "p/b".into()], true)
    );
    assert_eq!(page.revision, rev);
    assert_eq!(page.kvs[0].value, b"p/a");
    let page = store.get_prefix(&k("p/"), Some(&k("p/b\0")), 1).unwrap();
    assert_eq!((keys(&page), page.more), (vec!["p/c".into()], true));
    // Exactly `limit` keys left: no more. The highest code point is under the prefix
    // (and `p0`, the first key past it, is not).
    let page = store.get_prefix(&k("p/"), Some(&k("p/c")), 2).unwrap();
    assert_eq!(
        (keys(&page), page.more),
        (vec!["p/c".into(), "p/\u{10ffff}".into()], false)
    );
    // A `from` below the prefix reads from the prefix's first key.
    let page = store.get_prefix(&k("p/"), Some(&k("a")), 10).unwrap();
    assert_eq!(keys(&page), ["p/a", "p/b", "p/c", "p/\u{10ffff}"]);
    let page = store.get_prefix(&k("nothing/"), None, 10).unwrap();
    assert_eq!((page.kvs.len(), page.more), (0, false));
}

/// Keys bound to a lease go with it, in one revision; a key put again without the lease
/// is no longer bound; a revoked lease can be neither renewed nor revoked again.
pub fn leases<S: Store>(store: &S, p: &str) {
    let k = |s: &str| format!("{p}{s}");
    let lease = store.grant_lease(Duration::from_secs(30)).unwrap();
    let other = store.grant_lease(Duration::from_secs(30)).unwrap();
    assert_ne!(lease, other);
    store.keep_alive(lease).unwrap();
    store
        .txn(
            &[],
            &[
                put_leased(&k("a"), lease),
                put_leased(&k("b"), lease),
                put_leased(&k("c"), other),
            ],
            &[],
        )
        .unwrap();
    assert_eq!(store.get(&k("a")).unwrap().unwrap().lease, Some(lease));
    // Put again without a lease: the key no longer belongs to the lease.
    let rev = store
        .txn(&[], &[put(&k("b"), "kept")], &[])
        .unwrap()
        .revision;
    assert_eq!(store.get(&k("b")).unwrap().unwrap().lease, None);
    store.revoke(lease).unwrap();
    assert_eq!(revision(store), rev + 1, "a revoke deletes in one revision");
    assert!(store.get(&k("a")).unwrap().is_none());
    assert_eq!(store.get(&k("b")).unwrap().unwrap().value, b"kept");
    assert!(store.get(&k("c")).unwrap().is_some());
    assert_eq!(store.revoke(lease), Err(StoreError::LeaseNotFound(lease)));
    assert_eq!(
        store.keep_alive(lease),
        Err(StoreError::LeaseNotFound(lease))
    );
    // A lease with no keys goes without a revision.
    let empty = store.grant_lease(Duration::from_secs(30)).unwrap();
    store.revoke(empty).unwrap();
    assert_eq!(revision(store), rev + 1);
    store.revoke(other).unwrap();
    assert!(store.get(&k("c")).unwrap().is_none());
    assert_eq!(revision(store), rev + 2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::mem_store::MemStore;

    #[test]
    fn mem_store_has_etcds_semantics() {
        all(&MemStore::new(), "/conformance");
    }
}
