//! Network programming latency, as kube-proxy measures it
//! (`kubeproxy_network_programming_duration_seconds`): from the moment the cluster changed, as
//! the EndpointSlice controller stamps it in the `endpoints.kubernetes.io/last-change-trigger-time`
//! annotation (the pod change that made the slice change), to the moment the change is in the
//! maps.
//!
//! As kube-proxy (pkg/proxy/endpointschangetracker.go): a trigger time is taken from each
//! EndpointSlice that is new or changed, when it is later than the agent's start (changes
//! before it would measure the agent's absence, not its speed); the times of a Service are
//! dropped when one of its slices is deleted (a deleted slice's annotation dates from its last
//! update); and they are observed once the round that programmed the Service succeeded. A
//! Service that failed to program keeps its times until a round programs it, so the latency
//! includes the retries. Unlike kube-proxy, a slice whose trigger time did not change (the same
//! change seen again, say a manifest file re-read) is not counted twice.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{api::discovery::v1::EndpointSlice, jiff::Timestamp};
use prometheus_client::metrics::histogram::Histogram;

use crate::{model::ServicePortKey, source::Snapshot};

/// The annotation the EndpointSlice controller sets (`v1.EndpointsLastChangeTriggerTime`).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The label naming an EndpointSlice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// kube-proxy's buckets (0, 0.25 s, 0.5 s, 1 s to 59 s by 1 s, 60 s to 115 s by 5 s, 2 min to
/// 5 min by 30 s), with finer ones below 0.25 s: the agent programs a change in milliseconds,
/// so what remains is the API server's and the controller's share.
pub fn buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// Seconds since the Unix epoch.
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The trigger time of a slice, in Unix seconds; `None` without the annotation or with one
/// that is not an RFC 3339 time (kube-proxy logs and ignores those).
pub fn trigger_time(slice: &EndpointSlice) -> Option<f64> {
    let value = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    match value.parse::<Timestamp>() {
        Ok(t) => Some(t.as_second() as f64 + f64::from(t.subsec_nanosecond()) / 1e9),
        Err(e) => {
            tracing::debug!(value, error = %e, "an EndpointSlice's last-change-trigger-time is not an RFC 3339 time");
            None
        }
    }
}

type ServiceName = (String, String);

fn service_of(slice: &EndpointSlice) -> Option<ServiceName> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((namespace, service.clone()))
}

