//! `--discover`: which network namespaces on the node have a live-store.
//! New ones are reported by `redir_listen` the moment they listen; the /proc
//! scan here is the resync's safety net (with hostPID, every pod's processes
//! are there). A process qualifies by its Tempo target (`role`) and cgroup.

pub mod cgroups;
pub mod listeners;
pub mod netns;
pub mod role;
pub mod sockdiag;

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use crate::{config::cgroup_pattern_matches, sys};

/// A network namespace not served yet where a process qualifies.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `/proc/PID/ns/net` of the qualifying process.
    pub path: PathBuf,
    pub pid: i32,
    /// Why it qualifies, for the log and `status`.
    pub why: String,
}

/// What qualifies a process: its cgroup (`--cgroup-pattern`) and its Tempo
/// target (`--serve-target`). Roles are cached by (pid, namespace), so a
/// resync reads each process's command line once.
pub struct Filter {
    pub cgroup_pattern: Option<String>,
    pub targets: Vec<String>,
    roles: HashMap<(i32, u64), Option<role::Role>>,
}

impl Filter {
    pub fn new(cgroup_pattern: Option<String>, targets: Vec<String>) -> Self {
        Self {
            cgroup_pattern,
            targets,
            roles: HashMap::new(),
        }
    }

    /// Why process `pid` (in namespace `ino`) is a process to serve, or
    /// `None`.
    pub fn qualifies(&mut self, pid: i32, ino: u64) -> Option<String> {
        if let Some(pattern) = &self.cgroup_pattern {
            let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            // Lines are `id:controllers:path`; the v2 line is `0::path`.
            if !cgroups
                .lines()
                .filter_map(|l| l.splitn(3, ':').nth(2))
                .any(|p| cgroup_pattern_matches(pattern, p))
            {
                return None;
            }
        }
        if self.targets.iter().any(|t| t == role::ANY) {
            return Some(format!("pid {pid} listens (--serve-target any)"));
        }
        let role = self
            .roles
            .entry((pid, ino))
            .or_insert_with(|| role::of_pid(pid))
            .clone();
        role::matches(&self.targets, role.as_ref()).then(|| {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!(
                "pid {pid} ({}) is a Tempo {}: {}",
                comm.trim(),
                role.as_ref().map_or("", |r| r.target.as_str()),
                role.as_ref().map(|r| r.to_string()).unwrap_or_default()
            )
        })
    }

    /// Drops cached roles of processes that are gone.
    fn retain(&mut self, alive: &HashSet<(i32, u64)>) {
        self.roles.retain(|k, _| alive.contains(k));
    }
}

/// The namespace inode of process `pid`.
pub fn netns_inode(pid: i32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .ok()
}

/// Every namespace not in `skip` where a process qualifies and a socket
/// listens on one of `ports`, by namespace inode. Costs a /proc walk and one
/// sock_diag query per candidate namespace (served ones are skipped): the
/// resync's safety net, not the way new live-stores are found.
pub fn scan(ports: &[u16], filter: &mut Filter, skip: &HashSet<u64>) -> HashMap<u64, Candidate> {
    let mut found: HashMap<u64, Candidate> = HashMap::new();
    let mut alive = HashSet::new();
    for pid in sys::pids() {
        // Processes exit while we look: anything unreadable is skipped.
        let Some(ino) = netns_inode(pid) else {
            continue;
        };
        alive.insert((pid, ino));
        if skip.contains(&ino) || found.contains_key(&ino) {
            continue;
        }
        if let Some(why) = filter.qualifies(pid, ino) {
            found.insert(
                ino,
                Candidate {
                    path: PathBuf::from(format!("/proc/{pid}/ns/net")),
                    pid,
                    why,
                },
            );
        }
    }
    filter.retain(&alive);
    found.retain(|_, c| {
        fs::File::open(&c.path).is_ok_and(|file| {
            sys::in_netns(file.as_fd(), || sockdiag::listening(ports)).is_ok_and(|l| !l.is_empty())
        })
    });
    found
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
