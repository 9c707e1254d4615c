//! Stats mode (`ring_abi::stats`): instead of a record, an entry counts the call and leaves
//! its time stamp in the frame table; a return takes it back and adds the latency to the
//! histogram, and counts an `error` result other than nil. Counters live in a block of the
//! thread's P, written with plain instructions: nothing is contended, no slot is taken, no
//! record is written, so the numbers are exact at any call rate and whatever the ring does.
//!
//! Registers: R12 and R13 are free; RAX, RCX and RDX (RDTSC's outputs, and scratch) are
//! parked in the block's spill words, which only the thread holding the P uses (see
//! `ring_abi::stats` for why no other thread can while the trampoline runs).

use ring_abi::stats as st;

use super::*;

/// What a stats-mode probe does at its point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsProbe {
    /// At an entry: leave the time for a probed return (false for an entry-only function).
    pub timed: bool,
    /// At a return: where the first word (the itab) of the `error` result is; not zero
    /// counts an error.
    pub error: Option<ErrorAt>,
}

/// Where a result's word is at the RET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAt {
    /// An integer result register (ABI index).
    Reg(u8),
    /// `[SP + offset]` (a stack-assigned result).
    Stack(i32),
}

const REGS: [AsmRegister64; 9] = [rax, rbx, rcx, rdi, rsi, r8, r9, r10, r11];
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Refuses a stats probe the ring has no place for.
pub(super) fn check(plan: &CapturePlan, ring: &RingAddrs, site: u32, at: u64) -> Result<(), CodegenError> {
    if plan.stats.is_none() {
        return Ok(());
    }
    let l = &ring.layout;
    if l.stats_slots == 0 || site >= l.sites {
        return Err(CodegenError::Encode { at, reason: format!("the ring has no stats block for site {site}") });
    }
    if !matches!(ring.select, RingSelect::ByP { .. }) {
        return Err(CodegenError::Encode { at, reason: "stats need the runtime's P layout".into() });
    }
    Ok(())
}

/// Emits the stats code of `site` at an entry or return (after [`check`]).
pub(super) fn emit_stats(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    site: u32,
    kind: Kind,
    probe: &StatsProbe,
) -> Result<(), IcedError> {
    let l = &ring.layout;
    let RingSelect::ByP { g_m, m_p, p_id } = ring.select else { return Ok(()) };
    let block0 = ring.base + l.stats_block_offset(site, 0) as u64;
    let missed = ring.base + l.stats_missed_offset(site) as u64;
    let mut done = a.create_label();
    // A return without a block has nothing to do: its label is `done`.
    let mut no_block = if kind == Kind::Entry { a.create_label() } else { done };
    // R12 = this P's block of the site (Go code always runs holding a P; a thread without
    // one, or a P beyond the blocks, is counted as missed).
    emit_p_id(a, (g_m, m_p, p_id), no_block)?;
    a.cmp(r13d, l.stats_slots as i32)?;
    a.jae(no_block)?;
    a.imul_3(r13, r13, st::BLOCK as i32)?;
    a.add_instruction(Instruction::with2(Code::Lea_r64_m, Register::R12, rip_mem(block0))?)?;
    a.add(r12, r13)?;
    match kind {
        Kind::Entry => entry(a, ring, site, probe, &mut done)?,
        Kind::Return => ret(a, ring, site, probe, &mut done)?,
    }
    if kind == Kind::Entry {
        a.set_label(&mut no_block)?;
        let mut inc = Instruction::with1(Code::Inc_rm64, rip_mem(missed))?;
        inc.set_has_lock_prefix(true);
        a.add_instruction(inc)?;
    }
    a.set_label(&mut done)
}

fn spill(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(qword_ptr(r12 + st::SPILL as i32), rax)?;
    a.mov(qword_ptr(r12 + st::SPILL as i32 + 8), rcx)?;
    a.mov(qword_ptr(r12 + st::SPILL as i32 + 16), rdx)
}

fn unspill(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(r12 + st::SPILL as i32))?;
    a.mov(rcx, qword_ptr(r12 + st::SPILL as i32 + 8))?;
    a.mov(rdx, qword_ptr(r12 + st::SPILL as i32 + 16))
}

