//! Arbitrary bytes as a Submit message body and as two concurrent ops: decoding never
//! panics; the rope, the string model and the op form of a patch list agree (or all
//! refuse it); compose is apply-then-apply; and two concurrent ops transformed over each
//! other converge (TP1), with text outside the BMP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quire::op::Patch;
use quire::ot::{apply_patches, Side, TextOp};
use quire::protocol::message::{Envelope, Message};
use quire::text::Text;

const START: &str = "start \u{1F600} text é";
const INSERTS: [&str; 5] = ["", "a", "\u{1F600}", "xyz", "\u{10FFFF}é"];

/// Patches from bytes, three per patch. Positions may fall outside the text on purpose.
fn patches(bytes: &[u8]) -> Vec<Patch> {
    bytes
        .chunks_exact(3)
        .map(|c| {
            Patch::new(
                u32::from(c[0] % 40),
                u32::from(c[1] % 6),
                INSERTS[usize::from(c[2]) % INSERTS.len()],
            )
        })
        .collect()
}

/// The three ways of applying `patches` to `text` must agree.
fn apply_all_ways(text: &str, patches: &[Patch]) -> Option<String> {
    let model = apply_patches(text, patches);
    let mut rope = Text::from(text);
    let rope_result = rope.apply(patches).ok().map(|()| rope.to_string());
    assert_eq!(rope_result, model, "rope vs string model for {patches:?}");
    if let Some(expected) = &model {
        let op = TextOp::from_patches(patches);
        assert_eq!(
            op.apply(text).as_ref(),
            Some(expected),
            "op form of {patches:?}"
        );
        assert_eq!(
            apply_patches(text, &op.to_patches()).as_ref(),
            Some(expected)
        );
    }
    model
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        if let Message::Submit { patches, .. } = env.message {
            apply_all_ways(START, &patches);
        }
    }
    let (left, right) = data.split_at(data.len() / 2);
    let (a, b) = (patches(left), patches(right));
    let (Some(after_a), Some(after_b)) = (apply_all_ways(START, &a), apply_all_ways(START, &b))
    else {
        return;
    };
    let (op_a, op_b) = (TextOp::from_patches(&a), TextOp::from_patches(&b));
    // Compose: a then b' (b rebased onto a) is one op.
    let b_after_a = op_b.transform(&op_a, Side::Left);
    let a_after_b = op_a.transform(&op_b, Side::Right);
    let one = b_after_a.apply(&after_a).expect("b rebased onto a applies");
    let two = a_after_b.apply(&after_b).expect("a rebased onto b applies");
    assert_eq!(one, two, "TP1 for {a:?} / {b:?}");
    assert_eq!(op_a.compose(&b_after_a).apply(START), Some(one), "compose");
});
