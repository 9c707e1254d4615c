//! Library instrumentations: each library inject traces without code changes is a module
//! of its own that declares, through [`Library`], the functions it probes (by symbol, per
//! Go release), the struct fields it reads (resolved by go-abi from DWARF or the generated
//! tables), its capture plans, and how its records become spans: names, kinds, attributes,
//! and the events ([`LibState`]) that add to an open span or carry context. The core
//! (planning, installing, collecting, pairing, exporting) names no library: it goes through
//! [`LIBRARIES`]. A new library is a new module here and one line in that list.

pub mod http;

use go_abi::{Func, GoBinary};

use crate::plan::{PlanContext, ProbeSite};
use crate::ring::Record;

/// Every library inject instruments, in the order their probes are planned.
pub static LIBRARIES: &[&dyn Library] = &[&http::NetHttp];

pub use crate::plan::LibProbe;

/// The library a probe belongs to.
pub fn library(p: LibProbe) -> &'static dyn Library {
    LIBRARIES[usize::from(p.lib)]
}

/// Whether a probe's records open and close a span (else they are events).
pub fn is_span(p: LibProbe) -> bool {
    library(p).is_span(p.probe)
}

/// What a library plans with.
pub struct PlanCx<'a> {
    pub bin: &'a GoBinary<'a>,
    pub funcs: &'a [Func<'a>],
    pub bias: u64,
    pub ctx: &'a PlanContext,
    /// The Go release (major, minor), for the offset tables of stripped binaries.
    pub release: (u32, u32),
    /// The id of the first site it plans (sites are numbered across the session).
    pub first_id: u32,
    /// Its own index in [`LIBRARIES`].
    pub lib: u8,
}

/// The probes a library gets in one binary, or why not.
#[derive(Default)]
pub struct Planned {
    pub sites: Vec<ProbeSite>,
    /// Probes left out, with the reason (for `--dry-run` and a warning).
    pub skipped: Vec<String>,
}

/// One instrumented library.
pub trait Library: Sync {
    /// The library as users know it (`net/http`).
    fn name(&self) -> &'static str;
    /// The OpenTelemetry instrumentation scope of its spans.
    fn scope(&self) -> &'static str;
    /// Its probe sites in this binary (none when the binary does not use the library).
    fn plan(&self, cx: &PlanCx<'_>) -> Planned;
    /// Whether `probe`'s entry and return records are a span (else events).
    fn is_span(&self, probe: u8) -> bool;
    /// Its per-session state on the collector's side.
    fn state(&self) -> Box<dyn LibState>;
    /// Names and attributes a finished span of `probe` by the semantic conventions.
    /// `type_name` names the dynamic type of an interface value from its itab.
    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Described;
}

/// A library's collector-side state: what its events tell, kept until a span uses it.
pub trait LibState: Send {
    /// The notes a span of `probe` starts with (what earlier events on its goroutine said).
    fn span_start(&mut self, probe: u8, rec: &Record) -> Option<Notes>;
    /// A record of one of its event probes.
    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans);
    /// Counters for the exit summary, by the name they have there.
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// What events may do to the spans open on goroutines.
pub trait OpenSpans {
    /// The notes of the innermost open span of `probe` on `goid`.
    fn notes(&mut self, goid: u64, probe: LibProbe) -> Option<&mut Notes>;
    /// Ends the innermost open span of `probe` on `goid` at `end`, as a panic unwinding
    /// through it would: the frames above it are abandoned; `mark` may note why. False
    /// when none is open.
    fn unwind(&mut self, goid: u64, probe: LibProbe, end: Record, mark: &mut dyn FnMut(&mut Notes)) -> bool;
    /// `child` was created by `parent`: named functions that begin on it with nothing open
    /// continue the context open on `parent`.
    fn spawned(&mut self, child: u64, parent: u64);
}

/// What events add to a span before it ends: attributes (first or last writer wins, as the
/// library decides), the incoming `tracestate`, and whether it ended by a panic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notes {
    pub attrs: Vec<(&'static str, Attr)>,
    pub trace_state: Option<String>,
    pub panicked: bool,
}

impl Notes {
    pub fn get(&self, key: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sets `key`, replacing an earlier value.
    pub fn set(&mut self, key: &'static str, v: Attr) {
        match self.attrs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.attrs.push((key, v)),
        }
    }

    /// Sets `key` unless it has a value.
    pub fn set_first(&mut self, key: &'static str, v: Attr) {
        if self.get(key).is_none() {
            self.attrs.push((key, v));
        }
    }
}

/// A span's kind (OpenTelemetry's; the messaging libraries will add producer and
/// consumer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        }
    }
}

/// A span's kind, name, attributes and error, ready for any output.
#[derive(Debug, Clone)]
pub struct Described {
    pub kind: SpanKind,
    pub name: String,
    pub attrs: Vec<(&'static str, Attr)>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    S(String),
    I(i64),
}

/// Span ids as a span probe's trampoline made them (and maybe sent on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace: u128,
    pub span: u64,
    pub parent: Option<u64>,
    pub remote: bool,
}

fn hex(bytes: &[u8]) -> Option<u128> {
    let s = std::str::from_utf8(bytes).ok()?;
    u128::from_str_radix(s, 16).ok()
}

/// The ids at the start of a span probe's entry record (`ring_abi::span_ids`).
pub fn span_ids(data: &[u8]) -> Option<SpanIds> {
    use ring_abi::span_ids;
    let d = data.get(..span_ids::LEN)?;
    let trace = hex(&d[span_ids::TRACE..span_ids::TRACE + 32]).filter(|t| *t != 0)?;
    let span = hex(&d[span_ids::SPAN..span_ids::SPAN + 16]).filter(|s| *s != 0)? as u64;
    let kind = u64::from_le_bytes(d[span_ids::PARENT_KIND..][..8].try_into().ok()?);
    let parent = if kind == 0 { None } else { hex(&d[span_ids::PARENT..span_ids::PARENT + 16]).map(|p| p as u64) };
    Some(SpanIds {
        trace,
        span,
        parent: parent.filter(|p| *p != 0),
        remote: kind == ring_abi::ParentKind::Remote as u64,
    })
}

/// The names of every library, for `--lib` and messages.
pub fn names() -> Vec<&'static str> {
    LIBRARIES.iter().map(|l| l.name()).collect()
}

/// A fresh collector-side state for every library.
pub fn states() -> Vec<Box<dyn LibState>> {
    LIBRARIES.iter().map(|l| l.state()).collect()
}
