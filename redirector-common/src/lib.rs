//! Facts shared by the kernel programs and the agent: names, defaults and the
//! layout of every map key and value. Both sides compile this file, so a layout
//! change is a compile error on one side or a size assertion failure, never a
//! silent mismatch.
#![no_std]

/// Tempo's `live_store.ring.instance_port` in the docs' sidecar example.
pub const DEFAULT_ADVERTISE_PORT: u16 = 12345;
/// Tempo's default `server.grpc_listen_port`.
pub const DEFAULT_LISTEN_PORT: u16 = 9095;

/// What every redirector program's name starts with: "everything redirector
/// runs" (status, tests, the bench) is selected by it, so a new program needs
/// no update elsewhere.
pub const PROG_PREFIX: &str = "redir_";
/// Program names as the kernel reports them (kept under 16 bytes, the kernel's
/// `BPF_OBJ_NAME_LEN`, so `bpftool prog` shows them whole), each starting
/// with [`PROG_PREFIX`].
pub const PROG_SK_LOOKUP: &str = "redir_lookup";
pub const PROG_SOCK_OPS: &str = "redir_sockops";
/// The bind hooks (cgroup `post_bind4`/`post_bind6` on the cgroup v2 root).
pub const PROG_BIND4: &str = "redir_bind4";
pub const PROG_BIND6: &str = "redir_bind6";

/// Map names (the symbol names in the object file).
pub const MAP_LISTENERS: &str = "LISTENERS";
pub const MAP_REDIRECTS: &str = "REDIRECTS";
pub const MAP_LISTEN_PORTS: &str = "LISTEN_PORTS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
pub const MAP_REFUSED_BUDGET: &str = "REFUSED_BUDGET";
pub const MAP_WATCH_PORTS: &str = "WATCH_PORTS";
pub const MAP_LISTEN_EVENTS: &str = "LISTEN_EVENTS";
pub const MAP_NS_QUOTAS: &str = "NS_QUOTAS";
pub const MAP_FLOW_SHARE: &str = "FLOW_SHARE";
pub const MAP_BIND_BUDGET: &str = "BIND_BUDGET";
/// Socket storage on every listener of a served listen port: its port. Cloned
/// into each accepted socket (`BPF_F_CLONE`), where `sock_ops` reads it.
pub const MAP_LISTEN_MARKS: &str = "LISTEN_MARKS";
/// `net.mptcp.enabled` as it was in each namespace the agent turned MPTCP off
/// in (key: netns cookie): no program reads it; it is pinned with the rest,
/// so the next agent and `redirector detach` can give the setting back.
pub const MAP_MPTCP_WAS: &str = "MPTCP_WAS";
/// aya-log's record ring: shared too, so one reader serves every instance.
pub const MAP_AYA_LOGS: &str = "AYA_LOGS";
/// aya-log's load-time level (0 = off, 4 = debug): set from RUST_LOG.
pub const GLOBAL_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
/// Every map that all program instances must share (the per-namespace
/// `sk_lookup` instances and the one `sock_ops` instance).
pub const SHARED_MAPS: [&str; 15] = [
    MAP_LISTENERS,
    MAP_REDIRECTS,
    MAP_LISTEN_PORTS,
    MAP_COUNTERS,
    MAP_LISTEN_MARKS,
    MAP_FLOWS,
    MAP_FLOW_EVENTS,
    MAP_REFUSED_BUDGET,
    MAP_AYA_LOGS,
    MAP_WATCH_PORTS,
    MAP_LISTEN_EVENTS,
    MAP_NS_QUOTAS,
    MAP_FLOW_SHARE,
    MAP_BIND_BUDGET,
    MAP_MPTCP_WAS,
];

/// Load-time constant of each `sk_lookup` instance: the cookie of the network
/// namespace it is attached to. `sk_lookup` programs cannot call
/// `bpf_get_netns_cookie`, so each namespace gets its own instance.
pub const GLOBAL_NETNS_COOKIE: &str = "NETNS_COOKIE";
/// Load-time constant of the main instance: nanoseconds between the update
/// records of a long-lived flow (0: none; `--flow-update-interval`).
pub const GLOBAL_FLOW_UPDATE_NS: &str = "FLOW_UPDATE_NS";
/// Seconds between a long-lived flow's update records, by default: gRPC
/// connections from queriers live for hours.
pub const DEFAULT_FLOW_UPDATE_SECS: u64 = 10;

