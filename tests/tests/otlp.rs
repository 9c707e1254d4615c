//! Spans reach a real OTLP receiver over HTTP/protobuf and gRPC with exact counts,
//! correct parents, durations and resource; an endpoint outage costs only counted drops;
//! bad configuration is refused before the target is touched.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::otlp::{Received, Receiver, Transport};
use tests::{Proc, require_ptrace, scratch, start_fixture, start_inject_env};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(120);
const FUNCS: [&str; 3] = ["main.handle", "main.query", "main.render"];

fn inject_args(pid: i32, extra: &[&str], summary: &std::path::Path) -> Vec<String> {
    let mut a = vec!["--pid".to_string(), pid.to_string()];
    for f in FUNCS {
        a.push("--func".into());
        a.push(f.into());
    }
    a.push("--summary-json".into());
    a.push(summary.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs the tree fixture for `requests` requests under inject exporting to `rx`; returns
/// the fixture's pid, inject's summary and its transcript.
fn traced_run(
    tc: &GoToolchain,
    rx: &Receiver,
    requests: usize,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Result<(i32, Value, Proc)> {
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    let mut fx = start_fixture(&exe, &["-wait", "-n", &requests.to_string(), "-sleep", "2ms"], &[])?;
    let summary = scratch("otlp-summary.json");
    let endpoint = rx.endpoint();
    let mut vars =
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())];
    vars.extend_from_slice(env);
    let mut inj = start_inject_env(&inject_args(fx.pid(), extra, &summary), &vars, true)?;
    fx.send_line("go")?;
    let done = fx.wait_for("REQUESTS ", LIMIT)?;
    ensure!(done == format!("REQUESTS {requests}"), "{done}");
    ensure!(fx.wait(LIMIT)?.success(), "fixture failed:\n{}", fx.transcript());
    // The target exited: inject drains, exports and stops by itself.
    let st = inj.wait(LIMIT)?;
    ensure!(st.success(), "inject failed: {st}\n{}", inj.transcript());
    let s = tests::schema::read_summary(&summary)?;
    let _ = std::fs::remove_file(&summary);
    Ok((fx.pid(), s, inj))
}

fn by_name(spans: &[Received]) -> HashMap<String, Vec<&Received>> {
    let mut m: HashMap<String, Vec<&Received>> = HashMap::new();
    for s in spans {
        m.entry(s.span.name.clone()).or_default().push(s);
    }
    m
}

/// Every request is one trace: a root handle span with its three children inside it.
fn check_trees(spans: &[Received], requests: usize, sleep_ns: u64) -> Result<()> {
    let ids: HashSet<String> = spans.iter().map(Received::span_id).collect();
    ensure!(ids.len() == spans.len(), "{} spans, {} distinct ids", spans.len(), ids.len());
    let names = by_name(spans);
    let count = |n: &str| names.get(n).map_or(0, Vec::len);
    ensure!(
        (count("main.handle"), count("main.query"), count("main.render")) == (requests, 2 * requests, requests),
        "span counts handle/query/render: {} {} {}",
        count("main.handle"),
        count("main.query"),
        count("main.render")
    );
    let by_id: HashMap<String, &Received> = spans.iter().map(|s| (s.span_id(), s)).collect();
    let mut children: HashMap<String, Vec<&Received>> = HashMap::new();
    for s in spans {
        match s.parent_id() {
            None => ensure!(s.span.name == "main.handle", "root {}", s.span.name),
            Some(p) => {
                let parent = by_id.get(&p).with_context(|| format!("{} has unknown parent {p}", s.span.name))?;
                ensure!(parent.span.name == "main.handle", "{} under {}", s.span.name, parent.span.name);
                ensure!(parent.trace_id() == s.trace_id(), "child in another trace");
                ensure!(
                    parent.span.start_time_unix_nano <= s.span.start_time_unix_nano
                        && s.span.end_time_unix_nano <= parent.span.end_time_unix_nano,
                    "{} [{}, {}] outside its parent [{}, {}]",
                    s.span.name,
                    s.span.start_time_unix_nano,
                    s.span.end_time_unix_nano,
                    parent.span.start_time_unix_nano,
                    parent.span.end_time_unix_nano
                );
                children.entry(p).or_default().push(s);
            }
        }
    }
    let mut seen_ids = HashSet::new();
    for h in &names["main.handle"] {
        let id = h.attr_i64("go.arg.id").context("go.arg.id")?;
        ensure!(
            h.attr_str("go.arg.name") == Some(format!("req-{id}")),
            "name of request {id}: {:?}",
            h.attr("go.arg.name")
        );
        seen_ids.insert(id);
        let kids = children.get(&h.span_id()).map_or(&[][..], Vec::as_slice);
        ensure!(kids.len() == 3, "request {id} has {} children", kids.len());
        let child_ns: u64 = kids.iter().map(|k| k.duration_ns()).sum();
        ensure!(h.duration_ns() >= child_ns, "request {id}: {} ns, children {child_ns} ns", h.duration_ns());
        ensure!(h.attr_str("code.function.name").as_deref() == Some("main.handle"), "code.function.name");
        ensure!(h.attr_str("code.file.path").is_some_and(|p| p.ends_with("tree/main.go")), "code.file.path");
        ensure!(h.attr_i64("code.line.number").is_some_and(|l| l > 0), "code.line.number");
        ensure!(h.attr_i64("go.goroutine.id").is_some_and(|g| g > 0), "go.goroutine.id");
        ensure!(h.scope == "inject/func", "scope {}", h.scope);
    }
    ensure!(seen_ids == (0..requests as i64).collect(), "request ids are not 0..{requests}");
    for q in &names["main.query"] {
        // time.Sleep sleeps at least its argument; the bound above is loose for noisy CI.
        let d = q.duration_ns();
        ensure!(d >= sleep_ns && d < sleep_ns + 500_000_000, "query took {d} ns, sleeps {sleep_ns}");
        ensure!(q.attr_i64("go.arg.sleep") == Some(sleep_ns as i64), "go.arg.sleep {:?}", q.attr("go.arg.sleep"));
        let id = q.attr_i64("go.arg.id").context("query id")?;
        ensure!(q.attr_i64("go.result.~r0") == Some(id % 7), "query result {:?} for {id}", q.attr("go.result.~r0"));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

#[test]
fn spans_reach_a_receiver_over_http_and_grpc() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const REQUESTS: usize = 200;
    for tc in test_toolchains()? {
        for transport in [Transport::Http, Transport::Grpc] {
            let what = format!("{} {transport:?}", tc.version);
            let rx = Receiver::start(transport)?;
            let (pid, summary, _inj) = traced_run(
                &tc,
                &rx,
                REQUESTS,
                &[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,team=a%20b")],
                &[],
            )
            .with_context(|| what.clone())?;
            let spans = rx.spans();
            check_trees(&spans, REQUESTS, 2_000_000).with_context(|| what.clone())?;
            ensure!(summary["otlp"]["exported"] == 4 * REQUESTS, "{what}: summary {}", summary["otlp"]);
            ensure!(summary["otlp"]["dropped_queue_full"] == 0 && summary["otlp"]["dropped_export_failed"] == 0);
            ensure!(rx.bad_requests() == 0, "{what}: undecodable requests");

            let r = &spans[0];
            let expect = [
                ("service.name", "tree".to_string()),
                ("process.pid", pid.to_string()),
                ("process.executable.name", "tree".to_string()),
                ("process.runtime.name", "go".to_string()),
                ("process.runtime.version", format!("go{}", tc.version)),
                ("host.name", hostname()),
                ("telemetry.sdk.name", "opentelemetry".to_string()),
                ("telemetry.sdk.language", "rust".to_string()),
                ("telemetry.distro.name", "inject".to_string()),
                ("deployment.environment", "test".to_string()),
                ("team", "a b".to_string()),
            ];
            for (k, v) in expect {
                ensure!(
                    r.resource_str(k).as_deref() == Some(v.as_str()),
                    "{what}: {k} = {:?}, want {v}",
                    r.resource_str(k)
                );
            }
            let path = r.resource_str("process.executable.path").context("process.executable.path")?;
            ensure!(path.ends_with("/tree"), "{what}: path {path}");
            let args = r.resource_str("process.command_args").context("process.command_args")?;
            ensure!(args.ends_with("-wait -n 200 -sleep 2ms") && args.contains("tree"), "{what}: args {args}");
            for k in ["telemetry.sdk.version", "telemetry.distro.version"] {
                ensure!(r.resource_str(k).is_some_and(|v| !v.is_empty()), "{what}: no {k}");
            }
            // A fixture built from a working tree has version (devel): no service.version.
            ensure!(r.resource_str("service.version").is_none(), "{what}: service.version");
            ensure!(spans.iter().all(|s| s.resource == r.resource), "{what}: resources differ between spans");
        }
    }
    Ok(())
}

#[test]
fn sampling_keeps_or_drops_whole_traces() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const REQUESTS: usize = 400;
    let tc = &test_toolchains()?[0];
    let rx = Receiver::start(Transport::Http)?;
    let (_, summary, _) = traced_run(
        tc,
        &rx,
        REQUESTS,
        &[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.5")],
        &[],
    )?;
    let spans = rx.spans();
    let ids: HashSet<String> = spans.iter().map(Received::span_id).collect();
    let roots = spans.iter().filter(|s| s.parent_id().is_none()).count();
    for s in &spans {
        if let Some(p) = s.parent_id() {
            ensure!(ids.contains(&p), "a sampled child without its parent");
        }
    }
    ensure!(spans.len() == roots * 4, "{} spans for {roots} traces: traces were split", spans.len());
    ensure!((REQUESTS * 3 / 10..=REQUESTS * 7 / 10).contains(&roots), "{roots} of {REQUESTS} traces kept at ratio 0.5");
    let (exported, sampled_out) = (summary["otlp"]["exported"].as_u64(), summary["otlp"]["sampled_out"].as_u64());
    ensure!(exported == Some(spans.len() as u64), "exported {exported:?}");
    ensure!(sampled_out == Some((4 * REQUESTS - spans.len()) as u64), "sampled_out {sampled_out:?}");
    Ok(())
}

#[test]
fn an_endpoint_outage_costs_only_counted_drops() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    let mut rx = Receiver::start(Transport::Http)?;
    let mut fx = start_fixture(&exe, &["-wait", "-until-stdin", "-pause", "1ms", "-sleep", "100us"], &[])?;
    let summary = scratch("otlp-outage.json");
    let endpoint = rx.endpoint();
    // A queue smaller than what the outage makes, so both paths are taken: spans held and
    // delivered afterwards, and spans dropped.
    const QUEUE: u64 = 8000;
    let mut inj = start_inject_env(
        &inject_args(fx.pid(), &["--otlp-queue", &QUEUE.to_string()], &summary),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
        true,
    )?;
    fx.send_line("go")?;
    rx.wait_spans(100, LIMIT)?;
    rx.stop();
    let down_at = std::time::SystemTime::now();
    let before = rx.span_count();
    std::thread::sleep(Duration::from_secs(10));
    let up_at = std::time::SystemTime::now();
    rx.restart()?;
    let restarted = Instant::now();
    // Everything held goes out after the restart (retries back off to at most 2 s).
    rx.wait_spans(before + QUEUE / 2, Duration::from_secs(30))?;
    let delivered_after = restarted.elapsed();
    fx.send_line("stop")?;
    let done = fx.wait_for("REQUESTS ", LIMIT)?;
    let requests: u64 = done.trim_start_matches("REQUESTS ").parse()?;
    ensure!(fx.wait(LIMIT)?.success(), "fixture failed");
    ensure!(inj.wait(LIMIT)?.success(), "inject failed:\n{}", inj.transcript());
    let s = tests::schema::read_summary(&summary)?;
    let _ = std::fs::remove_file(&summary);
    let o = &s["otlp"];
    let spans = rx.spans();
    let unique: HashSet<String> = spans.iter().map(Received::span_id).collect();
    let dropped = o["dropped_queue_full"].as_u64().unwrap_or(0) + o["dropped_export_failed"].as_u64().unwrap_or(0);
    eprintln!(
        "outage: {requests} requests = {} spans; received {} ({} distinct), dropped {dropped}; held spans delivered {:.1} s after the restart; {o}",
        4 * requests,
        spans.len(),
        unique.len(),
        delivered_after.as_secs_f64()
    );
    ensure!(s["calls"].as_u64() == Some(4 * requests), "calls {} for {requests} requests: {s}", s["calls"]);
    ensure!(
        unique.len() as u64 + dropped == 4 * requests,
        "delivered {} + dropped {dropped} != {}",
        unique.len(),
        4 * requests
    );
    ensure!(dropped > 0, "the outage should overflow a queue of {QUEUE}");
    ensure!(
        o["exported"].as_u64() == Some(unique.len() as u64),
        "exported {} vs received {}",
        o["exported"],
        unique.len()
    );
    // Spans that started while the receiver was down arrived afterwards.
    let ns = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let made_while_down =
        spans.iter().filter(|r| (ns(down_at)..ns(up_at)).contains(&r.span.start_time_unix_nano)).count();
    ensure!(made_while_down as u64 >= QUEUE / 2, "only {made_while_down} spans from the outage were delivered");
    ensure!(inj.transcript().contains("works again"), "no recovery message:\n{}", inj.transcript());
    Ok(())
}

/// An endpoint nobody listens on, all session long: inject says so while it runs, gives
/// up at once when stopped (the user is waiting), and exits with an error naming the
/// endpoint, every dropped span counted.
#[test]
fn an_endpoint_that_never_answers_fails_the_session_quickly() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    // A port that was just free: connections to it are refused.
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    let mut fx = start_fixture(&exe, &["-wait", "-until-stdin", "-pause", "1ms", "-sleep", "100us"], &[])?;
    let summary = scratch("otlp-never.json");
    let mut inj = start_inject_env(
        &inject_args(fx.pid(), &[], &summary),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
        true,
    )?;
    fx.send_line("go")?;
    inj.wait_for("inject: warning: OTLP export to", LIMIT)?;
    // Failing for over a second before the stop: the case where inject gives up at once.
    std::thread::sleep(Duration::from_millis(1500));
    let stopping = Instant::now();
    inj.signal(15);
    let st = inj.wait(LIMIT)?;
    let took = stopping.elapsed();
    fx.send_line("stop")?;
    ensure!(fx.wait(LIMIT)?.success(), "fixture failed");
    let t = inj.transcript();
    ensure!(st.code() == Some(1), "exit {st}:\n{t}");
    ensure!(t.contains("failed") && t.contains("retrying"), "no warning while it ran:\n{t}");
    ensure!(t.contains(&format!("no span reached {endpoint}")), "no error naming the endpoint:\n{t}");
    ensure!(took < Duration::from_secs(3), "{took:?} from SIGTERM to exit");
    let s = tests::schema::read_summary(&summary)?;
    let _ = std::fs::remove_file(&summary);
    let o = &s["otlp"];
    let dropped = o["dropped_queue_full"].as_u64().unwrap_or(0) + o["dropped_export_failed"].as_u64().unwrap_or(0);
    ensure!(o["exported"] == 0 && dropped > 0, "{o}");
    ensure!(
        s["calls"].as_u64() == Some(dropped + o["sampled_out"].as_u64().unwrap_or(0)),
        "calls {} vs {o}",
        s["calls"]
    );
    Ok(())
}

#[test]
fn bad_configuration_is_refused_before_attaching() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("tree", tc, Flavor::Default)?;
    let mut fx = start_fixture(&exe, &["-until-stdin", "-pause", "1ms"], &[])?;
    for (var, value, needle) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization", "OTEL_EXPORTER_OTLP_HEADERS"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift", "unknown protocol"),
        ("OTEL_TRACES_SAMPLER", "traceidratio,0.5", "unknown sampler"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "ten", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),
        ("OTEL_METRICS_EXPORTER", "statsd", "unknown metrics exporter"),
    ] {
        let summary = scratch("otlp-bad.json");
        let mut inj = start_inject_env(&inject_args(fx.pid(), &[], &summary), &[(var, value)], false)?;
        let st = inj.wait(LIMIT)?;
        let out = inj.transcript();
        ensure!(st.code() == Some(1), "{var}={value}: exit {st}\n{out}");
        ensure!(out.contains("inject: error:") && out.contains(needle), "{var}={value}: {out}");
        ensure!(!out.contains("probing"), "{var}={value}: attached anyway");
    }
    ensure!(tests::text_differs_from_file(fx.pid(), &exe)?.is_none(), "the target's code changed");
    fx.send_line("stop")?;
    ensure!(fx.wait(LIMIT)?.success());
    Ok(())
}

