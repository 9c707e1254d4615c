//! The OpenTelemetry Collector harness, without inject: a real collector (built from the
//! Go module proxy by xtask) with TLS on its OTLP receivers forwards traces and metrics to
//! the tests' own plain receiver. curl is the client: OTLP/HTTP protobuf and JSON, and
//! OTLP/gRPC over HTTP/2, trusting the test CA; the wrong CA is refused, and with mTLS a
//! client without a certificate of the test CA is refused. The baseline the TLS OTLP
//! exporter's and the metrics' tests build on.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use tests::otlp::{MetricKind, Receiver, Temporality, Transport};
use tests::servers::{Collector, CollectorConfig, ServerTls, TestCerts, require_collector};

const LIMIT: Duration = Duration::from_secs(15);

/// Whether the test can run: the collector (or what builds it), openssl and curl. Under
/// CI a missing one fails the test.
fn ready() -> Result<bool> {
    if !require_collector()? {
        return Ok(false);
    }
    if Command::new("curl").arg("--version").output().is_err() {
        ensure!(!xtask::in_ci(), "curl is not installed, and CI=true: `cargo xtask test` installs it");
        eprintln!("SKIP: curl is not installed (`cargo xtask test` installs it)");
        return Ok(false);
    }
    Ok(true)
}

/// How curl shows itself: whom it trusts, and the client certificate it presents.
struct Client<'a> {
    ca: &'a Path,
    cert: Option<(&'a Path, &'a Path)>,
}

impl Client<'_> {
    /// POSTs `body` to `url`; the finished curl (exit status 0 only for a 2xx answer).
    fn post(&self, url: &str, content_type: &str, body: &[u8], grpc: bool) -> Result<Output> {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "10", "--fail-with-body", "--cacert"]).arg(self.ca);
        if let Some((cert, key)) = self.cert {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        if grpc {
            c.args(["--http2", "-H", "te: trailers"]);
        }
        c.args(["-H", &format!("content-type: {content_type}"), "--data-binary", "@-", url]);
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        child.stdin.take().context("curl's stdin")?.write_all(body)?;
        Ok(child.wait_with_output()?)
    }

    /// [`Client::post`], failing unless curl succeeded.
    fn post_ok(&self, url: &str, content_type: &str, body: &[u8], grpc: bool, col: &Collector) -> Result<()> {
        let out = self.post(url, content_type, body, grpc)?;
        if !out.status.success() {
            bail!(
                "curl {url} failed ({}): {}{}\ncollector log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                col.log()
            );
        }
        Ok(())
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn string(key: &str, v: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
        ..KeyValue::default()
    }
}

/// One span named `name` (its trace id from the name's bytes) of service `collector-test`.
fn trace_request(name: &str) -> ExportTraceServiceRequest {
    let mut trace_id = [7u8; 16];
    for (d, s) in trace_id.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    let end = now_ns();
    let span = Span {
        trace_id: trace_id.to_vec(),
        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
        name: name.into(),
        kind: 2,
        start_time_unix_nano: end - 1_000_000,
        end_time_unix_nano: end,
        attributes: vec![string("test.case", name)],
        ..Span::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string("service.name", "collector-test")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "inject/test".into(), ..InstrumentationScope::default() }),
                spans: vec![span],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

/// A histogram (delta, 3 values in buckets ≤0.1, ≤0.5, >0.5) and a monotonic cumulative
/// sum, in OTLP/JSON as an SDK sends it: 64-bit integers as strings, enums as numbers.
fn metrics_json(route: &str) -> String {
    let (start, now) = (now_ns() - 1_000_000_000, now_ns());
    format!(
        r#"{{"resourceMetrics":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"collector-test"}}}}]}},
"scopeMetrics":[{{"scope":{{"name":"inject/test","version":"1"}},"metrics":[
{{"name":"test.duration","unit":"s","histogram":{{"aggregationTemporality":1,"dataPoints":[{{
"attributes":[{{"key":"http.route","value":{{"stringValue":"{route}"}}}}],
"startTimeUnixNano":"{start}","timeUnixNano":"{now}","count":"3","sum":0.75,"min":0.05,"max":0.4,
"bucketCounts":["1","2","0"],"explicitBounds":[0.1,0.5]}}]}}}},
{{"name":"test.calls","sum":{{"aggregationTemporality":2,"isMonotonic":true,"dataPoints":[{{
"startTimeUnixNano":"{start}","timeUnixNano":"{now}","asInt":"7"}}]}}}}]}}]}}]}}"#
    )
}

