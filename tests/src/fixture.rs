//! A loaded datapath with maps seeded by hand, and BPF_PROG_TEST_RUN of its programs inside
//! a namespace whose routes and neighbours make every FIB lookup deterministic.
//!
//! The namespace ("node") has:
//! - `ext0` 198.18.0.1/24 (MAC 02:..:01), the external interface; on its link the client
//!   198.18.0.100 and node2 198.18.0.2 have permanent neighbour entries;
//! - `pod0`, a routed pod veth: 198.18.1.0/24 dev pod0; pods .10 and .11 have neighbour
//!   entries, .99 has none (the no-neighbour case);
//! - 198.18.2.0/24 via node2: remote pods;
//! - nothing for 198.18.9.0/24: the no-route case.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use nodeport_agent::{
    datapath::{Datapath, Sizing},
    maglev::{self, MaglevKey},
};
use nodeport_common::{
    BE_F_LOCAL, BE_F_PRESENT, Backend, Counter, CtEntry, CtKey, DatapathConfig, Frontend,
    FrontendKey, SnatAddr, SrcRangeKey, SvcStats, XDP_META_MAGIC, XdpMeta, programs,
    src_range_prefix_len,
};

pub use nodeport_agent::datapath::CtTable;

use crate::{netns::NetNs, packet::Mac};

pub const EXT_MAC: Mac = [2, 0, 0, 0, 0, 0x01];
pub const EXT_PEER_MAC: Mac = [2, 0, 0, 0, 0, 0xfe];
pub const CLIENT_MAC: Mac = [2, 0, 0, 0, 0, 0x64];
pub const NODE2_MAC: Mac = [2, 0, 0, 0, 0, 0x02];
pub const POD_HOST_MAC: Mac = [2, 0, 0, 0, 1, 0x01];
pub const POD_MAC: Mac = [2, 0, 0, 0, 1, 0x0a];

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A pod address behind a route of MTU 1400.
pub const NARROW_POD: &str = "198.18.1.20";
/// A client address behind a device of MTU 1400.
pub const NARROW_CLIENT: &str = "198.18.5.100";

/// The namespace the programs run in during a test run.
pub struct Topology {
    pub ns: NetNs,
    pub ext_ifindex: u32,
    pub pod_ifindex: u32,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let ns = NetNs::new("pk")?;
        // Forwarding on before the devices exist, so they inherit it (the FIB lookup checks it).
        ns.sysctl("net.ipv4.ip_forward=1")?;
        ns.ip(&format!(
            "link add ext0 address {} type veth peer name ext0p address {}",
            mac_str(EXT_MAC),
            mac_str(EXT_PEER_MAC)
        ))?;
        ns.ip(&format!(
            "link add pod0 address {} type veth peer name pod0p address {}",
            mac_str(POD_HOST_MAC),
            mac_str(POD_MAC)
        ))?;
        for dev in ["ext0", "ext0p", "pod0", "pod0p"] {
            ns.ip(&format!("link set {dev} up"))?;
        }
        ns.ip("addr add 198.18.0.1/24 dev ext0")?;
        ns.ip("route add 198.18.1.0/24 dev pod0")?;
        ns.ip("route add 198.18.2.0/24 via 198.18.0.2 dev ext0")?;
        ns.ip(&format!(
            "neigh add 198.18.0.100 lladdr {} dev ext0 nud permanent",
            mac_str(CLIENT_MAC)
        ))?;
        ns.ip(&format!(
            "neigh add 198.18.0.2 lladdr {} dev ext0 nud permanent",
            mac_str(NODE2_MAC)
        ))?;
        // A pod the node reaches over a route of MTU 1400 (path MTU cases); locked, as a
        // forwarding node reads a route's MTU only then (ip_mtu_from_fib_result).
        ns.ip(&format!("route add {NARROW_POD}/32 dev pod0 mtu lock 1400"))?;
        for pod in ["198.18.1.10", "198.18.1.11", NARROW_POD] {
            ns.ip(&format!(
                "neigh add {pod} lladdr {} dev pod0 nud permanent",
                mac_str(POD_MAC)
            ))?;
        }
        // Clients the node reaches through a device of MTU 1400 (path MTU of pod replies).
        ns.ip("link add ext1 mtu 1400 type veth peer name ext1p mtu 1400")?;
        for dev in ["ext1", "ext1p"] {
            ns.ip(&format!("link set {dev} up"))?;
        }
        ns.ip(&format!("route add {NARROW_CLIENT}/32 dev ext1"))?;
        ns.ip(&format!(
            "neigh add {NARROW_CLIENT} lladdr {} dev ext1 nud permanent",
            mac_str(CLIENT_MAC)
        ))?;
        let ext_ifindex = ns.ifindex("ext0")?;
        let pod_ifindex = ns.ifindex("pod0")?;
        Ok(Self {
            ns,
            ext_ifindex,
            pod_ifindex,
        })
    }
}

