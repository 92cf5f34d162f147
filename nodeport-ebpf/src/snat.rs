//! The tuple a new connection's replies come back on: claimed by inserting its reply entry,
//! unique across both conntrack tables, so two live connections never share one.
//!
//! For a remote backend it is (backend -> node SNAT address : port), the port chosen here the
//! way Linux NAT's nf_nat_l4proto_unique_tuple chooses one: rounds of consecutive probes from
//! a hashed start, a new start each round. The hash covers the client, the backend and a
//! per-node secret, so nobody outside can aim at another client's port, and a retransmitted
//! first packet probes the same ports and finds its own entry. For a local backend it is the
//! client's own tuple, unless another connection of that client already holds it at the pod
//! (two frontends of one pod): then the client's port is rewritten from the same ranges.

use aya_ebpf::bindings::BPF_NOEXIST;
use nodeport_common::{CT_DIR_FORWARD, Counter, CtEntry, CtKey, DatapathConfig, hash};

use crate::{
    conntrack::{self, Table},
    select::frontend_port,
};

const ROUNDS: u32 = 4;
const PROBES_PER_ROUND: u32 = 8;
/// Held ports looked at again, after the probes, for a connection that is over.
const RECLAIM_TRIES: u32 = 2;

/// Takes the reply tuple `reply_key` for the new connection `forward_key` by inserting its
/// reply entry. False when another live connection holds it. A connection that is over (both
/// entries expired), or an earlier attempt of this same one (a retransmitted first packet
/// whose forward entry was lost), gives it up.
#[inline(always)]
pub fn claim(
    cfg: &DatapathConfig,
    forward_key: &CtKey,
    reply_key: &CtKey,
    reply: &CtEntry,
    now: u64,
) -> bool {
    if let Some((table, existing)) = conntrack::lookup(reply_key) {
        // SAFETY: points into a conntrack map value, read before anything is removed.
        let existing = unsafe { &*existing };
        let ours = existing
            .opposite_key(reply_key.proto, CT_DIR_FORWARD)
            .same(forward_key);
        if !ours && conntrack::alive(cfg, reply_key, existing, now) {
            return false;
        }
        conntrack::forget(table, reply_key, existing);
    }
    Table::Handshake
        .insert(reply_key, reply, BPF_NOEXIST)
        .is_ok()
}

/// Finds a port for the reply tuple `base` (its destination port is chosen here) and claims
/// it. Returns the port in network order.
///
/// The probes only look (a free port is taken at once, our own entry is kept); whether a held
/// port belongs to a connection that is over is looked at only after them, for the first port
/// of the first [`RECLAIM_TRIES`] rounds. That keeps what the verifier walks per probe small;
/// the agent's conntrack GC frees dead connections' ports in the background.
#[inline(always)]
pub fn claim_port(
    cfg: &DatapathConfig,
    forward_key: &CtKey,
    base: &CtKey,
    reply: &CtEntry,
    now: u64,
) -> Result<u16, Counter> {
    let span = cfg.snat_span();
    if span == 0 {
        return Err(Counter::DroppedSnatExhausted);
    }
    let mut round = 0;
    while round < ROUNDS {
        let start = round_start(cfg, forward_key, base, round);
        let mut i = 0;
        while i < PROBES_PER_ROUND {
            let port = cfg.snat_port_at(start.wrapping_add(i) % span);
            if probe(forward_key, base, reply, port) {
                return Ok(port.to_be());
            }
            i += 1;
        }
        round += 1;
    }
    let mut round = 0;
    while round < RECLAIM_TRIES {
        let port = cfg.snat_port_at(round_start(cfg, forward_key, base, round) % span);
        let key = CtKey {
            dport_be: port.to_be(),
            ..*base
        };
        if !frontend_port(port) && claim(cfg, forward_key, &key, reply, now) {
            return Ok(port.to_be());
        }
        round += 1;
    }
    Err(Counter::DroppedSnatExhausted)
}

/// Where round `round` of the probes starts: a hash of the client, the frontend port, the
/// backend and the round, keyed with the node's secret.
#[inline(always)]
fn round_start(cfg: &DatapathConfig, forward_key: &CtKey, base: &CtKey, round: u32) -> u32 {
    hash::jhash_3words(
        forward_key.saddr_be ^ base.saddr_be.rotate_left(16),
        (u32::from(forward_key.sport_be) << 16) | u32::from(forward_key.dport_be),
        u32::from(base.sport_be) << 16 | u32::from(forward_key.proto) << 8 | round,
        cfg.hash_seed ^ cfg.snat_secret,
    )
}

/// One probe: takes `port` if it is free, or keeps it if this connection already has it.
/// A BPF subprogram of its own: the verifier then carries one outcome per probe onwards, not
/// every path through it.
#[inline(never)]
fn probe(forward_key: &CtKey, base: &CtKey, reply: &CtEntry, port: u16) -> bool {
    // A port some frontend listens on would send the backend's answers there.
    if frontend_port(port) {
        return false;
    }
    let key = CtKey {
        dport_be: port.to_be(),
        ..*base
    };
    match conntrack::lookup(&key) {
        None => Table::Handshake.insert(&key, reply, BPF_NOEXIST).is_ok(),
        // SAFETY: points into a conntrack map value. A retransmitted first packet finds its
        // own port.
        Some((_, existing)) => {
            unsafe { (*existing).opposite_key(key.proto, CT_DIR_FORWARD) }.same(forward_key)
        }
    }
}
