//! Backends put probes into a live process, take them out again, and hand the collector
//! the records the probes write. The trampoline backend (ptrace windows, patched jumps to
//! generated trampolines, a shared-memory ring) is [`trampoline`]; BPF uprobes
//! ([`uprobe`]) are its sibling behind the same [`Backend`] and [`Probes`] traits, and
//! [`both`] runs the two at once (`--backend auto`). Nothing above this module knows how a
//! probe gets in.

mod both;
pub mod trampoline;
pub mod uprobe;

use std::time::Duration;

use anyhow::Result;
use go_abi::GoBinary;
use trampolines::RingAddrs;

use crate::plan::ProbeSite;
use crate::ring::RingReader;

/// A way of putting probes into a live process.
pub trait Backend {
    /// Undoes what an instance of this backend that died (`kill -9`) left in `pid`, before
    /// anything else is done to it; a line for users when there was something to undo.
    fn recover(&self, pid: i32, bin: &GoBinary<'_>, bias: u64) -> Result<Option<String>>;
    /// Why installing into `pid` would be refused because another running inject holds
    /// it, if it would (for `--dry-run`, which installs nothing).
    fn held(&self, pid: i32) -> Option<String>;
    /// Puts `sites` into `pid`, with records going to a ring shaped like `ring`. On error
    /// nothing of it stays in the process.
    fn install(
        &self,
        pid: i32,
        bin: &GoBinary<'_>,
        bias: u64,
        sites: &[ProbeSite],
        ring: RingAddrs,
    ) -> Result<Box<dyn Probes>>;
}

/// Probes that are in a process.
pub trait Probes {
    /// What installing did, for the summary.
    fn installed(&self) -> &Installed;
    /// A reader of the records; `data_len[site]` is how many copied bytes its entry and
    /// its return records carry. The probes must outlive the reader.
    fn reader(&mut self, shapes: Vec<[crate::ring::DataShape; 2]>) -> RingReader;
    /// Takes every probe out, leaving the process as it was.
    fn remove(&self) -> Result<Removal>;
    /// Writes back anything buffered in our view of the records (before the summary).
    fn flush(&self);
    /// Moves every record the probes have made into the ring, before the collector's last
    /// look (a target that exited leaves uprobe records in the kernel's buffer until the
    /// pump has moved them). Probes that write the ring themselves have nothing to do.
    fn drain(&self) {}
}

/// Where a window's stopped time went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PauseParts {
    /// Seizing every thread and waiting for each to stop (under CPU contention a thread
    /// must be scheduled to stop).
    pub stop_ms: f64,
    /// The window's own work: injected syscalls, or checks and writes.
    pub work_ms: f64,
    /// Times the world ran on briefly (0.3-2.3 ms) because a thread was inside a patch site
    /// or a signal handler, or a goroutine parked where a jump goes.
    pub retries: usize,
    /// Of those, the times a parked goroutine was the reason.
    pub parked: usize,
    /// Letting every thread go.
    pub resume_ms: f64,
}

impl PauseParts {
    /// One line for users when a pause was long.
    pub fn describe(&self) -> String {
        format!(
            "stopping threads {:.1} ms, work {:.1} ms ({} retries), resuming {:.1} ms",
            self.stop_ms, self.work_ms, self.retries, self.resume_ms
        )
    }
}

/// What installing did.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Sites actually installed (by id), with how many exits are probed.
    pub sites: Vec<(u32, usize)>,
    pub threads: usize,
    /// How long the world stood still to put the probes in.
    pub pause: Duration,
    /// Where that time went.
    pub pause_parts: PauseParts,
    /// How long the world stood still earlier, to create memory, and where that went.
    pub prepare_pause: Duration,
    pub prepare_parts: PauseParts,
    /// Writers wait for room in a full ring.
    pub lossless: bool,
    /// Memory added to the process: the ring (allocated up front and charged to inject)
    /// and the probes' code.
    pub ring_bytes: u64,
    pub code_bytes: u64,
    /// Allocating the ring's pages (the process runs meanwhile).
    pub reserve_time: Duration,
}