/// RCX = the frame key (`g.stack.hi - SP`, the site above), R13 = its set. Clobbers `tmp`.
fn frame_set(a: &mut CodeAssembler, ring: &RingAddrs, site: u32, tmp: AsmRegister64) -> Result<(), IcedError> {
    a.mov(rcx, qword_ptr(r14 + ring.stack_hi_offset as i32))?;
    a.sub(rcx, rsp)?;
    a.mov(r13, rcx)?;
    a.shl(r13, 29)?;
    a.xor(r13, r14)?;
    a.mov(tmp, GOLDEN)?;
    a.imul_2(r13, tmp)?;
    a.shr(r13, 64 - st::FRAME_SETS.trailing_zeros())?;
    a.shl(r13, (st::WAYS * st::FRAME_ENTRY).trailing_zeros())?;
    a.mov(tmp, ring.base + ring.layout.stats_offset() as u64)?;
    a.add(r13, tmp)?;
    a.mov(tmp, u64::from(site) << st::FRAME_SITE_SHIFT)?;
    a.or(rcx, tmp)
}

/// Jumps to `found` with R13 = the way of the set at R13 that holds (R14, RCX).
fn find_way(a: &mut CodeAssembler, found: CodeLabel) -> Result<(), IcedError> {
    for way in 0..st::WAYS {
        let mut next = a.create_label();
        let at = (way * st::FRAME_ENTRY) as i32;
        a.cmp(qword_ptr(r13 + at + st::FRAME_G as i32), r14)?;
        a.jne(next)?;
        a.cmp(qword_ptr(r13 + at + st::FRAME_KEY as i32), rcx)?;
        a.jne(next)?;
        if at != 0 {
            a.add(r13, at)?;
        }
        a.jmp(found)?;
        a.set_label(&mut next)?;
    }
    Ok(())
}

fn entry(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    site: u32,
    probe: &StatsProbe,
    done: &mut CodeLabel,
) -> Result<(), IcedError> {
    a.inc(qword_ptr(r12 + st::CALLS as i32))?;
    if !probe.timed {
        return a.jmp(*done);
    }
    // One call in PERIOD is timed (each call, by default).
    a.dec(qword_ptr(r12 + st::SKIP as i32))?;
    a.jns(*done)?;
    let mut store = a.create_label();
    spill(a)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    adapt(a)?;
    frame_set(a, ring, site, rdx)?;
    // The frame's own entry (left by a call that never returned), else a free way, else
    // one picked by the key's bits (evicting a call, whose return then counts as untimed).
    find_way(a, store)?;
    for way in 0..st::WAYS {
        let mut next = a.create_label();
        let at = (way * st::FRAME_ENTRY) as i32;
        a.cmp(qword_ptr(r13 + at + st::FRAME_G as i32), 0)?;
        a.jne(next)?;
        if at != 0 {
            a.add(r13, at)?;
        }
        a.jmp(store)?;
        a.set_label(&mut next)?;
    }
    a.mov(edx, ecx)?;
    a.xor(edx, r14d)?;
    a.shr(edx, 3)?;
    a.and(edx, (st::WAYS - 1) as u32)?;
    a.shl(edx, st::FRAME_ENTRY.trailing_zeros())?;
    a.add(r13, rdx)?;
    a.set_label(&mut store)?;
    a.mov(qword_ptr(r13 + st::FRAME_G as i32), r14)?;
    a.mov(qword_ptr(r13 + st::FRAME_KEY as i32), rcx)?;
    a.mov(qword_ptr(r13 + st::FRAME_TSC as i32), rax)?;
    unspill(a)?;
    a.jmp(*done)
}

