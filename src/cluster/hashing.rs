//! Rendezvous (highest-random-weight) hashing: a document's preferred owner is the live
//! node with the highest `weight(node, doc)`. Every node computes the same answer from
//! the same membership without talking to the others, a node's departure moves only
//! its own documents (each to its second choice), and a new node takes about
//! `1/(n+1)` of them, from every node alike.
//!
//! The weight must be the same function on every node and in every release (nodes of
//! two versions run side by side during a rolling upgrade), so it is written out here:
//! 64-bit FNV-1a over the node id, a separator byte and the document id, finished with
//! the `splitmix64` finaliser. FNV-1a alone mixes its last bytes poorly into the high
//! bits, and rendezvous hashing compares whole weights; the finaliser spreads every
//! input bit over all 64. Not `std`'s `DefaultHasher` (its algorithm may change between
//! Rust releases) nor a crate (this is a dozen lines, pinned by a test, and a crate
//! update could not change it under us).

/// The weight of `node` for `doc`. Pinned by a test: changing it moves documents.
pub fn weight(node: &str, doc: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    // The separator (0xff never occurs in UTF-8) keeps ("ab", "c") apart from ("a", "bc").
    for byte in node.bytes().chain([0xff]).chain(doc.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    splitmix64(hash)
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The preferred owner of `doc` among `nodes`: the highest weight, ties (a 2^-64 chance)
/// going to the smaller node id so that every node agrees. `None` if `nodes` is empty.
pub fn preferred_owner<'a, I>(doc: &str, nodes: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    nodes
        .into_iter()
        .max_by(|a, b| weight(a, doc).cmp(&weight(b, doc)).then_with(|| b.cmp(a)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const DOCS: usize = 10_000;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn owners(nodes: &[String]) -> Vec<String> {
        (0..DOCS)
            .map(|d| {
                let doc = format!("doc-{d}");
                preferred_owner(&doc, nodes.iter().map(String::as_str))
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn the_weight_is_the_documented_function() {
        // Pinned: every node of every release must agree on it.
        assert_eq!(
            weight("", ""),
            splitmix64((0xcbf2_9ce4_8422_2325_u64 ^ 0xff).wrapping_mul(0x100_0000_01b3))
        );
        assert_eq!(weight("a", "b"), 0x552d_4556_57d9_1379);
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
        assert_ne!(weight("n1", "d"), weight("n2", "d"));
    }

    #[test]
    fn ten_thousand_documents_spread_within_ten_percent_of_even() {
        for n in [3, 5, 8] {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for owner in owners(&nodes(n)) {
                *counts.entry(owner).or_default() += 1;
            }
            assert_eq!(counts.len(), n);
            let even = DOCS / n;
            // Binomial: one standard deviation is under 1% of 10,000 here; 10% of the
            // even share is over 3 of them.
            for (node, count) in &counts {
                assert!(
                    count.abs_diff(even) * 10 <= even,
                    "{node} has {count} of {DOCS} (n = {n})"
                );
            }
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_documents() {
        let all = nodes(5);
        let before = owners(&all);
        let without: Vec<String> = all.iter().filter(|n| *n != "node-2").cloned().collect();
        let after = owners(&without);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b == "node-2" {
                moved += 1;
            } else {
                assert_eq!(b, a, "a document not on the removed node moved");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_plus_one_and_only_to_it() {
        let before = owners(&nodes(4));
        let after = owners(&nodes(5));
        let mut moved: usize = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(a, "node-4", "a document moved between old nodes");
                moved += 1;
            }
        }
        let expected = DOCS / 5;
        assert!(
            moved.abs_diff(expected) * 10 <= expected,
            "{moved} of {DOCS} moved"
        );
    }

    #[test]
    fn no_nodes_no_owner() {
        assert_eq!(preferred_owner("doc", std::iter::empty()), None);
    }
}
