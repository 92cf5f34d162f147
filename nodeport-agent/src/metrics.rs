//! The agent's Prometheus metrics (served on --metrics-bind-address, `/metrics`).
//!
//! Two kinds of series: those the agent's loop sets as it works (sync durations and failures,
//! what is programmed), and those read from the maps **at scrape time** by a [`Sampler`] on a
//! blocking thread with its own map handles, so a scrape always sees the datapath as it is and
//! never holds up the agent's loop. Datapath counters live in per-CPU maps; the sampler adds
//! their increase since the last scrape to its own counters, so the exported series are
//! ordinary monotonic counters (a map that restarts from zero is counted from zero).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use aya::maps::IterableMap as _;
use nodeport_common::{DatapathConfig, SvcName, SvcStats, counters::CounterKind};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
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
    model::{NoticeKind, ServicePortKey},
    source::{SnapshotReceiver, SourceStats},
    sync::{self, SyncReport},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// What happened to the packets (nodeport_common::Counter labels).
    pub path: String,
    /// forwarded, passed, fallback or dropped.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub protocol: String,
    pub direction: String,
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
pub struct VersionLabels {
    pub version: String,
}

/// Series the agent's loop sets as it works. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub sync_seconds: Histogram,
    pub sync_failures: Family<ReasonLabels, Counter>,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub services: Gauge,
    pub backends: Gauge,
    pub health_checks: Gauge,
    pub notices: Family<KindLabels, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            sync_failures: Family::default(),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            backends: Gauge::default(),
            health_checks: Gauge::default(),
            notices: Family::default(),
        };
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
            "Things in the cluster state not programmed, by kind",
            m.notices.clone(),
        );
        m
    }

    pub fn record_sync(&self, report: &SyncReport, seconds: f64) {
        self.sync_seconds.observe(seconds);
        for (_, e) in &report.failed {
            let reason = if e.is_full() { "map_full" } else { "error" };
            self.sync_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc();
        }
        if report.failed.is_empty() {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_sync.set(now);
        }
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

/// Series read at scrape time.
#[derive(Clone, Default)]
struct Sampled {
    datapath_packets: Family<PathLabels, Counter>,
    service_packets: Family<ServiceLabels, Counter>,
    service_bytes: Family<ServiceLabels, Counter>,
    conntrack_entries: Family<StateLabels, Gauge>,
    conntrack_connections: Gauge,
    snat_ports: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    map_memory: Family<MapLabels, Gauge>,
    source_errors: Counter,
    source_snapshots: Counter,
    source_relists: Counter,
}

impl Sampled {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("nodeport");
        r.register(
            "datapath_packets",
            "Packets seen by the datapath, by what happened to them (kind=\"dropped\": drops by \
             reason)",
            m.datapath_packets.clone(),
        );
        r.register(
            "service_packets",
            "Packets per service port and direction",
            m.service_packets.clone(),
        );
        r.register(
            "service_bytes",
            "Bytes (IP length) per service port and direction",
            m.service_bytes.clone(),
        );
        r.register(
            "conntrack_entries",
            "Connection tracking entries (both directions) by state: live, or expired and \
             waiting for the LRU to reuse them",
            m.conntrack_entries.clone(),
        );
        r.register(
            "conntrack_connections",
            "Live connections in the connection table",
            m.conntrack_connections.clone(),
        );
        r.register(
            "snat_ports_in_use",
            "SNAT source ports held by live connections to remote backends",
            m.snat_ports.clone(),
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
    ledger: ledger::metrics::LedgerMetrics,
    /// Last sampled totals of the global counters, to turn map totals into increments.
    last: BTreeMap<&'static str, u64>,
    /// The series of each exported service and the totals last added to them.
    exported: HashMap<ServicePortKey, ServiceSeries>,
    /// The snapshot revision the range gauges were computed from.
    ledger_revision: Option<u64>,
}

impl Sampler {
    /// Registers the scrape-time series. `maps` are handles of their own on the datapath's
    /// maps (`Maps::share`).
    pub fn register(
        registry: &mut Registry,
        maps: Maps,
        config: DatapathConfig,
        source: SourceStats,
        snapshots: SnapshotReceiver,
        node_port_range: ledger::NodePortRange,
    ) -> Self {
        Self {
            maps,
            config,
            source,
            snapshots,
            node_port_range,
            series: Sampled::register(registry),
            ledger: ledger::metrics::LedgerMetrics::register(registry),
            last: BTreeMap::new(),
            exported: HashMap::new(),
            ledger_revision: None,
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
            let kind = match counter.kind() {
                CounterKind::Forwarded => "forwarded",
                CounterKind::Passed => "passed",
                CounterKind::Fallback => "fallback",
                CounterKind::Dropped => "dropped",
            };
            let labels = PathLabels {
                path: counter.label().into(),
                kind: kind.into(),
            };
            self.add(
                counter.label(),
                total,
                &series.datapath_packets.get_or_create(&labels),
            );
        }
        self.sample_services(&series);
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
        for (key, id) in &services {
            let Some(totals) = stats.get(id).copied() else {
                continue;
            };
            let exported = self
                .exported
                .entry(key.clone())
                .or_insert_with(|| ServiceSeries::new(series, key));
            exported.add(totals);
        }
        // Deleted services' series go, so a cluster with churning services does not grow the
        // scrape without bound.
        self.exported.retain(|key, exported| {
            let keep = services.contains_key(key);
            if !keep {
                exported.remove(series, key);
            }
            keep
        });
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
        let ct = fill.conntrack;
        let state = |s: &str| StateLabels { state: s.into() };
        series
            .conntrack_entries
            .get_or_create(&state("live"))
            .set(ct.live as i64);
        series
            .conntrack_entries
            .get_or_create(&state("expired"))
            .set((ct.entries - ct.live) as i64);
        series.conntrack_connections.set(ct.connections as i64);
        series.snat_ports.set(ct.snat_ports as i64);
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

/// One service's four series (packets and bytes, in and out), kept between scrapes so a
/// scrape does not rebuild their labels.
struct ServiceSeries {
    counters: [Counter; 4],
    /// packets in, bytes in, packets out, bytes out, as last added.
    last: [u64; 4],
}

impl ServiceSeries {
    fn new(series: &Sampled, key: &ServicePortKey) -> Self {
        // One statement each: get_or_create returns a read guard of the family, and a guard
        // still alive when the same family creates another series would deadlock (the guard
        // of a closure's tail expression goes when the closure returns, edition 2024).
        let counter = |family: &Family<ServiceLabels, Counter>, direction: &str| {
            family
                .get_or_create(&service_labels(key, direction))
                .clone()
        };
        let packets_in = counter(&series.service_packets, "in");
        let bytes_in = counter(&series.service_bytes, "in");
        let packets_out = counter(&series.service_packets, "out");
        let bytes_out = counter(&series.service_bytes, "out");
        Self {
            counters: [packets_in, bytes_in, packets_out, bytes_out],
            last: [0; 4],
        }
    }

    fn add(&mut self, totals: [u64; 4]) {
        for ((counter, last), total) in self.counters.iter().zip(&mut self.last).zip(totals) {
            counter.inc_by(increase(*last, total));
            *last = total;
        }
    }

    fn remove(&self, series: &Sampled, key: &ServicePortKey) {
        for direction in ["in", "out"] {
            let labels = service_labels(key, direction);
            series.service_packets.remove(&labels);
            series.service_bytes.remove(&labels);
        }
    }
}

fn service_labels(key: &ServicePortKey, direction: &str) -> ServiceLabels {
    ServiceLabels {
        namespace: key.namespace.clone(),
        service: key.name.clone(),
        port: key.port_name.clone(),
        protocol: key.protocol.to_string(),
        direction: direction.into(),
    }
}

/// Serves `/metrics` until the task is dropped. Each scrape first has `sampler` read the maps
/// (on a blocking thread), then encodes.
///
/// Concurrent scrapes share one sample: a scrape that waited for another one's sample to
/// finish serves that one instead of reading the maps again (a full connection table takes
/// a noticeable fraction of a second to read; docs/operations.md, "Metrics").
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    sampler: Arc<Sampling>,
) -> std::io::Result<()> {
    use axum::{Router, http::header, response::IntoResponse, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            let sampler = sampler.clone();
            async move {
                let sampled = tokio::task::spawn_blocking(move || sampler.sample_once()).await;
                if let Err(e) = sampled {
                    tracing::error!(error = %e, "metrics: sampling the maps failed");
                }
                let mut body = String::new();
                let _ = encode(&mut body, &registry);
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app).await
}
