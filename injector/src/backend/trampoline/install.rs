//! Putting probes into a live process and taking them out again, each inside one short
//! stopped window: memory for trampolines and the ring is created with injected syscalls,
//! trampolines are written, no thread may be inside any bytes about to change, then the
//! redirects go in. Removal restores every original byte and, when provably unused,
//! unmaps what was added.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use go_abi::GoBinary;
use memmap2::MmapMut;
use ring_abi::{Layout, header};
use trampolines::codegen::{entry_trampoline, return_trampoline};
use trampolines::{Redirect, RingAddrs};

use super::parked::ParkedScan;
use super::ptrace::Session;
use super::window::{keep_looking, let_run_between_looks, syscall_pad};
use crate::backend::{Installed, PauseParts, Removal};
use crate::plan::ProbeSite;
use crate::ring::RingReader;

const PAGE: u64 = 4096;
/// Bytes kept free at the end of the main trampoline area for the memfd's name.
const NAME_ROOM: u64 = 256;

/// The ring memfd's name, `inject-ring.PID.ADDR+LEN...`: the inject that made it and the
/// trampoline areas it mapped (hex), so that a later inject can unmap those even when this
/// one dies before writing its journal. As many areas as fit in a memfd name (249 bytes).
pub fn ring_name(owner: u32, areas: &[(u64, u64)]) -> String {
    let mut name = format!("{}.{owner}", ring_abi::MEMFD_NAME);
    for (addr, len) in areas {
        let part = format!(".{addr:x}+{len:x}");
        if name.len() + part.len() > 249 {
            break;
        }
        name.push_str(&part);
    }
    name
}
/// Keep everything within this distance of the code it serves (rel32 and RIP-relative
/// operands reach ±2 GiB; stay well inside).
const REACH: u64 = (1 << 31) - (64 << 20);
/// One overwritten piece of the target's code.
#[derive(Debug, Clone)]
pub struct Patch {
    pub addr: u64,
    pub original: Vec<u8>,
    pub new: Vec<u8>,
    /// Bytes no thread may be executing inside of when this patch is written (the
    /// interior of the overwritten instructions).
    pub interior: std::ops::Range<u64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What an installation put into the target.
pub struct Installation {
    pub pid: i32,
    /// Trampoline areas (address, length): the main one near the text, then one per
    /// group of punned jumps.
    pub areas: Vec<(u64, u64)>,
    pub ring_addr: u64,
    pub ring_len: u64,
    pub patches: Vec<Patch>,
    pub ring_map: MmapMut,
    pub layout: Layout,
    pub pad: u64,
    pub summary: Installed,
}

impl Installation {
    /// A reader of the ring; `data_len[site]` is how many copied bytes its entry and its
    /// return records carry.
    pub fn reader(&mut self, shapes: Vec<[crate::ring::DataShape; 2]>) -> RingReader {
        // SAFETY: ring_map lives as long as the Installation, which the caller keeps
        // until the reader is done.
        unsafe { RingReader::new(self.ring_map.as_mut_ptr(), self.ring_map.len(), self.layout, shapes) }
    }
}

/// The address ranges mapped in the target.
fn mappings(pid: i32) -> Result<Vec<(u64, u64)>> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("reading /proc/{pid}/maps"))?;
    let mut v: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// A free, page-aligned range of `len` bytes from which every address of `text` is within
/// rel32 reach, as close to the text as possible.
fn find_gap(maps: &[(u64, u64)], text: std::ops::Range<u64>, len: u64) -> Option<u64> {
    let min_addr = 0x10000u64;
    let mut best: Option<(u64, u64)> = None;
    let mut prev_end = min_addr;
    let mut consider = |lo: u64, hi: u64| {
        // Candidates: the start of the gap, and the end of the gap minus len.
        for base in [lo.next_multiple_of(PAGE), hi.saturating_sub(len) & !(PAGE - 1)] {
            if base < lo || base.saturating_add(len) > hi {
                continue;
            }
            let far = |a: u64, b: u64| a.abs_diff(b) > REACH;
            if far(base, text.start) || far(base + len, text.start) || far(base, text.end) || far(base + len, text.end)
            {
                continue;
            }
            let dist = base.abs_diff(text.start).min(base.abs_diff(text.end));
            if best.is_none_or(|(_, d)| dist < d) {
                best = Some((base, dist));
            }
        }
    };
    // User space ends below 2^47; [vsyscall] sits above it.
    const USER_END: u64 = 0x7fff_ffff_f000;
    for &(start, end) in maps.iter().filter(|(s, _)| *s < USER_END) {
        if start > prev_end + 2 * PAGE {
            // Leave a guard page on both sides.
            consider(prev_end + PAGE, start - PAGE);
        }
        prev_end = prev_end.max(end);
    }
    if prev_end + 2 * PAGE < USER_END {
        consider(prev_end + PAGE, USER_END);
    }
    best.map(|(b, _)| b)
}

