//! offset-tool: generates `go-abi/src/offsets.rs`, the struct field offsets inject falls
//! back to for binaries without DWARF. The fields wanted are listed in `modules.toml`:
//! for the standard library, rows keyed by Go release, read from `fixtures/offsets` built
//! with each Go of go-versions.toml; for each instrumented library, rows keyed by module
//! version, read from a probe program built against each listed version (fetched through
//! the Go module proxy). With `check`, nothing is written: the table is regenerated in
//! memory and any drift from the checked-in file is an error that lists the differences.
//!
//! A tool's library (the binary and the tests call it), so errors are anyhow's, as in xtask.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use xtask::{Flavor, GoToolchain, build_fixture, workspace_root};

/// (major, minor, patch): a Go release (patch 0) or a module version.
pub type Version = (u32, u32, u32);

/// modules.toml.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub std: StdConfig,
    #[serde(default, rename = "module")]
    pub modules: Vec<ModuleConfig>,
}

/// The standard library's fields, read from a fixture of `fixtures/`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdConfig {
    pub fixture: String,
    #[serde(default)]
    pub required: Vec<String>,
    /// A version between two listed ones uses the lower row (for a module whose structs
    /// were checked, in its history, not to change between the rows). Otherwise a row
    /// covers its own minor series only, and other versions have no offsets: better no
    /// probe than a read at a wrong offset.
    #[serde(default)]
    pub lower_row: bool,
    pub structs: BTreeMap<String, Vec<String>>,
}

/// One instrumented library module.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub path: String,
    pub versions: Vec<String>,
    /// A directory of Go sources (package main), relative to the workspace root.
    pub probe: String,
    #[serde(default)]
    pub required: Vec<String>,
    /// A version between two listed ones uses the lower row (for a module whose structs
    /// were checked, in its history, not to change between the rows). Otherwise a row
    /// covers its own minor series only, and other versions have no offsets: better no
    /// probe than a read at a wrong offset.
    #[serde(default)]
    pub lower_row: bool,
    pub structs: BTreeMap<String, Vec<String>>,
}

pub fn config_path() -> PathBuf {
    workspace_root().join("offset-tool/modules.toml")
}

pub fn table_path() -> PathBuf {
    workspace_root().join("go-abi/src/offsets.rs")
}

/// Reads and validates modules.toml.
pub fn load_config() -> Result<Config> {
    let path = config_path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: Config = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for m in &config.modules {
        ensure!(m.path != "std", "{}: `std` is the [std] section, not a module", path.display());
        ensure!(!m.versions.is_empty(), "{}: {} lists no versions", path.display(), m.path);
        let parsed = m.versions.iter().map(|v| module_version(v)).collect::<Result<Vec<_>>>()?;
        ensure!(
            parsed.windows(2).all(|w| w[0] < w[1]),
            "{}: the versions of {} must be ascending and distinct",
            path.display(),
            m.path
        );
    }
    Ok(config)
}

/// `v1.58.3` as (1, 58, 3). Only released versions may be listed: a pre-release or a
/// pseudo-version has no place in a version range.
pub fn module_version(v: &str) -> Result<Version> {
    let parse = || -> Option<Version> {
        let mut parts = v.strip_prefix('v')?.split('.').map(|p| p.parse::<u32>().ok());
        let triple = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(triple)
    };
    parse().with_context(|| format!("{v:?} is not a released module version (vMAJOR.MINOR.PATCH)"))
}

fn go_release(version: &str) -> Result<Version> {
    let mut it = version.split(['.', '-']);
    let mut next = || -> Result<u32> {
        it.next().context("empty")?.parse::<u32>().with_context(|| format!("Go version {version:?}"))
    };
    Ok((next()?, next()?, 0))
}

/// Where a row sits in the table: `std` first, then libraries by path, each by version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub library: bool,
    pub module: String,
    pub from: Version,
}

impl RowKey {
    fn std(release: Version) -> Self {
        RowKey { library: false, module: "std".into(), from: release }
    }

    fn label(&self) -> String {
        let (a, b, c) = self.from;
        if self.library { format!("{} v{a}.{b}.{c}", self.module) } else { format!("std go{a}.{b}") }
    }
}

