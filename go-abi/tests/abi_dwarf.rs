//! Checks `abi::assign` against the Go compiler's own view of where arguments are: the
//! DWARF location of every parameter at the function's entry PC, in real binaries built
//! by every Go toolchain we can find.
//!
//! Each toolchain builds `tests/data/abiprobe` twice: a default (optimised) build, and one
//! with `-gcflags=all=-N -l`, whose DWARF also gives the spill slot of each register
//! argument and the home of each stack result, so the whole frame layout gets checked.
//! The probe also prints every signature through `reflect`, which gives an independent
//! description of each type and sees parameters DWARF may leave out; and the pclntab
//! records each function's argument frame size (stack arguments, stack results and spill
//! area), which must equal `Assignment::arg_frame_size`, or else DWARF's parameter list
//! is incomplete.
//!
//! Toolchains: `go` on PATH plus Go 1.21.13 and 1.27.3 from `~/.cache/inject/go` when
//! installed, or exactly the list in `INJECT_GO_BINS` (colon-separated). With `CI=true`
//! a missing toolchain is a failure, not a skip.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use go_abi::abi::{self, Assignment, GoType, Location, PointerKind, StructType};
use go_abi::dwarf::{DwarfInfo, FuncDebug, LocationPiece, ParamLocation, Place};
use object::{Object, ObjectSection, ObjectSymbol};

const PROBE_SOURCE: &str = include_str!("data/abiprobe/main.go");
const CACHED_TOOLCHAINS: [&str; 2] = ["1.21.13", "1.27.3"];

#[test]
fn abi_assignment_matches_dwarf_entry_locations() {
    let toolchains = toolchains();
    if toolchains.is_empty() {
        let message = "no Go toolchain found (PATH, ~/.cache/inject/go, INJECT_GO_BINS)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        report(&format!("abi_dwarf: skipped: {message}"));
        return;
    }
    let mut failures = Vec::new();
    let mut summary = String::new();
    let builds: Vec<(PathBuf, Mode)> =
        toolchains.iter().flat_map(|go| [Mode::Optimized, Mode::NoOpt].map(|m| (go.clone(), m))).collect();
    // Builds are independent, and the unoptimised ones recompile the standard library.
    let results: Vec<Result<Checked, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = builds.iter().map(|(go, mode)| scope.spawn(move || check_toolchain(go, *mode))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("check panicked".into()))).collect()
    });
    for ((go, mode), result) in builds.iter().zip(results) {
        match result {
            Ok(checked) => {
                summary.push_str(&checked.summary);
                failures.extend(checked.failures);
            }
            Err(e) => failures.push(format!("{} {mode:?}: {e}", go.display())),
        }
    }
    report(&summary);
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

