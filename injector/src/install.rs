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
use trampolines::iced_x86::{Decoder, DecoderOptions, Mnemonic};
use trampolines::{Redirect, RingAddrs, jmp_rel8, jmp_rel32};

use crate::plan::ProbeSite;
use crate::ptrace::Session;
use crate::ring::RingReader;

const PAGE: u64 = 4096;
/// Keep everything within this distance of the code it serves (rel32 and RIP-relative
/// operands reach ±2 GiB; stay well inside).
const REACH: u64 = (1 << 31) - (64 << 20);
/// How often to let the world run and retry when a thread sits where we may not write.
const SAFE_POINT_ATTEMPTS: usize = 50;

/// One overwritten piece of the target's code.
#[derive(Debug, Clone)]
pub struct Patch {
    pub addr: u64,
    pub original: Vec<u8>,
    pub new: Vec<u8>,
    /// Bytes no thread may be executing inside of when this patch is written (the
    /// interior of the overwritten instructions); empty for stubs in padding.
    pub interior: std::ops::Range<u64>,
}

/// What an installation put into the target.
pub struct Installation {
    pub pid: i32,
    pub tramp_addr: u64,
    pub tramp_len: u64,
    pub ring_addr: u64,
    pub ring_len: u64,
    pub patches: Vec<Patch>,
    pub ring_map: MmapMut,
    pub layout: Layout,
    /// Sites actually installed (by id), with how many exits are probed.
    pub installed: Vec<(u32, usize)>,
    pub threads: usize,
    /// How long the world stood still to write the trampolines and redirects.
    pub pause: Duration,
    /// Slots per sub-ring initialised at install; the collector does the rest.
    pub eager_slots: u64,
    /// How long the world stood still earlier, to create the memory.
    pub prepare_pause: Duration,
    pub gadget: u64,
}

impl Installation {
    /// A reader of the ring; `data_len[site]` is how many copied bytes its entry and its
    /// return records carry.
    pub fn reader(&mut self, data_len: Vec<[usize; 2]>) -> RingReader {
        // SAFETY: ring_map lives as long as the Installation, which the caller keeps
        // until the reader is done.
        unsafe {
            RingReader::new(self.ring_map.as_mut_ptr(), self.ring_map.len(), self.layout, data_len)
                .with_uninitialised_from(self.eager_slots)
        }
    }
}

/// A `syscall` instruction in the runtime's own assembly, to run injected syscalls.
pub fn find_syscall_gadget(bin: &GoBinary<'_>) -> Result<u64> {
    // Lazily: the runtime's assembly comes first in the text, so this stops early.
    for f in bin.pclntab.funcs().filter_map(Result::ok).filter(|f| f.is_asm() && f.name.starts_with("runtime.")) {
        let Some(code) = bin.code(&f) else { continue };
        let mut d = Decoder::with_ip(64, code, f.entry, DecoderOptions::NONE);
        for i in &mut d {
            if i.mnemonic() == Mnemonic::Syscall {
                return Ok(i.ip());
            }
        }
    }
    bail!("no syscall instruction found in the runtime's assembly")
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

/// The live injector (pid) whose ring a process carries, if any. Rings left mapped by an
/// injector that detached (owner 0) or died are not in use.
pub fn existing_owner(pid: i32) -> Result<Option<u32>> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("reading /proc/{pid}/maps"))?;
    let mem = File::open(format!("/proc/{pid}/mem")).with_context(|| format!("opening /proc/{pid}/mem"))?;
    for line in maps.lines().filter(|l| l.contains(&format!("/memfd:{}", ring_abi::MEMFD_NAME))) {
        let Some(start) = line.split('-').next().and_then(|a| u64::from_str_radix(a, 16).ok()) else { continue };
        let mut header = [0u8; 32];
        if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut header, start).is_err()
            || header[..8] != ring_abi::MAGIC.to_le_bytes()
        {
            continue;
        }
        let owner = u64::from_le_bytes(header[header::OWNER..header::OWNER + 8].try_into().unwrap_or([0; 8])) as u32;
        let alive =
            owner != 0 && std::fs::read_to_string(format!("/proc/{owner}/comm")).is_ok_and(|c| c.trim() == "inject");
        if alive {
            return Ok(Some(owner));
        }
    }
    Ok(None)
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

fn syscall(s: &mut Session, tid: i32, gadget: u64, nr: i64, args: [u64; 6]) -> Result<u64> {
    let r = s.syscall(tid, gadget, nr, args)?;
    Ok(r as u64)
}

