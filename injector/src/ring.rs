//! The injector's side of the shared ring: its own mapping of the target's memfd, read
//! without any syscall into the target.

use std::sync::atomic::{AtomicU64, Ordering};

use ring_abi::{Kind, Layout, ring, slot};
use trampolines::codegen::{CapturePlan, Fetch, Op};

/// Which bytes of a slot's data area a plan's records use. Strings are copied up to a
/// bound (512 bytes of query text, 256 of a header line) but are mostly short: reading the
/// whole area from memory the target's core wrote cost the collector a tenth of its CPU,
/// so only the bytes each record's lengths say were copied are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataShape {
    /// Bytes the plan reserves (what a record may use at most).
    full: usize,
    /// Bytes every record may use whatever its lengths (fixed fields, span ids).
    fixed: usize,
    /// Field strings: (offset of the length word, bound); the bytes follow the word.
    fields: Vec<(usize, usize)>,
    /// Register copies: (offset, bound, integer register holding the length).
    copies: Vec<(usize, usize, usize)>,
}

impl DataShape {
    /// A plan's shape.
    pub fn of(plan: &CapturePlan) -> DataShape {
        let mut shape = DataShape { full: plan.data_len(), ..DataShape::default() };
        for c in &plan.copies {
            shape.copies.push((usize::from(c.dest), usize::from(c.max), usize::from(c.len)));
        }
        for op in &plan.ops {
            match op {
                Op::Field(f) => match f.fetch {
                    Fetch::Str { max } => {
                        shape.fixed = shape.fixed.max(usize::from(f.dest) + 8);
                        shape.fields.push((usize::from(f.dest), usize::from(max)));
                    }
                    Fetch::Word => shape.fixed = shape.fixed.max(usize::from(f.dest) + 8),
                },
                other => {
                    let one = CapturePlan { ops: vec![other.clone()], ..CapturePlan::default() };
                    shape.fixed = shape.fixed.max(one.data_len());
                }
            }
        }
        shape
    }

    /// `n` bytes, all used.
    pub fn fixed(n: usize) -> DataShape {
        DataShape { full: n, fixed: n, ..DataShape::default() }
    }

    /// The bytes a record with these registers and these length words uses: never more
    /// than `full`. `word(off)` reads the data area's word at `off`.
    fn used(&self, ints: &[u64; slot::NINTS], word: impl Fn(usize) -> u64) -> usize {
        let clamp = |len: u64, max: usize| (len as i64).clamp(0, max as i64) as usize;
        let mut end = self.fixed;
        for &(dest, max, len) in &self.copies {
            end = end.max(dest + clamp(ints.get(len).copied().unwrap_or(u64::MAX), max));
        }
        for &(dest, max) in &self.fields {
            if dest + 8 <= self.full {
                end = end.max(dest + 8 + clamp(word(dest), max));
            }
        }
        end.min(self.full)
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The sub-ring it came from (records of one sub-ring are in true order).
    pub ring: u32,
    pub site: u32,
    pub kind: Kind,
    pub goid: u64,
    pub tsc: u64,
    pub sp: u64,
    pub ints: [u64; slot::NINTS],
    pub floats: [u64; slot::NFLOATS],
    /// The slot's copied bytes (strings, byte slices), as many as the site's plan uses.
    pub data: Vec<u8>,
}

/// Reads records from every sub-ring (each in ticket order) of a mapping that the target
/// writes concurrently.
pub struct RingReader {
    base: *mut u8,
    len: usize,
    layout: Layout,
    /// Next ticket per sub-ring.
    next: Vec<u64>,
    /// The data area each site's entry and return records use.
    shapes: Vec<[DataShape; 2]>,
    drained: Vec<bool>,
    /// Records that failed validation (never believed, counted).
    pub corrupt: u64,
}

// SAFETY: the mapping is process-wide shared memory; the reader is used by one thread at
// a time and every access goes through atomics.
unsafe impl Send for RingReader {}

impl RingReader {
    /// Our mapping of the ring (base, length) and its layout, for views of its other
    /// regions (the stats counters); valid as long as the reader's own promise holds.
    pub fn mapping(&self) -> (*mut u8, usize, Layout) {
        (self.base, self.len, self.layout)
    }

