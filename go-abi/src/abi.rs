//! Go's amd64 register ABI (ABIInternal): where each argument and result of a Go function
//! lives at entry and at return.
//!
//! The rules follow `src/cmd/compile/abi-internal.md` and, where the document is silent,
//! what the compiler does (`cmd/compile/internal/abi/abiutils.go`, `types/size.go`): a value
//! is split into its scalar components, and goes entirely into registers or entirely onto
//! the stack. Stack offsets here are relative to SP at function entry, so the first stack
//! argument is at 8 (just above the return address). At the `RET` instruction SP has the
//! same value, so stack results use the same offsets.

use std::fmt;

/// Integer registers used for arguments and results, in assignment order.
pub const INT_ARG_REGS: [Reg; 9] =
    [Reg::Rax, Reg::Rbx, Reg::Rcx, Reg::Rdi, Reg::Rsi, Reg::R8, Reg::R9, Reg::R10, Reg::R11];

/// Number of floating-point argument registers (X0 to X14; X15 is the fixed zero register).
pub const FLOAT_ARG_REGS: u8 = 15;

/// Size of the return address pushed by `CALL`, which sits between SP and the first stack argument.
const RETURN_ADDRESS_SIZE: u64 = 8;

/// A register that can carry an argument or result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reg {
    Rax,
    Rbx,
    Rcx,
    Rdi,
    Rsi,
    R8,
    R9,
    R10,
    R11,
    /// `X0`..`X14`; only the low 4 or 8 bytes carry the value.
    X(u8),
}

impl Reg {
    /// The DWARF register number (x86-64 psABI), so DWARF locations can be compared.
    pub fn dwarf_number(self) -> u16 {
        match self {
            Reg::Rax => 0,
            Reg::Rcx => 2,
            Reg::Rbx => 3,
            Reg::Rsi => 4,
            Reg::Rdi => 5,
            Reg::R8 => 8,
            Reg::R9 => 9,
            Reg::R10 => 10,
            Reg::R11 => 11,
            Reg::X(n) => 17 + u16::from(n),
        }
    }

    /// The argument register with this DWARF number; `None` for registers that never carry
    /// arguments (RDX, RSP, R12-R15, X15 and others).
    pub fn from_dwarf(number: u16) -> Option<Reg> {
        Some(match number {
            0 => Reg::Rax,
            2 => Reg::Rcx,
            3 => Reg::Rbx,
            4 => Reg::Rsi,
            5 => Reg::Rdi,
            8 => Reg::R8,
            9 => Reg::R9,
            10 => Reg::R10,
            11 => Reg::R11,
            // Bounded by the match arm, so the narrowing cannot truncate.
            17..=31 => Reg::X((number - 17) as u8),
            _ => return None,
        })
    }

    pub fn is_float(self) -> bool {
        matches!(self, Reg::X(_))
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Reg::Rax => "RAX",
            Reg::Rbx => "RBX",
            Reg::Rcx => "RCX",
            Reg::Rdi => "RDI",
            Reg::Rsi => "RSI",
            Reg::R8 => "R8",
            Reg::R9 => "R9",
            Reg::R10 => "R10",
            Reg::R11 => "R11",
            Reg::X(n) => return write!(f, "X{n}"),
        };
        f.write_str(name)
    }
}

/// Which register file a scalar component goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegClass {
    Int,
    Float,
}

/// The pointer-shaped kinds: all are one machine word and take one integer register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PointerKind {
    Pointer,
    Map,
    Chan,
    Func,
    UnsafePointer,
}

/// The underlying shape of a Go type, as far as layout and the register ABI care.
///
/// Named types are represented by their underlying type; names live with the DWARF data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GoType {
    Bool,
    /// `int8`..`int64`, `uint8`..`uint64`, `int` and `uint` (`size` in bytes).
    Int {
        size: u8,
        signed: bool,
    },
    Uintptr,
    Float32,
    Float64,
    Complex64,
    Complex128,
    Pointer(PointerKind),
    String,
    Slice,
    /// `empty` tells a type word (`interface{}`) from an itab pointer (any other interface).
    Interface {
        empty: bool,
    },
    Struct(StructType),
    Array {
        len: u64,
        elem: Box<GoType>,
    },
}

