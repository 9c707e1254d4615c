//! Thin wrappers over the raw ptrace, waitid and signal calls the session needs, and readers
//! of `/proc` files. Requests that carry a signal number are issued through `libc::ptrace`
//! directly: nix's `Signal` enum has no real-time signals, and a session must hand back any
//! signal it holds.

use std::fs;
use std::io;
use std::mem::MaybeUninit;

use nix::errno::Errno;

pub type SysResult<T> = Result<T, Errno>;

/// What `waitid` reported for one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEvent {
    /// A ptrace-stop. `event` is 0 for a signal-delivery-stop, else a `PTRACE_EVENT_*` value
    /// (`PTRACE_EVENT_STOP` for interrupt, group and initial stops).
    Stopped { sig: i32, event: i32 },
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

fn check(r: libc::c_long) -> SysResult<libc::c_long> {
    if r == -1 { Err(Errno::last()) } else { Ok(r) }
}

/// A ptrace request whose `data` is a signal number or an option word.
fn request(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> SysResult<()> {
    // SAFETY: none of the requests issued through here read or write our memory through
    // `addr` or `data`; they are plain integers.
    check(unsafe { libc::ptrace(req, tid, addr as *mut libc::c_void, data as *mut libc::c_void) }).map(drop)
}

pub fn seize(tid: i32, options: libc::c_int) -> SysResult<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize)
}

pub fn interrupt(tid: i32) -> SysResult<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0)
}

pub fn cont(tid: i32, sig: i32) -> SysResult<()> {
    request(libc::PTRACE_CONT, tid, 0, sig as usize)
}

pub fn detach(tid: i32, sig: i32) -> SysResult<()> {
    request(libc::PTRACE_DETACH, tid, 0, sig as usize)
}

/// Resumes until the next syscall-enter or -exit stop.
pub fn syscall_cont(tid: i32) -> SysResult<()> {
    request(libc::PTRACE_SYSCALL, tid, 0, 0)
}

/// Leaves a thread that is in group-stop stopped but lets it report the end of the group-stop
/// (SIGCONT) or a PTRACE_INTERRUPT. nix has no wrapper for it.
pub fn listen(tid: i32) -> SysResult<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0)
}

pub fn getregs(tid: i32) -> SysResult<libc::user_regs_struct> {
    let mut regs = MaybeUninit::<libc::user_regs_struct>::uninit();
    // SAFETY: PTRACE_GETREGS writes exactly one user_regs_struct to `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, std::ptr::null_mut::<libc::c_void>(), regs.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful request above.
    Ok(unsafe { regs.assume_init() })
}

pub fn setregs(tid: i32, regs: &libc::user_regs_struct) -> SysResult<()> {
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, std::ptr::null_mut::<libc::c_void>(), regs as *const _) })
        .map(drop)
}

pub fn getsiginfo(tid: i32) -> SysResult<libc::siginfo_t> {
    let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: PTRACE_GETSIGINFO writes one siginfo_t to `data`.
    check(unsafe {
        libc::ptrace(libc::PTRACE_GETSIGINFO, tid, std::ptr::null_mut::<libc::c_void>(), info.as_mut_ptr())
    })?;
    // SAFETY: zero-initialised, then filled by the kernel.
    Ok(unsafe { info.assume_init() })
}

pub fn setsiginfo(tid: i32, info: &libc::siginfo_t) -> SysResult<()> {
    // SAFETY: PTRACE_SETSIGINFO reads one siginfo_t from `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_SETSIGINFO, tid, std::ptr::null_mut::<libc::c_void>(), info as *const _) })
        .map(drop)
}

/// PTRACE_GETEVENTMSG: the new thread's id after a clone event.
pub fn geteventmsg(tid: i32) -> SysResult<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long to `data`.
    check(unsafe {
        libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, std::ptr::null_mut::<libc::c_void>(), &mut msg as *mut _)
    })?;
    Ok(msg)
}

pub fn peek(tid: i32, addr: u64) -> SysResult<u64> {
    nix::sys::ptrace::read(nix::unistd::Pid::from_raw(tid), addr as nix::sys::ptrace::AddressType).map(|w| w as u64)
}

pub fn poke(tid: i32, addr: u64, word: u64) -> SysResult<()> {
    nix::sys::ptrace::write(
        nix::unistd::Pid::from_raw(tid),
        addr as nix::sys::ptrace::AddressType,
        word as libc::c_long,
    )
}

