//! Which process holds a listening socket: for flow records, and for the
//! registry, which copies listeners it must register out of their owner.

use std::{collections::HashMap, fs};

use crate::sys;

/// The process that owns a listening socket: for flow records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: i32,
    pub comm: String,
}

/// The process holding the first of `inodes`, if it can be found (`hint`:
/// processes to look at first, see [`socket_owners`]).
pub fn owner(inodes: &[u64], hint: &[i32]) -> Option<Owner> {
    let owners = socket_owners(inodes.to_vec(), hint);
    let (pid, _) = inodes.iter().find_map(|i| owners.get(i))?;
    let comm = super::podfs::comm(*pid)?;
    Some(Owner { pid: *pid, comm })
}

/// For each wanted socket inode, one (pid, fd) that holds it. Socket inodes are
/// unique machine-wide, so every process is searched, whatever its namespace;
/// the processes in `hint` (the one that called listen(), those known in the
/// namespace) first, so on a node of a thousand pods the walk usually ends
/// after a few.
pub fn socket_owners(mut wanted: Vec<u64>, hint: &[i32]) -> HashMap<u64, (i32, i32)> {
    let mut owners = HashMap::new();
    let me = std::process::id() as i32;
    for pid in hint.iter().copied().chain(sys::pids()) {
        if pid == me {
            continue;
        }
        // Processes come and go while we walk: unreadable ones are skipped.
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            let Ok(target) = fs::read_link(fd_entry.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(pos) = wanted.iter().position(|w| *w == inode) {
                if let Some(fd) = fd_entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                {
                    owners.insert(inode, (pid, fd));
                    wanted.swap_remove(pos);
                }
            }
        }
        if wanted.is_empty() {
            break;
        }
    }
    owners
}
