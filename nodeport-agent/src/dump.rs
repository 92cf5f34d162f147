//! What the maps hold, for people: `nodeport-agent dump` (which works from the pins alone,
//! with or without a running agent) and the golden files of the map tests.

use std::{fmt::Write as _, net::Ipv4Addr};

use nodeport_common::{Counter, FE_F_AFFINITY, FE_F_LOCAL_ONLY, FE_F_SOURCE_RANGES, SvcStats};
use serde::Serialize;

use crate::{
    datapath::{Maps, Sizing},
    sync::{Programmed, SyncError},
};

#[derive(Debug, Serialize)]
pub struct DumpService {
    pub id: u32,
    pub service: String,
    pub frontends: Vec<DumpFrontend>,
    pub backends: Vec<DumpBackend>,
    pub source_ranges: Vec<String>,
    pub maglev_block: Option<u32>,
    pub stats: Option<DumpStats>,
}

#[derive(Debug, Serialize)]
pub struct DumpFrontend {
    pub address: String,
    pub protocol: String,
    pub backends_in_table: u16,
    pub local_only: bool,
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: bool,
}

#[derive(Debug, Serialize)]
pub struct DumpBackend {
    pub id: u32,
    pub address: String,
    pub local: bool,
    /// Takes new connections; otherwise kept only for its established ones.
    pub in_table: bool,
}

#[derive(Debug, Serialize)]
pub struct DumpStats {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Dump {
    pub services: Vec<DumpService>,
    /// Global packet counters by name (non-zero ones), when asked for.
    pub counters: Vec<(String, u64)>,
    pub conntrack_entries: Option<usize>,
}

/// Reads the maps. With `stats`, also counters and per-service packets (they change with
/// traffic, so golden files leave them out).
pub fn read(maps: &Maps, sizing: &Sizing, stats: bool) -> Result<Dump, SyncError> {
    let (programmed, _) = Programmed::adopt(maps, sizing)?;
    let mut services = Vec::new();
    for (key, svc) in &programmed.services {
        let protocol = key.protocol.to_string();
        let frontends = svc
            .frontends
            .iter()
            .map(|(k, v)| DumpFrontend {
                address: format!(
                    "{}:{}",
                    Ipv4Addr::from(u32::from_be(k.addr_be)),
                    u16::from_be(k.port_be)
                ),
                protocol: protocol.clone(),
                backends_in_table: v.backend_count,
                local_only: v.flags & FE_F_LOCAL_ONLY != 0,
                affinity_timeout_s: (v.flags & FE_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
                source_ranges: v.flags & FE_F_SOURCE_RANGES != 0,
            })
            .collect();
        let backends = svc
            .backends
            .iter()
            .map(|(addr, (id, state))| DumpBackend {
                id: *id,
                address: addr.to_string(),
                local: state.local,
                in_table: state.in_table,
            })
            .collect();
        let stats = if stats {
            Some(service_stats(maps, svc.id))
        } else {
            None
        };
        services.push(DumpService {
            id: svc.id,
            service: key.to_string(),
            frontends,
            backends,
            source_ranges: svc.source_ranges.iter().map(ToString::to_string).collect(),
            maglev_block: svc.block,
            stats,
        });
    }
    let (counters, conntrack_entries) = if stats {
        let counters = counter_values(maps)
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .map(|(c, v)| (c.label().to_owned(), v))
            .collect();
        (counters, Some(maps.conntrack.keys().count()))
    } else {
        (Vec::new(), None)
    };
    Ok(Dump {
        services,
        counters,
        conntrack_entries,
    })
}

fn service_stats(maps: &Maps, id: u32) -> DumpStats {
    let per_cpu = maps
        .svc_stats
        .get(&id, 0)
        .map(|v| v.iter().copied().collect::<Vec<_>>())
        .unwrap_or_default();
    let sum = per_cpu.iter().fold(SvcStats::default(), |a, s| SvcStats {
        packets: a.packets + s.packets,
        bytes: a.bytes + s.bytes,
        reply_packets: a.reply_packets + s.reply_packets,
        reply_bytes: a.reply_bytes + s.reply_bytes,
    });
    DumpStats {
        packets: sum.packets,
        bytes: sum.bytes,
        reply_packets: sum.reply_packets,
        reply_bytes: sum.reply_bytes,
    }
}

/// Every global counter, summed over CPUs.
pub fn counter_values(maps: &Maps) -> Vec<(Counter, u64)> {
    Counter::ALL
        .iter()
        .map(|c| {
            let total = maps
                .counters
                .get(&(*c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (*c, total)
        })
        .collect()
}

impl Dump {
    /// The human-readable form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.services.is_empty() {
            out.push_str("no services\n");
        }
        for svc in &self.services {
            let _ = writeln!(out, "service {} {}", svc.id, svc.service);
            for f in &svc.frontends {
                let mut flags = Vec::new();
                if f.local_only {
                    flags.push("local-only".to_owned());
                }
                if let Some(t) = f.affinity_timeout_s {
                    flags.push(format!("affinity {t}s"));
                }
                if f.source_ranges {
                    flags.push("source-ranges".to_owned());
                }
                let flags = if flags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", flags.join(", "))
                };
                let _ = writeln!(
                    out,
                    "  frontend {}/{} -> {} backend(s){flags}",
                    f.address, f.protocol, f.backends_in_table
                );
            }
            for b in &svc.backends {
                let place = if b.local { "local" } else { "remote" };
                let role = if b.in_table {
                    "new connections"
                } else {
                    "draining"
                };
                let _ = writeln!(out, "  backend {} {} {place}, {role}", b.id, b.address);
            }
            if !svc.source_ranges.is_empty() {
                let _ = writeln!(out, "  source ranges {}", svc.source_ranges.join(", "));
            }
            if let Some(s) = &svc.stats {
                let _ = writeln!(
                    out,
                    "  packets {} ({} bytes) in, {} ({} bytes) back",
                    s.packets, s.bytes, s.reply_packets, s.reply_bytes
                );
            }
        }
        if let Some(n) = self.conntrack_entries {
            let _ = writeln!(out, "conntrack entries {n}");
        }
        if !self.counters.is_empty() {
            out.push_str("counters\n");
            for (name, v) in &self.counters {
                let _ = writeln!(out, "  {name} {v}");
            }
        }
        out
    }
}
