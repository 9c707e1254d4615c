//! The uprobe backend: kernel uprobes at each probed function's entry and at each of its
//! `RET`s, all running one BPF program (`probe.bpf.c`) that finds the attach point's
//! capture plan in an array map by the attach cookie, and writes records into a BPF ring
//! buffer; the [`pump`] moves them into a ring of the shared ring's format, which the
//! collector reads as it reads the trampolines'. Nothing here uses ptrace, and the kernel
//! removes every uprobe when inject's descriptors close, even after `kill -9`.
//! docs/uprobe.md says why it is built this way.

pub mod abi;
pub mod check;
mod pump;
pub mod sites;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::{ProgramError, UProbe};
use go_abi::GoBinary;
use memmap2::MmapMut;
use trampolines::RingAddrs;

use super::{Backend, Installed, PauseParts, Probes, Removal};
use crate::plan::{ProbeSite, Via};
use crate::ring::RingReader;

pub use pump::RingWriter;

/// The BPF program, as `cargo xtask bpf` built it from `probe.bpf.c`.
pub const PROGRAM: &[u8] = include_bytes!("probe.bpf.o");

/// Bytes of the BPF ring buffer: ~64,000 records of a few hundred bytes, tens of
/// milliseconds at the most uprobes fire on two cores (each is a kernel trap of
/// microseconds).
const EVENTS_BYTES: u32 = 16 << 20;

/// The uprobe backend.
pub struct Uprobes;

impl Backend for Uprobes {
    fn recover(&self, _pid: i32, _bin: &GoBinary<'_>, _bias: u64) -> Result<Option<String>> {
        // Uprobes of a dead inject are already gone (the kernel removed them with its
        // descriptors); a dead inject's trampolines are `inject detach`'s, which uses ptrace.
        Ok(None)
    }

    fn held(&self, _pid: i32) -> Option<String> {
        None
    }

    fn install(
        &self,
        pid: i32,
        bin: &GoBinary<'_>,
        bias: u64,
        sites: &[ProbeSite],
        ring: RingAddrs,
    ) -> Result<Box<dyn Probes>> {
        let started = Instant::now();
        let layout = ring.layout;
        let mut map = MmapMut::map_anon(layout.total_len()).context("mapping the ring")?;
        layout.initialise_zeroed(&mut map);
        let writer = RingWriter {
            base: map.as_mut_ptr(),
            len: map.len(),
            layout,
            lossless: ring.wait_spins > 0,
            rings: (0, layout.rings),
        };
        let attached = Attached::attach(pid, bin, bias, sites, &ring, writer)?;
        let summary = Installed {
            sites: attached.sites.clone(),
            threads: std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count),
            pause: Duration::ZERO,
            pause_parts: PauseParts::default(),
            prepare_pause: Duration::ZERO,
            prepare_parts: PauseParts::default(),
            lossless: ring.wait_spins > 0,
            ring_bytes: 0,
            code_bytes: 0,
            reserve_time: started.elapsed(),
        };
        Ok(Box::new(UprobeProbes { attached, map, layout, summary }))
    }
}

/// Uprobes in a process, the program they run, and the pump moving their records.
pub struct Attached {
    ebpf: Mutex<Option<aya::Ebpf>>,
    /// The uprobes, in the order they went in, with the program each runs.
    links: Mutex<Vec<(abi::Program, aya::programs::uprobe::UProbeLinkId)>>,
    ring: RingAddrs,
    /// Sites with uprobes (by id), with how many exits.
    pub sites: Vec<(u32, usize)>,
    /// Uprobes attached.
    pub points: usize,
    stop: Arc<AtomicBool>,
    pump: Mutex<Option<std::thread::JoinHandle<pump::PumpTotals>>>,
}

/// Why the program could not be loaded, with the verifier's line when it refused it.
fn load_error(e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => anyhow!(
            "the kernel's BPF verifier rejected inject's uprobe program ({io_error}): {}",
            check::verifier_reason(&verifier_log.to_string())
        ),
        other => anyhow!(other).context("loading inject's uprobe program"),
    }
}

/// The file offset of link-time address `vaddr` (uprobes are placed by file offset).
fn file_offset(bin: &GoBinary<'_>, vaddr: u64) -> Result<u64> {
    use object::{Object, ObjectSegment};
    bin.elf
        .file
        .segments()
        .find_map(|s| {
            let (off, size) = s.file_range();
            let at = vaddr.checked_sub(s.address())?;
            (at < size).then_some(off + at)
        })
        .with_context(|| format!("{vaddr:#x} is not in the executable's file"))
}

