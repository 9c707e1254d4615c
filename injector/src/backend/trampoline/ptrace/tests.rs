//! Tests of [`Session`] against real processes: Go fixtures (built by xtask), a small Go
//! program of our own (`testdata/ptracetest.go`) and a C program for exact signal accounting
//! (`testdata/sigcount.c`), both built under `target/ptrace-test/`. Every test attaches only
//! to processes it started and kills them by pid. Where ptrace is not permitted a test says
//! so and returns, or fails when `CI=true`.

use super::*;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};

use xtask::{Flavor, GoToolchain};

const LINE_TIMEOUT: Duration = Duration::from_secs(60);

fn toolchains() -> Vec<GoToolchain> {
    xtask::test_toolchains().expect("Go toolchains for the tests")
}

fn oldest() -> GoToolchain {
    toolchains().remove(0)
}

fn scratch_dir() -> PathBuf {
    xtask::workspace_root().join("target/ptrace-test")
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds testdata/ptracetest.go with `tc` (cached while the source is unchanged).
fn ptracetest(tc: &GoToolchain) -> PathBuf {
    let _g = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = include_str!("testdata/ptracetest.go");
    let dir = scratch_dir().join(format!("go-{}", tc.version));
    let bin = dir.join("ptracetest");
    let main = dir.join("main.go");
    if bin.exists() && fs::read_to_string(&main).is_ok_and(|s| s == src) {
        return bin;
    }
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("go.mod"), "module ptracetest\n\ngo 1.21\n").unwrap();
    fs::write(&main, src).unwrap();
    let mut c = tc.command();
    c.current_dir(&dir).env("CGO_ENABLED", "0").args(["build", "-o"]).arg(&bin).arg(".");
    xtask::run(&mut c).expect("building ptracetest");
    bin
}

/// Builds testdata/sigcount.c with the system C compiler.
fn sigcount() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = scratch_dir();
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("sigcount.c");
        fs::write(&src, include_str!("testdata/sigcount.c")).unwrap();
        let bin = dir.join("sigcount");
        xtask::run(Command::new("cc").args(["-O1", "-pthread", "-o"]).arg(&bin).arg(&src))
            .expect("building sigcount.c (needs a C compiler)");
        bin
    })
    .clone()
}

fn fixture(name: &str) -> PathBuf {
    xtask::build_fixture(name, &oldest(), Flavor::Default).expect("building fixture")
}

/// A process started by a test: stdout lines arrive on a channel; killed by pid on drop.
struct Target {
    child: Child,
    pid: i32,
    lines: Receiver<String>,
    stdin: Option<ChildStdin>,
    seen: Vec<String>,
}

impl Target {
    fn spawn(mut cmd: Command) -> Target {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).env("GOMAXPROCS", "4");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Target { pid: child.id() as i32, child, lines: rx, stdin, seen: Vec::new() }
    }

    /// Waits for a line matching `pred`; panics on timeout or end of output.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} line within {LINE_TIMEOUT:?}; saw {:?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => panic!("output ended before {what}; saw {:?}", self.seen),
            }
        }
    }

    fn ready(&mut self) {
        self.wait_line("READY", |l| l == "READY");
    }

    fn send_line(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{s}").unwrap();
        stdin.flush().unwrap();
    }

    /// The lines received so far (and those already queued).
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on a process we started.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0, "kill {} {sig}", self.pid);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches, or reports that ptrace is not permitted here: then the test returns early, or
/// fails under CI=true.
fn attach(pid: i32) -> Option<Session> {
    match Session::attach(pid) {
        Ok(s) => Some(s),
        Err(e @ AttachError::PermissionDenied { .. }) => {
            assert!(!xtask::in_ci(), "ptrace is not permitted on this machine, and CI=true: {e}");
            eprintln!("SKIPPED: ptrace is not permitted here: {e}");
            None
        }
        Err(e) => panic!("attach to {pid}: {e}"),
    }
}

macro_rules! attach_or_return {
    ($pid:expr) => {
        match attach($pid) {
            Some(s) => s,
            None => return,
        }
    };
}

