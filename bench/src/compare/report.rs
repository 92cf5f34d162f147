//! bench/REPORT.md, its plots, and the plain-text summary printed at the end of the run.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;

use super::{
    Arm, ArmRound, Results,
    plot::{self, Series},
};

/// Median, min and max of a set of rounds.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// One figure measured per arm and round.
#[derive(Clone, Copy)]
pub struct Metric {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub get: fn(&ArmRound) -> f64,
    /// Decimals in tables.
    pub decimals: usize,
    pub log_y: bool,
}

pub const METRICS: &[Metric] = &[
    Metric {
        key: "connection-rate",
        title: "New connections per second",
        unit: "connections/s",
        higher_is_better: true,
        get: |r| r.conn_rate,
        decimals: 0,
        log_y: true,
    },
    Metric {
        key: "connection-rate-parallel",
        title: "New connections per second, 2 clients at once",
        unit: "connections/s",
        higher_is_better: true,
        get: |r| r.conn_rate_parallel,
        decimals: 0,
        log_y: true,
    },
    Metric {
        key: "connection-latency-p50",
        title: "New connection, connect to answer, p50",
        unit: "ms",
        higher_is_better: false,
        get: |r| r.conn_p50,
        decimals: 3,
        log_y: true,
    },
    Metric {
        key: "connection-latency-p99",
        title: "New connection, connect to answer, p99",
        unit: "ms",
        higher_is_better: false,
        get: |r| r.conn_p99,
        decimals: 3,
        log_y: true,
    },
    Metric {
        key: "request-latency-p50",
        title: "Request on an established connection, p50",
        unit: "ms",
        higher_is_better: false,
        get: |r| r.req_p50,
        decimals: 3,
        log_y: false,
    },
    Metric {
        key: "request-latency-p99",
        title: "Request on an established connection, p99",
        unit: "ms",
        higher_is_better: false,
        get: |r| r.req_p99,
        decimals: 3,
        log_y: false,
    },
    Metric {
        key: "udp-rate",
        title: "UDP datagrams delivered per second",
        unit: "datagrams/s",
        higher_is_better: true,
        get: |r| r.udp_rate,
        decimals: 0,
        log_y: false,
    },
    Metric {
        key: "cpu-per-connection",
        title: "CPU per connection at a fixed rate",
        unit: "µs",
        higher_is_better: false,
        get: |r| r.cpu_per_conn,
        decimals: 0,
        log_y: true,
    },
    Metric {
        key: "endpoint-change",
        title: "Endpoint change to traffic on the new backend",
        unit: "ms",
        higher_is_better: false,
        get: |r| r.change,
        decimals: 1,
        log_y: true,
    },
];

fn metric(key: &str) -> &'static Metric {
    METRICS.iter().find(|m| m.key == key).expect("a metric")
}

impl Results {
    pub fn stat(&self, n: u32, arm: Arm, m: &Metric) -> Option<Stat> {
        let rounds = self.arms.get(&(n, arm))?;
        Stat::of(&rounds.iter().map(m.get).collect::<Vec<_>>())
    }

    /// Every N measured, ascending.
    pub fn all_counts(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.arms.keys().map(|(n, _)| *n).collect();
        v.dedup();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn fmt(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{v:.decimals$}");
    // Thousands separators for big integers read better in a table.
    if decimals == 0 && v.abs() >= 10_000.0 {
        let digits: Vec<char> = s.chars().collect();
        let mut out = String::new();
        for (i, c) in digits.iter().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) && c.is_ascii_digit() {
                out.push(',');
            }
            out.push(*c);
        }
        return out;
    }
    s
}

fn cell(s: Option<Stat>, decimals: usize) -> String {
    match s {
        Some(s) => format!(
            "{} ({}–{})",
            fmt(s.median, decimals),
            fmt(s.min, decimals),
            fmt(s.max, decimals)
        ),
        None => "–".into(),
    }
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}"))
}

pub struct Verdict {
    pub text: String,
    pub met: bool,
}

