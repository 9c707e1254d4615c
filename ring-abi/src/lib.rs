//! The shared ring: one memfd mapped by the target (trampolines write) and the injector
//! (the collector reads). Many writers, one reader, fixed-size slots, never blocking a
//! writer.
//!
//! The memfd holds one sub-ring per CPU (a power of two of them; a writer picks its CPU's
//! with `LSL` on Linux's per-CPU segment). One shared head would be unfair: a writer that
//! loses the head's cache line to another core keeps losing it, and drops records even
//! when the ring is empty.
//!
//! Protocol of each sub-ring (a bounded queue in the style of Vyukov's, one reader):
//! every slot carries a sequence word, which starts at zero (the memfd is zero-filled, so
//! a fresh ring needs no initialisation and never looks full). A writer loads `head = t`,
//! and owns ticket `t` only if `slot[t % cap].seq == t` (or, on the first lap `t < cap`,
//! `seq == 0`: never used) and its
//! compare-and-swap of `head` from `t` to `t + 1` succeeds; otherwise the slot still holds
//! an unread record (ring full: count a drop and go on) or another writer won the ticket
//! (retry, a bounded number of times, then count a contention drop). It writes the record,
//! then stores `seq = t + 1` (x86 stores are ordered, so this publishes the record). The
//! reader consumes ticket `t` once `seq == t + 1`, and frees the slot with
//! `seq = t + cap`.
//!
//! Writers never wait for the reader, and the reader never misreads: a record is only read
//! after its publication, and validated (ticket, kind, site) before it is believed.

/// The memfd's name, visible in `/proc/PID/maps` as `/memfd:inject-ring.PID (deleted)` with
/// the pid of the inject that made it: how a second injector recognises an instrumented
/// process, and whose ring it is even before the header is written.
pub const MEMFD_NAME: &str = "inject-ring";

/// `b"INJRING1"` little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"INJRING1");
/// 2: sequence words start at zero (version 1 numbered every slot first). 3: context
/// entries of 128 bytes (with the trace flags), which moves the journal. 4: the
/// [`tracestate`] tables after the context tables. 5: the [`arena`] before the journal.
pub const VERSION: u32 = 5;
pub const PAGE: usize = 4096;

pub mod stats;

/// Offsets in the global header (the first page). Each word written at run time has its
/// own cache line, and the header its own page, away from trampoline code
/// (self-modifying-code detection otherwise flushes the pipeline on every store).
pub mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const SLOT_SIZE: usize = 12;
    /// Slots per sub-ring.
    pub const CAPACITY: usize = 16;
    /// Pid of the injector that owns the ring, so a second one can name it.
    pub const OWNER: usize = 24;
    /// Ticks of the time stamp counter per second, as the owner calibrated it.
    pub const TSC_HZ: usize = 32;
    /// Number of sub-rings (u32).
    pub const RINGS: usize = 40;
    /// Random per-ring seed mixed into the span ids trampolines make (u64).
    pub const SALT: usize = 48;
    /// Non-zero while capture is on; writers skip capture when zero.
    pub const ENABLED: usize = 192;
    /// Non-zero: a writer that finds its sub-ring full waits for room (bounded) instead
    /// of dropping. A writer whose wait runs out clears it, so that a reader that died or
    /// stalled costs every later writer nothing; the reader sets it again.
    pub const LOSSLESS: usize = 256;
    /// Offset of the [`super::journal`] from the start of the mapping (u64).
    pub const JOURNAL: usize = 64;
    /// Offset of the [`super::arena`] from the start of the mapping (u64; 0: none).
    pub const ARENA: usize = 72;
    /// The address of the target's OpenTelemetry auto-instrumentation flag (a Go `*bool`
    /// the trampolines set, see `Op::AutoEnable`), so that a detach (or the clean-up after
    /// `kill -9`) can clear it again; 0 when it was never set.
    pub const AUTO_FLAG: usize = 320;
    pub const LEN: usize = super::PAGE;
}

