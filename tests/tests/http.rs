//! net/http zero-code tracing on real servers and clients: two fixture services, each
//! instrumented by its own inject, give exactly one connected trace per request under
//! load; errors, panics, routes, HTTP/2 and stripped builds give correct spans; attaching
//! and detaching under load fails no request.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::otlp::{Received, Receiver, Transport};
use tests::{Proc, check_attrs, port, require_ptrace, scratch, start_fixture, start_inject_env};
use xtask::{Flavor, GoToolchain, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(120);
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

struct Service {
    /// Owned so the server lives as long as the service (Proc kills it on drop).
    _server: Proc,
    addr: String,
    inject: Proc,
    summary: std::path::PathBuf,
}

impl Service {
    /// Starts the httpserver fixture and attaches an inject exporting to `rx` as `name`.
    fn start(tc: &GoToolchain, flavor: Flavor, name: &str, args: &[&str], rx: &Receiver) -> Result<Service> {
        Service::start_by(tc, flavor, name, args, rx, &By::default())
    }

    /// As [`Service::start`], with inject's backend chosen by `by`.
    fn start_by(
        tc: &GoToolchain,
        flavor: Flavor,
        name: &str,
        args: &[&str],
        rx: &Receiver,
        by: &By<'_>,
    ) -> Result<Service> {
        let exe = build_fixture("httpserver", tc, flavor)?;
        let server = start_fixture(&exe, args, &[])?;
        let addr = server.value("LISTEN ").context("LISTEN line")?;
        let inject = attach_by(server.pid(), name, rx, by)?;
        Ok(Service { _server: server, addr, inject: inject.0, summary: inject.1 })
    }

    /// Detaches inject (SIGTERM): it flushes its spans first. Returns its summary.
    fn detach(&mut self) -> Result<Value> {
        self.inject.signal(15);
        let st = self.inject.wait(LIMIT)?;
        ensure!(st.success(), "inject: {st}\n{}", self.inject.transcript());
        let s = tests::schema::read_summary(&self.summary)?;
        let _ = std::fs::remove_file(&self.summary);
        Ok(s)
    }
}

/// Which backend inject uses: `--backend`, and the patcher's forced refusals
/// (`INJECT_REFUSE_TRAMPOLINE`, for `auto`).
#[derive(Default)]
struct By<'a> {
    backend: Option<&'a str>,
    refuse: Option<&'a str>,
}

fn attach(pid: i32, name: &str, rx: &Receiver) -> Result<(Proc, std::path::PathBuf)> {
    attach_by(pid, name, rx, &By::default())
}

