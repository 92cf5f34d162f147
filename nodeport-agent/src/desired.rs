//! From Services and EndpointSlices to the desired datapath: a pure function with kube-proxy's
//! semantics (docs/semantics.md lists them with the kube-proxy behaviour each follows).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointHints, EndpointSlice},
};

use crate::ledger::NodePortRange;
use crate::listeners::Listener;
use crate::model::{
    BackendState, Desired, DesiredService, DesiredService6, Frontend, FrontendKind, HealthCheck,
    IpFamily, Ipv4Prefix, Ipv6Prefix, LocalEndpoints, Notice, NoticeCounts, NoticeKind, Protocol,
    ServicePortKey, parse_ip_sloppy,
};

/// The label that names a Service's proxy; kube-proxy leaves such Services to that proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label of headless Services' EndpointSlices (and of Services marked so): kube-proxy's
/// informers select objects without it (cmd/kube-proxy/app/server.go, `noHeadlessEndpoints`),
/// so neither does nodeport serve them.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// sessionAffinityConfig.clientIP.timeoutSeconds when unset.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The Node label naming the node's zone (`v1.LabelTopologyZone`), matched against endpoints'
/// zone hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the computation needs to know about this node.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    /// Matched against endpoints' nodeName to tell local backends, and against their node
    /// hints (`hints.forNodes`).
    pub node_name: String,
    /// The node's zone, its Node's `topology.kubernetes.io/zone` label; "" when it has none or
    /// the Node is not known. Matched against endpoints' zone hints (`hints.forZones`).
    pub zone: String,
    /// Node ports answer on each of these.
    pub node_addresses: Vec<Ipv4Addr>,
    /// The same for IPv6 (never link-local): the IPv6 node ports of Services with the IPv6
    /// family.
    pub node_addresses_v6: Vec<Ipv6Addr>,
    /// With a name, Services labelled with it are ours too (like another proxy's name).
    pub proxy_name: Option<String>,
    /// Ports no frontend may take.
    pub guard: PortGuard,
    /// Filter node ports by loadBalancerSourceRanges too (`--source-ranges-on-node-ports`).
    /// kube-proxy does not: "nodeports are not subject to loadBalancerSourceRanges, and we
    /// can't change that" (pkg/proxy/iptables and nftables proxier.go, syncProxyRules).
    pub source_ranges_on_node_ports: bool,
}

/// Ports of the node a frontend must never take over: XDP sees packets before the node's own
/// sockets and before the SNAT replies' lookup, so a frontend there would steal them
/// (docs/operations.md, "What the agent refuses"). The default checks nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortGuard {
    /// Node ports must lie inside it (kube-apiserver's --service-node-port-range).
    pub node_port_range: Option<NodePortRange>,
    /// --snat-port-range (one range or two): replies of SNATed connections arrive on these
    /// ports of node addresses.
    pub snat_ports: Vec<NodePortRange>,
    /// Sockets the node serves on (`listeners::read`).
    pub listeners: BTreeSet<Listener>,
}

impl PortGuard {
    /// Why a frontend on node address `addr` (one of the node's) cannot be programmed.
    fn refuse_on_node(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Option<Notice> {
        let frontend = SocketAddr::new(addr, port);
        if let Some(snat) = self.snat_ports.iter().find(|r| r.contains(port)) {
            return Some(Notice {
                kind: NoticeKind::FrontendInSnatRange,
                object: String::new(),
                detail: format!(
                    "{frontend}/{protocol} not programmed: port {port} is in the SNAT port \
                     range {snat} (--snat-port-range), where replies of SNATed connections arrive"
                ),
                counts: None,
            });
        }
        let listener = self
            .listeners
            .iter()
            .find(|l| l.covers_ip(protocol, addr, port))?;
        Some(Notice {
            kind: NoticeKind::FrontendOnHostListener,
            object: String::new(),
            detail: format!(
                "{frontend}/{protocol} not programmed: {listener} would lose its traffic"
            ),
            counts: None,
        })
    }
}

/// An address family as the computation sees it. Frontends, endpoints and backends are worked
/// out by one generic code path for both families (kube-proxy runs the same proxier code once
/// per family); `V4` feeds the datapath, `V6` the IPv6 desired state.
trait Family {
    type Addr: Copy + Ord + Into<IpAddr>;
    type Socket: Copy + Ord + Into<SocketAddr> + fmt::Display;
    /// The EndpointSlice `addressType` of this family.
    const ADDRESS_TYPE: &'static str;
    fn of(ip: IpAddr) -> Option<Self::Addr>;
    fn socket(addr: Self::Addr, port: u16) -> Self::Socket;
    /// Where this family's node ports answer.
    fn node_addresses(node: &NodeContext) -> &[Self::Addr];
}

struct V4;
struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Socket = SocketAddrV4;
    const ADDRESS_TYPE: &'static str = "IPv4";
    fn of(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }
    fn socket(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(addr, port)
    }
    fn node_addresses(node: &NodeContext) -> &[Ipv4Addr] {
        &node.node_addresses
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Socket = SocketAddrV6;
    const ADDRESS_TYPE: &'static str = "IPv6";
    fn of(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        }
    }
    fn socket(addr: Ipv6Addr, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(addr, port, 0, 0)
    }
    fn node_addresses(node: &NodeContext) -> &[Ipv6Addr] {
        &node.node_addresses_v6
    }
}

