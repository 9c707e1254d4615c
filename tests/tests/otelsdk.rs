//! The application's own OpenTelemetry spans and inject's are one trace: the otelapp
//! fixture makes a span "order" per request (and "reserve" under it) with the
//! OpenTelemetry Go API and no SDK; attached, inject exports them with its own spans, the
//! order span a child of inject's HTTP server span and the parent of the HTTP client call
//! made under it. Before attaching and after detaching (also after a `kill -9` and
//! `inject detach`) the application's spans are no-ops again. With an SDK of its own, the
//! application exports its spans once, itself, and they equal what inject exported from
//! the plain build.
//!
//! otel-go v1.33 (the first with the Auto SDK) needs Go 1.22, so these run with the
//! newest Go of the test set, on the oldest and the newest otel-go.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tests::otlp::{Received, Receiver, Transport};
use tests::{http_get, require_ptrace, scratch, start_fixture, start_inject, start_inject_env};
use xtask::{Flavor, GoToolchain, test_toolchains};

const LIMIT: Duration = Duration::from_secs(60);
const OTEL: &str = "go.opentelemetry.io/otel";
const SDK: &str = "go.opentelemetry.io/otel/sdk";
const OTLP_HTTP: &str = "go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp";
/// The oldest otel-go with the Auto SDK, and the newest served.
const VERSIONS: [&str; 2] = ["v1.33.0", "v1.47.0"];
/// The requests: SKU and quantity (over 10: the reserve span fails).
const ORDERS: [(&str, u32); 3] = [("a1", 3), ("b2", 30), ("c3", 7)];

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;

fn build(tc: &GoToolchain, version: &str, flavor: Flavor, sdk: bool) -> Result<std::path::PathBuf> {
    if sdk {
        let pins = [(OTEL, version), (SDK, version), (OTLP_HTTP, version)];
        xtask::build_pinned_fixture("otelapp", Some("otelapp-sdk"), &pins, tc, flavor)
    } else {
        xtask::build_pinned_fixture("otelapp", None, &[(OTEL, version)], tc, flavor)
    }
}

/// One request: the order span's Go type and trace id, as the handler saw them.
fn order(addr: &str, (sku, qty): (&str, u32)) -> Result<(String, String)> {
    let (code, body) = http_get(addr, &format!("/order?sku={sku}&qty={qty}"))?;
    ensure!(code == 200, "/order: {code} {body}");
    let (ty, trace) = body.split_once(' ').context("response")?;
    Ok((ty.to_string(), trace.to_string()))
}

const NO_OP: &str = "global.nonRecordingSpan";
const ZERO: &str = "00000000000000000000000000000000";

fn attach(pid: i32, rx: &Receiver, name: &str) -> Result<(tests::Proc, std::path::PathBuf)> {
    let summary = scratch(&format!("otelsdk-{name}-{pid}.json"));
    let args: Vec<String> = ["--pid", &pid.to_string(), "--service-name", name, "--summary-json"]
        .iter()
        .map(|s| s.to_string())
        .chain([summary.display().to_string()])
        .collect();
    let endpoint = rx.endpoint();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    Ok((start_inject_env(&args, &env, true)?, summary))
}

fn detach(inject: &mut tests::Proc, summary: &std::path::Path) -> Result<Value> {
    inject.signal(15);
    let st = inject.wait(LIMIT)?;
    ensure!(st.success(), "inject: {st}\n{}", inject.transcript());
    let s = tests::schema::read_summary(summary)?;
    let _ = std::fs::remove_file(summary);
    Ok(s)
}

fn by_trace(spans: Vec<Received>) -> HashMap<String, Vec<Received>> {
    let mut out: HashMap<String, Vec<Received>> = HashMap::new();
    for s in spans {
        out.entry(s.trace_id()).or_default().push(s);
    }
    out
}

fn one<'a>(t: &'a [Received], what: &str, f: impl Fn(&Received) -> bool) -> Result<&'a Received> {
    let found: Vec<&Received> = t.iter().filter(|s| f(s)).collect();
    ensure!(found.len() == 1, "{} {what} spans in {:#?}", found.len(), t);
    Ok(found[0])
}

