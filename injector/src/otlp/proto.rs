//! OTLP protobuf written directly: spans are encoded by the output thread as they are
//! made, and the export thread only frames them into an `ExportTraceServiceRequest`.
//! This skips the SDK's `SpanData` → proto structs → bytes passes (and their allocations),
//! which cost more CPU than everything else inject does per span.
//!
//! Field numbers are those of opentelemetry-proto's `trace.proto`, `common.proto`,
//! `resource.proto` and `trace_service.proto`; the tests decode what this writes with
//! the official protos.

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;

const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const FIXED32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Bytes of a length-delimited field of `n` bytes with a one-byte key.
fn field_len(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

/// An attribute value, borrowed.
#[derive(Clone, Copy)]
pub enum Attr<'a> {
    Str(&'a str),
    I64(i64),
    F64(f64),
    Bool(bool),
    Array(&'a Array),
}

impl<'a> From<&'a Value> for Attr<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Bool(b) => Attr::Bool(*b),
            Value::I64(i) => Attr::I64(*i),
            Value::F64(f) => Attr::F64(*f),
            Value::String(s) => Attr::Str(s.as_str()),
            Value::Array(a) => Attr::Array(a),
            _ => Attr::Str(""),
        }
    }
}

/// `AnyValue` body length.
fn any_len(v: Attr<'_>) -> usize {
    match v {
        Attr::Str(s) => field_len(s.len()),
        Attr::Bool(_) => 2,
        Attr::I64(i) => 1 + varint_len(i as u64),
        Attr::F64(_) => 9,
        Attr::Array(a) => field_len(array_len(a)),
    }
}

fn array_len(a: &Array) -> usize {
    let item = |v: Attr<'_>| field_len(any_len(v));
    match a {
        Array::Bool(v) => v.iter().map(|b| item(Attr::Bool(*b))).sum(),
        Array::I64(v) => v.iter().map(|i| item(Attr::I64(*i))).sum(),
        Array::F64(v) => v.iter().map(|f| item(Attr::F64(*f))).sum(),
        Array::String(v) => v.iter().map(|s| item(Attr::Str(s.as_str()))).sum(),
        _ => 0,
    }
}

fn write_any(out: &mut Vec<u8>, v: Attr<'_>) {
    match v {
        Attr::Str(s) => bytes_field(out, 1, s.as_bytes()),
        Attr::Bool(b) => {
            key(out, 2, VARINT);
            out.push(u8::from(b));
        }
        Attr::I64(i) => {
            key(out, 3, VARINT);
            varint(out, i as u64);
        }
        Attr::F64(f) => {
            key(out, 4, FIXED64);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Attr::Array(a) => {
            key(out, 5, LEN);
            varint(out, array_len(a) as u64);
            let mut item = |v: Attr<'_>| {
                key(out, 1, LEN);
                varint(out, any_len(v) as u64);
                write_any(out, v);
            };
            match a {
                Array::Bool(v) => v.iter().for_each(|b| item(Attr::Bool(*b))),
                Array::I64(v) => v.iter().for_each(|i| item(Attr::I64(*i))),
                Array::F64(v) => v.iter().for_each(|f| item(Attr::F64(*f))),
                Array::String(v) => v.iter().for_each(|s| item(Attr::Str(s.as_str()))),
                _ => {}
            }
        }
    }
}

/// A `KeyValue` as field `field` of its parent.
fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: Attr<'_>) {
    let any = any_len(v);
    key(out, field, LEN);
    varint(out, (field_len(k.len()) + field_len(any)) as u64);
    bytes_field(out, 1, k.as_bytes());
    key(out, 2, LEN);
    varint(out, any as u64);
    write_any(out, v);
}

/// What a span is made of, borrowed from wherever it was built.
pub struct SpanParts<'a, I> {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    pub parent_remote: bool,
    pub trace_state: &'a str,
    pub name: &'a str,
    pub kind: SpanKind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: I,
    /// None = unset; Some(message) = error.
    pub error: Option<&'a str>,
}

