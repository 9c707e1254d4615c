//! Library instrumentations: each library inject traces without code changes is a module
//! of its own that declares, through [`Library`], the functions it probes (by symbol, per
//! Go release), the struct fields it reads (resolved by go-abi from DWARF or the generated
//! tables), its capture plans, and how its records become spans: names, kinds, attributes,
//! and the events ([`LibState`]) that add to an open span or carry context. The core
//! (planning, installing, collecting, pairing, exporting) names no library: it goes through
//! [`LIBRARIES`]. A new library is a new module here and one line in that list.

pub mod goroutines;
pub mod grpc;
pub mod http;
pub mod kafka;
pub mod otel;
pub mod redis;
pub mod sql;

use go_abi::{Func, GoBinary};
use trampolines::codegen::{AfterWrite, CapturePlan, Fetch, FieldCopy, Guard, Op, When};

use crate::plan::{PlanContext, ProbeSite, Role};
use crate::ring::Record;
use crate::values::Side;

/// The register ABI's integer argument registers as capture plans number them.
pub mod reg {
    pub const RAX: u8 = 0;
    pub const RBX: u8 = 1;
    pub const RCX: u8 = 2;
    pub const RDI: u8 = 3;
    pub const RSI: u8 = 4;
    pub const R8: u8 = 5;
    pub const R9: u8 = 6;
    pub const R10: u8 = 7;
    pub const R11: u8 = 8;
}

/// Every library inject instruments, in the order their probes are planned.
pub static LIBRARIES: &[&dyn Library] = &[
    &http::NetHttp,
    &grpc::Grpc,
    &sql::DatabaseSql,
    &sql::pgx::Pgx,
    &redis::GoRedis,
    &kafka::KafkaGo,
    &otel::OtelSdk,
    &goroutines::Goroutines,
];

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
    /// A part every library needs (goroutine lineage) rather than one users pick: planned
    /// whenever another library is, never named by `--lib`.
    fn support(&self) -> bool {
        false
    }
    /// The OpenTelemetry instrumentation scope of its spans.
    fn scope(&self) -> &'static str;
    /// Its probe sites in this binary (none when the binary does not use the library).
    fn plan(&self, cx: &PlanCx<'_>) -> Planned;
    /// Whether `probe`'s entry and return records are a span (else events).
    fn is_span(&self, probe: u8) -> bool;
    /// Its per-session state on the collector's side.
    fn state(&self) -> Box<dyn LibState>;
    /// Names and attributes a finished span of `probe` by the semantic conventions, or
    /// None when the call did nothing the library reports (no span at all; always, for a
    /// library whose probes are all events). `type_name` names the dynamic type of an
    /// interface value from its itab.
    fn describe(
        &self,
        _probe: u8,
        _entry: &Record,
        _ret: Option<&Record>,
        _notes: Option<&Notes>,
        _type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        None
    }
}

/// A library's collector-side state: what its events tell, kept until a span uses it.
pub trait LibState: Send {
    /// The notes a span of `probe` starts with (what earlier events on its goroutine said).
    fn span_start(&mut self, probe: u8, rec: &Record) -> Option<Notes>;
    /// A record of one of its event probes.
    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans);
    /// Counters for the exit summary, by the name they have there.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Goroutine `child` was created by `parent` (what it knows may move along).
    fn spawned(&mut self, _child: u64, _parent: u64) {}
    /// A span of `probe` whose call returned (`ret`) but whose work goes on (a stream it
    /// opened): the key to keep it open under until an event calls
    /// [`OpenSpans::release`], or None to end it now.
    fn hold(&mut self, _probe: u8, _ret: &Record) -> Option<u64> {
        None
    }
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
    /// Ends the span library `lib` kept open under `key` ([`LibState::hold`]) at `end`,
    /// which its description then reads as the span's end. False when none is kept.
    fn release(&mut self, lib: u8, key: u64, end: Record) -> bool;
    /// Opens a span of library `lib` at `start` (a record whose data begins with the
    /// span's ids), kept under `key` until [`OpenSpans::release`] ends it: work that
    /// begins where a call returns (a message fetched, then processed). One already kept
    /// under `key` ends where it began.
    fn begin_held(&mut self, lib: u8, key: u64, start: Record, notes: Option<Notes>);
    /// Hands an event's record to the output with `notes` that say everything about it
    /// (spans the application made whole, [`Notes::app_spans`]).
    fn pass_on(&mut self, rec: Record, notes: Notes);
}

/// What events add to a span before it ends: attributes (first or last writer wins, as the
/// library decides), the incoming `tracestate`, whether it ended by a panic, and which
/// library's span it began inside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Notes {
    pub attrs: Vec<(&'static str, Attr)>,
    pub trace_state: Option<String>,
    pub panicked: bool,
    /// The library whose span was open directly around this one on its goroutine when
    /// it began (a library's call made by another's: pgx under database/sql's driver).
    pub inside: Option<&'static str>,
    /// Spans the application made itself (its OpenTelemetry API), exported as they are.
    pub app_spans: Vec<otel::AppSpan>,
}

