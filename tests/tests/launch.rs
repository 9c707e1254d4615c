//! Launch mode, `inject [OPTIONS] -- PROGRAM [ARGS...]`: the program starts with its probes
//! in (its first call is traced), and to whatever started it inject behaves like the
//! program: output, arguments, environment and working directory untouched, signals
//! forwarded, exit status passed through, orphans reaped as PID 1, and a program that
//! cannot be instrumented still runs (unless --strict).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tests::otlp::{Receiver, Transport};
use tests::{Proc, is_root, require_ptrace, scratch, send_signal};
use xtask::{Flavor, build_fixture, inject_binary, test_toolchains};

const LIMIT: Duration = Duration::from_secs(60);

/// `inject ARGS -- PROGRAM...` as PID 1 of a fresh PID namespace, as user nobody with no
/// capabilities (util-linux unshare and setpriv, run as root by the test).
fn in_namespace(inject_args: &[String], program: &[String], env: &[(&str, &str)]) -> Result<Proc> {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child"]);
    c.args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]);
    c.arg(inject_binary()?).args(inject_args).arg("--").args(program);
    for (k, v) in env {
        c.env(k, v);
    }
    Proc::spawn(c, "unshare inject")
}

/// Processes whose parent is `ppid`: (pid, state, command line).
fn children_of(ppid: i32) -> Vec<(i32, char, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            let state = f[0].chars().next().unwrap_or('?');
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((pid, state, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// inject's pid as seen from here: the only child of the unshare process (after setpriv's exec).
fn inject_pid(unshare: &Proc) -> Result<i32> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some((pid, _, cmd)) = children_of(unshare.pid()).first()
            && cmd.contains("inject")
        {
            return Ok(*pid);
        }
        ensure!(Instant::now() < deadline, "no inject under unshare");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn require_namespaces() -> Result<bool> {
    if !require_ptrace()? {
        return Ok(false);
    }
    if !is_root() {
        ensure!(!xtask::in_ci(), "the launch-mode tests need root to create PID namespaces, and CI=true");
        eprintln!("SKIP: not root: cannot create a PID namespace");
        return Ok(false);
    }
    Ok(true)
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(LIMIT))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    Ok(r)
}

#[test]
fn http_server_as_pid_1_unprivileged_traced_from_its_first_request() -> Result<()> {
    if !require_namespaces()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let rx = Receiver::start(Transport::Http)?;
    for tc in test_toolchains()? {
        let exe = build_fixture("httpserver", &tc, Flavor::Default)?;
        let before = rx.span_count();
        let endpoint = rx.endpoint();
        let args = vec!["--func".to_string(), "main.hello".into(), "--func".into(), "main.warmUp".into()];
        let mut p = in_namespace(
            &args,
            &[exe.display().to_string()],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "50")],
        )?;
        let listen = p.wait_for("LISTEN ", LIMIT)?;
        let addr = listen.trim_start_matches("LISTEN ").to_string();
        p.wait_for("READY", LIMIT)?;
        let inject = inject_pid(&p)?;
        // The fixture's own warm-up request, made before READY, is the very first request:
        // its spans prove the probes were in before main.main ran.
        rx.wait_spans(before + 2, LIMIT).context("warm-up spans")?;
        let reply = http_get(&addr, "/hello")?;
        ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        rx.wait_spans(before + 3, LIMIT).context("request span")?;
        send_signal(inject, 15);
        p.wait_for("SHUTDOWN", LIMIT).context("graceful shutdown after SIGTERM")?;
        let st = p.wait(LIMIT)?;
        ensure!(st.code() == Some(0), "{}: exit {st}\n{}", tc.version, p.transcript());
        let spans = rx.spans();
        let names: Vec<&str> = spans.iter().skip(before as usize).map(|s| s.span.name.as_str()).collect();
        ensure!(
            names.iter().filter(|n| **n == "main.hello").count() == 2 && names.contains(&"main.warmUp"),
            "{}: spans {names:?}",
            tc.version
        );
        let first = spans.iter().skip(before as usize).find(|s| s.span.name == "main.warmUp").context("warmUp")?;
        ensure!(first.resource_str("service.name").as_deref() == Some("httpserver"), "service.name");
        // Our lines go to stderr; stdout is the program's alone.
        let stdout: Vec<&str> = p.seen.iter().filter(|(err, _)| !err).map(|(_, l)| l.as_str()).collect();
        ensure!(
            stdout.len() == 3 && stdout[1] == "READY" && stdout[2] == "SHUTDOWN",
            "stdout is not the program's: {stdout:?}"
        );
    }
    Ok(())
}

