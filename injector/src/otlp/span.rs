//! Calls to OpenTelemetry spans, and the resource that describes the traced process.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::config::OtelConfig;
use crate::spans::{Call, Clock, SiteMeta};
use crate::values::Shown;

/// What we know of the traced process, for its resource.
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub pid: i32,
    pub exe_path: String,
    pub command_args: Vec<String>,
    /// e.g. "go1.26.8".
    pub go_version: String,
    /// The main module's version from build info, when it has a real one.
    pub main_version: Option<String>,
}

impl Process {
    pub fn of_pid(pid: i32, exe_path: &std::path::Path, build: &go_abi::buildinfo::BuildInfo) -> Process {
        let command_args = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let main_version = build.main.as_ref().map(|m| m.version.clone()).filter(|v| !v.is_empty() && v != "(devel)");
        Process {
            pid,
            exe_path: exe_path.display().to_string(),
            command_args,
            go_version: build.go_version.clone(),
            main_version,
        }
    }
}

fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

/// Detected attributes first; what the user configured wins over them.
pub fn resource(config: &OtelConfig, process: &Process) -> Resource {
    let exe_name = std::path::Path::new(&process.exe_path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| process.exe_path.clone());
    let mut attrs = vec![
        KeyValue::new("process.pid", i64::from(process.pid)),
        KeyValue::new("process.executable.name", exe_name.clone()),
        KeyValue::new("process.executable.path", process.exe_path.clone()),
        KeyValue::new(
            "process.command_args",
            Value::Array(Array::String(process.command_args.iter().cloned().map(StringValue::from).collect())),
        ),
        KeyValue::new("process.runtime.name", "go"),
        KeyValue::new("process.runtime.version", process.go_version.clone()),
        KeyValue::new("process.runtime.description", format!("go version {} linux/amd64", process.go_version)),
        KeyValue::new("host.name", host_name()),
        KeyValue::new("host.arch", "amd64"),
        KeyValue::new("os.type", "linux"),
        KeyValue::new("telemetry.sdk.name", "opentelemetry"),
        KeyValue::new("telemetry.sdk.language", "rust"),
        KeyValue::new("telemetry.sdk.version", "0.33.1"),
        KeyValue::new("telemetry.distro.name", "inject"),
        KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ];
    if let Some(v) = &process.main_version {
        attrs.push(KeyValue::new("service.version", v.clone()));
    }
    for (k, v) in &config.resource {
        attrs.retain(|a| a.key.as_str() != k);
        attrs.push(KeyValue::new(k.clone(), v.clone()));
    }
    // OTEL_SERVICE_NAME (or the flag) > service.name in the attributes > the executable.
    let service =
        config.service_name.clone().or_else(|| config.resource.get("service.name").cloned()).unwrap_or(exe_name);
    attrs.retain(|a| a.key.as_str() != "service.name");
    Resource::builder_empty().with_attributes(attrs).with_service_name(service).build()
}

/// The scope for spans of functions the user named.
pub fn func_scope() -> InstrumentationScope {
    InstrumentationScope::builder("inject/func").with_version(env!("CARGO_PKG_VERSION")).build()
}

/// Every scope spans are sent under: user functions', then each library's, in the order
/// of [`crate::libs::LIBRARIES`].
pub fn scopes() -> Vec<InstrumentationScope> {
    std::iter::once(func_scope())
        .chain(
            crate::libs::LIBRARIES
                .iter()
                .map(|l| InstrumentationScope::builder(l.scope()).with_version(env!("CARGO_PKG_VERSION")).build()),
        )
        .collect()
}

/// The index in [`scopes`] of the scope named `name`, if it is inject's.
pub fn known_scope(name: &str) -> Option<usize> {
    if name == func_scope().name() {
        return Some(0);
    }
    crate::libs::LIBRARIES.iter().position(|l| l.scope() == name).map(|i| i + 1)
}