/// A struct with explicit field offsets, as the compiler laid it out.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StructType {
    pub size: u64,
    pub fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Field {
    pub name: String,
    pub offset: u64,
    pub ty: GoType,
}

impl StructType {
    /// Lays fields out the way the Go compiler does: natural alignment, and one byte of
    /// padding after a trailing zero-size field so its address never points past the struct.
    pub fn from_fields<N: Into<String>>(fields: impl IntoIterator<Item = (N, GoType)>) -> Self {
        let mut offset = 0u64;
        let mut align = 1u64;
        let mut laid_out = Vec::new();
        for (name, ty) in fields {
            let field_align = ty.align();
            align = align.max(field_align);
            offset = align_up(offset, field_align);
            let size = ty.size();
            laid_out.push(Field { name: name.into(), offset, ty });
            offset = offset.saturating_add(size);
        }
        if offset > 0 && laid_out.last().is_some_and(|f| f.ty.size() == 0) {
            offset += 1;
        }
        StructType { size: align_up(offset, align), fields: laid_out }
    }

    pub fn align(&self) -> u64 {
        self.fields.iter().map(|f| f.ty.align()).max().unwrap_or(1)
    }
}

impl GoType {
    /// `int` and `uint`.
    pub const INT: GoType = GoType::Int { size: 8, signed: true };
    pub const UINT: GoType = GoType::Int { size: 8, signed: false };

    pub fn int(size: u8, signed: bool) -> GoType {
        GoType::Int { size, signed }
    }

    pub fn array(len: u64, elem: GoType) -> GoType {
        GoType::Array { len, elem: Box::new(elem) }
    }

    pub fn structure<N: Into<String>>(fields: impl IntoIterator<Item = (N, GoType)>) -> GoType {
        GoType::Struct(StructType::from_fields(fields))
    }

    pub fn size(&self) -> u64 {
        match self {
            GoType::Bool => 1,
            GoType::Int { size, .. } => u64::from(*size),
            GoType::Float32 => 4,
            GoType::Uintptr | GoType::Float64 | GoType::Complex64 | GoType::Pointer(_) => 8,
            GoType::Complex128 | GoType::String | GoType::Interface { .. } => 16,
            GoType::Slice => 24,
            GoType::Struct(s) => s.size,
            GoType::Array { len, elem } => len.saturating_mul(elem.size()),
        }
    }

    /// Alignment in bytes; always a power of two for types a Go compiler can produce.
    pub fn align(&self) -> u64 {
        match self {
            GoType::Bool => 1,
            GoType::Int { size, .. } => u64::from(*size).clamp(1, 8),
            GoType::Float32 | GoType::Complex64 => 4,
            GoType::Uintptr
            | GoType::Float64
            | GoType::Complex128
            | GoType::Pointer(_)
            | GoType::String
            | GoType::Slice
            | GoType::Interface { .. } => 8,
            GoType::Struct(s) => s.align(),
            GoType::Array { elem, .. } => elem.align(),
        }
    }

    /// The scalar components a register assignment would use, in register order, with their
    /// byte offset and size inside the value. `None` when the type can never be passed in
    /// registers: it contains an array of more than one element (even a zero-size one, as in
    /// the compiler), or it is too deeply nested to be a real Go type.
    pub fn register_components(&self) -> Option<Vec<Component>> {
        let mut out = Vec::new();
        self.push_components(0, 0, &mut out).then_some(out)
    }

