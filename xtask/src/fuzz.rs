//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target of `fuzz/` (go-abi's readers
//! of untrusted bytes) for SECONDS each, and fails if any of them crashes.
//!
//! What it does, so a fresh machine needs nothing by hand:
//! - installs `cargo-fuzz` (`cargo install cargo-fuzz --locked`) when it is missing;
//! - checks that a nightly toolchain is installed (libFuzzer's instrumentation needs
//!   `-Z` flags). The build uses cargo-fuzz's defaults: release + debug assertions and
//!   overflow checks (so integer overflow on hostile input is a crash), AddressSanitizer.
//!   ASan needs no `rust-src`: cargo-fuzz passes `-Zbuild-std` only when asked to
//!   (`--build-std`), and the nightly's `rust-std` component ships the ASan runtime. If
//!   the ASan build fails anyway, the targets are built with `--sanitizer none`: go-abi
//!   has no `unsafe`, so the sanitizer only guards the dependencies, while panics and
//!   overflows (what we hunt) are caught either way;
//! - writes seed corpora under `fuzz/corpus/<target>/seed-*` (git-ignored), generated at
//!   run time from real Go binaries: a tiny program built with the oldest, newest and
//!   system Go in the default, stripped and PIE flavours (plus Go 1.19 when the Debian
//!   package is there, for the old-layout errors), their `.gopclntab` and
//!   `.go.buildinfo` sections, the `funcs` fixture's, and truncated, bit-flipped and
//!   section-header-less copies, and copies with hostile values (complemented, or at
//!   the top of the address space) in the fields that locate things: pclntab header
//!   words, the section address, segment addresses and sizes. Inputs libFuzzer finds are
//!   kept beside them (`rm -rf fuzz/corpus` starts afresh).
//!
//! Each target first runs its whole corpus once (libFuzzer stops at a crash, so each
//! crashing input is set aside and the rest run again), then fuzzes for SECONDS in
//! libFuzzer's fork mode, which goes on after a crash; every crashing input is replayed
//! to learn its panic location, and crashes are reported once per location with their
//! inputs. `-max_len` is the largest corpus input (libFuzzer would cut whole executables
//! down to 1 MiB). The `elf` and `pclntab` targets bring their own mutator (fuzz/src):
//! mostly in place, on the headers and tables, so offsets in megabyte inputs stay valid.
//!
//! SECONDS = 0 only runs the corpus (a regression check). Crashing inputs land in
//! `fuzz/artifacts/<target>/`; the libFuzzer log of the last run of each target is kept
//! in `target/fuzz/<target>.log`. Cost: the first run installs cargo-fuzz (~1 min),
//! builds 12 small Go binaries and the targets (~1 min); then ~1 min of corpus replay
//! plus SECONDS per target.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use xtask::{GoToolchain, build_fixture, test_toolchains, workspace_root};

const TARGETS: [&str; 3] = ["buildinfo", "pclntab", "elf"];
/// A single input running longer than this is reported as a hang (libFuzzer `timeout-*`).
const INPUT_TIMEOUT_SECS: u32 = 20;
/// Give up replaying the corpus after this many crashing inputs.
const MAX_CRASHING_CORPUS_INPUTS: usize = 64;

pub fn run(seconds: u64) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    ensure_cargo_fuzz()?;
    eprintln!("xtask: writing seed corpora under {}", fuzz_dir.join("corpus").display());
    let counts = write_seeds(&fuzz_dir.join("corpus"))?;
    for (target, n) in TARGETS.iter().zip(counts) {
        eprintln!("xtask:   {target}: {n} seeds");
    }
    let sanitizer = build_targets(&fuzz_dir)?;
    let logs = root.join("target/fuzz");
    fs::create_dir_all(&logs)?;
    let mut failed = Vec::new();
    for target in TARGETS {
        let fuzzer = Fuzzer { dir: &fuzz_dir, target, sanitizer, log: logs.join(format!("{target}.log")) };
        let started = Instant::now();
        eprintln!("xtask: {target}: running the corpus once");
        let mut found = fuzzer.replay_corpus()?;
        if seconds > 0 {
            eprintln!("xtask: {target}: fuzzing for {seconds} s (log: {})", fuzzer.log.display());
            fuzzer.fuzz(seconds, &mut found)?;
        }
        let verdict =
            if found.is_empty() { "ok".to_string() } else { format!("FAILED, {} distinct crashes", found.len()) };
        eprintln!("xtask: {target}: {verdict} ({:.0} s)", started.elapsed().as_secs_f64());
        if !found.is_empty() {
            report(target, &found);
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets {failed:?} crashed; the inputs are in fuzz/artifacts/<target>/, replay one with \
             `cd fuzz && cargo +nightly fuzz run <target> <input>`"
        );
    }
    eprintln!("xtask: no fuzz target crashed ({seconds} s each)");
    Ok(())
}

