//! Attaching to live Go programs, probing, detaching: counts are exact, the programs'
//! own results are unchanged, and detach leaves the text exactly as the file has it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::schema::read_summary;
use tests::{Proc, require_ptrace, start_fixture, start_inject, text_differs_from_file};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const MINUTE: Duration = Duration::from_secs(60);

fn summary_path(tag: &str) -> std::path::PathBuf {
    let d = xtask::workspace_root().join("target/test-scratch");
    std::fs::create_dir_all(&d).unwrap();
    d.join(format!("summary-{tag}-{}.json", std::process::id()))
}

fn site<'a>(summary: &'a Value, name: &str) -> Result<&'a Value> {
    summary["sites"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .with_context(|| format!("{name} in {summary}"))
}

/// Runs a fixture to completion without any tracer and returns its stdout lines.
fn plain_run(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut p = start_fixture(exe, args, env)?;
    p.stdin.take();
    // A replay repeats minutes of attach/detach cycles' work: generous on a loaded 2-core box.
    ensure!(p.wait(3 * MINUTE)?.success(), "uninstrumented run failed:\n{}", p.transcript());
    Ok(p)
}

/// Anonymous executable mappings in a /proc/PID/maps text (trampoline areas are such).
fn exec_anon(maps: &str) -> usize {
    maps.lines().filter(|l| l.contains("r-xp") && l.split_whitespace().count() == 5).count()
}

/// Stops a `recurse -until-stdin -n 20` target and checks that it computed what an
/// untraced run computes: every round of a goroutine computes the same sum, so the
/// target's sum per goroutine must be its rounds times an untraced round's. (Replaying
/// every round instead took longer than the attach tests themselves on a slow machine.)
fn stop_and_check_against_replay(target: &mut Proc, exe: &Path, env: &[(&str, &str)]) -> Result<()> {
    target.send_line("stop")?;
    ensure!(target.wait(MINUTE)?.success(), "target failed:\n{}", target.transcript());
    let ints = |p: &Proc, key: &str| -> Result<Vec<i64>> {
        let v = p.value(key).with_context(|| format!("{key} in:\n{}", p.transcript()))?;
        v.split(',').map(|x| x.parse::<i64>().with_context(|| format!("{key} {v}"))).collect()
    };
    let rounds = ints(target, "ROUNDS")?;
    let sums = ints(target, "SUMS")?;
    let ones = vec!["1"; rounds.len()].join(",");
    let replay = plain_run(exe, &["-rounds", &ones, "-n", "20"], env)?;
    let once = ints(&replay, "SUMS")?;
    ensure!(
        rounds.len() == sums.len() && once.len() == sums.len(),
        "ROUNDS, SUMS and the replay's SUMS differ in length"
    );
    for (g, ((r, s), o)) in rounds.iter().zip(&sums).zip(&once).enumerate() {
        ensure!(*s == r.wrapping_mul(*o), "goroutine {g}: {r} rounds summed to {s}, an untraced round to {o}");
    }
    ensure!(rounds.iter().sum::<i64>() > 0, "the target ran no rounds");
    Ok(())
}

fn pid_arg(p: &Proc) -> String {
    p.pid().to_string()
}

