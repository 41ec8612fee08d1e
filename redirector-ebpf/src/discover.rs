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
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie},
    macros::{cgroup_sock, map},
    maps::{HashMap, RingBuf},
    programs::SockContext,
    EbpfContext,
};
use redirector_common::{Counter, ListenEvent, IPPROTO_TCP, LISTEN_EVENTS_BYTES, MAX_REDIRECTS};

use crate::count;

/// The listen ports the agent serves (value unused): only a bind() to one of
/// them wakes the agent.
#[map]
static WATCH_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map]
static LISTEN_EVENTS: RingBuf = RingBuf::with_byte_size(LISTEN_EVENTS_BYTES, 0);

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
    let event = ListenEvent {
        // SAFETY: the helper only reads the namespace of the context's socket.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        port,
        family: family as u16,
    };
    if LISTEN_EVENTS.output::<ListenEvent>(&event, 0).is_err() {
        count(Counter::ListenEventsDropped);
    }
}
