//! gRPC zero-code tracing across three processes, each with its own inject and no flags:
//! an HTTP front end calls a gRPC service (a unary call, a server-streaming call read to
//! its end, a call that fails with NotFound), whose unary handler calls an HTTPS backend
//! over HTTP/2. Every request must give one connected trace of nine spans, with the
//! attributes otelgrpc gives, on the oldest and newest Go, in default, stripped and PIE
//! builds, with grpc-go v1.60.1 on the oldest Go and the newest grpc-go on the newest
//! (`INJECT_GO_MATRIX=all`: both on every Go; `INJECT_GRPC_VERSIONS=oldest,newest`: both,
//! every flavor, on the Go under test).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::otlp::{Received, Receiver, Transport};
use tests::{Proc, check_attrs, port, require_ptrace, scratch, start_fixture, start_inject_env};
use xtask::{Flavor, GRPC_OLDEST, GoToolchain, build_fixture, build_module_fixture, grpc_newest, test_toolchains};

const LIMIT: Duration = Duration::from_secs(120);
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ERROR: i32 = 2;
const GRPC: &str = "google.golang.org/grpc";
const REQUESTS: u64 = 40;
/// Longer than 127 bytes, so its HPACK length takes a second byte.
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,vendor=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The grpc-go releases a Go builds the fixture with: the oldest supported on the oldest
/// Go, the newest that Go builds on the others; both on every Go with the matrix.
/// `INJECT_GRPC_VERSIONS=oldest,newest` (or versions) picks them for every Go instead.
fn grpc_versions(tc: &GoToolchain) -> Vec<&'static str> {
    let newest = grpc_newest(&tc.version);
    if let Ok(list) = std::env::var("INJECT_GRPC_VERSIONS") {
        return list
            .split(',')
            .map(|v| match v.trim() {
                "oldest" => GRPC_OLDEST,
                "newest" => newest,
                other => Box::leak(other.to_string().into_boxed_str()),
            })
            .collect();
    }
    if std::env::var("INJECT_GO_MATRIX").is_ok_and(|v| v == "all") {
        vec![GRPC_OLDEST, newest]
    } else if tc.version.starts_with("1.21.") {
        vec![GRPC_OLDEST]
    } else {
        vec![newest]
    }
}

/// A fixture process, and the inject attached to it exporting as its name.
struct Traced {
    /// Owned so the process lives as long as this (Proc kills it on drop).
    proc: Proc,
    addr: String,
    inject: Option<Proc>,
    summary: std::path::PathBuf,
}

impl Traced {
    fn start(exe: &std::path::Path, args: &[&str]) -> Result<Traced> {
        Traced::start_env(exe, args, &[])
    }

