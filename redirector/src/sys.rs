//! The few system calls std and aya 0.14 do not wrap. Where rustix wraps one
//! (setns, pidfd_open, pidfd_getfd, openat2, statfs, fstat, clocks, the socket
//! options it names) it is used, and there is no `unsafe` here for it; the
//! effective capabilities come from capget(2) through `caps`. Each remaining
//! `unsafe` block is a plain syscall rustix does not offer: getsockopt
//! `SO_NETNS_COOKIE` (rustix has no accessor for it, nor a raw getsockopt) and
//! bpf(2) (rustix has no wrapper); command and type numbers come from aya-obj's
//! kernel bindings. What the bpf(2) calls cover:
//! - BPF_LINK_CREATE for sk_lookup on a netns fd and sock_ops on a cgroup fd
//!   as a raw link fd we pin ourselves, BPF_LINK_DETACH, BPF_LINK_GET_FD_BY_ID,
//!   BPF_OBJ_PIN/GET and a link's netns inode (BPF_OBJ_GET_INFO_BY_FD): aya
//!   0.14 exposes neither a netns link's inode nor detach by fd nor open by id;
//! - BPF_PROG_QUERY on a netns or cgroup: aya 0.14's query is not public;
//! - map element operations on the socket hash with 8-byte values: aya 0.14's
//!   `SockHash` only takes 4-byte values.

pub mod cgroup;
pub mod cgroup_ids;
pub mod netns;
pub mod owners;
pub mod proc;
pub mod sockdiag;

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_link_type};
use caps::{CapSet, Capability, CapsHashSet};
use rustix::{
    fs::{Mode, OFlags, ResolveFlags},
    net::{sockopt, AddressFamily, SocketFlags, SocketType},
    process::{Pid, PidfdFlags, PidfdGetfdFlags},
    thread::LinkNameSpaceType,
    time::ClockId,
};

/// A bpf(2) command number as the syscall takes it.
const fn cmd(c: bpf_cmd) -> libc::c_long {
    c as libc::c_long
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// bpffs' `statfs` magic (a 32-bit value, as every filesystem magic is).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

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

/// `SO_NETNS_COOKIE` of a socket: the one socket option here rustix has no
/// accessor for (and it offers no raw getsockopt).
fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) with out-pointers to a live u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A pidfd for process `pid` (Linux 5.3): readable once the process exits.
/// A pid of 0 or below is EINVAL, as the kernel says.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    let pid = (pid > 0)
        .then(|| Pid::from_raw(pid))
        .flatten()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// A duplicate of file descriptor `fd` of process `pid` (`pidfd_getfd`, Linux 5.6;
/// needs ptrace access to the process, i.e. CAP_SYS_PTRACE for other users).
/// A negative `fd` is EBADF, as the kernel says.
pub fn copy_fd_from(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let pidfd = pidfd_open(pid)?;
    Ok(rustix::process::pidfd_getfd(
        &pidfd,
        fd,
        PidfdGetfdFlags::empty(),
    )?)
}

/// Opens `path` as an `O_PATH` descriptor, resolved with `dir` as the root
/// (`openat2` with RESOLVE_IN_ROOT and RESOLVE_NO_MAGICLINKS, Linux 5.6): `..`
/// and absolute symlinks stay under `dir`, and /proc magic links are refused,
/// so a path a pod controls never leads out of the pod's filesystem. `O_PATH`
/// opens nothing: no FIFO, device or lock can block or react to it.
/// A path with a NUL byte is EINVAL.
pub fn open_path_in_root(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(path)?;
    // `f_type` is a long on most targets, u32 on s390x: its low 32 bits.
    Ok(st.f_type as u32 == BPF_FS_MAGIC)
}

/// The pids in /proc right now (processes come and go while callers look).
/// One readdir of /proc: procfs's `all_processes` would also open a
/// /proc/PID descriptor for every process of the node, which no caller needs.
pub fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
}

/// Linux capabilities the agent needs, with the name an operator reads (as
/// `caps` and the kernel spell it) and the reason.
pub const REQUIRED_CAPABILITIES: [(Capability, &str, &str); 4] = [
    (
        Capability::CAP_BPF,
        "CAP_BPF",
        "load eBPF programs and maps",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        "attach sk_lookup to network namespaces and sock_ops to the cgroup",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "enter other network namespaces (setns) and pin to bpffs",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        "copy a live-store's existing listening socket (pidfd_getfd)",
    ),
];

