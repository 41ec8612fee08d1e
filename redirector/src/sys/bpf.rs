//! bpf(2) for what aya 0.14 does not offer, each command's `union bpf_attr`
//! layout written here once (rustix has no bpf(2) wrapper). Command and type
//! numbers come from aya-obj's kernel bindings. What the calls cover:
//! - BPF_LINK_CREATE for sk_lookup on a netns fd and sock_ops on a cgroup fd
//!   as a raw link fd we pin ourselves, BPF_LINK_DETACH, BPF_LINK_GET_FD_BY_ID,
//!   BPF_OBJ_PIN/GET and a link's netns inode (BPF_OBJ_GET_INFO_BY_FD): aya
//!   0.14 exposes neither a netns link's inode nor detach by fd nor open by id;
//! - BPF_PROG_QUERY on a netns or cgroup: aya 0.14's query is not public;
//! - map element operations on the socket hash with 8-byte values: aya 0.14's
//!   `SockHash` only takes 4-byte values;
//! - BPF_MAP_CREATE of a map no program uses, for the feature probes: aya's
//!   `is_map_supported` picks the key and value sizes itself;
//! - BPF_PROG_TEST_RUN of sk_lookup programs, for the benchmarks: aya 0.14's
//!   `TestRun` covers neither sk_lookup nor programs another process loaded.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_link_type, bpf_map_type};

/// A bpf(2) command number as the syscall takes it.
const fn cmd(c: bpf_cmd) -> libc::c_long {
    c as libc::c_long
}

const BPF_MAP_CREATE: libc::c_long = cmd(bpf_cmd::BPF_MAP_CREATE);
const BPF_MAP_LOOKUP_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_LOOKUP_ELEM);
const BPF_MAP_UPDATE_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_UPDATE_ELEM);
const BPF_MAP_DELETE_ELEM: libc::c_long = cmd(bpf_cmd::BPF_MAP_DELETE_ELEM);
const BPF_MAP_GET_NEXT_KEY: libc::c_long = cmd(bpf_cmd::BPF_MAP_GET_NEXT_KEY);
const BPF_OBJ_PIN: libc::c_long = cmd(bpf_cmd::BPF_OBJ_PIN);
const BPF_OBJ_GET: libc::c_long = cmd(bpf_cmd::BPF_OBJ_GET);
const BPF_PROG_TEST_RUN: libc::c_long = cmd(bpf_cmd::BPF_PROG_TEST_RUN);
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = cmd(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD);
const BPF_PROG_QUERY: libc::c_long = cmd(bpf_cmd::BPF_PROG_QUERY);
const BPF_LINK_CREATE: libc::c_long = cmd(bpf_cmd::BPF_LINK_CREATE);
const BPF_LINK_GET_FD_BY_ID: libc::c_long = cmd(bpf_cmd::BPF_LINK_GET_FD_BY_ID);
const BPF_LINK_DETACH: libc::c_long = cmd(bpf_cmd::BPF_LINK_DETACH);

/// `bpf_attach_type` values for `link_create` and `prog_query`.
pub const BPF_CGROUP_SOCK_OPS: u32 = bpf_attach_type::BPF_CGROUP_SOCK_OPS as u32;
pub const BPF_SK_LOOKUP: u32 = bpf_attach_type::BPF_SK_LOOKUP as u32;
pub const BPF_CGROUP_INET4_POST_BIND: u32 = bpf_attach_type::BPF_CGROUP_INET4_POST_BIND as u32;
pub const BPF_CGROUP_INET6_POST_BIND: u32 = bpf_attach_type::BPF_CGROUP_INET6_POST_BIND as u32;
/// `bpf_link_type` of a netns (sk_lookup) link.
pub const BPF_LINK_TYPE_NETNS: u32 = bpf_link_type::BPF_LINK_TYPE_NETNS as u32;
/// `bpf_map_type` of a socket hash, for `map_create`.
pub const BPF_MAP_TYPE_SOCKHASH: u32 = bpf_map_type::BPF_MAP_TYPE_SOCKHASH as u32;
/// `BPF_NOEXIST`: an update that never replaces an existing entry.
pub const BPF_NOEXIST: u64 = aya_obj::generated::BPF_NOEXIST as u64;
pub const BPF_ANY: u64 = aya_obj::generated::BPF_ANY as u64;

/// A `union bpf_attr` as 8-byte words, zeroed: each call fills in its
/// command's member by the uapi's offsets (include/uapi/linux/bpf.h) and
/// leaves the rest zero, as the kernel requires. 128 bytes hold every member
/// used here; a kernel whose union is smaller checks that the excess is zero.
type Attr = [u64; 16];

