//! The shared ring: one memfd mapped by the target (trampolines write) and the injector
//! (the collector reads). Many writers, one reader, fixed-size slots, never blocking a
//! writer.
//!
//! Protocol (a bounded MPMC queue in the style of Vyukov's, specialised to one reader):
//! every slot carries a sequence word. Slot `i` starts with `seq = i`. A writer loads
//! `head = t`, and owns ticket `t` only if `slot[t % cap].seq == t` and its
//! compare-and-swap of `head` from `t` to `t + 1` succeeds; otherwise the slot still holds
//! an unread record (ring full: count a drop and go on) or another writer won the ticket
//! (retry, a bounded number of times). It writes the record, then stores `seq = t + 1`
//! (x86 stores are ordered, so this publishes the record). The reader consumes ticket `t`
//! once `seq == t + 1`, and frees the slot with `seq = t + cap`.
//!
//! Writers never wait for the reader, and the reader never misreads: a record is only read
//! after its publication, and validated (ticket, kind, site) before it is believed.

/// The memfd's name, visible in `/proc/PID/maps` as `/memfd:inject-ring (deleted)`: how a
/// second injector recognises an instrumented process.
pub const MEMFD_NAME: &str = "inject-ring";

/// `b"INJRING1"` little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"INJRING1");
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;

/// Header offsets. Each written-at-run-time word has its own cache line, and the header
/// has its own page, away from trampoline code (self-modifying-code detection otherwise
/// flushes the pipeline on every store).
pub mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const SLOT_SIZE: usize = 12;
    pub const CAPACITY: usize = 16;
    /// Pid of the injector that owns the ring, so a second one can name it.
    pub const OWNER: usize = 24;
    /// Ticks of the time stamp counter per second, as the owner calibrated it.
    pub const TSC_HZ: usize = 32;
    /// Reservation counter (next ticket), written by writers with `lock cmpxchg`.
    pub const HEAD: usize = 64;
    /// Records dropped because the ring was full, `lock inc` by writers.
    pub const DROPPED: usize = 128;
    /// Records dropped because other writers kept winning the slot race (`lock inc`).
    pub const CONTENDED: usize = 320;
    /// Non-zero while capture is on; writers skip capture when zero.
    pub const ENABLED: usize = 192;
    /// Reader's next ticket (informational: writers use the slot sequence words).
    pub const TAIL: usize = 256;
    pub const LEN: usize = super::PAGE;
}

/// Slot offsets.
pub mod slot {
    /// Sequence word (see the module docs).
    pub const SEQ: usize = 0;
    /// The ticket the record was written under, to validate it.
    pub const TICKET: usize = 8;
    /// Probe site id (u32).
    pub const SITE: usize = 16;
    /// [`super::Kind`] (u8).
    pub const KIND: usize = 20;
    pub const GOID: usize = 24;
    /// rdtsc at capture.
    pub const TSC: usize = 32;
    /// RSP at capture: tells frames of the same goroutine apart.
    pub const SP: usize = 40;
    /// Integer registers in ABI order: RAX, RBX, RCX, RDI, RSI, R8, R9, R10, R11.
    pub const INTS: usize = 48;
    pub const NINTS: usize = 9;
    /// Low 64 bits of X0..X7.
    pub const FLOATS: usize = INTS + 8 * NINTS;
    pub const NFLOATS: usize = 8;
    /// Bounded copies of bytes that arguments point to (strings, []byte).
    pub const DATA: usize = FLOATS + 8 * NFLOATS;
}

/// The smallest slot: the fixed fields and registers, no copied bytes.
pub const MIN_SLOT_SIZE: usize = slot::DATA;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Entry = 1,
    Return = 2,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Entry),
            2 => Some(Kind::Return),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("ring capacity {capacity} is not a power of two of at least 2")]
    Capacity { capacity: u64 },
    #[error("slot size {size} must be a power of two and at least {min}")]
    SlotSize { size: usize, min: usize },
}

/// Sizes of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub capacity: u64,
    pub slot_size: usize,
}

impl Layout {
    pub fn new(capacity: u64, slot_size: usize) -> Result<Self, LayoutError> {
        if capacity < 2 || !capacity.is_power_of_two() {
            return Err(LayoutError::Capacity { capacity });
        }
        // A power of two lets trampolines index slots with a shift.
        if slot_size < MIN_SLOT_SIZE || !slot_size.is_power_of_two() {
            return Err(LayoutError::SlotSize { size: slot_size, min: MIN_SLOT_SIZE });
        }
        Ok(Layout { capacity, slot_size })
    }

    /// Bytes of the whole mapping: header page plus slots, rounded to pages.
    pub fn total_len(&self) -> usize {
        (header::LEN + self.capacity as usize * self.slot_size).next_multiple_of(PAGE)
    }

    /// Offset of the slot for `ticket` from the start of the mapping.
    pub fn slot_offset(&self, ticket: u64) -> usize {
        header::LEN + (ticket & (self.capacity - 1)) as usize * self.slot_size
    }

    /// Bytes available for copied data in each slot.
    pub fn data_len(&self) -> usize {
        self.slot_size - slot::DATA
    }

    /// Writes a fresh header and slot sequence words into `mem` (at least `total_len`).
    pub fn initialise(&self, mem: &mut [u8]) {
        mem[..self.total_len()].fill(0);
        mem[header::MAGIC..header::MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
        mem[header::VERSION..header::VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        mem[header::SLOT_SIZE..header::SLOT_SIZE + 4].copy_from_slice(&(self.slot_size as u32).to_le_bytes());
        mem[header::CAPACITY..header::CAPACITY + 8].copy_from_slice(&self.capacity.to_le_bytes());
        for i in 0..self.capacity {
            let o = self.slot_offset(i) + slot::SEQ;
            mem[o..o + 8].copy_from_slice(&i.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks_and_sizes() {
        assert!(Layout::new(3, 256).is_err());
        assert!(Layout::new(4, 100).is_err());
        assert!(Layout::new(4, 64).is_err());
        assert!(Layout::new(4, 320).is_err());
        let l = Layout::new(4, 256).unwrap();
        assert_eq!(l.total_len(), 8192);
        assert_eq!(l.slot_offset(5), 4096 + 256);
        assert_eq!(slot::DATA, 184);
        let mut mem = vec![0xffu8; l.total_len()];
        l.initialise(&mut mem);
        assert_eq!(&mem[..8], b"INJRING1");
        assert_eq!(u64::from_le_bytes(mem[l.slot_offset(3)..][..8].try_into().unwrap()), 3);
    }
}