/// One row's content: the toolchain that built the probe, and `struct.field` offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub generator: String,
    pub fields: BTreeMap<String, u64>,
}

pub type Table = BTreeMap<RowKey, Row>;

/// The rows compiled into go-abi: the checked-in file as it stands.
pub fn current_table() -> Table {
    go_abi::offsets::TABLE
        .iter()
        .map(|r| {
            let key = RowKey { library: r.module != "std", module: r.module.to_string(), from: r.from };
            let fields = r.fields.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            (key, Row { generator: r.generator.to_string(), fields })
        })
        .collect()
}

/// Reads the `structs` offsets from the DWARF of `exe`. A struct missing from the DWARF is
/// left out when `declared` says its package does not declare it in this version, and is
/// an error otherwise (the probe does not link it).
fn read_fields(
    exe: &Path,
    structs: &BTreeMap<String, Vec<String>>,
    declared: impl Fn(&str) -> Result<bool>,
) -> Result<BTreeMap<String, u64>> {
    let data = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let bin = go_abi::GoBinary::parse(&data).with_context(|| exe.display().to_string())?;
    let dwarf = bin.dwarf()?.with_context(|| format!("{}: no DWARF", exe.display()))?;
    let mut out = BTreeMap::new();
    for (strukt, paths) in structs {
        if dwarf.struct_layout(strukt)?.is_none() {
            ensure!(
                !declared(strukt)?,
                "{strukt} is declared by its package but not in the DWARF of {}: the probe must use it",
                exe.display()
            );
            continue;
        }
        'path: for path in paths {
            let mut ty = strukt.clone();
            let mut offset = 0;
            for part in path.split('.') {
                // A path goes through structs embedded by value: through a pointer, this
                // version keeps the field elsewhere (grpc-go's ServerStream held a *Stream
                // before it embedded one), so its row has no such key.
                if ty.starts_with('*') {
                    continue 'path;
                }
                let layout = dwarf
                    .struct_layout(&ty)?
                    .with_context(|| format!("{}: no struct {ty} (in {strukt}.{path})", exe.display()))?;
                let Some(f) = layout.fields.iter().find(|f| f.name == part) else { continue 'path };
                offset += f.offset;
                ty = f.type_name.to_string();
            }
            out.insert(format!("{strukt}.{path}"), offset);
        }
    }
    Ok(out)
}

/// Whether the Go sources of `strukt`'s package (`net/http.Request`: net/http) declare
/// the type, as `go list` finds the package from `dir`'s module.
fn package_declares(tc: &GoToolchain, dir: &Path, strukt: &str) -> Result<bool> {
    let slash = strukt.rfind('/').map_or(0, |i| i + 1);
    let dot = strukt[slash..].find('.').map(|i| slash + i).with_context(|| format!("{strukt}: no package"))?;
    let (pkg, name) = (&strukt[..dot], &strukt[dot + 1..]);
    let pkg_dir = xtask::output(tc.command().current_dir(dir).args(["list", "-e", "-f", "{{.Dir}}", pkg]))?;
    let pkg_dir = pkg_dir.trim();
    if pkg_dir.is_empty() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(pkg_dir).with_context(|| format!("reading {pkg_dir}"))? {
        let p = entry?.path();
        let file = p.file_name().unwrap_or_default().to_string_lossy();
        if !file.ends_with(".go") || file.ends_with("_test.go") {
            continue;
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let found = text.lines().any(|line| {
            let t = line.trim_start();
            let t = t.strip_prefix("type ").unwrap_or(t);
            t.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '\t', '[']) && rest.contains("struct"))
        });
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

fn check_required(label: &str, required: &[String], fields: &BTreeMap<String, u64>) -> Result<()> {
    for must in required {
        ensure!(fields.contains_key(must), "{label}: required field {must} not found in the probe's DWARF");
    }
    Ok(())
}

/// The `std` row of one toolchain.
pub fn std_row(config: &StdConfig, tc: &GoToolchain) -> Result<Row> {
    let exe = build_fixture(&config.fixture, tc, Flavor::Default)?;
    let fixtures = workspace_root().join("fixtures");
    let fields = read_fields(&exe, &config.structs, |s| package_declares(tc, &fixtures, s))
        .with_context(|| format!("go{}", tc.version))?;
    check_required(&format!("go{}", tc.version), &config.required, &fields)?;
    Ok(Row { generator: format!("go{}", tc.version), fields })
}

