//! The Kubernetes source: mirrors Services, EndpointSlices and (optionally) this node's Node
//! object from the API server and publishes complete [`Snapshot`]s.
//!
//! # Design
//!
//! Each kind is watched by a kube-rs [`watcher`], all namespaces, with a retry backoff in front
//! ([`RetryBackoff`]; kube's `DefaultBackoff` by default: 0.8 s doubling to 30 s, with jitter).
//! The watcher does the list-then-watch dance, resumes a dropped watch from the last
//! resourceVersion it saw and relists when the server answers 410 Gone. Its events feed a
//! [`Mirror`] per kind: the objects sorted by namespace and name, each behind an `Arc` that
//! changes only when the object does. A snapshot is a copy of the mirrors' `Arc`s, built in
//! one pass (no sorting, no copying of objects), so publishing after a change costs little
//! however large the cluster is, and the agent tells what changed by `Arc` identity.
//!
//! * **Nothing before both lists.** The channel stays `None` until the Service *and* the
//!   EndpointSlice watchers have each delivered `InitDone` once. A snapshot with Services but
//!   no EndpointSlices (or the reverse) would make the agent program services without backends,
//!   or forget ones it has simply not heard of yet. The Node is not waited for (it may not
//!   exist, or RBAC may forbid reading it): `node_addresses` is `None` until it arrives, and
//!   `None` again if the Node object disappears.
//! * **Relists are atomic.** After a 410 Gone (or a failed list) the watcher starts over with
//!   `Init`, `InitApply` per listed object, then `InitDone`. The mirror buffers the listed
//!   objects and swaps them in only at `InitDone` (as kube-runtime's reflector does), so it
//!   never holds an empty or partial list: objects that exist throughout a relist never
//!   disappear, and objects deleted while the watch was down vanish exactly at `InitDone`. An
//!   object the relist finds at the resourceVersion already held keeps its `Arc`, so a relist
//!   costs the agent only what really changed.
//! * **Resumes, not relists, on dropped connections.** A watch stream that ends (server timeout,
//!   connection closed; kube-client maps a truncated chunked body to end-of-stream in
//!   `Client::request_events`, `src/client/mod.rs`) puts the watcher back in `InitListed` and it
//!   re-watches from the last resourceVersion it saw (`step_trampolined` in kube-runtime
//!   `src/watcher.rs`, `State::Watching` → `None` arm). Bookmarks only advance that
//!   resourceVersion: the watcher swallows them (no event reaches this module).
//! * **No spurious publishes.** Events that are ready together are applied as one batch and
//!   published once; a snapshot is published only if a mirror changed (an object added,
//!   deleted, or at a new resourceVersion) or what it says of the node did (addresses, pod
//!   CIDRs, zone, eligibility), so a relist that finds nothing new, a replayed event or a Node
//!   heartbeat publishes nothing.
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
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        utils::Backoff,
        watcher::{self, DefaultBackoff, Event},
    },
};
use futures::{FutureExt as _, Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tracing::{debug, info, warn};

use super::{Snapshot, SnapshotSender};
use crate::{desired::ZONE_LABEL, model::Ipv4Prefix};

/// How the Kubernetes source is run.
#[derive(Clone, Default)]
pub struct KubeSourceConfig {
    /// The node this agent runs on (the DaemonSet's `spec.nodeName` via the downward API).
    /// When set, its Node object is watched and its InternalIP/ExternalIP addresses, pod CIDRs,
    /// zone label and eligibility are published in the [`Snapshot`].
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

/// A watcher event of any of the watched kinds (boxed: the kinds differ much in size).
enum Update {
    Service(Box<Event<Service>>),
    EndpointSlice(Box<Event<EndpointSlice>>),
    Node(Box<Event<Node>>),
}

/// A watcher's item tagged with its kind; `None` when the watcher's stream ended.
type Tagged = (Kind, Option<Result<Update, watcher::Error>>);

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

    let mut streams = vec![
        watched(
            Kind::Service,
            watcher::watcher(Api::all(client.clone()), watcher_config.clone()),
            backoff,
            |event| Update::Service(Box::new(event)),
        ),
        watched(
            Kind::EndpointSlice,
            watcher::watcher(Api::all(client.clone()), watcher_config.clone()),
            backoff,
            |event| Update::EndpointSlice(Box::new(event)),
        ),
    ];
    if let Some(name) = &node_name {
        let config = watcher_config.fields(&format!("metadata.name={name}"));
        streams.push(watched(
            Kind::Node,
            watcher::watcher(Api::all(client.clone()), config),
            backoff,
            |event| Update::Node(Box::new(event)),
        ));
    }
    let mut events = futures::stream::select_all(streams);

    let mut mirrors = Mirrors {
        services: Mirror::default(),
        slices: Mirror::default(),
        node: node_name.map(|name| (name, Mirror::default())),
        node_seen: false,
    };
    let mut published_node: Option<NodeState> = None;
    let mut dirty = false;
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
        let mut applied = 0;
        loop {
            // Every stream ends with a `None` item, so select_all itself never ends first.
            let Some((kind, Some(result))) = item else {
                let kind = item.map_or(Kind::Service, |(kind, _)| kind);
                return Err(KubeSourceError::StreamEnded(kind));
            };
            dirty |= mirrors.apply(kind, result, &stats);
            applied += 1;
            if applied == MAX_BATCH {
                break;
            }
            match events.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        if !mirrors.services.listed() || !mirrors.slices.listed() {
            continue;
        }
        let node = mirrors.node_state();
        let first = published_node.is_none();
        if !dirty && published_node.as_ref() == Some(&node) {
            continue;
        }
        let mut snapshot = mirrors.snapshot(&node);
        snapshot.revision = stats.snapshots_published() + 1;
        if first {
            info!(
                services = snapshot.services.len(),
                endpoint_slices = snapshot.endpoint_slices.len(),
                node_addresses = ?snapshot.node_addresses,
                zone = ?snapshot.node_zone,
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
        published_node = Some(node);
        dirty = false;
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

/// Wraps a watcher stream with the retry backoff and tags its events with their kind, logging
/// each. The watcher never ends (and neither backoff gives up); should it anyway, a final
/// `None` says so.
fn watched<K>(
    kind: Kind,
    stream: impl Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
    backoff: RetryBackoff,
    wrap: fn(Event<K>) -> Update,
) -> BoxStream<'static, Tagged>
where
    K: ResourceExt + Send + 'static,
{
    stream
        .backoff(backoff.build())
        .map(move |result| {
            let update = result.map(|event| {
                debug!(kind = %kind, event = %event, rv = ?resource_version(&event), "watch event");
                wrap(event)
            });
            (kind, Some(update))
        })
        .chain(futures::stream::once(async move { (kind, None) }))
        .boxed()
}

fn resource_version<K: ResourceExt>(event: &Event<K>) -> Option<String> {
    match event {
        Event::Apply(obj) | Event::Delete(obj) | Event::InitApply(obj) => obj.resource_version(),
        Event::Init | Event::InitDone => None,
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

/// The source's copy of one kind of object, sorted by namespace and name.
///
/// Public for the agent benchmark, which feeds it as the source does.
pub struct Mirror<K> {
    objects: BTreeMap<ObjectKey, Arc<K>>,
    /// The objects of a list under way (between `Init` and `InitDone`).
    listing: Option<BTreeMap<ObjectKey, Arc<K>>>,
    /// Lists completed.
    lists: u64,
}

/// Namespace (empty for cluster-scoped objects) and name.
type ObjectKey = (String, String);

impl<K> Default for Mirror<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
            lists: 0,
        }
    }
}

impl<K: ResourceExt> Mirror<K> {
    /// Applies one watcher event; returns whether the objects changed.
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                self.listing
                    .get_or_insert_default()
                    .insert(key(&obj), Arc::new(obj));
                false
            }
            Event::InitDone => {
                self.lists += 1;
                let listed = self.listing.take().unwrap_or_default();
                let mut changed = listed.len() != self.objects.len();
                let objects = listed
                    .into_iter()
                    .map(|(key, obj)| match self.objects.get(&key) {
                        // Unchanged: keep the Arc the agent already knows.
                        Some(held) if same_version(held.as_ref(), obj.as_ref()) => {
                            (key, Arc::clone(held))
                        }
                        _ => {
                            changed = true;
                            (key, obj)
                        }
                    })
                    .collect();
                self.objects = objects;
                changed
            }
            Event::Apply(obj) => {
                let key = key(&obj);
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|held| same_version(held.as_ref(), &obj))
                {
                    return false;
                }
                self.objects.insert(key, Arc::new(obj));
                true
            }
            Event::Delete(obj) => self.objects.remove(&key(&obj)).is_some(),
        }
    }

    /// Whether a first list has completed.
    pub fn listed(&self) -> bool {
        self.lists > 0
    }

    /// The objects, sorted by namespace and name.
    pub fn objects(&self) -> Vec<Arc<K>> {
        self.objects.values().cloned().collect()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&Arc<K>> {
        self.objects.get(&(namespace.to_string(), name.to_string()))
    }
}

fn key<K: ResourceExt>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn same_version<K: ResourceExt>(a: &K, b: &K) -> bool {
    let version = a.resource_version();
    version.is_some() && version == b.resource_version()
}

struct Mirrors {
    services: Mirror<Service>,
    slices: Mirror<EndpointSlice>,
    node: Option<(String, Mirror<Node>)>,
    /// This node's object has been seen: its absence since means it was deleted.
    node_seen: bool,
}

/// What the snapshot says about this node. Only these parts of the Node are compared, so a
/// change to anything else (another label, a condition, a heartbeat) publishes nothing; like
/// kube-proxy's NodeTopologyConfig, which passes on a label change only when it is to a
/// topology label.
#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    addresses: Option<Vec<IpAddr>>,
    pod_cidrs: Option<Vec<Ipv4Prefix>>,
    zone: Option<String>,
    eligible: Option<bool>,
}

