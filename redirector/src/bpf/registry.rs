//! Keeps `LISTENERS` in step with the live-store listeners the kernel reports.
//!
//! `sock_ops` registers a listener the moment it starts listening. What it
//! cannot do is left to this reconcile pass, run when a namespace starts being
//! served, when a listen event names it, and at each resync: listeners that
//! existed before the agent, or whose pod had no `sock_ops` yet, a
//! registration that failed or was deleted, and the report of listeners that
//! cannot be served at all (an MPTCP socket, an owner we may not copy from).
//!
//! A missing listener is copied out of its process (`pidfd_getfd`), checked to
//! be the socket sock_diag reported, inserted only into a free slot (never over
//! a newer registration `sock_ops` made meanwhile), and the copy is closed at
//! once: the agent never keeps a live-store's port bound after it closed it.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

/// Listeners this process registered itself (copied out of their owner): the
/// agent's share of the `listener_registered` count, next to the kernel's.
static REGISTERED_BY_AGENT: AtomicU64 = AtomicU64::new(0);

pub fn registered_by_agent() -> u64 {
    REGISTERED_BY_AGENT.load(Ordering::Relaxed)
}

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use redirector_common::{
    Bind, ListenerKey, NsPort, RedirectTarget, LISTENERS_PER_NETNS, LISTENER_SLOTS,
};
use serde::Serialize;

use crate::{bpf::Redirect, sys, sys::netns::Netns, sys::owners, sys::sockdiag};

/// Why a live-store listener is not registered. The label is the `reason` of
/// the `listeners_unservable` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An MPTCP socket: its TCP subflow carries a ULP that socket maps refuse.
    Mptcp,
    /// No process we can see holds the socket (the agent lacks hostPID).
    NoOwner,
    /// `pidfd_getfd` was refused (ptrace access: Yama, an LSM, or no CAP_SYS_PTRACE).
    CopyDenied,
    /// The kernel refused the socket map insert (map full, out of memory).
    RegisterFailed,
    /// Registrable, but nothing registered it: no agent is running (seen by
    /// `redirector status`), or the agent's next pass will.
    NotRegistered,
    /// Its namespace already holds `LISTENERS_PER_NETNS` registrations.
    Quota,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Mptcp,
        Reason::NoOwner,
        Reason::CopyDenied,
        Reason::RegisterFailed,
        Reason::NotRegistered,
        Reason::Quota,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Mptcp => "mptcp",
            Reason::NoOwner => "no_owner",
            Reason::CopyDenied => "copy_denied",
            Reason::RegisterFailed => "register_failed",
            Reason::NotRegistered => "not_registered",
            Reason::Quota => "quota",
        }
    }

    /// What the operator can do about it.
    pub fn fix(self) -> &'static str {
        match self {
            Reason::Mptcp => {
                "the live-store listens with MPTCP (Go >= 1.24 does by default); restart it: \
                 the agent turned MPTCP off in its namespace, so it will listen with plain TCP \
                 (or set GODEBUG=multipathtcp=0 in its environment)"
            }
            Reason::NoOwner => {
                "no visible process holds the socket: run the agent with hostPID: true, or \
                 restart the live-store so sock_ops registers it"
            }
            Reason::CopyDenied => {
                "copying the socket was refused: grant CAP_SYS_PTRACE, check Yama \
                 (kernel.yama.ptrace_scope <= 2) and LSM policy, or restart the live-store"
            }
            Reason::RegisterFailed => {
                "the kernel refused the socket map insert: see the detail; restart the \
                 live-store once the cause is gone"
            }
            Reason::NotRegistered => {
                "start the agent (redirector run --pin ...), which registers it within a second"
            }
            Reason::Quota => {
                "its namespace already has the most listeners one namespace may register \
                 (a live-store needs a few): close the others, or serve fewer addresses"
            }
        }
    }

    /// Whether trying again without the listener changing can help: a
    /// socket's protocol, its owner's visibility and ptrace access do not
    /// change, so those are not copied again every pass (a /proc walk each).
    fn permanent(self) -> bool {
        matches!(self, Reason::Mptcp | Reason::NoOwner | Reason::CopyDenied)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A live-store listener that is not registered, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unservable {
    pub port: u16,
    pub address: IpAddr,
    pub inode: u64,
    pub pid: Option<i32>,
    pub reason: Reason,
    pub detail: String,
}

impl fmt::Display for Unservable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = std::net::SocketAddr::new(self.address, self.port);
        write!(f, "listener {addr} (socket inode {}", self.inode)?;
        if let Some(pid) = self.pid {
            write!(f, ", pid {pid}")?;
        }
        write!(f, ") not registered: {}", self.reason)?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        write!(f, "; fix: {}", self.reason.fix())
    }
}

