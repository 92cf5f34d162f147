//! Keeping the maps equal to the desired state.
//!
//! `Programmed` mirrors what the maps hold (rebuilt from the pinned maps when the agent
//! starts); `Syncer::apply` diffs a `Desired` against it and writes only what differs, one
//! service at a time, in an order no packet can see half of:
//!
//! 1. new backends, under fresh ids no table references yet;
//! 2. a changed Maglev table, into a free block;
//! 3. the service's name and new source ranges;
//! 4. the frontends, switched to the new block (each an atomic hash-map update);
//! 5. then what is no longer used: old frontends, ranges, the old block, removed backends.
//!
//! If a write in steps 1-4 fails (a full map, say), what this service wrote is undone and the
//! service keeps its previous state; the error names the service. Removed services go after
//! all updates, so a frontend that moves from one Service to another is overwritten, never
//! missing.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use aya::maps::{MapError, lpm_trie::Key as LpmKey};
use nodeport_common::{
    BE_F_DRAINING, BE_F_HINTED_AWAY, BE_F_LOCAL, BE_F_NOT_SERVING, BE_F_PRESENT, Backend,
    DatapathConfig, FE_F_AFFINITY, FE_F_LOCAL_ONLY, FE_F_SOURCE_RANGES, FRONTEND_PORT_WORDS,
    Frontend as FrontendValue, FrontendKey, LocalNetKey, SnatAddr, SrcRangeKey, SvcName,
    frontend_port_bit, src_range_prefix_len,
};
use thiserror::Error;

use crate::{
    datapath::{Maps, Sizing},
    maglev::{self, MaglevKey},
    model::{BackendState, Desired, DesiredService, Ipv4Prefix, Protocol, ServicePortKey},
};

#[derive(Debug, Error)]
pub enum SyncError {
    #[error(
        "{backends} backends take new connections but a Maglev table has {slots} slots: raise \
         --maglev-table-size to a prime well above the backend count (e.g. 16381)"
    )]
    TooManyBackends { backends: usize, slots: u32 },
    #[error("{what}: the map is full (raise {flag})")]
    Full {
        what: &'static str,
        flag: &'static str,
    },
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SyncError {
    fn map(what: &'static str, flag: &'static str) -> impl FnOnce(MapError) -> SyncError {
        move |source| match &source {
            MapError::SyscallError(e)
                if matches!(
                    e.io_error.raw_os_error(),
                    Some(libc::E2BIG) | Some(libc::ENOSPC)
                ) =>
            {
                SyncError::Full { what, flag }
            }
            _ => SyncError::Map { what, source },
        }
    }

    fn io(what: &'static str) -> impl FnOnce(io::Error) -> SyncError {
        move |source| SyncError::Io { what, source }
    }

    /// Whether the error is a map at capacity (reported under its own metric).
    pub fn is_full(&self) -> bool {
        matches!(self, SyncError::Full { .. })
    }
}

/// Settings that are not per service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalSettings {
    pub config: DatapathConfig,
    /// Egress ifindex -> the address remote-backend traffic leaving there is SNATed to.
    pub snat_addrs: BTreeMap<u32, Ipv4Addr>,
    /// Prefixes that are never an outside client's source (`NP_LOCAL_NETS`): the node's own
    /// addresses and its pod networks.
    pub local_nets: BTreeSet<Ipv4Prefix>,
}

/// Ids handed out so that a freed id is reused as late as possible (connections remember
/// backend ids; the datapath checks addresses too, but late reuse keeps that check rare).
#[derive(Clone, Debug)]
struct IdPool {
    next: u32,
    limit: u32,
    freed: VecDeque<u32>,
}

impl IdPool {
    fn new(first: u32, limit: u32) -> Self {
        Self {
            next: first,
            limit,
            freed: VecDeque::new(),
        }
    }

    /// A pool where `used` are taken: ids never used come first, then holes, oldest first.
    fn with_used(first: u32, limit: u32, used: &BTreeSet<u32>) -> Self {
        let top = used.iter().next_back().map_or(first, |m| m + 1).max(first);
        let freed = (first..top).filter(|id| !used.contains(id)).collect();
        Self {
            next: top,
            limit,
            freed,
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.next < self.limit {
            self.next += 1;
            Some(self.next - 1)
        } else {
            self.freed.pop_front()
        }
    }

    fn free(&mut self, id: u32) {
        self.freed.push_back(id);
    }

    fn available(&self) -> usize {
        (self.limit - self.next) as usize + self.freed.len()
    }
}

/// One service as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub id: u32,
    /// Its Maglev block, when its table has backends.
    pub block: Option<u32>,
    /// The backends in the table, in Maglev order.
    pub table: Vec<SocketAddrV4>,
    pub backends: BTreeMap<SocketAddrV4, (u32, BackendState)>,
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    pub source_ranges: BTreeSet<Ipv4Prefix>,
    /// What it was programmed from (the desired state's own, shared); None when adopted from
    /// pinned maps.
    desired: Option<Arc<DesiredService>>,
}

