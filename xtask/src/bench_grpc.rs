//! `cargo xtask bench grpc`: what gRPC tracing costs a loaded server. The grpcsvc fixture's
//! unary `Check` is loaded by grpcsvc's own load mode (one connection, 8 concurrent
//! callers) on loopback, with two handlers: `work` (~200 µs of SHA-256, a handler doing
//! real work: the goal applies to it) and `ok` (trivial: the framework's own cost
//! dominates, the worst case for any tracer, reported as a stress point). Rounds
//! interleave three setups:
//! - baseline: the plain build, nothing attached;
//! - inject: the same process with inject attached (default probes: gRPC and net/http
//!   spans, context, lineage), exporting every span over OTLP/HTTP to a receiver process;
//! - otelgrpc: the same program built with OpenTelemetry Go's compile-time
//!   instrumentation (otelgrpc stats handler, batch span processor, OTLP/HTTP exporter to
//!   the same receiver): what a user would otherwise rebuild with.
//!
//! Both cores are saturated (server, load generator, tracer), so tracing CPU shows as lost
//! throughput; CPU per RPC adds the server's and, for inject, inject's own. Medians of the
//! rounds; ratios and CPU deltas are the medians of each round's own (a round runs the
//! three setups back to back, so the machine's drift between rounds cancels). Goals:
//! inject keeps at least 95% of the baseline's RPCs per second, and costs less CPU per RPC
//! than otelgrpc.

use std::process::{Child, Command};

use anyhow::{Context, Result, ensure};
use xtask::{Flavor, build_module_fixture, build_module_fixture_with, toolchain};

use crate::bench_export::{Receiver, attach_exporting, cpu_seconds, detach_dropped, median, start_listening};

const ROUNDS: usize = 7;
const SECONDS: u32 = 3;
const GRPC: &str = "google.golang.org/grpc";

struct Run {
    rps: f64,
    p50_us: f64,
    /// CPU seconds per RPC of the server and the tracer process (if any), in µs.
    cpu_us: f64,
}

/// Loads `target` for SECONDS with `Check(service)`; `pids` are the processes whose CPU is
/// charged to the RPCs.
fn load(load_exe: &std::path::Path, target: &str, service: &str, pids: &[u32]) -> Result<Run> {
    let c0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let out = xtask::output(Command::new(load_exe).args([
        "-mode",
        "load",
        "-target",
        target,
        "-service",
        service,
        "-duration",
        &format!("{SECONDS}s"),
        "-c",
        "8",
    ]))?;
    let c1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let line = out.lines().find(|l| l.starts_with("RESULT ")).context("no RESULT line")?;
    ensure!(line.contains(" errors=0 "), "failed calls: {line}");
    let field = |k: &str| -> Result<f64> {
        let v = line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{k}="))).context(k.to_string())?;
        Ok(v.parse()?)
    };
    let calls = field("calls")?;
    Ok(Run { rps: field("rps")?, p50_us: field("p50_us")?, cpu_us: 1e6 * (c1 - c0) / calls.max(1.0) })
}

/// Starts a grpcsvc server; returns it and its address.
fn start_server(exe: &std::path::Path, env: &[(&str, &str)]) -> Result<(Child, String)> {
    let mut c = Command::new(exe);
    c.args(["-mode", "server"]).envs(env.iter().copied());
    start_listening(c, "READY")
}

