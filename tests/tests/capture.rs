//! Captured arguments and results equal what the program itself saw, for many calls from
//! many goroutines, with nothing dropped; under overload every record is written or
//! counted as dropped and the program is unaffected.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tests::schema::{for_each_line, parse_line, read_jsonl, read_summary};
use tests::{require_ptrace, scratch, start_fixture, start_inject};
use xtask::{Flavor, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(300);

/// Decodes a Go `%q` string (as the fixture prints it) to bytes.
fn unquote(s: &str) -> Result<Vec<u8>> {
    let inner = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).context("quoted")?;
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next().context("escape")? {
            'x' => {
                let h: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&h, 16)?);
            }
            'n' => out.push(b'\n'),
            't' => out.push(b'\t'),
            '"' => out.push(b'"'),
            '\\' => out.push(b'\\'),
            'u' => {
                let h: String = chars.by_ref().take(4).collect();
                let c = char::from_u32(u32::from_str_radix(&h, 16)?).context("\\u")?;
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            e => bail!("unexpected escape \\{e}"),
        }
    }
    Ok(out)
}

/// Splits an ARGS line into fields, keeping quoted strings whole.
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in line.chars() {
        if quoted {
            cur.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
        } else if c == ' ' {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            if c == '"' {
                quoted = true;
            }
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The bytes a captured string or []byte value holds.
fn captured_bytes(v: &Value) -> Result<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Object(o) => match o.get("hex").and_then(Value::as_str) {
            Some(h) => (0..h.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&h[i..i + 2], 16)?)).collect(),
            None => Ok(o.get("value").and_then(Value::as_str).context("value")?.as_bytes().to_vec()),
        },
        other => bail!("not a string capture: {other}"),
    }
}

fn float_eq(text: &str, v: &Value) -> bool {
    let want: f64 = text.parse().unwrap_or(f64::NAN);
    match v {
        Value::String(s) if s == "NaN" => want.is_nan(),
        v => v.as_f64() == Some(want),
    }
}

#[test]
fn captured_values_equal_the_programs_own() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        check_capture(&tc, Flavor::Default, "main.record", 1_000_000, &[])?;
    }
    Ok(())
}

/// A stripped build has no DWARF: with the signature declared in the pattern, every value
/// is named, typed and captured as the program printed it, as with DWARF.
#[test]
fn a_declared_signature_types_a_stripped_build() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let declared = "main.record(id int, neg int, s string, f float64, b []byte, ok bool) (int, string)";
    for tc in test_toolchains()? {
        check_capture(&tc, Flavor::Stripped, declared, 100_000, &[])?;
    }
    Ok(())
}

/// A stripped build with the DWARF of its unstripped twin (`--debug-info`): the same.
#[test]
fn a_debug_twin_types_a_stripped_build() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        let twin = build_fixture("args", &tc, Flavor::Default)?;
        check_capture(
            &tc,
            Flavor::Stripped,
            "main.record",
            100_000,
            &["--debug-info".into(), twin.display().to_string()],
        )?;
    }
    Ok(())
}

