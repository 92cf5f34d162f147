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
        &*failed.name == "web" && err.to_string().contains("--maglev-table-size"),
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

/// Creates a map with the raw syscall and pins it at `path`, as an older agent's object did.
fn pin_raw_map(
    path: &std::path::Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    /// The BPF_MAP_CREATE part of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        map_ifindex: u32,
        btf_fd: u32,
        btf_key_type_id: u32,
        btf_value_type_id: u32,
        btf_vmlinux_value_type_id: u32,
        map_extra: u64,
    }
    /// The BPF_OBJ_PIN part.
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        ..MapCreate::default()
    };
    // SAFETY: BPF_MAP_CREATE (0) with an attribute of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut attr as *mut MapCreate,
            size_of::<MapCreate>(),
        )
    };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own; closed when this goes.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_PIN (6) with a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &mut pin as *mut ObjPin,
            size_of::<ObjPin>(),
        )
    };
    ensure!(
        rc == 0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn a_datapath_of_the_old_conntrack_layout_is_refused_with_the_way_out() -> Result<()> {
    require_root();
    let pins = PinDirGuard::new("ol");
    let maps = pins.path().join("maps");
    std::fs::create_dir_all(&maps)?;
    // What the previous version pinned: a 32-byte configuration, NP_CT an LRU of 56-byte
    // values, and no NP_CT_NEW or NP_LOCAL_NETS.
    const ARRAY: u32 = 2;
    const LRU_HASH: u32 = 9;
    pin_raw_map(&maps.join("NP_CONFIG"), ARRAY, 4, 32, 1)?;
    pin_raw_map(
        &maps.join("NP_CT"),
        LRU_HASH,
        16,
        56,
        small_sizing().conntrack,
    )?;
    let err = match Datapath::load(&small_sizing(), Some(pins.path())) {
        Ok(_) => anyhow::bail!("a datapath of the old layout was adopted"),
        Err(e) => e.to_string(),
    };
    for part in [
        "created by an older nodeport version",
        "NP_CONFIG: value size 32, expected 40",
        "NP_CT: type LruHash, expected Hash, value size 56, expected 72",
        "no NP_FE_PORTS",
        "NP_CT_NEW",
        "NP_LOCAL_NETS",
        &format!(
            "run `nodeport-agent detach --bpffs-dir {}`",
            pins.path().display()
        ),
        "then start the agent again",
        "Connections through the old datapath are cut",
    ] {
        ensure!(err.contains(part), "{part:?} missing from: {err}");
    }
    // Nothing was created or changed: the old pins stay, the new maps were not pinned.
    ensure!(maps.join("NP_CT").exists() && maps.join("NP_CONFIG").exists());
    ensure!(!maps.join("NP_CT_NEW").exists() && !maps.join("NP_FRONTENDS").exists());
    Ok(())
}

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn local_nets_follow_the_settings() -> Result<()> {
    require_root();
    let pins = PinDirGuard::new("ln");
    let mut dp = Datapath::load(&small_sizing(), Some(pins.path()))?;
    let mut programmed = Programmed::empty(&dp.sizing);
    let sizing = dp.sizing.clone();
    let prefix = |s: &str| -> Result<nodeport_agent::model::Ipv4Prefix> {
        s.parse().map_err(anyhow::Error::msg)
    };
    let mut settings = test_settings(1, NODE_IP);
    settings.local_nets = [prefix("198.18.0.1/32")?, prefix("10.244.1.0/24")?].into();
    let mut apply = |dp: &mut Datapath, settings: &nodeport_agent::sync::GlobalSettings| {
        Syncer {
            maps: &mut dp.maps,
            sizing: &sizing,
        }
        .apply(&mut programmed, &state(WEB), settings)
    };
    let in_map = |dp: &Datapath| -> Vec<String> {
        let mut v: Vec<String> = dp
            .maps
            .local_nets
            .keys()
            .filter_map(Result::ok)
            .map(|k| {
                format!(
                    "{}/{}",
                    Ipv4Addr::from(u32::from_be(k.data().addr_be)),
                    k.prefix_len()
                )
            })
            .collect();
        v.sort();
        v
    };
    let report = apply(&mut dp, &settings);
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(
        in_map(&dp) == ["10.244.1.0/24", "198.18.0.1/32"],
        "{:?}",
        in_map(&dp)
    );
    // The pod network moves, a second address appears.
    settings.local_nets = [
        prefix("198.18.0.1/32")?,
        prefix("198.18.0.7/32")?,
        prefix("10.244.2.0/24")?,
    ]
    .into();
    let report = apply(&mut dp, &settings);
    ensure!(report.failed.is_empty(), "{:?}", report.failed);
    ensure!(
        in_map(&dp) == ["10.244.2.0/24", "198.18.0.1/32", "198.18.0.7/32"],
        "{:?}",
        in_map(&dp)
    );
    Ok(())
}
