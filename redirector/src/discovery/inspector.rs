//! Where the agent reads what other pods control, so that nothing they do can
//! stall it.
//!
//! The agent's loop owns the served set and never touches a pod's files: it
//! hands (pid, namespace) to the inspector and goes on serving, delivering
//! flow records, answering signals and HTTP. A few worker threads read each
//! process's command line and config file (`podfs`: inside its root, regular
//! files only, capped) and send back a verdict. A worker still busy after
//! [`DEADLINE`] (a FUSE file that never answers, a process holding its
//! memory lock) is abandoned: counted, reported, replaced by a fresh thread
//! (up to [`MAX_ABANDONED`] in the agent's life), and that process is not
//! asked about again. The job queue is bounded; a full queue drops the request
//! (counted), and the next bind or resync asks again.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self as std_mpsc, Receiver, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::mpsc;

use super::cgroup_pattern_matches;
use super::{
    podfs::{self, sanitize, PodFileError},
    role,
};
use crate::sys::cgroup_ids::{self as cgroups, pod_of};

/// A process's inspection may take this long before it is abandoned.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// Worker threads reading pods' files.
const WORKERS: usize = 2;
/// Stuck threads the agent accepts over its life before it stops replacing
/// them (each holds a few pages of stack and whatever blocks it).
pub const MAX_ABANDONED: u64 = 16;
/// Requests waiting for a worker.
const QUEUE: usize = 1024;

/// Why a process is looked at, which decides what happens with a yes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It bound a listen port in the namespace with this cookie.
    Bind { cookie: u64 },
    /// The resync's /proc scan found it in a namespace not served.
    Scan,
}

#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub pid: i32,
    /// Its network namespace's inode.
    pub ino: u64,
    pub origin: Origin,
}

/// What the inspector found: why the process is one to serve, or `None`,
/// and the Kubernetes pod it runs in (its pod cgroup's path), if any.
#[derive(Debug)]
pub struct Verdict {
    pub request: Request,
    pub why: Option<String>,
    pub pod: Option<String>,
}

/// What qualifies a process: its cgroup (`--cgroup-pattern`, set by the node,
/// not by the pod) and its Tempo target (`--serve-target`, its own claim).
#[derive(Clone, Debug)]
pub struct Policy {
    pub cgroup_pattern: Option<String>,
    pub targets: Vec<String>,
}

impl Policy {
    /// Why process `pid` is one to serve, or `None`. Reads what the process
    /// controls: on an inspector thread only.
    fn inspect(&self, pid: i32, metrics: &Metrics) -> (Option<String>, Option<String>) {
        // Written by the kernel, not the pod.
        let cgroups = cgroups::of_pid(pid);
        let pod = cgroups::unified(&cgroups)
            .and_then(|p| pod_of(p.trim()))
            .map(str::to_owned);
        if let Some(pattern) = &self.cgroup_pattern {
            // Any hierarchy's path (v1 and v2 lines alike).
            if !cgroups
                .iter()
                .any(|c| cgroup_pattern_matches(pattern, &c.pathname))
            {
                return (None, pod);
            }
        }
        (self.qualifies(pid, metrics), pod)
    }

    /// [`Policy::inspect`] past the cgroup check.
    fn qualifies(&self, pid: i32, metrics: &Metrics) -> Option<String> {
        if self.targets.iter().any(|t| t == role::ANY) {
            return Some(format!("pid {pid} listens (--serve-target any)"));
        }
        let role = role::of_pid(pid, &|path, e| {
            metrics.refused(&e);
            tracing::debug!("pid {pid}: config file {} {e}", sanitize(path, 128));
        });
        role::matches(&self.targets, role.as_ref()).then(|| {
            format!(
                "pid {pid} ({}) is a Tempo {}: {}",
                podfs::comm(pid).unwrap_or_default(),
                role.as_ref()
                    .map_or(String::new(), |r| sanitize(&r.target, 64)),
                role.as_ref().map(|r| r.to_string()).unwrap_or_default()
            )
        })
    }
}

/// What the inspector counts, also shown by `redirector status`.
#[derive(Default)]
pub struct Metrics {
    stalled: Counter,
    dropped: Counter,
    refused: Family<Vec<(String, String)>, Counter>,
    workers: Gauge,
    namespaces_refused: Counter,
    refused_not_regular: AtomicU64,
    refused_too_large: AtomicU64,
    refused_other: AtomicU64,
}

impl Metrics {
    /// A namespace not served: its pod has enough served already.
    pub fn refused_per_pod(&self) {
        self.namespaces_refused.inc();
    }

