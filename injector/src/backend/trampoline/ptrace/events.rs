//! Letting threads run and stopping them again: waiting for stops, and what each ptrace
//! event (clone, exec, group-stop, signal delivery, exit) means for the session.

use super::*;

impl Session {
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
    pub(super) fn stop_all(&mut self, deadline: Instant) -> Result<(), SessionError> {
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
    pub(super) fn collect_stops(&mut self, deadline: Instant) -> Result<(), SessionError> {
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
    pub(super) fn poll_until(
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
    pub(super) fn wait_thread(&mut self, tid: i32, deadline: Instant) -> Result<WaitEvent, SessionError> {
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

    pub(super) fn set_state(&mut self, tid: i32, state: State) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = state;
        }
    }

    /// Resumes a thread that reported a stop we do not want to keep; ESRCH (killed) leaves
    /// it to be reaped by the next poll.
    pub(super) fn resume_now(&mut self, tid: i32, sig: i32) -> Result<(), SessionError> {
        self.set_state(tid, State::Running);
        match sys::cont(tid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(SessionError::Os { tid, op: "PTRACE_CONT", source }),
        }
    }

    /// Handles one event of thread `tid`.
    pub(super) fn handle(&mut self, tid: i32, ev: WaitEvent, phase: Phase) -> Result<(), SessionError> {
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

    pub(super) fn note_event_stop(&mut self, tid: i32, sig: i32, event: i32, phase: Phase) -> Result<(), SessionError> {
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
}

/// Polls back off: poll again at once a few times (stops usually arrive within
/// microseconds), then sleep from 10 µs doubling up to 1 ms. Never `sched_yield`: with busy
/// target threads on our CPU it hands them a whole time slice.
pub(super) fn backoff(idle_rounds: u32, left: Duration) {
    if idle_rounds > 4 {
        let us = 10u64 << (idle_rounds - 5).min(7);
        std::thread::sleep(Duration::from_micros(us.min(1000)).min(left));
    }
}
