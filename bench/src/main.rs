//! `cargo xtask bench`: the datapath, nanoseconds per packet with BPF_PROG_TEST_RUN, and the
//! agent, how long programming services and applying an EndpointSlice change take.
//!
//! Datapath: every figure is the kernel's own mean over `repeat = 1,000,000` runs, the median
//! of several such runs. Paths that rewrite the packet run through the bench build's entry
//! point, which restores the packet from a template first (BPF_PROG_TEST_RUN does not restore it
//! between repetitions); the restore's own cost is measured and taken off (see
//! nodeport_common::bench). Established connections are opened by a real handshake (SYN,
//! SYN-ACK, ACK) so that they live in `NP_CT`; the established table is filled to its last
//! entry before the new-flow cases, which give every repetition a new client (a spoofed SYN
//! flood as one core's XDP program sees it): churning the handshake LRU, held by it, without
//! the tail call, and to a remote backend (SNAT). A second case opens connections from new
//! clients to one remote backend until its SNAT ports run out. Results go to
//! `<out dir>/<date>-datapath.md`.
//!
//! Agent (module `agent`): 10,000 NodePort Services programmed into empty maps, then 1,000
//! EndpointSlice changes, through the agent's own reconciler and syncer against a loaded
//! datapath. Results go to `<out dir>/<date>-agent.md`.
//!
//! Loader (module `loader`): the manifests loader on a normal directory and with one
//! pathological file (nested 100,000 deep) next to the normal one. Results go to
//! `<out dir>/<date>-loader.md`.
//!
//! SNAT path (module `snat`): short connections to a Service with a pod on another node,
//! nodeport against kube-proxy's DNAT + MASQUERADE, in the end-to-end tests' two-node lab;
//! 20,000 requests by 16 clients, then 60 s of new connections to a remote backend. Results go
//! to `<out dir>/<date>-snat.md`.
//!
//! Comparison (module `compare`): nodeport against kube-proxy's iptables rules, side by side
//! on one namespace topology with real traffic; writes `bench/REPORT.md` and `bench/plots/`.
//!
//! Environment (xtask sets the first three):
//! - `NODEPORT_BENCH_OBJECT`: the bench build of the eBPF object (datapath part);
//! - `NODEPORT_EBPF_OBJECT`: the plain eBPF object (agent and comparison parts);
//! - `NODEPORT_AGENT_BIN`: the agent binary the comparison starts;
//! - `NODEPORT_BENCH_ONLY=agent`, `=datapath`, `=loader`, `=snat`, `=offloads` or `=compare`: run only that
//!   part (default: all), e.g. `NODEPORT_BENCH_ONLY=compare cargo xtask bench`; `=memory`:
//!   only the agent part's memory rows (the agent process's RSS), to
//!   `<out dir>/<date>-agent-memory.md`;
//! - `NODEPORT_BENCH_RSS_SERVICES=10000,65536`: the sizes of the memory rows (`0`: none);
//! - `NODEPORT_BENCH_SERVICES=1,1000`: the datapath part at these service counts only;
//! - `NODEPORT_BENCH_DATAPATH=rows` or `=snat-capacity`: only the per-packet rows, or only the
//!   SNAT port capacity of one remote backend (default: both), e.g.
//!   `NODEPORT_BENCH_ONLY=datapath NODEPORT_BENCH_DATAPATH=snat-capacity cargo xtask bench`;
//! - `NODEPORT_BENCH_FLOOD_RATE=15000`: spoofed SYNs per second of the SNAT part's flood case
//!   (0: as fast as one raw socket goes);
//! - `NODEPORT_BENCH_SNAT_AGENT_ARGS="--conntrack-tcp-closing-timeout 1"`: extra agent flags in
//!   the SNAT part (experiments);
//! - `NODEPORT_BENCH_ANY_ACTION=1`: the datapath part does not check the XDP verdicts;
//! - `NODEPORT_BENCH_QUICK=1`: a short comparison for development (2 rounds, 1 and 1,000
//!   Services, shorter runs); its report goes to a temporary directory, never bench/; the
//!   datapath part then runs 3 rounds at 1 and 65,536 Services;
//! - `NODEPORT_BENCH_COMPARE_SERVICES=1,1000,10000`, `NODEPORT_BENCH_NODEPORT_ONLY_SERVICES=65536`,
//!   `NODEPORT_BENCH_ROUNDS=5`, `NODEPORT_BENCH_WORKERS=2`, `NODEPORT_BENCH_BIG_MAGLEV_SIZE=31`:
//!   the comparison's sizes, rounds, parallel clients, and Maglev M at nodeport-only sizes;
//! - `NODEPORT_BENCH_REPORT_DIR`: where REPORT.md and plots/ go (default: the parent of the
//!   results directory, i.e. bench/).

