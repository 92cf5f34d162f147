//! Connection tracking, after Linux nf_conntrack and Cilium's bpf/lib/conntrack.h
//! (docs/datapath.md, "Connection tracking", has the state machine and the reasons).
//!
//! A connection is two entries with the same value type: the forward entry (client ->
//! frontend) and the reply entry (backend -> client, or backend -> node:SNAT port), each
//! holding the tuple its packets are rewritten to. They live together in one of two tables:
//! - `NP_CT_NEW`, an LRU, while the connection is in the handshake (TCP until the client's ACK
//!   of the SYN-ACK, UDP until the first answer). A SYN flood churns only this table, the way
//!   nf_conntrack's early_drop evicts only unassured entries;
//! - `NP_CT`, a plain hash, once established. The datapath never evicts from it; the agent
//!   deletes connections whose two entries have both expired.
//!
//! Each entry's `last_seen` is written by its own direction only, and the state
//! ([`CtState`]) one byte per fact, so the two directions never undo each other's writes.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_jiffies64,
};
use nodeport_common::{
    BE_F_NOT_SERVING, BE_F_PRESENT, Backend, CT_DIR_FORWARD, CT_DIR_REPLY, Counter, CtEntry, CtKey,
    CtState, DatapathConfig, TCP_ACK, TCP_RST, ct_pair, rst_in_window,
};

use crate::{
    maps::{NP_BACKENDS, NP_CT, NP_CT_NEW},
    packet::Flow,
    stats,
};

/// The time in jiffies: measured here as the cheapest clock (bpf_ktime_get_coarse_ns costs
/// ~14 ns more per packet); its resolution suits timeouts and throttles `last_seen` writes.
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

#[inline(always)]
pub const fn other_dir(dir: u8) -> u8 {
    if dir == CT_DIR_FORWARD {
        CT_DIR_REPLY
    } else {
        CT_DIR_FORWARD
    }
}

/// The table a connection's entries are in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    Handshake,
}

impl Table {
    #[inline(always)]
    pub fn insert(self, key: &CtKey, entry: &CtEntry, flags: u32) -> Result<(), Counter> {
        let flags = u64::from(flags);
        match self {
            Table::Established => NP_CT.insert(key, entry, flags),
            Table::Handshake => NP_CT_NEW.insert(key, entry, flags),
        }
        .map_err(|_| Counter::DroppedConntrackFull)
    }

    #[inline(always)]
    pub fn remove(self, key: &CtKey) {
        // Already gone is as good as removed.
        let _ = match self {
            Table::Established => NP_CT.remove(key),
            Table::Handshake => NP_CT_NEW.remove(key),
        };
    }
}

/// Finds the entry for `key`, in the established table first: a packet of an established
/// connection costs one lookup. When neither table has it, the established table is asked once
/// more: another CPU may have promoted the connection in between (`promote` inserts into
/// `NP_CT`, then removes from `NP_CT_NEW`), and a packet that missed it in both would be taken
/// for one of no connection and answered with an RST by the kernel.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<(Table, *mut CtEntry)> {
    lookup_once(key).or_else(|| {
        NP_CT
            .get_ptr_mut(key)
            .map(|entry| (Table::Established, entry))
    })
}

/// [`lookup`] without the second look, for a client's SYN that may start a new connection (the
/// new-flow path must not pay a third lookup): a retransmitted SYN that races its own
/// connection's promotion goes on to `snat::claim`, which finds the connection's reply entry
/// there and takes the SYN for that connection's.
#[inline(always)]
pub fn lookup_once(key: &CtKey) -> Option<(Table, *mut CtEntry)> {
    if let Some(entry) = NP_CT.get_ptr_mut(key) {
        return Some((Table::Established, entry));
    }
    NP_CT_NEW
        .get_ptr_mut(key)
        .map(|entry| (Table::Handshake, entry))
}

