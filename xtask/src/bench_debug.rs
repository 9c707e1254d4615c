//! `cargo xtask bench debug`: what a debugging session costs the program, side by side.
//!
//! One program (the stats fixture, one goroutine calling `main.tick(x int) int` in a
//! tight loop a given number of times and printing how many calls it made and how long
//! they took) and one probe (that function, entry and return, with its argument) under:
//! nothing; `dlv trace -p PID 'main\.tick$'` (Delve, a ptrace stop per hit, one line
//! printed per hit); bpftrace with a uprobe at the entry and one at the RET (reading the
//! argument and the result); inject recording every call (JSON lines to a file, lossless,
//! and to the ring only, `--output none`); and inject `--stats` (counted in the
//! trampolines, no records). Rounds interleave the six setups; each tool attaches to a
//! fresh process before the loop starts and detaches after it, and what it saw (lines,
//! counters, argument sums) is checked against the calls the program made.
//!
//! Cost: Delve is installed once into ~/.cache/inject/dlv (`go install` from the Go module
//! proxy, ~40 s); then about a minute: Delve's runs are sized by time (a short calibration
//! run, then ~2.5 s of calls per round), the others by call count.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use xtask::{Flavor, GoToolchain, build_fixture};

use crate::bench_export::median;
use crate::bench_probe::{ensure_bpftrace, newest_go, release_inject};

/// The Delve release the bench installs (`go install .../cmd/dlv@DLV_VERSION`).
pub const DLV_VERSION: &str = "v1.27.2";
const ROUNDS: usize = 3;
/// Calls per run: enough for a stable time per call, few enough that every tool's run
/// takes a second or two. Ring-only records: 2 per call, so 200k fit a 2^20-slot ring
/// (any of its sub-rings) without a drop.
const N_BASELINE: u64 = 20_000_000;
const N_STATS: u64 = 20_000_000;
const N_RING: u64 = 100_000;
const N_JSONL: u64 = 200_000;
const N_BPFTRACE: u64 = 100_000;
/// Delve: a calibration run of this many calls, then rounds sized to DLV_WINDOW.
const N_DLV_CALIBRATION: u64 = 50;
const DLV_WINDOW: Duration = Duration::from_millis(2500);
/// A stage that takes longer than this is a hang: the bench ends its processes and fails.
const STAGE: Duration = Duration::from_secs(120);

