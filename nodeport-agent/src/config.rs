//! The configuration of `nodeport-agent run`: its flags ([`RunArgs`]), their parsers, and the
//! checks made before anything is created.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
};

use anyhow::{Result, bail};
use nodeport_common::{DatapathConfig, capacity};

use crate::{
    datapath::{self, ExternalHook, Sizing, XdpAttachMode},
    interfaces::Selection,
    ledger::{self, NodePortRange},
    model::{IpPrefix, Ipv4Prefix, Ipv6Prefix},
};

/// The flow-hash seed when none is given; equal on every node, so a flow picks the same
/// backend whichever node it reaches.
pub const DEFAULT_HASH_SEED: u32 = 0x6e70_6f72; // "npor"

/// `--snat-port-range`: one or two ranges, "A-B" or "A-B,C-D".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatPortRanges(pub Vec<NodePortRange>);

/// The default: 33,512 ports, below the node port range (30000-32767) and above the kernel's
/// default ephemeral ports (net.ipv4.ip_local_port_range 32768-60999). Each remote backend
/// can then take 33,512 concurrent connections per SNAT address and protocol from one node,
/// above the ~28,000 MASQUERADE gives with the default ephemeral range.
pub const DEFAULT_SNAT_PORT_RANGES: &str = "1024-29999,61000-65535";

impl FromStr for SnatPortRanges {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ranges: Vec<NodePortRange> = s
            .split(',')
            .map(|r| r.parse::<NodePortRange>())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if ranges.len() > 2 {
            return Err(format!(
                "{s:?}: at most two ranges, e.g. {DEFAULT_SNAT_PORT_RANGES}"
            ));
        }
        if let [a, b] = ranges.as_slice()
            && let Some((lo, hi)) = overlap((a.first, a.last), (b.first, b.last))
        {
            return Err(format!("{s:?}: the two ranges overlap on {lo}-{hi}"));
        }
        Ok(Self(ranges))
    }
}

impl std::fmt::Display for SnatPortRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// The lowest SNAT port: below it are the privileged ports, which services on the node (and
/// backends) treat as trusted.
pub const MIN_SNAT_PORT: u16 = 1024;

/// Ports in net.ipv4.ip_local_reserved_ports ("8080,61000-65535"): the kernel never picks
/// them as ephemeral ports.
fn reserved_ports(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Whether every port of `range` is in one of `reserved`.
fn all_reserved(range: (u16, u16), reserved: &[(u16, u16)]) -> bool {
    (range.0..=range.1).all(|p| reserved.iter().any(|(a, b)| (*a..=*b).contains(&p)))
}

fn overlap(a: (u16, u16), b: (u16, u16)) -> Option<(u16, u16)> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some((lo, hi))
}

