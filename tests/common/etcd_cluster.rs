//! A real 3-member etcd cluster on loopback, for the cluster-mode tests: each member with
//! its own data dir, killed (SIGKILL) and restarted on demand, all killed and their dirs
//! removed on drop.
//!
//! The binary is `$QUIRE_ETCD_BIN`, else `etcd` on the PATH, else `/usr/bin/etcd`; there
//! is no fallback to skipping, so a machine without etcd fails the tests with the command
//! that installs it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a cluster (or a member coming back) may take to answer as healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    peer_port: u16,
    client_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

pub struct EtcdCluster {
    bin: PathBuf,
    initial_cluster: String,
    token: String,
    members: Vec<Member>,
    /// Holds every member's data dir and log; removed on drop, after `drop` killed them.
    dir: tempfile::TempDir,
    /// This process's one cluster at a time, released (after the members are killed) on
    /// drop; `None` only for a start attempt that is given up.
    slot: Option<Slot>,
}

/// One etcd cluster at a time in a test process: the cluster tests are one binary whose
/// tests run in parallel, and two clusters (each with three members fsyncing, perhaps
/// with three quire nodes) on this 2-core machine would make each other's failovers and
/// elections slow enough to blur what the tests time. A test waits for the slot, as it
/// waited for the binary before it when each file was a binary of its own.
struct Slot;

static SLOT_TAKEN: Mutex<bool> = Mutex::new(false);
static SLOT_FREED: Condvar = Condvar::new();

impl Slot {
    fn take() -> Slot {
        let mut taken = SLOT_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        while *taken {
            taken = SLOT_FREED.wait(taken).unwrap_or_else(|e| e.into_inner());
        }
        *taken = true;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOT_TAKEN.lock().unwrap_or_else(|e| e.into_inner()) = false;
        SLOT_FREED.notify_one();
    }
}

fn etcd_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("QUIRE_ETCD_BIN") {
        return bin.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(bin) = on_path {
        return bin;
    }
    let default = PathBuf::from("/usr/bin/etcd");
    assert!(
        default.is_file(),
        "no etcd binary (not in QUIRE_ETCD_BIN, not on the PATH, not /usr/bin/etcd): the \
         cluster tests run against a real etcd; install it with `apt-get install etcd-server` \
         or point QUIRE_ETCD_BIN at one"
    );
    default
}

/// A port nothing listens on now (the OS's choice for port 0), and not handed to any
/// other member started by this process. Another process (or an outgoing connection's
/// ephemeral port) could still take it before etcd binds it: etcd then exits at once,
/// and [`EtcdCluster::start`] tries again on new ports.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().unwrap().port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The end of a member's log, with its size (so that an empty log shows as one).
fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "({} bytes in {})\n{}",
        bytes.len(),
        path.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

impl EtcdCluster {
    /// Starts three members and waits until they answer with a leader.
    pub fn start() -> Self {
        const TRIES: usize = 3;
        let mut slot = Some(Slot::take());
        let mut failures = Vec::new();
        for _ in 0..TRIES {
            let mut cluster = Self::new();
            for i in 0..3 {
                cluster.spawn(i);
            }
            match cluster.healthy_within(HEALTHY_WITHIN) {
                Ok(()) => {
                    cluster.slot = slot.take();
                    return cluster;
                }
                // A port taken between its choice and etcd's bind: new ports, new dirs.
                Err(e) if cluster.exited().is_some() => failures.push(e),
                Err(e) => cluster.fail(&e),
            }
        }
        panic!("etcd members exited at start {TRIES} times: {failures:#?}");
    }

    fn new() -> Self {
        let bin = etcd_bin();
        let dir = tempfile::Builder::new()
            .prefix("quire-etcd-")
            .tempdir()
            .unwrap();
        // Unique per cluster, so members of two test clusters can never join each other.
        let token = format!(
            "quire-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let members: Vec<Member> = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                peer_port: free_port(),
                client_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        EtcdCluster {
            bin,
            initial_cluster,
            token,
            members,
            dir,
            slot: None,
        }
    }

    /// A member that should be running and has exited, with its log's tail.
    fn exited(&mut self) -> Option<String> {
        self.members.iter_mut().find_map(|m| {
            let status = m.child.as_mut()?.try_wait().ok()??;
            Some(format!("{} exited ({status}):\n{}", m.name, tail(&m.log)))
        })
    }

    fn fail(&self, why: &str) -> ! {
        let logs: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("--- {} ---\n{}", m.name, tail(&m.log)))
            .collect();
        panic!(
            "the etcd cluster was not healthy within {HEALTHY_WITHIN:?} ({why}); its logs:\n{}",
            logs.join("\n")
        );
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        assert!(m.child.is_none(), "{} is running", m.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            // Ignored on a restart: the member's data dir has the cluster already.
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Short, so an election after a kill takes about half a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.members[i].child = Some(child);
    }

    /// Every member's client URL, for the store's client.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Kills member `i` (0..3) with SIGKILL: no clean shutdown, as in a crash.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.members[i].child.take().expect("the member is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Member `i`'s status as it answers it: `(its id, the leader's id)`.
    async fn status(url: String) -> Result<(u64, u64), etcd_client::Error> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_millis(500));
        let mut client = etcd_client::Client::connect([url], Some(options)).await?;
        let status = client.status().await?;
        let id = status.header().map_or(0, |h| h.member_id());
        Ok((id, status.leader()))
    }

    /// Waits until every running member answers and names the same leader, and a
    /// linearizable read through all of them succeeds (so a quorum commits).
    pub fn wait_healthy(&mut self) {
        if let Err(e) = self.healthy_within(HEALTHY_WITHIN) {
            self.fail(&e);
        }
    }

    fn healthy_within(&mut self, patience: Duration) -> Result<(), String> {
        let runtime = Self::runtime();
        let deadline = Instant::now() + patience;
        loop {
            let healthy = runtime.block_on(async {
                let mut leaders = Vec::new();
                for m in self.members.iter().filter(|m| m.child.is_some()) {
                    match Self::status(m.client_url()).await {
                        Ok((_, 0)) => return Err(format!("{} has no leader", m.name)),
                        Ok((_, leader)) => leaders.push(leader),
                        Err(e) => return Err(format!("{}: {e}", m.name)),
                    }
                }
                leaders.dedup();
                if leaders.len() != 1 {
                    return Err(format!("members name different leaders: {leaders:?}"));
                }
                let options = etcd_client::ConnectOptions::new()
                    .with_timeout(Duration::from_secs(1))
                    .with_require_leader(true);
                let mut client = etcd_client::Client::connect(self.endpoints(), Some(options))
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .get("/health", None)
                    .await
                    .map_err(|e| format!("a read: {e}"))?;
                Ok(())
            });
            let last = match healthy {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if let Some(exited) = self.exited() {
                return Err(format!("{last}; {exited}"));
            }
            if Instant::now() > deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that is the leader now, as the running members see it.
    pub fn leader(&self) -> usize {
        let runtime = Self::runtime();
        let mut ids = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_some() {
                let status = runtime.block_on(Self::status(m.client_url()));
                ids.push((i, status.expect("a member's status")));
            }
        }
        let leader = ids[0].1 .1;
        ids.iter()
            .find(|(_, (id, _))| *id == leader)
            .map(|(i, _)| *i)
            .expect("the leader is a running member")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Then `dir` (a TempDir) removes every member's data dir and log.
    }
}
