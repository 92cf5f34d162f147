//! The agent's map synchronisation against real, pinned maps: golden dumps after a sequence
//! of changes, a restart that adopts the pins without rewriting anything, deletes that happen
//! while no agent runs, a full map, leftovers of an interrupted run, and packets through the
//! synchronised maps.
//!
//! Golden files live in tests/golden/sync/; NODEPORT_BLESS=1 rewrites them.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result, ensure};
use nodeport_agent::{
    datapath::{Datapath, Sizing},
    dump,
    model::Desired,
    sync::{Programmed, Syncer},
};
use nodeport_common::FrontendKey;
use nodeport_tests::{
    agent::{PinDirGuard, desired, small_sizing, test_settings},
    fixture::{CLIENT_MAC, EXT_MAC, Fixture, Topology, XDP_PASS},
    netns::require_root,
    packet::{Pkt, SYN, parse_checked, sa},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn state(yaml: &str) -> Desired {
    desired(yaml, "node-a", &[NODE_IP])
}

fn golden(name: &str, text: &str) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden/sync")
        .join(format!("{name}.txt"));
    if std::env::var_os("NODEPORT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir"))?;
        std::fs::write(&path, text)?;
        return Ok(());
    }
    let want = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} missing: run with NODEPORT_BLESS=1 to create it",
            path.display()
        )
    })?;
    ensure!(
        text == want,
        "dump differs from {}:\n--- got\n{text}--- want\n{want}",
        path.display()
    );
    Ok(())
}

fn dump_of(dp: &Datapath) -> Result<String> {
    Ok(dump::read(&dp.maps, &dp.sizing, &dump::DumpOptions::default())?.render())
}

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
- { addresses: [198.18.1.10], nodeName: node-a }
- { addresses: [198.18.2.20], nodeName: node-b }
"#;

const DNS: &str = r#"
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

const LB: &str = r#"
kind: Service
apiVersion: v1
metadata: { name: api, namespace: shop }
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: [198.18.0.0/24]
  ports: [ { port: 443, nodePort: 30443 } ]
status: { loadBalancer: { ingress: [ { ip: 198.18.3.3 } ] } }
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: { name: api-1, namespace: shop, labels: { kubernetes.io/service-name: api } }
addressType: IPv4
ports: [ { port: 8443 } ]
endpoints:
- { addresses: [198.18.1.12], nodeName: node-a }
- { addresses: [198.18.2.21], nodeName: node-b }
"#;

