//! Which net/http functions are probed in a binary, and what each probe captures.

use go_abi::Func;
use ring_abi::span_ids;
use trampolines::codegen::{AfterWrite, ByteCopy, CapturePlan, Fetch, FieldCopy, Guard, Op};

use super::{H2_NAME_MAX, HEADER_LINE_MAX, Probe, ROUTE_MAX};
use crate::libs::reg::{RAX, RBX, RCX, RDI};
use crate::libs::{LibProbe, PlanCx, Planned};
use crate::plan::Role;

/// A value a span probe reads through the request (or response) pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Val {
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

pub(super) struct Spec {
    pub(super) val: Val,
    /// Reached through `Request.URL`.
    via_url: bool,
    field: &'static str,
    pub(super) fetch: Fetch,
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
pub(super) fn dests(probe: Probe, ret: bool) -> impl Iterator<Item = (&'static Spec, u16)> {
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
    (Probe::Inject, "net/http.Header.writeSubset"),
    (Probe::H2Field, "net/http.(*http2Framer).readMetaFrame.func1"),
    (Probe::H2Field, "net/http/internal/http2.(*Framer).readMetaFrame.func1"),
    (Probe::H2Frame, "net/http.(*http2Framer).readMetaFrame"),
    (Probe::H2Frame, "net/http/internal/http2.(*Framer).readMetaFrame"),
    (Probe::H2Process, "net/http.(*http2serverConn).processHeaders"),
    (Probe::H2Process, "net/http/internal/http2.(*serverConn).processHeaders"),
    (Probe::H2Encode, "net/http.(*http2clientStream).encodeAndWriteHeaders"),
    (Probe::H2Encode, "net/http/internal/http2.(*clientStream).encodeAndWriteHeaders"),
    (Probe::H2Write, "net/http.(*http2Framer).endWrite"),
    (Probe::H2Write, "net/http/internal/http2.(*Framer).endWrite"),
    (Probe::H2Own, "vendor/golang.org/x/net/http2/hpack.(*Encoder).WriteField"),
];

/// Whether the binary has a net/http server or client to instrument.
fn linked(funcs: &[Func<'_>]) -> bool {
    funcs.iter().any(|f| f.name == "net/http.serverHandler.ServeHTTP" || f.name == "net/http.(*Transport).roundTrip")
}

/// Plans the net/http probes (none when the binary has neither a server nor a client).
pub(super) fn plan(cx: &PlanCx<'_>) -> Planned {
    if !linked(cx.funcs) {
        return Planned::default();
    }
    let mut offsets = Offsets(go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release));
    let write_fn = cx.funcs.iter().find(|f| f.name == "bufio.(*Writer).Write").map(|f| f.entry + cx.bias);
    let bufio_itab = cx.bin.itab("*bufio.Writer", "io.Writer").map(|a| a + cx.bias);
    // Go 1.27 moved HTTP/2 into net/http/internal/http2.
    let internal = cx.funcs.iter().any(|f| f.name.starts_with("net/http/internal/http2."));
    let h2 = H2 { bufio_itab, internal };
    let candidates: Vec<(u8, &str)> = CANDIDATES.iter().map(|&(p, n)| (p as u8, n)).collect();
    let mut out = crate::libs::plan_candidates(cx, &candidates, |p| {
        let probe = Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))?;
        plans(probe, &mut offsets, write_fn, &h2)
    });
    let span = |s: &crate::plan::ProbeSite| matches!(s.role, Role::Lib(LibProbe { probe, .. }) if probe == Probe::Server as u8 || probe == Probe::Client as u8);
    if !out.sites.iter().any(span) {
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
            Ok(Op::Field(FieldCopy { reg, path, off, fetch: sp.fetch, dest, when: Vec::new(), keep_on_miss: false }))
        })
        .collect::<Result<Vec<Op>, &str>>()
        .map_err(str::to_string)
}

/// What the HTTP/2 client's probes need.
struct H2 {
    /// The itab of `*bufio.Writer` as an `io.Writer`: the framer's writer.
    bufio_itab: Option<u64>,
    /// HTTP/2 lives in net/http/internal/http2 (Go 1.27 on).
    internal: bool,
}

