//! `cargo xtask bench export`: the CPU inject spends to trace and export spans at a
//! steady 100k spans per second, over OTLP/HTTP and OTLP/gRPC, end to end: the tree
//! fixture paced at 25k requests/s (4 probed calls each) under inject, exporting to the
//! test receiver in a process of its own. inject's CPU (all threads: collector, output,
//! exporter) is read from /proc in windows; medians are reported. Goal: under one core.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xtask::{Flavor, build_fixture, toolchain};

const RATE_REQUESTS: u64 = 25_000;
const WINDOWS: usize = 5;
const WINDOW: Duration = Duration::from_secs(2);

/// Sends SIGTERM to a process a bench started (and has not reaped).
pub(crate) fn terminate(c: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc_kill(c.id() as i32, 15) };
}

/// Ends a process a bench started: SIGTERM, then waits for it.
pub(crate) fn stop(mut c: Child) -> Result<()> {
    terminate(&c);
    c.wait()?;
    Ok(())
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Starts a fixture server (stdout piped): returns it and the address of its `LISTEN`
/// line once it printed `until` (`LISTEN` itself, or `READY`); its further output is
/// drained on a thread.
pub(crate) fn start_listening(mut c: Command, until: &str) -> Result<(Child, String)> {
    let mut server = c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut lines = BufReader::new(server.stdout.take().context("stdout")?).lines();
    let mut addr = None;
    loop {
        match lines.next().transpose()? {
            Some(l) => {
                if let Some(a) = l.strip_prefix("LISTEN ") {
                    addr = Some(a.to_string());
                }
                if l.split_whitespace().next() == Some(until) {
                    break;
                }
            }
            None => bail!("{:?} exited before printing {until}", c.get_program()),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok((server, addr.context("no LISTEN line")?))
}

/// Attaches inject to `pid`, exporting to `endpoint` and writing its exit summary to
/// `summary`; returns once its probes are in.
pub(crate) fn attach_exporting(
    inject: &std::path::Path,
    pid: u32,
    endpoint: &str,
    summary: &std::path::Path,
) -> Result<Child> {
    attach_exporting_with(inject, pid, &[], endpoint, summary)
}

/// [`attach_exporting`] with more arguments for inject (`--lib kafka-go`).
pub(crate) fn attach_exporting_with(
    inject: &std::path::Path,
    pid: u32,
    args: &[&str],
    endpoint: &str,
    summary: &std::path::Path,
) -> Result<Child> {
    std::fs::create_dir_all(summary.parent().context("parent")?)?;
    let mut c = Command::new(inject)
        .args(["--pid", &pid.to_string(), "--summary-json"])
        .arg(summary)
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .stderr(Stdio::piped())
        .spawn()?;
    xtask::wait_for_line(&mut c, false, "inject: probing")?;
    Ok(c)
}

/// Stops an inject [`attach_exporting`] started; returns how many records it dropped.
pub(crate) fn detach_dropped(c: Child, summary: &std::path::Path) -> Result<u64> {
    detach_summary(c, summary)?["dropped"].as_u64().context("dropped in the summary")
}

/// Stops an inject [`attach_exporting`] started; returns its exit summary.
pub(crate) fn detach_summary(c: Child, summary: &std::path::Path) -> Result<serde_json::Value> {
    stop(c)?;
    Ok(serde_json::from_slice(&std::fs::read(summary)?)?)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// CPU seconds a process has used, all threads.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted after the command name.
    let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Busy CPU seconds of the whole machine (all but idle and iowait), from /proc/stat.
pub(crate) fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let f: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    Ok(busy / 100.0)
}

/// Builds the test suite's OTLP receiver (release) beside `inject`, returning its path.
pub(crate) fn receiver_binary(inject: &std::path::Path) -> Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    xtask::run(Command::new(cargo).current_dir(xtask::workspace_root()).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "tests",
        "--bin",
        "otlp-receiver",
    ]))?;
    Ok(inject.with_file_name("otlp-receiver"))
}

pub(crate) struct Receiver {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pub(crate) endpoint: String,
}