mod agent;
mod compare;
mod loader;
mod offloads;
mod snat;

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result, ensure};
use nodeport_agent::datapath::{Datapath, Sizing, conntrack::CtTable};
use nodeport_common::{
    CT_DIR_FORWARD, Counter, CtEntry, CtKey, DatapathConfig, IPPROTO_TCP, IPPROTO_UDP,
    bench::{BenchTemplate, FRAME_LEN, TEMPLATE_MAP, programs as bench_programs},
    programs,
};
use nodeport_tests::{
    fixture::{
        CLIENT_MAC, EXT_MAC, Fixture, NODE2_MAC, POD_HOST_MAC, POD_MAC, ServiceSpec,
        TC_ACT_REDIRECT, Topology, XDP_DROP, XDP_PASS, XDP_TX, local, remote, run_tc, run_xdp,
    },
    netns::require_root,
    packet::{ACK, Pkt, SYN, SYN_ACK, parse_checked, sa},
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 11;
const SERVICE_COUNTS: &[u32] = &[1, 1_000, 10_000, 65_536];
/// Small: per-packet cost does not depend on M, and 65,536 tables of it must fit in memory.
const MAGLEV_SIZE: u32 = 31;

struct Row {
    services: u32,
    bare: f64,
    restore: f64,
    /// The restore with a new client address written each repetition.
    restore_vary: f64,
    no_service: f64,
    /// Established connections (after SYN, SYN-ACK, ACK: in `NP_CT`).
    established_remote: f64,
    established_local: f64,
    /// A client packet of a connection the backend never answered (in `NP_CT_NEW`): what the
    /// previous bench called established (its connections were opened by a lone ACK).
    unanswered_local: f64,
    /// A new client every repetition, `NP_CT` full, the handshake LRU churning (1M SYNs).
    new_flow_local: f64,
    /// The same, the handshake table emptied before a run that it holds whole.
    new_flow_local_hold: f64,
    /// The same as `new_flow_local` with `NP_CT` holding only the bench's 2 connections.
    new_flow_local_empty: f64,
    /// The same as `new_flow_local` through `np_xdp_new` directly: no tail call, no lookups
    /// before it.
    new_flow_local_direct: f64,
    /// A new client every repetition to a remote backend (SNAT port search), LRU churning.
    new_flow_remote: f64,
    /// The conntrack operations a new connection needs, alone (`np_bench_ct_floor`), on the
    /// same tables as `new_flow_local`.
    ct_floor: f64,
    /// Of those, the forward and the reply key looked up in the full established table.
    ct_absent: f64,
    /// The TC hook (`np_tc_ext_nat`) on the same established connections: its cost beyond the
    /// TC restore-only program (which is what a bare TC program plus the restore costs).
    tc_established_remote: f64,
    tc_established_local: f64,
    tc_restore: f64,
    /// A UDP flow to a local pod, unfragmented, and the two fragments of one of its datagrams.
    udp_local: f64,
    first_fragment_local: f64,
    later_fragment_local: f64,
    /// The action the remote new flows ended with (XDP_TX, or XDP_DROP once SNAT ports ran out).
    new_flow_remote_action: u32,
    /// The share of those SYNs dropped for want of a SNAT port.
    new_flow_remote_drops: f64,
}

/// How many concurrent connections one remote backend port takes: SYNs from new clients, one
/// at a time, each holding its SNAT port (the handshake table holds them all), until the
/// ports run out.
struct SnatCapacity {
    span: u32,
    attempts: u32,
    /// The number of connections held when the first SYN was dropped for want of a port.
    first_drop_at: Option<u32>,
    held: u32,
    /// Drops among the first `span` attempts.
    drops_within_span: u32,
}

/// Opens connections from new clients to one remote backend until `attempts` SYNs went
/// through the production XDP program (one BPF_PROG_TEST_RUN each).
fn snat_capacity(object: &[u8], topo: &Topology, attempts: u32) -> Result<SnatCapacity> {
    let sizing = Sizing {
        frontends: 16,
        services: 16,
        backends: 16,
        maglev_size: MAGLEV_SIZE,
        source_ranges: 16,
        conntrack: CONNTRACK,
        conntrack_new: 2 * attempts + 1024,
        affinity: 1024,
    };
    let dp = Datapath::load_object(object, &sizing, None)?;
    let mut fx = Fixture::with(dp, topo)?;
    let cfg = production_config(&fx);
    let span = cfg.snat_span();
    fx.set_config(cfg)?;
    fx.add_service(&ServiceSpec::new(
        0,
        &vip(0),
        IPPROTO_TCP,
        vec![remote(1, &remote_backend(0))],
    ))?;
    let mut out = SnatCapacity {
        span,
        attempts,
        first_drop_at: None,
        held: 0,
        drops_within_span: 0,
    };
    for i in 0..attempts {
        let client = Ipv4Addr::from(0x6440_0000 + i);
        let syn = Pkt::tcp(
            std::net::SocketAddrV4::new(client, CLIENT_PORT),
            sa(&vip(0)),
            SYN,
        )
        .macs(CLIENT_MAC, EXT_MAC);
        let run = fx.xdp(topo, &syn.bytes())?;
        match run.action {
            XDP_TX => out.held += 1,
            XDP_DROP => {
                out.first_drop_at.get_or_insert(out.held);
                if i < span {
                    out.drops_within_span += 1;
                }
            }
            other => anyhow::bail!("SYN {i} to a remote backend: action {other}"),
        }
    }
    Ok(out)
}

fn vip(i: u32) -> String {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    format!("{ip}:80")
}

const CLIENT_PORT: u16 = 40000;
const LOCAL_POD: &str = "198.18.1.10:8080";
const LOCAL_UDP_POD: &str = "198.18.1.10:5353";
/// TC verdicts as BPF_PROG_TEST_RUN reports them: TC_ACT_UNSPEC (-1) and TC_ACT_REDIRECT.
const TC_PASS: u32 = u32::MAX;
const TC_REDIRECT: u32 = TC_ACT_REDIRECT as u32;

fn remote_backend(i: u32) -> String {
    format!("198.18.2.{}:8080", 1 + i % 250)
}

/// A 64-byte packet from the client's port `sport` to `dst`.
fn pkt(sport: u16, dst: &str, flags: nodeport_tests::packet::TcpFlags) -> Pkt {
    Pkt::tcp(sa(&format!("198.18.0.100:{sport}")), sa(dst), flags)
        .macs(CLIENT_MAC, EXT_MAC)
        .payload(&[0; 10])
}

fn frame(sport: u16, dst: &str, flags: nodeport_tests::packet::TcpFlags) -> Vec<u8> {
    let bytes = pkt(sport, dst, flags).bytes();
    assert_eq!(bytes.len(), FRAME_LEN);
    bytes
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One measured path: which program, on which frame, with which template restored.
struct Scenario {
    program: &'static str,
    frame: Vec<u8>,
    template: Option<(Vec<u8>, bool)>,
    /// The verdict every run must end with; None: any (the last one is reported).
    expect: Option<u32>,
    repeat: u32,
    /// Empty the handshake table (`NP_CT_NEW`) before each run.
    clear_handshake: bool,
    /// A TC program (BPF_PROG_TEST_RUN of an skb) rather than XDP.
    tc: bool,
}

impl Scenario {
    fn new(program: &'static str, frame: &[u8], expect: u32) -> Self {
        Self {
            program,
            frame: frame.to_vec(),
            template: None,
            expect: Some(expect),
            repeat: REPEAT,
            clear_handshake: false,
            tc: false,
        }
    }

    /// A TC program behind the TC entry point that restores `frame` first.
    fn tc_restored(program: &'static str, frame: &[u8], expect: u32) -> Self {
        Self {
            tc: true,
            ..Self::restored(program, frame, false, expect)
        }
    }

    /// Behind the bench entry point that restores `frame` first (and varies the client).
    fn restored(program: &'static str, frame: &[u8], vary_client: bool, expect: u32) -> Self {
        Self {
            template: Some((frame.to_vec(), vary_client)),
            ..Self::new(program, frame, expect)
        }
    }
}

type Template = aya::maps::Array<aya::maps::MapData, BenchTemplate>;

fn set_template(template: &mut Template, frame: &[u8], vary_client: bool) -> Result<()> {
    let mut t = BenchTemplate {
        frame: [0; FRAME_LEN],
        vary_client: u32::from(vary_client),
        _pad: 0,
    };
    t.frame.copy_from_slice(frame);
    template.set(0, t, 0)?;
    Ok(())
}

/// Deletes every entry of the handshake table.
fn clear_handshake(fx: &mut Fixture) -> Result<()> {
    let map = fx.conntrack_map(CtTable::Handshake);
    let keys: Vec<CtKey> = map.keys().collect::<Result<_, _>>()?;
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}

fn snat_drops(fx: &Fixture) -> Result<u64> {
    Ok(fx
        .counters()?
        .get(&Counter::DroppedSnatExhausted)
        .copied()
        .unwrap_or(0))
}

/// One scenario's figures: the median ns, the verdict of its last run, and the share of its
/// repetitions dropped for want of a SNAT port.
struct Measured {
    ns: f64,
    action: u32,
    snat_drop_share: f64,
}

/// Kernel-measured mean ns per repetition of each scenario, the median over ROUNDS rounds,
/// and the verdict of its last run. Rounds interleave the scenarios, so a noisy moment of the
/// machine hits all of them alike.
fn measure_all(
    fx: &mut Fixture,
    template: &mut Template,
    topo: &Topology,
    scenarios: &[Scenario],
) -> Result<Vec<Measured>> {
    let mut samples = vec![Vec::new(); scenarios.len()];
    let mut actions = vec![0; scenarios.len()];
    let mut drops = vec![0u64; scenarios.len()];
    for round in 0..rounds() {
        for (i, s) in scenarios.iter().enumerate() {
            if let Some((frame, vary)) = &s.template {
                set_template(template, frame, *vary)?;
            }
            if s.clear_handshake {
                clear_handshake(fx)?;
            }
            let before = snat_drops(fx)?;
            let (action, duration) = if s.tc {
                let prog = fx.dp.tc_program(s.program)?;
                let run = run_tc(prog, topo, topo.ext_ifindex, &s.frame, 0, s.repeat)?;
                (run.ret as u32, run.duration)
            } else {
                let prog = fx.dp.xdp_program(s.program)?;
                let run = run_xdp(prog, &topo.ns, topo.ext_ifindex, &s.frame, s.repeat)?;
                (run.action, run.duration)
            };
            // The first round fills the tables: the share is that of the rounds after it.
            if round > 0 {
                drops[i] += snat_drops(fx)? - before;
            }
            // NODEPORT_BENCH_ANY_ACTION=1 for experiments that change where packets go.
            if let Some(expect) = s.expect
                && std::env::var_os("NODEPORT_BENCH_ANY_ACTION").is_none()
            {
                ensure!(
                    action == expect,
                    "{}: action {action} (expected {expect})",
                    s.program,
                );
            }
            actions[i] = action;
            samples[i].push(duration.as_nanos() as f64);
        }
    }
    Ok(samples
        .into_iter()
        .zip(actions)
        .zip(drops)
        .zip(scenarios)
        .map(|(((v, action), dropped), s)| Measured {
            ns: median(v),
            action,
            snat_drop_share: dropped as f64
                / (f64::from(s.repeat) * rounds().saturating_sub(1).max(1) as f64),
        })
        .collect())
}

/// A UDP datagram to a local pod's frontend, 64 bytes on the wire, and the two fragments of a
/// longer one, each padded to 64 bytes (Ethernet padding: the IPv4 total length is shorter).
fn udp_frames(frontend: &str) -> Result<[Vec<u8>; 3]> {
    let datagram = |len: usize| {
        Pkt::udp(sa("198.18.0.100:40000"), sa(frontend))
            .macs(CLIENT_MAC, EXT_MAC)
            .payload(&vec![b'u'; len])
            .may_fragment()
            .bytes()
    };
    let whole = datagram(FRAME_LEN - 42);
    let fragments = nodeport_tests::packet::fragment(&datagram(40), 24);
    ensure!(fragments.len() == 2, "{} fragments", fragments.len());
    let pad = |mut f: Vec<u8>| {
        f.resize(FRAME_LEN, 0);
        f
    };
    let mut it = fragments.into_iter();
    let first = pad(it.next().expect("two"));
    let later = pad(it.next().expect("two"));
    Ok([whole, first, later])
}

/// The production SNAT ranges (the agent's default `--snat-port-range`): 33,512 ports.
fn production_config(fx: &Fixture) -> DatapathConfig {
    DatapathConfig {
        snat_port_min: 1024,
        snat_port_max: 29_999,
        snat_port_min2: 61_000,
        snat_port_max2: 65_535,
        ..fx.config
    }
}

const CONNTRACK: u32 = 262_144;
const CONNTRACK_NEW: u32 = 65_536;
/// Repetitions of the new-flow case whose handshake table holds the whole run (two entries
/// per new flow, the table emptied before).
const HOLD_REPEAT: u32 = CONNTRACK_NEW / 2 - 64;
/// Repetitions of the new-flow case to a remote backend.
const REMOTE_NEW_REPEAT: u32 = 250_000;

/// SYN, the backend's SYN-ACK, the client's ACK: the connection of `ack` (a client packet to
/// `backend`'s service) ends up in `NP_CT`. Returns the SNAT port for a remote backend.
fn establish(
    fx: &mut Fixture,
    topo: &Topology,
    dst: &str,
    backend: &str,
    local: bool,
) -> Result<()> {
    let ack = pkt(CLIENT_PORT, dst, ACK);
    let run = fx.xdp(topo, &pkt(CLIENT_PORT, dst, SYN).bytes())?;
    let client = ack.src;
    if local {
        ensure!(
            run.action == XDP_PASS,
            "SYN to a local pod: action {}",
            run.action
        );
        let syn_ack = Pkt::tcp(sa(backend), client, SYN_ACK).macs(POD_MAC, POD_HOST_MAC);
        let (ret, _) = fx.tc_pod(topo, &syn_ack.bytes())?;
        ensure!(
            ret == TC_ACT_REDIRECT,
            "SYN-ACK from the pod: tc verdict {ret}"
        );
    } else {
        ensure!(
            run.action == XDP_TX,
            "SYN to a remote pod: action {}",
            run.action
        );
        let snat = parse_checked(&run.frame)?.src;
        let syn_ack = Pkt::tcp(sa(backend), snat, SYN_ACK).macs(NODE2_MAC, EXT_MAC);
        let run = fx.xdp(topo, &syn_ack.bytes())?;
        ensure!(
            run.action == XDP_TX,
            "SYN-ACK from the remote pod: action {}",
            run.action
        );
    }
    fx.xdp(topo, &ack.bytes())?;
    let key = CtKey {
        saddr_be: u32::from(*client.ip()).to_be(),
        daddr_be: u32::from(*ack.dst.ip()).to_be(),
        sport_be: client.port().to_be(),
        dport_be: ack.dst.port().to_be(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    ensure!(
        fx.conntrack_map(CtTable::Established).get(&key, 0).is_ok(),
        "the connection to {backend} did not reach the established table"
    );
    Ok(())
}

/// Fills `NP_CT` to its last entry with connections of other clients.
fn fill_established(fx: &mut Fixture) -> Result<u32> {
    let map = fx.conntrack_map(CtTable::Established);
    let mut n = map.keys().count() as u32;
    let mut i = 0u32;
    while n < CONNTRACK {
        let key = CtKey {
            saddr_be: (0x0a00_0000 + i / 2).to_be(),
            daddr_be: u32::from(Ipv4Addr::new(198, 19, 255, 1)).to_be(),
            sport_be: 1234u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: IPPROTO_TCP,
            dir: (i % 2) as u8,
            _pad: 0,
        };
        i += 1;
        if map.insert(key, CtEntry::default(), 0).is_err() {
            break;
        }
        n += 1;
    }
    Ok(n)
}

fn bench_at(object: &[u8], topo: &Topology, n: u32) -> Result<Row> {
    let sizing = Sizing {
        frontends: n + 16,
        services: n + 16,
        backends: n + 16,
        maglev_size: MAGLEV_SIZE,
        source_ranges: 16,
        conntrack: CONNTRACK,
        conntrack_new: CONNTRACK_NEW,
        affinity: 1024,
    };
    let mut dp = Datapath::load_object(object, &sizing, None)?;
    for p in [
        bench_programs::XDP_EXTERNAL,
        bench_programs::RESTORE_ONLY,
        bench_programs::XDP_NEW_CONNECTION,
        bench_programs::CONNTRACK_FLOOR,
        bench_programs::ESTABLISHED_ABSENT,
    ] {
        dp.load_extra_xdp(p)?;
    }
    for p in [bench_programs::TC_EXTERNAL, bench_programs::TC_RESTORE_ONLY] {
        dp.load_extra_tc(p)?;
    }
    // The TC entry points tail-call the production program (slot 0) and a trivial one (1).
    let tc_programs = dp
        .take_extra_map(nodeport_common::bench::TC_PROGRAMS_MAP)
        .context("the bench object has no TC program array")?;
    let mut tc_programs = aya::maps::ProgramArray::try_from(tc_programs)?;
    for (slot, name) in [(0, programs::TC_EXTERNAL_NAT), (1, programs::TC_DRAIN)] {
        let fd = dp.tc_program(name)?.fd()?.try_clone()?;
        tc_programs.set(slot, &fd, 0)?;
    }
    let map = dp
        .take_extra_map(TEMPLATE_MAP)
        .context("the bench object has no template map")?;
    let mut template = Template::try_from(map)?;
    let mut fx = Fixture::with(dp, topo)?;
    fx.set_config(production_config(&fx))?;
    // n services on VIPs, each with a remote backend; service n has a local pod.
    for i in 0..n {
        let backend = remote(i + 1, &remote_backend(i));
        fx.add_service(&ServiceSpec::new(i, &vip(i), IPPROTO_TCP, vec![backend]))?;
    }
    fx.add_service(&ServiceSpec::new(
        n,
        &vip(n),
        IPPROTO_TCP,
        vec![local(n + 1, LOCAL_POD)],
    ))?;
    // A UDP service with a local pod, for datagrams and fragments.
    fx.add_service(&ServiceSpec::new(
        n + 1,
        &vip(n + 1),
        IPPROTO_UDP,
        vec![local(n + 2, LOCAL_UDP_POD)],
    ))?;
    let [udp_frame, first_fragment, later_fragment] = udp_frames(&vip(n + 1))?;

    // Established: opened by a handshake, so in NP_CT; the repetitions are data packets.
    let remote_frame = frame(CLIENT_PORT, &vip(n / 2), ACK);
    let local_frame = frame(CLIENT_PORT, &vip(n), ACK);
    establish(&mut fx, topo, &vip(n / 2), &remote_backend(n / 2), false)?;
    establish(&mut fx, topo, &vip(n), LOCAL_POD, true)?;
    // A connection whose SYN the backend never answered: it stays in NP_CT_NEW, and the
    // repetitions are its retransmitted SYN. (A lone ACK starts no connection: `not_syn`.)
    let unanswered_frame = frame(CLIENT_PORT + 1, &vip(n), SYN);
    fx.xdp(topo, &unanswered_frame)?;
    let new_local = frame(CLIENT_PORT, &vip(n), SYN);
    let new_remote = frame(CLIENT_PORT, &vip(n / 2), SYN);
    // The new-flow case once more with the established table (nearly) empty: how much the
    // full table's cache misses cost.
    let empty = measure_all(
        &mut fx,
        &mut template,
        topo,
        &[
            Scenario::restored(bench_programs::RESTORE_ONLY, &new_local, true, XDP_PASS),
            Scenario::restored(bench_programs::XDP_EXTERNAL, &new_local, true, XDP_PASS),
        ],
    )?;
    // The restore's overhead over bare comes off below, with bare known.
    let new_flow_local_empty = empty[1].ns - empty[0].ns;
    let filled = fill_established(&mut fx)?;
    ensure!(
        filled == CONNTRACK,
        "the established table took {filled} of {CONNTRACK} entries"
    );
    let scenarios = [
        Scenario::new(programs::XDP_PASS, &remote_frame, XDP_PASS),
        Scenario::new(
            programs::XDP_EXTERNAL,
            &frame(22, "198.18.0.1:22", SYN),
            XDP_PASS,
        ),
        Scenario::restored(bench_programs::RESTORE_ONLY, &remote_frame, false, XDP_PASS),
        Scenario::restored(bench_programs::RESTORE_ONLY, &new_local, true, XDP_PASS),
        Scenario::restored(bench_programs::XDP_EXTERNAL, &remote_frame, false, XDP_TX),
        Scenario::restored(bench_programs::XDP_EXTERNAL, &local_frame, false, XDP_PASS),
        Scenario::restored(
            bench_programs::XDP_EXTERNAL,
            &unanswered_frame,
            false,
            XDP_PASS,
        ),
        // A new client every repetition: selection, the handshake table's inserts (the LRU
        // evicts once full), the established table full.
        Scenario::restored(bench_programs::XDP_EXTERNAL, &new_local, true, XDP_PASS),
        Scenario {
            repeat: HOLD_REPEAT,
            clear_handshake: true,
            ..Scenario::restored(bench_programs::XDP_EXTERNAL, &new_local, true, XDP_PASS)
        },
        Scenario::restored(
            bench_programs::XDP_NEW_CONNECTION,
            &new_local,
            true,
            XDP_PASS,
        ),
        // The floor under the new-flow figure: the conntrack operations alone, churning the
        // same handshake LRU; and the two lookups in the full established table alone.
        Scenario::restored(bench_programs::CONNTRACK_FLOOR, &new_local, true, XDP_PASS),
        Scenario::restored(
            bench_programs::ESTABLISHED_ABSENT,
            &new_local,
            true,
            XDP_PASS,
        ),
        // Spoofed SYNs to a remote backend: the SNAT port search. Drops once the ports run
        // out (every handshake holds one until the LRU evicts it). Fewer repetitions: at
        // several µs each, a million would take most of the part's time; the handshake table is
        // full after the first 32,768 either way.
        Scenario {
            expect: None,
            repeat: REMOTE_NEW_REPEAT,
            ..Scenario::restored(bench_programs::XDP_EXTERNAL, &new_remote, true, XDP_TX)
        },
        // The TC hook on the same established connections, and its restore-only baseline.
        Scenario::tc_restored(bench_programs::TC_RESTORE_ONLY, &remote_frame, TC_PASS),
        Scenario::tc_restored(bench_programs::TC_EXTERNAL, &remote_frame, TC_REDIRECT),
        Scenario::tc_restored(bench_programs::TC_EXTERNAL, &local_frame, TC_REDIRECT),
        // UDP to a local pod: a whole datagram, a first fragment, a later fragment.
        Scenario::restored(bench_programs::XDP_EXTERNAL, &udp_frame, false, XDP_PASS),
        Scenario::restored(
            bench_programs::XDP_EXTERNAL,
            &first_fragment,
            false,
            XDP_PASS,
        ),
        Scenario::restored(
            bench_programs::XDP_EXTERNAL,
            &later_fragment,
            false,
            XDP_PASS,
        ),
    ];
    let t = measure_all(&mut fx, &mut template, topo, &scenarios)?;
    let (bare, no_service, restore, restore_vary) = (t[0].ns, t[1].ns, t[2].ns, t[3].ns);
    // The restore is part of the bench entry point, not of the datapath: take it off.
    let overhead = (restore - bare).max(0.0);
    let overhead_vary = (restore_vary - bare).max(0.0);
    Ok(Row {
        services: n,
        bare,
        restore,
        restore_vary,
        no_service,
        established_remote: t[4].ns - overhead,
        established_local: t[5].ns - overhead,
        unanswered_local: t[6].ns - overhead,
        new_flow_local: t[7].ns - overhead_vary,
        new_flow_local_hold: t[8].ns - overhead_vary,
        new_flow_local_direct: t[9].ns - overhead_vary,
        ct_floor: t[10].ns - overhead_vary,
        ct_absent: t[11].ns - overhead_vary,
        new_flow_remote: t[12].ns - overhead_vary,
        new_flow_local_empty: new_flow_local_empty + bare,
        tc_restore: t[13].ns,
        tc_established_remote: t[14].ns - t[13].ns,
        tc_established_local: t[15].ns - t[13].ns,
        udp_local: t[16].ns - overhead,
        first_fragment_local: t[17].ns - overhead,
        later_fragment_local: t[18].ns - overhead,
        new_flow_remote_action: t[12].action,
        new_flow_remote_drops: t[12].snat_drop_share,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct.
    unsafe { libc::uname(&mut uts) };
    let field = |f: &[libc::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    format!(
        "{} ({cpu}, {cores} cores), Linux {}",
        field(&uts.nodename),
        field(&uts.release)
    )
}

fn today() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "undated".into())
}

/// Which parts to run (NODEPORT_BENCH_ONLY).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    All,
    Datapath,
    Agent,
    Loader,
    /// Only the agent part's memory rows.
    Memory,
    Compare,
    Snat,
    Offloads,
}

fn main() -> Result<()> {
    require_root();
    let began = std::time::Instant::now();
    let out_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: nodeport-bench <results dir>")?,
    );
    let parts = match std::env::var("NODEPORT_BENCH_ONLY").as_deref() {
        Err(_) | Ok("") => Parts::All,
        Ok("datapath") => Parts::Datapath,
        Ok("agent") => Parts::Agent,
        Ok("loader") => Parts::Loader,
        Ok("memory") => Parts::Memory,
        Ok("compare") => Parts::Compare,
        Ok("snat") => Parts::Snat,
        Ok("offloads") => Parts::Offloads,
        Ok(other) => {
            anyhow::bail!(
                "NODEPORT_BENCH_ONLY={other}: expected agent, memory, datapath, loader, snat, \
                 offloads or compare"
            )
        }
    };
    let runs = |part: Parts| parts == Parts::All || parts == part;
    let date = today();
    std::fs::create_dir_all(&out_dir)?;
    let mut datapath_rows = None;
    // Sections of the other parts that go into the comparison's report too.
    let mut extra_pages = Vec::new();
    if runs(Parts::Datapath) {
        let (rows, md) = datapath(&date)?;
        if let Some(i) = md.find("## SNAT ports") {
            extra_pages.push(md[i..].to_owned());
        }
        write_results(&out_dir, &format!("{date}-datapath.md"), &md)?;
        datapath_rows = Some(rows);
    }
    let object = || -> Result<Vec<u8>> {
        let object_path = std::env::var("NODEPORT_EBPF_OBJECT")
            .context("NODEPORT_EBPF_OBJECT (set by cargo xtask bench)")?;
        std::fs::read(&object_path).with_context(|| format!("reading {object_path}"))
    };
    let mut agent_summary = None;
    if runs(Parts::Agent) {
        let results = agent::run(&object()?)?;
        agent_summary = Some(agent::summary(&results));
        let md = agent::render(&results, &date, &machine())?;
        write_results(&out_dir, &format!("{date}-agent.md"), &md)?;
    }
    if runs(Parts::Loader) {
        let results = loader::run()?;
        eprintln!("bench: {}", loader::summary(&results));
        let md = loader::render(&results, &date)?;
        write_results(&out_dir, &format!("{date}-loader.md"), &md)?;
    }
    if parts == Parts::Memory {
        let md = agent::render_memory_only(&date, &machine())?;
        write_results(&out_dir, &format!("{date}-agent-memory.md"), &md)?;
    }
    if runs(Parts::Snat) {
        let results = snat::run(quick())?;
        let md = snat::render(&results, &date, &machine())?;
        extra_pages.push(md.clone());
        let name = if quick() {
            // A quick run is for development: it never overwrites published results.
            std::env::temp_dir().join(format!("{date}-snat.md"))
        } else {
            out_dir.join(format!("{date}-snat.md"))
        };
        std::fs::write(&name, &md)?;
        println!("{md}\nbench: results written to {}", name.display());
    }
    if runs(Parts::Offloads) {
        let results = offloads::run(quick())?;
        eprintln!("bench: offloads: {}", offloads::summary(&results));
        let md = offloads::render(&results, &date, &machine())?;
        if quick() {
            // A quick run is for development: it never overwrites published results.
            let name = std::env::temp_dir().join(format!("{date}-offloads.md"));
            std::fs::write(&name, &md)?;
            println!("{md}\nbench: results written to {}", name.display());
        } else {
            write_results(&out_dir, &format!("{date}-offloads.md"), &md)?;
        }
    }
    if runs(Parts::Compare) {
        let cfg = compare::Config::from_env()?;
        let results = compare::run(&cfg, &object()?)?;
        let report_dir = match std::env::var_os("NODEPORT_BENCH_REPORT_DIR") {
            Some(dir) => PathBuf::from(dir),
            // A quick run is for development: it never overwrites the published report.
            None if cfg.quick => std::env::temp_dir().join("nodeport-bench-quick"),
            None => out_dir
                .parent()
                .context("the results directory has no parent")?
                .to_path_buf(),
        };
        std::fs::create_dir_all(&report_dir)?;
        let rows: Option<Vec<compare::report::DatapathRow>> =
            datapath_rows.filter(|r| !r.is_empty()).map(|rows| {
                rows.iter()
                    .map(|r| compare::report::DatapathRow {
                        services: r.services,
                        bare: r.bare,
                        established_local: r.established_local,
                        established_remote: r.established_remote,
                        new_flow_local: r.new_flow_local,
                        new_flow_remote: r.new_flow_remote,
                    })
                    .collect()
            });
        compare::report::write(
            &compare::report::ReportInput {
                results: &results,
                datapath: rows.as_deref(),
                date: &date,
                machine: &machine(),
                total: began.elapsed(),
                extra: &extra_pages,
            },
            &report_dir,
        )?;
        println!(
            "bench: report written to {}",
            report_dir.join("REPORT.md").display()
        );
        println!("\n{}", compare::report::summary(&results));
    }
    if let Some(summary) = agent_summary {
        println!("bench: agent: {summary}");
    }
    println!(
        "bench: done in {:.1} min",
        began.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn write_results(out_dir: &std::path::Path, name: &str, md: &str) -> Result<()> {
    let path = out_dir.join(name);
    std::fs::write(&path, md)?;
    println!("{md}");
    println!("bench: results written to {}", path.display());
    Ok(())
}

/// The previous run's figures (2026-11-21, before the two conntrack tables): services,
/// established remote, established local, new flow local, bare (ns).
const PREVIOUS: &[(u32, f64, f64, f64, f64)] = &[
    (1, 84.0, 94.0, 1863.0, 30.0),
    (1_000, 88.0, 93.0, 1962.0, 29.0),
    (10_000, 82.0, 91.0, 1865.0, 29.0),
    (65_536, 84.0, 92.0, 1880.0, 29.0),
];
/// SYNs to one remote backend in the SNAT capacity case: more than its ports.
const SNAT_ATTEMPTS: u32 = 36_000;

/// The previous run's established remote, established local and new flow local, each as
/// "ns (ns over bare)".
fn previous(n: u32) -> Option<[String; 3]> {
    PREVIOUS
        .iter()
        .find(|p| p.0 == n)
        .map(|p| [p.1, p.2, p.3].map(|v| format!("{v:.0} ({:+.0})", v - p.4)))
}

/// The datapath part; returns its rows and its results page. `NODEPORT_BENCH_DATAPATH=rows`
/// or `=snat-capacity` runs one of its two cases (default: both).
fn datapath(date: &str) -> Result<(Vec<Row>, String)> {
    let object_path = std::env::var("NODEPORT_BENCH_OBJECT")
        .context("NODEPORT_BENCH_OBJECT (set by cargo xtask bench)")?;
    let object = std::fs::read(&object_path).with_context(|| format!("reading {object_path}"))?;
    let topo = Topology::new()?;
    let cases = std::env::var("NODEPORT_BENCH_DATAPATH").unwrap_or_default();
    let (run_rows, run_snat) = match cases.as_str() {
        "" => (true, true),
        "rows" => (true, false),
        "snat-capacity" => (false, true),
        other => anyhow::bail!("NODEPORT_BENCH_DATAPATH={other}: expected rows or snat-capacity"),
    };

    let mut rows = Vec::new();
    // NODEPORT_BENCH_SERVICES=1 (say) for a quick look at one size.
    let counts: Vec<u32> = match std::env::var("NODEPORT_BENCH_SERVICES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) if quick() => vec![1, 65_536],
        Err(_) => SERVICE_COUNTS.to_vec(),
    };
    for n in counts.into_iter().filter(|_| run_rows) {
        eprintln!("bench: {n} services ...");
        let row = bench_at(&object, &topo, n)?;
        eprintln!(
            "bench: {n:>6} services: bare {:.1} ns, established {:.1} ns (remote) {:.1} ns (local), unanswered {:.1} ns, new flow {:.1} ns (churning) {:.1} ns (held) {:.1} ns (direct) {:.1} ns (empty table) {:.1} ns (remote, action {}, {:.1}% SNAT drops), no service {:.1} ns, conntrack floor {:.1} ns (of which established lookups {:.1} ns)",
            row.bare,
            row.established_remote,
            row.established_local,
            row.unanswered_local,
            row.new_flow_local,
            row.new_flow_local_hold,
            row.new_flow_local_direct,
            row.new_flow_local_empty,
            row.new_flow_remote,
            row.new_flow_remote_action,
            row.new_flow_remote_drops * 100.0,
            row.no_service,
            row.ct_floor,
            row.ct_absent
        );
        rows.push(row);
    }
    let snat = if run_snat {
        eprintln!("bench: SNAT capacity of one remote backend ...");
        let c = snat_capacity(&object, &topo, SNAT_ATTEMPTS)?;
        eprintln!(
            "bench: SNAT: {} ports, first drop with {:?} held, {} held after {} SYNs, {} drops within the first {}",
            c.span, c.first_drop_at, c.held, c.attempts, c.drops_within_span, c.span
        );
        Some(c)
    } else {
        None
    };

    let mut md = String::new();
    let rounds = rounds();
    writeln!(md, "# Datapath benchmark, {date}\n")?;
    writeln!(md, "Machine: {}\n", machine())?;
    writeln!(md, "Load average at the end: {}\n", load_average())?;
    writeln!(
        md,
        "BPF_PROG_TEST_RUN of the XDP program on `ext0` of a test namespace, repeat {REPEAT}, median of \
         {rounds} runs; ns per packet as the kernel measures it. Rewriting paths run behind the bench \
         entry point that restores the packet first; its overhead (restore minus bare; for new flows \
         the restore that also writes a new client address) is taken off. Maglev tables of \
         {MAGLEV_SIZE} slots (per-packet cost does not depend on M). The production SNAT ranges \
         (1024-29999, 61000-65535: 33,512 ports). Tables: `NP_CT` {CONNTRACK} entries, filled to the \
         last entry before the runs; `NP_CT_NEW` (LRU) {CONNTRACK_NEW} entries.\n"
    )?;
    if !rows.is_empty() {
        writeln!(
            md,
            "Columns: *established* connections were opened by SYN, SYN-ACK, ACK and live in `NP_CT`; \
             *unanswered* is a connection whose SYN the backend never answered, so it stays in \
             `NP_CT_NEW`, measured on its retransmitted SYN (the previous bench opened its \
             \"established\" connections with a lone ACK, which starts none now); *new flow* has a new client address every repetition (a spoofed SYN flood \
             as the XDP program sees it): *churning* 1,000,000 SYNs through the handshake LRU (full \
             after the first 32,768, every insert evicts), *held* {HOLD_REPEAT} SYNs into the emptied \
             handshake table, *direct* the churning case run through `np_xdp_new` itself, without the \
             tail call and the lookups before it; *established table empty* the churning case before \
             `NP_CT` was filled; *remote* the churning case ({REMOTE_NEW_REPEAT} SYNs) to a remote backend (SNAT \
             port search).\n"
        )?;
        writeln!(
            md,
            "| services | bare XDP_PASS | no service | established, remote SNAT (XDP_TX) | established, local pod (to TC) | unanswered, local pod | new flow, local, churning | new flow, local, held | new flow, local, direct | new flow, local, established table empty | new flow, remote SNAT, churning | restore overhead | restore + new client overhead |"
        )?;
        writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for r in &rows {
            writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.services,
                r.bare,
                r.no_service,
                r.established_remote,
                r.established_local,
                r.unanswered_local,
                r.new_flow_local,
                r.new_flow_local_hold,
                r.new_flow_local_direct,
                r.new_flow_local_empty,
                r.new_flow_remote,
                r.restore - r.bare,
                r.restore_vary - r.bare
            )?;
        }
        writeln!(
            md,
            "\nPrevious run (2026-11-21, before the two tables, one conntrack LRU of 262,144 entries; another machine: its bare XDP_PASS cost 29-30 ns, so compare the figures over bare as well):\n"
        )?;
        writeln!(
            md,
            "| services | established, remote: previous → now | established, local: previous → now | new flow, local: previous → now (churning) |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|")?;
        for r in &rows {
            let [pr, pl, pn] =
                previous(r.services).unwrap_or_else(|| ["–".into(), "–".into(), "–".into()]);
            let now = |v: f64| format!("{v:.0} ({:+.0})", v - r.bare);
            writeln!(
                md,
                "| {} | {pr} → {} | {pl} → {} | {pn} → {} |",
                r.services,
                now(r.established_remote),
                now(r.established_local),
                now(r.new_flow_local)
            )?;
        }
        writeln!(
            md,
            "\n## Fragments and the TC hook\n\nThe same tables and connections. *UDP*: a flow to a local pod (Service on its own VIP), a 64-byte datagram; the first and the later fragment of one of its datagrams (24 bytes of IPv4 payload each, padded to 64 bytes), each repeated: the first fragment's cost includes remembering its ports (`NP_FRAGS`), the later one's finding them. *TC*: `np_tc_ext_nat` (`--external-hook tc`) on the established connections above, reached by a tail call from a TC entry point that restores the packet; its figures are over the same entry point tail-calling a trivial program (*TC baseline*: restore, tail call, a bare TC program).\n"
        )?;
        writeln!(
            md,
            "| services | UDP datagram, local pod (XDP) | first fragment (XDP) | later fragment (XDP) | TC baseline | TC established, remote SNAT (over baseline) | TC established, local pod (over baseline) |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
        for r in &rows {
            writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.services,
                r.udp_local,
                r.first_fragment_local,
                r.later_fragment_local,
                r.tc_restore,
                r.tc_established_remote,
                r.tc_established_local
            )?;
        }
        // Target 1, row by row: each row's established paths against its own bare figure.
        let over: Vec<String> = rows
            .iter()
            .filter(|r| r.established_remote.max(r.established_local) > 2.0 * r.bare + 40.0)
            .map(|r| format!("{} services", r.services))
            .collect();
        let first = &rows[0];
        let last = rows.last().expect("rows");
        let drift = |a: f64, b: f64| (b - a) / a * 100.0;
        writeln!(
            md,
            "\nTarget 1, an established-flow packet (remote SNAT and local) at most 2 x bare + 40 ns, row by row: {}.",
            if over.is_empty() {
                "met in every row".to_owned()
            } else {
                format!("NOT met at {}", over.join(", "))
            }
        )?;
        let d_remote = drift(first.established_remote, last.established_remote);
        let d_local = drift(first.established_local, last.established_local);
        writeln!(
            md,
            "Target 2, flat within 15% from {} to {} services: remote {d_remote:+.1}%, local {d_local:+.1}%, {}.",
            first.services,
            last.services,
            if d_remote.abs() <= 15.0 && d_local.abs() <= 15.0 {
                "met"
            } else {
                "NOT met"
            }
        )?;
        let slow: Vec<String> = rows
            .iter()
            .filter(|r| r.new_flow_local > 400.0)
            .map(|r| format!("{} services ({:.0} ns)", r.services, r.new_flow_local))
            .collect();
        writeln!(
            md,
            "Target 3, a new flow (local pod, established table full, handshake LRU churning) at most 400 ns: {}.",
            if slow.is_empty() {
                "met in every row".to_owned()
            } else {
                format!("NOT met at {}", slow.join(", "))
            }
        )?;
        writeln!(
            md,
            "\nWhat bounds Target 3 on this machine: the conntrack operations every new connection needs, run alone in the same tables (`np_bench_ct_floor`: the forward key looked up in both tables, the reply key in the established one, the reply and the forward entry inserted into the churning handshake LRU), and of those the two lookups of absent keys in the full established table alone (`np_bench_ct_absent`). Each is a walk of a hash bucket in a table of tens of MB, in 4 KiB pages: a cache and a TLB miss on a virtual machine.\n"
        )?;
        writeln!(
            md,
            "| services | new flow, local, churning | conntrack operations alone | of which: forward and reply key absent from the full established table | the rest of the new-flow path |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|")?;
        for r in &rows {
            writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.services,
                r.new_flow_local,
                r.ct_floor,
                r.ct_absent,
                r.new_flow_local - r.ct_floor
            )?;
        }
        writeln!(
            md,
            "\nSpoofed SYNs one core absorbs (1 s / the new-flow cost). Every run of the remote case \
             starts with no remote handshakes in the LRU (the local cases before it evicted them): \
             the SYNs that get a port take one each until the handshake table holds nearly all \
             33,512, and every later one is dropped.\n"
        )?;
        writeln!(
            md,
            "| services | local pod, churning | local pod, held | remote SNAT, churning | remote: SYNs dropped for want of a SNAT port | remote: SYNs per run that got a port |"
        )?;
        writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
        let per_s = |ns: f64| format!("{:.2} M/s", 1e3 / ns.max(1.0));
        for r in &rows {
            writeln!(
                md,
                "| {} | {} | {} | {} | {:.1}% | {:.0} of {REMOTE_NEW_REPEAT} |",
                r.services,
                per_s(r.new_flow_local),
                per_s(r.new_flow_local_hold),
                per_s(r.new_flow_remote),
                r.new_flow_remote_drops * 100.0,
                f64::from(REMOTE_NEW_REPEAT) * (1.0 - r.new_flow_remote_drops)
            )?;
        }
    }
    if let Some(c) = &snat {
        writeln!(
            md,
            "\n## SNAT ports of one remote backend\n\n{} SYNs from distinct clients to one Service with one remote backend, one BPF_PROG_TEST_RUN each, every connection holding its SNAT port (a handshake table of {} entries holds them all); {} ports in the ranges, the search probes 80 ports in 10 rounds of 8 (strided), then 2 reclaim tries.\n",
            c.attempts,
            2 * c.attempts + 1024,
            c.span
        )?;
        writeln!(
            md,
            "| SNAT ports | first drop with this many connections held | held after {} SYNs | drops within the first {} SYNs | target: at least 28,000 before the first drop |",
            c.attempts, c.span
        )?;
        writeln!(md, "|---:|---:|---:|---:|---|")?;
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            c.span,
            c.first_drop_at.map_or("none".into(), |v| v.to_string()),
            c.held,
            c.drops_within_span,
            if c.first_drop_at.is_none_or(|v| v >= 28_000) {
                "met"
            } else {
                "NOT met"
            }
        )?;
    }

    Ok((rows, md))
}

fn quick() -> bool {
    std::env::var_os("NODEPORT_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// Rounds per scenario: 11, or 3 with NODEPORT_BENCH_QUICK=1.
fn rounds() -> usize {
    if quick() { 3 } else { ROUNDS }
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
