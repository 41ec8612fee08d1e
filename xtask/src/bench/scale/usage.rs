//! What the agent holds, read from /proc: its resident memory, and the
//! kernel memory of the BPF objects it has fds for (`memlock:` in
//! /proc/PID/fdinfo, which the kernel reports for maps and programs). The
//! agent closes a program's fd once a link holds it (one sk_lookup instance
//! per namespace), so programs are counted by id, held or linked, and their
//! memlock read from the kernel's program list; links report none.

use std::{collections::HashSet, path::Path};

use serde::Serialize;

/// The agent's memory at one moment.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Memory {
    pub rss_kib: u64,
    pub maps: u64,
    pub map_memlock_bytes: u64,
    /// Distinct programs, held by an fd or by a link the agent holds.
    pub progs: u64,
    pub prog_memlock_bytes: u64,
    pub links: u64,
}

impl Memory {
    pub fn bpf_memlock_bytes(&self) -> u64 {
        self.map_memlock_bytes + self.prog_memlock_bytes
    }
}

/// `pid`'s VmRSS and the BPF objects behind its fds (0s for what cannot be
/// read: the process may be gone).
pub fn memory(pid: u32) -> Memory {
    let proc = Path::new("/proc").join(pid.to_string());
    let mut m = Memory {
        rss_kib: std::fs::read_to_string(proc.join("status"))
            .ok()
            .and_then(|s| status_kib(&s, "VmRSS:"))
            .unwrap_or(0),
        ..Memory::default()
    };
    let Ok(fds) = std::fs::read_dir(proc.join("fd")) else {
        return m;
    };
    let mut prog_ids = HashSet::new();
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let kind = target.to_string_lossy().into_owned();
        let info = || std::fs::read_to_string(proc.join("fdinfo").join(fd.file_name()));
        match kind.as_str() {
            "anon_inode:bpf-map" => {
                m.maps += 1;
                m.map_memlock_bytes += info().ok().and_then(|i| memlock(&i)).unwrap_or(0);
            }
            "anon_inode:bpf-prog" | "anon_inode:bpf_link" => {
                if kind.ends_with("link") {
                    m.links += 1;
                }
                if let Some(id) = info().ok().and_then(|i| field(&i, "prog_id:")) {
                    prog_ids.insert(id as u32);
                }
            }
            _ => {}
        }
    }
    for p in aya::programs::loaded_programs().filter_map(|p| p.ok()) {
        if prog_ids.contains(&p.id()) {
            m.progs += 1;
            m.prog_memlock_bytes += p.memory_locked().map_or(0, u64::from);
        }
    }
    m
}

/// `Key:   123 kB` from /proc/PID/status.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `memlock:\t4096` from a BPF fd's fdinfo.
fn memlock(fdinfo: &str) -> Option<u64> {
    field(fdinfo, "memlock:")
}

/// A numeric `key:\tvalue` line of an fdinfo.
fn field(fdinfo: &str, key: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t   5120 kB\n", "VmRSS:"),
            Some(5120)
        );
        assert_eq!(
            memlock("pos:\t0\nflags:\t02000002\nmap_type:\t1\nmemlock:\t8192\n"),
            Some(8192)
        );
        assert_eq!(memlock("link_type:\tnetns\n"), None);
        assert_eq!(
            field("link_type:\tnetns\nprog_id:\t42\n", "prog_id:"),
            Some(42)
        );
    }
}
