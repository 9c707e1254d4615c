//! `inject [OPTIONS] -- PROGRAM [ARGS...]`: start a program with its probes already in,
//! then stand in for it towards whatever started us (a shell, Docker, Kubernetes).
//!
//! The child asks to be traced (PTRACE_TRACEME needs no capability: a parent may trace
//! its own child) and execs; the kernel stops it on the first instruction of the new image,
//! before the Go runtime has run at all. We turn that ptrace stop into a plain SIGSTOP
//! group-stop, install the probes exactly as `--pid` does (one thread, nothing running, so
//! the window is trivially safe), and SIGCONT it. From then on we forward signals, reap
//! orphans when we are PID 1, and exit with the program's status. When `--duration` runs
//! out first, the probes come out and the program runs on, still supervised.
//!
//! Fail-open: when instrumentation cannot be set up (not Go, an unsupported Go, ptrace
//! refused by seccomp, bad configuration), the program runs untraced and we say why;
//! `--strict` makes that an error instead.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;

use crate::run::{self, RunArgs, StopReason};

/// Signals a process supervisor sends that the program, not we, should get.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// What the caller should exit with.
pub fn launch(args: &RunArgs) -> Result<u8> {
    let (program, rest) = args.command.split_first().context("no program after --")?;
    // Every thread we start inherits this mask, so these signals only reach the signalfd.
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    mask.thread_block().context("blocking signals")?;
    let sigfd = SignalFd::new(&mask).context("signalfd")?;

    let (pid, traced) = match spawn(program, rest, true) {
        Ok(pid) => (pid, true),
        // EPERM (or ENOSYS) for a program we could exec: PTRACE_TRACEME was refused.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) && program_exists_and_runs(program) => {
            let why = format!("ptrace is not allowed here ({e}); a seccomp profile may forbid it");
            if args.strict {
                bail!("{why}");
            }
            eprintln!("inject: warning: {why}; running {program} untraced");
            (spawn(program, rest, false).map_err(|e| exec_error(program, e))?, false)
        }
        Err(e) => return Err(exec_error(program, e)),
    };

    let tracing = if traced {
        match stop_after_exec(pid) {
            Ok(()) => match instrument(pid, args) {
                Ok(t) => t,
                Err(e) if args.strict => {
                    // SAFETY: kill(2) and waitpid(2) on our own child.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    return Err(e.context(format!("instrumenting {program} (--strict)")));
                }
                Err(e) => {
                    eprintln!("inject: warning: {e:#}; running {program} untraced");
                    None
                }
            },
            Err(ChildGone(status)) => return Ok(exit_code(status)),
        }
    } else {
        None
    };
    if traced {
        // SAFETY: kill(2) on our own stopped child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    let deadline = args.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let status = match tracing {
        Some(t) => match supervise(pid, &sigfd, deadline)? {
            // The program's status is what we exit with, whatever happens to our reporting.
            Some(status) => {
                if let Err(e) = t.finish(StopReason::TargetExited(Some(status)), None, args) {
                    eprintln!("inject: error: {e:#}");
                }
                if let Some(how) = crate::exit::died(Some(status)) {
                    eprintln!("inject: {program} {how} while probes were in");
                }
                status
            }
            None => {
                if let Err(e) = t.remove_and_finish(StopReason::Duration, args) {
                    eprintln!("inject: error: {e:#}");
                }
                supervise_to_end(pid, &sigfd)?
            }
        },
        None => supervise_to_end(pid, &sigfd)?,
    };
    Ok(exit_code(status))
}

fn exec_error(program: &str, e: std::io::Error) -> anyhow::Error {
    anyhow!("cannot run {program}: {e}")
}

/// Starts the program in its own process group, in the terminal's foreground when we were,
/// so that keyboard signals reach it once (not once from the terminal and once from us).
fn spawn(program: &str, args: &[String], trace: bool) -> std::io::Result<i32> {
    // SAFETY: getpgrp/tcgetpgrp only read state.
    let foreground = unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() };
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::setpgid(0, 0);
            if foreground {
                // A background group may take the terminal only with SIGTTOU ignored.
                let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, libc::getpid());
                libc::signal(libc::SIGTTOU, old);
            }
            if trace && libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A pre_exec error comes back as the spawn's error (its errno only).
    Ok(cmd.spawn()?.id() as i32)
}

/// Whether exec(2) of `program` would be allowed, as far as we can tell without running it.
fn program_exists_and_runs(program: &str) -> bool {
    let path = crate::target::resolve(program);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: access(2) with a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// The child ended before we could instrument it: its wait status.
struct ChildGone(i32);

/// The traced child stops at exec with SIGTRAP; turn that into a SIGSTOP group-stop
/// without ptrace, which `install` then attaches to like any stopped process.
fn stop_after_exec(pid: i32) -> Result<(), ChildGone> {
    let mut status = 0;
    // SAFETY: waitpid/kill/ptrace on our own traced child.
    unsafe {
        if libc::waitpid(pid, &mut status, libc::__WALL) != pid || !libc::WIFSTOPPED(status) {
            return Err(ChildGone(status));
        }
        libc::kill(pid, libc::SIGSTOP);
        libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
        // The pending SIGSTOP is taken before the first instruction runs.
        loop {
            let r = libc::waitpid(pid, &mut status, libc::WUNTRACED);
            if r == pid && libc::WIFSTOPPED(status) {
                return Ok(());
            }
            if r == pid || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)) {
                return Err(ChildGone(status));
            }
        }
    }
}

fn instrument(pid: i32, args: &RunArgs) -> Result<Option<run::Tracing>> {
    if args.funcs.is_empty() && args.no_libs {
        bail!("nothing to probe: --no-libs and no --func PATTERN (or INJECT_FUNCS)");
    }
    run::start(pid, args, run::Mode::Launch)
}

/// [`supervise`] without a deadline: the program's wait status.
fn supervise_to_end(pid: i32, sigfd: &SignalFd) -> Result<i32> {
    supervise(pid, sigfd, None)?.context("supervision ended before the program")
}

/// Forwards signals to the program and reaps orphans until it exits (its wait status), or
/// until `deadline` (None).
fn supervise(pid: i32, sigfd: &SignalFd, deadline: Option<Instant>) -> Result<Option<i32>> {
    loop {
        // Reap first: the program may have exited before we started waiting.
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) on any child: the program, or orphans given to PID 1.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r == pid {
                return Ok(Some(status));
            }
            if r <= 0 {
                break;
            }
        }
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let timeout = PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1).unwrap_or(PollTimeout::MAX);
            match poll(&mut [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)], timeout) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e).context("poll"),
            }
        }
        match sigfd.read_signal() {
            Ok(Some(info)) => {
                let sig = info.ssi_signo as i32;
                if sig != libc::SIGCHLD {
                    // SAFETY: kill(2) on our own child.
                    unsafe { libc::kill(pid, sig) };
                }
            }
            Ok(None) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("reading signals"),
        }
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: i32) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status)) as u8
    } else {
        1
    }
}