/// The row of one module version: its probe built with `tc` in a scratch module that
/// requires exactly that version (`go mod tidy` resolves the rest through the proxy).
pub fn module_row(config: &ModuleConfig, version: &str, tc: &GoToolchain) -> Result<Row> {
    let label = format!("{}@{version}", config.path);
    let dir = workspace_root()
        .join("target/offset-tool")
        .join(format!("{}.{:?}", std::process::id(), std::thread::current().id()))
        .join(format!("{}@{version}", config.path.replace('/', "_")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = workspace_root().join(&config.probe);
    for entry in std::fs::read_dir(&probe).with_context(|| format!("reading {}", probe.display()))? {
        let p = entry?.path();
        if p.extension().is_some_and(|x| x == "go") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap_or_default()))?;
        }
    }
    let go_mod = format!("module inject.offsets/probe\n\ngo 1.21\n\nrequire {} {version}\n", config.path);
    std::fs::write(dir.join("go.mod"), go_mod)?;
    let result = (|| {
        xtask::run(tc.command().current_dir(&dir).args(["mod", "tidy"])).context("go mod tidy")?;
        let resolved =
            xtask::output(tc.command().current_dir(&dir).args(["list", "-m", "-f", "{{.Version}}", &config.path]))?;
        ensure!(
            resolved.trim() == version,
            "the probe's build list has {} {}, not {version}",
            config.path,
            resolved.trim()
        );
        let exe = dir.join("probe");
        xtask::run(tc.command().current_dir(&dir).env("CGO_ENABLED", "0").args(["build", "-o"]).arg(&exe).arg("."))
            .context("go build")?;
        let fields = read_fields(&exe, &config.structs, |s| package_declares(tc, &dir, s))?;
        ensure!(!fields.is_empty(), "none of the fields listed was found");
        check_required(&label, &config.required, &fields)?;
        Ok(Row { generator: format!("go{}", tc.version), fields })
    })()
    .with_context(|| format!("{label} (probe {}, go{}, in {})", config.probe, tc.version, dir.display()));
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
    }
    result
}

/// The modules whose rows reach to the next listed version ([`ModuleConfig::lower_row`]).
pub fn lower_row_modules(config: &Config) -> BTreeSet<String> {
    config.modules.iter().filter(|m| m.lower_row).map(|m| m.path.clone()).collect()
}

/// The generated source of `table`; rows of `lower_row` modules reach to the next listed
/// version, other rows to the next minor release.
pub fn render(table: &Table, lower_row: &BTreeSet<String>) -> String {
    let mut s = String::from(HEADER);
    let keys: Vec<&RowKey> = table.keys().collect();
    for (i, (key, row)) in table.iter().enumerate() {
        let (a, b, c) = key.from;
        let next_minor = (a, b + 1, 0);
        let until = match keys.get(i + 1) {
            Some(next) if key.library && next.module == key.module && lower_row.contains(&key.module) => next.from,
            Some(next) if key.library && next.module == key.module => next.from.min(next_minor),
            _ => next_minor,
        };
        let _ = writeln!(
            s,
            "    Row {{\n        module: {:?},\n        from: ({a}, {b}, {c}),\n        until: ({}, {}, {}),\n        \
             generator: {:?},\n        fields: &[",
            key.module, until.0, until.1, until.2, row.generator
        );
        for (k, v) in &row.fields {
            let _ = writeln!(s, "            ({k:?}, {v}),");
        }
        s.push_str("        ],\n    },\n");
    }
    s.push_str("];\n");
    s
}

const HEADER: &str = r#"//! Struct field offsets for binaries without DWARF, by module and version range.
//!
//! Generated by `offset-tool` (`cargo xtask offsets`); do not edit by hand. Rows of `std`
//! come from the DWARF of `fixtures/offsets` built with each Go of go-versions.toml (one
//! row per Go release); rows of a library module from a probe program built against each
//! version offset-tool/modules.toml lists. `offset-tool --check` regenerates the table and
//! fails on any difference.

