//! Network namespaces: code run inside one, and the cookie that names one.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
};

use rustix::{
    net::{AddressFamily, SocketFlags, SocketType},
    thread::LinkNameSpaceType,
};

use super::sockopt::netns_cookie;

/// Runs `f` on a thread that has entered the network namespace `netns`. Sockets
/// created there belong to that namespace for their whole life, whichever thread
/// uses them later; the calling thread's namespace never changes.
pub fn in_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        // Builder, not `scope.spawn`: a node out of threads is an error for
        // this namespace, not a panic of the agent.
        std::thread::Builder::new()
            .spawn_scoped(scope, || {
                // setns(2) on this thread only; anything but a netns fd is EINVAL.
                let net = Some(LinkNameSpaceType::Network);
                rustix::thread::move_into_link_name_space(netns, net)?;
                f()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace worker thread panicked")))
    })
}

/// The cookie of the network namespace the calling thread is in: the identity
/// the kernel programs key everything by (`bpf_get_netns_cookie`).
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    netns_cookie(sock.as_fd())
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// setns into our own namespace (as root) gives our own cookie; a file
    /// that is not a netns is EINVAL, which `Netns::open` reports as such.
    #[test]
    fn in_netns_enters_a_namespace_and_refuses_other_files() {
        let own = current_netns_cookie().expect("cookie");
        assert_ne!(own, 0);
        let ns = File::open("/proc/self/ns/net").expect("netns");
        match in_netns(ns.as_fd(), current_netns_cookie) {
            Ok(cookie) => assert_eq!(cookie, own),
            // Not root: setns needs CAP_SYS_ADMIN.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => panic!("setns: {e}"),
        }
        let uts = File::open("/proc/self/ns/uts").expect("uts");
        let e = in_netns(uts.as_fd(), current_netns_cookie).expect_err("not a netns");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let plain = File::open("/proc/self/status").expect("file");
        let e = in_netns(plain.as_fd(), current_netns_cookie).expect_err("not a netns");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // The closure's own error comes back as it is.
        let e = in_netns(ns.as_fd(), || -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        })
        .expect_err("closure error");
        assert!(matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EPERM)));
    }
}
