//! Pipelined clients against the real server document and sequencer (on a simulated
//! disk), without sockets: 2 to 4 clients keep 1 to 3 ops in flight each and edit at
//! random; the server takes their ops in a random interleaving (each client's in order)
//! and messages reach each client in order at random moments. An op the server refuses
//! as a pipeline conflict is answered with a Reject in the client's queue; until it reads
//! it the client goes on editing and sending, and the server must refuse every op it
//! sent meanwhile (they were made on top of the refused one). On reading it the client
//! reopens on the same connection and reloads (a fresh copy at the server's version, its
//! unacknowledged edits dropped, as protocol.md says). Nothing else may be refused, and
//! at the end every client has the server's text and version.

use std::path::Path;
use std::sync::Arc;

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use quire::client::state::{ClientDoc, Outgoing};
use quire::op::Patch;
use quire::protocol::frame::FrameCodec;
use quire::protocol::message::{Envelope, Message};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;
use quire::server::document::{
    Document, DocumentLimits, Refusal, RefusalKind, Submission, SubmitOutcome,
};
use quire::server::outbox::{self, encode, Outbox, Writer};
use quire::server::wire::refusal_code;
use quire::wal::vfs::sim::SimFs;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::codec::Decoder;

const MAX_FRAME: usize = 1 << 20;

const ALPHABET: [char; 5] = ['a', 'b', '\u{1F600}', 'é', ' '];

#[derive(Clone, Debug)]
struct Script {
    depths: Vec<usize>,
    /// (client, action, position, delete, insert)
    steps: Vec<(u8, u8, u16, u8, String)>,
}

impl Arbitrary for Script {
    fn arbitrary(g: &mut Gen) -> Self {
        let clients = 2 + usize::arbitrary(g) % 3;
        let depths = (0..clients).map(|_| 1 + usize::arbitrary(g) % 3).collect();
        let steps = (0..usize::arbitrary(g) % 100)
            .map(|_| {
                let ins = (0..usize::arbitrary(g) % 3)
                    .map(|_| *g.choose(&ALPHABET).unwrap())
                    .collect();
                (
                    u8::arbitrary(g),
                    u8::arbitrary(g),
                    u16::arbitrary(g),
                    u8::arbitrary(g) % 3,
                    ins,
                )
            })
            .collect();
        Script { depths, steps }
    }
}

struct Client {
    id: u64,
    depth: usize,
    session: u64,
    doc: ClientDoc,
    /// Sent, not yet taken by the server.
    up: VecDeque<Outgoing>,
    down: Writer,
    /// The server's side of `down`, for the Reject a session would send.
    tx: Outbox,
    reloads: u32,
}

struct World {
    rt: tokio::runtime::Runtime,
    store: LocalSequencer,
    document: Arc<Document<Outbox>>,
    next_session: u64,
}

impl World {
    /// A new session opening the document.
    fn connect(&mut self, client_id: u64) -> Client {
        self.next_session += 1;
        let (tx, down) = outbox::outbox(self.next_session, client_id, 1 << 26, MAX_FRAME);
        let mut client = Client {
            id: client_id,
            depth: 1,
            session: self.next_session,
            doc: ClientDoc::new(String::new(), 0, 1),
            up: VecDeque::new(),
            down,
            tx,
            reloads: 0,
        };
        self.open(&mut client);
        client
    }

    /// `Open` on the client's session: (re)subscribes it with a fresh queue.
    fn open(&mut self, client: &mut Client) {
        let (tx, down) = outbox::outbox(client.session, client.id, 1 << 26, MAX_FRAME);
        self.document.subscribe(tx.clone());
        self.document.activate(client.session);
        client.tx = tx;
        client.down = down;
    }

    /// The server's durable text and version.
    fn current(&self) -> (String, u64) {
        self.rt
            .block_on(self.store.read("doc"))
            .expect("the simulated disk does not fail here")
            .map_or((String::new(), 0), |v| (v.text, v.version))
    }

    /// The client read a pipeline-conflict Reject. What it sent before reading it reaches
    /// the server first and must all be refused; then it reopens on the same connection
    /// and starts again from the server's text (its unacknowledged edits are dropped).
    fn reload(&mut self, client: &mut Client) {
        while let Some(out) = client.up.pop_front() {
            let outcome = self.document.submit(&self.store, submission(client, out));
            assert!(
                matches!(
                    outcome,
                    SubmitOutcome::Refused(Refusal {
                        kind: RefusalKind::PipelineConflict,
                        ..
                    })
                ),
                "an op sent after a refused pipelined op is refused too"
            );
        }
        self.open(client);
        let (text, version) = self.current();
        let next = client.doc.next_local_seq();
        client.doc = ClientDoc::new(text, version, next)
            .without_composing()
            .pipelined(client.depth);
        client.reloads += 1;
    }

