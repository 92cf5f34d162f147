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
    pub const CONNTRACK_NEW: &str = "NP_CT_NEW";
    pub const LOCAL_NETS: &str = "NP_LOCAL_NETS";
    pub const PROGRAMS: &str = "NP_PROGS";
    pub const TC_PROGRAMS: &str = "NP_TC_PROGS";
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
        CONNTRACK_NEW,
        LOCAL_NETS,
        PROGRAMS,
        TC_PROGRAMS,
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
    /// A new connection's first packet, tail-called from `np_xdp_ext` (slot
    /// [`super::PROG_SLOT_NEW_CONNECTION`] of `NP_PROGS`): backend selection, SNAT port
    /// choice and the conntrack inserts get a verifier budget and stack of their own.
    pub const XDP_NEW_CONNECTION: &str = "np_xdp_new";
    /// TC ingress on the external interfaces: redirects what XDP translated for another device.
    pub const TC_EXTERNAL: &str = "np_tc_ext";
    /// TC ingress on pod-facing interfaces: reverse NAT of replies from local backends.
    pub const TC_POD: &str = "np_tc_pod";
    /// TC ingress on the external interfaces instead of XDP (`--external-hook tc`): the
    /// external path itself, in TC.
    pub const TC_EXTERNAL_NAT: &str = "np_tc_ext_nat";
    /// A new connection's first packet in TC, tail-called from `np_tc_ext_nat` (slot
    /// [`super::PROG_SLOT_NEW_CONNECTION`] of `NP_TC_PROGS`).
    pub const TC_NEW_CONNECTION: &str = "np_tc_new";
    /// A bare XDP_PASS program, the baseline of `cargo xtask bench`.
    pub const XDP_PASS: &str = "np_xdp_pass";
    /// Put in [`super::PROG_SLOT_NEW_CONNECTION`] instead of [`XDP_NEW_CONNECTION`] while the
    /// datapath drains: a new connection's first packet goes to the kernel (counted
    /// `draining`), established connections carry on untouched.
    pub const XDP_DRAIN: &str = "np_xdp_drain";
    /// The same for the TC hook, instead of [`TC_NEW_CONNECTION`] in `NP_TC_PROGS`.
    pub const TC_DRAIN: &str = "np_tc_drain";
}

/// Slot of `NP_PROGS` (a program array) holding [`programs::XDP_NEW_CONNECTION`].
pub const PROG_SLOT_NEW_CONNECTION: u32 = 0;
/// Slots of `NP_PROGS`.
pub const PROG_SLOTS: u32 = 1;

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
    /// Established connections (two entries each), never evicted by the datapath.
    pub const CONNTRACK: u32 = 262_144;
    /// Connections in the handshake or unanswered (two entries each): an LRU of their own, so
    /// a SYN flood churns this table and never the established one.
    pub const CONNTRACK_NEW: u32 = 65_536;
    /// Prefixes that are never an external client: the node's addresses, its pod CIDRs.
    pub const LOCAL_NETS: u32 = 1_024;
    pub const AFFINITY: u32 = 65_536;
    pub const SNAT_ADDRS: u32 = 256;
    /// Fragmented datagrams being followed (`NP_FRAGS`, an LRU; Cilium's default size).
    pub const FRAGS: u32 = 8_192;

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
    /// Source ports used when SNATing to a remote backend (host order, inclusive), in up to
    /// two ranges (the second is unused when `snat_port_max2` is 0): the node's own
    /// ephemeral ports sit between them by default.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_syn_timeout_s: u32,
    pub tcp_established_timeout_s: u32,
    pub tcp_closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// Kernel ticks per second (CONFIG_HZ): the datapath keeps time in jiffies, the cheapest
    /// clock it can read (docs/datapath.md), and converts timeouts with this.
    pub hz: u32,
    /// Per-node random secret of the SNAT port hash, so nobody outside can predict which
    /// port a connection gets (the flow hash seed is the same on every node by design).
    pub snat_secret: u32,
    pub snat_port_min2: u16,
    pub snat_port_max2: u16,
}
assert_size!(DatapathConfig, 40);

