//! Metrics over OTLP: the store's series as an `ExportMetricsServiceRequest` (histograms
//! with explicit bounds, the chosen temporality, the resource of the spans), sent over
//! HTTP (protobuf or JSON) or gRPC, with the same TLS as spans.

use anyhow::{Context, Result, bail};

use super::{Hist, INSTRUMENTS, Series, Value};
use crate::otlp::{OtelConfig, Protocol};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics, metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

fn kv(k: &str, v: &Value) -> KeyValue {
    let value = match v {
        Value::S(s) => any_value::Value::StringValue(s.clone()),
        Value::I(i) => any_value::Value::IntValue(*i),
        Value::B(b) => any_value::Value::BoolValue(*b),
    };
    KeyValue { key: k.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// The OTLP request for a snapshot of the store.
fn request(
    resource: &[(String, Value)],
    series: &[(Series, Hist)],
    start: u64,
    end: u64,
    delta: bool,
) -> ExportMetricsServiceRequest {
    let temporality = if delta { AggregationTemporality::Delta } else { AggregationTemporality::Cumulative } as i32;
    let mut metrics: Vec<Metric> = Vec::new();
    for ((i, attrs), h) in series {
        let inst = &INSTRUMENTS[*i];
        let point = HistogramDataPoint {
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            start_time_unix_nano: start,
            time_unix_nano: end,
            count: h.count,
            sum: Some(h.sum),
            bucket_counts: h.buckets.clone(),
            explicit_bounds: inst.bounds.to_vec(),
            min: Some(h.min),
            max: Some(h.max),
            ..Default::default()
        };
        match metrics.last_mut() {
            Some(m) if m.name == inst.name => {
                if let Some(metric::Data::Histogram(hh)) = &mut m.data {
                    hh.data_points.push(point);
                }
            }
            _ => metrics.push(Metric {
                name: inst.name.into(),
                description: inst.description.into(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: vec![point],
                    aggregation_temporality: temporality,
                })),
                ..Default::default()
            }),
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, v)).collect(),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "inject".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

type GrpcClient = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient<
    tonic::transport::Channel,
>;

/// A connection to one OTLP endpoint, made at its first export.
pub enum Client {
    Http(reqwest::blocking::Client),
    Grpc(Box<(GrpcClient, tokio::runtime::Runtime)>),
}

fn connect(c: &OtelConfig) -> Result<Client> {
    match c.protocol {
        Protocol::HttpProtobuf | Protocol::HttpJson => Ok(Client::Http(crate::otlp::tls::http(c.timeout, &c.tls)?)),
        Protocol::Grpc => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let mut ep = tonic::transport::Endpoint::from_shared(c.endpoint.clone())
                .with_context(|| format!("{} is not a gRPC endpoint", c.endpoint))?
                .timeout(c.timeout);
            if c.endpoint.starts_with("https://") {
                ep = ep.tls_config(crate::otlp::tls::grpc(&c.tls)).context("TLS for the metrics endpoint")?;
            }
            // A lazy channel still needs the runtime's reactor to be made in.
            let channel = {
                let _in = rt.enter();
                ep.connect_lazy()
            };
            Ok(Client::Grpc(Box::new((GrpcClient::new(channel), rt))))
        }
    }
}

/// Exports a snapshot (`times`: its start and end, ns, and whether it is a delta).
pub fn send(
    client: &mut Option<Client>,
    c: &OtelConfig,
    resource: &[(String, Value)],
    series: &[(Series, Hist)],
    (start, end, delta): (u64, u64, bool),
    last: bool,
) -> Result<(), String> {
    let req = request(resource, series, start, end, delta);
    // At exit the user waits on us: one short try, not the whole export timeout.
    let timeout = if last { c.timeout.min(std::time::Duration::from_secs(2)) } else { c.timeout };
    if client.is_none() {
        *client = Some(connect(c).map_err(|e| format!("{}: {e:#}", c.endpoint))?);
    }
    let Some(client) = client else { return Err("no client".into()) };
    let r: Result<()> = match client {
        Client::Http(h) => (|| {
            let (body, ty) = match c.protocol {
                Protocol::HttpJson => (serde_json::to_vec(&req)?, "application/json"),
                _ => (prost::Message::encode_to_vec(&req), "application/x-protobuf"),
            };
            let mut rq = h.post(&c.endpoint).header("Content-Type", ty).body(body).timeout(timeout);
            for (k, v) in &c.headers {
                rq = rq.header(k.as_str(), v.as_str());
            }
            let resp = rq.send().map_err(|e| anyhow::anyhow!(crate::otlp::tls::chain(&e)))?;
            let status = resp.status();
            let _ = resp.bytes();
            if !status.is_success() {
                bail!("HTTP {status}");
            }
            Ok(())
        })(),
        Client::Grpc(grpc) => {
            let (g, rt) = &mut **grpc;
            let mut rq = tonic::Request::new(req);
            rq.set_timeout(timeout);
            for (k, v) in &c.headers {
                if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
                    rq.metadata_mut().insert(k, v);
                }
            }
            rt.block_on(g.export(rq)).map(|_| ()).map_err(|e| anyhow::anyhow!(crate::otlp::tls::chain(&e)))
        }
    };
    r.map_err(|e| format!("{}: {e:#}", c.endpoint))
}
