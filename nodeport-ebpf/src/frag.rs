//! IPv4 fragments, after Cilium's fragment tracking (bpf/lib/ipv4.h:
//! `ipv4_frag_register_mapping`, `ipv4_handle_fragmentation`, the LRU map
//! `cilium_ipv4_frag_datagrams` keyed by saddr, daddr, id, proto with the L4 ports as value).
//!
//! Only a datagram's first fragment carries the ports. Each first fragment a hook sees
//! registers them in `NP_FRAGS` under the datagram's (source, destination, IP id, protocol);
//! a later fragment takes its ports from there and then goes the way its first fragment went
//! (the same conntrack lookup and translation), of which only the IPv4 header is rewritten.
//! A later fragment with no registered first fragment (it came first, or more than
//! `FRAG_TIMEOUT_S` after it) is dropped and counted: it could belong to a connection, and
//! nothing may leave untranslated (docs/datapath.md, "Fragments").
//!
//! Both functions are BPF subprograms of their own: their key and value stay off the
//! callers' stack frames, which are near the verifier's limit.

use nodeport_common::{FRAG_TIMEOUT_S, FragKey, FragPorts};

use crate::{
    conntrack::now,
    maps::{NP_CONFIG, NP_FRAGS},
    packet::Flow,
    select,
};

/// `lookup`'s "found" bit, above the two ports.
const FOUND: u64 = 1 << 32;

/// Records the ports of a first fragment (`ports`: source port in the low 16 bits, both as
/// they are in the packet).
#[inline(never)]
fn register(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8, ports: u32) {
    let key = FragKey {
        saddr_be,
        daddr_be,
        id_be,
        proto,
        _pad: 0,
    };
    let value = FragPorts {
        sport_be: ports as u16,
        dport_be: (ports >> 16) as u16,
        seen: now() as u32,
    };
    // An LRU makes room by itself; a failed update leaves the later fragments to be counted.
    let _ = NP_FRAGS.insert(key, value, 0);
}

/// The ports of the first fragment of the datagram, `FOUND` with the source port in the low
/// 16 bits; 0 when there is none, or it is older than `FRAG_TIMEOUT_S`.
#[inline(never)]
fn lookup(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> u64 {
    let key = FragKey {
        saddr_be,
        daddr_be,
        id_be,
        proto,
        _pad: 0,
    };
    let Some(found) = NP_FRAGS.get_ptr(key) else {
        return unknown(daddr_be);
    };
    let hz = NP_CONFIG.get(0).map_or(0, |cfg| cfg.hz);
    // SAFETY: points into the map value; copied out.
    let FragPorts {
        sport_be,
        dport_be,
        seen,
    } = unsafe { *found };
    if (now() as u32).wrapping_sub(seen) > FRAG_TIMEOUT_S * hz {
        return unknown(daddr_be);
    }
    FOUND | u64::from(dport_be) << 16 | u64::from(sport_be)
}

/// `lookup`'s answer for a later fragment whose first was not seen (or is too old). Addressed
/// to the node or one of its pod networks, it may be the node's own or a pod's traffic, and
/// the kernel forwards nothing of nodeport's untranslated from there (a datagram nodeport
/// translates is addressed to a node address, where the kernel holds the fragment until its
/// reassembly times out): "found" with ports 0, which no frontend, SNAT port or connection
/// has, so it goes its way untouched like any traffic that is not nodeport's. Addressed
/// elsewhere (a LoadBalancer IP the node does not hold, a client's address), the kernel would
/// forward it untranslated: 0, dropped.
#[inline(always)]
fn unknown(daddr_be: u32) -> u64 {
    if select::local_address(daddr_be) {
        FOUND
    } else {
        0
    }
}

/// Registers `flow`'s ports if it is a first fragment.
#[inline(always)]
pub fn register_first(flow: &Flow) {
    if flow.first_fragment() {
        // SAFETY: flow.ip is a bounds-checked IPv4 header.
        let id_be = unsafe { (*flow.ip).id_be };
        let ports = u32::from(flow.dport_be) << 16 | u32::from(flow.sport_be);
        register(flow.saddr_be, flow.daddr_be, id_be, flow.proto, ports);
    }
}

/// The ports of a later fragment's datagram, (source, destination), as in its first fragment
/// (ports 0 for one whose first was not seen, addressed to the node: see `unknown`).
#[inline(always)]
pub fn later_ports(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> Option<(u16, u16)> {
    let found = lookup(saddr_be, daddr_be, id_be, proto);
    (found & FOUND != 0).then_some((found as u16, (found >> 16) as u16))
}