    fn start_env(exe: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Result<Traced> {
        let proc = start_fixture(exe, args, env)?;
        let addr = proc.value("LISTEN ").context("LISTEN line")?;
        Ok(Traced { proc, addr, inject: None, summary: Default::default() })
    }

    /// Attaches an inject exporting to `rx` as `name` (after every process's warm-up
    /// call, so that only the test's requests are traced).
    fn attach(&mut self, name: &str, rx: &Receiver) -> Result<()> {
        self.attach_by(name, rx, "auto")
    }

    /// As [`Traced::attach`], with `--backend backend`.
    fn attach_by(&mut self, name: &str, rx: &Receiver, backend: &str) -> Result<()> {
        let proc = &self.proc;
        let summary = scratch(&format!("grpc-{name}-{}.json", proc.pid()));
        let args: Vec<String> = [
            "--backend",
            backend,
            "--pid",
            &proc.pid().to_string(),
            "--service-name",
            name,
            "--summary-json",
            &summary.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let endpoint = rx.endpoint();
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
        self.inject = Some(start_inject_env(&args, &env, true)?);
        self.summary = summary;
        Ok(())
    }

    /// Detaches (SIGTERM: inject flushes first) and returns inject's summary.
    fn detach(&mut self) -> Result<Value> {
        let inject = self.inject.as_mut().context("not attached")?;
        inject.signal(15);
        let st = inject.wait(LIMIT)?;
        ensure!(st.success(), "inject: {st}\n{}", inject.transcript());
        let s = tests::schema::read_summary(&self.summary)?;
        let _ = std::fs::remove_file(&self.summary);
        Ok(s)
    }
}

/// A gRPC server traced by uprobes (`--backend uprobe`) continues each call's context
/// from the HTTP/2 `traceparent` field its trampoline-traced caller wrote: the handler's
/// SERVER span is the CLIENT span's child, and the backend fetch the handler makes is the
/// handler's child. The field the uprobes cannot write into the fetch's frames is said on
/// attaching and counted as none, so the backend's spans start traces of their own.
#[test]
fn a_grpc_server_on_uprobes_continues_its_callers_trace() -> Result<()> {
    if !require_ptrace()? || !tests::require_bpf()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    const N: u64 = 20;
    let tc = test_toolchains()?.pop().context("no Go")?;
    let svc = build_module_fixture("grpcsvc", GRPC, grpc_newest(&tc.version), &tc, Flavor::Default)?;
    let backend_exe = build_fixture("httpserver", &tc, Flavor::Default)?;
    let rx = Receiver::start(Transport::Http)?;
    let (mut back, mut grpc, mut front) = start_chain(&svc, &backend_exe, |_| Vec::new())?;
    back.attach("back", &rx)?;
    grpc.attach_by("grpc", &rx, "uprobe")?;
    front.attach("front", &rx)?;
    let warned = grpc.inject.as_ref().is_some_and(|p| p.transcript().contains("those requests leave without one"));
    ensure!(warned, "the gRPC server's inject did not say its HTTP/2 requests leave without a traceparent");
    let url = format!("http://{}/chain", front.addr);
    let load = build_fixture("load", &tc, Flavor::Default)?;
    let out = Command::new(&load).args(["-url", &url, "-n", &N.to_string(), "-c", "2"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success() && stdout.contains(&format!("ok={N} ")), "load: {stdout}");
    let (fs, gs, bs) = (front.detach()?, grpc.detach()?, back.detach()?);
    rx.wait_spans(9 * N, LIMIT).context("spans")?;
    for (name, s) in [("front", &fs), ("grpc", &gs), ("back", &bs)] {
        ensure!(s["dropped"] == 0, "{name}: {} records dropped", s["dropped"]);
    }
    ensure!(gs["http_injected"] == 0, "grpc: HTTP/2 traceparent fields {} under uprobes", gs["http_injected"]);
    let spans = rx.spans();
    let of = |service: &str, kind: i32| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| s.resource_str("service.name").as_deref() == Some(service) && s.span.kind == kind)
            .collect()
    };
    let (roots, calls, handlers, fetches, backs) =
        (of("front", SERVER), of("front", CLIENT), of("grpc", SERVER), of("grpc", CLIENT), of("back", SERVER));
    ensure!(
        (roots.len(), calls.len(), handlers.len(), fetches.len(), backs.len()) == (20, 60, 60, 20, 20),
        "spans: {} front server, {} calls, {} handlers, {} fetches, {} back",
        roots.len(),
        calls.len(),
        handlers.len(),
        fetches.len(),
        backs.len()
    );
    for c in &calls {
        let h: Vec<&&Received> = handlers.iter().filter(|h| h.parent_id() == Some(c.span_id())).collect();
        ensure!(h.len() == 1, "{} handlers of {} {}", h.len(), c.span.name, c.span_id());
        ensure!(h[0].span.name == c.span.name && h[0].trace_id() == c.trace_id(), "handler {}", h[0].span.name);
        check_attrs(h[0], &[("rpc.system.name", "grpc".into()), ("rpc.method", c.span.name.clone().into())])?;
    }
    for f in &fetches {
        let parent = handlers.iter().find(|h| Some(h.span_id()) == f.parent_id());
        ensure!(parent.is_some_and(|h| h.trace_id() == f.trace_id()), "a fetch not under its handler");
    }
    ensure!(backs.iter().all(|b| b.parent_id().is_none()), "a back span with a parent: the field was written");
    eprintln!("{N} requests: the gRPC server on uprobes continued all 60 calls; its 20 fetches left without context");
    Ok(())
}

fn status(s: &Received) -> (i32, String) {
    s.span.status.as_ref().map_or((0, String::new()), |st| (st.code, st.message.clone()))
}

#[test]
fn http_to_grpc_to_http2_is_one_connected_trace_per_request() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    for tc in test_toolchains()? {
        for version in grpc_versions(&tc) {
            let matrix = std::env::var("INJECT_GRPC_VERSIONS").is_err() && grpc_versions(&tc).len() > 1;
            let flavors: &[Flavor] = if matrix && version == GRPC_OLDEST {
                &[Flavor::Default]
            } else {
                &[Flavor::Default, Flavor::Stripped, Flavor::Pie]
            };
            for &flavor in flavors {
                let case = format!("Go {} {flavor:?} grpc-go {version}", tc.version);
                chain(&tc, flavor, version).with_context(|| case.clone())?;
                eprintln!("{case}: {REQUESTS} requests, {REQUESTS} connected traces of 9 spans");
            }
        }
    }
    Ok(())
}