/// The targets, judged on the medians.
pub fn targets(r: &Results) -> Vec<Verdict> {
    let mut out = Vec::new();
    let rate = metric("connection-rate");
    let req99 = metric("request-latency-p99");
    let conn99 = metric("connection-latency-p99");

    // 1. nodeport flat within 15% from the smallest to the largest N.
    let counts: Vec<u32> = r
        .all_counts()
        .into_iter()
        .filter(|n| r.arms.contains_key(&(*n, Arm::Nodeport)))
        .collect();
    if let (Some(&first), Some(&last)) = (counts.first(), counts.last()) {
        for m in [rate, conn99, req99] {
            let base = r.stat(first, Arm::Nodeport, m).map(|s| s.median);
            let devs: Vec<(u32, f64)> = counts
                .iter()
                .filter_map(|n| {
                    let v = r.stat(*n, Arm::Nodeport, m)?.median;
                    Some((*n, (v / base? - 1.0) * 100.0))
                })
                .collect();
            let worst = devs.iter().map(|d| d.1.abs()).fold(0.0f64, f64::max);
            let list: Vec<String> = devs.iter().map(|(n, d)| format!("{n}: {d:+.1}%")).collect();
            out.push(Verdict {
                met: worst <= 15.0,
                text: format!(
                    "nodeport's {} flat within 15% from {first} to {last} Services (against {first}): {}",
                    m.title.to_lowercase(),
                    list.join(", ")
                ),
            });
        }
    }

    // 2. At 10,000: rate at least 8x, p99 at least 5x lower, with and without kube-proxy's rules.
    let n = 10_000;
    if r.arms.contains_key(&(n, Arm::Iptables)) {
        for arm in [Arm::Nodeport, Arm::NodeportBesideKubeProxy] {
            if let Some(x) = ratio(r.stat(n, arm, rate), r.stat(n, Arm::Iptables, rate)) {
                // When nodeport keeps its 1-Service rate, the machine (client, both TCP stacks
                // and the server on the same cores) is the limit, not the datapath: say so.
                let ceiling = match (r.stat(n, arm, rate), r.stat(1, arm, rate)) {
                    (Some(here), Some(one)) if x < 8.0 && here.median >= 0.85 * one.median => {
                        format!(
                            "; nodeport runs at {:.0}% of its own 1-Service rate, the most this machine's short connections reach, so the ratio is bounded by how fast the iptables arm still is",
                            here.median / one.median * 100.0
                        )
                    }
                    _ => String::new(),
                };
                out.push(Verdict {
                    met: x >= 8.0,
                    text: format!(
                        "at {n} Services, {}: new-connection rate {x:.1}x the iptables arm's (target at least 8x){ceiling}",
                        arm.label()
                    ),
                });
            }
            // The reference figures (p50 from about 0.12 ms to 1.5 ms) are those of a
            // new connection: the nat chains see only a connection's first packet, so a request
            // on an established connection costs the same in both arms and is shown alongside.
            if let Some(x) = ratio(r.stat(n, Arm::Iptables, conn99), r.stat(n, arm, conn99)) {
                let established = ratio(r.stat(n, Arm::Iptables, req99), r.stat(n, arm, req99));
                out.push(Verdict {
                    met: x >= 5.0,
                    text: format!(
                        "at {n} Services, {}: p99 latency of a new connection (connect, request, answer) {x:.1}x lower than the iptables arm's (target at least 5x){}",
                        arm.label(),
                        established.map_or(String::new(), |e| format!(
                            "; on an established connection {e:.2}x (iptables' nat rules see only a connection's first packet)"
                        ))
                    ),
                });
            }
        }
    }

    // 3. At 1 Service: not slower than iptables on any measurement.
    let n = 1;
    if r.arms.contains_key(&(n, Arm::Iptables)) {
        for arm in [Arm::Nodeport, Arm::NodeportBesideKubeProxy] {
            let mut slower = Vec::new();
            for m in METRICS {
                let (Some(a), Some(i)) = (r.stat(n, arm, m), r.stat(n, Arm::Iptables, m)) else {
                    continue;
                };
                let worse = if m.higher_is_better {
                    a.median < i.median
                } else {
                    a.median > i.median
                };
                if worse {
                    let overlap = a.min <= i.max && i.min <= a.max;
                    slower.push(format!(
                        "{} ({} vs {} {}{})",
                        m.title.to_lowercase(),
                        fmt(a.median, m.decimals),
                        fmt(i.median, m.decimals),
                        m.unit,
                        if overlap { ", ranges overlap" } else { "" }
                    ));
                }
            }
            out.push(Verdict {
                met: slower.is_empty(),
                text: if slower.is_empty() {
                    format!(
                        "at 1 Service, {}: not slower than the iptables arm on any measurement (medians)",
                        arm.label()
                    )
                } else {
                    format!(
                        "at 1 Service, {}: slower than the iptables arm on: {}",
                        arm.label(),
                        slower.join("; ")
                    )
                },
            });
        }
    }

    // 4. Control plane: 10,000 Services at least 10x faster than iptables-restore.
    let n = 10_000;
    let restore = r.restore.get(&n).and_then(|v| Stat::of(v));
    if let Some(restore) = restore {
        let process = r.agent_start.get(&n).and_then(|v| Stat::of(v));
        let inproc = r.agent_program.get(&n).and_then(|v| Stat::of(v));
        if let Some(i) = inproc {
            let x = restore.median / i.median;
            out.push(Verdict {
                met: x >= 10.0,
                text: format!(
                    "{n} Services programmed {x:.1}x faster than iptables-restore loads kube-proxy's rules for them ({:.3} s vs {:.2} s; target at least 10x): the agent's reconciler and map writes, like for like with iptables-restore, which also gets its input ready-made (kube-proxy's own rule generation is not timed){}",
                    i.median,
                    restore.median,
                    process.map_or(String::new(), |p| format!(
                        ". The agent process from its start, reading and parsing {n} Services and EndpointSlices of YAML, loading and attaching its programs: {:.2} s, {:.1}x faster",
                        p.median,
                        restore.median / p.median
                    ))
                ),
            });
        }
    }
    out
}

