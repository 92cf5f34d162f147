//! Connection tracking in `NP_CT` (an LRU hash): a forward entry per client connection and a
//! reply entry for the backend's packets, each holding the tuple its packets are rewritten to.
//! Entries expire by state (SYN sent, established, closing, UDP) as the kernel's conntrack
//! does; the LRU evicts under pressure.

use aya_ebpf::helpers::bpf_jiffies64;
use nodeport_common::{
    BE_F_DRAINING, BE_F_PRESENT, Backend, CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey, CtState,
    DatapathConfig,
};

use crate::{
    maps::{NP_BACKENDS, NP_CT},
    packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// The time in jiffies: measured here as the cheapest clock (bpf_ktime_get_coarse_ns costs
/// ~14 ns more per packet); its resolution suits timeouts and throttles `touch` writes.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
pub fn key(flow: &Flow, dir: u8) -> CtKey {
    CtKey {
        saddr_be: flow.saddr_be,
        daddr_be: flow.daddr_be,
        sport_be: flow.sport_be,
        dport_be: flow.dport_be,
        proto: flow.proto,
        dir,
        _pad: 0,
    }
}

/// Key of the entry for the other direction: the rewritten tuple, reversed.
#[inline(always)]
pub fn opposite_key(entry: &CtEntry, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr_be: entry.new_daddr_be,
        daddr_be: entry.new_saddr_be,
        sport_be: entry.new_dport_be,
        dport_be: entry.new_sport_be,
        proto,
        dir,
        _pad: 0,
    }
}

/// Records a packet of direction `dir` on `entry`: its time and the connection's state.
/// Returns the new state when it changed, so the caller can mirror it on the other entry.
/// (MINIMAL COMPILE FIX on the issue-11-agent branch: the lead's datapath replaces this.)
#[inline(always)]
pub fn touch(entry: *mut CtEntry, flow: &Flow, now: u64, dir: u8) -> Option<CtState> {
    let _ = (TCP_FIN, TCP_RST);
    // SAFETY: `entry` points into the map value.
    unsafe {
        let old = (*entry).state;
        let new = old.after(flow.proto, dir, flow.tcp_flags, false);
        if (*entry).last_seen != now {
            (*entry).last_seen = now;
        }
        if new != old {
            (*entry).state = new;
            Some(new)
        } else {
            None
        }
    }
}

/// Records a packet of direction `dir` on its connection's `entry`: its time, its flags (the
/// newly set ones mirrored on the other direction's entry; a reply marks the connection as
/// answered) and the service's packets and bytes. Returns the service id.
#[inline(always)]
pub fn record(entry: *mut CtEntry, flow: &Flow, now: u64, dir: u8) -> u32 {
    let opposite = if dir == CT_DIR_FORWARD {
        CT_DIR_REPLY
    } else {
        CT_DIR_FORWARD
    };
    let changed = touch(entry, flow, now, dir);
    // SAFETY: `entry` points into the map value.
    let entry = unsafe { &*entry };
    if let Some(state) = changed {
        mark_opposite(entry, flow.proto, opposite, state);
    }
    stats::service(entry.svc_id, flow.tot_len, dir);
    entry.svc_id
}

/// Stores `state` in the entry for the other direction of `entry`.
#[inline(always)]
pub fn mark_opposite(entry: &CtEntry, proto: u8, dir: u8, state: CtState) {
    if let Some(other) = NP_CT.get_ptr_mut(opposite_key(entry, proto, dir)) {
        // SAFETY: points into the map value.
        unsafe { (*other).state = state };
    }
}

/// The backend `id` if it still exists for service `svc_id`.
#[inline(always)]
pub fn live_backend(id: u32, svc_id: u32) -> Option<Backend> {
    let backend = *NP_BACKENDS.get(id)?;
    (backend.flags & BE_F_PRESENT != 0 && backend.svc_id == svc_id).then_some(backend)
}

/// An existing connection can go on: not expired, not a new SYN on a closed connection, and
/// its backend still there for its service (with the address it was given: ids are reused).
/// A deleted service deletes its backends, so its connections stop here too.
#[inline(always)]
pub fn still_valid(cfg: &DatapathConfig, entry: &CtEntry, flow: &Flow, now: u64) -> bool {
    if cfg.ct_entry_expired(entry, flow.proto, now) {
        return false;
    }
    if flow.is_tcp()
        && entry.state.closing()
        && flow.tcp_flags & TCP_SYN != 0
        && flow.tcp_flags & TCP_ACK == 0
    {
        return false;
    }
    match live_backend(entry.backend_id, entry.svc_id) {
        // A draining backend keeps its TCP connections; UDP has none to finish and moves on,
        // so datagrams are not sent to a pod that is going away (kube-proxy clears such UDP
        // conntrack entries).
        Some(b) => {
            b.addr_be == entry.new_daddr_be
                && b.port_be == entry.new_dport_be
                && (flow.is_tcp() || b.flags & BE_F_DRAINING == 0)
        }
        None => false,
    }
}
