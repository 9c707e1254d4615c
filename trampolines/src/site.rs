//! Where a function may be patched, decided before anything is touched.
//!
//! A patch overwrites bytes that a thread or a parked goroutine might later resume in the
//! middle of, which would execute garbage. So every patch covers either exactly one
//! instruction (no interior instruction boundary), or instructions whose interior
//! boundaries the pclntab marks unsafe for async preemption (the entry stack check), and
//! never the target of a branch from elsewhere in the function.

use std::ops::Range;

use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::decode::Function;

/// pclntab UnsafePoint values (`internal/abi`).
const UNSAFE: i32 = -2;
const RESTART_AT_ENTRY: i32 = -5;

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
        "a goroutine could be preempted at {pc:#x}, inside the bytes a patch would overwrite, and there is no \
         INT3 padding within reach for a 2-byte jump"
    )]
    ResumableInterior { pc: u64 },
    #[error("exit at {pc:#x} is a jump to another function (tail call)")]
    TailCall { pc: u64 },
    #[error("exit at {pc:#x} has no patchable instruction before its RET (and no INT3 padding within reach)")]
    ExitUnpatchable { pc: u64 },
    #[error("a branch at {from:#x} jumps straight to the RET at {to:#x}, past the return probe")]
    BranchToRet { from: u64, to: u64 },
}

/// How control is redirected from the original code to a trampoline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// `JMP rel32` at `at`, over `len >= 5` bytes of whole instructions.
    Rel32 { at: u64, len: usize },
    /// `JMP rel8` at `at` over one instruction of `len` (2..=4) bytes, to a `JMP rel32`
    /// stub written into the function's INT3 padding at `stub`.
    Rel8Stub { at: u64, len: usize, stub: u64 },
}

