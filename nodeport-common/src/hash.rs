//! Hashing shared by the datapath (which slot of a Maglev table a flow takes) and the agent
//! (Maglev permutations). It is Bob Jenkins' lookup3 `jhash_3words`, as in the kernel's
//! `include/linux/jhash.h`, Cilium and Katran, so values can be checked against those.
//!
//! The flow hash leaves out the destination address on purpose: for a node port it is the
//! node's own address, which differs per node, and leaving it out makes a flow pick the same
//! backend whichever node it lands on (given the same endpoints), as Maglev intends.

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline(always)]
const fn final_mix(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The kernel's `jhash_3words(a, b, c, initval)`.
#[inline(always)]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    final_mix(
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    )
}

/// Hash of a flow for backend selection: client address and port, service port and protocol.
/// Addresses and ports are passed as they sit in the packet (network byte order).
#[inline(always)]
pub const fn flow_hash(saddr_be: u32, sport_be: u16, dport_be: u16, proto: u8, seed: u32) -> u32 {
    let ports = ((sport_be as u32) << 16) | dport_be as u32;
    jhash_3words(saddr_be, ports, proto as u32, seed)
}

/// Hash for sessionAffinity ClientIP: the client address alone, so every connection of a
/// client lands on the same slot.
#[inline(always)]
pub const fn client_hash(saddr_be: u32, seed: u32) -> u32 {
    jhash_3words(saddr_be, 0, 0, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jhash_matches_the_kernel_reference_value() {
        // Printed by the kernel's own jhash_3words (include/linux/jhash.h) compiled with gcc:
        // docs/reference/jhash_check.c.
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        assert_eq!(jhash_3words(0xc612_0001, 0x1234_5678, 6, 42), 0x4d6c_4d64);
    }

    #[test]
    fn flow_hash_depends_on_every_input() {
        let base = flow_hash(0x0100_12c6, 0x3930, 0x5075, 6, 0);
        assert_ne!(base, flow_hash(0x0200_12c6, 0x3930, 0x5075, 6, 0));
        assert_ne!(base, flow_hash(0x0100_12c6, 0x3931, 0x5075, 6, 0));
        assert_ne!(base, flow_hash(0x0100_12c6, 0x3930, 0x5076, 6, 0));
        assert_ne!(base, flow_hash(0x0100_12c6, 0x3930, 0x5075, 17, 0));
        assert_ne!(base, flow_hash(0x0100_12c6, 0x3930, 0x5075, 6, 1));
    }
}
