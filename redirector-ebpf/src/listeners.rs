//! The live-store listeners: registered by `sock_ops` when they start
//! listening, handed connections by `sk_lookup`.
//!
//! `LISTENERS` is a socket hash with 8-byte values (aya-ebpf's `SockHash` has
//! 4-byte ones): only then can the agent read an entry back, as the socket's
//! cookie, and check it against what sock_diag reports.

use core::{cell::UnsafeCell, ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SOCKHASH, bpf_sock_ops, BPF_NOEXIST,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release,
        bpf_sock_hash_update,
    },
    macros::map,
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use redirector_common::{
    Bind, Counter, ListenerKey, RedirectTarget, AF_INET, AF_INET6, BIND_V4_ADDR, BIND_V4_ANY,
    BIND_V6_ADDR, BIND_V6_ANY, LISTENERS_PER_NETNS, LISTENER_SLOTS, MAX_LISTENERS,
};

use crate::{
    atomic_add, count,
    ctx::{ctx_ip6, ctx_u32},
    NS_QUOTAS,
};

const ENOENT: i64 = 2;
const EEXIST: i64 = 17;

#[repr(transparent)]
pub struct CookieSockHash(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read, by the loader; programs pass its address to helpers.
unsafe impl Sync for CookieSockHash {}

impl CookieSockHash {
    const fn with_max_entries(max_entries: u32) -> Self {
        Self(UnsafeCell::new(bpf_map_def {
            type_: BPF_MAP_TYPE_SOCKHASH,
            key_size: size_of::<ListenerKey>() as u32,
            value_size: size_of::<u64>() as u32,
            max_entries,
            map_flags: 0,
            id: 0,
            pinning: 0,
        }))
    }

    fn as_ptr(&self) -> *mut c_void {
        self.0.get().cast()
    }

    /// Adds the context's socket under `key` unless the key is taken.
    fn insert_new(&self, key: &ListenerKey, ops: *mut bpf_sock_ops) -> Result<(), i64> {
        let mut key = *key;
        // SAFETY: map and key pointers are valid for the call; `ops` is the context.
        let ret = unsafe {
            bpf_sock_hash_update(
                ops,
                self.as_ptr(),
                (&mut key as *mut ListenerKey).cast(),
                BPF_NOEXIST as u64,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(ret)
        }
    }

    /// Gives the connection being looked up to the socket under `key`.
    fn assign(&self, ctx: &SkLookupContext, key: &ListenerKey) -> Result<(), i64> {
        // SAFETY: map and key pointers are valid for the call.
        let sk = unsafe { bpf_map_lookup_elem(self.as_ptr(), (key as *const ListenerKey).cast()) };
        if sk.is_null() {
            return Err(-ENOENT);
        }
        // SAFETY: `sk` is the referenced socket the lookup returned; it is
        // released right after, as the verifier requires.
        let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, 0) };
        // SAFETY: as above.
        unsafe { bpf_sk_release(sk) };
        if ret == 0 {
            Ok(())
        } else {
            Err(ret)
        }
    }
}

#[map]
static LISTENERS: CookieSockHash = CookieSockHash::with_max_entries(MAX_LISTENERS);

/// What `sk_lookup` found for a connection to an advertised port.
pub enum Lookup {
    Assigned,
    /// No registered listener would have accepted the connection.
    NoListener,
    /// Listeners exist, but the kernel refused each (e.g. an IPv6-only socket
    /// for an IPv4 connection); the last error.
    Refused(i64),
}

