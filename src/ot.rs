//! Operational transformation on text. Depends on nothing but the patch type.
//!
//! An op on the wire and in the log is a list of patches `[pos, del, ins]` applied one
//! after another. To transform and compose, an op is first put in component form: a
//! walk over the document, left to right, of `Retain(n)`, `Delete(n)` and
//! `Insert(text)`, in Unicode code points, with an implicit `Retain` to the end (so an
//! op does not need to know the document's length). Components are kept canonical: no
//! empty component, no two adjacent of the same kind, an insert before an adjacent
//! delete, no trailing retain; so equal edits have equal forms.
//!
//! **Tie-break.** When two concurrent ops insert at the same position, the op the server
//! sequenced *later* ends up on the left (ShareDB's convention: a submitted op is
//! transformed over committed ones as `left`). `a.transform(b, Side::Left)` rebases `a`
//! over `b` with `a`'s insert first; `Side::Right` puts `b`'s first. The server rebases a
//! late op over ops it already sequenced with `Side::Left`; a client rebases its pending
//! op over an incoming server op with `Side::Left` and the server op over its pending op
//! with `Side::Right`. Both sides then agree (TP1 in the client/server model, checked by
//! `tests/ot_convergence.rs`). Chosen by measurement: with the opposite convention the
//! friendsforever trace converges, but not to its published text (ties arise where one
//! user inserts next to text the other concurrently deleted); with this one it matches
//! (`tests/server.rs`).
//!
//! `protocol.md` ("Operational transformation") specifies all of this for client authors,
//! with worked examples that `tests/protocol_ot_examples.rs` checks against this file.

use crate::op::Patch;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Component {
    Retain(u32),
    Delete(u32),
    Insert(String),
}

/// Which op's insert goes first when both insert at the same position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextOp {
    components: Vec<Component>,
}

fn chars(s: &str) -> u32 {
    s.chars().count() as u32
}

/// Splits `s` after `n` code points.
fn split_chars(s: &str, n: u32) -> (&str, &str) {
    match s.char_indices().nth(n as usize) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    }
}

/// A cursor over an op's components that can take part of one.
///
/// It keeps what is left of the current component, in code points and (for an insert)
/// as a byte offset, so taking a long insert piece by piece costs the length of the
/// pieces, not a scan from the insert's start per piece: compose and transform stay
/// linear in their ops' sizes.
struct Cursor<'a> {
    components: &'a [Component],
    index: usize,
    /// Code points of the current component not yet taken (`u32::MAX` past the end:
    /// the implicit trailing retain).
    left: u32,
    /// Bytes of the current insert already taken.
    taken_bytes: usize,
}

#[derive(Debug)]
enum Piece<'a> {
    Retain(u32),
    Delete(u32),
    Insert(&'a str),
}

impl<'a> Cursor<'a> {
    fn new(op: &'a TextOp) -> Self {
        let mut cursor = Cursor {
            components: &op.components,
            index: 0,
            left: 0,
            taken_bytes: 0,
        };
        cursor.enter();
        cursor
    }

    /// Starts on the component at `index`.
    fn enter(&mut self) {
        self.taken_bytes = 0;
        self.left = match self.peek() {
            Some(Component::Retain(n) | Component::Delete(n)) => *n,
            Some(Component::Insert(s)) => chars(s),
            None => u32::MAX,
        };
        // Canonical ops have no empty component.
        debug_assert!(self.left > 0, "empty component in {:?}", self.peek());
    }

