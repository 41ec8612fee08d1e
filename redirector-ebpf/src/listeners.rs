//! The live-store listeners: registered by `sock_ops` when they start
//! listening, handed connections by `sk_lookup`.
//!
//! `LISTENERS` is a socket hash with 8-byte values (aya-ebpf's `SockHash` has
//! 4-byte ones): only then can the agent read an entry back, as the socket's
//! cookie, and check it against what sock_diag reports.

use core::{cell::UnsafeCell, ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        bpf_map_def,
        bpf_map_type::{BPF_MAP_TYPE_SK_STORAGE, BPF_MAP_TYPE_SOCKHASH},
        bpf_sk_lookup, bpf_sock, bpf_sock_ops, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_NOEXIST,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release,
        bpf_sk_storage_get, bpf_sock_hash_update,
    },
    macros::{btf_map, map},
    programs::SockOpsContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use redirector_common::{
    Bind, Counter, ListenEvent, ListenerKey, RedirectTarget, AF_INET, AF_INET6, BIND_V4_ADDR,
    BIND_V4_ANY, BIND_V6_ADDR, BIND_V6_ANY, LISTENERS_PER_NETNS, LISTENER_SLOTS,
    LISTEN_EVENT_STOPPED, MAX_LISTENERS,
};

use crate::{
    atomic_add, count,
    ctx::{ctx_ip6, ctx_u32},
    discover::report,
    NS_QUOTAS,
};

