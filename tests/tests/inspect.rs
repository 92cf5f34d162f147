//! `nodeport-agent dump` and `status` against known map contents: services programmed by the
//! agent's syncer, connections created by packets through the real XDP program, and the
//! agent's record in `NP_AGENT`, all in real pinned maps.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use nodeport_agent::{
    datapath::{Datapath, PinDir},
    dump::{self, DumpOptions},
    model::Ipv4Prefix,
    status,
    sync::{Programmed, Syncer},
};
use nodeport_common::AgentState;
use nodeport_tests::{
    agent::{PinDirGuard, desired, small_sizing, test_settings},
    fixture::{CLIENT_MAC, EXT_MAC, Fixture, Topology},
    netns::require_root,
    packet::{Pkt, SYN, sa},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

const WEB: &str = r#"
kind: Service
apiVersion: v1
metadata: { name: web, namespace: shop }
spec:
  type: NodePort
  ports: [ { name: http, port: 80, nodePort: 30080 } ]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: web-1, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [ { name: http, port: 8080 } ]
endpoints:
- { addresses: [198.18.2.20], nodeName: node-b }
---
kind: Service
apiVersion: v1
metadata: { name: dns, namespace: kube-system }
spec:
  type: NodePort
  ports:
  - { name: dns, port: 53, protocol: UDP, nodePort: 30053 }
  - { name: dns-tcp, port: 53, protocol: TCP, nodePort: 30053 }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: dns-1, namespace: kube-system, labels: { kubernetes.io/service-name: dns } }
