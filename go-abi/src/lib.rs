//! Reads Go executables (linux/amd64) the way the Go toolchain itself does: build info,
//! the pclntab function table (also in stripped and PIE builds), `.symtab`, DWARF, the
//! register-ABI assignment of parameters and results, and the `runtime.g` layout.
//!
//! Everything here is pure: bytes in, facts out. Nothing panics on bytes that come from
//! a target; every malformed input is an error.

pub mod abi;
pub mod binary;
pub mod buildinfo;
pub mod declared;
pub mod dwarf;
pub mod elf;
pub mod offsets;
pub mod pclntab;
pub mod runtime;
pub mod signature;
pub mod symtab;
pub mod version;

pub use binary::{BinaryError, GoBinary};
pub use buildinfo::{BuildInfo, BuildInfoError, Module};
pub use pclntab::{Func, Pclntab, PclntabError};
pub use runtime::RuntimeLayout;
pub use version::GoVersion;