/// Bytes from a target are untrusted: damaged DWARF must give errors or partial results,
/// never a panic or a hang. Mutates the real sections of a probe binary, deterministically.
#[test]
fn corrupted_dwarf_gives_errors_not_panics() {
    let Some(go) = toolchains().into_iter().next() else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "no Go toolchain found");
        return;
    };
    let (binary, version) = build_probe(&go, Mode::Optimized, "corrupt").expect("building the probe");
    let data = std::fs::read(&binary).expect("reading the probe");
    let file = object::File::parse(&*data).expect("parsing the probe");
    let names = [
        ".debug_info",
        ".debug_abbrev",
        ".debug_loclists",
        ".debug_loc",
        ".debug_addr",
        ".debug_line",
        ".debug_str",
        ".debug_str_offsets",
        ".debug_line_str",
    ];
    let original: HashMap<&str, Vec<u8>> = names
        .iter()
        .map(|&n| {
            let bytes = file
                .section_by_name(n)
                .map(|s| s.uncompressed_data().expect("section").into_owned())
                .unwrap_or_default();
            (n, bytes)
        })
        .collect();
    // Only sections this Go version writes can be damaged.
    let names: Vec<&'static str> = names.into_iter().filter(|n| !original[n].is_empty()).collect();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut loaded, mut rejected, mut queries) = (0, 0, 0);
        for round in 0..135 {
            let mut sections = original.clone();
            let name = names[round % names.len()];
            let bytes = sections.get_mut(name).expect("section");
            let len = bytes.len() as u64;
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 16 {
                        bytes[(next() % len) as usize] ^= (1 + next() % 255) as u8;
                    }
                }
                1 => bytes.truncate((next() % len) as usize),
                _ => {
                    let at = (next() % len) as usize;
                    for b in bytes.iter_mut().skip(at).take(64) {
                        *b = next() as u8;
                    }
                }
            }
            match DwarfInfo::from_sections(true, |n| Ok(sections.get(n).cloned().unwrap_or_default())) {
                Ok(info) => {
                    loaded += 1;
                    for f in info.functions() {
                        let _ = info.entry_locations(f);
                        let _ = f.assignment();
                        let _ = info.function_by_name(&f.name);
                        let _ = info.function_containing(f.low_pc);
                        queries += 1;
                    }
                    for s in ["runtime.g", "runtime.stack", "main.Nested"] {
                        let _ = info.struct_layout(s);
                    }
                }
                Err(_) => rejected += 1,
            }
        }
        let _ = done.send((loaded, rejected, queries));
    });
    match finished.recv_timeout(std::time::Duration::from_secs(600)) {
        Ok((loaded, rejected, queries)) => report(&format!(
            "abi_dwarf: corrupted DWARF ({version}): {loaded} damaged copies indexed, \
             {rejected} rejected with an error, {queries} function queries answered"
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("corrupted DWARF made a query hang"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("corrupted DWARF made go-abi panic"),
    }
}

/// Writes past the test harness's output capture, so the counts show on every run.
fn report(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Optimized,
    NoOpt,
}

fn toolchains() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("INJECT_GO_BINS") {
        let listed: Vec<PathBuf> = list.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
        for go in &listed {
            assert!(go.is_file(), "INJECT_GO_BINS names {}, which is not a file", go.display());
        }
        return listed;
    }
    let mut found = Vec::new();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(go) = std::env::split_paths(&path).map(|dir| dir.join("go")).find(|p| p.is_file())
    {
        found.push(go);
    }
    if let Some(home) = std::env::var_os("HOME") {
        for version in CACHED_TOOLCHAINS {
            let go =
                Path::new(&home).join(".cache/inject/go").join(version).join("lib/python3.11/site-packages/go/bin/go");
            if go.is_file() {
                found.push(go);
            }
        }
    }
    let mut seen = Vec::new();
    found.retain(|p| {
        let key = p.canonicalize().unwrap_or_else(|_| p.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    found
}

fn go_command(go: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.env("GOTOOLCHAIN", "local").env("GOWORK", "off").env("GOFLAGS", "").env("CGO_ENABLED", "0");
    cmd
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Checked {
    summary: String,
    failures: Vec<String>,
}

/// Builds the probe with `go` into its own directory under the test target dir; returns
/// the binary and the toolchain's version.
fn build_probe(go: &Path, mode: Mode, purpose: &str) -> Result<(PathBuf, String), String> {
    let version = output(go_command(go).args(["env", "GOVERSION"]))?.trim().to_owned();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("abi_dwarf").join(format!("{purpose}-{version}-{mode:?}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::write(dir.join("main.go"), PROBE_SOURCE).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("go.mod"), "module abiprobe\n\ngo 1.21\n").map_err(|e| e.to_string())?;
    let binary = dir.join("abiprobe");
    let mut build = go_command(go);
    build.current_dir(&dir).args(["build", "-o"]).arg(&binary);
    if mode == Mode::NoOpt {
        build.arg("-gcflags=all=-N -l");
    }
    output(build.arg("."))?;
    Ok((binary, version))
}

fn check_toolchain(go: &Path, mode: Mode) -> Result<Checked, String> {
    let (binary, version) = build_probe(go, mode, "check")?;
    let label = format!(
        "{version} {}",
        match mode {
            Mode::Optimized => "default",
            Mode::NoOpt => "-N -l",
        }
    );
    let signatures = parse_signatures(&output(Command::new(&binary).arg("sigs"))?)?;

    let data = std::fs::read(&binary).map_err(|e| e.to_string())?;
    let file = object::File::parse(&*data).map_err(|e| e.to_string())?;
    let info = DwarfInfo::load(&file).map_err(|e| e.to_string())?.ok_or("the probe has no DWARF")?;
    let args = pclntab_args(&file)?;
    let abi0_wrapped = file.symbols().filter_map(|s| s.name().ok()?.strip_suffix(".abi0").map(str::to_owned)).collect();
    let mut checker = Checker {
        label: label.clone(),
        mode,
        info: &info,
        args: &args,
        abi0_wrapped: &abi0_wrapped,
        failures: Vec::new(),
        stats: BTreeMap::new(),
    };
    for func in info.functions() {
        if func.name.starts_with("main.") {
            checker.check_main(func, signatures.get(&func.name));
        }
        checker.check_any(func);
    }
    for name in signatures.keys() {
        if info.function_by_name(name).is_none() {
            checker.fail(name, "is in the probe's signature table but not in DWARF".into());
        }
    }
    checker.check_struct_layouts();
    checker.check_not_vacuous();

    let mut summary =
        format!("abi_dwarf: {label}: DWARF v{}, {} functions indexed\n", info.version(), info.functions().len());
    for (scope, stats) in &checker.stats {
        let classes: Vec<String> = stats.classes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            summary,
            "  {scope}: {} functions, {} values; {}",
            stats.functions,
            stats.values,
            classes.join(", ")
        );
        for (class, examples) in stats.examples.iter().filter(|(_, e)| !e.is_empty()) {
            let _ = writeln!(summary, "    e.g. {class}: {}", examples.join("; "));
        }
    }
    Ok(Checked { summary, failures: checker.failures })
}

struct Signature {
    inputs: Vec<GoType>,
    results: Vec<GoType>,
}

fn parse_signatures(text: &str) -> Result<HashMap<String, Signature>, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [tag, name, inputs, results] = fields[..] else {
            return Err(format!("bad signature line {line:?}"));
        };
        if tag != "SIG" {
            return Err(format!("bad signature line {line:?}"));
        }
        let list = |s: &str| -> Result<Vec<GoType>, String> {
            s.split(';')
                .filter(|t| !t.is_empty())
                .map(|t| TypeParser::parse(t).ok_or_else(|| format!("bad type {t:?}")))
                .collect()
        };
        out.insert(name.to_owned(), Signature { inputs: list(inputs)?, results: list(results)? });
    }
    if out.is_empty() {
        return Err("the probe printed no signatures".into());
    }
    Ok(out)
}

/// Parses the probe's type grammar: a kind name, `array(N,T)` or
/// `struct(size){name@offset:T,...}`.
struct TypeParser<'a> {
    rest: &'a str,
}

impl TypeParser<'_> {
    fn parse(text: &str) -> Option<GoType> {
        let mut p = TypeParser { rest: text };
        let ty = p.ty()?;
        p.rest.is_empty().then_some(ty)
    }

    fn eat(&mut self, token: &str) -> Option<()> {
        self.rest = self.rest.strip_prefix(token)?;
        Some(())
    }

    fn until(&mut self, stop: &[char]) -> &str {
        let end = self.rest.find(stop).unwrap_or(self.rest.len());
        let (word, rest) = self.rest.split_at(end);
        self.rest = rest;
        word
    }

    fn number(&mut self) -> Option<u64> {
        let end = self.rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(self.rest.len());
        let (digits, rest) = self.rest.split_at(end);
        self.rest = rest;
        digits.parse().ok()
    }

    fn ty(&mut self) -> Option<GoType> {
        let word = self.until(&['(', ',', ')', '}']);
        Some(match word {
            "bool" => GoType::Bool,
            "int" | "int64" => GoType::int(8, true),
            "int8" => GoType::int(1, true),
            "int16" => GoType::int(2, true),
            "int32" => GoType::int(4, true),
            "uint" | "uint64" => GoType::int(8, false),
            "uint8" => GoType::int(1, false),
            "uint16" => GoType::int(2, false),
            "uint32" => GoType::int(4, false),
            "uintptr" => GoType::Uintptr,
            "float32" => GoType::Float32,
            "float64" => GoType::Float64,
            "complex64" => GoType::Complex64,
            "complex128" => GoType::Complex128,
            "string" => GoType::String,
            "slice" => GoType::Slice,
            "eface" => GoType::Interface { empty: true },
            "iface" => GoType::Interface { empty: false },
            "ptr" => GoType::Pointer(PointerKind::Pointer),
            "map" => GoType::Pointer(PointerKind::Map),
            "chan" => GoType::Pointer(PointerKind::Chan),
            "func" => GoType::Pointer(PointerKind::Func),
            "unsafeptr" => GoType::Pointer(PointerKind::UnsafePointer),
            "array" => {
                self.eat("(")?;
                let len = self.number()?;
                self.eat(",")?;
                let elem = self.ty()?;
                self.eat(")")?;
                GoType::array(len, elem)
            }
            "struct" => {
                self.eat("(")?;
                let size = self.number()?;
                self.eat("){")?;
                let mut fields = Vec::new();
                while self.eat("}").is_none() {
                    if !fields.is_empty() {
                        self.eat(",")?;
                    }
                    let name = self.until(&['@']).to_owned();
                    self.eat("@")?;
                    let offset = self.number()?;
                    self.eat(":")?;
                    let ty = self.ty()?;
                    fields.push(abi::Field { name, offset, ty });
                }
                GoType::Struct(StructType { size, fields })
            }
            _ => return None,
        })
    }
}

/// `_func.args` of every function in the pclntab (Go 1.20+ layout), by entry address:
/// the compiler's own size of the argument frame.
fn pclntab_args(file: &object::File<'_>) -> Result<HashMap<u64, i64>, String> {
    let section = file
        .section_by_name(".gopclntab")
        .or_else(|| file.section_by_name(".data.rel.ro.gopclntab"))
        .ok_or("no .gopclntab")?;
    let data = section.uncompressed_data().map_err(|e| e.to_string())?;
    let u32_at = |at: usize| -> Result<u32, String> {
        let bytes = data.get(at..at + 4).ok_or("pclntab truncated")?;
        Ok(u32::from_le_bytes(bytes.try_into().map_err(|_| "pclntab truncated")?))
    };
    let u64_at = |at: usize| -> Result<u64, String> {
        let bytes = data.get(at..at + 8).ok_or("pclntab truncated")?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| "pclntab truncated")?))
    };
    if u32_at(0)? != 0xffff_fff1 || data.get(7) != Some(&8) {
        return Err("pclntab is not the Go 1.20+ 64-bit layout".into());
    }
    let nfunc = u64_at(8)? as usize;
    let pcln = u64_at(64)? as usize;
    // moduledata.text: Go 1.26 stopped storing it in the header.
    let text = file
        .symbols()
        .find(|s| s.name() == Ok("runtime.text"))
        .map(|s| s.address())
        .or_else(|| file.section_by_name(".text").map(|s| s.address()))
        .ok_or("no runtime.text")?;
    let mut out = HashMap::with_capacity(nfunc);
    for i in 0..nfunc {
        let entry_off = u32_at(pcln + 8 * i)?;
        let func_off = u32_at(pcln + 8 * i + 4)? as usize;
        let args = u32_at(pcln + func_off + 8)? as i32;
        out.insert(text + u64::from(entry_off), i64::from(args));
    }
    Ok(out)
}

