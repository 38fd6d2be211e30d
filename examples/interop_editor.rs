//! The Rust half of the Rust/TypeScript convergence test (`clients/js/test/interop.test.mjs`
//! starts it): a Rust client that edits one document at random, emoji included, while
//! TypeScript clients edit it too, then prints the text it converged to.
//!
//! ```text
//! QUIRE_ADDR=127.0.0.1:7420 QUIRE_DOC=doc QUIRE_SEED=1 QUIRE_EDITS=200 \
//!     cargo run --release --example interop_editor
//! ```
//!
//! Protocol with the test, one line each on stdout: `EDITED` once its edits are all
//! acknowledged; then, once the document holds the end mark (U+23F9, which the test
//! inserts after its own last edit, after `EDITED`) and nothing is pending, `TEXT` and
//! the text as a JSON string. Every op is sequenced by then: the mark was the last.

use std::time::Duration;

use quire::client::{Client, ClientConfig};
use quire::op::Patch;

const ALPHABET: [&str; 8] = [
    "a",
    "b",
    "c",
    " ",
    "é",
    "\u{1F600}",
    "\u{1D11E}",
    "\u{1F44D}\u{1F3FD}",
];
const END_MARK: char = '\u{23F9}';

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("QUIRE_ADDR")?;
    let doc = std::env::var("QUIRE_DOC")?;
    let seed: u64 = std::env::var("QUIRE_SEED")?.parse()?;
    let edits: usize = std::env::var("QUIRE_EDITS")?.parse()?;
    let mut rng = fastrand::Rng::with_seed(seed);

    let client = Client::connect(ClientConfig::new(&addr)).await?;
    client.wait_connected().await?;
    let handle = client.open(&doc).await?;
    for _ in 0..edits {
        let len = handle.text().chars().count() as u32;
        let pos = rng.u32(0..=len);
        let del = if rng.u8(0..3) == 0 {
            (len - pos).min(rng.u32(0..4))
        } else {
            0
        };
        let ins: String = (0..rng.usize(0..4))
            .map(|_| ALPHABET[rng.usize(0..ALPHABET.len())])
            .collect();
        handle.edit(&[Patch::new(pos, del, ins)]).await?;
        // Let the other side's ops in between ours, a varying amount.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
    }
    while !handle.is_synced() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("EDITED");
    while !(handle.is_synced() && handle.text().contains(END_MARK)) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("TEXT {}", serde_json::to_string(&handle.text())?);
    client.shutdown().await;
    Ok(())
}