/// What the maps hold.
#[derive(Debug)]
pub struct Programmed {
    pub services: BTreeMap<ServicePortKey, ProgrammedService>,
    frontend_owner: BTreeMap<FrontendKey, ServicePortKey>,
    settings: Option<GlobalSettings>,
    /// Frontends per destination port, and the port bitmap as written (read from the map
    /// once): a port's bit is set before its first frontend and cleared after its last.
    port_refs: BTreeMap<u16, u32>,
    port_words: Option<Vec<u64>>,
    svc_ids: IdPool,
    backend_ids: IdPool,
    blocks: IdPool,
}

impl Programmed {
    /// Who serves each frontend the maps hold (for `Reconciler::set_incumbents`: a restart
    /// leaves every frontend with the Service that has it).
    pub fn frontend_holders(&self) -> Vec<(crate::desired::FrontendId, ServicePortKey)> {
        self.frontend_owner
            .iter()
            .filter_map(|(k, owner)| {
                let addr = std::net::SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(k.addr_be)),
                    u16::from_be(k.port_be),
                );
                (owner.protocol.number() == k.proto)
                    .then(|| ((addr.into(), owner.protocol), owner.clone()))
            })
            .collect()
    }
}

/// What a sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub applied: Vec<ServicePortKey>,
    pub unchanged: usize,
    pub removed: Vec<ServicePortKey>,
    /// Services that could not be programmed (they keep their previous state).
    pub failed: Vec<(ServicePortKey, SyncError)>,
    /// Entries found in the maps that belonged to no known service, removed.
    pub orphans_removed: usize,
    /// The datapath's settings (configuration, SNAT addresses, local networks) could not be
    /// written: nothing else was tried (`failed` holds the error).
    pub settings_failed: bool,
}

/// `s` NUL-padded (and cut) to the fixed-size text fields of the maps.
pub(crate) fn text<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = s.as_bytes();
    let n = bytes.len().min(N);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// A NUL-padded text field back as a string.
pub(crate) fn untext(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn svc_name(key: &ServicePortKey) -> SvcName {
    SvcName {
        namespace: text(&key.namespace),
        name: text(&key.name),
        port_name: text(&key.port_name),
        protocol: key.protocol.number(),
        _pad: [0; 7],
    }
}

pub fn key_of(name: &SvcName) -> Option<ServicePortKey> {
    let protocol = match name.protocol {
        nodeport_common::IPPROTO_TCP => Protocol::Tcp,
        nodeport_common::IPPROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    Some(ServicePortKey {
        namespace: untext(&name.namespace).into(),
        name: untext(&name.name).into(),
        port_name: untext(&name.port_name).into(),
        protocol,
    })
}

/// What `NP_BACKENDS` holds for a backend in this state.
fn backend_value(addr: &SocketAddrV4, state: &BackendState, svc_id: u32) -> Backend {
    let mut flags = BE_F_PRESENT;
    if state.local {
        flags |= BE_F_LOCAL;
    }
    if !state.in_table {
        flags |= BE_F_DRAINING;
    }
    if !state.serving {
        flags |= BE_F_NOT_SERVING;
    }
    if state.hinted_away {
        flags |= BE_F_HINTED_AWAY;
    }
    Backend {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
        flags,
        _pad: 0,
        svc_id,
    }
}

/// The state `backend_value` wrote into a backend's flags.
fn backend_state(flags: u8) -> BackendState {
    BackendState {
        local: flags & BE_F_LOCAL != 0,
        in_table: flags & BE_F_DRAINING == 0,
        serving: flags & BE_F_NOT_SERVING == 0,
        hinted_away: flags & BE_F_HINTED_AWAY != 0,
    }
}

fn maglev_key(addr: &SocketAddrV4) -> MaglevKey {
    MaglevKey {
        addr_be: u32::from(*addr.ip()).to_be(),
        port_be: addr.port().to_be(),
    }
}

fn frontend_key(f: &crate::model::Frontend, protocol: Protocol) -> FrontendKey {
    FrontendKey::new(
        u32::from(*f.addr.ip()).to_be(),
        f.addr.port(),
        protocol.number(),
    )
}

fn local_net_key(p: &Ipv4Prefix) -> LpmKey<LocalNetKey> {
    LpmKey::new(
        u32::from(p.len),
        LocalNetKey {
            addr_be: u32::from(p.addr).to_be(),
        },
    )
}

fn range_key(svc_id: u32, p: &Ipv4Prefix) -> LpmKey<SrcRangeKey> {
    LpmKey::new(
        src_range_prefix_len(u32::from(p.len)),
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            addr_be: u32::from(p.addr).to_be(),
        },
    )
}

/// A write to undo if the service's transaction fails.
enum Undo {
    Backend(u32),
    BackendValue(u32, Backend),
    BackendId(u32),
    Block(u32),
    SvcId(u32),
    Name(u32),
    Range(u32, Ipv4Prefix),
    Frontend(FrontendKey, Option<FrontendValue>),
    PortRef(u16),
}

pub struct Syncer<'a> {
    pub maps: &'a mut Maps,
    pub sizing: &'a Sizing,
}

