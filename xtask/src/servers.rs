//! Real database servers for the database instrumentations' tests and benchmarks: a PostgreSQL cluster
//! made with the Debian packages' `initdb` in a temporary directory, and a `redis-server`,
//! each listening on a free loopback port, started for one test and stopped when dropped.
//! Nothing of the machine's own services is used (the packages' services stay off).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

const START: Duration = Duration::from_secs(60);

/// A server process whose output lines are read on threads (so it never blocks on a full
/// pipe), waited on until it says it is ready.
pub(crate) struct Proc {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    name: &'static str,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, name: &'static str) -> Result<Proc> {
        use std::io::BufRead;
        use std::process::Stdio;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().context("stdout")?);
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().context("stderr")?);
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc { child, lines: rx, seen: Vec::new(), name })
    }

    /// The server's process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `text` (servers' logs start with a time).
    pub(crate) fn wait_for_any(&mut self, text: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(text) => return Ok(()),
                Ok(l) => self.seen.push(l),
                Err(_) => bail!("{}: no line {text:?} within {timeout:?}; saw:\n{}", self.name, self.seen.join("\n")),
            }
        }
    }

    /// Sends `sig` and waits (at most `timeout`, then kills).
    pub(crate) fn stop(&mut self, sig: i32, timeout: Duration) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc_kill(self.child.id() as i32, sig) };
        }
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(15, Duration::from_secs(10));
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The newest PostgreSQL server binaries the Debian packages installed.
fn pg_bin() -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .with_context(|| format!("{}: is PostgreSQL installed? `cargo xtask test` installs it", root.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|v: &u32| root.join(v.to_string()).join("bin/initdb").is_file())
        .collect();
    versions.sort_unstable();
    let v = versions.last().with_context(|| format!("no PostgreSQL server under {}", root.display()))?;
    Ok(root.join(v.to_string()).join("bin"))
}

/// PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres`
/// user the package created.
fn run_as() -> Option<(u32, u32)> {
    if !crate::is_root() {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

/// A PostgreSQL server of its own: superuser `inject` (trust authentication on
/// loopback only), database `shop`.
pub struct Postgres {
    proc: Option<Proc>,
    dir: PathBuf,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        let bin = pg_bin()?;
        let dir = std::env::temp_dir().join(format!("inject-pg.{}.{}", std::process::id(), free_port()?));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let data = dir.join("data");
        let as_owner = |c: &mut Command| {
            if let Some((uid, gid)) = owner {
                c.uid(uid).gid(gid);
            }
        };
        let mut init = Command::new(bin.join("initdb"));
        init.args(["-U", "inject", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions", "-D"]).arg(&data);
        as_owner(&mut init);
        let out = init.output().context("running initdb")?;
        ensure!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port()?;
        let mut server = Command::new(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c"])
            .arg(format!("unix_socket_directories={}", dir.display()));
        as_owner(&mut server);
        let mut proc = Proc::spawn(server, "postgres")?;
        proc.wait_for_any("database system is ready to accept connections", START)?;
        let mut pg = Postgres { proc: Some(proc), dir, port };
        pg.psql("postgres", "CREATE DATABASE shop")?;
        Ok(pg)
    }

    /// The URL a client connects with (no TLS: loopback).
    pub fn url(&self) -> String {
        format!("postgres://inject@127.0.0.1:{}/shop?sslmode=disable", self.port)
    }

    /// Reclaims the dead rows of `shop`'s tables: a bench's windows then start from the
    /// same state rather than from one its earlier windows left (deletes and updates
    /// pile up until autovacuum comes around).
    pub fn vacuum(&mut self) -> Result<()> {
        self.psql("shop", "VACUUM ANALYZE")
    }

    /// Runs `sql` in database `db` as the superuser.
    fn psql(&mut self, db: &str, sql: &str) -> Result<()> {
        let out = Command::new(pg_bin()?.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "inject", "-d", db, "-c", sql])
            .output()
            .context("running psql")?;
        ensure!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            p.stop(2, Duration::from_secs(30));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of its own, without persistence.
pub struct Redis {
    _proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        let exe = Path::new("/usr/bin/redis-server");
        if !exe.is_file() {
            bail!("{}: is redis-server installed? `cargo xtask test` installs it", exe.display());
        }
        let port = free_port()?;
        let mut c = Command::new(exe);
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        c.args(["--protected-mode", "yes", "--daemonize", "no"]);
        let mut proc = Proc::spawn(c, "redis-server")?;
        proc.wait_for_any("Ready to accept connections", START)?;
        Ok(Redis { _proc: proc, port })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Fails under CI, else prints why the test is skipped: for machines without the
/// servers' packages.
pub fn require_servers() -> Result<bool> {
    let ok = pg_bin().is_ok() && Path::new("/usr/bin/redis-server").is_file();
    if !ok {
        if crate::in_ci() {
            bail!("PostgreSQL or redis-server is not installed, and CI=true: `cargo xtask test` installs them");
        }
        eprintln!("SKIP: PostgreSQL or redis-server is not installed (`cargo xtask test` installs them)");
    }
    Ok(ok)
}
