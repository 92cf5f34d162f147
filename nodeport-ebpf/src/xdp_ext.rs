//! XDP on the node's external interfaces: everything that arrives from outside.
//!
//! - A packet to a frontend (node address or VIP, port, protocol) is DNATed to a backend
//!   (and SNATed when the backend is on another node), as recorded in conntrack.
//! - A reply from a remote backend to a SNAT port is translated back to the client.
//! - Everything else passes untouched.
//!
//! The translated packet leaves through XDP_TX when its route points back out of the same
//! interface; otherwise it is handed to the TC hook of this interface (`tc_ext`), which
//! redirects it to the egress device. Neither path enters netfilter.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use nodeport_common::{
    BE_F_LOCAL, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_LOCAL, CT_F_PORT_REWRITE, CT_F_SNAT, Counter,
    CtEntry, CtKey, CtState, DatapathConfig, Frontend, FrontendKey, IPPROTO_ICMP, IPPROTO_UDP,
    PROG_SLOT_NEW_CONNECTION, TCP_ACK, TCP_RST, TCP_SYN, XDP_META_F_NEIGH, XDP_META_MAGIC, XdpMeta,
    checksum::{
        self, ICMP_ERROR_LEN, ICMP_ERROR_TTL, ICMP_PORT_UNREACHABLE, ICMP_QUOTE_LEN,
        ICMP_TTL_EXCEEDED, IcmpKind,
    },
};

use crate::{
    conntrack::{self, Known, Table, now},
    fib::{self, Hop, Route},
    frag,
    icmp::{self, IcmpHdr},
    maps::{
        NP_CONFIG, NP_FRONTENDS, NP_NEW_SCRATCH, NP_PROGS, NP_REJECT_BUDGET, NP_SNAT_ADDRS,
        NewScratch,
    },
    nat::{Tuple, decrement_ttl_xdp, rewrite_xdp},
    packet::{ETH_HLEN, EthHdr, Flow, Ipv4Hdr, parse, ptr_at},
    select::{self, frontend_port},
    snat, stats,
};