fn chain(tc: &GoToolchain, flavor: Flavor, version: &str) -> Result<()> {
    let svc = build_module_fixture("grpcsvc", GRPC, version, tc, flavor)?;
    let backend_exe = build_fixture("httpserver", tc, flavor)?;
    let rx = Receiver::start(Transport::Http)?;
    let mut back = Traced::start(&backend_exe, &["-tls"])?;
    let backend = format!("https://{}/hello", back.addr);
    let mut grpc = Traced::start(&svc, &["-mode", "server", "-backend", &backend])?;
    let mut front = Traced::start(&svc, &["-mode", "front", "-target", &grpc.addr])?;
    back.attach("back", &rx)?;
    grpc.attach("grpc", &rx)?;
    front.attach("front", &rx)?;
    let url = format!("http://{}/chain", front.addr);
    let load = build_fixture("load", tc, Flavor::Default)?;
    // Each request comes with a trace context of its own and a tracestate, which every
    // hop must carry on (gRPC fields out of the front, HTTP/2 fields out of the server).
    let state = format!("tracestate: {TRACESTATE}");
    let args = ["-url", &url, "-n", &REQUESTS.to_string(), "-c", "4", "-traceparent-each", "-header", &state];
    let out = Command::new(&load).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && stdout.contains(&format!("ok={REQUESTS} ")),
        "load: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (fs, gs, bs) = (front.detach()?, grpc.detach()?, back.detach()?);
    rx.wait_spans(9 * REQUESTS, LIMIT).context("spans")?;
    for (name, s) in [("front", &fs), ("grpc", &gs), ("back", &bs)] {
        ensure!(s["dropped"] == 0, "{name}: {} records dropped", s["dropped"]);
    }
    // Each outgoing call carried a traceparent: three gRPC calls per request from the
    // front, one HTTP/2 request per request from the gRPC server.
    ensure!(fs["grpc_injected"] == 3 * REQUESTS, "front: gRPC traceparent fields {}", fs["grpc_injected"]);
    ensure!(gs["http_injected"] == REQUESTS, "grpc: HTTP/2 traceparent fields {}", gs["http_injected"]);
    ensure!(fs["grpc_inject_no_room"] == 0 && gs["http_inject_no_room"] == 0, "fields without room");
    ensure!(
        fs["grpc_tracestate_injected"] == 3 * REQUESTS && gs["http_tracestate_injected"] == REQUESTS,
        "tracestate fields: {} gRPC, {} HTTP/2 ({} and {} without room)",
        fs["grpc_tracestate_injected"],
        gs["http_tracestate_injected"],
        fs["grpc_tracestate_no_room"],
        gs["http_tracestate_no_room"]
    );

    // The RED metrics each inject exported as it detached (on by default with OTLP spans):
    // every call counted once, by kind, in the last (cumulative) point of each series.
    let count = |name: &str, service: &str| -> u64 {
        let mut series: HashMap<String, u64> = HashMap::new();
        for p in rx.metric(name).iter().filter(|p| p.resource_str("service.name").as_deref() == Some(service)) {
            let c = series.entry(format!("{:?}", p.attributes)).or_default();
            *c = (*c).max(p.count.unwrap_or(0));
        }
        series.values().sum()
    };
    for (name, service, want) in [
        ("http.server.request.duration", "front", REQUESTS),
        ("rpc.client.call.duration", "front", 3 * REQUESTS),
        ("rpc.server.call.duration", "grpc", 3 * REQUESTS),
        ("http.client.request.duration", "grpc", REQUESTS),
        ("http.server.request.duration", "back", REQUESTS),
    ] {
        let got = count(name, service);
        ensure!(got == want, "{service}: {name} counted {got} calls, want {want}");
    }

    let spans = rx.spans();
    let mut traces: HashMap<String, Vec<&Received>> = HashMap::new();
    for s in &spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    ensure!(traces.len() as u64 == REQUESTS, "{} traces for {REQUESTS} requests ({} spans)", traces.len(), spans.len());
    let grpc_port = port(&grpc.addr);
    for (id, t) in &traces {
        let pick = |service: &str, kind: i32| -> Vec<&Received> {
            t.iter()
                .filter(|s| s.resource_str("service.name").as_deref() == Some(service) && s.span.kind == kind)
                .copied()
                .collect()
        };
        let (root, calls) = (pick("front", SERVER), pick("front", CLIENT));
        let (handlers, fetches, backs) = (pick("grpc", SERVER), pick("grpc", CLIENT), pick("back", SERVER));
        ensure!(
            t.len() == 9
                && root.len() == 1
                && calls.len() == 3
                && handlers.len() == 3
                && fetches.len() == 1
                && backs.len() == 1,
            "trace {id}: {:?}",
            t.iter()
                .map(|s| format!("{} {}", s.resource_str("service.name").unwrap_or_default(), s.span.name))
                .collect::<Vec<_>>()
        );
        let root = root[0];
        ensure!(root.span.name == "GET /chain", "trace {id}: root {}", root.span.name);
        ensure!(
            root.parent_id().is_some() && root.span.flags & 0x300 == 0x300,
            "trace {id}: the root does not continue the caller's context"
        );
        // The caller's tracestate, on the wire at every hop: each server span read it, each
        // client span inherits it.
        for s in t {
            ensure!(
                s.span.trace_state == TRACESTATE,
                "trace {id}: {} tracestate {:?}",
                s.span.name,
                s.span.trace_state
            );
        }
        let mut names: Vec<&str> = calls.iter().map(|c| c.span.name.as_str()).collect();
        names.sort();
        ensure!(
            names == ["grpc.health.v1.Health/Check", "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"],
            "trace {id}: calls {names:?}"
        );
        for c in &calls {
            ensure!(c.parent_id() == Some(root.span_id()), "trace {id}: {} not the root's child", c.span.name);
            ensure!(c.scope == "inject/google.golang.org/grpc", "scope {}", c.scope);
            let code = if status(c).0 == ERROR { "NOT_FOUND" } else { "OK" };
            check_attrs(
                c,
                &[
                    ("rpc.system.name", "grpc".into()),
                    ("rpc.method", c.span.name.clone().into()),
                    ("rpc.response.status_code", code.into()),
                    ("server.address", "127.0.0.1".into()),
                    ("server.port", grpc_port.into()),
                ],
            )?;
            // The handler of each call is its child, in the other process, and agrees.
            let h: Vec<&&Received> = handlers.iter().filter(|h| h.parent_id() == Some(c.span_id())).collect();
            ensure!(h.len() == 1, "trace {id}: {} handlers of {} {}", h.len(), c.span.name, c.span_id());
            let h = h[0];
            ensure!(h.span.name == c.span.name, "trace {id}: handler {} for call {}", h.span.name, c.span.name);
            check_attrs(
                h,
                &[
                    ("rpc.system.name", "grpc".into()),
                    ("rpc.method", c.span.name.clone().into()),
                    ("rpc.response.status_code", code.into()),
                    ("server.address", "127.0.0.1".into()),
                    ("server.port", grpc_port.into()),
                ],
            )?;
            // NotFound is the caller's error, not the server's (otelgrpc's rule).
            ensure!(status(h).0 != ERROR, "trace {id}: handler {} is an error", h.span.name);
            if code == "NOT_FOUND" {
                ensure!(status(c) == (ERROR, "no such service: missing".into()), "trace {id}: status {:?}", status(c));
            } else {
                ensure!(status(c).0 != ERROR, "trace {id}: {} failed", c.span.name);
            }
        }
        // The unary OK handler fetched the backend over HTTP/2, carrying the context.
        let fetch = fetches[0];
        let ok_check = handlers
            .iter()
            .find(|h| h.span_id() == fetch.parent_id().unwrap_or_default())
            .with_context(|| format!("trace {id}: the backend fetch is not a handler's child"))?;
        ensure!(
            ok_check.span.name.ends_with("/Check")
                && ok_check.attr_str("rpc.response.status_code").as_deref() == Some("OK"),
            "trace {id}: fetch under {}",
            ok_check.span.name
        );
        check_attrs(fetch, &[("network.protocol.version", "2".into()), ("http.response.status_code", 200.into())])?;
        ensure!(backs[0].parent_id() == Some(fetch.span_id()), "trace {id}: backend span not the fetch's child");
        check_attrs(backs[0], &[("network.protocol.version", "2".into()), ("url.path", "/hello".into())])?;
    }
    Ok(())
}

