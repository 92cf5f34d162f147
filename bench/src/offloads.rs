//! Bulk TCP on a veth-based node with the client's offloads on, as on kind or containerlab
//! nodes (`NODEPORT_BENCH_ONLY=offloads`): kube-proxy's iptables rules against nodeport with
//! the hook the agent chooses on a veth (`--external-hook auto`: TC) and with XDP forced.
//!
//! The two-node lab (nodeport_tests::lab): iperf3 servers in pod a (node-1, local) and pod c
//! (node-2, remote: SNAT / MASQUERADE), behind node ports 30090 and 30091; the client turns
//! transmit checksum offload, TSO, GSO and GRO on, and runs `iperf3 -c` (upload) and
//! `iperf3 -c -R` (download) for 10 s each (3 s with NODEPORT_BENCH_QUICK=1) through node-1.

use std::{fmt::Write as _, process::Child};

use anyhow::{Context, Result};
use nodeport_tests::{
    kube_proxy::{self, Proxied},
    lab::{Lab, NODE1, POD_PORT, manifests as yaml},
};

/// (Service, node port, pod, its address, its node).
const SERVICES: [(&str, u16, &str, &str, &str); 2] = [
    ("bulk-local", 30090, "a", "198.18.1.10", "node-1"),
    ("bulk-remote", 30091, "c", "198.18.2.10", "node-2"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arm {
    Iptables,
    NodeportAuto,
    NodeportXdp,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Iptables, Arm::NodeportAuto, Arm::NodeportXdp];

    fn title(self) -> &'static str {
        match self {
            Arm::Iptables => "iptables (kube-proxy)",
            Arm::NodeportAuto => "nodeport, auto (TC on veth)",
            Arm::NodeportXdp => "nodeport, XDP forced",
        }
    }
}

/// Gbit/s of upload and download to the local and the remote pod (None: the transfer failed).
pub struct Figures {
    arm: Arm,
    upload_local: Option<f64>,
    upload_remote: Option<f64>,
    download_local: Option<f64>,
    download_remote: Option<f64>,
}

pub struct Results {
    figures: Vec<Figures>,
    seconds: u32,
}

/// An iperf3 server in a pod's namespace, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Gbit/s of one iperf3 run through `port` (`reverse`: the pod sends), None when it failed.
fn iperf(lab: &Lab, port: u16, reverse: bool, seconds: u32) -> Result<Option<f64>> {
    // A transfer that stalls never ends by itself (iperf3 waits for its results): bounded.
    let bound = (seconds + 15).to_string();
    let seconds = seconds.to_string();
    let port = port.to_string();
    let node = NODE1.to_string();
    let mut args = vec![
        bound.as_str(),
        "iperf3",
        "-c",
        &node,
        "-p",
        &port,
        "-t",
        &seconds,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    if reverse {
        args.push("-R");
    }
    let out = lab.client.command("timeout").args(&args).output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    Ok(report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|v| v.as_f64())
        .filter(|bps| *bps > 0.0)
        .map(|bps| bps / 1e9))
}