fn attach_by(pid: i32, name: &str, rx: &Receiver, by: &By<'_>) -> Result<(Proc, std::path::PathBuf)> {
    let summary = scratch(&format!("http-{name}-{pid}.json"));
    let mut args: Vec<String> =
        ["--pid", &pid.to_string(), "--service-name", name, "--summary-json", &summary.display().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    if let Some(b) = by.backend {
        args.extend(["--backend".to_string(), b.to_string()]);
    }
    let endpoint = rx.endpoint();
    let mut env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    if let Some(r) = by.refuse {
        env.push(("INJECT_REFUSE_TRAMPOLINE", r));
    }
    Ok((start_inject_env(&args, &env, true)?, summary))
}

/// The load fixture's RESULT line as key=value pairs, and its other lines.
struct LoadResult {
    fields: HashMap<String, String>,
    lines: Vec<String>,
    success: bool,
}

impl LoadResult {
    fn get(&self, k: &str) -> u64 {
        self.fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
    }
}

fn load(tc: &GoToolchain, args: &[&str]) -> Result<LoadResult> {
    let exe = build_fixture("load", tc, Flavor::Default)?;
    let out = Command::new(&exe).args(args).output().with_context(|| exe.display().to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .with_context(|| format!("load {args:?}: no RESULT line\n{stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    let fields = result
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let lines = stdout.lines().filter(|l| !l.starts_with("RESULT ")).map(str::to_string).collect();
    Ok(LoadResult { fields, lines, success: out.status.success() })
}

fn of_service<'a>(spans: &'a [Received], name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.resource_str("service.name").as_deref() == Some(name)).collect()
}

#[test]
fn front_and_back_give_one_connected_trace_per_request() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const REQUESTS: u64 = 10_000;
    for tc in test_toolchains()? {
        let rx = Receiver::start(Transport::Http)?;
        let mut back = Service::start(&tc, Flavor::Default, "back", &[], &rx)?;
        let backend = format!("http://{}/hello", back.addr);
        let mut front = Service::start(&tc, Flavor::Default, "front", &["-backend", &backend], &rx)?;
        let url = format!("http://{}/fanout", front.addr);
        let r = load(&tc, &["-url", &url, "-n", &REQUESTS.to_string(), "-c", "32"])?;
        ensure!(r.success && r.get("ok") == REQUESTS, "{}: load failed: {:?} {:?}", tc.version, r.fields, r.lines);
        let (fs, bs) = (front.detach()?, back.detach()?);
        // Per request: the front's server span, three client spans (one per fanout
        // goroutine, none of which got a context.Context), three back server spans.
        rx.wait_spans(7 * REQUESTS, LIMIT).context("spans")?;
        let spans = rx.spans();
        let (f, b) = (of_service(&spans, "front"), of_service(&spans, "back"));
        ensure!(
            f.len() as u64 == 4 * REQUESTS && b.len() as u64 == 3 * REQUESTS,
            "{} front, {} back",
            f.len(),
            b.len()
        );
        ensure!(fs["dropped"] == 0 && bs["dropped"] == 0, "records dropped: {} {}", fs["dropped"], bs["dropped"]);
        let mut traces: HashMap<String, Vec<(bool, &Received)>> = HashMap::new();
        for (is_front, s) in f.iter().map(|s| (true, *s)).chain(b.iter().map(|s| (false, *s))) {
            traces.entry(s.trace_id()).or_default().push((is_front, s));
        }
        ensure!(traces.len() as u64 == REQUESTS, "{} traces for {REQUESTS} requests", traces.len());
        for (id, t) in &traces {
            let pick = |front: bool, kind: i32| -> Vec<&Received> {
                t.iter().filter(|(f, s)| *f == front && s.span.kind == kind).map(|(_, s)| *s).collect()
            };
            let (front_server, clients, back_servers) = (pick(true, SERVER), pick(true, CLIENT), pick(false, SERVER));
            ensure!(pick(false, CLIENT).is_empty(), "trace {id}: client spans in the back");
            ensure!(
                front_server.len() == 1 && clients.len() == 3 && back_servers.len() == 3,
                "trace {id}: {} front server, {} client, {} back server spans",
                front_server.len(),
                clients.len(),
                back_servers.len()
            );
            let root = front_server[0];
            ensure!(root.parent_id().is_none(), "trace {id}: the front's server span has a parent");
            check_attrs(
                root,
                &[
                    ("http.request.method", "GET".into()),
                    ("url.path", "/fanout".into()),
                    ("url.scheme", "http".into()),
                    ("http.route", "/fanout".into()),
                    ("http.response.status_code", 200.into()),
                    ("server.address", "127.0.0.1".into()),
                    ("server.port", port(&front.addr).into()),
                    ("client.address", "127.0.0.1".into()),
                    ("network.protocol.version", "1.1".into()),
                    ("user_agent.original", "Go-http-client/1.1".into()),
                ],
            )?;
            ensure!(root.span.name == "GET /fanout", "name {}", root.span.name);
            for c in &clients {
                ensure!(c.parent_id() == Some(root.span_id()), "trace {id}: client not the server span's child");
                ensure!(c.span.name == "GET", "client name {}", c.span.name);
                check_attrs(
                    c,
                    &[
                        ("url.full", backend.clone().into()),
                        ("server.port", port(&back.addr).into()),
                        ("http.response.status_code", 200.into()),
                        ("network.protocol.version", "1.1".into()),
                    ],
                )?;
                // Same process: the client call is inside the request, to within the
                // clock's slack. The two spans' ends are stamped on different CPUs (their
                // TSCs may differ by a little), and may be converted to Unix time in
                // batches on either side of a once-a-second refinement of the clock: 1 in
                // 10,000 traces once ended its client span a moment after its server span.
                const SLACK_NS: u64 = 100_000;
                let (cs, ce) = (c.span.start_time_unix_nano, c.span.end_time_unix_nano);
                let (rs, re) = (root.span.start_time_unix_nano, root.span.end_time_unix_nano);
                ensure!(
                    cs + SLACK_NS >= rs && ce <= re + SLACK_NS,
                    "trace {id}: client span [{cs}, {ce}] outside its server span [{rs}, {re}] by more than {SLACK_NS} ns"
                );
            }
            let mut parents: Vec<String> = back_servers.iter().filter_map(|s| s.parent_id()).collect();
            parents.sort();
            let mut client_ids: Vec<String> = clients.iter().map(|c| c.span_id()).collect();
            client_ids.sort();
            ensure!(parents == client_ids, "trace {id}: back server parents {parents:?}, client spans {client_ids:?}");
            for s in &back_servers {
                ensure!(s.span.name == "GET /hello", "back name {}", s.span.name);
                check_attrs(s, &[("url.path", "/hello".into()), ("http.response.status_code", 200.into())])?;
            }
        }
        ensure!(fs["http_injected"] == 3 * REQUESTS, "traceparent lines written: {}", fs["http_injected"]);
        eprintln!(
            "{}: {REQUESTS} requests at concurrency 32, {} traces of 7 spans, rps {}",
            tc.version,
            traces.len(),
            r.fields.get("rps").map_or("?", String::as_str)
        );
    }
    Ok(())
}

/// A caller's `tracestate` goes on with its trace: written after the `traceparent` of each
/// of the front's outgoing HTTP/1 requests, read by the back's server spans.
#[test]
fn tracestate_goes_on_with_its_trace() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const REQUESTS: u64 = 200;
    const STATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    for tc in test_toolchains()? {
        let rx = Receiver::start(Transport::Http)?;
        let mut back = Service::start(&tc, Flavor::Default, "back", &[], &rx)?;
        let backend = format!("http://{}/hello", back.addr);
        let mut front = Service::start(&tc, Flavor::Default, "front", &["-backend", &backend], &rx)?;
        let url = format!("http://{}/fanout", front.addr);
        let state = format!("Tracestate: {STATE}");
        let r =
            load(&tc, &["-url", &url, "-n", &REQUESTS.to_string(), "-c", "4", "-traceparent-each", "-header", &state])?;
        ensure!(r.success && r.get("ok") == REQUESTS, "{}: load failed: {:?} {:?}", tc.version, r.fields, r.lines);
        let (fs, bs) = (front.detach()?, back.detach()?);
        rx.wait_spans(7 * REQUESTS, LIMIT).context("spans")?;
        ensure!(fs["dropped"] == 0 && bs["dropped"] == 0, "records dropped: {} {}", fs["dropped"], bs["dropped"]);
        ensure!(
            fs["http_tracestate_injected"] == 3 * REQUESTS && fs["http_tracestate_no_room"] == 0,
            "tracestate lines: {} written, {} without room",
            fs["http_tracestate_injected"],
            fs["http_tracestate_no_room"]
        );
        // Every span says so too: the servers read it, the clients inherit it.
        let spans = rx.spans();
        ensure!(spans.len() as u64 == 7 * REQUESTS, "{} spans", spans.len());
        let mut traces = std::collections::HashSet::new();
        for s in &spans {
            ensure!(s.span.trace_state == STATE, "{} tracestate {:?}", s.span.name, s.span.trace_state);
            traces.insert(s.trace_id());
        }
        ensure!(traces.len() as u64 == REQUESTS, "{} traces for {REQUESTS} requests", traces.len());
        eprintln!("{}: {REQUESTS} requests, tracestate on all {} spans", tc.version, spans.len());
    }
    Ok(())
}

