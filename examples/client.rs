//! Two clients edit one document and converge.
//!
//! ```text
//! cargo run --release --example client                                  # its own server
//! QUIRE_ADDR=127.0.0.1:7420 cargo run --release --example client        # a `quire serve`
//! ```
//!
//! Safe to run any number of times against one server: each client gets a fresh id
//! from the server (it sends none), so no run's ops are taken for another's.

use std::time::Duration;

use quire::client::{Client, ClientConfig, DocHandle, Event};
use quire::op::Patch;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A server of our own on a temporary data directory, unless one is named.
    let _own_server;
    let addr = match std::env::var("QUIRE_ADDR") {
        Ok(addr) => addr,
        Err(_) => {
            let dir = tempfile::tempdir()?;
            let (store, _) =
                quire::sequencer::local::LocalSequencer::open(dir.path(), Default::default())?;
            let listener = quire::server::bind("127.0.0.1:0".parse()?).await?;
            let addr = listener.local_addr()?.to_string();
            let server = quire::server::Server::new(std::sync::Arc::new(store), Default::default());
            let serving = tokio::spawn(server.serve(listener, std::future::pending()));
            _own_server = (dir, serving);
            addr
        }
    };

    let alice = Client::connect(ClientConfig::new(&addr)).await?;
    let bob = Client::connect(ClientConfig::new(&addr)).await?;
    alice.wait_connected().await?;
    bob.wait_connected().await?;
    println!(
        "alice is client {:#x}, bob is client {:#x}",
        alice.client_id(),
        bob.client_id()
    );

    let a = alice.open("examples/hello").await?;
    let b = bob.open("examples/hello").await?;
    let mut a_events = a.events();
    let mine = format!("[alice {:x}]", alice.client_id());
    let theirs = format!("[bob {:x}]", bob.client_id());
    // Both type at the start at once; OT puts both in, in the same order everywhere.
    a.edit(&[Patch::new(0, 0, mine.as_str())]).await?;
    b.edit(&[Patch::new(0, 0, theirs.as_str())]).await?;

    // Alice hears bob's edit as a Remote event (or had it before hers was sent).
    let wait = async {
        while !a.text().contains(&theirs) {
            match a_events.recv().await {
                Some(Event::Remote { patches, .. }) => println!("alice received {patches:?}"),
                Some(_) => {}
                None => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await?;
    settle(&a, &b).await?;
    println!("alice: {:?}\nbob:   {:?}", a.text(), b.text());
    if a.text() != b.text() || !a.text().contains(&mine) || !a.text().contains(&theirs) {
        return Err("the two clients did not converge on both edits".into());
    }
    alice.shutdown().await;
    bob.shutdown().await;
    Ok(())
}

/// Waits until both have every edit acknowledged and the same version.
async fn settle(a: &DocHandle, b: &DocHandle) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(a.is_synced() && b.is_synced() && a.version() == b.version()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}