/// Capacity of the redirect tables: one entry per (namespace, port).
pub const MAX_REDIRECTS: u32 = 4096;
/// Listeners `sock_ops` registers per served namespace: a live-store has a few
/// (a wildcard socket, or one per address, times its SO_REUSEPORT members);
/// a pod that binds thousands of addresses gets this many and no more.
pub const LISTENERS_PER_NETNS: u64 = 32;
/// Capacity of the listener map: one entry per (namespace, listen port, bound
/// address, slot). Every namespace the redirect tables can hold fits its
/// quota, so no namespace can fill the map for the others (socket hash
/// entries are allocated as they are used: the capacity costs nothing).
pub const MAX_LISTENERS: u32 = LISTENERS_PER_NETNS as u32 * MAX_REDIRECTS;

/// Redirected connections open at once; beyond this a flow is counted in
/// `FlowTableFull` and gets no close record.
pub const MAX_FLOWS: u32 = 65536;
/// Flows one served namespace may hold in `FLOWS` when `served` namespaces
/// are: an equal share, so no pod's held connections leave others untracked
/// (at most 4096: a live-store's queriers hold a few connections each).
pub const fn flow_share(served: usize) -> u64 {
    let ways = if served < 16 { 16 } else { served as u64 };
    MAX_FLOWS as u64 / ways
}
/// Bind events waiting for the agent: thousands, far more than the bind()
/// calls on watched ports a node makes between two agent wakeups.
pub const LISTEN_EVENTS_BYTES: u32 = 16 * 4096;
/// Bind events one network namespace may report per second: a live-store
/// binds a few times when it starts; a pod binding in a loop is cut off at the
/// source, so the event ring keeps room for every other namespace.
pub const BIND_EVENTS_PER_SEC: u64 = 64;
/// Default flow ring buffer size (bytes, a power-of-two number of pages).
pub const DEFAULT_FLOW_RING_BYTES: u32 = 1 << 20;
/// Refused-connection records each CPU may emit per second; all are counted.
pub const REFUSED_RECORDS_PER_SEC: u64 = 100;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;

/// A port in one network namespace. Key of `REDIRECTS` (advertised port ->
/// `RedirectTarget`) and `LISTEN_PORTS` (listen port -> advertised port).
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

/// Key of the `LISTENERS` socket hash: one live-store listening socket on a
/// listen port in one namespace.
///
/// `family` and `addr` are those of the address the socket is bound to, so a
/// connection is only handed to a socket that would have accepted it on its
/// own port: a wildcard (all-zero `addr`) takes any local address, a specific
/// one (`127.0.0.1`) only that. An IPv6 socket bound to an IPv4-mapped address
/// is keyed as IPv4, the family of the connections it can receive.
///
/// `slot` lets several sockets share one bound address (an SO_REUSEPORT group
/// of worker processes): each member takes a free slot, the kernel drops a
/// member's entry when it closes, and any remaining member is enough, since
/// `bpf_sk_assign` picks within the group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// Network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub slot: u16,
    pub _pad: u16,
}

impl ListenerKey {
    pub const fn new(netns_cookie: u64, port: u16, bind: Bind, slot: u16) -> Self {
        Self {
            netns_cookie,
            addr: bind.addr,
            port,
            family: bind.family,
            slot,
            _pad: 0,
        }
    }

    pub const fn bind(&self) -> Bind {
        Bind {
            family: self.family,
            addr: self.addr,
        }
    }
}

/// Slots per bound address in `LISTENERS` (members of one SO_REUSEPORT group
/// registered at once; more members are still reached through the group).
pub const LISTENER_SLOTS: u16 = 4;

/// The address a listener is bound to, as `ListenerKey` keys it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bind {
    pub family: u16,
    /// Network byte order; IPv4 in `addr[0]`; all zero for a wildcard.
    pub addr: [u32; 4],
}

impl Bind {
    /// From a socket's family and address as the kernel reports them (IPv4 in
    /// `v4`, IPv6 in `v6`): an IPv4-mapped IPv6 address becomes IPv4.
    pub const fn of_socket(family: u16, v4: u32, v6: [u32; 4]) -> Self {
        if family == AF_INET {
            return Self::v4(v4);
        }
        if v6[0] == 0 && v6[1] == 0 && v6[2] == u32::to_be(0xffff) {
            return Self::v4(v6[3]);
        }
        Self {
            family: AF_INET6,
            addr: v6,
        }
    }