/// The action and the counter that records it.
pub type Verdict = (u32, Counter);

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx is the kernel's xdp_md.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let cfg = match NP_CONFIG.get(0) {
        Some(cfg) if cfg.maglev_size != 0 => cfg,
        _ => return Err(Counter::PassedNoFrontend),
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let flow = match parse(data, data_end, data_end - data) {
        Ok(flow) => flow,
        Err(Counter::PassedOtherProtocol) => return icmp_error(ctx),
        Err(counter) => return Err(counter),
    };
    // Every first fragment's ports, for its later fragments (module `frag`).
    frag::register_first(&flow);
    let dport = u16::from_be(flow.dport_be);

    let now = now();
    // A packet of a known connection, either direction: found here, handled in one place.
    let mut known_connection = None;
    if frontend_port(dport) {
        // A frame from the wire to loopback on a node port: a probe for localhost-bound
        // services (CVE-2020-8558), never a client.
        if select::martian_destination(flow.daddr_be) {
            return Err(Counter::DroppedMartianDestination);
        }
        let key = conntrack::key(&flow, CT_DIR_FORWARD);
        // An established connection needs one lookup; its entry knows its service.
        if let Some((table, entry)) = conntrack::lookup(&key) {
            // SAFETY: points into the map value.
            match conntrack::on_forward(cfg, &key, unsafe { &*entry }, &flow, now) {
                Known::Continue => known_connection = Some((table, key, entry)),
                Known::Revive => {
                    stats::count(Counter::EventCtRevived);
                    known_connection = Some((table, key, entry));
                }
                // SAFETY: as above.
                Known::Restart => conntrack::forget(table, &key, unsafe { &*entry }),
                Known::BackendGone => {
                    conntrack::close_for_backend(&key, entry);
                    // Never an RST for an RST (RFC 793), nor for a later fragment (no TCP
                    // header to answer).
                    if flow.tcp_flags & TCP_RST != 0 || flow.later_fragment() {
                        return Err(Counter::DroppedBackendGone);
                    }
                    return answer_rst(
                        ctx,
                        cfg,
                        &flow,
                        now,
                        (Counter::RejectedBackendGone, Counter::DroppedBackendGone),
                    );
                }
            }
        }
        if known_connection.is_none() {
            let fe_key = FrontendKey {
                addr_be: flow.daddr_be,
                port_be: flow.dport_be,
                proto: flow.proto,
                _pad: 0,
            };
            if NP_FRONTENDS.get_ptr(fe_key).is_some() {
                // A later fragment whose first fragment started no connection cannot start one.
                if flow.later_fragment() {
                    return Err(Counter::DroppedFragment);
                }
                // A new connection: on in a program of its own (`np_xdp_new`, below), which
                // counts the packet's fate. The tail call returns only when it failed.
                // SAFETY: a tail call into a program of this object.
                unsafe { NP_PROGS.tail_call(ctx, PROG_SLOT_NEW_CONNECTION) };
                return Err(Counter::DroppedNoNewConnectionProgram);
            }
        }
    }
    if known_connection.is_none() && cfg.is_snat_port(dport) {
        let key = conntrack::key(&flow, CT_DIR_REPLY);
        if let Some((table, entry)) = conntrack::lookup(&key) {
            // Remote backend -> node address:SNAT port. Only a SNATed connection's reply
            // entry, and only from the device the connection left by: an outside host that
            // guessed a SNAT port, or spoofs a backend from elsewhere, gets nothing in.
            // SAFETY: points into the map value.
            let (flags, bound) = unsafe { ((*entry).flags, (*entry).bound_ifindex) };
            if flags & CT_F_SNAT == 0 || bound != ingress_ifindex(ctx) {
                return Err(Counter::DroppedReplyWrongInterface);
            }
            // SAFETY: as above.
            if !conntrack::alive(cfg, &key, unsafe { &*entry }, now) {
                stats::count(Counter::EventCtRevived);
            }
            known_connection = Some((table, key, entry));
        }
    }
    let Some((table, key, entry)) = known_connection else {
        return Err(if flow.later_fragment() {
            Counter::PassedLaterFragment
        } else {
            Counter::PassedNoFrontend
        });
    };
    known(ctx, cfg, &flow, table, &key, entry, now)
}

/// An ICMP error about a packet of a translated connection (module `icmp`): rewritten and
/// sent on as a packet of that connection going the other way. An error about a packet sent
/// to a client (from the client or a router on its way) goes to the backend; one about a
/// packet sent to a remote backend (from it or a router on its way, to the SNAT address) goes
/// to the client. Anything else is the kernel's.
#[inline(always)]
fn icmp_error(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let err = icmp::parse_error(ctx.data(), ctx.data_end()).ok_or(Counter::PassedOtherProtocol)?;
    if !err.to_sender() {
        return Err(Counter::PassedOtherProtocol);
    }
    let forward = err.key(CT_DIR_FORWARD);
    let (key, entry) = match conntrack::lookup(&forward) {
        Some((_, entry)) => (forward, entry),
        None => {
            let reply = err.key(CT_DIR_REPLY);
            let (_, entry) = conntrack::lookup(&reply).ok_or(Counter::PassedOtherProtocol)?;
            // As for the replies themselves: only a SNATed connection's, from its device.
            // SAFETY: points into the map value.
            let (flags, bound) = unsafe { ((*entry).flags, (*entry).bound_ifindex) };
            if flags & CT_F_SNAT == 0 || bound != ingress_ifindex(ctx) {
                return Err(Counter::DroppedReplyWrongInterface);
            }
            (reply, entry)
        }
    };
    // SAFETY: bounds-checked by the parser.
    if unsafe { (*err.outer).ttl } <= 1 {
        return Ok((xdp_action::XDP_PASS, Counter::FallbackTtlExceeded));
    }
    // SAFETY: points into the map value.
    icmp::translate(&err, &key, unsafe { &*entry });
    stats::count(Counter::EventIcmpErrorTranslated);
    // SAFETY: as above.
    let (saddr_be, daddr_be, tot_len) = unsafe {
        (
            (*err.outer).saddr_be,
            (*err.outer).daddr_be,
            u16::from_be((*err.outer).tot_len_be),
        )
    };
    let route = fib::lookup(
        ctx.ctx as *mut c_void,
        ingress_ifindex(ctx),
        IPPROTO_ICMP,
        tot_len,
        saddr_be,
        daddr_be,
    );
    send(ctx, err.outer, route)
}

