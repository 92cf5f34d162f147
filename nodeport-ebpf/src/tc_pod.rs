//! TC ingress on pod-facing interfaces: a local backend's reply to a nodeport connection gets
//! its source translated back to the frontend and is redirected out towards the client, before
//! netfilter sees it (netfilter never saw the request either, and would call the reply INVALID).
//! Any other pod traffic continues untouched.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use nodeport_common::{CT_DIR_REPLY, Counter};

use crate::{
    conntrack::{self, now},
    fib::{self, Route},
    maps::{NP_CONFIG, NP_CT},
    nat::{Tuple, decrement_ttl_skb, rewrite_skb},
    packet::{Flow, parse},
    stats::count,
};

/// Enough for Ethernet + IPv4 with options + a TCP header with options.
const HEADERS_MAX: u32 = 14 + 60 + 60;

#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Option<Flow> {
    let len = ctx.len() as usize;
    match parse(ctx.data(), ctx.data_end(), len) {
        Ok(flow) => Some(flow),
        // Headers not in the linear part yet: pull them in and parse again.
        Err(Counter::DroppedMalformed) if len > ctx.data_end() - ctx.data() => {
            ctx.skb.pull_data(HEADERS_MAX.min(len as u32)).ok()?;
            parse(ctx.data(), ctx.data_end(), len).ok()
        }
        Err(_) => None,
    }
}

#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    // Not a reply of ours: on to the next TC program, if any (tcx's "next").
    let Some(flow) = parse_skb(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if flow.first_fragment {
        return TC_ACT_UNSPEC;
    }
    let Some(entry_ptr) = NP_CT.get_ptr_mut(conntrack::key(&flow, CT_DIR_REPLY)) else {
        return TC_ACT_UNSPEC;
    };
    let now = now();
    let hz = NP_CONFIG.get(0).map_or(0, |cfg| u64::from(cfg.hz));
    conntrack::record(entry_ptr, &flow, now, CT_DIR_REPLY);
    // SAFETY: points into the map value.
    let new = Tuple::from(unsafe { &*entry_ptr });
    // SAFETY: ctx.skb.skb is the kernel's __sk_buff.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let route = fib::next_hop(entry_ptr, now, hz, || {
        fib::lookup(
            ctx.skb.skb as *mut c_void,
            ingress,
            flow.proto,
            0,
            new.saddr_be,
            new.daddr_be,
        )
    });
    if rewrite_skb(ctx, &flow, &new).is_err() {
        count(Counter::FallbackRedirect);
        return TC_ACT_OK;
    }
    let (ifindex, macs) = match route {
        Route::Unresolved => {
            count(Counter::FallbackFibLookup);
            return TC_ACT_OK;
        }
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } => (ifindex, Some((smac, dmac))),
        Route::NoNeighbour { ifindex } => (ifindex, None),
    };
    if !decrement_ttl_skb(ctx).unwrap_or(false) {
        count(Counter::FallbackTtlExceeded);
        return TC_ACT_OK;
    }
    match macs {
        Some((smac, dmac)) => {
            if ctx.store(0, &dmac, 0).is_err() || ctx.store(6, &smac, 0).is_err() {
                count(Counter::FallbackRedirect);
                return TC_ACT_OK;
            }
            count(Counter::ForwardedPodReply);
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        None => {
            count(Counter::ForwardedPodReplyNeigh);
            // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
            unsafe { bpf_redirect_neigh(ifindex, null_mut(), 0, 0) as i32 }
        }
    }
}
