//! The admin HTTP endpoint, on a listener of its own (loopback by default): `/metrics`
//! in the Prometheus text format, `/healthz` (the process answers) and `/readyz`
//! (recovery finished, the log writable, free disk above a threshold; a JSON body says
//! why not). Built on axum: no HTTP parsing of our own.
//!
//! `/backup` takes an online backup (see `crate::backup`): `POST /backup` pins the log,
//! captures the snapshots, chooses the LSN and answers with the manifest (JSON, a
//! [`crate::backup::Started`]); `GET /backup/{id}/file/{name}` streams one file of it,
//! up to its length in the manifest, and renews the backup's lease; `DELETE
//! /backup/{id}` ends it. A backup no request touched for [`BACKUP_LEASE`] ends by
//! itself. There is no authentication: the endpoint is for the machine's operators
//! (loopback by default).
//!
//! It starts before recovery, so that `/readyz` can say "recovering" and `/metrics`
//! answers from the first second; the server is attached once the data directory is
//! open ([`Admin::serving`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::sequencer::{DocView, ReadAtError, Sequencer};
use crate::server::Server;
use crate::wal::stats::Distribution;

/// Settings of the admin endpoint.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// The data directory: its free space decides readiness, its files are the
    /// bytes-on-disk gauge.
    pub data_dir: PathBuf,
    /// Below this many free bytes on the data directory's file system, not ready.
    pub min_free_bytes: u64,
    /// The bearer token the document routes (`/docs`) require; without one they are
    /// refused (403).
    pub admin_token: Option<String>,
}

/// Documents listed per page at most (`GET /docs?limit=`).
pub const MAX_DOCS_PAGE: usize = 1000;

/// The endpoint's view of the process.
pub struct Admin<S> {
    config: AdminConfig,
    started: Instant,
    serving: OnceLock<Serving<S>>,
    backups: Mutex<Backups>,
}

/// A backup ends by itself when no request of its own came for this long: its client
/// went away, and the log is no longer held for it.
pub const BACKUP_LEASE: Duration = Duration::from_secs(60);

/// While a file is being sent, its backup's lease is renewed this often: a file that
/// takes longer than a lease to send keeps the log pinned.
const BACKUP_RENEW_EVERY: Duration = Duration::from_secs(10);

/// Bytes read from a file per chunk of a `GET /backup/{id}/file/{name}` reply.
const BACKUP_CHUNK_BYTES: usize = 256 << 10;

/// Where backups stage their snapshot links, under the data directory.
const BACKUP_STAGING_DIR: &str = "backup-staging";

#[derive(Default)]
struct Backups {
    next_id: u64,
    running: HashMap<u64, BackupSession>,
    /// Backups being started: their staging directories are theirs already.
    starting: std::collections::HashSet<u64>,
}

struct BackupSession {
    capture: crate::backup::Capture,
    staging: PathBuf,
    expires: Instant,
}

struct Serving<S> {
    server: Arc<Server<S>>,
    recovery: Duration,
}

impl<S: Sequencer> Admin<S> {
    pub fn new(config: AdminConfig) -> Arc<Self> {
        Arc::new(Admin {
            config,
            started: Instant::now(),
            serving: OnceLock::new(),
            backups: Mutex::default(),
        })
    }

    /// Recovery finished in `recovery`; `server` serves from now on.
    pub fn serving(&self, server: Arc<Server<S>>, recovery: Duration) {
        let _ = self.serving.set(Serving { server, recovery });
    }

    /// The routes, for [`serve`] or a test's own listener.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz::<S>))
            .route("/metrics", get(metrics::<S>))
            .route("/docs", get(list_docs::<S>))
            .route("/docs/{*id}", get(doc_text::<S>).delete(delete_doc::<S>))
            .route("/backup", post(backup_start::<S>))
            .route("/backup/{id}", delete(backup_end::<S>))
            .route("/backup/{id}/file/{*name}", get(backup_file::<S>))
            .with_state(self.clone())
    }

    /// Why the server is not ready; empty when it is. Reads the file system (a
    /// `statvfs`): call it off the async workers.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        match self.serving.get() {
            None => reasons.push(format!(
                "recovering the data directory (for {} s)",
                self.started.elapsed().as_secs()
            )),
            Some(serving) => {
                let storage = serving.server.sequencer.storage_stats();
                if let Some(failure) = storage.failure {
                    reasons.push(format!("the log is not writable: {failure}"));
                } else if let Some(warning) = storage.next_segment_warning {
                    reasons.push(format!(
                        "the log's next segment cannot be prepared ({warning}); the log \
                         stops when the current segment is full unless space is freed"
                    ));
                }
            }
        }
        match free_bytes(&self.config.data_dir) {
            Ok(free) if free < self.config.min_free_bytes => reasons.push(format!(
                "{free} bytes free on the data directory's file system, below the \
                 threshold of {} (--min-free-mib)",
                self.config.min_free_bytes
            )),
            Ok(_) => {}
            Err(e) => reasons.push(format!(
                "cannot read the free space of {}: {e}",
                self.config.data_dir.display()
            )),
        }
        reasons
    }
}

