//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tests::scratch;
use xtask::{Flavor, build_fixture, inject_binary, test_toolchains};

/// Runs `inject ARGS` and checks it failed with exit code `code` and a single
/// `inject: error:` line mentioning `needle`.
fn expect_error(args: &[&str], path: Option<&Path>, code: i32, needle: &str) -> Result<String> {
    let mut c = Command::new(inject_binary()?);
    c.args(args);
    if let Some(p) = path {
        c.arg(p);
    }
    let out = c.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!stderr.contains("panicked"), "inject panicked on {args:?} {path:?}:\n{stderr}");
    ensure!(out.status.code() == Some(code), "{args:?} {path:?}: exit {:?}, want {code}\n{stderr}", out.status.code());
    if code == 1 {
        let lines: Vec<&str> = stderr.lines().collect();
        ensure!(lines.len() == 1, "{args:?} {path:?}: want one line, got:\n{stderr}");
        ensure!(lines[0].starts_with("inject: error: "), "{args:?}: {stderr}");
    }
    ensure!(stderr.contains(needle), "{args:?} {path:?}: error does not mention {needle:?}:\n{stderr}");
    Ok(stderr)
}

#[test]
fn not_a_go_binary() -> Result<()> {
    let ls = Path::new("/bin/ls");
    for cmd in ["functions", "info"] {
        expect_error(&[cmd, "--exe"], Some(ls), 1, "not a Go executable")?;
    }
    Ok(())
}

#[test]
fn random_bytes_and_empty_files() -> Result<()> {
    let p = scratch("random");
    // Deterministic pseudo-random bytes (xorshift), no ELF magic.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&p, &bytes)?;
    expect_error(&["functions", "--exe"], Some(&p), 1, "not an ELF file")?;
    std::fs::write(&p, b"")?;
    expect_error(&["info", "--exe"], Some(&p), 1, "not an ELF file")?;
    // ELF magic followed by garbage.
    let mut elfish = b"\x7fELF\x02\x01\x01".to_vec();
    elfish.extend_from_slice(&bytes[..4096]);
    std::fs::write(&p, &elfish)?;
    expect_error(&["functions", "--exe"], Some(&p), 1, "ELF")?;
    expect_error(&["functions", "--exe"], Some(Path::new("/nonexistent/x")), 1, "cannot open")?;
    expect_error(&["functions", "--exe"], Some(Path::new("/tmp")), 1, "directory")?;
    expect_error(&["functions", "--exe"], Some(Path::new("/dev/null")), 1, "/dev/null is not a regular file")?;
    // ELF magic and nothing much after it: said to be cut short, not of another kind.
    std::fs::write(&p, b"\x7fELF\x02\x01\x01\0\0\0")?;
    expect_error(&["info", "--exe"], Some(&p), 1, "10 bytes, shorter than an ELF header")?;
    std::fs::remove_file(&p)?;
    Ok(())
}

#[test]
fn truncated_go_binary() -> Result<()> {
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("funcs", tc, Flavor::Default)?;
    let full = std::fs::read(&exe)?;
    let p = scratch("truncated");
    for len in [16, 64, 1000, full.len() / 4, full.len() / 2, full.len() * 9 / 10] {
        std::fs::write(&p, &full[..len])?;
        expect_error(&["functions", "--exe"], Some(&p), 1, "")
            .with_context(|| format!("truncated to {len} of {} bytes", full.len()))?;
    }
    // Every other cut either fails cleanly or still reads: never a panic.
    for len in (0..full.len()).step_by(full.len() / 97 + 1) {
        std::fs::write(&p, &full[..len])?;
        let out = Command::new(inject_binary()?).args(["functions", "--all", "--exe"]).arg(&p).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!stderr.contains("panicked") && out.status.code().is_some(), "cut at {len}: {stderr}");
    }
    std::fs::remove_file(&p)?;
    Ok(())
}

#[test]
fn no_such_pid() -> Result<()> {
    let max: i64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")?.trim().parse()?;
    let pid = (max + 1).to_string();
    expect_error(&["functions", "--pid", &pid], None, 1, &format!("no process with pid {pid}"))?;
    expect_error(&["info", "--pid", &pid], None, 1, &format!("no process with pid {pid}"))?;
    // Attaching says it the same way.
    expect_error(&["--pid", &pid, "--func", "main.main"], None, 1, &format!("no process with pid {pid}"))?;
    expect_error(&["info", "--pid", "-5"], None, 2, "")?;
    Ok(())
}

