//! The WebSocket transport over a real HTTP listener: the same frames, handshake and
//! limits as TCP, one frame per binary message; bad input refused with the codes TCP
//! gives it, a bystander unaffected; origins checked; the server's pings.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use quire::op::Patch;
use quire::protocol::message::{Envelope, ErrorCode, Message};
use quire::protocol::PROTOCOL_VERSION;
use quire::sequencer::local::LocalSequencer;
use quire::server::transport::Both;
use quire::server::{Server, ServerConfig};
use quire::web::WebConfig;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A server with both listeners: TCP at `tcp`, HTTP (`/ws`) at `http`.
struct Running {
    tcp: SocketAddr,
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    store: Arc<LocalSequencer>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
        self.store.close();
    }
}

async fn start(dir: &std::path::Path, config: ServerConfig, mut web: WebConfig) -> Running {
    let (store, _) = LocalSequencer::open(dir, common::store_config()).unwrap();
    let store = Arc::new(store);
    let tcp_listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tcp = tcp_listener.local_addr().unwrap();
    let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_listener.local_addr().unwrap();
    web.max_frame = config.max_frame;
    let (handoff, acceptor) = quire::server::websocket::acceptor();
    let (web_stop_tx, web_stop_rx) = oneshot::channel::<()>();
    let web_task = tokio::spawn(quire::web::serve(http_listener, web, handoff, async move {
        let _ = web_stop_rx.await;
    }));
    let server = Server::new(store.clone(), config);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        server
            .serve(Both::new(tcp_listener, acceptor), async move {
                let _ = rx.await;
            })
            .await;
        let _ = web_stop_tx.send(());
        let _ = web_task.await;
    });
    Running {
        tcp,
        http,
        stop: Some(tx),
        task,
        store,
    }
}

fn web_config() -> WebConfig {
    WebConfig::new(ServerConfig::default().max_frame, 100)
}

/// A frame as protocol.md gives it: length field, then the envelope.
fn frame(request_id: u32, message: Message) -> Vec<u8> {
    let body = Envelope {
        request_id,
        message,
    }
    .encode();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

async fn connect(http: SocketAddr, origin: Option<&str>) -> Result<Socket, u16> {
    let mut request = format!("ws://{http}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect: {e}"),
    }
}

async fn send(ws: &mut Socket, request_id: u32, message: Message) {
    ws.send(Ws::Binary(Bytes::from(frame(request_id, message))))
        .await
        .unwrap();
}

/// The next frame the server sends, checked to be one whole frame per message; `None`
/// once the connection ends.
async fn recv(ws: &mut Socket) -> Option<Envelope> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server answers within 10 s");
        match message {
            Some(Ok(Ws::Binary(bytes))) => {
                let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
                assert_eq!(len, bytes.len() - 4, "one frame per message");
                return Some(Envelope::decode(&bytes[4..]).unwrap());
            }
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(other)) => panic!("the server sent {other:?}"),
        }
    }
}