/// A span the application made (its OpenTelemetry API), under its own scope.
pub fn app_span(s: &crate::libs::otel::AppSpan) -> SpanData {
    use crate::libs::otel::span::{AppValue, Attrs};
    let kvs = |a: &Attrs| -> Vec<KeyValue> {
        a.iter()
            .map(|(k, v)| {
                let v = match v {
                    AppValue::S(s) | AppValue::Other(s) => Value::String(s.clone().into()),
                    AppValue::I(i) => Value::I64(*i),
                    AppValue::F(f) => Value::F64(*f),
                    AppValue::B(b) => Value::Bool(*b),
                };
                KeyValue::new(k.clone(), v)
            })
            .collect()
    };
    let at = |ns: u64| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
    let state = |t: &str| t.parse::<TraceState>().unwrap_or(TraceState::NONE);
    let flags = if s.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let kind = match s.kind {
        2 => SpanKind::Server,
        3 => SpanKind::Client,
        4 => SpanKind::Producer,
        5 => SpanKind::Consumer,
        _ => SpanKind::Internal,
    };
    let status = match s.status.code {
        1 => Status::Ok,
        2 => Status::error(s.error().unwrap_or_default()),
        _ => Status::Unset,
    };
    let (name, version, schema) = &s.scope;
    let mut scope = InstrumentationScope::builder(name.clone());
    if !version.is_empty() {
        scope = scope.with_version(version.clone());
    }
    if !schema.is_empty() {
        scope = scope.with_schema_url(schema.clone());
    }
    let mut events = SpanEvents::default();
    events.events = s
        .events
        .iter()
        .map(|e| opentelemetry::trace::Event::new(e.name.clone(), at(e.time_ns), kvs(&e.attrs), 0))
        .collect();
    events.dropped_count = s.dropped_events;
    let mut links = SpanLinks::default();
    links.links = s
        .links
        .iter()
        .map(|l| {
            let cx = SpanContext::new(
                TraceId::from(l.trace),
                SpanId::from(l.span),
                TraceFlags::SAMPLED,
                false,
                state(&l.trace_state),
            );
            opentelemetry::trace::Link::new(cx, kvs(&l.attrs), 0)
        })
        .collect();
    links.dropped_count = s.dropped_links;
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(s.trace),
            SpanId::from(s.span),
            flags,
            false,
            state(&s.trace_state),
        ),
        parent_span_id: s.parent.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: false,
        span_kind: kind,
        name: Cow::Owned(s.name.clone()),
        start_time: at(s.start_ns),
        end_time: at(s.end_ns),
        attributes: kvs(&s.attrs),
        dropped_attributes_count: s.dropped_attrs,
        events,
        links,
        status,
        instrumentation_scope: scope.build(),
    }
}

/// The span of a library's probe.
pub fn lib_span(call: &Call, d: crate::libs::Described, clock: &Clock, scope: &InstrumentationScope) -> SpanData {
    use crate::libs::{Attr, SpanKind as K};
    let mut attributes: Vec<KeyValue> = d
        .attrs
        .into_iter()
        .map(|(k, v)| match v {
            Attr::S(s) => KeyValue::new(k, s),
            Attr::I(i) => KeyValue::new(k, i),
        })
        .collect();
    attributes.push(KeyValue::new("go.goroutine.id", call.goid as i64));
    let trace_state = call
        .notes
        .as_ref()
        .and_then(|n| n.trace_state.as_deref())
        .and_then(|t| t.parse::<TraceState>().ok())
        .unwrap_or(TraceState::NONE);
    let kind = match d.kind {
        K::Server => SpanKind::Server,
        K::Client => SpanKind::Client,
        K::Producer => SpanKind::Producer,
        K::Consumer => SpanKind::Consumer,
    };
    let status = d.error.map_or(Status::Unset, Status::error);
    span_data(call, clock, (d.name, kind, trace_state), attributes, status, scope)
}