/// Every call of a recursive function whose stack grows and is copied, under forced GCs,
/// from 16 goroutines: exactly one entry and one return record per call.
fn exact_counts(tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("recurse", tc, flavor)?;
    let args = ["-wait", "-n", "300", "-goroutines", "16"];
    let env = [("GOMAXPROCS", "4")];
    let want = plain_run(&exe, &args, &env)?;
    let mut target = start_fixture(&exe, &args, &env)?;
    let summary = summary_path(&format!("exact-{}-{}", tc.version, flavor.name()));
    let jsonl = summary.with_extension("jsonl");
    let mut inject = start_inject(
        &[
            "--pid".into(),
            pid_arg(&target),
            "--func".into(),
            "main.depth".into(),
            "--func".into(),
            "main.worker".into(),
            "--ring-slots".into(),
            // Room for every record of the run: the test asserts exact counts even when the
            // machine is busy with other tests and the collector gets little CPU.
            (1 << 20).to_string(),
            "--summary-json".into(),
            summary.display().to_string(),
            "--output".into(),
            "jsonl".into(),
            "--output-file".into(),
            jsonl.display().to_string(),
        ],
        true,
    )?;
    target.send_line("go")?;
    ensure!(target.wait(MINUTE)?.success(), "target failed:\n{}", target.transcript());
    ensure!(inject.wait(MINUTE)?.success(), "inject failed:\n{}", inject.transcript());
    ensure!(target.value("CHECKSUM") == want.value("CHECKSUM"), "checksum changed under probes");
    let calls: u64 = target.value("CALLS").context("CALLS")?.parse()?;
    let s = read_summary(&summary)?;
    ensure!(s["dropped"] == 0 && s["corrupt"] == 0, "{s}");
    // Every call's line matches the documented format (entry-only ones where an exit
    // could not be probed).
    let lines = tests::schema::for_each_line(&jsonl, |_| Ok(()))?;
    let _ = std::fs::remove_file(&jsonl);
    ensure!(lines as u64 == s["calls"], "{lines} JSON lines for {} calls", s["calls"]);
    let depth = site(&s, "main.depth")?;
    ensure!(
        depth["entries"] == calls && depth["returns"] == calls,
        "Go {} {}: main.depth called {calls} times, recorded {depth}",
        tc.version,
        flavor.name()
    );
    // Pairs, not just counts: frames live while the stack was copied pair up too, and
    // returns that reach the collector out of order (from another P's sub-ring) wait for
    // their frame.
    ensure!(
        s["calls"] == calls + 16 && s["unmatched_returns"] == 0 && s["open_calls"] == 0 && s["abandoned"] == 0,
        "Go {} {}: pairing: {s}",
        tc.version,
        flavor.name()
    );
    ensure!(s["tickets"] == s["consumed"] && s["unpublished"] == 0, "tickets taken but never published: {s}");
    let worker = site(&s, "main.worker")?;
    let entry_only = worker["verdict"].as_str().is_some_and(|v| v.contains("entry-only"));
    ensure!(worker["entries"] == 16 && worker["returns"] == if entry_only { 0 } else { 16 }, "main.worker: {worker}");
    eprintln!("Go {} {}: {calls} calls of main.depth recorded exactly", tc.version, flavor.name());
    Ok(())
}

#[test]
fn exact_counts_default_pie_stripped_cgo() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie, Flavor::Stripped, Flavor::Cgo] {
            exact_counts(&tc, flavor)?;
        }
    }
    Ok(())
}

/// Probes go in and come out 50 times while 16 goroutines call them; the program's own
/// result equals an uninstrumented run of exactly the same work.
#[test]
fn probes_in_and_out_fifty_times() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for procs in ["2", "8"] {
            let exe = build_fixture("recurse", &tc, Flavor::Default)?;
            let env = [("GOMAXPROCS", procs)];
            let mut target = start_fixture(&exe, &["-until-stdin", "-n", "20"], &env)?;
            let mut recorded = 0;
            for i in 0..50 {
                let summary = summary_path(&format!("cycle-{}-{procs}-{i}", tc.version));
                let mut inject = start_inject(
                    &[
                        "--pid".into(),
                        pid_arg(&target),
                        "--func".into(),
                        "main.depth".into(),
                        "--func".into(),
                        "main.worker".into(),
                        "--duration".into(),
                        "0.02".into(),
                        // The ring of earlier defaults: 200 cycles of a larger one only
                        // format more lines in a debug build.
                        "--ring-slots".into(),
                        "131072".into(),
                        // Counted in the summary; formatting ~80,000 calls a cycle in a
                        // debug build was most of this test's time.
                        "--output".into(),
                        "none".into(),
                        "--summary-json".into(),
                        summary.display().to_string(),
                    ],
                    false,
                )?;
                ensure!(inject.wait(MINUTE)?.success(), "cycle {i}: inject failed:\n{}", inject.transcript());
                let s = read_summary(&summary)?;
                ensure!(s["restored"].as_u64() > Some(0), "cycle {i}: nothing restored: {s}");
                recorded += site(&s, "main.depth")?["entries"].as_u64().unwrap_or(0);
                let _ = std::fs::remove_file(&summary);
            }
            ensure!(text_differs_from_file(target.pid(), &exe)?.is_none(), "text differs from the file after detach");
            stop_and_check_against_replay(&mut target, &exe, &env)?;
            ensure!(recorded > 0, "no calls recorded in 50 cycles");
            eprintln!(
                "Go {} GOMAXPROCS={procs}: 50 attach/detach cycles, {recorded} calls recorded, checksum unchanged",
                tc.version
            );
        }
    }
    Ok(())
}

