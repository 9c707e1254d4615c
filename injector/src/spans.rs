//! Records become calls: entries and returns are paired per goroutine (each goroutine's
//! stack of open calls), timed, parented on the same goroutine, and their values named.

use std::collections::HashMap;

use ring_abi::Kind;

use crate::ring::Record;
use crate::values::{Shown, Side, show, show_raw};

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
}

impl Call {
    pub fn start_tsc(&self) -> u64 {
        self.entry.tsc
    }
    pub fn end_tsc(&self) -> Option<u64> {
        self.ret.as_ref().map(|r| r.tsc)
    }
}

struct Open {
    entry: Record,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
}

/// Formats a call's arguments and results.
pub fn call_values(meta: &SiteMeta, call: &Call) -> (Vec<Shown>, Vec<Shown>) {
    if !meta.typed {
        return (show_raw(&call.entry), Vec::new());
    }
    let args = meta.entry.values.iter().map(|v| show(v, &call.entry)).collect();
    let results = match &call.ret {
        Some(r) => meta.ret.values.iter().map(|v| show(v, r)).collect(),
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
    stacks: HashMap<u64, Vec<Open>>,
    ids: Ids,
    /// Returns whose entry was not seen (the call began before the probe went in).
    pub unmatched_returns: u64,
    /// Open calls abandoned by a return further down the stack (a panic unwound them).
    pub abandoned: u64,
}

impl Pairer {
    pub fn sites(&self) -> &[SiteMeta] {
        &self.sites
    }

    pub fn new(sites: Vec<SiteMeta>) -> Pairer {
        Pairer { sites, stacks: HashMap::new(), ids: Ids::new(), unmatched_returns: 0, abandoned: 0 }
    }

    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Feeds one record (in time order per goroutine); finished calls go to `out`.
    pub fn push(&mut self, rec: Record, out: &mut Vec<Call>) {
        let Some(meta) = self.sites.get(rec.site as usize) else { return };
        let entry_only = meta.entry_only;
        match rec.kind {
            Kind::Entry => {
                let stack = self.stacks.entry(rec.goid).or_default();
                let (trace_id, parent) = match stack.last() {
                    Some(top) => (top.trace_id, Some(top.span_id)),
                    None => (0, None),
                };
                let trace_id = if trace_id == 0 {
                    (u128::from(self.ids.next()) << 64) | u128::from(self.ids.next())
                } else {
                    trace_id
                };
                let span_id = self.ids.next();
                if entry_only {
                    let depth = stack.len();
                    out.push(Call {
                        site: rec.site,
                        goid: rec.goid,
                        depth,
                        entry: rec,
                        ret: None,
                        trace_id,
                        span_id,
                        parent,
                    });
                    return;
                }
                stack.push(Open { entry: rec, trace_id, span_id, parent });
            }
            Kind::Return => {
                let Some(stack) = self.stacks.get_mut(&rec.goid) else {
                    self.unmatched_returns += 1;
                    return;
                };
                // The matching frame: same function, same stack pointer. Frames above it
                // were left without a return (a panic unwound them, or an unprobed exit).
                let Some(pos) = stack.iter().rposition(|o| o.entry.site == rec.site && o.entry.sp == rec.sp) else {
                    self.unmatched_returns += 1;
                    return;
                };
                self.abandoned += (stack.len() - pos - 1) as u64;
                stack.truncate(pos + 1);
                let Some(open) = stack.pop() else { return };
                let depth = stack.len();
                if stack.is_empty() {
                    self.stacks.remove(&rec.goid);
                }
                out.push(Call {
                    site: open.entry.site,
                    goid: rec.goid,
                    depth,
                    entry: open.entry,
                    ret: Some(rec),
                    trace_id: open.trace_id,
                    span_id: open.span_id,
                    parent: open.parent,
                });
            }
        }
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
