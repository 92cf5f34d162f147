//! The datapath's packet behaviour, case by case, through BPF_PROG_TEST_RUN.
//!
//! Each case seeds the maps, runs packets through the programs and checks the verdict, the
//! output frame byte for byte against one built by etherparse (whose checksums are computed
//! from scratch), and the exact change of every counter.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail, ensure};
use etherparse::PacketBuilder;
use nodeport_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, Counter, CtEntry, FE_F_AFFINITY, FE_F_LOCAL_ONLY,
    FE_F_SOURCE_RANGES, IPPROTO_TCP, IPPROTO_UDP, XDP_META_F_NEIGH,
};
use nodeport_tests::{
    fixture::*,
    netns::require_root,
    packet::{
        ACK, FIN_ACK, L4, Mac, Pkt, RST, SYN, SYN_ACK, Seen, fragment, icmp_error, parse_checked,
        parse_icmp_error, reassemble, sa,
    },
};

const FRONTEND: &str = "198.18.0.1:30080";
const CLIENT: &str = "198.18.0.100:40000";
const POD_A: &str = "198.18.1.10:8080";
const POD_B: &str = "198.18.1.11:8080";
const REMOTE_A: &str = "198.18.2.20:8080";

type Case = fn(&mut Fixture, &Topology) -> Result<()>;

const CASES: &[(&str, Case)] = &[
    (
        "tcp syn to a local backend is DNATed and handed to TC",
        tcp_syn_local,
    ),
    ("udp to a local backend", udp_local),
    (
        "tcp and udp on one node port are distinct frontends",
        tcp_and_udp_same_port,
    ),
    ("a zero udp checksum stays zero", udp_zero_checksum),
    ("an empty udp datagram is forwarded", udp_empty),
    ("a VIP frontend uses the same machinery", vip_frontend),
    (
        "the local pod's reply is reverse-NATed by the pod hook",
        pod_reply_tcp,
    ),
    ("the local pod's udp reply is reverse-NATed", pod_reply_udp),
    (
        "other pod traffic passes the pod hook untouched",
        pod_other_traffic,
    ),
    (
        "a remote backend is SNATed and its reply returns to the client",
        remote_snat_and_return,
    ),
    (
        "each connection to one remote backend gets its own SNAT port",
        snat_ports_distinct,
    ),
    ("SNAT port exhaustion drops with a counter", snat_exhaustion),
    (
        "an established flow keeps its backend when the Maglev table changes",
        sticks_after_table_change,
    ),
    (
        "a TCP connection whose backend left gets an RST and closes; a UDP flow is re-selected",
        removed_backend,
    ),
    ("an expired flow is re-selected", reselect_expired),
    (
        "a new SYN after FIN both ways starts a new selection, after a half-close not",
        syn_after_fin,
    ),
    ("FIN marks both directions closing", fin_marks_closing),
    (
        "no backend: a SYN or a datagram gets an ICMP port unreachable (rate-limited), the rest is dropped",
        no_backend,
    ),
    (
        "externalTrafficPolicy Local without a local backend drops",
        etp_local_no_endpoint,
    ),
    ("loadBalancerSourceRanges deny and admit", source_ranges),
    (
        "sessionAffinity ClientIP sticks, survives a table change, expires",
        affinity,
    ),
    (
        "without affinity connections spread over backends",
        spread_without_affinity,
    ),
    ("a packet to no frontend passes untouched", not_a_service),
    ("ARP, IPv6, VLAN and ICMP pass untouched", other_traffic),
    ("malformed packets are dropped, never rewritten", malformed),
    ("IPv4 options are parsed by IHL", ip_options),
    (
        "fragments to a local pod follow their first, in order; later ones before it are dropped",
        fragments_local,
    ),
    (
        "overlapping and duplicate fragments are translated like the rest, none leaves untranslated",
        fragments_overlapping,
    ),
    (
        "fragments through a remote backend's SNAT, both ways",
        fragments_remote,
    ),
    (
        "a fragmented TCP segment follows its connection",
        fragments_tcp,
    ),
    (
        "a local pod's fragmented reply is translated by the pod hook",
        fragments_pod_reply,
    ),
    (
        "fragments of others' datagrams pass; those of a datagram that started nothing drop",
        fragments_not_ours,
    ),
    ("TTL 1 is answered with ICMP time exceeded", ttl_exceeded),
    ("no route: the kernel routes it (counted)", no_route),
    ("unknown neighbour: TC resolves it", no_neighbour),
    ("an unconfigured datapath passes everything", unconfigured),
    (
        "the next hop is cached per connection and re-checked when stale",
        next_hop_cache,
    ),
    (
        "affinity sends no new connection to a draining backend",
        affinity_skips_draining,
    ),
    (
        "a draining backend keeps TCP connections and serving UDP flows; UDP moves off one not serving",
        draining_tcp_stays_udp_moves,
    ),
    (
        "a SYN-ACK alone establishes nothing; the client's ACK moves both entries",
        handshake_then_established,
    ),
    (
        "UDP is established by the answer",
        udp_established_by_answer,
    ),
    (
        "an RST the client did not mean is undone by its next packet",
        rst_restored_by_traffic,
    ),
    (
        "a TCP segment other than a SYN without a connection passes untouched (not_syn)",
        not_syn_without_connection,
    ),
    ("martian sources never start connections", martian_sources),
    (
        "replies are accepted only from the device their connection uses",
        replies_bound_to_their_device,
    ),
    (
        "a one-way UDP stream keeps its SNAT port",
        one_way_udp_keeps_its_port,
    ),
    (
        "an idle connection goes on with its backend; a new SYN re-selects",
        revive_idle_connection,
    ),
    (
        "ICMP errors about translated packets are translated back, both ways, local and SNAT",
        icmp_errors_translated,
    ),
    (
        "a packet above the route's MTU with DF gets fragmentation needed, new or established",
        path_mtu,
    ),
    (
        "a lost entry is recreated; one whose tuple was taken drops",
        lost_partner_recreated_or_dropped,
    ),
    (
        "a full established table leaves connections working from the handshake table",
        promotion_when_established_table_full,
    ),
    (
        "two frontends of one local pod from one client port get distinct tuples",
        local_tuple_clash,
    ),
    (
        "SNAT ports come from both ranges and skip frontend ports",
        snat_ports_from_both_ranges_not_frontends,
    ),
    (
        "the SNAT port depends on the node's secret",
        snat_port_depends_on_the_node_secret,
    ),
    (
        "an RST outside its sender's window is passed on and closes nothing",
        rst_outside_the_window_is_ignored,
    ),
    (
        "a pod's first answer binds only when it acknowledges the client, from the backend",
        first_answer_must_come_from_the_backend,
    ),
    (
        "a SYN past a closed connection's sequence takes over its SNAT port",
        closed_connection_snat_port_taken_over,
    ),
    (
        "a SYN takes over the SNAT port of a handshake abandoned for three seconds",
        abandoned_handshake_snat_port_taken_over,
    ),
    (
        "frames from the wire to loopback on a node port are dropped",
        loopback_destinations_dropped,
    ),
    (
        "the TC hook translates as XDP does: local DNAT, remote SNAT and its reply, both ways",
        tc_hook_translates,
    ),
    (
        "the TC hook leaves what XDP answers to the kernel, and sizes a GSO packet by its segments",
        tc_hook_kernel_answers_and_gso,
    ),
];

#[test]
#[ignore = "needs root and the eBPF datapath: run `cargo xtask test`"]
fn fixture_table() {
    require_root();
    let topo = Topology::new().expect("creating the test namespace");
    let mut failures = Vec::new();
    // NODEPORT_FIXTURE_CASE=<part of a name> runs only the matching cases (while developing).
    let only = std::env::var("NODEPORT_FIXTURE_CASE").unwrap_or_default();
    for (name, case) in CASES
        .iter()
        .filter(|(name, _)| name.contains(only.as_str()))
    {
        let result = Fixture::new(&topo).and_then(|mut fx| case(&mut fx, &topo));
        match result {
            Ok(()) => eprintln!("ok   {name}"),
            Err(e) => {
                eprintln!("FAIL {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

// ---- helpers -------------------------------------------------------------------------------

fn from_client(sport: u16, dst: &str, flags: nodeport_tests::packet::TcpFlags) -> Pkt {
    Pkt::tcp(sa(&format!("198.18.0.100:{sport}")), sa(dst), flags).macs(CLIENT_MAC, EXT_MAC)
}

/// The output frame must parse, carry valid checksums and equal `expected` byte for byte.
fn check_frame(actual: &[u8], expected: &Pkt) -> Result<Seen> {
    let seen = parse_checked(actual).context("output frame")?;
    let want = expected.bytes();
    if actual != want.as_slice() {
        bail!(
            "output differs:\n  got  {seen:?}\n  want {:?}\n  got  {actual:02x?}\n  want {want:02x?}",
            parse_checked(&want)
        );
    }
    Ok(seen)
}

fn check_unchanged(run: &XdpRun, input: &[u8]) -> Result<()> {
    ensure!(run.frame == input, "frame was modified: {:02x?}", run.frame);
    ensure!(run.meta.is_none(), "unexpected metadata {:?}", run.meta);
    Ok(())
}

fn check_counters(
    fx: &Fixture,
    before: &BTreeMap<Counter, u64>,
    expected: &[(Counter, u64)],
) -> Result<()> {
    let after = fx.counters()?;
    let mut delta = BTreeMap::new();
    for (c, v) in &after {
        let d = v - before.get(c).copied().unwrap_or(0);
        if d != 0 {
            delta.insert(*c, d);
        }
    }
    let want: BTreeMap<Counter, u64> = expected.iter().copied().collect();
    ensure!(
        delta == want,
        "counters changed by {delta:?}, expected {want:?}"
    );
    Ok(())
}

fn xdp_action(fx: &mut Fixture, topo: &Topology, pkt: &Pkt, action: u32) -> Result<XdpRun> {
    let run = fx.xdp(topo, &pkt.bytes())?;
    ensure!(
        run.action == action,
        "XDP action {}, expected {action}",
        run.action
    );
    Ok(run)
}

/// Runs `pkt` through XDP, expecting `action` and exactly the counter changes `counted`.
fn xdp_counted(
    fx: &mut Fixture,
    topo: &Topology,
    pkt: &Pkt,
    action: u32,
    counted: &[(Counter, u64)],
) -> Result<XdpRun> {
    let before = fx.counters()?;
    let run = xdp_action(fx, topo, pkt, action)?;
    check_counters(fx, &before, counted)?;
    Ok(run)
}

fn local_service(id: u32, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec::new(id, FRONTEND, IPPROTO_TCP, backends)
}

/// The backend a translated frame went to.
fn backend_of(frame: &[u8]) -> Result<String> {
    Ok(parse_checked(frame)?.dst.to_string())
}

fn l3_len(pkt: &Pkt) -> u64 {
    pkt.bytes().len() as u64 - 14
}

// ---- cases ---------------------------------------------------------------------------------

fn tcp_syn_local(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let before = fx.counters()?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    // DNAT only (client address kept), TTL decremented; Ethernet left for the TC hook.
    check_frame(
        &run.frame,
        &input.clone().addrs(sa(CLIENT), sa(POD_A)).ttl(63),
    )?;
    let meta = run.meta.context("no metadata for the TC hook")?;
    ensure!(
        meta.ifindex == topo.pod_ifindex,
        "egress {} != pod0",
        meta.ifindex
    );
    ensure!(
        meta.smac == POD_HOST_MAC && meta.dmac == POD_MAC && meta.flags == 0,
        "{meta:?}"
    );
    check_counters(fx, &before, &[(Counter::ForwardedToTc, 1)])?;
    let stats = fx.svc_stats(1)?;
    ensure!(
        stats.packets == 1 && stats.bytes == l3_len(&input),
        "{stats:?}"
    );
    Ok(())
}

fn udp_local(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, "198.18.1.10:5353")],
    ))?;
    let input = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_frame(
        &run.frame,
        &input
            .clone()
            .addrs(sa(CLIENT), sa("198.18.1.10:5353"))
            .ttl(63),
    )?;
    ensure!(run.meta.is_some());
    Ok(())
}

fn tcp_and_udp_same_port(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_TCP,
        vec![local(1, POD_A)],
    ))?;
    fx.add_service(&ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(2, "198.18.1.11:5353")],
    ))?;
    let tcp = xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    ensure!(backend_of(&tcp.frame)? == POD_A);
    let udp = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    let udp = xdp_action(fx, topo, &udp, XDP_PASS)?;
    ensure!(backend_of(&udp.frame)? == "198.18.1.11:5353");
    ensure!(fx.svc_stats(1)?.packets == 1 && fx.svc_stats(2)?.packets == 1);
    Ok(())
}