/// A backend to seed.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: SocketAddrV4,
    pub local: bool,
}

pub fn local(id: u32, addr: &str) -> BackendSpec {
    BackendSpec {
        id,
        addr: crate::packet::sa(addr),
        local: true,
    }
}

pub fn remote(id: u32, addr: &str) -> BackendSpec {
    BackendSpec {
        id,
        addr: crate::packet::sa(addr),
        local: false,
    }
}

/// A service to seed: its frontends, backends and Maglev block.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub id: u32,
    pub frontends: Vec<(SocketAddrV4, u8)>,
    pub backends: Vec<BackendSpec>,
    pub flags: u16,
    pub affinity_timeout_s: u32,
}

impl ServiceSpec {
    pub fn new(id: u32, frontend: &str, proto: u8, backends: Vec<BackendSpec>) -> Self {
        Self {
            id,
            frontends: vec![(crate::packet::sa(frontend), proto)],
            backends,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }
}

/// What an XDP test run returned.
#[derive(Debug)]
pub struct XdpRun {
    pub action: u32,
    pub meta: Option<XdpMeta>,
    pub frame: Vec<u8>,
    /// Mean time per repetition, as the kernel measured it.
    pub duration: std::time::Duration,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const TC_ACT_UNSPEC: i32 = -1;

pub struct Fixture {
    pub dp: Datapath,
    pub config: DatapathConfig,
}

pub fn default_config() -> DatapathConfig {
    DatapathConfig {
        maglev_size: 1021,
        hash_seed: 0x1234_5678,
        snat_port_min: 61000,
        snat_port_max: 61999,
        tcp_syn_timeout_s: 60,
        tcp_established_timeout_s: 3600,
        tcp_closing_timeout_s: 10,
        udp_timeout_s: 60,
        hz: nodeport_agent::datapath::kernel_hz(),
        snat_secret: 0x5eed_5eed,
        snat_port_min2: 0,
        snat_port_max2: 0,
    }
}

pub fn sizing() -> Sizing {
    Sizing {
        frontends: 1024,
        services: 64,
        backends: 1024,
        maglev_size: 1021,
        source_ranges: 256,
        conntrack: 4096,
        conntrack_new: 1024,
        affinity: 1024,
    }
}

/// A time stamp older than any timeout: the datapath's clock (jiffies) starts 2^32 - 300 HZ.
pub const LONG_AGO: u64 = 1;

impl Fixture {
    /// Loads a fresh datapath (nothing pinned) with the default configuration and the SNAT
    /// address of `ext0`.
    pub fn new(topo: &Topology) -> Result<Self> {
        let dp = Datapath::load(&sizing(), None).context("loading the datapath")?;
        Self::with(dp, topo)
    }

    /// The same around an already loaded datapath (another object or sizing).
    pub fn with(dp: Datapath, topo: &Topology) -> Result<Self> {
        let config = DatapathConfig {
            maglev_size: dp.sizing.maglev_size,
            ..default_config()
        };
        let mut fx = Self { dp, config };
        fx.set_config(config)?;
        fx.dp.maps.snat_addrs.insert(
            topo.ext_ifindex,
            SnatAddr {
                addr_be: u32::from(NODE_IP).to_be(),
            },
            0,
        )?;
        Ok(fx)
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        self.config = config;
        self.dp.maps.config.set(0, config, 0)?;
        Ok(())
    }

    /// Seeds a service: backends, a Maglev table over all of them in block `id`, frontends.
    pub fn add_service(&mut self, svc: &ServiceSpec) -> Result<()> {
        for b in &svc.backends {
            self.put_backend(svc.id, b)?;
        }
        let ids: Vec<u32> = svc.backends.iter().map(|b| b.id).collect();
        self.set_table(svc, &ids)
    }

    pub fn put_backend(&mut self, svc_id: u32, b: &BackendSpec) -> Result<()> {
        let value = Backend {
            addr_be: u32::from(*b.addr.ip()).to_be(),
            port_be: b.addr.port().to_be(),
            flags: BE_F_PRESENT | if b.local { BE_F_LOCAL } else { 0 },
            _pad: 0,
            svc_id,
        };
        self.dp.maps.backends.set(b.id, value)?;
        Ok(())
    }

    /// Marks a seeded backend as draining (no new connections), as the agent does for a
    /// terminating endpoint.
    /// Out of the table for new connections (a terminating endpoint still serving).
    pub fn set_draining(&mut self, id: u32) -> Result<()> {
        self.add_backend_flags(id, nodeport_common::BE_F_DRAINING)
    }

    /// Draining and no longer serving.
    pub fn set_not_serving(&mut self, id: u32) -> Result<()> {
        self.add_backend_flags(
            id,
            nodeport_common::BE_F_DRAINING | nodeport_common::BE_F_NOT_SERVING,
        )
    }

