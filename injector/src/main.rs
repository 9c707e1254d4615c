//! `inject`: OpenTelemetry tracing and live function tracing for running Go programs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backend;
mod benchcmd;
mod clidoc;
mod collect;
mod exit;
mod exports;
mod filter;
mod inspect;
mod launch;
mod libs;
mod metrics;
mod otlp;
mod output;
mod plan;
mod ring;
mod ringsize;
mod run;
mod spans;
mod stats;
mod summary;
mod target;
mod tree;
mod values;

#[derive(Debug, Parser)]
#[command(name = "inject", version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the functions of a Go binary or process, with their parameters' registers.
    Functions(inspect::FunctionsArgs),
    /// Show a Go binary's version, modules and build settings.
    Info(inspect::InfoArgs),
    /// Remove what an inject that died (kill -9) left in a process: restore every patched
    /// byte and unmap its memory. `inject --pid` does this by itself before attaching.
    Detach(run::DetachArgs),
    /// Measure the collector's drain rate (used by `cargo xtask bench collector`).
    #[command(hide = true)]
    BenchCollector(benchcmd::BenchArgs),
    /// Print the command-line reference (docs/cli.md) rendered from this CLI's definition.
    #[command(hide = true)]
    CliDocs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Some(Command::Functions(a)) => inspect::functions(&a),
        Some(Command::Info(a)) => inspect::info(&a),
        Some(Command::Detach(a)) => run::detach(&a),
        Some(Command::BenchCollector(a)) => benchcmd::bench_collector(&a),
        Some(Command::CliDocs) => {
            print!("{}", clidoc::render(&mut <Cli as clap::CommandFactory>::command()));
            Ok(())
        }
        None if !cli.run.command.is_empty() && !cli.run.dry_run => {
            return match launch::launch(&cli.run.with_env_funcs()) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("inject: error: {e:#}");
                    ExitCode::from(if e.to_string().starts_with("cannot run") { 127 } else { 1 })
                }
            };
        }
        None => run::run(&cli.run.with_env_funcs()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `inject functions | head`: the reader has all it wanted.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("inject: error: {e:#}");
            ExitCode::from(if e.downcast_ref::<run::UsageError>().is_some() { 2 } else { 1 })
        }
    }
}