impl Redirect {
    pub fn at(&self) -> u64 {
        match *self {
            Redirect::Rel32 { at, .. } | Redirect::Rel8Stub { at, .. } => at,
        }
    }
    /// Bytes of original instructions the redirect replaces (the trampoline re-executes them).
    pub fn len(&self) -> usize {
        match *self {
            Redirect::Rel32 { len, .. } | Redirect::Rel8Stub { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `(address, length)` pieces a patch overwrites, for saving and restoring the
    /// originals.
    pub fn written(&self) -> Vec<(u64, usize)> {
        match *self {
            Redirect::Rel32 { at, .. } => vec![(at, 5)],
            Redirect::Rel8Stub { at, stub, .. } => vec![(at, 2), (stub, 5)],
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
    /// `stolen` is the whole body of a straight-line leaf up to its RET: the trampoline
    /// records the return too, and the function needs no return patches.
    pub whole_body: bool,
}

/// A return patch: one epilogue instruction is overwritten; the trampoline re-executes it
/// and the instructions after it up to the RET (`POPQ BP` in go1.21+ epilogues), so the
/// record is taken with the stack pointer the function returns with.
#[derive(Debug, Clone)]
pub struct ReturnPatch {
    pub insns: Vec<Instruction>,
    pub ret: u64,
    pub redirect: Redirect,
}

/// Hands out 5-byte stubs from a function's INT3 padding.
#[derive(Debug, Clone)]
pub struct Padding {
    free: Range<u64>,
}

impl Padding {
    pub fn new(f: &Function) -> Self {
        Padding { free: f.padding.clone() }
    }

    /// A 5-byte stub reachable by a `JMP rel8` placed at `from`.
    fn take_within_rel8(&mut self, from: u64) -> Option<u64> {
        let stub = self.free.start;
        if self.free.end - self.free.start < 5 {
            return None;
        }
        crate::jmp_rel8(from, stub)?;
        self.free.start += 5;
        Some(stub)
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

/// Decides the entry patch. `unsafe_point(pc)` is the pclntab UnsafePoint value at `pc`.
///
/// Only the bytes the redirect overwrites must be free of resumable interior boundaries;
/// the trampoline may relocate more (the rest of the stack check) while the originals stay
/// intact for anyone resuming there.
pub fn entry_patch(
    f: &Function,
    padding: &mut Padding,
    unsafe_point: impl Fn(u64) -> i32,
) -> Result<EntryPatch, Refusal> {
    let first = f.insns.first().ok_or(Refusal::TooShort { len: f.code_end - f.entry })?;
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

    // What to overwrite: whole instructions covering 5 bytes, or one instruction of 2+
    // bytes with a stub in the padding.
    let mut n = 0;
    let mut len = 0;
    while len < 5 && n < f.insns.len() {
        len += f.insns[n].len();
        n += 1;
    }
    let interior_ok =
        |k: usize| f.insns[1..k].iter().all(|i| matches!(unsafe_point(i.ip()), UNSAFE | RESTART_AT_ENTRY));
    let redirect = if len >= 5 && interior_ok(n) {
        if let Some((from, to)) = branch_into(f, f.entry..f.entry + len as u64) {
            return Err(Refusal::BranchIntoPatch { from, to });
        }
        Redirect::Rel32 { at: f.entry, len }
    } else if first.len() >= 2
        && let Some(stub) = padding.take_within_rel8(f.entry)
    {
        n = 1;
        Redirect::Rel8Stub { at: f.entry, len: first.len(), stub }
    } else if len < 5 {
        return Err(Refusal::TooShort { len: len as u64 });
    } else {
        return Err(Refusal::ResumableInterior {
            pc: f.insns[1..n].iter().find(|i| unsafe_point(i.ip()) != UNSAFE).map_or(f.entry, |i| i.ip()),
        });
    };

    // A straight-line leaf (no branches, one RET): the trampoline runs the whole body and
    // records both entry and return.
    if check.is_none()
        && f.branch_targets.is_empty()
        && f.insns.len() <= 32
        && let Some(last) = f.insns.last()
        && last.mnemonic() == Mnemonic::Ret
        && f.insns[..f.insns.len() - 1].iter().all(|i| unmovable(i).is_none() && i.flow_control() == FlowControl::Next)
    {
        let body = f.insns[..f.insns.len() - 1].to_vec();
        if body.len() >= n {
            return Ok(EntryPatch { stolen: body, redirect, stack_check: false, whole_body: true });
        }
    }

    let relocate = check.map_or(n, |c| c.max(n));
    let stolen = f.insns[..relocate].to_vec();
    movable(&stolen)?;
    Ok(EntryPatch { stolen, redirect, stack_check: check.is_some(), whole_body: false })
}

/// Decides a patch for every exit, or the reason the function must be entry-only.
pub fn return_patches(f: &Function, padding: &mut Padding) -> Result<Vec<ReturnPatch>, Refusal> {
    return_patches_with(f, padding, false)
}

/// [`return_patches`]; with `never_preempted` (a function the runtime never stops
/// asynchronously, such as the runtime's own), an epilogue of several short instructions
/// (`ADDQ $n, SP; POPQ BP`) may be overwritten whole by a `JMP rel32`: no goroutine can
/// be parked between them.
pub fn return_patches_with(
    f: &Function,
    padding: &mut Padding,
    never_preempted: bool,
) -> Result<Vec<ReturnPatch>, Refusal> {
    if let Some(j) = f.tail_jumps().next() {
        return Err(Refusal::TailCall { pc: j.ip() });
    }
    let mut out = Vec::new();
    for (idx, ret) in f.rets() {
        let ret_pc = ret.ip();
        if let Some(from) =
            f.insns.iter().find(|i| i.near_branch_target() == ret_pc && i.flow_control() != FlowControl::Call)
        {
            return Err(Refusal::BranchToRet { from: from.ip(), to: ret_pc });
        }
        // Walk back from the RET over at most three straight-line instructions to one of
        // two bytes or more; none after it may be a branch target (a jump there would
        // skip the probe).
        let mut chosen = None;
        for back in 1..=3 {
            let Some(i) = idx.checked_sub(back).map(|p| f.insns[p]) else { break };
            if unmovable(&i).is_some() {
                break;
            }
            if i.len() >= 2 {
                chosen = Some(idx - back);
                break;
            }
            if f.branch_targets.contains(&i.ip()) {
                break;
            }
        }
        let Some(first) = chosen else {
            return Err(Refusal::ExitUnpatchable { pc: ret_pc });
        };
        let prev = f.insns[first];
        let redirect = if prev.len() >= 5 {
            Redirect::Rel32 { at: prev.ip(), len: prev.len() }
        } else if let Some(stub) = padding.take_within_rel8(prev.ip()) {
            Redirect::Rel8Stub { at: prev.ip(), len: prev.len(), stub }
        } else if never_preempted && ret_pc - prev.ip() >= 5 {
            Redirect::Rel32 { at: prev.ip(), len: (ret_pc - prev.ip()) as usize }
        } else {
            return Err(Refusal::ExitUnpatchable { pc: ret_pc });
        };
        let insns = f.insns[first..idx].to_vec();
        out.push(ReturnPatch { insns, ret: ret_pc, redirect });
    }
    if out.is_empty() {
        // No RET at all: a function that never returns (it panics or loops forever).
        return Err(Refusal::ExitUnpatchable { pc: f.entry });
    }
    Ok(out)
}
