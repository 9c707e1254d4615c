//! `inject functions` and `inject info`: what inject knows about a binary before it
//! touches anything.

use std::io::Write;

use anyhow::{Context, Result};
use go_abi::{Func, GoBinary};
use serde::Serialize;

use crate::target::{Executable, TargetArgs};

#[derive(Debug, clap::Args)]
pub struct FunctionsArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Include runtime, internal and assembly functions (hidden by default when a pattern
    /// is not given).
    #[arg(long)]
    all: bool,
    /// Show parameters and results (from DWARF) even for a full listing; by default they
    /// are shown when patterns select the functions (reading DWARF costs about as much as
    /// everything else for a large binary).
    #[arg(long)]
    signatures: bool,
    /// Shell-style globs (`main.*`, `*.(*Store).Get`) or, without `*?[`, substrings.
    #[arg(value_name = "PATTERN")]
    patterns: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn load(exe: &Executable) -> Result<GoBinary<'_>> {
    GoBinary::parse(&exe.map[..]).with_context(|| exe.path.display().to_string())
}

#[derive(Serialize)]
struct ValueJson {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    /// `RAX`, `RAX,RBX`, `X0`, or `stack+N` (offset from SP at entry).
    location: String,
}

impl From<&go_abi::signature::Value> for ValueJson {
    fn from(v: &go_abi::signature::Value) -> Self {
        ValueJson {
            name: v.name.clone(),
            type_name: v.type_name.clone(),
            location: go_abi::signature::ShowLocation(&v.location).to_string(),
        }
    }
}

#[derive(Serialize)]
struct FunctionRow {
    name: String,
    /// Run-time addresses when read from a process, else link-time.
    entry: u64,
    end: u64,
    size: u64,
    file: Option<String>,
    line: Option<i32>,
    frame_size: i32,
    asm: bool,
    /// From DWARF with register assignment; absent for stripped binaries or when DWARF
    /// does not describe the function completely.
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<Vec<ValueJson>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<Vec<ValueJson>>,
}

/// Matches a glob (`*`, `?`, `[...]` literal) against the whole name, or a substring.
pub fn matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return name.contains(pattern);
    }
    fn glob(p: &[u8], s: &[u8]) -> bool {
        let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
        while si < s.len() {
            if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == b'*' {
                star = Some(pi);
                mark = si;
                pi += 1;
            } else if let Some(st) = star {
                pi = st + 1;
                mark += 1;
                si = mark;
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
    glob(pattern.as_bytes(), name.as_bytes())
}

/// `--func` semantics: a glob over the whole name, or else the exact name (probing every
/// function that merely contains a word would surprise users).
pub fn matches_exact_or_glob(pattern: &str, name: &str) -> bool {
    if pattern.contains(['*', '?']) { matches(pattern, name) } else { pattern == name }
}

/// Runtime internals a user rarely means, and the C helpers a cgo build links (`_cgo_*`,
/// `crosscall1`: no package path); listed only with --all or a pattern.
fn is_internal(f: &Func<'_>) -> bool {
    let n = &f.name;
    f.is_asm()
        || !n.contains('.')
        || n.starts_with("runtime.")
        || n.starts_with("internal/")
        || n.starts_with("runtime/internal/")
        || n.starts_with("type:")
        || n.starts_with("go:")
}

pub fn functions(args: &FunctionsArgs) -> Result<()> {
    let exe = args.target.open()?;
    let bin = load(&exe)?;
    let funcs = bin.functions().with_context(|| exe.path.display().to_string())?;
    let selected: Vec<&Func<'_>> = funcs
        .iter()
        .filter(|f| {
            if args.patterns.is_empty() {
                args.all || !is_internal(f)
            } else {
                args.patterns.iter().any(|p| matches(p, &f.name))
            }
        })
        .collect();
    if !args.patterns.is_empty() && selected.is_empty() {
        anyhow::bail!("no function matches {}", args.patterns.join(" "));
    }
    // DWARF is optional: a stripped binary lists the same functions without signatures.
    let want_signatures = args.signatures || !args.patterns.is_empty();
    let dwarf = if want_signatures { bin.dwarf().ok().flatten() } else { None };
    let rows = selected.iter().map(|f| {
        let (file, line) = match bin.pclntab.line(f, f.entry) {
            Some((file, line)) => (Some(file.into_owned()), Some(line)),
            None => (None, None),
        };
        let sig = dwarf
            .as_ref()
            .and_then(|d| d.function_by_entry(f.entry))
            .and_then(|d| go_abi::signature::signature(d, f.args));
        FunctionRow {
            params: sig.as_ref().map(|s| s.params.iter().map(ValueJson::from).collect()),
            results: sig.as_ref().map(|s| s.results.iter().map(ValueJson::from).collect()),
            name: f.name.to_string(),
            entry: f.entry + exe.bias,
            end: f.end + exe.bias,
            size: f.size(),
            file,
            line,
            frame_size: bin.pclntab.frame_size(f),
            asm: f.is_asm(),
        }
    });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        let rows: Vec<FunctionRow> = rows.collect();
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{:<18} {:>7} {:>6}  {:<50} LOCATION", "ENTRY", "SIZE", "FRAME", "FUNCTION")?;
        for r in rows {
            let loc = match (&r.file, r.line) {
                (Some(f), Some(l)) => format!("{f}:{l}"),
                _ => "?".into(),
            };
            let asm = if r.asm { " [asm]" } else { "" };
            writeln!(out, "{:#018x} {:>7} {:>6}  {:<50} {loc}{asm}", r.entry, r.size, r.frame_size, r.name)?;
            if let (Some(params), Some(results)) = (&r.params, &r.results) {
                let show = |v: &[ValueJson]| {
                    v.iter()
                        .map(|v| format!("{} {}: {}", v.name, v.type_name, v.location))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let arrow = if results.is_empty() { String::new() } else { format!(" -> ({})", show(results)) };
                writeln!(out, "{:>36}({}){arrow}", "", show(params))?;
            }
        }
    }
    out.flush().or_else(ignore_broken_pipe)?;
    Ok(())
}

fn ignore_broken_pipe(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) }
}

