//! `inject --pid PID --func PATTERN...`: plan, attach, install, collect, remove.

use std::path::PathBuf;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use go_abi::{GoBinary, RuntimeLayout};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use ring_abi::Layout;
use trampolines::codegen::RingSelect;

use crate::backend::{Backend, Probes, Removal, trampoline::Trampolines};
use crate::exit::{describe_exit, died, exited, zombie_status};
use crate::otlp::{OtelArgs, OtelConfig};
use crate::output::{Format, Sink};
use crate::plan::{self, ProbeSite, Role};
use crate::ring::DataShape;
use crate::spans::{Clock, Pairer, SiteMeta};
use crate::target::TargetArgs;
use crate::{collect, libs};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The Go process to instrument.
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<i32>,
    /// Print the verdict for every probe site and exit without touching the process
    /// (with --exe, plan against a file).
    #[arg(long)]
    pub dry_run: bool,
    /// A Go executable to plan against (only with --dry-run).
    #[arg(long, value_name = "PATH", requires = "dry_run", conflicts_with = "command")]
    pub exe: Option<PathBuf>,
    /// Functions to probe: full names (`main.(*Store).Get`) or globs (`main.*`); a full
    /// name may declare the signature, for builds without DWARF
    /// (`main.priceOf(sku string, qty int) float64`) [also INJECT_FUNCS: patterns
    /// separated by spaces, so without declarations].
    #[arg(long = "func", value_name = "PATTERN")]
    pub funcs: Vec<String>,
    /// DWARF from the target's unstripped twin, used only when its functions are the
    /// target's (same names at the same addresses): types --func values, gives offsets.
    #[arg(long, value_name = "PATH")]
    pub debug_info: Option<PathBuf>,
    /// Library instrumentation to turn on [default: every one the target links].
    #[arg(long = "lib", value_name = "LIB", value_parser = clap::builder::PossibleValuesParser::new(libs::names()))]
    pub libs: Vec<String>,
    /// No library instrumentation: only the --func probes.
    #[arg(long, conflicts_with = "libs")]
    pub no_libs: bool,
    /// Record `url.query` on HTTP server spans (off by default: queries often carry
    /// secrets). Client spans always have it in `url.full`.
    #[arg(long)]
    pub http_query: bool,
    /// Record `db.query.text` on database spans: `sanitized` replaces every literal with
    /// `?`, `raw` keeps the text as the program sent it (it may hold secrets)
    /// [default: off, or sanitized when OTEL_GO_AUTO_INCLUDE_DB_STATEMENT=true, the
    /// OpenTelemetry Go instrumentation's switch].
    #[arg(long, value_enum, value_name = "MODE")]
    pub db_query_text: Option<libs::sql::QueryText>,
    /// For a Go release outside the supported range: use this release's struct offsets
    /// (e.g. 1.27) where the binary's DWARF does not give them.
    #[arg(long, value_name = "X.Y")]
    pub assume_go_version: Option<String>,
    /// Launch mode: if the probes cannot be installed, fail instead of running the program
    /// untraced.
    #[arg(long)]
    pub strict: bool,
    /// Launch mode: the program to start instrumented, and its arguments (after `--`).
    #[arg(last = true, value_name = "PROGRAM")]
    pub command: Vec<String>,
    /// Remove the probes and detach after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Slots in the shared ring, split into one sub-ring per CPU (256 bytes each; probes
    /// that copy more get as many fewer, larger slots) [default: 2^19 (128 MiB, ~86 ms of
    /// records at the fastest rate inject drains them), at most an eighth of inject's
    /// cgroup memory limit].
    #[arg(long, value_name = "N")]
    pub ring_slots: Option<u64>,
    /// When the ring is full, make the program wait for room (at most ~250 ms, then
    /// drop and stop waiting) instead of dropping the record [default: on for console,
    /// lines and jsonl output, where every call is expected; off for otlp and none, where
    /// the program must never be slowed].
    #[arg(long, overrides_with = "no_lossless")]
    pub lossless: bool,
    /// Drop records when the ring is full (counted and reported), never slowing the program.
    #[arg(long, overrides_with = "lossless")]
    pub no_lossless: bool,
    /// Where finished calls go: console prints each trace as an indented tree once its
    /// root returns (a call with no parent at once), lines prints each call the moment it
    /// returns, children above their parents (the console before trees) [default: otlp
    /// when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
    /// --otlp-endpoint), else console].
    #[arg(long, value_enum)]
    pub output: Option<Format>,
    /// Write the output to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    pub output_file: Option<PathBuf>,
    /// Name each --func call's caller (function, file:line of the call); each entry record
    /// then fills one cache line more (README: its cost).
    #[arg(long)]
    pub callers: bool,
    /// Show only the --func calls for which this holds: a condition over argument and
    /// result names, goroutine and duration (`qty > 100 && sku != "x"`, `duration > 2ms`).
    #[arg(long = "where", value_name = "CONDITION")]
    pub where_: Option<String>,
    /// Record each --func call's stack, up to N frames (1-32, the caller's first), walking
    /// frame pointers in the trampoline; JSON `stack`, the OTLP `code.stacktrace`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=32))]
    pub stack: Option<u8>,
    /// Count instead of recording: per --func function, calls, calls/s, errors (a non-nil
    /// `error` result) and latency p50/p90/p99/max, counted by the probes in shared memory
    /// (exact at any call rate, no record per call), shown every --stats-interval (a table
    /// redrawn in place on a terminal, a JSON object per interval with --output jsonl);
    /// at exit the totals and a latency histogram per function. No library probes.
    #[arg(long, conflicts_with_all = ["libs", "where_", "stack", "callers"])]
    pub stats: bool,
    /// Seconds between two --stats refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub stats_interval: f64,
    /// What puts the probes in: trampolines (ptrace, ~50 ns a call), uprobes (BPF, no
    /// ptrace, microseconds a call, no float arguments), or auto: trampolines, and uprobes
    /// for the sites the patcher refuses and for a process inject may not ptrace
    /// (docs/uprobe.md).
    #[arg(long, value_enum, default_value_t)]
    pub backend: crate::backend::Choice,
    /// Bytes of each string or []byte argument to copy.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_string: u16,
    /// Pointers followed to show --func arguments by their fields (0: addresses only); a
    /// slice's first elements count as one level.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub max_depth: u32,
    /// Write a JSON summary (per-function counts, drops, pauses) to this file on exit.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub otel: OtelArgs,
}

