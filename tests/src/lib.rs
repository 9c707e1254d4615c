//! Harness for the integration tests: real Go programs from `fixtures/` and the real
//! `inject` binary, synchronised on the lines they print (never on sleeps).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod otlp;
pub mod schema;
pub mod servers;

/// A child process whose output lines arrive on a channel, so a test can wait for a
/// specific line with a deadline.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<(bool, String)>,
    /// Every line seen so far: (from stderr, text).
    pub seen: Vec<(bool, String)>,
    name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Proc> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let (tx, rx) = channel();
        for (is_err, stream) in [
            (false, Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>),
            (true, Box::new(child.stderr.take().context("stderr")?)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((is_err, line)).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Proc { child, stdin, lines: rx, seen: Vec::new(), name: name.to_string() })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a line starting with `prefix`; returns it.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line(prefix, timeout, |l| l.starts_with(prefix))
    }

    /// Waits for a line containing `text` anywhere (servers' logs start with a time).
    pub fn wait_for_any(&mut self, text: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line(text, timeout, |l| l.contains(text))
    }

    fn wait_for_line(&mut self, prefix: &str, timeout: Duration, hit: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        if let Some((_, l)) = self.seen.iter().find(|(_, l)| hit(l)) {
            return Ok(l.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = hit(&line.1);
                    self.seen.push(line.clone());
                    if hit {
                        return Ok(line.1);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: no line {prefix:?} within {timeout:?}; saw:\n{}", self.name, self.transcript())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{}: exited before printing {prefix:?}; saw:\n{}", self.name, self.transcript())
                }
            }
        }
    }

    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for exit (with a deadline, killing on timeout) and collects remaining output.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                // Drain the readers (they end at EOF).
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(l);
                }
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not exit within {timeout:?}; saw:\n{}", self.name, self.transcript());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Collects the lines that arrive within `time` (or until both streams end): what a
    /// process that was reaped elsewhere printed.
    pub fn drain(&mut self, time: Duration) {
        let deadline = Instant::now() + time;
        while let Ok(l) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(l);
        }
    }

    /// The value after `prefix ` in the first such stdout line.
    pub fn value(&self, prefix: &str) -> Option<String> {
        self.seen.iter().find(|(e, l)| !e && l.starts_with(prefix)).map(|(_, l)| l[prefix.len()..].trim().to_string())
    }

    pub fn transcript(&self) -> String {
        self.seen.iter().map(|(e, l)| format!("{}{l}\n", if *e { "! " } else { "  " })).collect()
    }

    /// Sends `sig`, unless the child has already been waited for (its pid may be
    /// someone else's by now).
    pub fn signal(&mut self, sig: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc_kill(self.pid(), sig) };
        }
    }
}

/// Sends `sig` to `pid`, a process the test started (directly or through a wrapper).
pub fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory preconditions.
    unsafe { libc_kill(pid, sig) };
}

/// Sends SIGURG to every thread of `pid` (a process the test started), one round every
/// `period`, until `stop`; counts the signals sent. Far above the runtime's own rate
/// (about 100 a second per thread) is the point, but not so far that some thread is always
/// in a signal handler: inject, which patches only when none is, would give up attaching.
pub fn sigurg_storm(
    pid: i32,
    period: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
            let tids: Vec<i32> = tasks.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
            // The thread list is read again every 20 rounds.
            for _ in 0..20 {
                for &tid in &tids {
                    // SAFETY: tgkill(2) with integer arguments.
                    if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGURG) } == 0 {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(period);
            }
        }
    })
}

/// A per-test-process path under target/test-scratch.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let d = xtask::workspace_root().join("target/test-scratch");
    std::fs::create_dir_all(&d).expect("creating target/test-scratch");
    d.join(format!("{name}.{}", std::process::id()))
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Starts a Go fixture binary and waits for its READY line.
pub fn start_fixture(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(cmd, &exe.display().to_string())?;
    p.wait_for("READY", Duration::from_secs(30))?;
    Ok(p)
}

/// Starts `inject ARGS`; with `wait_installed`, waits until it reports its probes are in.
pub fn start_inject(args: &[String], wait_installed: bool) -> Result<Proc> {
    start_inject_env(args, &[], wait_installed)
}

/// `start_inject` with extra environment variables (OTEL_* configuration).
pub fn start_inject_env(args: &[String], env: &[(&str, &str)], wait_installed: bool) -> Result<Proc> {
    let mut cmd = Command::new(xtask::inject_binary()?);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(cmd, "inject")?;
    if wait_installed {
        p.wait_for("inject: probing", Duration::from_secs(30))?;
    }
    Ok(p)
}

/// The text (code) bytes of a live process compared with its executable file: returns
/// the first differing address, if any.
pub fn text_differs_from_file(pid: i32, exe: &Path) -> Result<Option<u64>> {
    Ok(text_changes(pid, exe)?.first().map(|c| c.0))
}

