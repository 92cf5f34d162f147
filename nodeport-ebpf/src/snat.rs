//! The tuple a new connection's replies come back on: claimed by inserting its reply entry,
//! unique across both conntrack tables, so two live connections never share one.
//!
//! For a remote backend it is (backend -> node SNAT address : port), the port chosen here the
//! way Linux NAT's nf_nat_l4proto_unique_tuple chooses one: rounds of probes from a hashed
//! start, a new start each round (strided rather than consecutive, so held ports do not form
//! runs that later probes walk into); when all are held, a closed TCP connection's tuple may go
//! to a new SYN (nf_nat_used_tuple_harder). The hash covers the client, the backend and a
//! per-node secret, so nobody outside can aim at another client's port, and a retransmitted
//! first packet probes the same ports and finds its own entry. For a local backend it is the
//! client's own tuple, unless another connection of that client already holds it at the pod
//! (two frontends of one pod): then the client's port is rewritten from the same ranges.

use aya_ebpf::bindings::BPF_NOEXIST;
use nodeport_common::{
    CT_DIR_FORWARD, Counter, CtEntry, CtKey, DatapathConfig, hash, may_take_over,
};

use crate::{
    conntrack::{self, Table},
    maps::NP_CONFIG,
    select::frontend_port,
    stats,
};

const ROUNDS: u32 = 10;
const PROBES_PER_ROUND: u32 = 8;
/// Held ports looked at again, after the probes, for a connection that is over (the first
/// port of the first rounds). More than two exceeds the verifier's budget.
const RECLAIM_TRIES: u32 = 2;

/// Takes the reply tuple `reply_key` for the new connection `forward_key` by inserting its
/// reply entry. False when another live connection holds it. A connection that is over (both
/// entries expired), or an earlier attempt of this same one (a retransmitted first packet
/// whose forward entry was lost), gives it up.
///
/// A BPF subprogram: the verifier then walks what follows once per outcome, not once per path
/// through it.
#[inline(never)]
pub fn claim(forward_key: &CtKey, reply_key: &CtKey, reply: &CtEntry, now: u64) -> bool {
    let Some(cfg) = NP_CONFIG.get(0) else {
        return false;
    };
    if let Some((table, existing)) = conntrack::lookup_holder(reply_key) {
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

/// A SYN's sequence end (`syn_seq_end`), as [`probe`] takes it (a subprogram has five
/// arguments, in registers): the sequence number in the low bits, [`TAKEOVER`] set.
#[inline(always)]
fn takeover_arg(syn_seq_end: Option<u32>) -> u64 {
    syn_seq_end.map_or(0, |seq| u64::from(seq) | TAKEOVER)
}

const TAKEOVER: u64 = 1 << 32;

/// Finds a port for the reply tuple `base` (its destination port is chosen here) and claims
/// it. Returns the port in network order.
///
/// A probe takes a free port at once, keeps our own, and lets a SYN (`syn_seq_end`) take over
/// a closed connection's port ([`probe`]); whether a held port belongs to a connection that is
/// over is looked at only after the probes, for the first port of the first
/// [`RECLAIM_TRIES`] rounds. That keeps what the verifier walks per probe small;
/// the agent's conntrack GC frees dead connections' ports in the background.
#[inline(always)]
pub fn claim_port(
    cfg: &DatapathConfig,
    forward_key: &CtKey,
    base: &CtKey,
    reply: &CtEntry,
    syn_seq_end: Option<u32>,
    now: u64,
) -> Result<u16, Counter> {
    let span = cfg.snat_span();
    if span == 0 {
        return Err(Counter::DroppedSnatExhausted);
    }
    let takeover = takeover_arg(syn_seq_end);
    let mut round = 0;
    while round < ROUNDS {
        let start = round_start(cfg, forward_key, base, round);
        // A stride of the hash's other bits, not consecutive ports: consecutive probes from
        // many starts make runs of held ports that every later probe walks into.
        let stride = (start >> 16) | 1;
        let mut i = 0;
        while i < PROBES_PER_ROUND {
            let port = cfg.snat_port_at(start.wrapping_add(i.wrapping_mul(stride)) % span);
            if probe(forward_key, base, reply, port, takeover) {
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
        if !frontend_port(port) && claim(forward_key, &key, reply, now) {
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

/// One probe: takes `port` if it is free, or keeps it if this connection already has it, or
/// takes it over from a closed or abandoned connection (`takeover`, a SYN's sequence:
/// [`reclaimable`]).
/// A BPF subprogram of its own: the verifier then carries one outcome per probe onwards, not
/// every path through it.
#[inline(never)]
fn probe(forward_key: &CtKey, base: &CtKey, reply: &CtEntry, port: u16, takeover: u64) -> bool {
    // A port some frontend listens on would send the backend's answers there.
    if frontend_port(port) {
        return false;
    }
    let key = CtKey {
        dport_be: port.to_be(),
        ..*base
    };
    let Some((table, existing)) = conntrack::lookup_holder(&key) else {
        return Table::Handshake.insert(&key, reply, BPF_NOEXIST).is_ok();
    };
    // SAFETY: points into a conntrack map value.
    let existing = unsafe { &*existing };
    // A retransmitted first packet finds its own port.
    if existing
        .opposite_key(key.proto, CT_DIR_FORWARD)
        .same(forward_key)
    {
        return true;
    }
    if takeover & TAKEOVER == 0 || !reclaimable(existing, takeover as u32) {
        return false;
    }
    // The old connection's forward entry is left to the agent's collector: it no longer pairs
    // with this tuple (`ct_pair`), and the packets of a closing or handshake connection are
    // checked against their partner every time (`xdp_ext::known`), so they are dropped, never
    // delivered on this tuple.
    table.remove(&key);
    if Table::Handshake.insert(&key, reply, BPF_NOEXIST).is_err() {
        return false;
    }
    stats::count(Counter::EventSnatTakeover);
    true
}

/// Whether a TCP SYN whose sequence ends at `seq_end` may take the tuple of the connection of
/// the reply entry `existing`:
/// - it closed more than a second ago, and the SYN is past the old client's sequence as the
///   backend acknowledged it ([`may_take_over`]; the second lets the close's last ACK arrive
///   first: Linux takes over only connections in TIME_WAIT);
/// - or its handshake never completed and its backend side has been quiet for three seconds:
///   a spoofed SYN's, or a client's that gave up (nf_conntrack's early_drop takes such
///   unassured connections first). A real client still trying retransmits its SYN, which then
///   starts a new connection (`conntrack::on_forward`).
#[inline(always)]
fn reclaimable(existing: &CtEntry, seq_end: u32) -> bool {
    let Some(cfg) = NP_CONFIG.get(0) else {
        return false;
    };
    let quiet = conntrack::now().wrapping_sub(existing.last_seen);
    let second = u64::from(cfg.hz);
    if existing.state.established == 0 {
        return quiet > 3 * second;
    }
    // The backend's last acknowledgement is where the old client's sequence ended (0: none seen).
    let old_client_seq = (existing.ack_max != 0).then_some(existing.ack_max);
    quiet > second && may_take_over(&existing.state, old_client_seq, seq_end)
}
