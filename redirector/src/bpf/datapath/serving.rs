//! A namespace served: its redirects in the maps, its sk_lookup instance
//! attached, its listeners registered and reconciled, and let go.

use super::*;

impl Datapath {
    /// Starts redirecting in `netns`: registers the redirects, turns MPTCP off
    /// (unless kept), registers the listeners that already exist, then
    /// attaches (or adopts) `sk_lookup`. A listener that cannot be registered
    /// is reported in `Served::report`, never an error: the namespace is still
    /// served, and the next pass retries. On error nothing stays behind.
    /// `hint`: processes in the namespace, where its listeners' owners are
    /// looked for first.
    pub fn serve(&mut self, netns: Netns, redirects: &[Redirect], hint: &[i32]) -> Result<&Served> {
        let cookie = netns.cookie;
        let (_, _, result) = self
            .serve_many(vec![(netns, hint.to_vec())], redirects)
            .pop()
            .context("one namespace in, one result out")?;
        result?;
        self.served
            .iter()
            .find(|s| s.netns.cookie == cookie)
            .context("just served")
    }

    /// [`Datapath::serve`] for many namespaces at once (an agent starting on
    /// a busy node): their `sk_lookup` instances come from one loader, which
    /// parses the kernel's BTF once. Returns each namespace's cookie, name
    /// and result; one that fails leaves nothing behind and never stops the
    /// others.
    pub fn serve_many(
        &mut self,
        batch: Vec<(Netns, Vec<i32>)>,
        redirects: &[Redirect],
    ) -> Vec<(u64, String, Result<()>)> {
        let mut out = Vec::new();
        let mut ready = Vec::new();
        for (netns, hint) in batch {
            let (cookie, name) = (netns.cookie, netns.to_string());
            match self.prepare(netns, redirects, &hint) {
                Ok(p) => ready.push(p),
                Err(e) => out.push((cookie, name, Err(e))),
            }
        }
        let to_attach: Vec<&Netns> = ready
            .iter()
            .filter(|p| p.adopted.is_none())
            .map(|p| &p.netns)
            .collect();
        let mut links = match self.attach_sk_lookups(&to_attach) {
            Ok(links) => links.into_iter(),
            Err(e) => {
                let e = format!("{e:#}");
                to_attach
                    .iter()
                    .map(|_| Err(anyhow!("{e}")))
                    .collect::<Vec<_>>()
                    .into_iter()
            }
        };
        for p in ready {
            let (cookie, name) = (p.netns.cookie, p.netns.to_string());
            let attached = match p.adopted {
                Some(link) => Ok((link, true)),
                None => links
                    .next()
                    .unwrap_or_else(|| Err(anyhow!("no sk_lookup link")))
                    .map(|link| (link, false)),
            };
            match attached {
                Ok((link, adopted)) => {
                    self.served.push(Served {
                        netns: p.netns,
                        redirects: redirects.to_vec(),
                        adopted,
                        link,
                        mptcp_was: p.mptcp_was,
                        report: p.report,
                        sock_ops: p.placement,
                        stopped_seen: None,
                    });
                    out.push((cookie, name, Ok(())));
                }
                Err(e) => {
                    self.clear_redirects(cookie, redirects);
                    self.registry.forget(cookie);
                    self.sock_ops.release(cookie);
                    self.restore_mptcp(&p.netns, p.mptcp_was.as_deref());
                    out.push((cookie, name, Err(e)));
                }
            }
        }
        self.share_flows();
        out
    }