    /// # Safety
    /// `base..base+len` must be a live mapping of the ring (at least `layout.total_len()`
    /// bytes) that outlives the reader.
    pub unsafe fn new(base: *mut u8, len: usize, layout: Layout, shapes: Vec<[DataShape; 2]>) -> Self {
        assert!(len >= layout.total_len());
        let shapes = shapes
            .into_iter()
            .map(|d| {
                d.map(|mut s| {
                    s.full = s.full.min(layout.data_len());
                    s
                })
            })
            .collect();
        RingReader { base, len, layout, next: vec![0; layout.rings as usize], shapes, drained: Vec::new(), corrupt: 0 }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: in bounds and 8-aligned (every offset used is a multiple of 8 from a
        // page-aligned base); shared with writers only through atomic operations.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    fn sum(&self, field: usize) -> u64 {
        (0..self.layout.rings).map(|r| self.word(self.layout.ring_offset(r) + field).load(Ordering::Acquire)).sum()
    }

    /// Slots per sub-ring.
    pub fn capacity(&self) -> u64 {
        self.layout.capacity
    }

    pub fn rings(&self) -> u32 {
        self.layout.rings
    }

    /// Tickets handed out so far (records written plus records being written).
    pub fn head(&self) -> u64 {
        self.sum(ring::HEAD)
    }

    /// Records the target dropped: sub-ring full plus lost slot races.
    pub fn dropped(&self) -> u64 {
        self.sum(ring::DROPPED) + self.sum(ring::CONTENDED)
    }

    pub fn dropped_full(&self) -> u64 {
        self.sum(ring::DROPPED)
    }

    /// Lossless waits that ran out (each also turned waiting off).
    pub fn wait_timeouts(&self) -> u64 {
        self.sum(ring::WAIT_TIMEOUTS)
    }

    /// Whether writers wait for room in a full sub-ring (lossless mode still on).
    pub fn waiting(&self) -> bool {
        self.word(ring_abi::header::LOSSLESS).load(Ordering::Acquire) != 0
    }

    /// Turns lossless waiting back on.
    pub fn resume_waiting(&self) {
        self.word(ring_abi::header::LOSSLESS).store(1, Ordering::Release);
    }

    /// Records dropped per probe site (full or contended), if the layout counts them.
    pub fn site_drops(&self) -> Vec<u64> {
        let base = self.layout.site_drops_offset();
        (0..self.layout.sites as usize).map(|i| self.word(base + 8 * i).load(Ordering::Relaxed)).collect()
    }

    /// Records consumed so far.
    pub fn consumed(&self) -> u64 {
        self.next.iter().sum()
    }

    /// Appends published records, each sub-ring in ticket order, up to `max`; returns how
    /// many. `drained[r]` says whether sub-ring `r` was read up to its first unpublished
    /// slot (rather than stopping at its share of `max`).
    pub fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> usize {
        let mut drained = std::mem::take(&mut self.drained);
        drained.clear();
        let n = self.poll_into(out, max, &mut drained);
        self.drained = drained;
        n
    }

    /// At the end only (the target is gone or the probes are out, so no writer can be
    /// mid-record any more): steps over tickets that were taken but never published, so
    /// the records after them are read. Returns how many were skipped.
    pub fn skip_unpublished(&mut self) -> u64 {
        let mut skipped = 0;
        for r in 0..self.layout.rings {
            let head = self.word(self.layout.ring_offset(r) + ring::HEAD).load(Ordering::Acquire);
            let t = self.next[r as usize];
            if t < head && self.word(self.layout.slot_offset(r, t) + slot::SEQ).load(Ordering::Acquire) != t + 1 {
                self.next[r as usize] = t + 1;
                skipped += 1;
            }
        }
        skipped
    }

    /// The time stamp counter value before which every record of sub-ring `r` is
    /// published: the pump's word, or `now` for writers that publish as they stamp.
    pub fn written_up_to(&self, r: u32, now: u64) -> u64 {
        match self.word(self.layout.ring_offset(r) + ring::WRITTEN_UP_TO).load(Ordering::Acquire) {
            0 => now,
            w => w.min(now),
        }
    }

    /// Per sub-ring, whether the last `poll` read it up to its first unpublished slot.
    pub fn drained(&self) -> &[bool] {
        &self.drained
    }

    fn poll_into(&mut self, out: &mut Vec<Record>, max: usize, drained: &mut Vec<bool>) -> usize {
        let mut n = 0;
        // Every sub-ring gets its share: a busy one must not starve the others past the
        // collector's settle window (records are merged by time stamp).
        let share = (max / self.layout.rings as usize).max(64);
        for r in 0..self.layout.rings {
            let limit = n + share;
            let mut empty = false;
            while n < limit {
                let t = self.next[r as usize];
                let s = self.layout.slot_offset(r, t);
                if self.word(s + slot::SEQ).load(Ordering::Acquire) != t + 1 {
                    empty = true;
                    break;
                }
                let rec = self.decode(s, t, r);
                // Free the slot for the writer one lap ahead.
                self.word(s + slot::SEQ).store(t + self.layout.capacity, Ordering::Release);
                self.next[r as usize] = t + 1;
                match rec {
                    Some(rec) => {
                        out.push(rec);
                        n += 1;
                    }
                    None => self.corrupt += 1,
                }
            }
            self.word(self.layout.ring_offset(r) + ring::TAIL).store(self.next[r as usize], Ordering::Relaxed);
            drained.push(empty);
        }
        n
    }

    fn decode(&self, s: usize, ticket: u64, ring: u32) -> Option<Record> {
        let w = |off: usize| self.word(s + off).load(Ordering::Relaxed);
        if w(slot::TICKET) != ticket {
            return None;
        }
        let site_kind = w(slot::SITE);
        let site = site_kind as u32;
        let kind = Kind::from_u8((site_kind >> 32) as u8)?;
        let shape = &self.shapes.get(site as usize)?[usize::from(kind == Kind::Return)];
        let mut ints = [0; slot::NINTS];
        for (i, v) in ints.iter_mut().enumerate() {
            *v = w(slot::INTS + 8 * i);
        }
        let mut floats = [0; slot::NFLOATS];
        for (i, v) in floats.iter_mut().enumerate() {
            *v = w(slot::FLOATS + 8 * i);
        }
        // Length words are 8-aligned in the data area (plans place fields at multiples of 8);
        // one that is not reads as 0 bytes used.
        let data_word = |off: usize| if off.is_multiple_of(8) { w(slot::DATA + off) } else { 0 };
        let data_len = shape.used(&ints, data_word);
        // SAFETY: the slot's data area lies inside the mapping (the layout checked it); the
        // record is published and no writer touches it until we free the slot.
        let data = unsafe { std::slice::from_raw_parts(self.base.add(s + slot::DATA), data_len) }.to_vec();
        Some(Record { ring, site, kind, goid: w(slot::GOID), tsc: w(slot::TSC), sp: w(slot::SP), ints, floats, data })
    }
}
