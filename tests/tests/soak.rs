//! Attach and detach, over and over, to programs under every kind of stress inject must
//! survive: a hot loop over 8 goroutines on a full ring, forced GCs and async preemption,
//! deep recursion (stack growth), a CPU profile (SIGPROF) and a SIGURG storm from outside
//! (the `storm` fixture), and an HTTP server under load. Each cycle ends a random way:
//! SIGINT, `--duration`, or SIGKILL of inject with its probes in (the next inject must put
//! them back). Fails on any target death, `fatal error`, failed request, or text that is
//! not byte-identical to the executable after a detach.
//!
//! `soak_short` (50 cycles) runs in the default suite; `cargo xtask soak [CYCLES]` runs
//! `soak_long` on the oldest and newest Go, default and PIE builds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tests::{Proc, require_ptrace, scratch, start_fixture, start_inject, text_differs_from_file};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const MINUTE: Duration = Duration::from_secs(60);
const STORM_FUNCS: [&str; 5] = ["main.small", "main.wrap", "main.big", "main.pick", "main.depth"];

/// A tiny xorshift: the cycle plan must differ between runs, and be printable.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[derive(Debug, Default)]
struct Report {
    cycles: usize,
    killed: usize,
    recovered: usize,
    requests: String,
}

#[test]
fn soak_short() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let r = soak(&tc, Flavor::Default, 50)?;
    eprintln!("soak Go {} default: {r:?}", tc.version);
    Ok(())
}

/// `cargo xtask soak [CYCLES]` (INJECT_SOAK_CYCLES, default 1000 per configuration).
#[test]
#[ignore = "long: run by cargo xtask soak"]
fn soak_long() -> Result<()> {
    require_ptrace()?;
    let cycles: usize = std::env::var("INJECT_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let mut rows = Vec::new();
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie] {
            let started = Instant::now();
            let r = soak(&tc, flavor, cycles)?;
            rows.push(format!(
                "| {} | {} | {} | {} | 0 | 0 | 0 | {} | {:.0} s |",
                tc.version,
                flavor.name(),
                r.cycles,
                r.killed,
                r.requests,
                started.elapsed().as_secs_f64()
            ));
        }
    }
    println!(
        "| Go | build | cycles | inject SIGKILLed | target deaths | failed requests | text not restored | HTTP load | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn inject_args(pid: i32, funcs: &[&str], extra: &[String]) -> Vec<String> {
    let mut a = vec!["--pid".to_string(), pid.to_string(), "--output".into(), "none".into()];
    for f in funcs {
        a.extend(["--func".to_string(), f.to_string()]);
    }
    a.extend(extra.iter().cloned());
    a
}

fn soak(tc: &GoToolchain, flavor: Flavor, cycles: usize) -> Result<Report> {
    let storm_exe = build_fixture("storm", tc, flavor)?;
    let http_exe = build_fixture("httpserver", tc, flavor)?;
    let load_exe = build_fixture("load", tc, Flavor::Default)?;
    let profile = scratch(&format!("soak-{}-{}.prof", tc.version, flavor.name()));
    let mut storm = start_fixture(
        &storm_exe,
        &["-workers", "8", "-cpuprofile", &profile.display().to_string(), "-hz", "1000"],
        &[],
    )?;
    let mut http = start_fixture(&http_exe, &[], &[])?;
    let url = format!("http://{}/hello", http.value("LISTEN ").context("LISTEN")?);
    let load = std::process::Command::new(&load_exe)
        .args(["-url", &url, "-duration", "36000s", "-c", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stop = Arc::new(AtomicBool::new(false));
    let urg = tests::sigurg_storm(storm.pid(), Duration::from_micros(500), stop.clone(), Default::default());
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let mut report = Report::default();
    // Whether the last inject of each target was killed (its probes are still in).
    let mut left = [false; 2];
    let result = (|| -> Result<()> {
        for cycle in 0..cycles {
            let how = rng.next(10);
            let delay = Duration::from_millis(30 + rng.next(200));
            let mut injects: Vec<Proc> = Vec::new();
            for (i, (target, funcs, extra)) in [
                (&storm, &STORM_FUNCS[..], vec!["--ring-slots".to_string(), "4096".into()]),
                (&http, &[][..], Vec::new()),
            ]
            .into_iter()
            .enumerate()
            {
                let mut extra = extra;
                if how < 4 {
                    extra.extend(["--duration".to_string(), format!("{:.3}", delay.as_secs_f64())]);
                }
                let inj = start_inject(&inject_args(target.pid(), funcs, &extra), true)?;
                if left[i] {
                    ensure!(
                        inj.transcript().contains("removed the probes a previous inject"),
                        "cycle {cycle}: the killed inject's probes were not removed:\n{}",
                        inj.transcript()
                    );
                    report.recovered += 1;
                    left[i] = false;
                }
                injects.push(inj);
            }
            if how >= 4 {
                std::thread::sleep(delay);
            }
            for (i, mut inj) in injects.into_iter().enumerate() {
                match how {
                    // --duration: it stops by itself.
                    0..=3 => {}
                    4..=7 => inj.signal(libc::SIGINT),
                    _ => inj.signal(libc::SIGKILL),
                }
                let st = inj.wait(MINUTE)?;
                if how >= 8 {
                    left[i] = true;
                    continue;
                }
                ensure!(st.success(), "cycle {cycle} (seed {seed}): inject failed: {st}\n{}", inj.transcript());
            }
            if how >= 8 {
                report.killed += 1;
            }
            for (i, (p, exe)) in [(&mut storm, &storm_exe), (&mut http, &http_exe)].into_iter().enumerate() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    p.drain(Duration::from_secs(2));
                    bail!("cycle {cycle} (seed {seed}): a target died: {st}\n{}", p.transcript());
                }
                if !left[i]
                    && let Some(at) = text_differs_from_file(p.pid(), exe)?
                {
                    bail!("cycle {cycle} (seed {seed}): code at {at:#x} not restored after detach");
                }
            }
            report.cycles += 1;
        }
        // Whatever the last killed injects left.
        for (i, (p, exe)) in [(&storm, &storm_exe), (&http, &http_exe)].into_iter().enumerate() {
            if left[i] {
                let mut d = start_inject(&["detach".into(), "--pid".into(), p.pid().to_string()], false)?;
                ensure!(d.wait(MINUTE)?.success(), "inject detach failed:\n{}", d.transcript());
                report.recovered += 1;
            }
            if let Some(at) = text_differs_from_file(p.pid(), exe)? {
                bail!("code at {at:#x} not restored at the end");
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = urg.join();
    tests::send_signal(load.id() as i32, libc::SIGTERM);
    let out = load.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("RESULT ")).unwrap_or("no RESULT").to_string();
    let _ = storm.send_line("stop");
    let storm_st = storm.wait(MINUTE);
    http.signal(libc::SIGTERM);
    let http_st = http.wait(MINUTE);
    let _ = std::fs::remove_file(&profile);
    result?;
    let storm_st = storm_st?;
    let said = storm.transcript();
    ensure!(
        storm_st.success() && !said.contains("fatal error") && !said.contains("SIGSEGV"),
        "storm: {storm_st}\n{said}"
    );
    ensure!(http_st?.success(), "httpserver failed:\n{}", http.transcript());
    ensure!(line.contains(" errors=0 ") && line.contains(" unexpected=0 "), "failed requests: {line}");
    report.requests = line.split_whitespace().find(|f| f.starts_with("requests=")).unwrap_or("").to_string();
    Ok(report)
}
