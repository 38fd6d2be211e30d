//! Online backup through the admin endpoint, restore and export: a backup taken under a
//! steady write load from several clients restores every document exactly as the
//! server had it at the backup's LSN; one racing truncation still restores; a damaged
//! backup file is refused by name; export gives a document at its head and at an older
//! version.

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{open, start_with_store, store_config, Running};
use quire::admin::{Admin, AdminConfig};
use quire::backup::{BackupError, Manifest};
use quire::op::Patch;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::text::Text;
use quire::wal::segment::SEGMENT_SIZE_MIN;
use quire::wal::vfs::OsFs;
use quire::wal::{Wal, WalConfig};
use tokio::sync::watch;

/// The admin router of `running` on a port of its own.
async fn serve_admin(running: &Running, data: &Path) -> SocketAddr {
    let admin = Admin::new(AdminConfig {
        data_dir: data.to_path_buf(),
        min_free_bytes: 0,
        admin_token: None,
    });
    admin.serving(running.server.clone(), Duration::ZERO);
    let listener = quire::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quire::admin::serve(admin, listener, std::future::pending()));
    addr
}

/// `clients` writers on `docs` documents, editing until `stop`; every acknowledged
/// batch of edits counts in `edits`.
fn start_writers(
    addr: SocketAddr,
    clients: usize,
    docs: usize,
    insert: usize,
    stop: Arc<AtomicBool>,
    edits: watch::Sender<u64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let edits = Arc::new(edits);
    (0..clients)
        .map(|i| {
            let (stop, edits) = (stop.clone(), edits.clone());
            tokio::spawn(async move {
                let doc = open(addr, &format!("doc-{}", i % docs)).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ins = format!("{i}.{n}{};", "x".repeat(insert));
                    doc.edit_with(|view| {
                        let len = view.len_chars();
                        if len > 400 {
                            vec![Patch::new(len / 3, 20, ""), Patch::new(0, 0, ins)]
                        } else {
                            vec![Patch::new(len / 2, 0, ins)]
                        }
                    })
                    .await
                    .unwrap();
                    n += 1;
                    if n % 4 == 0 {
                        doc.synced().await.unwrap();
                        edits.send_modify(|e| *e += 4);
                    }
                }
                doc.synced().await.unwrap();
                doc.close().await;
            })
        })
        .collect()
}

async fn wait_edits(edits: &mut watch::Receiver<u64>, at_least: u64) {
    edits.wait_for(|&n| n >= at_least).await.unwrap();
}

async fn backup(admin: SocketAddr, to: &Path) -> Result<Manifest, BackupError> {
    let to = to.to_path_buf();
    tokio::task::spawn_blocking(move || {
        quire::backup::client::backup(&admin.to_string(), &to, None, |_| {})
    })
    .await
    .unwrap()
}

async fn restore(from: &Path, to: &Path) -> Result<quire::backup::restore::Restored, BackupError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || quire::backup::restore::restore(&from, &to, |_, _| {}))
        .await
        .unwrap()
}

/// Every document of the data directory `dir` as it opens: text and version.
async fn documents(dir: &Path, config: LocalConfig) -> BTreeMap<String, (String, u64)> {
    let (store, _) = LocalSequencer::open(dir, config).unwrap();
    let mut docs = BTreeMap::new();
    for id in store.doc_ids() {
        let view = store.read(&id).await.unwrap().unwrap();
        docs.insert(id.to_string(), (view.text, view.version));
    }
    store.close();
    docs
}

