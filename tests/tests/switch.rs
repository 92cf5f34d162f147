//! The off-switch (issue 15, docs/operations.md "Switching the datapath off"): node-1 carries
//! kube-proxy's iptables rules for the node port (tests/src/kube_proxy.rs), pointing at a decoy
//! pod nodeport never selects, so every answer says who carried the connection. With traffic
//! flowing, `--datapath-switch` goes off (a connection nodeport carries keeps working while it
//! drains; new ones go to kube-proxy), the datapath is detached once that connection has
//! closed (pins gone, the agent running and ready), and back on: a connection kube-proxy
//! opened meanwhile stays with kube-proxy (nodeport starts connections on a SYN only), new
//! ones go through nodeport again. Needs root: run by `cargo xtask test`.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodeport_tests::{
    kube_proxy::{self, Proxied},
    lab::{
        Lab, NODE1, PATIENCE,
        manifests::{self, ready},
        message_is,
    },
    netns::unique_name,
};

const NODE_PORT: u16 = 30080;

/// The switch file's directory (a ConfigMap volume's stand-in), removed on drop.
struct SwitchDir(PathBuf);

impl SwitchDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("sw"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
    fn file(&self) -> PathBuf {
        self.0.join("datapath")
    }
    /// Written as the kubelet does: a new file renamed into place.
    fn set(&self, state: &str) -> Result<()> {
        let tmp = self.0.join(".datapath.tmp");
        std::fs::write(&tmp, format!("{state}\n"))?;
        std::fs::rename(&tmp, self.file())?;
        Ok(())
    }
}

impl Drop for SwitchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `check` until it returns `Some`, or fails after the lab's patience.
fn await_until<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = check();
        if let Ok(Some(v)) = last {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last: {:?})", last.err());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn datapath_state(lab: &Lab) -> Result<Option<String>> {
    Ok(lab.status()?["datapath_switch"].as_str().map(String::from))
}

fn state_gauge(lab: &Lab, state: &str) -> Result<f64> {
    lab.scrape()?
        .value("nodeport_datapath_state", &[("state", state)])
        .with_context(|| format!("no nodeport_datapath_state{{state={state:?}}}"))
}

fn maps_pinned(pins: &Path) -> bool {
    std::fs::read_dir(pins.join("maps")).is_ok_and(|mut d| d.next().is_some())
}

#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn switching_off_drains_detaches_and_back_on_leaves_kube_proxys_connections() -> Result<()> {
    round_trip("xdp")
}

/// The same with the TC hook (the agent's choice on a veth node).
#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn switching_off_and_on_works_with_the_tc_hook_too() -> Result<()> {
    round_trip("tc")
}

/// The external program attached to ext0, as `status` reads it from the kernel's links.
fn ext0_program(lab: &Lab) -> Result<Option<String>> {
    let status = lab.status()?;
    Ok(status["attachments"]
        .as_array()
        .context("attachments")?
        .iter()
        .filter(|a| a["interface"] == "ext0")
        .filter_map(|a| a["program"].as_str())
        .find(|p| p.starts_with("np_xdp") || *p == "np_tc_ext_nat")
        .map(str::to_owned))
}