/// The first packet of a new connection, tail-called from [`process`] once it found no
/// connection for the packet and a frontend for its destination.
#[inline(always)]
pub fn process_new(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let cfg = match NP_CONFIG.get(0) {
        Some(cfg) if cfg.maglev_size != 0 => cfg,
        _ => return Err(Counter::PassedNoFrontend),
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let flow = parse(data, data_end, data_end - data)?;
    // Never sent here (`process` drops it), and never walked by the verifier past this.
    if flow.later_fragment() {
        return Err(Counter::DroppedFragment);
    }
    let fe_key = FrontendKey {
        addr_be: flow.daddr_be,
        port_be: flow.dport_be,
        proto: flow.proto,
        _pad: 0,
    };
    // SAFETY: points into the map value; copied out at once.
    let fe = unsafe {
        *NP_FRONTENDS
            .get_ptr(fe_key)
            .ok_or(Counter::PassedNoFrontend)?
    };
    let key = conntrack::key(&flow, CT_DIR_FORWARD);
    let now = now();
    let outcome = new_connection(ctx, cfg, &flow, &key, &fe, now);
    let answer = match &outcome {
        // No usable endpoint anywhere: kube-proxy's REJECT (iptables' default answer, an ICMP
        // port unreachable, for a TCP SYN as for a datagram), so the client fails at once
        // instead of retrying for a minute. (`new_connection` refused any RST before choosing
        // a backend; other TCP segments are dropped.)
        Err(Counter::DroppedNoBackend) if flow.is_syn_only() || flow.proto == IPPROTO_UDP => {
            Some((
                ICMP_PORT_UNREACHABLE,
                (Counter::RejectedNoBackend, Counter::DroppedNoBackend),
            ))
        }
        // Asked only when nothing was recorded: after the SNAT port search the verifier
        // then walks no answer.
        Ok((_, route, false)) => router_answer(&flow, route),
        _ => None,
    };
    // One place answers, whatever the reason: the verifier walks it once.
    if let Some((kind, counters)) = answer {
        return answer_icmp(ctx, cfg, &flow, now, kind, counters);
    }
    let (new, route, _) = outcome?;
    stats::service(fe.svc_id, flow.tot_len, CT_DIR_FORWARD);
    transmit(ctx, &flow, &new, route)
}

/// Answers per CPU and second to clients nodeport turns away (RSTs and ICMP errors).
const ANSWERS_PER_SECOND: u64 = 100;

/// Whether this CPU may answer once more this second, as Linux limits the ICMP errors and
/// RSTs it sends (net.ipv4.icmp_msgs_per_sec): a flood gets no amplifier here. Spends one.
#[inline(always)]
fn spend_answer(cfg: &DatapathConfig, now: u64) -> bool {
    let Some(budget) = NP_REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot.
    let [second, sent] = unsafe { &mut *budget };
    if now.wrapping_sub(*second) >= u64::from(cfg.hz) {
        *second = now;
        *sent = 0;
    }
    if *sent >= ANSWERS_PER_SECOND {
        return false;
    }
    *sent += 1;
    true
}

/// Whether the packet's IPv4 header has no options: the answers below are built for that.
#[inline(always)]
fn plain_ipv4(flow: &Flow) -> bool {
    // SAFETY: flow.ip is a bounds-checked IPv4 header.
    unsafe { (*flow.ip).version_ihl == 0x45 }
}

/// Answers a TCP segment with an RST from its destination, in place, back out of the
/// interface it came in on, as Linux's `tcp_v4_send_reset` builds one. Counted as
/// `counters.0`; past the answer budget, or for a packet with IPv4 options, the packet is
/// dropped and counted as `counters.1`.
#[inline(always)]
fn answer_rst(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    now: u64,
    (sent, failed): (Counter, Counter),
) -> Result<Verdict, Counter> {
    if !plain_ipv4(flow) || !spend_answer(cfg, now) {
        return Err(failed);
    }
    let segment_ack = (flow.tcp_flags & TCP_ACK != 0).then_some(flow.tcp_ack);
    let (ip, tcp) = nodeport_common::checksum::rst_headers(
        (flow.daddr_be, flow.dport_be),
        (flow.saddr_be, flow.sport_be),
        segment_ack,
        flow.tcp_seq_end,
    );
    let len = (ctx.data_end() - ctx.data()) as i32;
    let want = (ETH_HLEN + 40) as i32;
    // SAFETY: shrinking the frame to Ethernet + IPv4 + TCP without options.
    if len > want && unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - len) } != 0 {
        return Err(failed);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth: *mut EthHdr = ptr_at(data, data_end, 0).ok_or(Counter::DroppedMalformed)?;
    let ip_header: *mut [u8; 20] =
        ptr_at(data, data_end, ETH_HLEN).ok_or(Counter::DroppedMalformed)?;
    let tcp_header: *mut [u8; 20] =
        ptr_at(data, data_end, ETH_HLEN + 20).ok_or(Counter::DroppedMalformed)?;
    // SAFETY: all three bounds-checked just above.
    unsafe {
        let (src, dst) = ((*eth).src, (*eth).dst);
        (*eth).src = dst;
        (*eth).dst = src;
        *ip_header = ip;
        *tcp_header = tcp;
    }
    Ok((xdp_action::XDP_TX, sent))
}

