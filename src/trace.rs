//! The editing traces of `../shared/traces` (format in that folder's README): loading
//! them, and finding them. Used by the trace tools and the trace tests.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::op::Patch;

#[derive(Default, Debug)]
pub struct Txn {
    pub agent: usize,
    pub parents: Vec<usize>,
    pub patches: Vec<Patch>,
}

#[derive(Default, Debug)]
pub struct Trace {
    pub txns: Vec<Txn>,
    pub end_content: String,
    pub num_agents: usize,
}

/// The folder holding the traces: `$QUIRE_TRACES`, else `../shared/traces` from the
/// crate root. `None` if the traces are not there.
pub fn traces_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("QUIRE_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces"));
    dir.join("automerge-paper.json.gz").is_file().then_some(dir)
}

/// Reads a trace file: gzipped or plain JSON, told apart by the gzip magic bytes, not by
/// the file's name.
pub fn load(path: &Path) -> Result<Trace, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A trace from the bytes of its file: gzip (every member, as `gunzip` reads a
/// concatenation of them) if they start with the gzip magic bytes, else UTF-8 JSON (a
/// byte-order mark is skipped).
pub fn parse(bytes: &[u8]) -> Result<Trace, String> {
    let mut unzipped = Vec::new();
    let json = if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut unzipped)
            .map_err(|e| format!("gzip: {e}"))?;
        &unzipped[..]
    } else {
        bytes
    };
    let json = json.strip_prefix(b"\xef\xbb\xbf").unwrap_or(json);
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let bad = |what: &str| what.to_owned();
    let txns = value["txns"]
        .as_array()
        .ok_or_else(|| bad("no txns"))?
        .iter()
        .map(|t| {
            // The format allows the last txn of a concurrent trace to have no patches.
            let patches = match &t["patches"] {
                serde_json::Value::Null => Vec::new(),
                ps => ps
                    .as_array()
                    .ok_or_else(|| bad("txn patches are not a list"))?
                    .iter()
                    .map(|p| {
                        Ok(Patch::new(
                            p[0].as_u64().ok_or_else(|| bad("patch pos"))? as u32,
                            p[1].as_u64().ok_or_else(|| bad("patch del"))? as u32,
                            p[2].as_str().ok_or_else(|| bad("patch ins"))?,
                        ))
                    })
                    .collect::<Result<Vec<_>, String>>()?,
            };
            Ok(Txn {
                agent: t["agent"].as_u64().unwrap_or(0) as usize,
                parents: t["parents"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| p.as_u64().map(|p| p as usize))
                            .collect()
                    })
                    .unwrap_or_default(),
                patches,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(i) = txns
        .iter()
        .enumerate()
        .position(|(i, t)| t.parents.iter().any(|&p| p >= i))
    {
        return Err(format!("txn {i} names a parent that is not before it"));
    }
    let agents = txns.iter().map(|t| t.agent + 1).max().unwrap_or(1);
    Ok(Trace {
        txns,
        end_content: value["endContent"].as_str().unwrap_or_default().to_owned(),
        num_agents: (value["numAgents"].as_u64().unwrap_or(1) as usize).max(agents),
    })
}

pub fn sha256_hex(text: impl AsRef<str>) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_ref().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// Ops the server sequenced (a txn that changes nothing sends none).
    pub ops: u64,
    /// Txns no emulated client could make on exactly their parent version: when the txn
    /// came, its client had already received ops of another agent that the parent version
    /// does not hold (they were sequenced before ops it needed: a long-lived branch).
    /// Each was made on the client's version instead, its patches rebased onto it (see
    /// [`Model`]), so the run goes on.
    pub unreachable: u64,
    /// `unreachable`, per agent (index: the agent).
    pub unreachable_by_agent: Vec<u64>,
    /// Replicas found identical at the end: every emulated client and the server's copy.
    pub replicas: usize,
    /// The document's text as the server holds it at the end (read back by a new client).
    pub text: String,
    /// Each op's time from send to ack, microseconds.
    pub ack_us: Vec<u64>,
}

