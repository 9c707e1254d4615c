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

mod events;
mod memory;
pub mod pad;
mod release;
mod sys;
mod syscall;

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

use release::is_fault;
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
}

/// Bits of signals 1..=31 that can be blocked (all but SIGKILL and SIGSTOP).
const HANDLER_MASK: u64 = 0x7fff_ffff & !(1 << (libc::SIGKILL - 1)) & !(1 << (libc::SIGSTOP - 1));

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