/// Polls one thread without blocking. With `keep`, an exit is reported but left to be reaped
/// by someone else (WNOWAIT); a stop is always consumed.
pub fn poll(tid: i32, keep_exit: bool) -> SysResult<Option<WaitEvent>> {
    let base = libc::WEXITED | libc::WSTOPPED | libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD;
    let peek_flags = if keep_exit { base | libc::WNOWAIT } else { base };
    let Some((code, status)) = waitid(tid, peek_flags)? else { return Ok(None) };
    let ev = match code {
        libc::CLD_TRAPPED | libc::CLD_STOPPED => WaitEvent::Stopped { sig: status & 0xff, event: (status >> 8) & 0xff },
        libc::CLD_EXITED => WaitEvent::Exited(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => WaitEvent::Killed(status),
        _ => return Ok(None),
    };
    if keep_exit && matches!(ev, WaitEvent::Stopped { .. }) {
        // It was only peeked at: consume the stop now (a thread reports one stop at a time).
        waitid(tid, base)?;
    }
    Ok(Some(ev))
}

fn waitid(tid: i32, flags: libc::c_int) -> SysResult<Option<(i32, i32)>> {
    let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: waitid fills in the siginfo_t we pass.
    let r = unsafe { libc::waitid(libc::P_PID, tid as libc::id_t, info.as_mut_ptr(), flags) };
    if r == -1 {
        return Err(Errno::last());
    }
    // SAFETY: zero-initialised and possibly filled by the kernel.
    let info = unsafe { info.assume_init() };
    // SAFETY: for SIGCHLD-style siginfo the pid and status fields are the valid union members.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 { Ok(None) } else { Ok(Some((info.si_code, status))) }
}

/// tgkill(2): a signal for one thread, with a SI_TKILL siginfo naming us.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> SysResult<()> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) }).map(drop)
}

/// rt_tgsigqueueinfo(2): a signal for one thread with the given siginfo. The kernel only
/// accepts siginfo that a process may forge (negative si_code other than SI_TKILL).
pub fn tgsigqueueinfo(tgid: i32, tid: i32, info: &libc::siginfo_t) -> SysResult<()> {
    // SAFETY: the kernel reads one siginfo_t from the pointer.
    check(unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, tgid, tid, info.si_signo, info as *const _) }).map(drop)
}

/// The value of `field` (e.g. "TracerPid") in a `/proc/.../status` file.
pub fn status_field(path: &str, field: &str) -> io::Result<Option<String>> {
    let text = fs::read_to_string(path)?;
    Ok(text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim().to_string())
    }))
}

/// Whether `[addr, addr+len)` lies in one executable mapping of `pid` (from `/proc/PID/maps`).
pub fn executable(pid: i32, addr: u64, len: u64) -> io::Result<bool> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else { return false };
        let Some((a, b)) = range.split_once('-') else { return false };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { return false };
        a <= addr && addr + len <= b && perms.as_bytes().get(2) == Some(&b'x')
    }))
}

/// The thread ids in `/proc/PID/task`, sorted.
pub fn list_tasks(pid: i32) -> io::Result<Vec<i32>> {
    let mut tids: Vec<i32> =
        fs::read_dir(format!("/proc/{pid}/task"))?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The thread id of the tracer of thread `tid` (0 for none): `TracerPid` in its status file
/// names the tracing *thread*.
pub fn tracer_of(pid: i32, tid: i32) -> Option<i32> {
    status_field(&format!("/proc/{pid}/task/{tid}/status"), "TracerPid").ok()??.parse().ok()
}

/// The process (thread group) a thread id belongs to.
pub fn tgid_of(tid: i32) -> Option<i32> {
    status_field(&format!("/proc/{tid}/status"), "Tgid").ok()??.parse().ok()
}

/// Whether thread `tid` is on its way out (PF_EXITING in the flags field of its stat file, or
/// a zombie, or gone): the kernel refuses to seize such a thread with EPERM.
pub fn exiting(pid: i32, tid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else { return true };
    let Some((_, rest)) = stat.rsplit_once(')') else { return true };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); flags is field 9.
    let state = fields.first().copied().unwrap_or("X");
    let flags = fields.get(6).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    matches!(state, "Z" | "X" | "x") || flags & PF_EXITING != 0
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid(2) has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Whether the calling process has CAP_SYS_PTRACE in its effective set.
pub fn have_cap_sys_ptrace() -> bool {
    status_field("/proc/self/status", "CapEff")
        .ok()
        .flatten()
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << 19) != 0)
}

/// The process's real uid (first field of `Uid:`).
pub fn uid_of(pid: i32) -> Option<u32> {
    status_field(&format!("/proc/{pid}/status"), "Uid").ok()??.split_whitespace().next()?.parse().ok()
}
