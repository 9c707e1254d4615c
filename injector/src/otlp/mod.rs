//! OTLP export: finished calls become spans with the ids, parents and times the collector
//! gave them, and go out in batches: HTTP/protobuf (the default) encoded here with the
//! OpenTelemetry protos, HTTP/JSON and gRPC through opentelemetry-otlp. The queue is bounded and the sender never waits: a slow or dead endpoint
//! costs queued spans, then counted drops, never a stalled collector or target.

// Without the transports, what only they read is left unread.
#![cfg_attr(not(feature = "otlp"), allow(dead_code, unused_imports))]

pub mod config;
pub mod proto;
pub mod span;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
#[cfg(feature = "otlp")]
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
#[cfg(feature = "otlp")]
use opentelemetry_sdk::trace::SpanExporter;

pub use config::{OtelArgs, OtelConfig, Protocol};

/// Counters shared by the sending side and the export thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub sampled_out: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub exported: AtomicU64,
    pub dropped_export_failed: AtomicU64,
    pub failed_requests: AtomicU64,
    pub requests: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
    /// The sending side is gone: send what is queued, within the shutdown window.
    pub closed: std::sync::atomic::AtomicBool,
    /// Spans in the queue.
    pub held: AtomicU64,
    /// The export thread has ended: nobody will make room in the queue.
    pub exporter_gone: std::sync::atomic::AtomicBool,
}

/// Sets `exporter_gone` when the export thread ends, however it ends.
struct GoneOnDrop(Arc<Stats>);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.exporter_gone.store(true, Ordering::Release);
    }
}

/// What the exit summary shows about export.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportTotals {
    pub endpoint: String,
    pub protocol: String,
    /// Spans the endpoint acknowledged.
    pub exported: u64,
    pub sampled_out: u64,
    /// Dropped because the queue was full (the endpoint was slow or down too long).
    pub dropped_queue_full: u64,
    /// Dropped after their batch kept failing, or still queued when time ran out at exit.
    pub dropped_export_failed: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub last_error: Option<String>,
}

impl ExportTotals {
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_export_failed
    }
}

/// A queued span: built the SDK's way, or already encoded (for OTLP/HTTP protobuf).
pub enum Queued {
    Span(Box<SpanData>),
    /// A `Span` message body, and its scope: 0 for user functions, 1 + the index in
    /// [`crate::libs::LIBRARIES`] for a library's spans.
    Encoded {
        scope: usize,
        bytes: Vec<u8>,
    },
}

/// The sending half, owned by the output thread.
pub struct SpanSender {
    tx: Sender<Queued>,
    stats: Arc<Stats>,
    capacity: u64,
    /// The exporter takes encoded spans: encode them here, as they are made.
    encode: bool,
    /// Lossless mode: a full queue makes the output thread wait for room (while the
    /// exporter lives) rather than drop the span.
    wait: bool,
}

impl SpanSender {
    /// Whether spans should be given encoded ([`SpanSender::send_encoded`]).
    pub fn encodes(&self) -> bool {
        self.encode
    }

    /// Queues a span, or counts it dropped when the queue is full; never blocks.
    pub fn send(&self, span: SpanData) {
        // A scope of the application's own goes as it is: the exporter groups by it.
        if self.encode
            && let Some(scope) = span::known_scope(span.instrumentation_scope.name())
        {
            let mut bytes = Vec::with_capacity(256);
            proto::span_data(&mut bytes, &span);
            return self.queue(Queued::Encoded { scope, bytes });
        }
        self.queue(Queued::Span(Box::new(span)));
    }

    /// Queues an encoded span (see [`proto::span`]).
    pub fn send_encoded(&self, scope: usize, bytes: Vec<u8>) {
        self.queue(Queued::Encoded { scope, bytes });
    }

    /// Waits for room in a full queue from now on (lossless mode).
    pub fn wait_when_full(&mut self) {
        self.wait = true;
    }