impl<S: Sequencer> Admin<S> {
    fn backups(&self) -> std::sync::MutexGuard<'_, Backups> {
        self.backups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a backup (blocking: file system work). Ends expired backups first, and
    /// removes staging directories no backup owns (left by an earlier process).
    fn begin_backup(&self) -> Result<crate::backup::Started, (StatusCode, String)> {
        let Some(serving) = self.serving.get() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "recovering the data directory; try again when /readyz says ready".into(),
            ));
        };
        let source = serving.server.sequencer.backup_source().ok_or((
            StatusCode::NOT_IMPLEMENTED,
            crate::backup::BackupError::Unsupported.to_string(),
        ))?;
        let root = self.config.data_dir.join(BACKUP_STAGING_DIR);
        let id = {
            let mut backups = self.backups();
            let now = Instant::now();
            let expired: Vec<u64> = backups
                .running
                .iter()
                .filter(|(_, b)| b.expires <= now)
                .map(|(&id, _)| id)
                .collect();
            for id in expired {
                if let Some(b) = backups.running.remove(&id) {
                    tracing::warn!(backup = id, "a backup's lease expired: ended");
                    source.end_backup(b.capture.pin);
                }
            }
            backups.next_id += 1;
            let id = backups.next_id;
            backups.starting.insert(id);
            id
        };
        self.remove_stale_staging(&root);
        let staging = root.join(id.to_string());
        let capture = source.begin_backup(&staging, BACKUP_LEASE).map_err(|e| {
            self.backups().starting.remove(&id);
            let _ = std::fs::remove_dir_all(&staging);
            use crate::backup::BackupError;
            let status = match e {
                BackupError::Busy => StatusCode::TOO_MANY_REQUESTS,
                BackupError::DeletionUnderWay { log_failed: None } => StatusCode::CONFLICT,
                BackupError::DeletionUnderWay {
                    log_failed: Some(_),
                } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, e.to_string())
        })?;
        let started = crate::backup::Started {
            id,
            lease_secs: BACKUP_LEASE.as_secs(),
            manifest: capture.manifest(),
        };
        tracing::info!(
            backup = id,
            lsn = capture.lsn,
            files = capture.files.len(),
            bytes = capture.files.iter().map(|f| f.len).sum::<u64>(),
            "backup started"
        );
        // One step from starting to running: its staging directory is never unowned.
        let mut backups = self.backups();
        backups.starting.remove(&id);
        backups.running.insert(
            id,
            BackupSession {
                capture,
                staging,
                expires: Instant::now() + BACKUP_LEASE,
            },
        );
        Ok(started)
    }

    /// Deletes the staging directories under `root` of no running backup.
    fn remove_stale_staging(&self, root: &Path) {
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            let owned = id.is_some_and(|id| {
                let backups = self.backups();
                backups.running.contains_key(&id) || backups.starting.contains(&id)
            });
            if !owned {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(dir = %entry.path().display(), "cannot remove a backup's staging directory: {e}");
                }
            }
        }
    }

    /// The file `name` of backup `id` (its path and length), renewing the lease.
    fn backup_file(&self, id: u64, name: &str) -> Result<(PathBuf, u64), (StatusCode, String)> {
        self.renew_backup(id)?;
        let backups = self.backups();
        let Some(session) = backups.running.get(&id) else {
            return Err((StatusCode::NOT_FOUND, format!("no backup {id} in progress")));
        };
        session
            .capture
            .files
            .iter()
            .find(|f| f.name == name)
            .map(|f| (f.path.clone(), f.len))
            .ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!("backup {id} has no file {name:?}"),
                )
            })
    }

    /// Renews backup `id`'s lease (blocking: the pins' lock), or says why not.
    fn renew_backup(&self, id: u64) -> Result<(), (StatusCode, String)> {
        let source = self
            .serving
            .get()
            .and_then(|s| s.server.sequencer.backup_source());
        let mut backups = self.backups();
        let Some(session) = backups.running.get_mut(&id) else {
            return Err((StatusCode::NOT_FOUND, format!("no backup {id} in progress")));
        };
        let now = Instant::now();
        let renewed = session.expires > now
            && source.is_some_and(|s| s.renew_backup(session.capture.pin, BACKUP_LEASE));
        if !renewed {
            return Err((
                StatusCode::GONE,
                format!(
                    "backup {id} expired (no request for {} s): start a new one",
                    BACKUP_LEASE.as_secs()
                ),
            ));
        }
        session.expires = now + BACKUP_LEASE;
        Ok(())
    }

    /// Ends backup `id`: releases its pin, removes its staging directory (blocking).
    fn end_backup(&self, id: u64) -> bool {
        let Some(session) = self.backups().running.remove(&id) else {
            return false;
        };
        if let Some(source) = self
            .serving
            .get()
            .and_then(|s| s.server.sequencer.backup_source())
        {
            source.end_backup(session.capture.pin);
        }
        if let Err(e) = std::fs::remove_dir_all(&session.staging) {
            tracing::warn!(dir = %session.staging.display(), "cannot remove a backup's staging directory: {e}");
        }
        tracing::info!(backup = id, "backup ended");
        true
    }
}

