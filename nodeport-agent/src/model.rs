//! The desired state of the datapath, as plain data: what `desired::desired_state` computes
//! from Services and EndpointSlices, and what `sync` programs into the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => nodeport_common::IPPROTO_TCP,
            Self::Udp => nodeport_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// One service of the datapath: a port of a Kubernetes Service. TCP and UDP on one port
/// number are two of them.
///
/// The names are shared (`Arc<str>`): the agent keeps a key in several indexes (desired state,
/// frontend claims and holders, the programmed maps, metrics), and a clone costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The Service port's name ("" when unnamed).
    pub port_name: Arc<str>,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    NodePort,
    LoadBalancer,
    ExternalIp,
}

/// An address and port a service answers on: IPv4 (`Frontend`, what the datapath takes) or
/// IPv6 (`Frontend6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend<A = SocketAddrV4> {
    pub addr: A,
    pub kind: FrontendKind,
    /// loadBalancerSourceRanges apply to this frontend.
    pub source_ranges: bool,
}

/// An IPv6 frontend.
pub type Frontend6 = Frontend<SocketAddrV6>;

/// A backend of a service and what it may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BackendState {
    /// Runs on this node.
    pub local: bool,
    /// Takes new connections (it is in the Maglev table). Endpoints that still exist but must
    /// not take new connections (terminating while others are ready, not serving) are kept
    /// only so that their established connections finish (KEP-1669).
    pub in_table: bool,
    /// Serving (the endpoint's `serving` condition, unset meaning true). UDP flows stay on a
    /// serving endpoint, terminating or not, and move off one that is not, as kube-proxy
    /// clears UDP conntrack entries only for endpoints that stopped serving.
    pub serving: bool,
    /// Out of the table only because topology hints send this node's new connections to other
    /// endpoints (kube-proxy's `CategorizeEndpoints`): ready, yet handled like a draining one.
    pub hinted_away: bool,
}

/// An IPv4 prefix of loadBalancerSourceRanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Ipv4Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Prefix {
    /// The /32 of one address.
    pub const fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    /// An IPv4 CIDR ("10.0.0.0/8"), or a bare address as a /32. Host bits are cleared.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok()?),
            None => (s, 32),
        };
        let addr = parse_ipv4_sloppy(addr)?;
        if len > 32 {
            return None;
        }
        Some(Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len.min(32)))
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = Self::mask(self.len);
        u32::from(addr) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv4Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
            .ok_or_else(|| format!("{s:?}: expected an IPv4 address or CIDR like 10.0.0.0/8"))
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv6 prefix: of loadBalancerSourceRanges, or of `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Ipv6Prefix {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Ipv6Prefix {
    /// An IPv6 CIDR ("fd00::/8"), or a bare address as a /128. Host bits are cleared.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok()?),
            None => (s, 128),
        };
        let addr: Ipv6Addr = addr.parse().ok()?;
        if len > 128 {
            return None;
        }
        Some(Self {
            addr: Ipv6Addr::from(u128::from(addr) & Self::mask(len)),
            len,
        })
    }

    fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len.min(128)))
        }
    }

    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        let mask = Self::mask(self.len);
        u128::from(addr) & mask == u128::from(self.addr) & mask
    }
}

impl std::str::FromStr for Ipv6Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
            .ok_or_else(|| format!("{s:?}: expected an IPv6 address or CIDR like fd00::/8"))
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A prefix of either family (`--pod-cidr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpPrefix {
    V4(Ipv4Prefix),
    V6(Ipv6Prefix),
}

impl IpPrefix {
    /// The IPv4 prefix, if this is one.
    pub const fn v4(self) -> Option<Ipv4Prefix> {
        match self {
            Self::V4(p) => Some(p),
            Self::V6(_) => None,
        }
    }
}

impl std::str::FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains(':') {
            s.parse().map(Self::V6)
        } else {
            s.parse().map(Self::V4)
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(p) => p.fmt(f),
            Self::V6(p) => p.fmt(f),
        }
    }
}

/// The IP families of a Service (`spec.ipFamilies`), of a frontend or of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl IpFamily {
    pub fn of(addr: std::net::IpAddr) -> Self {
        match addr {
            std::net::IpAddr::V4(_) => Self::Ipv4,
            // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
            std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Self::Ipv4,
            std::net::IpAddr::V6(_) => Self::Ipv6,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One service port of one family: `DesiredService` is IPv4, what the datapath programs;
/// `DesiredService6` is IPv6, computed the same way and carried by the kernel (kube-proxy's
/// ip6tables rules) until the datapath supports IPv6.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredService<A = SocketAddrV4, P = Ipv4Prefix> {
    pub frontends: BTreeSet<Frontend<A>>,
    pub backends: BTreeMap<A, BackendState>,
    /// externalTrafficPolicy Local: only local backends, client address kept.
    pub local_only: bool,
    /// sessionAffinity ClientIP timeout, when set.
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges of this family (kube-proxy filters them per family).
    pub source_ranges: BTreeSet<P>,
}

/// An IPv6 service port.
pub type DesiredService6 = DesiredService<SocketAddrV6, Ipv6Prefix>;

impl<A, P> DesiredService<A, P> {
    /// Backends taking new connections.
    pub fn table_backends(&self) -> impl Iterator<Item = (&A, &BackendState)> {
        self.backends.iter().filter(|(_, b)| b.in_table)
    }
}

/// A health-check node port to serve (externalTrafficPolicy Local).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node, per family of the Service.
    pub local_endpoints: LocalEndpoints,
}

/// Ready endpoints on this node (distinct addresses) of each family a Service has, as each of
/// kube-proxy's proxiers (one per family) counts them for its health server; `None` for a
/// family the Service does not have, which that family's proxier does not see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LocalEndpoints {
    pub ipv4: Option<usize>,
    pub ipv6: Option<usize>,
}

