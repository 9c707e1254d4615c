//! Records become calls: entries and returns are paired per goroutine (each goroutine's
//! stack of open calls), timed, parented on the same goroutine, and their values named.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Goroutine ids are already well spread: a multiply is a good enough hash, and much
/// cheaper than SipHash on the collector's per-record path.
#[derive(Default)]
pub struct GoidHasher(u64);

impl Hasher for GoidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type GoidMap<V> = HashMap<u64, V, BuildHasherDefault<GoidHasher>>;

use ring_abi::Kind;

use crate::libs::{self, LibProbe, LibState, Notes, OpenSpans};
use crate::plan::Role;
use crate::ring::Record;
use crate::values::{Shown, Side, TypeNamer, show, show_raw};

/// What the collector knows about each probed function.
#[derive(Debug, Clone)]
pub struct SiteMeta {
    pub name: String,
    pub entry: Side,
    pub ret: Side,
    /// Signature known (DWARF): values are named; otherwise raw registers.
    pub typed: bool,
    /// No exit is probed: calls are reported at entry, without a duration.
    pub entry_only: bool,
    /// Source file and line of the function's entry.
    pub code: Option<(String, u32)>,
    pub role: Role,
}

/// A finished (or entry-only) call, with the raw records: values are formatted by the
/// output side, off the collector's hot path.
#[derive(Debug, Clone)]
pub struct Call {
    pub site: u32,
    pub goid: u64,
    pub depth: usize,
    pub entry: Record,
    pub ret: Option<Record>,
    pub trace_id: u128,
    pub span_id: u64,
    pub parent: Option<u64>,
    /// The parent is in another process (an incoming `traceparent`).
    pub remote_parent: bool,
    /// The sampled flag the trampoline gave the span (and sent with its context), when
    /// it made the span's ids: the exporter keeps exactly the spans it says.
    pub sampled: Option<bool>,
    /// What a library's events added to its span.
    pub notes: Option<Box<Notes>>,
}

impl Call {
    pub fn start_tsc(&self) -> u64 {
        self.entry.tsc
    }
    pub fn end_tsc(&self) -> Option<u64> {
        self.ret.as_ref().map(|r| r.tsc)
    }

    /// Start (ns since the Unix epoch) and duration (ns; None when only the entry was seen).
    pub fn times(&self, clock: &Clock) -> (u128, Option<f64>) {
        let start = clock.unix_ns(self.start_tsc());
        (start, self.end_tsc().map(|e| clock.ns(e.saturating_sub(self.start_tsc()))))
    }
}

struct Open {
    entry: Record,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    remote_parent: bool,
    sampled: Option<bool>,
    notes: Option<Box<Notes>>,
}

impl Open {
    fn into_call(self, goid: u64, depth: usize, ret: Option<Record>) -> Call {
        Call {
            site: self.entry.site,
            goid,
            depth,
            entry: self.entry,
            ret,
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            remote_parent: self.remote_parent,
            sampled: self.sampled,
            notes: self.notes,
        }
    }
}

/// How far a return's time stamp may run behind its own entry's: counters of different
/// CPUs disagree by far less (tens of ns on invariant-TSC machines); ~10 µs at 2-4 GHz.
const SKEW_TICKS: u64 = 30_000;

/// Entries kept in the lineage table before it is forgotten: goroutines end without
/// telling us.
const SIDE_TABLE_MAX: usize = 1 << 16;

/// The open spans as library events see them.
struct Spans<'a> {
    pairer: &'a mut Pairer,
    out: &'a mut Vec<Call>,
}