/// Crashing inputs by what went wrong (panic location and message, sanitizer summary,
/// timeout or out-of-memory), so one bug found many times is reported once.
type Findings = BTreeMap<String, Vec<PathBuf>>;

struct Fuzzer<'a> {
    dir: &'a Path,
    target: &'static str,
    sanitizer: &'static str,
    log: PathBuf,
}

impl Fuzzer<'_> {
    /// `cargo fuzz run TARGET [INPUT] -- ARGS`, its output going to the log; returns
    /// whether it succeeded and the output.
    fn cargo_fuzz_run(&self, input: Option<&Path>, args: &[String]) -> Result<(bool, String)> {
        let mut c = fuzz_command(self.dir);
        c.args(["run", self.target, "--sanitizer", self.sanitizer]);
        c.args(input).arg("--").args(args).arg(format!("-timeout={INPUT_TIMEOUT_SECS}"));
        // libFuzzer cuts inputs down to 1 MiB unless told otherwise, and our seeds are whole
        // Go executables of up to a few MiB.
        let largest = list(&self.dir.join("corpus").join(self.target))
            .iter()
            .filter_map(|p| fs::metadata(p).ok().map(|m| m.len()))
            .max()
            .unwrap_or(0);
        c.arg(format!("-max_len={}", largest.max(4096)));
        let log = fs::File::create(&self.log)?;
        let status = c
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running cargo fuzz run {}", self.target))?;
        Ok((status.success(), fs::read_to_string(&self.log).unwrap_or_default()))
    }

    fn artifacts(&self) -> PathBuf {
        self.dir.join("artifacts").join(self.target)
    }

    /// Runs every corpus input once. libFuzzer stops at the first crash, so each crashing
    /// input is set aside (it is kept in the artifacts) and the corpus run again.
    fn replay_corpus(&self) -> Result<Findings> {
        let corpus = self.dir.join("corpus").join(self.target);
        let mut found = Findings::new();
        for _ in 0..MAX_CRASHING_CORPUS_INPUTS {
            let (ok, text) = self.cargo_fuzz_run(None, &["-runs=0".into()])?;
            if ok {
                return Ok(found);
            }
            let Some(artifact) = text.lines().find_map(|l| l.split("Test unit written to ").nth(1)) else {
                bail!("cargo fuzz run {} failed without a crashing input:\n{}", self.target, tail(&text, 40));
            };
            let artifact = PathBuf::from(artifact.trim());
            let bytes = fs::read(&artifact).with_context(|| format!("reading {}", artifact.display()))?;
            let mut removed = 0;
            for input in list(&corpus) {
                if fs::metadata(&input).is_ok_and(|m| m.len() == bytes.len() as u64) && fs::read(&input)? == bytes {
                    fs::remove_file(&input)?;
                    removed += 1;
                }
            }
            ensure!(removed > 0, "{} crashed on {}, which is not in its corpus", self.target, artifact.display());
            found.entry(signature(&text)).or_default().push(artifact);
        }
        bail!("{}: more than {MAX_CRASHING_CORPUS_INPUTS} corpus inputs crash", self.target)
    }

    /// Fuzzes for `seconds`, in libFuzzer's fork mode so that it goes on after a crash,
    /// then replays each new crashing input to learn what it hit.
    fn fuzz(&self, seconds: u64, found: &mut Findings) -> Result<()> {
        let before = list(&self.artifacts());
        let args = [
            format!("-max_total_time={seconds}"),
            "-fork=1".into(),
            "-ignore_crashes=1".into(),
            "-ignore_timeouts=1".into(),
            "-ignore_ooms=1".into(),
            "-print_final_stats=1".into(),
        ];
        let (ok, text) = self.cargo_fuzz_run(None, &args)?;
        let new: Vec<PathBuf> = list(&self.artifacts()).difference(&before).cloned().collect();
        ensure!(ok || !new.is_empty(), "cargo fuzz run {} failed:\n{}", self.target, tail(&text, 40));
        if let Some(l) = text.lines().rev().find(|l| l.starts_with('#') && l.contains("exec/s")) {
            eprintln!("xtask: {}: {l}", self.target);
        }
        for input in new {
            let (_, replay) = self.cargo_fuzz_run(Some(&input), &[])?;
            found.entry(signature(&replay)).or_default().push(input);
        }
        Ok(())
    }
}

