//! RED metrics from every traced call: the stable OpenTelemetry semantic-convention
//! duration histograms (`http.server.request.duration`, `http.client.request.duration`,
//! `rpc.server.call.duration`, `rpc.client.call.duration`, `db.client.operation.duration`,
//! `messaging.client.operation.duration`, `messaging.process.duration`) with their
//! low-cardinality attribute sets and explicit bucket boundaries, and with `--func-metrics`
//! one histogram of the named functions' durations. They are counted where the
//! collector hands calls to the output, before sampling: a sampler keeps some spans, the
//! metrics count every call.

pub mod export;
#[cfg(feature = "otlp")]
mod otlp;
pub mod prom;

/// Without the OTLP transports, an OTLP exporter is refused when it would send.
#[cfg(not(feature = "otlp"))]
mod otlp {
    use super::{Hist, Series, Value};
    use crate::otlp::OtelConfig;

    pub enum Client {}

    pub fn send(
        _: &mut Option<Client>,
        _: &OtelConfig,
        _: &[(String, Value)],
        _: &[(Series, Hist)],
        _: (u64, u64, bool),
        _: bool,
    ) -> Result<(), String> {
        Err("this inject was built without OTLP export (cargo feature `otlp`)".into())
    }
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::libs::{Attr, Described, SpanKind};

/// The semantic conventions' boundaries for request durations (seconds).
const REQUEST_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];
/// `db.client.operation.duration`'s.
const DB_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// A histogram the conventions define: its name, the attributes it keeps, its buckets.
#[derive(Debug)]
pub struct Instrument {
    pub name: &'static str,
    pub description: &'static str,
    pub bounds: &'static [f64],
    pub keys: &'static [&'static str],
}

const ERR: &str = "error.type";

pub static INSTRUMENTS: &[Instrument] = &[
    Instrument {
        name: "http.server.request.duration",
        description: "Duration of HTTP server requests.",
        bounds: REQUEST_BOUNDS,
        keys: &[
            "http.request.method",
            "http.route",
            "http.response.status_code",
            "url.scheme",
            "network.protocol.version",
            ERR,
        ],
    },
    Instrument {
        name: "http.client.request.duration",
        description: "Duration of HTTP client requests.",
        bounds: REQUEST_BOUNDS,
        keys: &[
            "http.request.method",
            "http.response.status_code",
            "server.address",
            "server.port",
            "url.scheme",
            "network.protocol.version",
            ERR,
        ],
    },
    Instrument {
        name: "rpc.server.call.duration",
        description: "Duration of RPCs the server handled.",
        bounds: REQUEST_BOUNDS,
        keys: &["rpc.system.name", "rpc.method", "rpc.response.status_code", ERR],
    },
    Instrument {
        name: "rpc.client.call.duration",
        description: "Duration of RPCs the client made.",
        bounds: REQUEST_BOUNDS,
        keys: &["rpc.system.name", "rpc.method", "rpc.response.status_code", "server.address", "server.port", ERR],
    },
    Instrument {
        name: "db.client.operation.duration",
        description: "Duration of database client operations.",
        bounds: DB_BOUNDS,
        keys: &[
            "db.system.name",
            "db.operation.name",
            "db.collection.name",
            "db.namespace",
            "db.query.summary",
            "db.response.status_code",
            "server.address",
            "server.port",
            ERR,
        ],
    },
    Instrument {
        name: "messaging.client.operation.duration",
        description: "Duration of messaging operations initiated by a producer or consumer client.",
        bounds: REQUEST_BOUNDS,
        keys: &[
            "messaging.system",
            "messaging.operation.name",
            "messaging.operation.type",
            "messaging.destination.name",
            "server.address",
            "server.port",
            ERR,
        ],
    },
    Instrument {
        name: "messaging.process.duration",
        description: "Duration of processing operations.",
        bounds: REQUEST_BOUNDS,
        keys: &[
            "messaging.system",
            "messaging.operation.name",
            "messaging.destination.name",
            "messaging.consumer.group.name",
            "server.address",
            "server.port",
            ERR,
        ],
    },
    Instrument {
        name: "inject.function.duration",
        description: "Duration of calls to the functions --func named (with --func-metrics).",
        bounds: REQUEST_BOUNDS,
        keys: &["code.function.name"],
    },
];

const FUNCTIONS: usize = 7;

/// The instrument a library's span counts in, by its kind and what it describes.
fn instrument_of(d: &Described) -> Option<usize> {
    let has = |k: &str| d.attrs.iter().any(|(n, _)| *n == k);
    let i = match d.kind {
        SpanKind::Server if has("http.request.method") => 0,
        SpanKind::Client if has("http.request.method") => 1,
        SpanKind::Server if has("rpc.system.name") => 2,
        SpanKind::Client if has("rpc.system.name") => 3,
        SpanKind::Client if has("db.system.name") => 4,
        SpanKind::Producer => 5,
        SpanKind::Consumer => 6,
        _ => return None,
    };
    Some(i)
}

/// A value of a series' attribute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    S(String),
    I(i64),
    B(bool),
}

impl Value {
    pub fn text(&self) -> String {
        match self {
            Value::S(s) => s.clone(),
            Value::I(i) => i.to_string(),
            Value::B(b) => b.to_string(),
        }
    }
}