/// The entry and return capture plans of a probe.
fn plans(
    probe: Probe,
    offsets: &mut Offsets<'_>,
    write_fn: Option<u64>,
    h2: &H2,
) -> Result<(CapturePlan, CapturePlan), String> {
    let off = CapturePlan { off: true, ..CapturePlan::default() };
    let need = |offsets: &mut Offsets<'_>, key: &str| offsets.get(key).ok_or_else(|| key.to_string());
    Ok(match probe {
        Probe::Server => {
            let mut ops = vec![Op::AdoptTracestate, Op::ServerBegin { dest: 0 }];
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
            let guard = Some(Guard::FirstByte { ptr: RAX, len: RBX, min_len: 12, first: b"tu".to_vec() });
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
            // traceparent, tracestate, user-agent (10 bytes or more: not `te`): the collector
            // keeps the last two.
            let guard = Some(Guard::FirstByte { ptr: RAX, len: RBX, min_len: 10, first: b"tu".to_vec() });
            let copies = vec![
                ByteCopy { ptr: RAX, len: RBX, max: H2_NAME_MAX, dest: 0 },
                ByteCopy { ptr: RCX, len: RDI, max: HEADER_LINE_MAX, dest: H2_NAME_MAX },
            ];
            (CapturePlan { ints: 0b1111, copies, ops: vec![op], guard, ..CapturePlan::default() }, off)
        }
        Probe::H2Frame => {
            let ops = vec![Op::AdoptTracestate, Op::PendingToRequest { key: RBX }];
            (off.clone(), CapturePlan { ops, ..CapturePlan::default() })
        }
        Probe::H2Process => (
            CapturePlan { ops: vec![Op::PendingFromRequest { key: RBX }], ..CapturePlan::default() },
            CapturePlan { ops: vec![Op::ClearPending], ..CapturePlan::default() },
        ),
        // encodeAndWriteHeaders(req): the request (1.27: its ClientRequest copy, with the
        // same header map) in RBX.
        Probe::H2Encode => {
            let header =
                if h2.internal { "net/http/internal/http2.ClientRequest.Header" } else { "net/http.Request.Header" };
            let deref = Some(need(offsets, header)?);
            (CapturePlan { ops: vec![Op::OutgoingFromRequest { key: RBX, deref }], ..CapturePlan::default() }, off)
        }
        // (f *Framer) endWrite(): the frame is f.wbuf, written to f.w, the connection's
        // *bufio.Writer (where the field goes after the frame when wbuf has no room).
        Probe::H2Write => {
            let framer = if h2.internal { "net/http/internal/http2.Framer" } else { "net/http.http2Framer" };
            let wbuf_off = need(offsets, &format!("{framer}.wbuf"))?;
            let after = match h2.bufio_itab {
                Some(itab) => Some(AfterWrite {
                    w_off: need(offsets, &format!("{framer}.w"))?,
                    itab,
                    buf_off: need(offsets, "bufio.Writer.buf")?,
                    buf_indirect: false,
                    fill_off: need(offsets, "bufio.Writer.n")?,
                }),
                None => None,
            };
            crate::libs::h2_inject_plans(wbuf_off, after)
        }
        Probe::H2Own => crate::libs::h2_stand_down_plans(),
        Probe::Inject => {
            let write_fn = write_fn.ok_or("bufio.(*Writer).Write")?;
            let buf_off = need(offsets, "bufio.Writer.buf")?;
            let n_off = need(offsets, "bufio.Writer.n")?;
            let op = Op::InjectTraceparent { map: RAX, itab: RBX, data: RCX, write_fn, buf_off, n_off, dest: 0 };
            // Only maps of requests with a client span (not server responses) are worth a record.
            let guard = Some(Guard::InRequests { key: RAX });
            // The return: only after a line went in, taken back out if the application's
            // own header lines had a traceparent.
            let undo = Op::UndoOwnTraceparent { buf_off, n_off, dest: 0 };
            let ret_guard = Some(Guard::Tagged { bit: ring_abi::ctx::LINE_TAG_BIT });
            (
                CapturePlan { ops: vec![op], guard, ..CapturePlan::default() },
                CapturePlan { ops: vec![undo], guard: ret_guard, ..CapturePlan::default() },
            )
        }
    })
}