#[derive(Default)]
struct Stats {
    functions: usize,
    values: usize,
    classes: BTreeMap<&'static str, usize>,
    examples: BTreeMap<&'static str, Vec<String>>,
}

struct Checker<'a> {
    label: String,
    mode: Mode,
    info: &'a DwarfInfo,
    args: &'a HashMap<u64, i64>,
    /// Go functions that assembly calls through an ABI0 wrapper.
    abi0_wrapped: &'a HashSet<String>,
    failures: Vec<String>,
    stats: BTreeMap<&'static str, Stats>,
}

/// How one DWARF location compares with the assignment.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Every piece is where the ABI says.
    Match,
    /// The pieces DWARF describes are where the ABI says; others are optimised out.
    MatchWithGaps,
    /// A match once repeated identical pieces are dropped.
    DuplicatePieces,
    /// No location covers the entry PC (dead or zero-size values, most results).
    NoLocation,
    /// A register argument whose DWARF location is its (still unwritten) spill slot.
    SpillSlot,
    /// A stack argument located at one of its components, without `DW_OP_piece`.
    StackComponent,
    /// The location of another parameter (whose own location matches): Go gives a
    /// parameter reassigned from another one that one's location, even at entry.
    AliasedRegister,
    /// A match once Go 1.21's repeated padding pieces (`-N`) are ignored.
    BogusPadding,
    /// A result of a function with an ABI0 wrapper, homed in its ABI0 stack slot.
    Abi0ResultSlot,
    /// A register result whose home is a local of the callee's frame.
    LocalHome,
    /// After the prologue of unoptimised code: the argument lives outside the argument
    /// frame (a local or a register).
    Elsewhere,
    Mismatch(String),
}