fn status(s: &Received) -> (i32, String) {
    s.span.status.as_ref().map_or((0, String::new()), |st| (st.code, st.message.clone()))
}

/// Checks one request's trace: SERVER /order → INTERNAL order → (CLIENT GET → SERVER
/// /price, INTERNAL reserve); returns the order and reserve spans.
fn check_trace<'a>(t: &'a [Received], (sku, qty): (&str, u32)) -> Result<(&'a Received, &'a Received)> {
    let server =
        one(t, "SERVER /order", |s| s.span.kind == SERVER && s.attr_str("url.path").as_deref() == Some("/order"))?;
    let order = one(t, "order", |s| s.span.name == "order")?;
    let client = one(t, "CLIENT", |s| s.span.kind == CLIENT)?;
    let price =
        one(t, "SERVER /price", |s| s.span.kind == SERVER && s.attr_str("url.path").as_deref() == Some("/price"))?;
    let reserve = one(t, "reserve", |s| s.span.name == "reserve")?;
    ensure!(t.len() == 5, "{} spans: {t:#?}", t.len());
    ensure!(order.span.kind == INTERNAL && order.scope == "shop", "order: {order:#?}");
    ensure!(order.parent_id() == Some(server.span_id()), "order's parent is not the server span: {t:#?}");
    ensure!(client.parent_id() == Some(order.span_id()), "the client call's parent is not the order span: {t:#?}");
    ensure!(price.parent_id() == Some(client.span_id()), "/price's parent is not the client span: {t:#?}");
    ensure!(reserve.parent_id() == Some(order.span_id()), "reserve's parent is not the order span: {t:#?}");
    ensure!(order.attr_str("shop.sku").as_deref() == Some(sku), "{order:#?}");
    ensure!(order.attr_i64("shop.qty") == Some(i64::from(qty)), "{order:#?}");
    let want = if qty > 10 { (2, "out of stock".to_string()) } else { (0, String::new()) };
    ensure!(status(reserve) == want, "reserve's status {:?}, want {want:?}", status(reserve));
    let events: Vec<&str> = reserve.span.events.iter().map(|e| e.name.as_str()).collect();
    ensure!(events == if qty > 10 { vec!["exception"] } else { vec![] }, "reserve's events {events:?}");
    ensure!(order.span.start_time_unix_nano >= server.span.start_time_unix_nano, "order starts before its parent");
    ensure!(order.span.end_time_unix_nano <= server.span.end_time_unix_nano, "order ends after its parent");
    Ok((order, reserve))
}

