//! What the maps hold, for people: `nodeport-agent dump` (which works from the pins alone,
//! with or without a running agent) and the golden files of the map tests.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use aya::maps::IterableMap as _;
use nodeport_common::{
    CT_DIR_FORWARD, CT_F_SNAT, Counter, CtEntry, CtKey, DatapathConfig, FE_F_AFFINITY,
    FE_F_LOCAL_ONLY, FE_F_SOURCE_RANGES, IPPROTO_TCP, SvcStats, counters::CounterKind,
};
use serde::Serialize;

use crate::{
    datapath::{
        self, ConntrackCensus, CtTable, Maps, Sizing,
        conntrack::{self, Connections},
    },
    model::{IPV6_TO_KERNEL, IpFamily, Ipv4Prefix, ServicePortKey},
    sync::{Programmed, SyncError},
};

/// What `dump` shows beyond the services.
#[derive(Clone, Debug, Default)]
pub struct DumpOptions {
    /// Packet counters per service and globally, and the connection table's census.
    pub stats: bool,
    /// The connections in the connection table.
    pub conntrack: bool,
    /// Only this Service (services and connections).
    pub service: Option<ServiceFilter>,
    /// Only connections from clients in this prefix.
    pub client: Option<Ipv4Prefix>,
}

/// `NAMESPACE/NAME` or `NAMESPACE/NAME:PORT` (the Service port's name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFilter {
    pub namespace: String,
    pub name: String,
    pub port: Option<String>,
}

impl std::str::FromStr for ServiceFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME or NAMESPACE/NAME:PORT"))?;
        let (name, port) = match rest.split_once(':') {
            Some((name, port)) => (name, Some(port.to_owned())),
            None => (rest, None),
        };
        if namespace.is_empty() || name.is_empty() {
            return Err(format!(
                "{s:?}: expected NAMESPACE/NAME or NAMESPACE/NAME:PORT"
            ));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port,
        })
    }
}

impl ServiceFilter {
    pub fn matches(&self, key: &ServicePortKey) -> bool {
        *key.namespace == *self.namespace
            && *key.name == *self.name
            && self.port.as_ref().is_none_or(|p| **p == *key.port_name)
    }

    /// [`ServiceFilter::matches`] for a service port written as `ServicePortKey` displays it
    /// (`namespace/name[:port]/PROTOCOL`).
    pub fn matches_label(&self, label: &str) -> bool {
        let Some(rest) = label.strip_prefix(&format!("{}/{}", self.namespace, self.name)) else {
            return false;
        };
        match &self.port {
            None => rest.starts_with(':') || rest.starts_with('/'),
            Some(port) if port.is_empty() => rest.starts_with('/'),
            Some(port) => rest.starts_with(&format!(":{port}/")),
        }
    }
}

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
    /// IPv4: what the datapath carries (IPv6 frontends are the kernel's, see
    /// `Dump::ipv6_to_kernel`).
    pub family: IpFamily,
    pub address: String,
    pub protocol: String,
    pub backends_in_table: u16,
    pub local_only: bool,
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: bool,
}

#[derive(Debug, Serialize)]
pub struct DumpBackend {
    pub family: IpFamily,
    pub id: u32,
    pub address: String,
    pub local: bool,
    /// Takes new connections; otherwise kept only for its established ones.
    pub in_table: bool,
    /// Out of the table because topology hints send this node's new connections to other
    /// endpoints, not because it is terminating or not ready.
    pub hinted_away: bool,
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
    /// Service ports with IPv6 frontends, which the kernel carries (kube-proxy) until the
    /// datapath supports IPv6: what the agent recorded under the pins (`with_ipv6`).
    pub ipv6_to_kernel: Vec<datapath::notices::Ipv6Port>,
    /// Global packet counters by name (non-zero ones), with `stats`.
    pub counters: Vec<(String, u64)>,
    /// Connection events by name (non-zero ones), with `stats`: not packet fates, counted
    /// besides them.
    pub events: Vec<(String, u64)>,
    /// The connection table's census, with `stats`.
    pub conntrack: Option<ConntrackCensus>,
    /// Connections, with `conntrack`.
    pub connections: Option<Vec<DumpConnection>>,
}

