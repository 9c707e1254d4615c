//! The plan: which probe sites the requested functions give, and for each a verdict
//! (installable, entry-only, or refused with its reason) before anything is touched.

use std::fmt;

use go_abi::signature::signature;
use go_abi::{Func, GoBinary};
use trampolines::Function;
use trampolines::site::{EntryPatch, Refusal, ReturnPatch, entry_patch, return_patches};

use crate::values::{self, Side};

/// Why a whole function is refused before its code is even looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuncRefusal {
    Assembly,
    Runtime,
    Code(Refusal),
    Undecodable(String),
    /// Named in INJECT_REFUSE_TRAMPOLINE: the tests' way to make the patcher refuse a
    /// site it would take, for `--backend auto`.
    Forced,
}

impl fmt::Display for FuncRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FuncRefusal::Assembly => f.write_str("assembly function: the register ABI and R14 = g are not guaranteed"),
            FuncRefusal::Runtime => f.write_str(
                "runtime or internal function: a probe there could run while the runtime holds locks or has no g",
            ),
            FuncRefusal::Code(r) => r.fmt(f),
            FuncRefusal::Undecodable(e) => write!(f, "cannot decode its code: {e}"),
            FuncRefusal::Forced => f.write_str("named in INJECT_REFUSE_TRAMPOLINE"),
        }
    }
}

/// One probed function and its verdicts.
#[derive(Debug, Clone)]
pub struct ProbeSite {
    pub id: u32,
    pub name: String,
    /// Link-time entry address.
    pub entry: u64,
    pub entry_patch: Result<EntryPatch, FuncRefusal>,
    /// Every exit's patch, or why the function is entry-only.
    pub returns: Result<Vec<ReturnPatch>, Refusal>,
    /// What the entry and return probes record, and how to show it.
    pub on_entry: Side,
    pub on_return: Side,
    /// A signature from DWARF names the values; without it registers are shown raw.
    pub typed: bool,
    /// Source file and line of the entry.
    pub code: Option<(String, u32)>,
    /// A user's function (a span per call) or a library probe.
    pub role: Role,
    /// Instruction starts under a jump's bytes where a goroutine could have been parked by
    /// async preemption (run-time addresses): the install writes the jump only once no
    /// goroutine is parked at one (`ParkedScan`). Empty for the usual patches, whose jumps
    /// leave every such PC intact.
    pub parked_pcs: Vec<u64>,
    /// Which backend puts the probes in (`--backend`; `crate::backend::assign`).
    pub via: Via,
}

/// Which backend puts a site's probes in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Via {
    /// Trampolines, as `entry_patch` and `returns` say.
    #[default]
    Trampoline,
    /// Kernel uprobes at `at` (the first instruction after the entry's stack check, so
    /// that a call that grows its stack first is recorded once) and at each RET (run-time
    /// addresses), or at the entry only, with the reason.
    Uprobe { at: u64, rets: Result<Vec<u64>, String> },
    /// Only uprobes were allowed (`--backend uprobe`), and they cannot take it: why.
    Refused(String),
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A function the user named: one span per call, arguments shown.
    Func,
    /// A library's probe (see `crate::libs`).
    Lib(LibProbe),
}

/// One probe of one library: the library's index in `crate::libs::LIBRARIES` and its own
/// probe number. Plain numbers, so that planning depends on no library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LibProbe {
    pub lib: u8,
    pub probe: u8,
}

impl ProbeSite {
    pub fn installable(&self) -> bool {
        match &self.via {
            Via::Trampoline => self.entry_patch.is_ok(),
            Via::Uprobe { .. } => true,
            Via::Refused(_) => false,
        }
    }

    /// Calls show their arguments only: no exit is probed.
    pub fn entry_only(&self) -> bool {
        match &self.via {
            Via::Uprobe { rets, .. } => rets.is_err(),
            _ => self.returns.is_err() && !self.entry_patch.as_ref().is_ok_and(|e| e.whole_body),
        }
    }

