//! A real OTLP receiver of traces and metrics on a loopback port: HTTP (`/v1/traces` and
//! `/v1/metrics`, protobuf and JSON) on std threads, gRPC (TraceService and MetricsService)
//! on tonic. It decodes every request with opentelemetry-proto, keeps them, and can be
//! stopped and restarted on the same port to play an endpoint that goes down. Metrics come
//! out flattened to data points ([`metrics`]).

pub mod metrics;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

pub use metrics::{MetricKind, MetricPoint, Temporality};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    spans: AtomicU64,
    /// Requests that could not be decoded.
    bad: AtomicU64,
    /// Count spans only (benchmarks), without keeping them.
    count_only: bool,
    metric_requests: Mutex<Vec<ExportMetricsServiceRequest>>,
    /// Metric data points received.
    points: AtomicU64,
}

impl Shared {
    fn take(&self, req: ExportTraceServiceRequest) {
        let n: usize = req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        if self.count_only {
            return;
        }
        if let Ok(mut r) = self.requests.lock() {
            r.push(req);
        }
    }

    /// Metrics are always kept (count_only is about spans).
    fn take_metrics(&self, req: ExportMetricsServiceRequest) {
        self.points.fetch_add(metrics::count_points(&req) as u64, Ordering::Relaxed);
        if let Ok(mut r) = self.metric_requests.lock() {
            r.push(req);
        }
    }
}

enum Running {
    Http { stop: Arc<AtomicBool>, accept: std::thread::JoinHandle<()>, conns: Arc<Mutex<Vec<TcpStream>>> },
    Grpc { stop: tokio::sync::oneshot::Sender<()>, task: tokio::task::JoinHandle<()> },
}

pub struct Receiver {
    pub transport: Transport,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
    rt: Option<tokio::runtime::Runtime>,
}

/// One received span with what it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub resource: HashMap<String, AnyValue>,
    pub scope: String,
    pub span: Span,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<&AnyValue> {
        attr(&self.span.attributes, key)
    }
    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attr(key).and_then(as_string)
    }
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        match self.attr(key)?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }
    pub fn resource_str(&self, key: &str) -> Option<String> {
        self.resource.get(key).and_then(as_string)
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id(&self) -> Option<String> {
        (!self.span.parent_span_id.is_empty()).then(|| hex(&self.span.parent_span_id))
    }
    pub fn duration_ns(&self) -> u64 {
        self.span.end_time_unix_nano.saturating_sub(self.span.start_time_unix_nano)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref())
}

pub fn as_string(v: &AnyValue) -> Option<String> {
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        any_value::Value::ArrayValue(a) => Some(a.values.iter().filter_map(as_string).collect::<Vec<_>>().join(" ")),
        _ => None,
    }
}

impl Receiver {
    /// Starts on a free loopback port.
    pub fn start(transport: Transport) -> Result<Receiver> {
        Receiver::start_with(transport, false)
    }

    /// Starts a receiver that counts spans without keeping them.
    pub fn start_counting(transport: Transport) -> Result<Receiver> {
        Receiver::start_with(transport, true)
    }

