//! The set of served namespaces, kept current from events rather than polls:
//!
//! - a bind() to a listen port (the bind hooks' ring): the caller's namespace
//!   is served if new and its process qualifies (discovery), then reconciled
//!   within milliseconds until the socket listens;
//! - the exit of a discovered namespace's witness process (a pidfd): another
//!   process in it becomes the witness, or the namespace, now empty, is dropped;
//! - the tick: explicit namespaces whose path went, namespaces waiting out
//!   their listener grace, and the resync, the safety net that reconciles
//!   every served namespace once per `--resync-interval` (a slice per tick)
//!   and, with discovery, scans /proc for what the events missed.
//!
//! Nothing here costs per tick in proportion to the pods of the node, except
//! the resync slice.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use redirector_common::{ListenEvent, LISTEN_EVENT_STOPPED};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

mod pods;

pub use pods::Look;

use crate::{
    bpf::Redirect,
    bpf::{datapath::Datapath, registry::Reason, sockops::Scope},
    config::settings::Settings,
    discovery::{
        self,
        inspector::{self, Inspector, Origin as Asked, Request, Verdict},
        podfs::{self, sanitize},
    },
    flows::log::NsInfo,
    sys,
    sys::{
        netns::Netns,
        owners::{self, Owner},
    },
    telemetry::{Attachments, Telemetry},
};

/// How a served namespace came to be served, which decides when it stops.
enum Origin {
    /// Listed by the operator: served until its path disappears.
    Explicit { path: PathBuf, ino: u64 },
    /// Found by discovery: served while a process is in it and, within the
    /// grace period, it has a listener.
    Discovered {
        ino: u64,
        why: String,
        without_listener_since: Option<Instant>,
        /// The Kubernetes pod (its pod cgroup) the live-store runs in.
        pod: Option<String>,
    },
    /// A pod the Kubernetes API selected (`--kube`): served while the API
    /// lists it and its sandbox lives.
    Pod {
        ino: u64,
        uid: String,
        /// `namespace/name`, escaped.
        label: String,
    },
}

impl Origin {
    fn ino(&self) -> u64 {
        match self {
            Origin::Explicit { ino, .. }
            | Origin::Discovered { ino, .. }
            | Origin::Pod { ino, .. } => *ino,
        }
    }
}

/// A namespace discovery found: its inode, a process in it that qualifies,
/// why, and the pod it runs in.
struct Found {
    ino: u64,
    pid: i32,
    why: String,
    pod: Option<String>,
}

/// Network namespaces served per Kubernetes pod: a pod has one (its
/// sandbox's); more are namespaces a pod made itself (`unshare -n`), each of
/// which would cost a program load and redirect-table entries.
pub const NAMESPACES_PER_POD: usize = 2;

/// Replaces the names flow records use with `served`, keeping those of
/// namespaces no longer served (`departed`) for [`DEPARTED_FOR`], at most
/// [`DEPARTED_MAX`] of them, the oldest going first.
fn merge_names(
    names: &mut HashMap<u64, NsInfo>,
    served: HashMap<u64, NsInfo>,
    departed: &mut HashMap<u64, (Instant, NsInfo)>,
    now: Instant,
) {
    for (cookie, info) in names.drain() {
        if !served.contains_key(&cookie) {
            departed.entry(cookie).or_insert((now, info));
        }
    }
    departed.retain(|c, (at, _)| !served.contains_key(c) && now.duration_since(*at) < DEPARTED_FOR);
    while departed.len() > DEPARTED_MAX {
        let oldest = departed
            .iter()
            .min_by_key(|(_, (at, _))| *at)
            .map(|(c, _)| *c);
        let Some(oldest) = oldest else { break };
        departed.remove(&oldest);
    }
    *names = served;
    for (cookie, (_, info)) in departed.iter() {
        names.insert(*cookie, info.clone());
    }
}

#[cfg(test)]
mod names_tests {
    use super::*;

    fn info(name: &str) -> NsInfo {
        NsInfo {
            name: name.to_owned(),
            ..NsInfo::default()
        }
    }

    #[test]
    fn a_namespace_no_longer_served_keeps_its_name_for_a_while() {
        let t0 = Instant::now();
        let (mut names, mut departed) = (HashMap::new(), HashMap::new());
        merge_names(
            &mut names,
            HashMap::from([(1, info("a")), (2, info("b"))]),
            &mut departed,
            t0,
        );
        // 2 goes: its close records still say "b".
        merge_names(
            &mut names,
            HashMap::from([(1, info("a"))]),
            &mut departed,
            t0,
        );
        assert_eq!(names[&2].name, "b");
        // Served again: no longer departed.
        merge_names(
            &mut names,
            HashMap::from([(1, info("a")), (2, info("b2"))]),
            &mut departed,
            t0,
        );
        assert!(departed.is_empty());
        assert_eq!(names[&2].name, "b2");
        merge_names(
            &mut names,
            HashMap::from([(1, info("a"))]),
            &mut departed,
            t0,
        );
        // Later than DEPARTED_FOR: gone.
        merge_names(
            &mut names,
            HashMap::from([(1, info("a"))]),
            &mut departed,
            t0 + DEPARTED_FOR,
        );
        assert!(!names.contains_key(&2));
    }

