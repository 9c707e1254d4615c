//! The console's tree view on real programs: each request prints as one block, root first
//! and every call under its parent in start order (calls from goroutines the request
//! started included), a span continuing a remote parent starts its own block, and every
//! call made is printed exactly once; `--output lines` keeps the old end-order lines.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::{Proc, require_ptrace, scratch, start_fixture, start_inject};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(120);
/// The wall-clock column (`15:04:05.123456`), which offsets (`+1.25ms`) are aligned to.
const TIME_WIDTH: usize = 15;

/// One printed call or span.
#[derive(Debug, Clone)]
struct Line {
    /// The wall-clock start (a block's top), else None.
    clock: Option<String>,
    /// Offset from its block's top, ns (0 for a top).
    offset_ns: f64,
    indent: usize,
    /// After the indentation.
    text: String,
}

impl Line {
    fn late(&self) -> bool {
        self.text.contains("  [late: under ")
    }
}

/// `1.25ms`, `+3.0µs`, `812ns`, `1.002s` in ns.
fn parse_duration(s: &str) -> Result<f64> {
    let s = s.trim_start_matches('+');
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e9)
    } else {
        bail!("not a duration: {s:?}")
    };
    Ok(num.parse::<f64>().with_context(|| format!("duration {s:?}"))? * unit)
}

/// A console line: time column, ` g<goid padded to 5> `, indentation, text.
fn parse_line(l: &str) -> Result<Line> {
    // Characters, not bytes: `µs` is padded as two.
    let cut = l.char_indices().nth(TIME_WIDTH).with_context(|| format!("short line {l:?}"))?.0;
    let (time, rest) = l.split_at(cut);
    let rest = rest.strip_prefix(" g").with_context(|| format!("no goroutine column in {l:?}"))?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    ensure!(digits > 0, "no goroutine id in {l:?}");
    let after = rest.get(digits.max(5) + 1..).with_context(|| format!("nothing after the goroutine in {l:?}"))?;
    let indent = after.len() - after.trim_start_matches(' ').len();
    let time = time.trim_start();
    let (clock, offset_ns) = if time.starts_with('+') || time.starts_with('-') {
        (None, parse_duration(time).with_context(|| format!("offset in {l:?}"))?)
    } else {
        ensure!(time.len() == TIME_WIDTH && time.get(2..3) == Some(":"), "neither clock nor offset: {l:?}");
        (Some(time.to_string()), 0.0)
    };
    Ok(Line { clock, offset_ns, indent, text: after.trim_start_matches(' ').to_string() })
}

/// A printed block: its top and the lines under it, each with the index of its parent
/// line (the nearest line above it indented less).
#[derive(Debug)]
struct Block {
    lines: Vec<Line>,
    parents: Vec<Option<usize>>,
}

impl Block {
    fn root(&self) -> &Line {
        &self.lines[0]
    }
    /// Lines whose text starts with `prefix`, with their parent's text.
    fn find(&self, prefix: &str) -> Vec<(usize, Option<&Line>)> {
        (0..self.lines.len())
            .filter(|&i| self.lines[i].text.starts_with(prefix))
            .map(|i| (i, self.parents[i].map(|p| &self.lines[p])))
            .collect()
    }
}