fn round_trip(hook: &str) -> Result<()> {
    let program = if hook == "xdp" {
        "np_xdp_ext"
    } else {
        "np_tc_ext_nat"
    };
    let mut lab = Lab::new(&format!("sw{}", &hook[..1]))?;
    lab.agent_args(&["--external-hook", hook]);
    lab.add_pod("a", 1, 10)?;
    lab.add_pod("decoy", 1, 11)?;
    let decoy = lab.pod("decoy").endpoint();
    kube_proxy::load(
        &lab.node1,
        &kube_proxy::rules(&[Proxied {
            name: "WEB",
            node_port: NODE_PORT,
            protocol: "tcp",
            endpoints: vec![decoy],
        }]),
    )?;
    let switch = SwitchDir::new()?;
    let file = switch.file().display().to_string();
    // The switch file does not exist yet: on. Closed connections leave the tables after 1 s,
    // so the drain ends soon after the last one closes.
    lab.agent_args(&[
        "--datapath-switch",
        &file,
        "--conntrack-tcp-closing-timeout",
        "1",
    ]);
    let a = lab.pod("a").addr.to_string();
    lab.start_agent(&manifests::service(
        "web",
        NODE_PORT,
        &["TCP"],
        "",
        &[ready(&a, "node-1")],
    ))?;
    let frontend = SocketAddrV4::new(NODE1, NODE_PORT);
    ensure!(
        lab.ask_tcp(frontend)?.pod == "a",
        "nodeport serves the port"
    );
    ensure!(datapath_state(&lab)?.as_deref() == Some("on"));
    ensure!(state_gauge(&lab, "on")? == 1.0);

    // A long-lived connection through nodeport, then the switch goes off.
    let mut long_lived = lab.connect(frontend, None)?;
    ensure!(long_lived.ask()?.pod == "a");
    switch.set("off")?;
    lab.agent_mut()?.wait_log("the drain to start", |e| {
        message_is(
            e,
            "datapath switched off: draining; new connections go to kube-proxy, established \
             ones stay until they end or --drain-timeout",
        )
    })?;
    ensure!(datapath_state(&lab)?.as_deref() == Some("draining"));
    ensure!(state_gauge(&lab, "draining")? == 1.0 && state_gauge(&lab, "on")? == 0.0);

    // Draining: the established connection is still nodeport's, new ones are kube-proxy's
    // (nodeport counted their SYNs as passed).
    let passed = lab.counter("draining")?;
    let mut via_kube_proxy = lab.connect(frontend, None)?;
    ensure!(
        via_kube_proxy.ask()?.pod == "decoy",
        "a new connection while draining"
    );
    ensure!(lab.ask_tcp(frontend)?.pod == "decoy");
    ensure!(
        lab.counter("draining")? >= passed + 2,
        "the new connections' SYNs were not counted as passed"
    );
    ensure!(
        long_lived.ask()?.pod == "a",
        "the established connection moved"
    );
    // It is still open: the datapath is still attached.
    ensure!(maps_pinned(lab.pins.path()) && ext0_program(&lab)?.as_deref() == Some(program));

    // The last nodeport connection closes: the datapath goes, the agent stays, ready.
    drop(long_lived);
    lab.agent_mut()?.wait_log("the detach", |e| {
        message_is(
            e,
            "datapath switched off: drained and detached; kube-proxy carries the node ports",
        )
    })?;
    ensure!(!maps_pinned(lab.pins.path()), "maps still pinned");
    ensure!(
        lab.node1_xdp_program()?.is_none() && !lab.pins.path().join("links").exists(),
        "the datapath is still attached to ext0"
    );
    ensure!(datapath_state(&lab)?.as_deref() == Some("off"));
    ensure!(state_gauge(&lab, "off")? == 1.0 && state_gauge(&lab, "draining")? == 0.0);
    ensure!(lab.node_health("/readyz")? == 200, "not ready while off");
    ensure!(lab.node_health("/livez")? == 200, "not alive while off");
    ensure!(lab.ask_tcp(frontend)?.pod == "decoy");
    ensure!(via_kube_proxy.ask()?.pod == "decoy");

    // Back on: attached and programmed as at start.
    switch.set("on")?;
    lab.agent_mut()?.wait_log("the attach", |e| {
        message_is(e, "datapath switched on: attached and programmed")
    })?;
    await_until("status to show on", || {
        Ok((datapath_state(&lab)?.as_deref() == Some("on")).then_some(()))
    })?;
    ensure!(state_gauge(&lab, "on")? == 1.0 && state_gauge(&lab, "off")? == 0.0);
    // The connection kube-proxy carried stays kube-proxy's: its segments start nothing here.
    let not_syn = lab.counter("not_syn")?;
    ensure!(
        via_kube_proxy.ask()?.pod == "decoy",
        "kube-proxy's connection was taken over"
    );
    ensure!(
        lab.counter("not_syn")? > not_syn,
        "its segments were not counted as passed"
    );
    // New connections are nodeport's again.
    ensure!(lab.ask_tcp(frontend)?.pod == "a");
    ensure!(lab.node_health("/readyz")? == 200);
    Ok(())
}

