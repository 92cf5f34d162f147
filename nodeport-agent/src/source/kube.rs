//! The Kubernetes source: mirrors Services, EndpointSlices and (optionally) this node's Node
//! object from the API server and publishes complete [`Snapshot`]s.
//!
//! # Design
//!
//! Each kind is watched by a kube-rs [`watcher`] feeding a [`reflector`] store, all namespaces,
//! with a retry backoff in front ([`RetryBackoff`]; kube's `DefaultBackoff` by default: 0.8 s
//! doubling to 30 s, with jitter). The watcher does the list-then-watch dance, resumes a
//! dropped watch from the last resourceVersion it saw and relists when the server answers 410
//! Gone; the store is the authoritative in-memory copy. This module only decides *when* to
//! publish: a snapshot is a sorted copy of the stores.
//!
//! * **Nothing before both lists.** The channel stays `None` until the Service *and* the
//!   EndpointSlice watchers have each delivered `InitDone` once. A snapshot with Services but
//!   no EndpointSlices (or the reverse) would make the agent program services without backends,
//!   or forget ones it has simply not heard of yet. The Node is not waited for (it may not
//!   exist, or RBAC may forbid reading it): `node_addresses` is `None` until it arrives, and
//!   `None` again if the Node object disappears.
//! * **Relists are atomic.** After a 410 Gone (or a failed list) the watcher starts over with
//!   `Init`, `InitApply` per listed object, then `InitDone`. The reflector's writer
//!   (`Writer::apply_watcher_event` in kube-runtime `src/reflector/store.rs`) buffers the
//!   `InitApply` objects in a side map and swaps that map into the store only at `InitDone`;
//!   `Init` clears only the buffer. So the store never holds an empty or partial list: objects
//!   that exist throughout a relist never disappear from it, and objects deleted while the
//!   watch was down vanish exactly at `InitDone`. This module publishes only after `Apply`,
//!   `Delete` and `InitDone` (never after `Init`/`InitApply`, which leave the store unchanged).
//! * **Resumes, not relists, on dropped connections.** A watch stream that ends (server timeout,
//!   connection closed; kube-client maps a truncated chunked body to end-of-stream in
//!   `Client::request_events`, `src/client/mod.rs`) puts the watcher back in `InitListed` and it
//!   re-watches from the last resourceVersion it saw (`step_trampolined` in kube-runtime
//!   `src/watcher.rs`, `State::Watching` → `None` arm). Bookmarks only advance that
//!   resourceVersion: the watcher swallows them (no event reaches the reflector or this module).
//! * **No spurious publishes.** Events that are ready together are applied as one batch and
//!   published once; a snapshot is published only if some object's resourceVersion (or the
//!   node's address list) differs from the last published one, so a relist that finds nothing
//!   new, or a replayed event, publishes nothing.
//! * **Gentle on the API server.** Every node runs this, so lists use `resourceVersion=0`
//!   (`ListSemantic::Any`, unpaginated), which the API server answers from its watch cache
//!   instead of a quorum read from etcd, like client-go informers (kube-proxy) do. kube-core's
//!   `ListParams::populate_qp` drops `resourceVersion=0` when a page size is set, hence no
//!   paging. The price is that a relist against a lagging API server may briefly show a
//!   slightly older state; the watch that follows catches up.
//!
//! Errors from the watchers (failed lists, failed watch starts, watch `ERROR` events such as
//! 410 Gone, broken streams) are logged, counted in [`KubeSourceStats`] and retried by the
//! backoff; they never end [`run`]. It returns `Ok` once every receiver of the channel is
//! dropped.

