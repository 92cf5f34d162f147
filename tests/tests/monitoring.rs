//! deploy/monitoring checked: the alert rules with `promtool check rules` and `promtool test
//! rules` (every alert fires in a test and is asserted quiet in another), every dashboard
//! query through promtool's parser, the PodMonitor against the DaemonSet it scrapes, and every
//! metric these read documented. The agent's own /metrics output goes through `promtool check
//! metrics` in tests/tests/e2e.rs (case 22), which also checks that everything read here is
//! exported.
//!
//! promtool comes with Debian's `prometheus` package; `cargo xtask test` provides it, and these
//! tests fail when it is missing rather than skip.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};
use nodeport_tests::monitoring::{self, Scratch};
use serde_json::{Value, json};

/// The alert tests' file, with the rules beside it as it names them.
fn alert_tests(scratch: &Scratch) -> Result<std::path::PathBuf> {
    let tests = monitoring::dir().join("tests/alerts.test.yaml");
    let fixture = monitoring::yaml(&tests)?;
    let files = fixture["rule_files"].as_array().context("rule_files")?;
    ensure!(
        files.len() == 1,
        "the alert tests read one rule file, the PrometheusRule's groups"
    );
    let rules = scratch
        .path()
        .join(files[0].as_str().context("rule file name")?);
    std::fs::write(&rules, serde_json::to_string(&monitoring::rule_groups()?)?)?;
    let copy = scratch.path().join("alerts.test.yaml");
    std::fs::copy(&tests, &copy)?;
    Ok(copy)
}

#[test]
#[ignore = "needs promtool (Debian's prometheus package): run `cargo xtask test`"]
fn the_alert_rules_pass_promtool_check_and_their_tests() -> Result<()> {
    let scratch = Scratch::new("alert-rules")?;
    let tests = alert_tests(&scratch)?;
    let rules = scratch.path().join("nodeport-rules.yaml");
    let out = monitoring::run_promtool(&["check", "rules", &rules.display().to_string()], None)?;
    let alerts = monitoring::alert_names()?.len();
    ensure!(
        out.contains(&format!("SUCCESS: {alerts} rules found")),
        "promtool check rules:\n{out}"
    );
    let out = monitoring::run_promtool(&["test", "rules", &tests.display().to_string()], None)?;
    ensure!(out.contains("SUCCESS"), "promtool test rules:\n{out}");
    Ok(())
}

/// Every alert has a test where it fires and one where it is expected quiet; and the tests
/// name no alert the rules do not have (promtool would take that for an alert that never
/// fires, and pass).
#[test]
fn every_alert_fires_in_a_test_and_is_asserted_quiet_in_another() -> Result<()> {
    let alerts = monitoring::alert_names()?;
    ensure!(alerts.len() >= 10, "{alerts:?}");
    let fixture = monitoring::yaml(&monitoring::dir().join("tests/alerts.test.yaml"))?;
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in fixture["tests"].as_array().context("tests")? {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().context("alertname")?.to_owned();
            ensure!(alerts.contains(&name), "a test of an unknown alert {name}");
            let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected == 0 {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    let never_fires: Vec<_> = alerts.difference(&fires).collect();
    let never_quiet: Vec<_> = alerts.difference(&quiet).collect();
    ensure!(
        never_fires.is_empty() && never_quiet.is_empty(),
        "alerts without a test where they fire: {never_fires:?}; without one where they stay \
         quiet: {never_quiet:?}"
    );
    // Every alert has a severity, a summary and a description.
    for rule in monitoring::rules()? {
        let name = rule["alert"].as_str().unwrap_or("?");
        ensure!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{name}: severity"
        );
        for annotation in ["summary", "description"] {
            ensure!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| s.len() > 20),
                "{name}: no {annotation}"
            );
        }
    }
    Ok(())
}

