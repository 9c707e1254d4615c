//! `cargo xtask bench db`: what database tracing costs a DB-bound HTTP service. The dbsvc
//! fixture's `/order` makes 12 database calls per request (database/sql through lib/pq
//! and pgx's driver, pgx's pool, go-redis) against a PostgreSQL and a redis-server this
//! bench starts on loopback; the load fixture drives it (HTTP/1.1 keep-alive, 8
//! connections) for a few seconds at a time, in rounds that interleave three setups:
//! - baseline: the plain build, nothing attached;
//! - inject: the same process with inject attached (default probes: net/http,
//!   database/sql, pgx and go-redis spans, lineage), exporting every span over OTLP/HTTP
//!   to a receiver process;
//! - otel: the same program built with OpenTelemetry Go's compile-time instrumentations
//!   (otelhttp, otelsql, otelpgx, redisotel; OTLP/HTTP to the same receiver).
//!
//! Twice: DB-bound, the service and inject on core 0 and the servers, the load generator
//! and the span receiver (the other machines a service talks to) on core 1, so the
//! database limits throughput; then CPU-bound, every process on both cores, so any CPU
//! tracing takes shows as lost throughput. Ratios are the medians of each round's own
//! (its setups run back to back, first one, then another: the order rotates; each window
//! starts after a `VACUUM`, so none inherits the dead rows of another). The CPU each
//! request took (the machine's, the service's, inject's, the receiver's) is read from
//! /proc around each window. Goal: DB-bound, inject keeps at least 97% of the baseline's
//! requests per second.

use std::process::{Child, Command};

use anyhow::{Context, Result, ensure};
use xtask::servers::{Postgres, Redis};
use xtask::{Flavor, build_fixture, build_pinned_fixture, toolchain};

use crate::bench_export::{
    Receiver, attach_exporting, cpu_seconds, detach_dropped, machine_busy_seconds, median, start_listening,
};

const ROUNDS: usize = 6;
const SECONDS: u32 = 3;

/// One setup's load window: its throughput, and the CPU it took per request (µs): the
/// whole machine's, and that of the processes watched (service, inject, receiver).
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    rps: f64,
    machine: f64,
    procs: [f64; 3],
}

/// Runs the load against `url` while reading the CPU of the machine and of `pids`.
fn measured(exe: &std::path::Path, url: &str, pids: [Option<u32>; 3]) -> Result<Window> {
    let cpu = |pids: &[Option<u32>; 3]| -> Result<(f64, [f64; 3])> {
        let mut per = [0.0; 3];
        for (slot, pid) in per.iter_mut().zip(pids) {
            if let Some(p) = pid {
                *slot = cpu_seconds(*p)?;
            }
        }
        Ok((machine_busy_seconds()?, per))
    };
    let (m0, p0) = cpu(&pids)?;
    let rps = load(exe, url)?;
    let (m1, p1) = cpu(&pids)?;
    let requests = rps * f64::from(SECONDS);
    let per_request = |a: f64, b: f64| (b - a) * 1e6 / requests;
    let mut procs = [0.0; 3];
    for i in 0..3 {
        procs[i] = per_request(p0[i], p1[i]);
    }
    Ok(Window { rps, machine: per_request(m0, m1), procs })
}

fn load(exe: &std::path::Path, url: &str) -> Result<f64> {
    let out = xtask::output(Command::new(exe).args(["-url", url, "-duration", &format!("{SECONDS}s"), "-c", "8"]))?;
    let line = out.lines().find(|l| l.starts_with("RESULT ")).context("no RESULT line")?;
    ensure!(line.contains(" errors=0 ") && line.contains(" unexpected=0 "), "failed requests: {line}");
    let v = line.split_whitespace().find_map(|kv| kv.strip_prefix("rps=")).context("rps")?;
    Ok(v.parse()?)
}

/// Starts a dbsvc; returns it and its address.
fn start(exe: &std::path::Path, pg: &str, redis: &str, env: &[(&str, &str)]) -> Result<(Child, String)> {
    let mut c = Command::new(exe);
    c.args(["-pg", pg, "-redis", redis]).envs(env.iter().copied());
    start_listening(c, "READY")
}