/// A `SpanData` with the call's ids, parent and times.
fn span_data(
    call: &Call,
    clock: &Clock,
    (name, kind, trace_state): (String, SpanKind, TraceState),
    attributes: Vec<KeyValue>,
    status: Status,
    scope: &InstrumentationScope,
) -> SpanData {
    let (start_ns, dur_ns) = call.times(clock);
    let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(start_ns as u64);
    let end = start + Duration::from_nanos(dur_ns.unwrap_or(0.0).round() as u64);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(call.trace_id),
            SpanId::from(call.span_id),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: call.parent.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: call.remote_parent,
        span_kind: kind,
        name: Cow::Owned(name),
        start_time: start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

fn attr_value(s: &Shown) -> Value {
    match &s.json {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) if n.is_i64() => Value::I64(n.as_i64().unwrap_or_default()),
        serde_json::Value::Number(n) if n.is_f64() => Value::F64(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(v) => Value::String(v.clone().into()),
        // A byte slice copied whole and valid UTF-8: its text, as a string's (not quoted).
        serde_json::Value::Object(o) => match (o.get("value").and_then(|v| v.as_str()), o.get("len")) {
            (Some(v), Some(len)) if o.get("hex").is_none() && len.as_u64() == Some(v.len() as u64) => {
                Value::String(v.to_string().into())
            }
            _ => Value::String(s.text.clone().into()),
        },
        _ => Value::String(s.text.clone().into()),
    }
}

/// A call's error status: its last non-nil `error` result, as the span's description.
pub fn returned_error(meta: &SiteMeta, results: &[Shown]) -> Option<String> {
    results
        .iter()
        .zip(&meta.ret.values)
        .rev()
        .find(|(r, spec)| spec.type_name == "error" && r.text != "nil")
        .map(|(r, _)| format!("returned error {}", r.text))
}

/// Builds the span of one call. `args`/`results` are the formatted values.
pub fn call_span(
    call: &Call,
    meta: &SiteMeta,
    clock: &Clock,
    args: &[Shown],
    results: &[Shown],
    stack: Option<String>,
    scope: &InstrumentationScope,
) -> SpanData {
    let mut attributes = Vec::with_capacity(5 + args.len() + results.len());
    attributes.push(KeyValue::new("code.function.name", meta.name.clone()));
    if let Some((file, line)) = &meta.code {
        attributes.push(KeyValue::new("code.file.path", file.clone()));
        attributes.push(KeyValue::new("code.line.number", i64::from(*line)));
    }
    attributes.push(KeyValue::new("go.goroutine.id", call.goid as i64));
    if let Some(s) = stack {
        attributes.push(KeyValue::new("code.stacktrace", s));
    }
    for a in args {
        attributes.push(KeyValue::new(format!("go.arg.{}", a.name), attr_value(a)));
    }
    for r in results {
        attributes.push(KeyValue::new(format!("go.result.{}", r.name), attr_value(r)));
    }
    let status = returned_error(meta, results).map_or(Status::Unset, Status::error);
    if call.ret.is_none() {
        attributes.push(KeyValue::new("inject.entry_only", true));
    }
    span_data(call, clock, (meta.name.clone(), SpanKind::Internal, TraceState::NONE), attributes, status, scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str, json: serde_json::Value) -> Shown {
        Shown { name: "b".into(), text: text.into(), json }
    }

    /// A whole UTF-8 byte slice is a plain string attribute, as a string is; a cut or
    /// non-UTF-8 one keeps its quoted text, which says so.
    #[test]
    fn byte_slices_become_plain_strings_when_exact() {
        let whole = shown("\"hello-bytes\"", serde_json::json!({"value": "hello-bytes", "len": 11}));
        assert_eq!(attr_value(&whole), Value::String("hello-bytes".into()));
        let cut = shown("\"hello\"...", serde_json::json!({"value": "hello", "len": 11}));
        assert_eq!(attr_value(&cut), Value::String("\"hello\"...".into()));
        let binary = shown("\"\\xff\"", serde_json::json!({"value": "\u{fffd}", "len": 1, "hex": "ff"}));
        assert_eq!(attr_value(&binary), Value::String("\"\\xff\"".into()));
        // Other objects (an interface's type and data, an error's message) keep their text.
        let iface = shown("*http.response(0x1)", serde_json::json!({"type": "*http.response", "data": "0x1"}));
        assert_eq!(attr_value(&iface), Value::String("*http.response(0x1)".into()));
        let err = shown(
            "*errors.errorString(\"boom\")",
            serde_json::json!({"type": "*errors.errorString", "message": "boom"}),
        );
        assert_eq!(attr_value(&err), Value::String("*errors.errorString(\"boom\")".into()));
    }
}