/// What a later injector needs to undo this one's patches if it dies without removing
/// them (`kill -9`): kept in the target, in the ring's own memory, written before any
/// jump goes in. Layout: magic, count of trampoline areas, count of patches (u64 each;
/// the counts are written last), then [`journal::MAX_AREAS`] areas (address, length), then
/// the patches (address, length, original bytes, patched bytes; 8-byte fields).
pub mod journal {
    /// `b"INJJRNL1"` little-endian.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"INJJRNL1");
    pub const AREAS: usize = 8;
    pub const PATCHES: usize = 16;
    pub const MAX_AREAS: usize = 64;
    pub const AREA_LIST: usize = 24;
    pub const AREA: usize = 16;
    pub const PATCH_LIST: usize = AREA_LIST + MAX_AREAS * AREA;
    pub const PATCH: usize = 32;
    /// The longest patch it can hold (a jump is 5 bytes).
    pub const MAX_PATCH_LEN: usize = 8;

    /// Bytes for a journal of `patches` entries.
    pub fn len(patches: usize) -> usize {
        PATCH_LIST + patches * PATCH
    }
}

/// Offsets in each sub-ring's own header page.
pub mod ring {
    /// Reservation counter (next ticket), written by writers with `lock cmpxchg`.
    pub const HEAD: usize = 0;
    /// Records dropped because the sub-ring was full (`lock inc`).
    pub const DROPPED: usize = 64;
    /// Records dropped because other writers kept winning the slot race (`lock inc`).
    pub const CONTENDED: usize = 128;
    /// Reader's next ticket (informational).
    pub const TAIL: usize = 192;
    /// Lossless waits that ran out (`lock inc`).
    pub const WAIT_TIMEOUTS: usize = 256;
    /// Written only by a writer that publishes records later than it stamps them (the
    /// uprobe backend's pump): every record stamped before this time stamp counter value
    /// is published. 0 for the trampolines' sub-rings, whose writers publish at once.
    pub const WRITTEN_UP_TO: usize = 320;
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
    /// `g.stack.hi - RSP` at capture: tells frames of one goroutine apart, and (unlike
    /// RSP) survives the runtime copying the stack to grow or shrink it.
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

/// The trace-context tables after the sub-rings: where trampolines keep each goroutine's
/// current span, and the span of each outgoing request, so that context propagates inside
/// the target without waiting for the collector. Entries are one cache line, indexed by a
/// hash of their key and validated by it (a collision loses context, never memory).
pub mod ctx {
    /// Entries of the goroutine table (sets indexed by the goid's low bits).
    pub const GOROUTINES: usize = 1 << 14;
    /// Entries of the request table (sets indexed by a hash of the request's header map).
    pub const REQUESTS: usize = 1 << 13;
    pub const ENTRY: usize = 128;
    /// Entries per set: a key may be in any entry of the set its hash picks (four-way
    /// set-associative, so live keys that collide keep their context).
    pub const WAYS: usize = 4;
    /// The key (goid or header map address); 0 = free.
    pub const KEY: usize = 0;
    /// [`super::CtxState`] (u64).
    pub const STATE: usize = 8;
    /// The trace id, 32 lowercase hex digits, as W3C traceparent writes it.
    pub const TRACE: usize = 16;
    /// A span id, 16 hex digits: the goroutine's current server span, the remote parent of
    /// a pending incoming context, or an outgoing request's client span.
    pub const SPAN: usize = 48;
    /// The trace flags, two lowercase hex digits as traceparent writes them (`01`:
    /// sampled), in the first two bytes of a u64.
    pub const FLAGS: usize = 64;
    pub const LEN: usize = (GOROUTINES + REQUESTS) * ENTRY;
    /// Bit set in a goroutine-table key (with the goid) for the client span a goroutine
    /// started and has not yet queued (a gRPC call before its headers are handed over).
    pub const CLIENT_TAG_BIT: u32 = 62;
    /// Bit set in a goroutine-table key for the client span whose HTTP/2 headers the
    /// goroutine writes next. Goids never reach these bits; tagged keys fall in the
    /// goroutine's own set.
    pub const OUT_TAG_BIT: u32 = 61;
    /// Bit set in a goroutine-table key for a `traceparent` to append after the frame the
    /// goroutine is writing reaches its writer's buffer; the entry's state word holds
    /// the framer.
    pub const AFTER_TAG_BIT: u32 = 60;
    /// Bit set in a goroutine-table key for the HTTP/1 lines the goroutine wrote into a
    /// request's buffer, until the header-writing function returns: the state word holds
    /// the writer, the trace field where the lines start and their length.
    pub const LINE_TAG_BIT: u32 = 59;
    /// Bit set in a goroutine-table key for the Kafka message headers the goroutine's
    /// `WriteMessages` call adds: the state word holds the [`super::arena`] slot.
    pub const KAFKA_TAG_BIT: u32 = 58;
    /// A word an entry's maker sets to its key XOR [`CONSUMER_MARK`] when the entry is a
    /// message's processing context, which the goroutine's next fetch ends: other makers
    /// never write it, and a copied entry (lineage) has another key, so it is never
    /// mistaken for one.
    pub const MARK: usize = 72;
    pub const CONSUMER_MARK: u64 = u64::from_le_bytes(*b"\0\0\0\0kfk1");
    /// In a request-table entry keyed by an application span (`Op::AutoStart`): that
    /// span's id (16 hex digits); the rest of the entry is the goroutine's context from
    /// before it (state 0 when it had none), given back when the span ends.
    pub const AUTO_SPAN: usize = 80;
    /// Bytes of the HTTP/1 line `traceparent: 00-<32>-<16>-01\r\n`.
    pub const W3C_LINE: usize = 70;
    /// Bytes of the HPACK field `traceparent: 00-<32>-<16>-01` as a literal without
    /// indexing, new name, neither string Huffman-coded.
    pub const H2_FIELD: usize = 1 + 1 + 11 + 1 + 55;
}

/// Where trampolines keep incoming `tracestate` values so that outgoing requests carry
/// them on. A value is up to 512 bytes, too large to travel with every context entry
/// (lineage copies entries), so it is kept once per trace: a header read on a goroutine
/// waits in the pending table (keyed by goid) until the goroutine's incoming context is
/// taken up, then moves to the trace table (keyed by the trace id), where an outgoing
/// request of that trace finds it. The trace table is four-way set-associative, a new
/// trace evicting the set's least recently stored one: a value is lost (its requests go
/// out without it) only when more than four live traces share a set, and never mixed
/// with another's.
pub mod tracestate {
    /// Entries of the pending table (indexed by the goid's low bits).
    pub const PENDING: usize = 1 << 10;
    /// Entries of the trace table (sets indexed by a hash of the trace id's last hex
    /// digits).
    pub const TRACES: usize = 1 << 12;
    pub const WAYS: usize = 4;
    /// Nine cache lines: the fields below and the value.
    pub const ENTRY: usize = 576;
    /// Pending table: the goid (0 = free; with bit 63 set while its value is written, and
    /// taken back to 0 with `lock cmpxchg`). Trace table: a sequence word, odd while a
    /// writer fills the entry (readers check it before and after copying the value).
    pub const KEY: usize = 0;
    /// Bytes of the value (1 to [`MAX`]).
    pub const LEN: usize = 8;
    /// The time stamp counter when the value was read (pending) or stored (trace table,
    /// for eviction).
    pub const TSC: usize = 16;
    /// Trace table: the trace id, 32 lowercase hex digits.
    pub const TRACE: usize = 24;
    pub const VALUE: usize = 56;
    /// Time stamp counter ticks within which a pending value must be taken up: 2^27, tens
    /// of milliseconds at any rate a counter runs at (header decoding and taking up the
    /// context are microseconds apart, unless the thread is descheduled in between). Only
    /// a value sent without a `traceparent` (which W3C says to ignore) ever waits longer.
    pub const FRESH_TICKS: u64 = 1 << 27;
    /// The longest value kept: W3C's limit for what a vendor must propagate.
    pub const MAX: usize = 512;
    pub const LEN_ALL: usize = (PENDING + TRACES) * ENTRY;
}

/// Memory for the `traceparent` headers added to Kafka messages. kafka-go copies each
/// message into a batch that another goroutine encodes later, for a synchronous writer
/// before `WriteMessages` returns (unless its context ends first), for an asynchronous one
/// at any time after: so what a header points to must stay valid for as long as a batch
/// may hold it, beyond a detach. Each `WriteMessages` call takes the next slot (a ring of
/// them) and writes its span's `traceparent` value there; the `kafka.Header` that points
/// to it and to the key was written once, when the ring was set up. A slot is reused only
/// [`SLOTS`] calls later. Once a slot was used, a detach leaves the arena's pages mapped
/// (and nothing else): a batch still queued in the process may point into them.
pub mod arena {
    /// Slots, a power of two.
    pub const SLOTS: usize = 4096;
    pub const SLOT: usize = 128;
    /// The next slot's ticket (u64, taken with `lock xadd`); 0: no slot was ever used.
    pub const NEXT: usize = 0;
    /// Offset of the first slot from the arena's start.
    pub const FIRST: usize = 128;
    /// In a slot: a `kafka.Header{Key string, Value []byte}` (key pointer and length,
    /// value pointer, length and capacity), pointing to [`VALUE`] and [`KEY`].
    pub const HEADER: usize = 0;
    pub const HEADER_LEN: usize = 40;
    /// The `traceparent` value, 55 bytes.
    pub const VALUE: usize = 40;
    pub const VALUE_LEN: usize = 55;
    /// `traceparent`, 11 bytes.
    pub const KEY: usize = 96;
    pub const LEN: usize = (FIRST + SLOTS * SLOT).next_multiple_of(super::PAGE);
}

/// State of a context table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum CtxState {
    /// An incoming `traceparent` read from the request headers, for the server span the
    /// goroutine starts next.
    Pending = 1,
    /// The goroutine (or request) is inside a span.
    Active = 2,
}

