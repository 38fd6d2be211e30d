//! The in-memory index of the log: where each (document, seq) record lives, and what
//! each segment holds, so that "ops of doc D after seq S" is a direct read and the
//! truncation policy can see which documents pin which segments.
//!
//! Derived state: rebuilt from the segments at every startup, never stored.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// For each document with ops here, the highest seq here.
    pub max_seq_by_doc: HashMap<Arc<str>, u64>,
}

#[derive(Debug, Default)]
pub struct Index {
    docs: HashMap<Arc<str>, VecDeque<(u64, Location)>>,
    segments: BTreeMap<SegmentId, SegmentMeta>,
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
            let entries = self.docs.entry(doc_id.clone()).or_default();
            if let Some(&(last_seq, _)) = entries.back() {
                assert!(
                    seq > last_seq,
                    "seqs of {doc_id} out of order: {seq} after {last_seq}"
                );
            }
            entries.push_back((seq, location));
            let max = meta.max_seq_by_doc.entry(doc_id.clone()).or_insert(seq);
            *max = (*max).max(seq);
        }
    }

    /// Locations of the ops of `doc_id` with seq > `after_seq`, up to `limit` of them.
    pub fn ops_after(&self, doc_id: &str, after_seq: u64, limit: usize) -> Vec<(u64, Location)> {
        let Some(entries) = self.docs.get(doc_id) else {
            return Vec::new();
        };
        let start = entries.partition_point(|&(seq, _)| seq <= after_seq);
        entries.range(start..).take(limit).copied().collect()
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
        for meta in removed.values() {
            for doc_id in meta.max_seq_by_doc.keys() {
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
}