async fn backup_start<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = backup_refusal(&admin, &headers) {
        return refused;
    }
    match tokio::task::spawn_blocking(move || admin.begin_backup()).await {
        Ok(Ok(started)) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&started).expect("a manifest serialises"),
        )
            .into_response(),
        Ok(Err((status, message))) => (status, format!("{message}\n")).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("starting the backup failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn backup_file<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    UrlPath((id, name)): UrlPath<(u64, String)>,
) -> Response {
    if let Some(refused) = backup_refusal(&admin, &headers) {
        return refused;
    }
    // The lease is renewed under the pins' lock, which truncation holds while it
    // deletes files: off the async workers.
    let finder = admin.clone();
    let found = tokio::task::spawn_blocking(move || finder.backup_file(id, &name)).await;
    let (path, len) = match found {
        Ok(Ok(found)) => found,
        Ok(Err((status, message))) => return (status, format!("{message}\n")).into_response(),
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("finding the file failed: {e}\n"),
            )
                .into_response()
        }
    };
    // tokio's file reads run on its blocking threads, a chunk at a time: the reply is
    // streamed, never held whole.
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening {}: {e}\n", path.display()),
            )
                .into_response()
        }
    };
    use tokio::io::AsyncReadExt;
    let stream = Renewing {
        chunks: tokio_util::io::ReaderStream::with_capacity(file.take(len), BACKUP_CHUNK_BYTES),
        admin,
        id,
        renewed: Instant::now(),
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A file's chunks, renewing the backup's lease every [`BACKUP_RENEW_EVERY`] while
/// they flow (on a blocking thread: renewing takes the pins' lock, which truncation
/// holds while it deletes files).
struct Renewing<St, S> {
    chunks: St,
    admin: Arc<Admin<S>>,
    id: u64,
    renewed: Instant,
}

impl<St: futures_core::Stream + Unpin, S: Sequencer> futures_core::Stream for Renewing<St, S> {
    type Item = St::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<St::Item>> {
        let polled = std::pin::Pin::new(&mut self.chunks).poll_next(cx);
        if matches!(polled, std::task::Poll::Ready(Some(_)))
            && self.renewed.elapsed() >= BACKUP_RENEW_EVERY
        {
            self.renewed = Instant::now();
            let (admin, id) = (self.admin.clone(), self.id);
            // An expired backup stays expired: the file's bytes still flow (its file is
            // open), and the next request of the backup is refused.
            drop(tokio::task::spawn_blocking(move || admin.renew_backup(id)));
        }
        polled
    }
}

async fn backup_end<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<u64>,
) -> Response {
    if let Some(refused) = backup_refusal(&admin, &headers) {
        return refused;
    }
    match tokio::task::spawn_blocking(move || admin.end_backup(id)).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            format!("no backup {id} in progress\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("ending the backup failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Connections the admin endpoint serves at once; more wait in the listen backlog
/// until one ends.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// An admin connection that moves no byte either way for this long is closed (an idle
/// keep-alive connection, a client that stopped sending or reading).
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin routes on `listener` until `stop` resolves, at most
/// [`ADMIN_MAX_CONNECTIONS`] connections at once, each closed after
/// [`ADMIN_IDLE_TIMEOUT`] without progress.
pub async fn serve<S: Sequencer>(
    admin: Arc<Admin<S>>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_bounded(
        admin,
        listener,
        ADMIN_MAX_CONNECTIONS,
        ADMIN_IDLE_TIMEOUT,
        stop,
    )
    .await
}

/// [`serve`] with its bounds given (tests make them small).
pub async fn serve_bounded<S: Sequencer>(
    admin: Arc<Admin<S>>,
    listener: tokio::net::TcpListener,
    max_connections: usize,
    idle_timeout: Duration,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let bounded = crate::bounded_http::Bounded::new(listener, max_connections, idle_timeout);
    axum::serve(bounded, admin.router())
        .with_graceful_shutdown(stop)
        .await
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The refusal of a request to a document route without the admin token (compared in
/// constant time); `None` lets it through.
fn refusal<S>(admin: &Admin<S>, headers: &HeaderMap) -> Option<Response> {
    use subtle::ConstantTimeEq;
    let Some(expected) = &admin.config.admin_token else {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "the document routes need an admin token: start the server with --admin-token-file",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => None,
        _ => Some(problem(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer TOKEN)",
        )),
    }
}

/// The backup routes need the admin token when one is configured (without one they
/// are open, as the rest of a loopback admin endpoint).
fn backup_refusal<S>(admin: &Admin<S>, headers: &HeaderMap) -> Option<Response> {
    admin.config.admin_token.as_ref()?;
    refusal(admin, headers)
}

fn problem(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /docs?after=ID&limit=N`: documents in id order with their version and length
/// in code points, at most [`MAX_DOCS_PAGE`] a page; `next` is the `after` of the next
/// page (absent on the last). The version is the newest op sequenced
/// ([`Sequencer::list_documents`]), which may not be acknowledged yet (not synced; in
/// cluster mode, not in the journal yet).
async fn list_docs<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Response {
    if let Some(refused) = refusal(&admin, &headers) {
        return refused;
    }
    let Some(serving) = admin.serving.get() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "recovering");
    };
    let limit = page.limit.unwrap_or(100).clamp(1, MAX_DOCS_PAGE);
    let sequencer = serving.server.sequencer.clone();
    let listed =
        tokio::task::spawn_blocking(move || sequencer.list_documents(page.after.as_deref(), limit))
            .await;
    let docs = match listed {
        Ok(docs) => docs,
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("listing failed: {e}"),
            )
        }
    };
    let next = (docs.len() == limit).then(|| docs.last().map(|d| d.id.to_string()));
    let documents: Vec<_> = docs
        .iter()
        .map(|d| serde_json::json!({ "id": &*d.id, "version": d.version, "chars": d.chars }))
        .collect();
    let body = serde_json::json!({ "documents": documents, "next": next.flatten() });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// `GET /docs/ID[?at=SEQ]`: the document's text at its head (durable) or as of version
/// SEQ while the storage holds what it takes, with its version in the
/// `x-quire-version` header; 404 for a document that does not exist (or a version it
/// has not reached), 410 for a version truncated away (the message names the oldest).
async fn doc_text<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(at): Query<At>,
) -> Response {
    if let Some(refused) = refusal(&admin, &headers) {
        return refused;
    }
    let Some(serving) = admin.serving.get() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "recovering");
    };
    let sequencer = serving.server.sequencer.clone();
    if let Some(seq) = at.at {
        let asked = id.clone();
        let read = tokio::task::spawn_blocking(move || sequencer.read_at(&asked, seq)).await;
        return match read {
            Ok(Ok(Some(view))) => text_reply(view),
            Ok(Ok(None)) => problem(StatusCode::NOT_FOUND, &format!("no document {id:?}")),
            Ok(Err(e @ ReadAtError::Future { .. })) => {
                problem(StatusCode::NOT_FOUND, &format!("{id:?} at {seq}: {e}"))
            }
            Ok(Err(e @ ReadAtError::NotRetained { .. })) => {
                problem(StatusCode::GONE, &format!("{id:?} at {seq}: {e}"))
            }
            Ok(Err(e @ ReadAtError::Storage(_))) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading {id:?} at {seq} failed: {e}"),
            ),
            Err(e) => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading {id:?} at {seq} failed: {e}"),
            ),
        };
    }
    // The first read after a restart builds the text from the log: off the workers.
    let read = {
        let (sequencer, id) = (sequencer.clone(), id.clone());
        tokio::task::spawn_blocking(move || sequencer.read_now(&id, None)).await
    };
    let (view, ticket) = match read {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => {
            return problem(StatusCode::NOT_FOUND, &format!("no document {id:?}"));
        }
        Ok(Err(e)) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading {id:?} failed: {e}"),
            )
        }
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("reading {id:?} failed: {e}"),
            )
        }
    };
    // Only what is durable is shown.
    if let Err(e) = sequencer.wait_durable(ticket).await {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the log failed: {e}"),
        );
    }
    text_reply(view)
}

/// `DELETE /docs/ID`: deletes the document (a tombstone in the log, durable before the
/// reply; its snapshots removed; the sessions that have it open get `Error` 32). The
/// reply says the version it was deleted at; 404 for a document the storage does not
/// hold. Its id may be used again afterwards, for a new, empty document. Cluster mode:
/// 421 at a node that does not serve it, naming the node that does (send it there);
/// 503 when nothing was deleted and asking again may succeed ([`DeleteError::Unavailable`]).
///
/// [`DeleteError::Unavailable`]: crate::server::DeleteError::Unavailable
async fn delete_doc<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if let Some(refused) = refusal(&admin, &headers) {
        return refused;
    }
    let Some(serving) = admin.serving.get() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "recovering");
    };
    match serving.server.delete_document(&id).await {
        Ok(Some(version)) => {
            let body = serde_json::json!({ "id": id, "deleted_at_version": version });
            (
                [(header::CONTENT_TYPE, "application/json")],
                format!("{body}\n"),
            )
                .into_response()
        }
        Ok(None) => problem(StatusCode::NOT_FOUND, &format!("no document {id:?}")),
        Err(e) => deletion_refused(&id, &e),
    }
}

/// The reply to a `DELETE /docs/ID` that deleted nothing, or may not have.
fn deletion_refused(id: &str, e: &crate::server::DeleteError) -> Response {
    use crate::server::DeleteError;
    match e {
        DeleteError::Elsewhere(_) => problem(
            StatusCode::MISDIRECTED_REQUEST,
            &format!("document {id:?} is not served here: {e}"),
        ),
        DeleteError::Unavailable(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("document {id:?} was not deleted; retry: {e}"),
        ),
        DeleteError::Failed(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("deleting {id:?} failed: {e}"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct At {
    at: Option<u64>,
}

/// A document's text, its version in `x-quire-version`.
fn text_reply(view: DocView) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-quire-version"),
                view.version.to_string(),
            ),
        ],
        view.text,
    )
        .into_response()
}

async fn readyz<S: Sequencer>(State(admin): State<Arc<Admin<S>>>) -> Response {
    let reasons = match tokio::task::spawn_blocking(move || admin.not_ready()).await {
        Ok(reasons) => reasons,
        Err(e) => vec![format!("the readiness check failed: {e}")],
    };
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

async fn metrics<S: Sequencer>(State(admin): State<Arc<Admin<S>>>) -> Response {
    // The storage's figures, the data directory's size and free space: file system
    // reads, off the async workers.
    let gathered = tokio::task::spawn_blocking(move || gather(&admin)).await;
    match gathered {
        Ok(families) => {
            let mut text = String::new();
            match prometheus::TextEncoder::new().encode_utf8(&families, &mut text) {
                Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding the metrics failed: {e}\n"),
                )
                    .into_response(),
            }
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("gathering the metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Every metric: the serving layer's registry, then what is read now.
fn gather<S: Sequencer>(admin: &Admin<S>) -> Vec<MetricFamily> {
    let mut families = Vec::new();
    let ready = admin.not_ready().is_empty();
    families.push(gauge(
        "quire_ready",
        "1 when /readyz says ready.",
        f64::from(u8::from(ready)),
    ));
    if let Ok(free) = free_bytes(&admin.config.data_dir) {
        families.push(gauge(
            "quire_disk_free_bytes",
            "Bytes free on the data directory's file system.",
            free as f64,
        ));
    }
    families.push(gauge(
        "quire_disk_used_bytes",
        "Bytes of the data directory's log segments and snapshots.",
        dir_bytes(&admin.config.data_dir) as f64,
    ));
    let Some(serving) = admin.serving.get() else {
        return families;
    };
    let server = &serving.server;
    families.extend(server.metrics().gather());
    families.push(gauge(
        "quire_recovery_seconds",
        "Time the startup recovery of the data directory took.",
        serving.recovery.as_secs_f64(),
    ));
    families.push(gauge(
        "quire_connected_clients",
        "Clients with a live session.",
        server.connected_clients() as f64,
    ));
    families.push(gauge(
        "quire_open_connections",
        "Connections being served (handshakes and sessions closing included), of --max-connections.",
        server.open_connections() as f64,
    ));
    families.push(gauge(
        "quire_open_documents",
        "Documents held open in memory.",
        server.open_documents() as f64,
    ));
    let storage = server.sequencer.storage_stats();
    families.push(gauge(
        "quire_log_writable",
        "0 once the log failed (an fsync or write error): nothing more is acknowledged.",
        f64::from(u8::from(storage.failure.is_none())),
    ));
    families.push(gauge(
        "quire_log_next_segment_ready",
        "0 while the log's next segment cannot be prepared (a full disk, most often).",
        f64::from(u8::from(storage.next_segment_warning.is_none())),
    ));
    families.push(counter(
        "quire_log_records_written_total",
        "Records written to the log.",
        storage.records_written as f64,
    ));
    families.push(counter(
        "quire_log_bytes_written_total",
        "Bytes of records written to the log.",
        storage.bytes_written as f64,
    ));
    families.push(gauge(
        "quire_log_append_queue_depth",
        "Records appended and not yet taken by the log's writer.",
        storage.queue_depth as f64,
    ));
    families.push(histogram(
        "quire_fsync_seconds",
        "Latency of the log's fdatasync, one per group commit.",
        &storage.fsync_seconds,
    ));
    families.push(histogram(
        "quire_group_commit_records",
        "Records per group commit (one write and one fdatasync).",
        &storage.batch_records,
    ));
    families.push(counter(
        "quire_snapshots_written_total",
        "Document snapshots written.",
        storage.snapshots_written as f64,
    ));
    families.push(histogram(
        "quire_snapshot_write_seconds",
        "Time to write one snapshot file.",
        &storage.snapshot_seconds,
    ));
    families.push(counter(
        "quire_segments_truncated_total",
        "Log segment files removed by truncation.",
        storage.segments_truncated as f64,
    ));
    families.sort_by(|a, b| a.name().cmp(b.name()));
    families
}

fn family(name: &str, help: &str, kind: MetricType, metric: proto::Metric) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(vec![metric]);
    f
}

fn gauge(name: &str, help: &str, value: f64) -> MetricFamily {
    let mut g = proto::Gauge::default();
    g.set_value(value);
    family(name, help, MetricType::GAUGE, proto::Metric::from_gauge(g))
}

fn counter(name: &str, help: &str, value: f64) -> MetricFamily {
    let mut c = proto::Counter::default();
    c.set_value(value);
    let mut m = proto::Metric::default();
    m.set_counter(c);
    family(name, help, MetricType::COUNTER, m)
}

fn histogram(name: &str, help: &str, d: &Distribution) -> MetricFamily {
    let mut h = proto::Histogram::default();
    h.set_sample_count(d.count);
    h.set_sample_sum(d.sum);
    h.set_bucket(
        d.buckets
            .iter()
            .map(|&(bound, count)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bound);
                b.set_cumulative_count(count);
                b
            })
            .collect(),
    );
    let mut m = proto::Metric::default();
    m.set_histogram(h);
    family(name, help, MetricType::HISTOGRAM, m)
}

/// Bytes available to an unprivileged writer on `path`'s file system.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Bytes of the files in `dir`'s `wal/` and `snapshots/` (0 for what cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    ["wal", "snapshots"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(dir.join(sub)).ok())
        .flatten()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::DeleteError;

    /// Each way a deletion is refused has its own status, so that a caller tells "send it
    /// to that node" (421) from "ask again later" (503) from "it failed" (500).
    #[test]
    fn a_refused_deletion_is_answered_by_its_kind() {
        let owner = crate::sequencer::Owner {
            addr: Arc::from("10.0.0.2:7400"),
            ws_url: Arc::from(""),
        };
        for (refusal, status) in [
            (
                DeleteError::Elsewhere(owner),
                StatusCode::MISDIRECTED_REQUEST,
            ),
            (
                DeleteError::Unavailable("no thread for its erasure".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                DeleteError::Failed("the log failed".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ] {
            assert_eq!(
                deletion_refused("doc", &refusal).status(),
                status,
                "{refusal:?}"
            );
        }
    }
}
