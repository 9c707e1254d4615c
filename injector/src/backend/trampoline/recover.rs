//! Undoing what an inject that died left in a process (`kill -9`, the OOM killer, a node
//! drain). Every inject keeps, in the target's copy of its ring, a journal of its patches
//! (original and patched bytes) and of its trampoline areas, written before any jump goes
//! in. A later inject finds the ring by its memfd's name, sees that its owner is gone, and
//! puts every byte back; `inject detach --pid P` does only that. An inject killed during one
//! of its injected system calls also leaves a landing pad in `runtime.rt0_go` (code that
//! never runs again, see `ptrace::pad`): those bytes are put back from the executable too.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail, ensure};
use ring_abi::{header, journal};

use super::ptrace::Session;
use super::ptrace::pad::is_landing_pad;
use super::window::{PadSite, keep_looking, let_run_between_looks};

/// A ring an inject left behind, as found in the target's memory.
#[derive(Debug)]
pub struct Leftover {
    pub ring: (u64, u64),
    /// Where its journal is.
    pub journal: u64,
    /// The inject that made it (no longer running).
    pub owner: u32,
    pub areas: Vec<(u64, u64)>,
    /// (address, original bytes, patched bytes).
    pub patches: Vec<(u64, Vec<u8>, Vec<u8>)>,
}

/// What a clean-up did.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub rings: usize,
    pub restored: usize,
    /// A landing pad a dead inject left was overwritten with the executable's bytes.
    pub pad_restored: bool,
    /// Owners of the rings cleaned (dead injects).
    pub owners: Vec<u32>,
    /// Trampoline areas and rings left mapped because a thread was still inside one.
    pub left_mapped: usize,
}

fn word(mem: &File, at: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    mem.read_exact_at(&mut b, at).with_context(|| format!("reading the target's memory at {at:#x}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Whether `pid` is a running inject.
pub fn alive(pid: u32) -> bool {
    pid != 0 && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "inject")
}

/// The inject rings mapped in `pid`, from /proc/PID/maps: (start, end, the pid of the inject
/// that made it, from the memfd's name) of each.
fn rings(pid: i32) -> Result<Vec<(u64, u64, u32)>> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("reading /proc/{pid}/maps"))?;
    let prefix = format!("/memfd:{}", ring_abi::MEMFD_NAME);
    Ok(maps
        .lines()
        .filter_map(|l| {
            let (_, name) = l.split_once(&prefix)?;
            let owner = name.strip_prefix('.').and_then(|n| n.split_whitespace().next()?.parse().ok()).unwrap_or(0);
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?, owner))
        })
        .collect())
}

/// Rings of injects that are no longer running, with their journals. A ring whose owner
/// still runs is an error naming it.
pub fn leftovers(pid: i32) -> Result<Vec<Leftover>> {
    let mem = File::open(format!("/proc/{pid}/mem")).with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut out = Vec::new();
    for (start, end, maker) in rings(pid)? {
        if word(&mem, start + header::MAGIC as u64)? != ring_abi::MAGIC {
            // Mapped, not yet set up: either its inject is still attaching, or it died then
            // (before any patch). Only the ring is known (its trampoline areas stay mapped:
            // a few pages nothing executes).
            if alive(maker) {
                bail!("pid {pid} is being instrumented by another inject (pid {maker}); stop that one first");
            }
            out.push(Leftover {
                ring: (start, end - start),
                journal: 0,
                owner: maker,
                areas: Vec::new(),
                patches: Vec::new(),
            });
            continue;
        }
        let owner = word(&mem, start + header::OWNER as u64)? as u32;
        if alive(owner) {
            bail!("pid {pid} is already instrumented by another inject (pid {owner}); stop that one first");
        }
        let version = word(&mem, start + header::VERSION as u64)? as u32;
        // Left mapped by an inject that detached cleanly (a thread was inside): nothing to
        // undo, and an older format's memory is harmless.
        if owner == 0 && version != ring_abi::VERSION {
            continue;
        }
        ensure!(
            version == ring_abi::VERSION,
            "pid {pid} carries probes of an inject of another version (ring format {version}); only restarting the \
             process removes them"
        );
        let at = start + word(&mem, start + header::JOURNAL as u64)?;
        if !(start..end).contains(&at) || word(&mem, at)? != journal::MAGIC {
            // It died before writing its journal, which goes in before any patch: nothing
            // to undo but the ring (its trampoline area, unknown, stays: never executed).
            out.push(Leftover {
                ring: (start, end - start),
                journal: 0,
                owner,
                areas: Vec::new(),
                patches: Vec::new(),
            });
            continue;
        }
        let areas_n = word(&mem, at + journal::AREAS as u64)? as usize;
        let patches_n = word(&mem, at + journal::PATCHES as u64)? as usize;
        let room = (end - at) as usize;
        ensure!(
            areas_n <= journal::MAX_AREAS && journal::len(patches_n) <= room,
            "pid {pid}: the journal of the inject ring at {start:#x} is damaged ({areas_n} areas, {patches_n} patches)"
        );
        let mut areas = Vec::with_capacity(areas_n);
        for i in 0..areas_n {
            let a = at + (journal::AREA_LIST + i * journal::AREA) as u64;
            areas.push((word(&mem, a)?, word(&mem, a + 8)?));
        }
        let mut patches = Vec::with_capacity(patches_n);
        for i in 0..patches_n {
            let e = at + (journal::PATCH_LIST + i * journal::PATCH) as u64;
            let (addr, len) = (word(&mem, e)?, word(&mem, e + 8)? as usize);
            ensure!((1..=journal::MAX_PATCH_LEN).contains(&len), "pid {pid}: a journal entry of {len} bytes");
            let (mut original, mut new) = (vec![0; len], vec![0; len]);
            mem.read_exact_at(&mut original, e + 16)?;
            mem.read_exact_at(&mut new, e + 24)?;
            patches.push((addr, original, new));
        }
        out.push(Leftover { ring: (start, end - start), journal: at, owner, areas, patches });
    }
    Ok(out)
}

