//! One client connection: handshake, then requests in, replies and broadcasts out.
//!
//! Reading and decoding happen here; writing is a separate task that drains the
//! session's bounded outbox, coalescing whatever is queued into one write. A malformed
//! stream gets an `Error` and the connection is closed; a bad request on a good stream
//! gets a `Reject` or `Error` and the session goes on. Nothing a client sends can affect
//! another client, except through the ops it is allowed to submit.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{Decoder, Encoder};

use super::document::{Document, Outbox, Submission, SubmitOutcome};
use super::durability::Action;
use super::Server;
use crate::op::validate_doc_id;
use crate::protocol::frame::{FrameCodec, FrameError};
use crate::protocol::message::{Envelope, ErrorCode, Message};
use crate::protocol::PROTOCOL_VERSION;
use crate::sequencer::Sequencer;

fn reply(request_id: u32, message: Message) -> Arc<Envelope> {
    Arc::new(Envelope {
        request_id,
        message,
    })
}

fn error(code: ErrorCode, message: impl Into<String>) -> Arc<Envelope> {
    reply(
        0,
        Message::Error {
            code,
            message: message.into(),
        },
    )
}

/// Writes queued frames until the outbox closes.
async fn write_loop(
    mut socket: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Arc<Envelope>>,
    max_frame: usize,
) {
    let mut codec = FrameCodec::new(max_frame);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(env) = rx.recv().await {
        if codec.encode(&env, &mut buf).is_err() {
            break;
        }
        // Coalesce what else is queued into the same write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(env) => {
                    if codec.encode(&env, &mut buf).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if socket.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
    let _ = socket.shutdown().await;
}

pub async fn run<S: Sequencer>(server: Arc<Server<S>>, stream: TcpStream, session: u64) {
    let _ = stream.set_nodelay(true);
    let max_frame = server.config.max_frame;
    let (mut reader, writer) = stream.into_split();
    let (tx, rx) = mpsc::channel(server.config.outbox_capacity);
    let writer = tokio::spawn(write_loop(writer, rx, max_frame));
    let kick = Arc::new(Notify::new());
    let mut codec = FrameCodec::new(max_frame);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut client_id: Option<u64> = None;
    let mut opened: HashMap<Arc<str>, Arc<Document>> = HashMap::new();
    let mut shutdown = server.shutdown.subscribe();

    'conn: loop {
        // Decode every complete frame already buffered.
        loop {
            let env = match codec.decode(&mut buf) {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(e) => {
                    let code = match &e {
                        FrameError::TooLarge => ErrorCode::FrameTooLarge,
                        other => other.code(),
                    };
                    let _ = tx.send(error(code, e.to_string())).await;
                    break 'conn;
                }
            };
            let Some(client) = client_id else {
                match hello(&server, env) {
                    Ok((id, welcome)) => {
                        client_id = Some(id);
                        let _ = tx.send(welcome).await;
                        continue;
                    }
                    Err(err) => {
                        let _ = tx.send(err).await;
                        break 'conn;
                    }
                }
            };
            let outbox = Outbox {
                session,
                client_id: client,
                tx: tx.clone(),
                kick: kick.clone(),
            };
            if !handle(&server, &outbox, &mut opened, env).await {
                break 'conn;
            }
        }
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = kick.notified() => {
                tracing::info!(session, "disconnecting a client that does not read its messages");
                break;
            }
            _ = shutdown.recv() => break,
        }
    }
    for doc in opened.values() {
        doc.unsubscribe(session, client_id.unwrap_or(0));
        server.release(doc);
    }
    drop(tx);
    let _ = writer.await;
}

fn hello<S: Sequencer>(
    server: &Server<S>,
    env: Envelope,
) -> Result<(u64, Arc<Envelope>), Arc<Envelope>> {
    match env.message {
        Message::Hello {
            version,
            client_id,
            token,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(error(
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
                ));
            }
            if token != server.config.token {
                return Err(error(ErrorCode::WrongToken, "wrong access token"));
            }
            Ok((
                client_id,
                reply(
                    env.request_id,
                    Message::Welcome {
                        version: PROTOCOL_VERSION,
                        max_frame: server.config.max_frame as u32,
                    },
                ),
            ))
        }
        _ => Err(error(
            ErrorCode::HandshakeRequired,
            "the first message must be Hello",
        )),
    }
}