    /// The backend's name, for the summary; None when refused.
    pub fn backend(&self) -> Option<&'static str> {
        match &self.via {
            Via::Trampoline if self.entry_patch.is_ok() => Some("trampoline"),
            Via::Uprobe { .. } => Some("uprobe"),
            _ => None,
        }
    }

    /// The verdict as users read it in `--dry-run` and warnings.
    pub fn verdict(&self) -> String {
        self.verdict_as("installed")
    }

    /// What `--dry-run` says: the same verdict, for a probe not installed.
    pub fn planned_verdict(&self) -> String {
        self.verdict_as("would install")
    }

    fn verdict_as(&self, done: &str) -> String {
        let v = self.verdict_alone(done);
        match self.parked_pcs.len() {
            0 => v,
            n if self.installable() && self.via == Via::Trampoline => format!(
                "{v}, once no goroutine is parked at the {n} instruction{} its jumps cover",
                if n == 1 { "" } else { "s" }
            ),
            _ => v,
        }
    }

    fn verdict_alone(&self, done: &str) -> String {
        match &self.via {
            Via::Uprobe { rets: Ok(r), .. } => {
                return format!("{done}: entry and {} exit{} (uprobes)", r.len(), if r.len() == 1 { "" } else { "s" });
            }
            Via::Uprobe { rets: Err(why), .. } => return format!("{done} entry-only: {why} (uprobes)"),
            Via::Refused(why) => return format!("refused: {why}"),
            Via::Trampoline => {}
        }
        match (&self.entry_patch, &self.returns) {
            (Err(e), _) => format!("refused: {e}"),
            (Ok(e), Ok(_)) if e.whole_body => format!("{done}: entry and exit (whole straight-line body relocated)"),
            (Ok(_), Ok(r)) => format!("{done}: entry and {} exit{}", r.len(), if r.len() == 1 { "" } else { "s" }),
            (Ok(_), Err(e)) => format!("{done} entry-only: {e}"),
        }
    }
}

