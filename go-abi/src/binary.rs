//! A Go executable as a whole: ELF + build info + pclntab (+ symtab and DWARF when present).

use std::ops::Range;

use object::{Object, ObjectSymbol};

use crate::buildinfo::{BuildInfo, BuildInfoError, read_uvarint};
use crate::dwarf::{DwarfError, DwarfInfo};
use crate::elf::{Elf, ElfError};
use crate::pclntab::{Func, MAGIC_GO120, Pclntab, PclntabError};
use crate::runtime::RuntimeLayout;
use crate::symtab::{TextSymbol, go_text_symbols};
use crate::version::GoVersion;

/// The oldest Go whose binaries this crate reads (the pclntab layout of go1.20).
pub const MIN_READABLE: GoVersion = GoVersion::new(1, 20, 0);

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error(transparent)]
    Elf {
        #[from]
        source: ElfError,
    },
    #[error("not a Go executable: it has neither Go build info nor a Go function table")]
    NotGo,
    #[error(transparent)]
    BuildInfo {
        #[from]
        source: BuildInfoError,
    },
    #[error("built with {version}, which is too old: inject reads binaries of go1.20 and newer")]
    GoTooOld { version: String },
    #[error("unrecognised Go version {version:?} in build info")]
    BadVersion { version: String },
    #[error("Go function table: {source}")]
    Pclntab {
        #[from]
        source: PclntabError,
    },
}

/// Where the pclntab was found, for `inject info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PclntabLocation {
    Section(&'static str),
    Symbol,
    MagicScan,
}

pub struct GoBinary<'a> {
    pub elf: Elf<'a>,
    pub build_info: BuildInfo,
    pub version: GoVersion,
    pub pclntab: Pclntab<'a>,
    pub pclntab_vaddr: u64,
    pub pclntab_location: PclntabLocation,
}