/// Every run of changed bytes in a live process's text: (address, live bytes).
pub fn text_changes(pid: i32, exe: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    let data = std::fs::read(exe)?;
    let bin = go_abi::GoBinary::parse(&data)?;
    let text = bin.text_range();
    let bias = live_bias(pid, &bin)?;
    let file = bin.elf.read(text.start, (text.end - text.start) as usize).context("text in file")?;
    let mut mem = vec![0u8; file.len()];
    let f = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut mem, text.start + bias)?;
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut prev = None;
    for (i, (&m, &b)) in mem.iter().zip(file).enumerate() {
        if m == b {
            continue;
        }
        let at = text.start + bias + i as u64;
        match runs.last_mut() {
            Some(r) if prev == Some(i.wrapping_sub(1)) => r.1.push(m),
            _ => runs.push((at, vec![m])),
        }
        prev = Some(i);
    }
    Ok(runs)
}

fn live_bias(pid: i32, bin: &go_abi::GoBinary<'_>) -> Result<u64> {
    if !bin.elf.pie {
        return Ok(0);
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let first = bin.elf.segments.iter().map(|s| s.vaddr).min().unwrap_or(0) & !0xfff;
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[2] == "00000000" && Path::new(f[5]) == exe {
            let start = u64::from_str_radix(f[0].split('-').next().unwrap_or("0"), 16)?;
            return Ok(start - first);
        }
    }
    bail!("no mapping of {} in pid {pid}", exe.display())
}

/// Fails under CI, else prints why the test is skipped: for environments without ptrace.
pub fn require_ptrace() -> Result<bool> {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    let ok = scope.trim().is_empty() || scope.trim() == "0" || is_root();
    if !ok {
        if xtask::in_ci() {
            bail!("ptrace is restricted (ptrace_scope {}), and CI=true: this test must run", scope.trim());
        }
        eprintln!("SKIP: ptrace restricted (ptrace_scope {})", scope.trim());
    }
    Ok(ok)
}

pub use xtask::is_root;

static EXCLUSIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether uprobes can be used here (the uprobe PMU, root or CAP_BPF and CAP_PERFMON);
/// under CI a machine without them fails.
pub fn require_bpf() -> Result<bool> {
    let pmu = std::path::Path::new("/sys/bus/event_source/devices/uprobe/type").exists();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let caps = eff & (1 << 21) != 0 || (eff & (1 << 38) != 0 && eff & (1 << 39) != 0);
    if pmu && caps {
        return Ok(true);
    }
    let why = if pmu { "neither root nor CAP_BPF and CAP_PERFMON" } else { "no uprobe PMU in this kernel" };
    if xtask::in_ci() {
        bail!("uprobes are unavailable ({why}), and CI=true: this test must run");
    }
    eprintln!("SKIP: uprobes unavailable ({why})");
    Ok(false)
}

/// Serialises the tests of one binary that run live targets under load: on two cores,
/// two of them at once starve each other's collector and measure the machine, not inject.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a one-file program with Go 1.19 (too old for inject) into `dir`; `None` (a
/// skip) when Go 1.19 is missing outside CI. It comes from Debian's golang-1.19-go, which
/// `cargo xtask test` installs.
pub fn build_with_go_1_19(dir: &Path, main_go: &str) -> Result<Option<std::path::PathBuf>> {
    let go = Path::new("/usr/lib/go-1.19/bin/go");
    if !go.exists() {
        if xtask::in_ci() {
            bail!("Go 1.19 is missing (/usr/lib/go-1.19/bin/go): run cargo xtask test, which installs it");
        }
        eprintln!("SKIP: Go 1.19 not installed (cargo xtask test installs golang-1.19-go)");
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("main.go"), main_go)?;
    std::fs::write(dir.join("go.mod"), "module old\n\ngo 1.19\n")?;
    let exe = dir.join("old");
    xtask::run(
        Command::new(go)
            .current_dir(dir)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .args(["build", "-o"])
            .arg(&exe),
    )?;
    Ok(Some(exe))
}

/// The port of a `host:port` address (-1 when it has none).
pub fn port(addr: &str) -> i64 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(-1)
}

/// Fails unless span `s` has each attribute of `want` with that value (strings and ints).
pub fn check_attrs(s: &otlp::Received, want: &[(&str, serde_json::Value)]) -> Result<()> {
    for (k, v) in want {
        let got = match v {
            serde_json::Value::String(_) => s.attr_str(k).map(serde_json::Value::from),
            _ => s.attr_i64(k).map(serde_json::Value::from),
        };
        anyhow::ensure!(got.as_ref() == Some(v), "{} {}: {k} is {got:?}, want {v}", s.span.name, s.span_id());
    }
    Ok(())
}

/// GET `path` from `addr` over a fresh HTTP/1.1 connection (answers within 30 s): the
/// status code and body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let code = r.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("response {r:?}"))?;
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((code, body))
}