/// Answers a packet with an ICMP error of `kind` from the address it was sent to, quoting
/// its IPv4 header and the first 8 bytes of its transport header (ports, and a TCP sequence
/// number), in place, back out of the interface it came in on, as Linux's `icmp_send`
/// answers: kube-proxy's `-j REJECT` (`--reject-with icmp-port-unreachable` by default, for a
/// TCP SYN as for a datagram), a router's TTL exceeded or fragmentation needed. Counted as
/// `counters.0`; past the answer budget, or for a packet with IPv4 options, the packet is
/// dropped and counted as `counters.1`.
#[inline(always)]
fn answer_icmp(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    now: u64,
    kind: IcmpKind,
    (sent, failed): (Counter, Counter),
) -> Result<Verdict, Counter> {
    // A router answers no later fragment (Linux's icmp_send: only fragment 0), whose quote
    // would hold no ports anyway.
    if !plain_ipv4(flow) || flow.later_fragment() || !spend_answer(cfg, now) {
        return Err(failed);
    }
    if !icmp_answer_frame(ctx, flow.daddr_be, flow.saddr_be, kind) {
        return Err(failed);
    }
    Ok((xdp_action::XDP_TX, sent))
}

/// Turns the frame into the ICMP error of [`answer_icmp`], from `from_be` to `to_be`, field
/// by field (no header buffers: this runs inline on the established path, whose stack frame
/// is near the verifier's limit).
#[inline(always)]
fn icmp_answer_frame(ctx: &XdpContext, from_be: u32, to_be: u32, kind: IcmpKind) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(quoted)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<[u16; ICMP_QUOTE_LEN / 2]>(data, data_end, ETH_HLEN),
    ) else {
        return false;
    };
    // SAFETY: both bounds-checked just above; read before the frame changes.
    let (client_mac, own_mac, quoted_tos, quote_sum) = unsafe {
        let mut sum = 0u32;
        for word in *quoted {
            sum += u32::from(word);
        }
        ((*eth).src, (*eth).dst, (*quoted)[0].to_ne_bytes()[1], sum)
    };
    let tos = checksum::icmp_error_tos(quoted_tos);
    let (ip_check, icmp_check) =
        checksum::icmp_error_checksums(kind, from_be, to_be, tos, quote_sum);
    // The quote stays where it is: cut what follows it, then open room for the new
    // Ethernet, IPv4 and ICMP headers in front of it.
    let len = (data_end - data) as i32;
    let quote_end = (ETH_HLEN + ICMP_QUOTE_LEN) as i32;
    // SAFETY: shrinking the frame to Ethernet + the quoted bytes.
    if len > quote_end && unsafe { bpf_xdp_adjust_tail(ctx.ctx, quote_end - len) } != 0 {
        return false;
    }
    // SAFETY: growing the frame at its head by the new IPv4 and ICMP headers.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -28) } != 0 {
        return false;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN),
        ptr_at::<IcmpHdr>(data, data_end, ETH_HLEN + 20),
    ) else {
        return false;
    };
    let mtu = kind.mtu.to_be_bytes();
    // SAFETY: all three bounds-checked just above.
    unsafe {
        (*eth).src = own_mac;
        (*eth).dst = client_mac;
        (*eth).ether_type_be = 0x0800u16.to_be();
        *ip = Ipv4Hdr {
            version_ihl: 0x45,
            tos,
            tot_len_be: ICMP_ERROR_LEN.to_be(),
            id_be: 0,
            frag_off_be: 0,
            ttl: ICMP_ERROR_TTL,
            proto: IPPROTO_ICMP,
            check: ip_check,
            saddr_be: from_be,
            daddr_be: to_be,
        };
        *icmp = IcmpHdr {
            kind: kind.kind,
            code: kind.code,
            check: icmp_check,
            rest: u32::from_ne_bytes([0, 0, mtu[0], mtu[1]]),
        };
    }
    true
}