impl Notes {
    pub fn get(&self, key: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Attr> {
        self.attrs.iter_mut().find(|(k, _)| *k == key).map(|(_, v)| v)
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

/// A span's kind (OpenTelemetry's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    Producer,
    Consumer,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
            SpanKind::Producer => "PRODUCER",
            SpanKind::Consumer => "CONSUMER",
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
    /// From the trace flags (bit 0), when the trampoline wrote them.
    pub sampled: Option<bool>,
}

/// A field copy (see [`FieldCopy`]) that stores 0 when a condition fails.
pub fn field(reg: u8, path: Vec<i32>, off: i32, fetch: Fetch, dest: u16, when: Vec<When>) -> Op {
    Op::Field(FieldCopy { reg, path, off, fetch, dest, when, keep_on_miss: false })
}

/// Where one dynamic type keeps the value a record wants: register, pointer path and
/// offset, and the conditions (its itab) under which they are that type's.
pub struct Alt {
    pub reg: u8,
    pub path: Vec<i32>,
    pub off: i32,
    pub when: Vec<When>,
}

/// One place in a record filled by whichever of `alts` matches the value's dynamic type:
/// the first copy writes 0 on a miss, the others leave what is there
/// (`FieldCopy::keep_on_miss`); with no alternative at all the place is still 0, so the
/// describer never reads a slot's old bytes.
pub fn one_of(dest: u16, fetch: Fetch, alts: Vec<Alt>) -> Vec<Op> {
    if alts.is_empty() {
        // A condition that never holds (RAX is never the address 1): 0 is stored.
        return vec![field(0, Vec::new(), 0, Fetch::Word, dest, vec![When::reg(0, 1)])];
    }
    alts.into_iter()
        .enumerate()
        .map(|(i, a)| {
            Op::Field(FieldCopy {
                reg: a.reg,
                path: a.path,
                off: a.off,
                fetch,
                dest,
                when: a.when,
                keep_on_miss: i > 0,
            })
        })
        .collect()
}

/// The word a capture stored at `at` in a record's data.
pub fn word_at(data: &[u8], at: u16) -> Option<u64> {
    let at = usize::from(at);
    data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

/// A Go string a field copy stored at `at` (its length, then at most `max` bytes); None
/// when empty.
pub fn string_at(data: &[u8], at: u16, max: u16) -> Option<String> {
    let n = usize::try_from(word_at(data, at)?).ok()?.min(usize::from(max));
    let start = usize::from(at) + 8;
    let bytes = data.get(start..start + n)?;
    (n > 0).then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// `host:port`, `[v6]:port` or a bare host.
pub fn split_host_port(s: &str) -> (String, Option<i64>) {
    if let Some(rest) = s.strip_prefix('[')
        && let Some((h, p)) = rest.split_once(']')
    {
        return (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (s.to_string(), None),
    }
}

/// Lowercase or uppercase hex digits (at most 32) as a number; None for any other byte.
fn hex(bytes: &[u8]) -> Option<u128> {
    if bytes.is_empty() || bytes.len() > 32 {
        return None;
    }
    bytes.iter().try_fold(0u128, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(d))
    })
}

/// The ids at the start of a span probe's entry record (`ring_abi::span_ids`).
pub fn span_ids(data: &[u8]) -> Option<SpanIds> {
    use ring_abi::span_ids;
    let d = data.get(..span_ids::LEN)?;
    let trace = hex(&d[span_ids::TRACE..span_ids::TRACE + 32]).filter(|t| *t != 0)?;
    let span = hex(&d[span_ids::SPAN..span_ids::SPAN + 16]).filter(|s| *s != 0)? as u64;
    let kind = u64::from_le_bytes(d[span_ids::PARENT_KIND..][..8].try_into().ok()?);
    let parent = if kind == 0 { None } else { hex(&d[span_ids::PARENT..span_ids::PARENT + 16]).map(|p| p as u64) };
    let flags = hex(&d[span_ids::FLAGS..span_ids::FLAGS + 2]);
    Some(SpanIds {
        trace,
        span,
        parent: parent.filter(|p| *p != 0),
        remote: kind == ring_abi::ParentKind::Remote as u64,
        sampled: flags.map(|f| f & 1 == 1),
    })
}

/// The names of every library users pick, for `--lib` and messages.
pub fn names() -> Vec<&'static str> {
    LIBRARIES.iter().filter(|l| !l.support()).map(|l| l.name()).collect()
}

/// Plans a library's probes: for each `(probe, function)` candidate the binary has, the
/// entry and return capture plans `plans` gives (or the missing offset that rules the
/// probe out). A probe whose return plan is off leaves the function's exits alone; one
/// whose exits are needed but cannot be patched is left out, with the reason.
pub fn plan_candidates(
    cx: &PlanCx<'_>,
    candidates: &[(u8, &str)],
    mut plans: impl FnMut(u8) -> Result<(CapturePlan, CapturePlan), String>,
) -> Planned {
    let mut out = Planned::default();
    let by_name: std::collections::HashMap<&str, &Func<'_>> = cx.funcs.iter().map(|f| (f.name.as_ref(), f)).collect();
    for &(probe, name) in candidates {
        let Some(f) = by_name.get(name) else { continue };
        let (entry, ret) = match plans(probe) {
            Ok(p) => p,
            Err(missing) => {
                out.skipped.push(format!("{name}: no offset for {missing} in this build"));
                continue;
            }
        };
        let id = cx.first_id + out.sites.len() as u32;
        let role = Role::Lib(LibProbe { lib: cx.lib, probe });
        let mut site = crate::plan::analyse_as(cx.bin, f, id, cx.bias, cx.ctx, role);
        let needs_exit = !ret.off;
        site.on_entry = Side { plan: entry, ..Side::default() };
        site.on_return = Side { plan: ret, ..Side::default() };
        if let Err(e) = &site.entry_patch {
            out.skipped.push(format!("{name}: {e}"));
            continue;
        }
        if !needs_exit {
            // Nothing to record at the exits: leave them alone.
            site.returns = Ok(Vec::new());
        } else if let Err(e) = &site.returns {
            out.skipped.push(format!("{name}: its exits are needed and cannot be probed: {e}"));
            continue;
        }
        out.sites.push(site);
    }
    out
}

/// The plans of an HTTP/2 framer's `endWrite` (frame buffer at `wbuf_off`, the framer in
/// RAX): the entry appends the goroutine's outgoing `traceparent` field when the frame
/// buffer has room, or (with `after`) leaves it to the return, which appends it after the
/// frame in the writer's buffer. Both only run on a goroutine with work for them.
pub fn h2_inject_plans(wbuf_off: i32, after: Option<AfterWrite>) -> (CapturePlan, CapturePlan) {
    use ring_abi::ctx::{AFTER_TAG_BIT, OUT_TAG_BIT};
    let entry = CapturePlan {
        ops: vec![Op::InjectH2 { framer: 0, wbuf_off, after, dest: 0 }],
        guard: Some(Guard::Tagged { bit: OUT_TAG_BIT }),
        ..CapturePlan::default()
    };
    let ret = match after {
        Some(after) => CapturePlan {
            ops: vec![Op::InjectH2After { wbuf_off, after, dest: 0 }],
            guard: Some(Guard::Tagged { bit: AFTER_TAG_BIT }),
            ..CapturePlan::default()
        },
        None => CapturePlan { off: true, ..CapturePlan::default() },
    };
    (entry, ret)
}

/// What the records of an outgoing `traceparent` say of the `tracestate` after it: the
/// word after the span id is its bytes, 0 for none, -1 for a value without room.
#[derive(Debug, Default)]
pub struct TracestateOut {
    pub written: u64,
    pub no_room: u64,
}

impl TracestateOut {
    pub fn count(&mut self, rec: &Record) {
        let Some(w) = rec.data.get(24..32) else { return };
        match i64::from_le_bytes(w.try_into().unwrap_or_default()) {
            0 => {}
            -1 => self.no_room += 1,
            _ => self.written += 1,
        }
    }
}

/// The plans of an HPACK encoder's `WriteField(f HeaderField)` (the field's name in
/// RBX/RCX): a `traceparent` the application writes itself makes the goroutine's outgoing
/// client span stand down, so a request never carries two. Only names that may be one
/// (`t`, 11 bytes or more) leave a record: its first word is 1 when a span stood down.
pub fn h2_stand_down_plans() -> (CapturePlan, CapturePlan) {
    let entry = CapturePlan {
        ops: vec![Op::StandDown { name_ptr: 1, name_len: 2, dest: 0 }],
        guard: Some(Guard::FirstByte { ptr: 1, len: 2, min_len: 11, first: b"t".to_vec() }),
        ..CapturePlan::default()
    };
    (entry, CapturePlan { off: true, ..CapturePlan::default() })
}

/// The version of module `path` the binary was built with (a replacement's, if any).
pub fn module_version<'b>(bin: &'b GoBinary<'_>, path: &str) -> Option<&'b str> {
    bin.build_info
        .deps
        .iter()
        .find(|m| m.path == path)
        .map(|m| m.replace.as_deref().unwrap_or(m))
        .map(|m| m.version.as_str())
        .filter(|v| !v.is_empty())
}

/// `v1.60.1` as (1, 60, 1); pre-release and build suffixes are ignored.
pub fn semver(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.strip_prefix('v')?;
    let end = v.find(['-', '+']).unwrap_or(v.len());
    let mut parts = v[..end].split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// A fresh collector-side state for every library.
pub fn states() -> Vec<Box<dyn LibState>> {
    LIBRARIES.iter().map(|l| l.state()).collect()
}

#[cfg(test)]
mod tests {
    use super::hex;

    #[test]
    fn hex_reads_what_from_str_radix_reads() {
        for s in
            ["0", "f", "0af7651916cd43dd8448eb211c80319c", "B7AD6B7169203331", "01", "ffffffffffffffffffffffffffffffff"]
        {
            assert_eq!(hex(s.as_bytes()), u128::from_str_radix(s, 16).ok(), "{s}");
        }
        for bad in ["", "0x1", "g0", "-1", " 1", "000000000000000000000000000000000"] {
            assert_eq!(hex(bad.as_bytes()), None, "{bad}");
        }
    }
}