/// inject's console output (stdout) as blocks; fails on any line that is not a call or
/// span (a flush header, a gap), and on late lines, none of which these runs should give.
fn blocks(inject: &Proc) -> Result<Vec<Block>> {
    let mut out: Vec<Block> = Vec::new();
    for (_, l) in inject.seen.iter().filter(|(err, _)| !err) {
        ensure!(!l.starts_with("---"), "held spans were flushed or records dropped: {l:?}\n{}", inject.transcript());
        let line = parse_line(l)?;
        ensure!(!line.late(), "a late line: {l:?}");
        if line.clock.is_some() {
            ensure!(line.indent == 0, "a block's top is not indented: {l:?}");
            out.push(Block { lines: vec![line], parents: vec![None] });
            continue;
        }
        let b = out.last_mut().with_context(|| format!("{l:?} comes before any block"))?;
        let parent = (0..b.lines.len()).rev().find(|&i| b.lines[i].indent < line.indent);
        let p = parent.with_context(|| format!("{l:?} has no parent line"))?;
        ensure!(line.indent == b.lines[p].indent + 2, "indented more than one level under its parent: {l:?}");
        b.lines.push(line);
        b.parents.push(parent);
    }
    for b in &out {
        // Siblings in start order: each line's offset is no less than the previous
        // sibling's, and a child starts no earlier than its parent.
        for i in 1..b.lines.len() {
            let sibling = (1..i).rev().find(|&j| b.parents[j] == b.parents[i]);
            let floor = sibling.or(b.parents[i]).map_or(0.0, |j| b.lines[j].offset_ns);
            ensure!(b.lines[i].offset_ns >= floor, "not in start order: {:?} after {:?}", b.lines[i], b.lines);
        }
    }
    Ok(out)
}

/// The summary's returns per function name.
fn returns(summary: &Value) -> HashMap<String, u64> {
    summary["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["name"].as_str().unwrap_or_default().to_string(), s["returns"].as_u64().unwrap_or(0)))
        .collect()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The `id=N` argument of a `main.*(id=N, ...)` line.
fn id_arg(text: &str) -> Result<i64> {
    let rest = text.split_once("(id=").with_context(|| format!("no id in {text:?}"))?.1;
    Ok(rest.split([',', ')']).next().unwrap_or_default().parse()?)
}

/// Runs the tree fixture for `n` requests under `inject --output FORMAT`; returns inject
/// (its output read to the end) and its summary.
fn tree_run(tc: &GoToolchain, n: usize, format: &str) -> Result<(Proc, Value)> {
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    let mut fx = start_fixture(&exe, &["-wait", "-n", &n.to_string(), "-sleep", "2ms"], &[])?;
    let summary = scratch(&format!("console-tree-{format}.json"));
    let pid = fx.pid().to_string();
    let s = summary.display().to_string();
    let mut inj = start_inject(
        &args(&[
            "--pid",
            &pid,
            "--func",
            "main.handle",
            "--func",
            "main.query",
            "--func",
            "main.render",
            "--output",
            format,
            "--summary-json",
            &s,
        ]),
        true,
    )?;
    fx.send_line("go")?;
    ensure!(fx.wait_for("REQUESTS ", LIMIT)? == format!("REQUESTS {n}"), "fixture");
    ensure!(fx.wait(LIMIT)?.success(), "fixture failed:\n{}", fx.transcript());
    // The target exited: inject drains, prints and stops by itself.
    let st = inj.wait(LIMIT)?;
    ensure!(st.success(), "inject failed: {st}\n{}", inj.transcript());
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
    let _ = std::fs::remove_file(scratch(&format!("console-tree-{format}.json")));
    ensure!(summary["dropped"] == 0 && summary["open_calls"] == 0, "{summary}");
    Ok((inj, summary))
}

#[test]
fn each_request_prints_as_a_tree_root_first_children_in_start_order() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const N: usize = 20;
    for tc in test_toolchains()? {
        let (inj, summary) = tree_run(&tc, N, "console")?;
        let r = returns(&summary);
        ensure!(
            (r["main.handle"], r["main.query"], r["main.render"]) == (N as u64, 2 * N as u64, N as u64),
            "{}: calls made {r:?}",
            tc.version
        );
        let blocks = blocks(&inj)?;
        ensure!(blocks.len() == N, "{}: {} blocks for {N} requests:\n{}", tc.version, blocks.len(), inj.transcript());
        let mut printed = 0;
        for (i, b) in blocks.iter().enumerate() {
            let i = i as i64;
            let texts: Vec<&str> = b.lines.iter().map(|l| l.text.as_str()).collect();
            let ctx = || format!("{}: request {i}: {texts:#?}", tc.version);
            // handle(i) { query(i); query(i+1); render(i) }: the root first, then the
            // children in the order they ran, each under it, with growing offsets.
            ensure!(b.lines.len() == 4, "{}", ctx());
            let names: Vec<&str> = texts.iter().map(|t| t.split('(').next().unwrap_or_default()).collect();
            ensure!(names == ["main.handle", "main.query", "main.query", "main.render"], "{}", ctx());
            let ids = texts.iter().map(|t| id_arg(t)).collect::<Result<Vec<_>>>()?;
            ensure!(ids == [i, i, i + 1, i], "{}", ctx());
            ensure!(b.parents == [None, Some(0), Some(0), Some(0)], "{}", ctx());
            ensure!(
                b.lines[1].offset_ns < b.lines[2].offset_ns && b.lines[2].offset_ns < b.lines[3].offset_ns,
                "{}",
                ctx()
            );
            // The second query starts after the first one's 2 ms sleep.
            ensure!(b.lines[2].offset_ns >= 2e6, "{}", ctx());
            for l in &b.lines[1..3] {
                let dur = l.text.rsplit_once("  ").map(|d| d.1).context("duration")?;
                ensure!(parse_duration(dur)? >= 2e6, "a query sleeps 2 ms: {}", ctx());
            }
            printed += b.lines.len();
        }
        ensure!(printed == 4 * N, "{}: {printed} lines for {} calls", tc.version, 4 * N);

        // The lines view: the same calls, each printed as it returned (children first),
        // indented by stack depth.
        let (inj, _) = tree_run(&tc, N, "lines")?;
        let lines: Vec<Line> =
            inj.seen.iter().filter(|(e, _)| !e).map(|(_, l)| parse_line(l)).collect::<Result<_>>()?;
        ensure!(lines.len() == 4 * N, "{}: {} lines:\n{}", tc.version, lines.len(), inj.transcript());
        for (i, req) in lines.chunks(4).enumerate() {
            let shape: Vec<(usize, &str)> =
                req.iter().map(|l| (l.indent, l.text.split('(').next().unwrap_or_default())).collect();
            ensure!(
                shape == [(2, "main.query"), (2, "main.query"), (2, "main.render"), (0, "main.handle")]
                    && req.iter().all(|l| l.clock.is_some()),
                "{}: request {i} in the lines view: {req:#?}",
                tc.version
            );
        }
        eprintln!("Go {}: {N} requests, {printed} calls printed as {N} trees", tc.version);
    }
    Ok(())
}

/// A free port on the loopback interface (the server must know its own address before
/// it binds, to call itself as its backend).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `[span X]` or `parent X (remote)` of a library span's line.
fn id_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_once(key).map(|(_, r)| r.split([' ', ']']).next().unwrap_or_default())
}