/// One span per request of the sequence below, normalised (no ids, ports, times), for
/// comparing builds.
fn normalised(spans: &[&Received]) -> Vec<String> {
    let mut v: Vec<String> = spans
        .iter()
        .map(|s| {
            let mut attrs: Vec<String> = s
                .span
                .attributes
                .iter()
                .filter(|kv| {
                    !matches!(
                        kv.key.as_str(),
                        "server.port" | "client.port" | "network.peer.port" | "go.goroutine.id" | "url.full"
                    )
                })
                .map(|kv| format!("{}={:?}", kv.key, kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .collect();
            attrs.sort();
            format!(
                "{} kind={} status={:?} {}",
                s.span.name,
                s.span.kind,
                s.span.status.as_ref().map(|s| s.code),
                attrs.join(" ")
            )
        })
        .collect();
    v.sort();
    v
}

/// Requests that exercise every outcome, on one server (with a dead backend, so /fanout
/// makes failing client calls).
fn outcomes(tc: &GoToolchain, addr: &str, tls: bool) -> Result<()> {
    let base = format!("{}://{addr}", if tls { "https" } else { "http" });
    let run = |path: &str, n: u64, expect: &str| -> Result<LoadResult> {
        let url = format!("{base}{path}");
        let n = n.to_string();
        let mut args = vec!["-url", &url, "-n", &n, "-c", "4", "-expect", expect];
        if tls {
            args.push("-h2");
        }
        load(tc, &args)
    };
    for (path, expect) in
        [("/hello", "200"), ("/items/42", "200"), ("/nope", "404"), ("/status/503", "503"), ("/fanout", "502")]
    {
        let r = run(path, 20, expect)?;
        ensure!(r.success && r.get("ok") == 20, "{path}: {:?} {:?}", r.fields, r.lines);
        if tls {
            ensure!(r.fields.get("proto").map(String::as_str) == Some("HTTP/2.0"), "{path}: {:?}", r.fields);
        }
    }
    // A caller's trace context, continued (HTTP/1: a header line; HTTP/2: an HPACK field).
    let url = format!("{base}/hello");
    let header = format!("traceparent: 00-{REMOTE_TRACE}-{REMOTE_PARENT}-01");
    let mut args = vec!["-url", &url, "-n", "10", "-c", "2", "-header", &header, "-header", "tracestate: vendor=abc"];
    if tls {
        args.push("-h2");
    }
    let r = load(tc, &args)?;
    ensure!(r.success && r.get("ok") == 10, "traceparent: {:?} {:?}", r.fields, r.lines);
    // A panicking handler: HTTP/1 drops the connection, HTTP/2 resets the stream; the
    // client sees an error either way.
    let r = run("/panic", 5, "200")?;
    ensure!(r.get("errors") == 5, "/panic: {:?} {:?}", r.fields, r.lines);
    Ok(())
}

const REMOTE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const REMOTE_PARENT: &str = "b7ad6b7169203331";

fn check_outcomes(spans: &[&Received], tc: &GoToolchain, tls: bool) -> Result<()> {
    let continued: Vec<_> = spans.iter().filter(|s| s.trace_id() == REMOTE_TRACE).collect();
    ensure!(continued.len() == 10, "{} spans continue the caller's trace, want 10", continued.len());
    for s in continued {
        ensure!(
            s.span.name == "GET /hello" && s.parent_id().as_deref() == Some(REMOTE_PARENT),
            "{}: parent {:?}",
            s.span.name,
            s.parent_id()
        );
        ensure!(s.span.flags & 0x300 == 0x300, "parent not marked remote: flags {:#x}", s.span.flags);
        ensure!(s.span.trace_state == "vendor=abc", "tracestate {:?}", s.span.trace_state);
    }
    // HTTP/1 header lines and HTTP/2 fields alike give the user agent.
    let ua = if tls { "Go-http-client/2.0" } else { "Go-http-client/1.1" };
    for s in spans.iter().filter(|s| s.span.kind == SERVER) {
        ensure!(
            s.attr_str("user_agent.original").as_deref() == Some(ua),
            "{}: user agent {:?}",
            s.span.name,
            s.attr_str("user_agent.original")
        );
    }
    let proto = if tls { "2" } else { "1.1" };
    let scheme = if tls { "https" } else { "http" };
    let items_route = if tc.version.starts_with("1.21.") { "/items/" } else { "/items/{id}" };
    let count = |name: &str, kind: i32| spans.iter().filter(|s| s.span.name == name && s.span.kind == kind).count();
    for (name, status, n) in [
        ("GET /hello".to_string(), 200, 30),
        (format!("GET {items_route}"), 200, 20),
        ("GET /".to_string(), 404, 20),
        ("GET /status/".to_string(), 503, 20),
        ("GET /fanout".to_string(), 502, 20),
    ] {
        let matching: Vec<_> = spans.iter().filter(|s| s.span.name == name && s.span.kind == SERVER).collect();
        ensure!(matching.len() == n, "{}: {} {name} spans, want {n}", tc.version, matching.len());
        for s in matching {
            check_attrs(
                s,
                &[
                    ("http.response.status_code", status.into()),
                    ("network.protocol.version", proto.into()),
                    ("url.scheme", scheme.into()),
                ],
            )?;
            let is_error = s.span.status.as_ref().is_some_and(|st| st.code == 2);
            ensure!(is_error == (status >= 500), "{name}: error status {is_error} for {status}");
        }
    }
    ensure!(count("GET", CLIENT) == 60, "{} client spans, want 60", count("GET", CLIENT));
    for c in spans.iter().filter(|s| s.span.kind == CLIENT) {
        ensure!(
            c.attr_str("error.type").as_deref() == Some("*net.OpError"),
            "client error.type {:?}",
            c.attr_str("error.type")
        );
        ensure!(c.span.status.as_ref().is_some_and(|st| st.code == 2), "client span not an error");
        ensure!(c.attr_i64("http.response.status_code").is_none(), "status on a failed client call");
    }
    let panics: Vec<_> = spans.iter().filter(|s| s.attr_str("error.type").as_deref() == Some("panic")).collect();
    ensure!(panics.len() == 5, "{} panic spans, want 5", panics.len());
    for p in panics {
        ensure!(p.span.name == "GET /panic" && p.span.status.as_ref().is_some_and(|st| st.code == 2), "panic span");
    }
    Ok(())
}

#[test]
fn errors_panics_routes_http2_and_stripped_builds() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        let mut per_flavor = Vec::new();
        for (flavor, tls) in [(Flavor::Default, false), (Flavor::Stripped, false), (Flavor::Default, true)] {
            let rx = Receiver::start(Transport::Http)?;
            let mut args = vec!["-backend", "http://127.0.0.1:1/dead"];
            if tls {
                args.push("-tls");
            }
            let mut svc = Service::start(&tc, flavor, "svc", &args, &rx)?;
            outcomes(&tc, &svc.addr, tls)?;
            let summary = svc.detach()?;
            let want = 20 * 5 + 10 + 60 + 5;
            rx.wait_spans(want, LIMIT).with_context(|| format!("{} {flavor:?} tls={tls}", tc.version))?;
            let spans = rx.spans();
            let all: Vec<&Received> = spans.iter().collect();
            ensure!(all.len() as u64 == want, "{} spans, want {want}", all.len());
            ensure!(summary["http_panics"] == 5, "panics counted: {}", summary["http_panics"]);
            check_outcomes(&all, &tc, tls).with_context(|| format!("{} {flavor:?} tls={tls}", tc.version))?;
            eprintln!("{} {flavor:?} tls={tls}: {} spans as expected", tc.version, all.len());
            per_flavor.push(normalised(&all));
        }
        ensure!(
            per_flavor[0] == per_flavor[1],
            "{}: the stripped build's spans differ from the unstripped build's",
            tc.version
        );
    }
    Ok(())
}

