//! `nodeport-agent status`: what is attached where, how full the maps are, and what the agent
//! last did. Everything comes from the pins, so it answers whether an agent runs or not.

use std::{fmt::Write as _, time::SystemTime};

use nodeport_common::{AgentState, DatapathConfig};
use serde::Serialize;

use crate::datapath::{self, ConntrackCensus, LinkDetail, MapFill, Maps, PinDir, census};
use crate::model::{IPV6_TO_KERNEL, NoticeKind};

#[derive(Debug, Serialize)]
pub struct Status {
    /// This binary's version.
    pub version: &'static str,
    pub bpffs_dir: String,
    /// What the last agent recorded; `None` if no agent has synced yet.
    pub agent: Option<AgentView>,
    pub attachments: Vec<LinkDetail>,
    pub datapath: DatapathView,
    pub maps: Vec<MapFill>,
    pub conntrack: ConntrackCensus,
    /// What the agent did not program, as (kind, object): refused frontends, frontends held by
    /// another Service, unsupported protocols (the log says why).
    pub not_programmed: Vec<NotProgrammed>,
    /// Service ports with IPv6 frontends: computed by the agent, carried by the kernel
    /// (kube-proxy) until the datapath supports IPv6, with how many frontends and endpoints.
    pub ipv6_to_kernel: Vec<datapath::notices::Ipv6Port>,
    /// What the agent keeps retrying, as (reason, object): Service ports the datapath refused
    /// (`too_many_backends`, `map_full`, `map_error`, `io_error`) and health-check node ports
    /// it cannot bind (`health_check_port_unserved`, the port).
    pub failing: Vec<NotProgrammed>,
    /// Where the running agent's `--datapath-switch` has the datapath: `on`, or `draining`
    /// (established connections only; new ones go to kube-proxy). `None`: not recorded.
    pub datapath_switch: Option<String>,
    /// Why the running agent refused to adopt this datapath (other sizing flags, another
    /// layout), one difference each; empty when it did not. The datapath keeps forwarding.
    pub incompatible: Vec<String>,
}

/// `status` while the datapath is switched off: detached, nothing pinned but the record.
#[derive(Debug, Serialize)]
pub struct SwitchedOff {
    pub version: &'static str,
    pub bpffs_dir: String,
    pub datapath_switch: &'static str,
}

impl SwitchedOff {
    pub fn render(&self) -> String {
        format!(
            "nodeport-agent {} (this binary)\npins       {}\nswitch     off (--datapath-switch): \
             detached, kube-proxy carries the node ports; switch it \"on\" to attach it again\n",
            self.version, self.bpffs_dir
        )
    }
}

/// The switched-off status, when the agent recorded `off` and no map is pinned.
pub fn switched_off(pins: &PinDir) -> Option<SwitchedOff> {
    let off = crate::switch::recorded(&pins.root) == Some(crate::switch::DatapathState::Off);
    let pinned = nodeport_common::names::ALL
        .iter()
        .any(|name| pins.map(name).exists());
    (off && !pinned).then(|| SwitchedOff {
        version: env!("CARGO_PKG_VERSION"),
        bpffs_dir: pins.root.display().to_string(),
        datapath_switch: "off",
    })
}

#[derive(Debug, Serialize)]
pub struct NotProgrammed {
    pub kind: String,
    pub object: String,
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    pub version: String,
    pub pid: u32,
    /// Whether that pid runs a nodeport-agent as seen from here (a container has its own pid
    /// namespace: run `status` where the agent runs).
    pub running: bool,
    pub started: String,
    /// The last round that programmed everything it was given.
    pub last_sync: Option<String>,
    pub last_sync_age_s: Option<u64>,
    pub last_attempt: Option<String>,
    pub revision: u64,
    pub services: u32,
    pub backends: u32,
    /// Service ports that failed to program in the last round.
    pub failing: u32,
}

#[derive(Debug, Serialize)]
pub struct DatapathView {
    pub maglev_table_size: u32,
    /// One or two ranges, `A-B` or `A-B,C-D`.
    pub snat_port_range: String,
    /// Ports in the ranges: how many connections each remote backend can take per SNAT
    /// address and protocol.
    pub snat_ports_per_backend: u32,
    pub hz: u32,
    pub timeouts_s: Timeouts,
}

#[derive(Debug, Serialize)]
pub struct Timeouts {
    pub tcp_syn: u32,
    pub tcp_established: u32,
    pub tcp_closing: u32,
    pub udp: u32,
}

/// Entries of a list the table shows before it abridges (`-o wide` shows them all).
const LIST_LIMIT: usize = 20;