    fn start_with(transport: Transport, count_only: bool) -> Result<Receiver> {
        let rt = match transport {
            Transport::Grpc => Some(
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio")?,
            ),
            Transport::Http => None,
        };
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { count_only, ..Shared::default() });
        let mut r = Receiver { transport, addr, shared, running: None, rt };
        r.serve(listener)?;
        Ok(r)
    }

    /// The endpoint to give OTEL_EXPORTER_OTLP_ENDPOINT.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What an OpenTelemetry Collector ([`xtask::collector::Collector`]) is given to
    /// forward traces and metrics to this receiver.
    pub fn forward(&self) -> xtask::collector::Forward {
        match self.transport {
            Transport::Http => xtask::collector::Forward::Http(self.endpoint()),
            Transport::Grpc => xtask::collector::Forward::Grpc(self.endpoint()),
        }
    }

    pub fn protocol(&self) -> &'static str {
        match self.transport {
            Transport::Http => "http/protobuf",
            Transport::Grpc => "grpc",
        }
    }

    fn serve(&mut self, listener: TcpListener) -> Result<()> {
        self.running = Some(match self.transport {
            Transport::Http => {
                let stop = Arc::new(AtomicBool::new(false));
                let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
                listener.set_nonblocking(true)?;
                let (s, c, shared) = (stop.clone(), conns.clone(), self.shared.clone());
                let accept = std::thread::spawn(move || {
                    while !s.load(Ordering::Acquire) {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                let _ = stream.set_nonblocking(false);
                                // As real collectors do: without it, a reply split in two
                                // writes waits for the client's delayed ACK (40 ms).
                                let _ = stream.set_nodelay(true);
                                if let Ok(clone) = stream.try_clone()
                                    && let Ok(mut list) = c.lock()
                                {
                                    list.push(clone);
                                }
                                let shared = shared.clone();
                                std::thread::spawn(move || {
                                    let _ = http_connection(stream, &shared);
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                });
                Running::Http { stop, accept, conns }
            }
            Transport::Grpc => {
                let rt = self.rt.as_ref().context("runtime")?;
                let _g = rt.enter();
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let svc = TraceServiceServer::new(Grpc { shared: self.shared.clone() });
                let metrics_svc = MetricsServiceServer::new(Grpc { shared: self.shared.clone() });
                let task = rt.spawn(async move {
                    let incoming = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        |s: std::io::Result<tokio::net::TcpStream>| {
                            s.inspect(|s| {
                                let _ = s.set_nodelay(true);
                            })
                        },
                    );
                    let _ = tonic::transport::Server::builder()
                        .add_service(svc)
                        .add_service(metrics_svc)
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        })
                        .await;
                });
                Running::Grpc { stop: tx, task }
            }
        });
        Ok(())
    }

    /// Closes the port and every open connection: clients see refused connections.
    pub fn stop(&mut self) {
        match self.running.take() {
            Some(Running::Http { stop, accept, conns }) => {
                stop.store(true, Ordering::Release);
                let _ = accept.join();
                if let Ok(list) = conns.lock() {
                    for c in list.iter() {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
            Some(Running::Grpc { stop, task }) => {
                let _ = stop.send(());
                if let Some(rt) = &self.rt {
                    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
                }
            }
            None => {}
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        if self.running.is_some() {
            bail!("the receiver is running");
        }
        let listener = TcpListener::bind(self.addr).with_context(|| format!("binding {} again", self.addr))?;
        self.serve(listener)
    }

    pub fn span_count(&self) -> u64 {
        self.shared.spans.load(Ordering::Relaxed)
    }

    pub fn bad_requests(&self) -> u64 {
        self.shared.bad.load(Ordering::Relaxed)
    }

    /// Every span received so far, flattened.
    pub fn spans(&self) -> Vec<Received> {
        let reqs = self.shared.requests.lock().map(|r| r.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for req in reqs {
            for rs in req.resource_spans {
                let resource: HashMap<String, AnyValue> = rs
                    .resource
                    .map(|r| r.attributes.into_iter().filter_map(|kv| Some((kv.key, kv.value?))).collect())
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    let scope = ss.scope.map(|s| s.name).unwrap_or_default();
                    for span in ss.spans {
                        out.push(Received { resource: resource.clone(), scope: scope.clone(), span });
                    }
                }
            }
        }
        out
    }

    /// Metric data points received so far (every kind).
    pub fn metric_point_count(&self) -> u64 {
        self.shared.points.load(Ordering::Relaxed)
    }

    /// Every metrics export request received so far, as sent.
    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.metric_requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every metric data point received so far, flattened, in the order received.
    pub fn metric_points(&self) -> Vec<MetricPoint> {
        metrics::points(self.metric_requests())
    }

    /// The data points of the metric named `name` received so far.
    pub fn metric(&self, name: &str) -> Vec<MetricPoint> {
        self.metric_points().into_iter().filter(|p| p.name == name).collect()
    }

    /// Waits until at least `n` metric data points have arrived.
    pub fn wait_metric_points(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.metric_point_count() < n {
            if std::time::Instant::now() > deadline {
                bail!("{} metric data points received, waited for {n}", self.metric_point_count());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until a data point of the metric `name` has arrived; returns that metric's
    /// points.
    pub fn wait_metric(&self, name: &str, timeout: Duration) -> Result<Vec<MetricPoint>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let points = self.metric(name);
            if !points.is_empty() {
                return Ok(points);
            }
            if std::time::Instant::now() > deadline {
                let mut names: Vec<String> = self.metric_points().into_iter().map(|p| p.name).collect();
                names.dedup();
                bail!("no metric {name:?} within {timeout:?}; received: {names:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` spans have arrived.
    pub fn wait_spans(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.span_count() < n {
            if std::time::Instant::now() > deadline {
                bail!("{} spans received, waited for {n}", self.span_count());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

struct Grpc {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.shared.take(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.shared.take_metrics(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// The spans in an encoded `ExportTraceServiceRequest`, from its wire format alone
/// (resource_spans = 1 → scope_spans = 2 → spans = 2); None when it is malformed.
fn count_spans(body: &[u8]) -> Option<u64> {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// Calls `f` with each length-delimited field `want` of a message; skips the rest.
    fn fields(b: &[u8], want: u64, f: &mut dyn FnMut(&[u8]) -> Option<()>) -> Option<()> {
        let mut at = 0;
        while at < b.len() {
            let key = varint(b, &mut at)?;
            match key & 7 {
                0 => drop(varint(b, &mut at)?),
                1 => at += 8,
                5 => at += 4,
                2 => {
                    let len = usize::try_from(varint(b, &mut at)?).ok()?;
                    let field = b.get(at..at.checked_add(len)?)?;
                    at += len;
                    if key >> 3 == want {
                        f(field)?;
                    }
                }
                _ => return None,
            }
        }
        (at == b.len()).then_some(())
    }
    let mut n = 0;
    let mut span = |_: &[u8]| {
        n += 1;
        Some(())
    };
    fields(body, 1, &mut |rs| fields(rs, 2, &mut |ss| fields(ss, 2, &mut span)))?;
    Some(n)
}

/// One keep-alive HTTP/1.1 connection: POSTs of protobuf or JSON bodies.
fn http_connection(stream: TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        let mut json = false;
        let mut gzip = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                match k.as_str() {
                    "content-length" => len = v.parse().unwrap_or(0),
                    "content-type" => json = v.contains("json"),
                    "content-encoding" => gzip = v.contains("gzip"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        if gzip {
            let mut d = Vec::new();
            flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut d)?;
            body = d;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or_default();
        if path.ends_with("/v1/metrics") {
            metrics_reply(&mut out, &body, json, shared)?;
            continue;
        }
        if shared.count_only && !json {
            // Counted on the wire: a full decode costs the bench's shared cores more than
            // a collector on another machine would cost the traced service.
            let (status, reply) = match count_spans(&body) {
                Some(n) => {
                    shared.spans.fetch_add(n, Ordering::Relaxed);
                    ("200 OK", ExportTraceServiceResponse { partial_success: None }.encode_to_vec())
                }
                None => {
                    shared.bad.fetch_add(1, Ordering::Relaxed);
                    ("400 Bad Request", Vec::new())
                }
            };
            let mut msg = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            )
            .into_bytes();
            msg.extend_from_slice(&reply);
            out.write_all(&msg)?;
            out.flush()?;
            continue;
        }
        let decoded = if json {
            serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(anyhow::Error::from)
        } else {
            ExportTraceServiceRequest::decode(&body[..]).map_err(anyhow::Error::from)
        };
        let (status, reply, ctype) = match decoded {
            Ok(req) => {
                shared.take(req);
                let resp = ExportTraceServiceResponse { partial_success: None };
                if json {
                    ("200 OK", b"{}".to_vec(), "application/json")
                } else {
                    ("200 OK", resp.encode_to_vec(), "application/x-protobuf")
                }
            }
            Err(_) => {
                shared.bad.fetch_add(1, Ordering::Relaxed);
                ("400 Bad Request", Vec::new(), "text/plain")
            }
        };
        let mut msg = format!("HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n", reply.len())
            .into_bytes();
        msg.extend_from_slice(&reply);
        out.write_all(&msg)?;
        out.flush()?;
    }
}

/// Decodes and keeps one `/v1/metrics` body, and answers it.
fn metrics_reply(out: &mut TcpStream, body: &[u8], json: bool, shared: &Shared) -> Result<()> {
    let decoded = if json {
        serde_json::from_slice::<ExportMetricsServiceRequest>(body).map_err(anyhow::Error::from)
    } else {
        ExportMetricsServiceRequest::decode(body).map_err(anyhow::Error::from)
    };
    let (status, reply, ctype) = match decoded {
        Ok(req) => {
            shared.take_metrics(req);
            if json {
                ("200 OK", b"{}".to_vec(), "application/json")
            } else {
                let resp = ExportMetricsServiceResponse { partial_success: None };
                ("200 OK", resp.encode_to_vec(), "application/x-protobuf")
            }
        }
        Err(_) => {
            shared.bad.fetch_add(1, Ordering::Relaxed);
            ("400 Bad Request", Vec::new(), "text/plain")
        }
    };
    let mut msg =
        format!("HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n", reply.len()).into_bytes();
    msg.extend_from_slice(&reply);
    out.write_all(&msg)?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    #[test]
    fn spans_are_counted_on_the_wire_as_decoding_counts_them() {
        let span = |n: u8| Span { name: format!("s{n}"), trace_id: vec![n; 16], ..Span::default() };
        let scope = |k: u8| ScopeSpans { spans: (0..k).map(span).collect(), ..ScopeSpans::default() };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans { scope_spans: vec![scope(3), scope(0), scope(5)], ..ResourceSpans::default() },
                ResourceSpans { scope_spans: vec![scope(1)], ..ResourceSpans::default() },
            ],
        };
        let body = req.encode_to_vec();
        assert_eq!(super::count_spans(&body), Some(9));
        assert_eq!(super::count_spans(&[]), Some(0));
        assert_eq!(super::count_spans(&body[..body.len() - 1]), None, "a cut body is malformed");
        assert_eq!(super::count_spans(&[0x0f]), None, "wire type 7 does not exist");
    }
}
