//! The uprobe backend (`--backend uprobe`, docs/uprobe.md) against real Go programs: it
//! captures what the trampolines capture, it traces a process another tracer holds (so it
//! never ptraces), and a `kill -9` of inject leaves the target's code as it was, the kernel
//! having removed every uprobe. With CI=true a machine without BPF fails these tests.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::schema::{parse_line, read_summary};
use tests::{require_bpf, scratch, start_fixture, start_inject, text_changes};
use xtask::{Flavor, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(300);

/// Runs the args fixture for `calls` calls of main.record traced by inject with `backend`,
/// returning each call's JSON line by id, the summary and the program's ARGS lines.
fn capture(exe: &std::path::Path, backend: &str, calls: usize) -> Result<(HashMap<i64, Value>, Value, Vec<String>)> {
    let mut target = start_fixture(exe, &["-wait", "-n", &calls.to_string(), "-goroutines", "4"], &[])?;
    let (jsonl, summary) = (scratch(&format!("uprobe-{backend}.jsonl")), scratch(&format!("uprobe-{backend}.json")));
    let args: Vec<String> = [
        "--pid",
        &target.pid().to_string(),
        "--func",
        "main.record",
        "--backend",
        backend,
        "--output",
        "jsonl",
        "--output-file",
        &jsonl.display().to_string(),
        "--summary-json",
        &summary.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut inject = start_inject(&args, true)?;
    target.send_line("go")?;
    ensure!(target.wait(LIMIT)?.success(), "target failed");
    ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
    let s = read_summary(&summary)?;
    let mut spans = HashMap::new();
    for line in std::fs::read_to_string(&jsonl)?.lines() {
        let v = parse_line(line)?;
        let id = v["args"]["id"].as_i64().context("id")?;
        ensure!(spans.insert(id, v).is_none(), "{backend}: call {id} reported twice");
    }
    let _ = std::fs::remove_file(&jsonl);
    let printed = target.seen.iter().filter(|(e, l)| !e && l.starts_with("ARGS ")).map(|(_, l)| l.clone()).collect();
    Ok((spans, s, printed))
}

/// The same calls traced by each backend give the same arguments and results, every one
/// of them; only the float, which the kernel does not show a uprobe program, is reported
/// unavailable instead.
#[test]
fn uprobes_capture_what_trampolines_capture() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let calls = 20_000;
    for tc in test_toolchains()? {
        let exe = build_fixture("args", &tc, Flavor::Default)?;
        let (tramp, ts, _) = capture(&exe, "trampoline", calls)?;
        let (up, us, printed) = capture(&exe, "uprobe", calls)?;
        for (s, backend) in [(&ts, "trampoline"), (&us, "uprobe")] {
            ensure!(s["dropped"] == 0 && s["corrupt"] == 0 && s["calls"] == calls, "{backend}: {s}");
            ensure!(s["sites"][0]["backend"] == backend, "{backend}: {}", s["sites"][0]);
        }
        ensure!(us["sites"][0]["verdict"].as_str().is_some_and(|v| v.ends_with("(uprobes)")), "{us}");
        ensure!(tramp.len() == calls && up.len() == calls, "{} and {} of {calls} calls", tramp.len(), up.len());
        ensure!(printed.len() == calls, "the program printed {} calls", printed.len());
        for (id, t) in &tramp {
            let u = &up[id];
            let ctx = || format!("call {id}: trampoline {t}, uprobe {u}");
            ensure!(u["results"] == t["results"], "{}", ctx());
            ensure!(u["goroutine"].as_u64().is_some_and(|g| g > 0), "{}", ctx());
            ensure!(u["duration_ns"].as_u64().is_some(), "{}", ctx());
            let (ta, ua) = (t["args"].as_object().context("args")?, u["args"].as_object().context("args")?);
            ensure!(ta.len() == ua.len(), "{}", ctx());
            for (name, tv) in ta {
                if name == "f" {
                    ensure!(tv.is_number() || tv.is_string(), "{}", ctx());
                    ensure!(ua[name]["unavailable"].is_string(), "{}", ctx());
                } else {
                    ensure!(ua[name] == *tv, "{name}: {}", ctx());
                }
            }
        }
        eprintln!("Go {}: {calls} calls, every argument and result the same with uprobes", tc.version);
    }
    Ok(())
}

/// The tracer of a process, from /proc (0: none).
fn tracer(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// A process strace already traces cannot be ptraced by inject: trampolines fail, and
/// `--backend uprobe` traces every call (so it never ptraces); so does the default, auto,
/// saying it fell back to uprobes.
#[test]
fn a_process_another_tracer_holds_is_traced_with_uprobes() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("a toolchain")?;
    let exe = build_fixture("args", &tc, Flavor::Default)?;
    let calls = 5000;
    for backend in ["uprobe", "auto"] {
        let mut target = start_fixture(&exe, &["-wait", "-n", &calls.to_string(), "-goroutines", "2"], &[])?;
        let pid = target.pid();
        let mut strace = std::process::Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()])
            .spawn()
            .context("starting strace (cargo xtask test installs it)")?;
        let started = Instant::now();
        while tracer(pid) == 0 {
            ensure!(started.elapsed() < Duration::from_secs(10), "strace did not attach to {pid}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let base = |backend: &str, out: &std::path::Path| -> Vec<String> {
            ["--pid", &pid.to_string(), "--func", "main.record", "--backend", backend, "--output", "jsonl"]
                .into_iter()
                .chain(["--output-file", &out.display().to_string()])
                .map(String::from)
                .collect()
        };
        let jsonl = scratch("traced.jsonl");
        let mut refused = start_inject(&base("trampoline", &jsonl), false)?;
        let status = refused.wait(LIMIT)?;
        ensure!(!status.success(), "trampolines attached to a traced process:\n{}", refused.transcript());
        let summary = scratch("traced-summary.json");
        let mut args = base(backend, &jsonl);
        args.extend(["--summary-json".into(), summary.display().to_string()]);
        let mut inject = start_inject(&args, true)?;
        target.send_line("go")?;
        ensure!(target.wait(LIMIT)?.success(), "target failed");
        ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
        let _ = strace.wait();
        if backend == "auto" {
            ensure!(inject.transcript().contains("using uprobes, which need no ptrace"), "{}", inject.transcript());
        }
        let s = read_summary(&summary)?;
        ensure!(s["calls"] == calls && s["dropped"] == 0 && s["sites"][0]["backend"] == "uprobe", "{s}");
        let lines = std::fs::read_to_string(&jsonl)?.lines().count();
        ensure!(lines == calls, "{lines} lines for {calls} calls");
        eprintln!(
            "a process strace holds: trampolines refused ({}), --backend {backend}: uprobes saw {calls} of {calls} calls",
            refused.transcript().lines().find(|l| l.contains("error")).unwrap_or("?")
        );
    }
    Ok(())
}