    fn add_backend_flags(&mut self, id: u32, flags: u8) -> Result<()> {
        let mut b = self.dp.maps.backends.get(id)?;
        b.flags |= flags;
        self.dp.maps.backends.set(id, b)?;
        Ok(())
    }

    pub fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.dp.maps.backends.set(id, Backend::default())?;
        Ok(())
    }

    /// Takes the backend at `addr` out of the service's Maglev table (it stays in
    /// `NP_BACKENDS`) and returns its id.
    pub fn take_out_of_table(&mut self, svc: &ServiceSpec, addr: &str) -> Result<u32> {
        let id = svc
            .backends
            .iter()
            .find(|b| b.addr.to_string() == addr)
            .with_context(|| format!("{addr} is not a backend of the service"))?
            .id;
        let others: Vec<u32> = svc
            .backends
            .iter()
            .map(|b| b.id)
            .filter(|b| *b != id)
            .collect();
        self.set_table(svc, &others)?;
        Ok(id)
    }

    /// Rewrites the service's Maglev table over the backends `ids` (which must be seeded) and
    /// its frontends' backend count. An empty list leaves the table empty.
    pub fn set_table(&mut self, svc: &ServiceSpec, ids: &[u32]) -> Result<()> {
        let m = self.config.maglev_size;
        let mut members: Vec<(MaglevKey, u32)> = svc
            .backends
            .iter()
            .filter(|b| ids.contains(&b.id))
            .map(|b| {
                (
                    MaglevKey {
                        addr_be: u32::from(*b.addr.ip()).to_be(),
                        port_be: b.addr.port().to_be(),
                    },
                    b.id,
                )
            })
            .collect();
        members.sort();
        if !members.is_empty() {
            let keys: Vec<MaglevKey> = members.iter().map(|(k, _)| *k).collect();
            for (slot, index) in maglev::table(&keys, m).into_iter().enumerate() {
                self.dp
                    .maps
                    .maglev
                    .set(svc.id * m + slot as u32, members[index as usize].1)?;
            }
        }
        for (addr, proto) in &svc.frontends {
            let key = FrontendKey::new(u32::from(*addr.ip()).to_be(), addr.port(), *proto);
            let value = Frontend {
                svc_id: svc.id,
                maglev_block: svc.id,
                backend_count: members.len() as u16,
                flags: svc.flags,
                affinity_timeout_s: svc.affinity_timeout_s,
            };
            self.dp.maps.frontends.insert(key, value, 0)?;
            let (word, bit) = nodeport_common::frontend_port_bit(addr.port());
            let bits = self.dp.maps.frontend_ports.get(&word, 0)?;
            self.dp.maps.frontend_ports.set(word, bits | bit, 0)?;
        }
        Ok(())
    }

    pub fn allow_source(&mut self, svc_id: u32, prefix: Ipv4Addr, len: u32) -> Result<()> {
        let key = aya::maps::lpm_trie::Key::new(
            src_range_prefix_len(len),
            SrcRangeKey {
                svc_id_be: svc_id.to_be(),
                addr_be: u32::from(prefix).to_be(),
            },
        );
        self.dp.maps.src_ranges.insert(&key, 1, 0)?;
        Ok(())
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<Counter, u64>> {
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = self.dp.maps.counters.get(&(*c as u32), 0)?;
            let total: u64 = per_cpu.iter().sum();
            if total != 0 {
                out.insert(*c, total);
            }
        }
        Ok(out)
    }

    pub fn svc_stats(&self, svc_id: u32) -> Result<SvcStats> {
        let per_cpu = self.dp.maps.svc_stats.get(&svc_id, 0)?;
        Ok(per_cpu.iter().fold(SvcStats::default(), |acc, s| SvcStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            reply_packets: acc.reply_packets + s.reply_packets,
            reply_bytes: acc.reply_bytes + s.reply_bytes,
        }))
    }

    /// Every entry of both connection tables, each with the table it is in, sorted by table
    /// (established first), then key.
    pub fn conntrack(&self) -> Result<Vec<(CtTable, CtKey, CtEntry)>> {
        let mut entries = Vec::new();
        for table in CtTable::ALL {
            entries.extend(
                self.conntrack_table(table)?
                    .into_iter()
                    .map(|(k, e)| (table, k, e)),
            );
        }
        Ok(entries)
    }

    /// The entries of one connection table (`NP_CT` or `NP_CT_NEW`), sorted by key.
    pub fn conntrack_table(&self, table: CtTable) -> Result<Vec<(CtKey, CtEntry)>> {
        let map = match table {
            CtTable::Established => &self.dp.maps.conntrack,
            CtTable::Handshake => &self.dp.maps.conntrack_new,
        };
        let mut entries: Vec<_> = map.iter().collect::<Result<_, _>>()?;
        entries.sort_by_key(|(k, _)| *k);
        Ok(entries)
    }