    fn peek(&self) -> Option<&'a Component> {
        self.components.get(self.index)
    }

    /// Length left in the current component.
    fn remaining(&self) -> u32 {
        self.left
    }

    /// Takes up to `n` code points of the current component (the implicit trailing
    /// retain when the op is exhausted).
    fn take(&mut self, n: u32) -> Piece<'a> {
        let Some(component) = self.peek() else {
            return Piece::Retain(n);
        };
        let n = n.min(self.left);
        let piece = match component {
            Component::Retain(_) => Piece::Retain(n),
            Component::Delete(_) => Piece::Delete(n),
            Component::Insert(s) => {
                let rest = &s[self.taken_bytes..];
                let head = if n == self.left {
                    rest
                } else {
                    split_chars(rest, n).0
                };
                self.taken_bytes += head.len();
                Piece::Insert(head)
            }
        };
        if n == self.left {
            self.index += 1;
            self.enter();
        } else {
            self.left -= n;
        }
        piece
    }

    fn take_all(&mut self) -> Piece<'a> {
        self.take(u32::MAX)
    }

    fn done(&self) -> bool {
        self.index >= self.components.len()
    }
}

impl TextOp {
    pub fn new() -> Self {
        TextOp::default()
    }

    pub fn components(&self) -> &[Component] {
        &self.components
    }

    pub fn is_noop(&self) -> bool {
        self.components.is_empty()
    }

    pub fn retain(&mut self, n: u32) -> &mut Self {
        if n == 0 {
            return self;
        }
        match self.components.last_mut() {
            Some(Component::Retain(m)) => *m += n,
            _ => self.components.push(Component::Retain(n)),
        }
        self
    }

    pub fn delete(&mut self, n: u32) -> &mut Self {
        if n == 0 {
            return self;
        }
        match self.components.last_mut() {
            Some(Component::Delete(m)) => *m += n,
            _ => self.components.push(Component::Delete(n)),
        }
        self
    }

    pub fn insert(&mut self, s: &str) -> &mut Self {
        if s.is_empty() {
            return self;
        }
        let len = self.components.len();
        match self.components.last_mut() {
            Some(Component::Insert(t)) => t.push_str(s),
            // Canonical order: an insert goes before an adjacent delete.
            Some(Component::Delete(_)) => match len.checked_sub(2).map(|i| &mut self.components[i])
            {
                Some(Component::Insert(t)) => t.push_str(s),
                _ => self
                    .components
                    .insert(len - 1, Component::Insert(s.to_owned())),
            },
            _ => self.components.push(Component::Insert(s.to_owned())),
        }
        self
    }

    fn push_piece(&mut self, piece: Piece<'_>) {
        match piece {
            Piece::Retain(n) => self.retain(n),
            Piece::Delete(n) => self.delete(n),
            Piece::Insert(s) => self.insert(s),
        };
    }

    /// Copies what is left of `cursor`'s op.
    fn push_rest(&mut self, cursor: &mut Cursor<'_>) {
        while !cursor.done() {
            self.push_piece(cursor.take_all());
        }
    }

    /// Drops the trailing retain (it is implicit).
    fn finish(mut self) -> Self {
        if let Some(Component::Retain(_)) = self.components.last() {
            self.components.pop();
        }
        self
    }

    /// Where a position of the op's base (a cursor: 0 ..= the base's length, in code
    /// points) ends up in its result. A cursor stays before text inserted at it, and
    /// one inside deleted text goes to where the deletion was.
    pub fn map_position(&self, pos: u32) -> u32 {
        let (mut base, mut out) = (0u32, 0u32);
        for component in &self.components {
            match component {
                Component::Retain(n) => {
                    if pos < base + n {
                        return out + (pos - base);
                    }
                    base += n;
                    out += n;
                }
                Component::Insert(s) => {
                    if pos <= base {
                        return out;
                    }
                    out += chars(s);
                }
                Component::Delete(n) => {
                    if pos < base + n {
                        return out;
                    }
                    base += n;
                }
            }
        }
        out + (pos - base)
    }

    /// One patch as an op.
    pub fn from_patch(patch: &Patch) -> TextOp {
        // A retain, a delete and an insert at most: one allocation, not a growth per push.
        let mut op = TextOp {
            components: Vec::with_capacity(3),
        };
        op.retain(patch.pos).delete(patch.del).insert(&patch.ins);
        op.finish()
    }

