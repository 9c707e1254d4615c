//! Short ptrace windows on a running process: [`Session`].
//!
//! A `Session` is one stopped window. [`Session::attach`] seizes every thread of the target
//! (`PTRACE_SEIZE` with `PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC`, never `EXITKILL`: the
//! target must survive us), interrupts each, waits until each has reported its stop, and
//! re-lists `/proc/PID/task` until no unknown thread appears. Threads cloned meanwhile are
//! attached by the kernel (TRACECLONE) and stopped as well. While the window is open the
//! caller reads and writes memory ([`Session::read`], [`Session::write`]), reads and sets
//! registers, and injects system calls ([`Session::syscall`]). [`Session::detach`] (or `Drop`)
//! lets every thread go; nothing of ours waits for a signal while the target runs free.
//!
//! # Signals
//! A signal-delivery-stop takes the signal out of the kernel's queues. Every such signal is
//! remembered with its full `siginfo` on the thread that reported it, and handed back exactly
//! once when the thread is let go:
//! - a thread still in its signal-delivery-stop gets one back there, with `PTRACE_SETSIGINFO`
//!   plus the `data` argument of `PTRACE_CONT` or `PTRACE_DETACH` (the kernel ignores that
//!   argument in other kinds of stop);
//! - the others (more than one signal, or a thread left in the syscall-exit stop of an
//!   injected syscall) are queued again on that thread before it is resumed: with
//!   `rt_tgsigqueueinfo` (same siginfo) when the kernel allows that (negative `si_code` other
//!   than `SI_TKILL`, e.g. `sigqueue` and POSIX-timer signals such as Go's per-thread
//!   SIGPROF), else with `tgkill` (then the handler sees `SI_TKILL` and our pid).
//!   A fault signal raised by the hardware (SIGSEGV, SIGBUS, SIGFPE, SIGILL with a kernel
//!   `si_code`) is not queued again: the faulting instruction runs again and raises it anew.
//!
//! Signals sent while every thread is stopped simply stay pending in the kernel, and the
//! kernel delivers them after detach.
//!
//! # Injected syscalls survive our death
//! [`Session::syscall`] runs a system call in a stopped thread from a landing pad
//! ([`pad`]) that ends by putting the thread's own registers back, so a `kill -9` of this
//! process at any moment of it leaves the thread to finish our call and carry on. It uses
//! `PTRACE_SYSCALL`, not a single-step: a dead tracer's step trap would reach the target as
//! a real SIGTRAP, which kills a Go program, while the kernel drops syscall tracing with its
//! tracer. Nothing is forced on the thread either, so its signal mask is never touched.
//!
//! # Group-stop (SIGSTOP, SIGTSTP, ... from someone else)
//! A stop signal we take is remembered and injected like any other, so the group-stop happens
//! when we let the thread go. A thread that reports a group-stop is never resumed by us:
//! [`Session::resume_briefly`] puts it in `PTRACE_LISTEN` (it stays stopped until someone
//! sends SIGCONT) and `PTRACE_DETACH` leaves it group-stopped (the kernel re-establishes the
//! stop on detach). [`Session::group_stopped`] tells whether this happened. Injected syscalls
//! still run in a group-stopped thread (that is ptrace's right), after which it is stopped
//! again.
//!
//! # Exits
//! Threads that exit during the window are dropped from the session (their exit is reaped
//! with `waitid`). When the whole process exits, operations fail with
//! [`SessionError::Exited`] and attach with [`AttachError::Exited`]. The exit of a target that
//! is our own child (a launched program) is left for its parent to reap (`WNOWAIT`).
//!
//! # One tracer thread
//! ptrace belongs to the tracing *thread*: only the thread that attached may issue requests
//! or wait for the tracees, and waits use `__WNOTHREAD` so that sessions on other threads never
//! see each other's events. `Session` is therefore neither `Send` nor `Sync`. The thread that
//! holds a session should not have child processes of its own other than the target (their
//! exits are never touched, but keep it simple).

#![cfg_attr(not(test), allow(dead_code))]

pub mod pad;
mod sys;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::IoSliceMut;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;

use sys::WaitEvent;

/// How long attach, resume_briefly and detach wait for threads to report a stop.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

const PTRACE_EVENT_STOP: i32 = libc::PTRACE_EVENT_STOP;
const SIG_STOPS: [i32; 4] = [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU];

/// Why [`Session::attach`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid} exited")]
    Exited { pid: i32 },
    #[error("{pid} is a thread of process {tgid}, not a process: attach to {tgid}")]
    NotAProcess { pid: i32, tgid: i32 },
    #[error(
        "process {pid} is already traced by pid {tracer} (a second inject or a debugger is attached to it; \
         detach that first)"
    )]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("not permitted to ptrace process {pid}: {hint}")]
    PermissionDenied { pid: i32, hint: String },
    #[error("threads {tids:?} of process {pid} did not stop within {timeout:?}")]
    StopTimeout { pid: i32, tids: Vec<i32>, timeout: Duration },
    #[error("process {pid} executed a new program while being attached")]
    Execed { pid: i32 },
    #[error("{op} on thread {tid} of process {pid} failed")]
    Os {
        pid: i32,
        tid: i32,
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("reading {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stopping the threads of process {pid} failed")]
    Stop {
        pid: i32,
        #[source]
        source: SessionError,
    },
}

