//! The desired-state function, case by case: Services and EndpointSlices written as the
//! manifests users write, and what the datapath must then hold.

use std::{collections::BTreeMap, net::SocketAddrV4};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;

const NODE: &str = "node-a";

fn node() -> NodeContext {
    NodeContext {
        node_name: NODE.into(),
        zone: String::new(),
        node_addresses: vec!["198.18.0.1".parse().unwrap(), "198.18.0.5".parse().unwrap()],
        node_addresses_v6: vec!["fd00:18::1".parse().unwrap()],
        proxy_name: None,
        guard: Default::default(),
        source_ranges_on_node_ports: false,
    }
}

/// Parses a multi-document YAML string into Services and EndpointSlices.
fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_norway::Value::deserialize(doc).expect("valid YAML");
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => services.push(serde_norway::from_value(value).expect("a Service")),
            Some("EndpointSlice") => {
                slices.push(serde_norway::from_value(value).expect("an EndpointSlice"))
            }
            None if value.is_null() => {}
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (services, slices)
}

use serde::Deserialize as _;

fn compute(yaml: &str) -> Desired {
    compute_on(yaml, &node())
}

fn compute_on(yaml: &str, node: &NodeContext) -> Desired {
    let (services, slices) = objects(yaml);
    desired_state(&services, &slices, node)
}

fn key(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortKey {
    ServicePortKey {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
        protocol,
    }
}

/// Who serves each frontend in a desired state (what the maps would hold).
fn holders(
    services: &BTreeMap<ServicePortKey, Arc<DesiredService>>,
) -> BTreeMap<FrontendId, ServicePortKey> {
    services
        .iter()
        .flat_map(|(k, ds)| {
            ds.frontends
                .iter()
                .map(move |f| ((f.addr.into(), k.protocol), k.clone()))
        })
        .collect()
}

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn frontend_addrs(svc: &DesiredService) -> Vec<(String, FrontendKind)> {
    svc.frontends
        .iter()
        .map(|f| (f.addr.to_string(), f.kind))
        .collect()
}

/// Backends as `addr -> (local, in_table)`.
fn backend_view(svc: &DesiredService) -> BTreeMap<String, (bool, bool)> {
    svc.backends
        .iter()
        .map(|(a, b)| (a.to_string(), (b.local, b.in_table)))
        .collect()
}

const WEB: &str = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: shop }
spec:
  type: NodePort
  ports:
  - { name: http, port: 80, targetPort: http, nodePort: 30080 }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-abc, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080, protocol: TCP } ]
endpoints:
- { addresses: [10.0.1.1], nodeName: node-a, conditions: { ready: true } }
- { addresses: [10.0.2.1], nodeName: node-b, conditions: { ready: true } }
"#;

#[test]
fn node_port_service_answers_on_every_node_address() {
    let d = compute(WEB);
    let svc = &d.services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(
        frontend_addrs(svc),
        vec![
            ("198.18.0.1:30080".into(), FrontendKind::NodePort),
            ("198.18.0.5:30080".into(), FrontendKind::NodePort)
        ]
    );
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([
            ("10.0.1.1:8080".into(), (true, true)),
            ("10.0.2.1:8080".into(), (false, true))
        ])
    );
    assert!(!svc.local_only && svc.affinity_timeout_s.is_none() && svc.source_ranges.is_empty());
    assert!(d.health_checks.is_empty() && d.notices.is_empty());
}

#[test]
fn tcp_and_udp_on_one_port_are_two_services() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: dns, namespace: default }
spec:
  type: NodePort
  ports:
  - { name: dns-tcp, port: 53, protocol: TCP, nodePort: 30053 }
  - { name: dns-udp, port: 53, protocol: UDP, nodePort: 30053 }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: dns-1, namespace: default, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { name: dns-tcp, port: 5353, protocol: TCP }, { name: dns-udp, port: 5354, protocol: UDP } ]
endpoints: [ { addresses: [10.0.1.9], nodeName: node-a } ]
"#,
    );
    let tcp = &d.services[&key("default", "dns", "dns-tcp", Protocol::Tcp)];
    let udp = &d.services[&key("default", "dns", "dns-udp", Protocol::Udp)];
    assert_eq!(
        tcp.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.9:5353")]
    );
    assert_eq!(
        udp.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.9:5354")]
    );
    assert_eq!(tcp.frontends.iter().next().unwrap().addr.port(), 30053);
    assert_eq!(udp.frontends.iter().next().unwrap().addr.port(), 30053);
}

#[test]
fn load_balancer_gets_node_ports_and_ingress_ips_but_not_proxy_mode_or_hostnames() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: lb, namespace: default }
spec:
  type: LoadBalancer
  ports: [ { port: 443, nodePort: 31443 } ]
status:
  loadBalancer:
    ingress:
    - { ip: 203.0.113.10 }
    - { ip: 203.0.113.11, ipMode: Proxy }
    - { hostname: lb.example.com }
    - { ip: "2001:db8::1" }
"#,
    );
    let svc = &d.services[&key("default", "lb", "", Protocol::Tcp)];
    assert_eq!(
        frontend_addrs(svc),
        vec![
            ("198.18.0.1:31443".into(), FrontendKind::NodePort),
            ("198.18.0.5:31443".into(), FrontendKind::NodePort),
            ("203.0.113.10:443".into(), FrontendKind::LoadBalancer),
        ]
    );
    // The IPv6 ingress IP is for kube-proxy's IPv6 proxier, which does not take an IPv4
    // Service: nobody serves it, and it is nothing of this Service's.
    assert!(
        d.services_v6.is_empty() && d.notices.is_empty(),
        "{:?}",
        d.notices
    );
}

#[test]
fn load_balancer_without_node_ports_has_only_its_ingress_ips() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: lb, namespace: default }
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  ports: [ { port: 443 } ]
status: { loadBalancer: { ingress: [ { ip: 203.0.113.10 } ] } }
"#,
    );
    let svc = &d.services[&key("default", "lb", "", Protocol::Tcp)];
    assert_eq!(
        frontend_addrs(svc),
        vec![("203.0.113.10:443".into(), FrontendKind::LoadBalancer)]
    );
}

#[test]
fn external_ips_work_for_any_type_and_cluster_ip_alone_is_not_ours() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: ext, namespace: default }
spec:
  type: ClusterIP
  externalIPs: [198.51.100.7]
  ports: [ { port: 8443, protocol: TCP } ]
---
kind: Service
apiVersion: v1
metadata: { name: internal, namespace: default }
spec:
  ports: [ { port: 80 } ]
"#,
    );
    assert_eq!(d.services.len(), 1, "{:?}", d.services.keys());
    let svc = &d.services[&key("default", "ext", "", Protocol::Tcp)];
    assert_eq!(
        frontend_addrs(svc),
        vec![("198.51.100.7:8443".into(), FrontendKind::ExternalIp)]
    );
}

#[test]
fn external_name_headless_and_other_proxies_are_ignored() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: alias, namespace: default }
spec: { type: ExternalName, externalName: example.com, externalIPs: [198.51.100.1], ports: [ { port: 80 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: headless, namespace: default }
spec: { clusterIP: None, externalIPs: [198.51.100.2], ports: [ { port: 80 } ] }
---
kind: Service
apiVersion: v1
metadata:
  name: theirs
  namespace: default
  labels: { service.kubernetes.io/service-proxy-name: other-proxy }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30001 } ] }
"#,
    );
    assert!(d.services.is_empty(), "{:?}", d.services.keys());
}

#[test]
fn a_service_labelled_with_our_proxy_name_is_ours() {
    let yaml = r#"
kind: Service
apiVersion: v1
metadata:
  name: mine
  namespace: default
  labels: { service.kubernetes.io/service-proxy-name: nodeport }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30001 } ] }
"#;
    let ours = NodeContext {
        proxy_name: Some("nodeport".into()),
        ..node()
    };
    assert_eq!(compute_on(yaml, &ours).services.len(), 1);
    assert!(compute(yaml).services.is_empty());
}

#[test]
fn sctp_ports_are_skipped_and_an_ipv4_service_has_no_ipv6_endpoints() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: mixed, namespace: default }
spec:
  type: NodePort
  ports:
  - { name: sig, port: 3868, protocol: SCTP, nodePort: 30868 }
  - { name: web, port: 80, nodePort: 30080 }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: mixed-v6, namespace: default, labels: { kubernetes.io/service-name: mixed } }
addressType: IPv6
ports: [ { name: web, port: 8080 } ]
endpoints: [ { addresses: ["fd00::1"], nodeName: node-a } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: mixed-v4, namespace: default, labels: { kubernetes.io/service-name: mixed } }
addressType: IPv4
ports: [ { name: web, port: 8080 } ]
endpoints: [ { addresses: [10.0.1.1], nodeName: node-a } ]
"#,
    );
    assert_eq!(d.services.len(), 1);
    let svc = &d.services[&key("default", "mixed", "web", Protocol::Tcp)];
    assert_eq!(
        svc.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.1:8080")]
    );
    // The IPv6 slice is an IPv6 proxier's, which does not take this IPv4 Service.
    assert!(d.services_v6.is_empty());
    let kinds: Vec<NoticeKind> = d.notices.iter().map(|n| n.kind).collect();
    assert_eq!(kinds, [NoticeKind::SctpSkipped]);
}