/// Puts back every byte dead injects left patched in `pid` and unmaps their memory (or
/// leaves it mapped, emptied, while a thread is still inside). A byte that is neither
/// inject's nor the original is someone else's (a debugger's breakpoint): nothing is
/// changed then, and the error says where.
pub fn clean(pid: i32, pad: &PadSite) -> Result<Cleaned> {
    let found = leftovers(pid)?;
    let mut done = Cleaned::default();
    let mem = File::open(format!("/proc/{pid}/mem")).with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut cur_pad = vec![0; pad.original.len()];
    mem.read_exact_at(&mut cur_pad, pad.addr)
        .with_context(|| format!("reading the target's code at {:#x}", pad.addr))?;
    let pad_left = cur_pad != pad.original && is_landing_pad(&cur_pad);
    if found.is_empty() && !pad_left {
        return Ok(done);
    }
    let mut s = Session::attach(pid)?;
    let result = (|| -> Result<()> {
        // Check everything before changing anything.
        for l in &found {
            for (addr, original, new) in &l.patches {
                let mut cur = vec![0; original.len()];
                s.read(*addr, &mut cur)?;
                ensure!(
                    cur == *original || cur == *new,
                    "code at {addr:#x} is neither the executable's nor what inject (pid {}) wrote there: patched by \
                     someone else (a debugger?); not touching it",
                    l.owner
                );
            }
        }
        for l in &found {
            for (addr, original, new) in &l.patches {
                let mut cur = vec![0; original.len()];
                s.read(*addr, &mut cur)?;
                if cur == *new {
                    s.write(*addr, original).with_context(|| format!("restoring {addr:#x}"))?;
                    done.restored += 1;
                }
            }
            // Nothing left to undo in this ring, whatever happens next.
            if l.journal != 0 {
                s.write(l.journal + journal::PATCHES as u64, &0u64.to_le_bytes())?;
            }
            done.rings += 1;
            done.owners.push(l.owner);
        }
        // Unmap what no thread is executing (trampolines, a pad) or could resume in.
        let pad_range = pad.addr..pad.addr + pad.original.len() as u64;
        let mut unmapped = false;
        let looking = std::time::Instant::now();
        let mut attempt = 0;
        while keep_looking(attempt, looking) {
            let mut busy = false;
            for tid in s.threads() {
                let rip = s.regs(tid)?.rip;
                let inside = found.iter().flat_map(|l| &l.areas).any(|&(a, n)| (a..a + n).contains(&rip));
                if inside || pad_range.contains(&rip) || s.in_signal_handler(tid)? {
                    busy = true;
                    break;
                }
            }
            if !busy {
                if pad_left {
                    s.write(pad.addr, &pad.original).context("restoring the code under a landing pad")?;
                    done.pad_restored = true;
                }
                let tid = *s.threads().first().context("no threads")?;
                for l in &found {
                    for &(addr, len) in l.areas.iter().chain([&l.ring]) {
                        s.syscall(tid, pad.addr, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
                    }
                }
                unmapped = true;
                break;
            }
            let_run_between_looks(&mut s, attempt)?;
            attempt += 1;
        }
        if !unmapped {
            done.left_mapped = found.len();
        }
        Ok(())
    })();
    s.detach()?;
    result.map(|()| done)
}

impl Cleaned {
    /// One line for users, or None when there was nothing to clean.
    pub fn describe(&self, pid: i32) -> Option<String> {
        if self.rings == 0 {
            return self.pad_restored.then(|| {
                format!(
                    "inject: put back the start-up code a previous inject (killed during a system call it ran in the \
                     process) left changed in pid {pid}"
                )
            });
        }
        Some({
            let owners: Vec<String> = self.owners.iter().map(u32::to_string).collect();
            format!(
                "inject: removed the probes a previous inject (pid {}, no longer running) left in pid {pid}: restored \
                 {} patches{}",
                owners.join(", "),
                self.restored,
                if self.left_mapped > 0 { "; its memory stays mapped, a thread was still inside" } else { "" }
            )
        })
    }
}