/// Runs the args fixture built as `flavor` for `calls` calls of main.record probed as
/// `func` (with `extra` arguments), and checks every captured value against the line the
/// program printed.
fn check_capture(tc: &xtask::GoToolchain, flavor: Flavor, func: &str, calls: usize, extra: &[String]) -> Result<()> {
    {
        let exe = build_fixture("args", tc, flavor)?;
        // Eight goroutines saturating both cores, the default ring: JSON lines output is
        // lossless, so when the collector falls behind the program waits, and nothing is
        // dropped.
        let mut target = start_fixture(&exe, &["-wait", "-n", &calls.to_string(), "-goroutines", "8"], &[])?;
        let (jsonl, summary) = (scratch("capture.jsonl"), scratch("capture-summary.json"));
        let mut args: Vec<String> = vec![
            "--pid".into(),
            target.pid().to_string(),
            "--func".into(),
            func.into(),
            "--output".into(),
            "jsonl".into(),
            "--output-file".into(),
            jsonl.display().to_string(),
            "--summary-json".into(),
            summary.display().to_string(),
        ];
        args.extend_from_slice(extra);
        let mut inject = start_inject(&args, true)?;
        target.send_line("go")?;
        ensure!(target.wait(LIMIT)?.success(), "target failed");
        ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
        let s = read_summary(&summary)?;
        ensure!(s["dropped"] == 0 && s["corrupt"] == 0 && s["calls"] == calls, "{s}");
        let mut spans: HashMap<i64, Value> = HashMap::new();
        for line in std::fs::read_to_string(&jsonl)?.lines() {
            let v = parse_line(line)?;
            let id = v["args"]["id"].as_i64().context("id")?;
            ensure!(spans.insert(id, v).is_none(), "call {id} reported twice");
        }
        ensure!(spans.len() == calls, "{} spans for {calls} calls", spans.len());
        let mut checked = 0;
        for (_, line) in target.seen.iter().filter(|(e, l)| !e && l.starts_with("ARGS ")) {
            let f = fields(line);
            ensure!(f.len() == 10 && f[7] == "=>", "bad line {line:?}");
            let id: i64 = f[1].parse()?;
            let span = spans.get(&id).with_context(|| format!("no span for call {id}"))?;
            let (a, r) = (&span["args"], &span["results"]);
            let ctx = || format!("call {id}: program printed {line:?}, captured {span}");
            ensure!(a["neg"].as_i64() == Some(f[2].parse()?), "{}", ctx());
            ensure!(captured_bytes(&a["s"])? == unquote(&f[3])?, "{}", ctx());
            ensure!(float_eq(&f[4], &a["f"]), "{}", ctx());
            ensure!(captured_bytes(&a["b"])? == unquote(&f[5])?, "{}", ctx());
            ensure!(a["ok"].as_bool() == Some(f[6] == "true"), "{}", ctx());
            ensure!(r["~r0"].as_i64() == Some(f[8].parse()?), "{}", ctx());
            ensure!(captured_bytes(&r["~r1"])? == unquote(&f[9])?, "{}", ctx());
            if id % 100000 == 7 {
                ensure!(a["s"]["len"] == 1 << 20, "the 1 MiB string's true length is reported: {}", ctx());
            }
            checked += 1;
        }
        ensure!(checked == calls, "checked {checked} of {calls}");
        eprintln!("Go {} {}: {checked} calls, every captured value equals the program's", tc.version, flavor.name());
        let _ = std::fs::remove_file(&jsonl);
    }
    Ok(())
}

/// A ring of a few slots and millions of calls per second: the program's results are
/// unchanged and inject survives. Dropping (the default for OTLP): records written plus
/// dropped equal the calls made, and stderr said so while it happened. Lossless (the
/// default for console and JSON lines): every record is written, the program waits.
#[test]
fn overload_drops_are_counted_and_harmless() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("args", tc, Flavor::Default)?;
    for (mode, n) in [("--no-lossless", 2_000_000), ("--lossless", 100_000)] {
        let rounds = 3;
        let bench = n.to_string();
        let args = ["-wait", "-bench", &bench, "-rounds", "3"];
        let mut plain = start_fixture(&exe, &args, &[])?;
        plain.send_line("go")?;
        ensure!(plain.wait(LIMIT)?.success());
        let mut target = start_fixture(&exe, &args, &[])?;
        let (summary, jsonl) = (scratch("overload-summary.json"), scratch("overload.jsonl"));
        let mut inject = start_inject(
            &[
                "--pid".into(),
                target.pid().to_string(),
                "--func".into(),
                "main.add3".into(),
                "--ring-slots".into(),
                "16".into(),
                mode.into(),
                "--output".into(),
                "jsonl".into(),
                "--output-file".into(),
                jsonl.display().to_string(),
                "--summary-json".into(),
                summary.display().to_string(),
            ],
            true,
        )?;
        target.send_line("go")?;
        ensure!(target.wait(LIMIT)?.success(), "target failed");
        ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
        ensure!(target.value("SUM") == plain.value("SUM"), "results changed under overload");
        let s = read_summary(&summary)?;
        // The lines match the documented format, drop records too.
        let mut gaps = 0;
        let lines = for_each_line(&jsonl, |v| {
            gaps += usize::from(v.get("dropped").is_some());
            Ok(())
        })?;
        let _ = std::fs::remove_file(&jsonl);
        let site = &s["sites"][0];
        let written = site["entries"].as_u64().unwrap_or(0) + site["returns"].as_u64().unwrap_or(0);
        let dropped = s["dropped"].as_u64().unwrap_or(0);
        let made = 2 * (n * rounds) as u64;
        ensure!(
            written + dropped == made,
            "{mode}: written {written} + dropped {dropped} != {made} records for the calls made: {s}"
        );
        ensure!(site["dropped"].as_u64() == Some(dropped), "{mode}: drops by function: {s}");
        let warned = inject.transcript().contains("records dropped in the last");
        if mode == "--lossless" {
            ensure!(dropped == 0 && !warned, "{mode}: {dropped} dropped: {s}\n{}", inject.transcript());
        } else {
            ensure!(dropped > 0, "a 16-slot ring must overflow: {s}");
            ensure!(gaps > 0, "{dropped} dropped, but no drop record in the JSON lines");
            ensure!(warned, "no warning while dropping:\n{}", inject.transcript());
        }
        eprintln!(
            "overload {mode}: {written} written, {dropped} dropped, {made} made; {lines} JSON lines, {gaps} of them drop records"
        );
    }
    Ok(())
}

