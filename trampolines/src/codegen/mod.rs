//! Trampoline code. Rules (DESIGN.md): no stack at all, every register preserved but R12,
//! R13 and the flags, DF untouched, X15 untouched, never block (a full or contended ring
//! drops the record and counts it), never fault (only ring memory and `[R14+goid]` are
//! dereferenced; R14 is the current g at every ABIInternal entry and return).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, FlowControl, IcedError, Instruction, MemoryOperand, Register};
use ring_abi::{CtxState, Kind, ParentKind, ctx, header, slot, span_ids};

use crate::site::{EntryPatch, ReturnPatch};

mod capture;
mod ops;
mod stats;

pub use stats::{ErrorAt, StatsProbe};

use capture::emit_capture;

/// A RIP-relative memory operand at an absolute address.
fn rip_mem(addr: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, addr as i64)
}

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("cannot encode trampoline at {at:#x}: {reason}")]
    Encode { at: u64, reason: String },
    #[error("ring at {ring:#x} is out of RIP-relative reach of trampoline at {at:#x}")]
    Reach { ring: u64, at: u64 },
    #[error("the instructions to relocate for the trampoline at {at:#x} do not end with the function's RET")]
    NoRet { at: u64 },
}

impl CodegenError {
    fn encode(at: u64, e: IcedError) -> Self {
        CodegenError::Encode { at, reason: e.to_string() }
    }
}

/// Where the ring lives in the target, and its shape.
#[derive(Debug, Clone, Copy)]
pub struct RingAddrs {
    /// Address of the ring mapping (global header page first).
    pub base: u64,
    pub layout: ring_abi::Layout,
    /// Offset of `goid` in `runtime.g`.
    pub goid_offset: u32,
    /// Offset of `stack.hi` in `runtime.g`: records carry `stack.hi - SP`, which stays the
    /// same when the runtime copies a goroutine's stack to grow it.
    pub stack_hi_offset: u32,
    /// How a writer picks its sub-ring.
    pub select: RingSelect,
    /// `PAUSE` rounds a writer waits for room in a full sub-ring while the ring's
    /// LOSSLESS word is set; 0 emits no wait at all.
    pub wait_spins: u32,
    /// The sampler the spans the trampolines begin follow, so that the flag they send is
    /// the decision the collector exports by.
    pub sampling: Sampling,
}

/// A span's sampled flag, decided where its trace enters the process and inherited by
/// every span under it there (as OpenTelemetry's samplers decide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// Continue a remote parent's flags (`parentbased_*`); else decide by `root_below`.
    pub parent_based: bool,
    /// TraceIdRatioBased: sampled when the trace id's low 64 bits, shifted right once,
    /// are below this (`u64::MAX`: always, 0: never).
    pub root_below: u64,
}

impl Default for Sampling {
    /// `parentbased_always_on`, OpenTelemetry's default.
    fn default() -> Self {
        Sampling { parent_based: true, root_below: u64::MAX }
    }
}

/// Which sub-ring a writer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingSelect {
    /// The id of the P its thread holds (`g.m.p.id`, from R14): only one thread holds a
    /// P at a time, so writers of one sub-ring never run at once. Offsets into
    /// `runtime.g`, `runtime.m` and `runtime.p`.
    ByP { g_m: u32, m_p: u32, p_id: u32 },
    /// The CPU (`LSL` on Linux's per-CPU segment): for runtimes whose layout is not known.
    /// Much slower under virtualisation.
    ByCpu,
}

impl RingAddrs {
    fn enabled(&self) -> u64 {
        self.base + header::ENABLED as u64
    }
    fn lossless(&self) -> u64 {
        self.base + header::LOSSLESS as u64
    }
    fn first_ring(&self) -> u64 {
        self.base + self.layout.ring_offset(0) as u64
    }
    /// The drop counter of `site`, if the layout has one.
    fn site_drops(&self, site: u32) -> Option<u64> {
        (site < self.layout.sites).then(|| self.base + (self.layout.site_drops_offset() + 8 * site as usize) as u64)
    }
}

