//! `cargo xtask support`: the core end-to-end checks for every Go of go-versions.toml in
//! the default, stripped (`-s -w`) and PIE builds, printed as the support table the README
//! embeds. Per cell, on the `tree` fixture:
//! - list: `inject functions` finds main.handle;
//! - launch: `inject -- PROGRAM` traces exactly 20 handle and 40 query calls, with the
//!   right argument values where DWARF exists (raw registers when stripped);
//! - attach/detach: `inject --pid` on a running copy sees calls, then restores every patch
//!   and unmaps its memory, and the program finishes normally;
//! - net/http: the httpserver fixture launched under inject with no flags gives server and
//!   client spans joined by W3C trace context, across goroutines, with routes;
//! - gRPC (two more columns, the oldest grpc-go inject supports and the newest that Go
//!   builds): the grpcsvc server launched under inject with no flags; its warm-up call to
//!   itself gives a client span and a server span joined by the `traceparent` field inject
//!   appended to the call's HTTP/2 headers;
//! - the uprobe backend (one more column, default / stripped / PIE): the launch check
//!   again with `--backend uprobe` (kernel uprobes, no ptrace), the same calls and values.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::{Flavor, GoToolchain, build_fixture, inject_binary, toolchain, workspace_root};

fn scratch(name: &str) -> Result<std::path::PathBuf> {
    let d = workspace_root().join("target/support");
    std::fs::create_dir_all(&d)?;
    Ok(d.join(name))
}

fn list(inject: &std::path::Path, exe: &std::path::Path) -> Result<()> {
    let out = crate::output(Command::new(inject).args(["functions", "--json", "--exe"]).arg(exe).arg("main.handle"))?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(rows.as_array().is_some_and(|r| r.len() == 1), "main.handle not listed");
    Ok(())
}

fn launch(inject: &std::path::Path, exe: &std::path::Path, typed: bool, backend: &str) -> Result<()> {
    let jsonl = scratch("launch.jsonl")?;
    let out = Command::new(inject)
        .args(["--backend", backend])
        .args(["--func", "main.handle", "--func", "main.query", "--output", "jsonl", "--output-file"])
        .arg(&jsonl)
        .arg("--")
        .arg(exe)
        .args(["-n", "20", "-sleep", "0"])
        .output()?;
    ensure!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&jsonl)?;
    let spans: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let named = |n: &str| spans.iter().filter(|s| s["name"] == n).count();
    ensure!(
        named("main.handle") == 20 && named("main.query") == 40,
        "{} handle, {} query",
        named("main.handle"),
        named("main.query")
    );
    if typed {
        for s in spans.iter().filter(|s| s["name"] == "main.handle") {
            let id = s["args"]["id"].as_i64().context("args.id")?;
            ensure!(s["args"]["name"] == format!("req-{id}"), "handle({id}) name {}", s["args"]["name"]);
        }
    }
    Ok(())
}

