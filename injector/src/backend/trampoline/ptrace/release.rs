//! Letting threads go: handing back every signal the session holds, exactly once, and
//! detaching.

use super::*;

impl Session {
    /// Lets stopped thread `tid` go: resumed (or, in group-stop, listening) or detached,
    /// handing back the signals it holds.
    pub(super) fn release(&mut self, tid: i32, detach: bool) -> Result<(), SessionError> {
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

    /// Lets every thread but `keep` go for good (detached, held signals handed back), so
    /// that slow work in `keep` (unmapping memory) does not stop the world. Landing pads stay
    /// written until the session ends: pick bytes no thread executes.
    pub fn detach_all_but(&mut self, keep: i32) -> Result<(), SessionError> {
        self.stopped(keep)?;
        for tid in self.threads() {
            if tid != keep {
                self.release(tid, true)?;
            }
        }
        Ok(())
    }

    /// Lets every thread go: held signals are handed back, nothing stays traced.
    pub fn detach(mut self) -> Result<(), SessionError> {
        self.release_all()
    }

    pub(super) fn release_all(&mut self) -> Result<(), SessionError> {
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

/// A fault raised by the CPU for the instruction at RIP: it recurs when that instruction runs
/// again, so it is never queued a second time.
pub(super) fn is_fault(info: &libc::siginfo_t) -> bool {
    matches!(info.si_signo, libc::SIGSEGV | libc::SIGBUS | libc::SIGFPE | libc::SIGILL) && info.si_code > 0
}

/// Whether rt_tgsigqueueinfo accepts this siginfo from another process.
pub(super) fn requeues_exactly(info: &libc::siginfo_t) -> bool {
    info.si_code < 0 && info.si_code != libc::SI_TKILL
}
