//! Network namespaces: a namespace to serve, opened once (the fd keeps it
//! alive and identifies it to the kernel, the cookie identifies it to the
//! programs), code run inside one, and the cookie that names one.

use std::{
    fmt,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::Result;
use rustix::{
    net::{AddressFamily, SocketFlags, SocketType},
    thread::LinkNameSpaceType,
};

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `SO_NETNS_COOKIE` of a socket: the namespace it lives in.
pub(super) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) with out-pointers to a live u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Why a network namespace cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path names nothing (a namespace that vanished, or a typo).
    #[error("network namespace {} does not exist", path.display())]
    Vanished { path: PathBuf },
    /// The path names something else.
    #[error("{} is {what}, not a network namespace", path.display())]
    NotANamespace { path: PathBuf, what: &'static str },
    /// Opening or entering it failed otherwise (permissions, resources).
    #[error("{doing} network namespace {}: {err}", path.display())]
    Io {
        path: PathBuf,
        doing: &'static str,
        err: io::Error,
    },
}

/// The agent's own network namespace, the default target.
pub const SELF_NETNS: &str = "/proc/self/ns/net";

pub struct Netns {
    pub path: PathBuf,
    pub file: File,
    pub cookie: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let io_err = |doing, err| Error::Io {
            path: path.to_owned(),
            doing,
            err,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::Vanished {
                path: path.to_owned(),
            },
            _ => io_err("opening", e),
        })?;
        // Anything but a netns file is rejected by setns(CLONE_NEWNET) with EINVAL below.
        let meta = file.metadata().map_err(|e| io_err("stat of", e))?;
        if meta.is_dir() {
            return Err(Error::NotANamespace {
                path: path.to_owned(),
                what: "a directory",
            });
        }
        let cookie = in_netns(file.as_fd(), current_netns_cookie).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Error::NotANamespace {
                    path: path.to_owned(),
                    what: "a file",
                }
            } else {
                io_err("entering", e)
            }
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            cookie,
        })
    }

    /// The namespace's inode number, as `ip netns identify` and /proc show it.
    pub fn inode(&self) -> u64 {
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }
}

/// A path that names the network namespace with inode `ino` right now: a
/// bind mount under /var/run/netns, or a process inside it.
pub fn find_by_inode(ino: u64) -> Option<PathBuf> {
    if ino == 0 {
        return None;
    }
    let named = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let procs = super::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
    named
        .chain(procs)
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino))
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (net:[{}], cookie {})",
            self.path.display(),
            self.inode(),
            self.cookie
        )
    }
}

/// Runs `f` on a thread that has entered the network namespace `netns`. Sockets
/// created there belong to that namespace for their whole life, whichever thread
/// uses them later; the calling thread's namespace never changes.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        // Builder, not `scope.spawn`: a node out of threads is an error for
        // this namespace, not a panic of the agent.
        std::thread::Builder::new()
            .spawn_scoped(scope, || {
                // setns(2) on this thread only; anything but a netns fd is EINVAL.
                let net = Some(LinkNameSpaceType::Network);
                rustix::thread::move_into_link_name_space(netns, net)?;
                f()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace worker thread panicked")))
    })
}

/// The cookie of the network namespace the calling thread is in: the identity
/// the kernel programs key everything by (`bpf_get_netns_cookie`).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    netns_cookie(sock.as_fd())
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// setns into our own namespace (as root) gives our own cookie; a file
    /// that is not a netns is EINVAL, which `Netns::open` reports as such.
    #[test]
    fn in_netns_enters_a_namespace_and_refuses_other_files() {
        let own = current_netns_cookie().expect("cookie");
        assert_ne!(own, 0);
        let ns = File::open("/proc/self/ns/net").expect("netns");
        match in_netns(ns.as_fd(), current_netns_cookie) {
            Ok(cookie) => assert_eq!(cookie, own),
            // Not root: setns needs CAP_SYS_ADMIN.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => panic!("setns: {e}"),
        }
        let uts = File::open("/proc/self/ns/uts").expect("uts");
        let e = in_netns(uts.as_fd(), current_netns_cookie).expect_err("not a netns");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let plain = File::open("/proc/self/status").expect("file");
        let e = in_netns(plain.as_fd(), current_netns_cookie).expect_err("not a netns");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // The closure's own error comes back as it is.
        let e = in_netns(ns.as_fd(), || -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        })
        .expect_err("closure error");
        assert!(matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)));
    }
}