/// The state letter of a thread in /proc/PID/task/TID/stat.
fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn tracer(pid: i32) -> i32 {
    sys::status_field(&format!("/proc/{pid}/status"), "TracerPid").unwrap().unwrap().parse().unwrap()
}

/// The executable mapping of the program's own file.
fn exe_text(pid: i32) -> (u64, u64) {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[1].starts_with("r-x") && exe.as_os_str() == f[5] {
            let (a, b) = f[0].split_once('-').unwrap();
            return (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        }
    }
    panic!("no executable mapping of {} in\n{maps}", exe.display());
}

/// Where to run injected syscalls from: the start of the executable's code (any code will
/// do while the session lives: every thread is stopped while the pad is there).
fn pad_at(s: &Session) -> u64 {
    exe_text(s.pid()).0
}

/// SigCgt of the process: the signals it has handlers for.
fn caught(pid: i32) -> String {
    sys::status_field(&format!("/proc/{pid}/status"), "SigCgt").unwrap().unwrap()
}

fn regs_words(r: &libc::user_regs_struct) -> [u64; 27] {
    const _: () = assert!(std::mem::size_of::<libc::user_regs_struct>() == 27 * 8);
    // SAFETY: user_regs_struct is 27 u64 fields on x86-64.
    unsafe { std::mem::transmute_copy(r) }
}

/// Checks that every thread of the session is stopped and that the session knows exactly the
/// threads of /proc/PID/task.
fn assert_all_stopped(s: &Session) {
    let tasks = sys::list_tasks(s.pid()).unwrap();
    assert_eq!(s.threads(), tasks, "session threads vs /proc/{}/task", s.pid());
    for tid in tasks {
        assert_eq!(thread_state(s.pid(), tid), Some('t'), "thread {tid} is not in a tracing stop");
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn checksum(lines: &[String]) -> String {
    lines.iter().find(|l| l.starts_with("CHECKSUM ")).cloned().unwrap_or_else(|| panic!("no CHECKSUM in {lines:?}"))
}

fn run_to_end(mut t: Target) -> Vec<String> {
    let status = t.child.wait().unwrap();
    let mut lines = t.drain().to_vec();
    // The reader thread may still hold the last lines.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(l) = t.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        lines.push(l);
    }
    assert!(status.success(), "target failed: {status}; output {lines:?}");
    lines
}

/// Attaches and detaches `rounds` times while `t` runs; returns (attach, detach) durations and
/// the thread counts seen.
fn attach_detach_rounds(t: &Target, rounds: usize) -> Option<(Vec<Duration>, Vec<Duration>, Vec<usize>)> {
    let (mut att, mut det, mut n) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(10));
        let t0 = Instant::now();
        let s = attach(t.pid)?;
        att.push(t0.elapsed());
        assert_all_stopped(&s);
        n.push(s.threads().len());
        let t1 = Instant::now();
        s.detach().unwrap();
        det.push(t1.elapsed());
        assert_eq!(tracer(t.pid), 0);
    }
    Some((att, det, n))
}

fn report(what: &str, att: &mut [Duration], det: &mut [Duration], n: &[usize]) {
    let (lo, hi) = (n.iter().min().unwrap(), n.iter().max().unwrap());
    println!(
        "MEASURE {what}: {} rounds, {lo}-{hi} threads, attach+stop median {:?} (max {:?}), detach median {:?} (max {:?})",
        att.len(),
        median(att),
        att.iter().max().unwrap(),
        median(det),
        det.iter().max().unwrap()
    );
}

#[test]
fn attach_detach_50_times_keeps_recurse_correct() {
    let bin = fixture("recurse");
    let args = ["-n", "60000", "-goroutines", "8"];
    let reference = run_to_end(Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args);
        c
    }));
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args).arg("-wait");
        c
    });
    t.ready();
    t.send_line("go");
    let Some((mut att, mut det, n)) = attach_detach_rounds(&t, 50) else { return };
    assert!(t.child.try_wait().unwrap().is_none(), "recurse finished before the 50 rounds: make -n larger");
    report("recurse (8 goroutines, GOMAXPROCS=4)", &mut att, &mut det, &n);
    drop(t.stdin.take());
    let lines = run_to_end(t);
    assert_eq!(checksum(&lines), checksum(&reference));
}