impl Verdict {
    fn class(&self) -> &'static str {
        match self {
            Verdict::Match => "match",
            Verdict::MatchWithGaps => "match-with-gaps",
            Verdict::DuplicatePieces => "match-with-duplicate-pieces",
            Verdict::NoLocation => "no-location",
            Verdict::SpillSlot => "spill-slot-at-entry",
            Verdict::StackComponent => "stack-component-without-piece",
            Verdict::AliasedRegister => "location-of-another-param",
            Verdict::LocalHome => "result-in-local",
            Verdict::BogusPadding => "match-ignoring-bogus-padding",
            Verdict::Abi0ResultSlot => "result-in-abi0-slot",
            Verdict::Elsewhere => "outside-arg-frame",
            Verdict::Mismatch(_) => "MISMATCH",
        }
    }
}

/// What the parameter list of one function is checked against.
struct Plan {
    inputs: Vec<GoType>,
    results: Vec<GoType>,
    /// (index in `func.params`, index among `inputs`) for each DWARF input.
    input_slots: Slots,
    /// (index in `func.params`, index among `results`) for each DWARF result.
    result_slots: Slots,
}

impl Checker<'_> {
    fn fail(&mut self, func: &str, what: String) {
        self.failures.push(format!("{}: {func}: {what}", self.label));
    }

    fn note(&mut self, scope: &'static str, class: &'static str, example: impl FnOnce() -> String) {
        let stats = self.stats.entry(scope).or_default();
        *stats.classes.entry(class).or_default() += 1;
        let examples = stats.examples.entry(class).or_default();
        if !class.starts_with("match") && class != "args-size-match" && examples.len() < 4 {
            examples.push(example());
        }
    }

    /// Package main: every function, with reflect's complete signature where the probe
    /// has one. Here nothing may be unexplained.
    fn check_main(&mut self, func: &FuncDebug, signature: Option<&Signature>) {
        let scope = "package main";
        let (Some(dwarf_inputs), Some(results)) = (func.input_types(), func.result_types()) else {
            self.fail(&func.name, "a parameter type did not resolve".into());
            return;
        };
        let (input_slots, result_slots) = slots(func);
        let plan = match signature {
            None => Plan { inputs: dwarf_inputs, results, input_slots, result_slots },
            Some(sig) => match self.plan_from_reflect(func, sig, &results, &input_slots) {
                Some(inputs_and_slots) => {
                    Plan { inputs: inputs_and_slots.0, results, input_slots: inputs_and_slots.1, result_slots }
                }
                None => return,
            },
        };
        let assignment = abi::assign(&plan.inputs, &plan.results);
        if !self.args_match(scope, func, &plan, &assignment) {
            if signature.is_some() {
                self.fail(
                    &func.name,
                    format!(
                        "argument frame {} bytes, pclntab says {:?}",
                        assignment.arg_frame_size(),
                        self.args.get(&func.low_pc)
                    ),
                );
            }
            return;
        }
        self.compare(scope, func, &plan, &assignment);
    }

    /// Maps the DWARF inputs onto reflect's list (in order, by type), which also has the
    /// parameters DWARF leaves out; returns the full input list and the mapping.
    fn plan_from_reflect(
        &mut self,
        func: &FuncDebug,
        sig: &Signature,
        results: &[GoType],
        dwarf_slots: &Slots,
    ) -> Option<(Vec<GoType>, Slots)> {
        let scope = "package main";
        if sig.results != results {
            self.fail(&func.name, format!("result types differ: DWARF {results:?}, reflect {:?}", sig.results));
            return None;
        }
        let dict = func.dictionary_index();
        let mut inputs = sig.inputs.clone();
        if let Some(d) = dict {
            inputs.insert(d.min(inputs.len()), GoType::Pointer(PointerKind::Pointer));
        }
        let mut slots = Vec::new();
        let mut next = 0;
        for &(i, _) in dwarf_slots {
            let param = &func.params[i];
            if param.name == ".dict" {
                slots.push((i, dict?));
                continue;
            }
            while next < inputs.len() && (Some(next) == dict || Some(&inputs[next]) != param.ty.as_deref()) {
                next += 1;
            }
            if next == inputs.len() {
                self.fail(&func.name, format!("DWARF parameter {} matches no reflect parameter", param.name));
                return None;
            }
            slots.push((i, next));
            next += 1;
        }
        let listed = slots.len() + usize::from(dict.is_some() && !func.params.iter().any(|p| p.name == ".dict"));
        if listed < inputs.len() {
            let missing = inputs.len() - listed;
            self.note(scope, "param-missing-from-dwarf", || {
                format!("{} ({missing} of {})", func.name, sig.inputs.len())
            });
        }
        if slots != *dwarf_slots && listed == inputs.len() {
            self.fail(&func.name, "DWARF parameter order differs from reflect".into());
            return None;
        }
        Some((inputs, slots))
    }

    /// Any function of the binary whose DWARF locates every input at entry.
    fn check_any(&mut self, func: &FuncDebug) {
        let scope = "all functions with entry locations";
        let (Some(inputs), Some(results)) = (func.input_types(), func.result_types()) else {
            return;
        };
        let Ok(locations) = self.info.entry_locations(func) else {
            self.fail(&func.name, "entry locations unreadable".into());
            return;
        };
        let mut input_locations = func.params.iter().zip(&locations).filter(|(p, _)| !p.is_result);
        let complete = input_locations.clone().next().is_some()
            && input_locations.all(|(_, l)| {
                l.as_ref()
                    .is_some_and(|l| l.pieces.iter().all(|p| matches!(p.place, Place::Register(_) | Place::Stack(_))))
            });
        if !complete {
            return;
        }
        let assignment = abi::assign(&inputs, &results);
        let (input_slots, result_slots) = slots(func);
        let plan = Plan { inputs, results, input_slots, result_slots };
        if !self.args_match(scope, func, &plan, &assignment) {
            // DWARF leaves parameters out (blank, unnamed, `.this`); nothing to compare.
            return;
        }
        self.compare(scope, func, &plan, &assignment);
    }

    /// Checks the argument frame size against the pclntab. A mismatch means DWARF does
    /// not list every parameter, except for Go functions that assembly calls: the pclntab
    /// of those records the ABI0 frame of their wrapper.
    fn args_match(&mut self, scope: &'static str, func: &FuncDebug, plan: &Plan, a: &Assignment) -> bool {
        let recorded = self.args.get(&func.low_pc).copied();
        let class = if recorded == Some(a.arg_frame_size() as i64) {
            "args-size-match"
        } else if self.abi0_wrapped.contains(&func.name)
            && recorded == Some(abi0_frame_size(&plan.inputs, &plan.results) as i64)
        {
            "args-size-is-abi0-wrapper-frame"
        } else {
            "args-size-differs-params-missing-from-dwarf"
        };
        self.note(scope, class, || format!("{} ({} vs pclntab {recorded:?})", func.name, a.arg_frame_size()));
        class != "args-size-differs-params-missing-from-dwarf"
    }

    fn compare(&mut self, scope: &'static str, func: &FuncDebug, plan: &Plan, a: &Assignment) {
        let locations = match self.info.entry_locations(func) {
            Ok(l) => l,
            Err(e) => {
                self.fail(&func.name, format!("entry locations unreadable: {e}"));
                return;
            }
        };
        self.stats.entry(scope).or_default().functions += 1;
        let mut verdicts: Vec<(usize, usize, Verdict)> = plan
            .input_slots
            .iter()
            .map(|&(i, slot)| {
                let v = compare_input(&a.params[slot], a.spill_slots[slot], &plan.inputs[slot], locations[i].as_ref());
                (i, slot, v)
            })
            .collect();
        // A parameter reassigned from another one can inherit that one's location even at
        // entry; accept that only when the other parameter is itself located correctly.
        let matched_registers: Vec<u16> = verdicts
            .iter()
            .filter(|(_, _, v)| *v == Verdict::Match)
            .filter_map(|(_, slot, _)| match &a.params[*slot] {
                Location::Registers(r) if r.len() == 1 => Some(r[0].reg.dwarf_number()),
                _ => None,
            })
            .collect();
        for (i, _, verdict) in &mut verdicts {
            if let (Verdict::Mismatch(_), Some(l)) = (&*verdict, &locations[*i])
                && let [LocationPiece { place: Place::Register(r), size: None }] = l.pieces[..]
                && matched_registers.contains(&r)
            {
                *verdict = Verdict::AliasedRegister;
            }
        }
        for (i, slot, verdict) in verdicts {
            self.record(scope, func, i, &a.params[slot], &locations[i], verdict);
        }
        let abi0_results = abi0_result_offsets(&plan.inputs, &plan.results);
        for &(i, slot) in &plan.result_slots {
            let mut verdict = compare_result(&a.results[slot], &plan.results[slot], locations[i].as_ref());
            // Go 1.27 homes the results of functions with an ABI0 wrapper in the ABI0
            // result slots, past the ABIInternal frame.
            if let (Verdict::Mismatch(_), Some(l)) = (&verdict, &locations[i])
                && self.abi0_wrapped.contains(&func.name)
                && let [LocationPiece { place: Place::Stack(x), size: None }] = l.pieces[..]
                && x as u64 == abi0_results[slot]
            {
                verdict = Verdict::Abi0ResultSlot;
            }
            self.record(scope, func, i, &a.results[slot], &locations[i], verdict);
        }
        // In unoptimised code every register argument is spilled in the prologue; after it,
        // a location inside the argument frame must be the spill slot.
        if self.mode == Mode::NoOpt
            && func.high_pc > func.low_pc + 1
            && let Ok(late) = self.info.locations_at(func, func.high_pc - 1)
        {
            let late_scope = "-N -l: after the prologue";
            if plan.input_slots.iter().any(|&(_, slot)| a.spill_slots[slot].is_some()) {
                self.stats.entry(late_scope).or_default().functions += 1;
            }
            for &(i, slot) in &plan.input_slots {
                let Some(spill) = a.spill_slots[slot] else {
                    continue;
                };
                let mut verdict = compare_spilled(spill, &plan.inputs[slot], late[i].as_ref());
                // As at entry: a parameter reassigned from another may show that one's home.
                if let (Verdict::Mismatch(_), Some(l)) = (&verdict, &late[i])
                    && let [LocationPiece { place: Place::Stack(x), size: None }] = l.pieces[..]
                    && a.spill_slots.contains(&Some(x as u64))
                {
                    verdict = Verdict::AliasedRegister;
                }
                let spilled = Location::Stack { offset: spill, size: plan.inputs[slot].size() };
                self.record(late_scope, func, i, &spilled, &late[i], verdict);
            }
        }
    }

    fn record(
        &mut self,
        scope: &'static str,
        func: &FuncDebug,
        param: usize,
        expected: &Location,
        got: &Option<ParamLocation>,
        verdict: Verdict,
    ) {
        let name = &func.params[param].name;
        self.stats.entry(scope).or_default().values += 1;
        if let Verdict::Mismatch(why) = &verdict {
            self.fail(&func.name, format!("{name}: {why} (ABI {expected:?}, DWARF {got:?})"));
        }
        self.note(scope, verdict.class(), || format!("{}.{name}", func.name));
    }

    /// Tolerated quirks must stay exceptions: most located values match exactly, and
    /// enough functions were compared for the counts to mean something.
    fn check_not_vacuous(&mut self) {
        for (scope, minimum) in [("package main", 45), ("all functions with entry locations", 500)] {
            let Some(stats) = self.stats.get(scope) else {
                self.fail(scope, "nothing was compared".into());
                continue;
            };
            let count = |class: &str| stats.classes.get(class).copied().unwrap_or(0);
            let located = stats.values - count("no-location") - count("result-in-local");
            let (exact, functions) = (count("match"), stats.functions);
            if functions < minimum || exact * 3 < located * 2 {
                let what =
                    format!("only {exact} exact matches among {located} located values in {functions} functions");
                self.fail(scope, what);
            }
        }
    }

    /// The runtime structs the injector reads must come out with plausible layouts.
    fn check_struct_layouts(&mut self) {
        for (name, fields) in [("runtime.g", &["stack", "goid", "m"][..]), ("runtime.stack", &["lo", "hi"][..])] {
            match self.info.struct_layout(name) {
                Ok(Some(layout)) => {
                    for field in fields {
                        if !layout.fields.iter().any(|f| f.name == *field && f.size.is_some()) {
                            self.fail(name, format!("layout has no sized field {field}"));
                        }
                    }
                    let stack = layout.fields.iter().find(|f| f.name == "stack");
                    if name == "runtime.g" && stack.is_none_or(|f| f.offset != 0 || &*f.type_name != "runtime.stack") {
                        self.fail(name, format!("g.stack is not a runtime.stack at 0: {stack:?}"));
                    }
                }
                Ok(None) => self.fail(name, "struct not found".into()),
                Err(e) => self.fail(name, format!("struct unreadable: {e}")),
            }
        }
    }
}

