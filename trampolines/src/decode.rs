//! Linear-sweep decoding of one Go function. Exact for Go: the compiler puts no data in
//! `.text` (jump tables live in rodata), so every byte of `[entry, code_end)` is code.

use std::collections::BTreeSet;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid instruction at {pc:#x}")]
    Invalid { pc: u64 },
    #[error("instruction at {pc:#x} runs past the end of the function")]
    Truncated { pc: u64 },
}

/// A decoded function.
#[derive(Debug, Clone)]
pub struct Function {
    pub entry: u64,
    /// End of the code proper (the last instruction's end).
    pub code_end: u64,
    /// End including the alignment padding (the next function's entry).
    pub end: u64,
    pub insns: Vec<Instruction>,
    /// Targets of direct branches inside the function.
    pub branch_targets: BTreeSet<u64>,
    /// The INT3 alignment bytes after the code. Never executed, so a jump at the end of
    /// the code may overlap them; but no code may be placed there: the runtime maps these
    /// PCs to this function while its pc-value tables end at `code_end`, so a signal
    /// landing on code there makes the runtime throw ("invalid pc-encoded table").
    pub padding: std::ops::Range<u64>,
    /// The bytes of `[entry, code_end)`.
    pub code: Vec<u8>,
}

impl Function {
    /// Decodes `bytes` (the function from `entry` up to the next function) as code up to
    /// `code_end` (from the pclntab's pcsp table; `None`: strip trailing INT3s instead).
    pub fn decode(bytes: &[u8], entry: u64, code_end: Option<u64>) -> Result<Self, DecodeError> {
        let end = entry + bytes.len() as u64;
        let trailing_int3 = bytes.iter().rev().take_while(|&&b| b == 0xcc).count() as u64;
        let code_end = code_end.unwrap_or(end - trailing_int3).clamp(entry, end);
        let code = &bytes[..(code_end - entry) as usize];
        let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
        let mut insns = Vec::new();
        let mut branch_targets = BTreeSet::new();
        let mut insn = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.is_invalid() {
                return Err(if insn.next_ip() > code_end || decoder.position() >= code.len() {
                    DecodeError::Truncated { pc: insn.ip() }
                } else {
                    DecodeError::Invalid { pc: insn.ip() }
                });
            }
            if matches!(
                insn.flow_control(),
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
            ) {
                let t = insn.near_branch_target();
                if t >= entry && t < end && insn.flow_control() != FlowControl::Call {
                    branch_targets.insert(t);
                }
            }
            insns.push(insn);
        }
        let int3s = bytes[code.len()..].iter().take_while(|&&b| b == 0xcc).count() as u64;
        let padding = code_end..code_end + int3s;
        Ok(Function { entry, code_end, end, insns, branch_targets, padding, code: code.to_vec() })
    }

    /// The original byte at `pc`, if it is code.
    pub fn byte_at(&self, pc: u64) -> Option<u8> {
        self.code.get(usize::try_from(pc.checked_sub(self.entry)?).ok()?).copied()
    }

    /// Index of the instruction starting at `pc`.
    pub fn index_at(&self, pc: u64) -> Option<usize> {
        self.insns.binary_search_by_key(&pc, |i| i.ip()).ok()
    }

    /// Exits other than RET: jumps out of the function (tail calls).
    pub fn tail_jumps(&self) -> impl Iterator<Item = &Instruction> {
        self.insns.iter().filter(move |i| {
            i.flow_control() == FlowControl::UnconditionalBranch
                && !(self.entry..self.end).contains(&i.near_branch_target())
        })
    }

    pub fn rets(&self) -> impl Iterator<Item = (usize, &Instruction)> {
        self.insns.iter().enumerate().filter(|(_, i)| i.mnemonic() == Mnemonic::Ret)
    }
}