/// One run's spans of the `/chain` requests, with the run's ports named.
struct Run {
    traces: Vec<Vec<Received>>,
    ports: HashMap<i64, &'static str>,
}

/// A span as the comparison sees it: where it ran, its kind and name, its parent's, its
/// status, and its attributes with the run's ports named.
#[derive(Debug, Clone, PartialEq)]
struct Shape {
    service: String,
    kind: i32,
    name: String,
    parent: Option<(String, i32, String)>,
    error: bool,
    attrs: std::collections::BTreeMap<String, String>,
}

/// Where inject follows the semantic conventions and the official instrumentation's
/// default does not: otelhttp names client spans `HTTP {method}`, the conventions (and
/// inject) `{method}`.
fn semconv_name(name: &str) -> String {
    name.strip_prefix("HTTP ").unwrap_or(name).to_string()
}

/// The same for values: otelhttp reports HTTP/2 as `network.protocol.version` "2.0" (from
/// `Response.Proto`), the conventions as "2".
fn semconv_value(key: &str, v: &str) -> String {
    match (key, v) {
        ("network.protocol.version", "2.0") => "2".into(),
        _ => v.into(),
    }
}

fn shapes(run: &Run, trace: &[Received]) -> Vec<Shape> {
    let key =
        |s: &Received| (s.resource_str("service.name").unwrap_or_default(), s.span.kind, semconv_name(&s.span.name));
    let mut out: Vec<Shape> = trace
        .iter()
        .map(|s| {
            let parent = s.parent_id().and_then(|p| trace.iter().find(|q| q.span_id() == p)).map(key);
            let attrs = s
                .span
                .attributes
                .iter()
                .filter_map(|kv| {
                    let v = kv.value.as_ref()?;
                    let text = match v.value.as_ref()? {
                        // The run's listening ports by name; any other port is a client's.
                        opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(i) => match run.ports.get(i)
                        {
                            Some(n) => n.to_string(),
                            None if kv.key.ends_with(".port") => "EPHEMERAL".into(),
                            None => i.to_string(),
                        },
                        // Ports inside URLs and addresses too.
                        _ => run.ports.iter().fold(tests::otlp::as_string(v)?, |t, (p, n)| {
                            t.replace(&format!(":{p}"), &format!(":{n}"))
                        }),
                    };
                    Some((kv.key.clone(), text))
                })
                .collect();
            let (service, kind, name) = key(s);
            Shape { service, kind, name, parent, error: status(s).0 == ERROR, attrs }
        })
        .collect();
    // Paired by what both sides agree on: place, name, parent, then the gRPC status.
    let order = |s: &Shape| {
        (s.service.clone(), s.kind, s.name.clone(), s.parent.clone(), s.attrs.get("rpc.response.status_code").cloned())
    };
    out.sort_by_key(order);
    out
}