/// What a crashing run hit, from its output: the panic's location and message, the
/// sanitizer's summary, or libFuzzer's verdict.
fn signature(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at ")) {
        let at = lines[i].split("panicked at ").nth(1).unwrap_or("").trim_end_matches(':');
        // Paths relative to the workspace, whatever machine built them.
        let at = at.find("go-abi/").map_or(at, |p| &at[p..]);
        let message = lines.get(i + 1).map_or("", |m| m.trim());
        return format!("panic at {at}: {message}");
    }
    for key in ["SUMMARY: AddressSanitizer:", "ERROR: libFuzzer:"] {
        if let Some(l) = lines.iter().find(|l| l.contains(key)) {
            return l.trim().to_string();
        }
    }
    "crash (no panic message; see the log)".into()
}

/// Prints each distinct crash with its inputs, dumping the small ones.
fn report(target: &str, found: &Findings) {
    for (what, inputs) in found {
        eprintln!("---- {target}: {what} ({} inputs)", inputs.len());
        for input in inputs.iter().take(5) {
            let bytes = fs::read(input).unwrap_or_default();
            eprintln!("  {} ({} bytes)", input.display(), bytes.len());
        }
        let smallest = inputs.iter().filter_map(|i| fs::read(i).ok()).min_by_key(Vec::len);
        if let Some(bytes) = smallest.filter(|b| b.len() <= 1024) {
            eprint!("{}", hexdump(&bytes, 1024));
        }
    }
}

/// `cargo +nightly fuzz ...` in `fuzz/`, with the variables `cargo xtask` inherited from
/// the stable cargo that ran it removed so they do not pin the toolchain.
fn fuzz_command(fuzz_dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(fuzz_dir).arg("+nightly").arg("fuzz");
    for v in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "CARGO_MANIFEST_DIR"] {
        c.env_remove(v);
    }
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("cargo").args(["+nightly", "--version"]).env_remove("RUSTUP_TOOLCHAIN").output();
    ensure!(
        nightly.as_ref().is_ok_and(|o| o.status.success()),
        "fuzzing needs a nightly Rust toolchain (libFuzzer instrumentation uses -Z flags); install it with \
         `rustup toolchain install nightly --profile minimal`"
    );
    let have = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("xtask: cargo install cargo-fuzz --locked");
        xtask::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]).env_remove("RUSTUP_TOOLCHAIN"))
            .context("installing cargo-fuzz")?;
    }
    Ok(())
}

/// Builds every target, with AddressSanitizer when that works; returns the sanitizer.
fn build_targets(fuzz_dir: &Path) -> Result<&'static str> {
    eprintln!("xtask: cargo +nightly fuzz build (AddressSanitizer)");
    let asan = fuzz_command(fuzz_dir).args(["build", "--sanitizer", "address"]).output()?;
    if asan.status.success() {
        return Ok("address");
    }
    eprintln!(
        "xtask: the AddressSanitizer build failed, building without a sanitizer (panics and overflow checks \
         still count):\n{}",
        tail(&String::from_utf8_lossy(&asan.stderr), 15)
    );
    xtask::run(fuzz_command(fuzz_dir).args(["build", "--sanitizer", "none"])).context("cargo fuzz build")?;
    Ok("none")
}