    /// Everything serving `netns` needs but its `sk_lookup` link.
    pub(super) fn prepare(
        &mut self,
        netns: Netns,
        redirects: &[Redirect],
        hint: &[i32],
    ) -> Result<Prepared> {
        let cookie = netns.cookie;
        if self.served.iter().any(|s| s.netns.cookie == cookie) {
            bail!("network namespace {} is listed twice", netns.path.display());
        }
        if let Err(e) = self.set_redirects(cookie, redirects) {
            self.clear_redirects(cookie, redirects);
            return Err(e);
        }
        let mptcp_was = if self.keep_mptcp {
            None
        } else {
            self.disable_mptcp(&netns)
        };
        // Listeners that exist already are registered (with sock_ops in their
        // cgroups) before sk_lookup runs, so no connection finds the redirect
        // without its listener, nor a redirected connection without records.
        let mut placement = SockOpsPlacement::default();
        let report = self
            .reconcile_netns(&netns, redirects, hint, &mut placement)
            .unwrap_or_else(|e| {
                tracing::warn!("registering the listeners of {netns}: {e:#}");
                Report::default()
            });
        let adopted = self
            .pins
            .as_ref()
            .and_then(|l| Link::adopt(&l.netns_link(cookie)));
        Ok(Prepared {
            netns,
            mptcp_was,
            report,
            placement,
            adopted,
        })
    }

    /// Runs `sock_ops` in `cgroup` for namespace `cookie` (a pod's cgroup,
    /// before any of its listeners exists, and before the namespace is
    /// served: its first listen() is then registered in the kernel). A no-op
    /// in root scope. [`Datapath::unserve`] (or `release_sock_ops`) undoes it.
    pub fn attach_sock_ops(&mut self, cgroup: &Path, cookie: u64) -> Result<()> {
        if let Some(a) = self.sock_ops.ensure(cgroup, cookie, self.pins.as_ref())? {
            tracing::info!(
                "{} sock_ops on cgroup {}",
                if a.adopted { "adopted" } else { "attached" },
                cgroup.display()
            );
        }
        Ok(())
    }

    /// Detaches `sock_ops` from the cgroups only namespace `cookie` used
    /// (one that was never served after all).
    pub fn release_sock_ops(&mut self, cookie: u64) {
        self.sock_ops.release(cookie);
    }

    /// One reconcile pass over the served namespace with `cookie` (see
    /// `registry`): repairs registrations, attaches `sock_ops` where its
    /// listeners are, and refreshes its report. False if it is not served.
    pub fn reconcile(&mut self, cookie: u64, hint: &[i32]) -> bool {
        let Some(pos) = self.served.iter().position(|s| s.netns.cookie == cookie) else {
            return false;
        };
        let stopped = self.stopped_listeners(cookie);
        let mut s = self.served.swap_remove(pos);
        // Read before the pass: a stop during it is seen by the next check.
        s.stopped_seen = stopped;
        let mut placement = SockOpsPlacement::default();
        match self.reconcile_netns(&s.netns, &s.redirects, hint, &mut placement) {
            Ok(report) => {
                s.report = report;
                s.sock_ops = placement;
            }
            // The namespace may be vanishing: maintenance drops it.
            Err(e) => tracing::debug!("reconciling {}: {e:#}", s.netns),
        }
        self.served.push(s);
        let last = self.served.len() - 1;
        self.served.swap(pos, last);
        true
    }

    /// The resync's check of namespace `cookie`: whether every registration
    /// the last pass saw is still there (a few map lookups, no sock_diag walk
    /// of the node's listener table); if not, or the last pass found no
    /// listener, a full reconcile pass. True if it reconciled.
    pub fn resync(&mut self, cookie: u64) -> bool {
        let stopped = self.stopped_listeners(cookie);
        let unchanged = self
            .served
            .iter()
            .find(|s| s.netns.cookie == cookie)
            .is_some_and(|s| {
                // A namespace over its listener quota stays so until one of
                // its registrations stops (the count) or vanishes (the map):
                // a hostile pod's 20,000 listeners cost no sock_diag walk of
                // them every second.
                s.report.registered > 0
                    && s.report
                        .unservable
                        .iter()
                        .all(|u| u.reason == Reason::Quota)
                    && s.stopped_seen == stopped
                    && self.registry.unchanged(cookie)
            });
        !unchanged && self.reconcile(cookie, &[])
    }

    /// `NsQuota::stopped` of namespace `cookie`: registered listeners that
    /// stopped listening, ever. A listener shut down in place keeps its
    /// entry (and cookie), so the entries alone cannot show it.
    pub(super) fn stopped_listeners(&self, cookie: u64) -> Option<u64> {
        let m: HashMap<_, u64, NsQuota> = self.main.map(MAP_NS_QUOTAS)?.try_into().ok()?;
        m.get(&cookie, 0).ok().map(|q| q.stopped)
    }