/// The route of a translated packet, looked up now (no cache).
#[inline(always)]
fn lookup_route(ctx: &XdpContext, flow: &Flow, new: &Tuple) -> Route {
    fib::lookup(
        ctx.ctx as *mut c_void,
        ingress_ifindex(ctx),
        flow.proto,
        flow.tot_len,
        new.saddr_be,
        new.daddr_be,
    )
}

/// A packet on a known connection, either direction: records it, completes the connection's
/// handshake or checks its other entry, and sends it on.
#[inline(always)]
fn known(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    table: Table,
    key: &CtKey,
    entry: *mut CtEntry,
    now: u64,
) -> Result<Verdict, Counter> {
    // SAFETY: points into the map value.
    let was_closing = unsafe { (*entry).state.closing() };
    let state = conntrack::record(key, entry, flow, now);
    let (new, route) = if table == Table::Handshake {
        // SAFETY: copied out: promotion frees the element.
        let copy = unsafe { *entry };
        conntrack::ensure_partner(table, key, &copy, now)?;
        if state.established != 0 {
            conntrack::promote(key, &copy);
        }
        let new = Tuple::from(&copy);
        (new, lookup_route(ctx, flow, &new))
    } else {
        let recheck = u64::from(cfg.hz);
        // The next hop is cached per connection; when it is due for a re-check (once a
        // second), the other entry is checked too, and on every packet of a closing
        // connection (before or after this packet), whose reply tuple a new connection may
        // have taken over (`snat::probe`).
        if fib::stale(entry, now, recheck) || was_closing || state.closing() {
            // SAFETY: points into the map value.
            conntrack::ensure_partner(table, key, unsafe { &*entry }, now)?;
        }
        // SAFETY: as above.
        let new = Tuple::from(unsafe { &*entry });
        (
            new,
            fib::next_hop(entry, now, recheck, flow.tot_len, || {
                lookup_route(ctx, flow, &new)
            }),
        )
    };
    if let Some((kind, counters)) = router_answer(flow, &route) {
        return answer_icmp(ctx, cfg, flow, now, kind, counters);
    }
    transmit(ctx, flow, &new, route)
}

