//! What the agent tells others of the served set: the namespace names flow
//! records carry, readiness and metrics, and the state file `status` reads.

use super::*;

impl Agent {
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

    pub(super) fn publish_now(&mut self) -> Result<()> {
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
                self.settings.state_file().display()
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
    pub(super) fn netns_name(&self, netns: &Netns) -> String {
        match self.origins.get(&netns.cookie) {
            Some(Origin::Explicit { path, .. }) => path.display().to_string(),
            _ => format!("net:[{}]", netns.inode()),
        }
    }

    pub(super) fn write_state(&mut self) -> Result<()> {
        self.published_inspector = self.inspector.summary();
        let path = &self.settings.state_file();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state())?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }

    /// Removes the state file: the agent is leaving.
    pub fn remove_state(&self) {
        let _ = std::fs::remove_file(self.settings.state_file());
    }
}