/// Whether a connection holds the tuple `key`, asked in the order a promotion cannot slip
/// through (the handshake table, then the established one) with two lookups: for the claim of
/// a new connection's reply tuple, which must never be given to two live connections.
#[inline(always)]
pub fn lookup_holder(key: &CtKey) -> Option<(Table, *mut CtEntry)> {
    if let Some(entry) = NP_CT_NEW.get_ptr_mut(key) {
        return Some((Table::Handshake, entry));
    }
    NP_CT
        .get_ptr_mut(key)
        .map(|entry| (Table::Established, entry))
}

/// The other direction's entry of the connection of `entry` (under `key`), if it is there
/// and still belongs to this connection.
#[inline(always)]
pub fn partner(key: &CtKey, entry: &CtEntry) -> Option<(Table, CtKey, *mut CtEntry)> {
    let partner_key = entry.opposite_key(key.proto, other_dir(key.dir));
    let (table, found) = lookup(&partner_key)?;
    // SAFETY: points into a conntrack map value.
    ct_pair(key, entry, &partner_key, unsafe { &*found }).then_some((table, partner_key, found))
}

/// Whether the connection of `entry` lives at `now`: either direction had a packet within the
/// timeout of its state. The partner is read only when the entry alone looks expired (a
/// one-way UDP stream, a server push to a silent client).
#[inline(always)]
pub fn alive(cfg: &DatapathConfig, key: &CtKey, entry: &CtEntry, now: u64) -> bool {
    !cfg.ct_entry_expired(entry, key.proto, now)
        || partner(key, entry).is_some_and(|(_, _, p)| {
            // SAFETY: points into a conntrack map value.
            !cfg.ct_entry_expired(unsafe { &*p }, key.proto, now)
        })
}

/// Stores into `dst` the bytes that changed from `old` to `new`, each with a plain store.
#[inline(always)]
fn store_changes(dst: &mut CtState, old: &CtState, new: &CtState) {
    if new.replied != old.replied {
        dst.replied = new.replied;
    }
    if new.established != old.established {
        dst.established = new.established;
    }
    if new.fin_fwd != old.fin_fwd {
        dst.fin_fwd = new.fin_fwd;
    }
    if new.fin_rep != old.fin_rep {
        dst.fin_rep = new.fin_rep;
    }
    if new.rst_fwd != old.rst_fwd {
        dst.rst_fwd = new.rst_fwd;
    }
    if new.rst_rep != old.rst_rep {
        dst.rst_rep = new.rst_rep;
    }
}

/// Records a packet on its connection: its time in its own entry, what it tells about the
/// connection (stored into both entries when it changes anything) and the service's packets
/// and bytes. Returns the connection's new state.
///
/// Writes go through the map pointers. In `NP_CT` only the agent deletes, and only
/// connections idle past their timeout; in the LRU `NP_CT_NEW` the lookup that found the
/// entry just marked it referenced, and the LRU evicts unreferenced entries first. What a lost
/// race could touch is a time stamp or a state byte of an entry in the handshake, never a
/// tuple: tuples are written only by whole-entry inserts.
///
/// A TCP segment's sequence numbers go into its own entry; an RST outside its sender's window
/// (`rst_in_window`) changes nothing here and goes on to its endpoint, which drops it too.
#[inline(always)]
pub fn record(key: &CtKey, entry: *mut CtEntry, flow: &Flow, now: u64) -> CtState {
    // SAFETY: `entry` points into a conntrack map value.
    let e = unsafe { &mut *entry };
    if e.last_seen != now {
        e.last_seen = now;
    }
    let mut flags = flow.tcp_flags;
    // A later fragment has no TCP header: nothing to note (its flags are 0).
    if flow.is_tcp() && !flow.later_fragment() {
        if flags & TCP_RST == 0 {
            e.note_segment(flow.tcp_seq_end, flow.tcp_ack, flags & TCP_ACK != 0);
        } else if !rst_taken(key, e, flow.tcp_seq_end) {
            flags &= !TCP_RST;
            stats::count(Counter::EventCtRstIgnored);
        }
    }
    let old = e.state;
    let new = old.after(flow.proto, key.dir, flags, flow.tcp_payload);
    store_state(key, e, &old, &new);
    stats::service(e.svc_id, flow.tot_len, key.dir);
    new
}