/// After a clean detach the code is byte-identical to the file and nothing of ours is
/// mapped; a second inject is refused while one is attached; attaching again works.
#[test]
fn detach_leaves_no_trace_and_second_inject_is_refused() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        let exe = build_fixture("funcs", &tc, Flavor::Default)?;
        let target = start_fixture(&exe, &["-loop", "-n", "0", "-sleep", "1ms"], &[])?;
        let maps_before = std::fs::read_to_string(format!("/proc/{}/maps", target.pid()))?;
        let probe = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec!["--pid".into(), pid_arg(&target), "--func".into(), "main.priceOf".into()];
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let mut first = start_inject(&probe(&[]), true)?;
        let mut second = start_inject(&probe(&["--duration", "1"]), false)?;
        ensure!(second.wait(MINUTE)?.code() == Some(1), "second inject was not refused:\n{}", second.transcript());
        ensure!(second.transcript().contains("already instrumented"), "{}", second.transcript());
        // A dry run installs nothing, but says a real attach would be refused.
        let mut dry = start_inject(&probe(&["--dry-run"]), false)?;
        ensure!(dry.wait(MINUTE)?.success(), "dry run:\n{}", dry.transcript());
        ensure!(
            dry.transcript().contains("already instrumented") && dry.transcript().contains("would be refused"),
            "dry run on a held pid:\n{}",
            dry.transcript()
        );
        first.signal(2);
        ensure!(first.wait(MINUTE)?.success(), "first inject:\n{}", first.transcript());
        ensure!(first.transcript().contains("unmapped trampolines and ring"), "{}", first.transcript());
        ensure!(text_differs_from_file(target.pid(), &exe)?.is_none(), "text differs after detach");
        let maps_after = std::fs::read_to_string(format!("/proc/{}/maps", target.pid()))?;
        ensure!(!maps_after.contains("inject-ring"), "ring still mapped:\n{maps_after}");
        ensure!(exec_anon(&maps_after) == exec_anon(&maps_before), "an executable mapping was left behind");
        let mut third = start_inject(&probe(&["--duration", "0.2"]), false)?;
        ensure!(third.wait(MINUTE)?.success(), "re-attach failed:\n{}", third.transcript());
    }
    Ok(())
}