/// One connection (its forward entry).
#[derive(Debug, Serialize)]
pub struct DumpConnection {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The service, when its id is still programmed.
    pub service: Option<String>,
    /// The node address and port the connection is SNATed to (remote backends).
    pub snat: Option<String>,
    /// `handshake`, `established`, `half-closed`, `closing`, `udp` or `udp-unreplied`.
    pub state: &'static str,
    /// The table it is in: `established` (`NP_CT`) or `handshake` (`NP_CT_NEW`).
    pub table: CtTable,
    /// Seconds since the last packet from the client.
    pub idle_s: u64,
    /// Seconds until it expires without packets in either direction; `None`: expired,
    /// waiting for the agent's collector.
    pub expires_in_s: Option<u64>,
}

/// Reads the maps. `stats` and `conntrack` change with traffic, so golden files leave them out.
pub fn read(maps: &Maps, sizing: &Sizing, options: &DumpOptions) -> Result<Dump, SyncError> {
    let (programmed, _) = Programmed::adopt(maps, sizing)?;
    let mut services = Vec::new();
    let wanted = |key: &ServicePortKey| options.service.as_ref().is_none_or(|f| f.matches(key));
    for (key, svc) in programmed.services.iter().filter(|(k, _)| wanted(k)) {
        let protocol = key.protocol.to_string();
        let frontends = svc
            .frontends
            .iter()
            .map(|(k, v)| DumpFrontend {
                family: IpFamily::Ipv4,
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
                family: IpFamily::Ipv4,
                id: *id,
                address: addr.to_string(),
                local: state.local,
                in_table: state.in_table,
                hinted_away: state.hinted_away,
            })
            .collect();
        let stats = if options.stats {
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
    let cfg: DatapathConfig = maps.config.get(&0, 0).unwrap_or_default();
    let now = datapath::jiffies_now(cfg.hz);
    let mut census = None;
    let mut connections = Vec::new();
    if options.stats || options.conntrack {
        let records = conntrack::read_tables(maps.conntrack.map(), maps.conntrack_new.map())
            .map_err(|source| SyncError::Io {
                what: "reading the connection tables",
                source,
            })?;
        if options.stats {
            census = Some(ConntrackCensus::of(&cfg, &records, now));
        }
        let names: BTreeMap<u32, &ServicePortKey> =
            programmed.services.iter().map(|(k, s)| (s.id, k)).collect();
        let index = Connections::new(&records);
        for (i, r) in records.iter().enumerate() {
            if !options.conntrack || r.key.dir != CT_DIR_FORWARD || index.shadowed(i) {
                continue;
            }
            let service = names.get(&r.entry.svc_id).copied();
            let client = Ipv4Addr::from(u32::from_be(r.key.saddr_be));
            let service_ok = match (&options.service, service) {
                (None, _) => true,
                (Some(f), Some(k)) => f.matches(k),
                (Some(_), None) => false,
            };
            let client_ok = options.client.as_ref().is_none_or(|p| p.contains(client));
            if service_ok && client_ok {
                let partner = index.partner(i).map(|p| &p.entry);
                connections.push(connection(&cfg, r, partner, service, now));
            }
        }
    }
    connections.sort_by(|a: &DumpConnection, b| {
        (&a.service, &a.client, &a.frontend).cmp(&(&b.service, &b.client, &b.frontend))
    });
    let (mut counters, mut events) = (Vec::new(), Vec::new());
    if options.stats {
        for (c, v) in counter_values(maps).into_iter().filter(|(_, v)| *v != 0) {
            let list = if c.kind() == CounterKind::Event {
                &mut events
            } else {
                &mut counters
            };
            list.push((c.label().to_owned(), v));
        }
    }
    Ok(Dump {
        services,
        ipv6_to_kernel: Vec::new(),
        counters,
        events,
        conntrack: census,
        connections: options.conntrack.then_some(connections),
    })
}

fn addr_port(addr_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(addr_be)),
        u16::from_be(port_be)
    )
}