#[test]
fn attach_detach_50_times_keeps_funcs_loop_correct() {
    let bin = fixture("funcs");
    let args = ["-loop", "-n", "2500", "-sleep", "1ms"];
    let reference = run_to_end(Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args);
        c
    }));
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args);
        c
    });
    t.ready();
    let Some((mut att, mut det, n)) = attach_detach_rounds(&t, 50) else { return };
    assert!(t.child.try_wait().unwrap().is_none(), "funcs finished before the 50 rounds: make -n larger");
    report("funcs -loop", &mut att, &mut det, &n);
    let lines = run_to_end(t);
    assert_eq!(checksum(&lines), checksum(&reference));
    let calls = |l: &[String]| l.iter().filter(|l| l.starts_with("CALL ")).count();
    assert_eq!(calls(&lines), calls(&reference));
}

#[test]
fn attach_many_threads_timing() {
    // 4 spinning goroutines, plus goroutines parked in read(2) on threads of their own: the
    // thread counts the measurement is about.
    let bin = ptracetest(&oldest());
    for parked in ["0", "20", "100"] {
        let mut t = Target::spawn({
            let mut c = Command::new(&bin);
            c.args(["-mode", "busy", "-workers", "4", "-parked", parked]);
            c
        });
        t.ready();
        let Some((mut att, mut det, n)) = attach_detach_rounds(&t, 50) else { return };
        report(&format!("ptracetest busy, 4 spinning + {parked} parked goroutines"), &mut att, &mut det, &n);
        assert!(n.iter().all(|&n| n > parked.parse().unwrap()));
    }
}