/// Where each process runs. On one machine everything competes for the same cores, so
/// any CPU the tracer takes is taken from the database too: the service is CPU-bound,
/// not DB-bound. With `Split`, the service (and the tracer attached to it) has core 0 to
/// itself and PostgreSQL, Redis, the load generator and the span receiver share core 1,
/// standing for the other machines a DB-bound service waits on: the database is what
/// limits its throughput, as the goal's wording has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cores {
    Split,
    Shared,
}

/// Pins this thread (and so every process it starts from now on) to `cpu`, or frees it.
pub(crate) fn pin(cpu: Option<usize>) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity take
    // it by pointer and a valid size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        // Not available_parallelism(): it counts the CPUs this thread may use, one once pinned.
        let n = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        for c in 0..n {
            if cpu.is_none_or(|only| only == c) {
                libc::CPU_SET(c, &mut set);
            }
        }
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn db() -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    crate::deps::ensure()?;
    let inject = xtask::inject_binary()?;
    let versions = xtask::go_versions()?;
    let tc = toolchain(versions.last().context("no Go")?)?;
    let pins = [(xtask::PGX, xtask::pgx_newest(&tc.version)), (xtask::GO_REDIS, xtask::go_redis_newest(&tc.version))];
    let plain = build_pinned_fixture("dbsvc", None, &pins, &tc, Flavor::Default)?;
    let otel = build_pinned_fixture("dbsvc", Some("dbsvc-otel"), &pins, &tc, Flavor::Default)?;
    let load_exe = build_fixture("load", &tc, Flavor::Default)?;
    println!(
        "db: GET /order on the dbsvc fixture (Go {}, pgx {}, go-redis {}; 12 database calls a request to a local \
         PostgreSQL and Redis), load at 8 connections for {SECONDS} s, {ROUNDS} interleaved rounds, medians:",
        tc.version, pins[0].1, pins[1].1
    );
    // SAFETY: sysconf with a valid name.
    let two = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } >= 2;
    ensure!(two, "bench db needs two cores (one for the service, one for the servers)");
    let split = setup(Cores::Split, &inject, [&plain, &otel, &load_exe]);
    pin(None)?;
    let shared = setup(Cores::Shared, &inject, [&plain, &otel, &load_exe]);
    let (split, shared) = (split?, shared?);
    println!(
        "{} DB-bound: inject keeps {:.1}% of the baseline's throughput (goal >= 97%), the compile-time \
         instrumentation {:.1}%; sharing the cores (CPU-bound): inject {:.1}%, compile-time {:.1}%",
        if split.0 >= 0.97 { "PASS" } else { "FAIL" },
        100.0 * split.0,
        100.0 * split.1,
        100.0 * shared.0,
        100.0 * shared.1
    );
    Ok(())
}

