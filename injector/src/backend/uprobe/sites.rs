//! Which sites uprobes can take, and where: a uprobe is one `INT3` byte the kernel puts at
//! an instruction start and steps over itself, so none of the patcher's reasons to refuse
//! (no room for a jump, a branch into its bytes, a goroutine parked inside them) apply.
//! What remains: the function must follow the register ABI (no assembly, no runtime
//! code), its code must decode, and its plans must be ones the uprobe program runs.
//! Returns are uprobes on every `RET` (never uretprobes: those rewrite the return address
//! on a goroutine stack that Go may move).

use go_abi::GoBinary;
use trampolines::Function;
use trampolines::iced_x86::FlowControl;

use crate::plan::{FuncRefusal, ProbeSite, Via};

/// Where uprobes go for `site`, or why they cannot.
pub fn uprobe_via(bin: &GoBinary<'_>, bias: u64, site: &ProbeSite) -> Via {
    // A loop back to the entry would fire an entry uprobe on every iteration too.
    if let Err(
        r @ (FuncRefusal::Assembly
        | FuncRefusal::Runtime
        | FuncRefusal::Undecodable(_)
        | FuncRefusal::Code(trampolines::Refusal::LoopToEntry { .. })),
    ) = &site.entry_patch
    {
        return Via::Refused(r.to_string());
    }
    for (plan, kind) in [(&site.on_entry.plan, ring_abi::Kind::Entry), (&site.on_return.plan, ring_abi::Kind::Return)] {
        if plan.off {
            continue;
        }
        if let Err(why) = super::abi::encode(site.id, kind, plan) {
            return Via::Refused(format!("not with uprobes: {why}"));
        }
    }
    let Some(f) = site.entry.checked_sub(bias).and_then(|pc| bin.pclntab.find(pc)) else {
        return Via::Refused("not in the function table".into());
    };
    let Some(code) = bin.code(&f) else { return Via::Refused("its bytes are not in the file".into()) };
    let decoded = match Function::decode(code, f.entry + bias, Some(bin.pclntab.code_end(&f) + bias)) {
        Ok(d) => d,
        Err(e) => return Via::Refused(format!("cannot decode its code: {e}")),
    };
    Via::Uprobe { at: after_stack_check(&decoded), rets: exits(&decoded) }
}

/// Where the entry uprobe goes: after Go's stack check (`CMPQ SP|R12, 16(R14); JLS`),
/// which jumps to the function's morestack block when the stack must grow, and that jumps
/// back to the entry: a probe before the check would record such a call twice.
fn after_stack_check(f: &Function) -> u64 {
    use trampolines::iced_x86::{Code, Mnemonic, OpKind, Register};
    let checks_g = |i: &trampolines::iced_x86::Instruction| {
        i.mnemonic() == Mnemonic::Cmp
            && i.op1_kind() == OpKind::Memory
            && i.memory_base() == Register::R14
            && i.memory_displacement64() == 16
    };
    let head = &f.insns[..f.insns.len().min(6)];
    head.windows(2)
        .find(|w| checks_g(&w[0]) && matches!(w[1].code(), Code::Jbe_rel8_64 | Code::Jbe_rel32_64))
        .map_or(f.entry, |w| w[1].next_ip())
}

/// What uprobes cannot see: the X registers (the kernel hands a BPF program only the
/// general-purpose ones), so a value in one is shown as unavailable.
pub const NO_FLOATS: &str = "in a float register, which uprobes cannot read";

/// Marks the values of a uprobe site that live in float registers.
pub fn mark_floats(site: &mut ProbeSite) {
    for v in site.on_entry.values.iter_mut().chain(site.on_return.values.iter_mut()) {
        if let go_abi::abi::Location::Registers(p) = &v.location
            && p.iter().any(|p| p.reg.is_float())
        {
            v.unavailable = Some(NO_FLOATS);
        }
    }
}

/// Every `RET` of the function, or the first exit that is not one (a tail call: a jump
/// out of the function), which leaves the function probed at entry only.
fn exits(f: &Function) -> Result<Vec<u64>, String> {
    let mut rets = Vec::new();
    for i in &f.insns {
        match i.flow_control() {
            FlowControl::Return => rets.push(i.ip()),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let to = i.near_branch_target();
                if to != 0 && !(f.entry..f.code_end).contains(&to) {
                    return Err(format!("a tail call at {:#x} leaves it without a RET", i.ip()));
                }
            }
            _ => {}
        }
    }
    if rets.is_empty() {
        return Err("it never returns (no RET)".into());
    }
    Ok(rets)
}
