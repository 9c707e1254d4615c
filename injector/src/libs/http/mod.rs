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
//! - each new goroutine inherits its creator's active context (`super::goroutines`);
//! - `(*Transport).roundTrip` makes the client span a child of the active context and
//!   files it under the request's header map;
//! - `Header.writeSubset` for that map appends a `traceparent` line to the connection's
//!   `bufio.Writer`, when it has room, before the request's own headers;
//! - over HTTP/2, `encodeAndWriteHeaders` hands that span to the goroutine, and the
//!   framer's `endWrite` appends a `traceparent` field to the header block (as for gRPC,
//!   `super::grpc`).
//!
//! Records carry the ids the target made, so the spans exported are the ones on the wire.

mod describe;
mod events;
mod plan;

use super::{Described, LibState, Library, Notes, PlanCx, Planned};
use crate::ring::Record;

pub use describe::{header_line, route};

/// What each net/http probe is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
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
    /// Request headers are written (entry of `Header.writeSubset`).
    Inject,
    /// An HTTP/2 header field decoded (the HPACK decoder's emit closure).
    H2Field,
    /// An HTTP/2 headers frame read (return of `readMetaFrame`) on the connection's reader.
    H2Frame,
    /// The serve loop takes a headers frame (`processHeaders`) and starts its handler.
    H2Process,
    /// An HTTP/2 client stream's headers are encoded and written (`encodeAndWriteHeaders`):
    /// the request's client span is the one the goroutine's next headers frame carries.
    H2Encode,
    /// The HTTP/2 framer finishes a frame (`endWrite`): a request's header block gets its
    /// `traceparent` field.
    H2Write,
    /// The HPACK encoder writes a request header field (`WriteField`): the application's
    /// own `traceparent` makes inject's stand down.
    H2Own,
}

impl Probe {
    const ALL: [Probe; 13] = [
        Probe::Server,
        Probe::Client,
        Probe::HeaderLine,
        Probe::Status,
        Probe::Route,
        Probe::Unwind,
        Probe::Inject,
        Probe::H2Field,
        Probe::H2Frame,
        Probe::H2Process,
        Probe::H2Encode,
        Probe::H2Write,
        Probe::H2Own,
    ];

    pub fn is_span(self) -> bool {
        matches!(self, Probe::Server | Probe::Client)
    }

    pub(super) fn from_u8(p: u8) -> Option<Probe> {
        Probe::ALL.get(usize::from(p)).copied()
    }
}

/// net/http, server and client, HTTP/1 and HTTP/2.
pub struct NetHttp;

impl Library for NetHttp {
    fn name(&self) -> &'static str {
        "net/http"
    }

    /// Named like OpenTelemetry Go's own net/http instrumentation.
    fn scope(&self) -> &'static str {
        "inject/net/http"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        plan::plan(cx)
    }

    fn is_span(&self, probe: u8) -> bool {
        Probe::from_u8(probe).is_some_and(Probe::is_span)
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(events::HttpState::default())
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        let probe = Probe::from_u8(probe).unwrap_or(Probe::Client);
        let ret = ret.map(|r| (&r.data[..], [r.ints[0], r.ints[1], r.ints[2]]));
        Some(describe::describe(probe, &entry.data, ret, notes, type_name))
    }
}

/// Bytes of a header line kept (user agents are long; the rest is cut).
pub(crate) const HEADER_LINE_MAX: u16 = 256;
/// Bytes of an HTTP/2 field name kept (the names wanted are shorter).
pub(crate) const H2_NAME_MAX: u16 = 16;
pub(crate) const ROUTE_MAX: u16 = 128;

/// `url.query` on server spans is opt-in (`--http-query`): queries often carry secrets.
pub static QUERY_ON_SERVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
