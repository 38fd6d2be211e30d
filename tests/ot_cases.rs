//! The OT conformance file other clients check themselves against:
//! `clients/js/test/ot-cases.json`, generated here from `src/ot.rs`.
//!
//! With `QUIRE_WRITE_OT_CASES=1` this test (re)writes the file; without it, it fails if
//! the checked-in file differs from what the implementation produces now, so the file
//! can never drift from the Rust OT. The random cases come from a PRNG written out here
//! (splitmix64), not from a crate, so that a dependency update cannot change them.
//!
//! Format (one case per line, so a diff of the file reads case by case):
//! - components: a number is `retain(n)`, a string `insert(s)`, `{"d": n}` `delete(n)`;
//! - patches: `[pos, del, ins]`, code points;
//! - `transform` cases: `a` and `b` made on `base`; `a_ops`/`b_ops` their component
//!   forms (`from_patches`); `a_left` = transform(a, b, Left), `a_right` =
//!   transform(a, b, Right), `b_right` = transform(b, a, Right) as components;
//!   `a_left_patches` what the server sends for `a` sequenced after `b`; `final` the text
//!   after `b` then `a_left` (equal to `a` then `b_right`);
//! - `compose` cases: `b` made on `a`'s result; `ab` = compose(a, b) as components,
//!   `ab_patches` its patches, `result` the text after both;
//! - `frames`: whole frames (length field first) as `src/protocol` encodes them, in hex,
//!   with the message in the TypeScript client's form (u64 client ids and nonces as
//!   decimal strings), so the two encoders are checked against each other byte for byte.

use quire::op::Patch;
use quire::ot::{apply_patches, Component, Side, TextOp};
use quire::protocol::message::{Envelope, Message, Selection, WireOp};
use serde_json::{json, Value};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/test/ot-cases.json");

/// splitmix64: tiny, and fixed here forever.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
}

/// ASCII, a two-byte, a BMP three-byte and two astral characters (two UTF-16 units
/// each in JavaScript: the case a port most easily gets wrong).
const ALPHABET: [char; 7] = ['a', 'b', 'x', 'é', '€', '\u{1F600}', '\u{1D11E}'];

fn random_text(rng: &mut Rng, max: u32) -> String {
    (0..rng.below(max + 1))
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u32) as usize])
        .collect()
}

/// 1 to 3 patches applying one after another to a text of `len` code points; positions
/// are drawn from few values so that same-position inserts and overlaps are common.
fn random_patches(rng: &mut Rng, mut len: u32) -> Vec<Patch> {
    (0..1 + rng.below(3))
        .map(|_| {
            let pos = rng.below(len + 1);
            let del = match rng.below(3) {
                0 => rng.below(len - pos + 1),
                _ => 0,
            };
            let ins = random_text(rng, 3);
            len = len - del + ins.chars().count() as u32;
            Patch::new(pos, del, ins)
        })
        .collect()
}

fn patches_json(patches: &[Patch]) -> Value {
    Value::Array(
        patches
            .iter()
            .map(|p| json!([p.pos, p.del, p.ins]))
            .collect(),
    )
}

fn op_json(op: &TextOp) -> Value {
    Value::Array(
        op.components()
            .iter()
            .map(|c| match c {
                Component::Retain(n) => json!(n),
                Component::Delete(n) => json!({ "d": n }),
                Component::Insert(s) => json!(s),
            })
            .collect(),
    )
}

fn transform_case(name: &str, base: &str, a: &[Patch], b: &[Patch]) -> Value {
    let (ao, bo) = (TextOp::from_patches(a), TextOp::from_patches(b));
    let a_left = ao.transform(&bo, Side::Left);
    let b_right = bo.transform(&ao, Side::Right);
    let after_b = apply_patches(base, b).expect("b applies to its base");
    let final_text = a_left.apply(&after_b).expect("a rebased applies after b");
    let other = ao
        .apply(base)
        .and_then(|t| b_right.apply(&t))
        .expect("b rebased applies after a");
    assert_eq!(final_text, other, "{name}: the two orders diverge");
    json!({
        "name": name,
        "base": base,
        "a": patches_json(a),
        "b": patches_json(b),
        "a_ops": op_json(&ao),
        "b_ops": op_json(&bo),
        "a_left": op_json(&a_left),
        "a_right": op_json(&ao.transform(&bo, Side::Right)),
        "b_right": op_json(&b_right),
        "a_left_patches": patches_json(&a_left.to_patches()),
        "final": final_text,
    })
}

