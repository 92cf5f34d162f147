//! From Service objects to the ledger: consumers, totals, findings.
//!
//! The counting mirrors the API server's node port allocator and its repair controller
//! (pkg/registry/core/service/portallocator/controller/repair.go, collectServiceNodePorts):
//! one allocation per port number per Service, where a TCP and a UDP (or SCTP) port of one
//! Service on the same number share it, the same number twice with the same protocol is a
//! duplicate, and a healthCheckNodePort (TCP) shares the number only with non-TCP ports.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use serde_json::Value;

use super::load_balancer::{LoadBalancerTargets, classify};
use super::{
    Allocation, BandName, Bands, Consumer, ConsumerCounts, ConsumerKind, Finding, FindingKind,
    FindingObject, Ledger, NodePortRange, PortSpan, RangeSummary, Severity, Totals, Usage,
};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Quoted by the range findings, so operators can search their logs for it.
const RANGE_FULL_ERROR: &str = "failed to allocate a nodePort: range is full";

/// Builds the ledger of `services` against `range`. `local_port_range` is the node's
/// `net.ipv4.ip_local_port_range`, when known. Pure and deterministic.
pub fn analyze(
    range: &NodePortRange,
    services: &[impl std::borrow::Borrow<Service>],
    local_port_range: Option<(u16, u16)>,
) -> Ledger {
    let mut collector = Collector::default();
    for service in services {
        collector.collect(range, service.borrow());
    }
    let Collector {
        mut consumers,
        unallocated,
        mut ignored,
        mut lb_services,
        mut health_checks,
        ..
    } = collector;
    // Findings list Services by namespace/name, whatever order they were read in.
    ignored.sort_by(by_name);
    lb_services.sort_by(|a, b| by_name(&a.object, &b.object));
    health_checks.sort_by(|a, b| by_name(&a.object, &b.object));
    consumers.sort_by(|a, b| {
        (a.port, &a.namespace, &a.name, a.kind).cmp(&(b.port, &b.namespace, &b.name, b.kind))
    });

    let used: BTreeSet<u16> = consumers
        .iter()
        .map(|c| c.port)
        .filter(|port| range.contains(*port))
        .collect();
    let totals = totals(range, &used, &consumers, &unallocated);
    let dynamic_full = totals.dynamic.free == 0;
    for consumer in &mut consumers {
        if consumer.allocation == Allocation::Unknown
            && consumer.band == Some(BandName::Static)
            && !dynamic_full
        {
            consumer.allocation = Allocation::LikelyManual;
        }
    }

    let mut findings = Vec::new();
    let releasable = load_balancer_findings(&lb_services, &mut findings);
    health_check_finding(&health_checks, &mut findings);
    range_findings(
        range,
        &totals,
        &releasable,
        health_checks.len(),
        &mut findings,
    );
    unallocated_finding(&unallocated, &totals, &mut findings);
    conflict_findings(&consumers, &mut findings);
    dynamic_band_finding(range, &totals, &mut findings);
    outside_range_finding(range, &consumers, &mut findings);
    manual_dynamic_finding(range, &totals, &used, &consumers, &mut findings);
    let local_port_range = local_port_range.map(|(first, last)| PortSpan {
        first: first.min(last),
        last: first.max(last),
    });
    if let Some(local) = local_port_range {
        local_port_range_finding(range, local, &mut findings);
    }
    ignored_finding(ignored, &mut findings);
    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.kind.cmp(&b.kind)));

    Ledger {
        range: RangeSummary {
            first: range.first,
            last: range.last,
            size: range.size(),
            band_offset: range.band_offset(),
        },
        bands: Bands {
            static_band: range.static_band().map(span),
            dynamic: span(range.dynamic_band()),
        },
        totals,
        consumers,
        findings,
        local_port_range,
    }
}

