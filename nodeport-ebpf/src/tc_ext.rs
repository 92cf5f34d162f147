//! TC ingress on the external interfaces: redirects the packets XDP translated for another
//! device (a local pod's veth, another interface). Everything else continues untouched
//! (`np_tc_ext`: to the next TC program if any, TC_ACT_UNSPEC being tcx's "next"; TC_ACT_OK
//! would end the chain), or is translated here (`np_tc_ext_nat`, module `ext`).

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use nodeport_common::{Counter, XDP_META_F_NEIGH, XDP_META_MAGIC, XdpMeta};

use crate::{
    packet::{EthHdr, ptr_at},
    stats::count,
};

/// Redirects a packet XDP translated (its metadata says where); None for any other packet.
#[inline(always)]
pub fn redirect_translated(ctx: &TcContext) -> Option<i32> {
    // SAFETY: ctx.skb.skb is the kernel's __sk_buff.
    let (meta_start, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, ctx.data()) };
    let meta = ptr_at::<XdpMeta>(meta_start, data, 0)?;
    // SAFETY: bounds-checked metadata written by np_xdp_ext.
    let meta = unsafe { *meta };
    if meta.magic != XDP_META_MAGIC {
        return None;
    }
    if meta.flags & XDP_META_F_NEIGH != 0 {
        count(Counter::ForwardedTcRedirectNeigh);
        // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
        return Some(unsafe { bpf_redirect_neigh(meta.ifindex, null_mut(), 0, 0) } as i32);
    }
    let Some(eth) = ptr_at::<EthHdr>(data, ctx.data_end(), 0) else {
        count(Counter::FallbackRedirect);
        return Some(TC_ACT_OK);
    };
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        (*eth).src = meta.smac;
        (*eth).dst = meta.dmac;
    }
    count(Counter::ForwardedTcRedirect);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(meta.ifindex, 0) as i32 })
}
