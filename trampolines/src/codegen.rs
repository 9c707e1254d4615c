//! Trampoline code. Rules (DESIGN.md): no stack at all, every register preserved but R12,
//! R13 and the flags, DF untouched, X15 untouched, never block (a full or contended ring
//! drops the record and counts it), never fault (only ring memory and `[R14+goid]` are
//! dereferenced; R14 is the current g at every ABIInternal entry and return).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, FlowControl, IcedError, Instruction, MemoryOperand, Register};
use ring_abi::{CtxState, Kind, ParentKind, ctx, header, slot, span_ids};

use crate::site::{EntryPatch, ReturnPatch};

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
}

/// A cheap test that decides whether a probe records at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The (pointer, length) string in these registers is non-empty and its first byte,
    /// ASCII-lowercased, is one of `first`.
    FirstByte { ptr: u8, len: u8, first: Vec<u8> },
    /// The register holds a key present in the request context table.
    InRequests { key: u8 },
}

/// Reads a field through a chain of typed pointers: the register's value, then each `path`
/// offset loaded as a pointer, then the field at `off`. Every pointer is nil-checked, and
/// the caller guarantees (from DWARF or the offset table) that each is a Go pointer to the
/// struct the offsets belong to, so every load is of live memory: it cannot fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCopy {
    pub reg: u8,
    pub path: Vec<i32>,
    pub off: i32,
    pub fetch: Fetch,
    pub dest: u16,
}

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
    /// of version 00, it becomes the goroutine's pending incoming context.
    StashTraceparent {
        ptr: u8,
        len: u8,
    },
    /// The goroutine exits: forget its context.
    Forget,
    /// An HTTP/2 header field, decoded (name and value strings in registers): a
    /// `traceparent` becomes the goroutine's pending context.
    StashTraceparentField {
        name_ptr: u8,
        name_len: u8,
        value_ptr: u8,
        value_len: u8,
    },
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
    /// The register holds a new `g`: it inherits its creator's active context.
    Inherit {
        g: u8,
        goid_off: i32,
        parent_goid_off: i32,
    },
}

