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

mod discovered;
mod pods;
mod publish;

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

    pub(super) fn serve(&mut self, netns: Netns, hint: &[i32]) -> Result<()> {
        let cookie = netns.cookie;
        let redirects = self.settings.redirects.clone();
        self.datapath.serve(netns, &redirects, hint)?;
        self.announce(cookie);
        Ok(())
    }

    /// The status line of a namespace just served.
    pub(super) fn announce(&mut self, cookie: u64) {
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

    pub(super) fn has_listener(&self, cookie: u64) -> bool {
        !self.inodes(cookie).is_empty()
    }

    pub(super) fn drop_namespace(&mut self, cookie: u64, why: &str) {
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
    pub(super) fn after_reconcile(&mut self, cookie: u64) {
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
    pub(super) fn scan_interval(&self) -> Duration {
        if self.datapath.listen_events.is_ok() {
            self.settings.resync_interval
        } else {
            Duration::from_secs(1)
        }
    }

    /// Reconciles the next share of the served namespaces, so each is
    /// reconciled once per resync interval.
    pub(super) fn resync_slice(&mut self) {
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

    pub(super) fn inodes(&self, cookie: u64) -> Vec<u64> {
        self.datapath
            .served
            .iter()
            .find(|s| s.netns.cookie == cookie)
            .map(|s| s.report.inodes.clone())
            .unwrap_or_default()
    }

    /// Logs what reconcile passes registered or removed, as it happens.
    pub(super) fn log_repairs(&mut self) {
        for s in &mut self.datapath.served {
            for what in s.report.repaired.drain(..) {
                tracing::info!("netns {}: {what}", s.netns);
            }
        }
    }

    /// Logs what each reconcile pass repaired, and each unservable listener
    /// once (and when it is resolved); shares them with metrics and readiness.
    pub(super) fn report_listeners(&mut self) {
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