/// One reconcile pass over a namespace.
#[derive(Debug, Default)]
pub struct Report {
    /// Inodes of the listening sockets on the listen ports (sorted).
    pub inodes: Vec<u64>,
    /// Listeners registered now (by sock_ops or by this pass).
    pub registered: usize,
    /// What this pass registered, and stale entries it removed.
    pub repaired: Vec<String>,
    pub unservable: Vec<Unservable>,
}

enum Outcome {
    Inserted(u16),
    /// Every slot for its address is taken by other members of its
    /// SO_REUSEPORT group, through which `bpf_sk_assign` reaches it.
    ThroughGroup,
    /// The copied fd is no longer that socket (the number was reused).
    Changed,
    /// Checked and registrable, but this pass only looks.
    WouldRegister,
}

/// The entries of `LISTENERS` at one moment: key -> socket cookie.
pub struct Snapshot(Vec<(ListenerKey, u64)>);

impl Snapshot {
    pub fn in_netns(&self, cookie: u64) -> impl Iterator<Item = &(ListenerKey, u64)> {
        self.0.iter().filter(move |(k, _)| k.netns_cookie == cookie)
    }
}

pub struct Registry {
    listeners: MapData,
    /// `LISTEN_MARKS`, for a registry that registers (not `status`'s).
    marks: Option<MapData>,
    redirects: BpfHashMap<MapData, NsPort, RedirectTarget>,
    /// Listeners that cannot be registered for a reason that lasts as long as
    /// the socket, by (netns cookie, inode): not looked at again every pass.
    permanent: HashMap<(u64, u64), Unservable>,
    /// Per namespace, the registrations the last pass left (key, socket
    /// cookie): read back by the next pass, so a pass over one namespace
    /// never lists the whole map, and compared by the resync's cheap check.
    last: HashMap<u64, Vec<(ListenerKey, u64)>>,
}

impl Registry {
    pub fn new(listeners: MapData, redirects: MapData) -> Result<Self> {
        Ok(Self {
            listeners,
            marks: None,
            redirects: BpfHashMap::try_from(aya::maps::Map::HashMap(redirects))
                .context("REDIRECTS map")?,
            permanent: HashMap::new(),
            last: HashMap::new(),
        })
    }

    /// Marks every listener it copies in `LISTEN_MARKS` (see `register`).
    pub fn with_marks(mut self, marks: MapData) -> Self {
        self.marks = Some(marks);
        self
    }