/// `off` or an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl FromStr for OptionalAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s == "off" {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|e| format!("{s:?}: {e} (an address:port, or \"off\")"))
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A YAML file of flags (a ConfigMap, say): keys are the flag names without `--`
    /// (`max-services: 8192`, `external-interface: [eth0]`, `detach-on-exit: true`). Flags and
    /// environment variables given to the command override the file; an unknown key is an
    /// error.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read Services and EndpointSlices from the YAML and JSON files under this directory
    /// (reloaded when they change) instead of the Kubernetes API.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "context"])]
    pub manifests: Option<PathBuf>,
    /// The kubeconfig file to reach the API server with (kube-proxy's flag). Default: the
    /// in-cluster configuration, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (kubectl's flag). Default: its current-context.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// This node's name, to tell its own endpoints (EndpointSlice endpoints[].nodeName) and to
    /// find its Node object; a DaemonSet passes it from the downward API. Default: the host
    /// name. --hostname-override is kube-proxy's name for it.
    #[arg(
        long,
        visible_alias = "hostname-override",
        value_name = "NAME",
        env = "NODE_NAME"
    )]
    pub node_name: Option<String>,
    /// An interface facing clients and other nodes (XDP runs there). Repeat for several.
    /// Default: the interfaces carrying an IPv4 default route.
    #[arg(long = "external-interface", value_name = "IFACE")]
    pub external_interfaces: Vec<String>,
    /// Interfaces facing local pods (their replies are translated there), as globs such as
    /// `veth*,cali*,lxc*`. Default: every other interface that is up.
    #[arg(long, value_delimiter = ',', value_name = "GLOB")]
    pub pod_interfaces: Vec<String>,
    /// Node ports answer only on node addresses inside these CIDRs (of either family; a family
    /// without a CIDR keeps all its addresses, as in kube-proxy), or with `primary` only on the
    /// node's primary addresses: the first address of each family of each external interface
    /// and, with the Kubernetes API, the Node's first address of each family (kube-proxy's flag
    /// and values). Default: every address of the node but loopback (and IPv6 link-local).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...|primary")]
    pub nodeport_addresses: Vec<String>,
    /// Which hook runs the datapath on external interfaces: xdp (the fast path), tc (TC
    /// ingress: correct for packets with partial checksums and GRO/GSO packets, as a veth
    /// peer with transmit offloads sends them), or auto (tc on veth interfaces, xdp elsewhere).
    #[arg(long, value_enum, value_name = "HOOK", default_value = "auto")]
    pub external_hook: ExternalHook,
    /// How XDP runs: native (in the driver; the fast path) or generic (any interface, slower).
    #[arg(long, value_enum, value_name = "MODE", default_value = "native")]
    pub xdp_mode: XdpAttachMode,
    /// Where maps and links are pinned (on a BPF filesystem; mounted at /sys/fs/bpf if needed).
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/nodeport")]
    pub bpffs_dir: PathBuf,
    /// The node health server (/healthz, /livez, /readyz), or "off" (kube-proxy's flag).
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: OptionalAddr,
    /// Address the health-check node ports of externalTrafficPolicy Local Services listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    pub health_check_bind_address: IpAddr,
    /// The Prometheus metrics endpoint (/metrics), or "off". Local only by default; a
    /// DaemonSet scraped by Prometheus sets 0.0.0.0:9480 (kube-proxy's flag name; alias
    /// --metrics-addr).
    #[arg(
        long,
        alias = "metrics-addr",
        value_name = "ADDR:PORT|off",
        default_value = "127.0.0.1:9480"
    )]
    pub metrics_bind_address: OptionalAddr,
    /// Export the per-service series (nodeport_service_packets_total and
    /// nodeport_service_bytes_total, 4 per service port per node: 40,000 at 10,000 service
    /// ports). `--metrics-per-service=false` leaves them out; the datapath still counts, and
    /// `nodeport-agent dump --stats` shows the counts.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub metrics_per_service: bool,
    /// The cluster's node port range (kube-apiserver --service-node-port-range: N-M, N+K or
    /// N): checked against the SNAT range, node ports outside it are refused, and the range
    /// metrics report on it.
    #[arg(long, value_name = "RANGE", default_value = "30000-32767")]
    pub service_node_port_range: NodePortRange,
    /// Source ports for connections SNATed to backends on other nodes: one range or two,
    /// comma-separated (A-B[,C-D]). Neither may overlap the node port range or
    /// net.ipv4.ip_local_port_range, nor go below 1024.
    #[arg(long, value_name = "A-B[,C-D]", default_value = DEFAULT_SNAT_PORT_RANGES)]
    pub snat_port_range: SnatPortRanges,
    /// Apply loadBalancerSourceRanges to node ports as well as to LoadBalancer IPs. kube-proxy
    /// applies them to LoadBalancer IPs only, so a cloud load balancer that reaches the nodes
    /// on their node port from other addresses keeps working; this stricter mode (Cilium's
    /// --bpf-lb-source-range-all-types) also closes the node port to clients outside them.
    #[arg(long)]
    pub source_ranges_on_node_ports: bool,
    /// Slots of each service's Maglev table (a prime, at least the largest number of
    /// backends of one service; more spreads many backends more evenly). Each slot costs 8
    /// bytes per service.
    #[arg(long, value_name = "SLOTS", default_value_t = capacity::MAGLEV_SIZE)]
    pub maglev_table_size: u32,
    /// Service ports the datapath can hold, plus one (each costs a Maglev table).
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::SERVICES)]
    pub max_services: u32,
    /// Backends (an endpoint address and port of one service port) the datapath can hold,
    /// plus one; 16 bytes each.
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::BACKENDS)]
    pub max_backends: u32,
    /// Frontends (an address, port and protocol; a node port counts once per node address);
    /// about 88 bytes each.
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::FRONTENDS)]
    pub max_frontends: u32,
    /// IPv4 prefixes of loadBalancerSourceRanges over all Services (allocated as used).
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::SRC_RANGES)]
    pub max_source_ranges: u32,
    /// Entries of the established-connection table (two per connection, 144 bytes each). The
    /// datapath never evicts from it: when it is full, new connections stay in the handshake
    /// table.
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::CONNTRACK)]
    pub conntrack_size: u32,
    /// Entries of the handshake table (two per connection not yet established: TCP before
    /// the client's ACK of the SYN-ACK, UDP before a reply; 144 bytes each). An LRU of its
    /// own, so a SYN flood churns it and never the established connections.
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::CONNTRACK_NEW)]
    pub conntrack_handshake_size: u32,
    /// Seconds between two sweeps of the connection tables for expired connections.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub conntrack_gc_interval: u64,
    /// Entries of the sessionAffinity: ClientIP table (one per client and Service, an LRU;
    /// 88 bytes each).
    #[arg(long, value_name = "ENTRIES", default_value_t = capacity::AFFINITY)]
    pub affinity_size: u32,
    /// Idle timeout of a TCP connection in its handshake, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub conntrack_tcp_syn_timeout: u32,
    /// Idle timeout of an established TCP connection (also half-closed), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 21_600)]
    pub conntrack_tcp_established_timeout: u32,
    /// Idle timeout of a TCP connection after FINs both ways or an RST, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub conntrack_tcp_closing_timeout: u32,
    /// Idle timeout of a UDP flow, answered or not, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub conntrack_udp_timeout: u32,
    /// Seed of the flow hash that indexes the Maglev tables; set the same on every node.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_HASH_SEED)]
    pub hash_seed: u32,
    /// This node's pod network (repeat for several, either family): new connections from it
    /// (and from the node's own addresses) are never taken for outside clients and are
    /// dropped. With the Kubernetes API, the Node's spec.podCIDRs are added. IPv6 ones apply
    /// once the datapath carries IPv6 (until then, IPv6 is the kernel's).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpPrefix>,
    /// Also handle Services labelled service.kubernetes.io/service-proxy-name=NAME (Services
    /// with that label and any other value are always left alone).
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    /// On SIGTERM or SIGINT, remove the datapath (programs, links, maps). By default it stays
    /// and keeps forwarding until the next agent adopts it.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// The off-switch: a file holding `on` or `off` (a ConfigMap key; re-read when it
    /// changes, at least every 2 s). `off` stops taking new connections (kube-proxy's rules
    /// take them), lets the established ones finish, then removes the datapath and idles,
    /// ready; `on` attaches and programs it again. No flag, or no file: `on`. Anything else
    /// is reported and changes nothing.
    #[arg(long, value_name = "FILE")]
    pub datapath_switch: Option<PathBuf>,
    /// How long `off` waits for the connections nodeport carries to finish before removing
    /// the datapath anyway (seconds; those still open are then cut, or taken up mid-stream by
    /// kube-proxy's conntrack).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub drain_timeout: u64,
    /// The effective configuration, flag name -> value, as the start line logs it (filled in
    /// by [`effective`] after parsing).
    #[arg(skip)]
    pub effective: BTreeMap<String, serde_json::Value>,
}

pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    Some(crate::sync::untext(&buf)).filter(|h| !h.is_empty())
}

impl RunArgs {
    pub fn sizing(&self) -> Sizing {
        Sizing {
            frontends: self.max_frontends,
            services: self.max_services,
            backends: self.max_backends,
            maglev_size: self.maglev_table_size,
            source_ranges: self.max_source_ranges,
            conntrack: self.conntrack_size,
            conntrack_new: self.conntrack_handshake_size,
            affinity: self.affinity_size,
        }
    }

    /// The datapath's configuration, with the per-node `snat_secret` (kept from the pinned
    /// configuration when adopting: see [`snat_secret`]).
    pub fn datapath_config(&self, snat_secret: u32) -> DatapathConfig {
        let ranges = &self.snat_port_range.0;
        let second = ranges.get(1).map_or((0, 0), |r| (r.first, r.last));
        DatapathConfig {
            maglev_size: self.maglev_table_size,
            hash_seed: self.hash_seed,
            snat_port_min: ranges[0].first,
            snat_port_max: ranges[0].last,
            tcp_syn_timeout_s: self.conntrack_tcp_syn_timeout,
            tcp_established_timeout_s: self.conntrack_tcp_established_timeout,
            tcp_closing_timeout_s: self.conntrack_tcp_closing_timeout,
            udp_timeout_s: self.conntrack_udp_timeout,
            hz: datapath::kernel_hz(),
            snat_secret,
            snat_port_min2: second.0,
            snat_port_max2: second.1,
        }
    }