fn by_name(a: &FindingObject, b: &FindingObject) -> std::cmp::Ordering {
    (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
}

fn span(ports: std::ops::RangeInclusive<u16>) -> PortSpan {
    PortSpan {
        first: *ports.start(),
        last: *ports.end(),
    }
}

/// A port a Service needs but has no nodePort for.
struct Unallocated {
    namespace: String,
    name: String,
    /// `port 80/TCP (http)` or `healthCheckNodePort`.
    what: String,
}

/// A LoadBalancer Service holding node ports (not its health check port).
struct LoadBalancerUse {
    object: FindingObject,
    targets: LoadBalancerTargets,
    allocation_disabled: bool,
}

struct HealthCheckUse {
    object: FindingObject,
    targets: LoadBalancerTargets,
}

#[derive(Default)]
struct Collector {
    consumers: Vec<Consumer>,
    next_claim: usize,
    unallocated: Vec<Unallocated>,
    ignored: Vec<FindingObject>,
    lb_services: Vec<LoadBalancerUse>,
    health_checks: Vec<HealthCheckUse>,
}

/// The first claim of a port number within one Service.
struct NumberClaim {
    claim: usize,
    consumer: usize,
}

impl Collector {
    fn collect(&mut self, range: &NodePortRange, service: &Service) {
        let Some(spec) = &service.spec else { return };
        let namespace = service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = service.metadata.name.clone().unwrap_or_default();
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        let port_kind = match service_type {
            "NodePort" => Some(ConsumerKind::NodePort),
            "LoadBalancer" => Some(ConsumerKind::LoadBalancerNodePort),
            _ => None, // ClusterIP, ExternalName: no node ports
        };
        // allocateLoadBalancerNodePorts defaults to true for LoadBalancer Services.
        let allocates = match port_kind {
            Some(ConsumerKind::NodePort) => true,
            Some(_) => spec.allocate_load_balancer_node_ports != Some(false),
            None => false,
        };
        let needs_health_check = service_type == "LoadBalancer"
            && spec.external_traffic_policy.as_deref() == Some("Local");
        let apply_records = ApplyRecords::of(service);
        let object = |ports: Vec<u16>, note: Option<String>| FindingObject {
            namespace: namespace.clone(),
            name: name.clone(),
            ports,
            note,
        };

        let ports = spec.ports.as_deref().unwrap_or_default();
        let mut numbers: BTreeMap<u16, NumberClaim> = BTreeMap::new();
        let mut node_ports_held = Vec::new();
        let mut ignored_ports = Vec::new();
        let mut waiting_ports = BTreeSet::new();
        for port in ports {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port_name = port.name.clone().unwrap_or_default();
            // 0 means "not set"; anything not a port number cannot come from the API server
            // (manifests::load_dir rejects it), so it is left out rather than guessed at.
            let node_port = port
                .node_port
                .filter(|n| *n != 0)
                .and_then(|n| u16::try_from(n).ok());
            let Some(node_port) = node_port else {
                // Ports with the same `port` number get one node port (alloc.go: initNodePorts).
                let shares = ports
                    .iter()
                    .any(|other| other.port == port.port && other.node_port.unwrap_or(0) != 0);
                if allocates && !shares && waiting_ports.insert(port.port) {
                    let label = if port_name.is_empty() {
                        String::new()
                    } else {
                        format!(" ({port_name})")
                    };
                    self.unallocated.push(Unallocated {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        what: format!("port {}/{protocol}{label}", port.port),
                    });
                }
                continue;
            };
            let Some(kind) = port_kind else {
                ignored_ports.push(node_port);
                continue;
            };
            match numbers.get(&node_port) {
                Some(first) if !self.consumers[first.consumer].protocols.contains(&protocol) => {
                    let consumer = &mut self.consumers[first.consumer];
                    consumer.protocols.push(protocol);
                    consumer.port_names.push(port_name);
                    consumer.service_ports.push(port.port);
                }
                _ => {
                    let allocation = apply_records.allocation_of(PortField::NodePort {
                        port: port.port,
                        protocol: &protocol,
                    });
                    let consumer = self.push_consumer(
                        Consumer {
                            port: node_port,
                            protocols: vec![protocol],
                            kind,
                            namespace: namespace.clone(),
                            name: name.clone(),
                            port_names: vec![port_name],
                            service_ports: vec![port.port],
                            band: range.band_of(node_port),
                            allocation,
                            claim: 0,
                        },
                        None,
                    );
                    let claim = self.consumers[consumer].claim;
                    numbers
                        .entry(node_port)
                        .or_insert(NumberClaim { claim, consumer });
                    node_ports_held.push(node_port);
                }
            }
        }

        let health_check_port = spec
            .health_check_node_port
            .filter(|n| *n != 0)
            .and_then(|n| u16::try_from(n).ok());
        match health_check_port {
            Some(port) if needs_health_check => {
                // Served over TCP: it shares the number only with the Service's non-TCP ports.
                let shared = numbers.get(&port).filter(|first| {
                    !self.consumers[first.consumer]
                        .protocols
                        .iter()
                        .any(|p| p == "TCP")
                });
                let shared_claim = shared.map(|first| first.claim);
                self.push_consumer(
                    Consumer {
                        port,
                        protocols: vec!["TCP".into()],
                        kind: ConsumerKind::HealthCheckNodePort,
                        namespace: namespace.clone(),
                        name: name.clone(),
                        port_names: Vec::new(),
                        service_ports: Vec::new(),
                        band: range.band_of(port),
                        allocation: apply_records.allocation_of(PortField::HealthCheckNodePort),
                        claim: 0,
                    },
                    shared_claim,
                );
                self.health_checks.push(HealthCheckUse {
                    object: object(vec![port], None),
                    targets: classify(service),
                });
            }
            Some(port) => ignored_ports.push(port),
            None if needs_health_check => self.unallocated.push(Unallocated {
                namespace: namespace.clone(),
                name: name.clone(),
                what: "healthCheckNodePort".into(),
            }),
            None => {}
        }

        if !ignored_ports.is_empty() {
            let note = if port_kind.is_none() {
                format!("type {service_type} has no node ports")
            } else {
                "healthCheckNodePort without type LoadBalancer and externalTrafficPolicy Local"
                    .into()
            };
            self.ignored.push(object(ignored_ports, Some(note)));
        }
        if port_kind == Some(ConsumerKind::LoadBalancerNodePort) && !node_ports_held.is_empty() {
            self.lb_services.push(LoadBalancerUse {
                object: object(node_ports_held, None),
                targets: classify(service),
                allocation_disabled: !allocates,
            });
        }
    }

    /// Adds a consumer with a new allocator claim, or with `shared_claim`; returns its index.
    fn push_consumer(&mut self, mut consumer: Consumer, shared_claim: Option<usize>) -> usize {
        consumer.claim = shared_claim.unwrap_or_else(|| {
            self.next_claim += 1;
            self.next_claim
        });
        self.consumers.push(consumer);
        self.consumers.len() - 1
    }
}

enum PortField<'a> {
    NodePort { port: i32, protocol: &'a str },
    HealthCheckNodePort,
}

/// What the Service's own apply records say about who chose its ports. Only these are
/// evidence: an allocated port and a hand-picked one look the same in `spec`.
struct ApplyRecords<'a> {
    /// `kubectl apply` (client side) stores the applied object in this annotation.
    last_applied: Option<Value>,
    /// `fieldsV1` of server-side apply managers: exactly the fields each one applied.
    /// (Update managers are no evidence: `kubectl edit` sends back allocated ports too.)
    server_side: Vec<&'a Value>,
}

