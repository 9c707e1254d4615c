//! `inject bench-collector`: how fast the collector drains and pairs records, measured on
//! a ring in this process filled the way trampolines fill it (hidden; run by
//! `cargo xtask bench collector`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use ring_abi::{Kind, Layout, ring, slot};

use crate::collect;
use crate::output::{Format, Sink};
use crate::ring::{DataShape, RingReader};
use crate::spans::{Clock, Pairer, SiteMeta};
use crate::values::Side;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Calls to simulate (two records each).
    #[arg(long, default_value_t = 5_000_000)]
    calls: u64,
    /// Also format every call as JSON (to /dev/null).
    #[arg(long)]
    format: bool,
}

pub fn bench_collector(args: &BenchArgs) -> Result<()> {
    // Two sub-rings, as on a two-CPU machine: the collector merges them by time stamp.
    let layout = Layout::new(2, 1 << 16, 256)?;
    let mut mem = vec![0u64; layout.total_len() / 8];
    // SAFETY: reinterpreting our own u64 buffer as bytes for initialisation.
    let bytes = unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr().cast::<u8>(), layout.total_len()) };
    layout.initialise(bytes);
    let base = mem.as_mut_ptr().cast::<u8>();
    let base_addr = base as usize;
    let meta = SiteMeta {
        name: "main.f".into(),
        entry: Side::default(),
        ret: Side::default(),
        typed: false,
        entry_only: false,
        code: None,
        role: crate::plan::Role::Func,
    };
    // SAFETY: `mem` outlives the reader (joined below).
    let reader =
        unsafe { RingReader::new(base, layout.total_len(), layout, vec![[DataShape::fixed(0), DataShape::fixed(0)]]) };
    let stop = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(Mutex::new(Clock::calibrate(Duration::from_millis(10))));
    let (tx, rx) = collect::channel();
    let sink = Sink::text(Format::Jsonl, Box::new(std::io::sink()));
    let output = {
        let clock = clock.clone();
        let format = args.format;
        let sites = vec![meta.clone()];
        std::thread::spawn(move || {
            if format { collect::output(rx, sink, sites, clock, None) } else { rx.iter().count() as u64 }
        })
    };
    let collector = {
        let (stop, clock) = (stop.clone(), clock.clone());
        std::thread::spawn(move || {
            collect::run(reader, Pairer::new(vec![meta]), tx, clock, stop, Duration::from_secs(5), false)
        })
    };
    // The writer: the same protocol as a trampoline, one goroutine, nested calls 4 deep.
    let started = Instant::now();
    let w = |off: usize| -> &AtomicU64 {
        // SAFETY: in-bounds, aligned words of `mem`, which outlives this closure's uses.
        unsafe { AtomicU64::from_ptr((base_addr as *mut u8).add(off).cast()) }
    };
    let mut tickets = [0u64; 2];
    let mut emit = |kind: Kind, sp: u64, r: u32| loop {
        let t = tickets[r as usize];
        let s = layout.slot_offset(r, t);
        if w(s + slot::SEQ).load(Ordering::Acquire) != t {
            std::hint::spin_loop();
            continue;
        }
        w(s + slot::TICKET).store(t, Ordering::Relaxed);
        w(s + slot::SITE).store((kind as u64) << 32, Ordering::Relaxed);
        w(s + slot::GOID).store(1, Ordering::Relaxed);
        w(s + slot::SP).store(sp, Ordering::Relaxed);
        w(s + slot::TSC).store(crate::spans::rdtsc(), Ordering::Relaxed);
        w(s + slot::SEQ).store(t + 1, Ordering::Release);
        tickets[r as usize] = t + 1;
        w(layout.ring_offset(r) + ring::HEAD).store(t + 1, Ordering::Release);
        break;
    };
    // Calls nested four deep; the goroutine alternates between CPUs (sub-rings).
    for i in 0..args.calls / 4 {
        let r = (i % 2) as u32;
        for d in 0..4u64 {
            emit(Kind::Entry, 0x1000 - d * 64, r);
        }
        for d in (0..4u64).rev() {
            emit(Kind::Return, 0x1000 - d * 64, r);
        }
    }
    stop.store(true, Ordering::Release);
    let totals = collector.join().map_err(|_| anyhow::anyhow!("collector panicked"))?;
    let elapsed = started.elapsed();
    let _ = output.join();
    let records = totals.records as f64;
    println!(
        "collector: {} records ({} calls) in {:.3} s: {:.2} M records/s{}",
        totals.records,
        totals.calls,
        elapsed.as_secs_f64(),
        records / elapsed.as_secs_f64() / 1e6,
        if args.format { " (with JSON formatting)" } else { "" }
    );
    println!(
        "  unmatched returns {}, abandoned {}, open {}, handed to output late (dropped) {}",
        totals.unmatched_returns, totals.abandoned, totals.open_calls, totals.output_dropped
    );
    drop(mem);
    Ok(())
}