    fn refused(&self, e: &PodFileError) {
        let (label, n) = match e {
            PodFileError::NotRegular(_) => ("not_regular", &self.refused_not_regular),
            PodFileError::TooLarge(_) => ("too_large", &self.refused_too_large),
            PodFileError::CwdOutsideRoot | PodFileError::Io(_) => {
                ("unreadable", &self.refused_other)
            }
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.refused
            .get_or_create(&vec![("reason".to_owned(), label.to_owned())])
            .inc();
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pod_inspections_stalled",
            "Inspections of a process's command line and config file abandoned after their deadline (a file that blocks reads): the process is not inspected again",
            self.stalled.clone(),
        );
        registry.register(
            "pod_inspections_dropped",
            "Inspections not queued because the inspector's queue was full (asked again at the next bind or resync)",
            self.dropped.clone(),
        );
        registry.register(
            "pod_files_refused",
            "Config files named by a process's command line that were not read, by reason (not_regular: a FIFO, device or socket; too_large; unreadable)",
            self.refused.clone(),
        );
        registry.register(
            "namespaces_refused_per_pod",
            "Network namespaces with a live-store not served because their Kubernetes pod already has as many served as a pod may (namespaces a pod made itself)",
            self.namespaces_refused.clone(),
        );
        registry.register(
            "pod_inspector_workers",
            "Inspector threads able to take work (abandoned ones excluded)",
            self.workers.clone(),
        );
    }
}

/// A summary for `redirector status`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub workers: u64,
    pub stalled: u64,
    pub dropped: u64,
    pub files_not_regular: u64,
    pub files_too_large: u64,
    pub files_unreadable: u64,
    #[serde(default)]
    pub namespaces_refused_per_pod: u64,
}

struct Worker {
    /// The request being inspected and since when.
    busy: Mutex<Option<(Instant, Request)>>,
    /// Set by the supervisor: a replacement runs, this thread ends when (if)
    /// its inspection returns.
    abandoned: AtomicBool,
}

pub struct Inspector {
    jobs: SyncSender<Request>,
    queue: Arc<Mutex<Receiver<Request>>>,
    verdicts: mpsc::UnboundedSender<Verdict>,
    policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    workers: Vec<Arc<Worker>>,
    abandoned: u64,
    /// (pid, namespace) queued or being inspected: asked once at a time.
    in_flight: HashSet<(i32, u64)>,
}

impl Inspector {
    /// Starts the workers; verdicts arrive on the returned receiver. The
    /// unbounded channel holds at most the queue plus one per worker.
    pub fn start(policy: Policy) -> (Self, mpsc::UnboundedReceiver<Verdict>) {
        let (jobs, queue) = std_mpsc::sync_channel(QUEUE);
        let (verdicts, rx) = mpsc::unbounded_channel();
        let mut inspector = Self {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            verdicts,
            policy: Arc::new(policy),
            metrics: Arc::new(Metrics::default()),
            workers: Vec::new(),
            abandoned: 0,
            in_flight: HashSet::new(),
        };
        for _ in 0..WORKERS {
            inspector.spawn_worker();
        }
        (inspector, rx)
    }

