//! The manifests-directory source (`--manifests DIR`): Services and EndpointSlices from YAML
//! files, reloaded when files change. Used by the demo, the end-to-end tests and single
//! machines without a cluster.
//!
//! An invalid file is reported (file, document, object, field) and ignored: the last good
//! state stays programmed. Nothing is published until the directory loads once. Objects equal
//! to the previous load keep their `Arc`, so only what really changed is recomputed.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::{Snapshot, SnapshotSender};
use crate::manifests::{self, ManifestError};

/// Quiet time after the last file event before reloading (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(100);

/// What the source has done, for metrics and tests.
#[derive(Debug)]
pub struct FilesSourceStats {
    loads: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Load attempts so far, good or bad.
    attempts: tokio::sync::watch::Sender<u64>,
}

impl FilesSourceStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            loads: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            attempts: tokio::sync::watch::Sender::new(0),
        })
    }
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// The error of the last attempt, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("not poisoned").clone()
    }
    pub fn attempts(&self) -> u64 {
        *self.attempts.borrow()
    }
    /// Resolves once at least `n` load attempts have been made.
    pub async fn wait_for_attempts(&self, n: u64) {
        let mut rx = self.attempts.subscribe();
        let _ = rx.wait_for(|a| *a >= n).await;
    }
}

/// Keeps the `Arc` of every object that did not change between loads.
#[derive(Default)]
struct Interner {
    services: HashMap<(String, String), Arc<Service>>,
    slices: HashMap<(String, String), Arc<EndpointSlice>>,
}

fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn intern<K: PartialEq>(
    previous: &HashMap<(String, String), Arc<K>>,
    next: &mut HashMap<(String, String), Arc<K>>,
    key: (String, String),
    object: K,
) -> (Arc<K>, bool) {
    match previous.get(&key) {
        Some(old) if **old == object => {
            next.insert(key, old.clone());
            (old.clone(), false)
        }
        _ => {
            let new = Arc::new(object);
            next.insert(key, new.clone());
            (new, true)
        }
    }
}

impl Interner {
    /// The snapshot of a load, and whether anything differs from the previous one.
    fn snapshot(&mut self, loaded: manifests::Manifests) -> (Snapshot, bool) {
        let mut services = HashMap::new();
        let mut slices = HashMap::new();
        let mut changed = false;
        let mut snapshot = Snapshot::default();
        for (_, svc) in loaded.services {
            let (arc, new) = intern(
                &self.services,
                &mut services,
                object_key(&svc.metadata),
                svc,
            );
            changed |= new;
            snapshot.services.push(arc);
        }
        for (_, slice) in loaded.endpoint_slices {
            let (arc, new) = intern(
                &self.slices,
                &mut slices,
                object_key(&slice.metadata),
                slice,
            );
            changed |= new;
            snapshot.endpoint_slices.push(arc);
        }
        changed |= services.len() != self.services.len() || slices.len() != self.slices.len();
        self.services = services;
        self.slices = slices;
        (snapshot, changed)
    }
}

/// Loads `dir` on a blocking thread (it reads files).
async fn load(dir: &Path) -> Result<manifests::Manifests, ManifestError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || manifests::load_dir(&dir))
        .await
        .expect("the loader does not panic")
}