/// One process of the fixture; killed (by pid) if dropped before it finished.
struct Target {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

/// What the program says it did: calls of main.tick and wall ns per call of its loop.
#[derive(Clone, Copy)]
struct Made {
    calls: u64,
    ns_per_call: f64,
}

impl Target {
    fn start(exe: &Path, n: u64) -> Result<Target> {
        let mut child = Command::new(exe)
            .args(["-n", &n.to_string(), "-goroutines", "1", "-naps", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut t = Target { child, stdin, lines };
        t.line("READY")?;
        Ok(t)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line starting with `prefix` (earlier lines skipped), within STAGE.
    fn line(&mut self, prefix: &str) -> Result<String> {
        let deadline = Instant::now() + STAGE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!("no {prefix:?} line from the fixture in {STAGE:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("the fixture exited before printing {prefix:?}"),
            }
        }
    }

    /// Starts the loop and waits for the program's own count and time.
    fn run(&mut self) -> Result<Made> {
        writeln!(self.stdin, "go")?;
        let counts = self.line("COUNTS ")?;
        let calls =
            counts.split_whitespace().find_map(|kv| kv.strip_prefix("tick=")).context("no tick= in COUNTS")?.parse()?;
        let ns_per_call = self.line("NS_PER_CALL ")?["NS_PER_CALL ".len()..].trim().parse()?;
        Ok(Made { calls, ns_per_call })
    }

    /// Lets the (detached) program exit.
    fn finish(mut self) -> Result<()> {
        writeln!(self.stdin, "bye")?;
        let deadline = Instant::now() + STAGE;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                ensure!(st.success(), "the fixture exited {st}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the fixture did not exit after the loop")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tracer process; SIGINT (it detaches and prints what it has) when stopped, killed
/// if dropped first.
struct Tracer {
    child: Child,
    out: Option<JoinHandle<Vec<String>>>,
}

impl Tracer {
    /// SIGINT, then waits (within STAGE) and returns the lines it printed on the piped
    /// stream after the start.
    fn stop(mut self) -> Result<Vec<String>> {
        let st = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status()?;
        ensure!(st.success(), "kill -INT {} failed", self.child.id());
        let deadline = Instant::now() + STAGE;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            ensure!(Instant::now() < deadline, "the tracer did not exit within {STAGE:?} of SIGINT");
            std::thread::sleep(Duration::from_millis(10));
        };
        ensure!(status.success(), "the tracer exited {status}");
        Ok(self.out.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `stream` until a line starts with `prefix`, then keeps the rest on a thread.
fn after_line(stream: impl std::io::Read + Send + 'static, prefix: &str) -> Result<JoinHandle<Vec<String>>> {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next().transpose()? {
            Some(l) if l.starts_with(prefix) => break,
            Some(_) => {}
            None => bail!("the tracer exited before printing {prefix:?}"),
        }
    }
    Ok(std::thread::spawn(move || lines.map_while(Result::ok).collect()))
}

/// The setups, in the order each round runs them.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Baseline,
    Dlv,
    Bpftrace,
    InjectJsonl,
    InjectRing,
    InjectStats,
}

const SETUPS: [Setup; 6] =
    [Setup::Baseline, Setup::Dlv, Setup::Bpftrace, Setup::InjectJsonl, Setup::InjectRing, Setup::InjectStats];

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Baseline => "no probe",
            Setup::Dlv => "dlv trace",
            Setup::Bpftrace => "bpftrace uprobes entry+RET",
            Setup::InjectJsonl => "inject --output jsonl (file)",
            Setup::InjectRing => "inject --output none (ring)",
            Setup::InjectStats => "inject --stats",
        }
    }
}

/// What one run measured: the program's view, and what the tool saw.
struct Run {
    made: Made,
    entries: u64,
    returns: u64,
    /// Hits a tool says it lost (ring full), or saw with wrong values.
    dropped: u64,
    /// Whether the argument (and result) values seen add up to the calls made.
    values_ok: Option<bool>,
    /// Results the tool printed but could not read.
    unreadable_results: bool,
}

/// Sum of 0..n (main.tick's arguments) and of 3x+1 over them (its results).
fn expected_sums(n: u64) -> (u128, u128) {
    let args = u128::from(n) * u128::from(n.saturating_sub(1)) / 2;
    (args, 3 * args + u128::from(n))
}

struct Bench {
    exe: PathBuf,
    inject: PathBuf,
    dlv: PathBuf,
    ret_symbol: String,
    dir: PathBuf,
}

impl Bench {
    fn run(&self, setup: Setup, n: u64) -> Result<Run> {
        let mut target = Target::start(&self.exe, n)?;
        let pid = target.pid().to_string();
        let run = match setup {
            Setup::Baseline => {
                let made = target.run()?;
                Run { made, entries: 0, returns: 0, dropped: 0, values_ok: None, unreadable_results: false }
            }
            Setup::Dlv => self.dlv(&mut target)?,
            Setup::Bpftrace => self.bpftrace(&mut target)?,
            Setup::InjectJsonl | Setup::InjectRing | Setup::InjectStats => self.inject(setup, &mut target, &pid)?,
        };
        target.finish()?;
        Ok(run)
    }