/// The required capabilities missing from the calling thread's effective set
/// (capget(2): no /proc needed).
pub fn missing_capabilities() -> io::Result<Vec<(&'static str, &'static str)>> {
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| io::Error::other(format!("reading the effective capabilities: {e}")))?;
    Ok(missing_from(&effective))
}

/// The required capabilities not in `effective`.
fn missing_from(effective: &CapsHashSet) -> Vec<(&'static str, &'static str)> {
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(cap, _, _)| !effective.contains(cap))
        .map(|&(_, name, why)| (name, why))
        .collect()
}

/// `bpf_attach_type` values for `prog_query`.
pub const BPF_CGROUP_SOCK_OPS: u32 = bpf_attach_type::BPF_CGROUP_SOCK_OPS as u32;
pub const BPF_SK_LOOKUP: u32 = bpf_attach_type::BPF_SK_LOOKUP as u32;
pub const BPF_CGROUP_INET4_POST_BIND: u32 = bpf_attach_type::BPF_CGROUP_INET4_POST_BIND as u32;
pub const BPF_CGROUP_INET6_POST_BIND: u32 = bpf_attach_type::BPF_CGROUP_INET6_POST_BIND as u32;
const BPF_PROG_QUERY: libc::c_long = cmd(bpf_cmd::BPF_PROG_QUERY);

/// Ids of the programs of `attach_type` attached directly to `target` (a
/// netns or cgroup fd): whether our programs are still in place.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    // The `query` member of `union bpf_attr`: target_fd, attach_type,
    // query_flags, attach_flags, prog_ids (u64), prog_cnt, then fields we
    // leave zero; the rest of the union must be zero too.
    let mut attr = [0u64; 16];
    attr[0] = target.as_raw_fd() as u32 as u64 | ((attach_type as u64) << 32);
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    // The kernel writes at most prog_cnt ids into `ids` and the count into attr[3].
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = (attr[3] as u32).min(ids.len() as u32) as usize;
    Ok(ids[..count].to_vec())
}

/// Nanoseconds to add to a CLOCK_MONOTONIC time (`bpf_ktime_get_ns`) to get
/// Unix time.
pub fn monotonic_to_unix_offset_ns() -> i128 {
    fn now(clock: ClockId) -> i128 {
        let ts = rustix::time::clock_gettime(clock);
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(ClockId::Realtime) - now(ClockId::Monotonic)
}

const BPF_OBJ_PIN: libc::c_long = cmd(bpf_cmd::BPF_OBJ_PIN);
const BPF_OBJ_GET: libc::c_long = cmd(bpf_cmd::BPF_OBJ_GET);
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = cmd(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD);
const BPF_LINK_CREATE: libc::c_long = cmd(bpf_cmd::BPF_LINK_CREATE);
const BPF_LINK_DETACH: libc::c_long = cmd(bpf_cmd::BPF_LINK_DETACH);
/// `bpf_link_type` of a netns (sk_lookup) link.
pub const BPF_LINK_TYPE_NETNS: u32 = bpf_link_type::BPF_LINK_TYPE_NETNS as u32;

/// bpf(2) with a zeroed 128-byte `union bpf_attr` the caller filled in.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: the attr buffer is as large as the kernel reads for these
    // commands, zeroed beyond the fields set, and outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a fresh fd returned by bpf(2) that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches `prog` to `target` (a netns or cgroup fd) with a BPF link. The link
/// lives as long as the returned fd or a pin of it; for cgroups it is always
/// multi-attach, so other tools' programs keep running.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u32 as u64 | ((target.as_raw_fd() as u32 as u64) << 32);
    attr[1] = attach_type as u64;
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

const BPF_LINK_GET_FD_BY_ID: libc::c_long = cmd(bpf_cmd::BPF_LINK_GET_FD_BY_ID);

/// Opens the link with kernel id `id` (aya 0.14 lists links but cannot open
/// one by id).
pub fn link_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = id as u64;
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Detaches a link now, whoever else holds it (a running agent's fd, a pin).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u32 as u64;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Pins a BPF object (link, map, program) at `path` in bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// What the kernel says about a link (the head of `struct bpf_link_info`).
#[derive(Clone, Copy, Debug)]
pub struct LinkInfo {
    pub kind: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For netns links: the namespace's inode, 0 once the namespace is gone.
    pub netns_ino: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // type, id, prog_id, pad, then the per-type union (netns: netns_ino, attach_type).
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        kind: info[0],
        id: info[1],
        prog_id: info[2],
        netns_ino: info[4],
    })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_LOOKUP_ELEM);