impl Attached {
    /// Loads the program, fills its plans and attaches a uprobe at every entry and RET of
    /// the `sites` whose [`Via`] is uprobes; the pump writes their records with `writer`.
    pub fn attach(
        pid: i32,
        bin: &GoBinary<'_>,
        bias: u64,
        sites: &[ProbeSite],
        ring: &RingAddrs,
        writer: RingWriter,
    ) -> Result<Attached> {
        check::available().map_err(|why| anyhow!(why))?;
        // Plans: entry then return of each site; attach points: (run-time address, plan).
        let mut plans = Vec::new();
        let mut plan_sites = Vec::new();
        let mut points = Vec::new();
        let mut entries = Vec::new();
        let mut done = Vec::new();
        for s in sites {
            let Via::Uprobe { at, rets } = &s.via else { continue };
            // A side that records nothing (`off`) gets no uprobe.
            let plan = |p: &trampolines::CapturePlan, kind| -> Result<Option<abi::Plan>> {
                if p.off {
                    return Ok(None);
                }
                abi::encode(s.id, kind, p).map(Some).map_err(|e| anyhow!("{}: {e}", s.name))
            };
            let entry = plan(&s.on_entry.plan, ring_abi::Kind::Entry)?;
            let ret = plan(&s.on_return.plan, ring_abi::Kind::Return)?;
            let first = plans.len() as u32;
            plans.extend([entry.unwrap_or_default(), ret.unwrap_or_default()]);
            plan_sites.extend([s.id, s.id]);
            if entry.is_some() {
                entries.push((*at, first));
            }
            let exits = if ret.is_some() { rets.as_deref().unwrap_or_default() } else { &[] };
            points.extend(exits.iter().map(|&r| (r, first + 1)));
            done.push((s.id, rets.as_deref().map_or(0, <[u64]>::len)));
        }
        // Returns first, entries last (and out in the reverse order): every call whose
        // entry is recorded has its returns probed.
        points.extend(entries);
        if points.is_empty() {
            bail!("no site was given to the uprobe backend");
        }
        let n = plans.len() as u32;
        // Another build of the program, for the tests (one the verifier refuses).
        let object = match std::env::var_os("INJECT_BPF_OBJECT") {
            Some(path) => std::fs::read(&path).with_context(|| format!("INJECT_BPF_OBJECT {}", path.display()))?,
            None => PROGRAM.to_vec(),
        };
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("plans", n)
            .map_max_entries("drops", n)
            .map_max_entries("events", EVENTS_BYTES)
            .load(&object)
            .context("creating the uprobe program's maps")?;
        {
            let mut map: Array<_, abi::Plan> = Array::try_from(ebpf.map_mut("plans").context("plans map")?)?;
            for (i, p) in plans.iter().enumerate() {
                map.set(i as u32, *p, 0).context("writing a capture plan")?;
            }
        }
        set_enabled(&mut ebpf, ring, false)?;
        let events = RingBuf::try_from(ebpf.take_map("events").context("events map")?)?;
        let drops = Array::try_from(ebpf.take_map("drops").context("drops map")?)?;
        // The capture program must load; the header writers may not (a kernel under
        // lockdown refuses bpf_probe_write_user): then their points run the capture
        // program, which records that nothing was written, and inject says so.
        let mut writes_off = None;
        for program in abi::Program::ALL {
            if program != abi::Program::Probe && !plans.iter().any(|p| p.program() == program) {
                continue;
            }
            let prog: &mut UProbe = ebpf
                .program_mut(program.name())
                .with_context(|| format!("{} is missing from the uprobe object", program.name()))?
                .try_into()?;
            match prog.load().map_err(load_error) {
                Ok(()) => {}
                Err(e) if program.writes() => writes_off = Some(check::writes_refused(&format!("{e:#}"))),
                Err(e) => return Err(e),
            }
        }
        if let Some(why) = &writes_off {
            eprintln!(
                "inject: warning: uprobes: outgoing trace context off: {why}; requests leave without a traceparent \
                 (spans are still made and exported)"
            );
        }
        let runs = |plan: &abi::Plan| match plan.program() {
            p if p.writes() && writes_off.is_some() => abi::Program::Probe,
            p => p,
        };
        let exe = format!("/proc/{pid}/exe");
        let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(pid as u32).context("pid 0")?);
        // Start moving records before the first uprobe can fire.
        let stop = Arc::new(AtomicBool::new(false));
        let pump = pump::Pump { events, drops, plan_sites, writer };
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new().name("uprobe-pump".into()).spawn(move || pump.run(stop))?
        };
        let attached = Attached {
            ebpf: Mutex::new(None),
            links: Mutex::new(Vec::new()),
            ring: *ring,
            sites: done,
            points: points.len(),
            stop,
            pump: Mutex::new(Some(handle)),
        };
        for &(addr, plan) in &points {
            let off = file_offset(bin, addr - bias)?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(off),
                cookie: Some(u64::from(plan)),
            };
            let program = plans.get(plan as usize).map_or(abi::Program::Probe, runs);
            let prog: &mut UProbe = ebpf.program_mut(program.name()).context("a loaded program")?.try_into()?;
            match prog.attach(point, &exe, scope) {
                Ok(link) => attached.links.lock().unwrap_or_else(|e| e.into_inner()).push((program, link)),
                Err(e) => {
                    let name =
                        sites.iter().find(|s| s.id == plan_sites_of(&plans, plan)).map_or("?", |s| s.name.as_str());
                    // Dropping `ebpf` takes out the uprobes attached so far.
                    drop(ebpf);
                    attached.stop_pump();
                    return Err(anyhow!(e))
                        .with_context(|| format!("attaching a uprobe to {name} at {addr:#x} in pid {pid}"));
                }
            }
        }
        // All in: record from now on, every probe at once.
        set_enabled(&mut ebpf, ring, true)?;
        *attached.ebpf.lock().unwrap_or_else(|e| e.into_inner()) = Some(ebpf);
        Ok(attached)
    }

    /// Takes every uprobe out (the kernel restores the code), then lets the pump drain.
    pub fn detach(&self) -> Removal {
        let started = Instant::now();
        let mut was = self.ebpf.lock().unwrap_or_else(|e| e.into_inner()).take();
        let removed = if was.is_some() { self.points } else { 0 };
        if let Some(ebpf) = was.as_mut() {
            // Stop recording everywhere at once; the uprobes then come out one by one.
            let _ = set_enabled(ebpf, &self.ring, false);
        }
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(ebpf) = was.as_mut() {
            // Entries out first: a call recorded from here on still has its returns probed.
            for (program, link) in links.into_iter().rev() {
                if let Some(prog) = ebpf.program_mut(program.name()).and_then(|p| <&mut UProbe>::try_from(p).ok()) {
                    let _ = prog.detach(link);
                }
            }
        }
        drop(was);
        self.stop_pump();
        Removal { restored: 0, uprobes: removed, unmapped: false, pause: started.elapsed(), kept: None }
    }

    /// Stops the pump once it has moved everything the kernel's buffer holds.
    pub(crate) fn stop_pump(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.pump.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// Turns recording on or off (the config map's `enabled`).
fn set_enabled(ebpf: &mut aya::Ebpf, ring: &RingAddrs, on: bool) -> Result<()> {
    let mut config: Array<_, abi::Config> = Array::try_from(ebpf.map_mut("config").context("config map")?)?;
    let c = abi::Config {
        goid_off: u64::from(ring.goid_offset),
        stack_lo_off: 0,
        stack_hi_off: u64::from(ring.stack_hi_offset),
        enabled: u64::from(on),
        root_below: ring.sampling.root_below,
        parent_based: u64::from(ring.sampling.parent_based),
    };
    config.set(0, c, 0).context("writing the uprobe program's configuration")?;
    Ok(())
}

fn plan_sites_of(plans: &[abi::Plan], plan: u32) -> u32 {
    plans.get(plan as usize).map_or(u32::MAX, |p| p.site)
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Uprobes writing into a ring of inject's own.
struct UprobeProbes {
    attached: Attached,
    map: MmapMut,
    layout: ring_abi::Layout,
    summary: Installed,
}

impl Probes for UprobeProbes {
    fn installed(&self) -> &Installed {
        &self.summary
    }

    fn reader(&mut self, shapes: Vec<[crate::ring::DataShape; 2]>) -> RingReader {
        let layout = self.layout;
        // SAFETY: the mapping lives as long as these probes, which the caller keeps until
        // the reader is done.
        unsafe { RingReader::new(self.map.as_mut_ptr(), self.map.len(), layout, shapes) }
    }

    fn remove(&self) -> Result<Removal> {
        Ok(self.attached.detach())
    }

    fn flush(&self) {}

    fn drain(&self) {
        self.attached.stop_pump();
    }
}
