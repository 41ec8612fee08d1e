//! Which process holds a listening socket: for flow records, and for the
//! registry, which copies listeners it must register out of their owner.

use std::{collections::HashMap, fs, path::Path};

use procfs_core::process::FDTarget;

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
    let comm = super::proc::comm(*pid)?;
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
            let Some(inode) = socket_inode(&target) else {
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

/// The socket inode a /proc/PID/fd link names (`socket:[INODE]`), parsed by
/// procfs. The walk itself stays here: one readlink per descriptor, where
/// procfs's own iterator opens and stats each one as well, on every process
/// of the node.
fn socket_inode(link: &Path) -> Option<u64> {
    match link.to_str()?.parse::<FDTarget>() {
        Ok(FDTarget::Socket(inode)) => Some(inode),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpListener,
        os::{fd::AsRawFd, unix::fs::MetadataExt},
    };

    use super::*;

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode(Path::new("socket:[4242]")), Some(4242));
        for other in [
            "pipe:[4242]",
            "net:[4026531840]",
            "anon_inode:[eventpoll]",
            "/dev/null",
            "/tmp/socket:[1]",
            "socket:[]",
            "socket:[x]",
            "",
        ] {
            assert_eq!(socket_inode(Path::new(other)), None, "{other}");
        }
        // A socket of ours, as the kernel names it.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).expect("link");
        let ino = fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .expect("stat")
            .ino();
        assert_eq!(socket_inode(&link), Some(ino));
    }
}