/// Starts the HTTPS backend, the gRPC server `svc` calling it, and the front end calling
/// that, each gRPC process with the environment `env` gives its name.
fn start_chain(
    svc: &std::path::Path,
    backend_exe: &std::path::Path,
    env: impl Fn(&str) -> Vec<(&'static str, String)>,
) -> Result<(Traced, Traced, Traced)> {
    let start = |args: &[&str], name: &str| {
        let e = env(name);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Traced::start_env(svc, args, &e)
    };
    let back = Traced::start(backend_exe, &["-tls"])?;
    let backend = format!("https://{}/hello", back.addr);
    let grpc = start(&["-mode", "server", "-backend", &backend], "grpc")?;
    let front = start(&["-mode", "front", "-target", &grpc.addr], "front")?;
    Ok((back, grpc, front))
}

/// Runs the three services, `traced` deciding how each gRPC service process is traced
/// (inject attached, or its own otel build), and makes `n` requests.
fn oracle_run(tc: &GoToolchain, otel: bool, n: u64) -> Result<Run> {
    let version = grpc_newest(&tc.version);
    let svc = if otel {
        xtask::build_module_fixture_with("grpcsvc", Some("grpcsvc-otel"), GRPC, version, tc, Flavor::Default)?
    } else {
        build_module_fixture("grpcsvc", GRPC, version, tc, Flavor::Default)?
    };
    let backend_exe = build_fixture("httpserver", tc, Flavor::Default)?;
    let rx = Receiver::start(Transport::Http)?;
    let endpoint = rx.endpoint();
    let (back, mut grpc, mut front) = start_chain(&svc, &backend_exe, |name| {
        if otel {
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()), ("OTEL_SERVICE_NAME", name.into())]
        } else {
            vec![]
        }
    })?;
    if !otel {
        grpc.attach("grpc", &rx)?;
        front.attach("front", &rx)?;
    }
    let load = build_fixture("load", tc, Flavor::Default)?;
    let url = format!("http://{}/chain", front.addr);
    let out = Command::new(&load).args(["-url", &url, "-n", &n.to_string(), "-c", "1"]).output()?;
    ensure!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stdout));
    if otel {
        // SIGTERM: the program flushes its tracer provider before it exits.
        for p in [&mut front.proc, &mut grpc.proc] {
            p.signal(15);
            ensure!(p.wait(LIMIT)?.success(), "{}", p.transcript());
        }
    } else {
        front.detach()?;
        grpc.detach()?;
    }
    // Every trace with the front's /chain span (the otel build also traces its warm-ups).
    // Eight spans per request from the front and the gRPC service (the backend is not
    // traced here); both sides flushed before their process or inject exited.
    rx.wait_spans(8 * n, LIMIT).context("spans")?;
    let spans = rx.spans();
    let mut traces: HashMap<String, Vec<Received>> = HashMap::new();
    for s in spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    let chain = |t: &Vec<Received>| {
        t.iter().any(|s| s.span.kind == SERVER && s.attr_str("url.path").as_deref() == Some("/chain"))
    };
    let traces: Vec<Vec<Received>> = traces.into_values().filter(chain).collect();
    ensure!(traces.len() as u64 == n, "{} /chain traces for {n} requests", traces.len());
    let ports = HashMap::from([(port(&front.addr), "FRONT"), (port(&grpc.addr), "GRPC"), (port(&back.addr), "BACK")]);
    Ok(Run { traces, ports })
}

