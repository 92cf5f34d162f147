//! TC ingress on pod-facing interfaces: a local backend's reply to a nodeport connection gets
//! its source translated back to the frontend and is redirected out towards the client, before
//! netfilter sees it (netfilter never saw the request either, and would call the reply INVALID).
//! Any other pod traffic continues untouched.
//!
//! A connection's replies are accepted from the device the pod's first answer came from (its
//! veth, whatever the CNI's layout): another pod that spoofs the backend's address gets
//! nothing into the connection, nor does any packet matching a SNATed connection's entry.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use nodeport_common::{
    CT_DIR_REPLY, CT_F_LOCAL, Counter, DatapathConfig, IPPROTO_ICMP, TCP_ACK, ack_in_window,
};

use crate::{
    conntrack::{self, Table, now},
    fib::{self, Hop, Route},
    frag,
    frame::{Frame as _, HEADERS_MAX, parse_skb, redirect_skb},
    icmp,
    maps::NP_CONFIG,
    nat::{Tuple, rewrite_skb},
    packet::{ETH_HLEN, Flow},
    stats::count,
};

#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    let Some(cfg) = NP_CONFIG.get(0) else {
        return TC_ACT_UNSPEC;
    };
    // Not a reply of ours: on to the next TC program, if any (tcx's "next").
    let flow = match parse_skb(ctx) {
        Ok(flow) => flow,
        Err(Counter::PassedOtherProtocol) => return icmp_error(ctx),
        // A later fragment before its first (module `frag`): it may be a reply's, and must
        // not leave untranslated.
        Err(Counter::DroppedFragmentOutOfOrder) => {
            count(Counter::DroppedFragmentOutOfOrder);
            return TC_ACT_SHOT;
        }
        Err(_) => return TC_ACT_UNSPEC,
    };
    // Every first fragment's ports, for its later fragments.
    frag::register_first(&flow);
    let key = conntrack::key(&flow, CT_DIR_REPLY);
    let Some((table, entry_ptr)) = conntrack::lookup(&key) else {
        return TC_ACT_UNSPEC;
    };
    let ingress = ctx.ingress_ifindex();
    // SAFETY: points into the map value.
    let (flags, bound) = unsafe { ((*entry_ptr).flags, (*entry_ptr).bound_ifindex) };
    if flags & CT_F_LOCAL == 0 || (bound != 0 && bound != ingress) {
        count(Counter::DroppedReplyWrongInterface);
        return TC_ACT_SHOT;
    }
    if bound == 0 {
        // The first answer: its device is where the pod lives (a plain store, written by
        // this direction only), once it shows it comes from the backend.
        // SAFETY: as above.
        if let Err(counter) = first_answer(ctx, &flow, &key, unsafe { &*entry_ptr }, ingress) {
            count(counter);
            return TC_ACT_SHOT;
        }
        // SAFETY: as above.
        unsafe { (*entry_ptr).bound_ifindex = ingress };
    }
    let now = now();
    let Some((new, route)) = reply_route(ctx, cfg, &flow, table, &key, entry_ptr, ingress, now)
    else {
        return TC_ACT_SHOT;
    };
    // Too big for the way to the client, DF set: the kernel tells the pod, about the pod's
    // own packet, if it gets that packet untranslated (it drops it).
    if route.hop == Hop::FragNeeded && flow.dont_fragment() {
        count(Counter::FallbackFragNeeded);
        return TC_ACT_OK;
    }
    if rewrite_skb(ctx, &flow, &new).is_err() {
        count(Counter::FallbackRedirect);
        return TC_ACT_OK;
    }
    redirect_out(
        ctx,
        route,
        Counter::ForwardedPodReply,
        Counter::ForwardedPodReplyNeigh,
    )
}

/// Sends a translated packet on by `route` (`frame::redirect_skb`), counted as `resolved` or
/// `neighbour` (bpf_redirect_neigh); to the kernel stack, counted, when that cannot be done.
#[inline(always)]
fn redirect_out(ctx: &TcContext, route: Route, resolved: Counter, neighbour: Counter) -> i32 {
    match redirect_skb(ctx, route) {
        Ok((action, by_neighbour)) => {
            count(if by_neighbour { neighbour } else { resolved });
            action as i32
        }
        Err(counter) => {
            count(counter);
            TC_ACT_OK
        }
    }
}

