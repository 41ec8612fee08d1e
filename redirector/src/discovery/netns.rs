//! A network namespace to serve, opened once: the fd keeps it alive and
//! identifies it to the kernel, the cookie identifies it to the programs.

use std::{
    fmt,
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{error::Fatal, sys};

/// The agent's own network namespace, the default target.
pub const SELF_NETNS: &str = "/proc/self/ns/net";

pub struct Netns {
    pub path: PathBuf,
    pub file: File,
    pub cookie: u64,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Fatal::Usage(format!(
                "network namespace {} does not exist",
                path.display()
            ))
            .into(),
            _ => anyhow::Error::new(e)
                .context(format!("opening network namespace {}", path.display())),
        })?;
        // Anything but a netns file is rejected by setns(CLONE_NEWNET) with EINVAL below.
        let meta = file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?;
        if meta.is_dir() {
            return Err(Fatal::Usage(format!(
                "{} is a directory, not a network namespace",
                path.display()
            ))
            .into());
        }
        let cookie = sys::in_netns(file.as_fd(), sys::current_netns_cookie).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Fatal::Usage(format!("{} is not a network namespace", path.display())).into()
            } else {
                anyhow::Error::new(e)
                    .context(format!("entering network namespace {}", path.display()))
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
