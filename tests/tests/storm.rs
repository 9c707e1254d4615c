//! Signals on every patched and trampoline PC. The Go runtime looks up the PC a signal
//! interrupted: SIGPROF unwinds from it, and SIGURG (async preemption, which forced GCs
//! request for every running goroutine) checks whether it is a safe point. A PC whose
//! tables do not cover it makes the runtime throw, killing the target. This test keeps
//! functions of every exit shape hot under a high-rate CPU profile, forced GCs, stack
//! growth and a SIGURG storm from outside, attaches and detaches repeatedly, and fails on
//! any fatal error; the profile counts how often a signal actually landed on our code.
//!
//! A hot jump retires together with its neighbours, so a timer signal rarely interrupts
//! exactly there. So every thread also gets hardware breakpoints (ptrace) on the patched
//! jumps and on the trampolines they lead to, and at each hit is handed a SIGPROF or a
//! SIGURG right there: the runtime then looks up exactly those PCs, many times each.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::{require_ptrace, scratch, start_fixture, start_inject, text_changes, text_differs_from_file};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const MINUTE: Duration = Duration::from_secs(60);
const CYCLES: usize = 6;
/// `main.mix` is a leaf whose entry jump covers an instruction a goroutine can be parked at:
/// installed only once none is (the SIGURG storm parks them there all the time).
const PROBED: [&str; 6] = ["main.small", "main.wrap", "main.big", "main.pick", "main.depth", "main.mix"];

#[test]
fn signal_storm_on_every_exit_shape() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie] {
            storm(&tc, flavor)?;
        }
    }
    Ok(())
}

