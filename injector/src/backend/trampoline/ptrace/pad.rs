//! The landing pad an injected syscall runs from, so that losing inject at any moment of it
//! (`kill -9`, the OOM killer) leaves the thread where it was.
//!
//! A hijacked thread has our registers: RIP at the `syscall`, RAX the number, the arguments
//! in RDI..R9. Should inject die while it has them, the kernel detaches the thread and lets it
//! run with whatever it holds. So the `syscall` sits at the start of a pad that, once the call
//! returns, loads every register the thread had (with the kernel's restart of an interrupted
//! system call applied: [`resume_regs`]) and jumps back: a dead tracer's thread finishes
//! our system call and carries on as if it had never been stopped. Nothing is read from
//! memory and nothing is pushed: the values are immediates, the flags are rebuilt with
//! `add`/`sahf`/`cld|std`, so the pad runs on any stack, even one with no room left.
//!
//! With inject alive the pad's tail never runs: the syscall is run with `PTRACE_SYSCALL`,
//! inject reads the result at the syscall-exit stop and sets the registers itself.

use libc::user_regs_struct;

/// Bytes a pad occupies: the `syscall`, 16 `movabs`, the flags, an indirect jump and its
/// target.
pub const PAD_LEN: usize = 2 + 16 * 10 + 8 + 6 + 8;

/// Linux's "restart me" results of an interrupted system call.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

const FLAG_CF_PF_AF_ZF_SF: u64 = 0xd5;
const FLAG_DF: u64 = 1 << 10;
const FLAG_OF: u64 = 1 << 11;

/// The registers a thread resumes with after an injected syscall. A thread that was stopped
/// on its way out of an interrupted system call (RAX a restart code, `orig_rax` its number)
/// would have had the kernel restart that call when it resumed; the stop it is left in after
/// ours (syscall-exit) no longer does that, so the restart is applied here, as the kernel
/// does when no handler runs: back over the `syscall` instruction with the number in RAX.
pub fn resume_regs(saved: &user_regs_struct) -> user_regs_struct {
    let mut r = *saved;
    if (saved.orig_rax as i64) >= 0 {
        let restart = match saved.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => Some(saved.orig_rax),
            ERESTART_RESTARTBLOCK => Some(libc::SYS_restart_syscall as u64),
            _ => None,
        };
        if let Some(nr) = restart {
            r.rax = nr;
            r.rip = saved.rip.wrapping_sub(2);
            r.orig_rax = u64::MAX;
        }
    }
    r
}

/// Machine code of a pad that resumes with `resume` (see the module docs). Position
/// independent: it can be written anywhere executable.
pub fn landing_pad(resume: &user_regs_struct) -> Vec<u8> {
    let mut c = Vec::with_capacity(PAD_LEN);
    c.extend_from_slice(&[0x0f, 0x05]); // syscall
    // Every register but RAX, which the flags need as scratch (x86 numbering).
    let r = resume;
    let regs = [
        (1, r.rcx),
        (2, r.rdx),
        (3, r.rbx),
        (4, r.rsp),
        (5, r.rbp),
        (6, r.rsi),
        (7, r.rdi),
        (8, r.r8),
        (9, r.r9),
        (10, r.r10),
        (11, r.r11),
        (12, r.r12),
        (13, r.r13),
        (14, r.r14),
        (15, r.r15),
    ];
    for (n, v) in regs {
        movabs(&mut c, n, v);
    }
    // OF from an add of 1 to 0x7f (overflows) or to 0 (does not); SF ZF AF PF CF from AH.
    let of = if r.eflags & FLAG_OF != 0 { 0x7f } else { 0 };
    c.extend_from_slice(&[0xb0, of, 0x04, 0x01]); // mov al, of; add al, 1
    c.extend_from_slice(&[0xb4, ((r.eflags & FLAG_CF_PF_AF_ZF_SF) | 2) as u8, 0x9e]); // mov ah, flags; sahf
    c.push(if r.eflags & FLAG_DF != 0 { 0xfd } else { 0xfc }); // std / cld
    movabs(&mut c, 0, r.rax); // mov leaves the flags alone
    c.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp [rip+0]
    c.extend_from_slice(&r.rip.to_le_bytes());
    debug_assert_eq!(c.len(), PAD_LEN);
    c
}

/// `movabs r, imm64` for register number `n`.
fn movabs(c: &mut Vec<u8>, n: u8, v: u64) {
    c.push(0x48 | (n >> 3));
    c.push(0xb8 + (n & 7));
    c.extend_from_slice(&v.to_le_bytes());
}

