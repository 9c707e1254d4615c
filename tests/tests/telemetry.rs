//! inject as an OpenTelemetry citizen: traces and RED metrics reach a real OpenTelemetry
//! Collector over TLS (a self-signed CA given by OTEL_EXPORTER_OTLP_CERTIFICATE) and over
//! mutual TLS; a wrong CA is one line naming the endpoint and the certificate problem
//! while the target serves on; `http.server.request.duration` counts every request per
//! route and status while the sampler keeps a tenth of the traces; a Prometheus scrape
//! shows the same counts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::otlp::{Receiver, Transport};
use tests::servers::{Collector, CollectorConfig, ServerTls, TestCerts, require_collector};
use tests::{http_get, require_ptrace, scratch, start_fixture, start_inject_env};
use xtask::{Flavor, build_fixture, test_toolchains};

const LIMIT: Duration = Duration::from_secs(60);

/// The requests made: path, how many, the route and status they count under.
const REQUESTS: &[(&str, u64, &str, i64)] = &[("/hello", 30, "/hello", 200), ("/status/418", 20, "/status/", 418)];

fn make_requests(addr: &str) -> Result<()> {
    for (path, n, _, status) in REQUESTS {
        for _ in 0..*n {
            let (code, body) = http_get(addr, path)?;
            ensure!(i64::from(code) == *status, "{path}: {code} {body}");
        }
    }
    Ok(())
}

/// The counts of the last (cumulative) point of each (route, status) series.
fn counts(points: &[tests::otlp::MetricPoint]) -> BTreeMap<(String, i64), u64> {
    let mut out = BTreeMap::new();
    for p in points {
        let key = (p.attr_str("http.route").unwrap_or_default(), p.attr_i64("http.response.status_code").unwrap_or(0));
        let c = out.entry(key).or_insert(0);
        *c = (*c).max(p.count.unwrap_or(0));
    }
    out
}

fn want() -> BTreeMap<(String, i64), u64> {
    REQUESTS.iter().map(|(_, n, route, status)| ((route.to_string(), *status), *n)).collect()
}

#[test]
fn traces_and_metrics_reach_a_tls_collector_and_count_every_request() -> Result<()> {
    if !require_ptrace()? || !require_collector()? {
        return Ok(());
    }
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("httpserver", tc, Flavor::Default)?;
    let certs = TestCerts::generate()?;
    for (protocol, mutual) in [("grpc", true), ("http/protobuf", false)] {
        let what = format!("{protocol}{}", if mutual { " mTLS" } else { " TLS" });
        let receiver = Receiver::start(Transport::Http)?;
        let tls = if mutual { ServerTls::mutual(&certs) } else { ServerTls::server(&certs) };
        let col = Collector::start(&CollectorConfig { tls: Some(tls), forward: receiver.forward() })?;
        let endpoint = if protocol == "grpc" { col.grpc_endpoint() } else { col.http_endpoint() };
        let mut server = start_fixture(&exe, &[], &[])?;
        let addr = server.value("LISTEN").context("LISTEN")?;
        let summary = scratch(&format!("telemetry-{}.json", server.pid()));
        let (ca, cert, key) = (
            certs.ca.display().to_string(),
            certs.client.display().to_string(),
            certs.client_key.display().to_string(),
        );
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ];
        if mutual {
            env.extend([
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.as_str()),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
            ]);
        }
        let args: Vec<String> = ["--pid", &server.pid().to_string(), "--summary-json", &summary.display().to_string()]
            .map(String::from)
            .into();
        let mut inject = start_inject_env(&args, &env, true)?;
        make_requests(&addr)?;
        inject.signal(15);
        ensure!(inject.wait(LIMIT)?.success(), "{what}: inject:\n{}\ncollector:\n{}", inject.transcript(), col.log());
        let s = tests::schema::read_summary(&summary)?;
        let _ = std::fs::remove_file(&summary);
        let total: u64 = REQUESTS.iter().map(|r| r.1).sum();
        // Spans: a tenth of the traces, each exported once; the rest counted out.
        let exported = s["otlp"]["exported"].as_u64().unwrap_or(0);
        let sampled_out = s["otlp"]["sampled_out"].as_u64().unwrap_or(0);
        ensure!(exported + sampled_out == total && exported < total / 2, "{what}: {}", s["otlp"]);
        receiver.wait_spans(exported, LIMIT)?;
        ensure!(s["metrics"]["recorded"] == total && s["metrics"]["failed_exports"] == 0, "{what}: {}", s["metrics"]);
        // Metrics: every request, by route and status.
        let points = receiver
            .wait_metric("http.server.request.duration", LIMIT)
            .with_context(|| format!("{what}: metrics {}; collector log:\n{}", s["metrics"], col.log()))?;
        let deadline = std::time::Instant::now() + LIMIT;
        while counts(&receiver.metric("http.server.request.duration")) != want() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let got = counts(&receiver.metric("http.server.request.duration"));
        ensure!(got == want(), "{what}: counts {got:?}, want {:?}; points {points:?}", want());
        let p = &receiver.metric("http.server.request.duration")[0];
        ensure!(p.unit == "s" && p.explicit_bounds.first() == Some(&0.005), "{what}: {p:?}");
        ensure!(p.resource_str("service.name").is_some(), "{what}: no service.name: {p:?}");
        server.signal(15);
        ensure!(server.wait(LIMIT)?.success(), "{what}: the server failed");
        eprintln!("telemetry: {what}: {exported} of {total} traces exported, every request counted in the metrics");
    }
    Ok(())
}

