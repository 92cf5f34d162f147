//! The manifests-directory source (`--manifests DIR`): Services and EndpointSlices from YAML
//! files, reloaded when files change, and the node's zone from a Node named like the agent's
//! node (`--node-name`) if the directory holds one. Used by the demo, the end-to-end tests and single
//! machines without a cluster.
//!
//! An invalid file is reported (file, document, object, field) and ignored: the last good
//! state stays programmed. Nothing is published until the directory loads once. Objects equal
//! to the previous load keep their `Arc` (manifests::ParseCache), so only what really changed
//! is recomputed.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use k8s_openapi::api::core::v1::Node;

use super::{Snapshot, SnapshotSender};
use crate::manifests::{self, ManifestError, ParseCache};

/// Quiet time before reloading while a file is still open for writing (editors write in
/// several steps); a file closed or renamed into place is read at once.
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

/// Whether two loads hold the same objects and zone. The parse cache keeps the `Arc` of every
/// object that did not change, so identity is equality here.
fn same_objects(a: &Snapshot, b: &Snapshot) -> bool {
    fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
    }
    same(&a.services, &b.services)
        && same(&a.endpoint_slices, &b.endpoint_slices)
        && a.node_zone == b.node_zone
}

/// The zone of the Node named `node_name` among `nodes` (its `topology.kubernetes.io/zone`
/// label), as the Kubernetes source reads it from the API. Nodes of other names are logged
/// and ignored: a directory shared by several machines may describe them all.
fn node_zone(nodes: &[(manifests::Origin, Arc<Node>)], node_name: &str) -> Option<String> {
    let mut zone = None;
    for (origin, node) in nodes {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        if name == node_name {
            zone = super::kube::node_zone(node);
        } else {
            tracing::debug!(%origin, node = name, this_node = node_name, "ignoring the Node of another node");
        }
    }
    zone
}

/// Loads `dir` on a blocking thread (it reads files), reusing the parse of unchanged files.
async fn load(
    dir: &Path,
    cache: ParseCache,
) -> (ParseCache, Result<manifests::Manifests, ManifestError>) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut cache = cache;
        let loaded = manifests::load_dir_cached(&dir, &mut cache);
        (cache, loaded)
    })
    .await
    .expect("the loader does not panic")
}

/// What a file event means for the next reload.
#[derive(Debug, PartialEq, Eq)]
enum EventEffect {
    /// Reads, ours included (every reload opens the files): nothing changed.
    Nothing,
    /// A writer is at work on these paths: reload once it is done.
    Writing(Vec<PathBuf>),
    /// These paths are complete: closed after writing, renamed, or removed.
    Done(Vec<PathBuf>),
    /// Something changed and there is nothing to wait for (a directory, metadata).
    Changed,
}

fn effect_of(event: &notify::Event) -> EventEffect {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            EventEffect::Done(event.paths.clone())
        }
        EventKind::Access(_) => EventEffect::Nothing,
        EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
            EventEffect::Writing(event.paths.clone())
        }
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => {
            EventEffect::Done(event.paths.clone())
        }
        _ => EventEffect::Changed,
    }
}

/// Paths being written since the last reload.
#[derive(Default)]
struct Writers(HashSet<PathBuf>);

impl Writers {
    fn note(&mut self, effect: Result<EventEffect, String>) {
        match effect {
            Ok(EventEffect::Writing(paths)) => self.0.extend(paths),
            Ok(EventEffect::Done(paths)) => paths.iter().for_each(|path| {
                self.0.remove(path);
            }),
            // Errors too mean "look again": the reload will say what is wrong.
            Ok(EventEffect::Nothing | EventEffect::Changed) | Err(_) => {}
        }
    }
}

/// What `dir` names now, following symlinks (device, inode); None when it does not exist.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// Keeps the recursive watch on whatever the path names. An inotify watch follows an inode:
/// after `mv DIR DIR.old; mkdir DIR` (or a symlink DIR pointed elsewhere) it would keep
/// reporting DIR.old and never the new files. The parent directory is watched too, for DIR
/// being created, replaced or removed, and the watch moves when DIR's identity changes.
struct Follow {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    /// The identity the recursive watch is on.
    watched: Option<(u64, u64)>,
    /// An event named DIR itself (moved, removed): its watch may be gone even if an inode
    /// number comes back.
    self_changed: Arc<AtomicBool>,
}

