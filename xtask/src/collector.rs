//! A real OpenTelemetry Collector for the OTLP tests: the collector's own core components
//! (the `otlp` receiver; the `otlp_grpc`, `otlp_http` and `debug` exporters), built from
//! the Go module proxy by `xtask/collector/` (a `main.go` and a pinned `go.mod`/`go.sum`)
//! with the newest Go of go-versions.toml, once, into a cache outside the work tree. Each
//! test starts its own on free loopback ports: OTLP/gRPC and OTLP/HTTP receivers, with TLS
//! (and client certificates) when asked, forwarding traces and metrics to the test's own
//! plain receiver; stopped by pid when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::servers::free_port;

/// The collector release `xtask/collector/go.mod` pins (its core modules v1.71.0).
pub const COLLECTOR_VERSION: &str = "0.165.0";

/// The collector logs this once every receiver listens and every pipeline runs.
const READY: &str = "Everything is ready. Begin running and processing data.";

/// A start takes about 60 ms; a loaded machine may take seconds.
const START: Duration = Duration::from_secs(30);

/// The files `xtask/collector/` holds, copied beside the binary as the stamp of what it
/// was built from (a change builds again).
const SOURCES: [&str; 3] = ["go.mod", "go.sum", "main.go"];

/// Where the binary is cached: outside the work tree, like the Go toolchains, so clean
/// checkouts (CI) on the same machine reuse it. `INJECT_OTELCOL_CACHE` overrides.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("INJECT_OTELCOL_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/inject/otelcol")
}

fn sources() -> PathBuf {
    crate::workspace_root().join("xtask/collector")
}

/// The binary, if it was built from the current sources.
fn installed() -> Option<PathBuf> {
    let dir = cache_dir().join(COLLECTOR_VERSION);
    let bin = dir.join("otelcol");
    let same = SOURCES.iter().all(|f| {
        let want = std::fs::read(sources().join(f));
        want.is_ok() && want.ok() == std::fs::read(dir.join(f)).ok()
    });
    (same && bin.is_file()).then_some(bin)
}

static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// The collector binary, built with `go build` from `xtask/collector/` when missing (the
/// modules come through the Go module proxy, ~500 MB of them; with empty Go caches about
/// 2 minutes on two cores, 3.5 when other builds share them; 2 s when only the binary is
/// missing); a no-op once built. Installs the newest Go of go-versions.toml if needed.
pub fn install() -> Result<PathBuf> {
    if let Some(bin) = installed() {
        return Ok(bin);
    }
    let _guard = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = installed() {
        return Ok(bin);
    }
    let versions = crate::go_versions()?;
    let newest = versions.last().context("go-versions.toml lists no versions")?;
    let tc = crate::toolchain(newest)?;
    let dir = cache_dir().join(COLLECTOR_VERSION);
    eprintln!(
        "xtask: building the OpenTelemetry Collector {COLLECTOR_VERSION} (core components) with Go {} into {}",
        tc.version,
        dir.display()
    );
    let started = Instant::now();
    std::fs::create_dir_all(cache_dir())?;
    // A scratch copy: concurrent installers never share a half-made directory, and the
    // build writes nothing into the work tree.
    let tmp = cache_dir().join(format!(".{COLLECTOR_VERSION}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for f in SOURCES {
        std::fs::copy(sources().join(f), tmp.join(f)).with_context(|| format!("copying xtask/collector/{f}"))?;
    }
    let mut build = tc.command();
    // go.sum pins every module: a build that would change it is an error, not an update.
    build.current_dir(&tmp).env("GOFLAGS", "-mod=readonly").env("CGO_ENABLED", "0");
    build.args(["build", "-trimpath", "-ldflags=-s -w", "-o", "otelcol", "."]);
    if let Err(e) = crate::run(&mut build) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("building the OpenTelemetry Collector {COLLECTOR_VERSION}")));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have put its build in place first: take that one.
        let _ = std::fs::remove_dir_all(&tmp);
        return installed().with_context(|| format!("moving the collector into {}: {e}", dir.display()));
    }
    eprintln!("xtask: built the collector in {:.0} s", started.elapsed().as_secs_f64());
    installed().with_context(|| format!("{} holds no collector after the build", dir.display()))
}

