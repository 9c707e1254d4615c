//! How the counters are shown: a table (refreshed in place on a terminal, like `top`;
//! one table per interval elsewhere), one JSON object per interval with `--output
//! jsonl`, and at exit the totals with a latency histogram per function.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ring_abi::stats as st;
use serde_json::json;

use super::{Counts, Func, Snapshot};
use crate::output::Format;

/// Where the counters go.
pub enum Out {
    File(PathBuf),
    Stdout,
    Stderr,
}

/// Where and how the counters go.
pub struct Printer {
    out: Box<dyn Write + Send>,
    format: Format,
    /// Redraw the table in place (the output is a terminal).
    redraw: bool,
}

/// A latency in ticks as a short duration (`812ns`, `21.4µs`, `3.10ms`, `1.20s`).
fn duration(ticks: u64, hz: f64) -> String {
    let ns = ticks as f64 / hz * 1e9;
    match ns {
        n if n < 1e3 => format!("{n:.0}ns"),
        n if n < 1e6 => format!("{:.1}µs", n / 1e3),
        n if n < 1e9 => format!("{:.2}ms", n / 1e6),
        n => format!("{:.2}s", n / 1e9),
    }
}

fn ns(ticks: u64, hz: f64) -> u64 {
    (ticks as f64 / hz * 1e9).round() as u64
}

/// The percentiles and largest latency as JSON (nanoseconds), or null without returns.
fn latency_json(c: &Counts, hz: f64) -> serde_json::Value {
    if c.timed() == 0 {
        return serde_json::Value::Null;
    }
    let p = |q| c.percentile(q).map(|t| ns(t, hz));
    json!({
        "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": ns(c.max, hz),
        "mean": ns(c.sum / c.timed().max(1), hz),
    })
}

impl Printer {
    pub fn open(format: Format, out: Out) -> Result<Printer> {
        let (out, terminal): (Box<dyn Write + Send>, bool) = match out {
            Out::File(p) => {
                (Box::new(std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?), false)
            }
            Out::Stdout => (Box::new(std::io::stdout()), std::io::stdout().is_terminal()),
            Out::Stderr => (Box::new(std::io::stderr()), std::io::stderr().is_terminal()),
        };
        Ok(Printer { out, format, redraw: terminal && format == Format::Console })
    }

    /// One interval: `now` and `before` are the counters at its end and start (by site).
    pub fn interval(
        &mut self,
        funcs: &[Func],
        now: &Snapshot,
        before: &[Counts],
        elapsed: Duration,
        hz: f64,
        since_start: Duration,
    ) -> Result<()> {
        let (now, periods) = (&now.counts, &now.periods);
        let secs = elapsed.as_secs_f64().max(1e-9);
        match self.format {
            Format::Jsonl => {
                let functions: Vec<serde_json::Value> = funcs
                    .iter()
                    .zip(now.iter().zip(before))
                    .zip(periods)
                    .map(|((f, (n, b)), period)| {
                        let d = n.since(b);
                        json!({
                            "name": f.name,
                            "calls": n.all_calls(),
                            "interval_calls": d.all_calls(),
                            "calls_per_s": (d.all_calls() as f64 / secs).round(),
                            "errors": f.errors.then_some(n.errors),
                            "interval_errors": f.errors.then_some(d.errors),
                            "timed": d.timed(),
                            "sampling": period,
                            "latency_ns": latency_json(&d, hz),
                        })
                    })
                    .collect();
                let line = json!({
                    "stats": "interval",
                    "time_unix_nano": unix_ns(),
                    "elapsed_s": since_start.as_secs_f64(),
                    "interval_s": secs,
                    "functions": functions,
                });
                writeln!(self.out, "{line}")?;
            }
            Format::Console => {
                let mut t = String::new();
                if self.redraw {
                    t.push_str("\x1b[H\x1b[2J");
                }
                t.push_str(&format!(
                    "inject --stats: {:.0} s; calls/s and latency of the last {secs:.1} s, max since the start\n",
                    since_start.as_secs_f64()
                ));
                t.push_str(&header());
                for ((f, (n, b)), &period) in funcs.iter().zip(now.iter().zip(before)).zip(periods) {
                    let d = n.since(b);
                    t.push_str(&row(f, n.all_calls(), d.all_calls() as f64 / secs, n.errors, &d, hz, period));
                }
                if !self.redraw {
                    t.push('\n');
                }
                self.out.write_all(t.as_bytes())?;
            }
            _ => {}
        }
        self.out.flush()?;
        Ok(())
    }

