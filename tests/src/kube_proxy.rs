//! kube-proxy's iptables mode for node ports, as the tests and the bench compare nodeport with
//! it: the rules a packet from outside walks, written for `iptables-restore --noflush` (the way
//! kube-proxy loads them), and loaded into a node's namespace.
//!
//! nat: node port -> KUBE-EXT (mark for masquerade) -> KUBE-SVC (random) -> KUBE-SEP (DNAT),
//! and KUBE-POSTROUTING's MASQUERADE of marked packets. filter: a Service without endpoints is
//! rejected (`-j REJECT`, iptables' default answer: ICMP port unreachable), and packets
//! conntrack calls INVALID are dropped on the way through (KUBE-FORWARD), as kube-proxy does.

use std::{fmt::Write as _, io::Write as _, net::SocketAddrV4, process::Stdio};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// A Service port as kube-proxy's rules see it.
pub struct Proxied<'a> {
    /// Upper case, for the chain names.
    pub name: &'a str,
    pub node_port: u16,
    /// "tcp" or "udp".
    pub protocol: &'a str,
    pub endpoints: Vec<SocketAddrV4>,
}

/// The rules for `services`, as iptables-restore input.
pub fn rules(services: &[Proxied]) -> String {
    let mut r = String::from(
        "*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        let name = s.name;
        let _ = writeln!(r, ":KUBE-EXT-{name} - [0:0]\n:KUBE-SVC-{name} - [0:0]");
        for i in 0..s.endpoints.len() {
            let _ = writeln!(r, ":KUBE-SEP-{name}{i} - [0:0]");
        }
    }
    r.push_str(
        "-A PREROUTING -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        let (name, port, p) = (s.name, s.node_port, s.protocol);
        let _ = writeln!(
            r,
            "-A KUBE-NODEPORTS -p {p} -m {p} --dport {port} -j KUBE-EXT-{name}\n\
             -A KUBE-EXT-{name} -j KUBE-MARK-MASQ\n-A KUBE-EXT-{name} -j KUBE-SVC-{name}"
        );
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            if i + 1 < n {
                let _ = writeln!(
                    r,
                    "-A KUBE-SVC-{name} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{name}{i}",
                    1.0 / (n - i) as f64
                );
            } else {
                let _ = writeln!(r, "-A KUBE-SVC-{name} -j KUBE-SEP-{name}{i}");
            }
            let _ = writeln!(
                r,
                "-A KUBE-SEP-{name}{i} -p {p} -m {p} -j DNAT --to-destination {ep}"
            );
        }
    }
    r.push_str("COMMIT\n");
    r.push_str(
        "*filter\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    for s in services.iter().filter(|s| s.endpoints.is_empty()) {
        let (name, port, p) = (s.name, s.node_port, s.protocol);
        let _ = writeln!(
            r,
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" \
             -m addrtype --dst-type LOCAL -p {p} -m {p} --dport {port} -j REJECT"
        );
    }
    r.push_str("COMMIT\n");
    r
}

/// Loads `rules` into `node`'s namespace with `iptables-legacy-restore --noflush` (the legacy
/// backend: see the bench's `NODEPORT_BENCH_IPTABLES` for why).
pub fn load(node: &NetNs, rules: &str) -> Result<()> {
    restore(node, "iptables-legacy-restore", rules)
}

/// Runs `program` (an `iptables-*-restore`) with `--noflush`, kube-proxy's way, on `rules` in
/// `node`'s namespace.
pub fn restore(node: &NetNs, program: &str, rules: &str) -> Result<()> {
    let mut child = node
        .command(program)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .context("writing to iptables-restore")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