/// `body` in a gRPC message frame: uncompressed, 4-byte big-endian length.
fn grpc_frame(body: &[u8]) -> Vec<u8> {
    let mut f = vec![0];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Waits for a span named `name` at `receiver`.
fn wait_span(receiver: &Receiver, name: &str, col: &Collector) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    while !receiver.spans().iter().any(|s| s.span.name == name) {
        if Instant::now() > deadline {
            bail!("span {name:?} never reached the receiver; collector log:\n{}", col.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The metrics of [`metrics_json`] arrived, whole.
fn check_metrics(receiver: &Receiver, route: &str, col: &Collector) -> Result<()> {
    let hist =
        receiver.wait_metric("test.duration", LIMIT).with_context(|| format!("collector log:\n{}", col.log()))?;
    let h = hist.iter().find(|p| p.attr_str("http.route").as_deref() == Some(route)).context("no point of route")?;
    ensure!((h.kind, h.temporality) == (MetricKind::Histogram, Temporality::Delta), "{h:?}");
    ensure!((h.count, h.sum, h.min, h.max) == (Some(3), Some(0.75), Some(0.05), Some(0.4)), "{h:?}");
    ensure!(h.bucket_counts == [1, 2, 0] && h.explicit_bounds == [0.1, 0.5], "{h:?}");
    ensure!((h.unit.as_str(), h.scope.as_str(), h.scope_version.as_str()) == ("s", "inject/test", "1"), "{h:?}");
    ensure!(h.resource_str("service.name").as_deref() == Some("collector-test"), "{h:?}");
    let calls = receiver.wait_metric("test.calls", LIMIT)?;
    let c = calls.first().context("no test.calls point")?;
    ensure!((c.kind, c.temporality, c.monotonic) == (MetricKind::Sum, Temporality::Cumulative, true), "{c:?}");
    ensure!(c.int_value == Some(7), "{c:?}");
    Ok(())
}

#[test]
fn a_tls_collector_forwards_traces_and_metrics() -> Result<()> {
    if !ready()? {
        return Ok(());
    }
    let certs = TestCerts::generate()?;
    // Declared before the collector, so dropped after it: the collector stops first.
    let receiver = Receiver::start(Transport::Grpc)?;
    let cfg = CollectorConfig { tls: Some(ServerTls::server(&certs)), forward: receiver.forward() };
    let col = Collector::start(&cfg)?;
    ensure!(col.http_endpoint().starts_with("https://127.0.0.1:"), "{}", col.http_endpoint());
    ensure!(col.grpc_endpoint().starts_with("https://127.0.0.1:"), "{}", col.grpc_endpoint());
    let client = Client { ca: &certs.ca, cert: None };

    // OTLP/HTTP protobuf, then JSON.
    let traces = format!("{}/v1/traces", col.http_endpoint());
    let body = trace_request("over-https").encode_to_vec();
    client.post_ok(&traces, "application/x-protobuf", &body, false, &col)?;
    wait_span(&receiver, "over-https", &col)?;
    let got = receiver.spans().into_iter().find(|s| s.span.name == "over-https").context("span")?;
    ensure!(got.resource_str("service.name").as_deref() == Some("collector-test"), "{got:?}");
    ensure!(got.attr_str("test.case").as_deref() == Some("over-https") && got.scope == "inject/test", "{got:?}");
    let metrics = format!("{}/v1/metrics", col.http_endpoint());
    client.post_ok(&metrics, "application/json", metrics_json("/json").as_bytes(), false, &col)?;
    check_metrics(&receiver, "/json", &col)?;

    // OTLP/gRPC over TLS (HTTP/2 by ALPN).
    let export = format!("{}/opentelemetry.proto.collector.trace.v1.TraceService/Export", col.grpc_endpoint());
    let frame = grpc_frame(&trace_request("over-grpc-tls").encode_to_vec());
    client.post_ok(&export, "application/grpc", &frame, true, &col)?;
    wait_span(&receiver, "over-grpc-tls", &col)?;

    // A client that trusts only the unrelated CA refuses the server's certificate.
    let wrong = Client { ca: &certs.other_ca, cert: None };
    let out = wrong.post(&traces, "application/x-protobuf", &trace_request("wrong-ca").encode_to_vec(), false)?;
    // curl's 60: the peer's certificate could not be verified against the CA.
    ensure!(out.status.code() == Some(60), "trusting the other CA: {out:?}");
    ensure!(receiver.spans().iter().all(|s| s.span.name != "wrong-ca"));
    Ok(())
}

#[test]
fn an_mtls_collector_takes_only_clients_with_a_certificate_of_its_ca() -> Result<()> {
    if !ready()? {
        return Ok(());
    }
    let certs = TestCerts::generate()?;
    // OTLP/HTTP this time: the receiver's /v1/metrics gets the exporter's gzip protobuf.
    let receiver = Receiver::start(Transport::Http)?;
    let cfg = CollectorConfig { tls: Some(ServerTls::mutual(&certs)), forward: receiver.forward() };
    let col = Collector::start(&cfg)?;
    let traces = format!("{}/v1/traces", col.http_endpoint());
    let metrics = format!("{}/v1/metrics", col.http_endpoint());
    let export = format!("{}/opentelemetry.proto.collector.trace.v1.TraceService/Export", col.grpc_endpoint());

    let refused: [(&str, Client); 2] = [
        ("no client certificate", Client { ca: &certs.ca, cert: None }),
        (
            "a client certificate of the other CA",
            Client { ca: &certs.ca, cert: Some((&certs.other_client, &certs.other_client_key)) },
        ),
    ];
    for (what, client) in &refused {
        let body = trace_request("refused").encode_to_vec();
        let out = client.post(&traces, "application/x-protobuf", &body, false)?;
        ensure!(!out.status.success(), "with {what} the HTTP receiver took the request: {out:?}");
        let out = client.post(&export, "application/grpc", &grpc_frame(&body), true)?;
        ensure!(!out.status.success(), "with {what} the gRPC receiver took the request: {out:?}");
    }

    let client = Client { ca: &certs.ca, cert: Some((&certs.client, &certs.client_key)) };
    client.post_ok(&metrics, "application/json", metrics_json("/mtls").as_bytes(), false, &col)?;
    check_metrics(&receiver, "/mtls", &col)?;
    let body = trace_request("over-mtls").encode_to_vec();
    client.post_ok(&traces, "application/x-protobuf", &body, false, &col)?;
    let frame = grpc_frame(&trace_request("over-grpc-mtls").encode_to_vec());
    client.post_ok(&export, "application/grpc", &frame, true, &col)?;
    wait_span(&receiver, "over-mtls", &col)?;
    wait_span(&receiver, "over-grpc-mtls", &col)?;
    ensure!(receiver.spans().iter().all(|s| s.span.name != "refused"), "a refused request got through");
    ensure!(receiver.bad_requests() == 0, "the receiver could not decode {} requests", receiver.bad_requests());
    Ok(())
}

#[test]
fn the_receiver_takes_otlp_json_metrics() -> Result<()> {
    if Command::new("curl").arg("--version").output().is_err() {
        ensure!(!xtask::in_ci(), "curl is not installed, and CI=true: `cargo xtask test` installs it");
        eprintln!("SKIP: curl is not installed (`cargo xtask test` installs it)");
        return Ok(());
    }
    let receiver = Receiver::start(Transport::Http)?;
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "--fail-with-body", "-H", "content-type: application/json"]);
    c.args(["--data-binary", &metrics_json("/direct"), &format!("{}/v1/metrics", receiver.endpoint())]);
    let out = c.output()?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(receiver.metric_point_count() == 2, "{} points", receiver.metric_point_count());
    let h = receiver.metric("test.duration");
    ensure!(
        h.len() == 1 && h[0].count == Some(3) && h[0].attr_str("http.route").as_deref() == Some("/direct"),
        "{h:?}"
    );
    ensure!(receiver.spans().is_empty(), "metrics were taken for spans");
    Ok(())
}

#[test]
fn the_deploy_configuration_is_valid() -> Result<()> {
    if !require_collector()? {
        return Ok(());
    }
    let file = xtask::workspace_root().join("docs/deploy/otelcol.yaml");
    let out = Command::new(xtask::collector::install()?)
        .arg("validate")
        .arg("--config")
        .arg(format!("file:{}", file.display()))
        .output()?;
    ensure!(
        out.status.success(),
        "{}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