impl<'a> ApplyRecords<'a> {
    fn of(service: &'a Service) -> Self {
        let last_applied = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(LAST_APPLIED))
            .and_then(|text| serde_json::from_str(text).ok());
        let server_side = service
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| entry.operation.as_deref() == Some("Apply"))
            .filter_map(|entry| entry.fields_v1.as_ref().map(|fields| &fields.0))
            .collect();
        Self {
            last_applied,
            server_side,
        }
    }

    fn allocation_of(&self, field: PortField<'_>) -> Allocation {
        let in_last_applied = self.last_applied.as_ref().map(|applied| {
            let spec = applied.get("spec");
            match &field {
                PortField::NodePort { port, protocol } => spec
                    .and_then(|spec| spec.get("ports"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|p| p.get("port").and_then(Value::as_i64) == Some(i64::from(*port)))
                    .filter(|p| {
                        p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == *protocol
                    })
                    .any(|p| {
                        p.get("nodePort")
                            .and_then(Value::as_i64)
                            .is_some_and(|n| n != 0)
                    }),
                PortField::HealthCheckNodePort => spec
                    .and_then(|spec| spec.get("healthCheckNodePort"))
                    .and_then(Value::as_i64)
                    .is_some_and(|n| n != 0),
            }
        });
        let in_server_side = self.server_side.iter().any(|fields| {
            let spec = fields.get("f:spec");
            match &field {
                PortField::NodePort { port, protocol } => spec
                    .and_then(|spec| spec.get("f:ports"))
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .any(|(key, owned)| {
                        server_side_port_key(key)
                            .is_some_and(|(p, proto)| p == *port && proto == *protocol)
                            && owned.get("f:nodePort").is_some()
                    }),
                PortField::HealthCheckNodePort => spec
                    .and_then(|spec| spec.get("f:healthCheckNodePort"))
                    .is_some(),
            }
        });
        if in_server_side || in_last_applied == Some(true) {
            Allocation::Manual
        } else if in_last_applied.is_some() || !self.server_side.is_empty() {
            Allocation::Automatic
        } else {
            Allocation::Unknown
        }
    }
}