    fn queue(&self, span: Queued) {
        while self.wait
            && self.stats.held.load(Ordering::Acquire) >= self.capacity
            && !self.stats.exporter_gone.load(Ordering::Acquire)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The bound is a count, not a preallocated array: 65536 SpanData slots would
        // cost ~10 ms to set up, which a launched program waits for.
        if self.stats.held.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.stats.held.fetch_sub(1, Ordering::AcqRel);
            self.stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(span).is_err() {
            self.stats.held.fetch_sub(1, Ordering::AcqRel);
            self.stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn sampled_out(&self) {
        self.stats.sampled_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for SpanSender {
    fn drop(&mut self) {
        self.stats.closed.store(true, Ordering::Release);
    }
}

/// The export thread, joined at exit.
pub struct Exporting {
    thread: std::thread::JoinHandle<()>,
    stats: Arc<Stats>,
    endpoint: String,
    protocol: Protocol,
}

impl Exporting {
    /// Waits for the export thread: it sends what is queued until the channel is empty
    /// or its shutdown time runs out (the rest is counted dropped).
    pub fn finish(self) -> ExportTotals {
        let _ = self.thread.join();
        let s = &self.stats;
        ExportTotals {
            endpoint: self.endpoint,
            protocol: protocol_name(self.protocol).into(),
            exported: s.exported.load(Ordering::Relaxed),
            sampled_out: s.sampled_out.load(Ordering::Relaxed),
            dropped_queue_full: s.dropped_queue_full.load(Ordering::Relaxed),
            dropped_export_failed: s.dropped_export_failed.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            failed_requests: s.failed_requests.load(Ordering::Relaxed),
            last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Grpc => "grpc",
        Protocol::HttpProtobuf => "http/protobuf",
        Protocol::HttpJson => "http/json",
    }
}

#[cfg(feature = "otlp")]
enum Client {
    /// OTLP/HTTP with protobuf, encoded here: the default, and the cheapest per span.
    Proto(ProtoHttp),
    Http(opentelemetry_otlp::SpanExporter),
    /// tonic needs a tokio runtime to build in and to run on.
    Grpc(opentelemetry_otlp::SpanExporter, tokio::runtime::Runtime),
}

#[cfg(feature = "otlp")]
impl Client {
    fn build(config: &OtelConfig, resource: &Resource) -> Result<Client> {
        use opentelemetry_otlp::{Compression, RetryPolicy};
        // Retries are ours: the exporter's own would block this thread for seconds.
        let mut client = match config.protocol {
            Protocol::HttpProtobuf => return ProtoHttp::build(config, resource).map(Client::Proto),
            Protocol::HttpJson => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(config.endpoint.clone())
                    .with_protocol(match config.protocol {
                        Protocol::HttpJson => opentelemetry_otlp::Protocol::HttpJson,
                        _ => opentelemetry_otlp::Protocol::HttpBinary,
                    })
                    .with_timeout(config.timeout)
                    .with_headers(config.headers.iter().cloned().collect())
                    .with_http_client(tls::http(config.timeout, &config.tls)?)
                    .with_retry_policy(RetryPolicy::disabled());
                if config.gzip {
                    b = b.with_compression(Compression::Gzip);
                }
                Client::Http(b.build().context("building the OTLP/HTTP exporter")?)
            }
            Protocol::Grpc => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-grpc")
                    .enable_all()
                    .build()
                    .context("starting the gRPC runtime")?;
                let exporter = {
                    let _guard = rt.enter();
                    let mut md = tonic::metadata::MetadataMap::new();
                    for (k, v) in &config.headers {
                        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                            .map_err(|_| anyhow!("{k:?} is not a valid gRPC metadata key"))?;
                        md.insert(key, v.parse().map_err(|_| anyhow!("{v:?} is not a valid gRPC metadata value"))?);
                    }
                    let mut b = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(config.endpoint.clone())
                        .with_timeout(config.timeout)
                        .with_metadata(md)
                        .with_retry_policy(RetryPolicy::disabled());
                    if config.endpoint.starts_with("https://") {
                        b = b.with_tls_config(tls::grpc(&config.tls));
                    }
                    if config.gzip {
                        b = b.with_compression(Compression::Gzip);
                    }
                    b.build().context("building the OTLP/gRPC exporter")?
                };
                Client::Grpc(exporter, rt)
            }
        };
        match &mut client {
            Client::Http(e) | Client::Grpc(e, _) => e.set_resource(resource),
            Client::Proto(_) => {}
        }
        Ok(client)
    }

    fn export(&self, batch: Vec<SpanData>) -> Result<(), String> {
        let r = match self {
            Client::Proto(p) => {
                return p.send(&p.encode(batch.into_iter().map(|s| Queued::Span(Box::new(s))).collect()));
            }
            Client::Http(e) => futures_executor::block_on(e.export(batch)),
            Client::Grpc(e, rt) => rt.block_on(e.export(batch)),
        };
        r.map_err(|e| e.to_string())
    }
}

/// Built without the `otlp` feature: no transport, so no client can be made.
#[cfg(not(feature = "otlp"))]
enum Client {}

#[cfg(not(feature = "otlp"))]
impl Client {
    fn build(_config: &OtelConfig, _resource: &Resource) -> Result<Client> {
        anyhow::bail!(
            "this inject was built without OTLP export (cargo feature `otlp`): \
             give --output console or json, or build it with default features"
        )
    }

    fn export(&self, _batch: Vec<SpanData>) -> Result<(), String> {
        match *self {}
    }
}

/// OTLP/HTTP with protobuf bodies: `ExportTraceServiceRequest`s encoded with prost from
/// the batch (spans moved into it, not cloned), POSTed with a blocking client.
#[cfg(feature = "otlp")]
struct ProtoHttp {
    client: reqwest::blocking::Client,
    url: String,
    headers: Vec<(String, String)>,
    gzip: bool,
    /// The resource and the scopes (user functions', then each library's), encoded once.
    resource: Vec<u8>,
    scopes: Vec<Vec<u8>>,
}

#[cfg(feature = "otlp")]
impl ProtoHttp {
    fn build(config: &OtelConfig, resource: &Resource) -> Result<ProtoHttp> {
        let client = tls::http(config.timeout, &config.tls)?;
        Ok(ProtoHttp {
            client,
            url: config.endpoint.clone(),
            headers: config.headers.to_vec(),
            gzip: config.gzip,
            resource: proto::resource(resource),
            scopes: span::scopes().iter().map(proto::scope).collect(),
        })
    }

    fn encode(&self, batch: Vec<Queued>) -> Vec<u8> {
        let mut by_scope: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.scopes.len()];
        // Scopes of the application's own spans, encoded, and their spans.
        let (mut other, mut other_spans): (Vec<Vec<u8>>, Vec<Vec<Vec<u8>>>) = (Vec::new(), Vec::new());
        for q in batch {
            let (scope, bytes) = match q {
                Queued::Encoded { scope, bytes } => (scope, bytes),
                Queued::Span(s) => {
                    let mut b = Vec::new();
                    proto::span_data(&mut b, &s);
                    let Some(known) = span::known_scope(s.instrumentation_scope.name()) else {
                        let scope = proto::scope(&s.instrumentation_scope);
                        match other.iter().position(|k| *k == scope) {
                            Some(i) => other_spans[i].push(b),
                            None => {
                                other.push(scope);
                                other_spans.push(vec![b]);
                            }
                        }
                        continue;
                    };
                    (known, b)
                }
            };
            if let Some(v) = by_scope.get_mut(scope) {
                v.push(bytes);
            }
        }
        let groups: Vec<(&[u8], Vec<Vec<u8>>)> = self
            .scopes
            .iter()
            .map(Vec::as_slice)
            .zip(by_scope)
            .chain(other.iter().map(Vec::as_slice).zip(other_spans))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let body = proto::request(&self.resource, &groups);
        if !self.gzip {
            return body;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
        use std::io::Write;
        match gz.write_all(&body).and_then(|()| gz.finish()) {
            Ok(z) => z,
            Err(_) => body,
        }
    }

    fn send(&self, body: &[u8]) -> Result<(), String> {
        let mut req = self.client.post(&self.url).header("Content-Type", "application/x-protobuf").body(body.to_vec());
        if self.gzip && body.starts_with(&[0x1f, 0x8b]) {
            req = req.header("Content-Encoding", "gzip");
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().map_err(|e| format!("{}: {}", self.url, tls::chain(&e)))?;
        let status = resp.status();
        // Read the reply so the connection is reused.
        let _ = resp.bytes();
        if status.is_success() { Ok(()) } else { Err(format!("{}: HTTP {status}", self.url)) }
    }
}

/// The queue's receiving end: every span taken out makes room for another.
struct SpanRx {
    rx: Receiver<Queued>,
    stats: Arc<Stats>,
}

impl SpanRx {
    fn took<E>(&self, r: Result<Queued, E>) -> Result<Queued, E> {
        if r.is_ok() {
            self.stats.held.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }
    fn recv(&self) -> Result<Queued, crossbeam_channel::RecvError> {
        self.took(self.rx.recv())
    }
    fn recv_deadline(&self, t: Instant) -> Result<Queued, RecvTimeoutError> {
        self.took(self.rx.recv_deadline(t))
    }
    fn try_recv(&self) -> Result<Queued, crossbeam_channel::TryRecvError> {
        self.took(self.rx.try_recv())
    }
    /// Empties the queue, returning how many spans it held.
    fn discard(&self) -> u64 {
        let n = self.rx.try_iter().count() as u64;
        self.stats.held.fetch_sub(n, Ordering::AcqRel);
        n
    }
}

/// A batch that has failed this long is given up (its spans counted dropped), so a
/// batch the endpoint rejects for good cannot stop everything behind it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short, so spans flow again soon after an endpoint comes back.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Starts the export thread. With `wait`, the exporter is built before this returns (a
/// build error is ours to report); without, a launched program need not wait for the
/// HTTP client's start-up, and a build error is reported by the thread, which then counts
/// every span as dropped.
pub fn start(config: &OtelConfig, resource: Resource, wait: bool) -> Result<(SpanSender, Exporting)> {
    let stats = Arc::new(Stats::default());
    let (tx, rx) = crossbeam_channel::unbounded::<Queued>();
    let rx = SpanRx { rx, stats: stats.clone() };
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<()>>(1);
    let thread = {
        let (config, stats) = (config.clone(), stats.clone());
        std::thread::Builder::new().name("otlp-export".into()).spawn(move || {
            let _gone = GoneOnDrop(stats.clone());
            // Not waited for: build the client when the first batch is due, so its threads
            // do not compete with the starting program.
            let mut first = Vec::new();
            if !wait && let Ok(s) = rx.recv() {
                first.push(s);
                let due = Instant::now() + config.delay;
                while first.len() < config.batch
                    && let Ok(s) = rx.recv_deadline(due)
                {
                    first.push(s);
                }
            }
            let client = match Client::build(&config, &resource) {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    if !wait {
                        eprintln!("inject: error: {e:#}; no spans will be exported");
                    }
                    let _ = ready_tx.send(Err(e));
                    stats.dropped_export_failed.fetch_add(first.len() as u64, Ordering::Relaxed);
                    while rx.recv().is_ok() {
                        stats.dropped_export_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            };
            export_loop(&client, &rx, first, &config, &stats);
        })?
    };
    if wait {
        ready_rx.recv().context("the OTLP export thread stopped")??;
    }
    let encode = config.protocol == Protocol::HttpProtobuf;
    let sender = SpanSender { tx, stats: stats.clone(), capacity: config.queue as u64, encode, wait: false };
    Ok((sender, Exporting { thread, stats, endpoint: config.endpoint.clone(), protocol: config.protocol }))
}

fn export_loop(client: &Client, rx: &SpanRx, first: Vec<Queued>, config: &OtelConfig, stats: &Stats) {
    // At exit, queued spans get this long to go out (a container runtime's stop grace is
    // typically 10 s, and the program's own shutdown came first).
    let shutdown_window = config.timeout.clamp(Duration::from_secs(1), Duration::from_secs(5));
    /// How long the batch filler naps between looks at the queue.
    const FILL_NAP: Duration = Duration::from_millis(5);
    let mut closing: Option<Instant> = None;
    let mut batch = first;
    batch.reserve(config.batch);
    let mut failing_since: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    // A request body that failed, and how many spans it holds: sent again as is.
    let mut pending: Option<(Vec<u8>, u64)> = None;
    loop {
        if closing.is_none() && stats.closed.load(Ordering::Acquire) {
            closing = Some(Instant::now());
        }
        // Fill a batch: until it is full, or `delay` after its first span.
        if batch.is_empty() && pending.is_none() && closing.is_none() {
            match rx.recv() {
                Ok(s) => batch.push(s),
                Err(_) => closing = Some(Instant::now()),
            }
        }
        let fill_until = Instant::now() + if closing.is_some() { Duration::ZERO } else { config.delay };
        while pending.is_none() && batch.len() < config.batch {
            // Take what is queued, then nap rather than wait on each span: a blocked
            // receiver is woken by every send, which at tens of thousands of spans a
            // second cost more than building them.
            match rx.try_recv() {
                Ok(s) => {
                    batch.push(s);
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Empty) if closing.is_none() => {
                    let left = fill_until.saturating_duration_since(Instant::now());
                    if !left.is_zero() && !stats.closed.load(Ordering::Acquire) {
                        std::thread::sleep(left.min(FILL_NAP));
                        continue;
                    }
                }
                Err(_) => {}
            }
            match rx.recv_deadline(fill_until) {
                Ok(s) => batch.push(s),
                Err(RecvTimeoutError::Timeout) => {
                    // Closing: take what is already queued without waiting.
                    if closing.is_none() {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    closing.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        if batch.is_empty() && pending.is_none() {
            if closing.is_some() {
                return;
            }
            continue;
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let (result, n) = match client {
            // Encoded once, from the spans themselves (moved, not copied); a retry
            // resends the same bytes.
            #[cfg(feature = "otlp")]
            Client::Proto(p) => {
                let (body, n) = pending.get_or_insert_with(|| {
                    let n = batch.len() as u64;
                    (p.encode(std::mem::take(&mut batch)), n)
                });
                (p.send(body), *n)
            }
            #[allow(unreachable_patterns)]
            _ => {
                let spans: Vec<SpanData> = batch
                    .iter()
                    .filter_map(|q| if let Queued::Span(s) = q { Some(SpanData::clone(s)) } else { None })
                    .collect();
                (client.export(spans), batch.len() as u64)
            }
        };
        match result {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
                batch.clear();
                pending = None;
                if let Some(since) = failing_since.take() {
                    eprintln!(
                        "inject: OTLP export to {} works again after {:.1} s",
                        config.endpoint,
                        since.elapsed().as_secs_f64()
                    );
                }
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                if failing_since.is_none() {
                    eprintln!(
                        "inject: warning: OTLP export to {} failed: {e}; retrying (up to {} spans are held meanwhile)",
                        config.endpoint, config.queue
                    );
                }
                if let Ok(mut last) = stats.last_error.lock() {
                    *last = Some(e);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                // At exit, an endpoint that was already failing a second before gets this
                // one more try, not the whole window: the user waits on us.
                let out_of_time =
                    closing.is_some_and(|t| t.elapsed() >= shutdown_window || since + Duration::from_secs(1) < t);
                if since.elapsed() >= GIVE_UP_AFTER || out_of_time {
                    stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                    batch.clear();
                    pending = None;
                }
                if out_of_time {
                    // Whatever is still queued will not go out either.
                    let rest = rx.discard();
                    stats.dropped_export_failed.fetch_add(rest, Ordering::Relaxed);
                    return;
                }
                // Jitter spreads retries of many injectors sharing one collector.
                let jitter = Duration::from_nanos(crate::spans::rdtsc() % (backoff.as_nanos() as u64 / 4 + 1));
                let mut pause = backoff + jitter;
                if let Some(t) = closing {
                    pause = pause.min(shutdown_window.saturating_sub(t.elapsed()));
                }
                std::thread::sleep(pause);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