addressType: IPv4
ports: [ { name: dns, port: 53, protocol: UDP }, { name: dns-tcp, port: 53, protocol: TCP } ]
endpoints: [ { addresses: [198.18.1.11], nodeName: node-a } ]
"#;

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn dump_and_status_show_what_the_maps_hold() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let pins = PinDirGuard::new("in");
    let settings = test_settings(topo.ext_ifindex, NODE_IP);
    let mut dp = Datapath::load(&small_sizing(), Some(pins.path()))?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let sizing = dp.sizing.clone();
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(
        &mut programmed,
        &desired(WEB, "node-a", &[NODE_IP]),
        &settings,
    );
    ensure!(report.failed.is_empty(), "{:?}", report.failed);

    // Two connections through the real program: TCP to web (remote: SNAT), UDP to dns (local).
    let mut fx = Fixture::with(dp, &topo)?;
    fx.set_config(settings.config)?;
    let syn =
        Pkt::tcp(sa("198.18.0.100:40000"), sa("198.18.0.1:30080"), SYN).macs(CLIENT_MAC, EXT_MAC);
    fx.xdp(&topo, &syn.bytes())?;
    let query = Pkt::udp(sa("198.18.0.101:5353"), sa("198.18.0.1:30053")).macs(CLIENT_MAC, EXT_MAC);
    fx.xdp(&topo, &query.bytes())?;
    let mut dp = fx.dp;

    // dump --stats --conntrack: the census and both connections.
    let all = DumpOptions {
        stats: true,
        conntrack: true,
        ..DumpOptions::default()
    };
    let view = dump::read(&dp.maps, &dp.sizing, &all)?;
    let census = view.conntrack.as_ref().context("a census with --stats")?;
    ensure!(
        (
            census.entries,
            census.live,
            census.connections,
            census.snat_ports
        ) == (4, 4, 2, 1),
        "census {census:?}"
    );
    let connections = view.connections.as_ref().context("connections")?;
    ensure!(connections.len() == 2, "{connections:#?}");
    let tcp = connections
        .iter()
        .find(|c| c.protocol == "TCP")
        .context("the TCP connection")?;
    ensure!(
        tcp.client == "198.18.0.100:40000"
            && tcp.frontend == "198.18.0.1:30080"
            && tcp.backend == "198.18.2.20:8080"
            && tcp.service.as_deref() == Some("shop/web:http/TCP")
            && tcp.state == "syn_sent"
            && tcp
                .snat
                .as_deref()
                .is_some_and(|s| s.starts_with("198.18.0.1:61"))
            && tcp.expires_in_s.is_some_and(|s| s <= 60),
        "{tcp:#?}"
    );
    let udp = connections
        .iter()
        .find(|c| c.protocol == "UDP")
        .context("the UDP flow")?;
    ensure!(
        udp.client == "198.18.0.101:5353"
            && udp.backend == "198.18.1.11:53"
            && udp.service.as_deref() == Some("kube-system/dns:dns/UDP")
            && udp.state == "udp"
            && udp.snat.is_none(),
        "{udp:#?}"
    );
    let text = view.render();
    ensure!(
        text.contains("conntrack 2 connections, 1 SNAT ports in use; 4 entries (4 live)")
            && text.contains(
                "TCP 198.18.0.100:40000 -> 198.18.0.1:30080 -> 198.18.2.20:8080 via 198.18.0.1:61"
            ),
        "{text}"
    );

    // Filters: by Service (and port), by client.
    let only = |options: DumpOptions| -> Result<(Vec<String>, Vec<String>)> {
        let view = dump::read(&dp.maps, &dp.sizing, &options)?;
        Ok((
            view.services.iter().map(|s| s.service.clone()).collect(),
            view.connections
                .unwrap_or_default()
                .iter()
                .map(|c| c.client.clone())
                .collect(),
        ))
    };
    let dns = only(DumpOptions {
        conntrack: true,
        service: Some("kube-system/dns".parse().map_err(anyhow::Error::msg)?),
        ..DumpOptions::default()
    })?;
    ensure!(
        dns == (
            vec![
                "kube-system/dns:dns/UDP".into(),
                "kube-system/dns:dns-tcp/TCP".into()
            ],
            vec!["198.18.0.101:5353".into()]
        ),
        "{dns:?}"
    );
    let dns_tcp = only(DumpOptions {
        conntrack: true,
        service: Some(
            "kube-system/dns:dns-tcp"
                .parse()
                .map_err(anyhow::Error::msg)?,
        ),
        ..DumpOptions::default()
    })?;
    ensure!(
        dns_tcp == (vec!["kube-system/dns:dns-tcp/TCP".into()], vec![]),
        "{dns_tcp:?}"
    );
    let client = only(DumpOptions {
        conntrack: true,
        client: Some(
            "198.18.0.100/32"
                .parse::<Ipv4Prefix>()
                .map_err(anyhow::Error::msg)?,
        ),
        ..DumpOptions::default()
    })?;
    ensure!(
        client.1 == vec!["198.18.0.100:40000".to_owned()],
        "{client:?}"
    );

    // status: fill levels from the maps; no agent has recorded itself yet.
    let pin_dir = PinDir::new(pins.path());
    let st = status::read(&pin_dir)?;
    ensure!(st.agent.is_none(), "{:?}", st.agent);
    ensure!(st.attachments.is_empty(), "{:?}", st.attachments);
    let used = |name: &str| {
        st.maps
            .iter()
            .find(|m| m.name == name)
            .map(|m| (m.used, m.capacity))
    };
    ensure!(used("NP_FRONTENDS") == Some((Some(3), 64)), "{:?}", st.maps);
    ensure!(used("NP_SVC_NAMES") == Some((Some(3), 32)), "{:?}", st.maps);
    ensure!(used("NP_BACKENDS") == Some((Some(3), 64)), "{:?}", st.maps);
    ensure!(used("NP_CT") == Some((Some(4), 1024)), "{:?}", st.maps);
    // Memory is known for every map; the LPM trie allocates per prefix, and has none yet.
    ensure!(
        st.maps.iter().all(|m| m
            .memory_bytes
            .is_some_and(|b| b > 0 || m.name == "NP_SRC_RANGES")),
        "memory of every map: {:?}",
        st.maps
    );
    ensure!(
        (st.conntrack.connections, st.conntrack.snat_ports) == (2, 1),
        "{:?}",
        st.conntrack
    );

    // What an agent records shows up.
    let mut version = [0u8; 32];
    version[..9].copy_from_slice(b"9.9.9-abc");
    dp.maps.agent.set(
        0,
        AgentState {
            started_unix_ms: 1_700_000_000_000,
            last_sync_unix_ms: 1_700_000_001_000,
            last_attempt_unix_ms: 1_700_000_001_000,
            revision: 4,
            pid: std::process::id(),
            services: 3,
            backends: 3,
            failing: 0,
            version,
        },
        0,
    )?;
    let st = status::read(&pin_dir)?;
    let agent = st.agent.as_ref().context("the recorded agent")?;
    ensure!(
        agent.version == "9.9.9-abc"
            && agent.revision == 4
            && agent.last_sync.as_deref() == Some("2023-11-14T22:13:21Z"),
        "{agent:?}"
    );
    let text = st.render();
    ensure!(
        text.contains("agent      9.9.9-abc pid")
            && text.contains("programmed 3 service ports, 3 backends")
            && text.contains("NP_CT           4 / 1024"),
        "{text}"
    );
    Ok(())
}