    fn push_components(&self, base: u64, depth: u32, out: &mut Vec<Component>) -> bool {
        const MAX_DEPTH: u32 = 64;
        // Past the argument register count nothing can fit; stopping early also bounds the
        // work on absurd inputs.
        const MAX_COMPONENTS: usize = INT_ARG_REGS.len() + FLOAT_ARG_REGS as usize + 1;
        if depth > MAX_DEPTH {
            return false;
        }
        // Arrays of two or more elements disqualify even when zero-size (types/size.go).
        if let GoType::Array { len, .. } = self
            && *len > 1
        {
            return false;
        }
        if self.size() == 0 {
            return true;
        }
        let mut word = |offset: u64, size: u64, class: RegClass| {
            out.push(Component { offset: base.saturating_add(offset), size, class });
        };
        match self {
            GoType::Bool | GoType::Uintptr | GoType::Pointer(_) => word(0, self.size(), RegClass::Int),
            GoType::Int { size, .. } => {
                // Wider-than-word integers take consecutive words, low half first.
                let size = u64::from(*size);
                let mut at = 0;
                while at < size {
                    word(at, (size - at).min(8), RegClass::Int);
                    at += 8;
                }
            }
            GoType::Float32 | GoType::Float64 => word(0, self.size(), RegClass::Float),
            GoType::Complex64 => {
                word(0, 4, RegClass::Float);
                word(4, 4, RegClass::Float);
            }
            GoType::Complex128 => {
                word(0, 8, RegClass::Float);
                word(8, 8, RegClass::Float);
            }
            GoType::String | GoType::Interface { .. } => {
                word(0, 8, RegClass::Int);
                word(8, 8, RegClass::Int);
            }
            GoType::Slice => {
                word(0, 8, RegClass::Int);
                word(8, 8, RegClass::Int);
                word(16, 8, RegClass::Int);
            }
            GoType::Struct(s) => {
                for field in &s.fields {
                    if !field.ty.push_components(base.saturating_add(field.offset), depth + 1, out) {
                        return false;
                    }
                    if out.len() > MAX_COMPONENTS {
                        return false;
                    }
                }
            }
            GoType::Array { len, elem } => {
                if *len == 1 && !elem.push_components(base, depth + 1, out) {
                    return false;
                }
            }
        }
        out.len() <= MAX_COMPONENTS
    }
}

/// One scalar part of a value, as the ABI splits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Component {
    pub offset: u64,
    pub size: u64,
    pub class: RegClass,
}

/// A register holding the bytes `[offset, offset + size)` of a value's memory image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegPiece {
    pub reg: Reg,
    pub offset: u64,
    pub size: u64,
}

/// Where one argument or result lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Pieces in the order the ABI assigns them (ascending offset). Empty only for
    /// zero-size values, which the ABI puts on the stack, so never empty in practice.
    Registers(Vec<RegPiece>),
    /// `offset` from SP at entry (8 is the first byte above the return address).
    Stack { offset: u64, size: u64 },
}

/// The ABI's decision for one function signature.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Assignment {
    /// Receiver (if any) followed by the parameters, as given to [`assign`].
    pub params: Vec<Location>,
    pub results: Vec<Location>,
    /// For each register-assigned parameter, the entry-SP offset of the caller-reserved
    /// slot that the callee may spill it to (uninitialised at entry); `None` for stack ones.
    pub spill_slots: Vec<Option<u64>>,
    /// Entry-SP offset of the spill area, after the stack-assigned arguments and results.
    pub spill_offset: u64,
    pub spill_size: u64,
}

impl Assignment {
    /// Bytes the caller reserves above the return address: stack arguments, stack results
    /// and the spill area. The pclntab records the same number as the function's `args`,
    /// except for Go functions that assembly calls (those with a `.abi0` twin symbol),
    /// where it records the ABI0 frame.
    pub fn arg_frame_size(&self) -> u64 {
        self.spill_offset.saturating_add(self.spill_size).saturating_sub(RETURN_ADDRESS_SIZE)
    }
}

/// Assigns registers and stack slots to a function's receiver and parameters, then to its
/// results, as Go's ABIInternal on amd64 does.
///
/// Generic code compiled for a GC shape takes a hidden dictionary pointer as its first
/// parameter (after the receiver of a method); callers must include it in
/// `receiver_and_params` (see `dwarf::FuncDebug::input_types`).
pub fn assign(receiver_and_params: &[GoType], results: &[GoType]) -> Assignment {
    let mut state = AssignState::default();
    let mut spill_slots = Vec::with_capacity(receiver_and_params.len());
    let mut register_params = Vec::new();
    let params: Vec<Location> = receiver_and_params
        .iter()
        .map(|ty| {
            let location = state.assign(ty);
            let register_assigned = matches!(location, Location::Registers(_));
            spill_slots.push(None);
            if register_assigned {
                register_params.push((spill_slots.len() - 1, ty));
            }
            location
        })
        .collect();
    state.stack = align_up(state.stack, 8);
    state.ints = 0;
    state.floats = 0;
    let results = results.iter().map(|ty| state.assign(ty)).collect();

    let spill_start = align_up(state.stack, 8);
    let mut spill = 0u64;
    for (index, ty) in register_params {
        let at = align_up(spill, ty.align());
        spill_slots[index] = Some(RETURN_ADDRESS_SIZE.saturating_add(spill_start).saturating_add(at));
        spill = at.saturating_add(ty.size());
    }
    Assignment {
        params,
        results,
        spill_slots,
        spill_offset: RETURN_ADDRESS_SIZE.saturating_add(spill_start),
        spill_size: align_up(spill, 8),
    }
}

