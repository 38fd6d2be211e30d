//! TP1 in the client/server model: 2 to 5 clients edit one document concurrently
//! (astral-plane characters included); the server sequences their ops in a random
//! interleaving, rebasing each late op over the ops it missed; messages are delivered
//! in random order per link. Every replica converges to the server's text.

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use quire::client::state::{ClientDoc, Outgoing};
use quire::op::Patch;
use quire::ot::{apply_patches, Side, TextOp};
use std::collections::VecDeque;

#[derive(Clone, Debug)]
struct Script {
    clients: usize,
    start: String,
    steps: Vec<(u8, u8, u16, u8, String)>,
}

const ALPHABET: [char; 6] = ['a', 'b', '\u{1F600}', '\u{10348}', 'é', ' '];

impl Arbitrary for Script {
    fn arbitrary(g: &mut Gen) -> Self {
        let clients = 2 + usize::arbitrary(g) % 4;
        let start_len = usize::arbitrary(g) % 12;
        let start = (0..start_len)
            .map(|_| *g.choose(&ALPHABET).unwrap())
            .collect();
        let n = usize::arbitrary(g) % 120;
        let steps = (0..n)
            .map(|_| {
                let ins_len = usize::arbitrary(g) % 4;
                let ins = (0..ins_len)
                    .map(|_| *g.choose(&ALPHABET).unwrap())
                    .collect();
                (
                    u8::arbitrary(g),
                    u8::arbitrary(g),
                    u16::arbitrary(g),
                    u8::arbitrary(g) % 4,
                    ins,
                )
            })
            .collect();
        Script {
            clients,
            start,
            steps,
        }
    }
}

struct Server {
    text: String,
    history: Vec<TextOp>,
}

enum Down {
    Ack { local_seq: u64, seq: u64 },
    Remote { seq: u64, patches: Vec<Patch> },
}

fn run(script: Script) -> TestResult {
    let mut server = Server {
        text: script.start.clone(),
        history: Vec::new(),
    };
    let mut clients: Vec<ClientDoc> = (0..script.clients)
        .map(|_| ClientDoc::new(script.start.clone(), 0, 1))
        .collect();
    let mut up: Vec<VecDeque<Outgoing>> = vec![VecDeque::new(); script.clients];
    let mut down: Vec<VecDeque<Down>> = (0..script.clients).map(|_| VecDeque::new()).collect();

    let serve =
        |server: &mut Server, down: &mut Vec<VecDeque<Down>>, from: usize, out: Outgoing| {
            let mut op = TextOp::from_patches(&out.patches);
            for over in &server.history[out.base_version as usize..] {
                op = op.transform(over, Side::Left);
            }
            let patches = op.to_patches();
            server.text = apply_patches(&server.text, &patches).expect("rebased op applies");
            server.history.push(op);
            let seq = server.history.len() as u64;
            for (i, link) in down.iter_mut().enumerate() {
                link.push_back(if i == from {
                    Down::Ack {
                        local_seq: out.local_seq,
                        seq,
                    }
                } else {
                    Down::Remote {
                        seq,
                        patches: patches.clone(),
                    }
                });
            }
        };
    let deliver = |client: &mut ClientDoc, msg: Down| match msg {
        Down::Ack { local_seq, seq } => client.on_ack(local_seq, seq).unwrap(),
        Down::Remote { seq, patches } => {
            client.on_remote(seq, &patches).unwrap();
        }
    };

    for (who, what, pos, del, ins) in script.steps {
        let c = who as usize % script.clients;
        match what % 4 {
            0 | 1 => {
                let len = clients[c].text().chars().count();
                let pos = pos as usize % (len + 1);
                let del = (del as usize).min(len - pos);
                clients[c]
                    .local_edit(&[Patch::new(pos as u32, del as u32, ins)])
                    .unwrap();
                if let Some(out) = clients[c].take_to_send() {
                    up[c].push_back(out);
                }
            }
            2 => {
                if let Some(out) = up[c].pop_front() {
                    serve(&mut server, &mut down, c, out);
                }
            }
            _ => {
                if let Some(msg) = down[c].pop_front() {
                    deliver(&mut clients[c], msg);
                    if let Some(out) = clients[c].take_to_send() {
                        up[c].push_back(out);
                    }
                }
            }
        }
    }
    // Drain: deliver everything until quiet.
    loop {
        let mut moved = false;
        for c in 0..script.clients {
            while let Some(out) = up[c].pop_front() {
                serve(&mut server, &mut down, c, out);
                moved = true;
            }
            while let Some(msg) = down[c].pop_front() {
                deliver(&mut clients[c], msg);
                if let Some(out) = clients[c].take_to_send() {
                    up[c].push_back(out);
                }
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    for (i, client) in clients.iter().enumerate() {
        assert!(!client.has_pending(), "client {i} still has pending ops");
        assert_eq!(client.text(), server.text, "client {i} diverged");
        assert_eq!(client.version(), server.history.len() as u64);
    }
    TestResult::passed()
}

#[test]
fn every_replica_converges_to_the_server_text_under_any_interleaving() {
    QuickCheck::new()
        .tests(2000)
        .quickcheck(run as fn(Script) -> TestResult);
}

fn arb_op(g: &mut Gen, len: usize) -> (Vec<Patch>, usize) {
    let pos = usize::arbitrary(g) % (len + 1);
    let del = usize::arbitrary(g) % (len - pos + 1);
    let ins: String = (0..usize::arbitrary(g) % 4)
        .map(|_| *g.choose(&ALPHABET).unwrap())
        .collect();
    let new_len = len - del + ins.chars().count();
    (vec![Patch::new(pos as u32, del as u32, ins)], new_len)
}

#[test]
fn transform_satisfies_tp1_and_compose_matches_sequential_application() {
    fn prop(seed: Vec<u8>) -> TestResult {
        let mut g = Gen::new(16);
        let base: String = seed
            .iter()
            .map(|b| ALPHABET[*b as usize % ALPHABET.len()])
            .collect();
        let len = base.chars().count();
        let (pa, la) = arb_op(&mut g, len);
        let (pb, _) = arb_op(&mut g, len);
        let (a, b) = (TextOp::from_patches(&pa), TextOp::from_patches(&pb));
        let left = a
            .apply(&base)
            .and_then(|t| b.transform(&a, Side::Right).apply(&t));
        let right = b
            .apply(&base)
            .and_then(|t| a.transform(&b, Side::Left).apply(&t));
        assert_eq!(left, right, "TP1: {pa:?} / {pb:?} on {base:?}");
        let (pc, _) = arb_op(&mut g, la);
        let c = TextOp::from_patches(&pc);
        let composed = a.compose(&c).apply(&base);
        assert_eq!(composed, a.apply(&base).and_then(|t| c.apply(&t)));
        assert_eq!(apply_patches(&base, &a.compose(&c).to_patches()), composed);
        TestResult::passed()
    }
    QuickCheck::new()
        .tests(5000)
        .quickcheck(prop as fn(Vec<u8>) -> TestResult);
}