/// Each dashboard query, its Grafana variables replaced, as a recording rule: `promtool check
/// rules` parses it with Prometheus' own PromQL parser.
#[test]
#[ignore = "needs promtool (Debian's prometheus package): run `cargo xtask test`"]
fn the_dashboard_queries_parse() -> Result<()> {
    let queries = monitoring::dashboard_queries()?;
    ensure!(queries.len() >= 20, "{} queries", queries.len());
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            json!({
                "record": format!("nodeport:dashboard_query_{i}"),
                "expr": monitoring::grafana_to_promql(expr),
            })
        })
        .collect();
    for (title, expr) in &queries {
        let promql = monitoring::grafana_to_promql(expr);
        ensure!(
            !promql.contains('$'),
            "panel {title:?}: a Grafana variable the test does not know in {expr}"
        );
    }
    let scratch = Scratch::new("dashboard-queries")?;
    let file = scratch.path().join("dashboard.yaml");
    std::fs::write(
        &file,
        serde_json::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]}))?,
    )?;
    let out = monitoring::run_promtool(&["check", "rules", &file.display().to_string()], None)?;
    ensure!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );

    // And the check is real: a broken query fails it.
    std::fs::write(
        &file,
        "groups: [{name: broken, rules: [{record: broken, expr: 'sum by (node (up)'}]}]",
    )?;
    ensure!(
        monitoring::run_promtool(&["check", "rules", &file.display().to_string()], None).is_err(),
        "promtool accepted a broken query"
    );
    Ok(())
}

/// The dashboard's panels: unique ids, every query on the data source variable, every series
/// selector scoped to the agents (job="nodeport") and the chosen nodes.
#[test]
fn the_dashboard_queries_are_scoped_to_the_agents() -> Result<()> {
    let path = monitoring::dir().join("nodeport-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let id = panel["id"].as_u64().context("panel id")?;
        ensure!(ids.insert(id), "panel id {id} twice");
        if panel["type"] == "row" {
            continue;
        }
        ensure!(
            panel["datasource"]["uid"] == "${datasource}",
            "panel {}: data source",
            panel["title"]
        );
        ensure!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {}: no query",
            panel["title"]
        );
    }
    for (title, expr) in monitoring::dashboard_queries()? {
        let reads = monitoring::reads(&monitoring::grafana_to_promql(&expr))?;
        ensure!(!reads.metrics.is_empty(), "{title}: reads nothing");
        for (metric, labels) in &reads.metrics {
            ensure!(
                labels.iter().any(|l| l == "job"),
                "{title}: {metric} is not scoped with job=\"nodeport\": {expr}"
            );
            ensure!(
                title.starts_with("variable") || labels.iter().any(|l| l == "node"),
                "{title}: {metric} does not follow the node variable: {expr}"
            );
        }
    }
    Ok(())
}

/// Every metric the alerts and the dashboard read is in docs/monitoring.md's list.
#[test]
fn every_metric_the_monitoring_reads_is_documented() -> Result<()> {
    let docs = std::fs::read_to_string(monitoring::dir().join("../../docs/monitoring.md"))?;
    let mut read = BTreeSet::new();
    for (where_, expr) in monitoring::expressions()? {
        for (metric, _) in monitoring::reads(&expr)
            .with_context(|| where_.clone())?
            .metrics
        {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| metric.strip_suffix(s))
                .unwrap_or(&metric)
                .to_owned();
            read.insert(family);
        }
    }
    for metric in &read {
        if metric == "up" {
            continue;
        }
        ensure!(
            docs.contains(&format!("`{metric}`")),
            "{metric} is read by deploy/monitoring but not in docs/monitoring.md"
        );
    }
    Ok(())
}