    /// The listeners of `netns` on the listen ports: `sock_ops` attached to
    /// their cgroups first, then registered.
    pub(super) fn reconcile_netns(
        &mut self,
        netns: &Netns,
        redirects: &[Redirect],
        hint: &[i32],
        placement: &mut SockOpsPlacement,
    ) -> Result<Report> {
        let ports: Vec<u16> = redirects.iter().map(|r| r.listen_port).collect();
        let found = sys::in_netns(netns.file.as_fd(), || sockdiag::listening(&ports))
            .with_context(|| format!("listing listeners in {}", netns.path.display()))?;
        if self.sock_ops.scope == Scope::Pod {
            for l in &found {
                let addr = std::net::SocketAddr::new(l.addr, l.port);
                let Some(path) = self.cgroups.path_of(l.cgroup_id, hint) else {
                    placement.problems.push(format!(
                        "listener {addr}: its cgroup (id {}) is not under {}",
                        l.cgroup_id,
                        self.cgroup.display()
                    ));
                    continue;
                };
                let Some(scope) = self.cgroups.scope_of(&path) else {
                    placement.problems.push(format!(
                        "listener {addr} is in the cgroup v2 root: no flow records for its \
                         connections (run it in a cgroup of its own, as every container \
                         runtime does, or start the agent with --sock-ops-cgroup root)"
                    ));
                    continue;
                };
                match self
                    .sock_ops
                    .ensure(&scope, netns.cookie, self.pins.as_ref())
                {
                    // A status line, like sk_lookup's: on stderr, unprefixed.
                    Ok(Some(a)) => tracing::info!(
                        "{} sock_ops on cgroup {} (listener {addr} of {netns})",
                        if a.adopted { "adopted" } else { "attached" },
                        scope.display()
                    ),
                    Ok(None) => {}
                    Err(e) => {
                        placement.problems.push(format!("listener {addr}: {e:#}"));
                    }
                }
            }
        }
        self.registry
            .reconcile(netns, redirects, &found, hint, true)
    }

    /// Stops redirecting in the namespace with `cookie`: detaches its program
    /// (and its pin) and forgets its redirects.
    pub fn unserve(&mut self, cookie: u64) -> Option<Netns> {
        let pos = self.served.iter().position(|s| s.netns.cookie == cookie)?;
        let served = self.served.remove(pos);
        self.clear_redirects(cookie, &served.redirects);
        self.restore_mptcp(&served.netns, served.mptcp_was.as_deref());
        self.registry.forget(cookie);
        for gone in self.sock_ops.release(cookie) {
            tracing::info!("detached sock_ops from cgroup {}", gone.display());
        }
        served.link.remove();
        self.share_flows();
        Some(served.netns)
    }

    pub(super) fn set_redirects(&mut self, cookie: u64, redirects: &[Redirect]) -> Result<()> {
        let [redirect_map, listen_map, quota_map] =
            self.main
                .maps_disjoint_mut([MAP_REDIRECTS, MAP_LISTEN_PORTS, MAP_NS_QUOTAS]);
        let mut quota_map: HashMap<_, u64, NsQuota> =
            quota_map.context("NS_QUOTAS map")?.try_into()?;
        // Before the listen ports: sock_ops registers nothing in a namespace
        // without one. A previous agent's (pinned) count is kept: those
        // listeners still hold their units.
        if quota_map.get(&cookie, 0).is_err() {
            quota_map
                .insert(cookie, NsQuota::default(), 0)
                .context("adding to the NS_QUOTAS map")?;
        }
        let mut redirect_map: HashMap<_, NsPort, RedirectTarget> =
            redirect_map.context("REDIRECTS map")?.try_into()?;
        let mut listen_map: HashMap<_, NsPort, u16> =
            listen_map.context("LISTEN_PORTS map")?.try_into()?;
        for r in redirects {
            let key = NsPort::new(cookie, r.advertise_port);
            // An entry a previous agent pinned is left as it is: programs that
            // stayed attached read it, and its bind kinds describe listeners
            // registered now. A new one starts without bind kinds:
            // registrations (sock_ops, the reconcile pass) add them.
            let kept = redirect_map
                .get(&key, 0)
                .is_ok_and(|t| t.listen_port == r.listen_port);
            if !kept {
                redirect_map
                    .insert(key, RedirectTarget::new(r.listen_port), 0)
                    .context("adding to the REDIRECTS map")?;
            }
            listen_map
                .insert(NsPort::new(cookie, r.listen_port), r.advertise_port, 0)
                .context("adding to the LISTEN_PORTS map")?;
        }
        Ok(())
    }