impl Mirrors {
    /// Applies one watcher item, logging and counting it; returns whether the Services or
    /// EndpointSlices changed (the node is compared separately, by what a snapshot says of it).
    fn apply(
        &mut self,
        kind: Kind,
        result: Result<Update, watcher::Error>,
        stats: &KubeSourceStats,
    ) -> bool {
        let update = match result {
            Ok(update) => update,
            Err(err) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                let relist =
                    matches!(&err, watcher::Error::WatchError(status) if status.code == 410);
                warn!(kind = %kind, error = %err, relist, "Kubernetes watch error, retrying after a backoff");
                return false;
            }
        };
        let (changed, lists_before, lists_after) = match update {
            Update::Service(event) => note(&mut self.services, *event, stats),
            Update::EndpointSlice(event) => note(&mut self.slices, *event, stats),
            Update::Node(event) => match &mut self.node {
                Some((name, mirror)) => {
                    let (_, before, after) = note(mirror, *event, stats);
                    self.node_seen |= mirror.get("", name).is_some();
                    (false, before, after)
                }
                None => (false, 0, 0),
            },
        };
        if lists_after > lists_before {
            if lists_before > 0 {
                stats.relists.fetch_add(1, Ordering::Relaxed);
                info!(kind = %kind, "relist complete");
            } else {
                debug!(kind = %kind, "initial list complete");
            }
        }
        changed
    }

    fn node_state(&self) -> NodeState {
        let node = self
            .node
            .as_ref()
            .and_then(|(name, mirror)| mirror.get("", name));
        NodeState {
            addresses: node.map(|n| node_addresses(n)),
            pod_cidrs: node.map(|n| node_pod_cidrs(n)),
            zone: node.and_then(|n| node_zone(n)),
            // A deleted Node takes no more load-balanced traffic: kube-proxy's /healthz fails
            // then too (NodeEligibleHandler.OnNodeDelete in pkg/proxy/node.go; newer versions'
            // NodeManager exits).
            eligible: match node {
                Some(n) => Some(node_eligible(n)),
                None => self.node_seen.then_some(false),
            },
        }
    }

    fn snapshot(&self, node: &NodeState) -> Snapshot {
        Snapshot {
            services: self.services.objects(),
            endpoint_slices: self.slices.objects(),
            node_addresses: node.addresses.clone(),
            pod_cidrs: node.pod_cidrs.clone(),
            node_zone: node.zone.clone(),
            node_eligible: node.eligible,
            revision: 0,
        }
    }
}

