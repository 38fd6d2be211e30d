//! The editing traces of `../shared/traces` (format in that folder's README): loading
//! them, and finding them. Used by the trace tools and the trace tests.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::op::Patch;

pub struct Txn {
    pub agent: usize,
    pub parents: Vec<usize>,
    pub patches: Vec<Patch>,
}

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

pub fn load(path: &Path) -> Result<Trace, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |what: &str| format!("{}: {what}", path.display());
    let txns = value["txns"]
        .as_array()
        .ok_or_else(|| bad("no txns"))?
        .iter()
        .map(|t| {
            let patches = t["patches"]
                .as_array()
                .ok_or_else(|| bad("txn without patches"))?
                .iter()
                .map(|p| {
                    Ok(Patch::new(
                        p[0].as_u64().ok_or_else(|| bad("patch pos"))? as u32,
                        p[1].as_u64().ok_or_else(|| bad("patch del"))? as u32,
                        p[2].as_str().ok_or_else(|| bad("patch ins"))?,
                    ))
                })
                .collect::<Result<Vec<_>, String>>()?;
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
    Ok(Trace {
        txns,
        end_content: value["endContent"].as_str().unwrap_or_default().to_owned(),
        num_agents: value["numAgents"].as_u64().unwrap_or(1) as usize,
    })
}

pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