/// `k:{"port":80,"protocol":"TCP"}` (a managedFields list-map key) -> (80, "TCP").
fn server_side_port_key(key: &str) -> Option<(i32, String)> {
    let value: Value = serde_json::from_str(key.strip_prefix("k:")?).ok()?;
    let port = i32::try_from(value.get("port")?.as_i64()?).ok()?;
    let protocol = value
        .get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP");
    Some((port, protocol.to_owned()))
}

fn totals(
    range: &NodePortRange,
    used: &BTreeSet<u16>,
    consumers: &[Consumer],
    unallocated: &[Unallocated],
) -> Totals {
    let used_in = |band: &std::ops::RangeInclusive<u16>| used.range(band.clone()).count() as u32;
    let static_band = range
        .static_band()
        .map(|band| Usage::new(span(band.clone()).size(), used_in(&band)));
    let dynamic = range.dynamic_band();
    let mut consumers_by_kind = ConsumerCounts::default();
    for consumer in consumers {
        *match consumer.kind {
            ConsumerKind::NodePort => &mut consumers_by_kind.node_port,
            ConsumerKind::LoadBalancerNodePort => &mut consumers_by_kind.load_balancer_node_port,
            ConsumerKind::HealthCheckNodePort => &mut consumers_by_kind.health_check_node_port,
        } += 1;
    }
    let outside: BTreeSet<u16> = consumers
        .iter()
        .map(|c| c.port)
        .filter(|port| !range.contains(*port))
        .collect();
    Totals {
        static_band,
        dynamic: Usage::new(span(dynamic.clone()).size(), used_in(&dynamic)),
        all: Usage::new(range.size(), used.len() as u32),
        consumers_by_kind,
        unallocated: unallocated.len() as u32,
        outside_range: outside.len() as u32,
    }
}

/// How many ports the load balancer findings could release, for the range findings' advice.
#[derive(Default)]
struct Releasable {
    unneeded: usize,
    maybe_unneeded: usize,
}

fn load_balancer_findings(uses: &[LoadBalancerUse], findings: &mut Vec<Finding>) -> Releasable {
    let mut unneeded = Vec::new();
    let mut maybe = Vec::new();
    for lb in uses {
        match &lb.targets {
            LoadBalancerTargets::Pods { evidence }
            | LoadBalancerTargets::AnnouncedAddress { evidence } => {
                let mut note = evidence.clone();
                if lb.allocation_disabled {
                    note.push_str(
                        "; allocateLoadBalancerNodePorts is already false: these are explicit \
                         nodePort values, remove them",
                    );
                }
                unneeded.push(FindingObject {
                    note: Some(note),
                    ..lb.object.clone()
                });
            }
            // Explicit nodePorts with allocation disabled were asked for on purpose.
            LoadBalancerTargets::Unknown { .. } if lb.allocation_disabled => {}
            LoadBalancerTargets::Unknown { hint } => maybe.push(FindingObject {
                note: hint.clone(),
                ..lb.object.clone()
            }),
            // Node targets need their node ports: nothing to suggest.
            LoadBalancerTargets::Nodes { .. } => {}
        }
    }
    let releasable = Releasable {
        unneeded: unneeded.iter().map(|o| o.ports.len()).sum(),
        maybe_unneeded: maybe.iter().map(|o| o.ports.len()).sum(),
    };
    if !unneeded.is_empty() {
        findings.push(Finding {
            kind: FindingKind::LoadBalancerNodePortsUnneeded,
            severity: Severity::Info,
            summary: format!(
                "{} LoadBalancer Service(s) hold {} node port(s) their load balancer does not use",
                unneeded.len(),
                releasable.unneeded
            ),
            objects: unneeded,
            reasoning: "Their load balancer sends traffic to pod IPs, or announces the load \
                balancer IP to the nodes whose proxy handles it directly (see each note). Node \
                ports only matter to load balancers that target nodes. \
                spec.allocateLoadBalancerNodePorts: false (GA in Kubernetes 1.24) stops the \
                allocation."
                .into(),
            change: "Set spec.allocateLoadBalancerNodePorts: false and remove nodePort from every \
                port in the same update: node ports already allocated are not released by the \
                field alone. Clients that use <node>:<nodePort> directly lose that path."
                .into(),
        });
    }
    if !maybe.is_empty() {
        findings.push(Finding {
            kind: FindingKind::LoadBalancerNodePortsMaybeUnneeded,
            severity: Severity::Info,
            summary: format!(
                "{} LoadBalancer Service(s) hold {} node port(s) that could be released if their \
                 load balancer can target pods",
                maybe.len(),
                releasable.maybe_unneeded
            ),
            objects: maybe,
            reasoning: "Nothing in these Services shows what their load balancer targets. Load \
                balancers that target pod IPs (AWS Load Balancer Controller with IP targets) or \
                announce the load balancer IP to the nodes (MetalLB, Cilium LB IPAM, kube-vip) \
                do not use node ports; load balancers that target nodes do (AWS instance targets \
                and classic ELBs, and the default mode of most cloud providers)."
                .into(),
            change: "Only where the load balancer does not target nodes: set \
                spec.allocateLoadBalancerNodePorts: false and remove the nodePort values in the \
                same update. Unsafe for node-targeting load balancers: they would lose their \
                targets."
                .into(),
        });
    }
    releasable
}

