//! Go function symbols from `.symtab`, when the binary still has one. The pclntab is the
//! source of truth; the symbol table is an independent witness that tests compare with.

use object::{Object, ObjectSymbol, SymbolKind};

use crate::elf::Elf;

/// A text symbol: name, link-time address, size as the linker recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSymbol {
    pub name: String,
    pub address: u64,
    pub size: u64,
}

/// Text symbols inside the Go text range `[runtime.text, runtime.etext)`, sorted by
/// address; None when there is no symbol table (`-ldflags=-s`, strip).
pub fn go_text_symbols(elf: &Elf<'_>) -> Option<Vec<TextSymbol>> {
    let syms: Vec<_> = elf.file.symbols().collect();
    if syms.is_empty() {
        return None;
    }
    let addr_of = |name: &str| syms.iter().find(|s| s.name() == Ok(name)).map(|s| s.address());
    let (lo, hi) = (addr_of("runtime.text")?, addr_of("runtime.etext")?);
    let mut out: Vec<TextSymbol> = syms
        .iter()
        .filter(|s| s.kind() == SymbolKind::Text && (lo..hi).contains(&s.address()))
        .filter_map(|s| {
            let name = s.name().ok()?;
            (name != "runtime.text").then(|| TextSymbol {
                name: name.to_string(),
                address: s.address(),
                size: s.size(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address).then_with(|| a.name.cmp(&b.name)));
    Some(out)
}
