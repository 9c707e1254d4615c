//! A whole Go executable from arbitrary bytes: `GoBinary::parse` (ELF, build info,
//! pclntab discovery by section, symbol and magic scan), then the function list and the
//! per-function facts `inject functions` prints.
#![no_main]

use go_abi::GoBinary;
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(|data: &[u8]| {
    let Ok(bin) = GoBinary::parse(data) else { return };
    let _ = bin.text_range();
    let _ = (bin.is_race(), bin.setting("-buildmode"), bin.runtime_layout_from_table());
    if let Ok(funcs) = bin.functions() {
        for (i, f) in funcs.iter().enumerate() {
            let _ = bin.code(f);
            // The pclntab target covers the per-PC queries; a sample keeps this one fast.
            if i % 16 == 0 {
                let _ = bin.pclntab.line(f, f.entry);
                let _ = bin.pclntab.frame_size(f);
            }
        }
    }
    if let Some(syms) = bin.symbols() {
        let _ = syms.len();
    }
});

// Mutate mostly in place on the structures that decide how the file is read.
fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let hot = go_abi_fuzz::elf_hot_spots(&data[..size.min(data.len())], seed);
    go_abi_fuzz::mutate(data, size, max_size, seed, &hot)
});
