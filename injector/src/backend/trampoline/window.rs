//! What both attaching and cleaning up need inside a stopped window: where injected
//! syscalls run from, and waiting for a moment when no thread is where we may not write.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use go_abi::GoBinary;

use super::ptrace::pad::PAD_LEN;
use super::ptrace::{Session, SessionError};

/// How long to keep letting the world run and looking again when a thread sits where we
/// may not write (a patch site, a signal handler), and the fewest looks before giving up.
const SAFE_POINT_BUDGET: Duration = Duration::from_secs(3);
const SAFE_POINT_ATTEMPTS: usize = 50;

/// Lets the world run before the next look, for 0.3 to 2.3 ms, varied: with a fixed
/// period the looks can lock onto a periodic signal (SIGPROF at 1000 Hz is one) and find
/// the same thread in its handler every time.
pub fn let_run_between_looks(s: &mut Session, attempt: usize) -> Result<(), SessionError> {
    let jitter = (attempt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53; // 0..2047
    s.resume_briefly(Duration::from_micros(300 + jitter))
}

/// Whether to look again after `attempt` looks that began at `started`.
pub fn keep_looking(attempt: usize, started: Instant) -> bool {
    attempt < SAFE_POINT_ATTEMPTS || started.elapsed() < SAFE_POINT_BUDGET
}

/// Where injected syscalls run from in a process, and the executable's bytes there.
pub struct PadSite {
    pub addr: u64,
    pub original: Vec<u8>,
}

/// Where injected syscalls run from (unbiased): the start of `runtime.rt0_go`, the
/// program's start-up code, which runs once and never again. A landing pad is written there
/// for each call and the bytes put back before any thread runs (see `ptrace::pad`): should
/// inject die in between, nothing executes what it left there, and the next inject puts the
/// bytes back ([`super::recover`]).
pub fn syscall_pad(bin: &GoBinary<'_>) -> Result<u64> {
    let f = bin
        .pclntab
        .funcs()
        .filter_map(Result::ok)
        .find(|f| f.name == "runtime.rt0_go")
        .context("no runtime.rt0_go in the function table (not a Go executable?)")?;
    ensure!(
        bin.pclntab.code_end(&f) - f.entry >= PAD_LEN as u64,
        "runtime.rt0_go is {} bytes, too short for a {PAD_LEN}-byte landing pad",
        bin.pclntab.code_end(&f) - f.entry
    );
    Ok(f.entry)
}

/// [`syscall_pad`] in the live process, with the executable's bytes there.
pub fn pad_site(bin: &GoBinary<'_>, bias: u64) -> Result<PadSite> {
    let at = syscall_pad(bin)?;
    let original = bin.elf.read(at, PAD_LEN).context("runtime.rt0_go outside the file")?.to_vec();
    Ok(PadSite { addr: at + bias, original })
}