impl DatapathConfig {
    /// How long (seconds) a connection lives without packets in its `state`.
    #[inline(always)]
    pub fn ct_timeout_s(&self, proto: u8, state: &CtState) -> u32 {
        if proto != crate::IPPROTO_TCP {
            self.udp_timeout_s
        } else if state.closing() {
            self.tcp_closing_timeout_s
        } else if state.established != 0 {
            self.tcp_established_timeout_s
        } else {
            self.tcp_syn_timeout_s
        }
    }

    /// Whether a connection in `state` last seen at `last_seen` has expired at `now` (jiffies).
    #[inline(always)]
    pub fn ct_expired(&self, proto: u8, state: &CtState, last_seen: u64, now: u64) -> bool {
        now.saturating_sub(last_seen)
            > u64::from(self.ct_timeout_s(proto, state)) * u64::from(self.hz)
    }

    /// Whether `entry` (of protocol `proto`) has expired at `now`, judged by its own
    /// direction's last packet alone: the connection may still live through the other one.
    #[inline(always)]
    pub fn ct_entry_expired(&self, entry: &CtEntry, proto: u8, now: u64) -> bool {
        self.ct_expired(proto, &entry.state, entry.last_seen, now)
    }

    /// How many SNAT ports the configured ranges hold.
    #[inline(always)]
    pub fn snat_span(&self) -> u32 {
        span(self.snat_port_min, self.snat_port_max)
            + span(self.snat_port_min2, self.snat_port_max2)
    }

    /// The `index`th SNAT port (`index < snat_span()`), counting through both ranges.
    #[inline(always)]
    pub fn snat_port_at(&self, index: u32) -> u16 {
        let first = span(self.snat_port_min, self.snat_port_max);
        if index < first {
            (u32::from(self.snat_port_min) + index) as u16
        } else {
            (u32::from(self.snat_port_min2) + index - first) as u16
        }
    }

    /// Whether `port` is one of the SNAT ports.
    #[inline(always)]
    pub fn is_snat_port(&self, port: u16) -> bool {
        (port >= self.snat_port_min && port <= self.snat_port_max)
            || (self.snat_port_max2 != 0
                && port >= self.snat_port_min2
                && port <= self.snat_port_max2)
    }
}