/// What removal achieved.
#[derive(Debug)]
pub struct Removal {
    /// Patches restored (trampolines).
    pub restored: usize,
    /// Uprobes the kernel took out.
    pub uprobes: usize,
    pub unmapped: bool,
    pub pause: Duration,
    /// Memory left mapped on purpose (address, length): the Kafka header arena, which
    /// batches queued in the process may still point to.
    pub kept: Option<(u64, u64)>,
}

/// `--backend`: what puts the probes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Choice {
    /// Trampolines where the patcher installs them, uprobes for the sites it refuses and
    /// for a process inject may not ptrace (when BPF is permitted here).
    #[default]
    Auto,
    /// Jumps to trampolines patched into the code with ptrace: tens of nanoseconds a call.
    Trampoline,
    /// Kernel uprobes running a BPF program: no ptrace at all, removed by the kernel even
    /// when inject is killed; a kernel trap per probe (microseconds a call), float arguments
    /// not captured.
    Uprobe,
}

/// Decides each site's backend; says on stderr when `auto` cannot use uprobes for sites
/// the patcher refused, and why.
pub fn assign(sites: &mut [ProbeSite], bin: &GoBinary<'_>, bias: u64, choice: Choice) -> Result<()> {
    use crate::plan::Via;
    if let Ok(names) = std::env::var("INJECT_REFUSE_TRAMPOLINE") {
        for s in sites.iter_mut().filter(|s| names.split_whitespace().any(|n| n == s.name)) {
            s.entry_patch = Err(crate::plan::FuncRefusal::Forced);
        }
    }
    match choice {
        Choice::Trampoline => {}
        Choice::Uprobe => {
            uprobe::check::available().map_err(|why| anyhow::anyhow!("--backend uprobe: {why}"))?;
            let mut off: Vec<(&str, String)> = Vec::new();
            for s in sites.iter_mut() {
                s.via = uprobe::sites::uprobe_via(bin, bias, s);
                uprobe::sites::mark_floats(s);
                if let (Via::Refused(why), crate::plan::Role::Lib(p)) = (&s.via, s.role) {
                    let name = crate::libs::library(p).name();
                    if !off.iter().any(|(n, _)| *n == name) {
                        off.push((name, format!("{}: {why}", s.name)));
                    }
                }
            }
            for (name, why) in off {
                eprintln!(
                    "inject: warning: --backend uprobe: {name} instrumentation partly off ({why}); --backend auto \
                     traces it with trampolines"
                );
            }
        }
        Choice::Auto => {
            let refused: Vec<usize> = (0..sites.len()).filter(|&i| !sites[i].installable()).collect();
            if refused.is_empty() {
                return Ok(());
            }
            if let Err(why) = uprobe::check::available() {
                eprintln!("inject: warning: trampolines alone: {why}");
                return Ok(());
            }
            for i in refused {
                if let via @ Via::Uprobe { .. } = uprobe::sites::uprobe_via(bin, bias, &sites[i]) {
                    sites[i].via = via;
                    uprobe::sites::mark_floats(&mut sites[i]);
                }
            }
            one_home_for_context(sites, bin, bias);
        }
    }
    Ok(())
}

