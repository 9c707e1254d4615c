//! `.go.buildinfo` decoding on arbitrary bytes, read two ways: as a whole ELF file
//! (`BuildInfo::from_elf`, which finds the blob by section or by scanning), and as a bare
//! blob inside a minimal executable that maps the input at a fixed address, so the
//! pointer-based layout of old Go releases resolves its pointers into the input itself.
#![no_main]

use go_abi::BuildInfo;
use go_abi::elf::Elf;
use libfuzzer_sys::fuzz_target;

/// Where the synthetic executable maps its only segment (file offset 0).
const BASE: u64 = 0x40_0000;
/// ELF header (64 bytes) and one program header (56), padded so the input starts
/// 16-byte aligned, as the linker aligns `.go.buildinfo`.
const HEADERS: usize = 128;

/// A linux/amd64 `ET_EXEC` with one read-write `PT_LOAD` covering the headers and `data`.
fn wrap(data: &[u8]) -> Vec<u8> {
    let total = (HEADERS + data.len()) as u64;
    let mut f = Vec::with_capacity(HEADERS + data.len());
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(BASE + HEADERS as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&half.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    f.extend_from_slice(&6u32.to_le_bytes()); // p_flags: R|W
    for word in [0, BASE, BASE, total, total, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.resize(HEADERS, 0);
    f.extend_from_slice(data);
    f
}

fn touch(info: &BuildInfo) {
    for key in ["-buildmode", "CGO_ENABLED", "-race", "GOAMD64"] {
        let _ = info.setting(key);
    }
    let _ = info.main.as_ref().map(|m| m.replace.is_some());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(elf) = Elf::parse(data) {
        if let Ok(info) = BuildInfo::from_elf(&elf) {
            touch(&info);
        }
        let _ = BuildInfo::decode(data, &elf);
    }
    let file = wrap(data);
    let elf = Elf::parse(&file).expect("the synthetic wrapper is a valid ELF executable");
    if let Ok(info) = BuildInfo::decode(&file[HEADERS..], &elf) {
        touch(&info);
    }
    if let Ok(info) = BuildInfo::from_elf(&elf) {
        touch(&info);
    }
});
