//! `cargo xtask demo`: builds the HTTP fixture with the newest supported Go, starts it,
//! and shows what inject reads from the live process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use xtask::{Flavor, build_fixture, go_versions, inject_binary, toolchain};

pub fn run() -> Result<()> {
    let versions = go_versions()?;
    let tc = toolchain(versions.last().context("no Go versions")?)?;
    let inject = inject_binary()?;
    // Stripped, to show that production builds need no symbols.
    let server = build_fixture("httpserver", &tc, Flavor::Stripped)?;
    println!("== starting {} (Go {}, built with -ldflags=-s -w)", server.display(), tc.version);
    let mut child = Command::new(&server).stdout(Stdio::piped()).spawn().context("starting the fixture")?;
    let pid = child.id() as i32;
    let result = (|| -> Result<()> {
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next().transpose()? {
                Some(line) if line.trim() == "READY" => break,
                Some(_) => {}
                None => bail!("the fixture exited before printing READY"),
            }
        }
        for args in [
            vec!["info".to_string()],
            vec!["functions".into(), "main.*".into(), "net/http.serverHandler.ServeHTTP".into()],
        ] {
            println!("\n== inject {} --pid {pid}", args.join(" "));
            let status = Command::new(&inject).args(&args).args(["--pid", &pid.to_string()]).status()?;
            if !status.success() {
                bail!("inject {} failed", args[0]);
            }
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
