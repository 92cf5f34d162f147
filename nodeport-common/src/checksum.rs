//! Incremental Internet checksum updates (RFC 1624).
//!
//! All values are the raw 16/32-bit words as they sit in the packet: one's complement
//! arithmetic gives the same result in either byte order as long as every word is taken the
//! same way, so callers load fields with a native read and store the result back the same way.

/// Folds a 32-bit one's complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after a 16-bit word of the covered data changed from `old` to `new`
/// (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// Checksum after a 32-bit field of the covered data changed from `old` to `new`.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let old = !old;
    let sum = (!check) as u32 + (old & 0xffff) + (old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// A UDP checksum of zero means "no checksum" (RFC 768) and must stay zero; a computed
/// checksum that comes out as zero is sent as 0xffff instead.
#[inline(always)]
pub const fn udp_fixup(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// One's complement sum of 20 bytes (an IPv4 or TCP header without options), as native
/// 16-bit words; add a pseudo-header's words before folding for TCP.
#[inline(always)]
pub fn sum20(data: &[u8; 20]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_ne_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The IPv4 and TCP headers (20 bytes each, checksums filled in) of the RST that answers a
/// segment nobody can take, as Linux's `tcp_v4_send_reset` builds it (RFC 793, "Reset
/// Generation"): a segment with ACK gets `<SEQ=SEG.ACK><CTL=RST>`, one without (a SYN)
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`. `from`/`to` are the RST's own addresses and
/// ports (network order); `segment_ack` the answered segment's acknowledgement if it has the
/// ACK flag, `segment_seq_end` its sequence end (host order).
#[inline(always)]
pub fn rst_headers(
    from: (u32, u16),
    to: (u32, u16),
    segment_ack: Option<u32>,
    segment_seq_end: u32,
) -> ([u8; 20], [u8; 20]) {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&from.0.to_ne_bytes());
    ip[16..20].copy_from_slice(&to.0.to_ne_bytes());
    let ip_check = !fold(sum20(&ip));
    ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&from.1.to_ne_bytes());
    tcp[2..4].copy_from_slice(&to.1.to_ne_bytes());
    match segment_ack {
        Some(ack) => {
            tcp[4..8].copy_from_slice(&ack.to_be_bytes());
            tcp[13] = 0x04; // RST
        }
        None => {
            tcp[8..12].copy_from_slice(&segment_seq_end.to_be_bytes());
            tcp[13] = 0x14; // RST, ACK
        }
    }
    tcp[12] = 5 << 4;
    // Pseudo-header: addresses, protocol, TCP length.
    let pseudo = (from.0 & 0xffff)
        + (from.0 >> 16)
        + (to.0 & 0xffff)
        + (to.0 >> 16)
        + u16::from_ne_bytes(6u16.to_be_bytes()) as u32
        + u16::from_ne_bytes(20u16.to_be_bytes()) as u32;
    let tcp_check = !fold(fold(sum20(&tcp) + (pseudo & 0xffff)) as u32 + (pseudo >> 16));
    tcp[16..18].copy_from_slice(&tcp_check.to_ne_bytes());
    (ip, tcp)
}

/// Bytes of the offending packet an ICMP error quotes here: its IPv4 header (without options)
/// and the first 8 bytes after it, a UDP header or a TCP header's ports and sequence number
/// (RFC 792's minimum; Linux quotes more, but a receiver matches its socket by these).
pub const ICMP_QUOTE_LEN: usize = 28;

/// What an ICMP error says: its type and code, and for "fragmentation needed" the next-hop
/// MTU (RFC 1191; 0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpKind {
    pub kind: u8,
    pub code: u8,
    pub mtu: u16,
}

/// "Destination unreachable", code "port unreachable".
pub const ICMP_PORT_UNREACHABLE: IcmpKind = IcmpKind {
    kind: 3,
    code: 3,
    mtu: 0,
};
/// "Time exceeded", code "TTL exceeded in transit".
pub const ICMP_TTL_EXCEEDED: IcmpKind = IcmpKind {
    kind: 11,
    code: 0,
    mtu: 0,
};

/// "Destination unreachable", code "fragmentation needed and DF set", with the MTU of the
/// next hop.
#[inline(always)]
pub const fn icmp_frag_needed(mtu: u16) -> IcmpKind {
    IcmpKind {
        kind: 3,
        code: 4,
        mtu,
    }
}

/// The IPv4 header's TOS of an ICMP error about a packet of TOS `quoted_tos`, as Linux's
/// `icmp_send` sets it: `IPTOS_PREC_INTERNETCONTROL` plus the packet's TOS bits.
#[inline(always)]
pub const fn icmp_error_tos(quoted_tos: u8) -> u8 {
    0xc0 | (quoted_tos & 0x1e)
}

/// Total length of an ICMP error quoting [`ICMP_QUOTE_LEN`] bytes.
pub const ICMP_ERROR_LEN: u16 = (20 + 8 + ICMP_QUOTE_LEN) as u16;
/// The TTL of the ICMP errors the datapath sends.
pub const ICMP_ERROR_TTL: u8 = 64;

/// The checksums (as stored: native words) of an ICMP error of `kind` from `from` to `to`
/// (network order), quoting bytes whose one's complement sum of native 16-bit words is
/// `quote_sum`, laid out as Linux's `icmp_send` lays it out for iptables' `REJECT
/// --reject-with icmp-port-unreachable` or a router's TTL exceeded or fragmentation needed:
/// an IPv4 header without options (`tos`, [`ICMP_ERROR_LEN`], id 0, no DF,
/// [`ICMP_ERROR_TTL`], ICMP), then type, code, checksum and, for fragmentation needed, the
/// next-hop MTU in the last two bytes of the ICMP header. Returns (IPv4, ICMP). Computed from
/// the fields, without building the headers: the datapath writes them in place.
#[inline(always)]
pub fn icmp_error_checksums(
    kind: IcmpKind,
    from: u32,
    to: u32,
    tos: u8,
    quote_sum: u32,
) -> (u16, u16) {
    let word = |hi: u8, lo: u8| u16::from_ne_bytes([hi, lo]) as u32;
    let len = ICMP_ERROR_LEN.to_be_bytes();
    let ip_sum = word(0x45, tos)
        + word(len[0], len[1])
        + word(ICMP_ERROR_TTL, 1)
        + (from & 0xffff)
        + (from >> 16)
        + (to & 0xffff)
        + (to >> 16);
    let mtu = kind.mtu.to_be_bytes();
    let icmp_sum = word(kind.kind, kind.code) + word(mtu[0], mtu[1]) + fold(quote_sum) as u32;
    (!fold(ip_sum), !fold(icmp_sum))
}

/// Full checksum of `data` (used by userspace tests and tools, not per packet).
pub fn compute(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u32;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rst_headers_carry_valid_checksums() {
        let from = (u32::from_ne_bytes([198, 18, 0, 1]), 30080u16.to_be());
        let to = (u32::from_ne_bytes([198, 18, 0, 100]), 40000u16.to_be());
        let (ip, tcp) = rst_headers(from, to, None, 1009);
        assert_eq!(compute(&ip), 0, "IPv4 header checksum");
        let mut pseudo = [0u8; 32];
        pseudo[..12].copy_from_slice(&[198, 18, 0, 1, 198, 18, 0, 100, 0, 6, 0, 20]);
        pseudo[12..].copy_from_slice(&tcp);
        assert_eq!(compute(&pseudo), 0, "TCP checksum");
        assert_eq!(
            &tcp[0..4],
            &[0x75, 0x80, 0x9c, 0x40],
            "ports swapped in by the caller"
        );
        assert_eq!(&tcp[8..12], &1009u32.to_be_bytes(), "acknowledges the SYN");
        assert_eq!(tcp[13], 0x14, "RST, ACK");

        // A segment with ACK: the RST takes its acknowledgement as sequence number, no ACK.
        let (_, tcp) = rst_headers(from, to, Some(0xdead_beef), 1009);
        pseudo[12..].copy_from_slice(&tcp);
        assert_eq!(compute(&pseudo), 0, "TCP checksum");
        assert_eq!(&tcp[4..8], &0xdead_beefu32.to_be_bytes());
        assert_eq!(&tcp[8..12], &[0; 4]);
        assert_eq!(tcp[13], 0x04, "RST alone");
    }

    #[test]
    fn the_icmp_error_checksums_match_the_headers_laid_out() {
        let from = u32::from_ne_bytes([198, 18, 0, 1]);
        let to = u32::from_ne_bytes([198, 18, 0, 100]);
        let mut quoted = [0u8; ICMP_QUOTE_LEN];
        quoted[..20].copy_from_slice(&header([198, 18, 0, 100], [198, 18, 0, 1]));
        quoted[1] = 0x10;
        quoted[20..].copy_from_slice(&[0x9c, 0x40, 0x75, 0x80, 0, 12, 0xab, 0xcd]);
        let quote_sum = quoted
            .chunks_exact(2)
            .map(|w| u16::from_ne_bytes([w[0], w[1]]) as u32)
            .sum();
        for kind in [
            ICMP_PORT_UNREACHABLE,
            ICMP_TTL_EXCEEDED,
            icmp_frag_needed(1400),
        ] {
            let tos = icmp_error_tos(quoted[1]);
            assert_eq!(tos, 0xd0);
            let (ip_check, icmp_check) = icmp_error_checksums(kind, from, to, tos, quote_sum);
            // The layout the datapath writes, independently.
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[1] = tos;
            ip[2..4].copy_from_slice(&56u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 1;
            ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
            ip[12..16].copy_from_slice(&from.to_ne_bytes());
            ip[16..20].copy_from_slice(&to.to_ne_bytes());
            assert_eq!(compute(&ip), 0, "IPv4 header checksum of {kind:?}");
            let mut message = [0u8; 8 + ICMP_QUOTE_LEN];
            message[..2].copy_from_slice(&[kind.kind, kind.code]);
            message[2..4].copy_from_slice(&icmp_check.to_ne_bytes());
            message[6..8].copy_from_slice(&kind.mtu.to_be_bytes());
            message[8..].copy_from_slice(&quoted);
            assert_eq!(compute(&message), 0, "ICMP checksum of {kind:?}");
        }
    }

    /// An IPv4 header with a valid checksum (from RFC 1071's worked example style).
    fn header(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = compute(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn replace4_matches_full_recompute() {
        let mut h = header([198, 18, 0, 1], [198, 18, 1, 1]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let old = u32::from_ne_bytes(h[16..20].try_into().unwrap());
        let new_dst = [198, 19, 255, 254];
        let new = u32::from_ne_bytes(new_dst);
        let updated = replace4(check, old, new);
        h[16..20].copy_from_slice(&new_dst);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, compute(&h));
        h[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(
            compute(&h),
            0,
            "a header with a valid checksum sums to zero"
        );
    }

    #[test]
    fn replace2_matches_full_recompute_over_many_values() {
        let mut data = [0u8; 8];
        for seed in 0u32..2000 {
            let old_port = (seed.wrapping_mul(2654435761) >> 16) as u16;
            let new_port = (seed.wrapping_mul(40503) ^ 0x5a5a) as u16;
            data[0..2].copy_from_slice(&old_port.to_ne_bytes());
            data[2..4].copy_from_slice(&(seed as u16).to_ne_bytes());
            data[4..6].copy_from_slice(&[0, 0]);
            data[6..8].copy_from_slice(&[0xab, 0xcd]);
            let check = compute(&data);
            data[0..2].copy_from_slice(&new_port.to_ne_bytes());
            let expected = compute(&data);
            assert_eq!(replace2(check, old_port, new_port), expected, "seed {seed}");
        }
    }

    #[test]
    fn udp_zero_becomes_all_ones() {
        assert_eq!(udp_fixup(0), 0xffff);
        assert_eq!(udp_fixup(0x1234), 0x1234);
    }

    #[test]
    fn compute_handles_odd_length() {
        // 0x0102 + 0x0300 = 0x0402 -> !0x0402 (in big-endian word terms)
        let c = compute(&[1, 2, 3]);
        assert_eq!(u16::from_be_bytes(c.to_ne_bytes()), !0x0402);
    }
}
