//! What runs on the node in each arm: kube-proxy's rules (loaded with iptables-restore) and the
//! agent (the real binary, started in the node's network namespace on manifests).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodeport_tests::{
    agent::PinDirGuard,
    lab::{AgentProcess, field_u64, message_is},
    netns::{NetNs, unique_name},
};

use super::services::{self, BenchService, NODE_NAME};

/// How long an agent may take to load and program its manifests (65,536 Services of YAML).
const AGENT_PATIENCE: Duration = Duration::from_secs(300);

/// Filler Services per manifest file (about 3 MB of YAML).
const FILLERS_PER_FILE: usize = 4_096;

/// Which iptables backend kube-proxy's rules go into: `legacy` (x_tables, the default) or `nft`
/// (`NODEPORT_BENCH_IPTABLES`). Debian's default `iptables` is the nft one, but its
/// iptables-restore did not finish loading the 10,000-Service ruleset (140,000 rules, 50,000
/// chains) in 3 minutes on this machine, where the legacy one takes about 4 s; kube-proxy's image
/// uses whichever backend the node's rules are in.
pub fn iptables_variant() -> Result<&'static str> {
    match std::env::var("NODEPORT_BENCH_IPTABLES").as_deref() {
        Err(_) | Ok("") | Ok("legacy") => Ok("legacy"),
        Ok("nft") => Ok("nft"),
        Ok(other) => bail!("NODEPORT_BENCH_IPTABLES={other}: expected legacy or nft"),
    }
}

/// Runs `iptables-restore --noflush` (kube-proxy's way) on `rules` in the node's namespace;
/// returns how long it took.
pub fn iptables_restore(node: &NetNs, rules: &str) -> Result<Duration> {
    let program = format!("iptables-{}-restore", iptables_variant()?);
    let started = Instant::now();
    nodeport_tests::kube_proxy::restore(node, &program, rules)?;
    Ok(started.elapsed())
}

/// Removes every rule and chain kube-proxy's rules added to the node's namespace, so the
/// nodeport arm runs without any (the built-in chains stay, empty, accepting).
pub fn flush_rules(node: &NetNs) -> Result<()> {
    let iptables = format!("iptables-{}", iptables_variant()?);
    for table in ["nat", "filter"] {
        node.exec(&iptables, &["-w", "-t", table, "-F"])?;
        node.exec(&iptables, &["-w", "-t", table, "-X"])?;
    }
    let left = node.exec(&format!("{iptables}-save"), &[])?;
    let rules = String::from_utf8_lossy(&left.stdout);
    ensure!(
        !rules
            .lines()
            .any(|l| l.starts_with("-A") || l.starts_with(":KUBE")),
        "rules left after flushing: {rules}"
    );
    Ok(())
}

