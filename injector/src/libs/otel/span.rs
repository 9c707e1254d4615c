//! A span the application made with the OpenTelemetry Go API, as the Auto SDK hands it
//! over when it ends: OTLP JSON (`telemetry.Traces`, one span), read here into what every
//! output writes. Bytes from the target: anything malformed is an error, never a panic.

use serde_json::Value as Json;

/// An attribute value as OTLP has them.
#[derive(Debug, Clone, PartialEq)]
pub enum AppValue {
    S(String),
    I(i64),
    F(f64),
    B(bool),
    /// Bytes, arrays and maps, as their JSON text (OTLP's other exporters here carry
    /// only scalars and homogeneous arrays).
    Other(String),
}

impl AppValue {
    /// The console's and JSON lines' form.
    pub fn json(&self) -> Json {
        match self {
            AppValue::S(s) | AppValue::Other(s) => Json::from(s.as_str()),
            AppValue::I(i) => Json::from(*i),
            AppValue::F(f) => Json::from(*f),
            AppValue::B(b) => Json::from(*b),
        }
    }
}

pub type Attrs = Vec<(String, AppValue)>;

/// An event on a span (`span.AddEvent`, `span.RecordError`).
#[derive(Debug, Clone, PartialEq)]
pub struct AppEvent {
    pub time_ns: u64,
    pub name: String,
    pub attrs: Attrs,
}

/// A link to another span.
#[derive(Debug, Clone, PartialEq)]
pub struct AppLink {
    pub trace: u128,
    pub span: u64,
    pub trace_state: String,
    pub attrs: Attrs,
}

/// A span's status: OTLP's code (0 unset, 1 ok, 2 error) and description.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppStatus {
    pub code: i64,
    pub message: String,
}

/// One span the application ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSpan {
    pub trace: u128,
    pub span: u64,
    pub parent: Option<u64>,
    pub trace_state: String,
    pub sampled: bool,
    pub name: String,
    /// OTLP's: 1 internal, 2 server, 3 client, 4 producer, 5 consumer (0 unspecified).
    pub kind: i64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: Attrs,
    pub dropped_attrs: u32,
    pub events: Vec<AppEvent>,
    pub dropped_events: u32,
    pub links: Vec<AppLink>,
    pub dropped_links: u32,
    pub status: AppStatus,
    /// The instrumentation scope: the tracer's name and version, and its schema URL.
    pub scope: (String, String, String),
}

impl AppSpan {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            2 => "SERVER",
            3 => "CLIENT",
            4 => "PRODUCER",
            5 => "CONSUMER",
            _ => "INTERNAL",
        }
    }

    /// The error description a failed span shows (OTLP's status message, or the
    /// exception an event recorded).
    pub fn error(&self) -> Option<String> {
        if self.status.code != 2 {
            return None;
        }
        if !self.status.message.is_empty() {
            return Some(self.status.message.clone());
        }
        let exception = self.events.iter().find(|e| e.name == "exception")?;
        exception.attrs.iter().find(|(k, _)| k == "exception.message").map(|(_, v)| match v {
            AppValue::S(s) | AppValue::Other(s) => s.clone(),
            other => other.json().to_string(),
        })
    }
}

/// Why a span's JSON was not taken.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpanError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("no span in it")]
    Empty,
    #[error("a span without ids (its start was not recorded)")]
    NoIds,
    #[error("field {0} is malformed")]
    Field(&'static str),
}

/// The spans in one `(*span).ended` buffer (the Auto SDK sends one).
pub fn decode(json: &[u8]) -> Result<Vec<AppSpan>, SpanError> {
    let v: Json = serde_json::from_slice(json).map_err(|e| SpanError::Json(e.to_string()))?;
    let mut out = Vec::new();
    for rs in arr(&v, "resourceSpans") {
        for ss in arr(rs, "scopeSpans") {
            let scope = &ss["scope"];
            let scope = (str_of(scope, "name"), str_of(scope, "version"), str_of(ss, "schemaUrl"));
            for s in arr(ss, "spans") {
                out.push(one(s, &scope)?);
            }
        }
    }
    if out.is_empty() {
        return Err(SpanError::Empty);
    }
    Ok(out)
}

fn one(s: &Json, scope: &(String, String, String)) -> Result<AppSpan, SpanError> {
    let trace = id(s, "traceId", 32)?.filter(|t| *t != 0).ok_or(SpanError::NoIds)?;
    let span = id(s, "spanId", 16)?.filter(|t| *t != 0).ok_or(SpanError::NoIds)? as u64;
    let parent = id(s, "parentSpanId", 16)?.map(|p| p as u64).filter(|p| *p != 0);
    let status = &s["status"];
    Ok(AppSpan {
        trace,
        span,
        parent,
        trace_state: str_of(s, "traceState"),
        sampled: num(s, "flags").is_none_or(|f| f & 1 == 1),
        name: str_of(s, "name"),
        kind: num(s, "kind").unwrap_or(1),
        start_ns: num(s, "startTimeUnixNano").unwrap_or(0) as u64,
        end_ns: num(s, "endTimeUnixNano").unwrap_or(0) as u64,
        attrs: attrs(s),
        dropped_attrs: count(s, "droppedAttributesCount"),
        events: arr(s, "events")
            .map(|e| AppEvent {
                time_ns: num(e, "timeUnixNano").unwrap_or(0) as u64,
                name: str_of(e, "name"),
                attrs: attrs(e),
            })
            .collect(),
        dropped_events: count(s, "droppedEventsCount"),
        links: arr(s, "links")
            .filter_map(|l| {
                Some(AppLink {
                    trace: id(l, "traceId", 32).ok()??,
                    span: id(l, "spanId", 16).ok()?? as u64,
                    trace_state: str_of(l, "traceState"),
                    attrs: attrs(l),
                })
            })
            .collect(),
        dropped_links: count(s, "droppedLinksCount"),
        status: AppStatus { code: num(status, "code").unwrap_or(0), message: str_of(status, "message") },
        scope: scope.clone(),
    })
}