/// `kill -9` of inject with uprobes in: the kernel takes them out (the code reads as the
/// file again, where each uprobe's INT3 was), and the program runs on to the same output
/// as a run never traced.
#[test]
fn sigkill_of_inject_leaves_no_uprobe() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("a toolchain")?;
    let exe = build_fixture("args", &tc, Flavor::Default)?;
    let args = ["-wait", "-n", "3000", "-goroutines", "1"];
    let mut plain = start_fixture(&exe, &args, &[])?;
    plain.send_line("go")?;
    ensure!(plain.wait(LIMIT)?.success());
    let mut target = start_fixture(&exe, &args, &[])?;
    let pid = target.pid();
    ensure!(text_changes(pid, &exe)?.is_empty(), "code differs before inject");
    let func_args: Vec<String> =
        ["--pid", &pid.to_string(), "--func", "main.record", "--backend", "uprobe", "--output", "none"]
            .map(String::from)
            .to_vec();
    let mut inject = start_inject(&func_args, true)?;
    let changes = text_changes(pid, &exe)?;
    ensure!(changes.len() >= 2 && changes.iter().all(|(_, b)| b == &[0xcc]), "uprobes in: {changes:x?}");
    inject.signal(libc::SIGKILL);
    let _ = inject.wait(LIMIT)?;
    let started = Instant::now();
    loop {
        let left = text_changes(pid, &exe)?;
        if left.is_empty() {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "uprobes left after kill -9: {left:x?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    target.send_line("go")?;
    ensure!(target.wait(LIMIT)?.success(), "target failed after inject was killed");
    let out = |p: &tests::Proc| -> Vec<String> { p.seen.iter().filter(|(e, _)| !e).map(|(_, l)| l.clone()).collect() };
    ensure!(out(&target) == out(&plain), "the program's output changed");
    eprintln!("kill -9 with {} uprobes in: all gone, output unchanged", changes.len());
    Ok(())
}

/// The checked-in BPF object is what clang-19 builds from its source.
#[test]
fn the_bpf_object_is_built_from_its_source() -> Result<()> {
    xtask::bpf::run(true)
}

/// `--backend auto` with a site the patcher refuses (forced with INJECT_REFUSE_TRAMPOLINE):
/// main.record gets trampolines, main.argsFor uprobes, both write into one ring, and every
/// call of each is seen; what argsFor returned (uprobes) is what record was given
/// (trampolines). Dry-run names each site's backend.
#[test]
fn auto_gives_refused_sites_to_uprobes() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("a toolchain")?;
    let exe = build_fixture("args", &tc, Flavor::Default)?;
    let env = [("INJECT_REFUSE_TRAMPOLINE", "main.argsFor")];
    let funcs = ["--func", "main.record", "--func", "main.argsFor"].map(String::from);
    let dry = std::process::Command::new(xtask::inject_binary()?)
        .args(["--exe", &exe.display().to_string(), "--dry-run"])
        .args(&funcs)
        .envs(env)
        .output()?;
    let text = String::from_utf8_lossy(&dry.stdout);
    let line = |f: &str| text.lines().find(|l| l.contains(f)).unwrap_or_default().to_string();
    ensure!(line("main.record").ends_with("(trampoline)") && line("main.argsFor").ends_with("(uprobes)"), "{text}");
    let calls = 20_000;
    let mut target = start_fixture(&exe, &["-wait", "-n", &calls.to_string(), "-goroutines", "4"], &[])?;
    let (jsonl, summary) = (scratch("auto.jsonl"), scratch("auto-summary.json"));
    let mut args: Vec<String> = ["--pid", &target.pid().to_string(), "--output", "jsonl"].map(String::from).to_vec();
    args.extend(funcs);
    args.extend([
        "--output-file".into(),
        jsonl.display().to_string(),
        "--summary-json".into(),
        summary.display().to_string(),
    ]);
    let mut inject = tests::start_inject_env(&args, &env, true)?;
    target.send_line("go")?;
    ensure!(target.wait(LIMIT)?.success(), "target failed");
    ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
    let s = read_summary(&summary)?;
    ensure!(s["dropped"] == 0 && s["calls"] == 2 * calls, "{s}");
    let sites = s["sites"].as_array().context("sites")?;
    for (name, backend) in [("main.record", "trampoline"), ("main.argsFor", "uprobe")] {
        let site = sites.iter().find(|x| x["name"] == name).context("site")?;
        ensure!(site["backend"] == backend && site["entries"] == calls && site["returns"] == calls, "{site}");
    }
    let (mut given, mut returned) = (HashMap::new(), HashMap::new());
    for l in std::fs::read_to_string(&jsonl)?.lines() {
        let v = parse_line(l)?;
        match v["name"].as_str() {
            Some("main.record") => given.insert(v["args"]["id"].as_i64().context("id")?, v),
            Some("main.argsFor") => returned.insert(v["args"]["id"].as_i64().context("id")?, v),
            other => bail!("unexpected {other:?}"),
        };
    }
    ensure!(given.len() == calls && returned.len() == calls, "{} and {} calls", given.len(), returned.len());
    for (id, r) in &given {
        let a = &returned[id]["results"];
        let ctx = || format!("call {id}: record {r}, argsFor {}", returned[id]);
        ensure!(a["~r0"] == r["args"]["neg"] && a["~r1"] == r["args"]["s"], "{}", ctx());
        ensure!(a["~r3"] == r["args"]["b"] && a["~r4"] == r["args"]["ok"], "{}", ctx());
    }
    let _ = std::fs::remove_file(&jsonl);
    eprintln!("auto: {calls} calls by trampolines and {calls} by uprobes, one ring, values agreeing");
    Ok(())
}