/// The documents of a multi-document YAML file.
fn documents(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The PodMonitor scrapes the DaemonSet's pods on the port the agent serves metrics on; the
/// kustomization lists every file of the directory; each object is in the DaemonSet's
/// namespace.
#[test]
fn the_pod_monitor_scrapes_the_daemon_sets_metrics_port() -> Result<()> {
    let deploy = monitoring::dir().join("..");
    let installed = documents(&deploy.join("nodeport.yaml"))?;
    let ds = installed
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("the DaemonSet")?;
    let namespace = ds["metadata"]["namespace"].as_str().context("namespace")?;
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .context("pod labels")?;
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let ports: BTreeMap<&str, u64> = container["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_u64()?)))
        .collect();
    // The agent's flags are in the ConfigMap's config.yaml (`run --config`; the deploy tests of
    // nodeport-agent check the file is the one mounted where --config points).
    let config_map = installed
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "nodeport")
        .context("the ConfigMap nodeport")?;
    let config: Value = serde_norway::from_str(
        config_map["data"]["config.yaml"]
            .as_str()
            .context("config.yaml")?,
    )?;
    let metrics_flag = config["metrics-bind-address"]
        .as_str()
        .context("config.yaml sets metrics-bind-address")?;
    let (address, port) = metrics_flag.rsplit_once(':').context("address:port")?;
    ensure!(
        address == "0.0.0.0",
        "--metrics-bind-address={metrics_flag}: Prometheus scrapes the node's address"
    );

    let monitor = monitoring::yaml(&monitoring::dir().join("podmonitor.yaml"))?;
    ensure!(monitor["apiVersion"] == "monitoring.coreos.com/v1" && monitor["kind"] == "PodMonitor");
    ensure!(monitor["metadata"]["namespace"] == namespace);
    ensure!(
        monitor["spec"]["namespaceSelector"]["matchNames"] == json!([namespace]),
        "the PodMonitor looks in {namespace}"
    );
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("matchLabels")?
    {
        ensure!(
            pod_labels.get(key) == Some(value),
            "the PodMonitor selects {key}={value}, which the DaemonSet's pods do not carry"
        );
    }
    let endpoints = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .context("podMetricsEndpoints")?;
    ensure!(endpoints.len() == 1);
    let endpoint = &endpoints[0];
    let named = endpoint["port"].as_str().context("port")?;
    ensure!(
        ports.get(named).map(u64::to_string).as_deref() == Some(port),
        "the PodMonitor scrapes port {named:?}, not the container port of \
         --metrics-bind-address {port} ({ports:?})"
    );
    ensure!(endpoint["path"] == "/metrics");
    // The operator's target labels namespace and endpoint are also the agent's (the
    // per-service series, the health answers): the agent's must win.
    ensure!(
        endpoint["honorLabels"] == true,
        "the PodMonitor must honor the agent's labels"
    );
    // The labels the alerts and the dashboard use.
    let relabelled: BTreeSet<&str> = endpoint["relabelings"]
        .as_array()
        .context("relabelings")?
        .iter()
        .filter_map(|r| r["targetLabel"].as_str())
        .collect();
    ensure!(
        relabelled.contains("job") && relabelled.contains("node"),
        "{relabelled:?}"
    );
    let rule = monitoring::yaml(&monitoring::dir().join("prometheusrule.yaml"))?;
    ensure!(rule["metadata"]["namespace"] == namespace);

    // The kustomization lists every file.
    let kustomization = monitoring::yaml(&monitoring::dir().join("kustomization.yaml"))?;
    let mut listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    for generator in kustomization["configMapGenerator"]
        .as_array()
        .into_iter()
        .flatten()
    {
        ensure!(generator["namespace"] == namespace);
        listed.extend(
            generator["files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned)),
        );
    }
    let present: BTreeSet<String> = std::fs::read_dir(monitoring::dir())?
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type().ok()?.is_file().then_some(())?;
            let name = e.file_name().to_string_lossy().into_owned();
            (name != "kustomization.yaml").then_some(name)
        })
        .collect();
    ensure!(
        listed == present,
        "kustomization.yaml lists {listed:?}, the directory has {present:?}"
    );
    Ok(())
}