/// An injector killed with SIGKILL leaves its probes in: the program keeps running
/// correctly (records are dropped once the ring fills), and the next inject (or `inject
/// detach`) puts every byte back from the journal the dead one left in the ring.
#[test]
fn target_survives_a_killed_injector() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("recurse", tc, Flavor::Default)?;
    let env = [("GOMAXPROCS", "4")];
    let mut target = start_fixture(&exe, &["-until-stdin", "-n", "20"], &env)?;
    let mut inject = start_inject(
        &["--pid".into(), pid_arg(&target), "--func".into(), "main.depth".into(), "--ring-slots".into(), "1024".into()],
        true,
    )?;
    inject.signal(9);
    inject.wait(MINUTE)?;
    // Let the program run with orphaned probes and a full ring.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(text_differs_from_file(target.pid(), &exe)?.is_some(), "probes should still be in place");
    // The next inject finds what the dead one left, puts it back, and attaches as usual;
    // killed again, `inject detach` cleans up alone.
    for round in 0..2 {
        let mut next = start_inject(
            &["--pid".into(), pid_arg(&target), "--func".into(), "main.depth".into(), "--output".into(), "none".into()],
            true,
        )?;
        let said = next.transcript();
        ensure!(said.contains("removed the probes a previous inject"), "round {round}: no clean-up:\n{said}");
        std::thread::sleep(Duration::from_millis(100));
        next.signal(9);
        next.wait(MINUTE)?;
        ensure!(text_differs_from_file(target.pid(), &exe)?.is_some(), "round {round}: probes should be in place");
    }
    let mut detach = start_inject(&["detach".into(), "--pid".into(), pid_arg(&target)], false)?;
    ensure!(detach.wait(MINUTE)?.success(), "inject detach failed:\n{}", detach.transcript());
    ensure!(detach.transcript().contains("restored"), "{}", detach.transcript());
    if let Some(at) = text_differs_from_file(target.pid(), &exe)? {
        bail!("code at {at:#x} not restored by inject detach:\n{}", detach.transcript());
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.pid()))?;
    ensure!(!maps.contains("inject-ring"), "the ring is still mapped:\n{maps}");
    let mut again = start_inject(&["detach".into(), "--pid".into(), pid_arg(&target)], false)?;
    ensure!(again.wait(MINUTE)?.success() && again.transcript().contains("nothing to do"), "{}", again.transcript());
    stop_and_check_against_replay(&mut target, &exe, &env)
}

/// inject killed in the middle of one of the system calls it runs in the target (creating
/// the trampoline memory and the ring while attaching, unmapping them while detaching):
/// the hijacked thread finishes the call from its landing pad and carries on, the program
/// computes exactly what an untouched run computes, and `inject detach` leaves the text
/// byte-identical to the executable.
#[test]
fn a_kill_during_an_injected_syscall_leaves_the_target_whole() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tcs = test_toolchains()?;
    let cases = [
        ("mmap", "pad"),
        ("memfd_create", "enter"),
        ("ftruncate", "exit"),
        ("close", "pad"),
        ("munmap", "enter"),
        ("munmap", "exit"),
    ];
    for (tc, flavor) in [(&tcs[0], Flavor::Default), (tcs.last().context("toolchains")?, Flavor::Pie)] {
        let exe = build_fixture("recurse", tc, flavor)?;
        let env = [("GOMAXPROCS", "4")];
        let mut target = start_fixture(&exe, &["-until-stdin", "-n", "20"], &env)?;
        let mut anon_before = exec_anon(&std::fs::read_to_string(format!("/proc/{}/maps", target.pid()))?);
        for (name, point) in cases {
            let what = format!("Go {} {flavor:?}, killed in {name} at {point}", tc.version);
            let mut args: Vec<String> =
                ["--pid", &pid_arg(&target), "--func", "main.depth", "--output", "none"].map(String::from).into();
            if name == "munmap" {
                args.extend(["--duration", "0.3"].map(String::from));
            }
            let stall = format!("{name}:{point}");
            let mut inject = tests::start_inject_env(&args, &[("INJECT_TEST_STALL", &stall)], false)?;
            inject.wait_for("inject: test stall", MINUTE).with_context(|| what.clone())?;
            inject.signal(9);
            inject.wait(MINUTE)?;
            // The program keeps running on its own for a while.
            std::thread::sleep(Duration::from_millis(100));
            ensure!(target.child.try_wait()?.is_none(), "{what}: the target died:\n{}", target.transcript());
            let mut detach = start_inject(&["detach".into(), "--pid".into(), pid_arg(&target)], false)?;
            ensure!(detach.wait(MINUTE)?.success(), "{what}: inject detach failed:\n{}", detach.transcript());
            if let Some(at) = text_differs_from_file(target.pid(), &exe)? {
                bail!("{what}: code at {at:#x} differs from the executable after detach:\n{}", detach.transcript());
            }
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.pid()))?;
            ensure!(!maps.contains("inject-ring"), "{what}: a ring is still mapped:\n{maps}");
            // Its trampoline areas too, even when it died before writing its journal (the
            // ring's name lists them). Killed inside the very first mmap, before the ring
            // exists, nothing names the area that call makes: that one stays (never executed).
            let left = exec_anon(&maps) - anon_before;
            let allowed = usize::from(name == "mmap");
            ensure!(left <= allowed, "{what}: {left} trampoline areas still mapped:\n{maps}");
            anon_before += left;
            // Nor a descriptor of the ring (killed between memfd_create and close).
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", target.pid()))?
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.display().to_string())
                .filter(|l| l.contains("inject-ring"))
                .collect();
            ensure!(fds.is_empty(), "{what}: ring descriptors left open: {fds:?}");
        }
        stop_and_check_against_replay(&mut target, &exe, &env)?;
    }
    Ok(())
}