fn is_runtime(name: &str) -> bool {
    ["runtime.", "runtime/internal/", "internal/", "sync/atomic.", "reflect.", "type:", "go:", "_cgo_", "x_cgo_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Analyses one function at its run-time address (`bias` is a PIE's load bias), so every
/// address in the verdict is where it will be patched, for a probe with a role. Library
/// probes may be in the runtime (`runtime.newproc1`): their trampolines are vetted for
/// running there.
pub fn analyse_as(bin: &GoBinary<'_>, f: &Func<'_>, id: u32, bias: u64, ctx: &PlanContext, role: Role) -> ProbeSite {
    analyse_with(bin, f, id, bias, ctx, role, None)
}

/// [`analyse_as`] with the signature the user declared, in place of DWARF's.
fn analyse_with(
    bin: &GoBinary<'_>,
    f: &Func<'_>,
    id: u32,
    bias: u64,
    ctx: &PlanContext,
    role: Role,
    declared: Option<go_abi::signature::Signature>,
) -> ProbeSite {
    let mut site = ProbeSite {
        id,
        name: f.name.to_string(),
        entry: f.entry + bias,
        entry_patch: Err(FuncRefusal::Assembly),
        returns: Err(Refusal::ExitUnpatchable { pc: f.entry }),
        on_entry: Side::default(),
        on_return: Side::default(),
        typed: false,
        role,
        code: bin.pclntab.line(f, f.entry).map(|(file, line)| (file.into_owned(), line.max(0) as u32)),
        parked_pcs: Vec::new(),
        via: Via::Trampoline,
    };
    if f.is_asm() {
        return site;
    }
    if is_runtime(&f.name) && role == Role::Func {
        site.entry_patch = Err(FuncRefusal::Runtime);
        return site;
    }
    let Some(code) = bin.code(f) else {
        site.entry_patch = Err(FuncRefusal::Undecodable("its bytes are not in the file".into()));
        return site;
    };
    let decoded = match Function::decode(code, f.entry + bias, Some(bin.pclntab.code_end(f) + bias)) {
        Ok(d) => d,
        Err(e) => {
            site.entry_patch = Err(FuncRefusal::Undecodable(e.to_string()));
            return site;
        }
    };
    let sig = declared.or_else(|| dwarf_signature(ctx, f));
    let shapes = match (&sig, role) {
        (Some(sig), Role::Func) => shapes(ctx, f, sig),
        _ => values::Shapes::default(),
    };
    (site.on_entry, site.on_return) = values::sides(sig.as_ref(), &shapes, ctx.max_string, &ctx.error_itabs);
    if role == Role::Func && ctx.frames > 0 {
        values::capture_caller(&mut site.on_entry, ctx.frames);
    }
    site.typed = sig.is_some();
    // Without a locals pointer map the runtime never preempts the function asynchronously,
    // nor its own functions: no goroutine can be parked inside them.
    let preemptible = bin.pclntab.has_funcdata(f, 1) && !(role != Role::Func && is_runtime(&f.name));
    let unsafe_point =
        |pc| if preemptible { bin.pclntab.unsafe_point(f, pc - bias) } else { go_abi::pclntab::UNSAFE_POINT_UNSAFE };
    let resumable = |pc| !matches!(unsafe_point(pc), UNSAFE_POINT_UNSAFE | UNSAFE_POINT_RESTART_AT_ENTRY);
    // Where a jump can only go over an instruction a parked goroutine could resume at, a
    // user's function may still be probed when the install can look for parked goroutines:
    // planned as if none could be parked there, and those PCs checked at install.
    let scan = ctx.allgs.is_some() && role == Role::Func && preemptible;
    let never_parked = |_| UNSAFE_POINT_UNSAFE;
    site.entry_patch = match entry_patch(&decoded, unsafe_point) {
        Err(Refusal::ResumableInterior { .. }) if scan => entry_patch(&decoded, never_parked)
            .inspect(|e| site.parked_pcs.extend(parked_starts(&decoded, e.redirect.at, &resumable))),
        r => r,
    }
    .map_err(FuncRefusal::Code);
    if site.entry_patch.as_ref().is_ok_and(|e| e.whole_body) {
        // The entry trampoline runs the whole body and records the return itself.
        site.returns = Ok(Vec::new());
        return site;
    }
    let returns = match return_patches(&decoded, unsafe_point) {
        Err(Refusal::ExitUnpatchable { .. }) if scan => return_patches(&decoded, never_parked).inspect(|rets| {
            for r in rets {
                site.parked_pcs.extend(parked_starts(&decoded, r.redirect.at, &resumable));
            }
        }),
        r => r,
    };
    site.returns = returns.and_then(|rets| {
        // An exit inside the entry's stolen bytes would be patched twice.
        let entry_end =
            site.entry_patch.as_ref().map_or(site.entry, |e| e.stolen.last().map_or(site.entry, |i| i.next_ip()));
        match rets.iter().find(|r| r.redirect.at < entry_end) {
            Some(r) => Err(Refusal::ExitUnpatchable { pc: r.ret() }),
            None => Ok(rets),
        }
    });
    site
}

/// Matches `--func` patterns against the pclntab and analyses every match.
/// What planning needs besides the binary.
pub struct PlanContext {
    pub dwarf: Option<go_abi::dwarf::DwarfInfo>,
    pub max_string: u16,
    /// Run-time itabs (as `error`) of the error types whose first field is their message.
    pub error_itabs: Vec<u64>,
    /// Run-time address of `runtime.allgs`, when found: the install can then check that no
    /// goroutine is parked inside a jump's bytes, and planning may use such jumps.
    pub allgs: Option<u64>,
    /// Return addresses to record for each --func call: 0 none, 1 the caller's
    /// (`--callers`), more: its stack (`--stack N`).
    pub frames: u8,
    /// Pointers followed to show --func arguments by their fields (`--max-depth`).
    pub max_depth: u32,
}

/// How much of each --func call is recorded (from the command line).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_string: u16,
    pub frames: u8,
    pub max_depth: u32,
}

impl PlanContext {
    /// [`PlanContext::with_twin`], recording as much of each call as `limits` says.
    pub fn for_args(
        bin: &GoBinary<'_>,
        bias: u64,
        twin: Option<&std::path::Path>,
        limits: Limits,
    ) -> anyhow::Result<PlanContext> {
        let ctx = PlanContext::with_twin(bin, bias, limits.max_string, twin)?;
        Ok(PlanContext { frames: limits.frames, max_depth: limits.max_depth, ..ctx })
    }

    /// [`PlanContext::new`], with DWARF from `twin` when given: another build of the same
    /// code (the unstripped build of a stripped target), accepted only when its functions
    /// are the target's, the same names at the same addresses; else an error saying what
    /// differs.
    pub fn with_twin(
        bin: &GoBinary<'_>,
        bias: u64,
        max_string: u16,
        twin: Option<&std::path::Path>,
    ) -> anyhow::Result<PlanContext> {
        use anyhow::Context;
        let mut ctx = PlanContext::new(bin, bias, max_string);
        let Some(path) = twin else { return Ok(ctx) };
        let what = || format!("--debug-info {}", path.display());
        let file = std::fs::File::open(path).with_context(what)?;
        // SAFETY: a read-only private mapping of a file we only read.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(what)?;
        let other = GoBinary::parse(&map[..]).with_context(what)?;
        let (ours, theirs) = (bin.functions()?, other.functions().with_context(what)?);
        let differ: Vec<String> = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.name != b.name || a.entry != b.entry)
            .map(|(a, b)| format!("{} at {:#x} here, {} at {:#x} there", a.name, a.entry, b.name, b.entry))
            .collect();
        anyhow::ensure!(
            ours.len() == theirs.len() && differ.is_empty(),
            "{}: not a build of the target's code ({} functions here, {} there{}); build it from the same source \
             with the same flags, without -s -w",
            what(),
            ours.len(),
            theirs.len(),
            differ.first().map_or(String::new(), |d| format!("; first difference: {d}"))
        );
        let dwarf = other.dwarf().with_context(what)?;
        anyhow::ensure!(dwarf.is_some(), "{}: it has no DWARF either (built with -w?)", what());
        ctx.dwarf = dwarf;
        Ok(ctx)
    }

    pub fn new(bin: &GoBinary<'_>, bias: u64, max_string: u16) -> PlanContext {
        PlanContext {
            dwarf: bin.dwarf().ok().flatten(),
            max_string,
            error_itabs: error_itabs(bin, bias),
            allgs: allgs_address(bin).map(|a| a + bias),
            frames: 0,
            max_depth: 0,
        }
    }
}

