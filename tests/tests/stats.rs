//! `inject --stats`: the counts equal the program's own exactly (calls of a function called
//! millions of times a second from two goroutines, errors, recursion), latencies are
//! plausible against a known sleep, the output is live and matches its schema, and detach
//! (or, after a kill -9, `inject detach`) leaves the code and the mappings as they were.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::schema::{read_stats, read_summary};
use tests::{Proc, exclusive, require_ptrace, scratch, start_fixture, start_inject, text_differs_from_file};
use xtask::{Flavor, build_fixture, inject_binary, test_toolchains};

const LIMIT: Duration = Duration::from_secs(180);

/// The fixture's `COUNTS name=n ...` line.
fn program_counts(p: &Proc) -> Result<HashMap<String, u64>> {
    let line = p.value("COUNTS").context("no COUNTS line")?;
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("name=count")?;
            Ok((k.to_string(), v.parse()?))
        })
        .collect()
}

/// The function named `name` in a stats line.
fn func<'a>(line: &'a Value, name: &str) -> Result<&'a Value> {
    line["functions"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == name))
        .with_context(|| format!("{name} in {line}"))
}

fn n(v: &Value, key: &str) -> Result<u64> {
    v[key].as_u64().with_context(|| format!("{key} in {v}"))
}

/// The target's code equals its file and nothing of inject's is mapped.
fn left_as_it_was(pid: i32, exe: &Path) -> Result<()> {
    ensure!(text_differs_from_file(pid, exe)?.is_none(), "code not restored");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    ensure!(!maps.contains("inject-ring"), "the ring is still mapped:\n{maps}");
    Ok(())
}