fn list(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `xxd`-style dump of the first `limit` bytes.
fn hexdump(bytes: &[u8], limit: usize) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes[..bytes.len().min(limit)].chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' }).collect();
        out.push_str(&format!("{:08x}: {:<48} {ascii}\n", i * 16, hex.join(" ")));
    }
    if bytes.len() > limit {
        out.push_str(&format!("... {} more bytes\n", bytes.len() - limit));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Seed corpora.

const TINY_GO: &str = r#"// Generated by `cargo xtask fuzz`: a small Go program whose binaries seed the fuzzers.
// Built with -trimpath -buildvcs=false, so the seeds are the same on every machine.
package main

type point struct{ x, y int }

//go:noinline
func (p point) add(q point) point { return point{p.x + q.x, p.y + q.y} }

//go:noinline
func (p *point) scale(k int) { p.x *= k; p.y *= k }

//go:noinline
func sum[T int | float64](v ...T) T {
	var s T
	for _, x := range v {
		s += x
	}
	return s
}

var table = map[string]int{"a": 1, "b": 2}

func main() {
	p := point{1, 2}.add(point{3, 4})
	p.scale(2)
	f := func(n int) int { return n * p.x }
	done := make(chan int)
	go func() { done <- f(3) }()
	println(p.x, p.y, <-done, sum(1, 2, 3), sum(1.5, 2.5) > 3, table["a"])
}
"#;

/// Builds the tiny seed program with every toolchain we have in the default, stripped
/// and PIE flavours (cached in target/fuzz/seed-bin/), and returns (label, path).
fn seed_binaries() -> Result<Vec<(String, PathBuf)>> {
    let root = workspace_root();
    let src = root.join("target/fuzz/seed-src");
    fs::create_dir_all(&src)?;
    write_if_changed(&src.join("go.mod"), "module inject.test/fuzzseed\n\ngo 1.19\n")?;
    write_if_changed(&src.join("main.go"), TINY_GO)?;
    let src_time = fs::metadata(src.join("main.go"))?.modified()?;
    let mut tcs = test_toolchains()?;
    if let Ok(Some(sys)) = xtask::system_toolchain() {
        tcs.push(sys);
    }
    let go119 = PathBuf::from("/usr/lib/go-1.19/bin/go");
    if go119.exists() {
        tcs.push(GoToolchain { version: "1.19".into(), go: go119 });
    }
    let out_dir = root.join("target/fuzz/seed-bin");
    fs::create_dir_all(&out_dir)?;
    let mut out = Vec::new();
    for tc in &tcs {
        for (flavor, args) in
            [("default", &[][..]), ("stripped", &["-ldflags=-s -w"][..]), ("pie", &["-buildmode=pie"])]
        {
            let label = format!("go{}-{flavor}", tc.version);
            let bin = out_dir.join(&label);
            let fresh = fs::metadata(&bin).and_then(|m| m.modified()).is_ok_and(|t| t > src_time);
            if !fresh {
                let mut c = tc.command();
                c.current_dir(&src).env("CGO_ENABLED", "0").args(["build", "-trimpath", "-buildvcs=false", "-o"]);
                c.arg(&bin).args(args).arg(".");
                xtask::run(&mut c).with_context(|| format!("building the fuzz seed program with Go {}", tc.version))?;
            }
            out.push((label, bin));
        }
    }
    Ok(out)
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text)?;
    }
    Ok(())
}

/// An ELF section header's facts (enough to cut sections out of a Go binary).
struct Section {
    name: String,
    /// File offset of the section header itself.
    header: usize,
    offset: usize,
    size: usize,
}

fn le(b: &[u8], off: usize, n: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(n)?)?;
    Some(s.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x)))
}

fn sections(elf: &[u8]) -> Option<Vec<Section>> {
    let shoff = le(elf, 0x28, 8)? as usize;
    let shentsize = le(elf, 0x3a, 2)? as usize;
    let shnum = le(elf, 0x3c, 2)? as usize;
    let shstrndx = le(elf, 0x3e, 2)? as usize;
    let raw = |i: usize| -> Option<(usize, u32, u32, usize, usize)> {
        let h = i.checked_mul(shentsize)?.checked_add(shoff)?;
        let (name, kind) = (le(elf, h, 4)? as u32, le(elf, h + 4, 4)? as u32);
        Some((h, name, kind, le(elf, h + 24, 8)? as usize, le(elf, h + 32, 8)? as usize))
    };
    let (_, _, _, stroff, strsize) = raw(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    let mut out = Vec::new();
    for i in 0..shnum {
        let (header, name, kind, offset, size) = raw(i)?;
        let name = strtab.get(name as usize..)?;
        let name = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0)?]).into_owned();
        // SHT_NOBITS (.bss) has no file bytes.
        out.push(Section { name, header, offset, size: if kind == 8 { 0 } else { size } });
    }
    Some(out)
}