/// The backend each net/http probe site got, by the summary.
fn site_backends(summary: &Value) -> Vec<(String, String)> {
    let sites = summary["sites"].as_array().cloned().unwrap_or_default();
    sites
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or("?").into(), s["backend"].as_str().unwrap_or("-").into()))
        .collect()
}

/// The outcomes above, traced by each backend: trampolines; uprobes alone; and `auto` with
/// the patcher made to refuse the server probe, which sends every probe that keeps trace
/// context to uprobes with it (context lives in one place). The spans are the same: names,
/// kinds, statuses, attributes, the caller's context continued, lineage to the fan-out
/// goroutines' client spans, HTTP/1 and HTTP/2 (oldest Go: HTTP/1).
#[test]
fn each_backend_gives_the_same_spans() -> Result<()> {
    if !require_ptrace()? || !tests::require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let toolchains = test_toolchains()?;
    let newest = toolchains.last().context("no Go")?.version.clone();
    const SERVE: &str = "net/http.serverHandler.ServeHTTP";
    for tc in &toolchains {
        for tls in [false, true] {
            if tls && tc.version != newest {
                continue;
            }
            let mut reference = None;
            for (label, by) in [
                ("trampoline", By { backend: Some("trampoline"), refuse: None }),
                ("uprobe", By { backend: Some("uprobe"), refuse: None }),
                ("auto, server probe refused", By { backend: Some("auto"), refuse: Some(SERVE) }),
            ] {
                let what = format!("{} tls={tls} {label}", tc.version);
                let rx = Receiver::start(Transport::Http)?;
                let mut args = vec!["-backend", "http://127.0.0.1:1/dead"];
                if tls {
                    args.push("-tls");
                }
                let mut svc = Service::start_by(tc, Flavor::Default, "svc", &args, &rx, &by)?;
                outcomes(tc, &svc.addr, tls).with_context(|| what.clone())?;
                let summary = svc.detach()?;
                let want = 20 * 5 + 10 + 60 + 5;
                rx.wait_spans(want, LIMIT).with_context(|| what.clone())?;
                let spans = rx.spans();
                let all: Vec<&Received> = spans.iter().collect();
                ensure!(all.len() as u64 == want, "{what}: {} spans, want {want}", all.len());
                ensure!(summary["dropped"] == 0, "{what}: records dropped: {}", summary["dropped"]);
                check_outcomes(&all, tc, tls).with_context(|| what.clone())?;
                // Every fan-out client span is the child of its request's server span.
                for c in all.iter().filter(|s| s.span.kind == CLIENT) {
                    let parent = all.iter().find(|s| Some(s.span_id()) == c.parent_id());
                    ensure!(
                        parent.is_some_and(|p| p.span.kind == SERVER && p.trace_id() == c.trace_id()),
                        "{what}: a client span without its server span as parent"
                    );
                }
                let backends = site_backends(&summary);
                let on = |b: &str| backends.iter().filter(|(_, x)| x == b).count();
                let server = backends.iter().find(|(n, _)| n == SERVE).map(|(_, b)| b.as_str());
                match label {
                    "trampoline" => ensure!(on("uprobe") == 0, "{what}: {backends:?}"),
                    "uprobe" => ensure!(on("trampoline") == 0 && on("uprobe") > 5, "{what}: {backends:?}"),
                    // The refused server probe and every context probe with it, on uprobes.
                    _ => ensure!(server == Some("uprobe") && on("uprobe") > 5, "{what}: {backends:?}"),
                }
                let got = normalised(&all);
                match &reference {
                    None => reference = Some(got),
                    Some(r) => ensure!(*r == got, "{what}: spans differ from the trampolines'"),
                }
                eprintln!("{what}: {} spans, the trampolines' spans; {} sites on uprobes", all.len(), on("uprobe"));
            }
        }
    }
    Ok(())
}

