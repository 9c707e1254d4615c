//! net/http without code changes: server and client spans following the OpenTelemetry
//! HTTP semantic conventions, with W3C trace context in and out and goroutine lineage.
//!
//! Trace context moves inside the target, in the trampolines (`trampolines::codegen::Op`),
//! because an outgoing request must carry its `traceparent` before the collector could
//! have seen anything:
//! - an incoming `traceparent` header line (`net/textproto` returns each line) becomes
//!   the reading goroutine's pending context;
//! - `serverHandler.ServeHTTP` continues it or starts a trace, and makes the server span
//!   the goroutine's active context (cleared when it returns);
//! - `runtime.newproc1` copies the creator's active context to each new goroutine;
//! - `(*Transport).roundTrip` makes the client span a child of the active context and
//!   files it under the request's header map;
//! - `Header.writeSubset` for that map appends a `traceparent` line to the connection's
//!   `bufio.Writer`, when it has room, before the request's own headers.
//!
//! Records carry the ids the target made, so the spans exported are the ones on the wire.

use std::collections::HashMap;

use go_abi::{Func, GoBinary};
use ring_abi::span_ids;
use trampolines::codegen::{ByteCopy, CapturePlan, Fetch, FieldCopy, Guard, Op};

use crate::plan::{self, PlanContext, ProbeSite, Role};
use crate::values::Side;

/// What each net/http probe is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `serverHandler.ServeHTTP`: the server span.
    Server,
    /// `(*Transport).roundTrip`: the client span.
    Client,
    /// A header line read (return of `readContinuedLineSlice`).
    HeaderLine,
    /// The status a handler writes (`WriteHeader`).
    Status,
    /// The mux's matched pattern (return of `findHandler`).
    Route,
    /// A deferred recover after a handler: a server span still open there panicked.
    Unwind,
    /// A goroutine is created (return of `runtime.newproc1`).
    Spawn,
    /// Request headers are written (entry of `Header.writeSubset`).
    Inject,
    /// A goroutine exits (entry of `runtime.goexit1`): its context is forgotten.
    Exit,
    /// An HTTP/2 header field decoded (the HPACK decoder's emit closure).
    H2Field,
    /// An HTTP/2 headers frame read (return of `readMetaFrame`) on the connection's reader.
    H2Frame,
    /// The serve loop takes a headers frame (`processHeaders`) and starts its handler.
    H2Process,
}

impl Probe {
    pub fn is_span(self) -> bool {
        matches!(self, Probe::Server | Probe::Client)
    }
}

/// Argument registers, in ABI order.
const RAX: u8 = 0;
const RBX: u8 = 1;
const RCX: u8 = 2;
const RDI: u8 = 3;

/// A value a span probe reads through the request (or response) pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    Method,
    Path,
    Query,
    Host,
    Remote,
    Proto,
    Tls,
    Scheme,
    UrlHost,
    Status,
}

struct Spec {
    val: Val,
    /// Reached through `Request.URL`.
    via_url: bool,
    field: &'static str,
    fetch: Fetch,
}

const fn s(val: Val, via_url: bool, field: &'static str, max: u16) -> Spec {
    Spec { val, via_url, field, fetch: Fetch::Str { max } }
}
const fn w(val: Val, field: &'static str) -> Spec {
    Spec { val, via_url: false, field, fetch: Fetch::Word }
}

const SERVER: &[Spec] = &[
    s(Val::Method, false, "net/http.Request.Method", 16),
    s(Val::Path, true, "net/url.URL.Path", 200),
    s(Val::Query, true, "net/url.URL.RawQuery", 120),
    s(Val::Host, false, "net/http.Request.Host", 100),
    s(Val::Remote, false, "net/http.Request.RemoteAddr", 56),
    s(Val::Proto, false, "net/http.Request.Proto", 16),
    w(Val::Tls, "net/http.Request.TLS"),
];

