//! `redirector run`: resolve the settings, attach, keep the set of served
//! namespaces current (explicit ones that vanish, discovered ones that come and
//! go), serve until a signal, then detach (or, with `--pin`, leave it running).
//!
//! Stdout carries flow records only (the default flow log); what the agent says
//! about itself (`attached ...`, `metrics on http://...`, `ready: ...`, the exit
//! summary `counters: ...`) goes to stderr with its log, so a pipe of stdout is
//! a clean stream of records.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use redirector_common::Counter;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    bpf::datapath::Datapath,
    bpf::pins::{PinLayout, PIN_ROOT},
    bpf::registry::Reason,
    cli::RunArgs,
    config::settings::{self, usage, Settings},
    config::Redirect,
    discovery,
    discovery::listeners::{self, Owner},
    discovery::netns::Netns,
    error::Fatal,
    flows::log::{NsInfo, Recorder},
    flows::reader,
    flows::sub,
    sys,
    telemetry::{self, Attachments, Telemetry},
};

const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// How a served namespace came to be served, which decides when it stops.
enum Origin {
    /// Listed by the operator: served until its path disappears.
    Explicit { path: PathBuf, ino: u64 },
    /// Found by discovery: served while it exists and, within the grace
    /// period, has a listener.
    Discovered {
        ino: u64,
        without_listener_since: Option<Instant>,
    },
}

pub async fn run(args: RunArgs) -> Result<()> {
    let dry_run = args.dry_run;
    let s = settings::resolve(args)?;
    if dry_run {
        println!("{}", serde_json::to_string_pretty(&s.describe())?);
        return Ok(());
    }
    for path in &s.netns {
        if !path.exists() {
            return Err(usage(format!(
                "network namespace {} does not exist",
                path.display()
            )));
        }
    }
    check_privileges()?;
    // Before anything is opened, loaded or attached: a kernel below the
    // minimum gets one line naming what it lacks (exit 3), nothing else.
    crate::bpf::probe::require().map_err(Fatal::from)?;
    let (flow_out, flow_format) = reader::open_output(&s)?;

    // Signals first: a SIGTERM that arrives while attaching still ends cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let namespaces = s
        .netns
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>>>()?;
    let pins = s.pin.then(PinLayout::default);
    let mut datapath = Datapath::load(s.flow_ring_bytes, pins, s.keep_mptcp)?;
    let verb = if datapath.sock_ops_adopted {
        "adopted"
    } else {
        "attached"
    };
    eprintln!("{verb} sock_ops on cgroup {}", datapath.cgroup.display());

    let mut origins: HashMap<u64, Origin> = HashMap::new();
    for netns in namespaces {
        let origin = Origin::Explicit {
            path: netns.path.clone(),
            ino: netns.inode(),
        };
        let cookie = netns.cookie;
        serve(&mut datapath, netns, &s.redirects)?;
        origins.insert(cookie, origin);
    }

    let handles = datapath.map_handles()?;
    let telemetry = Arc::new(Telemetry::new(
        handles.counters,
        handles.listeners,
        attachments(&datapath)?,
    )?);
    let metrics_addr = telemetry::serve(s.metrics_addr, telemetry.clone()).await?;
    eprintln!("metrics on http://{metrics_addr}/metrics (also /healthz, /readyz)");

    let names = Arc::new(Mutex::new(HashMap::new()));
    let recorder = Recorder {
        namespaces: names.clone(),
        clock_offset_ns: sys::monotonic_to_unix_offset_ns(),
    };
    spawn_kernel_logs(datapath.sock_ops.prog_id);
    let hub = Arc::new(sub::Hub::new(
        sub::Hub::capacity_for_ring(s.flow_ring_bytes),
        telemetry.flow_subscriber_lost.clone(),
        telemetry.flow_subscribers.clone(),
    ));
    // Subscribers are a convenience: a socket that cannot be created costs a
    // warning, never the redirects.
    let flows_server = match sub::Server::start(&s.flows_socket, hub.clone()) {
        Ok(server) => {
            eprintln!(
                "flow records for `redirector flows` on {}",
                s.flows_socket.display()
            );
            Some(server)
        }
        Err(e) => {
            tracing::warn!("`redirector flows` unavailable: {e:#}");
            None
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(reader::read(
        handles.flow_events,
        recorder,
        flow_format,
        flow_out,
        stop_rx,
        hub,
    ));

    let mut agent = Agent {
        datapath,
        origins,
        settings: s,
        telemetry: telemetry.clone(),
        names,
        owners: HashMap::new(),
        reported: HashSet::new(),
    };
    agent.maintain()?;
    // Everything this agent serves is adopted or attached by now: what else a
    // previous agent pinned is stale, or belongs to the build we replace.
    if let Some(old) = agent.datapath.replaces().map(str::to_owned) {
        let removed = agent.datapath.persist()?;
        eprintln!(
            "replaced the pinned state of build {old} ({} objects) with build {}, without a gap",
            removed.len(),
            crate::bpf::datapath::build_id()
        );
    }
    for what in agent.datapath.sweep_unserved()? {
        eprintln!("removed stale pinned {what}");
    }
    agent.publish()?;
    // The ring check runs on a thread of its own (a slow Tempo never holds up
    // this loop) and sees what the agent serves through `AgentView`.
    let ring = match agent.settings.tempo_ring.clone() {
        Some(url) => {
            let view = crate::ring::AgentView::of(&agent.datapath, &agent.settings.redirects);
            let monitor = crate::ring::Monitor::start(
                url.clone(),
                agent.settings.tempo_ring_interval,
                agent.datapath.map_handles()?.listeners,
                &telemetry,
                view,
            )?;
            eprintln!(
                "checking the live-store ring {url} every {}s",
                agent.settings.tempo_ring_interval.as_secs()
            );
            Some(monitor)
        }
        None => None,
    };
    eprintln!(
        "ready: redirecting in {} network namespace(s){}",
        agent.datapath.served.len(),
        if agent.settings.discover {
            ", discovering more"
        } else {
            ""
        }
    );

    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
            _ = tick.tick() => {
                if let Err(e) = agent.maintain().and_then(|()| agent.publish()) {
                    tracing::error!("updating served namespaces: {e:#}");
                }
                if let Some(ring) = &ring {
                    ring.update(crate::ring::AgentView::of(
                        &agent.datapath,
                        &agent.settings.redirects,
                    ));
                }
            }
        }
    }
    let pinned = agent.settings.pin;
    if !pinned {
        agent.datapath.restore_namespaces();
    }
    drop(agent);
    // Unpinned programs are gone now: drain what they wrote, then report.
    let _ = stop_tx.send(true);
    let delivered = match reader.await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::error!("flow reader failed: {e:#}");
            0
        }
        Err(e) => {
            tracing::error!("flow reader task failed: {e}");
            0
        }
    };
    // Subscribers get the records of the last drain before they are let go.
    if let Some(server) = flows_server {
        server.shutdown().await;
    }
    let summary: Vec<String> = Counter::ALL
        .iter()
        .map(|&c| format!("{}={}", c.name(), telemetry.kernel_counter(c)))
        .collect();
    let what = if pinned {
        format!(
            "left programs attached and pinned under {PIN_ROOT} (`redirector detach` removes them)"
        )
    } else {
        "detached all programs".to_owned()
    };
    eprintln!(
        "{what}; flow records delivered={delivered}; counters: {}",
        summary.join(" ")
    );
    let dropped = telemetry.kernel_counter(Counter::RecordsDropped);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "flow records were dropped because the ring buffer was full (raise --flow-ring-bytes)"
        );
    }
    Ok(())
}

