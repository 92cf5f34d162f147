//! The agent's Prometheus metrics (served on --metrics-bind-address, `/metrics`).
//!
//! Datapath counters live in per-CPU maps; the agent samples them every few seconds and adds
//! the increase to its own counters, so the exported series are ordinary monotonic counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

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
    datapath::Maps,
    dump,
    model::{NoticeKind, ServicePortKey},
    sync::SyncReport,
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

/// Metric handles the agent updates. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub sync_seconds: Histogram,
    pub sync_failures: Family<ReasonLabels, Counter>,
    pub services: Gauge,
    pub backends: Gauge,
    pub health_checks: Gauge,
    pub notices: Family<KindLabels, Gauge>,
    pub datapath_packets: Family<PathLabels, Counter>,
    pub service_packets: Family<ServiceLabels, Counter>,
    pub service_bytes: Family<ServiceLabels, Counter>,
    pub source_errors: Counter,
    pub source_snapshots: Counter,
    /// Last sampled values, to turn map totals into counter increments.
    last: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Services whose series are exported, to drop the series of deleted ones.
    exported: Arc<Mutex<BTreeSet<ServicePortKey>>>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            sync_failures: Family::default(),
            services: Gauge::default(),
            backends: Gauge::default(),
            health_checks: Gauge::default(),
            notices: Family::default(),
            datapath_packets: Family::default(),
            service_packets: Family::default(),
            service_bytes: Family::default(),
            source_errors: Counter::default(),
            source_snapshots: Counter::default(),
            last: Arc::default(),
            exported: Arc::default(),
        };
        let r = registry.sub_registry_with_prefix("nodeport");
        r.register(
            "sync_duration_seconds",
            "Time to bring the maps to a new desired state",
            m.sync_seconds.clone(),
        );
        r.register(
            "sync_failures",
            "Services that could not be programmed, by reason (map_full: a map is at capacity)",
            m.sync_failures.clone(),
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
        r.register(
            "datapath_packets",
            "Packets seen by the datapath, by what happened to them",
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
            "source_errors",
            "Errors reading the cluster state (watch errors, invalid manifests)",
            m.source_errors.clone(),
        );
        r.register(
            "source_snapshots",
            "Consistent views of the cluster state received from the source",
            m.source_snapshots.clone(),
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

    fn add(&self, key: String, total: u64, counter: &Counter) {
        let mut last = self.last.lock().expect("not poisoned");
        let previous = last.insert(key, total).unwrap_or(0);
        // A total below the last sample means the maps were recreated: count from zero.
        counter.inc_by(if total >= previous {
            total - previous
        } else {
            total
        });
    }

    /// Samples the datapath's counters into the exported ones.
    ///
    /// `services` maps each programmed service port to its id; `source` is the source's
    /// running totals (errors, snapshots). The connection table is not counted here: walking
    /// a map of hundreds of thousands of entries every few seconds costs more than the
    /// number is worth (`nodeport dump --stats` counts it on demand).
    pub fn sample(
        &self,
        maps: &Maps,
        services: &BTreeMap<ServicePortKey, u32>,
        source: (u64, u64),
    ) {
        for (counter, total) in dump::counter_values(maps) {
            let kind = match counter.kind() {
                nodeport_common::counters::CounterKind::Forwarded => "forwarded",
                nodeport_common::counters::CounterKind::Passed => "passed",
                nodeport_common::counters::CounterKind::Fallback => "fallback",
                nodeport_common::counters::CounterKind::Dropped => "dropped",
            };
            let labels = PathLabels {
                path: counter.label().into(),
                kind: kind.into(),
            };
            self.add(
                format!("c/{}", counter.label()),
                total,
                &self.datapath_packets.get_or_create(&labels),
            );
        }
        for (key, id) in services {
            let Ok(per_cpu) = maps.svc_stats.get(id, 0) else {
                continue;
            };
            let (mut p, mut b, mut rp, mut rb) = (0, 0, 0, 0);
            for s in per_cpu.iter() {
                p += s.packets;
                b += s.bytes;
                rp += s.reply_packets;
                rb += s.reply_bytes;
            }
            for (direction, packets, bytes) in [("in", p, b), ("out", rp, rb)] {
                let labels = service_labels(key, direction);
                self.add(
                    format!("sp/{key}/{direction}"),
                    packets,
                    &self.service_packets.get_or_create(&labels),
                );
                self.add(
                    format!("sb/{key}/{direction}"),
                    bytes,
                    &self.service_bytes.get_or_create(&labels),
                );
            }
        }
        self.forget_deleted(services);
        let (errors, snapshots) = source;
        self.add("src/errors".into(), errors, &self.source_errors);
        self.add("src/snapshots".into(), snapshots, &self.source_snapshots);
    }

    /// Drops the series of services no longer programmed, so a cluster with churning
    /// services does not grow the scrape without bound.
    fn forget_deleted(&self, services: &BTreeMap<ServicePortKey, u32>) {
        let mut exported = self.exported.lock().expect("not poisoned");
        let mut last = self.last.lock().expect("not poisoned");
        for key in exported.iter().filter(|k| !services.contains_key(*k)) {
            for direction in ["in", "out"] {
                let labels = service_labels(key, direction);
                self.service_packets.remove(&labels);
                self.service_bytes.remove(&labels);
                last.remove(&format!("sp/{key}/{direction}"));
                last.remove(&format!("sb/{key}/{direction}"));
            }
        }
        *exported = services.keys().cloned().collect();
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

/// Serves `/metrics` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
) -> std::io::Result<()> {
    use axum::{Router, http::header, response::IntoResponse, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
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