#[test]
fn attach_while_threads_are_created() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "threads", "-tick", "20ms"]);
        c
    });
    t.ready();
    let tick = |l: &str| l.strip_prefix("TICK ").and_then(|n| n.parse::<u64>().ok());
    let mut last = 0;
    let mut seen_threads = BTreeSet::new();
    let (mut clones, mut relisted) = (0, 0);
    let rounds = 200;
    for round in 1..=rounds {
        let mut s = attach_or_return!(t.pid);
        assert_all_stopped(&s);
        if round % 10 == 0 {
            // Threads cloned while the target runs traced are attached by the kernel.
            s.resume_briefly(Duration::from_millis(5)).unwrap();
            assert_all_stopped(&s);
        }
        seen_threads.extend(s.threads());
        clones += s.clones;
        relisted += s.relisted;
        s.detach().unwrap();
        if round % 20 == 0 {
            // It goes on creating threads after we leave.
            let l = t.wait_line("TICK", |l| tick(l).is_some_and(|n| n > last));
            last = tick(&l).unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!(
        "MEASURE threads mode: {} distinct thread ids over {rounds} attaches, {clones} threads attached by the \
         kernel (clone events, mostly in resume_briefly) and {relisted} found by re-listing /proc during attaches, {last} rounds of 4 new threads",
        seen_threads.len()
    );
    assert!(seen_threads.len() > rounds, "threads were not being created: {seen_threads:?}");
    assert!(clones > 0 && relisted > 0, "a path was not exercised: {clones} clone events, {relisted} re-listed");
}

#[test]
fn injected_syscalls_getpid_mmap_munmap() {
    let mut t = Target::spawn(Command::new(fixture("httpserver")));
    let addr = t.wait_line("LISTEN", |l| l.starts_with("LISTEN ")).trim_start_matches("LISTEN ").to_string();
    t.ready();
    let mut s = attach_or_return!(t.pid);
    let (lo, hi) = exe_text(t.pid);
    let g = lo;
    assert!(hi - lo > pad::PAD_LEN as u64);
    let mut code_before = vec![0u8; pad::PAD_LEN];
    s.read(g, &mut code_before).unwrap();

    // getpid in every thread, each left with exactly the registers it had, a system call it
    // was interrupted in set to restart.
    let mut restarts = 0;
    for tid in s.threads() {
        let before = s.regs(tid).unwrap();
        assert_eq!(s.syscall(tid, g, libc::SYS_getpid, [0; 6]).unwrap(), t.pid as i64);
        assert_eq!(s.syscall(tid, g, libc::SYS_gettid, [0; 6]).unwrap(), tid as i64);
        let want = pad::resume_regs(&before);
        restarts += usize::from(want.rip != before.rip);
        assert_eq!(regs_words(&s.regs(tid).unwrap()), regs_words(&want), "registers of {tid} not restored");
    }
    assert!(restarts > 0, "no thread was stopped inside an interruptible system call");

    let tid = t.pid;
    let len = 8192u64;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let map = s.syscall(tid, g, libc::SYS_mmap, [0, len, prot, flags, u64::MAX, 0]).unwrap() as u64;
    assert!(map > 0 && map.is_multiple_of(4096), "mmap returned {map:#x}");
    let maps = fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    let mapped = maps.lines().any(|l| {
        let (range, perms) = l.split_once(' ').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (u64::from_str_radix(a, 16).unwrap(), u64::from_str_radix(b, 16).unwrap());
        a <= map && map + len <= b && perms.starts_with("rw-p")
    });
    assert!(mapped, "{map:#x} not mapped read-write in\n{maps}");
    let pattern: Vec<u8> = (0..len as usize).map(|i| (i * 7) as u8).collect();
    s.write(map, &pattern).unwrap();
    let mut back = vec![0u8; len as usize];
    s.read(map, &mut back).unwrap();
    assert_eq!(back, pattern);

    // Errors name the syscall.
    let e = s.syscall(tid, g, libc::SYS_munmap, [map + 1, 16, 0, 0, 0, 0]).unwrap_err();
    assert!(
        matches!(e, SessionError::SyscallFailed { name: "munmap", errno: Errno::EINVAL, .. }),
        "unexpected error {e}"
    );
    assert!(e.to_string().contains("munmap"), "{e}");
    let noreplace = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let e = s.syscall(tid, g, libc::SYS_mmap, [map, 4096, prot, noreplace, u64::MAX, 0]).unwrap_err();
    assert!(matches!(e, SessionError::SyscallFailed { errno: Errno::EEXIST, .. }), "unexpected error {e}");
    let e = s.syscall(tid, map, libc::SYS_getpid, [0; 6]).unwrap_err();
    assert!(matches!(e, SessionError::NotExecutable { .. }), "unexpected error {e}");

    assert_eq!(s.syscall(tid, g, libc::SYS_munmap, [map, len, 0, 0, 0, 0]).unwrap(), 0);
    assert!(s.read(map, &mut back[..8]).is_err(), "unmapped memory still readable");
    let mut pad_now = vec![0u8; pad::PAD_LEN];
    s.read(g, &mut pad_now).unwrap();
    assert!(pad::is_landing_pad(&pad_now), "no landing pad at {g:#x}");
    s.detach().unwrap();
    // The code under the pad is back.
    let mem = fs::File::open(format!("/proc/{}/mem", t.pid)).unwrap();
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut pad_now, g).unwrap();
    assert_eq!(pad_now, code_before, "the code under the landing pad was not put back");

    // The server still serves: every interrupted syscall (epoll_wait, futex, accept) resumed.
    for _ in 0..3 {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET /hello HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.0 200") && resp.ends_with("\r\n\r\nhello\n"), "response {resp:?}");
    }
}