/// The families a Service has, as kube-proxy decides which of its per-family proxiers takes
/// it: a proxier takes a Service with a clusterIP of its family (`serviceToServiceMap` in
/// pkg/proxy/servicechangetracker.go, through `GetClusterIPByFamily`), which is
/// `spec.ipFamilies` (the API server fills it in with the clusterIPs), else the family of
/// `spec.clusterIP` for objects from before dual-stack. Manifest files may leave things out
/// that the API server fills in: `RequireDualStack` means both families whatever
/// `ipFamilies` lists (the API server adds the second), `PreferDualStack` without
/// `ipFamilies` both too (what a dual-stack cluster gives), and no family at all IPv4, as
/// before dual-stack.
pub fn service_families(spec: &ServiceSpec) -> BTreeSet<IpFamily> {
    let both = || BTreeSet::from([IpFamily::Ipv4, IpFamily::Ipv6]);
    if spec.ip_family_policy.as_deref() == Some("RequireDualStack") {
        return both();
    }
    let listed: BTreeSet<IpFamily> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(IpFamily::Ipv4),
            "IPv6" => Some(IpFamily::Ipv6),
            _ => None,
        })
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    if spec.ip_family_policy.as_deref() == Some("PreferDualStack") {
        return both();
    }
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None");
    match cluster_ip.and_then(parse_ip_sloppy) {
        Some(ip) => [IpFamily::of(ip)].into(),
        None => [IpFamily::Ipv4].into(),
    }
}

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// Whether this proxy should handle the Service at all.
fn is_ours(svc: &Service, node: &NodeContext) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") || spec.cluster_ip.as_deref() == Some("None") {
        return false;
    }
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return false;
    }
    match labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        None => true,
        Some(name) => node.proxy_name.as_deref() == Some(name.as_str()),
    }
}

fn protocol(value: Option<&str>) -> Option<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port_u16(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// The conditions of an endpoint with kube-proxy's defaults (pkg/proxy/endpointslicecache.go):
/// ready and serving unset mean true, terminating unset means false.
#[derive(Clone, Copy)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn conditions(ep: &Endpoint) -> Conditions {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    Conditions {
        ready,
        serving: c.and_then(|c| c.serving).unwrap_or(true),
        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
    }
}

struct Candidate<'a, A> {
    addr: A,
    local: bool,
    cond: Conditions,
    hints: Option<&'a EndpointHints>,
}

/// Endpoints of one Service port from its slices of family `F` (`addressType`): the slice
/// port with the Service port's name and protocol gives the target port (a named targetPort
/// is resolved per slice).
fn candidates<'a, F: Family>(
    key: &ServicePortKey,
    slices: &[&'a EndpointSlice],
    node: &NodeContext,
) -> Vec<Candidate<'a, F::Socket>> {
    let mut out = Vec::new();
    // Other families' slices are another proxier's; FQDN slices route nowhere.
    for slice in slices.iter().filter(|s| s.address_type == F::ADDRESS_TYPE) {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == &*key.port_name
                && protocol(p.protocol.as_deref()) == Some(key.protocol)
        }) else {
            continue;
        };
        let Some(target) = port.port.and_then(port_u16) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let local = ep.node_name.as_deref() == Some(node.node_name.as_str());
            // An endpoint is its first address, as for kube-proxy (endpointslicecache.go).
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| parse_ip_sloppy(a))
                .and_then(F::of)
            else {
                continue;
            };
            out.push(Candidate {
                addr: F::socket(ip, target),
                local,
                cond: conditions(ep),
                hints: ep.hints.as_ref(),
            });
        }
    }
    out
}

/// Which endpoints this node sends new connections to when topology hints apply: kube-proxy's
/// topology modes (pkg/proxy/topology.go, `topologyModeFromHints`, whose values are the
/// trafficDistribution names `PreferSameNode` and `PreferSameZone`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Endpoints hinted for this node (`hints.forNodes`).
    SameNode,
    /// Endpoints hinted for this node's zone (`hints.forZones`).
    SameZone,
}

/// An endpoint's node hints (`hints.forNodes[*].name`).
fn node_hints<'a, A>(c: &Candidate<'a, A>) -> &'a [k8s_openapi::api::discovery::v1::ForNode] {
    c.hints
        .and_then(|h| h.for_nodes.as_deref())
        .unwrap_or_default()
}

/// An endpoint's zone hints (`hints.forZones[*].name`).
fn zone_hints<'a, A>(c: &Candidate<'a, A>) -> &'a [k8s_openapi::api::discovery::v1::ForZone] {
    c.hints
        .and_then(|h| h.for_zones.as_deref())
        .unwrap_or_default()
}

/// kube-proxy's `topologyModeFromHints` (pkg/proxy/topology.go), with PreferSameNode's node
/// hints always read (the PreferSameTrafficDistribution feature is GA and locked on since
/// Kubernetes 1.35): SameNode if every ready endpoint has a node hint and one is hinted for
/// this node; else SameZone if every ready endpoint has a zone hint and one is hinted for this
/// node's zone; else none (every endpoint, as without hints). Unready endpoints are not
/// looked at, and without a ready endpoint there is no topology.
///
/// Like kube-proxy, it reads hints only, not the Service's `trafficDistribution` nor its
/// `service.kubernetes.io/topology-mode` annotation: the EndpointSlice controller writes
/// hints only for Services that ask for them, and hints written by another controller (or by
/// hand in a manifest) count as well.
fn topology_mode<A>(
    candidates: &[Candidate<A>],
    node_name: &str,
    zone: &str,
) -> Option<TopologyMode> {
    let mut has_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for c in candidates.iter().filter(|c| c.cond.ready) {
        has_ready = true;
        let nodes = node_hints(c);
        if nodes.is_empty() {
            all_node_hints = false;
        } else if nodes.iter().any(|n| n.name == node_name) {
            for_node = true;
        }
        let zones = zone_hints(c);
        if zones.is_empty() {
            all_zone_hints = false;
        } else if zones.iter().any(|z| z.name == zone) {
            for_zone = true;
        }
    }
    if !has_ready {
        None
    } else if all_node_hints && for_node {
        Some(TopologyMode::SameNode)
    } else if all_zone_hints && for_zone {
        Some(TopologyMode::SameZone)
    } else {
        None
    }
}