impl OpenSpans for Spans<'_> {
    fn notes(&mut self, goid: u64, probe: LibProbe) -> Option<&mut Notes> {
        let p = &mut *self.pairer;
        let sites = &p.sites;
        let stack = p.stacks.get_mut(&goid)?;
        let open = stack.iter_mut().rev().find(|o| sites[o.entry.site as usize].role == Role::Lib(probe))?;
        open.notes.as_deref_mut()
    }

    fn unwind(&mut self, goid: u64, probe: LibProbe, end: Record, mark: &mut dyn FnMut(&mut Notes)) -> bool {
        let p = &mut *self.pairer;
        let sites = &p.sites;
        let Some(stack) = p.stacks.get_mut(&goid) else { return false };
        let Some(pos) = stack.iter().position(|o| sites[o.entry.site as usize].role == Role::Lib(probe)) else {
            return false;
        };
        p.abandoned += (stack.len() - pos - 1) as u64;
        stack.truncate(pos + 1);
        let Some(mut open) = stack.pop() else { return false };
        if stack.is_empty() {
            p.stacks.remove(&goid);
        }
        if let Some(n) = open.notes.as_mut() {
            mark(n);
        }
        let end = Record { site: open.entry.site, kind: Kind::Return, ..end };
        self.out.push(open.into_call(goid, pos, Some(end)));
        true
    }

    fn release(&mut self, lib: u8, key: u64, end: Record) -> bool {
        let Some(mut call) = self.pairer.held.remove(&(lib, key)) else { return false };
        call.ret = Some(end);
        self.out.push(call);
        true
    }

    fn begin_held(&mut self, lib: u8, key: u64, start: Record, notes: Option<Notes>) {
        let p = &mut *self.pairer;
        let ids = libs::span_ids(&start.data);
        let trace_id = match ids {
            Some(i) => i.trace,
            None => (u128::from(p.ids.next()) << 64) | u128::from(p.ids.next()),
        };
        let span_id = ids.map_or_else(|| p.ids.next(), |i| i.span);
        let call = Call {
            site: start.site,
            goid: start.goid,
            depth: 0,
            entry: start.clone(),
            ret: Some(Record { kind: Kind::Return, ..start }),
            trace_id,
            span_id,
            parent: ids.and_then(|i| i.parent),
            remote_parent: ids.is_some_and(|i| i.remote),
            sampled: ids.and_then(|i| i.sampled),
            notes: notes.map(Box::new),
        };
        p.keep_held((lib, key), call, self.out);
    }

    fn pass_on(&mut self, rec: Record, notes: Notes) {
        self.out.push(Call {
            site: rec.site,
            goid: rec.goid,
            depth: 0,
            entry: rec,
            ret: None,
            trace_id: 0,
            span_id: 0,
            parent: None,
            remote_parent: false,
            sampled: None,
            notes: Some(Box::new(notes)),
        });
    }

    fn spawned(&mut self, child: u64, parent: u64) {
        let p = &mut *self.pairer;
        p.spawns.push((child, parent));
        if !p.funcs {
            return;
        }
        let from = match p.stacks.get(&parent).and_then(|s| s.last()) {
            Some(top) => Some((top.trace_id, top.span_id)),
            None => p.lineage.get(&parent).copied(),
        };
        if let Some(ctx) = from {
            if p.lineage.len() >= SIDE_TABLE_MAX {
                p.lineage.clear();
            }
            p.lineage.insert(child, ctx);
        }
    }
}

/// Formats a call's arguments and results.
pub fn call_values(meta: &SiteMeta, call: &Call, types: &mut TypeNamer<'_>) -> (Vec<Shown>, Vec<Shown>) {
    if !meta.typed {
        return (show_raw(&call.entry), Vec::new());
    }
    let args = meta.entry.values.iter().map(|v| show(v, &call.entry, types)).collect();
    let results = match &call.ret {
        Some(r) => meta.ret.values.iter().map(|v| show(v, r, types)).collect(),
        None => Vec::new(),
    };
    (args, results)
}

/// Ids that are random across runs and unique within one (xorshift seeded from the clock
/// and pid; spans need uniqueness, not secrecy).
pub struct Ids(u64);

