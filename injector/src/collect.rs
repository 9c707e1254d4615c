//! The collector thread: drains the ring through the injector's own mapping, never
//! touching the target, and keeps per-site counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring_abi::Kind;

use crate::ring::{Record, RingReader};

/// Per-site totals.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SiteCounts {
    pub entries: u64,
    pub returns: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Totals {
    pub sites: Vec<SiteCounts>,
    /// Records the target dropped: ring full, or lost slot races.
    pub dropped: u64,
    /// Of those, because the ring was full (the collector fell behind).
    pub dropped_full: u64,
    /// Records that failed validation.
    pub corrupt: u64,
    pub records: u64,
}

/// Drains `reader` until `stop` is set and the ring is empty (or writers that took a
/// ticket have had `grace` to publish).
pub fn run(mut reader: RingReader, nsites: usize, stop: Arc<AtomicBool>, grace: Duration) -> Totals {
    let mut totals = Totals { sites: vec![SiteCounts::default(); nsites], ..Default::default() };
    let mut batch: Vec<Record> = Vec::with_capacity(4096);
    let mut idle = Duration::from_micros(50);
    let mut stopping_since: Option<Instant> = None;
    loop {
        batch.clear();
        let n = reader.poll(&mut batch, 4096);
        for r in &batch {
            let c = &mut totals.sites[r.site as usize];
            match r.kind {
                Kind::Entry => c.entries += 1,
                Kind::Return => c.returns += 1,
            }
        }
        totals.records += n as u64;
        if n > 0 {
            idle = Duration::from_micros(50);
            continue;
        }
        if stop.load(Ordering::Acquire) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if reader.consumed() >= reader.head() || since.elapsed() > grace {
                break;
            }
        }
        std::thread::sleep(idle);
        idle = (idle * 2).min(Duration::from_millis(2));
    }
    totals.dropped = reader.dropped();
    totals.dropped_full = reader.dropped_full();
    totals.corrupt = reader.corrupt;
    totals
}