impl Op {
    fn data_end(&self) -> usize {
        match self {
            Op::Field(f) => f.dest as usize + 8 + if let Fetch::Str { max } = f.fetch { max as usize } else { 0 },
            Op::ServerBegin { dest } | Op::ClientBegin { dest, .. } => *dest as usize + ring_abi::span_ids::LEN,
            Op::InjectTraceparent { dest, .. } => *dest as usize + 24,
            Op::StashTraceparent { .. }
            | Op::StashTraceparentField { .. }
            | Op::PendingToRequest { .. }
            | Op::PendingFromRequest { .. }
            | Op::ClearPending
            | Op::ServerEnd
            | Op::Forget
            | Op::Inherit { .. } => 0,
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
    pub fn all() -> CapturePlan {
        CapturePlan { ints: 0x1ff, floats: 0xff, ..CapturePlan::default() }
    }

    /// Bytes of slot data area the copies and operations need.
    pub fn data_len(&self) -> usize {
        let copies = self.copies.iter().map(|c| c.dest as usize + c.max as usize);
        copies.chain(self.ops.iter().map(Op::data_end)).max().unwrap_or(0)
    }
}

/// A generated trampoline: code to place at `at`.
#[derive(Debug, Clone)]
pub struct Trampoline {
    pub at: u64,
    pub code: Vec<u8>,
}

/// Attempts to win a slot before giving up and counting a drop. With one sub-ring per
/// CPU, a lost race needs a thread preempted or migrated mid-attempt, so a few suffice;
/// each unrolled attempt costs ~50 bytes of trampoline.
const ATTEMPTS: usize = 4;

fn rip_mem(addr: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, addr as i64)
}

/// R13 = the writer's sub-ring (clobbers only R13).
fn emit_ring_select(a: &mut CodeAssembler, ring: &RingAddrs, rings_const: CodeLabel) -> Result<(), IcedError> {
    let l = &ring.layout;
    match ring.select {
        RingSelect::ByP { g_m, m_p, p_id } => {
            // g.m is never nil for a running goroutine, m.p is nil for a thread without a
            // P (sysmon, signal handlers); both are checked, and a missing P uses ring 0.
            let mut no_p = a.create_label();
            let mut have = a.create_label();
            a.mov(r13, qword_ptr(r14 + g_m as i32))?;
            a.test(r13, r13)?;
            a.je(no_p)?;
            a.mov(r13, qword_ptr(r13 + m_p as i32))?;
            a.test(r13, r13)?;
            a.je(no_p)?;
            a.mov(r13d, dword_ptr(r13 + p_id as i32))?;
            a.jmp(have)?;
            a.set_label(&mut no_p)?;
            a.xor(r13d, r13d)?;
            a.set_label(&mut have)?;
        }
        RingSelect::ByCpu => {
            a.mov(r13d, CPUNODE_SELECTOR)?;
            a.lsl(r13d, r13d)?;
        }
    }
    a.and(r13d, (l.rings - 1) as i32)?;
    a.imul_3(r13, r13, l.stride() as i32)?;
    a.add(r13, qword_ptr(rings_const))?;
    Ok(())
}

/// The record-writing block, shared by entry and return trampolines.
///
/// Registers: R12 and R13 are free; RAX is parked in X15, which the ABI guarantees is
/// zero at every entry and RET, and is zeroed again before leaving.
fn emit_capture(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    site: u32,
    kind: Kind,
    plan: &CapturePlan,
) -> Result<(), IcedError> {
    if plan.bare {
        let o = Ops { ring, slot_data: 0, ints: 0 };
        for op in &plan.ops {
            if *op == Op::Forget {
                o.emit(a, op)?;
            }
        }
        return Ok(());
    }
    if plan.off {
        return Ok(());
    }
    let l = &ring.layout;
    let mask = (l.capacity - 1) as i32;
    let shift = l.slot_size.trailing_zeros();
    let data = ring_abi::ring::LEN as i32;
    let slot_field = |off: usize| data + off as i32;
    let mut rings_const = a.create_label();
    let mut done = a.create_label();
    let mut won = a.create_label();
    let mut contended = a.create_label();
    let mut last_seq_fail = a.create_label();
    a.add_instruction(Instruction::with2(Code::Cmp_rm64_imm8, rip_mem(ring.enabled()), 0)?)?;
    a.je(done)?;
    if let Some(g) = &plan.guard {
        emit_guard(a, ring, g, done)?;
    }
    a.movq(xmm15, rax)?;
    emit_ring_select(a, ring, rings_const)?;
    // A slot no writer has used yet is still zero (the memfd starts zeroed): free for
    // the first lap, so a fresh ring never looks full.
    // Fits: `Layout` keeps a sub-ring within 2^30 bytes, so under 2^23 slots.
    let first_lap = l.capacity as i32;
    for attempt in 0..ATTEMPTS {
        let mut next = a.create_label();
        let mut claim = a.create_label();
        let fail = if attempt + 1 == ATTEMPTS { last_seq_fail } else { next };
        a.mov(rax, qword_ptr(r13 + ring_abi::ring::HEAD as i32))?;
        a.mov(r12, rax)?;
        a.and(r12, mask)?;
        a.shl(r12, shift)?;
        a.cmp(qword_ptr(r13 + r12 + slot_field(slot::SEQ)), rax)?;
        a.je(claim)?;
        a.cmp(rax, first_lap)?;
        a.jae(fail)?;
        a.cmp(qword_ptr(r13 + r12 + slot_field(slot::SEQ)), 0)?;
        a.jne(fail)?;
        a.set_label(&mut claim)?;
        a.lea(r12, qword_ptr(rax + 1))?;
        a.lock().cmpxchg(qword_ptr(r13 + ring_abi::ring::HEAD as i32), r12)?;
        a.je(won)?;
        if attempt + 1 < ATTEMPTS {
            a.set_label(&mut next)?;
        }
    }
    // Out of attempts: the last CAS lost (contention), or the slot was not free for our
    // ticket: its sequence word is behind (an unread record from the previous lap: full)
    // or ahead (our head was stale: contention).
    let mut dropped = a.create_label();
    let mut full = a.create_label();
    a.set_label(&mut contended)?;
    a.lock().inc(qword_ptr(r13 + ring_abi::ring::CONTENDED as i32))?;
    a.jmp(dropped)?;
    a.set_label(&mut last_seq_fail)?;
    a.cmp(qword_ptr(r13 + r12 + slot_field(slot::SEQ)), rax)?;
    a.ja(contended)?;
    if ring.wait_spins > 0 {
        // Full. In lossless mode, wait for the reader to free this very slot (only one
        // thread holds a P, so nobody else is after it), then take it; give up after
        // `wait_spins` rounds, and turn the waiting off for everyone.
        let mut spin = a.create_label();
        let mut freed = a.create_label();
        a.add_instruction(Instruction::with2(Code::Cmp_rm64_imm8, rip_mem(ring.lossless()), 0)?)?;
        a.je(full)?;
        a.add(r12, r13)?;
        a.mov(r13d, ring.wait_spins)?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.cmp(qword_ptr(r12 + slot_field(slot::SEQ)), rax)?;
        a.je(freed)?;
        a.dec(r13d)?;
        a.jne(spin)?;
        a.add_instruction(Instruction::with2(Code::Mov_rm64_imm32, rip_mem(ring.lossless()), 0)?)?;
        emit_ring_select(a, ring, rings_const)?;
        a.lock().inc(qword_ptr(r13 + ring_abi::ring::WAIT_TIMEOUTS as i32))?;
        a.jmp(full)?;
        // Freed: claim ticket RAX if the head is still there (else a lost race).
        a.set_label(&mut freed)?;
        emit_ring_select(a, ring, rings_const)?;
        a.lea(r12, qword_ptr(rax + 1))?;
        a.lock().cmpxchg(qword_ptr(r13 + ring_abi::ring::HEAD as i32), r12)?;
        a.je(won)?;
        a.jmp(contended)?;
    }
    a.set_label(&mut full)?;
    a.lock().inc(qword_ptr(r13 + ring_abi::ring::DROPPED as i32))?;
    a.set_label(&mut dropped)?;
    if let Some(counter) = ring.site_drops(site) {
        let mut inc = Instruction::with1(Code::Inc_rm64, rip_mem(counter))?;
        inc.set_has_lock_prefix(true);
        a.add_instruction(inc)?;
    }
    a.movq(rax, xmm15)?;
    a.pxor(xmm15, xmm15)?;
    a.jmp(done)?;

    // Won ticket RAX of sub-ring R13: R12 = its slot (fields at R12 + `data`).
    a.set_label(&mut won)?;
    a.mov(r12, rax)?;
    a.and(r12, mask)?;
    a.shl(r12, shift)?;
    a.add(r12, r13)?;
    let field = |off: usize| r12 + slot_field(off);
    a.mov(qword_ptr(field(slot::TICKET)), rax)?;
    if plan.ints & 1 != 0 {
        a.movq(qword_ptr(field(slot::INTS)), xmm15)?;
    }
    // Copies use RCX, RSI and RDI, operations any of the nine, restored from the slot
    // afterwards: store all nine.
    let int_mask = if plan.copies.is_empty() && plan.ops.is_empty() { plan.ints } else { 0x1ff };
    if int_mask & 1 != 0 && plan.ints & 1 == 0 {
        a.movq(qword_ptr(field(slot::INTS)), xmm15)?;
    }
    let ints = [rax, rbx, rcx, rdi, rsi, r8, r9, r10, r11];
    for (i, reg) in ints.into_iter().enumerate().skip(1) {
        if int_mask & (1 << i) != 0 {
            a.mov(qword_ptr(field(slot::INTS + 8 * i)), reg)?;
        }
    }
    for c in &plan.copies {
        let mut skip = a.create_label();
        let mut short = a.create_label();
        a.mov(rcx, qword_ptr(field(slot::INTS + 8 * c.len as usize)))?;
        a.test(rcx, rcx)?;
        a.jle(skip)?;
        a.mov(rsi, qword_ptr(field(slot::INTS + 8 * c.ptr as usize)))?;
        a.test(rsi, rsi)?;
        a.je(skip)?;
        a.cmp(rcx, c.max as i32)?;
        a.jbe(short)?;
        a.mov(ecx, c.max as u32)?;
        a.set_label(&mut short)?;
        a.lea(rdi, qword_ptr(field(slot::DATA + c.dest as usize)))?;
        a.rep().movsb()?;
        a.set_label(&mut skip)?;
    }
    if !plan.ops.is_empty() {
        let o = Ops { ring, slot_data: slot_field(slot::DATA), ints: slot_field(slot::INTS) };
        for op in &plan.ops {
            o.emit(a, op)?;
        }
        for (i, reg) in ints.into_iter().enumerate().skip(1) {
            a.mov(reg, qword_ptr(field(slot::INTS + 8 * i)))?;
        }
    } else if !plan.copies.is_empty() {
        a.mov(rcx, qword_ptr(field(slot::INTS + 16)))?;
        a.mov(rdi, qword_ptr(field(slot::INTS + 24)))?;
        a.mov(rsi, qword_ptr(field(slot::INTS + 32)))?;
    }
    let xmms = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7];
    for (i, reg) in xmms.into_iter().enumerate() {
        if plan.floats & (1 << i) != 0 {
            a.movq(qword_ptr(field(slot::FLOATS + 8 * i)), reg)?;
        }
    }
    a.mov(dword_ptr(field(slot::SITE)), site)?;
    a.mov(byte_ptr(field(slot::KIND)), kind as u32)?;
    a.mov(r13, qword_ptr(r14 + ring.goid_offset as i32))?;
    a.mov(qword_ptr(field(slot::GOID)), r13)?;
    a.mov(r13, qword_ptr(r14 + ring.stack_hi_offset as i32))?;
    a.sub(r13, rsp)?;
    a.mov(qword_ptr(field(slot::SP)), r13)?;
    a.mov(r13, rdx)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(field(slot::TSC)), rax)?;
    a.mov(rdx, r13)?;
    a.mov(rax, qword_ptr(field(slot::TICKET)))?;
    a.inc(rax)?;
    // x86 keeps stores in order: the record is complete before its sequence word says so.
    a.mov(qword_ptr(field(slot::SEQ)), rax)?;
    a.movq(rax, xmm15)?;
    a.pxor(xmm15, xmm15)?;
    a.jmp(done)?;
    a.set_label(&mut rings_const)?;
    a.dq(&[ring.first_ring()])?;
    a.set_label(&mut done)?;
    Ok(())
}