/// The offsets of one module for the versions `from..until`.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// `"std"` (versions are Go releases) or a Go module path.
    pub module: &'static str,
    /// The version the offsets were read from, (major, minor, patch); patch 0 for `std`.
    pub from: (u32, u32, u32),
    /// The first version the row no longer covers: the next listed version, or the next
    /// minor release after the last one listed (always the next minor release for `std`).
    pub until: (u32, u32, u32),
    /// The Go toolchain that built the probe.
    pub generator: &'static str,
    /// `("struct.field", offset)`, sorted; fields that version lacks are absent.
    pub fields: &'static [(&'static str, u64)],
}

/// Ascending by module (`std` first), then by version.
#[rustfmt::skip]
pub const TABLE: &[Row] = &[
"#;

/// The differences between two tables, one line each; empty when they agree.
pub fn diff(old: &Table, new: &Table) -> String {
    let mut out = String::new();
    for key in old.keys().chain(new.keys()).collect::<BTreeSet<_>>() {
        let label = key.label();
        match (old.get(key), new.get(key)) {
            (Some(_), None) => {
                let _ = writeln!(out, "  {label}: in the table, no longer generated");
            }
            (None, Some(_)) => {
                let _ = writeln!(out, "  {label}: missing from the table");
            }
            (Some(a), Some(b)) => {
                if a.generator != b.generator {
                    let _ =
                        writeln!(out, "  {label}: read from {} in the table, from {} now", a.generator, b.generator);
                }
                for f in a.fields.keys().chain(b.fields.keys()).collect::<BTreeSet<_>>() {
                    let (x, y) = (a.fields.get(f), b.fields.get(f));
                    if x != y {
                        let show = |o: Option<&u64>| o.map_or_else(|| "absent".to_string(), u64::to_string);
                        let _ = writeln!(out, "  {label}: {f}: table {}, DWARF {}", show(x), show(y));
                    }
                }
            }
            (None, None) => {}
        }
    }
    out
}

/// What to regenerate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Go toolchains whose `std` rows to regenerate; the other releases of
    /// go-versions.toml keep their rows. A toolchain not listed there (the machine's own
    /// Go) may only be checked against the row of its release.
    pub toolchains: Vec<GoToolchain>,
    /// Regenerate the library rows too (with the newest Go of go-versions.toml).
    pub modules: bool,
    /// Of those, only each library's oldest and newest listed version (the others keep
    /// their rows).
    pub module_ends: bool,
    /// Compare instead of writing, and fail on any difference.
    pub check: bool,
}

