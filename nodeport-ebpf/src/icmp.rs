//! ICMP errors about translated connections, after nf_nat's `nf_nat_icmp_reply_translation`
//! (net/netfilter/nf_nat_proto.c) and Cilium's nat.h: an error quotes the packet it is about
//! as that packet was when it met the error. Past nodeport the quote holds translated
//! addresses and ports its receiver never sent, so the error is rewritten as a packet of the
//! connection going the other way: the quote back to what the receiver sent, the outer
//! header to reach it, every checksum updated.

use nodeport_common::{CtEntry, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, checksum};

use crate::packet::{ETH_HLEN, Ipv4Hdr, Ports, TCP_CHECK_OFF, UDP_CHECK_OFF, ptr_at};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Fragment offset and "more fragments" bits of the IPv4 header's frag_off field.
const IP_FRAGMENT_BITS: u16 = 0x3fff;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Offsets with both IPv4 headers without options: the ICMP header, the quoted IPv4 header,
/// the quoted transport header.
const ICMP_OFF: usize = ETH_HLEN + 20;
const INNER_IP_OFF: usize = ICMP_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + 20;

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Unused, or the next-hop MTU of "fragmentation needed", or a pointer.
    pub rest: u32,
}

/// An ICMP error about a TCP or UDP packet, both IPv4 headers without options (routers and
/// hosts send them so), the quote holding at least the quoted packet's ports.
pub struct IcmpError {
    pub outer: *mut Ipv4Hdr,
    pub icmp: *mut IcmpHdr,
    pub inner: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// The quoted transport checksum when the quote holds it and it is in use (a UDP
    /// checksum of zero is none); null otherwise.
    pub l4_check: *mut u16,
    pub proto: u8,
}

impl IcmpError {
    /// The key of the connection entry whose packets go the other way from the quoted one:
    /// its tuple reversed, in direction `dir` (the forward entry for an error about a packet
    /// sent to the client, the reply entry for one about a packet sent to the backend).
    #[inline(always)]
    pub fn key(&self, dir: u8) -> CtKey {
        // SAFETY: bounds-checked by `parse_error`.
        unsafe {
            CtKey {
                saddr_be: (*self.inner).daddr_be,
                daddr_be: (*self.inner).saddr_be,
                sport_be: (*self.ports).dport_be,
                dport_be: (*self.ports).sport_be,
                proto: self.proto,
                dir,
                _pad: 0,
            }
        }
    }

    /// Whether the error goes back to the quoted packet's sender, as an error must.
    #[inline(always)]
    pub fn to_sender(&self) -> bool {
        // SAFETY: bounds-checked by `parse_error`.
        unsafe { (*self.outer).daddr_be == (*self.inner).saddr_be }
    }
}

/// Parses an ICMP error in the frame between `data` and `data_end` (Ethernet first). None:
/// not an ICMP error this module translates (echo, a quote of something else, options).
#[inline(always)]
pub fn parse_error(data: usize, data_end: usize) -> Option<IcmpError> {
    let outer: *mut Ipv4Hdr = ptr_at(data, data_end, ETH_HLEN)?;
    let icmp: *mut IcmpHdr = ptr_at(data, data_end, ICMP_OFF)?;
    let inner: *mut Ipv4Hdr = ptr_at(data, data_end, INNER_IP_OFF)?;
    let ports: *mut Ports = ptr_at(data, data_end, INNER_L4_OFF)?;
    // SAFETY: all four bounds-checked just above.
    unsafe {
        if (*outer).version_ihl != 0x45
            || (*outer).proto != IPPROTO_ICMP
            || u16::from_be((*outer).frag_off_be) & IP_FRAGMENT_BITS != 0
        {
            return None;
        }
        if !matches!(
            (*icmp).kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        ) {
            return None;
        }
        let proto = (*inner).proto;
        // A later fragment quotes no ports.
        if (*inner).version_ihl != 0x45
            || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
            || u16::from_be((*inner).frag_off_be) & IP_OFFSET_MASK != 0
        {
            return None;
        }
        let check_off = if proto == IPPROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
        let l4_check = match ptr_at::<u16>(data, data_end, INNER_L4_OFF + check_off) {
            Some(check) if proto == IPPROTO_TCP || *check != 0 => check,
            _ => core::ptr::null_mut(),
        };
        Some(IcmpError {
            outer,
            icmp,
            inner,
            ports,
            l4_check,
            proto,
        })
    }
}

