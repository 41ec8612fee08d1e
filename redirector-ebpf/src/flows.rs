//! Flow records for redirected connections, written in the kernel.
//!
//! A connection is known to be redirected where the kernel knows its handshake
//! completed (`PASSIVE_ESTABLISHED_CB`), from the accepted socket alone: its
//! listener carries a mark (`LISTEN_MARKS`, the listen port) that the kernel
//! cloned into it, and its local port is not that listen port, so it arrived
//! on an advertised port through `sk_lookup`. Nothing is stored before that:
//! SYNs and stray segments (bare ACKs, resets) leave no state behind. The
//! open record is written then, with state callbacks turned on for that one
//! socket; the close record on its transition to `TCP_CLOSE`. A direct
//! connection to the listen port costs one storage lookup.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext, Global,
};
use redirector_common::{
    Counter, FlowEvent, FlowState, NsPort, AF_INET, AF_INET6, DEFAULT_FLOW_RING_BYTES, END_ABORTED,
    END_FIN, END_RST, EVENT_CLOSE, EVENT_OPEN, EVENT_REFUSED, EVENT_UPDATE, FLOW_FIN_ACKED,
    FLOW_FIN_SEEN, FLOW_PEER_FIN, FLOW_RTO, MAX_FLOWS, REFUSED_RECORDS_PER_SEC,
};

use crate::{
    add, atomic_add, count,
    ctx::{ctx_ip6, ctx_u32},
    listeners::{full_sock, LISTEN_MARKS},
    NS_QUOTAS, REDIRECTS,
};

/// Set by the loader (`GLOBAL_FLOW_UPDATE_NS`): nanoseconds between a
/// long-lived flow's update records; 0: none.
#[no_mangle]
static FLOW_UPDATE_NS: Global<u64> = Global::new(0);

/// Open redirected flows by socket cookie.
#[map]
static FLOWS: HashMap<u64, FlowState> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// [0]: flows one namespace may hold in `FLOWS` (`flow_share`), set by the
/// agent as the served set changes.
#[map]
static FLOW_SHARE: Array<u64> = Array::with_max_entries(1, 0);

/// Open, close and refused records for the agent. The loader may resize it.
#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_FLOW_RING_BYTES, 0);

/// Per CPU: [second of the current window, refused records emitted in it].
/// Only `sk_lookup` (softirq, which does not nest on a CPU) touches it.
#[map]
static REFUSED_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

// TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

const TCPHDR_FIN: u32 = 0x01;
const NSEC_PER_SEC: u64 = 1_000_000_000;
/// Bytes a record takes in the ring: the record and the ring's 8-byte header.
const RECORD_BYTES: u64 = core::mem::size_of::<FlowEvent>() as u64 + 8;