fn health_check_finding(uses: &[HealthCheckUse], findings: &mut Vec<Finding>) {
    if uses.is_empty() {
        return;
    }
    let objects = uses
        .iter()
        .map(|hc| {
            let note = match &hc.targets {
                LoadBalancerTargets::Pods { evidence } => format!(
                    "{evidence}: traffic and health checks go straight to pods, and \
                     externalTrafficPolicy only affects traffic that arrives through the nodes; \
                     externalTrafficPolicy: Cluster releases the port (health checks then use \
                     the traffic port, service.beta.kubernetes.io/aws-load-balancer-healthcheck-port: \
                     traffic-port)"
                ),
                LoadBalancerTargets::AnnouncedAddress { evidence } => format!(
                    "{evidence}: does not probe this port, but the API server allocates it anyway; \
                     only externalTrafficPolicy: Cluster releases it, giving up the client source \
                     IP and node-local delivery"
                ),
                LoadBalancerTargets::Nodes { .. } | LoadBalancerTargets::Unknown { .. } => {
                    "the load balancer probably probes it to find nodes with ready local \
                     endpoints: needed while externalTrafficPolicy is Local"
                        .to_owned()
                }
            };
            FindingObject {
                note: Some(note),
                ..hc.object.clone()
            }
        })
        .collect::<Vec<_>>();
    findings.push(Finding {
        kind: FindingKind::HealthCheckNodePort,
        severity: Severity::Info,
        summary: format!(
            "{} LoadBalancer Service(s) with externalTrafficPolicy: Local hold an extra \
             healthCheckNodePort each",
            objects.len()
        ),
        objects,
        reasoning: "The API server allocates spec.healthCheckNodePort for every LoadBalancer \
            Service with externalTrafficPolicy: Local, even with allocateLoadBalancerNodePorts: \
            false; kube-proxy answers health checks on it. A load balancer health-check \
            annotation (such as service.beta.kubernetes.io/aws-load-balancer-healthcheck-port) \
            changes what the load balancer probes, not what the API server allocates."
            .into(),
        change: "Where the note says the load balancer does not use it, switch to \
            externalTrafficPolicy: Cluster to release the port. Elsewhere Cluster also releases it \
            but costs the client source IP (Proxy Protocol can carry it, if the load balancer \
            supports it) and an extra hop between nodes."
            .into(),
    });
}