/// The official compile-time instrumentation is the reference: the same fixture built with
/// otelgrpc (gRPC server and client stats handlers) and otelhttp (the front end's handler,
/// the gRPC server's HTTP client) gives span trees that inject, attached to the plain
/// build, must reproduce: the same spans (service, kind, name), the same parent of each,
/// the same error status, and equal values for every attribute both emit; every attribute
/// otelgrpc puts on a gRPC span inject must put there too. Attributes only one side emits
/// are listed.
#[test]
fn spans_match_otelgrpc_and_otelhttp() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let official = oracle_run(&tc, true, 3)?;
    let ours = oracle_run(&tc, false, 3)?;
    let want = shapes(&official, &official.traces[0]);
    for t in &official.traces[1..] {
        ensure!(shapes(&official, t).len() == want.len(), "otel's traces differ among themselves");
    }
    let mut only_official = std::collections::BTreeSet::new();
    let mut only_ours = std::collections::BTreeSet::new();
    for t in &ours.traces {
        let got = shapes(&ours, t);
        let names = |v: &[Shape]| {
            v.iter().map(|s| (s.service.clone(), s.kind, s.name.clone(), s.parent.clone())).collect::<Vec<_>>()
        };
        ensure!(
            names(&got) == names(&want),
            "span trees differ:\n otel:   {:?}\n inject: {:?}",
            names(&want),
            names(&got)
        );
        for (w, g) in want.iter().zip(&got) {
            let what = format!("{} {} {}", w.service, w.kind, w.name);
            ensure!(w.error == g.error, "{what}: error {} (otel) vs {} (inject)", w.error, g.error);
            for (k, v) in &w.attrs {
                match g.attrs.get(k) {
                    Some(gv) => {
                        ensure!(gv == v || semconv_value(k, v) == *gv, "{what}: {k} = {v:?} (otel) vs {gv:?} (inject)")
                    }
                    None => {
                        ensure!(
                            !(k.starts_with("rpc.") || (w.name.contains('/') && k.starts_with("server."))),
                            "{what}: inject lacks {k}"
                        );
                        only_official.insert(format!("{what}: {k}"));
                    }
                }
            }
            for k in g.attrs.keys().filter(|k| !w.attrs.contains_key(*k)) {
                only_ours.insert(format!("{what}: {k}"));
            }
        }
    }
    eprintln!("attributes only otel emits: {only_official:#?}\nattributes only inject emits: {only_ours:#?}");
    Ok(())
}