/// Emits [`Op`]s. Runs inside the won-slot block: R12 is the slot, every integer argument
/// register is saved in it (and restored after), RAX is parked in X15. Free here: RAX,
/// RBX, RCX, RSI, RDI, R8-R11 and R13. RDX (the closure context) is never touched but
/// around RDTSC.
struct Ops<'r> {
    ring: &'r RingAddrs,
    /// Displacement from R12 of the slot's data area and of its saved registers.
    slot_data: i32,
    ints: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Goroutines,
    Requests,
}

/// Bytes of `traceparent: 00-<32>-<16>-01\r\n`.
const W3C_LINE: usize = 70;

/// `itab.fun[0]`: after `inter`, `_type`, `hash` and padding, in every Go release since 1.0.
const ITAB_FUN0: i32 = 24;

impl Ops<'_> {
    fn data(&self, dest: u16, off: usize) -> AsmMemoryOperand {
        qword_ptr(r12 + self.dest(dest, off))
    }
    fn dest(&self, dest: u16, off: usize) -> i32 {
        self.slot_data + dest as i32 + off as i32
    }
    fn reg(&self, i: u8) -> AsmMemoryOperand {
        qword_ptr(r12 + self.ints + 8 * i32::from(i))
    }
    fn goroutines(&self) -> u64 {
        self.ring.base + self.ring.layout.ctx_offset() as u64
    }

    fn emit(&self, a: &mut CodeAssembler, op: &Op) -> Result<(), IcedError> {
        let mut done = a.create_label();
        match op {
            Op::Field(f) => self.field(a, f, done)?,
            Op::StashTraceparent { ptr, len } => self.stash(a, *ptr, *len, done)?,
            Op::ServerBegin { dest } => {
                self.begin_span(a, *dest, CtxState::Pending, ParentKind::Remote)?;
                self.goid(a)?;
                self.place(a, Table::Goroutines, None)?;
                self.publish(a, *dest)?;
            }
            Op::ServerEnd | Op::Forget => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, None)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
            }
            Op::ClientBegin { req, header_off, dest } => {
                self.begin_span(a, *dest, CtxState::Active, ParentKind::Local)?;
                // The request table entry, keyed by the request's header map.
                a.mov(r11, self.reg(*req))?;
                a.test(r11, r11)?;
                a.je(done)?;
                a.mov(r11, qword_ptr(r11 + *header_off))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.place(a, Table::Requests, None)?;
                self.publish(a, *dest)?;
            }
            Op::InjectTraceparent { map, itab, data, write_fn, buf_off, n_off, dest } => {
                a.mov(self.data(*dest, 0), 0)?;
                a.mov(r11, self.reg(*map))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.find(a, Table::Requests, done, Some(CtxState::Active))?;
                // The writer must be a *bufio.Writer: its itab's first method (io.Writer's
                // Write) is bufio.(*Writer).Write.
                a.mov(rsi, self.reg(*itab))?;
                a.test(rsi, rsi)?;
                a.je(done)?;
                a.mov(rsi, qword_ptr(rsi + ITAB_FUN0))?;
                a.mov(r8, *write_fn)?;
                a.cmp(rsi, r8)?;
                a.jne(done)?;
                a.mov(rsi, self.reg(*data))?;
                a.test(rsi, rsi)?;
                a.je(done)?;
                // Room for the whole line in buf[n:len(buf)], or nothing is written.
                a.mov(rcx, qword_ptr(rsi + *n_off))?;
                a.test(rcx, rcx)?;
                a.js(done)?;
                a.lea(rax, qword_ptr(rcx + W3C_LINE as i32))?;
                a.cmp(rax, qword_ptr(rsi + *buf_off + 8))?;
                a.ja(done)?;
                a.mov(r8, qword_ptr(rsi + *buf_off))?;
                a.test(r8, r8)?;
                a.je(done)?;
                a.add(r8, rcx)?;
                a.mov(r9, u64::from_le_bytes(*b"tracepar"))?;
                a.mov(qword_ptr(r8), r9)?;
                a.mov(r9, u64::from_le_bytes(*b"ent: 00-"))?;
                a.mov(qword_ptr(r8 + 8), r9)?;
                self.copy(a, (rdi, ctx::TRACE as i32), (r8, 16), 32)?;
                a.mov(byte_ptr(r8 + 48), u32::from(b'-'))?;
                self.copy(a, (rdi, ctx::SPAN as i32), (r8, 49), 16)?;
                a.mov(dword_ptr(r8 + 65), u32::from_le_bytes(*b"-01\r"))?;
                a.mov(byte_ptr(r8 + 69), u32::from(b'\n'))?;
                a.mov(qword_ptr(rsi + *n_off), rax)?;
                // One request, one line: a later request with the same map gets its own.
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
                a.mov(self.data(*dest, 0), 1)?;
                self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(*dest, 8)), 16)?;
            }
            Op::StashTraceparentField { name_ptr, name_len, value_ptr, value_len } => {
                // HTTP/2 field names are lowercase.
                a.cmp(self.reg(*name_len), 11)?;
                a.jne(done)?;
                a.mov(rsi, self.reg(*name_ptr))?;
                a.test(rsi, rsi)?;
                a.je(done)?;
                a.mov(rax, u64::from_le_bytes(*b"tracepar"))?;
                a.cmp(qword_ptr(rsi), rax)?;
                a.jne(done)?;
                a.cmp(dword_ptr(rsi + 7), u32::from_le_bytes(*b"rent") as i32)?;
                a.jne(done)?;
                a.mov(rax, self.reg(*value_ptr))?;
                a.mov(rcx, self.reg(*value_len))?;
                self.stash_value(a, done)?;
            }
            Op::PendingToRequest { key } => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, Some(CtxState::Pending))?;
                a.mov(rsi, rdi)?;
                a.mov(r11, self.reg(*key))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.place(a, Table::Requests, None)?;
                self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
                a.mov(qword_ptr(rsi + ctx::KEY as i32), 0)?;
            }
            Op::PendingFromRequest { key } => {
                a.mov(r11, self.reg(*key))?;
                a.test(r11, r11)?;
                a.je(done)?;
                self.find(a, Table::Requests, done, Some(CtxState::Pending))?;
                a.mov(rsi, rdi)?;
                self.goid(a)?;
                self.place(a, Table::Goroutines, None)?;
                self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
                a.mov(qword_ptr(rsi + ctx::KEY as i32), 0)?;
            }
            Op::ClearPending => {
                self.goid(a)?;
                self.find(a, Table::Goroutines, done, Some(CtxState::Pending))?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), 0)?;
            }
            Op::Inherit { g, goid_off, parent_goid_off } => {
                let mut inherit = a.create_label();
                a.mov(rax, self.reg(*g))?;
                a.test(rax, rax)?;
                a.je(done)?;
                a.mov(r11, qword_ptr(rax + *parent_goid_off))?;
                // An active span, or an incoming context not yet started (HTTP/2 starts
                // each handler on a goroutine of its own).
                self.find(a, Table::Goroutines, done, None)?;
                a.cmp(qword_ptr(rdi + ctx::STATE as i32), CtxState::Active as i32)?;
                a.je(inherit)?;
                a.cmp(qword_ptr(rdi + ctx::STATE as i32), CtxState::Pending as i32)?;
                a.jne(done)?;
                a.set_label(&mut inherit)?;
                a.mov(rsi, rdi)?;
                a.mov(rax, self.reg(*g))?;
                a.mov(r11, qword_ptr(rax + *goid_off))?;
                self.place(a, Table::Goroutines, Some(rsi))?;
                self.copy(a, (rsi, 0), (rdi, 0), ctx::ENTRY)?;
                a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
            }
        }
        a.set_label(&mut done)?;
        Ok(())
    }

    /// Writes a new span's ids at `dest`: a child of the goroutine's context when its
    /// entry is in `state` (the parent recorded as `kind`), else the root of a new trace.
    fn begin_span(&self, a: &mut CodeAssembler, dest: u16, state: CtxState, kind: ParentKind) -> Result<(), IcedError> {
        let mut fresh = a.create_label();
        let mut span = a.create_label();
        self.goid(a)?;
        self.find(a, Table::Goroutines, fresh, Some(state))?;
        self.copy(a, (rdi, ctx::TRACE as i32), (r12, self.dest(dest, span_ids::TRACE)), 32)?;
        self.copy(a, (rdi, ctx::SPAN as i32), (r12, self.dest(dest, span_ids::PARENT)), 16)?;
        a.mov(self.data(dest, span_ids::PARENT_KIND), kind as i32)?;
        a.jmp(span)?;
        a.set_label(&mut fresh)?;
        self.new_trace(a, dest)?;
        a.set_label(&mut span)?;
        self.new_span(a, dest)
    }

    /// R11 = the goid.
    fn goid(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(r11, qword_ptr(r14 + self.ring.goid_offset as i32))
    }

    /// RDI = the first entry of the set for key R11. Clobbers R8.
    fn set_of(&self, a: &mut CodeAssembler, t: Table) -> Result<(), IcedError> {
        match t {
            Table::Requests => request_set(a, self.ring, rdi, r8, r11),
            Table::Goroutines => {
                // Goroutine ids are consecutive: their low bits already spread.
                let sets = ctx::GOROUTINES / ctx::WAYS;
                a.mov(rdi, r11)?;
                a.and(edi, (sets - 1) as u32)?;
                a.shl(rdi, (ctx::ENTRY * ctx::WAYS).trailing_zeros())?;
                a.mov(r8, self.goroutines())?;
                a.add(rdi, r8)
            }
        }
    }

    /// RDI = the entry with key R11 (and `state`, if given), or a jump to `missing`.
    fn find(
        &self,
        a: &mut CodeAssembler,
        t: Table,
        missing: CodeLabel,
        state: Option<CtxState>,
    ) -> Result<(), IcedError> {
        let mut found = a.create_label();
        self.set_of(a, t)?;
        for way in 0..ctx::WAYS {
            if way > 0 {
                a.add(rdi, ctx::ENTRY as i32)?;
            }
            a.cmp(qword_ptr(rdi + ctx::KEY as i32), r11)?;
            a.je(found)?;
        }
        a.jmp(missing)?;
        a.set_label(&mut found)?;
        if let Some(s) = state {
            a.cmp(qword_ptr(rdi + ctx::STATE as i32), s as i32)?;
            a.jne(missing)?;
        }
        Ok(())
    }

    /// RDI = where key R11 goes: its own entry, else a free one, else the first way (not
    /// `keep`, an entry the caller still reads). Clobbers RAX, R8.
    fn place(&self, a: &mut CodeAssembler, t: Table, keep: Option<AsmRegister64>) -> Result<(), IcedError> {
        let mut chosen = a.create_label();
        self.set_of(a, t)?;
        a.mov(rax, rdi)?;
        for wanted in [Some(()), None] {
            for way in 0..ctx::WAYS {
                let at = (way * ctx::ENTRY + ctx::KEY) as i32;
                match wanted {
                    Some(()) => a.cmp(qword_ptr(rax + at), r11)?,
                    None => a.cmp(qword_ptr(rax + at), 0)?,
                }
                a.lea(rdi, qword_ptr(rax + (way * ctx::ENTRY) as i32))?;
                a.je(chosen)?;
            }
        }
        // A full set: evict the first way, or the second when the first is `keep`.
        a.mov(rdi, rax)?;
        if let Some(k) = keep {
            a.cmp(rdi, k)?;
            a.jne(chosen)?;
            a.add(rdi, ctx::ENTRY as i32)?;
        }
        a.set_label(&mut chosen)
    }

    /// Copies `n` (a multiple of 8) bytes through R9.
    fn copy(
        &self,
        a: &mut CodeAssembler,
        from: (AsmRegister64, i32),
        to: (AsmRegister64, i32),
        n: usize,
    ) -> Result<(), IcedError> {
        for k in (0..n as i32).step_by(8) {
            a.mov(r9, qword_ptr(from.0 + from.1 + k))?;
            a.mov(qword_ptr(to.0 + to.1 + k), r9)?;
        }
        Ok(())
    }

    /// Marks the entry at RDI (key R11) active with the record's ids.
    fn publish(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), CtxState::Active as i32)?;
        self.copy(a, (r12, self.dest(dest, span_ids::TRACE)), (rdi, ctx::TRACE as i32), 32)?;
        self.copy(a, (r12, self.dest(dest, span_ids::SPAN)), (rdi, ctx::SPAN as i32), 16)
    }

    fn new_trace(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        self.random(a)?;
        self.hex(a, self.dest(dest, span_ids::TRACE))?;
        self.random(a)?;
        self.hex(a, self.dest(dest, span_ids::TRACE + 16))?;
        a.mov(self.data(dest, span_ids::PARENT), 0)?;
        a.mov(self.data(dest, span_ids::PARENT + 8), 0)?;
        a.mov(self.data(dest, span_ids::PARENT_KIND), ParentKind::None as i32)
    }

    fn new_span(&self, a: &mut CodeAssembler, dest: u16) -> Result<(), IcedError> {
        self.random(a)?;
        self.hex(a, self.dest(dest, span_ids::SPAN))
    }

    /// RAX = a fresh, non-zero 64-bit id: the time stamp counter and the slot's address
    /// (distinct for writers at the same instant), salted per ring and mixed (splitmix64's
    /// finaliser). Clobbers RCX, RSI, R13.
    fn random(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.mov(r13, rdx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rdx, r13)?;
        a.add_instruction(Instruction::with2(
            Code::Xor_r64_rm64,
            Register::RAX,
            rip_mem(self.ring.base + header::SALT as u64),
        )?)?;
        a.mov(rcx, r12)?;
        a.rol(rcx, 32)?;
        a.xor(rax, rcx)?;
        for (shift, mul) in [(30, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
            a.mov(rsi, rax)?;
            a.shr(rsi, shift)?;
            a.xor(rax, rsi)?;
            a.mov(rcx, mul)?;
            a.imul_2(rax, rcx)?;
        }
        a.mov(rsi, rax)?;
        a.shr(rsi, 31)?;
        a.xor(rax, rsi)?;
        a.or(rax, 1)
    }

    /// Writes RAX as 16 lowercase hex digits at `[R12 + disp]`. Clobbers R8, R9.
    fn hex(&self, a: &mut CodeAssembler, disp: i32) -> Result<(), IcedError> {
        for i in 0..16 {
            a.mov(r8, rax)?;
            a.shr(r8, 60 - 4 * i)?;
            a.and(r8d, 15)?;
            // '0' + n, plus 39 more ('a' - '0' - 10) when n > 9.
            a.lea(r9d, dword_ptr(r8 + 6))?;
            a.shr(r9d, 4)?;
            a.imul_3(r9d, r9d, 39)?;
            a.lea(r8d, dword_ptr(r8 + r9 + 48))?;
            a.mov(byte_ptr(r12 + disp + i), r8b)?;
        }
        Ok(())
    }

    fn field(&self, a: &mut CodeAssembler, f: &FieldCopy, done: CodeLabel) -> Result<(), IcedError> {
        let mut null = a.create_label();
        a.mov(rsi, self.reg(f.reg))?;
        for &p in &f.path {
            a.test(rsi, rsi)?;
            a.je(null)?;
            a.mov(rsi, qword_ptr(rsi + p))?;
        }
        a.test(rsi, rsi)?;
        a.je(null)?;
        match f.fetch {
            Fetch::Word => {
                a.mov(rax, qword_ptr(rsi + f.off))?;
                a.mov(self.data(f.dest, 0), rax)?;
            }
            Fetch::Str { max } => {
                let mut short = a.create_label();
                a.mov(rcx, qword_ptr(rsi + f.off + 8))?;
                a.mov(rsi, qword_ptr(rsi + f.off))?;
                a.test(rcx, rcx)?;
                a.jle(null)?;
                a.test(rsi, rsi)?;
                a.je(null)?;
                a.mov(self.data(f.dest, 0), rcx)?;
                a.cmp(rcx, i32::from(max))?;
                a.jbe(short)?;
                a.mov(ecx, u32::from(max))?;
                a.set_label(&mut short)?;
                a.lea(rdi, qword_ptr(r12 + self.dest(f.dest, 8)))?;
                a.rep().movsb()?;
            }
        }
        a.jmp(done)?;
        a.set_label(&mut null)?;
        a.mov(self.data(f.dest, 0), 0)
    }

    /// `Traceparent: 00-<32 hex>-<16 hex>-<2 hex>` (any case for the name, one optional
    /// space) becomes the goroutine's pending context. Only bytes inside the line are read.
    fn stash(&self, a: &mut CodeAssembler, ptr: u8, len: u8, done: CodeLabel) -> Result<(), IcedError> {
        a.mov(rsi, self.reg(ptr))?;
        a.mov(rcx, self.reg(len))?;
        a.test(rsi, rsi)?;
        a.je(done)?;
        a.cmp(rcx, 12 + 55)?;
        a.jl(done)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(r8, 0x2020_2020_2020_2020u64)?;
        a.or(rax, r8)?;
        a.mov(r8, u64::from_le_bytes(*b"tracepar"))?;
        a.cmp(rax, r8)?;
        a.jne(done)?;
        a.mov(eax, dword_ptr(rsi + 7))?;
        a.or(eax, 0x2020_2020)?;
        a.cmp(eax, u32::from_le_bytes(*b"rent") as i32)?;
        a.jne(done)?;
        a.cmp(byte_ptr(rsi + 11), i32::from(b':'))?;
        a.jne(done)?;
        let mut value = a.create_label();
        a.lea(rax, qword_ptr(rsi + 12))?;
        a.sub(rcx, 12)?;
        a.cmp(byte_ptr(rax), i32::from(b' '))?;
        a.jne(value)?;
        a.inc(rax)?;
        a.dec(rcx)?;
        a.set_label(&mut value)?;
        self.stash_value(a, done)
    }

    /// RAX, RCX = a `traceparent` value and its length: when it is version 00 and well
    /// formed, it becomes the goroutine's pending context.
    fn stash_value(&self, a: &mut CodeAssembler, done: CodeLabel) -> Result<(), IcedError> {
        a.test(rax, rax)?;
        a.je(done)?;
        a.cmp(rcx, 55)?;
        a.jl(done)?;
        a.cmp(word_ptr(rax), i32::from(u16::from_le_bytes(*b"00")))?;
        a.jne(done)?;
        for at in [2, 35, 52] {
            a.cmp(byte_ptr(rax + at), i32::from(b'-'))?;
            a.jne(done)?;
        }
        a.mov(rsi, rax)?;
        self.goid(a)?;
        self.place(a, Table::Goroutines, None)?;
        a.mov(qword_ptr(rdi + ctx::KEY as i32), r11)?;
        a.mov(qword_ptr(rdi + ctx::STATE as i32), CtxState::Pending as i32)?;
        self.copy(a, (rsi, 3), (rdi, ctx::TRACE as i32), 32)?;
        self.copy(a, (rsi, 36), (rdi, ctx::SPAN as i32), 16)
    }
}