#[test]
fn a_named_target_port_is_resolved_per_slice() {
    // During a rollout old pods serve "http" on 8080 and new ones on 9090.
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec: { type: NodePort, ports: [ { name: http, port: 80, targetPort: http, nodePort: 30080 } ] }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-old, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080 } ]
endpoints: [ { addresses: [10.0.1.1] } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-new, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 9090 } ]
endpoints: [ { addresses: [10.0.1.2] } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: other, namespace: default, labels: { kubernetes.io/service-name: other } }
addressType: IPv4
ports: [ { name: http, port: 7070 } ]
endpoints: [ { addresses: [10.0.9.9] } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-elsewhere, namespace: other-ns, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 6060 } ]
endpoints: [ { addresses: [10.0.8.8] } ]
"#,
    );
    let svc = &d.services[&key("default", "web", "http", Protocol::Tcp)];
    assert_eq!(
        svc.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.1:8080"), &sa("10.0.1.2:9090")]
    );
}

const CONDITIONS: &str = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints:
- { addresses: [10.0.1.1], nodeName: node-a, conditions: { ready: true } }
- { addresses: [10.0.1.2], nodeName: node-a }
- { addresses: [10.0.1.3], nodeName: node-a, conditions: { ready: false, serving: true, terminating: true } }
- { addresses: [10.0.1.4], nodeName: node-b, conditions: { ready: false, serving: false, terminating: true } }
- { addresses: [10.0.1.5], nodeName: node-b, conditions: { ready: false, serving: false } }
"#;

#[test]
fn ready_endpoints_take_new_connections_and_the_others_only_finish_theirs() {
    let d = compute(CONDITIONS);
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    // Unset conditions mean ready. Terminating and not-serving ones stay for their connections.
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([
            ("10.0.1.1:8080".into(), (true, true)),
            ("10.0.1.2:8080".into(), (true, true)),
            ("10.0.1.3:8080".into(), (true, false)),
            ("10.0.1.4:8080".into(), (false, false)),
            ("10.0.1.5:8080".into(), (false, false)),
        ])
    );
}

#[test]
fn an_unset_serving_condition_counts_as_serving_like_kube_proxy() {
    // Not ready, terminating, serving unset: kube-proxy treats it as serving, so with no ready
    // endpoint it takes new connections.
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints: [ { addresses: [10.0.1.3], nodeName: node-a, conditions: { ready: false, terminating: true } } ]
"#,
    );
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([("10.0.1.3:8080".into(), (true, true))])
    );
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_take_over_but_never_not_serving_ones() {
    let yaml = CONDITIONS
        .replace(
            "- { addresses: [10.0.1.1], nodeName: node-a, conditions: { ready: true } }\n",
            "",
        )
        .replace("- { addresses: [10.0.1.2], nodeName: node-a }\n", "");
    let d = compute(&yaml);
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([
            ("10.0.1.3:8080".into(), (true, true)),
            ("10.0.1.4:8080".into(), (false, false)),
            ("10.0.1.5:8080".into(), (false, false)),
        ])
    );
}

const LOCAL_LB: &str = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [ { port: 80, nodePort: 30080 }, { name: alt, port: 81, nodePort: 30081 } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 }, { name: alt, port: 8081 } ]
endpoints:
- { addresses: [10.0.1.1], nodeName: node-a }
- { addresses: [10.0.1.2], nodeName: node-a, conditions: { ready: false, serving: true, terminating: true } }
- { addresses: [10.0.2.1], nodeName: node-b }
"#;

#[test]
fn external_traffic_policy_local_uses_local_endpoints_only_and_serves_a_health_check() {
    let d = compute(LOCAL_LB);
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    assert!(svc.local_only);
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([
            ("10.0.1.1:8080".into(), (true, true)),
            ("10.0.1.2:8080".into(), (true, false))
        ])
    );
    // One ready local address, counted once over the Service's two ports.
    assert_eq!(
        d.health_checks,
        BTreeMap::from([(
            32000,
            HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints: LocalEndpoints::ipv4(1)
            }
        )])
    );
}

/// kube-proxy counts what its endpoints map holds (pkg/proxy/endpoints.go,
/// `LocalReadyEndpoints`): slices without ports hold nothing, and an endpoint is its first
/// address. Counting more would answer 200 on a node that drops the traffic.
#[test]
fn the_health_check_counts_only_first_addresses_of_slices_with_ports() {
    let yaml = |extra_slices: &str| {
        format!(
            "{LOCAL_LB}---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: web-portless, namespace: default, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
endpoints:
- {{ addresses: [10.0.1.7], nodeName: node-a }}
{extra_slices}"
        )
    };
    // A ready local endpoint in a slice without ports: not counted.
    assert_eq!(
        compute(&yaml("")).health_checks[&32000].local_endpoints,
        LocalEndpoints::ipv4(1)
    );
    // A second address of an endpoint: not counted either.
    let two_addresses = "---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-multi, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints:
- { addresses: [10.0.1.8, 10.0.1.9], nodeName: node-a }
";
    assert_eq!(
        compute(&yaml(two_addresses)).health_checks[&32000].local_endpoints,
        LocalEndpoints::ipv4(2)
    );
}

#[test]
fn only_terminating_local_endpoints_fail_the_health_check_but_still_serve() {
    let d = compute(&LOCAL_LB.replace("- { addresses: [10.0.1.1], nodeName: node-a }\n", ""));
    assert_eq!(
        d.health_checks[&32000].local_endpoints,
        LocalEndpoints::ipv4(0)
    );
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    // No ready endpoint anywhere it may use: the serving-terminating one takes over.
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([("10.0.1.2:8080".into(), (true, true))])
    );
}

#[test]
fn a_node_without_local_endpoints_gets_an_empty_local_service() {
    let other = NodeContext {
        node_name: "node-c".into(),
        ..node()
    };
    let d = compute_on(LOCAL_LB, &other);
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    assert!(svc.backends.is_empty() && svc.local_only);
    assert_eq!(
        d.health_checks[&32000].local_endpoints,
        LocalEndpoints::ipv4(0)
    );
}

#[test]
fn health_checks_only_for_local_load_balancers() {
    let d = compute(&LOCAL_LB.replace(
        "externalTrafficPolicy: Local",
        "externalTrafficPolicy: Cluster",
    ));
    assert!(d.health_checks.is_empty());
}

#[test]
fn session_affinity_client_ip_with_default_and_explicit_timeout() {
    let base = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec:
  type: NodePort
  sessionAffinity: ClientIP
  ports: [ { port: 80, nodePort: 30080 } ]
"#;
    let d = compute(base);
    assert_eq!(
        d.services[&key("default", "web", "", Protocol::Tcp)].affinity_timeout_s,
        Some(10_800)
    );
    let explicit = base.replace(
        "sessionAffinity: ClientIP",
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: { clientIP: { timeoutSeconds: 60 } }",
    );
    assert_eq!(
        compute(&explicit).services[&key("default", "web", "", Protocol::Tcp)].affinity_timeout_s,
        Some(60)
    );
    let none = base.replace("sessionAffinity: ClientIP", "sessionAffinity: None");
    assert_eq!(
        compute(&none).services[&key("default", "web", "", Protocol::Tcp)].affinity_timeout_s,
        None
    );
}

/// kube-proxy filters LoadBalancer IPs by loadBalancerSourceRanges, never node ports nor
/// externalIPs: "nodeports are not subject to loadBalancerSourceRanges, and we can't change
/// that" (pkg/proxy/iptables/proxier.go and nftables/proxier.go, syncProxyRules).
/// `--source-ranges-on-node-ports` filters the node ports too.
#[test]
fn source_ranges_apply_to_load_balancer_ips_and_on_request_to_node_ports() {
    let yaml = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec:
  type: LoadBalancer
  externalIPs: [198.51.100.7]
  loadBalancerSourceRanges: [10.1.2.3/8, 192.0.2.9, "2001:db8::/32", not-a-cidr]
  ports: [ { port: 80, nodePort: 30080 } ]
status: { loadBalancer: { ingress: [ { ip: 203.0.113.10 } ] } }
"#;
    let strict = NodeContext {
        source_ranges_on_node_ports: true,
        ..node()
    };
    for (node, node_ports_filtered) in [(node(), false), (strict, true)] {
        let d = compute_on(yaml, &node);
        let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
        let ranges: Vec<String> = svc.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(
            ranges,
            ["10.0.0.0/8", "192.0.2.9/32"],
            "masked to the prefix"
        );
        for f in &svc.frontends {
            let filtered = match f.kind {
                FrontendKind::LoadBalancer => true,
                FrontendKind::NodePort => node_ports_filtered,
                FrontendKind::ExternalIp => false,
            };
            assert_eq!(f.source_ranges, filtered, "{f:?}");
        }
        // The IPv6 range is for IPv6 frontends, which an IPv4 Service has none of.
        let kinds: Vec<NoticeKind> = d.notices.iter().map(|n| n.kind).collect();
        assert_eq!(kinds, [NoticeKind::InvalidSourceRange]);
    }
}

