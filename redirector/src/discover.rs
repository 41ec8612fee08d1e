//! `--discover`: which network namespaces on the node have a live-store, found
//! from /proc (with hostPID, every pod's processes are there).

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::PathBuf};

use crate::{config::cgroup_pattern_matches, listeners::listening_inodes};

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
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes exit while we look: anything unreadable is skipped.
        let Ok(ino) = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()) else {
            continue;
        };
        if found.get(&ino).is_some_and(|c| c.has_listener) {
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
                .any(|path| cgroup_pattern_matches(pattern, path))
            {
                continue;
            }
        }
        // /proc/PID/net shows the tables of that process's namespace.
        let has_listener = ["tcp", "tcp6"].iter().any(|t| {
            fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .map(|table| {
                    ports
                        .iter()
                        .any(|p| !listening_inodes(&table, *p).is_empty())
                })
                .unwrap_or(false)
        });
        found.insert(
            ino,
            Candidate {
                path: PathBuf::from(format!("/proc/{pid}/ns/net")),
                has_listener,
            },
        );
    }
    found
}