/// `out` = the first entry of the request table set for `key` (a header map or frame
/// address; allocator-aligned, so a multiplicative hash spreads them). The one definition
/// the ops and the guard share. Clobbers `scratch`.
fn request_set(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    out: AsmRegister64,
    scratch: AsmRegister64,
    key: AsmRegister64,
) -> Result<(), IcedError> {
    let sets = ctx::REQUESTS / ctx::WAYS;
    a.mov(out, 0x9e37_79b9_7f4a_7c15u64)?;
    a.imul_2(out, key)?;
    a.shr(out, 64 - sets.trailing_zeros())?;
    a.shl(out, (ctx::ENTRY * ctx::WAYS).trailing_zeros())?;
    a.mov(scratch, ring.base + ring.layout.ctx_offset() as u64 + (ctx::GOROUTINES * ctx::ENTRY) as u64)?;
    a.add(out, scratch)
}

/// Jumps to `skip` unless the guard holds. Reads only: R12 and R13 are its scratch.
fn emit_guard(a: &mut CodeAssembler, ring: &RingAddrs, g: &Guard, skip: CodeLabel) -> Result<(), IcedError> {
    const REGS: [AsmRegister64; 9] = [rax, rbx, rcx, rdi, rsi, r8, r9, r10, r11];
    match g {
        Guard::FirstByte { ptr, len, first } => {
            let mut pass = a.create_label();
            let (p, n) = (REGS[*ptr as usize], REGS[*len as usize]);
            a.test(n, n)?;
            a.jle(skip)?;
            a.test(p, p)?;
            a.je(skip)?;
            a.movzx(r13d, byte_ptr(p))?;
            a.or(r13d, 0x20)?;
            for b in first {
                a.cmp(r13d, i32::from(*b))?;
                a.je(pass)?;
            }
            a.jmp(skip)?;
            a.set_label(&mut pass)?;
        }
        Guard::InRequests { key } => {
            let mut pass = a.create_label();
            let k = REGS[*key as usize];
            a.test(k, k)?;
            a.je(skip)?;
            request_set(a, ring, r13, r12, k)?;
            for way in 0..ctx::WAYS {
                a.cmp(qword_ptr(r13 + (way * ctx::ENTRY + ctx::KEY) as i32), k)?;
                a.je(pass)?;
            }
            a.jmp(skip)?;
            a.set_label(&mut pass)?;
        }
    }
    Ok(())
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