#[test]
fn the_older_service_keeps_a_contested_frontend() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: newer, namespace: default, creationTimestamp: "2026-01-02T00:00:00Z" }
spec: { externalIPs: [198.51.100.7], ports: [ { port: 80 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: older, namespace: default, creationTimestamp: "2026-01-01T00:00:00Z" }
spec: { externalIPs: [198.51.100.7], ports: [ { port: 80 } ] }
"#,
    );
    assert_eq!(
        d.services.keys().map(|k| &*k.name).collect::<Vec<_>>(),
        ["older"]
    );
    let notice = d
        .notices
        .iter()
        .find(|n| n.kind == NoticeKind::FrontendConflict)
        .expect("a conflict notice");
    assert!(
        notice.object.contains("newer") && notice.detail.contains("older"),
        "{notice:?}"
    );
}

#[test]
fn a_service_without_endpoints_keeps_its_frontends() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: lonely }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30099 } ] }
"#,
    );
    let svc = &d.services[&key("default", "lonely", "", Protocol::Tcp)];
    assert_eq!(svc.frontends.len(), 2);
    assert!(svc.backends.is_empty());
}

#[test]
fn the_same_input_in_any_order_gives_the_same_state() {
    let (mut services, mut slices) = objects(&format!(
        "{WEB}---{}",
        CONDITIONS
            .replace("name: web,", "name: web2,")
            .replace("service-name: web", "service-name: web2")
            .replace("30080", "30082")
    ));
    let a = desired_state(&services, &slices, &node());
    services.reverse();
    slices.reverse();
    assert_eq!(a, desired_state(&services, &slices, &node()));
}

/// The incremental path must agree with a computation from scratch after every step,
/// including a contested frontend passing to the younger Service when the older one goes.
#[test]
fn incremental_updates_equal_a_full_recomputation() {
    use std::sync::Arc;
    let contested = r#"
kind: Service
apiVersion: v1
metadata: { name: older, namespace: default, creationTimestamp: "2026-01-01T00:00:00Z" }
spec: { externalIPs: [198.51.100.7], ports: [ { port: 80 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: newer, namespace: default, creationTimestamp: "2026-01-02T00:00:00Z" }
spec: { externalIPs: [198.51.100.7], ports: [ { port: 80 } ] }
"#;
    let steps = [
        format!("{WEB}---{contested}"),
        // An endpoint of web changes; the rest stays the same object.
        format!("{}---{contested}", WEB.replace("10.0.2.1", "10.0.2.9")),
        // The older contender goes: the newer one takes the frontend.
        format!(
            "{}---{}",
            WEB.replace("10.0.2.1", "10.0.2.9"),
            contested.split("---").nth(1).unwrap()
        ),
        // web goes entirely.
        contested.split("---").nth(1).unwrap().to_string(),
        String::new(),
    ];
    let mut reconciler = Reconciler::new(node());
    // Objects are shared across steps when unchanged, as a source would hand them out.
    let mut pool: Vec<Arc<Service>> = Vec::new();
    let mut slice_pool: Vec<Arc<EndpointSlice>> = Vec::new();
    for (i, yaml) in steps.iter().enumerate() {
        let (services, slices) = objects(yaml);
        let services: Vec<Arc<Service>> = services
            .into_iter()
            .map(|s| {
                pool.iter()
                    .find(|p| ***p == s)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(s))
            })
            .collect();
        let slices: Vec<Arc<EndpointSlice>> = slices
            .into_iter()
            .map(|s| {
                slice_pool
                    .iter()
                    .find(|p| ***p == s)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(s))
            })
            .collect();
        let held = holders(&reconciler.desired().services);
        let changes = reconciler.update(&services, &slices);
        let full = desired_state_held(
            &services.iter().map(|s| (**s).clone()).collect::<Vec<_>>(),
            &slices.iter().map(|s| (**s).clone()).collect::<Vec<_>>(),
            &node(),
            held,
        );
        assert_eq!(reconciler.desired().services, full.services, "step {i}");
        assert_eq!(
            reconciler.desired().health_checks,
            full.health_checks,
            "step {i}"
        );
        assert_eq!(reconciler.notices(), full.notices, "step {i}");
        if i == 2 {
            let newer = key("default", "newer", "", Protocol::Tcp);
            assert!(
                changes.services.contains(&newer),
                "the newer Service gained the frontend: {changes:?}"
            );
            assert!(
                !changes.services.iter().any(|k| &*k.name == "web"),
                "web did not change: {changes:?}"
            );
        }
        pool = services;
        slice_pool = slices;
    }
    assert!(reconciler.desired().services.is_empty());
}

#[test]
fn an_unchanged_update_changes_nothing() {
    use std::sync::Arc;
    let (services, slices) = objects(WEB);
    let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let mut reconciler = Reconciler::new(node());
    assert!(!reconciler.update(&services, &slices).is_empty());
    assert!(reconciler.update(&services, &slices).is_empty());
    // New node addresses recompute every node port.
    let moved = NodeContext {
        node_addresses: vec!["198.18.0.9".parse().unwrap()],
        ..node()
    };
    let changes = reconciler.set_node(moved);
    assert_eq!(changes.services.len(), 1);
    let svc = &reconciler.desired().services[&key("shop", "web", "http", Protocol::Tcp)];
    assert_eq!(
        frontend_addrs(svc),
        vec![("198.18.0.9:30080".into(), FrontendKind::NodePort)]
    );
}

/// One copy of a service port's desired state: the Service's computed output, the desired
/// state and (through `Desired`) the programmed maps' record share it, also when an equal copy
/// of the Service arrives.
#[test]
fn the_desired_state_shares_each_services_computed_state() {
    use std::sync::Arc;
    let (services, slices) = objects(WEB);
    let arcs = |services: &[Service]| -> Vec<Arc<Service>> {
        services.iter().cloned().map(Arc::new).collect()
    };
    let slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let mut reconciler = Reconciler::new(node());
    reconciler.update(&arcs(&services), &slices);
    let web = key("shop", "web", "http", Protocol::Tcp);
    let shared = |r: &Reconciler| -> Arc<DesiredService> {
        let cached = &r.cache[&("shop".to_owned(), "web".to_owned())];
        let (_, computed) = cached.output.ports.iter().find(|(k, _)| *k == web).unwrap();
        let desired = &r.desired().services[&web];
        assert!(Arc::ptr_eq(computed, desired), "one copy, shared");
        desired.clone()
    };
    let before = shared(&reconciler);
    // An equal copy of the Service (a relist, a rewritten file): recomputed, nothing changes,
    // and the desired state keeps its `Arc` (the syncer then compares no contents).
    assert!(reconciler.update(&arcs(&services), &slices).is_empty());
    assert!(Arc::ptr_eq(&before, &shared(&reconciler)));
}