/// Arguments and results the register ABI puts on the stack are copied from it at the
/// entry and at the RET: a struct of ten ints in and out, and a string after nine ints
/// (its bytes too), as the program printed them. Every call names its caller (function,
/// file and line of the call).
#[test]
fn stack_assigned_values_and_callers_are_captured() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie] {
            let exe = build_fixture("funcs", &tc, flavor)?;
            let jsonl = scratch(&format!("stack-{}-{}.jsonl", tc.version, flavor.name()));
            let mut args: Vec<String> = Vec::new();
            for f in ["main.SumBig", "main.MakeBig", "main.Tail"] {
                args.extend(["--func".into(), f.into()]);
            }
            args.push("--callers".into());
            args.extend(["--output", "jsonl", "--output-file"].map(String::from));
            args.push(jsonl.display().to_string());
            args.extend(["--".into(), exe.display().to_string(), "-n".into(), "1".into()]);
            let out = Command::new(xtask::inject_binary()?).args(&args).output()?;
            let what = format!("Go {} {}", tc.version, flavor.name());
            ensure!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            let stdout = String::from_utf8_lossy(&out.stdout);
            ensure!(stdout.contains("CALL main.SumBig {1 2 3 4 5 6 7 8 9 10} => 385"), "{what}: {stdout}");
            let mut got = HashMap::new();
            for v in read_jsonl(&jsonl)? {
                got.insert(v["name"].as_str().unwrap_or_default().to_string(), v);
            }
            let words = |from: u64| serde_json::json!((from..from + 10).map(|i| format!("{i:#x}")).collect::<Vec<_>>());
            let sum = got.get("main.SumBig").context("no main.SumBig")?;
            ensure!(sum["args"]["b"] == words(1) && sum["results"]["~r0"] == 385, "{what}: {sum}");
            let make = got.get("main.MakeBig").context("no main.MakeBig")?;
            ensure!(make["args"]["seed"] == 100 && make["results"]["~r0"] == words(100), "{what}: {make}");
            // Each call names its caller and the line of the call.
            let source = std::fs::read_to_string(xtask::workspace_root().join("fixtures/funcs/main.go"))?;
            let line = source.lines().position(|l| l.contains("SumBig(big))")).context("SumBig's call")? + 1;
            let c = &sum["caller"];
            ensure!(
                c["function"] == "main.callAll" && c["line"] == line,
                "{what}: caller {c}, want main.callAll:{line}"
            );
            ensure!(c["file"].as_str().is_some_and(|f| f.ends_with("funcs/main.go")), "{what}: caller {c}");
            let tail = got.get("main.Tail").context("no main.Tail")?;
            ensure!(tail["args"]["i"] == 9 && tail["args"]["s"] == "on the stack", "{what}: {tail}");
            ensure!(tail["results"]["~r0"] == 45 + 12, "{what}: {tail}");
            let _ = std::fs::remove_file(&jsonl);
        }
    }
    Ok(())
}