/// Outgoing context under uprobes: the front's uprobes write the `traceparent` line into
/// each request where the kernel allows `bpf_probe_write_user`, so the back's server spans
/// are the front's client spans' children; under kernel lockdown they cannot, inject says
/// so when it attaches, and counts no line written, and the back starts traces of its own.
#[test]
fn uprobes_carry_context_out_where_the_kernel_allows() -> Result<()> {
    if !require_ptrace()? || !tests::require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const REQUESTS: u64 = 200;
    let tc = test_toolchains()?.pop().context("no Go")?;
    let rx = Receiver::start(Transport::Http)?;
    let mut back = Service::start(&tc, Flavor::Default, "back", &[], &rx)?;
    let backend = format!("http://{}/hello", back.addr);
    let uprobes = By { backend: Some("uprobe"), refuse: None };
    let mut front = Service::start_by(&tc, Flavor::Default, "front", &["-backend", &backend], &rx, &uprobes)?;
    let url = format!("http://{}/fanout", front.addr);
    let r = load(&tc, &["-url", &url, "-n", &REQUESTS.to_string(), "-c", "8"])?;
    ensure!(r.success && r.get("ok") == REQUESTS, "load failed: {:?} {:?}", r.fields, r.lines);
    let transcript = front.inject.transcript();
    let (fs, bs) = (front.detach()?, back.detach()?);
    rx.wait_spans(7 * REQUESTS, LIMIT).context("spans")?;
    ensure!(fs["dropped"] == 0 && bs["dropped"] == 0, "records dropped: {} {}", fs["dropped"], bs["dropped"]);
    let spans = rx.spans();
    let (f, b) = (of_service(&spans, "front"), of_service(&spans, "back"));
    ensure!(f.len() as u64 == 4 * REQUESTS && b.len() as u64 == 3 * REQUESTS, "{} front, {} back", f.len(), b.len());
    let clients: HashMap<String, &Received> =
        f.iter().filter(|s| s.span.kind == CLIENT).map(|s| (s.span_id(), *s)).collect();
    let off = transcript.lines().find(|l| l.contains("outgoing trace context off"));
    let children = b.iter().filter(|s| s.parent_id().is_some_and(|p| clients.contains_key(&p))).count();
    match off {
        Some(line) => {
            ensure!(line.contains("bpf_probe_write_user"), "the warning does not say what is refused: {line}");
            ensure!(fs["http_injected"] == 0, "lines counted as written: {}", fs["http_injected"]);
            ensure!(children == 0 && b.iter().all(|s| s.parent_id().is_none()), "back spans with parents");
            eprintln!("{REQUESTS} requests: outgoing context off under uprobes here ({line}); back spans are roots");
        }
        None => {
            ensure!(fs["http_injected"] == 3 * REQUESTS, "lines written: {}", fs["http_injected"]);
            ensure!(children as u64 == 3 * REQUESTS, "{children} back spans are the front's clients' children");
            eprintln!("{REQUESTS} requests: every back span the child of its front client span, by uprobes");
        }
    }
    Ok(())
}