/// The incremental path finds changes by identity (`diff`); it must agree with a computation
/// from scratch whatever a source hands it: objects replaced in place, added, removed,
/// relabelled to another Service, re-sent as equal copies, reordered, two Services of one
/// name, Services of another proxy, a node change. Every Service port whose desired state
/// changed must be among the reported changes (the syncer looks at no other).
#[test]
fn identity_diffs_agree_with_a_full_recomputation_over_random_edits() {
    use std::sync::Arc;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }
    fn service(rng: &mut Rng) -> Service {
        let name = format!("svc-{}", rng.below(8));
        let mut labels = serde_json::Map::new();
        if rng.below(6) == 0 {
            labels.insert(SERVICE_PROXY_NAME_LABEL.into(), "other".into());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "namespace": "ns",
                "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", rng.below(60)),
                "labels": labels,
            },
            "spec": {
                "type": "NodePort",
                // Few node ports, so Services contest them.
                "ports": [ { "port": 80, "nodePort": 30000 + rng.below(5) } ],
            },
        }))
        .unwrap()
    }
    fn slice(rng: &mut Rng) -> EndpointSlice {
        let mut labels = serde_json::Map::new();
        if rng.below(8) != 0 {
            labels.insert(
                SERVICE_NAME_LABEL.into(),
                format!("svc-{}", rng.below(9)).into(),
            );
        }
        let endpoints: Vec<_> = (0..rng.below(4))
            .map(|_| {
                // An address is always on the same node: the same address on two nodes (in
                // two slices) makes `local` depend on the slices' order, from scratch too.
                let host = 1 + rng.below(6);
                serde_json::json!({
                    "addresses": [format!("10.0.0.{host}")],
                    "nodeName": if host.is_multiple_of(2) { "node-a" } else { "node-b" },
                    "conditions": { "ready": rng.below(3) != 0 },
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": format!("slice-{}", rng.below(12)), "namespace": "ns", "labels": labels },
            "addressType": "IPv4",
            "ports": [ { "port": 8080 } ],
            "endpoints": endpoints,
        }))
        .unwrap()
    }
    fn sort<
        T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    >(
        v: &mut [Arc<T>],
    ) {
        v.sort_by(|a, b| a.metadata().name.cmp(&b.metadata().name));
    }
    fn edit<T: Clone>(rng: &mut Rng, v: &mut Vec<Arc<T>>, new: impl Fn(&mut Rng) -> T) {
        match rng.below(10) {
            // Replace one in place.
            0..=3 if !v.is_empty() => {
                let at = rng.below(v.len() as u64) as usize;
                v[at] = Arc::new(new(rng));
            }
            // An equal copy: a new object with the same content.
            4 if !v.is_empty() => {
                let at = rng.below(v.len() as u64) as usize;
                v[at] = Arc::new((*v[at]).clone());
            }
            5 | 6 if !v.is_empty() => {
                v.remove(rng.below(v.len() as u64) as usize);
            }
            // Out of order.
            7 if v.len() > 1 => {
                let a = rng.below(v.len() as u64) as usize;
                let b = rng.below(v.len() as u64) as usize;
                v.swap(a, b);
            }
            _ => {
                let at = rng.below(v.len() as u64 + 1) as usize;
                v.insert(at, Arc::new(new(rng)));
            }
        }
    }

    let mut fast_updates = 0;
    for seed in 0..40 {
        let mut rng = Rng(seed);
        let mut node = node();
        let mut reconciler = Reconciler::new(node.clone());
        let mut services: Vec<Arc<Service>> = Vec::new();
        let mut slices: Vec<Arc<EndpointSlice>> = Vec::new();
        for step in 0..60 {
            let before = reconciler.desired().services.clone();
            let mut changes = Changes::default();
            if rng.below(20) == 0 {
                node.proxy_name = if node.proxy_name.is_some() {
                    None
                } else {
                    Some("other".into())
                };
                changes = reconciler.set_node(node.clone());
            }
            for _ in 0..1 + rng.below(3) {
                if rng.below(2) == 0 {
                    edit(&mut rng, &mut services, service);
                } else {
                    edit(&mut rng, &mut slices, slice);
                }
            }
            // Mostly sorted, as sources hand them out; now and then not.
            if rng.below(4) != 0 {
                sort(&mut services);
                sort(&mut slices);
            }
            let fast = !reconciler.full_next && !reconciler.inputs.duplicates;
            let held = holders(&reconciler.desired().services);
            let more = reconciler.update(&services, &slices);
            if fast && !reconciler.inputs.duplicates {
                fast_updates += 1;
            }
            changes.services.extend(more.services);
            let owned = |v: &[Arc<Service>]| v.iter().map(|s| (**s).clone()).collect::<Vec<_>>();
            let full = desired_state_held(
                &owned(&services),
                &slices.iter().map(|s| (**s).clone()).collect::<Vec<_>>(),
                &node,
                held,
            );
            let at = format!("seed {seed} step {step}");
            let got = &reconciler.desired().services;
            assert_eq!(got, &full.services, "{at}");
            assert_eq!(
                reconciler.desired().health_checks,
                full.health_checks,
                "{at}"
            );
            assert_eq!(reconciler.notices(), full.notices, "{at}");
            for key in before.keys().chain(got.keys()) {
                if before.get(key) != got.get(key) {
                    assert!(changes.services.contains(key), "{at}: {key} not reported");
                }
            }
        }
    }
    // Both paths ran: the identity diff and, with duplicate names or a node change, the full.
    assert!(
        (600..2000).contains(&fast_updates),
        "{fast_updates} of 2400 updates took the identity diff"
    );
}

#[test]
fn an_address_in_two_slices_is_one_backend_whatever_the_order_of_the_slices() {
    let slice = |name: &str, node: &str, ready: bool| {
        format!(
            r#"
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: {name}, namespace: default, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [ {{ port: 8080 }} ]
endpoints: [ {{ addresses: [10.0.1.3], nodeName: {node}, conditions: {{ ready: {ready} }} }} ]
"#
        )
    };
    let service = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
"#;
    let here = slice("web-a", NODE, false);
    let there = slice("web-b", "node-z", true);
    for yaml in [
        format!("{service}{here}{there}"),
        format!("{service}{there}{here}"),
    ] {
        let d = compute(&yaml);
        let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
        assert_eq!(
            backend_view(svc),
            BTreeMap::from([("10.0.1.3:8080".into(), (true, true))]),
            "{yaml}"
        );
    }
}

/// Issue #16: a node port outside the range, in the SNAT range or on a port the node listens
/// on took the node's own traffic (a Service with nodePort 22 took over sshd). Each is refused
/// with a notice naming the object; everything else is served.
#[test]
fn frontends_that_would_take_the_nodes_own_ports_are_refused_and_the_rest_served() {
    use crate::listeners::Listener;
    let guarded = NodeContext {
        guard: PortGuard {
            node_port_range: Some(NodePortRange::DEFAULT),
            snat_ports: vec![NodePortRange::new(61000, 65535).unwrap()],
            listeners: [
                Listener {
                    protocol: Protocol::Tcp,
                    addr: None,
                    port: 22,
                },
                Listener {
                    protocol: Protocol::Tcp,
                    addr: None,
                    port: 30022,
                },
                // Bound to one node address: only that address's frontend is refused.
                Listener {
                    protocol: Protocol::Udp,
                    addr: Some("198.18.0.5".parse().unwrap()),
                    port: 30053,
                },
            ]
            .into(),
        },
        ..node()
    };
    let d = compute_on(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: shop }
spec: { type: NodePort, ports: [ { name: http, port: 80, nodePort: 30080 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: ssh, namespace: evil }
spec: { type: NodePort, ports: [ { port: 22, nodePort: 22 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: snat, namespace: evil }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 61001 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: busy, namespace: shop }
spec:
  type: NodePort
  ports:
  - { name: tcp, port: 22, nodePort: 30022 }
  - { name: udp, port: 22, nodePort: 30022, protocol: UDP }
---
kind: Service
apiVersion: v1
metadata: { name: dns, namespace: shop }
spec: { type: NodePort, ports: [ { port: 53, nodePort: 30053, protocol: UDP } ] }
---
kind: Service
apiVersion: v1
metadata: { name: vip, namespace: shop }
spec:
  type: LoadBalancer
  externalIPs: [198.51.100.7, 198.18.0.1]
  ports: [ { port: 22, nodePort: 30100 } ]
status: { loadBalancer: { ingress: [ { ip: 198.18.0.5 }, { ip: 203.0.113.10 } ] } }
"#,
        &guarded,
    );
    let served: Vec<(String, Vec<(String, FrontendKind)>)> = d
        .services
        .iter()
        .map(|(k, s)| (k.to_string(), frontend_addrs(s)))
        .collect();
    let nodeports = |port| {
        vec![
            (format!("198.18.0.1:{port}"), FrontendKind::NodePort),
            (format!("198.18.0.5:{port}"), FrontendKind::NodePort),
        ]
    };
    assert_eq!(
        served,
        [
            ("shop/busy:udp/UDP".to_owned(), nodeports(30022),),
            (
                "shop/dns/UDP".to_owned(),
                vec![("198.18.0.1:30053".to_owned(), FrontendKind::NodePort)],
            ),
            (
                "shop/vip/TCP".to_owned(),
                [
                    nodeports(30100),
                    vec![
                        ("198.51.100.7:22".to_owned(), FrontendKind::ExternalIp),
                        ("203.0.113.10:22".to_owned(), FrontendKind::LoadBalancer),
                    ]
                ]
                .concat(),
            ),
            ("shop/web:http/TCP".to_owned(), nodeports(30080)),
        ]
    );
    let refused: Vec<(NoticeKind, String)> = d
        .notices
        .iter()
        .map(|n| (n.kind, n.object.clone()))
        .collect();
    assert_eq!(
        refused,
        [
            (NoticeKind::NodePortOutsideRange, "evil/ssh/TCP".to_owned()),
            (NoticeKind::FrontendInSnatRange, "evil/snat/TCP".to_owned()),
            (
                NoticeKind::FrontendOnHostListener,
                "shop/busy:tcp/TCP".to_owned()
            ),
            (
                NoticeKind::FrontendOnHostListener,
                "shop/busy:tcp/TCP".to_owned()
            ),
            (
                NoticeKind::FrontendOnHostListener,
                "shop/dns/UDP".to_owned()
            ),
            // externalIP 198.18.0.1:22 and ingress 198.18.0.5:22: node addresses, sshd's port.
            (
                NoticeKind::FrontendOnHostListener,
                "shop/vip/TCP".to_owned()
            ),
            (
                NoticeKind::FrontendOnHostListener,
                "shop/vip/TCP".to_owned()
            ),
        ]
    );
    let ssh = d.notices.iter().next().unwrap();
    assert!(
        ssh.detail.contains("22") && ssh.detail.contains("30000-32767"),
        "{ssh:?}"
    );
    // Without a guard (the pure function's default), nothing is refused: the checks are
    // the guard's alone.
    assert!(compute_on("kind: Service\napiVersion: v1\nmetadata: { name: ssh }\nspec: { type: NodePort, ports: [ { port: 22, nodePort: 22 } ] }\n", &node()).services.len() == 1);
}

/// Issue #16: a Service claiming a node port another one serves took it over when its name
/// sorted first (manifests have no creationTimestamp), moving live traffic. The frontend stays
/// with the Service that has it; the newcomer is reported, and takes over only when the holder
/// lets go.
#[test]
fn a_newcomer_never_takes_a_frontend_that_is_served() {
    // Manifests: no creationTimestamp, the newcomer's name sorts first.
    a_newcomer_never_takes(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web-b, namespace: shop }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
"#,
        r#"
kind: Service
apiVersion: v1
metadata: { name: web-a, namespace: shop }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
"#,
    );
    // A cluster (after a restore, say): the newcomer is even the older Service.
    a_newcomer_never_takes(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web-b, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z" }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
"#,
        r#"
kind: Service
apiVersion: v1
metadata: { name: web-a, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z" }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
"#,
    );
}

fn a_newcomer_never_takes(holder: &str, newcomer: &str) {
    use std::sync::Arc;
    let arcs =
        |yaml: &str| -> Vec<Arc<Service>> { objects(yaml).0.into_iter().map(Arc::new).collect() };
    let (b, a) = (arcs(holder), arcs(newcomer));
    let served_by = |r: &Reconciler| -> Vec<String> {
        r.desired()
            .services
            .keys()
            .map(|k| k.name.to_string())
            .collect()
    };
    let mut reconciler = Reconciler::new(node());
    reconciler.update(&b, &[]);
    assert_eq!(served_by(&reconciler), ["web-b"]);

    let both = [a.clone(), b.clone()].concat();
    let changes = reconciler.update(&both, &[]);
    assert!(changes.services.is_empty(), "nothing moved: {changes:?}");
    assert_eq!(served_by(&reconciler), ["web-b"]);
    let notices: Vec<Notice> = reconciler.notices().into_iter().collect();
    assert_eq!(notices.len(), 2, "one per node address: {notices:?}");
    for n in &notices {
        assert_eq!(n.kind, NoticeKind::FrontendConflict);
        assert_eq!(n.object, "shop/web-a/TCP");
        assert!(n.detail.contains("shop/web-b/TCP"), "{n:?}");
    }
    // A change of the holder's endpoints, or of the node, moves nothing either.
    let moved = NodeContext {
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
        ..node()
    };
    reconciler.set_node(moved.clone());
    reconciler.update(&both, &[]);
    assert_eq!(served_by(&reconciler), ["web-b"]);

    // The holder goes: the newcomer takes over.
    reconciler.update(&a, &[]);
    assert_eq!(served_by(&reconciler), ["web-a"]);
    assert!(reconciler.notices().is_empty());

    // A restarted agent adopts what the maps hold: the same outcome from scratch.
    let pinned = holders(
        &Reconciler::new(moved.clone())
            .tap_update(&b)
            .desired()
            .services,
    );
    let (services, _) = objects(&format!("{newcomer}---{holder}"));
    let d = desired_state_held(&services, &[], &moved, pinned);
    assert_eq!(
        d.services.keys().map(|k| &*k.name).collect::<Vec<_>>(),
        ["web-b"]
    );
    // Without holders (the first start on a node), the older Service, then the name, wins.
    let d = desired_state(&services, &[], &moved);
    assert_eq!(
        d.services.keys().map(|k| &*k.name).collect::<Vec<_>>(),
        ["web-a"]
    );
}

trait TapUpdate {
    fn tap_update(self, services: &[std::sync::Arc<Service>]) -> Self;
}

impl TapUpdate for Reconciler {
    fn tap_update(mut self, services: &[std::sync::Arc<Service>]) -> Self {
        self.update(services, &[]);
        self
    }
}

/// Addresses as kube-proxy reads them: `ParseIPSloppy` (k8s.io/utils/net, used by
/// pkg/proxy/serviceport.go and endpointslicecache.go) takes leading zeros, and an endpoint is
/// its first address.
#[test]
fn leading_zeros_are_read_and_an_endpoint_is_its_first_address() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec:
  type: LoadBalancer
  externalIPs: [198.051.100.007]
  ports: [ { port: 80, nodePort: 30080 } ]
status: { loadBalancer: { ingress: [ { ip: 203.0.113.010 } ] } }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints:
- { addresses: [10.0.1.001, 10.0.1.2] }
"#,
    );
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    let vips: Vec<String> = svc
        .frontends
        .iter()
        .filter(|f| f.kind != FrontendKind::NodePort)
        .map(|f| f.addr.to_string())
        .collect();
    assert_eq!(vips, ["198.51.100.7:80", "203.0.113.10:80"]);
    assert_eq!(
        svc.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.1:8080")]
    );
}

