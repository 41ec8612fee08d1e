//! Kernel side of redirector.
//!
//! - `redir_lookup` (one instance per served network namespace, `sk_lookup`): when
//!   a new TCP connection arrives for an advertised port, hand it to the listener
//!   registered for the matching listen port in the same namespace.
//! - `redir_sockops` (`sock_ops`, attached to each served live-store's pod
//!   cgroup): registers listeners on served listen ports, and writes the open
//!   and close record of every redirected flow.
//! - `redir_bind4`/`redir_bind6` (cgroup `post_bind4`/`post_bind6`): report a
//!   bind() to a watched port to the agent, which serves the new live-store.
//!
//! Every program fails open: any miss or error leaves the kernel's own lookup
//! in charge (the bind hooks only report, and always allow the bind), so nothing
//! here can make a working port stop working.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core offers no `AtomicU64::fetch_add`;
// the intrinsic lowers to the BPF atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod ctx;
mod discover;
mod flows;
mod listeners;

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_LISTEN_CB},
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_lookup, sock_ops},
    maps::{HashMap, PerCpuArray},
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use redirector_common::{
    Counter, MptcpWas, NsPort, NsQuota, RedirectTarget, COUNTER_COUNT, IPPROTO_TCP, MAX_REDIRECTS,
};

/// Set per instance by the loader (see `GLOBAL_NETNS_COOKIE`).
#[no_mangle]
static NETNS_COOKIE: Global<u64> = Global::new(0);

/// Advertised port -> listen port and the kinds of listener bound on it, per
/// namespace.
#[map]
pub(crate) static REDIRECTS: HashMap<NsPort, RedirectTarget> =
    HashMap::with_max_entries(MAX_REDIRECTS, 0);

/// Listen port -> advertised port, per namespace: which listeners to register.
#[map]
static LISTEN_PORTS: HashMap<NsPort, u16> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// What each served namespace holds of the node-wide maps (see `NsQuota`);
/// an entry exists exactly while the agent serves the namespace.
#[map]
pub(crate) static NS_QUOTAS: HashMap<u64, NsQuota> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

/// `net.mptcp.enabled` before the agent turned it off, per namespace. No
/// program uses it: it is here to be pinned with the other maps, so the
/// setting outlives the agent that changed it (see `MAP_MPTCP_WAS`).
#[map]
static MPTCP_WAS: HashMap<u64, MptcpWas> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

/// `TCP_LISTEN` in the kernel's `enum tcp_state`.
const TCP_LISTEN: u32 = 10;

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    add(counter, 1);
}

#[inline(always)]
fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Atomic although per CPU: sock_ops also runs in process context (listen,
        // close), where a softirq on the same CPU can interrupt a plain
        // read-modify-write.
        atomic_add(slot, n);
    }
}

/// Adds `n` (wrapping: `u64::MAX` takes one away) to a map value shared by
/// CPUs. The result is unused, so this is one BPF atomic add (no fetch
/// variant, which older kernels lack).
#[inline(always)]
pub(crate) fn atomic_add(value: *mut u64, n: u64) {
    // SAFETY: callers pass a valid, aligned u64 map value for this program run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(value, n) };
}

#[sk_lookup]
pub fn redir_lookup(ctx: SkLookupContext) -> u32 {
    // SK_PASS on every path: with a socket assigned it receives the connection,
    // without one the regular lookup runs (fail-open).
    redirect(&ctx);
    SK_PASS
}

#[inline(always)]
fn redirect(ctx: &SkLookupContext) {
    // SAFETY: the verifier rewrites context field loads; `lookup` is the valid ctx pointer.
    let (protocol, local_port, selected) = unsafe {
        let l = &*ctx.lookup;
        (
            l.protocol,
            l.local_port,
            l.__bindgen_anon_1.__bindgen_anon_1.sk,
        )
    };
    // `local_port` is in host byte order in the sk_lookup context. A socket
    // already chosen by a program that ran before ours (another tool's, or the
    // previous build's during an upgrade) is left alone.
    if protocol != IPPROTO_TCP || local_port > u16::MAX as u32 || !selected.is_null() {
        return;
    }
    let netns_cookie = NETNS_COOKIE.load();
    let advertise_port = local_port as u16;
    let Some(target) = REDIRECTS.get_ptr_mut(&NsPort::new(netns_cookie, advertise_port)) else {
        return;
    };
    // SAFETY: map value pointer, valid for this program run.
    let listen_port = unsafe { (*target).listen_port };
    let tuple = flows::lookup_tuple(ctx);
    match listeners::assign(
        ctx.lookup,
        netns_cookie,
        target,
        tuple.family,
        &tuple.local_ip,
    ) {
        // Counted only: whether a handshake follows is decided at
        // PASSIVE_ESTABLISHED (flows.rs), so stray segments leave nothing.
        listeners::ASSIGNED => count(Counter::Redirected),
        listeners::ASSIGNED_PAST_STOPPED => {
            count(Counter::Redirected);
            listeners::stopped_seen(netns_cookie, listen_port, tuple.family);
        }
        listeners::NO_LISTENER => {
            count(Counter::NoListener);
            debug!(
                ctx,
                "port {}: no live-store listener on {}, passing on", advertise_port, listen_port
            );
            flows::refused(&tuple, netns_cookie, listen_port);
        }
        err => {
            count(Counter::AssignError);
            if err == listeners::NOT_LISTENING {
                listeners::stopped_seen(netns_cookie, listen_port, tuple.family);
            }
            debug!(
                ctx,
                "port {}: bpf_sk_assign failed ({}), passing on", advertise_port, err
            );
        }
    }
}

#[sock_ops]
pub fn redir_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_LISTEN_CB => listening(&ctx),
        // Only registered listeners ask for state callbacks as listeners.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_LISTEN => listeners::stopped(&ctx),
        op => flows::on_sock_op(&ctx, op),
    }
    // Any other return value makes the kernel fail the socket operation.
    1
}

#[inline(always)]
fn listening(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // `local_port` is in host byte order in the sock_ops context.
    let port = ctx.local_port() as u16;
    // SAFETY: plain hash lookup; the value is copied out at once.
    let Some(&advertise_port) = (unsafe { LISTEN_PORTS.get(&NsPort::new(netns_cookie, port)) })
    else {
        return;
    };
    let Some(target) = REDIRECTS.get_ptr_mut(&NsPort::new(netns_cookie, advertise_port)) else {
        return;
    };
    listeners::register(ctx, netns_cookie, port, target);
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; required by no_std.
    loop {}
}

/// The kernel object's license: GPL-compatible, as sk_assign and the socket
/// map helpers require; the programs themselves are MIT or GPL-2.0.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
