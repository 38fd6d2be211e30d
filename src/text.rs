//! A document's text, indexed by Unicode code point.
//!
//! Backed by `jumprope`, chosen by measurement: replaying the 259,778 patches of the
//! automerge-paper trace took 9.1-11.2 ms with jumprope 1.1.2 against 31.0-31.8 ms with
//! ropey 1.6 (35 vs 120 ns per patch, three rounds each, release build, this machine,
//! 2026-11-25; the scratch program replayed the trace with both and compared the text).
//!
//! A small text is one `String` instead: a rope node takes about 750 bytes for 392 of
//! text and the rope's first node lives inline, so a document of 1,000 ASCII characters
//! took 3.4 KB as a rope against 1 KB as a string, and the sequencer keeps every
//! document's text. Past [`SMALL_TEXT_BYTES`] the text becomes a rope for good, so an
//! edit of a small text scans at most that many bytes.

use jumprope::JumpRope;

use crate::op::{AsPatch, MAX_DOC_BYTES, MAX_DOC_CHARS};

/// Why a patch does not apply to a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// `pos` beyond the end, or `pos + del` beyond the end.
    OutOfRange {
        patch: usize,
        pos: u32,
        del: u32,
        len: u32,
    },
    /// The result would exceed [`MAX_DOC_CHARS`].
    TooLong { len: u64 },
    /// The result would exceed [`MAX_DOC_BYTES`].
    TooManyBytes { bytes: u64 },
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::OutOfRange { patch, pos, del, len } => write!(
                f,
                "patch {patch}: position {pos} with delete length {del} is out of range for a document of {len} code points"
            ),
            ApplyError::TooLong { len } => write!(
                f,
                "the document would be {len} code points long; the limit is {MAX_DOC_CHARS}"
            ),
            ApplyError::TooManyBytes { bytes } => write!(
                f,
                "the document would be {bytes} bytes long; the limit is {MAX_DOC_BYTES}"
            ),
        }
    }
}

/// Texts up to this many bytes of UTF-8 are kept as one `String`.
pub const SMALL_TEXT_BYTES: usize = 4096;

#[derive(Clone)]
enum Repr {
    /// At most [`SMALL_TEXT_BYTES`], and its length in code points.
    Small {
        text: String,
        chars: u32,
    },
    Rope(Box<JumpRope>),
}

#[derive(Clone)]
pub struct Text {
    repr: Repr,
}

impl Default for Text {
    fn default() -> Self {
        Text::new()
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Text({} chars)", self.len_chars())
    }
}

/// The byte offset of code point `pos` in `text` (`pos` at most its length); `ascii`:
/// a byte per code point.
fn byte_offset(text: &str, ascii: bool, pos: usize) -> usize {
    if ascii {
        return pos;
    }
    text.char_indices().nth(pos).map_or(text.len(), |(i, _)| i)
}

impl Text {
    pub fn new() -> Self {
        Text {
            repr: Repr::Small {
                text: String::new(),
                chars: 0,
            },
        }
    }

    pub fn len_chars(&self) -> u32 {
        match &self.repr {
            Repr::Small { chars, .. } => *chars,
            Repr::Rope(rope) => rope.len_chars() as u32,
        }
    }

    /// The text's length in bytes (UTF-8).
    pub fn len_bytes(&self) -> u64 {
        match &self.repr {
            Repr::Small { text, .. } => text.len() as u64,
            Repr::Rope(rope) => rope.len_bytes() as u64,
        }
    }

    /// Whether the text is held as a rope (it was longer than [`SMALL_TEXT_BYTES`]).
    pub fn is_rope(&self) -> bool {
        matches!(self.repr, Repr::Rope(_))
    }

    /// Checks that every patch applies, in order, without changing the text.
    pub fn check<P: AsPatch>(&self, patches: &[P]) -> Result<(), ApplyError> {
        let mut len = u64::from(self.len_chars());
        for (i, p) in patches.iter().enumerate() {
            let p = p.as_patch();
            if u64::from(p.pos) + u64::from(p.del) > len {
                return Err(ApplyError::OutOfRange {
                    patch: i,
                    pos: p.pos,
                    del: p.del,
                    len: len as u32,
                });
            }
            let kept = len - u64::from(p.del);
            // A text has no more code points than bytes: the last patch's inserted code
            // points need counting (a pass over the text) only near the limit, since no
            // later patch's range depends on them. The rope counts them anyway.
            if i + 1 == patches.len() && kept + p.ins.len() as u64 <= u64::from(MAX_DOC_CHARS) {
                break;
            }
            len = kept + p.ins.chars().count() as u64;
            if len > u64::from(MAX_DOC_CHARS) {
                return Err(ApplyError::TooLong { len });
            }
        }
        // Bytes: deletes only shrink the text, so the inserted bytes bound the growth;
        // only near the limit is the exact figure worth computing (on a copy).
        let inserted: u64 = patches.iter().map(|p| p.as_patch().ins.len() as u64).sum();
        if self.len_bytes() + inserted > MAX_DOC_BYTES {
            let mut copy = self.clone();
            copy.splice(patches);
            if copy.len_bytes() > MAX_DOC_BYTES {
                return Err(ApplyError::TooManyBytes {
                    bytes: copy.len_bytes(),
                });
            }
        }
        Ok(())
    }

    /// Applies the patches in order, or none of them.
    /// Owned patches or patches borrowed from a log record (`PatchRef`) alike.
    pub fn apply<P: AsPatch>(&mut self, patches: &[P]) -> Result<(), ApplyError> {
        self.check(patches)?;
        self.splice(patches);
        Ok(())
    }

