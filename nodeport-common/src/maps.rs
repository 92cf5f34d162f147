//! Map names, keys and values shared by the datapath and the agent.
//!
//! How a packet uses them (docs/datapath.md has the full picture):
//! `NP_FRONTENDS` (destination address, port, protocol) gives the service and its Maglev block
//! (a node port has one entry per node address, so one lookup decides); `NP_MAGLEV[block * M + hash % M]` gives a backend id; `NP_BACKENDS[id]` gives
//! the backend; `NP_CT` remembers the choice per connection in both directions.

use bytemuck::{Pod, Zeroable};

/// Map names as they appear in the object file (the `#[map]` statics carry these names).
pub mod names {
    pub const CONFIG: &str = "NP_CONFIG";
    pub const FRONTEND_PORTS: &str = "NP_FE_PORTS";
    pub const SNAT_ADDRS: &str = "NP_SNAT_ADDRS";
    pub const FRONTENDS: &str = "NP_FRONTENDS";
    pub const BACKENDS: &str = "NP_BACKENDS";
    pub const MAGLEV: &str = "NP_MAGLEV";
    pub const SRC_RANGES: &str = "NP_SRC_RANGES";
    pub const CONNTRACK: &str = "NP_CT";
    pub const AFFINITY: &str = "NP_AFFINITY";
    pub const SVC_STATS: &str = "NP_SVC_STATS";
    pub const COUNTERS: &str = "NP_COUNTERS";
    pub const SVC_NAMES: &str = "NP_SVC_NAMES";
    pub const AGENT: &str = "NP_AGENT";

    /// Every map, for pinning and validation.
    pub const ALL: &[&str] = &[
        CONFIG,
        FRONTEND_PORTS,
        SNAT_ADDRS,
        FRONTENDS,
        BACKENDS,
        MAGLEV,
        SRC_RANGES,
        CONNTRACK,
        AFFINITY,
        SVC_STATS,
        COUNTERS,
        SVC_NAMES,
        AGENT,
    ];
}

/// Program names in the object file.
pub mod programs {
    /// XDP on the node's external interfaces: frontends, selection, NAT, XDP_TX.
    pub const XDP_EXTERNAL: &str = "np_xdp_ext";
    /// TC ingress on the external interfaces: redirects what XDP translated for another device.
    pub const TC_EXTERNAL: &str = "np_tc_ext";
    /// TC ingress on pod-facing interfaces: reverse NAT of replies from local backends.
    pub const TC_POD: &str = "np_tc_pod";
    /// A bare XDP_PASS program, the baseline of `cargo xtask bench`.
    pub const XDP_PASS: &str = "np_xdp_pass";
}

/// Default capacities. The eBPF object declares its maps with these; the agent sets the real
/// sizes at load time from its flags (docs/operations.md explains how to size them).
pub mod capacity {
    /// Frontend entries: a node port counts once per node address.
    pub const FRONTENDS: u32 = 65_536;
    /// Services in the datapath sense: one per (Service, port, protocol).
    pub const SERVICES: u32 = 4_096;
    pub const BACKENDS: u32 = 65_536;
    /// M, slots of a service's Maglev table: a prime; larger spreads load more evenly over many
    /// backends, at `M * 8` bytes per service (array elements are 8-byte aligned).
    pub const MAGLEV_SIZE: u32 = 1_021;
    pub const SRC_RANGES: u32 = 16_384;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    pub const SNAT_ADDRS: u32 = 256;

    /// Maglev blocks for `services`: one each plus spares, because a changed table is written
    /// into a free block before the frontend switches to it.
    pub const fn maglev_blocks(services: u32) -> u32 {
        let spare = services / 16;
        services + if spare < 16 { 16 } else { spare }
    }
}

/// Asserts a shared type has exactly the size both sides were written for.
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

/// The one entry of `NP_CONFIG`. Written by the agent before any frontend; a zero
/// `maglev_size` means "not configured yet" and the datapath then passes everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathConfig {
    /// M, the number of slots in each service's Maglev table (a prime).
    pub maglev_size: u32,
    /// Seed of the flow hash; equal on every node so flows pick the same backend everywhere.
    pub hash_seed: u32,
    /// Source ports used when SNATing to a remote backend (host order, inclusive).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_syn_timeout_s: u32,
    pub tcp_established_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// Kernel ticks per second (CONFIG_HZ): the datapath keeps time in jiffies, the cheapest
    /// clock it can read (docs/datapath.md), and converts timeouts with this.
    pub hz: u32,
}
assert_size!(DatapathConfig, 32);