use std::{
    fmt,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt, reflector,
        reflector::Store,
        utils::Backoff,
        watcher::{self, DefaultBackoff},
    },
};
use futures::{FutureExt as _, Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tracing::{debug, info, warn};

use super::{Snapshot, SnapshotSender};

/// How the Kubernetes source is run.
#[derive(Clone, Default)]
pub struct KubeSourceConfig {
    /// The node this agent runs on (the DaemonSet's `spec.nodeName` via the downward API).
    /// When set, its Node object is watched and its InternalIP/ExternalIP addresses are
    /// published in [`Snapshot::node_addresses`].
    pub node_name: Option<String>,
    /// The delay between retries after a watch or list error.
    pub backoff: RetryBackoff,
    /// Counters the source updates; keep a clone of the `Arc` to export them.
    pub stats: Arc<KubeSourceStats>,
    /// Called with every snapshot just before it is sent. The channel keeps only the newest
    /// value; this sees each one (the tests record them all).
    pub on_publish: Option<PublishHook>,
}

/// See [`KubeSourceConfig::on_publish`].
pub type PublishHook = Arc<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

impl fmt::Debug for KubeSourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSourceConfig")
            .field("node_name", &self.node_name)
            .field("backoff", &self.backoff)
            .field("stats", &self.stats)
            .field("on_publish", &self.on_publish.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// The delay policy applied to every watcher after an error (it resets after a success).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetryBackoff {
    /// kube-rs's `DefaultBackoff` (client-go's parameters): exponential from 0.8 s to 30 s
    /// with jitter. The right choice against a real API server.
    #[default]
    KubeDefault,
    /// A constant delay; for tests against a fake API server.
    Fixed(Duration),
}

/// Counters kept by [`run`], readable at any time (relaxed atomics: each is monotonic, they
/// are not a consistent set).
#[derive(Debug, Default)]
pub struct KubeSourceStats {
    relists: AtomicU64,
    watch_errors: AtomicU64,
    events_applied: AtomicU64,
    snapshots_published: AtomicU64,
}

impl KubeSourceStats {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Lists completed after the first one, summed over the watched kinds (a relist follows a
    /// 410 Gone, or a failure while listing).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }

    /// Errors reported by the watchers: failed lists, failed watch requests, `ERROR` watch
    /// events (410 Gone included) and broken watch streams. Each one is followed by a backoff.
    pub fn watch_errors(&self) -> u64 {
        self.watch_errors.load(Ordering::Relaxed)
    }

    /// Watch events (added, modified, deleted) applied to the stores; list items not included.
    pub fn events_applied(&self) -> u64 {
        self.events_applied.load(Ordering::Relaxed)
    }

    /// Snapshots sent on the channel.
    pub fn snapshots_published(&self) -> u64 {
        self.snapshots_published.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The node name cannot be used in a field selector.
    #[error("invalid node name {0:?}")]
    InvalidNodeName(String),
    /// A kube-rs watcher stream ended. They are infinite, so this is a bug.
    #[error("the {0} watch stream ended unexpectedly")]
    StreamEnded(Kind),
}

/// The kinds of object the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        })
    }
}

/// What a watcher event did to its store, without the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A (re)list starts; the store is unchanged.
    Init,
    /// A listed object was buffered; the store is unchanged.
    InitApply,
    /// The listed objects replaced the store.
    InitDone,
    /// A watch event (added, modified or deleted) changed the store.
    Applied,
}

/// A watcher's item tagged with its kind; `None` when the watcher's stream ended.
type Tagged = (Kind, Option<Result<Step, watcher::Error>>);