    /// Patches applied one after another, as one op.
    ///
    /// The patches' ops are composed pairwise, as a balanced tree: each round composes
    /// neighbours (1 with 2, 3 with 4, ...), halving their number. `compose` is linear in
    /// its two ops (components and inserted text, see `Cursor`) and its result has at
    /// most as many components as both together, so a round is linear in the input and
    /// there are ⌈log₂ n⌉ rounds: O(n log n) for n patches. Folding `compose` left to
    /// right cost the grown op's size per patch, O(n²): 38 s for 60,000 scattered
    /// one-character inserts (`examples/from_patches_time.rs`). Composition is
    /// associative and an edit has one canonical form, so the grouping changes nothing:
    /// the result is the fold's, component for component (checked against the fold by
    /// the tests below). This needs no data structure beyond `compose`; a tree of pieces
    /// of the result indexed by length would do the same in a hand-written tree.
    pub fn from_patches(patches: &[Patch]) -> TextOp {
        // Most ops are one patch (a keystroke): no list of ops to compose.
        if let [patch] = patches {
            return TextOp::from_patch(patch);
        }
        let mut ops: Vec<TextOp> = patches
            .iter()
            .map(TextOp::from_patch)
            .filter(|op| !op.is_noop())
            .collect();
        while ops.len() > 1 {
            let mut next = Vec::with_capacity(ops.len().div_ceil(2));
            let mut round = ops.into_iter();
            while let Some(first) = round.next() {
                next.push(match round.next() {
                    Some(second) => first.compose(&second),
                    None => first,
                });
            }
            ops = next;
        }
        ops.pop().unwrap_or_default()
    }

    /// The op as patches applied one after another, left to right (each position is in
    /// the text as the earlier patches left it). An adjacent delete and insert become
    /// one patch.
    pub fn to_patches(&self) -> Vec<Patch> {
        // A patch per insert or delete, at most (sized once: most ops are one patch).
        let edits = self
            .components
            .iter()
            .filter(|c| !matches!(c, Component::Retain(_)))
            .count();
        let mut patches: Vec<Patch> = Vec::with_capacity(edits);
        let mut pos = 0u32;
        for component in &self.components {
            match component {
                Component::Retain(n) => pos += n,
                Component::Insert(s) => {
                    patches.push(Patch::new(pos, 0, s.clone()));
                    pos += chars(s);
                }
                Component::Delete(n) => match patches.last_mut() {
                    // The insert just before this delete: one splice.
                    Some(last) if last.del == 0 && last.pos + chars(&last.ins) == pos => {
                        last.del = *n;
                        // The splice deletes first, then inserts: same result.
                    }
                    _ => patches.push(Patch::new(pos, *n, "")),
                },
            }
        }
        patches
    }

    /// The shortest text this op applies to (its retains and deletes).
    pub fn min_base_len(&self) -> u64 {
        self.components
            .iter()
            .map(|c| match c {
                Component::Retain(n) | Component::Delete(n) => u64::from(*n),
                Component::Insert(_) => 0,
            })
            .sum()
    }

    /// Code points this op adds (inserts minus deletes).
    pub fn len_delta(&self) -> i64 {
        self.components
            .iter()
            .map(|c| match c {
                Component::Retain(_) => 0,
                Component::Delete(n) => -i64::from(*n),
                Component::Insert(s) => i64::from(chars(s)),
            })
            .sum()
    }

    /// `self` then `next`, as one op.
    pub fn compose(&self, next: &TextOp) -> TextOp {
        let mut out = TextOp::new();
        let mut a = Cursor::new(self);
        let mut b = Cursor::new(next);
        loop {
            if let Some(Component::Insert(_)) = b.peek() {
                out.push_piece(b.take_all());
                continue;
            }
            if let Some(Component::Delete(_)) = a.peek() {
                out.push_piece(a.take_all());
                continue;
            }
            if a.done() {
                // `next` runs over the implicit tail of `self` unchanged.
                out.push_rest(&mut b);
                break;
            }
            if b.done() {
                out.push_rest(&mut a);
                break;
            }
            let n = a.remaining().min(b.remaining());
            match (a.take(n), b.take(n)) {
                (Piece::Retain(n), Piece::Retain(_)) => out.retain(n),
                (Piece::Retain(n), Piece::Delete(_)) => out.delete(n),
                (Piece::Insert(s), Piece::Retain(_)) => out.insert(s),
                (Piece::Insert(_), Piece::Delete(_)) => &mut out,
                (x, y) => unreachable!("compose: {x:?} with {y:?}"),
            };
        }
        out.finish()
    }