    /// Applies checked patches.
    fn splice<P: AsPatch>(&mut self, patches: &[P]) {
        for p in patches {
            let p = p.as_patch();
            let pos = p.pos as usize;
            match &mut self.repr {
                Repr::Small { text, chars } => {
                    let ascii = text.len() == *chars as usize;
                    let start = byte_offset(text, ascii, pos);
                    if p.del > 0 {
                        let end = start + byte_offset(&text[start..], ascii, p.del as usize);
                        text.replace_range(start..end, "");
                        *chars -= p.del;
                    }
                    if !p.ins.is_empty() {
                        text.insert_str(start, p.ins);
                        *chars += p.ins.chars().count() as u32;
                    }
                    if text.len() > SMALL_TEXT_BYTES {
                        self.repr = Repr::Rope(Box::new(JumpRope::from(text.as_str())));
                    }
                }
                Repr::Rope(rope) => {
                    if p.del > 0 {
                        rope.remove(pos..pos + p.del as usize);
                    }
                    if !p.ins.is_empty() {
                        rope.insert(pos, p.ins);
                    }
                }
            }
        }
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        let repr = if s.len() <= SMALL_TEXT_BYTES {
            Repr::Small {
                text: s.to_owned(),
                chars: s.chars().count() as u32,
            }
        } else {
            Repr::Rope(Box::new(JumpRope::from(s)))
        };
        Text { repr }
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.repr {
            Repr::Small { text, .. } => f.write_str(text),
            Repr::Rope(rope) => {
                for chunk in rope.substrings() {
                    f.write_str(chunk)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Patch;

    /// The text after `patches`, by a plain `Vec<char>`.
    fn model(text: &str, patches: &[Patch]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for p in patches {
            let pos = p.pos as usize;
            chars.splice(pos..pos + p.del as usize, p.ins.chars());
        }
        chars.into_iter().collect()
    }

    #[test]
    fn a_small_text_edits_like_a_rope_and_becomes_one_past_the_bound_mid_op() {
        // Non-ASCII (two- and four-byte code points) so positions are not bytes.
        let start = "é\u{1F600}abc";
        let mut t = Text::from(start);
        assert!(!t.is_rope());
        let piece = "xé\u{10348}".repeat(100); // 700 bytes, 300 code points
        let mut patches = Vec::new();
        for i in 0..8u32 {
            patches.push(Patch::new(i * 7 % 5, 1, piece.as_str()));
            patches.push(Patch::new(2 + i, 3, "yz"));
        }
        t.apply(&patches).unwrap();
        let expected = model(start, &patches);
        assert!(expected.len() > SMALL_TEXT_BYTES);
        assert!(
            t.is_rope(),
            "past {SMALL_TEXT_BYTES} bytes the text is a rope"
        );
        assert_eq!(t.to_string(), expected);
        assert_eq!(t.len_chars() as usize, expected.chars().count());
        assert_eq!(t.len_bytes() as usize, expected.len());
        // Further edits of the rope agree with the model too.
        let more = [Patch::new(1, 4, "\u{1F600}"), Patch::new(0, 0, "q")];
        t.apply(&more).unwrap();
        assert_eq!(t.to_string(), model(&expected, &more));
    }

    #[test]
    fn a_text_at_the_bound_stays_small() {
        let mut t = Text::from("a".repeat(SMALL_TEXT_BYTES - 1).as_str());
        t.apply(&[Patch::new(0, 0, "b")]).unwrap();
        assert!(!t.is_rope());
        assert_eq!(t.len_bytes() as usize, SMALL_TEXT_BYTES);
        t.apply(&[Patch::new(SMALL_TEXT_BYTES as u32, 0, "c")])
            .unwrap();
        assert!(t.is_rope());
        assert!(t.to_string().starts_with('b') && t.to_string().ends_with('c'));
    }

    #[test]
    fn positions_count_code_points_including_astral_ones() {
        let mut t = Text::from("a\u{1F600}b");
        t.apply(&[Patch::new(2, 1, "\u{10348}x")]).unwrap();
        assert_eq!(t.to_string(), "a\u{1F600}\u{10348}x");
        assert_eq!(t.len_chars(), 4);
    }

    #[test]
    fn out_of_range_patch_changes_nothing() {
        let mut t = Text::from("abc");
        let err = t
            .apply(&[Patch::new(0, 1, ""), Patch::new(2, 2, "")])
            .unwrap_err();
        assert!(matches!(err, ApplyError::OutOfRange { patch: 1, .. }));
        assert_eq!(t.to_string(), "abc");
    }

    #[test]
    fn a_document_of_exactly_the_byte_limit_is_accepted_and_one_byte_more_is_not() {
        let limit = crate::op::MAX_DOC_BYTES as usize;
        let mut t = Text::from("a".repeat(limit - 10).as_str());
        let fill = [Patch::new(0, 0, "b".repeat(10))];
        t.check(&fill).unwrap();
        let over = [Patch::new(0, 0, "b".repeat(11))];
        assert!(matches!(
            t.check(&over),
            Err(ApplyError::TooManyBytes { bytes }) if bytes == limit as u64 + 1
        ));
        // A replace that stays within the limit near it is fine (deletes count).
        let replace = [Patch::new(0, 5, "c".repeat(15))];
        t.check(&replace).unwrap();
        t.apply(&fill).unwrap();
        assert_eq!(t.len_bytes(), limit as u64);
        assert!(t.check(&[Patch::new(0, 0, "é")]).is_err());
    }
}