impl Ids {
    pub fn new() -> Ids {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Ids(t ^ (u64::from(std::process::id()) << 32) | 1)
    }
    pub fn next(&mut self) -> u64 {
        loop {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            if x != 0 {
                return x;
            }
        }
    }
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

/// Pairs records into calls.
pub struct Pairer {
    sites: Vec<SiteMeta>,
    stacks: GoidMap<Vec<Open>>,
    /// Returns seen before their entry: time stamps of different CPUs can be skewed by
    /// a little, and a goroutine that moved between them can appear to return first.
    early: GoidMap<Vec<Record>>,
    /// Returns whose wait expired, to pair once the frames above them are dropped.
    expired: Vec<Record>,
    ids: Ids,
    /// Returns whose entry was not seen (the call began before the probe went in).
    pub unmatched_returns: u64,
    /// Open calls abandoned by a return further down the stack (a panic unwound them).
    pub abandoned: u64,
    /// Each library's own state (what its events said), by library index.
    libs: Vec<Box<dyn LibState>>,
    /// Goroutines created during the event being handled, for every library's state.
    spawns: Vec<(u64, u64)>,
    /// Library spans whose call returned but whose work goes on (a client stream), by
    /// (library, the key its state chose), until an event releases them.
    held: HashMap<(u8, u64), Call>,
    /// The span each goroutine was created under (trace, span), for spans of named
    /// functions that begin on it with nothing open (library spans carry their own).
    lineage: GoidMap<(u128, u64)>,
    /// Some site is a named function: lineage is worth keeping.
    funcs: bool,
    /// The `tracestate` each trace came in with, for the spans under it here (the
    /// trampolines send it on with their requests; the spans say so too, as an SDK's
    /// children inherit their parent's).
    trace_states: HashMap<u128, String>,
}

/// Traces whose incoming `tracestate` is remembered before the oldest are forgotten
/// (all at once: a span of a trace forgotten early only loses its `trace_state` field).
const TRACE_STATES_MAX: usize = 1 << 14;

/// A span that continued a remote parent with a `tracestate` files it for its trace;
/// a span under it here without one of its own gets it.
fn carry_trace_state(
    states: &mut HashMap<u128, String>,
    trace_id: u128,
    remote_parent: bool,
    notes: &mut Option<Box<Notes>>,
) {
    match notes.as_ref().and_then(|n| n.trace_state.clone()) {
        Some(ts) if remote_parent => {
            if states.len() >= TRACE_STATES_MAX {
                states.clear();
            }
            states.insert(trace_id, ts);
        }
        // A remote caller that sent none: none (not an earlier caller's of the trace).
        Some(_) => {}
        None if remote_parent => {}
        None => {
            if let Some(ts) = states.get(&trace_id) {
                notes.get_or_insert_with(Box::default).trace_state = Some(ts.clone());
            }
        }
    }
}

impl Pairer {
    pub fn sites(&self) -> &[SiteMeta] {
        &self.sites
    }

    pub fn new(sites: Vec<SiteMeta>) -> Pairer {
        let funcs = sites.iter().any(|s| s.role == Role::Func);
        Pairer {
            sites,
            stacks: GoidMap::default(),
            early: GoidMap::default(),
            expired: Vec::new(),
            ids: Ids::new(),
            unmatched_returns: 0,
            abandoned: 0,
            libs: libs::states(),
            spawns: Vec::new(),
            held: HashMap::new(),
            lineage: GoidMap::default(),
            funcs,
            trace_states: HashMap::new(),
        }
    }

    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Feeds one record (in time order per goroutine); finished calls go to `out`.
    pub fn push(&mut self, rec: Record, out: &mut Vec<Call>) {
        let before = out.len();
        self.push_inner(rec, out);
        if out.len() > before {
            self.hold(before, out);
        }
    }

    /// Keeps `call` open under `key` until an event releases it; one kept there already
    /// ends as it is, and so does everything kept once the table is full (never released:
    /// an interceptor's wrapper hid the stream).
    fn keep_held(&mut self, key: (u8, u64), call: Call, out: &mut Vec<Call>) {
        if self.held.len() >= SIDE_TABLE_MAX {
            out.extend(self.held.drain().map(|(_, c)| c));
        }
        if let Some(old) = self.held.insert(key, call) {
            out.push(old);
        }
    }

    /// Moves the library spans from `from` on that their library keeps open to `held`.
    fn hold(&mut self, from: usize, out: &mut Vec<Call>) {
        let mut i = from;
        while i < out.len() {
            let c = &out[i];
            let key = match (self.sites.get(c.site as usize).map(|m| m.role), c.ret.as_ref()) {
                (Some(Role::Lib(p)), Some(ret)) => {
                    self.libs.get_mut(usize::from(p.lib)).and_then(|l| l.hold(p.probe, ret)).map(|k| (p.lib, k))
                }
                _ => None,
            };
            match key {
                Some(k) => {
                    let call = out.remove(i);
                    self.keep_held(k, call, out);
                }
                None => i += 1,
            }
        }
    }

