//! What gRPC's event probes tell the collector: the status a server wrote, on its way to
//! the handler's span; `tracestate` from the request's headers, from the connection's
//! reader through the headers frame and `operateHeaders` to the handler's goroutine; and
//! the outcome of each `traceparent` the writer appended.

use std::collections::HashMap;

use ring_abi::Kind;

use super::describe::{string, word};
use super::plan::{H2_NAME_MAX, at};
use super::{CODE, MESSAGE, Probe};
use crate::libs::{Attr, LibProbe, LibState, Notes, OpenSpans};
use crate::ring::Record;

/// Entries kept in each side table before it is forgotten: goroutines end without telling us.
const SIDE_TABLE_MAX: usize = 1 << 16;

#[derive(Default)]
pub(super) struct GrpcState {
    /// tracestate read on each goroutine (the connection's reader), for the headers frame.
    headers: HashMap<u64, Notes>,
    /// By headers frame, then on the goroutine running `operateHeaders`, then on the
    /// handler's goroutine it starts.
    frames: HashMap<u64, Notes>,
    serving: HashMap<u64, Notes>,
    handlers: HashMap<u64, Notes>,
    /// `traceparent` fields appended to outgoing HEADERS frames, and ones left out for
    /// want of room in the framer's buffer.
    injected: u64,
    no_room: u64,
    /// Outgoing client spans that stood down for the application's own `traceparent`.
    stood_down: u64,
    tracestate: crate::libs::TracestateOut,
}

fn insert(map: &mut HashMap<u64, Notes>, k: u64, n: Notes) {
    if map.len() >= SIDE_TABLE_MAX {
        map.clear();
    }
    map.insert(k, n);
}

impl LibState for GrpcState {
    fn span_start(&mut self, probe: u8, rec: &Record) -> Option<Notes> {
        (probe == Probe::Server as u8).then(|| self.handlers.remove(&rec.goid).unwrap_or_default())
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        let goid = rec.goid;
        let server = LibProbe { probe: Probe::Server as u8, ..probe };
        let Some(p) = Probe::from_u8(probe.probe) else { return };
        match p {
            Probe::Status => {
                let Some(n) = spans.notes(goid, server) else { return };
                // Code is an int32: the word's upper half is padding.
                n.set(CODE, Attr::I(i64::from(word(&rec.data, at::CODE).unwrap_or(0) as u32)));
                if let Some(m) = string(&rec.data, at::MESSAGE, at::MESSAGE_MAX) {
                    n.set(MESSAGE, Attr::S(m));
                }
            }
            Probe::H2Field => {
                let name_max = usize::from(H2_NAME_MAX);
                let n = (rec.ints[1] as usize).min(name_max).min(rec.data.len());
                if &rec.data[..n] != b"tracestate" {
                    return;
                }
                let v = (rec.ints[3] as usize).min(rec.data.len().saturating_sub(name_max));
                // Cut short by the record, it could name another vendor's state.
                if v as u64 != rec.ints[3] {
                    return;
                }
                let value = String::from_utf8_lossy(&rec.data[name_max..name_max + v]).into_owned();
                let notes = Notes { trace_state: Some(value), ..Notes::default() };
                insert(&mut self.headers, goid, notes);
            }
            Probe::H2Frame => {
                if let Some(n) = self.headers.remove(&goid) {
                    // The frame: RBX (x/net's Frame interface) or RAX (a pointer), the
                    // one register recorded.
                    let key = if rec.ints[1] != 0 { rec.ints[1] } else { rec.ints[0] };
                    insert(&mut self.frames, key, n);
                }
            }
            Probe::Headers => match rec.kind {
                Kind::Entry => {
                    if let Some(n) = self.frames.remove(&rec.ints[3]) {
                        insert(&mut self.serving, goid, n);
                    }
                }
                Kind::Return => {
                    self.serving.remove(&goid);
                }
            },
            // 1: appended, 2: no room, 3 (at the entry): left to the return.
            Probe::FrameWrite => match rec.data.first() {
                Some(1) => {
                    self.injected += 1;
                    self.tracestate.count(&rec);
                }
                Some(2) => self.no_room += 1,
                _ => {}
            },
            // The stream's client span, kept open since NewStream returned, ends here.
            Probe::Finish => {
                spans.release(probe.lib, rec.ints[0], rec);
            }
            Probe::Encode => {
                if rec.data.first() == Some(&1) {
                    self.stood_down += 1;
                }
            }
            Probe::Server | Probe::Client | Probe::Stream | Probe::Queue | Probe::Writer => {}
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("grpc_injected", self.injected),
            ("grpc_inject_no_room", self.no_room),
            ("grpc_app_traceparent", self.stood_down),
            ("grpc_tracestate_injected", self.tracestate.written),
            ("grpc_tracestate_no_room", self.tracestate.no_room),
        ]
    }

    /// A stream NewStream opened (no error) stays open until its `finish`, keyed by the
    /// `*clientStream` that finish gets as its receiver: the stream returned (RBX), or the
    /// one inside the `clientStreamWrapper` grpc-go v1.8x returns.
    fn hold(&mut self, probe: u8, ret: &Record) -> Option<u64> {
        if probe != Probe::Stream as u8 || ret.ints[2] != 0 {
            return None;
        }
        let a = usize::from(at::STREAM_KEY);
        let inner = ret.data.get(a..a + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        Some(if inner != 0 { inner } else { ret.ints[1] }).filter(|k| *k != 0)
    }

    fn spawned(&mut self, child: u64, parent: u64) {
        if let Some(n) = self.serving.get(&parent) {
            let n = n.clone();
            insert(&mut self.handlers, child, n);
        }
    }
}
