//! The conntrack collector: a thread of the agent that sweeps both connection tables every
//! `--conntrack-gc-interval` seconds and deletes connections whose entries have both expired.
//!
//! The datapath never deletes from the established table `NP_CT` (a plain hash: it would
//! have to find and delete both entries of a connection from a packet, and an LRU would evict
//! live connections under a flood); the handshake table `NP_CT_NEW` is an LRU, but its
//! expired entries would otherwise stay until the LRU needs the room, holding SNAT ports.
//! The pure part (which entries go, in which order) is
//! [`crate::datapath::conntrack::gc_plan`].

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    datapath::{
        self, Maps,
        conntrack::{SweepReport, Tables, sweep},
    },
    metrics::Metrics,
};

/// Deleting more than this many entries in one sweep is logged at info level (a burst of
/// connections ending, or the first sweep after the agent was away); fewer at debug.
const NOTABLE_DELETIONS: u64 = 10_000;

/// The running collector; [`Collector::stop`] ends it.
pub struct Collector {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Collector {
    /// Starts sweeping every `interval` with `maps` (handles of its own on the pinned maps,
    /// so a sweep never holds up the agent's loop).
    pub fn spawn(mut maps: Maps, interval: Duration, metrics: Metrics) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                // The wait between sweeps is also the stop signal: a message or a dropped
                // sender ends the loop at once.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    collect_once(&mut maps, &metrics);
                }
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the collector and waits for a sweep in progress to finish.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::warn!("the conntrack collector panicked");
        }
    }
}

/// One sweep, logged and recorded in the metrics.
pub fn collect_once(maps: &mut Maps, metrics: &Metrics) -> Option<SweepReport> {
    let cfg = match maps.config.get(&0, 0) {
        // Not configured yet: no timeouts to judge by.
        Ok(cfg) if cfg.hz != 0 && cfg.maglev_size != 0 => cfg,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "conntrack collector: reading the datapath configuration");
            return None;
        }
    };
    let now = datapath::jiffies_now(cfg.hz);
    let mut tables = Tables {
        established: &mut maps.conntrack,
        handshake: &mut maps.conntrack_new,
    };
    match sweep(&mut tables, &cfg, now) {
        Ok(report) => {
            metrics.record_gc(&report);
            let deleted = report.deleted_established + report.deleted_handshake;
            if deleted >= NOTABLE_DELETIONS {
                tracing::info!(
                    entries = report.entries,
                    deleted_established = report.deleted_established,
                    deleted_handshake = report.deleted_handshake,
                    millis = (report.seconds * 1000.0) as u64,
                    "conntrack collector deleted many expired connections"
                );
            } else {
                tracing::debug!(
                    entries = report.entries,
                    deleted_established = report.deleted_established,
                    deleted_handshake = report.deleted_handshake,
                    skipped = report.skipped,
                    millis = (report.seconds * 1000.0) as u64,
                    "conntrack sweep"
                );
            }
            Some(report)
        }
        Err(e) => {
            tracing::warn!(error = %e, "conntrack collector: reading the connection tables");
            None
        }
    }
}