    #[test]
    fn departed_names_are_bounded() {
        let t0 = Instant::now();
        let (mut names, mut departed) = (HashMap::new(), HashMap::new());
        let all: HashMap<u64, NsInfo> = (0..DEPARTED_MAX as u64 + 10)
            .map(|c| (c, info("x")))
            .collect();
        merge_names(&mut names, all, &mut departed, t0);
        merge_names(&mut names, HashMap::new(), &mut departed, t0);
        assert_eq!(names.len(), DEPARTED_MAX);
    }
}

/// How long a namespace no longer served keeps its name in flow records, and
/// how many such names are kept.
const DEPARTED_FOR: Duration = Duration::from_secs(300);
const DEPARTED_MAX: usize = 4096;

/// A socket bound to a listen port whose listener the agent looks for.
struct Pending {
    cookie: u64,
    pid: i32,
    since: Instant,
    next: Instant,
    tries: u32,
}

/// Looks for a bound socket's listener: quickly at first (bind() and listen()
/// are back to back in every server), then backing off.
const PENDING_BACKOFF: [Duration; 8] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
];
/// A process found not to qualify is asked about again on its next bind after
/// this (a wrapper that has exec'd its server since), and by the /proc scan
/// after [`RECHECK_SCANNED`].
const RECHECK_BOUND: Duration = Duration::from_secs(1);
const RECHECK_SCANNED: Duration = Duration::from_secs(300);

/// A socket bound but not listening after this is not looked for any more;
/// the resync would find a listener that comes later.
const PENDING_FOR: Duration = Duration::from_secs(3);

/// A process whose exit makes the agent look at its namespace again.
struct Witness {
    pid: i32,
    task: JoinHandle<()>,
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Agent {
    pub datapath: Datapath,
    pub settings: Settings,
    telemetry: Arc<Telemetry>,
    names: Arc<Mutex<HashMap<u64, NsInfo>>>,
    /// Namespaces no longer served, as records named them, for a while:
    /// connections open when one went close later, and their close records
    /// must say what their open records said.
    departed: HashMap<u64, (Instant, NsInfo)>,
    origins: HashMap<u64, Origin>,
    /// Reads what processes claim, off this loop.
    inspector: Inspector,
    /// The last verdict per (pid, namespace): yes or no, when, and the
    /// program the process ran then (an exec since asks again at once).
    verdicts: HashMap<(i32, u64), (bool, Instant, Option<PathBuf>)>,
    /// Processes whose inspection stalled: not asked about again.
    stalled: HashSet<(i32, u64)>,
    /// Namespaces refused because their pod has enough served.
    refused_per_pod: HashSet<u64>,
    /// The inspector's figures in the state file last written.
    published_inspector: inspector::Summary,
    /// `listener_quota_exceeded` when the state file was last written: a
    /// namespace at its quota is shown by `status` once it moves.
    published_quota_exceeded: u64,
    witnesses: HashMap<u64, Witness>,
    exits: mpsc::UnboundedSender<u64>,
    /// Per namespace: the listening socket inodes last seen and their owner.
    owners: HashMap<u64, (Vec<u64>, Option<Owner>)>,
    /// Unservable listeners already logged: (netns cookie, inode, reason).
    reported: HashSet<(u64, u64, Reason)>,
    /// Where the resync goes on next, and when /proc was last scanned.
    resync_cursor: usize,
    last_scan: Option<Instant>,
    /// Bound sockets whose listener is looked for.
    pending: Vec<Pending>,
    /// The served set or what it reports changed: publish at the next tick.
    dirty: bool,
    /// With `--kube`: the pods the API selected.
    pods: pods::Pods,
}

/// The served namespaces, as `redirector status` reads them from the state
/// file the agent keeps.
#[derive(Serialize, serde::Deserialize, Debug, Clone, Default)]
pub struct State {
    pub pid: u32,
    pub sock_ops_cgroup: String,
    /// Where `sock_ops` is attached.
    pub sock_ops_attached: Vec<String>,
    /// How new listeners are found.
    pub listen_events: String,
    pub resync_interval_secs: u64,
    pub namespaces: Vec<NsState>,
    /// What reading other pods' processes and files cost: stalls, refusals.
    #[serde(default)]
    pub inspector: inspector::Summary,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone, Default)]
