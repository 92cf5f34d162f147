//! The two connection tables as the agent sees them: `NP_CT` (established connections, a
//! plain hash the datapath never evicts from) and `NP_CT_NEW` (connections in the handshake or
//! unanswered, an LRU). Each connection has two entries, forward (client -> frontend) and
//! reply (backend -> client, or backend -> node:SNAT port); each entry's `last_seen` moves
//! only with packets of its own direction, so **a connection lives while either of its
//! entries does** (a one-way UDP stream keeps only its forward entry fresh).
//!
//! Pure functions here decide which connections are live (census, `dump`) and which entries the
//! garbage collector deletes; [`sweep`] applies the latter to the maps.

use std::{collections::HashMap, io, time::Instant};

use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData};
use nodeport_common::{
    CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey, CtState, DatapathConfig, IPPROTO_TCP, ct_pair,
    names,
};
use serde::Serialize;

use super::census::for_each_entry;

/// Which connection table an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtTable {
    /// `NP_CT`: established connections.
    Established,
    /// `NP_CT_NEW`: connections in the handshake, or not answered yet.
    Handshake,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Established, CtTable::Handshake];

    /// The map's name.
    pub const fn map_name(self) -> &'static str {
        match self {
            CtTable::Established => names::CONNTRACK,
            CtTable::Handshake => names::CONNTRACK_NEW,
        }
    }

    pub const fn other(self) -> Self {
        match self {
            CtTable::Established => CtTable::Handshake,
            CtTable::Handshake => CtTable::Established,
        }
    }
}

/// One entry of one of the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtRecord {
    pub table: CtTable,
    pub key: CtKey,
    pub entry: CtEntry,
}

/// Reads every entry of both tables (batched, a few syscalls per thousand entries).
pub fn read_tables(established: &MapData, handshake: &MapData) -> io::Result<Vec<CtRecord>> {
    let mut records = Vec::new();
    for (table, map) in [
        (CtTable::Established, established),
        (CtTable::Handshake, handshake),
    ] {
        for_each_entry::<CtKey, CtEntry>(map, |key, entry| {
            records.push(CtRecord {
                table,
                key: *key,
                entry: *entry,
            })
        })?;
    }
    Ok(records)
}

/// The other direction's key of the entry `entry` stored under `key`.
pub fn partner_key(key: &CtKey, entry: &CtEntry) -> CtKey {
    let other = if key.dir == CT_DIR_FORWARD {
        CT_DIR_REPLY
    } else {
        CT_DIR_FORWARD
    };
    entry.opposite_key(key.proto, other)
}

/// The tables' entries with an index to find each one's partner.
pub struct Connections<'a> {
    pub records: &'a [CtRecord],
    index: HashMap<(CtTable, CtKey), usize>,
}

impl<'a> Connections<'a> {
    pub fn new(records: &'a [CtRecord]) -> Self {
        let index = records
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.table, r.key), i))
            .collect();
        Self { records, index }
    }

    /// The record of `records[i]`'s other direction, when it exists and pairs with it (its
    /// own table first: the datapath moves both entries of a connection together, but a
    /// promotion may be caught half-way).
    pub fn partner(&self, i: usize) -> Option<&CtRecord> {
        let r = &self.records[i];
        let want = partner_key(&r.key, &r.entry);
        [r.table, r.table.other()].into_iter().find_map(|table| {
            let p = &self.records[*self.index.get(&(table, want))?];
            ct_pair(&r.key, &r.entry, &p.key, &p.entry).then_some(p)
        })
    }

    /// Whether `records[i]`'s connection is live at `now`: its own entry, or its partner's.
    /// A shadowed entry (see [`Connections::shadowed`]) lives by its own entry alone.
    pub fn connection_live(&self, cfg: &DatapathConfig, i: usize, now: u64) -> bool {
        let r = &self.records[i];
        if !cfg.ct_entry_expired(&r.entry, r.key.proto, now) {
            return true;
        }
        !self.shadowed(i)
            && self
                .partner(i)
                .is_some_and(|p| !cfg.ct_entry_expired(&p.entry, p.key.proto, now))
    }

    /// Whether `records[i]` is a handshake-table entry whose key is also in the established
    /// table: a copy the promotion of its connection left behind (or is about to delete).
    /// The established entry is the connection; the copy is not counted, and goes when it
    /// expires itself.
    pub fn shadowed(&self, i: usize) -> bool {
        let r = &self.records[i];
        r.table == CtTable::Handshake && self.index.contains_key(&(CtTable::Established, r.key))
    }
}