/// kube-proxy's `availableForTopology`: whether this node may send new connections to the
/// endpoint under `mode`.
fn available_for_topology<A>(
    c: &Candidate<A>,
    mode: Option<TopologyMode>,
    node_name: &str,
    zone: &str,
) -> bool {
    match mode {
        None => true,
        Some(TopologyMode::SameNode) => node_hints(c).iter().any(|n| n.name == node_name),
        Some(TopologyMode::SameZone) => zone_hints(c).iter().any(|z| z.name == zone),
    }
}

/// Backends of a service: every endpoint that still exists (so established connections can
/// finish), with those that take new connections marked, as kube-proxy's `CategorizeEndpoints`
/// (pkg/proxy/topology.go) chooses them:
///
/// - externalTrafficPolicy Cluster: the ready endpoints, narrowed by topology hints (see
///   `topology_mode`); when there is none, the serving-and-terminating ones, all of them, hints
///   or not (KEP-1669). Topology never leaves the node without an endpoint: a mode is only
///   chosen when a ready endpoint is hinted for this node or zone.
/// - externalTrafficPolicy Local: only this node's endpoints are backends; the ready ones take
///   new connections, or when none is ready the serving-and-terminating ones. Hints do not
///   apply.
///
/// Endpoints that are not serving never take new connections. An endpoint that hints send
/// elsewhere stays a backend (its established connections go on, as kube-proxy leaves their
/// conntrack entries alone) without taking new ones.
fn backends<A: Ord>(
    candidates: Vec<Candidate<A>>,
    local_only: bool,
    node: &NodeContext,
) -> BTreeMap<A, BackendState> {
    let usable: Vec<Candidate<A>> = candidates
        .into_iter()
        .filter(|c| c.local || !local_only)
        .collect();
    let topology = if local_only {
        None
    } else {
        topology_mode(&usable, &node.node_name, &node.zone)
    };
    let preferred = |c: &Candidate<A>| {
        c.cond.ready && available_for_topology(c, topology, &node.node_name, &node.zone)
    };
    let any_preferred = usable.iter().any(preferred);
    let mut out = BTreeMap::new();
    for c in usable {
        let in_table = if any_preferred {
            preferred(&c)
        } else {
            c.cond.serving && c.cond.terminating
        };
        let hinted_away = topology.is_some() && c.cond.ready && !in_table;
        let state = BackendState {
            local: c.local,
            in_table,
            serving: c.cond.serving,
            hinted_away,
        };
        // The same address twice (two slices during a rollout, or a stale one): in the table
        // if either says so, local if either does, whatever the order of the slices.
        out.entry(c.addr)
            .and_modify(|s: &mut BackendState| {
                s.in_table |= in_table;
                s.local |= c.local;
                s.serving |= c.cond.serving;
                s.hinted_away = (s.hinted_away || hinted_away) && !s.in_table;
            })
            .or_insert(state);
    }
    out
}

fn service_port_of(port: &ServicePort) -> u16 {
    port_u16(port.port).unwrap_or_default()
}

/// The frontends of family `F` of one Service port: its node port on this family's node
/// addresses, and the LoadBalancer ingress IPs and externalIPs of this family (kube-proxy's
/// proxier of a family takes only that family's VIPs: `newBaseServiceInfo` in
/// pkg/proxy/serviceport.go maps them by family).
fn frontends<F: Family>(
    svc: &Service,
    port: &ServicePort,
    key: &ServicePortKey,
    node: &NodeContext,
    has_source_ranges: bool,
    notices: &mut BTreeSet<Notice>,
) -> BTreeSet<Frontend<F::Socket>> {
    let spec = svc.spec.as_ref().expect("checked by is_ours");
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    let mut out = BTreeSet::new();
    let guard = &node.guard;
    let mut refuse = |mut notice: Notice| {
        notice.object = key.to_string();
        notices.insert(notice);
    };
    if matches!(ty, "NodePort" | "LoadBalancer")
        && let Some(node_port) = port.node_port.and_then(port_u16)
    {
        let snat = guard.snat_ports.iter().find(|r| r.contains(node_port));
        let outside = guard.node_port_range.filter(|r| !r.contains(node_port));
        match (snat, outside) {
            (Some(snat), outside) => refuse(Notice {
                kind: NoticeKind::FrontendInSnatRange,
                object: String::new(),
                detail: format!(
                    "node port {node_port}/{} not programmed: it is in the SNAT port range {snat} \
                     (--snat-port-range), where replies of SNATed connections arrive{}",
                    key.protocol,
                    outside.map_or(String::new(), |range| format!(
                        ", and outside the node port range {range} (--service-node-port-range)"
                    )),
                ),
                counts: None,
            }),
            (None, Some(range)) => refuse(Notice {
                kind: NoticeKind::NodePortOutsideRange,
                object: String::new(),
                detail: format!(
                    "node port {node_port}/{} not programmed: outside the node port range \
                     {range} (--service-node-port-range)",
                    key.protocol
                ),
                counts: None,
            }),
            (None, None) => {
                for addr in F::node_addresses(node) {
                    if let Some(n) = guard.refuse_on_node(key.protocol, (*addr).into(), node_port) {
                        refuse(n);
                        continue;
                    }
                    out.insert(Frontend {
                        addr: F::socket(*addr, node_port),
                        kind: FrontendKind::NodePort,
                        source_ranges: has_source_ranges && node.source_ranges_on_node_ports,
                    });
                }
            }
        }
    }
    // A LoadBalancer IP or externalIP uses the Service port: the node port range does not
    // apply, and a VIP the node does not own shares no socket or SNAT reply with it. One that
    // is a node address gets the node's checks.
    let mut vip_allowed = |ip: F::Addr| {
        if !F::node_addresses(node).contains(&ip) {
            return true;
        }
        match guard.refuse_on_node(key.protocol, ip.into(), service_port_of(port)) {
            Some(n) => {
                refuse(n);
                false
            }
            None => true,
        }
    };
    let Some(service_port) = port_u16(port.port) else {
        return out;
    };
    if ty == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy: the load balancer proxies to the nodes; the VIP is not ours (KEP-1860).
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let ip = ing.ip.as_deref().and_then(parse_ip_sloppy).and_then(F::of);
            if let Some(ip) = ip
                && vip_allowed(ip)
            {
                out.insert(Frontend {
                    addr: F::socket(ip, service_port),
                    kind: FrontendKind::LoadBalancer,
                    source_ranges: has_source_ranges,
                });
            }
        }
    }
    for ip in spec.external_ips.iter().flatten() {
        if let Some(ip) = parse_ip_sloppy(ip).and_then(F::of)
            && vip_allowed(ip)
        {
            out.insert(Frontend {
                addr: F::socket(ip, service_port),
                kind: FrontendKind::ExternalIp,
                source_ranges: false,
            });
        }
    }
    out
}

