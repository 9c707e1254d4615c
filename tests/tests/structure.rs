//! The shape of the source, checked rather than hoped for: every source file says what it
//! owns (a `//!` comment first), none is over 800 lines outside tests (generated tables aside), and the modules of
//! each directory do not import each other in a cycle (`crate::`, `super::` and `self::`
//! paths, `use` groups included), so that the layering the README draws holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};

const MAX_LINES: usize = 800;

/// Crates of the workspace with their source directory (every member with a `src/`).
fn crate_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root)? {
        let dir = e?.path();
        let src = dir.join("src");
        if dir.join("Cargo.toml").is_file() && src.is_dir() && !dir.ends_with("fuzz") {
            out.push(src);
        }
    }
    out.sort();
    Ok(out)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Test code: a `tests.rs` module, or anything under `tests/` or `testdata/`.
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs") || rel.components().any(|c| c.as_os_str() == "testdata")
}

/// The module path of a file relative to `src` (`backend/trampoline/install.rs` →
/// backend::trampoline::install; `mod.rs`, `lib.rs` and `main.rs` name their directory).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") && !rel.starts_with("bin") {
        parts.push(stem.to_string());
    }
    parts
}

/// Paths after `crate::`, `super::` or `self::` on one line, made absolute from `here` (the
/// file's module path), `use` groups expanded to one path per item.
fn paths_in(line: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':');
        let rest = &b[i..];
        let base = if !word_start {
            None
        } else if rest.starts_with(b"crate::") {
            Some((Vec::new(), 7))
        } else if rest.starts_with(b"self::") {
            Some((here.to_vec(), 6))
        } else if rest.starts_with(b"super::") {
            let mut up = here.to_vec();
            let mut n = 0;
            while b[i + n..].starts_with(b"super::") {
                up.pop();
                n += 7;
            }
            Some((up, n))
        } else {
            None
        };
        match base {
            // The keywords are ASCII: i + skip is a character boundary.
            Some((prefix, skip)) => i += skip + tail(&b[i + skip..], prefix, &mut out).max(1),
            None => i += 1,
        }
    }
    out
}

/// Reads `a::b::{c, d::e}` at the start of `s` onto `prefix`; returns the bytes used.
fn tail(b: &[u8], mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut i = 0;
    loop {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            let mut depth = 1;
            let mut item = i + 1;
            let mut j = i + 1;
            while j < b.len() && depth > 0 {
                match b[j] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 1 => {
                        tail(&b[item..j], prefix.clone(), out);
                        item = j + 1;
                    }
                    _ => {}
                }
                if depth == 0 && item < j {
                    tail(&b[item..j], prefix.clone(), out);
                }
                j += 1;
            }
            return j;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            prefix.push(String::from_utf8_lossy(&b[start..i]).into_owned());
        }
        if b[i..].starts_with(b"::") {
            i += 2;
            continue;
        }
        if i > start {
            out.push(prefix);
        }
        return i;
    }
}

struct Checked {
    long: Vec<String>,
    undocumented: Vec<String>,
    cycles: Vec<String>,
    edges: usize,
}

fn check_crate(src: &Path) -> Result<Checked> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut checked = Checked { long: Vec::new(), undocumented: Vec::new(), cycles: Vec::new(), edges: 0 };
    // Modules per directory (by module path of the directory).
    let mut modules: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let mut sources: Vec<(Vec<String>, String)> = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src)?.to_path_buf();
        let text = std::fs::read_to_string(f)?;
        if is_test_file(&rel) {
            continue;
        }
        if !text.starts_with("//!") {
            checked.undocumented.push(rel.display().to_string());
        }
        let code_lines = text.lines().take_while(|l| !l.starts_with("#[cfg(test)]")).count();
        // A generated table (go-abi's offsets, one row per release) is data, not code.
        let generated = text.lines().take(10).any(|l| l.contains("do not edit by hand"));
        if code_lines > MAX_LINES && !generated {
            checked.long.push(format!("{} ({code_lines} lines)", rel.display()));
        }
        let path = module_path(&rel);
        if let Some((name, parent)) = path.split_last() {
            modules.entry(parent.to_vec()).or_default().insert(name.clone());
        }
        let code: String = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        sources.push((path, code));
    }
    // Edges between sibling modules, per directory.
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (here, code) in &sources {
        for line in code.lines() {
            for target in paths_in(line, here) {
                for depth in 0..here.len() {
                    let dir = &here[..depth];
                    let from = &here[depth];
                    let Some(siblings) = modules.get(dir) else { continue };
                    if target.len() > depth
                        && target[..depth] == *dir
                        && target[depth] != *from
                        && siblings.contains(&target[depth])
                    {
                        graphs
                            .entry(dir.to_vec())
                            .or_default()
                            .entry(from.clone())
                            .or_default()
                            .insert(target[depth].clone());
                    }
                }
            }
        }
    }
    for (dir, g) in &graphs {
        checked.edges += g.values().map(BTreeSet::len).sum::<usize>();
        if let Some(cycle) = find_cycle(g) {
            let at = if dir.is_empty() { "crate root".to_string() } else { dir.join("::") };
            checked.cycles.push(format!("{} in {at}: {}", src.parent().unwrap_or(src).display(), cycle.join(" -> ")));
        }
    }
    Ok(checked)
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn the_parser_sees_every_kind_of_path() {
    let here: Vec<String> = vec!["backend".into(), "trampoline".into(), "install".into()];
    let p = paths_in("use crate::{collect, libs::{self, Notes}, backend::trampoline::ptrace::Session};", &here);
    let s: Vec<String> = p.iter().map(|v| v.join("::")).collect();
    assert_eq!(s, ["collect", "libs::self", "libs::Notes", "backend::trampoline::ptrace::Session"]);
    let p = paths_in("use super::window::{keep_looking}; let x = super::super::Backend;", &here);
    let s: Vec<String> = p.iter().map(|v| v.join("::")).collect();
    assert_eq!(s, ["backend::trampoline::window::keep_looking", "backend::Backend"]);
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g), Some(vec!["a".to_string(), "b".to_string(), "a".to_string()]));
    g.get_mut("b").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}

#[test]
fn source_files_are_documented_short_and_acyclic() -> Result<()> {
    let root = xtask::workspace_root();
    let mut problems = Vec::new();
    let mut edges = 0;
    let crates = crate_sources(&root)?;
    ensure!(crates.len() >= 5, "found only {} crates under {}", crates.len(), root.display());
    for src in &crates {
        let c = check_crate(src)?;
        edges += c.edges;
        let name = src.parent().unwrap_or(src).display().to_string();
        problems.extend(c.long.iter().map(|l| format!("{name}: over {MAX_LINES} lines: {l}")));
        problems.extend(c.undocumented.iter().map(|l| format!("{name}: no //! comment first: {l}")));
        problems.extend(c.cycles);
    }
    ensure!(edges > 20, "only {edges} module dependencies found: the path parser is broken");
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