impl RunArgs {
    /// --func, else INJECT_FUNCS (so a container image needs no flags).
    pub fn with_env_funcs(mut self) -> RunArgs {
        if self.funcs.is_empty()
            && let Ok(v) = std::env::var("INJECT_FUNCS")
        {
            self.funcs = v.split_whitespace().map(str::to_string).collect();
        }
        self
    }
}

/// `inject detach --pid P`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The process to clean up.
    #[arg(long, value_name = "PID")]
    pub pid: i32,
}

/// Removes what dead injects left in a process.
pub fn detach(args: &DetachArgs) -> Result<()> {
    let pid = args.pid;
    let exe = TargetArgs { exe: None, pid: Some(pid) }.open()?;
    let bin = GoBinary::parse(&exe.map[..]).with_context(|| exe.path.display().to_string())?;
    match Trampolines.recover(pid, &bin, exe.bias)? {
        Some(line) => eprintln!("{line}"),
        None => eprintln!("inject: pid {pid} carries no probes of an inject that is gone; nothing to do"),
    }
    Ok(())
}

/// Stop-the-world pauses longer than this are explained on stderr.
const LONG_PAUSE_MS: u64 = 10;

/// A command line that asks for nothing inject can do: exit code 2, as clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn run(args: &RunArgs) -> Result<()> {
    let planning_a_program = args.dry_run && !args.command.is_empty();
    if args.pid.is_none() && args.exe.is_none() && !planning_a_program {
        bail!(UsageError(
            "nothing to do: give --pid PID --func PATTERN, or -- PROGRAM ARGS... (or a subcommand; see --help)".into()
        ));
    }
    if args.funcs.is_empty() && args.no_libs {
        bail!(UsageError("--no-libs and no --func: nothing to probe (list candidates with `inject functions`)".into()));
    }
    if let Some(why) =
        args.stats.then(|| crate::stats::refusal(!args.funcs.is_empty(), args.output, args.stats_interval)).flatten()
    {
        bail!(UsageError(why));
    }
    if args.dry_run {
        let exe = args.exe.clone().or_else(|| args.command.first().map(|p| crate::target::resolve(p)));
        let target = TargetArgs { pid: if exe.is_some() { None } else { args.pid }, exe };
        let exe = target.open()?;
        let bin = GoBinary::parse(&exe.map[..]).with_context(|| exe.path.display().to_string())?;
        let ctx = plan::PlanContext::for_args(&bin, exe.bias, args.debug_info.as_deref(), limits(args))?;
        if let Some(why) = target.pid.and_then(|pid| Trampolines.held(pid)) {
            eprintln!("inject: warning: {why} (a real attach would be refused)");
        }
        let mut sites = plan_sites(&bin, args, exe.bias, &ctx)?;
        crate::backend::assign(&mut sites, &bin, exe.bias, args.backend)?;
        return print_verdicts(&sites, args.backend != crate::backend::Choice::Trampoline);
    }
    let pid = args.pid.context("--pid")?;
    // Signals that stop us are read from a signalfd, so they are blocked in every thread
    // (block before any thread starts).
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(sig);
    }
    mask.thread_block().context("blocking SIGINT/SIGTERM")?;
    let sigfd = SignalFd::new(&mask).context("signalfd")?;
    let pidfd = pidfd_open(pid)?;
    let Some(tracing) = start(pid, args, Mode::Attach)? else { return Ok(()) };
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let mut reason = wait_for_stop(pid, &sigfd, &pidfd, deadline)?;
    let mut removal = match reason {
        StopReason::TargetExited(_) => None,
        _ => Some(tracing.inst.remove()),
    };
    // A target that died while the probes came out: that is the news, not the removal.
    if matches!(removal, Some(Err(_))) && exited(&pidfd) {
        reason = StopReason::TargetExited(zombie_status(pid));
        removal = None;
    }
    tracing.finish(reason, removal, args)?;
    if let StopReason::TargetExited(status) = reason {
        match died(status) {
            Some(how) => bail!("the target (pid {pid}) died while probes were in: {how}"),
            None if status.is_none() => eprintln!(
                "inject: warning: the target (pid {pid}) exited while probes were in; its exit status was already \
                 collected by its parent (see the parent's or the service manager's log)"
            ),
            None => {}
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `--pid`: a running program.
    Attach,
    /// `-- PROGRAM`: our own child, stopped before its first instruction.
    Launch,
}

/// The backend: trampolines alone when counting (`--stats` counts in the trampolines).
fn stats_backend(args: &RunArgs) -> Result<crate::backend::Choice> {
    use crate::backend::Choice;
    match (args.stats, args.backend) {
        (false, b) => Ok(b),
        (true, Choice::Uprobe) => {
            bail!(UsageError("--stats counts in the trampolines: not with --backend uprobe".into()))
        }
        (true, _) => Ok(Choice::Trampoline),
    }
}

/// How much of each --func call is recorded: string bytes, return addresses (`--stack`,
/// else `--callers`), pointers followed.
fn limits(args: &RunArgs) -> plan::Limits {
    plan::Limits {
        max_string: args.max_string,
        frames: args.stack.unwrap_or(u8::from(args.callers)),
        max_depth: args.max_depth,
    }
}

/// --output, else OTEL_TRACES_EXPORTER, else OTLP when an endpoint is configured (always
/// in launch mode, like any OpenTelemetry SDK), else console.
fn output_format(args: &RunArgs, otel: &OtelConfig, mode: Mode) -> Format {
    args.output.unwrap_or(match otel.default_output {
        crate::otlp::config::DefaultOutput::Otlp => Format::Otlp,
        crate::otlp::config::DefaultOutput::Console if mode == Mode::Launch => Format::Otlp,
        crate::otlp::config::DefaultOutput::Console => Format::Console,
        crate::otlp::config::DefaultOutput::None => Format::None,
    })
}

/// Where spans go, resolved before attaching so that bad configuration touches nothing.
pub struct Output {
    pub format: Format,
    pub otel: OtelConfig,
    pub process: crate::otlp::span::Process,
    pub mode: Mode,
}

/// Supported Go releases: what go-versions.toml tests, which the generated offset table
/// covers. Outside it, `--assume-go-version` names the release whose offsets to use (the
/// target's own DWARF still comes first); returns that release's layout.
fn check_go_version(bin: &GoBinary<'_>, assume: Option<&str>) -> Result<Option<RuntimeLayout>> {
    if RuntimeLayout::for_version(&bin.version).is_some() {
        return Ok(None);
    }
    let (lo, hi) = RuntimeLayout::table_range();
    let range = format!("{}.{} to {}.{}", lo.major, lo.minor, hi.major, hi.minor);
    let Some(assumed) = assume else {
        bail!(
            "the target was built with {}, outside the supported range {range}; if its runtime is laid out like a \
             supported release, say which with --assume-go-version (e.g. --assume-go-version {}.{})",
            bin.build_info.go_version,
            hi.major,
            hi.minor
        );
    };
    let v = go_abi::version::GoVersion::parse(assumed).map_err(|_| {
        anyhow::anyhow!("--assume-go-version {assumed:?}: give a release like {}.{}", hi.major, hi.minor)
    })?;
    let layout = RuntimeLayout::for_version(&v)
        .with_context(|| format!("--assume-go-version {assumed}: not a supported release ({range})"))?;
    eprintln!(
        "inject: warning: {} is outside the supported range {range}; assuming go{}.{} offsets where the binary's DWARF \
         does not give them",
        bin.build_info.go_version, v.major, v.minor
    );
    Ok(Some(layout))
}

/// The offset table's release for this binary: its own, or the one assumed for it.
fn offsets_release(bin: &GoBinary<'_>, args: &RunArgs) -> (u32, u32) {
    if RuntimeLayout::for_version(&bin.version).is_some() {
        return bin.version.release();
    }
    args.assume_go_version
        .as_deref()
        .and_then(|v| go_abi::version::GoVersion::parse(v).ok())
        .map_or(bin.version.release(), |v| v.release())
}

/// The user's functions, then the libraries' probes.
pub fn plan_sites(bin: &GoBinary<'_>, args: &RunArgs, bias: u64, ctx: &plan::PlanContext) -> Result<Vec<ProbeSite>> {
    // First: what is captured depends on them (Redis arguments for raw text).
    libs::http::QUERY_ON_SERVER.store(args.http_query, std::sync::atomic::Ordering::Relaxed);
    libs::sql::set_query_text(libs::sql::QueryText::chosen(args.db_query_text));
    let mut sites = if args.funcs.is_empty() { Vec::new() } else { plan::plan(bin, &args.funcs, bias, ctx)? };
    if !args.no_libs && !args.stats {
        let funcs = bin.functions()?;
        let release = offsets_release(bin, args);
        let mut any_lib = false;
        // Support parts (goroutine lineage) last: they go with any library planned.
        let order = libs::LIBRARIES
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.support())
            .chain(libs::LIBRARIES.iter().enumerate().filter(|(_, l)| l.support()));
        for (i, lib) in order {
            let named = args.libs.iter().any(|l| l == lib.name());
            if lib.support() {
                if !any_lib {
                    continue;
                }
            } else if !args.libs.is_empty() && !named {
                continue;
            }
            let cx =
                libs::PlanCx { bin, funcs: &funcs, bias, ctx, release, first_id: sites.len() as u32, lib: i as u8 };
            let planned = lib.plan(&cx);
            if planned.sites.is_empty() && named {
                if planned.skipped.is_empty() {
                    bail!("--lib {0}: the target does not use {0}", lib.name());
                }
                bail!(
                    "--lib {0}: the target does not use {0}, or its probes were refused: {1}",
                    lib.name(),
                    planned.skipped.join("; ")
                );
            }
            if !planned.sites.is_empty() {
                any_lib = true;
                for why in &planned.skipped {
                    eprintln!("inject: {}: left out {why}", lib.name());
                }
            }
            for mut site in planned.sites {
                if let Some(user) = sites.iter().find(|s| s.entry == site.entry) {
                    eprintln!(
                        "inject: warning: {} is probed as --func {:?}, so its {} spans are off",
                        user.name,
                        user.name,
                        lib.name()
                    );
                    continue;
                }
                site.id = sites.len() as u32;
                sites.push(site);
            }
        }
    }
    if sites.is_empty() {
        bail!(
            "nothing to probe: the target uses no library inject instruments ({}); name functions with --func PATTERN \
             (list them with `inject functions`)",
            libs::names().join(", ")
        );
    }
    Ok(sites)
}