/// `iptables-<variant>-restore --version`, for the report.
pub fn iptables_version() -> String {
    let variant = iptables_variant().unwrap_or("legacy");
    Command::new(format!("iptables-{variant}-restore"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The agent's sizing flags for `services`: room for every service port, backend and frontend.
fn sizing_args(services: &[BenchService], maglev_size: Option<u32>) -> Vec<String> {
    let ports: u32 = services.iter().map(BenchService::service_ports).sum();
    let backends: u32 = services
        .iter()
        .map(|s| s.service_ports() * s.endpoints.len() as u32)
        .sum();
    let mut args = vec![
        "--max-services".into(),
        (ports + 16).to_string(),
        "--max-backends".into(),
        (backends + 16).max(65_536).to_string(),
        "--max-frontends".into(),
        (ports + 16).max(65_536).to_string(),
    ];
    if let Some(m) = maglev_size {
        args.extend(["--maglev-table-size".into(), m.to_string()]);
    }
    args
}

/// A running agent, its manifests and its pins. Dropping it kills the agent and removes the
/// pins and the manifests.
pub struct Agent {
    process: Option<AgentProcess>,
    pub pins: PinDirGuard,
    manifests: PathBuf,
    applied: u64,
}

const MEASURED_FILE: &str = "measured.yaml";

impl Agent {
    /// Writes the manifests of `fillers` and the measured Service, starts the agent and waits
    /// until it has programmed them. Returns the agent and the time from start to programmed.
    pub fn start(
        node: &NetNs,
        fillers: &[BenchService],
        measured: &BenchService,
        maglev_size: Option<u32>,
    ) -> Result<(Self, Duration)> {
        Self::start_with_metrics(node, fillers, measured, maglev_size, None)
    }

    /// [`Agent::start`] with the metrics endpoint on `metrics` (off when None).
    pub fn start_with_metrics(
        node: &NetNs,
        fillers: &[BenchService],
        measured: &BenchService,
        maglev_size: Option<u32>,
        metrics: Option<std::net::SocketAddr>,
    ) -> Result<(Self, Duration)> {
        let manifests = std::env::temp_dir().join(unique_name("km"));
        std::fs::create_dir_all(&manifests)?;
        let mut agent = Self {
            process: None,
            pins: PinDirGuard::new("kb"),
            manifests,
            applied: 0,
        };
        // Files of FILLERS_PER_FILE Services: the agent refuses manifest files above
        // manifests::MAX_FILE_BYTES (65,536 Services of YAML are about 45 MB).
        for (i, chunk) in fillers.chunks(FILLERS_PER_FILE).enumerate() {
            std::fs::write(
                agent.manifests.join(format!("fillers-{i:03}.yaml")),
                services::yaml_all(chunk),
            )?;
        }
        agent.write_measured(measured)?;
        let mut all: Vec<BenchService> = fillers.to_vec();
        all.push(measured.clone());
        let mut args: Vec<String> = [
            "--manifests",
            &agent.manifests.display().to_string(),
            "--node-name",
            NODE_NAME,
            "--external-interface",
            "ext0",
            "--pod-interfaces",
            "p-*",
            "--nodeport-addresses",
            "198.18.0.1/32",
            "--bpffs-dir",
            &agent.pins.path().display().to_string(),
            "--healthz-bind-address",
            "off",
            "--metrics-bind-address",
            &metrics.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            "--detach-on-exit",
            // The fillers' node ports run from 20000 up to 60999, inside the default SNAT
            // range 1024-29999: keep SNAT to the range above them, as when these figures were
            // first measured.
            "--snat-port-range",
            "61000-65535",
            // The agent refuses node ports outside --service-node-port-range (the API server's
            // range, 30000-32767 by default): widen it to the fillers' ports, or most of them
            // would not be programmed.
            "--service-node-port-range",
            "20000-60999",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(sizing_args(&all, maglev_size));

        let started = Instant::now();
        let mut process = AgentProcess::spawn(node, &args)?;
        let loaded = process.wait_log_within("the first manifests load", AGENT_PATIENCE, |e| {
            message_is(e, "manifests loaded")
        })?;
        let revision = field_u64(&loaded, "revision").context("revision in the log")?;
        process.wait_log_within("the first reconcile", AGENT_PATIENCE, |e| {
            message_is(e, "reconciled") && field_u64(e, "revision").is_some_and(|r| r >= revision)
        })?;
        let took = started.elapsed();
        agent.applied = revision;
        agent.process = Some(process);
        Ok((agent, took))
    }

    fn write_measured(&self, measured: &BenchService) -> Result<()> {
        let mut yaml = String::new();
        services::yaml(measured, &mut yaml);
        // Replaced atomically: the agent never reads half a file (hidden names are skipped).
        let tmp = self.manifests.join(".measured.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(MEASURED_FILE))?;
        Ok(())
    }

    /// Replaces the measured Service's manifest; returns when the file is in place (the agent
    /// applies it on its own).
    pub fn change_measured(&mut self, measured: &BenchService) -> Result<()> {
        self.write_measured(measured)
    }

    /// Waits until the agent has applied the manifests as they are now.
    pub fn wait_applied(&mut self) -> Result<()> {
        let after = self.applied;
        let process = self.process.as_mut().context("no agent running")?;
        let loaded = process.wait_log_within("the manifests reload", AGENT_PATIENCE, |e| {
            message_is(e, "manifests loaded") && field_u64(e, "revision").is_some_and(|r| r > after)
        })?;
        let revision = field_u64(&loaded, "revision").context("revision in the log")?;
        process.wait_log_within("the reconcile of the new manifests", AGENT_PATIENCE, |e| {
            message_is(e, "reconciled") && field_u64(e, "revision").is_some_and(|r| r >= revision)
        })?;
        self.applied = revision;
        Ok(())
    }

    /// The agent's process id.
    pub fn pid(&self) -> Result<u32> {
        Ok(self.process.as_ref().context("no agent running")?.pid())
    }

    /// SIGTERM: the agent detaches its datapath (`--detach-on-exit`) and exits.
    pub fn stop(mut self) -> Result<()> {
        let process = self.process.take().context("no agent running")?;
        let status = process.terminate()?;
        ensure!(status.success(), "the agent exited with {status}");
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}