/// Runs the plain build under inject: the spans inject exported, one trace per order.
fn traced_run(tc: &GoToolchain, version: &str, flavor: Flavor, kill: bool) -> Result<Vec<Vec<Received>>> {
    let exe = build(tc, version, flavor, false)?;
    let app = start_fixture(&exe, &[], &[])?;
    let addr = app.value("LISTEN").context("LISTEN")?;
    ensure!(order(&addr, ORDERS[0])? == (NO_OP.into(), ZERO.into()), "spans before attaching");
    let rx = Receiver::start(Transport::Http)?;
    let (mut inject, summary) = attach(app.pid(), &rx, "otelapp")?;
    let mut ids = Vec::new();
    for o in ORDERS {
        let (ty, trace) = order(&addr, o)?;
        ensure!(ty == "*sdk.span" && trace != ZERO, "attached: {ty} {trace}");
        ids.push(trace);
    }
    let s = detach(&mut inject, &summary)?;
    let n = 2 * ORDERS.len() as u64;
    for (k, want) in
        [("app_spans_started", n), ("app_spans", n), ("app_spans_too_large", 0), ("app_spans_unreadable", 0)]
    {
        ensure!(s[k] == want, "summary {k} = {}, want {want}", s[k]);
    }
    ensure!(order(&addr, ORDERS[0])? == (NO_OP.into(), ZERO.into()), "spans after detaching");
    ensure!(tests::text_differs_from_file(app.pid(), &exe)?.is_none(), "code left patched");
    if kill {
        jsonl_run(app.pid(), &addr)?;
        // A dead inject's probes and flag: the next `inject detach` takes both back.
        let (mut again, summary) = attach(app.pid(), &rx, "again")?;
        ensure!(order(&addr, ORDERS[0])?.0 == "*sdk.span", "second attach");
        again.signal(9);
        again.wait(LIMIT)?;
        let _ = std::fs::remove_file(summary);
        ensure!(order(&addr, ORDERS[0])?.0 == "*sdk.span", "inject killed: the probes stay until cleaned");
        let args = ["detach".to_string(), "--pid".into(), app.pid().to_string()];
        let mut d = start_inject(&args, false)?;
        ensure!(d.wait(LIMIT)?.success(), "inject detach:\n{}", d.transcript());
        ensure!(order(&addr, ORDERS[0])? == (NO_OP.into(), ZERO.into()), "spans after the clean-up");
        ensure!(tests::text_differs_from_file(app.pid(), &exe)?.is_none(), "not restored after kill -9");
    }
    rx.wait_spans(5 * ORDERS.len() as u64, LIMIT).context("spans")?;
    let mut traces = by_trace(rx.spans());
    let mut out = Vec::new();
    for (id, o) in ids.iter().zip(ORDERS) {
        // The id the application saw is the trace's: the span context came from inject.
        let t = traces.remove(id).with_context(|| format!("no trace {id} for order {o:?}"))?;
        check_trace(&t, o).with_context(|| format!("order {o:?}"))?;
        out.push(t);
    }
    Ok(out)
}

/// JSON lines: the application's spans are records of their own kind (the schema's
/// `appSpan`), in the trace of inject's.
fn jsonl_run(pid: i32, addr: &str) -> Result<()> {
    let jsonl = scratch(&format!("otelsdk-{pid}.jsonl"));
    let args: Vec<String> = ["--pid", &pid.to_string(), "--output", "jsonl", "--output-file"]
        .iter()
        .map(|s| s.to_string())
        .chain([jsonl.display().to_string()])
        .collect();
    let mut inject = start_inject(&args, true)?;
    let (_, trace) = order(addr, ORDERS[1])?;
    inject.signal(15);
    ensure!(inject.wait(LIMIT)?.success(), "inject --output jsonl:\n{}", inject.transcript());
    let lines = tests::schema::read_jsonl(&jsonl)?;
    let _ = std::fs::remove_file(&jsonl);
    let find = |name: &str| lines.iter().find(|l| l["name"] == name && l["scope"]["name"] == "shop");
    let (o, r) = (find("order").context("no order line")?, find("reserve").context("no reserve line")?);
    let server = lines.iter().find(|l| l["kind"] == "SERVER" && l["attributes"]["url.path"] == "/order");
    ensure!(o["trace_id"] == trace.as_str() && r["trace_id"] == trace.as_str(), "{lines:#?}");
    ensure!(o["parent_span_id"] == server.context("no server line")?["span_id"], "{lines:#?}");
    ensure!(r["parent_span_id"] == o["span_id"] && r["error"] == "out of stock", "{lines:#?}");
    ensure!(o["attributes"]["shop.qty"] == 30 && r["events"][0]["name"] == "exception", "{lines:#?}");
    Ok(())
}

#[test]
fn the_applications_spans_join_inject_traces_and_detach_gives_it_no_ops_back() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    for (version, flavor, kill) in [
        (VERSIONS[0], Flavor::Stripped, false),
        (VERSIONS[1], Flavor::Default, true),
        (VERSIONS[1], Flavor::Pie, false),
    ] {
        let case = format!("Go {} {flavor:?} otel-go {version}", tc.version);
        traced_run(&tc, version, flavor, kill).with_context(|| case.clone())?;
        eprintln!("{case}: {} orders, one connected trace of 5 spans each", ORDERS.len());
    }
    Ok(())
}

