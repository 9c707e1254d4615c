//! The pump: moves records from the BPF ring buffer into a ring of the shared ring's
//! format (`ring_abi`), so that the collector reads uprobe records exactly as it reads the
//! trampolines'. It is a writer like any trampoline (the sub-ring protocol of `ring_abi`,
//! compare-and-swap on the head), so it can write beside them into the same ring
//! (`--backend auto`); time stamps are converted from CLOCK_MONOTONIC, which BPF reads,
//! to the time stamp counter the trampolines read.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, RingBuf};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ring_abi::{Layout, ring, slot};

use super::abi::Event;

/// A writer into a ring-abi mapping.
pub struct RingWriter {
    pub base: *mut u8,
    pub len: usize,
    pub layout: Layout,
    /// Wait for room in a full sub-ring (lossless) rather than drop.
    pub lossless: bool,
    /// The sub-rings it writes (first, how many: a power of two), by the CPU a record
    /// was made on. Only its own: the collector takes each sub-ring's records in the order
    /// they were written, and the pump writes later than the trampolines.
    pub rings: (u32, u32),
}

// SAFETY: the mapping is shared memory that outlives the pump (the probes own it), and
// every access to words others write goes through atomics.
unsafe impl Send for RingWriter {}

/// How often the pump looks at the BPF ring buffer when the program has not woken it.
const LOOK_MS: u8 = 4;

/// How long the pump waits for room in lossless mode before it drops a record.
const WAIT_MAX: Duration = Duration::from_millis(250);

