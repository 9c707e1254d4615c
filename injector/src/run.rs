//! `inject --pid PID --func PATTERN...`: plan, attach, install, collect, remove.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use go_abi::GoBinary;

use crate::plan::{self, ProbeSite};
use crate::target::TargetArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The Go process to instrument.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
    /// Print the verdict for every probe site and exit without touching the process
    /// (with --exe, plan against a file).
    #[arg(long)]
    pub dry_run: bool,
    /// A Go executable to plan against (only with --dry-run).
    #[arg(long, value_name = "PATH", requires = "dry_run")]
    pub exe: Option<PathBuf>,
    /// Functions to probe: full names (`main.(*Store).Get`) or globs (`main.*`).
    #[arg(long = "func", value_name = "PATTERN")]
    pub funcs: Vec<String>,
    /// Remove the probes and detach after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    if args.pid.is_none() && args.exe.is_none() {
        bail!("nothing to do: give --pid PID --func PATTERN (or a subcommand; see --help)");
    }
    if args.funcs.is_empty() {
        bail!("give at least one --func PATTERN to probe (list candidates with `inject functions`)");
    }
    let target = TargetArgs { exe: args.exe.clone(), pid: if args.exe.is_some() { None } else { args.pid } };
    let exe = target.open()?;
    let bin = GoBinary::parse(&exe.map).with_context(|| exe.path.display().to_string())?;
    let sites = plan::plan(&bin, &args.funcs)?;
    if args.dry_run {
        print_verdicts(&sites, exe.bias);
        return Ok(());
    }
    check_installable(&sites)?;
    bail!("attaching is not built yet")
}

fn print_verdicts(sites: &[ProbeSite], bias: u64) {
    for s in sites {
        println!("{:#018x}  {:<50} {}", s.entry + bias, s.name, s.verdict());
    }
}

/// One refused site is a warning; none installable is an error.
pub fn check_installable(sites: &[ProbeSite]) -> Result<()> {
    for s in sites.iter().filter(|s| !s.installable()) {
        eprintln!("inject: warning: {}: {}", s.name, s.verdict());
    }
    if !sites.iter().any(ProbeSite::installable) {
        bail!("none of the requested functions can be probed safely (see the warnings above)");
    }
    Ok(())
}
