//! A function's parameters and results as a user reads them: names and Go types from
//! DWARF, where each value lives from the register-ABI assignment (the compiler's DWARF
//! locations at entry are unreliable; see `abi_dwarf` tests).

use std::fmt;

use crate::abi::{self, GoType, Location};
use crate::dwarf::FuncDebug;

/// One parameter or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub name: String,
    pub type_name: String,
    pub location: Location,
    /// For interfaces: `Some(true)` when empty (`any`: the first word is the type),
    /// `Some(false)` otherwise (the first word is an itab).
    pub interface: Option<bool>,
    /// The underlying basic type, also for named ones (`time.Duration` is an int64).
    pub scalar: Option<Scalar>,
}

pub use crate::abi::Scalar;
pub(crate) use crate::abi::scalar;

pub(crate) fn interface(t: &GoType) -> Option<bool> {
    match t {
        GoType::Interface { empty } => Some(*empty),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Receiver, generic dictionary, then parameters, in ABI order.
    pub params: Vec<Value>,
    pub results: Vec<Value>,
}

/// Renders a location the way the ABI names it: `RAX`, `RAX,RBX`, `X0`, `stack+16`.
pub struct ShowLocation<'a>(pub &'a Location);

impl fmt::Display for ShowLocation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Location::Registers(pieces) if pieces.is_empty() => f.write_str("-"),
            Location::Registers(pieces) => {
                for (i, p) in pieces.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}", p.reg)?;
                }
                Ok(())
            }
            Location::Stack { offset, .. } => write!(f, "stack+{offset}"),
        }
    }
}

/// The signature of `f`, or None when DWARF does not describe it completely: an
/// unresolved type, or a parameter list whose ABI frame differs from the pclntab's
/// argument size `args` (Go 1.21 drops blank and unnamed parameters from DWARF, which
/// would silently shift every register after them).
pub fn signature(f: &FuncDebug, args: i32) -> Option<Signature> {
    let inputs = f.input_types()?;
    let results = f.result_types()?;
    let assignment = abi::assign(&inputs, &results);
    if i64::try_from(assignment.arg_frame_size()).ok()? != i64::from(args) {
        return None;
    }
    let mut names: Vec<(String, String)> =
        f.params.iter().filter(|p| !p.is_result).map(|p| (p.name.clone(), p.type_name.to_string())).collect();
    if names.len() + 1 == inputs.len()
        && let Some(i) = f.dictionary_index()
    {
        names.insert(i.min(names.len()), (".dict".into(), "*uint8".into()));
    }
    if names.len() != inputs.len() {
        return None;
    }
    let params = names
        .into_iter()
        .zip(assignment.params)
        .zip(&inputs)
        .map(|(((name, type_name), location), t)| Value {
            name,
            type_name,
            location,
            interface: interface(t),
            scalar: scalar(t),
        })
        .collect();
    let results = f
        .params
        .iter()
        .filter(|p| p.is_result)
        .zip(assignment.results)
        .zip(&results)
        .map(|((p, location), t)| Value {
            name: p.name.clone(),
            type_name: p.type_name.to_string(),
            location,
            interface: interface(t),
            scalar: scalar(t),
        })
        .collect();
    Some(Signature { params, results })
}