#[test]
fn attach_and_detach_under_load_fail_no_request() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let rx = Receiver::start(Transport::Http)?;
    let back_exe = build_fixture("httpserver", &tc, Flavor::Default)?;
    let back = start_fixture(&back_exe, &[], &[])?;
    let backend = format!("http://{}/hello", back.value("LISTEN ").context("LISTEN")?);
    let front = start_fixture(&back_exe, &["-backend", &backend], &[])?;
    let url = format!("http://{}/fanout", front.value("LISTEN ").context("LISTEN")?);
    let exe = build_fixture("load", &tc, Flavor::Default)?;
    // The load runs until the rounds are done (SIGTERM makes it finish and report), so a
    // slow machine gets fewer requests, not fewer rounds.
    let loader = std::process::Command::new(&exe)
        .args(["-url", &url, "-duration", "300s", "-c", "16"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut rounds = 0;
    while rounds < 4 {
        let (mut fi, _) = attach(front.pid(), "front", &rx)?;
        let (mut bi, _) = attach(back.pid(), "back", &rx)?;
        std::thread::sleep(Duration::from_millis(300));
        for i in [&mut fi, &mut bi] {
            i.signal(15);
            ensure!(i.wait(LIMIT)?.success(), "inject failed:\n{}", i.transcript());
        }
        for p in [&front, &back] {
            if let Some(at) = tests::text_differs_from_file(p.pid(), &back_exe)? {
                bail!("code at {at:#x} not restored after detach");
            }
        }
        rounds += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    tests::send_signal(loader.id() as i32, 15);
    let out = loader.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout.lines().find(|l| l.starts_with("RESULT ")).context("RESULT")?;
    ensure!(out.status.success() && result.contains(" errors=0 ") && result.contains(" unexpected=0 "), "{stdout}");
    ensure!(rx.span_count() > 0, "no spans while attached");
    // Every attach lands in the middle of requests on keep-alive connections: the calls in
    // progress must not shift the pairing of the ones after them.
    let spans = rx.spans();
    let servers: Vec<&Received> = spans.iter().filter(|s| s.span.kind == SERVER).collect();
    let broken: Vec<&&Received> =
        servers.iter().filter(|s| s.duration_ns() == 0 || s.attr_str("http.route").is_none()).collect();
    ensure!(
        broken.is_empty(),
        "{} of {} server spans have no duration or no route, e.g. {:?}",
        broken.len(),
        servers.len(),
        broken.first().map(|s| (&s.span.name, s.duration_ns(), s.attr_str("http.route")))
    );
    eprintln!(
        "{rounds} attach/detach rounds under load: {result}; {} server spans, all timed and routed",
        servers.len()
    );
    for mut p in [front, back] {
        p.signal(15);
        ensure!(p.wait(LIMIT)?.success(), "server failed after detaching:\n{}", p.transcript());
    }
    Ok(())
}

/// A caller that did not sample its trace is followed: inject's spans under it are not
/// exported, and the requests they make carry the unsampled flag on, so the next process
/// does not export its spans either; a sampled caller's trace is exported whole.
#[test]
fn an_unsampled_callers_decision_is_followed_downstream() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let rx = Receiver::start(Transport::Http)?;
    let mut back = Service::start(&tc, Flavor::Default, "back", &[], &rx)?;
    let backend = format!("http://{}/hello", back.addr);
    let mut front = Service::start(&tc, Flavor::Default, "front", &["-backend", &backend], &rx)?;
    let url = format!("http://{}/fanout", front.addr);
    const N: u64 = 10;
    const UNSAMPLED: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    for (trace, flags) in [(UNSAMPLED, "00"), (REMOTE_TRACE, "01")] {
        let header = format!("traceparent: 00-{trace}-{REMOTE_PARENT}-{flags}");
        let r = load(&tc, &["-url", &url, "-n", &N.to_string(), "-c", "2", "-header", &header])?;
        ensure!(r.success && r.get("ok") == N, "{flags}: {:?} {:?}", r.fields, r.lines);
    }
    // Both injects have exported everything they will before they exit.
    let (fs, bs) = (front.detach()?, back.detach()?);
    // Per request: the front's server span and three client spans, three back server spans.
    rx.wait_spans(7 * N, LIMIT).context("spans")?;
    let spans = rx.spans();
    let traces: std::collections::BTreeSet<String> = spans.iter().map(|s| s.trace_id()).collect();
    ensure!(
        spans.len() as u64 == 7 * N && traces.iter().eq([REMOTE_TRACE]),
        "{} spans in traces {traces:?}",
        spans.len()
    );
    let sampled_out = |s: &Value| s["otlp"]["sampled_out"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        sampled_out(&fs) == 4 * N && sampled_out(&bs) == 3 * N,
        "sampled out: front {}, back {}",
        sampled_out(&fs),
        sampled_out(&bs)
    );
    Ok(())
}

/// An application that sets its own `traceparent` on an HTTP/1 request (an instrumented
/// one) keeps it: inject's line is taken back out, so the backend gets exactly one (its
/// answer says how many; the front fails the request otherwise) and continues the
/// application's context.
#[test]
fn an_application_traceparent_line_is_the_only_one_sent() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const N: u64 = 100;
    const APP_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
    const APP_SPAN: &str = "00f067aa0ba902b7";
    let own = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    for tc in test_toolchains()? {
        let rx = Receiver::start(Transport::Http)?;
        let mut back = Service::start(&tc, Flavor::Default, "back", &[], &rx)?;
        let backend = format!("http://{}/hello", back.addr);
        let args = ["-backend", &backend, "-own-traceparent", &own];
        let mut front = Service::start(&tc, Flavor::Default, "front", &args, &rx)?;
        let url = format!("http://{}/fanout", front.addr);
        let r = load(&tc, &["-url", &url, "-n", &N.to_string(), "-c", "4"])?;
        ensure!(r.success && r.get("ok") == N, "{}: {:?} {:?}", tc.version, r.fields, r.lines);
        let (fs, bs) = (front.detach()?, back.detach()?);
        rx.wait_spans(7 * N, LIMIT).context("spans")?;
        ensure!(fs["dropped"] == 0 && bs["dropped"] == 0, "records dropped");
        ensure!(
            fs["http_app_traceparent"] == 3 * N && fs["http_injected"] == 0,
            "{} stood down, {} sent",
            fs["http_app_traceparent"],
            fs["http_injected"]
        );
        let spans = rx.spans();
        let backs: Vec<&Received> = of_service(&spans, "back");
        ensure!(backs.len() as u64 == 3 * N, "{} back spans", backs.len());
        for s in backs {
            ensure!(
                s.trace_id() == APP_TRACE && s.parent_id().as_deref() == Some(APP_SPAN),
                "back span in {} under {:?}",
                s.trace_id(),
                s.parent_id()
            );
        }
        eprintln!("{}: {N} requests, {} traceparent lines taken back out", tc.version, 3 * N);
    }
    Ok(())
}

