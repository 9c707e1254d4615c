//! Where a function may be patched, decided before anything is touched.
//!
//! A patch is one 5-byte `JMP rel32` written at an instruction boundary. Two kinds of PC
//! must stay sound for the Go runtime afterwards:
//!
//! - PCs a goroutine can resume at. Async preemption parks a goroutine at almost any
//!   instruction of user code, its resume PC on its stack. An instruction that starts
//!   inside the 5 bytes (an interior boundary) is such a PC unless the pclntab marks it
//!   unsafe for preemption (the entry stack check). Where one is possible at the jump's
//!   last byte, the jump is *punned*: its displacement's top byte is chosen equal to the
//!   original byte there, so the instruction still decodes unchanged for anyone resuming at
//!   it (this pins the trampoline to a 16 MiB window). Anything else is refused.
//! - PCs a signal can land on. Every PC of the patched code is the start of an original
//!   instruction, so the runtime's pc-value tables (unsafe points for preemption, SP deltas
//!   for tracebacks and profiling) describe it. Nothing is ever written into the INT3
//!   padding between functions: the runtime maps those PCs to the function before them,
//!   but that function's tables end with its code, and a lookup there throws.
//!
//! Never the target of a branch from elsewhere in the function either.

use std::ops::Range;

use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::decode::Function;

/// pclntab UnsafePoint values (`internal/abi`).
const UNSAFE: i32 = -2;
const RESTART_AT_ENTRY: i32 = -5;

/// Length of the jump every patch writes.
pub const JUMP_LEN: u64 = 5;

/// Why a site cannot be patched safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("function is only {len} bytes long")]
    TooShort { len: u64 },
    #[error("a branch at {from:#x} targets {to:#x}, inside the bytes a patch would overwrite")]
    BranchIntoPatch { from: u64, to: u64 },
    #[error("a loop jumps back to the entry (from {from:#x}): an entry probe would fire on every iteration")]
    LoopToEntry { from: u64 },
    #[error("the bytes to overwrite contain a {what} at {pc:#x}, which cannot be moved")]
    Unmovable { what: &'static str, pc: u64 },
    #[error(
        "a goroutine could be preempted at {pc:#x}, inside the 5 bytes an entry jump would overwrite, and the jump \
         cannot be made to leave that instruction intact"
    )]
    ResumableInterior { pc: u64 },
    #[error("exit at {pc:#x} is a jump to another function (tail call)")]
    TailCall { pc: u64 },
    #[error(
        "exit at {pc:#x}: no 5-byte jump fits in the instructions before its RET without breaking one that a \
         preempted goroutine could resume at"
    )]
    ExitUnpatchable { pc: u64 },
    #[error("a branch at {from:#x} jumps straight to the RET at {to:#x}, past the return probe")]
    BranchToRet { from: u64, to: u64 },
}

/// A `JMP rel32` at `at` to the trampoline, which re-executes the `len` bytes of whole
/// instructions that start under the jump's 5 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub at: u64,
    pub len: usize,
    /// The original byte at `at + 4`, where an instruction starts that a parked goroutine
    /// may resume at: the jump's displacement must end with it (see the module comment).
    pub pinned: Option<u8>,
}

/// Lowest and highest+1 user-space addresses a trampoline can be mapped at.
const USER: Range<u64> = 0x10000..0x7fff_ffff_f000;

impl Redirect {
    /// Where this jump's trampoline may be placed when its displacement is pinned: a
    /// 16 MiB window, None when that lies outside user space.
    pub fn pinned_window(&self) -> Option<Range<u64>> {
        let b = self.pinned?;
        let lo = i128::from(self.at + JUMP_LEN) + (i128::from(b as i8) << 24);
        let hi = lo + (1 << 24);
        let lo = lo.max(i128::from(USER.start));
        let hi = hi.min(i128::from(USER.end));
        (lo < hi).then_some(lo as u64..hi as u64)
    }

    /// The jump's bytes to a trampoline at `tramp`; None when out of reach or when the
    /// displacement breaks the pin.
    pub fn jump(&self, tramp: u64) -> Option<[u8; 5]> {
        let j = crate::jmp_rel32(self.at, tramp)?;
        match self.pinned {
            Some(b) if j[4] != b => None,
            _ => Some(j),
        }
    }
}