const ENOENT: i64 = 2;
const EEXIST: i64 = 17;
/// What `bpf_sk_assign` returns for a TCP socket that is not listening.
const ESOCKTNOSUPPORT: i64 = 94;

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

    /// Gives the connection being looked up (`ctx`) to the socket under `key`.
    fn assign(&self, ctx: *mut bpf_sk_lookup, key: &ListenerKey) -> Result<(), i64> {
        // SAFETY: map and key pointers are valid for the call.
        let sk = unsafe { bpf_map_lookup_elem(self.as_ptr(), (key as *const ListenerKey).cast()) };
        if sk.is_null() {
            return Err(-ENOENT);
        }
        // SAFETY: `sk` is the referenced socket the lookup returned; it is
        // released right after, as the verifier requires.
        let ret = unsafe { bpf_sk_assign(ctx.cast(), sk, 0) };
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

/// `BPF_MAP_TYPE_SK_STORAGE` definition in the BTF form (`.maps` section),
/// the only form the kernel takes for socket storage (it needs the key and
/// value types). Written out because aya-ebpf's `SkStorage` cannot ask for
/// `BPF_F_CLONE`, and works on `sock_addr` contexts only.
#[repr(C)]
pub struct ListenMarks {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const u32,
    max_entries: *const [i32; 0],
    // BPF_F_CLONE: a listener's storage is copied into every socket it
    // accepts (sk_clone_lock), where `sock_ops` finds it at
    // PASSIVE_ESTABLISHED. Socket storage must not be preallocated.
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholders the loader reads from BTF; never dereferenced.
unsafe impl Sync for ListenMarks {}

impl ListenMarks {
    fn as_ptr(&self) -> *mut c_void {
        (self as *const Self).cast_mut().cast()
    }

    /// Marks listener `sk` as a listener on `port` of a served namespace.
    #[inline(always)]
    fn mark(&self, sk: *mut bpf_sock, port: u16) {
        // SAFETY: `sk` is the context's full socket, checked non-null.
        let v = unsafe {
            bpf_sk_storage_get(
                self.as_ptr(),
                sk.cast(),
                core::ptr::null_mut(),
                BPF_SK_STORAGE_GET_F_CREATE as u64,
            )
        } as *mut u32;
        if !v.is_null() {
            // SAFETY: storage value pointer, valid for this program run.
            unsafe { core::ptr::write_volatile(v, port as u32) };
        }
    }

    /// The listen port an accepted socket's listener was marked with.
    #[inline(always)]
    pub fn of(&self, sk: *mut bpf_sock) -> Option<u16> {
        // SAFETY: as above; no F_CREATE: a lookup only.
        let v = unsafe { bpf_sk_storage_get(self.as_ptr(), sk.cast(), core::ptr::null_mut(), 0) }
            as *const u32;
        // SAFETY: storage value pointer, valid for this program run.
        (!v.is_null()).then(|| unsafe { core::ptr::read_volatile(v) } as u16)
    }
}

#[btf_map]
pub(crate) static LISTEN_MARKS: ListenMarks = ListenMarks {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The context's full socket (listener or accepted socket), if it has one.
#[inline(always)]
pub fn full_sock(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    // SAFETY: a context field load the verifier rewrites (PTR_TO_SOCKET_OR_NULL).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    (!sk.is_null()).then_some(sk)
}

/// What `assign` found for a connection to an advertised port: `ASSIGNED`;
/// `-ENOENT`: no registered listener would have accepted it; else the last
/// refusal of the kernel, for listeners that exist (an IPv6-only socket for an
/// IPv4 connection, a listener shut down in place).
pub const NO_LISTENER: i64 = -ENOENT;

/// Not a bind kind: the unused third candidate of an IPv6 connection.
const NO_KIND: usize = 4;

/// Hands a connection for the target's listen port (in the namespace with
/// `netns_cookie`, arriving at `local_ip` of `family`) to a registered
/// listener, preferring a socket bound to that address over a wildcard one,
/// as the kernel's own lookup does.
///
/// The target's bind kinds say where to look first. They are a hint, never
/// the truth: the agent's reconcile pass writes the whole value while
/// `sock_ops` stores a byte into it, so a kind can be lost. A connection the
/// marked kinds cannot take is looked for under the others, and the kind
/// that takes it is marked again (one byte store, as `sock_ops` does).
///
/// Not inlined, nor are `try_slots`, `stopped_seen` and `flows::refused`:
/// the verifier allows 512 bytes of stack for the deepest chain of calls,
/// each frame rounded up to 32 (Linux 6.1 refused 544 when they were one).
#[inline(never)]
pub fn assign(
    ctx: *mut bpf_sk_lookup,
    netns_cookie: u64,
    target: *mut RedirectTarget,
    family: u16,
    local_ip: &[u32; 4],
) -> i64 {
    // SAFETY: map value pointer, valid for this program run.
    let (listen_port, binds) = unsafe { ((*target).listen_port, (*target).binds) };
    // An IPv4 connection can also go to a dual-stack IPv6 wildcard socket
    // (`[::]:9095`, what Go's `net.Listen("tcp", ":9095")` creates).
    let candidates: [(usize, Bind); 3] = if family == AF_INET {
        [
            (BIND_V4_ADDR, Bind::v4(local_ip[0])),
            (BIND_V4_ANY, Bind::any(AF_INET)),
            (BIND_V6_ANY, Bind::any(AF_INET6)),
        ]
    } else {
        [
            (
                BIND_V6_ADDR,
                Bind {
                    family: AF_INET6,
                    addr: *local_ip,
                },
            ),
            (BIND_V6_ANY, Bind::any(AF_INET6)),
            (NO_KIND, Bind::any(AF_INET6)),
        ]
    };
    let mut result = NO_LISTENER;
    for marked_pass in [true, false] {
        for (kind, bind) in candidates {
            // `get`: no bounds-check panic path for the verifier to reject.
            let Some(&mark) = binds.get(kind) else {
                continue;
            };
            if (mark != 0) != marked_pass {
                continue;
            }
            let ret = try_slots(ctx, netns_cookie, listen_port, &bind);
            if ret == ASSIGNED || ret == ASSIGNED_PAST_STOPPED {
                if !marked_pass {
                    // SAFETY: map value pointer, valid for this run.
                    if let Some(flag) = unsafe { (*target).binds.get_mut(kind) } {
                        // SAFETY: as above; a one-byte store.
                        unsafe { core::ptr::write_volatile(flag, 1) };
                    }
                }
                return ret;
            }
            if ret != -ENOENT {
                result = ret;
            }
        }
    }
    result
}

/// The connection went to a listener...
pub const ASSIGNED: i64 = 0;
/// ...after passing one that no longer listens (shut down in place: the
/// kernel keeps its entry; one registered by the agent has no state callback
/// to say so): the caller tells the agent (`stopped_seen`), which removes it.
pub const ASSIGNED_PAST_STOPPED: i64 = 1;
/// What `bpf_sk_assign` returns for a TCP socket that is not listening:
/// the caller tells the agent too.
pub const NOT_LISTENING: i64 = -ESOCKTNOSUPPORT;

/// Offers the connection to each slot of `key`'s bind (its slot ignored):
/// `ASSIGNED` or `ASSIGNED_PAST_STOPPED`, else -ENOENT if no slot holds a
/// listener, else the last refusal (-ESOCKTNOSUPPORT first: a listener that
/// stopped). Every slot is tried: a member that refuses (shut down, IPv6-only
/// for an IPv4 client) must not hide the members after it.
///
/// Not inlined: its own stack frame. Inlined into every kind of both passes,
/// the unrolled keys took `redir_lookup` past the verifier's 512-byte stack
/// (Linux 6.1: "combined stack size of 2 calls is 544").
#[inline(never)]
fn try_slots(ctx: *mut bpf_sk_lookup, netns_cookie: u64, listen_port: u16, bind: &Bind) -> i64 {
    let mut key = ListenerKey::new(netns_cookie, listen_port, *bind, 0);
    let mut ret = -ENOENT;
    for slot in 0..LISTENER_SLOTS {
        key.slot = slot;
        match LISTENERS.assign(ctx, &key) {
            Ok(()) if ret == -ESOCKTNOSUPPORT => return ASSIGNED_PAST_STOPPED,
            Ok(()) => return ASSIGNED,
            Err(e) if e == -ENOENT => {}
            Err(e) if ret != -ESOCKTNOSUPPORT => ret = e,
            Err(_) => {}
        }
    }
    ret
}

/// Called at `TCP_LISTEN_CB` for a socket that starts listening on a served
/// listen port: marks it (every one, registered or not: a SO_REUSEPORT member
/// beyond the slots still accepts redirected connections through its group),
/// registers it in a free slot for its bound address and marks that kind of
/// bind in the redirect, so `sk_lookup` looks for it.
#[inline(always)]
pub fn register(ctx: &SockOpsContext, netns_cookie: u64, port: u16, target: *mut RedirectTarget) {
    let family = ctx.family() as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // Before the insert: its first accepted socket already carries the mark.
    if let Some(sk) = full_sock(ctx) {
        LISTEN_MARKS.mark(sk, port);
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
/// namespace's quota unit is free again. The kernel drops its `LISTENERS`
/// entry at close, but a listener shut down in place (`shutdown(SHUT_RD)`,
/// how HAProxy pauses) keeps it, refusing every connection; and members of
/// its SO_REUSEPORT group beyond the slots are still unregistered. The agent
/// is told at once, and the count tells its resync if the event was lost.
#[inline(always)]
pub fn stopped(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the namespace of the context's socket.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(quota) = NS_QUOTAS.get_ptr_mut(&netns_cookie) {
        // SAFETY: map value pointer, valid for this program run.
        atomic_add(unsafe { &mut (*quota).listeners }, u64::MAX);
    }
    // `local_port` is in host byte order in the sock_ops context.
    stopped_seen(netns_cookie, ctx.local_port() as u16, ctx.family() as u16);
}

/// Counts a registered listener that stopped listening in its namespace's
/// `NsQuota::stopped` and tells the agent (within the namespace's budget).
/// Not inlined: its event gets a stack frame of its own, not a share of
/// `redir_lookup`'s (the verifier's 512 bytes are for the deepest chain).
#[inline(never)]
pub fn stopped_seen(netns_cookie: u64, port: u16, family: u16) {
    if let Some(quota) = NS_QUOTAS.get_ptr_mut(&netns_cookie) {
        // SAFETY: map value pointer, valid for this program run.
        atomic_add(unsafe { &mut (*quota).stopped }, 1);
    }
    report(ListenEvent {
        netns_cookie,
        cgroup_id: 0,
        tgid: 0,
        port,
        family,
        kind: LISTEN_EVENT_STOPPED,
        _pad: [0; 7],
    });
}
