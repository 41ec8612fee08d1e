//! Sysctls of a network namespace: `/proc/sys/net/...` shows the namespace
//! of the thread that opens it, so they are read and written from inside.

use std::{fs, io, os::fd::BorrowedFd};

use super::netns::in_netns;

/// Reads a sysctl of the network namespace `netns`. `None` if the kernel has
/// no such sysctl.
pub fn netns_sysctl(netns: BorrowedFd<'_>, path: &'static str) -> io::Result<Option<String>> {
    in_netns(netns, || match fs::read_to_string(path) {
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
}

pub fn set_netns_sysctl(netns: BorrowedFd<'_>, path: &'static str, value: &str) -> io::Result<()> {
    in_netns(netns, || fs::write(path, value))
}