    /// `dlv trace -p PID`: its trace lines (stderr) go to a file, counted after it exits.
    fn dlv(&self, target: &mut Target) -> Result<Run> {
        let log = self.dir.join("dlv-trace.txt");
        let child = Command::new(&self.dlv)
            .args(["trace", "-p", &target.pid().to_string(), "main\\.tick$"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting dlv")?;
        let mut tracer = Tracer { child, out: None };
        // Delve stops every thread when it attaches and lets them run only once its
        // breakpoints are in, so "go" written once all are traced is read after that.
        wait_traced(target.pid(), &mut tracer)?;
        let made = target.run()?;
        tracer.stop()?;
        let text = std::fs::read_to_string(&log)?;
        let (mut entries, mut returns, mut arg_sum, mut unreadable_results) = (0u64, 0u64, 0u128, false);
        for l in text.lines() {
            if l.starts_with(">> goroutine(") && l.contains(": main.tick =>") {
                returns += 1;
                unreadable_results |= l.contains("unreadable");
            } else if let Some(arg) = l
                .strip_prefix("> goroutine(")
                .and_then(|rest| rest.split_once(": main.tick("))
                .map(|x| x.1.trim_end_matches(')'))
            {
                entries += 1;
                arg_sum += arg.parse::<u128>().unwrap_or(0);
            }
        }
        let values_ok = Some(arg_sum == expected_sums(made.calls).0);
        Ok(Run { made, entries, returns, dropped: 0, values_ok, unreadable_results })
    }

    /// bpftrace: a uprobe at the entry (reads x in AX) and one at the RET (the result in
    /// AX), each counting and summing; the maps are printed when it exits on SIGINT.
    fn bpftrace(&self, target: &mut Target) -> Result<Run> {
        let exe = self.exe.display();
        let script = format!(
            "uprobe:{exe}:main.tick {{ @entries = count(); @args = sum(reg(\"ax\")); }} \
             uprobe:{exe}:{ret} {{ @returns = count(); @results = sum(reg(\"ax\")); }}",
            ret = self.ret_symbol
        );
        let mut child = Command::new("bpftrace")
            .args(["-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        let out = after_line(child.stdout.take().context("stdout")?, "Attaching");
        let tracer = Tracer { child, out: Some(out?) };
        // bpftrace prints "Attaching" before the probes are live.
        std::thread::sleep(Duration::from_millis(1500));
        let made = target.run()?;
        let lines = tracer.stop()?;
        let map = |name: &str| -> u128 {
            lines.iter().find_map(|l| l.strip_prefix(&format!("@{name}: "))?.trim().parse().ok()).unwrap_or(0)
        };
        let (args, results) = expected_sums(made.calls);
        let values_ok = Some(map("args") == args && map("results") == results);
        let (entries, returns) = (map("entries") as u64, map("returns") as u64);
        Ok(Run { made, entries, returns, dropped: 0, values_ok, unreadable_results: false })
    }

    fn inject(&self, setup: Setup, target: &mut Target, pid: &str) -> Result<Run> {
        let summary = self.dir.join("inject-summary.json");
        let jsonl = self.dir.join("inject.jsonl");
        let _ = std::fs::remove_file(&summary);
        let mut c = Command::new(&self.inject);
        c.args(["--pid", pid, "--func", "main.tick", "--summary-json"]).arg(&summary);
        match setup {
            Setup::InjectJsonl => c.args(["--output", "jsonl", "--output-file"]).arg(&jsonl),
            Setup::InjectRing => c.args(["--output", "none", "--no-lossless", "--ring-slots", "1048576"]),
            _ => c.args(["--stats", "--output", "none"]),
        };
        let mut child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let out = after_line(child.stderr.take().context("stderr")?, "inject: probing");
        let tracer = Tracer { child, out: Some(out?) };
        let made = target.run()?;
        tracer.stop()?;
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
        let site = &s["sites"][0];
        let (entries, returns) = (site["entries"].as_u64().unwrap_or(0), site["returns"].as_u64().unwrap_or(0));
        let dropped = s["dropped"].as_u64().unwrap_or(0);
        let mut run = Run { made, entries, returns, dropped, values_ok: None, unreadable_results: false };
        if setup == Setup::InjectJsonl {
            // Every call is one line once it returned: count the lines and add up
            // their argument and result.
            let (mut calls, mut args, mut results) = (0u64, 0u128, 0u128);
            for l in BufReader::new(std::fs::File::open(&jsonl)?).lines() {
                let v: serde_json::Value = serde_json::from_str(&l?)?;
                if v["name"] != "main.tick" {
                    continue;
                }
                calls += 1;
                args += u128::from(v["args"]["x"].as_u64().unwrap_or(0));
                results += v["results"].as_object().and_then(|r| r.values().next()?.as_u64()).map_or(0, u128::from);
            }
            std::fs::remove_file(&jsonl)?;
            run.entries = calls;
            run.returns = calls;
            run.values_ok = Some((args, results) == expected_sums(made.calls));
        }
        Ok(run)
    }
}

/// Waits until every thread of `pid` has a tracer (Delve attached to all of them). The
/// tracer is a thread of Delve's (TracerPid names the thread), not always its main one.
fn wait_traced(pid: u32, tracer: &mut Tracer) -> Result<()> {
    let deadline = Instant::now() + STAGE;
    loop {
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let status = std::fs::read_to_string(task?.path().join("status")).unwrap_or_default();
            let traced = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .is_some_and(|tid| tid != 0 && Path::new(&format!("/proc/{}/task/{tid}", tracer.child.id())).exists());
            all &= traced;
        }
        if all {
            return Ok(());
        }
        if let Some(st) = tracer.child.try_wait()? {
            bail!("dlv exited ({st}) before attaching to {pid}");
        }
        ensure!(Instant::now() < deadline, "dlv did not attach to {pid} within {STAGE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cargo xtask bench debug`.
pub fn debug() -> Result<()> {
    let inject = release_inject()?;
    ensure_bpftrace()?;
    let tc = newest_go()?;
    let dlv = install_dlv(&tc)?;
    let dir = xtask::workspace_root().join("target/bench/debug");
    std::fs::create_dir_all(&dir)?;
    let fixture = build_fixture("stats", &tc, Flavor::Default)?;
    let (exe, ret_symbol) = with_ret_symbol(&tc, &fixture, &dir)?;
    let bench = Bench { exe, inject, dlv, ret_symbol, dir };
    let load_before = loadavg();
    // Delve stops the program twice a call: its runs are sized by time.
    let calibration = bench.run(Setup::Dlv, N_DLV_CALIBRATION)?;
    let n_dlv = ((DLV_WINDOW.as_nanos() as f64 / calibration.made.ns_per_call) as u64).clamp(20, 10_000_000);
    let calls = |s: Setup| match s {
        Setup::Baseline => N_BASELINE,
        Setup::Dlv => n_dlv,
        Setup::Bpftrace => N_BPFTRACE,
        Setup::InjectJsonl => N_JSONL,
        Setup::InjectRing => N_RING,
        Setup::InjectStats => N_STATS,
    };
    let mut runs: Vec<Vec<Run>> = SETUPS.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        for (i, &setup) in SETUPS.iter().enumerate() {
            let r = bench.run(setup, calls(setup))?;
            eprintln!(
                "  round {round}: {:<30} {:>12.2} ns per call, {} calls, {} entries and {} returns seen",
                setup.label(),
                r.made.ns_per_call,
                r.made.calls,
                r.entries,
                r.returns
            );
            runs[i].push(r);
        }
    }
    let load_after = loadavg();
    println!(
        "debug: one goroutine calling main.tick(x int) int in a tight loop (fixtures/stats, Go {}), probed at entry \
         and return with its argument; {ROUNDS} interleaved rounds, a fresh process per run, medians",
        tc.version
    );
    println!(
        "  machine: {} CPUs, load average {load_before} before and {load_after} after (shared with other builds and \
         tests: noisy)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  dlv trace (Delve {DLV_VERSION}) sized by time: a {N_DLV_CALIBRATION}-call calibration run took {:.2} ms \
         a call, so {n_dlv} calls a round (~{:.1} s); the others by count",
        calibration.made.ns_per_call / 1e6,
        DLV_WINDOW.as_secs_f64()
    );
    println!(
        "  ns/hit: the time added per call over no probe, halved (a hit is an entry or a return); values seen: \
         the arguments (0..n-1) and results (3x+1) a tool reported, summed, against the program's"
    );
    println!();
    println!(
        "  {:<30} {:>10} {:>13} {:>13} {:>13} {:>11} {:>24}  values seen",
        "setup", "calls/run", "calls/s", "ns/call", "+ns/call", "ns/hit", "hits seen/made (2/call)"
    );
    let base = median(runs[0].iter().map(|r| r.made.ns_per_call).collect());
    let mut per_hit = [f64::NAN; 6];
    for (i, &setup) in SETUPS.iter().enumerate() {
        let ns = median(runs[i].iter().map(|r| r.made.ns_per_call).collect());
        let made: u64 = runs[i].iter().map(|r| 2 * r.made.calls).sum();
        let seen: u64 = runs[i].iter().map(|r| r.entries + r.returns).sum();
        let dropped: u64 = runs[i].iter().map(|r| r.dropped).sum();
        let values = match runs[i].iter().map(|r| r.values_ok).collect::<Option<Vec<bool>>>() {
            None => "-",
            Some(v) if v.iter().all(|&ok| ok) => "sums match",
            Some(_) => "SUMS DIFFER",
        };
        let values = if runs[i].iter().any(|r| r.unreadable_results) {
            format!("{values} (arguments); results printed as unreadable")
        } else {
            values.to_string()
        };
        if setup == Setup::Baseline {
            println!(
                "  {:<30} {:>10} {:>13.0} {:>13.2} {:>13} {:>11} {:>24}  -",
                setup.label(),
                calls(setup),
                1e9 / ns,
                ns,
                "-",
                "-",
                "-"
            );
            continue;
        }
        let added = ns - base;
        per_hit[i] = added / 2.0;
        let lost = made.abs_diff(seen) + dropped;
        println!(
            "  {:<30} {:>10} {:>13.0} {:>13.2} {:>13.2} {:>11.2} {:>24}  {values}{}",
            setup.label(),
            calls(setup),
            1e9 / ns,
            ns,
            added,
            per_hit[i],
            format!("{seen}/{made}"),
            if lost > 0 { format!("  [MEASURED WITH DROPS: {lost} hits lost]") } else { String::new() }
        );
    }
    println!(
        "  jsonl is lossless: the program waits for the collector, which formats and writes every call's line, so on \
         a function called flat out the collector sets the pace; the ring-only run attaches a fresh ring, whose \
         slots are all first touched (page faults) in the run (`bench call-overhead` has the warm-ring cost)"
    );
    println!();
    let (dlv_hit, bpf_hit) = (per_hit[1], per_hit[2]);
    for i in 3..6 {
        let label = SETUPS[i].label();
        if per_hit[i] <= 0.0 {
            println!("  {label}: its added cost ({:.2} ns/hit) is within the noise; no ratio", per_hit[i]);
            continue;
        }
        let (vs_dlv, vs_bpf) = (dlv_hit / per_hit[i], bpf_hit / per_hit[i]);
        println!(
            "  {} {label} is {vs_dlv:.0}x cheaper per hit than dlv trace, {vs_bpf:.0}x than bpftrace (goal: >= 100x \
             both)",
            if vs_dlv >= 100.0 && vs_bpf >= 100.0 { "PASS" } else { "FAIL" }
        );
    }
    Ok(())
}

/// The 1-minute load average, as /proc/loadavg says it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Where Delve is installed: outside the work tree, like the Go toolchains and the
/// collector. `INJECT_DLV_CACHE` overrides.
fn dlv_cache() -> PathBuf {
    if let Ok(d) = std::env::var("INJECT_DLV_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/inject/dlv")
}

/// Delve DLV_VERSION, built by `go install` from the Go module proxy with `tc` (once; a
/// no-op when the cached binary reports that version).
pub fn install_dlv(tc: &GoToolchain) -> Result<PathBuf> {
    let dir = dlv_cache().join(DLV_VERSION);
    let bin = dir.join("dlv");
    let reports = |bin: &Path| {
        Command::new(bin).arg("version").output().is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {}", &DLV_VERSION[1..]))
        })
    };
    if reports(&bin) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: go install github.com/go-delve/delve/cmd/dlv@{DLV_VERSION} (Go {}) into {}",
        tc.version,
        dir.display()
    );
    std::fs::create_dir_all(dlv_cache())?;
    let tmp = dlv_cache().join(format!(".{DLV_VERSION}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    // Outside any module (the scratch directory), so `@version` resolves on its own;
    // GOFLAGS cleared since -mod does not apply to `go install pkg@version`.
    let mut c = tc.command();
    c.current_dir(&tmp).env("GOBIN", &tmp).env("GOFLAGS", "").env("CGO_ENABLED", "0");
    c.args(["install", &format!("github.com/go-delve/delve/cmd/dlv@{DLV_VERSION}")]);
    if let Err(e) = xtask::run(&mut c) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("installing Delve {DLV_VERSION}")));
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).with_context(|| format!("moving Delve into {}", dir.display()))?;
    ensure!(reports(&bin), "{} does not report Delve {DLV_VERSION}", bin.display());
    Ok(bin)
}

/// `objcopy` (binutils), installed with apt-get when missing.
fn ensure_objcopy() -> Result<()> {
    if Command::new("objcopy").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: apt-get install binutils");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "binutils"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    ensure!(ok.success(), "installing binutils (objcopy) failed");
    Ok(())
}

/// A copy of the fixture with an ELF symbol `main.tick.ret` on main.tick's RET (and
/// main.tick's symbol ending there), for bpftrace: Debian's bpftrace 0.17 refuses a
/// uprobe at an offset inside a function (built without the disassembler to check it),
/// and a uretprobe crashes a Go program (it rewrites the return address, which the
/// runtime's unwinder then meets: SIGILL on async preemption, tried here). Only the
/// symbol table differs; every tool runs this copy. Returns it and the symbol's name.
fn with_ret_symbol(tc: &GoToolchain, exe: &Path, dir: &Path) -> Result<(PathBuf, String)> {
    ensure_objcopy()?;
    let listing = xtask::output(tc.command().args(["tool", "objdump", "-s", "^main\\.tick$"]).arg(exe))?;
    let rets: Vec<u64> = listing
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("RET"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?.strip_prefix("0x")?, 16).ok())
        .collect();
    ensure!(rets.len() == 1, "main.tick has {} RET instructions, the bench expects one:\n{listing}", rets.len());
    let name = "main.tick.ret";
    let out = dir.join("stats");
    let _ = std::fs::remove_file(&out);
    xtask::run(
        Command::new("objcopy").arg(format!("--add-symbol={name}=0x{:x},function,global", rets[0])).arg(exe).arg(&out),
    )?;
    let mut elf = std::fs::read(&out)?;
    set_symbol_bounds(&mut elf, "main.tick", name, rets[0])?;
    std::fs::write(&out, elf)?;
    Ok((out, name.to_string()))
}

/// Little-endian unsigned of `n` bytes at `at`.
fn le(b: &[u8], at: usize, n: usize) -> Result<u64> {
    let s = b.get(at..at + n).context("ELF file truncated")?;
    Ok(s.iter().rev().fold(0, |a, &x| (a << 8) | u64::from(x)))
}

/// Ends symbol `func` at `ret` and makes `ret_name` a one-byte function symbol there
/// (in `func`'s section): ELF64 little-endian, `.symtab` entries of 24 bytes.
fn set_symbol_bounds(elf: &mut [u8], func: &str, ret_name: &str, ret: u64) -> Result<()> {
    ensure!(elf.starts_with(b"\x7fELF\x02\x01"), "not a little-endian ELF64 file");
    let (shoff, shentsize, shnum) =
        (le(elf, 0x28, 8)? as usize, le(elf, 0x3a, 2)? as usize, le(elf, 0x3c, 2)? as usize);
    let mut symtab = None;
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        if le(elf, sh + 4, 4)? == 2 {
            let strtab = shoff + le(elf, sh + 0x28, 4)? as usize * shentsize;
            symtab =
                Some((le(elf, sh + 0x18, 8)? as usize, le(elf, sh + 0x20, 8)? as usize, le(elf, strtab + 0x18, 8)?));
        }
    }
    let (off, size, strings) = symtab.context("no .symtab")?;
    let (mut func_sym, mut ret_sym) = (None, None);
    for sym in (off..off + size).step_by(24) {
        let start = (strings + le(elf, sym, 4)?) as usize;
        let name = elf.get(start..).context("symbol name outside the file")?;
        let name = &name[..name.iter().position(|&c| c == 0).context("unterminated symbol name")?];
        if name == func.as_bytes() {
            func_sym = Some(sym);
        } else if name == ret_name.as_bytes() {
            ret_sym = Some(sym);
        }
    }
    let (f, r) = (func_sym.context("no main.tick symbol")?, ret_sym.context("objcopy added no symbol")?);
    let (value, fsize) = (le(elf, f + 8, 8)?, le(elf, f + 16, 8)?);
    ensure!(ret > value && ret < value + fsize, "the RET at {ret:#x} is not inside {func}");
    let shndx = [elf[f + 6], elf[f + 7]];
    elf[f + 16..f + 24].copy_from_slice(&(ret - value).to_le_bytes());
    elf[r + 6..r + 8].copy_from_slice(&shndx);
    elf[r + 8..r + 16].copy_from_slice(&ret.to_le_bytes());
    elf[r + 16..r + 24].copy_from_slice(&1u64.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64: a header, a `.symtab` of [null, main.tick (0x1000, 9 bytes, section
    /// 1), main.tick.ret (0x1008, 0 bytes, ABS)] and its string table.
    fn elf() -> Vec<u8> {
        let strings = b"\0main.tick\0main.tick.ret\0";
        let mut symtab = vec![0u8; 24];
        for (name, shndx, value, size) in [(1u32, 1u16, 0x1000u64, 9u64), (11, 0xfff1, 0x1008, 0)] {
            symtab.extend(name.to_le_bytes());
            symtab.extend([0x12, 0]);
            symtab.extend(shndx.to_le_bytes());
            symtab.extend(value.to_le_bytes());
            symtab.extend(size.to_le_bytes());
        }
        let (sym_off, str_off) = (64usize, 64 + symtab.len());
        let shoff = str_off + strings.len();
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        e[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        e.extend(&symtab);
        e.extend(strings);
        let section = |kind: u32, off: usize, size: usize, link: u32| {
            let mut h = vec![0u8; 64];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h[0x28..0x2c].copy_from_slice(&link.to_le_bytes());
            h
        };
        e.extend(section(0, 0, 0, 0));
        e.extend(section(2, sym_off, symtab.len(), 2));
        e.extend(section(3, str_off, strings.len(), 0));
        e
    }

    #[test]
    fn the_ret_symbol_gets_its_byte_and_the_function_ends_before_it() -> Result<()> {
        let mut e = elf();
        set_symbol_bounds(&mut e, "main.tick", "main.tick.ret", 0x1008)?;
        let (tick, ret) = (64 + 24, 64 + 48);
        assert_eq!((le(&e, tick + 8, 8)?, le(&e, tick + 16, 8)?), (0x1000, 8));
        assert_eq!((le(&e, ret + 6, 2)?, le(&e, ret + 8, 8)?, le(&e, ret + 16, 8)?), (1, 0x1008, 1));
        Ok(())
    }

    #[test]
    fn a_ret_outside_the_function_or_a_missing_symbol_is_refused() {
        let mut e = elf();
        assert!(set_symbol_bounds(&mut e, "main.tick", "main.tick.ret", 0x1009).is_err());
        assert!(set_symbol_bounds(&mut e, "main.tock", "main.tick.ret", 0x1008).is_err());
        assert!(set_symbol_bounds(&mut e[..100], "main.tick", "main.tick.ret", 0x1008).is_err());
        assert_eq!(e, elf(), "a refusal changes nothing");
    }

    #[test]
    fn expected_sums_are_those_of_the_fixture_loop() {
        let n = 1000u64;
        let args: u128 = (0..n).map(u128::from).sum();
        let results: u128 = (0..n).map(|x| 3 * u128::from(x) + 1).sum();
        assert_eq!(expected_sums(n), (args, results));
    }
}