#[inline(always)]
fn emit(event: &FlowEvent) {
    // Waking the agent for every record would cost more than writing it: only
    // the record that fills the ring past a quarter wakes it; it also drains
    // on a timer.
    let pending = FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let threshold = FLOW_EVENTS.query(BPF_RB_RING_SIZE as u64) / 4;
    let wakeup = if pending < threshold && pending + RECORD_BYTES >= threshold {
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

/// A connection as `sk_lookup` sees its first packet. Addresses in network
/// byte order (IPv4 in `[0]`), ports in host byte order.
pub struct Tuple {
    pub family: u16,
    pub remote_ip: [u32; 4],
    pub local_ip: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
}

#[inline(always)]
pub fn lookup_tuple(ctx: &SkLookupContext) -> Tuple {
    let p = ctx.lookup;
    // SAFETY: context field loads, rewritten by the verifier.
    let (family, remote_port, local_port, r4, l4, r6, l6) = unsafe {
        (
            (*p).family as u16,
            // `remote_port` is a __be16 in the sk_lookup context, `local_port` host order.
            u16::from_be((*p).remote_port),
            (*p).local_port as u16,
            ctx_u32!(p, remote_ip4),
            ctx_u32!(p, local_ip4),
            ctx_ip6!(p, remote_ip6),
            ctx_ip6!(p, local_ip6),
        )
    };
    let (remote_ip, local_ip) = if family == AF_INET {
        ([r4, 0, 0, 0], [l4, 0, 0, 0])
    } else {
        (r6, l6)
    };
    Tuple {
        family,
        remote_ip,
        local_ip,
        remote_port,
        local_port,
    }
}

/// Called by `sk_lookup` when no live-store listener was registered. Always
/// counted (by the caller); recorded at most `REFUSED_RECORDS_PER_SEC` per CPU.
/// Not inlined: its record gets a stack frame of its own (see `try_slots`).
#[inline(never)]
pub fn refused(tuple: &Tuple, netns_cookie: u64, listen_port: u16) {
    let mut event = empty_event(EVENT_REFUSED);
    let second = event.ts_ns / NSEC_PER_SEC;
    let (Some(window), Some(used)) = (REFUSED_BUDGET.get_ptr_mut(0), REFUSED_BUDGET.get_ptr_mut(1))
    else {
        return;
    };
    // SAFETY: per-CPU slots, and softirqs (sk_lookup) do not nest on a CPU.
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
    event.family = tuple.family;
    event.remote_ip = tuple.remote_ip;
    event.local_ip = tuple.local_ip;
    event.remote_port = tuple.remote_port;
    event.local_port = tuple.local_port;
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

/// Turns on `flags` for the context's socket, keeping what other programs
/// (another tool's sock_ops) turned on.
#[inline(always)]
fn add_cb_flags(ctx: &SockOpsContext, flags: u32) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
}

pub fn on_sock_op(ctx: &SockOpsContext, op: u32) {
    match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => opened(ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(ctx),
        BPF_SOCK_OPS_RTT_CB => progressed(ctx),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => segment_received(ctx),
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
    let Some(listen_port) = full_sock(ctx).and_then(|sk| LISTEN_MARKS.of(sk)) else {
        // SAFETY: plain hash lookup, presence only.
        if unsafe { REDIRECTS.get(&NsPort::new(netns_cookie, local_port)) }.is_some() {
            count(Counter::FlowsUntracked);
        }
        return;
    };
    // Accepted on the listen port itself: a direct connection, not ours.
    if listen_port == local_port {
        return;
    }
    // SAFETY: helper reading the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = empty_event(EVENT_OPEN);
    let state = FlowState {
        start_ns: event.ts_ns,
        listen_port,
        flags: 0,
        fin_end: 0,
        reported_ns: event.ts_ns,
    };
    // An RTT sample comes with every ACK of new data: where a long-lived
    // flow's update records are written from (a flow that sends nothing has
    // nothing new to report).
    let rtt = if FLOW_UPDATE_NS.load() > 0 {
        BPF_SOCK_OPS_RTT_CB_FLAG
    } else {
        0
    };
    let quota = NS_QUOTAS.get_ptr_mut(&netns_cookie);
    // Checked, then added after the insert: a few CPUs at once may pass the
    // share by one each.
    let over = match (quota, FLOW_SHARE.get(0)) {
        // 0: not set yet (an agent starting): no limit.
        (Some(q), Some(&share)) if share > 0 => {
            // SAFETY: map value pointer, valid for this program run.
            unsafe { core::ptr::read_volatile(&(*q).flows) as i64 >= share as i64 }
        }
        _ => false,
    };
    if over {
        count(Counter::FlowQuotaExceeded);
    } else if FLOWS.insert(&socket_cookie, &state, BPF_ANY as u64).is_ok() {
        if let Some(q) = quota {
            // SAFETY: map value pointer, valid for this program run.
            atomic_add(unsafe { &mut (*q).flows }, 1);
        }
        // Only this socket pays for state callbacks.
        add_cb_flags(
            ctx,
            BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG | rtt,
        );
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

/// A segment arrived after the live-store sent its FIN (the parse callback is
/// only turned on from FIN_WAIT1, see `state_changed`): remember where the
/// peer's FIN ends, so the close can tell whether the kernel consumed it.
#[inline(always)]
fn segment_received(ctx: &SockOpsContext) {
    // SAFETY: context field load (valid for the parse callback).
    let (tcp_flags, skb_len) = unsafe { ((*ctx.ops).skb_tcp_flags, (*ctx.ops).skb_len) };
    if tcp_flags & TCPHDR_FIN == 0 {
        return;
    }
    // SAFETY: helper reading the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = FLOWS.get_ptr_mut(&socket_cookie) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    if state.flags & FLOW_FIN_SEEN != 0 {
        // A retransmitted FIN: the first one says where the stream ends.
        return;
    }
    // The TCP header is readable between skb_data and skb_data_end.
    // SAFETY: context field loads (64-bit packet pointers).
    let (data, data_end) = unsafe {
        (
            (*ctx.ops).__bindgen_anon_3.skb_data as usize,
            (*ctx.ops).__bindgen_anon_4.skb_data_end as usize,
        )
    };
    // Verifier: the bounds check must precede every packet read.
    if data + 20 > data_end {
        return;
    }
    // SAFETY: 20 bytes of TCP header checked above.
    let (seq, doff) = unsafe {
        (
            u32::from_be(core::ptr::read_unaligned((data + 4) as *const u32)),
            (*((data + 12) as *const u8) >> 4) as u32,
        )
    };
    let payload = skb_len.wrapping_sub(doff * 4);
    state.fin_end = seq.wrapping_add(payload).wrapping_add(1);
    state.flags |= FLOW_FIN_SEEN;
}

/// The flow's counters, duration and addresses, as of now, into `event`. The
/// kernel's byte counters follow sequence numbers, in which each FIN counts
/// one: `peer_fin`/`fin_acked` say which to take away.
#[inline(always)]
fn fill(
    ctx: &SockOpsContext,
    state: &FlowState,
    event: &mut FlowEvent,
    peer_fin: bool,
    fin_acked: bool,
) {
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
    event.bytes_received = bytes_received.saturating_sub(peer_fin as u64);
    event.bytes_sent = bytes_acked.saturating_sub(fin_acked as u64);
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
}

/// An ACK of new data on a tracked flow: an update record if the last
/// record is `FLOW_UPDATE_NS` old, so the counters of a connection that
/// lives for hours advance before its close.
#[inline(always)]
fn progressed(ctx: &SockOpsContext) {
    let every = FLOW_UPDATE_NS.load();
    // SAFETY: context field load, rewritten by the verifier.
    let state = unsafe { (*ctx.ops).state };
    // Once either side closes, the close record is near, and the kernel's
    // counters may include a FIN: no update.
    if every == 0 || state != TCP_ESTABLISHED {
        return;
    }
    // SAFETY: helper reading the context's socket.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(state) = FLOWS.get_ptr_mut(&socket_cookie) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let state = unsafe { &mut *state };
    let mut event = empty_event(EVENT_UPDATE);
    if event.ts_ns.saturating_sub(state.reported_ns) < every {
        return;
    }
    state.reported_ns = event.ts_ns;
    let peer_fin = state.flags & FLOW_PEER_FIN != 0;
    let fin_acked = state.flags & FLOW_FIN_ACKED != 0;
    fill(ctx, state, &mut event, peer_fin, fin_acked);
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
    // SAFETY: context field loads, rewritten by the verifier (full socket here).
    let (rcv_nxt, snd_una, snd_nxt) = unsafe {
        let ops = &*ctx.ops;
        (ops.rcv_nxt, ops.snd_una, ops.snd_nxt)
    };
    // The kernel's byte counters follow sequence numbers, so each FIN counts
    // one: remember which FINs happened to report payload bytes only.
    if new == TCP_FIN_WAIT1 {
        // The live-store closed (or half-closed) first. From FIN_WAIT2 the
        // socket closes the same way whether or not the peer's FIN came (a
        // FIN+ACK in one segment, or only the ACK of an orphan's FIN), so
        // watch the segments that arrive from now on for the peer's FIN.
        add_cb_flags(ctx, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
    }
    if new == TCP_CLOSE_WAIT || new == TCP_CLOSING {
        state.flags |= FLOW_PEER_FIN;
    }
    // Our FIN is acked when FIN_WAIT1 ends in FIN_WAIT2, or CLOSING/LAST_ACK
    // close with nothing left unacknowledged (not a reset or a timeout).
    if (old == TCP_FIN_WAIT1 && new == TCP_FIN_WAIT2)
        || ((old == TCP_CLOSING || old == TCP_LAST_ACK) && new == TCP_CLOSE && snd_una == snd_nxt)
    {
        state.flags |= FLOW_FIN_ACKED;
    }
    if new != TCP_CLOSE {
        return;
    }
    let peer_fin = state.flags & FLOW_PEER_FIN != 0
        || (state.flags & FLOW_FIN_SEEN != 0 && rcv_nxt == state.fin_end);
    let fin_acked = state.flags & FLOW_FIN_ACKED != 0;
    let mut event = empty_event(EVENT_CLOSE);
    event.end = match old {
        TCP_FIN_WAIT2 | TCP_TIME_WAIT => END_FIN,
        TCP_LAST_ACK | TCP_CLOSING if fin_acked => END_FIN,
        _ if state.flags & FLOW_RTO != 0 => END_ABORTED,
        _ => END_RST,
    };
    fill(ctx, state, &mut event, peer_fin, fin_acked);
    event.socket_cookie = socket_cookie;
    if FLOWS.remove(&socket_cookie).is_ok() {
        if let Some(q) = NS_QUOTAS.get_ptr_mut(&event.netns_cookie) {
            // SAFETY: map value pointer, valid for this program run.
            atomic_add(unsafe { &mut (*q).flows }, u64::MAX);
        }
    }
    count(Counter::FlowsClosed);
    add(Counter::BytesReceived, event.bytes_received);
    add(Counter::BytesSent, event.bytes_sent);
    emit(&event);
}
