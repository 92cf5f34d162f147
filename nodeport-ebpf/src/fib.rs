//! Where a translated packet goes next: the kernel's FIB (routes and neighbours), so the
//! datapath follows the node's routing without netfilter.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup_helper,
};
use nodeport_common::CtEntry;

const AF_INET: u8 = 2;

pub enum Route {
    /// Egress device and the MACs to write.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Egress device known, neighbour not resolved yet: bpf_redirect_neigh resolves it.
    NoNeighbour { ifindex: u32 },
    /// No decision (no route, forwarding off, needs fragmentation, ...): the kernel stack.
    Unresolved,
}

/// Looks up the route for an IPv4 packet. `ctx` is the program's context (xdp_md or
/// __sk_buff); `tot_len` enables the MTU check (0 lets TC check the skb, GSO aware).
#[inline(always)]
pub fn lookup(
    ctx: *mut c_void,
    ingress_ifindex: u32,
    proto: u8,
    tot_len: u16,
    saddr_be: u32,
    daddr_be: u32,
) -> Route {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_3.ipv4_src = saddr_be;
    params.__bindgen_anon_4.ipv4_dst = daddr_be;
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup_helper(ctx, &mut params, size_of::<bpf_fib_lookup>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour {
            ifindex: params.ifindex,
        },
        _ => Route::Unresolved,
    }
}

/// The next hop for a connection's packets: the one cached in its conntrack entry while it is
/// younger than `recheck` jiffies, else a FIB lookup, cached when it resolved (an unresolved
/// neighbour is not cached, so it is asked again until the kernel knows it).
#[inline(always)]
pub fn next_hop(
    entry: *mut CtEntry,
    now: u64,
    recheck: u64,
    lookup: impl FnOnce() -> Route,
) -> Route {
    // SAFETY: `entry` points into a conntrack map value.
    unsafe {
        let checked = (*entry).route_checked;
        if checked != 0 && now.wrapping_sub(checked) < recheck {
            return Route::Resolved {
                ifindex: (*entry).route_ifindex,
                smac: (*entry).route_smac,
                dmac: (*entry).route_dmac,
            };
        }
        let route = lookup();
        if let Route::Resolved {
            ifindex,
            smac,
            dmac,
        } = route
        {
            (*entry).route_ifindex = ifindex;
            (*entry).route_smac = smac;
            (*entry).route_dmac = dmac;
            (*entry).route_checked = now;
        }
        route
    }
}