/// The entry patch of a function.
#[derive(Debug, Clone)]
pub struct EntryPatch {
    /// The instructions the redirect covers; the trampoline runs them relocated.
    pub stolen: Vec<Instruction>,
    pub redirect: Redirect,
    /// The stolen bytes are the function's stack check: capture after it passes, so a
    /// call that grows the stack (and re-enters through morestack) is recorded once.
    pub stack_check: bool,
    /// `stolen` is the whole body of a straight-line leaf, its RET last: the trampoline
    /// records the return too, and the function needs no return patches.
    pub whole_body: bool,
}

/// A return patch: the jump covers the last instructions before a RET; the trampoline
/// re-executes them (`ADDQ $n, SP; POPQ BP` in go1.21+ epilogues), records the results with
/// the stack pointer the function returns with, and returns itself (the jump may cover
/// the RET).
#[derive(Debug, Clone)]
pub struct ReturnPatch {
    /// The relocated instructions, the RET last.
    pub insns: Vec<Instruction>,
    pub redirect: Redirect,
}

impl ReturnPatch {
    pub fn ret(&self) -> u64 {
        self.insns.last().map_or(self.redirect.at, Instruction::ip)
    }
}

fn is_mem_r14_16(i: &Instruction, op: u32) -> bool {
    i.op_kind(op) == OpKind::Memory
        && i.memory_base() == Register::R14
        && i.memory_index() == Register::None
        && i.memory_displacement64() == 16
}

/// Length of Go's stack-check sequence at the start of `insns`, if it is there:
/// `CMPQ SP, 16(R14); JLS`, or `LEAQ -x(SP), R12; CMPQ R12, 16(R14); JLS`, or
/// `MOVQ SP, R12; SUBQ $x, R12; JCS; CMPQ R12, 16(R14); JLS`.
fn stack_check_len(insns: &[Instruction]) -> Option<usize> {
    let is_cmp = |i: &Instruction, reg| {
        i.mnemonic() == Mnemonic::Cmp
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == reg
            && is_mem_r14_16(i, 1)
    };
    let is_jbe = |i: &Instruction| matches!(i.code(), Code::Jbe_rel8_64 | Code::Jbe_rel32_64);
    let at = |n: usize| insns.get(n);
    let i0 = at(0)?;
    if is_cmp(i0, Register::RSP) && at(1).is_some_and(is_jbe) {
        return Some(2);
    }
    let r12_from_rsp = |i: &Instruction| {
        i.op0_kind() == OpKind::Register
            && i.op0_register() == Register::R12
            && ((i.mnemonic() == Mnemonic::Lea && i.memory_base() == Register::RSP)
                || (i.mnemonic() == Mnemonic::Mov
                    && i.op1_kind() == OpKind::Register
                    && i.op1_register() == Register::RSP))
    };
    if i0.mnemonic() == Mnemonic::Lea
        && r12_from_rsp(i0)
        && at(1).is_some_and(|i| is_cmp(i, Register::R12))
        && at(2).is_some_and(is_jbe)
    {
        return Some(3);
    }
    if i0.mnemonic() == Mnemonic::Mov
        && r12_from_rsp(i0)
        && at(1).is_some_and(|i| i.mnemonic() == Mnemonic::Sub && i.op0_register() == Register::R12)
        && at(2).is_some_and(|i| matches!(i.code(), Code::Jb_rel8_64 | Code::Jb_rel32_64))
        && at(3).is_some_and(|i| is_cmp(i, Register::R12))
        && at(4).is_some_and(is_jbe)
    {
        return Some(5);
    }
    None
}

fn unmovable(i: &Instruction) -> Option<&'static str> {
    match i.flow_control() {
        FlowControl::Call | FlowControl::IndirectCall => Some("call"),
        FlowControl::Return => Some("return"),
        FlowControl::Interrupt => Some("interrupt or syscall"),
        FlowControl::IndirectBranch => Some("indirect jump"),
        FlowControl::UnconditionalBranch => Some("jump"),
        FlowControl::Exception => Some("trap instruction"),
        _ if i.mnemonic() == Mnemonic::Syscall => Some("syscall"),
        _ => None,
    }
}

fn branch_into(f: &Function, range: Range<u64>) -> Option<(u64, u64)> {
    let interior = range.start + 1..range.end;
    f.branch_targets.range(interior).next().map(|&to| {
        let from = f.insns.iter().find(|i| i.near_branch_target() == to && i.flow_control() != FlowControl::Call);
        (from.map_or(0, |i| i.ip()), to)
    })
}