/// Regenerates the rows `options` selects and writes the table, or with `check` fails
/// when the checked-in file differs from what it would write.
pub fn run(options: &Options) -> Result<()> {
    let config = load_config()?;
    let listed = xtask::go_versions()?;
    let releases = listed.iter().map(|v| go_release(v)).collect::<Result<BTreeSet<_>>>()?;
    let old = current_table();
    // Rows not regenerated are kept, as long as modules.toml and go-versions.toml still list them.
    let mut new: Table = old
        .iter()
        .filter(|(k, _)| {
            if k.library {
                config.modules.iter().any(|m| {
                    m.path == k.module && m.versions.iter().any(|v| module_version(v).is_ok_and(|v| v == k.from))
                })
            } else {
                releases.contains(&k.from)
            }
        })
        .map(|(k, r)| (k.clone(), r.clone()))
        .collect();
    for tc in &options.toolchains {
        let key = RowKey::std(go_release(&tc.version)?);
        let mut row = std_row(&config.std, tc)?;
        if !listed.contains(&tc.version) {
            ensure!(options.check, "go{} is not in go-versions.toml: its row would not be reproducible", tc.version);
            // The machine's own Go: its offsets must match its release's row, whichever
            // patch release generated that.
            if let Some(existing) = old.get(&key) {
                eprintln!("offset-tool: checking go{} against the row {} generated", tc.version, existing.generator);
                row.generator = existing.generator.clone();
            }
        }
        new.insert(key, row);
    }
    if options.modules && !config.modules.is_empty() {
        let newest = listed.last().context("go-versions.toml lists no versions")?;
        let tc = xtask::toolchain(newest)?;
        for m in &config.modules {
            let ends = [m.versions.first(), m.versions.last()];
            for v in m.versions.iter().filter(|v| !options.module_ends || ends.contains(&Some(v))) {
                let key = RowKey { library: true, module: m.path.clone(), from: module_version(v)? };
                new.insert(key, module_row(m, v, &tc)?);
            }
        }
    }
    let path = table_path();
    let text = render(&new, &lower_row_modules(&config));
    if options.check {
        let on_disk = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let differences = diff(&old, &new);
        if !differences.is_empty() {
            bail!(
                "{} is out of date:\n{differences}run `cargo xtask offsets` (offset-tool) to regenerate it",
                path.display()
            );
        }
        if on_disk != text {
            bail!("{} is not in the generated form: run `cargo xtask offsets` to regenerate it", path.display());
        }
        println!(
            "offset-tool: {} matches the DWARF of {} toolchain(s){}",
            path.display(),
            options.toolchains.len(),
            if options.modules { " and the listed module versions" } else { "" }
        );
        return Ok(());
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let libraries = new.keys().filter(|k| k.library).count();
    println!(
        "offset-tool: wrote {} ({} Go releases, {libraries} library versions)",
        path.display(),
        new.len() - libraries
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_versions_must_be_releases() {
        assert_eq!(module_version("v1.58.3").unwrap(), (1, 58, 3));
        assert!(module_version("v1.58").is_err());
        assert!(module_version("1.58.3").is_err());
        assert!(module_version("v1.79.0-dev").is_err());
        assert_eq!(go_release("1.21.13").unwrap(), (1, 21, 0));
        assert_eq!(go_release("1.26.8-system").unwrap(), (1, 26, 0));
    }

    #[test]
    fn render_ends_library_ranges_at_the_next_minor_or_listed_version() {
        let row = |g: &str, n: u64| Row { generator: g.into(), fields: [("p.T.f".to_string(), n)].into() };
        let lib = |from| RowKey { library: true, module: "example.com/m".into(), from };
        let table: Table = [
            (RowKey::std((1, 21, 0)), row("go1.21.13", 1)),
            (RowKey::std((1, 23, 0)), row("go1.23.9", 2)),
            (lib((1, 2, 3)), row("go1.27.3", 3)),
            (lib((1, 9, 0)), row("go1.27.3", 4)),
        ]
        .into();
        let untils = |lower: &[&str]| -> Vec<String> {
            let text = render(&table, &lower.iter().map(|s| s.to_string()).collect());
            text.lines().filter(|l| l.trim_start().starts_with("until:")).map(|l| l.trim().to_string()).collect()
        };
        // A lower-row module's row reaches to the next listed version; any other row
        // covers its own minor series.
        assert_eq!(
            untils(&["example.com/m"]),
            ["until: (1, 22, 0),", "until: (1, 24, 0),", "until: (1, 9, 0),", "until: (1, 10, 0),"]
        );
        assert_eq!(
            untils(&[]),
            ["until: (1, 22, 0),", "until: (1, 24, 0),", "until: (1, 3, 0),", "until: (1, 10, 0),"]
        );
        assert!(render(&table, &BTreeSet::new()).contains("(\"p.T.f\", 4),"));
    }

    #[test]
    fn the_checked_in_table_is_in_the_generated_form() {
        let on_disk = std::fs::read_to_string(table_path()).unwrap();
        assert_eq!(render(&current_table(), &lower_row_modules(&load_config().unwrap())), on_disk);
    }

    #[test]
    fn diff_names_each_difference() {
        let row = |n: u64| Row { generator: "go1.21.13".into(), fields: [("p.T.f".to_string(), n)].into() };
        let a: Table = [(RowKey::std((1, 21, 0)), row(1))].into();
        let b: Table = [(RowKey::std((1, 21, 0)), row(2)), (RowKey::std((1, 22, 0)), row(2))].into();
        assert_eq!(diff(&a, &a), "");
        assert_eq!(diff(&a, &b), "  std go1.21: p.T.f: table 1, DWARF 2\n  std go1.22: missing from the table\n");
    }
}
