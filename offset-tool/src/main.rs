//! `offset-tool [--check] [--toolchains all|oldest-newest] [--no-modules | --module-ends]`: regenerates
//! go-abi/src/offsets.rs from modules.toml (`cargo xtask offsets` runs it).

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, ValueEnum};

/// Regenerates go-abi's struct offset table: std rows per Go release of go-versions.toml,
/// library rows per module version of offset-tool/modules.toml.
#[derive(Parser)]
#[command(name = "offset-tool")]
struct Args {
    /// Regenerate in memory and fail, listing the differences, if the checked-in table differs.
    #[arg(long)]
    check: bool,
    /// Which Go releases' std rows to regenerate; the others keep their rows.
    #[arg(long, value_enum, default_value_t = Toolchains::All)]
    toolchains: Toolchains,
    /// Keep the library rows as they are (no module downloads or probe builds).
    #[arg(long, conflicts_with = "module_ends")]
    no_modules: bool,
    /// Regenerate only each library's oldest and newest listed version (what CI tests).
    #[arg(long)]
    module_ends: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Toolchains {
    /// Every Go of go-versions.toml.
    All,
    /// The oldest and newest Go of go-versions.toml (what CI tests).
    OldestNewest,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offset-tool: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let toolchains = match args.toolchains {
        Toolchains::All => xtask::go_versions()?.iter().map(|v| xtask::toolchain(v)).collect::<Result<Vec<_>>>()?,
        Toolchains::OldestNewest => xtask::oldest_and_newest()?,
    };
    offset_tool::run(&offset_tool::Options {
        toolchains,
        modules: !args.no_modules,
        module_ends: args.module_ends,
        check: args.check,
    })
}