fn range_findings(
    range: &NodePortRange,
    totals: &Totals,
    releasable: &Releasable,
    health_checks: usize,
    findings: &mut Vec<Finding>,
) {
    let all = &totals.all;
    let (kind, severity, summary) = if all.free == 0 {
        (
            FindingKind::RangeFull,
            Severity::Critical,
            format!(
                "node port range {range} is full: all {} ports are used; the next Service that \
                 needs a node port fails with \"{RANGE_FULL_ERROR}\"",
                all.size
            ),
        )
    } else if all.at_least_percent(95) {
        (
            FindingKind::RangeAbove95Percent,
            Severity::Critical,
            format!(
                "node port range {range} is {}% used: {} of {} ports left",
                all.use_percent, all.free, all.size
            ),
        )
    } else if all.at_least_percent(80) {
        (
            FindingKind::RangeAbove80Percent,
            Severity::Warning,
            format!(
                "node port range {range} is {}% used: {} of {} ports left",
                all.use_percent, all.free, all.size
            ),
        )
    } else {
        return;
    };
    let mut release = Vec::new();
    if releasable.unneeded > 0 {
        release.push(format!(
            "{} LoadBalancer node port(s) their load balancer does not use ({})",
            releasable.unneeded,
            FindingKind::LoadBalancerNodePortsUnneeded.as_str()
        ));
    }
    if releasable.maybe_unneeded > 0 {
        release.push(format!(
            "{} more if those load balancers can target pods ({})",
            releasable.maybe_unneeded,
            FindingKind::LoadBalancerNodePortsMaybeUnneeded.as_str()
        ));
    }
    if health_checks > 0 {
        release.push(format!(
            "{health_checks} healthCheckNodePort(s) ({})",
            FindingKind::HealthCheckNodePort.as_str()
        ));
    }
    let release = if release.is_empty() {
        String::new()
    } else {
        format!("Release ports: {}. ", release.join("; "))
    };
    findings.push(Finding {
        kind,
        severity,
        summary,
        objects: Vec::new(),
        reasoning: "The API server allocates node ports from --service-node-port-range only; \
            when none is free, creating a NodePort or LoadBalancer Service (or switching one to \
            those types) fails. This count comes from the Services read, not from the \
            allocator's own record, and no time-to-full is estimated: Service objects carry no \
            allocation history."
            .into(),
        change: format!(
            "{release}Or widen --service-node-port-range on every kube-apiserver: widening upward \
             keeps the static band in place but must stay clear of the nodes' \
             net.ipv4.ip_local_port_range (default 32768-60999) or be reserved with \
             net.ipv4.ip_local_reserved_ports; widening downward moves the static band to the new \
             lowest ports, so hand-picked ports end up in the dynamic band. Node firewalls and \
             security groups must allow the new ports."
        ),
    });
}

fn unallocated_finding(unallocated: &[Unallocated], totals: &Totals, findings: &mut Vec<Finding>) {
    if unallocated.is_empty() {
        return;
    }
    let needed = unallocated.len() as u32;
    let free = totals.all.free;
    let (severity, summary) = if needed > free {
        (
            Severity::Critical,
            format!(
                "{needed} port(s) still need a node port but only {free} are free: creating these \
                 Services fails with \"{RANGE_FULL_ERROR}\""
            ),
        )
    } else {
        (
            Severity::Info,
            format!(
                "{needed} port(s) have no node port yet; the API server allocates them on create ({free} free)"
            ),
        )
    };
    // One object per Service, listing what it waits for.
    let mut objects: Vec<FindingObject> = Vec::new();
    for item in unallocated {
        match objects.last_mut() {
            Some(last) if last.namespace == item.namespace && last.name == item.name => {
                let note = last.note.get_or_insert_with(String::new);
                note.push_str(", ");
                note.push_str(&item.what);
            }
            _ => objects.push(FindingObject {
                namespace: item.namespace.clone(),
                name: item.name.clone(),
                ports: Vec::new(),
                note: Some(item.what.clone()),
            }),
        }
    }
    objects.sort_by(by_name);
    findings.push(Finding {
        kind: FindingKind::UnallocatedNodePorts,
        severity,
        summary,
        objects,
        reasoning: "These Services' types need node ports (NodePort; LoadBalancer unless \
            allocateLoadBalancerNodePorts is false; a healthCheckNodePort for \
            externalTrafficPolicy: Local) that their spec does not have. In manifest files that \
            is normal: the API server allocates them on create, preferring the dynamic band. \
            Read from a cluster it should not happen, since a create that cannot allocate \
            fails."
            .into(),
        change: if needed > free {
            "Release ports (see the other findings) or widen --service-node-port-range before \
             creating these Services."
                .into()
        } else {
            "Nothing, as long as the ports stay free until these Services are created.".into()
        },
    });
}