/// How long a writer waits for room in a full ring in lossless mode before it drops the
/// record and turns waiting off (the collector turns it on again once it has caught up):
/// far longer than the collector ever sleeps, short enough that a dead inject costs a
/// program one such wait.
const LOSSLESS_WAIT: Duration = Duration::from_millis(250);

/// `PAUSE` rounds that take about `wait` on this machine (the instruction's latency
/// varies from ~3 to ~40 ns between processor generations).
fn wait_spins(wait: Duration) -> u32 {
    const N: u32 = 20_000;
    let per = (0..3)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..N {
                std::hint::spin_loop();
            }
            t.elapsed().as_secs_f64() / f64::from(N)
        })
        .fold(f64::INFINITY, f64::min)
        .max(1e-9);
    (wait.as_secs_f64() / per).clamp(1000.0, f64::from(u32::MAX)) as u32
}

/// Probes in, collector and output running.
pub struct Tracing {
    sites: Vec<ProbeSite>,
    inst: Box<dyn Probes>,
    stop: Arc<AtomicBool>,
    collector: std::thread::JoinHandle<collect::Totals>,
    output: std::thread::JoinHandle<u64>,
    exporting: crate::exports::Exports,
    stats: Option<crate::stats::Live>,
}

/// Plans the probes for process `pid` and installs them; `None` when OTEL_SDK_DISABLED
/// says not to. The caller has blocked the signals it reads from a signalfd.
pub fn start(pid: i32, args: &RunArgs, mode: Mode) -> Result<Option<Tracing>> {
    let exe = TargetArgs { exe: None, pid: Some(pid) }.open()?;
    let bin = GoBinary::parse(&exe.map[..]).with_context(|| exe.path.display().to_string())?;
    let assumed = check_go_version(&bin, args.assume_go_version.as_deref())?;
    let ctx = plan::PlanContext::for_args(&bin, exe.bias, args.debug_info.as_deref(), limits(args))?;
    let mut sites = plan_sites(&bin, args, exe.bias, &ctx)?;
    if args.stats {
        crate::stats::plan(&mut sites);
    }
    crate::backend::assign(&mut sites, &bin, exe.bias, stats_backend(args)?)?;
    check_installable(&sites)?;
    let otel = OtelConfig::resolve(&args.otel, &crate::otlp::config::process_env)?;
    let format = if args.stats { args.output.unwrap_or(Format::Console) } else { output_format(args, &otel, mode) };
    if format == Format::Otlp && !cfg!(feature = "otlp") {
        bail!(UsageError(
            "this inject was built without OTLP export (cargo feature `otlp`): give --output console or json, \
             or build it with default features"
                .into()
        ));
    }
    if format == Format::Otlp && otel.disabled {
        eprintln!(
            "inject: OTEL_SDK_DISABLED=true: not instrumenting pid {pid} (give --output console to trace anyway)"
        );
        return Ok(None);
    }
    let process = crate::otlp::span::Process::of_pid(pid, &exe.path, &bin.build_info);
    let out = Output { format, otel, process, mode };
    let layout =
        bin.runtime_layout(ctx.dwarf.as_ref()).or(assumed).context("no runtime.g layout for this Go version")?;
    start_tracing(pid, &exe, &bin, sites, layout, args, out).map(Some)
}

