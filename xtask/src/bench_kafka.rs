//! `cargo xtask bench kafka`: what kafka-go tracing costs a Kafka producer service. The
//! kafkasvc fixture in producer mode (kafka-go's `Writer`, leader acks, a 5 ms batch
//! timeout) serves `/produce?n=10&key=K`: one `WriteMessages` call of 10 keyed messages a
//! request, as a service writing the events of each request it handles does; keys cycle
//! over 16 values on a topic of 3 partitions. A single-node Apache Kafka broker (KRaft, see
//! `xtask::kafka`) runs on loopback. The load fixture drives the service (HTTP/1.1
//! keep-alive, a closed loop of 8 clients) for a few seconds at a time, in rounds that
//! interleave three setups on the same service process:
//! - baseline: nothing attached;
//! - inject: attached with no flags (net/http server spans and kafka-go PRODUCER spans,
//!   context, lineage: what a user gets), exporting every span over OTLP/HTTP to the test
//!   receiver in a process of its own;
//! - inject `--lib kafka-go`: the PRODUCER spans alone, so that the receiver's count is
//!   theirs and is compared with the `WriteMessages` calls made.
//!
//! The service (and inject, attached to it) run on core 0; the broker, the load generator
//! and the span receiver on core 1, standing for the other machines a producer talks to.
//! The order of the setups rotates across rounds; ratios are the medians of each round's
//! own. Each request waits for its batch (the batch timeout) and the broker's answer, so
//! the service is latency-bound, as such a service is: the throughput shows the latency
//! tracing adds, and the CPU each request took (the service's, inject's, the broker's, the
//! load generator's, the receiver's and the whole machine's, read from /proc and
//! getrusage around each window) shows what it costs. Goal: inject (no flags) keeps at
//! least 95% of the baseline's requests per second.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use xtask::kafka::Kafka;
use xtask::{Flavor, KAFKA_GO, build_fixture, build_pinned_fixture, toolchain};

use crate::bench_db::pin;
use crate::bench_export::{
    Receiver, attach_exporting_with, cpu_seconds, detach_summary, machine_busy_seconds, median, start_listening,
};

const ROUNDS: usize = 6;
const SECONDS: u32 = 5;
const CLIENTS: u32 = 8;
/// Messages per request (one `WriteMessages` call).
const MESSAGES: u32 = 10;
const KEYS: u32 = 16;
const PARTITIONS: &str = "3";
const TOPIC: &str = "bench";

/// The setups, in the order of a round that starts with the first.
const SETUPS: [&str; 3] = ["baseline", "inject", "inject --lib kafka-go"];

/// The processes whose CPU a window reads, beside the load generator's.
struct Pids {
    service: u32,
    broker: u32,
    receiver: u32,
}

/// What the CPU per request is split into (µs a request each).
const PARTS: [&str; 5] = ["service", "inject", "broker", "load", "receiver"];

/// One load window: requests answered 200, their rate and median latency; the CPU per
/// request (µs) of each of PARTS and of the whole machine, how busy the machine was (of
/// its 2 cores) and inject's process (cores); for inject, the spans the receiver got,
/// records inject dropped (ring) and spans its exporter dropped.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    ok: u64,
    rps: f64,
    p50_us: f64,
    cpu: [f64; 5],
    machine: f64,
    machine_cores: f64,
    inject_cores: f64,
    received: u64,
    dropped: u64,
    export_dropped: u64,
}

/// CPU seconds of the children this process has waited for (the load generator's, once
/// it exited).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs the load (on core 1) against the service at `urls`, with inject's process
/// `tracer` if attached, reading the CPU of every process involved and of the machine.
fn measured(load_exe: &Path, urls: &str, pids: &Pids, tracer: Option<u32>) -> Result<Window> {
    let cpu = || -> Result<[f64; 5]> {
        let t = tracer.map(cpu_seconds).transpose()?.unwrap_or(0.0);
        let (s, b, r) = (cpu_seconds(pids.service)?, cpu_seconds(pids.broker)?, cpu_seconds(pids.receiver)?);
        Ok([s, t, b, children_cpu_seconds(), r])
    };
    let (c0, m0, start) = (cpu()?, machine_busy_seconds()?, std::time::Instant::now());
    pin(Some(1))?;
    let load = load(load_exe, urls);
    pin(Some(0))?;
    let (ok, rps, p50_us) = load?;
    let (c1, m1, wall) = (cpu()?, machine_busy_seconds()?, start.elapsed().as_secs_f64());
    let per = |a: f64, b: f64| (b - a) * 1e6 / (ok.max(1) as f64);
    let mut cpu = [0.0; 5];
    for (i, slot) in cpu.iter_mut().enumerate() {
        *slot = per(c0[i], c1[i]);
    }
    Ok(Window {
        ok,
        rps,
        p50_us,
        cpu,
        machine: per(m0, m1),
        machine_cores: (m1 - m0) / wall,
        inject_cores: (c1[1] - c0[1]) / wall,
        ..Window::default()
    })
}

