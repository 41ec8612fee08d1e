//! `--discover`: which network namespaces on the node have a live-store.
//! New ones are reported by the bind hooks the moment they bind; the /proc
//! scan is the resync's safety net (with hostPID, every pod's processes are
//! there). A process qualifies by its cgroup and Tempo target, which the
//! `inspector` reads off the agent's loop (`podfs`: inside the pod's root).

pub mod inspector;
pub mod kube;
mod pattern;
pub mod podfs;
pub mod role;

pub use pattern::cgroup_pattern_matches;

use std::{
    fs,
    os::{fd::AsFd, unix::fs::MetadataExt},
};

use crate::sys;

/// The namespace inode of process `pid`.
pub fn netns_inode(pid: i32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .ok()
}

/// Every process on the node with its network namespace's inode, from /proc
/// (only the kernel's files: nothing a pod controls is read here).
pub fn processes() -> Vec<(i32, u64)> {
    // Processes exit while we look: anything unreadable is skipped.
    sys::pids()
        .filter_map(|pid| Some((pid, netns_inode(pid)?)))
        .collect()
}

/// Whether a socket listens on one of `ports` in the namespace of `pid`.
pub fn listens(pid: i32, ports: &[u16]) -> bool {
    fs::File::open(format!("/proc/{pid}/ns/net")).is_ok_and(|file| {
        sys::in_netns(file.as_fd(), || sys::sockdiag::listening(ports)).is_ok_and(|l| !l.is_empty())
    })
}

/// The processes in network namespace `ino`, lowest pid first (a pod's
/// sandbox process, which holds the namespace, usually comes first).
pub fn pids_in(ino: u64) -> Vec<i32> {
    let mut pids: Vec<i32> = sys::pids()
        .filter(|p| netns_inode(*p) == Some(ino))
        .collect();
    pids.sort_unstable();
    pids
}