/// `--stack N` walks the frame pointers from the call: the caller (with the line of the
/// call), then main.main (the line that called callAll), then runtime.main; at most N
/// frames, stripped and PIE builds alike.
#[test]
fn stacks_name_the_frames_above_the_call() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let source = std::fs::read_to_string(xtask::workspace_root().join("fixtures/funcs/main.go"))?;
    let line_of = |text: &str| source.lines().position(|l| l.contains(text)).map(|i| i + 1);
    let (sum_line, all_line) =
        (line_of("SumBig(big))").context("SumBig")?, line_of("st := callAll(r)").context("callAll")?);
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie, Flavor::Stripped] {
            let exe = build_fixture("funcs", &tc, flavor)?;
            let what = format!("Go {} {}", tc.version, flavor.name());
            let jsonl = scratch(&format!("frames-{}-{}.jsonl", tc.version, flavor.name()));
            let mut args: Vec<String> = ["--func", "main.SumBig", "--stack", "3", "--output", "jsonl", "--output-file"]
                .map(String::from)
                .into();
            args.push(jsonl.display().to_string());
            args.extend(["--".into(), exe.display().to_string(), "-n".into(), "1".into()]);
            let out = Command::new(xtask::inject_binary()?).args(&args).output()?;
            ensure!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            let lines = read_jsonl(&jsonl)?;
            let _ = std::fs::remove_file(&jsonl);
            let call = lines.iter().find(|v| v["name"] == "main.SumBig").with_context(|| format!("{what}: no call"))?;
            let stack = call["stack"].as_array().with_context(|| format!("{what}: no stack: {call}"))?;
            let f = |i: usize| (stack[i]["function"].as_str().unwrap_or_default(), stack[i]["line"].as_u64());
            ensure!(stack.len() == 3, "{what}: {} frames, want 3: {call}", stack.len());
            ensure!(f(0) == ("main.callAll", Some(sum_line as u64)) && call["caller"] == stack[0], "{what}: {call}");
            ensure!(f(1) == ("main.main", Some(all_line as u64)), "{what}: {call}");
            ensure!(f(2).0 == "runtime.main", "{what}: {call}");
        }
    }
    Ok(())
}

/// `--where` shows only the calls its condition holds for, over argument names (from DWARF,
/// or a declared signature on a stripped build) and duration, and counts the others
/// (`--func-metrics` counts every call, shown or not); a
/// name the function does not have is refused (with --strict in launch mode), listing the
/// names it has.
#[test]
fn where_shows_only_the_calls_it_names() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    // loopCalls: priceOf(sku, i%7+1, discounts[i%3]) for i in 0..70, after callAll's two
    // calls (qty 3 and 1).
    let want = (0..70).filter(|i| i % 7 + 1 >= 6 && i % 3 != 0).count();
    for (flavor, func) in [
        (Flavor::Default, "main.priceOf"),
        (Flavor::Stripped, "main.priceOf(sku string, qty int, discount float64) int"),
    ] {
        let exe = build_fixture("funcs", &tc, flavor)?;
        let what = format!("Go {} {}", tc.version, flavor.name());
        let jsonl = scratch(&format!("where-{}.jsonl", flavor.name()));
        let cond = "qty >= 6 && discount > 0 && duration < 1s && sku != \"\"";
        let mut args: Vec<String> = [
            "--func",
            func,
            "--where",
            cond,
            "--func-metrics",
            "--metrics",
            "console",
            "--output",
            "jsonl",
            "--output-file",
        ]
        .map(String::from)
        .into();
        args.push(jsonl.display().to_string());
        args.extend(["--", &exe.display().to_string(), "-loop", "-n", "70", "-sleep", "0"].map(String::from));
        let out = Command::new(xtask::inject_binary()?).args(&args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "{what}: {stderr}");
        let calls = read_jsonl(&jsonl)?;
        let _ = std::fs::remove_file(&jsonl);
        ensure!(calls.len() == want, "{what}: {} calls shown, want {want}", calls.len());
        for c in &calls {
            let a = &c["args"];
            ensure!(a["qty"].as_i64() >= Some(6) && a["discount"].as_f64() > Some(0.0), "{what}: {c}");
        }
        let line = format!("calls shown, {} left out", 72 - want);
        ensure!(stderr.contains(&format!("{want} {line}")), "{what}: no count line in:\n{stderr}");
        // --func-metrics counts every call, shown or not.
        let metric = "inject: metric inject.function.duration {code.function.name=main.priceOf} count=72 ";
        ensure!(stderr.contains(metric), "{what}: no {metric:?} in:\n{stderr}");
    }
    let exe = build_fixture("funcs", &tc, Flavor::Default)?;
    let out = Command::new(xtask::inject_binary()?)
        .args(["--strict", "--func", "main.priceOf", "--where", "qtyy > 1", "--output", "none", "--"])
        .arg(&exe)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "an unknown name: exit {}: {stderr}", out.status);
    ensure!(
        stderr.contains("main.priceOf has no \"qtyy\"; its names: sku, qty, discount, ~r0, goroutine, duration"),
        "{stderr}"
    );
    Ok(())
}

