//! The metrics exporters, configured the OpenTelemetry way: `OTEL_METRICS_EXPORTER`
//! (`otlp`, `prometheus`, `console`, `none`, or a comma-separated list; `--metrics`),
//! `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000), and
//! `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` (`cumulative`, the default, `delta`
//! or `lowmemory`, which is delta for histograms). OTLP metrics go where spans go unless
//! the `..._METRICS_...` variables say otherwise (endpoint with `/v1/metrics`, protocol,
//! headers, timeout, TLS). A thread exports every interval and once more at the end; the
//! Prometheus exporter serves the same store on a scrape endpoint.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use crossbeam_channel::{RecvTimeoutError, Sender};

use super::{Hist, INSTRUMENTS, Metrics, Series, Value};
use crate::otlp::config::{ConfigError, Env, non_empty, process_env};
use crate::otlp::{OtelArgs, OtelConfig};

/// The session's metrics, when they are on: the output thread records into it.
static ACTIVE: OnceLock<Metrics> = OnceLock::new();

/// The session's metrics, if any exporter wants them.
pub fn active() -> Option<&'static Metrics> {
    ACTIVE.get()
}

/// Where metrics go.
#[derive(Debug, Clone)]
pub enum Exporter {
    Otlp(Box<OtelConfig>),
    Console,
    /// host:port of the scrape endpoint.
    Prometheus(String),
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub exporters: Vec<Exporter>,
    pub interval: Duration,
    /// Delta temporality (else cumulative).
    pub delta: bool,
    pub functions: bool,
}

impl MetricsConfig {
    /// None when no exporter is asked for. `spans_to_otlp`: the default is `otlp` when
    /// spans go to OTLP, else none (metrics printed between console spans would be noise).
    pub fn resolve(args: &OtelArgs, env: Env<'_>, spans_to_otlp: bool) -> Result<Option<MetricsConfig>, ConfigError> {
        let chosen = match &args.metrics {
            Some(v) => Some(("--metrics".to_string(), v.clone())),
            None => non_empty(env, "OTEL_METRICS_EXPORTER"),
        };
        let names: Vec<(String, String)> = match chosen {
            Some((src, list)) => list.split(',').map(|n| (src.clone(), n.trim().to_ascii_lowercase())).collect(),
            None if spans_to_otlp => vec![("default".into(), "otlp".into())],
            None => Vec::new(),
        };
        let mut exporters = Vec::new();
        for (src, name) in names {
            exporters.push(match name.as_str() {
                "none" => continue,
                "otlp" => Exporter::Otlp(Box::new(OtelConfig::resolve_signal(args, env, "METRICS")?)),
                "console" => Exporter::Console,
                "prometheus" => {
                    let host = non_empty(env, "OTEL_EXPORTER_PROMETHEUS_HOST").map_or("localhost".into(), |v| v.1);
                    let port = match non_empty(env, "OTEL_EXPORTER_PROMETHEUS_PORT") {
                        None => 9464,
                        Some((s, p)) => {
                            p.parse::<u16>().map_err(|_| ConfigError::Number { source_name: s, value: p.clone() })?
                        }
                    };
                    Exporter::Prometheus(format!("{host}:{port}"))
                }
                _ => return Err(ConfigError::MetricsExporter { source_name: src, value: name }),
            });
        }
        if exporters.is_empty() && !args.func_metrics {
            return Ok(None);
        }
        let interval = match non_empty(env, "OTEL_METRIC_EXPORT_INTERVAL") {
            None => Duration::from_secs(60),
            Some((s, v)) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => return Err(ConfigError::Number { source_name: s, value: v }),
            },
        };
        let prometheus = exporters.iter().any(|e| matches!(e, Exporter::Prometheus(_)));
        let delta = match non_empty(env, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") {
            None => false,
            Some((s, v)) => match v.to_ascii_lowercase().as_str() {
                "cumulative" => false,
                "delta" | "lowmemory" if prometheus => {
                    return Err(ConfigError::Temporality { source_name: s, value: v });
                }
                "delta" | "lowmemory" => true,
                _ => return Err(ConfigError::Temporality { source_name: s, value: v }),
            },
        };
        Ok(Some(MetricsConfig { exporters, interval, delta, functions: args.func_metrics }))
    }
}

