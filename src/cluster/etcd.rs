//! [`Store`] on a real etcd cluster, through the `etcd-client` crate: a thin
//! translation, since the trait is shaped after etcd's own requests (see
//! [`super::store`] for the semantics each method keeps).
//!
//! **Its methods block.** The trait is synchronous (the cluster calls it from its commit
//! thread), while `etcd-client` is async; so the store owns a small tokio runtime of its
//! own (one worker thread, `quire-etcd`) and answers each call with `block_on`. Never call
//! it from an async task: the task would stall its worker for up to a request timeout, and
//! tokio refuses to block on a runtime from inside one (a debug build panics with a clear
//! message first). Call it from a dedicated thread or `tokio::task::spawn_blocking`.
//!
//! **Timeouts and uncertainty.** Every call is bounded by [`EtcdConfig::request_timeout`];
//! a call that times out, or fails in transport, or meets a cluster without a leader
//! (the client requires one, so a minority member answers at once instead of waiting),
//! returns [`StoreError::Unavailable`]. For a txn that is etcd's "uncertain" outcome: it
//! may have been applied or not, exactly as [`MemStore`](super::mem_store::MemStore)'s
//! faults model it; the cluster's callers retry with the same writes (idempotent), or
//! stop acknowledging.
//!
//! **Differences from `MemStore` that cannot be removed**: etcd counts lease TTLs in whole
//! seconds (a TTL is rounded up here), and raises a TTL below its minimum (1.5 election
//! timeouts, rounded up to a second) to that minimum; a lease may outlive its TTL (a new
//! leader renews every lease). The cluster relies on neither (see [`super`]).

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::runtime::Runtime;

use super::store::{
    duplicate_key, Compare, KeyValue, LeaseId, Op, OpResult, Range, Store, StoreError, Target,
    TxnError, TxnResponse, MAX_TXN_OPS,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Every member's client URL (`http://host:port`): the client balances over them and
    /// carries on while a quorum answers, so give all of them, not one.
    pub endpoints: Vec<String>,
    /// The longest any one call may take, connection included, before it fails with
    /// [`StoreError::Unavailable`].
    pub request_timeout: Duration,
    /// The longest a connection attempt to one member may take.
    pub connect_timeout: Duration,
    /// HTTP/2 pings on each connection at this interval, so that a member that vanished
    /// without closing its connections (a partition, a power cut) is noticed.
    pub keep_alive_interval: Duration,
    /// How long a ping may go unanswered before its connection is dropped.
    pub keep_alive_timeout: Duration,
}

impl EtcdConfig {
    /// The defaults (2 s per request) for these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(3),
        }
    }
}

/// The etcd adapter (module notes: its methods block).
pub struct EtcdStore {
    client: Client,
    request_timeout: Duration,
    /// Always `Some` until dropped: taken in `drop` to shut it down without blocking.
    runtime: Option<Runtime>,
}

/// etcd's error messages (`rpctypes`), which its gRPC status carries as text only.
const LEASE_NOT_FOUND: &str = "requested lease not found";
const TOO_MANY_OPS: &str = "too many operations in txn request";
const DUPLICATE_KEY: &str = "duplicate key given in txn request";

/// The pause before sending again a request that could not connect, so that a call
/// whose every member is down does not spin until its timeout.
const RETRY_UNSENT_AFTER: Duration = Duration::from_millis(20);

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd {what}: {e}"))
}

/// How one attempt at a request failed.
enum Failed {
    /// For the caller.
    Store(StoreError),
    /// The connection could not be made: etcd never saw the request.
    NotSent(String),
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Failed::Store(e)
    }
}

/// A failed request, as [`Failed`]: `NotSent` if its cause is a connection that could
/// not be made (tonic's `ConnectError`, somewhere in the chain of sources), which is
/// certain not to have carried it; an uncertain [`StoreError::Unavailable`] otherwise.
fn failed(what: &str, e: etcd_client::Error) -> Failed {
    let mut source: Option<&(dyn std::error::Error + 'static)> = match &e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(e) => Some(e),
        _ => None,
    };
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return Failed::NotSent(format!("{what}: {e}"));
        }
        source = error.source();
    }
    Failed::Store(unavailable(what, e))
}

fn is_status(e: &etcd_client::Error, message: &str) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status) if status.message().contains(message))
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix):
/// `"\0"` for the empty prefix means "to the end of the keyspace".
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|b| *b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        // The cluster only writes UTF-8 keys (the trait's keys are `str`).
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

fn txn_op(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|lease| PutOptions::new().with_lease(lease.0)),
        ),
        Op::Delete { key } => TxnOp::delete(key.as_str(), None),
        Op::DeletePrefix { prefix } => TxnOp::delete(
            prefix.as_str(),
            Some(DeleteOptions::new().with_range(prefix_end(prefix.as_bytes()))),
        ),
        Op::Get { key } => TxnOp::get(key.as_str(), None),
    }
}

