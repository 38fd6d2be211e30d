//! The in-memory index of the log: where each (document, seq) record lives, and what
//! each segment holds, so that "ops of doc D after seq S" is a direct read and the
//! truncation policy can see which documents pin which segments.
//!
//! Derived state: rebuilt from the segments at every startup, never stored.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::record::Lsn;
use super::segment::SegmentId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment_id: SegmentId,
    /// Byte offset of the record in its segment.
    pub offset: u64,
    pub lsn: Lsn,
}

/// What the index knows of one segment.
#[derive(Debug, Clone, Default)]
pub struct SegmentMeta {
    pub first_lsn: Lsn,
    /// `None` while the segment holds no record yet.
    pub last_lsn: Option<Lsn>,
    /// Unix ms when the writer moved on to the next segment; `None` for the active one.
    pub sealed_ms: Option<u64>,
    /// The documents with ops here (of their current incarnation). The highest seq of
    /// each here is read from the document's entries ([`Index::max_seqs_in`]), so an op
    /// files its document here only when it is the document's first in the segment:
    /// the others cost no second lookup of the id.
    pub docs: HashSet<Arc<str>>,
}

#[derive(Debug, Default)]
pub struct Index {
    docs: HashMap<Arc<str>, VecDeque<(u64, Location)>>,
    segments: BTreeMap<SegmentId, SegmentMeta>,
    /// Where each tombstone still in the log is, by LSN (a backup ending at one finds
    /// its record here).
    tombstones: BTreeMap<Lsn, Location>,
}

impl Index {
    pub fn add_segment(&mut self, segment_id: SegmentId, first_lsn: Lsn) {
        if let Some((&last, meta)) = self.segments.iter_mut().next_back() {
            assert!(segment_id > last, "segments are added in id order");
            meta.sealed_ms.get_or_insert_with(crate::wal::now_ms);
        }
        self.segments.insert(
            segment_id,
            SegmentMeta {
                first_lsn,
                ..SegmentMeta::default()
            },
        );
    }

    /// Marks a segment sealed at `sealed_ms` (recovery: segments found complete).
    pub fn seal(&mut self, segment_id: SegmentId, sealed_ms: u64) {
        if let Some(meta) = self.segments.get_mut(&segment_id) {
            meta.sealed_ms.get_or_insert(sealed_ms);
        }
    }

    /// Records that `lsn` (in the given segment) exists; with a key, that it holds op
    /// `seq` of `doc_id`. Seqs of one document must arrive in increasing order.
    pub fn insert(&mut self, location: Location, key: Option<(&Arc<str>, u64)>) {
        let meta = self
            .segments
            .get_mut(&location.segment_id)
            .expect("segment registered before its records");
        assert!(meta.last_lsn.is_none_or(|l| l < location.lsn));
        meta.last_lsn = Some(location.lsn);
        if let Some((doc_id, seq)) = key {
            // Looked up before `entry`: a document already indexed (every op but its
            // first) costs no reference count on its id.
            let entries = match self.docs.get_mut(&**doc_id) {
                Some(entries) => entries,
                None => self.docs.entry(doc_id.clone()).or_default(),
            };
            let first_here = match entries.back() {
                Some(&(last_seq, last)) => {
                    assert!(
                        seq > last_seq,
                        "seqs of {doc_id} out of order: {seq} after {last_seq}"
                    );
                    last.segment_id != location.segment_id
                }
                None => true,
            };
            entries.push_back((seq, location));
            if first_here {
                meta.docs.insert(doc_id.clone());
            }
        }
    }

    /// Records that `lsn` (in the given segment) is a tombstone of `doc_id`: the ops of
    /// it indexed so far belong to the deleted incarnation and are forgotten (neither
    /// read nor pinning a segment for truncation; the segments holding them are deleted
    /// oldest first, so never after the one holding the tombstone). Its ops after this
    /// start again at seq 1.
    pub fn insert_tombstone(&mut self, location: Location, doc_id: &Arc<str>) {
        self.insert(location, None);
        self.tombstones.insert(location.lsn, location);
        self.docs.remove(doc_id);
        for meta in self.segments.values_mut() {
            meta.docs.remove(doc_id);
        }
    }

