//! deploy/monitoring as the tests read it, and promtool.
//!
//! promtool comes with Debian's `prometheus` package; `cargo xtask test` unpacks it when it is
//! missing and passes its path in NODEPORT_PROMTOOL (xtask/src/prereqs.rs). Tests that need it
//! fail, saying so, when it is nowhere.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// deploy/monitoring.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// promtool: NODEPORT_PROMTOOL, else `promtool` on the PATH.
pub fn promtool() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NODEPORT_PROMTOOL") {
        let path = PathBuf::from(path);
        ensure!(
            path.exists(),
            "NODEPORT_PROMTOOL={} does not exist",
            path.display()
        );
        return Ok(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file());
    found.context(
        "promtool is not installed: it comes with Debian's `prometheus` package \
         (`apt-get install prometheus`); `cargo xtask test` unpacks it by itself. These tests \
         check the alerts, the dashboard and the metrics with it and do not skip",
    )
}

/// Runs promtool with `args`, `stdin` piped in; its output on failure.
pub fn run_promtool(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(promtool()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    let mut input = child.stdin.take().context("promtool's stdin")?;
    input.write_all(stdin.unwrap_or_default().as_bytes())?;
    drop(input);
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// `promtool check metrics` on Prometheus text (0.0.4): the linter's complaints fail it.
pub fn check_metrics(text: &str) -> Result<()> {
    let out = run_promtool(&["check", "metrics"], Some(text))?;
    ensure!(
        out.trim().is_empty(),
        "promtool check metrics complains:\n{out}"
    );
    Ok(())
}

/// OpenMetrics text parsed by Prometheus' own OpenMetrics parser: `promtool tsdb
/// create-blocks-from openmetrics`, which wants a timestamp on every sample (a backfill), so
/// one is appended to each sample line; the rest is read as served. `promtool check metrics`
/// reads the 0.0.4 text format only, where an OpenMetrics counter's `_total` samples look like
/// a family of their own without help text.
pub fn check_openmetrics(text: &str, scratch: &Path) -> Result<()> {
    ensure!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text must end with # EOF"
    );
    let mut stamped = String::new();
    for line in text.lines() {
        stamped.push_str(line);
        if !line.starts_with('#') {
            stamped.push_str(" 1800000000");
        }
        stamped.push('\n');
    }
    let input = scratch.join("metrics.om");
    std::fs::write(&input, stamped)?;
    let blocks = scratch.join("blocks");
    run_promtool(
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            &input.display().to_string(),
            &blocks.display().to_string(),
        ],
        None,
    )?;
    Ok(())
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("nodeport-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A YAML file as JSON.
pub fn yaml(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_norway::from_str(&text).with_context(|| path.display().to_string())
}

/// The PrometheusRule's `spec`: a Prometheus rule file's content.
pub fn rule_groups() -> Result<Value> {
    let rule = yaml(&dir().join("prometheusrule.yaml"))?;
    ensure!(
        rule["apiVersion"] == "monitoring.coreos.com/v1" && rule["kind"] == "PrometheusRule",
        "prometheusrule.yaml is not a PrometheusRule"
    );
    Ok(rule["spec"].clone())
}

/// The rules of every group.
pub fn rules() -> Result<Vec<Value>> {
    let groups = rule_groups()?;
    let groups = groups["groups"].as_array().context("spec.groups")?;
    Ok(groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect())
}

/// The alert names of the rules.
pub fn alert_names() -> Result<BTreeSet<String>> {
    Ok(rules()?
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect())
}

/// Every query of the dashboard: (panel title, expression as Grafana has it).
pub fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let path = dir().join("nodeport-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    fn walk(panel: &Value, out: &mut Vec<(String, String)>) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or_default().to_owned();
                out.push((title, expr.to_owned()));
            }
        }
        for inner in panel["panels"].as_array().into_iter().flatten() {
            walk(inner, out);
        }
    }
    for panel in dashboard["panels"].as_array().context("panels")? {
        walk(panel, &mut out);
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"].as_str()
            && let Some(inner) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector)
        {
            // label_values(SELECTOR, LABEL): the selector is PromQL.
            out.push((format!("variable {}", variable["name"]), inner.to_owned()));
        }
    }
    Ok(out)
}