fn start_tracing(
    pid: i32,
    exe: &crate::target::Executable,
    bin: &GoBinary<'_>,
    mut sites: Vec<ProbeSite>,
    layout: RuntimeLayout,
    args: &RunArgs,
    out: Output,
) -> Result<Tracing> {
    // Probes a dead inject left: put every byte back first.
    let backend = crate::backend::for_sites(&sites);
    if let Some(line) = backend.recover(pid, bin, exe.bias)? {
        eprintln!("{line}");
    }
    let lossless = match (args.lossless, args.no_lossless) {
        (true, _) => true,
        (_, true) => false,
        _ => matches!(out.format, Format::Console | Format::Lines | Format::Jsonl),
    };
    let file = args.output_file.as_deref();
    let launch = out.mode == Mode::Launch;
    // Stats go their own way: no record reaches the sink.
    let sink_format = if args.stats { Format::None } else { out.format };
    let (mut sink, exporting) = crate::exports::open(sink_format, file, &out.otel, &args.otel, &out.process, launch)?;
    if lossless && let Sink::Otlp { spans, .. } = &mut sink {
        spans.wait_when_full();
    }
    // One sub-ring per P: as many as the target may run at once.
    let rings = crate::target::possible_cpus().max(crate::target::gomaxprocs(pid)).next_power_of_two().min(256);
    // Slots hold the fixed fields plus the largest plan's copied bytes; the ring keeps the
    // memory of --ring-slots slots of 256 bytes, so larger slots mean fewer.
    let data = sites.iter().map(|s| s.on_entry.plan.data_len().max(s.on_return.plan.data_len())).max().unwrap_or(0);
    let slot_size = (ring_abi::slot::DATA + data).next_power_of_two().max(256);
    // Stats need no records: the smallest ring.
    let ring_slots = if args.stats { 0 } else { args.ring_slots.unwrap_or_else(crate::ringsize::default_ring_slots) };
    let slots = (ring_slots.saturating_mul(256) / slot_size as u64).max(64);
    let per_ring = (slots / u64::from(rings)).max(64).next_power_of_two();
    // The Kafka header arena only where kafka-go's messages get headers.
    let arena = sites.iter().any(|s| s.on_entry.plan.needs_arena());
    let ring_layout = Layout::new(rings, per_ring, slot_size).context("--ring-slots")?;
    let ring_layout = ring_layout.with_sites(sites.len() as u32).with_arena(arena);
    // One counter block per P, as many as the sub-rings.
    let ring_layout = if args.stats { ring_layout.with_stats(rings) } else { ring_layout };

    let select = RingSelect::ByP { g_m: layout.m, m_p: layout.m_p, p_id: layout.p_id };
    let ring = trampolines::RingAddrs {
        base: 0,
        layout: ring_layout,
        goid_offset: layout.goid,
        stack_hi_offset: layout.stack_hi,
        select,
        wait_spins: if lossless { wait_spins(LOSSLESS_WAIT) } else { 0 },
        sampling: sink.sampling(),
    };
    crate::filter::install(args.where_.as_deref(), &sites)?;
    let mut inst = crate::backend::install(args.backend, &*backend, pid, bin, exe.bias, &mut sites, ring)?;
    let done = inst.installed().clone();
    // The functions the user named, then the libraries' own probes as one figure each.
    let role = |id: u32| sites.iter().find(|s| s.id == id).map(|s| s.role);
    let (funcs, exits) =
        done.sites.iter().filter(|(id, _)| role(*id) == Some(Role::Func)).fold((0, 0), |(n, x), (_, e)| (n + 1, x + e));
    let mut libs: Vec<&str> = Vec::new();
    for (id, _) in &done.sites {
        if let Some(Role::Lib(p)) = role(*id)
            && !crate::libs::library(p).support()
            && !libs.contains(&crate::libs::library(p).name())
        {
            libs.push(crate::libs::library(p).name());
        }
    }
    let lib_sites = done.sites.len() - funcs;
    let how = if done.pause.is_zero() && done.prepare_pause.is_zero() {
        "by uprobes, no thread stopped".to_string()
    } else {
        format!(
            "{} stopped for {:.2} ms (and {:.2} ms to map memory)",
            crate::summary::count(done.threads, "thread"),
            done.pause.as_secs_f64() * 1e3,
            done.prepare_pause.as_secs_f64() * 1e3
        )
    };
    eprintln!(
        "inject: probing {}{} in pid {pid}; {how}",
        if funcs > 0 || libs.is_empty() {
            format!("{} ({})", crate::summary::count(funcs, "function"), crate::summary::count(exits, "exit"))
        } else {
            String::new()
        },
        if libs.is_empty() {
            String::new()
        } else {
            format!(
                "{}{} ({})",
                if funcs > 0 { " and " } else { "" },
                libs.join(", "),
                crate::summary::count(lib_sites, "probe")
            )
        },
    );
    // A long pause is worth explaining: it is the target's latency.
    for (what, pause, parts) in
        [("install", done.pause, done.pause_parts), ("memory", done.prepare_pause, done.prepare_parts)]
    {
        if pause > Duration::from_millis(LONG_PAUSE_MS) {
            eprintln!("inject: the {what} pause took {:.1} ms: {}", pause.as_secs_f64() * 1e3, parts.describe());
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = inst
        .reader(sites.iter().map(|s| [DataShape::of(&s.on_entry.plan), DataShape::of(&s.on_return.plan)]).collect());
    let metas = sites
        .iter()
        .map(|s| SiteMeta {
            name: s.name.clone(),
            entry: s.on_entry.clone(),
            ret: s.on_return.clone(),
            typed: s.typed,
            entry_only: s.entry_only(),
            code: s.code.clone(),
            role: s.role,
        })
        .collect();
    // A launched program waits for us: calibrate briefly, the collector refines it.
    let calibration = if out.mode == Mode::Launch { Duration::from_millis(1) } else { Duration::from_millis(20) };
    let clock = Arc::new(std::sync::Mutex::new(Clock::calibrate(calibration)));
    let (tx, rx) = collect::channel();
    let pairer = Pairer::new(metas);
    let output = {
        let (sites, clock) = (pairer.sites().to_vec(), clock.clone());
        let exe = Some((exe.map.clone(), exe.bias));
        std::thread::Builder::new().name("output".into()).spawn(move || collect::output(rx, sink, sites, clock, exe))?
    };
    let stats = match args.stats {
        false => None,
        true => {
            let launch = out.mode == Mode::Launch;
            let (file, every) = (args.output_file.clone(), args.stats_interval);
            Some(crate::stats::Live::from_reader(&reader, &sites, clock.clone(), out.format, file, every, launch)?)
        }
    };
    let collector = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("collector".into())
            .spawn(move || collect::run(reader, pairer, tx, clock, stop, Duration::from_millis(200), lossless))?
    };
    Ok(Tracing { sites, inst, stop, collector, output, exporting, stats })
}

impl Tracing {
    /// Takes the probes out of a target that lives on, then reports.
    pub fn remove_and_finish(self, reason: StopReason, args: &RunArgs) -> Result<()> {
        let removal = self.inst.remove();
        self.finish(reason, Some(removal), args)
    }

    /// Stops collecting (after the ring is drained), flushes the export and reports.
    pub fn finish(self, reason: StopReason, removal: Option<Result<Removal>>, args: &RunArgs) -> Result<()> {
        self.inst.drain();
        self.stop.store(true, Ordering::Release);
        let mut totals = self.collector.join().map_err(|_| anyhow::anyhow!("collector thread panicked"))?;
        totals.output_errors = self.output.join().map_err(|_| anyhow::anyhow!("output thread panicked"))?;
        if let Some(live) = self.stats {
            // After the removal: the counts are final. The summary counts what was counted.
            for (site, c) in totals.sites.iter_mut().zip(live.finish()?) {
                (site.entries, site.returns) = (c.all_calls(), c.returns());
            }
        }
        self.inst.flush();
        let (export, metrics) = self.exporting.finish();
        let stop = match reason {
            StopReason::Signal(s) => format!("signal {s}"),
            StopReason::Duration => "duration".into(),
            StopReason::TargetExited(status) => format!("target {}", describe_exit(status)),
        };
        let facts = crate::summary::Facts {
            sites: &self.sites,
            installed: self.inst.installed(),
            totals: &totals,
            export: export.as_ref(),
            metrics: metrics.as_ref(),
            removal: removal.as_ref().and_then(|r| r.as_ref().ok()),
        };
        crate::summary::report(&facts, stop, args.summary_json.as_deref())?;
        if let Some(Err(e)) = removal {
            return Err(e.context("removing probes"));
        }
        // A session whose spans all went nowhere failed, whatever else went well.
        if let Some(e) = export.as_ref().filter(|e| e.exported == 0 && e.dropped() > 0) {
            bail!(
                "no span reached {} ({} dropped){}; is the collector running? (OTEL_EXPORTER_OTLP_ENDPOINT)",
                e.endpoint,
                e.dropped(),
                e.last_error.as_ref().map(|m| format!(", last error: {m}")).unwrap_or_default()
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal(i32),
    Duration,
    /// With its wait status, when it could be seen.
    TargetExited(Option<i32>),
}

fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: a raw syscall with integer arguments; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            // Gone: said as every other command says it.
            crate::target::process_dir(pid)?;
        }
        return Err(e).with_context(|| format!("pidfd_open({pid})"));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn wait_for_stop(pid: i32, sigfd: &SignalFd, pidfd: &OwnedFd, deadline: Option<Instant>) -> Result<StopReason> {
    loop {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(StopReason::Duration);
                }
                PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::try_from(60_000).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN), PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(StopReason::TargetExited(zombie_status(pid)));
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty())
            && let Ok(Some(info)) = sigfd.read_signal()
        {
            return Ok(StopReason::Signal(info.ssi_signo as i32));
        }
    }
}