/// What a trampoline that starts an HTTP span writes into its record: the ids it made
/// or continued, in hex, so that the collector exports exactly what went on the wire.
pub mod span_ids {
    pub const TRACE: usize = 0;
    pub const SPAN: usize = 32;
    pub const PARENT: usize = 48;
    /// [`super::ParentKind`] (u64).
    pub const PARENT_KIND: usize = 64;
    /// The span's trace flags as it propagates them (see `ctx::FLAGS`): whether it is
    /// sampled was decided where its trace began, or by the sampler at its root here.
    pub const FLAGS: usize = 72;
    pub const LEN: usize = 80;
}

/// Where an HTTP span's parent came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ParentKind {
    None = 0,
    /// An incoming `traceparent` header.
    Remote = 1,
    /// The goroutine's (or its creator's) current span.
    Local = 2,
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
    #[error("{rings} sub-rings: must be a power of two from 1 to 256")]
    Rings { rings: u32 },
    #[error("a sub-ring of {bytes} bytes is too large (at most 1 GiB)")]
    TooLarge { bytes: u64 },
}

/// Sizes of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub rings: u32,
    /// Slots per sub-ring.
    pub capacity: u64,
    pub slot_size: usize,
    /// Probe sites with a drop counter of their own (after the context tables), so that
    /// a loss can be told by function.
    pub sites: u32,
    /// Patches the [`journal`] (after the drop counters) has room for.
    pub patches: u32,
    /// Whether the mapping holds an [`arena`] (before the journal).
    pub arena: bool,
    /// P blocks per site of the [`stats`] region (after the arena); 0: no region.
    pub stats_slots: u32,
}