/// Pairs each DWARF parameter with its index among the ABI's inputs or results, counting
/// the dictionary of shape-instantiated code that DWARF may not list.
type Slots = Vec<(usize, usize)>;

fn slots(func: &FuncDebug) -> (Slots, Slots) {
    let dict_listed = func.params.iter().any(|p| p.name == ".dict");
    let hidden_dict = func.dictionary_index().filter(|_| !dict_listed);
    let (mut inputs, mut results) = (Vec::new(), Vec::new());
    let mut next = 0;
    for (i, p) in func.params.iter().enumerate() {
        if p.is_result {
            results.push((i, results.len()));
            continue;
        }
        if Some(next) == hidden_dict {
            next += 1;
        }
        inputs.push((i, next));
        next += 1;
    }
    (inputs, results)
}

/// One part of a value where the ABI puts it.
#[derive(Clone, Copy, Debug)]
struct Want {
    offset: u64,
    size: u64,
    place: Place,
}

fn wants(expected: &Location, ty: &GoType) -> Option<Vec<Want>> {
    match expected {
        Location::Registers(regs) => Some(
            regs.iter()
                .map(|r| Want { offset: r.offset, size: r.size, place: Place::Register(r.reg.dwarf_number()) })
                .collect(),
        ),
        Location::Stack { offset, .. } => in_memory(*offset, ty),
    }
}