/// `runtime.allgs` (link-time address), read from `runtime.forEachG`'s code, so stripped
/// binaries have it too: the slice's pointer and length are its first two RIP-relative
/// loads of adjacent words (Go 1.21 to 1.27 all read them there, under `allglock`).
pub fn allgs_address(bin: &GoBinary<'_>) -> Option<u64> {
    use trampolines::iced_x86::{Mnemonic, OpKind, Register};
    let funcs = bin.functions().ok()?;
    let f = funcs.iter().find(|f| f.name == "runtime.forEachG")?;
    let code = bin.code(f)?;
    let decoded = Function::decode(code, f.entry, Some(bin.pclntab.code_end(f))).ok()?;
    let loads: Vec<u64> = decoded
        .insns
        .iter()
        .filter(|i| {
            i.mnemonic() == Mnemonic::Mov
                && i.op0_kind() == OpKind::Register
                && i.op1_kind() == OpKind::Memory
                && i.memory_base() == Register::RIP
        })
        .map(|i| i.memory_displacement64())
        .collect();
    loads.windows(2).find(|w| w[1] == w[0] + 8).map(|w| w[0])
}

/// pclntab UnsafePoint values (`internal/abi`) at which no goroutine is ever parked.
const UNSAFE_POINT_UNSAFE: i32 = -2;
const UNSAFE_POINT_RESTART_AT_ENTRY: i32 = -5;

/// Instruction starts strictly inside the 5 bytes of a jump at `at`, where `resumable`.
fn parked_starts(decoded: &Function, at: u64, resumable: &dyn Fn(u64) -> bool) -> Vec<u64> {
    decoded
        .insns
        .iter()
        .map(|i| i.ip())
        .filter(|&pc| pc > at && pc < at + trampolines::site::JUMP_LEN)
        .filter(|&pc| resumable(pc))
        .collect()
}

/// `errors.New`'s, `fmt.Errorf`'s with one `%w` and with several: structs whose first
/// field is the message string, so a probe can show an error's text, not a pointer.
const MESSAGE_FIRST_ERRORS: [&str; 3] = ["*errors.errorString", "*fmt.wrapError", "*fmt.wrapErrors"];

