//! Where a ring address is on this node: every network namespace, with the
//! addresses on its interfaces.

use std::{
    collections::HashSet,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use crate::{sys, sys::netns::Netns};

/// A network namespace on this node, with the addresses on its interfaces.
pub struct NodeNetns {
    pub netns: Netns,
    pub inode: u64,
    pub addrs: Vec<IpAddr>,
}

/// Every network namespace on this node: named ones (/var/run/netns) and those
/// of every process, once each (by inode).
pub fn node_namespaces() -> Vec<NodeNetns> {
    let mut named: Vec<PathBuf> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    named.sort();
    let procs = sys::pids().map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for path in named.into_iter().chain(procs) {
        // Processes exit and namespaces go while we look: skip what vanished.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok((cookie, addrs)) = sys::in_netns(file.as_fd(), || {
            Ok((sys::current_netns_cookie()?, local_addresses()?))
        }) else {
            // Not a namespace (a stale /var/run/netns file), or it vanished.
            continue;
        };
        out.push(NodeNetns {
            netns: Netns { path, file, cookie },
            inode: meta.ino(),
            addrs,
        });
    }
    out
}

/// The addresses on the interfaces of the calling thread's network namespace.
/// Not "can a socket bind it": with `net.ipv4.ip_nonlocal_bind=1` (keepalived,
/// some IPVS setups) every address binds, and every ring address would look local.
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) (a netlink dump of this thread's namespace) fills `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr at least as large as its family's.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