fn arr<'a>(v: &'a Json, key: &str) -> impl Iterator<Item = &'a Json> {
    v.get(key).and_then(Json::as_array).into_iter().flatten()
}

fn str_of(v: &Json, key: &str) -> String {
    v.get(key).and_then(Json::as_str).unwrap_or_default().to_string()
}

/// A number, written as one or (64-bit integers in OTLP JSON) as a decimal string.
fn num(v: &Json, key: &str) -> Option<i64> {
    match v.get(key)? {
        Json::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|u| u as i64)),
        Json::String(s) => s.parse::<i64>().ok().or_else(|| s.parse::<u64>().ok().map(|u| u as i64)),
        _ => None,
    }
}

fn count(v: &Json, key: &str) -> u32 {
    num(v, key).and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// A hex id of `digits` digits; None when absent or empty.
fn id(v: &Json, key: &'static str, digits: usize) -> Result<Option<u128>, SpanError> {
    let Some(s) = v.get(key).and_then(Json::as_str).filter(|s| !s.is_empty()) else { return Ok(None) };
    if s.len() != digits {
        return Err(SpanError::Field(key));
    }
    u128::from_str_radix(s, 16).map(Some).map_err(|_| SpanError::Field(key))
}

fn attrs(v: &Json) -> Attrs {
    arr(v, "attributes").filter_map(|a| Some((a.get("key")?.as_str()?.to_string(), value(a.get("value")?)))).collect()
}

fn value(v: &Json) -> AppValue {
    if let Some(s) = v.get("stringValue").and_then(Json::as_str) {
        return AppValue::S(s.to_string());
    }
    if let Some(i) = num(v, "intValue") {
        return AppValue::I(i);
    }
    if let Some(f) = v.get("doubleValue").and_then(Json::as_f64) {
        return AppValue::F(f);
    }
    if let Some(b) = v.get("boolValue").and_then(Json::as_bool) {
        return AppValue::B(b);
    }
    AppValue::Other(v.as_object().and_then(|o| o.values().next()).map_or_else(String::new, Json::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"{"resourceSpans":[{"resource":{},"scopeSpans":[{"scope":{"name":"shop","version":"1.2"},
        "schemaUrl":"https://opentelemetry.io/schemas/1.26.0","spans":[{"traceId":"0af7651916cd43dd8448eb211c80319c",
        "spanId":"b7ad6b7169203331","parentSpanId":"00f067aa0ba902b7","flags":1,"name":"price","kind":1,
        "startTimeUnixNano":1733600000000000000,"endTimeUnixNano":1733600000000500000,
        "attributes":[{"key":"sku","value":{"stringValue":"a1"}},{"key":"qty","value":{"intValue":"3"}},
        {"key":"ok","value":{"boolValue":true}},{"key":"f","value":{"doubleValue":1.5}},
        {"key":"l","value":{"arrayValue":{"values":[{"stringValue":"x"}]}}}],
        "events":[{"timeUnixNano":1733600000000100000,"name":"exception","attributes":[{"key":"exception.message","value":{"stringValue":"out of stock"}}]}],
        "status":{"code":2}}]}]}]}"#;

    #[test]
    fn reads_what_the_auto_sdk_writes() {
        let s = decode(ONE.as_bytes()).unwrap();
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert_eq!(s.trace, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(s.span, 0xb7ad6b7169203331);
        assert_eq!(s.parent, Some(0x00f067aa0ba902b7));
        assert_eq!((s.name.as_str(), s.kind_name(), s.end_ns - s.start_ns), ("price", "INTERNAL", 500_000));
        assert_eq!(s.attrs[1], ("qty".to_string(), AppValue::I(3)));
        assert_eq!(s.attrs[2].1, AppValue::B(true));
        assert_eq!(s.attrs[3].1, AppValue::F(1.5));
        assert_eq!(s.attrs[4].1, AppValue::Other(r#"{"values":[{"stringValue":"x"}]}"#.into()));
        assert_eq!(s.scope, ("shop".into(), "1.2".into(), "https://opentelemetry.io/schemas/1.26.0".into()));
        assert_eq!(s.error().as_deref(), Some("out of stock"));
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        assert!(matches!(
            decode(b"{\"resourceSpans\":[{\"scopeSpans\":[{\"spans\":[{\"name\":\"x\"}]}]}]}"),
            Err(SpanError::NoIds)
        ));
        assert_eq!(decode(b"{}"), Err(SpanError::Empty));
        assert!(matches!(decode(&ONE.as_bytes()[..200]), Err(SpanError::Json(_))));
        let bad = ONE.replace("b7ad6b7169203331", "b7ad6b71692033zz");
        assert_eq!(decode(bad.as_bytes()), Err(SpanError::Field("spanId")));
    }
}