/// Linux's per-CPU GDT segment: `LSL` on this selector yields `node << 12 | cpu` in any
/// register (what the vDSO's getcpu uses). Where it is missing, `LSL` leaves the register
/// unchanged and every writer uses one sub-ring: still correct, only less scalable.
const CPUNODE_SELECTOR: u32 = 15 * 8 + 3;

/// Which registers a probe records, and which bytes arguments point to. Unrecorded
/// registers cost nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapturePlan {
    /// Bit i: integer register i of the ABI order (RAX, RBX, RCX, RDI, RSI, R8..R11).
    pub ints: u16,
    /// Bit i: X<i> (low 64 bits), i < 8.
    pub floats: u8,
    /// Bounded copies of the bytes (pointer, length) register pairs point to: strings,
    /// byte slices.
    pub copies: Vec<ByteCopy>,
    /// Reads through typed pointers and trace-context work, after the registers are saved.
    pub ops: Vec<Op>,
    /// Record nothing at this point (a probe that only matters at its other end).
    pub off: bool,
    /// Record only when this holds (checked before a slot is taken, with R12/R13 only).
    pub guard: Option<Guard>,
    /// Run `ops` without taking a slot or saving anything: only where every register
    /// they use (RAX, RDI, R8, R11) is dead, such as the entry of a function without
    /// parameters. Only [`Op::Forget`] can run this way.
    pub bare: bool,
    /// Count into the ring's stats region instead of recording (`inject --stats`).
    pub stats: Option<StatsProbe>,
}

/// A cheap test that decides whether a probe records at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The (pointer, length) string in these registers is at least `min_len` (and 1) bytes
    /// long and its first byte, ASCII-lowercased, is one of `first`.
    FirstByte { ptr: u8, len: u8, min_len: u8, first: Vec<u8> },
    /// The register holds a key present in the request context table.
    InRequests { key: u8 },
    /// The goroutine has an entry under its goid with this bit set
    /// (`ring_abi::ctx::CLIENT_TAG_BIT`: a client span not yet handed over;
    /// `OUT_TAG_BIT`: one whose HTTP/2 headers it writes next).
    Tagged { bit: u32 },
    /// The goroutine has an entry under its own goid (a pending or active context).
    Own,
    /// The register is 0 (a call that returned no error).
    Zero { reg: u8 },
}

/// Reads a field through a chain of typed pointers: the register's value, then each `path`
/// offset loaded as a pointer, then the field at `off`. Every pointer is nil-checked, and
/// the caller guarantees (from DWARF or the offset table) that each is a Go pointer to the
/// struct the offsets belong to, so every load is of live memory: it cannot fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCopy {
    /// An integer argument register (its ABI index), or [`SP`].
    pub reg: u8,
    pub path: Vec<i32>,
    pub off: i32,
    pub fetch: Fetch,
    pub dest: u16,
    /// Read only when each of these holds: the itabs that make an interface's data word a
    /// pointer to the struct the offsets belong to.
    pub when: Vec<When>,
    /// When a `when` fails, leave `dest` as an earlier copy to the same place left it
    /// (one alternative per dynamic type: the first, without this, writes 0 on a miss),
    /// instead of storing 0.
    pub keep_on_miss: bool,
}

/// The stack pointer at the probe, for [`FieldCopy::reg`] and [`When::reg`]: at an entry
/// and at an exit's RET alike it points at the return address, so a stack-assigned
/// argument or result lies at SP plus its ABI offset (which counts the return address).
/// The trampolines push nothing, so it is the function's own.
pub const SP: u8 = 0x80;

