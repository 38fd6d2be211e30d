//! One document on the client, as an OT state machine with no I/O (the Jupiter /
//! ShareDB client model): local edits apply at once; one op is in flight to
//! the server (or, [`ClientDoc::pipelined`], several sent without waiting); edits made meanwhile are composed into one buffered op; a remote op is
//! rebased over the in-flight and buffered ops before it is applied locally, and they
//! over it. The server sequences the in-flight op after every remote op the client
//! received before its ack, so both sides transform the same pairs with the same
//! tie-break (see `ot`: the later-sequenced op's insert goes left).

use std::collections::VecDeque;

use crate::op::Patch;
use crate::ot::{Side, TextOp};
use crate::protocol::{max_op_bytes, patches_wire_len, DEFAULT_MAX_FRAME};
use crate::text::Text;

/// An op to send: its local sequence number (with the client id, its op id), the
/// server version it was made against, and its patches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub local_seq: u64,
    pub base_version: u64,
    pub patches: Vec<Patch>,
}

#[derive(Clone, Debug)]
pub struct ClientDoc {
    /// A rope: local edits and remote ops cost O(log n), not a copy of the document.
    text: Text,
    /// The server's text at `version` (the local text without the pending edits): the
    /// base a reload derives the pending edits from, and what a persisted client keeps.
    confirmed: Text,
    /// The last server seq this client has applied.
    version: u64,
    /// Sent, not yet acknowledged, oldest first (at most `max_in_flight`).
    in_flight: VecDeque<(Outgoing, TextOp)>,
    max_in_flight: usize,
    /// Local edits not yet sent: one composed op, or (without composing) one op per edit.
    buffer: VecDeque<TextOp>,
    next_local_seq: u64,
    compose: bool,
    /// The largest op the server takes (its `max_frame` less the frame's overhead).
    max_op_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocError {
    /// A local edit does not apply to the local text.
    OutOfRange,
    /// A local edit larger than the server takes in one op: split it.
    TooLarge { bytes: usize, max: usize },
    /// An ack for something not in flight, or a remote op out of order.
    Protocol(String),
}

impl ClientDoc {
    /// A document as the server sent it: `text` at `version`. `next_local_seq` continues
    /// the client's op numbering (it must never reuse an op id).
    pub fn new(text: String, version: u64, next_local_seq: u64) -> Self {
        ClientDoc {
            text: Text::from(text.as_str()),
            confirmed: Text::from(text.as_str()),
            version,
            in_flight: VecDeque::new(),
            max_in_flight: 1,
            buffer: VecDeque::new(),
            next_local_seq: next_local_seq.max(1),
            compose: true,
            max_op_bytes: max_op_bytes(DEFAULT_MAX_FRAME),
        }
    }

    /// Ops are kept below `max_op_bytes` bytes of patches (what the server's `Welcome`
    /// allows: [`crate::protocol::max_op_bytes`] of its `max_frame`).
    pub fn with_max_op_bytes(mut self, max: usize) -> Self {
        self.max_op_bytes = max;
        self
    }

    /// As [`ClientDoc::with_max_op_bytes`], on a connection whose server allows `max`:
    /// buffered ops composed under a larger limit (before any `Welcome`, or from
    /// another server) are split to fit, as a composition would have kept them (half
    /// the limit). Ops in flight stay as they were sent: an op id names one op.
    pub fn set_max_op_bytes(&mut self, max: usize) {
        let shrunk = max < self.max_op_bytes;
        self.max_op_bytes = max;
        if !shrunk
            || self
                .buffer
                .iter()
                .all(|op| patches_wire_len(&op.to_patches()) <= max / 2)
        {
            return;
        }
        let buffered: Vec<TextOp> = self.buffer.drain(..).collect();
        for op in buffered {
            if patches_wire_len(&op.to_patches()) <= max / 2 {
                self.buffer.push_back(op);
                continue;
            }
            // Each patch applies to the result of the one before, as each piece does.
            for patch in op.to_patches() {
                for piece in split_patch(patch, max / 4) {
                    self.buffer.push_back(TextOp::from_patch(&piece));
                }
            }
        }
    }