/// Reads the status of the datapath pinned at `pins`.
pub fn read(pins: &PinDir) -> anyhow::Result<Status> {
    let (maps, _) = Maps::open_pinned(pins)?;
    let cfg: DatapathConfig = maps.config.get(&0, 0)?;
    let fill = census::fill(&maps, &cfg, datapath::jiffies_now(cfg.hz))?;
    let state: AgentState = maps.agent.get(&0, 0)?;
    let notices = datapath::notices::read(&pins.root);
    Ok(Status {
        version: env!("CARGO_PKG_VERSION"),
        bpffs_dir: pins.root.display().to_string(),
        agent: agent_view(&state, SystemTime::now()),
        attachments: datapath::link_details(pins)?,
        datapath: DatapathView {
            maglev_table_size: cfg.maglev_size,
            snat_port_range: snat_ranges(&cfg),
            snat_ports_per_backend: cfg.snat_span(),
            hz: cfg.hz,
            timeouts_s: Timeouts {
                tcp_syn: cfg.tcp_syn_timeout_s,
                tcp_established: cfg.tcp_established_timeout_s,
                tcp_closing: cfg.tcp_closing_timeout_s,
                udp: cfg.udp_timeout_s,
            },
        },
        maps: fill.maps,
        conntrack: fill.conntrack,
        not_programmed: notices
            .iter()
            .filter(|n| n.kind != NoticeKind::Ipv6ToKernel.label())
            .map(|n| NotProgrammed {
                kind: n.kind.clone(),
                object: n.object.clone(),
            })
            .collect(),
        ipv6_to_kernel: datapath::notices::ipv6_ports(&notices),
        failing: datapath::notices::read_failing(&pins.root)
            .into_iter()
            .map(|(kind, object)| NotProgrammed { kind, object })
            .collect(),
        datapath_switch: crate::switch::recorded(&pins.root).map(|s| s.label().to_owned()),
        incompatible: datapath::layout::refusal(&pins.root),
    })
}

/// The configured SNAT port ranges, as `--snat-port-range` takes them.
pub fn snat_ranges(cfg: &DatapathConfig) -> String {
    let mut s = format!("{}-{}", cfg.snat_port_min, cfg.snat_port_max);
    if cfg.snat_port_max2 != 0 {
        s.push_str(&format!(",{}-{}", cfg.snat_port_min2, cfg.snat_port_max2));
    }
    s
}

fn agent_view(state: &AgentState, now: SystemTime) -> Option<AgentView> {
    if state.started_unix_ms == 0 {
        return None;
    }
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let version = crate::sync::untext(&state.version);
    let when = |ms: u64| (ms != 0).then(|| format_unix_ms(ms));
    Some(AgentView {
        version,
        pid: state.pid,
        running: runs_nodeport_agent(state.pid),
        started: format_unix_ms(state.started_unix_ms),
        last_sync: when(state.last_sync_unix_ms),
        last_sync_age_s: (state.last_sync_unix_ms != 0)
            .then(|| now_ms.saturating_sub(state.last_sync_unix_ms) / 1000),
        last_attempt: when(state.last_attempt_unix_ms),
        revision: state.revision,
        services: state.services,
        backends: state.backends,
        failing: state.failing,
    })
}

fn format_unix_ms(ms: u64) -> String {
    match k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64) {
        Ok(t) => format!("{t:.0}"),
        Err(_) => format!("{ms} ms after the Unix epoch"),
    }
}

/// Whether `pid` is a running nodeport-agent in this pid namespace.
fn runs_nodeport_agent(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim().starts_with("nodeport-agent"))
}

