//! The Go 1.20+ pclntab: the runtime's own function table. It survives `-s -w` and
//! `strip`, so it is the source of truth for function names, bounds, file:line and the
//! PCDATA tables (UnsafePoint above all) that decide where code may be patched.
//!
//! Layout (Go's `runtime/symtab.go`, `cmd/link/internal/ld/pcln.go`): a `pcHeader`,
//! then the name, CU, file, pc-value and function tables at offsets the header gives.

use std::borrow::Cow;

use crate::buildinfo::read_uvarint;

pub const MAGIC_GO120: u32 = 0xffff_fff1;
const OLD_MAGICS: [(u32, &str); 3] =
    [(0xffff_fff0, "go1.18 or go1.19"), (0xffff_fffa, "go1.16 or go1.17"), (0xffff_fffb, "go1.2 to go1.15")];
const HEADER_LEN: usize = 72;

/// `_func` flag bits (`internal/abi.FuncFlag`).
pub const FUNC_FLAG_TOP_FRAME: u8 = 1;
pub const FUNC_FLAG_SPWRITE: u8 = 2;
pub const FUNC_FLAG_ASM: u8 = 4;

/// PCDATA table indices (`internal/abi`).
pub const PCDATA_UNSAFE_POINT: u32 = 0;
/// UnsafePoint values: -1 safe, -2 unsafe, -3..-5 restartable sequences.
pub const UNSAFE_POINT_SAFE: i32 = -1;
pub const UNSAFE_POINT_UNSAFE: i32 = -2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PclntabError {
    #[error("no Go function table (pclntab) found")]
    NotFound,
    #[error("pclntab layout of {era} is not supported (need go1.20 or newer)")]
    OldLayout { era: &'static str },
    #[error("malformed pclntab: {reason}")]
    Malformed { reason: String },
}

fn malformed(reason: impl Into<String>) -> PclntabError {
    PclntabError::Malformed { reason: reason.into() }
}

/// A function as the pclntab describes it. Addresses are link-time (add the load bias
/// of a PIE process to get run-time addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Func<'a> {
    pub name: Cow<'a, str>,
    pub entry: u64,
    /// The next function's entry (alignment padding included), as `debug/gosym` does.
    pub end: u64,
    pub flag: u8,
    pub func_id: u8,
    /// Size of the arguments and results area in bytes (`_func.args`).
    pub args: i32,
    pub start_line: i32,
    /// Index into the functab, used to look the record up again.
    pub index: u32,
    raw: RawFunc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawFunc {
    pcsp: u32,
    pcfile: u32,
    pcln: u32,
    npcdata: u32,
    cu_offset: u32,
    /// Offset of `pcdata[0]` from the start of the table.
    pcdata_at: usize,
}

impl Func<'_> {
    pub fn is_asm(&self) -> bool {
        self.flag & FUNC_FLAG_ASM != 0
    }
    pub fn size(&self) -> u64 {
        self.end - self.entry
    }
    pub fn contains(&self, pc: u64) -> bool {
        (self.entry..self.end).contains(&pc)
    }
}

/// A parsed pclntab. `data` starts at the `pcHeader` and runs at least to the end of the
/// table; all offsets are checked against it.
#[derive(Debug, Clone)]
pub struct Pclntab<'a> {
    data: &'a [u8],
    nfunc: usize,
    text_start: u64,
    funcname: usize,
    cu: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

impl<'a> Pclntab<'a> {
    /// Checks the header without parsing the tables: used to recognise the pclntab by
    /// its magic when no section names it.
    pub fn check_header(data: &[u8]) -> Result<(), PclntabError> {
        let magic = u32_at(data, 0).ok_or_else(|| malformed("truncated header"))?;
        if let Some((_, era)) = OLD_MAGICS.iter().find(|(m, _)| *m == magic)
            && data.get(4..8) == Some(&[0, 0, 1, 8])
        {
            return Err(PclntabError::OldLayout { era });
        }
        if magic != MAGIC_GO120 {
            return Err(PclntabError::NotFound);
        }
        if data.get(4..8) != Some(&[0, 0, 1, 8]) {
            return Err(malformed("header pad/minLC/ptrSize are not 0/0/1/8 (not amd64?)"));
        }
        Ok(())
    }