fn udp_zero_checksum(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, "198.18.1.10:5353")],
    ))?;
    let mut input = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    input.l4 = L4::Udp { checksum: false };
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    // The expected frame is built without a checksum too: the field must still be zero.
    check_frame(
        &run.frame,
        &input
            .clone()
            .addrs(sa(CLIENT), sa("198.18.1.10:5353"))
            .ttl(63),
    )?;
    ensure!(
        run.frame[14 + 20 + 6..14 + 20 + 8] == [0, 0],
        "udp checksum no longer zero"
    );
    Ok(())
}

fn udp_empty(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, "198.18.1.10:5353")],
    ))?;
    let input = Pkt::udp(sa(CLIENT), sa(FRONTEND))
        .macs(CLIENT_MAC, EXT_MAC)
        .payload(&[]);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_frame(
        &run.frame,
        &input
            .clone()
            .addrs(sa(CLIENT), sa("198.18.1.10:5353"))
            .ttl(63),
    )?;
    Ok(())
}

fn vip_frontend(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        "198.18.3.3:80",
        IPPROTO_TCP,
        vec![local(1, POD_A)],
    ))?;
    let input = from_client(40000, "198.18.3.3:80", SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_frame(
        &run.frame,
        &input.clone().addrs(sa(CLIENT), sa(POD_A)).ttl(63),
    )?;
    // The pod's reply must come back from the VIP.
    let reply = Pkt::tcp(sa(POD_A), sa(CLIENT), SYN_ACK).macs(POD_MAC, POD_HOST_MAC);
    let (ret, out) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    check_frame(
        &out,
        &reply
            .clone()
            .addrs(sa("198.18.3.3:80"), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    Ok(())
}

fn pod_reply_tcp(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    let before = fx.counters()?;
    let reply = Pkt::tcp(sa(POD_A), sa(CLIENT), SYN_ACK).macs(POD_MAC, POD_HOST_MAC);
    let (ret, out) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    // Source back to the node port, MACs for the client's link, TTL decremented.
    check_frame(
        &out,
        &reply
            .clone()
            .addrs(sa(FRONTEND), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    check_counters(fx, &before, &[(Counter::ForwardedPodReply, 1)])?;
    let stats = fx.svc_stats(1)?;
    ensure!(
        stats.reply_packets == 1 && stats.reply_bytes == l3_len(&reply),
        "{stats:?}"
    );
    // Both directions now know the connection is established.
    let ct = fx.conntrack()?;
    ensure!(
        ct.len() == 2 && ct.iter().all(|(_, _, e)| e.state.replied == 1),
        "{ct:?}"
    );
    Ok(())
}

fn pod_reply_udp(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, "198.18.1.10:5353")],
    ))?;
    xdp_action(
        fx,
        topo,
        &Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC),
        XDP_PASS,
    )?;
    let reply = Pkt::udp(sa("198.18.1.10:5353"), sa(CLIENT))
        .macs(POD_MAC, POD_HOST_MAC)
        .payload(b"answer");
    let (ret, out) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    check_frame(
        &out,
        &reply
            .clone()
            .addrs(sa(FRONTEND), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    Ok(())
}

fn pod_other_traffic(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let before = fx.counters()?;
    // The pod talks to someone without a nodeport connection.
    let pkt = Pkt::tcp(sa(POD_A), sa("198.18.0.100:41000"), SYN)
        .macs(POD_MAC, POD_HOST_MAC)
        .bytes();
    let (ret, out) = fx.tc_pod(topo, &pkt)?;
    ensure!(
        ret == TC_ACT_UNSPEC,
        "tc verdict {ret}: must hand on to the next program / the stack"
    );
    ensure!(out == pkt, "modified");
    check_counters(fx, &before, &[])
}

fn remote_snat_and_return(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let before = fx.counters()?;
    let syn = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &syn, XDP_TX)?;
    let seen = parse_checked(&run.frame)?;
    let port = seen.src.port();
    ensure!(
        (61000..=61999).contains(&port),
        "SNAT port {port} outside the range"
    );
    // SNAT to the node, DNAT to the backend, out of ext0 towards node2.
    check_frame(
        &run.frame,
        &syn.clone()
            .addrs(sa(&format!("198.18.0.1:{port}")), sa(REMOTE_A))
            .ttl(63)
            .macs(EXT_MAC, NODE2_MAC),
    )?;
    // The backend answers to the node's SNAT port.
    let reply =
        Pkt::tcp(sa(REMOTE_A), sa(&format!("198.18.0.1:{port}")), SYN_ACK).macs(NODE2_MAC, EXT_MAC);
    let run = xdp_action(fx, topo, &reply, XDP_TX)?;
    check_frame(
        &run.frame,
        &reply
            .clone()
            .addrs(sa(FRONTEND), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    check_counters(fx, &before, &[(Counter::ForwardedXdpTx, 2)])?;
    let stats = fx.svc_stats(1)?;
    ensure!(stats.packets == 1 && stats.reply_packets == 1, "{stats:?}");
    Ok(())
}

fn snat_ports_distinct(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let mut ports = std::collections::BTreeSet::new();
    for sport in 40000..40010 {
        let run = xdp_action(fx, topo, &from_client(sport, FRONTEND, SYN), XDP_TX)?;
        ports.insert(parse_checked(&run.frame)?.src.port());
    }
    ensure!(ports.len() == 10, "ports reused: {ports:?}");
    Ok(())
}

fn snat_exhaustion(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.set_config(nodeport_common::DatapathConfig {
        snat_port_min: 61000,
        snat_port_max: 61001,
        ..default_config()
    })?;
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_TX)?;
    xdp_action(fx, topo, &from_client(40001, FRONTEND, SYN), XDP_TX)?;
    let before = fx.counters()?;
    let third = from_client(40002, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &third, XDP_DROP)?;
    check_unchanged(&run, &third.bytes())?;
    check_counters(fx, &before, &[(Counter::DroppedSnatExhausted, 1)])?;
    // A retransmitted SYN of an existing connection still gets its own port back.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_TX)?;
    Ok(())
}

fn two_backend_service(fx: &mut Fixture) -> Result<ServiceSpec> {
    let svc = local_service(1, vec![local(1, POD_A), local(2, POD_B)]);
    fx.add_service(&svc)?;
    Ok(svc)
}

fn other_backend(svc: &ServiceSpec, chosen: &str) -> (u32, u32) {
    let chosen_id = svc
        .backends
        .iter()
        .find(|b| b.addr.to_string() == chosen)
        .map(|b| b.id)
        .expect("known");
    let other_id = svc
        .backends
        .iter()
        .find(|b| b.id != chosen_id)
        .map(|b| b.id)
        .expect("two");
    (chosen_id, other_id)
}

fn sticks_after_table_change(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let svc = two_backend_service(fx)?;
    let first =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    let (_, other) = other_backend(&svc, &first);
    fx.set_table(&svc, &[other])?;
    let again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?.frame)?;
    ensure!(
        again == first,
        "established flow moved from {first} to {again}"
    );
    let new_flow =
        backend_of(&xdp_action(fx, topo, &from_client(40001, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        new_flow != first,
        "a new flow used {new_flow}, which is no longer in the table"
    );
    Ok(())
}

fn removed_backend(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let svc = two_backend_service(fx)?;
    let udp = ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(3, "198.18.1.10:5353"), local(4, "198.18.1.11:5353")],
    );
    fx.add_service(&udp)?;
    let first =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    let datagram = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    let u = backend_of(&xdp_action(fx, topo, &datagram, XDP_PASS)?.frame)?;
    let (chosen, other) = other_backend(&svc, &first);
    fx.set_table(&svc, &[other])?;
    fx.remove_backend(chosen)?;
    let (u_chosen, u_other) = other_backend(&udp, &u);
    fx.set_table(&udp, &[u_other])?;
    fx.remove_backend(u_chosen)?;

    // The pod is gone: the client's next segment is answered with the RST Linux sends for a
    // segment with ACK (seq = its ack, no ACK flag), from the frontend, not moved to the
    // other pod (where it would meet no socket, or a TIME_WAIT one).
    let segment = from_client(40000, FRONTEND, ACK).seq(1001).ack(5000);
    let run = xdp_counted(
        fx,
        topo,
        &segment,
        XDP_TX,
        &[(Counter::RejectedBackendGone, 1)],
    )?;
    let seen = parse_checked(&run.frame).context("the RST")?;
    ensure!(
        (seen.eth_src, seen.eth_dst, seen.src, seen.dst)
            == (EXT_MAC, CLIENT_MAC, sa(FRONTEND), sa(CLIENT)),
        "{seen:?}"
    );
    let headers = etherparse::PacketHeaders::from_ethernet_slice(&run.frame)?;
    let Some(etherparse::TransportHeader::Tcp(tcp)) = headers.transport else {
        bail!("not TCP: {headers:?}");
    };
    ensure!(
        tcp.rst && !tcp.ack && !tcp.syn && tcp.sequence_number == 5000,
        "{tcp:?}"
    );
    // Both entries are closing now; an RST from the client gets no RST back.
    let tcp_entries: Vec<CtEntry> = fx
        .established()?
        .into_iter()
        .chain(fx.handshake()?)
        .filter(|(k, _)| k.proto == IPPROTO_TCP)
        .map(|(_, e)| e)
        .collect();
    ensure!(
        tcp_entries.len() == 2 && tcp_entries.iter().all(|e| e.state.closing()),
        "{tcp_entries:?}"
    );
    let rst = from_client(40000, FRONTEND, RST).seq(1001);
    let run = xdp_counted(
        fx,
        topo,
        &rst,
        XDP_DROP,
        &[(Counter::DroppedBackendGone, 1)],
    )?;
    check_unchanged(&run, &rst.bytes())?;
    // A new SYN on the same tuple is a new connection, to the pod that is left.
    let again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        again != first,
        "a new connection went to removed backend {first}"
    );
    // A UDP flow has no connection to reset: it moves, as kube-proxy clears its conntrack.
    let u_again = backend_of(&xdp_action(fx, topo, &datagram, XDP_PASS)?.frame)?;
    ensure!(u_again != u, "a UDP flow stayed on removed backend {u}");
    Ok(())
}

/// Makes the entry of direction `dir` (of the only connection) look idle since long ago, in
/// whichever table it is.
fn age_entry(fx: &mut Fixture, dir: u8) -> Result<()> {
    edit_entry(fx, dir, |e| e.last_seen = LONG_AGO)
}

/// Changes the entry of direction `dir` of the only connection in place.
fn edit_entry(fx: &mut Fixture, dir: u8, edit: impl Fn(&mut CtEntry)) -> Result<()> {
    for established in [true, false] {
        let entries = if established {
            fx.established()?
        } else {
            fx.handshake()?
        };
        if let Some((key, mut entry)) = entries.into_iter().find(|(k, _)| k.dir == dir) {
            edit(&mut entry);
            let map = if established {
                &mut fx.dp.maps.conntrack
            } else {
                &mut fx.dp.maps.conntrack_new
            };
            map.insert(key, entry, 0)?;
            return Ok(());
        }
    }
    bail!("no entry of direction {dir}")
}

fn reselect_expired(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let svc = two_backend_service(fx)?;
    let first =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    let (_, other) = other_backend(&svc, &first);
    fx.set_table(&svc, &[other])?;
    // Only a SYN was seen: the SYN timeout applies, to both directions.
    age_entry(fx, CT_DIR_FORWARD)?;
    age_entry(fx, CT_DIR_REPLY)?;
    let again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(again != first, "expired flow kept {first}");
    Ok(())
}

fn syn_after_fin(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let svc = two_backend_service(fx)?;
    let first =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    let (_, other) = other_backend(&svc, &first);
    fx.set_table(&svc, &[other])?;
    let pod = sa(&first);
    let from_pod = |flags| {
        Pkt::tcp(pod, sa(CLIENT), flags)
            .macs(POD_MAC, POD_HOST_MAC)
            .bytes()
    };
    fx.tc_pod(topo, &from_pod(SYN_ACK))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    // Half-closed by the client: a SYN is not a new connection yet (nf_conntrack ignores a
    // SYN in FIN_WAIT, tcp_conntracks' sIG), it stays where it is.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, FIN_ACK), XDP_PASS)?;
    let again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        again == first,
        "a SYN on a half-closed connection moved it to {again}"
    );
    // Closed both ways: the client reuses its port for a new connection (TIME_WAIT -> sSS).
    fx.tc_pod(topo, &from_pod(FIN_ACK))?;
    let again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        again != first,
        "new connection reused the closed one's backend {first}"
    );
    Ok(())
}

