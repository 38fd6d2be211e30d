//! The admin HTTP endpoint, on a listener of its own (loopback by default): `/metrics`
//! in the Prometheus text format, `/healthz` (the process answers) and `/readyz`
//! (recovery finished, the log writable, free disk above a threshold; a JSON body says
//! why not). Built on axum: no HTTP parsing of our own.
//!
//! It starts before recovery, so that `/readyz` can say "recovering" and `/metrics`
//! answers from the first second; the server is attached once the data directory is
//! open ([`Admin::serving`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::proto::{self, MetricFamily, MetricType};

use crate::sequencer::Sequencer;
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
            .route("/docs/{*id}", get(doc_text::<S>))
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

/// Serves the admin routes on `listener` until `stop` resolves.
pub async fn serve<S: Sequencer>(
    admin: Arc<Admin<S>>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, admin.router())
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
/// page (absent on the last).
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

/// `GET /docs/ID`: the document's text at its head (durable), with its version in the
/// `x-quire-version` header; 404 for a document that does not exist.
async fn doc_text<S: Sequencer>(
    State(admin): State<Arc<Admin<S>>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refused) = refusal(&admin, &headers) {
        return refused;
    }
    let Some(serving) = admin.serving.get() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "recovering");
    };
    let sequencer = serving.server.sequencer.clone();
    // The first read after a restart builds the text from the log: off the workers.
    let read = {
        let (sequencer, id) = (sequencer.clone(), id.clone());
        tokio::task::spawn_blocking(move || sequencer.read_now(&id)).await
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
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Bytes of the files in `dir`'s `wal/` and `snapshots/` (0 for what cannot be read).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    ["wal", "snapshots"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(dir.join(sub)).ok())
        .flatten()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