fn section<'a>(elf: &'a [u8], name: &str) -> Option<(usize, &'a [u8])> {
    let s = sections(elf)?.into_iter().find(|s| s.name == name)?;
    Some((s.offset, elf.get(s.offset..s.offset.checked_add(s.size)?)?))
}

/// The file offsets of the `PT_LOAD` program headers.
fn load_segment_headers(elf: &[u8]) -> Vec<usize> {
    let (Some(phoff), Some(phnum)) = (le(elf, 0x20, 8), le(elf, 0x38, 2)) else { return Vec::new() };
    (0..phnum as usize).map(|i| phoff as usize + 56 * i).filter(|&p| le(elf, p, 4) == Some(1)).collect()
}

/// A hostile value for an 8-byte field.
#[derive(Clone, Copy)]
enum Hostile {
    /// Bit-complemented: small offsets, counts and sizes become huge.
    Not,
    /// An address 16 bytes below the top of the address space.
    Top,
}

/// Copies of `data` with the little-endian 8-byte field at each offset made hostile.
/// Every sum a reader forms from such a field must be checked.
fn hostile(data: &[u8], label: &str, fields: &[(String, usize, Hostile)]) -> Vec<(String, Vec<u8>)> {
    fields
        .iter()
        .filter(|(_, at, _)| at + 8 <= data.len())
        .map(|(what, at, how)| {
            let mut v = data.to_vec();
            let word = &mut v[*at..at + 8];
            let (name, value) = match how {
                Hostile::Not => ("not", !u64::from_le_bytes(word.try_into().unwrap_or_default())),
                Hostile::Top => ("top", u64::MAX - 15),
            };
            word.copy_from_slice(&value.to_le_bytes());
            (format!("{label}-{name}-{what}"), v)
        })
        .collect()
}

/// A deterministic xorshift, so seeds are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `n` bits flipped in `data[range]`.
fn flipped(data: &[u8], range: std::ops::Range<usize>, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut v = data.to_vec();
    let range = range.start.min(v.len())..range.end.min(v.len());
    if range.is_empty() {
        return v;
    }
    for _ in 0..n {
        let at = range.start + rng.below(range.len());
        v[at] ^= 1 << rng.below(8);
    }
    v
}

