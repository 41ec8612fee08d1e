//! Flow records for redirected connections, written in the kernel.
//!
//! `sk_lookup` sees the SYN, `sock_ops` sees the accepted socket: a redirect
//! leaves the connection's (namespace, remote address, ports) in `PENDING`, and
//! the handshake's completion (`PASSIVE_ESTABLISHED_CB`) claims it, writes the
//! open record and turns on state callbacks for that one socket. The close
//! record is written on its transition to `TCP_CLOSE`. Connections that never
//! went through a redirect (direct to 9095, an old sidecar on 12345) are not in
//! `PENDING` and cost one failed lookup.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_NO_COMMON_LRU, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext,
};
use redirector_common::{
    Counter, FlowEvent, FlowState, PendingKey, AF_INET, AF_INET6, DEFAULT_FLOW_RING_BYTES,
    END_ABORTED, END_FIN, END_RST, EVENT_CLOSE, EVENT_OPEN, EVENT_REFUSED, FLOW_FIN_ACKED,
    FLOW_PEER_FIN, FLOW_RTO, MAX_FLOWS, MAX_PENDING, REFUSED_RECORDS_PER_SEC,
};

use crate::{add, count};

/// Redirected connections whose handshake has not completed. LRU: a SYN flood
/// evicts old entries instead of failing inserts. Per-CPU LRU lists
/// (BPF_F_NO_COMMON_LRU): inserts on the SYN path take no global lock; the
/// table itself is shared, so sock_ops finds the entry from any CPU.
#[map]
static PENDING: LruHashMap<PendingKey, u16> =
    LruHashMap::with_max_entries(MAX_PENDING, BPF_F_NO_COMMON_LRU);

/// Open redirected flows by socket cookie.
#[map]
static FLOWS: HashMap<u64, FlowState> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Open, close and refused records for the agent. The loader may resize it.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_FLOW_RING_BYTES, 0);

/// Per CPU: [second of the current window, refused records emitted in it].
#[map]
static REFUSED_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

// TCP states (include/net/tcp_states.h).
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

const NSEC_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
fn emit(event: &FlowEvent) {
    // Waking the agent for every record would cost more than writing it: wake
    // it once a quarter of the ring is filled; it also drains on a timer.
    let pending = FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let size = FLOW_EVENTS.query(BPF_RB_RING_SIZE as u64);
    let wakeup = if pending >= size / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if FLOW_EVENTS
        .output::<FlowEvent>(event, wakeup as u64)
        .is_err()
    {
        count(Counter::RecordsDropped);
    }
}

#[inline(always)]
fn empty_event(kind: u8) -> FlowEvent {
    FlowEvent {
        kind,
        end: 0,
        family: 0,
        local_port: 0,
        remote_port: 0,
        listen_port: 0,
        _pad: 0,
        srtt_us: 0,
        netns_cookie: 0,
        socket_cookie: 0,
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        duration_ns: 0,
        bytes_received: 0,
        bytes_sent: 0,
        retransmits: 0,
        _pad2: 0,
        remote_ip: [0; 4],
        local_ip: [0; 4],
    }
}

/// Volatile loads of context fields (each u32 of an address array on its own).
/// Otherwise LLVM turns "pick the IPv4 or the IPv6 value" into one load
/// through a pointer chosen between `ctx + 16` and `ctx + 20`, and the verifier
/// rejects loads through a derived context pointer.
macro_rules! ctx_u32 {
    ($ptr:expr, $field:ident) => {
        core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field))
    };
}
macro_rules! ctx_ip6 {
    ($ptr:expr, $field:ident) => {
        [
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[0])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[1])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[2])),
            core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$field[3])),
        ]
    };
}