impl LocalEndpoints {
    /// An IPv4-only Service's count.
    pub const fn ipv4(count: usize) -> Self {
        Self {
            ipv4: Some(count),
            ipv6: None,
        }
    }

    /// What a probe arriving over `family` is answered with. kube-proxy runs one health server
    /// per family (`newServiceHealthServer` in pkg/proxy/healthcheck/service_health.go, one
    /// per proxier of the metaproxier), each answering from its own family's endpoints
    /// (`hcHandler.ServeHTTP`): a probe over a family the Service has gets that family's count.
    /// A single-stack Service has one server, on Go's dual-stack wildcard, so a probe over the
    /// other family gets the Service's own family's count.
    pub fn for_probe(&self, family: IpFamily) -> usize {
        let (same, other) = match family {
            IpFamily::Ipv4 => (self.ipv4, self.ipv6),
            IpFamily::Ipv6 => (self.ipv6, self.ipv4),
        };
        same.or(other).unwrap_or(0)
    }
}

/// Something in the input the agent did not program, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Notice {
    pub kind: NoticeKind,
    /// `namespace/name` (and port) of the object concerned.
    pub object: String,
    pub detail: String,
    /// What the notice is about, counted (`Ipv6ToKernel`: the service port's IPv6 frontends
    /// and endpoints); recorded with it for `status` and `dump`.
    pub counts: Option<NoticeCounts>,
}

/// The frontends and endpoints a notice is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NoticeCounts {
    pub frontends: usize,
    pub endpoints: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// SCTP ports are not supported yet.
    SctpSkipped,
    /// IPv6 frontends and endpoints of a service port: computed, not programmed (the datapath
    /// carries IPv4 only); the kernel (kube-proxy's ip6tables rules) carries them.
    Ipv6ToKernel,
    /// A loadBalancerSourceRanges entry that is not an IPv4 CIDR.
    InvalidSourceRange,
    /// Two services claim the same frontend; the older one keeps it.
    FrontendConflict,
    /// A node port outside the node port range (--service-node-port-range).
    NodePortOutsideRange,
    /// A frontend on a node address whose port is in --snat-port-range: SNATed connections'
    /// replies arrive there.
    FrontendInSnatRange,
    /// A frontend on a port the node itself listens on (sshd, say).
    FrontendOnHostListener,
}

/// What `status`, `dump`, the log and the metrics say of IPv6 (`NoticeKind::Ipv6ToKernel`).
pub const IPV6_TO_KERNEL: &str =
    "IPv6 frontends carried by the kernel (kube-proxy) until the datapath supports IPv6";

impl NoticeKind {
    pub const ALL: [NoticeKind; 7] = [
        Self::SctpSkipped,
        Self::Ipv6ToKernel,
        Self::InvalidSourceRange,
        Self::FrontendConflict,
        Self::NodePortOutsideRange,
        Self::FrontendInSnatRange,
        Self::FrontendOnHostListener,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::SctpSkipped => "sctp_skipped",
            Self::Ipv6ToKernel => "ipv6_to_kernel",
            Self::InvalidSourceRange => "invalid_source_range",
            Self::FrontendConflict => "frontend_conflict",
            Self::NodePortOutsideRange => "node_port_outside_range",
            Self::FrontendInSnatRange => "frontend_in_snat_range",
            Self::FrontendOnHostListener => "frontend_on_host_listener",
        }
    }
}

/// Everything the datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// Shared (`Arc`) with the per-Service computation it was assembled from and with the
    /// programmed maps' record of it, rather than copied into each.
    pub services: BTreeMap<ServicePortKey, Arc<DesiredService>>,
    /// The IPv6 half of dual-stack Services and IPv6-only Services, ready for a datapath that
    /// carries IPv6; not programmed (the kernel carries them, see `NoticeKind::Ipv6ToKernel`).
    pub services_v6: BTreeMap<ServicePortKey, Arc<DesiredService6>>,
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub notices: BTreeSet<Notice>,
}

/// An IPv4 address as kube-proxy reads one (k8s.io/utils/net `ParseIPSloppy`): dotted decimal
/// whose parts may have leading zeros, read as decimal (`1.2.3.004` is 1.2.3.4). The API server
/// once accepted such addresses, so objects that still hold them must not lose their frontends
/// or endpoints.
pub fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// An IP address of either family, IPv4 read as [`parse_ipv4_sloppy`] does.
pub fn parse_ip_sloppy(s: &str) -> Option<std::net::IpAddr> {
    match parse_ipv4_sloppy(s) {
        Some(v4) => Some(v4.into()),
        None => s.parse::<std::net::Ipv6Addr>().ok().map(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_as_kube_proxy_reads_them() {
        // k8s.io/utils/net ParseIPSloppy: leading zeros are decimal.
        assert_eq!(
            parse_ipv4_sloppy("1.2.3.004"),
            Some(Ipv4Addr::new(1, 2, 3, 4))
        );
        assert_eq!(
            parse_ipv4_sloppy("010.001.0.9"),
            Some(Ipv4Addr::new(10, 1, 0, 9))
        );
        for bad in [
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.0004",
            " 1.2.3.4",
            "1.2.3.-4",
            "0x1.2.3.4",
            "",
        ] {
            assert_eq!(parse_ipv4_sloppy(bad), None, "{bad:?}");
        }
        assert!(parse_ip_sloppy("2001:db8::1").is_some_and(|ip| ip.is_ipv6()));
        assert_eq!(
            Ipv4Prefix::parse("10.001.2.3/16").map(|p| p.to_string()),
            Some("10.1.0.0/16".to_owned())
        );
    }
}