pub struct NsState {
    pub netns: String,
    pub cookie: u64,
    /// Why it is served.
    pub why: String,
    pub sock_ops_cgroups: Vec<String>,
    /// Listeners whose connections get no flow records, and why.
    pub sock_ops_problems: Vec<String>,
    /// Listeners `sock_ops` registered here that still listen (its quota is
    /// `LISTENERS_PER_NETNS`).
    #[serde(default)]
    pub listeners_held: i64,
}

impl Agent {
    pub fn new(
        datapath: Datapath,
        settings: Settings,
        telemetry: Arc<Telemetry>,
        names: Arc<Mutex<HashMap<u64, NsInfo>>>,
        exits: mpsc::UnboundedSender<u64>,
        inspector: Inspector,
    ) -> Self {
        Self {
            datapath,
            settings,
            telemetry,
            names,
            departed: HashMap::new(),
            origins: HashMap::new(),
            inspector,
            verdicts: HashMap::new(),
            stalled: HashSet::new(),
            refused_per_pod: HashSet::new(),
            published_inspector: inspector::Summary::default(),
            published_quota_exceeded: 0,
            witnesses: HashMap::new(),
            exits,
            owners: HashMap::new(),
            reported: HashSet::new(),
            resync_cursor: 0,
            last_scan: None,
            pending: Vec::new(),
            dirty: true,
            pods: pods::Pods::default(),
        }
    }

    /// Starts serving an operator-listed namespace (fatal if it fails: the
    /// operator asked for it by name).
    pub fn serve_explicit(&mut self, netns: Netns) -> Result<()> {
        let origin = Origin::Explicit {
            path: netns.path.clone(),
            ino: netns.inode(),
        };
        let cookie = netns.cookie;
        self.serve(netns, &[])?;
        self.origins.insert(cookie, origin);
        Ok(())
    }

    fn serve(&mut self, netns: Netns, hint: &[i32]) -> Result<()> {
        let cookie = netns.cookie;
        let redirects = self.settings.redirects.clone();
        self.datapath.serve(netns, &redirects, hint)?;
        self.announce(cookie);
        Ok(())
    }

    /// The status line of a namespace just served.
    fn announce(&mut self, cookie: u64) {
        let Some(served) = self
            .datapath
            .served
            .iter()
            .find(|s| s.netns.cookie == cookie)
        else {
            return;
        };
        let ports: Vec<String> = served
            .redirects
            .iter()
            .map(|r: &Redirect| format!("{} -> {}", r.advertise_port, r.listen_port))
            .collect();
        tracing::info!(
            "{} sk_lookup in netns {}: {}, {} listener(s) registered{}",
            if served.adopted {
                "adopted"
            } else {
                "attached"
            },
            served.netns,
            ports.join(", "),
            served.report.registered,
            if served.report.unservable.is_empty() {
                String::new()
            } else {
                format!(", {} NOT registered", served.report.unservable.len())
            }
        );
        for problem in &served.sock_ops.problems {
            tracing::warn!("netns {}: {problem}", served.netns);
        }
        self.dirty = true;
    }

    /// Serves the namespace with `cookie` of a bind event: `pid`'s, unless
    /// the bind came from a thread of it in another namespace (left to the
    /// resync's /proc scan, which finds namespaces by their processes).
    fn serve_discovered(&mut self, found: Found, cookie: u64) {
        self.serve_discovered_many(vec![found], Some(cookie));
    }

    /// Serves namespaces discovery found, (inode, a process in it, why), in
    /// one batch.
    fn serve_discovered_many(&mut self, found: Vec<Found>, cookie: Option<u64>) {
        let mut batch = Vec::new();
        let mut meta = HashMap::new();
        for Found { ino, pid, why, pod } in found {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // The process may have exited since: the next event or resync retries.
            let netns = match Netns::open(&path) {
                Ok(n) if n.inode() == ino && cookie.is_none_or(|c| c == n.cookie) => n,
                Ok(_) | Err(_) => continue,
            };
            meta.insert(netns.cookie, (ino, pid, why, pod));
            batch.push((netns, vec![pid]));
        }
        if batch.is_empty() {
            return;
        }
        let redirects = self.settings.redirects.clone();
        for (cookie, name, result) in self.datapath.serve_many(batch, &redirects) {
            let Some((ino, pid, why, pod)) = meta.remove(&cookie) else {
                continue;
            };
            match result {
                Ok(()) => {
                    self.announce(cookie);
                    tracing::info!("serving netns net:[{ino}]: {why}");
                    self.origins.insert(
                        cookie,
                        Origin::Discovered {
                            ino,
                            why,
                            without_listener_since: None,
                            pod,
                        },
                    );
                    self.watch(cookie, pid);
                }
                Err(e) => tracing::warn!("serving discovered netns {name}: {e:#}"),
            }
        }
    }