    pub const fn v4(addr: u32) -> Self {
        Self {
            family: AF_INET,
            addr: [addr, 0, 0, 0],
        }
    }

    pub const fn any(family: u16) -> Self {
        Self {
            family,
            addr: [0; 4],
        }
    }

    pub const fn is_any(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == 0 && self.addr[3] == 0
    }

    /// Index of this kind of bind in `RedirectTarget::binds`.
    pub const fn kind(&self) -> usize {
        match (self.family == AF_INET, self.is_any()) {
            (true, false) => BIND_V4_ADDR,
            (true, true) => BIND_V4_ANY,
            (false, false) => BIND_V6_ADDR,
            (false, true) => BIND_V6_ANY,
        }
    }
}

/// Kinds of bound address, indices into `RedirectTarget::binds`.
pub const BIND_V4_ADDR: usize = 0;
pub const BIND_V4_ANY: usize = 1;
pub const BIND_V6_ADDR: usize = 2;
pub const BIND_V6_ANY: usize = 3;

/// Value of `REDIRECTS`: where connections to an advertised port go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectTarget {
    pub listen_port: u16,
    pub _pad: u16,
    /// Per bind kind (`BIND_*`), non-zero if a listener of that kind may be
    /// registered: `sk_lookup` looks up these kinds first. Set by `sock_ops`
    /// on registration and by `sk_lookup` when an unmarked kind took a
    /// connection (one byte store each), and added by the agent's reconcile
    /// pass, whose whole-value write can lose a concurrent byte store: a hint
    /// that `sk_lookup` checks, never the truth.
    pub binds: [u8; 4],
}

impl RedirectTarget {
    pub const fn new(listen_port: u16) -> Self {
        Self {
            listen_port,
            _pad: 0,
            binds: [0; 4],
        }
    }
}

const _: () = assert!(core::mem::size_of::<NsPort>() == 16 && core::mem::align_of::<NsPort>() == 8);
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 32);
const _: () = assert!(core::mem::size_of::<RedirectTarget>() == 8);

/// Value of `NS_QUOTAS` (key: netns cookie): what a served namespace holds of
/// the node-wide maps. Created by the agent when it serves the namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsQuota {
    /// Listeners `sock_ops` registered that still listen (added at
    /// registration, taken away when they stop listening). Read as signed:
    /// a close counted twice under a race leaves it at -1, not at 2^64 - 1.
    pub listeners: u64,
    /// Redirected flows tracked in `FLOWS` that are open (added at the
    /// handshake, taken away at the close record); at most `FLOW_SHARE`.
    pub flows: u64,
    /// Registered listeners that stopped listening (closed, or shut down),
    /// ever: the agent's cheap resync check compares it with what it saw, so
    /// a stop whose event was lost still gets its namespace reconciled.
    pub stopped: u64,
}
const _: () = assert!(core::mem::size_of::<NsQuota>() == 24);

/// Value of `MPTCP_WAS` (key: netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MptcpWas {
    /// The namespace's inode (`net:[inode]`), by which `detach` finds it.
    pub netns_inode: u64,
    /// `net.mptcp.enabled` before the agent set it to 0.
    pub enabled: u64,
}
const _: () = assert!(core::mem::size_of::<MptcpWas>() == 16);

