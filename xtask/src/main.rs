//! `cargo xtask <command>`: the project's orchestration, in Rust rather than shell.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::{Flavor, all_toolchains, build_fixture, fixture_names, oldest_and_newest, run, workspace_root};

mod bench;
mod bench_db;
mod bench_debug;
mod bench_export;
mod bench_grpc;
mod bench_http;
mod bench_kafka;
mod bench_probe;
mod demo;
mod deps;
mod fuzz;

const HELP: &str = "\
cargo xtask <command>

  test              install what the tests need, then fmt + clippy + the whole test suite
                    (oldest and newest Go of go-versions.toml)
  matrix            the test suite against every Go of go-versions.toml (slow)
  demo              build the HTTP fixture, start it, and show what inject sees
  go [--all]        install the oldest and newest (or all) Go toolchains
  fixtures [--all]  build every fixture in every flavor (oldest/newest or all Go)
  fuzz [SECONDS]    run every cargo-fuzz target for SECONDS each (default 60)
  support           core end-to-end checks (list, launch with arguments, attach/detach) for
                    every Go of go-versions.toml x default/stripped/PIE; prints the README table
  soak [CYCLES]     attach/detach CYCLES times (default 1000) to stressed programs (full ring,
                    GC, stack growth, SIGPROF/SIGURG storms, HTTP load; SIGINT, --duration or
                    SIGKILL endings) on the oldest and newest Go, default and PIE; prints a table
  offsets [ARGS]    run offset-tool: regenerate go-abi/src/offsets.rs (struct offsets by Go
                    release and by library version, per offset-tool/modules.toml) from the
                    DWARF of probe builds; --check fails on a difference (--help: the rest)
  docs [--check]    write docs/cli.md, the command-line reference, from inject's CLI definition;
                    --check fails when the file differs
  bpf [--check]     compile the uprobe backend's BPF program (probe.bpf.c, with clang-19) into the
                    checked-in probe.bpf.o; --check fails when the object differs
  bench [NAME]      run benchmarks (attach-100, attach-under-load, call-overhead, collector, drain, export, launch, http, grpc, db, kafka, debug, functions-100mb; all by default)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(false),
        Some("matrix") => test(true),
        Some("demo") => demo::run(),
        Some("go") => go(args.iter().any(|a| a == "--all")),
        Some("fixtures") => fixtures(args.iter().any(|a| a == "--all")),
        Some("fuzz") => match args.get(1).map(|s| s.parse::<u64>()).transpose() {
            Ok(secs) => fuzz::run(secs.unwrap_or(60)),
            Err(e) => Err(anyhow::Error::from(e).context("fuzz SECONDS must be a whole number")),
        },
        Some("bench") => bench::run(args.get(1).map(String::as_str)),
        Some("support") => xtask::support::run(),
        Some("soak") => match args.get(1).map(|s| s.parse::<u64>()).transpose() {
            Ok(cycles) => soak(cycles.unwrap_or(1000)),
            Err(e) => Err(anyhow::Error::from(e).context("soak CYCLES must be a whole number")),
        },
        Some("offsets") => offsets(&args[1..]),
        Some("docs") => docs(args.iter().any(|a| a == "--check")),
        Some("bpf") => xtask::bpf::run(args.iter().any(|a| a == "--check")),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => {
            eprint!("xtask: unknown command {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// `cargo xtask offsets`: offset-tool is its own crate (it depends on this one), so run it.
fn offsets(args: &[String]) -> Result<()> {
    let status = cargo().args(["run", "--quiet", "-p", "offset-tool", "--"]).args(args).status()?;
    if !status.success() {
        bail!("offset-tool failed");
    }
    Ok(())
}

fn go(all: bool) -> Result<()> {
    let tcs = if all { all_toolchains()? } else { oldest_and_newest()? };
    for tc in tcs {
        println!("Go {:<16} {}", tc.version, tc.go.display());
    }
    Ok(())
}

fn fixtures(all: bool) -> Result<()> {
    let tcs = if all { all_toolchains()? } else { oldest_and_newest()? };
    for tc in &tcs {
        for flavor in Flavor::ALL {
            for name in fixture_names()? {
                let p = build_fixture(&name, tc, flavor)?;
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}

/// `cargo xtask soak`: the soak test at length, with its table on standard output.
fn soak(cycles: u64) -> Result<()> {
    deps::ensure()?;
    let mut t = cargo();
    t.args(["test", "-p", "tests", "--test", "soak", "soak_long", "--", "--ignored", "--nocapture"]);
    t.env("INJECT_SOAK_CYCLES", cycles.to_string()).env("INJECT_PROFILE", "release");
    if !t.status()?.success() {
        bail!("the soak failed");
    }
    Ok(())
}

/// The README's test command: everything a fresh machine needs, then the checks.
fn test(matrix: bool) -> Result<()> {
    let started = std::time::Instant::now();
    deps::ensure()?;
    // The Kafka tests' broker: fetched once into a cache outside the work tree.
    let kafka = xtask::kafka::install()?;
    eprintln!("xtask: Apache Kafka {} at {}", xtask::kafka::KAFKA_VERSION, kafka.display());
    // The OTLP tests' OpenTelemetry Collector: built once with the newest Go into a cache.
    let otelcol = xtask::collector::install()?;
    eprintln!("xtask: OpenTelemetry Collector {} at {}", xtask::collector::COLLECTOR_VERSION, otelcol.display());
    let tcs = if matrix { all_toolchains()? } else { oldest_and_newest()? };
    for tc in &tcs {
        eprintln!("xtask: Go {} at {}", tc.version, tc.go.display());
    }
    eprintln!("xtask: cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"])).context("cargo fmt found unformatted code")?;
    eprintln!("xtask: cargo clippy");
    let status =
        cargo().args(["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"]).status()?;
    if !status.success() {
        bail!("cargo clippy reported problems");
    }
    // The demo's build: inject without the OTLP transports.
    let status = cargo()
        .args(["clippy", "-p", "injector", "--no-default-features", "--quiet", "--", "-D", "warnings"])
        .status()?;
    if !status.success() {
        bail!("cargo clippy reported problems in inject built without the otlp feature");
    }
    eprintln!("xtask: cargo test");
    let mut t = cargo();
    // No doc tests: the crates have none, and their empty blocks buried the verdict.
    t.args(["test", "--workspace", "--no-fail-fast", "--lib", "--bins", "--tests"]);
    if matrix {
        t.env("INJECT_GO_MATRIX", "all");
    }
    let mut child = t.stdout(std::process::Stdio::piped()).spawn()?;
    let mut totals = [0u64; 3];
    let out = std::io::BufReader::new(child.stdout.take().context("test output")?);
    for line in std::io::BufRead::lines(out) {
        let line = line?;
        println!("{line}");
        if let Some(counts) = test_counts(&line) {
            totals.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
    }
    let ok = child.wait()?.success();
    let [passed, failed, ignored] = totals;
    eprintln!(
        "xtask: {} in {:.1} min: fmt and clippy clean, {passed} tests passed, {failed} failed, {ignored} ignored",
        if ok { "PASS" } else { "FAIL" },
        started.elapsed().as_secs_f64() / 60.0
    );
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}

/// (passed, failed, ignored) from libtest's `test result: ...` line.
fn test_counts(line: &str) -> Option<[u64; 3]> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |what: &str| {
        rest.split(';')
            .find_map(|p| p.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
    };
    Some([count(" passed")?, count(" failed")?, count(" ignored")?])
}

/// `docs [--check]`: docs/cli.md from `inject cli-docs`.
fn docs(check: bool) -> Result<()> {
    let rendered = xtask::output(Command::new(xtask::inject_binary()?).arg("cli-docs"))?;
    let path = xtask::workspace_root().join("docs/cli.md");
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if check {
        anyhow::ensure!(current == rendered, "{} is out of date: run `cargo xtask docs`", path.display());
        println!("docs: {} matches the CLI", path.display());
        return Ok(());
    }
    std::fs::write(&path, rendered)?;
    println!("docs: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtest_result_lines_are_counted() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.44s";
        assert_eq!(super::test_counts(ok), Some([12, 0, 1]));
        let bad = "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.18s";
        assert_eq!(super::test_counts(bad), Some([1, 2, 0]));
        assert_eq!(super::test_counts("running 3 tests"), None);
    }
}
