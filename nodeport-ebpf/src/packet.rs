//! Header layouts and the one parser both hooks use. All packet access goes through
//! [`ptr_at`], which checks the bounds the verifier needs to see.
//!
//! What is malformed is decided the way the kernel's own receive path decides it
//! (ip_rcv_core, tcp_v4_rcv, udp_rcv), so dropping it here drops nothing the kernel would keep.

use core::mem::size_of;

use nodeport_common::{Counter, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, tcp_seq_end};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Offsets inside the IPv4 header.
pub const IP_TTL_OFF: usize = 8;
pub const IP_CHECK_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

/// The first 20 bytes of a TCP header or the 8 of a UDP header: ports come first in both.
#[repr(C)]
pub struct Ports {
    pub sport_be: u16,
    pub dport_be: u16,
}

#[repr(C)]
struct TcpHdr {
    ports: Ports,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urgent: u16,
}

#[repr(C)]
struct UdpHdr {
    ports: Ports,
    len_be: u16,
    check: u16,
}

/// Offset of the checksum inside the L4 header.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;

/// Returns a pointer to a `T` at `offset` from `data` if all of it lies before `data_end`.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *mut T)
}

/// A parsed IPv4 TCP or UDP packet: where its headers are and its tuple.
pub struct Flow {
    pub ip: *mut Ipv4Hdr,
    pub ports: *mut Ports,
    /// Offset of the L4 header from the start of the packet.
    pub l4_off: usize,
    /// The L4 checksum, and its offset from the start of the packet (for the skb helpers).
    pub check: *mut u16,
    pub check_off: usize,
    pub proto: u8,
    pub tcp_flags: u8,
    /// The TCP segment carries data (false for UDP and for first fragments).
    pub tcp_payload: bool,
    /// TCP: the sequence number after the segment (`tcp_seq_end`) and its acknowledgement
    /// number, host order (0 for UDP).
    pub tcp_seq_end: u32,
    pub tcp_ack: u32,
    /// First fragment of a fragmented datagram (ports present, rest of datagram elsewhere).
    pub first_fragment_flag: bool,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

impl Flow {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// The first fragment of a fragmented datagram.
    #[inline(always)]
    pub fn first_fragment(&self) -> bool {
        self.first_fragment_flag
    }

    /// A later fragment (module `frag`): no L4 header of its own, its ports are its first
    /// fragment's. `ports` and `check` then point at the IPv4 header and are never written;
    /// TCP flags and sequence numbers are 0; only the IPv4 header is rewritten. Told by the
    /// pointers, which the paths that ask keep anyway: a flag of its own costs the XDP stack
    /// frame a slot it does not have.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        core::ptr::addr_eq(self.ports, self.ip)
    }

