//! Ledger tests on fixture manifests (nodeport-agent/tests/fixtures/ledger/<case>/), loaded
//! with `manifests::load_dir` like `ports --manifests` does. Large cases are generated into a
//! scratch directory instead of being committed.

use std::fmt::Write as _;
use std::path::Path;

use k8s_openapi::api::core::v1::Service;

use super::*;
use crate::manifests::load_dir;
use crate::test_support::ScratchDir;

fn load(dir: &Path) -> Vec<Service> {
    load_dir(dir)
        .unwrap_or_else(|err| panic!("{err}"))
        .services
        .into_iter()
        .map(|(_, service)| std::sync::Arc::unwrap_or_clone(service))
        .collect()
}

fn fixture(case: &str) -> Vec<Service> {
    load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ledger")
            .join(case),
    )
}

fn range(text: &str) -> NodePortRange {
    text.parse().unwrap()
}

fn analyze_fixture(case: &str) -> Ledger {
    analyze(&NodePortRange::DEFAULT, &fixture(case), None)
}

/// NodePort Services using exactly `ports`, four ports per Service, written as one
/// multi-document file and loaded back.
fn generated(
    test: &str,
    ports: impl IntoIterator<Item = u16>,
    extra_yaml: &str,
) -> (ScratchDir, Vec<Service>) {
    let ports: Vec<u16> = ports.into_iter().collect();
    let mut yaml = String::new();
    for (index, chunk) in ports.chunks(4).enumerate() {
        let _ = writeln!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index:04}, namespace: load}}\nspec:\n  type: NodePort\n  ports:"
        );
        for (slot, port) in chunk.iter().enumerate() {
            let _ = writeln!(
                yaml,
                "  - {{name: p{slot}, port: {}, nodePort: {port}}}",
                8000 + slot
            );
        }
    }
    yaml.push_str(extra_yaml);
    let dir = ScratchDir::new(&format!("ledger-{test}"));
    dir.write("generated.yaml", &yaml);
    let services = load(dir.path());
    (dir, services)
}

fn kinds(ledger: &Ledger) -> Vec<FindingKind> {
    ledger.findings.iter().map(|f| f.kind).collect()
}

fn only(ledger: &Ledger, kind: FindingKind) -> &Finding {
    let found: Vec<&Finding> = ledger.findings_of(kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind:?} in {:?}",
        kinds(ledger)
    );
    found[0]
}

/// `namespace/name` and ports of each object of a finding.
type ObjectPorts = Vec<(String, Vec<u16>)>;

fn object_ports(finding: &Finding) -> ObjectPorts {
    finding
        .objects
        .iter()
        .map(|o| (format!("{}/{}", o.namespace, o.name), o.ports.clone()))
        .collect()
}

fn consumer_rows(ledger: &Ledger) -> Vec<String> {
    ledger
        .consumers
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}/{} {}",
                c.port,
                c.protocols.join("+"),
                c.kind.as_str(),
                c.namespace,
                c.name,
                c.band.map_or("outside", BandName::as_str)
            )
        })
        .collect()
}

