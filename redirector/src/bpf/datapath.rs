//! Loads the kernel programs and keeps them attached.
//!
//! One "main" instance of the object owns the shared maps, the `sock_ops`
//! program (attached to each served live-store's pod cgroup, see `sockops`)
//! and the bind hooks that report new live-store sockets to the agent. Every served network namespace gets its own
//! `sk_lookup` instance whose only difference is the `NETNS_COOKIE` constant;
//! those instances reuse the main instance's maps through pins: the persistent
//! ones of `--pin`, or a private directory that exists only while an instance
//! loads.
//!
//! Programs are attached with BPF links held as fds. Without `--pin`, dropping
//! the `Datapath` closes them and everything detaches; with `--pin`, the links
//! are pinned too and outlive the process, and the next agent adopts them.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{CgroupSock, SkLookup},
    Ebpf, EbpfLoader,
};
use redirector_common::{
    flow_share, MptcpWas, NsPort, NsQuota, RedirectTarget, GLOBAL_FLOW_UPDATE_NS, GLOBAL_LOG_LEVEL,
    GLOBAL_NETNS_COOKIE, MAP_COUNTERS, MAP_FLOW_EVENTS, MAP_FLOW_SHARE, MAP_LISTENERS,
    MAP_LISTEN_EVENTS, MAP_LISTEN_MARKS, MAP_LISTEN_PORTS, MAP_MPTCP_WAS, MAP_NS_QUOTAS,
    MAP_REDIRECTS, MAP_WATCH_PORTS, PROG_BIND4, PROG_BIND6, PROG_SK_LOOKUP, PROG_SOCK_OPS,
    SHARED_MAPS,
};

use crate::{
    bpf::pins::{Link, PinLayout, PinWatch, BPFFS},
    bpf::registry::{Reason, Registry, Report},
    bpf::sockops::{Scope, SockOps},
    bpf::Redirect,
    sys,
    sys::cgroup,
    sys::{cgroup_ids::CgroupIndex, netns::Netns, sockdiag},
};

/// The per-namespace switch Go's default MPTCP listeners depend on.
pub const MPTCP_SYSCTL: &str = "/proc/sys/net/mptcp/enabled";

/// The kernel object, built by build.rs from `redirector-ebpf`; empty in a build
/// without the `bpf-object` feature (the fixtures xtask and the tests link).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector.bpf.o"));

/// The embedded kernel object, or why there is none.
fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build of redirector carries no kernel programs (built without its `bpf-object` feature): \
             build the agent with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}

/// Identifies the embedded kernel object (FNV-1a): pinned state is only
/// adopted by an agent with the same programs and map layouts.
pub fn build_id() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// aya-log level for the kernel programs: their debug messages are only
/// produced (and paid for) when this process logs at debug level.
fn kernel_log_level() -> u8 {
    match tracing::level_filters::LevelFilter::current() {
        tracing::level_filters::LevelFilter::TRACE => aya_log_common_level::TRACE,
        tracing::level_filters::LevelFilter::DEBUG => aya_log_common_level::DEBUG,
        _ => aya_log_common_level::OFF,
    }
}

/// `aya_log_common::Level` values (that crate is not a direct dependency).
mod aya_log_common_level {
    pub const OFF: u8 = 0;
    pub const DEBUG: u8 = 4;
    pub const TRACE: u8 = 5;
}

/// One namespace being served.
pub struct Served {
    pub netns: Netns,
    pub redirects: Vec<Redirect>,
    /// Whether the link was adopted from a previous agent's pins.
    pub adopted: bool,
    pub link: Link,
    /// `net.mptcp.enabled` as it was before the agent turned it off, restored
    /// when the namespace stops being served.
    pub mptcp_was: Option<String>,
    /// The last reconcile pass over its listeners.
    pub report: Report,
    /// Where `sock_ops` runs for its listeners (pod scope), or why nowhere.
    pub sock_ops: SockOpsPlacement,
    /// `NsQuota::stopped` when the last reconcile pass started.
    pub stopped_seen: Option<u64>,
}

/// Why some of a namespace's listeners have no `sock_ops` (where it runs
/// is `SockOps::cgroups_of`), for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SockOpsPlacement {
    /// Listeners whose connections get no flow records, and why.
    pub problems: Vec<String>,
}