#[test]
fn write_text_and_restore() {
    let bin = fixture("funcs");
    let args = ["-loop", "-n", "1500", "-sleep", "1ms"];
    let reference = run_to_end(Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args);
        c
    }));
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(args);
        c
    });
    t.ready();
    let mut s = attach_or_return!(t.pid);
    let (lo, hi) = exe_text(t.pid);
    let int3s = [0xccu8; 13];
    // /proc/PID/mem, and the PTRACE_POKEDATA fallback at unaligned addresses, including the
    // last bytes of the mapping (the word must not reach into the next page).
    for (addr, poke) in [(lo + 0x1003, false), (lo + 0x2005, true), (hi - 13, true), (hi - 13, false)] {
        let mut orig = [0u8; 13];
        s.read(addr, &mut orig).unwrap();
        if poke {
            s.write_poke(addr, &int3s).unwrap();
            s.verify(addr, &int3s).unwrap();
        } else {
            s.write(addr, &int3s).unwrap();
        }
        let mut back = [0u8; 13];
        s.read(addr, &mut back).unwrap();
        assert_eq!(back, int3s);
        s.write(addr, &orig).unwrap();
        let mut restored = [0u8; 13];
        s.read(addr, &mut restored).unwrap();
        assert_eq!(restored, orig);
    }
    s.detach().unwrap();
    let lines = run_to_end(t);
    assert_eq!(checksum(&lines), checksum(&reference));
}

#[test]
fn second_attach_reports_already_traced() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "busy", "-workers", "2"]);
        c
    });
    t.ready();
    let thread = *sys::list_tasks(t.pid).unwrap().last().unwrap();
    assert!(matches!(Session::attach(thread), Err(AttachError::NotAProcess { tgid, .. }) if tgid == t.pid));
    let s = attach_or_return!(t.pid);
    let me = std::process::id() as i32;
    match Session::attach(t.pid) {
        Err(AttachError::AlreadyTraced { pid, tracer }) => {
            assert_eq!((pid, tracer), (t.pid, me));
        }
        other => panic!("second attach: {other:?}"),
    }
    // From another thread of ours too (the kernel would refuse the seize anyway).
    let pid = t.pid;
    let e = std::thread::spawn(move || Session::attach(pid).map(|_| ()).unwrap_err()).join().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("already traced by pid {me}")) && msg.contains("a second inject or a debugger"),
        "{msg}"
    );
    s.detach().unwrap();
    Session::attach(t.pid).unwrap().detach().unwrap();
}

#[test]
fn attach_to_exiting_and_exited_processes() {
    // A pid that does not exist, and a zombie.
    let mut z = Command::new("true").spawn().unwrap();
    let zpid = z.id() as i32;
    while process_state(zpid) != Some('Z') {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(matches!(Session::attach(zpid), Err(AttachError::Exited { pid }) if pid == zpid));
    z.wait().unwrap();
    assert!(matches!(Session::attach(zpid), Err(AttachError::NoSuchProcess { .. })));

    // Processes killed at random moments around and during the attach.
    let bin = ptracetest(&oldest());
    let (mut ok, mut exited) = (0, 0);
    // At least 30 rounds; more (up to 300) until one kill lands inside an attach, which
    // depends on how fast this machine attaches.
    for i in 0..300u64 {
        if i >= 30 && exited > 0 {
            break;
        }
        let mut t = Target::spawn({
            let mut c = Command::new(&bin);
            c.args(["-mode", "busy", "-workers", "8"]);
            c
        });
        t.ready();
        let pid = t.pid;
        let delay = Duration::from_micros(i * 37 % 600);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let t0 = Instant::now();
        match Session::attach(pid) {
            Ok(s) => {
                ok += 1;
                let _ = s.detach();
            }
            Err(AttachError::Exited { .. }) => exited += 1,
            Err(e @ AttachError::PermissionDenied { .. }) if !xtask::in_ci() => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            Err(e) => panic!("attach to a dying process: {e}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "attach+detach took {:?}", t0.elapsed());
        killer.join().unwrap();
        // Its parent (we) can still reap it: the session never stole the exit status.
        let status = t.child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    }
    println!("MEASURE dying targets: {ok} attaches completed, {exited} saw the process exit");
    assert!(exited > 0, "no attach saw the process exit");
}

#[test]
fn exit_while_stopped_is_clean() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "busy", "-workers", "4"]);
        c
    });
    t.ready();
    let mut s = attach_or_return!(t.pid);
    let tid = *s.threads().last().unwrap();
    t.signal(libc::SIGKILL);
    let t0 = Instant::now();
    // Operations fail cleanly once the kernel has torn the threads down.
    let mut failed = false;
    while t0.elapsed() < Duration::from_secs(5) {
        match s.regs(tid) {
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(SessionError::Exited { .. } | SessionError::NoSuchThread { .. }) => {
                failed = true;
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(failed, "registers still readable after SIGKILL");
    let e = s.detach().unwrap_err();
    assert!(matches!(e, SessionError::Exited { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let status = t.child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
}

#[test]
fn drop_detaches() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "busy", "-workers", "2", "-tick", "5ms"]);
        c
    });
    t.ready();
    {
        let s = attach_or_return!(t.pid);
        assert_all_stopped(&s);
        assert_ne!(tracer(t.pid), 0);
    }
    assert_eq!(tracer(t.pid), 0);
    for tid in sys::list_tasks(t.pid).unwrap() {
        assert_ne!(thread_state(t.pid, tid), Some('t'));
    }
    let n = t.drain().len();
    t.wait_line("TICK after drop", |l| l.starts_with("TICK"));
    assert!(t.seen.len() > n);
}

