//! `cargo xtask demo`: builds two fixtures with the newest supported Go (stripped, as
//! production binaries are), starts them, shows what inject reads from a live process,
//! and traces calls live for a few seconds, arguments and results included.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use xtask::{Flavor, build_fixture, go_versions, inject_binary, toolchain};

fn start(exe: &std::path::Path, args: &[&str]) -> Result<Child> {
    let mut child = Command::new(exe).args(args).stdout(Stdio::piped()).spawn().context("starting a fixture")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next().transpose()? {
            Some(line) if line.trim() == "READY" => break,
            Some(_) => {}
            None => bail!("{} exited before printing READY", exe.display()),
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

fn inject(args: &[String]) -> Result<()> {
    println!("\n== inject {}", args.join(" "));
    let status = Command::new(inject_binary()?).args(args).status()?;
    if !status.success() {
        bail!("inject {} failed", args.join(" "));
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let versions = go_versions()?;
    let tc = toolchain(versions.last().context("no Go versions")?)?;
    let funcs = build_fixture("funcs", &tc, Flavor::Default)?;
    let server = build_fixture("httpserver", &tc, Flavor::Stripped)?;
    println!("== starting {} and {} (Go {})", funcs.display(), server.display(), tc.version);
    let mut children = vec![start(&funcs, &["-loop", "-n", "0", "-sleep", "200ms"])?, start(&server, &[])?];
    let (fpid, spid) = (children[0].id().to_string(), children[1].id().to_string());
    let result = (|| -> Result<()> {
        inject(&["info".into(), "--pid".into(), spid.clone()])?;
        inject(&["functions".into(), "--pid".into(), fpid.clone(), "main.priceOf".into(), "*Store).Get".into()])?;
        inject(&[
            "--pid".into(),
            fpid.clone(),
            "--func".into(),
            "main.priceOf".into(),
            "--func".into(),
            "inject.test/fixtures/funcs/store.(*Store).Get".into(),
            "--func".into(),
            "main.Greet".into(),
            "--duration".into(),
            "3".into(),
        ])
    })();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}
