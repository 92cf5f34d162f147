//! Rewriting a packet's tuple. XDP writes the headers and updates the checksums itself
//! (frames from a wire always carry full checksums); TC uses the skb helpers, which also handle
//! CHECKSUM_PARTIAL skbs (replies from local pods carry only the pseudo-header sum).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nodeport_common::{CtEntry, IPPROTO_UDP, checksum};

use crate::packet::{
    ETH_HLEN, Flow, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF, IP_TTL_OFF, Ipv4Hdr,
};

/// Addresses and ports in network order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

impl From<&CtEntry> for Tuple {
    /// What a packet of this entry's direction is rewritten to.
    #[inline(always)]
    fn from(entry: &CtEntry) -> Self {
        Self {
            saddr_be: entry.new_saddr_be,
            daddr_be: entry.new_daddr_be,
            sport_be: entry.new_sport_be,
            dport_be: entry.new_dport_be,
        }
    }
}

/// Rewrites `flow` to `new` in an XDP frame.
#[inline(always)]
pub fn rewrite_xdp(flow: &Flow, new: &Tuple) {
    // SAFETY: `flow`'s pointers were bounds-checked by the parser and the frame has not been
    // resized since.
    unsafe {
        let ip = flow.ip;
        let mut ip_check = (*ip).check;
        let mut l4_check = *flow.check;
        // A UDP checksum of zero means "none" and stays so. A later fragment has no L4
        // header: its first fragment's checksum covers the whole datagram and was updated
        // for the addresses and ports there.
        let l4 = !flow.later_fragment();
        let l4_has_check = l4 && (flow.proto != IPPROTO_UDP || l4_check != 0);
        if new.saddr_be != flow.saddr_be {
            ip_check = checksum::replace4(ip_check, flow.saddr_be, new.saddr_be);
            l4_check = checksum::replace4(l4_check, flow.saddr_be, new.saddr_be);
            (*ip).saddr_be = new.saddr_be;
        }
        if new.daddr_be != flow.daddr_be {
            ip_check = checksum::replace4(ip_check, flow.daddr_be, new.daddr_be);
            l4_check = checksum::replace4(l4_check, flow.daddr_be, new.daddr_be);
            (*ip).daddr_be = new.daddr_be;
        }
        if l4 && new.sport_be != flow.sport_be {
            l4_check = checksum::replace2(l4_check, flow.sport_be, new.sport_be);
            (*flow.ports).sport_be = new.sport_be;
        }
        if l4 && new.dport_be != flow.dport_be {
            l4_check = checksum::replace2(l4_check, flow.dport_be, new.dport_be);
            (*flow.ports).dport_be = new.dport_be;
        }
        (*ip).check = ip_check;
        if l4_has_check {
            *flow.check = if flow.proto == IPPROTO_UDP {
                checksum::udp_fixup(l4_check)
            } else {
                l4_check
            };
        }
    }
}

/// Decrements the TTL as a router does; the caller has checked it is above 1.
#[inline(always)]
pub fn decrement_ttl_xdp(ip: *mut Ipv4Hdr) {
    // SAFETY: `ip` is a bounds-checked IPv4 header.
    unsafe {
        // The TTL is the high byte of the 16-bit word it shares with the protocol.
        let word = (ip as usize + IP_TTL_OFF) as *const u16;
        let old = *word;
        (*ip).ttl -= 1;
        (*ip).check = checksum::replace2((*ip).check, old, *word);
    }
}

/// Rewrites `flow` to `new` in an skb (only the IPv4 header of a later fragment).
/// Invalidates packet pointers.
#[inline(always)]
pub fn rewrite_skb(ctx: &TcContext, flow: &Flow, new: &Tuple) -> Result<(), i64> {
    let l4 = !flow.later_fragment();
    let mangled0 = if flow.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    let ip_check = ETH_HLEN + IP_CHECK_OFF;
    if new.saddr_be != flow.saddr_be {
        let (old, new_addr) = (u64::from(flow.saddr_be), u64::from(new.saddr_be));
        if l4 {
            ctx.l4_csum_replace(flow.check_off, old, new_addr, mangled0 | pseudo | 4)?;
        }
        ctx.l3_csum_replace(ip_check, old, new_addr, 4)?;
        ctx.store(ETH_HLEN + IP_SADDR_OFF, &new.saddr_be, 0)?;
    }
    if new.daddr_be != flow.daddr_be {
        let (old, new_addr) = (u64::from(flow.daddr_be), u64::from(new.daddr_be));
        if l4 {
            ctx.l4_csum_replace(flow.check_off, old, new_addr, mangled0 | pseudo | 4)?;
        }
        ctx.l3_csum_replace(ip_check, old, new_addr, 4)?;
        ctx.store(ETH_HLEN + IP_DADDR_OFF, &new.daddr_be, 0)?;
    }
    if l4 && new.sport_be != flow.sport_be {
        let (old, new_port) = (u64::from(flow.sport_be), u64::from(new.sport_be));
        ctx.l4_csum_replace(flow.check_off, old, new_port, mangled0 | 2)?;
        ctx.store(flow.l4_off, &new.sport_be, 0)?;
    }
    if l4 && new.dport_be != flow.dport_be {
        let (old, new_port) = (u64::from(flow.dport_be), u64::from(new.dport_be));
        ctx.l4_csum_replace(flow.check_off, old, new_port, mangled0 | 2)?;
        ctx.store(flow.l4_off + 2, &new.dport_be, 0)?;
    }
    Ok(())
}