#[derive(Default)]
struct AssignState {
    ints: usize,
    floats: usize,
    /// Offset of the next free stack byte, relative to the first stack argument.
    stack: u64,
}

impl AssignState {
    fn assign(&mut self, ty: &GoType) -> Location {
        if ty.size() > 0
            && let Some(components) = ty.register_components()
        {
            let ints = components.iter().filter(|c| c.class == RegClass::Int).count();
            let floats = components.len() - ints;
            if self.ints + ints <= INT_ARG_REGS.len() && self.floats + floats <= usize::from(FLOAT_ARG_REGS) {
                let pieces = components
                    .iter()
                    .map(|c| {
                        let reg = match c.class {
                            RegClass::Int => {
                                self.ints += 1;
                                INT_ARG_REGS[self.ints - 1]
                            }
                            RegClass::Float => {
                                self.floats += 1;
                                // Bounded by FLOAT_ARG_REGS above.
                                Reg::X((self.floats - 1) as u8)
                            }
                        };
                        RegPiece { reg, offset: c.offset, size: c.size }
                    })
                    .collect();
                return Location::Registers(pieces);
            }
        }
        let size = ty.size();
        let offset = align_up(self.stack, ty.align());
        self.stack = offset.saturating_add(size);
        Location::Stack { offset: RETURN_ADDRESS_SIZE.saturating_add(offset), size }
    }
}

/// Rounds `x` up to a multiple of `align`; alignments that are not powers of two (only
/// possible from corrupt input) round to the next multiple anyway.
fn align_up(x: u64, align: u64) -> u64 {
    if align <= 1 {
        return x;
    }
    match x % align {
        0 => x,
        rem => x.saturating_add(align - rem),
    }
}

/// A basic type's kind, as values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Bool,
    Int { size: u8, signed: bool },
    Float32,
    Float64,
}