pub struct Datapath {
    main: Ebpf,
    pins: Option<PinLayout>,
    /// Pinned state of another build this agent takes over (layout, its build).
    replaces: Option<(PinLayout, String)>,
    /// The cgroup v2 mount.
    pub cgroup: PathBuf,
    pub sock_ops: SockOps,
    cgroups: CgroupIndex,
    /// The bind hooks' links (they report new listeners), or why there are none.
    pub listen_events: std::result::Result<Vec<std::os::fd::OwnedFd>, String>,
    pub served: Vec<Served>,
    registry: Registry,
    keep_mptcp: bool,
    /// With `--pin`: repairs and reports changes to the pinned state.
    pin_watch: PinWatch,
}

/// Handles on shared maps for the tasks that read them while the datapath runs
/// (flow reader, metrics): separate fds on the same kernel maps.
pub struct MapHandles {
    pub flow_events: MapData,
    pub counters: MapData,
    pub listeners: MapData,
    pub listen_events: MapData,
}

impl Datapath {
    /// Loads (or, with `pins`, reopens) the shared maps, loads `sock_ops`
    /// (attached to the root at once in root scope, else per served pod), and
    /// attaches the bind hooks for bind() calls to `watch_ports`.
    pub fn load(
        flow_ring_bytes: u32,
        flow_update_interval: std::time::Duration,
        pins: Option<PinLayout>,
        keep_mptcp: bool,
        scope: Scope,
        watch_ports: &[u16],
    ) -> Result<Self> {
        require_bpffs()?;
        let cgroup = cgroup::cgroup2_mount()?;
        let mut pins = pins;
        let mut replaces = None;
        if let Some(layout) = pins.take() {
            let build = build_id();
            match layout.pinned_build().filter(|old| *old != build) {
                // Different programs or map layouts: nothing can be shared. Run
                // unpinned next to the old programs until `persist` swaps them.
                Some(old) => replaces = Some((layout, old)),
                None => {
                    layout.prepare(&build)?;
                    pins = Some(layout);
                }
            }
        }
        let mut loader = EbpfLoader::new();
        let level = kernel_log_level();
        let flow_update_ns = u64::try_from(flow_update_interval.as_nanos()).unwrap_or(u64::MAX);
        loader
            .map_max_entries(MAP_FLOW_EVENTS, flow_ring_bytes)
            .override_global(GLOBAL_LOG_LEVEL, &level, true)
            .override_global(GLOBAL_FLOW_UPDATE_NS, &flow_update_ns, true);
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(layout) => SHARED_MAPS.iter().map(|m| (*m, layout.map(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut main = loader
            .load(object()?)
            .map_err(|e| kernel_error(e.into(), "loading the eBPF maps"))?;

        let prog: &mut aya::programs::SockOps = program(&mut main, PROG_SOCK_OPS)?.try_into()?;
        prog.load().map_err(|e| {
            kernel_error(
                e.into(),
                "loading the sock_ops program (BPF_PROG_TYPE_SOCK_OPS; `redirector check` probes what it needs)",
            )
        })?;
        let prog_fd = prog
            .fd()?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the sock_ops program fd")?;
        let sock_ops = SockOps::new(scope, prog_fd, prog.info()?.id(), &cgroup, pins.as_ref())
            .map_err(|e| kernel_error(e, "attaching sock_ops to the cgroup v2 root"))?;
        watch(&mut main, watch_ports)?;
        let listen_events = attach_bind_hooks(&mut main, &cgroup);
        let registry = with_map_pins(&main, pins.as_ref(), |path| {
            let open = |name: &str| {
                MapData::from_pin(path(name)).with_context(|| format!("reopening map {name}"))
            };
            Ok(Registry::new(open(MAP_LISTENERS)?, open(MAP_REDIRECTS)?)?
                .with_marks(open(MAP_LISTEN_MARKS)?))
        })?;
        Ok(Self {
            main,
            pins,
            replaces,
            cgroups: CgroupIndex::new(cgroup.clone()),
            cgroup,
            sock_ops,
            listen_events,
            served: Vec::new(),
            registry,
            keep_mptcp,
            pin_watch: PinWatch::default(),
        })
    }

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
    fn with_map_pins<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Result<R>) -> Result<R> {
        with_map_pins(&self.main, self.pins.as_ref(), f)
    }

    /// New fds on the maps that tasks read while the datapath runs.
    pub fn map_handles(&self) -> Result<MapHandles> {
        self.with_map_pins(|path| {
            let open = |name: &str| {
                MapData::from_pin(path(name)).with_context(|| format!("reopening map {name}"))
            };
            Ok(MapHandles {
                flow_events: open(MAP_FLOW_EVENTS)?,
                counters: open(MAP_COUNTERS)?,
                listeners: open(MAP_LISTENERS)?,
                listen_events: open(MAP_LISTEN_EVENTS)?,
            })
        })
    }

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
    fn prepare(&mut self, netns: Netns, redirects: &[Redirect], hint: &[i32]) -> Result<Prepared> {
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
    fn stopped_listeners(&self, cookie: u64) -> Option<u64> {
        let m: HashMap<_, u64, NsQuota> = self.main.map(MAP_NS_QUOTAS)?.try_into().ok()?;
        m.get(&cookie, 0).ok().map(|q| q.stopped)
    }

    /// The listeners of `netns` on the listen ports: `sock_ops` attached to
    /// their cgroups first, then registered.
    fn reconcile_netns(
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

    /// Gives the namespaces back the MPTCP setting they had (an agent that
    /// exits without --pin stops serving them all).
    pub fn restore_namespaces(&mut self) {
        for s in &self.served {
            restore_mptcp(&s.netns, s.mptcp_was.as_deref());
        }
        let cookies: Vec<u64> = self.served.iter().map(|s| s.netns.cookie).collect();
        if let Some(mut m) = self.mptcp_ledger() {
            for cookie in cookies {
                let _ = m.remove(&cookie);
            }
        }
    }

    /// Turns MPTCP off in `netns` and says what it was. The setting before the
    /// first agent changed it is kept in `MPTCP_WAS` (pinned with `--pin`): an
    /// agent that adopts the namespace finds 0 there, and must give back what
    /// the namespace had, not that.
    fn disable_mptcp(&mut self, netns: &Netns) -> Option<String> {
        let recorded = self
            .mptcp_ledger()
            .and_then(|m| m.get(&netns.cookie, 0).ok());
        let now = disable_mptcp(netns);
        match recorded {
            Some(r) => Some(r.enabled.to_string()),
            None => {
                let enabled = now.as_deref().and_then(|v| v.parse::<u64>().ok());
                if let (Some(enabled), Some(mut m)) = (enabled, self.mptcp_ledger()) {
                    let entry = MptcpWas {
                        netns_inode: netns.inode(),
                        enabled,
                    };
                    if let Err(e) = m.insert(netns.cookie, entry, 0) {
                        tracing::warn!(
                            "recording net.mptcp.enabled of {netns} in {MAP_MPTCP_WAS}: {e}"
                        );
                    }
                }
                now
            }
        }
    }

    fn restore_mptcp(&mut self, netns: &Netns, was: Option<&str>) {
        restore_mptcp(netns, was);
        if let Some(mut m) = self.mptcp_ledger() {
            let _ = m.remove(&netns.cookie);
        }
    }

    fn mptcp_ledger(&mut self) -> Option<HashMap<&mut MapData, u64, MptcpWas>> {
        self.main.map_mut(MAP_MPTCP_WAS)?.try_into().ok()
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

    fn set_redirects(&mut self, cookie: u64, redirects: &[Redirect]) -> Result<()> {
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

    fn clear_redirects(&mut self, cookie: u64, redirects: &[Redirect]) {
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
    fn share_flows(&mut self) {
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
    fn attach_sk_lookups(&self, netns: &[&Netns]) -> Result<Vec<Result<Link>>> {
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

/// Loads and links the `sk_lookup` instances of `netns`, with one loader.
fn load_instances(
    netns: &[&Netns],
    paths: &[(&str, PathBuf)],
    pins: Option<&PinLayout>,
) -> Vec<Result<Link>> {
    let cookies: Vec<u64> = netns.iter().map(|n| n.cookie).collect();
    let level = kernel_log_level();
    let mut loader = EbpfLoader::new();
    for (name, p) in paths {
        loader.map_pin_path(name, p.as_path());
    }
    loader.override_global(GLOBAL_LOG_LEVEL, &level, true);
    netns
        .iter()
        .zip(&cookies)
        .map(|(ns, cookie)| {
            loader.override_global(GLOBAL_NETNS_COOKIE, cookie, true);
            let mut instance = loader
                .load(object()?)
                .map_err(|e| kernel_error(e.into(), "loading the sk_lookup instance"))?;
            let prog: &mut SkLookup = program(&mut instance, PROG_SK_LOOKUP)?.try_into()?;
            prog.load().map_err(|e| {
                kernel_error(
                    e.into(),
                    "loading the sk_lookup program (BPF_PROG_TYPE_SK_LOOKUP; `redirector check` probes what it needs)",
                )
            })?;
            let fd = sys::link_create(prog.fd()?.as_fd(), ns.file.as_fd(), sys::BPF_SK_LOOKUP)
                .map_err(|e| {
                    kernel_error(
                        e.into(),
                        &format!("attaching sk_lookup to {}", ns.path.display()),
                    )
                })?;
            // The link holds the program: the instance (and its fds) can go.
            let mut link = Link {
                fd,
                pin: None,
                prog_id: prog.info()?.id(),
            };
            if let Some(layout) = pins {
                link.pin(&layout.netns_link(ns.cookie))?;
            }
            Ok(link)
        })
        .collect()
}

/// A namespace ready to be served but for its `sk_lookup` link.
struct Prepared {
    netns: Netns,
    mptcp_was: Option<String>,
    report: Report,
    placement: SockOpsPlacement,
    adopted: Option<Link>,
}

/// Tells `redir_listen` which ports to report.
fn watch(main: &mut Ebpf, ports: &[u16]) -> Result<()> {
    let mut m: HashMap<_, u16, u8> = main
        .map_mut(MAP_WATCH_PORTS)
        .context("WATCH_PORTS map")?
        .try_into()?;
    for port in ports {
        m.insert(port, 1, 0)
            .context("adding to the WATCH_PORTS map")?;
    }
    Ok(())
}

/// Attaches the bind hooks to the cgroup v2 root, where they see every
/// bind() of the node (and nothing else). Not pinned: a successor agent
/// attaches its own. Without them the agent still works, finding new
/// listeners by scanning /proc every second.
fn attach_bind_hooks(
    main: &mut Ebpf,
    root: &Path,
) -> std::result::Result<Vec<std::os::fd::OwnedFd>, String> {
    let dir = fs::File::open(root).map_err(|e| format!("opening {}: {e}", root.display()))?;
    let mut links = Vec::new();
    for (name, attach) in [
        (PROG_BIND4, sys::BPF_CGROUP_INET4_POST_BIND),
        (PROG_BIND6, sys::BPF_CGROUP_INET6_POST_BIND),
    ] {
        let prog: &mut CgroupSock = program(main, name)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load()
            .map_err(|e| format!("{:#}", kernel_error(e.into(), &format!("loading {name}"))))?;
        let fd = prog.fd().map_err(|e| e.to_string())?;
        let link = sys::link_create(fd.as_fd(), dir.as_fd(), attach).map_err(|e| {
            format!(
                "{:#}",
                kernel_error(e.into(), &format!("attaching {name} to {}", root.display()))
            )
        })?;
        links.push(link);
    }
    Ok(links)
}

/// Runs `f` with a path for each shared map: the persistent pins, or a private
/// pin directory that exists only for the call.
fn with_map_pins<R>(
    main: &Ebpf,
    pins: Option<&PinLayout>,
    f: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Result<R>,
) -> Result<R> {
    match pins {
        Some(layout) => f(&|name: &str| layout.map(name)),
        None => {
            let window = PinWindow::open(main)?;
            let dir = window.dir.clone();
            f(&move |name: &str| dir.join(name))
        }
    }
}

/// Turns MPTCP off in `netns` so that a live-store started from now on listens
/// with plain TCP: Go >= 1.24 opens MPTCP listeners by default and falls back
/// to TCP when the namespace refuses MPTCP sockets, and socket maps cannot hold
/// an MPTCP listener. Queriers dial plain TCP, so nothing is lost. Returns the
/// previous value if it was changed.
fn disable_mptcp(netns: &Netns) -> Option<String> {
    match sys::netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL) {
        Ok(Some(old)) if old != "0" => {
            match sys::set_netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL, "0") {
                Ok(()) => {
                    tracing::info!(
                        "set net.mptcp.enabled=0 in {netns} (was {old}; --keep-mptcp leaves it)"
                    );
                    Some(old)
                }
                Err(e) => {
                    tracing::warn!("cannot set net.mptcp.enabled=0 in {netns}: {e}");
                    None
                }
            }
        }
        // Already off, or a kernel without MPTCP.
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("cannot read net.mptcp.enabled in {netns}: {e}");
            None
        }
    }
}

fn restore_mptcp(netns: &Netns, was: Option<&str>) {
    if let Some(old) = was {
        // The namespace may be gone already: nothing to restore then.
        if sys::set_netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL, old).is_ok() {
            tracing::info!("restored net.mptcp.enabled={old} in {netns}");
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))
}

fn require_bpffs() -> Result<()> {
    let path = Path::new(BPFFS);
    match sys::is_bpffs(path) {
        Ok(true) => Ok(()),
        Ok(false) => bail!("bpffs is not mounted at {BPFFS}: run `mount -t bpf bpf {BPFFS}` (a DaemonSet mounts the host's)"),
        Err(e) => bail!("cannot inspect {BPFFS} ({e}): mount bpffs there with `mount -t bpf bpf {BPFFS}`"),
    }
}

/// Turns permission and support errors from the kernel into messages that name
/// the capability or feature, keeping the original error as the cause. A
/// verifier log goes to the debug log, not into the one-line error.
fn kernel_error(err: anyhow::Error, what: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    if let Some((_, log)) = text.split_once("Verifier output:") {
        tracing::debug!("verifier log for {what}:{log}");
        // The reason is the last line before the verifier's statistics.
        let verdict = log.lines().map(str::trim).rev().find(|l| {
            !l.is_empty()
                && !["verification time", "stack depth", "processed", ":"]
                    .iter()
                    .any(|p| l.starts_with(p))
        });
        return anyhow!(
            "{what}: the kernel verifier rejected the program ({}); RUST_LOG=debug shows its log",
            verdict.unwrap_or("no reason given")
        );
    }
    let errno = err.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|e| e.raw_os_error())
    });
    let hint = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (permission denied: needs CAP_BPF and CAP_NET_ADMIN, or root)"
        }
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
            " (the kernel does not support this)"
        }
        _ => "",
    };
    err.context(format!("{what}{hint}"))
}