/// A sizing flag changed under a running datapath (issue 15): the new agent does not exit
/// (a DaemonSet pod would crash-loop), touches nothing, stays alive and not ready with the
/// reason, `status` says what to do; the old datapath keeps forwarding, the established
/// connection included. Removing the old datapath (`nodeport-agent detach`) ends the refusing
/// agent, so the kubelet starts it afresh.
#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn a_sizing_change_is_refused_while_the_old_datapath_forwards() -> Result<()> {
    let mut lab = Lab::new("sz")?;
    lab.add_pod("a", 1, 10)?;
    let a = lab.pod("a").addr.to_string();
    let yaml = manifests::service("web", NODE_PORT, &["TCP"], "", &[ready(&a, "node-1")]);
    lab.start_agent(&yaml)?;
    let frontend = SocketAddrV4::new(NODE1, NODE_PORT);
    let mut established = lab.connect(frontend, None)?;
    ensure!(established.ask()?.pod == "a");
    let status = lab.take_agent()?.terminate()?;
    ensure!(status.success(), "the first agent exited with {status}");

    // Another --conntrack-size than the pinned NP_CT's.
    let pinned = lab.status()?["maps"]
        .as_array()
        .context("maps in status")?
        .iter()
        .find(|m| m["name"] == "NP_CT")
        .and_then(|m| m["capacity"].as_u64())
        .context("NP_CT's capacity in status")?;
    let other = (pinned * 2).to_string();
    let manifests = lab.manifests.clone();
    let mut agent = lab.spawn_agent(&yaml, &manifests, &["--conntrack-size", &other])?;
    agent.wait_log("the refusal", |e| {
        message_is(
            e,
            "not adopting the pinned datapath: it keeps forwarding untouched; this agent stays \
             up and not ready until it is restarted with matching flags, or the old datapath \
             is detached",
        )
    })?;
    let (code, body) = lab.http_get(SocketAddrV4::new(NODE1, 10256), "/readyz")?;
    ensure!(code == 503, "/readyz answered {code}");
    let reason: serde_json::Value = serde_json::from_str(&body)?;
    let reason = reason["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.starts_with("pinned datapath incompatible: NP_CT: max entries")
            && reason.contains(&format!("expected {other}")),
        "/readyz reason: {reason:?}"
    );
    ensure!(lab.node_health("/livez")? == 200, "not alive");
    let status = lab.agent_output(&["status"])?;
    ensure!(
        status.contains("pinned datapath incompatible: NP_CT: max entries")
            && status.contains("nodeport-agent detach --bpffs-dir"),
        "status:\n{status}"
    );
    // The old datapath forwards: the established connection and new ones (no kube-proxy
    // here: only nodeport answers on the node port).
    ensure!(established.ask()?.pod == "a", "the established connection");
    ensure!(lab.ask_tcp(frontend)?.pod == "a", "a new connection");
    let still = lab.status()?;
    ensure!(
        still["incompatible"]
            .as_array()
            .is_some_and(|d| !d.is_empty()),
        "{still}"
    );

    // The documented way out: detach; the refusing agent then exits by itself.
    lab.agent_output(&["detach"])?;
    let (exit, log) = agent.exit_log()?;
    ensure!(
        exit.success(),
        "the refusing agent exited with {exit}:\n{log}"
    );
    Ok(())
}