fn storm(tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("storm", tc, flavor)?;
    let profile = scratch(&format!("storm-{}-{}.prof", tc.version, flavor.name()));
    let profile_arg = profile.display().to_string();
    let mut target =
        start_fixture(&exe, &["-workers", "3", "-cpuprofile", &profile_arg, "-hz", "2000"], &[("GOMAXPROCS", "4")])?;
    let pid = target.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let storm = tests::sigurg_storm(pid, Duration::from_micros(100), stop.clone(), sent.clone());
    let stop_storm = stop.clone();

    let mut jumps: HashSet<u64> = HashSet::new();
    let mut punned = HashSet::new();
    let mut calls = 0;
    // Looks at install that found a goroutine parked where main.mix's entry jump goes.
    let mut parked_waits = 0;
    let mut stepped = Stepped::default();
    let result = (|| -> Result<()> {
        for cycle in 0..CYCLES {
            let summary = scratch(&format!("storm-summary-{cycle}"));
            let mut args = vec!["--pid".to_string(), pid.to_string(), "--output".into(), "none".into()];
            for f in PROBED {
                args.extend(["--func".into(), f.into()]);
            }
            args.extend(["--duration".into(), "1".into(), "--summary-json".into(), summary.display().to_string()]);
            let mut inject = start_inject(&args, false)?;
            ensure!(
                inject.wait(MINUTE)?.success(),
                "cycle {cycle}: inject failed:\n{}\ntarget:\n{}",
                inject.transcript(),
                target.transcript()
            );
            let s = tests::schema::read_summary(&summary)?;
            let _ = std::fs::remove_file(&summary);
            ensure!(s["stop"] == "duration", "cycle {cycle}: stopped by {} (the target died?):\n{s}", s["stop"]);
            parked_waits += s["install_pause"]["parked"].as_u64().context("install_pause.parked")?;
            for site in s["sites"].as_array().context("sites")? {
                let name = site["name"].as_str().unwrap_or_default();
                ensure!(
                    site["verdict"].as_str().is_some_and(|v| v.starts_with("installed: entry and")),
                    "{name}: {}",
                    site["verdict"]
                );
                calls += site["entries"].as_u64().unwrap_or(0);
                for j in site["jumps"].as_array().context("jumps")? {
                    jumps.insert(j["at"].as_u64().context("at")?);
                    if !j["pinned"].is_null() {
                        punned.insert(j["at"].as_u64().context("at")?);
                    }
                }
            }
            ensure!(text_differs_from_file(pid, &exe)?.is_none(), "cycle {cycle}: text differs after detach");
        }
        // Last, signals delivered exactly on our PCs, with the probes in (the storm would
        // only interrupt the stepping).
        stop_storm.store(true, Ordering::Relaxed);
        let mut args = vec!["--pid".to_string(), pid.to_string(), "--output".into(), "none".into()];
        for f in PROBED {
            args.extend(["--func".into(), f.into()]);
        }
        let mut inject = start_inject(&args, true)?;
        // Every jump written, as the live text shows it (whatever inject reports).
        let written: HashSet<u64> = text_changes(pid, &exe)?
            .into_iter()
            .filter(|(_, live)| matches!(live.first(), Some(0xe9 | 0xeb)))
            .map(|(at, _)| at)
            .collect();
        ensure!(written == jumps, "the live text has jumps at {written:x?}, the summaries name {jumps:x?}");
        let hits = signal_on_our_pcs(pid, &written, Duration::from_secs(4));
        inject.signal(libc::SIGINT);
        ensure!(
            inject.wait(MINUTE)?.success(),
            "inject failed:
{}
target:
{}",
            inject.transcript(),
            target.transcript()
        );
        stepped = hits?;
        ensure!(text_differs_from_file(pid, &exe)?.is_none(), "text differs after the last detach");
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = storm.join();
    if let Err(e) = result {
        // A dying target prints why before it goes; a live one is killed after the wait.
        target.drain(Duration::from_secs(2));
        let status = target.wait(Duration::from_secs(5)).map_or_else(|e| e.to_string(), |s| s.to_string());
        let e = e.context(format!("target: {status}"));
        return Err(e.context(format!(
            "Go {} {}; the target said:
{}",
            tc.version,
            flavor.name(),
            target.transcript()
        )));
    }
    target.send_line("stop")?;
    let status = target.wait(MINUTE)?;
    let transcript = target.transcript();
    ensure!(
        status.success() && !transcript.contains("fatal error") && !transcript.contains("SIGSEGV"),
        "Go {} {}: the target died ({status}):\n{transcript}",
        tc.version,
        flavor.name()
    );
    let (samples, in_trampolines, on_jumps) = profile_hits(tc, &exe, &profile, &jumps)?;
    eprintln!(
        "Go {} {}: {CYCLES} attaches, {calls} calls probed, {} SIGURG sent; {samples} SIGPROF samples, {in_trampolines} \
         in trampolines, {on_jumps} on patched jumps ({} jumps, {} punned); {parked_waits} installs waited for a \
         goroutine parked where a jump goes",
        tc.version,
        flavor.name(),
        sent.load(Ordering::Relaxed),
        jumps.len(),
        punned.len()
    );
    eprintln!("Go {} {}: signals delivered on our PCs: {stepped:?}", tc.version, flavor.name());
    ensure!(!punned.is_empty(), "no punned exit among {PROBED:?}: the test no longer covers that shape");
    ensure!(
        punned.iter().all(|p| stepped.per_pc.get(p).is_some_and(|&n| n >= 10)),
        "punned jumps {punned:x?} were not hit: {stepped:?}"
    );
    ensure!(
        stepped.on_jumps >= 100 && stepped.in_trampolines >= 100,
        "too few signals delivered on our PCs to mean anything: {stepped:?}"
    );
    ensure!(calls > 10_000, "too few probed calls ({calls}) to mean anything");
    ensure!(in_trampolines >= 50, "only {in_trampolines} SIGPROF samples landed in trampolines: the storm missed");
    let _ = std::fs::remove_file(&profile);
    Ok(())
}

/// Counts the profile's samples: all, those whose innermost frame is a trampoline
/// (`runtime._ExternalCode`: a PC in no Go function), and those on a patched jump.
fn profile_hits(tc: &GoToolchain, exe: &Path, profile: &Path, jumps: &HashSet<u64>) -> Result<(u64, u64, u64)> {
    let out = tc.command().args(["tool", "pprof", "-raw"]).arg(exe).arg(profile).output()?;
    ensure!(out.status.success(), "go tool pprof: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    // Locations: "     7: 0x4cf0ab M=1 main.pick ..."; samples: "   count   value: 7 3 1".
    let mut external = HashSet::new();
    let mut on_jump = HashSet::new();
    let mut section = "";
    let mut samples = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        match t {
            "Samples:" | "Locations" | "Mappings" => section = t,
            _ if section == "Locations" => {
                let mut f = t.split_whitespace();
                let (Some(id), Some(addr)) = (f.next(), f.next()) else { continue };
                let id: u64 = id.trim_end_matches(':').parse().unwrap_or(0);
                let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap_or(0);
                if t.contains("runtime._ExternalCode") {
                    external.insert(id);
                }
                if jumps.contains(&addr) || jumps.contains(&addr.wrapping_sub(1)) {
                    on_jump.insert(id);
                }
            }
            _ if section == "Samples:" => {
                if let Some((counts, stack)) = t.split_once(':')
                    && let Some(n) = counts.split_whitespace().next().and_then(|n| n.parse::<u64>().ok())
                    && let Some(leaf) = stack.split_whitespace().next().and_then(|l| l.parse::<u64>().ok())
                {
                    samples.push((n, leaf));
                }
            }
            _ => {}
        }
    }
    let total = samples.iter().map(|s| s.0).sum();
    let count = |set: &HashSet<u64>| samples.iter().filter(|s| set.contains(&s.1)).map(|s| s.0).sum();
    Ok((total, count(&external), count(&on_jump)))
}

/// Where the signals delivered on our PCs landed.
#[derive(Debug, Default)]
struct Stepped {
    /// SIGPROF/SIGURG delivered with the PC on a patched jump.
    on_jumps: u64,
    /// Delivered with the PC at a trampoline's first instruction (outside every Go
    /// function).
    in_trampolines: u64,
    /// Hits per PC.
    per_pc: std::collections::BTreeMap<u64, u64>,
}

fn ptrace(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> Result<()> {
    // SAFETY: ptrace requests whose addr/data are integers, not pointers.
    let r = unsafe { libc::ptrace(req, tid, addr, data) };
    ensure!(r != -1, "ptrace {req} on {tid}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Offset of `u_debugreg` in the x86-64 `struct user` (PTRACE_POKEUSER).
const DEBUGREG: usize = 848;

/// Sets the thread's hardware execution breakpoints (up to four PCs; none clears them).
fn set_breakpoints(tid: i32, pcs: &[u64]) -> Result<()> {
    ptrace(libc::PTRACE_POKEUSER, tid, DEBUGREG + 7 * 8, 0)?;
    let mut dr7 = 0usize;
    for (i, &pc) in pcs.iter().take(4).enumerate() {
        ptrace(libc::PTRACE_POKEUSER, tid, DEBUGREG + i * 8, pc as usize)?;
        // Local enable; R/W 00 and LEN 00: break on executing the instruction at pc.
        dr7 |= 1 << (2 * i);
    }
    ptrace(libc::PTRACE_POKEUSER, tid, DEBUGREG + 7 * 8, dr7)
}

/// A stop of a traced thread: the signal it stopped with (SIGTRAP for a breakpoint, 0
/// for an interrupt), None while it runs, or an error when it ended.
fn poll_stop(tid: i32) -> Result<Option<i32>> {
    let mut st = 0;
    // SAFETY: waitpid on our tracee, writing an int.
    let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL | libc::WNOHANG) };
    if r == 0 {
        return Ok(None);
    }
    ensure!(r == tid && libc::WIFSTOPPED(st), "thread {tid} ended");
    Ok(Some(if st >> 16 != 0 { 0 } else { libc::WSTOPSIG(st) }))
}

/// The signal to pass on after a stop with `sig`: none for our breakpoints' SIGTRAP.
fn not_ours(sig: i32) -> usize {
    if sig == libc::SIGTRAP { 0 } else { sig as usize }
}

fn wait_stopped(tid: i32) -> Result<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(sig) = poll_stop(tid)? {
            return Ok(sig);
        }
        ensure!(std::time::Instant::now() < deadline, "thread {tid} did not stop");
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Traces every thread of `pid` with hardware breakpoints on the patched jumps and on
/// the trampolines they lead to (four at a time), and at every hit lets the thread take a
/// SIGPROF or a SIGURG right there, for `time`.
fn signal_on_our_pcs(pid: i32, jumps: &HashSet<u64>, time: Duration) -> Result<Stepped> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut pcs: Vec<(u64, bool)> = Vec::new();
    for &at in jumps {
        let mut j = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut j, at)?;
        match j[0] {
            0xe9 => {
                let tramp = (at + 5).wrapping_add(i32::from_le_bytes([j[1], j[2], j[3], j[4]]) as i64 as u64);
                pcs.extend([(at, true), (tramp, false)]);
            }
            // A short jump (earlier versions put a stub in the padding it reaches).
            0xeb => pcs.push((at, true)),
            b => anyhow::bail!("no jump at {at:#x} while the probes are in ({b:#04x})"),
        }
    }
    pcs.sort_unstable();
    // Not the main thread: we are also the process's parent, and waiting for the leader
    // would collect the process's own exit.
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    let mut traced = Vec::new();
    for &t in &tids {
        if ptrace(libc::PTRACE_SEIZE, t, 0, 0).is_ok() {
            traced.push(t);
        }
    }
    let mut out = Stepped::default();
    let result = (|| -> Result<()> {
        let deadline = std::time::Instant::now() + time;
        let mut flip = false;
        for group in pcs.chunks(4).cycle() {
            if std::time::Instant::now() >= deadline {
                break;
            }
            // Stop everyone, arm this group, go.
            for &t in &traced {
                ptrace(libc::PTRACE_INTERRUPT, t, 0, 0)?;
            }
            for &t in &traced {
                // A breakpoint or signal-delivery stop may come first: step past it (passing
                // a signal on), then take the interrupt.
                while let sig @ 1.. = wait_stopped(t)? {
                    ptrace(libc::PTRACE_CONT, t, 0, not_ours(sig))?;
                }
                let addrs: Vec<u64> = group.iter().map(|g| g.0).collect();
                set_breakpoints(t, &addrs)?;
                ptrace(libc::PTRACE_CONT, t, 0, 0)?;
            }
            let until = (std::time::Instant::now() + Duration::from_millis(200)).min(deadline);
            while std::time::Instant::now() < until {
                let mut any = false;
                for &t in &traced {
                    let Some(sig) = poll_stop(t)? else { continue };
                    any = true;
                    let mut deliver = sig;
                    if sig == libc::SIGTRAP {
                        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                        // SAFETY: GETREGS fills one user_regs_struct.
                        unsafe { libc::ptrace(libc::PTRACE_GETREGS, t, 0usize, &mut regs as *mut _) };
                        if let Some(&(pc, is_jump)) = group.iter().find(|g| g.0 == regs.rip) {
                            *out.per_pc.entry(pc).or_insert(0) += 1;
                            if is_jump {
                                out.on_jumps += 1;
                            } else {
                                out.in_trampolines += 1;
                            }
                            flip = !flip;
                            deliver = if flip { libc::SIGPROF } else { libc::SIGURG };
                        } else {
                            deliver = 0;
                        }
                    }
                    ptrace(libc::PTRACE_CONT, t, 0, deliver as usize)?;
                }
                if !any {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
        Ok(())
    })();
    // Disarm and let go, whatever happened. A breakpoint may have fired just as the
    // thread stopped, leaving its SIGTRAP pending: run it once more after disarming, so
    // that the SIGTRAP is reported (and swallowed) here rather than delivered to Go.
    let stop_and_drain = |t: i32| -> Result<()> {
        ptrace(libc::PTRACE_INTERRUPT, t, 0, 0)?;
        while let sig @ 1.. = wait_stopped(t)? {
            ptrace(libc::PTRACE_CONT, t, 0, not_ours(sig))?;
        }
        Ok(())
    };
    for &t in &traced {
        let _ = stop_and_drain(t).and_then(|()| set_breakpoints(t, &[]));
        let _ = ptrace(libc::PTRACE_CONT, t, 0, 0);
    }
    std::thread::sleep(Duration::from_millis(2));
    for &t in &traced {
        let _ = stop_and_drain(t);
        let _ = ptrace(libc::PTRACE_DETACH, t, 0, 0);
    }
    result.map(|()| out)
}