/// Seconds of grace past a connection's timeout before the collector deletes it: the agent's
/// clock may read the kernel's jiffies a little late or early (docs/operations.md), and the
/// datapath takes up a connection that expired but is still whole anyway.
pub const GC_GRACE_S: u64 = 2;

/// Which entries the garbage collector deletes at `now` (jiffies): those of connections whose
/// entries have both expired (past [`GC_GRACE_S`]), and expired entries without a partner (or
/// whose partner belongs to another connection now). Forward entries come first, then reply
/// entries: a reply entry holds its connection's SNAT port, so freeing it last means no new
/// connection can take a port while the old connection's forward entry still exists.
pub fn gc_plan(cfg: &DatapathConfig, records: &[CtRecord], now: u64) -> Vec<(CtTable, CtKey)> {
    let now = now.saturating_sub(GC_GRACE_S * u64::from(cfg.hz));
    let connections = Connections::new(records);
    let mut forward = Vec::new();
    let mut reply = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if connections.connection_live(cfg, i, now) {
            continue;
        }
        if r.key.dir == CT_DIR_FORWARD {
            forward.push((r.table, r.key));
        } else {
            reply.push((r.table, r.key));
        }
    }
    forward.sort();
    reply.sort();
    forward.extend(reply);
    forward
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SweepReport {
    /// Entries in both tables when the sweep read them.
    pub entries: u64,
    /// Entries deleted from `NP_CT`.
    pub deleted_established: u64,
    /// Entries deleted from `NP_CT_NEW`.
    pub deleted_handshake: u64,
    /// Planned deletions skipped because a packet refreshed the connection meanwhile (or the
    /// entry was gone already).
    pub skipped: u64,
    pub seconds: f64,
}

/// The two tables, for the collector.
pub struct Tables<'a> {
    pub established: &'a mut BpfHashMap<MapData, CtKey, CtEntry>,
    pub handshake: &'a mut BpfHashMap<MapData, CtKey, CtEntry>,
}

impl Tables<'_> {
    fn get(&self, table: CtTable, key: &CtKey) -> Option<CtEntry> {
        match table {
            CtTable::Established => self.established.get(key, 0).ok(),
            CtTable::Handshake => self.handshake.get(key, 0).ok(),
        }
    }

    fn remove(&mut self, table: CtTable, key: &CtKey) -> bool {
        match table {
            CtTable::Established => self.established.remove(key).is_ok(),
            CtTable::Handshake => self.handshake.remove(key).is_ok(),
        }
    }

    /// Whether the entry under `key` in `table` may still be deleted at `now`: it is there,
    /// expired, and its partner (if paired) is expired too. Read again from the maps just
    /// before deleting, so a packet that refreshed the connection after the sweep read the
    /// tables keeps it.
    fn still_garbage(&self, cfg: &DatapathConfig, table: CtTable, key: &CtKey, now: u64) -> bool {
        let Some(entry) = self.get(table, key) else {
            return false;
        };
        if !cfg.ct_entry_expired(&entry, key.proto, now) {
            return false;
        }
        if table == CtTable::Handshake && self.get(CtTable::Established, key).is_some() {
            // A copy left by a promotion: it goes by its own expiry.
            return true;
        }
        let want = partner_key(key, &entry);
        ![table, table.other()].into_iter().any(|t| {
            self.get(t, &want).is_some_and(|p| {
                ct_pair(key, &entry, &want, &p) && !cfg.ct_entry_expired(&p, want.proto, now)
            })
        })
    }
}