/// The components of a value stored in memory at `offset`.
fn in_memory(offset: u64, ty: &GoType) -> Option<Vec<Want>> {
    Some(
        ty.register_components()?
            .iter()
            .map(|c| Want { offset: c.offset, size: c.size, place: Place::Stack((offset + c.offset) as i64) })
            .collect(),
    )
}

#[derive(Debug, PartialEq)]
enum Fit {
    Complete,
    Gaps,
}

/// Do the DWARF pieces describe `wants`? Go writes pieces two ways: one per component
/// with no padding pieces (optimised code), or laid out with `DW_OP_piece` padding (`-N`,
/// Go 1.27); and it may stop before trailing unused components.
fn fit(pieces: &[LocationPiece], wants: &[Want]) -> Option<Fit> {
    let packed = pieces.len() <= wants.len()
        && pieces
            .iter()
            .zip(wants)
            .all(|(p, w)| p.size == Some(w.size) && (p.place == w.place || p.place == Place::Empty));
    if packed {
        let gaps = pieces.len() < wants.len() || pieces.iter().any(|p| p.place == Place::Empty);
        return Some(if gaps { Fit::Gaps } else { Fit::Complete });
    }
    let mut at = 0u64;
    let mut covered = 0;
    for p in pieces {
        let size = p.size?;
        if p.place != Place::Empty {
            wants.iter().find(|w| w.offset == at && w.size == size && w.place == p.place)?;
            covered += 1;
        }
        at += size;
    }
    Some(if covered == wants.len() { Fit::Complete } else { Fit::Gaps })
}

