//! The Services both arms are given: N - 1 fillers and the measured Service, the same set for
//! kube-proxy's rules and for the agent's manifests.
//!
//! * The measured Service (namespace `bench`, node port 20000, TCP and UDP) has one endpoint, a
//!   backend pod on the node; the endpoint change moves it to the second pod.
//! * Filler i has three endpoints on other nodes (addresses from a pool in 198.18.128.0/18,
//!   never contacted) and node port 20001 + i. Node ports go beyond kube-apiserver's default
//!   range 30000-32767 (2,768 ports): the agent is started with --service-node-port-range
//!   20000-60999 (it refuses node ports outside its range), and kube-proxy's rules do not
//!   depend on it. Ports stop at 60999, below the agent's SNAT
//!   range; fillers beyond that (only at 65,536 Services) get an externalIP instead, as a Service
//!   in a real cluster could.
//! * Every Service has a ClusterIP (198.19.0.0/16), as on a real node, where kube-proxy writes a
//!   ClusterIP rule for each.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

pub const MEASURED_NAMESPACE: &str = "bench";
pub const MEASURED_NAME: &str = "measured";
pub const MEASURED_NODE_PORT: u16 = 20_000;
/// The node the agent runs as: the measured Service's endpoints are local to it.
pub const NODE_NAME: &str = "bench-node";
/// The port the backends listen on.
pub const BACKEND_PORT: u16 = 8080;
pub const BACKEND_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const BACKEND_B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
/// kube-proxy's `--cluster-cidr` (its local-traffic detector): where the filler pods live.
pub const POD_CIDR: &str = "198.18.128.0/17";
const LAST_NODE_PORT: u32 = 60_999;
const FILLER_ENDPOINTS: u32 = 3;
const ENDPOINT_POOL: u32 = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    NodePort(u16),
    /// An externalIP and the Service port it is reached on.
    ExternalIp(Ipv4Addr, u16),
}

#[derive(Clone, Debug)]
pub struct BenchService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// The Service port (ClusterIP port, and the externalIP port).
    pub port: u16,
    pub frontend: Frontend,
    pub udp: bool,
    pub endpoints: Vec<SocketAddrV4>,
    /// The node of each endpoint.
    pub nodes: Vec<String>,
}

impl BenchService {
    /// Lower-case protocols, as kube-proxy writes them.
    pub fn protocols(&self) -> &'static [&'static str] {
        if self.udp { &["tcp", "udp"] } else { &["tcp"] }
    }

    /// The name of the Service port of `protocol`.
    pub fn port_name(&self, protocol: &str) -> &'static str {
        if protocol == "udp" { "udp" } else { "tcp" }
    }

    /// How many service ports (the agent's unit of `--max-services`) this Service has.
    pub fn service_ports(&self) -> u32 {
        self.protocols().len() as u32
    }
}

fn filler(i: u32) -> BenchService {
    let node_port = u32::from(MEASURED_NODE_PORT) + 1 + i;
    let (port, frontend) = if node_port <= LAST_NODE_PORT {
        (80, Frontend::NodePort(node_port as u16))
    } else {
        // Past the node ports: one externalIP per Service, several Service ports per address.
        let k = node_port - LAST_NODE_PORT - 1;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 192, 0)) + k % 16_384);
        let port = 80 + (k / 16_384) as u16;
        (port, Frontend::ExternalIp(ip, port))
    };
    let endpoints = (0..FILLER_ENDPOINTS)
        .map(|e| {
            let n = (i * FILLER_ENDPOINTS + e) % ENDPOINT_POOL;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + n);
            SocketAddrV4::new(ip, BACKEND_PORT)
        })
        .collect();
    BenchService {
        namespace: format!("team-{:02}", i % 50),
        name: format!("svc-{i:05}"),
        cluster_ip: cluster_ip(i + 1),
        port,
        frontend,
        udp: false,
        endpoints,
        nodes: (0..FILLER_ENDPOINTS)
            .map(|e| format!("node-{}", 2 + (i + e) % 19))
            .collect(),
    }
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    assert!(i < 65_536, "ClusterIPs come from a /16");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i)
}

