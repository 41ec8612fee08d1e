//! The pinned state: another build's taken over, stale pins swept, and the
//! watch that repairs and reports it while a `--pin` agent runs.

use super::*;

impl Datapath {
    /// With `--pin` over another build's state: the old build's id, until
    /// `persist` replaces it.
    pub fn replaces(&self) -> Option<&str> {
        self.replaces.as_ref().map(|(_, old)| old.as_str())
    }

    /// Finishes an upgrade: our programs already run next to the old build's,
    /// so removing the old pins (which detaches its programs) leaves no gap;
    /// then our links and maps are pinned in their place.
    pub fn persist(&mut self) -> Result<Vec<String>> {
        let Some((layout, _)) = self.replaces.take() else {
            return Ok(Vec::new());
        };
        let removed = layout.remove_all()?;
        layout.prepare(&build_id())?;
        for name in SHARED_MAPS {
            let path = layout.map(name);
            self.main
                .map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        for a in &mut self.sock_ops.attached {
            let path = match self.sock_ops.scope {
                Scope::Root => layout.sock_ops_link(),
                Scope::Pod => layout.sock_ops_cgroup_link(a.cgroup_id),
            };
            a.link.pin(&path)?;
        }
        for s in &mut self.served {
            s.link.pin(&layout.netns_link(s.netns.cookie))?;
        }
        self.pins = Some(layout);
        Ok(removed)
    }

    /// Runs `f` with a path for each shared map: the persistent pins, or a
    /// private pin directory that exists only for the call.
    pub(super) fn with_map_pins<R>(
        &self,
        f: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Result<R>,
    ) -> Result<R> {
        with_map_pins(&self.main, self.pins.as_ref(), f)
    }

    /// With `--pin`: removes what a previous agent pinned for namespaces this
    /// agent does not serve (gone, or no longer configured), links and map
    /// entries alike. Returns what was removed.
    pub fn sweep_unserved(&mut self) -> Result<Vec<String>> {
        let Some(layout) = self.pins.clone() else {
            return Ok(Vec::new());
        };
        let served: Vec<u64> = self.served.iter().map(|s| s.netns.cookie).collect();
        let mut removed = Vec::new();
        let attached: Vec<u64> = self.sock_ops.attached.iter().map(|a| a.cgroup_id).collect();
        for (id, path) in layout.pinned_sock_ops() {
            if !attached.contains(&id) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(format!("link {}", path.display()));
            }
        }
        for pinned in layout.pinned_netns() {
            if !served.contains(&pinned.cookie) {
                let path = layout.netns_link(pinned.cookie);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(format!("link {}", path.display()));
            }
        }
        let mut stale = |map: &str, keys: Vec<NsPort>| -> Vec<NsPort> {
            let keys: Vec<NsPort> = keys
                .into_iter()
                .filter(|k| !served.contains(&k.netns_cookie))
                .collect();
            for key in &keys {
                removed.push(format!(
                    "{map} entry for netns cookie {} port {}",
                    key.netns_cookie, key.port
                ));
            }
            keys
        };
        let mut m: HashMap<_, NsPort, RedirectTarget> = self
            .main
            .map_mut(MAP_REDIRECTS)
            .context("REDIRECTS map")?
            .try_into()?;
        for key in stale(MAP_REDIRECTS, m.keys().filter_map(Result::ok).collect()) {
            let _ = m.remove(&key);
        }
        let mut m: HashMap<_, NsPort, u16> = self
            .main
            .map_mut(MAP_LISTEN_PORTS)
            .context("LISTEN_PORTS map")?
            .try_into()?;
        for key in stale(MAP_LISTEN_PORTS, m.keys().filter_map(Result::ok).collect()) {
            let _ = m.remove(&key);
        }
        let mut m: HashMap<_, u64, NsQuota> = self
            .main
            .map_mut(MAP_NS_QUOTAS)
            .context("NS_QUOTAS map")?
            .try_into()?;
        let keys: Vec<u64> = m.keys().filter_map(Result::ok).collect();
        for cookie in keys.into_iter().filter(|c| !served.contains(c)) {
            let _ = m.remove(&cookie);
            removed.push(format!("{MAP_NS_QUOTAS} entry for netns cookie {cookie}"));
        }
        // Every pin left is this agent's own from here on.
        self.pin_watch.arm(&layout);
        Ok(removed)
    }

    /// With `--pin`, from the maintenance tick: pins deleted behind the
    /// agent's back (or lost with a remounted bpffs) are made again from the
    /// fds it holds; foreign entries and an unmounted bpffs are reported.
    pub fn check_pins(&mut self) {
        let Some(layout) = &self.pins else { return };
        let links = self
            .sock_ops
            .links()
            .chain(self.served.iter().map(|s| &s.link));
        self.pin_watch.check(layout, &build_id(), links);
    }

    /// The datapath's own metrics (beyond the kernel's counters, which
    /// telemetry reads from the map): with `--pin`, the pin watch's.
    pub fn register_metrics(&self, r: &mut prometheus_client::registry::Registry) {
        if self.pins.is_some() {
            self.pin_watch.register(r);
        }
    }
}