fn compose_case(name: &str, base: &str, a: &[Patch], b: &[Patch]) -> Value {
    let (ao, bo) = (TextOp::from_patches(a), TextOp::from_patches(b));
    let ab = ao.compose(&bo);
    let result = apply_patches(base, a)
        .and_then(|t| apply_patches(&t, b))
        .expect("a then b apply");
    assert_eq!(ab.apply(base).as_deref(), Some(result.as_str()), "{name}");
    json!({
        "name": name,
        "base": base,
        "a": patches_json(a),
        "b": patches_json(b),
        "ab": op_json(&ab),
        "ab_patches": patches_json(&ab.to_patches()),
        "result": result,
    })
}

fn p(pos: u32, del: u32, ins: &str) -> Patch {
    Patch::new(pos, del, ins)
}

fn frame_case(name: &str, request_id: u32, message: Message, js: Value) -> Value {
    let body = Envelope {
        request_id,
        message,
    }
    .encode();
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    json!({ "name": name, "request_id": request_id, "hex": hex, "message": js })
}

fn frames() -> Vec<Value> {
    let big = (1u64 << 63) + 5;
    vec![
        frame_case(
            "Hello asking for an id",
            0,
            Message::Hello {
                version: 2,
                client_id: 0,
                token: "t\u{e9}".into(),
            },
            json!({ "type": "Hello", "clientId": "0", "token": "t\u{e9}" }),
        ),
        frame_case(
            "Welcome with a server-given id",
            0,
            Message::Welcome {
                version: 2,
                max_frame: 1 << 20,
                client_id: big,
            },
            json!({ "type": "Welcome", "version": 2, "maxFrame": 1 << 20, "clientId": big.to_string() }),
        ),
        frame_case(
            "Submit with astral characters",
            9,
            Message::Submit {
                doc: "notes/\u{1F600}".into(),
                local_seq: 3,
                base_version: 70_000,
                patches: vec![p(2, 1, "\u{1D11E}x"), p(0, 0, "")],
            },
            json!({ "type": "Submit", "doc": "notes/\u{1F600}", "localSeq": 3, "baseVersion": 70_000,
                    "patches": [[2, 1, "\u{1D11E}x"], [0, 0, ""]] }),
        ),
        frame_case(
            "Remote from a server-given id",
            0,
            Message::Remote {
                doc: "d".into(),
                op: WireOp {
                    seq: 12,
                    client_id: big,
                    local_seq: 4,
                    patches: vec![p(1, 0, "\u{1F600}")],
                },
            },
            json!({ "type": "Remote", "doc": "d", "seq": 12, "clientId": big.to_string(), "localSeq": 4,
                    "patches": [[1, 0, "\u{1F600}"]] }),
        ),
        frame_case(
            "Snapshot piece",
            2,
            Message::Snapshot {
                doc: "d".into(),
                version: 5,
                total_len: 7,
                text: "a\u{1F600}b".into(),
            },
            json!({ "type": "Snapshot", "doc": "d", "version": 5, "totalLen": 7, "text": "a\u{1F600}b" }),
        ),
        frame_case(
            "PresenceState",
            0,
            Message::PresenceState {
                doc: "d".into(),
                client_id: 7,
                selections: vec![Selection { anchor: 1, head: 4 }],
            },
            json!({ "type": "PresenceState", "doc": "d", "clientId": "7", "selections": [{ "anchor": 1, "head": 4 }] }),
        ),
    ]
}

