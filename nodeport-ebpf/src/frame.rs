//! The hook the external path runs in: XDP (the fast path) or TC ingress (`--external-hook
//! tc`, for interfaces whose frames XDP cannot translate correctly: a veth's packets with
//! partial checksums or GSO, see docs/datapath.md "XDP or TC"). Module `ext` is written once
//! over [`Frame`]; what differs between the hooks is here: how a packet is parsed, rewritten
//! and sent on, and whether nodeport answers a packet itself.

use core::{ffi::c_void, mem::size_of, ptr::null_mut};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use nodeport_common::{
    Counter, DatapathConfig, IPPROTO_TCP, PROG_SLOT_NEW_CONNECTION, XDP_META_F_NEIGH,
    XDP_META_MAGIC, XdpMeta, checksum::IcmpKind, counters::CounterKind,
};

use crate::{
    answer,
    fib::{Hop, Route},
    maps::{NP_PROGS, NP_TC_PROGS},
    nat::{Tuple, decrement_ttl_xdp, rewrite_skb, rewrite_xdp},
    packet::{ETH_HLEN, EthHdr, Flow, Ipv4Hdr, parse, ptr_at},
    stats,
};

/// The action and the counter that records it.
pub type Verdict = (u32, Counter);

/// A packet on an external interface, in the hook it runs in.
pub trait Frame {
    /// The hook's action for a packet nodeport leaves to the kernel, and for a dropped one.
    const PASS: u32;
    const DROP: u32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The context, for helpers that take either kind (bpf_fib_lookup).
    fn raw(&self) -> *mut c_void;
    fn ingress_ifindex(&self) -> u32;
    /// Parses the packet's headers (TC: pulled into the linear part first).
    fn parse(&self) -> Result<Flow, Counter>;
    /// The length one packet of this flow has on the wire, for the route's MTU: the IPv4
    /// total length, or one segment's for a GSO packet (TC).
    fn wire_len(&self, flow: &Flow) -> u16;
    /// Tail-calls the new-connection program of this hook; returns only when that failed.
    fn tail_call_new(&self);
    /// Rewrites `flow` to `new` and sends it on by `route` (TTL above 1).
    fn transmit(&self, flow: &Flow, new: &Tuple, route: Route) -> Result<Verdict, Counter>;
    /// Sends on by `route` a packet already rewritten in place (IPv4 header `ip`, TTL above 1).
    fn send(&self, ip: *mut Ipv4Hdr, route: Route) -> Result<Verdict, Counter>;
    /// Answers the packet with an ICMP error of `kind` (module `answer`), or leaves it to the
    /// kernel, which answers as a router and kube-proxy's REJECT do.
    fn answer_icmp(
        &self,
        cfg: &DatapathConfig,
        flow: &Flow,
        now: u64,
        kind: IcmpKind,
        counters: (Counter, Counter),
    ) -> Result<Verdict, Counter>;
    /// Answers a TCP segment with an RST (module `answer`), or leaves it to the kernel.
    fn answer_rst(
        &self,
        cfg: &DatapathConfig,
        flow: &Flow,
        now: u64,
        counters: (Counter, Counter),
    ) -> Result<Verdict, Counter>;
    /// Makes an ICMP error's headers readable and writable in place (TC: linear).
    fn pull_icmp_error(&self) -> bool;

    /// Counts a packet's fate, exactly once (a tail call leaves its caller's counting to the
    /// program it went to): the one place where an outcome becomes the hook's action.
    #[inline(always)]
    fn verdict(outcome: Result<Verdict, Counter>) -> u32 {
        let (action, counter) = match outcome {
            Ok(verdict) => verdict,
            Err(counter) if counter.kind() == CounterKind::Dropped => (Self::DROP, counter),
            Err(counter) => (Self::PASS, counter),
        };
        stats::count(counter);
        action
    }
}

