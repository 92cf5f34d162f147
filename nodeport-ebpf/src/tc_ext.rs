//! TC ingress on the external interfaces: redirects the packets XDP translated for another
//! device (a local pod's veth, another interface). Everything else continues untouched, to the
//! next TC program if any (TC_ACT_UNSPEC is tcx's "next"; TC_ACT_OK would end the chain).

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use nodeport_common::{Counter, XDP_META_F_NEIGH, XDP_META_MAGIC, XdpMeta};

use crate::{
    packet::{EthHdr, ptr_at},
    stats::count,
};

#[inline(always)]
pub fn process(ctx: &TcContext) -> i32 {
    // SAFETY: ctx.skb.skb is the kernel's __sk_buff.
    let (meta_start, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, ctx.data()) };
    let Some(meta) = ptr_at::<XdpMeta>(meta_start, data, 0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: bounds-checked metadata written by np_xdp_ext.
    let meta = unsafe { *meta };
    if meta.magic != XDP_META_MAGIC {
        return TC_ACT_UNSPEC;
    }
    if meta.flags & XDP_META_F_NEIGH != 0 {
        count(Counter::ForwardedTcRedirectNeigh);
        // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
        return unsafe { bpf_redirect_neigh(meta.ifindex, null_mut(), 0, 0) } as i32;
    }
    let Some(eth) = ptr_at::<EthHdr>(data, ctx.data_end(), 0) else {
        count(Counter::FallbackRedirect);
        return TC_ACT_OK;
    };
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        (*eth).src = meta.smac;
        (*eth).dst = meta.dmac;
    }
    count(Counter::ForwardedTcRedirect);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(meta.ifindex, 0) as i32 }
}