/// Hands a connection for `listen_port` (in the namespace with `netns_cookie`,
/// arriving at `local_ip` of `family`) to a registered listener, preferring a
/// socket bound to that address over a wildcard one, as the kernel's own
/// lookup does. Only the bind kinds `target` says exist are looked up.
#[inline(always)]
pub fn assign(
    ctx: &SkLookupContext,
    netns_cookie: u64,
    target: &RedirectTarget,
    family: u16,
    local_ip: [u32; 4],
) -> Lookup {
    // An IPv4 connection can also go to a dual-stack IPv6 wildcard socket
    // (`[::]:9095`, what Go's `net.Listen("tcp", ":9095")` creates).
    // Constant indices only: a bounds check the compiler cannot drop leaves a
    // call to the panic handler, which the verifier rejects.
    let b = &target.binds;
    let candidates: [(u8, Bind); 3] = if family == AF_INET {
        [
            (b[BIND_V4_ADDR], Bind::v4(local_ip[0])),
            (b[BIND_V4_ANY], Bind::any(AF_INET)),
            (b[BIND_V6_ANY], Bind::any(AF_INET6)),
        ]
    } else {
        [
            (
                b[BIND_V6_ADDR],
                Bind {
                    family: AF_INET6,
                    addr: local_ip,
                },
            ),
            (b[BIND_V6_ANY], Bind::any(AF_INET6)),
            (0, Bind::any(AF_INET6)),
        ]
    };
    let mut result = Lookup::NoListener;
    for (present, bind) in candidates {
        if present == 0 {
            continue;
        }
        for slot in 0..LISTENER_SLOTS {
            let key = ListenerKey::new(netns_cookie, target.listen_port, bind, slot);
            match LISTENERS.assign(ctx, &key) {
                Ok(()) => return Lookup::Assigned,
                Err(e) if e == -ENOENT => {}
                // This socket will not take the connection: try the next kind.
                Err(e) => {
                    result = Lookup::Refused(e);
                    break;
                }
            }
        }
    }
    result
}

/// Called at `TCP_LISTEN_CB` for a socket that starts listening on a served
/// listen port: registers it in a free slot for its bound address and marks
/// that kind of bind in the redirect, so `sk_lookup` looks for it.
#[inline(always)]
pub fn register(ctx: &SockOpsContext, netns_cookie: u64, port: u16, target: *mut RedirectTarget) {
    let family = ctx.family() as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let Some(quota) = NS_QUOTAS.get_ptr_mut(&netns_cookie) else {
        return;
    };
    // Checked, then added after the insert: CPUs registering at the same
    // moment may pass the quota by one each, never by more.
    // SAFETY: map value pointer, valid for this program run.
    let held = unsafe { core::ptr::read_volatile(&(*quota).listeners) } as i64;
    if held >= LISTENERS_PER_NETNS as i64 {
        count(Counter::ListenerQuotaExceeded);
        return;
    }
    let p = ctx.ops;
    // SAFETY: context field loads, rewritten by the verifier. For a listener
    // these are its bound address.
    let bind = unsafe { Bind::of_socket(family, ctx_u32!(p, local_ip4), ctx_ip6!(p, local_ip6)) };
    // Marked before the insert, so the listener is looked for as soon as it is in.
    // SAFETY: valid map value pointer for this run; a one-byte store (`get_mut`:
    // no bounds-check panic path for the verifier to reject).
    if let Some(flag) = unsafe { (*target).binds.get_mut(bind.kind()) } {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(flag, 1) };
    }
    for slot in 0..LISTENER_SLOTS {
        let key = ListenerKey::new(netns_cookie, port, bind, slot);
        match LISTENERS.insert_new(&key, p) {
            Ok(()) => {
                // SAFETY: map value pointer, valid for this program run.
                atomic_add(unsafe { &mut (*quota).listeners }, 1);
                // Its state change out of LISTEN gives the unit back.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                count(Counter::ListenerRegistered);
                debug!(ctx, "registered listener on port {} (slot {})", port, slot);
                return;
            }
            Err(e) if e == -EEXIST => {}
            Err(e) => {
                // An MPTCP subflow (its ULP) or a full map: the agent's
                // reconcile pass reports which namespace and why.
                count(Counter::ListenerRegisterError);
                debug!(ctx, "cannot register listener on port {}: {}", port, e);
                return;
            }
        }
    }
    count(Counter::ListenerSlotsFull);
}

/// A registered listener stopped listening (closed, or shut down): its
/// namespace's quota unit is free again. The kernel has dropped (or will drop
/// at close) its `LISTENERS` entry itself.
#[inline(always)]
pub fn stopped(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(quota) = NS_QUOTAS.get_ptr_mut(&netns_cookie) {
        // SAFETY: map value pointer, valid for this program run.
        atomic_add(unsafe { &mut (*quota).listeners }, u64::MAX);
    }
}
