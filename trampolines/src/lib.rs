//! Machine code for probing Go functions on x86-64: decoding a function, deciding where it
//! may be patched (and why not), relocating the stolen prologue bytes, and generating the
//! entry and return trampolines that write records into the shared ring.
//!
//! Pure: bytes and addresses in, bytes out. Nothing here knows ptrace or Go versions;
//! the caller supplies the pclntab's UnsafePoint answers and the `runtime.g` offsets.

pub use iced_x86;

pub mod codegen;
pub mod decode;
pub mod site;

pub use codegen::{CapturePlan, RingAddrs, Trampoline};
pub use decode::{DecodeError, Function};
pub use site::{EntryPatch, Redirect, Refusal, ReturnPatch};

/// `JMP rel32` from `from` to `to`, or None when out of range.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let disp = i32::try_from(to.wrapping_sub(from + 5) as i64).ok()?;
    let d = disp.to_le_bytes();
    Some([0xe9, d[0], d[1], d[2], d[3]])
}

/// `JMP rel8` from `from` to `to`, or None when out of range.
pub fn jmp_rel8(from: u64, to: u64) -> Option<[u8; 2]> {
    let disp = i8::try_from(to.wrapping_sub(from + 2) as i64).ok()?;
    Some([0xeb, disp as u8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps() {
        assert_eq!(jmp_rel32(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
        assert_eq!(jmp_rel32(0x1000, 0x1000), Some([0xe9, 0xfb, 0xff, 0xff, 0xff]));
        assert_eq!(jmp_rel32(0x1000, 0x1_0000_1000), None);
        assert_eq!(jmp_rel8(0x1000, 0x1002 + 127), Some([0xeb, 127]));
        assert_eq!(jmp_rel8(0x1000, 0x1002 + 128), None);
        assert_eq!(jmp_rel8(0x1000, 0x1002 - 128), Some([0xeb, 0x80]));
    }
}
