//! The agent with exactly the capabilities deploy/base/daemonset.yaml grants
//! (`privileges::REQUIRED`), the way a container with `capabilities: {drop: [ALL], add: [...]}`
//! runs it: uid 0 with every other capability out of its bounding set (setpriv). It loads and
//! attaches XDP and TC, pins its maps on the host's bpffs and serves /healthz. Without any one of
//! them it stops at start naming it, before touching anything. With nothing mounted at
//! /sys/fs/bpf it needs CAP_SYS_ADMIN too, and warns that such a mount dies with its mount
//! namespace. Needs root: run by `cargo xtask test`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use nodeport_agent::privileges::{Capability, CapabilitySet, REQUIRED};
use nodeport_tests::{
    agent::PinDirGuard,
    lab::{AgentProcess, fatal_error},
    netns::{NetNs, require_root, unique_name},
};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node health port of deploy/base's config.yaml.
const HEALTHZ_PORT: u16 = 10266;

const MANIFESTS: &str = "\
apiVersion: v1
kind: Service
metadata: { name: web, namespace: default }
spec:
  type: NodePort
  ports: [ { name: http, port: 80, nodePort: 30080 } ]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-1, namespace: default, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080 } ]
endpoints:
- { addresses: [198.18.1.10], nodeName: node-1, conditions: { ready: true } }
";

/// A node in a network namespace: ext0 (external) and pod0 (a pod's veth), their peers in a
/// second namespace, a manifests directory and a pin directory, all removed on drop.
struct Node {
    pins: PinDirGuard,
    manifests: ManifestsDir,
    ns: NetNs,
    _peer: NetNs,
}

struct ManifestsDir(PathBuf);

impl Drop for ManifestsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the agent is started.
enum Mounts {
    /// In the host's mount namespace, where bpffs is mounted at /sys/fs/bpf.
    Host,
    /// In a private mount namespace with nothing mounted at /sys/fs/bpf (a container whose
    /// host never mounted bpffs).
    PrivateWithoutBpffs,
}

impl Node {
    fn new(tag: &str) -> Result<Self> {
        require_root();
        mount_host_bpffs()?;
        let ns = NetNs::new(&format!("{tag}n"))?;
        let peer = NetNs::new(&format!("{tag}p"))?;
        for dev in ["ext0", "pod0"] {
            ns.ip(&format!(
                "link add {dev} type veth peer name {dev} netns {}",
                peer.name
            ))?;
            ns.ip(&format!("link set {dev} up"))?;
            peer.ip(&format!("link set {dev} up"))?;
        }
        ns.ip(&format!("addr add {NODE}/24 dev ext0"))?;
        let manifests = ManifestsDir(std::env::temp_dir().join(unique_name(&format!("{tag}m"))));
        std::fs::create_dir_all(&manifests.0)?;
        std::fs::write(manifests.0.join("web.yaml"), MANIFESTS)?;
        Ok(Self {
            pins: PinDirGuard::new(&format!("{tag}x")),
            manifests,
            ns,
            _peer: peer,
        })
    }

    /// Starts the agent as uid 0 with exactly `caps`.
    fn start(&self, caps: &[Capability], mounts: Mounts) -> Result<AgentProcess> {
        let bounding: Vec<String> = std::iter::once("-all".to_owned())
            .chain(
                caps.iter()
                    .map(|c| format!("+{}", c.kubernetes_name().to_lowercase())),
            )
            .collect();
        let mut wrapper: Vec<String> = Vec::new();
        if let Mounts::PrivateWithoutBpffs = mounts {
            wrapper.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    // Every layer: tests running side by side may each have mounted bpffs
                    // on the host before seeing the other's mount.
                    "while umount -l /sys/fs/bpf 2>/dev/null; do :; done; exec \"$@\"",
                    "sh",
                ]
                .map(String::from),
            );
        }
        wrapper.extend(
            [
                "setpriv",
                "--bounding-set",
                &bounding.join(","),
                "--inh-caps",
                "-all",
                "--ambient-caps",
                "-all",
                "--",
            ]
            .map(String::from),
        );
        let args: Vec<String> = [
            "--manifests",
            &self.manifests.0.display().to_string(),
            "--node-name",
            "node-1",
            "--external-interface",
            "ext0",
            "--pod-interfaces",
            "pod0",
            // A veth: XDP only when asked for.
            "--external-hook",
            "xdp",
            "--bpffs-dir",
            &self.pins.path().display().to_string(),
            "--healthz-bind-address",
            &format!("{NODE}:{HEALTHZ_PORT}"),
            "--metrics-bind-address",
            "off",
        ]
        .map(String::from)
        .to_vec();
        AgentProcess::spawn_wrapped(&self.ns, &wrapper, &args)
    }

    fn xdp_attached(&self) -> Result<bool> {
        let out = self.ns.ip("-j -d link show dev ext0")?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(links[0].get("xdp").is_some())
    }

    /// The status code of GET /healthz on the node health server.
    fn healthz(&self) -> Result<u16> {
        self.ns.run(|| -> Result<u16> {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::from((NODE, HEALTHZ_PORT)),
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            answer
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .with_context(|| format!("no status in {answer:?}"))
        })?
    }
}