#[test]
fn usage_errors_exit_2() -> Result<()> {
    expect_error(&["functions"], None, 2, "--exe")?;
    expect_error(&["info", "--exe", "/bin/ls", "--pid", "1"], None, 2, "cannot be used")?;
    expect_error(&["frobnicate"], None, 2, "frobnicate")?;
    // Nothing asked for at all.
    expect_error(&[], None, 2, "nothing to do")?;
    Ok(())
}

#[test]
fn unknown_function_pattern() -> Result<()> {
    let tc = &test_toolchains()?[0];
    let exe = build_fixture("funcs", tc, Flavor::Default)?;
    expect_error(&["functions", "--exe", exe.to_str().unwrap(), "main.noSuchThing"], None, 1, "no function matches")?;
    Ok(())
}

/// A declared signature that cannot be the function's is refused before anything is
/// planned: a type whose layout it does not give, a frame of another size (stripped: the
/// pclntab's frame is all there is), values where DWARF has others, a glob.
#[test]
fn declared_signatures_that_cannot_be_the_functions_are_refused() -> Result<()> {
    let tc = &test_toolchains()?[0];
    for (flavor, func, needle) in [
        (Flavor::Stripped, "main.record(id Item)", "unknown type \"Item\""),
        (Flavor::Stripped, "main.record(id int, s string)", "bytes of argument frame"),
        (
            Flavor::Default,
            "main.record(id int, neg int, s string, f float64, b []byte, ok bool) (int, int)",
            "DWARF at",
        ),
        (Flavor::Stripped, "main.rec*(id int)", "without a glob"),
        (Flavor::Stripped, "main.record(id int", "unbalanced"),
    ] {
        let exe = build_fixture("args", tc, flavor)?;
        let args = ["--dry-run", "--exe", exe.to_str().context("path")?, "--func", func];
        expect_error(&args, None, 1, needle)?;
    }
    Ok(())
}

/// A debug twin that is not a build of the target's code, or has no DWARF, is refused
/// with what differs.
#[test]
fn a_debug_twin_of_other_code_is_refused() -> Result<()> {
    let tc = &test_toolchains()?[0];
    let stripped = build_fixture("args", tc, Flavor::Stripped)?;
    for (twin, needle) in [
        (build_fixture("args", tc, Flavor::Pie)?, "first difference"),
        (build_fixture("funcs", tc, Flavor::Default)?, "not a build of the target's code"),
        (stripped.clone(), "no DWARF"),
    ] {
        let args = ["--dry-run", "--exe", stripped.to_str().context("path")?, "--func", "main.record", "--debug-info"];
        expect_error(&args, Some(&twin), 1, needle)?;
    }
    Ok(())
}

/// Go 1.19 comes from Debian's golang-1.19-go, which `cargo xtask test` installs.
#[test]
fn go_1_19_binary_is_refused_by_name() -> Result<()> {
    let dir = scratch("go119");
    let Some(exe) = tests::build_with_go_1_19(&dir, "package main\n\nfunc main() { println(\"hi\") }\n")? else {
        return Ok(());
    };
    let err = expect_error(&["functions", "--exe"], Some(&exe), 1, "go1.19")?;
    ensure!(err.contains("too old") && err.contains("go1.20"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// With no --func, the libraries the target links are what gets probed; a target that
/// links none is told so (planned against files: nothing is attached).
#[test]
fn nothing_to_probe_without_a_library_or_a_function() -> Result<()> {
    let tc = &test_toolchains()?[0];
    let tree = build_fixture("tree", tc, Flavor::Default)?;
    let tree = tree.to_str().context("path")?;
    expect_error(&["--dry-run", "--exe", tree], None, 1, "nothing to probe")?;
    expect_error(&["--dry-run", "--exe", tree, "--lib", "net/http"], None, 1, "does not use net/http")?;
    expect_error(&["--dry-run", "--exe", tree, "--no-libs"], None, 2, "--no-libs and no --func")?;
    expect_error(&["--dry-run", "--exe", tree, "--lib", "grpc"], None, 1, "does not use grpc")?;
    expect_error(&["--dry-run", "--exe", tree, "--lib", "kafka"], None, 2, "kafka")?;
    let server = build_fixture("httpserver", tc, Flavor::Stripped)?;
    let out = Command::new(inject_binary()?).args(["--dry-run", "--exe"]).arg(&server).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for probe in ["net/http.serverHandler.ServeHTTP", "net/http.(*Transport).roundTrip", "runtime.newproc1"] {
        ensure!(
            text.lines().any(|l| l.contains(probe) && l.contains("would install")),
            "{probe} not planned in a stripped HTTP server:\n{text}"
        );
    }
    Ok(())
}