    /// Parses a pclntab. `text_start` overrides the header's `textStart`, which a PIE file
    /// may leave zero for the dynamic loader to fill in.
    pub fn parse(data: &'a [u8], text_start: Option<u64>) -> Result<Self, PclntabError> {
        Self::check_header(data)?;
        if data.len() < HEADER_LEN {
            return Err(malformed("truncated header"));
        }
        let word = |i: usize| u64_at(data, 8 + 8 * i).unwrap_or(0);
        let offset = |i: usize, what: &str| -> Result<usize, PclntabError> {
            let v = word(i);
            usize::try_from(v)
                .ok()
                .filter(|o| *o >= HEADER_LEN && *o <= data.len())
                .ok_or_else(|| malformed(format!("{what} offset {v:#x} outside the table ({:#x} bytes)", data.len())))
        };
        let nfunc = usize::try_from(word(0)).map_err(|_| malformed("function count"))?;
        let t = Pclntab {
            data,
            nfunc,
            text_start: text_start.unwrap_or(word(2)),
            funcname: offset(3, "funcname")?,
            cu: offset(4, "cu")?,
            filetab: offset(5, "filetab")?,
            pctab: offset(6, "pctab")?,
            functab: offset(7, "functab")?,
        };
        let functab_len =
            nfunc.checked_add(1).and_then(|n| n.checked_mul(8)).ok_or_else(|| malformed("function count overflows"))?;
        if t.functab.checked_add(functab_len).is_none_or(|end| end > data.len()) {
            return Err(malformed(format!("{nfunc} functions do not fit in the table")));
        }
        Ok(t)
    }

    /// The header's `textStart` as stored (zero in some PIE files).
    pub fn header_text_start(data: &[u8]) -> Option<u64> {
        u64_at(data, 24)
    }