fn conflict_findings(consumers: &[Consumer], findings: &mut Vec<Finding>) {
    let mut by_port: BTreeMap<u16, Vec<&Consumer>> = BTreeMap::new();
    for consumer in consumers {
        by_port.entry(consumer.port).or_default().push(consumer);
    }
    for (port, claimants) in by_port {
        let claims: BTreeSet<usize> = claimants.iter().map(|c| c.claim).collect();
        if claims.len() < 2 {
            continue;
        }
        let objects: Vec<FindingObject> = claimants
            .iter()
            .map(|c| FindingObject {
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                ports: vec![port],
                note: Some(format!("{} {}", describe_use(c), c.protocols.join("+"))),
            })
            .collect();
        let services: BTreeSet<(&str, &str)> = claimants
            .iter()
            .map(|c| (c.namespace.as_str(), c.name.as_str()))
            .collect();
        findings.push(Finding {
            kind: FindingKind::Conflict,
            severity: Severity::Critical,
            summary: format!(
                "node port {port} is claimed {} times by {} Service(s)",
                claims.len(),
                services.len()
            ),
            objects,
            reasoning: "The allocator counts port numbers, not protocols: a number belongs to one \
                Service, which may use it for TCP and UDP (or SCTP) alike, and a \
                healthCheckNodePort (TCP) may share it only with that Service's non-TCP ports. \
                The API server rejects a second claim (\"provided port is already allocated\"); \
                in a live cluster this only follows a restore or a manual allocator change, and \
                the repair controller reports \"Port N was assigned to multiple services; please \
                recreate service\". nodeport-agent keeps the port with the Service that \
                has it (on a fresh start the oldest, then by namespace/name) and reports the \
                others as frontend_conflict; kube-proxy's choice may differ."
                .into(),
            change: format!(
                "Keep {port} for one of them; give the others another port (a free one in the \
                 static band if chosen by hand) or remove their nodePort to have one allocated."
            ),
        });
    }
}

fn describe_use(consumer: &Consumer) -> String {
    match consumer.kind {
        ConsumerKind::HealthCheckNodePort => "healthCheckNodePort".into(),
        ConsumerKind::NodePort | ConsumerKind::LoadBalancerNodePort => {
            let ports: Vec<String> = consumer
                .service_ports
                .iter()
                .zip(&consumer.port_names)
                .map(|(port, name)| {
                    if name.is_empty() {
                        format!("port {port}")
                    } else {
                        format!("port {port} ({name})")
                    }
                })
                .collect();
            format!("nodePort of {}", ports.join(", "))
        }
    }
}

fn dynamic_band_finding(range: &NodePortRange, totals: &Totals, findings: &mut Vec<Finding>) {
    let (Some(static_band), Some(static_usage)) = (range.static_band(), &totals.static_band) else {
        return;
    };
    if totals.dynamic.free > 0 || static_usage.free == 0 {
        return; // not full, or the whole range is full (range_full says so)
    }
    let dynamic = span(range.dynamic_band());
    let static_band = span(static_band);
    findings.push(Finding {
        kind: FindingKind::DynamicBandFull,
        severity: Severity::Warning,
        summary: format!(
            "the dynamic band {dynamic} is full: automatic allocation now takes ports from the \
             static band {static_band} ({} left)",
            static_usage.free
        ),
        objects: Vec::new(),
        reasoning: "KEP-3668: automatic allocation prefers the dynamic band and falls back to the \
            static band only when it is full. From now on a port picked by hand in the static \
            band may be taken by an automatic allocation first."
            .into(),
        change: "Release ports in the dynamic band (see the load balancer findings) or widen the \
            range; until then, create Services with hand-picked ports before others."
            .into(),
    });
}

fn outside_range_finding(
    range: &NodePortRange,
    consumers: &[Consumer],
    findings: &mut Vec<Finding>,
) {
    let objects = group_by_service(consumers.iter().filter(|c| c.band.is_none()));
    if objects.is_empty() {
        return;
    }
    let ports: BTreeSet<u16> = objects
        .iter()
        .flat_map(|o| o.ports.iter().copied())
        .collect();
    findings.push(Finding {
        kind: FindingKind::OutsideRange,
        severity: Severity::Warning,
        summary: format!(
            "{} claimed port(s) lie outside the node port range {range}",
            ports.len()
        ),
        objects,
        reasoning: "The API server only accepts node ports inside --service-node-port-range. A \
            Service holding one outside it was created under another range, or this command was \
            given a different range than kube-apiserver uses. The repair controller reports \
            \"Port N is not within the port range\". These ports are not counted as used."
            .into(),
        change: format!(
            "Check that --service-node-port-range ({range}) matches kube-apiserver's. If it does, \
             move these Services to ports inside the range (or remove nodePort to have one \
             allocated); clients and firewall rules must follow."
        ),
    });
}

