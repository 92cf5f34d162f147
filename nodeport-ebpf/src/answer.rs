//! The answers nodeport sends itself from XDP, in place of the packet, back out of the
//! interface it came in on: an RST (an endpoint gone) and ICMP errors (kube-proxy's REJECT,
//! a router's time exceeded and fragmentation needed). In TC (module `frame`) the kernel
//! answers instead.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use nodeport_common::{
    Counter, DatapathConfig, IPPROTO_ICMP, TCP_ACK,
    checksum::{self, ICMP_ERROR_LEN, ICMP_ERROR_TTL, ICMP_QUOTE_LEN, IcmpKind},
};

use crate::{
    frame::Verdict,
    icmp::IcmpHdr,
    maps::NP_REJECT_BUDGET,
    packet::{ETH_HLEN, EthHdr, Flow, Ipv4Hdr, ptr_at},
};

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
pub fn rst(
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
pub fn icmp(
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

/// Turns the frame into the ICMP error of [`icmp`], from `from_be` to `to_be`, field
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
