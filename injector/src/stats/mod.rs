//! `inject --stats`: per function call counts, calls/s, errors and latency percentiles,
//! counted by the trampolines themselves in the ring's stats region
//! (`ring_abi::stats`), with no record per call. A thread reads the counters every
//! interval and shows them (a table refreshed in place, or one JSON object per interval);
//! at exit the totals and a latency histogram per function.

pub mod show;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use go_abi::abi::Location;
use ring_abi::{Layout, stats as st};
use trampolines::CapturePlan;
use trampolines::codegen::{ErrorAt, StatsProbe};

use crate::output::Format;
use crate::plan::ProbeSite;
use crate::spans::Clock;
use crate::values::ValueSpec;

/// Why stats mode cannot do what the command line asks (a usage error), if it cannot:
/// checked before anything is touched.
pub fn refusal(has_funcs: bool, output: Option<Format>, interval: f64) -> Option<String> {
    if !has_funcs {
        return Some("--stats counts the --func functions: name some (list them with `inject functions`)".into());
    }
    if let Some(f) = output.filter(|f| !matches!(f, Format::Console | Format::Jsonl | Format::None)) {
        let name =
            clap::ValueEnum::to_possible_value(&f).map_or_else(|| format!("{f:?}"), |v| v.get_name().to_string());
        return Some(format!("--stats shows a table (--output console) or JSON lines (--output jsonl), not {name}"));
    }
    if !(interval.is_finite() && interval >= 0.05) {
        return Some(format!("--stats-interval {interval}: give seconds, at least 0.05"));
    }
    None
}

/// Turns every site's probes into counting ones: the entry counts the call (and leaves
/// its time when a return is probed), each return times it and counts a non-nil `error`
/// result (the last result of type `error`, when the signature is known).
pub fn plan(sites: &mut [ProbeSite]) {
    for s in sites {
        let returns = s.returns.as_ref().is_ok_and(|r| !r.is_empty());
        let timed = returns || s.entry_patch.as_ref().is_ok_and(|e| e.whole_body);
        let error = error_at(&s.on_return.values);
        s.on_entry.plan = CapturePlan { stats: Some(StatsProbe { timed, error: None }), ..CapturePlan::default() };
        s.on_return.plan = CapturePlan { stats: Some(StatsProbe { timed: false, error }), ..CapturePlan::default() };
    }
}

/// Where the last `error` result's first word is at the RET.
fn error_at(values: &[ValueSpec]) -> Option<ErrorAt> {
    let v = values.iter().rev().find(|v| v.type_name == "error")?;
    match &v.location {
        Location::Registers(pieces) => {
            let reg = pieces.first()?.reg;
            go_abi::abi::INT_ARG_REGS.iter().position(|r| *r == reg).map(|i| ErrorAt::Reg(i as u8))
        }
        Location::Stack { offset, .. } => i32::try_from(*offset).ok().map(ErrorAt::Stack),
    }
}

/// Whether a site's errors are counted (its signature names an `error` result).
pub fn counts_errors(site: &ProbeSite) -> bool {
    site.on_return.plan.stats.is_some_and(|p| p.error.is_some())
}

/// One function's counters, summed over the P blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub calls: u64,
    /// Calls on a thread whose P had no block (counted, not timed).
    pub missed: u64,
    pub errors: u64,
    /// Latency ticks: sum and largest.
    pub sum: u64,
    pub max: u64,
    /// Returns with no entry time (begun before the probes went in, or evicted).
    pub untimed: u64,
    pub hist: Vec<u64>,
}

impl Counts {
    /// Every call (with the missed ones).
    pub fn all_calls(&self) -> u64 {
        self.calls + self.missed
    }

    /// Returns whose latency is in the histogram.
    pub fn timed(&self) -> u64 {
        self.hist.iter().sum()
    }

    pub fn returns(&self) -> u64 {
        self.timed() + self.untimed
    }

    /// What happened since `before` (the largest latency stays the session's).
    pub fn since(&self, before: &Counts) -> Counts {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counts {
            calls: d(self.calls, before.calls),
            missed: d(self.missed, before.missed),
            errors: d(self.errors, before.errors),
            sum: d(self.sum, before.sum),
            max: self.max,
            untimed: d(self.untimed, before.untimed),
            hist: self
                .hist
                .iter()
                .zip(before.hist.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| d(*a, *b))
                .collect(),
        }
    }

