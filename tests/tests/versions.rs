//! Go version support is data: the generated offset table matches the DWARF of the
//! toolchains under test, and a release outside it is refused by name unless the user
//! says which release to assume.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use tests::require_ptrace;
use xtask::{Flavor, build_fixture, inject_binary, test_toolchains};

#[test]
fn offset_table_matches_the_dwarf_of_the_toolchains_under_test() -> Result<()> {
    // Regenerates the std rows of the oldest and newest Go, and the rows of each library's
    // oldest and newest listed version (built with the newest Go), and compares (every
    // row: `cargo xtask offsets --check`).
    offset_tool::run(&offset_tool::Options {
        toolchains: test_toolchains()?,
        modules: true,
        module_ends: true,
        check: true,
    })
}

/// A stripped build whose build info claims a Go release newer than the table.
fn future_binary() -> Result<std::path::PathBuf> {
    let tc = test_toolchains()?.pop().context("no Go")?;
    let exe = build_fixture("tree", &tc, Flavor::Stripped)?;
    let mut data = std::fs::read(&exe)?;
    let (from, to) = (format!("go{}", tc.version), format!("go1.99.{}", tc.version.rsplit('.').next().unwrap_or("0")));
    ensure!(from.len() == to.len(), "{from} and {to} differ in length");
    let mut n = 0;
    let mut i = 0;
    while let Some(p) = data[i..].windows(from.len()).position(|w| w == from.as_bytes()) {
        data[i + p..i + p + to.len()].copy_from_slice(to.as_bytes());
        i += p + to.len();
        n += 1;
    }
    ensure!(n > 0, "no {from} in {}", exe.display());
    let dir = xtask::workspace_root().join("target/test-scratch");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("future-tree.{}", std::process::id()));
    std::fs::write(&out, data)?;
    std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(out)
}

#[test]
fn a_release_outside_the_table_is_refused_unless_assumed() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let exe = future_binary()?;
    let jsonl = exe.with_extension("jsonl");
    let run = |extra: &[&str]| -> Result<std::process::Output> {
        let mut c = Command::new(inject_binary()?);
        c.args(["--func", "main.handle", "--output", "jsonl", "--output-file"]).arg(&jsonl);
        c.args(extra).arg("--").arg(&exe).args(["-n", "3", "-sleep", "0"]);
        Ok(c.output()?)
    };
    // Default: the program runs untraced, and inject says why and what to do.
    let out = run(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("REQUESTS 3"), "{out:?}");
    ensure!(
        err.contains("go1.99")
            && err.contains("outside the supported range 1.21 to 1.27")
            && err.contains("--assume-go-version"),
        "{err}"
    );
    // --strict: an error.
    let out = run(&["--strict"])?;
    ensure!(out.status.code() == Some(1), "--strict: {out:?}");
    // Assumed: traced with the 1.27 offsets (the build is stripped: no DWARF to prefer).
    let out = run(&["--assume-go-version", "1.27"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success() && err.contains("assuming go1.27"), "{out:?}");
    let spans = tests::schema::read_jsonl(&jsonl)?;
    ensure!(spans.iter().filter(|l| l["name"] == "main.handle").count() == 3, "spans:\n{spans:?}\n{err}");
    // A release the table does not have either: refused (launch mode runs it untraced).
    let out = run(&["--assume-go-version", "1.5", "--strict"])?;
    ensure!(
        out.status.code() == Some(1) && String::from_utf8_lossy(&out.stderr).contains("not a supported release"),
        "{out:?}"
    );
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_file(&jsonl);
    Ok(())
}

/// The cells of `cargo xtask support` (which covers every Go) for the oldest and newest,
/// with the gRPC cell for the grpc-go tests/grpc.rs builds on each (its binaries).
#[test]
fn core_checks_pass_for_default_stripped_and_pie() -> Result<()> {
    if !require_ptrace()? {
        return Ok(());
    }
    let inject = inject_binary()?;
    for tc in test_toolchains()? {
        let grpc = if tc.version.starts_with("1.21.") { xtask::GRPC_OLDEST } else { xtask::grpc_newest(&tc.version) };
        for flavor in [Flavor::Default, Flavor::Stripped, Flavor::Pie] {
            xtask::support::cell(&inject, &tc, flavor)
                .with_context(|| format!("go{} {}", tc.version, flavor.name()))?;
            xtask::support::grpc(&inject, &tc, flavor, grpc)
                .with_context(|| format!("go{} {} grpc-go {grpc}", tc.version, flavor.name()))?;
        }
    }
    Ok(())
}