/// What one Service contributes, before frontend conflicts between Services are settled.
#[derive(Clone, Debug, PartialEq)]
struct ServiceOutput {
    order: ClaimOrder,
    /// Shared with the desired state when every frontend is won (the usual case).
    ports: Vec<(ServicePortKey, Arc<DesiredService>)>,
    /// The IPv6 service ports, likewise.
    ports_v6: Vec<(ServicePortKey, Arc<DesiredService6>)>,
    health: Option<(u16, HealthCheck)>,
    notices: Vec<Notice>,
}

impl ServiceOutput {
    /// The frontends this Service wants, of both families, with the port wanting each.
    fn claims(&self) -> impl Iterator<Item = (&ServicePortKey, FrontendId)> {
        let v4 = self.ports.iter().flat_map(|(pkey, ds)| {
            ds.frontends
                .iter()
                .map(move |f| (pkey, (SocketAddr::from(f.addr), pkey.protocol)))
        });
        let v6 = self.ports_v6.iter().flat_map(|(pkey, ds)| {
            ds.frontends
                .iter()
                .map(move |f| (pkey, (SocketAddr::from(f.addr), pkey.protocol)))
        });
        v4.chain(v6)
    }
}

/// A service port's entry with only the frontends it `wins`: the Service's own output (shared)
/// when it wins them all, nothing when it wins none.
fn keep_won<A: Copy + Ord + Into<SocketAddr>, P: Clone>(
    ds: Arc<DesiredService<A, P>>,
    wins: impl Fn(SocketAddr) -> bool,
) -> Option<Arc<DesiredService<A, P>>> {
    if ds.frontends.iter().all(|f| wins(f.addr.into())) {
        return Some(ds);
    }
    let mut ds = DesiredService::clone(&ds);
    ds.frontends.retain(|f| wins(f.addr.into()));
    (!ds.frontends.is_empty()).then(|| Arc::new(ds))
}

/// Who gets a frontend that has no holder (see `Reconciler::holders`): the older Service (as
/// the API server's allocators favour the first holder; a Service without creationTimestamp,
/// as in manifest files, after those with one), then namespace/name.
type ClaimOrder = (
    bool,
    Option<k8s_openapi::jiff::Timestamp>,
    Arc<str>,
    Arc<str>,
);

/// One frontend: address, port and protocol. Either family: two Services claiming one IPv6
/// frontend are settled as for IPv4.
pub type FrontendId = (SocketAddr, Protocol);