/// Every component located in order once all optimised-out pieces are dropped: how Go
/// 1.21 `-N` code reads, where a padding piece is repeated after every later field.
fn fits_without_padding(pieces: &[LocationPiece], wants: &[Want]) -> bool {
    let located: Vec<&LocationPiece> = pieces.iter().filter(|p| p.place != Place::Empty).collect();
    located.len() == wants.len() && located.iter().zip(wants).all(|(p, w)| p.size == Some(w.size) && p.place == w.place)
}

/// The stack-only ABI0 convention (assembly and its wrappers): entry-SP offsets of the
/// results, and the frame size.
fn abi0_layout(inputs: &[GoType], results: &[GoType]) -> (Vec<u64>, u64) {
    let align = |x: u64, a: u64| x.div_ceil(a.max(1)) * a.max(1);
    let mut at = 0;
    for t in inputs {
        at = align(at, t.align()) + t.size();
    }
    at = align(at, 8);
    let mut offsets = Vec::new();
    for t in results {
        at = align(at, t.align());
        offsets.push(8 + at);
        at += t.size();
    }
    (offsets, align(at, 8))
}

fn abi0_frame_size(inputs: &[GoType], results: &[GoType]) -> u64 {
    abi0_layout(inputs, results).1
}

fn abi0_result_offsets(inputs: &[GoType], results: &[GoType]) -> Vec<u64> {
    abi0_layout(inputs, results).0
}

