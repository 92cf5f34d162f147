//! Maglev lookup tables (Eisenbud et al., NSDI 2016), computed here and indexed by the
//! datapath with a flow hash. Katran and Cilium do the same split.
//!
//! Each backend gets a permutation of the M slots from two hashes of its address and port
//! (`offset`, `skip`); backends take turns claiming their next preferred free slot until the
//! table is full. Equal inputs give equal tables on every node, and removing one of N backends
//! moves only about 1/N of the slots.

use nodeport_common::hash::jhash_3words;

/// What identifies a backend for Maglev: its address and port (network order), so the
/// table does not depend on the order backends arrive in or on their ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaglevKey {
    pub addr_be: u32,
    pub port_be: u16,
}

const OFFSET_SEED: u32 = 0x6d61_676c; // "magl"
const SKIP_SEED: u32 = 0x6576_3031; // "ev01"

/// Builds the table: `m` slots (a prime), each holding an index into `backends`.
/// `backends` must be non-empty, sorted and free of duplicates (the caller's job; the order
/// decides ties, so it must be the same everywhere).
pub fn table(backends: &[MaglevKey], m: u32) -> Vec<u32> {
    assert!(
        !backends.is_empty(),
        "a Maglev table needs at least one backend"
    );
    assert!(
        m as usize >= backends.len(),
        "Maglev needs M >= the number of backends"
    );
    let n = backends.len();
    let perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = u64::from(jhash_3words(
                b.addr_be,
                u32::from(b.port_be),
                0,
                OFFSET_SEED,
            )) % u64::from(m);
            let skip = u64::from(jhash_3words(b.addr_be, u32::from(b.port_be), 0, SKIP_SEED))
                % (u64::from(m) - 1)
                + 1;
            (offset, skip)
        })
        .collect();
    // Backend i's j-th preference is (offset + j * skip) % m. Walking it by adding skip and
    // subtracting m when past the end gives the same slots without a division per probe,
    // which made this function most of the time to program 10,000 services (each of the
    // ~M ln M probes of a table paid a 64-bit modulo).
    let m64 = u64::from(m);
    let mut next: Vec<u64> = perm.iter().map(|(offset, _)| *offset).collect();
    let mut slots = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for i in 0..n {
            let skip = perm[i].1;
            let mut c = next[i];
            while slots[c as usize] != u32::MAX {
                c += skip;
                if c >= m64 {
                    c -= m64;
                }
            }
            slots[c as usize] = i as u32;
            c += skip;
            if c >= m64 {
                c -= m64;
            }
            next[i] = c;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<MaglevKey> {
        let mut v: Vec<_> = (0..n)
            .map(|i| MaglevKey {
                addr_be: u32::from_be_bytes([198, 18, (i / 250) as u8, (i % 250 + 1) as u8])
                    .to_be(),
                port_be: 8080u16.to_be(),
            })
            .collect();
        v.sort();
        v
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn every_slot_is_filled_and_each_backend_gets_close_to_m_over_n() {
        for (n, m) in [(3u32, 1021u32), (10, 1021), (7, 16381), (100, 16381)] {
            let t = table(&backends(n), m);
            assert_eq!(t.len(), m as usize);
            let c = counts(&t, n as usize);
            let ideal = f64::from(m) / f64::from(n);
            for (i, &k) in c.iter().enumerate() {
                // Maglev's guarantee: shares differ by at most a few percent for M >> N.
                let dev = (k as f64 - ideal).abs() / ideal;
                assert!(
                    dev < 0.05,
                    "n={n} m={m}: backend {i} has {k} slots, ideal {ideal:.1}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_the_slots() {
        let n = 10;
        let m = 16381;
        let all = backends(n);
        let before = table(&all, m);
        let removed = 4usize;
        let rest: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| *b)
            .collect();
        let after = table(&rest, m);
        // Compare by backend identity, not index.
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| all[**b as usize] != rest[**a as usize])
            .count();
        let owned_by_removed = before.iter().filter(|&&b| b as usize == removed).count();
        // The removed backend's slots must move; Maglev moves only a little more than that.
        assert!(moved >= owned_by_removed);
        let fraction = moved as f64 / f64::from(m);
        assert!(
            fraction < 1.0 / f64::from(n) * 1.5,
            "moved {fraction:.3} of the slots"
        );
    }

    #[test]
    fn the_table_is_the_same_whatever_the_input_order_when_sorted() {
        let mut a = backends(5);
        let t1 = table(&a, 1021);
        a.reverse();
        a.sort();
        assert_eq!(t1, table(&a, 1021));
    }

    /// The table as the paper writes it, a modulo per probe: `table` must give exactly this
    /// (tables are the same on every node and across agent versions).
    fn reference(backends: &[MaglevKey], m: u32) -> Vec<u32> {
        let m = u64::from(m);
        let perm: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                let words = (b.addr_be, u32::from(b.port_be), 0);
                let offset = u64::from(jhash_3words(words.0, words.1, words.2, OFFSET_SEED)) % m;
                let skip =
                    u64::from(jhash_3words(words.0, words.1, words.2, SKIP_SEED)) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perm.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        slots
    }

    #[test]
    fn the_table_is_the_papers_probe_sequence() {
        for (n, m) in [
            (1, 31),
            (2, 31),
            (3, 1021),
            (7, 1021),
            (31, 31),
            (64, 4093),
            (5, 65537),
        ] {
            let keys = backends(n);
            assert_eq!(table(&keys, m), reference(&keys, m), "n={n} m={m}");
        }
        // Arbitrary addresses and ports.
        for seed in 0..200u32 {
            let n = 1 + seed % 20;
            let m = [31, 251, 1021][(seed % 3) as usize];
            let mut keys: Vec<MaglevKey> = (0..n)
                .map(|i| MaglevKey {
                    addr_be: jhash_3words(seed, i, 1, 7),
                    port_be: jhash_3words(seed, i, 2, 7) as u16,
                })
                .collect();
            keys.sort();
            keys.dedup();
            assert_eq!(table(&keys, m), reference(&keys, m), "seed {seed}");
        }
    }

    #[test]
    fn a_single_backend_takes_every_slot() {
        assert!(table(&backends(1), 31).iter().all(|&s| s == 0));
    }
}