#[test]
fn full_range_of_2768_ports_reproduces_range_is_full() {
    let waiting = "---\napiVersion: v1\nkind: Service\nmetadata: {name: one-more, namespace: load}\nspec:\n  type: NodePort\n  ports: [{name: http, port: 80}]\n";
    let (_dir, services) = generated("full", 30000..=32767, waiting);
    assert_eq!(services.len(), 692 + 1);
    let ledger = analyze(&NodePortRange::DEFAULT, &services, None);

    assert_eq!(ledger.consumers.len(), 2768);
    let totals = &ledger.totals;
    assert_eq!(
        (totals.all.size, totals.all.used, totals.all.free),
        (2768, 2768, 0)
    );
    assert_eq!(totals.all.use_percent, 100.0);
    let static_band = totals.static_band.unwrap();
    assert_eq!(
        (static_band.size, static_band.used, static_band.free),
        (86, 86, 0)
    );
    assert_eq!(
        (
            totals.dynamic.size,
            totals.dynamic.used,
            totals.dynamic.free
        ),
        (2682, 2682, 0)
    );
    assert_eq!(totals.unallocated, 1);

    let full = only(&ledger, FindingKind::RangeFull);
    assert_eq!(full.severity, Severity::Critical);
    assert!(
        full.summary
            .contains("failed to allocate a nodePort: range is full"),
        "{}",
        full.summary
    );
    let waiting = only(&ledger, FindingKind::UnallocatedNodePorts);
    assert_eq!(waiting.severity, Severity::Critical);
    assert!(
        waiting.summary.contains("only 0 are free"),
        "{}",
        waiting.summary
    );
    assert_eq!(
        object_ports(waiting),
        [("load/one-more".to_owned(), vec![])]
    );
    // The lower thresholds and the band finding are subsumed, and nothing conflicts.
    for absent in [
        FindingKind::RangeAbove95Percent,
        FindingKind::RangeAbove80Percent,
        FindingKind::DynamicBandFull,
        FindingKind::Conflict,
    ] {
        assert_eq!(ledger.findings_of(absent).count(), 0, "{absent:?}");
    }
    assert_eq!(ledger.findings[0].severity, Severity::Critical);
}

#[test]
fn one_port_short_of_full_is_not_full() {
    let (_dir, services) = generated("almost-full", 30000..=32766, "");
    let ledger = analyze(&NodePortRange::DEFAULT, &services, None);
    assert_eq!(ledger.totals.all.free, 1);
    assert_eq!(ledger.findings_of(FindingKind::RangeFull).count(), 0);
    assert_eq!(
        only(&ledger, FindingKind::RangeAbove95Percent).severity,
        Severity::Critical
    );
}

#[test]
fn usage_thresholds_at_80_and_95_percent() {
    // 100 ports: static 30000-30015, dynamic 30016-30099.
    let hundred = range("30000-30099");
    let cases: [(u16, Option<FindingKind>); 6] = [
        (79, None),
        (80, Some(FindingKind::RangeAbove80Percent)),
        (94, Some(FindingKind::RangeAbove80Percent)),
        (95, Some(FindingKind::RangeAbove95Percent)),
        (99, Some(FindingKind::RangeAbove95Percent)),
        (100, Some(FindingKind::RangeFull)),
    ];
    for (used, expected) in cases {
        let (_dir, services) = generated(&format!("threshold-{used}"), 30000..30000 + used, "");
        let ledger = analyze(&hundred, &services, None);
        assert_eq!(ledger.totals.all.used, u32::from(used));
        let range_kinds: Vec<FindingKind> = kinds(&ledger)
            .into_iter()
            .filter(|kind| {
                matches!(
                    kind,
                    FindingKind::RangeFull
                        | FindingKind::RangeAbove95Percent
                        | FindingKind::RangeAbove80Percent
                )
            })
            .collect();
        assert_eq!(
            range_kinds,
            expected.into_iter().collect::<Vec<_>>(),
            "{used} used"
        );
        if let Some(kind) = expected {
            let finding = only(&ledger, kind);
            let severity = if kind == FindingKind::RangeAbove80Percent {
                Severity::Warning
            } else {
                Severity::Critical
            };
            assert_eq!(finding.severity, severity);
            assert!(
                finding.change.contains("--service-node-port-range"),
                "{}",
                finding.change
            );
        }
    }
}

#[test]
fn full_dynamic_band_warns_that_the_static_band_is_being_used() {
    let hundred = range("30000-30099");
    let (_dir, services) = generated("dynamic-full", 30016..=30099, "");
    let ledger = analyze(&hundred, &services, None);
    assert_eq!(ledger.totals.dynamic.free, 0);
    assert_eq!(ledger.totals.static_band.unwrap().free, 16);
    let finding = only(&ledger, FindingKind::DynamicBandFull);
    assert_eq!(finding.severity, Severity::Warning);
    assert!(
        finding.summary.contains("30016-30099 is full"),
        "{}",
        finding.summary
    );
    assert!(
        finding
            .summary
            .contains("static band 30000-30015 (16 left)"),
        "{}",
        finding.summary
    );
}