    /// For each document with ops in `segment_id`, the highest seq there (empty for a
    /// segment the index does not hold).
    pub fn max_seqs_in(&self, segment_id: SegmentId) -> Vec<(Arc<str>, u64)> {
        let Some(meta) = self.segments.get(&segment_id) else {
            return Vec::new();
        };
        meta.docs
            .iter()
            .map(|doc_id| {
                let entries = &self.docs[doc_id];
                // A document's entries are in seq order, and so in segment order.
                let end = entries.partition_point(|(_, loc)| loc.segment_id <= segment_id);
                let (seq, loc) = entries[end.checked_sub(1).expect("filed with an op here")];
                assert_eq!(
                    loc.segment_id, segment_id,
                    "{doc_id} filed without an op here"
                );
                (doc_id.clone(), seq)
            })
            .collect()
    }

    /// Locations of the ops of `doc_id` with seq > `after_seq`, up to `limit` of them.
    pub fn ops_after(&self, doc_id: &str, after_seq: u64, limit: usize) -> Vec<(u64, Location)> {
        let Some(entries) = self.docs.get(doc_id) else {
            return Vec::new();
        };
        let start = entries.partition_point(|&(seq, _)| seq <= after_seq);
        entries.range(start..).take(limit).copied().collect()
    }

    /// The newest op of `doc_id` at or before `lsn` still in the log: its seq and where
    /// it is.
    pub fn last_op_at_or_before(&self, doc_id: &str, lsn: Lsn) -> Option<(u64, Location)> {
        let entries = self.docs.get(doc_id)?;
        let end = entries.partition_point(|&(_, location)| location.lsn <= lsn);
        end.checked_sub(1).map(|i| entries[i])
    }

    /// The tombstone record at `lsn`, if there is one in the log.
    pub fn tombstone_at(&self, lsn: Lsn) -> Option<Location> {
        self.tombstones.get(&lsn).copied()
    }

    /// The lowest seq of `doc_id` still in the log.
    pub fn first_retained_seq(&self, doc_id: &str) -> Option<u64> {
        self.docs.get(doc_id)?.front().map(|&(seq, _)| seq)
    }

    pub fn segments(&self) -> &BTreeMap<SegmentId, SegmentMeta> {
        &self.segments
    }

    pub fn doc_ids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.docs.keys()
    }

    /// Forgets every segment below `segment_id` and the ops in them.
    pub fn remove_segments_before(&mut self, segment_id: SegmentId) {
        let kept = self.segments.split_off(&segment_id);
        let removed = std::mem::replace(&mut self.segments, kept);
        self.tombstones
            .retain(|_, location| location.segment_id >= segment_id);
        for meta in removed.values() {
            for doc_id in &meta.docs {
                if let Some(entries) = self.docs.get_mut(doc_id) {
                    while entries
                        .front()
                        .is_some_and(|(_, loc)| loc.segment_id < segment_id)
                    {
                        entries.pop_front();
                    }
                    if entries.is_empty() {
                        self.docs.remove(doc_id);
                    }
                }
            }
        }
    }
}

/// A document as the startup scan knows it: a dense number, given in order of first
/// appearance in the log, and its interned id. Replay keeps per-document state in a
/// `Vec` by `ordinal` instead of hashing the id of every record.
#[derive(Debug, Clone, Copy)]
pub struct DocSlot<'a> {
    pub ordinal: u32,
    pub id: &'a Arc<str>,
}

/// What the builder holds for one document.
#[derive(Debug)]
struct DocEntries {
    id: Arc<str>,
    entries: VecDeque<(u64, Location)>,
    /// Whether the document has ops in the segment being scanned (of its current
    /// incarnation).
    in_segment: bool,
}

/// Builds the [`Index`] during the startup scan, one record at a time, with the checks
/// of [`Index::insert`]. Each record costs one lookup of its document id (which interns
/// it); what each segment holds is filed once per document and segment, when the scan
/// moves past the segment, instead of once per record.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    index: Index,
    ordinals: HashMap<Arc<str>, u32>,
    docs: Vec<DocEntries>,
    /// The segment being scanned, its last LSN, and the ordinals with ops in it.
    segment: Option<(SegmentId, Option<Lsn>)>,
    touched: Vec<u32>,
}