/// A loadBalancerSourceRanges entry that is no CIDR never opens the load balancer: with no
/// valid entry left, nobody gets in (fail closed, with a notice). IPv6 entries alone leave
/// IPv4 frontends unfiltered, as kube-proxy filters per family.
#[test]
fn an_invalid_source_range_fails_closed() {
    let lb = |ranges: &str| {
        format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{ name: web, namespace: default }}
spec:
  type: LoadBalancer
  loadBalancerSourceRanges: {ranges}
  ports: [ {{ port: 80, nodePort: 30080 }} ]
status: {{ loadBalancer: {{ ingress: [ {{ ip: 203.0.113.10 }} ] }} }}
"#
        )
    };
    for (ranges, filtered, notices) in [
        ("[not-a-cidr]", true, &[NoticeKind::InvalidSourceRange][..]),
        ("[10.0.0.0/33]", true, &[NoticeKind::InvalidSourceRange]),
        (r#"["2001:db8::/32"]"#, false, &[]),
    ] {
        let d = compute(&lb(ranges));
        let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
        assert!(svc.source_ranges.is_empty(), "{ranges}");
        let vip = svc
            .frontends
            .iter()
            .find(|f| f.kind == FrontendKind::LoadBalancer)
            .expect("the LoadBalancer IP");
        assert_eq!(vip.source_ranges, filtered, "{ranges}");
        let kinds: Vec<NoticeKind> = d.notices.iter().map(|n| n.kind).collect();
        assert_eq!(kinds, notices, "{ranges}");
    }
}

/// kube-proxy's informers select Services and EndpointSlices without the
/// `service.kubernetes.io/headless` label (cmd/kube-proxy/app/server.go,
/// `noHeadlessEndpoints`): neither is served.
#[test]
fn objects_labelled_headless_are_left_alone() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: marked, namespace: default, labels: { service.kubernetes.io/headless: "" } }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30080 } ] }
---
kind: Service
apiVersion: v1
metadata: { name: web, namespace: default }
spec: { type: NodePort, ports: [ { port: 80, nodePort: 30081 } ] }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints: [ { addresses: [10.0.1.1] } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata:
  name: web-2
  namespace: default
  labels: { kubernetes.io/service-name: web, service.kubernetes.io/headless: "" }
addressType: IPv4
ports: [ { port: 8080 } ]
endpoints: [ { addresses: [10.0.1.2] } ]
"#,
    );
    let served: Vec<String> = d.services.keys().map(ToString::to_string).collect();
    assert_eq!(served, ["default/web/TCP"]);
    let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
    assert_eq!(
        svc.backends.keys().collect::<Vec<_>>(),
        [&sa("10.0.1.1:8080")]
    );
}

/// UDP flows follow the `serving` condition, not the table: kube-proxy clears UDP conntrack
/// entries only for endpoints that are no longer serving (pkg/proxy/conntrack/cleanup.go,
/// `deleteStaleEndpointConntrackEntries`), so a terminating endpoint still serving keeps them.
#[test]
fn backends_carry_their_serving_condition() {
    let d = compute(
        r#"
kind: Service
apiVersion: v1
metadata: { name: dns, namespace: default }
spec: { type: NodePort, ports: [ { port: 53, protocol: UDP, nodePort: 30053 } ] }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: dns-1, namespace: default, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { port: 5353, protocol: UDP } ]
endpoints:
- { addresses: [10.0.1.1] }
- { addresses: [10.0.1.2], conditions: { ready: false, serving: true, terminating: true } }
- { addresses: [10.0.1.3], conditions: { ready: false, serving: false, terminating: true } }
"#,
    );
    let svc = &d.services[&key("default", "dns", "", Protocol::Udp)];
    let view: Vec<(String, bool, bool)> = svc
        .backends
        .iter()
        .map(|(a, b)| (a.to_string(), b.in_table, b.serving))
        .collect();
    assert_eq!(
        view,
        [
            ("10.0.1.1:5353".to_owned(), true, true),
            ("10.0.1.2:5353".to_owned(), false, true),
            ("10.0.1.3:5353".to_owned(), false, false),
        ]
    );
}

/// One case of `topology_hints_narrow_cluster_endpoints_as_kube_proxy_does`.
struct TopologyCase {
    /// kube-proxy's test name, or what the case shows.
    name: &'static str,
    /// The node's zone label ("" for none).
    zone: &'static str,
    /// externalTrafficPolicy Local.
    local: bool,
    /// Endpoints as YAML flow mappings. `nodeName: node-a` is this node (kube-proxy's
    /// `isLocal`).
    endpoints: &'static [&'static str],
    /// Endpoints taking new connections (kube-proxy's `clusterEndpoints` for Cluster,
    /// `localEndpoints` for Local). Every other endpoint of the policy stays a backend for its
    /// established connections.
    in_table: &'static [&'static str],
}

