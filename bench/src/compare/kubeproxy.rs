//! The rules kube-proxy's iptables mode writes for the benchmark's Services, as
//! `iptables-restore` input.
//!
//! The shape follows kube-proxy's `pkg/proxy/iptables/proxier.go` (1.28 and later): the base
//! chains jump to `KUBE-SERVICES`, which holds one rule per ClusterIP (and externalIP) and, last,
//! the jump to `KUBE-NODEPORTS` for packets to a local address; `KUBE-NODEPORTS` holds one rule
//! per node port, jumping to the Service's `KUBE-EXT-*` chain, which marks the packet for
//! masquerade (externalTrafficPolicy Cluster) and goes on to `KUBE-SVC-*`; that chain picks an
//! endpoint with `-m statistic --mode random --probability 1/(n-i)` and jumps to its
//! `KUBE-SEP-*` chain, which DNATs. `KUBE-POSTROUTING` masquerades marked packets; the filter
//! table has kube-proxy's `KUBE-FORWARD` and friends and kubelet's `KUBE-FIREWALL`. Chain names
//! are kube-proxy's: a prefix and 16 base32 characters of a SHA-256 of the service port name,
//! protocol (and endpoint).
//!
//! kube-proxy writes Services in Go map order, which is random; the benchmark puts the measured
//! Service last, the worst case for a first packet, which walks the chains linearly.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::services::{BenchService, Frontend, POD_CIDR};

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// `KUBE-SVC-`, `KUBE-EXT-` or `KUBE-SEP-` and 16 base32 characters of SHA-256(`text`), as
/// kube-proxy's `servicePortChainName` and `servicePortEndpointChainName` compute them.
fn chain_name(prefix: &str, text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(text.as_bytes());
    // 16 characters of base32 are the first 80 bits.
    let mut bits: u128 = 0;
    for byte in &hash[..10] {
        bits = (bits << 8) | u128::from(*byte);
    }
    let mut name = String::with_capacity(prefix.len() + 16);
    name.push_str(prefix);
    for i in (0..16).rev() {
        name.push(ALPHABET[((bits >> (i * 5)) & 31) as usize] as char);
    }
    name
}

/// The chains of one service port.
struct Chains {
    svc: String,
    ext: String,
    /// One per endpoint, in the order of `BenchService::endpoints`.
    sep: Vec<String>,
}

impl Chains {
    fn of(s: &BenchService, protocol: &str) -> Self {
        // kube-proxy hashes `ns/name:port` and the lower-case protocol.
        let port_name = format!("{}/{}:{}", s.namespace, s.name, s.port_name(protocol));
        let base = format!("{port_name}{protocol}");
        Self {
            svc: chain_name("KUBE-SVC-", &base),
            ext: chain_name("KUBE-EXT-", &base),
            sep: s
                .endpoints
                .iter()
                .map(|ep| chain_name("KUBE-SEP-", &format!("{base}{ep}")))
                .collect(),
        }
    }
}

