//! What the agent cannot do and keeps retrying: Service ports the datapath refuses (more
//! backends than a Maglev table has slots, a full map, a failed map write) and health-check node
//! ports it cannot bind (kube-proxy holds them). The agent retries both on every round, at
//! least every 30 seconds; this module makes each one reported once per change instead:
//!
//! - a log line when a refusal appears or its reason changes, and one when it ends;
//! - gauges (`nodeport_service_ports_refused{reason}`, `nodeport_health_check_ports_unserved`);
//! - markers under the pins, for `nodeport-agent status` (its `failing` list);
//! - with the Kubernetes API, an Event on the Service ([`ServiceEvents`]).
//!
//! A refused Service is no reason to restart the agent (a restart would refuse it again):
//! `/livez` and `/readyz` ignore it; `/healthz` keeps kube-proxy's rule (docs/health.md).

use std::collections::{BTreeMap, BTreeSet};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{model::ServicePortKey, sync::SyncError};

/// Why a Service port is refused, and the message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `too_many_backends`, `map_full`, `map_error` or `io_error` (the gauge's label).
    pub reason: &'static str,
    pub message: String,
}

impl From<&SyncError> for Refused {
    fn from(e: &SyncError) -> Self {
        let reason = match e {
            SyncError::TooManyBackends { .. } => "too_many_backends",
            SyncError::Full { .. } => "map_full",
            SyncError::Map { .. } => "map_error",
            SyncError::Io { .. } => "io_error",
        };
        Self {
            reason,
            message: e.to_string(),
        }
    }
}

/// The reasons the gauge always reports (0 when none).
const REASONS: [&str; 4] = ["too_many_backends", "map_full", "map_error", "io_error"];

/// What changed since the last round.
#[derive(Debug, PartialEq, Eq)]
pub struct Changes<K> {
    /// Refused now and not before, or for another reason (with the new one).
    pub refused: Vec<(K, String)>,
    /// Refused before, not any more (programmed, or gone from the cluster).
    pub cleared: Vec<K>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Self {
            refused: Vec::new(),
            cleared: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The refusals in force, and their gauges.
#[derive(Default)]
pub struct Refusals {
    services: BTreeMap<ServicePortKey, Refused>,
    ports: BTreeMap<u16, String>,
    services_gauge: Family<ReasonLabels, Gauge>,
    ports_gauge: Gauge,
}

fn diff<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    text: impl Fn(&V) -> String,
) -> Changes<K> {
    Changes {
        refused: new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), text(v)))
            .collect(),
        cleared: old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect(),
    }
}

impl Refusals {
    pub fn new() -> Self {
        let refusals = Self::default();
        refusals.set_gauges();
        refusals
    }

    /// Registers `nodeport_service_ports_refused{reason}` and
    /// `nodeport_health_check_ports_unserved` in the agent's registry.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("nodeport");
        r.register(
            "service_ports_refused",
            "Service ports the datapath refuses now, retried on every round, by reason \
             (too_many_backends: raise --maglev-table-size; map_full: raise the flag the log \
             names; map_error, io_error: see the log); each keeps its previous state",
            self.services_gauge.clone(),
        );
        r.register(
            "health_check_ports_unserved",
            "Health-check node ports the agent cannot bind now (kube-proxy holds them, say), \
             retried on every round",
            self.ports_gauge.clone(),
        );
    }

    /// The Service ports refused in this round: all of them, since refused ones are retried
    /// on every round. Returns what changed.
    pub fn set_services(
        &mut self,
        refused: BTreeMap<ServicePortKey, Refused>,
    ) -> Changes<ServicePortKey> {
        let changes = diff(&self.services, &refused, |r| r.message.clone());
        self.services = refused;
        self.set_gauges();
        changes
    }

    /// The health-check node ports that could not be bound in this round, with the error.
    pub fn set_ports(&mut self, unserved: BTreeMap<u16, String>) -> Changes<u16> {
        let changes = diff(&self.ports, &unserved, Clone::clone);
        self.ports = unserved;
        self.set_gauges();
        changes
    }

    pub fn service(&self, key: &ServicePortKey) -> Option<&Refused> {
        self.services.get(key)
    }

    /// The refusals as (kind, object) markers for `status`: the reason and the service port,
    /// `health_check_port_unserved` and the port.
    pub fn markers(&self) -> BTreeSet<(String, String)> {
        let services = self
            .services
            .iter()
            .map(|(key, r)| (r.reason.to_owned(), key.to_string()));
        let ports = self
            .ports
            .keys()
            .map(|port| ("health_check_port_unserved".to_owned(), port.to_string()));
        services.chain(ports).collect()
    }

    fn set_gauges(&self) {
        for reason in REASONS {
            let n = self
                .services
                .values()
                .filter(|r| r.reason == reason)
                .count();
            self.services_gauge
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .set(n as i64);
        }
        self.ports_gauge.set(self.ports.len() as i64);
    }
}

