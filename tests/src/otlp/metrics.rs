//! The metrics side of the OTLP receiver: the export requests it kept, flattened into one
//! [`MetricPoint`] per data point with its metric, scope and resource, in the shape tests
//! assert on (name, kind, temporality, attributes, value or count/sum/buckets).

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric, number_data_point};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Gauge,
    Sum,
    Histogram,
    ExponentialHistogram,
    Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    /// Gauges and summaries have none.
    Unspecified,
    Delta,
    Cumulative,
}

impl Temporality {
    fn from_proto(v: i32) -> Temporality {
        match AggregationTemporality::try_from(v) {
            Ok(AggregationTemporality::Delta) => Temporality::Delta,
            Ok(AggregationTemporality::Cumulative) => Temporality::Cumulative,
            _ => Temporality::Unspecified,
        }
    }
}

/// One received data point with the metric, scope and resource it came with.
#[derive(Debug, Clone)]
pub struct MetricPoint {
    pub resource: HashMap<String, AnyValue>,
    pub scope: String,
    pub scope_version: String,
    pub name: String,
    pub description: String,
    pub unit: String,
    pub kind: MetricKind,
    pub temporality: Temporality,
    /// Sums only.
    pub monotonic: bool,
    pub attributes: Vec<KeyValue>,
    pub start_time_unix_nano: u64,
    pub time_unix_nano: u64,
    /// Gauges and sums: the value (an integer one converted).
    pub value: Option<f64>,
    /// Gauges and sums recorded as integers.
    pub int_value: Option<i64>,
    /// Histograms (both kinds) and summaries.
    pub count: Option<u64>,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Explicit-bucket histograms: one count per bucket, one more than `explicit_bounds`;
    /// exponential histograms: the positive buckets (bounds empty).
    pub bucket_counts: Vec<u64>,
    pub explicit_bounds: Vec<f64>,
}

impl MetricPoint {
    pub fn attr(&self, key: &str) -> Option<&AnyValue> {
        super::attr(&self.attributes, key)
    }
    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attr(key).and_then(super::as_string)
    }
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        match self.attr(key)?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }
    pub fn resource_str(&self, key: &str) -> Option<String> {
        self.resource.get(key).and_then(super::as_string)
    }
}

/// The data points of an export request.
pub fn count_points(req: &ExportMetricsServiceRequest) -> usize {
    let metrics = req.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics);
    metrics
        .map(|m| match &m.data {
            Some(metric::Data::Gauge(g)) => g.data_points.len(),
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            Some(metric::Data::Histogram(h)) => h.data_points.len(),
            Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(metric::Data::Summary(s)) => s.data_points.len(),
            None => 0,
        })
        .sum()
}

