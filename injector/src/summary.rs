//! The exit summary: per-function counts, drops, pauses and what removal did, on stderr
//! and as JSON (`--summary-json`), with every number exact.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use crate::backend::{Installed, Removal};
use crate::collect;
use crate::otlp::ExportTotals;
use crate::plan::ProbeSite;

#[derive(serde::Serialize)]
struct SiteSummary<'a> {
    name: &'a str,
    verdict: String,
    /// What put its probes in: `trampoline`, `uprobe`, or null when refused.
    backend: Option<&'static str>,
    entries: u64,
    returns: u64,
    /// Records of this function the target dropped (ring full).
    dropped: u64,
    /// Where the jumps go (entry first, then exits), for matching against profiles and
    /// disassembly.
    jumps: Vec<JumpSummary>,
}

#[derive(serde::Serialize)]
struct JumpSummary {
    at: u64,
    /// The original byte the jump's displacement ends with (a punned jump), if any.
    pinned: Option<u8>,
}

impl JumpSummary {
    fn of(site: &ProbeSite) -> Vec<JumpSummary> {
        if site.via != crate::plan::Via::Trampoline {
            return Vec::new();
        }
        let Ok(entry) = &site.entry_patch else { return Vec::new() };
        let exits = site.returns.as_deref().unwrap_or_default().iter().map(|r| &r.redirect);
        std::iter::once(&entry.redirect).chain(exits).map(|r| JumpSummary { at: r.at, pinned: r.pinned }).collect()
    }
}

#[derive(serde::Serialize)]
struct Summary<'a> {
    stop: String,
    sites: Vec<SiteSummary<'a>>,
    records: u64,
    tickets: u64,
    consumed: u64,
    unpublished: u64,
    dropped: u64,
    dropped_full: u64,
    /// Lossless mode was on (the program waited for room rather than drop).
    lossless: bool,
    wait_timeouts: u64,
    corrupt: u64,
    calls: u64,
    unmatched_returns: u64,
    abandoned: u64,
    /// Library counters (`http_injected`, `http_panics`), flattened into the summary.
    #[serde(flatten)]
    lib_counters: std::collections::BTreeMap<&'static str, u64>,
    open_calls: u64,
    output_dropped: u64,
    output_errors: u64,
    install_pause_ms: f64,
    prepare_pause_ms: f64,
    install_pause: crate::backend::PauseParts,
    prepare_pause: crate::backend::PauseParts,
    /// Memory inject added to the target: the ring (all of it allocated before the
    /// probes go in, charged to inject) and the trampoline areas.
    ring_bytes: u64,
    trampoline_bytes: u64,
    ring_reserve_ms: f64,
    remove_pause_ms: Option<f64>,
    restored: Option<usize>,
    /// Uprobes the kernel took out at the end.
    uprobes: Option<usize>,
    unmapped: Option<bool>,
    kept_bytes: Option<u64>,
    threads: usize,
    otlp: Option<&'a ExportTotals>,
    metrics: Option<&'a crate::metrics::export::MetricsTotals>,
}

/// What a session's summary is made of.
pub struct Facts<'a> {
    pub sites: &'a [ProbeSite],
    pub installed: &'a Installed,
    pub totals: &'a collect::Totals,
    pub export: Option<&'a ExportTotals>,
    pub metrics: Option<&'a crate::metrics::export::MetricsTotals>,
    pub removal: Option<&'a Removal>,
}