    /// The IPv4 "don't fragment" bit (read from the header: rarely asked).
    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        // SAFETY: `ip` is a bounds-checked IPv4 header.
        u16::from_be(unsafe { (*self.ip).frag_off_be }) & IP_DF != 0
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    pub fn is_syn_only(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Parses Ethernet + IPv4 + TCP/UDP. `Err` carries what happened to a packet that is not a
/// well-formed IPv4 TCP/UDP packet: a `Passed` counter (not ours) or `DroppedMalformed`, or
/// `DroppedFragmentOutOfOrder` for a later fragment whose first fragment is not known and
/// that is not addressed to the node (module `frag`); a later fragment whose first fragment
/// is known gets that one's ports.
///
/// `frame_len` is the length of the whole frame, which in TC may extend past `data_end`
/// (non-linear skb); the headers themselves must lie before `data_end`.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, frame_len: usize) -> Result<Flow, Counter> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0).ok_or(Counter::DroppedMalformed)?;
    // SAFETY: ptr_at checked the bounds.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type_be });
    match ether_type {
        ETH_P_IP => {}
        ETH_P_ARP => return Err(Counter::PassedArp),
        ETH_P_IPV6 => return Err(Counter::PassedIpv6),
        ETH_P_8021Q | ETH_P_8021AD => return Err(Counter::PassedVlan),
        _ => return Err(Counter::PassedOtherEthertype),
    }

    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, ETH_HLEN).ok_or(Counter::DroppedMalformed)?;
    // SAFETY: ptr_at checked the bounds of the fixed header.
    let (version_ihl, tot_len, frag_off, proto, saddr_be, daddr_be) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).tot_len_be),
            u16::from_be((*ip).frag_off_be),
            (*ip).proto,
            (*ip).saddr_be,
            (*ip).daddr_be,
        )
    };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || usize::from(tot_len) < ihl {
        return Err(Counter::DroppedMalformed);
    }
    if ETH_HLEN + usize::from(tot_len) > frame_len {
        return Err(Counter::DroppedMalformed);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Counter::PassedOtherProtocol);
    }
    let l4_off = ETH_HLEN + ihl;
    let later = frag_off & IP_OFFSET_MASK != 0;
    let first_fragment = !later && frag_off & IP_MF != 0;
    let l4_len = usize::from(tot_len) - ihl;
    // One construction of the flow for all three kinds (a second one for later fragments
    // costs the XDP stack frame 16 bytes it does not have).
    let (ports, check, check_off, tcp_flags, tcp_payload, tcp_seq_end, tcp_ack, later_ports) =
        if later {
            // SAFETY: inside the checked IPv4 header.
            let id_be = unsafe { (*ip).id_be };
            let found = crate::frag::later_ports(saddr_be, daddr_be, id_be, proto)
                .ok_or(Counter::DroppedFragmentOutOfOrder)?;
            // No L4 header: pointers into the IPv4 header, never written (`Flow::fragment`).
            (
                ip as *mut Ports,
                ip as *mut u16,
                ETH_HLEN,
                0,
                false,
                0,
                0,
                Some(found),
            )
        } else if proto == IPPROTO_TCP {
            let tcp: *mut TcpHdr =
                ptr_at(data, data_end, l4_off).ok_or(Counter::DroppedMalformed)?;
            // SAFETY: ptr_at checked the bounds.
            let (data_offset, flags, seq, ack) = unsafe {
                (
                    (*tcp).data_offset >> 4,
                    (*tcp).flags,
                    u32::from_be((*tcp).seq),
                    u32::from_be((*tcp).ack),
                )
            };
            let header_len = usize::from(data_offset) * 4;
            if header_len < 20 || (!first_fragment && header_len > l4_len) {
                return Err(Counter::DroppedMalformed);
            }
            // SAFETY: inside the checked TCP header.
            let check = unsafe { core::ptr::addr_of_mut!((*tcp).check) };
            let payload = !first_fragment && l4_len > header_len;
            let payload_len = (l4_len - header_len.min(l4_len)) as u32;
            (
                tcp as *mut Ports,
                check,
                l4_off + TCP_CHECK_OFF,
                flags,
                payload,
                tcp_seq_end(seq, payload_len, flags),
                ack,
                None,
            )
        } else {
            let udp: *mut UdpHdr =
                ptr_at(data, data_end, l4_off).ok_or(Counter::DroppedMalformed)?;
            // SAFETY: ptr_at checked the bounds.
            let udp_len = usize::from(u16::from_be(unsafe { (*udp).len_be }));
            // The UDP length covers the whole datagram, which a first fragment does not hold.
            if udp_len < 8 || (!first_fragment && udp_len > l4_len) {
                return Err(Counter::DroppedMalformed);
            }
            // SAFETY: inside the checked UDP header.
            let check = unsafe { core::ptr::addr_of_mut!((*udp).check) };
            (
                udp as *mut Ports,
                check,
                l4_off + UDP_CHECK_OFF,
                0,
                false,
                0,
                0,
                None,
            )
        };

    // SAFETY: inside the L4 header checked above.
    let (sport_be, dport_be) =
        later_ports.unwrap_or_else(|| unsafe { ((*ports).sport_be, (*ports).dport_be) });
    Ok(Flow {
        ip,
        ports,
        l4_off,
        check,
        check_off,
        proto,
        tcp_flags,
        tcp_payload,
        tcp_seq_end,
        tcp_ack,
        first_fragment_flag: first_fragment,
        tot_len,
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
    })
}