/// Runs until every receiver is gone.
pub async fn run(
    dir: PathBuf,
    tx: SnapshotSender,
    stats: Arc<FilesSourceStats>,
) -> Result<(), notify::Error> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Any event means "look again"; errors too (the reload will say what is wrong).
        let _ = events_tx.send(event.map(|_| ()).map_err(|e| e.to_string()));
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;

    let mut interner = Interner::default();
    let mut published = false;
    let mut revision = 0u64;
    loop {
        match load(&dir).await {
            Ok(loaded) => {
                stats.loads.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("not poisoned") = None;
                let (mut snapshot, changed) = interner.snapshot(loaded);
                if changed || !published {
                    revision += 1;
                    snapshot.revision = revision;
                    tracing::info!(
                        revision,
                        dir = %dir.display(),
                        services = snapshot.services.len(),
                        endpoint_slices = snapshot.endpoint_slices.len(),
                        "manifests loaded"
                    );
                    if tx.send(Some(Arc::new(snapshot))).is_err() {
                        return Ok(());
                    }
                    published = true;
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("not poisoned") = Some(e.to_string());
                if published {
                    tracing::error!("{e}; keeping the last good state");
                } else {
                    tracing::error!("{e}; nothing is programmed until the manifests load");
                }
            }
        }
        stats.attempts.send_modify(|a| *a += 1);

        // Wait for a change, then for the writes to settle.
        tokio::select! {
            event = events.recv() => {
                if event.is_none() {
                    return Ok(());
                }
            }
            _ = tx.closed() => return Ok(()),
        }
        loop {
            tokio::select! {
                more = events.recv() => if more.is_none() { return Ok(()) },
                _ = tokio::time::sleep(SETTLE) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{source, test_support::ScratchDir};

    const SVC: &str = "kind: Service\napiVersion: v1\nmetadata: { name: web, namespace: default }\nspec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }\n";
    const SLICE: &str = "kind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }\naddressType: IPv4\nports: [ { port: 8080 } ]\nendpoints: [ { addresses: [10.0.0.1] } ]\n";

    /// A failure guard only: every wait below is for an event, not for time to pass.
    const GUARD: Duration = Duration::from_secs(20);

    async fn next(rx: &mut source::SnapshotReceiver) -> Arc<Snapshot> {
        tokio::time::timeout(GUARD, rx.changed())
            .await
            .expect("a snapshot in time")
            .expect("source alive");
        rx.borrow_and_update().clone().expect("published")
    }

    #[tokio::test]
    async fn loads_reloads_and_keeps_unchanged_objects() {
        let dir = ScratchDir::new("files-reload");
        dir.write("svc.yaml", SVC).write("slice.yaml", SLICE);
        let (tx, mut rx) = source::channel();
        let stats = FilesSourceStats::new();
        let task = tokio::spawn(run(dir.path().to_path_buf(), tx, stats.clone()));

        let first = next(&mut rx).await;
        assert_eq!((first.services.len(), first.endpoint_slices.len()), (1, 1));

        dir.write("slice.yaml", &SLICE.replace("10.0.0.1", "10.0.0.2"));
        let second = next(&mut rx).await;
        assert_eq!(
            second.endpoint_slices[0].endpoints.as_ref().unwrap()[0].addresses,
            ["10.0.0.2"]
        );
        assert!(
            Arc::ptr_eq(&first.services[0], &second.services[0]),
            "the unchanged Service kept its Arc"
        );
        assert!(!Arc::ptr_eq(
            &first.endpoint_slices[0],
            &second.endpoint_slices[0]
        ));

        drop(rx);
        // With no receiver the source stops at its next wake-up.
        dir.write("svc.yaml", SVC);
        tokio::time::timeout(GUARD, task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("ok");
    }

    #[tokio::test]
    async fn an_invalid_file_keeps_the_last_good_state_until_fixed() {
        let dir = ScratchDir::new("files-invalid");
        dir.write("svc.yaml", SVC).write("slice.yaml", SLICE);
        let (tx, mut rx) = source::channel();
        let stats = FilesSourceStats::new();
        let _task = tokio::spawn(run(dir.path().to_path_buf(), tx, stats.clone()));
        next(&mut rx).await;
        let attempts = stats.attempts();

        dir.write("svc.yaml", &SVC.replace("nodePort: 30080", "nodePort: abc"));
        tokio::time::timeout(GUARD, stats.wait_for_attempts(attempts + 1))
            .await
            .expect("a reload");
        let error = stats.last_error().expect("the reload failed");
        assert!(
            error.contains("svc.yaml") && error.contains("spec.ports[0].nodePort"),
            "{error}"
        );
        assert!(
            !rx.has_changed().unwrap(),
            "nothing published for an invalid file"
        );
        assert_eq!(
            rx.borrow().as_ref().unwrap().services.len(),
            1,
            "the last good state stands"
        );

        dir.write("svc.yaml", &SVC.replace("30080", "30081"));
        let fixed = next(&mut rx).await;
        assert_eq!(
            fixed.services[0]
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .node_port,
            Some(30081)
        );
        assert!(stats.last_error().is_none());
    }

    #[tokio::test]
    async fn nothing_is_published_until_the_directory_loads() {
        let dir = ScratchDir::new("files-initial-invalid");
        dir.write(
            "svc.yaml",
            "kind: Service\napiVersion: v1\nmetadata: { namespace: default }\n",
        );
        let (tx, mut rx) = source::channel();
        let stats = FilesSourceStats::new();
        let _task = tokio::spawn(run(dir.path().to_path_buf(), tx, stats.clone()));
        tokio::time::timeout(GUARD, stats.wait_for_attempts(1))
            .await
            .expect("a first attempt");
        assert!(rx.borrow().is_none() && stats.errors() == 1);
        dir.write("svc.yaml", SVC);
        assert_eq!(next(&mut rx).await.services.len(), 1);
    }
}