/// Interface arguments show their dynamic type, named from the executable's type
/// descriptors: through the type word of `any`, and through the itab of `error` and
/// `fmt.Stringer`; an error made by `errors.New` shows its message too.
#[test]
fn interface_values_name_their_dynamic_type() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for flavor in [Flavor::Default, Flavor::Pie] {
            let exe = build_fixture("funcs", &tc, flavor)?;
            let target = start_fixture(&exe, &["-loop", "-n", "0", "-sleep", "1ms"], &[])?;
            let jsonl = scratch(&format!("iface-{}-{}.jsonl", tc.version, flavor.name()));
            let mut inject = start_inject(
                &[
                    "--pid".into(),
                    target.pid().to_string(),
                    "--func".into(),
                    "main.Describe".into(),
                    "--func".into(),
                    "main.ErrText".into(),
                    "--func".into(),
                    "main.Show".into(),
                    "--duration".into(),
                    "0.5".into(),
                    "--output".into(),
                    "jsonl".into(),
                    "--output-file".into(),
                    jsonl.display().to_string(),
                ],
                false,
            )?;
            ensure!(inject.wait(LIMIT)?.success(), "inject failed:\n{}", inject.transcript());
            let mut seen = HashMap::new();
            let mut messages = std::collections::HashSet::new();
            for v in read_jsonl(&jsonl)? {
                let name = v["name"].as_str().context("name")?.to_string();
                let arg = v["args"].as_object().and_then(|a| a.values().next().cloned()).context("arg")?;
                if let Some(m) = arg["message"].as_str() {
                    messages.insert(format!("{name}: {m}"));
                }
                seen.insert(name, arg["type"].as_str().unwrap_or_default().to_string());
            }
            // An error of a message-first type (errors.New here) shows its message.
            ensure!(
                messages.contains("main.ErrText: boom"),
                "Go {} {}: error messages {messages:?}",
                tc.version,
                flavor.name()
            );
            let want = [
                ("main.Describe", "main.Point"),
                ("main.ErrText", "*errors.errorString"),
                ("main.Show", "main.Celsius"),
            ];
            for (func, ty) in want {
                ensure!(
                    seen.get(func).map(String::as_str) == Some(ty),
                    "Go {} {}: {func} argument type {:?}, want {ty}",
                    tc.version,
                    flavor.name(),
                    seen.get(func)
                );
            }
        }
    }
    Ok(())
}

/// A launched program that bursts straight after start: a fresh ring has room for every
/// call, so none may be dropped (slots used to count as full until the collector had
/// prepared them, and a burst outran it).
#[test]
fn a_burst_at_launch_loses_nothing() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let exe = build_fixture("args", &tc, Flavor::Default)?;
    // The issue's acceptance: 50 of 50 (each launch takes ~0.2 s).
    const RUNS: usize = 50;
    for run in 0..RUNS {
        let summary = scratch(&format!("burst-{run}.json"));
        let out = std::process::Command::new(xtask::inject_binary()?)
            .args(["--func", "main.record", "--output", "none", "--summary-json"])
            .arg(&summary)
            .arg("--")
            .arg(&exe)
            .args(["-n", "3000", "-goroutines", "2"])
            .env("GOMAXPROCS", "2")
            .output()?;
        ensure!(out.status.success(), "run {run}: {}", String::from_utf8_lossy(&out.stderr));
        let s = read_summary(&summary)?;
        let _ = std::fs::remove_file(&summary);
        let site = &s["sites"][0];
        // 3000 calls and the warm-up call before READY.
        ensure!(
            s["dropped"] == 0 && site["entries"] == 3001 && site["returns"] == 3001,
            "run {run}: {} entries, {} returns, {} dropped",
            site["entries"],
            site["returns"],
            s["dropped"]
        );
    }
    eprintln!("{RUNS} launches, 3001 calls each over 2 goroutines from the start: 0 dropped");
    Ok(())
}