    /// The latency (ticks) below which a fraction `q` of the timed returns fall: the middle
    /// of its bucket (at most 1/16 of the value away), never above the largest.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        let n = self.timed();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (b, &c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = st::bucket_range(b);
                let mid = if hi == u64::MAX { lo } else { lo + (hi - lo) / 2 };
                return Some(if self.max > 0 { mid.min(self.max) } else { mid });
            }
        }
        None
    }
}

/// Timed calls a second of a function on one P, at most: reading the clock twice costs
/// a timed call ~21 ns here, so a function called 10 million times a second on a P is
/// timed once in 128 calls (~0.2 ns a call), one called less than this often at every
/// call. The trampolines adapt the period themselves (`ring_abi::stats::PERIOD`).
pub const TIMED_PER_S: f64 = 100_000.0;

/// The stats region of a mapped ring.
pub struct View {
    base: *mut u8,
    layout: Layout,
}

// SAFETY: shared memory read only through atomics; the mapping outlives the view (the
// caller's promise in `new`).
unsafe impl Send for View {}
// SAFETY: as above: every access is an atomic load.
unsafe impl Sync for View {}

impl View {
    /// # Safety
    /// `base..base+len` must be a mapping of the ring laid out as `layout` that outlives
    /// the view.
    pub unsafe fn new(base: *mut u8, len: usize, layout: Layout) -> Option<View> {
        (layout.stats_slots > 0 && len >= layout.total_len()).then_some(View { base, layout })
    }

    fn atomic(&self, off: usize) -> &AtomicU64 {
        // SAFETY: in bounds (the layout's offsets are within total_len), 8-aligned, and
        // written concurrently only by aligned 8-byte stores.
        unsafe { AtomicU64::from_ptr(self.base.add(off) as *mut u64) }
    }

    fn word(&self, off: usize) -> u64 {
        self.atomic(off).load(Ordering::Relaxed)
    }

    /// One call of `site` in this many is timed now (the most sampled P's).
    pub fn period(&self, site: u32) -> u64 {
        let p = (0..self.layout.stats_slots).map(|p| self.word(self.layout.stats_block_offset(site, p) + st::PERIOD));
        p.max().unwrap_or(0) + 1
    }

    /// Tells the trampolines how often timed calls may come (see [`TIMED_PER_S`]).
    pub fn set_min_gap(&self, ticks: u64) {
        for site in 0..self.layout.sites {
            for p in 0..self.layout.stats_slots {
                self.atomic(self.layout.stats_block_offset(site, p) + st::MIN_GAP).store(ticks, Ordering::Relaxed);
            }
        }
    }

    /// Site `site`'s counters now.
    pub fn read(&self, site: u32) -> Counts {
        let mut c = Counts {
            missed: self.word(self.layout.stats_missed_offset(site)),
            hist: vec![0; st::BUCKETS],
            ..Counts::default()
        };
        for slot in 0..self.layout.stats_slots {
            let b = self.layout.stats_block_offset(site, slot);
            c.calls += self.word(b + st::CALLS);
            c.errors += self.word(b + st::ERRORS);
            c.sum += self.word(b + st::SUM);
            c.max = c.max.max(self.word(b + st::MAX));
            c.untimed += self.word(b + st::UNTIMED);
            for (i, h) in c.hist.iter_mut().enumerate() {
                *h += self.word(b + st::HIST + 8 * i);
            }
        }
        c
    }

    /// The first `n` sites' counters and sampling now.
    fn snapshot(&self, n: usize) -> Snapshot {
        let sites = 0..n as u32;
        Snapshot {
            counts: sites.clone().map(|s| self.read(s)).collect(),
            periods: sites.map(|s| self.period(s)).collect(),
        }
    }
}

/// Every function's counters at one moment, with how it is sampled (by site).
pub struct Snapshot {
    pub counts: Vec<Counts>,
    /// One call in this many is timed.
    pub periods: Vec<u64>,
}

/// What a function is called and whether its latency and errors are measured.
#[derive(Debug, Clone)]
pub struct Func {
    pub name: String,
    pub timed: bool,
    pub errors: bool,
}

impl Func {
    pub fn of(site: &ProbeSite) -> Func {
        Func {
            name: site.name.clone(),
            timed: site.on_entry.plan.stats.is_some_and(|p| p.timed),
            errors: counts_errors(site),
        }
    }
}

/// How soon the end is noticed between two intervals.
const STEP: Duration = Duration::from_millis(20);

