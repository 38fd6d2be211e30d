//! A document's dedupe table: which op ids were applied, so that a resend gets its
//! original ack and a different op under a used id is refused.
//!
//! Per client it keeps its newest [`RECENT_OPS_PER_CLIENT`] ops (a client has at most
//! that many in flight, so a true resend is among them), each with the seq it got and
//! the fingerprint of the op as the client sent it ([`super::fingerprint`]). The log
//! (record type 2) and snapshots (version 3) keep the fingerprints, so the table rebuilt
//! at startup has them too. Only an op written by an older quire (a type-1 record, a
//! version 1 or 2 snapshot) has an unknown fingerprint, and an id that matches such an
//! op is refused as reused, never acked: see [`Dedupe::seen`].

use std::collections::{HashMap, VecDeque};

use super::RECENT_OPS_PER_CLIENT;
use crate::op::OpId;
use crate::wal::snapshot::RememberedOp;

type Applied = RememberedOp;

/// What the table says about an op id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never applied: a new op.
    New,
    /// Applied as `seq`, and this is the same op.
    Resend { seq: u64 },
    /// The id was used for a different op, or lies below the client's newest op and
    /// cannot be matched to one; `newest` is the client's newest local seq.
    Reused { newest: u64 },
}

#[derive(Debug, Default, Clone)]
pub struct Dedupe {
    /// The client that recorded an op last, with its ops: kept out of the map, so that a
    /// client typing a burst (the common case: one writer at a time) costs no hashing
    /// of its id per op, where looking it up and recording took two. A change of client
    /// costs one more (the newcomer is taken from the map and the other put back).
    hot: Option<(u64, VecDeque<Applied>)>,
    /// Every other client.
    clients: HashMap<u64, VecDeque<Applied>>,
}

impl Dedupe {
    /// Records that `client`'s op `local_seq` was applied as `seq`, with the fingerprint
    /// of the op as sent (`None`: unknown, an op written by an older quire).
    pub fn record(&mut self, client: u64, local_seq: u64, seq: u64, fingerprint: Option<u64>) {
        if self.hot.as_ref().is_none_or(|(hot, _)| *hot != client) {
            let recent = self.clients.remove(&client).unwrap_or_default();
            if let Some((other, its)) = self.hot.replace((client, recent)) {
                self.clients.insert(other, its);
            }
        }
        let (_, recent) = self.hot.as_mut().expect("the client is the hot one");
        debug_assert!(recent.back().is_none_or(|a| a.local_seq < local_seq));
        recent.push_back(Applied {
            local_seq,
            seq,
            fingerprint,
        });
        if recent.len() > RECENT_OPS_PER_CLIENT {
            recent.pop_front();
        }
        assert!(recent.len() <= RECENT_OPS_PER_CLIENT);
    }

    /// What an op with this id and fingerprint is. An id that matches a remembered op
    /// whose fingerprint is unknown (read from a type-1 record or a version 1 or 2
    /// snapshot) is [`Seen::Reused`]: a true resend of such an op is then refused (code
    /// 26, and its client reloads), which costs a reload; acking a different op under
    /// that id would drop an edit while acknowledging it.
    pub fn seen(&self, op_id: OpId, fingerprint: u64) -> Seen {
        let Some(recent) = self.recent(op_id.client_id) else {
            return Seen::New;
        };
        let newest = recent.back().map_or(0, |a| a.local_seq);
        if op_id.local_seq > newest {
            return Seen::New;
        }
        match recent.iter().rev().find(|a| a.local_seq == op_id.local_seq) {
            Some(a) if a.fingerprint == Some(fingerprint) => Seen::Resend { seq: a.seq },
            _ => Seen::Reused { newest },
        }
    }

    /// The seq of `client`'s newest op applied here (`None`: none remembered).
    pub fn newest_seq(&self, client: u64) -> Option<u64> {
        self.recent(client)?.back().map(|a| a.seq)
    }

    /// `client`'s remembered ops, oldest first.
    fn recent(&self, client: u64) -> Option<&VecDeque<Applied>> {
        match &self.hot {
            Some((hot, recent)) if *hot == client => Some(recent),
            _ => self.clients.get(&client),
        }
    }

    /// Every client in the table, with its remembered ops, in no order.
    fn all(&self) -> impl Iterator<Item = (u64, &VecDeque<Applied>)> {
        let hot = self.hot.iter().map(|(c, recent)| (*c, recent));
        hot.chain(self.clients.iter().map(|(&c, recent)| (c, recent)))
    }

    /// Each client's remembered ops, oldest first, sorted by client (what a snapshot
    /// keeps).
    pub fn remembered(&self) -> Vec<(u64, Vec<RememberedOp>)> {
        let mut entries: Vec<_> = self
            .all()
            .map(|(c, recent)| (c, recent.iter().copied().collect()))
            .collect();
        entries.sort_unstable_by_key(|(c, _)| *c);
        entries
    }

    /// Each client's newest op: `(client_id, last_local_seq, seq)`, sorted by client.
    pub fn newest(&self) -> Vec<(u64, u64, u64)> {
        let mut entries: Vec<_> = self
            .all()
            .filter_map(|(c, recent)| recent.back().map(|a| (c, a.local_seq, a.seq)))
            .collect();
        entries.sort_unstable();
        entries
    }