fn attach_detach(inject: &std::path::Path, exe: &std::path::Path) -> Result<()> {
    let mut fx = Command::new(exe)
        .args(["-until-stdin", "-pause", "1ms", "-sleep", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(fx.stdout.take().context("stdout")?).lines();
    let result = (|| -> Result<()> {
        ensure!(lines.next().transpose()?.as_deref() == Some("READY"), "no READY");
        let summary = scratch("attach.json")?;
        crate::output(
            Command::new(inject)
                .args(["--pid", &fx.id().to_string(), "--func", "main.handle", "--duration", "1", "--output", "none"])
                .arg("--summary-json")
                .arg(&summary),
        )?;
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        ensure!(s["sites"][0]["entries"].as_u64().unwrap_or(0) > 0, "no calls seen");
        ensure!(s["restored"].as_u64().unwrap_or(0) > 0 && s["unmapped"] == true, "not restored: {s}");
        Ok(())
    })();
    if let Some(stdin) = fx.stdin.as_mut() {
        let _ = writeln!(stdin, "stop");
    }
    let st = fx.wait()?;
    result?;
    ensure!(st.success(), "the program exited {st} after detach");
    Ok(())
}

fn get(addr: &str, path: &str) -> Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    Ok(r)
}

/// Waits for a line starting with `prefix` on a child's stdout.
fn line_with(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str) -> Result<String> {
    for l in lines {
        let l = l?;
        if l.starts_with(prefix) {
            return Ok(l);
        }
    }
    bail!("no {prefix:?} line")
}

/// net/http spans with no flags: the httpserver fixture launched under inject, calling an
/// uninstrumented twin as its backend. Its own warm-up request gives a client span and a
/// server span joined by the `traceparent` inject wrote; `/fanout` gives three client
/// spans (from goroutines given no context) under its server span; routes are named.
fn http(inject: &std::path::Path, tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("httpserver", tc, flavor)?;
    let mut back = Command::new(&exe).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut back_lines = BufReader::new(back.stdout.take().context("stdout")?).lines();
    let jsonl = scratch("http.jsonl")?;
    let result = (|| -> Result<()> {
        let back_addr = line_with(&mut back_lines, "LISTEN ")?["LISTEN ".len()..].to_string();
        let mut front = Command::new(inject)
            .args(["--output", "jsonl", "--output-file"])
            .arg(&jsonl)
            .arg("--")
            .arg(&exe)
            .args(["-backend", &format!("http://{back_addr}/hello")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(front.stdout.take().context("stdout")?).lines();
        let addr = line_with(&mut lines, "LISTEN ")?["LISTEN ".len()..].to_string();
        line_with(&mut lines, "READY")?;
        for path in ["/fanout", "/items/42"] {
            let reply = get(&addr, path)?;
            ensure!(reply.starts_with("HTTP/1.1 200"), "{path}: {}", reply.lines().next().unwrap_or(""));
        }
        // SAFETY: kill(2) on our own child; inject forwards it and exits with the server.
        unsafe { kill(front.id() as i32, 15) };
        let out = front.wait_with_output()?;
        ensure!(out.status.success(), "inject exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&jsonl)?;
        let spans: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        let find = |name: &str, kind: &str| -> Vec<&serde_json::Value> {
            spans.iter().filter(|s| s["name"] == name && s["kind"] == kind).collect()
        };
        let (clients, warm_server) = (find("GET", "CLIENT"), find("GET /hello", "SERVER"));
        let warm = clients.iter().find(|c| c["attributes"]["url.full"].as_str().is_some_and(|u| u.contains(&addr)));
        let warm = warm.context("no client span for the warm-up request")?;
        ensure!(
            warm_server.iter().any(|s| s["parent_span_id"] == warm["span_id"] && s["trace_id"] == warm["trace_id"]),
            "the warm-up's server span is not the child of its client span"
        );
        let fanout = find("GET /fanout", "SERVER");
        ensure!(fanout.len() == 1, "{} /fanout server spans", fanout.len());
        let children = clients.iter().filter(|c| c["parent_span_id"] == fanout[0]["span_id"]).count();
        ensure!(children == 3, "{children} client spans under /fanout, want 3");
        let route = if tc.version.starts_with("1.21.") { "GET /items/" } else { "GET /items/{id}" };
        ensure!(find(route, "SERVER").len() == 1, "no {route:?} span");
        Ok(())
    })();
    let _ = back.kill();
    let _ = back.wait();
    result
}

/// gRPC spans with no flags: the grpcsvc server (grpc-go `version`) launched under inject;
/// its warm-up Check, a call to itself, must give a CLIENT and a SERVER span, the server
/// span the child of the client span through the traceparent inject wrote.
pub fn grpc(inject: &std::path::Path, tc: &GoToolchain, flavor: Flavor, version: &str) -> Result<()> {
    let exe = crate::build_module_fixture("grpcsvc", "google.golang.org/grpc", version, tc, flavor)?;
    let jsonl = scratch("grpc.jsonl")?;
    let mut run = Command::new(inject)
        .args(["--output", "jsonl", "--output-file"])
        .arg(&jsonl)
        .arg("--")
        .arg(&exe)
        .args(["-mode", "server"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(run.stdout.take().context("stdout")?).lines();
    line_with(&mut lines, "READY")?;
    // The warm-up's client returns when the answer arrives; its server span ends when the
    // handler's goroutine is done, a moment later (on a loaded machine, later still): stop
    // only once inject has written it (it flushes every 200 ms), or after 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && !std::fs::read_to_string(&jsonl)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("\"SERVER\"") && l.contains("grpc.health.v1.Health/Check"))
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child; inject forwards it and exits with the server.
    unsafe { kill(run.id() as i32, 15) };
    let out = run.wait_with_output()?;
    ensure!(out.status.success(), "inject exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&jsonl)?;
    let spans: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let find = |kind: &str| spans.iter().find(|s| s["name"] == "grpc.health.v1.Health/Check" && s["kind"] == kind);
    let client = find("CLIENT").context("no client span")?;
    let server = find("SERVER").context("no server span")?;
    ensure!(
        server["parent_span_id"] == client["span_id"] && server["trace_id"] == client["trace_id"],
        "the server span is not the client span's child"
    );
    ensure!(server["attributes"]["rpc.response.status_code"] == "OK", "status {}", server["attributes"]);
    Ok(())
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// The uprobe backend's cell: the launch check with kernel uprobes.
pub fn uprobe_cell(inject: &std::path::Path, tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("tree", tc, flavor)?;
    launch(inject, &exe, flavor != Flavor::Stripped, "uprobe")
}

/// One cell of the table: `tree` built by `tc` as `flavor`.
pub fn cell(inject: &std::path::Path, tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("tree", tc, flavor)?;
    list(inject, &exe).context("list")?;
    launch(inject, &exe, flavor != Flavor::Stripped, "trampoline").context("launch")?;
    attach_detach(inject, &exe).context("attach/detach")?;
    http(inject, tc, flavor).context("net/http")?;
    Ok(())
}

pub fn run() -> Result<()> {
    let inject = inject_binary()?;
    let flavors = [Flavor::Default, Flavor::Stripped, Flavor::Pie];
    let mut table = String::from(
        "| Go | default | stripped (`-s -w`) | PIE | grpc-go v1.60.1 (default / stripped / PIE) | newest grpc-go it builds | uprobe backend (default / stripped / PIE) |\n|---|---|---|---|---|---|---|\n",
    );
    let mut failures = 0;
    let mut mark = |r: Result<()>, what: &str| -> String {
        match r {
            Ok(()) => "✓".into(),
            Err(e) => {
                failures += 1;
                eprintln!("support: {what}: {e:#}");
                format!("✗ {}", format!("{e:#}").lines().next().unwrap_or("").replace('|', "/"))
            }
        }
    };
    for v in crate::go_versions()? {
        let tc = toolchain(&v)?;
        let mut row = format!("| {v} |");
        for flavor in flavors {
            let m = mark(cell(&inject, &tc, flavor), &format!("go{v} {}", flavor.name()));
            row.push_str(&format!(" {m} |"));
        }
        for version in [crate::GRPC_OLDEST, crate::grpc_newest(&v)] {
            let cells: Vec<String> = flavors
                .iter()
                .map(|&f| mark(grpc(&inject, &tc, f, version), &format!("go{v} {} grpc-go {version}", f.name())))
                .collect();
            let label = if version == crate::GRPC_OLDEST { String::new() } else { format!("{version}: ") };
            row.push_str(&format!(" {label}{} |", cells.join(" / ")));
        }
        let cells: Vec<String> = flavors
            .iter()
            .map(|&f| mark(uprobe_cell(&inject, &tc, f), &format!("go{v} {} uprobe", f.name())))
            .collect();
        row.push_str(&format!(" {} |", cells.join(" / ")));
        println!("{row}");
        table.push_str(&row);
        table.push('\n');
    }
    println!("\n{table}");
    println!(
        "✓: functions listed, calls traced at launch with their arguments (raw registers when stripped), attach and detach with every patch restored, net/http server and client spans joined by trace context; gRPC client and server spans joined by the traceparent inject wrote; uprobe backend: the launch check with --backend uprobe."
    );
    if failures > 0 {
        bail!("{failures} cells failed");
    }
    Ok(())
}