impl Layout {
    pub fn new(rings: u32, capacity: u64, slot_size: usize) -> Result<Self, LayoutError> {
        if !(1..=256).contains(&rings) || !rings.is_power_of_two() {
            return Err(LayoutError::Rings { rings });
        }
        if capacity < 2 || !capacity.is_power_of_two() {
            return Err(LayoutError::Capacity { capacity });
        }
        // A power of two lets trampolines index slots with a shift.
        if slot_size < MIN_SLOT_SIZE || !slot_size.is_power_of_two() {
            return Err(LayoutError::SlotSize { size: slot_size, min: MIN_SLOT_SIZE });
        }
        let l = Layout { rings, capacity, slot_size, sites: 0, patches: 0, arena: false, stats_slots: 0 };
        // Trampolines multiply the ring index by the stride with a 32-bit immediate.
        if l.stride() > 1 << 30 {
            return Err(LayoutError::TooLarge { bytes: l.stride() as u64 });
        }
        Ok(l)
    }

    /// Bytes from one sub-ring to the next: its header page and its slots.
    pub fn stride(&self) -> usize {
        ring::LEN + (self.capacity as usize) * self.slot_size
    }

    /// Bytes of the whole mapping: header, sub-rings, context tables.
    pub fn total_len(&self) -> usize {
        self.journal_offset() + journal::len(self.patches as usize).next_multiple_of(PAGE)
    }

    /// The same layout with room in the journal for `patches` patches.
    pub fn with_patches(self, patches: u32) -> Self {
        Layout { patches, ..self }
    }

    /// Offset of the [`journal`].
    pub fn journal_offset(&self) -> usize {
        self.stats_offset() + self.stats_len()
    }

