//! Undoing what an inject that died left in a process (`kill -9`, the OOM killer, a node
//! drain). Every inject keeps, in the target's copy of its ring, a journal of its patches
//! (original and patched bytes) and of its trampoline areas, written before any jump goes
//! in. A later inject finds the ring by its memfd's name, sees that its owner is gone, and
//! puts every byte back; `inject detach --pid P` does only that. An inject killed during one
//! of its injected system calls also leaves a landing pad in `runtime.rt0_go` (code that
//! never runs again, see `ptrace::pad`): those bytes are put back from the executable too.

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, ensure};
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
    /// Its Kafka header arena, when a header was written from it: left mapped.
    pub keep: Option<(u64, u64)>,
    /// The OpenTelemetry auto-instrumentation flag its trampolines set (0: none).
    pub auto_flag: u64,
}

/// What a clean-up did.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub rings: usize,
    pub restored: usize,
    /// A landing pad a dead inject left was overwritten with the executable's bytes.
    pub pad_restored: bool,
    /// Ring descriptors a dead inject left open in the process, closed.
    pub fds_closed: usize,
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

/// The parts of the mapping `[addr, addr+len)` outside `keep`.
pub(super) fn around(addr: u64, len: u64, keep: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    match keep {
        Some((k, n)) if k >= addr && k + n <= addr + len => {
            [(addr, k - addr), (k + n, addr + len - (k + n))].into_iter().filter(|&(_, l)| l > 0).collect()
        }
        _ => vec![(addr, len)],
    }
}

/// Whether `pid` is a running inject.
pub fn alive(pid: u32) -> bool {
    pid != 0 && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "inject")
}

/// An inject ring mapped in a process, as /proc/PID/maps names it.
struct MappedRing {
    start: u64,
    end: u64,
    /// The pid of the inject that made it, and the trampoline areas it mapped first (both
    /// from the memfd's name, see `install::ring_name`).
    maker: u32,
    areas: Vec<(u64, u64)>,
}

/// `PID.ADDR+LEN.ADDR+LEN...` after the memfd name's prefix.
fn parse_ring_name(rest: &str) -> (u32, Vec<(u64, u64)>) {
    let mut parts = rest.split('.');
    let maker = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let areas = parts
        .filter_map(|p| {
            let (a, l) = p.split_once('+')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(l, 16).ok()?))
        })
        .collect();
    (maker, areas)
}

/// Descriptors of inject rings open in `pid` whose inject is gone: one killed between
/// creating the memfd and closing it (after mapping it) left it open. (fd, areas its name
/// lists.)
fn orphan_ring_fds(pid: i32) -> Vec<(u64, Vec<(u64, u64)>)> {
    let prefix = format!("/memfd:{}", ring_abi::MEMFD_NAME);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: u64 = e.file_name().to_str()?.parse().ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        let rest = link.to_str()?.strip_prefix(&prefix)?.strip_prefix('.')?;
        let (maker, areas) = parse_ring_name(rest.split_whitespace().next()?);
        (!alive(maker)).then_some((fd, areas))
    })
    .collect()
}

/// Whether `[addr, addr+len)` is still exactly one anonymous executable mapping, as a
/// trampoline area is: memory the target mapped there since is never unmapped by us.
fn area_still_ours(maps: &str, addr: u64, len: u64) -> bool {
    maps.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let range = f.first().and_then(|r| r.split_once('-'));
        let bounds =
            range.and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)));
        f.len() == 5 && f[1].starts_with("r-x") && bounds == Some((addr, addr + len))
    })
}

/// The inject rings mapped in `pid`, from /proc/PID/maps.
fn rings(pid: i32) -> Result<Vec<MappedRing>> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("reading /proc/{pid}/maps"))?;
    let prefix = format!("/memfd:{}", ring_abi::MEMFD_NAME);
    Ok(maps
        .lines()
        .filter_map(|l| {
            let (_, name) = l.split_once(&prefix)?;
            let rest = name.strip_prefix('.').and_then(|n| n.split_whitespace().next()).unwrap_or("");
            let (maker, areas) = parse_ring_name(rest);
            // A Kafka header arena an inject left mapped on purpose: not a ring's start.
            if l.split_whitespace().nth(2).is_some_and(|off| u64::from_str_radix(off, 16) != Ok(0)) {
                return None;
            }
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(MappedRing {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                maker,
                areas,
            })
        })
        .collect())
}

/// Another running inject holds the process: nothing may go in beside its probes.
#[derive(Debug, thiserror::Error)]
#[error("pid {pid} is {what} by another inject (pid {owner}); stop that one first")]
pub struct Held {
    pub pid: i32,
    pub owner: u32,
    what: &'static str,
}