/// Kernel-internal `ENOTSUPP`, which BPF syscalls can leak to userspace.
const ENOTSUPP: i32 = 524;

/// Pins of the shared maps that live only while a new instance loads, in a
/// directory private to this process (without `--pin`).
struct PinWindow {
    dir: PathBuf,
}

impl PinWindow {
    fn open(main: &Ebpf) -> Result<Self> {
        // bpffs rejects names with dots. A leftover from a crashed run of a
        // process with our pid is stale.
        let dir = Path::new(BPFFS).join(format!("redirector-load-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let window = Self { dir };
        for name in SHARED_MAPS {
            let path = window.dir.join(name);
            main.map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(window)
    }
}

impl Drop for PinWindow {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

#[cfg(all(test, feature = "bpf-object"))]
mod object_tests {
    use aya_obj::generated::bpf_insn;

    /// BPF instruction classes and operations (the kernel's
    /// Documentation/bpf/standardization/instruction-set.rst).
    const CLASS_LDX: u8 = 0x01;
    const CLASS_ALU: u8 = 0x04;
    const CLASS_JMP32: u8 = 0x06;
    const CLASS_ALU64: u8 = 0x07;
    const MODE_MEMSX: u8 = 0x80;
    const OP_DIV: u8 = 0x30;
    const OP_MOD: u8 = 0x90;
    const OP_MOV: u8 = 0xb0;
    const OP_END: u8 = 0xd0;
    const OP_JA: u8 = 0x00;

    /// What an instruction needs of the CPU version: the ones added in v4
    /// (Linux 6.6) are refused by the 6.1 verifier.
    fn v4_only(i: &bpf_insn) -> Option<&'static str> {
        let (class, op) = (i.code & 0x07, i.code & 0xf0);
        match class {
            CLASS_LDX if i.code & 0xe0 == MODE_MEMSX => Some("sign-extending load"),
            CLASS_ALU | CLASS_ALU64 if op == OP_MOV && i.off != 0 => Some("movsx"),
            CLASS_ALU | CLASS_ALU64 if (op == OP_DIV || op == OP_MOD) && i.off == 1 => {
                Some("signed division")
            }
            CLASS_ALU64 if op == OP_END => Some("bswap"),
            CLASS_JMP32 if op == OP_JA => Some("gotol"),
            _ => None,
        }
    }

    /// The embedded object is built for BPF CPU v3 (build.rs asks bpf-linker
    /// for it): nothing in it needs v4, which the oldest kernel we support
    /// (6.1) does not have, whatever the LLVM default becomes.
    #[test]
    fn the_kernel_object_uses_no_bpf_v4_instruction() {
        let object = aya_obj::Object::parse(super::object().expect("embedded object"))
            .expect("the embedded object parses");
        let mut checked = 0;
        for ((section, _), f) in &object.functions {
            for (n, insn) in f.instructions.iter().enumerate() {
                checked += 1;
                if let Some(what) = v4_only(insn) {
                    panic!(
                        "{} (section {section}) instruction {n}: {what} (code {:#04x}, off {}), a BPF v4 instruction",
                        f.name, insn.code, insn.off
                    );
                }
            }
        }
        assert!(checked > 1000, "only {checked} instructions found");
    }
}