/// Handles one request. Returns false when the connection must close.
async fn handle<S: Sequencer>(
    server: &Arc<Server<S>>,
    outbox: &Outbox,
    opened: &mut HashMap<Arc<str>, Arc<Document>>,
    env: Envelope,
) -> bool {
    let rid = env.request_id;
    let doc_error = |doc: &str| -> Option<Arc<Envelope>> {
        validate_doc_id(doc).err().map(|e| {
            reply(
                rid,
                Message::Error {
                    code: ErrorCode::InvalidDocId,
                    message: e,
                },
            )
        })
    };
    match env.message {
        Message::Open { doc, known_version } => {
            if let Some(err) = doc_error(&doc) {
                return outbox.send(err);
            }
            let document = server.subscribe(&doc, outbox.clone()).await;
            opened.insert(document.id.clone(), document.clone());
            let catch_up = (known_version > 0)
                .then(|| server.sequencer.ops_after(&doc, known_version, usize::MAX))
                .flatten();
            match catch_up {
                Some(ops) => {
                    let ops = ops.into_iter().map(super::wire_op).collect();
                    outbox.send(reply(
                        rid,
                        Message::Ops {
                            doc: doc.clone(),
                            ops,
                        },
                    ));
                }
                None => {
                    let view = server.sequencer.read(&doc).await;
                    let (text, version) = view.map_or((String::new(), 0), |v| (v.text, v.version));
                    outbox.send(reply(
                        rid,
                        Message::Snapshot {
                            doc: doc.clone(),
                            version,
                            text,
                        },
                    ));
                    outbox.send(reply(
                        rid,
                        Message::Ops {
                            doc: doc.clone(),
                            ops: Vec::new(),
                        },
                    ));
                }
            }
            document.activate(outbox.session);
            true
        }
        Message::Submit {
            doc,
            local_seq,
            base_version,
            patches,
        } => {
            let Some(document) = opened.get(doc.as_str()).cloned() else {
                return outbox.send(reply(
                    rid,
                    Message::Reject {
                        doc,
                        local_seq,
                        code: ErrorCode::UnknownDocument,
                        message: "open the document before submitting to it".into(),
                    },
                ));
            };
            let outcome = document.submit(
                &*server.sequencer,
                Submission {
                    session: outbox.session,
                    request_id: rid,
                    client_id: outbox.client_id,
                    local_seq,
                    base_version,
                    patches,
                },
            );
            match outcome {
                // Acks and broadcasts leave only once the op is durable.
                SubmitOutcome::Applied { seq, ticket } => server.durable.push(
                    ticket,
                    Action::Deliver {
                        document,
                        seq,
                        outbox: outbox.clone(),
                        request_id: rid,
                        local_seq,
                    },
                ),
                SubmitOutcome::Duplicate { seq, ticket } => server.durable.push(
                    ticket,
                    Action::AckDuplicate {
                        doc: document.id.clone(),
                        outbox: outbox.clone(),
                        request_id: rid,
                        local_seq,
                        seq: seq.unwrap_or(0),
                    },
                ),
                SubmitOutcome::Rejected(code, message) => {
                    outbox.send(reply(
                        rid,
                        Message::Reject {
                            doc,
                            local_seq,
                            code,
                            message,
                        },
                    ));
                }
            }
            true
        }
        Message::Fetch {
            doc,
            after_seq,
            limit,
        } => {
            if let Some(err) = doc_error(&doc) {
                return outbox.send(err);
            }
            let message = match server.sequencer.ops_after(&doc, after_seq, limit as usize) {
                Some(ops) => Message::Ops {
                    doc,
                    ops: ops.into_iter().map(super::wire_op).collect(),
                },
                None => Message::Reload {
                    doc,
                    reason: format!("ops after seq {after_seq} are no longer kept"),
                },
            };
            outbox.send(reply(rid, message))
        }
        Message::Presence { doc, selections } => {
            if let Some(document) = opened.get(doc.as_str()) {
                document.presence(outbox.session, outbox.client_id, selections);
            }
            true
        }
        Message::Close { doc } => {
            if let Some(document) = opened.remove(doc.as_str()) {
                document.unsubscribe(outbox.session, outbox.client_id);
                server.release(&document);
            }
            true
        }
        Message::Ping { nonce } => outbox.send(reply(rid, Message::Pong { nonce })),
        Message::Hello { .. } => {
            outbox.send(error(ErrorCode::Malformed, "Hello after the handshake"));
            false
        }
        other => {
            outbox.send(error(
                ErrorCode::UnknownType,
                format!("type {:#04x} is not a request", other.type_byte()),
            ));
            false
        }
    }
}