fn generate() -> String {
    let mut transform = Vec::new();
    let hand: Vec<(&str, &str, Vec<Patch>, Vec<Patch>)> = vec![
        (
            "same-position inserts",
            "ab",
            vec![p(1, 0, "L")],
            vec![p(1, 0, "F")],
        ),
        (
            "same-position inserts at the start",
            "",
            vec![p(0, 0, "A")],
            vec![p(0, 0, "B")],
        ),
        (
            "same-position astral inserts",
            "\u{1F600}",
            vec![p(1, 0, "\u{10348}")],
            vec![p(1, 0, "\u{1F600}")],
        ),
        (
            "astral positions",
            "a\u{1F600}b",
            vec![p(2, 0, "\u{10348}")],
            vec![p(0, 1, "é\u{1F600}")],
        ),
        (
            "clef and emoji",
            "\u{1D11E}\u{1F600}\u{1D11E}",
            vec![p(1, 1, "\u{1D11E}")],
            vec![p(1, 0, "\u{1F600}\u{1F600}")],
        ),
        (
            "insert inside a deleted range",
            "abcdef",
            vec![p(3, 0, "X")],
            vec![p(1, 4, "")],
        ),
        (
            "insert at the end of a deleted range",
            "abcd",
            vec![p(3, 0, "X")],
            vec![p(1, 2, "Y")],
        ),
        (
            "two splices of one range",
            "abcd",
            vec![p(1, 2, "X")],
            vec![p(1, 2, "Y")],
        ),
        (
            "overlapping deletes",
            "abcdef",
            vec![p(1, 3, "")],
            vec![p(2, 3, "")],
        ),
        (
            "delete around an insert",
            "abcd",
            vec![p(1, 2, "")],
            vec![p(2, 0, "X")],
        ),
        (
            "delete starting at an insert",
            "abcd",
            vec![p(1, 2, "")],
            vec![p(1, 0, "X")],
        ),
        (
            "astral delete over an astral insert",
            "\u{1F600}a\u{1F600}",
            vec![p(0, 3, "")],
            vec![p(2, 0, "\u{1D11E}")],
        ),
        (
            "no-op after transform",
            "abc",
            vec![p(1, 0, "X"), p(1, 1, "")],
            vec![p(0, 1, "")],
        ),
        (
            "patches out of order",
            "abcd",
            vec![p(3, 0, "X"), p(0, 0, "Y")],
            vec![p(2, 1, "")],
        ),
        (
            "edits past the other's end",
            "ab",
            vec![p(2, 0, "\u{1F600}")],
            vec![p(0, 0, "\u{1D11E}\u{1D11E}\u{1D11E}")],
        ),
    ];
    for (name, base, a, b) in &hand {
        transform.push(transform_case(name, base, a, b));
    }
    let mut rng = Rng(0x5155_4952_4500_0001);
    for i in 0..300 {
        let base = random_text(&mut rng, 8);
        let len = base.chars().count() as u32;
        let a = random_patches(&mut rng, len);
        let b = random_patches(&mut rng, len);
        transform.push(transform_case(&format!("random {i}"), &base, &a, &b));
    }

    let mut compose = Vec::new();
    let hand: Vec<(&str, &str, Vec<Patch>, Vec<Patch>)> = vec![
        (
            "insert then delete it",
            "abc",
            vec![p(1, 0, "\u{1F600}\u{1F600}")],
            vec![p(2, 1, "")],
        ),
        (
            "insert then insert before it",
            "abc",
            vec![p(1, 0, "X")],
            vec![p(1, 0, "Y")],
        ),
        (
            "delete then insert where it was",
            "abc",
            vec![p(0, 2, "")],
            vec![p(0, 0, "\u{1D11E}")],
        ),
        (
            "delete spanning an insert and base text",
            "abcdef",
            vec![p(1, 0, "XY")],
            vec![p(0, 5, "")],
        ),
        (
            "astral splice of a splice",
            "\u{1F600}\u{1F600}\u{1F600}",
            vec![p(1, 1, "é\u{1D11E}")],
            vec![p(2, 2, "x")],
        ),
    ];
    for (name, base, a, b) in &hand {
        compose.push(compose_case(name, base, a, b));
    }
    for i in 0..200 {
        let base = random_text(&mut rng, 8);
        let a = random_patches(&mut rng, base.chars().count() as u32);
        let mid = apply_patches(&base, &a).unwrap();
        let b = random_patches(&mut rng, mid.chars().count() as u32);
        compose.push(compose_case(&format!("random {i}"), &base, &a, &b));
    }
    // A chain: many one-patch edits composed left to right, as a client's buffer does.
    let mut base = String::from("\u{1F600}x\u{1D11E}");
    for i in 0..40 {
        let a = random_patches(&mut rng, base.chars().count() as u32);
        let mid = apply_patches(&base, &a).unwrap();
        let b = random_patches(&mut rng, mid.chars().count() as u32);
        compose.push(compose_case(&format!("chain {i}"), &base, &a, &b));
        base = apply_patches(&mid, &b).unwrap();
    }

    let lines = |cases: &[Value]| {
        cases
            .iter()
            .map(|c| serde_json::to_string(c).unwrap())
            .collect::<Vec<_>>()
            .join(",\n")
    };
    format!(
        "{{\"transform\": [\n{}\n],\n\"compose\": [\n{}\n],\n\"frames\": [\n{}\n]}}\n",
        lines(&transform),
        lines(&compose),
        lines(&frames())
    )
}

#[test]
fn ot_cases_file_matches_the_rust_implementation() {
    let generated = generate();
    // The file parses back (a hand edit cannot leave it broken unnoticed).
    let _: Value = serde_json::from_str(&generated).expect("valid JSON");
    if std::env::var_os("QUIRE_WRITE_OT_CASES").is_some_and(|v| v == "1") {
        std::fs::write(PATH, &generated).expect("write the OT cases file");
        return;
    }
    let on_disk = std::fs::read_to_string(PATH).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{PATH} differs from what src/ot.rs produces: run \
         QUIRE_WRITE_OT_CASES=1 cargo test --test integration ot_cases::, and check the JS client \
         against it (clients/js: npm test)"
    );
}