/// A target that dies while probes are in is news: inject says how (while its parent has
/// not collected it yet) and exits 1; one that exits cleanly is not an error.
#[test]
fn a_target_dying_while_attached_is_reported() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("recurse", tc, Flavor::Default)?;
    // SIGABRT: Go's handler dumps the goroutines and exits 2.
    let cases = [(Some(9), "killed by SIGKILL"), (Some(6), "exited with status 2 (Go exits 2"), (None, "")];
    for (how, want) in cases {
        let mut target = start_fixture(&exe, &["-until-stdin", "-n", "20"], &[("GOMAXPROCS", "2")])?;
        let mut inject = start_inject(
            &["--pid".into(), pid_arg(&target), "--func".into(), "main.depth".into(), "--output".into(), "none".into()],
            true,
        )?;
        match how {
            Some(sig) => target.signal(sig),
            None => target.send_line("stop")?,
        }
        // Not reaped until inject is done: its status stays visible in /proc.
        let st = inject.wait(MINUTE)?;
        let said = inject.transcript();
        target.wait(MINUTE)?;
        if how.is_some() {
            ensure!(st.code() == Some(1), "inject exit {st} for a dead target:\n{said}");
            ensure!(said.contains(&format!("died while probes were in: {want}")), "{said}");
        } else {
            ensure!(st.success(), "inject exit {st} for a target that exited cleanly:\n{said}");
            ensure!(said.contains("stopped: target exited with status 0"), "{said}");
        }
    }
    Ok(())
}

/// Verdicts before anything is touched, and clear errors when nothing can be probed.
#[test]
fn dry_run_and_refusals() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("funcs", tc, Flavor::Default)?;
    let target = start_fixture(&exe, &["-loop", "-n", "0", "-sleep", "1ms"], &[])?;
    let pid = pid_arg(&target);
    let run = |args: &[&str]| -> Result<Proc> {
        let mut v: Vec<String> = vec!["--pid".into(), pid.clone()];
        v.extend(args.iter().map(|s| s.to_string()));
        let mut p = start_inject(&v, false)?;
        p.wait(MINUTE)?;
        Ok(p)
    };
    let mut p = run(&["--dry-run", "--func", "main.priceOf", "--func", "runtime.mallocgc", "--func", "main.First"])?;
    ensure!(p.child.wait()?.success());
    let t = p.transcript();
    ensure!(t.contains("main.priceOf") && t.contains("would install: entry and"), "{t}");
    ensure!(t.contains("runtime.mallocgc") && t.contains("refused: runtime"), "{t}");
    ensure!(t.contains("main.First") && t.contains("refused"), "{t}");
    let mut p = run(&["--func", "runtime.mallocgc"])?;
    ensure!(
        p.child.wait()?.code() == Some(1) && p.transcript().contains("none of the requested functions"),
        "{}",
        p.transcript()
    );
    let mut p = run(&["--func", "main.noSuchFunction"])?;
    ensure!(p.child.wait()?.code() == Some(1) && p.transcript().contains("no function matches"), "{}", p.transcript());
    ensure!(text_differs_from_file(target.pid(), &exe)?.is_none(), "a refused run changed the text");
    Ok(())
}