impl Frame for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx as *mut c_void
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: ctx is the kernel's xdp_md.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn parse(&self) -> Result<Flow, Counter> {
        let (data, data_end) = (Frame::data(self), Frame::data_end(self));
        parse(data, data_end, data_end - data)
    }

    #[inline(always)]
    fn wire_len(&self, flow: &Flow) -> u16 {
        flow.tot_len
    }

    #[inline(always)]
    fn tail_call_new(&self) {
        // SAFETY: a tail call into a program of this object.
        unsafe { NP_PROGS.tail_call(self, PROG_SLOT_NEW_CONNECTION) };
    }

    #[inline(always)]
    fn transmit(&self, flow: &Flow, new: &Tuple, route: Route) -> Result<Verdict, Counter> {
        rewrite_xdp(flow, new);
        self.send(flow.ip, route)
    }

    #[inline(always)]
    fn send(&self, ip: *mut Ipv4Hdr, route: Route) -> Result<Verdict, Counter> {
        let ingress = Frame::ingress_ifindex(self);
        // The kernel stack routes what the FIB lookup could not decide (and sends any ICMP).
        let (ifindex, flags, smac, dmac) = match route.hop {
            Hop::Unresolved | Hop::FragNeeded => return Err(Counter::FallbackFibLookup),
            Hop::Resolved => (route.ifindex, 0, route.smac, route.dmac),
            Hop::NoNeighbour => (route.ifindex, XDP_META_F_NEIGH, [0; 6], [0; 6]),
        };
        decrement_ttl_xdp(ip);

        if ifindex == ingress && flags == 0 {
            let eth: *mut EthHdr = ptr_at(Frame::data(self), Frame::data_end(self), 0)
                .ok_or(Counter::DroppedMalformed)?;
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
        // SAFETY: ctx is the kernel's xdp_md.
        if unsafe { bpf_xdp_adjust_meta(self.ctx, -(size_of::<XdpMeta>() as i32)) } != 0 {
            return Err(Counter::FallbackNoMetadata);
        }
        let meta: *mut XdpMeta =
            ptr_at(self.metadata(), Frame::data(self), 0).ok_or(Counter::FallbackNoMetadata)?;
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

    #[inline(always)]
    fn answer_icmp(
        &self,
        cfg: &DatapathConfig,
        flow: &Flow,
        now: u64,
        kind: IcmpKind,
        counters: (Counter, Counter),
    ) -> Result<Verdict, Counter> {
        answer::icmp(self, cfg, flow, now, kind, counters)
    }

    #[inline(always)]
    fn answer_rst(
        &self,
        cfg: &DatapathConfig,
        flow: &Flow,
        now: u64,
        counters: (Counter, Counter),
    ) -> Result<Verdict, Counter> {
        answer::rst(self, cfg, flow, now, counters)
    }

    #[inline(always)]
    fn pull_icmp_error(&self) -> bool {
        true
    }
}

/// Enough for Ethernet + IPv4 with options + a TCP header with options.
pub const HEADERS_MAX: u32 = 14 + 60 + 60;

impl Frame for TcContext {
    // TC_ACT_UNSPEC: on to the next TC program if any, then the stack (tcx's "next").
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb as *mut c_void
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: skb is the kernel's __sk_buff.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn parse(&self) -> Result<Flow, Counter> {
        // A frame of a VLAN: the kernel took its tag off before TC (into the skb) and hands
        // it to the VLAN device next; it is that device's, as in XDP (module `packet`).
        // SAFETY: skb is the kernel's __sk_buff.
        if unsafe { (*self.skb.skb).vlan_present } != 0 {
            return Err(Counter::PassedVlan);
        }
        parse_skb(self)
    }

    #[inline(always)]
    fn wire_len(&self, flow: &Flow) -> u16 {
        // SAFETY: skb is the kernel's __sk_buff.
        let gso_size = unsafe { (*self.skb.skb).gso_size };
        if gso_size == 0 || flow.later_fragment() {
            return flow.tot_len;
        }
        // A GSO packet leaves as segments of gso_size bytes of payload, each with the headers.
        // The TCP header is in the linear part (parsed); a direct read needs no stack buffer.
        let doff = ptr_at::<u8>(Frame::data(self), Frame::data_end(self), flow.l4_off + 12);
        let l4_header = match doff {
            // SAFETY: bounds-checked data offset byte.
            Some(doff) if flow.proto == IPPROTO_TCP => usize::from(unsafe { *doff } >> 4) * 4,
            _ => 8,
        };
        let headers = flow.l4_off - ETH_HLEN + l4_header;
        let segment = headers + gso_size as usize;
        if segment < usize::from(flow.tot_len) {
            segment as u16
        } else {
            flow.tot_len
        }
    }

    #[inline(always)]
    fn tail_call_new(&self) {
        // SAFETY: a tail call into a program of this object.
        unsafe { NP_TC_PROGS.tail_call(self, PROG_SLOT_NEW_CONNECTION) };
    }

    #[inline(always)]
    fn transmit(&self, flow: &Flow, new: &Tuple, route: Route) -> Result<Verdict, Counter> {
        // The skb helpers keep a partial checksum partial (the device or the receiver
        // completes it) and a complete one complete: what XDP cannot do.
        rewrite_skb(self, flow, new).map_err(|_| Counter::FallbackRedirect)?;
        self.send(null_mut(), route)
    }

    /// `_ip` unused: `redirect_skb` finds the header again (the skb helpers of `transmit`
    /// invalidated the pointers).
    #[inline(always)]
    fn send(&self, _ip: *mut Ipv4Hdr, route: Route) -> Result<Verdict, Counter> {
        let (action, neighbour) = redirect_skb(self, route)?;
        let counter = if neighbour {
            Counter::ForwardedTcNatNeigh
        } else {
            Counter::ForwardedTcNat
        };
        Ok((action as u32, counter))
    }

    #[inline(always)]
    fn answer_icmp(
        &self,
        _cfg: &DatapathConfig,
        _flow: &Flow,
        _now: u64,
        _kind: IcmpKind,
        _counters: (Counter, Counter),
    ) -> Result<Verdict, Counter> {
        Err(Counter::FallbackKernelAnswers)
    }

    #[inline(always)]
    fn answer_rst(
        &self,
        _cfg: &DatapathConfig,
        _flow: &Flow,
        _now: u64,
        _counters: (Counter, Counter),
    ) -> Result<Verdict, Counter> {
        Err(Counter::FallbackKernelAnswers)
    }

    #[inline(always)]
    fn pull_icmp_error(&self) -> bool {
        self.skb.pull_data(HEADERS_MAX.min(self.len())).is_ok()
    }
}