/// A word equals a value: the register's, or after following `path` (pointers, each
/// nil-checked) the word at `off`. For an interface (itab, data), `equals` is the itab
/// of the dynamic type a read assumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct When {
    pub reg: u8,
    pub path: Vec<i32>,
    pub off: Option<i32>,
    pub equals: u64,
    /// Compare the byte at `off` (a type descriptor's kind), not the word.
    pub byte: bool,
    /// Holds when the value differs from `equals` (a slice's length is not 0).
    pub differs: bool,
    /// Holds when the value is above `equals`, unsigned (a slice's length: element
    /// `equals` may be read).
    pub above: bool,
}

impl When {
    /// The register holds `itab`.
    pub fn reg(reg: u8, itab: u64) -> When {
        When { reg, path: Vec::new(), off: None, equals: itab, byte: false, differs: false, above: false }
    }

    /// The word at `off` after `path` equals `equals`.
    pub fn at(reg: u8, path: Vec<i32>, off: i32, equals: u64) -> When {
        When { reg, path, off: Some(off), equals, byte: false, differs: false, above: false }
    }

    /// The register is not 0 (a slice's length: its first element may be read).
    pub fn nonzero(reg: u8) -> When {
        When { reg, path: Vec::new(), off: None, equals: 0, byte: false, differs: true, above: false }
    }

    /// The register, a slice's length, is above `index`: that element exists.
    pub fn above(reg: u8, index: u64) -> When {
        When { reg, path: Vec::new(), off: None, equals: index, byte: false, differs: false, above: true }
    }

    /// The empty interface (type, data) at `path` from the register holds a string
    /// (of any named string type): its type descriptor's kind is `String`. A type word
    /// is always a descriptor, so the read is safe; the layout (`Kind_` at 23, `String`
    /// = 24) is the same in Go 1.21 to 1.27.
    pub fn eface_string(reg: u8, path: Vec<i32>) -> When {
        let mut path = path;
        path.push(0);
        When { reg, path, off: Some(ABI_TYPE_KIND), equals: ABI_KIND_STRING, byte: true, differs: false, above: false }
    }
}

/// `abi.Type.Kind_`'s offset, and the kind of strings.
const ABI_TYPE_KIND: i32 = 23;
const ABI_KIND_STRING: u64 = 24;

/// What a [`FieldCopy`] stores at `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// The 8-byte word (0 when a pointer on the way is nil).
    Word,
    /// A Go string or slice header at the field: its length (u64, 0 when a pointer on the
    /// way is nil), then up to `max` of its bytes.
    Str { max: u16 },
}