    /// Makes `pid` the witness of namespace `cookie`.
    fn watch(&mut self, cookie: u64, pid: i32) {
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(_) => {
                // Already gone: look at the namespace now.
                let _ = self.exits.send(cookie);
                return;
            }
        };
        let exits = self.exits.clone();
        let task = tokio::spawn(async move {
            // A pidfd turns readable when its process exits.
            // SAFETY: the AsyncFd owns the pidfd and keeps it open, unchanged,
            // until it is dropped.
            if let Ok(fd) =
                unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            {
                let _ = fd.readable().await;
            }
            let _ = exits.send(cookie);
        });
        self.witnesses.insert(cookie, Witness { pid, task });
    }

    /// Bind events: serve the caller's namespace if it is new and its process
    /// qualifies, then look for its listener until it listens (bind() comes
    /// just before listen()).
    pub fn on_listen(&mut self, events: &[ListenEvent]) {
        let now = Instant::now();
        for e in events {
            if e.kind == LISTEN_EVENT_STOPPED {
                // A registered listener stopped: remove its entry if it was
                // shut down in place, and register the members of its
                // SO_REUSEPORT group that had no slot, now rather than at
                // the resync.
                if self.datapath.reconcile(e.netns_cookie, &[]) {
                    self.after_reconcile(e.netns_cookie);
                    self.log_repairs();
                    self.dirty = true;
                }
                continue;
            }
            let pid = e.tgid as i32;
            let root_scope = self.datapath.sock_ops.scope == Scope::Root;
            let Some(served) = self
                .datapath
                .served
                .iter()
                .find(|s| s.netns.cookie == e.netns_cookie)
            else {
                if self.settings.discover {
                    if let Some(ino) = discovery::netns_inode(pid) {
                        let origin = Asked::Bind {
                            cookie: e.netns_cookie,
                        };
                        self.ask(pid, ino, origin, RECHECK_BOUND);
                    }
                }
                // Looked for once the inspector says it qualifies.
                continue;
            };
            // sock_ops on its pod registers what listens there, in the
            // kernel: no reconcile needed (and a pod that binds in a loop
            // costs this loop nothing).
            if root_scope
                || self
                    .datapath
                    .sock_ops
                    .cgroups_of(served.netns.cookie)
                    .next()
                    .is_some()
            {
                continue;
            }
            // Bound again (a live-store restarting in place): look from now.
            if let Some(p) = self
                .pending
                .iter_mut()
                .find(|p| p.cookie == e.netns_cookie && p.pid == pid)
            {
                (p.since, p.next, p.tries) = (now, now, 0);
                continue;
            }
            self.pending.push(Pending {
                cookie: e.netns_cookie,
                pid,
                since: now,
                next: now,
                tries: 0,
            });
        }
    }

    /// Asks the inspector about process `pid` unless its inspection stalled,
    /// or it was found not to qualify less than `recheck` ago.
    fn ask(&mut self, pid: i32, ino: u64, origin: Asked, recheck: Duration) {
        if self.stalled.contains(&(pid, ino)) {
            return;
        }
        if let Some((false, at, exe)) = self.verdicts.get(&(pid, ino)) {
            // The kernel's name for the program: no file of the pod is read.
            let same_program = *exe == std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if same_program && at.elapsed() < recheck {
                return;
            }
        }
        self.inspector.submit(Request { pid, ino, origin });
    }

    /// The inspector's answers: serve the namespace of each process that
    /// qualifies (and, found by the resync's scan, listens: those in one
    /// batch), then look for the listener of its bind.
    pub fn on_verdicts(&mut self, verdicts: Vec<Verdict>) {
        let ports = self.settings.listen_ports();
        let mut scanned = Vec::new();
        for v in verdicts {
            let Request { pid, ino, origin } = v.request;
            self.inspector.done(&v.request);
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            self.verdicts
                .insert((pid, ino), (v.why.is_some(), Instant::now(), exe));
            let Some(why) = v.why else {
                tracing::debug!("pid {pid} in net:[{ino}]: not a process to serve");
                continue;
            };
            if self.origins.values().any(|o| o.ino() == ino)
                || scanned.iter().any(|f: &Found| f.ino == ino)
            {
                continue;
            }
            if let Some(pod) = &v.pod {
                let held = self
                    .origins
                    .values()
                    .filter(|o| matches!(o, Origin::Discovered { pod: Some(p), .. } if p == pod))
                    .count()
                    + scanned
                        .iter()
                        .filter(|f| f.pod.as_ref() == Some(pod))
                        .count();
                if held >= NAMESPACES_PER_POD {
                    self.refuse_per_pod(pid, ino, pod);
                    continue;
                }
            }
            let found = Found {
                ino,
                pid,
                why,
                pod: v.pod,
            };
            match origin {
                Asked::Bind { cookie } => {
                    self.serve_discovered(found, cookie);
                    let served = self
                        .datapath
                        .served
                        .iter()
                        .any(|s| s.netns.cookie == cookie);
                    if served && !self.has_listener(cookie) {
                        let now = Instant::now();
                        self.pending.push(Pending {
                            cookie,
                            pid,
                            since: now,
                            next: now,
                            tries: 0,
                        });
                    }
                }
                Asked::Scan => {
                    if discovery::listens(pid, &ports) {
                        scanned.push(found);
                    }
                }
            }
        }
        if !scanned.is_empty() {
            self.serve_discovered_many(scanned, None);
        }
    }

    /// A namespace not served because its pod has [`NAMESPACES_PER_POD`]
    /// served already: counted, logged once per namespace.
    fn refuse_per_pod(&mut self, pid: i32, ino: u64, pod: &str) {
        if self.refused_per_pod.insert(ino) {
            self.inspector.metrics.refused_per_pod();
            tracing::warn!(
                "net:[{ino}] of pid {pid} not served: its pod {} has {NAMESPACES_PER_POD} served network namespaces already (a pod has one; more are its own unshare(CLONE_NEWNET))",
                sanitize(pod, 256)
            );
            self.dirty = true;
        }
    }

    /// Whether the inspector still has questions open (startup waits for the
    /// first scan's answers).
    pub fn inspecting(&self) -> bool {
        self.inspector.busy()
    }

    /// When the next look for a bound socket's listener is due.
    pub fn next_pending(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.next).min()
    }

    /// Looks for the listeners of bound sockets whose look is due: a
    /// reconcile of their namespace, which registers them (and attaches
    /// `sock_ops` to their pod) once they listen.
    pub fn on_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<Pending> = {
            let (due, later) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| p.next <= now);
            self.pending = later;
            due
        };
        for mut p in due {
            let before = self.inodes(p.cookie);
            if !self.datapath.reconcile(p.cookie, &[p.pid]) {
                continue;
            }
            self.after_reconcile(p.cookie);
            self.log_repairs();
            let after = self.inodes(p.cookie);
            if after != before {
                self.dirty = true;
            }
            // A new listener appeared, or the socket was bound for something
            // else (a bind() that never listens): stop looking after a while.
            if after.len() > before.len() || now.duration_since(p.since) >= PENDING_FOR {
                continue;
            }
            p.tries += 1;
            p.next = now + PENDING_BACKOFF[(p.tries as usize).min(PENDING_BACKOFF.len() - 1)];
            self.pending.push(p);
        }
    }

    fn has_listener(&self, cookie: u64) -> bool {
        !self.inodes(cookie).is_empty()
    }

    /// The witness of namespace `cookie` exited.
    pub fn on_exit(&mut self, cookie: u64) {
        let ino = match self.origins.get(&cookie) {
            Some(Origin::Discovered { ino, .. }) => *ino,
            // A pod's sandbox holds its namespace: another process there
            // (a container) keeps it alive for a while, none means it went.
            Some(Origin::Pod { ino, .. }) => {
                let ino = *ino;
                match discovery::pids_in(ino).first() {
                    Some(&pid) => self.watch(cookie, pid),
                    None => self.drop_namespace(cookie, "its pod's sandbox exited"),
                }
                return;
            }
            _ => return,
        };
        let pids = discovery::pids_in(ino);
        let Some(&first) = pids.first() else {
            self.drop_namespace(cookie, "no process is left in the namespace");
            return;
        };
        if self.witnesses.get(&cookie).map(|w| w.pid) != Some(first) {
            self.watch(cookie, first);
        }
        // Its live-store may have been the one that exited.
        self.datapath.reconcile(cookie, &pids);
        self.after_reconcile(cookie);
        self.dirty = true;
    }

    fn drop_namespace(&mut self, cookie: u64, why: &str) {
        if let Some(Origin::Pod { uid, .. }) = self.origins.remove(&cookie) {
            if let Some(pod) = self.pods.by_uid.get_mut(&uid) {
                pod.cookie = None;
            }
        }
        self.witnesses.remove(&cookie);
        if let Some(netns) = self.datapath.unserve(cookie) {
            tracing::info!("detached sk_lookup from netns {netns}: {why}");
        }
        self.dirty = true;
    }

    /// Starts (or ends) the listener grace of a discovered namespace after a
    /// reconcile pass over it.
    fn after_reconcile(&mut self, cookie: u64) {
        let has_listener = self
            .datapath
            .served
            .iter()
            .find(|s| s.netns.cookie == cookie)
            .is_some_and(|s| !s.report.inodes.is_empty());
        if let Some(Origin::Discovered {
            without_listener_since,
            ..
        }) = self.origins.get_mut(&cookie)
        {
            if has_listener {
                *without_listener_since = None;
            } else {
                without_listener_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// The once-a-second work: see the module comment.
    pub fn tick(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut gone: Vec<(u64, &'static str)> = Vec::new();
        let mut in_grace = Vec::new();
        for (cookie, origin) in &self.origins {
            match origin {
                Origin::Explicit { path, ino } => {
                    // A deleted bind mount (ip netns del) or a dead process: the
                    // path no longer names the namespace we hold open.
                    if std::fs::metadata(path).map(|m| m.ino()).ok() != Some(*ino) {
                        gone.push((*cookie, "its namespace path is gone"));
                    }
                }
                Origin::Discovered {
                    without_listener_since: Some(_),
                    ..
                } => in_grace.push(*cookie),
                Origin::Discovered { .. } | Origin::Pod { .. } => {}
            }
        }
        for (cookie, why) in gone {
            self.drop_namespace(cookie, why);
        }
        // Namespaces waiting for their live-store to listen again.
        for cookie in in_grace {
            self.datapath.reconcile(cookie, &[]);
            self.after_reconcile(cookie);
            if let Some(Origin::Discovered {
                without_listener_since: Some(since),
                ..
            }) = self.origins.get(&cookie)
            {
                if now.duration_since(*since) >= self.settings.listener_grace {
                    self.drop_namespace(cookie, "its live-store stopped listening");
                }
            }
        }
        self.check_inspections();
        let quota_exceeded = self
            .telemetry
            .kernel_counter(redirector_common::Counter::ListenerQuotaExceeded);
        if self.inspector.summary() != self.published_inspector
            || quota_exceeded != self.published_quota_exceeded
        {
            self.published_quota_exceeded = quota_exceeded;
            self.dirty = true;
        }
        self.resync_slice();
        if self.settings.discover {
            let due = self
                .last_scan
                .is_none_or(|t| now.duration_since(t) >= self.scan_interval());
            if due {
                self.scan();
            }
        }
        self.datapath.check_pins();
        self.report_listeners();
        if self.dirty {
            self.publish()?;
        }
        Ok(())
    }

    /// Without listen events, /proc is the only way to find new live-stores:
    /// scanned every tick, as before the events.
    fn scan_interval(&self) -> Duration {
        if self.datapath.listen_events.is_ok() {
            self.settings.resync_interval
        } else {
            Duration::from_secs(1)
        }
    }

    /// Reconciles the next share of the served namespaces, so each is
    /// reconciled once per resync interval.
    fn resync_slice(&mut self) {
        let n = self.datapath.served.len();
        if n == 0 {
            return;
        }
        let ticks = self.scan_interval().as_secs().max(1) as usize;
        let per_tick = n.div_ceil(ticks);
        let cookies: Vec<u64> = (0..per_tick)
            .map(|i| {
                self.datapath.served[(self.resync_cursor + i) % n]
                    .netns
                    .cookie
            })
            .collect();
        self.resync_cursor = (self.resync_cursor + per_tick) % n;
        for cookie in cookies {
            let before = self.inodes(cookie);
            if !self.datapath.resync(cookie) {
                continue;
            }
            self.after_reconcile(cookie);
            if self.inodes(cookie) != before {
                self.dirty = true;
            }
        }
    }

    fn inodes(&self, cookie: u64) -> Vec<u64> {
        self.datapath
            .served
            .iter()
            .find(|s| s.netns.cookie == cookie)
            .map(|s| s.report.inodes.clone())
            .unwrap_or_default()
    }

    /// Asks the inspector about every process in a namespace not served yet;
    /// the answers serve those with a live-store (`on_verdict`).
    pub fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let served: HashSet<u64> = self.origins.values().map(Origin::ino).collect();
        let processes = discovery::processes();
        let alive: HashSet<(i32, u64)> = processes.iter().copied().collect();
        self.verdicts.retain(|k, _| alive.contains(k));
        self.stalled.retain(|k| alive.contains(k));
        let inos: HashSet<u64> = alive.iter().map(|(_, ino)| *ino).collect();
        self.refused_per_pod.retain(|ino| inos.contains(ino));
        for (pid, ino) in processes {
            if !served.contains(&ino) {
                self.ask(pid, ino, Asked::Scan, RECHECK_SCANNED);
            }
        }
    }

    /// Abandons inspections past their deadline: those processes are not
    /// asked about again, and the rest of discovery goes on.
    fn check_inspections(&mut self) {
        for r in self.inspector.check_stalls() {
            tracing::warn!(
                "inspecting pid {} ({}) in net:[{}] took more than {:?}: abandoned, not asked again (a file in its pod that blocks reads?)",
                r.pid,
                podfs::comm(r.pid).unwrap_or_default(),
                r.ino,
                inspector::DEADLINE
            );
            self.stalled.insert((r.pid, r.ino));
            self.dirty = true;
        }
    }

    /// Logs what reconcile passes registered or removed, as it happens.
    fn log_repairs(&mut self) {
        for s in &mut self.datapath.served {
            for what in s.report.repaired.drain(..) {
                tracing::info!("netns {}: {what}", s.netns);
            }
        }
    }

    /// Logs what each reconcile pass repaired, and each unservable listener
    /// once (and when it is resolved); shares them with metrics and readiness.
    fn report_listeners(&mut self) {
        self.log_repairs();
        let mut now = HashSet::new();
        let mut unservable = Vec::new();
        for s in &mut self.datapath.served {
            for u in &s.report.unservable {
                let id = (s.netns.cookie, u.inode, u.reason);
                if !self.reported.contains(&id) {
                    tracing::warn!("netns {}: {u}", s.netns);
                }
                now.insert(id);
                unservable.push((s.netns.path.display().to_string(), u.clone()));
            }
        }
        for (cookie, inode, reason) in self.reported.difference(&now) {
            tracing::info!(
                "netns cookie {cookie}: listener socket inode {inode} no longer unservable ({reason}): registered or closed"
            );
        }
        self.reported = now;
        self.telemetry.set_unservable(unservable);
    }

    /// Shares the current set of namespaces with readiness checks, flow
    /// records (which process holds each live-store listener, looked up again
    /// only when the listening sockets change) and the state file.
    pub fn publish(&mut self) -> Result<()> {
        self.dirty = false;
        self.publish_now()
    }

    /// [`Agent::publish`] if anything changed since.
    pub fn publish_if_changed(&mut self) -> Result<()> {
        if self.dirty {
            self.publish()?;
        }
        Ok(())
    }

    fn publish_now(&mut self) -> Result<()> {
        let a = attachments(&self.datapath)?;
        self.telemetry.set_attachments(a.cgroups, a.namespaces);
        let mut infos = HashMap::new();
        for s in &self.datapath.served {
            let inodes = s.report.inodes.clone();
            let cached = self
                .owners
                .get(&s.netns.cookie)
                .filter(|(seen, _)| *seen == inodes);
            let owner = match cached {
                Some((_, owner)) => owner.clone(),
                None => {
                    let hint: Vec<i32> = self
                        .witnesses
                        .get(&s.netns.cookie)
                        .map(|w| w.pid)
                        .into_iter()
                        .collect();
                    let owner = owners::owner(&inodes, &hint);
                    self.owners.insert(s.netns.cookie, (inodes, owner.clone()));
                    owner
                }
            };
            infos.insert(
                s.netns.cookie,
                NsInfo {
                    name: self.netns_name(&s.netns),
                    listener: owner,
                    pod: match self.origins.get(&s.netns.cookie) {
                        Some(Origin::Pod { label, .. }) => Some(label.clone()),
                        _ => None,
                    },
                },
            );
        }
        self.owners.retain(|cookie, _| infos.contains_key(cookie));
        self.telemetry.set_served_pods(
            self.pods
                .by_uid
                .values()
                .filter(|p| p.cookie.is_some())
                .map(|p| {
                    [
                        p.info.namespace.clone(),
                        p.info.name.clone(),
                        p.info.node.clone(),
                    ]
                })
                .collect(),
        );
        if let Ok(mut names) = self.names.lock() {
            merge_names(&mut names, infos, &mut self.departed, Instant::now());
        }
        if let Err(e) = self.write_state() {
            tracing::warn!(
                "writing {} (read by `redirector status`): {e:#}",
                self.settings.state_file.display()
            );
        }
        Ok(())
    }

    pub fn state(&self) -> State {
        let d = &self.datapath;
        State {
            pid: std::process::id(),
            sock_ops_cgroup: match d.sock_ops.scope {
                Scope::Pod => "pod: each served live-store's pod cgroup".to_owned(),
                Scope::Root => format!(
                    "root: {} (--sock-ops-cgroup root: every connection of the node runs it)",
                    d.cgroup.display()
                ),
            },
            sock_ops_attached: d
                .sock_ops
                .attached
                .iter()
                .map(|a| a.path.display().to_string())
                .collect(),
            listen_events: match &d.listen_events {
                Ok(_) => {
                    "post_bind4/post_bind6 on the cgroup v2 root report bind() to the listen ports"
                        .to_owned()
                }
                Err(why) => format!("unavailable ({why}): /proc scanned every second"),
            },
            resync_interval_secs: self.settings.resync_interval.as_secs(),
            inspector: self.inspector.summary(),
            namespaces: d
                .served
                .iter()
                .map(|s| NsState {
                    netns: format!(
                        "{} (cookie {}){}",
                        self.netns_name(&s.netns),
                        s.netns.cookie,
                        self.witnesses
                            .get(&s.netns.cookie)
                            .map(|w| format!(", held by pid {}", w.pid))
                            .unwrap_or_default()
                    ),
                    cookie: s.netns.cookie,
                    why: match self.origins.get(&s.netns.cookie) {
                        Some(Origin::Explicit { path, .. }) => {
                            format!("listed by the operator ({})", path.display())
                        }
                        Some(Origin::Discovered { why, .. }) => format!("discovered: {why}"),
                        Some(Origin::Pod { label, uid, .. }) => {
                            format!("pod {label} (uid {uid}), selected by the Kubernetes API")
                        }
                        None => String::new(),
                    },
                    sock_ops_cgroups: d
                        .sock_ops
                        .cgroups_of(s.netns.cookie)
                        .map(|p| p.display().to_string())
                        .collect(),
                    sock_ops_problems: s.sock_ops.problems.clone(),
                    listeners_held: d.quota(s.netns.cookie).map_or(0, |q| q.listeners as i64),
                })
                .collect(),
        }
    }

    /// How records, `status` and `flows --netns` name a served namespace:
    /// the operator's path for one listed by path, else `net:[inode]`, which
    /// lasts as long as the namespace (a `/proc/PID/ns/net` path dies with the
    /// process that was looked at first).
    fn netns_name(&self, netns: &Netns) -> String {
        match self.origins.get(&netns.cookie) {
            Some(Origin::Explicit { path, .. }) => path.display().to_string(),
            _ => format!("net:[{}]", netns.inode()),
        }
    }

    fn write_state(&mut self) -> Result<()> {
        self.published_inspector = self.inspector.summary();
        let path = &self.settings.state_file;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state())?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Removes the state file: the agent is leaving.
    pub fn remove_state(&self) {
        let _ = std::fs::remove_file(&self.settings.state_file);
    }
}

pub fn attachments(datapath: &Datapath) -> Result<Attachments> {
    let reopen = |f: &File| f.try_clone().context("duplicating a namespace fd");
    Ok(Attachments {
        cgroups: datapath
            .sock_ops
            .attached
            .iter()
            // A cgroup removed meanwhile (its pod went) is dropped by the
            // next reconcile of its namespace.
            .filter_map(|a| {
                let dir = File::open(&a.path).ok()?;
                Some((a.path.display().to_string(), dir, a.link.prog_id))
            })
            .collect(),
        namespaces: datapath
            .served
            .iter()
            .map(|s| {
                Ok((
                    s.netns.path.display().to_string(),
                    reopen(&s.netns.file)?,
                    s.link.prog_id,
                ))
            })
            .collect::<Result<_>>()?,
    })
}

/// Forwards `redir_listen`'s events to the agent loop, a batch per wakeup.
/// The channel is bounded: while the loop is behind, the reader waits and the
/// kernel's ring fills, whose overflow the kernel counts
/// (`listen_events_dropped`); the resync finds what was dropped.
pub fn spawn_listen_events(map: MapData, tx: mpsc::Sender<Vec<ListenEvent>>) -> Result<()> {
    let ring = RingBuf::try_from(Map::RingBuf(map)).context("LISTEN_EVENTS ring buffer")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until
    // the AsyncFd (which owns the RingBuf) is dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .context("watching the LISTEN_EVENTS ring")?;
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            let mut seen = HashSet::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<ListenEvent>() {
                    // SAFETY: the kernel wrote a ListenEvent (repr(C), plain
                    // integers) here; read unaligned from the ring's bytes.
                    let e: ListenEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    // A bind()/close() storm repeats the same socket owner:
                    // one event per (namespace, process, port) is enough.
                    if seen.insert((e.netns_cookie, e.tgid, e.port)) {
                        batch.push(e);
                    }
                }
            }
            guard.clear_ready();
            if !batch.is_empty() && tx.send(batch).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