/// Waits until the pod's iperf3 server listens (bounded).
fn wait_listening(lab: &Lab, pod: &str) -> Result<()> {
    let filter = format!("sport = :{POD_PORT}");
    for _ in 0..200 {
        let out = lab.pod(pod).ns.exec("ss", &["-Hltn", &filter])?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    anyhow::bail!("iperf3 in pod {pod} does not listen")
}

fn run_arm(arm: Arm, seconds: u32) -> Result<Figures> {
    let mut lab = Lab::new(match arm {
        Arm::Iptables => "ok",
        Arm::NodeportAuto => "oa",
        Arm::NodeportXdp => "ox",
    })?;
    let mut servers = Vec::new();
    for (_, _, pod, addr, node) in SERVICES {
        let node = if node == "node-1" { 1 } else { 2 };
        let host: u8 = addr.rsplit('.').next().expect("host").parse()?;
        lab.add_pod(pod, node, host)?;
        // iperf3 takes the pod's port.
        lab.stop_pod_server(pod);
        let server = lab
            .pod(pod)
            .ns
            .command("iperf3")
            .args(["-s", "-p", &POD_PORT.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        servers.push(Server(server));
        wait_listening(&lab, pod)?;
    }
    match arm {
        Arm::Iptables => {
            let services: Vec<Proxied> = SERVICES
                .iter()
                .map(|(name, port, _, addr, _)| Proxied {
                    name,
                    node_port: *port,
                    protocol: "tcp",
                    endpoints: vec![std::net::SocketAddrV4::new(
                        addr.parse().expect("address"),
                        POD_PORT,
                    )],
                })
                .collect();
            kube_proxy::load(&lab.node1, &kube_proxy::rules(&services))?;
        }
        Arm::NodeportAuto | Arm::NodeportXdp => {
            let hook = if arm == Arm::NodeportAuto {
                "auto"
            } else {
                "xdp"
            };
            lab.agent_args(&["--external-hook", hook]);
            let manifests: Vec<String> = SERVICES
                .iter()
                .map(|(name, port, _, addr, node)| {
                    yaml::service(name, *port, &["TCP"], "", &[yaml::ready(addr, node)])
                })
                .collect();
            lab.start_agent(&yaml::join(&manifests))?;
        }
    }
    lab.client_offloads_on()?;
    let figures = Figures {
        arm,
        upload_local: iperf(&lab, 30090, false, seconds)?,
        upload_remote: iperf(&lab, 30091, false, seconds)?,
        download_local: iperf(&lab, 30090, true, seconds)?,
        download_remote: iperf(&lab, 30091, true, seconds)?,
    };
    drop(servers);
    Ok(figures)
}

pub fn run(quick: bool) -> Result<Results> {
    let seconds = if quick { 3 } else { 10 };
    let mut figures = Vec::new();
    for arm in Arm::ALL {
        eprintln!("bench: offloads: {} ...", arm.title());
        figures.push(run_arm(arm, seconds)?);
    }
    Ok(Results { figures, seconds })
}

pub fn summary(r: &Results) -> String {
    r.figures
        .iter()
        .map(|f| {
            format!(
                "{}: upload {} / {}, download {} / {} Gbit/s (local / remote)",
                f.arm.title(),
                gbit(f.upload_local),
                gbit(f.upload_remote),
                gbit(f.download_local),
                gbit(f.download_remote)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn gbit(v: Option<f64>) -> String {
    v.map_or_else(|| "failed".into(), |g| format!("{g:.1}"))
}

pub fn render(r: &Results, date: &str, machine: &str) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "# Bulk TCP on a veth node with the client's offloads on, {date}\n"
    )?;
    writeln!(md, "Machine: {machine}\n")?;
    writeln!(md, "Load average at the end: {}\n", crate::load_average())?;
    writeln!(
        md,
        "The two-node lab; iperf3 servers in pod a (node-1: local) and pod c (node-2: remote, \
         SNAT / MASQUERADE) behind node ports; the client with transmit checksum offload, TSO, \
         GSO and GRO on (as on kind nodes); `iperf3 -c` (upload) and `iperf3 -c -R` (download), \
         {} s each, one stream, through node-1. Gbit/s as iperf3 received them.\n",
        r.seconds
    )?;
    writeln!(
        md,
        "| arm | upload, local pod | upload, remote pod | download, local pod | download, remote pod |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for f in &r.figures {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            f.arm.title(),
            gbit(f.upload_local),
            gbit(f.upload_remote),
            gbit(f.download_local),
            gbit(f.download_remote)
        )?;
    }
    writeln!(
        md,
        "\nXDP forced on a veth rewrites the client's partial checksums as full ones: the \
         remote pod's node drops the SYN (docs/datapath.md, \"XDP or TC\"); the agent's own \
         choice there is TC."
    )?;
    Ok(md)
}
