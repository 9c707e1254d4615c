//! What net/http's event probes tell the collector: header values on their way to the
//! server span they belong to (HTTP/1 on the reading goroutine; HTTP/2 from the
//! connection's reader through the headers frame and the serve loop to the handler's
//! goroutine), the status and route a handler's span ends with and a handler's panic.

use std::collections::HashMap;

use ring_abi::Kind;

use super::describe::{ROUTE, STATUS, USER_AGENT};
use super::{H2_NAME_MAX, Probe, header_line, route};
use crate::libs::{Attr, LibProbe, LibState, Notes, OpenSpans};
use crate::ring::Record;

/// Entries kept in each side table before it is forgotten: goroutines end without telling us.
const SIDE_TABLE_MAX: usize = 1 << 16;

#[derive(Default)]
pub(super) struct HttpState {
    /// Header values read on each goroutine, for the server span it starts next.
    headers: HashMap<u64, Notes>,
    /// HTTP/2 header values on their way from the connection's reader to the handler's
    /// goroutine: by the address of their headers frame, then on the serve loop that
    /// starts the handler.
    frames: HashMap<u64, Notes>,
    serving: HashMap<u64, Notes>,
    /// `traceparent` lines written into outgoing requests.
    injected: u64,
    /// Server spans ended by a handler's panic.
    panics: u64,
    /// HTTP/2 requests whose header block had no room for a traceparent field.
    no_room: u64,
    /// Requests that carried the application's own `traceparent`, not inject's (HTTP/1:
    /// ours taken back out of the buffer; HTTP/2: ours never appended).
    stood_down: u64,
    /// `tracestate` lines or fields written after a `traceparent`, and those that had no
    /// room.
    tracestate: crate::libs::TracestateOut,
}

impl LibState for HttpState {
    fn span_start(&mut self, probe: u8, rec: &Record) -> Option<Notes> {
        (probe == Probe::Server as u8).then(|| self.headers.remove(&rec.goid).unwrap_or_default())
    }

    fn event(&mut self, probe: LibProbe, rec: Record, spans: &mut dyn OpenSpans) {
        let goid = rec.goid;
        let server = LibProbe { probe: Probe::Server as u8, ..probe };
        let Some(p) = Probe::from_u8(probe.probe) else { return };
        match p {
            Probe::HeaderLine => {
                let n = (rec.ints[1] as usize).min(rec.data.len());
                let Some((key, value)) = header_line(&rec.data[..n]) else { return };
                self.header(goid, &key, value, n as u64 == rec.ints[1]);
            }
            Probe::H2Field => {
                let name_max = usize::from(H2_NAME_MAX);
                let n = (rec.ints[1] as usize).min(name_max).min(rec.data.len());
                let v = (rec.ints[3] as usize).min(rec.data.len().saturating_sub(name_max));
                let name = String::from_utf8_lossy(&rec.data[..n]).into_owned();
                let value = String::from_utf8_lossy(&rec.data[name_max..name_max + v]).into_owned();
                self.header(goid, &name, value, v as u64 == rec.ints[3]);
            }
            // The headers frame carries them to the serve loop, which starts the handler.
            Probe::H2Frame => {
                if let Some(n) = self.headers.remove(&goid) {
                    if self.frames.len() >= SIDE_TABLE_MAX {
                        self.frames.clear();
                    }
                    self.frames.insert(rec.ints[1], n);
                }
            }
            Probe::H2Process => match rec.kind {
                Kind::Entry => {
                    if let Some(n) = self.frames.remove(&rec.ints[1]) {
                        self.serving.insert(goid, n);
                    }
                }
                // Started (and inherited by its goroutine) or queued: not the next one's.
                Kind::Return => {
                    self.serving.remove(&goid);
                }
            },
            Probe::Status => {
                let code = rec.ints[1];
                if (200..=999).contains(&code)
                    && let Some(n) = spans.notes(goid, server)
                {
                    // net/http ignores every status after the first.
                    n.set_first(STATUS, Attr::I(code as i64));
                }
            }
            Probe::Route => {
                let n = (rec.ints[3] as usize).min(rec.data.len());
                let pattern = String::from_utf8_lossy(&rec.data[..n]).into_owned();
                if let Some(r) = route(&pattern)
                    && let Some(notes) = spans.notes(goid, server)
                {
                    // Nested muxes: the innermost match is the route.
                    notes.set(ROUTE, Attr::S(r));
                }
            }
            Probe::Unwind => {
                // A server span still open at net/http's recover never returned: the
                // handler panicked, and everything above it was unwound too.
                if spans.unwind(goid, server, rec, &mut |n| n.panicked = true) {
                    self.panics += 1;
                }
            }
            Probe::Inject => match (rec.kind, rec.data.first()) {
                (Kind::Entry, Some(1)) => {
                    self.injected += 1;
                    self.tracestate.count(&rec);
                }
                // The application's own traceparent line followed ours: ours came out (and
                // the tracestate line after it, when the bytes taken out were more).
                (Kind::Return, Some(1)) => {
                    self.injected = self.injected.saturating_sub(1);
                    self.stood_down += 1;
                    let taken = rec.data.get(8..16).map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
                    if taken > ring_abi::ctx::W3C_LINE as u64 {
                        self.tracestate.written = self.tracestate.written.saturating_sub(1);
                    }
                }
                _ => {}
            },
            // goexit1's probe records nothing (it runs bare); the side tables are bounded.
            // 1: a traceparent field appended, 2: no room for it, 3: left to the return.
            Probe::H2Write => match rec.data.first() {
                Some(1) => {
                    self.injected += 1;
                    self.tracestate.count(&rec);
                }
                Some(2) => self.no_room += 1,
                _ => {}
            },
            Probe::H2Own => {
                if rec.data.first() == Some(&1) {
                    self.stood_down += 1;
                }
            }
            Probe::Server | Probe::Client | Probe::H2Encode => {}
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("http_injected", self.injected),
            ("http_panics", self.panics),
            ("http_inject_no_room", self.no_room),
            ("http_app_traceparent", self.stood_down),
            ("http_tracestate_injected", self.tracestate.written),
            ("http_tracestate_no_room", self.tracestate.no_room),
        ]
    }

    /// An HTTP/2 handler's goroutine gets the header values its serve loop holds.
    fn spawned(&mut self, child: u64, parent: u64) {
        if let Some(n) = self.serving.get(&parent) {
            let n = n.clone();
            self.headers.insert(child, n);
        }
    }
}

impl HttpState {
    /// Keeps a header value the next server span of the goroutine reports. A `tracestate`
    /// longer than the record holds is left out of the span (cut, it could name another
    /// vendor's state); the trampolines still pass it on whole.
    fn header(&mut self, goid: u64, key: &str, value: String, whole: bool) {
        if key != "user-agent" && (key != "tracestate" || !whole) {
            return;
        }
        if self.headers.len() >= SIDE_TABLE_MAX {
            self.headers.clear();
        }
        let notes = self.headers.entry(goid).or_default();
        if key == "user-agent" {
            notes.set(USER_AGENT, Attr::S(value));
        } else {
            notes.trace_state = Some(value);
        }
    }
}