#[test]
fn sixteen_port_range_is_not_split() {
    let small = range("30000-30015");
    let ledger = analyze(&small, &fixture("small-range"), None);
    assert_eq!(ledger.range.size, 16);
    assert_eq!(ledger.range.band_offset, 0);
    assert_eq!(ledger.bands.static_band, None);
    assert_eq!(
        ledger.bands.dynamic,
        PortSpan {
            first: 30000,
            last: 30015
        }
    );
    assert_eq!(ledger.totals.static_band, None);
    assert_eq!((ledger.totals.all.used, ledger.totals.all.free), (5, 11));
    assert_eq!(ledger.totals.dynamic, ledger.totals.all);
    assert!(
        ledger
            .consumers
            .iter()
            .all(|c| c.band == Some(BandName::Dynamic))
    );
    // No band is safe for hand-picked ports, and the advice says so.
    let manual = only(&ledger, FindingKind::ManualPortInDynamicBand);
    assert_eq!(
        object_ports(manual),
        [("default/picked".to_owned(), vec![30003])]
    );
    assert!(
        manual.change.contains("too small to be split"),
        "{}",
        manual.change
    );
    let json = serde_json::to_value(&ledger).unwrap();
    assert!(json["bands"]["static"].is_null());
    assert!(json["totals"]["static"].is_null());
    let table = ledger.render_table();
    assert!(
        table.contains("not split into bands (16 ports or fewer)"),
        "{table}"
    );
    assert!(
        !table.lines().any(|line| line.starts_with("static ")),
        "{table}"
    );
}

#[test]
fn mixed_consumers_are_listed_and_counted() {
    let ledger = analyze_fixture("mixed");
    assert_eq!(
        consumer_rows(&ledger),
        [
            "30080 TCP node_port default/web static",
            "30553 TCP+UDP node_port default/dns dynamic",
            "31000 TCP load_balancer_node_port shop/checkout dynamic",
            "31443 TCP node_port default/web dynamic",
            "32000 TCP health_check_node_port shop/checkout dynamic",
        ]
    );
    let dns = &ledger.consumers[1];
    assert_eq!(dns.port_names, ["dns-tcp", "dns-udp"]);
    assert_eq!(dns.service_ports, [53, 53]);
    assert_eq!(
        ledger.totals.consumers_by_kind,
        ConsumerCounts {
            node_port: 3,
            load_balancer_node_port: 1,
            health_check_node_port: 1
        }
    );
    let totals = &ledger.totals;
    assert_eq!((totals.all.used, totals.all.free), (5, 2763));
    assert_eq!(totals.static_band.unwrap().used, 1);
    assert_eq!(totals.dynamic.used, 4);
    assert_eq!((totals.unallocated, totals.outside_range), (0, 0));
    // A static-band port without apply records is probably hand-picked; others are unknown.
    assert_eq!(ledger.consumers[0].allocation, Allocation::LikelyManual);
    assert_eq!(ledger.consumers[1].allocation, Allocation::Unknown);
    assert_eq!(
        kinds(&ledger),
        [
            FindingKind::LoadBalancerNodePortsMaybeUnneeded,
            FindingKind::HealthCheckNodePort
        ]
    );
    let hc = only(&ledger, FindingKind::HealthCheckNodePort);
    assert_eq!(
        object_ports(hc),
        [("shop/checkout".to_owned(), vec![32000])]
    );
    assert!(
        hc.reasoning
            .contains("changes what the load balancer probes, not what the API server allocates")
    );
}

