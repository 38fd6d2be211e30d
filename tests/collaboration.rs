//! What a collaborating client sees over real TCP: events for remote changes that keep an
//! editor's own buffer in step, coalesced presence, and pipelined ops (accepted while
//! nobody else edits, refused with code 25 when a concurrent op lands between them).

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{open, read_back, start, start_with, wait_for_version, Pipelined};
use quire::client::connection::Connection;
use quire::client::{Event, Events};
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message, Selection};
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::text::Text;
use quire::wal::vfs::sim::SplitMix;

/// A random edit valid on a text of `len` code points, sometimes outside the BMP.
fn random_patch(rng: &mut SplitMix, len: u32) -> Patch {
    let pos = rng.below(len as u64 + 1) as u32;
    let del = rng.below((len - pos).min(3) as u64 + 1) as u32;
    let ins = match rng.below(4) {
        0 => String::new(),
        1 => "\u{1F600}".to_string(),
        _ => ((b'a' + rng.below(26) as u8) as char).to_string(),
    };
    Patch::new(pos, del, ins)
}

/// An editor's buffer beside a client's document: changed only by the editor's own
/// edits and by the document's events.
struct Editor {
    buffer: Text,
    events: Events,
    /// Remote events that changed the text.
    remote_events: usize,
    /// The local seqs of the ops carrying the editor's edits, and those acknowledged.
    sent: HashSet<u64>,
    acked: HashSet<u64>,
}

