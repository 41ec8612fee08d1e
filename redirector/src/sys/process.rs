//! Other processes: pidfds, copies of their descriptors, and the pids there
//! are.

use std::{fs, io, os::fd::OwnedFd};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

/// A pidfd for process `pid` (Linux 5.3): readable once the process exits.
/// A pid of 0 or below is EINVAL, as the kernel says.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = (pid > 0)
        .then(|| Pid::from_raw(pid))
        .flatten()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// A duplicate of file descriptor `fd` of process `pid` (`pidfd_getfd`, Linux 5.6;
/// needs ptrace access to the process, i.e. CAP_SYS_PTRACE for other users).
/// A negative `fd` is EBADF, as the kernel says.
pub fn copy_fd_from(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let pidfd = pidfd_open(pid)?;
    Ok(rustix::process::pidfd_getfd(
        &pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// The pids in /proc right now (processes come and go while callers look).
/// One readdir of /proc: procfs's `all_processes` would also open a
/// /proc/PID descriptor for every process of the node, which no caller needs.
pub fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn pidfd_open_takes_live_positive_pids() {
        let me = std::process::id() as i32;
        let pidfd = pidfd_open(me).expect("pidfd");
        let link = fs::read_link(format!("/proc/self/fd/{}", pidfd.as_raw_fd())).expect("link");
        assert_eq!(link.to_str(), Some("anon_inode:[pidfd]"));
        for bad in [0, -1, i32::MIN] {
            let e = pidfd_open(bad).expect_err("not a pid");
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}");
        }
        // pid_max is at most 2^22: this one does not exist.
        let e = pidfd_open(i32::MAX).expect_err("no such process");
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn pids_lists_live_processes_only() {
        let pids: Vec<i32> = pids().collect();
        assert!(pids.contains(&(std::process::id() as i32)));
        assert!(
            pids.iter().all(|p| *p > 0),
            "self, thread-self are not pids"
        );
    }
}
