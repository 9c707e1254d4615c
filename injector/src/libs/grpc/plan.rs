//! Which grpc-go functions are probed in a binary, and what each probe captures. Register
//! positions follow the signatures of grpc-go v1.60 to v1.85 (the releases supported);
//! struct offsets come from the binary's DWARF, else from go-abi's table for its grpc-go
//! and x/net versions.

use ring_abi::{ctx, span_ids};
use trampolines::codegen::{AfterWrite, ByteCopy, CapturePlan, Fetch, Guard, Op, When};

use super::Probe;
use crate::libs::reg::{R8, RAX, RBX, RCX, RDI, RSI};
use crate::libs::{PlanCx, Planned, field, module_version, semver};

/// The grpc-go releases whose signatures the probes follow: [from, until).
pub(super) const SUPPORTED: ((u32, u32, u32), (u32, u32, u32)) = ((1, 60, 0), (1, 86, 0));

/// Where a span probe's values land in its records (the collector decodes with these).
pub(super) mod at {
    use super::span_ids;
    pub const METHOD_MAX: u16 = 128;
    pub const TARGET_MAX: u16 = 100;
    pub const MESSAGE_MAX: u16 = 128;
    pub const IP_MAX: u16 = 16;
    /// Server entry: the method (length, bytes), the local IP (length, bytes), the port.
    pub const SERVER_METHOD: u16 = span_ids::LEN as u16;
    pub const SERVER_IP: u16 = SERVER_METHOD + 8 + METHOD_MAX;
    pub const SERVER_PORT: u16 = SERVER_IP + 8 + IP_MAX;
    /// Client entry (Invoke and NewStream): the method's bytes (its length is an argument
    /// register's), the target.
    pub const CLIENT_METHOD: u16 = span_ids::LEN as u16;
    pub const CLIENT_TARGET: u16 = CLIENT_METHOD + METHOD_MAX;
    /// Client return and status events: the code (0 when not read), the message.
    pub const CODE: u16 = 0;
    pub const MESSAGE: u16 = 8;
    /// The client's return: whether the error was a gRPC status (its itab matched).
    pub const IS_STATUS: u16 = MESSAGE + 8 + MESSAGE_MAX;
    /// NewStream's return: the `*clientStream` inside the `clientStreamWrapper` it returns.
    pub const STREAM_KEY: u16 = IS_STATUS + 8;
    /// finish: the text of an `*errors.errorString` error (`EOF`: io.EOF, a success).
    pub const ERROR_TEXT: u16 = IS_STATUS + 8;
    pub const ERROR_TEXT_MAX: u16 = 8;
}

const CANDIDATES: &[(Probe, &str)] = &[
    (Probe::Server, "google.golang.org/grpc.(*Server).handleStream"),
    (Probe::Client, "google.golang.org/grpc.(*ClientConn).Invoke"),
    // Exported before v1.69, unexported since.
    (Probe::Status, "google.golang.org/grpc/internal/transport.(*http2Server).WriteStatus"),
    (Probe::Status, "google.golang.org/grpc/internal/transport.(*http2Server).writeStatus"),
    (Probe::H2Field, "golang.org/x/net/http2.(*Framer).readMetaFrame.func1"),
    (Probe::H2Frame, "golang.org/x/net/http2.(*Framer).readMetaFrame"),
    (Probe::Headers, "google.golang.org/grpc/internal/transport.(*http2Server).operateHeaders"),
    (Probe::Queue, "google.golang.org/grpc/internal/transport.(*controlBuffer).executeAndPut"),
    // headerFrame until v1.82.1 split it into client and server headers.
    (Probe::Writer, "google.golang.org/grpc/internal/transport.(*loopyWriter).headerHandler"),
    (Probe::Writer, "google.golang.org/grpc/internal/transport.(*loopyWriter).clientHeaderHandler"),
    (Probe::FrameWrite, "golang.org/x/net/http2.(*Framer).endWrite"),
    (Probe::Stream, "google.golang.org/grpc.(*ClientConn).NewStream"),
    (Probe::Finish, "google.golang.org/grpc.(*clientStream).finish"),
    (Probe::Encode, "golang.org/x/net/http2/hpack.(*Encoder).WriteField"),
];

const TRANSPORT: &str = "google.golang.org/grpc/internal/transport";

/// What the plans depend on in this binary.
struct Build<'o, 'd> {
    offsets: &'o mut go_abi::runtime::FieldOffsets<'d>,
    grpc: (u32, u32, u32),
    /// x/net's `readMetaFrame` returns `Frame` (an interface) from v0.25.0, the
    /// `*MetaHeadersFrame` before.
    frame_iface: bool,
    status_itab: Option<u64>,
    http2_server_itab: Option<u64>,
    tcp_addr_itab: Option<u64>,
    wrapper_itab: Option<u64>,
    buf_writer_itab: Option<u64>,
    error_string_itab: Option<u64>,
}