    /// Refuses settings that would break traffic, before touching anything.
    pub fn validate(&self) -> Result<()> {
        let reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .map(|t| reserved_ports(&t))
            .unwrap_or_default();
        let local =
            ledger::read_local_port_range(std::path::Path::new(ledger::IP_LOCAL_PORT_RANGE));
        validate_snat_ranges(
            &self.snat_port_range,
            &self.service_node_port_range,
            local,
            &reserved,
        )?;
        if !datapath::is_prime(self.maglev_table_size) {
            bail!(
                "--maglev-table-size {} is not a prime (try 1021, 4093 or 16381)",
                self.maglev_table_size
            );
        }
        Ok(())
    }

    pub fn selection(&self) -> Result<Selection> {
        let primary = self.nodeport_addresses.iter().any(|a| a == "primary");
        if primary && self.nodeport_addresses.len() > 1 {
            bail!(
                "--nodeport-addresses {}: `primary` stands alone (CIDRs, or primary)",
                self.nodeport_addresses.join(",")
            );
        }
        let mut nodeport_prefixes = Vec::new();
        let mut nodeport_prefixes_v6 = Vec::new();
        for s in self.nodeport_addresses.iter().filter(|_| !primary) {
            // Each CIDR goes to its family's list; kube-proxy's proxier of a family reads only
            // that family's CIDRs (`NewNodePortAddresses`).
            if s.contains(':') {
                nodeport_prefixes_v6.push(s.parse::<Ipv6Prefix>().map_err(|e| {
                    anyhow::anyhow!("--nodeport-addresses {s}: {e} (CIDRs, or primary)")
                })?);
            } else {
                nodeport_prefixes.push(s.parse::<Ipv4Prefix>().map_err(|e| {
                    anyhow::anyhow!("--nodeport-addresses {s}: {e} (CIDRs, or primary)")
                })?);
            }
        }
        Ok(Selection {
            external: self.external_interfaces.clone(),
            pod_patterns: self.pod_interfaces.clone(),
            nodeport_prefixes,
            nodeport_prefixes_v6,
            primary_only: primary,
        })
    }
}

/// Checks each SNAT range against the privileged ports, the node port range and the node's
/// ephemeral ports (`local`, unless the overlap is reserved in ip_local_reserved_ports).
fn validate_snat_ranges(
    ranges: &SnatPortRanges,
    node_ports: &NodePortRange,
    local: Option<(u16, u16)>,
    reserved: &[(u16, u16)],
) -> Result<()> {
    let np = (node_ports.first, node_ports.last);
    for range in &ranges.0 {
        let snat = (range.first, range.last);
        if range.first < MIN_SNAT_PORT {
            bail!(
                "--snat-port-range {ranges}: the range {range} starts below {MIN_SNAT_PORT}: \
                 privileged ports are not SNAT ports (services trust them); start it at \
                 {MIN_SNAT_PORT} or above"
            );
        }
        if let Some((a, b)) = overlap(snat, np) {
            bail!(
                "--snat-port-range {ranges}: the range {range} overlaps the node port range \
                 {node_ports} on {a}-{b}: a SNATed connection's reply would look like node port \
                 traffic; pick a range outside it"
            );
        }
        if let Some(local) = local
            && let Some((a, b)) = overlap(snat, local).filter(|o| !all_reserved(*o, reserved))
        {
            bail!(
                "--snat-port-range {ranges}: the range {range} overlaps \
                 net.ipv4.ip_local_port_range {}-{} on {a}-{b}: the node's own connections could \
                 take the same source ports as SNATed ones. Pick a range outside it, or shrink \
                 ip_local_port_range, or reserve the range with net.ipv4.ip_local_reserved_ports",
                local.0,
                local.1
            );
        }
    }
    Ok(())
}

