//! The node port ledger (`nodeport-agent ports`): who uses the node port range, how full it
//! is, and what to change. See docs/ledger.md for how to read it and why each finding exists.
//!
//! [`analyze`] is pure: it reads Service objects (from a cluster or from manifest files) and
//! returns a [`Ledger`], which renders as a table or serializes as the `--output json` document.

mod analysis;
mod cli;
mod load_balancer;
pub mod metrics;
mod range;
mod render;
#[cfg(test)]
mod tests;

use serde::Serialize;

pub use analysis::analyze;
pub(crate) use cli::{IP_LOCAL_PORT_RANGE, read_local_port_range};
pub use cli::{LocalPortRangeArg, OutputFormat, PortsArgs, run_ports};
pub use range::{BandName, NodePortRange, RangeError};

/// The report of one analysis; `--output json` prints it as is.
///
/// JSON shape (field names are stable, snake_case):
///
/// ```json
/// {
///   "range": {"first": 30000, "last": 32767, "size": 2768, "band_offset": 86},
///   "bands": {
///     "static": {"first": 30000, "last": 30085},      // null for ranges of 16 ports or fewer
///     "dynamic": {"first": 30086, "last": 32767}
///   },
///   "totals": {
///     "static": {"size": 86, "used": 1, "free": 85, "use_percent": 1.2},   // null like bands.static
///     "dynamic": {"size": 2682, "used": 3, "free": 2679, "use_percent": 0.1},
///     "all": {"size": 2768, "used": 4, "free": 2764, "use_percent": 0.1},
///     "consumers_by_kind": {"node_port": 2, "load_balancer_node_port": 1, "health_check_node_port": 1},
///     "unallocated": 0,        // ports a Service needs but has no nodePort for yet
///     "outside_range": 0       // claimed port numbers outside the range (not in "used")
///   },
///   "consumers": [{
///     "port": 30080, "protocols": ["TCP"], "kind": "node_port",
///     "namespace": "default", "name": "web", "port_names": ["http"], "service_ports": [80],
///     "band": "static",          // "static" | "dynamic" | null (outside the range)
///     "allocation": "manual"     // "manual" | "automatic" | "likely_manual" | "unknown"
///   }],
///   "findings": [{
///     "kind": "conflict", "severity": "critical",   // "info" | "warning" | "critical"
///     "summary": "...", "objects": [{"namespace": "...", "name": "...", "ports": [30080],
///     "note": "..."}], "reasoning": "...", "change": "..."
///   }],
///   "local_port_range": {"first": 32768, "last": 60999}   // null when not known
/// }
/// ```
///
/// "used" counts port numbers, like the API server's allocator: a TCP and a UDP port of one
/// Service on the same number are one allocation, and a number claimed twice counts once.
#[derive(Clone, Debug, Serialize)]
pub struct Ledger {
    pub range: RangeSummary,
    pub bands: Bands,
    pub totals: Totals,
    /// Sorted by port, then namespace/name, then kind.
    pub consumers: Vec<Consumer>,
    /// Sorted by severity (critical first), then kind.
    pub findings: Vec<Finding>,
    /// The node's `net.ipv4.ip_local_port_range` the analysis was given.
    pub local_port_range: Option<PortSpan>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RangeSummary {
    pub first: u16,
    pub last: u16,
    pub size: u32,
    /// KEP-3668 static band size; 0 when the range is not split.
    pub band_offset: u32,
}

/// An inclusive run of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortSpan {
    pub first: u16,
    pub last: u16,
}

