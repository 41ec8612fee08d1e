//! What the kernel holds for redirector: its loaded programs and their
//! run-time statistics, where they are attached, and its map entries.

use std::{
    collections::HashSet,
    os::fd::AsFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::Netns;

/// The kernel programs' names, for callers (the bench) that find them among
/// every program loaded on the machine.
pub use redirector_common::{PROG_SK_LOOKUP, PROG_SOCK_OPS};

/// Kernel run-time statistics for every BPF program, on while this lives
/// (BPF_ENABLE_STATS: an fd instead of the global sysctl, so they switch
/// themselves off even if the process dies).
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(Self { _fd: fd })
    }
}

/// One of redirector's loaded programs, with its run-time statistics (which
/// only grow while a [`RunStats`] is alive).
#[derive(Clone, Debug)]
pub struct ProgStats {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// Every loaded redirector program (any agent's: its name starts with
/// `PROG_PREFIX`), with its run-time statistics.
pub fn run_stats() -> Vec<ProgStats> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| {
            let name = p.name_as_str()?;
            name.starts_with(redirector_common::PROG_PREFIX)
                .then(|| ProgStats {
                    id: p.id(),
                    name: name.to_owned(),
                    run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                    run_count: p.run_count(),
                })
        })
        .collect()
}

/// How many times redirector's programs ran, and for how long (ns), in all.
pub fn redirector_program_runs() -> (u64, u64) {
    run_stats()
        .iter()
        .fold((0, 0), |(n, t), p| (n + p.run_count, t + p.run_time_ns))
}

/// Ids of the loaded BPF programs that belong to redirector (any agent's).
pub fn redirector_program_ids() -> HashSet<u32> {
    run_stats().into_iter().map(|p| p.id).collect()
}

/// Waits (up to 5 s: program fds are released asynchronously after a process
/// exits) until none of `ids` is loaded; returns those still loaded.
pub fn wait_unloaded(ids: &HashSet<u32>) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u32> = redirector_program_ids()
            .intersection(ids)
            .copied()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Ids of the sk_lookup programs attached to the namespace `ns`.
pub fn sk_lookup_programs(ns: &Netns) -> Vec<u32> {
    let file = std::fs::File::open(ns.path()).expect("open netns file");
    redirector::sys::prog_query(file.as_fd(), redirector::sys::BPF_SK_LOOKUP)
        .expect("BPF_PROG_QUERY")
}

/// Ids of the sock_ops programs attached to this process's cgroup (where the
/// agent attaches its own for the tests' in-process live-stores) and to the
/// cgroup v2 root (`--sock-ops-cgroup root`).
pub fn sock_ops_programs() -> Vec<u32> {
    let root = redirector::sys::cgroup::cgroup2_mount().expect("a cgroup2 mount");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| root.join(p.trim_start_matches('/')))
        .unwrap_or_else(|| root.clone());
    let mut ids = Vec::new();
    for dir in [&root, &own] {
        let fd = std::fs::File::open(dir).expect("open a cgroup");
        for id in redirector::sys::prog_query(fd.as_fd(), redirector::sys::BPF_CGROUP_SOCK_OPS)
            .expect("BPF_PROG_QUERY")
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Deletes every `LISTENERS` entry of the namespace with `netns_cookie`, in
/// every redirector agent's map, behind the agents' backs (what an operator's
/// `bpftool map delete` would do). Returns how many entries went.
pub fn delete_registrations(netns_cookie: u64) -> usize {
    use redirector::sys::{map_delete, map_keys};
    let mut deleted = 0;
    for info in aya::maps::loaded_maps().filter_map(|m| m.ok()) {
        if info.name_as_str() != Some(redirector_common::MAP_LISTENERS) {
            continue;
        }
        let Ok(map) = aya::maps::MapData::from_id(info.id()) else {
            continue;
        };
        let fd = map.fd().as_fd();
        let keys: Vec<redirector_common::ListenerKey> = map_keys(fd).unwrap_or_default();
        for key in keys.iter().filter(|k| k.netns_cookie == netns_cookie) {
            if map_delete(fd, key).is_ok() {
                deleted += 1;
            }
        }
    }
    deleted
}
