//! The human-readable report (`--output table`): plain text, no colour, lines kept within
//! [`WIDTH`] columns except where a Service name alone is longer.

use std::fmt::Write as _;

use super::{Consumer, ConsumerKind, Finding, Ledger, Severity};

const WIDTH: usize = 100;

impl Ledger {
    pub fn render_table(&self) -> String {
        self.render_text(false)
    }

    /// The text report; `wide` adds the Service ports (`spec.ports[].port`) of each consumer.
    pub fn render_text(&self, wide: bool) -> String {
        let mut out = String::new();
        self.render_header(&mut out);
        self.render_totals(&mut out);
        self.render_consumers(&mut out, wide);
        self.render_findings(&mut out);
        out
    }

    fn render_header(&self, out: &mut String) {
        let range = &self.range;
        let _ = writeln!(
            out,
            "NODE PORT RANGE {}-{} ({} ports)",
            range.first, range.last, range.size
        );
        match self.bands.static_band {
            Some(band) => {
                let _ = writeln!(
                    out,
                    "  static band   {band:<12} {:>5} ports  for hand-picked node ports",
                    band.size()
                );
                let _ = writeln!(
                    out,
                    "  dynamic band  {:<12} {:>5} ports  automatic allocation takes these first",
                    self.bands.dynamic,
                    self.bands.dynamic.size()
                );
                let _ = writeln!(
                    out,
                    "  (KEP-3668 band offset min(max(16, {}/32), 128) = {})",
                    range.size, range.band_offset
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  not split into bands (16 ports or fewer): automatic allocation uses the \
                     whole range"
                );
            }
        }
        match self.local_port_range {
            Some(local) => {
                let _ = writeln!(out, "  node net.ipv4.ip_local_port_range: {local}");
            }
            None => {
                let _ = writeln!(out, "  node net.ipv4.ip_local_port_range: not checked");
            }
        }
        out.push('\n');
    }

    fn render_totals(&self, out: &mut String) {
        let totals = &self.totals;
        let mut rows = vec![[
            "BAND".to_owned(),
            "SIZE".into(),
            "USED".into(),
            "FREE".into(),
            "USE %".into(),
        ]];
        let bands = [
            ("static", totals.static_band),
            ("dynamic", Some(totals.dynamic)),
            ("all", Some(totals.all)),
        ];
        for (name, usage) in bands {
            if let Some(usage) = usage {
                rows.push([
                    name.to_owned(),
                    usage.size.to_string(),
                    usage.used.to_string(),
                    usage.free.to_string(),
                    format!("{:.1}%", usage.use_percent),
                ]);
            }
        }
        write_table(out, &rows, &[false, true, true, true, true]);
        let counts = &totals.consumers_by_kind;
        let kinds: Vec<String> = ConsumerKind::ALL
            .iter()
            .map(|kind| format!("{} {}", counts.get(*kind), kind_label(*kind)))
            .collect();
        let _ = writeln!(
            out,
            "\nconsumers: {}; not yet allocated: {}; outside the range: {}\n",
            kinds.join(", "),
            totals.unallocated,
            totals.outside_range
        );
    }

    fn render_consumers(&self, out: &mut String, wide: bool) {
        if self.consumers.is_empty() {
            out.push_str("No Service uses a node port.\n\n");
            return;
        }
        let mut header = vec![
            "PORT".to_owned(),
            "PROTO".into(),
            "KIND".into(),
            "NAMESPACE/NAME".into(),
            "PORT-NAME".into(),
            "BAND".into(),
            "ALLOCATION".into(),
        ];
        if wide {
            header.push("SERVICE-PORT".into());
        }
        let mut rows = vec![header];
        rows.extend(self.consumers.iter().map(|c| {
            let mut row = consumer_row(c).to_vec();
            if wide {
                row.push(service_ports(c));
            }
            row
        }));
        write_table(out, &rows, &vec![false; rows[0].len()]);
        out.push('\n');
    }

    fn render_findings(&self, out: &mut String) {
        if self.findings.is_empty() {
            out.push_str("FINDINGS: none\n");
            return;
        }
        let count = |severity| {
            self.findings
                .iter()
                .filter(|f| f.severity == severity)
                .count()
        };
        let _ = writeln!(
            out,
            "FINDINGS: {} critical, {} warning, {} info",
            count(Severity::Critical),
            count(Severity::Warning),
            count(Severity::Info)
        );
        // Findings of one kind share their reasoning: print it once.
        let mut explained = std::collections::HashSet::new();
        for finding in &self.findings {
            out.push('\n');
            let first_of_kind = explained.insert(finding.kind);
            render_finding(out, finding, first_of_kind);
        }
    }
}