/// Drops repeated identical pieces (Go 1.21 repeats a component once per type it was
/// viewed as).
fn dedupe(pieces: &[LocationPiece]) -> (Vec<LocationPiece>, bool) {
    let mut out: Vec<LocationPiece> = Vec::with_capacity(pieces.len());
    let mut dropped = false;
    for p in pieces {
        if p.place != Place::Empty && out.last() == Some(p) {
            dropped = true;
        } else {
            out.push(*p);
        }
    }
    (out, dropped)
}

fn compare_input(expected: &Location, spill: Option<u64>, ty: &GoType, got: Option<&ParamLocation>) -> Verdict {
    let Some(got) = got else {
        return Verdict::NoLocation;
    };
    let (pieces, duplicates) = dedupe(&got.pieces);
    let verdict = if let [single] = &pieces[..]
        && single.size.is_none()
    {
        match (single.place, expected) {
            (Place::Register(r), Location::Registers(regs)) if regs.len() == 1 && regs[0].reg.dwarf_number() == r => {
                Verdict::Match
            }
            (Place::Stack(x), Location::Stack { offset, .. }) if x == *offset as i64 => Verdict::Match,
            (Place::Stack(x), Location::Stack { offset, .. })
                if in_memory(*offset, ty)
                    .is_some_and(|w| w.len() > 1 && w.iter().any(|w| w.place == Place::Stack(x))) =>
            {
                Verdict::StackComponent
            }
            (Place::Stack(x), Location::Registers(_)) if spill.is_some_and(|s| s as i64 == x) => Verdict::SpillSlot,
            (place, _) => Verdict::Mismatch(format!("whole value at {place:?}")),
        }
    } else {
        let wanted = wants(expected, ty);
        match wanted.as_ref().and_then(|w| fit(&pieces, w)) {
            Some(Fit::Complete) => Verdict::Match,
            Some(Fit::Gaps) => Verdict::MatchWithGaps,
            None if wanted.is_some_and(|w| fits_without_padding(&pieces, &w)) => Verdict::BogusPadding,
            None => match (expected, spill.and_then(|s| in_memory(s, ty))) {
                (Location::Registers(_), Some(w)) if fit(&pieces, &w).is_some() => Verdict::SpillSlot,
                _ => Verdict::Mismatch("pieces differ".into()),
            },
        }
    };
    match verdict {
        Verdict::Match | Verdict::MatchWithGaps if duplicates => Verdict::DuplicatePieces,
        v => v,
    }
}

fn compare_result(expected: &Location, ty: &GoType, got: Option<&ParamLocation>) -> Verdict {
    let Some(got) = got else {
        return Verdict::NoLocation;
    };
    // A register result has no ABI stack home; the compiler may give it a local one,
    // which lies below the return address.
    let in_callee_frame =
        got.pieces.iter().all(|p| matches!(p.place, Place::Stack(x) if x < 8) || p.place == Place::Empty);
    match expected {
        Location::Registers(_) if in_callee_frame => Verdict::LocalHome,
        _ => compare_input(expected, None, ty, Some(got)),
    }
}

/// After the prologue of unoptimised code: parts inside the argument frame must be in
/// the spill slot; parts elsewhere (locals, registers) are copies the compiler chose.
fn compare_spilled(spill: u64, ty: &GoType, got: Option<&ParamLocation>) -> Verdict {
    let Some(got) = got else {
        return Verdict::NoLocation;
    };
    let (pieces, _) = dedupe(&got.pieces);
    let in_frame: Vec<LocationPiece> = pieces
        .iter()
        .map(|p| match p.place {
            Place::Stack(x) if x >= 8 => *p,
            _ => LocationPiece { place: Place::Empty, size: p.size },
        })
        .collect();
    if in_frame.iter().all(|p| p.place == Place::Empty) {
        return Verdict::Elsewhere;
    }
    if let [single] = &in_frame[..]
        && single.size.is_none()
    {
        return if single.place == Place::Stack(spill as i64) {
            Verdict::Match
        } else {
            Verdict::Mismatch(format!("whole value at {:?}", single.place))
        };
    }
    let wanted = in_memory(spill, ty);
    match wanted.as_ref().and_then(|w| fit(&in_frame, w)) {
        Some(Fit::Complete) => Verdict::Match,
        Some(Fit::Gaps) => Verdict::MatchWithGaps,
        None if wanted.is_some_and(|w| fits_without_padding(&in_frame, &w)) => Verdict::BogusPadding,
        None => Verdict::Mismatch("pieces differ from the spill slot".into()),
    }
}