/// Selects a backend and records both directions of the connection in the handshake table.
/// Returns the tuple the packet is rewritten to, the route to the backend, and whether the
/// connection was recorded (not when a router would answer the packet instead).
#[inline(always)]
fn new_connection(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    forward_key: &CtKey,
    fe: &Frontend,
    now: u64,
) -> Result<(Tuple, Route, bool), Counter> {
    // Only a SYN starts a TCP connection. Any other segment without an entry (an ACK, data,
    // a FIN, an RST, a SYN-ACK) is the kernel's: a connection kube-proxy carries (opened while
    // the datapath was off, or before it was attached) stays with kube-proxy's nf_conntrack,
    // and what nobody knows is INVALID there, which kube-proxy drops.
    if flow.is_tcp() && flow.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Err(Counter::PassedNotSyn);
    }
    if select::martian_source(flow.saddr_be) {
        return Err(Counter::DroppedMartianSource);
    }
    if !select::source_allowed(fe, flow.saddr_be) {
        return Err(Counter::DroppedSourceRange);
    }
    let (backend_id, backend) = select::backend_for_new_flow(cfg, fe, flow, now)?;
    // One FIB lookup per new connection: where it goes (a remote backend's SNAT address is
    // the egress device's, as MASQUERADE picks it) and the route its first packet takes.
    let mut new = Tuple {
        saddr_be: flow.saddr_be,
        daddr_be: backend.addr_be,
        sport_be: flow.sport_be,
        dport_be: backend.port_be,
    };
    let route = lookup_route(ctx, flow, &new);
    // A packet a router would answer instead (TTL 1, too big with DF) starts nothing: like
    // netfilter, which never confirms the connection of a packet it did not forward.
    if router_answer(flow, &route).is_some() {
        return Ok((new, route, false));
    }
    let egress = route.ifindex;
    let local = backend.flags & BE_F_LOCAL != 0;
    let scratch = NP_NEW_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::DroppedConntrackFull)?;
    // SAFETY: this CPU's scratch slot, used by this program run alone.
    let NewScratch {
        forward,
        reply,
        route: held,
    } = unsafe { &mut *scratch };
    *held = route;
    *forward = CtEntry {
        last_seen: now,
        new_saddr_be: new.saddr_be,
        new_daddr_be: new.daddr_be,
        new_sport_be: new.sport_be,
        new_dport_be: new.dport_be,
        backend_id,
        svc_id: fe.svc_id,
        flags: if local { CT_F_LOCAL } else { CT_F_SNAT },
        state: CtState::default().after(
            flow.proto,
            CT_DIR_FORWARD,
            flow.tcp_flags,
            flow.tcp_payload,
        ),
        ..CtEntry::default()
    };
    if flow.is_tcp() {
        forward.note_segment(
            flow.tcp_seq_end,
            flow.tcp_ack,
            flow.tcp_flags & TCP_ACK != 0,
        );
    }
    // The backend's replies go back from the frontend to the client.
    *reply = CtEntry {
        new_saddr_be: flow.daddr_be,
        new_daddr_be: flow.saddr_be,
        new_sport_be: flow.dport_be,
        new_dport_be: flow.sport_be,
        seq_next: 0,
        ack_max: 0,
        ..*forward
    };
    // A SYN may take over the SNAT port of a closed or abandoned connection (`snat::probe`).
    let syn_seq_end = flow.is_syn_only().then_some(flow.tcp_seq_end);
    if local {
        // The pod's replies are bound to the device its first answer comes from.
        let reply_key = forward.opposite_key(flow.proto, CT_DIR_REPLY);
        if !snat::claim(forward_key, &reply_key, reply, now) {
            // Another connection of this client address and port holds the tuple at the pod
            // (two frontends of one pod): rewrite the client's port, as Linux NAT does.
            forward.flags |= CT_F_PORT_REWRITE;
            reply.flags |= CT_F_PORT_REWRITE;
            new.sport_be = snat::claim_port(cfg, forward_key, &reply_key, reply, syn_seq_end, now)?;
            forward.new_sport_be = new.sport_be;
            stats::count(Counter::EventTupleClashRewritten);
        }
    } else {
        // Remote pod: SNAT, so the reply comes back here; without a route there is no egress
        // device and so no SNAT address: the kernel routes the packet untranslated.
        if egress == 0 {
            return Err(Counter::FallbackFibLookup);
        }
        let snat = NP_SNAT_ADDRS
            .get_ptr(egress)
            .ok_or(Counter::DroppedNoSnatAddress)?;
        // SAFETY: points into the map value.
        new.saddr_be = unsafe { (*snat).addr_be };
        forward.new_saddr_be = new.saddr_be;
        // Both entries know the device: the reply's to check, the forward's to rebuild it.
        forward.bound_ifindex = egress;
        reply.bound_ifindex = egress;
        let base = forward.opposite_key(flow.proto, CT_DIR_REPLY);
        new.sport_be = snat::claim_port(cfg, forward_key, &base, reply, syn_seq_end, now)?;
        forward.new_sport_be = new.sport_be;
    }
    if let Err(counter) = Table::Handshake.insert(forward_key, forward, BPF_ANY) {
        Table::Handshake.remove(&forward.opposite_key(flow.proto, CT_DIR_REPLY));
        return Err(counter);
    }
    Ok((new, *held, true))
}