/// Pointer and slice arguments show their fields, copied at the call (DWARF types):
/// `*Line` with its string, a field sharing a word with another, a float, a nil-able
/// pointer (an address at the default depth, its fields at `--max-depth 2`) and a slice's
/// length; a `[]Line`'s elements; and all twelve ints of a function whose last three are
/// on the stack. Console lines and JSON lines alike.
#[test]
fn pointers_and_slices_show_their_fields() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        let exe = build_fixture("funcs", &tc, Flavor::Default)?;
        let what = format!("Go {}", tc.version);
        let run = |extra: &[&str], output: &[&str]| -> Result<String> {
            let mut args: Vec<String> = ["--func", "main.Restock", "--func", "main.Twelve"].map(String::from).to_vec();
            args.extend(extra.iter().chain(output).map(|s| s.to_string()));
            args.extend(["--".into(), exe.display().to_string(), "-n".into(), "1".into()]);
            let out = Command::new(xtask::inject_binary()?).args(&args).output()?;
            ensure!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
            // In launch mode the program has stdout; inject's lines go to stderr.
            Ok(String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let jsonl = scratch(&format!("fields-{}.jsonl", tc.version));
        let path = jsonl.display().to_string();
        run(&[], &["--output", "jsonl", "--output-file", &path])?;
        let mut got = HashMap::new();
        for v in read_jsonl(&jsonl)? {
            got.insert(v["name"].as_str().unwrap_or_default().to_string(), v);
        }
        let restock = got.get("main.Restock").context("no main.Restock")?;
        let l = &restock["args"]["l"];
        let want = |v: &Value, k: &str, w: Value| -> Result<()> {
            ensure!(v[k] == w, "{what}: {k} = {}, want {w}, in {restock}", v[k]);
            Ok(())
        };
        want(l, "SKU", json!("a1"))?;
        want(l, "Qty", json!(3))?;
        want(l, "Rush", json!(true))?;
        want(l, "Price", json!(9.5))?;
        want(l, "Tags", json!({"len": 2}))?;
        ensure!(l["Note"].as_str().is_some_and(|s| s.starts_with("0x")), "{what}: Note at depth 1: {restock}");
        let all = restock["args"]["all"].as_array().context("all is not an array")?;
        ensure!(all.len() == 2, "{what}: {restock}");
        want(&all[0], "SKU", json!("b2"))?;
        want(&all[0], "Qty", json!(1))?;
        want(&all[0], "Rush", json!(false))?;
        want(&all[0], "Price", json!(2.25))?;
        want(&all[0], "Note", Value::Null)?;
        want(&all[1], "SKU", json!("c3"))?;
        want(&all[1], "Qty", json!(40))?;
        ensure!(restock["results"]["~r0"] == 44, "{what}: {restock}");
        let twelve = got.get("main.Twelve").context("no main.Twelve")?;
        for (i, name) in "abcdefghijkl".chars().enumerate() {
            let v = &twelve["args"][name.to_string()];
            ensure!(v == (i + 1) as i64, "{what}: Twelve's {name} = {v}: {twelve}");
        }
        ensure!(twelve["results"]["~r0"] == (1..=12).map(|i| i * i).sum::<i64>(), "{what}: {twelve}");
        let _ = std::fs::remove_file(&jsonl);
        // Two levels: the note's fields; the console's text.
        let text = run(&["--max-depth", "2"], &["--output", "lines"])?;
        let line = text.lines().find(|l| l.contains("main.Restock(")).context("no Restock line")?;
        for part in [
            r#"l=&{SKU:"a1" Qty:3 Rush:true Price:9.5 Note:&{Text:"fragile" By:7} Tags:[]string(len=2)}"#,
            r#"all=[{SKU:"b2" Qty:1 Rush:false Price:2.25 Note:nil Tags:[]string(len=0)} {SKU:"c3" Qty:40 Rush:true Price:0 Note:&{Text:"fragile" By:7} Tags:[]string(len=0)}]"#,
        ] {
            ensure!(line.contains(part), "{what}: {part:?} not in {line:?}");
        }
        let twelve = text.lines().find(|l| l.contains("main.Twelve(")).context("no Twelve line")?;
        ensure!(twelve.contains("j=10, k=11, l=12) = 650"), "{what}: {twelve}");
        // A stripped build, typed by its unstripped twin: the same line.
        let stripped = build_fixture("funcs", &tc, Flavor::Stripped)?;
        let mut args: Vec<String> =
            ["--func", "main.Restock", "--max-depth", "2", "--output", "lines"].map(String::from).to_vec();
        args.extend(["--debug-info".into(), exe.display().to_string(), "--".into(), stripped.display().to_string()]);
        args.extend(["-n".into(), "1".into()]);
        let out = Command::new(xtask::inject_binary()?).args(&args).output()?;
        ensure!(out.status.success(), "{what} stripped: {}", String::from_utf8_lossy(&out.stderr));
        let err = String::from_utf8_lossy(&out.stderr);
        let twin = err.lines().find(|l| l.contains("main.Restock(")).context("stripped: no Restock line")?;
        let args_of =
            |l: &str| l.split_once("main.Restock(").map(|(_, a)| a.rsplit_once("  ").map_or(a, |x| x.0).to_string());
        ensure!(args_of(twin) == args_of(line), "{what}: stripped with a twin {twin:?}, default {line:?}");
    }
    Ok(())
}