impl Programmed {
    /// Nothing programmed (fresh maps).
    pub fn empty(sizing: &Sizing) -> Self {
        Self {
            services: BTreeMap::new(),
            frontend_owner: BTreeMap::new(),
            settings: None,
            port_refs: BTreeMap::new(),
            port_words: None,
            svc_ids: IdPool::new(0, sizing.services),
            backend_ids: IdPool::new(1, sizing.backends + 1),
            blocks: IdPool::new(0, sizing.maglev_blocks()),
        }
    }

    /// Rebuilds the picture from maps that may already hold state (a pinned datapath a
    /// previous agent left). Entries of no named service are queued for removal.
    pub fn adopt(maps: &Maps, sizing: &Sizing) -> Result<(Self, Orphans), SyncError> {
        let mut services: BTreeMap<u32, (ServicePortKey, ProgrammedService)> = BTreeMap::new();
        let mut orphans = Orphans::default();
        for entry in maps.svc_names.iter() {
            let (id, name) = entry.map_err(SyncError::map("reading service names", ""))?;
            match key_of(&name) {
                Some(key) => {
                    let svc = ProgrammedService {
                        id,
                        block: None,
                        table: Vec::new(),
                        backends: BTreeMap::new(),
                        frontends: BTreeMap::new(),
                        source_ranges: BTreeSet::new(),
                        desired: None,
                    };
                    services.insert(id, (key, svc));
                }
                None => orphans.names.push(id),
            }
        }
        for entry in maps.frontends.iter() {
            let (key, value) = entry.map_err(SyncError::map("reading frontends", ""))?;
            match services.get_mut(&value.svc_id) {
                Some((_, svc)) => {
                    svc.frontends.insert(key, value);
                }
                None => orphans.frontends.push(key),
            }
        }
        let mut by_id: BTreeMap<u32, SocketAddrV4> = BTreeMap::new();
        for id in 1..maps.backends.len() {
            let b = maps
                .backends
                .get(id)
                .map_err(SyncError::io("reading backends"))?;
            if b.flags & BE_F_PRESENT == 0 {
                continue;
            }
            let addr = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(b.addr_be)),
                u16::from_be(b.port_be),
            );
            match services.get_mut(&b.svc_id) {
                Some((_, svc)) => {
                    svc.backends.insert(addr, (id, backend_state(b.flags)));
                    by_id.insert(id, addr);
                }
                None => orphans.backends.push(id),
            }
        }
        for entry in maps.src_ranges.iter() {
            let (key, _) = entry.map_err(SyncError::map("reading source ranges", ""))?;
            let svc_id = u32::from_be(key.data().svc_id_be);
            let prefix = Ipv4Prefix {
                addr: Ipv4Addr::from(u32::from_be(key.data().addr_be)),
                len: key.prefix_len().saturating_sub(32) as u8,
            };
            match services.get_mut(&svc_id) {
                Some((_, svc)) => {
                    svc.source_ranges.insert(prefix);
                }
                None => orphans.ranges.push((svc_id, prefix)),
            }
        }
        // The table: the block the frontends use (all of them, unless a crash interrupted a
        // switch; then the most used), read back into backend addresses.
        let m = sizing.maglev_size;
        for (_, svc) in services.values_mut() {
            let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
            for fe in svc.frontends.values().filter(|f| f.backend_count > 0) {
                *votes.entry(fe.maglev_block).or_default() += 1;
            }
            let Some((&block, _)) = votes.iter().max_by_key(|(_, n)| **n) else {
                continue;
            };
            if block >= sizing.maglev_blocks() {
                continue;
            }
            let mut members = BTreeSet::new();
            for slot in 0..m {
                let id = maps
                    .maglev
                    .get(block * m + slot)
                    .map_err(SyncError::io("reading Maglev tables"))?;
                if let Some(addr) = by_id.get(&id).filter(|a| svc.backends.contains_key(a)) {
                    members.insert(*addr);
                }
            }
            let mut table: Vec<SocketAddrV4> = members.into_iter().collect();
            table.sort_by_key(maglev_key);
            svc.block = Some(block);
            svc.table = table;
        }

        let used_svc: BTreeSet<u32> = services.keys().copied().collect();
        let used_backends: BTreeSet<u32> = services
            .values()
            .flat_map(|(_, s)| s.backends.values().map(|(id, _)| *id))
            .collect();
        let used_blocks: BTreeSet<u32> = services.values().filter_map(|(_, s)| s.block).collect();
        let mut programmed = Self {
            services: BTreeMap::new(),
            frontend_owner: BTreeMap::new(),
            settings: None,
            port_refs: BTreeMap::new(),
            port_words: None,
            svc_ids: IdPool::with_used(0, sizing.services, &used_svc),
            backend_ids: IdPool::with_used(1, sizing.backends + 1, &used_backends),
            blocks: IdPool::with_used(0, sizing.maglev_blocks(), &used_blocks),
        };
        for (_, (key, svc)) in services {
            for fe in svc.frontends.keys() {
                programmed.frontend_owner.insert(*fe, key.clone());
                *programmed
                    .port_refs
                    .entry(u16::from_be(fe.port_be))
                    .or_default() += 1;
            }
            programmed.services.insert(key, svc);
        }
        Ok((programmed, orphans))
    }
}

