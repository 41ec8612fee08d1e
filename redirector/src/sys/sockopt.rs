//! What a socket is, from its options (its namespace's cookie comes from
//! `netns`, the one option rustix has no accessor for).

use std::{io, os::fd::BorrowedFd};

use rustix::net::sockopt;

use super::netns::netns_cookie;

/// `IPPROTO_MPTCP`: what Go >= 1.24 listens with by default.
pub const IPPROTO_MPTCP: i32 = 262;

/// What a socket fd copied from another process is, checked before it is
/// registered: the copy may no longer be the socket sock_diag reported (the
/// fd number was reused), or may not be something a socket map can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketFacts {
    pub inode: u64,
    /// `SO_COOKIE`: unique for the boot, unlike the inode (32 bits in
    /// sock_diag, reused): what says it is the socket sock_diag reported.
    pub cookie: u64,
    /// `SO_NETNS_COOKIE`: the namespace it lives in (`bpf_sk_assign` checks none).
    pub netns_cookie: u64,
    pub listening: bool,
    pub protocol: i32,
}

pub fn socket_facts(fd: BorrowedFd<'_>) -> io::Result<SocketFacts> {
    Ok(SocketFacts {
        inode: rustix::fs::fstat(fd)?.st_ino,
        cookie: sockopt::socket_cookie(fd)?,
        netns_cookie: netns_cookie(fd)?,
        listening: sockopt::socket_acceptconn(fd)?,
        // `SO_PROTOCOL`; rustix says None for 0 (no protocol named).
        protocol: sockopt::socket_protocol(fd)?.map_or(0, |p| p.as_raw().get() as i32),
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use std::{
        fs::File,
        net::{TcpListener, UdpSocket},
        os::{fd::AsFd, unix::fs::MetadataExt},
    };

    use super::*;
    use crate::sys::{netns::current_netns_cookie, process::copy_fd_from};

    /// A listener copied out of a process (here ourselves) by pidfd_getfd is
    /// the same socket: inode, cookie and namespace, listening, TCP.
    #[test]
    fn copied_socket_facts() {
        let me = std::process::id() as i32;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let copy = copy_fd_from(me, listener.as_raw_fd()).expect("pidfd_getfd");
        assert_ne!(copy.as_raw_fd(), listener.as_raw_fd());
        let facts = socket_facts(copy.as_fd()).expect("facts");
        let original = socket_facts(listener.as_fd()).expect("facts");
        assert_eq!(facts, original);
        assert_eq!(
            facts.inode,
            File::from(listener.as_fd().try_clone_to_owned().expect("dup"))
                .metadata()
                .expect("stat")
                .ino()
        );
        assert_ne!(facts.cookie, 0);
        assert_eq!(facts.netns_cookie, current_netns_cookie().expect("cookie"));
        assert!(facts.listening);
        assert_eq!(facts.protocol, libc::IPPROTO_TCP);

        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let facts = socket_facts(udp.as_fd()).expect("facts");
        assert!(!facts.listening);
        assert_eq!(facts.protocol, libc::IPPROTO_UDP);
        assert_ne!(facts.cookie, original.cookie);

        for bad in [1 << 30, -1] {
            let e = copy_fd_from(me, bad).expect_err("no such fd");
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{bad}");
        }
        let file = File::open("/proc/self/status").expect("file");
        let e = socket_facts(file.as_fd()).expect_err("not a socket");
        assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK));
    }
}
