//! Typed handles on the datapath's maps, and the layout each map must have.

use std::{os::fd::AsFd, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuArray},
};
use nodeport_common::{
    AffinityEntry, AffinityKey, AgentState, BPF_F_MMAPABLE, Backend, COUNTER_SLOTS, CtEntry, CtKey,
    DatapathConfig, FRONTEND_PORT_WORDS, Frontend, FrontendKey, LocalNetKey, MaglevSlot,
    PROG_SLOTS, SnatAddr, SrcRangeKey, SvcName, SvcStats, capacity, names,
};

use super::{DatapathError, Result, Sizing, mmap::MmapArray};

/// BPF_F_NO_PREALLOC, required for LPM tries.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Every map, typed.
pub struct Maps {
    pub config: Array<MapData, DatapathConfig>,
    pub frontend_ports: Array<MapData, u64>,
    pub snat_addrs: HashMap<MapData, u32, SnatAddr>,
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: MmapArray<Backend>,
    pub maglev: MmapArray<MaglevSlot>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u32>,
    /// Established connections (`NP_CT`, a plain hash the datapath never evicts from).
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Connections in the handshake or unanswered (`NP_CT_NEW`, an LRU hash).
    pub conntrack_new: HashMap<MapData, CtKey, CtEntry>,
    /// Sources that are never an outside client (`NP_LOCAL_NETS`, an LPM trie).
    pub local_nets: LpmTrie<MapData, LocalNetKey, u32>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub counters: PerCpuArray<MapData, u64>,
    pub svc_names: HashMap<MapData, u32, SvcName>,
    pub agent: Array<MapData, AgentState>,
}