/// The thread that shows the counters every interval.
pub struct Live {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<show::Printer>>,
    view: Arc<View>,
    funcs: Vec<Func>,
    clock: Arc<Mutex<Clock>>,
    started: Instant,
}

impl Live {
    /// [`Live::start`] on the ring `reader` reads, for `sites`, every `interval` seconds,
    /// to `file`, else standard output (standard error for a launched program, which owns
    /// standard output).
    pub fn from_reader(
        reader: &crate::ring::RingReader,
        sites: &[ProbeSite],
        clock: Arc<Mutex<Clock>>,
        format: Format,
        file: Option<std::path::PathBuf>,
        interval: f64,
        launch: bool,
    ) -> Result<Live> {
        let (base, len, layout) = reader.mapping();
        // SAFETY: the reader's mapping lives as long as the probes, which the caller keeps
        // until `finish` has read the totals.
        let view = unsafe { View::new(base, len, layout) }.context("the ring has no stats region")?;
        let funcs = sites.iter().map(Func::of).collect();
        let interval = Duration::from_secs_f64(interval);
        let out = match file {
            Some(p) => show::Out::File(p),
            None if launch => show::Out::Stderr,
            None => show::Out::Stdout,
        };
        Live::start(view, funcs, clock, format, out, interval)
    }

    /// Starts showing `funcs` (by site id) from `view` every `interval`, as `format` says.
    pub fn start(
        view: View,
        funcs: Vec<Func>,
        clock: Arc<Mutex<Clock>>,
        format: Format,
        out: show::Out,
        interval: Duration,
    ) -> Result<Live> {
        let mut printer = show::Printer::open(format, out)?;
        let hz = clock.lock().map_or(1e9, |c| c.hz());
        view.set_min_gap((hz / TIMED_PER_S) as u64);
        let view = Arc::new(view);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = {
            let (view, funcs, clock, stop) = (view.clone(), funcs.clone(), clock.clone(), stop.clone());
            std::thread::Builder::new().name("stats".into()).spawn(move || {
                // The counters began at zero when the probes went in.
                let mut before = vec![Counts::default(); funcs.len()];
                let mut at = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    // Short steps: the sampling follows each function's rate, and the end
                    // is not held up by an interval.
                    let next = at + interval;
                    while Instant::now() < next && !stop.load(Ordering::Acquire) {
                        std::thread::sleep(STEP.min(next - Instant::now()));
                    }
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let now = view.snapshot(funcs.len());
                    let elapsed = at.elapsed();
                    at = Instant::now();
                    let hz = clock.lock().map_or(1e9, |c| c.hz());
                    printer.interval(&funcs, &now, &before, elapsed, hz, started.elapsed())?;
                    before = now.counts;
                }
                Ok(printer)
            })?
        };
        Ok(Live { stop, thread, view, funcs, clock, started })
    }

    /// Stops showing, then shows the totals (read now: call after the probes are out, so
    /// that they are final) and returns them, by site.
    pub fn finish(self) -> Result<Vec<Counts>> {
        self.stop.store(true, Ordering::Release);
        let mut printer = self.thread.join().map_err(|_| anyhow::anyhow!("stats thread panicked"))??;
        let totals = self.view.snapshot(self.funcs.len());
        let hz = self.clock.lock().map_or(1e9, |c| c.hz());
        printer.totals(&self.funcs, &totals, hz, self.started.elapsed()).context("writing the stats totals")?;
        Ok(totals.counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut c = Counts { hist: vec![0; st::BUCKETS], ..Counts::default() };
        assert_eq!(c.percentile(0.5), None);
        // 90 calls of 100 ticks, 10 of 10,000.
        c.hist[st::bucket(100)] = 90;
        c.hist[st::bucket(10_000)] = 10;
        c.max = 10_000;
        let p50 = c.percentile(0.5).unwrap();
        assert!((94..=106).contains(&p50), "{p50}");
        assert!((94..=106).contains(&c.percentile(0.9).unwrap()));
        let p99 = c.percentile(0.99).unwrap();
        assert!((9_400..=10_000).contains(&p99), "the bucket's middle: {p99}");
        c.max = 9_500;
        assert_eq!(c.percentile(0.99), Some(9_500), "never above the largest");
        assert_eq!(c.timed(), 100);
        let later = Counts { calls: 7, hist: c.hist.iter().map(|h| h * 2).collect(), ..c.clone() };
        assert_eq!(later.since(&c).timed(), 100);
    }
}
