//! Where a translated packet goes next: the kernel's FIB (routes and neighbours), so the
//! datapath follows the node's routing without netfilter.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup_helper,
};
use nodeport_common::CtEntry;

const AF_INET: u8 = 2;

/// What the FIB said about a translated packet's next hop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Egress device and the MACs to write.
    Resolved,
    /// Egress device known, neighbour not resolved yet: bpf_redirect_neigh resolves it.
    NoNeighbour,
    /// The packet is larger than the route's MTU (`Route::mtu`): with DF set, its sender
    /// must hear so (ICMP fragmentation needed, about the packet as it sent it).
    FragNeeded,
    /// No decision (no route, forwarding off, ...): the kernel stack.
    Unresolved,
}

/// A next hop. A struct whose fields are always written, not an enum with payloads: LLVM
/// builds an enum's payload from undefined registers on the paths that do not use it, and
/// the verifier refuses arithmetic on a register that happens to hold a pointer there.
#[derive(Clone, Copy)]
pub struct Route {
    pub hop: Hop,
    /// Egress device (0 when unresolved).
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU (0 when unresolved).
    pub mtu: u16,
}

impl Route {
    const UNRESOLVED: Route = Route {
        hop: Hop::Unresolved,
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        mtu: 0,
    };
}

/// Looks up the route for an IPv4 packet. `ctx` is the program's context (xdp_md or
/// __sk_buff); in XDP `tot_len` is checked against the route's MTU, in TC the skb is (GSO
/// aware). Either way the route's MTU comes back (`mtu_result`, the union with `tot_len`).
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
    let size = size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: params is a valid bpf_fib_lookup of the size passed.
    let mut rc = unsafe { fib_lookup_helper(ctx, &mut params, size, 0) };
    // SAFETY: the helper wrote the MTU over the input length (on success and FRAG_NEEDED).
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
    if rc as u32 == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // XDP's lookup stops at the MTU check, before the egress device and the neighbour:
        // ask again without a length (rare: only for packets above the MTU) for those. (TC's
        // has them already, and says FRAG_NEEDED again: it checks the skb's length itself.)
        params.__bindgen_anon_1.tot_len = 0;
        params.ifindex = ingress_ifindex;
        // SAFETY: as above.
        rc = unsafe { fib_lookup_helper(ctx, &mut params, size, 0) };
        if !matches!(
            rc as u32,
            BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED
        ) {
            return Route::UNRESOLVED;
        }
        return Route {
            hop: Hop::FragNeeded,
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
            mtu,
        };
    }
    let hop = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Hop::Resolved,
        BPF_FIB_LKUP_RET_NO_NEIGH => Hop::NoNeighbour,
        _ => return Route::UNRESOLVED,
    };
    Route {
        hop,
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
        mtu,
    }
}

/// Whether the next hop cached in `entry` is due for a re-check (or there is none).
#[inline(always)]
pub fn stale(entry: *const CtEntry, now: u64, recheck: u64) -> bool {
    // SAFETY: `entry` points into a conntrack map value.
    unsafe { (*entry).route_stale(now, recheck) }
}

/// The next hop for a connection's packets: the one cached in its conntrack entry while it is
/// younger than `recheck` jiffies, else a FIB lookup, cached when it resolved (an unresolved
/// neighbour is not cached, so it is asked again until the kernel knows it), with the route's
/// MTU: a packet of `tot_len` bytes above it gets `Hop::FragNeeded` from the cache as from the
/// FIB (`tot_len` 0: no check, for TC, where GSO packets exceed the MTU legitimately).
#[inline(always)]
pub fn next_hop(
    entry: *mut CtEntry,
    now: u64,
    recheck: u64,
    tot_len: u16,
    lookup: impl FnOnce() -> Route,
) -> Route {
    // SAFETY: `entry` points into a conntrack map value.
    unsafe {
        if !stale(entry, now, recheck) {
            let mtu = (*entry).route_mtu();
            return Route {
                hop: if tot_len > mtu {
                    Hop::FragNeeded
                } else {
                    Hop::Resolved
                },
                ifindex: (*entry).route_ifindex,
                smac: (*entry).route_smac,
                dmac: (*entry).route_dmac,
                mtu,
            };
        }
        let route = lookup();
        if route.hop == Hop::Resolved {
            (*entry).route_ifindex = route.ifindex;
            (*entry).route_smac = route.smac;
            (*entry).route_dmac = route.dmac;
            (*entry).set_route_check(now, route.mtu);
        }
        route
    }
}