/// One window of the load fixture: requests answered 200, requests per second, median
/// latency (µs).
fn load(exe: &Path, urls: &str) -> Result<(u64, f64, f64)> {
    let duration = format!("{SECONDS}s");
    let c = CLIENTS.to_string();
    let out = xtask::output(Command::new(exe).args(["-url", urls, "-duration", &duration, "-c", &c]))?;
    let line = out.lines().find(|l| l.starts_with("RESULT ")).context("no RESULT line")?;
    ensure!(line.contains(" errors=0 ") && line.contains(" unexpected=0 "), "failed requests: {line}");
    let field = |k: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(k)).with_context(|| k.to_string());
    Ok((field("ok=")?.parse()?, field("rps=")?.parse()?, field("p50_us=")?.parse()?))
}

pub fn kafka() -> Result<()> {
    let started = std::time::Instant::now();
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    if !xtask::kafka::require_kafka()? {
        bail!("bench kafka needs Java 17 and the Kafka broker (or mvn to fetch it)");
    }
    // SAFETY: sysconf with a valid name.
    let two = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } >= 2;
    ensure!(two, "bench kafka needs two cores (one for the producer, one for the broker)");
    let inject = xtask::inject_binary()?;
    let receiver_bin = crate::bench_export::receiver_binary(&inject)?;
    let versions = xtask::go_versions()?;
    let tc = toolchain(versions.last().context("no Go")?)?;
    let kafka_go = xtask::kafka_go_newest(&tc.version);
    let producer = build_pinned_fixture("kafkasvc", None, &[(KAFKA_GO, kafka_go)], &tc, Flavor::Default)?;
    let load_exe = build_fixture("load", &tc, Flavor::Default)?;
    pin(Some(1))?;
    let result = (|| -> Result<()> {
        let mut rx = Receiver::start(&receiver_bin, "http")?;
        let broker = Kafka::start()?;
        pin(Some(0))?;
        let mut c = Command::new(&producer);
        c.args(["-mode", "producer", "-brokers", &broker.addr(), "-topic", TOPIC, "-partitions", PARTITIONS]);
        let (mut server, addr) = start_listening(c, "READY")?;
        println!(
            "kafka: GET /produce?n={MESSAGES}&key=K on the kafkasvc producer (Go {}, kafka-go {kafka_go}; one \
             WriteMessages call of {MESSAGES} keyed messages a request, acks from the leader, 5 ms batch timeout) \
             to Apache Kafka {} (one broker, topic of {PARTITIONS} partitions, {KEYS} keys), a closed loop of \
             {CLIENTS} HTTP clients for {SECONDS} s, {ROUNDS} interleaved rounds, medians:",
            tc.version,
            xtask::kafka::KAFKA_VERSION
        );
        println!("  the producer and inject on core 0; the broker, the load and the span receiver on core 1");
        let pids = Pids { service: server.id(), broker: broker.pid().context("broker pid")?, receiver: rx.pid() };
        let rounds = rounds(&inject, &load_exe, &mut rx, &addr, &pids);
        let _ = server.kill();
        let _ = server.wait();
        drop(broker);
        report(&rounds?)
    })();
    pin(None)?;
    eprintln!("kafka: {:.0} s in all", started.elapsed().as_secs_f64());
    result
}

/// The rounds: each runs the three setups back to back, starting with a different one.
fn rounds(inject: &Path, load_exe: &Path, rx: &mut Receiver, addr: &str, pids: &Pids) -> Result<Vec<[Window; 3]>> {
    let urls = (1..=KEYS).map(|k| format!("http://{addr}/produce?n={MESSAGES}&key=user-{k}")).collect::<Vec<_>>();
    let urls = urls.join(",");
    // Warm up the service, its connections to the broker and the broker's JIT.
    for _ in 0..2 {
        measured(load_exe, &urls, pids, None)?;
    }
    let summary = xtask::workspace_root().join("target/bench/kafka-summary.json");
    let endpoint = rx.endpoint.clone();
    let mut out = Vec::new();
    for round in 0..ROUNDS {
        let mut row = [Window::default(); 3];
        for k in 0..3 {
            let setup = (round + k) % 3;
            row[setup] = if setup == 0 {
                measured(load_exe, &urls, pids, None)?
            } else {
                let libs: &[&str] = if setup == 1 { &[] } else { &["--lib", "kafka-go"] };
                let spans0 = rx.spans()?;
                let c = attach_exporting_with(inject, pids.service, libs, &endpoint, &summary)?;
                // Detached before a failed window's error is returned.
                let w = measured(load_exe, &urls, pids, Some(c.id()));
                let s = detach_summary(c, &summary)?;
                let mut w = w?;
                w.dropped = s["dropped"].as_u64().context("dropped in the summary")?;
                let otlp = &s["otlp"];
                w.export_dropped = otlp["dropped_queue_full"].as_u64().unwrap_or(0)
                    + otlp["dropped_export_failed"].as_u64().unwrap_or(0);
                // inject exports what it has before it exits; the receiver counts as the
                // requests arrive, which is done by then.
                w.received = rx.spans()? - spans0;
                w
            };
        }
        eprintln!(
            "  round {}: baseline {:.0}, inject {:.0}, inject --lib kafka-go {:.0} requests/s",
            round + 1,
            row[0].rps,
            row[1].rps,
            row[2].rps
        );
        out.push(row);
    }
    Ok(out)
}