const CLIENT: &[Spec] = &[
    s(Val::Method, false, "net/http.Request.Method", 16),
    s(Val::Scheme, true, "net/url.URL.Scheme", 16),
    s(Val::UrlHost, true, "net/url.URL.Host", 100),
    s(Val::Path, true, "net/url.URL.Path", 200),
    s(Val::Query, true, "net/url.URL.RawQuery", 120),
    s(Val::Host, false, "net/http.Request.Host", 100),
];

const CLIENT_RETURN: &[Spec] =
    &[w(Val::Status, "net/http.Response.StatusCode"), s(Val::Proto, false, "net/http.Response.Proto", 16)];

/// Where each value lands in a record's data: after the span ids for entries, from 0 for
/// returns. The collector decodes with the same table.
fn dests(probe: Probe, ret: bool) -> impl Iterator<Item = (&'static Spec, u16)> {
    let (specs, first): (&'static [Spec], usize) = match (probe, ret) {
        (Probe::Server, false) => (SERVER, span_ids::LEN),
        (Probe::Client, false) => (CLIENT, span_ids::LEN),
        (Probe::Client, true) => (CLIENT_RETURN, 0),
        _ => (&[], 0),
    };
    specs.iter().scan(first, |at, sp| {
        let d = *at as u16;
        *at += 8 + if let Fetch::Str { max } = sp.fetch { max as usize } else { 0 };
        Some((sp, d))
    })
}

/// Struct field offsets as trampolines take them (displacements).
struct Offsets<'d>(go_abi::runtime::FieldOffsets<'d>);

impl Offsets<'_> {
    fn get(&mut self, key: &str) -> Option<i32> {
        self.0.get(key).and_then(|o| i32::try_from(o).ok())
    }
}

/// The probes net/http gets, or why not: the libraries' part of the plan.
pub struct Planned {
    pub sites: Vec<ProbeSite>,
    /// Probes left out, with the reason (for `--dry-run` and a warning).
    pub skipped: Vec<String>,
}

/// Candidate functions per probe, across Go 1.21 to 1.27 (1.27 moved HTTP/2 into
/// `net/http/internal/http2`).
const CANDIDATES: &[(Probe, &str)] = &[
    (Probe::Server, "net/http.serverHandler.ServeHTTP"),
    (Probe::Client, "net/http.(*Transport).roundTrip"),
    (Probe::HeaderLine, "net/textproto.(*Reader).readContinuedLineSlice"),
    (Probe::Status, "net/http.(*response).WriteHeader"),
    (Probe::Status, "net/http.(*http2responseWriterState).writeHeader"),
    (Probe::Status, "net/http/internal/http2.(*responseWriterState).writeHeader"),
    (Probe::Route, "net/http.(*ServeMux).findHandler"),
    (Probe::Route, "net/http.(*ServeMux).handler"),
    // Go 1.22+ with GODEBUG httpmuxgo121=1 (the default for a module that says go 1.21).
    (Probe::Route, "net/http.(*serveMux121).findHandler"),
    (Probe::Unwind, "net/http.(*conn).serve.func1"),
    (Probe::Unwind, "net/http.(*http2serverConn).runHandler.func1"),
    (Probe::Unwind, "net/http/internal/http2.(*serverConn).runHandler.func1"),
    (Probe::Spawn, "runtime.newproc1"),
    (Probe::Inject, "net/http.Header.writeSubset"),
    (Probe::Exit, "runtime.goexit1"),
    (Probe::H2Field, "net/http.(*http2Framer).readMetaFrame.func1"),
    (Probe::H2Field, "net/http/internal/http2.(*Framer).readMetaFrame.func1"),
    (Probe::H2Frame, "net/http.(*http2Framer).readMetaFrame"),
    (Probe::H2Frame, "net/http/internal/http2.(*Framer).readMetaFrame"),
    (Probe::H2Process, "net/http.(*http2serverConn).processHeaders"),
    (Probe::H2Process, "net/http/internal/http2.(*serverConn).processHeaders"),
];