/// An application with its own SDK keeps it: its spans reach the receiver once, from
/// its own exporter (its service name), none from inject; and they are what inject
/// exports for the plain build: names, kinds, scope, attributes, status, events, and
/// which span is whose parent.
#[test]
fn an_application_with_its_own_sdk_exports_its_spans_once_and_inject_matches_them() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let _serial = tests::exclusive();
    let tc = test_toolchains()?.pop().context("no Go")?;
    let version = VERSIONS[1];
    let ours = traced_run(&tc, version, Flavor::Default, false)?;
    let exe = build(&tc, version, Flavor::Default, true)?;
    let rx = Receiver::start(Transport::Http)?;
    let endpoint = rx.endpoint();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_SERVICE_NAME", "otelapp-sdk")];
    let mut app = start_fixture(&exe, &[], &env)?;
    let addr = app.value("LISTEN").context("LISTEN")?;
    let (mut inject, summary) = attach(app.pid(), &rx, "inject-side")?;
    let mut ids = Vec::new();
    for o in ORDERS {
        let (ty, trace) = order(&addr, o)?;
        ensure!(ty == "*trace.recordingSpan" && trace != ZERO, "the SDK's own span: {ty} {trace}");
        ids.push(trace);
    }
    let s = detach(&mut inject, &summary)?;
    ensure!(s["app_spans_started"] == 0 && s["app_spans"] == 0, "inject saw the SDK's spans: {s}");
    app.signal(15);
    ensure!(app.wait(LIMIT)?.success(), "{}", app.transcript());
    // Inject's 3 spans and the application's 2 per order.
    // Both exporters flushed before their process (or inject) exited: nothing is still on
    // its way.
    rx.wait_spans(5 * ORDERS.len() as u64, LIMIT).context("spans")?;
    let spans = rx.spans();
    let mine: Vec<&Received> = spans.iter().filter(|s| s.scope == "shop").collect();
    ensure!(mine.len() == 2 * ORDERS.len(), "{} application spans for {} orders: {mine:#?}", mine.len(), ORDERS.len());
    for s in &mine {
        ensure!(s.resource_str("service.name").as_deref() == Some("otelapp-sdk"), "exported by inject: {s:#?}");
    }
    // Inject still traces the HTTP side (and the SDK's own exports, which it does not
    // count here).
    let served = spans
        .iter()
        .filter(|s| s.resource_str("service.name").as_deref() == Some("inject-side"))
        .filter(|s| s.span.kind == SERVER && s.attr_str("url.path").as_deref() == Some("/order"))
        .count();
    ensure!(served == ORDERS.len(), "{served} /order server spans from inject for {} orders", ORDERS.len());
    let theirs = by_trace(mine.into_iter().cloned().collect());
    for ((id, o), ours) in ids.iter().zip(ORDERS).zip(&ours) {
        let t = theirs.get(id).with_context(|| format!("no trace {id} from the SDK"))?;
        for name in ["order", "reserve"] {
            let a = one(t, name, |s| s.span.name == name)?;
            let b = one(ours, name, |s| s.span.name == name)?;
            let shape = |s: &Received| {
                let mut attrs: Vec<(String, String)> = s
                    .span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), format!("{:?}", kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                    .collect();
                attrs.sort();
                let events: Vec<String> = s.span.events.iter().map(|e| e.name.clone()).collect();
                (s.span.kind, s.scope.clone(), attrs, status(s), events)
            };
            ensure!(shape(a) == shape(b), "order {o:?} span {name}: the SDK's {:?}, inject's {:?}", shape(a), shape(b));
        }
        let parent_of_reserve = |t: &[Received]| -> Result<bool> {
            Ok(one(t, "reserve", |s| s.span.name == "reserve")?.parent_id()
                == Some(one(t, "order", |s| s.span.name == "order")?.span_id()))
        };
        ensure!(parent_of_reserve(t)? && parent_of_reserve(ours)?, "reserve is not order's child on both sides");
    }
    Ok(())
}