const fn cluster(
    name: &'static str,
    zone: &'static str,
    endpoints: &'static [&'static str],
    in_table: &'static [&'static str],
) -> TopologyCase {
    TopologyCase {
        name,
        zone,
        local: false,
        endpoints,
        in_table,
    }
}

/// The four endpoints most of kube-proxy's cases use: one hinted for each of zones b and c,
/// two for zone a.
const FOUR_ZONED: &[&str] = &[
    "{ addresses: [10.1.2.3], nodeName: node-b, hints: { forZones: [ { name: zone-a } ] } }",
    "{ addresses: [10.1.2.4], nodeName: node-b, hints: { forZones: [ { name: zone-b } ] } }",
    "{ addresses: [10.1.2.5], nodeName: node-b, hints: { forZones: [ { name: zone-c } ] } }",
    "{ addresses: [10.1.2.6], nodeName: node-b, hints: { forZones: [ { name: zone-a } ] } }",
];

/// Cases of kube-proxy's `TestCategorizeEndpoints` (pkg/proxy/topology_test.go) that apply to
/// external traffic (node ports, LoadBalancer IPs, externalIPs), named as there, and cases
/// for node hints (PreferSameNode) from `topologyModeFromHints`' contract (pkg/proxy/
/// topology.go): node hints first, then zone hints, then every endpoint. kube-proxy's "empty
/// zone label" is "empty node labels" here: the sources read an empty label as none.
const TOPOLOGY_CASES: &[TopologyCase] = &[
    cluster(
        "should use topology since all endpoints have hints, node has a zone label and and there \
         are endpoints for the node's zone",
        "zone-a",
        FOUR_ZONED,
        &["10.1.2.3", "10.1.2.6"],
    ),
    TopologyCase {
        name: "externalTrafficPolicy: Local, topology ignored for Local endpoints",
        zone: "zone-a",
        local: true,
        endpoints: &[
            "{ addresses: [10.1.2.3], nodeName: node-a, hints: { forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.1.2.4], nodeName: node-a, hints: { forZones: [ { name: zone-b } ] } }",
            "{ addresses: [10.1.2.5], nodeName: node-b, hints: { forZones: [ { name: zone-c } ] } }",
            "{ addresses: [10.1.2.6], nodeName: node-b, hints: { forZones: [ { name: zone-a } ] } }",
        ],
        in_table: &["10.1.2.3", "10.1.2.4"],
    },
    TopologyCase {
        name: "externalTrafficPolicy: Local ignores node hints too",
        zone: "zone-a",
        local: true,
        endpoints: &[
            "{ addresses: [10.0.0.0], nodeName: node-a, hints: { forNodes: [ { name: node-a } ] } }",
            "{ addresses: [10.0.0.1], nodeName: node-a, hints: { forNodes: [ { name: node-b } ] } }",
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-a } ] } }",
        ],
        in_table: &["10.0.0.0", "10.0.0.1"],
    },
    cluster(
        "empty node labels",
        "",
        &["{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] } }"],
        &["10.1.2.3"],
    ),
    cluster(
        "node in different zone, no endpoint filtering",
        "zone-b",
        &["{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] } }"],
        &["10.1.2.3"],
    ),
    cluster(
        "unready endpoint",
        "zone-a",
        &[
            "{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.1.2.4], hints: { forZones: [ { name: zone-b } ] } }",
            "{ addresses: [10.1.2.5], hints: { forZones: [ { name: zone-c } ] } }",
            "{ addresses: [10.1.2.6], hints: { forZones: [ { name: zone-a } ] }, conditions: { ready: false } }",
        ],
        &["10.1.2.3"],
    ),
    cluster(
        "only unready endpoints in same zone (should not filter)",
        "zone-a",
        &[
            "{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] }, conditions: { ready: false } }",
            "{ addresses: [10.1.2.4], hints: { forZones: [ { name: zone-b } ] } }",
            "{ addresses: [10.1.2.5], hints: { forZones: [ { name: zone-c } ] } }",
            "{ addresses: [10.1.2.6], hints: { forZones: [ { name: zone-a } ] }, conditions: { ready: false } }",
        ],
        &["10.1.2.4", "10.1.2.5"],
    ),
    cluster(
        "missing hints, no filtering applied",
        "zone-a",
        &[
            "{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.1.2.4], hints: { forZones: [ { name: zone-b } ] } }",
            "{ addresses: [10.1.2.5] }",
            "{ addresses: [10.1.2.6], hints: { forZones: [ { name: zone-a } ] } }",
        ],
        &["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
    ),
    cluster(
        "an unready endpoint without hints does not stop filtering (only ready ones are looked at)",
        "zone-a",
        &[
            "{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.1.2.4], hints: { forZones: [ { name: zone-b } ] } }",
            "{ addresses: [10.1.2.5], conditions: { ready: false, serving: true, terminating: true } }",
        ],
        &["10.1.2.3"],
    ),
    cluster(
        "multiple hints per endpoint, filtering includes any endpoint with zone included",
        "zone-c",
        &[
            "{ addresses: [10.1.2.3], hints: { forZones: [ { name: zone-a }, { name: zone-b }, { name: zone-c } ] } }",
            "{ addresses: [10.1.2.4], hints: { forZones: [ { name: zone-b }, { name: zone-c } ] } }",
            "{ addresses: [10.1.2.5], hints: { forZones: [ { name: zone-b }, { name: zone-d } ] } }",
            "{ addresses: [10.1.2.6], hints: { forZones: [ { name: zone-c } ] } }",
        ],
        &["10.1.2.3", "10.1.2.4", "10.1.2.6"],
    ),
    cluster(
        "no ready endpoints: the serving terminating ones all take over, hints or not \
         (kubernetes#136743's case)",
        "zone-a",
        &[
            "{ addresses: [10.0.0.0], nodeName: node-a, hints: { forZones: [ { name: zone-a } ] }, conditions: { ready: false, serving: true, terminating: true } }",
            "{ addresses: [10.0.0.1], hints: { forZones: [ { name: zone-b } ] }, conditions: { ready: false, serving: true, terminating: true } }",
            "{ addresses: [10.0.0.2], hints: { forZones: [ { name: zone-a } ] }, conditions: { ready: false, serving: false, terminating: true } }",
        ],
        &["10.0.0.0", "10.0.0.1"],
    ),
    cluster(
        "PreferSameNode: every ready endpoint has a node hint and one is for this node",
        "zone-a",
        &[
            "{ addresses: [10.0.0.1], nodeName: node-a, hints: { forNodes: [ { name: node-a } ], forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-b } ], forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.0.0.3], nodeName: node-c, hints: { forNodes: [ { name: node-c } ], forZones: [ { name: zone-b } ] } }",
        ],
        &["10.0.0.1"],
    ),
    cluster(
        "PreferSameNode without zone hints, and with the node's zone unknown",
        "",
        &[
            "{ addresses: [10.0.0.1], nodeName: node-a, hints: { forNodes: [ { name: node-a } ] } }",
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-b } ] } }",
        ],
        &["10.0.0.1"],
    ),
    cluster(
        "PreferSameNode falls back to zone hints when no endpoint is hinted for this node",
        "zone-a",
        &[
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-b } ], forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.0.0.3], nodeName: node-c, hints: { forNodes: [ { name: node-c } ], forZones: [ { name: zone-b } ] } }",
        ],
        &["10.0.0.2"],
    ),
    cluster(
        "PreferSameNode falls back to zone hints when a ready endpoint has no node hint",
        "zone-a",
        &[
            "{ addresses: [10.0.0.1], nodeName: node-a, hints: { forNodes: [ { name: node-a } ], forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forZones: [ { name: zone-a } ] } }",
            "{ addresses: [10.0.0.3], nodeName: node-c, hints: { forNodes: [ { name: node-c } ], forZones: [ { name: zone-b } ] } }",
        ],
        &["10.0.0.1", "10.0.0.2"],
    ),
    cluster(
        "PreferSameNode without zone hints and no endpoint for this node: every endpoint",
        "zone-a",
        &[
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-b } ] } }",
            "{ addresses: [10.0.0.3], nodeName: node-c, hints: { forNodes: [ { name: node-c } ] } }",
        ],
        &["10.0.0.2", "10.0.0.3"],
    ),
    cluster(
        "PreferSameNode: an endpoint hinted for this node need not run on it",
        "zone-a",
        &[
            "{ addresses: [10.0.0.1], nodeName: node-a, hints: { forNodes: [ { name: node-b } ] } }",
            "{ addresses: [10.0.0.2], nodeName: node-b, hints: { forNodes: [ { name: node-a }, { name: node-b } ] } }",
        ],
        &["10.0.0.2"],
    ),
];