/// The Kubernetes client of `run` and `ports`: `--kubeconfig` and `--context` when given, else
/// the in-cluster configuration, else $KUBECONFIG or ~/.kube/config (kube-proxy and kubectl
/// look in the same places).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Client> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?
        }
        (None, Some(name)) => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| anyhow::anyhow!("--context {name}: {e}"))?,
        (None, None) => Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "no Kubernetes client configuration: {e} (neither in a cluster nor a \
                 kubeconfig; give --kubeconfig, or --manifests DIR to read files instead)"
            )
        })?,
    };
    kube::Client::try_from(config).map_err(|e| anyhow::anyhow!("the Kubernetes client: {e}"))
}

/// `--config FILE`: the file's flags as command-line arguments to append to `run`'s, leaving
/// out those the command line or the environment gave (they win). `run` is the clap command
/// of `run`, `given` its matches without the file. Keys are flag names without `--`; an
/// unknown key, or a value of the wrong shape, is an error naming the file and the key.
pub fn file_args(
    run: &clap::Command,
    given: &clap::ArgMatches,
    path: &std::path::Path,
) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    let file: BTreeMap<String, serde_norway::Value> = match serde_norway::from_str(&text) {
        Ok(Some(map)) => map,
        Ok(None) => BTreeMap::new(),
        Err(e) => bail!(
            "--config {}: {e} (expected a mapping of flag names to values)",
            path.display()
        ),
    };
    let mut args = Vec::new();
    for (key, value) in file {
        let place = || format!("--config {}: {key}", path.display());
        let arg = run
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(key.as_str())
                    || a.get_all_aliases().into_iter().flatten().any(|n| n == key)
            })
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "help" | "version"))
            .ok_or_else(|| anyhow::anyhow!("{}: not a flag of `nodeport-agent run`", place()))?;
        let long = arg.get_long().expect("every flag of run is a long one");
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        ) {
            continue;
        }
        let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let scalar = |v: &serde_norway::Value| -> Result<String> {
            match v {
                serde_norway::Value::String(s) => Ok(s.clone()),
                serde_norway::Value::Number(n) => Ok(n.to_string()),
                serde_norway::Value::Bool(b) => Ok(b.to_string()),
                _ => bail!("{}: expected a string, a number or a boolean", place()),
            }
        };
        match &value {
            serde_norway::Value::Null => {}
            serde_norway::Value::Bool(on) if switch => {
                if *on {
                    args.push(format!("--{long}"));
                }
            }
            _ if switch => bail!("{}: expected true or false", place()),
            serde_norway::Value::Sequence(items) => {
                if !matches!(arg.get_action(), clap::ArgAction::Append) {
                    bail!("{}: takes one value, not a list", place());
                }
                for item in items {
                    args.push(format!("--{long}={}", scalar(item)?));
                }
            }
            other => args.push(format!("--{long}={}", scalar(other)?)),
        }
    }
    Ok(args)
}