impl IndexBuilder {
    /// Starts a segment; segments come in id order.
    pub fn add_segment(&mut self, segment_id: SegmentId, first_lsn: Lsn) {
        self.finish_segment();
        self.index.add_segment(segment_id, first_lsn);
        self.segment = Some((segment_id, None));
    }

    /// Records that op `seq` of `doc_id` is at `location`, in the current segment. Seqs
    /// of one document must arrive in increasing order, LSNs in increasing order.
    pub fn insert_op(&mut self, location: Location, doc_id: &str, seq: u64) -> DocSlot<'_> {
        let ordinal = self.record(location, doc_id);
        let doc = &mut self.docs[ordinal as usize];
        if let Some(&(last_seq, _)) = doc.entries.back() {
            assert!(
                seq > last_seq,
                "seqs of {doc_id} out of order: {seq} after {last_seq}"
            );
        }
        doc.entries.push_back((seq, location));
        if !doc.in_segment {
            doc.in_segment = true;
            self.touched.push(ordinal);
        }
        DocSlot {
            ordinal,
            id: &doc.id,
        }
    }

    /// Records that a tombstone of `doc_id` is at `location`, in the current segment:
    /// as [`Index::insert_tombstone`], the document's ops so far are forgotten.
    pub fn insert_tombstone(&mut self, location: Location, doc_id: &str) -> DocSlot<'_> {
        let ordinal = self.record(location, doc_id);
        self.index.tombstones.insert(location.lsn, location);
        let doc = &mut self.docs[ordinal as usize];
        doc.entries.clear();
        // Still in `touched` if it had ops in this segment: filed as none.
        doc.in_segment = false;
        for meta in self.index.segments.values_mut() {
            meta.docs.remove(&doc.id);
        }
        DocSlot {
            ordinal,
            id: &doc.id,
        }
    }

    /// Checks and records a record's place in the current segment; the ordinal of its
    /// document (given now if it is new).
    fn record(&mut self, location: Location, doc_id: &str) -> u32 {
        let (segment_id, last_lsn) = self
            .segment
            .as_mut()
            .expect("segment registered before its records");
        assert_eq!(*segment_id, location.segment_id);
        assert!(last_lsn.is_none_or(|l| l < location.lsn));
        *last_lsn = Some(location.lsn);
        match self.ordinals.get(doc_id) {
            Some(&ordinal) => ordinal,
            None => {
                let id: Arc<str> = Arc::from(doc_id);
                let ordinal = u32::try_from(self.docs.len()).expect("fewer than 2^32 documents");
                self.ordinals.insert(id.clone(), ordinal);
                self.docs.push(DocEntries {
                    id,
                    entries: VecDeque::new(),
                    in_segment: false,
                });
                ordinal
            }
        }
    }

    /// The document [`IndexBuilder::insert_op`] gave `ordinal`.
    pub fn slot(&self, ordinal: u32) -> DocSlot<'_> {
        DocSlot {
            ordinal,
            id: &self.docs[ordinal as usize].id,
        }
    }

    /// Files what the current segment holds in its [`SegmentMeta`].
    fn finish_segment(&mut self) {
        let Some((segment_id, last_lsn)) = self.segment.take() else {
            return;
        };
        let meta = self
            .index
            .segments
            .get_mut(&segment_id)
            .expect("segment registered");
        meta.last_lsn = last_lsn;
        meta.docs.reserve(self.touched.len());
        for ordinal in self.touched.drain(..) {
            let doc = &mut self.docs[ordinal as usize];
            // None: a tombstone of it followed its ops here.
            if std::mem::take(&mut doc.in_segment) {
                meta.docs.insert(doc.id.clone());
            }
        }
    }

    pub fn finish(mut self) -> Index {
        self.finish_segment();
        self.index.docs.reserve(self.docs.len());
        for doc in self.docs {
            let previous = self.index.docs.insert(doc.id, doc.entries);
            assert!(previous.is_none(), "each document interned once");
        }
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment_id: u64, lsn: u64) -> Location {
        Location {
            segment_id,
            offset: lsn * 8,
            lsn,
        }
    }

    #[test]
    fn ops_after_is_a_range_and_truncation_drops_only_old_segments() {
        let mut index = Index::default();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        index.add_segment(1, 1);
        index.insert(loc(1, 1), Some((&a, 1)));
        index.insert(loc(1, 2), Some((&b, 1)));
        index.add_segment(2, 3);
        index.insert(loc(2, 3), Some((&a, 2)));
        index.insert(loc(2, 4), Some((&a, 3)));
        assert_eq!(
            index
                .ops_after("a", 1, 10)
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(index.segments()[&1].sealed_ms.is_some());
        assert!(index.segments()[&2].sealed_ms.is_none());
        index.remove_segments_before(2);
        assert_eq!(index.first_retained_seq("a"), Some(2));
        assert_eq!(index.first_retained_seq("b"), None);
        assert_eq!(index.segments().len(), 1);
    }

    #[test]
    fn a_segment_gives_each_document_s_highest_seq_there_of_its_current_incarnation() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut index = Index::default();
        let mut builder = IndexBuilder::default();
        index.add_segment(1, 1);
        builder.add_segment(1, 1);
        for (lsn, doc, seq) in [(1, &a, 1), (2, &b, 1), (3, &a, 2), (4, &b, 2)] {
            index.insert(loc(1, lsn), Some((doc, seq)));
            builder.insert_op(loc(1, lsn), doc, seq);
        }
        index.add_segment(2, 5);
        builder.add_segment(2, 5);
        index.insert(loc(2, 5), Some((&a, 3)));
        builder.insert_op(loc(2, 5), &a, 3);
        // b is deleted, and made anew in this segment.
        index.insert_tombstone(loc(2, 6), &b);
        builder.insert_tombstone(loc(2, 6), &b);
        for (lsn, doc, seq) in [(7, &b, 1), (8, &a, 4), (9, &a, 5)] {
            index.insert(loc(2, lsn), Some((doc, seq)));
            builder.insert_op(loc(2, lsn), doc, seq);
        }
        let built = builder.finish();
        for index in [&index, &built] {
            let sorted = |segment| {
                let mut maxes = index.max_seqs_in(segment);
                maxes.sort();
                maxes
            };
            assert_eq!(sorted(1), vec![(a.clone(), 2)]);
            assert_eq!(sorted(2), vec![(a.clone(), 5), (b.clone(), 1)]);
            assert_eq!(sorted(3), vec![]);
        }
        index.remove_segments_before(2);
        assert_eq!(index.max_seqs_in(1), vec![]);
        assert_eq!(index.first_retained_seq("a"), Some(3));
        assert_eq!(index.max_seqs_in(2).len(), 2);
    }

    #[test]
    fn the_builder_gives_the_index_that_inserts_give() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut index = Index::default();
        let mut builder = IndexBuilder::default();
        let ops = [
            (1, 1, &a, 1),
            (1, 2, &b, 1),
            (1, 3, &a, 2),
            (2, 4, &a, 3),
            (2, 5, &b, 2),
        ];
        let mut segment = 0;
        for &(segment_id, lsn, doc, seq) in &ops {
            if segment_id != segment {
                index.add_segment(segment_id, lsn);
                builder.add_segment(segment_id, lsn);
                segment = segment_id;
            }
            index.insert(loc(segment_id, lsn), Some((doc, seq)));
            let slot = builder.insert_op(loc(segment_id, lsn), doc, seq);
            assert_eq!(slot.ordinal, if Arc::ptr_eq(doc, &a) { 0 } else { 1 });
        }
        let built = builder.finish();
        for doc in ["a", "b"] {
            assert_eq!(built.ops_after(doc, 0, 10), index.ops_after(doc, 0, 10));
        }
        assert_eq!(built.segments().len(), index.segments().len());
        for (id, meta) in index.segments() {
            let other = &built.segments()[id];
            assert_eq!(other.first_lsn, meta.first_lsn);
            assert_eq!(other.last_lsn, meta.last_lsn);
            assert_eq!(other.docs, meta.docs);
            let sorted = |index: &Index| {
                let mut maxes = index.max_seqs_in(*id);
                maxes.sort();
                maxes
            };
            assert_eq!(sorted(&built), sorted(&index));
        }
    }
}