#[test]
fn exit_status_signals_and_orphans_pass_through() -> Result<()> {
    if !require_namespaces()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?.display().to_string();
    let args = vec!["--func".to_string(), "main.handle".into(), "--output".into(), "none".into()];
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };

    // Normal exit, and an error exit (the flag package exits 2 on an unknown flag).
    let mut p = in_namespace(&args, &s(&[&exe, "-n", "3", "-sleep", "0"]), &[])?;
    ensure!(p.wait(LIMIT)?.code() == Some(0), "normal exit:\n{}", p.transcript());
    ensure!(p.value("REQUESTS ").as_deref() == Some("3"), "{}", p.transcript());
    ensure!(!p.transcript().contains("while probes were in"), "a clean exit reported as a death:\n{}", p.transcript());
    let mut p = in_namespace(&args, &s(&[&exe, "-no-such-flag"]), &[])?;
    ensure!(p.wait(LIMIT)?.code() == Some(2), "error exit:\n{}", p.transcript());
    ensure!(
        p.transcript().contains("exited with status 2 (Go exits 2"),
        "error exit not reported:\n{}",
        p.transcript()
    );

    // SIGTERM to inject reaches the program, which has no handler: it dies of it, and
    // inject exits 128 + 15. Orphaned grandchildren were reaped by inject as PID 1.
    let mut p = in_namespace(&args, &s(&[&exe, "-until-stdin", "-pause", "1ms", "-orphans", "3"]), &[])?;
    p.wait_for("READY", LIMIT)?;
    let inject = inject_pid(&p)?;
    let fixture_pid = children_of(inject).iter().find(|(_, _, c)| !c.contains("orphan")).map(|c| c.0);
    let mut orphans_seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut zombies = Vec::new();
    while Instant::now() < deadline {
        for (pid, state, cmd) in children_of(inject) {
            if cmd.contains("-orphan-stage 2") {
                orphans_seen.insert(pid);
            }
            if state == 'Z' && Some(pid) != fixture_pid {
                zombies.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(orphans_seen.len() == 3, "orphans re-parented to inject: {orphans_seen:?}");
    // A zombie may be seen for an instant before inject reaps it; one still there after
    // the orphans' 500 ms life and a second more is a leak.
    let left: Vec<_> = children_of(inject).into_iter().filter(|(_, s, _)| *s == 'Z').collect();
    ensure!(left.is_empty(), "zombies left: {left:?} (seen {zombies:?})");
    send_signal(inject, 15);
    let st = p.wait(LIMIT)?;
    ensure!(st.code() == Some(128 + 15), "signal death: exit {st}\n{}", p.transcript());
    ensure!(
        p.transcript().contains("killed by SIGTERM while probes were in"),
        "death not reported:\n{}",
        p.transcript()
    );
    Ok(())
}

#[test]
fn program_sees_its_own_arguments_environment_and_directory() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    let dir = scratch("launch-cwd");
    std::fs::create_dir_all(&dir)?;
    let mut c = Command::new(inject_binary()?);
    c.args(["--func", "main.handle", "--output", "none", "--"]).arg(&exe);
    c.args(["-describe", "-n", "1", "-sleep", "0", "--", "a b", ""]);
    c.current_dir(&dir).env("INJECT_TEST_VAR", "x=1 y");
    let out = c.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{out:?}");
    let want = format!(
        "CWD {}\nARGS -describe -n 1 -sleep 0 -- a b \nENV x=1 y\nREADY\nREQUESTS 1\n",
        dir.canonicalize()?.display()
    );
    ensure!(stdout == want, "stdout:\n{stdout}\nwant:\n{want}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("inject: probing 1 function"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn programs_that_cannot_be_traced_still_run_unless_strict() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let dir = scratch("launch-go119");
    let Some(old) = tests::build_with_go_1_19(
        &dir,
        "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\nfunc main() { fmt.Println(\"hi\"); os.Exit(3) }\n",
    )?
    else {
        return Ok(());
    };
    let old = old.display().to_string();
    let shell = ["/bin/sh", "-c", "echo hi; exit 3"];
    for (program, why) in [(&shell[..], "not a Go"), (&[old.as_str()][..], "too old")] {
        let run = |strict: bool| -> Result<std::process::Output> {
            let mut c = Command::new(inject_binary()?);
            c.args(["--func", "main.main"]);
            if strict {
                c.arg("--strict");
            }
            Ok(c.arg("--").args(program).output()?)
        };
        let out = run(false)?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.code() == Some(3) && stdout == "hi\n", "{program:?}: {out:?}");
        ensure!(
            stderr.contains("warning") && stderr.contains("untraced") && stderr.contains(why),
            "{program:?}: {stderr}"
        );
        let out = run(true)?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.code() == Some(1) && stdout.is_empty(), "--strict {program:?}: {out:?}");
        ensure!(stderr.starts_with("inject: error:") && stderr.contains(why), "--strict {program:?}: {stderr}");
    }
    // A program that does not exist: the shell's 127.
    let out = Command::new(inject_binary()?).args(["--func", "main.main", "--", "/no/such/program"]).output()?;
    ensure!(out.status.code() == Some(127), "{out:?}");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("/no/such/program"), "{out:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `--duration` in launch mode: when it runs out the probes come out (every patch
/// restored, the summary written), and the program runs on under inject to its own end,
/// whose status inject exits with.
#[test]
fn duration_takes_the_probes_out_and_the_program_runs_on() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?.display().to_string();
    let summary = scratch("launch-duration.json");
    // 30 requests of two 50 ms queries: ~3 s, of which the first second is traced.
    let args: Vec<String> = [
        "--duration",
        "1",
        "--func",
        "main.handle",
        "--output",
        "jsonl",
        "--summary-json",
        &summary.display().to_string(),
        "--",
        &exe,
        "-n",
        "30",
        "-sleep",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let mut p = tests::start_inject(&args, false)?;
    let st = p.wait(LIMIT)?;
    let took = started.elapsed();
    ensure!(st.code() == Some(0), "exit {st}\n{}", p.transcript());
    ensure!(p.value("REQUESTS ").as_deref() == Some("30"), "the program ran to its end:\n{}", p.transcript());
    ensure!(took >= Duration::from_millis(2800), "inject exited after {took:?}, before the program's ~3 s");
    let s = tests::schema::read_summary(&summary)?;
    let _ = std::fs::remove_file(&summary);
    ensure!(s["stop"] == "duration", "stop: {}", s["stop"]);
    ensure!(s["restored"].as_u64().is_some_and(|n| n > 0), "patches restored: {}", s["restored"]);
    // JSON lines go to inject's stderr (the transcript marks it "! "), the program's
    // stdout stays its own.
    let lines: Vec<serde_json::Value> = p
        .seen
        .iter()
        .filter(|(err, l)| *err && l.starts_with('{'))
        .map(|(_, l)| tests::schema::parse_line(l))
        .collect::<Result<_>>()?;
    let calls = lines.iter().filter(|l| l["name"] == "main.handle").count();
    ensure!((3..20).contains(&calls), "{calls} of 30 calls traced in the first second of ~3\n{}", p.transcript());
    Ok(())
}
