//! A network namespace to serve, opened once: the fd keeps it alive and
//! identifies it to the kernel, the cookie identifies it to the programs.

use std::{
    fmt,
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::sys;

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
        let cookie = sys::in_netns(file.as_fd(), sys::current_netns_cookie).map_err(|e| {
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
    let procs = sys::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
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