/// One series: the instrument and its attribute values, in the instrument's key order.
pub type Series = (usize, Vec<(&'static str, Value)>);

/// A histogram's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Hist {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// One per boundary, plus the last (above every boundary).
    pub buckets: Vec<u64>,
}

impl Hist {
    fn new(bounds: usize) -> Hist {
        Hist { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, buckets: vec![0; bounds + 1] }
    }

    fn add(&mut self, bounds: &[f64], v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        // Buckets are (previous, bound]: the first bound not below the value.
        let i = bounds.partition_point(|b| *b < v);
        self.buckets[i] += 1;
    }
}

/// Series per instrument before new attribute sets go to the overflow series (the
/// specification's cardinality limit, `otel.metric.overflow=true`).
pub const CARDINALITY: usize = 2000;

/// Every series, shared by the output thread (which records) and the exporters.
#[derive(Debug, Default)]
pub struct Store {
    pub series: HashMap<Series, Hist>,
    per_instrument: [usize; INSTRUMENTS_LEN],
    /// Calls recorded, in all.
    pub recorded: u64,
}

const INSTRUMENTS_LEN: usize = 8;

impl Store {
    fn record(&mut self, instrument: usize, mut attrs: Vec<(&'static str, Value)>, seconds: f64) {
        let inst = &INSTRUMENTS[instrument];
        let mut key = (instrument, std::mem::take(&mut attrs));
        if !self.series.contains_key(&key) {
            if self.per_instrument[instrument] >= CARDINALITY {
                key.1 = vec![("otel.metric.overflow", Value::B(true))];
            } else {
                self.per_instrument[instrument] += 1;
            }
        }
        self.series.entry(key).or_insert_with(|| Hist::new(inst.bounds.len())).add(inst.bounds, seconds);
        self.recorded += 1;
    }

    /// The series as they stand; with `reset` (delta temporality) they start again.
    pub fn take(&mut self, reset: bool) -> Vec<(Series, Hist)> {
        let mut out: Vec<(Series, Hist)> = self.series.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        if reset {
            self.series.clear();
            self.per_instrument = [0; INSTRUMENTS_LEN];
        }
        out
    }
}

/// The recording side: what the output thread holds.
#[derive(Clone)]
pub struct Metrics {
    pub store: Arc<Mutex<Store>>,
    /// Also the named functions' durations (`--func-metrics`).
    pub functions: bool,
}

impl Metrics {
    pub fn new(functions: bool) -> Metrics {
        const { assert!(INSTRUMENTS_LEN == 8 && FUNCTIONS < INSTRUMENTS_LEN) };
        Metrics { store: Arc::default(), functions }
    }

    /// A library span that ended after `seconds` (entry-only spans are not counted).
    pub fn span(&self, d: &Described, seconds: f64) {
        let Some(i) = instrument_of(d) else { return };
        let inst = &INSTRUMENTS[i];
        let mut attrs: Vec<(&'static str, Value)> = Vec::with_capacity(inst.keys.len());
        for key in inst.keys {
            if let Some((k, v)) = d.attrs.iter().find(|(k, _)| k == key) {
                attrs.push((
                    k,
                    match v {
                        Attr::S(s) => Value::S(s.clone()),
                        Attr::I(i) => Value::I(*i),
                    },
                ));
            } else if *key == ERR && d.error.is_some() {
                attrs.push((ERR, Value::S("_OTHER".into())));
            }
        }
        if let Ok(mut s) = self.store.lock() {
            s.record(i, attrs, seconds);
        }
    }

    /// A call of a function `--func` named.
    pub fn function(&self, name: &str, seconds: f64) {
        if !self.functions {
            return;
        }
        if let Ok(mut s) = self.store.lock() {
            s.record(FUNCTIONS, vec![("code.function.name", Value::S(name.to_string()))], seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(kind: SpanKind, attrs: &[(&'static str, Attr)]) -> Described {
        Described { kind, name: "x".into(), attrs: attrs.to_vec(), error: None }
    }

    #[test]
    fn server_spans_count_by_route_and_status_not_path() {
        let m = Metrics::new(false);
        let get = |route: &str, status: i64, path: &str| {
            d(
                SpanKind::Server,
                &[
                    ("http.request.method", Attr::S("GET".into())),
                    ("url.path", Attr::S(path.into())),
                    ("http.route", Attr::S(route.into())),
                    ("http.response.status_code", Attr::I(status)),
                ],
            )
        };
        for (i, v) in [0.001, 0.005, 0.0051, 20.0].iter().enumerate() {
            m.span(&get("/items/{id}", 200, &format!("/items/{i}")), *v);
        }
        m.span(&get("/items/{id}", 404, "/items/x"), 0.2);
        let s = m.store.lock().unwrap().take(true);
        assert_eq!(s.len(), 2, "{s:?}");
        let (series, h) = &s[0];
        assert_eq!(INSTRUMENTS[series.0].name, "http.server.request.duration");
        assert!(!series.1.iter().any(|(k, _)| *k == "url.path"), "{series:?}");
        assert_eq!((h.count, h.buckets[0], h.buckets[1], h.buckets[REQUEST_BOUNDS.len()]), (4, 2, 1, 1));
        assert!((h.sum - 20.0111).abs() < 1e-9 && h.min == 0.001 && h.max == 20.0);
        assert!(m.store.lock().unwrap().take(false).is_empty(), "delta: started again");
    }

    #[test]
    fn new_series_beyond_the_limit_overflow() {
        let m = Metrics::new(true);
        for i in 0..CARDINALITY + 10 {
            m.function(&format!("main.f{i}"), 0.001);
        }
        let s = m.store.lock().unwrap().take(false);
        assert_eq!(s.len(), CARDINALITY + 1);
        let over = s.iter().find(|(k, _)| k.1[0].0 == "otel.metric.overflow").unwrap();
        assert_eq!(over.1.count, 10);
    }
}