/// An application that propagates context itself (here the otelgrpc/otelhttp build) keeps
/// its own `traceparent`: inject's client spans stand down rather than add a second field
/// to its gRPC and HTTP/2 requests, and inject's server spans continue the application's
/// context, joining its traces.
#[test]
fn an_instrumented_application_keeps_its_own_traceparent() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let version = grpc_newest(&tc.version);
    let svc = xtask::build_module_fixture_with("grpcsvc", Some("grpcsvc-otel"), GRPC, version, &tc, Flavor::Default)?;
    let backend_exe = build_fixture("httpserver", &tc, Flavor::Default)?;
    let rx = Receiver::start(Transport::Http)?;
    let endpoint = rx.endpoint();
    // The application's own exporter waits for its shutdown (after inject is gone): its
    // requests to the receiver would otherwise be client spans of inject's too.
    let (_back, mut grpc, mut front) = start_chain(&svc, &backend_exe, |name| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", name.into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
        ]
    })?;
    grpc.attach("grpc-inject", &rx)?;
    front.attach("front-inject", &rx)?;
    let n = 5u64;
    let load = build_fixture("load", &tc, Flavor::Default)?;
    let url = format!("http://{}/chain", front.addr);
    let out = Command::new(&load).args(["-url", &url, "-n", &n.to_string(), "-c", "1"]).output()?;
    ensure!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stdout));
    let (fs, gs) = (front.detach()?, grpc.detach()?);
    // Three gRPC calls per request from the front, one HTTP/2 fetch from the gRPC server:
    // each carried the application's traceparent and none of inject's.
    ensure!(
        fs["grpc_app_traceparent"] == 3 * n && fs["grpc_injected"] == 0,
        "front: {} stood down, {} injected",
        fs["grpc_app_traceparent"],
        fs["grpc_injected"]
    );
    ensure!(
        gs["http_app_traceparent"] == n && gs["http_injected"] == 0,
        "grpc: {} stood down, {} injected",
        gs["http_app_traceparent"],
        gs["http_injected"]
    );
    for p in [&mut front.proc, &mut grpc.proc] {
        p.signal(15);
        ensure!(p.wait(LIMIT)?.success(), "{}", p.transcript());
    }
    // inject's 3n gRPC server spans each continue an otelgrpc client span of the front.
    rx.wait_spans(16 * n, LIMIT).context("spans")?;
    let spans = rx.spans();
    let of = |service: &str, kind: i32| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| s.resource_str("service.name").as_deref() == Some(service) && s.span.kind == kind)
            .filter(|s| s.span.name.starts_with("grpc.health.v1.Health/"))
            .collect()
    };
    let app_calls: std::collections::HashSet<String> = of("front", CLIENT).iter().map(|s| s.span_id()).collect();
    let handlers = of("grpc-inject", SERVER);
    ensure!(handlers.len() as u64 == 3 * n, "{} inject server spans for {} calls", handlers.len(), 3 * n);
    for h in handlers {
        ensure!(
            h.parent_id().is_some_and(|p| app_calls.contains(&p)),
            "{} {}: parent {:?} is not one of the application's client spans",
            h.span.name,
            h.span_id(),
            h.parent_id()
        );
    }
    Ok(())
}