/// A free, page-aligned range of `len` bytes inside `window`, a guard page from every
/// mapping.
fn find_gap_within(maps: &[(u64, u64)], window: std::ops::Range<u64>, len: u64) -> Option<u64> {
    let mut maps = maps.to_vec();
    maps.sort();
    let mut at = window.start.next_multiple_of(PAGE);
    for &(start, end) in &maps {
        if end + PAGE <= at {
            continue;
        }
        if at + len + PAGE <= start {
            break;
        }
        at = (end + PAGE).next_multiple_of(PAGE);
    }
    (at + len <= window.end).then_some(at)
}

fn syscall(s: &mut Session, tid: i32, pad: u64, nr: i64, args: [u64; 6]) -> Result<u64> {
    let r = s.syscall(tid, pad, nr, args)?;
    Ok(r as u64)
}

/// Installs `sites` into process `pid`, with a ring shaped like `ring` (its base is
/// chosen here). On error nothing stays patched.
pub fn install(pid: i32, bin: &GoBinary<'_>, bias: u64, sites: &[ProbeSite], ring: RingAddrs) -> Result<Installation> {
    let pad = syscall_pad(bin)? + bias;
    let text = bin.text_range();
    let text = text.start + bias..text.end + bias;
    // Size the trampoline areas by generating everything once at provisional addresses
    // (sizes do not depend on where the code lands, as long as it is within reach).
    let layout = ring.layout;
    let groups = pinned_groups(sites)?;
    let provisional_main = text.end.next_multiple_of(PAGE);
    let provisional = RingAddrs { base: provisional_main, ..ring };
    let mut bases = vec![provisional_main + layout.total_len() as u64];
    bases.extend(groups.iter().map(|g| g.window.start.next_multiple_of(PAGE)));
    let probe = generate(sites, &provisional, &bases, &groups)?;
    // The main area also holds the memfd's name at its end.
    let lens: Vec<u64> = probe
        .code
        .iter()
        .enumerate()
        .map(|(i, c)| (c.len() as u64 + if i == 0 { 4096 } else { 0 }).next_multiple_of(PAGE))
        .collect();
    // Room in the ring's journal for every patch (it comes last: no code depends on it).
    let layout = layout.with_patches(probe.patches.len() as u32);
    let ring = RingAddrs { layout, ..ring };
    let ring_len = layout.total_len() as u64;

    // Window 1: create the memory (nothing points at it yet), then let the target run
    // while the ring is initialised and the code generated.
    // Pauses are measured from before the first thread stops to after the last resumes.
    let started = Instant::now();
    let mut s = Session::attach(pid)?;
    // Another inject may have installed since this one looked (two started together): with
    // the world stopped, none can be installing now, and a finished one's ring is mapped.
    if let Err(e) = super::recover::leftovers(pid)
        && e.downcast_ref::<super::recover::Held>().is_some()
    {
        return Err(e);
    }
    let mut prepare_parts = PauseParts { stop_ms: ms(started.elapsed()), ..PauseParts::default() };
    let mut maps = mappings(pid)?;
    let base = find_gap(&maps, text.clone(), lens[0] + PAGE + ring_len)
        .context("no free address range within ±2 GiB of the target's code for trampolines")?;
    let (tramp_addr, ring_addr) = (base, base + lens[0] + PAGE);
    maps.push((base, ring_addr + ring_len));
    let mut areas = vec![(tramp_addr, lens[0])];
    for (g, &len) in groups.iter().zip(&lens[1..]) {
        let at = find_gap_within(&maps, g.window.clone(), len).with_context(|| {
            format!(
                "no free {len}-byte range in {:#x}..{:#x} for punned return trampolines",
                g.window.start, g.window.end
            )
        })?;
        maps.push((at, at + len));
        areas.push((at, len));
    }
    let tid = *s.threads().first().context("the process has no threads")?;
    let mut cleanup = Cleanup { areas: Vec::new(), ring: None };
    let memory = create_memory(&mut s, tid, pad, &areas, ring_addr, ring_len, &mut cleanup);
    if memory.is_err() {
        cleanup.undo(&mut s, tid, pad);
    }
    prepare_parts.work_ms = ms(started.elapsed()) - prepare_parts.stop_ms;
    let resuming = Instant::now();
    s.detach()?;
    prepare_parts.resume_ms = ms(resuming.elapsed());
    let prepare_pause = started.elapsed();
    let file = File::from(memory?);
    // Every page of the ring exists before any writer may touch it: a writer then never
    // waits for the kernel to find memory, nor dies of SIGBUS when there is none (a
    // memory cgroup at its limit). The pages are charged to us, not the target.
    let reserving = Instant::now();
    if let Err(e) = reserve(&file, ring_len) {
        let mut s = Session::attach(pid)?;
        let tid = *s.threads().first().context("the process has no threads")?;
        cleanup.undo(&mut s, tid, pad);
        s.detach()?;
        return Err(e)
            .with_context(|| format!("reserving the ring's {} MiB of memory (try --ring-slots)", ring_len >> 20));
    }
    let reserve_time = reserving.elapsed();
    // SAFETY: a shared mapping of the memfd; the target writes it concurrently, and
    // RingReader only accesses it atomically. Populated: the reader's first lap through
    // the ring would otherwise take a page fault every few slots (a tenth of its CPU).
    let mut ring_map =
        unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.context("mapping the ring locally")?;
    layout.initialise_zeroed(&mut ring_map);
    layout.initialise_arena(&mut ring_map, ring_addr);
    if ring.wait_spins > 0 {
        ring_map[header::LOSSLESS] = 1;
    }
    ring_map[header::OWNER..header::OWNER + 8].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    let addrs = RingAddrs { base: ring_addr, ..ring };
    let bases: Vec<u64> = areas.iter().map(|a| a.0).collect();
    let Generated { code, mut patches, installed } = generate(sites, &addrs, &bases, &groups)?;
    write_journal(&mut ring_map, &layout, &areas, &patches, bin, bias)?;
    for (c, &(at, len)) in code.iter().zip(&areas) {
        ensure!(c.len() as u64 <= len - if at == tramp_addr { NAME_ROOM } else { 0 }, "trampolines outgrew their area");
    }

    // Window 2: code and redirects. If the target is gone, nothing of ours is in use.
    // Jumps over PCs a parked goroutine could resume at go in only once none is parked there.
    let parked_pcs: std::collections::HashSet<u64> = sites.iter().flat_map(|s| s.parked_pcs.iter().copied()).collect();
    let parked = if parked_pcs.is_empty() {
        None
    } else {
        let allgs = crate::plan::allgs_address(bin).context("runtime.allgs not found")? + bias;
        Some(ParkedScan { allgs, goid_off: ring.goid_offset, pcs: parked_pcs })
    };
    let started = Instant::now();
    let mut s = Session::attach(pid)?;
    let mut pause_parts = PauseParts { stop_ms: ms(started.elapsed()), ..PauseParts::default() };
    let result = (|| -> Result<()> {
        for (c, &(at, _)) in code.iter().zip(&areas) {
            s.write(at, c).context("writing trampolines")?;
        }
        // Original bytes must be the file's: anything else is someone else's patch.
        for p in &mut patches {
            let mut cur = vec![0; p.new.len()];
            s.read(p.addr, &mut cur)?;
            let file = bin.elf.read(p.addr - bias, cur.len()).context("patch site outside the file")?;
            ensure!(
                cur == file,
                "code at {:#x} differs from the executable: the process is already patched (an earlier inject that was \
                 killed, or a debugger's breakpoint)",
                p.addr
            );
            p.original = cur;
        }
        (pause_parts.retries, pause_parts.parked) = wait_for_safe_threads(&mut s, &patches, parked.as_ref())?;
        // Enable capture, then redirect.
        ring_map[header::ENABLED] = 1;
        let mut written: Vec<&Patch> = Vec::new();
        for p in &patches {
            if let Err(e) = s.write(p.addr, &p.new) {
                for w in written.iter().rev() {
                    let _ = s.write(w.addr, &w.original);
                }
                return Err(e).with_context(|| format!("patching {:#x}", p.addr));
            }
            written.push(p);
        }
        Ok(())
    })();
    let threads = s.threads().len();
    if result.is_err() {
        let tid = s.threads().first().copied().unwrap_or(pid);
        cleanup.undo(&mut s, tid, pad);
    }
    pause_parts.work_ms = ms(started.elapsed()) - pause_parts.stop_ms;
    let resuming = Instant::now();
    s.detach()?;
    pause_parts.resume_ms = ms(resuming.elapsed());
    let pause = started.elapsed();
    result?;
    let summary = Installed {
        sites: installed,
        threads,
        pause,
        pause_parts,
        prepare_pause,
        prepare_parts,
        lossless: ring.wait_spins > 0,
        ring_bytes: ring_len,
        code_bytes: areas.iter().map(|a| a.1).sum(),
        reserve_time,
    };
    Ok(Installation { pid, areas, ring_addr, ring_len, patches, ring_map, layout, pad, summary })
}