/// Topology hints decide which of a Cluster-policy Service's endpoints take this node's new
/// connections, as kube-proxy's `CategorizeEndpoints` decides its `clusterEndpoints`; the
/// others stay backends so that their established connections go on.
#[test]
fn topology_hints_narrow_cluster_endpoints_as_kube_proxy_does() {
    for case in TOPOLOGY_CASES {
        let policy = if case.local { "Local" } else { "Cluster" };
        let mut yaml = format!(
            r#"
kind: Service
apiVersion: v1
metadata: {{ name: web, namespace: default }}
spec: {{ type: NodePort, externalTrafficPolicy: {policy}, ports: [ {{ port: 80, nodePort: 30080 }} ] }}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: web-1, namespace: default, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [ {{ port: 80 }} ]
endpoints:
"#
        );
        for ep in case.endpoints {
            yaml.push_str(&format!("- {ep}\n"));
        }
        let node = NodeContext {
            zone: case.zone.into(),
            ..node()
        };
        let d = compute_on(&yaml, &node);
        let svc = &d.services[&key("default", "web", "", Protocol::Tcp)];
        let in_table: Vec<String> = svc
            .table_backends()
            .map(|(a, _)| a.ip().to_string())
            .collect();
        assert_eq!(in_table, case.in_table, "{}", case.name);
        // Every endpoint of the policy is a backend: those hinted elsewhere keep their
        // established connections.
        let (_, slices) = objects(&yaml);
        let all = slices[0]
            .endpoints
            .iter()
            .flatten()
            .filter(|e| !case.local || e.node_name.as_deref() == Some(NODE));
        let all: BTreeSet<String> = all.map(|e| e.addresses[0].clone()).collect();
        let backends: BTreeSet<String> = svc.backends.keys().map(|a| a.ip().to_string()).collect();
        assert_eq!(backends, all, "{}", case.name);
        // Ready backends out of the table are there because of hints, and say so (dump).
        let ready: BTreeSet<String> = slices[0]
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .map(|e| e.addresses[0].clone())
            .collect();
        for (addr, b) in &svc.backends {
            let ip = addr.ip().to_string();
            assert_eq!(
                b.hinted_away,
                ready.contains(&ip) && !b.in_table,
                "{}: {ip}",
                case.name
            );
        }
    }
}

