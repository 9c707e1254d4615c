//! `inject info` reports exactly what `go version -m` reports: Go version, main module,
//! dependencies (with replacements) and build settings, for every fixture and flavor.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use xtask::{Flavor, GoToolchain, build_fixture, fixture_names, inject_binary, output, run, test_toolchains};

/// `go version -m` as JSON shaped like `inject info --json`.
fn go_version_m(tc: &GoToolchain, exe: &Path) -> Result<Value> {
    let text = output(tc.command().args(["version", "-m"]).arg(exe))?;
    let mut lines = text.lines();
    let first = lines.next().context("empty go version -m")?;
    let go_version = first.rsplit(": ").next().context("version")?.to_string();
    let (mut path, mut main, mut deps, mut settings) =
        (String::new(), Value::Null, Vec::<Value>::new(), serde_json::Map::new());
    for line in lines {
        let f: Vec<&str> = line.trim_start_matches('\t').split('\t').collect();
        let module = |f: &[&str]| json!({"path": f[1], "version": f.get(2).copied().unwrap_or(""), "sum": f.get(3).copied().unwrap_or("")});
        match f[0] {
            // go version -m prints an empty line after a replacement.
            "" => {}
            "path" => path = f[1].to_string(),
            "mod" => main = module(&f),
            "dep" => deps.push(module(&f)),
            "=>" => {
                let last = deps.last_mut().unwrap_or(&mut main);
                last["replace"] = module(&f);
            }
            "build" => {
                let (k, v) = f[1].split_once('=').context("build line")?;
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                settings.insert(k.to_string(), Value::String(v.to_string()));
            }
            other => anyhow::bail!("unexpected go version -m line {other:?}"),
        }
    }
    Ok(json!({"go_version": go_version, "path": path, "main": main, "deps": deps, "settings": settings}))
}

fn inject_info(exe: &Path) -> Result<Value> {
    let out = output(Command::new(inject_binary()?).args(["info", "--json", "--exe"]).arg(exe))?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(
        json!({"go_version": v["go_version"], "path": v["path"], "main": v["main"], "deps": v["deps"], "settings": v["settings"]}),
    )
}

#[test]
fn info_matches_go_version_m_for_every_fixture_and_flavor() -> Result<()> {
    let mut checked = 0;
    for tc in test_toolchains()? {
        for flavor in Flavor::ALL {
            for fixture in fixture_names()? {
                let exe = build_fixture(&fixture, &tc, flavor)?;
                let (want, got) = (go_version_m(&tc, &exe)?, inject_info(&exe)?);
                ensure!(
                    want == got,
                    "{fixture} Go {} {}:\ngo version -m: {want:#}\ninject info:   {got:#}",
                    tc.version,
                    flavor.name()
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} binaries: inject info == go version -m");
    Ok(())
}

/// Dependencies and replacements need a module graph, which the fixtures (std only) lack:
/// build a two-module program with a `replace` directive.
#[test]
fn dependencies_and_replacements() -> Result<()> {
    let dir = xtask::workspace_root().join(format!("target/test-scratch/deps.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("app"))?;
    std::fs::create_dir_all(dir.join("lib"))?;
    std::fs::write(dir.join("lib/go.mod"), "module example.com/lib\n\ngo 1.21\n")?;
    std::fs::write(dir.join("lib/lib.go"), "package lib\n\nfunc Answer() int { return 42 }\n")?;
    std::fs::write(
        dir.join("app/go.mod"),
        "module example.com/app\n\ngo 1.21\n\nrequire example.com/lib v1.2.3\n\nreplace example.com/lib => ../lib\n",
    )?;
    std::fs::write(
        dir.join("app/main.go"),
        "package main\n\nimport \"example.com/lib\"\n\nfunc main() { println(lib.Answer()) }\n",
    )?;
    for tc in test_toolchains()? {
        let exe = dir.join(format!("app-{}", tc.version));
        run(tc
            .command()
            .current_dir(dir.join("app"))
            .env("CGO_ENABLED", "0")
            .args(["build", "-ldflags=-X main.v=1 -s", "-o"])
            .arg(&exe))?;
        let (want, got) = (go_version_m(&tc, &exe)?, inject_info(&exe)?);
        ensure!(want == got, "Go {}:\ngo version -m: {want:#}\ninject info:   {got:#}", tc.version);
        ensure!(got["deps"][0]["replace"]["path"] == "../lib", "replacement not reported: {got:#}");
        ensure!(got["settings"]["-ldflags"] == "-X main.v=1 -s", "ldflags: {got:#}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Build settings users ask about are decoded, not just copied.
#[test]
fn build_settings_reflect_the_build() -> Result<()> {
    let tc = &test_toolchains()?[0];
    let setting = |flavor, key: &str| -> Result<Value> {
        Ok(inject_info(&build_fixture("funcs", tc, flavor)?)?["settings"][key].clone())
    };
    ensure!(setting(Flavor::Race, "-race")? == "true");
    ensure!(setting(Flavor::Pie, "-buildmode")? == "pie");
    ensure!(setting(Flavor::Stripped, "-ldflags")? == "-s -w");
    ensure!(setting(Flavor::Cgo, "CGO_ENABLED")? == "1");
    ensure!(setting(Flavor::Default, "CGO_ENABLED")? == "0");
    ensure!(setting(Flavor::Trimpath, "-trimpath")? == "true");
    ensure!(setting(Flavor::Default, "GOAMD64")? == "v1");
    Ok(())
}