/// Every data point of `reqs`, in the order received.
pub fn points(reqs: Vec<ExportMetricsServiceRequest>) -> Vec<MetricPoint> {
    let mut out = Vec::new();
    for rm in reqs.into_iter().flat_map(|r| r.resource_metrics) {
        let resource: HashMap<String, AnyValue> = rm
            .resource
            .map(|r| r.attributes.into_iter().filter_map(|kv| Some((kv.key, kv.value?))).collect())
            .unwrap_or_default();
        for sm in rm.scope_metrics {
            let (scope, scope_version) = sm.scope.map(|s| (s.name, s.version)).unwrap_or_default();
            for m in sm.metrics {
                let base = |kind, temporality, attributes, start, time| MetricPoint {
                    resource: resource.clone(),
                    scope: scope.clone(),
                    scope_version: scope_version.clone(),
                    name: m.name.clone(),
                    description: m.description.clone(),
                    unit: m.unit.clone(),
                    kind,
                    temporality,
                    monotonic: false,
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: time,
                    value: None,
                    int_value: None,
                    count: None,
                    sum: None,
                    min: None,
                    max: None,
                    bucket_counts: Vec::new(),
                    explicit_bounds: Vec::new(),
                };
                let number = |p: MetricPoint, v: Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsDouble(d)) => MetricPoint { value: Some(d), ..p },
                    Some(number_data_point::Value::AsInt(i)) => {
                        MetricPoint { value: Some(i as f64), int_value: Some(i), ..p }
                    }
                    None => p,
                };
                match &m.data {
                    Some(metric::Data::Gauge(g)) => out.extend(g.data_points.iter().map(|d| {
                        let p = base(
                            MetricKind::Gauge,
                            Temporality::Unspecified,
                            d.attributes.clone(),
                            d.start_time_unix_nano,
                            d.time_unix_nano,
                        );
                        number(p, d.value)
                    })),
                    Some(metric::Data::Sum(s)) => out.extend(s.data_points.iter().map(|d| {
                        let t = Temporality::from_proto(s.aggregation_temporality);
                        let p =
                            base(MetricKind::Sum, t, d.attributes.clone(), d.start_time_unix_nano, d.time_unix_nano);
                        number(MetricPoint { monotonic: s.is_monotonic, ..p }, d.value)
                    })),
                    Some(metric::Data::Histogram(h)) => out.extend(h.data_points.iter().map(|d| {
                        let t = Temporality::from_proto(h.aggregation_temporality);
                        let p = base(
                            MetricKind::Histogram,
                            t,
                            d.attributes.clone(),
                            d.start_time_unix_nano,
                            d.time_unix_nano,
                        );
                        MetricPoint {
                            count: Some(d.count),
                            sum: d.sum,
                            min: d.min,
                            max: d.max,
                            bucket_counts: d.bucket_counts.clone(),
                            explicit_bounds: d.explicit_bounds.clone(),
                            ..p
                        }
                    })),
                    Some(metric::Data::ExponentialHistogram(h)) => out.extend(h.data_points.iter().map(|d| {
                        let t = Temporality::from_proto(h.aggregation_temporality);
                        let (start, time) = (d.start_time_unix_nano, d.time_unix_nano);
                        let p = base(MetricKind::ExponentialHistogram, t, d.attributes.clone(), start, time);
                        let buckets = d.positive.as_ref().map(|b| b.bucket_counts.clone()).unwrap_or_default();
                        MetricPoint {
                            count: Some(d.count),
                            sum: d.sum,
                            min: d.min,
                            max: d.max,
                            bucket_counts: buckets,
                            ..p
                        }
                    })),
                    Some(metric::Data::Summary(s)) => out.extend(s.data_points.iter().map(|d| {
                        let (start, time) = (d.start_time_unix_nano, d.time_unix_nano);
                        let p = base(MetricKind::Summary, Temporality::Unspecified, d.attributes.clone(), start, time);
                        MetricPoint { count: Some(d.count), sum: Some(d.sum), ..p }
                    })),
                    None => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{
        Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
        number_data_point,
    };

    use super::{MetricKind, Temporality};

    #[test]
    fn every_data_point_becomes_a_point() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
            ..KeyValue::default()
        };
        let hist = HistogramDataPoint {
            attributes: vec![kv("http.route", "/a")],
            count: 3,
            sum: Some(0.6),
            bucket_counts: vec![1, 2, 0],
            explicit_bounds: vec![0.1, 0.5],
            ..HistogramDataPoint::default()
        };
        let sum = |v: i64| NumberDataPoint {
            value: Some(number_data_point::Value::AsInt(v)),
            attributes: vec![kv("k", &v.to_string())],
            ..NumberDataPoint::default()
        };
        let metrics = vec![
            Metric {
                name: "http.server.request.duration".into(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram { data_points: vec![hist], aggregation_temporality: 1 })),
                ..Metric::default()
            },
            Metric {
                name: "calls".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: vec![sum(4), sum(5)],
                    aggregation_temporality: 2,
                    is_monotonic: true,
                })),
                ..Metric::default()
            },
        ];
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                    attributes: vec![kv("service.name", "svc")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics { metrics, ..ScopeMetrics::default() }],
                ..ResourceMetrics::default()
            }],
        };
        assert_eq!(super::count_points(&req), 3);
        let points = super::points(vec![req]);
        assert_eq!(points.len(), 3);
        let h = &points[0];
        assert_eq!(
            (h.kind, h.temporality, h.count, h.sum),
            (MetricKind::Histogram, Temporality::Delta, Some(3), Some(0.6))
        );
        assert_eq!((h.bucket_counts.as_slice(), h.explicit_bounds.as_slice()), (&[1, 2, 0][..], &[0.1, 0.5][..]));
        assert_eq!(h.attr_str("http.route").as_deref(), Some("/a"));
        assert_eq!(h.resource_str("service.name").as_deref(), Some("svc"));
        let s = &points[2];
        assert_eq!((s.kind, s.temporality, s.monotonic), (MetricKind::Sum, Temporality::Cumulative, true));
        assert_eq!((s.int_value, s.value, s.attr_str("k").as_deref()), (Some(5), Some(5.0), Some("5")));
    }
}