/// Ports in `min..=max`; an empty range is written as max 0 (or max below min).
#[inline(always)]
const fn span(min: u16, max: u16) -> u32 {
    if max == 0 || max < min {
        0
    } else {
        max as u32 - min as u32 + 1
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
/// table and session affinity does not send new connections to it; established connections
/// finish.
pub const BE_F_DRAINING: u8 = 1 << 2;
/// The backend is not serving (its endpoint's `serving` condition is false): UDP flows move to
/// another backend, as kube-proxy clears UDP conntrack entries of endpoints that stopped
/// serving (a serving, terminating one keeps its flows through a graceful shutdown).
pub const BE_F_NOT_SERVING: u8 = 1 << 3;
/// Set with `BE_F_DRAINING` on a ready backend that topology hints keep out of this node's
/// table (another node's or zone's endpoint). The datapath treats it as draining; it tells
/// `nodeport-agent dump` why the backend takes no new connections.
pub const BE_F_HINTED_AWAY: u8 = 1 << 4;

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

/// Key of `NP_CT` and `NP_CT_NEW`: a packet's tuple as it arrives, plus the direction.
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

impl CtKey {
    /// Equality with one branch: the datapath compares keys on its hot and new-connection
    /// paths, and a field-by-field comparison gives the verifier seven branches to walk.
    #[inline(always)]
    pub fn same(&self, other: &CtKey) -> bool {
        let a: [u64; 2] = bytemuck::cast(*self);
        let b: [u64; 2] = bytemuck::cast(*other);
        (a[0] ^ b[0]) | (a[1] ^ b[1]) == 0
    }
}

/// The connection is SNATed to a remote backend (both entries carry it).
pub const CT_F_SNAT: u16 = 1 << 0;
/// The backend is on this node (both entries carry it).
pub const CT_F_LOCAL: u16 = 1 << 3;
/// The client's source port was rewritten because its tuple at the pod clashed with another
/// connection's (two frontends of one local pod), as Linux NAT does.
pub const CT_F_PORT_REWRITE: u16 = 1 << 4;

/// What a connection has seen, one byte per fact so that each is written with a plain store
/// by the one direction that learns it: two CPUs handling the two directions at once never
/// undo each other's write (a read-modify-write of shared flag bits could). The writer stores
/// the same bytes into both of the connection's entries, so either entry alone tells the
/// state; the state machine is docs/datapath.md's "Connection tracking".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtState {
    /// The backend answered (for TCP its SYN-ACK). Written by replies.
    pub replied: u8,
    /// The handshake completed: for TCP a client packet without SYN after the answer, for
    /// UDP the answer itself. Moves the connection to the established table.
    pub established: u8,
    /// FIN sent by the client / by the backend.
    pub fin_fwd: u8,
    pub fin_rep: u8,
    /// RST sent by the client / by the backend, cleared when the same side goes on talking
    /// (an RST its endpoint did not honour: spoofed, or lost on the way).
    pub rst_fwd: u8,
    pub rst_rep: u8,
}
assert_size!(CtState, 6);

/// TCP flags the state machine reads.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl CtState {
    /// The connection is closing: FIN both ways, or an RST.
    #[inline(always)]
    pub const fn closing(&self) -> bool {
        self.rst_fwd != 0 || self.rst_rep != 0 || (self.fin_fwd != 0 && self.fin_rep != 0)
    }

    /// The state after a packet of direction `dir`. `tcp_flags` and `payload` (the packet
    /// carries data) matter for TCP only.
    #[inline(always)]
    pub const fn after(mut self, proto: u8, dir: u8, tcp_flags: u8, payload: bool) -> Self {
        let tcp = proto == crate::IPPROTO_TCP;
        let syn = tcp_flags & TCP_SYN != 0;
        let fin = tcp_flags & TCP_FIN != 0;
        let rst = tcp_flags & TCP_RST != 0;
        if dir == CT_DIR_REPLY {
            self.replied = 1;
            if !tcp {
                self.established = 1;
                return self;
            }
            if fin {
                self.fin_rep = 1;
            } else if payload && !syn {
                // Data after its own FIN: that FIN was not the backend's.
                self.fin_rep = 0;
            }
            self.rst_rep = rst as u8;
        } else {
            if !tcp {
                return self;
            }
            // The client's ACK of the SYN-ACK, or anything after it, completes the handshake.
            if !syn && !rst && self.replied != 0 {
                self.established = 1;
            }
            if fin {
                self.fin_fwd = 1;
            } else if payload && !syn {
                self.fin_fwd = 0;
            }
            self.rst_fwd = rst as u8;
        }
        self
    }
}

/// Value of `NP_CT` and `NP_CT_NEW`: the tuple a packet matching the key is rewritten to,
/// where it went, and what the connection has seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// Last packet in this direction, in jiffies. A connection lives while either of its two
    /// entries does.
    pub last_seen: u64,
    /// When (jiffies, the low 48 bits; 0: never) the cached next hop below was last confirmed
    /// by a FIB lookup, and the route's MTU then (the high 16 bits; 0: not known), packed into
    /// one field so the entry keeps its layout: a datapath that knows no MTU here reads a
    /// packed value as a check long ago and looks the route up anew. A FIB lookup costs more
    /// than the rest of the path together, so a connection repeats it at most once a second
    /// (docs/datapath.md); [`CtEntry::route_check`] and [`CtEntry::route_mtu`] unpack it.
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
    /// The device the connection's replies must come from: the one it leaves by towards a
    /// remote backend (both entries carry it, the forward entry so a lost reply entry can be
    /// rebuilt), or for a local backend the device of the pod's first answer (reply entry
    /// only). 0: not bound yet. Forward packets are never checked against it.
    pub bound_ifindex: u32,
    /// CT_F_*: what the connection is; set when it is created, never changed.
    pub flags: u16,
    pub route_smac: [u8; 6],
    pub route_dmac: [u8; 6],
    pub state: CtState,
    /// TCP: the sequence number after this direction's last segment (host order; the highest
    /// seen, so a retransmission does not move it back), and the highest acknowledgement it
    /// sent. Written by this direction only. Both 0: not known yet (a new or rebuilt entry).
    /// They tell an RST its endpoint would take from a blind guess, a pod's first answer from
    /// a spoofed one, and when a closed connection's SNAT port may go to a new one.
    pub seq_next: u32,
    pub ack_max: u32,
}
assert_size!(CtEntry, 72);