/// Installs `sites` into process `pid`, with a ring shaped like `ring` (its base is
/// chosen here). On error nothing stays patched.
/// `eager_slots`: slots of each sub-ring initialised before the probes go in; the
/// collector initialises the rest (`Installation::reader`).
pub fn install(
    pid: i32,
    bin: &GoBinary<'_>,
    bias: u64,
    sites: &[ProbeSite],
    ring: RingAddrs,
    eager_slots: u64,
) -> Result<Installation> {
    let gadget = find_syscall_gadget(bin)? + bias;
    let text = bin.text_range();
    let text = text.start + bias..text.end + bias;
    // Size the trampoline area by generating everything once at a provisional address
    // (sizes do not depend on where the code lands, as long as it is within reach).
    let layout = ring.layout;
    let provisional = RingAddrs { base: text.end.next_multiple_of(PAGE), ..ring };
    let probe = generate(sites, &provisional, provisional.base + layout.total_len() as u64)?;
    let tramp_len = (probe.code.len() as u64 + 4096).next_multiple_of(PAGE);
    let ring_len = layout.total_len() as u64;

    // Window 1: create the memory (nothing points at it yet), then let the target run
    // while the ring is initialised and the code generated.
    // Pauses are measured from before the first thread stops to after the last resumes.
    let started = Instant::now();
    let mut s = Session::attach(pid)?;
    let maps = mappings(pid)?;
    let base = find_gap(&maps, text.clone(), tramp_len + PAGE + ring_len)
        .context("no free address range within ±2 GiB of the target's code for trampolines")?;
    let (tramp_addr, ring_addr) = (base, base + tramp_len + PAGE);
    let tid = *s.threads().first().context("the process has no threads")?;
    let mut cleanup = Cleanup { tramp: None, ring: None };
    let memory = create_memory(&mut s, tid, gadget, tramp_addr, tramp_len, ring_addr, ring_len, &mut cleanup);
    if memory.is_err() {
        cleanup.undo(&mut s, tid, gadget);
    }
    s.detach()?;
    let prepare_pause = started.elapsed();
    let file = File::from(memory?);
    // SAFETY: a shared mapping of the memfd; the target writes it concurrently, and
    // RingReader only accesses it atomically.
    let mut ring_map = unsafe { MmapMut::map_mut(&file) }.context("mapping the ring locally")?;
    layout.initialise_prefix(&mut ring_map, eager_slots);
    ring_map[header::OWNER..header::OWNER + 8].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    let addrs = RingAddrs { base: ring_addr, ..ring };
    let Generated { code, mut patches, installed } = generate(sites, &addrs, tramp_addr)?;
    ensure!(code.len() as u64 <= tramp_len - 64, "trampolines outgrew their area");

    // Window 2: code and redirects. If the target is gone, nothing of ours is in use.
    let started = Instant::now();
    let mut s = Session::attach(pid)?;
    let result = (|| -> Result<()> {
        s.write(tramp_addr, &code).context("writing trampolines")?;
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
        wait_for_safe_threads(&mut s, &patches)?;
        // Enable capture, then redirect: stubs in padding before the jumps that reach them.
        ring_map[header::ENABLED] = 1;
        let (stubs, jumps): (Vec<&Patch>, Vec<&Patch>) = patches.iter().partition(|p| p.interior.is_empty());
        let mut written: Vec<&Patch> = Vec::new();
        for p in stubs.into_iter().chain(jumps) {
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
        cleanup.undo(&mut s, tid, gadget);
    }
    s.detach()?;
    let pause = started.elapsed();
    result?;
    Ok(Installation {
        pid,
        tramp_addr,
        tramp_len,
        ring_addr,
        ring_len,
        patches,
        ring_map,
        layout,
        installed,
        threads,
        pause,
        eager_slots,
        prepare_pause,
        gadget,
    })
}

/// Maps the trampoline area and the ring (a memfd) into the target, and returns our own
/// descriptor of the memfd.
#[allow(clippy::too_many_arguments)]
fn create_memory(
    s: &mut Session,
    tid: i32,
    gadget: u64,
    tramp_addr: u64,
    tramp_len: u64,
    ring_addr: u64,
    ring_len: u64,
    cleanup: &mut Cleanup,
) -> Result<OwnedFd> {
    let pid = s.pid();
    let r = syscall(
        s,
        tid,
        gadget,
        libc::SYS_mmap,
        [
            tramp_addr,
            tramp_len,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )
    .context("creating the trampoline area in the target")?;
    ensure!(r == tramp_addr, "mmap for trampolines returned {r:#x}, wanted {tramp_addr:#x}");
    cleanup.tramp = Some((tramp_addr, tramp_len));
    // The memfd's name goes at the end of the trampoline area (it is only read once).
    let name_addr = tramp_addr + tramp_len - 64;
    let mut name = ring_abi::MEMFD_NAME.as_bytes().to_vec();
    name.push(0);
    s.write(name_addr, &name)?;
    let fd = syscall(s, tid, gadget, libc::SYS_memfd_create, [name_addr, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0])
        .context("creating the ring's memfd in the target")?;
    let ok = (|| -> Result<OwnedFd> {
        syscall(s, tid, gadget, libc::SYS_ftruncate, [fd, ring_len, 0, 0, 0, 0]).context("sizing the ring")?;
        let r = syscall(
            s,
            tid,
            gadget,
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
    let _ = syscall(s, tid, gadget, libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
    ok
}

/// Trampoline code for an area, the patches that redirect to it, and per installed site
/// its number of probed exits.
struct Generated {
    code: Vec<u8>,
    patches: Vec<Patch>,
    installed: Vec<(u32, usize)>,
}

/// Every trampoline for `sites`, laid out from `tramp_addr`.
fn generate(sites: &[ProbeSite], addrs: &RingAddrs, tramp_addr: u64) -> Result<Generated> {
    let mut code = Vec::new();
    let mut patches = Vec::new();
    let mut installed = Vec::new();
    let mut place = |tramp: trampolines::Trampoline, redirect: Redirect, code: &mut Vec<u8>| -> Result<()> {
        code.resize((tramp.at - tramp_addr) as usize, 0xcc);
        code.extend_from_slice(&tramp.code);
        redirect_patches(redirect, tramp.at, &mut patches)
    };
    for site in sites {
        let Ok(entry) = &site.entry_patch else { continue };
        let at = tramp_addr + (code.len() as u64).next_multiple_of(16);
        let t = entry_trampoline(entry, site.id, &site.on_entry.plan, &site.on_return.plan, addrs, at)
            .with_context(|| site.name.clone())?;
        place(t, entry.redirect, &mut code)?;
        let mut exits = 0;
        if let Ok(rets) = &site.returns {
            for r in rets {
                let at = tramp_addr + (code.len() as u64).next_multiple_of(16);
                let t = return_trampoline(r, site.id, &site.on_return.plan, addrs, at)
                    .with_context(|| site.name.clone())?;
                place(t, r.redirect, &mut code)?;
                exits += 1;
            }
        }
        installed.push((site.id, exits));
    }
    Ok(Generated { code, patches, installed })
}

struct Cleanup {
    tramp: Option<(u64, u64)>,
    ring: Option<(u64, u64)>,
}

impl Cleanup {
    fn undo(&self, s: &mut Session, tid: i32, gadget: u64) {
        for (addr, len) in [self.ring, self.tramp].into_iter().flatten() {
            let _ = s.syscall(tid, gadget, libc::SYS_munmap, [addr, len, 0, 0, 0, 0]);
        }
    }
}

fn redirect_patches(r: Redirect, tramp: u64, out: &mut Vec<Patch>) -> Result<()> {
    match r {
        Redirect::Rel32 { at, len } => {
            let j = jmp_rel32(at, tramp).context("trampoline out of rel32 reach")?;
            out.push(Patch { addr: at, original: Vec::new(), new: j.to_vec(), interior: at + 1..at + len as u64 });
        }
        Redirect::Rel8Stub { at, len, stub } => {
            let j = jmp_rel32(stub, tramp).context("trampoline out of rel32 reach")?;
            out.push(Patch { addr: stub, original: Vec::new(), new: j.to_vec(), interior: 0..0 });
            let j8 = jmp_rel8(at, stub).context("stub out of rel8 reach")?;
            out.push(Patch { addr: at, original: Vec::new(), new: j8.to_vec(), interior: at + 1..at + len as u64 });
        }
    }
    Ok(())
}

/// Waits (letting the world run briefly between looks) until no thread is executing
/// inside bytes about to change and none is inside a signal handler (whose saved context
/// could resume there).
fn wait_for_safe_threads(s: &mut Session, patches: &[Patch]) -> Result<()> {
    for _ in 0..SAFE_POINT_ATTEMPTS {
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
        match blocked {
            None => return Ok(()),
            Some(_) => s.resume_briefly(Duration::from_millis(1))?,
        }
    }
    bail!(
        "could not find a moment when no thread was inside a patch site or a signal handler ({SAFE_POINT_ATTEMPTS} tries)"
    )
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

/// What removal achieved.
#[derive(Debug)]
pub struct Removal {
    pub restored: usize,
    pub unmapped: bool,
    pub pause: Duration,
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
    let mut unmapped = false;
    let tramp = inst.tramp_addr..inst.tramp_addr + inst.tramp_len;
    for _ in 0..SAFE_POINT_ATTEMPTS {
        let mut busy = false;
        for tid in s.threads() {
            let rip = s.regs(tid)?.rip;
            if tramp.contains(&rip) || s.in_signal_handler(tid)? {
                busy = true;
                break;
            }
        }
        if !busy {
            let tid = *s.threads().first().context("no threads")?;
            s.syscall(tid, inst.gadget, libc::SYS_munmap, [inst.tramp_addr, inst.tramp_len, 0, 0, 0, 0])?;
            s.syscall(tid, inst.gadget, libc::SYS_munmap, [inst.ring_addr, inst.ring_len, 0, 0, 0, 0])?;
            unmapped = true;
            break;
        }
        s.resume_briefly(Duration::from_millis(1))?;
    }
    s.detach()?;
    if !unmapped {
        // Left mapped for safety: mark it as no longer owned, so a later inject may attach.
        inst.ring_header_store(header::OWNER, 0);
    }
    let pause = started.elapsed();
    Ok(Removal { restored: inst.patches.len(), unmapped, pause })
}

impl Installation {
    fn ring_header_store(&self, off: usize, v: u64) {
        // SAFETY: an in-bounds, aligned atomic store into our shared mapping.
        let w = unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ring_map.as_ptr().add(off) as *mut u64) };
        w.store(v, std::sync::atomic::Ordering::Release);
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
}
