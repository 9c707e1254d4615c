//! The pclntab reader on arbitrary bytes: parse, then walk every function (bounded) with
//! every per-PC query inject makes: names, file:line, UnsafePoint, SP deltas, frame
//! sizes, pc-value ranges and `find`.
#![no_main]

use go_abi::Pclntab;
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

/// Bounds on the work per input, so a header claiming millions of functions stays fast.
const MAX_FUNCS: usize = 4096;
const MAX_RANGES: usize = 512;

fn walk(tab: &Pclntab<'_>, max_funcs: usize) {
    let _ = (tab.len(), tab.is_empty(), tab.text_start());
    assert!(tab.func(tab.len()).is_err(), "func(len()) must be out of range");
    for f in tab.funcs().take(max_funcs) {
        let Ok(f) = f else { continue };
        assert!(f.entry <= f.end, "{}: entry {:#x} after end {:#x}", f.name, f.entry, f.end);
        let _ = (f.name.len(), f.size(), f.is_asm());
        for pc in [f.entry, f.entry + f.size() / 2, f.end] {
            let _ = tab.line(&f, pc);
            let _ = tab.unsafe_point(&f, pc);
            let _ = tab.sp_delta(&f, pc);
        }
        let mid = f.entry + f.size() / 2;
        if let Some(g) = tab.find(mid) {
            assert!(g.contains(mid), "find({mid:#x}) returned {} [{:#x}, {:#x})", g.name, g.entry, g.end);
        }
        let _ = tab.frame_size(&f);
        for r in tab.unsafe_point_ranges(&f).take(MAX_RANGES) {
            assert!(r.start < r.end, "empty pc range {r:?}");
        }
        // Any offset into the pc-value tables must decode (or stop) without harm.
        if f.index % 16 == 0 {
            for r in tab.pcvalue_ranges(&f, f.entry as u32 ^ f.index).take(MAX_RANGES) {
                assert!(r.start < r.end, "empty pc range {r:?}");
            }
        }
    }
    for pc in [0, tab.text_start(), tab.entry_of(0), tab.entry_of(tab.len()), u64::MAX] {
        let _ = tab.find(pc);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(tab) = Pclntab::parse(data, None) {
        walk(&tab, MAX_FUNCS);
    }
    // A text start near the top of the address space: entry arithmetic must not overflow.
    if let Ok(tab) = Pclntab::parse(data, Some(u64::MAX - 0xfff)) {
        walk(&tab, 64);
    }
});

// Mutate mostly in place on the header, the tables it points to and one function record.
fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut hot = Vec::new();
    go_abi_fuzz::pclntab_hot_spots(&data[..size.min(data.len())], 0, seed, &mut hot);
    go_abi_fuzz::mutate(data, size, max_size, seed, &hot)
});