impl CtEntry {
    /// Key of the entry for the other direction: this entry's rewritten tuple, reversed.
    #[inline(always)]
    pub const fn opposite_key(&self, proto: u8, dir: u8) -> CtKey {
        CtKey {
            saddr_be: self.new_daddr_be,
            daddr_be: self.new_saddr_be,
            sport_be: self.new_dport_be,
            dport_be: self.new_sport_be,
            proto,
            dir,
            _pad: 0,
        }
    }
}

/// `a` comes after `b` in TCP sequence space (RFC 793's modular comparison, Linux `after`).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// How far behind a direction's sequence an RST or an acknowledgement may be: what can be in
/// flight unacknowledged. Linux conntrack uses the receiver's window; this bound is a window
/// of 1 MiB without knowing the scale, so a blind guess hits it once in 4,096 tries at most.
pub const SEQ_WINDOW: u32 = 1 << 20;

/// The bits of [`CtEntry::route_checked`] that hold the time of the check.
const ROUTE_CHECK_TIME: u64 = (1 << 48) - 1;

impl CtEntry {
    /// When the cached next hop was last confirmed (jiffies, 48 bits; 0: never).
    #[inline(always)]
    pub const fn route_check(&self) -> u64 {
        self.route_checked & ROUTE_CHECK_TIME
    }

    /// The cached route's MTU (0: not known).
    #[inline(always)]
    pub const fn route_mtu(&self) -> u16 {
        (self.route_checked >> 48) as u16
    }

    /// Records a FIB lookup at `now` (jiffies) that found a route of MTU `mtu`.
    #[inline(always)]
    pub const fn set_route_check(&mut self, now: u64, mtu: u16) {
        self.route_checked = (now & ROUTE_CHECK_TIME) | ((mtu as u64) << 48);
    }

    /// Whether the cached next hop is due for a FIB lookup at `now`: never checked, its MTU
    /// not known, or checked `recheck` jiffies ago or more.
    #[inline(always)]
    pub const fn route_stale(&self, now: u64, recheck: u64) -> bool {
        let checked = self.route_check();
        checked == 0
            || self.route_mtu() == 0
            || (now & ROUTE_CHECK_TIME).wrapping_sub(checked) & ROUTE_CHECK_TIME >= recheck
    }

    /// Whether this direction's sequence numbers are known (a packet of it was seen).
    #[inline(always)]
    pub const fn seq_known(&self) -> bool {
        self.seq_next != 0 || self.ack_max != 0
    }

    /// Notes a TCP segment of this entry's direction: `seq`, the sequence number after it
    /// (`seq_end`, counting SYN and FIN) and its acknowledgement (`ack`, when `has_ack`).
    #[inline(always)]
    pub fn note_segment(&mut self, seq_end: u32, ack: u32, has_ack: bool) {
        let known = self.seq_known();
        if !known || seq_after(seq_end, self.seq_next) {
            self.seq_next = seq_end;
        }
        if has_ack && (!known || seq_after(ack, self.ack_max)) {
            self.ack_max = ack;
        }
    }
}

/// The sequence number after a TCP segment: its own plus its data, plus one for a SYN and one
/// for a FIN (each takes a sequence number).
#[inline(always)]
pub const fn tcp_seq_end(seq: u32, payload_len: u32, flags: u8) -> u32 {
    seq.wrapping_add(payload_len)
        .wrapping_add((flags & TCP_SYN != 0) as u32)
        .wrapping_add((flags & TCP_FIN != 0) as u32)
}

/// Whether an RST with sequence number `seq`, sent by the direction of `sender`, is one its
/// receiver could take (Linux nf_conntrack_proto_tcp's window check, "invalid rst"): not
/// beyond what the sender has sent, not before what the receiver has acknowledged (or, when
/// that is not known, not more than [`SEQ_WINDOW`] behind). Unknown sequence numbers (a new
/// or rebuilt entry) accept it: nothing better is known.
#[inline(always)]
pub fn rst_in_window(seq: u32, sender: &CtEntry, receiver: Option<&CtEntry>) -> bool {
    if !sender.seq_known() {
        return true;
    }
    let end = sender.seq_next;
    let start = match receiver {
        Some(r) if r.seq_known() && !seq_after(r.ack_max, end) => {
            // The receiver acknowledged up to here; bound the distance all the same.
            if end.wrapping_sub(r.ack_max) <= SEQ_WINDOW {
                r.ack_max
            } else {
                end.wrapping_sub(SEQ_WINDOW)
            }
        }
        _ => end.wrapping_sub(SEQ_WINDOW),
    };
    end.wrapping_sub(seq) <= end.wrapping_sub(start)
}