    /// The entries of established connections (`NP_CT`), sorted by key.
    pub fn established(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        self.conntrack_table(CtTable::Established)
    }

    /// The entries of connections in the handshake (`NP_CT_NEW`), sorted by key.
    pub fn handshake(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        self.conntrack_table(CtTable::Handshake)
    }

    /// The table of `table`, to insert or remove entries by hand.
    pub fn conntrack_map(
        &mut self,
        table: CtTable,
    ) -> &mut aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry> {
        match table {
            CtTable::Established => &mut self.dp.maps.conntrack,
            CtTable::Handshake => &mut self.dp.maps.conntrack_new,
        }
    }

    /// Runs the external XDP program on `frame` as if it arrived on ext0.
    pub fn xdp(&mut self, topo: &Topology, frame: &[u8]) -> Result<XdpRun> {
        self.xdp_on(topo, topo.ext_ifindex, frame)
    }

    /// Runs the external XDP program on `frame` as if it arrived on device `ingress`.
    pub fn xdp_on(&mut self, topo: &Topology, ingress: u32, frame: &[u8]) -> Result<XdpRun> {
        let prog = self.dp.xdp_program(programs::XDP_EXTERNAL)?;
        run_xdp(prog, &topo.ns, ingress, frame, 1)
    }

    /// Runs the external TC program (`--external-hook tc`) on `frame` as if it arrived on
    /// ext0, a GSO packet of segments of `gso_size` payload bytes if not 0.
    pub fn tc_ext(
        &mut self,
        topo: &Topology,
        frame: &[u8],
        gso_size: u32,
    ) -> Result<(i32, Vec<u8>)> {
        let prog = self.dp.tc_program(programs::TC_EXTERNAL_NAT)?;
        let run = run_tc(prog, topo, topo.ext_ifindex, frame, gso_size, 1)?;
        Ok((run.ret, run.frame))
    }

    /// Runs the pod-facing TC program on `frame` as if it arrived on pod0.
    pub fn tc_pod(&mut self, topo: &Topology, frame: &[u8]) -> Result<(i32, Vec<u8>)> {
        self.tc_pod_on(topo, topo.pod_ifindex, frame)
    }

    /// Runs the pod-facing TC program on `frame` as if it arrived on device `ifindex`.
    pub fn tc_pod_on(
        &mut self,
        topo: &Topology,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<(i32, Vec<u8>)> {
        let prog = self.dp.tc_program(programs::TC_POD)?;
        let run = run_tc(prog, topo, ifindex, frame, 0, 1)?;
        Ok((run.ret, run.frame))
    }
}

/// What a TC program did in BPF_PROG_TEST_RUN.
pub struct TcRun {
    pub ret: i32,
    pub frame: Vec<u8>,
    /// The kernel's mean time per repetition.
    pub duration: std::time::Duration,
}

/// BPF_PROG_TEST_RUN of a TC program with `ifindex` as the receiving device, `gso_size` as
/// the skb's, `repeat` times.
pub fn run_tc(
    prog: &mut aya::programs::SchedClassifier,
    topo: &Topology,
    ifindex: u32,
    frame: &[u8],
    gso_size: u32,
    repeat: u32,
) -> Result<TcRun> {
    topo.ns.run(|| {
        let mut ctx = [0u8; 192];
        // struct __sk_buff: ingress_ifindex at 36, ifindex at 40, gso_size at 176.
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(TcRun {
            ret: result.return_value as i32,
            frame: out,
            duration: result.duration,
        })
    })?
}

/// BPF_PROG_TEST_RUN of an XDP program with `ingress` as the receiving device, `repeat` times.
/// Returns the verdict, the metadata the program left (if any) and the frame.
pub fn run_xdp(
    prog: &mut aya::programs::Xdp,
    ns: &NetNs,
    ingress: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<XdpRun> {
    ns.run(|| {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. data_end must equal the frame length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
        let mut ctx_out = [0u8; 24];
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            repeat,
            ..TestRunOptions::default()
        })?;
        out.truncate(result.data_size_out as usize);
        // The output starts with the metadata; ctx_out.data is its length.
        let meta_len = u32::from_ne_bytes(ctx_out[0..4].try_into().expect("4 bytes")) as usize;
        let meta = (meta_len == size_of::<XdpMeta>())
            .then(|| bytemuck::pod_read_unaligned::<XdpMeta>(&out[..meta_len]))
            .filter(|m| m.magic == XDP_META_MAGIC);
        Ok(XdpRun {
            action: result.return_value,
            meta,
            frame: out[meta_len..].to_vec(),
            duration: result.duration,
        })
    })?
}