fn typed<T>(map: Map, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn mapped<T: bytemuck::Pod>(map: Map, name: &'static str, entries: u32) -> Result<MmapArray<T>> {
    let Map::Array(data) = map else {
        return Err(DatapathError::Io {
            context: format!("{name} is not an array map"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    MmapArray::new(data, entries).map_err(|source| DatapathError::Io {
        context: format!("mapping {name} into memory"),
        source,
    })
}

impl Maps {
    /// Builds the handles from maps found by name (`get` hands each one over).
    fn build(mut get: impl FnMut(&'static str) -> Result<Map>, sizing: &Sizing) -> Result<Self> {
        let maglev_slots = sizing.maglev_size * sizing.maglev_blocks();
        let backends = mapped(get(names::BACKENDS)?, names::BACKENDS, sizing.backends + 1)?;
        let maglev = mapped(get(names::MAGLEV)?, names::MAGLEV, maglev_slots)?;
        Self::build_with(get, backends, maglev)
    }

    /// Builds the handles: `get` hands over the ordinary maps by name.
    fn build_with(
        mut get: impl FnMut(&'static str) -> Result<Map>,
        backends: MmapArray<Backend>,
        maglev: MmapArray<MaglevSlot>,
    ) -> Result<Self> {
        Ok(Self {
            config: typed(get(names::CONFIG)?, names::CONFIG)?,
            frontend_ports: typed(get(names::FRONTEND_PORTS)?, names::FRONTEND_PORTS)?,
            snat_addrs: typed(get(names::SNAT_ADDRS)?, names::SNAT_ADDRS)?,
            frontends: typed(get(names::FRONTENDS)?, names::FRONTENDS)?,
            backends,
            maglev,
            src_ranges: typed(get(names::SRC_RANGES)?, names::SRC_RANGES)?,
            conntrack: typed(get(names::CONNTRACK)?, names::CONNTRACK)?,
            conntrack_new: typed(get(names::CONNTRACK_NEW)?, names::CONNTRACK_NEW)?,
            local_nets: typed(get(names::LOCAL_NETS)?, names::LOCAL_NETS)?,
            affinity: typed(get(names::AFFINITY)?, names::AFFINITY)?,
            svc_stats: typed(get(names::SVC_STATS)?, names::SVC_STATS)?,
            counters: typed(get(names::COUNTERS)?, names::COUNTERS)?,
            svc_names: typed(get(names::SVC_NAMES)?, names::SVC_NAMES)?,
            agent: typed(get(names::AGENT)?, names::AGENT)?,
        })
    }

    /// Takes the maps out of a loaded object.
    pub(super) fn take(ebpf: &mut Ebpf, sizing: &Sizing) -> Result<Self> {
        Self::build(
            |name| {
                ebpf.take_map(name)
                    .ok_or(DatapathError::MissingMap { name })
            },
            sizing,
        )
    }

    /// Opens the maps a datapath pinned under `pins` without loading any program (for
    /// `dump`, which works whether an agent runs or not). The sizing is read off the maps.
    pub fn open_pinned(pins: &super::PinDir) -> Result<(Self, Sizing)> {
        let open = |name: &'static str| open_pin(pins, name);
        let entries = |name: &'static str| -> Result<u32> {
            MapInfo::from_pin(pins.map(name))
                .map(|i| i.max_entries())
                .map_err(|source| DatapathError::Map { name, source })
        };
        let config: Array<MapData, DatapathConfig> = typed(open(names::CONFIG)?, names::CONFIG)?;
        let maglev_size = config.get(&0, 0).map(|c| c.maglev_size).unwrap_or(0);
        let maglev_slots = entries(names::MAGLEV)?;
        if maglev_size == 0 {
            return Err(DatapathError::Io {
                context: format!(
                    "{}: the datapath there was never configured",
                    pins.root.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        let services = entries(names::SVC_STATS)?;
        let sizing = Sizing {
            frontends: entries(names::FRONTENDS)?,
            services,
            // Backend id 0 is never used (an empty Maglev slot), so the array has one more.
            backends: entries(names::BACKENDS)?.saturating_sub(1),
            maglev_size,
            source_ranges: entries(names::SRC_RANGES)?,
            conntrack: entries(names::CONNTRACK)?,
            conntrack_new: entries(names::CONNTRACK_NEW)?,
            affinity: entries(names::AFFINITY)?,
        };
        if sizing.maglev_blocks() * maglev_size != maglev_slots {
            return Err(DatapathError::IncompatiblePin {
                root: pins.root.clone(),
                difference: format!(
                    "{}: {maglev_slots} slots do not fit {services} services of {maglev_size}",
                    names::MAGLEV
                ),
            });
        }
        let maps = Self::build(open, &sizing)?;
        Ok((maps, sizing))
    }

    /// A second set of handles on the same maps, for the agent's own use beside the syncer
    /// (the metrics sampler on its blocking thread). The other maps get a duplicate of their
    /// fd; the memory-mapped arrays share their one mapping, because a second mapping would
    /// count their whole size in the RSS again.
    pub fn share(&self) -> Result<Self> {
        Self::build_with(
            |name| dup(self.by_name(name), name),
            self.backends.share(),
            self.maglev.share(),
        )
    }

    /// The handle of the map `name`, whatever its type.
    fn by_name(&self, name: &'static str) -> &MapData {
        match name {
            names::CONFIG => self.config.map(),
            names::FRONTEND_PORTS => self.frontend_ports.map(),
            names::SNAT_ADDRS => self.snat_addrs.map(),
            names::FRONTENDS => self.frontends.map(),
            names::BACKENDS => self.backends.map(),
            names::MAGLEV => self.maglev.map(),
            names::SRC_RANGES => self.src_ranges.map(),
            names::CONNTRACK => self.conntrack.map(),
            names::CONNTRACK_NEW => self.conntrack_new.map(),
            names::LOCAL_NETS => self.local_nets.map(),
            names::AFFINITY => self.affinity.map(),
            names::SVC_STATS => self.svc_stats.map(),
            names::COUNTERS => self.counters.map(),
            names::SVC_NAMES => self.svc_names.map(),
            names::AGENT => self.agent.map(),
            _ => unreachable!("map_specs names every map"),
        }
    }
}

/// A new handle (a duplicated fd) on the same kernel map.
fn dup(data: &MapData, name: &'static str) -> Result<Map> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Io {
            context: format!("duplicating the fd of {name}"),
            source,
        })?;
    let data = MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

fn open_pin(pins: &super::PinDir, name: &'static str) -> Result<Map> {
    let data =
        MapData::from_pin(pins.map(name)).map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

/// The layout a map must have for this agent.
#[derive(Clone, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

pub fn map_specs(sizing: &Sizing) -> Vec<MapSpec> {
    use MapType::{Array, Hash, LpmTrie, LruHash, PerCpuArray, ProgramArray};
    let maglev_slots = sizing.maglev_size * sizing.maglev_blocks();
    // An LPM key is a u32 prefix length followed by the data.
    let lpm_key = 4 + size::<SrcRangeKey>();
    #[rustfmt::skip]
    let table: [(&'static str, MapType, u32, u32, u32, u32); 17] = [
        // name                  type         key size              value size               max entries            flags
        (names::CONFIG,          Array,       4,                    size::<DatapathConfig>(), 1,                     0),
        (names::FRONTEND_PORTS,  Array,       4,                    8,                       FRONTEND_PORT_WORDS,   0),
        (names::SNAT_ADDRS,      Hash,        4,                    size::<SnatAddr>(),      capacity::SNAT_ADDRS,  0),
        (names::FRONTENDS,       Hash,        size::<FrontendKey>(), size::<Frontend>(),     sizing.frontends,      0),
        (names::BACKENDS,        Array,       4,                    size::<Backend>(),       sizing.backends + 1,   BPF_F_MMAPABLE),
        (names::MAGLEV,          Array,       4,                    size::<MaglevSlot>(),    maglev_slots,          BPF_F_MMAPABLE),
        (names::SRC_RANGES,      LpmTrie,     lpm_key,              4,                       sizing.source_ranges,  BPF_F_NO_PREALLOC),
        (names::CONNTRACK,       Hash,        size::<CtKey>(),      size::<CtEntry>(),       sizing.conntrack,      0),
        (names::CONNTRACK_NEW,   LruHash,     size::<CtKey>(),      size::<CtEntry>(),       sizing.conntrack_new,  0),
        (names::LOCAL_NETS,      LpmTrie,     4 + size::<LocalNetKey>(), 4,                  capacity::LOCAL_NETS,  BPF_F_NO_PREALLOC),
        (names::PROGRAMS,        ProgramArray, 4,                   4,                       PROG_SLOTS,            0),
        (names::TC_PROGRAMS,     ProgramArray, 4,                   4,                       PROG_SLOTS,            0),
        (names::AFFINITY,        LruHash,     size::<AffinityKey>(), size::<AffinityEntry>(), sizing.affinity,      0),
        (names::SVC_STATS,       PerCpuArray, 4,                    size::<SvcStats>(),      sizing.services,       0),
        (names::COUNTERS,        PerCpuArray, 4,                    8,                       COUNTER_SLOTS,         0),
        (names::SVC_NAMES,       Hash,        4,                    size::<SvcName>(),       sizing.services,       0),
        (names::AGENT,           Array,       4,                    size::<AgentState>(),    1,                     0),
    ];
    table
        .into_iter()
        .map(
            |(name, map_type, key_size, value_size, max_entries, flags)| MapSpec {
                name,
                map_type,
                key_size,
                value_size,
                max_entries,
                flags,
            },
        )
        .collect()
}

/// How a pinned map differs from its spec.
#[derive(Debug, Default)]
struct PinDifferences {
    /// Type, key or value size, flags: another version's layout.
    layout: Vec<String>,
    /// Max entries: another sizing (or another version's default).
    sizing: Vec<String>,
}

impl MapSpec {
    /// How a map pinned at `path` differs from this layout (`None`: nothing pinned there).
    /// aya would silently reuse any map pinned there, and a program reading a value of another
    /// size reads garbage.
    fn pin_differences(&self, path: &Path) -> Result<Option<PinDifferences>> {
        if !path.exists() {
            return Ok(None);
        }
        let info = MapInfo::from_pin(path).map_err(|source| DatapathError::Map {
            name: self.name,
            source,
        })?;
        let mut d = PinDifferences::default();
        match info.map_type() {
            Ok(t) if t == self.map_type => {}
            Ok(t) => d
                .layout
                .push(format!("type {t:?}, expected {:?}", self.map_type)),
            Err(e) => d.layout.push(format!("unknown type ({e})")),
        }
        let compare = |out: &mut Vec<String>, what: &str, found: u32, expected: u32| {
            if found != expected {
                out.push(format!("{what} {found}, expected {expected}"));
            }
        };
        compare(&mut d.layout, "key size", info.key_size(), self.key_size);
        compare(
            &mut d.layout,
            "value size",
            info.value_size(),
            self.value_size,
        );
        compare(&mut d.layout, "flags", info.map_flags(), self.flags);
        compare(
            &mut d.sizing,
            "max entries",
            info.max_entries(),
            self.max_entries,
        );
        Ok(Some(d))
    }
}

/// How the maps pinned under a directory compare with this agent's specs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinComparison {
    /// Maps pinned.
    pub present: usize,
    /// Maps of this agent not pinned (while others are).
    pub missing: Vec<&'static str>,
    /// Per map, type, key or value size or flags that differ: another version's layout.
    pub layout: Vec<String>,
    /// Per map, max entries that differ: other sizing flags (or another version's defaults).
    pub sizing: Vec<String>,
}

/// Compares every pinned map under `pins` with `specs`, before anything is created or changed.
pub fn compare_pins(specs: &[MapSpec], pins: &super::PinDir) -> Result<PinComparison> {
    let mut c = PinComparison::default();
    for spec in specs {
        match spec.pin_differences(&pins.map(spec.name))? {
            // A program array holds no state: one an older datapath did not have is created
            // (NP_TC_PROGS, new with the TC external hook).
            None if spec.map_type == MapType::ProgramArray => {}
            None => c.missing.push(spec.name),
            Some(d) => {
                c.present += 1;
                if !d.layout.is_empty() {
                    c.layout
                        .push(format!("{}: {}", spec.name, d.layout.join(", ")));
                }
                if !d.sizing.is_empty() {
                    c.sizing
                        .push(format!("{}: {}", spec.name, d.sizing.join(", ")));
                }
            }
        }
    }
    if c.present == 0 {
        c.missing.clear();
    }
    Ok(c)
}