/// Indices into the per-CPU `COUNTERS` array. Userspace sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A lookup for an advertised port (a segment that found no established
    /// socket: a SYN, or a stray segment) was given to the live-store's
    /// listener. Only completed handshakes leave state (`FlowsOpened`).
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
    /// A redirected connection completed its handshake (open record).
    FlowsOpened = 5,
    /// A redirected connection closed (close record).
    FlowsClosed = 6,
    /// Payload bytes received from queriers on closed flows.
    BytesReceived = 7,
    /// Payload bytes sent to queriers and acknowledged, on closed flows.
    BytesSent = 8,
    /// A record could not be put in the ring buffer (full): lost, but counted.
    RecordsDropped = 9,
    /// A refused-connection record was not emitted (rate limit); still counted
    /// in `NoListener`.
    RefusedRecordsSuppressed = 10,
    /// A redirected connection could not be tracked (flow table full): it has
    /// an open record but will get no close record.
    FlowTableFull = 11,
    /// A listener was not registered because every slot for its bound address
    /// was taken (more SO_REUSEPORT members than `LISTENER_SLOTS`): still
    /// reached through the group while one registered member listens.
    ListenerSlotsFull = 12,
    /// A connection to an advertised port completed its handshake on a
    /// listener redirector does not know (an old sidecar listening on the
    /// advertised port itself). No records.
    FlowsUntracked = 13,
    /// A bind() to a watched port could not be reported to the agent (its
    /// ring was full): found by the agent's periodic resync instead.
    ListenEventsDropped = 14,
    /// A listener was not registered because its namespace already has
    /// `LISTENERS_PER_NETNS` registered.
    ListenerQuotaExceeded = 15,
    /// A redirected connection was not tracked to its close because its
    /// namespace holds its share of `FLOWS` (open record only).
    FlowQuotaExceeded = 16,
    /// A bind() to a watched port was not reported because its namespace had
    /// reported `BIND_EVENTS_PER_SEC` this second.
    ListenEventsLimited = 17,
}

pub const COUNTER_COUNT: u32 = 18;

/// One counter: its slot (the enum), its name in the exit summary and
/// `status`, and the Prometheus metric (with `_total`) and help it is exported
/// as. Every counter is described here and nowhere else.
pub struct CounterInfo {
    pub counter: Counter,
    pub name: &'static str,
    pub metric: &'static str,
    pub help: &'static str,
}

const fn row(
    counter: Counter,
    name: &'static str,
    metric: &'static str,
    help: &'static str,
) -> CounterInfo {
    CounterInfo {
        counter,
        name,
        metric,
        help,
    }
}

/// In slot order.
pub const COUNTER_TABLE: [CounterInfo; COUNTER_COUNT as usize] = [
    row(Counter::Redirected, "redirected", "lookups_redirected",
        "Lookups for an advertised port handed to the live-store's listener: each new connection's SYN (retransmits again), and stray segments, which the listener answers with a reset and which leave no state; connections_redirected counts completed handshakes"),
    row(Counter::NoListener, "no_listener", "connections_refused",
        "New connections to an advertised port that found no live-store listener"),
    row(Counter::AssignError, "assign_error", "assign_errors",
        "Registered listeners the kernel refused to assign (e.g. IPv6 connection, IPv4 listener)"),
    row(Counter::ListenerRegistered, "listener_registered", "listener_registrations",
        "Listeners registered: by the sock_ops program at listen(), or by the agent for listeners already listening when their namespace was served"),
    row(Counter::ListenerRegisterError, "listener_register_error", "listener_registration_errors",
        "Listeners that could not be registered"),
    row(Counter::FlowsOpened, "flows_opened", "connections_redirected",
        "Redirected connections that completed the handshake (one open record each)"),
    row(Counter::FlowsClosed, "flows_closed", "flows_closed",
        "Redirected connections that closed"),
    row(Counter::BytesReceived, "bytes_received", "bytes_received",
        "Payload bytes received from queriers on closed redirected flows"),
    row(Counter::BytesSent, "bytes_sent", "bytes_sent",
        "Payload bytes sent to queriers and acknowledged on closed redirected flows"),
    row(Counter::RecordsDropped, "records_dropped", "flow_records_dropped",
        "Flow records lost because the ring buffer was full"),
    row(Counter::RefusedRecordsSuppressed, "refused_records_suppressed", "refused_records_suppressed",
        "Refused-connection records not written (rate limit)"),
    row(Counter::FlowTableFull, "flow_table_full", "flow_table_full",
        "Redirected flows not tracked to their close (flow table full)"),
    row(Counter::ListenerSlotsFull, "listener_slots_full", "listener_slots_full",
        "Listeners not registered because every slot for their address was taken (reached through their SO_REUSEPORT group)"),
    row(Counter::FlowsUntracked, "flows_untracked", "flows_untracked",
        "Connections to an advertised port accepted by a listener redirector does not serve (an old sidecar listening on that port): no flow records"),
    row(Counter::ListenEventsDropped, "listen_events_dropped", "listen_events_dropped",
        "bind() calls to a watched port not reported to the agent (event ring full): served at the next resync instead"),
    row(Counter::ListenerQuotaExceeded, "listener_quota_exceeded", "listener_quota_exceeded",
        "Listeners not registered because their namespace already had its quota of registered listeners (a pod binding many addresses)"),
    row(Counter::FlowQuotaExceeded, "flow_quota_exceeded", "flow_quota_exceeded",
        "Redirected connections not tracked to their close because their namespace held its share of the flow table (an open record only)"),
    row(Counter::ListenEventsLimited, "listen_events_limited", "listen_events_limited",
        "bind() calls to a watched port not reported because their namespace had reported its limit per second (a pod binding in a loop)"),
];

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = {
        let mut all = [Counter::Redirected; COUNTER_COUNT as usize];
        let mut i = 0;
        while i < all.len() {
            all[i] = COUNTER_TABLE[i].counter;
            i += 1;
        }
        all
    };

    pub const fn info(self) -> &'static CounterInfo {
        &COUNTER_TABLE[self as usize]
    }

    /// Name used in logs, `status` output and the exit summary.
    pub const fn name(self) -> &'static str {
        self.info().name
    }
}