#[test]
fn resume_briefly_lets_threads_run() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "busy", "-workers", "2", "-tick", "5ms"]);
        c
    });
    t.ready();
    let mut s = attach_or_return!(t.pid);
    t.drain();
    let ticks_before = t.seen.iter().filter(|l| l.starts_with("TICK")).count();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(t.drain().iter().filter(|l| l.starts_with("TICK")).count(), ticks_before, "ticked while stopped");
    // The program ticks every 5 ms of its own time: it only gets that time in resume_briefly.
    let mut runs = 0;
    while t.drain().iter().filter(|l| l.starts_with("TICK")).count() == ticks_before {
        runs += 1;
        assert!(runs <= 200, "no TICK during 200 x 20 ms of resume_briefly");
        s.resume_briefly(Duration::from_millis(20)).unwrap();
        assert_all_stopped(&s);
    }
    s.detach().unwrap();
}

/// Go's signal.Notify path: SIGUSR1 sent while the threads are stopped arrives exactly once,
/// whether it stays pending in the kernel, is taken by a thread during an injected syscall
/// (held and handed back) or arrives while the threads run briefly.
#[test]
fn go_signals_sent_while_stopped_arrive_once() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "signals", "-workers", "3"]);
        c
    });
    t.ready();
    let rounds = 12;
    let mut held_seen = 0;
    for round in 1..=rounds {
        let mut s = attach_or_return!(t.pid);
        t.signal(libc::SIGUSR1);
        match round % 3 {
            0 => {}
            1 => {
                let g = pad_at(&s);
                for tid in s.threads() {
                    s.syscall(tid, g, libc::SYS_getpid, [0; 6]).unwrap();
                }
                if s.threads().iter().any(|&tid| s.held_signals(tid).contains(&libc::SIGUSR1)) {
                    held_seen += 1;
                }
            }
            _ => s.resume_briefly(Duration::from_millis(5)).unwrap(),
        }
        s.detach().unwrap();
        t.wait_line("USR1", |l| l == format!("USR1 {round}"));
    }
    // A fence: SIGUSR2 is sent after the last USR1 was seen; any duplicate USR1 would have
    // been delivered at detach, before it.
    t.signal(libc::SIGUSR2);
    t.wait_line("USR2", |l| l == "USR2 1");
    let usr1: Vec<&String> = t.seen.iter().filter(|l| l.starts_with("USR1")).collect();
    assert_eq!(usr1.len(), rounds, "{usr1:?}");
    assert!(held_seen > 0, "no round exercised a held signal");
}