fn fin_marks_closing(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    establish_local(fx, topo, 40000)?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, FIN_ACK), XDP_PASS)?;
    // A half-close: the connection is not closing, both entries say so.
    let ct = fx.established()?;
    ensure!(ct.len() == 2, "{ct:?}");
    for (k, e) in &ct {
        ensure!(
            e.state.fin_fwd == 1 && !e.state.closing(),
            "{k:?} after the client's FIN: {:?}",
            e.state
        );
    }
    // The pod's FIN closes it, in both entries.
    let fin = Pkt::tcp(sa(POD_A), sa(CLIENT), FIN_ACK).macs(POD_MAC, POD_HOST_MAC);
    let (ret, _) = fx.tc_pod(topo, &fin.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    for (k, e) in &fx.established()? {
        ensure!(e.state.closing(), "{k:?} not closing: {:?}", e.state);
    }
    Ok(())
}

/// SYN, the pod's SYN-ACK, the client's ACK: an established connection to POD_A.
fn establish_local(fx: &mut Fixture, topo: &Topology, sport: u16) -> Result<()> {
    establish_with(fx, topo, sport, POD_A)
}

/// A connection from the client's `sport` to FRONTEND, answered by the local pod `pod`.
fn establish_with(fx: &mut Fixture, topo: &Topology, sport: u16, pod: &str) -> Result<()> {
    xdp_action(fx, topo, &from_client(sport, FRONTEND, SYN), XDP_PASS)?;
    let syn_ack = Pkt::tcp(sa(pod), sa(&format!("198.18.0.100:{sport}")), SYN_ACK)
        .macs(POD_MAC, POD_HOST_MAC);
    let (ret, _) = fx.tc_pod(topo, &syn_ack.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "SYN-ACK: tc verdict {ret}");
    xdp_action(fx, topo, &from_client(sport, FRONTEND, ACK), XDP_PASS)?;
    Ok(())
}

fn no_backend(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![]))?;
    fx.add_service(&ServiceSpec::new(2, FRONTEND, IPPROTO_UDP, vec![]))?;
    // A SYN and a datagram get an ICMP port unreachable from the frontend, back out of ext0,
    // quoting the IPv4 header and the first 8 bytes after it as the client sent them:
    // kube-proxy's `-j REJECT` (iptables' default `--reject-with icmp-port-unreachable`, for
    // TCP as for UDP), answered by Linux's icmp_send.
    let datagram = Pkt::udp(sa(CLIENT), sa(FRONTEND))
        .macs(CLIENT_MAC, EXT_MAC)
        .payload(&[7; 100]);
    for pkt in [from_client(40000, FRONTEND, SYN), datagram] {
        let run = xdp_counted(fx, topo, &pkt, XDP_TX, &[(Counter::RejectedNoBackend, 1)])?;
        check_port_unreachable(&run.frame, &pkt.bytes())?;
    }
    // Another TCP segment starts nothing: the kernel's (kube-proxy's conntrack calls it
    // INVALID, or carries it if it knows the connection). A SYN past the budget (100 answers
    // a second per CPU) is dropped.
    let pkt = from_client(40000, FRONTEND, ACK);
    let run = xdp_counted(fx, topo, &pkt, XDP_PASS, &[(Counter::PassedNotSyn, 1)])?;
    check_unchanged(&run, &pkt.bytes())?;
    let before = fx.counters()?;
    // 300 SYNs take well under two seconds here: at most two budgets' worth are answered.
    for _ in 0..300 {
        fx.xdp(topo, &from_client(40001, FRONTEND, SYN).bytes())?;
    }
    let after = fx.counters()?;
    let delta = |c| after.get(&c).copied().unwrap_or(0) - before.get(&c).copied().unwrap_or(0);
    let (rejected, dropped) = (
        delta(Counter::RejectedNoBackend),
        delta(Counter::DroppedNoBackend),
    );
    ensure!(
        rejected + dropped == 300 && rejected <= 199 && dropped >= 101,
        "rejected {rejected}, dropped {dropped}"
    );
    Ok(())
}

/// `frame` must be an ICMP port unreachable from the frontend to the client (MACs swapped),
/// with valid checksums, quoting the first 28 bytes of the IPv4 packet of `sent`.
fn check_port_unreachable(frame: &[u8], sent: &[u8]) -> Result<()> {
    check_icmp_answer(
        frame,
        sent,
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ),
    )
}

/// `frame` must be an ICMP error of `kind` from the frontend to the client (MACs swapped),
/// with valid checksums, quoting the first 28 bytes of the IPv4 packet of `sent`.
fn check_icmp_answer(frame: &[u8], sent: &[u8], kind: etherparse::Icmpv4Type) -> Result<()> {
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let headers = PacketHeaders::from_ethernet_slice(frame)?;
    let eth = headers.link.clone().context("no Ethernet")?;
    let eth = eth.ethernet2().context("not Ethernet II")?;
    ensure!(
        (eth.source, eth.destination) == (EXT_MAC, CLIENT_MAC),
        "{eth:?}"
    );
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        bail!("not IPv4: {headers:?}");
    };
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    let (front, client) = (sa(FRONTEND), sa(CLIENT));
    ensure!(
        (ip.source, ip.destination, ip.time_to_live)
            == (front.ip().octets(), client.ip().octets(), 64),
        "{ip:?}"
    );
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else {
        bail!("not ICMP: {headers:?}");
    };
    ensure!(icmp.icmp_type == kind, "{icmp:?}");
    let quoted = headers.payload.slice();
    ensure!(
        icmp.checksum == icmp.icmp_type.calc_checksum(quoted),
        "ICMP checksum"
    );
    ensure!(quoted == &sent[14..42], "quote {quoted:02x?}");
    ensure!(frame.len() == 14 + 20 + 8 + 28, "{} bytes", frame.len());
    Ok(())
}

fn etp_local_no_endpoint(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let mut svc = local_service(1, vec![]);
    svc.flags = FE_F_LOCAL_ONLY;
    fx.add_service(&svc)?;
    let before = fx.counters()?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_DROP)?;
    check_unchanged(&run, &input.bytes())?;
    check_counters(fx, &before, &[(Counter::DroppedNoLocalEndpoint, 1)])
}

fn source_ranges(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let mut svc = local_service(1, vec![local(1, POD_A)]);
    svc.flags = FE_F_SOURCE_RANGES;
    fx.add_service(&svc)?;
    // 198.18.0.128/25 does not hold the client (.100).
    fx.allow_source(1, Ipv4Addr::new(198, 18, 0, 128), 25)?;
    let before = fx.counters()?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_DROP)?;
    check_unchanged(&run, &input.bytes())?;
    check_counters(fx, &before, &[(Counter::DroppedSourceRange, 1)])?;
    // Another service's ranges do not count.
    fx.allow_source(2, Ipv4Addr::new(198, 18, 0, 0), 24)?;
    xdp_action(fx, topo, &input, XDP_DROP)?;
    // 198.18.0.64/26 does.
    fx.allow_source(1, Ipv4Addr::new(198, 18, 0, 64), 26)?;
    xdp_action(fx, topo, &input, XDP_PASS)?;
    Ok(())
}

fn three_backends() -> Vec<BackendSpec> {
    vec![
        local(1, POD_A),
        local(2, POD_B),
        local(3, "198.18.1.10:8081"),
    ]
}

fn affinity(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let mut svc = local_service(1, three_backends());
    svc.flags = FE_F_AFFINITY;
    svc.affinity_timeout_s = 10800;
    fx.add_service(&svc)?;
    let mut chosen = std::collections::BTreeSet::new();
    for sport in 40000..40016 {
        chosen.insert(backend_of(
            &xdp_action(fx, topo, &from_client(sport, FRONTEND, SYN), XDP_PASS)?.frame,
        )?);
    }
    ensure!(chosen.len() == 1, "affinity broken: {chosen:?}");
    let sticky = chosen.into_iter().next().expect("one");
    // A new table without the backend (not flagged draining): the affinity entry, not the
    // table, places the client, so it stays.
    fx.take_out_of_table(&svc, &sticky)?;
    let next =
        backend_of(&xdp_action(fx, topo, &from_client(40100, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        next == sticky,
        "affinity lost on table change: {next} != {sticky}"
    );
    // Past the timeout the client is placed anew.
    let (key, mut entry) = fx
        .dp
        .maps
        .affinity
        .iter()
        .next()
        .context("no affinity entry")??;
    entry.last_seen = LONG_AGO;
    fx.dp.maps.affinity.insert(key, entry, 0)?;
    let after =
        backend_of(&xdp_action(fx, topo, &from_client(40200, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(after != sticky, "expired affinity still used {sticky}");
    Ok(())
}

fn spread_without_affinity(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, three_backends()))?;
    let mut chosen = std::collections::BTreeSet::new();
    for sport in 40000..40030 {
        chosen.insert(backend_of(
            &xdp_action(fx, topo, &from_client(sport, FRONTEND, SYN), XDP_PASS)?.frame,
        )?);
    }
    ensure!(chosen.len() == 3, "30 flows used only {chosen:?}");
    Ok(())
}

fn not_a_service(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let before = fx.counters()?;
    for input in [
        from_client(40000, "198.18.0.1:22", SYN),
        // The right port on another address, and a SNAT-range port without a connection.
        from_client(40000, "198.18.0.7:30080", SYN),
        from_client(40000, "198.18.0.1:61500", SYN),
    ] {
        let run = xdp_action(fx, topo, &input, XDP_PASS)?;
        check_unchanged(&run, &input.bytes())?;
    }
    check_counters(fx, &before, &[(Counter::PassedNoFrontend, 3)])
}

fn other_traffic(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let node = [198, 18, 0, 1];
    let client = [198, 18, 0, 100];
    let mut cases: Vec<(Vec<u8>, Counter)> = Vec::new();
    // ARP request (Ethernet + 28 bytes).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&client);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&node);
    cases.push((arp, Counter::PassedArp));
    // IPv6 UDP to the node port number.
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, EXT_MAC)
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .udp(40000, 30080)
        .write(&mut v6, b"v6")?;
    cases.push((v6, Counter::PassedIpv6));
    // VLAN-tagged IPv4 TCP to the frontend.
    let mut vlan = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, EXT_MAC)
        .single_vlan(etherparse::VlanId::try_new(100)?)
        .ipv4(client, node, 64)
        .tcp(40000, 30080, 1, 1000)
        .syn()
        .write(&mut vlan, b"")?;
    cases.push((vlan, Counter::PassedVlan));
    // ICMP echo to the node.
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, EXT_MAC)
        .ipv4(client, node, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")?;
    cases.push((icmp, Counter::PassedOtherProtocol));

    for (frame, counter) in cases {
        let before = fx.counters()?;
        let run = fx.xdp(topo, &frame)?;
        ensure!(run.action == XDP_PASS, "{counter:?}: action {}", run.action);
        check_unchanged(&run, &frame).with_context(|| format!("{counter:?}"))?;
        check_counters(fx, &before, &[(counter, 1)])?;
    }
    Ok(())
}

fn malformed(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    fx.add_service(&ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(2, "198.18.1.10:5353")],
    ))?;
    let tcp = from_client(40000, FRONTEND, SYN).bytes();
    let udp = Pkt::udp(sa(CLIENT), sa(FRONTEND))
        .macs(CLIENT_MAC, EXT_MAC)
        .bytes();
    let set = |frame: &[u8], at: usize, bytes: &[u8]| {
        let mut f = frame.to_vec();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let ip = 14;
    let l4 = 14 + 20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Ethernet header only", tcp[..14].to_vec()),
        ("truncated IPv4 header", tcp[..14 + 10].to_vec()),
        ("IHL below 5", set(&tcp, ip, &[0x44])),
        ("version 6 under the IPv4 ethertype", set(&tcp, ip, &[0x65])),
        (
            "total length beyond the frame",
            set(&tcp, ip + 2, &500u16.to_be_bytes()),
        ),
        (
            "total length below the header length",
            set(&tcp, ip + 2, &10u16.to_be_bytes()),
        ),
        ("truncated TCP header", {
            let mut f = set(&tcp, ip + 2, &30u16.to_be_bytes());
            f.truncate(14 + 30);
            f
        }),
        ("TCP data offset below 5", set(&tcp, l4 + 12, &[0x40])),
        ("UDP length below 8", set(&udp, l4 + 4, &4u16.to_be_bytes())),
        (
            "UDP length beyond the datagram",
            set(&udp, l4 + 4, &200u16.to_be_bytes()),
        ),
    ];
    for (name, frame) in cases {
        let before = fx.counters()?;
        let run = fx.xdp(topo, &frame).with_context(|| name.to_string())?;
        ensure!(run.action == XDP_DROP, "{name}: action {}", run.action);
        check_unchanged(&run, &frame).with_context(|| name.to_string())?;
        check_counters(fx, &before, &[(Counter::DroppedMalformed, 1)])
            .with_context(|| name.to_string())?;
    }
    ensure!(
        fx.conntrack()?.is_empty(),
        "a malformed packet created a connection"
    );
    Ok(())
}