/// Leftovers of an interrupted run: entries that belong to no named service.
#[derive(Debug, Default)]
pub struct Orphans {
    names: Vec<u32>,
    frontends: Vec<FrontendKey>,
    backends: Vec<u32>,
    ranges: Vec<(u32, Ipv4Prefix)>,
}

impl Orphans {
    pub fn len(&self) -> usize {
        self.names.len() + self.frontends.len() + self.backends.len() + self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Syncer<'_> {
    /// Zeroes a service id's packet counters.
    fn zero_stats(&mut self, id: u32) -> Result<(), SyncError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| SyncError::Io {
            what: "counting CPUs",
            source: e,
        })?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![nodeport_common::SvcStats::default(); cpus])
                .map_err(|e| SyncError::Io {
                    what: "zeroing service counters",
                    source: e,
                })?;
        self.maps
            .svc_stats
            .set(id, zeros, 0)
            .map_err(SyncError::map("service counters", "--max-services"))
    }

    /// Removes orphaned entries (after adoption).
    pub fn remove_orphans(&mut self, orphans: Orphans) -> usize {
        let n = orphans.len();
        for key in orphans.frontends {
            let _ = self.maps.frontends.remove(&key);
        }
        for (svc_id, p) in orphans.ranges {
            let _ = self.maps.src_ranges.remove(&range_key(svc_id, &p));
        }
        for id in orphans.backends {
            let _ = self.maps.backends.set(id, Backend::default());
        }
        for id in orphans.names {
            let _ = self.maps.svc_names.remove(&id);
        }
        n
    }

    /// Makes the maps hold `desired`, examining every service.
    pub fn apply(
        &mut self,
        programmed: &mut Programmed,
        desired: &Desired,
        settings: &GlobalSettings,
    ) -> SyncReport {
        let keys: BTreeSet<ServicePortKey> = desired
            .services
            .keys()
            .chain(programmed.services.keys())
            .cloned()
            .collect();
        self.apply_changes(programmed, desired, &keys, settings)
    }

    /// Makes the maps hold `desired` for the services in `keys` (those that may have changed:
    /// the rest are known to match already).
    pub fn apply_changes(
        &mut self,
        programmed: &mut Programmed,
        desired: &Desired,
        keys: &BTreeSet<ServicePortKey>,
        settings: &GlobalSettings,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        if let Err(e) = self.apply_settings(programmed, settings) {
            // Without configuration the datapath passes everything; nothing else makes sense.
            report.failed.push((
                ServicePortKey {
                    namespace: "".into(),
                    name: "(datapath settings)".into(),
                    port_name: "".into(),
                    protocol: Protocol::Tcp,
                },
                e,
            ));
            report.settings_failed = true;
            return report;
        }
        if let Err(e) = self.sync_port_bits(programmed) {
            tracing::warn!(error = %e, "frontend port bits");
        }
        let mut gone = Vec::new();
        for key in keys {
            let Some(want) = desired.services.get(key) else {
                if programmed.services.contains_key(key) {
                    gone.push(key.clone());
                }
                continue;
            };
            let current = programmed.services.get(key);
            // Nearly always the same `Arc` (then no comparison runs), else equal contents.
            if current.is_some_and(|c| c.desired.as_ref() == Some(want)) {
                report.unchanged += 1;
                continue;
            }
            match self.apply_service(programmed, key, want) {
                Ok((svc, changed)) => {
                    programmed.services.insert(key.clone(), svc);
                    if changed {
                        report.applied.push(key.clone());
                    } else {
                        report.unchanged += 1;
                    }
                }
                Err(e) => report.failed.push((key.clone(), e)),
            }
        }
        // Removals last, so a frontend that moved to another service was overwritten first.
        for key in gone {
            self.remove_service(programmed, &key);
            report.removed.push(key);
        }
        report
    }

    fn apply_settings(
        &mut self,
        programmed: &mut Programmed,
        settings: &GlobalSettings,
    ) -> Result<(), SyncError> {
        if programmed.settings.as_ref() == Some(settings) {
            return Ok(());
        }
        self.maps
            .config
            .set(0, settings.config, 0)
            .map_err(SyncError::map("datapath configuration", ""))?;
        let old = programmed
            .settings
            .as_ref()
            .map(|s| s.snat_addrs.clone())
            .unwrap_or_default();
        for (ifindex, addr) in &settings.snat_addrs {
            if old.get(ifindex) != Some(addr) {
                let value = SnatAddr {
                    addr_be: u32::from(*addr).to_be(),
                };
                self.maps
                    .snat_addrs
                    .insert(ifindex, value, 0)
                    .map_err(SyncError::map("SNAT addresses", ""))?;
            }
        }
        // After adoption, remove what the maps hold beyond the settings.
        let present: Vec<u32> = self.maps.snat_addrs.keys().filter_map(Result::ok).collect();
        for ifindex in present {
            if !settings.snat_addrs.contains_key(&ifindex) {
                let _ = self.maps.snat_addrs.remove(&ifindex);
            }
        }
        self.sync_local_nets(&settings.local_nets)?;
        programmed.settings = Some(settings.clone());
        Ok(())
    }

    /// Makes `NP_LOCAL_NETS` hold exactly `want`: new prefixes first, then those no longer
    /// wanted (a prefix that changes is never missing in between).
    fn sync_local_nets(&mut self, want: &BTreeSet<Ipv4Prefix>) -> Result<(), SyncError> {
        let have: BTreeSet<Ipv4Prefix> = self
            .maps
            .local_nets
            .keys()
            .filter_map(Result::ok)
            .map(|k| Ipv4Prefix {
                addr: Ipv4Addr::from(u32::from_be(k.data().addr_be)),
                len: k.prefix_len() as u8,
            })
            .collect();
        for p in want.difference(&have) {
            self.maps
                .local_nets
                .insert(&local_net_key(p), 1, 0)
                .map_err(SyncError::map("local networks", ""))?;
        }
        for p in have.difference(want) {
            self.maps
                .local_nets
                .remove(&local_net_key(p))
                .map_err(SyncError::map("local networks", ""))?;
        }
        Ok(())
    }

    /// Makes the bitmap word of `port` match whether any frontend uses it.
    fn write_port_bit(&mut self, programmed: &mut Programmed, port: u16) -> Result<(), SyncError> {
        let used = programmed.port_refs.get(&port).is_some_and(|n| *n > 0);
        let words = programmed
            .port_words
            .get_or_insert_with(|| vec![0; FRONTEND_PORT_WORDS as usize]);
        let (w, bit) = frontend_port_bit(port);
        let new = if used {
            words[w as usize] | bit
        } else {
            words[w as usize] & !bit
        };
        if new != words[w as usize] {
            self.maps
                .frontend_ports
                .set(w, new, 0)
                .map_err(SyncError::map("frontend ports", ""))?;
            words[w as usize] = new;
        }
        Ok(())
    }

    /// The first time: read the bitmap and correct it to the frontends the maps hold (after
    /// adoption it may be off if a previous agent stopped half-way).
    fn sync_port_bits(&mut self, programmed: &mut Programmed) -> Result<(), SyncError> {
        if programmed.port_words.is_some() {
            return Ok(());
        }
        let mut have: Vec<u64> = (0..FRONTEND_PORT_WORDS)
            .map(|w| self.maps.frontend_ports.get(&w, 0))
            .collect::<Result<_, _>>()
            .map_err(SyncError::map("frontend ports", ""))?;
        let mut want = vec![0u64; FRONTEND_PORT_WORDS as usize];
        for (port, n) in &programmed.port_refs {
            if *n > 0 {
                let (w, bit) = frontend_port_bit(*port);
                want[w as usize] |= bit;
            }
        }
        for w in 0..want.len() {
            if want[w] != have[w] {
                self.maps
                    .frontend_ports
                    .set(w as u32, want[w], 0)
                    .map_err(SyncError::map("frontend ports", ""))?;
                have[w] = want[w];
            }
        }
        programmed.port_words = Some(have);
        Ok(())
    }

    /// Programs one service. Returns it as programmed, and whether anything was written.
    fn apply_service(
        &mut self,
        programmed: &mut Programmed,
        key: &ServicePortKey,
        want: &Arc<DesiredService>,
    ) -> Result<(ProgrammedService, bool), SyncError> {
        let mut undo = Vec::new();
        match self.try_apply_service(programmed, key, want, &mut undo) {
            Ok((svc, retire)) => {
                let changed = !undo.is_empty() || !retire.is_empty();
                self.retire(programmed, key, retire);
                Ok((svc, changed))
            }
            Err(e) => {
                self.undo(programmed, undo);
                Err(e)
            }
        }
    }

    fn try_apply_service(
        &mut self,
        programmed: &mut Programmed,
        key: &ServicePortKey,
        want: &Arc<DesiredService>,
        undo: &mut Vec<Undo>,
    ) -> Result<(ProgrammedService, Retire), SyncError> {
        let current = programmed.services.get(key).cloned();
        let id = match &current {
            Some(c) => c.id,
            None => {
                let id = programmed.svc_ids.alloc().ok_or(SyncError::Full {
                    what: "services",
                    flag: "--max-services",
                })?;
                undo.push(Undo::SvcId(id));
                // A reused id must not inherit the counters of the service that had it.
                self.zero_stats(id)?;
                id
            }
        };

        // 1. Backends: keep ids of unchanged ones, fresh ids for new ones.
        let needed = want
            .backends
            .iter()
            .filter(|(a, s)| {
                current
                    .as_ref()
                    .and_then(|c| c.backends.get(*a))
                    .is_none_or(|(_, old)| old.local != s.local)
            })
            .count();
        if needed > programmed.backend_ids.available() {
            return Err(SyncError::Full {
                what: "backends",
                flag: "--max-backends",
            });
        }
        let mut backends = BTreeMap::new();
        for (addr, state) in &want.backends {
            let reuse = current
                .as_ref()
                .and_then(|c| c.backends.get(addr))
                .filter(|(_, old)| old.local == state.local)
                .copied();
            let bid = match reuse {
                Some((bid, old)) => {
                    if old != *state {
                        // Started or stopped draining: the datapath reads the flag.
                        let previous = backend_value(addr, &old, id);
                        self.maps
                            .backends
                            .set(bid, backend_value(addr, state, id))
                            .map_err(SyncError::io("writing a backend"))?;
                        undo.push(Undo::BackendValue(bid, previous));
                    }
                    bid
                }
                None => {
                    let bid = programmed
                        .backend_ids
                        .alloc()
                        .expect("availability checked");
                    undo.push(Undo::BackendId(bid));
                    self.maps
                        .backends
                        .set(bid, backend_value(addr, state, id))
                        .map_err(SyncError::io("writing a backend"))?;
                    undo.push(Undo::Backend(bid));
                    bid
                }
            };
            backends.insert(*addr, (bid, *state));
        }

        // 2. The Maglev table, into a fresh block when its members changed.
        let mut table: Vec<SocketAddrV4> = want.table_backends().map(|(a, _)| *a).collect();
        if table.len() > self.sizing.maglev_size as usize {
            return Err(SyncError::TooManyBackends {
                backends: table.len(),
                slots: self.sizing.maglev_size,
            });
        }
        table.sort_by_key(maglev_key);
        let same_table = current.as_ref().is_some_and(|c| {
            c.table == table
                && c.block.is_some()
                && table
                    .iter()
                    .all(|a| c.backends.get(a).map(|b| b.0) == backends.get(a).map(|b| b.0))
        });
        let block = if table.is_empty() {
            None
        } else if same_table {
            current.as_ref().and_then(|c| c.block)
        } else {
            let block = programmed.blocks.alloc().ok_or(SyncError::Full {
                what: "Maglev tables",
                flag: "--max-services",
            })?;
            undo.push(Undo::Block(block));
            let keys: Vec<MaglevKey> = table.iter().map(maglev_key).collect();
            let ids: Vec<u32> = maglev::table(&keys, self.sizing.maglev_size)
                .into_iter()
                .map(|i| backends[&table[i as usize]].0)
                .collect();
            self.maps
                .maglev
                .set_range(block * self.sizing.maglev_size, &ids)
                .map_err(SyncError::io("writing a Maglev table"))?;
            Some(block)
        };

        // 3. Name and source ranges.
        if current.is_none() {
            self.maps
                .svc_names
                .insert(id, svc_name(key), 0)
                .map_err(SyncError::map("service names", "--max-services"))?;
            undo.push(Undo::Name(id));
        }
        let old_ranges = current
            .as_ref()
            .map(|c| c.source_ranges.clone())
            .unwrap_or_default();
        for p in want.source_ranges.difference(&old_ranges) {
            self.maps
                .src_ranges
                .insert(&range_key(id, p), 1, 0)
                .map_err(SyncError::map("source ranges", "--max-source-ranges"))?;
            undo.push(Undo::Range(id, *p));
        }

        // 4. Frontends, now pointing at everything above.
        let mut frontends = BTreeMap::new();
        for f in &want.frontends {
            let fkey = frontend_key(f, key.protocol);
            let mut flags = 0;
            if want.local_only {
                flags |= FE_F_LOCAL_ONLY;
            }
            if want.affinity_timeout_s.is_some() {
                flags |= FE_F_AFFINITY;
            }
            if f.source_ranges && !want.source_ranges.is_empty() {
                flags |= FE_F_SOURCE_RANGES;
            }
            let value = FrontendValue {
                svc_id: id,
                maglev_block: block.unwrap_or(0),
                backend_count: table.len().min(usize::from(u16::MAX)) as u16,
                flags,
                affinity_timeout_s: want.affinity_timeout_s.unwrap_or(0),
            };
            let previous = match programmed.frontend_owner.get(&fkey) {
                Some(owner) if owner == key => current
                    .as_ref()
                    .and_then(|c| c.frontends.get(&fkey).copied()),
                Some(owner) => programmed
                    .services
                    .get(owner)
                    .and_then(|s| s.frontends.get(&fkey).copied()),
                None => None,
            };
            if previous != Some(value) {
                if !programmed.frontend_owner.contains_key(&fkey) {
                    // A new frontend: count its port first, so its bit is set before it exists.
                    let port = f.addr.port();
                    *programmed.port_refs.entry(port).or_default() += 1;
                    undo.push(Undo::PortRef(port));
                    self.write_port_bit(programmed, port)?;
                }
                self.maps
                    .frontends
                    .insert(fkey, value, 0)
                    .map_err(SyncError::map("frontends", "--max-frontends"))?;
                undo.push(Undo::Frontend(fkey, previous));
            }
            frontends.insert(fkey, value);
        }

        // Committed. What the old version used and the new one does not is retired next.
        let retire = Retire {
            frontends: current
                .as_ref()
                .map(|c| {
                    c.frontends
                        .keys()
                        .filter(|k| !frontends.contains_key(*k))
                        .copied()
                        .collect()
                })
                .unwrap_or_default(),
            ranges: old_ranges
                .difference(&want.source_ranges)
                .copied()
                .collect(),
            block: current
                .as_ref()
                .and_then(|c| c.block)
                .filter(|b| Some(*b) != block),
            backends: current
                .as_ref()
                .map(|c| {
                    c.backends
                        .iter()
                        .filter(|(a, (bid, _))| backends.get(*a).map(|b| b.0) != Some(*bid))
                        .map(|(_, (bid, _))| *bid)
                        .collect()
                })
                .unwrap_or_default(),
        };
        for fkey in frontends.keys() {
            if let Some(owner) = programmed.frontend_owner.insert(*fkey, key.clone())
                && owner != *key
                && let Some(other) = programmed.services.get_mut(&owner)
            {
                // Taken over from another service: it no longer owns it.
                other.frontends.remove(fkey);
            }
        }
        let svc = ProgrammedService {
            id,
            block,
            table,
            backends,
            frontends,
            source_ranges: want.source_ranges.clone(),
            desired: Some(want.clone()),
        };
        Ok((svc, retire))
    }

    /// Removes what a service's old version used and its new one does not.
    fn retire(&mut self, programmed: &mut Programmed, key: &ServicePortKey, retire: Retire) {
        for fkey in retire.frontends {
            if programmed.frontend_owner.get(&fkey) == Some(key) {
                if let Err(e) = self.maps.frontends.remove(&fkey) {
                    tracing::warn!(service = %key, error = %e, "removing a frontend");
                }
                programmed.frontend_owner.remove(&fkey);
                let port = u16::from_be(fkey.port_be);
                if let Some(n) = programmed.port_refs.get_mut(&port) {
                    *n = n.saturating_sub(1);
                }
                if let Err(e) = self.write_port_bit(programmed, port) {
                    tracing::warn!(service = %key, error = %e, "clearing a frontend port");
                }
            }
        }
        let id = programmed.services.get(key).map(|s| s.id);
        for p in retire.ranges {
            if let Some(id) = id {
                let _ = self.maps.src_ranges.remove(&range_key(id, &p));
            }
        }
        if let Some(block) = retire.block {
            programmed.blocks.free(block);
        }
        for bid in retire.backends {
            if let Err(e) = self.maps.backends.set(bid, Backend::default()) {
                tracing::warn!(service = %key, error = %e, "removing a backend");
            }
            programmed.backend_ids.free(bid);
        }
    }

    fn undo(&mut self, programmed: &mut Programmed, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            let result = match step {
                Undo::Backend(bid) => self
                    .maps
                    .backends
                    .set(bid, Backend::default())
                    .map_err(|e| e.to_string()),
                Undo::BackendValue(bid, previous) => self
                    .maps
                    .backends
                    .set(bid, previous)
                    .map_err(|e| e.to_string()),
                Undo::BackendId(bid) => {
                    programmed.backend_ids.free(bid);
                    Ok(())
                }
                Undo::Block(block) => {
                    programmed.blocks.free(block);
                    Ok(())
                }
                Undo::SvcId(id) => {
                    programmed.svc_ids.free(id);
                    Ok(())
                }
                Undo::Name(id) => self.maps.svc_names.remove(&id).map_err(|e| e.to_string()),
                Undo::Range(id, p) => self
                    .maps
                    .src_ranges
                    .remove(&range_key(id, &p))
                    .map_err(|e| e.to_string()),
                Undo::Frontend(fkey, Some(previous)) => self
                    .maps
                    .frontends
                    .insert(fkey, previous, 0)
                    .map_err(|e| e.to_string()),
                Undo::Frontend(fkey, None) => {
                    self.maps.frontends.remove(&fkey).map_err(|e| e.to_string())
                }
                Undo::PortRef(port) => {
                    if let Some(n) = programmed.port_refs.get_mut(&port) {
                        *n = n.saturating_sub(1);
                    }
                    self.write_port_bit(programmed, port)
                        .map_err(|e| e.to_string())
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "undoing a partial service update failed");
            }
        }
    }

    /// Removes a service: frontends first (no new packet reaches it), then the rest.
    fn remove_service(&mut self, programmed: &mut Programmed, key: &ServicePortKey) {
        let Some(svc) = programmed.services.get(key).cloned() else {
            return;
        };
        let retire = Retire {
            frontends: svc.frontends.keys().copied().collect(),
            ranges: svc.source_ranges.iter().copied().collect(),
            block: svc.block,
            backends: svc.backends.values().map(|(bid, _)| *bid).collect(),
        };
        self.retire(programmed, key, retire);
        if let Err(e) = self.maps.svc_names.remove(&svc.id) {
            tracing::warn!(service = %key, error = %e, "removing a service name");
        }
        programmed.svc_ids.free(svc.id);
        programmed.services.remove(key);
    }
}

