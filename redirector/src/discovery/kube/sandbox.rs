//! From a pod UID (learnt from the Kubernetes API) to the pod's cgroup and its
//! sandbox process, hence its network namespace, the moment each exists.
//!
//! Kubelet names pod cgroups after the pod UID, under one directory per QoS
//! class, so the places a pod can appear in are known before it does. The
//! [`Locator`] watches those directories with inotify (one instance for all
//! pods) and, once a pod's cgroup exists, the cgroup itself: `IN_CREATE` for
//! new container cgroups and `cgroup.events`, whose `populated` line the
//! kernel updates (and notifies) when the first process enters any cgroup
//! below it. Nothing polls: every look at the hierarchy follows an event, a
//! new wanted pod, or a lost event queue (`IN_Q_OVERFLOW`, answered by a
//! rescan of the wanted pods).
//!
//! The reads done on the async path (`cgroup.events`, `cgroup.procs`,
//! directory listings below one pod, /proc/PID/ns/net and /proc/PID/comm) are
//! small reads of kernel pseudo-files: they never wait on a device or a peer,
//! so they are done inline rather than on a blocking thread.
//!
//! Container runtimes put a container's first process in its cgroup before it
//! has entered the pod's namespaces (runc's `runc:[0:PARENT]` is still in the
//! node's network namespace; its `runc:[1:CHILD]` exits once `runc:[2:INIT]`,
//! the future pause process, runs). Reporting such a process would point the
//! agent at the node's own namespace, so those are "settling": skipped, and
//! the lowest of them is watched through a pidfd, whose exit is the event to
//! look again. A consequence: a hostNetwork pod, whose sandbox really is in
//! the node's namespace, is never `Found`.

use std::{
    collections::{HashMap, VecDeque},
    ffi::OsStr,
    fs, io,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
};

use anyhow::{bail, Context as _, Result};
// The `inotify` crate rather than nix's: its `stream` feature reads the
// instance through tokio's reactor (AsyncFd) and parses the events, where
// nix's inotify is a blocking reader we would have to wrap ourselves; and its
// dependencies (bitflags, futures-util, tokio) are already in the tree, where
// nix is not.
use futures_core::Stream;
use inotify::{EventMask, EventOwned, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{debug, error, info, warn};

use crate::{discovery::netns_inode, sys};

/// Pods looked for at once. Far above any node's pod limit (kubelet's default
/// is 110); it bounds the watches (two per pod found) and pidfds (at most
/// one per pod) this module holds.
pub const MAX_WANTED: usize = 4096;
/// How deep below the cgroup2 mount kubepods roots are looked for: `kubepods`
/// is at level 1, kind's `kubelet.slice/kubelet-kubepods.slice` at level 2.
const ROOT_SEARCH_DEPTH: usize = 3;
/// Directories visited by that search, whatever the depth: a node's first
/// levels hold a few hundred.
const ROOT_SEARCH_DIRS: usize = 10_000;
/// Cgroups read below one pod cgroup: a pod has one per container, nested
/// ones only if a container makes its own (docker in a pod).
const MAX_POD_CGROUPS: usize = 256;
const MAX_POD_DEPTH: usize = 4;
/// The read buffer of the inotify instance: 240 events of the longest name
/// per read, and many more of the usual ones.
const EVENT_BUFFER: usize = 64 * 1024;
/// Read errors in a row after which the instance is given up (each one is
/// followed by a rescan, so this stops a hot loop on a broken descriptor).
const MAX_READ_ERRORS: u32 = 3;

/// Where kubelet creates pod cgroups and new QoS directories.
const PARENT_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);
/// A pod cgroup: new container cgroups. Its removal shows in its parent only:
/// cgroupfs sends no IN_DELETE_SELF for a removed cgroup.
const POD_DIR_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);
/// A pod's `cgroup.events`: `populated` changed.
const EVENTS_MASK: WatchMask = WatchMask::MODIFY;

/// A pod whose sandbox runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    pub pod_uid: String,
    /// The pod cgroup's directory.
    pub cgroup: PathBuf,
    /// Its cgroup id (the directory's inode).
    pub cgroup_id: u64,
    /// The lowest pid below the pod cgroup that has entered the pod's
    /// namespaces: the sandbox's, which starts before any app container.
    pub pid: i32,
    /// The inode of `pid`'s network namespace.
    pub netns_ino: u64,
}