/// Rings of injects that are no longer running, with their journals. A ring whose owner
/// still runs is a [`Held`] error naming it.
pub fn leftovers(pid: i32) -> Result<Vec<Leftover>> {
    let mem = File::open(format!("/proc/{pid}/mem")).with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut out = Vec::new();
    for MappedRing { start, end, maker, areas: named_areas } in rings(pid)? {
        if word(&mem, start + header::MAGIC as u64)? != ring_abi::MAGIC {
            // Mapped, not yet set up: either its inject is still attaching, or it died then
            // (before any patch). The ring's name says which trampoline areas it mapped.
            if alive(maker) {
                return Err(Held { pid, owner: maker, what: "being instrumented" }.into());
            }
            out.push(Leftover {
                ring: (start, end - start),
                journal: 0,
                owner: maker,
                areas: named_areas,
                patches: Vec::new(),
                keep: None,
                auto_flag: 0,
            });
            continue;
        }
        let owner = word(&mem, start + header::OWNER as u64)? as u32;
        if alive(owner) {
            return Err(Held { pid, owner, what: "already instrumented" }.into());
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
            // to undo but the ring and the areas its name lists.
            out.push(Leftover {
                ring: (start, end - start),
                journal: 0,
                owner,
                areas: named_areas,
                patches: Vec::new(),
                keep: None,
                auto_flag: 0,
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
        let arena = word(&mem, start + header::ARENA as u64)?;
        let keep = (arena != 0 && start + arena + (ring_abi::arena::LEN as u64) <= at)
            .then(|| word(&mem, start + arena + ring_abi::arena::NEXT as u64))
            .transpose()?
            .filter(|&next| next != 0)
            .map(|_| (start + arena, ring_abi::arena::LEN as u64));
        let auto_flag = word(&mem, start + header::AUTO_FLAG as u64)?;
        out.push(Leftover { ring: (start, end - start), journal: at, owner, areas, patches, keep, auto_flag });
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
    let fds = orphan_ring_fds(pid);
    if found.is_empty() && !pad_left && fds.is_empty() {
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
            clear_auto_flag(&mut s, l)?;
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
                let inside = found
                    .iter()
                    .flat_map(|l| &l.areas)
                    .chain(fds.iter().flat_map(|f| &f.1))
                    .any(|&(a, n)| (a..a + n).contains(&rip));
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
                // Again: a trampoline that was running may have set it since.
                for l in &found {
                    clear_auto_flag(&mut s, l)?;
                }
                let tid = *s.threads().first().context("no threads")?;
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
                for l in &found {
                    for &(addr, len) in &l.areas {
                        if area_still_ours(&maps, addr, len) {
                            s.syscall(tid, pad.addr, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
                        }
                    }
                    for (addr, len) in around(l.ring.0, l.ring.1, l.keep) {
                        s.syscall(tid, pad.addr, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
                    }
                }
                for (fd, areas) in &fds {
                    for &(addr, len) in areas {
                        if area_still_ours(&maps, addr, len) {
                            s.syscall(tid, pad.addr, libc::SYS_munmap, [addr, len, 0, 0, 0, 0])?;
                        }
                    }
                    s.syscall(tid, pad.addr, libc::SYS_close, [*fd, 0, 0, 0, 0, 0])?;
                    done.fds_closed += 1;
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

/// Gives the OpenTelemetry global tracer its own answer back, if the dead inject's
/// trampolines changed it.
fn clear_auto_flag(s: &mut Session, l: &Leftover) -> Result<()> {
    if l.auto_flag != 0 {
        s.write(l.auto_flag, &[0])
            .with_context(|| format!("clearing the auto-instrumentation flag at {:#x}", l.auto_flag))?;
    }
    Ok(())
}

impl Cleaned {
    /// One line for users, or None when there was nothing to clean.
    pub fn describe(&self, pid: i32) -> Option<String> {
        if self.rings == 0 {
            let mut what = Vec::new();
            if self.pad_restored {
                what.push("put back the start-up code it ran system calls from".to_string());
            }
            if self.fds_closed > 0 {
                what.push(format!("closed {} ring descriptor(s) and unmapped their memory", self.fds_closed));
            }
            return (!what.is_empty()).then(|| {
                format!(
                    "inject: cleaned up after a previous inject killed while attaching to pid {pid}: {}",
                    what.join("; ")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_arena_stays() {
        assert_eq!(around(0x1000, 0x9000, Some((0x3000, 0x2000))), vec![(0x1000, 0x2000), (0x5000, 0x5000)]);
        assert_eq!(around(0x1000, 0x9000, None), vec![(0x1000, 0x9000)]);
        assert_eq!(around(0x1000, 0x2000, Some((0x1000, 0x2000))), vec![]);
    }

    #[test]
    fn only_an_exact_anonymous_executable_mapping_is_ours() {
        let maps = "5d400000-5d402000 r-xp 00000000 00:00 0 \n\
                    5d500000-5d501000 rw-p 00000000 00:00 0 \n\
                    00400000-00500000 r-xp 00000000 fe:00 42        /bin/prog\n";
        assert!(area_still_ours(maps, 0x5d40_0000, 0x2000));
        assert!(!area_still_ours(maps, 0x5d40_0000, 0x1000));
        assert!(!area_still_ours(maps, 0x5d50_0000, 0x1000));
        assert!(!area_still_ours(maps, 0x40_0000, 0x10_0000));
    }

    #[test]
    fn ring_names_carry_owner_and_areas() {
        let areas = [(0x7f00_1234_5000, 0x3000), (0x5d40_0000, 0x1000)];
        let name = super::super::install::ring_name(4321, &areas);
        assert_eq!(name, "inject-ring.4321.7f0012345000+3000.5d400000+1000");
        let rest = name.strip_prefix("inject-ring.").unwrap();
        assert_eq!(parse_ring_name(rest), (4321, areas.to_vec()));
        assert_eq!(parse_ring_name("99"), (99, Vec::new()));
        assert_eq!(parse_ring_name("x.zz+1"), (0, Vec::new()));
        // Never longer than a memfd name may be.
        let many: Vec<(u64, u64)> = (0..40).map(|i| (0x7fff_0000_0000 + i * 0x10000, 0x1000)).collect();
        assert!(super::super::install::ring_name(u32::MAX, &many).len() <= 249);
    }
}