fn report(rounds: &[[Window; 3]]) -> Result<()> {
    let col = |s: usize, f: &dyn Fn(&Window) -> f64| median(rounds.iter().map(|r| f(&r[s])).collect());
    // Each round runs the setups back to back: its own ratio is what the machine's drift
    // between rounds disturbs least.
    let paired =
        |s: usize, f: &dyn Fn(&Window, &Window) -> f64| median(rounds.iter().map(|r| f(&r[s], &r[0])).collect());
    let ratio = |s: usize| paired(s, &|x, b| x.rps / b.rps);
    let sum = |s: usize, f: &dyn Fn(&Window) -> u64| rounds.iter().map(|r| f(&r[s])).sum::<u64>();
    let lossy = |s: usize| sum(s, &|w| w.dropped + w.export_dropped) > 0;
    println!("  {:<22} {:>10} {:>10} {:>8}", "", "requests/s", "messages/s", "p50 µs");
    for (s, name) in SETUPS.iter().enumerate() {
        let rps = col(s, &|w| w.rps);
        let versus = if s == 0 {
            String::new()
        } else {
            // The spread of the rounds' own ratios: how far one round can be trusted.
            let (lo, hi) = rounds
                .iter()
                .map(|r| r[s].rps / r[0].rps)
                .fold((f64::MAX, 0.0_f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
            format!("   {:.3} of baseline (rounds {lo:.2} to {hi:.2})", ratio(s))
        };
        let label = if lossy(s) { " (measured while records were dropped)" } else { "" };
        println!(
            "  {name:<22} {rps:>10.0} {:>10.0} {:>8.0}{versus}{label}",
            rps * f64::from(MESSAGES),
            col(s, &|w| w.p50_us)
        );
    }
    println!("  CPU per request (µs; in brackets the change from the baseline, medians of each round's own):");
    for (s, name) in SETUPS.iter().enumerate() {
        let parts: Vec<String> = PARTS
            .iter()
            .enumerate()
            .filter(|&(p, _)| s > 0 || p != 1)
            .map(|(p, part)| {
                let v = col(s, &|w| w.cpu[p]);
                match (s, p) {
                    (0, _) => format!("{part} {v:.0}"),
                    (_, 1) => format!("{part} {v:.0} ({:.3} cores)", col(s, &|w| w.inject_cores)),
                    _ => format!("{part} {v:.0} ({:+.0})", paired(s, &|x, b| x.cpu[p] - b.cpu[p])),
                }
            })
            .collect();
        println!("    {name:<22} {}", parts.join(", "));
    }
    println!(
        "  the machine, medians: CPU per request (µs), cores busy; the rest: its CPU less the above (other \
         processes, interrupts)"
    );
    for (s, name) in SETUPS.iter().enumerate() {
        println!(
            "    {name:<22} {:.0} µs, {:.2} of 2 cores busy; the rest {:.0} µs a request",
            col(s, &|w| w.machine),
            col(s, &|w| w.machine_cores),
            col(s, &|w| w.machine - w.cpu.iter().sum::<f64>())
        );
    }
    let (calls, spans) = (sum(2, &|w| w.ok), sum(2, &|w| w.received));
    println!(
        "  inject --lib kafka-go: {calls} WriteMessages calls made (requests answered 200), {spans} PRODUCER spans \
         received{}",
        if spans == calls { "" } else { " (NOT one per call)" }
    );
    let (calls, spans) = (sum(1, &|w| w.ok), sum(1, &|w| w.received));
    println!(
        "  inject: {calls} requests answered 200, {spans} spans received (want {}: a SERVER and a PRODUCER span \
         each){}",
        2 * calls,
        if spans == 2 * calls { "" } else { " (NOT two per request)" }
    );
    for (s, name) in SETUPS.iter().enumerate().skip(1) {
        println!(
            "  {name}: records dropped {} (ring), spans dropped by the exporter {}",
            sum(s, &|w| w.dropped),
            sum(s, &|w| w.export_dropped)
        );
    }
    let r = ratio(1);
    println!(
        "{} inject keeps {:.1}% of the baseline's requests per second (goal >= 95%){}; with --lib kafka-go {:.1}%{}",
        if r >= 0.95 { "PASS" } else { "FAIL" },
        100.0 * r,
        if lossy(1) { ", measured while records were dropped" } else { "" },
        100.0 * ratio(2),
        if lossy(2) { ", measured while records were dropped" } else { "" }
    );
    Ok(())
}
