//! Cluster mode end to end: deleting a document (the admin endpoint's `DELETE
//! /docs/ID`). Only its owner deletes it: another node answers 421 and names the owner.
//! At the owner, the sessions that have it open are told (`Error` 32), etcd keeps
//! nothing of it (owner key, journal, snapshots), and its id starts again empty, at
//! version 0, at its preferred owner.
//!
//! Needs the `cluster` feature and etcd (see tests/common/etcd_cluster.rs).

use crate::quire_nodes;

use std::net::SocketAddr;

use quire::client::connection::Connection;
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message};
use quire_nodes::*;

#[test]
fn a_document_deleted_at_its_owner_is_gone_from_the_cluster_and_starts_again_empty() {
    on_a_cluster(|nodes, etcd| {
        let endpoints = etcd.lock().unwrap().endpoints();
        runtime().block_on(delete_and_check(nodes, endpoints))
    });
}

/// `DELETE /docs/{doc}` at `node`'s admin endpoint: the status and body.
async fn delete_at(node: &Node, doc: &str) -> (u16, String) {
    let url = format!("http://{}/docs/{doc}", node.admin);
    off_runtime(move || {
        match ureq::delete(&url)
            .set("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
            .call()
        {
            Ok(reply) => (reply.status(), reply.into_string().unwrap()),
            Err(ureq::Error::Status(code, reply)) => (code, reply.into_string().unwrap()),
            Err(e) => panic!("DELETE {url}: {e}"),
        }
    })
    .await
}

/// The next message on `conn`, within [`PATIENCE`].
async fn next(conn: &mut Connection<tokio::net::TcpStream>) -> Message {
    tokio::time::timeout(PATIENCE, conn.recv())
        .await
        .expect("an answer in time")
        .expect("the connection holds")
        .message
}

/// Opens `doc` on `conn` (served there): its version once the reply is complete.
async fn open(conn: &mut Connection<tokio::net::TcpStream>, doc: &str) -> u64 {
    conn.send(Message::Open {
        doc: doc.to_owned(),
        known_version: 0,
    })
    .await
    .unwrap();
    let mut version = 0;
    loop {
        match next(conn).await {
            Message::Snapshot { version: v, .. } => version = v,
            Message::Ops { ops, more, .. } => {
                version = ops.last().map_or(version, |op| op.seq);
                if !more {
                    return version;
                }
            }
            other => panic!("opening {doc}: {other:?}"),
        }
    }
}

/// Submits `text` at the start of `doc` on `conn`: the seq it was acknowledged at.
async fn submit(
    conn: &mut Connection<tokio::net::TcpStream>,
    doc: &str,
    local_seq: u64,
    base_version: u64,
    text: &str,
) -> u64 {
    conn.send(Message::Submit {
        doc: doc.to_owned(),
        local_seq,
        base_version,
        patches: vec![Patch::new(0, 0, text)],
    })
    .await
    .unwrap();
    match next(conn).await {
        Message::Ack { seq, .. } => seq,
        other => panic!("submitting to {doc}: {other:?}"),
    }
}

/// The keys etcd holds under the cluster's prefix whose document part is `doc`.
fn keys_of(endpoints: &[String], doc: &str) -> Vec<String> {
    use quire::cluster::etcd::{EtcdConfig, EtcdStore};
    use quire::cluster::store::Store;
    let store = EtcdStore::connect(EtcdConfig::new(endpoints.to_vec())).unwrap();
    let page = store.get_prefix("/quire/", None, 10_000).unwrap();
    page.kvs
        .into_iter()
        .map(|kv| kv.key)
        .filter(|key| !key.starts_with("/quire/nodes/") && key.split('/').nth(3) == Some(doc))
        .collect()
}

async fn delete_and_check(nodes: &[Node], endpoints: Vec<String>) {
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let (owner, other) = (&nodes[1], &nodes[0]);
    let doc = name_preferred_by("deleted", &owner.id, &ids);
    let connect = |at: SocketAddr| async move { Connection::connect(at, 0, "").await.unwrap() };
    // A session at the owner, with three ops of its own acknowledged.
    let mut session = connect(owner.addr).await;
    assert_eq!(open(&mut session, &doc).await, 0);
    for i in 1..=3 {
        assert_eq!(
            submit(&mut session, &doc, i, i - 1, &i.to_string()).await,
            i
        );
    }
    let before = {
        let (endpoints, doc) = (endpoints.clone(), doc.clone());
        off_runtime(move || keys_of(&endpoints, &doc)).await
    };
    assert!(
        before.len() >= 4,
        "an owner key and three journal keys: {before:?}"
    );

    // At a node that does not serve it: 421, naming the owner; nothing deleted.
    let (status, body) = delete_at(other, &doc).await;
    assert_eq!(status, 421, "{body}");
    assert!(body.contains(&owner.addr.to_string()), "{body}");
    // At its owner: deleted at version 3.
    let (status, body) = delete_at(owner, &doc).await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["deleted_at_version"], 3);
    // The session is told, unasked.
    match next(&mut session).await {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::DocumentDeleted, "{message}")
        }
        other => panic!("expected Error 32, got {other:?}"),
    }
    // etcd has nothing of it.
    let after = {
        let (endpoints, doc) = (endpoints.clone(), doc.clone());
        off_runtime(move || keys_of(&endpoints, &doc)).await
    };
    assert_eq!(after, Vec::<String>::new());
    // Deleted once: the next DELETE finds no document.
    let (status, body) = delete_at(owner, &doc).await;
    assert_eq!(status, 404, "{body}");

    // Opened again through another node: redirected to its preferred owner, empty, and
    // written from seq 1.
    let mut again = connect(other.addr).await;
    again
        .send(Message::Open {
            doc: doc.clone(),
            known_version: 0,
        })
        .await
        .unwrap();
    match next(&mut again).await {
        Message::Redirect { addr, .. } => assert_eq!(addr, owner.addr.to_string()),
        other => panic!("expected a redirect, got {other:?}"),
    }
    let mut again = connect(owner.addr).await;
    assert_eq!(open(&mut again, &doc).await, 0);
    assert_eq!(submit(&mut again, &doc, 1, 0, "new").await, 1);
}