fn connection(
    cfg: &DatapathConfig,
    record: &datapath::CtRecord,
    partner: Option<&CtEntry>,
    service: Option<&ServicePortKey>,
    now: u64,
) -> DumpConnection {
    let (key, entry): (&CtKey, &CtEntry) = (&record.key, &record.entry);
    let hz = u64::from(cfg.hz.max(1));
    let idle = now.saturating_sub(entry.last_seen);
    // Jiffies left before an entry expires; the connection lasts as long as its longer one.
    let left = |e: &CtEntry| {
        let timeout = u64::from(cfg.ct_timeout_s(key.proto, &e.state)) * hz;
        timeout.checked_sub(now.saturating_sub(e.last_seen))
    };
    let expires = left(entry).max(partner.and_then(left));
    DumpConnection {
        protocol: if key.proto == IPPROTO_TCP {
            "TCP"
        } else {
            "UDP"
        }
        .to_owned(),
        client: addr_port(key.saddr_be, key.sport_be),
        frontend: addr_port(key.daddr_be, key.dport_be),
        backend: addr_port(entry.new_daddr_be, entry.new_dport_be),
        service: service.map(ToString::to_string),
        snat: (entry.flags & CT_F_SNAT != 0)
            .then(|| addr_port(entry.new_saddr_be, entry.new_sport_be)),
        state: conntrack::state_name(key.proto, &entry.state),
        table: record.table,
        idle_s: idle / hz,
        expires_in_s: expires.map(|j| j / hz),
    }
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
    /// Adds the IPv6 service ports the agent recorded under `root` (the pins), those of
    /// `options.service` only when it names one.
    pub fn with_ipv6(mut self, root: &std::path::Path, options: &DumpOptions) -> Self {
        let recorded = datapath::notices::read(root);
        self.ipv6_to_kernel = datapath::notices::ipv6_ports(&recorded)
            .into_iter()
            .filter(|p| {
                options
                    .service
                    .as_ref()
                    .is_none_or(|f| f.matches_label(&p.service))
            })
            .collect();
        self
    }

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
                } else if b.hinted_away {
                    "draining (topology hints send new connections elsewhere)"
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
        if !self.ipv6_to_kernel.is_empty() {
            let _ = writeln!(out, "{IPV6_TO_KERNEL}");
            for port in &self.ipv6_to_kernel {
                let _ = writeln!(out, "{}", port.render());
            }
        }
        if let Some(c) = &self.conntrack {
            out.push_str(&c.render("conntrack "));
        }
        if let Some(connections) = &self.connections {
            let _ = writeln!(out, "connections ({})", connections.len());
            for c in connections {
                let snat = c
                    .snat
                    .as_ref()
                    .map_or(String::new(), |s| format!(" via {s}"));
                let expiry = c
                    .expires_in_s
                    .map_or("expired".to_owned(), |s| format!("expires in {s} s"));
                let _ = writeln!(
                    out,
                    "  {} {} -> {} -> {}{snat}  {} {}, idle {} s, {expiry}",
                    c.protocol,
                    c.client,
                    c.frontend,
                    c.backend,
                    c.service.as_deref().unwrap_or("(service gone)"),
                    c.state,
                    c.idle_s
                );
            }
        }
        if !self.counters.is_empty() {
            out.push_str("counters\n");
            for (name, v) in &self.counters {
                let _ = writeln!(out, "  {name} {v}");
            }
        }
        if !self.events.is_empty() {
            out.push_str("connection events\n");
            for (name, v) in &self.events {
                let _ = writeln!(out, "  {name} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dump --service` picks the IPv6 service ports by their label as it picks the others
    /// by key.
    #[test]
    fn a_service_filter_matches_labels_as_it_matches_keys() {
        let filter = |s: &str| s.parse::<ServiceFilter>().unwrap();
        for (f, label, expected) in [
            ("shop/web", "shop/web:http/TCP", true),
            ("shop/web", "shop/web/UDP", true),
            ("shop/web", "shop/webby/TCP", false),
            ("shop/web:http", "shop/web:http/TCP", true),
            ("shop/web:http", "shop/web:https/TCP", false),
            ("shop/web:", "shop/web/TCP", true),
            ("shop/web:", "shop/web:http/TCP", false),
            ("shop/we", "shop/web/TCP", false),
        ] {
            assert_eq!(filter(f).matches_label(label), expected, "{f} {label}");
        }
    }
}