/// What the exit summary says of the metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetricsTotals {
    /// Calls counted into the histograms.
    pub recorded: u64,
    /// Export requests made and failed (all exporters).
    pub exports: u64,
    pub failed_exports: u64,
    pub last_error: Option<String>,
    /// The scrape endpoint, when Prometheus serves them.
    pub prometheus: Option<String>,
}

/// The export thread (and the scrape server), until [`Running::finish`].
pub struct Running {
    stop: Sender<()>,
    thread: std::thread::JoinHandle<MetricsTotals>,
    metrics: Metrics,
}

impl Running {
    /// Exports the last interval and reports.
    pub fn finish(self) -> MetricsTotals {
        let _ = self.stop.send(());
        let mut t = self.thread.join().unwrap_or_else(|_| MetricsTotals {
            last_error: Some("the metrics thread panicked".into()),
            failed_exports: 1,
            ..MetricsTotals::default()
        });
        t.recorded = self.metrics.store.lock().map_or(0, |s| s.recorded);
        t
    }
}

/// Starts the exporters the configuration asks for; None when metrics are off.
pub fn start(
    args: &OtelArgs,
    spans_to_otlp: bool,
    resource: impl Fn() -> opentelemetry_sdk::Resource,
) -> Result<Option<Running>> {
    let Some(cfg) = MetricsConfig::resolve(args, &process_env, spans_to_otlp)? else { return Ok(None) };
    let metrics = ACTIVE.get_or_init(|| Metrics::new(cfg.functions)).clone();
    let mut totals = MetricsTotals::default();
    for e in &cfg.exporters {
        if let Exporter::Prometheus(addr) = e {
            let bound = super::prom::serve(addr, metrics.clone())?;
            eprintln!("inject: metrics for Prometheus at http://{bound}/metrics");
            totals.prometheus = Some(bound);
        }
    }
    let pushed: Vec<Exporter> =
        cfg.exporters.iter().filter(|e| !matches!(e, Exporter::Prometheus(_))).cloned().collect();
    let resource = resource_attrs(&resource());
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let m = metrics.clone();
    let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let mut clients: Vec<Option<super::otlp::Client>> = pushed.iter().map(|_| None).collect();
        let mut start = now_ns();
        loop {
            let last = !matches!(rx.recv_timeout(cfg.interval), Err(RecvTimeoutError::Timeout));
            let series = m.store.lock().map(|mut s| s.take(cfg.delta)).unwrap_or_default();
            let end = now_ns();
            for (i, e) in pushed.iter().enumerate() {
                if series.is_empty() && !last {
                    continue;
                }
                let r = match e {
                    Exporter::Console => {
                        console(&series);
                        Ok(())
                    }
                    Exporter::Otlp(c) => {
                        super::otlp::send(&mut clients[i], c, &resource, &series, (start, end, cfg.delta), last)
                    }
                    Exporter::Prometheus(_) => Ok(()),
                };
                totals.exports += 1;
                if let Err(err) = r {
                    if totals.failed_exports == 0 {
                        eprintln!("inject: warning: metrics export failed: {err}");
                    }
                    totals.failed_exports += 1;
                    totals.last_error = Some(err);
                }
            }
            if cfg.delta {
                start = end;
            }
            if last {
                return totals;
            }
        }
    })?;
    Ok(Some(Running { stop: tx, thread, metrics }))
}

/// The resource's attributes as metric attribute values.
fn resource_attrs(r: &opentelemetry_sdk::Resource) -> Vec<(String, Value)> {
    r.iter()
        .map(|(k, v)| {
            let v = match v {
                opentelemetry::Value::Bool(b) => Value::B(*b),
                opentelemetry::Value::I64(i) => Value::I(*i),
                other => Value::S(other.to_string()),
            };
            (k.to_string(), v)
        })
        .collect()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One line per series on standard error.
fn console(series: &[(Series, Hist)]) {
    for ((i, attrs), h) in series {
        let a: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={}", v.text())).collect();
        eprintln!(
            "inject: metric {} {{{}}} count={} sum={:.6}s min={:.6}s max={:.6}s",
            INSTRUMENTS[*i].name,
            a.join(" "),
            h.count,
            h.sum,
            h.min,
            h.max
        );
    }
}