/// What a router would answer instead of forwarding the packet, about the packet as its
/// sender sent it: TTL 1, time exceeded (handed to the kernel, a packet to the node's own
/// address would be delivered locally and get a port unreachable); too big for the route with
/// DF, fragmentation needed (handed to the kernel translated, the kernel's would quote the
/// translated packet, which the sender cannot match; without DF, the kernel fragments it).
#[inline(always)]
fn router_answer(flow: &Flow, route: &Route) -> Option<(IcmpKind, (Counter, Counter))> {
    // SAFETY: flow.ip is a bounds-checked IPv4 header.
    if unsafe { (*flow.ip).ttl } <= 1 {
        return Some((
            ICMP_TTL_EXCEEDED,
            (Counter::AnsweredTtlExceeded, Counter::DroppedTtlExceeded),
        ));
    }
    if route.hop == Hop::FragNeeded && flow.dont_fragment() {
        return Some((
            checksum::icmp_frag_needed(route.mtu),
            (Counter::AnsweredFragNeeded, Counter::DroppedFragNeeded),
        ));
    }
    None
}

/// Rewrites the packet to `new` and sends it on by `route` (the caller has asked
/// [`router_answer`]).
#[inline(always)]
fn transmit(ctx: &XdpContext, flow: &Flow, new: &Tuple, route: Route) -> Result<Verdict, Counter> {
    rewrite_xdp(flow, new);
    send(ctx, flow.ip, route)
}

/// Sends a translated packet (IPv4 header `ip`, TTL above 1) on by `route`.
#[inline(always)]
fn send(ctx: &XdpContext, ip: *mut Ipv4Hdr, route: Route) -> Result<Verdict, Counter> {
    let ingress = ingress_ifindex(ctx);
    // The kernel stack routes what the FIB lookup could not decide (and sends any ICMP).
    let (ifindex, flags, smac, dmac) = match route.hop {
        Hop::Unresolved | Hop::FragNeeded => {
            return Ok((xdp_action::XDP_PASS, Counter::FallbackFibLookup));
        }
        Hop::Resolved => (route.ifindex, 0, route.smac, route.dmac),
        Hop::NoNeighbour => (route.ifindex, XDP_META_F_NEIGH, [0; 6], [0; 6]),
    };
    decrement_ttl_xdp(ip);

    if ifindex == ingress && flags == 0 {
        let eth: *mut EthHdr =
            ptr_at(ctx.data(), ctx.data_end(), 0).ok_or(Counter::DroppedMalformed)?;
        // SAFETY: bounds-checked Ethernet header.
        unsafe {
            (*eth).src = smac;
            (*eth).dst = dmac;
        }
        return Ok((xdp_action::XDP_TX, Counter::ForwardedXdpTx));
    }

    // Another device: the TC hook redirects it (XDP_REDIRECT into a veth would need an XDP
    // program on the peer). If the driver has no metadata room, the kernel routes the
    // translated packet (its TTL then drops twice; rare and harmless).
    // SAFETY: ctx.ctx is the kernel's xdp_md.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<XdpMeta>() as i32)) } != 0 {
        return Ok((xdp_action::XDP_PASS, Counter::FallbackNoMetadata));
    }
    let meta: *mut XdpMeta =
        ptr_at(ctx.metadata(), ctx.data(), 0).ok_or(Counter::FallbackNoMetadata)?;
    // SAFETY: bounds-checked metadata area.
    unsafe {
        *meta = XdpMeta {
            magic: XDP_META_MAGIC,
            ifindex,
            flags,
            smac,
            dmac,
            _pad: [0; 8],
        };
    }
    Ok((xdp_action::XDP_PASS, Counter::ForwardedToTc))
}