impl Receiver {
    pub(crate) fn start(bin: &std::path::Path, transport: &str) -> Result<Receiver> {
        let mut child = Command::new(bin).arg(transport).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = lines.next().transpose()?.context("receiver exited")?;
        let endpoint = first.strip_prefix("LISTENING ").context("LISTENING")?.to_string();
        Ok(Receiver { child, stdin, lines, endpoint })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn spans(&mut self) -> Result<u64> {
        writeln!(self.stdin, "count")?;
        let l = self.lines.next().transpose()?.context("receiver exited")?;
        Ok(l.strip_prefix("SPANS ").context("SPANS")?.parse()?)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn export() -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    let inject = xtask::inject_binary()?;
    let root = xtask::workspace_root();
    let receiver_bin = receiver_binary(&inject)?;
    let versions = xtask::go_versions()?;
    let exe = build_fixture("tree", &toolchain(versions.last().context("no Go")?)?, Flavor::Default)?;
    println!(
        "export: tree fixture at {RATE_REQUESTS} requests/s = {} spans/s, {WINDOWS} windows of {:.0} s, medians",
        4 * RATE_REQUESTS,
        WINDOW.as_secs_f64()
    );
    let mut worst: f64 = 0.0;
    for (transport, protocol) in [("http", "http/protobuf"), ("grpc", "grpc")] {
        let mut rx = Receiver::start(&receiver_bin, transport)?;
        let mut fixture = Command::new(&exe)
            .args(["-wait", "-until-stdin", "-sleep", "0", "-rate", &RATE_REQUESTS.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut fx_in = fixture.stdin.take().context("stdin")?;
        let mut fx_out = BufReader::new(fixture.stdout.take().context("stdout")?).lines();
        if fx_out.next().transpose()?.as_deref() != Some("READY") {
            bail!("fixture did not start");
        }
        let summary = root.join(format!("target/bench/export-{transport}.json"));
        std::fs::create_dir_all(summary.parent().context("dir")?)?;
        let mut inj = Command::new(&inject)
            .args(["--pid", &fixture.id().to_string()])
            .args(["--func", "main.handle", "--func", "main.query", "--func", "main.render"])
            .arg("--summary-json")
            .arg(&summary)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
            .stderr(Stdio::piped())
            .spawn()?;
        xtask::wait_for_line(&mut inj, false, "inject: probing")?;
        writeln!(fx_in, "go")?;
        std::thread::sleep(Duration::from_secs(2));
        let (mut cores, mut rates, mut fx_cores) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..WINDOWS {
            let (t0, c0, f0, s0) = (Instant::now(), cpu_seconds(inj.id())?, cpu_seconds(fixture.id())?, rx.spans()?);
            std::thread::sleep(WINDOW);
            let (c1, f1, s1) = (cpu_seconds(inj.id())?, cpu_seconds(fixture.id())?, rx.spans()?);
            let wall = t0.elapsed().as_secs_f64();
            cores.push((c1 - c0) / wall);
            fx_cores.push((f1 - f0) / wall);
            rates.push((s1 - s0) as f64 / wall);
        }
        writeln!(fx_in, "stop")?;
        let _ = fixture.wait();
        let st = inj.wait()?;
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        let (c, r) = (median(cores), median(rates));
        let per_100k = c * 100_000.0 / r.max(1.0);
        worst = worst.max(per_100k);
        println!(
            "  {protocol:<14} {r:>9.0} spans/s received; inject {c:.3} cores = {per_100k:.3} cores per 100k spans/s, {:.2} µs CPU per span (fixture {:.2} cores); exported {} dropped {} ({st})",
            c * 1e6 / r.max(1.0),
            median(fx_cores),
            s["otlp"]["exported"],
            s["otlp"]["dropped_queue_full"].as_u64().unwrap_or(0)
                + s["otlp"]["dropped_export_failed"].as_u64().unwrap_or(0),
        );
    }
    println!(
        "{} worst {worst:.3} cores per 100k spans/s against the 1-core goal",
        if worst < 1.0 { "PASS" } else { "FAIL" }
    );
    Ok(())
}