#[test]
fn fanout_requests_print_as_trees_with_their_goroutines_and_remote_children_as_their_own() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const N: usize = 40;
    for tc in test_toolchains()? {
        let exe = build_fixture("httpserver", &tc, Flavor::Default)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let backend = format!("http://{addr}/hello");
        let server = start_fixture(&exe, &["-addr", &addr, "-backend", &backend], &[])?;
        let summary = scratch("console-fanout.json");
        let (pid, s) = (server.pid().to_string(), summary.display().to_string());
        let funcs = ["main.(*server).fanout", "main.(*server).worker", "main.spin", "main.hello"];
        let mut a = args(&["--pid", &pid, "--output", "console", "--summary-json", &s]);
        for f in funcs {
            a.extend(args(&["--func", f]));
        }
        let mut inj = start_inject(&a, true)?;
        // Four requests at a time: their blocks must not mix.
        let load = build_fixture("load", &tc, Flavor::Default)?;
        let url = format!("http://{addr}/fanout");
        let out = std::process::Command::new(&load).args(["-url", &url, "-n", &N.to_string(), "-c", "4"]).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && stdout.contains(&format!("ok={N} ")), "{}: load: {stdout}", tc.version);
        inj.signal(2);
        let st = inj.wait(LIMIT)?;
        ensure!(st.success(), "inject failed: {st}\n{}", inj.transcript());
        let summary: Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
        let _ = std::fs::remove_file(scratch("console-fanout.json"));
        ensure!(summary["dropped"] == 0, "{summary}");
        let r = returns(&summary);
        let made: Vec<u64> = funcs.iter().map(|f| r.get(*f).copied().unwrap_or(0)).collect();
        let n = N as u64;
        ensure!(made == [n, 3 * n, 3 * n, 3 * n], "{}: calls made {r:?}", tc.version);

        let blocks = blocks(&inj)?;
        let ctx = |b: &Block| format!("{}: {:#?}", tc.version, b.lines.iter().map(|l| &l.text).collect::<Vec<_>>());
        let (mut fanouts, mut hellos) = (0, 0);
        let (mut client_ids, mut remote_parents) = (HashSet::new(), HashSet::new());
        let mut printed = 0;
        for b in &blocks {
            printed += b.lines.len();
            let root = &b.root().text;
            if root.starts_with("SERVER GET /hello [") {
                // The backend's request: its parent (the client span) is "remote" (it came
                // in a traceparent), so it is a tree of its own, with the handler under it.
                hellos += 1;
                let parent = id_after(root, " parent ").with_context(|| ctx(b))?;
                ensure!(root.contains(" (remote)]") && remote_parents.insert(parent.to_string()), "{}", ctx(b));
                let hello = b.find("main.hello(");
                ensure!(b.lines.len() == 2 && hello.len() == 1 && b.parents[hello[0].0] == Some(0), "{}", ctx(b));
                continue;
            }
            ensure!(root.starts_with("SERVER GET /fanout [trace "), "an unexpected block: {}", ctx(b));
            fanouts += 1;
            // SERVER GET /fanout
            //   main.(*server).fanout
            //     main.(*server).worker x3 (each on its own goroutine)
            //       main.spin
            //   CLIENT GET x3 (children of the request's span, from the workers' goroutines)
            ensure!(b.lines.len() == 11, "{}", ctx(b));
            let fanout = b.find("main.(*server).fanout(");
            ensure!(fanout.len() == 1 && b.parents[fanout[0].0] == Some(0), "{}", ctx(b));
            let workers = b.find("main.(*server).worker(");
            ensure!(workers.len() == 3 && workers.iter().all(|w| b.parents[w.0] == Some(fanout[0].0)), "{}", ctx(b));
            let spins = b.find("main.spin(");
            let under: HashSet<Option<usize>> = spins.iter().map(|s| b.parents[s.0]).collect();
            let worker_lines: HashSet<Option<usize>> = workers.iter().map(|w| Some(w.0)).collect();
            ensure!(spins.len() == 3 && under == worker_lines, "a spin under each worker: {}", ctx(b));
            let clients = b.find("CLIENT GET [span ");
            ensure!(clients.len() == 3, "{}", ctx(b));
            for (i, parent) in &clients {
                let p = parent.map(|p| p.text.as_str()).unwrap_or_default();
                ensure!(p.starts_with("SERVER GET /fanout") || p.starts_with("main.(*server).worker("), "{}", ctx(b));
                ensure!(b.lines[*i].text.contains(&format!("url.full=\"{backend}\"")), "{}", ctx(b));
                client_ids.insert(id_after(&b.lines[*i].text, "[span ").with_context(|| ctx(b))?.to_string());
            }
        }
        ensure!(fanouts == N && hellos == 3 * N, "{}: {fanouts} fanout and {hellos} hello trees", tc.version);
        ensure!(
            client_ids.len() == 3 * N && client_ids == remote_parents,
            "{}: each backend request's tree names one of the client spans printed as its parent",
            tc.version
        );
        // Every call and span made is printed once: 4 + 3 x 3 lines per request's tree, 2
        // per backend request.
        let expected = made.iter().sum::<u64>() + n + 3 * n + 3 * n;
        ensure!(printed as u64 == expected, "{}: {printed} lines printed, {expected} calls and spans", tc.version);
        eprintln!("Go {}: {N} fanout requests, {printed} calls and spans in {} trees", tc.version, blocks.len());
    }
    Ok(())
}