    /// Clients in the table.
    pub fn len(&self) -> usize {
        self.clients.len() + usize::from(self.hot.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(local_seq: u64) -> OpId {
        OpId {
            client_id: 7,
            local_seq,
        }
    }

    #[test]
    fn a_resend_matches_and_a_different_op_under_the_same_id_does_not() {
        let mut t = Dedupe::default();
        assert_eq!(t.seen(id(1), 11), Seen::New);
        t.record(7, 1, 5, Some(11));
        t.record(7, 2, 6, Some(12));
        assert_eq!(t.seen(id(1), 11), Seen::Resend { seq: 5 });
        assert_eq!(t.seen(id(2), 12), Seen::Resend { seq: 6 });
        assert_eq!(t.seen(id(2), 99), Seen::Reused { newest: 2 });
        assert_eq!(t.seen(id(3), 99), Seen::New);
    }

    #[test]
    fn an_id_older_than_the_recent_ops_is_refused_not_acked() {
        let mut t = Dedupe::default();
        let n = RECENT_OPS_PER_CLIENT as u64 + 5;
        for i in 1..=n {
            t.record(7, i, i, Some(i));
        }
        assert_eq!(t.seen(id(1), 1), Seen::Reused { newest: n });
        assert_eq!(t.seen(id(6), 6), Seen::Resend { seq: 6 });
        assert_eq!(t.seen(id(5), 5), Seen::Reused { newest: n });
    }

    #[test]
    fn an_op_whose_fingerprint_is_unknown_is_never_matched() {
        // Ops 2 and 3 read from data an older quire wrote; 4 applied since.
        let mut t = Dedupe::default();
        t.record(7, 2, 8, None);
        t.record(7, 3, 9, None);
        t.record(7, 4, 10, Some(44));
        for fingerprint in [0, 1234, u64::MAX] {
            assert_eq!(t.seen(id(3), fingerprint), Seen::Reused { newest: 4 });
            assert_eq!(t.seen(id(2), fingerprint), Seen::Reused { newest: 4 });
        }
        assert_eq!(t.seen(id(4), 44), Seen::Resend { seq: 10 });
        assert_eq!(t.seen(id(5), 1234), Seen::New);
        assert_eq!(t.newest(), vec![(7, 4, 10)]);
        let remembered = t.remembered();
        assert_eq!(remembered.len(), 1);
        let fingerprints: Vec<_> = remembered[0].1.iter().map(|a| a.fingerprint).collect();
        assert_eq!(fingerprints, vec![None, None, Some(44)]);
    }

    /// The table (its most recent client kept out of the map) answers as a plain map of
    /// each client's newest ops would, whatever the order in which clients record.
    #[test]
    fn any_interleaving_of_clients_answers_as_a_plain_map_would() {
        fn prop(steps: Vec<(u8, u8, bool)>) -> bool {
            let mut t = Dedupe::default();
            let mut model: HashMap<u64, VecDeque<Applied>> = HashMap::new();
            let mut seq = 0;
            for (client, seen_seq, fingerprint) in steps {
                // Three clients, each recording increasing local seqs; two fingerprints,
                // so that an id seen again is as often a resend as a reuse.
                let (client, fingerprint) = (u64::from(client % 3) + 1, u64::from(fingerprint));
                let recent = model.entry(client).or_default();
                let local_seq = recent.back().map_or(1, |a| a.local_seq + 1);
                let id = OpId {
                    client_id: client,
                    local_seq: u64::from(seen_seq) % (local_seq + 2),
                };
                let expected = match recent.back().map(|a| a.local_seq) {
                    None => Seen::New,
                    Some(newest) if id.local_seq > newest => Seen::New,
                    Some(newest) => match recent.iter().find(|a| a.local_seq == id.local_seq) {
                        Some(a) if a.fingerprint == Some(fingerprint) => {
                            Seen::Resend { seq: a.seq }
                        }
                        _ => Seen::Reused { newest },
                    },
                };
                if t.seen(id, fingerprint) != expected {
                    return false;
                }
                seq += 1;
                t.record(client, local_seq, seq, Some(fingerprint));
                recent.push_back(Applied {
                    local_seq,
                    seq,
                    fingerprint: Some(fingerprint),
                });
                if recent.len() > RECENT_OPS_PER_CLIENT {
                    recent.pop_front();
                }
                let mut remembered: Vec<_> = model
                    .iter()
                    .map(|(&c, recent)| (c, recent.iter().copied().collect::<Vec<_>>()))
                    .collect();
                remembered.sort_unstable_by_key(|(c, _)| *c);
                let mut newest: Vec<_> = remembered
                    .iter()
                    .map(|(c, ops)| (*c, ops.last().unwrap().local_seq, ops.last().unwrap().seq))
                    .collect();
                newest.sort_unstable();
                if t.remembered() != remembered
                    || t.newest() != newest
                    || t.len() != model.len()
                    || t.newest_seq(client) != Some(seq)
                {
                    return false;
                }
            }
            true
        }
        // Long enough runs (up to 400 steps) that clients pass the
        // RECENT_OPS_PER_CLIENT they are remembered by while they swap in and out.
        quickcheck::QuickCheck::new()
            .tests(300)
            .rng(quickcheck::Gen::new(400))
            .quickcheck(prop as fn(Vec<(u8, u8, bool)>) -> bool);
    }
}