/// The node's zone is part of the node context: a new zone (a relabelled Node, or its first
/// sight) recomputes what hints choose, as a computation from scratch would.
#[test]
fn a_new_zone_recomputes_what_hints_choose() {
    use std::sync::Arc;
    let yaml = format!(
        r#"
kind: Service
apiVersion: v1
metadata: {{ name: web, namespace: default }}
spec: {{ type: LoadBalancer, ports: [ {{ port: 80, nodePort: 30080 }} ] }}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: web-1, namespace: default, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [ {{ port: 80 }} ]
endpoints:
{}"#,
        FOUR_ZONED
            .iter()
            .map(|e| format!("- {e}\n"))
            .collect::<String>()
    );
    let (services, slices) = objects(&yaml);
    let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let in_zone = |zone: &str| NodeContext {
        zone: zone.into(),
        ..node()
    };
    let table = |d: &Desired| -> Vec<String> {
        d.services[&key("default", "web", "", Protocol::Tcp)]
            .table_backends()
            .map(|(a, _)| a.ip().to_string())
            .collect()
    };
    let mut reconciler = Reconciler::new(node());
    reconciler.update(&services, &slices);
    assert_eq!(
        table(reconciler.desired()),
        ["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
        "no zone: every endpoint"
    );
    for (zone, expected) in [
        ("zone-a", vec!["10.1.2.3", "10.1.2.6"]),
        ("zone-b", vec!["10.1.2.4"]),
        (
            "zone-z",
            vec!["10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"],
        ),
    ] {
        let changes = reconciler.set_node(in_zone(zone));
        assert_eq!(
            changes.services,
            BTreeSet::from([key("default", "web", "", Protocol::Tcp)]),
            "{zone}"
        );
        assert_eq!(table(reconciler.desired()), expected, "{zone}");
        let (s, e) = objects(&yaml);
        assert_eq!(
            reconciler.desired().services,
            desired_state(&s, &e, &in_zone(zone)).services,
            "{zone}"
        );
    }
    assert!(reconciler.set_node(in_zone("zone-z")).is_empty());
}

/// examples/topology.yaml does what its comment says: on node-1, whose Node puts it in
/// zone-a, the zone-a endpoints take new connections; without the Node, all of them.
#[test]
fn the_topology_example_prefers_node_1s_zone() {
    use crate::manifests::load_dir;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let dir = crate::test_support::ScratchDir::new("topology-example");
    dir.write(
        "topology.yaml",
        &std::fs::read_to_string(examples.join("topology.yaml")).unwrap(),
    );
    let loaded = load_dir(dir.path()).unwrap();
    let services: Vec<Service> = loaded.services.iter().map(|(_, s)| (**s).clone()).collect();
    let slices: Vec<EndpointSlice> = loaded
        .endpoint_slices
        .iter()
        .map(|(_, s)| (**s).clone())
        .collect();
    let [(_, node_1)] = &loaded.nodes[..] else {
        panic!("one Node in the example");
    };
    let on_node_1 = NodeContext {
        node_name: "node-1".into(),
        zone: crate::source::kube::node_zone(node_1).unwrap_or_default(),
        ..node()
    };
    let table = |node: &NodeContext| -> Vec<String> {
        desired_state(&services, &slices, node).services[&key("demo", "api", "http", Protocol::Tcp)]
            .table_backends()
            .map(|(a, _)| a.to_string())
            .collect()
    };
    assert_eq!(table(&on_node_1), ["198.18.1.20:8080", "198.18.3.20:8080"]);
    let without_the_node = NodeContext {
        zone: String::new(),
        ..on_node_1
    };
    assert_eq!(
        table(&without_the_node),
        ["198.18.1.20:8080", "198.18.2.20:8080", "198.18.3.20:8080"]
    );
}

// ---- IPv6 and dual-stack (issue #14) -------------------------------------------------------

/// Frontends of an IPv6 service port as (address, kind).
fn frontend_addrs_v6(svc: &DesiredService6) -> Vec<(String, FrontendKind)> {
    svc.frontends
        .iter()
        .map(|f| (f.addr.to_string(), f.kind))
        .collect()
}

/// Backends of an IPv6 service port as `addr -> (local, in_table)`.
fn backend_view_v6(svc: &DesiredService6) -> BTreeMap<String, (bool, bool)> {
    svc.backends
        .iter()
        .map(|(a, b)| (a.to_string(), (b.local, b.in_table)))
        .collect()
}

/// An ETP Local LoadBalancer of the `families` given (`spec.ipFamilies`), with VIPs and
/// endpoints of both families: a local and a remote pod of each.
fn lb_of(families: &str) -> String {
    format!(
        r#"
kind: Service
apiVersion: v1
metadata: {{ name: web, namespace: shop }}
spec:
  type: LoadBalancer
  ipFamilies: {families}
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  externalIPs: [198.51.100.7, "2001:db8:7::7"]
  loadBalancerSourceRanges: [10.0.0.0/8, "2001:db8::/32"]
  ports: [ {{ name: http, port: 80, nodePort: 30080 }} ]
status:
  loadBalancer:
    ingress: [ {{ ip: 203.0.113.10 }}, {{ ip: "2001:db8:10::10" }} ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: web-v4, namespace: shop, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [ {{ name: http, port: 8080 }} ]
endpoints:
- {{ addresses: [10.0.1.1], nodeName: node-a }}
- {{ addresses: [10.0.2.1], nodeName: node-b }}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {{ name: web-v6, namespace: shop, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv6
ports: [ {{ name: http, port: 8080 }} ]
endpoints:
- {{ addresses: ["fd00:1::1"], nodeName: node-a }}
- {{ addresses: ["fd00:2::1"], nodeName: node-b }}
"#
    )
}

/// kube-proxy's IPv4 proxier does not take an IPv6-only Service (no IPv4 clusterIP): it has no
/// IPv4 node ports, and its VIPs, endpoints and source ranges are all IPv6. The agent used to
/// give it IPv4 node-port frontends without a backend.
#[test]
fn an_ipv6_only_service_gets_ipv6_frontends_and_endpoints_only() {
    let d = compute(&lb_of("[IPv6]"));
    let key = key("shop", "web", "http", Protocol::Tcp);
    assert!(d.services.is_empty(), "no IPv4 frontend: {:?}", d.services);
    let svc = &d.services_v6[&key];
    assert_eq!(
        frontend_addrs_v6(svc),
        vec![
            ("[2001:db8:7::7]:80".into(), FrontendKind::ExternalIp),
            ("[2001:db8:10::10]:80".into(), FrontendKind::LoadBalancer),
            ("[fd00:18::1]:30080".into(), FrontendKind::NodePort),
        ]
    );
    // ETP Local: the local IPv6 pod only.
    assert_eq!(
        backend_view_v6(svc),
        BTreeMap::from([("[fd00:1::1]:8080".into(), (true, true))])
    );
    assert!(svc.local_only);
    let ranges: Vec<String> = svc.source_ranges.iter().map(ToString::to_string).collect();
    assert_eq!(ranges, ["2001:db8::/32"]);
    // One notice for the service port, with what the kernel carries.
    let notices: Vec<&Notice> = d.notices.iter().collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].kind, NoticeKind::Ipv6ToKernel);
    assert_eq!(notices[0].object, "shop/web:http/TCP");
    assert_eq!(
        notices[0].counts,
        Some(crate::model::NoticeCounts {
            frontends: 3,
            endpoints: 1
        })
    );
    assert!(
        notices[0]
            .detail
            .contains("carried by the kernel (kube-proxy)")
    );
}

/// Each of kube-proxy's proxiers takes its own family's part of a dual-stack Service: node
/// ports on the node's addresses of each family, each VIP by its own family, each family's
/// EndpointSlices, and each family's loadBalancerSourceRanges. The IPv4 part is exactly the
/// IPv4-only Service's.
#[test]
fn a_dual_stack_service_splits_by_family() {
    let dual = compute(&lb_of("[IPv4, IPv6]"));
    let v4_only = compute(&lb_of("[IPv4]"));
    let key = key("shop", "web", "http", Protocol::Tcp);
    assert_eq!(
        dual.services, v4_only.services,
        "the IPv4 part is unchanged"
    );
    let svc = &dual.services[&key];
    assert_eq!(
        frontend_addrs(svc),
        vec![
            ("198.18.0.1:30080".into(), FrontendKind::NodePort),
            ("198.18.0.5:30080".into(), FrontendKind::NodePort),
            ("198.51.100.7:80".into(), FrontendKind::ExternalIp),
            ("203.0.113.10:80".into(), FrontendKind::LoadBalancer),
        ]
    );
    assert_eq!(
        backend_view(svc),
        BTreeMap::from([("10.0.1.1:8080".into(), (true, true))])
    );
    let ranges: Vec<String> = svc.source_ranges.iter().map(ToString::to_string).collect();
    assert_eq!(ranges, ["10.0.0.0/8"]);
    let svc6 = &dual.services_v6[&key];
    assert_eq!(svc6.frontends.len(), 3);
    assert_eq!(
        backend_view_v6(svc6),
        BTreeMap::from([("[fd00:1::1]:8080".into(), (true, true))])
    );
    assert!(v4_only.services_v6.is_empty() && v4_only.notices.is_empty());
    let kinds: Vec<NoticeKind> = dual.notices.iter().map(|n| n.kind).collect();
    assert_eq!(kinds, [NoticeKind::Ipv6ToKernel]);
}

/// Which families a Service has: `ipFamilies`, else its clusterIP's family, else IPv4 (an old
/// manifest); the policies a manifest may give without `ipFamilies` stand for what the API
/// server would fill in.
#[test]
fn families_follow_ip_families_then_the_cluster_ip_then_ipv4() {
    let families = |spec: &str| -> Vec<IpFamily> {
        let spec: ServiceSpec = serde_norway::from_str(spec).unwrap();
        service_families(&spec).into_iter().collect()
    };
    use IpFamily::{Ipv4, Ipv6};
    for (spec, expected) in [
        ("{}", &[Ipv4][..]),
        ("{clusterIP: 10.96.0.10}", &[Ipv4]),
        ("{clusterIP: 'fd00:96::10'}", &[Ipv6]),
        ("{ipFamilies: [IPv6]}", &[Ipv6]),
        (
            "{ipFamilies: [IPv6, IPv4], clusterIP: 'fd00:96::10'}",
            &[Ipv4, Ipv6],
        ),
        // The API server's answer on a single-stack cluster.
        (
            "{ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv4]}",
            &[Ipv4],
        ),
        ("{ipFamilyPolicy: PreferDualStack}", &[Ipv4, Ipv6]),
        (
            "{ipFamilyPolicy: RequireDualStack, ipFamilies: [IPv6]}",
            &[Ipv4, Ipv6],
        ),
        ("{ipFamilyPolicy: SingleStack}", &[Ipv4]),
    ] {
        assert_eq!(families(spec), expected, "{spec}");
    }
}

/// kube-proxy's proxier of each family counts its own family's local endpoints for the
/// health check. An IPv6-only Service with a local IPv6 endpoint is healthy on this node (the
/// agent answered 503: it counted IPv4 slices only).
#[test]
fn the_health_check_counts_the_local_endpoints_of_each_family_of_the_service() {
    let v6 = compute(&lb_of("[IPv6]"));
    let check = &v6.health_checks[&32000].local_endpoints;
    assert_eq!(
        *check,
        LocalEndpoints {
            ipv4: None,
            ipv6: Some(1)
        }
    );
    assert_eq!(check.for_probe(IpFamily::Ipv6), 1);
    assert_eq!(
        check.for_probe(IpFamily::Ipv4),
        1,
        "an IPv4 probe of an IPv6-only Service"
    );
    // Dual-stack, the local pod in the IPv4 slice only: each family answers for itself.
    let yaml =
        lb_of("[IPv4, IPv6]").replace("- { addresses: [\"fd00:1::1\"], nodeName: node-a }\n", "");
    let dual = compute(&yaml);
    let check = &dual.health_checks[&32000].local_endpoints;
    assert_eq!(
        *check,
        LocalEndpoints {
            ipv4: Some(1),
            ipv6: Some(0)
        }
    );
    assert_eq!(check.for_probe(IpFamily::Ipv4), 1);
    assert_eq!(check.for_probe(IpFamily::Ipv6), 0);
}

/// Two Services claiming one IPv6 frontend are settled as for IPv4: the older keeps it, the
/// newcomer is told.
#[test]
fn a_contested_ipv6_frontend_goes_to_the_older_service() {
    let service = |name: &str, created: &str| {
        format!(
            "---\nkind: Service\napiVersion: v1\nmetadata: {{ name: {name}, namespace: default, creationTimestamp: \"{created}\" }}\nspec: {{ ipFamilies: [IPv6], externalIPs: [\"2001:db8:7::7\"], ports: [ {{ port: 80 }} ] }}\n"
        )
    };
    let d = compute(&format!(
        "{}{}",
        service("newer", "2026-01-02T00:00:00Z"),
        service("older", "2026-01-01T00:00:00Z")
    ));
    assert_eq!(
        d.services_v6.keys().collect::<Vec<_>>(),
        [&key("default", "older", "", Protocol::Tcp)]
    );
    let conflict: Vec<&Notice> = d
        .notices
        .iter()
        .filter(|n| n.kind == NoticeKind::FrontendConflict)
        .collect();
    assert_eq!(conflict.len(), 1, "{:?}", d.notices);
    assert_eq!(conflict[0].object, "default/newer/TCP");
    assert!(
        conflict[0].detail.starts_with("[2001:db8:7::7]:80 TCP"),
        "{}",
        conflict[0].detail
    );
}

/// The IPv6 node ports move with the node's IPv6 addresses, and refusals apply to them as to
/// IPv4 ones (a wildcard listener of the node takes both families).
#[test]
fn ipv6_node_ports_follow_the_nodes_ipv6_addresses_and_its_listeners() {
    let (services, slices) = objects(&lb_of("[IPv4, IPv6]"));
    let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let mut reconciler = Reconciler::new(node());
    reconciler.update(&services, &slices);
    let key = key("shop", "web", "http", Protocol::Tcp);
    let node_ports = |r: &Reconciler| -> Vec<String> {
        r.desired().services_v6[&key]
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| f.addr.to_string())
            .collect()
    };
    assert_eq!(node_ports(&reconciler), ["[fd00:18::1]:30080"]);
    let moved = NodeContext {
        node_addresses_v6: vec!["fd00:18::9".parse().unwrap()],
        ..node()
    };
    let changes = reconciler.set_node(moved.clone());
    assert_eq!(changes.services, [key.clone()].into());
    assert_eq!(node_ports(&reconciler), ["[fd00:18::9]:30080"]);
    let guarded = NodeContext {
        guard: PortGuard {
            listeners: [crate::listeners::Listener {
                protocol: Protocol::Tcp,
                addr: None,
                port: 30080,
            }]
            .into(),
            ..PortGuard::default()
        },
        ..moved
    };
    reconciler.set_node(guarded);
    assert!(node_ports(&reconciler).is_empty());
    assert!(
        reconciler
            .notices()
            .iter()
            .any(|n| n.kind == NoticeKind::FrontendOnHostListener
                && n.detail.starts_with("[fd00:18::9]:30080/TCP")),
        "{:?}",
        reconciler.notices()
    );
}

/// An IPv4 Service's IPv6 slices, VIPs and ranges are kube-proxy's IPv6 proxier's, which does
/// not take the Service: they make no IPv6 part, and the IPv4 part is as without them.
#[test]
fn an_ipv4_service_ignores_ipv6_addresses() {
    let d = compute(&lb_of("[IPv4]"));
    assert!(d.services_v6.is_empty() && d.notices.is_empty());
    assert_eq!(
        d.health_checks[&32000].local_endpoints,
        LocalEndpoints::ipv4(1)
    );
}