#[derive(Serialize)]
struct ModuleJson {
    path: String,
    version: String,
    sum: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    replace: Option<Box<ModuleJson>>,
}

impl From<&go_abi::Module> for ModuleJson {
    fn from(m: &go_abi::Module) -> Self {
        ModuleJson {
            path: m.path.clone(),
            version: m.version.clone(),
            sum: m.sum.clone(),
            replace: m.replace.as_deref().map(|r| Box::new(ModuleJson::from(r))),
        }
    }
}

#[derive(Serialize)]
struct InfoJson {
    executable: String,
    pid: Option<i32>,
    go_version: String,
    path: String,
    main: Option<ModuleJson>,
    deps: Vec<ModuleJson>,
    settings: serde_json::Map<String, serde_json::Value>,
    pie: bool,
    dynamic: bool,
    load_bias: u64,
    functions: usize,
    symbols: bool,
    pclntab: String,
    goid_offset: Option<u32>,
}

pub fn info(args: &InfoArgs) -> Result<()> {
    let exe = args.target.open()?;
    let bin = load(&exe)?;
    let bi = &bin.build_info;
    let info = InfoJson {
        executable: exe.path.display().to_string(),
        pid: exe.pid,
        go_version: bi.go_version.clone(),
        path: bi.path.clone(),
        main: bi.main.as_ref().map(ModuleJson::from),
        deps: bi.deps.iter().map(ModuleJson::from).collect(),
        settings: bi.settings.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        pie: bin.elf.pie,
        dynamic: bin.elf.dynamic,
        load_bias: exe.bias,
        functions: bin.pclntab.len(),
        symbols: bin.symbols().is_some(),
        pclntab: format!("{:?} at {:#x}", bin.pclntab_location, bin.pclntab_vaddr),
        // From the version table: `info` stays fast on huge binaries (the layout table is
        // checked against DWARF by the test suite).
        goid_offset: bin.runtime_layout_from_table().map(|l| l.goid),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &info)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "executable  {}", info.executable)?;
    if let Some(pid) = info.pid {
        writeln!(out, "pid         {pid} (load bias {:#x})", info.load_bias)?;
    }
    writeln!(out, "go          {}", info.go_version)?;
    writeln!(out, "path        {}", info.path)?;
    if let Some(m) = &bi.main {
        writeln!(out, "main        {} {}", m.path, m.version)?;
    }
    writeln!(
        out,
        "layout      {}, {}, {} functions, symbols {}, pclntab {}",
        if info.pie { "PIE" } else { "fixed address" },
        if info.dynamic { "dynamically linked" } else { "static" },
        info.functions,
        if info.symbols { "present" } else { "stripped" },
        info.pclntab
    )?;
    for d in &bi.deps {
        write!(out, "dep         {} {}", d.path, d.version)?;
        if let Some(r) = &d.replace {
            write!(out, " => {} {}", r.path, r.version)?;
        }
        writeln!(out)?;
    }
    for (k, v) in &bi.settings {
        writeln!(out, "build       {k}={v}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_and_substrings() {
        assert!(matches("main.*", "main.priceOf"));
        assert!(!matches("main.*", "xmain.priceOf"));
        assert!(matches("*.(*Store).Get", "inject.test/fixtures/funcs/store.(*Store).Get"));
        assert!(matches("price", "main.priceOf"));
        assert!(matches("main.?riceOf", "main.priceOf"));
        assert!(matches("priceO", "main.priceOf"));
        assert!(!matches("main.priceOf?", "main.priceOf"));
    }
}
