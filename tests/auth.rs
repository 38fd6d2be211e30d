//! Access tokens over TCP (protocol.md, "Access tokens"): each refusal comes with its
//! code, a client never learns whether a document it may not see exists, and in every
//! test a client with a good token on the same server keeps being served.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::common;

use common::{client_config, mint, mint_until, start, start_with};
use quire::auth::{now_unix_secs, Access, Keys};
use quire::client::connection::{ClientError, Connection};
use quire::client::{Client, ConnectionState};
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message, Selection};
use quire::server::ServerConfig;

const SECRET: &str = "the current secret of the tests";
const OLD: &str = "the previous secret of the tests";

/// The code a refused `Hello` gets.
async fn refused_at_hello(addr: SocketAddr, token: &str) -> ErrorCode {
    match Connection::connect(addr, 0, token).await {
        Err(ClientError::Handshake { code, message }) => {
            assert!(!message.is_empty());
            assert!(code.closes_connection(), "{code:?}");
            code
        }
        Err(e) => panic!("refused without a code: {e}"),
        Ok(_) => panic!("the token was accepted"),
    }
}

/// The next reply to `rid` that is an `Error` or a `Reject` (other messages skipped),
/// or `None` for the end of a successful `Open` (its last `Ops` frame) or an `Ack`.
async fn answer(conn: &mut Connection, rid: u32) -> Option<(ErrorCode, String)> {
    loop {
        let env = conn.recv().await.expect("the connection stays open");
        if env.request_id != rid {
            continue;
        }
        match env.message {
            Message::Error { code, message } | Message::Reject { code, message, .. } => {
                return Some((code, message))
            }
            Message::Ops { more: false, .. } | Message::Ack { .. } => return None,
            _ => {}
        }
    }
}

/// Opens `doc`: `Ok` once loaded, or the refusal.
async fn open(conn: &mut Connection, doc: &str) -> Result<(), (ErrorCode, String)> {
    let rid = conn
        .send(Message::Open {
            doc: doc.into(),
            known_version: 0,
        })
        .await
        .unwrap();
    answer(conn, rid).await.map_or(Ok(()), Err)
}

/// Submits an insert at 0 on `base_version`: `Ok` once acknowledged, or the refusal.
async fn submit(
    conn: &mut Connection,
    doc: &str,
    local_seq: u64,
    base_version: u64,
) -> Result<(), (ErrorCode, String)> {
    let rid = conn
        .send(Message::Submit {
            doc: doc.into(),
            local_seq,
            base_version,
            patches: vec![Patch::new(0, 0, "x")],
        })
        .await
        .unwrap();
    answer(conn, rid).await.map_or(Ok(()), Err)
}

async fn fetch(conn: &mut Connection, doc: &str) -> Option<(ErrorCode, String)> {
    let rid = conn
        .send(Message::Fetch {
            doc: doc.into(),
            after_seq: 0,
            limit: 10,
        })
        .await
        .unwrap();
    answer(conn, rid).await
}

async fn presence(conn: &mut Connection, doc: &str) -> Option<(ErrorCode, String)> {
    let rid = conn
        .send(Message::Presence {
            doc: doc.into(),
            selections: vec![Selection { anchor: 0, head: 0 }],
        })
        .await
        .unwrap();
    // Presence has no reply when accepted: a Ping after it tells.
    conn.send(Message::Ping { nonce: 9 }).await.unwrap();
    loop {
        let env = conn.recv().await.expect("the connection stays open");
        match env.message {
            Message::Error { code, message } if env.request_id == rid => {
                return Some((code, message))
            }
            Message::Pong { nonce: 9 } => return None,
            _ => {}
        }
    }
}

/// A client with a token for every document, editing its own: it must keep being
/// served (submit, then ack) whatever the others are refused.
struct Bystander {
    conn: Connection,
    version: u64,
}

impl Bystander {
    const DOC: &'static str = "bystander";