fn manual_dynamic_finding(
    range: &NodePortRange,
    totals: &Totals,
    used: &BTreeSet<u16>,
    consumers: &[Consumer],
    findings: &mut Vec<Finding>,
) {
    let manual = consumers
        .iter()
        .filter(|c| c.band == Some(BandName::Dynamic) && c.allocation == Allocation::Manual);
    let objects = group_by_service(manual);
    if objects.is_empty() {
        return;
    }
    let count: usize = objects.iter().map(|o| o.ports.len()).sum();
    let dynamic = span(range.dynamic_band());
    let destination = match range.static_band() {
        Some(band) => {
            let free: Vec<String> = band
                .clone()
                .filter(|port| !used.contains(port))
                .take(count.max(3))
                .map(|port| port.to_string())
                .collect();
            let static_free = totals.static_band.map_or(0, |usage| usage.free);
            if free.is_empty() {
                format!(
                    "The static band {} is full: release ports there first, or",
                    span(band)
                )
            } else {
                format!(
                    "Move them to free ports of the static band {} ({static_free} free: {}), or",
                    span(band),
                    free.join(", ")
                )
            }
        }
        None => "This range is too small to be split (16 ports or fewer), so no port is safe \
            from automatic allocation: widen it to get a static band, or"
            .into(),
    };
    findings.push(Finding {
        kind: FindingKind::ManualPortInDynamicBand,
        severity: Severity::Warning,
        summary: format!("{count} hand-picked node port(s) sit in the dynamic band {dynamic}"),
        objects,
        reasoning: "Automatic allocation takes ports from the dynamic band first (KEP-3668), so a \
            hand-picked port there may already be taken when its Service is created again \
            (recreated, restored, or deployed to another cluster), and the create fails with \
            \"provided port is already allocated\". The evidence is the Service's apply record \
            (kubectl.kubernetes.io/last-applied-configuration, or a server-side apply entry in \
            managedFields) setting this nodePort; ports set any other way look exactly like \
            allocated ones and are not listed."
            .into(),
        change: format!(
            "{destination} remove nodePort to let the API server allocate one. Clients and \
             firewall rules that use the old port must follow."
        ),
    });
}

fn local_port_range_finding(range: &NodePortRange, local: PortSpan, findings: &mut Vec<Finding>) {
    let first = local.first.max(range.first);
    let last = local.last.min(range.last);
    if first > last {
        return;
    }
    let overlap = PortSpan { first, last };
    findings.push(Finding {
        kind: FindingKind::LocalPortRangeOverlap,
        severity: Severity::Warning,
        summary: format!(
            "net.ipv4.ip_local_port_range {local} overlaps the node port range on {overlap} \
             ({} ports)",
            overlap.size()
        ),
        objects: Vec::new(),
        reasoning: "The kernel picks source ports of outgoing connections from \
            ip_local_port_range. A reply to a connection whose source port is also a node port \
            is caught by the node port rules (kube-proxy or this agent) and sent to that \
            Service's backends, so the connection hangs; a process listening on such a port can \
            also hold it before kube-proxy does. This is harmless if \
            net.ipv4.ip_local_reserved_ports already covers the overlap (not checked here)."
            .into(),
        change: format!(
            "Reserve the node ports from ephemeral use: sysctl -w \
             net.ipv4.ip_local_reserved_ports={overlap} (persist it in /etc/sysctl.d/), or move \
             net.ipv4.ip_local_port_range off {range}."
        ),
    });
}

fn ignored_finding(ignored: Vec<FindingObject>, findings: &mut Vec<Finding>) {
    if ignored.is_empty() {
        return;
    }
    findings.push(Finding {
        kind: FindingKind::IgnoredNodePort,
        severity: Severity::Info,
        summary: format!(
            "{} Service(s) set node ports their type does not use",
            ignored.len()
        ),
        objects: ignored,
        reasoning: "The API server rejects nodePort on ClusterIP and ExternalName Services and \
            healthCheckNodePort unless the Service is a LoadBalancer with externalTrafficPolicy: \
            Local (and clears them when the type changes). They are not counted."
            .into(),
        change: "Remove these fields from the manifests, or fix the Service type.".into(),
    });
}

/// One finding object per Service, with its ports in order.
fn group_by_service<'a>(consumers: impl Iterator<Item = &'a Consumer>) -> Vec<FindingObject> {
    let mut grouped: BTreeMap<(&str, &str), BTreeSet<u16>> = BTreeMap::new();
    for consumer in consumers {
        grouped
            .entry((&consumer.namespace, &consumer.name))
            .or_default()
            .insert(consumer.port);
    }
    grouped
        .into_iter()
        .map(|((namespace, name), ports)| FindingObject {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ports: ports.into_iter().collect(),
            note: None,
        })
        .collect()
}