/// A `Span` message body (without its own key and length).
pub fn span<'a, I: Iterator<Item = (&'a str, Attr<'a>)>>(out: &mut Vec<u8>, s: SpanParts<'a, I>) {
    bytes_field(out, 1, &s.trace_id.to_be_bytes());
    bytes_field(out, 2, &s.span_id.to_be_bytes());
    if !s.trace_state.is_empty() {
        bytes_field(out, 3, s.trace_state.as_bytes());
    }
    if let Some(p) = s.parent {
        bytes_field(out, 4, &p.to_be_bytes());
    }
    bytes_field(out, 5, s.name.as_bytes());
    key(out, 6, VARINT);
    out.push(match s.kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    });
    key(out, 7, FIXED64);
    out.extend_from_slice(&s.start_ns.to_le_bytes());
    key(out, 8, FIXED64);
    out.extend_from_slice(&s.end_ns.to_le_bytes());
    for (k, v) in s.attributes {
        key_value(out, 9, k, v);
    }
    // Status: code 2 = error, with its message; unset is an empty message.
    key(out, 15, LEN);
    match s.error {
        None => out.push(0),
        Some(msg) => {
            varint(out, (if msg.is_empty() { 0 } else { field_len(msg.len()) } + 2) as u64);
            if !msg.is_empty() {
                bytes_field(out, 2, msg.as_bytes());
            }
            key(out, 3, VARINT);
            out.push(2);
        }
    }
    // Sampled, and whether the parent is remote is known (and if it is).
    key(out, 16, FIXED32);
    let flags: u32 = 0x01 | 0x100 | if s.parent_remote { 0x200 } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
}

/// A span the SDK way, encoded.
pub fn span_data(out: &mut Vec<u8>, d: &SpanData) {
    let ns = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let parent = (d.parent_span_id != opentelemetry::trace::SpanId::INVALID)
        .then(|| u64::from_be_bytes(d.parent_span_id.to_bytes()));
    let trace_state = d.span_context.trace_state().header();
    span(
        out,
        SpanParts {
            trace_id: u128::from_be_bytes(d.span_context.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(d.span_context.span_id().to_bytes()),
            parent,
            parent_remote: d.parent_span_is_remote,
            trace_state: &trace_state,
            name: &d.name,
            kind: d.span_kind.clone(),
            start_ns: ns(d.start_time),
            end_ns: ns(d.end_time),
            attributes: d.attributes.iter().map(|kv| (kv.key.as_str(), Attr::from(&kv.value))),
            error: match &d.status {
                Status::Error { description } => Some(description),
                _ => None,
            },
        },
    );
    // What only spans the application made have (a second status merges into the first).
    if d.status == Status::Ok {
        bytes_field(out, 15, &[3 << 3, 1]);
    }
    if d.dropped_attributes_count > 0 {
        key(out, 10, VARINT);
        varint(out, u64::from(d.dropped_attributes_count));
    }
    for e in &d.events.events {
        let mut m = Vec::new();
        key(&mut m, 1, FIXED64);
        m.extend_from_slice(&ns(e.timestamp).to_le_bytes());
        bytes_field(&mut m, 2, e.name.as_bytes());
        for kv in &e.attributes {
            key_value(&mut m, 3, kv.key.as_str(), Attr::from(&kv.value));
        }
        bytes_field(out, 11, &m);
    }
    if d.events.dropped_count > 0 {
        key(out, 12, VARINT);
        varint(out, u64::from(d.events.dropped_count));
    }
    for l in &d.links.links {
        let mut m = Vec::new();
        bytes_field(&mut m, 1, &l.span_context.trace_id().to_bytes());
        bytes_field(&mut m, 2, &l.span_context.span_id().to_bytes());
        let state = l.span_context.trace_state().header();
        if !state.is_empty() {
            bytes_field(&mut m, 3, state.as_bytes());
        }
        for kv in &l.attributes {
            key_value(&mut m, 4, kv.key.as_str(), Attr::from(&kv.value));
        }
        bytes_field(out, 13, &m);
    }
    if d.links.dropped_count > 0 {
        key(out, 14, VARINT);
        varint(out, u64::from(d.links.dropped_count));
    }
}

/// A `Resource` message body.
pub fn resource(r: &Resource) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in r.iter() {
        key_value(&mut out, 1, k.as_str(), Attr::from(v));
    }
    out
}

/// An `InstrumentationScope` message body.
pub fn scope(s: &InstrumentationScope) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, s.name().as_bytes());
    if let Some(v) = s.version() {
        bytes_field(&mut out, 2, v.as_bytes());
    }
    out
}

