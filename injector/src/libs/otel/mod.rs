//! The application's own spans (go.opentelemetry.io/otel) in inject's traces, both ways,
//! through the Auto SDK (go.opentelemetry.io/auto/sdk) that otel-go links from v1.33:
//!
//! - The global tracer provider, while the application has set none, asks
//!   `global.(*tracer).newSpan(ctx, autoSpan *bool, ...)` whether an auto-instrumentation
//!   is there; the entry trampoline says yes ([`Op::AutoEnable`]), so the application's
//!   `Tracer.Start` goes to the Auto SDK. Detach says no again (the flag is cleared).
//! - The Auto SDK's `(*tracer).start` asks for the span's context: the trampoline
//!   ([`Op::AutoStart`]) makes it a child of the goroutine's span (an HTTP server span,
//!   or another application span) and makes it the goroutine's context until the span
//!   ends, so the HTTP, gRPC, SQL, Redis and Kafka calls under it are its children.
//! - `(*span).ended(buf)` hands over the finished span as OTLP JSON: its bytes are copied
//!   into the record and exported as the application made it (its name, kind, scope,
//!   attributes, events, links and status).
//!
//! An application that sets its own tracer provider never reaches `newSpan`: its spans
//! go to its own exporter only, never twice. docs/otel-sdk.md has the details.

pub mod span;

use trampolines::codegen::{ByteCopy, CapturePlan, Op};

use super::{LibProbe, LibState, Library, Notes, OpenSpans, PlanCx, Planned, module_version, semver};
use crate::libs::reg::{R8, R9, RAX, RBX, RCX, RDI, RSI};
use crate::ring::Record;

pub use span::AppSpan;

/// Bytes of a span's JSON a record carries; a larger span is counted and not exported
/// (the record's slot size grows with it, for every probe of the session).
pub const JSON_MAX: u16 = 1800;

const OTEL: &str = "go.opentelemetry.io/otel";
/// The first otel-go whose global tracer asks for an auto-instrumentation.
const FIRST: (u32, u32, u32) = (1, 33, 0);
const NEW_SPAN: &str = "go.opentelemetry.io/otel/internal/global.(*tracer).newSpan";
const START: &str = "go.opentelemetry.io/auto/sdk.(*tracer).start";
const ENDED: &str = "go.opentelemetry.io/auto/sdk.(*span).ended";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Probe {
    Enable,
    Start,
    Ended,
}

pub struct OtelSdk;

impl Library for OtelSdk {
    fn name(&self) -> &'static str {
        "otel"
    }

    fn scope(&self) -> &'static str {
        "inject/go.opentelemetry.io/otel"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        let Some(version) = module_version(cx.bin, OTEL) else { return Planned::default() };
        let has = |n: &str| cx.funcs.iter().any(|f| f.name == n);
        if semver(version).is_none_or(|v| v < FIRST) || !has(NEW_SPAN) {
            // The application may still use the API: say why its spans stay its own.
            if has("go.opentelemetry.io/otel/internal/global.(*tracer).Start") {
                return Planned {
                    skipped: vec![format!(
                        "{OTEL} {version}: the application's own spans are not joined (otel-go v1.33.0 or newer \
                         has the Auto SDK they need)"
                    )],
                    ..Planned::default()
                };
            }
            return Planned::default();
        }
        if !has(START) || !has(ENDED) {
            return Planned {
                skipped: vec![format!("{OTEL} {version}: go.opentelemetry.io/auto/sdk is not linked in")],
                ..Planned::default()
            };
        }
        let off = CapturePlan { off: true, ..CapturePlan::default() };
        let plans = |p: u8| -> Result<(CapturePlan, CapturePlan), String> {
            let entry = match p {
                // newSpan(ctx, autoSpan *bool, name, opts) on a *tracer.
                x if x == Probe::Enable as u8 => {
                    CapturePlan { ops: vec![Op::AutoEnable { flag: RDI }], ..CapturePlan::default() }
                }
                // start(ctx, spanPtr, psc, sampled, sc) on a *tracer.
                x if x == Probe::Start as u8 => CapturePlan {
                    ints: 1 << RDI,
                    ops: vec![Op::AutoStart { span: RDI, psc: RSI, sampled: R8, sc: R9, dest: 0 }],
                    ..CapturePlan::default()
                },
                // ended(buf []byte) on a *span: the JSON, and its length in RCX.
                _ => CapturePlan {
                    ints: 1 << RAX | 1 << RCX,
                    copies: vec![ByteCopy { ptr: RBX, len: RCX, max: JSON_MAX, dest: 0 }],
                    ops: vec![Op::AutoEnd { span: RAX }],
                    ..CapturePlan::default()
                },
            };
            Ok((entry, off.clone()))
        };
        super::plan_candidates(
            cx,
            &[(Probe::Enable as u8, NEW_SPAN), (Probe::Start as u8, START), (Probe::Ended as u8, ENDED)],
            plans,
        )
    }

    fn is_span(&self, _probe: u8) -> bool {
        false
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::<AppSpans>::default()
    }
}

/// What the collector counts of the application's spans.
#[derive(Default)]
struct AppSpans {
    started: u64,
    ended: u64,
    too_large: u64,
    unreadable: u64,
    warned: bool,
}

impl LibState for AppSpans {
    fn span_start(&mut self, _probe: u8, _rec: &Record) -> Option<Notes> {
        None
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        if probe.probe == Probe::Start as u8 {
            self.started += 1;
            return;
        }
        if probe.probe != Probe::Ended as u8 {
            return;
        }
        let len = rec.ints[usize::from(RCX)] as usize;
        if len > usize::from(JSON_MAX) {
            self.too_large += 1;
            self.warn(&format!("an application span of {len} bytes of JSON is over the {JSON_MAX} a record holds"));
            return;
        }
        match rec.data.get(..len).map(span::decode) {
            Some(Ok(app_spans)) => {
                self.ended += app_spans.len() as u64;
                spans.pass_on(rec, Notes { app_spans, ..Notes::default() });
            }
            Some(Err(e)) => {
                self.unreadable += 1;
                self.warn(&format!("an application span was not read: {e}"));
            }
            None => self.unreadable += 1,
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("app_spans_started", self.started),
            ("app_spans", self.ended),
            ("app_spans_too_large", self.too_large),
            ("app_spans_unreadable", self.unreadable),
        ]
    }
}

impl AppSpans {
    /// Says so once on stderr (the exit summary counts every one).
    fn warn(&mut self, what: &str) {
        if !self.warned {
            self.warned = true;
            eprintln!("inject: {what}; not exported (counted in the summary's app_spans_* counters)");
        }
    }
}
