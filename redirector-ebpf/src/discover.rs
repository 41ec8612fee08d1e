//! `redir_bind4`/`redir_bind6` (cgroup `post_bind4`/`post_bind6`, on the
//! cgroup v2 root): tell the agent the moment a process binds a TCP socket to
//! a watched port, so a new live-store is served within milliseconds of its
//! bind() and listen() without the agent polling /proc or sock_diag.
//!
//! They run on an explicit bind() only: a client's connect() binds its port
//! without this hook, and no packet or connection ever runs them, so other
//! pods' traffic pays nothing. The agent registers the listener and attaches
//! `sock_ops` to its pod. (A tracing program on `inet_csk_listen_start` would
//! fire at listen() itself, but needs BPF trampolines, which some kernels and
//! sandboxes refuse; this hook works from Linux 5.10 wherever cgroup BPF does.)

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, map},
    maps::{HashMap, LruHashMap, RingBuf},
    programs::SockContext,
    EbpfContext,
};
use redirector_common::{
    Counter, ListenEvent, BIND_EVENTS_PER_SEC, IPPROTO_TCP, LISTEN_EVENTS_BYTES, LISTEN_EVENT_BIND,
    MAX_REDIRECTS,
};

use crate::count;

/// The listen ports the agent serves (value unused): only a bind() to one of
/// them wakes the agent.
#[map]
static WATCH_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map]
static LISTEN_EVENTS: RingBuf = RingBuf::with_byte_size(LISTEN_EVENTS_BYTES, 0);

/// Per network namespace: [the second, events reported in it]. LRU: a pod
/// that makes namespaces to evict others' entries only hands them a fresh
/// budget.
#[map]
static BIND_BUDGET: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(MAX_REDIRECTS, 0);

/// Whether namespace `netns_cookie` may report one more bind this second.
/// Not atomic: binds on several CPUs at once may pass the limit by a few.
#[inline(always)]
fn within_budget(netns_cookie: u64) -> bool {
    // SAFETY: helper without arguments.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    match BIND_BUDGET.get_ptr_mut(&netns_cookie) {
        Some(budget) => {
            // SAFETY: map value pointer, valid for this program run.
            let budget = unsafe { &mut *budget };
            if budget[0] != second {
                *budget = [second, 1];
                true
            } else if budget[1] < BIND_EVENTS_PER_SEC {
                budget[1] += 1;
                true
            } else {
                false
            }
        }
        None => {
            let _ = BIND_BUDGET.insert(&netns_cookie, &[second, 1], BPF_NOEXIST as u64);
            true
        }
    }
}

#[cgroup_sock(post_bind4)]
pub fn redir_bind4(ctx: SockContext) -> i32 {
    bound(&ctx);
    // 1 lets the bind() stand; 0 would fail it with EPERM.
    1
}

#[cgroup_sock(post_bind6)]
pub fn redir_bind6(ctx: SockContext) -> i32 {
    bound(&ctx);
    1
}

#[inline(always)]
fn bound(ctx: &SockContext) {
    // SAFETY: the verifier rewrites context field loads; `sock` is the valid ctx pointer.
    let (protocol, port, family) = unsafe {
        let s = &*ctx.sock;
        (s.protocol, s.src_port, s.family)
    };
    // `src_port` is in host byte order in `struct bpf_sock`.
    if protocol != IPPROTO_TCP || port > u16::MAX as u32 {
        return;
    }
    let port = port as u16;
    // SAFETY: plain hash lookup; nothing is kept.
    if unsafe { WATCH_PORTS.get(&port) }.is_none() {
        return;
    }
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    report(ListenEvent {
        netns_cookie,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        port,
        family: family as u16,
        kind: LISTEN_EVENT_BIND,
        _pad: [0; 7],
    });
}

/// Tells the agent about a bind, or a registered listener that stopped,
/// within its namespace's budget: a pod that binds or closes in a loop
/// spends its own budget, not the ring.
#[inline(always)]
pub fn report(event: ListenEvent) {
    if !within_budget(event.netns_cookie) {
        count(Counter::ListenEventsLimited);
        return;
    }
    if LISTEN_EVENTS.output::<ListenEvent>(&event, 0).is_err() {
        count(Counter::ListenEventsDropped);
    }
}