    pub(super) fn clear_redirects(&mut self, cookie: u64, redirects: &[Redirect]) {
        // Missing entries are fine: we may be undoing a partial setup.
        if let Some(Ok(mut m)) = self
            .main
            .map_mut(MAP_REDIRECTS)
            .map(HashMap::<_, NsPort, RedirectTarget>::try_from)
        {
            for r in redirects {
                let _ = m.remove(&NsPort::new(cookie, r.advertise_port));
            }
        }
        if let Some(Ok(mut m)) = self
            .main
            .map_mut(MAP_LISTEN_PORTS)
            .map(HashMap::<_, NsPort, u16>::try_from)
        {
            for r in redirects {
                let _ = m.remove(&NsPort::new(cookie, r.listen_port));
            }
        }
        if let Some(Ok(mut m)) = self
            .main
            .map_mut(MAP_NS_QUOTAS)
            .map(HashMap::<_, u64, NsQuota>::try_from)
        {
            let _ = m.remove(&cookie);
        }
    }

    /// Gives every served namespace its equal share of `FLOWS` (after the
    /// served set changed).
    pub(super) fn share_flows(&mut self) {
        let share = flow_share(self.served.len());
        let Some(Ok(mut m)) = self
            .main
            .map_mut(MAP_FLOW_SHARE)
            .map(aya::maps::Array::<_, u64>::try_from)
        else {
            return;
        };
        if let Err(e) = m.set(0, share, 0) {
            tracing::warn!("setting the flow table share ({share}): {e}");
        }
    }

    /// Listeners `sock_ops` registered in the namespace with `cookie` that
    /// still listen (its quota is `LISTENERS_PER_NETNS`).
    pub fn quota(&self, cookie: u64) -> Option<NsQuota> {
        let m: HashMap<_, u64, NsQuota> = self.main.map(MAP_NS_QUOTAS)?.try_into().ok()?;
        m.get(&cookie, 0).ok()
    }

    /// Loads one `sk_lookup` instance per namespace (its cookie baked in) and
    /// links it there. Most of the cost is the kernel verifying each
    /// instance, so a batch is split over the CPUs; each thread has one
    /// loader (aya's parses the kernel's BTF each time one is made).
    pub(super) fn attach_sk_lookups(&self, netns: &[&Netns]) -> Result<Vec<Result<Link>>> {
        if netns.is_empty() {
            return Ok(Vec::new());
        }
        let pins = self.pins.clone();
        self.with_map_pins(|path| {
            let paths: Vec<(&str, PathBuf)> = SHARED_MAPS.iter().map(|m| (*m, path(m))).collect();
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 4)
                .min(netns.len());
            let chunk = netns.len().div_ceil(threads);
            Ok(std::thread::scope(|scope| {
                let parts: Vec<_> = netns
                    .chunks(chunk)
                    .map(|part| {
                        let (paths, pins) = (&paths, pins.as_ref());
                        // A node out of threads: this part loads here instead.
                        let handle = std::thread::Builder::new()
                            .spawn_scoped(scope, move || load_instances(part, paths, pins))
                            .map_err(|_| load_instances(part, paths, pins));
                        (part.len(), handle)
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|(n, handle)| match handle {
                        Ok(handle) => handle.join().unwrap_or_else(|_| {
                            (0..n)
                                .map(|_| Err(anyhow!("the sk_lookup loading thread panicked")))
                                .collect()
                        }),
                        Err(loaded_here) => loaded_here,
                    })
                    .collect()
            }))
        })
    }
}