/// Stores a connection's new state into both of its entries, when it changed.
#[inline(always)]
fn store_state(key: &CtKey, e: &mut CtEntry, old: &CtState, new: &CtState) {
    if new == old {
        return;
    }
    store_changes(&mut e.state, old, new);
    let partner_key = e.opposite_key(key.proto, other_dir(key.dir));
    if let Some((_, p)) = lookup(&partner_key) {
        // SAFETY: points into a conntrack map value.
        let p = unsafe { &mut *p };
        if ct_pair(key, e, &partner_key, p) {
            store_changes(&mut p.state, old, new);
        }
    }
}

/// Closes the connection of `entry` as if its backend had sent an RST (nodeport sent one in
/// its place): both entries expire after the closing timeout and a new SYN starts afresh.
#[inline(always)]
pub fn close_for_backend(key: &CtKey, entry: *mut CtEntry) {
    // SAFETY: `entry` points into a conntrack map value.
    let e = unsafe { &mut *entry };
    let old = e.state;
    let new = CtState { rst_rep: 1, ..old };
    store_state(key, e, &old, &new);
}

/// Whether an RST (sequence number `seq`) sent on the connection of `entry` is in its
/// sender's window, judged with the receiver's acknowledgements when its entry is there.
#[inline(never)]
fn rst_taken(key: &CtKey, entry: &CtEntry, seq: u32) -> bool {
    let receiver = partner(key, entry).map(|(_, _, p)| {
        // SAFETY: points into a conntrack map value.
        unsafe { &*p }
    });
    rst_in_window(seq, entry, receiver)
}

/// Makes sure the other direction's entry of a connection is there: recreated from this one
/// when it was lost (evicted from the handshake table, deleted by hand) and its tuple is still
/// free; an error when another connection holds that tuple now, so the packet is dropped
/// rather than crossed into the other connection.
#[inline(always)]
pub fn ensure_partner(table: Table, key: &CtKey, entry: &CtEntry, now: u64) -> Result<(), Counter> {
    let partner_key = entry.opposite_key(key.proto, other_dir(key.dir));
    if let Some((_, found)) = lookup(&partner_key) {
        // SAFETY: points into a conntrack map value.
        let found = unsafe { &*found };
        return if ct_pair(key, entry, &partner_key, found) {
            Ok(())
        } else {
            Err(Counter::DroppedCtPartnerLost)
        };
    }
    let rebuilt = CtEntry {
        last_seen: now,
        route_checked: 0,
        // The partner rewrites its packets back to this entry's key, reversed.
        new_saddr_be: key.daddr_be,
        new_daddr_be: key.saddr_be,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        route_ifindex: 0,
        route_smac: [0; 6],
        route_dmac: [0; 6],
        // The other direction's sequence numbers are not this one's.
        seq_next: 0,
        ack_max: 0,
        ..*entry
    };
    table
        .insert(&partner_key, &rebuilt, BPF_NOEXIST)
        .map_err(|_| Counter::DroppedCtPartnerLost)?;
    stats::count(Counter::EventCtPartnerRecreated);
    Ok(())
}

/// Moves a connection that completed its handshake from `NP_CT_NEW` to `NP_CT`. The reply
/// entry, which holds the tuple other connections must not take (the SNAT port), goes in
/// first and leaves last. When the established table is full, the connection stays where it
/// is and goes on working from there (counted).
#[inline(always)]
pub fn promote(key: &CtKey, entry: &CtEntry) {
    let Some((Table::Handshake, partner_key, partner)) = partner(key, entry) else {
        return;
    };
    // SAFETY: points into a conntrack map value (inserted from there, before any removal).
    let partner = unsafe { &*partner };
    let (first_key, first, second_key, second) = if key.dir == CT_DIR_REPLY {
        (key, entry, &partner_key, partner)
    } else {
        (&partner_key, partner, key, entry)
    };
    if NP_CT.insert(first_key, first, u64::from(BPF_ANY)).is_err() {
        stats::count(Counter::EventCtPromoteFailed);
        return;
    }
    if NP_CT
        .insert(second_key, second, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = NP_CT.remove(first_key);
        stats::count(Counter::EventCtPromoteFailed);
        return;
    }
    let _ = NP_CT_NEW.remove(second_key);
    let _ = NP_CT_NEW.remove(first_key);
}