/// Every document as of `lsn`, replayed from the empty text out of the log in `dir`
/// (which must hold every op from the first). Read from a copy: the closed server's
/// store may still be referenced (and hold the log's lock) until the test ends.
fn replay_log_up_to(dir: &Path, segment_size: u64, lsn: u64) -> BTreeMap<String, (String, u64)> {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.join("wal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let mut texts: BTreeMap<String, (Text, u64)> = BTreeMap::new();
    let scanned = Wal::scan(
        Arc::new(OsFs),
        copy.path(),
        WalConfig {
            segment_size,
            ..WalConfig::default()
        },
        |op, location| {
            if location.lsn > lsn {
                return;
            }
            let (text, version) = texts.entry(op.doc_id.clone()).or_default();
            assert_eq!(op.server_seq, *version + 1, "the log holds every op");
            text.apply(&op.patches).unwrap();
            *version = op.server_seq;
        },
    )
    .unwrap();
    drop(scanned);
    texts
        .into_iter()
        .map(|(id, (text, version))| (id, (text.to_string(), version)))
        .collect()
}

fn manifest_versions(manifest: &Manifest) -> BTreeMap<String, u64> {
    manifest
        .docs
        .iter()
        .map(|d| (d.id.clone(), d.version))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_document_as_of_its_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = store_config();
    let running = start_with_store(&data, config.clone(), ServerConfig::default()).await;
    let admin = serve_admin(&running, &data).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (edits_tx, mut edits) = watch::channel(0u64);
    let writers = start_writers(running.addr, 6, 4, 8, stop.clone(), edits_tx);
    wait_edits(&mut edits, 300).await;

    let manifest = backup(admin, &dir.path().join("backup")).await.unwrap();
    // Writes went on through the backup and after it.
    let after = *edits.borrow();
    wait_edits(&mut edits, after + 100).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let final_lsn = running.store.wal().durability().durable_lsn;
    assert!(
        manifest.lsn > 0 && manifest.lsn < final_lsn,
        "{} {final_lsn}",
        manifest.lsn
    );
    assert!(manifest.files.iter().all(|f| f.sha256.is_some()));
    running.stop().await;

    let restored_dir = dir.path().join("restored");
    let restored = restore(&dir.path().join("backup"), &restored_dir)
        .await
        .unwrap();
    assert_eq!(restored.lsn, manifest.lsn);
    let expected = replay_log_up_to(&data, config.wal.segment_size, manifest.lsn);
    let got = documents(&restored_dir, config).await;
    assert_eq!(got.len(), 4);
    assert_eq!(
        got.iter()
            .map(|(id, (_, v))| (id.clone(), *v))
            .collect::<BTreeMap<_, _>>(),
        manifest_versions(&manifest)
    );
    for (id, (text, version)) in &expected {
        assert_eq!(
            got.get(id),
            Some(&(text.clone(), *version)),
            "document {id}"
        );
    }
    assert_eq!(got, expected);
}

fn truncating_config() -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: SEGMENT_SIZE_MIN,
            ..WalConfig::default()
        },
        snapshot_every_ops: 5,
        snapshot_every: Duration::from_millis(50),
        retention: Duration::ZERO,
        maintenance_interval: Duration::from_millis(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_racing_truncation_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = truncating_config();
    let running = start_with_store(&data, config.clone(), ServerConfig::default()).await;
    let admin = serve_admin(&running, &data).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (edits_tx, mut edits) = watch::channel(0u64);
    let writers = start_writers(running.addr, 4, 3, 200, stop.clone(), edits_tx);
    let truncated = |r: &Running| r.store.storage_stats().segments_truncated;
    // Truncation is under way before the backup...
    while truncated(&running) == 0 {
        let now = *edits.borrow();
        wait_edits(&mut edits, now + 4).await;
    }
    let manifest = backup(admin, &dir.path().join("backup")).await.unwrap();
    // ...and goes on once the backup has released the log.
    let at_end = truncated(&running);
    while truncated(&running) == at_end {
        let now = *edits.borrow();
        wait_edits(&mut edits, now + 4).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    running.stop().await;
    assert!(manifest
        .files
        .iter()
        .any(|f| f.name.starts_with("snapshots/")));
    assert!(
        manifest
            .files
            .iter()
            .filter(|f| f.name.starts_with("wal/"))
            .count()
            > 1
    );

    let restored_dir = dir.path().join("restored");
    restore(&dir.path().join("backup"), &restored_dir)
        .await
        .unwrap();
    let got = documents(&restored_dir, config).await;
    assert_eq!(
        got.iter()
            .map(|(id, (_, v))| (id.clone(), *v))
            .collect::<BTreeMap<_, _>>(),
        manifest_versions(&manifest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_byte_in_a_backup_file_makes_restore_refuse_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = LocalConfig {
        snapshot_every_ops: 3,
        ..store_config()
    };
    let running = start_with_store(&data, config, ServerConfig::default()).await;
    let admin = serve_admin(&running, &data).await;
    for name in ["a", "b"] {
        let doc = open(running.addr, name).await;
        for i in 0..10 {
            doc.edit(&[Patch::new(0, 0, format!("{name}{i}"))])
                .await
                .unwrap();
            doc.synced().await.unwrap();
        }
        doc.close().await;
    }
    let backup_dir = dir.path().join("backup");
    let manifest = backup(admin, &backup_dir).await.unwrap();
    running.stop().await;
    // A backup never goes into a directory that holds something.
    let again = backup(admin, &backup_dir).await;
    assert!(
        matches!(again, Err(BackupError::TargetNotEmpty(_))),
        "{again:?}"
    );

    let segment = manifest
        .files
        .iter()
        .find(|f| f.name.starts_with("wal/"))
        .unwrap();
    let snapshot = manifest
        .files
        .iter()
        .find(|f| f.name.starts_with("snapshots/"))
        .unwrap();
    for file in [segment, snapshot] {
        let path = backup_dir.join(&file.name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let target = dir.path().join("restored");
        let refused = restore(&backup_dir, &target).await;
        match &refused {
            Err(BackupError::Checksum { file: named, .. }) => assert_eq!(named, &file.name),
            other => panic!("{other:?}"),
        }
        let message = refused.unwrap_err().to_string();
        assert!(message.contains(&file.name), "{message}");
        assert!(
            !target.exists(),
            "a refused restore leaves no data directory"
        );
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
    }
    // Undamaged, it restores; and not over a directory that holds something.
    let target = dir.path().join("restored");
    restore(&backup_dir, &target).await.unwrap();
    let over = restore(&backup_dir, &target).await;
    assert!(
        matches!(over, Err(BackupError::TargetNotEmpty(_))),
        "{over:?}"
    );
    // A server on the restored directory goes on from the backup's LSN, and gives no
    // client id that the original server may have given after the backup.
    assert!(manifest.files.iter().any(|f| f.name == "client-ids"));
    let running = start_with_store(&target, store_config(), ServerConfig::default()).await;
    let doc = open(running.addr, "a").await;
    assert_eq!(doc.version(), 10);
    let mark = quire::sequencer::client_ids::FIRST_ASSIGNED + quire::sequencer::client_ids::BLOCK;
    assert_eq!(
        doc.client.client_id(),
        mark + quire::backup::RESTORE_CLIENT_ID_GAP
    );
    doc.edit(&[Patch::new(0, 0, "more")]).await.unwrap();
    doc.synced().await.unwrap();
    assert_eq!(doc.version(), 11);
    doc.close().await;
    assert_eq!(
        running.store.wal().durability().durable_lsn,
        manifest.lsn + 1
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_gives_a_document_at_its_head_and_at_an_older_seq() {
    use quire::backup::export::{export, ExportError};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = LocalConfig {
        snapshot_every_ops: 4,
        ..store_config()
    };
    let running = start_with_store(&data, config, ServerConfig::default()).await;
    let doc = open(running.addr, "notes/e").await;
    let mut history = vec![(0u64, String::new())];
    for i in 0..12 {
        let len = doc.text().chars().count() as u32;
        doc.edit(&[Patch::new(len, 0, format!("line {i}\n"))])
            .await
            .unwrap();
        doc.synced().await.unwrap();
        history.push((doc.version(), doc.text()));
    }
    doc.close().await;
    running.stop().await;
    let head = export(&data, "notes/e", None).unwrap();
    assert_eq!(
        (head.version, head.text.as_str()),
        (12, history[12].1.as_str())
    );
    for (version, text) in &history[1..] {
        let at = export(&data, "notes/e", Some(*version)).unwrap();
        assert_eq!((at.version, &at.text), (*version, text), "at {version}");
    }
    assert!(matches!(
        export(&data, "notes/e", Some(13)),
        Err(ExportError::PastHead { head: 12, .. })
    ));
    assert!(matches!(
        export(&data, "nothing", None),
        Err(ExportError::UnknownDocument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_truncated_version_names_the_oldest_available() {
    use quire::backup::export::{export, ExportError};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let running = start_with_store(&data, truncating_config(), ServerConfig::default()).await;
    let doc = open(running.addr, "t").await;
    let big = "y".repeat(4000);
    let mut n = 0;
    while running.store.storage_stats().segments_truncated == 0 {
        doc.edit(&[Patch::new(0, 0, format!("{n}{big}"))])
            .await
            .unwrap();
        doc.synced().await.unwrap();
        n += 1;
    }
    let head = doc.version();
    doc.close().await;
    running.stop().await;
    let Err(ExportError::NotRetained { oldest, .. }) = export(&data, "t", Some(1)) else {
        panic!("seq 1 was truncated away");
    };
    assert!(oldest > 1 && oldest <= head, "{oldest}");
    let message = export(&data, "t", Some(1)).unwrap_err().to_string();
    assert!(
        message.contains(&format!("oldest version available is {oldest}")),
        "{message}"
    );
    assert_eq!(export(&data, "t", Some(oldest)).unwrap().version, oldest);
    assert_eq!(export(&data, "t", None).unwrap().version, head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_routes_serve_only_the_files_of_a_running_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let running = start_with_store(&data, store_config(), ServerConfig::default()).await;
    let admin = serve_admin(&running, &data).await;
    let doc = open(running.addr, "r").await;
    doc.edit(&[Patch::new(0, 0, "hello")]).await.unwrap();
    doc.synced().await.unwrap();
    doc.close().await;
    let base = format!("http://{admin}");
    let staging = data.join("backup-staging");
    let statuses = tokio::task::spawn_blocking(move || {
        let status = |r: Result<ureq::Response, ureq::Error>| match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        };
        let reply = ureq::post(&format!("{base}/backup")).call().unwrap();
        let started: quire::backup::Started = serde_json::from_reader(reply.into_reader()).unwrap();
        let id = started.id;
        let file = &started.manifest.files[0];
        assert_eq!(started.manifest.lsn, 1);
        assert_eq!(file.name, "wal/00000000000000000001.wal");
        let body = ureq::get(&format!("{base}/backup/{id}/file/{}", file.name))
            .call()
            .unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut body.into_reader(), &mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, file.len);
        assert!(staging.join(id.to_string()).is_dir());
        let found = [
            status(ureq::get(&format!("{base}/backup/{id}/file/wal/x.wal")).call()),
            status(
                ureq::get(&format!(
                    "{base}/backup/{id}/file/wal/00000000000000000002.wal"
                ))
                .call(),
            ),
            status(ureq::get(&format!("{base}/backup/999/file/{}", file.name)).call()),
            status(ureq::delete(&format!("{base}/backup/{id}")).call()),
            status(ureq::delete(&format!("{base}/backup/{id}")).call()),
            status(ureq::get(&format!("{base}/backup/{id}/file/{}", file.name)).call()),
        ];
        assert!(!staging.join(id.to_string()).exists());
        found
    })
    .await
    .unwrap();
    assert_eq!(statuses, [404, 404, 404, 204, 404, 404]);
    running.stop().await;
}
