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
use nodeport_common::{
    AffinityEntry, AffinityKey, BE_F_PRESENT, CT_DIR_FORWARD, CT_F_SNAT, CtEntry, CtKey,
    DatapathConfig, Frontend, FrontendKey, SnatAddr, SvcName, names,
};
use serde::Serialize;

use super::Maps;

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

/// What the connection table holds (also as `dump --stats` and `status` show it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConntrackCensus {
    /// Entries in the table, both directions, expired ones included (the LRU reuses those
    /// last, so they count against `--conntrack-size` until it needs the room).
    pub entries: u64,
    /// Entries not expired.
    pub live: u64,
    /// Live connections (live forward entries).
    pub connections: u64,
    /// Live connections to remote backends, each holding one SNAT source port.
    pub snat_ports: u64,
}

impl ConntrackCensus {
    /// Adds one entry seen at `now` (jiffies).
    pub fn add(&mut self, cfg: &DatapathConfig, key: &CtKey, entry: &CtEntry, now: u64) {
        self.entries += 1;
        if cfg.ct_entry_expired(entry, key.proto, now) {
            return;
        }
        self.live += 1;
        if key.dir == CT_DIR_FORWARD {
            self.connections += 1;
            if entry.flags & CT_F_SNAT != 0 {
                self.snat_ports += 1;
            }
        }
    }
}

/// Counts the connection table's entries by state.
pub fn conntrack(map: &MapData, cfg: &DatapathConfig, now: u64) -> io::Result<ConntrackCensus> {
    let mut census = ConntrackCensus::default();
    for_each_entry::<CtKey, CtEntry>(map, |k, v| census.add(cfg, k, v, now))?;
    Ok(census)
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
    let conntrack = self::conntrack(maps.conntrack.map(), cfg, now)?;
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
            Some(conntrack.entries),
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
    use nodeport_common::{CT_DIR_REPLY, CtState, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    #[test]
    fn the_census_counts_by_state_and_direction() {
        let cfg = DatapathConfig {
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 60,
            hz: 100,
            ..DatapathConfig::default()
        };
        let now = 1_000_000;
        let key = |proto, dir| CtKey {
            proto,
            dir,
            ..CtKey::default()
        };
        let established = CtState {
            replied: 1,
            established: 1,
            ..CtState::default()
        };
        let closing = CtState {
            rst_fwd: 1,
            ..established
        };
        let entry = |age_s: u64, flags, state| CtEntry {
            last_seen: now - age_s * 100,
            flags,
            state,
            ..CtEntry::default()
        };
        let mut c = ConntrackCensus::default();
        // An established SNATed connection, both directions.
        c.add(
            &cfg,
            &key(IPPROTO_TCP, CT_DIR_FORWARD),
            &entry(3_600, CT_F_SNAT, established),
            now,
        );
        c.add(
            &cfg,
            &key(IPPROTO_TCP, CT_DIR_REPLY),
            &entry(3_600, CT_F_SNAT, established),
            now,
        );
        // A closing connection past its 10 s.
        c.add(
            &cfg,
            &key(IPPROTO_TCP, CT_DIR_FORWARD),
            &entry(11, 0, closing),
            now,
        );
        // A SYN that never got an answer, past its 60 s.
        c.add(&cfg, &key(IPPROTO_TCP, CT_DIR_FORWARD), &entry(61, 0, CtState::default()), now);
        // A UDP flow to a local backend.
        c.add(&cfg, &key(IPPROTO_UDP, CT_DIR_FORWARD), &entry(59, 0, CtState::default()), now);
        assert_eq!(
            c,
            ConntrackCensus {
                entries: 5,
                live: 3,
                connections: 2,
                snat_ports: 1,
            }
        );
    }
}
