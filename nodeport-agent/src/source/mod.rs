//! Where the agent's view of the cluster comes from: the Kubernetes API (`kube`) or a directory
//! of manifest files (`files`). Either publishes complete snapshots on a watch channel; the
//! agent recomputes the desired state from the latest one (a watch channel keeps only the
//! newest value, so bursts of changes coalesce).

pub mod files;
pub mod kube;

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Everything the agent mirrors, as last seen from a source. Objects are shared: a source
/// hands out the same `Arc` for an object that did not change, which is how the agent tells
/// what changed without comparing objects.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// The node's addresses as its Node object reports them (InternalIP, ExternalIP), when the
    /// source knows the node (Kubernetes with a node name). The agent merges them with the
    /// addresses of the node's interfaces.
    pub node_addresses: Option<Vec<IpAddr>>,
    /// The node's IPv4 pod networks as its Node object reports them (spec.podCIDRs), when the
    /// source knows the node: never an outside client's source.
    pub pod_cidrs: Option<Vec<crate::model::Ipv4Prefix>>,
    /// The node's zone, its Node's `topology.kubernetes.io/zone` label, when the source knows
    /// the node and the label is set: endpoints' zone hints are matched against it. A Node in
    /// the manifests directory named like this node supplies it in manifests mode.
    pub node_zone: Option<String>,
    /// Whether the node may receive load-balanced traffic (not being deleted, not tainted
    /// for deletion), when the source knows the node: the node /healthz reports it.
    pub node_eligible: Option<bool>,
    /// Counts the snapshots a source published (1, 2, ...): logged by the source and by the
    /// agent once applied, so a change can be followed through.
    pub revision: u64,
}

/// The channel a source publishes on. `None` until the first complete list of both
/// Services and EndpointSlices has arrived: nothing is programmed before that (kube-proxy
/// waits too), so a restarting agent never removes services it simply has not heard of yet.
pub type SnapshotSender = tokio::sync::watch::Sender<Option<Arc<Snapshot>>>;
pub type SnapshotReceiver = tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>;

pub fn channel() -> (SnapshotSender, SnapshotReceiver) {
    tokio::sync::watch::channel(None)
}

/// A source's running totals, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceTotals {
    /// Watch errors from the API server, or manifest loads that failed.
    pub errors: u64,
    /// Snapshots published.
    pub snapshots: u64,
    /// Relists after the first list (410 Gone, failed lists): watch restarts.
    pub relists: u64,
}

/// The counters of whichever source runs.
#[derive(Clone, Debug)]
pub enum SourceStats {
    Files(Arc<files::FilesSourceStats>),
    Kube(Arc<kube::KubeSourceStats>),
}

impl SourceStats {
    pub fn totals(&self) -> SourceTotals {
        match self {
            Self::Files(s) => SourceTotals {
                errors: s.errors(),
                snapshots: s.loads(),
                relists: 0,
            },
            Self::Kube(s) => SourceTotals {
                errors: s.watch_errors(),
                snapshots: s.snapshots_published(),
                relists: s.relists(),
            },
        }
    }
}
