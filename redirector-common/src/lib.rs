//! Facts shared by the kernel programs and the agent: names, defaults and the
//! layout of every map key and value. Both sides compile this file, so a layout
//! change is a compile error on one side or a size assertion failure, never a
//! silent mismatch.
#![no_std]

/// Tempo's `live_store.ring.instance_port` in the docs' sidecar example.
pub const DEFAULT_ADVERTISE_PORT: u16 = 12345;
/// Tempo's default `server.grpc_listen_port`.
pub const DEFAULT_LISTEN_PORT: u16 = 9095;

/// Program names as the kernel reports them (kept under 16 bytes, the kernel's
/// `BPF_OBJ_NAME_LEN`, so `bpftool prog` shows them whole).
pub const PROG_SK_LOOKUP: &str = "redir_lookup";
pub const PROG_SOCK_OPS: &str = "redir_sockops";

/// Map names (the symbol names in the object file).
pub const MAP_LISTENERS: &str = "LISTENERS";
pub const MAP_REDIRECTS: &str = "REDIRECTS";
pub const MAP_LISTEN_PORTS: &str = "LISTEN_PORTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Every map that all program instances must share (the per-namespace
/// `sk_lookup` instances and the one `sock_ops` instance).
pub const SHARED_MAPS: [&str; 4] = [MAP_LISTENERS, MAP_REDIRECTS, MAP_LISTEN_PORTS, MAP_COUNTERS];

/// Load-time constant of each `sk_lookup` instance: the cookie of the network
/// namespace it is attached to. `sk_lookup` programs cannot call
/// `bpf_get_netns_cookie`, so each namespace gets its own instance.
pub const GLOBAL_NETNS_COOKIE: &str = "NETNS_COOKIE";

/// Capacity of the listener map: one entry per (namespace, listen port, family).
pub const MAX_LISTENERS: u32 = 4096;
/// Capacity of the redirect tables: one entry per (namespace, port).
pub const MAX_REDIRECTS: u32 = 4096;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;

/// A port in one network namespace. Key of `REDIRECTS` (advertised port ->
/// listen port) and `LISTEN_PORTS` (listen port -> advertised port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsPort {
    pub netns_cookie: u64,
    pub port: u16,
    pub _pad: [u8; 6],
}

impl NsPort {
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            _pad: [0; 6],
        }
    }
}

/// Key of the `LISTENERS` socket hash: the live-store's listening socket for a
/// listen port in one namespace. The family is part of the key because an IPv6
/// lookup can only be given an IPv6 socket, while an IPv4 lookup can also be
/// given a dual-stack IPv6 one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: [u8; 4],
}

impl ListenerKey {
    pub const fn new(netns_cookie: u64, port: u16, family: u16) -> Self {
        Self {
            netns_cookie,
            port,
            family,
            _pad: [0; 4],
        }
    }
}

const _: () = assert!(core::mem::size_of::<NsPort>() == 16 && core::mem::align_of::<NsPort>() == 8);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 16);

/// Indices into the per-CPU `COUNTERS` array. Userspace sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A new connection to an advertised port was given to the live-store.
    Redirected = 0,
    /// A new connection to an advertised port found no live-store listener and
    /// was passed on (to whatever else listens there, or refused).
    NoListener = 1,
    /// `bpf_sk_assign` refused the registered listener (wrong family, ...).
    AssignError = 2,
    /// A listener on a listen port was registered by the `sock_ops` program.
    ListenerRegistered = 3,
    /// Registering a listener failed (map full, ...).
    ListenerRegisterError = 4,
}

pub const COUNTER_COUNT: u32 = 5;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Redirected,
        Counter::NoListener,
        Counter::AssignError,
        Counter::ListenerRegistered,
        Counter::ListenerRegisterError,
    ];

    /// Name used in logs, `status` output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::NoListener => "no_listener",
            Counter::AssignError => "assign_error",
            Counter::ListenerRegistered => "listener_registered",
            Counter::ListenerRegisterError => "listener_register_error",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::NsPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
}