fn compute_service(svc: &Service, slices: &[&EndpointSlice], node: &NodeContext) -> ServiceOutput {
    let spec = svc.spec.as_ref().expect("is_ours checked the spec");
    // One allocation each, shared by the claim order and every port's key.
    let namespace: Arc<str> = namespace(&svc.metadata).into();
    let ns = &*namespace;
    let service_name: Arc<str> = svc.metadata.name.as_deref().unwrap_or_default().into();
    let name = &*service_name;
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let order = (
        created.is_none(),
        created,
        namespace.clone(),
        service_name.clone(),
    );
    let mut notices = BTreeSet::new();
    let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let mut source_ranges = BTreeSet::new();
    let mut source_ranges_v6 = BTreeSet::new();
    // An entry that is no CIDR at all leaves the filter on (with the valid entries, or with
    // none: nobody gets in): a typo must never open a load balancer to everyone. Entries of
    // one family do not apply to the other family's frontends, as kube-proxy filters per
    // family (`newBaseServiceInfo` maps them by family).
    let mut invalid_range = false;
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        match (Ipv4Prefix::parse(range), Ipv6Prefix::parse(range)) {
            (Some(p), _) => {
                source_ranges.insert(p);
            }
            (None, Some(p)) => {
                source_ranges_v6.insert(p);
            }
            (None, None) => {
                invalid_range = true;
                notices.insert(Notice {
                    kind: NoticeKind::InvalidSourceRange,
                    object: format!("{ns}/{name}"),
                    detail: format!(
                        "loadBalancerSourceRanges entry {range:?} is not a CIDR: the filter \
                         stays on with the other entries (with none, no client gets in) until \
                         it is fixed"
                    ),
                    counts: None,
                });
            }
        }
    }

    let families = service_families(spec);
    let mut ports = Vec::with_capacity(spec.ports.as_ref().map_or(0, Vec::len));
    let mut ports_v6 = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let Some(protocol) = protocol(port.protocol.as_deref()) else {
            notices.insert(Notice {
                kind: NoticeKind::SctpSkipped,
                object: format!("{ns}/{name}:{port_name}"),
                detail: format!(
                    "protocol {} is not supported yet",
                    port.protocol.as_deref().unwrap_or("?")
                ),
                counts: None,
            });
            continue;
        };
        let key = ServicePortKey {
            namespace: namespace.clone(),
            name: service_name.clone(),
            port_name: port_name.into(),
            protocol,
        };
        // Each family as kube-proxy's proxier of that family computes it; a port without
        // frontends of a family gets nothing of it.
        if families.contains(&IpFamily::Ipv4) {
            let has_ranges = !source_ranges.is_empty() || invalid_range;
            let fronts = frontends::<V4>(svc, port, &key, node, has_ranges, &mut notices);
            if !fronts.is_empty() {
                let backends = backends(candidates::<V4>(&key, slices, node), local_only, node);
                ports.push((
                    key.clone(),
                    Arc::new(DesiredService {
                        frontends: fronts,
                        backends,
                        local_only,
                        affinity_timeout_s,
                        source_ranges: source_ranges.clone(),
                    }),
                ));
            }
        }
        if families.contains(&IpFamily::Ipv6) {
            let has_ranges = !source_ranges_v6.is_empty() || invalid_range;
            let fronts = frontends::<V6>(svc, port, &key, node, has_ranges, &mut notices);
            if !fronts.is_empty() {
                let backends = backends(candidates::<V6>(&key, slices, node), local_only, node);
                let counts = NoticeCounts {
                    frontends: fronts.len(),
                    endpoints: backends.len(),
                };
                notices.insert(Notice {
                    kind: NoticeKind::Ipv6ToKernel,
                    object: key.to_string(),
                    detail: format!(
                        "{} IPv6 frontend(s) and {} IPv6 endpoint(s) carried by the kernel \
                         (kube-proxy) until the datapath supports IPv6",
                        counts.frontends, counts.endpoints
                    ),
                    counts: Some(counts),
                });
                ports_v6.push((
                    key,
                    Arc::new(DesiredService6 {
                        frontends: fronts,
                        backends,
                        local_only,
                        affinity_timeout_s,
                        source_ranges: source_ranges_v6.clone(),
                    }),
                ));
            }
        }
    }
    // Kept for the Service's life: no spare capacity (ports without frontends were skipped).
    ports.shrink_to_fit();
    ports_v6.shrink_to_fit();

    let health = (local_only && spec.type_.as_deref() == Some("LoadBalancer"))
        .then(|| spec.health_check_node_port.and_then(port_u16))
        .flatten()
        .map(|hc_port| {
            let count = |family| {
                families
                    .contains(&family)
                    .then(|| local_ready_endpoints(slices, node, family))
            };
            let check = HealthCheck {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                local_endpoints: LocalEndpoints {
                    ipv4: count(IpFamily::Ipv4),
                    ipv6: count(IpFamily::Ipv6),
                },
            };
            (hc_port, check)
        });
    ServiceOutput {
        order,
        ports,
        ports_v6,
        health,
        notices: notices.into_iter().collect(),
    }
}

/// A Service as last computed, and the objects it was computed from.
struct Cached {
    service: Arc<Service>,
    /// Its slices, ordered by address so the same set compares equal.
    slices: Vec<Arc<EndpointSlice>>,
    output: ServiceOutput,
}

/// What an update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Service ports whose desired state changed, appeared or went.
    pub services: BTreeSet<ServicePortKey>,
    pub health_checks: bool,
    pub notices: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.health_checks && !self.notices
    }
}

/// namespace/name of a Service (for an EndpointSlice: of the Service its label names).
type ObjectKey = (String, String);

