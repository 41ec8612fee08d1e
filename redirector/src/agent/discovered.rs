//! What discovery brings to the served set: bind events, the inspector's
//! verdicts on the processes behind them, binds waiting to become listeners,
//! the /proc scan, and the exits of namespaces' witness processes.

use super::*;

impl Agent {
    /// Serves the namespace with `cookie` of a bind event: `pid`'s, unless
    /// the bind came from a thread of it in another namespace (left to the
    /// resync's /proc scan, which finds namespaces by their processes).
    pub(super) fn serve_discovered(&mut self, found: Found, cookie: u64) {
        self.serve_discovered_many(vec![found], Some(cookie));
    }

    /// Serves namespaces discovery found, (inode, a process in it, why), in
    /// one batch.
    pub(super) fn serve_discovered_many(&mut self, found: Vec<Found>, cookie: Option<u64>) {
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
    pub(super) fn watch(&mut self, cookie: u64, pid: i32) {
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
    pub(super) fn ask(&mut self, pid: i32, ino: u64, origin: Asked, recheck: Duration) {
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
    pub(super) fn refuse_per_pod(&mut self, pid: i32, ino: u64, pod: &str) {
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
    pub(super) fn check_inspections(&mut self) {
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
}