/// A Grafana query as PromQL: its variables replaced by what they stand for.
pub fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$node", ".*")
}

/// What an expression reads: metric names with the label names their matchers use, and the
/// label names of `by`, `without`, `on`, `ignoring` and `group_left/right`. A small tokenizer,
/// enough for the expressions of deploy/monitoring (no string contains `{` or `(`).
#[derive(Debug, Default)]
pub struct Reads {
    pub metrics: Vec<(String, Vec<String>)>,
    pub grouping: BTreeSet<String>,
}

const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "topk",
    "bottomk",
    "rate",
    "irate",
    "increase",
    "changes",
    "absent",
    "time",
    "histogram_quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "scalar",
    "vector",
    "label_values",
    "offset",
    "stddev",
    "quantile",
    "delta",
    "deriv",
    "clamp_min",
    "clamp_max",
    "abs",
];

pub fn reads(expr: &str) -> Result<Reads> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Reads::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // A string: skip it.
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j] == ' ' {
                j += 1;
            }
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ];
            if grouping.contains(&word.as_str()) && chars.get(j) == Some(&'(') {
                let end = chars[j..]
                    .iter()
                    .position(|&c| c == ')')
                    .context("unclosed grouping")?;
                let labels: String = chars[j + 1..j + end].iter().collect();
                out.grouping.extend(
                    labels
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
                i = j + end + 1;
            } else if KEYWORDS.contains(&word.as_str()) {
                // A function or keyword.
            } else if chars.get(j) == Some(&'{') {
                let end = chars[j..]
                    .iter()
                    .position(|&c| c == '}')
                    .context("unclosed selector")?;
                let matchers: String = chars[j + 1..j + end].iter().collect();
                let labels = matcher_labels(&matchers);
                out.metrics.push((word, labels));
                i = j + end + 1;
            } else if !word.chars().all(|c| c.is_ascii_digit() || c == 'e') {
                out.metrics.push((word, Vec::new()));
            }
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c == '{' {
            bail!("a selector without a metric name in {expr:?}");
        }
        i += 1;
    }
    Ok(out)
}

/// The label names of a selector's matchers (`a="x", b=~"y"`).
fn matcher_labels(matchers: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = matchers;
    loop {
        let rest_trimmed = rest.trim_start_matches([' ', ',']);
        let Some(op) = rest_trimmed.find(['=', '!']) else {
            break;
        };
        labels.push(rest_trimmed[..op].trim().to_owned());
        // Skip to the end of the quoted value.
        let Some(open) = rest_trimmed[op..].find('"') else {
            break;
        };
        let value_start = op + open + 1;
        let Some(close) = rest_trimmed[value_start..].find('"') else {
            break;
        };
        rest = &rest_trimmed[value_start + close + 1..];
    }
    labels
}

/// Every expression of deploy/monitoring, as PromQL: (where, expression).
pub fn expressions() -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = rules()?
        .iter()
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            (
                format!("rule {name}"),
                r["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (title, expr) in dashboard_queries()? {
        out.push((
            format!("dashboard panel {title:?}"),
            grafana_to_promql(&expr),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metrics_labels_and_grouping() {
        let r = reads(
            "sum without (state) (nodeport_conntrack_entries{job=\"nodeport\",map=\"NP_CT\"}) \
             / ignoring (snat_address) group_left nodeport_map_capacity{map!~\"a|b\"} > 0.85 \
             unless rate(up[5m]) > 1e3",
        )
        .unwrap();
        assert_eq!(
            r.metrics,
            vec![
                (
                    "nodeport_conntrack_entries".to_owned(),
                    vec!["job".to_owned(), "map".to_owned()]
                ),
                ("nodeport_map_capacity".to_owned(), vec!["map".to_owned()]),
                ("up".to_owned(), vec![]),
            ]
        );
        assert_eq!(
            r.grouping,
            ["snat_address", "state"].map(str::to_owned).into()
        );
    }
}