/// Whether the binary has a net/http server or client to instrument.
pub fn linked(funcs: &[Func<'_>]) -> bool {
    funcs.iter().any(|f| f.name == "net/http.serverHandler.ServeHTTP" || f.name == "net/http.(*Transport).roundTrip")
}

/// Plans the net/http probes, numbering sites from `first_id`.
pub fn plan(
    bin: &GoBinary<'_>,
    funcs: &[Func<'_>],
    bias: u64,
    ctx: &PlanContext,
    release: (u32, u32),
    first_id: u32,
) -> Planned {
    let mut out = Planned { sites: Vec::new(), skipped: Vec::new() };
    if !linked(funcs) {
        return out;
    }
    let mut offsets = Offsets(go_abi::runtime::FieldOffsets::new(ctx.dwarf.as_ref(), release));
    let by_name: HashMap<&str, &Func<'_>> = funcs.iter().map(|f| (f.name.as_ref(), f)).collect();
    let write_fn = by_name.get("bufio.(*Writer).Write").map(|f| f.entry + bias);
    for &(probe, name) in CANDIDATES {
        let Some(f) = by_name.get(name) else { continue };
        let plans = match plans(probe, &mut offsets, write_fn) {
            Ok(p) => p,
            Err(missing) => {
                out.skipped.push(format!("{name}: no offset for {missing} in this Go release"));
                continue;
            }
        };
        let id = first_id + out.sites.len() as u32;
        let mut site = plan::analyse_as(bin, f, id, bias, ctx, Role::Http(probe));
        let (entry, ret) = plans;
        let needs_exit = !ret.off;
        site.on_entry = Side { plan: entry, values: Vec::new() };
        site.on_return = Side { plan: ret, values: Vec::new() };
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
    if !out.sites.iter().any(|s| s.role == Role::Http(Probe::Server) || s.role == Role::Http(Probe::Client)) {
        out.sites.clear();
    }
    out
}

/// Field reads of a span probe's entry (or return) through the pointer in `reg`.
fn specs_ops(probe: Probe, ret: bool, reg: u8, offsets: &mut Offsets<'_>) -> Result<Vec<Op>, String> {
    let url = offsets.get("net/http.Request.URL");
    dests(probe, ret)
        .map(|(sp, dest)| {
            let off = offsets.get(sp.field).ok_or(sp.field)?;
            let path = if sp.via_url { vec![url.ok_or("net/http.Request.URL")?] } else { Vec::new() };
            Ok(Op::Field(FieldCopy { reg, path, off, fetch: sp.fetch, dest }))
        })
        .collect::<Result<Vec<Op>, &str>>()
        .map_err(str::to_string)
}

/// The entry and return capture plans of a probe.
fn plans(probe: Probe, offsets: &mut Offsets<'_>, write_fn: Option<u64>) -> Result<(CapturePlan, CapturePlan), String> {
    let off = CapturePlan { off: true, ..CapturePlan::default() };
    let need = |offsets: &mut Offsets<'_>, key: &str| offsets.get(key).ok_or_else(|| key.to_string());
    Ok(match probe {
        Probe::Server => {
            let mut ops = vec![Op::ServerBegin { dest: 0 }];
            ops.extend(specs_ops(probe, false, RDI, offsets)?);
            (
                CapturePlan { ops, ..CapturePlan::default() },
                CapturePlan { ops: vec![Op::ServerEnd], ..CapturePlan::default() },
            )
        }
        Probe::Client => {
            let header_off = need(offsets, "net/http.Request.Header")?;
            let mut ops = vec![Op::ClientBegin { req: RBX, header_off, dest: 0 }];
            ops.extend(specs_ops(probe, false, RBX, offsets)?);
            let ret_ops = specs_ops(probe, true, RAX, offsets)?;
            (
                CapturePlan { ops, ..CapturePlan::default() },
                // The error result: RBX (itab) and RCX (data).
                CapturePlan { ints: 0b111, ops: ret_ops, ..CapturePlan::default() },
            )
        }
        Probe::HeaderLine => {
            let copies = vec![ByteCopy { ptr: RAX, len: RBX, max: HEADER_LINE_MAX, dest: 0 }];
            let ops = vec![Op::StashTraceparent { ptr: RAX, len: RBX }];
            // Only traceparent, tracestate and user-agent matter: other lines cost nothing.
            let guard = Some(Guard::FirstByte { ptr: RAX, len: RBX, first: b"tu".to_vec() });
            (off.clone(), CapturePlan { ints: 0b11, copies, ops, guard, ..CapturePlan::default() })
        }
        Probe::Status => (CapturePlan { ints: 0b10, ..CapturePlan::default() }, off),
        Probe::Route => {
            let copies = vec![ByteCopy { ptr: RCX, len: RDI, max: ROUTE_MAX, dest: 0 }];
            (off.clone(), CapturePlan { ints: 0b1100, copies, ..CapturePlan::default() })
        }
        Probe::Unwind => (CapturePlan::default(), off),
        // An incoming HTTP/2 traceparent: the HPACK decoder's emit closure gets each field
        // (name in RAX/RBX, value in RCX/RDI) on the connection's reader goroutine; the
        // frame it read (Frame interface: data in RBX at return) carries the context to
        // the serve loop, whose processHeaders (frame in RBX) starts the handler's
        // goroutine, which inherits it.
        Probe::H2Field => {
            let op = Op::StashTraceparentField { name_ptr: RAX, name_len: RBX, value_ptr: RCX, value_len: RDI };
            // traceparent, tracestate, user-agent: the collector keeps the last two.
            let guard = Some(Guard::FirstByte { ptr: RAX, len: RBX, first: b"tu".to_vec() });
            let copies = vec![
                ByteCopy { ptr: RAX, len: RBX, max: H2_NAME_MAX, dest: 0 },
                ByteCopy { ptr: RCX, len: RDI, max: HEADER_LINE_MAX, dest: H2_NAME_MAX },
            ];
            (CapturePlan { ints: 0b1111, copies, ops: vec![op], guard, ..CapturePlan::default() }, off)
        }
        Probe::H2Frame => {
            (off.clone(), CapturePlan { ops: vec![Op::PendingToRequest { key: RBX }], ..CapturePlan::default() })
        }
        Probe::H2Process => (
            CapturePlan { ops: vec![Op::PendingFromRequest { key: RBX }], ..CapturePlan::default() },
            CapturePlan { ops: vec![Op::ClearPending], ..CapturePlan::default() },
        ),
        // goexit1 has no parameters: the registers Forget uses hold nothing at its entry.
        Probe::Exit => (CapturePlan { ops: vec![Op::Forget], bare: true, ..CapturePlan::default() }, off),
        Probe::Spawn => {
            let goid_off = need(offsets, "runtime.g.goid")?;
            let parent_goid_off = need(offsets, "runtime.g.parentGoid")?;
            let word = |off, dest| Op::Field(FieldCopy { reg: RAX, path: Vec::new(), off, fetch: Fetch::Word, dest });
            let ops =
                vec![Op::Inherit { g: RAX, goid_off, parent_goid_off }, word(goid_off, 0), word(parent_goid_off, 8)];
            (off.clone(), CapturePlan { ops, ..CapturePlan::default() })
        }
        Probe::Inject => {
            let write_fn = write_fn.ok_or("bufio.(*Writer).Write")?;
            let buf_off = need(offsets, "bufio.Writer.buf")?;
            let n_off = need(offsets, "bufio.Writer.n")?;
            let op = Op::InjectTraceparent { map: RAX, itab: RBX, data: RCX, write_fn, buf_off, n_off, dest: 0 };
            // Only maps of requests with a client span (not server responses) are worth a record.
            let guard = Some(Guard::InRequests { key: RAX });
            (CapturePlan { ops: vec![op], guard, ..CapturePlan::default() }, off)
        }
    })
}

/// Bytes of a header line kept (user agents are long; the rest is cut).
pub const HEADER_LINE_MAX: u16 = 256;
/// Bytes of an HTTP/2 field name kept (the names wanted are shorter).
pub const H2_NAME_MAX: u16 = 16;
const ROUTE_MAX: u16 = 128;

/// What events add to a server span before it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// The first final status the handler wrote (net/http ignores later ones).
    pub status: Option<u16>,
    /// The mux pattern that matched (the last one, for nested muxes).
    pub route: Option<String>,
    /// The handler panicked: the span ended at net/http's recover.
    pub panicked: bool,
    pub user_agent: Option<String>,
    pub tracestate: Option<String>,
}

/// Span ids as the trampoline made them.
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

/// A value a span probe read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Missing,
    Word(u64),
    /// The bytes copied and whether the string was longer.
    Str(String, bool),
}

/// The values of a span probe's record.
pub fn reads(probe: Probe, ret: bool, data: &[u8]) -> Vec<(Val, Read)> {
    dests(probe, ret)
        .map(|(sp, dest)| {
            let (val, fetch, at) = (sp.val, sp.fetch, dest as usize);
            let Some(word) = data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())) else {
                return (val, Read::Missing);
            };
            let read = match fetch {
                Fetch::Word => Read::Word(word),
                Fetch::Str { max } => {
                    let n = (word as usize).min(max as usize);
                    match data.get(at + 8..at + 8 + n) {
                        Some(b) => Read::Str(String::from_utf8_lossy(b).into_owned(), word > u64::from(max)),
                        None => Read::Missing,
                    }
                }
            };
            (val, read)
        })
        .collect()
}

