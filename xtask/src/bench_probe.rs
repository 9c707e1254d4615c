//! Benchmarks of probing itself, each printing numbers measured side by side in one run:
//!
//! - `attach-100`: the stop-the-world pauses to install and remove 100 probes in the HTTP
//!   server fixture (goal: under 10 ms to install).
//! - `call-overhead`: ns per call of a probed `main.add3(a, b, c int) int` in a tight loop
//!   (and, counted with `--stats`, of `main.tick` from two goroutines on two cores):
//!   no probe, inject's trampolines (entry and return, 3 arguments), and a kernel uprobe on
//!   the same entry and return (bpftrace, from Debian), and inject's own uprobe backend
//!   (`--backend uprobe`). Goals: inject ≤ 60 ns added per call, and at least 20× cheaper
//!   than the uprobe.
//! - `collector`: records per second the collector drains and pairs on one core (goal:
//!   5 million).
//! - `drain`: records per second inject takes out of a live target's ring while the target
//!   keeps every core busy writing them, dropping when full and in lossless mode.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use xtask::{Flavor, build_fixture, inject_binary, toolchain};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// `inject` built with the release profile (what the numbers are about).
pub(crate) fn release_inject() -> Result<std::path::PathBuf> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    inject_binary()
}

/// The newest Go of go-versions.toml, installed if needed.
pub(crate) fn newest_go() -> Result<xtask::GoToolchain> {
    let v = xtask::go_versions()?;
    toolchain(v.last().context("no Go versions")?)
}

/// Starts a fixture and waits for READY; returns the child and its stdout lines.
fn start(exe: &Path, args: &[&str]) -> Result<(Child, std::io::Lines<BufReader<std::process::ChildStdout>>)> {
    let mut child = Command::new(exe).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    loop {
        match lines.next().transpose()? {
            Some(l) if l == "READY" => return Ok((child, lines)),
            Some(_) => {}
            None => bail!("{} exited before READY", exe.display()),
        }
    }
}