/// Applies `event` to `mirror`, counting watch events; returns (changed, lists before, after).
fn note<K: ResourceExt>(
    mirror: &mut Mirror<K>,
    event: Event<K>,
    stats: &KubeSourceStats,
) -> (bool, u64, u64) {
    if matches!(event, Event::Apply(_) | Event::Delete(_)) {
        stats.events_applied.fetch_add(1, Ordering::Relaxed);
    }
    if matches!(event, Event::Init) {
        debug!("listing");
    }
    let before = mirror.lists;
    let changed = mirror.apply(event);
    (changed, before, mirror.lists)
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

/// The node's zone: its `topology.kubernetes.io/zone` label; `None` when unset or empty, which
/// kube-proxy does not tell apart either (both are the zone "").
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|zone| !zone.is_empty())
        .cloned()
}

/// The node's IPv4 pod networks (spec.podCIDRs, else spec.podCIDR). Others are skipped.
fn node_pod_cidrs(node: &Node) -> Vec<Ipv4Prefix> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(cidrs), _) if !cidrs.is_empty() => cidrs.iter().collect(),
        (_, Some(cidr)) => vec![cidr],
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for cidr in listed {
        match Ipv4Prefix::parse(cidr) {
            Some(p) if cidr.contains('/') && !out.contains(&p) => out.push(p),
            _ => debug!(cidr = %cidr, "skipping a pod CIDR that is not an IPv4 prefix"),
        }
    }
    out
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
    fn pod_cidrs_are_the_nodes_ipv4_prefixes() {
        use k8s_openapi::api::core::v1::NodeSpec;
        let node = |cidrs: Option<Vec<&str>>, cidr: Option<&str>| Node {
            spec: Some(NodeSpec {
                pod_cidrs: cidrs.map(|c| c.into_iter().map(String::from).collect()),
                pod_cidr: cidr.map(String::from),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        let prefix = |s: &str| Ipv4Prefix::parse(s).unwrap();
        // Dual stack: the IPv6 one is skipped, as is anything that is not a prefix.
        assert_eq!(
            node_pod_cidrs(&node(
                Some(vec![
                    "10.244.1.0/24",
                    "fd00:10:244:1::/64",
                    "10.245.0.0/16",
                    "junk"
                ]),
                Some("10.244.1.0/24")
            )),
            vec![prefix("10.244.1.0/24"), prefix("10.245.0.0/16")]
        );
        // Older clusters set only spec.podCIDR.
        assert_eq!(
            node_pod_cidrs(&node(None, Some("10.244.2.0/24"))),
            vec![prefix("10.244.2.0/24")]
        );
        assert_eq!(node_pod_cidrs(&Node::default()), vec![]);
    }

    fn svc(name: &str, version: &str) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some("default".into());
        s.metadata.name = Some(name.into());
        s.metadata.resource_version = Some(version.into());
        s
    }

    fn names(mirror: &Mirror<Service>) -> Vec<String> {
        mirror.objects().iter().map(|s| s.name_any()).collect()
    }

    #[test]
    fn a_mirror_changes_only_when_an_object_does() {
        let mut m = Mirror::default();
        assert!(!m.apply(Event::Init));
        assert!(!m.apply(Event::InitApply(svc("b", "1"))));
        assert!(!m.apply(Event::InitApply(svc("a", "1"))));
        assert!(!m.listed(), "listed before InitDone");
        assert!(m.objects().is_empty(), "a list shows before InitDone");
        assert!(m.apply(Event::InitDone));
        assert!(m.listed());
        assert_eq!(names(&m), ["a", "b"], "sorted by name");

        // A replayed event changes nothing; a new version does.
        assert!(!m.apply(Event::Apply(svc("a", "1"))));
        assert!(m.apply(Event::Apply(svc("a", "2"))));
        assert!(m.apply(Event::Delete(svc("b", "1"))));
        assert!(!m.apply(Event::Delete(svc("b", "1"))));
        assert_eq!(names(&m), ["a"]);
    }

    #[test]
    fn a_relist_swaps_in_at_once_and_keeps_unchanged_objects_shared() {
        let mut m = Mirror::default();
        for event in [
            Event::Init,
            Event::InitApply(svc("keep", "1")),
            Event::InitApply(svc("change", "1")),
            Event::InitApply(svc("gone", "1")),
            Event::InitDone,
        ] {
            m.apply(event);
        }
        let before = m.objects();

        // The same list again: nothing changed, nothing to publish.
        for event in [
            Event::Init,
            Event::InitApply(svc("gone", "1")),
            Event::InitApply(svc("change", "1")),
            Event::InitApply(svc("keep", "1")),
        ] {
            assert!(!m.apply(event));
        }
        assert!(!m.apply(Event::InitDone), "an unchanged relist is a change");

        // A relist after changes: the old state stays whole until InitDone.
        for event in [
            Event::Init,
            Event::InitApply(svc("keep", "1")),
            Event::InitApply(svc("change", "2")),
            Event::InitApply(svc("new", "3")),
        ] {
            m.apply(event);
            assert_eq!(names(&m), ["change", "gone", "keep"]);
        }
        assert!(m.apply(Event::InitDone));
        assert_eq!(names(&m), ["change", "keep", "new"]);
        let after = m.objects();
        let find = |v: &[Arc<Service>], name: &str| {
            Arc::clone(v.iter().find(|s| s.name_any() == name).expect("present"))
        };
        assert!(Arc::ptr_eq(&find(&before, "keep"), &find(&after, "keep")));
        assert!(!Arc::ptr_eq(
            &find(&before, "change"),
            &find(&after, "change")
        ));
        assert_eq!(
            find(&after, "change").resource_version().as_deref(),
            Some("2")
        );
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