impl Status {
    /// The human-readable form; `wide` lists every entry of long lists.
    pub fn render(&self, wide: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "nodeport-agent {} (this binary)", self.version);
        let _ = writeln!(out, "pins       {}", self.bpffs_dir);
        match self.datapath_switch.as_deref() {
            Some("draining") => out.push_str(
                "switch     draining (--datapath-switch off): established connections only, \
                 new ones go to kube-proxy; detached when none is left\n",
            ),
            Some(state) => {
                let _ = writeln!(out, "switch     {state}");
            }
            None => {}
        }
        if !self.incompatible.is_empty() {
            let _ = writeln!(
                out,
                "REFUSED    pinned datapath incompatible: {}; it keeps forwarding, the agent \
                 programs nothing. To apply: `nodeport-agent detach --bpffs-dir {}` (cuts the \
                 connections through it; the agent then restarts and creates the datapath anew), \
                 or restart the agent with the flags the datapath was created with",
                self.incompatible.join("; "),
                self.bpffs_dir
            );
        }
        match &self.agent {
            None => out.push_str("agent      none has synced this datapath yet\n"),
            Some(a) => {
                let running = if a.running {
                    "running"
                } else {
                    "not running here"
                };
                let _ = writeln!(
                    out,
                    "agent      {} pid {} ({running}), started {}",
                    a.version, a.pid, a.started
                );
                match (&a.last_sync, a.last_sync_age_s) {
                    (Some(t), Some(age)) => {
                        let _ =
                            writeln!(out, "last sync  {t} ({age} s ago), revision {}", a.revision);
                    }
                    _ => out.push_str("last sync  never completed\n"),
                }
                let failing = if a.failing > 0 {
                    format!(", {} FAILING (below)", a.failing)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "programmed {} service ports, {} backends{failing}",
                    a.services, a.backends
                );
            }
        }
        if !self.not_programmed.is_empty() {
            let _ = writeln!(
                out,
                "not programmed ({}; the agent's warnings say why)",
                self.not_programmed.len()
            );
            let (shown, left_out) = crate::output::abridge(&self.not_programmed, wide, LIST_LIMIT);
            for n in shown {
                let _ = writeln!(out, "  {:<26} {}", n.kind, n.object);
            }
            if left_out > 0 {
                let _ = writeln!(out, "  ... and {left_out} more (-o wide lists them all)");
            }
        }
        if !self.ipv6_to_kernel.is_empty() {
            let _ = writeln!(
                out,
                "{IPV6_TO_KERNEL} ({} service ports)",
                self.ipv6_to_kernel.len()
            );
            let (shown, left_out) = crate::output::abridge(&self.ipv6_to_kernel, wide, LIST_LIMIT);
            for port in shown {
                let _ = writeln!(out, "{}", port.render());
            }
            if left_out > 0 {
                let _ = writeln!(out, "  ... and {left_out} more (-o wide lists them all)");
            }
        }
        if !self.failing.is_empty() {
            let _ = writeln!(
                out,
                "failing ({}; retried on every round, the agent's log says why)",
                self.failing.len()
            );
            let (shown, left_out) = crate::output::abridge(&self.failing, wide, LIST_LIMIT);
            for n in shown {
                let _ = writeln!(out, "  {:<26} {}", n.kind, n.object);
            }
            if left_out > 0 {
                let _ = writeln!(out, "  ... and {left_out} more (-o wide lists them all)");
            }
        }
        out.push_str("\nattachments\n");
        if self.attachments.is_empty() {
            out.push_str("  none\n");
        }
        for l in &self.attachments {
            let program = match (&l.program, l.program_id, l.link_id) {
                (Some(name), Some(prog), Some(link)) => {
                    format!("{name} (prog {prog}, link {link})")
                }
                (None, Some(prog), Some(link)) => format!("prog {prog}, link {link}"),
                _ => "no link".to_owned(),
            };
            let gone = if l.interface_present {
                ""
            } else {
                "  [interface gone]"
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<8} {:<14} {program}{gone}",
                l.interface, l.role, l.hook
            );
        }
        let d = &self.datapath;
        let t = &d.timeouts_s;
        let _ = writeln!(
            out,
            "\ndatapath   Maglev M {}, SNAT ports {} ({} per backend), timeouts: tcp syn {} s, \
             established {} s, closing {} s, udp {} s",
            d.maglev_table_size,
            d.snat_port_range,
            d.snat_ports_per_backend,
            t.tcp_syn,
            t.tcp_established,
            t.tcp_closing,
            t.udp
        );
        out.push_str(&self.conntrack.render("conntrack  "));
        out.push_str("\nmaps              used / capacity        memory\n");
        for m in &self.maps {
            let used = match m.used {
                Some(u) => format!(
                    "{u} / {} ({:.1}%)",
                    m.capacity,
                    100.0 * u as f64 / m.capacity.max(1) as f64
                ),
                None => format!("- / {}", m.capacity),
            };
            let memory = m.memory_bytes.map_or("?".to_owned(), |b| {
                format!("{:.1} MiB", b as f64 / 1_048_576.0)
            });
            let _ = writeln!(out, "  {:<15} {used:<22} {memory:>10}", m.name);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_view_of_what_the_agent_recorded() {
        let mut version = [0u8; 32];
        version[..5].copy_from_slice(b"0.1.0");
        let state = AgentState {
            started_unix_ms: 1_700_000_000_000,
            last_sync_unix_ms: 1_700_000_060_000,
            last_attempt_unix_ms: 1_700_000_090_000,
            revision: 7,
            pid: u32::MAX,
            services: 3,
            backends: 9,
            failing: 1,
            version,
        };
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_100_000);
        let view = agent_view(&state, now).expect("recorded");
        assert_eq!(view.version, "0.1.0");
        assert!(!view.running, "no process has pid u32::MAX");
        assert_eq!(view.started, "2023-11-14T22:13:20Z");
        assert_eq!(view.last_sync.as_deref(), Some("2023-11-14T22:14:20Z"));
        assert_eq!(view.last_sync_age_s, Some(40));
        assert_eq!(
            (view.revision, view.services, view.backends, view.failing),
            (7, 3, 9, 1)
        );
        assert!(agent_view(&AgentState::default(), now).is_none());
    }
}