    /// `self` rebased to apply after `over` (both made on the same text). See the
    /// module documentation for `side`.
    pub fn transform(&self, over: &TextOp, side: Side) -> TextOp {
        let mut out = TextOp::new();
        let mut a = Cursor::new(self);
        let mut b = Cursor::new(over);
        loop {
            let a_inserts = matches!(a.peek(), Some(Component::Insert(_)));
            let b_inserts = matches!(b.peek(), Some(Component::Insert(_)));
            if a_inserts && (side == Side::Left || !b_inserts) {
                out.push_piece(a.take_all());
                continue;
            }
            if b_inserts {
                let n = b.remaining();
                b.take_all();
                out.retain(n);
                continue;
            }
            if a.done() {
                break;
            }
            if b.done() {
                out.push_rest(&mut a);
                break;
            }
            let n = a.remaining().min(b.remaining());
            match (a.take(n), b.take(n)) {
                (Piece::Retain(n), Piece::Retain(_)) => out.retain(n),
                (Piece::Delete(n), Piece::Retain(_)) => out.delete(n),
                // The region is gone from the text `over` made.
                (Piece::Retain(_) | Piece::Delete(_), Piece::Delete(_)) => &mut out,
                (x, y) => unreachable!("transform: {x:?} over {y:?}"),
            };
        }
        out.finish()
    }

    /// Applies the op to `text` (for tests and tools; the server applies patches to
    /// its rope). `None` if the op reaches past the end.
    pub fn apply(&self, text: &str) -> Option<String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        for component in &self.components {
            match component {
                Component::Retain(n) => {
                    let (head, tail) = split_checked(rest, *n)?;
                    out.push_str(head);
                    rest = tail;
                }
                Component::Delete(n) => rest = split_checked(rest, *n)?.1,
                Component::Insert(s) => out.push_str(s),
            }
        }
        out.push_str(rest);
        Some(out)
    }
}

fn split_checked(s: &str, n: u32) -> Option<(&str, &str)> {
    if n == 0 {
        return Some(("", s));
    }
    s.char_indices()
        .nth(n as usize - 1)
        .map(|(i, c)| s.split_at(i + c.len_utf8()))
}

