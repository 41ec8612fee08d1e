//! Listening sockets that existed before the agent started (a DaemonSet pod
//! restart while the live-store keeps running). New listeners are registered
//! by the `sock_ops` program; these are found in the namespace's TCP tables
//! and copied out of their owning process with `pidfd_getfd`.

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsFd, OwnedFd},
};

use redirector_common::{AF_INET, AF_INET6};

use crate::{netns::Netns, sys};

/// `st` value of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

pub struct Listener {
    pub family: u16,
    pub inode: u64,
    pub pid: i32,
    pub socket: OwnedFd,
}

/// Listening TCP sockets on `port` in `netns`, each with a copy of its fd.
/// Sockets whose owner cannot be found or copied are logged and skipped: the
/// next listen() on the port is caught by `sock_ops` anyway.
pub fn find_existing(netns: &Netns, port: u16) -> io::Result<Vec<Listener>> {
    // /proc/thread-self/net shows the tables of the reading thread's namespace,
    // which works for namespaces that no process lives in (bind mounts).
    let inodes = sys::in_netns(netns.file.as_fd(), || {
        let mut found = Vec::new();
        for (file, family) in [
            ("/proc/thread-self/net/tcp", AF_INET),
            ("/proc/thread-self/net/tcp6", AF_INET6),
        ] {
            match fs::read_to_string(file) {
                Ok(table) => found.extend(
                    listening_inodes(&table, port)
                        .into_iter()
                        .map(|i| (i, family)),
                ),
                // No IPv6 in this kernel or namespace.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    })?;
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let owners = socket_owners(inodes.iter().map(|(inode, _)| *inode).collect());
    let mut listeners = Vec::new();
    for (inode, family) in inodes {
        let Some(&(pid, fd)) = owners.get(&inode) else {
            tracing::warn!(
                inode,
                port,
                "listening socket has no owning process we can see (hostPID off?)"
            );
            continue;
        };
        match sys::copy_fd_from(pid, fd) {
            Ok(socket) => listeners.push(Listener {
                family,
                inode,
                pid,
                socket,
            }),
            Err(e) => tracing::warn!(
                inode,
                pid,
                fd,
                port,
                "cannot copy listening socket (pidfd_getfd): {e}"
            ),
        }
    }
    Ok(listeners)
}

/// Inodes of sockets in state LISTEN on `port` in a /proc/net/tcp{,6} table.
pub(crate) fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            let state = fields.get(3)?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (*state == TCP_LISTEN && local_port == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// For each wanted socket inode, one (pid, fd) that holds it. Socket inodes are
/// unique machine-wide, so every process is searched, whatever its namespace.
fn socket_owners(mut wanted: Vec<u64>) -> HashMap<u64, (i32, i32)> {
    let mut owners = HashMap::new();
    let me = std::process::id() as i32;
    let Ok(procs) = fs::read_dir("/proc") else {
        return owners;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes come and go while we walk: unreadable ones are skipped.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2387 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:2387 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 51300 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51299 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn finds_only_listeners_on_the_port() {
        // 0x2387 = 9095, 0x3039 = 12345; the established socket on 9095 is not a listener.
        assert_eq!(listening_inodes(TABLE, 9095), vec![51234]);
        assert_eq!(listening_inodes(TABLE, 12345), vec![51299]);
        assert!(listening_inodes(TABLE, 80).is_empty());
    }

    #[test]
    fn parses_ipv6_addresses() {
        let t6 = "header\n   0: 00000000000000000000000000000000:2387 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(t6, 9095), vec![777]);
    }
}