/// The basic type under `t`, if it is one.
pub(crate) fn scalar(t: &GoType) -> Option<Scalar> {
    match *t {
        GoType::Bool => Some(Scalar::Bool),
        GoType::Int { size, signed } => Some(Scalar::Int { size, signed }),
        GoType::Float32 => Some(Scalar::Float32),
        GoType::Float64 => Some(Scalar::Float64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(location: &Location) -> Vec<Reg> {
        match location {
            Location::Registers(pieces) => pieces.iter().map(|p| p.reg).collect(),
            Location::Stack { .. } => panic!("expected registers, got {location:?}"),
        }
    }

    fn stack(location: &Location) -> (u64, u64) {
        match location {
            Location::Stack { offset, size } => (*offset, *size),
            Location::Registers(_) => panic!("expected stack, got {location:?}"),
        }
    }

    const U8: GoType = GoType::Int { size: 1, signed: false };

    /// The worked example of abi-internal.md, with amd64's nine integer registers.
    #[test]
    fn spec_example() {
        // func f(a1 uint8, a2 [2]uintptr, a3 uint8) (r1 struct { x uintptr; y [2]uintptr }, r2 string)
        let r1 = GoType::structure([("x", GoType::Uintptr), ("y", GoType::array(2, GoType::Uintptr))]);
        let a = assign(&[U8, GoType::array(2, GoType::Uintptr), U8], &[r1, GoType::String]);
        assert_eq!(regs(&a.params[0]), [Reg::Rax]);
        assert_eq!(stack(&a.params[1]), (8, 16));
        assert_eq!(regs(&a.params[2]), [Reg::Rbx]);
        // Results start again at RAX; r1 follows the argument area on the stack.
        assert_eq!(stack(&a.results[0]), (24, 24));
        assert_eq!(regs(&a.results[1]), [Reg::Rax, Reg::Rbx]);
        // Spill area: a1 and a3 (one byte each), rounded up to a word.
        assert_eq!(a.spill_offset, 48);
        assert_eq!(a.spill_size, 8);
        assert_eq!(a.spill_slots, [Some(48), None, Some(49)]);
        assert_eq!(a.arg_frame_size(), 48);
    }

    #[test]
    fn counters_reset_when_a_value_does_not_fit() {
        // Eight ints leave one register: a string goes to the stack, a later int gets R11.
        let mut params = vec![GoType::INT; 8];
        params.push(GoType::String);
        params.push(GoType::INT);
        let a = assign(&params, &[GoType::INT]);
        assert_eq!(regs(&a.params[7]), [Reg::R10]);
        assert_eq!(stack(&a.params[8]), (8, 16));
        assert_eq!(regs(&a.params[9]), [Reg::R11]);
        assert_eq!(regs(&a.results[0]), [Reg::Rax]);
        assert_eq!(a.spill_offset, 24);
        assert_eq!(a.spill_size, 72);
    }

    #[test]
    fn ten_ints_spill_to_stack_in_order() {
        let a = assign(&vec![GoType::INT; 11], &[]);
        let expected: Vec<Reg> = INT_ARG_REGS.to_vec();
        let got: Vec<Reg> = a.params[..9].iter().flat_map(regs).collect();
        assert_eq!(got, expected);
        assert_eq!(stack(&a.params[9]), (8, 8));
        assert_eq!(stack(&a.params[10]), (16, 8));
    }

    #[test]
    fn floats_and_complex() {
        let a = assign(
            &[GoType::Float32, GoType::Float64, GoType::Complex64, GoType::Complex128, GoType::Bool],
            &[GoType::Complex128],
        );
        assert_eq!(regs(&a.params[0]), [Reg::X(0)]);
        assert_eq!(regs(&a.params[1]), [Reg::X(1)]);
        assert_eq!(
            a.params[2],
            Location::Registers(vec![
                RegPiece { reg: Reg::X(2), offset: 0, size: 4 },
                RegPiece { reg: Reg::X(3), offset: 4, size: 4 },
            ])
        );
        assert_eq!(regs(&a.params[3]), [Reg::X(4), Reg::X(5)]);
        assert_eq!(regs(&a.params[4]), [Reg::Rax]);
        assert_eq!(regs(&a.results[0]), [Reg::X(0), Reg::X(1)]);
    }

    #[test]
    fn complex_that_does_not_fit_goes_to_stack_and_later_float_still_fits() {
        // Seven complex128 use X0-X13; the next complex128 needs two, only X14 is left.
        let mut params = vec![GoType::Complex128; 7];
        params.push(GoType::Complex128);
        params.push(GoType::Float64);
        let a = assign(&params, &[]);
        assert_eq!(regs(&a.params[6]), [Reg::X(12), Reg::X(13)]);
        assert_eq!(stack(&a.params[7]), (8, 16));
        assert_eq!(regs(&a.params[8]), [Reg::X(14)]);
    }

    #[test]
    fn fifteen_float_registers() {
        let a = assign(&vec![GoType::Float64; 17], &[]);
        assert_eq!(regs(&a.params[14]), [Reg::X(14)]);
        assert_eq!(stack(&a.params[15]), (8, 8));
        assert_eq!(stack(&a.params[16]), (16, 8));
    }

    #[test]
    fn struct_fields_go_one_per_register_with_offsets() {
        let small = GoType::structure([("A", GoType::int(4, true)), ("B", GoType::Bool), ("C", GoType::int(8, true))]);
        assert_eq!(small.size(), 16);
        let mixed = GoType::structure([
            ("F", GoType::Float64),
            ("I", GoType::INT),
            ("G", GoType::Float32),
            ("C", GoType::Complex64),
        ]);
        assert_eq!(mixed.size(), 32);
        let a = assign(&[small, mixed], &[]);
        let Location::Registers(pieces) = &a.params[0] else {
            panic!("small struct should be in registers");
        };
        let got: Vec<(Reg, u64, u64)> = pieces.iter().map(|p| (p.reg, p.offset, p.size)).collect();
        assert_eq!(got, [(Reg::Rax, 0, 4), (Reg::Rbx, 4, 1), (Reg::Rcx, 8, 8)]);
        let Location::Registers(pieces) = &a.params[1] else {
            panic!("mixed struct should be in registers");
        };
        let got: Vec<(Reg, u64, u64)> = pieces.iter().map(|p| (p.reg, p.offset, p.size)).collect();
        assert_eq!(
            got,
            [(Reg::X(0), 0, 8), (Reg::Rdi, 8, 8), (Reg::X(1), 16, 4), (Reg::X(2), 20, 4), (Reg::X(3), 24, 4),]
        );
        // Spill slots follow each type's own alignment.
        assert_eq!(a.spill_slots, [Some(8), Some(24)]);
        assert_eq!(a.spill_size, 48);
    }

    #[test]
    fn arrays() {
        let one = GoType::array(1, GoType::String);
        let zero = GoType::array(0, GoType::INT);
        let two = GoType::array(2, GoType::int(1, true));
        let nested_one = GoType::array(1, GoType::array(1, GoType::Float64));
        let a = assign(&[two, one, zero, nested_one, GoType::INT], &[]);
        assert_eq!(stack(&a.params[0]), (8, 2));
        assert_eq!(regs(&a.params[1]), [Reg::Rax, Reg::Rbx]);
        // Zero-size values are stack-assigned (aligned, no space).
        assert_eq!(stack(&a.params[2]), (8 + 8, 0));
        assert_eq!(regs(&a.params[3]), [Reg::X(0)]);
        assert_eq!(regs(&a.params[4]), [Reg::Rcx]);
    }

    #[test]
    fn struct_with_array_field_is_stack_assigned() {
        let with_array = GoType::structure([("N", GoType::INT), ("A", GoType::array(2, GoType::INT))]);
        // Even a zero-size two-element array keeps a struct off registers.
        let with_empty_array =
            GoType::structure([("N", GoType::INT), ("Z", GoType::array(2, GoType::structure::<&str>([])))]);
        assert_eq!(with_empty_array.size(), 16);
        let a = assign(&[with_array, with_empty_array, GoType::INT], &[]);
        assert_eq!(stack(&a.params[0]), (8, 24));
        assert_eq!(stack(&a.params[1]), (32, 16));
        assert_eq!(regs(&a.params[2]), [Reg::Rax]);
    }

    #[test]
    fn zero_size_values_and_trailing_padding() {
        let empty = GoType::structure::<&str>([]);
        let trailing = GoType::structure([("A", GoType::int(8, true)), ("Z", empty.clone())]);
        assert_eq!(trailing.size(), 16);
        let zero_arr = GoType::structure([("A", GoType::array(0, GoType::INT)), ("B", GoType::int(2, true))]);
        assert_eq!((zero_arr.size(), zero_arr.align()), (8, 8));
        let a = assign(&[empty.clone(), GoType::INT, trailing, zero_arr, GoType::int(1, true)], &[empty]);
        assert_eq!(stack(&a.params[0]), (8, 0));
        assert_eq!(regs(&a.params[1]), [Reg::Rax]);
        // The padding byte gets no register; a zero-size field gets none either.
        assert_eq!(a.params[2], Location::Registers(vec![RegPiece { reg: Reg::Rbx, offset: 0, size: 8 }]));
        assert_eq!(a.params[3], Location::Registers(vec![RegPiece { reg: Reg::Rcx, offset: 0, size: 2 }]));
        assert_eq!(regs(&a.params[4]), [Reg::Rdi]);
        assert_eq!(stack(&a.results[0]), (8, 0));
    }

    #[test]
    fn zero_size_stack_value_still_aligns() {
        // [0]int64 has alignment 8 and moves the next stack slot up.
        let mut params = vec![GoType::INT; 9];
        params.push(GoType::int(1, true));
        params.push(GoType::array(0, GoType::int(8, true)));
        params.push(GoType::int(1, true));
        params.push(GoType::String);
        let a = assign(&params, &[]);
        assert_eq!(stack(&a.params[9]), (8, 1));
        assert_eq!(stack(&a.params[10]), (16, 0));
        assert_eq!(stack(&a.params[11]), (16, 1));
        assert_eq!(stack(&a.params[12]), (24, 16));
    }

    #[test]
    fn results_stack_area_follows_args_and_spill_area_follows_results() {
        // func(a [3]int8, b int, c [2]float32) ([2]int16, float64)
        let a = assign(
            &[GoType::array(3, GoType::int(1, true)), GoType::INT, GoType::array(2, GoType::Float32)],
            &[GoType::array(2, GoType::int(2, true)), GoType::Float64],
        );
        assert_eq!(stack(&a.params[0]), (8, 3));
        assert_eq!(regs(&a.params[1]), [Reg::Rax]);
        assert_eq!(stack(&a.params[2]), (12, 8));
        assert_eq!(stack(&a.results[0]), (24, 4));
        assert_eq!(regs(&a.results[1]), [Reg::X(0)]);
        assert_eq!(a.spill_offset, 32);
        assert_eq!(a.spill_slots, [None, Some(32), None]);
        assert_eq!(a.spill_size, 8);
        assert_eq!(a.arg_frame_size(), 32);
    }

    #[test]
    fn many_results() {
        // Ten int results: nine in registers, the tenth on the stack, then a string that
        // does not fit either.
        let mut results = vec![GoType::INT; 10];
        results.push(GoType::String);
        let a = assign(&[GoType::String], &results);
        assert_eq!(regs(&a.params[0]), [Reg::Rax, Reg::Rbx]);
        assert_eq!(regs(&a.results[8]), [Reg::R11]);
        assert_eq!(stack(&a.results[9]), (8, 8));
        assert_eq!(stack(&a.results[10]), (16, 16));
        assert_eq!(a.spill_offset, 32);
        assert_eq!(a.spill_size, 16);
    }

    #[test]
    fn pointer_shapes_and_interfaces() {
        let a = assign(
            &[
                GoType::Pointer(PointerKind::Pointer),
                GoType::Pointer(PointerKind::Map),
                GoType::Pointer(PointerKind::Chan),
                GoType::Pointer(PointerKind::Func),
                GoType::Pointer(PointerKind::UnsafePointer),
                GoType::Interface { empty: true },
                GoType::Slice,
            ],
            &[GoType::Interface { empty: false }],
        );
        let all: Vec<Reg> = a.params[..6].iter().flat_map(regs).collect();
        assert_eq!(all, INT_ARG_REGS[..7]);
        // Two registers are left and a slice needs three.
        assert_eq!(stack(&a.params[6]), (8, 24));
        assert_eq!(regs(&a.results[0]), [Reg::Rax, Reg::Rbx]);
    }

    #[test]
    fn dwarf_register_numbers_round_trip() {
        for reg in INT_ARG_REGS.into_iter().chain((0..FLOAT_ARG_REGS).map(Reg::X)) {
            assert_eq!(Reg::from_dwarf(reg.dwarf_number()), Some(reg));
        }
        assert_eq!(Reg::from_dwarf(1), None, "RDX is the closure context");
        assert_eq!(Reg::from_dwarf(7), None);
        assert_eq!(Reg::from_dwarf(32), None, "X15 is the zero register");
        assert_eq!(Reg::X(3).to_string(), "X3");
        assert_eq!(Reg::R10.to_string(), "R10");
    }

    #[test]
    fn absurd_inputs_do_not_panic() {
        let mut deep = GoType::INT;
        for _ in 0..200 {
            deep = GoType::array(1, deep);
        }
        let huge = GoType::array(u64::MAX, GoType::array(u64::MAX, GoType::Slice));
        let odd = GoType::Struct(StructType {
            size: u64::MAX,
            fields: vec![Field { name: "x".into(), offset: u64::MAX, ty: GoType::int(200, true) }],
        });
        let a = assign(&[deep, huge.clone(), odd.clone(), huge], &[odd]);
        assert_eq!(a.params.len(), 4);
    }
}