/// Node ports are family-less: a dual-stack Service's node port is one port of the range
/// (the API server allocates one per Service port, whatever `ipFamilies`), its health check
/// node port too, and an IPv6-only Service's node ports count like an IPv4 one's.
#[test]
fn a_dual_stack_service_counts_once() {
    let dir = ScratchDir::new("ledger-dual-stack");
    dir.write(
        "services.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: shop}\nspec:\n  \
         type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - {name: \
         http, port: 80, nodePort: 30080}\n---\napiVersion: v1\nkind: Service\nmetadata: \
         {name: v6, namespace: shop}\nspec:\n  type: NodePort\n  ipFamilies: [IPv6]\n  ports:\n  \
         - {name: http, port: 80, nodePort: 30081}\n",
    );
    let ledger = analyze(&NodePortRange::DEFAULT, &load(dir.path()), None);
    assert_eq!(
        consumer_rows(&ledger),
        [
            "30080 TCP load_balancer_node_port shop/dual static",
            "30081 TCP node_port shop/v6 static",
            "32000 TCP health_check_node_port shop/dual dynamic",
        ]
    );
    assert_eq!(ledger.totals.all.used, 3);
    assert!(
        ledger.findings_of(FindingKind::Conflict).next().is_none(),
        "{:?}",
        kinds(&ledger)
    );
}

#[test]
fn cluster_ip_and_external_name_services_are_ignored() {
    let ledger = analyze_fixture("mixed");
    assert!(
        ledger
            .consumers
            .iter()
            .all(|c| c.namespace != "shop" || c.name == "checkout")
    );
    // A stray nodePort on a ClusterIP Service is not counted but is pointed out.
    let ledger = analyze_fixture("outside-range");
    assert!(!ledger.consumers.iter().any(|c| c.name == "stray"));
    let ignored = only(&ledger, FindingKind::IgnoredNodePort);
    assert_eq!(
        object_ports(ignored),
        [("legacy/stray".to_owned(), vec![30002])]
    );
}

#[test]
fn allocate_load_balancer_node_ports_false() {
    let ledger = analyze_fixture("allocate-false");
    assert_eq!(
        consumer_rows(&ledger),
        [
            "30500 TCP health_check_node_port default/lb-local dynamic",
            "30600 TCP load_balancer_node_port default/lb-explicit dynamic",
            "30700 TCP load_balancer_node_port default/lb-metallb dynamic",
            "30800 TCP load_balancer_node_port default/lb-default dynamic",
        ]
    );
    // Ports without nodePort are not waiting for one when allocation is off.
    assert_eq!(ledger.totals.unallocated, 0);
    assert_eq!(
        ledger
            .findings_of(FindingKind::UnallocatedNodePorts)
            .count(),
        0
    );
    // MetalLB does not use node ports; the explicit ones can go.
    let unneeded = only(&ledger, FindingKind::LoadBalancerNodePortsUnneeded);
    assert_eq!(
        object_ports(unneeded),
        [("default/lb-metallb".to_owned(), vec![30700])]
    );
    let note = unneeded.objects[0].note.as_deref().unwrap();
    assert!(
        note.contains("MetalLB") && note.contains("already false"),
        "{note}"
    );
    // lb-explicit asked for its port with allocation off: not second-guessed.
    let maybe = only(&ledger, FindingKind::LoadBalancerNodePortsMaybeUnneeded);
    assert_eq!(
        object_ports(maybe),
        [("default/lb-default".to_owned(), vec![30800])]
    );
}