/// The filter table: what kube-proxy (and kubelet's `KUBE-FIREWALL`) keep there when every
/// Service has endpoints and none has source ranges or health-check node ports.
fn filter_table(out: &mut String) {
    out.push_str(
        "*filter\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FIREWALL - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
}

/// The jumps from the built-in chains, which kube-proxy adds one by one (`iptables -C`, `-I`)
/// rather than through iptables-restore. Loaded with the first full sync here.
fn base_jumps(filter: &mut String, nat: &mut String) {
    filter.push_str(
        "*filter\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         COMMIT\n",
    );
    nat.push_str(
        "*nat\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         COMMIT\n",
    );
}

/// The chains every sync rewrites in full (kube-proxy's partial syncs too): declarations and
/// rules of `KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`.
fn nat_top(out: &mut String, services: &[BenchService]) {
    out.push_str(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut svc_rules = String::new();
    let mut nodeport_rules = String::new();
    for s in services {
        for protocol in s.protocols() {
            let chains = Chains::of(s, protocol);
            let comment = format!("{}/{}:{}", s.namespace, s.name, s.port_name(protocol));
            let _ = writeln!(
                svc_rules,
                "-A KUBE-SERVICES -m comment --comment \"{comment} cluster IP\" -m {protocol} -p {protocol} -d {} --dport {} -j {}",
                s.cluster_ip, s.port, chains.svc
            );
            match s.frontend {
                Frontend::NodePort(port) => {
                    let _ = writeln!(
                        nodeport_rules,
                        "-A KUBE-NODEPORTS -m comment --comment {comment} -m {protocol} -p {protocol} --dport {port} -j {}",
                        chains.ext
                    );
                }
                Frontend::ExternalIp(ip, port) => {
                    let _ = writeln!(
                        svc_rules,
                        "-A KUBE-SERVICES -m comment --comment \"{comment} external IP\" -m {protocol} -p {protocol} -d {ip} --dport {port} -j {}",
                        chains.ext
                    );
                }
            }
        }
    }
    out.push_str(&svc_rules);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    out.push_str(&nodeport_rules);
    let _ = write!(
        out,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"
    );
}

/// One service's own chains: declarations first (`decl`), rules (`rules`).
fn service_chains(s: &BenchService, decl: &mut String, rules: &mut String) {
    for protocol in s.protocols() {
        let chains = Chains::of(s, protocol);
        let comment = format!("{}/{}:{}", s.namespace, s.name, s.port_name(protocol));
        let _ = writeln!(decl, ":{} - [0:0]", chains.svc);
        let _ = writeln!(decl, ":{} - [0:0]", chains.ext);
        for sep in &chains.sep {
            let _ = writeln!(decl, ":{sep} - [0:0]");
        }
        let _ = writeln!(
            rules,
            "-A {} -m comment --comment \"masquerade traffic for {comment} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {} -j {}",
            chains.ext, chains.ext, chains.svc
        );
        let _ = writeln!(
            rules,
            "-A {} -m comment --comment \"{comment} cluster IP\" -m {protocol} -p {protocol} -d {} --dport {} ! -s {POD_CIDR} -j KUBE-MARK-MASQ",
            chains.svc, s.cluster_ip, s.port
        );
        let n = s.endpoints.len();
        for (i, (ep, sep)) in s.endpoints.iter().zip(&chains.sep).enumerate() {
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {} -m comment --comment \"{comment} -> {ep}\"{statistic} -j {sep}",
                chains.svc
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {comment} -s {}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {comment} -m {protocol} -p {protocol} -j DNAT --to-destination {ep}",
                ep.ip()
            );
        }
    }
}

/// The whole ruleset of a first sync into a node without rules, the jumps from the built-in
/// chains included: what `iptables-restore --noflush` gets.
pub fn full_sync(services: &[BenchService]) -> String {
    let mut out = String::new();
    filter_table(&mut out);
    nat_top(&mut out, services);
    let (mut decl, mut rules) = (String::new(), String::new());
    for s in services {
        service_chains(s, &mut decl, &mut rules);
    }
    // Declarations must come before the rules that jump to them; kube-proxy writes them first.
    let at = out.find(":KUBE-MARK-MASQ - [0:0]\n").expect("nat header") + 24;
    out.insert_str(at, &decl);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    let (mut filter, mut nat) = (String::new(), String::new());
    base_jumps(&mut filter, &mut nat);
    out.push_str(&filter);
    out.push_str(&nat);
    out
}

/// A partial sync after one Service's endpoints changed from `before` to `after` (kube-proxy
/// 1.27+ with MinimizeIPTablesRestore): the filter table and the top nat chains in full, the
/// changed Service's chains, and the removal of endpoint chains that are gone.
pub fn endpoint_change(
    services: &[BenchService],
    before: &BenchService,
    after: &BenchService,
) -> String {
    let mut out = String::new();
    filter_table(&mut out);
    nat_top(&mut out, services);
    let (mut decl, mut rules) = (String::new(), String::new());
    service_chains(after, &mut decl, &mut rules);
    let mut gone = Vec::new();
    for protocol in before.protocols() {
        let old = Chains::of(before, protocol);
        let new = Chains::of(after, protocol);
        gone.extend(old.sep.into_iter().filter(|c| !new.sep.contains(c)));
    }
    for chain in &gone {
        let _ = writeln!(decl, ":{chain} - [0:0]");
    }
    let at = out.find(":KUBE-MARK-MASQ - [0:0]\n").expect("nat header") + 24;
    out.insert_str(at, &decl);
    out.push_str(&rules);
    for chain in &gone {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// Checks that a service's rules name the namespace the benchmark uses (keeps the import
/// honest when the measured Service's namespace changes).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::services::{MEASURED_NAMESPACE, fillers, measured};

    #[test]
    fn chain_names_are_kube_proxys() {
        // kube-proxy's proxier_test.go: servicePortChainName("ns1/svc1:p80", "tcp").
        assert_eq!(
            chain_name("KUBE-SVC-", "ns1/svc1:p80tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
    }

    #[test]
    fn the_measured_service_comes_last() {
        let mut services = fillers(3);
        services.push(measured(super::super::services::BACKEND_A));
        let rules = full_sync(&services);
        let last_nodeport = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .expect("node port rules");
        assert!(
            last_nodeport.contains(MEASURED_NAMESPACE),
            "{last_nodeport}"
        );
        assert!(rules.contains("--probability 0.3333333333"));
        assert!(rules.contains("--probability 0.5000000000"));
    }
}
