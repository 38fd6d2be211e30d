//! The worked examples of protocol.md ("Operational transformation"), read out of the
//! document itself and checked against `src/ot.rs`, so that the specification a client
//! is written from and the code cannot drift apart. Each row: `B` sequenced first, `A`
//! made on the same base and rebased by the server with `Side::Left`; the patches the
//! server sends for `A`, the final text, and convergence with a client that applied `A`
//! first and rebases `B` over it with `Side::Right`.

use quire::client::state::ClientDoc;
use quire::op::Patch;
use quire::ot::{apply_patches, Side, TextOp};
use serde_json::Value;

const PROTOCOL: &str = include_str!("../protocol.md");
const SECTION: &str = "## Operational transformation";
const HEADER: &str =
    "| rule | base | A | B (sequenced first) | A' as the server sends it | final text |";

struct Example {
    rule: String,
    base: String,
    a: Vec<Patch>,
    b: Vec<Patch>,
    a_sent: Vec<Patch>,
    final_text: String,
}

/// The section's text, from its heading to the next top-level heading.
fn section(doc: &str) -> &str {
    let start = doc
        .find(&format!("\n{SECTION}\n"))
        .unwrap_or_else(|| panic!("protocol.md has no {SECTION:?} section"))
        + 1;
    let body = &doc[start + SECTION.len()..];
    let end = body.find("\n## ").map_or(body.len(), |i| i + 1);
    &body[..end]
}

/// A table cell holding JSON in backticks.
fn json(cell: &str, rule: &str) -> Value {
    let inner = cell
        .trim()
        .strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .unwrap_or_else(|| panic!("{rule}: cell {cell:?} is not in backticks"));
    serde_json::from_str(inner).unwrap_or_else(|e| panic!("{rule}: {inner:?}: {e}"))
}

fn text(cell: &str, rule: &str) -> String {
    match json(cell, rule) {
        Value::String(s) => s,
        other => panic!("{rule}: {other} is not a JSON string"),
    }
}

fn patches(cell: &str, rule: &str) -> Vec<Patch> {
    let Value::Array(list) = json(cell, rule) else {
        panic!("{rule}: {cell:?} is not a JSON array of patches");
    };
    list.iter()
        .map(|patch| match patch.as_array().map(Vec::as_slice) {
            Some([pos, del, Value::String(ins)]) => {
                let number = |v: &Value| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or_else(|| panic!("{rule}: {v} is not a u32"))
                };
                Patch::new(number(pos), number(del), ins.as_str())
            }
            _ => panic!("{rule}: {patch} is not [pos, del, ins]"),
        })
        .collect()
}

fn examples() -> Vec<Example> {
    let mut lines = section(PROTOCOL).lines().skip_while(|l| l.trim() != HEADER);
    assert!(
        lines.next().is_some(),
        "no examples table with the header {HEADER:?} in {SECTION:?}"
    );
    assert!(lines.next().is_some_and(|l| l.starts_with("|---")));
    lines
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
            assert_eq!(cells.len(), 6, "a row of six cells: {line}");
            let rule = cells[0].trim().to_owned();
            Example {
                base: text(cells[1], &rule),
                a: patches(cells[2], &rule),
                b: patches(cells[3], &rule),
                a_sent: patches(cells[4], &rule),
                final_text: text(cells[5], &rule),
                rule,
            }
        })
        .collect()
}

#[test]
fn every_example_of_protocol_md_is_what_src_ot_rs_computes_and_converges() {
    let examples = examples();
    for ex in &examples {
        let rule = &ex.rule;
        let (a, b) = (TextOp::from_patches(&ex.a), TextOp::from_patches(&ex.b));

        let a_sent = a.transform(&b, Side::Left).to_patches();
        assert_eq!(
            a_sent, ex.a_sent,
            "{rule}: the patches the server sends for A"
        );

        let after_b = apply_patches(&ex.base, &ex.b).expect("B applies to the base");
        let server_text = apply_patches(&after_b, &a_sent).expect("A' applies after B");
        assert_eq!(server_text, ex.final_text, "{rule}: the final text");

        // A's author applied A first and rebases B over it, as the section says.
        let after_a = apply_patches(&ex.base, &ex.a).expect("A applies to the base");
        let b_rebased = b.transform(&a, Side::Right).to_patches();
        assert_eq!(
            apply_patches(&after_a, &b_rebased).as_deref(),
            Some(ex.final_text.as_str()),
            "{rule}: convergence (A then B rebased over A)"
        );

        // The Rust client does the same with A in flight when B arrives.
        let mut client = ClientDoc::new(ex.base.clone(), 0, 1);
        client.local_edit(&ex.a).expect("A applies to the base");
        let _in_flight = client.take_to_send();
        client
            .on_remote(1, &b.to_patches())
            .expect("B applies to the client");
        assert_eq!(client.text(), ex.final_text, "{rule}: the client's text");
    }

    // The table keeps covering what the section promises.
    assert!(examples.len() >= 10, "only {} examples", examples.len());
    let astral = |p: &[Patch]| p.iter().any(|p| p.ins.chars().any(|c| c > '\u{FFFF}'));
    assert!(
        examples.iter().any(|ex| astral(&ex.a) && astral(&ex.b)),
        "no example with astral characters"
    );
    let same_position_inserts = |ex: &Example| match (ex.a.as_slice(), ex.b.as_slice()) {
        ([a], [b]) => a.pos == b.pos && a.del == 0 && b.del == 0,
        _ => false,
    };
    assert!(
        examples.iter().any(same_position_inserts),
        "no example of inserts at one position"
    );
}