#[test]
fn conflicts_follow_the_allocator() {
    let ledger = analyze_fixture("conflicts");
    let conflicts: Vec<(String, ObjectPorts)> = ledger
        .findings_of(FindingKind::Conflict)
        .map(|f| (f.summary.clone(), object_ports(f)))
        .collect();
    let claim = |name: &str, port: u16| (format!("default/{name}"), vec![port]);
    assert_eq!(
        conflicts,
        [
            (
                "node port 30100 is claimed 2 times by 2 Service(s)".to_owned(),
                vec![claim("a", 30100), claim("b", 30100)]
            ),
            (
                "node port 30200 is claimed 2 times by 2 Service(s)".to_owned(),
                vec![claim("c", 30200), claim("d", 30200)]
            ),
            (
                "node port 30400 is claimed 2 times by 1 Service(s)".to_owned(),
                vec![claim("f", 30400), claim("f", 30400)]
            ),
            (
                "node port 30500 is claimed 2 times by 1 Service(s)".to_owned(),
                vec![claim("g", 30500), claim("g", 30500)]
            ),
        ]
    );
    let conflict = ledger.findings_of(FindingKind::Conflict).nth(1).unwrap();
    assert_eq!(conflict.severity, Severity::Critical);
    assert_eq!(
        conflict.objects[0].note.as_deref(),
        Some("healthCheckNodePort TCP")
    );
    assert_eq!(
        conflict.objects[1].note.as_deref(),
        Some("nodePort of port 80 (http) TCP")
    );
    // Each number counts once, conflicting or not (30201 is c's own node port).
    assert_eq!(ledger.totals.all.used, 7);
    // Critical findings come first.
    assert_eq!(ledger.findings[0].kind, FindingKind::Conflict);
}

#[test]
fn tcp_and_udp_on_one_number_of_one_service_is_one_allocation() {
    let ledger = analyze_fixture("conflicts");
    let on = |port: u16| {
        ledger
            .consumers
            .iter()
            .filter(|c| c.port == port)
            .collect::<Vec<_>>()
    };
    let h = on(30600);
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].protocols, ["TCP", "UDP"]);
    // A health check (TCP) on the number of the same Service's UDP port shares the allocation.
    let e = on(30300);
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].claim, e[1].claim);
    assert!(!ledger.findings_of(FindingKind::Conflict).any(|f| {
        f.objects
            .iter()
            .any(|o| o.ports == [30300] || o.ports == [30600])
    }));
}

#[test]
fn ports_outside_the_range_are_reported_not_counted() {
    let ledger = analyze_fixture("outside-range");
    assert_eq!(ledger.totals.all.used, 1);
    assert_eq!(ledger.totals.outside_range, 2);
    let outside = only(&ledger, FindingKind::OutsideRange);
    assert_eq!(
        object_ports(outside),
        [("legacy/old".to_owned(), vec![29999, 32768])]
    );
    assert_eq!(outside.severity, Severity::Warning);
    let json = serde_json::to_value(&ledger).unwrap();
    assert!(
        json["consumers"][0]["band"].is_null(),
        "{}",
        json["consumers"][0]
    );
    // With the range the Services were made for, nothing is outside.
    let wider = analyze(&range("29000-32999"), &fixture("outside-range"), None);
    assert_eq!(wider.findings_of(FindingKind::OutsideRange).count(), 0);
    assert_eq!(wider.totals.all.used, 3);
}

#[test]
fn load_balancer_targets_decide_the_advice() {
    let ledger = analyze_fixture("load-balancers");
    let unneeded = only(&ledger, FindingKind::LoadBalancerNodePortsUnneeded);
    assert_eq!(
        object_ports(unneeded),
        [
            ("default/aws-ip".to_owned(), vec![31002]),
            ("default/metallb".to_owned(), vec![31003])
        ]
    );
    assert!(
        unneeded
            .change
            .contains("allocateLoadBalancerNodePorts: false")
    );
    assert!(unneeded.change.contains("not released by the field alone"));
    let maybe = only(&ledger, FindingKind::LoadBalancerNodePortsMaybeUnneeded);
    assert_eq!(
        object_ports(maybe),
        [("default/cloud".to_owned(), vec![31005, 31006])]
    );
    assert!(
        maybe
            .change
            .contains("Unsafe for node-targeting load balancers")
    );
    // Instance targets need their node ports: no advice to drop them.
    assert!(
        ledger
            .findings
            .iter()
            .all(|f| f.objects.iter().all(|o| o.name != "aws-instance"))
    );
    // IP targets: Local buys nothing, Cluster releases the health check port.
    let hc = only(&ledger, FindingKind::HealthCheckNodePort);
    let note = hc.objects[0].note.as_deref().unwrap();
    assert!(
        note.contains("IP targets")
            && note.contains("externalTrafficPolicy: Cluster releases the port"),
        "{note}"
    );
}