    fn spawn_worker(&mut self) {
        let worker = Arc::new(Worker {
            busy: Mutex::new(None),
            abandoned: AtomicBool::new(false),
        });
        let (me, queue, verdicts, policy, metrics) = (
            worker.clone(),
            self.queue.clone(),
            self.verdicts.clone(),
            self.policy.clone(),
            self.metrics.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("pod-inspector".into())
            .spawn(move || loop {
                let request = {
                    let Ok(queue) = queue.lock() else { return };
                    match queue.recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                };
                if let Ok(mut busy) = me.busy.lock() {
                    *busy = Some((Instant::now(), request));
                }
                let (why, pod) = policy.inspect(request.pid, &metrics);
                if let Ok(mut busy) = me.busy.lock() {
                    *busy = None;
                }
                // A late verdict is still true; the thread that was replaced
                // ends after giving it.
                if verdicts.send(Verdict { request, why, pod }).is_err()
                    || me.abandoned.load(Ordering::Acquire)
                {
                    return;
                }
            });
        match spawned {
            Ok(_) => self.workers.push(worker),
            // The node is out of threads: the remaining workers go on.
            Err(e) => tracing::error!("starting a pod inspector thread: {e}"),
        }
        self.metrics.workers.set(self.workers.len() as i64);
    }

    /// Queues `request` unless the same process is already queued. False if
    /// it was not queued (already queued, or the queue is full: counted).
    pub fn submit(&mut self, request: Request) -> bool {
        let key = (request.pid, request.ino);
        if self.in_flight.contains(&key) {
            return false;
        }
        if self.workers.is_empty() {
            self.metrics.dropped.inc();
            return false;
        }
        match self.jobs.try_send(request) {
            Ok(()) => {
                self.in_flight.insert(key);
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.dropped.inc();
                false
            }
        }
    }

    /// A verdict for this process arrived.
    pub fn done(&mut self, request: &Request) {
        self.in_flight.remove(&(request.pid, request.ino));
    }

    /// Whether requests are queued or being inspected.
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Abandons workers past their deadline and replaces them. Returns the
    /// processes whose inspection stalled.
    pub fn check_stalls(&mut self) -> Vec<Request> {
        let now = Instant::now();
        let mut stalled = Vec::new();
        self.workers.retain(|w| {
            let stuck = w
                .busy
                .lock()
                .ok()
                .and_then(|b| *b)
                .filter(|(since, _)| now.duration_since(*since) >= DEADLINE);
            match stuck {
                Some((_, request)) => {
                    w.abandoned.store(true, Ordering::Release);
                    stalled.push(request);
                    false
                }
                None => true,
            }
        });
        for request in &stalled {
            self.metrics.stalled.inc();
            self.in_flight.remove(&(request.pid, request.ino));
            self.abandoned += 1;
            if self.abandoned <= MAX_ABANDONED {
                self.spawn_worker();
            } else {
                tracing::error!(
                    "{} pod inspections have stalled: no more inspector threads are started; discovery by process continues on {} thread(s)",
                    self.abandoned,
                    self.workers.len()
                );
            }
        }
        self.metrics.workers.set(self.workers.len() as i64);
        stalled
    }

    pub fn summary(&self) -> Summary {
        let m = &self.metrics;
        Summary {
            workers: self.workers.len() as u64,
            stalled: m.stalled.get(),
            dropped: m.dropped.get(),
            files_not_regular: m.refused_not_regular.load(Ordering::Relaxed),
            files_too_large: m.refused_too_large.load(Ordering::Relaxed),
            files_unreadable: m.refused_other.load(Ordering::Relaxed),
            namespaces_refused_per_pod: m.namespaces_refused.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cgroup check reads the process's cgroups (procfs parses them) and
    /// lets only a matching one through to the target check.
    #[test]
    fn the_cgroup_pattern_decides_first() {
        let me = std::process::id() as i32;
        let own = cgroups::unified(&cgroups::of_pid(me))
            .expect("a cgroup v2 line")
            .to_owned();
        let metrics = Metrics::default();
        let why = |pattern: Option<&str>| {
            Policy {
                cgroup_pattern: pattern.map(str::to_owned),
                targets: vec![role::ANY.to_owned()],
            }
            .inspect(me, &metrics)
            .0
        };
        assert!(why(None).is_some());
        assert!(why(Some(&own)).is_some(), "substring {own}");
        assert!(why(Some("*")).is_some());
        assert!(why(Some(&format!("{own}*"))).is_some());
        assert!(why(Some("no-such-cgroup-anywhere")).is_none());
        assert!(why(Some("?no-such-cgroup*")).is_none());
    }

    /// A worker stuck on a file that never answers is abandoned after the
    /// deadline and replaced; the others go on.
    #[test]
    fn a_stalled_inspection_is_abandoned_and_replaced() {
        let (mut inspector, mut verdicts) = Inspector::start(Policy {
            cgroup_pattern: None,
            targets: vec![role::LIVE_STORE.to_owned()],
        });
        // Pretend worker 0 has been busy since before the deadline.
        let request = Request {
            pid: 1,
            ino: 7,
            origin: Origin::Scan,
        };
        *inspector.workers[0].busy.lock().expect("lock") =
            Some((Instant::now() - DEADLINE, request));
        inspector.in_flight.insert((1, 7));
        let stalled = inspector.check_stalls();
        assert_eq!(stalled.len(), 1);
        assert_eq!(inspector.summary().stalled, 1);
        assert_eq!(inspector.workers.len(), WORKERS, "replaced");
        assert!(!inspector.busy());
        // The pool still answers: this process is not Tempo.
        let me = std::process::id() as i32;
        assert!(inspector.submit(Request {
            pid: me,
            ino: 1,
            origin: Origin::Scan
        }));
        assert!(
            !inspector.submit(Request {
                pid: me,
                ino: 1,
                origin: Origin::Scan
            }),
            "the same process is asked once at a time"
        );
        let v = verdicts.blocking_recv().expect("verdict");
        assert_eq!((v.request.pid, v.why), (me, None));
    }
}