fn compare(c: &Compare) -> EtcdCompare {
    let key = c.key.as_str();
    match &c.target {
        Target::CreateRevision(rev) => EtcdCompare::create_revision(key, CompareOp::Equal, *rev),
        Target::ModRevision(rev) => EtcdCompare::mod_revision(key, CompareOp::Equal, *rev),
        Target::Value(value) => EtcdCompare::value(key, CompareOp::Equal, value.clone()),
    }
}

impl EtcdStore {
    /// A store on the cluster at `config.endpoints`. Connections are made lazily, so this
    /// fails only on a malformed endpoint (or if the runtime cannot start): a cluster
    /// that is down shows as [`StoreError::Unavailable`] from the calls.
    pub fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("quire-etcd")
            .enable_all()
            .build()
            .map_err(|e| unavailable("runtime", e))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(config.keep_alive_interval, config.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // Without a leader a member cannot commit anything: fail at once rather than
            // wait out the timeout.
            .with_require_leader(true);
        let client = runtime
            .block_on(Client::connect(&config.endpoints, Some(options)))
            .map_err(|e| unavailable("connect", e))?;
        Ok(EtcdStore {
            client,
            request_timeout: config.request_timeout,
            runtime: Some(runtime),
        })
    }

    /// Runs the request `attempt` makes on the store's runtime, bounded by the request
    /// timeout. An attempt that failed to connect (the balancer picked a member that is
    /// down) never reached etcd, so it is made again, whatever the request: only an
    /// answer, another error or the timeout ends the call.
    fn call<T, F>(&self, what: &str, mut attempt: impl FnMut() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, Failed>>,
    {
        debug_assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "EtcdStore blocks: call it from a dedicated thread or spawn_blocking, never \
             from an async task"
        );
        let runtime = self.runtime.as_ref().expect("present until dropped");
        let mut unsent: Option<String> = None;
        runtime.block_on(async {
            let attempts = async {
                loop {
                    match attempt().await {
                        Ok(answer) => return Ok(answer),
                        Err(Failed::Store(e)) => return Err(e),
                        Err(Failed::NotSent(e)) => {
                            unsent = Some(e);
                            tokio::time::sleep(RETRY_UNSENT_AFTER).await;
                        }
                    }
                }
            };
            // The timer is made inside the runtime (`timeout` needs its time driver).
            match tokio::time::timeout(self.request_timeout, attempts).await {
                Ok(answer) => answer,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "etcd {what}: no answer within {:?}{}",
                    self.request_timeout,
                    unsent.map_or(String::new(), |e| format!(" (last: {e})"))
                ))),
            }
        })
    }

    /// Which lease of a txn's puts etcd found missing (its error does not say): the
    /// only one, or the first that etcd reports expired.
    async fn missing_lease(client: &Client, ops: &[&Op]) -> Result<LeaseId, StoreError> {
        let mut leases: Vec<LeaseId> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { lease, .. } => *lease,
                _ => None,
            })
            .collect();
        leases.sort();
        leases.dedup();
        if let [lease] = leases[..] {
            return Ok(lease);
        }
        for lease in &leases {
            let ttl = client
                .lease_client()
                .time_to_live(lease.0, None)
                .await
                .map_err(|e| unavailable("lease time-to-live", e))?;
            if ttl.ttl() <= 0 {
                return Ok(*lease);
            }
        }
        Err(StoreError::Unavailable(
            "etcd txn: a lease was not found, and every lease of the txn exists".into(),
        ))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Not `Runtime::drop`, which blocks and panics inside an async context: the
        // store may well be dropped by a task that owned it through an `Arc`.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        assert!(!ttl.is_zero(), "a lease needs a positive TTL");
        // etcd counts whole seconds; rounding down could give a lease shorter than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        self.call("lease grant", || async move {
            let response = self
                .client
                .lease_client()
                .grant(secs, None)
                .await
                .map_err(|e| failed("lease grant", e))?;
            if !response.error().is_empty() {
                return Err(unavailable("lease grant", response.error()).into());
            }
            Ok(LeaseId(response.id()))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("lease keep-alive", || async move {
            // One request on a new keep-alive stream, and its one answer: the client reads
            // it and fails with "lease not found" if etcd answered TTL 0 (expired or
            // revoked). The stream closes when its halves are dropped.
            match self.client.lease_client().keep_alive(lease.0).await {
                Ok(_) => Ok(()),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                    Err(StoreError::LeaseNotFound(lease).into())
                }
                Err(e) if is_status(&e, LEASE_NOT_FOUND) => {
                    Err(StoreError::LeaseNotFound(lease).into())
                }
                Err(e) => Err(failed("lease keep-alive", e)),
            }
        })
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("lease revoke", || async move {
            match self.client.lease_client().revoke(lease.0).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, LEASE_NOT_FOUND) => {
                    Err(StoreError::LeaseNotFound(lease).into())
                }
                Err(e) => Err(failed("lease revoke", e)),
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.call("get", || async move {
            let response = self
                .client
                .kv_client()
                .get(key, None)
                .await
                .map_err(|e| failed("get", e))?;
            Ok(response.kvs().first().map(key_value))
        })
    }

    fn get_prefix(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        assert!(limit > 0, "an unbounded read");
        let start = from.filter(|from| *from > prefix).unwrap_or(prefix);
        // etcd's default order is by key, ascending (asking for it explicitly would make
        // it read the whole range before applying the limit).
        let options = GetOptions::new()
            .with_range(prefix_end(prefix.as_bytes()))
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        self.call("range", || {
            let options = options.clone();
            async move {
                let response = self
                    .client
                    .kv_client()
                    .get(start, Some(options))
                    .await
                    .map_err(|e| failed("range", e))?;
                Ok(Range {
                    kvs: response.kvs().iter().map(key_value).collect(),
                    more: response.more(),
                    revision: response.header().map_or(0, |h| h.revision()),
                })
            }
        })
    }

    fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError> {
        // etcd serves a txn without ops (compares only) from the answering member's own
        // state, with no check that it is current (its `isTxnSerializable` holds for
        // no ops), so a lagging follower could evaluate the compares on stale data. One
        // linearizable read of nothing in each branch makes etcd confirm it is current
        // first; its answer is dropped.
        let pad = success.is_empty() && failure.is_empty();
        let branch = |ops: &[Op]| {
            let mut ops: Vec<TxnOp> = ops.iter().map(txn_op).collect();
            if pad {
                ops.push(TxnOp::get("\0", Some(GetOptions::new().with_count_only())));
            }
            ops
        };
        let txn = Txn::new()
            .when(compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(branch(success))
            .or_else(branch(failure));
        self.call("txn", || {
            let txn = txn.clone();
            async move {
                let response = match self.client.kv_client().txn(txn).await {
                    Ok(response) => response,
                    Err(e) if is_status(&e, TOO_MANY_OPS) => {
                        let n = [compares.len(), success.len(), failure.len()];
                        let n = n
                            .into_iter()
                            .find(|n| *n > MAX_TXN_OPS)
                            .unwrap_or_else(|| n.into_iter().max().unwrap_or(0));
                        return Err(StoreError::Txn(TxnError::TooManyOps(n)).into());
                    }
                    Err(e) if is_status(&e, DUPLICATE_KEY) => {
                        let key = duplicate_key(success).or_else(|| duplicate_key(failure));
                        let key = key.unwrap_or_default().to_owned();
                        return Err(StoreError::Txn(TxnError::DuplicateKey(key)).into());
                    }
                    Err(e) if is_status(&e, LEASE_NOT_FOUND) => {
                        let ops: Vec<&Op> = success.iter().chain(failure).collect();
                        let lease = Self::missing_lease(&self.client, &ops).await?;
                        return Err(StoreError::LeaseNotFound(lease).into());
                    }
                    Err(e) => return Err(failed("txn", e)),
                };
                let mut responses = response.op_responses();
                if pad {
                    responses.clear();
                }
                let results = responses
                    .into_iter()
                    .map(|op| match op {
                        TxnOpResponse::Put(_) => Ok(OpResult::Put),
                        TxnOpResponse::Delete(d) => {
                            Ok(OpResult::Deleted(u64::try_from(d.deleted()).unwrap_or(0)))
                        }
                        TxnOpResponse::Get(g) => Ok(OpResult::Got(g.kvs().first().map(key_value))),
                        TxnOpResponse::Txn(_) => Err(unavailable("txn", "a nested txn's answer")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(TxnResponse {
                    succeeded: response.succeeded(),
                    revision: response.header().map_or(0, |h| h.revision()),
                    results,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefixs_range_end_is_its_last_byte_below_0xff_incremented() {
        assert_eq!(prefix_end(b"p/"), b"p0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b""), b"\0");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    // Only debug builds check (a release build fails in tokio's own check instead).
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "never from an async task")]
    fn a_call_from_inside_a_runtime_panics_in_debug_builds() {
        // No etcd is needed: the assertion comes before any request, and connecting is
        // lazy.
        let store = EtcdStore::connect(EtcdConfig::new(["http://127.0.0.1:1"])).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let _ = store.get("k");
        });
    }
}