/// A function probed at entry only is named at attach with what that means for its calls
/// and why, the first few one by one and the rest counted: the same functions, in the same
/// order, that `--dry-run` calls entry-only.
#[test]
fn entry_only_functions_are_named_at_attach() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        let exe = build_fixture("httpserver", &tc, Flavor::Default)?;
        let target = start_fixture(&exe, &[], &[])?;
        let pid = pid_arg(&target);
        let inject = |extra: &[&str]| -> Result<std::process::Output> {
            let mut args = vec!["--pid", &pid, "--no-libs", "--func", "net/http.*"];
            args.extend_from_slice(extra);
            Ok(std::process::Command::new(xtask::inject_binary()?).args(&args).output()?)
        };
        let plan = inject(&["--dry-run"])?;
        ensure!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
        let planned: Vec<String> = String::from_utf8_lossy(&plan.stdout)
            .lines()
            .filter(|l| l.contains("entry-only"))
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        ensure!(!planned.is_empty(), "{}: no entry-only function in net/http.* to name", tc.version);
        let run = inject(&["--duration", "1", "--output", "none"])?;
        let stderr = String::from_utf8_lossy(&run.stderr);
        ensure!(run.status.success(), "{stderr}");
        let named: Vec<&str> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("inject: note: "))
            .filter_map(|l| l.split_once(" is probed at entry only: its calls show their arguments, not results"))
            .map(|(name, _)| name)
            .collect();
        let first = &planned[..planned.len().min(3)];
        ensure!(named == first, "{}: named {named:?}, planned {first:?}", tc.version);
        match planned.len() - first.len() {
            0 => ensure!(!stderr.contains("more function"), "{}: a count of none in\n{stderr}", tc.version),
            more => {
                let line = format!(
                    "inject: note: {more} more function{} probed at entry only",
                    if more == 1 { " is" } else { "s are" }
                );
                ensure!(stderr.contains(&line), "{}: no `{line}` in\n{stderr}", tc.version);
            }
        }
        ensure!(text_differs_from_file(target.pid(), &exe)?.is_none(), "text not restored");
        eprintln!("{}: {} entry-only functions in net/http.*, {} named", tc.version, planned.len(), first.len());
    }
    Ok(())
}

/// Two injects started together on one process: one instruments it, the other says who
/// holds it and exits 1; never two sets of patches. Checked again inside the install's
/// stop of the world, so a rival that finished in between is seen.
#[test]
fn two_injects_started_together_install_once() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let exe = build_fixture("funcs", &tc, Flavor::Default)?;
    let target = start_fixture(&exe, &["-loop", "-n", "0", "-sleep", "1ms"], &[])?;
    let pid = pid_arg(&target);
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let spawn = || {
            std::process::Command::new(xtask::inject_binary()?)
                .args(["--pid", &pid, "--no-libs", "--func", "main.priceOf", "--duration", "1", "--output", "none"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("inject")
        };
        let (a, b) = (spawn()?, spawn()?);
        let outs = [a.wait_with_output()?, b.wait_with_output()?];
        let ok = outs.iter().filter(|o| o.status.success()).count();
        let refused = outs.iter().filter(|o| {
            let e = String::from_utf8_lossy(&o.stderr);
            o.status.code() == Some(1)
                && ["being instrumented by another inject", "already instrumented", "already traced by pid"]
                    .iter()
                    .any(|m| e.contains(m))
        });
        ensure!(
            ok == 1 && refused.count() == 1,
            "round {round}: {:?}",
            outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect::<Vec<_>>()
        );
        ensure!(text_differs_from_file(target.pid(), &exe)?.is_none(), "round {round}: text not restored");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        ensure!(!maps.contains("inject-ring"), "round {round}: a ring left mapped");
    }
    eprintln!("{ROUNDS} rounds of two injects at once: one installed, one refused, every time");
    Ok(())
}
