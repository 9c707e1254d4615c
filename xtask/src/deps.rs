//! Machine-level dependencies of the test suite, installed by the project itself so a
//! fresh machine (and CI) needs nothing done by hand.

use std::process::Command;

use anyhow::{Result, bail};

/// Debian packages the tests use: a Go 1.19 toolchain, to prove old binaries are refused;
/// PostgreSQL and Redis, the real servers the database instrumentations are tested
/// against (the tests start their own instances on loopback, never the packages'
/// services).
const DEBIAN_PACKAGES: &[&str] = &["golang-1.19-go", "postgresql", "redis-server"];

/// Commands the tests need, and the Debian package that brings each when it is not on
/// PATH (a JDK installed some other way counts): Java 17 runs the Kafka broker, Maven
/// fetches it from Maven Central (xtask::kafka); openssl makes the TLS tests' certificates
/// (xtask::certs) and curl is their HTTPS client against the OpenTelemetry Collector;
/// clang-19 rebuilds the uprobe program to check the checked-in object (xtask::bpf); strace
/// is the other tracer the uprobe tests attach to a target before inject.
const COMMANDS: &[(&str, &str)] = &[
    ("java", "openjdk-17-jre-headless"),
    ("mvn", "maven"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    ("clang-19", "clang-19"),
    ("strace", "strace"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn ensure() -> Result<()> {
    let mut missing: Vec<&str> = DEBIAN_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    missing.extend(COMMANDS.iter().filter(|(cmd, pkg)| !on_path(cmd) && !installed(pkg)).map(|(_, pkg)| *pkg));
    if missing.is_empty() {
        return Ok(());
    }
    if !xtask::is_root() {
        bail!(
            "the tests need the Debian packages {missing:?}; install them with: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: apt-get install {}", missing.join(" "));
    // RUNLEVEL=1: invoke-rc.d then starts no service the packages bring (redis-server,
    // postgresql); the tests run their own instances.
    let env = [("DEBIAN_FRONTEND", "noninteractive"), ("RUNLEVEL", "1")];
    let update = Command::new("apt-get").args(["update", "-qq"]).envs(env).status()?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let install = Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).envs(env).status()?;
    if !install.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