/// For each txn and each agent x: how many of x's txns are in the txn's parent version.
/// An agent's txns are totally ordered, so that set is a prefix of x's txns.
pub fn parent_prefixes(trace: &Trace) -> Vec<Vec<u32>> {
    let n = trace.num_agents.max(1);
    let mut with_self: Vec<Vec<u32>> = Vec::with_capacity(trace.txns.len());
    let mut parents_only = Vec::with_capacity(trace.txns.len());
    let mut count = vec![0u32; n];
    for txn in &trace.txns {
        let mut known = vec![0u32; n];
        for &p in &txn.parents {
            for (k, v) in known.iter_mut().zip(&with_self[p]) {
                *k = (*k).max(*v);
            }
        }
        parents_only.push(known.clone());
        count[txn.agent] += 1;
        known[txn.agent] = count[txn.agent];
        with_self.push(known);
    }
    parents_only
}

/// The whole history of a concurrent trace as one list of characters, deleted ones kept
/// (the list-CRDT view the traces README suggests): each character knows the txn that
/// inserted it and those that deleted it, so its position in any version (per agent, a
/// prefix of its txns, as [`parent_prefixes`] gives them) can be counted. It takes a
/// txn's patches from its parent version to any version that holds it, which is what
/// an unreachable txn needs. O(document) per patch: built only once a replay meets an
/// unreachable txn.
#[derive(Default)]
pub struct Model {
    items: Vec<Item>,
}

struct Item {
    agent: u32,
    /// The inserting txn's index among its agent's txns.
    nth: u32,
    ch: char,
    /// (agent, index among its txns) of each txn that deleted it.
    deleted_by: Vec<(u32, u32)>,
}

impl Item {
    fn visible(&self, version: &[u32]) -> bool {
        version[self.agent as usize] > self.nth
            && !self
                .deleted_by
                .iter()
                .any(|&(agent, nth)| version[agent as usize] > nth)
    }
}

impl Model {
    /// Applies the `nth` txn of `agent` as made on version `at` (which holds the txn
    /// itself: `at[agent] == nth + 1`). Returns its patches in the coordinates of the
    /// version `onto` (same convention; it must hold `at`), if given. Characters already
    /// deleted in `onto` stay deleted (the patch deletes less).
    pub fn apply(
        &mut self,
        agent: usize,
        nth: u32,
        patches: &[Patch],
        at: &[u32],
        onto: Option<&[u32]>,
    ) -> Result<Vec<Patch>, String> {
        let mut out = Vec::new();
        for patch in patches {
            let (insert_at, deleted) = self.locate(patch, at).map_err(|seen| {
                format!(
                    "patch {patch:?} of agent {agent}'s txn {nth} is past the end of its parent version ({seen} chars)"
                )
            })?;
            if let Some(onto) = onto {
                // Runs of deleted characters still visible in `onto`, last first so
                // that each position holds when the patches apply in order.
                let mut runs: Vec<(u32, u32)> = Vec::new();
                let mut before = 0u32;
                let mut next = 0usize;
                for &i in &deleted {
                    before += self.items[next..i]
                        .iter()
                        .filter(|item| item.visible(onto))
                        .count() as u32;
                    next = i;
                    if self.items[i].visible(onto) {
                        match runs.last_mut() {
                            Some((pos, len)) if *pos + *len == before => *len += 1,
                            _ => runs.push((before, 1)),
                        }
                    }
                }
                out.extend(
                    runs.iter()
                        .rev()
                        .map(|&(pos, len)| Patch::new(pos, len, "")),
                );
            }
            for &i in &deleted {
                self.items[i].deleted_by.push((agent as u32, nth));
            }
            if let Some(onto) = onto {
                if !patch.ins.is_empty() {
                    let pos = self.items[..insert_at]
                        .iter()
                        .filter(|item| item.visible(onto))
                        .count() as u32;
                    out.push(Patch::new(pos, 0, patch.ins.clone()));
                }
            }
            self.items.splice(
                insert_at..insert_at,
                patch.ins.chars().map(|ch| Item {
                    agent: agent as u32,
                    nth,
                    ch,
                    deleted_by: Vec::new(),
                }),
            );
        }
        Ok(out)
    }