/// Watches the cluster and publishes snapshots on `tx` until every receiver is dropped.
///
/// Snapshots list Services and EndpointSlices sorted by namespace, then name. Transient API
/// errors are retried with `config.backoff` and never returned; the errors are an invalid
/// `config.node_name` (at once) and a watcher stream ending (a bug).
pub async fn run(
    client: Client,
    config: KubeSourceConfig,
    tx: SnapshotSender,
) -> Result<(), KubeSourceError> {
    let KubeSourceConfig {
        node_name,
        backoff,
        stats,
        on_publish,
    } = config;
    if let Some(name) = &node_name
        && !valid_node_name(name)
    {
        return Err(KubeSourceError::InvalidNodeName(name.clone()));
    }

    // resourceVersion=0 lists, served from the API server's watch cache (see the module doc).
    let mut watcher_config = watcher::Config::default().any_semantic();
    watcher_config.page_size = None;

    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let mut streams = vec![
        reflected(
            Kind::Service,
            reflector(
                services_writer,
                watcher::watcher(Api::all(client.clone()), watcher_config.clone()),
            ),
            backoff,
        ),
        reflected(
            Kind::EndpointSlice,
            reflector(
                slices_writer,
                watcher::watcher(Api::all(client.clone()), watcher_config.clone()),
            ),
            backoff,
        ),
    ];
    let node = node_name.map(|name| {
        let (store, writer) = reflector::store::<Node>();
        let config = watcher_config.fields(&format!("metadata.name={name}"));
        streams.push(reflected(
            Kind::Node,
            reflector(writer, watcher::watcher(Api::all(client.clone()), config)),
            backoff,
        ));
        (name, store)
    });
    let mut events = futures::stream::select_all(streams);

    let stores = Stores {
        services,
        slices,
        node,
    };
    let mut synced = Synced::default();
    let mut published: Option<Fingerprint> = None;
    loop {
        let mut item = tokio::select! {
            biased;
            () = tx.closed() => {
                debug!("snapshot receivers gone, stopping the Kubernetes source");
                return Ok(());
            }
            item = events.next() => item,
        };
        // Apply everything that is ready now (up to MAX_BATCH events), then publish once.
        let mut dirty = false;
        let mut applied = 0;
        loop {
            // Every stream ends with a `None` item, so select_all itself never ends first.
            let Some((kind, Some(result))) = item else {
                let kind = item.map_or(Kind::Service, |(kind, _)| kind);
                return Err(KubeSourceError::StreamEnded(kind));
            };
            dirty |= synced.note(kind, result, &stats);
            applied += 1;
            if applied == MAX_BATCH {
                break;
            }
            match events.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        if !dirty || !synced.services || !synced.slices {
            continue;
        }
        // The reflectors write to the stores only while `events` is polled, so the fingerprint
        // and the snapshot below see the same contents.
        let fingerprint = stores.fingerprint();
        if published.as_ref() == Some(&fingerprint) {
            debug!("no change since the last snapshot");
            continue;
        }
        let mut snapshot = stores.snapshot(&fingerprint);
        snapshot.revision = stats.snapshots_published() + 1;
        if published.is_none() {
            info!(
                services = snapshot.services.len(),
                endpoint_slices = snapshot.endpoint_slices.len(),
                node_addresses = ?snapshot.node_addresses,
                "initial sync with the Kubernetes API complete"
            );
        } else {
            debug!(
                services = snapshot.services.len(),
                endpoint_slices = snapshot.endpoint_slices.len(),
                revision = snapshot.revision,
                "publishing a snapshot"
            );
        }
        let snapshot = Arc::new(snapshot);
        if let Some(hook) = &on_publish {
            hook(&snapshot);
        }
        if tx.send(Some(snapshot)).is_err() {
            debug!("snapshot receivers gone, stopping the Kubernetes source");
            return Ok(());
        }
        stats.snapshots_published.fetch_add(1, Ordering::Relaxed);
        published = Some(fingerprint);
    }
}

/// At most this many ready events are applied before a snapshot is published, so a long burst
/// still publishes now and then.
const MAX_BATCH: usize = 1024;

/// Node names are DNS subdomains; refuse what would change the meaning of the field selector.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Wraps a reflector stream with the retry backoff and reduces its events to [`Step`]s (the
/// objects are in the store by then), logging each. The watcher never ends (and neither
/// backoff gives up); should it anyway, a final `None` says so.
fn reflected<K>(
    kind: Kind,
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    backoff: RetryBackoff,
) -> BoxStream<'static, Tagged>
where
    K: ResourceExt + Send + 'static,
{
    stream
        .backoff(backoff.build())
        .map(move |result| {
            let step = result.map(|event| {
                debug!(kind = %kind, event = %event, rv = ?resource_version(&event), "watch event");
                match event {
                    watcher::Event::Init => Step::Init,
                    watcher::Event::InitApply(_) => Step::InitApply,
                    watcher::Event::InitDone => Step::InitDone,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Applied,
                }
            });
            (kind, Some(step))
        })
        .chain(futures::stream::once(async move { (kind, None) }))
        .boxed()
}

fn resource_version<K: ResourceExt>(event: &watcher::Event<K>) -> Option<String> {
    match event {
        watcher::Event::Apply(obj)
        | watcher::Event::Delete(obj)
        | watcher::Event::InitApply(obj) => obj.resource_version(),
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

impl RetryBackoff {
    fn build(self) -> Box<dyn Backoff> {
        match self {
            RetryBackoff::KubeDefault => Box::new(DefaultBackoff::default()),
            RetryBackoff::Fixed(delay) => Box::new(FixedBackoff(delay)),
        }
    }
}

struct FixedBackoff(Duration);

impl Iterator for FixedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl Backoff for FixedBackoff {
    fn reset(&mut self) {}
}

/// Which kinds have completed a list, and the bookkeeping that goes with each event.
#[derive(Default)]
struct Synced {
    services: bool,
    slices: bool,
    node: bool,
}

impl Synced {
    /// Records one watcher item; returns whether the store may have changed.
    fn note(
        &mut self,
        kind: Kind,
        result: Result<Step, watcher::Error>,
        stats: &KubeSourceStats,
    ) -> bool {
        let step = match result {
            Ok(step) => step,
            Err(err) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                let relist =
                    matches!(&err, watcher::Error::WatchError(status) if status.code == 410);
                warn!(kind = %kind, error = %err, relist, "Kubernetes watch error, retrying after a backoff");
                return false;
            }
        };
        match step {
            Step::Init => {
                debug!(kind = %kind, "listing");
                false
            }
            Step::InitApply => false,
            Step::InitDone => {
                let flag = match kind {
                    Kind::Service => &mut self.services,
                    Kind::EndpointSlice => &mut self.slices,
                    Kind::Node => &mut self.node,
                };
                if std::mem::replace(flag, true) {
                    stats.relists.fetch_add(1, Ordering::Relaxed);
                    info!(kind = %kind, "relist complete");
                } else {
                    debug!(kind = %kind, "initial list complete");
                }
                true
            }
            Step::Applied => {
                stats.events_applied.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Option<(String, Store<Node>)>,
}

/// What a published snapshot contained: every object's identity and resourceVersion (which
/// changes with every write), and the node's addresses.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    services: Vec<ObjectVersion>,
    slices: Vec<ObjectVersion>,
    node_addresses: Option<Vec<IpAddr>>,
    node_eligible: Option<bool>,
}

type ObjectVersion = (String, String, Option<String>);

impl Stores {
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            services: versions(&self.services),
            slices: versions(&self.slices),
            node_addresses: self.node_addresses(),
            node_eligible: self.node_eligible(),
        }
    }

    fn snapshot(&self, fingerprint: &Fingerprint) -> Snapshot {
        Snapshot {
            services: sorted(&self.services),
            endpoint_slices: sorted(&self.slices),
            node_addresses: fingerprint.node_addresses.clone(),
            node_eligible: fingerprint.node_eligible,
            revision: 0,
        }
    }

    fn node_addresses(&self) -> Option<Vec<IpAddr>> {
        let (name, store) = self.node.as_ref()?;
        let node = store.find(|node| node.metadata.name.as_deref() == Some(name))?;
        Some(node_addresses(&node))
    }

    fn node_eligible(&self) -> Option<bool> {
        let (name, store) = self.node.as_ref()?;
        let node = store.find(|node| node.metadata.name.as_deref() == Some(name))?;
        Some(node_eligible(&node))
    }
}

/// The cluster autoscaler's taint on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's node eligibility (pkg/proxy/healthcheck): not while the Node is being
/// deleted or the cluster autoscaler has tainted it for deletion.
fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

fn key<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn versions<K>(store: &Store<K>) -> Vec<ObjectVersion>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut versions: Vec<_> = store
        .state()
        .iter()
        .map(|obj| {
            let (namespace, name) = key(obj.as_ref());
            (namespace, name, ResourceExt::resource_version(obj.as_ref()))
        })
        .collect();
    versions.sort();
    versions
}

/// The store's objects, sorted by namespace and name.
/// The store's objects, shared (an unchanged object keeps its `Arc`, which is how the agent
/// tells what changed), sorted by namespace and name without copying them.
fn sorted<K>(store: &Store<K>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut objects = store.state();
    objects.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (a.namespace.as_deref(), a.name.as_deref())
            .cmp(&(b.namespace.as_deref(), b.name.as_deref()))
    });
    objects
}