fn consumer_row(consumer: &Consumer) -> [String; 7] {
    let port_names = if consumer.port_names.iter().all(String::is_empty) {
        "-".to_owned()
    } else {
        consumer
            .port_names
            .iter()
            .map(|name| if name.is_empty() { "-" } else { name })
            .collect::<Vec<_>>()
            .join(",")
    };
    [
        consumer.port.to_string(),
        consumer.protocols.join("+"),
        kind_label(consumer.kind).to_owned(),
        format!("{}/{}", consumer.namespace, consumer.name),
        port_names,
        consumer
            .band
            .map_or("outside", |band| band.as_str())
            .to_owned(),
        consumer.allocation.as_str().to_owned(),
    ]
}

/// `spec.ports[].port` of the Service ports behind a consumer, `-` for a health check node port.
fn service_ports(consumer: &Consumer) -> String {
    if consumer.service_ports.is_empty() {
        return "-".to_owned();
    }
    let ports: Vec<String> = consumer.service_ports.iter().map(i32::to_string).collect();
    ports.join(",")
}

fn kind_label(kind: ConsumerKind) -> &'static str {
    match kind {
        ConsumerKind::NodePort => "NodePort",
        ConsumerKind::LoadBalancerNodePort => "LoadBalancer",
        ConsumerKind::HealthCheckNodePort => "HealthCheck",
    }
}

fn render_finding(out: &mut String, finding: &Finding, with_reasoning: bool) {
    let head = format!(
        "[{}] {}: {}",
        finding.severity.as_str(),
        finding.kind.as_str(),
        finding.summary
    );
    wrap_into(out, &head, "", "    ");
    for (index, object) in finding.objects.iter().enumerate() {
        let label = if index == 0 {
            "  objects: "
        } else {
            "           "
        };
        let ports: Vec<String> = object.ports.iter().map(u16::to_string).collect();
        let mut line = format!("{}/{}", object.namespace, object.name);
        if !ports.is_empty() {
            let _ = write!(line, " {}", ports.join(","));
        }
        if let Some(note) = &object.note {
            let _ = write!(line, ": {note}");
        }
        wrap_into(out, &line, label, "             ");
    }
    if with_reasoning {
        wrap_into(out, &finding.reasoning, "  why:     ", "           ");
    } else {
        out.push_str("  why:     as above\n");
    }
    wrap_into(out, &finding.change, "  change:  ", "           ");
}

/// Writes `text` word-wrapped at [`WIDTH`], the first line after `first`, the rest after
/// `rest`. A word longer than the line stays whole.
fn wrap_into(out: &mut String, text: &str, first: &str, rest: &str) {
    let mut line = first.to_owned();
    let mut line_has_word = false;
    for word in text.split_whitespace() {
        if line_has_word && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = rest.to_owned();
            line_has_word = false;
        }
        if line_has_word {
            line.push(' ');
        }
        line.push_str(word);
        line_has_word = true;
    }
    out.push_str(&line);
    out.push('\n');
}

/// Left-aligned columns (right-aligned where `right` says), two spaces apart, no trailing
/// blanks.
fn write_table<R: AsRef<[String]>>(out: &mut String, rows: &[R], right: &[bool]) {
    let mut widths = vec![0usize; right.len()];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.as_ref()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.as_ref().iter().enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            let width = widths[column];
            if right[column] {
                let _ = write!(line, "{cell:>width$}");
            } else {
                let _ = write!(line, "{cell:<width$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_the_width_with_indented_continuations() {
        let mut out = String::new();
        let text = "word ".repeat(40);
        wrap_into(&mut out, &text, "  why:     ", "           ");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|line| line.len() <= WIDTH), "{out}");
        assert!(lines[0].starts_with("  why:     word"));
        assert!(lines[1].starts_with("           word"));
        assert_eq!(out.split_whitespace().filter(|w| *w == "word").count(), 40);
    }

    #[test]
    fn tables_align_columns() {
        let mut out = String::new();
        let rows = [
            ["A".to_owned(), "NUM".to_owned()],
            ["long".to_owned(), "5".to_owned()],
        ];
        write_table(&mut out, &rows, &[false, true]);
        assert_eq!(out, "A     NUM\nlong    5\n");
    }
}