/// Parses an skb's headers, pulled into the linear part first when they are not all there
/// (one parse, one Flow on the stack: the TC programs' frames are near the verifier's limit).
#[inline(always)]
pub fn parse_skb(ctx: &TcContext) -> Result<Flow, Counter> {
    let len = ctx.len() as usize;
    let want = HEADERS_MAX.min(len as u32);
    if ctx.data_end() - ctx.data() < want as usize {
        ctx.skb
            .pull_data(want)
            .map_err(|_| Counter::DroppedMalformed)?;
    }
    parse(ctx.data(), ctx.data_end(), len)
}

/// Sends a translated skb on by `route`, as a router: its TTL decremented, to the next hop's
/// MAC address (`bpf_redirect`), or through the kernel's neighbour resolution
/// (`bpf_redirect_neigh`, then the bool is true). Err: the counter of why the kernel stack
/// gets it instead (no route decided, TTL 1, headers gone).
#[inline(always)]
pub fn redirect_skb(ctx: &TcContext, route: Route) -> Result<(i64, bool), Counter> {
    let macs = match route.hop {
        Hop::Unresolved | Hop::FragNeeded => return Err(Counter::FallbackFibLookup),
        Hop::Resolved => Some((route.smac, route.dmac)),
        Hop::NoNeighbour => None,
    };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN),
    ) else {
        return Err(Counter::FallbackRedirect);
    };
    // SAFETY: bounds-checked IPv4 header.
    if unsafe { (*ip).ttl } <= 1 {
        return Err(Counter::FallbackTtlExceeded);
    }
    // A direct write: the header checksum compensates, so a complete checksum of the packet
    // stays true.
    decrement_ttl_xdp(ip);
    let Some((smac, dmac)) = macs else {
        // SAFETY: no neighbour parameters: the helper resolves the next hop itself.
        return Ok((
            unsafe { bpf_redirect_neigh(route.ifindex, null_mut(), 0, 0) },
            true,
        ));
    };
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        (*eth).src = smac;
        (*eth).dst = dmac;
    }
    // SAFETY: plain helper call; to the egress of `ifindex`, the ingress device included.
    Ok((unsafe { bpf_redirect(route.ifindex, 0) }, false))
}