fn ip_options(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let mut input = from_client(40000, FRONTEND, SYN);
    input.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    let mut expected = input.clone().addrs(sa(CLIENT), sa(POD_A)).ttl(63);
    expected.ip_options = vec![1, 1, 1, 0];
    check_frame(&run.frame, &expected)?;
    Ok(())
}

/// A UDP backend for the fragment cases.
const UDP_POD: &str = "198.18.1.10:5353";
const UDP_REMOTE: &str = "198.18.2.20:5353";
/// IPv4 payload per fragment: a 128-byte datagram (8 + 120) makes three fragments.
const CHUNK: usize = 48;

/// A UDP datagram the sender lets fragment, large enough for three fragments of `CHUNK`.
fn big_datagram(src: &str, dst: &str, (from, to): (Mac, Mac)) -> Pkt {
    let payload: Vec<u8> = (0..120u8).collect();
    Pkt::udp(sa(src), sa(dst))
        .macs(from, to)
        .payload(&payload)
        .may_fragment()
}

/// The translated fragments (in fragment order) must be exactly the fragments of `expected`,
/// the whole datagram as it should leave (etherparse computes every checksum, the first
/// fragment's UDP checksum over the whole datagram), and reassemble into it with valid
/// checksums.
fn check_fragments(outputs: &[Vec<u8>], expected: &Pkt) -> Result<()> {
    let want = fragment(&expected.bytes(), CHUNK);
    ensure!(
        outputs.len() == want.len(),
        "{} fragments, expected {}",
        outputs.len(),
        want.len()
    );
    for (i, (got, want)) in outputs.iter().zip(&want).enumerate() {
        ensure!(
            got == want,
            "fragment {i} differs:\n  got  {got:02x?}\n  want {want:02x?}"
        );
    }
    let whole = reassemble(outputs)?;
    parse_checked(&whole).context("the reassembled datagram")?;
    ensure!(
        whole == expected.bytes(),
        "the reassembled datagram differs"
    );
    Ok(())
}

/// Runs each fragment through XDP expecting `action` and one `counter` each; returns the
/// output frames.
fn xdp_fragments(
    fx: &mut Fixture,
    topo: &Topology,
    frags: &[Vec<u8>],
    action: u32,
    counter: Counter,
) -> Result<Vec<XdpRun>> {
    let mut runs = Vec::new();
    for (i, frag) in frags.iter().enumerate() {
        let before = fx.counters()?;
        let run = fx
            .xdp(topo, frag)
            .with_context(|| format!("fragment {i}"))?;
        ensure!(
            run.action == action,
            "fragment {i}: XDP action {}, expected {action}",
            run.action
        );
        check_counters(fx, &before, &[(counter, 1)]).with_context(|| format!("fragment {i}"))?;
        runs.push(run);
    }
    Ok(runs)
}

fn frames(runs: Vec<XdpRun>) -> Vec<Vec<u8>> {
    runs.into_iter().map(|run| run.frame).collect()
}

fn fragments_local(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, UDP_POD)],
    ))?;
    // In order: the first fragment starts the connection, the later ones follow it (DNAT of
    // their IPv4 header only), all handed to TC for pod0.
    let datagram = big_datagram(CLIENT, FRONTEND, (CLIENT_MAC, EXT_MAC));
    let frags = fragment(&datagram.bytes(), CHUNK);
    ensure!(frags.len() == 3);
    let runs = xdp_fragments(fx, topo, &frags, XDP_PASS, Counter::ForwardedToTc)?;
    for run in &runs {
        let meta = run.meta.context("no metadata for the TC hook")?;
        ensure!(meta.ifindex == topo.pod_ifindex, "egress {}", meta.ifindex);
    }
    let translated = |pkt: &Pkt| pkt.clone().addrs(sa(CLIENT), sa(UDP_POD)).ttl(63);
    check_fragments(&frames(runs), &translated(&datagram))?;
    ensure!(fx.conntrack()?.len() == 2, "not one connection");
    let stats = fx.svc_stats(1)?;
    ensure!(stats.packets == 3, "{stats:?}");
    // Out of order: the next datagram's later fragments before its first cannot be told
    // apart from any other traffic's. To an address the node does not hold (here: none is
    // listed yet), the kernel would forward them untranslated: dropped, untouched, counted.
    let mut second = datagram.clone();
    second.ip_id = 0x4321;
    let frags = fragment(&second.bytes(), CHUNK);
    let runs = xdp_fragments(
        fx,
        topo,
        &frags[1..],
        XDP_DROP,
        Counter::DroppedFragmentOutOfOrder,
    )?;
    for (run, frag) in runs.iter().zip(&frags[1..]) {
        check_unchanged(run, frag)?;
    }
    // To the node's own address (as the agent lists it), they may be the node's own traffic:
    // passed untouched, the kernel's (which forwards nothing untranslated from there).
    fx.dp.maps.local_nets.insert(
        &aya::maps::lpm_trie::Key::new(
            32,
            nodeport_common::LocalNetKey {
                addr_be: u32::from(*sa(FRONTEND).ip()).to_be(),
            },
        ),
        1,
        0,
    )?;
    let mut third = datagram.clone();
    third.ip_id = 0x5432;
    let third_frags = fragment(&third.bytes(), CHUNK);
    let runs = xdp_fragments(
        fx,
        topo,
        &third_frags[1..],
        XDP_PASS,
        Counter::PassedLaterFragment,
    )?;
    for (run, frag) in runs.iter().zip(&third_frags[1..]) {
        check_unchanged(run, frag)?;
    }
    // Sent again after their first, they follow it.
    let runs = xdp_fragments(fx, topo, &frags, XDP_PASS, Counter::ForwardedToTc)?;
    check_fragments(&frames(runs), &translated(&second))
}

/// Overlapping and repeated fragments (a retransmission with other fragment boundaries, or an
/// attack on reassembly): each is translated exactly like its non-overlapping counterpart, its
/// IPv4 header only for a later one; what the overlap means is the receiver's reassembly's
/// call (Linux drops a datagram whose fragments overlap), never a fragment left untranslated.
fn fragments_overlapping(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, UDP_POD)],
    ))?;
    let datagram = big_datagram(CLIENT, FRONTEND, (CLIENT_MAC, EXT_MAC));
    let translated = datagram.clone().addrs(sa(CLIENT), sa(UDP_POD)).ttl(63);
    let (by48, want48) = (
        fragment(&datagram.bytes(), CHUNK),
        fragment(&translated.bytes(), CHUNK),
    );
    let (by24, want24) = (
        fragment(&datagram.bytes(), CHUNK / 2),
        fragment(&translated.bytes(), CHUNK / 2),
    );
    // The first fragment twice; a fragment at offset 24, inside the first; the second; one
    // at offset 72, inside the second; the last.
    let sequence = [
        (&by48[0], &want48[0]),
        (&by48[0], &want48[0]),
        (&by24[1], &want24[1]),
        (&by48[1], &want48[1]),
        (&by24[3], &want24[3]),
        (&by48[2], &want48[2]),
    ];
    for (i, (input, want)) in sequence.into_iter().enumerate() {
        let before = fx.counters()?;
        let run = fx.xdp(topo, input)?;
        ensure!(
            run.action == XDP_PASS,
            "fragment {i}: action {}",
            run.action
        );
        check_counters(fx, &before, &[(Counter::ForwardedToTc, 1)])
            .with_context(|| format!("fragment {i}"))?;
        ensure!(
            run.frame == *want,
            "fragment {i}: got {:02x?}, want {want:02x?}",
            run.frame
        );
    }
    ensure!(fx.conntrack()?.len() == 2, "not one connection");
    Ok(())
}

fn fragments_remote(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![remote(1, UDP_REMOTE)],
    ))?;
    let datagram = big_datagram(CLIENT, FRONTEND, (CLIENT_MAC, EXT_MAC));
    let frags = fragment(&datagram.bytes(), CHUNK);
    let outputs = frames(xdp_fragments(
        fx,
        topo,
        &frags,
        XDP_TX,
        Counter::ForwardedXdpTx,
    )?);
    // The SNAT port, from the first fragment's UDP header (after 14 + 20 bytes).
    let port = u16::from_be_bytes([outputs[0][34], outputs[0][35]]);
    ensure!(
        (61000..=61999).contains(&port),
        "SNAT port {port} outside the range"
    );
    let snat = format!("198.18.0.1:{port}");
    check_fragments(
        &outputs,
        &datagram
            .clone()
            .addrs(sa(&snat), sa(UDP_REMOTE))
            .ttl(63)
            .macs(EXT_MAC, NODE2_MAC),
    )?;
    // The backend's fragmented answer to the SNAT port goes back to the client.
    let answer = big_datagram(UDP_REMOTE, &snat, (NODE2_MAC, EXT_MAC));
    let frags = fragment(&answer.bytes(), CHUNK);
    let outputs = frames(xdp_fragments(
        fx,
        topo,
        &frags,
        XDP_TX,
        Counter::ForwardedXdpTx,
    )?);
    check_fragments(
        &outputs,
        &answer
            .clone()
            .addrs(sa(FRONTEND), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    let stats = fx.svc_stats(1)?;
    ensure!(stats.packets == 3 && stats.reply_packets == 3, "{stats:?}");
    Ok(())
}

fn fragments_tcp(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    let payload: Vec<u8> = (0..120u8).collect();
    let segment = from_client(40000, FRONTEND, ACK)
        .seq(1001)
        .payload(&payload)
        .may_fragment();
    let frags = fragment(&segment.bytes(), CHUNK);
    ensure!(frags.len() == 3);
    let runs = xdp_fragments(fx, topo, &frags, XDP_PASS, Counter::ForwardedToTc)?;
    check_fragments(
        &frames(runs),
        &segment.clone().addrs(sa(CLIENT), sa(POD_A)).ttl(63),
    )?;
    // The sequence is the first fragment's: its TCP header and the 28 bytes of data it holds
    // (the later fragments have no TCP header and note nothing).
    let forward = fx
        .conntrack()?
        .into_iter()
        .find(|(_, key, _)| key.dir == CT_DIR_FORWARD)
        .context("no forward entry")?;
    ensure!(
        forward.2.seq_next == 1001 + 28,
        "seq_next {}",
        forward.2.seq_next
    );
    Ok(())
}

fn fragments_pod_reply(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, UDP_POD)],
    ))?;
    xdp_action(
        fx,
        topo,
        &Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC),
        XDP_PASS,
    )?;
    let reply = big_datagram(UDP_POD, CLIENT, (POD_MAC, POD_HOST_MAC));
    let frags = fragment(&reply.bytes(), CHUNK);
    let mut outputs = Vec::new();
    for (i, frag) in frags.iter().enumerate() {
        let before = fx.counters()?;
        let (ret, out) = fx.tc_pod(topo, frag)?;
        ensure!(ret == TC_ACT_REDIRECT, "fragment {i}: tc verdict {ret}");
        check_counters(fx, &before, &[(Counter::ForwardedPodReply, 1)])?;
        outputs.push(out);
    }
    check_fragments(
        &outputs,
        &reply
            .clone()
            .addrs(sa(FRONTEND), sa(CLIENT))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    // A later fragment from the pod before its first may be a reply's: dropped, counted.
    let mut next = reply.clone();
    next.ip_id = 0x4321;
    let frags = fragment(&next.bytes(), CHUNK);
    let before = fx.counters()?;
    let (ret, _) = fx.tc_pod(topo, &frags[2])?;
    ensure!(ret == TC_ACT_SHOT, "tc verdict {ret}");
    check_counters(fx, &before, &[(Counter::DroppedFragmentOutOfOrder, 1)])
}