impl DatapathConfig {
    /// How long (jiffies) a connection-tracking entry lives without packets, by its state.
    #[inline(always)]
    pub fn ct_timeout(&self, proto: u8, flags: u16) -> u64 {
        let seconds = if proto != crate::IPPROTO_TCP {
            self.udp_timeout_s
        } else if flags & CT_F_CLOSING != 0 {
            self.tcp_closing_timeout_s
        } else if flags & CT_F_REPLY_SEEN != 0 {
            self.tcp_established_timeout_s
        } else {
            self.tcp_syn_timeout_s
        };
        u64::from(seconds) * u64::from(self.hz)
    }

    /// Whether `entry` (of protocol `proto`) has expired at `now` (jiffies).
    #[inline(always)]
    pub fn ct_expired(&self, entry: &CtEntry, proto: u8, now: u64) -> bool {
        now.saturating_sub(entry.last_seen) > self.ct_timeout(proto, entry.flags)
    }
}

/// `NP_FE_PORTS` is a bitmap of the destination ports any frontend uses: word `port / 64`,
/// bit `port % 64`. One array load tells a packet to a port no frontend uses (most host
/// traffic) that it is not ours, before any hash lookup.
pub const FRONTEND_PORT_WORDS: u32 = 65_536 / 64;

#[inline(always)]
pub const fn frontend_port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1u64 << (port % 64))
}

/// Value of `NP_SNAT_ADDRS` (key: egress ifindex): the address remote-backend traffic leaving
/// through that interface is SNATed to, as MASQUERADE would pick it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SnatAddr {
    pub addr_be: u32,
}
assert_size!(SnatAddr, 4);

/// Key of `NP_FRONTENDS`. A node port has one key per node address (the agent follows the
/// node's addresses), a LoadBalancer ingress IP or externalIP one key per address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FrontendKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FrontendKey, 8);

impl FrontendKey {
    pub const fn new(addr_be: u32, port: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// externalTrafficPolicy Local: the Maglev table holds only this node's backends, no SNAT.
pub const FE_F_LOCAL_ONLY: u16 = 1 << 0;
/// sessionAffinity ClientIP.
pub const FE_F_AFFINITY: u16 = 1 << 1;
/// loadBalancerSourceRanges apply: clients must match `NP_SRC_RANGES`.
pub const FE_F_SOURCE_RANGES: u16 = 1 << 2;

/// Value of `NP_FRONTENDS`. Replaced whole by the agent (hash map updates are atomic for
/// readers), so a packet never sees a block of one version with a count of another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Frontend {
    /// Service id: index of `NP_SVC_STATS`, owner of the backends it may use.
    pub svc_id: u32,
    /// This service's block in `NP_MAGLEV` (slots `block * M .. block * M + M`).
    pub maglev_block: u32,
    /// Backends in the table; 0 means there is none and new flows are dropped.
    pub backend_count: u16,
    pub flags: u16,
    /// sessionAffinity timeout.
    pub affinity_timeout_s: u32,
}
assert_size!(Frontend, 16);

/// The backend entry is in use.
pub const BE_F_PRESENT: u8 = 1 << 0;
/// The backend runs on this node: no SNAT, replies come back through the pod-facing hook.
pub const BE_F_LOCAL: u8 = 1 << 1;
/// The backend takes no new connections (terminating, not serving): it is out of the Maglev
/// table and session affinity does not send new connections to it; established TCP
/// connections finish, UDP flows move to another backend (they have nothing to finish).
pub const BE_F_DRAINING: u8 = 1 << 2;

/// Value of `NP_BACKENDS`, indexed by backend id. Id 0 is never used, so a zeroed Maglev
/// slot means "no backend". A backend entry belongs to one service: removing an endpoint from
/// a service removes its entry, and connections to it are re-selected even if the same pod
/// still serves another service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
    pub svc_id: u32,
}
assert_size!(Backend, 12);

/// A slot of `NP_MAGLEV`: a backend id.
pub type MaglevSlot = u32;

/// Data part of an `NP_SRC_RANGES` LPM key; the prefix length covers the 32 bits of the
/// service id plus the prefix of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SrcRangeKey {
    /// Service id in network order, so the trie compares it byte by byte like the address.
    pub svc_id_be: u32,
    pub addr_be: u32,
}
assert_size!(SrcRangeKey, 8);

/// Prefix length of an `NP_SRC_RANGES` key for a client prefix of `prefix_len` bits.
pub const fn src_range_prefix_len(prefix_len: u32) -> u32 {
    32 + prefix_len
}

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Key of `NP_CT`: a packet's tuple as it arrives, plus the direction.
/// Forward entries are keyed by client -> frontend; reply entries by backend -> client
/// (local backend) or backend -> node address:SNAT port (remote backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}
assert_size!(CtKey, 16);