/// At a timed entry, RAX = now: the sampling period follows the time since the P's last
/// timed call of the site (`ring_abi::stats::MIN_GAP`): doubled when it came sooner,
/// halved when it came 8 times later, then the countdown to the next timed call is set.
/// Clobbers RCX and R13.
fn adapt(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let (mut relax, mut set) = (a.create_label(), a.create_label());
    a.mov(rcx, rax)?;
    a.sub(rcx, qword_ptr(r12 + st::LAST as i32))?;
    a.mov(qword_ptr(r12 + st::LAST as i32), rax)?;
    a.mov(r13, qword_ptr(r12 + st::PERIOD as i32))?;
    a.cmp(rcx, qword_ptr(r12 + st::MIN_GAP as i32))?;
    a.jae(relax)?;
    a.cmp(r13, st::MAX_PERIOD as i32)?;
    a.jae(set)?;
    a.lea(r13, qword_ptr(r13 + r13 + 1))?;
    a.jmp(set)?;
    a.set_label(&mut relax)?;
    a.shr(rcx, 3)?;
    a.cmp(rcx, qword_ptr(r12 + st::MIN_GAP as i32))?;
    a.jbe(set)?;
    a.shr(r13, 1)?;
    a.set_label(&mut set)?;
    a.mov(qword_ptr(r12 + st::PERIOD as i32), r13)?;
    // The next timed call is PERIOD + 1 calls on.
    a.mov(qword_ptr(r12 + st::SKIP as i32), r13)
}

fn ret(
    a: &mut CodeAssembler,
    ring: &RingAddrs,
    site: u32,
    probe: &StatsProbe,
    done: &mut CodeLabel,
) -> Result<(), IcedError> {
    let mut no_error = a.create_label();
    match probe.error {
        Some(ErrorAt::Reg(i)) => {
            let r = REGS[usize::from(i).min(8)];
            a.test(r, r)?;
            a.je(no_error)?;
            a.inc(qword_ptr(r12 + st::ERRORS as i32))?;
        }
        Some(ErrorAt::Stack(off)) => {
            a.cmp(qword_ptr(rsp + off), 0)?;
            a.je(no_error)?;
            a.inc(qword_ptr(r12 + st::ERRORS as i32))?;
        }
        None => {}
    }
    a.set_label(&mut no_error)?;
    let (mut found, mut restore) = (a.create_label(), a.create_label());
    spill(a)?;
    // An untimed call (not sampled) finds no entry and reads no clock.
    frame_set(a, ring, site, rdx)?;
    find_way(a, found)?;
    a.inc(qword_ptr(r12 + st::UNTIMED as i32))?;
    a.jmp(restore)?;
    a.set_label(&mut found)?;
    // The entry time first: once the way is free another goroutine may take it.
    a.mov(rcx, qword_ptr(r13 + st::FRAME_TSC as i32))?;
    a.mov(qword_ptr(r13 + st::FRAME_G as i32), 0)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, rcx)?;
    // A counter a little behind on another core reads as no time, not as ages.
    let (mut forward, mut no_max) = (a.create_label(), a.create_label());
    a.jns(forward)?;
    a.xor(eax, eax)?;
    a.set_label(&mut forward)?;
    a.add(qword_ptr(r12 + st::SUM as i32), rax)?;
    a.cmp(qword_ptr(r12 + st::MAX as i32), rax)?;
    a.jae(no_max)?;
    a.mov(qword_ptr(r12 + st::MAX as i32), rax)?;
    a.set_label(&mut no_max)?;
    // R13 = the bucket (`ring_abi::stats::bucket`).
    let (mut small, mut over, mut have) = (a.create_label(), a.create_label(), a.create_label());
    let sub = 1i32 << st::SUB_BITS;
    a.cmp(rax, sub)?;
    a.jb(small)?;
    a.bsr(rcx, rax)?;
    a.cmp(ecx, st::MAX_EXP as i32)?;
    a.ja(over)?;
    a.sub(ecx, st::SUB_BITS as i32)?;
    a.mov(r13, rax)?;
    a.shr(r13, cl)?;
    a.shl(ecx, st::SUB_BITS)?;
    a.add(r13, rcx)?;
    a.jmp(have)?;
    a.set_label(&mut over)?;
    a.mov(r13d, (st::BUCKETS - 1) as u32)?;
    a.jmp(have)?;
    a.set_label(&mut small)?;
    a.mov(r13, rax)?;
    a.set_label(&mut have)?;
    a.inc(qword_ptr(r12 + r13 * 8 + st::HIST as i32))?;
    a.set_label(&mut restore)?;
    unspill(a)?;
    a.jmp(*done)
}