    /// Reads every entry of `LISTENERS` once (`redirector status`).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let fd = self.listeners.fd().as_fd();
        let keys: Vec<ListenerKey> = sys::map_keys(fd).context("listing LISTENERS")?;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            // Entries vanish while we read (a listener closed): skip them.
            if let Ok(Some(cookie)) = sys::map_lookup(fd, &key) {
                entries.push((key, cookie));
            }
        }
        Ok(Snapshot(entries))
    }

    /// The entries of namespace `cookie` that `found` listeners or the last
    /// pass could be using: a few lookups per listener, whatever the number
    /// of namespaces.
    fn entries(&self, cookie: u64, found: &[sockdiag::Listening]) -> Snapshot {
        let fd = self.listeners.fd().as_fd();
        let mut keys: HashSet<ListenerKey> = self
            .last
            .get(&cookie)
            .map(|l| l.iter().map(|(k, _)| *k).collect())
            .unwrap_or_default();
        for l in found {
            for slot in 0..LISTENER_SLOTS {
                keys.insert(ListenerKey::new(cookie, l.port, bind_of(l.addr), slot));
            }
        }
        Snapshot(
            keys.into_iter()
                .filter_map(|k| sys::map_lookup(fd, &k).ok().flatten().map(|c| (k, c)))
                .collect(),
        )
    }

    /// Whether namespace `cookie`'s entries are the ones the last pass left:
    /// each still holds the same socket (a closed listener's entry is gone, a
    /// deleted one too).
    pub fn unchanged(&self, cookie: u64) -> bool {
        let Some(known) = self.last.get(&cookie) else {
            return false;
        };
        let fd = self.listeners.fd().as_fd();
        !known.is_empty()
            && known
                .iter()
                .all(|(k, c)| sys::map_lookup(fd, k).ok().flatten() == Some(*c))
    }

    /// Compares the listeners sock_diag reported in `netns` (`found`, on the
    /// redirects' listen ports) with the registered ones, and says why each
    /// missing one is missing; with `repair`, registers what it can and
    /// removes what is stale (without, it changes nothing: `redirector status`).
    pub fn reconcile(
        &mut self,
        netns: &Netns,
        redirects: &[Redirect],
        found: &[sockdiag::Listening],
        hint: &[i32],
        repair: bool,
    ) -> Result<Report> {
        let ports: Vec<u16> = redirects.iter().map(|r| r.listen_port).collect();
        let snapshot = self.entries(netns.cookie, found);
        let mut report = Report::default();
        let mut registered: HashSet<u64> = HashSet::new();
        let mut taken: HashSet<ListenerKey> = HashSet::new();
        let found_cookies: HashSet<u64> = found.iter().map(|l| l.cookie).collect();
        let mut unlisted: Vec<(ListenerKey, u64)> = Vec::new();
        for (key, cookie) in snapshot.in_netns(netns.cookie) {
            taken.insert(*key);
            if found_cookies.contains(cookie) && ports.contains(&key.port) {
                registered.insert(*cookie);
            } else {
                unlisted.push((*key, *cookie));
            }
        }
        if repair && !unlisted.is_empty() {
            for key in self.remove_stale(netns, &ports, &unlisted, &mut report) {
                taken.remove(&key);
            }
        }
        let missing: Vec<&sockdiag::Listening> = found
            .iter()
            .filter(|l| !registered.contains(&l.cookie))
            .collect();
        let cookie = netns.cookie;
        self.permanent
            .retain(|(c, inode), _| *c != cookie || found.iter().any(|l| l.inode == *inode));
        // A namespace's share of the node-wide map: what sock_ops enforces in
        // the kernel, the same here. Over it, one report stands for all.
        let room = (LISTENERS_PER_NETNS as usize).saturating_sub(taken.len());
        let missing = if repair && missing.len() > room {
            let over = &missing[room];
            report.unservable.push(Unservable {
                port: over.port,
                address: over.addr,
                inode: over.inode,
                pid: None,
                reason: Reason::Quota,
                detail: format!(
                    "{} listeners over the quota of {LISTENERS_PER_NETNS}",
                    missing.len() - room
                ),
            });
            missing[..room].to_vec()
        } else {
            missing
        };
        if !missing.is_empty() {
            let owners = owners::socket_owners(
                missing
                    .iter()
                    .filter(|l| !self.permanent.contains_key(&(cookie, l.inode)))
                    .map(|l| l.inode)
                    .collect(),
                hint,
            );
            for l in missing {
                if let Some(known) = self.permanent.get(&(cookie, l.inode)) {
                    report.unservable.push(known.clone());
                    continue;
                }
                let owner = owners.get(&l.inode).copied();
                let unservable = |reason, detail| Unservable {
                    port: l.port,
                    address: l.addr,
                    inode: l.inode,
                    pid: owner.map(|(pid, _)| pid),
                    reason,
                    detail,
                };
                match self.register(netns.cookie, l, owner, &mut taken, repair) {
                    Ok(Outcome::Inserted(slot)) => {
                        registered.insert(l.cookie);
                        report.repaired.push(format!(
                            "registered listener {} (socket inode {}, pid {}, slot {slot})",
                            std::net::SocketAddr::new(l.addr, l.port),
                            l.inode,
                            owner.map_or(0, |(pid, _)| pid)
                        ));
                    }
                    // Served through its SO_REUSEPORT group's registered members.
                    Ok(Outcome::ThroughGroup) => {
                        registered.insert(l.cookie);
                    }
                    // Not the socket we were told about any more: next pass.
                    Ok(Outcome::Changed) => {}
                    Ok(Outcome::WouldRegister) => report
                        .unservable
                        .push(unservable(Reason::NotRegistered, String::new())),
                    Err((reason, detail)) => {
                        let u = unservable(reason, detail);
                        if reason.permanent() {
                            self.permanent.insert((cookie, l.inode), u.clone());
                        }
                        report.unservable.push(u);
                    }
                }
            }
        }
        report.registered = registered.len();
        report.inodes = found.iter().map(|l| l.inode).collect();
        report.inodes.sort_unstable();
        if repair {
            self.mark_binds(netns.cookie, redirects, &taken);
            let fd = self.listeners.fd().as_fd();
            let last = taken
                .iter()
                .filter_map(|k| sys::map_lookup(fd, k).ok().flatten().map(|c| (*k, c)))
                .collect();
            self.last.insert(netns.cookie, last);
        }
        Ok(report)
    }

    /// Removes the `unlisted` entries (in the map, not in `found`) whose
    /// socket does not listen: one shut down in place, which the kernel keeps
    /// in the map and `bpf_sk_assign` refuses, or a listen port no longer
    /// served. `found` was listed before the map was read, so a listener that
    /// started in between is in the map but not in `found`: sock_diag is asked
    /// again, now, and what it lists as listening stays.
    fn remove_stale(
        &mut self,
        netns: &Netns,
        ports: &[u16],
        unlisted: &[(ListenerKey, u64)],
        report: &mut Report,
    ) -> Vec<ListenerKey> {
        let mut removed = Vec::new();
        let listening: HashSet<u64> =
            match sys::in_netns(netns.file.as_fd(), || sockdiag::listening(ports)) {
                Ok(now) => now.iter().map(|l| l.cookie).collect(),
                // Nothing is removed on a guess (a namespace going away).
                Err(_) => return removed,
            };
        let fd = self.listeners.fd().as_fd();
        for (key, cookie) in unlisted {
            if ports.contains(&key.port) && listening.contains(cookie) {
                continue;
            }
            // Only if the entry still holds that socket: the kernel drops a
            // closed socket's entry itself, and a new listener may have taken
            // the slot since.
            if sys::map_lookup(fd, key).ok().flatten() == Some(*cookie)
                && sys::map_delete(fd, key).is_ok()
            {
                removed.push(*key);
                report.repaired.push(format!(
                    "removed a registration for port {} whose socket no longer listens \
                     (socket cookie {cookie})",
                    key.port
                ));
            }
        }
        removed
    }

    /// Read-only: the reconcile pass's checks on what sock_diag lists in
    /// `netns` now (`redirector status`, the ring check).
    pub fn inspect(&mut self, netns: &Netns, redirects: &[Redirect]) -> Result<Report> {
        let ports: Vec<u16> = redirects.iter().map(|r| r.listen_port).collect();
        let found = sys::in_netns(netns.file.as_fd(), || sockdiag::listening(&ports))
            .with_context(|| format!("listing listeners in {}", netns.path.display()))?;
        self.reconcile(netns, redirects, &found, &[], false)
    }

    /// Copies the listener out of its owner and inserts it into a free slot.
    fn register(
        &self,
        netns_cookie: u64,
        l: &sockdiag::Listening,
        owner: Option<(i32, i32)>,
        taken: &mut HashSet<ListenerKey>,
        write: bool,
    ) -> std::result::Result<Outcome, (Reason, String)> {
        let Some((pid, fd)) = owner else {
            return Err((Reason::NoOwner, String::new()));
        };
        let copy: OwnedFd = sys::copy_fd_from(pid, fd)
            .map_err(|e| (Reason::CopyDenied, format!("pidfd_getfd: {e}")))?;
        let facts = sys::socket_facts(copy.as_fd())
            .map_err(|e| (Reason::RegisterFailed, format!("inspecting the copy: {e}")))?;
        // An MPTCP listener's fd is the MPTCP socket; sock_diag lists its TCP
        // subflow, which has a cookie of its own and shares the inode.
        if facts.protocol == sys::IPPROTO_MPTCP && facts.inode == l.inode {
            return Err((Reason::Mptcp, "socket protocol IPPROTO_MPTCP".to_owned()));
        }
        // The cookie, not the inode: sock_diag's inode is 32 bits and
        // reused. And its namespace: `bpf_sk_assign` would hand a connection
        // to a socket of any namespace.
        if facts.cookie != l.cookie || facts.netns_cookie != netns_cookie || !facts.listening {
            return Ok(Outcome::Changed);
        }
        if !write {
            return Ok(Outcome::WouldRegister);
        }
        // As sock_ops does at listen(): the sockets this listener accepts
        // carry the mark, so their flows are recorded, whichever member of
        // its SO_REUSEPORT group is registered.
        if let Some(marks) = &self.marks {
            let key = copy.as_raw_fd();
            let port = u32::from(l.port);
            sys::map_update(marks.fd().as_fd(), &key, &port, sys::BPF_ANY)
                .map_err(|e| (Reason::RegisterFailed, format!("marking the listener: {e}")))?;
        }
        let bind = bind_of(l.addr);
        // The 8-byte value a socket hash with 8-byte values takes: the fd.
        let value = copy.as_raw_fd() as u32 as u64;
        for slot in 0..LISTENER_SLOTS {
            let key = ListenerKey::new(netns_cookie, l.port, bind, slot);
            if taken.contains(&key) {
                continue;
            }
            // BPF_NOEXIST: a registration sock_ops made since the snapshot wins.
            match sys::map_update(self.listeners.fd().as_fd(), &key, &value, sys::BPF_NOEXIST) {
                Ok(()) => {
                    taken.insert(key);
                    REGISTERED_BY_AGENT.fetch_add(1, Ordering::Relaxed);
                    return Ok(Outcome::Inserted(slot));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    taken.insert(key);
                }
                Err(e) => {
                    let reason = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        Reason::Mptcp
                    } else {
                        Reason::RegisterFailed
                    };
                    return Err((reason, format!("bpf_map_update_elem: {e}")));
                }
            }
        }
        // `copy` is closed on return: the live-store's close alone ends the socket.
        Ok(Outcome::ThroughGroup)
    }

    /// Removes every registration of a namespace that is no longer served.
    pub fn forget(&mut self, netns_cookie: u64) {
        self.last.remove(&netns_cookie);
        self.permanent
            .retain(|(cookie, _), _| *cookie != netns_cookie);
        let fd = self.listeners.fd().as_fd();
        for key in sys::map_keys::<ListenerKey>(fd).unwrap_or_default() {
            if key.netns_cookie == netns_cookie {
                let _ = sys::map_delete(fd, &key);
            }
        }
    }

    /// Makes sure `sk_lookup` looks up every kind of bind that has a
    /// registration first. Kinds are only ever added here, never cleared: a
    /// stale kind costs a missed lookup, while clearing one could race with a
    /// `sock_ops` registration.
    ///
    /// The map update writes the whole value, so a kind `sock_ops` marks
    /// between the read and the write is lost. No connection is: `sk_lookup`
    /// looks under unmarked kinds when the marked ones fail, and marks the
    /// kind that took it. What a lost kind can cost is the kernel's
    /// preference for an address-bound listener over a wildcard one of the
    /// same namespace, until its next reconcile pass marks it here.
    fn mark_binds(
        &mut self,
        netns_cookie: u64,
        redirects: &[Redirect],
        taken: &HashSet<ListenerKey>,
    ) {
        for r in redirects {
            let key = NsPort::new(netns_cookie, r.advertise_port);
            let Ok(mut target) = self.redirects.get(&key, 0) else {
                continue;
            };
            let mut changed = false;
            for k in taken.iter().filter(|k| k.port == r.listen_port) {
                let kind = k.bind().kind();
                if target.binds[kind] == 0 {
                    target.binds[kind] = 1;
                    changed = true;
                }
            }
            if changed {
                let _ = self.redirects.insert(key, target, 0);
            }
        }
    }
}

