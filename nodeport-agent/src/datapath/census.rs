//! Reading whole hash maps cheaply, to count what they hold (metrics, `status`) and to list
//! connections (`dump --conntrack`).
//!
//! Walking a map key by key costs two syscalls per entry: a full connection table of 262,144
//! entries would take half a million. `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) copies thousands of
//! entries per syscall. aya 0.14 has no batch API, hence the raw syscall here.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{IterableMap, MapData};
use bytemuck::Pod;
use std::{collections::BTreeMap, net::Ipv4Addr};

use nodeport_common::{
    AffinityEntry, AffinityKey, BE_F_PRESENT, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_SNAT,
    DatapathConfig, Frontend, FrontendKey, IPPROTO_TCP, SnatAddr, SvcName, names,
};
use serde::Serialize;

use super::{
    Maps,
    conntrack::{Connections, CtRecord, CtTable, read_tables},
};

/// Entries copied per syscall.
const CHUNK: usize = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` on the raw key and value of every entry. `value_size` is what the kernel copies
/// per entry (for per-CPU maps, every CPU's value). Entries added or removed meanwhile may or
/// may not be seen, as with any walk of a live map.
fn lookup_batch(
    map: &MapData,
    key_size: usize,
    value_size: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let mut keys = vec![0u8; CHUNK * key_size];
    let mut values = vec![0u8; CHUNK * value_size];
    // The position in the map between calls (a bucket index for hash maps, an index for
    // arrays: 4 bytes).
    let mut cursor_in = [0u8; 8];
    let mut cursor_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
            out_batch: cursor_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of CHUNK keys and values of the sizes the
        // caller checked against the map.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        // ENOENT: the walk is over; the entries of this last call are still valid.
        let done = if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                return Err(err);
            }
            true
        } else {
            false
        };
        let count = (attr.count as usize).min(CHUNK);
        for i in 0..count {
            f(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        if done {
            return Ok(());
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// Refuses to read a map with types of other sizes than its own.
fn check_sizes(map: &MapData, key_size: usize, value_size: usize) -> io::Result<()> {
    let info = map.info().map_err(io::Error::other)?;
    if info.key_size() as usize != key_size || info.value_size() as usize != value_size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "map entries are {}+{} bytes, not {key_size}+{value_size}",
                info.key_size(),
                info.value_size()
            ),
        ));
    }
    Ok(())
}

/// Calls `f` on every entry of a hash map or array.
pub fn for_each_entry<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(&K, &V)) -> io::Result<()> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    check_sizes(map, ks, vs)?;
    lookup_batch(map, ks, vs, |k, v| {
        f(
            &bytemuck::pod_read_unaligned(k),
            &bytemuck::pod_read_unaligned(v),
        )
    })
}

/// Calls `f` on every entry of a per-CPU array or hash map, with every CPU's value.
pub fn for_each_per_cpu<K: Pod, V: Pod>(
    map: &MapData,
    mut f: impl FnMut(&K, &[V]),
) -> io::Result<()> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    check_sizes(map, ks, vs)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // The kernel lays each CPU's value out 8-byte aligned.
    let stride = vs.div_ceil(8) * 8;
    let mut per_cpu = Vec::with_capacity(cpus);
    lookup_batch(map, ks, stride * cpus, |k, v| {
        per_cpu.clear();
        per_cpu.extend(
            v.chunks_exact(stride)
                .map(|c| bytemuck::pod_read_unaligned::<V>(&c[..vs])),
        );
        f(&bytemuck::pod_read_unaligned(k), &per_cpu)
    })
}

/// Number of entries in a hash map.
pub fn count<K: Pod, V: Pod>(map: &MapData) -> io::Result<u64> {
    let mut n = 0;
    for_each_entry::<K, V>(map, |_, _| n += 1)?;
    Ok(n)
}

/// How many entries one connection table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TableCensus {
    /// Entries, both directions, dead ones included (until the agent's collector deletes
    /// them they count against the table's size).
    pub entries: u64,
    /// Entries of live connections (a connection lives while either of its entries does).
    pub live: u64,
}

/// SNAT ports held through one SNAT address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnatAddressUsage {
    /// The node address connections to remote backends are SNATed to.
    pub address: String,
    /// Ports held by live connections, over all backends.
    pub ports: u64,
    /// Remote backends (address, port and protocol) with at least one connection.
    pub backends: u64,
    /// Ports held towards the busiest backend: each backend has the whole SNAT range (the
    /// census's `capacity_per_backend`) per SNAT address, so this is what runs out first.
    pub max_per_backend: u64,
}

/// SNAT ports held towards one backend through one SNAT address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnatBackendUsage {
    pub snat_address: String,
    /// Backend address:port.
    pub backend: String,
    pub protocol: &'static str,
    pub ports: u64,
}

/// What holds SNAT ports: live connections' reply entries of remote backends, in both tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnatCensus {
    /// Ports per backend and SNAT address (`--snat-port-range`, both ranges).
    pub capacity_per_backend: u64,
    /// Per SNAT address, by address.
    pub addresses: Vec<SnatAddressUsage>,
    /// The backends holding the most ports, most first (at most [`SNAT_TOP_BACKENDS`]).
    pub busiest_backends: Vec<SnatBackendUsage>,
}

/// How many of the busiest backends the SNAT census lists (and the metrics export): the
/// number of backends is unbounded, and the busiest are the ones that run out of ports.
pub const SNAT_TOP_BACKENDS: usize = 10;

/// What the connection tables hold (also as `dump --stats` and `status` show it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackCensus {
    /// Entries in both tables, both directions, dead ones included.
    pub entries: u64,
    /// Entries of live connections.
    pub live: u64,
    /// Live connections.
    pub connections: u64,
    /// SNAT source ports held by live connections to remote backends, over every SNAT address
    /// and backend.
    pub snat_ports: u64,
    /// `NP_CT`, established connections.
    pub established: TableCensus,
    /// `NP_CT_NEW`, connections in the handshake or unanswered.
    pub handshake: TableCensus,
    pub snat: SnatCensus,
}

impl ConntrackCensus {
    /// Counts `records` (both tables) at `now` (jiffies).
    pub fn of(cfg: &DatapathConfig, records: &[CtRecord], now: u64) -> Self {
        let connections = Connections::new(records);
        let mut census = Self {
            entries: records.len() as u64,
            ..Self::default()
        };
        let mut snat: BTreeMap<SnatTuple, u64> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            let table = match r.table {
                CtTable::Established => &mut census.established,
                CtTable::Handshake => &mut census.handshake,
            };
            table.entries += 1;
            if !connections.connection_live(cfg, i, now) {
                continue;
            }
            table.live += 1;
            census.live += 1;
            if connections.shadowed(i) {
                // The connection is counted by its established entries.
                continue;
            }
            // A connection counts once: by its forward entry, or by a reply entry whose
            // forward entry is missing.
            if r.key.dir == CT_DIR_FORWARD || connections.partner(i).is_none() {
                census.connections += 1;
            }
            // The reply entry of a SNATed connection is what holds the port: it is keyed by
            // backend -> SNAT address:port.
            if r.key.dir == CT_DIR_REPLY && r.entry.flags & CT_F_SNAT != 0 {
                census.snat_ports += 1;
                *snat
                    .entry((
                        u32::from_be(r.key.daddr_be),
                        u32::from_be(r.key.saddr_be),
                        u16::from_be(r.key.sport_be),
                        r.key.proto,
                    ))
                    .or_default() += 1;
            }
        }
        census.snat = snat_census(cfg, &snat);
        census
    }
}

/// (SNAT address, backend address, backend port, protocol), host order: one port space.
type SnatTuple = (u32, u32, u16, u8);

fn snat_census(cfg: &DatapathConfig, held: &BTreeMap<SnatTuple, u64>) -> SnatCensus {
    let mut addresses: BTreeMap<u32, SnatAddressUsage> = BTreeMap::new();
    for (&(snat, _, _, _), &ports) in held {
        let a = addresses.entry(snat).or_insert_with(|| SnatAddressUsage {
            address: Ipv4Addr::from(snat).to_string(),
            ..SnatAddressUsage::default()
        });
        a.ports += ports;
        a.backends += 1;
        a.max_per_backend = a.max_per_backend.max(ports);
    }
    let mut busiest: Vec<(&SnatTuple, &u64)> = held.iter().collect();
    // Most ports first; ties in address order, so the list is stable between reads.
    busiest.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    SnatCensus {
        capacity_per_backend: u64::from(cfg.snat_span()),
        addresses: addresses.into_values().collect(),
        busiest_backends: busiest
            .into_iter()
            .take(SNAT_TOP_BACKENDS)
            .map(|(&(snat, addr, port, proto), &ports)| SnatBackendUsage {
                snat_address: Ipv4Addr::from(snat).to_string(),
                backend: format!("{}:{port}", Ipv4Addr::from(addr)),
                protocol: if proto == IPPROTO_TCP { "TCP" } else { "UDP" },
                ports,
            })
            .collect(),
    }
}

impl ConntrackCensus {
    /// The human-readable form (`dump --stats`, `status`), the first line starting with
    /// `prefix`.
    pub fn render(&self, prefix: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{prefix}{} connections, {} SNAT ports in use; {} entries ({} live)",
            self.connections, self.snat_ports, self.entries, self.live
        );
        let indent = " ".repeat(prefix.len());
        let _ = writeln!(
            out,
            "{indent}{} {} entries ({} live), {} {} entries ({} live)",
            names::CONNTRACK,
            self.established.entries,
            self.established.live,
            names::CONNTRACK_NEW,
            self.handshake.entries,
            self.handshake.live
        );
        let capacity = self.snat.capacity_per_backend;
        for a in &self.snat.addresses {
            let _ = writeln!(
                out,
                "{indent}SNAT {}: {} ports to {} backends, busiest backend {} of {capacity} \
                 ports ({:.1}%)",
                a.address,
                a.ports,
                a.backends,
                a.max_per_backend,
                100.0 * a.max_per_backend as f64 / capacity.max(1) as f64
            );
        }
        for b in &self.snat.busiest_backends {
            let _ = writeln!(
                out,
                "{indent}  {} -> {}/{}: {} ports",
                b.snat_address, b.backend, b.protocol, b.ports
            );
        }
        out
    }
}

/// Reads both connection tables and counts them.
pub fn conntrack(maps: &Maps, cfg: &DatapathConfig, now: u64) -> io::Result<ConntrackCensus> {
    let records = read_tables(maps.conntrack.map(), maps.conntrack_new.map())?;
    Ok(ConntrackCensus::of(cfg, &records, now))
}

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    /// max_entries.
    pub capacity: u64,
    /// Entries in use, where that means something (not for per-CPU counters or Maglev slots,
    /// whose use follows the services).
    pub used: Option<u64>,
    /// Kernel memory charged for the map (`memlock` of its fd).
    pub memory_bytes: Option<u64>,
}

/// Every map's fill level, and the connection table's census.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fill {
    pub maps: Vec<MapFill>,
    pub conntrack: ConntrackCensus,
}

/// Reads how full every map is; `now` is the datapath clock (jiffies) for expiry.
pub fn fill(maps: &Maps, cfg: &DatapathConfig, now: u64) -> io::Result<Fill> {
    let conntrack = self::conntrack(maps, cfg, now)?;
    let backends_present = (1..maps.backends.len())
        .filter(|i| {
            maps.backends
                .get(*i)
                .is_ok_and(|b| b.flags & BE_F_PRESENT != 0)
        })
        .count() as u64;
    let entry = |name: &'static str, map: &MapData, used: Option<u64>| -> io::Result<MapFill> {
        let info = map.info().map_err(io::Error::other)?;
        Ok(MapFill {
            name,
            capacity: u64::from(info.max_entries()),
            used,
            memory_bytes: memlock(map),
        })
    };
    let maps = vec![
        entry(
            names::FRONTENDS,
            maps.frontends.map(),
            Some(count::<FrontendKey, Frontend>(maps.frontends.map())?),
        )?,
        entry(
            names::SVC_NAMES,
            maps.svc_names.map(),
            Some(count::<u32, SvcName>(maps.svc_names.map())?),
        )?,
        // Backend id 0 is never used: the capacity is one less than max_entries.
        MapFill {
            capacity: u64::from(maps.backends.len().saturating_sub(1)),
            ..entry(names::BACKENDS, maps.backends.map(), Some(backends_present))?
        },
        entry(names::MAGLEV, maps.maglev.map(), None)?,
        entry(
            names::SRC_RANGES,
            maps.src_ranges.map(),
            Some(maps.src_ranges.keys().count() as u64),
        )?,
        entry(
            names::CONNTRACK,
            maps.conntrack.map(),
            Some(conntrack.established.entries),
        )?,
        entry(
            names::CONNTRACK_NEW,
            maps.conntrack_new.map(),
            Some(conntrack.handshake.entries),
        )?,
        entry(
            names::LOCAL_NETS,
            maps.local_nets.map(),
            Some(maps.local_nets.keys().count() as u64),
        )?,
        entry(
            names::AFFINITY,
            maps.affinity.map(),
            Some(count::<AffinityKey, AffinityEntry>(maps.affinity.map())?),
        )?,
        entry(
            names::SNAT_ADDRS,
            maps.snat_addrs.map(),
            Some(count::<u32, SnatAddr>(maps.snat_addrs.map())?),
        )?,
        entry(names::SVC_STATS, maps.svc_stats.map(), None)?,
        entry(names::COUNTERS, maps.counters.map(), None)?,
    ];
    Ok(Fill { maps, conntrack })
}

/// The `memlock:` line of the map fd's /proc fdinfo: what the kernel charges for it.
fn memlock(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use nodeport_common::{CtState, IPPROTO_UDP};

    use super::*;

    const HZ: u64 = 100;
    const NOW: u64 = 1_000_000;

    /// Client 10.0.0.<client>:40000 to 198.18.0.1:30080 and a backend; remote backends SNAT
    /// through `snat`. Each entry idle its own number of seconds.
    #[expect(clippy::too_many_arguments, reason = "a test table's columns")]
    fn conn(
        table: CtTable,
        proto: u8,
        client: u8,
        backend: ([u8; 4], u16),
        snat: Option<([u8; 4], u16)>,
        state: CtState,
        fwd_idle_s: u64,
        rep_idle_s: u64,
    ) -> [CtRecord; 2] {
        let client = (std::net::Ipv4Addr::new(10, 0, 0, client), 40_000);
        crate::test_support::TestConnection {
            table,
            proto,
            client,
            frontend: (std::net::Ipv4Addr::new(198, 18, 0, 1), 30_080),
            source: snat.map_or(client, |(a, p)| (a.into(), p)),
            backend: (backend.0.into(), backend.1),
            flags: if snat.is_some() { CT_F_SNAT } else { 0 },
            state,
            forward_seen: NOW - fwd_idle_s * HZ,
            reply_seen: NOW - rep_idle_s * HZ,
        }
        .records()
    }

    fn est() -> CtState {
        CtState {
            replied: 1,
            established: 1,
            ..CtState::default()
        }
    }

    #[test]
    fn the_census_counts_connections_and_what_holds_snat_ports() {
        let cfg = DatapathConfig {
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 60,
            hz: HZ as u32,
            snat_port_min: 1024,
            snat_port_max: 29_999,
            snat_port_min2: 61_000,
            snat_port_max2: 65_535,
            ..DatapathConfig::default()
        };
        let (est_t, new_t) = (CtTable::Established, CtTable::Handshake);
        let node_a = [198, 18, 0, 1];
        let node_b = [198, 18, 5, 1];
        let be1 = ([10, 2, 0, 1], 8080);
        let be2 = ([10, 2, 0, 2], 8080);
        let records: Vec<CtRecord> = [
            // Three established SNATed TCP connections to be1 through node_a, one to be2.
            conn(
                est_t,
                IPPROTO_TCP,
                1,
                be1,
                Some((node_a, 1024)),
                est(),
                5,
                5,
            ),
            conn(
                est_t,
                IPPROTO_TCP,
                2,
                be1,
                Some((node_a, 1025)),
                est(),
                5,
                5,
            ),
            // A one-way UDP stream: the reply entry is long expired, the connection lives
            // through its forward entry, and its reply entry still holds the port.
            conn(
                est_t,
                IPPROTO_UDP,
                3,
                be1,
                Some((node_a, 1026)),
                est(),
                5,
                3_600,
            ),
            conn(
                est_t,
                IPPROTO_TCP,
                4,
                be2,
                Some((node_a, 1024)),
                est(),
                5,
                5,
            ),
            // Through another SNAT address, in the handshake table (a SYN not answered yet).
            conn(
                new_t,
                IPPROTO_TCP,
                5,
                be1,
                Some((node_b, 1024)),
                CtState::default(),
                5,
                5,
            ),
            // Dead: a closing connection past its 10 s; holds nothing any more.
            conn(
                est_t,
                IPPROTO_TCP,
                6,
                be1,
                Some((node_a, 1027)),
                CtState {
                    rst_fwd: 1,
                    ..est()
                },
                11,
                11,
            ),
            // A local backend: no SNAT.
            conn(
                est_t,
                IPPROTO_UDP,
                7,
                ([198, 18, 1, 11], 53),
                None,
                est(),
                1,
                1,
            ),
        ]
        .concat();
        // A copy of the first connection's entries left in the handshake table by its
        // promotion: counted as entries, not as a connection or a port.
        let copy = conn(
            new_t,
            IPPROTO_TCP,
            1,
            be1,
            Some((node_a, 1024)),
            est(),
            5,
            5,
        );
        let records = [records, copy.to_vec()].concat();
        let c = ConntrackCensus::of(&cfg, &records, NOW);
        assert_eq!(
            (c.entries, c.live, c.connections, c.snat_ports),
            (16, 14, 6, 5)
        );
        assert_eq!(
            c.established,
            TableCensus {
                entries: 12,
                live: 10
            }
        );
        assert_eq!(
            c.handshake,
            TableCensus {
                entries: 4,
                live: 4
            }
        );
        assert_eq!(c.snat.capacity_per_backend, 33_512);
        assert_eq!(
            c.snat.addresses,
            vec![
                SnatAddressUsage {
                    address: "198.18.0.1".into(),
                    ports: 4,
                    backends: 3,
                    max_per_backend: 2,
                },
                SnatAddressUsage {
                    address: "198.18.5.1".into(),
                    ports: 1,
                    backends: 1,
                    max_per_backend: 1,
                },
            ]
        );
        let busiest: Vec<(&str, &str, &str, u64)> = c
            .snat
            .busiest_backends
            .iter()
            .map(|b| {
                (
                    b.snat_address.as_str(),
                    b.backend.as_str(),
                    b.protocol,
                    b.ports,
                )
            })
            .collect();
        assert_eq!(
            busiest,
            [
                ("198.18.0.1", "10.2.0.1:8080", "TCP", 2),
                ("198.18.0.1", "10.2.0.1:8080", "UDP", 1),
                ("198.18.0.1", "10.2.0.2:8080", "TCP", 1),
                ("198.18.5.1", "10.2.0.1:8080", "TCP", 1),
            ]
        );
    }

    #[test]
    fn the_busiest_backends_are_capped() {
        let cfg = DatapathConfig {
            udp_timeout_s: 60,
            hz: HZ as u32,
            snat_port_min: 61_000,
            snat_port_max: 61_999,
            ..DatapathConfig::default()
        };
        let records: Vec<CtRecord> = (0..SNAT_TOP_BACKENDS as u8 + 5)
            .flat_map(|b| {
                // Backend b holds b + 1 ports.
                (0..=u16::from(b)).flat_map(move |p| {
                    conn(
                        CtTable::Established,
                        IPPROTO_UDP,
                        b,
                        ([10, 3, 0, b], 53),
                        Some(([198, 18, 0, 1], 61_000 + p)),
                        est(),
                        1,
                        1,
                    )
                })
            })
            .collect();
        let c = ConntrackCensus::of(&cfg, &records, NOW);
        assert_eq!(c.snat.busiest_backends.len(), SNAT_TOP_BACKENDS);
        assert_eq!(
            c.snat.busiest_backends[0].ports,
            SNAT_TOP_BACKENDS as u64 + 5
        );
        assert_eq!(c.snat.busiest_backends[0].backend, "10.3.0.14:53");
        assert_eq!(
            c.snat.addresses[0].max_per_backend,
            SNAT_TOP_BACKENDS as u64 + 5
        );
        assert_eq!(c.snat.addresses[0].backends, SNAT_TOP_BACKENDS as u64 + 5);
    }
}