#[test]
fn manual_ports_in_the_dynamic_band_need_apply_records() {
    let ledger = analyze_fixture("manual");
    let allocation = |port: u16| {
        ledger
            .consumers
            .iter()
            .find(|c| c.port == port)
            .unwrap()
            .allocation
    };
    assert_eq!(allocation(31500), Allocation::Manual); // last-applied-configuration
    assert_eq!(allocation(31501), Allocation::Automatic); // last-applied without nodePort
    assert_eq!(allocation(31502), Allocation::Manual); // server-side apply
    assert_eq!(allocation(31503), Allocation::Automatic); // applied, but not this nodePort
    assert_eq!(allocation(30010), Allocation::Manual); // applied, static band: fine
    assert_eq!(allocation(30020), Allocation::LikelyManual);
    let finding = only(&ledger, FindingKind::ManualPortInDynamicBand);
    assert_eq!(finding.severity, Severity::Warning);
    assert_eq!(
        object_ports(finding),
        [
            ("default/applied-manual".to_owned(), vec![31500]),
            ("default/ssa-manual".to_owned(), vec![31502])
        ]
    );
    assert!(
        finding
            .change
            .contains("static band 30000-30085 (84 free: 30000, 30001, 30002)"),
        "{}",
        finding.change
    );
}

#[test]
fn missing_node_ports_are_demand_on_the_range() {
    let ledger = analyze_fixture("unallocated");
    // new-nodeport: 80 and 53 (TCP+UDP share one); new-lb: 443 and its health check port;
    // partial: the UDP port reuses the TCP port's node port.
    assert_eq!(ledger.totals.unallocated, 4);
    let finding = only(&ledger, FindingKind::UnallocatedNodePorts);
    assert_eq!(finding.severity, Severity::Info);
    let notes: Vec<String> = finding
        .objects
        .iter()
        .map(|o| format!("{}: {}", o.name, o.note.as_deref().unwrap()))
        .collect();
    assert_eq!(
        notes,
        [
            "new-lb: port 443/TCP (https), healthCheckNodePort",
            "new-nodeport: port 80/TCP (http), port 53/TCP (dns-tcp)",
        ]
    );
}

#[test]
fn local_port_range_overlap() {
    let services = fixture("mixed");
    let ledger = analyze(&NodePortRange::DEFAULT, &services, Some((32000, 60999)));
    let finding = only(&ledger, FindingKind::LocalPortRangeOverlap);
    assert!(
        finding
            .summary
            .contains("32000-60999 overlaps the node port range on 32000-32767 (768 ports)")
    );
    assert!(
        finding
            .change
            .contains("net.ipv4.ip_local_reserved_ports=32000-32767")
    );
    assert_eq!(
        ledger.local_port_range,
        Some(PortSpan {
            first: 32000,
            last: 60999
        })
    );
    // The kernel default (32768-60999) starts right above the default range.
    for local in [Some((32768, 60999)), Some((1024, 29999)), None] {
        let ledger = analyze(&NodePortRange::DEFAULT, &services, local);
        assert_eq!(
            ledger
                .findings_of(FindingKind::LocalPortRangeOverlap)
                .count(),
            0,
            "{local:?}"
        );
    }
}

#[test]
fn order_of_services_does_not_matter() {
    let mut services = fixture("conflicts");
    let forward = analyze(&NodePortRange::DEFAULT, &services, None);
    services.reverse();
    let backward = analyze(&NodePortRange::DEFAULT, &services, None);
    assert_eq!(consumer_rows(&forward), consumer_rows(&backward));
    assert_eq!(forward.findings, backward.findings);
}