fn service_key(svc: &Service) -> ObjectKey {
    (
        namespace(&svc.metadata).to_owned(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

fn slice_service_key(slice: &EndpointSlice) -> Option<ObjectKey> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(HEADLESS_LABEL) {
        return None;
    }
    let name = labels.get(SERVICE_NAME_LABEL)?;
    Some((namespace(&slice.metadata).to_owned(), name.clone()))
}

/// Adds `obj` under `key`; returns how many objects the key then has.
fn index_add<T>(index: &mut HashMap<ObjectKey, Vec<Arc<T>>>, key: ObjectKey, obj: Arc<T>) -> usize {
    let list = index.entry(key).or_default();
    list.push(obj);
    list.len()
}

/// Removes one occurrence of `obj` (by identity) from under `key`, keeping the others' order.
fn index_remove<T>(index: &mut HashMap<ObjectKey, Vec<Arc<T>>>, key: &ObjectKey, obj: &Arc<T>) {
    if let Some(list) = index.get_mut(key) {
        if let Some(at) = list.iter().position(|o| Arc::ptr_eq(o, obj)) {
            list.remove(at);
        }
        if list.is_empty() {
            index.remove(key);
        }
    }
}

/// What differs between the previous input `old` and `new`, found by identity: sources hand
/// out unchanged objects as the same `Arc`, in the same order (sorted by namespace/name).
/// Returns the objects of `old` that `new` replaced or dropped, and the objects of `new` that
/// replaced them or were added, and makes `old` equal to `new`. Common leading and trailing
/// runs are skipped; in between, equal lengths are compared position by position (objects
/// replaced in place, the usual case), otherwise the whole middle counts as removed and
/// added. An object reported on both sides (moved, not changed) only costs a re-examination.
/// `old` holds its objects, so an address compared here cannot have been reused.
fn diff<T>(old: &mut Vec<Arc<T>>, new: &[Arc<T>]) -> (Vec<Arc<T>>, Vec<Arc<T>>) {
    let prefix = old
        .iter()
        .zip(new)
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    let old_middle = prefix..old.len() - suffix;
    let new_middle = &new[prefix..new.len() - suffix];
    let mut removed = Vec::new();
    let mut added = Vec::new();
    if old_middle.len() == new_middle.len() {
        for (slot, obj) in old[old_middle].iter_mut().zip(new_middle) {
            if !Arc::ptr_eq(slot, obj) {
                removed.push(std::mem::replace(slot, obj.clone()));
                added.push(obj.clone());
            }
        }
    } else {
        removed = old.splice(old_middle, new_middle.iter().cloned()).collect();
        added = new_middle.to_vec();
    }
    (removed, added)
}

/// The last input and an index of it by Service, kept so that an update finds what changed
/// without walking every object by name (at 10,000 Services that walk alone took 15-30 ms
/// per update on the benchmark machine, see bench/results).
#[derive(Default)]
struct Inputs {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    /// Services by namespace/name, in input order (several only in a broken input).
    services_by_key: HashMap<ObjectKey, Vec<Arc<Service>>>,
    /// EndpointSlices by the Service their label names.
    slices_by_service: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    /// Some namespace/name has more than one Service: which one wins depends on the input
    /// order, so updates take the full path while that lasts.
    duplicates: bool,
}

impl Inputs {
    /// Indexes `services` and `slices` from scratch.
    fn rebuild(&mut self, services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) {
        self.services = services.to_vec();
        self.slices = slices.to_vec();
        self.services_by_key.clear();
        self.slices_by_service.clear();
        self.duplicates = false;
        for svc in services {
            self.duplicates |=
                index_add(&mut self.services_by_key, service_key(svc), svc.clone()) > 1;
        }
        for slice in slices {
            if let Some(key) = slice_service_key(slice) {
                index_add(&mut self.slices_by_service, key, slice.clone());
            }
        }
    }

    /// Brings the index to the new input by identity. Returns the Services whose objects
    /// changed, or None when the full path must run (duplicate Services).
    fn update(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> Option<BTreeSet<ObjectKey>> {
        let mut touched = BTreeSet::new();
        let (removed, added) = diff(&mut self.services, services);
        for svc in &removed {
            let key = service_key(svc);
            index_remove(&mut self.services_by_key, &key, svc);
            touched.insert(key);
        }
        for svc in added {
            let key = service_key(&svc);
            self.duplicates |= index_add(&mut self.services_by_key, key.clone(), svc) > 1;
            touched.insert(key);
        }
        let (removed, added) = diff(&mut self.slices, slices);
        for slice in &removed {
            if let Some(key) = slice_service_key(slice) {
                index_remove(&mut self.slices_by_service, &key, slice);
                touched.insert(key);
            }
        }
        for slice in added {
            if let Some(key) = slice_service_key(&slice) {
                index_add(&mut self.slices_by_service, key.clone(), slice);
                touched.insert(key);
            }
        }
        (!self.duplicates).then_some(touched)
    }
}

/// The Service ports that want one frontend, best first (`ClaimOrder`), each once. Nearly
/// always one: a sorted `Vec` of exactly that many, where a `BTreeSet` would allocate a node
/// of eleven (about 1.7 kB per frontend, 110 MiB at 65,536 Services).
#[derive(Debug, Default)]
struct Claims(Vec<(ClaimOrder, ServicePortKey)>);

impl Claims {
    fn insert(&mut self, claim: (ClaimOrder, ServicePortKey)) {
        if let Err(at) = self.0.binary_search(&claim) {
            self.0.reserve_exact(1);
            self.0.insert(at, claim);
        }
    }

    fn remove(&mut self, claim: &(ClaimOrder, ServicePortKey)) {
        if let Ok(at) = self.0.binary_search(claim) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, (ClaimOrder, ServicePortKey)> {
        self.0.iter()
    }
}

/// Keeps the desired state up to date as Services and EndpointSlices change, recomputing only
/// the Services whose objects changed (an unchanged object is the same `Arc`).
pub struct Reconciler {
    node: NodeContext,
    /// Boxed: a hash table keeps spare slots, which should be small.
    cache: HashMap<(String, String), Box<Cached>>,
    /// Every Service port that wants a frontend, in `ClaimOrder`.
    claims: HashMap<FrontendId, Claims>,
    /// Who served each frontend when the current round began (the pinned maps' owners before
    /// the first). A frontend stays with its holder while the holder claims it, so a newcomer
    /// claiming it too is reported, never served, whatever its name or age; only when the
    /// holder lets go does the best claim by `ClaimOrder` take over. Updated at the end of a
    /// round only, so the outcome does not depend on the order changes are applied in.
    holders: HashMap<FrontendId, ServicePortKey>,
    /// Frontends whose claims changed in the current round.
    touched_round: BTreeSet<FrontendId>,
    desired: Desired,
    inputs: Inputs,
    /// The next update examines every Service (the first one, and after a node change, which
    /// may change which Services are ours).
    full_next: bool,
}

impl Reconciler {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            cache: HashMap::new(),
            claims: HashMap::new(),
            holders: HashMap::new(),
            touched_round: BTreeSet::new(),
            desired: Desired::default(),
            inputs: Inputs::default(),
            full_next: true,
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Frontends the datapath already serves, with the service port that serves them (the
    /// pinned maps an agent adopts): they stay with it, so a restart never moves a frontend
    /// to another Service that claims it too. Call before the first update.
    pub fn set_incumbents(
        &mut self,
        holders: impl IntoIterator<Item = (FrontendId, ServicePortKey)>,
    ) {
        self.holders.extend(holders);
    }

    /// Who gets a frontend: its holder while it claims it, else the best claim.
    fn winner(&self, frontend: &FrontendId) -> Option<&ServicePortKey> {
        let set = self.claims.get(frontend)?;
        let holder = self.holders.get(frontend);
        set.iter()
            .map(|(_, k)| k)
            .find(|k| Some(*k) == holder)
            .or_else(|| set.iter().next().map(|(_, k)| k))
    }

    /// Ends a round: the winners of the frontends it touched become their holders.
    fn settle_holders(&mut self) {
        for frontend in std::mem::take(&mut self.touched_round) {
            match self.winner(&frontend).cloned() {
                Some(key) => self.holders.insert(frontend, key),
                None => self.holders.remove(&frontend),
            };
        }
    }

    /// A new node context (addresses or zone changed, say): everything is recomputed.
    pub fn set_node(&mut self, node: NodeContext) -> Changes {
        if node.node_name == self.node.node_name
            && node.zone == self.node.zone
            && node.node_addresses == self.node.node_addresses
            && node.node_addresses_v6 == self.node.node_addresses_v6
            && node.proxy_name == self.node.proxy_name
            && node.guard == self.node.guard
        {
            return Changes::default();
        }
        self.node = node;
        self.full_next = true;
        let mut changes = Changes::default();
        let keys: Vec<ObjectKey> = self.cache.keys().cloned().collect();
        for key in &keys {
            let c = &self.cache[key];
            let (service, slices) = (c.service.clone(), c.slices.clone());
            let refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
            let output = compute_service(&service, &refs, &self.node);
            // Swapped in one step: the old output's claims are withdrawn and the new ones
            // made; holders stay as they are until the round ends.
            self.replace(
                key,
                Some(Cached {
                    service,
                    slices,
                    output,
                }),
                &mut changes,
            );
        }
        self.settle_holders();
        changes
    }

    /// Brings the desired state to these objects. Returns what changed.
    ///
    /// Only the Services whose objects changed are examined: the new input is compared with
    /// the previous one by identity (see `diff`), which costs a pointer comparison per object
    /// instead of a lookup by name. The first update, the first after a node change and any
    /// with two Services of one namespace/name examine every Service in input order.
    pub fn update(&mut self, services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Changes {
        let touched = if self.full_next {
            None
        } else {
            self.inputs.update(services, slices)
        };
        let keys: Vec<ObjectKey> = match touched {
            Some(touched) => touched.into_iter().collect(),
            None => {
                self.full_next = false;
                self.inputs.rebuild(services, slices);
                // Every Service in input order, then the cached ones that went.
                let mut seen = std::collections::HashSet::new();
                let mut keys: Vec<ObjectKey> = services
                    .iter()
                    .map(|s| service_key(s))
                    .filter(|k| seen.insert(k.clone()))
                    .collect();
                keys.extend(self.cache.keys().filter(|k| !seen.contains(*k)).cloned());
                keys
            }
        };
        let mut changes = Changes::default();
        for key in &keys {
            self.settle(key, &mut changes);
        }
        self.settle_holders();
        changes
    }

    /// Brings one namespace/name's contribution up to date with the indexed input: its
    /// Service (if ours) with every EndpointSlice labelled for it, or nothing.
    fn settle(&mut self, key: &ObjectKey, changes: &mut Changes) {
        let services: Vec<Arc<Service>> = self
            .inputs
            .services_by_key
            .get(key)
            .into_iter()
            .flatten()
            .filter(|s| is_ours(s, &self.node))
            .cloned()
            .collect();
        if services.is_empty() {
            if self.cache.contains_key(key) {
                self.replace(key, None, changes);
            }
            return;
        }
        let mut slices = self
            .inputs
            .slices_by_service
            .get(key)
            .cloned()
            .unwrap_or_default();
        for svc in &services {
            // With duplicates (broken input), the first Service gets the slices, as before.
            let mut mine = std::mem::take(&mut slices);
            mine.sort_by_key(|s| Arc::as_ptr(s) as usize);
            if let Some(c) = self.cache.get(key) {
                let same = Arc::ptr_eq(&c.service, svc)
                    && c.slices.len() == mine.len()
                    && c.slices.iter().zip(&mine).all(|(a, b)| Arc::ptr_eq(a, b));
                if same {
                    continue;
                }
            }
            let refs: Vec<&EndpointSlice> = mine.iter().map(|s| s.as_ref()).collect();
            let output = compute_service(svc, &refs, &self.node);
            self.replace(
                key,
                Some(Cached {
                    service: svc.clone(),
                    slices: mine,
                    output,
                }),
                changes,
            );
        }
    }

    /// Swaps one Service's contribution and settles the frontends it touches.
    fn replace(&mut self, key: &(String, String), new: Option<Cached>, changes: &mut Changes) {
        let old = self.cache.remove(key);
        if old.as_ref().map(|c| &c.output) == new.as_ref().map(|c| &c.output) {
            if let (Some(old), Some(new)) = (old, new) {
                // The old output stays: the desired state shares its `Arc`s.
                let kept = Cached {
                    output: old.output,
                    ..new
                };
                self.cache.insert(key.clone(), Box::new(kept));
            }
            return;
        }
        let mut touched: BTreeSet<FrontendId> = BTreeSet::new();
        let mut reassemble: BTreeSet<ServicePortKey> = BTreeSet::new();
        if let Some(old) = &old {
            for (pkey, claim) in old.output.claims() {
                if let Some(set) = self.claims.get_mut(&claim) {
                    set.remove(&(old.output.order.clone(), pkey.clone()));
                    if set.is_empty() {
                        self.claims.remove(&claim);
                    }
                }
                touched.insert(claim);
                reassemble.insert(pkey.clone());
            }
            if let Some((port, _)) = &old.output.health {
                self.desired.health_checks.remove(port);
                changes.health_checks = true;
            }
            changes.notices |= !old.output.notices.is_empty();
        }
        if let Some(new) = new {
            for (pkey, claim) in new.output.claims() {
                self.claims
                    .entry(claim)
                    .or_default()
                    .insert((new.output.order.clone(), pkey.clone()));
                touched.insert(claim);
                reassemble.insert(pkey.clone());
            }
            if let Some((port, check)) = &new.output.health {
                self.desired.health_checks.insert(*port, check.clone());
                changes.health_checks = true;
            }
            changes.notices |= !new.output.notices.is_empty();
            self.cache.insert(key.clone(), Box::new(new));
        }
        self.touched_round.extend(touched.iter().copied());
        // Whoever claims a touched frontend may have won or lost it.
        for claim in &touched {
            for (_, pkey) in self.claims.get(claim).into_iter().flat_map(Claims::iter) {
                reassemble.insert(pkey.clone());
            }
        }
        for pkey in reassemble {
            self.reassemble(&pkey, changes);
        }
    }

    /// Recomputes one service port's entries of the desired state (each family) from its
    /// Service's output, keeping only the frontends it wins.
    fn reassemble(&mut self, pkey: &ServicePortKey, changes: &mut Changes) {
        let owner = self
            .cache
            .get(&(pkey.namespace.to_string(), pkey.name.to_string()));
        fn find<T: Clone>(ports: &[(ServicePortKey, T)], pkey: &ServicePortKey) -> Option<T> {
            ports
                .iter()
                .find(|(k, _)| k == pkey)
                .map(|(_, ds)| ds.clone())
        }
        let wanted = owner.and_then(|c| find(&c.output.ports, pkey));
        let wanted_v6 = owner.and_then(|c| find(&c.output.ports_v6, pkey));
        let winner = |f: SocketAddr| self.winner(&(f, pkey.protocol));
        let conflicts = {
            let lost = |f: SocketAddr| winner(f).is_some_and(|w| w != pkey);
            wanted
                .iter()
                .flat_map(|ds| ds.frontends.iter().map(|f| SocketAddr::from(f.addr)))
                .chain(
                    wanted_v6
                        .iter()
                        .flat_map(|ds| ds.frontends.iter().map(|f| SocketAddr::from(f.addr))),
                )
                .any(lost)
        };
        let wins = |f: SocketAddr| winner(f) == Some(pkey);
        let assembled = wanted.and_then(|ds| keep_won(ds, wins));
        let assembled_v6 = wanted_v6.and_then(|ds| keep_won(ds, wins));
        if conflicts {
            changes.notices = true;
        }
        let mut changed = false;
        if self.desired.services.get(pkey) != assembled.as_ref() {
            match assembled {
                Some(ds) => self.desired.services.insert(pkey.clone(), ds),
                None => self.desired.services.remove(pkey),
            };
            changed = true;
        }
        if self.desired.services_v6.get(pkey) != assembled_v6.as_ref() {
            match assembled_v6 {
                Some(ds) => self.desired.services_v6.insert(pkey.clone(), ds),
                None => self.desired.services_v6.remove(pkey),
            };
            changed = true;
        }
        if changed {
            changes.services.insert(pkey.clone());
        }
    }

    /// Everything skipped, and frontends lost to an older Service. Built on demand (it walks
    /// every Service); call it when `Changes::notices` says something changed.
    pub fn notices(&self) -> BTreeSet<Notice> {
        let mut out: BTreeSet<Notice> = self
            .cache
            .values()
            .flat_map(|c| c.output.notices.iter().cloned())
            .collect();
        for (claim, set) in &self.claims {
            let Some(winner) = self.winner(claim) else {
                continue;
            };
            for (_, loser) in set.iter().filter(|(_, k)| k != winner) {
                out.insert(Notice {
                    kind: NoticeKind::FrontendConflict,
                    object: loser.to_string(),
                    detail: format!(
                        "{} {} not programmed: already served by {winner}, which keeps it",
                        claim.0, claim.1
                    ),
                    counts: None,
                });
            }
        }
        out
    }
}

/// Computes what the datapath should hold from scratch. Pure: the same input gives the same
/// output (the agent keeps a `Reconciler` instead and updates it).
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Desired {
    desired_state_held(services, slices, node, BTreeMap::new())
}

/// `desired_state` when some frontends are already served (`holders`, as in the maps): each
/// stays with its holder while the holder claims it.
pub fn desired_state_held(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
    holders: BTreeMap<FrontendId, ServicePortKey>,
) -> Desired {
    let mut reconciler = Reconciler::new(node.clone());
    reconciler.set_incumbents(holders);
    let services: Vec<Arc<Service>> = services.iter().cloned().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.iter().cloned().map(Arc::new).collect();
    reconciler.update(&services, &slices);
    let notices = reconciler.notices();
    let mut desired = reconciler.desired;
    desired.notices = notices;
    desired
}

/// kube-proxy's count for health checks (pkg/proxy/endpoints.go, `LocalReadyEndpoints` over
/// `getLocalReadyEndpointIPs`): distinct ready addresses on this node, over the Service's
/// slices. Its endpoints map is built per slice port, so a slice without ports counts for
/// nothing, and an endpoint stands for its first address only (endpointslicecache.go). Terminating
/// endpoints do not count, so a node whose only endpoints are terminating fails the check and
/// the load balancer drains it.
///
/// kube-proxy counts per family, each proxier over its own family's slices: `family` says
/// which.
fn local_ready_endpoints(slices: &[&EndpointSlice], node: &NodeContext, family: IpFamily) -> usize {
    let mut addrs = BTreeSet::new();
    let counted = slices.iter().filter(|s| {
        s.address_type == family.label() && s.ports.as_ref().is_some_and(|p| !p.is_empty())
    });
    for slice in counted {
        for ep in slice.endpoints.iter().flatten() {
            if ep.node_name.as_deref() == Some(node.node_name.as_str()) && conditions(ep).ready {
                addrs.extend(ep.addresses.first().cloned());
            }
        }
    }
    addrs.len()
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