/// The jump at instruction `first`: the instructions it covers (those starting under its
/// 5 bytes), or the first interior boundary that would be broken. `resumable(pc)`: a
/// goroutine may resume at this instruction start. The jump may overlap padding, which is
/// never executed, but not run past it.
fn jump_at(f: &Function, first: usize, resumable: impl Fn(u64) -> bool) -> Result<(Redirect, usize), u64> {
    let at = f.insns[first].ip();
    let end = at + JUMP_LEN;
    if end > f.padding.end {
        return Err(at);
    }
    let n = f.insns[first..].iter().take_while(|i| i.ip() < end).count();
    let len = (f.insns[first + n - 1].next_ip() - at) as usize;
    let pinned = match f.insns[first + 1..first + n].iter().find(|i| resumable(i.ip())) {
        None => None,
        Some(i) if i.ip() == at + 4 => Some(f.byte_at(i.ip()).ok_or(i.ip())?),
        Some(i) => return Err(i.ip()),
    };
    let r = Redirect { at, len, pinned };
    if pinned.is_some() && r.pinned_window().is_none() {
        return Err(at + 4);
    }
    Ok((r, n))
}

fn resumable(unsafe_point: impl Fn(u64) -> i32) -> impl Fn(u64) -> bool {
    move |pc| !matches!(unsafe_point(pc), UNSAFE | RESTART_AT_ENTRY)
}

/// Decides the entry patch. `unsafe_point(pc)` is the pclntab UnsafePoint value at `pc`
/// (UNSAFE everywhere for a function the runtime never preempts asynchronously).
///
/// Only the bytes the jump overwrites must be free of resumable interior boundaries;
/// the trampoline may relocate more (the rest of the stack check) while the originals stay
/// intact for anyone resuming there.
pub fn entry_patch(f: &Function, unsafe_point: impl Fn(u64) -> i32) -> Result<EntryPatch, Refusal> {
    if f.insns.is_empty() {
        return Err(Refusal::TooShort { len: f.code_end - f.entry });
    }
    let check = stack_check_len(&f.insns);
    // A loop back to the entry would fire the probe on every iteration; morestack's
    // jump back to the entry is the exception, handled by capturing after the check.
    if check.is_none()
        && let Some(from) = f
            .insns
            .iter()
            .find(|i| i.flow_control() != FlowControl::Call && i.near_branch_target() == f.entry && i.ip() != f.entry)
    {
        return Err(Refusal::LoopToEntry { from: from.ip() });
    }
    let movable = |insns: &[Instruction]| -> Result<(), Refusal> {
        match insns.iter().find_map(|i| unmovable(i).map(|w| (i, w))) {
            Some((i, what)) => Err(Refusal::Unmovable { what, pc: i.ip() }),
            None => Ok(()),
        }
    };

    let (redirect, n) = match jump_at(f, 0, resumable(&unsafe_point)) {
        Ok(j) => j,
        Err(pc) if pc == f.entry => return Err(Refusal::TooShort { len: f.padding.end - f.entry }),
        Err(pc) => return Err(Refusal::ResumableInterior { pc }),
    };
    if let Some((from, to)) = branch_into(f, f.entry..f.entry + redirect.len as u64) {
        return Err(Refusal::BranchIntoPatch { from, to });
    }

    // A straight-line leaf (no branches, one RET): the trampoline runs the whole body and
    // records both entry and return.
    if check.is_none()
        && f.branch_targets.is_empty()
        && f.insns.len() <= 32
        && let Some(last) = f.insns.last()
        && last.mnemonic() == Mnemonic::Ret
        && f.insns[..f.insns.len() - 1].iter().all(|i| unmovable(i).is_none() && i.flow_control() == FlowControl::Next)
    {
        // The trampoline executes the RET too: the jump may cover it.
        return Ok(EntryPatch { stolen: f.insns.clone(), redirect, stack_check: false, whole_body: true });
    }

    let relocate = check.map_or(n, |c| c.max(n));
    let stolen = f.insns[..relocate].to_vec();
    movable(&stolen)?;
    Ok(EntryPatch { stolen, redirect, stack_check: check.is_some(), whole_body: false })
}

