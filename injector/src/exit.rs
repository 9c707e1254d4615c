//! How a process ended, from its wait status or from /proc while it is a zombie.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;

/// The wait status of `pid` while it is a zombie (its parent has not collected it yet):
/// field 52 of /proc/PID/stat. None once it is gone.
pub fn zombie_status(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (the state).
    if fields.first() != Some(&"Z") {
        return None;
    }
    fields.get(52 - 3)?.parse().ok()
}

pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// How a wait status says a process ended.
pub fn describe_exit(status: Option<i32>) -> String {
    match status {
        None => "exited (status unknown)".into(),
        Some(st) if libc::WIFSIGNALED(st) => {
            let sig = libc::WTERMSIG(st);
            let name = Signal::try_from(sig).map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string());
            format!("killed by {name}{}", if libc::WCOREDUMP(st) { " (core dumped)" } else { "" })
        }
        Some(st) => format!("exited with status {}", libc::WEXITSTATUS(st)),
    }
}

/// Why a process that ended with `status` died, or None for a clean exit (or an unknown
/// one).
pub fn died(status: Option<i32>) -> Option<String> {
    let st = status?;
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        return None;
    }
    let hint = if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 2 {
        " (Go exits 2 on a fatal error, an unrecovered panic or a flag error: its stderr says which)"
    } else {
        ""
    };
    Some(format!("{}{hint}", describe_exit(status)))
}