/// Why an operation on an attached [`Session`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("process {pid} exited")]
    Exited { pid: i32 },
    #[error("process {pid} executed a new program")]
    Execed { pid: i32 },
    #[error("thread {tid} is not part of the session (it exited or never existed)")]
    NoSuchThread { tid: i32 },
    #[error("thread {tid} is not stopped")]
    NotStopped { tid: i32 },
    #[error("{op} on thread {tid} failed")]
    Os {
        tid: i32,
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("reading {len} bytes at {addr:#x} in process {pid} failed")]
    Read {
        pid: i32,
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {len} bytes at {addr:#x} in process {pid} failed")]
    Write {
        pid: i32,
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the {len} bytes written at {addr:#x} in process {pid} read back differently")]
    WriteMismatch { pid: i32, addr: u64, len: usize },
    #[error("injected {name} (syscall {nr}) failed in thread {tid}: {errno}")]
    SyscallFailed { tid: i32, nr: i64, name: &'static str, errno: Errno },
    #[error("{len} bytes at {addr:#x} are not executable code of the process (wanted for a landing pad)")]
    NotExecutable { addr: u64, len: usize },
    #[error(
        "injected {name} (syscall {nr}) from the pad at {pad:#x} in thread {tid} raised signal {sig} instead of returning"
    )]
    PadFault { tid: i32, nr: i64, name: &'static str, pad: u64, sig: i32 },
    #[error("threads {tids:?} did not stop within {timeout:?}")]
    StopTimeout { tids: Vec<i32>, timeout: Duration },
    #[error("attaching a thread that appeared failed")]
    Attach(#[source] Box<AttachError>),
}

/// Where a seized thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Running (or about to report a stop we asked for).
    Running,
    /// In group-stop under PTRACE_LISTEN: stopped by someone else's SIGSTOP, not by us.
    Listening,
    Stopped(Stop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Interrupt stop, initial stop of a new thread, or a stale trap (PTRACE_EVENT_STOP with
    /// SIGTRAP). The thread is in the kernel's signal-handling path on its way to user mode.
    Trap,
    /// Group-stop with this stop signal.
    Group(i32),
    /// Signal-delivery-stop (the signal is in `Thread::signals`). A signal can be injected
    /// from here.
    Delivery,
    /// Syscall-exit stop, after an injected syscall. Signals held for the thread are queued
    /// again when it is let go (a signal cannot be injected from here).
    SyscallExit,
    /// PTRACE_EVENT_EXIT (only seen if someone else set TRACEEXIT; we do not).
    Exiting,
    /// PTRACE_EVENT_EXEC: the process is a new program now.
    Exec,
}

#[derive(Debug)]
struct Thread {
    state: State,
    /// Signals taken out of the kernel by signal-delivery-stops, in arrival order, to hand
    /// back when the thread is let go.
    signals: Vec<libc::siginfo_t>,
}

impl Thread {
    fn running() -> Thread {
        Thread { state: State::Running, signals: Vec::new() }
    }
}

/// Whether the session wants threads to stay stopped or to run while it handles events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stop,
    Run,
}

/// One ptrace window on process `pid`: every thread seized and stopped. See the module docs.
///
/// Not `Send`: every ptrace request must come from the thread that attached.
#[derive(Debug)]
pub struct Session {
    pid: i32,
    threads: BTreeMap<i32, Thread>,
    /// Threads that could not be seized because they were exiting; skipped when re-listing.
    dead: BTreeSet<i32>,
    /// `/proc/PID/mem`, opened read-write after the seize.
    mem: Option<File>,
    /// The target is our own child: leave the leader's exit status for its parent.
    own_child: bool,
    exited: bool,
    execed: bool,
    timeout: Duration,
    released: bool,
    /// Clone events handled (threads the kernel attached for us), for diagnostics.
    clones: usize,
    /// Threads seized from a second or later listing of /proc/PID/task, for diagnostics.
    relisted: usize,
    /// Landing pads written this session, with the bytes they cover.
    pads: Vec<(u64, Vec<u8>)>,
    _not_send: PhantomData<*mut ()>,
}

impl Session {
    /// Attaches to every thread of `pid` and stops them all, waiting at most
    /// [`DEFAULT_STOP_TIMEOUT`] for threads to stop.
    pub fn attach(pid: i32) -> Result<Session, AttachError> {
        Session::attach_with_timeout(pid, DEFAULT_STOP_TIMEOUT)
    }

    /// [`Session::attach`] with a chosen stop timeout (also used by later stops and detach).
    pub fn attach_with_timeout(pid: i32, timeout: Duration) -> Result<Session, AttachError> {
        let status_path = format!("/proc/{pid}/status");
        let proc_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AttachError::NoSuchProcess { pid }
            } else {
                AttachError::Proc { path: status_path.clone(), source: e }
            }
        };
        if pid <= 0 {
            return Err(AttachError::NoSuchProcess { pid });
        }
        let tracer: i32 =
            sys::status_field(&status_path, "TracerPid").map_err(proc_err)?.and_then(|v| v.parse().ok()).unwrap_or(0);
        if tracer != 0 {
            return Err(AttachError::AlreadyTraced { pid, tracer: sys::tgid_of(tracer).unwrap_or(tracer) });
        }
        let tgid = sys::status_field(&status_path, "Tgid").map_err(proc_err)?.and_then(|v| v.parse().ok());
        if let Some(tgid) = tgid
            && tgid != pid
        {
            return Err(AttachError::NotAProcess { pid, tgid });
        }
        let state = sys::status_field(&status_path, "State").map_err(proc_err)?.unwrap_or_default();
        if state.starts_with('Z') || state.starts_with('X') {
            return Err(AttachError::Exited { pid });
        }
        let ppid: i32 =
            sys::status_field(&status_path, "PPid").map_err(proc_err)?.and_then(|v| v.parse().ok()).unwrap_or(0);

        let mut s = Session {
            pid,
            threads: BTreeMap::new(),
            dead: BTreeSet::new(),
            mem: None,
            own_child: ppid == std::process::id() as i32,
            exited: false,
            execed: false,
            timeout,
            released: false,
            pads: Vec::new(),
            clones: 0,
            relisted: 0,
            _not_send: PhantomData,
        };
        let deadline = Instant::now() + timeout;
        for listing in 0.. {
            let added = s.seize_new_tasks()?;
            if listing > 0 {
                s.relisted += added;
            }
            if s.threads.is_empty() {
                // Every thread was gone before we could seize it.
                s.released = true;
                return Err(AttachError::Exited { pid });
            }
            let known: BTreeSet<i32> = s.threads.keys().copied().collect();
            match s.collect_stops(deadline) {
                Ok(()) => {}
                Err(SessionError::Exited { .. }) => return Err(AttachError::Exited { pid }),
                Err(SessionError::Execed { .. }) => return Err(AttachError::Execed { pid }),
                Err(SessionError::StopTimeout { tids, timeout }) => {
                    return Err(AttachError::StopTimeout { pid, tids, timeout });
                }
                Err(SessionError::Os { tid, op, source }) => return Err(AttachError::Os { pid, tid, op, source }),
                Err(SessionError::Attach(e)) => return Err(*e),
                Err(source) => return Err(AttachError::Stop { pid, source }),
            }
            if s.exited {
                return Err(AttachError::Exited { pid });
            }
            // Done when a listing taken while every known thread is stopped shows nothing new:
            // a stopped thread cannot clone.
            if added == 0 && s.threads.keys().all(|t| known.contains(t)) {
                break;
            }
        }
        s.mem = File::options()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .or_else(|_| File::open(format!("/proc/{pid}/mem")))
            .ok();
        Ok(s)
    }

    /// Seizes and interrupts every thread of `/proc/PID/task` that the session does not know.
    /// Returns how many were added.
    fn seize_new_tasks(&mut self) -> Result<usize, AttachError> {
        let pid = self.pid;
        let tids = match sys::list_tasks(pid) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.exited = true;
                return Err(AttachError::Exited { pid });
            }
            Err(e) => return Err(AttachError::Proc { path: format!("/proc/{pid}/task"), source: e }),
        };
        let mut added = 0;
        for tid in tids {
            if self.threads.contains_key(&tid) || self.dead.contains(&tid) {
                continue;
            }
            match sys::seize(tid, libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_TRACESYSGOOD) {
                Ok(()) => {}
                Err(Errno::ESRCH) => {
                    self.dead.insert(tid);
                    continue;
                }
                Err(Errno::EPERM) => match sys::tracer_of(pid, tid) {
                    // Cloned by a thread we had seized: the kernel attached it to us.
                    Some(t) if t == sys::gettid() => {}
                    Some(t) if t != 0 => {
                        return Err(AttachError::AlreadyTraced { pid, tracer: sys::tgid_of(t).unwrap_or(t) });
                    }
                    // The kernel also answers EPERM for a thread that is exiting.
                    _ if sys::exiting(pid, tid) => {
                        self.dead.insert(tid);
                        continue;
                    }
                    _ => return Err(AttachError::PermissionDenied { pid, hint: permission_hint(pid) }),
                },
                Err(source) => return Err(AttachError::Os { pid, tid, op: "PTRACE_SEIZE", source }),
            }
            self.threads.insert(tid, Thread::running());
            added += 1;
            match sys::interrupt(tid) {
                // ESRCH: it is exiting; its exit will be reaped by collect_stops.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => return Err(AttachError::Os { pid, tid, op: "PTRACE_INTERRUPT", source }),
            }
        }
        Ok(added)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The thread ids of the session, sorted.
    pub fn threads(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }

    /// Whether a thread reported a group-stop (someone stopped the process with SIGSTOP or a
    /// job-control signal): such threads are never resumed by the session.
    pub fn group_stopped(&self) -> bool {
        self.threads.values().any(|t| matches!(t.state, State::Stopped(Stop::Group(_)) | State::Listening))
    }

    /// The signal numbers the session holds for `tid`, to be handed back when it is let go.
    pub fn held_signals(&self, tid: i32) -> Vec<i32> {
        self.threads.get(&tid).map(|t| t.signals.iter().map(|i| i.si_signo).collect()).unwrap_or_default()
    }

    fn alive(&self) -> Result<(), SessionError> {
        if self.exited {
            Err(SessionError::Exited { pid: self.pid })
        } else if self.execed {
            Err(SessionError::Execed { pid: self.pid })
        } else {
            Ok(())
        }
    }

    fn stopped(&self, tid: i32) -> Result<Stop, SessionError> {
        self.alive()?;
        match self.threads.get(&tid) {
            None => Err(SessionError::NoSuchThread { tid }),
            Some(Thread { state: State::Stopped(s), .. }) => Ok(*s),
            Some(_) => Err(SessionError::NotStopped { tid }),
        }
    }

    /// Maps a failed request on a thread we believed stopped: ESRCH means it was killed.
    fn gone(&mut self, tid: i32, op: &'static str, e: Errno) -> SessionError {
        if e == Errno::ESRCH {
            // Killed under us (SIGKILL wakes traced threads). Let the next poll reap it.
            if let Some(t) = self.threads.get_mut(&tid) {
                t.state = State::Running;
            }
            let deadline = Instant::now() + Duration::from_millis(200);
            let _ = self.poll_until(deadline, Phase::Stop, |s| !s.threads.contains_key(&tid));
            if self.exited {
                return SessionError::Exited { pid: self.pid };
            }
            if !self.threads.contains_key(&tid) {
                return SessionError::NoSuchThread { tid };
            }
        }
        SessionError::Os { tid, op, source: e }
    }

    /// The general-purpose registers of stopped thread `tid` (PTRACE_GETREGS).
    pub fn regs(&mut self, tid: i32) -> Result<libc::user_regs_struct, SessionError> {
        self.stopped(tid)?;
        sys::getregs(tid).map_err(|e| self.gone(tid, "PTRACE_GETREGS", e))
    }

    /// Sets the general-purpose registers of stopped thread `tid` (PTRACE_SETREGS).
    pub fn set_regs(&mut self, tid: i32, regs: &libc::user_regs_struct) -> Result<(), SessionError> {
        self.stopped(tid)?;
        sys::setregs(tid, regs).map_err(|e| self.gone(tid, "PTRACE_SETREGS", e))
    }

    /// Reads `buf.len()` bytes at `addr` (process_vm_readv, falling back to `/proc/PID/mem`).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), SessionError> {
        self.alive()?;
        let len = buf.len();
        if len == 0 {
            return Ok(());
        }
        let err = |source: std::io::Error| SessionError::Read { pid: self.pid, addr, len, source };
        let remote = [RemoteIoVec { base: addr as usize, len }];
        let first = match process_vm_readv(Pid::from_raw(self.pid), &mut [IoSliceMut::new(buf)], &remote) {
            Ok(n) if n == len => return Ok(()),
            Ok(n) => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("only {n} bytes readable")),
            Err(e) => std::io::Error::from(e),
        };
        // process_vm_readv may be filtered (seccomp) or the range partly unreadable to it:
        // try /proc/PID/mem, but report the first error if that fails too.
        match &self.mem {
            Some(mem) if mem.read_exact_at(buf, addr).is_ok() => Ok(()),
            _ => Err(err(first)),
        }
    }

    /// Writes `data` at `addr`, also into read-only text, and checks that it reads back the
    /// same. Writes through `/proc/PID/mem` (the kernel forces the write into a private copy of
    /// the page); where the kernel refuses that (`proc_mem.force_override`), falls back to
    /// PTRACE_POKEDATA read-modify-write of whole words.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        self.alive()?;
        if data.is_empty() {
            return Ok(());
        }
        let direct = match &self.mem {
            Some(mem) => mem.write_all_at(data, addr),
            None => Err(std::io::Error::from(Errno::EPERM)),
        };
        if direct.is_err() {
            self.write_poke(addr, data)?;
        }
        self.verify(addr, data)
    }

    fn verify(&self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        let mut back = vec![0u8; data.len()];
        self.read(addr, &mut back)?;
        if back != data {
            return Err(SessionError::WriteMismatch { pid: self.pid, addr, len: data.len() });
        }
        Ok(())
    }

    /// PTRACE_PEEKDATA/POKEDATA read-modify-write of the words covering `[addr, addr+len)`,
    /// through any stopped thread. Words never reach past the page of the region's last byte.
    fn write_poke(&mut self, addr: u64, data: &[u8]) -> Result<(), SessionError> {
        let pid = self.pid;
        let err = |e: Errno| SessionError::Write { pid, addr, len: data.len(), source: std::io::Error::from(e) };
        let tid = self
            .threads
            .iter()
            .find(|(_, t)| matches!(t.state, State::Stopped(_)))
            .map(|(tid, _)| *tid)
            .ok_or(SessionError::Exited { pid })?;
        let end = addr + data.len() as u64;
        let mut at = addr;
        while at < end {
            // An 8-byte window holding `at`, moved down when it would run past the page of the
            // region's last byte (the next page may be unmapped).
            let last_page_end = ((end - 1) | 0xfff) + 1;
            let word_addr = at.min(last_page_end.saturating_sub(8));
            let mut word = sys::peek(tid, word_addr).map_err(err)?.to_le_bytes();
            for (i, b) in word.iter_mut().enumerate() {
                let a = word_addr + i as u64;
                if a >= addr && a < end {
                    *b = data[(a - addr) as usize];
                }
            }
            sys::poke(tid, word_addr, u64::from_le_bytes(word)).map_err(err)?;
            at = word_addr + 8;
        }
        Ok(())
    }

    /// Runs system call `nr` with `args` in stopped thread `tid` and returns its result.
    ///
    /// The `syscall` instruction runs from a landing pad written at `pad` (see [`pad`]): any
    /// [`pad::PAD_LEN`] executable bytes that no thread runs while the session is open; their
    /// original bytes are put back before any thread runs again ([`Session::resume_briefly`],
    /// detach). Should this process die meanwhile, the pad alone returns the thread to where
    /// it was, so choose bytes that nothing executes after start-up (`runtime.rt0_go`).
    /// The call is run with `PTRACE_SYSCALL` (no single-step trap that a dead tracer would
    /// leave to the target); the thread ends in its syscall-exit stop with its registers
    /// restored (`orig_rax` and `fs_base` included), a syscall it was interrupted in set to
    /// restart ([`pad::resume_regs`]). Signals it takes meanwhile are remembered and handed
    /// back later. Results from -4095 to -1 are returned as [`SessionError::SyscallFailed`].
    pub fn syscall(&mut self, tid: i32, pad: u64, nr: i64, args: [u64; 6]) -> Result<i64, SessionError> {
        let stop = self.stopped(tid)?;
        if matches!(stop, Stop::Exiting | Stop::Exec) {
            return Err(SessionError::NotStopped { tid });
        }
        if !sys::executable(self.pid, pad, pad::PAD_LEN as u64).unwrap_or(false) {
            return Err(SessionError::NotExecutable { addr: pad, len: pad::PAD_LEN });
        }
        if !self.pads.iter().any(|(at, _)| *at == pad) {
            let mut original = vec![0; pad::PAD_LEN];
            self.read(pad, &mut original)?;
            self.pads.push((pad, original));
        }
        let saved = self.regs(tid)?;
        let resume = pad::resume_regs(&saved);
        self.write(pad, &pad::landing_pad(&resume))?;
        let mut regs = saved;
        regs.rip = pad;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        let outcome = self.set_regs(tid, &regs).and_then(|()| {
            test_stall(nr, "pad");
            self.run_syscall(tid, pad, nr)
        });
        // Restore whatever happened, unless the thread is gone.
        if self.threads.get(&tid).is_some_and(|t| matches!(t.state, State::Stopped(_)))
            && let Err(e) = sys::setregs(tid, &resume)
        {
            return Err(self.gone(tid, "PTRACE_SETREGS", e));
        }
        let rax = outcome?;
        if (-4095..0).contains(&rax) {
            return Err(SessionError::SyscallFailed {
                tid,
                nr,
                name: syscall_name(nr),
                errno: Errno::from_raw(-rax as i32),
            });
        }
        Ok(rax)
    }

    /// Lets `tid` run the `syscall` at `pad` under `PTRACE_SYSCALL` until its syscall-exit
    /// stop; returns RAX.
    fn run_syscall(&mut self, tid: i32, pad: u64, nr: i64) -> Result<i64, SessionError> {
        let deadline = Instant::now() + self.timeout;
        let mut entered = false;
        loop {
            if let Err(e) = sys::syscall_cont(tid) {
                return Err(self.gone(tid, "PTRACE_SYSCALL", e));
            }
            self.set_state(tid, State::Running);
            let ev = match self.wait_thread(tid, deadline) {
                Ok(ev) => ev,
                Err(e @ SessionError::StopTimeout { .. }) => {
                    // A blocking syscall: interrupt it and give up.
                    let _ = sys::interrupt(tid);
                    let _ = self.poll_until(Instant::now() + self.timeout, Phase::Stop, |s| {
                        !matches!(s.threads.get(&tid).map(|t| t.state), Some(State::Running))
                    });
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            match ev {
                WaitEvent::Stopped { sig: SYSCALL_STOP, event: 0 } => {
                    self.set_state(tid, State::Stopped(Stop::SyscallExit));
                    if entered {
                        test_stall(nr, "exit");
                        let regs = sys::getregs(tid).map_err(|e| self.gone(tid, "PTRACE_GETREGS", e))?;
                        return Ok(regs.rax as i64);
                    }
                    entered = true;
                    test_stall(nr, "enter");
                }
                WaitEvent::Stopped { sig, event: 0 } => {
                    let info = sys::getsiginfo(tid).map_err(|e| self.gone(tid, "PTRACE_GETSIGINFO", e))?;
                    self.set_state(tid, State::Stopped(Stop::Delivery));
                    let regs = sys::getregs(tid).map_err(|e| self.gone(tid, "PTRACE_GETREGS", e))?;
                    if entered || regs.rip != pad || is_fault(&info) {
                        // Our own doing (the pad faulted, or ran and went elsewhere): drop
                        // the signal, do not hand it back.
                        return Err(SessionError::PadFault { tid, nr, name: syscall_name(nr), pad, sig });
                    }
                    // A real signal dequeued before the instruction ran: keep it, go on.
                    self.threads.get_mut(&tid).expect("known thread").signals.push(info);
                }
                WaitEvent::Stopped { sig, event } => {
                    // A stale interrupt trap or a group-stop arriving first: go on.
                    self.note_event_stop(tid, sig, event, Phase::Stop)?;
                    if !matches!(self.threads.get(&tid).map(|t| t.state), Some(State::Stopped(_))) {
                        // The event made us resume it (clone); wait for it to stop again.
                        self.poll_until(deadline, Phase::Stop, |s| {
                            !matches!(s.threads.get(&tid).map(|t| t.state), Some(State::Running))
                        })?;
                    }
                    self.stopped(tid)?;
                }
                WaitEvent::Exited(_) | WaitEvent::Killed(_) => {
                    self.handle(tid, ev, Phase::Stop)?;
                    self.alive()?;
                    return Err(SessionError::NoSuchThread { tid });
                }
            }
        }
    }

    /// Puts back the original bytes under every landing pad used, before any thread runs.
    fn restore_pads(&mut self) -> Result<(), SessionError> {
        while let Some((at, original)) = self.pads.pop() {
            if self.exited {
                continue;
            }
            if let Err(e) = self.write(at, &original) {
                self.pads.push((at, original));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether thread `tid` blocks every signal from 1 to 31 that can be blocked, which is
    /// what a Go signal handler does (Go installs its handlers with a full `sa_mask`). Also
    /// true in the few places where the Go runtime blocks all signals itself: around clone in
    /// `newosproc`, around fork in `syscall.forkExec`, while a thread exits. In all these
    /// cases the right thing is to let the thread run ([`Session::resume_briefly`]) and look
    /// again. Reads `SigBlk` from `/proc/PID/task/TID/status`.
    pub fn in_signal_handler(&self, tid: i32) -> Result<bool, SessionError> {
        self.alive()?;
        let path = format!("/proc/{}/task/{tid}/status", self.pid);
        let blocked = sys::status_field(&path, "SigBlk")
            .ok()
            .flatten()
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .ok_or(SessionError::NoSuchThread { tid })?;
        Ok(blocked & HANDLER_MASK == HANDLER_MASK)
    }

    /// Lets every thread run for `dur`, then stops them all again. Held signals are handed
    /// back first; signals that arrive while the threads run are delivered at once. Threads
    /// in group-stop stay stopped (PTRACE_LISTEN). New threads are attached by the kernel and
    /// stopped with the rest.
    pub fn resume_briefly(&mut self, dur: Duration) -> Result<(), SessionError> {
        self.alive()?;
        self.restore_pads()?;
        let tids = self.threads();
        for tid in tids {
            self.release(tid, false)?;
        }
        let run_until = Instant::now() + dur;
        self.poll_until(run_until, Phase::Run, |s| s.exited || s.execed).or_else(|e| match e {
            SessionError::StopTimeout { .. } => Ok(()),
            e => Err(e),
        })?;
        self.alive()?;
        self.stop_all(Instant::now() + self.timeout)
    }

    /// Interrupts every running or listening thread and waits until all are stopped; picks up
    /// threads that only `/proc/PID/task` knows about.
    fn stop_all(&mut self, deadline: Instant) -> Result<(), SessionError> {
        loop {
            self.collect_stops(deadline)?;
            match self.seize_new_tasks() {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(AttachError::Exited { .. }) => return Err(SessionError::Exited { pid: self.pid }),
                Err(AttachError::Os { tid, op, source, .. }) => return Err(SessionError::Os { tid, op, source }),
                Err(e) => return Err(SessionError::Attach(Box::new(e))),
            }
        }
    }

    /// Interrupts every running or listening thread and waits until each reports a stop.
    fn collect_stops(&mut self, deadline: Instant) -> Result<(), SessionError> {
        let waiting: Vec<i32> = self
            .threads
            .iter()
            .filter(|(_, t)| matches!(t.state, State::Running | State::Listening))
            .map(|(tid, _)| *tid)
            .collect();
        for tid in waiting {
            match sys::interrupt(tid) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => return Err(SessionError::Os { tid, op: "PTRACE_INTERRUPT", source }),
            }
        }
        self.poll_until(deadline, Phase::Stop, |s| {
            s.exited || s.threads.values().all(|t| matches!(t.state, State::Stopped(_)))
        })?;
        if self.exited {
            return Err(SessionError::Exited { pid: self.pid });
        }
        Ok(())
    }

    /// Polls every thread for events and handles them until `done` holds or `deadline`
    /// passes (then [`SessionError::StopTimeout`] naming the threads not stopped).
    fn poll_until(
        &mut self,
        deadline: Instant,
        phase: Phase,
        done: impl Fn(&Session) -> bool,
    ) -> Result<(), SessionError> {
        let mut idle_rounds = 0u32;
        loop {
            if done(self) {
                return Ok(());
            }
            let mut progressed = false;
            let tids = self.threads();
            for tid in tids {
                let keep_exit = self.own_child && tid == self.pid;
                match sys::poll(tid, keep_exit) {
                    Ok(Some(ev)) => {
                        progressed = true;
                        self.handle(tid, ev, phase)?;
                    }
                    Ok(None) => {}
                    // Not ours any more: vanished (exec by another thread, or reaped).
                    Err(Errno::ECHILD) => {
                        progressed = true;
                        self.threads.remove(&tid);
                        if tid == self.pid && self.threads.is_empty() {
                            self.exited = true;
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(source) => return Err(SessionError::Os { tid, op: "waitid", source }),
                }
            }
            if self.threads.is_empty() {
                self.exited = true;
            }
            if done(self) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let tids = self
                    .threads
                    .iter()
                    .filter(|(_, t)| !matches!(t.state, State::Stopped(_)))
                    .map(|(tid, _)| *tid)
                    .collect();
                return Err(SessionError::StopTimeout { tids, timeout: self.timeout });
            }
            if progressed {
                idle_rounds = 0;
            } else {
                idle_rounds += 1;
                backoff(idle_rounds, deadline - now);
            }
        }
    }

    /// Blocks (polling) until thread `tid` reports an event; handles nothing.
    fn wait_thread(&mut self, tid: i32, deadline: Instant) -> Result<WaitEvent, SessionError> {
        let mut idle_rounds = 0u32;
        loop {
            let keep_exit = self.own_child && tid == self.pid;
            match sys::poll(tid, keep_exit) {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(Errno::ECHILD) => {
                    self.threads.remove(&tid);
                    return Err(SessionError::NoSuchThread { tid });
                }
                Err(Errno::EINTR) => {}
                Err(source) => return Err(SessionError::Os { tid, op: "waitid", source }),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SessionError::StopTimeout { tids: vec![tid], timeout: self.timeout });
            }
            idle_rounds += 1;
            backoff(idle_rounds, deadline - now);
        }
    }

    fn set_state(&mut self, tid: i32, state: State) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
        }
    }

    /// Resumes a thread that reported a stop we do not want to keep; ESRCH (killed) leaves
    /// it to be reaped by the next poll.
    fn resume_now(&mut self, tid: i32, sig: i32) -> Result<(), SessionError> {
        self.set_state(tid, State::Running);
        match sys::cont(tid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(SessionError::Os { tid, op: "PTRACE_CONT", source }),
        }
    }

    /// Handles one event of thread `tid`.
    fn handle(&mut self, tid: i32, ev: WaitEvent, phase: Phase) -> Result<(), SessionError> {
        match ev {
            WaitEvent::Exited(_) | WaitEvent::Killed(_) => {
                self.threads.remove(&tid);
                if tid == self.pid || self.threads.is_empty() {
                    // The leader reports last: the whole process is gone.
                    self.exited = true;
                }
                Ok(())
            }
            WaitEvent::Stopped { sig, event: 0 } => {
                // Signal-delivery-stop.
                match phase {
                    Phase::Run => self.resume_now(tid, sig),
                    Phase::Stop => {
                        let info = match sys::getsiginfo(tid) {
                            Ok(info) => info,
                            Err(Errno::ESRCH) => {
                                self.set_state(tid, State::Running);
                                return Ok(());
                            }
                            Err(source) => return Err(SessionError::Os { tid, op: "PTRACE_GETSIGINFO", source }),
                        };
                        let t = self.threads.get_mut(&tid).expect("known thread");
                        t.signals.push(info);
                        t.state = State::Stopped(Stop::Delivery);
                        Ok(())
                    }
                }
            }
            WaitEvent::Stopped { sig, event } => self.note_event_stop(tid, sig, event, phase),
        }
    }

    fn note_event_stop(&mut self, tid: i32, sig: i32, event: i32, phase: Phase) -> Result<(), SessionError> {
        match event {
            PTRACE_EVENT_STOP if SIG_STOPS.contains(&sig) => match phase {
                Phase::Stop => {
                    self.set_state(tid, State::Stopped(Stop::Group(sig)));
                    Ok(())
                }
                Phase::Run => {
                    self.set_state(tid, State::Listening);
                    match sys::listen(tid) {
                        Ok(()) | Err(Errno::ESRCH) => Ok(()),
                        Err(source) => Err(SessionError::Os { tid, op: "PTRACE_LISTEN", source }),
                    }
                }
            },
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                if let Ok(child) = sys::geteventmsg(tid) {
                    self.clones += 1;
                    self.threads.entry(child as i32).or_insert_with(Thread::running);
                }
                // The thread is inside clone(2); an injected syscall must not start from there.
                // Let it return to user mode, stopping right away when we want it stopped.
                if phase == Phase::Stop {
                    let _ = sys::interrupt(tid);
                }
                self.resume_now(tid, 0)
            }
            libc::PTRACE_EVENT_EXEC => {
                self.execed = true;
                self.set_state(tid, State::Stopped(Stop::Exec));
                Ok(())
            }
            libc::PTRACE_EVENT_EXIT => match phase {
                Phase::Stop => {
                    self.set_state(tid, State::Stopped(Stop::Exiting));
                    Ok(())
                }
                Phase::Run => self.resume_now(tid, 0),
            },
            // PTRACE_EVENT_STOP with SIGTRAP: interrupt, initial or stale trap (or an event we
            // did not ask for).
            _ => match phase {
                Phase::Stop => {
                    self.set_state(tid, State::Stopped(Stop::Trap));
                    Ok(())
                }
                Phase::Run => self.resume_now(tid, 0),
            },
        }
    }

    /// Lets stopped thread `tid` go: resumed (or, in group-stop, listening) or detached,
    /// handing back the signals it holds.
    fn release(&mut self, tid: i32, detach: bool) -> Result<(), SessionError> {
        let pid = self.pid;
        let Some(t) = self.threads.get_mut(&tid) else { return Ok(()) };
        let State::Stopped(stop) = t.state else { return Ok(()) };
        let mut signals = std::mem::take(&mut t.signals);
        let mut inject = 0;
        if stop == Stop::Delivery && !signals.is_empty() {
            // Inject the one whose siginfo cannot be queued again exactly, if any.
            let i = signals.iter().position(|s| !requeues_exactly(s)).unwrap_or(0);
            let info = signals.remove(i);
            match sys::setsiginfo(tid, &info) {
                Ok(()) => inject = info.si_signo,
                // Killed meanwhile: nothing to hand back to; its exit is still to be reaped.
                Err(Errno::ESRCH) => {
                    t.state = State::Running;
                    return Ok(());
                }
                Err(source) => return Err(SessionError::Os { tid, op: "PTRACE_SETSIGINFO", source }),
            }
        }
        for info in &signals {
            if is_fault(info) {
                continue; // raised again when the instruction runs again
            }
            let r = if requeues_exactly(info) {
                sys::tgsigqueueinfo(pid, tid, info)
            } else {
                sys::tgkill(pid, tid, info.si_signo)
            };
            match r {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(source) => return Err(SessionError::Os { tid, op: "rt_tgsigqueueinfo", source }),
            }
        }
        let (op, r) = match (detach, stop) {
            (true, _) => ("PTRACE_DETACH", sys::detach(tid, inject)),
            (false, Stop::Group(_)) => {
                t.state = State::Listening;
                ("PTRACE_LISTEN", sys::listen(tid))
            }
            (false, _) => {
                t.state = State::Running;
                ("PTRACE_CONT", sys::cont(tid, inject))
            }
        };
        match r {
            Ok(()) => {
                if detach {
                    self.threads.remove(&tid);
                }
                Ok(())
            }
            Err(Errno::ESRCH) => {
                // Killed: a traced thread stays a zombie until its tracer reaps it, and the
                // process cannot be reaped before its threads. Keep it to be polled.
                self.set_state(tid, State::Running);
                Ok(())
            }
            Err(source) => Err(SessionError::Os { tid, op, source }),
        }
    }

    /// Lets every thread go: held signals are handed back, nothing stays traced.
    pub fn detach(mut self) -> Result<(), SessionError> {
        self.release_all()
    }

    fn release_all(&mut self) -> Result<(), SessionError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        // Threads that are running (an error in the middle of resume_briefly) must stop before
        // they can be detached.
        let mut first_err = None;
        if self.threads.values().any(|t| !matches!(t.state, State::Stopped(_))) {
            let deadline = Instant::now() + self.timeout;
            if let Err(e) = self.collect_stops(deadline) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.restore_pads() {
            first_err.get_or_insert(e);
        }
        for tid in self.threads() {
            if let Err(e) = self.release(tid, true) {
                first_err.get_or_insert(e);
            }
        }
        if !self.threads.is_empty() {
            // Threads killed under us: reap their exits.
            let deadline = Instant::now() + self.timeout;
            let _ = self.poll_until(deadline, Phase::Stop, |s| s.threads.is_empty());
        }
        // Threads that never stopped stay traced until this thread exits; say which.
        let left: Vec<i32> = self.threads();
        if !left.is_empty() {
            first_err.get_or_insert(SessionError::StopTimeout { tids: left, timeout: self.timeout });
        }
        match first_err {
            None if self.exited => Err(SessionError::Exited { pid: self.pid }),
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.release_all();
    }
}

/// How a syscall-enter or -exit stop reports (PTRACE_O_TRACESYSGOOD).
const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// A test hook: with `INJECT_TEST_STALL=NAME:POINT` (POINT one of `pad`, `enter`, `exit`)
/// the first injected syscall NAME (e.g. `mmap`, `munmap`) stops there for a minute after
/// saying so on stderr, so that a test can kill inject at exactly that moment.
fn test_stall(nr: i64, point: &str) {
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(spec) = SPEC.get_or_init(|| std::env::var("INJECT_TEST_STALL").ok()) else { return };
    if *spec == format!("{}:{point}", syscall_name(nr)) && !DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("inject: test stall in {spec}");
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Bits of signals 1..=31 that can be blocked (all but SIGKILL and SIGSTOP).
const HANDLER_MASK: u64 = 0x7fff_ffff & !(1 << (libc::SIGKILL - 1)) & !(1 << (libc::SIGSTOP - 1));

/// A fault raised by the CPU for the instruction at RIP: it recurs when that instruction runs
/// again, so it is never queued a second time.
fn is_fault(info: &libc::siginfo_t) -> bool {
    matches!(info.si_signo, libc::SIGSEGV | libc::SIGBUS | libc::SIGFPE | libc::SIGILL) && info.si_code > 0
}

/// Whether rt_tgsigqueueinfo accepts this siginfo from another process.
fn requeues_exactly(info: &libc::siginfo_t) -> bool {
    info.si_code < 0 && info.si_code != libc::SI_TKILL
}

/// Polls back off: poll again at once a few times (stops usually arrive within
/// microseconds), then sleep from 10 µs doubling up to 1 ms. Never `sched_yield`: with busy
/// target threads on our CPU it hands them a whole time slice.
fn backoff(idle_rounds: u32, left: Duration) {
    if idle_rounds > 4 {
        let us = 10u64 << (idle_rounds - 5).min(7);
        std::thread::sleep(Duration::from_micros(us.min(1000)).min(left));
    }
}

/// The name of the syscalls an injector uses, for error messages.
pub fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_read => "read",
        libc::SYS_write => "write",
        libc::SYS_close => "close",
        libc::SYS_mmap => "mmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_munmap => "munmap",
        libc::SYS_getpid => "getpid",
        libc::SYS_gettid => "gettid",
        libc::SYS_madvise => "madvise",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_ftruncate => "ftruncate",
        libc::SYS_fcntl => "fcntl",
        libc::SYS_prctl => "prctl",
        libc::SYS_mremap => "mremap",
        _ => "syscall",
    }
}