fn fragments_not_ours(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // A Service without endpoints.
    fx.add_service(&ServiceSpec::new(2, FRONTEND, IPPROTO_UDP, vec![]))?;
    // A datagram to a port no frontend uses: its first fragment and then its later ones go
    // to the kernel untouched (each counted).
    let other = big_datagram(CLIENT, "198.18.0.1:9999", (CLIENT_MAC, EXT_MAC));
    let frags = fragment(&other.bytes(), CHUNK);
    let first = xdp_fragments(fx, topo, &frags[..1], XDP_PASS, Counter::PassedNoFrontend)?;
    let later = xdp_fragments(
        fx,
        topo,
        &frags[1..],
        XDP_PASS,
        Counter::PassedLaterFragment,
    )?;
    for (run, frag) in first.iter().chain(&later).zip(&frags) {
        check_unchanged(run, frag)?;
    }
    // A datagram to the Service without endpoints: its first fragment is answered (port
    // unreachable), the later ones cannot start a connection without ports: dropped.
    let datagram = big_datagram(CLIENT, FRONTEND, (CLIENT_MAC, EXT_MAC));
    let frags = fragment(&datagram.bytes(), CHUNK);
    xdp_fragments(fx, topo, &frags[..1], XDP_TX, Counter::RejectedNoBackend)?;
    let later = xdp_fragments(fx, topo, &frags[1..], XDP_DROP, Counter::DroppedFragment)?;
    for (run, frag) in later.iter().zip(&frags[1..]) {
        check_unchanged(run, frag)?;
    }
    ensure!(fx.conntrack()?.is_empty(), "a connection was recorded");
    Ok(())
}

fn ttl_exceeded(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    // As a router (the kernel's forwarding, so kube-proxy's path) answers: an ICMP time
    // exceeded from the address the packet was sent to, quoting it as the client sent it.
    let input = from_client(40000, FRONTEND, SYN).ttl(1);
    let run = xdp_counted(
        fx,
        topo,
        &input,
        XDP_TX,
        &[(Counter::AnsweredTtlExceeded, 1)],
    )?;
    check_icmp_answer(
        &run.frame,
        &input.bytes(),
        etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ),
    )
}

fn no_route(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // A local backend the node has no route to: translated, then routed by the kernel.
    fx.add_service(&local_service(1, vec![local(1, "198.18.9.9:8080")]))?;
    let before = fx.counters()?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_frame(
        &run.frame,
        &input.clone().addrs(sa(CLIENT), sa("198.18.9.9:8080")),
    )?;
    ensure!(run.meta.is_none());
    check_counters(fx, &before, &[(Counter::FallbackFibLookup, 1)])?;
    // A remote backend without a route cannot be SNATed: the packet goes on untranslated.
    fx.add_service(&ServiceSpec::new(
        2,
        "198.18.0.1:30081",
        IPPROTO_TCP,
        vec![remote(2, "198.18.9.9:8080")],
    ))?;
    let before = fx.counters()?;
    let input = from_client(40000, "198.18.0.1:30081", SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_unchanged(&run, &input.bytes())?;
    check_counters(fx, &before, &[(Counter::FallbackFibLookup, 1)])
}

fn no_neighbour(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, "198.18.1.99:8080")]))?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_frame(
        &run.frame,
        &input
            .clone()
            .addrs(sa(CLIENT), sa("198.18.1.99:8080"))
            .ttl(63),
    )?;
    let meta = run.meta.context("no metadata")?;
    ensure!(
        meta.flags & XDP_META_F_NEIGH != 0 && meta.ifindex == topo.pod_ifindex,
        "{meta:?}"
    );
    Ok(())
}

fn unconfigured(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    fx.set_config(nodeport_common::DatapathConfig::default())?;
    let before = fx.counters()?;
    let input = from_client(40000, FRONTEND, SYN);
    let run = xdp_action(fx, topo, &input, XDP_PASS)?;
    check_unchanged(&run, &input.bytes())?;
    check_counters(fx, &before, &[(Counter::PassedNoFrontend, 1)])
}

fn next_hop_cache(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // A huge tick rate stretches "one second" far past the test, so nothing goes stale by itself.
    fx.set_config(nodeport_common::DatapathConfig {
        hz: 1_000_000,
        ..default_config()
    })?;
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    // An established connection caches its next hop (one in the handshake asks the FIB).
    let port = snat_syn(fx, topo, 40000)?;
    xdp_action(fx, topo, &backend_reply(port, SYN_ACK), XDP_TX)?;
    let first =
        parse_checked(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?.frame)?;
    ensure!(first.eth_dst == NODE2_MAC);
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?;
    // Plant a marker in the cached next hop: the next packet must use it, not the FIB.
    let (key, mut entry) = *fx
        .established()?
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .context("no forward entry")?;
    ensure!(
        entry.route_checked != 0,
        "the first packet cached no next hop: {entry:?}"
    );
    let marker = [2, 0, 0, 0, 0, 0x99];
    entry.route_dmac = marker;
    fx.dp.maps.conntrack.insert(key, entry, 0)?;
    let cached =
        parse_checked(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?.frame)?;
    ensure!(
        cached.eth_dst == marker,
        "cached next hop not used: {cached:?}"
    );
    // Stale: the FIB is asked again and the cache corrected.
    entry.route_checked = LONG_AGO;
    fx.dp.maps.conntrack.insert(key, entry, 0)?;
    let fresh =
        parse_checked(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?.frame)?;
    ensure!(
        fresh.eth_dst == NODE2_MAC,
        "stale next hop not re-checked: {fresh:?}"
    );
    Ok(())
}

fn affinity_skips_draining(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let mut svc = local_service(1, three_backends());
    svc.flags = FE_F_AFFINITY;
    svc.affinity_timeout_s = 10800;
    fx.add_service(&svc)?;
    let sticky =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    // The backend starts terminating: out of the table and draining, as the agent writes it.
    let sticky_id = fx.take_out_of_table(&svc, &sticky)?;
    fx.set_draining(sticky_id)?;
    let next =
        backend_of(&xdp_action(fx, topo, &from_client(40001, FRONTEND, SYN), XDP_PASS)?.frame)?;
    ensure!(
        next != sticky,
        "affinity sent a new connection to draining {sticky}"
    );
    // The client's first connection is established and stays.
    let same =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?.frame)?;
    ensure!(same == sticky, "the established connection moved to {same}");
    Ok(())
}

fn draining_tcp_stays_udp_moves(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let tcp = local_service(1, vec![local(1, POD_A), local(2, POD_B)]);
    fx.add_service(&tcp)?;
    let udp = ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(3, "198.18.1.10:5353"), local(4, "198.18.1.11:5353")],
    );
    fx.add_service(&udp)?;
    let t = backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?.frame)?;
    let datagram = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    let u = backend_of(&xdp_action(fx, topo, &datagram, XDP_PASS)?.frame)?;
    let (t_id, t_other) = other_backend(&tcp, &t);
    let (u_id, u_other) = other_backend(&udp, &u);
    fx.set_table(&tcp, &[t_other])?;
    fx.set_draining(t_id)?;
    fx.set_table(&udp, &[u_other])?;
    fx.set_draining(u_id)?;
    let t_again =
        backend_of(&xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?.frame)?;
    ensure!(
        t_again == t,
        "the TCP connection left its draining backend for {t_again}"
    );
    // A UDP flow stays on a terminating backend while it serves (kube-proxy clears UDP
    // conntrack entries only of endpoints that stopped serving), and moves once it does not.
    let u_again = backend_of(&xdp_action(fx, topo, &datagram, XDP_PASS)?.frame)?;
    ensure!(
        u_again == u,
        "the UDP flow left {u}, still serving, for {u_again}"
    );
    fx.set_not_serving(u_id)?;
    let u_moved = backend_of(&xdp_action(fx, topo, &datagram, XDP_PASS)?.frame)?;
    ensure!(
        u_moved != u,
        "the UDP flow stayed on {u}, no longer serving"
    );
    Ok(())
}

// ---- connection tracking (issue 11) and tuple clashes (issue 17) ----------------------------

fn pod_reply(sport: u16, flags: nodeport_tests::packet::TcpFlags) -> Pkt {
    Pkt::tcp(sa(POD_A), sa(&format!("198.18.0.100:{sport}")), flags).macs(POD_MAC, POD_HOST_MAC)
}

/// Where the entries of the connection from the client's `sport` are: (established, handshake).
fn tables_of(fx: &Fixture, sport: u16) -> Result<(usize, usize)> {
    let mine = |entries: Vec<(nodeport_common::CtKey, CtEntry)>| {
        entries
            .iter()
            .filter(|(k, e)| {
                let client_port = if k.dir == CT_DIR_FORWARD {
                    k.sport_be
                } else {
                    e.new_dport_be
                };
                u16::from_be(client_port) == sport
            })
            .count()
    };
    Ok((mine(fx.established()?), mine(fx.handshake()?)))
}

fn handshake_then_established(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    ensure!(tables_of(fx, 40000)? == (0, 2), "after the SYN");
    // The SYN-ACK alone establishes nothing: a spoofed SYN's answer must not hold an entry
    // (and a SNAT port) for the established timeout.
    let (ret, _) = fx.tc_pod(topo, &pod_reply(40000, SYN_ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    ensure!(tables_of(fx, 40000)? == (0, 2), "after the SYN-ACK");
    for (k, e) in fx.handshake()? {
        ensure!(
            e.state.replied == 1 && e.state.established == 0,
            "{k:?}: {:?}",
            e.state
        );
    }
    // The client's ACK completes the handshake: both entries move to the established table.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    ensure!(tables_of(fx, 40000)? == (2, 0), "after the ACK");
    for (k, e) in fx.established()? {
        ensure!(e.state.established == 1, "{k:?}: {:?}", e.state);
    }
    // And it goes on working from there, both ways.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    let (ret, _) = fx.tc_pod(topo, &pod_reply(40000, ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    Ok(())
}

fn udp_established_by_answer(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(1, "198.18.1.10:5353")],
    ))?;
    let query = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    xdp_action(fx, topo, &query, XDP_PASS)?;
    xdp_action(fx, topo, &query, XDP_PASS)?;
    ensure!(tables_of(fx, 40000)? == (0, 2), "unanswered");
    let answer = Pkt::udp(sa("198.18.1.10:5353"), sa(CLIENT)).macs(POD_MAC, POD_HOST_MAC);
    let (ret, _) = fx.tc_pod(topo, &answer.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    ensure!(tables_of(fx, 40000)? == (2, 0), "answered");
    Ok(())
}

fn rst_restored_by_traffic(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    establish_local(fx, topo, 40000)?;
    // An RST "from the client" (spoofed, or one the client's stack did not mean).
    let rst = from_client(40000, FRONTEND, RST).payload(&[]);
    xdp_action(fx, topo, &rst, XDP_PASS)?;
    for (k, e) in fx.established()? {
        ensure!(
            e.state.closing(),
            "{k:?} not closing after RST: {:?}",
            e.state
        );
    }
    // The client goes on talking: the RST was not honoured, the connection is established.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    for (k, e) in fx.established()? {
        ensure!(
            !e.state.closing() && e.state.established == 1,
            "{k:?} not restored: {:?}",
            e.state
        );
    }
    // A new SYN on a closing connection still starts a new one (covered by syn_after_fin for
    // FIN); the pod's own RST closes it for good.
    let (ret, _) = fx.tc_pod(topo, &pod_reply(40000, RST).payload(&[]).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    for (k, e) in fx.established()? {
        ensure!(e.state.closing(), "{k:?} not closing: {:?}", e.state);
    }
    Ok(())
}

/// Only a SYN starts a connection: an ACK (a connection kube-proxy carried while nodeport was
/// off), data, an RST or a SYN-ACK to a frontend without a connection is the kernel's,
/// untouched, and starts nothing.
fn not_syn_without_connection(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    let before = fx.counters()?;
    let data = from_client(40000, FRONTEND, ACK).payload(b"mid-stream");
    for input in [
        from_client(40000, FRONTEND, ACK),
        data,
        from_client(40000, FRONTEND, RST),
        from_client(40000, FRONTEND, SYN_ACK),
    ] {
        let run = xdp_action(fx, topo, &input, XDP_PASS)?;
        check_unchanged(&run, &input.bytes())?;
    }
    check_counters(fx, &before, &[(Counter::PassedNotSyn, 4)])?;
    ensure!(fx.conntrack()?.is_empty(), "an entry was created");
    Ok(())
}