async fn hello(ws: &mut Socket) -> u64 {
    send(
        ws,
        1,
        Message::Hello {
            version: PROTOCOL_VERSION,
            client_id: 0,
            token: String::new(),
        },
    )
    .await;
    match recv(ws).await.unwrap().message {
        Message::Welcome { client_id, .. } => client_id,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// Opens `doc` and reads the reply to its end (the last `Ops` frame).
async fn open(ws: &mut Socket, request_id: u32, doc: &str) {
    send(
        ws,
        request_id,
        Message::Open {
            doc: doc.into(),
            known_version: 0,
        },
    )
    .await;
    loop {
        match recv(ws).await.unwrap().message {
            Message::Ops { more: false, .. } => return,
            Message::Error { code, message } => panic!("open refused: {code:?} {message}"),
            _ => continue,
        }
    }
}

/// The `Error` that ends the connection, and that it then ends.
async fn closing_error(ws: &mut Socket) -> ErrorCode {
    loop {
        match recv(ws).await.expect("an Error before the end").message {
            Message::Error { code, .. } => {
                assert!(recv(ws).await.is_none(), "closed after the Error");
                return code;
            }
            _ => continue,
        }
    }
}

/// A TCP client on another document, served before and after.
async fn bystander_served(tcp: SocketAddr, doc: &str, n: u32) {
    let opened = common::open(tcp, doc).await;
    opened.doc.edit(&[Patch::new(0, 0, "b")]).await.unwrap();
    opened.settle().await;
    assert_eq!(opened.doc.text().chars().count(), n as usize);
    opened.close().await;
}

#[tokio::test]
async fn a_websocket_client_and_a_tcp_client_edit_one_document_and_converge() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    open(&mut ws, 2, "shared").await;
    send(
        &mut ws,
        3,
        Message::Submit {
            doc: "shared".into(),
            local_seq: 1,
            base_version: 0,
            patches: vec![Patch::new(0, 0, "héllo 😀")],
        },
    )
    .await;
    loop {
        match recv(&mut ws).await.unwrap().message {
            Message::Ack { seq, local_seq, .. } => {
                assert_eq!((seq, local_seq), (1, 1));
                break;
            }
            Message::Ops { .. } | Message::Snapshot { .. } => continue,
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    // A TCP client sees it, and its own edit reaches the WebSocket client.
    let tcp = common::open(server.tcp, "shared").await;
    common::wait_for_version(&tcp.doc, 1).await;
    assert_eq!(tcp.doc.text(), "héllo 😀");
    tcp.doc.edit(&[Patch::new(7, 0, "!")]).await.unwrap();
    tcp.settle().await;
    loop {
        match recv(&mut ws).await.unwrap().message {
            Message::Remote { op, .. } => {
                assert_eq!(op.seq, 2);
                assert_eq!(op.patches, vec![Patch::new(7, 0, "!")]);
                break;
            }
            _ => continue,
        }
    }
    tcp.close().await;
    assert_eq!(
        common::read_back(server.tcp, "shared").await,
        ("héllo 😀!".to_string(), 2)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_text_message_is_refused_as_malformed_and_a_bystander_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    bystander_served(server.tcp, "bystander", 1).await;
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    ws.send(Ws::text("hello")).await.unwrap();
    assert_eq!(closing_error(&mut ws).await, ErrorCode::Malformed);
    // Before the handshake too.
    let mut ws = connect(server.http, None).await.unwrap();
    ws.send(Ws::text("hello")).await.unwrap();
    assert_eq!(closing_error(&mut ws).await, ErrorCode::Malformed);
    bystander_served(server.tcp, "bystander", 2).await;
    server.stop().await;
}

/// The next WebSocket message that is not a Ping or Pong; `None` once the connection
/// ends without one.
async fn next_control(ws: &mut Socket) -> Option<Ws> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server answers within 10 s");
        match message {
            Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => continue,
            Some(Ok(message)) => return Some(message),
            None | Some(Err(_)) => return None,
        }
    }
}

/// The closing handshake of RFC 6455 both ways, as protocol.md promises: a client's
/// Close is answered with a Close (a browser otherwise reports code 1006, an abnormal
/// end), and an Error the server ends a connection with is followed by its Close.
/// Found from outside (32nd session): the server closed TCP without a Close.
#[tokio::test]
async fn the_server_answers_a_close_with_a_close_and_closes_after_an_error_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    // The client closes, after the handshake and before it.
    for handshake in [true, false] {
        let mut ws = connect(server.http, None).await.unwrap();
        if handshake {
            hello(&mut ws).await;
            open(&mut ws, 2, "d").await;
        }
        ws.send(Ws::Close(None)).await.unwrap();
        let answer = next_control(&mut ws).await;
        assert!(
            matches!(answer, Some(Ws::Close(_))),
            "a Close answers a Close (handshake {handshake}): {answer:?}"
        );
    }
    // The server closes after an Error.
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    ws.send(Ws::text("hello")).await.unwrap();
    loop {
        match next_control(&mut ws).await {
            Some(Ws::Binary(_)) => continue,
            Some(Ws::Close(_)) => break,
            other => panic!("a Close after the Error, got {other:?}"),
        }
    }
    bystander_served(server.tcp, "bystander", 1).await;
    server.stop().await;
}

/// An upgraded connection with no WebSocket layer on the client's side, to send what
/// a WebSocket client library never would.
async fn raw_upgrade(http: SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A WebSocket frame of RFC 6455 with a payload under 64 KiB: `first` is its FIN bit and
/// opcode; masked with a fixed key, or not.
fn raw_frame(first: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mask = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    if payload.len() < 126 {
        out.push(payload.len() as u8 | mask);
    } else {
        out.push(126 | mask);
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// The next frame from the server that is not a Ping or Pong, as (opcode, payload);
/// `None` once the connection ends.
async fn raw_next(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut head = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
            .await
            .expect("the server answers within 10 s");
        if read.is_err() {
            return None;
        }
        let len = match head[1] & 0x7f {
            126 => stream.read_u16().await.unwrap() as usize,
            127 => stream.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        assert_eq!(head[1] & 0x80, 0, "the server does not mask");
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        let opcode = head[0] & 0x0f;
        if opcode != 0x9 && opcode != 0xA {
            return Some((opcode, payload));
        }
    }
}

/// A message that breaks the WebSocket framing itself (RFC 6455: an unmasked frame
/// from a client, a reserved opcode or bit, a continuation of nothing, a control frame
/// over 125 bytes or in fragments) gets the `Error` a bad frame gets (`Malformed`),
/// then a Close; it ended the connection without a word. Found from outside (32nd
/// session).
#[tokio::test]
async fn a_message_that_breaks_websocket_framing_gets_malformed_then_a_close() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    let ping = frame(5, Message::Ping { nonce: 1 });
    for (what, bad) in [
        ("an unmasked frame", raw_frame(0x82, false, &ping)),
        ("a reserved opcode", raw_frame(0x83, true, &ping)),
        ("a reserved bit", raw_frame(0xC2, true, &ping)),
        ("a continuation of nothing", raw_frame(0x80, true, &ping)),
        ("a Ping of 126 bytes", raw_frame(0x89, true, &[7; 126])),
        ("a Ping in fragments", raw_frame(0x09, true, b"part")),
    ] {
        let mut stream = raw_upgrade(server.http).await;
        stream.write_all(&bad).await.unwrap();
        let (opcode, payload) = raw_next(&mut stream).await.expect("an answer");
        assert_eq!(opcode, 0x2, "{what}: a binary message first");
        let envelope = Envelope::decode(&payload[4..]).unwrap();
        assert!(
            matches!(
                envelope.message,
                Message::Error {
                    code: ErrorCode::Malformed,
                    ..
                }
            ),
            "{what}: {envelope:?}"
        );
        let close = raw_next(&mut stream).await;
        assert_eq!(close.map(|c| c.0), Some(0x8), "{what}: then a Close");
    }
    bystander_served(server.tcp, "bystander", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_that_is_not_exactly_one_frame_is_refused_as_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    let ping = frame(5, Message::Ping { nonce: 1 });
    let cases: Vec<Vec<u8>> = vec![
        // Two frames in one message.
        [ping.clone(), ping.clone()].concat(),
        // Half a frame.
        ping[..ping.len() - 1].to_vec(),
        // Shorter than a length field.
        vec![1, 0],
    ];
    for bad in cases {
        let mut ws = connect(server.http, None).await.unwrap();
        hello(&mut ws).await;
        ws.send(Ws::Binary(Bytes::from(bad))).await.unwrap();
        assert_eq!(closing_error(&mut ws).await, ErrorCode::Malformed);
    }
    // Garbage in a well-formed frame after the handshake: the error TCP gives it.
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    let garbage = [5u32.to_le_bytes().to_vec(), vec![0xEE, 1, 2, 3, 4]].concat();
    ws.send(Ws::Binary(Bytes::from(garbage))).await.unwrap();
    let code = closing_error(&mut ws).await;
    assert!(
        matches!(code, ErrorCode::UnknownType | ErrorCode::Malformed),
        "{code:?}"
    );
    bystander_served(server.tcp, "bystander", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_frame_limit_is_refused_with_frame_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_frame: 4096,
        outbox_bytes: 64 << 10,
        ..ServerConfig::default()
    };
    let server = start(dir.path(), config, web_config()).await;
    // At the limit: a Submit frame of exactly 4096 bytes is served (an Ack or Reject,
    // and the session goes on).
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    open(&mut ws, 2, "d").await;
    let fill = |n: usize| Message::Submit {
        doc: "d".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "x".repeat(n))],
    };
    let overhead = frame(3, fill(0)).len() - 4;
    let at_limit = frame(3, fill(4096 - overhead));
    assert_eq!(at_limit.len(), 4 + 4096);
    ws.send(Ws::Binary(Bytes::from(at_limit))).await.unwrap();
    match recv(&mut ws).await.unwrap().message {
        Message::Ack { .. } | Message::Reject { .. } => {}
        other => panic!("a frame at the limit is served: {other:?}"),
    }
    send(&mut ws, 4, Message::Ping { nonce: 4 }).await;
    assert!(matches!(
        recv(&mut ws).await.unwrap().message,
        Message::Pong { nonce: 4 }
    ));
    // One byte past it: refused, closed.
    let past = frame(5, fill(4097 - overhead));
    ws.send(Ws::Binary(Bytes::from(past))).await.unwrap();
    assert_eq!(closing_error(&mut ws).await, ErrorCode::FrameTooLarge);
    // A message far past it, refused before its body is taken.
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    let _ = ws.send(Ws::Binary(Bytes::from(vec![0u8; 1 << 20]))).await;
    assert_eq!(closing_error(&mut ws).await, ErrorCode::FrameTooLarge);
    bystander_served(server.tcp, "bystander", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn origins_other_than_its_own_and_the_allowed_ones_are_refused_with_403() {
    let dir = tempfile::tempdir().unwrap();
    let mut web = web_config();
    web.allowed_origins = vec!["https://notes.example".into()];
    let server = start(dir.path(), ServerConfig::default(), web).await;
    assert_eq!(
        connect(server.http, Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    let own = format!("http://{}", server.http);
    for origin in [None, Some("https://notes.example"), Some(own.as_str())] {
        let mut ws = connect(server.http, origin).await.unwrap();
        hello(&mut ws).await;
    }
    bystander_served(server.tcp, "bystander", 1).await;
    server.stop().await;
}

#[tokio::test]
async fn the_server_pings_an_idle_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let mut web = web_config();
    web.ping_every = Duration::from_millis(50);
    let server = start(dir.path(), ServerConfig::default(), web).await;
    let mut ws = connect(server.http, None).await.unwrap();
    hello(&mut ws).await;
    let ping = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Ok(Ws::Ping(_))) = ws.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "a Ping within 10 s");
    server.stop().await;
}

#[tokio::test]
async fn websocket_connections_count_against_the_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = start(dir.path(), config, web_config()).await;
    let mut first = connect(server.http, None).await.unwrap();
    hello(&mut first).await;
    let mut second = connect(server.http, None).await.unwrap();
    assert_eq!(closing_error(&mut second).await, ErrorCode::Busy);
    send(&mut first, 9, Message::Ping { nonce: 9 }).await;
    assert!(matches!(
        recv(&mut first).await.unwrap().message,
        Message::Pong { nonce: 9 }
    ));
    server.stop().await;
}

/// The Rust client's WebSocket stream (`quire::client::websocket`): a `Connection` over
/// it handshakes, opens, submits and is acknowledged like one over TCP.
#[tokio::test]
async fn a_connection_over_the_clients_websocket_stream_is_served_like_tcp() {
    use quire::client::connection::Connection;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    let stream = quire::client::websocket::connect(&format!("ws://{}/ws", server.http))
        .await
        .unwrap();
    let mut conn = Connection::handshake(stream, 0, "").await.unwrap();
    assert_ne!(conn.client_id, 0, "the server gave an id");
    conn.send(Message::Open {
        doc: "rust-ws".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    while !matches!(
        conn.recv().await.unwrap().message,
        Message::Ops { more: false, .. }
    ) {}
    conn.send(Message::Submit {
        doc: "rust-ws".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "𝄞 over ws")],
    })
    .await
    .unwrap();
    match conn.recv().await.unwrap().message {
        Message::Ack { seq: 1, .. } => {}
        other => panic!("expected Ack, got {other:?}"),
    }
    assert_eq!(
        common::read_back(server.tcp, "rust-ws").await,
        ("𝄞 over ws".to_string(), 1)
    );
    server.stop().await;
}

/// The client's WebSocket stream keeps its errors' kinds: a server that breaks RFC
/// 6455's framing (here a reserved opcode) is `InvalidData`, as a server's text message
/// is; a connection reset is `ConnectionReset`; a server gone without a Close (its
/// process killed) `UnexpectedEof` (all three were `Other`, which told a caller
/// nothing); over a connection made by the caller (`connect_over`) as over one it makes
/// itself (`connect`).
#[tokio::test]
async fn the_clients_websocket_stream_reports_broken_framing_as_invalid_data_and_a_reset_as_one() {
    use std::io::ErrorKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("ws://{addr}/ws");
    let cases = [
        ErrorKind::InvalidData,
        ErrorKind::ConnectionReset,
        ErrorKind::UnexpectedEof,
    ];
    // A fake server: the handshake, then a frame with opcode 3 (reserved), a reset, or
    // an end without a Close.
    let fake = tokio::spawn(async move {
        for case in cases {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let tcp = ws.get_mut();
            match case {
                ErrorKind::InvalidData => tcp.write_all(&[0x83, 0x00]).await.unwrap(),
                ErrorKind::ConnectionReset => tcp.set_zero_linger().unwrap(),
                _ => {}
            }
            // Held until the client has read what it got.
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(ws);
        }
    });
    let mut buf = [0u8; 64];
    for (i, case) in cases.into_iter().enumerate() {
        let mut stream = if i == 0 {
            quire::client::websocket::connect(&url).await.unwrap()
        } else {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
            quire::client::websocket::connect_over(tcp, &url)
                .await
                .unwrap()
        };
        let e = match stream.read(&mut buf).await {
            Err(e) => e,
            Ok(n) => panic!("{case:?}: read {n} bytes"),
        };
        assert_eq!(e.kind(), case, "{e}");
    }
    fake.await.unwrap();
}

/// A plain HTTP/1.1 GET: the status, the headers (lowercase names) and the body.
async fn http_get(http: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the end of the headers");
    let head = String::from_utf8(response[..split].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), response[split + 4..].to_vec())
}

#[tokio::test]
async fn the_demo_page_and_its_script_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), ServerConfig::default(), web_config()).await;
    let (status, head, body) = http_get(server.http, "/").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    let page = String::from_utf8(body).unwrap();
    assert!(
        page.contains(r#"<script src="/demo.js"></script>"#),
        "{page}"
    );
    assert_eq!(
        page.as_bytes(),
        std::fs::read("clients/js/demo/dist/index.html").unwrap()
    );
    let (status, head, body) = http_get(server.http, "/demo.js").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert_eq!(body, std::fs::read("clients/js/demo/dist/demo.js").unwrap());
    assert!(body.len() > 10_000, "the bundle, not a placeholder");
    let (status, _, _) = http_get(server.http, "/nothing-here").await;
    assert_eq!(status, 404);
    // The WebSocket is still served next to the page.
    let mut ws = connect(server.http, Some(&format!("http://{}", server.http)))
        .await
        .unwrap();
    hello(&mut ws).await;
    server.stop().await;
}
