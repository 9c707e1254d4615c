//! The collector thread: drains the ring through the injector's own mapping, never
//! touching the target, orders records by time across the per-CPU sub-rings, pairs them
//! into calls and hands those to the output.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring_abi::Kind;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::output::Sink;
use crate::ring::{Record, RingReader};
use crate::spans::{Call, Clock, Pairer, SiteMeta};

/// Per-site totals.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SiteCounts {
    pub entries: u64,
    pub returns: u64,
    /// Records of this site the target dropped (ring full, or lost slot races).
    pub dropped: u64,
}

/// What the collector hands the output thread.
pub enum Out {
    Calls(Vec<Call>),
    /// Records were dropped since the last gap: (site, how many), by site.
    Gap(Vec<(u32, u64)>),
}

/// How often drops are looked for, and at most reported.
const GAP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default, serde::Serialize)]
pub struct Totals {
    pub sites: Vec<SiteCounts>,
    /// Records the target dropped: ring full, or lost slot races.
    pub dropped: u64,
    /// Lossless mode: waits for room that ran out (each dropped its record and turned
    /// waiting off until the collector caught up).
    pub wait_timeouts: u64,
    /// Of those, because the ring was full (the collector fell behind).
    pub dropped_full: u64,
    /// Records that failed validation.
    pub corrupt: u64,
    pub records: u64,
    /// Tickets writers took; `tickets - consumed` were taken but never published (a
    /// writer stopped mid-record: the target died, or a thread was killed).
    pub tickets: u64,
    pub consumed: u64,
    /// Tickets taken but never published, stepped over at the end.
    pub unpublished: u64,
    pub calls: u64,
    pub unmatched_returns: u64,
    pub abandoned: u64,
    /// What libraries counted (`http_injected`: `traceparent` lines written into outgoing
    /// requests; `http_panics`: server spans ended by a handler's panic).
    pub lib_counters: Vec<(&'static str, u64)>,
    /// Calls that had not returned when collection stopped.
    pub open_calls: u64,
    pub output_errors: u64,
    /// Calls the output side could not take (it fell far behind).
    pub output_dropped: u64,
}

/// Slack for a writer between reading the clock and publishing its record, and for
/// clock differences between CPUs: records are released only when this much older than
/// what every sub-ring has been read up to.
const SETTLE: Duration = Duration::from_millis(2);

/// A poll that returns this many records means the writers are busy: poll again at once.
const BUSY_BATCH: usize = 1024;
/// Otherwise, the longest to let records gather before the next poll, busy or idle: each
/// wake costs ~20 µs of CPU on a virtual machine (timer programming, the switches), so
/// waking every 2 ms cost an idle inject 1% of a core.
const GATHER: Duration = Duration::from_millis(16);
/// Records a second one P can publish into its sub-ring (`cargo xtask bench drain`
/// measured 6.1 million with both cores of a 2-core machine writing), with headroom: no
/// sleep is longer than a quarter of a sub-ring takes to fill at this rate, so a burst
/// that starts while the reader sleeps finds room.
const WRITE_RATE_MAX: f64 = 4e6;

/// The longest sleep between polls for sub-rings of `capacity` slots.
fn gather_for(capacity: u64) -> Duration {
    GATHER.min(Duration::from_secs_f64(capacity as f64 / 4.0 / WRITE_RATE_MAX)).max(Duration::from_micros(50))
}

/// Batches of finished calls in flight to the output thread.
const QUEUE: usize = 4096;
/// Calls the collector holds back while the output thread is behind, before it drops
/// (and counts) them rather than stop draining the ring (~1 KiB each).
const HELD_MAX: usize = 2_000_000;
/// In lossless mode, before it waits for the output instead.
const HELD_LOSSLESS: usize = 100_000;

/// The output thread: formats and writes calls; returns how many failed to write.
pub fn output(
    rx: Receiver<Out>,
    mut sink: Sink,
    sites: Vec<SiteMeta>,
    clock: Arc<std::sync::Mutex<Clock>>,
    exe: Option<(Arc<memmap2::Mmap>, u64)>,
) -> u64 {
    // Interface values are named from the type descriptors in the executable file.
    let bin = exe.as_ref().and_then(|(map, _)| go_abi::GoBinary::parse(&map[..]).ok());
    let bias = exe.as_ref().map_or(0, |(_, b)| *b);
    let types_base = bin.as_ref().and_then(|b| b.types_base());
    let mut cache: std::collections::HashMap<(u64, bool), Option<String>> = std::collections::HashMap::new();
    let mut namer = |word: u64, empty: bool| -> Option<String> {
        let (bin, types) = (bin.as_ref()?, types_base?);
        cache
            .entry((word, empty))
            .or_insert_with(|| {
                let link = word.checked_sub(bias)?;
                let ty = if empty { link } else { bin.itab_type(link)? };
                bin.type_name(types, ty)
            })
            .clone()
    };
    // Callers, from the pclntab: the call instruction ends at the return address, so its
    // line is that of the byte before.
    let mut caller_cache: std::collections::HashMap<u64, Option<crate::output::Caller>> =
        std::collections::HashMap::new();
    let mut callers = |ret: u64| -> Option<crate::output::Caller> {
        let bin = bin.as_ref()?;
        if caller_cache.len() > 1 << 16 {
            caller_cache.clear();
        }
        caller_cache
            .entry(ret)
            .or_insert_with(|| {
                let pc = ret.checked_sub(bias)?.checked_sub(1)?;
                let f = bin.pclntab.find(pc)?;
                let (file, line) = bin.pclntab.line(&f, pc)?;
                Some(crate::output::Caller {
                    function: f.name.to_string(),
                    file: file.into_owned(),
                    line: u32::try_from(line).ok()?,
                })
            })
            .clone()
    };
    let mut errors = 0;
    let mut last_flush = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Out::Calls(batch)) => {
                let c = *clock.lock().unwrap_or_else(|e| e.into_inner());
                for call in &batch {
                    if sink.write(call, &sites, &c, &mut namer, &mut callers).is_err() {
                        errors += 1;
                    }
                }
            }
            Ok(Out::Gap(by_site)) => {
                if sink.gap(&by_site, &sites).is_err() {
                    errors += 1;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        if sink.tick().is_err() {
            errors += 1;
        }
        if last_flush.elapsed() > Duration::from_millis(200) {
            let _ = sink.flush();
            last_flush = Instant::now();
        }
    }
    if sink.finish().is_err() {
        errors += 1;
    }
    errors
}

/// Drains `reader` until `stop` is set and the ring is empty (or writers that took a
/// ticket have had `grace` to publish), handing finished calls to `tx`.
pub fn run(
    mut reader: RingReader,
    mut pairer: Pairer,
    tx: Sender<Out>,
    clock: Arc<std::sync::Mutex<Clock>>,
    stop: Arc<AtomicBool>,
    grace: Duration,
    lossless: bool,
) -> Totals {
    let nsites = pairer.site_count();
    let mut totals = Totals { sites: vec![SiteCounts::default(); nsites], ..Default::default() };
    let mut batch: Vec<Record> = Vec::with_capacity(8192);
    let mut pending: Vec<std::collections::VecDeque<Record>> =
        (0..reader.rings()).map(|_| std::collections::VecDeque::new()).collect();
    let mut last_seen = vec![0u64; reader.rings() as usize];
    let mut seen_up_to = vec![0u64; reader.rings() as usize];
    let mut calls: Vec<Call> = Vec::new();
    let mut held: std::collections::VecDeque<Vec<Call>> = std::collections::VecDeque::new();
    let mut drops_seen = vec![0u64; nsites];
    let mut last_gap_check = Instant::now();
    let mut held_calls = 0usize;
    let settle_ticks = (clock.lock().map_or(3e9, |c| c.hz()) * SETTLE.as_secs_f64()) as u64;
    // One sub-ring is already in order.
    let single_ring = reader.rings() == 1;
    let gather = gather_for(reader.capacity());
    let mut idle = Duration::from_micros(50);
    let mut last_poll = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut last_refine = Instant::now();
    loop {
        batch.clear();
        let round = crate::spans::rdtsc();
        let n = reader.poll(&mut batch, 8192);
        let since_last_poll = last_poll.elapsed();
        last_poll = Instant::now();
        for r in &batch {
            let c = &mut totals.sites[r.site as usize];
            match r.kind {
                Kind::Entry => c.entries += 1,
                Kind::Return => c.returns += 1,
            }
        }
        totals.records += n as u64;
        let stopping = stop.load(Ordering::Acquire);
        // After the stop, wait for every ticket to be published, giving up only when no
        // record has come for `grace` (a writer that died mid-record never publishes).
        if stopping && (n > 0 || stopping_since.is_none()) {
            stopping_since = Some(Instant::now());
        }
        let mut drained =
            stopping && (reader.consumed() >= reader.head() || stopping_since.is_some_and(|t| t.elapsed() > grace));
        let skipped = if drained && reader.consumed() < reader.head() { reader.skip_unpublished() } else { 0 };
        if skipped > 0 {
            // Tickets never published: stepped over; read what follows them.
            totals.unpublished += skipped;
            stopping_since = Some(Instant::now());
            drained = false;
        }
        // Each sub-ring's records stay in ticket order (the true order of its writers);
        // the streams are merged by time stamp. Everything published before this round
        // began has been read from the sub-rings that were drained; a sub-ring cut short
        // is known only up to its last record. Release what is older than all of that.
        for r in batch.drain(..) {
            let ring = r.ring as usize;
            last_seen[ring] = last_seen[ring].max(r.tsc);
            pending[ring].push_back(r);
        }
        for (ring, &empty) in reader.drained().iter().enumerate() {
            seen_up_to[ring] = if empty { reader.written_up_to(ring as u32, round) } else { last_seen[ring] };
        }
        let watermark = seen_up_to.iter().copied().min().unwrap_or(0).saturating_sub(settle_ticks);
        loop {
            let next = pending
                .iter()
                .enumerate()
                .filter_map(|(i, q)| q.front().map(|r| (r.tsc, i)))
                .min()
                .filter(|&(tsc, _)| drained || single_ring || tsc <= watermark);
            let Some((_, i)) = next else { break };
            if let Some(r) = pending[i].pop_front() {
                pairer.push(r, &mut calls);
                pairer.flush_expired(&mut calls);
            }
        }
        // Hand calls to the output thread; when it is behind, hold them here (bounded)
        // rather than stop draining the ring.
        if !calls.is_empty() {
            held_calls += calls.len();
            held.push_back(std::mem::take(&mut calls));
        }
        while let Some(b) = held.pop_front() {
            let n = b.len();
            match tx.try_send(Out::Calls(b)) {
                Ok(()) => {
                    totals.calls += n as u64;
                    held_calls -= n;
                }
                Err(TrySendError::Full(Out::Calls(b))) => {
                    held.push_front(b);
                    break;
                }
                Err(TrySendError::Full(Out::Gap(_))) => break,
                Err(TrySendError::Disconnected(_)) => {
                    totals.output_dropped += n as u64;
                    held_calls -= n;
                }
            }
        }
        // Lossless: rather than hold more (or drop), wait for the output; the ring fills
        // meanwhile and the writers wait for it.
        while lossless && held_calls > HELD_LOSSLESS {
            let Some(b) = held.pop_front() else { break };
            let n = b.len();
            held_calls -= n;
            match tx.send(Out::Calls(b)) {
                Ok(()) => totals.calls += n as u64,
                Err(_) => totals.output_dropped += n as u64,
            }
        }
        while held_calls > HELD_MAX {
            let Some(b) = held.pop_front() else { break };
            held_calls -= b.len();
            totals.output_dropped += b.len() as u64;
        }
        // A writer that waited too long turned lossless waiting off (a stalled reader must
        // not stall every writer); this reader is running, so it goes on again.
        if lossless && !reader.waiting() {
            reader.resume_waiting();
        }
        if last_gap_check.elapsed() >= GAP_EVERY || (drained && pending.iter().all(|q| q.is_empty())) {
            report_drops(&reader, &mut drops_seen, &pairer, &tx, last_gap_check.elapsed(), lossless);
            last_gap_check = Instant::now();
        }
        if drained && pending.iter().all(|q| q.is_empty()) {
            // Everything still held goes to the output thread, waiting for room.
            for b in held.drain(..) {
                let n = b.len() as u64;
                match tx.send(Out::Calls(b)) {
                    Ok(()) => totals.calls += n,
                    Err(_) => totals.output_dropped += n,
                }
            }
            break;
        }
        if last_refine.elapsed() > Duration::from_secs(1) {
            if let Ok(mut c) = clock.lock() {
                c.refine();
            }
            last_refine = Instant::now();
        }
        // A full batch: the writers are ahead, read on at once. A few records: let more
        // gather (waking for every handful cost more than reading them), but for no longer
        // than a sub-ring takes to fill a quarter at the rate these came in (as if they had
        // all gone to one).
        if n >= BUSY_BATCH {
            idle = Duration::from_micros(50);
            continue;
        }
        if n > 0 {
            idle = Duration::from_micros(50);
            let quarter = since_last_poll.mul_f64(reader.capacity() as f64 / 4.0 / n as f64);
            std::thread::sleep(gather.min(quarter));
            continue;
        }
        std::thread::sleep(idle);
        idle = (idle * 2).min(gather);
    }
    totals.tickets = reader.head();
    totals.consumed = reader.consumed();
    totals.dropped = reader.dropped();
    totals.dropped_full = reader.dropped_full();
    totals.wait_timeouts = reader.wait_timeouts();
    totals.corrupt = reader.corrupt;
    let mut last = Vec::new();
    pairer.finish(&mut last);
    totals.calls += last.len() as u64;
    let _ = tx.try_send(Out::Calls(last));
    for (site, d) in reader.site_drops().into_iter().enumerate() {
        if let Some(c) = totals.sites.get_mut(site) {
            c.dropped = d;
        }
    }
    totals.unmatched_returns = pairer.unmatched_returns;
    totals.abandoned = pairer.abandoned;
    totals.lib_counters = pairer.lib_counters();
    totals.open_calls = pairer.open_calls() as u64;
    totals
}

/// Reports records dropped since the last look: a warning on stderr and a gap in the
/// output, by function.
fn report_drops(
    reader: &RingReader,
    seen: &mut [u64],
    pairer: &Pairer,
    tx: &Sender<Out>,
    over: Duration,
    lossless: bool,
) {
    let now = reader.site_drops();
    let mut by_site: Vec<(u32, u64)> = now
        .iter()
        .zip(seen.iter())
        .enumerate()
        .filter(|(_, (n, s))| n > s)
        .map(|(i, (n, s))| (i as u32, n - s))
        .collect();
    seen.copy_from_slice(&now[..seen.len().min(now.len())]);
    if by_site.is_empty() {
        return;
    }
    by_site.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let total: u64 = by_site.iter().map(|s| s.1).sum();
    let names: Vec<String> = by_site
        .iter()
        .take(3)
        .map(|&(i, n)| format!("{} {n}", pairer.sites().get(i as usize).map_or("?", |m| m.name.as_str())))
        .collect();
    let advice = if lossless {
        "the program waited for room until inject fell too far behind; --ring-slots N gives the ring more"
    } else {
        "--lossless makes the program wait for room instead, --ring-slots N gives the ring more"
    };
    eprintln!(
        "inject: warning: {total} records dropped in the last {:.1} s, the ring was full ({}{}); {advice}",
        over.as_secs_f64(),
        names.join(", "),
        if by_site.len() > 3 { ", ..." } else { "" }
    );
    let _ = tx.try_send(Out::Gap(by_site));
}

/// The collector's channel to the output thread.
pub fn channel() -> (Sender<Out>, Receiver<Out>) {
    crossbeam_channel::bounded(QUEUE)
}
