//! Shared by the fuzz targets: a mutator for large, structured inputs (whole Go binaries
//! and pclntabs of hundreds of kilobytes).
//!
//! libFuzzer's own mutations pick their spot uniformly and often insert or erase bytes,
//! which shifts every file offset behind them: on a megabyte-sized executable almost all
//! mutants then fail the first bounds check, and the few bytes that decide how a Go binary
//! is read (ELF and program headers, the pclntab header and its tables, `.go.buildinfo`)
//! are rarely touched. So most of the time we mutate in place, inside a small window
//! placed on one of those structures, and keep the length.

use libfuzzer_sys::fuzzer_mutate;

/// Bytes mutated in place at a time.
pub const WINDOW: usize = 128;

const PCLNTAB_MAGIC: [u8; 8] = [0xf1, 0xff, 0xff, 0xff, 0, 0, 1, 8];
const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// Mutates `data[..size]` and returns the new size: one time in four with libFuzzer's
/// own mutations (which may change the length), otherwise in place within a window at
/// one of the `hot` offsets (or, one time in `hot.len() + 1`, at a random offset).
pub fn mutate(data: &mut [u8], size: usize, max_size: usize, seed: u32, hot: &[usize]) -> usize {
    let size = size.min(data.len());
    if size < 16 || seed.is_multiple_of(4) {
        return fuzzer_mutate(data, size, max_size);
    }
    let mut rng = u64::from(seed) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize
    };
    let pick = next() % (hot.len() + 1);
    let at = match hot.get(pick) {
        // At or just after the start of the structure.
        Some(&h) if h < size => (h + next() % (WINDOW / 2)).min(size - 1),
        _ => next() % size,
    };
    let len = WINDOW.min(size - at);
    let mut window = data[at..at + len].to_vec();
    let n = fuzzer_mutate(&mut window, len, len);
    data[at..at + n].copy_from_slice(&window[..n]);
    size
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

/// The pclntab's own hot spots, for a table starting at `base`: its header, the starts of
/// the tables the header points to, and one functab entry and its `_func` record.
pub fn pclntab_hot_spots(data: &[u8], base: usize, seed: u32, out: &mut Vec<usize>) {
    out.push(base);
    let Some(tab) = data.get(base..) else { return };
    let word = |i: usize| u64_at(tab, 8 + 8 * i).and_then(|v| usize::try_from(v).ok());
    for i in 3..=7 {
        if let Some(off) = word(i).filter(|o| *o < tab.len()) {
            out.push(base + off);
        }
    }
    if let (Some(nfunc), Some(functab)) = (word(0), word(7))
        && nfunc > 0
        && functab < tab.len()
        && let Some(entry) = functab.checked_add(8 * (seed as usize % nfunc)).filter(|e| *e < tab.len())
    {
        out.push(base + entry);
        if let Some(func_off) = u32_at(tab, entry + 4) {
            out.push(base + functab + func_off as usize);
        }
    }
}

/// The hot spots of a whole ELF file: ELF header, program headers, section headers, and
/// the pclntab and `.go.buildinfo` wherever their magic numbers sit.
pub fn elf_hot_spots(data: &[u8], seed: u32) -> Vec<usize> {
    let mut out = vec![0, 64];
    if let Some(shoff) = u64_at(data, 0x28).and_then(|v| usize::try_from(v).ok()) {
        out.push(shoff);
    }
    if let Some(i) = data.chunks_exact(8).position(|c| c == PCLNTAB_MAGIC) {
        pclntab_hot_spots(data, 8 * i, seed, &mut out);
    }
    if let Some(i) = data.chunks_exact(16).position(|c| c.starts_with(BUILDINFO_MAGIC)) {
        out.push(16 * i);
    }
    out
}