/// Forwards the kernel programs' aya-log records (debug level only, see
/// `RUST_LOG`) into this process's log. All instances share one ring.
fn spawn_kernel_logs(prog_id: u32) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let logger = match aya_log::EbpfLogger::init_from_id(prog_id) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("kernel debug messages unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring fd and keeps it open, unchanged,
        // until the AsyncFd (which owns the logger) is dropped.
        let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn serve(datapath: &mut Datapath, netns: Netns, redirects: &[Redirect]) -> Result<()> {
    let served = datapath.serve(netns, redirects)?;
    let ports: Vec<String> = served
        .redirects
        .iter()
        .map(|r| format!("{} -> {}", r.advertise_port, r.listen_port))
        .collect();
    eprintln!(
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
    Ok(())
}

struct Agent {
    datapath: Datapath,
    origins: HashMap<u64, Origin>,
    settings: Settings,
    telemetry: Arc<Telemetry>,
    names: Arc<Mutex<HashMap<u64, NsInfo>>>,
    /// Per namespace: the listening socket inodes last seen and their owner.
    owners: HashMap<u64, (Vec<u64>, Option<Owner>)>,
    /// Unservable listeners already logged: (netns cookie, inode, reason).
    reported: HashSet<(u64, u64, Reason)>,
}

impl Agent {
    /// Drops namespaces that are gone (or whose live-store stopped for good) and,
    /// with discovery, serves new ones.
    fn maintain(&mut self) -> Result<()> {
        let scan = self.settings.discover.then(|| {
            discovery::scan(
                &self.settings.listen_ports(),
                self.settings.cgroup_pattern.as_deref(),
            )
        });
        let now = Instant::now();
        let mut gone: Vec<(u64, &'static str)> = Vec::new();
        for (cookie, origin) in self.origins.iter_mut() {
            match origin {
                Origin::Explicit { path, ino } => {
                    // A deleted bind mount (ip netns del) or a dead process: the
                    // path no longer names the namespace we hold open.
                    if std::fs::metadata(&*path).map(|m| m.ino()).ok() != Some(*ino) {
                        gone.push((*cookie, "its namespace path is gone"));
                    }
                }
                Origin::Discovered {
                    ino,
                    without_listener_since,
                } => match scan.as_ref().and_then(|s| s.get(ino)) {
                    None => gone.push((*cookie, "no process is left in the namespace")),
                    Some(c) if c.has_listener => *without_listener_since = None,
                    Some(_) => {
                        let since = *without_listener_since.get_or_insert(now);
                        if now.duration_since(since) >= self.settings.listener_grace {
                            gone.push((*cookie, "its live-store stopped listening"));
                        }
                    }
                },
            }
        }
        for (cookie, why) in gone {
            self.origins.remove(&cookie);
            if let Some(netns) = self.datapath.unserve(cookie) {
                eprintln!("detached sk_lookup from netns {netns}: {why}");
            }
        }
        if let Some(scan) = scan {
            self.discover(scan);
        }
        self.datapath.reconcile()?;
        self.datapath.check_pins(&self.telemetry);
        self.report_listeners();
        Ok(())
    }

    /// Logs what each reconcile pass repaired, and each unservable listener
    /// once (and when it is resolved); shares them with metrics and readiness.
    fn report_listeners(&mut self) {
        let mut now = HashSet::new();
        let mut unservable = Vec::new();
        for s in &self.datapath.served {
            for what in &s.report.repaired {
                tracing::info!("netns {}: {what}", s.netns);
            }
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

    /// Serves the namespaces discovery found with a listener that are not
    /// served yet.
    fn discover(&mut self, scan: HashMap<u64, discovery::Candidate>) {
        let served: HashSet<u64> = self
            .origins
            .values()
            .map(|o| match o {
                Origin::Explicit { ino, .. } | Origin::Discovered { ino, .. } => *ino,
            })
            .collect();
        for (ino, candidate) in scan {
            if !candidate.has_listener || served.contains(&ino) {
                continue;
            }
            // The process may have exited since the scan: try again next time.
            let netns = match Netns::open(&candidate.path) {
                Ok(n) if n.inode() == ino => n,
                Ok(_) | Err(_) => continue,
            };
            let cookie = netns.cookie;
            match serve(&mut self.datapath, netns, &self.settings.redirects) {
                Ok(()) => {
                    self.origins.insert(
                        cookie,
                        Origin::Discovered {
                            ino,
                            without_listener_since: None,
                        },
                    );
                }
                Err(e) => tracing::warn!(
                    "serving discovered netns {}: {e:#}",
                    candidate.path.display()
                ),
            }
        }
    }

    /// Shares the current set of namespaces with readiness checks and flow
    /// records, including which process holds each live-store listener (looked
    /// up again only when the listening sockets change).
    fn publish(&mut self) -> Result<()> {
        self.telemetry
            .set_namespaces(attachments(&self.datapath)?.namespaces);
        let mut infos = HashMap::new();
        for s in &self.datapath.served {
            // The reconcile pass that just ran listed the listeners.
            let inodes = s.report.inodes.clone();
            let cached = self
                .owners
                .get(&s.netns.cookie)
                .filter(|(seen, _)| *seen == inodes);
            let owner = match cached {
                Some((_, owner)) => owner.clone(),
                None => {
                    let owner = listeners::owner(&inodes);
                    self.owners.insert(s.netns.cookie, (inodes, owner.clone()));
                    owner
                }
            };
            infos.insert(
                s.netns.cookie,
                NsInfo {
                    name: s.netns.path.display().to_string(),
                    listener: owner,
                },
            );
        }
        self.owners.retain(|cookie, _| infos.contains_key(cookie));
        if let Ok(mut names) = self.names.lock() {
            *names = infos;
        }
        Ok(())
    }
}

fn attachments(datapath: &Datapath) -> Result<Attachments> {
    let reopen = |f: &File| f.try_clone().context("duplicating a namespace fd");
    Ok(Attachments {
        cgroup: File::open(&datapath.cgroup)
            .with_context(|| format!("opening {}", datapath.cgroup.display()))?,
        sock_ops_id: datapath.sock_ops.prog_id,
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

pub fn check_privileges() -> Result<()> {
    let missing = sys::missing_capabilities()?;
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    let reasons: Vec<String> = missing
        .iter()
        .map(|(n, why)| format!("{n} to {why}"))
        .collect();
    Err(Fatal::Environment(format!(
        "missing capabilities {}: run as root or grant them ({})",
        names.join(", "),
        reasons.join("; ")
    ))
    .into())
}