fn error_itabs(bin: &GoBinary<'_>, bias: u64) -> Vec<u64> {
    MESSAGE_FIRST_ERRORS.iter().filter_map(|t| bin.itab(t, "error")).map(|a| a + bias).collect()
}

/// The DWARF shapes of the signature's values, `ctx.max_depth` pointers deep, matched by
/// name (a declared signature's too, when the binary or its twin has DWARF).
fn shapes(ctx: &PlanContext, f: &Func<'_>, sig: &go_abi::signature::Signature) -> values::Shapes {
    let Some(d) = ctx.dwarf.as_ref().filter(|_| ctx.max_depth > 0) else { return values::Shapes::default() };
    let Some(fd) = d.function_by_entry(f.entry) else { return values::Shapes::default() };
    let of = |v: &go_abi::signature::Value, result: bool| {
        let p = fd.params.iter().find(|p| p.is_result == result && p.name == v.name)?;
        d.param_shape(p, ctx.max_depth).ok().flatten()
    };
    values::Shapes {
        params: sig.params.iter().map(|v| of(v, false)).collect(),
        results: sig.results.iter().map(|v| of(v, true)).collect(),
    }
}

fn dwarf_signature(ctx: &PlanContext, f: &Func<'_>) -> Option<go_abi::signature::Signature> {
    ctx.dwarf.as_ref().and_then(|d| d.function_by_entry(f.entry)).and_then(|d| signature(d, f.args))
}

/// The signature declared in `--func 'NAME(PARAMS) RESULTS'` for `f`: checked against the
/// pclntab's argument frame, and against DWARF when the binary has it.
fn declared_signature(
    ctx: &PlanContext,
    f: &Func<'_>,
    declared: &go_abi::declared::Declared,
) -> anyhow::Result<go_abi::signature::Signature> {
    use go_abi::signature::ShowLocation;
    let sig = go_abi::declared::signature(declared, &f.name, f.args)?;
    if let Some(d) = dwarf_signature(ctx, f) {
        let show = |v: &[go_abi::signature::Value]| {
            v.iter().map(|v| format!("{} {}", v.name, ShowLocation(&v.location))).collect::<Vec<_>>().join(", ")
        };
        let places = |s: &go_abi::signature::Signature| {
            (s.params.iter().chain(&s.results).map(|v| v.location.clone()).collect::<Vec<_>>(), s.params.len())
        };
        anyhow::ensure!(
            places(&d) == places(&sig),
            "{}: the declaration puts its values at ({}) ({}), DWARF at ({}) ({}): it is not this function's",
            f.name,
            show(&sig.params),
            show(&sig.results),
            show(&d.params),
            show(&d.results)
        );
    }
    Ok(sig)
}

pub fn plan(bin: &GoBinary<'_>, patterns: &[String], bias: u64, ctx: &PlanContext) -> anyhow::Result<Vec<ProbeSite>> {
    let funcs = bin.functions()?;
    let mut sites = Vec::new();
    for full in patterns {
        let before = sites.len();
        let (pattern, declaration) = go_abi::declared::split_pattern(full);
        let declared = match declaration {
            Some(text) => {
                anyhow::ensure!(
                    !pattern.contains(['*', '?', '[']),
                    "--func {full:?}: a declared signature is one function's; name it without a glob"
                );
                Some(go_abi::declared::parse(text).map_err(|e| anyhow::anyhow!("--func {full:?}: {e}"))?)
            }
            None => None,
        };
        for f in funcs.iter().filter(|f| crate::inspect::matches_exact_or_glob(pattern, &f.name)) {
            if sites.iter().any(|s: &ProbeSite| s.entry == f.entry + bias) {
                continue;
            }
            let sig = declared.as_ref().map(|d| declared_signature(ctx, f, d)).transpose()?;
            sites.push(analyse_with(bin, f, sites.len() as u32, bias, ctx, Role::Func, sig));
        }
        if sites.len() == before {
            anyhow::bail!(
                "no function matches {pattern:?} (list them with `inject functions`; a function inlined into all its \
                 callers has no code of its own: build with -gcflags=-l to keep it)"
            );
        }
    }
    Ok(sites)
}