/// Trace context lives in one place: the ring's tables when trampolines run every probe
/// that keeps it, the uprobe program's maps when one must be a uprobe. So under `auto`, when
/// a site that keeps context went to uprobes, every such site goes with it; when one of
/// them cannot, the site goes back to refused (a span that could not see its parent's
/// context would start a trace of its own), and says why.
fn one_home_for_context(sites: &mut [ProbeSite], bin: &GoBinary<'_>, bias: u64) {
    use crate::plan::Via;
    let keeps =
        |s: &ProbeSite| uprobe::abi::uses_context(&s.on_entry.plan) || uprobe::abi::uses_context(&s.on_return.plan);
    if !sites.iter().any(|s| keeps(s) && matches!(s.via, Via::Uprobe { .. })) {
        return;
    }
    let moves: Vec<(usize, Via)> = (0..sites.len())
        .filter(|&i| keeps(&sites[i]) && sites[i].via == Via::Trampoline && sites[i].entry_patch.is_ok())
        .map(|i| (i, uprobe::sites::uprobe_via(bin, bias, &sites[i])))
        .collect();
    // A probe that only writes context out may stay: it finds no span to write in the
    // trampolines' tables, so those requests leave without one, which is said; any other
    // would split the context, so the uprobe sites go back.
    let writer_only = |s: &ProbeSite| {
        uprobe::abi::only_writes_out(&s.on_entry.plan) && uprobe::abi::only_writes_out(&s.on_return.plan)
    };
    for (i, _) in moves.iter().filter(|(i, v)| matches!(v, Via::Refused(_)) && writer_only(&sites[*i])) {
        eprintln!(
            "inject: warning: {} stays on trampolines, which the uprobes' trace context does not reach: its \
             requests leave without a traceparent",
            sites[*i].name
        );
    }
    let blocking = moves.iter().find(|(i, v)| matches!(v, Via::Refused(_)) && !writer_only(&sites[*i]));
    if let Some((i, Via::Refused(why))) = blocking {
        let reason = format!(
            "its trace context would live in the uprobe program while {} keeps it in the trampolines' tables, \
             which uprobes cannot take ({why})",
            sites[*i].name
        );
        for s in sites.iter_mut().filter(|s| keeps(s) && matches!(s.via, Via::Uprobe { .. })) {
            s.via = Via::Refused(reason.clone());
        }
        return;
    }
    for (i, via) in moves.into_iter().filter(|(_, v)| matches!(v, Via::Uprobe { .. })) {
        sites[i].via = via;
        uprobe::sites::mark_floats(&mut sites[i]);
    }
}

/// The backend that installs `sites` as [`assign`] divided them.
pub fn for_sites(sites: &[ProbeSite]) -> Box<dyn Backend> {
    use crate::plan::Via;
    let uprobes = sites.iter().any(|s| matches!(s.via, Via::Uprobe { .. }));
    let trampolines = sites.iter().any(|s| s.via == Via::Trampoline && s.entry_patch.is_ok());
    match (trampolines, uprobes) {
        (_, false) => Box::new(trampoline::Trampolines),
        (false, true) => Box::new(uprobe::Uprobes),
        (true, true) => Box::new(both::Both),
    }
}

/// Whether process `pid` runs this inject's executable (or one named like it).
fn is_inject(pid: i32) -> bool {
    let exe = |p: &str| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    let comm = |p: &str| std::fs::read_to_string(format!("/proc/{p}/comm")).ok();
    let theirs = pid.to_string();
    exe(&theirs).is_some_and(|e| Some(e) == exe("self")) || comm(&theirs).is_some_and(|c| Some(c) == comm("self"))
}

/// Installs `sites` with `backend`; with `--backend auto`, a process inject may not
/// ptrace (another tracer holds it, or permission is denied) gets uprobes for every site
/// they can take instead, with a warning, when BPF is permitted here.
pub fn install(
    choice: Choice,
    backend: &dyn Backend,
    pid: i32,
    bin: &GoBinary<'_>,
    bias: u64,
    sites: &mut [ProbeSite],
    ring: RingAddrs,
) -> Result<Box<dyn Probes>> {
    let err = match backend.install(pid, bin, bias, sites, ring) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    use trampoline::ptrace::AttachError;
    // Not when the tracer is another inject: one inject per process.
    let denied = err.chain().any(|c| match c.downcast_ref::<AttachError>() {
        Some(AttachError::AlreadyTraced { tracer, .. }) => !is_inject(*tracer),
        Some(AttachError::PermissionDenied { .. }) => true,
        _ => false,
    });
    if choice != Choice::Auto || !denied || uprobe::check::available().is_err() {
        return Err(err);
    }
    eprintln!("inject: warning: {err:#}; using uprobes, which need no ptrace");
    for s in sites.iter_mut() {
        s.via = uprobe::sites::uprobe_via(bin, bias, s);
        uprobe::sites::mark_floats(s);
    }
    if !sites.iter().any(ProbeSite::installable) {
        anyhow::bail!("{err:#}; and uprobes cannot take any of the requested functions either");
    }
    uprobe::Uprobes.install(pid, bin, bias, sites, ring)
}