fn load(pins: &PinDirGuard) -> Result<Datapath> {
    Ok(Datapath::load(&small_sizing(), Some(pins.path()))?)
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn sync_sequence_restart_and_deletes_while_down() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let pins = PinDirGuard::new("sy");
    let settings = test_settings(topo.ext_ifindex, NODE_IP);

    // 1. Three services.
    let mut dp = load(&pins)?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let all = state(&format!("{WEB}---{DNS}---{LB}"));
    let sizing = dp.sizing.clone();
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(&mut programmed, &all, &settings);
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(report.applied.len() == 4, "{:?}", report.applied);
    golden("1-initial", &dump_of(&dp)?)?;

    // The datapath reads what was written: a SYN to the node port reaches a web backend.
    let mut fx = Fixture::with(dp, &topo)?;
    fx.set_config(settings.config)?;
    let syn =
        Pkt::tcp(sa("198.18.0.100:40000"), sa("198.18.0.1:30080"), SYN).macs(CLIENT_MAC, EXT_MAC);
    let run = fx.xdp(&topo, &syn.bytes())?;
    let dst = parse_checked(&run.frame)?.dst;
    ensure!(
        ["198.18.1.10:8080", "198.18.2.20:8080"].contains(&dst.to_string().as_str()),
        "went to {dst} (action {})",
        run.action
    );
    let mut dp = fx.dp;

    // 2. Endpoints change: one goes, one comes, one terminates; the affinity service loses its
    //    affinity. Unchanged services are not rewritten.
    let changed_web = WEB
        .replace("- { addresses: [198.18.2.20], nodeName: node-b }\n", "")
        .replace(
            "- { addresses: [198.18.1.10], nodeName: node-a }\n",
            "- { addresses: [198.18.1.10], nodeName: node-a, conditions: { ready: false, serving: true, terminating: true } }\n- { addresses: [198.18.1.13], nodeName: node-a }\n",
        );
    let changed = state(&format!(
        "{changed_web}---{DNS}---{}",
        LB.replace("sessionAffinity: ClientIP", "sessionAffinity: None")
    ));
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(&mut programmed, &changed, &settings);
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(
        report.applied.len() == 2 && report.unchanged == 2,
        "applied {:?}, unchanged {}",
        report.applied,
        report.unchanged
    );
    golden("2-endpoints-changed", &dump_of(&dp)?)?;

    // 3. dns goes; web2 takes web's node port as web goes (a frontend moving between
    //    Services is overwritten in place, never missing).
    let web2 = WEB
        .replace("name: web,", "name: web2,")
        .replace("service-name: web", "service-name: web2");
    let moved = state(&format!(
        "{web2}---{}",
        LB.replace("sessionAffinity: ClientIP", "sessionAffinity: None")
    ));
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(&mut programmed, &moved, &settings);
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(report.removed.len() == 3, "{:?}", report.removed);
    golden("3-moved-and-deleted", &dump_of(&dp)?)?;
    let before_restart = dump_of(&dp)?;

    // 4. Restart: a new agent adopts the pins; applying the same state writes nothing.
    drop(dp);
    let mut dp = load(&pins)?;
    let (mut adopted, orphans) = Programmed::adopt(&dp.maps, &dp.sizing)?;
    ensure!(orphans.is_empty(), "{orphans:?}");
    ensure!(
        dump_of(&dp)? == before_restart,
        "the pins did not keep the state"
    );
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(&mut adopted, &moved, &settings);
    ensure!(
        report.failed.is_empty() && report.applied.is_empty() && report.removed.is_empty(),
        "a restart rewrote: {report:?}"
    );
    ensure!(
        dump_of(&dp)? == before_restart,
        "a restart changed the maps"
    );

    // 5. Deleted while no agent ran: the next agent removes it.
    drop(dp);
    let only_web2 = state(&web2);
    let mut dp = load(&pins)?;
    let (mut adopted, _) = Programmed::adopt(&dp.maps, &dp.sizing)?;
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(&mut adopted, &only_web2, &settings);
    ensure!(
        report.removed.len() == 1 && report.applied.is_empty(),
        "{report:?}"
    );
    golden("5-deleted-while-down", &dump_of(&dp)?)?;

    // detach removes every pin and the directory.
    drop(dp);
    nodeport_agent::datapath::detach(pins.path())?;
    ensure!(
        !pins.path().exists(),
        "detach left {}",
        pins.path().display()
    );
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn a_full_map_leaves_no_service_half_programmed() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let pins = PinDirGuard::new("fu");
    // Room for 3 frontends: web takes 1 (one node address), dns 2; api needs 2 more.
    let small = Sizing {
        frontends: 3,
        ..small_sizing()
    };
    let mut dp = Datapath::load(&small, Some(pins.path()))?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let sizing = dp.sizing.clone();
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(
        &mut programmed,
        &state(&format!("{WEB}---{DNS}---{LB}")),
        &test_settings(topo.ext_ifindex, NODE_IP),
    );
    ensure!(report.applied.len() == 3, "{:?}", report.applied);
    let (failed, err) = report.failed.first().context("api should not fit")?;
    ensure!(
        failed.to_string() == "shop/api/TCP" && err.is_full(),
        "{failed}: {err}"
    );
    ensure!(
        err.to_string().contains("--max-frontends"),
        "the error names the flag: {err}"
    );
    // No trace of api: no name, no backends, no ranges, no frontend.
    let text = dump_of(&dp)?;
    ensure!(
        !text.contains("api") && !text.contains("198.18.1.12") && !text.contains("198.18.0.0/24"),
        "{text}"
    );
    ensure!(dp.maps.frontends.keys().count() == 3);
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn more_backends_than_maglev_slots_is_refused_not_a_crash() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let pins = PinDirGuard::new("mx");
    let mut dp = load(&pins)?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let sizing = dp.sizing.clone();
    // 40 ready endpoints, a table of 31 slots.
    let endpoints: String = (1..=40)
        .map(|i| format!("- {{ addresses: [198.18.1.{i}], nodeName: node-a }}\n"))
        .collect();
    let big = WEB.replace(
        "endpoints:\n- { addresses: [198.18.1.10], nodeName: node-a }\n- { addresses: [198.18.2.20], nodeName: node-b }\n",
        &format!("endpoints:\n{endpoints}"),
    );
    ensure!(big != WEB, "the fixture edit did not apply");
    let report = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(
        &mut programmed,
        &state(&big),
        &test_settings(topo.ext_ifindex, NODE_IP),
    );
    let (failed, err) = report
        .failed
        .first()
        .context("40 backends should not fit 31 slots")?;
    ensure!(
        failed.name == "web" && err.to_string().contains("--maglev-table-size"),
        "{failed}: {err}"
    );
    ensure!(
        dump_of(&dp)? == "no services\n",
        "a refused service left a trace:\n{}",
        dump_of(&dp)?
    );
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn leftovers_of_an_interrupted_run_are_removed() -> Result<()> {
    require_root();
    let topo = Topology::new()?;
    let pins = PinDirGuard::new("or");
    let mut dp = load(&pins)?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let sizing = dp.sizing.clone();
    Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .apply(
        &mut programmed,
        &state(WEB),
        &test_settings(topo.ext_ifindex, NODE_IP),
    );
    // A crash between writing a frontend and naming its service leaves an orphan.
    let orphan_key = FrontendKey::new(u32::from(Ipv4Addr::new(198, 18, 9, 9)).to_be(), 9999, 6);
    let mut orphan = dp.maps.frontends.iter().next().context("a frontend")??.1;
    orphan.svc_id = 31;
    dp.maps.frontends.insert(orphan_key, orphan, 0)?;
    drop(dp);

    let mut dp = load(&pins)?;
    let (adopted, orphans) = Programmed::adopt(&dp.maps, &dp.sizing)?;
    ensure!(orphans.len() == 1, "{orphans:?}");
    ensure!(adopted.services.len() == 1);
    let removed = Syncer {
        maps: &mut dp.maps,
        sizing: &sizing,
    }
    .remove_orphans(orphans);
    ensure!(
        removed == 1 && dp.maps.frontends.get(&orphan_key, 0).is_err(),
        "orphan still there"
    );
    ensure!(dp.maps.frontends.keys().count() == 1);
    let _ = XDP_PASS;
    Ok(())
}