/// `Key: value` of a header line, the key lowercased.
pub fn header_line(line: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(line).ok()?;
    let (k, v) = s.split_once(':')?;
    Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
}

/// `http.route` from a mux pattern: Go 1.22 patterns may start with a method and a host
/// (`GET example.com/items/{id}`); the route is the path.
pub fn route(pattern: &str) -> Option<String> {
    let p = pattern.trim();
    let p = p.split_once(' ').map_or(p, |(_, rest)| rest.trim_start());
    let path = &p[p.find('/')?..];
    Some(path.to_string())
}

/// `url.query` on server spans is opt-in (`--http-query`): queries often carry secrets.
pub static QUERY_ON_SERVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A span's kind, name, attributes and error, ready for any output.
#[derive(Debug, Clone)]
pub struct Described {
    pub server: bool,
    pub name: String,
    pub attrs: Vec<(&'static str, Attr)>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    S(String),
    I(i64),
}

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"];

fn text(reads: &[(Val, Read)], val: Val) -> Option<&str> {
    reads.iter().find(|(v, _)| *v == val).and_then(|(_, r)| match r {
        Read::Str(s, _) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    })
}

fn word(reads: &[(Val, Read)], val: Val) -> Option<u64> {
    reads.iter().find(|(v, _)| *v == val).and_then(|(_, r)| if let Read::Word(w) = r { Some(*w) } else { None })
}

/// `host:port`, `[v6]:port` or a bare host.
fn split_host_port(s: &str) -> (String, Option<i64>) {
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

/// "HTTP/1.1" → "1.1", "HTTP/2.0" → "2".
fn protocol_version(proto: &str) -> Option<String> {
    let v = proto.strip_prefix("HTTP/")?;
    Some(v.strip_suffix(".0").filter(|m| *m != "1").unwrap_or(v).to_string())
}

/// Names and attributes an HTTP span by the semantic conventions. `type_name` names the
/// dynamic type of an error result from its itab.
pub fn describe(
    probe: Probe,
    entry: &[u8],
    ret: Option<(&[u8], [u64; 3])>,
    notes: Option<&Notes>,
    type_name: &mut dyn FnMut(u64) -> Option<String>,
) -> Described {
    let er = reads(probe, false, entry);
    let mut attrs: Vec<(&'static str, Attr)> = Vec::with_capacity(14);
    let method = text(&er, Val::Method).unwrap_or("GET");
    let known = METHODS.contains(&method);
    attrs.push(("http.request.method", Attr::S(if known { method } else { "_OTHER" }.to_string())));
    if !known {
        attrs.push(("http.request.method_original", Attr::S(method.to_string())));
    }
    let name_method = if known { method } else { "HTTP" };
    let mut error = None;
    if probe == Probe::Server {
        let scheme = if word(&er, Val::Tls).unwrap_or(0) != 0 { "https" } else { "http" };
        attrs.push(("url.scheme", Attr::S(scheme.into())));
        if let Some(p) = text(&er, Val::Path) {
            attrs.push(("url.path", Attr::S(p.to_string())));
        }
        if QUERY_ON_SERVER.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(q) = text(&er, Val::Query)
        {
            attrs.push(("url.query", Attr::S(q.to_string())));
        }
        if let Some(h) = text(&er, Val::Host) {
            let (host, port) = split_host_port(h);
            attrs.push(("server.address", Attr::S(host)));
            let port = port.or(Some(if scheme == "https" { 443 } else { 80 }));
            attrs.extend(port.map(|p| ("server.port", Attr::I(p))));
        }
        if let Some(r) = text(&er, Val::Remote) {
            let (host, port) = split_host_port(r);
            attrs.push(("client.address", Attr::S(host)));
            attrs.extend(port.map(|p| ("client.port", Attr::I(p))));
        }
        if let Some(v) = text(&er, Val::Proto).and_then(protocol_version) {
            attrs.push(("network.protocol.version", Attr::S(v)));
        }
        let notes = notes.cloned().unwrap_or_default();
        if let Some(ua) = notes.user_agent {
            attrs.push(("user_agent.original", Attr::S(ua)));
        }
        let route = notes.route.clone();
        if let Some(r) = &route {
            attrs.push(("http.route", Attr::S(r.clone())));
        }
        // A handler that wrote nothing answers 200 when it returns; one that panicked
        // sent whatever it wrote before (HTTP/1 then drops the connection).
        let status = notes.status.or((!notes.panicked && ret.is_some()).then_some(200));
        if let Some(code) = status {
            attrs.push(("http.response.status_code", Attr::I(i64::from(code))));
            if code >= 500 {
                attrs.push(("error.type", Attr::S(code.to_string())));
                error = Some(String::new());
            }
        }
        if notes.panicked {
            attrs.retain(|(k, _)| *k != "error.type");
            attrs.push(("error.type", Attr::S("panic".into())));
            error = Some("the handler panicked".into());
        }
        let name = match route {
            Some(r) => format!("{name_method} {r}"),
            None => name_method.to_string(),
        };
        return Described { server: true, name, attrs, error };
    }
    // Client.
    let scheme = text(&er, Val::Scheme).unwrap_or("http");
    let url_host = text(&er, Val::UrlHost).unwrap_or("");
    let host = text(&er, Val::Host).unwrap_or(url_host);
    let path = text(&er, Val::Path).unwrap_or("");
    let mut full = format!("{scheme}://{url_host}{path}");
    if let Some(q) = text(&er, Val::Query) {
        full.push('?');
        full.push_str(q);
    }
    attrs.push(("url.full", Attr::S(full)));
    let (addr, port) = split_host_port(host);
    attrs.push(("server.address", Attr::S(addr)));
    let port = port.or(match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    });
    attrs.extend(port.map(|p| ("server.port", Attr::I(p))));
    if let Some((data, regs)) = ret {
        let rr = reads(probe, true, data);
        if regs[1] != 0 {
            let ty = type_name(regs[1]).unwrap_or_else(|| "error".into());
            attrs.push(("error.type", Attr::S(ty.clone())));
            error = Some(format!("transport error ({ty})"));
        } else if regs[0] != 0 {
            if let Some(code) = word(&rr, Val::Status) {
                attrs.push(("http.response.status_code", Attr::I(code as i64)));
                if code >= 400 {
                    attrs.push(("error.type", Attr::S(code.to_string())));
                    error = Some(String::new());
                }
            }
            if let Some(v) = text(&rr, Val::Proto).and_then(protocol_version) {
                attrs.push(("network.protocol.version", Attr::S(v)));
            }
        }
    }
    Described { server: false, name: name_method.to_string(), attrs, error }
}
