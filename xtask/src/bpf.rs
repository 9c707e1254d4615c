//! The uprobe backend's BPF program: `injector/src/backend/uprobe/probe.bpf.c`, compiled by
//! Debian's clang-19 into the checked-in `probe.bpf.o` that inject embeds, so building
//! inject needs no clang. `cargo xtask bpf` rebuilds the object, `--check` (and the uprobe
//! tests) rebuild it to a scratch file and fail when it differs from the checked-in one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The compiler, pinned: another clang makes other (equally valid) bytes.
pub const CLANG: &str = "clang-19";
/// The whole command line after the compiler, run in the program's directory; no debug
/// info (the maps are legacy definitions, no BTF needed), so the object holds no path.
pub const FLAGS: &[&str] = &["-O2", "-target", "bpf", "-mcpu=v3", "-c", "probe.bpf.c", "-o"];

/// Where the program's source and object live.
pub fn dir() -> PathBuf {
    crate::workspace_root().join("injector/src/backend/uprobe")
}

/// Installs clang-19 from Debian when it is missing (as root), or says how.
pub fn ensure_clang() -> Result<()> {
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(CLANG).is_file()));
    if on_path {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("building the BPF program needs {CLANG}: sudo apt-get install {CLANG}");
    }
    eprintln!("xtask: apt-get install {CLANG}");
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let ok = Command::new("apt-get").args(["install", "-y", "-qq", CLANG]).envs(env).status()?.success();
    ensure!(ok, "apt-get install {CLANG} failed");
    Ok(())
}

/// Compiles the program into `out`.
pub fn build(out: &Path) -> Result<()> {
    build_with(out, &[])
}

/// Compiles the program into `out` with extra flags (`-DINJECT_REJECTED`: a variant the
/// verifier refuses, for the tests).
pub fn build_with(out: &Path, extra: &[&str]) -> Result<()> {
    ensure_clang()?;
    let status = Command::new(CLANG)
        .args(extra)
        .args(FLAGS)
        .arg(out)
        .current_dir(dir())
        .status()
        .with_context(|| format!("running {CLANG}"))?;
    ensure!(status.success(), "{CLANG} failed to compile {}", dir().join("probe.bpf.c").display());
    Ok(())
}

/// `cargo xtask bpf [--check]`.
pub fn run(check: bool) -> Result<()> {
    let object = dir().join("probe.bpf.o");
    if !check {
        build(&object)?;
        println!("bpf: wrote {}", object.display());
        return Ok(());
    }
    let scratch = std::env::temp_dir().join(format!("inject-probe-{}.bpf.o", std::process::id()));
    build(&scratch)?;
    let (fresh, current) = (std::fs::read(&scratch)?, std::fs::read(&object).unwrap_or_default());
    let _ = std::fs::remove_file(&scratch);
    ensure!(
        fresh == current,
        "{} differs from what {CLANG} builds from probe.bpf.c: run `cargo xtask bpf`",
        object.display()
    );
    println!("bpf: {} matches probe.bpf.c", object.display());
    Ok(())
}