/// (family, remote ip, local ip, remote port) as sk_lookup saw the SYN.
#[inline(always)]
fn lookup_tuple(ctx: &SkLookupContext) -> (u16, [u32; 4], [u32; 4], u16) {
    let p = ctx.lookup;
    // SAFETY: context field loads, rewritten by the verifier.
    let (family, remote_port, r4, l4, r6, l6) = unsafe {
        (
            (*p).family as u16,
            // `remote_port` is a __be16 in the sk_lookup context.
            u16::from_be((*p).remote_port),
            ctx_u32!(p, remote_ip4),
            ctx_u32!(p, local_ip4),
            ctx_ip6!(p, remote_ip6),
            ctx_ip6!(p, local_ip6),
        )
    };
    if family == AF_INET {
        (family, [r4, 0, 0, 0], [l4, 0, 0, 0], remote_port)
    } else {
        (family, r6, l6, remote_port)
    }
}

/// Called by `sk_lookup` after assigning a connection to the live-store.
#[inline(always)]
pub fn redirected(ctx: &SkLookupContext, netns_cookie: u64, listen_port: u16) {
    let (family, remote_ip, _, remote_port) = lookup_tuple(ctx);
    // SAFETY: context field load.
    let local_port = unsafe { (*ctx.lookup).local_port } as u16;
    let key = PendingKey::new(netns_cookie, family, remote_ip, remote_port, local_port);
    // A failed insert only loses the flow record, and the LRU map makes room.
    let _ = PENDING.insert(&key, &listen_port, BPF_ANY as u64);
}

/// Called by `sk_lookup` when no live-store listener was registered. Always
/// counted (by the caller); recorded at most `REFUSED_RECORDS_PER_SEC` per CPU.
#[inline(always)]
pub fn refused(ctx: &SkLookupContext, netns_cookie: u64, listen_port: u16) {
    let mut event = empty_event(EVENT_REFUSED);
    let second = event.ts_ns / NSEC_PER_SEC;
    let (Some(window), Some(used)) = (REFUSED_BUDGET.get_ptr_mut(0), REFUSED_BUDGET.get_ptr_mut(1))
    else {
        return;
    };
    // SAFETY: per-CPU slots, and BPF programs are not preempted on their CPU.
    unsafe {
        if *window != second {
            *window = second;
            *used = 0;
        }
        if *used >= REFUSED_RECORDS_PER_SEC {
            count(Counter::RefusedRecordsSuppressed);
            return;
        }
        *used += 1;
    }
    let (family, remote_ip, local_ip, remote_port) = lookup_tuple(ctx);
    event.family = family;
    event.remote_ip = remote_ip;
    event.local_ip = local_ip;
    event.remote_port = remote_port;
    // SAFETY: context field load.
    event.local_port = unsafe { (*ctx.lookup).local_port } as u16;
    event.listen_port = listen_port;
    event.netns_cookie = netns_cookie;
    emit(&event);
}

/// (family, remote ip, local ip) of a sock_ops socket, with IPv4-mapped IPv6
/// addresses (an IPv4 client on a dual-stack listener) turned back into IPv4,
/// so they match what sk_lookup saw.
#[inline(always)]
fn sock_tuple(ctx: &SockOpsContext) -> (u16, [u32; 4], [u32; 4]) {
    let family = ctx.family() as u16;
    let p = ctx.ops;
    // SAFETY: context field loads, rewritten by the verifier.
    let (r4, l4, remote, local) = unsafe {
        (
            ctx_u32!(p, remote_ip4),
            ctx_u32!(p, local_ip4),
            ctx_ip6!(p, remote_ip6),
            ctx_ip6!(p, local_ip6),
        )
    };
    if family == AF_INET {
        return (family, [r4, 0, 0, 0], [l4, 0, 0, 0]);
    }
    if remote[0] == 0 && remote[1] == 0 && remote[2] == u32::to_be(0xffff) {
        return (AF_INET, [remote[3], 0, 0, 0], [local[3], 0, 0, 0]);
    }
    (AF_INET6, remote, local)
}