/// A trampoline operation beyond saving registers. Trace-context operations use the
/// context tables of the ring mapping (`ring_abi::ctx`); see DESIGN.md, "Trace context".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Field(FieldCopy),
    /// The (pointer, length) registers hold a header line: if it is a W3C `traceparent`
    /// of version 00, it becomes the goroutine's pending incoming context; a `tracestate`
    /// waits for [`Op::AdoptTracestate`] (`ring_abi::tracestate`).
    StashTraceparent {
        ptr: u8,
        len: u8,
    },
    /// The goroutine exits: forget its context.
    Forget,
    /// An HTTP/2 header field, decoded (name and value strings in registers): a
    /// `traceparent` becomes the goroutine's pending context, a `tracestate` waits for
    /// [`Op::AdoptTracestate`].
    StashTraceparentField {
        name_ptr: u8,
        name_len: u8,
        value_ptr: u8,
        value_len: u8,
    },
    /// Run where the goroutine's pending context is taken up (its server span begins, or
    /// its headers frame passes it on): the `tracestate` it read with it, if any, becomes
    /// its trace's, for the outgoing requests of that trace. A value read without a
    /// context is dropped here.
    AdoptTracestate,
    /// The goroutine's pending context moves to the request table under the key in the
    /// register (an HTTP/2 headers frame, passed to another goroutine).
    PendingToRequest {
        key: u8,
    },
    /// The pending context filed under the key in the register becomes this goroutine's.
    PendingFromRequest {
        key: u8,
    },
    /// The goroutine's pending context, if any, is dropped.
    ClearPending,
    /// A server span begins: continue the goroutine's pending context or start a trace,
    /// make a span id, make it the goroutine's active span, and write the ids at `dest`
    /// (`ring_abi::span_ids`).
    ServerBegin {
        dest: u16,
    },
    /// The goroutine's server span ends: forget its context.
    ServerEnd,
    /// A client span begins: child of the goroutine's active span (or a new trace); its ids
    /// go to `dest` and to the request table under the header map found at
    /// `[reg] + header_off`, for [`Op::InjectTraceparent`].
    ClientBegin {
        req: u8,
        header_off: i32,
        dest: u16,
    },
    /// About to write the header map in register `map` to the `io.Writer` (`itab`, `data`):
    /// when the map has an outgoing span and the writer is a `*bufio.Writer` (its itab's
    /// first method is `write_fn`) with room, append a `traceparent` line to its buffer.
    /// `dest` gets 1 and the span id when it did, else 0.
    InjectTraceparent {
        map: u8,
        itab: u8,
        data: u8,
        write_fn: u64,
        buf_off: i32,
        n_off: i32,
        dest: u16,
    },
    /// At the return of the function [`Op::InjectTraceparent`] wrote a line in: if the
    /// header lines written after it name a `traceparent` (the application's own), ours
    /// is taken back out of the buffer, so the request carries the application's context
    /// alone. `dest` gets 1 and the bytes taken out when it was, 2 when the buffer had
    /// been flushed, else 0.
    UndoOwnTraceparent {
        buf_off: i32,
        n_off: i32,
        dest: u16,
    },
    /// The register holds a new `g`: it inherits its creator's active context.
    Inherit {
        g: u8,
        goid_off: i32,
        parent_goid_off: i32,
    },
    /// A client span begins whose request is not a header map (a gRPC call): child of the
    /// goroutine's active span (or a new trace); its ids go to `dest` and wait on the
    /// goroutine (`ring_abi::ctx::CLIENT_TAG`) for [`Op::ClientToRequest`].
    ClientBeginHere {
        dest: u16,
    },
    /// The goroutine's waiting client span, if still there, is dropped (its call returned).
    ClientEndHere,
    /// A client span that carries nothing on (a database call): child of the goroutine's
    /// active span (or a new trace), its ids written at `dest`; no table changes. Made
    /// here rather than by the collector because only the target knows, at the call,
    /// which span a goroutine inherited from its creator.
    ChildSpan {
        dest: u16,
    },
    /// The goroutine queues the request of its waiting client span for another goroutine
    /// to write: the span moves to the request table under the key in the register.
    ClientToRequest {
        key: u8,
    },
    /// This goroutine writes the HTTP/2 headers of the request whose key is in register
    /// `key` (or at `[key] + deref`): its client span, if it has one, becomes the one the
    /// goroutine's next [`Op::InjectH2`] names. An earlier one left over is dropped.
    OutgoingFromRequest {
        key: u8,
        deref: Option<i32>,
    },
    /// About to finish an HTTP/2 frame in the `Framer` in register `framer` (its frame
    /// buffer, a byte slice, at `wbuf_off`): when the goroutine has an outgoing client span
    /// and the frame ends a request's header block, a `traceparent` field (an HPACK literal
    /// without indexing, so the decoder's table is untouched) is appended to the frame:
    /// in the frame buffer when its capacity has room, before the frame length is computed
    /// from it; else, with `after`, once the frame is in the writer's buffer
    /// ([`Op::InjectH2After`], at the function's return). `dest` gets 1 and the span id
    /// when it was appended, 3 when it waits for the return, 2 when there was no room.
    InjectH2 {
        framer: u8,
        wbuf_off: i32,
        after: Option<AfterWrite>,
        dest: u16,
    },
    /// At the return of the function [`Op::InjectH2`] deferred: the frame the framer
    /// wrote (still in its frame buffer) is the last bytes of the writer's buffer, unless
    /// that was flushed; then the field goes after it there, within the buffer's length,
    /// and the frame's length field grows by 69. `dest` gets 1 and the span id, or 2.
    InjectH2After {
        wbuf_off: i32,
        after: AfterWrite,
        dest: u16,
    },
    /// The goroutine encodes an HTTP/2 header field (name in registers): if it is a
    /// `traceparent` the application set itself, the outgoing client span waiting for the
    /// goroutine's next [`Op::InjectH2`] is dropped, so the request carries the
    /// application's context alone. `dest` gets 1 when one was dropped, else 0.
    StandDown {
        name_ptr: u8,
        name_len: u8,
        dest: u16,
    },
    /// A Kafka `WriteMessages` call whose PRODUCER span's ids are at `dest`: the next slot
    /// of the arena (`ring_abi::arena`) gets the span's `traceparent` value, and the
    /// goroutine (under `ring_abi::ctx::KAFKA_TAG_BIT`) the slot, for [`Op::KafkaHeader`].
    /// Nothing when the layout has no arena.
    KafkaSlot {
        dest: u16,
    },
    /// The goroutine's `WriteMessages` call returned: its slot is forgotten (the slot's
    /// memory stays valid for batches still holding it).
    KafkaEnd,
    /// At the entry of kafka-go's `(*writeBatch).add(msg Message, ...)`, with the
    /// message's `Headers` slice at `SP + headers` (the copy the batch keeps, not the
    /// caller's): a message without headers (capacity 0) gets the one header of the
    /// goroutine's slot. `dest` gets 1 when it did, 2 when the message has headers of its
    /// own (left as they are), 0 when the goroutine has no slot.
    KafkaHeader {
        headers: i32,
        dest: u16,
    },
    /// A message was fetched (its `Headers` at `SP + headers`): inside a span the goroutine
    /// serves, a child of it; else the message's `traceparent` (or a new trace) is
    /// continued by a span that becomes the goroutine's context, marked
    /// (`ring_abi::ctx::MARK`) for [`Op::ConsumeEnd`]. Its ids go to `dest`.
    ConsumeBegin {
        headers: i32,
        dest: u16,
    },
    /// The goroutine fetches again: the context [`Op::ConsumeBegin`] gave it, if it still
    /// has it, is forgotten.
    ConsumeEnd,
    /// At an entry: up to `n` return addresses of the call's stack, the caller's (the word
    /// at SP) first, then those found by walking frame pointers from RBP (the caller's
    /// frame). A frame is followed only while it lies inside the goroutine's stack
    /// (`[g.stack.lo, g.stack.hi)`, 8-aligned) and above the one before, so no read can
    /// fault. `dest` gets the count, then the addresses.
    Stack {
        n: u8,
        dest: u16,
    },
    /// OpenTelemetry Go's global tracer asks (`newSpan(ctx, autoSpan *bool, ...)`) whether
    /// an auto-instrumentation is there: the `bool` at the pointer in `flag` is set, so
    /// the application's spans go to the Auto SDK ([`Op::AutoStart`]); its address goes to
    /// the ring header (`ring_abi::header::AUTO_FLAG`) for the detach to clear.
    AutoEnable {
        flag: u8,
    },
    /// The Auto SDK's `(*tracer).start(ctx, span, psc, sampled, sc)` asks for a span's
    /// context: a child of the goroutine's active span (or a new trace), its ids at
    /// `dest`, written as `trace.SpanContext`s at `*sc` and (with a parent) `*psc`;
    /// `*sampled` is cleared when the trace is not sampled. The span becomes the
    /// goroutine's context; what was there waits under the span's address for
    /// [`Op::AutoEnd`].
    AutoStart {
        span: u8,
        psc: u8,
        sampled: u8,
        sc: u8,
        dest: u16,
    },
    /// The Auto SDK span in register `span` ended: when it is still the goroutine's
    /// context, the context from before it comes back.
    AutoEnd {
        span: u8,
    },
}