/// The forward entry SNATs (remote backend).
pub const CT_F_SNAT: u16 = 1 << 0;
/// A packet has been seen in the reply direction.
pub const CT_F_REPLY_SEEN: u16 = 1 << 1;
/// FIN or RST seen: the entry expires after the closing timeout.
pub const CT_F_CLOSING: u16 = 1 << 2;
/// The backend is on this node.
pub const CT_F_LOCAL: u16 = 1 << 3;

/// Value of `NP_CT`: the tuple a packet matching the key is rewritten to, and where it went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// Last packet in this direction, in jiffies.
    pub last_seen: u64,
    /// When (jiffies) the cached next hop below was last confirmed by a FIB lookup; 0: none.
    /// A FIB lookup costs more than the rest of the path together, so a connection repeats it
    /// at most once a second (docs/datapath.md).
    pub route_checked: u64,
    pub new_saddr_be: u32,
    pub new_daddr_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// The backend chosen for the connection; checked on every packet so a connection whose
    /// backend is gone is re-selected.
    pub backend_id: u32,
    pub svc_id: u32,
    /// Cached next hop: egress device and MACs.
    pub route_ifindex: u32,
    pub flags: u16,
    pub route_smac: [u8; 6],
    pub route_dmac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_size!(CtEntry, 56);

/// Key of `NP_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_be: u32,
}
assert_size!(AffinityKey, 8);

/// Value of `NP_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityEntry {
    /// The client's last new connection, in jiffies.
    pub last_seen: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
assert_size!(AffinityEntry, 16);

/// Value of `NP_SVC_NAMES` (key: service id): which Service port a service id is. The
/// programs never read it; it is pinned with the other maps so that a restarted agent, and
/// `nodeport-agent dump` with no agent running, can name what the maps hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcName {
    /// NUL-padded UTF-8 (Kubernetes limits: 63, 63 and 15 characters).
    pub namespace: [u8; 64],
    pub name: [u8; 64],
    pub port_name: [u8; 16],
    pub protocol: u8,
    pub _pad: [u8; 7],
}
assert_size!(SvcName, 152);

impl Default for SvcName {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Value of `NP_AGENT` (one entry): what the agent last did. The programs never read it; it is
/// pinned with the maps so that `nodeport-agent status` can tell, with or without a running
/// agent, which agent programmed the datapath and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AgentState {
    /// When the agent that wrote this started (Unix time, milliseconds).
    pub started_unix_ms: u64,
    /// The last round that programmed everything it was given (0: none yet).
    pub last_sync_unix_ms: u64,
    /// The last round, successful or not.
    pub last_attempt_unix_ms: u64,
    /// The source's snapshot revision the last round applied.
    pub revision: u64,
    pub pid: u32,
    pub services: u32,
    pub backends: u32,
    /// Service ports that failed to program in the last round (they keep their old state).
    pub failing: u32,
    /// The agent's version, NUL-padded UTF-8.
    pub version: [u8; 32],
}
assert_size!(AgentState, 80);

/// Array maps userspace writes through a memory mapping (BPF_F_MMAPABLE): a Maglev table is a
/// memory copy rather than one syscall per slot. Each element takes `round_up(size, 8)` bytes.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Per-CPU value of `NP_SVC_STATS`, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SvcStats {
    /// Client -> backend packets and bytes (L3 length).
    pub packets: u64,
    pub bytes: u64,
    /// Backend -> client.
    pub reply_packets: u64,
    pub reply_bytes: u64,
}
assert_size!(SvcStats, 32);

/// What XDP leaves in the packet's metadata area for the TC ingress hook of the same device
/// when a translated packet must leave through another device. XDP does not touch the
/// Ethernet header in that case (a packet that reached the stack with a foreign destination MAC
/// would be dropped as PACKET_OTHERHOST); TC writes the MACs found by XDP's FIB lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct XdpMeta {
    pub magic: u32,
    /// Egress device.
    pub ifindex: u32,
    pub flags: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 8],
}
assert_size!(XdpMeta, 32);

/// `XdpMeta::magic`: "NPM1".
pub const XDP_META_MAGIC: u32 = 0x4e50_4d31;
/// The neighbour was unknown to the FIB lookup: use bpf_redirect_neigh.
pub const XDP_META_F_NEIGH: u32 = 1 << 0;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)] bytemuck::Pod types: no padding, any bit pattern valid.
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for SnatAddr {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for AgentState {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for SvcName {}
}
