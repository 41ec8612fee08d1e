//! The few system calls std does not wrap: entering a network namespace,
//! reading a namespace's cookie, copying a socket out of another process, and
//! reading our capabilities. Each `unsafe` block is a plain syscall.

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// bpffs' `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Runs `f` on a thread that has entered the network namespace `netns`. Sockets
/// created there belong to that namespace for their whole life, whichever thread
/// uses them later; the calling thread's namespace never changes.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only; the fd is a valid borrowed netns fd.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace worker thread panicked")))
    })
}

/// The cookie of the network namespace the calling thread is in: the identity
/// the kernel programs key everything by (`bpf_get_netns_cookie`).
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointers point to a u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A duplicate of file descriptor `fd` of process `pid` (`pidfd_getfd`, Linux 5.6;
/// needs ptrace access to the process, i.e. CAP_SYS_PTRACE for other users).
pub fn copy_fd_from(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags; the result is checked and owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd was just returned by pidfd_open(2) and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd(2) with no flags; the result is checked and owned at once.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_fd().as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: copy was just returned by pidfd_getfd(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: zeroed statfs is a valid out-buffer for statfs(2).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated, st is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Linux capabilities the agent needs, with the reason an operator reads.
pub const REQUIRED_CAPABILITIES: [(u32, &str, &str); 4] = [
    (39, "CAP_BPF", "load eBPF programs and maps"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach sk_lookup to network namespaces and sock_ops to the cgroup",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "enter other network namespaces (setns) and pin to bpffs",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "copy a live-store's existing listening socket (pidfd_getfd)",
    ),
];

/// The required capabilities missing from this process's effective set.
pub fn missing_capabilities() -> io::Result<Vec<(&'static str, &'static str)>> {
    let status = fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))?;
    Ok(REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, _, _)| eff & (1u64 << bit) == 0)
        .map(|&(_, name, why)| (name, why))
        .collect())
}