    fn push_inner(&mut self, rec: Record, out: &mut Vec<Call>) {
        let Some(meta) = self.sites.get(rec.site as usize) else { return };
        let entry_only = meta.entry_only;
        let role = meta.role;
        if let Role::Lib(p) = role
            && !libs::is_span(p)
        {
            self.event(p, rec, out);
            return;
        }
        match rec.kind {
            Kind::Entry => {
                // A return that arrived first for this very frame (same function and SP),
                // if it is no older than clock skew allows. An older one ended a call that
                // began before the probes went in: a loop calling the function from the
                // same frame (a keep-alive connection serving requests) must not pair each
                // call with the previous call's return.
                let early = self.early.get_mut(&rec.goid).and_then(|v| {
                    let mut paired = None;
                    let mut i = 0;
                    while i < v.len() {
                        let r = &v[i];
                        if r.site != rec.site || r.sp != rec.sp {
                            i += 1;
                        } else if r.tsc.saturating_add(SKEW_TICKS) >= rec.tsc && paired.is_none() {
                            paired = Some(v.swap_remove(i));
                        } else if r.tsc.saturating_add(SKEW_TICKS) < rec.tsc {
                            v.swap_remove(i);
                            self.unmatched_returns += 1;
                        } else {
                            i += 1;
                        }
                    }
                    paired
                });
                let stack = self.stacks.entry(rec.goid).or_default();
                let mut open = match stack.last() {
                    Some(top) => (top.trace_id, Some(top.span_id)),
                    None => self.lineage.get(&rec.goid).map_or((0, None), |&(t, s)| (t, Some(s))),
                };
                let mut remote_parent = false;
                let mut sampled = None;
                let mut notes = None;
                let mut span_id = 0;
                if let Role::Lib(p) = role {
                    // The ids the trampoline made (and maybe sent): they are the truth.
                    if let Some(ids) = libs::span_ids(&rec.data) {
                        open = (ids.trace, ids.parent);
                        span_id = ids.span;
                        remote_parent = ids.remote;
                        sampled = ids.sampled;
                    }
                    notes =
                        self.libs.get_mut(usize::from(p.lib)).and_then(|l| l.span_start(p.probe, &rec)).map(Box::new);
                    if let Some(top) = stack.last()
                        && let Some(Role::Lib(q)) = self.sites.get(top.entry.site as usize).map(|m| m.role)
                        && q.lib != p.lib
                    {
                        notes.get_or_insert_with(Box::default).inside = Some(libs::library(q).name());
                    }
                }
                let (trace_id, parent) = open;
                let trace_id = if trace_id == 0 {
                    (u128::from(self.ids.next()) << 64) | u128::from(self.ids.next())
                } else {
                    trace_id
                };
                if span_id == 0 {
                    span_id = self.ids.next();
                }
                if matches!(role, Role::Lib(_)) {
                    carry_trace_state(&mut self.trace_states, trace_id, remote_parent, &mut notes);
                }
                let open = Open { entry: rec, trace_id, span_id, parent, remote_parent, sampled, notes };
                // Finished at once: its return came early, or no exit is probed.
                if early.is_some() || entry_only {
                    let depth = stack.len();
                    let goid = open.entry.goid;
                    out.push(open.into_call(goid, depth, early));
                    return;
                }
                stack.push(open);
            }
            Kind::Return => {
                let goid = rec.goid;
                if !self.pop_matching(rec, out) {
                    return;
                }
                // The new top may be what an earlier, out-of-order return was waiting for.
                while let Some(r) = self.take_early_for_top(goid) {
                    self.pop_matching(r, out);
                }
            }
        }
    }