#[test]
fn a_wrong_ca_is_one_line_and_the_target_serves_on() -> Result<()> {
    if !require_ptrace()? || !require_collector()? {
        return Ok(());
    }
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("httpserver", tc, Flavor::Default)?;
    let certs = TestCerts::generate()?;
    let receiver = Receiver::start(Transport::Http)?;
    let col = Collector::start(&CollectorConfig { tls: Some(ServerTls::server(&certs)), forward: receiver.forward() })?;
    let endpoint = col.http_endpoint();
    let mut server = start_fixture(&exe, &[], &[])?;
    let addr = server.value("LISTEN").context("LISTEN")?;
    let other = certs.other_ca.display().to_string();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_CERTIFICATE", &other)];
    let mut inject = start_inject_env(&["--pid".into(), server.pid().to_string()], &env, true)?;
    make_requests(&addr)?;
    let line = inject.wait_for_any("OTLP export to", LIMIT)?;
    ensure!(line.contains(&endpoint) && line.contains("UnknownIssuer"), "not the endpoint and the reason: {line}");
    ensure!(!line.contains('\n'), "more than one line: {line}");
    inject.signal(15);
    inject.wait(LIMIT)?;
    let last = inject.transcript();
    ensure!(last.contains("no span reached"), "the session should say nothing got through:\n{last}");
    make_requests(&addr)?;
    server.signal(15);
    ensure!(server.wait(LIMIT)?.success(), "the server failed:\n{}", server.transcript());
    ensure!(receiver.span_count() == 0, "spans passed a collector whose certificate did not verify");
    Ok(())
}

#[test]
fn prometheus_shows_the_same_counts() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("httpserver", tc, Flavor::Default)?;
    let mut server = start_fixture(&exe, &[], &[])?;
    let addr = server.value("LISTEN").context("LISTEN")?;
    let env = [
        ("OTEL_METRICS_EXPORTER", "prometheus"),
        ("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "0"),
    ];
    let args: Vec<String> = ["--pid", &server.pid().to_string(), "--output", "none"].map(String::from).into();
    let mut inject = start_inject_env(&args, &env, true)?;
    let line = inject.wait_for_any("metrics for Prometheus at http://", LIMIT)?;
    let scrape = line.rsplit("http://").next().and_then(|u| u.strip_suffix("/metrics")).context("address")?.to_string();
    make_requests(&addr)?;
    // The output thread counts as calls come out of the collector (within a second).
    let mut text = String::new();
    for _ in 0..50 {
        let (code, body) = http_get(&scrape, "/metrics")?;
        ensure!(code == 200, "scrape: {code}");
        text = body;
        let all = want().iter().all(|((route, status), n)| {
            text.lines().any(|l| {
                l.starts_with("http_server_request_duration_seconds_count{")
                    && l.contains(&format!("http_route=\"{route}\""))
                    && l.contains(&format!("http_response_status_code=\"{status}\""))
                    && l.ends_with(&format!(" {n}"))
            })
        });
        if all {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        text.clear();
    }
    ensure!(!text.is_empty(), "the scrape never showed {:?}:\n{}", want(), http_get(&scrape, "/metrics")?.1);
    ensure!(text.contains("# TYPE http_server_request_duration_seconds histogram"), "{text}");
    inject.signal(15);
    ensure!(inject.wait(LIMIT)?.success(), "inject:\n{}", inject.transcript());
    server.signal(15);
    ensure!(server.wait(LIMIT)?.success());
    Ok(())
}