/// Whether `ack`, acknowledging the direction of `peer`, acknowledges what that direction
/// sent: not beyond it, and at most [`SEQ_WINDOW`] behind. A blind spoofer does not know it.
#[inline(always)]
pub const fn ack_in_window(ack: u32, peer: &CtEntry) -> bool {
    !peer.seq_known() || peer.seq_next.wrapping_sub(ack) <= SEQ_WINDOW
}

/// Whether a closing TCP connection's reply tuple may go to a new connection whose first
/// sequence number ends at `new_seq_end`, the old client's sequence having ended at
/// `old_client_seq` (when known) (Linux nf_nat_used_tuple_harder): the old connection is over
/// (both FINs, or an RST), and the new SYN's sequence is past the old client's, so a backend
/// socket still in TIME_WAIT takes it as a new connection (tcp_timewait_state_process) instead
/// of answering it as the old one.
#[inline(always)]
pub fn may_take_over(old_state: &CtState, old_client_seq: Option<u32>, new_seq_end: u32) -> bool {
    old_state.closing() && old_client_seq.is_none_or(|old| seq_after(new_seq_end, old))
}

/// Whether the entries `a` (under `key_a`) and `b` (under `key_b`) are the two directions of
/// one connection: each one's opposite key is the other's key. An entry whose partner is
/// missing, or was taken over by a later connection, fails this.
#[inline(always)]
pub fn ct_pair(key_a: &CtKey, a: &CtEntry, key_b: &CtKey, b: &CtEntry) -> bool {
    a.opposite_key(key_a.proto, key_b.dir).same(key_b)
        & b.opposite_key(key_b.proto, key_a.dir).same(key_a)
}

/// Data part of an `NP_LOCAL_NETS` LPM key (the prefix length covers the 32 address bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct LocalNetKey {
    pub addr_be: u32,
}
assert_size!(LocalNetKey, 4);

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

/// Key of `NP_FRAGS` (kernel side only, not pinned): one fragmented IPv4 datagram, as
/// Cilium's `struct ipv4_frag_id` (bpf/lib/ipv4.h) keys `cilium_ipv4_frag_datagrams`.
/// The addresses and id are those of the datagram as it arrived, before any translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FragKey, 12);

/// Value of `NP_FRAGS`: the L4 ports of the datagram's first fragment (Cilium's
/// `struct ipv4_frag_l4ports`) and when it was seen (low 32 bits of jiffies): later
/// fragments follow it for [`FRAG_TIMEOUT_S`] seconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seen: u32,
}
assert_size!(FragPorts, 8);