fn machine_load(r: &Results) -> String {
    match Stat::of(&r.load) {
        Some(s) => format!(
            "1-minute load average before each round: median {:.2} (min {:.2}, max {:.2}) on {} cores",
            s.median,
            s.min,
            s.max,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        None => "load average not sampled".into(),
    }
}

/// The datapath figures (measurement 1), when that part ran in the same invocation.
pub struct DatapathRow {
    pub services: u32,
    pub bare: f64,
    pub established_local: f64,
    pub established_remote: f64,
    pub new_flow_local: f64,
    /// A new flow to a remote backend (SNAT port search), the handshake table churning.
    pub new_flow_remote: f64,
}

/// The per-packet figures of the run before the two conntrack tables (2026-11-21): services,
/// established local, established remote, new flow local.
const PREVIOUS_DATAPATH: &[(u32, f64, f64, f64)] = &[
    (1, 94.0, 84.0, 1863.0),
    (1_000, 93.0, 88.0, 1962.0),
    (10_000, 91.0, 82.0, 1865.0),
    (65_536, 92.0, 84.0, 1880.0),
];

pub struct ReportInput<'a> {
    pub results: &'a Results,
    pub datapath: Option<&'a [DatapathRow]>,
    pub date: &'a str,
    pub machine: &'a str,
    /// The whole bench run (all parts), for the report.
    pub total: std::time::Duration,
    /// Pages of other parts of the same run (the SNAT comparison), appended as they are,
    /// their headings one level down.
    pub extra: &'a [String],
}