/// Exact accounting with a C program: signal counts, order of queued values and the siginfo
/// each handler sees, across the three ways a signal can cross a session.
#[test]
fn c_signals_exact_count_and_siginfo() {
    let mut t = Target::spawn(Command::new(sigcount()));
    t.ready();
    let me = std::process::id() as i32;
    let rtmin = libc::SIGRTMIN();
    let queue = |pid: i32, v: usize| {
        // SAFETY: sigqueue(3) on our own child with an integer payload.
        let r = unsafe { libc::sigqueue(pid, rtmin, libc::sigval { sival_ptr: v as *mut libc::c_void }) };
        assert_eq!(r, 0);
    };
    // A process-directed signal may run its handler on a sleeper thread while the main thread
    // already answers the report: ask until the counts match (they only grow, so a count
    // past the expected one still fails).
    let report_is = |t: &mut Target, want: String| {
        let mut last = String::new();
        for _ in 0..200 {
            t.send_line("report");
            last = t.wait_line("REPORT", |l| l.starts_with("REPORT "));
            if last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(last, want);
    };

    // 1: taken while an injected syscall runs in the main thread (which sits in read(2) on
    // stdin), held, handed back once: the queued ones with their siginfo, SIGUSR1 (whose
    // SI_USER siginfo only its sender may queue) by tgkill, as SI_TKILL.
    let mut s = attach_or_return!(t.pid);
    t.signal(libc::SIGUSR1);
    for v in [11, 22, 33] {
        queue(t.pid, v);
    }
    let g = pad_at(&s);
    assert_eq!(s.syscall(t.pid, g, libc::SYS_getpid, [0; 6]).unwrap(), t.pid as i64);
    assert_eq!(s.held_signals(t.pid), vec![libc::SIGUSR1, rtmin, rtmin, rtmin]);
    s.detach().unwrap();
    // The read(2) that was interrupted restarts: the report command is read.
    report_is(&mut t, format!("REPORT usr1=1 code={} pid={me} rt=3 values=11,22,33", libc::SI_TKILL));

    // 2: pending while stopped, delivered while resumed briefly.
    let mut s = attach_or_return!(t.pid);
    t.signal(libc::SIGUSR1);
    queue(t.pid, 44);
    s.resume_briefly(Duration::from_millis(5)).unwrap();
    s.detach().unwrap();
    report_is(&mut t, format!("REPORT usr1=2 code=0 pid={me} rt=4 values=11,22,33,44"));

    // 3: pending while stopped, delivered by the kernel after detach.
    let s = attach_or_return!(t.pid);
    t.signal(libc::SIGUSR1);
    queue(t.pid, 55);
    s.detach().unwrap();
    report_is(&mut t, format!("REPORT usr1=3 code=0 pid={me} rt=5 values=11,22,33,44,55"));

    // 4: an attach with nothing pending changes nothing.
    attach_or_return!(t.pid).detach().unwrap();
    report_is(&mut t, format!("REPORT usr1=3 code=0 pid={me} rt=5 values=11,22,33,44,55"));
}

#[test]
fn group_stop_is_kept() {
    let bin = ptracetest(&oldest());
    let mut t = Target::spawn({
        let mut c = Command::new(&bin);
        c.args(["-mode", "busy", "-workers", "2", "-tick", "5ms"]);
        c
    });
    t.ready();
    let wait_state = |pid: i32, want: char| {
        let t0 = Instant::now();
        while process_state(pid) != Some(want) {
            assert!(t0.elapsed() < Duration::from_secs(5), "state {:?}, want {want}", process_state(pid));
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    // SIGSTOP taken during an injected syscall is held and handed back: the process stops.
    let mut s = attach_or_return!(t.pid);
    t.signal(libc::SIGSTOP);
    let g = pad_at(&s);
    s.syscall(t.pid, g, libc::SYS_getpid, [0; 6]).unwrap();
    assert!(s.held_signals(t.pid).contains(&libc::SIGSTOP), "held {:?}", s.held_signals(t.pid));
    s.detach().unwrap();
    wait_state(t.pid, 'T');

    // Attaching to a stopped process works, resuming briefly does not resume it, and detach
    // leaves it stopped.
    let mut s = attach_or_return!(t.pid);
    assert!(s.group_stopped());
    t.drain();
    let ticks = t.seen.len();
    s.resume_briefly(Duration::from_millis(20)).unwrap();
    assert!(s.group_stopped());
    assert_eq!(s.syscall(t.pid, g, libc::SYS_getpid, [0; 6]).unwrap(), t.pid as i64);
    s.detach().unwrap();
    wait_state(t.pid, 'T');
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(t.drain().len(), ticks, "the stopped process ran");

    t.signal(libc::SIGCONT);
    t.wait_line("TICK after SIGCONT", |l| l.starts_with("TICK"));
    assert_ne!(process_state(t.pid), Some('T'));
}

/// A thread inside a Go signal handler blocks every signal (SigBlk), and is on its signal
/// stack. Checked against the kernel's own answer: `sigaltstack(NULL, &old)` injected into
/// the thread reports SS_ONSTACK when its stack pointer is on the alternate signal stack,
/// which is where Go runs every handler.
#[test]
fn go_signal_handlers_block_all_signals() {
    for tc in toolchains() {
        let bin = ptracetest(&tc);
        let mut t = Target::spawn({
            let mut c = Command::new(&bin);
            c.args(["-mode", "flood", "-workers", "3"]);
            c
        });
        t.ready();
        let (mut on_stack_blocked, mut on_stack_unblocked, mut off_stack_blocked, mut off_stack) = (0, 0, 0, 0);
        let mut after_resume_in_handler = 0;
        let mut after_resume_total = 0;
        let mut handler_ranges = 0;
        let caught_at_start = caught(t.pid);
        for _ in 0..150 {
            let mut s = attach_or_return!(t.pid);
            let g = pad_at(&s);
            let leader = t.pid;
            let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            let scratch = s.syscall(leader, g, libc::SYS_mmap, [0, 4096, prot, flags, u64::MAX, 0]).unwrap() as u64;
            let mut any_in_handler = false;
            for tid in s.threads() {
                let blocked = s.in_signal_handler(tid).unwrap();
                s.syscall(tid, g, libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0]).unwrap();
                let mut ss = [0u8; 24];
                s.read(scratch, &mut ss).unwrap();
                let on_stack = i32::from_le_bytes(ss[8..12].try_into().unwrap()) & libc::SS_ONSTACK != 0;
                match (on_stack, blocked) {
                    (true, true) => on_stack_blocked += 1,
                    (true, false) => on_stack_unblocked += 1,
                    (false, true) => off_stack_blocked += 1,
                    (false, false) => off_stack += 1,
                }
                any_in_handler |= blocked;
            }
            s.syscall(leader, g, libc::SYS_munmap, [scratch, 4096, 0, 0, 0, 0]).unwrap();
            if any_in_handler {
                handler_ranges += 1;
                s.resume_briefly(Duration::from_millis(1)).unwrap();
                for tid in s.threads() {
                    after_resume_total += 1;
                    after_resume_in_handler += s.in_signal_handler(tid).unwrap() as usize;
                }
            }
            s.detach().unwrap();
            // Injected syscalls never changed a signal disposition.
            assert_eq!(caught(t.pid), caught_at_start, "the process's caught signals changed");
        }
        println!(
            "MEASURE Go {} SIGURG+SIGPROF flood, 150 attaches: on signal stack & all blocked {on_stack_blocked}, \
             on signal stack & not all blocked {on_stack_unblocked}, off stack & all blocked {off_stack_blocked}, \
             off stack & not all blocked {off_stack}; {handler_ranges} attaches had a thread in a handler, after \
             resume_briefly(1ms) {after_resume_in_handler} of {after_resume_total} threads were (again) in one",
            tc.version
        );
        assert_eq!(on_stack_unblocked, 0, "a thread on its signal stack did not block all signals");
        assert!(on_stack_blocked > 0, "never caught a thread inside a signal handler");
    }
}
