//! Counting: one global counter per packet fate, per-service packets and bytes.

use nodeport_common::{CT_DIR_FORWARD, Counter};

use crate::maps::{NP_COUNTERS, NP_SVC_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = NP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// A packet of service `svc_id` in direction `dir` (CT_DIR_FORWARD: client to backend).
#[inline(always)]
pub fn service(svc_id: u32, bytes: u16, dir: u8) {
    if let Some(stats) = NP_SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: as above.
        unsafe {
            if dir == CT_DIR_FORWARD {
                (*stats).packets += 1;
                (*stats).bytes += u64::from(bytes);
            } else {
                (*stats).reply_packets += 1;
                (*stats).reply_bytes += u64::from(bytes);
            }
        }
    }
}