/// The node's InternalIP and ExternalIP addresses, in the order the Node lists them, without
/// duplicates. Addresses that do not parse are skipped.
fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    for address in listed {
        if address.type_ != "InternalIP" && address.type_ != "ExternalIP" {
            continue;
        }
        match address.address.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
            Ok(_) => {}
            Err(_) => {
                debug!(address = %address.address, "skipping a node address that is not an IP")
            }
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    use super::*;

    #[test]
    fn node_addresses_keep_internal_and_external_ips_once() {
        let address = |type_: &str, address: &str| NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        let node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![
                    address("Hostname", "node-a"),
                    address("InternalIP", "10.0.0.5"),
                    address("InternalIP", "fd00::5"),
                    address("ExternalIP", "203.0.113.5"),
                    address("ExternalIP", "10.0.0.5"),
                    address("InternalDNS", "node-a.internal"),
                    address("ExternalIP", "not-an-ip"),
                ]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        let expected: Vec<IpAddr> = ["10.0.0.5", "fd00::5", "203.0.113.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(node_addresses(&node), expected);
        assert_eq!(node_addresses(&Node::default()), Vec::<IpAddr>::new());
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        use k8s_openapi::{
            api::core::v1::{NodeSpec, Taint},
            apimachinery::pkg::apis::meta::v1::Time,
        };
        let taint = |key: &str| Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        let with_taints = |taints: Vec<Taint>| Node {
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        assert!(node_eligible(&Node::default()));
        assert!(node_eligible(&with_taints(vec![taint(
            "node.kubernetes.io/unschedulable"
        )])));
        assert!(!node_eligible(&with_taints(vec![
            taint("node.kubernetes.io/unschedulable"),
            taint(TO_BE_DELETED_TAINT),
        ])));
        let mut deleting = Node::default();
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(!node_eligible(&deleting));
    }

    #[test]
    fn node_names_that_would_change_the_field_selector_are_refused() {
        assert!(valid_node_name("ip-10-0-0-5.eu-west-1.compute.internal"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("a,metadata.name=b"));
        assert!(!valid_node_name("a b"));
    }
}
