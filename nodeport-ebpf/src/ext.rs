//! The external path: everything that arrives at the node's external interfaces from outside,
//! in XDP (`np_xdp_ext`, the fast path) or in TC ingress (`np_tc_ext_nat`, module `frame`).
//!
//! - A packet to a frontend (node address or VIP, port, protocol) is DNATed to a backend
//!   (and SNATed when the backend is on another node), as recorded in conntrack.
//! - A reply from a remote backend to a SNAT port is translated back to the client.
//! - Everything else passes untouched.
//!
//! In XDP the translated packet leaves through XDP_TX when its route points back out of the
//! same interface; otherwise it is handed to the TC hook of this interface (`tc_ext`), which
//! redirects it to the egress device. In TC it is redirected at once. Neither path enters
//! netfilter.

use aya_ebpf::bindings::BPF_ANY;
use nodeport_common::{
    BE_F_LOCAL, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_LOCAL, CT_F_PORT_REWRITE, CT_F_SNAT, Counter,
    CtEntry, CtKey, CtState, DatapathConfig, Frontend, FrontendKey, IPPROTO_ICMP, IPPROTO_UDP,
    TCP_ACK, TCP_RST, TCP_SYN,
    checksum::{self, ICMP_PORT_UNREACHABLE, ICMP_TTL_EXCEEDED, IcmpKind},
};

use crate::{
    conntrack::{self, Known, Table, now},
    fib::{self, Hop, Route},
    frag,
    frame::{Frame, Verdict},
    icmp,
    maps::{NP_CONFIG, NP_FRONTENDS, NP_NEW_SCRATCH, NP_SNAT_ADDRS, NewScratch},
    nat::Tuple,
    packet::Flow,
    select::{self, frontend_port},
    snat, stats,
};

#[inline(always)]
pub fn process<C: Frame>(ctx: &C) -> Result<Verdict, Counter> {
    let cfg = match NP_CONFIG.get(0) {
        Some(cfg) if cfg.maglev_size != 0 => cfg,
        _ => return Err(Counter::PassedNoFrontend),
    };
    let flow = match ctx.parse() {
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
        // An established connection needs one lookup; its entry knows its service. A SYN
        // that finds none starts one without a second look (`conntrack::lookup_once`).
        let found = if flow.is_syn_only() {
            conntrack::lookup_once(&key)
        } else {
            conntrack::lookup(&key)
        };
        if let Some((table, entry)) = found {
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
                    return ctx.answer_rst(
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
                ctx.tail_call_new();
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
            if flags & CT_F_SNAT == 0 || bound != ctx.ingress_ifindex() {
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
fn icmp_error<C: Frame>(ctx: &C) -> Result<Verdict, Counter> {
    // Rewritten in place: its headers must be at hand.
    if !ctx.pull_icmp_error() {
        return Err(Counter::PassedOtherProtocol);
    }
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
            if flags & CT_F_SNAT == 0 || bound != ctx.ingress_ifindex() {
                return Err(Counter::DroppedReplyWrongInterface);
            }
            (reply, entry)
        }
    };
    // SAFETY: bounds-checked by the parser.
    if unsafe { (*err.outer).ttl } <= 1 {
        return Err(Counter::FallbackTtlExceeded);
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
        ctx.raw(),
        ctx.ingress_ifindex(),
        IPPROTO_ICMP,
        tot_len,
        saddr_be,
        daddr_be,
    );
    ctx.send(err.outer, route)
}

/// The first packet of a new connection, tail-called from [`process`] once it found no
/// connection for the packet and a frontend for its destination.
#[inline(always)]
pub fn process_new<C: Frame>(ctx: &C) -> Result<Verdict, Counter> {
    let cfg = match NP_CONFIG.get(0) {
        Some(cfg) if cfg.maglev_size != 0 => cfg,
        _ => return Err(Counter::PassedNoFrontend),
    };
    let flow = ctx.parse()?;
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
        return ctx.answer_icmp(cfg, &flow, now, kind, counters);
    }
    let (new, route, _) = outcome?;
    stats::service(fe.svc_id, flow.tot_len, CT_DIR_FORWARD);
    ctx.transmit(&flow, &new, route)
}

/// The route of a translated packet, looked up now (no cache).
#[inline(always)]
fn lookup_route<C: Frame>(ctx: &C, flow: &Flow, new: &Tuple) -> Route {
    fib::lookup(
        ctx.raw(),
        ctx.ingress_ifindex(),
        flow.proto,
        ctx.wire_len(flow),
        new.saddr_be,
        new.daddr_be,
    )
}

/// A packet on a known connection, either direction: records it, completes the connection's
/// handshake or checks its other entry, and sends it on.
#[inline(always)]
fn known<C: Frame>(
    ctx: &C,
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
            fib::next_hop(entry, now, recheck, ctx.wire_len(flow), || {
                lookup_route(ctx, flow, &new)
            }),
        )
    };
    if let Some((kind, counters)) = router_answer(flow, &route) {
        return ctx.answer_icmp(cfg, flow, now, kind, counters);
    }
    ctx.transmit(flow, &new, route)
}

/// Selects a backend and records both directions of the connection in the handshake table.
/// Returns the tuple the packet is rewritten to, the route to the backend, and whether the
/// connection was recorded (not when a router would answer the packet instead).
#[inline(always)]
fn new_connection<C: Frame>(
    ctx: &C,
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