pub fn grpc() -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("INJECT_PROFILE", "release") };
    let inject = xtask::inject_binary()?;
    let mut rx = Receiver::start(&crate::bench_export::receiver_binary(&inject)?, "http")?;
    let versions = xtask::go_versions()?;
    let tc = toolchain(versions.last().context("no Go")?)?;
    let version = xtask::grpc_newest(&tc.version);
    let plain = build_module_fixture("grpcsvc", GRPC, version, &tc, Flavor::Default)?;
    let otel = build_module_fixture_with("grpcsvc", Some("grpcsvc-otel"), GRPC, version, &tc, Flavor::Default)?;
    let (mut server, addr) = start_server(&plain, &[])?;
    let endpoint = rx.endpoint.clone();
    let otel_env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_SERVICE_NAME", "otelgrpc")];
    let (mut otel_server, otel_addr) = start_server(&otel, &otel_env)?;
    let mut goal = None;
    let result = ["work", "ok"].iter().try_for_each(|&service| -> Result<()> {
        // Warm up both servers, their connections and the machine.
        load(&plain, &addr, service, &[])?;
        load(&plain, &otel_addr, service, &[])?;
        let (mut base, mut inj, mut off) = (Vec::new(), Vec::new(), Vec::new());
        let mut dropped = 0;
        let spans0 = rx.spans()?;
        for round in 0..ROUNDS {
            base.push(load(&plain, &addr, service, &[server.id()])?);
            let summary = xtask::workspace_root().join("target/bench/grpc-summary.json");
            let c = attach_exporting(&inject, server.id(), &endpoint, &summary)?;
            inj.push(load(&plain, &addr, service, &[server.id(), c.id()])?);
            dropped += detach_dropped(c, &summary)?;
            off.push(load(&plain, &otel_addr, service, &[otel_server.id()])?);
            eprintln!(
                "  {service} round {}: baseline {:.0}, inject {:.0}, otelgrpc {:.0} RPCs/s",
                round + 1,
                base[round].rps,
                inj[round].rps,
                off[round].rps
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        let exported = rx.spans()? - spans0;
        let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
        let (b, i, o) = (med(&base, |r| r.rps), med(&inj, |r| r.rps), med(&off, |r| r.rps));
        let (bc, ic, oc) = (med(&base, |r| r.cpu_us), med(&inj, |r| r.cpu_us), med(&off, |r| r.cpu_us));
        // Each round measures the three setups back to back: the ratio within a round is
        // what the machine's drift between rounds disturbs least.
        let paired = |v: &[Run], f: fn(&Run, &Run) -> f64| median(v.iter().zip(&base).map(|(x, b)| f(x, b)).collect());
        let (ir, or) = (paired(&inj, |x, b| x.rps / b.rps), paired(&off, |x, b| x.rps / b.rps));
        let (icd, ocd) = (paired(&inj, |x, b| x.cpu_us - b.cpu_us), paired(&off, |x, b| x.cpu_us - b.cpu_us));
        let what = if service == "work" { "a ~200 µs handler" } else { "a trivial handler (stress)" };
        println!(
            "grpc: unary Check({service:?}), {what}, on the grpcsvc fixture (Go {}, grpc-go {version}), 8 concurrent \
             callers on one connection for {SECONDS} s, {ROUNDS} interleaved rounds, medians:",
            tc.version
        );
        println!(
            "  baseline          {b:>9.0} RPCs/s   p50 {:>5.0} µs   CPU {bc:>6.1} µs/RPC",
            med(&base, |r| r.p50_us)
        );
        println!(
            "  inject (OTLP)     {i:>9.0} RPCs/s   p50 {:>5.0} µs   CPU {ic:>6.1} µs/RPC (+{icd:.1}, inject's own \
             included)   {ir:.3} of baseline",
            med(&inj, |r| r.p50_us),
        );
        println!(
            "  otelgrpc (OTLP)   {o:>9.0} RPCs/s   p50 {:>5.0} µs   CPU {oc:>6.1} µs/RPC (+{ocd:.1})   {or:.3} of baseline",
            med(&off, |r| r.p50_us),
        );
        println!(
            "  (ratios and CPU deltas: medians of each round's own; the ratio of the medians above: inject {:.3}, \
             otelgrpc {:.3})",
            i / b,
            o / b
        );
        println!(
            "  spans exported: {exported} (inject's and otelgrpc's); records inject dropped: {dropped}{}",
            if dropped > 0 { " (the inject figures were measured while records were dropped)" } else { "" }
        );
        if service == "work" {
            goal = Some((ir, icd, ocd));
        }
        Ok(())
    });
    if let (Ok(()), Some((ratio, ours, theirs))) = (&result, goal) {
        println!(
            "{} inject keeps {:.1}% of the baseline's throughput for the ~200 µs handler (goal >= 95%) and costs \
             {ours:.1} µs of CPU per RPC over the baseline, otelgrpc {theirs:.1} µs (goal: less)",
            if ratio >= 0.95 && ours < theirs { "PASS" } else { "FAIL" },
            100.0 * ratio
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = otel_server.kill();
    let _ = otel_server.wait();
    result
}