fn plots(input: &ReportInput, dir: &Path) -> Result<Vec<(String, String)>> {
    std::fs::create_dir_all(dir)?;
    let r = input.results;
    let mut made = Vec::new();
    for m in METRICS {
        let series: Vec<Series> = Arm::ALL
            .iter()
            .map(|arm| Series {
                label: arm.label().into(),
                points: r
                    .all_counts()
                    .into_iter()
                    .filter_map(|n| {
                        let s = r.stat(n, *arm, m)?;
                        Some((n, s.median, s.min, s.max))
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        let file = format!("{}.svg", m.key);
        plot::draw(
            &dir.join(&file),
            m.title,
            &format!(
                "{} ({})",
                m.title.split(',').next().unwrap_or(m.title),
                m.unit
            ),
            &series,
            m.log_y,
        )?;
        made.push((m.title.to_owned(), file));
    }
    // Control plane.
    let series_of = |label: &str, map: &std::collections::BTreeMap<u32, Vec<f64>>| Series {
        label: label.into(),
        points: map
            .iter()
            .filter_map(|(n, v)| {
                let s = Stat::of(v)?;
                Some((*n, s.median, s.min, s.max))
            })
            .collect(),
    };
    let control = [
        series_of("iptables-restore, full ruleset", &r.restore),
        series_of("agent process, start to programmed", &r.agent_start),
        series_of("agent reconcile + map writes", &r.agent_program),
    ];
    let file = "control-plane.svg".to_owned();
    plot::draw(
        &dir.join(&file),
        "Time to program N Services",
        "seconds",
        &control
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect::<Vec<_>>(),
        true,
    )?;
    made.push(("Time to program N Services".into(), file));
    if let Some(rows) = input.datapath {
        let line = |label: &str, f: fn(&DatapathRow) -> f64| Series {
            label: label.into(),
            points: rows
                .iter()
                .map(|row| (row.services, f(row), f64::NAN, f64::NAN))
                .collect(),
        };
        let file = "datapath-ns-per-packet.svg".to_owned();
        plot::draw(
            &dir.join(&file),
            "XDP program cost per packet (BPF_PROG_TEST_RUN)",
            "ns per packet",
            &[
                line("bare XDP_PASS", |r| r.bare),
                line("established, local pod", |r| r.established_local),
                line("established, remote (XDP_TX)", |r| r.established_remote),
                line("new flow, local pod", |r| r.new_flow_local),
            ],
            true,
        )?;
        made.push(("XDP program cost per packet".into(), file));
    }
    Ok(made)
}

/// Writes `dir/REPORT.md` and `dir/plots/*.svg`; returns the report.
pub fn write(input: &ReportInput, dir: &Path) -> Result<String> {
    let r = input.results;
    let cfg = &r.config;
    let plots = plots(input, &dir.join("plots"))?;
    let mut md = String::new();
    writeln!(
        md,
        "# nodeport against kube-proxy's iptables mode\n\n\
         Generated by `cargo xtask bench` on {}{}. Every figure is the median of {} rounds with \
         the min–max range in brackets; ratios are of medians.\n",
        input.date,
        if cfg.quick {
            " (**quick development run: fewer rounds and shorter runs; not for publishing**)"
        } else {
            ""
        },
        cfg.rounds
    )?;
    writeln!(md, "- Machine: {}", input.machine)?;
    writeln!(md, "- iptables: `{}`", r.iptables_version)?;
    writeln!(
        md,
        "- How busy the machine was: {}. The arms ran interleaved, so whatever noise there was hit each of them alike.",
        machine_load(r)
    )?;
    writeln!(
        md,
        "- Duration: the comparison {:.1} min, the whole `cargo xtask bench` run (datapath, agent and comparison parts, builds excluded) {:.1} min.\n",
        r.duration.as_secs_f64() / 60.0,
        input.total.as_secs_f64() / 60.0
    )?;

    writeln!(md, "## Targets\n")?;
    for v in targets(r) {
        writeln!(
            md,
            "- **{}**: {}",
            if v.met { "met" } else { "NOT met" },
            v.text
        )?;
    }
    writeln!(md, "\n{}\n\n{}\n", WHY, CEILING)?;

    writeln!(md, "## Setup\n")?;
    writeln!(md, "{}", setup_text(r))?;

    writeln!(md, "## Traffic\n")?;
    writeln!(
        md,
        "Columns: median (min–max) per arm; `np/ipt` is nodeport's median over the iptables arm's, \
         `beside/ipt` the same for nodeport beside kube-proxy's rules (above 1 is better for rates, \
         below 1 for times).\n"
    )?;
    for m in METRICS {
        writeln!(md, "### {} ({})\n", m.title, m.unit)?;
        writeln!(
            md,
            "| Services | iptables | nodeport beside kube-proxy | nodeport | np/ipt | beside/ipt |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
        for n in r.all_counts() {
            let [i, b, p] = Arm::ALL.map(|arm| r.stat(n, arm, m));
            writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {} |",
                cell(i, m.decimals),
                cell(b, m.decimals),
                cell(p, m.decimals),
                ratio_cell(ratio(p, i)),
                ratio_cell(ratio(b, i))
            )?;
        }
        writeln!(md)?;
    }
    let failed: u64 = r.arms.values().flatten().map(|x| x.conn_failed).sum();
    let (sent, delivered): (u64, u64) = r
        .arms
        .values()
        .flatten()
        .fold((0, 0), |(s, d), x| (s + x.udp_sent, d + x.udp_delivered));
    writeln!(
        md,
        "Failed connections over the whole run: {failed}. UDP: {sent} datagrams sent, {delivered} delivered ({:.1}%; the rest were dropped on the way when the senders outran the path, in every arm).\n",
        delivered as f64 * 100.0 / sent.max(1) as f64
    )?;

    writeln!(md, "## Control plane\n")?;
    writeln!(
        md,
        "*iptables-restore*: the full ruleset into a node without rules, every round. *agent process*: \
         `nodeport-agent run --manifests` from its start until it logged its first reconcile: reading \
         and parsing the YAML of every Service and EndpointSlice, loading the BPF programs and maps, \
         attaching, programming, every round. *agent reconcile + map writes*: the agent's \
         `Reconciler` and `Syncer` programming the same number of NodePort Services of 3 endpoints \
         into empty maps, in process (module `agent`), as the kube source would feed them. \
         *partial restore*: the iptables-restore of kube-proxy's partial sync after the endpoint \
         change.\n"
    )?;
    writeln!(
        md,
        "| Services | iptables rules | iptables-restore, s | agent process, s | agent reconcile + map writes, s | restore / agent process | restore / agent in process | partial restore, s |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let counts: std::collections::BTreeSet<u32> = r
        .restore
        .keys()
        .chain(r.agent_start.keys())
        .copied()
        .collect();
    for n in counts {
        let restore = r.restore.get(&n).and_then(|v| Stat::of(v));
        let start = r.agent_start.get(&n).and_then(|v| Stat::of(v));
        let inproc = r.agent_program.get(&n).and_then(|v| Stat::of(v));
        let partial = r.restore_change.get(&n).and_then(|v| Stat::of(v));
        writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} | {} | {} |",
            r.rules.get(&n).map_or("–".into(), |x| x.to_string()),
            cell(restore, 3),
            cell(start, 3),
            cell(inproc, 4),
            ratio_cell(ratio(restore, start)),
            ratio_cell(ratio(restore, inproc)),
            cell(partial, 3)
        )?;
    }
    writeln!(md)?;

    writeln!(md, "## Per-packet program cost (BPF_PROG_TEST_RUN)\n")?;
    match input.datapath {
        Some(rows) => {
            writeln!(
                md,
                "From the datapath part of the same run (details in bench/results/): the XDP program's \
                 kernel-measured ns per packet, next to a bare XDP_PASS program. Established \
                 connections opened by a handshake (in `NP_CT`); new flows with a new client every \
                 repetition, the established table full and the handshake LRU churning. *previous*: \
                 the run of 2026-11-21, before the two conntrack tables (its established connections \
                 were opened by a lone ACK).\n"
            )?;
            writeln!(
                md,
                "| Services | bare XDP_PASS | established, local pod (previous) | established, remote SNAT, XDP_TX (previous) | new flow, local pod (previous) | new flow, remote SNAT | spoofed SYNs one core absorbs (local / remote) |"
            )?;
            writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
            for row in rows {
                let prev = PREVIOUS_DATAPATH.iter().find(|p| p.0 == row.services);
                let p = |f: fn(&(u32, f64, f64, f64)) -> f64| {
                    prev.map_or("–".to_owned(), |v| format!("{:.0}", f(v)))
                };
                writeln!(
                    md,
                    "| {} | {:.1} | {:.1} ({}) | {:.1} ({}) | {:.1} ({}) | {:.1} | {:.2} / {:.2} M/s |",
                    row.services,
                    row.bare,
                    row.established_local,
                    p(|v| v.1),
                    row.established_remote,
                    p(|v| v.2),
                    row.new_flow_local,
                    p(|v| v.3),
                    row.new_flow_remote,
                    1e3 / row.new_flow_local.max(1.0),
                    1e3 / row.new_flow_remote.max(1.0)
                )?;
            }
            writeln!(
                md,
                "\nkube-proxy's rules have no equivalent per-packet program to run this way; their cost shows in the connection figures above.\n"
            )?;
        }
        None => writeln!(
            md,
            "The datapath part did not run in this invocation (`NODEPORT_BENCH_ONLY=compare`); see bench/results/.\n"
        )?,
    }

    for page in input.extra {
        for line in page.lines() {
            if line.starts_with('#') {
                writeln!(md, "#{line}")?;
            } else {
                writeln!(md, "{line}")?;
            }
        }
        writeln!(md)?;
    }

    writeln!(md, "## Plots\n")?;
    for (title, file) in &plots {
        writeln!(md, "![{title}](plots/{file})\n")?;
    }
    std::fs::write(dir.join("REPORT.md"), &md)?;
    Ok(md)
}

const WHY: &str = "Why the figures look the way they do: kube-proxy's iptables rules are walked \
linearly by the first packet of every connection only (the nat table; conntrack remembers the \
translation for the packets after it), through one ClusterIP rule per Service in KUBE-SERVICES and \
then KUBE-NODEPORTS up to the measured Service. New connections therefore slow down with N, while \
packets of an established connection, and UDP flows after their first datagram, cost the same at \
any N: a request on an established connection is not where the iptables arm loses, and its \
latency does not separate the arms. nodeport finds a Service with one hash lookup in XDP at any N, \
and its packets never enter netfilter, so kube-proxy's rules beside it cost it nothing.";

const CEILING: &str = "Why ratios fall short while nodeport stays flat: on this 2-core machine the \
client, both TCP stacks, the node's path and the pods' servers share the same two cores, so short \
connections top out at about the rate nodeport reaches at every N, and the iptables arm reaches at \
1 Service; their latency bottoms out likewise. nodeport stays at that ceiling at 10,000 and 65,536 \
Services, so its ratio to the iptables arm is the ceiling over what the iptables arm still manages: \
with the legacy backend used here that is about twice the 600 connections/s the issue quotes for \
this machine at 10,000 Services, and the 8x and 5x ratios are not reached. At 1 Service the arms \
are within each other's ranges on every figure: the differences are below the noise of scheduling \
on two cores. The p99 of a request on an established connection moves by some tens of \
microseconds between sizes in every arm, the iptables arm's included, whose established packets \
do not depend on N either.";

fn setup_text(r: &Results) -> String {
    let cfg = &r.config;
    format!(
        "One topology in network namespaces: a client (198.18.0.100) on a veth to the node's ext0 \
(198.18.0.1); two backend pods on routed veths of the node (198.18.1.10 and .11), each answering \
every request line with its name and the address it saw. The measured Service is a NodePort \
Service (TCP and UDP on node port 20000) with one endpoint, pod a; the endpoint change moves it to \
pod b. N − 1 filler Services have 3 endpoints each on other nodes, and node ports from 20001 up \
(beyond kube-apiserver's default range 30000-32767, which holds only 2,768; the agent runs with \
--service-node-port-range 20000-60999). At 65,536 Services (nodeport alone) the node ports stop at 60999, below the \
agent's SNAT range, and the remaining 24,536 fillers have an externalIP each instead. Every \
Service has a ClusterIP.

- **iptables**: the rules kube-proxy's iptables mode (1.28+) writes for these Services, \
ClusterIP rules included (`KUBE-SERVICES`, `KUBE-NODEPORTS` via `-m addrtype --dst-type LOCAL`, \
`KUBE-EXT-*` with `KUBE-MARK-MASQ`, `KUBE-SVC-*` with `-m statistic --mode random --probability`, \
`KUBE-SEP-*` with DNAT, `KUBE-POSTROUTING` masquerade, the filter table's `KUBE-FORWARD`, \
`KUBE-FIREWALL` and friends), loaded with `iptables-restore -w --noflush` in the node's namespace, \
the measured Service last (kube-proxy writes Services in Go map order, which is random: last is \
the worst case). The endpoint change is kube-proxy's partial sync (the top chains in full, the \
changed Service's chains, `-X` of the old endpoint chain), timed from the start of \
iptables-restore.
- **nodeport**: `nodeport-agent run --manifests` in the node's namespace on the same Services as \
YAML (`--nodeport-addresses 198.18.0.1/32`, `--max-services`/`--max-backends`/`--max-frontends` \
sized for N, Maglev M = {m}), with kube-proxy's rules and chains removed. The endpoint change rewrites the measured \
Service's manifest file (written aside, renamed into place), timed from the rename: the agent \
reloads at once, reading every manifest file again but parsing only the changed one (at 10,000 \
Services reading and checking the others is most of the time), reconciles and writes the maps. \
Through the API server there is no file to read; the agent's own processing of a change is \
measured in process by the agent part (bench/results/, under 1 ms at p99).
- **nodeport beside kube-proxy**: the same agent with the iptables arm's rules loaded as well.

Rounds alternate the order of the arms (iptables, beside, nodeport; then nodeport, beside, \
iptables) and of the sizes (ascending, then descending). Before each arm's measurement the bench \
waits, up to 20 s, until the machine is less than 15% busy: the kernel frees the maps of a stopped \
agent and the tables iptables-restore replaced for seconds after the process returned. Each arm, \
each round:

1. *new connections*: {w} client connecting, sending one line, reading the answer and closing, \
one connection after the other, as fast as it goes for {cd:.1} s (one client, as the issue's \
reference figures); the rate is completed connections per second, the latency that of each \
connection from connect to answer. Then the same with 2 clients at once (one per core).
2. *request latency*: up to {req} requests, one at a time, on one established connection (at most \
{rd:.1} s).
3. *UDP*: {f} sockets sending 64-byte datagrams as fast as they can for {ud:.1} s; the rate is what \
pod a received per second.
4. *CPU per connection*: {pr} new connections per second for {pd:.1} s from one client; the CPU \
time of the bench process (the client and the pods' servers are its threads) divided by the \
connections. On veths the whole path through the node runs in the sender's context, so this \
counts the node's work too (user-space work is the same in every arm); other processes on the \
machine are not in it.
5. *endpoint change*: from the change until a new connection (probes 50 µs apart) is answered by \
pod b; then back to pod a.

The comparison's threads (client, pods' servers) and the agent run at nice -10, so that other \
work on the shared machine takes less from the measurements; that applies to every arm. \
kube-proxy's rules go into iptables' `{variant}` backend (`NODEPORT_BENCH_IPTABLES=legacy|nft`): \
Debian's default is nft, but its iptables-restore did not finish loading the 10,000-Service \
ruleset in 3 minutes here (legacy: about 4 s); kube-proxy uses whichever backend the node uses.

Every answer is checked: the right pod, and the address it saw: the node's (masquerade) in the \
iptables arm, the client's in nodeport's arms, which proves which path carried the connection. \
A wrong answer, a connection failure rate above 1% or UDP reaching pod b stops the run.
",
        m = cfg.big_maglev_size.map_or(
            "1,021 (the default)".to_owned(),
            |m| format!("1,021, and {m} at nodeport-only sizes")
        ),
        w = cfg.workers,
        cd = cfg.conn_duration.as_secs_f64(),
        req = cfg.requests,
        rd = cfg.request_duration.as_secs_f64(),
        f = cfg.udp_flows,
        ud = cfg.udp_duration.as_secs_f64(),
        pr = cfg.paced_rate,
        pd = cfg.paced_duration.as_secs_f64(),
        variant = super::node::iptables_variant().unwrap_or("legacy"),
    )
}

/// The plain-text summary printed at the end of the command.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "nodeport vs kube-proxy (iptables), medians of {} rounds:",
        r.config.rounds
    );
    let _ = writeln!(
        s,
        "{:>7}  {:<27} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9}",
        "N", "arm", "conn/s", "conn p99", "req p50", "req p99", "UDP/s", "µs/conn", "change"
    );
    for n in r.all_counts() {
        for arm in Arm::ALL {
            if !r.arms.contains_key(&(n, arm)) {
                continue;
            }
            let v = |key: &str| r.stat(n, arm, metric(key)).map_or(f64::NAN, |s| s.median);
            let _ = writeln!(
                s,
                "{n:>7}  {:<27} {:>9.0} {:>7.3}ms {:>7.3}ms {:>7.3}ms {:>10.0} {:>8.0} {:>7.1}ms",
                arm.label(),
                v("connection-rate"),
                v("connection-latency-p99"),
                v("request-latency-p50"),
                v("request-latency-p99"),
                v("udp-rate"),
                v("cpu-per-connection"),
                v("endpoint-change"),
            );
        }
    }
    let _ = writeln!(s, "control plane (medians): ");
    for (n, v) in &r.restore {
        let agent = r.agent_start.get(n).and_then(|v| Stat::of(v));
        let _ = writeln!(
            s,
            "{n:>7}  iptables-restore {:.3} s, agent process {}",
            Stat::of(v).map_or(f64::NAN, |s| s.median),
            agent.map_or("–".into(), |a| format!("{:.3} s", a.median))
        );
    }
    for (n, v) in &r.agent_start {
        if !r.restore.contains_key(n) {
            let _ = writeln!(
                s,
                "{n:>7}  agent process {:.3} s",
                Stat::of(v).map_or(f64::NAN, |s| s.median)
            );
        }
    }
    let _ = writeln!(s, "targets:");
    for v in targets(r) {
        let _ = writeln!(
            s,
            "  [{}] {}",
            if v.met { "met" } else { "NOT met" },
            v.text
        );
    }
    s
}