fn martian_sources(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    // The agent lists the node's addresses and pod networks.
    fx.dp.maps.local_nets.insert(
        &aya::maps::lpm_trie::Key::new(
            24,
            nodeport_common::LocalNetKey {
                addr_be: u32::from(Ipv4Addr::new(198, 18, 7, 0)).to_be(),
            },
        ),
        1,
        0,
    )?;
    let before = fx.counters()?;
    let sources = [
        "127.0.0.1:40000",
        "0.1.2.3:40000",
        "224.0.0.5:40000",
        "255.255.255.255:40000",
        "198.18.7.9:40000",
    ];
    for src in sources {
        let input = Pkt::tcp(sa(src), sa(FRONTEND), SYN).macs(CLIENT_MAC, EXT_MAC);
        let run = xdp_action(fx, topo, &input, XDP_DROP)?;
        check_unchanged(&run, &input.bytes())?;
    }
    check_counters(
        fx,
        &before,
        &[(Counter::DroppedMartianSource, sources.len() as u64)],
    )?;
    ensure!(fx.conntrack()?.is_empty(), "an entry was created");
    // Next to them, a real client is served.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    Ok(())
}

/// A remote connection's SYN; returns the SNAT port.
fn snat_syn(fx: &mut Fixture, topo: &Topology, sport: u16) -> Result<u16> {
    let run = xdp_action(fx, topo, &from_client(sport, FRONTEND, SYN), XDP_TX)?;
    Ok(parse_checked(&run.frame)?.src.port())
}

fn backend_reply(port: u16, flags: nodeport_tests::packet::TcpFlags) -> Pkt {
    Pkt::tcp(sa(REMOTE_A), sa(&format!("198.18.0.1:{port}")), flags).macs(NODE2_MAC, EXT_MAC)
}

fn replies_bound_to_their_device(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let port = snat_syn(fx, topo, 40000)?;
    let before = fx.counters()?;
    // The backend's SYN-ACK from the pod side (a pod spoofing the remote backend) or from
    // another device: dropped, never let into the connection.
    let spoofed = backend_reply(port, SYN_ACK);
    let run = fx.xdp_on(topo, topo.pod_ifindex, &spoofed.bytes())?;
    ensure!(run.action == XDP_DROP, "XDP action {}", run.action);
    let (ret, _) = fx.tc_pod(topo, &spoofed.clone().macs(POD_MAC, POD_HOST_MAC).bytes())?;
    ensure!(
        ret == TC_ACT_SHOT,
        "pod hook let a SNAT reply through: {ret}"
    );
    check_counters(fx, &before, &[(Counter::DroppedReplyWrongInterface, 2)])?;
    for (_, k, e) in fx.conntrack()? {
        ensure!(e.state.replied == 0, "{k:?} took the spoofed reply");
    }
    // From where the connection left by, it passes.
    xdp_action(fx, topo, &spoofed, XDP_TX)?;

    // A local pod's replies: bound to the device the first one came from.
    fx.add_service(&ServiceSpec::new(
        2,
        "198.18.3.3:80",
        IPPROTO_TCP,
        vec![local(2, POD_A)],
    ))?;
    xdp_action(
        fx,
        topo,
        &from_client(41000, "198.18.3.3:80", SYN),
        XDP_PASS,
    )?;
    let reply = pod_reply(41000, SYN_ACK);
    let (ret, _) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "first reply: {ret}");
    // Another pod's device (here: ext0's index, standing for any other veth).
    let (ret, _) = fx.tc_pod_on(topo, topo.ext_ifindex, &pod_reply(41000, ACK).bytes())?;
    ensure!(
        ret == TC_ACT_SHOT,
        "a reply from another device went through: {ret}"
    );
    let (ret, _) = fx.tc_pod(topo, &pod_reply(41000, ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "the pod's own reply: {ret}");
    Ok(())
}

fn one_way_udp_keeps_its_port(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // One SNAT port: whoever holds it holds the whole range.
    fx.set_config(nodeport_common::DatapathConfig {
        snat_port_min: 61000,
        snat_port_max: 61000,
        ..default_config()
    })?;
    fx.add_service(&ServiceSpec::new(
        1,
        FRONTEND,
        IPPROTO_UDP,
        vec![remote(1, REMOTE_A)],
    ))?;
    let stream = |sport: u16| {
        Pkt::udp(sa(&format!("198.18.0.100:{sport}")), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC)
    };
    xdp_action(fx, topo, &stream(40000), XDP_TX)?;
    // The stream goes on one way (syslog, metrics): its reply entry sees nothing and ages
    // past the UDP timeout, its forward entry stays fresh.
    age_entry(fx, CT_DIR_REPLY)?;
    xdp_action(fx, topo, &stream(40000), XDP_TX)?;
    // Another flow must not be handed the port: that would cross the two.
    let before = fx.counters()?;
    xdp_action(fx, topo, &stream(40001), XDP_DROP)?;
    check_counters(fx, &before, &[(Counter::DroppedSnatExhausted, 1)])?;
    // Once both directions are idle past the timeout, the port is free again.
    age_entry(fx, CT_DIR_FORWARD)?;
    xdp_action(fx, topo, &stream(40001), XDP_TX)?;
    Ok(())
}

fn revive_idle_connection(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let svc = two_backend_service(fx)?;
    establish_local(fx, topo, 40000)?;
    let first = fx
        .established()?
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .map(|(_, e)| e.new_daddr_be)
        .context("no forward entry")?;
    let first = Ipv4Addr::from(u32::from_be(first));
    // The table changes and the connection idles past its timeout, both directions.
    let chosen = svc
        .backends
        .iter()
        .find(|b| *b.addr.ip() == first)
        .map(|b| b.id)
        .context("known")?;
    let other = svc
        .backends
        .iter()
        .find(|b| b.id != chosen)
        .context("two")?;
    fx.set_table(&svc, &[other.id])?;
    age_entry(fx, CT_DIR_FORWARD)?;
    age_entry(fx, CT_DIR_REPLY)?;
    // Data from the client: the connection is whole and its backend there, so it goes on
    // where it was (a new backend would answer with an RST).
    let before = fx.counters()?;
    let run = xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    ensure!(
        parse_checked(&run.frame)?.dst.ip() == &first,
        "revived onto another backend"
    );
    check_counters(
        fx,
        &before,
        &[(Counter::ForwardedToTc, 1), (Counter::EventCtRevived, 1)],
    )?;
    // A new SYN on an idle tuple is a new connection.
    age_entry(fx, CT_DIR_FORWARD)?;
    age_entry(fx, CT_DIR_REPLY)?;
    let run = xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    ensure!(
        parse_checked(&run.frame)?.dst.ip() == other.addr.ip(),
        "a new SYN kept the old backend"
    );
    Ok(())
}

fn lost_partner_recreated_or_dropped(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let port = snat_syn(fx, topo, 40000)?;
    // The reply entry (holding the SNAT port) is lost, e.g. evicted from the handshake table.
    let (reply_key, _) = fx
        .handshake()?
        .into_iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY)
        .context("no reply entry")?;
    fx.dp.maps.conntrack_new.remove(&reply_key)?;
    // The client's next packet puts it back, with the same port. (A retransmitted SYN would
    // start over, on the same port too: `conntrack::on_forward`.)
    let before = fx.counters()?;
    let run = xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?;
    ensure!(
        parse_checked(&run.frame)?.src.port() == port,
        "port changed"
    );
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedXdpTx, 1),
            (Counter::EventCtPartnerRecreated, 1),
        ],
    )?;
    xdp_action(fx, topo, &backend_reply(port, SYN_ACK), XDP_TX)?;

    // Lost again, and meanwhile another connection took the tuple: the old connection's
    // packets are dropped, never delivered into the other one.
    fx.dp.maps.conntrack_new.remove(&reply_key)?;
    let mut taken = fx
        .handshake()?
        .into_iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .context("no forward entry")?
        .1;
    taken.new_dport_be = 41234u16.to_be();
    let thief = CtEntry {
        new_saddr_be: u32::from(Ipv4Addr::new(198, 18, 0, 1)).to_be(),
        new_daddr_be: u32::from(Ipv4Addr::new(198, 18, 0, 99)).to_be(),
        ..taken
    };
    fx.dp.maps.conntrack_new.insert(reply_key, thief, 0)?;
    let before = fx.counters()?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_DROP)?;
    check_counters(fx, &before, &[(Counter::DroppedCtPartnerLost, 1)])?;
    Ok(())
}

fn promotion_when_established_table_full(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    // Fill the established table with other connections.
    let capacity = sizing().conntrack;
    for n in 0..capacity {
        let key = nodeport_common::CtKey {
            saddr_be: u32::from(Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8)).to_be(),
            daddr_be: u32::from(NODE_IP).to_be(),
            sport_be: 1000u16.to_be(),
            dport_be: 30080u16.to_be(),
            proto: IPPROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        fx.dp.maps.conntrack.insert(key, CtEntry::default(), 0)?;
    }
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    let (ret, _) = fx.tc_pod(topo, &pod_reply(40000, SYN_ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    let before = fx.counters()?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedToTc, 1),
            (Counter::EventCtPromoteFailed, 1),
        ],
    )?;
    // It stays in the handshake table and keeps working from there, both ways.
    ensure!(tables_of(fx, 40000)? == (0, 2));
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    let (ret, _) = fx.tc_pod(topo, &pod_reply(40000, ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    Ok(())
}

fn local_tuple_clash(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // One pod behind two frontends (a node port and a LoadBalancer IP).
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    fx.add_service(&ServiceSpec::new(
        2,
        "198.18.3.3:80",
        IPPROTO_TCP,
        vec![local(2, POD_A)],
    ))?;
    let first = xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    ensure!(parse_checked(&first.frame)?.src == sa(CLIENT));
    // The same client address and port to the other frontend: at the pod both would be
    // 198.18.0.100:40000 -> POD_A. The second gets another source port.
    let before = fx.counters()?;
    let second = xdp_action(
        fx,
        topo,
        &from_client(40000, "198.18.3.3:80", SYN),
        XDP_PASS,
    )?;
    let seen = parse_checked(&second.frame)?;
    ensure!(
        seen.src.ip() == &CLIENT_IP && seen.src.port() != 40000 && seen.dst == sa(POD_A),
        "second connection at the pod: {seen:?}"
    );
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedToTc, 1),
            (Counter::EventTupleClashRewritten, 1),
        ],
    )?;
    // Each connection's replies leave from its own frontend, to the client's real port.
    let (ret, out) = fx.tc_pod(topo, &pod_reply(40000, SYN_ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    let out = parse_checked(&out)?;
    ensure!(
        out.src == sa(FRONTEND) && out.dst == sa(CLIENT),
        "first: {out:?}"
    );
    let (ret, out) = fx.tc_pod(topo, &pod_reply(seen.src.port(), SYN_ACK).bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    let out = parse_checked(&out)?;
    ensure!(
        out.src == sa("198.18.3.3:80") && out.dst == sa(CLIENT),
        "second: {out:?}"
    );
    // The first connection's packets still reach the pod on the client's own port.
    let again = xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_PASS)?;
    ensure!(parse_checked(&again.frame)?.src == sa(CLIENT));
    Ok(())
}

fn snat_ports_from_both_ranges_not_frontends(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // Two ranges of two ports each; 61001 is also a frontend port.
    fx.set_config(nodeport_common::DatapathConfig {
        snat_port_min: 61000,
        snat_port_max: 61001,
        snat_port_min2: 62000,
        snat_port_max2: 62001,
        ..default_config()
    })?;
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    fx.add_service(&ServiceSpec::new(
        2,
        "198.18.3.3:61001",
        IPPROTO_TCP,
        vec![local(2, POD_A)],
    ))?;
    let mut ports = std::collections::BTreeSet::new();
    for sport in 40000..40003 {
        ports.insert(snat_syn(fx, topo, sport)?);
    }
    ensure!(
        ports == [61000, 62000, 62001].into(),
        "ports {ports:?}: expected both ranges, without the frontend port"
    );
    xdp_action(fx, topo, &from_client(40003, FRONTEND, SYN), XDP_DROP)?;
    Ok(())
}

fn snat_port_depends_on_the_node_secret(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let mut ports = Vec::new();
    for secret in [1, 2, 3, 4] {
        for (key, _) in fx.handshake()? {
            fx.dp.maps.conntrack_new.remove(&key)?;
        }
        fx.set_config(nodeport_common::DatapathConfig {
            snat_secret: secret,
            ..default_config()
        })?;
        ports.push(snat_syn(fx, topo, 40000)?);
    }
    ports.dedup();
    ensure!(
        ports.len() > 1,
        "the same flow got port {ports:?} whatever the secret: predictable from outside"
    );
    Ok(())
}

fn rst_outside_the_window_is_ignored(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    establish_local(fx, topo, 40000)?;
    let open = |fx: &Fixture| -> Result<()> {
        for (k, e) in fx.established()? {
            ensure!(
                !e.state.closing() && e.state.established == 1,
                "{k:?}: {:?}",
                e.state
            );
        }
        Ok(())
    };
    // A blind guess from either side, 16 MiB away from the sender's sequence: it goes on to
    // the endpoint (whose stack drops it as well) and the connection stays open.
    let before = fx.counters()?;
    let spoof = from_client(40000, FRONTEND, RST)
        .payload(&[])
        .seq(1000 + (16 << 20));
    xdp_action(fx, topo, &spoof, XDP_PASS)?;
    let (ret, _) = fx.tc_pod(
        topo,
        &pod_reply(40000, RST)
            .payload(&[])
            .seq(1000 + (16 << 20))
            .bytes(),
    )?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedToTc, 1),
            (Counter::ForwardedPodReply, 1),
            (Counter::EventCtRstIgnored, 2),
        ],
    )?;
    open(fx)?;
    // One behind what the pod acknowledged is stale too.
    xdp_action(fx, topo, &spoof.clone().seq(999), XDP_PASS)?;
    open(fx)?;
    // At the client's sequence: taken.
    xdp_action(fx, topo, &spoof.seq(1000), XDP_PASS)?;
    for (k, e) in fx.established()? {
        ensure!(e.state.closing(), "{k:?} not closing: {:?}", e.state);
    }
    Ok(())
}