pub fn on_sock_op(ctx: &SockOpsContext, op: u32) {
    match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => opened(ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(ctx),
        BPF_SOCK_OPS_RTO_CB => {
            // SAFETY: helper reading the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(state) = FLOWS.get_ptr_mut(&cookie) {
                // SAFETY: map value pointer, valid for this program run.
                unsafe { (*state).flags |= FLOW_RTO };
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn opened(ctx: &SockOpsContext) {
    // SAFETY: helper reading the context's socket namespace.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (family, remote_ip, local_ip) = sock_tuple(ctx);
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // `remote_port` sits in the upper half of a u32, in network byte order.
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let local_port = ctx.local_port() as u16;
    let key = PendingKey::new(netns_cookie, family, remote_ip, remote_port, local_port);
    // SAFETY: plain hash lookup; the value is copied out at once.
    let Some(&listen_port) = (unsafe { PENDING.get(&key) }) else {
        return;
    };
    let _ = PENDING.remove(&key);
    // SAFETY: helper reading the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = empty_event(EVENT_OPEN);
    let state = FlowState {
        start_ns: event.ts_ns,
        listen_port,
        flags: 0,
        _pad: 0,
    };
    if FLOWS.insert(&socket_cookie, &state, BPF_ANY as u64).is_ok() {
        // Only this socket pays for state callbacks.
        let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32);
    } else {
        count(Counter::FlowTableFull);
    }
    count(Counter::FlowsOpened);
    event.family = family;
    event.remote_ip = remote_ip;
    event.local_ip = local_ip;
    event.remote_port = remote_port;
    event.local_port = local_port;
    event.listen_port = listen_port;
    event.netns_cookie = netns_cookie;
    event.socket_cookie = socket_cookie;
    emit(&event);
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    // SAFETY: helper reading the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = FLOWS.get_ptr_mut(&socket_cookie) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    // The kernel's byte counters follow sequence numbers, so each FIN counts
    // one: remember which FINs happened to report payload bytes only.
    // FIN_WAIT2 -> CLOSE is not used: an orphaned socket (closed by the live-store)
    // goes there as soon as its own FIN is acked, before any peer FIN; only a
    // half-closed live-store that then receives the peer's FIN counts one byte
    // too many.
    if new == TCP_CLOSE_WAIT || new == TCP_CLOSING {
        state.flags |= FLOW_PEER_FIN;
    }
    if (old == TCP_FIN_WAIT1 && new == TCP_FIN_WAIT2)
        || ((old == TCP_CLOSING || old == TCP_LAST_ACK) && new == TCP_CLOSE)
    {
        state.flags |= FLOW_FIN_ACKED;
    }
    if new != TCP_CLOSE {
        return;
    }
    let mut event = empty_event(EVENT_CLOSE);
    event.end = match old {
        TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_LAST_ACK | TCP_CLOSING => END_FIN,
        _ if state.flags & FLOW_RTO != 0 => END_ABORTED,
        _ => END_RST,
    };
    // SAFETY: context field loads, rewritten by the verifier (full socket here).
    let (bytes_received, bytes_acked, srtt_us, retransmits) = unsafe {
        let ops = &*ctx.ops;
        (
            ops.bytes_received,
            ops.bytes_acked,
            ops.srtt_us,
            ops.total_retrans,
        )
    };
    let peer_fin = (state.flags & FLOW_PEER_FIN != 0) as u64;
    let fin_acked = (state.flags & FLOW_FIN_ACKED != 0) as u64;
    event.bytes_received = bytes_received.saturating_sub(peer_fin);
    event.bytes_sent = bytes_acked.saturating_sub(fin_acked);
    // The kernel keeps srtt scaled by 8.
    event.srtt_us = srtt_us >> 3;
    event.retransmits = retransmits;
    event.duration_ns = event.ts_ns.saturating_sub(state.start_ns);
    event.listen_port = state.listen_port;
    let (family, remote_ip, local_ip) = sock_tuple(ctx);
    event.family = family;
    event.remote_ip = remote_ip;
    event.local_ip = local_ip;
    event.remote_port = u32::from_be(ctx.remote_port()) as u16;
    event.local_port = ctx.local_port() as u16;
    // SAFETY: helper reading the context's socket namespace.
    event.netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    event.socket_cookie = socket_cookie;
    let _ = FLOWS.remove(&socket_cookie);
    count(Counter::FlowsClosed);
    add(Counter::BytesReceived, event.bytes_received);
    add(Counter::BytesSent, event.bytes_sent);
    emit(&event);
}