/// Rewrites `err`, an error about a packet going against `entry` (found under `key`), as
/// nf_nat does: the quoted packet becomes the one its receiver sent (source: where `entry`'s
/// packets go; destination: what they come from), the outer destination that receiver, and
/// the outer source the address the connection's packets in `entry`'s direction come from
/// when the connection changes it (the frontend for a backend's error, the SNAT address for
/// a router's error on the way to a remote backend; a router on the client's side stays).
/// Does not touch the TTL.
#[inline(always)]
pub fn translate(err: &IcmpError, key: &CtKey, entry: &CtEntry) {
    // SAFETY: `err`'s pointers were bounds-checked by `parse_error`, the frame not resized
    // since; the fields they cover do not overlap.
    unsafe {
        let inner = err.inner;
        let (old_src, old_dst) = ((*inner).saddr_be, (*inner).daddr_be);
        let (old_sport, old_dport) = ((*err.ports).sport_be, (*err.ports).dport_be);
        let (new_src, new_dst) = (entry.new_daddr_be, entry.new_saddr_be);
        let (new_sport, new_dport) = (entry.new_dport_be, entry.new_sport_be);

        // The quoted IPv4 header, and the ICMP checksum over it.
        let old_inner_check = (*inner).check;
        let mut inner_check = checksum::replace4(old_inner_check, old_src, new_src);
        inner_check = checksum::replace4(inner_check, old_dst, new_dst);
        let mut icmp_check = (*err.icmp).check;
        icmp_check = checksum::replace4(icmp_check, old_src, new_src);
        icmp_check = checksum::replace4(icmp_check, old_dst, new_dst);
        icmp_check = checksum::replace2(icmp_check, old_inner_check, inner_check);
        (*inner).saddr_be = new_src;
        (*inner).daddr_be = new_dst;
        (*inner).check = inner_check;

        // The quoted ports, and its checksum when quoted (pseudo-header addresses too).
        if !err.l4_check.is_null() {
            let old_l4 = *err.l4_check;
            let mut l4 = checksum::replace4(old_l4, old_src, new_src);
            l4 = checksum::replace4(l4, old_dst, new_dst);
            l4 = checksum::replace2(l4, old_sport, new_sport);
            l4 = checksum::replace2(l4, old_dport, new_dport);
            if err.proto == IPPROTO_UDP {
                l4 = checksum::udp_fixup(l4);
            }
            icmp_check = checksum::replace2(icmp_check, old_l4, l4);
            *err.l4_check = l4;
        }
        icmp_check = checksum::replace2(icmp_check, old_sport, new_sport);
        icmp_check = checksum::replace2(icmp_check, old_dport, new_dport);
        (*err.ports).sport_be = new_sport;
        (*err.ports).dport_be = new_dport;
        (*err.icmp).check = icmp_check;

        // The outer header: to the quoted packet's new sender, from the connection's address.
        let outer = err.outer;
        let mut outer_check = (*outer).check;
        let old_outer_dst = (*outer).daddr_be;
        outer_check = checksum::replace4(outer_check, old_outer_dst, new_src);
        (*outer).daddr_be = new_src;
        if entry.new_saddr_be != key.saddr_be {
            let old_outer_src = (*outer).saddr_be;
            outer_check = checksum::replace4(outer_check, old_outer_src, new_dst);
            (*outer).saddr_be = new_dst;
        }
        (*outer).check = outer_check;
    }
}
