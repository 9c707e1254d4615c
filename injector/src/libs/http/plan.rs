//! Which net/http functions are probed in a binary, and what each probe captures.

use std::collections::HashMap;

use go_abi::Func;
use ring_abi::span_ids;
use trampolines::codegen::{ByteCopy, CapturePlan, Fetch, FieldCopy, Guard, Op};

use super::{H2_NAME_MAX, HEADER_LINE_MAX, Probe, ROUTE_MAX};
use crate::libs::{LibProbe, PlanCx, Planned};
use crate::plan::{self, Role};
use crate::values::Side;

/// Argument registers, in ABI order.
const RAX: u8 = 0;
const RBX: u8 = 1;
const RCX: u8 = 2;
const RDI: u8 = 3;

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
fn linked(funcs: &[Func<'_>]) -> bool {
    funcs.iter().any(|f| f.name == "net/http.serverHandler.ServeHTTP" || f.name == "net/http.(*Transport).roundTrip")
}

/// Plans the net/http probes (none when the binary has neither a server nor a client).
pub(super) fn plan(cx: &PlanCx<'_>) -> Planned {
    let mut out = Planned::default();
    if !linked(cx.funcs) {
        return out;
    }
    let mut offsets = Offsets(go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release));
    let by_name: HashMap<&str, &Func<'_>> = cx.funcs.iter().map(|f| (f.name.as_ref(), f)).collect();
    let write_fn = by_name.get("bufio.(*Writer).Write").map(|f| f.entry + cx.bias);
    let role = |p: Probe| Role::Lib(LibProbe { lib: cx.lib, probe: p as u8 });
    for &(probe, name) in CANDIDATES {
        let Some(f) = by_name.get(name) else { continue };
        let plans = match plans(probe, &mut offsets, write_fn) {
            Ok(p) => p,
            Err(missing) => {
                out.skipped.push(format!("{name}: no offset for {missing} in this Go release"));
                continue;
            }
        };
        let id = cx.first_id + out.sites.len() as u32;
        let mut site = plan::analyse_as(cx.bin, f, id, cx.bias, cx.ctx, role(probe));
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
    if !out.sites.iter().any(|s| s.role == role(Probe::Server) || s.role == role(Probe::Client)) {
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
