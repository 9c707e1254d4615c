//! Opening the executable to inspect: a file, or the binary of a live process (through
//! `/proc/PID/exe`, which works for deleted binaries and across mount namespaces), with
//! the load bias of a PIE process read from `/proc/PID/maps`; and the CPUs it may run on.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;

/// An executable's bytes, where they came from, and how far the process moved them.
pub struct Executable {
    pub path: PathBuf,
    pub pid: Option<i32>,
    /// Shared with the output thread, which names dynamic types from the file.
    pub map: std::sync::Arc<Mmap>,
    /// Added to link-time addresses to get run-time addresses (0 unless a PIE process).
    pub bias: u64,
}

/// Where to read the executable from (`--exe` or `--pid`).
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// A Go executable file.
    #[arg(long, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// A running Go process.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
}

impl TargetArgs {
    pub fn open(&self) -> Result<Executable> {
        match (&self.exe, self.pid) {
            (Some(p), _) => open_file(p),
            (None, Some(pid)) => open_pid(pid),
            (None, None) => bail!("give --exe PATH or --pid PID"),
        }
    }
}

fn open_file(path: &Path) -> Result<Executable> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        bail!("{} is a directory, not an executable", path.display());
    }
    if !meta.is_file() {
        bail!("{} is not a regular file, so not an executable", path.display());
    }
    // SAFETY: the map is read-only; a binary truncated underneath us would fault, which
    // is the same exposure as any tool reading a file through mmap.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    Ok(Executable { path: path.to_path_buf(), pid: None, map: map.into(), bias: 0 })
}

/// `/proc/PID` of a process that exists, or the one error every command gives for it.
pub fn process_dir(pid: i32) -> Result<PathBuf> {
    if pid <= 0 {
        bail!("invalid pid {pid}");
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        bail!("no process with pid {pid}");
    }
    Ok(proc_dir)
}

fn open_pid(pid: i32) -> Result<Executable> {
    let proc_dir = process_dir(pid)?;
    let exe_link = proc_dir.join("exe");
    let shown = std::fs::read_link(&exe_link).unwrap_or_else(|_| exe_link.clone());
    let file = match File::open(&exe_link) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied reading the executable of pid {pid}: run inject as the same user as the \
             target, or with CAP_SYS_PTRACE (e.g. sudo, or --cap-add=SYS_PTRACE in a container)"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("pid {pid} has no executable (a kernel thread, or it exited)")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", exe_link.display())),
    };
    // SAFETY: as in open_file.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map the executable of pid {pid}"))?;
    let bias = load_bias(pid, &map).unwrap_or(0);
    Ok(Executable { path: shown, pid: Some(pid), map: map.into(), bias })
}

/// The load bias of a PIE process: where the kernel mapped file offset 0 minus the
/// lowest PT_LOAD address. Zero for fixed-address executables.
fn load_bias(pid: i32, data: &[u8]) -> Option<u64> {
    let elf = go_abi::elf::Elf::parse(data).ok()?;
    if !elf.pie {
        return Some(0);
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe.to_string_lossy();
    let exe = exe.trim_end_matches(" (deleted)");
    let first = elf.segments.iter().map(|s| s.vaddr).min()? & !0xfff;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let range = f.next()?;
        let _perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let path = f.nth(2)?;
        if offset != 0 || path != exe {
            return None;
        }
        let start = u64::from_str_radix(range.split('-').next()?, 16).ok()?;
        Some(start - first)
    })
}

/// The file exec(2) would run for `program`, searching PATH as execvp does.
pub fn resolve(program: &str) -> std::path::PathBuf {
    if program.contains('/') {
        return program.into();
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|c| c.is_file()))
        .unwrap_or_else(|| program.into())
}

/// GOMAXPROCS from the target's environment, when set.
pub fn gomaxprocs(pid: i32) -> u32 {
    std::fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .and_then(|env| {
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"GOMAXPROCS="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        })
        .unwrap_or(1)
}

/// CPUs the kernel may ever run the target on (the default GOMAXPROCS).
pub fn possible_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let n: u32 = text
        .trim()
        .split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
            None => r.parse::<u32>().ok().map(|_| 1),
        })
        .sum();
    n.max(1)
}
