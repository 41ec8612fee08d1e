//! `--discover`: which network namespaces on the node have a live-store, found
//! from /proc (with hostPID, every pod's processes are there).

pub mod listeners;
pub mod netns;
pub mod sockdiag;

use std::{
    collections::HashMap,
    fs,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use crate::{config::cgroup_pattern_matches, sys};

/// A network namespace seen in /proc.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `/proc/PID/ns/net` of one process inside it.
    pub path: PathBuf,
    /// A socket listens on one of the listen ports.
    pub has_listener: bool,
}

/// Every network namespace that has a process (matching `cgroup_pattern`, if
/// given), by namespace inode, and whether it has a listener on `ports`.
pub fn scan(ports: &[u16], cgroup_pattern: Option<&str>) -> HashMap<u64, Candidate> {
    let mut found: HashMap<u64, Candidate> = HashMap::new();
    for pid in sys::pids() {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // Processes exit while we look: anything unreadable is skipped.
        let Ok(ino) = fs::metadata(&path).map(|m| m.ino()) else {
            continue;
        };
        if found.contains_key(&ino) {
            continue;
        }
        if let Some(pattern) = cgroup_pattern {
            let Ok(cgroups) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                continue;
            };
            // Lines are `id:controllers:path`; the v2 line is `0::path`.
            if !cgroups
                .lines()
                .filter_map(|l| l.splitn(3, ':').nth(2))
                .any(|p| cgroup_pattern_matches(pattern, p))
            {
                continue;
            }
        }
        found.insert(
            ino,
            Candidate {
                path,
                has_listener: false,
            },
        );
    }
    // One sock_diag query per namespace, not per process.
    for candidate in found.values_mut() {
        let Ok(file) = fs::File::open(&candidate.path) else {
            continue;
        };
        candidate.has_listener = sys::in_netns(file.as_fd(), || sockdiag::listening(ports))
            .map(|l| !l.is_empty())
            .unwrap_or(false);
    }
    found
}