/// Why ptrace may be refused, as a hint for the user.
fn permission_hint(pid: i32) -> String {
    let mut hint = String::new();
    let me = sys::uid_of(std::process::id() as i32).unwrap_or(u32::MAX);
    let cap = sys::have_cap_sys_ptrace();
    if let Some(uid) = sys::uid_of(pid)
        && uid != me
        && !cap
    {
        hint.push_str(&format!("the process belongs to uid {uid} and we run as uid {me} without CAP_SYS_PTRACE; "));
    }
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_string()).as_deref() {
        Ok("1") => hint.push_str(
            "kernel.yama.ptrace_scope is 1: only a parent may trace its children unless we have CAP_SYS_PTRACE \
             (run as root, `setcap cap_sys_ptrace+ep`, or set the sysctl to 0); ",
        ),
        Ok("2") => hint.push_str("kernel.yama.ptrace_scope is 2: tracing needs CAP_SYS_PTRACE; "),
        Ok("3") => hint.push_str("kernel.yama.ptrace_scope is 3: ptrace is disabled until reboot; "),
        _ => {}
    }
    hint.push_str(
        "run as the same user as the target or with CAP_SYS_PTRACE; in a container add `--cap-add=SYS_PTRACE` \
         (and a seccomp profile that allows ptrace)",
    );
    hint
}