impl RingWriter {
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: in bounds and aligned (the base is page-aligned); shared through atomics.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    /// Writes one record into sub-ring `r`; false when it was dropped (and counted).
    pub fn write(&self, r: u32, e: &Event<'_>, tsc: u64) -> bool {
        let l = &self.layout;
        let r = self.rings.0 + (r & (self.rings.1 - 1));
        let head = self.word(l.ring_offset(r) + ring::HEAD);
        let started = Instant::now();
        let ticket = loop {
            let t = head.load(Ordering::Acquire);
            let seq = self.word(l.slot_offset(r, t) + slot::SEQ).load(Ordering::Acquire);
            if seq == t || (t < l.capacity && seq == 0) {
                if head.compare_exchange(t, t + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    break t;
                }
                continue;
            }
            if seq > t {
                // Another writer took the ticket: look again.
                continue;
            }
            if self.lossless && started.elapsed() < WAIT_MAX {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            self.count_drop(r, e.site, 1);
            return false;
        };
        let s = l.slot_offset(r, ticket);
        let put = |off: usize, v: u64| self.word(s + off).store(v, Ordering::Relaxed);
        put(slot::TICKET, ticket);
        put(slot::SITE, u64::from(e.site) | u64::from(e.kind) << 32);
        put(slot::GOID, e.goid);
        put(slot::TSC, tsc);
        put(slot::SP, e.sp);
        for (i, v) in e.ints.iter().enumerate() {
            put(slot::INTS + 8 * i, *v);
        }
        for i in 0..slot::NFLOATS {
            put(slot::FLOATS + 8 * i, 0);
        }
        let n = e.data.len().min(l.data_len());
        // SAFETY: the slot's data area is inside the mapping and ours until published.
        unsafe { std::ptr::copy_nonoverlapping(e.data.as_ptr(), self.base.add(s + slot::DATA), n) };
        self.word(s + slot::SEQ).store(ticket + 1, Ordering::Release);
        true
    }

    /// Says every record stamped before `tsc` is published (`ring::WRITTEN_UP_TO`).
    fn written_up_to(&self, tsc: u64) {
        for r in self.rings.0..self.rings.0 + self.rings.1 {
            self.word(self.layout.ring_offset(r) + ring::WRITTEN_UP_TO).store(tsc.max(1), Ordering::Release);
        }
    }

    /// Counts `n` records of `site` lost, as a full sub-ring does.
    pub fn count_drop(&self, r: u32, site: u32, n: u64) {
        let l = &self.layout;
        self.word(l.ring_offset(self.rings.0 + (r & (self.rings.1 - 1))) + ring::DROPPED)
            .fetch_add(n, Ordering::Relaxed);
        if site < l.sites {
            self.word(l.site_drops_offset() + 8 * site as usize).fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// CLOCK_MONOTONIC nanoseconds to time stamp counter ticks. Records from the uprobes and
/// from the trampolines of one goroutine are ordered by these stamps, microseconds apart:
/// each conversion is made from a fresh anchor (a counter reading and a clock reading
/// taken together, at every pump round, a few milliseconds from the records converted),
/// with the rate measured since the first anchor.
struct MonoToTsc {
    first: (u64, u64),
    anchor: (u64, u64),
    hz: f64,
}

fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// A (counter, clock) pair read as close together as the machine allows: the tightest of
/// a few tries, the counter taken at the middle of the clock read.
fn pair() -> (u64, u64) {
    (0..5)
        .map(|_| {
            let a = crate::spans::rdtsc();
            let m = mono_ns();
            let b = crate::spans::rdtsc();
            (b - a, a + (b - a) / 2, m)
        })
        .min()
        .map_or((0, 0), |(_, t, m)| (t, m))
}

impl MonoToTsc {
    fn new() -> MonoToTsc {
        let first = pair();
        std::thread::sleep(Duration::from_millis(20));
        let mut c = MonoToTsc { first, anchor: first, hz: 1e9 };
        c.refine();
        c
    }

    /// A fresh anchor, and the rate over everything since the first.
    fn refine(&mut self) {
        self.anchor = pair();
        let (t, m) = self.anchor;
        if m > self.first.1 {
            self.hz = (t - self.first.0) as f64 / ((m - self.first.1) as f64 / 1e9);
        }
    }

    fn tsc(&self, ns: u64) -> u64 {
        let dt = (ns as i64 - self.anchor.1 as i64) as f64 * self.hz / 1e9;
        (self.anchor.0 as i64 + dt as i64).max(0) as u64
    }
}

/// Slack for the BPF program between reading the clock and handing its record over.
const STAMP_TO_OUTPUT_NS: u64 = 100_000;

/// The pump thread's state.
pub struct Pump {
    pub events: RingBuf<MapData>,
    pub drops: Array<MapData, u64>,
    /// The site of each attach point's plan (the drops map's index).
    pub plan_sites: Vec<u32>,
    pub writer: RingWriter,
}

/// Records the pump moved, and those the ring buffer lost.
#[derive(Debug, Default, Clone, Copy)]
pub struct PumpTotals {
    pub moved: u64,
    pub dropped: u64,
    pub undecodable: u64,
}

impl Pump {
    /// Runs until `stop` is set and the ring buffer is empty.
    pub fn run(mut self, stop: Arc<AtomicBool>) -> PumpTotals {
        let mut clock = MonoToTsc::new();
        let mut totals = PumpTotals::default();
        let mut seen = vec![0u64; self.plan_sites.len()];
        let mut last_sync = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Acquire);
            // Records stamped before this are in the ring buffer once it reads empty (less
            // the program's few instructions between its clock read and its output).
            clock.refine();
            let drained_at = mono_ns().saturating_sub(STAMP_TO_OUTPUT_NS);
            let mut n = 0;
            while let Some(item) = self.events.next() {
                n += 1;
                match Event::parse(&item) {
                    Some(e) => {
                        let tsc = clock.tsc(e.ktime);
                        if self.writer.write(e.cpu, &e, tsc) {
                            totals.moved += 1;
                        }
                    }
                    None => totals.undecodable += 1,
                }
            }
            self.writer.written_up_to(clock.tsc(drained_at));
            if stopping || last_sync.elapsed() > Duration::from_secs(1) {
                totals.dropped += self.sync_drops(&mut seen);
                last_sync = Instant::now();
            }
            if stopping && n == 0 {
                break;
            }
            if n == 0 {
                let fd = self.events.as_fd().as_raw_fd();
                // SAFETY: the ring buffer's descriptor lives as long as `self.events`.
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
                // The program wakes the pump only when its buffer fills (a wakeup per record
                // cost every probed call microseconds): look again within a few ms.
                let _ = poll(&mut fds, PollTimeout::from(LOOK_MS));
            }
        }
        totals
    }

    /// Adds what the program counted as lost since the last look to the ring's counters.
    fn sync_drops(&self, seen: &mut [u64]) -> u64 {
        let mut added = 0;
        for (i, s) in seen.iter_mut().enumerate() {
            let now = self.drops.get(&(i as u32), 0).unwrap_or(*s);
            if now > *s {
                self.writer.count_drop(0, self.plan_sites[i], now - *s);
                added += now - *s;
                *s = now;
            }
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{DataShape, RingReader};
    use ring_abi::Kind;

    fn event(site: u32, kind: Kind, goid: u64, data: &[u8]) -> Event<'_> {
        Event { site, kind: kind as u8, cpu: 3, goid, ktime: 0, sp: 0x40, ints: [7; ring_abi::slot::NINTS], data }
    }

    /// What the pump writes, the collector's reader reads back field for field; a full
    /// sub-ring drops (counted for the site) unless lossless; the pump writes only its own
    /// sub-rings and says up to when they are complete.
    #[test]
    fn the_reader_reads_what_the_pump_writes() {
        let layout = Layout::new(4, 4, 256).unwrap().with_sites(2);
        let mut map = memmap2::MmapMut::map_anon(layout.total_len()).unwrap();
        layout.initialise_zeroed(&mut map);
        let w = RingWriter { base: map.as_mut_ptr(), len: map.len(), layout, lossless: false, rings: (2, 2) };
        let shapes = vec![[DataShape::fixed(8), DataShape::fixed(8)]; 2];
        // SAFETY: the mapping outlives the reader.
        let mut r = unsafe { RingReader::new(map.as_mut_ptr(), map.len(), layout, shapes) };
        assert!(w.write(3, &event(1, Kind::Entry, 42, b"abcdefgh"), 1000));
        assert!(w.write(3, &event(1, Kind::Return, 42, b"ABCDEFGH"), 2000));
        let mut out = Vec::new();
        assert_eq!(r.poll(&mut out, 100), 2);
        // CPU 3 of the pump's two sub-rings (2 and 3): sub-ring 3.
        assert_eq!((out[0].ring, out[0].site, out[0].kind, out[0].goid, out[0].tsc), (3, 1, Kind::Entry, 42, 1000));
        assert_eq!((out[1].kind, out[1].tsc, out[1].sp, out[1].ints[8]), (Kind::Return, 2000, 0x40, 7));
        assert_eq!(&out[0].data[..], b"abcdefgh");
        assert_eq!(out[0].floats, [0; ring_abi::slot::NFLOATS]);
        // Four slots: the fifth record without a read in between is dropped and counted.
        for t in 0..5 {
            w.write(1, &event(0, Kind::Entry, 9, b""), 3000 + t);
        }
        assert_eq!((r.dropped(), r.site_drops()), (1, vec![1, 0]));
        assert_eq!(r.written_up_to(3, 99), 99, "nothing said yet: as now");
        w.written_up_to(50);
        assert_eq!((r.written_up_to(2, 99), r.written_up_to(3, 99), r.written_up_to(0, 99)), (50, 50, 99));
        assert_eq!(r.written_up_to(3, 10), 10, "never beyond now");
    }
}
