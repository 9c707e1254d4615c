//! Goroutines parked by async preemption, and where they will resume.
//!
//! The runtime preempts a goroutine asynchronously by making the interrupted thread call
//! `asyncPreempt` at the interrupted PC: that PC is pushed as a return address on the
//! goroutine's own stack, below `asyncPreempt`'s frame, and the goroutine resumes there
//! when it next runs. A jump written over an instruction that starts inside its 5 bytes
//! would break such a goroutine. Once the jump is in, no goroutine can be preempted there
//! again (the bytes are never executed), so the only danger is one parked before: with the
//! world stopped, every goroutine that may hold such a frame (runnable, running,
//! preempted, or having its stack copied) and every thread has the top of its stack read,
//! and the jumps go in only when no word there is one of those PCs.

use std::collections::HashSet;

use super::ptrace::Session;

/// Bytes above a goroutine's saved stack pointer (or a thread's) searched: `asyncPreempt`'s
/// frame (0x170 bytes and the flags in Go 1.21 to 1.25, 0x70 since) and the small frames of
/// `asyncPreempt2` and `mcall` above it fit with room to spare.
const WINDOW: u64 = 4096;

/// `runtime.g` fields every Go release 1.21 to 1.27 has at these offsets.
const STACK_LO: usize = 0;
const STACK_HI: usize = 8;
const SCHED_SP: usize = 56;

/// Goroutine states (`runtime/runtime2.go`) in which a goroutine may have an async
/// preemption frame; `_Gscan` (0x1000) may be set on any of them.
const RUNNABLE: u32 = 1;
const RUNNING: u32 = 2;
const COPYSTACK: u32 = 8;
const PREEMPTED: u32 = 9;
const SCAN_BIT: u32 = 0x1000;

/// No process has more goroutines than this; a larger length means `allgs` was misread.
const MAX_GOROUTINES: u64 = 50_000_000;

pub struct ParkedScan {
    /// Run-time address of `runtime.allgs` (a `[]*g`).
    pub allgs: u64,
    /// Offset of `g.goid`; `g.atomicstatus` is the word before it (then `stackLock`).
    pub goid_off: u32,
    /// The PCs no goroutine may be parked at.
    pub pcs: HashSet<u64>,
}

impl ParkedScan {
    /// The first goroutine or thread whose stack top holds one of the PCs, described; None
    /// when there is none. An `allgs` that does not read as one is an error: the check
    /// cannot be made, and the jumps that need it must not go in.
    pub fn find(&self, s: &mut Session) -> anyhow::Result<Option<String>> {
        use anyhow::{Context, ensure};
        let mut header = [0u8; 16];
        s.read(self.allgs, &mut header).context("reading runtime.allgs")?;
        let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let (ptr, len) = (word(&header, 0), word(&header, 8));
        ensure!(len <= MAX_GOROUTINES && (len == 0 || ptr != 0), "runtime.allgs reads as {len} goroutines at {ptr:#x}");
        let mut gs = vec![0u8; len as usize * 8];
        s.read(ptr, &mut gs).context("reading the goroutine list")?;
        let gs: Vec<u64> = gs.chunks_exact(8).map(|c| word(c, 0)).filter(|&g| g != 0).collect();
        let head = self.goid_off as usize;
        let mut heads = vec![vec![0u8; head]; gs.len()];
        let mut ranges: Vec<(u64, &mut [u8])> =
            gs.iter().zip(heads.iter_mut()).map(|(&g, b)| (g, &mut b[..])).collect();
        let read = s.read_many(&mut ranges)?;
        // Where to look: the goroutines that may be parked, then every thread.
        let mut windows: Vec<(String, u64, u64)> = Vec::new();
        for ((g, h), ok) in gs.iter().zip(&heads).zip(read) {
            ensure!(ok, "cannot read goroutine {g:#x}");
            let status = u32::from_le_bytes(h[head - 8..head - 4].try_into().unwrap_or_default()) & !SCAN_BIT;
            if ![RUNNABLE, RUNNING, COPYSTACK, PREEMPTED].contains(&status) {
                continue;
            }
            let (lo, hi, sp) = (word(h, STACK_LO), word(h, STACK_HI), word(h, SCHED_SP));
            if lo < sp && sp < hi {
                windows.push((format!("goroutine at {g:#x} (status {status})"), sp, hi.min(sp + WINDOW)));
            }
        }
        for tid in s.threads() {
            let rsp = s.regs(tid)?.rsp;
            windows.push((format!("thread {tid}"), rsp, rsp.saturating_add(WINDOW)));
        }
        for (who, from, to) in windows {
            // A window may run past the end of a thread's stack mapping: page by page, and a
            // page that cannot be read holds nothing.
            let mut at = from & !7;
            while at < to {
                let end = ((at | 0xfff) + 1).min(to);
                let mut buf = vec![0u8; (end - at) as usize];
                if s.read(at, &mut buf).is_ok()
                    && let Some(i) = buf.chunks_exact(8).position(|c| self.pcs.contains(&word(c, 0)))
                {
                    let pc = word(&buf, i * 8);
                    return Ok(Some(format!("{who} will resume at {pc:#x}, inside a jump about to be written")));
                }
                at = end;
            }
        }
        Ok(None)
    }
}