    /// Where `patch` applies in `version`: the index of the item its insert goes before
    /// (just after the `pos`-th visible character), and the items it deletes. Past the
    /// end: how many characters `version` has.
    fn locate(&self, patch: &Patch, version: &[u32]) -> Result<(usize, Vec<usize>), u32> {
        let end = patch.pos + patch.del;
        let mut insert_at = 0;
        let mut deleted = Vec::with_capacity(patch.del as usize);
        let mut seen = 0u32;
        for (i, item) in self.items.iter().enumerate() {
            if seen >= end {
                break;
            }
            if item.visible(version) {
                if seen >= patch.pos {
                    deleted.push(i);
                }
                seen += 1;
                if seen == patch.pos {
                    insert_at = i + 1;
                }
            }
        }
        if seen < end {
            return Err(seen);
        }
        Ok((insert_at, deleted))
    }

    /// The txns outside `at`, as (agent, index among its agent's txns), that inserted
    /// characters next to what a txn made on `at` with `patches` changes (before it is
    /// applied): in the run of characters around each patch up to the nearest ones, on
    /// either side, that `at` shows and no txn so far deleted. There, concurrent inserts
    /// can meet at one position when the ops are transformed (also after the characters
    /// between them are deleted), and positional OT orders them by which op the server
    /// sequenced first (see `ot`): a replay that sends such txns out of file order can
    /// end with another text than the trace's. A txn of several patches is taken as
    /// next to every txn outside `at` that inserted characters.
    pub fn concurrent_neighbours(
        &self,
        patches: &[Patch],
        at: &[u32],
    ) -> Result<Vec<(usize, u32)>, String> {
        let outside = |item: &Item| at[item.agent as usize] <= item.nth;
        let mut found: Vec<(usize, u32)> = Vec::new();
        if let [patch] = patches {
            let (insert_at, deleted) = self.locate(patch, at).map_err(|seen| {
                format!("patch {patch:?} is past the end of its version ({seen} chars)")
            })?;
            let stable = |item: &Item| item.visible(at) && item.deleted_by.is_empty();
            let first = deleted.first().copied().unwrap_or(insert_at);
            let after = deleted.last().map_or(insert_at, |&i| i + 1);
            let left = self.items[..first]
                .iter()
                .rev()
                .take_while(|item| !stable(item));
            let right = self.items[after..].iter().take_while(|item| !stable(item));
            // Between the deleted characters: inserts `at` does not show.
            let inside = self.items[first..after].iter();
            found.extend(
                left.chain(right)
                    .chain(inside)
                    .filter(|item| outside(item))
                    .map(|item| (item.agent as usize, item.nth)),
            );
        } else if !patches.is_empty() {
            found.extend(
                self.items
                    .iter()
                    .filter(|item| outside(item))
                    .map(|item| (item.agent as usize, item.nth)),
            );
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// The text in `version`.
    pub fn text(&self, version: &[u32]) -> String {
        self.items
            .iter()
            .filter(|item| item.visible(version))
            .map(|item| item.ch)
            .collect()
    }
}

/// The text of document `doc` as the server holds it now, read by a new [`Client`]
/// (whose id the server gives).
///
/// [`Client`]: crate::client::Client
pub async fn read_back(
    addr: impl std::fmt::Display,
    token: &str,
    doc: &str,
) -> Result<String, crate::client::ClientError> {
    use crate::client::{Client, ClientConfig};
    let client = Client::connect(ClientConfig::new(addr.to_string()).token(token)).await?;
    // Opened before the connection is up, a document starts empty and is loaded later:
    // connected first, `open` returns once the server's text is in.
    client.wait_connected().await?;
    let text = client.open(doc).await?.text();
    client.shutdown().await;
    Ok(text)
}

/// Replays a concurrent trace through a running server: one client per agent, each
/// seeing exactly the parent version the trace gives each of its txns (the
/// client/server shape described in the traces README). Ops reach the server in file
/// order, one in flight per client, each txn its own op; a txn that changes nothing
/// (the format allows a last txn without patches) sends none.
///
/// A txn whose parent version its client cannot hold (see
/// [`ReplayReport::unreachable`]) is counted and made on the client's version, rebased
/// by a [`Model`] of the trace, and the replay goes on. At the end every client and the
/// server's copy, read back by one more client ([`read_back`]), must hold the same text;
/// if they do not, the error names each replica's length and sha256.
pub async fn replay_concurrent(
    addr: std::net::SocketAddr,
    token: &str,
    trace: &Trace,
    doc: &str,
    client_id_base: u64,
) -> Result<ReplayReport, crate::client::connection::ClientError> {
    use crate::client::connection::{ClientError, Connection};
    use crate::client::state::ClientDoc;
    use crate::ot::TextOp;
    use crate::protocol::message::Message;

    struct Agent {
        conn: Connection,
        doc: ClientDoc,
        /// Remote ops received, per agent.
        received: Vec<u64>,
        /// `ops_upto[j]`: the ops this agent's first `j` txns made (a txn that changes
        /// nothing makes none), for the txns replayed so far.
        ops_upto: Vec<u64>,
        /// Ops sent.
        sent: u64,
        /// When the op in flight was sent.
        sent_at: Option<std::time::Instant>,
        ack_us: Vec<u64>,
    }
    let n = trace.num_agents.max(1);
    let prefixes = parent_prefixes(trace);
    let mut agents = Vec::with_capacity(n);
    for a in 0..n {
        let mut conn = Connection::connect(addr, client_id_base + a as u64, token).await?;
        conn.send(Message::Open {
            doc: doc.into(),
            known_version: 0,
        })
        .await?;
        let (text, version) = loop {
            if let Message::Snapshot { text, version, .. } = conn.recv().await?.message {
                break (text, version);
            }
        };
        loop {
            if let Message::Ops { ops, .. } = conn.recv().await?.message {
                if !ops.is_empty() {
                    return Err(ClientError::Protocol(
                        "replay needs a fresh document".into(),
                    ));
                }
                break;
            }
        }
        agents.push(Agent {
            conn,
            doc: ClientDoc::new(text, version, 1).without_composing(),
            received: vec![0; n],
            ops_upto: vec![0],
            sent: 0,
            sent_at: None,
            ack_us: Vec::new(),
        });
    }

    async fn pump(agent: &mut Agent, base: u64) -> Result<(), ClientError> {
        let env = agent.conn.recv().await?;
        let protocol = |e| ClientError::Protocol(format!("{e:?}"));
        match env.message {
            Message::Ack { local_seq, seq, .. } => {
                agent.doc.on_ack(local_seq, seq).map_err(protocol)?;
                if let Some(t) = agent.sent_at.take() {
                    agent.ack_us.push(t.elapsed().as_micros() as u64);
                }
            }
            Message::Remote { op, .. } => {
                agent.doc.on_remote(op.seq, &op.patches).map_err(protocol)?;
                agent.received[(op.client_id - base) as usize] += 1;
            }
            Message::Reject { message, .. } | Message::Error { message, .. } => {
                return Err(ClientError::Refused(message))
            }
            _ => {}
        }
        Ok(())
    }

    // Ops are sent lazily: an agent's op goes to the server only when another agent's
    // next txn needs it. A client then only ever receives ops some txn of its own needs
    // (parent versions grow along each agent's own chain of txns), which is what lets
    // every txn see exactly its parent version with one op in flight per client.
    let mut unreachable = vec![0u64; n];
    async fn send_upto(
        agent: &mut Agent,
        count: u64,
        doc: &str,
        base: u64,
    ) -> Result<(), ClientError> {
        while agent.sent < count {
            while agent.doc.in_flight().is_some() {
                pump(agent, base).await?;
            }
            let out = agent
                .doc
                .take_to_send()
                .ok_or_else(|| ClientError::Protocol("txn to send was not made".into()))?;
            agent.conn.send(out.into_submit(doc)).await?;
            agent.sent_at = Some(std::time::Instant::now());
            agent.sent += 1;
        }
        Ok(())
    }

    // Each txn's index among its agent's txns.
    let mut nth = vec![0u32; trace.txns.len()];
    let mut count = vec![0u32; n];
    for (i, t) in trace.txns.iter().enumerate() {
        nth[i] = count[t.agent];
        count[t.agent] += 1;
    }
    // The version a txn is made on, holding the txn itself.
    let at = |i: usize| {
        let mut v = prefixes[i].clone();
        v[trace.txns[i].agent] = nth[i] + 1;
        v
    };
    let protocol = ClientError::Protocol;
    let mut model: Option<Model> = None;
    for (i, txn) in trace.txns.iter().enumerate() {
        let a = txn.agent;
        let mut need = vec![0u64; n];
        for x in (0..n).filter(|&x| x != a) {
            need[x] = agents[x].ops_upto[prefixes[i][x] as usize];
            send_upto(&mut agents[x], need[x], doc, client_id_base).await?;
            while agents[a].received[x] < need[x] {
                pump(&mut agents[a], client_id_base).await?;
            }
        }
        // Waiting for one agent's ops can bring more of another's than this txn's parent
        // version holds; the client cannot unsee them.
        let beyond = (0..n).any(|x| x != a && agents[a].received[x] > need[x]);
        let rebased;
        let patches = if beyond {
            unreachable[a] += 1;
            let model = match &mut model {
                Some(model) => model,
                None => {
                    let mut built = Model::default();
                    for (k, t) in trace.txns[..i].iter().enumerate() {
                        built
                            .apply(t.agent, nth[k], &t.patches, &at(k), None)
                            .map_err(protocol)?;
                    }
                    model.insert(built)
                }
            };
            // The client's version: per agent, the txns whose ops it received (the
            // fewest that made that many ops), and its own, this one included.
            let onto: Vec<u32> = (0..n)
                .map(|x| {
                    if x == a {
                        nth[i] + 1
                    } else {
                        let upto = &agents[x].ops_upto;
                        upto.partition_point(|&made| made < agents[a].received[x]) as u32
                    }
                })
                .collect();
            let mut before = onto.clone();
            before[a] = nth[i];
            let expected = model.text(&before).chars().count() as u32;
            if expected != agents[a].doc.len_chars() {
                return Err(protocol(format!(
                    "txn {i} (agent {a}): the client holds {} chars, the trace's version of it {expected}",
                    agents[a].doc.len_chars()
                )));
            }
            rebased = model
                .apply(a, nth[i], &txn.patches, &at(i), Some(&onto))
                .map_err(protocol)?;
            &rebased[..]
        } else {
            if let Some(model) = &mut model {
                model
                    .apply(a, nth[i], &txn.patches, &at(i), None)
                    .map_err(protocol)?;
            }
            &txn.patches[..]
        };
        let makes_op = !TextOp::from_patches(patches).is_noop();
        let agent = &mut agents[a];
        agent.doc.local_edit(patches).map_err(|e| {
            protocol(format!(
                "txn {i} (agent {a}, parents {:?}, prefixes {:?}, received {:?}) does not apply: {e:?}",
                txn.parents, prefixes[i], agent.received
            ))
        })?;
        let made = agent.ops_upto.last().copied().unwrap_or(0) + u64::from(makes_op);
        agent.ops_upto.push(made);
    }
    for agent in agents.iter_mut() {
        let made = agent.ops_upto.last().copied().unwrap_or(0);
        send_upto(agent, made, doc, client_id_base).await?;
    }
    let total: u64 = agents.iter().map(|a| a.sent).sum();
    for agent in agents.iter_mut() {
        while agent.doc.has_pending() || agent.doc.version() < total {
            pump(agent, client_id_base).await?;
        }
    }
    // Every replica, the server's copy last; all must be equal.
    let server_copy = read_back(addr, token, doc)
        .await
        .map_err(|e| protocol(format!("reading the server's copy back: {e}")))?;
    let mut replicas: Vec<(String, String)> = agents
        .iter()
        .enumerate()
        .map(|(a, agent)| (format!("agent {a}"), agent.doc.text()))
        .collect();
    replicas.push(("server".into(), server_copy));
    let text = replicas[replicas.len() - 1].1.clone();
    if replicas.iter().any(|(_, t)| *t != text) {
        let each: Vec<String> = replicas
            .iter()
            .map(|(name, t)| {
                format!(
                    "{name}: {} chars sha256 {}",
                    t.chars().count(),
                    sha256_hex(t)
                )
            })
            .collect();
        return Err(protocol(format!(
            "the replicas diverged: {}",
            each.join("; ")
        )));
    }
    Ok(ReplayReport {
        ops: total,
        unreachable: unreachable.iter().sum(),
        unreachable_by_agent: unreachable,
        replicas: replicas.len(),
        text,
        ack_us: agents.iter_mut().flat_map(|a| a.ack_us.drain(..)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SEQUENTIAL: &str = r#"{"startContent": "", "endContent": "hi!",
        "txns": [{"time": "2021-04-19T06:06:58.219Z", "patches": [[0, 0, "hello"]]},
                 {"time": "2021-04-19T06:06:58.219Z", "patches": [[1, 4, "i"], [2, 0, "!"]]}]}"#;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn written(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn replayed(trace: &Trace) -> String {
        let patches: Vec<Patch> = trace
            .txns
            .iter()
            .flat_map(|t| t.patches.iter().cloned())
            .collect();
        crate::ot::apply_patches("", &patches).unwrap()
    }

    #[test]
    fn trace_files_load_plain_or_gzipped_whatever_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let plain = SEQUENTIAL.as_bytes();
        let zipped = gzip(plain);
        for (name, bytes) in [
            ("plain.json", plain),
            ("plain-named-gz.json.gz", plain),
            ("zipped.json.gz", &zipped[..]),
            ("zipped-named-plain.json", &zipped[..]),
        ] {
            let trace = load(&written(dir.path(), name, bytes)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(trace.txns.len(), 2, "{name}");
            assert_eq!(trace.end_content, "hi!", "{name}");
            assert_eq!(replayed(&trace), "hi!", "{name}");
        }
        // A byte-order mark before plain JSON is skipped.
        let bom = [b"\xef\xbb\xbf".as_slice(), plain].concat();
        assert_eq!(
            load(&written(dir.path(), "bom.json", &bom))
                .unwrap()
                .txns
                .len(),
            2
        );
    }

    #[test]
    fn a_gzip_file_of_several_members_loads_to_its_end() {
        // `cat a.gz b.gz` (or bgzip, or pigz -i) is one gzip file of several members.
        let (head, tail) = SEQUENTIAL.split_at(SEQUENTIAL.len() / 2);
        let bytes = [gzip(head.as_bytes()), gzip(tail.as_bytes())].concat();
        let trace = parse(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(replayed(&trace), "hi!");
    }

    #[test]
    fn a_concurrent_trace_whose_last_txn_has_no_patches_loads() {
        let json = r#"{"kind": "concurrent", "endContent": "ab", "numAgents": 2, "txns": [
            {"parents": [], "numChildren": 2, "agent": 0, "patches": [[0, 0, "a"]]},
            {"parents": [0], "numChildren": 1, "agent": 1, "patches": [[1, 0, "b"]]},
            {"parents": [1], "numChildren": 0, "agent": 0}]}"#;
        let trace = parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(trace.txns.len(), 3);
        assert!(trace.txns[2].patches.is_empty());
        assert_eq!(trace.num_agents, 2);
        // A parent that is not earlier in the file is refused, not a panic later.
        let forward = json.replace(r#""parents": [1]"#, r#""parents": [2]"#);
        assert!(parse(forward.as_bytes()).unwrap_err().contains("txn 2"));
    }

    #[test]
    fn concurrent_neighbours_are_the_concurrent_inserts_an_edit_can_meet_when_transformed() {
        let mut model = Model::default();
        // Agent 0 writes "abc"; then, concurrently, agent 1 deletes "b" and types "X"
        // where it was, and agent 0 edits its "abc".
        model
            .apply(0, 0, &[Patch::new(0, 0, "abc")], &[1, 0], None)
            .unwrap();
        model
            .apply(1, 0, &[Patch::new(1, 1, "")], &[1, 1], None)
            .unwrap();
        model
            .apply(1, 1, &[Patch::new(1, 0, "X")], &[1, 2], None)
            .unwrap();
        let at = [2, 0];
        let near = |patches: &[Patch]| model.concurrent_neighbours(patches, &at).unwrap();
        // Between "a" and "b": where agent 1 typed.
        assert_eq!(near(&[Patch::new(1, 0, "Y")]), vec![(1, 1)]);
        // Between "b" and "c": "b" is gone from agent 1's text, so there too.
        assert_eq!(near(&[Patch::new(2, 0, "Y")]), vec![(1, 1)]);
        // Deleting "b" itself, next to "X".
        assert_eq!(near(&[Patch::new(1, 1, "")]), vec![(1, 1)]);
        // Past "c", and before "a": characters nobody deleted lie between.
        assert_eq!(near(&[Patch::new(3, 0, "Y")]), vec![]);
        assert_eq!(near(&[Patch::new(0, 0, "Y")]), vec![]);
        // A version that holds agent 1's txns has no concurrent neighbour.
        assert_eq!(
            model
                .concurrent_neighbours(&[Patch::new(1, 0, "Y")], &[2, 2])
                .unwrap(),
            vec![]
        );
        // Several patches: every txn outside the version that inserted characters, to be
        // safe (the patches alone are next to none).
        assert_eq!(
            near(&[Patch::new(3, 0, "Y"), Patch::new(0, 0, "Z")]),
            vec![(1, 1)]
        );
    }

    #[test]
    fn the_model_rebases_every_friendsforever_txn_onto_everything_before_it_and_ends_at_end_content(
    ) {
        // The hardest version to rebase onto: each txn made on its parent version, taken
        // to the version holding every earlier txn, applied to a plain string.
        let Some(dir) = traces_dir() else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the_model_rebases_every_friendsforever_txn_onto_everything_before_it_and_ends_at_end_content: the shared editing traces are not in ../shared/traces (set QUIRE_TRACES)"
            );
            return;
        };
        let trace = load(&dir.join("friendsforever.json.gz")).unwrap();
        let prefixes = parent_prefixes(&trace);
        let mut model = Model::default();
        let mut everything = vec![0u32; trace.num_agents];
        let mut text = String::new();
        let mut rebased_differently = 0;
        for (i, txn) in trace.txns.iter().enumerate() {
            let nth = everything[txn.agent];
            let mut at = prefixes[i].clone();
            at[txn.agent] = nth + 1;
            everything[txn.agent] = nth + 1;
            let patches = model
                .apply(txn.agent, nth, &txn.patches, &at, Some(&everything))
                .unwrap();
            rebased_differently += usize::from(patches != txn.patches);
            text = crate::ot::apply_patches(&text, &patches).unwrap();
        }
        assert!(rebased_differently > 1_000, "{rebased_differently}");
        assert_eq!(model.text(&everything), trace.end_content);
        assert_eq!(text, trace.end_content);
    }
}