/// Where a `Framer` writes: its `io.Writer` field, which must hold a writer of one known
/// type (its itab), and that writer's buffer (a byte slice, or with `buf_indirect` a
/// pointer to one) and fill index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterWrite {
    pub w_off: i32,
    pub itab: u64,
    pub buf_off: i32,
    pub buf_indirect: bool,
    pub fill_off: i32,
}

impl Op {
    fn data_end(&self) -> usize {
        match self {
            Op::Field(f) => f.dest as usize + 8 + if let Fetch::Str { max } = f.fetch { max as usize } else { 0 },
            Op::ServerBegin { dest } | Op::ClientBegin { dest, .. } => *dest as usize + ring_abi::span_ids::LEN,
            Op::InjectTraceparent { dest, .. } | Op::InjectH2 { dest, .. } => *dest as usize + 32,
            Op::InjectH2After { dest, .. } => *dest as usize + ops::H2_AFTER_DATA,
            Op::StandDown { dest, .. } => *dest as usize + 8,
            Op::UndoOwnTraceparent { dest, .. } => *dest as usize + 16,
            Op::ClientBeginHere { dest }
            | Op::ChildSpan { dest }
            | Op::ConsumeBegin { dest, .. }
            | Op::AutoStart { dest, .. } => *dest as usize + ring_abi::span_ids::LEN,
            Op::KafkaHeader { dest, .. } => *dest as usize + 8,
            Op::Stack { n, dest } => *dest as usize + 8 + 8 * *n as usize,
            Op::StashTraceparent { .. }
            | Op::StashTraceparentField { .. }
            | Op::AdoptTracestate
            | Op::PendingToRequest { .. }
            | Op::PendingFromRequest { .. }
            | Op::ClearPending
            | Op::ServerEnd
            | Op::Forget
            | Op::Inherit { .. }
            | Op::ClientEndHere
            | Op::ClientToRequest { .. }
            | Op::OutgoingFromRequest { .. }
            | Op::KafkaSlot { .. }
            | Op::KafkaEnd
            | Op::ConsumeEnd
            | Op::AutoEnable { .. }
            | Op::AutoEnd { .. } => 0,
        }
    }
}