    /// Offset of the [`stats`] region (when the layout has one).
    pub fn stats_offset(&self) -> usize {
        self.arena_offset() + if self.arena { arena::LEN } else { 0 }
    }

    fn stats_len(&self) -> usize {
        if self.stats_slots == 0 {
            return 0;
        }
        stats::len(self.sites as usize, self.stats_slots as usize).next_multiple_of(PAGE)
    }

    /// The same layout with a [`stats`] region of `slots` P blocks per site (0: none).
    pub fn with_stats(self, slots: u32) -> Self {
        Layout { stats_slots: slots, ..self }
    }

    /// Offset of `site`'s missed-call counter in the [`stats`] region.
    pub fn stats_missed_offset(&self, site: u32) -> usize {
        self.stats_offset() + stats::FRAMES_LEN + 8 * site as usize
    }

    /// Offset of the [`stats`] block of `site` for P slot `slot`.
    pub fn stats_block_offset(&self, site: u32, slot: u32) -> usize {
        let first = self.stats_offset() + stats::FRAMES_LEN + stats::missed_len(self.sites as usize);
        first + (site as usize * self.stats_slots as usize + slot as usize) * stats::BLOCK
    }

    /// Offset of the [`arena`] (when the layout has one).
    pub fn arena_offset(&self) -> usize {
        self.site_drops_offset() + (self.sites as usize * 8).next_multiple_of(PAGE)
    }

    /// The same layout with an [`arena`] or without.
    pub fn with_arena(self, arena: bool) -> Self {
        Layout { arena, ..self }
    }

    /// Writes every arena slot's `kafka.Header` and key, for a mapping at `base` in the
    /// target.
    pub fn initialise_arena(&self, mem: &mut [u8], base: u64) {
        if !self.arena {
            return;
        }
        let start = self.arena_offset();
        for i in 0..arena::SLOTS {
            let at = start + arena::FIRST + i * arena::SLOT;
            let addr = base + at as u64;
            let words = [addr + arena::KEY as u64, 11, addr + arena::VALUE as u64, 55, 55];
            for (k, w) in words.iter().enumerate() {
                mem[at + arena::HEADER + 8 * k..][..8].copy_from_slice(&w.to_le_bytes());
            }
            mem[at + arena::KEY..][..11].copy_from_slice(b"traceparent");
        }
    }

    /// The same layout with a drop counter for each of `sites` probe sites.
    pub fn with_sites(self, sites: u32) -> Self {
        Layout { sites, ..self }
    }

    /// Offset of the per-site drop counters (u64 each, `lock inc`ed by writers that drop
    /// a record of that site).
    pub fn site_drops_offset(&self) -> usize {
        self.tracestate_offset() + tracestate::LEN_ALL
    }

    /// Offset of the [`tracestate`] pending table (the trace table follows it).
    pub fn tracestate_offset(&self) -> usize {
        self.ctx_offset() + ctx::LEN
    }

    /// Offset of the goroutine context table (the request table follows it).
    pub fn ctx_offset(&self) -> usize {
        header::LEN + self.rings as usize * self.stride()
    }

    /// Offset of sub-ring `r` (its header page) from the start of the mapping.
    pub fn ring_offset(&self, r: u32) -> usize {
        header::LEN + r as usize * self.stride()
    }

    /// Offset of the slot for `ticket` of sub-ring `r`.
    pub fn slot_offset(&self, r: u32, ticket: u64) -> usize {
        self.ring_offset(r) + ring::LEN + (ticket & (self.capacity - 1)) as usize * self.slot_size
    }

    /// Bytes available for copied data in each slot.
    pub fn data_len(&self) -> usize {
        self.slot_size - slot::DATA
    }

    /// Writes a fresh header and slot sequence words into `mem` (at least `total_len`).
    pub fn initialise(&self, mem: &mut [u8]) {
        mem[..self.total_len()].fill(0);
        self.initialise_zeroed(mem);
    }