fn slice_key(slice: &EndpointSlice) -> (&str, &str) {
    (
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        slice.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Trigger times waiting for their Service to be programmed.
#[derive(Debug)]
pub struct ProgrammingLatency {
    /// When the agent started (Unix seconds): earlier trigger times are not measured.
    started: f64,
    pending: BTreeMap<ServiceName, Vec<f64>>,
}

impl ProgrammingLatency {
    pub fn new(started: SystemTime) -> Self {
        Self {
            started: unix_seconds(started),
            pending: BTreeMap::new(),
        }
    }

    /// Trigger times waiting (for tests and logs).
    pub fn pending(&self) -> usize {
        self.pending.values().map(Vec::len).sum()
    }

    /// Notes the trigger times of the slices `new` adds or changes against `old`. A source
    /// shares the `Arc` of an object that did not change, so a changed slice is one whose
    /// `Arc` differs.
    pub fn note_snapshot(&mut self, old: &Snapshot, new: &Snapshot) {
        if std::ptr::eq(old, new) {
            return;
        }
        let before: HashMap<(&str, &str), &Arc<EndpointSlice>> = old
            .endpoint_slices
            .iter()
            .map(|s| (slice_key(s), s))
            .collect();
        let mut present = std::collections::HashSet::with_capacity(new.endpoint_slices.len());
        for slice in &new.endpoint_slices {
            let key = slice_key(slice);
            present.insert(key);
            let previous = before.get(&key);
            if previous.is_some_and(|p| Arc::ptr_eq(p, slice)) {
                continue;
            }
            let Some(t) = trigger_time(slice) else {
                continue;
            };
            // The same change seen again (an object re-read, not changed) counts once.
            if previous.is_some_and(|p| trigger_time(p) == Some(t)) || t <= self.started {
                continue;
            }
            if let Some(service) = service_of(slice) {
                self.pending.entry(service).or_default().push(t);
            }
        }
        for (key, slice) in &before {
            if !present.contains(key)
                && let Some(service) = service_of(slice)
            {
                self.pending.remove(&service);
            }
        }
    }

    /// Observes, into `histogram`, the trigger times of every Service that a round programmed
    /// at `now`: those `handled` (namespace, name) says the datapath serves, but not those with
    /// a port in `failed`, which keep theirs. The times of Services the datapath does not serve
    /// (left to kube-proxy, or gone) are dropped. A time later than `now` (clocks apart) is
    /// observed as 0.
    pub fn programmed<'a>(
        &mut self,
        failed: impl IntoIterator<Item = &'a ServicePortKey>,
        handled: impl Fn(&str, &str) -> bool,
        now: SystemTime,
        histogram: &Histogram,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let failed: std::collections::HashSet<(&str, &str)> = failed
            .into_iter()
            .map(|k| (&*k.namespace, &*k.name))
            .collect();
        let now = unix_seconds(now);
        self.pending.retain(|(namespace, name), times| {
            if failed.contains(&(namespace.as_str(), name.as_str())) {
                return true;
            }
            if !handled(namespace, name) {
                return false;
            }
            for t in times.iter() {
                histogram.observe((now - t).max(0.0));
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::model::Protocol;

    const START: u64 = 1_800_000_000;

    fn at(seconds: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds)
    }

    fn slice(name: &str, service: &str, trigger: Option<&str>) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                annotations: trigger
                    .map(|t| [(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        })
    }

    fn snapshot(slices: &[&Arc<EndpointSlice>]) -> Snapshot {
        Snapshot {
            endpoint_slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            ..Snapshot::default()
        }
    }

    fn key(name: &str) -> ServicePortKey {
        ServicePortKey {
            namespace: "shop".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        }
    }

    /// (count, sum) of the histogram, from its encoding.
    fn observed(registry: &Registry) -> (u64, f64) {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        let value = |suffix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("latency{suffix} ")))
                .unwrap_or_else(|| panic!("no latency{suffix} in\n{text}"))
                .to_owned()
        };
        (
            value("_count").parse().unwrap(),
            value("_sum").parse().unwrap(),
        )
    }

    fn all(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn trigger_times_are_rfc3339_with_or_without_fractions() {
        // 2027-01-15T08:00:00Z is 1_800_000_000 s after the epoch.
        let t = |v: &str| trigger_time(&slice("a", "web", Some(v)));
        assert_eq!(t("2027-01-15T08:00:00Z"), Some(START as f64));
        assert_eq!(t("2027-01-15T08:00:00.25Z"), Some(START as f64 + 0.25));
        assert_eq!(t("2027-01-15T09:00:00+01:00"), Some(START as f64));
        assert_eq!(t("yesterday"), None);
        assert_eq!(trigger_time(&slice("a", "web", None)), None);
    }

    #[test]
    fn changed_slices_are_measured_once_programmed() {
        let mut registry = Registry::default();
        let histogram = Histogram::new(buckets());
        registry.register("latency", "test", histogram.clone());
        let mut latency = ProgrammingLatency::new(at(START as f64));

        // Before the agent's start: not measured. Without the annotation: nothing to measure.
        let old = slice("web-1", "web", Some("2027-01-15T07:59:00Z"));
        let bare = slice("api-1", "api", None);
        let first = snapshot(&[&old, &bare]);
        latency.note_snapshot(&Snapshot::default(), &first);
        assert_eq!(latency.pending(), 0);

        // web changes 2 s after the start, and is programmed 0.5 s later.
        let changed = slice("web-1", "web", Some("2027-01-15T08:00:02Z"));
        let second = snapshot(&[&changed, &bare]);
        latency.note_snapshot(&first, &second);
        assert_eq!(latency.pending(), 1);
        latency.programmed([], all, at(START as f64 + 2.5), &histogram);
        assert_eq!(observed(&registry), (1, 0.5));
        assert_eq!(latency.pending(), 0);

        // Re-read but not changed (a new Arc, the same trigger time): not counted again.
        let reread = slice("web-1", "web", Some("2027-01-15T08:00:02Z"));
        let third = snapshot(&[&reread, &bare]);
        latency.note_snapshot(&second, &third);
        assert_eq!(latency.pending(), 0);

        // A Service that fails to program keeps its times until a round programs it: the
        // latency includes the retries.
        let again = slice("web-1", "web", Some("2027-01-15T08:00:10Z"));
        let fourth = snapshot(&[&again, &bare]);
        latency.note_snapshot(&third, &fourth);
        latency.programmed([&key("web")], all, at(START as f64 + 11.0), &histogram);
        assert_eq!(observed(&registry), (1, 0.5));
        latency.programmed([&key("api")], all, at(START as f64 + 13.0), &histogram);
        assert_eq!(observed(&registry), (2, 3.5));

        // A time in the future (the node's clock behind the controller's) counts as 0.
        let future = slice("web-1", "web", Some("2027-01-15T08:01:00Z"));
        let fifth = snapshot(&[&future, &bare]);
        latency.note_snapshot(&fourth, &fifth);
        latency.programmed([], all, at(START as f64 + 20.0), &histogram);
        assert_eq!(observed(&registry), (3, 3.5));

        // A Service the datapath does not serve (kube-proxy's, or deleted): its times go
        // unobserved.
        let later = slice("web-1", "web", Some("2027-01-15T08:02:00Z"));
        latency.note_snapshot(&fifth, &snapshot(&[&later, &bare]));
        latency.programmed(
            [],
            |_, name| name != "web",
            at(START as f64 + 200.0),
            &histogram,
        );
        assert_eq!(observed(&registry), (3, 3.5));
        assert_eq!(latency.pending(), 0);
    }

    #[test]
    fn a_deleted_slice_drops_its_services_times() {
        let histogram = Histogram::new(buckets());
        let mut latency = ProgrammingLatency::new(at(START as f64));
        let a = slice("web-1", "web", Some("2027-01-15T08:00:02Z"));
        let b = slice("web-2", "web", Some("2027-01-15T08:00:03Z"));
        let first = snapshot(&[&a, &b]);
        latency.note_snapshot(&Snapshot::default(), &first);
        assert_eq!(latency.pending(), 2);
        latency.note_snapshot(&first, &snapshot(&[&a]));
        assert_eq!(latency.pending(), 0);
        latency.programmed([], all, at(START as f64 + 5.0), &histogram);
    }

    #[test]
    fn buckets_extend_kube_proxys() {
        let b = buckets();
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        // Every bucket bound of kube-proxy's is one of ours, so their quantiles compare.
        let mut kube_proxy = vec![0.0, 0.25, 0.5];
        kube_proxy.extend((1..=59).map(f64::from));
        kube_proxy.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
        kube_proxy.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
        assert!(kube_proxy.iter().all(|k| b.contains(k)));
        assert_eq!(b.last(), Some(&300.0));
    }
}
