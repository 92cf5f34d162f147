//! The maps, one static each. Names match `nodeport_common::names`; sizes here are defaults
//! that the agent overrides at load time (`EbpfLoader::map_max_entries`).

use crate::fib::Route;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use nodeport_common::{
    AffinityEntry, AffinityKey, AgentState, BPF_F_MMAPABLE, Backend, COUNTER_SLOTS, CtEntry, CtKey,
    DatapathConfig, FRONTEND_PORT_WORDS, FragKey, FragPorts, Frontend, FrontendKey, LocalNetKey,
    MaglevSlot, PROG_SLOTS, SnatAddr, SrcRangeKey, SvcName, SvcStats, capacity,
};

#[map]
pub static NP_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map]
pub static NP_FE_PORTS: Array<u64> = Array::with_max_entries(FRONTEND_PORT_WORDS, 0);

#[map]
pub static NP_SNAT_ADDRS: HashMap<u32, SnatAddr> =
    HashMap::with_max_entries(capacity::SNAT_ADDRS, 0);

#[map]
pub static NP_FRONTENDS: HashMap<FrontendKey, Frontend> =
    HashMap::with_max_entries(capacity::FRONTENDS, 0);

#[map]
pub static NP_BACKENDS: Array<Backend> =
    Array::with_max_entries(capacity::BACKENDS, BPF_F_MMAPABLE);

#[map]
pub static NP_MAGLEV: Array<MaglevSlot> = Array::with_max_entries(
    capacity::maglev_blocks(capacity::SERVICES) * capacity::MAGLEV_SIZE,
    BPF_F_MMAPABLE,
);

#[map]
pub static NP_SRC_RANGES: LpmTrie<SrcRangeKey, u32> =
    LpmTrie::with_max_entries(capacity::SRC_RANGES, 0);

/// Established connections. A plain hash: the datapath never evicts from it (the agent
/// deletes expired connections), so no flood of new connections can push one out.
#[map]
pub static NP_CT: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(capacity::CONNTRACK, 0);

/// Connections in the handshake or not answered yet: an LRU of their own, which a SYN flood
/// churns instead of the established table (nf_conntrack's early_drop of unassured entries).
#[map]
pub static NP_CT_NEW: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(capacity::CONNTRACK_NEW, 0);

/// Room for what `np_xdp_new` builds for a new connection: its two entries (144 bytes the
/// 512-byte BPF stack cannot spare next to the SNAT port search) and the route to its backend
/// (held here, not on the stack, across that search: the verifier then walks the search once
/// for every kind of route instead of once per kind).
pub struct NewScratch {
    pub forward: CtEntry,
    pub reply: CtEntry,
    pub route: Route,
}

#[map]
pub static NP_NEW_SCRATCH: PerCpuArray<NewScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the second (in jiffies) of the last answers the datapath sent (ICMP errors for
/// Services without endpoints, TTL 1 and packets too big, RSTs for connections whose endpoint
/// left), and how many were sent in it. Not pinned: a restart may only reset the budget.
#[map]
pub static NP_REJECT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The first fragments of fragmented IPv4 datagrams and their ports, for their later fragments
/// (module `frag`, after Cilium's `cilium_ipv4_frag_datagrams`). Not pinned: a restart only
/// loses the datagrams in flight.
#[map]
pub static NP_FRAGS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(capacity::FRAGS, 0);

/// Programs tail-called from the XDP entry point (see nodeport_common::programs).
#[map]
pub static NP_PROGS: ProgramArray = ProgramArray::with_max_entries(PROG_SLOTS, 0);

/// The new-connection program of the TC external path (`np_tc_new`): a program array holds
/// programs of one type, so TC's has its own. Pinned as `NP_PROGS` is.
#[map]
pub static NP_TC_PROGS: ProgramArray = ProgramArray::with_max_entries(PROG_SLOTS, 0);

/// Prefixes that are never an outside client: the node's addresses and pod networks.
#[map]
pub static NP_LOCAL_NETS: LpmTrie<LocalNetKey, u32> =
    LpmTrie::with_max_entries(capacity::LOCAL_NETS, 0);

#[map]
pub static NP_AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map]
pub static NP_SVC_STATS: PerCpuArray<SvcStats> =
    PerCpuArray::with_max_entries(capacity::SERVICES, 0);

#[map]
pub static NP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Read by the agent only (see nodeport_common::SvcName).
#[map]
pub static NP_SVC_NAMES: HashMap<u32, SvcName> = HashMap::with_max_entries(capacity::SERVICES, 0);

/// Read by the agent and `status` only (see nodeport_common::AgentState).
#[map]
pub static NP_AGENT: Array<AgentState> = Array::with_max_entries(1, 0);