/// Whether the collector can run here: built, or a Go toolchain (or Python 3 to install
/// one) to build it with, and `openssl` for the certificates. Fails under CI (the tests
/// must run), else prints why the test is skipped.
pub fn require_collector() -> Result<bool> {
    let newest = crate::go_versions()?.pop().unwrap_or_default();
    let buildable = installed().is_some() || crate::venv_go(&newest).is_file() || crate::which("python3").is_some();
    let why = if !buildable {
        Some("the OpenTelemetry Collector is not built and there is no Go (nor Python 3 to install one) to build it")
    } else if crate::which("openssl").is_none() {
        Some("the openssl command is not installed")
    } else {
        None
    };
    let Some(why) = why else { return Ok(true) };
    if crate::in_ci() {
        bail!("{why}, and CI=true: `cargo xtask test` installs what the collector tests need");
    }
    eprintln!("SKIP: {why} (`cargo xtask test` installs it)");
    Ok(false)
}

/// TLS on the collector's OTLP receivers.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate chain and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, every client must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// TLS with `certs.server`, no client certificates asked.
    pub fn server(certs: &crate::certs::TestCerts) -> ServerTls {
        ServerTls { cert: certs.server.clone(), key: certs.server_key.clone(), client_ca: None }
    }

    /// [`ServerTls::server`], and clients must show a certificate signed by `certs.ca`.
    pub fn mutual(certs: &crate::certs::TestCerts) -> ServerTls {
        ServerTls { client_ca: Some(certs.ca.clone()), ..ServerTls::server(certs) }
    }
}

/// Where the collector sends what it receives: a plain (no TLS) OTLP endpoint.
#[derive(Debug, Clone)]
pub enum Forward {
    /// OTLP/gRPC to `127.0.0.1:PORT` (an `http://` prefix is accepted), uncompressed.
    Grpc(String),
    /// OTLP/HTTP protobuf to `http://127.0.0.1:PORT` (`/v1/traces`, `/v1/metrics`
    /// appended), gzip-compressed as the exporter does by default.
    Http(String),
}

/// What [`Collector::start`] runs.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// None: plain `http://` receivers.
    pub tls: Option<ServerTls>,
    /// Traces and metrics both go there.
    pub forward: Forward,
}

impl CollectorConfig {
    /// The configuration file's text: JSON, which is YAML too.
    pub fn render(&self, grpc_port: u16, http_port: u16) -> String {
        let tls = self.tls.as_ref().map(|t| {
            let mut v = serde_json::json!({ "cert_file": t.cert, "key_file": t.key });
            if let Some(ca) = &t.client_ca {
                v["client_ca_file"] = serde_json::json!(ca);
            }
            v
        });
        let protocol = |port: u16| {
            let mut v = serde_json::json!({ "endpoint": format!("127.0.0.1:{port}") });
            if let Some(tls) = &tls {
                v["tls"] = tls.clone();
            }
            v
        };
        let (name, exporter) = match &self.forward {
            Forward::Grpc(addr) => {
                let addr = addr.trim_start_matches("http://").trim_end_matches('/');
                let v = serde_json::json!({ "endpoint": addr, "tls": { "insecure": true }, "compression": "none" });
                ("otlp_grpc", v)
            }
            Forward::Http(url) => {
                let url = url.trim_end_matches('/');
                let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
                ("otlp_http", serde_json::json!({ "endpoint": url }))
            }
        };
        let pipeline = serde_json::json!({ "receivers": ["otlp"], "exporters": ["debug", name] });
        let config = serde_json::json!({
            "receivers": { "otlp": { "protocols": { "grpc": protocol(grpc_port), "http": protocol(http_port) } } },
            "exporters": { "debug": { "verbosity": "basic" }, name: exporter },
            "service": {
                // No own metrics: they would listen on port 8888, once per machine.
                "telemetry": { "metrics": { "level": "none" } },
                "pipelines": { "traces": pipeline.clone(), "metrics": pipeline },
            },
        });
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }
}