/// `Bind` of a sock_diag address, as `sock_ops` computes it in the kernel.
pub fn bind_of(addr: IpAddr) -> Bind {
    match addr {
        IpAddr::V4(a) => Bind::v4(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Bind::of_socket(
                redirector_common::AF_INET6,
                0,
                [word(0), word(4), word(8), word(12)],
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redirector_common::{
        AF_INET, AF_INET6, BIND_V4_ADDR, BIND_V4_ANY, BIND_V6_ADDR, BIND_V6_ANY,
    };

    #[test]
    fn binds_match_what_the_kernel_side_computes() {
        let lo = bind_of("127.0.0.1".parse().unwrap());
        assert_eq!(lo.family, AF_INET);
        assert_eq!(lo.addr[0], u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(lo.kind(), BIND_V4_ADDR);
        assert_eq!(bind_of("0.0.0.0".parse().unwrap()).kind(), BIND_V4_ANY);
        assert_eq!(bind_of("::".parse().unwrap()).kind(), BIND_V6_ANY);
        let v6 = bind_of("fd00::2".parse().unwrap());
        assert_eq!((v6.family, v6.kind()), (AF_INET6, BIND_V6_ADDR));
        // A dual-stack socket bound to a v4-mapped address takes IPv4 only.
        let mapped = bind_of("::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(mapped, lo);
    }

    #[test]
    fn unservable_says_what_to_do() {
        let u = Unservable {
            port: 9095,
            address: "::".parse().unwrap(),
            inode: 42,
            pid: Some(7),
            reason: Reason::Mptcp,
            detail: String::new(),
        };
        let text = u.to_string();
        assert!(
            text.starts_with("listener [::]:9095 (socket inode 42, pid 7) not registered: mptcp"),
            "{text}"
        );
        assert!(text.contains("GODEBUG=multipathtcp=0"), "{text}");
    }
}
