//! The few system calls std and aya 0.14 do not wrap. Each `unsafe` block is
//! a plain syscall; command and type numbers come from aya-obj's kernel
//! bindings. What each covers:
//! - entering a network namespace, its cookie (`SO_NETNS_COOKIE`), copying a
//!   socket out of another process (`pidfd_getfd`), capabilities: std has none;
//! - BPF_LINK_CREATE for sk_lookup on a netns fd and sock_ops on a cgroup fd
//!   as a raw link fd we pin ourselves, BPF_LINK_DETACH, BPF_LINK_GET_FD_BY_ID,
//!   BPF_OBJ_PIN/GET and a link's netns inode (BPF_OBJ_GET_INFO_BY_FD): aya
//!   0.14 exposes neither a netns link's inode nor detach by fd nor open by id;
//! - BPF_PROG_QUERY on a netns or cgroup: aya 0.14's query is not public;
//! - map element operations on the socket hash with 8-byte values: aya 0.14's
//!   `SockHash` only takes 4-byte values.

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_link_type};

/// A bpf(2) command number as the syscall takes it.
const fn cmd(c: bpf_cmd) -> libc::c_long {
    c as libc::c_long
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate release.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// bpffs' `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
                // SAFETY: setns on this thread only; the fd is a valid borrowed netns fd.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("network namespace worker thread panicked")))
    })
}

/// The cookie of the network namespace the calling thread is in: the identity
/// the kernel programs key everything by (`bpf_get_netns_cookie`).
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    u64_sockopt(sock.as_fd(), SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a u64 (`SO_COOKIE`, `SO_NETNS_COOKIE`).
fn u64_sockopt(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointers point to a u64 and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
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
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags; the result is checked and owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd was just returned by pidfd_open(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as i32) })
}

/// A duplicate of file descriptor `fd` of process `pid` (`pidfd_getfd`, Linux 5.6;
/// needs ptrace access to the process, i.e. CAP_SYS_PTRACE for other users).
pub fn copy_fd_from(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: pidfd_getfd(2) with no flags; the result is checked and owned at once.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_fd().as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: copy was just returned by pidfd_getfd(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

/// Opens `path` as an `O_PATH` descriptor, resolved with `dir` as the root
/// (`openat2` with RESOLVE_IN_ROOT and RESOLVE_NO_MAGICLINKS, Linux 5.6): `..`
/// and absolute symlinks stay under `dir`, and /proc magic links are refused,
/// so a path a pod controls never leads out of the pod's filesystem. `O_PATH`
/// opens nothing: no FIFO, device or lock can block or react to it.
pub fn open_path_in_root(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: all-zero is a valid open_how (libc marks it non-exhaustive).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a NUL-terminated path and an open_how of the
    // size passed; the result is checked and owned at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat2(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: zeroed statfs is a valid out-buffer for statfs(2).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated, st is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The pids in /proc right now (processes come and go while callers look).
pub fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
}

/// Linux capabilities the agent needs, with the reason an operator reads.
pub const REQUIRED_CAPABILITIES: [(u32, &str, &str); 4] = [
    (39, "CAP_BPF", "load eBPF programs and maps"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach sk_lookup to network namespaces and sock_ops to the cgroup",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "enter other network namespaces (setns) and pin to bpffs",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "copy a live-store's existing listening socket (pidfd_getfd)",
    ),
];

/// The required capabilities missing from this process's effective set.
pub fn missing_capabilities() -> io::Result<Vec<(&'static str, &'static str)>> {
    let status = fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))?;
    Ok(REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, _, _)| eff & (1u64 << bit) == 0)
        .map(|&(_, name, why)| (name, why))
        .collect())
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
    // SAFETY: bpf(2) with a zeroed attr of the documented layout; the kernel
    // writes at most prog_cnt ids into `ids` and the count into attr[3].
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr[3] as u32).min(ids.len() as u32) as usize;
    Ok(ids[..count].to_vec())
}

/// Nanoseconds to add to a CLOCK_MONOTONIC time (`bpf_ktime_get_ns`) to get
/// Unix time.
pub fn monotonic_to_unix_offset_ns() -> i128 {
    fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
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
    let int_opt = |opt: libc::c_int| -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the out-pointers point to a c_int and its length.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    let inode = fs::File::from(fd.try_clone_to_owned()?)
        .metadata()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    Ok(SocketFacts {
        inode,
        cookie: u64_sockopt(fd, libc::SO_COOKIE)?,
        netns_cookie: u64_sockopt(fd, SO_NETNS_COOKIE)?,
        listening: int_opt(libc::SO_ACCEPTCONN)? != 0,
        protocol: int_opt(libc::SO_PROTOCOL)?,
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
    use super::*;

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
