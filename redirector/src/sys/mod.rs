//! The kernel facade: the few system calls std and aya 0.14 do not wrap, and
//! what the kernel says of namespaces, sockets, cgroups and processes; one
//! file per job. Where rustix wraps a call (setns, pidfd_open, pidfd_getfd,
//! openat2, statfs, fstat, clocks, the socket options it names) it is used,
//! with no `unsafe` for it; the effective capabilities come from capget(2)
//! through `caps`. The `unsafe` left is for plain syscalls rustix does not
//! offer: bpf(2) (`bpf`) and getsockopt `SO_NETNS_COOKIE` (`netns`).
//!
//! - `bpf`: bpf(2) commands aya 0.14 lacks, each `union bpf_attr` layout once;
//! - `netns`: a network namespace to serve (`netns::Error`), running code
//!   inside one, and its cookie;
//! - `sockdiag`: the listening sockets of a namespace;
//! - `cgroup`, `cgroup_ids`: the cgroup v2 mount, and a cgroup id's directory;
//! - `owners`, `proc`: which process holds a socket, and a process's name;
//! - `sysctl`: a network namespace's sysctls;
//! - `process`: pidfds, another process's descriptors, the pids in /proc;
//! - `sockopt`: what a socket is (inode, cookies, listening, protocol);
//! - `capabilities`: the capabilities the agent needs and which are missing;
//! - `fs`: openat2 confined to a root, and bpffs;
//! - `clock`: the monotonic clock's offset to Unix time.
//!
//! The system calls and what they return are re-exported here
//! (`sys::in_netns`), so callers name the facade rather than its files.

pub mod bpf;
pub mod capabilities;
pub mod cgroup;
pub mod cgroup_ids;
pub mod clock;
pub mod fs;
pub mod netns;
pub mod owners;
pub mod proc;
pub mod process;
pub mod sockdiag;
pub mod sockopt;
pub mod sysctl;

pub use bpf::{
    link_create, link_detach, link_get_fd_by_id, link_info, map_delete, map_keys, map_lookup,
    map_update, obj_get, obj_pin, prog_query, LinkInfo, BPF_ANY, BPF_CGROUP_INET4_POST_BIND,
    BPF_CGROUP_INET6_POST_BIND, BPF_CGROUP_SOCK_OPS, BPF_LINK_TYPE_NETNS, BPF_NOEXIST,
    BPF_SK_LOOKUP,
};
pub use capabilities::{
    missing_capabilities, require_capabilities, MissingCapabilities, REQUIRED_CAPABILITIES,
};
pub use clock::monotonic_to_unix_offset_ns;
pub use fs::{is_bpffs, open_path_in_root};
pub use netns::{current_netns_cookie, in_netns};
pub use process::{copy_fd_from, pidfd_open, pids};
pub use sockopt::{socket_facts, SocketFacts, IPPROTO_MPTCP};
pub use sysctl::{netns_sysctl, set_netns_sysctl};