/// Decides a patch for every exit, or the reason the function must be entry-only.
/// `unsafe_point` as for [`entry_patch`].
///
/// Each exit's jump goes over the last few straight-line instructions before its RET;
/// the trampoline re-executes them (`ADDQ $n, SP; POPQ BP` in go1.21+ epilogues), so the
/// record is taken with the stack pointer the function returns with.
pub fn return_patches(f: &Function, unsafe_point: impl Fn(u64) -> i32) -> Result<Vec<ReturnPatch>, Refusal> {
    if let Some(j) = f.tail_jumps().next() {
        return Err(Refusal::TailCall { pc: j.ip() });
    }
    let resumable = resumable(unsafe_point);
    let mut out = Vec::new();
    for (idx, ret) in f.rets() {
        let ret_pc = ret.ip();
        // The RET itself when padding follows it; else walk back from the RET over at most
        // four straight-line instructions, none after the jump's start a branch target (a
        // jump there would skip the probe), and none past the RET under the jump. An
        // unpinned jump is preferred.
        let mut chosen: Option<(usize, Redirect)> = None;
        for back in 0..=4 {
            let Some(first) = idx.checked_sub(back) else { break };
            if back > 0 && (unmovable(&f.insns[first]).is_some() || f.branch_targets.contains(&f.insns[first + 1].ip()))
            {
                break;
            }
            let Ok((mut r, n)) = jump_at(f, first, &resumable) else { continue };
            if first + n > idx + 1 {
                // Past the RET only by the first byte of the next instruction (an exit
                // block too short for a jump, with more code after it): that byte is kept
                // by pinning it, so the instruction decodes as before for whoever branches
                // or resumes there; the trampoline runs up to the RET.
                let Some(next) = f.insns.get(idx + 1) else { continue };
                if first + n != idx + 2 || next.ip() != r.at + JUMP_LEN - 1 {
                    continue;
                }
                let Some(b) = f.byte_at(next.ip()) else { continue };
                r.pinned = Some(b);
                if r.pinned_window().is_none() {
                    continue;
                }
            }
            if chosen.is_none() || r.pinned.is_none() {
                chosen = Some((first, r));
            }
            if r.pinned.is_none() {
                break;
            }
        }
        let Some((first, redirect)) = chosen else {
            if let Some(from) =
                f.insns.iter().find(|i| i.near_branch_target() == ret_pc && i.flow_control() != FlowControl::Call)
            {
                return Err(Refusal::BranchToRet { from: from.ip(), to: ret_pc });
            }
            return Err(Refusal::ExitUnpatchable { pc: ret_pc });
        };
        out.push(ReturnPatch { insns: f.insns[first..=idx].to_vec(), redirect });
    }
    if out.is_empty() {
        // No RET at all: a function that never returns (it panics or loops forever).
        return Err(Refusal::ExitUnpatchable { pc: f.entry });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::*;

    const AT: u64 = 0x40_1000;

    /// Assembles `body` at `AT`, then INT3 padding up to 32 bytes.
    fn func(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Function {
        let mut a = CodeAssembler::new(64).unwrap();
        body(&mut a).unwrap();
        let mut code = a.assemble(AT).unwrap();
        let code_end = AT + code.len() as u64;
        code.resize(code.len().next_multiple_of(32), 0xcc);
        Function::decode(&code, AT, Some(code_end)).unwrap()
    }

    /// A preemptible function: only its first instruction is unsafe.
    fn preemptible(pc: u64) -> i32 {
        if pc == AT { UNSAFE } else { -1 }
    }

    #[test]
    fn go_epilogue_exit_is_punned_on_pop_bp() {
        // Go 1.21+: CMPQ SP, 16(R14); JLS; PUSHQ BP; MOVQ SP, BP; SUBQ; ...; ADDQ $0x18, SP; POPQ BP; RET
        let f = func(|a| {
            let mut more = a.create_label();
            a.cmp(rsp, qword_ptr(r14 + 16))?;
            a.jbe(more)?;
            a.push(rbp)?;
            a.mov(rbp, rsp)?;
            a.sub(rsp, 0x18)?;
            a.call(0x40_2000u64)?;
            a.add(rsp, 0x18)?;
            a.pop(rbp)?;
            a.ret()?;
            a.set_label(&mut more)?;
            a.int3()
        });
        // The stack check is unsafe for preemption: its interior needs no pin.
        let e = entry_patch(&f, |pc| if pc < AT + 6 { UNSAFE } else { -1 }).unwrap();
        assert_eq!((e.redirect.at, e.redirect.len, e.redirect.pinned), (AT, 6, None));
        let rets = return_patches(&f, preemptible).unwrap();
        assert_eq!(rets.len(), 1);
        let r = rets[0].redirect;
        // ADDQ (4 bytes) then POPQ BP (0x5d) under the jump's last byte.
        assert_eq!((r.len, r.pinned), (5, Some(0x5d)));
        assert_eq!(rets[0].insns.len(), 3, "ADDQ, POPQ, RET relocated");
        let w = r.pinned_window().unwrap();
        assert_eq!(w.start, r.at + 5 + 0x5d00_0000);
        assert_eq!(w.end - w.start, 1 << 24);
        // Only a trampoline in the window gives a jump, and its last byte is the POPQ.
        assert_eq!(r.jump(w.start).unwrap()[4], 0x5d);
        assert_eq!(r.jump(w.end - 1).unwrap()[4], 0x5d);
        assert!(r.jump(w.end).is_none() && r.jump(w.start - 1).is_none() && r.jump(r.at + 0x1000).is_none());
        // A function the runtime never preempts needs no pin.
        let rets = return_patches(&f, |_| UNSAFE).unwrap();
        assert_eq!(rets[0].redirect.pinned, None);
    }

    #[test]
    fn last_ret_before_padding_takes_the_jump_itself() {
        // A leaf with a branch to its RET: the jump goes over the RET and the padding after it.
        let f = func(|a| {
            let mut out = a.create_label();
            a.test(rax, rax)?;
            a.je(out)?;
            a.add(rax, rbx)?;
            a.set_label(&mut out)?;
            a.ret()
        });
        let rets = return_patches(&f, preemptible).unwrap();
        let r = rets[0].redirect;
        assert_eq!((r.at, r.len, r.pinned), (f.code_end - 1, 1, None));
        assert_eq!(rets[0].insns.len(), 1);
    }

    #[test]
    fn nothing_is_placed_in_padding_and_unsafe_interiors_are_refused() {
        // A 4-byte preemptible leaf: any jump would break the RET at +3 for a goroutine
        // parked there, and nothing may go into the padding.
        let f = func(|a| {
            a.add(rax, rbx)?;
            a.ret()
        });
        assert!(matches!(entry_patch(&f, preemptible), Err(Refusal::ResumableInterior { pc }) if pc == AT + 3));
        // Never preempted: the jump covers the body, the RET and padding, and the trampoline
        // runs all of it.
        let e = entry_patch(&f, |_| UNSAFE).unwrap();
        assert!(e.whole_body && e.redirect.pinned.is_none());
        assert_eq!(e.stolen.last().map(|i| i.mnemonic()), Some(Mnemonic::Ret));

        // `XORL AX, AX; POPQ BP; RET`: the interior POPQ at +2 cannot be pinned.
        let f = func(|a| {
            a.push(rbp)?;
            a.mov(rbp, rsp)?;
            a.call(0x40_2000u64)?;
            a.xor(eax, eax)?;
            a.pop(rbp)?;
            a.ret()?;
            a.int3()?;
            a.int3()
        });
        assert!(matches!(return_patches(&f, preemptible), Err(Refusal::ExitUnpatchable { .. })));
    }

    #[test]
    fn pins_that_point_below_user_space_are_refused() {
        // `MOVQ 8(AX), CX` (4 bytes) then RET: the pin would be 0xc3, a displacement of about
        // -1 GiB, below address zero for code at 4 MiB.
        let f = func(|a| {
            a.push(rbp)?;
            a.call(0x40_2000u64)?;
            a.mov(rcx, qword_ptr(rax + 8))?;
            a.ret()?;
            a.int3()?;
            a.int3()
        });
        let r = Redirect { at: AT, len: 5, pinned: Some(0xc3) };
        assert!(r.pinned_window().is_none());
        // Where the code is mapped high (PIE), the window below it exists.
        let high = Redirect { at: 0x5555_5555_0000, len: 5, pinned: Some(0xc3) };
        let w = high.pinned_window().unwrap();
        assert_eq!(w.start, 0x5555_5555_0005 - 0x3d00_0000);
        assert_eq!(high.jump(w.start).unwrap()[4], 0xc3);
        assert_eq!(high.jump(w.end - 1).unwrap()[4], 0xc3);
        assert!(matches!(return_patches(&f, preemptible), Err(Refusal::ExitUnpatchable { .. })));
    }
}
