//! Where finished calls go: a live console view for debugging sessions (a tree per trace,
//! or plain lines), JSON lines, or spans over OTLP.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;

use opentelemetry::InstrumentationScope;

use crate::libs::{Attr, LibProbe};
use crate::otlp::SpanSender;
use crate::otlp::config::Sampler;
use crate::spans::{Call, Clock, SiteMeta, call_values};
use crate::tree::{Node, Tree};
use crate::values::TypeNamer;

/// Where a call came from: the function holding its return address, and the file and
/// line of the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub function: String,
    pub file: String,
    pub line: u32,
}

/// Names the caller of a call from its return address (a run-time address).
pub type Callers<'a> = dyn FnMut(u64) -> Option<Caller> + 'a;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Each trace as an indented tree once its root returns: children under their parents
    /// in start order, with their `+offset` from the root's start. A call with no parent
    /// prints at once; a child that ends after its tree was printed, as a late line naming
    /// its parent; spans whose root runs on, without it after 1 s with nothing new (or
    /// 5 s), saying so.
    Console,
    /// One line per call the moment it returns (children above their parents), indented
    /// by stack depth: nothing is held back.
    Lines,
    /// One JSON object per finished call (span), for files and tools.
    Jsonl,
    /// Spans to an OpenTelemetry endpoint (the default when one is configured).
    Otlp,
    /// Nothing (counts only, in the exit summary).
    None,
}

pub enum Sink {
    Text {
        format: Format,
        out: Box<dyn Write + Send>,
        /// The console's spans waiting for their root.
        tree: Box<Tree>,
    },
    Otlp {
        spans: SpanSender,
        sampler: Sampler,
        /// [`crate::otlp::span::scopes`]: user functions', then each library's.
        scopes: Vec<InstrumentationScope>,
    },
    None,
}

/// A console node: the call's place in its trace, its times and its text.
fn node(
    call: &Call,
    (start_ns, dur_ns): (u128, Option<f64>),
    head: String,
    name_len: usize,
    attrs: Option<String>,
) -> Node {
    Node {
        trace_id: call.trace_id,
        span_id: call.span_id,
        parent: call.parent,
        remote_parent: call.remote_parent,
        goid: call.goid,
        depth: call.depth,
        start_ns,
        dur_ns,
        head,
        name_len,
        attrs,
    }
}

/// A console node: printed now (lines), or given to the tree.
fn show(format: Format, out: &mut Box<dyn Write + Send>, tree: &mut Tree, node: Node) -> Result<()> {
    if format == Format::Lines {
        writeln!(out, "{}", node.line())?;
    } else {
        tree.add(node, Instant::now(), out.as_mut())?;
    }
    Ok(())
}

impl Sink {
    /// How the spans the trampolines begin decide their sampled flag: as the exporter's
    /// sampler does (everything is kept for the console and JSON lines).
    pub fn sampling(&self) -> trampolines::codegen::Sampling {
        match self {
            Sink::Otlp { sampler, .. } => sampler.rule(),
            _ => trampolines::codegen::Sampling::default(),
        }
    }

    pub fn text(format: Format, out: Box<dyn Write + Send>) -> Sink {
        Sink::Text { format, out, tree: Box::default() }
    }

