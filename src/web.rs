//! The HTTP listener for browsers (`quire serve --http-listen ADDR`): `GET /ws` upgrades
//! to a WebSocket that carries the protocol's frames (protocol.md, "WebSocket") and is
//! handed to the server's accept loop, to be served by the same session code as a TCP
//! connection ([`crate::server::websocket`]). `GET /` serves a demo page (CodeMirror
//! on a document, from `clients/js/demo`, built into `clients/js/demo/dist` and embedded
//! at compile time) with its script at `GET /demo.js`.
//!
//! Limits: at most [`WebConfig::max_connections`] HTTP connections at once (more wait
//! in the listen backlog), each closed after [`WebConfig::idle`] without a byte moved
//! either way (the server's WebSocket pings keep a healthy idle connection moving);
//! a WebSocket message is at most one frame of the server's frame limit.
//!
//! Origins: a browser names the page that opens a WebSocket in `Origin`, and any page
//! may try to open one to any server, so an upgrade is served only when it has no
//! `Origin` (not a browser), its `Origin` is this listener's own (the page it serves),
//! or the origin is allowed (`--allowed-origin`, `*` for any); others get 403.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::server::websocket::{WsConn, WsHandoff, WS_PING_INTERVAL};

/// The HTTP listener's settings.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// Origins whose pages may open a WebSocket (`https://notes.example.com`), or `*`.
    /// A page of this listener's own origin always may.
    pub allowed_origins: Vec<String>,
    /// The server's frame limit: a WebSocket message is at most one frame.
    pub max_frame: usize,
    /// HTTP connections (WebSocket ones included) served at once.
    pub max_connections: usize,
    /// A connection that moves no byte either way for this long is closed.
    pub idle: Duration,
    /// How often the server pings each WebSocket.
    pub ping_every: Duration,
}

impl WebConfig {
    /// The defaults of `quire serve`, for a server with this frame and connection limit.
    pub fn new(max_frame: usize, max_connections: usize) -> WebConfig {
        WebConfig {
            allowed_origins: Vec::new(),
            max_frame,
            max_connections,
            idle: WEB_IDLE_TIMEOUT,
            ping_every: WS_PING_INTERVAL,
        }
    }
}

/// What a WebSocket reads at once, and holds while idle.
pub const WS_READ_BUFFER: usize = 8 << 10;

/// An HTTP connection (a WebSocket included) that moves no byte either way for this
/// long is closed: three of the server's pings missed.
pub const WEB_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

struct Web {
    config: WebConfig,
    handoff: WsHandoff,
}

/// The demo page (clients/js/demo), built by `npm run build:demo` and checked in.
const DEMO_HTML: &str = include_str!("../clients/js/demo/dist/index.html");
const DEMO_JS: &str = include_str!("../clients/js/demo/dist/demo.js");

/// The routes: `GET /ws`, and the demo page at `GET /` (with its script, `GET /demo.js`).
pub fn router(config: WebConfig, handoff: WsHandoff) -> Router {
    Router::new()
        .route("/", get(demo_html))
        .route("/demo.js", get(demo_js))
        .route("/ws", get(upgrade))
        .with_state(Arc::new(Web { config, handoff }))
}

/// Serves the routes on `listener` until `stop` resolves, within the bounds of `config`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: WebConfig,
    handoff: WsHandoff,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, config, handoff, stop).await
}

/// [`serve`] on any listener of connections (the deterministic simulator's in-memory
/// network), within the same bounds: at most [`WebConfig::max_connections`] served at
/// once, each closed after [`WebConfig::idle`] without a byte moved. Panics if either
/// is zero.
pub async fn serve_on<L>(
    listener: L,
    config: WebConfig,
    handoff: WsHandoff,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Display,
{
    let bounded = crate::bounded_http::Bounded::new(listener, config.max_connections, config.idle);
    let app = router(config, handoff).into_make_service_with_connect_info::<Peer>();
    axum::serve(Described(bounded), app)
        .with_graceful_shutdown(stop)
        .await
}

/// The peer's address as text, for the log.
#[derive(Clone, Debug)]
struct Peer(String);

/// A listener whose connections' addresses are told as [`Peer`]s, whatever their type.
struct Described<L>(L);

impl<L> axum::serve::Listener for Described<L>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Display,
{
    type Io = L::Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (L::Io, Peer) {
        let (io, addr) = self.0.accept().await;
        (io, Peer(addr.to_string()))
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        self.0.local_addr().map(|a| Peer(a.to_string()))
    }
}

impl<L> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Described<L>>>
    for Peer
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Display,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Described<L>>) -> Peer {
        stream.remote_addr().clone()
    }
}

async fn upgrade(
    State(web): State<Arc<Web>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(why) = origin_allowed(&headers, &web.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    // The WebSocket layer refuses a message over one frame before buffering its body.
    let message_limit = web.config.max_frame + 4;
    let (max_frame, ping_every) = (web.config.max_frame, web.config.ping_every);
    let web = web.clone();
    // The WebSocket layer zero-fills its read buffer's free room before each read: at
    // its default of 128 KiB that was a 128 KiB memset per small message (a fifth of
    // the server's CPU under load); a read chunk as the TCP path takes costs nothing.
    ws.read_buffer_size(WS_READ_BUFFER)
        .max_message_size(message_limit)
        .max_frame_size(message_limit)
        .write_buffer_size(128 << 10)
        .max_write_buffer_size((128 << 10) + 2 * message_limit)
        .on_upgrade(move |socket| async move {
            let conn = WsConn::new(socket, max_frame, ping_every);
            // The server's accept loop takes it (or is gone, at shutdown: dropped).
            let _ = web.handoff.send((conn, format!("ws:{peer}"))).await;
        })
}

async fn demo_html() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DEMO_HTML,
    )
}

async fn demo_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DEMO_JS,
    )
}

/// Whether a page of the request's `Origin` may open a WebSocket here; the reason if not.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| "the Origin header is not text".to_string())?;
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    // The page this listener serves: its origin's host is the one the request names.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    if host.is_some() && origin_host.is_some_and(|o| Some(o) == host) {
        return Ok(());
    }
    Err(format!(
        "pages of origin {origin} may not open a WebSocket here (quire serve \
         --allowed-origin names the origins that may)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_no_origin_own_origin_and_listed_ones_are_allowed() {
        let none: Vec<String> = Vec::new();
        assert!(origin_allowed(&headers(None, "q:1"), &none).is_ok());
        assert!(origin_allowed(&headers(Some("http://q:1"), "q:1"), &none).is_ok());
        assert!(origin_allowed(&headers(Some("http://evil:1"), "q:1"), &none).is_err());
        // A look-alike host is not the same host.
        assert!(origin_allowed(&headers(Some("http://q:1.evil"), "q:1"), &none).is_err());
        let listed = vec!["https://notes.example".to_string()];
        assert!(origin_allowed(&headers(Some("https://notes.example"), "q:1"), &listed).is_ok());
        assert!(origin_allowed(&headers(Some("https://other.example"), "q:1"), &listed).is_err());
        let any = vec!["*".to_string()];
        assert!(origin_allowed(&headers(Some("https://other.example"), "q:1"), &any).is_ok());
    }
}