pub fn attach_100() -> Result<()> {
    let inject = release_inject()?;
    let exe = build_fixture("httpserver", &newest_go()?, Flavor::Default)?;
    let (mut server, _lines) = start(&exe, &[])?;
    let pid = server.id().to_string();
    let result = (|| -> Result<()> {
        let dry = xtask::output(Command::new(&inject).args([
            "--pid",
            &pid,
            "--dry-run",
            "--no-libs",
            "--func",
            "net/http.*",
        ]))?;
        let names: Vec<&str> = dry
            .lines()
            .filter(|l| l.contains(" installed"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .take(100)
            .collect();
        ensure!(names.len() == 100, "only {} installable net/http functions", names.len());
        let summary = xtask::workspace_root().join("target/bench/attach-100.json");
        std::fs::create_dir_all(summary.parent().context("dir")?)?;
        let (mut install, mut prepare, mut remove, mut exits) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for _ in 0..11 {
            let mut c = Command::new(&inject);
            c.args([
                "--pid",
                &pid,
                "--no-libs",
                "--duration",
                "0.1",
                "--output",
                "jsonl",
                "--output-file",
                "/dev/null",
            ]);
            c.arg("--summary-json").arg(&summary);
            for n in &names {
                c.args(["--func", n]);
            }
            xtask::output(&mut c)?;
            let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
            install.push(s["install_pause_ms"].as_f64().context("install_pause_ms")?);
            prepare.push(s["prepare_pause_ms"].as_f64().unwrap_or(f64::NAN));
            remove.push(s["remove_pause_ms"].as_f64().unwrap_or(f64::NAN));
            exits = s["sites"].as_array().map_or(0, |a| a.len());
        }
        println!("attach-100: {exits} functions probed in the HTTP server, 11 runs, median (min..max) ms stopped:");
        for (what, v) in [("install code and redirects", &install), ("map memory", &prepare), ("remove", &remove)] {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            println!("  {what:<28} {:>7.2} ({lo:.2}..{hi:.2})", median(v.clone()));
        }
        let m = median(install);
        println!("{} install pause {m:.2} ms against the 10 ms goal", if m < 10.0 { "PASS" } else { "FAIL" });
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// Runs the args fixture's tight loop; `attach` is called once READY and returns a
/// guard that is dropped when the loop is done.
fn loop_ns(
    exe: &Path,
    n: usize,
    rounds: usize,
    attach: &mut dyn FnMut(u32) -> Result<Option<Child>>,
) -> Result<Vec<f64>> {
    loop_ns_paused(exe, n, rounds, "0s", attach)
}

/// [`loop_ns`] with `pause` between rounds.
fn loop_ns_paused(
    exe: &Path,
    n: usize,
    rounds: usize,
    pause: &str,
    attach: &mut dyn FnMut(u32) -> Result<Option<Child>>,
) -> Result<Vec<f64>> {
    let (mut child, lines) =
        start(exe, &["-wait", "-bench", &n.to_string(), "-rounds", &rounds.to_string(), "-pause", pause])?;
    let guard = attach(child.id())?;
    writeln!(child.stdin.as_mut().context("stdin")?, "go")?;
    let mut out = Vec::new();
    for l in lines {
        let l = l?;
        if let Some(v) = l.strip_prefix("NS_PER_CALL ") {
            out.push(v.trim().parse()?);
        }
    }
    child.wait()?;
    if let Some(mut g) = guard {
        // SIGINT: inject detaches and writes its summary.
        let _ = Command::new("kill").arg("-INT").arg(g.id().to_string()).status();
        let _ = g.wait();
    }
    ensure!(out.len() == rounds, "got {} rounds", out.len());
    Ok(out)
}

pub(crate) fn ensure_bpftrace() -> Result<()> {
    if Command::new("bpftrace").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: apt-get install bpftrace");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "bpftrace"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    ensure!(ok.success(), "installing bpftrace failed");
    Ok(())
}

/// `call-overhead`: what a probed call costs, three ways, each beside a kernel uprobe:
/// - recorded on a warm ring: every record written (0 dropped, checked), slots already
///   mapped in (rounds after the first, with pauses for the collector to catch up);
/// - the first lap of a fresh ring: the same, in the round that first touches each page;
/// - the drop path: a ring of 64 slots, almost every record dropped (labelled so).
pub fn call_overhead() -> Result<()> {
    let inject = release_inject()?;
    ensure_bpftrace()?;
    let exe = build_fixture("args", &newest_go()?, Flavor::Default)?;
    // Per round: 100k calls = 200k records, which a ring of 2^20 slots holds in any sub-ring
    // (up to four of them) without wrapping.
    let (n, rounds, pause) = (100_000, 8, "400ms");
    let summary = xtask::workspace_root().join("target/bench/call-overhead.json");
    std::fs::create_dir_all(summary.parent().context("parent")?)?;
    let with_inject = |ring_slots: &str, extra: &[&str]| -> Result<(Vec<f64>, u64, u64)> {
        let v = loop_ns_paused(&exe, n, rounds, pause, &mut |pid| {
            let mut c = Command::new(&inject)
                .args(["--pid", &pid.to_string(), "--func", "main.add3", "--output", "none", "--no-lossless"])
                .args(extra)
                .args(["--ring-slots", ring_slots, "--summary-json"])
                .arg(&summary)
                .stderr(Stdio::piped())
                .spawn()?;
            xtask::wait_for_line(&mut c, false, "inject: probing")?;
            Ok(Some(c))
        })?;
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
        let site = &s["sites"][0];
        let written = site["entries"].as_u64().unwrap_or(0) + site["returns"].as_u64().unwrap_or(0);
        Ok((v, written, s["dropped"].as_u64().unwrap_or(0)))
    };
    let baseline = loop_ns_paused(&exe, n, rounds, pause, &mut |_| Ok(None))?;
    let big = (1u64 << 20).to_string();
    let (recorded, written, dropped) = with_inject(&big, &[])?;
    let (dropping, d_written, d_dropped) = with_inject("64", &[])?;
    // What naming the caller, and walking the stack, add (the same warm ring).
    let (callers, c_written, c_dropped) = with_inject(&big, &["--callers"])?;
    let (stacks, s_written, s_dropped) = with_inject(&big, &["--stack", "8"])?;
    // Counting instead of recording (the summary's counts are the stats counters).
    let (counted, k_counted, _) = with_inject(&big, &["--stats"])?;
    // Debian's bpftrace 0.17 refuses uprobes at an offset inside a function ("compiled
    // without uprobe offset support"), and a uretprobe would crash a Go program (it
    // rewrites return addresses), so the kernel side gets one uprobe, at the entry,
    // reading the three argument registers. Its cost per hit is doubled for the
    // entry+return comparison.
    let script = format!("uprobe:{}:main.add3 {{ @a = sum(reg(\"ax\") + reg(\"bx\") + reg(\"cx\")); }}", exe.display());
    let uprobe = loop_ns(&exe, n / 10, 5, &mut |_pid| {
        let mut c =
            Command::new("bpftrace").args(["-e", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        xtask::wait_for_line(&mut c, true, "Attaching")?;
        // bpftrace prints "Attaching" before the probes are live.
        std::thread::sleep(Duration::from_millis(1500));
        Ok(Some(c))
    })?;
    // inject's own uprobe backend: a uprobe at the entry and one at the RET, both
    // recording (a tenth of the calls, as for bpftrace: each costs microseconds).
    let uprobe_summary = xtask::workspace_root().join("target/bench/call-overhead-uprobe.json");
    let ours = loop_ns(&exe, n / 10, 5, &mut |pid| {
        let mut c = Command::new(&inject)
            .args(["--pid", &pid.to_string(), "--func", "main.add3", "--output", "none", "--backend", "uprobe"])
            .arg("--summary-json")
            .arg(&uprobe_summary)
            .stderr(Stdio::piped())
            .spawn()?;
        xtask::wait_for_line(&mut c, false, "inject: probing")?;
        Ok(Some(c))
    })?;
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&uprobe_summary)?)?;
    let (u_written, u_dropped) = (
        s["sites"][0]["entries"].as_u64().unwrap_or(0) + s["sites"][0]["returns"].as_u64().unwrap_or(0),
        s["dropped"].as_u64().unwrap_or(0),
    );
    let b = median(baseline[1..].to_vec());
    let warm = median(recorded[1..].to_vec()) - b;
    let cold = recorded[0] - baseline[0];
    let drop = median(dropping[1..].to_vec()) - b;
    let up = 2.0 * (median(uprobe) - b);
    let made = 2 * (n * rounds) as u64;
    println!(
        "call-overhead: main.add3(a, b, c int) int in a tight loop, {n} calls per round, {rounds} rounds {pause} apart; \
         ns added per call (entry and return records), medians:"
    );
    println!("  no probe: {b:.2} ns per call");
    println!(
        "  inject, recorded on a warm ring     +{warm:>7.2}   ({written} of {made} records written, {dropped} dropped){}",
        if dropped > 0 { "  [MEASURED WITH DROPS]" } else { "" }
    );
    println!("  inject, first lap of a fresh ring   +{cold:>7.2}   (first round: pages first touched)");
    println!(
        "  inject, drop path (64-slot ring)    +{drop:>7.2}   ({d_written} written, {d_dropped} dropped: MEASURED WITH DROPS)"
    );
    let labelled = |d: u64| if d > 0 { "  [MEASURED WITH DROPS]" } else { "" };
    println!(
        "  inject --callers                    +{:>7.2}   ({c_written} written, {c_dropped} dropped){}",
        median(callers[1..].to_vec()) - b,
        labelled(c_dropped)
    );
    println!(
        "  inject --stack 8 (3 frames here)    +{:>7.2}   ({s_written} written, {s_dropped} dropped){}",
        median(stacks[1..].to_vec()) - b,
        labelled(s_dropped)
    );
    let counted_ns = median(counted[1..].to_vec()) - b;
    println!(
        "  inject --stats (counted, no record) +{counted_ns:>7.2}   ({k_counted} of {made} entries and returns counted)"
    );
    println!(
        "  inject --backend uprobe             +{:>7.2}   ({u_written} written, {u_dropped} dropped){}",
        median(ours) - b,
        labelled(u_dropped)
    );
    println!("  bpftrace uprobe (entry only, x2)    +{up:>7.2}");
    println!(
        "{} a recorded call costs {warm:.1} ns on a warm ring (goal <= 40), {:.0}x less than a uprobe entry+return pair",
        if warm <= 40.0 && dropped == 0 { "PASS" } else { "FAIL" },
        up / warm
    );
    stats_two_cores(&inject, &summary)?;
    Ok(())
}

/// The stats fixture's `main.tick` called from two goroutines on two cores (~20 million
/// calls a second with probes): ns per call without a probe and with `--stats`,
/// alternating rounds, medians; every call counted (against the program's own count).
fn stats_two_cores(inject: &Path, summary: &Path) -> Result<()> {
    let exe = build_fixture("stats", &newest_go()?, Flavor::Default)?;
    let n = 10_000_000u64;
    let round = |probe: bool| -> Result<(f64, Option<u64>)> {
        let (mut child, mut lines) = start(&exe, &["-n", &n.to_string(), "-goroutines", "2", "-naps", "0"])?;
        let mut guard = None;
        if probe {
            let mut c = Command::new(inject)
                .args(["--pid", &child.id().to_string(), "--stats", "--func", "main.tick", "--output", "none"])
                .arg("--summary-json")
                .arg(summary)
                .stderr(Stdio::piped())
                .spawn()?;
            xtask::wait_for_line(&mut c, false, "inject: probing")?;
            guard = Some(c);
        }
        let stdin = child.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "go")?;
        let ns = loop {
            let l = lines.next().transpose()?.context("the fixture ended early")?;
            if let Some(v) = l.strip_prefix("NS_PER_CALL ") {
                break v.trim().parse::<f64>()?;
            }
        };
        let mut counted = None;
        if let Some(mut g) = guard {
            let _ = Command::new("kill").arg("-INT").arg(g.id().to_string()).status();
            g.wait()?;
            let s: serde_json::Value = serde_json::from_slice(&std::fs::read(summary)?)?;
            counted = s["sites"][0]["entries"].as_u64();
        }
        writeln!(child.stdin.as_mut().context("stdin")?, "bye")?;
        child.wait()?;
        Ok((ns, counted))
    };
    let (mut base, mut stats, mut exact) = (Vec::new(), Vec::new(), true);
    for _ in 0..5 {
        base.push(round(false)?.0);
        let (ns, counted) = round(true)?;
        exact &= counted == Some(2 * n);
        stats.push(ns);
    }
    let (b, s) = (median(base), median(stats));
    println!(
        "call-overhead, 2 goroutines on 2 cores calling main.tick (stats fixture), {} calls per round, 5 rounds each, \
         medians:",
        2 * n
    );
    println!("  no probe: {b:.2} ns per call ({:.0} million calls/s)", 2e3 / b);
    println!(
        "  inject --stats +{:.2} ns per call ({:.0} million calls/s), every call counted: {exact}",
        s - b,
        2e3 / s
    );
    println!(
        "{} --stats adds {:.1} ns per call at {:.0} million calls/s over two cores (goal < 25), counts exact",
        if s - b < 25.0 && exact { "PASS" } else { "FAIL" },
        s - b,
        2e3 / s
    );
    Ok(())
}

pub fn collector() -> Result<()> {
    let inject = release_inject()?;
    for extra in [&[][..], &["--format"][..]] {
        let out = xtask::output(Command::new(&inject).arg("bench-collector").args(extra))?;
        print!("{out}");
    }
    Ok(())
}

/// `drain`: the storm fixture's 8 goroutines on GOMAXPROCS=2 call `main.small` and
/// `main.pick` flat out (4 records per loop iteration), so the target takes both cores while
/// inject's collector competes for them. For 3 s attached: records written (taken out by the
/// collector) and dropped per second, by default (a full ring drops) and in lossless mode
/// (a full ring makes the writer wait), and the target's iterations per second against a
/// run without inject. Median of 3 runs each.
pub fn drain() -> Result<()> {
    let inject = release_inject()?;
    let exe = build_fixture("storm", &newest_go()?, Flavor::Default)?;
    let summary = xtask::workspace_root().join("target/bench/drain.json");
    std::fs::create_dir_all(summary.parent().context("parent")?)?;
    let secs = 3.0;
    let storm = |seconds: &str| -> Result<Child> {
        let mut c = Command::new(&exe)
            .args(["-workers", "8", "-seconds", seconds])
            .env("GOMAXPROCS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        xtask::wait_for_line(&mut c, true, "READY")?;
        Ok(c)
    };
    let mut baseline = Vec::new();
    for _ in 0..3 {
        let mut c = Command::new(&exe).args(["-workers", "8", "-seconds", "3"]).env("GOMAXPROCS", "2").output()?;
        let out = String::from_utf8_lossy(&std::mem::take(&mut c.stdout)).to_string();
        let calls: f64 =
            out.lines().find_map(|l| l.strip_prefix("CALLS ")).context("no CALLS line from storm")?.trim().parse()?;
        baseline.push(calls / secs);
    }
    // (written/s, dropped/s, iterations/s, wait timeouts)
    let run = |mode: &str| -> Result<(f64, f64, f64, u64)> {
        let mut target = storm("5")?;
        let st = Command::new(&inject)
            .args(["--pid", &target.id().to_string(), "--func", "main.small", "--func", "main.pick"])
            .args(["--output", "none", mode, "--duration", "3", "--summary-json"])
            .arg(&summary)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        target.wait()?;
        ensure!(st.success(), "inject {mode} exited {st}");
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
        let written: u64 = s["sites"]
            .as_array()
            .context("sites")?
            .iter()
            .map(|x| x["entries"].as_u64().unwrap_or(0) + x["returns"].as_u64().unwrap_or(0))
            .sum();
        let dropped = s["dropped"].as_u64().unwrap_or(0);
        let iters = (written + dropped) as f64 / 4.0 / secs;
        Ok((written as f64 / secs, dropped as f64 / secs, iters, s["wait_timeouts"].as_u64().unwrap_or(0)))
    };
    let mut rows = Vec::new();
    for mode in ["--no-lossless", "--lossless"] {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(run(mode)?);
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        rows.push((mode, v[1]));
    }
    let b = median(baseline);
    println!(
        "drain: storm, 8 goroutines on GOMAXPROCS=2 calling main.small and main.pick flat out (both cores busy), \
         {secs} s attached, median of 3:"
    );
    println!("  no probe                      {:>12.0} iterations/s", b);
    for (mode, (w, d, it, timeouts)) in rows {
        println!(
            "  inject {mode:<14}        {it:>12.0} iterations/s ({:.2}x)  drained {w:>11.0} records/s  dropped {d:>11.0}/s{}{}",
            it / b,
            if timeouts > 0 { format!("  ({timeouts} waits timed out)") } else { String::new() },
            if d > 0.0 { "  [MEASURED WITH DROPS]" } else { "" }
        );
    }
    Ok(())
}

/// Milliseconds from spawning `cmd` until it prints READY, then stops it with SIGTERM.
fn ms_to_ready(cmd: &mut Command) -> Result<f64> {
    let t0 = std::time::Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    loop {
        match lines.next().transpose()? {
            Some(l) if l == "READY" => break,
            Some(_) => {}
            None => bail!("exited before READY"),
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    // SIGTERM: the server shuts down gracefully (through inject, which forwards it).
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let st = child.wait()?;
    ensure!(st.success(), "exit {st}");
    Ok(ms)
}

/// `launch`: start-up delay of `inject -- server` with 20 probes, against the server alone
/// (time until it prints READY, having served its own warm-up request).
pub fn launch() -> Result<()> {
    let inject = release_inject()?;
    let exe = build_fixture("httpserver", &newest_go()?, Flavor::Default)?;
    let dry =
        xtask::output(Command::new(&inject).args(["--dry-run", "--no-libs", "--func", "net/http.*", "--"]).arg(&exe))?;
    let names: Vec<String> = dry
        .lines()
        .filter(|l| l.contains(" would install: entry and"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .take(20)
        .collect();
    ensure!(names.len() == 20, "only {} installable net/http functions", names.len());
    let probed = |output: &str| {
        let mut c = Command::new(&inject);
        for n in &names {
            c.args(["--func", n]);
        }
        // A closed port: the exporter starts, nothing waits for it.
        c.args(["--no-libs", "--output", output]).env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9");
        c.arg("--").arg(&exe);
        c
    };
    let (mut base, mut none, mut otlp) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..11 {
        base.push(ms_to_ready(&mut Command::new(&exe))?);
        none.push(ms_to_ready(&mut probed("none"))?);
        otlp.push(ms_to_ready(&mut probed("otlp"))?);
    }
    let b = median(base);
    println!("launch: ms from exec to READY (the server has served its own first request), 20 probes, median of 11:");
    println!("  server alone                 {b:>7.2}");
    let mut worst: f64 = 0.0;
    for (what, v) in [("inject --output none --", none), ("inject (OTLP) --", otlp)] {
        let m = median(v);
        worst = worst.max(m - b);
        println!("  {what:<28} {m:>7.2}  (+{:.2})", m - b);
    }
    println!(
        "{} worst added start-up delay {worst:.2} ms against the 50 ms goal",
        if worst < 50.0 { "PASS" } else { "FAIL" }
    );
    Ok(())
}