/// Applies patches one after another to a `String` (for tests and tools).
pub fn apply_patches(text: &str, patches: &[Patch]) -> Option<String> {
    let mut chars: Vec<char> = text.chars().collect();
    for p in patches {
        let (pos, del) = (p.pos as usize, p.del as usize);
        if pos + del > chars.len() {
            return None;
        }
        chars.splice(pos..pos + del, p.ins.chars());
    }
    Some(chars.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use quickcheck::{Arbitrary, Gen, QuickCheck};

    /// Today's `from_patches` before it became a balanced composition: the oracle.
    fn from_patches_by_fold(patches: &[Patch]) -> TextOp {
        let mut iter = patches.iter();
        let Some(first) = iter.next() else {
            return TextOp::new();
        };
        iter.fold(TextOp::from_patch(first), |op, p| {
            op.compose(&TextOp::from_patch(p))
        })
    }

    /// A second oracle, independent of `compose`: the text as a list of code points
    /// that remember where they came from (an index into the base text, or an inserted
    /// one), spliced patch by patch; then read back as components. Quadratic in the
    /// worst case but with a tiny constant (a `memmove` of 4-byte tokens per patch).
    fn from_patches_by_model(base_chars: u32, patches: &[Patch]) -> TextOp {
        const INSERTED: u32 = 1 << 31;
        assert!(base_chars < INSERTED);
        let mut tokens: Vec<u32> = (0..base_chars).collect();
        let mut inserted: Vec<char> = Vec::new();
        for p in patches {
            let start = p.pos as usize;
            let new: Vec<u32> = p
                .ins
                .chars()
                .map(|c| {
                    inserted.push(c);
                    INSERTED | (inserted.len() as u32 - 1)
                })
                .collect();
            tokens.splice(start..start + p.del as usize, new);
        }
        let mut op = TextOp::new();
        let mut base_next = 0;
        for token in tokens {
            if token & INSERTED != 0 {
                let c = inserted[(token & !INSERTED) as usize];
                op.insert(c.encode_utf8(&mut [0; 4]));
            } else {
                op.delete(token - base_next).retain(1);
                base_next = token + 1;
            }
        }
        op.delete(base_chars - base_next);
        op.finish()
    }

    const ALPHABET: [char; 6] = ['a', 'b', '\u{1F600}', '\u{10348}', 'é', ' '];

    /// Patches that each apply to the text the earlier ones left, on a base text of
    /// `base_chars` code points: inserts, deletes (of earlier inserts too), splices,
    /// empty patches, positions anywhere from the start to the end.
    #[derive(Clone, Debug)]
    struct PatchList {
        base_chars: u32,
        patches: Vec<Patch>,
    }

    /// One patch in `deletes_one_in` deletes up to 23 code points (which may span
    /// earlier inserts), one more deletes up to 2; every patch inserts 0 to 3.
    fn random_patches(
        g: &mut Gen,
        base_chars: u32,
        count: usize,
        deletes_one_in: u32,
    ) -> Vec<Patch> {
        let mut len = base_chars;
        (0..count)
            .map(|_| {
                let pos = u32::arbitrary(g) % (len + 1);
                let del = match u32::arbitrary(g) % deletes_one_in {
                    0 => (len - pos).min(u32::arbitrary(g) % 24),
                    1 => (len - pos).min(u32::arbitrary(g) % 3),
                    _ => 0,
                };
                let ins: String = (0..usize::arbitrary(g) % 4)
                    .map(|_| *g.choose(&ALPHABET).unwrap())
                    .collect();
                len = len - del + chars(&ins);
                Patch::new(pos, del, ins)
            })
            .collect()
    }

    impl Arbitrary for PatchList {
        fn arbitrary(g: &mut Gen) -> Self {
            // One list in 16 is long, on a longer text: ops of hundreds of components,
            // deep in the balanced composition.
            let (base_chars, count) = if u8::arbitrary(g) % 16 == 0 {
                (u32::arbitrary(g) % 3000, usize::arbitrary(g) % 1500)
            } else {
                (u32::arbitrary(g) % 40, usize::arbitrary(g) % 40)
            };
            let deletes_one_in = *g.choose(&[2, 4, 16, 64, 256]).unwrap();
            let patches = random_patches(g, base_chars, count, deletes_one_in);
            PatchList {
                base_chars,
                patches,
            }
        }
    }

    #[test]
    fn from_patches_equals_the_fold_of_compose_and_the_code_point_model() {
        fn prop(list: PatchList) -> bool {
            let op = TextOp::from_patches(&list.patches);
            let base: String = (0..list.base_chars)
                .map(|i| ALPHABET[i as usize % ALPHABET.len()])
                .collect();
            op == from_patches_by_fold(&list.patches)
                && op == from_patches_by_model(list.base_chars, &list.patches)
                && op.apply(&base) == apply_patches(&base, &list.patches)
        }
        QuickCheck::new()
            .tests(1000)
            .quickcheck(prop as fn(PatchList) -> bool);
    }

    #[test]
    fn from_patches_of_60000_scattered_patches_equals_the_code_point_model() {
        let base_chars = 23_000;
        let mut g = Gen::new(100);
        let patches = random_patches(&mut g, base_chars, 60_000, 64);
        let op = TextOp::from_patches(&patches);
        // The patches are scattered: the op is far from a few long runs.
        assert!(op.components().len() > 10_000, "{}", op.components().len());
        assert_eq!(op, from_patches_by_model(base_chars, &patches));
    }

    #[test]
    fn from_patches_matches_the_fold_on_the_edge_cases() {
        let cases: Vec<Vec<Patch>> = vec![
            vec![],
            vec![Patch::new(3, 0, "")],
            vec![Patch::new(0, 0, ""), Patch::new(2, 0, "")],
            // A delete spanning earlier inserts and base text.
            vec![
                Patch::new(1, 0, "XY"),
                Patch::new(4, 0, "\u{1F600}"),
                Patch::new(0, 6, ""),
            ],
            // An insert inside a range deleted earlier, then deleted itself.
            vec![
                Patch::new(2, 3, ""),
                Patch::new(2, 0, "\u{10348}"),
                Patch::new(1, 2, "z"),
            ],
            // Same position, many times: inserts end up in reverse order.
            vec![
                Patch::new(5, 0, "a"),
                Patch::new(5, 0, "b"),
                Patch::new(5, 1, "c"),
            ],
            // Positions past any text the op has seen (the implicit trailing retain).
            vec![Patch::new(10, 2, "x"), Patch::new(4, 0, "y")],
        ];
        for patches in cases {
            assert_eq!(
                TextOp::from_patches(&patches),
                from_patches_by_fold(&patches),
                "{patches:?}"
            );
        }
    }

    #[test]
    fn patches_round_trip_through_components() {
        let patches = vec![Patch::new(2, 1, "\u{1F600}x"), Patch::new(0, 0, "a")];
        let op = TextOp::from_patches(&patches);
        let text = "hello";
        assert_eq!(op.apply(text), apply_patches(text, &patches));
        assert_eq!(apply_patches(text, &op.to_patches()), op.apply(text));
    }

    #[test]
    fn concurrent_inserts_at_one_position_put_the_later_sequenced_on_the_left() {
        let first = TextOp::from_patch(&Patch::new(1, 0, "F"));
        let late = TextOp::from_patch(&Patch::new(1, 0, "L"));
        let late_rebased = late.transform(&first, Side::Left);
        let after = first.apply("ab").and_then(|t| late_rebased.apply(&t));
        assert_eq!(after.as_deref(), Some("aLFb"));
        let first_rebased = first.transform(&late, Side::Right);
        let other = late.apply("ab").and_then(|t| first_rebased.apply(&t));
        assert_eq!(other, after);
    }

    #[test]
    fn compose_takes_a_long_astral_insert_apart_piece_by_piece() {
        let long: String = "a\u{1F600}\u{10348}é".repeat(500);
        let first = TextOp::from_patch(&Patch::new(1, 0, long));
        let mut next = TextOp::new();
        // 500 pieces of 2 to 4 code points: within the 2,002 the first op leaves.
        for i in 0..500 {
            next.retain(1 + i % 3)
                .delete(1)
                .insert(if i % 2 == 0 { "\u{1F600}" } else { "" });
        }
        let text = "xy";
        let in_turn = first.apply(text).and_then(|t| next.apply(&t));
        assert!(in_turn.is_some());
        assert_eq!(first.compose(&next).apply(text), in_turn);
    }

    #[test]
    fn compose_equals_applying_in_turn() {
        let a = TextOp::from_patches(&[Patch::new(1, 2, "XY")]);
        let b = TextOp::from_patches(&[Patch::new(0, 3, "\u{10348}")]);
        let text = "abcdef";
        assert_eq!(
            a.compose(&b).apply(text),
            a.apply(text).and_then(|t| b.apply(&t))
        );
    }

    #[test]
    fn positions_map_through_an_op() {
        // "abcdef" -> delete "bc", insert "XY" at 4 (before "e"): "adXYef".
        let op = TextOp::from_patches(&[Patch::new(1, 2, ""), Patch::new(2, 0, "XY")]);
        let mapped: Vec<u32> = (0..=6).map(|p| op.map_position(p)).collect();
        assert_eq!(mapped, vec![0, 1, 1, 1, 2, 5, 6]);
        assert_eq!(op.apply("abcdef").unwrap(), "adXYef");
    }
}