/// Events on Services, with the Kubernetes API (events.k8s.io/v1, as `kubectl describe`
/// shows them): `ServicePortRefused` (Warning) when a port of the Service is refused or refused
/// for another reason, `ServicePortProgrammed` (Normal) when it is programmed again. Published
/// in the background; a failure (RBAC, say) is logged and not retried.
#[derive(Clone)]
pub struct ServiceEvents {
    recorder: kube::runtime::events::Recorder,
}

impl ServiceEvents {
    /// Events reported by `nodeport-agent` on `node_name` (the `reportingController` and
    /// `reportingInstance`).
    pub fn new(client: kube::Client, node_name: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "nodeport-agent".to_owned(),
            instance: Some(node_name.to_owned()),
        };
        Self {
            recorder: kube::runtime::events::Recorder::new(client, reporter),
        }
    }

    /// Publishes an event about `service`'s port `port` (as the status names it); `refused`
    /// with the message, or `None` once it is programmed again.
    pub fn publish(
        &self,
        service: &k8s_openapi::api::core::v1::Service,
        port: &ServicePortKey,
        refused: Option<&str>,
    ) -> tokio::task::JoinHandle<()> {
        use kube::{
            Resource as _,
            runtime::events::{Event, EventType},
        };
        let (type_, reason, note) = match refused {
            Some(message) => (
                EventType::Warning,
                "ServicePortRefused",
                format!("node's datapath refused {port}: {message}; kube-proxy's rules serve it"),
            ),
            None => (
                EventType::Normal,
                "ServicePortProgrammed",
                format!("{port} is programmed in the node's datapath again"),
            ),
        };
        // The API server takes at most 1 kB of note.
        let note: String = note.chars().take(1000).collect();
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Program".to_owned(),
            secondary: None,
        };
        let reference = service.object_ref(&());
        let recorder = self.recorder.clone();
        let port = port.to_string();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(service = %port, error = %e, "publishing an event on the Service");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn key(name: &str) -> ServicePortKey {
        ServicePortKey {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    fn refused(reason: &'static str, message: &str) -> Refused {
        Refused {
            reason,
            message: message.into(),
        }
    }

    fn gauge_text(refusals: &Refusals) -> String {
        let mut registry = Registry::default();
        refusals.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn a_refusal_is_reported_once_per_change() {
        let mut r = Refusals::new();
        let big = || BTreeMap::from([(key("big"), refused("too_many_backends", "1100 backends"))]);
        let changes = r.set_services(big());
        assert_eq!(changes.refused, [(key("big"), "1100 backends".to_owned())]);
        assert!(changes.cleared.is_empty());
        assert!(
            gauge_text(&r)
                .contains("nodeport_service_ports_refused{reason=\"too_many_backends\"} 1")
        );
        // Retried, refused the same way: nothing to say, however many rounds.
        for _ in 0..3 {
            assert_eq!(r.set_services(big()), Changes::default());
        }
        // Another reason is a change.
        let full = BTreeMap::from([(key("big"), refused("map_full", "NP_BACKENDS is full"))]);
        assert_eq!(
            r.set_services(full.clone()).refused,
            [(key("big"), "NP_BACKENDS is full".to_owned())]
        );
        let text = gauge_text(&r);
        assert!(text.contains("nodeport_service_ports_refused{reason=\"too_many_backends\"} 0"));
        assert!(text.contains("nodeport_service_ports_refused{reason=\"map_full\"} 1"));
        assert_eq!(
            r.markers(),
            BTreeSet::from([("map_full".to_owned(), key("big").to_string())])
        );
        // Programmed at last.
        let changes = r.set_services(BTreeMap::new());
        assert_eq!(changes.cleared, [key("big")]);
        assert!(r.markers().is_empty());
        assert!(gauge_text(&r).contains("nodeport_service_ports_refused{reason=\"map_full\"} 0"));
    }

    #[test]
    fn an_unserved_health_check_port_is_reported_once_per_change() {
        let mut r = Refusals::new();
        let busy = || BTreeMap::from([(32000, "Address in use".to_owned())]);
        assert_eq!(
            r.set_ports(busy()).refused,
            [(32000, "Address in use".to_owned())]
        );
        assert!(gauge_text(&r).contains("nodeport_health_check_ports_unserved 1"));
        assert_eq!(r.set_ports(busy()), Changes::default());
        assert_eq!(
            r.markers(),
            BTreeSet::from([("health_check_port_unserved".to_owned(), "32000".to_owned())])
        );
        assert_eq!(r.set_ports(BTreeMap::new()).cleared, [32000]);
        assert!(gauge_text(&r).contains("nodeport_health_check_ports_unserved 0"));
    }

    #[test]
    fn every_sync_error_has_a_reason_label() {
        let e = SyncError::TooManyBackends {
            backends: 8,
            slots: 7,
        };
        let r = Refused::from(&e);
        assert_eq!(r.reason, "too_many_backends");
        assert!(
            r.message.contains("raise --maglev-table-size"),
            "{}",
            r.message
        );
        assert!(REASONS.contains(&r.reason));
    }
}