impl Build<'_, '_> {
    fn get(&mut self, key: &str) -> Result<i32, String> {
        self.offsets.get(key).and_then(|o| i32::try_from(o).ok()).ok_or_else(|| key.to_string())
    }

    /// `ServerStream.Stream.method`'s place: through `*Stream` (v1.69 to v1.76), inside an
    /// embedded `Stream` (v1.77 on), or `Stream.method` itself (before v1.69).
    fn method_path(&mut self) -> Result<(Vec<i32>, i32), String> {
        let method = self.get(&format!("{TRANSPORT}.Stream.method"));
        if self.grpc < (1, 69, 0) {
            return Ok((Vec::new(), method?));
        }
        let embed = self.get(&format!("{TRANSPORT}.ServerStream.Stream"));
        if self.grpc < (1, 77, 0) {
            return Ok((vec![embed?], method?));
        }
        match (embed, method) {
            (Ok(e), Ok(m)) => Ok((Vec::new(), e + m)),
            // The table keys the embedded field's offset in one.
            _ => Ok((Vec::new(), self.get(&format!("{TRANSPORT}.ServerStream.Stream.method"))?)),
        }
    }
}

fn linked(funcs: &[go_abi::Func<'_>]) -> bool {
    funcs.iter().any(|f| f.name == CANDIDATES[0].1 || f.name == CANDIDATES[1].1)
}

/// Plans the gRPC probes (none when the binary has neither a gRPC server nor a client, or
/// a grpc-go release the probes do not know).
pub(super) fn plan(cx: &PlanCx<'_>) -> Planned {
    if !linked(cx.funcs) {
        return Planned::default();
    }
    let version = module_version(cx.bin, "google.golang.org/grpc");
    let Some(grpc) = version.and_then(semver).filter(|v| (SUPPORTED.0..SUPPORTED.1).contains(v)) else {
        let (a, b) = SUPPORTED;
        eprintln!(
            "inject: warning: grpc-go {} is not one inject knows (v{}.{} to v{}.{}): its spans are off; --func still works",
            version.unwrap_or("(version unknown)"),
            a.0,
            a.1,
            b.0,
            b.1 - 1
        );
        return Planned::default();
    };
    let frame_iface = module_version(cx.bin, "golang.org/x/net").and_then(semver).is_none_or(|v| v >= (0, 25, 0));
    let mut offsets =
        go_abi::runtime::FieldOffsets::new(cx.ctx.dwarf.as_ref(), cx.release).with_modules(&cx.bin.build_info.deps);
    let itab = |c: &str, i: &str| cx.bin.itab(c, i).map(|a| a + cx.bias);
    let mut b = Build {
        offsets: &mut offsets,
        grpc,
        frame_iface,
        status_itab: itab("*google.golang.org/grpc/internal/status.Error", "error"),
        http2_server_itab: itab(&format!("*{TRANSPORT}.http2Server"), &format!("{TRANSPORT}.ServerTransport")),
        tcp_addr_itab: itab("*net.TCPAddr", "net.Addr"),
        wrapper_itab: itab("*google.golang.org/grpc.clientStreamWrapper", "google.golang.org/grpc.ClientStream"),
        buf_writer_itab: itab(&format!("*{TRANSPORT}.bufWriter"), "io.Writer"),
        error_string_itab: itab("*errors.errorString", "error"),
    };
    let candidates: Vec<(u8, &str)> = CANDIDATES.iter().map(|&(p, n)| (p as u8, n)).collect();
    let mut out = crate::libs::plan_candidates(cx, &candidates, |p| {
        let probe = Probe::from_u8(p).ok_or_else(|| format!("probe {p}"))?;
        plans(probe, &mut b)
    });
    let span = |s: &crate::plan::ProbeSite| matches!(s.role, crate::plan::Role::Lib(p) if p.probe <= Probe::Client as u8 || p.probe == Probe::Stream as u8);
    if !out.sites.iter().any(span) {
        out.sites.clear();
    }
    out
}

/// The code and message of a `*status.Status` reached from `reg` through `path`.
fn status_ops(b: &mut Build<'_, '_>, reg: u8, mut path: Vec<i32>, when: Vec<When>) -> Result<Vec<Op>, String> {
    path.push(b.get("google.golang.org/grpc/internal/status.Status.s")?);
    let code = b.get("google.golang.org/genproto/googleapis/rpc/status.Status.Code")?;
    let message = b.get("google.golang.org/genproto/googleapis/rpc/status.Status.Message")?;
    Ok(vec![
        field(reg, path.clone(), code, Fetch::Word, at::CODE, when.clone()),
        field(reg, path, message, Fetch::Str { max: at::MESSAGE_MAX }, at::MESSAGE, when),
    ])
}

/// The status of an `error` in registers `itab` and `data`: its code, message and
/// whether it is a `*status.Error` at all (read only when its itab says so).
fn error_ops(b: &mut Build<'_, '_>, itab: u8, data: u8) -> Result<Vec<Op>, String> {
    let Some(status) = b.status_itab else { return Ok(Vec::new()) };
    let error_s = b.get("google.golang.org/grpc/internal/status.Error.s")?;
    let when = vec![When::reg(itab, status)];
    let mut ops = status_ops(b, data, vec![error_s], when.clone())?;
    ops.push(field(data, Vec::new(), 0, Fetch::Word, at::IS_STATUS, when));
    Ok(ops)
}

/// A client call's entry: its span, the method (bytes from `ptr`, length in `len`) and
/// the `*ClientConn`'s target.
fn client_entry(b: &mut Build<'_, '_>, ptr: u8, len: u8) -> Result<CapturePlan, String> {
    let target = b.get("google.golang.org/grpc.ClientConn.target")?;
    let ops = vec![
        Op::ClientBeginHere { dest: 0 },
        field(RAX, Vec::new(), target, Fetch::Str { max: at::TARGET_MAX }, at::CLIENT_TARGET, Vec::new()),
    ];
    let copies = vec![ByteCopy { ptr, len, max: at::METHOD_MAX, dest: at::CLIENT_METHOD }];
    Ok(CapturePlan { ints: 1 << len, copies, ops, ..CapturePlan::default() })
}

/// The entry and return capture plans of a probe.
fn plans(probe: Probe, b: &mut Build<'_, '_>) -> Result<(CapturePlan, CapturePlan), String> {
    let off = CapturePlan { off: true, ..CapturePlan::default() };
    let plan = |ops: Vec<Op>| CapturePlan { ops, ..CapturePlan::default() };
    Ok(match probe {
        // handleStream(t ServerTransport, stream): t in RBX (itab) and RCX, stream in RDI.
        Probe::Server => {
            let (path, method) = b.method_path()?;
            let mut ops = vec![
                Op::ServerBegin { dest: 0 },
                field(RDI, path, method, Fetch::Str { max: at::METHOD_MAX }, at::SERVER_METHOD, Vec::new()),
            ];
            // server.address and port: the connection's local address, when the transport
            // is the HTTP/2 server's and the address a TCP one (both checked by itab).
            if let (Some(server), Some(tcp)) = (b.http2_server_itab, b.tcp_addr_itab)
                && let (Ok(peer), Ok(local), Ok(ip), Ok(port)) = (
                    b.get(&format!("{TRANSPORT}.http2Server.peer")),
                    b.get("google.golang.org/grpc/peer.Peer.LocalAddr"),
                    b.get("net.TCPAddr.IP"),
                    b.get("net.TCPAddr.Port"),
                )
            {
                let when = vec![When::reg(RBX, server), When::at(RCX, Vec::new(), peer + local, tcp)];
                let addr = vec![peer + local + 8];
                ops.push(field(RCX, addr.clone(), ip, Fetch::Str { max: at::IP_MAX }, at::SERVER_IP, when.clone()));
                ops.push(field(RCX, addr, port, Fetch::Word, at::SERVER_PORT, when));
            }
            (plan(ops), plan(vec![Op::ServerEnd]))
        }
        // Invoke(ctx, method string, args, reply any, opts...): method in RDI and RSI.
        Probe::Client => {
            // The error (RAX itab, RBX data): a *status.Error's code and message.
            let mut ret_ops = vec![Op::ClientEndHere];
            ret_ops.extend(error_ops(b, RAX, RBX)?);
            (client_entry(b, RDI, RSI)?, CapturePlan { ints: 0b11, ops: ret_ops, ..CapturePlan::default() })
        }
        // NewStream(ctx, desc, method string, opts...): method in RSI and R8; returns the
        // stream (RAX, RBX) and an error (RCX, RDI).
        Probe::Stream => {
            let mut ret_ops = vec![Op::ClientEndHere];
            if let (Some(itab), Ok(inner)) =
                (b.wrapper_itab, b.get("google.golang.org/grpc.clientStreamWrapper.ClientStream"))
            {
                // The wrapped stream: the embedded interface's data word.
                ret_ops.push(field(
                    RBX,
                    Vec::new(),
                    inner + 8,
                    Fetch::Word,
                    at::STREAM_KEY,
                    vec![When::reg(RAX, itab)],
                ));
            }
            ret_ops.extend(error_ops(b, RCX, RDI)?);
            (client_entry(b, RSI, R8)?, CapturePlan { ints: 0b1111, ops: ret_ops, ..CapturePlan::default() })
        }
        // (cs *clientStream) finish(err error): the stream in RAX, the error in RBX, RCX.
        Probe::Finish => {
            let mut ops = error_ops(b, RBX, RCX)?;
            if let (Some(itab), Ok(s)) = (b.error_string_itab, b.get("errors.errorString.s")) {
                let text = Fetch::Str { max: at::ERROR_TEXT_MAX };
                ops.push(field(RCX, Vec::new(), s, text, at::ERROR_TEXT, vec![When::reg(RBX, itab)]));
            }
            (CapturePlan { ints: 0b111, ops, ..CapturePlan::default() }, off)
        }
        // (t *http2Server) WriteStatus(s, st *status.Status): st in RCX.
        Probe::Status => (plan(status_ops(b, RCX, Vec::new(), Vec::new())?), off),
        Probe::H2Field => {
            let op = Op::StashTraceparentField { name_ptr: RAX, name_len: RBX, value_ptr: RCX, value_len: RDI };
            // traceparent and tracestate (kept by the trampoline, and by the collector
            // for the span).
            let guard = Some(Guard::FirstByte { ptr: RAX, len: RBX, min_len: 10, first: b"t".to_vec() });
            let copies = vec![
                ByteCopy { ptr: RAX, len: RBX, max: H2_NAME_MAX, dest: 0 },
                ByteCopy { ptr: RCX, len: RDI, max: H2_VALUE_MAX, dest: H2_NAME_MAX },
            ];
            (CapturePlan { ints: 0b1111, copies, ops: vec![op], guard, ..CapturePlan::default() }, off)
        }
        // Only a frame that brought a context (the reader goroutine has it pending)
        // records; likewise operateHeaders, for a frame with one.
        Probe::H2Frame => {
            let key = if b.frame_iface { RBX } else { RAX };
            let ops = vec![Op::AdoptTracestate, Op::PendingToRequest { key }];
            (off, CapturePlan { ints: 1 << key, ops, guard: Some(Guard::Own), ..CapturePlan::default() })
        }
        // operateHeaders(ctx, frame, handle): the frame in RDI.
        Probe::Headers => (
            CapturePlan {
                ints: 1 << RDI,
                ops: vec![Op::PendingFromRequest { key: RDI }],
                guard: Some(Guard::InRequests { key: RDI }),
                ..CapturePlan::default()
            },
            CapturePlan { ops: vec![Op::ClearPending], guard: Some(Guard::Own), ..CapturePlan::default() },
        ),
        // executeAndPut(f, it cbItem): the item's data word in RDI. Only a goroutine with
        // a client span waiting for its headers records (the first item it queues then).
        Probe::Queue => {
            let guard = Some(Guard::Tagged { bit: ctx::CLIENT_TAG_BIT });
            (CapturePlan { ops: vec![Op::ClientToRequest { key: RDI }], guard, ..CapturePlan::default() }, off)
        }
        // headerHandler(h) / clientHeaderHandler(h): the header item in RBX.
        Probe::Writer => {
            let guard = Some(Guard::InRequests { key: RBX });
            let ops = vec![Op::OutgoingFromRequest { key: RBX, deref: None }];
            (CapturePlan { ops, guard, ..CapturePlan::default() }, off)
        }
        // (f *Framer) endWrite(): the frame is f.wbuf, then written to f.w, grpc-go's own
        // bufWriter. Where wbuf has no room for the field, it goes after the frame in the
        // bufWriter's buffer at the return (that buffer is twice the batch it flushes at).
        Probe::FrameWrite => {
            let wbuf_off = b.get("golang.org/x/net/http2.Framer.wbuf")?;
            let after = match b.buf_writer_itab {
                Some(itab) => {
                    // The buffer: a slice before v1.84, a pointer to one (pooled) since.
                    let (buf_off, buf_indirect) = match b.get(&format!("{TRANSPORT}.bufWriter.buf")) {
                        Ok(o) => (o, false),
                        Err(_) => (b.get(&format!("{TRANSPORT}.bufWriter.bufHandle"))?, true),
                    };
                    Some(AfterWrite {
                        w_off: b.get("golang.org/x/net/http2.Framer.w")?,
                        itab,
                        buf_off,
                        buf_indirect,
                        fill_off: b.get(&format!("{TRANSPORT}.bufWriter.offset"))?,
                    })
                }
                None => None,
            };
            crate::libs::h2_inject_plans(wbuf_off, after)
        }
        Probe::Encode => crate::libs::h2_stand_down_plans(),
    })
}

/// Bytes of an HTTP/2 field name and value kept (tracestate is at most 512 by W3C).
pub(super) const H2_NAME_MAX: u16 = 16;
pub(super) const H2_VALUE_MAX: u16 = 256;