/// What [`Locator::next`] reports, per pod: `CgroupReady`, then `Found`, then
/// `Gone`. `Found` comes again if the reported process dies and another one
/// is found (a sandbox recreated by kubelet, in a new namespace); after
/// `Gone` the pod is still looked for, until [`Locator::forget`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocatorEvent {
    /// The pod cgroup exists. Reported once per appearance, before `Found`,
    /// so cgroup programs can be attached before any of the pod's processes
    /// runs.
    CgroupReady {
        pod_uid: String,
        cgroup: PathBuf,
        cgroup_id: u64,
    },
    Found(Sandbox),
    /// The pod cgroup was removed (the pod left the node).
    Gone {
        pod_uid: String,
    },
}

impl LocatorEvent {
    pub fn pod_uid(&self) -> &str {
        match self {
            Self::CgroupReady { pod_uid, .. } | Self::Gone { pod_uid } => pod_uid,
            Self::Found(sandbox) => &sandbox.pod_uid,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WantError {
    /// Only what kubelet can put in a cgroup name is accepted: the UID is
    /// joined to paths.
    #[error("pod UID {0:?} is not a Kubernetes UID")]
    InvalidUid(String),
    #[error("already looking for {MAX_WANTED} pods")]
    TooMany,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_>.slice`
    Systemd,
    /// `kubepods/burstable/pod<u>`
    Cgroupfs,
}

/// A directory kubelet creates pod cgroups in: a kubepods root (Guaranteed
/// pods) or one of its QoS class directories.
struct Parent {
    dir: PathBuf,
    driver: Driver,
    /// A pod's cgroup here is named `prefix` + UID (+ `.slice` for systemd).
    prefix: String,
    /// For a QoS class directory, the index of its root in `Locator::parents`.
    root: Option<usize>,
    wd: Option<WatchDescriptor>,
}

impl Parent {
    fn pod_name(&self, uid: &str) -> String {
        match self.driver {
            // systemd reserves `-` in unit names for the slice hierarchy.
            Driver::Systemd => format!("{}{}.slice", self.prefix, uid.replace('-', "_")),
            Driver::Cgroupfs => format!("{}{uid}", self.prefix),
        }
    }

    /// The UID (dashed) whose cgroup `name` would be here.
    fn uid_in(&self, name: &OsStr) -> Option<String> {
        let rest = name.to_str()?.strip_prefix(&self.prefix)?;
        let uid = match self.driver {
            Driver::Systemd => rest.strip_suffix(".slice")?,
            Driver::Cgroupfs => rest,
        };
        canonical_uid(uid)
    }
}

/// A root's three pod parents: the root itself, then its burstable and
/// besteffort directories, with the pod name prefix of each.
fn qos_layout(root: &Path) -> (Driver, [(PathBuf, String); 3]) {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_suffix(".slice") {
        // A systemd slice's children carry its whole name as a prefix
        // (kind's `kubelet-kubepods.slice` has `kubelet-kubepods-burstable.slice`).
        Some(stem) => (
            Driver::Systemd,
            [
                (root.to_owned(), format!("{stem}-pod")),
                (
                    root.join(format!("{stem}-burstable.slice")),
                    format!("{stem}-burstable-pod"),
                ),
                (
                    root.join(format!("{stem}-besteffort.slice")),
                    format!("{stem}-besteffort-pod"),
                ),
            ],
        ),
        None => (
            Driver::Cgroupfs,
            [
                (root.to_owned(), "pod".to_owned()),
                (root.join("burstable"), "pod".to_owned()),
                (root.join("besteffort"), "pod".to_owned()),
            ],
        ),
    }
}

/// Kubelet's pod cgroup names carry the UID (a UUID, or the hex hash of a
/// static pod), with `_` for `-` under systemd; the dashed form is the key.
fn canonical_uid(uid: &str) -> Option<String> {
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| uid.replace('_', "-"))
}

fn is_kubepods_root(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

/// The kubepods roots in the first levels of the hierarchy, shallowest first;
/// nothing below a root is looked at.
fn find_kubepods_roots(mount: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let mut level = vec![mount.to_owned()];
    let mut visited = 0;
    for _ in 0..ROOT_SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                visited += 1;
                if visited > ROOT_SEARCH_DIRS {
                    warn!(
                        "looked at {ROOT_SEARCH_DIRS} cgroups under {} for kubepods roots; \
                         stopped there",
                        mount.display()
                    );
                    roots.sort();
                    return roots;
                }
                if entry.file_name().to_str().is_some_and(is_kubepods_root) {
                    roots.push(entry.path());
                } else {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    roots.sort();
    roots
}

/// Every pid in the cgroups at and below `dir`, lowest first. Only leaves
/// hold processes in cgroup v2 (threaded subtrees aside), so reading every
/// `cgroup.procs` is reading the leaves' without working out which they are.
fn pod_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = vec![(dir.to_owned(), 0)];
    let mut visited = 0;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > MAX_POD_CGROUPS {
            debug!("more than {MAX_POD_CGROUPS} cgroups below a pod; read the first ones");
            break;
        }
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if depth >= MAX_POD_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// runc's helpers before the container's init: in the cgroup, not (yet, or
/// not for long) in the pod's namespaces. `runc:[2:INIT]` already is.
fn is_runtime_setup(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.starts_with("runc:[0:") || c.starts_with("runc:[1:"))
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Scan {
    /// The lowest settled pid and its network namespace.
    sandbox: Option<(i32, u64)>,
    /// Else the lowest process still being set up, whose exit is worth a look.
    settling: Option<i32>,
}

fn scan_pod(dir: &Path, host_netns: Option<u64>) -> Scan {
    let mut scan = Scan::default();
    for pid in pod_pids(dir) {
        // Exited meanwhile, or a zombie (no namespaces any more).
        let Some(netns) = netns_inode(pid) else {
            continue;
        };
        if Some(netns) == host_netns || is_runtime_setup(pid) {
            scan.settling.get_or_insert(pid);
            continue;
        }
        scan.sandbox = Some((pid, netns));
        break;
    }
    scan
}

/// A pod cgroup that exists.
struct Present {
    dir: PathBuf,
    id: u64,
    dir_wd: Option<WatchDescriptor>,
    events_wd: Option<WatchDescriptor>,
    /// The pid and namespace last reported as `Found`.
    found: Option<(i32, u64)>,
}

struct Pod {
    present: Option<Present>,
}

#[derive(Clone, Debug)]
enum Owner {
    Parent(usize),
    PodDir(String),
    PodEvents(String),
}

/// A settling process's pidfd: readable once it exits.
struct ExitWait {
    pid: i32,
    fd: AsyncFd<OwnedFd>,
}

enum Wake {
    Event(EventOwned),
    Exited(String),
    ReadError(io::Error),
    Closed,
}

/// Finds wanted pods' cgroups and sandboxes; see the module documentation.
pub struct Locator {
    stream: EventStream<Vec<u8>>,
    watches: Watches,
    stream_open: bool,
    read_errors: u32,
    parents: Vec<Parent>,
    pods: HashMap<String, Pod>,
    owners: HashMap<WatchDescriptor, Owner>,
    waits: HashMap<String, ExitWait>,
    pending: VecDeque<LocatorEvent>,
    /// The node's network namespace, never a pod sandbox's.
    host_netns: Option<u64>,
    overflows: u64,
}

impl Locator {
    /// Watches the kubepods root `kubepods_root` (absolute, or relative to
    /// `cgroup2_mount`), or else every kubepods root found in the first
    /// levels of the hierarchy. Must run inside a Tokio runtime with IO
    /// enabled, as everything that reads through tokio's reactor.
    pub fn new(cgroup2_mount: &Path, kubepods_root: Option<&Path>) -> Result<Self> {
        tokio::runtime::Handle::try_current()
            .context("the pod sandbox locator needs a Tokio runtime")?;
        let roots = match kubepods_root {
            Some(root) => {
                let root = if root.starts_with(cgroup2_mount) {
                    root.to_owned()
                } else {
                    // As kubelet and /proc/PID/cgroup spell it: from the mount.
                    cgroup2_mount.join(root.strip_prefix("/").unwrap_or(root))
                };
                if !root.is_dir() {
                    bail!("kubepods root {} is not a directory", root.display());
                }
                vec![root]
            }
            None => find_kubepods_roots(cgroup2_mount),
        };
        if roots.is_empty() {
            bail!(
                "no kubepods cgroup (kubepods, kubepods.slice, *-kubepods.slice) within \
                 {ROOT_SEARCH_DEPTH} levels of {}: pass the kubepods root",
                cgroup2_mount.display()
            );
        }
        let inotify = Inotify::init().context("creating an inotify instance")?;
        let watches = inotify.watches();
        let stream = inotify
            .into_event_stream(vec![0u8; EVENT_BUFFER])
            .context("registering the inotify instance with tokio")?;
        let mut parents = Vec::new();
        for root in &roots {
            let (driver, layout) = qos_layout(root);
            let root_index = parents.len();
            for (i, (dir, prefix)) in layout.into_iter().enumerate() {
                parents.push(Parent {
                    dir,
                    driver,
                    prefix,
                    root: (i > 0).then_some(root_index),
                    wd: None,
                });
            }
        }
        let mut locator = Self {
            stream,
            watches,
            stream_open: true,
            read_errors: 0,
            parents,
            pods: HashMap::new(),
            owners: HashMap::new(),
            waits: HashMap::new(),
            pending: VecDeque::new(),
            // pid 1's is unreadable without ptrace access to it; the agent's
            // own is the node's too (hostNetwork).
            host_netns: netns_inode(1).or_else(|| netns_inode(std::process::id() as i32)),
            overflows: 0,
        };
        for i in 0..locator.parents.len() {
            if locator.parents[i].root.is_none() {
                let dir = locator.parents[i].dir.clone();
                locator
                    .watch_parent(i)
                    .with_context(|| format!("watching {}", dir.display()))?;
            }
        }
        info!(
            "pod sandbox locator watching {}",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(locator)
    }

    /// Starts looking for pod `pod_uid` (a second call changes nothing). A pod
    /// that already exists is reported by the next calls to `next`, at once.
    pub fn want(&mut self, pod_uid: &str) -> Result<(), WantError> {
        let uid = canonical_uid(pod_uid).ok_or_else(|| WantError::InvalidUid(pod_uid.into()))?;
        if self.pods.contains_key(&uid) {
            return Ok(());
        }
        if self.pods.len() >= MAX_WANTED {
            return Err(WantError::TooMany);
        }
        self.pods.insert(uid.clone(), Pod { present: None });
        self.refresh(&uid);
        Ok(())
    }

    /// Stops looking for pod `pod_uid`: its watches go, and so do its
    /// reports not yet taken.
    pub fn forget(&mut self, pod_uid: &str) {
        let Some(uid) = canonical_uid(pod_uid) else {
            return;
        };
        let Some(pod) = self.pods.remove(&uid) else {
            return;
        };
        if let Some(present) = pod.present {
            for wd in [present.dir_wd, present.events_wd].into_iter().flatten() {
                self.drop_watch(wd);
            }
        }
        self.waits.remove(&uid);
        self.pending.retain(|e| e.pod_uid() != uid);
    }

    /// How many pods are looked for.
    pub fn wanted(&self) -> usize {
        self.pods.len()
    }

    /// How often the kernel's event queue overflowed (each time, every
    /// wanted pod was looked at again).
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// The next change. Cancel-safe: whatever was read before a cancelled
    /// call is reported by the next one. Pending forever if the inotify
    /// instance failed (logged) and no process exit is awaited.
    pub async fn next(&mut self) -> LocatorEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            match std::future::poll_fn(|cx| self.poll_wake(cx)).await {
                Wake::Event(event) => {
                    self.read_errors = 0;
                    self.handle(event);
                }
                Wake::Exited(uid) => {
                    self.waits.remove(&uid);
                    self.evaluate(&uid);
                }
                Wake::ReadError(e) => {
                    self.read_errors += 1;
                    if self.read_errors >= MAX_READ_ERRORS {
                        error!(
                            "reading inotify events failed {MAX_READ_ERRORS} times in a row \
                             ({e}): pod cgroups are no longer followed"
                        );
                        self.stream_open = false;
                    } else {
                        warn!("reading inotify events: {e}; looking at every wanted pod again");
                        self.rescan();
                    }
                }
                Wake::Closed => {
                    error!("the inotify instance closed: pod cgroups are no longer followed");
                    self.stream_open = false;
                }
            }
        }
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        for (uid, wait) in &self.waits {
            // Readable: the process exited. An error says the pidfd cannot
            // tell any more; either way, look again.
            if wait.fd.poll_read_ready(cx).is_ready() {
                return Poll::Ready(Wake::Exited(uid.clone()));
            }
        }
        if !self.stream_open {
            return Poll::Pending;
        }
        match Pin::new(&mut self.stream).poll_next(cx) {
            Poll::Ready(Some(Ok(event))) => Poll::Ready(Wake::Event(event)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Wake::ReadError(e)),
            Poll::Ready(None) => Poll::Ready(Wake::Closed),
            Poll::Pending => Poll::Pending,
        }
    }

    fn handle(&mut self, event: EventOwned) {
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            self.overflows += 1;
            warn!("inotify queue overflowed: looking at every wanted pod again");
            self.rescan();
            return;
        }
        let Some(owner) = self.owners.get(&event.wd).cloned() else {
            // A watch dropped meanwhile.
            return;
        };
        if event.mask.contains(EventMask::IGNORED) {
            // The kernel dropped the watch with its inode.
            self.owners.remove(&event.wd);
            match owner {
                Owner::Parent(i) => self.parents[i].wd = None,
                Owner::PodDir(uid) => self.gone(&uid),
                Owner::PodEvents(uid) => {
                    if let Some(p) = self.present_mut(&uid) {
                        p.events_wd = None;
                    }
                }
            }
            return;
        }
        match owner {
            Owner::Parent(i) => self.parent_event(i, &event),
            // A new container cgroup, or `populated` changed: either may
            // come with the sandbox, or with a settling process's successor.
            Owner::PodDir(uid) if event.mask.contains(EventMask::CREATE) => self.evaluate(&uid),
            Owner::PodEvents(uid) if event.mask.contains(EventMask::MODIFY) => self.evaluate(&uid),
            Owner::PodDir(_) | Owner::PodEvents(_) => {}
        }
    }

    fn parent_event(&mut self, i: usize, event: &EventOwned) {
        let Some(name) = event.name.as_deref() else {
            return;
        };
        if !event.mask.contains(EventMask::ISDIR) {
            return;
        }
        let created = event
            .mask
            .intersects(EventMask::CREATE | EventMask::MOVED_TO);
        let removed = event
            .mask
            .intersects(EventMask::DELETE | EventMask::MOVED_FROM);
        if let Some(qos) = self
            .parents
            .iter()
            .position(|p| p.root == Some(i) && p.dir.file_name() == Some(name))
        {
            if created {
                if let Err(e) = self.watch_parent(qos) {
                    warn!(
                        "watching {}: {e}; pods there are found only by a rescan",
                        self.parents[qos].dir.display()
                    );
                }
            } else if removed {
                if let Some(wd) = self.parents[qos].wd.take() {
                    self.drop_watch(wd);
                }
            }
            return;
        }
        let Some(uid) = self.parents[i].uid_in(name) else {
            return;
        };
        let Some(pod) = self.pods.get(&uid) else {
            return;
        };
        let dir = self.parents[i].dir.join(name);
        if created && pod.present.is_none() {
            self.appear(&uid, dir);
        } else if removed && pod.present.as_ref().is_some_and(|p| p.dir == dir) {
            self.gone(&uid);
        }
    }

    /// Watches pod parent `i` if it exists, then looks in it for what was
    /// created before the watch (so nothing falls between list and watch).
    fn watch_parent(&mut self, i: usize) -> io::Result<()> {
        if self.parents[i].wd.is_some() {
            return Ok(());
        }
        let dir = self.parents[i].dir.clone();
        let wd = match self.add_watch(&dir, PARENT_MASK, Owner::Parent(i)) {
            Ok(wd) => wd,
            // Not made yet: its root's watch reports it when it is.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.parents[i].wd = Some(wd);
        if self.parents[i].root.is_none() {
            for qos in 0..self.parents.len() {
                if self.parents[qos].root == Some(i) {
                    if let Err(e) = self.watch_parent(qos) {
                        warn!(
                            "watching {}: {e}; pods there are found only by a rescan",
                            self.parents[qos].dir.display()
                        );
                    }
                }
            }
        }
        let absent: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.present.is_none())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in absent {
            let pod_dir = dir.join(self.parents[i].pod_name(&uid));
            if pod_dir.is_dir() {
                self.appear(&uid, pod_dir);
            }
        }
        Ok(())
    }

    /// The pod cgroup of `uid`, with its inode, if it exists.
    fn locate(&self, uid: &str) -> Option<(PathBuf, u64)> {
        self.parents.iter().find_map(|p| {
            let dir = p.dir.join(p.pod_name(uid));
            let meta = fs::metadata(&dir).ok()?;
            meta.is_dir().then(|| (dir, meta.ino()))
        })
    }

    /// Brings pod `uid` up to date with the hierarchy, whatever events were
    /// missed.
    fn refresh(&mut self, uid: &str) {
        let Some(pod) = self.pods.get(uid) else {
            return;
        };
        let known = pod.present.as_ref().map(|p| p.id);
        match (known, self.locate(uid)) {
            (None, Some((dir, _))) => self.appear(uid, dir),
            (Some(_), None) => self.gone(uid),
            (Some(id), Some((dir, now))) if id != now => {
                self.gone(uid);
                self.appear(uid, dir);
            }
            (Some(_), Some(_)) => self.evaluate(uid),
            (None, None) => {}
        }
    }

    /// Everything again, after events were lost.
    fn rescan(&mut self) {
        for i in 0..self.parents.len() {
            if self.parents[i].wd.is_some() && !self.parents[i].dir.is_dir() {
                if let Some(wd) = self.parents[i].wd.take() {
                    self.drop_watch(wd);
                }
            }
        }
        for i in 0..self.parents.len() {
            if self.parents[i].root.is_none() {
                if let Err(e) = self.watch_parent(i) {
                    warn!("watching {}: {e}", self.parents[i].dir.display());
                }
            }
        }
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            self.refresh(&uid);
        }
    }

    /// Pod `uid`'s cgroup `dir` exists: watch it, report it, and look for its
    /// sandbox (which may have started before the watches).
    fn appear(&mut self, uid: &str, dir: PathBuf) {
        let Ok(meta) = fs::metadata(&dir) else {
            return;
        };
        let dir_wd = match self.add_watch(&dir, POD_DIR_MASK, Owner::PodDir(uid.to_owned())) {
            Ok(wd) => Some(wd),
            // Removed already: there is nothing to report.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(
                    "pod {uid}: watching {}: {e} (fs.inotify.max_user_watches?); \
                     its new containers are seen only with its first process",
                    dir.display()
                );
                None
            }
        };
        let events = dir.join("cgroup.events");
        let events_wd = match self.add_watch(&events, EVENTS_MASK, Owner::PodEvents(uid.to_owned()))
        {
            Ok(wd) => Some(wd),
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    debug!("pod {uid}: no {}", events.display());
                } else {
                    warn!(
                        "pod {uid}: watching {}: {e} (fs.inotify.max_user_watches?); \
                         its sandbox is seen only when a container cgroup is made",
                        events.display()
                    );
                }
                None
            }
        };
        let Some(pod) = self.pods.get_mut(uid) else {
            return;
        };
        pod.present = Some(Present {
            dir: dir.clone(),
            id: meta.ino(),
            dir_wd,
            events_wd,
            found: None,
        });
        self.pending.push_back(LocatorEvent::CgroupReady {
            pod_uid: uid.to_owned(),
            cgroup: dir,
            cgroup_id: meta.ino(),
        });
        self.evaluate(uid);
    }

    fn gone(&mut self, uid: &str) {
        let Some(present) = self.pods.get_mut(uid).and_then(|p| p.present.take()) else {
            return;
        };
        for wd in [present.dir_wd, present.events_wd].into_iter().flatten() {
            self.drop_watch(wd);
        }
        self.waits.remove(uid);
        self.pending.push_back(LocatorEvent::Gone {
            pod_uid: uid.to_owned(),
        });
    }

    /// Looks for pod `uid`'s sandbox, unless the one reported still lives.
    fn evaluate(&mut self, uid: &str) {
        // A settling process that exits between the scan and its pidfd is
        // worth another scan at once; a few rounds cover a runtime's helpers.
        for _ in 0..3 {
            let host_netns = self.host_netns;
            let Some(present) = self.present_mut(uid) else {
                return;
            };
            if let Some((pid, netns)) = present.found {
                if netns_inode(pid) == Some(netns) {
                    return;
                }
                debug!("pod {uid}: sandbox pid {pid} is gone; looking for the next one");
                present.found = None;
            }
            let scan = scan_pod(&present.dir, host_netns);
            if let Some((pid, netns_ino)) = scan.sandbox {
                present.found = Some((pid, netns_ino));
                let sandbox = Sandbox {
                    pod_uid: uid.to_owned(),
                    cgroup: present.dir.clone(),
                    cgroup_id: present.id,
                    pid,
                    netns_ino,
                };
                self.waits.remove(uid);
                self.pending.push_back(LocatorEvent::Found(sandbox));
                return;
            }
            let Some(pid) = scan.settling else {
                self.waits.remove(uid);
                return;
            };
            if self.waits.get(uid).is_some_and(|w| w.pid == pid) {
                return;
            }
            match exit_wait(pid) {
                Ok(wait) => {
                    self.waits.insert(uid.to_owned(), wait);
                    return;
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => {
                    warn!(
                        "pod {uid}: cannot follow pid {pid} being set up ({e}); \
                         its sandbox is seen with its next container"
                    );
                    self.waits.remove(uid);
                    return;
                }
            }
        }
    }

    fn present_mut(&mut self, uid: &str) -> Option<&mut Present> {
        self.pods.get_mut(uid)?.present.as_mut()
    }

    fn add_watch(
        &mut self,
        path: &Path,
        mask: WatchMask,
        owner: Owner,
    ) -> io::Result<WatchDescriptor> {
        let wd = self.watches.add(path, mask)?;
        // The kernel hands back the same descriptor (and replaces its mask)
        // for an inode watched already; no two owners share an inode here.
        self.owners.insert(wd.clone(), owner);
        Ok(wd)
    }

    fn drop_watch(&mut self, wd: WatchDescriptor) {
        self.owners.remove(&wd);
        if let Err(e) = self.watches.remove(wd) {
            // Dropped by the kernel with its inode already.
            debug!("removing an inotify watch: {e}");
        }
    }
}

fn exit_wait(pid: i32) -> io::Result<ExitWait> {
    // AsyncFd panics outside a runtime; `want` may be called from one.
    tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let pidfd = sys::pidfd_open(pid)?;
    // SAFETY: the AsyncFd owns the pidfd and keeps it open, unchanged, until
    // it is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }?;
    Ok(ExitWait { pid, fd })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn parents(root: &str) -> Vec<Parent> {
        let (driver, layout) = qos_layout(Path::new(root));
        layout
            .into_iter()
            .map(|(dir, prefix)| Parent {
                dir,
                driver,
                prefix,
                root: None,
                wd: None,
            })
            .collect()
    }

    fn pod_paths(root: &str) -> Vec<PathBuf> {
        parents(root)
            .iter()
            .map(|p| p.dir.join(p.pod_name(UID)))
            .collect()
    }

    #[test]
    fn systemd_pod_cgroups_have_underscores() {
        let r = "/sys/fs/cgroup/kubepods.slice";
        assert_eq!(
            pod_paths(r),
            [
                format!("{r}/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"),
                format!(
                    "{r}/kubepods-burstable.slice/\
                     kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
                ),
                format!(
                    "{r}/kubepods-besteffort.slice/\
                     kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
                ),
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn nested_systemd_roots_prefix_their_children() {
        let r = "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice";
        assert_eq!(
            pod_paths(r)[1],
            PathBuf::from(format!(
                "{r}/kubelet-kubepods-burstable.slice/\
                 kubelet-kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
            ))
        );
    }

    #[test]
    fn cgroupfs_pod_cgroups_keep_dashes() {
        let r = "/sys/fs/cgroup/kubepods";
        assert_eq!(
            pod_paths(r),
            [
                format!("{r}/pod{UID}"),
                format!("{r}/burstable/pod{UID}"),
                format!("{r}/besteffort/pod{UID}"),
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn names_read_back_as_the_dashed_uid() {
        for root in ["/x/kubepods.slice", "/x/kubepods"] {
            for p in parents(root) {
                let name = p.pod_name(UID);
                assert_eq!(p.uid_in(OsStr::new(&name)), Some(UID.to_owned()));
            }
        }
        let systemd = &parents("/x/kubepods.slice")[1];
        assert_eq!(
            systemd.uid_in(OsStr::new(
                "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"
            )),
            Some(UID.to_owned())
        );
        // Not a pod of this parent: another QoS class, a container, the QoS dirs.
        for name in [
            "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
            "kubepods-burstable.slice",
            "cri-containerd-abc.scope",
        ] {
            assert_eq!(systemd.uid_in(OsStr::new(name)), None, "{name}");
        }
        let cgroupfs = &parents("/x/kubepods")[0];
        assert_eq!(cgroupfs.uid_in(OsStr::new("burstable")), None);
        assert_eq!(cgroupfs.uid_in(OsStr::new("pod")), None);
        assert_eq!(cgroupfs.uid_in(OsStr::new("pod../x")), None);
    }

    #[test]
    fn uids_are_checked_and_dashed() {
        assert_eq!(canonical_uid(UID), Some(UID.to_owned()));
        assert_eq!(
            canonical_uid("0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"),
            Some(UID.to_owned())
        );
        // A static pod's UID is a hash.
        assert!(canonical_uid("d41d8cd98f00b204e9800998ecf8427e").is_some());
        for bad in ["", "../etc", "a/b", "a b", &"a".repeat(65)] {
            assert_eq!(canonical_uid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn kubepods_roots_of_both_drivers_and_nested() {
        assert!(is_kubepods_root("kubepods"));
        assert!(is_kubepods_root("kubepods.slice"));
        assert!(is_kubepods_root("kubelet-kubepods.slice"));
        assert!(!is_kubepods_root("kubepods-burstable.slice"));
        assert!(!is_kubepods_root("system.slice"));
    }

    /// A scratch directory tree standing in for a cgroup hierarchy: inotify
    /// reports directories made and removed on any filesystem.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("redirector-sandbox-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("scratch dir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_roots_below_the_first_level_and_not_below_a_root() {
        let s = Scratch::new("roots");
        for d in [
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
            "kubepods/burstable/kubepods",
            "system.slice/ssh.service",
        ] {
            fs::create_dir_all(s.0.join(d)).expect("mkdir");
        }
        assert_eq!(
            find_kubepods_roots(&s.0),
            [
                s.0.join("kubelet.slice/kubelet-kubepods.slice"),
                s.0.join("kubepods"),
            ]
        );
    }

    async fn next(locator: &mut Locator) -> LocatorEvent {
        tokio::time::timeout(Duration::from_secs(5), locator.next())
            .await
            .expect("an event within 5 s")
    }

    #[tokio::test]
    async fn reports_a_pod_cgroup_made_after_want_and_its_removal() {
        let s = Scratch::new("events");
        let root = s.0.join("kubepods");
        fs::create_dir(&root).expect("mkdir root");
        let mut locator = Locator::new(&s.0, None).expect("locator");
        locator.want(UID).expect("want");
        locator.want(UID).expect("want again");
        assert_eq!(locator.wanted(), 1);
        // The QoS directory comes after the locator: its root's watch sees it.
        fs::create_dir(root.join("besteffort")).expect("mkdir qos");
        let pod = root.join(format!("besteffort/pod{UID}"));
        fs::create_dir(&pod).expect("mkdir pod");
        let id = fs::metadata(&pod).expect("stat").ino();
        assert_eq!(
            next(&mut locator).await,
            LocatorEvent::CgroupReady {
                pod_uid: UID.into(),
                cgroup: pod.clone(),
                cgroup_id: id,
            }
        );
        fs::remove_dir(&pod).expect("rmdir pod");
        assert_eq!(
            next(&mut locator).await,
            LocatorEvent::Gone {
                pod_uid: UID.into()
            }
        );
        // Still wanted: the same pod cgroup made again is reported again.
        fs::create_dir(&pod).expect("mkdir pod");
        assert!(matches!(
            next(&mut locator).await,
            LocatorEvent::CgroupReady { .. }
        ));
        locator.forget(UID);
        assert_eq!(locator.wanted(), 0);
        fs::remove_dir(&pod).expect("rmdir pod");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locator.next())
                .await
                .is_err(),
            "nothing about a forgotten pod"
        );
    }

    #[tokio::test]
    async fn a_pod_present_at_want_is_reported_at_once_and_limits_hold() {
        let s = Scratch::new("present");
        let pod = s.0.join(format!(
            "kubepods.slice/kubepods-pod{}.slice",
            UID.replace('-', "_")
        ));
        fs::create_dir_all(&pod).expect("mkdir");
        let mut locator = Locator::new(&s.0, Some(Path::new("/kubepods.slice"))).expect("locator");
        assert_eq!(
            locator.want("../../etc"),
            Err(WantError::InvalidUid("../../etc".into()))
        );
        locator.want(UID).expect("want");
        assert!(matches!(
            locator.next().await,
            LocatorEvent::CgroupReady { cgroup, .. } if cgroup == pod
        ));
        for i in 1..MAX_WANTED {
            locator.want(&format!("{i:032x}")).expect("want");
        }
        assert_eq!(locator.want("ffff"), Err(WantError::TooMany));
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let s = Scratch::new("missing");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        assert!(Locator::new(&s.0, None).is_err());
        assert!(Locator::new(&s.0, Some(Path::new("kubepods"))).is_err());
    }

    #[test]
    fn outside_a_runtime_new_fails_rather_than_panics() {
        let s = Scratch::new("noruntime");
        fs::create_dir(s.0.join("kubepods")).expect("mkdir");
        assert!(Locator::new(&s.0, None).is_err());
    }
}