/// JSON lines have one `error` field, whatever made the line: null unless the span's
/// status is Error, else a string saying why (a function's returned error, a library
/// span's description or, for a 5xx that has none, its `error.type`).
#[test]
fn json_lines_say_error_one_way() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let exe = build_fixture("httpserver", &tc, Flavor::Default)?;
    // A backend nobody listens on: every /fanout worker returns an error, the request 502.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}/hello", l.local_addr()?)
    };
    let server = start_fixture(&exe, &["-backend", &dead], &[])?;
    let addr = server.value("LISTEN ").context("LISTEN line")?;
    let jsonl = scratch(&format!("http-errors-{}.jsonl", server.pid()));
    let args: Vec<String> = [
        "--pid",
        &server.pid().to_string(),
        "--func",
        "main.(*server).worker",
        "--output",
        "jsonl",
        "--output-file",
        &jsonl.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut inject = tests::start_inject(&args, true)?;
    for (path, expect) in [("/fanout", "502"), ("/hello", "200")] {
        let url = format!("http://{addr}{path}");
        let r = load(&tc, &["-url", &url, "-n", "1", "-c", "1", "-expect", expect])?;
        ensure!(r.success && r.get("ok") == 1, "{path}: {:?} {:?}", r.fields, r.lines);
    }
    inject.signal(15);
    ensure!(inject.wait(LIMIT)?.success(), "inject:\n{}", inject.transcript());
    let lines = tests::schema::read_jsonl(&jsonl)?;
    let _ = std::fs::remove_file(&jsonl);
    ensure!(lines.iter().all(|l| l.get("error").is_some()), "a line without `error`: {lines:#?}");
    let error = |name: &str| -> Vec<String> {
        lines.iter().filter(|l| l["name"] == name).map(|l| l["error"].as_str().unwrap_or("null").to_string()).collect()
    };
    let workers = error("main.(*server).worker");
    ensure!(
        workers.len() == 3
            && workers
                .iter()
                .all(|e| e.starts_with("returned error *fmt.wrapError(\"worker ") && e.contains("refused")),
        "workers: {workers:?}"
    );
    ensure!(error("GET /fanout") == ["error.type 502"], "fanout: {:?}", error("GET /fanout"));
    ensure!(error("GET /hello") == ["null"], "hello: {:?}", error("GET /hello"));
    Ok(())
}
