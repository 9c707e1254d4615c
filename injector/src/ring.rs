//! The injector's side of the shared ring: its own mapping of the target's memfd, read
//! without any syscall into the target.

use std::sync::atomic::{AtomicU64, Ordering};

use ring_abi::{Kind, Layout, header, slot};

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub site: u32,
    pub kind: Kind,
    pub goid: u64,
    pub tsc: u64,
    pub sp: u64,
    pub ints: [u64; slot::NINTS],
    pub floats: [u64; slot::NFLOATS],
}

/// Reads records in ticket order from a mapping that the target writes concurrently.
pub struct RingReader {
    base: *mut u8,
    len: usize,
    layout: Layout,
    next: u64,
    nsites: u32,
    /// Records that failed validation (never believed, counted).
    pub corrupt: u64,
}

// SAFETY: the mapping is process-wide shared memory; the reader is used by one thread at
// a time and every access goes through atomics or volatile reads.
unsafe impl Send for RingReader {}

impl RingReader {
    /// # Safety
    /// `base..base+len` must be a live mapping of the ring (at least `layout.total_len()`
    /// bytes) that outlives the reader.
    pub unsafe fn new(base: *mut u8, len: usize, layout: Layout, nsites: u32) -> Self {
        assert!(len >= layout.total_len());
        RingReader { base, len, layout, next: 0, nsites, corrupt: 0 }
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: in bounds and 8-aligned (every offset used is a multiple of 8 from a
        // page-aligned base); shared with writers only through atomic operations.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    pub fn header_word(&self, off: usize) -> u64 {
        self.word(off).load(Ordering::Acquire)
    }

    pub fn set_header_word(&self, off: usize, v: u64) {
        self.word(off).store(v, Ordering::Release)
    }

    pub fn set_enabled(&self, on: bool) {
        self.set_header_word(header::ENABLED, on as u64);
    }

    /// Tickets handed out so far (records written plus records being written).
    pub fn head(&self) -> u64 {
        self.header_word(header::HEAD)
    }

    /// Records the target dropped: ring full plus lost slot races.
    pub fn dropped(&self) -> u64 {
        self.header_word(header::DROPPED) + self.header_word(header::CONTENDED)
    }

    pub fn dropped_full(&self) -> u64 {
        self.header_word(header::DROPPED)
    }

    /// Records consumed so far.
    pub fn consumed(&self) -> u64 {
        self.next
    }

    /// Appends every published record, in order, up to `max`; returns how many.
    pub fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let t = self.next;
            let s = self.layout.slot_offset(t);
            if self.word(s + slot::SEQ).load(Ordering::Acquire) != t + 1 {
                break;
            }
            let rec = self.decode(s, t);
            // Free the slot for the writer one lap ahead.
            self.word(s + slot::SEQ).store(t + self.layout.capacity, Ordering::Release);
            self.next = t + 1;
            self.word(header::TAIL).store(self.next, Ordering::Relaxed);
            match rec {
                Some(r) => {
                    out.push(r);
                    n += 1;
                }
                None => self.corrupt += 1,
            }
        }
        n
    }

    fn decode(&self, s: usize, ticket: u64) -> Option<Record> {
        let w = |off: usize| self.word(s + off).load(Ordering::Relaxed);
        if w(slot::TICKET) != ticket {
            return None;
        }
        let site_kind = w(slot::SITE);
        let site = site_kind as u32;
        let kind = Kind::from_u8((site_kind >> 32) as u8)?;
        if site >= self.nsites {
            return None;
        }
        let mut ints = [0; slot::NINTS];
        for (i, v) in ints.iter_mut().enumerate() {
            *v = w(slot::INTS + 8 * i);
        }
        let mut floats = [0; slot::NFLOATS];
        for (i, v) in floats.iter_mut().enumerate() {
            *v = w(slot::FLOATS + 8 * i);
        }
        Some(Record { site, kind, goid: w(slot::GOID), tsc: w(slot::TSC), sp: w(slot::SP), ints, floats })
    }
}