fn first_answer_must_come_from_the_backend(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    let bound = |fx: &Fixture| -> Result<u32> {
        fx.conntrack()?
            .into_iter()
            .find(|(_, k, _)| k.dir == CT_DIR_REPLY)
            .map(|(_, _, e)| e.bound_ifindex)
            .context("no reply entry")
    };
    let before = fx.counters()?;
    // An answer acknowledging what the client never sent (a pod guessing), and one without
    // an acknowledgement at all: neither binds the connection.
    for reply in [
        pod_reply(40000, SYN_ACK).ack(77_000_000),
        pod_reply(40000, SYN),
    ] {
        let (ret, _) = fx.tc_pod(topo, &reply.bytes())?;
        ensure!(ret == TC_ACT_SHOT, "{reply:?}: tc verdict {ret}");
    }
    // From a device the backend is not behind, with another MAC address.
    let (ret, _) = fx.tc_pod_on(
        topo,
        topo.ext_ifindex,
        &pod_reply(40000, SYN_ACK).macs(NODE2_MAC, EXT_MAC).bytes(),
    )?;
    ensure!(ret == TC_ACT_SHOT, "another device: tc verdict {ret}");
    check_counters(
        fx,
        &before,
        &[
            (Counter::DroppedCtInvalid, 2),
            (Counter::DroppedReplyWrongInterface, 1),
        ],
    )?;
    ensure!(bound(fx)? == 0, "bound by a spoofed answer");
    // The backend's answer through a bridge port (another device, the backend's own MAC, as
    // the node's neighbour table knows it): taken, and the connection bound there.
    let (ret, _) = fx.tc_pod_on(topo, topo.ext_ifindex, &pod_reply(40000, SYN_ACK).bytes())?;
    ensure!(
        ret == TC_ACT_REDIRECT,
        "the backend's answer: tc verdict {ret}"
    );
    ensure!(
        bound(fx)? == topo.ext_ifindex,
        "not bound to the bridge port"
    );
    Ok(())
}

/// A service whose one backend is remote, with a single SNAT port: whoever holds it holds the
/// whole range.
fn one_snat_port(fx: &mut Fixture) -> Result<()> {
    fx.set_config(nodeport_common::DatapathConfig {
        snat_port_min: 61000,
        snat_port_max: 61000,
        ..default_config()
    })?;
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))
}

fn closed_connection_snat_port_taken_over(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    // One SNAT port, held by one connection.
    one_snat_port(fx)?;
    let port = snat_syn(fx, topo, 40000)?;
    xdp_action(fx, topo, &backend_reply(port, SYN_ACK), XDP_TX)?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_TX)?;
    let later_syn = from_client(40001, FRONTEND, SYN).seq(1_000_000);
    // Open, the connection keeps its port whatever the newcomer's sequence.
    xdp_counted(
        fx,
        topo,
        &later_syn,
        XDP_DROP,
        &[(Counter::DroppedSnatExhausted, 1)],
    )?;
    // Closed both ways just now: the close's last ACK may still be on its way.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, FIN_ACK), XDP_TX)?;
    xdp_action(fx, topo, &backend_reply(port, FIN_ACK), XDP_TX)?;
    xdp_counted(
        fx,
        topo,
        &later_syn,
        XDP_DROP,
        &[(Counter::DroppedSnatExhausted, 1)],
    )?;
    // Quiet since: a SYN before the old client's sequence would be taken by a backend socket
    // in TIME_WAIT as the old connection's, so it may not have the port.
    age_entry(fx, CT_DIR_REPLY)?;
    xdp_counted(
        fx,
        topo,
        &later_syn.clone().seq(500),
        XDP_DROP,
        &[(Counter::DroppedSnatExhausted, 1)],
    )?;
    // Past it, the SYN takes the port.
    let run = xdp_counted(
        fx,
        topo,
        &later_syn,
        XDP_TX,
        &[
            (Counter::ForwardedXdpTx, 1),
            (Counter::EventSnatTakeover, 1),
        ],
    )?;
    ensure!(
        parse_checked(&run.frame)?.src.port() == port,
        "another port"
    );
    // The old client's late packet finds its forward entry unpaired: dropped, never sent to
    // the backend on the new connection's tuple (its cached route is still fresh).
    xdp_counted(
        fx,
        topo,
        &from_client(40000, FRONTEND, ACK),
        XDP_DROP,
        &[(Counter::DroppedCtPartnerLost, 1)],
    )?;
    Ok(())
}

fn abandoned_handshake_snat_port_taken_over(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    one_snat_port(fx)?;
    // A SYN (spoofed, say) that the backend answered and nobody completed.
    let port = snat_syn(fx, topo, 40000)?;
    xdp_action(fx, topo, &backend_reply(port, SYN_ACK), XDP_TX)?;
    let newcomer = from_client(40001, FRONTEND, SYN);
    xdp_counted(
        fx,
        topo,
        &newcomer,
        XDP_DROP,
        &[(Counter::DroppedSnatExhausted, 1)],
    )?;
    // Three seconds of quiet on the backend's side: the port goes to a new SYN.
    age_entry(fx, CT_DIR_REPLY)?;
    xdp_counted(
        fx,
        topo,
        &newcomer,
        XDP_TX,
        &[
            (Counter::ForwardedXdpTx, 1),
            (Counter::EventSnatTakeover, 1),
        ],
    )?;
    // The old client's ACK is dropped; its retransmitted SYN starts a new connection (which
    // finds no port here: the range is one port, now the newcomer's).
    let before = fx.counters()?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, ACK), XDP_DROP)?;
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_DROP)?;
    check_counters(
        fx,
        &before,
        &[
            (Counter::DroppedCtPartnerLost, 1),
            (Counter::DroppedSnatExhausted, 1),
        ],
    )?;
    Ok(())
}

fn loopback_destinations_dropped(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    // Even with a frontend there (the agent never programs one, but a stale or hand-made
    // entry must not matter).
    fx.add_service(&ServiceSpec::new(
        2,
        "127.0.0.1:30080",
        IPPROTO_TCP,
        vec![local(2, POD_A)],
    ))?;
    for dst in ["127.0.0.1:30080", "127.1.2.3:30080", "0.0.0.1:30080"] {
        let input = from_client(40000, dst, SYN);
        let run = xdp_counted(
            fx,
            topo,
            &input,
            XDP_DROP,
            &[(Counter::DroppedMartianDestination, 1)],
        )?;
        check_unchanged(&run, &input.bytes())?;
    }
    ensure!(fx.conntrack()?.is_empty(), "a connection was made");
    Ok(())
}

/// The whole IPv4 packet of `pkt` (no Ethernet): what an ICMP error quotes.
fn ip_packet(pkt: &Pkt) -> Vec<u8> {
    pkt.bytes()[14..].to_vec()
}

fn icmp_errors_translated(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let router: Ipv4Addr = "198.18.0.254".parse()?;
    let client_ip = *sa(CLIENT).ip();
    let node_ip = *sa(FRONTEND).ip();

    // 1. SNAT: a router on the way to the remote backend cannot forward the SNATed SYN
    // (fragmentation needed, MTU 1400) and tells the node's SNAT address. The client gets
    // it, quoting its own SYN, from the frontend.
    fx.add_service(&local_service(1, vec![remote(1, REMOTE_A)]))?;
    let syn = from_client(40000, FRONTEND, SYN);
    let port = snat_syn(fx, topo, 40000)?;
    let snated = syn
        .clone()
        .addrs(sa(&format!("198.18.0.1:{port}")), sa(REMOTE_A))
        .ttl(63);
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        });
    let error = icmp_error(
        (NODE2_MAC, EXT_MAC),
        router,
        node_ip,
        frag_needed.clone(),
        &ip_packet(&snated),
    );
    let run = fx.xdp(topo, &error)?;
    ensure!(run.action == XDP_TX, "XDP action {}", run.action);
    let seen = parse_icmp_error(&run.frame)?;
    ensure!(
        (
            seen.eth_src,
            seen.eth_dst,
            seen.src,
            seen.dst,
            seen.ttl,
            &seen.kind
        ) == (EXT_MAC, CLIENT_MAC, node_ip, client_ip, 63, &frag_needed),
        "{seen:?}"
    );
    ensure!(
        (seen.quoted.src, seen.quoted.dst) == (sa(CLIENT), sa(FRONTEND)),
        "the client's SYN is not quoted as it sent it: {seen:?}"
    );
    // The same error from another device than the connection's is not let in.
    let run = fx.xdp_on(topo, topo.pod_ifindex, &error)?;
    ensure!(run.action == XDP_DROP, "XDP action {}", run.action);

    // 2. The client's host answers the backend's SYN-ACK (sent from the frontend) with a
    // port unreachable: it reaches the remote backend, from the SNAT address, quoting the
    // SYN-ACK as the backend sent it.
    let syn_ack_out = backend_reply(port, SYN_ACK)
        .addrs(sa(FRONTEND), sa(CLIENT))
        .ttl(63);
    let port_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let error = icmp_error(
        (CLIENT_MAC, EXT_MAC),
        client_ip,
        node_ip,
        port_unreachable.clone(),
        &ip_packet(&syn_ack_out),
    );
    let before = fx.counters()?;
    let run = fx.xdp(topo, &error)?;
    ensure!(run.action == XDP_TX, "XDP action {}", run.action);
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedXdpTx, 1),
            (Counter::EventIcmpErrorTranslated, 1),
        ],
    )?;
    let seen = parse_icmp_error(&run.frame)?;
    ensure!(
        (seen.eth_dst, seen.src, seen.dst) == (NODE2_MAC, node_ip, *sa(REMOTE_A).ip()),
        "{seen:?}"
    );
    ensure!(
        (seen.quoted.src, seen.quoted.dst) == (sa(REMOTE_A), sa(&format!("198.18.0.1:{port}"))),
        "{seen:?}"
    );

    // 3. A local pod's closed UDP port: its port unreachable reaches the client, from the
    // frontend, quoting the datagram as the client sent it.
    fx.add_service(&ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(3, "198.18.1.10:5353")],
    ))?;
    let datagram = Pkt::udp(sa(CLIENT), sa(FRONTEND)).macs(CLIENT_MAC, EXT_MAC);
    xdp_action(fx, topo, &datagram, XDP_PASS)?;
    let at_pod = datagram
        .clone()
        .addrs(sa(CLIENT), sa("198.18.1.10:5353"))
        .ttl(63);
    let error = icmp_error(
        (POD_MAC, POD_HOST_MAC),
        *sa(POD_A).ip(),
        client_ip,
        port_unreachable.clone(),
        &ip_packet(&at_pod),
    );
    let before = fx.counters()?;
    let (ret, out) = fx.tc_pod(topo, &error)?;
    ensure!(ret == TC_ACT_REDIRECT, "tc verdict {ret}");
    check_counters(
        fx,
        &before,
        &[
            (Counter::ForwardedPodReply, 1),
            (Counter::EventIcmpErrorTranslated, 1),
        ],
    )?;
    let seen = parse_icmp_error(&out)?;
    ensure!(
        (seen.eth_src, seen.eth_dst, seen.src, seen.dst, seen.ttl)
            == (EXT_MAC, CLIENT_MAC, node_ip, client_ip, 63),
        "{seen:?}"
    );
    ensure!(
        (seen.quoted.src, seen.quoted.dst) == (sa(CLIENT), sa(FRONTEND)),
        "{seen:?}"
    );

    // 4. A router on the client's side about the pod's answer (sent from the frontend): to
    // the pod, the router's address kept, the answer quoted as the pod sent it.
    let answer_out = Pkt::udp(sa(FRONTEND), sa(CLIENT)).ttl(63);
    let time_exceeded =
        Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    let error = icmp_error(
        (CLIENT_MAC, EXT_MAC),
        router,
        node_ip,
        time_exceeded.clone(),
        &ip_packet(&answer_out),
    );
    let run = fx.xdp(topo, &error)?;
    ensure!(
        run.action == XDP_PASS && run.meta.is_some(),
        "XDP action {}",
        run.action
    );
    let seen = parse_icmp_error(&run.frame)?;
    ensure!(
        (seen.src, seen.dst, &seen.kind) == (router, *sa(POD_A).ip(), &time_exceeded),
        "{seen:?}"
    );
    ensure!(
        (seen.quoted.src, seen.quoted.dst) == (sa("198.18.1.10:5353"), sa(CLIENT)),
        "{seen:?}"
    );

    // 5. Errors about no connection, and echo requests, are the kernel's.
    let stranger = icmp_error(
        (CLIENT_MAC, EXT_MAC),
        client_ip,
        node_ip,
        port_unreachable,
        &ip_packet(&Pkt::udp(sa("198.18.0.1:53"), sa("198.18.0.100:999"))),
    );
    let echo = icmp_error(
        (CLIENT_MAC, EXT_MAC),
        client_ip,
        node_ip,
        Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
        b"ping",
    );
    for frame in [stranger, echo] {
        let before = fx.counters()?;
        let run = fx.xdp(topo, &frame)?;
        ensure!(
            run.action == XDP_PASS && run.frame == frame,
            "changed or not passed"
        );
        check_counters(fx, &before, &[(Counter::PassedOtherProtocol, 1)])?;
    }
    Ok(())
}