/// Forgets a connection: its entry under `key` and, if it still pairs, the other one. The
/// forward entry goes first, so a reply tuple (a SNAT port) is never free while a forward
/// entry still points at it.
#[inline(always)]
pub fn forget(table: Table, key: &CtKey, entry: &CtEntry) {
    let partner = partner(key, entry);
    if key.dir == CT_DIR_FORWARD {
        table.remove(key);
    }
    if let Some((partner_table, partner_key, _)) = partner {
        partner_table.remove(&partner_key);
    }
    if key.dir == CT_DIR_REPLY {
        table.remove(key);
    }
}

/// The backend `id` if it still exists for service `svc_id`.
#[inline(always)]
pub fn live_backend(id: u32, svc_id: u32) -> Option<Backend> {
    let backend = *NP_BACKENDS.get(id)?;
    (backend.flags & BE_F_PRESENT != 0 && backend.svc_id == svc_id).then_some(backend)
}

/// What a client packet does with the connection its tuple already has.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Goes on with it.
    Continue,
    /// Goes on with it although it had expired: idle past its timeout, but whole, backend
    /// there, and this packet is no new SYN (a client back from a long pause, or after an RST
    /// its endpoint did not honour). The same backend and SNAT port keep it working.
    Revive,
    /// Starts a new connection on this tuple (after forgetting the old one): a new SYN on a
    /// closing or expired connection or one that lost its reply tuple, or a UDP flow whose
    /// backend is gone or stopped serving.
    Restart,
    /// Ends the connection: a TCP segment (no new SYN) whose backend has left the Service's
    /// endpoints. Its pod is gone; moved to another pod the segment would meet no socket,
    /// or one in TIME_WAIT that answers with ACKs and leaves the client hanging.
    BackendGone,
}

/// Decides what a client packet does with its existing connection.
#[inline(always)]
pub fn on_forward(
    cfg: &DatapathConfig,
    key: &CtKey,
    entry: &CtEntry,
    flow: &Flow,
    now: u64,
) -> Known {
    let new_syn = flow.is_syn_only();
    // A SYN on a closing connection, or on one whose reply tuple went to another connection
    // (`snat::probe` takes over abandoned handshakes): a new connection.
    if new_syn && (entry.state.closing() || partner(key, entry).is_none()) {
        return Known::Restart;
    }
    match live_backend(entry.backend_id, entry.svc_id) {
        // The backend id can be reused for another address: compare it too. A backend that
        // is still an endpoint keeps its TCP connections, ready or not (kube-proxy leaves
        // their conntrack entries alone), and its UDP flows while it still serves (as
        // kube-proxy, which clears UDP conntrack entries only of endpoints that stopped
        // serving: `deleteStaleEndpointConntrackEntries`, pkg/proxy/conntrack/cleanup.go);
        // a UDP flow moves off one that does not.
        Some(b)
            if b.addr_be == entry.new_daddr_be
                && b.port_be == entry.new_dport_be
                && (flow.is_tcp() || b.flags & BE_F_NOT_SERVING == 0) => {}
        _ if flow.is_tcp() && !new_syn => return Known::BackendGone,
        _ => return Known::Restart,
    }
    if !cfg.ct_entry_expired(entry, key.proto, now) {
        return Known::Continue;
    }
    match partner(key, entry) {
        // SAFETY: points into a conntrack map value.
        Some((_, _, p)) if !cfg.ct_entry_expired(unsafe { &*p }, key.proto, now) => Known::Continue,
        Some(_) if !new_syn => Known::Revive,
        _ => Known::Restart,
    }
}