#[test]
fn json_shape() {
    let ledger = analyze(
        &NodePortRange::DEFAULT,
        &fixture("mixed"),
        Some((32768, 60999)),
    );
    let json = serde_json::to_value(&ledger).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "bands",
            "consumers",
            "findings",
            "local_port_range",
            "range",
            "totals"
        ]
    );
    assert_eq!(
        json["range"],
        serde_json::json!({"first": 30000, "last": 32767, "size": 2768, "band_offset": 86})
    );
    assert_eq!(
        json["bands"],
        serde_json::json!({"static": {"first": 30000, "last": 30085}, "dynamic": {"first": 30086, "last": 32767}})
    );
    assert_eq!(
        json["totals"]["static"],
        serde_json::json!({"size": 86, "used": 1, "free": 85, "use_percent": 1.2})
    );
    assert_eq!(json["totals"]["all"]["free"], 2763);
    assert_eq!(
        json["totals"]["consumers_by_kind"],
        serde_json::json!({"node_port": 3, "load_balancer_node_port": 1, "health_check_node_port": 1})
    );
    assert_eq!(
        json["consumers"][1],
        serde_json::json!({
            "port": 30553, "protocols": ["TCP", "UDP"], "kind": "node_port",
            "namespace": "default", "name": "dns", "port_names": ["dns-tcp", "dns-udp"],
            "service_ports": [53, 53], "band": "dynamic", "allocation": "unknown"
        })
    );
    let finding = &json["findings"][0];
    assert_eq!(finding["kind"], "load_balancer_node_ports_maybe_unneeded");
    assert_eq!(finding["severity"], "info");
    for field in ["summary", "reasoning", "change"] {
        assert!(
            finding[field].as_str().is_some_and(|text| !text.is_empty()),
            "{field}"
        );
    }
    assert_eq!(finding["objects"][0]["ports"], serde_json::json!([31000]));
    assert_eq!(
        json["local_port_range"],
        serde_json::json!({"first": 32768, "last": 60999})
    );
}

#[test]
fn table_shows_range_totals_consumers_and_findings() {
    let ledger = analyze(
        &NodePortRange::DEFAULT,
        &fixture("conflicts"),
        Some((32000, 60999)),
    );
    let table = ledger.render_table();
    let has_line = |expected: &str| table.lines().any(|line| line == expected);
    for expected in [
        "NODE PORT RANGE 30000-32767 (2768 ports)",
        "  static band   30000-30085    86 ports  for hand-picked node ports",
        "  dynamic band  30086-32767  2682 ports  automatic allocation takes these first",
        "  node net.ipv4.ip_local_port_range: 32000-60999",
        "BAND     SIZE  USED  FREE  USE %",
        "static     86     0    86   0.0%",
        "dynamic  2682     7  2675   0.3%",
        "all      2768     7  2761   0.3%",
        "PORT   PROTO    KIND          NAMESPACE/NAME  PORT-NAME        BAND     ALLOCATION",
        "30100  TCP      NodePort      default/a       http             dynamic  unknown",
        "30300  TCP      HealthCheck   default/e       -                dynamic  unknown",
        "30600  TCP+UDP  NodePort      default/h       dns-tcp,dns-udp  dynamic  unknown",
        "FINDINGS: 4 critical, 1 warning, 2 info",
        "[critical] conflict: node port 30100 is claimed 2 times by 2 Service(s)",
        "  objects: default/a 30100: nodePort of port 80 (http) TCP",
        "           default/b 30100: nodePort of port 53 (dns) UDP",
    ] {
        assert!(has_line(expected), "missing line {expected:?} in:\n{table}");
    }
    assert!(
        table.contains("[warning] local_port_range_overlap: "),
        "{table}"
    );
    let longest = table.lines().map(str::len).max().unwrap();
    assert!(longest <= 100, "a line of {longest} columns in:\n{table}");
}