/// An ICMP error from a local backend's side about a packet the client sent it (a closed UDP
/// port in the pod, ...): rewritten as a reply of the connection and sent to the client
/// (module `icmp`), accepted from the connection's device only, as its replies are.
#[inline(always)]
fn icmp_error(ctx: &TcContext) -> i32 {
    if ctx.load::<u8>(ETH_HLEN + 9) != Ok(IPPROTO_ICMP) {
        return TC_ACT_UNSPEC;
    }
    // Linear and writable: the error is rewritten in place.
    if ctx.skb.pull_data(HEADERS_MAX.min(ctx.len())).is_err() {
        return TC_ACT_UNSPEC;
    }
    let Some(err) = icmp::parse_error(ctx.data(), ctx.data_end()) else {
        return TC_ACT_UNSPEC;
    };
    if !err.to_sender() {
        return TC_ACT_UNSPEC;
    }
    let key = err.key(CT_DIR_REPLY);
    let Some((_, entry)) = conntrack::lookup(&key) else {
        return TC_ACT_UNSPEC;
    };
    let ingress = ctx.ingress_ifindex();
    // SAFETY: points into the map value.
    let (flags, bound) = unsafe { ((*entry).flags, (*entry).bound_ifindex) };
    let device_ok = if bound == 0 {
        // No answer bound the connection yet (a UDP datagram to a closed port).
        backend_device(ctx, ingress, key.proto, key.daddr_be, key.saddr_be).is_ok()
    } else {
        bound == ingress
    };
    if flags & CT_F_LOCAL == 0 || !device_ok {
        count(Counter::DroppedReplyWrongInterface);
        return TC_ACT_SHOT;
    }
    // SAFETY: bounds-checked by the parser.
    if unsafe { (*err.outer).ttl } <= 1 {
        count(Counter::FallbackTtlExceeded);
        return TC_ACT_UNSPEC;
    }
    // SAFETY: points into the map value.
    icmp::translate(&err, &key, unsafe { &*entry });
    count(Counter::EventIcmpErrorTranslated);
    // SAFETY: as above.
    let (saddr_be, daddr_be) = unsafe { ((*err.outer).saddr_be, (*err.outer).daddr_be) };
    let route = fib::lookup(
        ctx.skb.skb as *mut c_void,
        ingress,
        IPPROTO_ICMP,
        0,
        saddr_be,
        daddr_be,
    );
    redirect_out(
        ctx,
        route,
        Counter::ForwardedPodReply,
        Counter::ForwardedPodReplyNeigh,
    )
}

/// Whether the first answer on a connection (`entry`, its reply entry) comes from its backend,
/// before the connection is bound to the device it came from; otherwise another pod answering
/// first, spoofing the backend's address, would take the connection. It must come from the
/// device the node routes the backend's address to, or (a bridge) from the backend's MAC
/// address there; a TCP answer must also acknowledge what the client sent, which a blind
/// spoofer does not know.
#[inline(always)]
fn first_answer(
    ctx: &TcContext,
    flow: &Flow,
    key: &nodeport_common::CtKey,
    entry: &nodeport_common::CtEntry,
    ingress: u32,
) -> Result<(), Counter> {
    if flow.is_tcp() {
        if flow.tcp_flags & TCP_ACK == 0 {
            return Err(Counter::DroppedCtInvalid);
        }
        if let Some((_, _, forward)) = conntrack::partner(key, entry) {
            // SAFETY: points into a conntrack map value.
            if !ack_in_window(flow.tcp_ack, unsafe { &*forward }) {
                return Err(Counter::DroppedCtInvalid);
            }
        }
    }
    backend_device(ctx, ingress, flow.proto, flow.daddr_be, flow.saddr_be)
}

/// Whether a packet from `backend_be` (to `client_be`) arriving on `ingress` comes from the
/// backend's device: the one the node routes the backend's address to, or (a bridge) the
/// backend's MAC address there.
#[inline(always)]
fn backend_device(
    ctx: &TcContext,
    ingress: u32,
    proto: u8,
    client_be: u32,
    backend_be: u32,
) -> Result<(), Counter> {
    // The route to the backend, as the node would send it a packet from the client.
    let route = fib::lookup(
        ctx.skb.skb as *mut c_void,
        ingress,
        proto,
        0,
        client_be,
        backend_be,
    );
    if route.hop == Hop::Unresolved || route.ifindex == ingress {
        return Ok(());
    }
    let smac: [u8; 6] = ctx.load(6).map_err(|_| Counter::DroppedMalformed)?;
    if route.hop == Hop::Resolved && smac == route.dmac {
        return Ok(());
    }
    Err(Counter::DroppedReplyWrongInterface)
}

/// Records the reply on its connection (completing the handshake of a UDP flow, checking the
/// other entry) and finds where it goes. None: the packet must be dropped (counted).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined: no BPF call boundary")]
fn reply_route(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    table: Table,
    key: &nodeport_common::CtKey,
    entry: *mut nodeport_common::CtEntry,
    ingress: u32,
    now: u64,
) -> Option<(Tuple, Route)> {
    // SAFETY: points into the map value.
    if !conntrack::alive(cfg, key, unsafe { &*entry }, now) {
        count(Counter::EventCtRevived);
    }
    let state = conntrack::record(key, entry, flow, now);
    let lookup = |new: &Tuple| {
        fib::lookup(
            ctx.skb.skb as *mut c_void,
            ingress,
            flow.proto,
            0,
            new.saddr_be,
            new.daddr_be,
        )
    };
    if table == Table::Handshake {
        // SAFETY: copied out: promotion frees the element.
        let copy = unsafe { *entry };
        if let Err(counter) = conntrack::ensure_partner(table, key, &copy, now) {
            count(counter);
            return None;
        }
        if state.established != 0 {
            conntrack::promote(key, &copy);
        }
        let new = Tuple::from(&copy);
        return Some((new, lookup(&new)));
    }
    let recheck = u64::from(cfg.hz);
    if fib::stale(entry, now, recheck) {
        // SAFETY: as above.
        if let Err(counter) = conntrack::ensure_partner(table, key, unsafe { &*entry }, now) {
            count(counter);
            return None;
        }
    }
    // SAFETY: as above.
    let new = Tuple::from(unsafe { &*entry });
    let route = fib::next_hop(entry, now, recheck, 0, || lookup(&new));
    Some((new, route))
}