/// Punned jumps whose trampolines can share one area: the intersection of their 16 MiB
/// windows, and the jumps (by address).
struct PinnedGroup {
    window: std::ops::Range<u64>,
    jumps: Vec<u64>,
}

/// The smallest window a group may shrink to: room for a few thousand trampolines.
const MIN_GROUP_WINDOW: u64 = 4 << 20;

/// Groups every punned jump of `sites` by overlapping windows.
fn pinned_groups(sites: &[ProbeSite]) -> Result<Vec<PinnedGroup>> {
    let mut pinned: Vec<(std::ops::Range<u64>, u64)> = Vec::new();
    for site in sites {
        let Ok(entry) = &site.entry_patch else { continue };
        let rets = site.returns.as_ref().map(Vec::as_slice).unwrap_or_default();
        for r in std::iter::once(&entry.redirect).chain(rets.iter().map(|r| &r.redirect)) {
            if r.pinned.is_some() {
                let w = r
                    .pinned_window()
                    .with_context(|| format!("{}: no room for a punned jump at {:#x}", site.name, r.at))?;
                pinned.push((w, r.at));
            }
        }
    }
    pinned.sort_by_key(|(w, _)| w.start);
    let mut groups: Vec<PinnedGroup> = Vec::new();
    for (w, at) in pinned {
        match groups.last_mut() {
            Some(g) if w.start.max(g.window.start) + MIN_GROUP_WINDOW <= w.end.min(g.window.end) => {
                g.window = w.start.max(g.window.start)..w.end.min(g.window.end);
                g.jumps.push(at);
            }
            _ => groups.push(PinnedGroup { window: w, jumps: vec![at] }),
        }
    }
    Ok(groups)
}