    /// The session's totals and each function's latency histogram.
    pub fn totals(&mut self, funcs: &[Func], totals: &Snapshot, hz: f64, since_start: Duration) -> Result<()> {
        let (totals, periods) = (&totals.counts, &totals.periods);
        let secs = since_start.as_secs_f64().max(1e-9);
        match self.format {
            Format::Jsonl => {
                let functions: Vec<serde_json::Value> = funcs
                    .iter()
                    .zip(totals)
                    .zip(periods)
                    .map(|((f, c), period)| {
                        json!({
                            "name": f.name,
                            "calls": c.all_calls(),
                            "calls_per_s": (c.all_calls() as f64 / secs).round(),
                            "errors": f.errors.then_some(c.errors),
                            "returns": c.returns(),
                            "timed": c.timed(),
                            "sampling": period,
                            "untimed_returns": c.untimed,
                            "missed": c.missed,
                            "latency_ns": latency_json(c, hz),
                            "histogram": histogram(c, hz).iter().map(|(lo, hi, n)| json!({"from_ns": lo, "to_ns": hi, "count": n})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let line = json!({
                    "stats": "total",
                    "time_unix_nano": unix_ns(),
                    "elapsed_s": secs,
                    "functions": functions,
                });
                writeln!(self.out, "{line}")?;
            }
            Format::Console => {
                let mut t = format!("\ninject --stats: totals over {secs:.1} s\n");
                t.push_str(&header());
                for ((f, c), &period) in funcs.iter().zip(totals).zip(periods) {
                    t.push_str(&row(f, c.all_calls(), c.all_calls() as f64 / secs, c.errors, c, hz, period));
                }
                for (f, c) in funcs.iter().zip(totals) {
                    t.push_str(&histogram_text(f, c, hz));
                }
                self.out.write_all(t.as_bytes())?;
            }
            _ => {}
        }
        self.out.flush()?;
        Ok(())
    }
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn header() -> String {
    format!(
        "{:<50} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
        "FUNCTION", "CALLS", "CALLS/S", "ERRORS", "P50", "P90", "P99", "MAX"
    )
}

fn row(f: &Func, calls: u64, rate: f64, errors: u64, lat: &Counts, hz: f64, period: u64) -> String {
    let p = |q| lat.percentile(q).map_or_else(|| "-".to_string(), |t| duration(t, hz));
    let max = if lat.timed() > 0 { duration(lat.max, hz) } else { "-".into() };
    let errors = if f.errors { errors.to_string() } else { "-".into() };
    let name = if f.name.chars().count() > 50 {
        format!("…{}", f.name.chars().rev().take(49).collect::<Vec<_>>().into_iter().rev().collect::<String>())
    } else {
        f.name.clone()
    };
    let sampled = if period > 1 { format!("  (timed 1 in {period})") } else { String::new() };
    format!(
        "{name:<50} {calls:>12} {rate:>12.0} {errors:>10} {:>9} {:>9} {:>9} {max:>9}{sampled}\n",
        p(0.5),
        p(0.9),
        p(0.99)
    )
}

/// The histogram in power-of-two nanosecond ranges (from, to, count), the empty ranges at
/// either end left out: each fine bucket counts where its middle falls.
pub fn histogram(c: &Counts, hz: f64) -> Vec<(u64, u64, u64)> {
    let mut bins: Vec<u64> = Vec::new();
    for (b, &n) in c.hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (lo, hi) = st::bucket_range(b);
        let mid = if hi == u64::MAX { lo } else { lo + (hi - lo) / 2 };
        let at = ns(mid, hz);
        let bin = if at == 0 { 0 } else { 64 - at.leading_zeros() as usize };
        if bins.len() <= bin {
            bins.resize(bin + 1, 0);
        }
        bins[bin] += n;
    }
    let first = bins.iter().position(|&n| n > 0).unwrap_or(bins.len());
    (first..bins.len())
        .map(|i| {
            let (lo, hi) = if i == 0 { (0, 0) } else { (1u64 << (i - 1), (1u64 << i) - 1) };
            (lo, hi, bins[i])
        })
        .collect()
}

/// A histogram as bcc's funclatency draws it.
fn histogram_text(f: &Func, c: &Counts, hz: f64) -> String {
    let mut t = format!("\n{}: {} calls", f.name, c.all_calls());
    if f.errors {
        t.push_str(&format!(", {} errors", c.errors));
    }
    if !f.timed {
        t.push_str(" (entry only: no latency)\n");
        return t;
    }
    if c.untimed > 0 {
        t.push_str(&format!(
            ", {} timed, {} not (sampled out, or begun before the probes went in)",
            c.timed(),
            c.untimed
        ));
    }
    if c.missed > 0 {
        t.push_str(&format!(", {} calls on threads without a P counted but not timed", c.missed));
    }
    t.push('\n');
    let bins = histogram(c, hz);
    let top = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    t.push_str(&format!("{:>26} : {:<10} {}\n", "nsecs", "count", "distribution"));
    for (lo, hi, n) in bins {
        let stars = (n * 40).div_ceil(top) as usize;
        let stars = if n == 0 { 0 } else { stars.max(1) };
        t.push_str(&format!("{:>12} -> {:<10} : {n:<10} |{:<40}|\n", lo, hi, "*".repeat(stars)));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_in_powers_of_two_of_nanoseconds() {
        let mut c = Counts { hist: vec![0; st::BUCKETS], ..Counts::default() };
        // At 1 GHz a tick is a nanosecond.
        c.hist[st::bucket(100)] = 3;
        c.hist[st::bucket(1000)] = 1;
        c.max = 1000;
        let h = histogram(&c, 1e9);
        assert_eq!(h.first(), Some(&(64, 127, 3)));
        assert_eq!(h.last(), Some(&(512, 1023, 1)));
        assert_eq!(h.iter().map(|b| b.2).sum::<u64>(), 4);
        let f = Func { name: "main.f".into(), timed: true, errors: true };
        let text = histogram_text(&f, &c, 1e9);
        assert!(text.contains("main.f: 0 calls, 0 errors"), "{text}");
        assert!(text.contains("64 -> 127        : 3 "), "{text}");
        assert_eq!(duration(21, 1e9), "21ns");
        assert_eq!(duration(21_400, 1e9), "21.4µs");
    }
}
