//! Line tables, UnsafePoint tables and the independence from `.symtab`, checked against
//! the Go toolchain's own tools on real fixture binaries.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use go_abi::GoBinary;
use go_abi::pclntab::{UNSAFE_POINT_SAFE, UNSAFE_POINT_UNSAFE};
use xtask::{Flavor, build_fixture, inject_binary, output, test_toolchains};

/// `go tool addr2line` on a sample of PCs inside every function: the same function name
/// and file:line as go-abi's pclntab reader.
#[test]
fn file_line_matches_go_tool_addr2line() -> Result<()> {
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie, Flavor::Cgo] {
            let exe = build_fixture("httpserver", &tc, flavor)?;
            let data = std::fs::read(&exe)?;
            let bin = GoBinary::parse(&data)?;
            let funcs = bin.functions()?;
            // Every 7th function, at its entry and at a PC in its middle.
            let pcs: Vec<u64> = funcs.iter().step_by(7).flat_map(|f| [f.entry, f.entry + f.size() / 2]).collect();
            let mut child = tc
                .command()
                .args(["tool", "addr2line"])
                .arg(&exe)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().context("stdin")?;
            let input: String = pcs.iter().map(|pc| format!("{pc:#x}\n")).collect();
            let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
            let out = child.wait_with_output()?;
            writer.join().expect("writer thread")?;
            let text = String::from_utf8(out.stdout)?;
            let lines: Vec<&str> = text.lines().collect();
            ensure!(lines.len() == 2 * pcs.len(), "addr2line printed {} lines for {} pcs", lines.len(), pcs.len());
            let mut compared = 0;
            for (i, pc) in pcs.iter().enumerate() {
                let (want_name, want_pos) = (lines[2 * i], lines[2 * i + 1]);
                let f = bin.pclntab.find(*pc).with_context(|| format!("{pc:#x} not found"))?;
                ensure!(f.name == want_name, "{pc:#x}: function {} vs addr2line {want_name}", f.name);
                let got_pos = match bin.pclntab.line(&f, *pc) {
                    Some((file, line)) => format!("{file}:{line}"),
                    // debug/gosym prints an unknown position (no pcfile table) as ":-1".
                    None => ":-1".to_string(),
                };
                // A function without a source file (linker markers such as
                // `go:textfipsstart`, Go 1.24+): gosym prints its raw line value after the
                // empty file name, go-abi gives no position.
                let no_file = got_pos == ":-1" && want_pos.starts_with(':');
                ensure!(got_pos == want_pos || no_file, "{pc:#x} in {}: {got_pos} vs addr2line {want_pos}", f.name);
                compared += 1;
            }
            eprintln!("Go {} {}: {compared} PCs agree with go tool addr2line", tc.version, flavor.name());
        }
    }
    Ok(())
}

/// Go's stack-check prologue `CMPQ SP, 16(R14); JLS morestack` is what inject patches; the
/// pclntab must say that the JLS (inside the 5 patched bytes) is an unsafe point and the
/// entry is not.
#[test]
fn stack_check_prologue_is_marked_unsafe() -> Result<()> {
    for tc in test_toolchains()? {
        let exe = build_fixture("funcs", &tc, Flavor::Default)?;
        let data = std::fs::read(&exe)?;
        let bin = GoBinary::parse(&data)?;
        let mut checked = 0;
        for f in bin.functions()?.iter().filter(|f| f.name.starts_with("main.") || f.name.starts_with("inject.test/")) {
            let code = bin.code(f).context("code")?;
            if !code.starts_with(&[0x49, 0x3b, 0x66, 0x10]) {
                continue; // NOSPLIT leaf: no stack check
            }
            ensure!(bin.pclntab.unsafe_point(f, f.entry) == UNSAFE_POINT_SAFE, "{}: entry not safe", f.name);
            ensure!(bin.pclntab.unsafe_point(f, f.entry + 4) == UNSAFE_POINT_UNSAFE, "{}: JLS not unsafe", f.name);
            ensure!(bin.pclntab.sp_delta(f, f.entry) == Some(0), "{}: SP delta at entry", f.name);
            ensure!(bin.pclntab.frame_size(f) > 0, "{}: a function with a stack check has a frame", f.name);
            checked += 1;
        }
        ensure!(checked >= 10, "only {checked} functions with a stack check");
        eprintln!("Go {}: {checked} prologues marked as expected", tc.version);
    }
    Ok(())
}

/// Results do not depend on `.symtab`/DWARF: the stripped build lists exactly what its
/// unstripped twin lists, source positions and frame sizes included.
#[test]
fn stripped_and_unstripped_list_identically() -> Result<()> {
    for tc in test_toolchains()? {
        for fixture in ["funcs", "httpserver"] {
            // Everything but the DWARF-only signatures must be identical.
            let list = |flavor| -> Result<Vec<serde_json::Value>> {
                let exe = build_fixture(fixture, &tc, flavor)?;
                let out =
                    output(Command::new(inject_binary()?).args(["functions", "--all", "--json", "--exe"]).arg(exe))?;
                let mut rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
                for r in &mut rows {
                    if let Some(o) = r.as_object_mut() {
                        o.remove("params");
                        o.remove("results");
                    }
                }
                Ok(rows)
            };
            let (full, stripped) = (list(Flavor::Default)?, list(Flavor::Stripped)?);
            ensure!(full == stripped, "{fixture} Go {}: stripped listing differs", tc.version);
            let data = std::fs::read(build_fixture(fixture, &tc, Flavor::Default)?)?;
            let bin = GoBinary::parse(&data)?;
            let syms = bin.symbols().context("the default build has .symtab")?;
            let funcs = bin.functions()?;
            // Every pclntab function is a symbol at the same address, with the size the
            // linker recorded no larger than the pclntab extent.
            let by_addr: std::collections::HashMap<u64, &go_abi::symtab::TextSymbol> =
                syms.iter().map(|s| (s.address, s)).collect();
            for f in &funcs {
                let s = by_addr.get(&f.entry).with_context(|| format!("{} has no symbol", f.name))?;
                ensure!(s.size <= f.size(), "{}: symbol size {} > pclntab extent {}", f.name, s.size, f.size());
            }
            let data = std::fs::read(build_fixture(fixture, &tc, Flavor::Stripped)?)?;
            ensure!(GoBinary::parse(&data)?.symbols().is_none(), "stripped build still has symbols");
        }
    }
    Ok(())
}