/// A test build of the program with `define` set, and `fixture` built by the newest Go.
fn variant(define: &str, fixture: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let object = scratch(&format!("{define}.bpf.o"));
    xtask::bpf::build_with(&object, &[&format!("-D{define}")])?;
    let tc = test_toolchains()?.pop().context("a toolchain")?;
    Ok((object, build_fixture(fixture, &tc, Flavor::Default)?))
}

/// A program the kernel's verifier refuses (a variant built with `-DINJECT_REJECTED`,
/// given through INJECT_BPF_OBJECT): inject exits 1 with one error line carrying the
/// verifier's reason, never a panic, and leaves the code as it was.
#[test]
fn a_verifier_rejection_is_reported_by_its_reason() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let (object, exe) = variant("INJECT_REJECTED", "args")?;
    let target = start_fixture(&exe, &["-wait"], &[])?;
    let args = ["--pid", &target.pid().to_string(), "--func", "main.record", "--backend", "uprobe"].map(String::from);
    let mut inject = tests::start_inject_env(&args, &[("INJECT_BPF_OBJECT", &object.display().to_string())], false)?;
    let status = inject.wait(LIMIT)?;
    let t = inject.transcript();
    ensure!(status.code() == Some(1) && !t.contains("panicked"), "{t}");
    let errors: Vec<&str> = t.lines().filter(|l| l.contains("inject: error:")).collect();
    ensure!(
        errors.len() == 1 && errors[0].contains("verifier rejected") && errors[0].contains("invalid mem access"),
        "{t}"
    );
    ensure!(text_changes(target.pid(), &exe)?.is_empty(), "a rejected program left the code changed");
    let _ = std::fs::remove_file(&object);
    eprintln!("rejected: {}", errors[0].trim());
    Ok(())
}