impl<'a> GoBinary<'a> {
    /// Parses a Go executable from its file bytes.
    pub fn parse(data: &'a [u8]) -> Result<Self, BinaryError> {
        let elf = Elf::parse(data)?;
        let build_info = match BuildInfo::from_elf(&elf) {
            Ok(b) => b,
            Err(BuildInfoError::NotFound) => {
                // A Go binary without build info would be older than go1.13; name the
                // layout if its pclntab says which.
                return Err(match find_pclntab(&elf) {
                    Err(e @ PclntabError::OldLayout { .. }) => e.into(),
                    _ => BinaryError::NotGo,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let version = GoVersion::parse(&build_info.go_version)
            .map_err(|_| BinaryError::BadVersion { version: build_info.go_version.clone() })?;
        if version < MIN_READABLE {
            return Err(BinaryError::GoTooOld { version: build_info.go_version.clone() });
        }
        let (pclntab, pclntab_vaddr, pclntab_location) = find_pclntab(&elf)?;
        Ok(GoBinary { elf, build_info, version, pclntab, pclntab_vaddr, pclntab_location })
    }

    /// Every function of the pclntab, in entry order.
    pub fn functions(&self) -> Result<Vec<Func<'a>>, PclntabError> {
        self.pclntab.funcs().collect()
    }

    /// `.symtab` text symbols, when the binary has them.
    pub fn symbols(&self) -> Option<Vec<TextSymbol>> {
        go_text_symbols(&self.elf)
    }

    /// The `[runtime.text, runtime.etext)` range the pclntab covers.
    pub fn text_range(&self) -> Range<u64> {
        let n = self.pclntab.len();
        if n == 0 {
            return 0..0;
        }
        self.pclntab.entry_of(0)..self.pclntab.entry_of(n)
    }

    /// The code bytes of a function, from the file.
    pub fn code(&self, f: &Func<'_>) -> Option<&'a [u8]> {
        self.elf.read(f.entry, usize::try_from(f.size()).ok()?)
    }

    /// `runtime.g` offsets from the version table.
    pub fn runtime_layout_from_table(&self) -> Option<RuntimeLayout> {
        RuntimeLayout::for_version(&self.version)
    }

    /// The binary's DWARF, when it has any (not `-ldflags=-w`).
    pub fn dwarf(&self) -> Result<Option<DwarfInfo>, DwarfError> {
        DwarfInfo::load(&self.elf.file)
    }

    /// `runtime.g` offsets: from the binary's own DWARF when it has it, else the table.
    pub fn runtime_layout(&self, dwarf: Option<&DwarfInfo>) -> Option<RuntimeLayout> {
        dwarf.and_then(|d| runtime_layout_from_dwarf(d).ok().flatten()).or_else(|| self.runtime_layout_from_table())
    }

    /// `runtime.firstmoduledata.types`: the base that type descriptors' name offsets
    /// count from.
    pub fn types_base(&self) -> Option<u64> {
        let header = self.elf.bytes_at(self.pclntab_vaddr)?;
        let md = find_moduledata(&self.elf, header, self.pclntab_vaddr)?;
        self.elf.read_pointer(md.checked_add(MD_TYPES)?).filter(|t| *t != 0)
    }

    /// The name of the Go type whose descriptor (`*abi.Type`, link-time address) is at
    /// `addr`, as `%T` prints it; None for descriptors not in the file (made at run time).
    pub fn type_name(&self, types: u64, addr: u64) -> Option<String> {
        const TFLAG_EXTRA_STAR: u8 = 2;
        let t = self.elf.read(addr, 48)?;
        let tflag = t[20];
        let str_off = i32::from_le_bytes(t[40..44].try_into().ok()?);
        let name = self.elf.bytes_at(types.checked_add_signed(i64::from(str_off))?)?;
        let (len, n) = read_uvarint(name.get(1..)?)?;
        let bytes = name.get(1 + n..(1 + n).checked_add(usize::try_from(len).ok()?)?)?;
        let s = std::str::from_utf8(bytes).ok()?;
        let s = if tflag & TFLAG_EXTRA_STAR != 0 { s.strip_prefix('*')? } else { s };
        Some(s.to_string())
    }

    /// The type descriptor an itab (link-time address) pairs with, for itabs the linker
    /// made (ones the runtime builds on the heap are not in the file).
    pub fn itab_type(&self, itab: u64) -> Option<u64> {
        self.elf.read_pointer(itab.checked_add(8)?).filter(|t| *t != 0)
    }

    /// The link-time address of the itab the linker made for concrete type `concrete`
    /// (`*google.golang.org/grpc/internal/status.Error`) as interface `iface` (`error`,
    /// `net.Addr`): the value an interface's first word has exactly when its dynamic type
    /// is `concrete`. From `.symtab`; else (stripped, or Go 1.27, whose itabs have no
    /// symbols) from the module's list of itabs, named by their type descriptors (package
    /// names, not paths), and only when exactly one matches. None when the program never
    /// converts the type to the interface.
    pub fn itab(&self, concrete: &str, iface: &str) -> Option<u64> {
        use object::{Object, ObjectSymbol};
        let names = [format!("go:itab.{concrete},{iface}"), format!("go.itab.{concrete},{iface}")];
        // Go 1.27 links itabs into one region without symbols of their own.
        for s in self.elf.file.symbols() {
            if s.name().is_ok_and(|n| names.iter().any(|w| w == n)) {
                return Some(s.address());
            }
        }
        let types = self.types_base()?;
        let short = |full: &str| -> String {
            let (star, rest) = full.strip_prefix('*').map_or(("", full), |r| ("*", r));
            let tail = rest.rsplit_once('/').map_or(rest, |(_, t)| t);
            format!("{star}{tail}")
        };
        let (want_type, want_iface) = (short(concrete), short(iface));
        let mut found = None;
        for itab in self.itabs()? {
            let (Some(inter), Some(ty)) = (self.elf.read_pointer(itab), self.itab_type(itab)) else { continue };
            if self.type_name(types, ty).is_some_and(|n| n == want_type)
                && self.type_name(types, inter).is_some_and(|n| n == want_iface)
            {
                if found.is_some() {
                    return None;
                }
                found = Some(itab);
            }
        }
        found
    }

    /// The link-time addresses of the itabs the linker made: `moduledata.itablinks` before
    /// Go 1.27, the `itaboffset`/`itabsize` region after `types` from 1.27 on.
    pub fn itabs(&self) -> Option<Vec<u64>> {
        const MAX: u64 = 1 << 20;
        let header = self.elf.bytes_at(self.pclntab_vaddr)?;
        let md = find_moduledata(&self.elf, header, self.pclntab_vaddr)?;
        let types = self.elf.read_pointer(md.checked_add(MD_TYPES)?)?;
        let mut out = Vec::new();
        if (self.version.major, self.version.minor) < (1, 27) {
            // types, etypes, rodata, gofunc, [epclntab from 1.26], then the slices
            // textsectmap, typelinks and itablinks: the layout whose three slices are the
            // linker's (length = capacity) is the one.
            let slice = |at: u64| -> Option<(u64, u64)> {
                let (ptr, len, cap) =
                    (self.elf.read_pointer(at)?, self.elf.read_u64(at + 8)?, self.elf.read_u64(at + 16)?);
                (len == cap && len <= MAX && (ptr != 0 || len == 0)).then_some((ptr, len))
            };
            let (ptr, len) = [0u64, 8].into_iter().find_map(|extra| {
                let base = md.checked_add(MD_TYPES + 4 * 8 + extra)?;
                slice(base)?;
                slice(base + 24)?;
                let links = slice(base + 48)?;
                // Every itab starts with a pointer to an interface type descriptor.
                let first = if links.1 > 0 { self.elf.read_pointer(links.0)? } else { 0 };
                (links.1 == 0 || self.elf.read_pointer(first).is_some_and(|t| t >= types)).then_some(links)
            })?;
            for i in 0..len {
                out.push(self.elf.read_pointer(ptr.checked_add(8 * i)?)?);
            }
        } else {
            // types, typedesclen, etypes, itaboffset, itabsize.
            let off = self.elf.read_u64(md.checked_add(MD_TYPES + 3 * 8)?)?;
            let size = self.elf.read_u64(md.checked_add(MD_TYPES + 4 * 8)?)?;
            let (mut p, end) = (types.checked_add(off)?, types.checked_add(off)?.checked_add(size)?);
            while p < end && (out.len() as u64) < MAX {
                out.push(p);
                // 32 bytes with one method word; more words for each further method of the
                // interface (its method slice's length), none if fun[0] is 0.
                let inter = self.elf.read_pointer(p)?;
                let fun0 = self.elf.read_pointer(p.checked_add(24)?)?;
                let methods = self.elf.read_u64(inter.checked_add(64)?)?;
                let extra = if fun0 == 0 || methods == 0 { 0 } else { methods.checked_sub(1)?.min(MAX) * 8 };
                p = p.checked_add(32 + extra)?;
            }
        }
        Some(out)
    }

    /// A build setting such as `-race`, `CGO_ENABLED`, `-buildmode`.
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.build_info.setting(key)
    }

    pub fn is_race(&self) -> bool {
        self.setting("-race") == Some("true")
    }
}

/// Reads `runtime.g` (and its embedded `runtime.stack`) from DWARF.
pub fn runtime_layout_from_dwarf(d: &DwarfInfo) -> Result<Option<RuntimeLayout>, DwarfError> {
    let Some(g) = d.struct_layout("runtime.g")? else { return Ok(None) };
    let Some(stack) = d.struct_layout("runtime.stack")? else { return Ok(None) };
    let Some(m) = d.struct_layout("runtime.m")? else { return Ok(None) };
    let Some(p) = d.struct_layout("runtime.p")? else { return Ok(None) };
    let field = |s: &crate::dwarf::StructLayout, name: &str| s.fields.iter().find(|f| f.name == name).map(|f| f.offset);
    Ok(RuntimeLayout::from_fields(|name| match name.split_once('.') {
        Some(("m", f)) => field(&m, f),
        Some(("p", f)) => field(&p, f),
        Some((outer, inner)) => Some(field(&g, outer)? + field(&stack, inner)?),
        None => field(&g, name),
    }))
}

/// Finds the pclntab: by section name, then by the linker's symbol, then by scanning the
/// non-executable segments for a valid header (externally linked PIE builds can merge the
/// section into `.data.rel.ro`, and stripped builds lose the symbol).
fn find_pclntab<'a>(elf: &Elf<'a>) -> Result<(Pclntab<'a>, u64, PclntabLocation), PclntabError> {
    for name in [".gopclntab", ".data.rel.ro.gopclntab"] {
        if let Some((addr, data)) = elf.section(name) {
            let t = parse_at(elf, data, addr)?;
            return Ok((t, addr, PclntabLocation::Section(name)));
        }
    }
    if let Some(sym) = elf.file.symbols().find(|s| s.name() == Ok("runtime.pcheader"))
        && let Some(data) = elf.bytes_at(sym.address())
        && let Ok(t) = parse_at(elf, data, sym.address())
    {
        return Ok((t, sym.address(), PclntabLocation::Symbol));
    }
    let mut old_layout = None;
    for seg in elf.segments.iter().filter(|s| !s.executable) {
        let magic = MAGIC_GO120.to_le_bytes();
        let mut off = 0;
        while let Some(pos) = find_aligned(&seg.data[off..], &magic[..]) {
            let at = off + pos;
            let data = &seg.data[at..];
            let Some(addr) = seg.vaddr.checked_add(at as u64) else { break };
            // A real table's first function lies in an executable segment.
            if let Ok(t) = parse_at(elf, data, addr)
                && !t.is_empty()
                && elf
                    .segments
                    .iter()
                    .any(|s| s.executable && (s.vaddr..s.vaddr.saturating_add(s.memsz)).contains(&t.entry_of(0)))
            {
                return Ok((t, addr, PclntabLocation::MagicScan));
            }
            off = at + 8;
        }
        // Name an old layout rather than saying "not found".
        let mut o = 0;
        while o + 8 <= seg.data.len() && old_layout.is_none() {
            if let Err(e @ PclntabError::OldLayout { .. }) = Pclntab::check_header(&seg.data[o..]) {
                old_layout = Some(e);
            }
            o += 8;
        }
    }
    Err(old_layout.unwrap_or(PclntabError::NotFound))
}

fn find_aligned(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.chunks_exact(8).position(|c| c.starts_with(needle)).map(|i| i * 8)
}

fn parse_at<'a>(elf: &Elf<'a>, data: &'a [u8], vaddr: u64) -> Result<Pclntab<'a>, PclntabError> {
    Pclntab::check_header(data)?;
    let text_start = match Pclntab::header_text_start(data) {
        Some(v) if v != 0 => Some(v),
        // go1.26 stopped storing textStart (it needed a relocation); PIE files of older
        // releases leave it to the dynamic loader.
        _ => moduledata_text(elf, data, vaddr).or_else(|| elf.relocation_addend(vaddr.checked_add(24)?)),
    };
    Pclntab::parse(data, text_start)
}

/// `runtime.firstmoduledata.text`.
fn moduledata_text(elf: &Elf<'_>, header: &[u8], header_vaddr: u64) -> Option<u64> {
    let md = find_moduledata(elf, header, header_vaddr)?;
    elf.read_pointer(md.checked_add(MD_TEXT)?).filter(|t| *t != 0)
}

/// Offsets in `runtime.moduledata`, stable since go1.20 (1.27 added a field after
/// `types`, not before).
const MD_FUNCNAMETAB: u64 = 8;
const MD_TEXT: u64 = 8 + 5 * 24 + 24 + 8 + 8 + 8;
const MD_TYPES: u64 = MD_TEXT + 15 * 8;

/// `runtime.firstmoduledata`, found through its first field, a pointer to the pcHeader,
/// and confirmed by its second, the funcnametab slice.
fn find_moduledata(elf: &Elf<'_>, header: &[u8], header_vaddr: u64) -> Option<u64> {
    let funcname_off = u64::from_le_bytes(header.get(32..40)?.try_into().ok()?);
    let confirm = |md: u64| -> Option<u64> {
        (elf.read_pointer(md.checked_add(MD_FUNCNAMETAB)?)? == header_vaddr.checked_add(funcname_off)?).then_some(md)
    };
    let target = header_vaddr.to_le_bytes();
    for seg in elf.segments.iter().filter(|s| s.writable) {
        for (i, w) in seg.data.chunks_exact(8).enumerate() {
            if w == target
                && let Some(t) = seg.vaddr.checked_add(8 * i as u64).and_then(confirm)
            {
                return Some(t);
            }
        }
    }
    if elf.pie {
        use object::Object;
        for (off, r) in elf.file.dynamic_relocations()? {
            if r.addend() as u64 == header_vaddr
                && let Some(t) = confirm(off)
            {
                return Some(t);
            }
        }
    }
    None
}