/// What a service's update leaves to remove once it is committed.
#[derive(Default)]
struct Retire {
    frontends: Vec<FrontendKey>,
    ranges: Vec<Ipv4Prefix>,
    block: Option<u32>,
    backends: Vec<u32>,
}

impl Retire {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.ranges.is_empty()
            && self.block.is_none()
            && self.backends.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_as_late_as_possible() {
        let mut pool = IdPool::new(1, 4);
        assert_eq!(
            (pool.alloc(), pool.alloc(), pool.alloc()),
            (Some(1), Some(2), Some(3))
        );
        pool.free(2);
        pool.free(1);
        assert_eq!(pool.alloc(), Some(2), "the oldest freed id first");
        assert_eq!(pool.alloc(), Some(1));
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn an_adopted_pool_hands_out_new_ids_before_holes() {
        let used = BTreeSet::from([1, 2, 5]);
        let mut pool = IdPool::with_used(1, 8, &used);
        assert_eq!(pool.available(), 4);
        assert_eq!(
            (pool.alloc(), pool.alloc(), pool.alloc()),
            (Some(6), Some(7), Some(3))
        );
    }

    /// An adopted backend has the state it was written with (a restart reprograms nothing).
    #[test]
    fn backend_states_round_trip_through_the_flags() {
        let addr: SocketAddrV4 = "10.0.0.1:80".parse().unwrap();
        for bits in 0u8..16 {
            let state = BackendState {
                local: bits & 1 != 0,
                in_table: bits & 2 != 0,
                serving: bits & 4 != 0,
                hinted_away: bits & 8 != 0,
            };
            let value = backend_value(&addr, &state, 7);
            assert_ne!(value.flags & BE_F_PRESENT, 0);
            assert_eq!(backend_state(value.flags), state, "{state:?}");
        }
    }

    #[test]
    fn service_names_round_trip() {
        let key = ServicePortKey {
            namespace: "kube-system".into(),
            name: "a-very-long-service-name-of-sixty-three-characters-max-aaaaaaaa".into(),
            port_name: "metrics-http".into(),
            protocol: Protocol::Udp,
        };
        assert_eq!(key_of(&svc_name(&key)), Some(key));
    }
}