/// `n thing` or `n things`.
pub fn count(n: usize, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

/// Prints the exit summary on stderr and writes it to `json` (`--summary-json`); `stop`
/// says why the session ended.
pub fn report(facts: &Facts<'_>, stop: String, json: Option<&std::path::Path>) -> Result<()> {
    let Facts { sites, installed: inst, totals, export, metrics, removal } = *facts;
    let summary = Summary {
        stop,
        sites: sites
            .iter()
            .zip(&totals.sites)
            .map(|(s, c)| SiteSummary {
                name: &s.name,
                verdict: s.verdict(),
                backend: s.backend(),
                entries: c.entries,
                returns: c.returns,
                dropped: c.dropped,
                jumps: JumpSummary::of(s),
            })
            .collect(),
        records: totals.records,
        tickets: totals.tickets,
        consumed: totals.consumed,
        unpublished: totals.unpublished,
        dropped: totals.dropped,
        dropped_full: totals.dropped_full,
        lossless: inst.lossless,
        wait_timeouts: totals.wait_timeouts,
        calls: totals.calls,
        unmatched_returns: totals.unmatched_returns,
        abandoned: totals.abandoned,
        lib_counters: totals.lib_counters.iter().copied().collect(),
        open_calls: totals.open_calls,
        output_dropped: totals.output_dropped,
        output_errors: totals.output_errors,
        corrupt: totals.corrupt,
        install_pause_ms: inst.pause.as_secs_f64() * 1e3,
        prepare_pause_ms: inst.prepare_pause.as_secs_f64() * 1e3,
        install_pause: inst.pause_parts,
        prepare_pause: inst.prepare_parts,
        ring_bytes: inst.ring_bytes,
        trampoline_bytes: inst.code_bytes,
        ring_reserve_ms: inst.reserve_time.as_secs_f64() * 1e3,
        remove_pause_ms: removal.map(|r| r.pause.as_secs_f64() * 1e3),
        restored: removal.map(|r| r.restored),
        uprobes: removal.map(|r| r.uprobes),
        unmapped: removal.map(|r| r.unmapped),
        kept_bytes: removal.map(|r| r.kept.map_or(0, |k| k.1)),
        threads: inst.threads,
        otlp: export,
        metrics,
    };
    if let Some(f) = crate::filter::active() {
        let (shown, out) = (f.shown.load(Ordering::Relaxed), f.left_out.load(Ordering::Relaxed));
        eprintln!("inject: --where {:?}: {shown} calls shown, {out} left out", f.text());
    }
    // The functions the user named one by one; a library's probes as one line (their
    // records), its support probes (goroutine lineage) under the library that needs them.
    let mut libs: Vec<(&str, usize, u64)> = Vec::new();
    for (s, site) in summary.sites.iter().zip(sites) {
        match site.role {
            crate::plan::Role::Func => {
                if s.entries + s.returns > 0 || !s.verdict.starts_with("refused") {
                    eprintln!("inject: {:<50} {:>10} calls {:>10} returns", s.name, s.entries, s.returns);
                }
            }
            crate::plan::Role::Lib(p) => {
                let lib = crate::libs::library(p);
                let name = if lib.support() { "libraries' goroutine lineage" } else { lib.name() };
                match libs.iter_mut().find(|l| l.0 == name) {
                    Some(l) => {
                        l.1 += 1;
                        l.2 += s.entries + s.returns;
                    }
                    None => libs.push((name, 1, s.entries + s.returns)),
                }
            }
        }
    }
    for (name, probes, records) in libs {
        let probes = count(probes, "probe");
        eprintln!("inject: {name:<50} {records:>10} records from {probes}");
    }
    eprintln!(
        "inject: {} records, {} dropped, {} corrupt; stopped: {}{}",
        summary.records,
        summary.dropped,
        summary.corrupt,
        summary.stop,
        match removal {
            Some(r) if r.restored == 0 && r.uprobes > 0 => {
                format!("; removed {} uprobes in {:.2} ms", r.uprobes, r.pause.as_secs_f64() * 1e3)
            }
            Some(r) => format!(
                "; restored {} patches in {:.2} ms{}{}",
                r.restored,
                r.pause.as_secs_f64() * 1e3,
                if r.unmapped { ", unmapped trampolines and ring" } else { "" },
                if r.uprobes > 0 { format!(", removed {} uprobes", r.uprobes) } else { String::new() }
            ) + &r.kept.map_or(String::new(), |(a, n)| {
                format!(
                    "; left the {} KiB of Kafka headers at {a:#x} mapped (batches queued in the process may point there)",
                    n >> 10
                )
            }),
            None => String::new(),
        }
    );
    if let Some(e) = export {
        eprintln!(
            "inject: OTLP {} {}: {} spans exported in {} requests, {} dropped ({} queue full, {} export failed), {} sampled out{}",
            e.protocol,
            e.endpoint,
            e.exported,
            e.requests,
            e.dropped(),
            e.dropped_queue_full,
            e.dropped_export_failed,
            e.sampled_out,
            match &e.last_error {
                Some(err) if e.failed_requests > 0 => format!("; {} requests failed, last: {err}", e.failed_requests),
                _ => String::new(),
            }
        );
    }
    if let Some(path) = json {
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(f, &summary)?;
    }
    Ok(())
}