/// Maps the trampoline areas and the ring (a memfd) into the target, and returns our own
/// descriptor of the memfd.
fn create_memory(
    s: &mut Session,
    tid: i32,
    pad: u64,
    areas: &[(u64, u64)],
    ring_addr: u64,
    ring_len: u64,
    cleanup: &mut Cleanup,
) -> Result<OwnedFd> {
    let pid = s.pid();
    for &(addr, len) in areas {
        let r = syscall(
            s,
            tid,
            pad,
            libc::SYS_mmap,
            [
                addr,
                len,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
        )
        .context("creating a trampoline area in the target")?;
        ensure!(r == addr, "mmap for trampolines returned {r:#x}, wanted {addr:#x}");
        cleanup.areas.push((addr, len));
    }
    let &(tramp_addr, tramp_len) = areas.first().context("no trampoline area")?;
    // The memfd's name goes at the end of the trampoline area (it is only read once).
    let name_addr = tramp_addr + tramp_len - NAME_ROOM;
    let mut name = ring_name(std::process::id(), areas).into_bytes();
    name.push(0);
    s.write(name_addr, &name)?;
    let fd = syscall(s, tid, pad, libc::SYS_memfd_create, [name_addr, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0])
        .context("creating the ring's memfd in the target")?;
    let ok = (|| -> Result<OwnedFd> {
        syscall(s, tid, pad, libc::SYS_ftruncate, [fd, ring_len, 0, 0, 0, 0]).context("sizing the ring")?;
        let r = syscall(
            s,
            tid,
            pad,
            libc::SYS_mmap,
            [
                ring_addr,
                ring_len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE) as u64,
                fd,
                0,
            ],
        )
        .context("mapping the ring in the target")?;
        ensure!(r == ring_addr, "mmap for the ring returned {r:#x}, wanted {ring_addr:#x}");
        cleanup.ring = Some((ring_addr, ring_len));
        take_fd(pid, fd as i32)
    })();
    // The target needs no descriptor: its mapping keeps the memfd alive.
    let _ = syscall(s, tid, pad, libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
    ok
}

/// Trampoline code for each area, the patches that redirect to it, and per installed
/// site its number of probed exits.
struct Generated {
    code: Vec<Vec<u8>>,
    patches: Vec<Patch>,
    installed: Vec<(u32, usize)>,
}

/// Every trampoline for `sites`: unpinned ones laid out from `bases[0]`, punned ones from
/// `bases[1 + i]` for the i-th group that holds their jump.
fn generate(sites: &[ProbeSite], addrs: &RingAddrs, bases: &[u64], groups: &[PinnedGroup]) -> Result<Generated> {
    let mut code = vec![Vec::new(); bases.len()];
    let mut patches = Vec::new();
    let mut installed = Vec::new();
    let group_of: std::collections::HashMap<u64, usize> =
        groups.iter().enumerate().flat_map(|(i, g)| g.jumps.iter().map(move |&at| (at, i + 1))).collect();
    let area_of = |r: &Redirect| -> Result<usize> {
        if r.pinned.is_none() {
            return Ok(0);
        }
        group_of.get(&r.at).copied().context("a punned jump in no group")
    };
    let mut place = |make: &dyn Fn(u64) -> Result<trampolines::Trampoline, trampolines::codegen::CodegenError>,
                     r: &Redirect|
     -> Result<()> {
        let area = area_of(r)?;
        let code = &mut code[area];
        let at = bases[area] + (code.len() as u64).next_multiple_of(16);
        let tramp = make(at)?;
        code.resize((tramp.at - bases[area]) as usize, 0xcc);
        code.extend_from_slice(&tramp.code);
        let j = r
            .jump(tramp.at)
            .with_context(|| format!("trampoline at {:#x} out of reach of its jump at {:#x}", tramp.at, r.at))?;
        patches.push(Patch {
            addr: r.at,
            original: Vec::new(),
            new: j.to_vec(),
            interior: r.at + 1..r.at + r.len as u64,
        });
        Ok(())
    };
    for site in sites {
        let Ok(entry) = &site.entry_patch else { continue };
        place(
            &|at| entry_trampoline(entry, site.id, &site.on_entry.plan, &site.on_return.plan, addrs, at),
            &entry.redirect,
        )
        .with_context(|| site.name.clone())?;
        let mut exits = 0;
        if let Ok(rets) = &site.returns {
            for r in rets {
                place(&|at| return_trampoline(r, site.id, &site.on_return.plan, addrs, at), &r.redirect)
                    .with_context(|| site.name.clone())?;
                exits += 1;
            }
        }
        installed.push((site.id, exits));
    }
    Ok(Generated { code, patches, installed })
}

struct Cleanup {
    areas: Vec<(u64, u64)>,
    ring: Option<(u64, u64)>,
}

impl Cleanup {
    fn undo(&self, s: &mut Session, tid: i32, pad: u64) {
        for &(addr, len) in self.ring.iter().chain(&self.areas) {
            let _ = s.syscall(tid, pad, libc::SYS_munmap, [addr, len, 0, 0, 0, 0]);
        }
    }
}

/// Waits (letting the world run briefly between looks) until no thread is executing
/// inside bytes about to change, none is inside a signal handler (whose saved context
/// could resume there) and, with `parked`, no goroutine is parked where a jump goes.
/// Returns how many times it let the world run, and how many of those for a parked goroutine.
fn wait_for_safe_threads(s: &mut Session, patches: &[Patch], parked: Option<&ParkedScan>) -> Result<(usize, usize)> {
    let started = Instant::now();
    let mut attempt = 0;
    let mut parked_waits = 0;
    let mut last = String::new();
    while keep_looking(attempt, started) {
        let mut blocked = None;
        for tid in s.threads() {
            let rip = s.regs(tid)?.rip;
            if patches.iter().any(|p| p.interior.contains(&rip)) {
                blocked = Some(format!("thread {tid} is executing at {rip:#x}, inside a patch site"));
                break;
            }
            if s.in_signal_handler(tid)? {
                blocked = Some(format!("thread {tid} is inside a signal handler"));
                break;
            }
        }
        if blocked.is_none()
            && let Some(p) = parked
        {
            blocked = p.find(s)?;
            parked_waits += usize::from(blocked.is_some());
        }
        match blocked {
            None => return Ok((attempt, parked_waits)),
            Some(why) => {
                last = why;
                let_run_between_looks(s, attempt)?;
                attempt += 1;
            }
        }
    }
    bail!(
        "could not find a moment when no thread was inside a patch site or a signal handler ({attempt} looks in {:.1} s; \
         the last: {last})",
        started.elapsed().as_secs_f64()
    )
}

/// Records, in the target's copy of the ring, how to undo every patch (the original bytes
/// are the file's: window 2 refuses any other), before any of them is written.
fn write_journal(
    ring: &mut MmapMut,
    layout: &Layout,
    areas: &[(u64, u64)],
    patches: &[Patch],
    bin: &GoBinary<'_>,
    bias: u64,
) -> Result<()> {
    use ring_abi::journal as j;
    ensure!(areas.len() <= j::MAX_AREAS && patches.len() <= layout.patches as usize, "journal too small");
    let base = layout.journal_offset();
    let put =
        |ring: &mut MmapMut, off: usize, v: u64| ring[base + off..base + off + 8].copy_from_slice(&v.to_le_bytes());
    for (i, &(addr, len)) in areas.iter().enumerate() {
        put(ring, j::AREA_LIST + i * j::AREA, addr);
        put(ring, j::AREA_LIST + i * j::AREA + 8, len);
    }
    for (i, p) in patches.iter().enumerate() {
        ensure!(p.new.len() <= j::MAX_PATCH_LEN, "a patch longer than the journal holds");
        let original = bin.elf.read(p.addr - bias, p.new.len()).context("patch site outside the file")?;
        let at = base + j::PATCH_LIST + i * j::PATCH;
        ring[at..at + 8].copy_from_slice(&p.addr.to_le_bytes());
        ring[at + 8..at + 16].copy_from_slice(&(p.new.len() as u64).to_le_bytes());
        ring[at + 16..at + 16 + original.len()].copy_from_slice(original);
        ring[at + 24..at + 24 + p.new.len()].copy_from_slice(&p.new);
    }
    // The counts last: a journal is believed only as far as they say.
    put(ring, j::AREAS, areas.len() as u64);
    put(ring, j::PATCHES, patches.len() as u64);
    ring.flush().context("flushing the journal")?;
    Ok(())
}

/// Allocates every page of the memfd up front.
fn reserve(file: &File, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate(2) on a descriptor we own, with integer arguments.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Duplicates descriptor `fd` of process `pid` into ours.
fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: raw syscalls with integer arguments; results checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: pidfd is a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if local < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_getfd (Linux 5.6+ with ptrace access)");
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(local as i32) })
}