impl Editor {
    /// Applies the events received so far.
    fn follow(&mut self) {
        while let Some(event) = self.events.try_recv() {
            match event {
                Event::Remote { patches, .. } => {
                    self.buffer.apply(&patches).unwrap();
                    if !patches.is_empty() {
                        self.remote_events += 1;
                    }
                }
                Event::Acked { local_seq, .. } => {
                    self.acked.insert(local_seq);
                }
                Event::Reloaded { patches } => panic!("reloaded: {patches:?}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_events_keep_an_editor_buffer_identical_to_the_document() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut clients = Vec::new();
    let mut editors = Vec::new();
    for _ in 0..3 {
        let client = open(server.addr, "shared").await;
        editors.push(Editor {
            buffer: Text::new(),
            events: client.events(),
            remote_events: 0,
            sent: HashSet::new(),
            acked: HashSet::new(),
        });
        clients.push(client);
    }
    let mut rng = SplitMix(7);
    for round in 0..300 {
        let i = rng.below(3) as usize;
        let editor = &mut editors[i];
        // Made while the document is locked: the editor first takes every event that
        // came before the edit, then the edit itself.
        let local_seq = clients[i]
            .edit_with(|view| {
                let text = view.text();
                editor.follow();
                assert_eq!(
                    editor.buffer.to_string(),
                    text,
                    "editor {i} before its edit"
                );
                let patch = random_patch(&mut rng, text.chars().count() as u32);
                editor.buffer.apply(std::slice::from_ref(&patch)).unwrap();
                vec![patch]
            })
            .await
            .unwrap();
        if local_seq > 0 {
            editor.sent.insert(local_seq);
        }
        if round % 4 == 0 {
            // A round trip now and then, so that ops interleave at the server (the
            // clients' tasks read what arrives meanwhile).
            clients[i].settle().await;
        }
        for editor in editors.iter_mut() {
            editor.follow();
        }
    }
    // Settle everyone, then deliver what is left until all are at the same version.
    for c in &clients {
        c.settle().await;
    }
    let newest = clients.iter().map(|c| c.version()).max().unwrap();
    for (c, editor) in clients.iter().zip(editors.iter_mut()) {
        wait_for_version(c, newest).await;
        editor.follow();
    }
    let remote_events: usize = editors.iter().map(|e| e.remote_events).sum();
    assert!(remote_events > 30, "{remote_events} remote events");
    let text = clients[0].text();
    for (i, (c, editor)) in clients.iter().zip(&editors).enumerate() {
        assert_eq!(c.text(), text, "client {i} converged");
        assert_eq!(
            editor.buffer.to_string(),
            text,
            "editor {i} follows the events"
        );
        // Each op was acknowledged under the id it was first sent with: none was
        // refused (and sent again as a new op).
        let unacked: Vec<_> = editor.sent.difference(&editor.acked).collect();
        assert!(
            unacked.is_empty(),
            "client {i}: ops never acked {unacked:?}"
        );
    }
    for c in clients {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequent_presence_is_coalesced_and_the_latest_arrives() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(
        tmp.path(),
        ServerConfig {
            presence_interval: Duration::from_millis(200),
            ..ServerConfig::default()
        },
    )
    .await;
    let watcher = open(server.addr, "p").await;
    let mut events = watcher.events();
    // The cursor speaks the raw protocol: one Presence message per update (the client
    // sends its latest cursors, so it may send fewer), and the server coalesces them.
    let mut cursor = Connection::connect(server.addr, 2, "").await.unwrap();
    cursor
        .send(Message::Open {
            doc: "p".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    cursor
        .send(Message::Submit {
            doc: "p".into(),
            local_seq: 1,
            base_version: 0,
            patches: vec![Patch::new(0, 0, "0123456789")],
        })
        .await
        .unwrap();
    while !matches!(
        cursor.recv().await.unwrap().message,
        Message::Ack { seq: 1, .. }
    ) {}
    let presence = |sel: Selection| Message::Presence {
        doc: "p".into(),
        selections: vec![sel],
    };
    let updates = 100u32;
    for i in 0..updates - 1 {
        let at = i % 10;
        let sel = Selection {
            anchor: at,
            head: at,
        };
        cursor.send(presence(sel)).await.unwrap();
    }
    // The last one differs from every earlier one.
    let last = Selection {
        anchor: 10,
        head: 3,
    };
    cursor.send(presence(last)).await.unwrap();
    let mut seen = Vec::new();
    let wait = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Presence {
                client_id,
                selections,
            } = events.recv().await.unwrap()
            {
                assert_eq!(client_id, 2);
                seen.push(selections);
            }
            if seen.last() == Some(&vec![last]) {
                break;
            }
        }
    });
    wait.await.expect("the latest presence arrives");
    assert!(
        seen.len() < updates as usize / 2,
        "{} of {updates} updates were broadcast",
        seen.len()
    );
    assert_eq!(
        server.store.wal().durability().durable_lsn,
        1,
        "only the edit is logged"
    );
    watcher.close().await;
    server.stop().await;
}

async fn submit(conn: &mut Connection, local_seq: u64, base_version: u64, patch: Patch) {
    conn.queue(Message::Submit {
        doc: "pipe".into(),
        local_seq,
        base_version,
        patches: vec![patch],
    })
    .unwrap();
}

type Replies = HashMap<u64, Result<u64, ErrorCode>>;

/// The reply to `local_seq`: Ok(seq) for an ack, Err(code) for a reject. A reject is
/// sent at once and can overtake the ack of an earlier op, which waits for the disk:
/// replies to other ops are kept in `seen`.
async fn outcome(
    conn: &mut Connection,
    seen: &mut Replies,
    local_seq: u64,
) -> Result<u64, ErrorCode> {
    loop {
        if let Some(reply) = seen.remove(&local_seq) {
            return reply;
        }
        match conn.recv().await.unwrap().message {
            Message::Ack { local_seq, seq, .. } => seen.insert(local_seq, Ok(seq)),
            Message::Reject {
                local_seq, code, ..
            } => seen.insert(local_seq, Err(code)),
            _ => None,
        };
    }
}

async fn open_raw(addr: std::net::SocketAddr, client: u64) -> Connection {
    let mut conn = Connection::connect(addr, client, "").await.unwrap();
    conn.send(Message::Open {
        doc: "pipe".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_ops_apply_alone_and_are_refused_after_a_concurrent_op() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut a = open_raw(server.addr, 1).await;
    let mut b = open_raw(server.addr, 2).await;
    let (mut seen_a, mut seen_b) = (Replies::new(), Replies::new());

    // Alone: three ops made on top of each other, all at base 0, sent at once.
    submit(&mut a, 1, 0, Patch::new(0, 0, "abc")).await;
    submit(&mut a, 2, 0, Patch::new(3, 0, "def")).await;
    submit(&mut a, 3, 0, Patch::new(1, 1, "B")).await;
    a.flush().await.unwrap();
    for (l, seq) in [(1, 1), (2, 2), (3, 3)] {
        assert_eq!(outcome(&mut a, &mut seen_a, l).await, Ok(seq));
    }

    // B's op is sequenced first; A's two pipelined ops (base 3) arrive after it. The
    // first is transformed over B's; the second was made on top of the first, which now
    // sits after B's op: refused, and so is A's next op until A opens the document again.
    submit(&mut b, 1, 3, Patch::new(0, 0, "X")).await;
    b.flush().await.unwrap();
    assert_eq!(outcome(&mut b, &mut seen_b, 1).await, Ok(4));
    submit(&mut a, 4, 3, Patch::new(6, 0, "g")).await;
    submit(&mut a, 5, 3, Patch::new(7, 0, "h")).await;
    a.flush().await.unwrap();
    assert_eq!(outcome(&mut a, &mut seen_a, 4).await, Ok(5));
    assert_eq!(
        outcome(&mut a, &mut seen_a, 5).await,
        Err(ErrorCode::PipelineConflict)
    );
    submit(&mut a, 6, 5, Patch::new(0, 0, "i")).await;
    a.flush().await.unwrap();
    assert_eq!(
        outcome(&mut a, &mut seen_a, 6).await,
        Err(ErrorCode::PipelineConflict)
    );
    a.send(Message::Open {
        doc: "pipe".into(),
        known_version: 5,
    })
    .await
    .unwrap();
    submit(&mut a, 7, 5, Patch::new(0, 0, "j")).await;
    a.flush().await.unwrap();
    assert_eq!(outcome(&mut a, &mut seen_a, 7).await, Ok(6));

    // A non-pipelined client never sees code 25 and every replica agrees.
    assert_eq!(
        read_back(server.addr, "pipe").await,
        ("jXaBcdefg".to_string(), 6)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_document_does_not_stall_another() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let total = 20_000u64;
    let progress = Arc::new(AtomicU64::new(0));
    // The busy writer pipelines by hand (32 ops in flight, one per edit), on the raw
    // protocol: the client sends one op at a time.
    let mut busy = Pipelined::open(server.addr, "busy", 32).await;
    let seen = progress.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..total {
            let end = busy.doc.len_chars();
            busy.edit(&[Patch::new(end, 0, "z")]).await;
            while busy.doc.all_in_flight().count() >= 32 {
                busy.pump().await;
            }
            busy.poll().await;
            seen.store(busy.doc.version(), Ordering::Relaxed);
        }
        busy.settle().await;
        busy.doc.len_chars()
    });
    while progress.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Twenty round trips on another document while the busy one keeps the log full.
    let quiet = open(server.addr, "quiet").await;
    for i in 0..20 {
        quiet.edit(&[Patch::new(i, 0, "q")]).await.unwrap();
        quiet.settle().await;
    }
    let at = progress.load(Ordering::Relaxed);
    assert!(
        at < total,
        "the quiet document's ops waited for the busy one to finish ({at} of {total})"
    );
    assert_eq!(quiet.text(), "q".repeat(20));
    quiet.close().await;
    assert_eq!(writer.await.unwrap() as u64, total);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_nobody_has_open_is_released_and_reopens_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let a = open(server.addr, "e").await;
    let b = open(server.addr, "e").await;
    a.edit(&[Patch::new(0, 0, "hello")]).await.unwrap();
    a.settle().await;
    wait_for_version(&b, 1).await;
    b.edit(&[Patch::new(5, 0, " world")]).await.unwrap();
    // B leaves without reading its ack (once the server has the op); A leaves too.
    while server
        .store
        .read("e")
        .await
        .unwrap()
        .map_or(0, |v| v.version)
        < 2
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // (B's client stops as if killed; A's shuts down, nothing pending.)
    b.client.abort();
    drop(b);
    a.close().await;
    let released = tokio::time::timeout(Duration::from_secs(30), async {
        while server.server.open_documents() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    released
        .await
        .expect("the document is released once nobody has it open");
    let c = open(server.addr, "e").await;
    assert_eq!(c.text(), "hello world");
    assert_eq!(server.server.open_documents(), 1);
    // An op made on an old version is transformed over ops the released document no
    // longer held in memory (read back from the log).
    let mut old = Connection::connect(server.addr, 4, "").await.unwrap();
    old.send(Message::Open {
        doc: "e".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    old.send(Message::Submit {
        doc: "e".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "> ")],
    })
    .await
    .unwrap();
    c.settle().await;
    wait_for_version(&c, 3).await;
    assert_eq!(c.text(), "> hello world");
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_churning_on_one_document_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let (tasks, rounds) = (8u64, 40u64);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let addr = server.addr;
        handles.push(tokio::spawn(async move {
            for _ in 0..rounds {
                // A new client each round: open, append one character, wait for the ack,
                // leave (the document is released whenever nobody has it open).
                let doc = open(addr, "churn").await;
                doc.edit_with(|view| vec![Patch::new(view.len_chars(), 0, "c")])
                    .await
                    .unwrap();
                doc.settle().await;
                doc.close().await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let (text, version) = read_back(server.addr, "churn").await;
    assert_eq!(version, tasks * rounds);
    assert_eq!(text, "c".repeat((tasks * rounds) as usize));
    server.stop().await;
}
