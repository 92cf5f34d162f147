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
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    programs::XdpContext,
};
use nodeport_common::{
    BE_F_LOCAL, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_LOCAL, CT_F_SNAT, Counter, CtEntry, CtKey,
    DatapathConfig, Frontend, FrontendKey, XDP_META_F_NEIGH, XDP_META_MAGIC, XdpMeta,
    frontend_port_bit, hash,
};

use crate::{
    conntrack::{self, now},
    fib::{self, Route},
    maps::{NP_CONFIG, NP_CT, NP_FE_PORTS, NP_FRONTENDS, NP_SNAT_ADDRS},
    nat::{Tuple, decrement_ttl_xdp, rewrite_xdp},
    packet::{EthHdr, Flow, parse, ptr_at},
    select, stats,
};

/// The action and the counter that records it.
pub type Verdict = (u32, Counter);

/// How many SNAT ports a new connection tries before giving up.
const SNAT_PROBES: u32 = 16;
/// Decorrelates the SNAT port from the Maglev slot of the same flow.
const SNAT_HASH_SALT: u32 = 0x5a17_c0de;

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: ctx.ctx is the kernel's xdp_md.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

#[inline(always)]
fn frontend_port(port: u16) -> bool {
    let (word, bit) = frontend_port_bit(port);
    NP_FE_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> Result<Verdict, Counter> {
    let cfg = match NP_CONFIG.get(0) {
        Some(cfg) if cfg.maglev_size != 0 => cfg,
        _ => return Err(Counter::PassedNoFrontend),
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let flow = parse(data, data_end, data_end - data)?;
    let dport = u16::from_be(flow.dport_be);

    if frontend_port(dport) {
        let now = now();
        // An established connection needs one lookup; its entry knows its service.
        if let Some(entry) = NP_CT.get_ptr_mut(conntrack::key(&flow, CT_DIR_FORWARD)) {
            // SAFETY: points into the map value.
            if conntrack::still_valid(cfg, unsafe { &*entry }, &flow, now) {
                // Later fragments carry no ports and could not follow the first one.
                if flow.first_fragment {
                    return Err(Counter::DroppedFragment);
                }
                return forward_established(ctx, cfg, &flow, entry, now);
            }
        }
        let fe_key = FrontendKey {
            addr_be: flow.daddr_be,
            port_be: flow.dport_be,
            proto: flow.proto,
            _pad: 0,
        };
        if let Some(fe) = NP_FRONTENDS.get_ptr(fe_key) {
            if flow.first_fragment {
                return Err(Counter::DroppedFragment);
            }
            // SAFETY: points into the map value; copied out at once.
            let fe = unsafe { *fe };
            let entry = new_connection(ctx, cfg, &flow, &fe, now)?;
            stats::service(fe.svc_id, flow.tot_len, CT_DIR_FORWARD);
            return transmit(ctx, cfg, &flow, entry, now);
        }
    }

    if dport >= cfg.snat_port_min && dport <= cfg.snat_port_max {
        if let Some(entry) = NP_CT.get_ptr_mut(conntrack::key(&flow, CT_DIR_REPLY)) {
            if flow.first_fragment {
                return Err(Counter::DroppedFragment);
            }
            return snat_reply(ctx, cfg, &flow, entry);
        }
    }
    Err(Counter::PassedNoFrontend)
}

/// Client -> frontend on a known connection.
#[inline(always)]
fn forward_established(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    entry: *mut CtEntry,
    now: u64,
) -> Result<Verdict, Counter> {
    conntrack::record(entry, flow, now, CT_DIR_FORWARD);
    transmit(ctx, cfg, flow, entry, now)
}

/// Selects a backend and records both directions of the connection. Returns the forward
/// entry as stored in the map.
#[inline(always)]
fn new_connection(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    fe: &Frontend,
    now: u64,
) -> Result<*mut CtEntry, Counter> {
    if !select::source_allowed(fe, flow.saddr_be) {
        return Err(Counter::DroppedSourceRange);
    }
    let (backend_id, backend) = select::backend_for_new_flow(cfg, fe, flow, now)?;
    let mut forward = CtEntry {
        last_seen: now,
        new_saddr_be: flow.saddr_be,
        new_daddr_be: backend.addr_be,
        new_sport_be: flow.sport_be,
        new_dport_be: backend.port_be,
        backend_id,
        svc_id: fe.svc_id,
        ..CtEntry::default()
    };
    // The backend's replies go back from the frontend to the client.
    let mut reply = CtEntry {
        new_saddr_be: flow.daddr_be,
        new_daddr_be: flow.saddr_be,
        new_sport_be: flow.dport_be,
        new_dport_be: flow.sport_be,
        ..forward
    };

    if backend.flags & BE_F_LOCAL != 0 {
        // Local pod: the client's address is kept; the pod's reply meets the pod-facing hook.
        forward.flags = CT_F_LOCAL;
        reply.flags = CT_F_LOCAL;
        let reply_key = conntrack::opposite_key(&forward, flow.proto, CT_DIR_REPLY);
        NP_CT
            .insert(reply_key, reply, u64::from(BPF_ANY))
            .map_err(|_| Counter::DroppedConntrackFull)?;
    } else {
        // Remote pod: SNAT to this node's address on the way to the backend, so the reply
        // comes back here. The address is the egress interface's, as MASQUERADE picks it.
        let egress = match fib::lookup(
            ctx.ctx as *mut c_void,
            ingress_ifindex(ctx),
            flow.proto,
            0,
            flow.saddr_be,
            backend.addr_be,
        ) {
            Route::Resolved { ifindex, .. } | Route::NoNeighbour { ifindex } => ifindex,
            Route::Unresolved => return Err(Counter::FallbackFibLookup),
        };
        let snat = NP_SNAT_ADDRS
            .get_ptr(egress)
            .ok_or(Counter::DroppedNoSnatAddress)?;
        // SAFETY: points into the map value.
        forward.new_saddr_be = unsafe { (*snat).addr_be };
        forward.flags = CT_F_SNAT;
        reply.flags = CT_F_SNAT;
        forward.new_sport_be = claim_snat_port(cfg, flow, &forward, &reply, now)?;
    }
    let key = conntrack::key(flow, CT_DIR_FORWARD);
    NP_CT
        .insert(key, forward, u64::from(BPF_ANY))
        .map_err(|_| Counter::DroppedConntrackFull)?;
    NP_CT.get_ptr_mut(key).ok_or(Counter::DroppedConntrackFull)
}

/// Finds a source port for the SNATed connection such that the backend's reply tuple is
/// unique, and records the reply entry under it. The first candidate is a hash of the flow, so
/// a connection whose forward entry was evicted gets its old port back.
#[inline(always)]
fn claim_snat_port(
    cfg: &DatapathConfig,
    flow: &Flow,
    forward: &CtEntry,
    reply: &CtEntry,
    now: u64,
) -> Result<u16, Counter> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if max < min {
        return Err(Counter::DroppedSnatExhausted);
    }
    let span = max - min + 1;
    let start = hash::flow_hash(
        flow.saddr_be,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
        cfg.hash_seed ^ SNAT_HASH_SALT,
    );
    for i in 0..SNAT_PROBES {
        let port_be = ((min + start.wrapping_add(i) % span) as u16).to_be();
        let key = CtKey {
            dport_be: port_be,
            ..conntrack::opposite_key(forward, flow.proto, CT_DIR_REPLY)
        };
        let claimable = match NP_CT.get_ptr(key) {
            None => {
                if NP_CT.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
                    return Ok(port_be);
                }
                false // another CPU took it in between
            }
            Some(existing) => {
                // SAFETY: points into the map value.
                let existing = unsafe { *existing };
                let same_connection = existing.new_daddr_be == reply.new_daddr_be
                    && existing.new_dport_be == reply.new_dport_be
                    && existing.new_saddr_be == reply.new_saddr_be
                    && existing.new_sport_be == reply.new_sport_be;
                same_connection || cfg.ct_entry_expired(&existing, flow.proto, now)
            }
        };
        if claimable && NP_CT.insert(key, reply, u64::from(BPF_ANY)).is_ok() {
            return Ok(port_be);
        }
    }
    Err(Counter::DroppedSnatExhausted)
}