    pub fn write(
        &mut self,
        call: &Call,
        sites: &[SiteMeta],
        clock: &Clock,
        types: &mut TypeNamer<'_>,
        callers: &mut Callers<'_>,
    ) -> Result<()> {
        let meta = &sites[call.site as usize];
        if let crate::plan::Role::Lib(probe) = meta.role {
            return self.write_lib(probe, call, clock, types);
        }
        if let (Some(m), Some(end)) = (crate::metrics::export::active(), call.end_tsc()) {
            m.function(&meta.name, clock.ns(end.saturating_sub(call.start_tsc())) / 1e9);
        }
        let (format, out, tree) = match self {
            Sink::None => return Ok(()),
            Sink::Otlp { spans, sampler, scopes } => {
                // Sampling first: an unsampled call costs no formatting.
                if !sampler.sample(call.trace_id, None) {
                    spans.sampled_out();
                    return Ok(());
                }
                let (args, results) = call_values(meta, call, types);
                if !kept(call, clock, &args, &results) {
                    return Ok(());
                }
                let stack = meta.entry.stack.map(|_| {
                    let frames = stack(meta, call, callers);
                    frames
                        .iter()
                        .map(|c| format!("{} ({}:{})", c.function, c.file, c.line))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                spans.send(crate::otlp::span::call_span(call, meta, clock, &args, &results, stack, &scopes[0]));
                return Ok(());
            }
            Sink::Text { format, out, tree } => (*format, out, tree),
        };
        let (start, dur) = call.times(clock);
        let (args, results) = call_values(meta, call, types);
        if !kept(call, clock, &args, &results) {
            return Ok(());
        }
        let caller = meta
            .entry
            .caller
            .and_then(|at| crate::libs::word_at(&call.entry.data, at))
            .filter(|pc| *pc != 0)
            .and_then(&mut *callers);
        let frames = meta.entry.stack.map(|_| stack(meta, call, callers));
        match format {
            Format::Otlp | Format::None => {}
            Format::Console | Format::Lines => {
                let args: Vec<String> = args.iter().map(|a| format!("{}={}", a.name, a.text)).collect();
                let mut head = format!("{}({})", meta.name, args.join(", "));
                match results.len() {
                    0 => {}
                    1 => head.push_str(&format!(" = {}", results[0].text)),
                    _ => {
                        let r: Vec<&str> = results.iter().map(|r| r.text.as_str()).collect();
                        head.push_str(&format!(" = ({})", r.join(", ")));
                    }
                }
                for c in frames.as_deref().unwrap_or(caller.as_slice()) {
                    let file = c.file.rsplit('/').next().unwrap_or(&c.file);
                    head.push_str(&format!(" ← {} ({file}:{})", c.function, c.line));
                }
                show(format, out, tree, node(call, (start, dur), head, meta.name.len(), None))?;
            }
            Format::Jsonl => {
                let obj = |v: &[crate::values::Shown]| -> serde_json::Map<String, serde_json::Value> {
                    v.iter().map(|s| (s.name.clone(), s.json.clone())).collect()
                };
                let mut o = serde_json::json!({
                    "name": meta.name,
                    "trace_id": format!("{:032x}", call.trace_id),
                    "span_id": format!("{:016x}", call.span_id),
                    "parent_span_id": call.parent.map(|p| format!("{p:016x}")),
                    "goroutine": call.goid,
                    "depth": call.depth,
                    "start_time_unix_nano": start as u64,
                    "args": obj(&args),
                    "results": obj(&results),
                    "error": crate::otlp::span::returned_error(meta, &results),
                    "caller": caller.as_ref().map(frame),
                    "stack": frames.as_ref().map(|f| f.iter().map(frame).collect::<Vec<_>>()),
                });
                json_end(&mut o, start, dur);
                if dur.is_none() {
                    o["entry_only"] = serde_json::json!(true);
                }
                serde_json::to_writer(&mut *out, &o)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// Marks calls the target could not record (ring full): a line on the console, a
    /// record in JSON lines. OTLP has the counts in the exit summary.
    pub fn gap(&mut self, by_site: &[(u32, u64)], sites: &[SiteMeta]) -> Result<()> {
        let Sink::Text { format, out, .. } = self else { return Ok(()) };
        let name = |i: u32| sites.get(i as usize).map_or("?", |m| m.name.as_str());
        let total: u64 = by_site.iter().map(|s| s.1).sum();
        match format {
            Format::Console | Format::Lines => {
                let parts: Vec<String> = by_site.iter().map(|&(i, n)| format!("{} {n}", name(i))).collect();
                writeln!(out, "--- {total} records dropped here (ring full): {} ---", parts.join(", "))?;
            }
            Format::Jsonl => {
                let sites: serde_json::Map<String, serde_json::Value> =
                    by_site.iter().map(|&(i, n)| (name(i).to_string(), serde_json::json!(n))).collect();
                serde_json::to_writer(
                    &mut *out,
                    &serde_json::json!({ "dropped": total, "dropped_by_function": sites }),
                )?;
                out.write_all(b"\n")?;
            }
            Format::Otlp | Format::None => {}
        }
        Ok(())
    }

    fn write_lib(&mut self, probe: LibProbe, call: &Call, clock: &Clock, types: &mut TypeNamer<'_>) -> Result<()> {
        if let Some(n) = call.notes.as_deref()
            && !n.app_spans.is_empty()
        {
            return self.write_app(&n.app_spans, call.goid);
        }
        let metrics = crate::metrics::export::active();
        if let (Sink::None, None) = (&*self, metrics) {
            return Ok(());
        }
        // The flag the trampoline sent is the decision; the sampler's own for spans
        // whose ids the collector made. Metrics count every call, sampled or not.
        let sampled = match self {
            Sink::Otlp { sampler, .. } => {
                call.sampled.unwrap_or_else(|| sampler.sample(call.trace_id, call.remote_parent.then_some(true)))
            }
            Sink::None => false,
            Sink::Text { .. } => true,
        };
        if !sampled && metrics.is_none() {
            if let Sink::Otlp { spans, .. } = self {
                spans.sampled_out();
            }
            return Ok(());
        }
        let mut namer = |itab: u64| types(itab, false);
        let Some(d) = crate::libs::library(probe).describe(
            probe.probe,
            &call.entry,
            call.ret.as_ref(),
            call.notes.as_deref(),
            &mut namer,
        ) else {
            return Ok(());
        };
        if let (Some(m), Some(end)) = (metrics, call.end_tsc()) {
            m.span(&d, clock.ns(end.saturating_sub(call.start_tsc())) / 1e9);
        }
        if !sampled {
            if let Sink::Otlp { spans, .. } = self {
                spans.sampled_out();
            }
            return Ok(());
        }
        let (format, out, tree) = match self {
            Sink::None => return Ok(()),
            Sink::Otlp { spans, scopes, .. } => {
                let scope = 1 + usize::from(probe.lib);
                if spans.encodes() {
                    spans.send_encoded(scope, encode_lib(call, &d, clock));
                } else if let Some(s) = scopes.get(scope) {
                    spans.send(crate::otlp::span::lib_span(call, d, clock, s));
                }
                return Ok(());
            }
            Sink::Text { format, out, tree } => (*format, out, tree),
        };
        let (start, dur) = call.times(clock);
        let kind = d.kind.as_str();
        match format {
            Format::Console | Format::Lines => {
                let attrs: Vec<String> = d
                    .attrs
                    .iter()
                    .map(|(k, v)| match v {
                        Attr::S(s) => format!("{k}={s:?}"),
                        Attr::I(i) => format!("{k}={i}"),
                    })
                    .collect();
                let mut attrs = attrs.join(" ");
                // The same words as JSON lines' `error` (a 5xx has no description).
                if let Some(e) = json_error(&d) {
                    attrs.push_str(&format!(" ERROR {e}"));
                }
                let head = format!("{kind} {}", d.name);
                let name_len = head.len();
                show(format, out, tree, node(call, (start, dur), head, name_len, Some(attrs)))?;
            }
            Format::Jsonl => {
                let attributes: serde_json::Map<String, serde_json::Value> = d
                    .attrs
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Attr::S(s) => serde_json::json!(s),
                            Attr::I(i) => serde_json::json!(i),
                        };
                        (k.to_string(), v)
                    })
                    .collect();
                let mut o = serde_json::json!({
                    "name": d.name,
                    "kind": kind,
                    "trace_id": format!("{:032x}", call.trace_id),
                    "span_id": format!("{:016x}", call.span_id),
                    "parent_span_id": call.parent.map(|p| format!("{p:016x}")),
                    "parent_remote": call.remote_parent,
                    "goroutine": call.goid,
                    "start_time_unix_nano": start as u64,
                    "error": json_error(&d),
                    "attributes": attributes,
                });
                json_end(&mut o, start, dur);
                serde_json::to_writer(&mut *out, &o)?;
                out.write_all(b"\n")?;
            }
            Format::Otlp | Format::None => {}
        }
        Ok(())
    }

    /// Spans the application made itself, as it made them (no metrics: the conventions
    /// have none for them).
    fn write_app(&mut self, app: &[crate::libs::otel::AppSpan], goid: u64) -> Result<()> {
        let (format, out, tree) = match self {
            Sink::None => return Ok(()),
            Sink::Otlp { spans, .. } => {
                for s in app {
                    // Unsampled spans never end in the SDK; this is only belt and braces.
                    if s.sampled {
                        spans.send(crate::otlp::span::app_span(s));
                    } else {
                        spans.sampled_out();
                    }
                }
                return Ok(());
            }
            Sink::Text { format, out, tree } => (*format, out, tree),
        };
        for s in app {
            let (start, dur) = (u128::from(s.start_ns), Some(s.end_ns.saturating_sub(s.start_ns) as f64));
            match format {
                Format::Console | Format::Lines => {
                    let mut attrs: Vec<String> = s.attrs.iter().map(|(k, v)| format!("{k}={}", v.json())).collect();
                    if let Some(e) = s.error() {
                        attrs.push(format!("ERROR {e}"));
                    }
                    let head = format!("{} {}", s.kind_name(), s.name);
                    let node = Node {
                        trace_id: s.trace,
                        span_id: s.span,
                        parent: s.parent,
                        remote_parent: false,
                        goid,
                        depth: 0,
                        start_ns: start,
                        dur_ns: dur,
                        name_len: head.len(),
                        head,
                        attrs: Some(attrs.join(" ")),
                    };
                    show(format, out, tree, node)?;
                }
                Format::Jsonl => {
                    let attributes: serde_json::Map<String, serde_json::Value> =
                        s.attrs.iter().map(|(k, v)| (k.clone(), v.json())).collect();
                    let mut o = serde_json::json!({
                        "name": s.name,
                        "kind": s.kind_name(),
                        "trace_id": format!("{:032x}", s.trace),
                        "span_id": format!("{:016x}", s.span),
                        "parent_span_id": s.parent.map(|p| format!("{p:016x}")),
                        "parent_remote": false,
                        "goroutine": goid,
                        "start_time_unix_nano": s.start_ns,
                        "error": s.error(),
                        "attributes": attributes,
                        "scope": {"name": s.scope.0, "version": s.scope.1},
                        "events": s.events.iter().map(|e| serde_json::json!({
                            "name": e.name,
                            "time_unix_nano": e.time_ns,
                            "attributes": e.attrs.iter().map(|(k, v)| (k.clone(), v.json())).collect::<serde_json::Map<_, _>>(),
                        })).collect::<Vec<_>>(),
                    });
                    json_end(&mut o, start, dur);
                    serde_json::to_writer(&mut *out, &o)?;
                    out.write_all(b"\n")?;
                }
                Format::Otlp | Format::None => {}
            }
        }
        Ok(())
    }

    /// Prints the console's spans that have waited too long for their root (called a
    /// few times a second, whether or not calls come).
    pub fn tick(&mut self) -> Result<()> {
        if let Sink::Text { format: Format::Console, out, tree } = self {
            tree.tick(Instant::now(), out.as_mut())?;
        }
        Ok(())
    }

    /// At the end: prints every span still waiting for its root, then flushes.
    pub fn finish(&mut self) -> Result<()> {
        if let Sink::Text { format: Format::Console, out, tree } = self {
            tree.finish(out.as_mut())?;
        }
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Sink::Text { out, .. } = self {
            out.flush()?;
        }
        Ok(())
    }
}

/// Whether `--where` (if given) shows this call.
fn kept(call: &Call, clock: &Clock, args: &[crate::values::Shown], results: &[crate::values::Shown]) -> bool {
    use crate::filter::Val;
    let Some(f) = crate::filter::active() else { return true };
    f.keep(&|name: &str| match name {
        "goroutine" => Some(Val::Num(call.goid as f64)),
        "duration" => call.end_tsc().map(|e| Val::Num(clock.ns(e.saturating_sub(call.start_tsc())))),
        _ => args.iter().chain(results).find(|v| v.name == name).map(|v| Val::Json(&v.json)),
    })
}

/// A frame of a JSON line's `caller` or `stack`.
fn frame(c: &Caller) -> serde_json::Value {
    serde_json::json!({ "function": c.function, "file": c.file, "line": c.line })
}

/// The frames a call's entry record holds (`--stack`), named; a frame the function table
/// does not know ends them.
fn stack(meta: &SiteMeta, call: &Call, callers: &mut Callers<'_>) -> Vec<Caller> {
    let Some(at) = meta.entry.stack else { return Vec::new() };
    let data = &call.entry.data;
    let n = crate::libs::word_at(data, at).unwrap_or(0).min(32);
    (0..n)
        .map_while(|i| crate::libs::word_at(data, at + 8 + 8 * i as u16))
        .map_while(|pc| (pc != 0).then(|| callers(pc)).flatten())
        .collect()
}

/// A JSON line's `error`: null unless the span's status is Error, then its description, or
/// (a 5xx has none) what `error.type` says.
fn json_error(d: &crate::libs::Described) -> Option<String> {
    let e = d.error.as_ref()?;
    if !e.is_empty() {
        return Some(e.clone());
    }
    let ty = d.attrs.iter().find(|(k, _)| *k == "error.type").map(|(_, v)| match v {
        Attr::S(s) => s.clone(),
        Attr::I(i) => i.to_string(),
    });
    Some(ty.map_or_else(|| "error".into(), |t| format!("error.type {t}")))
}

/// A JSON line's end time and duration, for a call that returned.
fn json_end(o: &mut serde_json::Value, start: u128, dur: Option<f64>) {
    if let Some(ns) = dur {
        o["end_time_unix_nano"] = serde_json::json!((start + ns as u128) as u64);
        o["duration_ns"] = serde_json::json!(ns.round() as u64);
    }
}

/// A library's span straight to OTLP protobuf, without building the SDK's `SpanData`.
fn encode_lib(call: &Call, d: &crate::libs::Described, clock: &Clock) -> Vec<u8> {
    use crate::otlp::proto;
    use opentelemetry::trace::SpanKind as K;
    let (start, dur) = call.times(clock);
    let dur = dur.unwrap_or(0.0);
    let attrs = d.attrs.iter().map(|(k, v)| {
        let v = match v {
            Attr::S(s) => proto::Attr::Str(s),
            Attr::I(i) => proto::Attr::I64(*i),
        };
        (*k, v)
    });
    let goid = std::iter::once(("go.goroutine.id", proto::Attr::I64(call.goid as i64)));
    let mut out = Vec::with_capacity(512);
    proto::span(
        &mut out,
        proto::SpanParts {
            trace_id: call.trace_id,
            span_id: call.span_id,
            parent: call.parent,
            parent_remote: call.remote_parent,
            // An invalid incoming tracestate is dropped, as the W3C rules say.
            trace_state: call
                .notes
                .as_ref()
                .and_then(|n| n.trace_state.as_deref())
                .filter(|t| t.parse::<opentelemetry::trace::TraceState>().is_ok())
                .unwrap_or(""),
            name: &d.name,
            kind: match d.kind {
                crate::libs::SpanKind::Server => K::Server,
                crate::libs::SpanKind::Client => K::Client,
                crate::libs::SpanKind::Producer => K::Producer,
                crate::libs::SpanKind::Consumer => K::Consumer,
            },
            start_ns: start as u64,
            end_ns: start as u64 + dur.round() as u64,
            attributes: attrs.chain(goid),
            error: d.error.as_deref(),
        },
    );
    out
}