/// Writes every target's seeds (replacing older `seed-*` files, keeping what libFuzzer
/// found) and returns the seed count of each target, in TARGETS order.
fn write_seeds(corpus: &Path) -> Result<[usize; 3]> {
    let mut seeds: [Vec<(String, Vec<u8>)>; 3] = Default::default();
    let [buildinfo, pclntab, elf] = &mut seeds;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let binaries = seed_binaries()?;
    for (label, path) in &binaries {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let tab = section(&data, ".gopclntab");
        let info = section(&data, ".go.buildinfo");
        if let Some((_, t)) = tab {
            pclntab.push((format!("{label}-pclntab"), t.to_vec()));
            pclntab.push((format!("{label}-pclntab-half"), t[..t.len() / 2].to_vec()));
            pclntab.push((format!("{label}-pclntab-header"), t[..t.len().min(128)].to_vec()));
            let mut zero_text = t.to_vec();
            if zero_text.len() >= 32 {
                zero_text[24..32].fill(0);
            }
            pclntab.push((format!("{label}-pclntab-textstart0"), zero_text));
            // The same tables claiming only their first few functions: valid, and fast
            // enough per input for the fuzzer to try many mutations of them.
            for n in [1u64, 16, 128] {
                let mut few = t.to_vec();
                if few.len() >= 16 {
                    few[8..16].copy_from_slice(&n.to_le_bytes());
                }
                if n == 16 {
                    let fields: Vec<(String, usize, Hostile)> =
                        (1..8).map(|i| (format!("word{i}"), 8 + 8 * i, Hostile::Not)).collect();
                    pclntab.extend(hostile(&few, &format!("{label}-pclntab-nfunc16"), &fields));
                }
                pclntab.push((format!("{label}-pclntab-nfunc{n}"), few));
            }
            for i in 0..3 {
                pclntab.push((format!("{label}-pclntab-flip-header{i}"), flipped(t, 8..72, 1, &mut rng)));
                pclntab.push((format!("{label}-pclntab-flip{i}"), flipped(t, 0..t.len(), 16, &mut rng)));
            }
        }
        if let Some((_, b)) = info {
            buildinfo.push((format!("{label}-buildinfo"), b.to_vec()));
            for i in 0..3 {
                buildinfo.push((format!("{label}-buildinfo-flip{i}"), flipped(b, 0..b.len().min(512), 4, &mut rng)));
            }
        }
        // Whole files: as built, cut short, bit-flipped in the headers and tables, and
        // without section headers (found by segment scans alone).
        elf.push((label.clone(), data.clone()));
        for (i, len) in [64, 64 + 56 * 2, data.len() / 3, data.len() - 1].into_iter().enumerate() {
            elf.push((format!("{label}-cut{i}"), data[..len.min(data.len())].to_vec()));
        }
        elf.push((format!("{label}-flip-ehdr"), flipped(&data, 16..64, 2, &mut rng)));
        elf.push((format!("{label}-flip-phdrs"), flipped(&data, 64..64 + 56 * 8, 3, &mut rng)));
        if let Some((off, t)) = tab {
            elf.push((format!("{label}-flip-pclntab"), flipped(&data, off..off + t.len().min(4096), 8, &mut rng)));
        }
        if let Some((off, b)) = info {
            elf.push((format!("{label}-flip-buildinfo"), flipped(&data, off..off + b.len().min(256), 4, &mut rng)));
        }
        let mut no_shdrs = data.clone();
        if no_shdrs.len() >= 64 {
            no_shdrs[0x28..0x30].fill(0);
            no_shdrs[0x3c..0x40].fill(0);
        }
        // Hostile values in the fields that locate things, for the oldest and newest Go
        // (whose pclntab no longer stores textStart): the pclntab header words, the
        // section's address, and, in the copy without section headers (found by scanning
        // segments), each loadable segment's address and size.
        if label.ends_with("stripped") && !label.contains("system") && !label.starts_with("go1.19") {
            if let Some(s) = sections(&data).and_then(|s| s.into_iter().find(|s| s.name == ".gopclntab")) {
                let mut fields: Vec<(String, usize, Hostile)> =
                    (0..8).map(|i| (format!("pclntab-word{i}"), s.offset + 8 + 8 * i, Hostile::Not)).collect();
                fields.push(("pclntab-sh_addr".into(), s.header + 16, Hostile::Top));
                elf.extend(hostile(&data, label, &fields));
            }
            let fields: Vec<(String, usize, Hostile)> = load_segment_headers(&no_shdrs)
                .into_iter()
                .enumerate()
                .flat_map(|(i, p)| {
                    [(format!("load{i}-vaddr"), p + 16, Hostile::Top), (format!("load{i}-memsz"), p + 40, Hostile::Not)]
                })
                .collect();
            elf.extend(hostile(&no_shdrs, &format!("{label}-no-section-headers"), &fields));
        }
        elf.push((format!("{label}-no-section-headers"), no_shdrs));
        if label.ends_with("stripped") {
            buildinfo.push((format!("{label}-whole-file"), data));
        }
    }
    // The funcs fixture: generics, methods and closures in a larger function table.
    for tc in test_toolchains()? {
        let path = build_fixture("funcs", &tc, xtask::Flavor::Default)?;
        let data = fs::read(&path)?;
        if let Some((_, t)) = section(&data, ".gopclntab") {
            pclntab.push((format!("funcs-go{}-pclntab", tc.version), t.to_vec()));
        }
        if let Some((_, b)) = section(&data, ".go.buildinfo") {
            buildinfo.push((format!("funcs-go{}-buildinfo", tc.version), b.to_vec()));
        }
    }
    buildinfo.extend(synthetic_buildinfo());
    for (target, list) in TARGETS.iter().zip(&seeds) {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        for old in list_dir_names(&dir).into_iter().filter(|n| n.starts_with("seed-")) {
            fs::remove_file(dir.join(old))?;
        }
        for (name, bytes) in list {
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(seeds.map(|s| s.len()))
}

fn list_dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// Hand-made `.go.buildinfo` inputs for what our binaries do not show: the pointer layout
/// of Go 1.17 and older (as a bare blob, whose pointers the buildinfo target resolves
/// into the input itself, mapped at 0x400080; and inside a whole ELF whose only segment
/// ends at the top of the address space), and module info with replacements and quoted
/// settings.
fn synthetic_buildinfo() -> Vec<(String, Vec<u8>)> {
    let pointer = pointer_layout_blob(0x40_0000 + 128);
    let top = 0xffff_ffff_ffff_ff00;
    let mut high = pointer_layout_blob(top);
    high.resize(0x100, 0);
    // The same with the version's string header in the segment's last word.
    let mut last = high.clone();
    last[16..24].copy_from_slice(&(top + 0xf8).to_le_bytes());
    let (high, last) = (tiny_elf(top, &high), tiny_elf(top, &last));

    let sentinel = [0x30u8, 0x77, 0xaf, 0x0c, 0x92, 0x74, 0x08, 0x02, 0x41, 0xe1, 0xc1, 0x07, 0xe6, 0xd6, 0x18, 0xe6];
    let text = "path\texample.com/app\nmod\texample.com/app\t(devel)\t\ndep\texample.com/lib\tv1.2.3\th1:abc=\n\
                =>\t../lib\t(devel)\t\nbuild\t-buildmode=exe\nbuild\t-ldflags=\"-s -w -X main.v=1\"\n\
                build\t\"key with space\"=\"va\\\"lue\\x41\\u00e9\\U0001F600\"\nbuild\tCGO_ENABLED=0\n";
    let mut module = sentinel.to_vec();
    module.extend_from_slice(text.as_bytes());
    module.extend_from_slice(&sentinel);
    let mut inline = BUILDINFO_MAGIC.to_vec();
    inline.extend_from_slice(&[8, 2]);
    inline.resize(32, 0);
    for s in [&b"go1.22.0"[..], &module] {
        let mut n = s.len();
        while n >= 0x80 {
            inline.push(n as u8 | 0x80);
            n >>= 7;
        }
        inline.push(n as u8);
        inline.extend_from_slice(s);
    }
    vec![
        ("synthetic-pointer-layout".into(), pointer),
        ("synthetic-pointer-layout-top-of-memory-elf".into(), high),
        ("synthetic-pointer-layout-top-of-memory-elf-last-word".into(), last),
        ("synthetic-inline-modinfo".into(), inline),
    ]
}

/// A build info blob of the Go 1.17 pointer layout, for a blob at `blob_vaddr`.
fn pointer_layout_blob(blob_vaddr: u64) -> Vec<u8> {
    let mut pointer = BUILDINFO_MAGIC.to_vec();
    pointer.extend_from_slice(&[8, 0]);
    // Version and modinfo string headers at blob+32 and blob+48, their bytes after.
    let version = b"go1.16.15";
    let modinfo = b"path\texample.com/old\nmod\texample.com/old\t(devel)\t\n";
    pointer.extend_from_slice(&(blob_vaddr + 32).to_le_bytes());
    pointer.extend_from_slice(&(blob_vaddr + 48).to_le_bytes());
    for (at, s) in [(64u64, &version[..]), (64 + version.len() as u64, &modinfo[..])] {
        pointer.extend_from_slice(&(blob_vaddr + at).to_le_bytes());
        pointer.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    pointer.extend_from_slice(version);
    pointer.extend_from_slice(modinfo);
    pointer
}

/// A minimal linux/amd64 `ET_EXEC` whose only segment (read-write) maps `payload` at
/// `vaddr`.
fn tiny_elf(vaddr: u64, payload: &[u8]) -> Vec<u8> {
    const HEADERS: u64 = 128;
    let len = payload.len() as u64;
    let mut f = b"\x7fELF\x02\x01\x01\x00".to_vec();
    f.resize(16, 0);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    for word in [vaddr, 64, 0] {
        // e_entry, e_phoff, e_shoff
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&half.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&6u32.to_le_bytes()); // R|W
    for word in [HEADERS, vaddr, vaddr, len, len, 0x1000] {
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.resize(HEADERS as usize, 0);
    f.extend_from_slice(payload);
    f
}