/// Copy `min(len, max)` bytes from the pointer in integer register `ptr` (ABI index) to
/// `dest` bytes into the slot's data area, when the length in register `len` is positive
/// and the pointer non-nil. A Go string or slice of positive length always points to that
/// many readable bytes, and the copy reads exactly those: it cannot fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCopy {
    pub ptr: u8,
    pub len: u8,
    pub max: u16,
    pub dest: u16,
}

impl CapturePlan {
    /// Whether the plan needs the ring's arena (`ring_abi::arena`).
    pub fn needs_arena(&self) -> bool {
        self.ops.iter().any(|o| matches!(o, Op::KafkaSlot { .. }))
    }

    pub fn all() -> CapturePlan {
        CapturePlan { ints: 0x1ff, floats: 0xff, ..CapturePlan::default() }
    }

    /// Bytes of slot data area the copies and operations need.
    pub fn data_len(&self) -> usize {
        let copies = self.copies.iter().map(|c| c.dest as usize + c.max as usize);
        copies.chain(self.ops.iter().map(Op::data_end)).max().unwrap_or(0)
    }
}

/// R13d = the id of the P the goroutine in R14 runs on (`g.m.p.id`, offsets `g_m`, `m_p`,
/// `p_id`), or a jump to `no_p` when its thread holds none (g.m or m.p nil). Writes R13
/// and the flags only.
pub(super) fn emit_p_id(
    a: &mut CodeAssembler,
    (g_m, m_p, p_id): (u32, u32, u32),
    no_p: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(r13, qword_ptr(r14 + g_m as i32))?;
    a.test(r13, r13)?;
    a.je(no_p)?;
    a.mov(r13, qword_ptr(r13 + m_p as i32))?;
    a.test(r13, r13)?;
    a.je(no_p)?;
    a.mov(r13d, dword_ptr(r13 + p_id as i32))
}

