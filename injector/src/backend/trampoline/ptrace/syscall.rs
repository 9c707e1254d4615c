//! System calls run inside a stopped thread of the target, from a landing pad (see
//! [`super::pad`] and the parent module's docs on surviving our death).

use super::*;

impl Session {
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
    pub(super) fn run_syscall(&mut self, tid: i32, pad: u64, nr: i64) -> Result<i64, SessionError> {
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
    pub(super) fn restore_pads(&mut self) -> Result<(), SessionError> {
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
}

/// How a syscall-enter or -exit stop reports (PTRACE_O_TRACESYSGOOD).
pub(super) const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// A test hook: with `INJECT_TEST_STALL=NAME:POINT` (POINT one of `pad`, `enter`, `exit`)
/// the first injected syscall NAME (e.g. `mmap`, `munmap`) stops there for a minute after
/// saying so on stderr, so that a test can kill inject at exactly that moment.
pub(super) fn test_stall(nr: i64, point: &str) {
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(spec) = SPEC.get_or_init(|| std::env::var("INJECT_TEST_STALL").ok()) else { return };
    if *spec == format!("{}:{point}", syscall_name(nr)) && !DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("inject: test stall in {spec}");
        std::thread::sleep(Duration::from_secs(60));
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