/// Whether `bytes` are a pad an inject wrote (and a dead one may have left behind): the
/// skeleton with any values in it.
pub fn is_landing_pad(bytes: &[u8]) -> bool {
    if bytes.len() < PAD_LEN || bytes[..2] != [0x0f, 0x05] {
        return false;
    }
    let movabs_ok = |at: usize, n: u8| bytes[at] == 0x48 | (n >> 3) && bytes[at + 1] == 0xb8 + (n & 7);
    let regs_ok = (1..16u8).all(|n| movabs_ok(2 + (n as usize - 1) * 10, n));
    let f = 2 + 15 * 10;
    regs_ok
        && bytes[f] == 0xb0
        && bytes[f + 2..f + 5] == [0x04, 0x01, 0xb4]
        && bytes[f + 6] == 0x9e
        && matches!(bytes[f + 7], 0xfc | 0xfd)
        && movabs_ok(f + 8, 0)
        && bytes[f + 18..f + 24] == [0xff, 0x25, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use trampolines::iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    fn regs() -> user_regs_struct {
        // SAFETY: user_regs_struct is plain integers.
        let mut r: user_regs_struct = unsafe { std::mem::zeroed() };
        let vals = [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp, &mut r.rsp, &mut r.r8,
            &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14, &mut r.r15,
        ];
        for (i, v) in vals.into_iter().enumerate() {
            *v = 0x0111_0000_0000_0000u64.wrapping_mul(i as u64 + 1) + i as u64;
        }
        r.rip = 0x4a_5b6c;
        r.eflags = 0x246;
        r.orig_rax = u64::MAX;
        r
    }

    /// Decodes the pad and checks every register gets its value, then the jump.
    #[test]
    fn pad_restores_every_register_and_jumps_back() {
        for eflags in [0x202, 0x246, 0x2d7 | FLAG_OF, 0x202 | FLAG_DF | FLAG_OF] {
            let mut r = regs();
            r.eflags = eflags;
            let code = landing_pad(&r);
            assert_eq!(code.len(), PAD_LEN);
            assert!(is_landing_pad(&code));
            let mut d = Decoder::with_ip(64, &code[..PAD_LEN - 8], 0x1000, DecoderOptions::NONE);
            let ins: Vec<_> = d.iter().collect();
            assert_eq!(ins[0].mnemonic(), Mnemonic::Syscall);
            let mut seen = std::collections::BTreeMap::new();
            for i in &ins {
                if i.mnemonic() == Mnemonic::Mov && i.op1_kind() == OpKind::Immediate64 {
                    seen.insert(format!("{:?}", i.op0_register()), i.immediate64());
                }
            }
            let want = [
                (Register::RAX, r.rax),
                (Register::RBX, r.rbx),
                (Register::RCX, r.rcx),
                (Register::RDX, r.rdx),
                (Register::RSI, r.rsi),
                (Register::RDI, r.rdi),
                (Register::RBP, r.rbp),
                (Register::RSP, r.rsp),
                (Register::R8, r.r8),
                (Register::R9, r.r9),
                (Register::R10, r.r10),
                (Register::R11, r.r11),
                (Register::R12, r.r12),
                (Register::R13, r.r13),
                (Register::R14, r.r14),
                (Register::R15, r.r15),
            ];
            for (reg, v) in want {
                assert_eq!(seen.get(&format!("{reg:?}")), Some(&v), "{reg:?}");
            }
            // The last mov is RAX's, after everything that changes the flags.
            let last_flags = ins.iter().rposition(|i| matches!(i.mnemonic(), Mnemonic::Sahf | Mnemonic::Add)).unwrap();
            let rax = ins.iter().rposition(|i| i.op0_register() == Register::RAX && i.mnemonic() == Mnemonic::Mov);
            assert!(rax.unwrap() > last_flags);
            let jmp = ins.iter().find(|i| i.mnemonic() == Mnemonic::Jmp).unwrap();
            assert!(jmp.is_ip_rel_memory_operand());
            let at = (jmp.ip_rel_memory_address() - 0x1000) as usize;
            assert_eq!(u64::from_le_bytes(code[at..at + 8].try_into().unwrap()), r.rip);
            let df = ins.iter().any(|i| i.mnemonic() == Mnemonic::Std);
            assert_eq!(df, eflags & FLAG_DF != 0);
            // OF: 0x7f + 1 overflows, 0 + 1 does not.
            let al = ins.iter().find(|i| i.op0_register() == Register::AL && i.mnemonic() == Mnemonic::Mov).unwrap();
            assert_eq!(al.immediate8() == 0x7f, eflags & FLAG_OF != 0);
            let ah = ins.iter().find(|i| i.op0_register() == Register::AH).unwrap();
            assert_eq!(u64::from(ah.immediate8()) & FLAG_CF_PF_AF_ZF_SF, eflags & FLAG_CF_PF_AF_ZF_SF);
        }
        let mut junk = landing_pad(&regs());
        junk[2] = 0x90;
        assert!(!is_landing_pad(&junk));
        assert!(!is_landing_pad(&[0x0f, 0x05]));
    }

    #[test]
    fn interrupted_syscalls_restart() {
        let mut r = regs();
        r.rip = 0x1000;
        r.orig_rax = 202; // futex
        for (rax, nr) in [(-512i64, 202u64), (-513, 202), (-514, 202), (-516, libc::SYS_restart_syscall as u64)] {
            r.rax = rax as u64;
            let s = resume_regs(&r);
            assert_eq!((s.rax, s.rip, s.orig_rax), (nr, 0xffe, u64::MAX));
        }
        // A finished call, or no call at all, resumes as it was.
        for (rax, orig) in [(-4i64, 202u64), (0, 202), (-512, u64::MAX)] {
            r.rax = rax as u64;
            r.orig_rax = orig;
            let s = resume_regs(&r);
            assert_eq!((s.rax, s.rip, s.orig_rax), (rax as u64, 0x1000, orig));
        }
    }
}