/// An `ExportTraceServiceRequest`: one resource, its spans grouped by scope.
pub fn request(resource: &[u8], groups: &[(&[u8], Vec<Vec<u8>>)]) -> Vec<u8> {
    let scope_spans_len = |(scope, spans): &(&[u8], Vec<Vec<u8>>)| -> usize {
        field_len(scope.len()) + spans.iter().map(|s| field_len(s.len())).sum::<usize>()
    };
    let groups: Vec<_> = groups.iter().filter(|(_, spans)| !spans.is_empty()).collect();
    let rs_len = field_len(resource.len()) + groups.iter().map(|g| field_len(scope_spans_len(g))).sum::<usize>();
    let mut out = Vec::with_capacity(field_len(rs_len));
    key(&mut out, 1, LEN);
    varint(&mut out, rs_len as u64);
    bytes_field(&mut out, 1, resource);
    for g in groups {
        key(&mut out, 2, LEN);
        varint(&mut out, scope_spans_len(g) as u64);
        bytes_field(&mut out, 1, g.0);
        for s in &g.1 {
            bytes_field(&mut out, 2, s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use prost::Message;

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u64::MAX] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    /// What this writes decodes with the official protos to the same span.
    #[test]
    fn decodes_with_the_official_protos() {
        let res = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "svc"),
                KeyValue::new("process.pid", 42),
                KeyValue::new(
                    "process.command_args",
                    Value::Array(Array::String(vec!["a".into(), "b c".into(), "".into()])),
                ),
            ])
            .build();
        let attrs = [
            ("http.request.method", Attr::Str("GET")),
            ("http.response.status_code", Attr::I64(503)),
            ("neg", Attr::I64(-7)),
            ("f", Attr::F64(0.25)),
            ("b", Attr::Bool(true)),
            ("long", Attr::Str(&"x".repeat(300))),
        ];
        let mut body = Vec::new();
        span(
            &mut body,
            SpanParts {
                trace_id: 0x0af7651916cd43dd8448eb211c80319c,
                span_id: 0xb7ad6b7169203331,
                parent: Some(0x1122334455667788),
                parent_remote: true,
                trace_state: "k=v",
                name: "GET /items/{id}",
                kind: SpanKind::Server,
                start_ns: 1_700_000_000_000_000_000,
                end_ns: 1_700_000_000_000_001_000,
                attributes: attrs.iter().map(|(k, v)| (*k, *v)),
                error: Some("boom"),
            },
        );
        let scope_bytes = scope(&InstrumentationScope::builder("inject/net/http").with_version("1.0").build());
        let req = request(&resource(&res), &[(&scope_bytes[..], vec![body.clone(), body]), (&[][..], vec![])]);
        let d = ExportTraceServiceRequest::decode(&req[..]).expect("decodes");
        let rs = &d.resource_spans[0];
        let r = rs.resource.as_ref().unwrap();
        assert_eq!(r.attributes.len(), 3);
        let args = r.attributes.iter().find(|kv| kv.key == "process.command_args").unwrap();
        match args.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::ArrayValue(a)) => assert_eq!(a.values.len(), 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(rs.scope_spans.len(), 1, "empty groups are left out");
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "inject/net/http");
        assert_eq!(ss.scope.as_ref().unwrap().version, "1.0");
        assert_eq!(ss.spans.len(), 2);
        let s = &ss.spans[0];
        assert_eq!(hex(&s.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&s.span_id), "b7ad6b7169203331");
        assert_eq!(hex(&s.parent_span_id), "1122334455667788");
        assert_eq!(s.trace_state, "k=v");
        assert_eq!(s.name, "GET /items/{id}");
        assert_eq!(s.kind, 2);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1000);
        assert_eq!(s.flags, 0x301);
        let st = s.status.as_ref().unwrap();
        assert_eq!((st.code, st.message.as_str()), (2, "boom"));
        let get = |k: &str| s.attributes.iter().find(|kv| kv.key == k).and_then(|kv| kv.value.clone()?.value);
        assert_eq!(get("http.request.method"), Some(any_value::Value::StringValue("GET".into())));
        assert_eq!(get("http.response.status_code"), Some(any_value::Value::IntValue(503)));
        assert_eq!(get("neg"), Some(any_value::Value::IntValue(-7)));
        assert_eq!(get("f"), Some(any_value::Value::DoubleValue(0.25)));
        assert_eq!(get("b"), Some(any_value::Value::BoolValue(true)));
        assert_eq!(get("long"), Some(any_value::Value::StringValue("x".repeat(300))));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
