//! `nodeport-agent dump` and `status` against known map contents: services programmed by the
//! agent's syncer, connections written by hand into both connection tables (so the census is
//! known exactly whatever the datapath does), the conntrack collector sweeping them, and the
//! agent's record in `NP_AGENT`, all in real pinned maps.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use nodeport_agent::{
    datapath::{self, Datapath, PinDir},
    dump::{self, DumpOptions},
    gc,
    metrics::{Metrics, Sampler},
    model::Ipv4Prefix,
    source::{SourceStats, files::FilesSourceStats},
    status,
    sync::{Programmed, Syncer},
};
use nodeport_common::{
    AgentState, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_LOCAL, CT_F_SNAT, Counter, CtEntry, CtKey,
    CtState, IPPROTO_TCP, IPPROTO_UDP,
};
use nodeport_tests::{
    agent::{PinDirGuard, desired, small_sizing, test_settings},
    netns::require_root,
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

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

/// Writes a connection's two entries into `map` (NP_CT or NP_CT_NEW), as the datapath would:
/// client -> frontend rewritten to `via` -> backend, the reply entry keyed by the backend's
/// answer. Each entry was last seen `fwd_idle_s` / `rep_idle_s` seconds before `now`.
#[expect(clippy::too_many_arguments, reason = "the columns of a connection")]
fn write_connection(
    map: &mut aya::maps::HashMap<aya::maps::MapData, CtKey, CtEntry>,
    (proto, svc_id, flags, state): (u8, u32, u16, CtState),
    client: (Ipv4Addr, u16),
    frontend: (Ipv4Addr, u16),
    via: (Ipv4Addr, u16),
    backend: (Ipv4Addr, u16),
    (now, hz): (u64, u64),
    (fwd_idle_s, rep_idle_s): (u64, u64),
) -> Result<()> {
    let fwd_key = CtKey {
        saddr_be: be(client.0),
        daddr_be: be(frontend.0),
        sport_be: client.1.to_be(),
        dport_be: frontend.1.to_be(),
        proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let fwd = CtEntry {
        last_seen: now - fwd_idle_s * hz,
        new_saddr_be: be(via.0),
        new_daddr_be: be(backend.0),
        new_sport_be: via.1.to_be(),
        new_dport_be: backend.1.to_be(),
        svc_id,
        flags,
        state,
        ..CtEntry::default()
    };
    let rep_key = fwd.opposite_key(proto, CT_DIR_REPLY);
    let rep = CtEntry {
        last_seen: now - rep_idle_s * hz,
        new_saddr_be: be(frontend.0),
        new_daddr_be: be(client.0),
        new_sport_be: frontend.1.to_be(),
        new_dport_be: client.1.to_be(),
        svc_id,
        flags,
        state,
        ..CtEntry::default()
    };
    map.insert(fwd_key, fwd, 0)?;
    map.insert(rep_key, rep, 0)?;
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn dump_and_status_show_what_the_maps_hold() -> Result<()> {
    require_root();
    let pins = PinDirGuard::new("in");
    // No packet runs: any ifindex will do for the SNAT address.
    let settings = test_settings(1, NODE_IP);
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

    // Four connections, written by hand. Service ids as the syncer gave them (by name).
    let ids: std::collections::BTreeMap<String, u32> = programmed
        .services
        .iter()
        .map(|(k, s)| (k.to_string(), s.id))
        .collect();
    let web = ids["shop/web:http/TCP"];
    let dns = ids["kube-system/dns:dns/UDP"];
    let hz = u64::from(settings.config.hz);
    let now = (datapath::jiffies_now(settings.config.hz), hz);
    let established = CtState {
        replied: 1,
        established: 1,
        ..CtState::default()
    };
    let frontend = |port| (NODE_IP, port);
    let web_backend = (Ipv4Addr::new(198, 18, 2, 20), 8080);
    let ip = |d| Ipv4Addr::new(198, 18, 0, d);
    // 1. A SYN to web (remote backend, SNAT), in the handshake table.
    write_connection(
        &mut dp.maps.conntrack_new,
        (IPPROTO_TCP, web, CT_F_SNAT, CtState::default()),
        (ip(100), 40000),
        frontend(30080),
        (NODE_IP, 61000),
        web_backend,
        now,
        (1, 1),
    )?;
    // 2. A UDP flow to dns (local backend), answered.
    write_connection(
        &mut dp.maps.conntrack,
        (IPPROTO_UDP, dns, CT_F_LOCAL, established),
        (ip(101), 5353),
        frontend(30053),
        (ip(101), 5353),
        (Ipv4Addr::new(198, 18, 1, 11), 53),
        now,
        (2, 2),
    )?;
    // 3. An established web connection where only the client talks: its reply entry expired
    //    long ago, and the connection lives (and holds its SNAT port) through the other.
    write_connection(
        &mut dp.maps.conntrack,
        (IPPROTO_TCP, web, CT_F_SNAT, established),
        (ip(102), 40001),
        frontend(30080),
        (NODE_IP, 61001),
        web_backend,
        now,
        (3, 30_000),
    )?;
    // 4. A reset web connection, both entries past the 10 s closing timeout: dead.
    write_connection(
        &mut dp.maps.conntrack,
        (
            IPPROTO_TCP,
            web,
            CT_F_SNAT,
            CtState {
                rst_fwd: 1,
                ..established
            },
        ),
        (ip(103), 40002),
        frontend(30080),
        (NODE_IP, 61002),
        web_backend,
        now,
        (30, 30),
    )?;

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
        ) == (8, 6, 3, 2),
        "census {census:?}"
    );
    ensure!(
        (census.established.entries, census.established.live) == (6, 4)
            && (census.handshake.entries, census.handshake.live) == (2, 2),
        "per table {census:?}"
    );
    let snat = &census.snat;
    ensure!(
        snat.capacity_per_backend == 1000
            && snat.addresses.len() == 1
            && snat.addresses[0].address == "198.18.0.1"
            && (
                snat.addresses[0].ports,
                snat.addresses[0].backends,
                snat.addresses[0].max_per_backend
            ) == (2, 1, 2)
            && snat.busiest_backends.len() == 1
            && snat.busiest_backends[0].backend == "198.18.2.20:8080"
            && snat.busiest_backends[0].ports == 2,
        "SNAT census {snat:?}"
    );
    let connections = view.connections.as_ref().context("connections")?;
    ensure!(connections.len() == 4, "{connections:#?}");
    let by_client = |client: &str| {
        connections
            .iter()
            .find(|c| c.client == client)
            .with_context(|| format!("the connection of {client}"))
    };
    let tcp = by_client("198.18.0.100:40000")?;
    ensure!(
        tcp.protocol == "TCP"
            && tcp.frontend == "198.18.0.1:30080"
            && tcp.backend == "198.18.2.20:8080"
            && tcp.service.as_deref() == Some("shop/web:http/TCP")
            && tcp.state == "handshake"
            && tcp.table == datapath::CtTable::Handshake
            && tcp.snat.as_deref() == Some("198.18.0.1:61000")
            && tcp.expires_in_s.is_some_and(|s| (57..=59).contains(&s)),
        "{tcp:#?}"
    );
    let one_way = by_client("198.18.0.102:40001")?;
    ensure!(
        one_way.state == "established"
            && one_way.table == datapath::CtTable::Established
            && one_way.expires_in_s.is_some_and(|s| s > 21_000),
        "{one_way:#?}"
    );
    let dead = by_client("198.18.0.103:40002")?;
    ensure!(
        dead.state == "closing" && dead.expires_in_s.is_none(),
        "{dead:#?}"
    );
    let udp = by_client("198.18.0.101:5353")?;
    ensure!(
        udp.protocol == "UDP"
            && udp.backend == "198.18.1.11:53"
            && udp.service.as_deref() == Some("kube-system/dns:dns/UDP")
            && udp.state == "udp"
            && udp.snat.is_none(),
        "{udp:#?}"
    );
    let text = view.render();
    ensure!(
        text.contains("conntrack 3 connections, 2 SNAT ports in use; 8 entries (6 live)")
            && text.contains("NP_CT 6 entries (4 live), NP_CT_NEW 2 entries (2 live)")
            && text.contains(
                "SNAT 198.18.0.1: 2 ports to 1 backends, busiest backend 2 of 1000 ports (0.2%)"
            )
            && text.contains("198.18.0.1 -> 198.18.2.20:8080/TCP: 2 ports")
            && text.contains(
                "TCP 198.18.0.100:40000 -> 198.18.0.1:30080 -> 198.18.2.20:8080 via \
                 198.18.0.1:61000  shop/web:http/TCP handshake"
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

    // The collector deletes the dead connection (both entries) and nothing else.
    let pin_dir = PinDir::new(pins.path());
    let mut gc_maps = dp.maps.share()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let report = gc::collect_once(&mut gc_maps, &metrics).context("a sweep")?;
    ensure!(
        (
            report.entries,
            report.deleted_established,
            report.deleted_handshake
        ) == (8, 2, 0),
        "{report:?}"
    );
    let after = dump::read(&dp.maps, &dp.sizing, &all)?;
    let clients: Vec<&str> = after
        .connections
        .as_ref()
        .context("connections")?
        .iter()
        .map(|c| c.client.as_str())
        .collect();
    ensure!(
        clients.len() == 3 && !clients.contains(&"198.18.0.103:40002"),
        "{clients:?}"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    ensure!(
        text.contains("nodeport_conntrack_gc_deleted_entries_total{map=\"NP_CT\"} 2")
            && text.contains("nodeport_conntrack_gc_deleted_entries_total{map=\"NP_CT_NEW\"} 0"),
        "{text}"
    );

    // Connection events are not packet fates: their own metric family and `dump --stats`
    // list, never in the packet counters.
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let per_cpu = |n: u64| {
        let mut v = vec![0u64; cpus];
        v[0] = n;
        aya::maps::PerCpuValues::try_from(v)
    };
    dp.maps
        .counters
        .set(Counter::EventCtPromoteFailed as u32, per_cpu(3)?, 0)?;
    dp.maps
        .counters
        .set(Counter::DroppedMartianSource as u32, per_cpu(2)?, 0)?;
    let stats = dump::read(&dp.maps, &dp.sizing, &all)?;
    ensure!(
        stats.events == [("conntrack_promote_failed".to_owned(), 3)]
            && stats.counters == [("martian_source".to_owned(), 2)],
        "events {:?}, counters {:?}",
        stats.events,
        stats.counters
    );
    ensure!(
        stats
            .render()
            .contains("connection events\n  conntrack_promote_failed 3\n"),
        "{}",
        stats.render()
    );
    let (_tx, snapshots) = nodeport_agent::source::channel();
    let mut sampler = Sampler::register(
        &mut registry,
        dp.maps.share()?,
        settings.config,
        SourceStats::Files(FilesSourceStats::new()),
        snapshots,
        "30000-32767".parse().map_err(anyhow::Error::msg)?,
        true,
    );
    sampler.sample();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    for line in [
        "nodeport_conntrack_events_total{event=\"conntrack_promote_failed\"} 3",
        "nodeport_datapath_packets_total{reason=\"martian_source\",kind=\"dropped\"} 2",
        "nodeport_conntrack_entries{map=\"NP_CT\",state=\"live\"} 4",
        "nodeport_conntrack_entries{map=\"NP_CT_NEW\",state=\"live\"} 2",
        "nodeport_conntrack_connections 3",
        "nodeport_snat_ports_in_use{snat_address=\"198.18.0.1\"} 2",
        "nodeport_snat_ports_max_per_backend{snat_address=\"198.18.0.1\"} 2",
        "nodeport_snat_ports_in_use_by_backend{snat_address=\"198.18.0.1\",backend=\"198.18.2.20:8080\",protocol=\"TCP\"} 2",
        "nodeport_snat_port_capacity 1000",
    ] {
        ensure!(
            text.lines().any(|l| l == line),
            "{line:?} missing from:\n{text}"
        );
    }
    ensure!(
        !text.contains("reason=\"conntrack_promote_failed\""),
        "an event counted as a packet fate:\n{text}"
    );

    // status: fill levels from the maps; no agent has recorded itself yet.
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
    ensure!(used("NP_CT_NEW") == Some((Some(2), 256)), "{:?}", st.maps);
    ensure!(
        used("NP_LOCAL_NETS") == Some((Some(1), 1024)),
        "{:?}",
        st.maps
    );
    // Memory is known for every map; the LPM trie allocates per prefix, and has none yet.
    ensure!(
        st.maps.iter().all(|m| m
            .memory_bytes
            .is_some_and(|b| b > 0 || m.name == "NP_SRC_RANGES" || m.name == "NP_LOCAL_NETS")),
        "memory of every map: {:?}",
        st.maps
    );
    ensure!(
        (st.conntrack.connections, st.conntrack.snat_ports) == (3, 2)
            && st.datapath.snat_port_range == "61000-61999"
            && st.datapath.snat_ports_per_backend == 1000,
        "{:?} {:?}",
        st.conntrack,
        st.datapath
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
    let text = st.render(false);
    ensure!(
        text.contains("agent      9.9.9-abc pid")
            && text.contains("programmed 3 service ports, 3 backends")
            && text.contains("NP_CT           4 / 1024"),
        "{text}"
    );
    Ok(())
}