/// One garbage collection pass over both tables: reads them, plans with [`gc_plan`], and
/// deletes in the plan's order, re-checking each entry just before deleting it.
pub fn sweep(tables: &mut Tables<'_>, cfg: &DatapathConfig, now: u64) -> io::Result<SweepReport> {
    let started = Instant::now();
    let records = read_tables(tables.established.map(), tables.handshake.map())?;
    let plan = gc_plan(cfg, &records, now);
    let recheck_now = now.saturating_sub(GC_GRACE_S * u64::from(cfg.hz));
    let mut report = SweepReport {
        entries: records.len() as u64,
        ..SweepReport::default()
    };
    for (table, key) in plan {
        if !tables.still_garbage(cfg, table, &key, recheck_now) || !tables.remove(table, &key) {
            report.skipped += 1;
            continue;
        }
        match table {
            CtTable::Established => report.deleted_established += 1,
            CtTable::Handshake => report.deleted_handshake += 1,
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The state a connection is in, for people (`dump --conntrack`).
pub fn state_name(proto: u8, state: &CtState) -> &'static str {
    if proto != IPPROTO_TCP {
        if state.established != 0 {
            "udp"
        } else {
            "udp-unreplied"
        }
    } else if state.closing() {
        "closing"
    } else if state.established == 0 {
        "handshake"
    } else if state.fin_fwd != 0 || state.fin_rep != 0 {
        "half-closed"
    } else {
        "established"
    }
}

#[cfg(test)]
mod tests {
    use nodeport_common::IPPROTO_UDP;

    use super::*;

    const HZ: u64 = 100;
    const NOW: u64 = 10_000_000;

    fn cfg() -> DatapathConfig {
        DatapathConfig {
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21_600,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 60,
            hz: HZ as u32,
            ..DatapathConfig::default()
        }
    }

    fn established() -> CtState {
        CtState {
            replied: 1,
            established: 1,
            ..CtState::default()
        }
    }

    /// A connection from client port `client_port` to a remote backend through SNAT port
    /// `snat_port`: its forward and reply records, idle `fwd_idle_s` / `rep_idle_s`.
    fn connection(
        table: CtTable,
        proto: u8,
        client_port: u16,
        snat_port: u16,
        state: CtState,
        fwd_idle_s: u64,
        rep_idle_s: u64,
    ) -> [CtRecord; 2] {
        use std::net::Ipv4Addr;
        crate::test_support::TestConnection {
            table,
            proto,
            client: (Ipv4Addr::new(10, 0, 0, 1), client_port),
            frontend: (Ipv4Addr::new(10, 0, 0, 2), 80),
            source: (Ipv4Addr::new(10, 0, 0, 2), snat_port),
            backend: (Ipv4Addr::new(10, 1, 0, 1), 8080),
            flags: nodeport_common::CT_F_SNAT,
            state,
            forward_seen: NOW - fwd_idle_s * HZ,
            reply_seen: NOW - rep_idle_s * HZ,
        }
        .records()
    }

    #[test]
    fn a_connection_lives_while_either_entry_does() {
        // A one-way UDP stream: the client keeps sending, the backend answered once long ago.
        let stream = connection(
            CtTable::Established,
            IPPROTO_UDP,
            1,
            61_000,
            established(),
            1,
            3_600,
        );
        // The same the other way: only the backend talks.
        let push = connection(
            CtTable::Established,
            IPPROTO_UDP,
            2,
            61_001,
            established(),
            3_600,
            1,
        );
        let records: Vec<CtRecord> = [stream, push].concat();
        let c = Connections::new(&records);
        for (i, r) in records.iter().enumerate() {
            assert!(c.connection_live(&cfg(), i, NOW), "{r:?}");
        }
        assert!(gc_plan(&cfg(), &records, NOW).is_empty());
    }

    #[test]
    fn both_entries_expired_are_deleted_forward_first() {
        let dead = connection(
            CtTable::Established,
            IPPROTO_TCP,
            1,
            61_000,
            established(),
            30_000,
            30_000,
        );
        let live = connection(
            CtTable::Established,
            IPPROTO_TCP,
            2,
            61_001,
            established(),
            30_000,
            5,
        );
        let half_open = connection(
            CtTable::Handshake,
            IPPROTO_TCP,
            3,
            61_002,
            CtState::default(),
            120,
            120,
        );
        let records: Vec<CtRecord> = [dead, live, half_open].concat();
        let plan = gc_plan(&cfg(), &records, NOW);
        assert_eq!(
            plan,
            vec![
                (CtTable::Established, dead[0].key),
                (CtTable::Handshake, half_open[0].key),
                (CtTable::Established, dead[1].key),
                (CtTable::Handshake, half_open[1].key),
            ]
        );
    }

    #[test]
    fn timeouts_follow_the_state_and_the_grace_period() {
        let closing = CtState {
            fin_fwd: 1,
            fin_rep: 1,
            ..established()
        };
        // 10 s closing timeout: gone after 10 + 2 s, not before.
        let young = connection(
            CtTable::Established,
            IPPROTO_TCP,
            1,
            61_000,
            closing,
            11,
            11,
        );
        let old = connection(
            CtTable::Established,
            IPPROTO_TCP,
            2,
            61_001,
            closing,
            13,
            13,
        );
        // An established connection idle for 13 s is nowhere near its 6 h.
        let idle = connection(
            CtTable::Established,
            IPPROTO_TCP,
            3,
            61_002,
            established(),
            13,
            13,
        );
        let records: Vec<CtRecord> = [young, old, idle].concat();
        assert_eq!(
            gc_plan(&cfg(), &records, NOW),
            vec![
                (CtTable::Established, old[0].key),
                (CtTable::Established, old[1].key)
            ]
        );
    }

    #[test]
    fn an_unpaired_entry_goes_when_it_expires_itself() {
        let [fwd, rep] = connection(
            CtTable::Established,
            IPPROTO_TCP,
            1,
            61_000,
            established(),
            30_000,
            5,
        );
        // The reply tuple was taken by another connection (another client port): the old
        // forward entry no longer pairs with it, and goes alone; the live reply entry stays.
        let taken = CtRecord {
            entry: CtEntry {
                new_dport_be: 999,
                ..rep.entry
            },
            ..rep
        };
        let records = [fwd, taken];
        assert_eq!(
            gc_plan(&cfg(), &records, NOW),
            vec![(CtTable::Established, fwd.key)]
        );
        // An orphan reply entry, expired: deleted; fresh: kept.
        let [_, old_rep] = connection(
            CtTable::Handshake,
            IPPROTO_UDP,
            2,
            61_001,
            CtState::default(),
            0,
            120,
        );
        let [_, new_rep] = connection(
            CtTable::Handshake,
            IPPROTO_UDP,
            3,
            61_002,
            CtState::default(),
            0,
            5,
        );
        assert_eq!(
            gc_plan(&cfg(), &[old_rep, new_rep], NOW),
            vec![(CtTable::Handshake, old_rep.key)]
        );
    }

    #[test]
    fn a_partner_caught_in_the_other_table_still_pairs() {
        // Promotion half-way: the forward entry already in NP_CT, the reply still in NP_CT_NEW.
        let [fwd, _] = connection(
            CtTable::Established,
            IPPROTO_TCP,
            1,
            61_000,
            established(),
            30_000,
            5,
        );
        let [_, rep] = connection(
            CtTable::Handshake,
            IPPROTO_TCP,
            1,
            61_000,
            established(),
            30_000,
            5,
        );
        let records = [fwd, rep];
        let c = Connections::new(&records);
        assert_eq!(c.partner(0), Some(&rep));
        assert!(gc_plan(&cfg(), &records, NOW).is_empty());
    }

    #[test]
    fn a_copy_left_in_the_handshake_table_goes_by_its_own_expiry() {
        // Promoted: both entries in NP_CT and live; the handshake table still holds copies,
        // one expired (its partner copy gone), one not yet.
        let promoted = connection(
            CtTable::Established,
            IPPROTO_TCP,
            1,
            61_000,
            established(),
            5,
            5,
        );
        let [old_fwd, _] = connection(
            CtTable::Handshake,
            IPPROTO_TCP,
            1,
            61_000,
            CtState::default(),
            120,
            0,
        );
        let [_, young_rep] = connection(
            CtTable::Handshake,
            IPPROTO_TCP,
            1,
            61_000,
            CtState::default(),
            0,
            5,
        );
        let records = [promoted[0], promoted[1], old_fwd, young_rep];
        let c = Connections::new(&records);
        assert!(!c.shadowed(0) && !c.shadowed(1) && c.shadowed(2) && c.shadowed(3));
        // The expired copy pairs with the live established reply entry, yet goes.
        assert!(!c.connection_live(&cfg(), 2, NOW));
        assert_eq!(
            gc_plan(&cfg(), &records, NOW),
            vec![(CtTable::Handshake, old_fwd.key)]
        );
    }

    #[test]
    fn state_names() {
        let s = |f: fn(&mut CtState)| {
            let mut s = established();
            f(&mut s);
            state_name(IPPROTO_TCP, &s)
        };
        assert_eq!(state_name(IPPROTO_TCP, &CtState::default()), "handshake");
        assert_eq!(
            state_name(
                IPPROTO_TCP,
                &CtState {
                    replied: 1,
                    ..CtState::default()
                }
            ),
            "handshake"
        );
        assert_eq!(s(|_| {}), "established");
        assert_eq!(s(|s| s.fin_fwd = 1), "half-closed");
        assert_eq!(s(|s| s.fin_rep = 1), "half-closed");
        assert_eq!(
            s(|s| {
                s.fin_fwd = 1;
                s.fin_rep = 1
            }),
            "closing"
        );
        assert_eq!(s(|s| s.rst_rep = 1), "closing");
        assert_eq!(state_name(IPPROTO_UDP, &established()), "udp");
        assert_eq!(
            state_name(IPPROTO_UDP, &CtState::default()),
            "udp-unreplied"
        );
    }
}