/// How long (seconds) the later fragments of a datagram follow its first fragment's ports.
/// A datagram's fragments are sent back to back, so this is far above any reordering; kept
/// well below the kernel's 30 s reassembly timeout (ipfrag_time) so that a reused IP id whose
/// own first fragment was lost rarely meets a stale entry.
pub const FRAG_TIMEOUT_S: u32 = 2;

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
    unsafe impl aya::Pod for LocalNetKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for AgentState {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for SvcName {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    const FWD: u8 = CT_DIR_FORWARD;
    const REP: u8 = CT_DIR_REPLY;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;

    #[test]
    fn the_route_check_packs_its_time_and_mtu_and_an_unpacked_one_is_stale() {
        let mut e = CtEntry::default();
        assert!(e.route_stale(1_000, 250), "never checked");
        e.set_route_check(1_000, 1400);
        assert_eq!((e.route_check(), e.route_mtu()), (1_000, 1400));
        assert!(!e.route_stale(1_249, 250));
        assert!(e.route_stale(1_250, 250));
        // A check written by a datapath that knew no MTU: looked up anew.
        e.route_checked = 1_000;
        assert!(e.route_stale(1_001, 250), "no MTU known");
        // Jiffies past 48 bits wrap with the field.
        e.set_route_check((1 << 48) - 10, 1500);
        assert!(!e.route_stale(1 << 48, 250));
        assert!(e.route_stale((1 << 48) + 240, 250));
    }

    fn config() -> DatapathConfig {
        DatapathConfig {
            tcp_syn_timeout_s: 30,
            tcp_established_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 60,
            hz: 1,
            ..DatapathConfig::default()
        }
    }

    /// Runs packets (direction, TCP flags, payload) through the state machine.
    fn tcp(packets: &[(u8, u8, bool)]) -> CtState {
        packets
            .iter()
            .fold(CtState::default(), |s, &(dir, flags, data)| {
                s.after(IPPROTO_TCP, dir, flags, data)
            })
    }

    fn timeout(state: CtState) -> u32 {
        config().ct_timeout_s(IPPROTO_TCP, &state)
    }

    // The transitions of Linux nf_conntrack's TCP table (nf_conntrack_proto_tcp.c
    // tcp_conntracks) and Cilium's per-direction closing flags (bpf/lib/conntrack.h
    // ct_update_timeout), reduced to what decides a timeout.

    #[test]
    fn a_syn_ack_alone_does_not_establish() {
        let s = tcp(&[(FWD, TCP_SYN, false), (REP, SYN_ACK, false)]);
        assert_eq!(s.replied, 1);
        assert_eq!(s.established, 0);
        assert_eq!(timeout(s), 30, "still the handshake timeout");
    }

    #[test]
    fn the_clients_ack_of_the_syn_ack_establishes() {
        let s = tcp(&[
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_ACK, false),
        ]);
        assert_eq!(s.established, 1);
        assert_eq!(timeout(s), 21_600);
    }

    #[test]
    fn client_packets_without_an_answer_never_establish() {
        // Spoofed SYNs, or a client talking to a backend that never answers.
        let s = tcp(&[
            (FWD, TCP_SYN, false),
            (FWD, TCP_ACK, true),
            (FWD, TCP_ACK, true),
        ]);
        assert_eq!(s.established, 0);
        assert_eq!(timeout(s), 30);
    }

    #[test]
    fn a_half_close_keeps_the_established_timeout() {
        let open = [
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_ACK, false),
        ];
        let half = tcp(&[open.as_slice(), &[(FWD, TCP_FIN | TCP_ACK, false)]].concat());
        assert!(!half.closing());
        assert_eq!(timeout(half), 21_600);
        // The backend answers for a long time, then closes its side too.
        let both = half.after(IPPROTO_TCP, REP, TCP_ACK, true).after(
            IPPROTO_TCP,
            REP,
            TCP_FIN | TCP_ACK,
            false,
        );
        assert!(both.closing());
        assert_eq!(timeout(both), 10);
    }

    #[test]
    fn an_rst_closes_and_traffic_from_the_same_side_restores() {
        let est = tcp(&[
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_ACK, false),
        ]);
        let reset = est.after(IPPROTO_TCP, FWD, TCP_RST, false);
        assert!(reset.closing());
        assert_eq!(timeout(reset), 10);
        // A spoofed RST "from the client": the real client goes on.
        let restored = reset.after(IPPROTO_TCP, FWD, TCP_ACK, true);
        assert!(!restored.closing());
        assert_eq!(timeout(restored), 21_600);
        // The other side talking does not restore the client's RST.
        let still = reset.after(IPPROTO_TCP, REP, TCP_ACK, true);
        assert!(still.closing());
    }

    #[test]
    fn data_after_a_fin_from_the_same_side_undoes_that_fin() {
        let est = tcp(&[
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_ACK, false),
            (REP, TCP_FIN | TCP_ACK, false),
        ]);
        assert_eq!(est.fin_rep, 1);
        // A bare ACK after the FIN is normal and keeps it, so does a SYN (a new connection
        // attempt, whatever it carries); data means the FIN was not real.
        assert_eq!(est.after(IPPROTO_TCP, REP, TCP_ACK, false).fin_rep, 1);
        assert_eq!(est.after(IPPROTO_TCP, REP, SYN_ACK, true).fin_rep, 1);
        assert_eq!(est.after(IPPROTO_TCP, REP, TCP_ACK, true).fin_rep, 0);
    }

    #[test]
    fn udp_is_established_by_an_answer() {
        let s = CtState::default().after(IPPROTO_UDP, FWD, 0, true);
        assert_eq!(s.established, 0);
        let s = s.after(IPPROTO_UDP, REP, 0, true);
        assert_eq!((s.replied, s.established), (1, 1));
        assert_eq!(config().ct_timeout_s(IPPROTO_UDP, &s), 60);
    }

    #[test]
    fn expiry_counts_whole_seconds_of_jiffies() {
        let cfg = DatapathConfig {
            hz: 250,
            ..config()
        };
        let s = CtState::default();
        assert!(!cfg.ct_expired(IPPROTO_TCP, &s, 1_000, 1_000 + 30 * 250));
        assert!(cfg.ct_expired(IPPROTO_TCP, &s, 1_000, 1_000 + 30 * 250 + 1));
    }

    #[test]
    fn snat_ports_count_through_both_ranges() {
        let cfg = DatapathConfig {
            snat_port_min: 1024,
            snat_port_max: 29_999,
            snat_port_min2: 61_000,
            snat_port_max2: 65_535,
            ..config()
        };
        assert_eq!(cfg.snat_span(), 28_976 + 4_536);
        assert_eq!(cfg.snat_port_at(0), 1024);
        assert_eq!(cfg.snat_port_at(28_975), 29_999);
        assert_eq!(cfg.snat_port_at(28_976), 61_000);
        assert_eq!(cfg.snat_port_at(cfg.snat_span() - 1), 65_535);
        assert!(cfg.is_snat_port(1024) && cfg.is_snat_port(65_535) && cfg.is_snat_port(61_000));
        assert!(!cfg.is_snat_port(30_000) && !cfg.is_snat_port(1023) && !cfg.is_snat_port(60_999));
        let one = DatapathConfig {
            snat_port_min2: 0,
            snat_port_max2: 0,
            ..cfg
        };
        assert_eq!(one.snat_span(), 28_976);
        assert!(!one.is_snat_port(61_000) && !one.is_snat_port(0));
    }

    #[test]
    fn entries_pair_only_with_their_own_other_direction() {
        let fwd_key = CtKey {
            saddr_be: 1,
            daddr_be: 2,
            sport_be: 3,
            dport_be: 4,
            proto: IPPROTO_TCP,
            dir: FWD,
            _pad: 0,
        };
        // Client 1:3 -> frontend 2:4, SNATed to 9:7 towards backend 5:6.
        let fwd = CtEntry {
            new_saddr_be: 9,
            new_daddr_be: 5,
            new_sport_be: 7,
            new_dport_be: 6,
            ..CtEntry::default()
        };
        let rep_key = fwd.opposite_key(IPPROTO_TCP, REP);
        let rep = CtEntry {
            new_saddr_be: 2,
            new_daddr_be: 1,
            new_sport_be: 4,
            new_dport_be: 3,
            ..CtEntry::default()
        };
        assert!(ct_pair(&fwd_key, &fwd, &rep_key, &rep));
        // The same reply tuple, taken over by a connection of another client port.
        let other = CtEntry {
            new_dport_be: 33,
            ..rep
        };
        assert!(!ct_pair(&fwd_key, &fwd, &rep_key, &other));
    }

    // Sequence checks after nf_conntrack_proto_tcp.c (tcp_in_window, "invalid rst") and
    // nf_nat_core.c (nf_nat_used_tuple_harder, nf_seq_has_advanced).

    /// An entry that saw segments ending at `seq_next` and acknowledged up to `ack_max`.
    fn seen(seq_next: u32, ack_max: u32) -> CtEntry {
        CtEntry {
            seq_next,
            ack_max,
            ..CtEntry::default()
        }
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(seq_after(2, 1));
        assert!(!seq_after(1, 2));
        assert!(!seq_after(7, 7));
        assert!(seq_after(3, u32::MAX - 3), "past the wrap");
        assert!(!seq_after(u32::MAX - 3, 3));
        assert_eq!(tcp_seq_end(u32::MAX, 1, TCP_SYN | TCP_FIN), 2);
        assert_eq!(tcp_seq_end(100, 8, TCP_ACK), 108);
    }

    #[test]
    fn a_direction_keeps_its_highest_sequence_and_acknowledgement() {
        let mut e = CtEntry::default();
        assert!(!e.seq_known());
        e.note_segment(tcp_seq_end(1000, 0, TCP_SYN), 0, false);
        assert_eq!((e.seq_next, e.ack_max), (1001, 0));
        assert!(e.seq_known());
        e.note_segment(1101, 5001, true);
        // A retransmission of an earlier segment moves neither back.
        e.note_segment(1051, 4001, true);
        assert_eq!((e.seq_next, e.ack_max), (1101, 5001));
        // Across the wrap.
        let mut w = seen(u32::MAX - 10, 7);
        w.note_segment(20, 9, true);
        assert_eq!((w.seq_next, w.ack_max), (20, 9));
    }

    #[test]
    fn an_rst_counts_only_inside_its_senders_window() {
        let client = seen(5000, 9000);
        let pod = seen(9000, 4900); // acknowledged up to 4900: 100 bytes in flight
        // Unknown sequence numbers (a new or rebuilt entry): nothing better is known.
        assert!(rst_in_window(12345, &CtEntry::default(), Some(&pod)));
        // From the sender's next sequence down to what the receiver acknowledged.
        assert!(rst_in_window(5000, &client, Some(&pod)));
        assert!(rst_in_window(4900, &client, Some(&pod)));
        assert!(!rst_in_window(4899, &client, Some(&pod)), "before the ack");
        assert!(
            !rst_in_window(5001, &client, Some(&pod)),
            "past what was sent"
        );
        assert!(!rst_in_window(5000 + (16 << 20), &client, Some(&pod)));
        // Without the receiver's entry: a window of SEQ_WINDOW behind.
        assert!(rst_in_window(
            5000u32.wrapping_sub(SEQ_WINDOW),
            &client,
            None
        ));
        assert!(!rst_in_window(
            4999u32.wrapping_sub(SEQ_WINDOW),
            &client,
            None
        ));
        // An acknowledgement beyond what was sent, or far behind, is not trusted as a bound.
        assert!(rst_in_window(4000, &client, Some(&seen(1, 6000))));
        assert!(!rst_in_window(
            4999u32.wrapping_sub(SEQ_WINDOW),
            &client,
            Some(&seen(1, 6000))
        ));
        let far = seen(1, 5000u32.wrapping_sub(2 * SEQ_WINDOW));
        assert!(rst_in_window(
            5000u32.wrapping_sub(SEQ_WINDOW),
            &client,
            Some(&far)
        ));
        // Across the wrap.
        let wrapped = seen(10, 0);
        assert!(rst_in_window(
            u32::MAX - 5,
            &wrapped,
            Some(&seen(1, u32::MAX - 5))
        ));
        assert!(!rst_in_window(
            u32::MAX - 6,
            &wrapped,
            Some(&seen(1, u32::MAX - 5))
        ));
    }

    #[test]
    fn an_answer_must_acknowledge_what_was_sent() {
        let client = seen(1001, 0);
        assert!(ack_in_window(1001, &client), "the SYN-ACK");
        assert!(ack_in_window(1001u32.wrapping_sub(SEQ_WINDOW), &client));
        assert!(!ack_in_window(1002, &client), "data never sent");
        assert!(!ack_in_window(1000u32.wrapping_sub(SEQ_WINDOW), &client));
        assert!(!ack_in_window(77_000_000, &client));
        assert!(ack_in_window(77_000_000, &CtEntry::default()), "unknown");
    }

    #[test]
    fn a_closed_connections_tuple_goes_to_a_syn_past_its_sequence() {
        let open = tcp(&[
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_ACK, false),
        ]);
        let closed = tcp(&[
            (FWD, TCP_SYN, false),
            (REP, SYN_ACK, false),
            (FWD, TCP_FIN | TCP_ACK, false),
            (REP, TCP_FIN | TCP_ACK, false),
        ]);
        let reset = tcp(&[(FWD, TCP_SYN, false), (REP, TCP_RST | TCP_ACK, false)]);
        let old_client = seen(5000, 9000);
        assert!(
            !may_take_over(&open, Some(old_client.seq_next), 6000),
            "open"
        );
        assert!(may_take_over(&closed, Some(old_client.seq_next), 5001));
        assert!(
            !may_take_over(&closed, Some(old_client.seq_next), 5000),
            "not past it"
        );
        assert!(!may_take_over(&closed, Some(old_client.seq_next), 100));
        assert!(may_take_over(&reset, Some(old_client.seq_next), 6000));
        // The old client's entry lost: nothing to compare with.
        assert!(may_take_over(&closed, None, 100));
    }
}