/// Lossless over OTLP: 200,000 calls from 8 goroutines saturating both cores, default
/// ring, each arriving exactly once at a real receiver (HTTP and gRPC).
#[test]
fn lossless_export_delivers_every_call_once() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let exe = build_fixture("args", &tc, Flavor::Default)?;
    const CALLS: usize = 200_000;
    for transport in [Transport::Http, Transport::Grpc] {
        let rx = Receiver::start(transport)?;
        let mut fx = start_fixture(&exe, &["-wait", "-n", &CALLS.to_string(), "-goroutines", "8"], &[])?;
        let summary = scratch("lossless-summary.json");
        let endpoint = rx.endpoint();
        let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol())];
        let args: Vec<String> =
            ["--pid", &fx.pid().to_string(), "--func", "main.record", "--lossless", "--summary-json"]
                .iter()
                .map(|s| s.to_string())
                .chain([summary.display().to_string()])
                .collect();
        let mut inj = start_inject_env(&args, &vars, true)?;
        fx.send_line("go")?;
        ensure!(fx.wait(LIMIT)?.success(), "fixture failed");
        ensure!(inj.wait(LIMIT)?.success(), "inject failed:\n{}", inj.transcript());
        let s = tests::schema::read_summary(&summary)?;
        let _ = std::fs::remove_file(&summary);
        ensure!(s["dropped"] == 0 && s["lossless"] == true, "{s}");
        rx.wait_spans(CALLS as u64, LIMIT)?;
        let spans = rx.spans();
        let ids: HashSet<i64> = spans.iter().filter_map(|sp| sp.attr_i64("go.arg.id")).collect();
        ensure!(
            spans.len() == CALLS && ids.len() == CALLS && ids.iter().all(|&i| (0..CALLS as i64).contains(&i)),
            "{}: {} spans, {} distinct call ids, for {CALLS} calls",
            rx.protocol(),
            spans.len(),
            ids.len()
        );
        eprintln!("{}: {CALLS} calls, {CALLS} spans, each call once, 0 dropped", rx.protocol());
    }
    Ok(())
}