/// bpffs at /sys/fs/bpf on the host, as deploy/base/daemonset.yaml requires of a node (and as every
/// agent started with full privileges by the other root tests does on this machine).
fn mount_host_bpffs() -> Result<()> {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()?;
    if String::from_utf8_lossy(&out.stdout).trim() == "bpf_fs" {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    ensure!(status.success(), "mounting bpffs at /sys/fs/bpf");
    Ok(())
}

fn message(entry: &serde_json::Value) -> &str {
    entry
        .pointer("/fields/message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
}

fn required() -> Vec<Capability> {
    REQUIRED.iter().map(|(cap, _)| *cap).collect()
}

/// Waits until the agent has programmed the manifests.
fn wait_reconciled(agent: &mut AgentProcess) -> Result<()> {
    agent
        .wait_log("the first reconcile", |e| message(e) == "reconciled")
        .map(drop)
}

#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn the_required_capabilities_are_enough_to_run() -> Result<()> {
    let node = Node::new("cr")?;
    let mut agent = node.start(&required(), Mounts::Host)?;
    // The agent reports what it has: exactly those, so setpriv did restrict it.
    let privileges = agent.wait_log("the privileges line", |e| message(e) == "privileges")?;
    let reported = privileges
        .pointer("/fields/capabilities")
        .and_then(|c| c.as_str())
        .context("capabilities in the privileges line")?;
    assert_eq!(reported, CapabilitySet::of(&required()).to_string());
    wait_reconciled(&mut agent)?;
    assert!(node.xdp_attached()?, "XDP on ext0");
    assert!(
        node.pins.path().join("maps").is_dir(),
        "maps pinned under {}",
        node.pins.path().display()
    );
    assert_eq!(node.healthz()?, 200);
    let status = agent.terminate()?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    Ok(())
}

#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn without_any_one_required_capability_the_agent_stops_at_start_naming_it() -> Result<()> {
    let node = Node::new("cm")?;
    for (dropped, _) in REQUIRED {
        let rest: Vec<Capability> = required().into_iter().filter(|c| *c != dropped).collect();
        let mut agent = node.start(&rest, Mounts::Host)?;
        let expected = format!("missing capabilities: {dropped} for ");
        agent.wait_log(&format!("the error naming {dropped}"), |e| {
            fatal_error(e).is_some_and(|l| l.starts_with(&expected))
        })?;
        let status = agent.wait()?;
        assert_eq!(status.code(), Some(1), "without {dropped}");
        assert!(!node.xdp_attached()?, "nothing attached without {dropped}");
        assert!(
            !node.pins.path().exists(),
            "nothing pinned without {dropped}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn without_bpffs_on_the_host_mounting_it_needs_cap_sys_admin_and_is_warned_about() -> Result<()> {
    let node = Node::new("cb")?;
    let mut agent = node.start(&required(), Mounts::PrivateWithoutBpffs)?;
    agent.wait_log("the error naming CAP_SYS_ADMIN", |e| {
        fatal_error(e).is_some_and(|l| {
            l.starts_with("missing capabilities: CAP_SYS_ADMIN for mounting bpffs")
        })
    })?;
    assert_eq!(agent.wait()?.code(), Some(1));
    assert!(!node.xdp_attached()?);

    // With CAP_SYS_ADMIN it mounts bpffs and runs, warning that this mount (in a mount
    // namespace of its own, not shared with the host) takes the pins with it when it ends.
    let with_admin: Vec<Capability> = required()
        .into_iter()
        .chain([Capability::SysAdmin])
        .collect();
    let mut agent = node.start(&with_admin, Mounts::PrivateWithoutBpffs)?;
    agent.wait_log("the warning about the private bpffs mount", |e| {
        e["level"] == "WARN" && message(e).contains("vanish when the container ends")
    })?;
    wait_reconciled(&mut agent)?;
    assert!(node.xdp_attached()?);
    assert!(
        !node.pins.path().exists(),
        "the pins are on the private bpffs, not the host's"
    );
    agent.terminate()?;
    Ok(())
}