    async fn new(addr: SocketAddr, token: &str) -> Bystander {
        let mut conn = Connection::connect(addr, 0, token).await.unwrap();
        open(&mut conn, Self::DOC).await.unwrap();
        Bystander { conn, version: 0 }
    }

    /// Submits one op and waits for its ack.
    async fn served(&mut self) {
        let local_seq = self.version + 1;
        submit(&mut self.conn, Self::DOC, local_seq, self.version)
            .await
            .expect("the bystander's op is acknowledged");
        self.version += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_tokens_are_refused_at_hello_with_code_7() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    let good = mint(SECRET, "a", Access::Read);
    let (payload, tag) = good.split_once('.').unwrap();
    // The payload changed (to a wider grant) under the old signature.
    let wider = mint(SECRET, "*", Access::Write);
    let forged = format!("{}.{tag}", wider.split_once('.').unwrap().0);
    // Signed by a secret the server does not hold.
    let stranger = mint("a secret the server never had", "*", Access::Write);
    for token in [
        forged.as_str(),
        stranger.as_str(),
        payload,
        "",
        "not a token",
        &format!("{payload}.{tag}x"),
    ] {
        assert_eq!(
            refused_at_hello(server.addr, token).await,
            ErrorCode::InvalidToken,
            "{token:?}"
        );
        bystander.served().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_at_hello_with_code_12() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    let expired = mint_until(SECRET, "*", Access::Write, now_unix_secs() - 60);
    assert_eq!(
        refused_at_hello(server.addr, &expired).await,
        ErrorCode::TokenExpired
    );
    bystander.served().await;
    server.stop().await;
}

/// On a paused clock, which moves on by itself to the next timer whenever the runtime
/// waits: the token's expiry, two minutes on, comes without waiting for it.
#[tokio::test(start_paused = true)]
async fn a_token_that_expires_during_a_session_closes_it_with_code_12() {
    // A timer every second, so that the clock moves a second at a time (also while the
    // log's thread syncs an op), not at once to the next deadline of the server.
    let _metronome = tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // No deadline of the server comes before the expiry.
    let far = std::time::Duration::from_secs(86_400);
    let config = ServerConfig {
        keys: Some(Arc::new(Keys::new(&[SECRET]).unwrap())),
        handshake_timeout: far,
        idle_timeout: far,
        write_timeout: far,
        ..ServerConfig::default()
    };
    let server = start_with(dir.path(), config).await;
    // A token without an expiry the server could reach.
    let mut bystander = Bystander::new(
        server.addr,
        &mint_until(SECRET, "*", Access::Write, u64::MAX),
    )
    .await;
    let expiring = mint_until(SECRET, "d", Access::Write, now_unix_secs() + 120);
    let mut conn = Connection::connect(server.addr, 0, &expiring)
        .await
        .unwrap();
    open(&mut conn, "d").await.unwrap();
    let code = loop {
        match conn.recv().await {
            Ok(env) => {
                if let Message::Error { code, .. } = env.message {
                    break code;
                }
            }
            Err(e) => panic!("closed without an error: {e}"),
        }
    };
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(conn.recv().await.is_err(), "the connection is closed");
    bystander.served().await;
    bystander.served().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_document_is_refused_per_request_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    let mut conn = Connection::connect(server.addr, 0, &mint(SECRET, "a", Access::Write))
        .await
        .unwrap();
    let denied = |r: Option<(ErrorCode, String)>| r.map(|(code, _)| code);
    assert_eq!(
        denied(open(&mut conn, Bystander::DOC).await.err()),
        Some(ErrorCode::AccessDenied)
    );
    bystander.served().await;
    assert_eq!(
        denied(submit(&mut conn, Bystander::DOC, 1, 0).await.err()),
        Some(ErrorCode::AccessDenied)
    );
    assert_eq!(
        denied(fetch(&mut conn, Bystander::DOC).await),
        Some(ErrorCode::AccessDenied)
    );
    assert_eq!(
        denied(presence(&mut conn, Bystander::DOC).await),
        Some(ErrorCode::AccessDenied)
    );
    bystander.served().await;
    // Nothing of the bystander's document reached this connection, and the session
    // still serves the document its token names.
    open(&mut conn, "a").await.unwrap();
    submit(&mut conn, "a", 1, 0).await.unwrap();
    assert_eq!(fetch(&mut conn, "a").await, None);
    assert_eq!(presence(&mut conn, "a").await, None);
    bystander.served().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_token_grants_ids_below_it_and_not_a_sibling_that_starts_alike() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let all = mint(SECRET, "*", Access::Write);
    let mut bystander = Bystander::new(server.addr, &all).await;
    // The sibling exists, with text in it.
    let mut owner = Connection::connect(server.addr, 0, &all).await.unwrap();
    open(&mut owner, "notes-private").await.unwrap();
    submit(&mut owner, "notes-private", 1, 0).await.unwrap();

    let mut conn = Connection::connect(server.addr, 0, &mint(SECRET, "notes/*", Access::Write))
        .await
        .unwrap();
    for doc in ["notes/a", "notes/b/c"] {
        open(&mut conn, doc).await.unwrap();
        submit(&mut conn, doc, 1, 0).await.unwrap();
    }
    for doc in ["notes-private", "notes", "notes/"] {
        let (code, message) = open(&mut conn, doc).await.unwrap_err();
        assert_eq!(code, ErrorCode::AccessDenied, "{doc}: {message}");
        assert_eq!(
            fetch(&mut conn, doc).await.unwrap().0,
            ErrorCode::AccessDenied
        );
        bystander.served().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_opens_and_receives_but_its_submit_is_refused_with_code_31() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    bystander.served().await;
    let mut reader =
        Connection::connect(server.addr, 0, &mint(SECRET, Bystander::DOC, Access::Read))
            .await
            .unwrap();
    open(&mut reader, Bystander::DOC).await.unwrap();
    // It receives the writer's ops.
    bystander.served().await;
    loop {
        if let Message::Remote { doc, op } = reader.recv().await.unwrap().message {
            assert_eq!((doc.as_str(), op.seq), (Bystander::DOC, 2));
            break;
        }
    }
    let (code, message) = submit(&mut reader, Bystander::DOC, 1, 2).await.unwrap_err();
    assert_eq!(code, ErrorCode::ReadOnly, "{message}");
    // Its session goes on (it may still fetch and show its cursor), and the document
    // holds only the writer's ops.
    assert_eq!(fetch(&mut reader, Bystander::DOC).await, None);
    assert_eq!(presence(&mut reader, Bystander::DOC).await, None);
    bystander.served().await;
    assert_eq!(bystander.version, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_secret_is_accepted_while_configured_second_and_refused_once_removed() {
    let dir = tempfile::tempdir().unwrap();
    let config = |secrets: &[&str]| ServerConfig {
        keys: Some(Arc::new(Keys::new(secrets).unwrap())),
        ..ServerConfig::default()
    };
    let old_token = mint(OLD, "*", Access::Write);
    let new_token = mint(SECRET, "*", Access::Write);

    // During the rotation both verify.
    let server = start_with(dir.path(), config(&[SECRET, OLD])).await;
    let mut bystander = Bystander::new(server.addr, &new_token).await;
    let mut old = Connection::connect(server.addr, 0, &old_token)
        .await
        .unwrap();
    open(&mut old, "d").await.unwrap();
    submit(&mut old, "d", 1, 0).await.unwrap();
    bystander.served().await;
    drop((old, bystander));
    server.stop().await;

    // The previous secret removed: its tokens are refused, the current ones served.
    let server = start_with(dir.path(), config(&[SECRET])).await;
    let mut bystander = Bystander::new(server.addr, &new_token).await;
    bystander.version = 1;
    assert_eq!(
        refused_at_hello(server.addr, &old_token).await,
        ErrorCode::InvalidToken
    );
    bystander.served().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_and_an_existing_document_are_refused_alike() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    bystander.served().await;
    let mut conn = Connection::connect(server.addr, 0, &mint(SECRET, "mine", Access::Write))
        .await
        .unwrap();
    // Everything a refusal says, with the id asked for taken out.
    let mut said = Vec::new();
    for doc in [Bystander::DOC, "nobody-wrote-this"] {
        let anonymised = |(code, message): (ErrorCode, String)| (code, message.replace(doc, "#"));
        said.push(vec![
            anonymised(open(&mut conn, doc).await.unwrap_err()),
            anonymised(submit(&mut conn, doc, 1, 0).await.unwrap_err()),
            anonymised(fetch(&mut conn, doc).await.unwrap()),
            anonymised(presence(&mut conn, doc).await.unwrap()),
        ]);
    }
    assert_eq!(said[0], said[1]);
    assert!(said[0]
        .iter()
        .all(|(code, _)| *code == ErrorCode::AccessDenied));
    bystander.served().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reports_a_refusal_of_its_token_and_stops_instead_of_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SECRET).await;
    let mut bystander = Bystander::new(server.addr, &mint(SECRET, "*", Access::Write)).await;
    let failed = |client: &Client| match client.state() {
        ConnectionState::Failed { code, .. } => Some(code),
        _ => None,
    };

    // A document its token does not name: `open` fails with the code.
    let client =
        Client::connect(client_config(server.addr).token(mint(SECRET, "a", Access::Write)))
            .await
            .unwrap();
    client.wait_connected().await.unwrap();
    match client.open("b").await {
        Err(quire::client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::AccessDenied)
        }
        Ok(_) => panic!("opened a document the token does not name"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(failed(&client), Some(ErrorCode::AccessDenied));
    client.shutdown().await;
    bystander.served().await;

    // A read-only token that edits: the edit stays local, the client stops.
    let client = Client::connect(client_config(server.addr).token(mint(SECRET, "r", Access::Read)))
        .await
        .unwrap();
    let doc = client.open("r").await.unwrap();
    doc.edit(&[Patch::new(0, 0, "mine")]).await.unwrap();
    match doc.synced().await {
        Err(quire::client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::ReadOnly)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(failed(&client), Some(ErrorCode::ReadOnly));
    assert_eq!(doc.text(), "mine");
    client.shutdown().await;
    bystander.served().await;

    // An expired token: refused at the handshake, for good.
    let client = Client::connect(client_config(server.addr).token(mint_until(
        SECRET,
        "*",
        Access::Write,
        now_unix_secs() - 60,
    )))
    .await
    .unwrap();
    match client.wait_connected().await {
        Err(quire::client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, ErrorCode::TokenExpired)
        }
        other => panic!("{other:?}"),
    }
    client.shutdown().await;
    bystander.served().await;
    server.stop().await;
}

/// `quire serve` without a secret on a non-loopback address exits at once, saying why.
#[test]
fn without_a_secret_the_server_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("QUIRE_SECRET")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("without a secret"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "it opened no storage");
}

/// `quire token` prints a token that the server's secret verifies to what was asked.
#[test]
fn quire_token_mints_what_it_is_asked_for() {
    let before = now_unix_secs();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["token", "--doc", "notes/*", "--write", "--ttl", "1h"])
        .args(["--subject", "alice", "--secret", SECRET])
        .env_remove("QUIRE_SECRET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = now_unix_secs();
    let token = String::from_utf8(out.stdout).unwrap();
    let grant = Keys::new(&[SECRET])
        .unwrap()
        .verify(token.trim(), after)
        .unwrap();
    assert_eq!(grant.scope.to_string(), "notes/*");
    assert_eq!(grant.access, Access::Write);
    assert_eq!(grant.subject, "alice");
    // An hour from when it was minted.
    assert!((before + 3600..=after + 3600).contains(&grant.expires_unix_secs));
}
