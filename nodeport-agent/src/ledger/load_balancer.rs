//! What a LoadBalancer Service's load balancer sends traffic to, as far as its annotations
//! and `spec.loadBalancerClass` show. Node ports only matter to load balancers that target
//! nodes; the rest can do without them (`spec.allocateLoadBalancerNodePorts: false`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;

const AWS_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
const AWS_TARGET_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type";
const AWS_PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";
const AWS_LBC_CLASS: &str = "service.k8s.aws/nlb";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LoadBalancerTargets {
    /// Traffic and health checks go straight to pod IPs.
    Pods { evidence: String },
    /// The load balancer IP is announced to (or routed at) the nodes, whose proxy handles it
    /// directly: node ports are not on the path.
    AnnouncedAddress { evidence: String },
    /// Traffic goes to `<node>:<nodePort>`: the node ports are required.
    Nodes { evidence: String },
    /// Nothing in the Service tells; `hint` says what was seen, if anything.
    Unknown { hint: Option<String> },
}

pub(crate) fn classify(service: &Service) -> LoadBalancerTargets {
    let empty = BTreeMap::new();
    let annotations = service.metadata.annotations.as_ref().unwrap_or(&empty);
    let class = service
        .spec
        .as_ref()
        .and_then(|spec| spec.load_balancer_class.as_deref());
    let annotation = |key: &str| annotations.get(key).map(String::as_str);
    let has_prefix = |prefix: &str| annotations.keys().find(|key| key.starts_with(prefix));

    // AWS Load Balancer Controller: it takes Services marked `external` / `nlb-ip`, or with
    // its loadBalancerClass (its webhook sets that on new Services). Its target type
    // defaults to instance, which reaches pods through node ports.
    let aws_type = annotation(AWS_TYPE);
    if aws_type == Some("nlb-ip") {
        return LoadBalancerTargets::Pods {
            evidence: format!(
                "AWS Load Balancer Controller NLB with IP targets ({AWS_TYPE}: nlb-ip)"
            ),
        };
    }
    let aws_controller = aws_type == Some("external") || class == Some(AWS_LBC_CLASS);
    if aws_controller {
        return match annotation(AWS_TARGET_TYPE) {
            Some("ip") => LoadBalancerTargets::Pods {
                evidence: format!(
                    "AWS Load Balancer Controller NLB with IP targets ({AWS_TARGET_TYPE}: ip)"
                ),
            },
            target => LoadBalancerTargets::Nodes {
                evidence: format!(
                    "AWS Load Balancer Controller NLB with instance targets ({AWS_TARGET_TYPE}: {})",
                    target.unwrap_or("instance, the default")
                ),
            },
        };
    }
    if let Some(key) = has_prefix(AWS_PREFIX) {
        let ignored_ip_target = if annotation(AWS_TARGET_TYPE) == Some("ip") {
            "; the in-tree controller ignores nlb-target-type: ip"
        } else {
            ""
        };
        return LoadBalancerTargets::Nodes {
            evidence: format!(
                "AWS in-tree load balancer (classic ELB or NLB) with instance targets ({key}){ignored_ip_target}"
            ),
        };
    }

    // Implementations that announce the load balancer IP (ARP/NDP or BGP) to the nodes; the
    // node's proxy handles that IP without node ports.
    let announcers: [(&str, &[&str], &[&str]); 3] = [
        ("MetalLB", &["metallb.universe.tf/", "metallb.io/"], &[]),
        (
            "Cilium LB IPAM",
            &["lbipam.cilium.io/", "io.cilium/lb-ipam-"],
            &["io.cilium/bgp-control-plane", "io.cilium/l2-announcer"],
        ),
        (
            "kube-vip",
            &["kube-vip.io/"],
            &["kube-vip.io/kube-vip-class"],
        ),
    ];
    for (name, prefixes, classes) in announcers {
        if let Some(key) = prefixes.iter().find_map(|prefix| has_prefix(prefix)) {
            return LoadBalancerTargets::AnnouncedAddress {
                evidence: format!("{name} ({key} annotation)"),
            };
        }
        if let Some(class) = class.filter(|class| classes.contains(class)) {
            return LoadBalancerTargets::AnnouncedAddress {
                evidence: format!("{name} (loadBalancerClass {class})"),
            };
        }
    }

    let hint = if annotations.contains_key("cloud.google.com/neg") {
        Some(
            "has cloud.google.com/neg: a container-native (NEG) load balancer targets its pods, \
             but the Service's own GKE load balancer may still target nodes"
                .to_owned(),
        )
    } else {
        class.map(|class| format!("loadBalancerClass {class} is not one this command knows"))
    };
    LoadBalancerTargets::Unknown { hint }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(annotations: &[(&str, &str)], class: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: class.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn verdict(annotations: &[(&str, &str)], class: Option<&str>) -> &'static str {
        match classify(&service(annotations, class)) {
            LoadBalancerTargets::Pods { .. } => "pods",
            LoadBalancerTargets::AnnouncedAddress { .. } => "announced",
            LoadBalancerTargets::Nodes { .. } => "nodes",
            LoadBalancerTargets::Unknown { .. } => "unknown",
        }
    }

    #[test]
    fn aws_ip_targets_only_count_when_the_aws_controller_handles_the_service() {
        assert_eq!(verdict(&[(AWS_TYPE, "nlb-ip")], None), "pods");
        assert_eq!(
            verdict(&[(AWS_TYPE, "external"), (AWS_TARGET_TYPE, "ip")], None),
            "pods"
        );
        assert_eq!(
            verdict(&[(AWS_TARGET_TYPE, "ip")], Some(AWS_LBC_CLASS)),
            "pods"
        );
        assert_eq!(
            verdict(
                &[(AWS_TYPE, "external"), (AWS_TARGET_TYPE, "instance")],
                None
            ),
            "nodes"
        );
        assert_eq!(verdict(&[], Some(AWS_LBC_CLASS)), "nodes");
        // The in-tree controller ignores the target type.
        assert_eq!(
            verdict(&[(AWS_TYPE, "nlb"), (AWS_TARGET_TYPE, "ip")], None),
            "nodes"
        );
        assert_eq!(
            verdict(
                &[(
                    "service.beta.kubernetes.io/aws-load-balancer-internal",
                    "true"
                )],
                None
            ),
            "nodes"
        );
    }

    #[test]
    fn address_announcers_are_recognised() {
        assert_eq!(
            verdict(&[("metallb.universe.tf/address-pool", "a")], None),
            "announced"
        );
        assert_eq!(
            verdict(&[("metallb.io/loadBalancerIPs", "10.0.0.5")], None),
            "announced"
        );
        assert_eq!(
            verdict(&[("lbipam.cilium.io/ips", "10.0.0.5")], None),
            "announced"
        );
        assert_eq!(
            verdict(&[], Some("io.cilium/bgp-control-plane")),
            "announced"
        );
        assert_eq!(
            verdict(&[("kube-vip.io/loadbalancerIPs", "10.0.0.5")], None),
            "announced"
        );
        assert_eq!(
            verdict(&[], Some("kube-vip.io/kube-vip-class")),
            "announced"
        );
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(verdict(&[], None), "unknown");
        assert_eq!(
            verdict(&[("cloud.google.com/neg", r#"{"ingress":true}"#)], None),
            "unknown"
        );
        assert_eq!(verdict(&[], Some("example.com/lb")), "unknown");
    }
}