    /// Pairs a return with the top frame of its goroutine. A return for a deeper frame,
    /// or for no open frame, waits (its partner may arrive late from another sub-ring);
    /// returns whether it paired.
    fn pop_matching(&mut self, rec: Record, out: &mut Vec<Call>) -> bool {
        let goid = rec.goid;
        let top_matches = self
            .stacks
            .get(&goid)
            .and_then(|s| s.last())
            .is_some_and(|o| o.entry.site == rec.site && o.entry.sp == rec.sp);
        if !top_matches {
            self.keep_early(rec);
            return false;
        }
        let Some(stack) = self.stacks.get_mut(&goid) else { return false };
        let Some(open) = stack.pop() else { return false };
        let depth = stack.len();
        if stack.is_empty() {
            self.stacks.remove(&goid);
        }
        out.push(open.into_call(goid, depth, Some(rec)));
        true
    }

    /// A library event: it adds to an open span, or to what the next one will know.
    fn event(&mut self, probe: LibProbe, rec: Record, out: &mut Vec<Call>) {
        let mut states = std::mem::take(&mut self.libs);
        if let Some(state) = states.get_mut(usize::from(probe.lib)) {
            state.event(probe, rec, &mut Spans { pairer: self, out });
        }
        for (child, parent) in self.spawns.drain(..) {
            for state in states.iter_mut() {
                state.spawned(child, parent);
            }
        }
        self.libs = states;
    }

    /// Library counters for the exit summary (`http_injected`, ...).
    pub fn lib_counters(&self) -> Vec<(&'static str, u64)> {
        self.libs.iter().flat_map(|l| l.counters()).collect()
    }

    /// A waiting return that matches the top frame of `goid`, if any.
    fn take_early_for_top(&mut self, goid: u64) -> Option<Record> {
        let top = self.stacks.get(&goid)?.last()?;
        let (site, sp) = (top.entry.site, top.entry.sp);
        let early = self.early.get_mut(&goid)?;
        let i = early.iter().position(|r| r.site == site && r.sp == sp)?;
        Some(early.swap_remove(i))
    }

    /// Keeps a return without an entry for a while; old ones were calls already running
    /// when the probe went in.
    fn keep_early(&mut self, rec: Record) {
        /// Far more than any reordering between sub-rings, in TSC ticks (~100 ms at 3 GHz).
        const KEEP: u64 = 300_000_000;
        let goid = rec.goid;
        let now = rec.tsc;
        let v = self.early.entry(goid).or_default();
        v.push(rec);
        let expired: Vec<Record> = if v.len() > 64 {
            v.drain(..v.len() - 64).collect()
        } else {
            let (old, keep): (Vec<Record>, Vec<Record>) = v.drain(..).partition(|r| r.tsc + KEEP <= now);
            *v = keep;
            old
        };
        // Returns that waited long enough: frames above their own were unwound without a
        // return (a panic, or an unprobed exit), or their entry was never recorded.
        for r in expired {
            let pos = self
                .stacks
                .get(&goid)
                .and_then(|s| s.iter().rposition(|o| o.entry.site == r.site && o.entry.sp == r.sp));
            match (pos, self.stacks.get_mut(&goid)) {
                (Some(pos), Some(stack)) => {
                    self.abandoned += (stack.len() - pos - 1) as u64;
                    stack.truncate(pos + 1);
                    self.expired.push(r);
                }
                _ => self.unmatched_returns += 1,
            }
        }
    }

    /// Returns let go after waiting, now matching their (uncovered) top frame.
    pub fn flush_expired(&mut self, out: &mut Vec<Call>) {
        for r in std::mem::take(&mut self.expired) {
            if !self.pop_matching_now(r, out) {
                self.unmatched_returns += 1;
            }
        }
    }

    fn pop_matching_now(&mut self, rec: Record, out: &mut Vec<Call>) -> bool {
        let top_matches = self
            .stacks
            .get(&rec.goid)
            .and_then(|s| s.last())
            .is_some_and(|o| o.entry.site == rec.site && o.entry.sp == rec.sp);
        top_matches && self.pop_matching(rec, out)
    }