impl PortSpan {
    pub fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl std::fmt::Display for PortSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Bands {
    #[serde(rename = "static")]
    pub static_band: Option<PortSpan>,
    pub dynamic: PortSpan,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Totals {
    #[serde(rename = "static")]
    pub static_band: Option<Usage>,
    pub dynamic: Usage,
    pub all: Usage,
    pub consumers_by_kind: ConsumerCounts,
    pub unallocated: u32,
    pub outside_range: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub size: u32,
    pub used: u32,
    pub free: u32,
    /// used / size in percent, one decimal.
    pub use_percent: f64,
}

impl Usage {
    fn new(size: u32, used: u32) -> Self {
        let tenths = (u64::from(used) * 1000 + u64::from(size) / 2) / u64::from(size.max(1));
        Self {
            size,
            used,
            free: size - used,
            use_percent: tenths as f64 / 10.0,
        }
    }

    /// `used >= percent% of size`, exactly (no float rounding at the thresholds).
    fn at_least_percent(&self, percent: u32) -> bool {
        u64::from(self.used) * 100 >= u64::from(percent) * u64::from(self.size)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerCounts {
    pub node_port: u32,
    pub load_balancer_node_port: u32,
    pub health_check_node_port: u32,
}

impl ConsumerCounts {
    pub fn get(&self, kind: ConsumerKind) -> u32 {
        match kind {
            ConsumerKind::NodePort => self.node_port,
            ConsumerKind::LoadBalancerNodePort => self.load_balancer_node_port,
            ConsumerKind::HealthCheckNodePort => self.health_check_node_port,
        }
    }
}

/// One Service's use of one port number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Consumer {
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`; a health check node port is `TCP` (kube-proxy serves HTTP on it).
    pub protocols: Vec<String>,
    pub kind: ConsumerKind,
    pub namespace: String,
    pub name: String,
    /// Names of the Service ports using this node port ("" for an unnamed port); empty for a
    /// health check node port.
    pub port_names: Vec<String>,
    /// `spec.ports[].port` of those Service ports.
    pub service_ports: Vec<i32>,
    /// `None` when the port is outside the range.
    pub band: Option<BandName>,
    pub allocation: Allocation,
    /// Which allocator entry this is: two consumers on one port with different claims
    /// conflict. Not part of the report.
    #[serde(skip)]
    pub(crate) claim: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerKind {
    /// `spec.ports[].nodePort` of a NodePort Service.
    NodePort,
    /// `spec.ports[].nodePort` of a LoadBalancer Service.
    LoadBalancerNodePort,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy Local.
    HealthCheckNodePort,
}

impl ConsumerKind {
    pub const ALL: [ConsumerKind; 3] = [
        ConsumerKind::NodePort,
        ConsumerKind::LoadBalancerNodePort,
        ConsumerKind::HealthCheckNodePort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::NodePort => "node_port",
            ConsumerKind::LoadBalancerNodePort => "load_balancer_node_port",
            ConsumerKind::HealthCheckNodePort => "health_check_node_port",
        }
    }
}

/// How a port came to be chosen, as far as the Service object tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Allocation {
    /// The Service's apply record (`kubectl.kubernetes.io/last-applied-configuration`, or a
    /// server-side apply entry in `metadata.managedFields`) sets this port.
    Manual,
    /// An apply record exists and does not set it: the API server allocated it (unless a
    /// later patch set it by hand, which leaves no trace).
    Automatic,
    /// No apply record, but the port is in the static band while the dynamic band has room:
    /// automatic allocation only goes there once the dynamic band is full (or did so before
    /// KEP-3668, Kubernetes < 1.27/1.28), so it was most likely chosen by hand.
    LikelyManual,
    /// Nothing tells.
    Unknown,
}

impl Allocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Manual => "manual",
            Allocation::Automatic => "automatic",
            Allocation::LikelyManual => "likely_manual",
            Allocation::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a finding is about; the `kind` label of `nodeport_range_findings`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Every port of the range is used.
    RangeFull,
    /// At least 95% used.
    RangeAbove95Percent,
    /// At least 80% used.
    RangeAbove80Percent,
    /// Ports Services need that have no nodePort yet (and whether enough are free).
    UnallocatedNodePorts,
    /// One port number claimed by more than one allocation.
    Conflict,
    /// The dynamic band is full: automatic allocation now eats the static band.
    DynamicBandFull,
    /// Claimed ports outside the range.
    OutsideRange,
    /// Hand-picked ports in the dynamic band.
    ManualPortInDynamicBand,
    /// The node's ephemeral port range overlaps the node port range.
    LocalPortRangeOverlap,
    /// LoadBalancer node ports that the load balancer demonstrably does not use.
    LoadBalancerNodePortsUnneeded,
    /// LoadBalancer node ports that may be unneeded, depending on the load balancer.
    LoadBalancerNodePortsMaybeUnneeded,
    /// healthCheckNodePorts of externalTrafficPolicy Local Services.
    HealthCheckNodePort,
    /// nodePort / healthCheckNodePort fields the Service type does not use.
    IgnoredNodePort,
}

impl FindingKind {
    pub const ALL: [FindingKind; 13] = [
        FindingKind::RangeFull,
        FindingKind::RangeAbove95Percent,
        FindingKind::RangeAbove80Percent,
        FindingKind::UnallocatedNodePorts,
        FindingKind::Conflict,
        FindingKind::DynamicBandFull,
        FindingKind::OutsideRange,
        FindingKind::ManualPortInDynamicBand,
        FindingKind::LocalPortRangeOverlap,
        FindingKind::LoadBalancerNodePortsUnneeded,
        FindingKind::LoadBalancerNodePortsMaybeUnneeded,
        FindingKind::HealthCheckNodePort,
        FindingKind::IgnoredNodePort,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::RangeFull => "range_full",
            FindingKind::RangeAbove95Percent => "range_above_95_percent",
            FindingKind::RangeAbove80Percent => "range_above_80_percent",
            FindingKind::UnallocatedNodePorts => "unallocated_node_ports",
            FindingKind::Conflict => "conflict",
            FindingKind::DynamicBandFull => "dynamic_band_full",
            FindingKind::OutsideRange => "outside_range",
            FindingKind::ManualPortInDynamicBand => "manual_port_in_dynamic_band",
            FindingKind::LocalPortRangeOverlap => "local_port_range_overlap",
            FindingKind::LoadBalancerNodePortsUnneeded => "load_balancer_node_ports_unneeded",
            FindingKind::LoadBalancerNodePortsMaybeUnneeded => {
                "load_balancer_node_ports_maybe_unneeded"
            }
            FindingKind::HealthCheckNodePort => "health_check_node_port",
            FindingKind::IgnoredNodePort => "ignored_node_port",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    /// One line: what is the matter.
    pub summary: String,
    /// The Services concerned (empty for findings about the range as a whole).
    pub objects: Vec<FindingObject>,
    /// Why it matters and how sure the analysis is.
    pub reasoning: String,
    /// The concrete change.
    pub change: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FindingObject {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<u16>,
    /// What applies to this Service in particular (evidence, per-object advice).
    pub note: Option<String>,
}

impl Ledger {
    /// The findings of one kind.
    pub fn findings_of(&self, kind: FindingKind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }

    /// The most severe finding's severity, `None` without findings.
    pub fn worst_severity(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }
}