/// `--dry-run`'s lines; `mark` names the trampoline sites too (uprobe ones always are).
fn print_verdicts(sites: &[ProbeSite], mark: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in sites {
        let by = if mark && s.backend() == Some("trampoline") { " (trampoline)" } else { "" };
        writeln!(out, "{:#018x}  {:<50} {}{by}", s.entry, s.name, s.planned_verdict())?;
    }
    out.flush()?;
    Ok(())
}

/// Entry-only functions named one by one before the rest are counted.
const ENTRY_ONLY_NAMED: usize = 3;

/// One refused site is a warning; none installable is an error. A function probed at
/// entry only is named with what that means for its calls, and why.
pub fn check_installable(sites: &[ProbeSite]) -> Result<()> {
    // A library's probes refused by uprobes were named once, by library.
    let said = |s: &ProbeSite| matches!(s.via, plan::Via::Refused(_)) && s.role != Role::Func;
    for s in sites.iter().filter(|s| !s.installable() && !said(s)) {
        eprintln!("inject: warning: {}: {}", s.name, s.verdict());
    }
    let entry_only: Vec<&ProbeSite> = sites
        .iter()
        .filter(|s| s.role == Role::Func && s.entry_patch.as_ref().is_ok_and(|e| !e.whole_body) && s.returns.is_err())
        .collect();
    for s in entry_only.iter().take(ENTRY_ONLY_NAMED) {
        if let Err(why) = &s.returns {
            eprintln!(
                "inject: note: {} is probed at entry only: its calls show their arguments, not results or duration \
                 ({why})",
                s.name
            );
        }
    }
    if entry_only.len() > ENTRY_ONLY_NAMED {
        eprintln!(
            "inject: note: {} more function{} probed at entry only (--dry-run gives each one's reason)",
            entry_only.len() - ENTRY_ONLY_NAMED,
            if entry_only.len() - ENTRY_ONLY_NAMED == 1 { " is" } else { "s are" }
        );
    }
    if !sites.iter().any(ProbeSite::installable) {
        bail!("none of the requested functions can be probed safely (see the warnings above)");
    }
    Ok(())
}