impl Follow {
    /// Moves the watch to what the path names now. Returns whether it moved to a directory
    /// that was not watched before (a new one, probably still being filled).
    fn refresh(&mut self) -> bool {
        let now = identity(&self.dir);
        let forced = self.self_changed.swap(false, Ordering::Relaxed);
        if now == self.watched && !forced {
            return false;
        }
        if self.watched.is_some() {
            let _ = self.watcher.unwatch(&self.dir);
        }
        self.watched = None;
        if now.is_none() {
            return false;
        }
        match self.watcher.watch(&self.dir, RecursiveMode::Recursive) {
            Ok(()) => {
                self.watched = now;
                tracing::info!(dir = %self.dir.display(), "watching the manifests directory");
                true
            }
            Err(e) => {
                // Tried again on the next event of the parent's watch.
                tracing::warn!(dir = %self.dir.display(), error = %e, "watching the manifests directory");
                false
            }
        }
    }
}

/// Runs until every receiver is gone. `node_name` is the agent's node: a Node of that name in
/// the directory supplies its zone.
pub async fn run(
    dir: PathBuf,
    node_name: String,
    tx: SnapshotSender,
    stats: Arc<FilesSourceStats>,
) -> Result<(), notify::Error> {
    run_settling(dir, node_name, tx, stats, SETTLE).await
}

