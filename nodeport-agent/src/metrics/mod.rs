//! The agent's Prometheus metrics (served on --metrics-bind-address, `/metrics`).
//!
//! Two kinds of series: those the agent's loop sets as it works (sync durations and failures,
//! what is programmed), and those read from the maps **at scrape time** by a [`Sampler`] on a
//! blocking thread with its own map handles, so a scrape always sees the datapath as it is and
//! never holds up the agent's loop. Datapath counters live in per-CPU maps; the sampler adds
//! their increase since the last scrape to its own counters, so the exported series are
//! ordinary monotonic counters (a map that restarts from zero is counted from zero).
//!
//! Every series whose label values are known in advance exists from the start, at 0: the
//! datapath's counters (one per `nodeport_common::Counter`), the sync failure reasons, the
//! collector's maps, the kinds of skipped objects. A rate over a counter that appears with its
//! first event would miss that event. `/metrics` serves OpenMetrics or the Prometheus text
//! format by the scraper's `Accept` header ([`exposition`]), and the `process_*` metrics
//! ([`process`]).

pub mod exposition;
pub mod latency;
pub mod process;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use aya::maps::IterableMap as _;
use nodeport_common::{
    DatapathConfig, SvcName, SvcStats,
    counters::{Counter as DatapathCounter, CounterKind},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    datapath::{self, Maps, census},
    dump, ledger,
    model::{NoticeKind, Protocol, ServicePortKey},
    source::{SnapshotReceiver, SourceStats},
    sync::{self, SyncReport},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketLabels {
    /// What happened to the packets, and why (nodeport_common::Counter labels): the drop
    /// reason of a dropped packet.
    pub reason: String,
    /// forwarded, passed, fallback or dropped.
    pub kind: String,
}

impl PacketLabels {
    /// The labels of a packet fate; `None` for a connection event.
    fn of(counter: DatapathCounter) -> Option<Self> {
        let kind = match counter.kind() {
            CounterKind::Forwarded => "forwarded",
            CounterKind::Passed => "passed",
            CounterKind::Fallback => "fallback",
            CounterKind::Dropped => "dropped",
            CounterKind::Event => return None,
        };
        Some(Self {
            reason: counter.label().into(),
            kind: kind.into(),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// What happened to a connection (nodeport_common::Counter labels of kind Event).
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableStateLabels {
    pub map: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnatAddressLabels {
    pub snat_address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnatBackendLabels {
    pub snat_address: String,
    pub backend: String,
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// Series the agent's loop sets as it works. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub sync_seconds: Histogram,
    /// From a change in the cluster (an EndpointSlice's trigger time) to the maps
    /// ([`latency`]).
    pub programming_seconds: Histogram,
    pub sync_failures: Family<ReasonLabels, Counter>,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub services: Gauge,
    pub backends: Gauge,
    pub health_checks: Gauge,
    pub notices: Family<KindLabels, Gauge>,
    /// IPv6 frontends and endpoints of Services, which the kernel carries.
    pub ipv6_frontends: Gauge,
    pub ipv6_endpoints: Gauge,
    /// Entries the conntrack collector deleted, by map.
    pub gc_deleted: Family<MapLabels, Counter>,
    /// How long the last sweep took.
    pub gc_seconds: Gauge<f64, AtomicU64>,
    /// When the last sweep finished (Unix time).
    pub gc_last: Gauge<f64, AtomicU64>,
    /// Where the datapath is (`--datapath-switch`): 1 for the current state.
    pub datapath_state: Family<StateLabels, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            programming_seconds: Histogram::new(latency::buckets()),
            sync_failures: Family::default(),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            backends: Gauge::default(),
            health_checks: Gauge::default(),
            notices: Family::default(),
            ipv6_frontends: Gauge::default(),
            ipv6_endpoints: Gauge::default(),
            gc_deleted: Family::default(),
            gc_seconds: Gauge::default(),
            gc_last: Gauge::default(),
            datapath_state: Family::default(),
        };
        registry.register_collector(Box::new(process::ProcessCollector));
        for reason in SYNC_FAILURE_REASONS {
            m.sync_failures.get_or_create_owned(&ReasonLabels {
                reason: reason.into(),
            });
        }
        for table in [datapath::CtTable::Established, datapath::CtTable::Handshake] {
            m.gc_deleted.get_or_create_owned(&MapLabels {
                map: table.map_name().into(),
            });
        }
        m.set_notices(&BTreeMap::new());
        m.set_datapath_state(crate::switch::DatapathState::On);
        let r = registry.sub_registry_with_prefix("nodeport");
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        r.register("build_info", "The agent's version (always 1)", build_info);
        r.register(
            "sync_duration_seconds",
            "Time to bring the maps to a new desired state",
            m.sync_seconds.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "Time from a change in the cluster to the maps holding it: from the \
             last-change-trigger-time annotation of a new or changed EndpointSlice (the pod \
             change the EndpointSlice controller stamped) to the end of the round that \
             programmed its Service, as kube-proxy's kubeproxy_network_programming_duration_seconds",
            m.programming_seconds.clone(),
        );
        r.register(
            "sync_failures",
            "Map updates that failed, per service port and attempt, by reason (map_full: a map \
             is at capacity); the service keeps its previous state and is retried",
            m.sync_failures.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "When the agent last programmed everything it was given (Unix time)",
            m.last_sync.clone(),
        );
        r.register(
            "services",
            "Service ports programmed in the datapath",
            m.services.clone(),
        );
        r.register(
            "backends",
            "Backends programmed in the datapath",
            m.backends.clone(),
        );
        r.register(
            "health_check_ports",
            "Health-check node ports served",
            m.health_checks.clone(),
        );
        r.register(
            "skipped",
            "Things in the cluster state not programmed, by kind (ipv6_to_kernel: service \
             ports with IPv6 frontends carried by the kernel (kube-proxy) until the datapath \
             supports IPv6)",
            m.notices.clone(),
        );
        r.register(
            "ipv6_frontends",
            "IPv6 frontends of Services (node ports on the node's IPv6 addresses, IPv6 \
             LoadBalancer IPs and externalIPs) carried by the kernel (kube-proxy) until the \
             datapath supports IPv6",
            m.ipv6_frontends.clone(),
        );
        r.register(
            "ipv6_endpoints",
            "IPv6 endpoints behind those frontends (per service port), carried by the kernel \
             (kube-proxy) until the datapath supports IPv6",
            m.ipv6_endpoints.clone(),
        );
        r.register(
            "conntrack_gc_deleted_entries",
            "Connection tracking entries the agent's collector deleted (connections whose \
             entries both expired), by map",
            m.gc_deleted.clone(),
        );
        r.register(
            "conntrack_gc_duration_seconds",
            "How long the last sweep of the connection tables took",
            m.gc_seconds.clone(),
        );
        r.register(
            "datapath_state",
            "Where the datapath is (--datapath-switch): 1 for the current state, 0 for the \
             others. on: attached; draining: attached, established connections only, new ones \
             go to kube-proxy; off: detached, kube-proxy carries the node ports",
            m.datapath_state.clone(),
        );
        r.register(
            "conntrack_gc_last_sweep_timestamp_seconds",
            "When the last sweep of the connection tables finished (Unix time)",
            m.gc_last.clone(),
        );
        m
    }

    /// Sets `nodeport_datapath_state`: 1 for `state`, 0 for the others (every state has a
    /// series, so a query never finds none).
    pub fn set_datapath_state(&self, state: crate::switch::DatapathState) {
        for s in crate::switch::DatapathState::ALL {
            self.datapath_state
                .get_or_create(&StateLabels {
                    state: s.label().into(),
                })
                .set(i64::from(s == state));
        }
    }

    /// Records a sweep of the conntrack collector.
    pub fn record_gc(&self, report: &datapath::conntrack::SweepReport) {
        for (table, n) in [
            (datapath::CtTable::Established, report.deleted_established),
            (datapath::CtTable::Handshake, report.deleted_handshake),
        ] {
            self.gc_deleted
                .get_or_create(&MapLabels {
                    map: table.map_name().into(),
                })
                .inc_by(n);
        }
        self.gc_seconds.set(report.seconds);
        self.gc_last.set(unix_seconds());
    }

    pub fn record_sync(&self, report: &SyncReport, seconds: f64) {
        self.sync_seconds.observe(seconds);
        for (_, e) in &report.failed {
            let reason = if e.is_full() {
                SYNC_FAILURE_REASONS[0]
            } else {
                SYNC_FAILURE_REASONS[1]
            };
            self.sync_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc();
        }
        if report.failed.is_empty() {
            self.last_sync.set(unix_seconds());
        }
    }

    /// Sets `nodeport_ipv6_frontends` and `nodeport_ipv6_endpoints` from the `ipv6_to_kernel`
    /// notices' counts.
    pub fn set_ipv6(&self, notices: &std::collections::BTreeSet<crate::model::Notice>) {
        let (mut frontends, mut endpoints) = (0, 0);
        for c in notices
            .iter()
            .filter(|n| n.kind == NoticeKind::Ipv6ToKernel)
            .filter_map(|n| n.counts)
        {
            frontends += c.frontends;
            endpoints += c.endpoints;
        }
        self.ipv6_frontends.set(frontends as i64);
        self.ipv6_endpoints.set(endpoints as i64);
    }

    pub fn set_notices(&self, counts: &BTreeMap<NoticeKind, usize>) {
        for kind in NoticeKind::ALL {
            let n = counts.get(&kind).copied().unwrap_or(0);
            self.notices
                .get_or_create(&KindLabels {
                    kind: kind.label().into(),
                })
                .set(n as i64);
        }
    }
}

/// The `reason` label values of `nodeport_sync_failures_total`: a full map, any other error.
pub const SYNC_FAILURE_REASONS: [&str; 2] = ["map_full", "error"];

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Series read at scrape time.
#[derive(Clone, Default)]
struct Sampled {
    datapath_packets: Family<PacketLabels, Counter>,
    conntrack_events: Family<EventLabels, Counter>,
    services: ServiceSeries,
    conntrack_entries: Family<TableStateLabels, Gauge>,
    conntrack_connections: Gauge,
    snat_ports: Family<SnatAddressLabels, Gauge>,
    snat_ports_max_per_backend: Family<SnatAddressLabels, Gauge>,
    snat_ports_busiest: Family<SnatBackendLabels, Gauge>,
    snat_port_capacity: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    map_memory: Family<MapLabels, Gauge>,
    source_errors: Counter,
    source_snapshots: Counter,
    source_relists: Counter,
}

impl Sampled {
    /// Registers the scrape-time series; the per-service ones only with `per_service`.
    fn register(registry: &mut Registry, per_service: bool) -> Self {
        let m = Self::default();
        // Every counter of the datapath from the start, at 0.
        for &counter in DatapathCounter::ALL {
            match PacketLabels::of(counter) {
                Some(labels) => {
                    m.datapath_packets.get_or_create_owned(&labels);
                }
                None => {
                    m.conntrack_events.get_or_create_owned(&EventLabels {
                        event: counter.label().into(),
                    });
                }
            }
        }
        let r = registry.sub_registry_with_prefix("nodeport");
        r.register(
            "datapath_packets",
            "Packets seen by the datapath, by what happened to them (reason) and its kind \
             (forwarded, passed, fallback, dropped): the drops by reason are those of kind \
             dropped",
            m.datapath_packets.clone(),
        );
        r.register(
            "conntrack_events",
            "Things that happened to connections in the datapath (not packet fates: counted \
             besides them), by event",
            m.conntrack_events.clone(),
        );
        if per_service {
            r.register(
                "service_packets",
                "Packets per service port and direction",
                ServiceFamily {
                    series: m.services.clone(),
                    of: ServiceCount::Packets,
                },
            );
            r.register(
                "service_bytes",
                "Bytes (IP length) per service port and direction",
                ServiceFamily {
                    series: m.services.clone(),
                    of: ServiceCount::Bytes,
                },
            );
        }
        r.register(
            "conntrack_entries",
            "Connection tracking entries (both directions) by map (NP_CT established, \
             NP_CT_NEW handshake) and state: live (of a live connection), or expired and \
             waiting for the agent's collector",
            m.conntrack_entries.clone(),
        );
        r.register(
            "conntrack_connections",
            "Live connections in the connection table",
            m.conntrack_connections.clone(),
        );
        r.register(
            "snat_ports_in_use",
            "SNAT source ports held by live connections to remote backends, per SNAT address \
             (over all backends)",
            m.snat_ports.clone(),
        );
        r.register(
            "snat_ports_max_per_backend",
            "SNAT ports held towards the busiest remote backend (address, port, protocol), per \
             SNAT address: compare with nodeport_snat_port_capacity, which is per backend",
            m.snat_ports_max_per_backend.clone(),
        );
        r.register(
            "snat_ports_in_use_by_backend",
            "SNAT ports held towards each of the 10 busiest remote backends",
            m.snat_ports_busiest.clone(),
        );
        r.register(
            "snat_port_capacity",
            "SNAT ports each remote backend can use per SNAT address and protocol \
             (--snat-port-range)",
            m.snat_port_capacity.clone(),
        );
        r.register(
            "map_entries",
            "Entries in use per map (maps whose use follows the services are left out)",
            m.map_entries.clone(),
        );
        r.register(
            "map_capacity",
            "Entries each map can hold (its sizing flag)",
            m.map_capacity.clone(),
        );
        r.register(
            "map_memory_bytes",
            "Kernel memory charged for each map",
            m.map_memory.clone(),
        );
        r.register(
            "source_errors",
            "Errors reading the cluster state (watch errors, manifests that do not load)",
            m.source_errors.clone(),
        );
        r.register(
            "source_snapshots",
            "Consistent views of the cluster state received from the source",
            m.source_snapshots.clone(),
        );
        r.register(
            "source_relists",
            "Full relists of a watched kind after the first (watch restarts after 410 Gone or \
             a failed list)",
            m.source_relists.clone(),
        );
        m
    }
}

/// Reads the maps into the scrape-time series. Owns its own handles on the pinned maps, so it
/// runs on a blocking thread beside the agent's loop.
pub struct Sampler {
    maps: Maps,
    config: DatapathConfig,
    source: SourceStats,
    snapshots: SnapshotReceiver,
    node_port_range: ledger::NodePortRange,
    series: Sampled,
    /// Whether the per-service series are exported (`--metrics-per-service`).
    per_service: bool,
    ledger: ledger::metrics::LedgerMetrics,
    /// Last sampled totals of the global counters, to turn map totals into increments.
    last: BTreeMap<&'static str, u64>,
    /// The snapshot revision the range gauges were computed from.
    ledger_revision: Option<u64>,
    snat: SnatExported,
}

impl Sampler {
    /// Registers the scrape-time series. `maps` are handles of their own on the datapath's
    /// maps (`Maps::share`). Without `per_service`, the per-service series
    /// (`nodeport_service_packets_total`, `nodeport_service_bytes_total`: four per service
    /// port) are neither registered nor read.
    pub fn register(
        registry: &mut Registry,
        maps: Maps,
        config: DatapathConfig,
        source: SourceStats,
        snapshots: SnapshotReceiver,
        node_port_range: ledger::NodePortRange,
        per_service: bool,
    ) -> Self {
        Self {
            maps,
            config,
            source,
            snapshots,
            node_port_range,
            series: Sampled::register(registry, per_service),
            per_service,
            ledger: ledger::metrics::LedgerMetrics::register(registry),
            last: BTreeMap::new(),
            ledger_revision: None,
            snat: SnatExported::default(),
        }
    }

    fn add(&mut self, key: &'static str, total: u64, counter: &Counter) {
        let previous = self.last.insert(key, total).unwrap_or(0);
        counter.inc_by(increase(previous, total));
    }

    /// Reads everything the scrape-time series show. Errors reading one map leave its series
    /// as they were (and are logged); the rest is still read.
    pub fn sample(&mut self) {
        let series = self.series.clone();
        for (counter, total) in dump::counter_values(&self.maps) {
            let exported = match PacketLabels::of(counter) {
                Some(labels) => series.datapath_packets.get_or_create_owned(&labels),
                None => series.conntrack_events.get_or_create_owned(&EventLabels {
                    event: counter.label().into(),
                }),
            };
            self.add(counter.label(), total, &exported);
        }
        if self.per_service {
            self.sample_services(&series);
        }
        self.sample_fill(&series);
        let totals = self.source.totals();
        self.add("source errors", totals.errors, &series.source_errors);
        self.add(
            "source snapshots",
            totals.snapshots,
            &series.source_snapshots,
        );
        self.add("source relists", totals.relists, &series.source_relists);
        self.sample_ledger();
    }

    fn sample_services(&mut self, series: &Sampled) {
        let mut services: BTreeMap<ServicePortKey, u32> = BTreeMap::new();
        let read = census::for_each_entry::<u32, SvcName>(self.maps.svc_names.map(), |id, name| {
            if let Some(key) = sync::key_of(name) {
                services.insert(key, *id);
            }
        });
        if let Err(e) = read {
            tracing::warn!(error = %e, "metrics: reading the service names");
            return;
        }
        // Every service's statistics in a few syscalls rather than one per service.
        let mut stats: HashMap<u32, [u64; 4]> = HashMap::with_capacity(services.len());
        let read =
            census::for_each_per_cpu::<u32, SvcStats>(self.maps.svc_stats.map(), |id, per_cpu| {
                let mut totals = [0u64; 4];
                for s in per_cpu {
                    totals[0] += s.packets;
                    totals[1] += s.bytes;
                    totals[2] += s.reply_packets;
                    totals[3] += s.reply_bytes;
                }
                stats.insert(*id, totals);
            });
        if let Err(e) = read {
            tracing::warn!(error = %e, "metrics: reading the per-service statistics");
            return;
        }
        let mut exported = series.services.write();
        for (key, id) in &services {
            let Some(totals) = stats.get(id).copied() else {
                continue;
            };
            match exported.get_mut(key) {
                Some(counts) => counts.add(totals),
                None => {
                    let mut counts = ServiceCounts::default();
                    counts.add(totals);
                    exported.insert(key.clone(), counts);
                }
            }
        }
        // Deleted services' series go, so a cluster with churning services does not grow the
        // scrape without bound.
        exported.retain(|key, _| services.contains_key(key));
    }

    fn sample_fill(&mut self, series: &Sampled) {
        let now = datapath::jiffies_now(self.config.hz);
        let fill = match census::fill(&self.maps, &self.config, now) {
            Ok(fill) => fill,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: reading the maps' fill levels");
                return;
            }
        };
        let ct = &fill.conntrack;
        for (map, t) in [
            (nodeport_common::names::CONNTRACK, &ct.established),
            (nodeport_common::names::CONNTRACK_NEW, &ct.handshake),
        ] {
            for (state, n) in [("live", t.live), ("expired", t.entries - t.live)] {
                let labels = TableStateLabels {
                    map: map.into(),
                    state: state.into(),
                };
                series
                    .conntrack_entries
                    .get_or_create(&labels)
                    .set(n as i64);
            }
        }
        series.conntrack_connections.set(ct.connections as i64);
        self.snat.set(series, &ct.snat);
        for m in &fill.maps {
            let labels = MapLabels { map: m.name.into() };
            series
                .map_capacity
                .get_or_create(&labels)
                .set(m.capacity as i64);
            if let Some(used) = m.used {
                series.map_entries.get_or_create(&labels).set(used as i64);
            }
            if let Some(bytes) = m.memory_bytes {
                series.map_memory.get_or_create(&labels).set(bytes as i64);
            }
        }
    }

    /// The range gauges, recomputed when the cluster state changed.
    fn sample_ledger(&mut self) {
        let Some(snapshot) = self.snapshots.borrow().clone() else {
            return;
        };
        if self.ledger_revision == Some(snapshot.revision) {
            return;
        }
        let local =
            ledger::read_local_port_range(std::path::Path::new(ledger::IP_LOCAL_PORT_RANGE));
        let report = ledger::analyze(&self.node_port_range, &snapshot.services, local);
        self.ledger.update(&report);
        self.ledger_revision = Some(snapshot.revision);
    }
}

/// The SNAT census's series, exported last time, so those that went are removed (an
/// address or backend holding no port any more) without clearing the families, which a
/// concurrent scrape could then see empty.
#[derive(Default)]
struct SnatExported {
    addresses: HashSet<SnatAddressLabels>,
    backends: HashSet<SnatBackendLabels>,
}

impl SnatExported {
    /// Sets the SNAT series to `snat`. The busiest-backends family stays at
    /// `SNAT_TOP_BACKENDS` series at most.
    fn set(&mut self, series: &Sampled, snat: &datapath::SnatCensus) {
        series
            .snat_port_capacity
            .set(snat.capacity_per_backend as i64);
        let mut addresses = HashSet::new();
        for a in &snat.addresses {
            let labels = SnatAddressLabels {
                snat_address: a.address.clone(),
            };
            series.snat_ports.get_or_create(&labels).set(a.ports as i64);
            series
                .snat_ports_max_per_backend
                .get_or_create(&labels)
                .set(a.max_per_backend as i64);
            addresses.insert(labels);
        }
        let mut backends = HashSet::new();
        for b in &snat.busiest_backends {
            let labels = SnatBackendLabels {
                snat_address: b.snat_address.clone(),
                backend: b.backend.clone(),
                protocol: b.protocol.into(),
            };
            series
                .snat_ports_busiest
                .get_or_create(&labels)
                .set(b.ports as i64);
            backends.insert(labels);
        }
        for gone in self.addresses.difference(&addresses) {
            series.snat_ports.remove(gone);
            series.snat_ports_max_per_backend.remove(gone);
        }
        for gone in self.backends.difference(&backends) {
            series.snat_ports_busiest.remove(gone);
        }
        self.addresses = addresses;
        self.backends = backends;
    }
}

/// A [`Sampler`] shared by concurrent scrapes.
pub struct Sampling {
    sampler: Mutex<Sampler>,
    /// Samples completed.
    completed: AtomicU64,
}

impl Sampling {
    pub fn new(sampler: Sampler) -> Self {
        Self {
            sampler: Mutex::new(sampler),
            completed: AtomicU64::new(0),
        }
    }

    /// Reads `maps` from now on (the datapath was attached again: new maps).
    pub fn replace_maps(&self, maps: Maps) {
        self.sampler.lock().expect("not poisoned").maps = maps;
    }

    /// Samples, unless another scrape's sample completed while this one waited for it.
    pub fn sample_once(&self) {
        let seen = self.completed.load(Ordering::Acquire);
        let mut sampler = self.sampler.lock().expect("not poisoned");
        if self.completed.load(Ordering::Acquire) != seen {
            return;
        }
        sampler.sample();
        self.completed.fetch_add(1, Ordering::Release);
    }
}

/// A counter's increase from `previous` to `total`. A total below the last sample means the
/// maps were recreated: count from zero.
fn increase(previous: u64, total: u64) -> u64 {
    if total >= previous {
        total - previous
    } else {
        total
    }
}

/// One service port's counters: packets and bytes, in and out, as exported, and the map
/// totals last added to them.
#[derive(Debug, Default)]
struct ServiceCounts {
    /// packets in, bytes in, packets out, bytes out (as `SvcStats` orders them).
    exported: [u64; 4],
    last: [u64; 4],
}

impl ServiceCounts {
    fn add(&mut self, totals: [u64; 4]) {
        for ((exported, last), total) in self.exported.iter_mut().zip(&mut self.last).zip(totals) {
            *exported = exported.wrapping_add(increase(*last, total));
            *last = total;
        }
    }
}

/// The per-service series: what the sampler last read for each service port, encoded at
/// scrape time by the two [`ServiceFamily`]s. A `Family` per metric would keep a label set
/// of five strings and a counter per series, in hash tables (four series per service port:
/// about 1.7 kB a service port, 110 MiB at 65,536 Services); this keeps one key and eight
/// numbers.
#[derive(Clone, Debug, Default)]
struct ServiceSeries(Arc<RwLock<BTreeMap<ServicePortKey, ServiceCounts>>>);

impl ServiceSeries {
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<ServicePortKey, ServiceCounts>> {
        self.0.read().expect("not poisoned")
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<ServicePortKey, ServiceCounts>> {
        self.0.write().expect("not poisoned")
    }
}

#[derive(Clone, Copy, Debug)]
enum ServiceCount {
    Packets,
    Bytes,
}

/// `nodeport_service_packets` or `nodeport_service_bytes`: a counter per service port and
/// direction, labelled as a `Family` would label it.
#[derive(Debug)]
struct ServiceFamily {
    series: ServiceSeries,
    of: ServiceCount,
}

impl EncodeMetric for ServiceFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (inbound, outbound) = match self.of {
            ServiceCount::Packets => (0, 2),
            ServiceCount::Bytes => (1, 3),
        };
        for (key, counts) in self.series.read().iter() {
            let protocol = match key.protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
            };
            for (direction, at) in [("in", inbound), ("out", outbound)] {
                let labels = [
                    ("namespace", &*key.namespace),
                    ("service", &*key.name),
                    ("port", &*key.port_name),
                    ("protocol", protocol),
                    ("direction", direction),
                ];
                encoder
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&counts.exported[at], None)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }

    /// No series, no descriptor (as an empty `Family`).
    fn is_empty(&self) -> bool {
        self.series.read().is_empty()
    }
}

/// Serves `/metrics` until the task is dropped. Each scrape first has `sampler` read the maps
/// (on a blocking thread), then encodes, in OpenMetrics or the Prometheus text format as the
/// scraper's `Accept` header asks ([`exposition::Format::negotiate`]).
///
/// Concurrent scrapes share one sample: a scrape that waited for another one's sample to
/// finish serves that one instead of reading the maps again (a full connection table takes
/// a noticeable fraction of a second to read; docs/operations.md, "Metrics").
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    sampler: Arc<Sampling>,
) -> std::io::Result<()> {
    use axum::{
        Router,
        http::{HeaderMap, header},
        response::IntoResponse,
        routing::get,
    };
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let registry = registry.clone();
            let sampler = sampler.clone();
            async move {
                let sampled = tokio::task::spawn_blocking(move || sampler.sample_once()).await;
                if let Err(e) = sampled {
                    tracing::error!(error = %e, "metrics: sampling the maps failed");
                }
                let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let format = exposition::Format::negotiate(accept);
                let body = exposition::render(&registry, format);
                ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
            }
        }),
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::datapath::{
        SnatCensus,
        census::{SnatAddressUsage, SnatBackendUsage},
    };

    fn census(backends: &[(&str, u64)]) -> SnatCensus {
        SnatCensus {
            capacity_per_backend: 33_512,
            addresses: vec![SnatAddressUsage {
                address: "198.18.0.1".into(),
                ports: backends.iter().map(|(_, n)| n).sum(),
                backends: backends.len() as u64,
                max_per_backend: backends.iter().map(|(_, n)| *n).max().unwrap_or(0),
            }],
            busiest_backends: backends
                .iter()
                .map(|(b, n)| SnatBackendUsage {
                    snat_address: "198.18.0.1".into(),
                    backend: (*b).into(),
                    protocol: "TCP",
                    ports: *n,
                })
                .collect(),
        }
    }

    fn text(registry: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, registry).unwrap();
        s
    }

    /// Every metric the agent registers without the maps, with a series in each family
    /// whose series come and go (services, SNAT), as a scrape of a busy agent shows them.
    fn full_registry() -> Registry {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.programming_seconds.observe(0.3);
        let series = Sampled::register(&mut registry, true);
        let mut counts = ServiceCounts::default();
        counts.add([3, 300, 2, 200]);
        series.services.write().insert(
            ServicePortKey {
                namespace: "shop".into(),
                name: "web".into(),
                port_name: "".into(),
                protocol: Protocol::Tcp,
            },
            counts,
        );
        SnatExported::default().set(&series, &census(&[("10.2.0.1:8080", 7)]));
        ledger::metrics::LedgerMetrics::register(&mut registry);
        registry
    }

    /// The series every scrape has from the start, before anything happened: the datapath's
    /// counters by the enum, not by a list kept by hand.
    #[test]
    fn counters_exist_at_zero_from_the_start() {
        let mut registry = Registry::default();
        Metrics::register(&mut registry);
        Sampled::register(&mut registry, true);
        let text = text(&registry);
        let mut expected: Vec<String> = DatapathCounter::ALL
            .iter()
            .map(|&c| match PacketLabels::of(c) {
                Some(l) => format!(
                    "nodeport_datapath_packets_total{{reason=\"{}\",kind=\"{}\"}} 0",
                    l.reason, l.kind
                ),
                None => format!(
                    "nodeport_conntrack_events_total{{event=\"{}\"}} 0",
                    c.label()
                ),
            })
            .collect();
        expected.extend(
            SYNC_FAILURE_REASONS
                .map(|r| format!("nodeport_sync_failures_total{{reason=\"{r}\"}} 0")),
        );
        for map in ["NP_CT", "NP_CT_NEW"] {
            expected.push(format!(
                "nodeport_conntrack_gc_deleted_entries_total{{map=\"{map}\"}} 0"
            ));
        }
        for kind in NoticeKind::ALL {
            expected.push(format!("nodeport_skipped{{kind=\"{}\"}} 0", kind.label()));
        }
        expected.push("nodeport_network_programming_duration_seconds_count 0".into());
        for line in &expected {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // The drop reasons of docs/operations.md's examples, under `reason`.
        for line in [
            "nodeport_datapath_packets_total{reason=\"snat_port_exhausted\",kind=\"dropped\"} 0",
            "nodeport_conntrack_events_total{event=\"conntrack_promote_failed\"} 0",
        ] {
            assert!(expected.iter().any(|l| l == line), "{line}");
        }
        assert!(!text.contains("path="), "{text}");
    }

    #[test]
    fn per_service_series_can_be_left_out() {
        for per_service in [true, false] {
            let mut registry = Registry::default();
            let series = Sampled::register(&mut registry, per_service);
            let mut counts = ServiceCounts::default();
            counts.add([3, 300, 2, 200]);
            series.services.write().insert(
                ServicePortKey {
                    namespace: "shop".into(),
                    name: "web".into(),
                    port_name: "http".into(),
                    protocol: Protocol::Tcp,
                },
                counts,
            );
            let text = text(&registry);
            assert_eq!(
                text.contains("nodeport_service_packets_total{"),
                per_service,
                "{text}"
            );
            assert_eq!(text.contains("nodeport_service_bytes_total{"), per_service);
            // The rest stays.
            assert!(text.contains("nodeport_datapath_packets_total{"), "{text}");
        }
    }

    /// Help texts escape nothing (prometheus-client writes them as they are): a quote or a
    /// backslash would make the OpenMetrics text invalid. Every family has its help and type,
    /// in both formats, and the process metrics are there.
    #[test]
    fn every_family_has_help_and_type_in_both_formats() {
        let registry = full_registry();
        for format in [
            exposition::Format::OpenMetrics,
            exposition::Format::PrometheusText,
        ] {
            let text = exposition::render(&registry, format);
            let mut helped = HashSet::new();
            let mut typed = HashMap::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# HELP ") {
                    let (name, help) = rest.split_once(' ').unwrap();
                    assert!(help.len() > 10, "{line}");
                    assert!(!help.contains(['"', '\\']), "{line}");
                    helped.insert(name.to_owned());
                } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let (name, kind) = rest.split_once(' ').unwrap();
                    typed.insert(name.to_owned(), kind.to_owned());
                } else if !line.starts_with('#') {
                    let sample = line.split(['{', ' ']).next().unwrap();
                    let family = match format {
                        exposition::Format::OpenMetrics => {
                            ["_total", "_bucket", "_sum", "_count", ""]
                                .iter()
                                .find_map(|s| {
                                    sample.strip_suffix(s).filter(|f| typed.contains_key(*f))
                                })
                        }
                        exposition::Format::PrometheusText => {
                            ["_bucket", "_sum", "_count", ""].iter().find_map(|s| {
                                sample.strip_suffix(s).filter(|f| typed.contains_key(*f))
                            })
                        }
                    };
                    let family = family.unwrap_or_else(|| panic!("{format:?}: {line}: no TYPE"));
                    assert!(helped.contains(family), "{format:?}: {line}: no HELP");
                    if format == exposition::Format::PrometheusText && typed[family] == "counter" {
                        assert!(family.ends_with("_total"), "{line}");
                    }
                }
            }
            for name in [
                "process_cpu_seconds",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_start_time_seconds",
                "nodeport_network_programming_duration_seconds",
                "nodeport_sync_duration_seconds",
            ] {
                let name = match (format, name) {
                    (exposition::Format::PrometheusText, "process_cpu_seconds") => {
                        "process_cpu_seconds_total"
                    }
                    _ => name,
                };
                assert!(typed.contains_key(name), "{format:?}: no {name} in\n{text}");
            }
        }
    }

    #[test]
    fn service_series_are_counters_per_port_and_direction() {
        let mut registry = Registry::default();
        let series = Sampled::register(&mut registry, true);
        let text = |registry: &Registry| {
            let mut s = String::new();
            encode(&mut s, registry).unwrap();
            s
        };
        assert!(
            !text(&registry).contains("service_packets"),
            "no service, no descriptor (as an empty family)"
        );
        let key = ServicePortKey {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Udp,
        };
        let mut counts = ServiceCounts::default();
        counts.add([3, 300, 2, 200]);
        // The datapath's totals only grow; the exported counters add the increase.
        counts.add([5, 500, 2, 250]);
        series.services.write().insert(key.clone(), counts);
        let first = text(&registry);
        for line in [
            "# TYPE nodeport_service_packets counter",
            "nodeport_service_packets_total{namespace=\"shop\",service=\"web\",port=\"http\",protocol=\"UDP\",direction=\"in\"} 5",
            "nodeport_service_packets_total{namespace=\"shop\",service=\"web\",port=\"http\",protocol=\"UDP\",direction=\"out\"} 2",
            "nodeport_service_bytes_total{namespace=\"shop\",service=\"web\",port=\"http\",protocol=\"UDP\",direction=\"in\"} 500",
            "nodeport_service_bytes_total{namespace=\"shop\",service=\"web\",port=\"http\",protocol=\"UDP\",direction=\"out\"} 250",
        ] {
            assert!(first.lines().any(|l| l == line), "{line}\n{first}");
        }
        // Maps recreated (totals below the last sample): counted from zero, never backwards.
        series
            .services
            .write()
            .get_mut(&key)
            .unwrap()
            .add([1, 100, 0, 0]);
        assert!(text(&registry).contains("direction=\"in\"} 6"));
        series.services.write().clear();
        assert!(!text(&registry).contains("service_bytes"));
    }

    #[test]
    fn snat_series_follow_the_census_and_drop_what_went() {
        let mut registry = Registry::default();
        let series = Sampled::register(&mut registry, true);
        let mut exported = SnatExported::default();
        let text = |registry: &Registry| {
            let mut s = String::new();
            encode(&mut s, registry).unwrap();
            s
        };
        exported.set(
            &series,
            &census(&[("10.2.0.1:8080", 7), ("10.2.0.2:8080", 3)]),
        );
        let first = text(&registry);
        for line in [
            "nodeport_snat_port_capacity 33512",
            "nodeport_snat_ports_in_use{snat_address=\"198.18.0.1\"} 10",
            "nodeport_snat_ports_max_per_backend{snat_address=\"198.18.0.1\"} 7",
            "nodeport_snat_ports_in_use_by_backend{snat_address=\"198.18.0.1\",backend=\"10.2.0.2:8080\",protocol=\"TCP\"} 3",
        ] {
            assert!(first.lines().any(|l| l == line), "{line}\n{first}");
        }
        // 10.2.0.2 holds no port any more: its series goes; no address at all: neither.
        exported.set(&series, &census(&[("10.2.0.1:8080", 5)]));
        let second = text(&registry);
        assert!(!second.contains("10.2.0.2:8080"), "{second}");
        assert!(
            second.contains("backend=\"10.2.0.1:8080\",protocol=\"TCP\"} 5"),
            "{second}"
        );
        exported.set(&series, &SnatCensus::default());
        let third = text(&registry);
        assert!(!third.contains("snat_address="), "{third}");
    }
}
