//! What a new connection may do and where it goes: frontend ports, martian sources, source
//! ranges, session affinity, Maglev.

use aya_ebpf::maps::lpm_trie::Key;
use nodeport_common::{
    AffinityEntry, AffinityKey, BE_F_DRAINING, Backend, Counter, DatapathConfig, FE_F_AFFINITY,
    FE_F_LOCAL_ONLY, FE_F_SOURCE_RANGES, Frontend, LocalNetKey, SrcRangeKey, frontend_port_bit,
    hash, src_range_prefix_len,
};

use crate::{
    conntrack::live_backend,
    maps::{NP_AFFINITY, NP_FE_PORTS, NP_LOCAL_NETS, NP_MAGLEV, NP_SRC_RANGES},
    packet::Flow,
};

/// Whether some frontend uses destination port `port` (host order).
#[inline(always)]
pub fn frontend_port(port: u16) -> bool {
    let (word, bit) = frontend_port_bit(port);
    NP_FE_PORTS.get(word).is_some_and(|w| w & bit != 0)
}

/// Sources no outside client can have: 0/8, loopback, multicast, class E and broadcast (the
/// kernel's martian checks in ip_route_input_slow), and what the agent lists in
/// `NP_LOCAL_NETS` (the node's own addresses, its pod networks).
#[inline(always)]
pub fn martian_source(saddr_be: u32) -> bool {
    let first_octet = u32::from_be(saddr_be) >> 24;
    if first_octet == 0 || first_octet == 127 || first_octet >= 224 {
        return true;
    }
    local_address(saddr_be)
}

/// Whether `addr_be` is one of the node's own addresses or in its pod networks
/// (`NP_LOCAL_NETS`). A function of its own (a BPF subprogram): its key stays off the
/// caller's stack frame, which on the established path is at the verifier's limit.
#[inline(never)]
pub fn local_address(addr_be: u32) -> bool {
    NP_LOCAL_NETS
        .get(Key::new(32, LocalNetKey { addr_be }))
        .is_some()
}

/// A destination no frame from the wire may have: loopback (127.0.0.0/8) or "this network"
/// (0.0.0.0/8). The kernel drops such frames as martians unless `route_localnet` is on (the
/// setting behind CVE-2020-8558); nodeport never serves node ports there.
#[inline(always)]
pub fn martian_destination(daddr_be: u32) -> bool {
    let first_octet = u32::from_be(daddr_be) >> 24;
    first_octet == 0 || first_octet == 127
}

/// loadBalancerSourceRanges: the client must fall in one of the service's prefixes.
#[inline(always)]
pub fn source_allowed(fe: &Frontend, saddr_be: u32) -> bool {
    if fe.flags & FE_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        src_range_prefix_len(32),
        SrcRangeKey {
            svc_id_be: fe.svc_id.to_be(),
            addr_be: saddr_be,
        },
    );
    NP_SRC_RANGES.get(&key).is_some()
}

#[inline(always)]
fn maglev_lookup(cfg: &DatapathConfig, fe: &Frontend, hash: u32) -> Option<u32> {
    let m = cfg.maglev_size;
    if m == 0 {
        return None;
    }
    let slot = fe.maglev_block.wrapping_mul(m).wrapping_add(hash % m);
    NP_MAGLEV.get(slot).copied()
}

/// Picks the backend for a new connection to `fe`.
#[inline(always)]
pub fn backend_for_new_flow(
    cfg: &DatapathConfig,
    fe: &Frontend,
    flow: &Flow,
    now: u64,
) -> Result<(u32, Backend), Counter> {
    if fe.backend_count == 0 {
        return Err(if fe.flags & FE_F_LOCAL_ONLY != 0 {
            Counter::DroppedNoLocalEndpoint
        } else {
            Counter::DroppedNoBackend
        });
    }
    if fe.flags & FE_F_AFFINITY == 0 {
        let h = hash::flow_hash(
            flow.saddr_be,
            flow.sport_be,
            flow.dport_be,
            flow.proto,
            cfg.hash_seed,
        );
        let id = maglev_lookup(cfg, fe, h).ok_or(Counter::DroppedNoBackend)?;
        let backend = live_backend(id, fe.svc_id).ok_or(Counter::DroppedNoBackend)?;
        return Ok((id, backend));
    }

    // sessionAffinity ClientIP: the last backend of this client while within the timeout
    // (counted from its last new connection, as kube-proxy's `recent` match does), else the
    // Maglev slot of the client address, so the choice also agrees across nodes.
    let akey = AffinityKey {
        svc_id: fe.svc_id,
        client_be: flow.saddr_be,
    };
    let timeout = u64::from(fe.affinity_timeout_s) * u64::from(cfg.hz);
    let remembered = NP_AFFINITY.get_ptr(akey).and_then(|entry| {
        // SAFETY: points into the map value.
        let entry = unsafe { *entry };
        if now.saturating_sub(entry.last_seen) > timeout {
            return None;
        }
        // A draining backend takes no new connections, remembered client or not.
        live_backend(entry.backend_id, fe.svc_id)
            .filter(|b| b.flags & BE_F_DRAINING == 0)
            .map(|b| (entry.backend_id, b))
    });
    let (id, backend) = match remembered {
        Some(found) => found,
        None => {
            let h = hash::client_hash(flow.saddr_be, cfg.hash_seed);
            let id = maglev_lookup(cfg, fe, h).ok_or(Counter::DroppedNoBackend)?;
            (
                id,
                live_backend(id, fe.svc_id).ok_or(Counter::DroppedNoBackend)?,
            )
        }
    };
    let entry = AffinityEntry {
        last_seen: now,
        backend_id: id,
        _pad: 0,
    };
    // A failed update only loses stickiness for later connections; this one is fine.
    let _ = NP_AFFINITY.insert(akey, entry, 0);
    Ok((id, backend))
}