    pub fn len(&self) -> usize {
        self.nfunc
    }
    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }
    pub fn text_start(&self) -> u64 {
        self.text_start
    }

    fn functab_entry(&self, i: usize) -> (u32, u32) {
        let off = self.functab + 8 * i;
        // In range: parse() checked that nfunc+1 entries fit.
        (u32_at(self.data, off).unwrap_or(0), u32_at(self.data, off + 4).unwrap_or(0))
    }

    /// The entry PC of function `i`; `i == len()` gives the end of the last function.
    pub fn entry_of(&self, i: usize) -> u64 {
        self.text_start.wrapping_add(u64::from(self.functab_entry(i).0))
    }

    /// Function `i` of the table, in entry order.
    pub fn func(&self, i: usize) -> Result<Func<'a>, PclntabError> {
        if i >= self.nfunc {
            return Err(malformed(format!("function index {i} out of range")));
        }
        let (entry_off, func_off) = self.functab_entry(i);
        let base = self
            .functab
            .checked_add(func_off as usize)
            .filter(|b| b.checked_add(44).is_some_and(|e| e <= self.data.len()))
            .ok_or_else(|| malformed(format!("function {i}: record offset {func_off:#x} out of range")))?;
        let d = self.data;
        let f = |k: usize| u32_at(d, base + 4 * k).unwrap_or(0);
        if f(0) != entry_off {
            return Err(malformed(format!(
                "function {i}: entry {:#x} disagrees with the functab {entry_off:#x}",
                f(0)
            )));
        }
        let name_off = f(1) as i32;
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|o| self.cstr(self.funcname, o))
            .ok_or_else(|| malformed(format!("function {i}: bad name offset {name_off}")))?;
        let npcdata = f(7);
        let nfuncdata = d[base + 43];
        let pcdata_at = base + 44;
        let tail = (npcdata as usize + nfuncdata as usize) * 4;
        if pcdata_at + tail > d.len() {
            return Err(malformed(format!("function {i}: pcdata/funcdata past the table")));
        }
        let entry = self.entry_of(i);
        let end = self.entry_of(i + 1);
        if end < entry {
            return Err(malformed(format!("function {i}: functab not sorted")));
        }
        Ok(Func {
            name,
            entry,
            end,
            flag: d[base + 41],
            func_id: d[base + 40],
            args: f(2) as i32,
            start_line: f(9) as i32,
            index: i as u32,
            raw: RawFunc { pcsp: f(4), pcfile: f(5), pcln: f(6), npcdata, cu_offset: f(8), pcdata_at },
        })
    }

    /// All functions, in entry order.
    pub fn funcs(&self) -> impl Iterator<Item = Result<Func<'a>, PclntabError>> + '_ {
        (0..self.nfunc).map(|i| self.func(i))
    }

    /// The function containing `pc` (link-time address).
    pub fn find(&self, pc: u64) -> Option<Func<'a>> {
        if self.nfunc == 0 || pc < self.entry_of(0) || pc >= self.entry_of(self.nfunc) {
            return None;
        }
        // Largest i with entry_of(i) <= pc.
        let (mut lo, mut hi) = (0, self.nfunc);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.entry_of(mid) <= pc { lo = mid } else { hi = mid }
        }
        self.func(lo).ok()
    }

    fn cstr(&self, table: usize, off: usize) -> Option<Cow<'a, str>> {
        let start = table.checked_add(off)?;
        let bytes = self.data.get(start..)?;
        let n = bytes.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&bytes[..n]))
    }

    /// The value of a pc-value table at `pc`, or None when `pc` is outside the function or
    /// the table is absent or malformed.
    pub fn pcvalue(&self, f: &Func<'_>, table_off: u32, pc: u64) -> Option<i32> {
        if table_off == 0 || !f.contains(pc) {
            return None;
        }
        self.pcvalue_ranges(f, table_off).find(|r| pc < r.end).map(|r| r.value)
    }

    /// The runs of a pc-value table as [start, end) ranges with their value.
    pub fn pcvalue_ranges(&self, f: &Func<'_>, table_off: u32) -> PcValueIter<'a> {
        let data = self
            .pctab
            .checked_add(table_off as usize)
            .and_then(|s| self.data.get(s..))
            .filter(|_| table_off != 0)
            .unwrap_or(&[]);
        PcValueIter { data, pc: f.entry, end: f.end, value: -1, first: true }
    }

    /// Source file and line of `pc`.
    pub fn line(&self, f: &Func<'_>, pc: u64) -> Option<(Cow<'a, str>, i32)> {
        let fileno = self.pcvalue(f, f.raw.pcfile, pc)?;
        let line = self.pcvalue(f, f.raw.pcln, pc)?;
        let idx = (f.raw.cu_offset as usize).checked_add(usize::try_from(fileno).ok()?)?;
        let file_off = u32_at(self.data, self.cu.checked_add(idx.checked_mul(4)?)?)?;
        if file_off == u32::MAX {
            return None;
        }
        Some((self.cstr(self.filetab, file_off as usize)?, line))
    }

    /// Offset of PCDATA table `index` for `f`, 0 when absent.
    fn pcdata_table(&self, f: &Func<'_>, index: u32) -> u32 {
        if index >= f.raw.npcdata {
            return 0;
        }
        u32_at(self.data, f.raw.pcdata_at + 4 * index as usize).unwrap_or(0)
    }

    /// The UnsafePoint PCDATA value at `pc`: -1 (safe, also when the table is absent),
    /// -2 (unsafe: no goroutine can be stopped there), or a restart marker.
    pub fn unsafe_point(&self, f: &Func<'_>, pc: u64) -> i32 {
        let t = self.pcdata_table(f, PCDATA_UNSAFE_POINT);
        self.pcvalue(f, t, pc).unwrap_or(UNSAFE_POINT_SAFE)
    }

    /// The UnsafePoint table of `f` as ranges.
    pub fn unsafe_point_ranges(&self, f: &Func<'_>) -> PcValueIter<'a> {
        self.pcvalue_ranges(f, self.pcdata_table(f, PCDATA_UNSAFE_POINT))
    }

    /// SP offset from the entry SP at `pc` (0 at entry; the frame size once set up).
    pub fn sp_delta(&self, f: &Func<'_>, pc: u64) -> Option<i32> {
        self.pcvalue(f, f.raw.pcsp, pc)
    }

    /// End of the function's code proper, before the INT3 alignment padding: the end of
    /// its pcsp table, which covers every instruction.
    pub fn code_end(&self, f: &Func<'_>) -> u64 {
        self.pcvalue_ranges(f, f.raw.pcsp).map(|r| r.end).max().unwrap_or(f.end).min(f.end)
    }

    /// Whether funcdata slot `index` is present (`FUNCDATA_LocalsPointerMaps` = 1: without
    /// it the runtime never preempts the function asynchronously).
    pub fn has_funcdata(&self, f: &Func<'_>, index: u8) -> bool {
        let nfuncdata = self.data.get(f.raw.pcdata_at - 1).copied().unwrap_or(0);
        if index >= nfuncdata {
            return false;
        }
        let off = f.raw.pcdata_at + 4 * (f.raw.npcdata as usize + index as usize);
        u32_at(self.data, off).is_some_and(|v| v != u32::MAX)
    }

    /// The function's frame size: the largest SP delta it reaches.
    pub fn frame_size(&self, f: &Func<'_>) -> i32 {
        self.pcvalue_ranges(f, f.raw.pcsp).map(|r| r.value).max().unwrap_or(0).max(0)
    }
}

/// One run of a pc-value table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcRange {
    pub start: u64,
    pub end: u64,
    pub value: i32,
}

