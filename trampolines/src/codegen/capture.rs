//! The part of every trampoline that writes a record: pick the writer's sub-ring, win a
//! slot (or drop, or wait in lossless mode), fill in the fixed fields and the plan's values,
//! publish.

use super::ops::{Ops, emit_guard};
use super::*;

/// Attempts to win a slot before giving up and counting a drop. With one sub-ring per
/// CPU, a lost race needs a thread preempted or migrated mid-attempt, so a few suffice;
/// each unrolled attempt costs ~50 bytes of trampoline.
pub(super) const ATTEMPTS: usize = 4;

/// R13 = the writer's sub-ring (clobbers only R13).
pub(super) fn emit_ring_select(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    rings_const: CodeLabel,
) -> Result<(), IcedError> {
    let l = &ring.layout;
    match ring.select {
        RingSelect::ByP { g_m, m_p, p_id } => {
            // g.m is never nil for a running goroutine, m.p is nil for a thread without a
            // P (sysmon, signal handlers); both are checked, and a missing P uses ring 0.
            let mut no_p = a.create_label();
            let mut have = a.create_label();
            emit_p_id(a, (g_m, m_p, p_id), no_p)?;
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
pub(super) fn emit_capture(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    site: u32,
    kind: Kind,
    plan: &CapturePlan,
) -> Result<(), IcedError> {
    if let Some(probe) = &plan.stats {
        return super::stats::emit_stats(a, ring, site, kind, probe);
    }
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