/// A running collector of its own.
pub struct Collector {
    child: Option<Child>,
    dir: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
    tls: bool,
}

impl Collector {
    /// Builds the collector if needed, writes `cfg` to a scratch directory and starts it
    /// on two free loopback ports; returns once it logged that it is ready (both
    /// receivers listen). Its log (stdout and stderr) is [`Collector::log`].
    pub fn start(cfg: &CollectorConfig) -> Result<Collector> {
        let bin = install()?;
        // A port taken between free_port and the collector's bind: new ports, twice.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Collector::start_once(&bin, cfg) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => continue,
                r => return r,
            }
        }
    }

    fn start_once(bin: &Path, cfg: &CollectorConfig) -> Result<Collector> {
        let grpc_port = free_port()?;
        let mut http_port = free_port()?;
        while http_port == grpc_port {
            http_port = free_port()?;
        }
        let dir = std::env::temp_dir().join(format!("inject-otelcol.{}.{grpc_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // From here on Drop stops the process and removes the directory.
        let mut col = Collector { child: None, dir, grpc_port, http_port, tls: cfg.tls.is_some() };
        let config = col.dir.join("config.yaml");
        std::fs::write(&config, cfg.render(grpc_port, http_port))?;
        let log = std::fs::File::create(col.log_path())?;
        let mut c = Command::new(bin);
        c.arg("--config").arg(format!("file:{}", config.display()));
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        col.child = Some(c.spawn().with_context(|| format!("starting {}", bin.display()))?);
        let deadline = Instant::now() + START;
        loop {
            let text = col.log();
            if text.contains(READY) {
                return Ok(col);
            }
            if let Some(status) = col.child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                bail!("the collector exited ({status}) before it was ready; its log:\n{}", text.trim_end());
            }
            if Instant::now() > deadline {
                bail!("the collector was not ready within {START:?}; its log:\n{}", text.trim_end());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The OTLP/gRPC endpoint: `https://127.0.0.1:PORT` (`http://` without TLS).
    pub fn grpc_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.grpc_port)
    }

    /// The OTLP/HTTP endpoint, without `/v1/...`: `https://127.0.0.1:PORT`.
    pub fn http_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.http_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("collector.log")
    }

    /// Everything the collector printed so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The configuration it runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM (a graceful shutdown that flushes the exporters), SIGKILL at 10 s;
            // by pid, our own child, not yet reaped.
            if let Ok(None) = child.try_wait() {
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("collector: its configuration and log are kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{CollectorConfig, Forward, ServerTls};

    #[test]
    fn the_configuration_names_what_it_was_given() {
        let tls = ServerTls { cert: "/c/s.pem".into(), key: "/c/s.key".into(), client_ca: Some("/c/ca.pem".into()) };
        let cfg = CollectorConfig { tls: Some(tls), forward: Forward::Grpc("http://127.0.0.1:9".into()) };
        let v: serde_json::Value = serde_json::from_str(&cfg.render(1, 2)).unwrap_or_default();
        let grpc = &v["receivers"]["otlp"]["protocols"]["grpc"];
        assert_eq!(grpc["endpoint"], "127.0.0.1:1");
        assert_eq!(grpc["tls"]["client_ca_file"], "/c/ca.pem");
        assert_eq!(v["receivers"]["otlp"]["protocols"]["http"]["tls"]["cert_file"], "/c/s.pem");
        assert_eq!(v["exporters"]["otlp_grpc"]["endpoint"], "127.0.0.1:9");
        assert_eq!(v["service"]["pipelines"]["metrics"]["exporters"][1], "otlp_grpc");
        let plain = CollectorConfig { tls: None, forward: Forward::Http("127.0.0.1:9".into()) };
        let v: serde_json::Value = serde_json::from_str(&plain.render(1, 2)).unwrap_or_default();
        assert!(v["receivers"]["otlp"]["protocols"]["http"].get("tls").is_none());
        assert_eq!(v["exporters"]["otlp_http"]["endpoint"], "http://127.0.0.1:9");
    }
}
