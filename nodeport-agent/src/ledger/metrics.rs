//! The ledger's gauges for the agent's metrics endpoint.
//!
//! - `nodeport_range_ports{band="static|dynamic|all",state="used|free"}`
//! - `nodeport_range_consumers{kind="node_port|load_balancer_node_port|health_check_node_port"}`
//! - `nodeport_range_findings{kind="<finding kind>"}` (every kind, 0 when absent)
//!
//! A range too small to be split has no static band: its static gauges read 0.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{ConsumerKind, FindingKind, Ledger};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    band: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct LedgerMetrics {
    ports: Family<PortLabels, Gauge>,
    consumers: Family<KindLabels, Gauge>,
    findings: Family<KindLabels, Gauge>,
}

impl LedgerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "nodeport_range_ports",
            "Ports of the node port range by KEP-3668 band and state",
            metrics.ports.clone(),
        );
        registry.register(
            "nodeport_range_consumers",
            "Node ports held by Services, by kind of use",
            metrics.consumers.clone(),
        );
        registry.register(
            "nodeport_range_findings",
            "Node port ledger findings by kind",
            metrics.findings.clone(),
        );
        metrics
    }

    pub fn update(&self, ledger: &Ledger) {
        let totals = &ledger.totals;
        let bands = [
            (
                "static",
                totals.static_band.map_or((0, 0), |u| (u.used, u.free)),
            ),
            ("dynamic", (totals.dynamic.used, totals.dynamic.free)),
            ("all", (totals.all.used, totals.all.free)),
        ];
        for (band, (used, free)) in bands {
            for (state, value) in [("used", used), ("free", free)] {
                self.ports
                    .get_or_create(&PortLabels { band, state })
                    .set(i64::from(value));
            }
        }
        for kind in ConsumerKind::ALL {
            self.consumers
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(i64::from(totals.consumers_by_kind.get(kind)));
        }
        for kind in FindingKind::ALL {
            let count = ledger.findings_of(kind).count();
            self.findings
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(count as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ledger::{NodePortRange, analyze};
    use crate::manifests::load_dir;

    fn ledger(case: &str) -> Ledger {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ledger")
            .join(case);
        let services: Vec<_> = load_dir(&dir)
            .unwrap()
            .services
            .into_iter()
            .map(|(_, s)| std::sync::Arc::unwrap_or_clone(s))
            .collect();
        analyze(&NodePortRange::DEFAULT, &services, None)
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn gauges_follow_the_ledger() {
        let mut registry = Registry::default();
        let metrics = LedgerMetrics::register(&mut registry);
        metrics.update(&ledger("conflicts"));
        let text = encode(&registry);
        for line in [
            "# TYPE nodeport_range_ports gauge",
            r#"nodeport_range_ports{band="static",state="used"} 0"#,
            r#"nodeport_range_ports{band="static",state="free"} 86"#,
            r#"nodeport_range_ports{band="dynamic",state="used"} 7"#,
            r#"nodeport_range_ports{band="dynamic",state="free"} 2675"#,
            r#"nodeport_range_ports{band="all",state="used"} 7"#,
            r#"nodeport_range_ports{band="all",state="free"} 2761"#,
            r#"nodeport_range_consumers{kind="node_port"} 6"#,
            r#"nodeport_range_consumers{kind="load_balancer_node_port"} 3"#,
            r#"nodeport_range_consumers{kind="health_check_node_port"} 3"#,
            r#"nodeport_range_findings{kind="conflict"} 4"#,
            r#"nodeport_range_findings{kind="health_check_node_port"} 1"#,
            r#"nodeport_range_findings{kind="range_full"} 0"#,
        ] {
            assert!(has(&text, line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(
            text.matches("nodeport_range_findings{").count(),
            FindingKind::ALL.len()
        );

        // A later update replaces the values, including kinds that went away.
        metrics.update(&ledger("mixed"));
        let text = encode(&registry);
        for line in [
            r#"nodeport_range_ports{band="static",state="used"} 1"#,
            r#"nodeport_range_ports{band="all",state="used"} 5"#,
            r#"nodeport_range_consumers{kind="node_port"} 3"#,
            r#"nodeport_range_findings{kind="conflict"} 0"#,
        ] {
            assert!(has(&text, line), "missing {line:?} in:\n{text}");
        }
    }
}