    /// As [`Layout::initialise`] for memory known to be zero (a new memfd): only the
    /// header; every slot's zero sequence word already means free.
    pub fn initialise_zeroed(&self, mem: &mut [u8]) {
        let put = |mem: &mut [u8], off: usize, v: &[u8]| mem[off..off + v.len()].copy_from_slice(v);
        put(mem, header::MAGIC, &MAGIC.to_le_bytes());
        put(mem, header::VERSION, &VERSION.to_le_bytes());
        put(mem, header::SLOT_SIZE, &(self.slot_size as u32).to_le_bytes());
        put(mem, header::CAPACITY, &self.capacity.to_le_bytes());
        put(mem, header::RINGS, &self.rings.to_le_bytes());
        put(mem, header::SALT, &salt().to_le_bytes());
        put(mem, header::JOURNAL, &(self.journal_offset() as u64).to_le_bytes());
        if self.arena {
            put(mem, header::ARENA, &(self.arena_offset() as u64).to_le_bytes());
        }
        put(mem, self.journal_offset(), &journal::MAGIC.to_le_bytes());
    }
}

/// A seed that differs between rings and runs (span ids need uniqueness, not secrecy).
fn salt() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_checks_and_sizes() {
        assert!(Layout::new(1, 3, 256).is_err());
        assert!(Layout::new(1, 4, 100).is_err());
        assert!(Layout::new(1, 4, 64).is_err());
        assert!(Layout::new(1, 4, 320).is_err());
        assert!(Layout::new(3, 4, 256).is_err());
        assert!(Layout::new(1, 1 << 23, 256).is_err());
        let l = Layout::new(2, 16, 256).unwrap();
        assert_eq!(l.stride(), 4096 + 4096);
        // Header, two sub-rings, the context and tracestate tables, the journal's first page.
        assert_eq!(l.total_len(), 4096 + 2 * 8192 + ctx::LEN + tracestate::LEN_ALL + 4096);
        assert_eq!(tracestate::LEN_ALL % PAGE, 0);
        const { assert!(tracestate::VALUE + tracestate::MAX + 8 <= tracestate::ENTRY, "a copy may overrun by 7") };
        let big = l.with_sites(600).with_patches(200);
        assert_eq!(big.site_drops_offset(), l.site_drops_offset());
        assert_eq!(big.journal_offset(), l.site_drops_offset() + 8192, "600 counters take two pages");
        assert_eq!(big.total_len(), big.journal_offset() + journal::len(200).next_multiple_of(PAGE));
        assert_eq!(l.slot_offset(1, 17), 4096 + 8192 + 4096 + 256);
        let counted = big.with_stats(4);
        assert_eq!(counted.stats_offset(), big.journal_offset(), "the region comes before the journal");
        assert_eq!(counted.stats_block_offset(0, 0), counted.stats_missed_offset(0) + 8192, "600 missed counters");
        assert_eq!(counted.stats_block_offset(599, 3) + stats::BLOCK, counted.stats_offset() + stats::len(600, 4));
        assert!(counted.journal_offset() >= counted.stats_block_offset(599, 3) + stats::BLOCK);
        assert_eq!(counted.journal_offset() % PAGE, 0);
        assert_eq!(counted.stats_block_offset(1, 1) % 64, 0, "blocks own their cache lines");
        let with = big.with_arena(true);
        assert_eq!(with.arena_offset(), big.journal_offset());
        assert_eq!(with.journal_offset(), big.journal_offset() + arena::LEN);
        assert_eq!(arena::LEN % PAGE, 0);
        const { assert!(arena::KEY + 11 <= arena::SLOT && arena::VALUE + arena::VALUE_LEN <= arena::KEY) };
        let mut mem = vec![0u8; with.total_len()];
        with.initialise_zeroed(&mut mem);
        with.initialise_arena(&mut mem, 0x7000_0000);
        let slot = with.arena_offset() + arena::FIRST + arena::SLOT;
        let word = |at: usize| u64::from_le_bytes(mem[at..at + 8].try_into().unwrap());
        assert_eq!(word(header::ARENA), with.arena_offset() as u64);
        assert_eq!(word(slot), 0x7000_0000 + (slot + arena::KEY) as u64);
        assert_eq!(word(slot + 16), 0x7000_0000 + (slot + arena::VALUE) as u64);
        assert_eq!(&mem[slot + arena::KEY..][..11], b"traceparent");
        assert_eq!(slot::DATA, 184);
        let mut mem = vec![0xffu8; l.total_len()];
        l.initialise(&mut mem);
        assert_eq!(&mem[..8], b"INJRING1");
        assert_eq!(u64::from_le_bytes(mem[l.slot_offset(1, 3)..][..8].try_into().unwrap()), 0, "free: zero");
        assert_eq!(u64::from_le_bytes(mem[l.ring_offset(1)..][..8].try_into().unwrap()), 0, "head");
    }
}