/// The effective configuration of `run` from its final matches: every flag but `--config` by
/// name with its value, defaults included (lists as arrays, switches as booleans), for the
/// start line. It is a valid `--config` file itself.
pub fn effective(
    run: &clap::Command,
    matches: &clap::ArgMatches,
) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for arg in run.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        // The file itself is logged apart: a file cannot name another.
        if matches!(id, "help" | "version" | "config") {
            continue;
        }
        let values: Vec<String> = matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let value = match arg.get_action() {
            clap::ArgAction::SetTrue => serde_json::Value::Bool(values.iter().any(|v| v == "true")),
            clap::ArgAction::Append => values.into_iter().map(serde_json::Value::from).collect(),
            _ => values
                .into_iter()
                .next()
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        };
        out.insert(long.to_owned(), value);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    #[test]
    fn port_ranges() {
        // One parser for both ranges (the node port range's, kube-apiserver's syntax).
        assert_eq!(
            "61000-65535".parse::<NodePortRange>(),
            Ok(NodePortRange {
                first: 61000,
                last: 65535
            })
        );
        assert!("65535-61000".parse::<NodePortRange>().is_err());
        assert!("0-10".parse::<NodePortRange>().is_err());
        assert_eq!(overlap((61000, 65535), (32768, 60999)), None);
        assert_eq!(
            overlap((30000, 40000), (32768, 60999)),
            Some((32768, 40000))
        );
    }
    #[test]
    fn snat_port_ranges() {
        let default: SnatPortRanges = DEFAULT_SNAT_PORT_RANGES.parse().unwrap();
        assert_eq!(
            default.0,
            [
                NodePortRange {
                    first: 1024,
                    last: 29_999
                },
                NodePortRange {
                    first: 61_000,
                    last: 65_535
                }
            ]
        );
        assert_eq!(default.to_string(), DEFAULT_SNAT_PORT_RANGES);
        assert_eq!("61000-65535".parse::<SnatPortRanges>().unwrap().0.len(), 1);
        assert!(
            "1024-2000,3000-4000,5000-6000"
                .parse::<SnatPortRanges>()
                .is_err()
        );
        let err = "1024-5000,4000-6000".parse::<SnatPortRanges>().unwrap_err();
        assert!(err.contains("overlap on 4000-5000"), "{err}");
    }

    /// `run`'s flags as the command line gives them.
    pub(crate) fn run_args(args: &[&str]) -> RunArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once("nodeport-agent").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .expect("valid flags")
            .run
    }

    #[test]
    fn the_default_snat_ranges_give_33512_ports_outside_node_and_ephemeral_ports() {
        let args = run_args(&[]);
        validate_snat_ranges(
            &args.snat_port_range,
            &args.service_node_port_range,
            Some((32_768, 60_999)),
            &[],
        )
        .unwrap();
        let cfg = args.datapath_config(7);
        assert_eq!(cfg.snat_span(), 33_512);
        assert_eq!(
            (
                cfg.snat_port_min,
                cfg.snat_port_max,
                cfg.snat_port_min2,
                cfg.snat_port_max2,
                cfg.snat_secret
            ),
            (1024, 29_999, 61_000, 65_535, 7)
        );
        // One range: the second is empty.
        let one = run_args(&["--snat-port-range", "61000-65535"]).datapath_config(7);
        assert_eq!(
            (one.snat_port_min2, one.snat_port_max2, one.snat_span()),
            (0, 0, 4536)
        );
        // The handshake table's size and the collector's interval.
        let args = run_args(&[
            "--conntrack-handshake-size",
            "1000",
            "--conntrack-gc-interval",
            "3",
        ]);
        assert_eq!(
            (args.sizing().conntrack_new, args.conntrack_gc_interval),
            (1000, 3)
        );
        assert_eq!(
            run_args(&[]).sizing().conntrack_new,
            capacity::CONNTRACK_NEW
        );
    }
    #[test]
    fn each_snat_range_is_checked_and_named() {
        let node_ports = NodePortRange {
            first: 30_000,
            last: 32_767,
        };
        let check = |ranges: &str, local: Option<(u16, u16)>, reserved: &[(u16, u16)]| {
            validate_snat_ranges(&ranges.parse().unwrap(), &node_ports, local, reserved)
                .map_err(|e| e.to_string())
        };
        let local = Some((32_768, 60_999));
        // The second range in the node port range.
        let err = check("1024-2000,30000-30100", local, &[]).unwrap_err();
        assert!(
            err.contains(
                "the range 30000-30100 overlaps the node port range 30000-32767 on \
                 30000-30100"
            ),
            "{err}"
        );
        // The second range in the ephemeral ports, unless reserved.
        let err = check("61000-65535,40000-40100", local, &[]).unwrap_err();
        assert!(
            err.contains(
                "the range 40000-40100 overlaps net.ipv4.ip_local_port_range \
                 32768-60999 on 40000-40100"
            ),
            "{err}"
        );
        check("61000-65535,40000-40100", local, &[(40_000, 40_100)]).unwrap();
        // Privileged ports.
        let err = check("1000-2000", local, &[]).unwrap_err();
        assert!(
            err.contains("the range 1000-2000 starts below 1024"),
            "{err}"
        );
    }
    #[test]
    fn reserved_ports_cover_an_overlap() {
        let reserved = reserved_ports("8080,60000-60999\n");
        assert_eq!(reserved, [(8080, 8080), (60000, 60999)]);
        assert!(all_reserved((60500, 60999), &reserved));
        assert!(!all_reserved((59999, 60999), &reserved));
        assert!(reserved_ports("\n").is_empty());
    }
    #[test]
    fn optional_addresses() {
        assert_eq!("off".parse::<OptionalAddr>(), Ok(OptionalAddr(None)));
        assert_eq!(
            "127.0.0.1:9480".parse::<OptionalAddr>(),
            Ok(OptionalAddr(Some("127.0.0.1:9480".parse().unwrap())))
        );
        assert!("9480".parse::<OptionalAddr>().is_err());
    }

    /// `run` as clap sees it, and its matches for `args`.
    fn run_command() -> clap::Command {
        use clap::Args as _;
        RunArgs::augment_args(clap::Command::new("run"))
    }

    fn matches(args: &[String]) -> clap::ArgMatches {
        let argv = std::iter::once("run".to_owned()).chain(args.iter().cloned());
        run_command()
            .try_get_matches_from(argv)
            .expect("valid flags")
    }

    #[test]
    fn a_config_file_gives_flags_the_command_line_overrides() {
        let dir = crate::test_support::ScratchDir::new("config-file");
        let file = dir.path().join("nodeport.yaml");
        std::fs::write(
            &file,
            "# a ConfigMap's data\n\
             max-services: 8192\n\
             external-interface: [eth0, eth1]\n\
             pod-interfaces: veth*,cali*\n\
             detach-on-exit: true\n\
             source-ranges-on-node-ports: false\n\
             metrics-addr: 0.0.0.0:9480\n\
             conntrack-udp-timeout: 30\n\
             service-proxy-name: ~\n",
        )
        .unwrap();
        let given: Vec<String> = [
            "--config",
            file.to_str().unwrap(),
            "--conntrack-udp-timeout",
            "90",
        ]
        .map(String::from)
        .to_vec();
        let extra = file_args(&run_command(), &matches(&given), &file).unwrap();
        assert_eq!(
            extra,
            [
                "--detach-on-exit",
                "--external-interface=eth0",
                "--external-interface=eth1",
                "--max-services=8192",
                "--metrics-bind-address=0.0.0.0:9480",
                "--pod-interfaces=veth*,cali*",
            ]
        );
        let all: Vec<String> = given.into_iter().chain(extra).collect();
        let m = matches(&all);
        let args = <RunArgs as clap::FromArgMatches>::from_arg_matches(&m).unwrap();
        assert_eq!(args.max_services, 8192);
        assert_eq!(args.conntrack_udp_timeout, 90, "the command line wins");
        assert_eq!(args.external_interfaces, ["eth0", "eth1"]);
        assert_eq!(args.pod_interfaces, ["veth*", "cali*"]);
        assert!(args.detach_on_exit);
        assert_eq!(
            args.metrics_bind_address.0,
            Some("0.0.0.0:9480".parse().unwrap())
        );

        // The effective configuration names every flag, defaults included, with the same
        // keys: it is a config file itself.
        let effective = effective(&run_command(), &m);
        assert_eq!(effective["max-services"], "8192");
        assert_eq!(effective["conntrack-udp-timeout"], "90");
        assert_eq!(
            effective["external-interface"],
            serde_json::json!(["eth0", "eth1"])
        );
        assert_eq!(effective["detach-on-exit"], true);
        assert_eq!(effective["hash-seed"], DEFAULT_HASH_SEED.to_string());
        assert_eq!(effective["service-proxy-name"], serde_json::Value::Null);
        let flags = run_command()
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "config"))
            .count();
        assert_eq!(effective.len(), flags, "every flag: {effective:?}");
        let copy = dir.path().join("effective.yaml");
        std::fs::write(&copy, serde_json::to_string(&effective).unwrap()).unwrap();
        let again = file_args(&run_command(), &matches(&[]), &copy).unwrap();
        let from_copy = matches(&again);
        assert_eq!(
            super::effective(&run_command(), &from_copy)["max-services"],
            "8192"
        );
    }

    #[test]
    fn the_datapath_switch_comes_from_a_flag_or_the_config_file() {
        let dir = crate::test_support::ScratchDir::new("config-switch");
        let file = dir.path().join("nodeport.yaml");
        std::fs::write(
            &file,
            "datapath-switch: /etc/nodeport/datapath\ndrain-timeout: 60\n",
        )
        .unwrap();
        let given: Vec<String> = ["--config", file.to_str().unwrap()]
            .map(String::from)
            .to_vec();
        let extra = file_args(&run_command(), &matches(&given), &file).unwrap();
        let all: Vec<String> = given.into_iter().chain(extra).collect();
        let args = <RunArgs as clap::FromArgMatches>::from_arg_matches(&matches(&all)).unwrap();
        assert_eq!(
            args.datapath_switch.as_deref(),
            Some(std::path::Path::new("/etc/nodeport/datapath"))
        );
        assert_eq!(args.drain_timeout, 60);
        // Defaults: no switch (on), a 300 s drain.
        let args = <RunArgs as clap::FromArgMatches>::from_arg_matches(&matches(&[])).unwrap();
        assert_eq!(args.datapath_switch, None);
        assert_eq!(args.drain_timeout, 300);
    }

    #[test]
    fn a_config_file_with_an_unknown_key_or_a_wrong_shape_is_refused() {
        let dir = crate::test_support::ScratchDir::new("config-file-bad");
        let check = |text: &str, expected: &str| {
            let file = dir.path().join("bad.yaml");
            std::fs::write(&file, text).unwrap();
            let err = file_args(&run_command(), &matches(&[]), &file)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(
                err.starts_with(&format!("--config {}", file.display())),
                "{err}"
            );
        };
        check(
            "max-service: 10\n",
            "max-service: not a flag of `nodeport-agent run`",
        );
        check("config: other.yaml\n", "config: not a flag");
        check(
            "detach-on-exit: yes please\n",
            "detach-on-exit: expected true or false",
        );
        check(
            "max-services: [1, 2]\n",
            "max-services: takes one value, not a list",
        );
        check(
            "external-interface: {a: b}\n",
            "expected a string, a number or a boolean",
        );
        check("- a list\n", "expected a mapping of flag names to values");
        let missing = dir.path().join("missing.yaml");
        let err = file_args(&run_command(), &matches(&[]), &missing).unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
    }

    #[test]
    fn nodeport_addresses_primary_stands_alone() {
        let sel = run_args(&["--nodeport-addresses", "primary"])
            .selection()
            .unwrap();
        assert!(sel.primary_only && sel.nodeport_prefixes.is_empty());
        let sel = run_args(&["--nodeport-addresses", "10.0.0.0/8"])
            .selection()
            .unwrap();
        assert!(!sel.primary_only && sel.nodeport_prefixes.len() == 1);
        let err = run_args(&["--nodeport-addresses", "primary,10.0.0.0/8"])
            .selection()
            .unwrap_err();
        assert!(err.to_string().contains("`primary` stands alone"), "{err}");
        // CIDRs of both families, each to its own family (an IPv6 one stopped the agent).
        let sel = run_args(&["--nodeport-addresses", "10.0.0.0/8,fd00::/8"])
            .selection()
            .unwrap();
        assert_eq!(
            (
                sel.nodeport_prefixes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                sel.nodeport_prefixes_v6
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ),
            (vec!["10.0.0.0/8".to_owned()], vec!["fd00::/8".to_owned()])
        );
        let sel = run_args(&["--nodeport-addresses", "2001:db8::/32"])
            .selection()
            .unwrap();
        assert!(sel.nodeport_prefixes.is_empty() && sel.nodeport_prefixes_v6.len() == 1);
        let err = run_args(&["--nodeport-addresses", "fd00::/129"])
            .selection()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--nodeport-addresses fd00::/129: "),
            "{err}"
        );
        let err = run_args(&["--nodeport-addresses", "10.0.0.0/33"])
            .selection()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--nodeport-addresses 10.0.0.0/33: "),
            "{err}"
        );
    }

    #[test]
    fn kube_proxy_flag_names() {
        let args = run_args(&[
            "--hostname-override",
            "node-7",
            "--kubeconfig",
            "/k",
            "--context",
            "c",
        ]);
        assert_eq!(args.node_name.as_deref(), Some("node-7"));
        assert_eq!(args.kubeconfig.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(args.context.as_deref(), Some("c"));
    }

    #[test]
    fn every_flag_has_help() {
        for arg in run_command().get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            assert!(!help.is_empty(), "--{} has no help", arg.get_id());
        }
    }
}