/// Two adjacent 32-bit fields of the attr as the word they share, `first` at
/// the lower address (whatever the byte order).
fn pair(first: u32, second: u32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&first.to_ne_bytes());
    bytes[4..].copy_from_slice(&second.to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// The two 32-bit fields of a word, as [`pair`] packs them.
fn unpair(word: u64) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = word.to_ne_bytes();
    (
        u32::from_ne_bytes([a, b, c, d]),
        u32::from_ne_bytes([e, f, g, h]),
    )
}

/// A descriptor as the attr's `__u32` fd fields hold it.
fn fd(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

/// A pointer the kernel reads through, as the attr's `__aligned_u64`
/// pointer fields hold it.
fn ptr<T>(p: *const T) -> u64 {
    p as u64
}

/// A pointer the kernel writes through: made from a `&mut` (or `*mut`), as a
/// write needs.
fn ptr_mut<T>(p: *mut T) -> u64 {
    p as u64
}

/// bpf(2) with an attr the caller filled in.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: a zeroed attr of the size passed; it and what it points at outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The fd a successful BPF_MAP_CREATE, BPF_OBJ_GET, BPF_LINK_CREATE or
/// BPF_LINK_GET_FD_BY_ID returned.
fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a fresh fd returned by bpf(2) that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Creates a map no program uses (for probing what the kernel accepts); it
/// is gone once the fd is closed.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    // map_type, key_size, value_size, max_entries; no flags, no name.
    attr[0] = pair(map_type, key_size);
    attr[1] = pair(value_size, max_entries);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Map element operations by raw pointer: for the socket hash with 8-byte
/// values (fd in, socket cookie out), which aya 0.14's `SockHash` refuses (it
/// only accepts 4-byte values), and socket storage keyed by fd.
pub fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V, flags: u64) -> io::Result<()> {
    let mut attr = elem(map, ptr(key), ptr(value), flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// The value under `key`, or `None` if there is none.
pub fn map_lookup<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    let mut attr = elem(map, ptr(key), ptr_mut(&mut value), 0);
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    bpf(BPF_MAP_DELETE_ELEM, &mut elem(map, ptr(key), 0, 0)).map(|_| ())
}

/// Every key of a map (a snapshot: entries come and go while it is taken).
pub fn map_keys<K: Copy + Default>(map: BorrowedFd<'_>) -> io::Result<Vec<K>> {
    let mut keys = Vec::new();
    let mut next = K::default();
    let mut prev: Option<K> = None;
    loop {
        // A null key asks for the first one.
        let key = prev.as_ref().map_or(0, |k| ptr(k));
        let mut attr = elem(map, key, ptr_mut(&mut next), 0);
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

/// The attr of the map element commands: map_fd, key, then value (or
/// next_key) and flags; `key` and `value` are pointers.
fn elem(map: BorrowedFd<'_>, key: u64, value: u64, flags: u64) -> Attr {
    let mut attr = Attr::default();
    attr[0] = pair(fd(map), 0);
    attr[1] = key;
    attr[2] = value;
    attr[3] = flags;
    attr
}

/// Pins a BPF object (link, map, program) at `path` in bpffs.
pub fn obj_pin(obj: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = Attr::default();
    // pathname, bpf_fd, file_flags.
    attr[0] = ptr(path.as_ptr());
    attr[1] = pair(fd(obj), 0);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = Attr::default();
    attr[0] = ptr(path.as_ptr());
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// Ids of the programs of `attach_type` attached directly to `target` (a
/// netns or cgroup fd): whether our programs are still in place.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = Attr::default();
    // The `query` member: target_fd, attach_type, query_flags, attach_flags,
    // prog_ids, prog_cnt, then fields left zero.
    attr[0] = pair(fd(target), attach_type);
    attr[2] = ptr_mut(ids.as_mut_ptr());
    attr[3] = pair(ids.len() as u32, 0);
    // The kernel writes at most prog_cnt ids into `ids`, and the count into prog_cnt.
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = unpair(attr[3]).0.min(ids.len() as u32) as usize;
    Ok(ids[..count].to_vec())
}

/// What one BPF_PROG_TEST_RUN gives back.
#[derive(Clone, Copy, Debug)]
pub struct TestRun {
    /// The program's return value.
    pub retval: u32,
    /// Mean nanoseconds per run.
    pub duration_ns: u32,
}

/// Runs `prog` `repeat` times on `ctx`, its program type's context as the
/// uapi lays it out (`struct bpf_sk_lookup` for sk_lookup). The kernel reads
/// `ctx` and writes nothing back into it.
pub fn prog_test_run<C>(prog: BorrowedFd<'_>, ctx: &C, repeat: u32) -> io::Result<TestRun> {
    let mut attr = Attr::default();
    // The `test` member: prog_fd, retval, data_size_in/out, data_in, data_out
    // (no packet), repeat, duration, ctx_size_in/out, ctx_in, ctx_out, then
    // flags, cpu and batch_size left zero.
    attr[0] = pair(fd(prog), 0);
    attr[4] = pair(repeat, 0);
    attr[5] = pair(std::mem::size_of::<C>() as u32, 0);
    attr[6] = ptr(ctx);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRun {
        retval: unpair(attr[0]).1,
        duration_ns: unpair(attr[4]).1,
    })
}

/// Attaches `prog` to `target` (a netns or cgroup fd) with a BPF link. The link
/// lives as long as the returned fd or a pin of it; for cgroups it is always
/// multi-attach, so other tools' programs keep running.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    // prog_fd, target_fd, attach_type, flags.
    attr[0] = pair(fd(prog), fd(target));
    attr[1] = pair(attach_type, 0);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Opens the link with kernel id `id` (aya 0.14 lists links but cannot open
/// one by id).
pub fn link_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    // link_id, next_id, open_flags.
    attr[0] = pair(id, 0);
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Detaches a link now, whoever else holds it (a running agent's fd, a pin).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr[0] = pair(fd(link), 0);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
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
    let mut attr = Attr::default();
    // The `info` member: bpf_fd, info_len, info.
    attr[0] = pair(fd(link), std::mem::size_of_val(&info) as u32);
    attr[1] = ptr_mut(info.as_mut_ptr());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        kind: info[0],
        id: info[1],
        prog_id: info[2],
        netns_ino: info[4],
    })
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsFd};

    use super::*;

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

    /// The map element commands on a throwaway hash map (no program is
    /// loaded; the map is gone with its fd): insert, refuse to replace,
    /// look up, list and delete, as the agent uses them on its socket hash.
    /// Without CAP_BPF, map_create is EPERM and there is nothing to check.
    #[test]
    fn map_elements_round_trip() {
        let hash = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
        let map = match map_create(hash, 4, 8, 4) {
            Ok(map) => map,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("map_create: {e}"),
        };
        let m = map.as_fd();
        assert_eq!(map_lookup(m, &1u32).expect("lookup"), None);
        assert!(map_keys::<u32>(m).expect("keys").is_empty());
        map_update(m, &1u32, &10u64, BPF_NOEXIST).expect("insert");
        map_update(m, &2u32, &20u64, BPF_ANY).expect("insert");
        let e = map_update(m, &1u32, &11u64, BPF_NOEXIST).expect_err("taken");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(map_lookup(m, &1u32).expect("lookup"), Some(10));
        let mut keys = map_keys::<u32>(m).expect("keys");
        keys.sort_unstable();
        assert_eq!(keys, [1, 2]);
        map_delete(m, &1u32).expect("delete");
        assert_eq!(map_lookup(m, &1u32).expect("lookup"), None);
        assert_eq!(map_keys::<u32>(m).expect("keys"), [2]);
        let e = map_delete(m, &1u32).expect_err("gone");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    /// The numbers of the kernel's uapi (include/uapi/linux/bpf.h), which
    /// never change: the bindings must give exactly these.
    #[test]
    fn bpf_numbers_are_the_kernels() {
        assert_eq!(
            [
                BPF_MAP_CREATE,
                BPF_MAP_LOOKUP_ELEM,
                BPF_MAP_UPDATE_ELEM,
                BPF_MAP_DELETE_ELEM,
                BPF_MAP_GET_NEXT_KEY,
                BPF_OBJ_PIN,
                BPF_OBJ_GET,
                BPF_PROG_TEST_RUN,
                BPF_OBJ_GET_INFO_BY_FD,
                BPF_PROG_QUERY,
                BPF_LINK_CREATE,
                BPF_LINK_GET_FD_BY_ID,
                BPF_LINK_DETACH,
            ],
            [0, 1, 2, 3, 4, 6, 7, 10, 15, 16, 28, 30, 34]
        );
        assert_eq!((BPF_CGROUP_SOCK_OPS, BPF_SK_LOOKUP), (3, 36));
        assert_eq!((BPF_LINK_TYPE_NETNS, BPF_NOEXIST), (5, 1));
        assert_eq!(BPF_MAP_TYPE_SOCKHASH, 18);
    }

    /// The attr's 32-bit fields land at the uapi's offsets: the first of a
    /// pair at the lower address, on either byte order.
    #[test]
    fn pairs_are_laid_out_in_address_order() {
        let word = pair(0x1122_3344, 0x5566_7788);
        let bytes = word.to_ne_bytes();
        assert_eq!(bytes[..4], 0x1122_3344u32.to_ne_bytes());
        assert_eq!(bytes[4..], 0x5566_7788u32.to_ne_bytes());
        assert_eq!(unpair(word), (0x1122_3344, 0x5566_7788));
    }
}
