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

/// The IPv4 and TCP headers (20 bytes each, checksums filled in) of the RST that answers a SYN
/// nobody can take, as a kernel without a listener answers it (RFC 793: a segment without ACK
/// gets `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`). `from`/`to` are the RST's own addresses
/// and ports (network order); `ack` is the SYN's sequence end (host order).
pub fn rst_headers(from: (u32, u16), to: (u32, u16), ack: u32) -> ([u8; 20], [u8; 20]) {
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
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x14; // RST, ACK
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
        let (ip, tcp) = rst_headers(from, to, 1009);
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