/// The fillers of a run with `n` Services (`n - 1` of them).
pub fn fillers(n: u32) -> Vec<BenchService> {
    (0..n.saturating_sub(1)).map(filler).collect()
}

/// The measured Service with its one endpoint on `backend`.
pub fn measured(backend: Ipv4Addr) -> BenchService {
    BenchService {
        namespace: MEASURED_NAMESPACE.into(),
        name: MEASURED_NAME.into(),
        cluster_ip: cluster_ip(0),
        port: 80,
        frontend: Frontend::NodePort(MEASURED_NODE_PORT),
        udp: true,
        endpoints: vec![SocketAddrV4::new(backend, BACKEND_PORT)],
        nodes: vec![NODE_NAME.into()],
    }
}

/// A Service and its EndpointSlice as YAML documents, in flow style to keep the files small.
pub fn yaml(s: &BenchService, out: &mut String) {
    let ports: Vec<String> = s
        .protocols()
        .iter()
        .map(|p| {
            let node_port = match s.frontend {
                Frontend::NodePort(np) => format!(", nodePort: {np}"),
                Frontend::ExternalIp(..) => String::new(),
            };
            format!(
                "{{name: {}, port: {}, protocol: {}, targetPort: {BACKEND_PORT}{node_port}}}",
                s.port_name(p),
                s.port,
                p.to_uppercase()
            )
        })
        .collect();
    let (type_, external) = match s.frontend {
        Frontend::NodePort(_) => ("NodePort", String::new()),
        Frontend::ExternalIp(ip, _) => ("ClusterIP", format!(", externalIPs: [{ip}]")),
    };
    let _ = writeln!(
        out,
        "---\nkind: Service\napiVersion: v1\nmetadata: {{name: {}, namespace: {}}}\n\
         spec: {{type: {type_}, clusterIP: {}{external}, ports: [{}]}}",
        s.name,
        s.namespace,
        s.cluster_ip,
        ports.join(", ")
    );
    let slice_ports: Vec<String> = s
        .protocols()
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: {BACKEND_PORT}, protocol: {}}}",
                s.port_name(p),
                p.to_uppercase()
            )
        })
        .collect();
    let endpoints: Vec<String> = s
        .endpoints
        .iter()
        .zip(&s.nodes)
        .map(|(ep, node)| {
            format!(
                "{{addresses: [{}], nodeName: {node}, conditions: {{ready: true}}}}",
                ep.ip()
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\n\
         metadata: {{name: {}-x1, namespace: {}, labels: {{kubernetes.io/service-name: {}}}}}\n\
         addressType: IPv4\nports: [{}]\nendpoints: [{}]",
        s.name,
        s.namespace,
        s.name,
        slice_ports.join(", "),
        endpoints.join(", ")
    );
}

/// The YAML of many Services.
pub fn yaml_all(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 700);
    for s in services {
        yaml(s, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_are_what_the_agent_expects() {
        let mut services = fillers(3);
        services.push(measured(BACKEND_A));
        let text = yaml_all(&services);
        let desired =
            nodeport_tests::agent::desired(&text, NODE_NAME, &[Ipv4Addr::new(198, 18, 0, 1)]);
        // Two fillers with one TCP port each, the measured Service with TCP and UDP.
        assert_eq!(desired.services.len(), 4, "{desired:?}");
    }

    #[test]
    fn fillers_beyond_the_node_ports_get_external_ips() {
        let last = filler(65_534);
        assert!(
            matches!(last.frontend, Frontend::ExternalIp(..)),
            "{last:?}"
        );
        assert!(matches!(
            filler(40_998).frontend,
            Frontend::NodePort(60_999)
        ));
        assert!(matches!(
            filler(40_999).frontend,
            Frontend::ExternalIp(ip, 80) if ip == Ipv4Addr::new(198, 18, 192, 0)
        ));
    }
}