/// A generated trampoline: code to place at `at`.
#[derive(Debug, Clone)]
pub struct Trampoline {
    pub at: u64,
    pub code: Vec<u8>,
}

fn check_reach(at: u64, ring: &RingAddrs) -> Result<(), CodegenError> {
    let far = |x: u64| (x as i64).wrapping_sub(at as i64).unsigned_abs() > (1 << 31) - (1 << 24);
    if far(ring.base) || far(ring.base + ring.layout.total_len() as u64) {
        return Err(CodegenError::Reach { ring: ring.base, at });
    }
    Ok(())
}

/// Assembles a trampoline for `at`: `body` emits its instructions.
fn assemble(
    at: u64,
    ring: &RingAddrs,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Trampoline, CodegenError> {
    check_reach(at, ring)?;
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        body(&mut a)?;
        Ok(a.assemble_options(at, BlockEncoderOptions::NONE)?.inner.code_buffer)
    };
    let code = build().map_err(|e| CodegenError::encode(at, e))?;
    Ok(Trampoline { at, code })
}

/// The entry trampoline for `patch`, to be placed at `at`.
pub fn entry_trampoline(
    patch: &EntryPatch,
    site: u32,
    entry_plan: &CapturePlan,
    return_plan: &CapturePlan,
    ring: &RingAddrs,
    at: u64,
) -> Result<Trampoline, CodegenError> {
    if patch.whole_body {
        ends_with_ret(&patch.stolen, at)?;
    }
    stats::check(entry_plan, ring, site, at)?;
    stats::check(return_plan, ring, site, at)?;
    assemble(at, ring, |a| {
        if patch.stack_check {
            // The original check first: when it fails it branches to the function's own
            // morestack block, which grows the stack and jumps back to the entry.
            for i in &patch.stolen {
                a.add_instruction(*i)?;
            }
            emit_capture(a, ring, site, Kind::Entry, entry_plan)?;
        } else if patch.whole_body {
            // The body, the return record, then the function's own RET.
            emit_capture(a, ring, site, Kind::Entry, entry_plan)?;
            for i in &patch.stolen {
                if i.flow_control() == FlowControl::Return {
                    emit_capture(a, ring, site, Kind::Return, return_plan)?;
                }
                a.add_instruction(*i)?;
            }
            return Ok(());
        } else {
            emit_capture(a, ring, site, Kind::Entry, entry_plan)?;
            for i in &patch.stolen {
                a.add_instruction(*i)?;
            }
        }
        // Back to the instruction after the last relocated one.
        a.jmp(patch.stolen.last().map_or(patch.redirect.at, |i| i.next_ip()))
    })
}

/// The return trampoline for `patch`: re-executes the epilogue instructions the jump
/// replaced, records the results, and returns.
pub fn return_trampoline(
    patch: &ReturnPatch,
    site: u32,
    plan: &CapturePlan,
    ring: &RingAddrs,
    at: u64,
) -> Result<Trampoline, CodegenError> {
    ends_with_ret(&patch.insns, at)?;
    stats::check(plan, ring, site, at)?;
    assemble(at, ring, |a| {
        for i in &patch.insns {
            if i.flow_control() == FlowControl::Return {
                emit_capture(a, ring, site, Kind::Return, plan)?;
            }
            a.add_instruction(*i)?;
        }
        Ok(())
    })
}

/// A trampoline that returns itself must end with the RET it relocates (and have no other).
fn ends_with_ret(insns: &[Instruction], at: u64) -> Result<(), CodegenError> {
    let rets = insns.iter().filter(|i| i.flow_control() == FlowControl::Return).count();
    match insns.last() {
        Some(last) if rets == 1 && last.flow_control() == FlowControl::Return => Ok(()),
        _ => Err(CodegenError::NoRet { at }),
    }
}
