//! A panic while a session serves a request (a bug in the server or in a sequencer): the
//! session ends as any other does (its client sees its connection close, and may come
//! back), and every other session, document and client goes on being served.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::wrapped::{Rules, Wrapped};
use common::{next_reply, store_config};
use quire::client::connection::Connection;
use quire::op::Patch;
use quire::protocol::message::Message;
use quire::sequencer::local::LocalSequencer;
use quire::sequencer::{Sequencer, SubmitError, SubmitOp, Submitted};
use quire::server::{Server, ServerConfig};

/// A guard against a hang (not a performance threshold).
const HANG: Duration = Duration::from_secs(60);

/// The document whose submits panic.
const BOOM: &str = "boom";

/// The real [`LocalSequencer`], except that a submit to [`BOOM`] panics before it
/// reaches it. Test-only code.
struct Panicking;

impl Rules<LocalSequencer> for Panicking {
    fn submit(
        &self,
        store: &LocalSequencer,
        doc_id: &str,
        op: &SubmitOp,
    ) -> Result<Submitted, SubmitError> {
        if doc_id == BOOM {
            panic!("a submit to {BOOM:?} (this test's injected bug)");
        }
        store.submit(doc_id, op)
    }
}

fn submit(doc: &str, local_seq: u64, ins: &str) -> Message {
    Message::Submit {
        doc: doc.into(),
        local_seq,
        base_version: 0,
        patches: vec![Patch::new(0, 0, ins)],
    }
}

/// Opens `doc` and reads the reply to the end: the text.
async fn open(conn: &mut Connection, doc: &str) -> String {
    conn.send(Message::Open {
        doc: doc.into(),
        known_version: 0,
    })
    .await
    .unwrap();
    let mut text = String::new();
    loop {
        match next_reply(conn).await {
            Message::Snapshot { text: piece, .. } => text.push_str(&piece),
            Message::Ops { ops, more, .. } => {
                for op in ops {
                    let mut rope = quire::text::Text::from(text.as_str());
                    rope.apply(&op.patches).unwrap();
                    text = rope.to_string();
                }
                if !more {
                    return text;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_panics_closes_its_connection_and_every_other_one_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = LocalSequencer::open(dir.path(), store_config()).unwrap();
    let store = Arc::new(store);
    let server = Server::new(
        Arc::new(Wrapped {
            store: store.clone(),
            rules: Panicking,
        }),
        ServerConfig::default(),
    );
    let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.clone().serve(listener, async move {
        let _ = stopped.await;
    }));

    // One client writes a document of its own, another one both documents.
    let mut calm = Connection::connect(addr, 0, "").await.unwrap();
    open(&mut calm, "calm").await;
    let mut doomed = Connection::connect(addr, 0, "").await.unwrap();
    open(&mut doomed, "calm").await;
    open(&mut doomed, BOOM).await;
    assert_eq!(server.connected_clients(), 2);

    // Its submit to the document that panics: the connection closes (no reply, and
    // above all no silence for ever).
    doomed.send(submit(BOOM, 1, "x")).await.unwrap();
    let ended = tokio::time::timeout(HANG, async {
        loop {
            match doomed.recv().await {
                Ok(env) => match env.message {
                    Message::Remote { .. } | Message::PresenceState { .. } => continue,
                    other => panic!("an answer to the submit that panicked: {other:?}"),
                },
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the connection of the session that panicked stays open");
    eprintln!("the session that panicked ended its connection: {ended}");
    // Its client id is released, and its subscription with it.
    let released = async {
        while server.connected_clients() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HANG, released).await.unwrap();

    // The other client is served as before, on the document both had open.
    calm.send(submit("calm", 1, "still here")).await.unwrap();
    match next_reply(&mut calm).await {
        Message::Ack { seq: 1, .. } => {}
        other => panic!("{other:?}"),
    }
    // And the client whose session panicked comes back, and is served too.
    let mut back = Connection::connect(addr, 0, "").await.unwrap();
    let text = open(&mut back, "calm").await;
    assert_eq!(text, "still here");
    back.send(submit("calm", 1, "and back ")).await.unwrap();
    match next_reply(&mut back).await {
        Message::Ack { seq: 2, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(store.read("calm").await.unwrap().unwrap().text.len(), 19);
    drop((calm, back));
    let _ = stop.send(());
    task.await.unwrap();
    store.close();
}
