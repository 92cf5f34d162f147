//! The two text formats `/metrics` serves, chosen by the scraper's `Accept` header as
//! Prometheus' client_golang does:
//!
//! - OpenMetrics 1.0 (`application/openmetrics-text`), which Prometheus asks for first;
//! - the Prometheus text format 0.0.4 (`text/plain`), for everything else (curl, older
//!   scrapers, `promtool check metrics`).
//!
//! prometheus-client encodes OpenMetrics only; the 0.0.4 text is derived from it. The formats
//! differ, for what the agent exports, in three places: a counter family is named without
//! `_total` in OpenMetrics (`# TYPE nodeport_sync_failures counter`, samples
//! `nodeport_sync_failures_total`) and with it in 0.0.4, where the family name is the sample's;
//! OpenMetrics ends with `# EOF`; and it has `# UNIT` lines and `_created` samples, which 0.0.4
//! has not.

use std::collections::HashMap;

use prometheus_client::{encoding::text::encode, registry::Registry};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it accepts
    /// `application/openmetrics-text` at least as much as `text/plain`, the 0.0.4 text
    /// otherwise (also without the header).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::PrometheusText;
        };
        let (mut openmetrics, mut text) = (0.0_f64, 0.0_f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS,
            Self::PrometheusText => PROMETHEUS_TEXT,
        }
    }
}

/// `registry` in `format`.
pub fn render(registry: &Registry, format: Format) -> String {
    let mut body = String::new();
    // Writing to a String does not fail; an encoding error of one metric would leave the
    // text cut short, which the scraper reports.
    if let Err(e) = encode(&mut body, registry) {
        tracing::error!(error = %e, "metrics: encoding failed");
    }
    match format {
        Format::OpenMetrics => body,
        Format::PrometheusText => openmetrics_to_text(&body),
    }
}

/// The family a sample line belongs to, given the families' types: the longest family name
/// the sample name starts with, followed by nothing or one of its type's suffixes.
fn family_of<'a>(sample: &str, types: &HashMap<&'a str, &'a str>) -> Option<&'a str> {
    let suffixes: &[&str] = &[
        "", "_total", "_created", "_bucket", "_sum", "_count", "_info",
    ];
    suffixes.iter().find_map(|suffix| {
        let name = sample.strip_suffix(suffix)?;
        types.get_key_value(name).map(|(k, _)| *k)
    })
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4 (see the module's documentation).
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = descriptor {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, text) = match (types.get(name).copied(), prefix) {
                (Some("counter"), "# TYPE ") => (format!("{name}_total"), "counter"),
                (Some("counter"), _) => (format!("{name}_total"), text),
                (Some("info"), "# TYPE ") => (format!("{name}_info"), "gauge"),
                (Some("info"), _) => (format!("{name}_info"), text),
                (Some("unknown"), "# TYPE ") => (name.to_owned(), "untyped"),
                (Some("gaugehistogram"), "# TYPE ") => (name.to_owned(), "histogram"),
                _ => (name.to_owned(), text),
            };
            out.push_str(prefix);
            out.push_str(&name);
            out.push(' ');
            out.push_str(text);
            out.push('\n');
            continue;
        }
        if !line.starts_with('#') {
            let sample = line.split(['{', ' ']).next().unwrap_or_default();
            let created = sample.ends_with("_created")
                && family_of(sample, &types)
                    .is_some_and(|f| sample == format!("{f}_created") && types[f] != "gauge");
            if created {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_curl_gets_text() {
        // Prometheus 2.x's scrape Accept header.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0,text/plain")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.5, application/openmetrics-text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn counters_take_their_total_name_and_eof_goes() {
        let om = "# HELP np_sync_failures Failures.\n\
                  # TYPE np_sync_failures counter\n\
                  np_sync_failures_total{reason=\"error\"} 0\n\
                  np_sync_failures_created{reason=\"error\"} 1.7e9\n\
                  # HELP np_latency_seconds Latency.\n\
                  # TYPE np_latency_seconds histogram\n\
                  # UNIT np_latency_seconds seconds\n\
                  np_latency_seconds_sum 0.0\n\
                  np_latency_seconds_count 0\n\
                  np_latency_seconds_bucket{le=\"+Inf\"} 0\n\
                  # HELP np_build Build.\n\
                  # TYPE np_build info\n\
                  np_build_info{version=\"1\"} 1\n\
                  # HELP np_services Services.\n\
                  # TYPE np_services gauge\n\
                  np_services 3\n\
                  # EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP np_sync_failures_total Failures.\n\
             # TYPE np_sync_failures_total counter\n\
             np_sync_failures_total{reason=\"error\"} 0\n\
             # HELP np_latency_seconds Latency.\n\
             # TYPE np_latency_seconds histogram\n\
             np_latency_seconds_sum 0.0\n\
             np_latency_seconds_count 0\n\
             np_latency_seconds_bucket{le=\"+Inf\"} 0\n\
             # HELP np_build_info Build.\n\
             # TYPE np_build_info gauge\n\
             np_build_info{version=\"1\"} 1\n\
             # HELP np_services Services.\n\
             # TYPE np_services gauge\n\
             np_services 3\n"
        );
    }
}