/// Runs the fixture's calls under `inject --stats --output jsonl`; returns the stats
/// lines, the program's counts and the summary.
fn counted(exe: &Path, funcs: &[&str], fixture_args: &[&str]) -> Result<(Vec<Value>, HashMap<String, u64>, Value)> {
    let mut target = start_fixture(exe, fixture_args, &[])?;
    let (out, summary) = (scratch("stats.jsonl"), scratch("stats-summary.json"));
    let mut args: Vec<String> = vec!["--pid".into(), target.pid().to_string(), "--stats".into()];
    for f in funcs {
        args.extend(["--func".into(), f.to_string()]);
    }
    for a in ["--output", "jsonl", "--stats-interval", "0.2", "--output-file"] {
        args.push(a.into());
    }
    args.push(out.display().to_string());
    args.extend(["--summary-json".into(), summary.display().to_string()]);
    let mut inject = start_inject(&args, true)?;
    target.send_line("go")?;
    target.wait_for("NS_PER_CALL", LIMIT)?;
    let counts = program_counts(&target)?;
    // Live: an interval line shows every call of the first function while inject runs on.
    let (first, want) = (funcs[0], counts[funcs[0].trim_start_matches("main.")]);
    let deadline = std::time::Instant::now() + LIMIT;
    let shown = |l: &Value| l["stats"] == "interval" && func(l, first).is_ok_and(|f| f["calls"] == want);
    while !std::fs::read_to_string(&out)?.lines().filter_map(|l| serde_json::from_str(l).ok()).any(|l| shown(&l)) {
        ensure!(std::time::Instant::now() < deadline, "no interval line showed {want} calls of {first}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The counters of the last calls are read after the probes are out: final.
    inject.signal(libc::SIGINT);
    let st = inject.wait(LIMIT)?;
    ensure!(st.success(), "inject failed:\n{}", inject.transcript());
    left_as_it_was(target.pid(), exe)?;
    target.send_line("bye")?;
    ensure!(target.wait(LIMIT)?.success(), "the fixture failed:\n{}", target.transcript());
    Ok((read_stats(&out)?, counts, read_summary(&summary)?))
}

#[test]
fn counts_equal_the_programs_own_and_latency_is_plausible() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _one = exclusive();
    for tc in test_toolchains()? {
        let exe = build_fixture("stats", &tc, Flavor::Default)?;
        // 20 million calls of main.tick from two goroutines, one nap of 2 ms at a time.
        let funcs = ["main.tick", "main.check", "main.down", "main.nap"];
        let (lines, prog, summary) =
            counted(&exe, &funcs, &["-n", "10000000", "-goroutines", "2", "-nap", "2ms", "-naps", "20"])?;
        let total = lines.iter().rfind(|l| l["stats"] == "total").context("no totals line")?;
        for (f, key) in [("main.tick", "tick"), ("main.check", "check"), ("main.down", "down"), ("main.nap", "nap")] {
            let t = func(total, f)?;
            let want = prog[key];
            ensure!(
                n(t, "calls")? == want,
                "{}: {f} counted {} calls, the program made {want}",
                tc.version,
                t["calls"]
            );
            ensure!(n(t, "returns")? == want, "{f}: every call returned: {t}");
            ensure!(n(t, "timed")? + n(t, "untimed_returns")? == want, "{f}: {t}");
            ensure!(n(t, "missed")? == 0, "{f}: {t}");
            let site =
                summary["sites"].as_array().and_then(|s| s.iter().find(|s| s["name"] == f)).context("summary")?;
            ensure!(site["entries"] == want && site["returns"] == want, "summary of {f}: {site}");
        }
        let check = func(total, "main.check")?;
        ensure!(
            n(check, "errors")? == prog["errors"],
            "errors: counted {}, the program saw {}",
            check["errors"],
            prog["errors"]
        );
        ensure!(func(total, "main.tick")?["errors"].is_null(), "main.tick returns no error");
        // Recursion: every level timed apart (when sampled, a sample of them).
        let down = func(total, "main.down")?;
        ensure!(n(down, "timed")? > 0, "{down}");
        // A 2 ms sleep: every one of the 20 timed, at least 2 ms, at most what a loaded
        // two-core machine adds.
        let nap = func(total, "main.nap")?;
        ensure!(n(nap, "timed")? == 20 && n(nap, "sampling")? == 1, "{nap}");
        let lat = &nap["latency_ns"];
        let (p50, p90, p99, max) = (n(lat, "p50")?, n(lat, "p90")?, n(lat, "p99")?, n(lat, "max")?);
        ensure!((1_900_000..100_000_000).contains(&p50), "main.nap p50 {p50} ns for a 2 ms sleep");
        ensure!(p50 <= p90 && p90 <= p99 && p99 <= max && max >= 2_000_000, "{lat}");
        let hist: u64 =
            nap["histogram"].as_array().context("histogram")?.iter().map(|b| b["count"].as_u64().unwrap_or(0)).sum();
        ensure!(hist == 20, "the histogram holds the 20 naps: {nap}");
        // main.tick is timed (a sample at this rate) and fast.
        let tick = func(total, "main.tick")?;
        ensure!(n(tick, "timed")? > 0 && n(&tick["latency_ns"], "p50")? < 20_000, "{tick}");
        // The intervals' calls add up to the total (the first began when the probes went in).
        let intervals: Vec<&Value> = lines.iter().filter(|l| l["stats"] == "interval").collect();
        let live: u64 =
            intervals.iter().map(|l| func(l, "main.tick").and_then(|t| n(t, "interval_calls")).unwrap_or(0)).sum();
        ensure!(live == prog["tick"], "interval lines counted {live} calls of main.tick, not {}", prog["tick"]);
    }
    Ok(())
}

/// A stripped build: `error` results are counted through a declared signature; the
/// console view shows the table and, at exit, the histograms.
#[test]
fn stripped_build_with_a_declared_signature_counts_errors() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _one = exclusive();
    let tc = test_toolchains()?.pop().context("no toolchain")?;
    let exe = build_fixture("stats", &tc, Flavor::Stripped)?;
    let mut target = start_fixture(&exe, &["-n", "1000000", "-goroutines", "2", "-naps", "3"], &[])?;
    let out = scratch("stats-console.txt");
    let args: Vec<String> = [
        "--pid",
        &target.pid().to_string(),
        "--stats",
        "--func",
        "main.check(x int) error",
        "--func",
        "main.tick",
        "--stats-interval",
        "0.1",
        "--output-file",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut inject = start_inject(&args, true)?;
    target.send_line("go")?;
    target.wait_for("NS_PER_CALL", LIMIT)?;
    inject.signal(libc::SIGINT);
    ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
    left_as_it_was(target.pid(), &exe)?;
    let prog = program_counts(&target)?;
    target.send_line("bye")?;
    target.wait(LIMIT)?;
    let text = std::fs::read_to_string(&out)?;
    ensure!(text.contains("FUNCTION") && text.contains("P99"), "no table:\n{text}");
    let want = format!("main.check: {} calls, {} errors", prog["check"], prog["errors"]);
    ensure!(text.contains(&want), "want {want:?} in:\n{text}");
    ensure!(text.contains(&format!("main.tick: {} calls", prog["tick"])), "{text}");
    ensure!(text.contains("nsecs") && text.contains("|*"), "no histogram:\n{text}");
    Ok(())
}

/// An inject killed with its counting probes in: the program runs on, counting right, and
/// `inject detach` restores every byte and unmaps the stats region with the ring.
#[test]
fn a_killed_stats_inject_is_undone() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _one = exclusive();
    let tc = test_toolchains()?.pop().context("no toolchain")?;
    let exe = build_fixture("stats", &tc, Flavor::Default)?;
    let mut target = start_fixture(&exe, &["-n", "1000000", "-naps", "2"], &[])?;
    let args: Vec<String> = [
        "--pid",
        &target.pid().to_string(),
        "--stats",
        "--func",
        "main.tick",
        "--func",
        "main.nap",
        "--output",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut inject = start_inject(&args, true)?;
    inject.signal(libc::SIGKILL);
    inject.wait(LIMIT)?;
    target.send_line("go")?;
    target.wait_for("NS_PER_CALL", LIMIT)?;
    ensure!(program_counts(&target)?["tick"] == 2_000_000, "{}", target.transcript());
    ensure!(text_differs_from_file(target.pid(), &exe)?.is_some(), "the probes should still be in");
    let st = Command::new(inject_binary()?).args(["detach", "--pid", &target.pid().to_string()]).output()?;
    ensure!(st.status.success(), "inject detach: {}", String::from_utf8_lossy(&st.stderr));
    left_as_it_was(target.pid(), &exe)?;
    target.send_line("bye")?;
    ensure!(target.wait(LIMIT)?.success(), "{}", target.transcript());
    Ok(())
}

/// What stats mode cannot do is refused as a usage error (exit 2) before anything is touched.
#[test]
fn stats_usage_errors() -> Result<()> {
    let cases: [(&[&str], &str); 4] = [
        (&["--pid", "1", "--stats"], "--stats counts the --func functions"),
        (&["--pid", "1", "--stats", "--func", "main.f", "--output", "otlp"], "not otlp"),
        (&["--pid", "1", "--stats", "--func", "main.f", "--where", "x > 1"], "cannot be used with"),
        (&["--pid", "1", "--stats", "--func", "main.f", "--stats-interval", "0"], "--stats-interval 0"),
    ];
    for (args, needle) in cases {
        let out = Command::new(inject_binary()?).args(args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(2), "{args:?}: exit {:?}: {err}", out.status.code());
        ensure!(err.contains(needle), "{args:?}: want {needle:?} in {err}");
    }
    Ok(())
}
