//! Kernel side of redirector.
//!
//! - `redir_lookup` (one instance per served network namespace, `sk_lookup`): when
//!   a new TCP connection arrives for an advertised port, hand it to the listener
//!   registered for the matching listen port in the same namespace.
//! - `redir_sockops` (cgroup v2 root, `sock_ops`): registers listeners on served
//!   listen ports, and writes the open and close record of every redirected flow.
//!
//! Both programs fail open: any miss or error leaves the kernel's own lookup in
//! charge, so nothing here can make a working port stop working.
#![no_std]
#![no_main]

mod flows;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_ANY, BPF_SOCK_OPS_TCP_LISTEN_CB},
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_lookup, sock_ops},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use redirector_common::{
    Counter, ListenerKey, NsPort, AF_INET, AF_INET6, COUNTER_COUNT, IPPROTO_TCP, MAX_LISTENERS,
    MAX_REDIRECTS,
};

/// Set per instance by the loader (see `GLOBAL_NETNS_COOKIE`).
#[no_mangle]
static NETNS_COOKIE: Global<u64> = Global::new(0);

#[map]
static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_LISTENERS, 0);

/// Advertised port -> listen port, per namespace.
#[map]
static REDIRECTS: HashMap<NsPort, u16> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

/// Listen port -> advertised port, per namespace: which listeners to register.
#[map]
static LISTEN_PORTS: HashMap<NsPort, u16> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[inline(always)]
fn count(counter: Counter) {
    add(counter, 1);
}

#[inline(always)]
fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
        unsafe { *slot += n };
    }
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
    let (protocol, family, local_port, selected) = unsafe {
        let l = &*ctx.lookup;
        (
            l.protocol,
            l.family,
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
    // SAFETY: plain hash lookup; the value is copied out at once.
    let Some(&listen_port) = (unsafe { REDIRECTS.get(&NsPort::new(netns_cookie, advertise_port)) })
    else {
        return;
    };
    let key = ListenerKey::new(netns_cookie, listen_port, family as u16);
    let result = match LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        // An IPv4 connection can also go to a dual-stack IPv6 listener (`[::]:port`,
        // what Go's `net.Listen("tcp", ":9095")` creates).
        Err(_) if family as u16 == AF_INET => LISTENERS.redirect_sk_lookup(
            ctx,
            ListenerKey::new(netns_cookie, listen_port, AF_INET6),
            0,
        ),
        other => other,
    };
    match result {
        Ok(()) => {
            count(Counter::Redirected);
            flows::redirected(ctx, netns_cookie, listen_port);
        }
        // aya-ebpf reports a missing key as -ENOENT.
        Err(-2) => {
            count(Counter::NoListener);
            debug!(
                ctx,
                "port {}: no live-store listener on {}, passing on", advertise_port, listen_port
            );
            flows::refused(ctx, netns_cookie, listen_port);
        }
        Err(err) => {
            count(Counter::AssignError);
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
        BPF_SOCK_OPS_TCP_LISTEN_CB => register_listener(&ctx),
        op => flows::on_sock_op(&ctx, op),
    }
    // Any other return value makes the kernel fail the socket operation.
    1
}

#[inline(always)]
fn register_listener(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // `local_port` is in host byte order in the sock_ops context.
    let port = ctx.local_port() as u16;
    // SAFETY: plain hash lookup, presence only.
    if unsafe { LISTEN_PORTS.get(&NsPort::new(netns_cookie, port)) }.is_none() {
        return;
    }
    let family = ctx.family() as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // SAFETY: `ops` is the context pointer the helper expects.
    let ops = unsafe { &mut *ctx.ops };
    match LISTENERS.update(
        ListenerKey::new(netns_cookie, port, family),
        ops,
        BPF_ANY as u64,
    ) {
        Ok(()) => {
            count(Counter::ListenerRegistered);
            debug!(
                ctx,
                "registered listener on port {} (family {})", port, family
            );
        }
        Err(err) => {
            count(Counter::ListenerRegisterError);
            debug!(ctx, "cannot register listener on port {}: {}", port, err);
        }
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program; required by no_std.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