/// A launched program that makes its calls and exits within a millisecond, while both
/// cores are busy: every call is in the output, even when the pump had not yet moved
/// the records out of the kernel's buffer when the program exited (the collector's last
/// look waits for it). Five runs each on the oldest and newest Go.
/// The programs that write a request's `traceparent` (`inject_line`, `inject_undo`) pass
/// the verifier. Where the kernel refuses `bpf_probe_write_user` (lockdown: this VM), a
/// build whose writes are `bpf_trace_printk` calls of the same bytes (verified alike, failing
/// at run time) is loaded instead: the programs load, nothing says outgoing context is off,
/// no line is written, and the front's requests and spans are as usual.
#[test]
fn the_header_writing_programs_pass_the_verifier() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let (object, exe) = variant("INJECT_WRITES_CHECKED", "httpserver")?;
    let back = start_fixture(&exe, &[], &[])?;
    let backend = format!("http://{}/hello", back.value("LISTEN").context("back LISTEN")?);
    let mut front = start_fixture(&exe, &["-backend", &backend], &[])?;
    let addr = front.value("LISTEN").context("front LISTEN")?;
    let (jsonl, summary) = (scratch("writes-checked.jsonl"), scratch("writes-checked.json"));
    let args = [
        "--pid",
        &front.pid().to_string(),
        "--backend",
        "uprobe",
        "--output",
        "jsonl",
        "--output-file",
        &jsonl.display().to_string(),
        "--summary-json",
        &summary.display().to_string(),
    ]
    .map(String::from);
    let env = [("INJECT_BPF_OBJECT", object.display().to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut inject = tests::start_inject_env(&args, &env, true)?;
    for _ in 0..3 {
        let (code, body) = tests::http_get(&addr, "/fanout")?;
        ensure!(code == 200 && body.matches("backend=200").count() == 3, "/fanout: {code} {body}");
    }
    inject.signal(15);
    ensure!(inject.wait(LIMIT)?.success(), "inject:\n{}", inject.transcript());
    let t = inject.transcript();
    ensure!(!t.contains("outgoing trace context off") && !t.contains("rejected"), "{t}");
    let s = read_summary(&summary)?;
    ensure!(s["http_injected"] == 0, "lines written with the checked build: {}", s["http_injected"]);
    let spans: Vec<Value> = std::fs::read_to_string(&jsonl)?.lines().map(parse_line).collect::<Result<_>>()?;
    let kinds = |k: &str| spans.iter().filter(|v| v["kind"] == k).count();
    ensure!(kinds("SERVER") == 3 && kinds("CLIENT") == 9, "{} spans: {spans:?}", spans.len());
    front.signal(15);
    ensure!(front.wait(LIMIT)?.success(), "the front failed:\n{}", front.transcript());
    for f in [&object, &jsonl, &summary] {
        let _ = std::fs::remove_file(f);
    }
    eprintln!("inject_line and inject_undo verified; 3 requests, 12 spans, no line written");
    Ok(())
}

#[test]
fn a_short_launched_program_loses_no_call_to_uprobes() -> Result<()> {
    if !require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let busy: Vec<std::process::Child> = (0..2)
        .map(|_| std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn())
        .collect::<std::io::Result<_>>()?;
    let result = (|| -> Result<()> {
        for tc in test_toolchains()? {
            let exe = build_fixture("tree", &tc, Flavor::Stripped)?;
            for run in 0..5 {
                let jsonl = scratch(&format!("uprobe-short-{}-{run}.jsonl", tc.version));
                let out = std::process::Command::new(xtask::inject_binary()?)
                    .args(["--backend", "uprobe", "--func", "main.handle", "--func", "main.query"])
                    .args(["--output", "jsonl", "--output-file"])
                    .arg(&jsonl)
                    .arg("--")
                    .arg(&exe)
                    .args(["-n", "20", "-sleep", "0"])
                    .output()?;
                ensure!(out.status.success(), "Go {} run {run}: {}", tc.version, String::from_utf8_lossy(&out.stderr));
                let lines = std::fs::read_to_string(&jsonl)?;
                let _ = std::fs::remove_file(&jsonl);
                let n = |name: &str| lines.lines().filter(|l| l.contains(&format!("\"name\":\"{name}\""))).count();
                ensure!(
                    (n("main.handle"), n("main.query")) == (20, 40),
                    "Go {} run {run}: {} handle and {} query calls of 20 and 40:\n{}",
                    tc.version,
                    n("main.handle"),
                    n("main.query"),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    })();
    for mut b in busy {
        let _ = b.kill();
        let _ = b.wait();
    }
    result
}