async fn run_settling(
    dir: PathBuf,
    node_name: String,
    tx: SnapshotSender,
    stats: Arc<FilesSourceStats>,
    settle: Duration,
) -> Result<(), notify::Error> {
    // Absolute, so that the parent exists and event paths compare with it; symlinks are kept
    // (the path is what is followed).
    let dir = std::path::absolute(&dir)?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let self_changed = Arc::new(AtomicBool::new(false));
    let watcher = {
        let dir = dir.clone();
        let self_changed = self_changed.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = &event {
                // The parent's watch reports its other entries too.
                if !event.paths.iter().any(|p| p.starts_with(&dir)) {
                    return;
                }
                // Reads of DIR (every reload opens it) say nothing about it.
                use notify::EventKind::{Create, Modify, Remove};
                let replaced = matches!(
                    event.kind,
                    Create(_) | Remove(_) | Modify(notify::event::ModifyKind::Name(_))
                );
                if replaced && event.paths.contains(&dir) {
                    self_changed.store(true, Ordering::Relaxed);
                }
            }
            let effect = event.as_ref().map(effect_of).map_err(|e| e.to_string());
            if effect != Ok(EventEffect::Nothing) {
                let _ = events_tx.send(effect);
            }
        })?
    };
    let mut follow = Follow {
        watcher,
        dir: dir.clone(),
        watched: None,
        self_changed,
    };
    if let Some(parent) = dir.parent() {
        follow.watcher.watch(parent, RecursiveMode::NonRecursive)?;
    }
    follow.refresh();

    let mut cache = ParseCache::default();
    let mut published: Option<Arc<Snapshot>> = None;
    let mut revision = 0u64;
    loop {
        // Before reading, so that what changes after the read is reported by the watch.
        if follow.refresh() && published.is_some() {
            // A directory put in place of the old one is probably being filled (`mkdir DIR;
            // cp ... DIR`): wait for a quiet spell rather than publish it half-copied.
            loop {
                tokio::select! {
                    more = events.recv() => if more.is_none() { return Ok(()) },
                    _ = tokio::time::sleep(settle) => break,
                }
            }
            follow.refresh();
        }
        let (kept, loaded) = load(&dir, cache).await;
        cache = kept;
        match loaded {
            Ok(loaded) => {
                stats.loads.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("not poisoned") = None;
                let mut snapshot = Snapshot {
                    services: loaded.services.into_iter().map(|(_, s)| s).collect(),
                    endpoint_slices: loaded.endpoint_slices.into_iter().map(|(_, s)| s).collect(),
                    node_zone: node_zone(&loaded.nodes, &node_name),
                    ..Snapshot::default()
                };
                if published
                    .as_ref()
                    .is_none_or(|previous| !same_objects(previous, &snapshot))
                {
                    revision += 1;
                    snapshot.revision = revision;
                    tracing::info!(
                        revision,
                        dir = %dir.display(),
                        services = snapshot.services.len(),
                        endpoint_slices = snapshot.endpoint_slices.len(),
                        zone = ?snapshot.node_zone,
                        "manifests loaded"
                    );
                    let snapshot = Arc::new(snapshot);
                    if tx.send(Some(snapshot.clone())).is_err() {
                        return Ok(());
                    }
                    published = Some(snapshot);
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("not poisoned") = Some(e.to_string());
                if published.is_some() {
                    tracing::error!("{e}; keeping the last good state");
                } else {
                    tracing::error!("{e}; nothing is programmed until the manifests load");
                }
            }
        }
        stats.attempts.send_modify(|a| *a += 1);

        // Wait for a change, then for its writers to finish: at once when every file written
        // has been closed or renamed into place, else after a quiet spell (a writer that never
        // closes, a symlink created in place).
        let mut writers = Writers::default();
        tokio::select! {
            event = events.recv() => match event {
                Some(effect) => writers.note(effect),
                None => return Ok(()),
            },
            _ = tx.closed() => return Ok(()),
        }
        loop {
            if writers.0.is_empty() {
                // Take in what is already queued, then reload without waiting.
                match events.try_recv() {
                    Ok(effect) => {
                        writers.note(effect);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            tokio::select! {
                more = events.recv() => match more {
                    Some(effect) => writers.note(effect),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(settle) => break,
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

    /// The agent's node name.
    const NODE: &str = "node-a";

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
        let task = tokio::spawn(run(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            stats.clone(),
        ));

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
        let _task = tokio::spawn(run(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            stats.clone(),
        ));
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
    async fn a_file_closed_or_renamed_into_place_is_read_without_waiting() {
        let dir = ScratchDir::new("files-no-wait");
        dir.write("svc.yaml", SVC);
        let (tx, mut rx) = source::channel();
        let stats = FilesSourceStats::new();
        // A settle time no test outlives: only finished writes can trigger these reloads.
        let forever = Duration::from_secs(24 * 3600);
        let _task = tokio::spawn(run_settling(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            stats.clone(),
            forever,
        ));
        assert_eq!(next(&mut rx).await.endpoint_slices.len(), 0);

        // Written in place: create, write, close.
        dir.write("slice.yaml", SLICE);
        assert_eq!(next(&mut rx).await.endpoint_slices.len(), 1);

        // Written aside and renamed into place, as kubelet and careful tools do.
        dir.write(".slice.yaml.tmp", &SLICE.replace("10.0.0.1", "10.0.0.9"));
        std::fs::rename(
            dir.path().join(".slice.yaml.tmp"),
            dir.path().join("slice.yaml"),
        )
        .unwrap();
        let renamed = next(&mut rx).await;
        assert_eq!(
            renamed.endpoint_slices[0].endpoints.as_ref().unwrap()[0].addresses,
            ["10.0.0.9"]
        );

        std::fs::remove_file(dir.path().join("slice.yaml")).unwrap();
        assert_eq!(next(&mut rx).await.endpoint_slices.len(), 0);
    }

    fn node_port(snapshot: &Snapshot) -> Option<i32> {
        snapshot.services.first()?.spec.as_ref()?.ports.as_ref()?[0].node_port
    }

    /// Snapshots until one satisfies `done` (earlier ones, such as an empty directory seen
    /// between `mkdir` and `cp`, are legitimate states).
    async fn until(rx: &mut source::SnapshotReceiver, done: impl Fn(&Snapshot) -> bool) {
        loop {
            if done(&*next(rx).await) {
                return;
            }
        }
    }

    /// Issue #16: `mv DIR DIR.old; mkdir DIR; cp ... DIR` left the watch on the old directory:
    /// the agent never saw the new files. The source follows the path, not the inode, also
    /// when DIR is a symlink that is swapped.
    #[tokio::test]
    async fn a_replaced_directory_is_followed() {
        let scratch = ScratchDir::new("files-replaced");
        let dir = scratch.path().join("manifests");
        scratch.write("manifests/svc.yaml", SVC);
        let (tx, mut rx) = source::channel();
        let _task = tokio::spawn(run(dir.clone(), NODE.into(), tx, FilesSourceStats::new()));
        assert_eq!(node_port(&*next(&mut rx).await), Some(30080));

        std::fs::rename(&dir, scratch.path().join("manifests.old")).unwrap();
        scratch.write("manifests/svc.yaml", &SVC.replace("30080", "30081"));
        until(&mut rx, |s| node_port(s) == Some(30081)).await;

        // Edits inside the new directory are seen too (the watch moved with the path).
        scratch.write("manifests/svc.yaml", &SVC.replace("30080", "30082"));
        until(&mut rx, |s| node_port(s) == Some(30082)).await;
        // The old directory is not watched any more.
        scratch.write("manifests.old/svc.yaml", &SVC.replace("30080", "30089"));
        scratch.write("manifests/svc.yaml", &SVC.replace("30080", "30083"));
        assert_eq!(node_port(&*next(&mut rx).await), Some(30083));

        // DIR as a symlink, pointed elsewhere by an atomic rename.
        let linked = scratch.path().join("linked");
        scratch.write("v1/svc.yaml", SVC);
        scratch.write("v2/svc.yaml", &SVC.replace("30080", "30084"));
        std::os::unix::fs::symlink("v1", &linked).unwrap();
        let (tx, mut rx) = source::channel();
        let _task = tokio::spawn(run(
            linked.clone(),
            NODE.into(),
            tx,
            FilesSourceStats::new(),
        ));
        assert_eq!(node_port(&*next(&mut rx).await), Some(30080));
        std::os::unix::fs::symlink("v2", scratch.path().join("linked.tmp")).unwrap();
        std::fs::rename(scratch.path().join("linked.tmp"), &linked).unwrap();
        until(&mut rx, |s| node_port(s) == Some(30084)).await;
        scratch.write("v2/svc.yaml", &SVC.replace("30080", "30085"));
        until(&mut rx, |s| node_port(s) == Some(30085)).await;
    }

    /// The kubelet's ConfigMap volume: visible files are symlinks into `..data`, a symlink to
    /// a timestamped directory; an update writes a new timestamped directory, swaps `..data`
    /// by renaming a new symlink over it, and removes the old directory.
    #[tokio::test]
    async fn a_config_map_volume_update_is_followed() {
        let dir = ScratchDir::new("files-configmap");
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap()
        };
        dir.write("..2026_01_01_00_00_00.000/svc.yaml", SVC);
        link("..2026_01_01_00_00_00.000", "..data");
        link("..data/svc.yaml", "svc.yaml");
        let (tx, mut rx) = source::channel();
        let _task = tokio::spawn(run(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            FilesSourceStats::new(),
        ));
        assert_eq!(node_port(&*next(&mut rx).await), Some(30080));

        for (i, port) in [(1, "30081"), (2, "30082")] {
            let old = format!("..2026_01_01_00_00_0{}.000", i - 1);
            let new = format!("..2026_01_01_00_00_0{i}.000");
            dir.write(&format!("{new}/svc.yaml"), &SVC.replace("30080", port));
            dir.write(&format!("{new}/slice.yaml"), SLICE);
            link(&new, "..data_tmp");
            std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
            if i == 1 {
                link("..data/slice.yaml", "slice.yaml");
            }
            std::fs::remove_dir_all(dir.path().join(old)).unwrap();
            let want: i32 = port.parse().unwrap();
            until(&mut rx, |s| {
                node_port(s) == Some(want) && s.endpoint_slices.len() == 1
            })
            .await;
        }
    }

    #[test]
    fn reads_are_not_changes_and_open_writes_are_waited_for() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, MetadataKind, ModifyKind,
            RemoveKind, RenameMode,
        };
        let path = PathBuf::from("/m/svc.yaml");
        let effect = |kind| effect_of(&notify::Event::new(kind).add_path(path.clone()));
        // Every reload opens and reads the files; taking that for a change reloaded forever.
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ] {
            assert_eq!(effect(kind), EventEffect::Nothing, "{kind:?}");
        }
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        ] {
            assert_eq!(effect(kind), EventEffect::Writing(vec![path.clone()]));
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(effect(kind), EventEffect::Done(vec![path.clone()]));
        }
        for kind in [
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        ] {
            assert_eq!(effect(kind), EventEffect::Changed);
        }

        let mut writers = Writers::default();
        writers.note(Ok(effect(EventKind::Create(CreateKind::File))));
        writers.note(Ok(effect(EventKind::Modify(ModifyKind::Data(
            DataChange::Any,
        )))));
        assert!(!writers.0.is_empty(), "still being written");
        writers.note(Ok(effect(EventKind::Access(AccessKind::Close(
            AccessMode::Write,
        )))));
        assert!(writers.0.is_empty(), "closed: reload now");
    }

    /// A Node named like the agent's node supplies the zone; other Nodes are ignored. A new
    /// zone label publishes a snapshot even though no Service or EndpointSlice changed.
    #[tokio::test]
    async fn the_zone_comes_from_this_nodes_node_object() {
        let node = |name: &str, zone: &str| {
            format!(
                "kind: Node\napiVersion: v1\nmetadata: {{ name: {name}, labels: {{ topology.kubernetes.io/zone: {zone}, kubernetes.io/os: linux }} }}\n"
            )
        };
        let dir = ScratchDir::new("files-zone");
        dir.write("svc.yaml", SVC).write(
            "nodes.yaml",
            &format!("{}---\n{}", node("node-b", "zone-b"), node(NODE, "zone-a")),
        );
        let (tx, mut rx) = source::channel();
        let stats = FilesSourceStats::new();
        let _task = tokio::spawn(run(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            stats.clone(),
        ));
        let first = next(&mut rx).await;
        assert_eq!(first.node_zone.as_deref(), Some("zone-a"));
        assert_eq!(
            first.node_addresses, None,
            "only the zone is read from the Node"
        );

        // Another node's zone changes nothing; this node's does.
        let attempts = stats.attempts();
        dir.write(
            "nodes.yaml",
            &format!("{}---\n{}", node("node-b", "zone-c"), node(NODE, "zone-a")),
        );
        tokio::time::timeout(GUARD, stats.wait_for_attempts(attempts + 1))
            .await
            .expect("a reload");
        assert!(
            !rx.has_changed().unwrap(),
            "another node's zone published a snapshot"
        );
        dir.write(
            "nodes.yaml",
            &format!("{}---\n{}", node("node-b", "zone-c"), node(NODE, "zone-b")),
        );
        let second = next(&mut rx).await;
        assert_eq!(second.node_zone.as_deref(), Some("zone-b"));
        assert!(Arc::ptr_eq(&first.services[0], &second.services[0]));

        dir.write("nodes.yaml", &node("node-b", "zone-a"));
        assert_eq!(next(&mut rx).await.node_zone, None);
    }

    #[test]
    fn only_the_named_nodes_zone_counts_and_an_empty_label_is_none() {
        let node = |name: &str, labels: &str| {
            let yaml = format!("metadata: {{ name: {name}, labels: {{ {labels} }} }}");
            let node: Node = serde_norway::from_str(&yaml).unwrap();
            (
                manifests::Origin {
                    file: "nodes.yaml".into(),
                    document: 1,
                },
                Arc::new(node),
            )
        };
        let nodes = [
            node("node-b", "topology.kubernetes.io/zone: zone-b"),
            node(NODE, "topology.kubernetes.io/zone: zone-a"),
        ];
        assert_eq!(node_zone(&nodes, NODE).as_deref(), Some("zone-a"));
        assert_eq!(node_zone(&nodes, "node-c"), None);
        assert_eq!(
            node_zone(&[node(NODE, "topology.kubernetes.io/zone: ''")], NODE),
            None
        );
        assert_eq!(node_zone(&[node(NODE, "a: b")], NODE), None);
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
        let _task = tokio::spawn(run(
            dir.path().to_path_buf(),
            NODE.into(),
            tx,
            stats.clone(),
        ));
        tokio::time::timeout(GUARD, stats.wait_for_attempts(1))
            .await
            .expect("a first attempt");
        assert!(rx.borrow().is_none() && stats.errors() == 1);
        dir.write("svc.yaml", SVC);
        assert_eq!(next(&mut rx).await.services.len(), 1);
    }
}