    /// Keeps every local edit as its own op instead of composing the edits made while
    /// an op is in flight (a trace replay needs each edit to reach the server alone).
    pub fn without_composing(mut self) -> Self {
        self.compose = false;
        self
    }

    /// Sends up to `n` ops without waiting for acks (see "Pipelining" in protocol.md:
    /// exact while nobody else edits the document meanwhile; a conflict is refused by
    /// the server with code 25 and the document must be reloaded).
    pub fn pipelined(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// The local text (materialized: O(n)).
    pub fn text(&self) -> String {
        self.text.to_string()
    }

    pub fn len_chars(&self) -> u32 {
        self.text.len_chars()
    }

    /// The local sequence number the next op will get (persist it to keep op ids unique
    /// across restarts of the client).
    pub fn next_local_seq(&self) -> u64 {
        self.next_local_seq
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Local seqs below `floor` are taken (by ops this client sent to this document
    /// before): the next op gets `floor` at least.
    pub fn skip_local_seqs_below(&mut self, floor: u64) {
        self.next_local_seq = self.next_local_seq.max(floor);
    }

    /// The oldest op in flight (the next to be acknowledged).
    pub fn in_flight(&self) -> Option<&Outgoing> {
        self.in_flight.front().map(|(o, _)| o)
    }

    /// Every op in flight, oldest first.
    pub fn all_in_flight(&self) -> impl Iterator<Item = &Outgoing> {
        self.in_flight.iter().map(|(o, _)| o)
    }

    /// The local seq the last buffered edit will be sent under (the op it was
    /// composed into), or the last one sent if nothing is buffered.
    pub fn last_buffered_local_seq(&self) -> u64 {
        (self.next_local_seq + self.buffer.len() as u64).saturating_sub(1)
    }

    pub fn has_pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.buffer.is_empty()
    }

    /// Applies a local edit at once and queues it for the server.
    ///
    /// Edits made while an op is in flight are composed into one, up to half the op
    /// limit (a composed op that outgrew it could never be sent, and transforming it
    /// over remote ops may add patches); past that a new op starts.
    pub fn local_edit(&mut self, patches: &[Patch]) -> Result<(), DocError> {
        let bytes = patches_wire_len(patches);
        if bytes > self.max_op_bytes {
            return Err(DocError::TooLarge {
                bytes,
                max: self.max_op_bytes,
            });
        }
        self.text.apply(patches).map_err(|_| DocError::OutOfRange)?;
        let op = TextOp::from_patches(patches);
        self.enqueue(op);
        Ok(())
    }

    /// Queues `op` (already applied to the local text) behind the buffered edits,
    /// composed into the last one while that stays under half the op limit.
    fn enqueue(&mut self, op: TextOp) {
        if op.is_noop() {
            return;
        }
        match self.buffer.back_mut() {
            Some(buffered) if self.compose => {
                let composed = buffered.compose(&op);
                if patches_wire_len(&composed.to_patches()) <= self.max_op_bytes / 2 {
                    *buffered = composed;
                } else {
                    self.buffer.push_back(op);
                }
            }
            _ => self.buffer.push_back(op),
        }
    }

    /// The server's text at [`ClientDoc::version`]: the local text without this
    /// client's pending edits.
    pub fn confirmed_text(&self) -> String {
        self.confirmed.to_string()
    }

    /// Whether op `local_seq` is in flight.
    pub fn is_in_flight(&self, local_seq: u64) -> bool {
        self.in_flight.iter().any(|(o, _)| o.local_seq == local_seq)
    }

    /// The ops in flight (as sent, and as they are now: rebased over the remote ops
    /// since), then the buffered ones, each applying to the result of the one before,
    /// from [`ClientDoc::confirmed_text`].
    pub fn pending(&self) -> (Vec<(Outgoing, TextOp)>, Vec<TextOp>) {
        (
            self.in_flight.iter().cloned().collect(),
            self.buffer.iter().cloned().collect(),
        )
    }

    /// A document as [`ClientDoc::pending`] and [`ClientDoc::confirmed_text`] left it
    /// (a client restarting from what it persisted).
    pub fn restore(
        confirmed: String,
        version: u64,
        next_local_seq: u64,
        in_flight: Vec<(Outgoing, TextOp)>,
        buffer: Vec<TextOp>,
    ) -> Result<Self, DocError> {
        let mut doc = ClientDoc::new(confirmed, version, next_local_seq);
        for op in in_flight.iter().map(|(_, op)| op).chain(buffer.iter()) {
            doc.text
                .apply(&op.to_patches())
                .map_err(|_| DocError::OutOfRange)?;
        }
        if let Some((last, _)) = in_flight.last() {
            if last.local_seq >= doc.next_local_seq {
                return Err(DocError::Protocol(format!(
                    "op {} in flight at or after the next local seq {}",
                    last.local_seq, doc.next_local_seq
                )));
            }
        }
        doc.max_in_flight = doc.max_in_flight.max(in_flight.len());
        doc.in_flight = in_flight.into();
        doc.buffer = buffer.into();
        Ok(doc)
    }

    /// The server refused op `local_seq`: it, and every op sent after it (the server
    /// refuses those too until the document is opened again), were not applied. They
    /// go back to the front of the buffer, still applied locally, to be sent again as
    /// new ops (new op ids, the current version as base) once the document is open
    /// again. False if the op was not in flight (its refusal was handled already).
    ///
    /// `too_large`: it was refused for its size after the server transformed it (code
    /// 24: transforming can add patches): it goes back as one op per patch, each cut to
    /// a quarter of the op limit, so that sending it again cannot be refused again the
    /// same way (and loop).
    pub fn on_reject(&mut self, local_seq: u64, too_large: bool) -> bool {
        let Some(i) = self
            .in_flight
            .iter()
            .position(|(o, _)| o.local_seq == local_seq)
        else {
            return false;
        };
        let back: Vec<TextOp> = self.in_flight.drain(i..).map(|(_, op)| op).collect();
        let back: Vec<TextOp> = if too_large {
            back.iter()
                .flat_map(|op| op.to_patches())
                .flat_map(|patch| split_patch(patch, self.max_op_bytes / 4))
                .map(|piece| TextOp::from_patch(&piece))
                .collect()
        } else {
            back
        };
        for op in back.into_iter().rev() {
            self.buffer.push_front(op);
        }
        true
    }

    /// Of the ops in flight, the first `applied` reached the server and the others did
    /// not (a reload learned it): the applied ones become part of the confirmed text,
    /// the others return to the buffer. The version is then unknown (0): open the
    /// document from its snapshot, and [`ClientDoc::reload`] onto it.
    pub fn settle_applied(&mut self, applied: usize) {
        for (_, op) in self.in_flight.iter().take(applied) {
            self.confirmed
                .apply(&op.to_patches())
                .expect("an op in flight applies after the ones before it");
        }
        let back: Vec<TextOp> = self
            .in_flight
            .drain(..)
            .skip(applied)
            .map(|(_, op)| op)
            .collect();
        for op in back.into_iter().rev() {
            self.buffer.push_front(op);
        }
        self.version = 0;
    }

    /// The largest op this document sends, in wire bytes of patches.
    pub fn max_op_bytes(&self) -> usize {
        self.max_op_bytes
    }

    /// Replaces this document's base with the server's text `server` at
    /// `server_version` (a reload: the server no longer holds the ops this client
    /// missed). Of the ops in flight, the first `applied` reached the server (their
    /// effect is in `server`); the others did not. No local edit is lost: this client's
    /// ops the server has not applied, composed, are rebased over what others changed
    /// meanwhile (their ops are gone: the difference, by a diff, between the text the
    /// server saw from this client, the confirmed text with the applied ops, and
    /// `server`) and queued as new ops. Returns the patches that turn the old local
    /// text into the new one.
    pub fn reload(&mut self, server: String, server_version: u64, applied: usize) -> Vec<Patch> {
        let mut seen = self.confirmed.clone();
        for (_, op) in self.in_flight.iter().take(applied) {
            seen.apply(&op.to_patches())
                .expect("an op in flight applies after the ones before it");
        }
        let seen = seen.to_string();
        let local = self.text.to_string();
        // This client's change is known exactly (its ops not applied, composed); only
        // the others' is recomputed, their ops being gone from the server.
        let mine = self
            .in_flight
            .iter()
            .skip(applied)
            .map(|(_, op)| op)
            .chain(self.buffer.iter())
            .fold(TextOp::new(), |acc, op| acc.compose(op));
        let theirs = diff(&seen, &server);
        let rebased = mine.transform(&theirs, Side::Left);
        let new_local = rebased
            .apply(&server)
            .expect("an op rebased over the server's change applies to its result");
        let shown = diff(&local, &new_local).to_patches();
        self.confirmed = Text::from(server.as_str());
        self.text = Text::from(new_local.as_str());
        self.version = server_version;
        self.in_flight.clear();
        self.buffer.clear();
        for patch in rebased.to_patches() {
            for piece in split_patch(patch, self.max_op_bytes / 2) {
                self.enqueue(TextOp::from_patch(&piece));
            }
        }
        shown
    }

    /// The next op to send, if fewer than the allowed number are in flight.
    pub fn take_to_send(&mut self) -> Option<Outgoing> {
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let op = self.buffer.pop_front()?;
        let outgoing = Outgoing {
            local_seq: self.next_local_seq,
            base_version: self.version,
            patches: op.to_patches(),
        };
        self.next_local_seq += 1;
        self.in_flight.push_back((outgoing.clone(), op));
        Some(outgoing)
    }

    /// The server acknowledged the oldest in-flight op, `local_seq`, as `seq`.
    pub fn on_ack(&mut self, local_seq: u64, seq: u64) -> Result<(), DocError> {
        match self.in_flight.front() {
            Some((out, _)) if out.local_seq == local_seq => {}
            _ => {
                return Err(DocError::Protocol(format!(
                    "ack for op {local_seq}, which is not in flight"
                )))
            }
        }
        if seq != self.version + 1 {
            return Err(DocError::Protocol(format!(
                "ack at seq {seq} but the client is at version {}",
                self.version
            )));
        }
        let (_, op) = self.in_flight.pop_front().expect("checked above");
        // The op as it is now was rebased over every remote op before `seq`: the
        // server's change at `seq`.
        self.confirmed
            .apply(&op.to_patches())
            .map_err(|e| DocError::Protocol(format!("acked op {local_seq} does not apply: {e}")))?;
        self.version = seq;
        Ok(())
    }

    /// A remote op sequenced as `seq`. Returns the patches applied to the local text.
    pub fn on_remote(&mut self, seq: u64, patches: &[Patch]) -> Result<Vec<Patch>, DocError> {
        if seq <= self.version {
            // Already in the snapshot this client opened with (a broadcast can overlap it).
            return Ok(Vec::new());
        }
        if seq != self.version + 1 {
            return Err(DocError::Protocol(format!(
                "remote op at seq {seq} but the client is at version {}",
                self.version
            )));
        }
        self.confirmed.apply(patches).map_err(|e| {
            DocError::Protocol(format!("remote op at seq {seq} does not apply: {e}"))
        })?;
        let mut remote = TextOp::from_patches(patches);
        let pending = self
            .in_flight
            .iter_mut()
            .map(|(_, op)| op)
            .chain(self.buffer.iter_mut());
        for buffered in pending {
            let rebased = remote.transform(buffered, Side::Right);
            *buffered = buffered.transform(&remote, Side::Left);
            remote = rebased;
        }
        let patches = remote.to_patches();
        self.text.apply(&patches).map_err(|e| {
            DocError::Protocol(format!("remote op at seq {seq} does not apply: {e}"))
        })?;
        self.version = seq;
        Ok(patches)
    }
}

/// How long [`diff`] looks for the shortest edit before it settles for a longer one
/// (Myers' algorithm is quadratic on texts that share little: two unrelated texts of
/// 100,000 characters take about a minute).
const DIFF_BUDGET: std::time::Duration = std::time::Duration::from_millis(200);

/// The op that turns `from` into `to`, in code points.
///
/// Which characters it matches matters, not only how many: a reload rebases the
/// client's own edits over this op, so a character of `from` matched to an equal one
/// elsewhere in `to` takes those edits there. So before a Myers diff (by the `similar`
/// crate, within 200 ms): the common prefix and suffix are kept; `from` found
/// whole in `to` is kept whole (others only added around it), and `to` in `from`; and
/// lines are diffed first, then the characters of changed lines only, so that a
/// character is matched within the lines it belongs to.
pub fn diff(from: &str, to: &str) -> TextOp {
    let mut out = Chunks::default();
    let deadline = std::time::Instant::now() + DIFF_BUDGET;
    align(from, to, &mut out, deadline, true);
    out.cleanup_semantic();
    let mut op = TextOp::new();
    for (kind, text) in &out.0 {
        match kind {
            Chunk::Equal => op.retain(chars(text)),
            Chunk::Delete => op.delete(chars(text)),
            Chunk::Insert => op.insert(text),
        };
    }
    // A trailing retain is implicit: the same op as one built from patches.
    TextOp::from_patches(&op.to_patches())
}

fn chars(s: &str) -> u32 {
    s.chars().count() as u32
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    Equal,
    Delete,
    Insert,
}

/// A diff as it is built: runs of kept, deleted and inserted text.
#[derive(Default, Debug)]
struct Chunks(Vec<(Chunk, String)>);

impl Chunks {
    fn push(&mut self, kind: Chunk, text: &str) -> &mut Self {
        if text.is_empty() {
            return self;
        }
        match self.0.last_mut() {
            Some((k, t)) if *k == kind => t.push_str(text),
            _ => self.0.push((kind, text.to_owned())),
        }
        self
    }
    fn equal(&mut self, text: &str) -> &mut Self {
        self.push(Chunk::Equal, text)
    }
    fn delete(&mut self, text: &str) -> &mut Self {
        self.push(Chunk::Delete, text)
    }
    fn insert(&mut self, text: &str) -> &mut Self {
        self.push(Chunk::Insert, text)
    }

    /// Drops the matches that are likely coincidences: a kept run no longer than the
    /// change on each side of it (as diff-match-patch's semantic cleanup) becomes a
    /// delete and an insert. A shortest diff keeps a lone "e" between two rewritten
    /// sentences, and an edit of the client's rebased over it would land inside the
    /// new text; after the cleanup it lands beside it.
    fn cleanup_semantic(&mut self) {
        // Where to look from: runs before it were looked at and stay; an elimination
        // only changes what its neighbours see, so the look resumes at the kept run
        // before it (each pass is linear, and each backs up one run).
        let mut from = 0;
        loop {
            // Changed characters since the previous kept run, per kind.
            let mut changed_before = (0usize, 0usize);
            let mut found = None;
            for (i, (kind, text)) in self.0.iter().enumerate().skip(from) {
                match kind {
                    Chunk::Delete => changed_before.0 += text.chars().count(),
                    Chunk::Insert => changed_before.1 += text.chars().count(),
                    Chunk::Equal => {
                        let len = text.chars().count();
                        let mut after = (0usize, 0usize);
                        for (k, t) in &self.0[i + 1..] {
                            match k {
                                Chunk::Delete => after.0 += t.chars().count(),
                                Chunk::Insert => after.1 += t.chars().count(),
                                Chunk::Equal => break,
                            }
                        }
                        let before = changed_before.0.max(changed_before.1);
                        if before > 0 && len <= before && len <= after.0.max(after.1) {
                            found = Some(i);
                            break;
                        }
                        changed_before = (0, 0);
                    }
                }
            }
            let Some(i) = found else { return };
            // The kept run becomes deleted and inserted; the runs around it merge.
            let (_, text) = self.0.remove(i);
            let mut deleted = String::new();
            let mut inserted = String::new();
            let start = self.0[..i]
                .iter()
                .rposition(|(k, _)| *k == Chunk::Equal)
                .map_or(0, |p| p + 1);
            let end = self.0[i..]
                .iter()
                .position(|(k, _)| *k == Chunk::Equal)
                .map_or(self.0.len(), |p| i + p);
            for (j, (k, t)) in self.0[start..end].iter().enumerate() {
                if start + j == i {
                    deleted.push_str(&text);
                    inserted.push_str(&text);
                }
                match k {
                    Chunk::Delete => deleted.push_str(t),
                    Chunk::Insert => inserted.push_str(t),
                    Chunk::Equal => unreachable!("no kept run between start and end"),
                }
            }
            if end == i {
                deleted.push_str(&text);
                inserted.push_str(&text);
            }
            self.0.splice(
                start..end,
                [(Chunk::Delete, deleted), (Chunk::Insert, inserted)]
                    .into_iter()
                    .filter(|(_, t)| !t.is_empty()),
            );
            // Back to the kept run before the merged change (its left side changed).
            from = self.0[..start]
                .iter()
                .rposition(|(k, _)| *k == Chunk::Equal)
                .map_or(0, |p| {
                    self.0[..p]
                        .iter()
                        .rposition(|(k, _)| *k == Chunk::Equal)
                        .map_or(0, |q| q + 1)
                });
        }
    }
}

fn align(a: &str, b: &str, out: &mut Chunks, deadline: std::time::Instant, by_lines: bool) {
    // Byte lengths of the common prefix and suffix, on code point boundaries.
    let prefix: usize = a
        .chars()
        .zip(b.chars())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum();
    out.equal(&a[..prefix]);
    let (a, b) = (&a[prefix..], &b[prefix..]);
    let suffix: usize = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum();
    let (mid_a, mid_b) = (&a[..a.len() - suffix], &b[..b.len() - suffix]);
    middle(mid_a, mid_b, out, deadline, by_lines);
    out.equal(&a[a.len() - suffix..]);
}

fn middle(a: &str, b: &str, out: &mut Chunks, deadline: std::time::Instant, by_lines: bool) {
    if a.is_empty() {
        out.insert(b);
        return;
    }
    if b.is_empty() {
        out.delete(a);
        return;
    }
    if let Some(at) = b.find(a) {
        out.insert(&b[..at]).equal(a).insert(&b[at + a.len()..]);
        return;
    }
    if let Some(at) = a.find(b) {
        out.delete(&a[..at]).equal(b).delete(&a[at + b.len()..]);
        return;
    }
    if by_lines {
        let la: Vec<&str> = a.split_inclusive('\n').collect();
        let lb: Vec<&str> = b.split_inclusive('\n').collect();
        if la.len() > 1 || lb.len() > 1 {
            // A changed block of lines: its characters are diffed (not by lines again).
            myers(
                &la,
                &lb,
                |lines| lines.concat(),
                out,
                deadline,
                |x, y, out| align(x, y, out, deadline, false),
            );
            return;
        }
    }
    let ca: Vec<char> = a.chars().collect();
    let cb: Vec<char> = b.chars().collect();
    myers(
        &ca,
        &cb,
        |cs| cs.iter().collect(),
        out,
        deadline,
        |x, y, out| {
            out.delete(x).insert(y);
        },
    );
}

/// Myers' diff of `a` and `b` (lines or characters) into `out`, each run turned into
/// text by `text`; a replaced run goes to `replace`.
fn myers<T: std::hash::Hash + Eq + Ord>(
    a: &[T],
    b: &[T],
    text: impl Fn(&[T]) -> String,
    out: &mut Chunks,
    deadline: std::time::Instant,
    mut replace: impl FnMut(&str, &str, &mut Chunks),
) {
    use similar::{Algorithm, DiffOp};
    for d in similar::capture_diff_slices_deadline(Algorithm::Myers, a, b, Some(deadline)) {
        match d {
            DiffOp::Equal { old_index, len, .. } => {
                out.equal(&text(&a[old_index..old_index + len]));
            }
            DiffOp::Delete {
                old_index, old_len, ..
            } => {
                out.delete(&text(&a[old_index..old_index + old_len]));
            }
            DiffOp::Insert {
                new_index, new_len, ..
            } => {
                out.insert(&text(&b[new_index..new_index + new_len]));
            }
            DiffOp::Replace {
                old_index,
                old_len,
                new_index,
                new_len,
            } => replace(
                &text(&a[old_index..old_index + old_len]),
                &text(&b[new_index..new_index + new_len]),
                out,
            ),
        }
    }
}

/// `patch` as patches of at most `max` wire bytes each (its insert cut between code
/// points), applying one after another.
fn split_patch(patch: Patch, max: usize) -> Vec<Patch> {
    if patches_wire_len(std::slice::from_ref(&patch)) <= max {
        return vec![patch];
    }
    let room = max.saturating_sub(4 + 12).max(4);
    let mut pieces = Vec::new();
    let (mut pos, mut del, mut rest) = (patch.pos, patch.del, patch.ins.as_str());
    while !rest.is_empty() || del > 0 {
        let mut cut = rest.len().min(room);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, after) = rest.split_at(cut);
        pieces.push(Patch::new(pos, del, piece));
        pos += piece.chars().count() as u32;
        del = 0;
        rest = after;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the simulator (seed 25, application clients with astral characters):
    /// a client reloaded while its last confirmed text stood whole in the server's,
    /// among others' tokens made of the same characters; a character-by-character
    /// Myers diff matched it piecemeal across those tokens, and the client's own
    /// later deletion of a filler character, rebased over that diff, deleted a
    /// character inside a token instead.
    #[test]
    fn a_reload_keeps_the_confirmed_text_whole_where_it_stands_whole_in_the_server_s() {
        let seen = "<app4.2🦀><app4.1𝄞>𝄞😀";
        let server = "<app1.1𝄞><app1.14🦀>x🦀<app1.7𝄞><app1.30😀><app1.15😀><app1.11🦀>\
            <app1.6😀><app1.17🦀><app1.13𝄞><app1.31𝄞><app1.26🦀><app1.16𝄞><app1.27😀>\
            <app1.9😀>😀 😀<app1.8🦀><app1.29🦀><app1.12😀><app1.2🦀><app1.22𝄞><app1.4𝄞> \
            <app1.18😀> <app1.5🦀><app1.10𝄞><app1.3😀><app1.25𝄞><app1.24😀>🦀<app1.23🦀>\
            <app1.19𝄞><app1.20🦀><app1.21😀><app4.2🦀><app4.1𝄞>𝄞😀<app1.28𝄞>";
        let theirs = diff(seen, server);
        assert_eq!(theirs.apply(seen).as_deref(), Some(server));
        // The client deletes its filler "𝄞😀" (after its two tokens).
        let mine = TextOp::from_patches(&[Patch::new(18, 2, "")]);
        let merged = mine.transform(&theirs, Side::Left).apply(server).unwrap();
        assert_eq!(merged, server.replace("<app4.1𝄞>𝄞😀", "<app4.1𝄞>"));
    }

    /// An op refused for its size after the server's transform (code 24) is not sent
    /// again as it was (it would be refused again, for ever): it comes back cut.
    #[test]
    fn an_op_refused_as_too_large_comes_back_cut_to_fit() {
        let max = 400;
        let mut doc = ClientDoc::new("x".repeat(10), 0, 1).with_max_op_bytes(max);
        // Many small patches: each fine, together near the limit.
        let patches: Vec<Patch> = (0..10)
            .map(|i| Patch::new(i * 2, 0, "abcdefghijklmnopq"))
            .collect();
        doc.local_edit(&patches).unwrap();
        let sent = doc.take_to_send().unwrap();
        let text = doc.text();
        assert!(doc.on_reject(sent.local_seq, true));
        assert_eq!(doc.text(), text, "still applied locally");
        let mut resent = Vec::new();
        while let Some(out) = doc.take_to_send() {
            assert!(crate::protocol::patches_wire_len(&out.patches) <= max / 4);
            resent.push(out.clone());
            doc.on_ack(out.local_seq, resent.len() as u64).unwrap();
        }
        assert!(resent.len() > 1, "cut into several ops");
        assert!(
            resent.iter().all(|o| o.local_seq > sent.local_seq),
            "new op ids"
        );
        // Applied in order to the server's text, they make the same text.
        let mut server = "x".repeat(10);
        for o in &resent {
            server = crate::ot::apply_patches(&server, &o.patches).unwrap();
        }
        assert_eq!(server, text);
    }

    /// Lines are matched first: a character stays in its line.
    #[test]
    fn a_diff_matches_lines_before_characters() {
        let from = "one\ntwo x\nthree\n";
        let to = "zero x\none\ntwo x!\nthree\n";
        let theirs = diff(from, to);
        assert_eq!(theirs.apply(from).as_deref(), Some(to));
        // An edit after "x" on line two stays there.
        let mine = TextOp::from_patches(&[Patch::new(9, 0, "y")]);
        let merged = mine.transform(&theirs, Side::Left).apply(to).unwrap();
        assert_eq!(merged, "zero x\none\ntwo xy!\nthree\n");
    }

    /// Whatever the texts, the diff turns one into the other (astral characters,
    /// lines, repeats).
    #[test]
    fn a_diff_turns_one_text_into_the_other() {
        let alphabet = ['a', 'b', '\n', '𝄞', '😀', 'é'];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let mut make = |max: usize| -> String {
                (0..rng.usize(..max))
                    .map(|_| alphabet[rng.usize(..alphabet.len())])
                    .collect()
            };
            let (from, to) = (make(17), make(23));
            let op = diff(&from, &to);
            assert_eq!(
                op.apply(&from).as_deref(),
                Some(to.as_str()),
                "{from:?} -> {to:?}"
            );
        }
    }

    fn insert(pos: u32, text: &str) -> Patch {
        Patch {
            pos,
            del: 0,
            ins: text.into(),
        }
    }

    /// Found by the simulator (seed 79): edits made while an op was in flight were
    /// composed into one op larger than a frame, which could then never be sent.
    #[test]
    fn composed_ops_stay_under_the_op_limit() {
        let max = 200;
        let mut doc = ClientDoc::new(String::new(), 0, 1).with_max_op_bytes(max);
        doc.local_edit(&[insert(0, "x")]).unwrap();
        let first = doc.take_to_send().expect("an op to send");
        assert_eq!(first.patches, vec![insert(0, "x")]);
        // In flight: the next edits are buffered, composed while they stay small.
        for i in 0..40 {
            doc.local_edit(&[insert(1 + i * 10, "0123456789")]).unwrap();
        }
        assert!(doc.buffer.len() > 1, "the buffer was split");
        doc.on_ack(first.local_seq, 1).unwrap();
        let mut sent = 0;
        while let Some(out) = doc.take_to_send() {
            assert!(
                crate::protocol::patches_wire_len(&out.patches) <= max,
                "an op of {} bytes, over {max}",
                crate::protocol::patches_wire_len(&out.patches)
            );
            sent += 1;
            doc.on_ack(out.local_seq, 1 + sent).unwrap();
        }
        assert_eq!(doc.text().chars().count(), 401);
    }

    #[test]
    fn an_edit_over_the_op_limit_is_refused_and_not_applied() {
        let mut doc = ClientDoc::new("abc".into(), 0, 1).with_max_op_bytes(100);
        let big = "y".repeat(100);
        assert_eq!(
            doc.local_edit(&[insert(0, &big)]),
            Err(DocError::TooLarge {
                bytes: 4 + 12 + 100,
                max: 100
            })
        );
        assert_eq!(doc.text(), "abc");
        assert!(!doc.has_pending());
    }
}
