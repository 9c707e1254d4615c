//! google.golang.org/grpc without code changes: a SERVER span per RPC the server handles
//! (unary or stream, open to close) and a CLIENT span per call (unary, or a stream from
//! `NewStream` until it finishes), following the
//! OpenTelemetry RPC semantic conventions as OpenTelemetry Go's own gRPC instrumentation
//! (otelgrpc) emits them, with W3C trace context in and out over HTTP/2.
//!
//! grpc-go has its own HTTP/2 transport on golang.org/x/net/http2, so context moves on its
//! paths, in the trampolines:
//! - in: the HPACK decoder's emit closure sees each header field on the connection's
//!   reader goroutine; a `traceparent` becomes its pending context, which the headers
//!   frame carries to `operateHeaders`, whose handler goroutine inherits it
//!   (`super::goroutines`), and `handleStream` continues it in the server span;
//! - out: `Invoke` starts the client span on the caller's goroutine; the transport queues
//!   the stream's header item (`executeAndPut`), and the span goes with it to the loopy
//!   writer goroutine (`headerHandler` / `clientHeaderHandler`), which appends the
//!   `traceparent` field to the HEADERS frame as the framer finishes it (`endWrite`);
//!   see `docs/grpc.md` for why that cannot corrupt a request.

mod describe;
mod events;
mod plan;

use super::{Described, LibState, Library, Notes, PlanCx, Planned};
use crate::ring::Record;

/// Notes a server span carries until it is described (not attributes themselves).
pub(super) const CODE: &str = "grpc.code";
pub(super) const MESSAGE: &str = "grpc.message";

/// What each gRPC probe is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Probe {
    /// `(*Server).handleStream`: the server span of one RPC.
    Server,
    /// `(*ClientConn).Invoke`: the client span of a unary call.
    Client,
    /// The status the server writes (`(*http2Server).WriteStatus` / `writeStatus`).
    Status,
    /// An HTTP/2 header field decoded (x/net's HPACK emit closure).
    H2Field,
    /// An HTTP/2 headers frame read (return of x/net's `readMetaFrame`).
    H2Frame,
    /// The server transport takes a headers frame and starts the stream's handler.
    Headers,
    /// The client transport queues an item for its writer (`executeAndPut`).
    Queue,
    /// The writer goroutine takes a client stream's headers.
    Writer,
    /// x/net's framer finishes a frame (`endWrite`).
    FrameWrite,
    /// `(*ClientConn).NewStream`: the client span of a stream, open until it finishes.
    Stream,
    /// A client stream finishes (`(*clientStream).finish`): its span ends.
    Finish,
    /// x/net's HPACK encoder writes a header field (`WriteField`): the application's own
    /// `traceparent` makes inject's stand down.
    Encode,
}

impl Probe {
    const ALL: [Probe; 12] = [
        Probe::Server,
        Probe::Client,
        Probe::Status,
        Probe::H2Field,
        Probe::H2Frame,
        Probe::Headers,
        Probe::Queue,
        Probe::Writer,
        Probe::FrameWrite,
        Probe::Stream,
        Probe::Finish,
        Probe::Encode,
    ];

    pub(super) fn from_u8(p: u8) -> Option<Probe> {
        Probe::ALL.get(usize::from(p)).copied()
    }
}

/// grpc-go, server and client.
pub struct Grpc;

impl Library for Grpc {
    fn name(&self) -> &'static str {
        "grpc"
    }

    fn scope(&self) -> &'static str {
        "inject/google.golang.org/grpc"
    }

    fn plan(&self, cx: &PlanCx<'_>) -> Planned {
        plan::plan(cx)
    }

    fn is_span(&self, probe: u8) -> bool {
        matches!(Probe::from_u8(probe), Some(Probe::Server | Probe::Client | Probe::Stream))
    }

    fn state(&self) -> Box<dyn LibState> {
        Box::new(events::GrpcState::default())
    }

    fn describe(
        &self,
        probe: u8,
        entry: &Record,
        ret: Option<&Record>,
        notes: Option<&Notes>,
        _type_name: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Option<Described> {
        let probe = Probe::from_u8(probe).unwrap_or(Probe::Client);
        Some(describe::describe(probe, entry, ret, notes))
    }
}
