//! The few ELF facts a Go reader needs, on top of `object`: virtual-address reads through
//! the segments (sections may be absent in stripped or externally linked files), PIE,
//! dynamic linking, and relocation addends for PIE fields that the file leaves zero.

use object::{Object, ObjectSection};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("unsupported ELF: {what} (only linux/amd64 64-bit little-endian executables)")]
    Unsupported { what: String },
    #[error("malformed ELF: {reason}")]
    Malformed { reason: String },
}

/// One loadable segment's file-backed bytes at its link-time virtual address.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub vaddr: u64,
    /// The in-memory size; bytes past `data.len()` are zero-filled (bss).
    pub memsz: u64,
    pub data: &'a [u8],
    pub writable: bool,
    pub executable: bool,
}

/// A parsed ELF executable, borrowing the file's bytes.
pub struct Elf<'a> {
    pub file: object::File<'a>,
    pub segments: Vec<Segment<'a>>,
    /// `ET_DYN`: position independent, loaded at a bias chosen by the kernel.
    pub pie: bool,
    /// Has a `PT_INTERP`: dynamically linked (typically cgo).
    pub dynamic: bool,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        if data.len() < 64 {
            return Err(ElfError::Malformed { reason: format!("{} bytes, shorter than an ELF header", data.len()) });
        }
        if data[4] != 2 || data[5] != 1 {
            return Err(ElfError::Unsupported { what: "not 64-bit little-endian".into() });
        }
        let file = object::File::parse(data).map_err(|e| ElfError::Malformed { reason: e.to_string() })?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(ElfError::Unsupported { what: format!("architecture {:?}", file.architecture()) });
        }
        let e_type = u16::from_le_bytes([data[16], data[17]]);
        let pie = match e_type {
            2 => false,
            3 => true,
            other => return Err(ElfError::Unsupported { what: format!("e_type {other} (not an executable)") }),
        };
        let mut segments = Vec::new();
        let mut dynamic = false;
        if let object::File::Elf64(elf) = &file {
            use object::read::elf::ProgramHeader;
            let endian = elf.endian();
            for ph in elf.elf_program_headers() {
                let p_type = ph.p_type(endian);
                if p_type == object::elf::PT_INTERP {
                    dynamic = true;
                }
                if p_type != object::elf::PT_LOAD {
                    continue;
                }
                let flags = ph.p_flags(endian);
                let data = ph.data(endian, data).map_err(|_| ElfError::Malformed {
                    reason: format!(
                        "segment at {:#x} extends past the end of the file (truncated?)",
                        ph.p_vaddr(endian)
                    ),
                })?;
                segments.push(Segment {
                    vaddr: ph.p_vaddr(endian),
                    memsz: ph.p_memsz(endian),
                    data,
                    writable: flags.contains(object::elf::PF_W),
                    executable: flags.contains(object::elf::PF_X),
                });
            }
        } else {
            return Err(ElfError::Unsupported { what: "not ELF64".into() });
        }
        if segments.is_empty() {
            return Err(ElfError::Malformed { reason: "no loadable segments".into() });
        }
        Ok(Elf { file, segments, pie, dynamic })
    }

    /// File bytes at a link-time virtual address, up to the end of the segment's file data.
    pub fn bytes_at(&self, vaddr: u64) -> Option<&'a [u8]> {
        self.segments.iter().find_map(|s| {
            let off = vaddr.checked_sub(s.vaddr)?;
            (off < s.data.len() as u64).then(|| &s.data[off as usize..])
        })
    }

    /// Exactly `len` file bytes at `vaddr`, or None when they are not all in the file.
    pub fn read(&self, vaddr: u64, len: usize) -> Option<&'a [u8]> {
        self.bytes_at(vaddr).and_then(|b| b.get(..len))
    }

    pub fn read_u64(&self, vaddr: u64) -> Option<u64> {
        self.read(vaddr, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// A section's data and address, if the section exists and its bytes are in the file.
    pub fn section(&self, name: &str) -> Option<(u64, &'a [u8])> {
        let s = self.file.section_by_name(name)?;
        let data = s.data().ok()?;
        Some((s.address(), data))
    }

    /// The link-time virtual address of the start of `data`, if it lies inside a segment.
    pub fn vaddr_of(&self, data: &[u8]) -> Option<u64> {
        let p = data.as_ptr() as usize;
        self.segments.iter().find_map(|s| {
            let start = s.data.as_ptr() as usize;
            (p >= start && p < start + s.data.len()).then(|| s.vaddr.checked_add((p - start) as u64)).flatten()
        })
    }

    /// The addend of a dynamic relocation at `vaddr`: PIE binaries keep relocated pointer
    /// values there and may leave the file's word zero.
    pub fn relocation_addend(&self, vaddr: u64) -> Option<u64> {
        self.file.dynamic_relocations()?.find(|(off, _)| *off == vaddr).map(|(_, r)| r.addend() as u64)
    }

    /// A pointer-sized value in the file, with its PIE relocation applied when the file
    /// holds zero there.
    pub fn read_pointer(&self, vaddr: u64) -> Option<u64> {
        match self.read_u64(vaddr)? {
            0 if self.pie => self.relocation_addend(vaddr).or(Some(0)),
            v => Some(v),
        }
    }
}