/// Remote backend -> node address:SNAT port: back to the client, from the frontend.
#[inline(always)]
fn snat_reply(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    entry: *mut CtEntry,
) -> Result<Verdict, Counter> {
    let now = now();
    conntrack::record(entry, flow, now, CT_DIR_REPLY);
    transmit(ctx, cfg, flow, entry, now)
}

/// Rewrites the packet as `entry` says and sends it on its way.
#[inline(always)]
fn transmit(
    ctx: &XdpContext,
    cfg: &DatapathConfig,
    flow: &Flow,
    entry: *mut CtEntry,
    now: u64,
) -> Result<Verdict, Counter> {
    // TTL 1: the kernel answers with ICMP time exceeded, about the packet the client sent.
    // SAFETY: flow.ip is a bounds-checked IPv4 header.
    if unsafe { (*flow.ip).ttl } <= 1 {
        return Ok((xdp_action::XDP_PASS, Counter::FallbackTtlExceeded));
    }
    // SAFETY: points into the map value.
    let new = Tuple::from(unsafe { &*entry });
    let ingress = ingress_ifindex(ctx);
    // Cached next hops are re-checked after a second.
    let route = fib::next_hop(entry, now, u64::from(cfg.hz), || {
        fib::lookup(
            ctx.ctx as *mut c_void,
            ingress,
            flow.proto,
            flow.tot_len,
            new.saddr_be,
            new.daddr_be,
        )
    });
    rewrite_xdp(flow, &new);
    // The kernel stack routes what the FIB lookup could not decide (and sends any ICMP).
    let (ifindex, flags, smac, dmac) = match route {
        Route::Unresolved => return Ok((xdp_action::XDP_PASS, Counter::FallbackFibLookup)),
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => (ifindex, 0, smac, dmac),
        Route::NoNeighbour { ifindex } => (ifindex, XDP_META_F_NEIGH, [0; 6], [0; 6]),
    };
    decrement_ttl_xdp(flow.ip);

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