// The table's rows are in slot order.
const _: () = {
    let mut i = 0;
    while i < COUNTER_TABLE.len() {
        assert!(COUNTER_TABLE[i].counter as usize == i);
        i += 1;
    }
};

/// Per-flow state kept between the open and the close record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowState {
    pub start_ns: u64,
    pub listen_port: u16,
    /// `FLOW_*` bits seen on state transitions.
    pub flags: u16,
    /// With `FLOW_FIN_SEEN`: the sequence number just past the peer's FIN.
    pub fin_end: u32,
    /// When its last record (open or update) was written.
    pub reported_ns: u64,
}

/// The peer's FIN arrived: it counts one in `bytes_received`.
pub const FLOW_PEER_FIN: u16 = 1;
/// Our FIN was acknowledged: it counts one in `bytes_acked`.
pub const FLOW_FIN_ACKED: u16 = 2;
/// A retransmission timeout fired on this flow.
pub const FLOW_RTO: u16 = 4;
/// A segment carrying the peer's FIN was seen after we sent ours; `fin_end`
/// says where it ends, so the close can tell whether it was consumed.
pub const FLOW_FIN_SEEN: u16 = 8;

/// What the bind hooks tell the agent: a process bound a TCP socket to a
/// watched port (and is about to listen on it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenEvent {
    pub netns_cookie: u64,
    /// The cgroup v2 id of the calling task: the socket's cgroup.
    pub cgroup_id: u64,
    /// The process (thread group id) that called bind(), as the initial PID
    /// namespace numbers it.
    pub tgid: u32,
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    /// `LISTEN_EVENT_BIND` or `LISTEN_EVENT_STOPPED`.
    pub kind: u8,
    pub _pad: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<ListenEvent>() == 32);

/// A process bound a TCP socket to a watched port (`cgroup_id` and `tgid` set).
pub const LISTEN_EVENT_BIND: u8 = 0;
/// A registered listener stopped listening: its namespace may have members
/// of a SO_REUSEPORT group left unregistered, or a socket shut down in place
/// (`cgroup_id` and `tgid` are 0: sock_ops cannot read them).
pub const LISTEN_EVENT_STOPPED: u8 = 1;

/// Kinds of flow record.
pub const EVENT_OPEN: u8 = 1;
/// A long-lived flow's counters so far, at most every `FLOW_UPDATE_NS`.
pub const EVENT_UPDATE: u8 = 4;
pub const EVENT_CLOSE: u8 = 2;
pub const EVENT_REFUSED: u8 = 3;

/// How a flow ended (close records).
pub const END_FIN: u8 = 1;
pub const END_RST: u8 = 2;
pub const END_ABORTED: u8 = 3;

/// One record in the `FLOW_EVENTS` ring buffer. Addresses in network byte
/// order (IPv4 in `[0]`), ports in host byte order, times from
/// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowEvent {
    pub kind: u8,
    pub end: u8,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub listen_port: u16,
    pub _pad: u16,
    pub srtt_us: u32,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub retransmits: u32,
    pub _pad2: u32,
    pub remote_ip: [u32; 4],
    pub local_ip: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<FlowState>() == 24);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 104);

#[cfg(feature = "user")]
mod user {
    // SAFETY: as below.
    // SAFETY: as below.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::NsPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RedirectTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NsQuota {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MptcpWas {}
}
