//! Typed handles on the datapath's maps, and the layout each map must have.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuArray},
};
use nodeport_common::{
    AffinityEntry, AffinityKey, Backend, COUNTER_SLOTS, CtEntry, CtKey, DatapathConfig,
    FRONTEND_PORT_WORDS, Frontend, FrontendKey, MaglevSlot, SnatAddr, SrcRangeKey, SvcStats,
    capacity, names,
};

use super::{DatapathError, Result, Sizing};

/// Every map, typed.
pub struct Maps {
    pub config: Array<MapData, DatapathConfig>,
    pub frontend_ports: Array<MapData, u64>,
    pub snat_addrs: HashMap<MapData, u32, SnatAddr>,
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, MaglevSlot>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u32>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub counters: PerCpuArray<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Maps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            config: take(ebpf, names::CONFIG)?,
            frontend_ports: take(ebpf, names::FRONTEND_PORTS)?,
            snat_addrs: take(ebpf, names::SNAT_ADDRS)?,
            frontends: take(ebpf, names::FRONTENDS)?,
            backends: take(ebpf, names::BACKENDS)?,
            maglev: take(ebpf, names::MAGLEV)?,
            src_ranges: take(ebpf, names::SRC_RANGES)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            affinity: take(ebpf, names::AFFINITY)?,
            svc_stats: take(ebpf, names::SVC_STATS)?,
            counters: take(ebpf, names::COUNTERS)?,
        })
    }
}

/// The layout a map must have for this agent.
#[derive(Clone, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

pub fn map_specs(sizing: &Sizing) -> Vec<MapSpec> {
    let spec = |name, map_type, key_size, value_size, max_entries| MapSpec {
        name,
        map_type,
        key_size,
        value_size,
        max_entries,
    };
    vec![
        spec(
            names::CONFIG,
            MapType::Array,
            4,
            size::<DatapathConfig>(),
            1,
        ),
        spec(
            names::FRONTEND_PORTS,
            MapType::Array,
            4,
            8,
            FRONTEND_PORT_WORDS,
        ),
        spec(
            names::SNAT_ADDRS,
            MapType::Hash,
            4,
            size::<SnatAddr>(),
            capacity::SNAT_ADDRS,
        ),
        spec(
            names::FRONTENDS,
            MapType::Hash,
            size::<FrontendKey>(),
            size::<Frontend>(),
            sizing.frontends,
        ),
        spec(
            names::BACKENDS,
            MapType::Array,
            4,
            size::<Backend>(),
            sizing.backends,
        ),
        spec(
            names::MAGLEV,
            MapType::Array,
            4,
            size::<MaglevSlot>(),
            sizing.maglev_size * sizing.maglev_blocks(),
        ),
        // An LPM key is a u32 prefix length followed by the data.
        spec(
            names::SRC_RANGES,
            MapType::LpmTrie,
            4 + size::<SrcRangeKey>(),
            4,
            sizing.source_ranges,
        ),
        spec(
            names::CONNTRACK,
            MapType::LruHash,
            size::<CtKey>(),
            size::<CtEntry>(),
            sizing.conntrack,
        ),
        spec(
            names::AFFINITY,
            MapType::LruHash,
            size::<AffinityKey>(),
            size::<AffinityEntry>(),
            sizing.affinity,
        ),
        spec(
            names::SVC_STATS,
            MapType::PerCpuArray,
            4,
            size::<SvcStats>(),
            sizing.services,
        ),
        spec(names::COUNTERS, MapType::PerCpuArray, 4, 8, COUNTER_SLOTS),
    ]
}

impl MapSpec {
    /// Checks that a map pinned at `path`, if any, has this layout. aya would silently reuse
    /// any map pinned there, and a program reading a value of another size reads garbage.
    pub fn check_pin(&self, path: &Path) -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let info = MapInfo::from_pin(path).map_err(|source| DatapathError::Map {
            name: self.name,
            source,
        })?;
        let mut differences = Vec::new();
        match info.map_type() {
            Ok(t) if t == self.map_type => {}
            Ok(t) => differences.push(format!("type {t:?}, expected {:?}", self.map_type)),
            Err(e) => differences.push(format!("unknown type ({e})")),
        }
        let mut compare = |what: &str, found: u32, expected: u32| {
            if found != expected {
                differences.push(format!("{what} {found}, expected {expected}"));
            }
        };
        compare("key size", info.key_size(), self.key_size);
        compare("value size", info.value_size(), self.value_size);
        compare("max entries", info.max_entries(), self.max_entries);
        if differences.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::IncompatiblePin {
                path: path.to_owned(),
                difference: differences.join(", "),
            })
        }
    }
}