/// Decodes a pc-value stream: (zig-zag value delta, pc delta) varint pairs.
pub struct PcValueIter<'a> {
    data: &'a [u8],
    pc: u64,
    end: u64,
    value: i32,
    first: bool,
}

impl Iterator for PcValueIter<'_> {
    type Item = PcRange;
    fn next(&mut self) -> Option<PcRange> {
        // Zero-length runs carry no PCs; skip them in a loop (bounded by the data).
        loop {
            if self.data.is_empty() || self.pc >= self.end {
                return None;
            }
            let (uvdelta, n) = read_uvarint(self.data)?;
            if uvdelta == 0 && !self.first {
                return None;
            }
            let (pcdelta, m) = read_uvarint(self.data.get(n..)?)?;
            self.data = &self.data[n + m..];
            self.first = false;
            let uv = uvdelta as u32;
            let delta = (uv >> 1) as i32 ^ -((uv & 1) as i32);
            self.value = self.value.wrapping_add(delta);
            let start = self.pc;
            self.pc = self.pc.saturating_add(pcdelta);
            if pcdelta != 0 {
                return Some(PcRange { start, end: self.pc.min(self.end), value: self.value });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_layouts_are_named() {
        let mut h = vec![0u8; 80];
        h[..4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        h[4..8].copy_from_slice(&[0, 0, 1, 8]);
        assert_eq!(Pclntab::parse(&h, None).unwrap_err(), PclntabError::OldLayout { era: "go1.18 or go1.19" });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in [0, 3, 8, 71, 72, 200] {
            let mut h = vec![0xffu8; len];
            if len >= 8 {
                h[..4].copy_from_slice(&MAGIC_GO120.to_le_bytes());
                h[4..8].copy_from_slice(&[0, 0, 1, 8]);
            }
            assert!(Pclntab::parse(&h, None).is_err());
        }
    }

    #[test]
    fn pcvalue_stream() {
        // value -1 -> +2 (=1) for 4 bytes; +1 (=2) for 3 bytes; end.
        let mut it =
            PcValueIter { data: &[0x04, 0x04, 0x02, 0x03, 0x00], pc: 0x100, end: 0x200, value: -1, first: true };
        assert_eq!(it.next(), Some(PcRange { start: 0x100, end: 0x104, value: 1 }));
        assert_eq!(it.next(), Some(PcRange { start: 0x104, end: 0x107, value: 2 }));
        assert_eq!(it.next(), None);
    }
}