    /// The server takes `client`'s oldest sent op.
    fn serve(&mut self, client: &mut Client) {
        let Some(out) = client.up.pop_front() else {
            return;
        };
        let local_seq = out.local_seq;
        let outcome = self.document.submit(&self.store, submission(client, out));
        match outcome {
            SubmitOutcome::Applied { seq, ticket } => {
                self.rt.block_on(self.store.wait_durable(ticket)).unwrap();
                self.document.mark_durable(seq);
            }
            SubmitOutcome::Refused(Refusal {
                kind: kind @ RefusalKind::PipelineConflict,
                message,
            }) => {
                // What the session sends; the client reads it when it gets this far.
                let reject = Message::Reject {
                    doc: "doc".into(),
                    local_seq,
                    code: refusal_code(kind),
                    message,
                };
                assert!(client.tx.send(encode(
                    &Envelope {
                        request_id: 0,
                        message: reject,
                    },
                    MAX_FRAME
                )));
            }
            SubmitOutcome::Refused(Refusal { kind, message }) => {
                panic!("refused as {kind:?}: {message}")
            }
            SubmitOutcome::Duplicate { .. } => panic!("no op is sent twice here"),
            SubmitOutcome::Moved(owner) => panic!("a single node's document moved to {owner:?}"),
            SubmitOutcome::AfterDeletion(_) => panic!("nothing is deleted here"),
        }
    }
}

fn submission(client: &Client, out: Outgoing) -> Submission {
    Submission {
        session: client.session,
        request_id: 0,
        client_id: client.id,
        local_seq: out.local_seq,
        base_version: out.base_version,
        patches: out.patches,
    }
}

/// Applies one message from the server; sends what became sendable.
fn deliver(world: &mut World, client: &mut Client) -> bool {
    let Some(frame) = client.down.try_recv() else {
        return false;
    };
    let env = FrameCodec::new(MAX_FRAME)
        .decode(&mut bytes::BytesMut::from(&frame[..]))
        .expect("the server's frames decode")
        .expect("one whole frame");
    match &env.message {
        Message::Ack { local_seq, seq, .. } => client.doc.on_ack(*local_seq, *seq).unwrap(),
        Message::Remote { op, .. } => {
            client.doc.on_remote(op.seq, &op.patches).unwrap();
        }
        Message::Reject { .. } => world.reload(client),
        _ => {}
    }
    send(client);
    true
}

fn send(client: &mut Client) {
    while let Some(out) = client.doc.take_to_send() {
        client.up.push_back(out);
    }
}

fn run(script: Script) -> TestResult {
    let dir = Path::new("/data");
    let (store, _) = LocalSequencer::open_with(
        Arc::new(SimFs::new()),
        dir,
        LocalConfig {
            wal: quire::wal::WalConfig {
                segment_size: 64 * 1024,
                ..Default::default()
            },
            maintenance_interval: Duration::from_secs(3600),
            ..LocalConfig::default()
        },
    )
    .unwrap();
    let mut world = World {
        rt: tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
        store,
        document: Arc::new(Document::new(
            Arc::from("doc"),
            0,
            DocumentLimits {
                presence_interval: Duration::ZERO,
                max_frame: MAX_FRAME,
                history_window: 4,
            },
        )),
        next_session: 0,
    };
    let mut clients: Vec<Client> = Vec::new();
    for (i, &depth) in script.depths.iter().enumerate() {
        let mut client = world.connect(i as u64 + 1);
        client.depth = depth;
        client.doc = client.doc.clone().without_composing().pipelined(depth);
        clients.push(client);
    }
    for (who, action, pos, del, ins) in script.steps {
        let c = &mut clients[who as usize % script.depths.len()];
        match action % 3 {
            0 => {
                let len = c.doc.len_chars();
                let pos = u32::from(pos) % (len + 1);
                let del = u32::from(del).min(len - pos);
                c.doc.local_edit(&[Patch::new(pos, del, ins)]).unwrap();
                send(c);
            }
            1 => world.serve(c),
            _ => {
                deliver(&mut world, c);
            }
        }
    }
    // Drain until quiet.
    loop {
        let mut moved = false;
        for c in clients.iter_mut() {
            while !c.up.is_empty() {
                world.serve(c);
                moved = true;
            }
            while deliver(&mut world, c) {
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let (text, version) = world.current();
    for c in &clients {
        assert!(!c.doc.has_pending(), "client {} has pending ops", c.id);
        assert_eq!(c.doc.text(), text, "client {} diverged", c.id);
        assert_eq!(c.doc.version(), version, "client {}", c.id);
    }
    let reloads: u32 = clients.iter().map(|c| c.reloads).sum();
    RELOADS.fetch_add(u64::from(reloads), Ordering::Relaxed);
    world.store.close();
    TestResult::passed()
}

static RELOADS: AtomicU64 = AtomicU64::new(0);

#[test]
fn pipelined_clients_converge_and_only_conflicts_are_refused() {
    QuickCheck::new()
        .tests(2000)
        .quickcheck(run as fn(Script) -> TestResult);
    // The conflict path was taken, not only the easy one.
    assert!(
        RELOADS.load(Ordering::Relaxed) > 0,
        "no pipeline conflict was generated"
    );
}