/// Runs the rounds with the processes placed as `cores` says; returns the throughput
/// inject and the compile-time instrumentation keep (medians of the rounds' ratios).
fn setup(cores: Cores, inject: &std::path::Path, [plain, otel, load_exe]: [&std::path::Path; 3]) -> Result<(f64, f64)> {
    let (far, near) = match cores {
        Cores::Split => (Some(1), Some(0)),
        Cores::Shared => (None, None),
    };
    pin(far)?;
    let mut rx = Receiver::start(&crate::bench_export::receiver_binary(inject)?, "http")?;
    let (mut pg, redis) = (Postgres::start()?, Redis::start()?);
    let (pg_url, redis_addr) = (pg.url(), redis.addr());
    pin(near)?;
    let (mut server, addr) = start(plain, &pg_url, &redis_addr, &[])?;
    let endpoint = rx.endpoint.clone();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_SERVICE_NAME", "dbsvc-otel")];
    let (mut otel_server, otel_addr) = start(otel, &pg_url, &redis_addr, &env)?;
    // The load generator, VACUUM's client: with the servers; inject: with the service.
    let far_load = |url: &str, pids| -> Result<Window> {
        pin(far)?;
        let w = measured(load_exe, url, pids);
        pin(near)?;
        w
    };
    let result = (|| -> Result<(f64, f64)> {
        // Orders cycle over eight rows: concurrent requests rarely wait on one row's lock.
        let url =
            |a: &str| (1..=8).map(|i| format!("http://{a}/order?sku=sku-{i}&qty=0")).collect::<Vec<_>>().join(",");
        // Warm up both services, their connections and the servers.
        pin(far)?;
        load(load_exe, &url(&addr))?;
        load(load_exe, &url(&otel_addr))?;
        pin(near)?;
        let (mut base_w, mut inj_w, mut off_w) = (Vec::new(), Vec::new(), Vec::new());
        let rx_pid = Some(rx.pid());
        let mut dropped = 0;
        let spans0 = rx.spans()?;
        let summary = xtask::workspace_root().join("target/bench/db-summary.json");
        for round in 0..ROUNDS {
            // Each round starts with a different setup: none is always the one that runs
            // after the others have warmed (or tired) the servers.
            for k in 0..3 {
                pin(far)?;
                pg.vacuum()?;
                pin(near)?;
                match (round + k) % 3 {
                    0 => base_w.push(far_load(&url(&addr), [Some(server.id()), None, None])?),
                    1 => {
                        let c = attach_exporting(inject, server.id(), &endpoint, &summary)?;
                        inj_w.push(far_load(&url(&addr), [Some(server.id()), Some(c.id()), rx_pid])?);
                        dropped += detach_dropped(c, &summary)?;
                    }
                    _ => off_w.push(far_load(&url(&otel_addr), [Some(otel_server.id()), None, rx_pid])?),
                }
            }
            eprintln!(
                "  round {}: baseline {:.0}, inject {:.0}, otel {:.0} requests/s",
                round + 1,
                base_w[round].rps,
                inj_w[round].rps,
                off_w[round].rps
            );
        }
        let rps = |ws: &[Window]| ws.iter().map(|w| w.rps).collect::<Vec<f64>>();
        let (base, inj, off) = (rps(&base_w), rps(&inj_w), rps(&off_w));
        std::thread::sleep(std::time::Duration::from_secs(1));
        let exported = rx.spans()? - spans0;
        let paired = |v: &[f64]| median(v.iter().zip(&base).map(|(x, b)| x / b).collect());
        let (ir, or) = (paired(&inj), paired(&off));
        println!(
            "{}",
            match cores {
                Cores::Split =>
                    "DB-bound: the service and inject on core 0; PostgreSQL, Redis, the load and the receiver on core 1",
                Cores::Shared => "CPU-bound: every process on both cores",
            }
        );
        println!("  baseline                 {:>8.0} requests/s", median(base.clone()));
        println!("  inject (OTLP)            {:>8.0} requests/s   {ir:.3} of baseline", median(inj.clone()));
        println!("  compile-time otel (OTLP) {:>8.0} requests/s   {or:.3} of baseline", median(off.clone()));
        let cpu = |ws: &[Window]| {
            let m = |f: &dyn Fn(&Window) -> f64| median(ws.iter().map(f).collect());
            format!(
                "{:>6.0} µs machine (service {:.0}, inject {:.0}, receiver {:.0}, servers and load {:.0})",
                m(&|w| w.machine),
                m(&|w| w.procs[0]),
                m(&|w| w.procs[1]),
                m(&|w| w.procs[2]),
                m(&|w| w.machine - w.procs.iter().sum::<f64>())
            )
        };
        println!("  CPU per request, medians:");
        println!("    baseline                 {}", cpu(&base_w));
        println!("    inject (OTLP)            {}", cpu(&inj_w));
        println!("    compile-time otel (OTLP) {}", cpu(&off_w));
        println!(
            "  spans exported: {exported} (inject's and the otel build's); records inject dropped: {dropped}{}",
            if dropped > 0 { " (the inject figures were measured while records were dropped)" } else { "" }
        );
        Ok((ir, or))
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = otel_server.kill();
    let _ = otel_server.wait();
    result
}