const BPF_MAP_UPDATE_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_UPDATE_ELEM);
const BPF_MAP_DELETE_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_DELETE_ELEM);
const BPF_MAP_GET_NEXT_KEY: libc::c_long = cmd(bpf_cmd::BPF_MAP_GET_NEXT_KEY);
/// `BPF_NOEXIST`: an update that never replaces an existing entry.
pub const BPF_NOEXIST: u64 = aya_obj::generated::BPF_NOEXIST as u64;
pub const BPF_ANY: u64 = aya_obj::generated::BPF_ANY as u64;

/// Map element operations by raw pointer: for the socket hash with 8-byte
/// values (fd in, socket cookie out), which aya 0.14's `SockHash` refuses (it
/// only accepts 4-byte values), and socket storage keyed by fd.
pub fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V, flags: u64) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    attr[2] = value as *const V as u64;
    attr[3] = flags;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// The value under `key`, or `None` if there is none.
pub fn map_lookup<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    attr[2] = &mut value as *mut u64 as u64;
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key as *const K as u64;
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

/// Every key of a map (a snapshot: entries come and go while it is taken).
pub fn map_keys<K: Copy + Default>(map: BorrowedFd<'_>) -> io::Result<Vec<K>> {
    let mut keys = Vec::new();
    let mut next = K::default();
    let mut prev: Option<K> = None;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u32 as u64;
        // A null key asks for the first one.
        attr[1] = prev.as_ref().map_or(0, |k| k as *const K as u64);
        attr[2] = &mut next as *mut K as u64;
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                keys.push(next);
                prev = Some(next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

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

/// `IPPROTO_MPTCP`: what Go >= 1.24 listens with by default.
pub const IPPROTO_MPTCP: i32 = 262;

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

/// Reads a sysctl of the network namespace `netns` (`/proc/sys/net/...` shows
/// the namespace of the thread that opens it). `None` if the kernel has no
/// such sysctl.
pub fn netns_sysctl(netns: BorrowedFd<'_>, path: &'static str) -> io::Result<Option<String>> {
    in_netns(netns, || match fs::read_to_string(path) {
        Ok(v) => Ok(Some(v.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    })
}

pub fn set_netns_sysctl(netns: BorrowedFd<'_>, path: &'static str, value: &str) -> io::Result<()> {
    in_netns(netns, || fs::write(path, value))
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        net::{TcpListener, UdpSocket},
        os::unix::fs::MetadataExt,
    };

    use procfs_core::FromRead;

    use super::*;

    /// capget(2) through `caps` says what the kernel's own /proc/thread-self/status
    /// says (CapEff, parsed by procfs), for the capabilities `caps` knows.
    #[test]
    fn effective_capabilities_match_proc_status() {
        let status = procfs_core::process::Status::from_read(
            File::open("/proc/thread-self/status").expect("status"),
        )
        .expect("parse");
        let known = caps::all().iter().fold(0u64, |m, c| m | c.bitmask());
        let effective = caps::read(None, CapSet::Effective).expect("capget");
        let bits = effective.iter().fold(0u64, |m, c| m | c.bitmask());
        assert_eq!(bits, status.capeff & known);
        let missing = missing_capabilities().expect("capget");
        for (cap, name, _) in REQUIRED_CAPABILITIES {
            let has = status.capeff & (1u64 << cap.index()) != 0;
            assert_eq!(missing.iter().any(|(n, _)| *n == name), !has, "{name}");
        }
    }

    #[test]
    fn missing_capabilities_are_named_in_order() {
        let none = CapsHashSet::default();
        let names: Vec<_> = missing_from(&none).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "CAP_BPF",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE"
            ]
        );
        let all: CapsHashSet = REQUIRED_CAPABILITIES.iter().map(|(c, _, _)| *c).collect();
        assert!(missing_from(&all).is_empty());
        let some: CapsHashSet = [Capability::CAP_BPF, Capability::CAP_SYS_PTRACE].into();
        let names: Vec<_> = missing_from(&some).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        // The names operators read are the kernel's (and caps') own.
        for (cap, name, _) in REQUIRED_CAPABILITIES {
            assert_eq!(cap.to_string(), name);
        }
        // The bits are the uapi's (include/uapi/linux/capability.h).
        let bits: Vec<u8> = REQUIRED_CAPABILITIES
            .iter()
            .map(|(c, _, _)| c.index())
            .collect();
        assert_eq!(bits, [39, 12, 21, 19]);
    }

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

    #[test]
    fn pidfd_open_takes_live_positive_pids() {
        let me = std::process::id() as i32;
        let pidfd = pidfd_open(me).expect("pidfd");
        let link = fs::read_link(format!("/proc/self/fd/{}", pidfd.as_raw_fd())).expect("link");
        assert_eq!(link.to_str(), Some("anon_inode:[pidfd]"));
        for bad in [0, -1, i32::MIN] {
            let e = pidfd_open(bad).expect_err("not a pid");
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad}");
        }
        // pid_max is at most 2^22: this one does not exist.
        let e = pidfd_open(i32::MAX).expect_err("no such process");
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }

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

    /// RESOLVE_IN_ROOT keeps `/` at the root given; RESOLVE_NO_MAGICLINKS
    /// refuses /proc's magic links (ELOOP); a NUL in the path is EINVAL.
    #[test]
    fn open_path_in_root_refuses_magic_links_and_nul() {
        let root = File::open("/").expect("root");
        let etc = open_path_in_root(root.as_fd(), Path::new("/etc")).expect("etc");
        assert_eq!(
            File::from(etc).metadata().expect("stat").ino(),
            fs::metadata("/etc").expect("stat").ino()
        );
        let e = open_path_in_root(root.as_fd(), Path::new("/proc/self/exe")).expect_err("magic");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = open_path_in_root(root.as_fd(), Path::new("/etc\0x")).expect_err("nul");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn bpffs_is_told_by_its_magic() {
        assert!(!is_bpffs(Path::new("/proc")).expect("statfs"));
        let e = is_bpffs(Path::new("/nonexistent/redirector")).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            for line in mounts
                .lines()
                .filter(|l| l.split(' ').nth(2) == Some("bpf"))
            {
                let at = line.split(' ').nth(1).expect("mount point");
                assert!(is_bpffs(Path::new(at)).expect("statfs"), "{at}");
            }
        }
    }

    /// BPF_PROG_QUERY reads what is attached, loading nothing: our own
    /// namespace's sk_lookup programs (none, or another tool's), and EPERM
    /// without CAP_NET_ADMIN.
    #[test]
    fn prog_query_on_our_namespace() {
        let ns = File::open("/proc/self/ns/net").expect("netns");
        match prog_query(ns.as_fd(), BPF_SK_LOOKUP) {
            Ok(ids) => assert!(ids.len() <= 64),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        let file = File::open("/proc/self/status").expect("file");
        assert!(prog_query(file.as_fd(), BPF_SK_LOOKUP).is_err());
    }

    #[test]
    fn pids_lists_live_processes_only() {
        let pids: Vec<i32> = pids().collect();
        assert!(pids.contains(&(std::process::id() as i32)));
        assert!(
            pids.iter().all(|p| *p > 0),
            "self, thread-self are not pids"
        );
    }

    /// Unix time minus the time since boot: after 2020, and the wall clock now.
    #[test]
    fn monotonic_offset_is_the_boot_time() {
        let offset = monotonic_to_unix_offset_ns();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as i128;
        assert!(offset > 1_577_836_800 * 1_000_000_000, "{offset}");
        assert!(offset <= unix_now);
    }

    /// The numbers of the kernel's uapi (include/uapi/linux/bpf.h), which
    /// never change: the bindings must give exactly these.
    #[test]
    fn bpf_numbers_are_the_kernels() {
        assert_eq!(
            [
                BPF_MAP_LOOKUP_ELEM,
                BPF_MAP_UPDATE_ELEM,
                BPF_MAP_DELETE_ELEM,
                BPF_MAP_GET_NEXT_KEY,
                BPF_OBJ_PIN,
                BPF_OBJ_GET,
                BPF_OBJ_GET_INFO_BY_FD,
                BPF_PROG_QUERY,
                BPF_LINK_CREATE,
                BPF_LINK_GET_FD_BY_ID,
                BPF_LINK_DETACH,
            ],
            [1, 2, 3, 4, 6, 7, 15, 16, 28, 30, 34]
        );
        assert_eq!((BPF_CGROUP_SOCK_OPS, BPF_SK_LOOKUP), (3, 36));
        assert_eq!((BPF_LINK_TYPE_NETNS, BPF_NOEXIST), (5, 1));
    }
}
