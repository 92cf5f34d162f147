//! Next to kube-proxy (docs/deploying.md, "Next to kube-proxy"). node-1 carries kube-proxy's
//! NodePort rules as its iptables mode writes them (nat PREROUTING -> KUBE-SERVICES ->
//! KUBE-NODEPORTS -> DNAT), all pointing at a decoy pod. Connections from outside to a node port
//! nodeport programmed reach nodeport's backends, and the KUBE-NODEPORTS rule counts nothing: XDP
//! and TC took them before PREROUTING (or the TC hook alone, `--external-hook tc`). A node port nodeport does not program, and hairpin
//! traffic from a local pod to a programmed one, reach the decoy through the same rules: what
//! nodeport does not take, kube-proxy still serves. Needs root: run by `cargo xtask test`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use nodeport_tests::lab::{
    Lab, NODE1, POD_PORT,
    manifests::{self, ready},
};

/// The pod kube-proxy's rules send everything to; nodeport never selects it.
const DECOY: &str = "198.18.1.11";
const PROGRAMMED: u16 = 30080;
const NOT_PROGRAMMED: u16 = 30081;

/// kube-proxy's chains for both node ports, in node-1's namespace (iptables mode, one endpoint
/// each, the way `iptables-save` shows them, minus the masquerade marks).
fn install_kube_proxy_rules(lab: &Lab) -> Result<()> {
    let rules: Vec<Vec<String>> = [
        "-t nat -N KUBE-SERVICES",
        "-t nat -N KUBE-NODEPORTS",
        "-t nat -A PREROUTING -j KUBE-SERVICES",
        &format!("-t nat -A KUBE-SERVICES -d {NODE1}/32 -j KUBE-NODEPORTS"),
        &format!(
            "-t nat -A KUBE-NODEPORTS -p tcp --dport {PROGRAMMED} -j DNAT --to-destination {DECOY}:{POD_PORT}"
        ),
        &format!(
            "-t nat -A KUBE-NODEPORTS -p tcp --dport {NOT_PROGRAMMED} -j DNAT --to-destination {DECOY}:{POD_PORT}"
        ),
    ]
    .iter()
    .map(|r| r.split_whitespace().map(String::from).collect())
    .collect();
    for rule in rules {
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        lab.node1.exec("iptables", &args)?;
    }
    Ok(())
}

/// Packets the KUBE-NODEPORTS rule of `port` matched (nat rules see a connection's first).
fn kube_nodeports_packets(lab: &Lab, port: u16) -> Result<u64> {
    let out = lab.node1.exec(
        "iptables",
        &["-t", "nat", "-L", "KUBE-NODEPORTS", "-v", "-n", "-x"],
    )?;
    let text = String::from_utf8(out.stdout)?;
    let line = text
        .lines()
        .find(|l| l.contains(&format!("dpt:{port} ")))
        .with_context(|| format!("no KUBE-NODEPORTS rule for {port} in:\n{text}"))?;
    line.split_whitespace()
        .next()
        .context("packet count")?
        .parse()
        .context("packet count")
}

/// One TCP connection from a pod's namespace; the name of the pod that answered.
fn ask_from_pod(lab: &Lab, pod: &str, to: SocketAddrV4) -> Result<String> {
    lab.pod(pod).ns.run(|| -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    })?
}

#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn kube_proxys_node_port_rules_never_see_what_nodeport_takes() -> Result<()> {
    check("native")
}

/// Generic XDP runs after the skb is allocated, but still before netfilter.
#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn kube_proxys_node_port_rules_never_see_what_nodeport_takes_in_generic_xdp() -> Result<()> {
    check("generic")
}

/// The TC hook (the agent's choice on a veth node) runs at TC ingress, still before netfilter.
#[test]
#[ignore = "needs root, the eBPF datapath and network namespaces: run `cargo xtask test`"]
fn kube_proxys_node_port_rules_never_see_what_nodeport_takes_with_the_tc_hook() -> Result<()> {
    check("tc")
}

/// `mode`: native or generic XDP, or the TC hook.
fn check(mode: &str) -> Result<()> {
    let mut lab = Lab::new(&format!("k{}", &mode[..1]))?;
    lab.add_pod("a", 1, 10)?;
    lab.add_pod("b", 1, 11)?;
    lab.add_pod("c", 2, 10)?;
    install_kube_proxy_rules(&lab)?;
    if mode == "tc" {
        lab.agent_args(&["--external-hook", "tc"]);
    } else {
        lab.agent_args(&["--xdp-mode", mode]);
    }
    let a = lab.pod("a").addr.to_string();
    let c = lab.pod("c").addr.to_string();
    lab.start_agent(&manifests::service(
        "web",
        PROGRAMMED,
        &["TCP"],
        "",
        &[ready(&a, "node-1"), ready(&c, "node-2")],
    ))?;

    // From outside, to the programmed node port: nodeport's backends (a local, c remote),
    // never the decoy, and kube-proxy's rule sees not one packet.
    let answers = lab.spread(SocketAddrV4::new(NODE1, PROGRAMMED), 40)?;
    ensure!(
        answers.keys().all(|pod| pod == "a" || pod == "c") && answers.len() == 2,
        "answers from outside: {answers:?}"
    );
    ensure!(
        kube_nodeports_packets(&lab, PROGRAMMED)? == 0,
        "kube-proxy's KUBE-NODEPORTS rule saw packets nodeport translated"
    );

    // A node port nodeport does not program passes XDP untouched: kube-proxy's rule serves it.
    let answer = lab.ask_tcp(SocketAddrV4::new(NODE1, NOT_PROGRAMMED))?;
    ensure!(
        answer.pod == "b",
        "{NOT_PROGRAMMED} answered by {}",
        answer.pod
    );
    ensure!(kube_nodeports_packets(&lab, NOT_PROGRAMMED)? == 1);

    // Hairpin: a local pod to the programmed node port never meets the external hook;
    // kube-proxy's.
    let hairpin = ask_from_pod(&lab, "a", SocketAddrV4::new(NODE1, PROGRAMMED))?;
    ensure!(hairpin == "b", "hairpin answered by {hairpin}");
    ensure!(kube_nodeports_packets(&lab, PROGRAMMED)? == 1);
    Ok(())
}