fn path_mtu(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    let narrow = format!("{NARROW_POD}:8080");
    fx.add_service(&local_service(1, vec![local(1, &narrow)]))?;
    let frag_needed = |mtu| {
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        )
    };
    let big = |sport: u16| {
        from_client(sport, FRONTEND, ACK)
            .seq(1001)
            .payload(&[b'x'; 1460])
    };
    // 1. In the handshake: the route's MTU from the FIB lookup. The router's answer, about
    // the segment as the client sent it, from the frontend; nothing recorded for it.
    xdp_action(fx, topo, &from_client(40000, FRONTEND, SYN), XDP_PASS)?;
    let segment = big(40000);
    let run = xdp_counted(
        fx,
        topo,
        &segment,
        XDP_TX,
        &[(Counter::AnsweredFragNeeded, 1)],
    )?;
    check_icmp_answer(&run.frame, &segment.bytes(), frag_needed(1400))?;
    // Without DF the kernel fragments it: translated and handed over.
    let run = xdp_counted(
        fx,
        topo,
        &segment.clone().may_fragment(),
        XDP_PASS,
        &[(Counter::FallbackFibLookup, 1)],
    )?;
    ensure!(
        parse_checked(&run.frame)?.dst == sa(&narrow),
        "not translated"
    );

    // 2. Established: the route's MTU from the connection's cached next hop.
    establish_with(fx, topo, 40001, &narrow)?;
    ensure!(tables_of(fx, 40001)? == (2, 0), "not established");
    let small = from_client(40001, FRONTEND, ACK)
        .seq(1001)
        .payload(&[b'x'; 1000]);
    xdp_action(fx, topo, &small, XDP_PASS)?;
    let segment = big(40001);
    let run = xdp_counted(
        fx,
        topo,
        &segment,
        XDP_TX,
        &[(Counter::AnsweredFragNeeded, 1)],
    )?;
    check_icmp_answer(&run.frame, &segment.bytes(), frag_needed(1400))?;

    // 3. A local pod's reply too big for the way to the client: with DF the kernel gets it
    // untranslated and tells the pod about its own packet; without, it gets it translated
    // and fragments it.
    let far_client = format!("{NARROW_CLIENT}:40002");
    let syn = Pkt::tcp(sa(&far_client), sa(FRONTEND), SYN).macs(CLIENT_MAC, EXT_MAC);
    xdp_action(fx, topo, &syn, XDP_PASS)?;
    let reply = Pkt::tcp(sa(&narrow), sa(&far_client), SYN_ACK)
        .macs(POD_MAC, POD_HOST_MAC)
        .payload(&[b'y'; 1460]);
    let before = fx.counters()?;
    let (ret, out) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_OK, "tc verdict {ret}");
    ensure!(out == reply.bytes(), "the pod's packet was changed");
    check_counters(fx, &before, &[(Counter::FallbackFragNeeded, 1)])?;
    let reply = reply.may_fragment();
    let (ret, out) = fx.tc_pod(topo, &reply.bytes())?;
    ensure!(ret == TC_ACT_OK, "tc verdict {ret}");
    ensure!(parse_checked(&out)?.src == sa(FRONTEND), "not translated");

    // 4. A new connection's first packet: a datagram too big with DF starts nothing.
    fx.add_service(&ServiceSpec::new(
        2,
        FRONTEND,
        IPPROTO_UDP,
        vec![local(2, &narrow)],
    ))?;
    let datagram = Pkt::udp(sa(CLIENT), sa(FRONTEND))
        .macs(CLIENT_MAC, EXT_MAC)
        .payload(&[b'x'; 1472]);
    let run = xdp_counted(
        fx,
        topo,
        &datagram,
        XDP_TX,
        &[(Counter::AnsweredFragNeeded, 1)],
    )?;
    check_icmp_answer(&run.frame, &datagram.bytes(), frag_needed(1400))?;
    ensure!(
        fx.conntrack()?
            .iter()
            .all(|(_, k, _)| k.proto != IPPROTO_UDP),
        "a connection was recorded for an answered datagram"
    );
    Ok(())
}

// ---- the TC hook (`--external-hook tc`) ----------------------------------------------------

/// Runs `pkt` through the external TC program (a GSO packet if `gso_size` is not 0),
/// expecting `verdict` and exactly the counter changes `counted`. Returns the frame.
fn tc_ext_counted(
    fx: &mut Fixture,
    topo: &Topology,
    pkt: &Pkt,
    gso_size: u32,
    verdict: i32,
    counted: &[(Counter, u64)],
) -> Result<Vec<u8>> {
    let before = fx.counters()?;
    let (ret, out) = fx.tc_ext(topo, &pkt.bytes(), gso_size)?;
    ensure!(ret == verdict, "tc verdict {ret}, expected {verdict}");
    check_counters(fx, &before, counted)?;
    Ok(out)
}

fn tc_hook_translates(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    const REMOTE_FRONTEND: &str = "198.18.0.1:30081";
    fx.add_service(&local_service(1, vec![local(1, POD_A)]))?;
    fx.add_service(&ServiceSpec::new(
        2,
        REMOTE_FRONTEND,
        IPPROTO_TCP,
        vec![remote(2, REMOTE_A)],
    ))?;
    let forwarded = [(Counter::ForwardedTcNat, 1)];
    // A local pod: DNAT, TTL decremented, Ethernet for the pod's device, redirected there.
    let syn = from_client(40000, FRONTEND, SYN);
    let out = tc_ext_counted(fx, topo, &syn, 0, TC_ACT_REDIRECT, &forwarded)?;
    check_frame(
        &out,
        &syn.clone()
            .addrs(sa(CLIENT), sa(POD_A))
            .ttl(63)
            .macs(POD_HOST_MAC, POD_MAC),
    )?;
    let syn_ack = Pkt::tcp(sa(POD_A), sa(CLIENT), SYN_ACK).macs(POD_MAC, POD_HOST_MAC);
    let (ret, _) = fx.tc_pod(topo, &syn_ack.bytes())?;
    ensure!(ret == TC_ACT_REDIRECT, "SYN-ACK: tc verdict {ret}");
    let ack = from_client(40000, FRONTEND, ACK);
    let out = tc_ext_counted(fx, topo, &ack, 0, TC_ACT_REDIRECT, &forwarded)?;
    check_frame(
        &out,
        &ack.clone()
            .addrs(sa(CLIENT), sa(POD_A))
            .ttl(63)
            .macs(POD_HOST_MAC, POD_MAC),
    )?;
    ensure!(tables_of(fx, 40000)? == (2, 0), "not established");

    // A remote backend: SNAT to the node, out of ext0 again; its reply back to the client.
    let syn = from_client(40001, REMOTE_FRONTEND, SYN);
    let out = tc_ext_counted(fx, topo, &syn, 0, TC_ACT_REDIRECT, &forwarded)?;
    let port = parse_checked(&out)?.src.port();
    ensure!(
        (61000..=61999).contains(&port),
        "SNAT port {port} outside the range"
    );
    check_frame(
        &out,
        &syn.clone()
            .addrs(sa(&format!("198.18.0.1:{port}")), sa(REMOTE_A))
            .ttl(63)
            .macs(EXT_MAC, NODE2_MAC),
    )?;
    let reply =
        Pkt::tcp(sa(REMOTE_A), sa(&format!("198.18.0.1:{port}")), SYN_ACK).macs(NODE2_MAC, EXT_MAC);
    let out = tc_ext_counted(fx, topo, &reply, 0, TC_ACT_REDIRECT, &forwarded)?;
    check_frame(
        &out,
        &reply
            .clone()
            .addrs(sa(REMOTE_FRONTEND), sa("198.18.0.100:40001"))
            .ttl(63)
            .macs(EXT_MAC, CLIENT_MAC),
    )?;
    // Not nodeport's: untouched, on to the stack.
    let other = from_client(40002, "198.18.0.1:22", SYN);
    let out = tc_ext_counted(
        fx,
        topo,
        &other,
        0,
        TC_ACT_UNSPEC,
        &[(Counter::PassedNoFrontend, 1)],
    )?;
    ensure!(out == other.bytes(), "a packet not nodeport's was changed");
    Ok(())
}

fn tc_hook_kernel_answers_and_gso(fx: &mut Fixture, topo: &Topology) -> Result<()> {
    const EMPTY: &str = "198.18.0.1:30082";
    let narrow = format!("{NARROW_POD}:8080");
    fx.add_service(&local_service(1, vec![local(1, &narrow)]))?;
    fx.add_service(&ServiceSpec::new(2, EMPTY, IPPROTO_TCP, vec![]))?;
    let kernel_answers = [(Counter::FallbackKernelAnswers, 1)];
    // No endpoint: the SYN goes to the kernel as the client sent it, where kube-proxy's
    // REJECT answers it.
    let syn = from_client(40000, EMPTY, SYN);
    let out = tc_ext_counted(fx, topo, &syn, 0, TC_ACT_UNSPEC, &kernel_answers)?;
    ensure!(out == syn.bytes(), "the refused SYN was changed");

    // Too big for the route (MTU 1400) with DF: the kernel's forwarding answers, about the
    // segment as the client sent it.
    let syn = from_client(40001, FRONTEND, SYN);
    tc_ext_counted(
        fx,
        topo,
        &syn,
        0,
        TC_ACT_REDIRECT,
        &[(Counter::ForwardedTcNat, 1)],
    )?;
    let big = from_client(40001, FRONTEND, ACK)
        .seq(1001)
        .payload(&[b'x'; 2920]);
    let out = tc_ext_counted(fx, topo, &big, 0, TC_ACT_UNSPEC, &kernel_answers)?;
    ensure!(out == big.bytes(), "the too big segment was changed");
    // The same bytes as a GSO packet of 1000-byte segments (GRO's work on a veth): each
    // segment fits, so it is translated and sent on whole (segmented on the way out).
    let out = tc_ext_counted(
        fx,
        topo,
        &big,
        1000,
        TC_ACT_REDIRECT,
        &[(Counter::ForwardedTcNat, 1)],
    )?;
    ensure!(
        parse_checked(&out)?.dst == sa(&narrow),
        "the GSO packet was not translated"
    );
    // Segments above the MTU are still too big.
    tc_ext_counted(fx, topo, &big, 1400, TC_ACT_UNSPEC, &kernel_answers)?;
    Ok(())
}
