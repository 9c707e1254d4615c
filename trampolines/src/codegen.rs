//! Trampoline code. Rules (DESIGN.md): no stack at all, every register preserved but R12,
//! R13 and the flags, DF untouched, X15 untouched, never block (a full or contended ring
//! drops the record and counts it), never fault (only ring memory and `[R14+goid]` are
//! dereferenced; R14 is the current g at every ABIInternal entry and return).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, IcedError, Instruction, MemoryOperand, Register};
use ring_abi::{Kind, header, slot};

use crate::site::{EntryPatch, ReturnPatch};

#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    #[error("cannot encode trampoline at {at:#x}: {reason}")]
    Encode { at: u64, reason: String },
    #[error("ring at {ring:#x} is out of RIP-relative reach of trampoline at {at:#x}")]
    Reach { ring: u64, at: u64 },
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
    fn first_ring(&self) -> u64 {
        self.base + self.layout.ring_offset(0) as u64
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
        CapturePlan { ints: 0x1ff, floats: 0xff, copies: Vec::new() }
    }

    /// Bytes of slot data area the copies need.
    pub fn data_len(&self) -> usize {
        self.copies.iter().map(|c| c.dest as usize + c.max as usize).max().unwrap_or(0)
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
    a.movq(xmm15, rax)?;
    // R13 = this writer's sub-ring.
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
    for attempt in 0..ATTEMPTS {
        let mut next = a.create_label();
        a.mov(rax, qword_ptr(r13 + ring_abi::ring::HEAD as i32))?;
        a.mov(r12, rax)?;
        a.and(r12, mask)?;
        a.shl(r12, shift)?;
        a.cmp(qword_ptr(r13 + r12 + slot_field(slot::SEQ)), rax)?;
        a.jne(if attempt + 1 == ATTEMPTS { last_seq_fail } else { next })?;
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
    a.set_label(&mut contended)?;
    a.lock().inc(qword_ptr(r13 + ring_abi::ring::CONTENDED as i32))?;
    a.movq(rax, xmm15)?;
    a.pxor(xmm15, xmm15)?;
    a.jmp(done)?;
    a.set_label(&mut last_seq_fail)?;
    a.cmp(qword_ptr(r13 + r12 + slot_field(slot::SEQ)), rax)?;
    a.ja(contended)?;
    a.lock().inc(qword_ptr(r13 + ring_abi::ring::DROPPED as i32))?;
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
    // Copies use RCX, RSI and RDI, restored from the slot afterwards: store all nine.
    let int_mask = if plan.copies.is_empty() { plan.ints } else { 0x1ff };
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
    if !plan.copies.is_empty() {
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
    assemble(at, ring, |a| {
        if patch.stack_check {
            // The original check first: when it fails it branches to the function's own
            // morestack block, which grows the stack and jumps back to the entry.
            for i in &patch.stolen {
                a.add_instruction(*i)?;
            }
            emit_capture(a, ring, site, Kind::Entry, entry_plan)?;
        } else {
            emit_capture(a, ring, site, Kind::Entry, entry_plan)?;
            for i in &patch.stolen {
                a.add_instruction(*i)?;
            }
            if patch.whole_body {
                emit_capture(a, ring, site, Kind::Return, return_plan)?;
            }
        }
        // Back to the instruction after the last relocated one (the RET of a whole body).
        a.jmp(patch.stolen.last().map_or(patch.redirect.at(), |i| i.next_ip()))
    })
}

/// The return trampoline for `patch`: re-executes the epilogue instructions it replaced,
/// records the results, and jumps to the RET.
pub fn return_trampoline(
    patch: &ReturnPatch,
    site: u32,
    plan: &CapturePlan,
    ring: &RingAddrs,
    at: u64,
) -> Result<Trampoline, CodegenError> {
    assemble(at, ring, |a| {
        for i in &patch.insns {
            a.add_instruction(*i)?;
        }
        emit_capture(a, ring, site, Kind::Return, plan)?;
        a.jmp(patch.ret)
    })
}