    /// At the end: waiting returns pair with their frame if it is open (abandoning what
    /// is above it), else count as unmatched.
    pub fn finish(&mut self, out: &mut Vec<Call>) {
        let early: Vec<Record> = self.early.drain().flat_map(|(_, v)| v).collect();
        for r in early {
            let pos = self
                .stacks
                .get(&r.goid)
                .and_then(|s| s.iter().rposition(|o| o.entry.site == r.site && o.entry.sp == r.sp));
            if let (Some(pos), Some(stack)) = (pos, self.stacks.get_mut(&r.goid)) {
                self.abandoned += (stack.len() - pos - 1) as u64;
                stack.truncate(pos + 1);
                self.pop_matching(r, out);
            } else {
                self.unmatched_returns += 1;
            }
        }
        self.flush_expired(out);
        // Spans kept open that nothing released: they end where their call returned.
        out.extend(self.held.drain().map(|(_, c)| c));
    }

    /// Calls still open (they began but have not returned yet).
    pub fn open_calls(&self) -> usize {
        self.stacks.values().map(Vec::len).sum()
    }
}

/// Converts time stamp counter ticks to wall-clock time, calibrated against
/// CLOCK_REALTIME and refined as time passes.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    tsc0: u64,
    unix0_ns: u128,
    hz: f64,
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn unix_now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl Clock {
    /// Measures the counter's rate over `over`.
    pub fn calibrate(over: std::time::Duration) -> Clock {
        let (t0, u0) = (rdtsc(), unix_now_ns());
        std::thread::sleep(over);
        let (t1, u1) = (rdtsc(), unix_now_ns());
        let hz = (t1 - t0) as f64 / ((u1 - u0) as f64 / 1e9);
        Clock { tsc0: t0, unix0_ns: u0, hz }
    }

    /// Re-measures the rate over everything since calibration (more precise with time).
    pub fn refine(&mut self) {
        let (t, u) = (rdtsc(), unix_now_ns());
        let secs = (u - self.unix0_ns) as f64 / 1e9;
        if secs > 0.5 {
            self.hz = (t - self.tsc0) as f64 / secs;
        }
    }

    pub fn hz(&self) -> f64 {
        self.hz
    }

    pub fn unix_ns(&self, tsc: u64) -> u128 {
        let dt = (tsc as i128 - self.tsc0 as i128) as f64 / self.hz * 1e9;
        (self.unix0_ns as i128 + dt as i128).max(0) as u128
    }

    pub fn ns(&self, ticks: u64) -> f64 {
        ticks as f64 / self.hz * 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SiteMeta {
        SiteMeta {
            name: "main.serve".into(),
            entry: Side::default(),
            ret: Side::default(),
            typed: false,
            entry_only: false,
            code: None,
            role: Role::Func,
        }
    }

    fn rec(kind: Kind, tsc: u64) -> Record {
        Record { ring: 0, site: 0, kind, goid: 7, tsc, sp: 0xc000_1000, ints: [0; _], floats: [0; _], data: Vec::new() }
    }

    #[test]
    fn a_call_in_progress_at_attach_does_not_shift_later_pairs() {
        // A loop calls the function from one frame (same SP): the first return belongs to
        // a call that began before the probe went in.
        let mut p = Pairer::new(vec![meta()]);
        let mut out = Vec::new();
        p.push(rec(Kind::Return, 1_000_000), &mut out);
        for i in 1..=3u64 {
            let start = 1_000_000 + i * 1_000_000;
            p.push(rec(Kind::Entry, start), &mut out);
            p.push(rec(Kind::Return, start + 400_000), &mut out);
        }
        p.finish(&mut out);
        assert_eq!(out.len(), 3);
        for c in &out {
            assert_eq!(c.end_tsc().map(|e| e - c.start_tsc()), Some(400_000), "each call paired with its own return");
        }
        assert_eq!(p.unmatched_returns, 1);
    }

    #[test]
    fn a_return_slightly_before_its_entry_still_pairs() {
        // The goroutine moved between CPUs whose counters disagree by a little.
        let mut p = Pairer::new(vec![meta()]);
        let mut out = Vec::new();
        p.push(rec(Kind::Return, 1_000_000 - 500), &mut out);
        p.push(rec(Kind::Entry, 1_000_000), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(p.unmatched_returns, 0);
    }
}