/// Restores every original byte; unmaps trampolines and ring when no thread can be using
/// them (else leaves them mapped: a few KiB that nothing will execute again).
pub fn remove(inst: &Installation) -> Result<Removal> {
    let started = Instant::now();
    let mut s = Session::attach(inst.pid)?;
    // Stop capturing first; a thread already past the check finishes its record.
    inst.ring_map_enabled(false);
    for p in inst.patches.iter().rev() {
        s.write(p.addr, &p.original).with_context(|| format!("restoring {:#x}", p.addr))?;
    }
    // Nothing left to undo, should the rest fail.
    inst.ring_header_store(inst.layout.journal_offset() + ring_abi::journal::PATCHES, 0);
    inst.clear_auto_flag(&mut s)?;
    let mut unmapped = false;
    let mut kept = None;
    let in_tramp = |rip: u64| inst.areas.iter().any(|&(a, l)| (a..a + l).contains(&rip));
    let mut world_stopped = None;
    let looking = Instant::now();
    let mut attempt = 0;
    while keep_looking(attempt, looking) {
        let mut busy = false;
        for tid in s.threads() {
            let rip = s.regs(tid)?.rip;
            if in_tramp(rip) || s.in_signal_handler(tid)? {
                busy = true;
                break;
            }
        }
        if !busy {
            // No thread can reach our memory any more: the rest run on while one unmaps it
            // (tearing down a large ring's page tables takes milliseconds).
            // Again: a trampoline that was running may have set it since.
            inst.clear_auto_flag(&mut s)?;
            let tid = *s.threads().first().context("no threads")?;
            s.detach_all_but(tid)?;
            world_stopped = Some(started.elapsed());
            for &(addr, len) in &inst.areas {
                s.syscall(tid, inst.pad, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
            }
            kept = arena_in_use(inst);
            for (addr, len) in super::recover::around(inst.ring_addr, inst.ring_len, kept) {
                s.syscall(tid, inst.pad, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
            }
            unmapped = true;
            break;
        }
        let_run_between_looks(&mut s, attempt)?;
        attempt += 1;
    }
    s.detach()?;
    if !unmapped {
        // Left mapped for safety: mark it as no longer owned, so a later inject may attach.
        inst.ring_header_store(header::OWNER, 0);
    }
    // The world stood still until every thread but the unmapping one ran again.
    let pause = world_stopped.unwrap_or_else(|| started.elapsed());
    Ok(Removal { restored: inst.patches.len(), uprobes: 0, unmapped, pause, kept })
}

/// The arena's place in the target when a Kafka header was ever written from it.
fn arena_in_use(inst: &Installation) -> Option<(u64, u64)> {
    if !inst.layout.arena {
        return None;
    }
    let off = inst.layout.arena_offset();
    let next = inst.ring_map.get(off..off + 8)?;
    (u64::from_le_bytes(next.try_into().ok()?) != 0)
        .then_some((inst.ring_addr + off as u64, ring_abi::arena::LEN as u64))
}

impl Installation {
    fn ring_header_store(&self, off: usize, v: u64) {
        // SAFETY: an in-bounds, aligned atomic store into our shared mapping.
        let w = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ring_map.as_ptr().add(off) as *mut u64) };
        w.store(v, std::sync::atomic::Ordering::Release);
    }

    /// Gives the OpenTelemetry global tracer its own answer back (no auto-instrumentation
    /// is there once the probes are out), if a trampoline ever changed it.
    fn clear_auto_flag(&self, s: &mut Session) -> Result<()> {
        let at = header::AUTO_FLAG;
        let flag = self.ring_map.get(at..at + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        if flag != 0 {
            s.write(flag, &[0]).with_context(|| format!("clearing the auto-instrumentation flag at {flag:#x}"))?;
        }
        Ok(())
    }

    fn ring_map_enabled(&self, on: bool) {
        self.ring_header_store(header::ENABLED, on as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_is_near_text_and_free() {
        let maps = vec![(0x400000, 0x800000), (0x800000, 0x900000), (0xc000000000, 0xc004000000)];
        for len in [0x10000, 0x1000000] {
            let g = find_gap(&maps, 0x401000..0x7ff000, len).unwrap();
            assert!(g.is_multiple_of(PAGE), "{g:#x}");
            assert!(maps.iter().all(|&(s, e)| g + len <= s || g >= e), "{g:#x} overlaps a mapping");
            assert!(g.abs_diff(0x401000) < REACH && (g + len).abs_diff(0x7ff000) < REACH);
        }
        assert!(find_gap(&[(0x10000, 0x7fff_0000_0000)], 0x401000..0x7ff000, 0x1000).is_none());
    }

    #[test]
    fn gap_within_a_window() {
        let maps = vec![(0x5d40_0000, 0x5d40_2000), (0x5d40_5000, 0x5d40_6000)];
        // Guard pages around each mapping: the first room is after the second mapping.
        assert_eq!(find_gap_within(&maps, 0x5d40_0000..0x5e40_0000, 0x2000), Some(0x5d40_7000));
        assert_eq!(find_gap_within(&maps, 0x5d40_0000..0x5e40_0000, 0x1000), Some(0x5d40_3000));
        assert_eq!(find_gap_within(&maps, 0x5d3f_0000..0x5d40_0000, 0x1000), Some(0x5d3f_0000));
        assert_eq!(find_gap_within(&maps, 0x5d40_0000..0x5d40_7000, 0x2000), None);
    }
}
