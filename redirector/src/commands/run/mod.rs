//! `redirector run`: resolve the settings, attach, keep the set of served
//! namespaces current (explicit ones that vanish, discovered ones that come and
//! go), serve until a signal, then detach (or, with `--pin`, leave it running).
//!
//! Stdout carries flow records only (the default flow log); what the agent says
//! about itself (`attached ...`, `metrics on http://...`, `ready: ...`, the exit
//! summary `counters: ...`) is logged (`tracing`, on stderr, text or JSON per
//! --log-format), so a pipe of stdout is a clean stream of records.

pub mod args;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use redirector_common::Counter;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use crate::{
    agent::{self, Agent},
    bpf::datapath::Datapath,
    bpf::pins::{PinLayout, PIN_ROOT},
    config::settings::Settings,
    discovery::{
        inspector::{Inspector, Policy},
        kube,
    },
    error::usage,
    error::Fatal,
    flows::log::Recorder,
    flows::reader,
    flows::sub,
    sys::{self, netns::Netns},
    telemetry::{self, Telemetry},
};

/// The tick of explicit-path checks, grace periods, the resync slice and the
/// pin watch.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);
/// How long startup waits for the first scan's verdicts before `ready`.
const STARTUP_SCAN: std::time::Duration = std::time::Duration::from_secs(3);
/// Bind-event batches queued for the loop.
const LISTEN_BATCHES: usize = 64;
/// Pod events queued for the loop (the watch waits when it is full).
const POD_EVENTS: usize = 256;

/// What the agent logs on SIGHUP: the settings are read once, at the start.
pub const SIGHUP_IGNORED: &str = "SIGHUP ignored: restart to apply config changes";

pub async fn run(s: Settings, dry_run: bool) -> Result<()> {
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
    crate::bpf::probe::require()?;
    let (flow_out, flow_format) = reader::open_output(s.flow_log.as_deref(), s.flow_format)?;

    // Signals first: a SIGTERM that arrives while attaching still ends cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // SIGHUP's default action ends the process: handled, it only logs.
    let mut sighup = signal(SignalKind::hangup())?;

    let namespaces = s
        .netns
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let pins = s.pin.then(PinLayout::default);
    // --kube: before anything is loaded, so a missing ServiceAccount, node
    // name or pod cgroup root stops the start with one line and nothing left.
    let (mut pods, mut locator) = match &s.kube {
        Some(k) => {
            let (pods, locator) = start_kube(k).await?;
            (Some(pods), Some(locator))
        }
        None => (None, None),
    };
    let datapath = Datapath::load(
        s.flow_ring_bytes,
        s.flow_update_interval,
        pins,
        s.keep_mptcp,
        s.sock_ops_cgroup,
        &s.listen_ports(),
    )?;
    match datapath.sock_ops.scope {
        crate::bpf::sockops::Scope::Root => {
            let verb = if datapath.sock_ops.attached.iter().any(|a| a.adopted) {
                "adopted"
            } else {
                "attached"
            };
            tracing::info!(
                "{verb} sock_ops on cgroup {} (--sock-ops-cgroup root: every connection of the node runs it)",
                datapath.cgroup.display()
            );
        }
        crate::bpf::sockops::Scope::Pod => tracing::info!(
            "sock_ops attaches to each served live-store's pod cgroup (under {})",
            datapath.cgroup.display()
        ),
    }
    match &datapath.listen_events {
        Ok(_) => tracing::info!(
            "bind() to the listen ports reported by post_bind hooks on cgroup {}",
            datapath.cgroup.display()
        ),
        Err(why) => tracing::warn!(
            "listen events unavailable ({why}): new listeners are found by scanning every second"
        ),
    }

    let handles = datapath.map_handles()?;
    let telemetry = Arc::new(Telemetry::new(
        handles.counters,
        handles.listeners,
        agent::attachments(&datapath)?,
    )?);
    telemetry.register(|r| datapath.register_metrics(r));
    let metrics_addr = telemetry::serve(s.metrics_addr, telemetry.clone()).await?;
    tracing::info!("metrics on http://{metrics_addr}/metrics (also /healthz, /readyz)");

    let names = Arc::new(Mutex::new(HashMap::new()));
    let recorder = Recorder {
        namespaces: names.clone(),
        clock_offset_ns: sys::monotonic_to_unix_offset_ns(),
    };
    spawn_kernel_logs(datapath.sock_ops.prog_id);
    // Batches of bind events (see `spawn_listen_events`).
    let (listen_tx, mut listen_rx) = mpsc::channel(LISTEN_BATCHES);
    if datapath.listen_events.is_ok() {
        agent::spawn_listen_events(handles.listen_events, listen_tx)?;
    }
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let hub = Arc::new(sub::Hub::new(
        sub::Hub::capacity_for_ring(s.flow_ring_bytes),
        telemetry.flow_subscriber_lost.clone(),
        telemetry.flow_subscribers.clone(),
    ));
    // Subscribers are a convenience: a socket that cannot be created costs a
    // warning, never the redirects.
    let flows_server = match sub::Server::start(&s.flows_socket, hub.clone()) {
        Ok(server) => {
            tracing::info!(
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

    let (inspector, mut verdicts) = Inspector::start(Policy {
        cgroup_pattern: s.cgroup_pattern.clone(),
        targets: s.serve_targets.clone(),
    });
    telemetry.register(|r| inspector.metrics.register(r));
    let mut agent = Agent::new(datapath, s, telemetry.clone(), names, exit_tx, inspector);
    for netns in namespaces {
        agent.serve_explicit(netns)?;
    }
    if agent.settings.discover {
        // What already runs is served before `ready`, within a bound: a
        // process whose files block is left to the inspector's deadline.
        agent.scan();
        let deadline = tokio::time::Instant::now() + STARTUP_SCAN;
        while agent.inspecting() {
            tokio::select! {
                Some(batch) = recv_batch(&mut verdicts) => agent.on_verdicts(batch),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
    agent.tick()?;
    // Everything this agent serves is adopted or attached by now: what else a
    // previous agent pinned is stale, or belongs to the build we replace.
    if let Some(old) = agent.datapath.replaces().map(str::to_owned) {
        let removed = agent.datapath.persist()?;
        tracing::info!(
            "replaced the pinned state of build {old} ({} objects) with build {}, without a gap",
            removed.len(),
            crate::bpf::datapath::build_id()
        );
    }
    for what in agent.datapath.sweep_unserved()? {
        tracing::info!("removed stale pinned {what}");
    }
    agent.publish()?;
    // The ring check runs on a thread of its own (a slow Tempo never holds up
    // this loop) and sees what the agent serves through `AgentView`.
    let ring = match agent.settings.tempo_ring.clone() {
        Some(url) => {
            let view = crate::ring::AgentView::of(&agent.datapath, &agent.settings.redirects);
            let metrics = crate::ring::RingMetrics::default();
            telemetry.register(|r| metrics.register(r));
            let monitor = crate::ring::Monitor::start(
                url.clone(),
                agent.settings.tempo_ring_interval,
                agent.datapath.map_handles()?.listeners,
                metrics,
                view,
            )?;
            tracing::info!(
                "checking the live-store ring {url} every {}s",
                agent.settings.tempo_ring_interval.as_secs()
            );
            Some(monitor)
        }
        None => None,
    };
    let serving = format!(
        "redirecting in {} network namespace(s){}",
        agent.datapath.served.len(),
        if agent.settings.discover {
            ", discovering more"
        } else if agent.settings.kube.is_some() {
            ", serving the pods the Kubernetes API selects"
        } else {
            ""
        }
    );
    // What /readyz and redirector_ready say, from the same check.
    match telemetry.readiness() {
        Ok(()) => tracing::info!("ready: {serving}"),
        Err(why) => tracing::warn!("{serving}, but /readyz says: {}", why.trim_end()),
    }

    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT received"); break; }
            _ = sighup.recv() => tracing::warn!("{SIGHUP_IGNORED}"),
            Some(events) = listen_rx.recv() => {
                agent.on_listen(&events);
                agent.on_pending();
                publish(&mut agent);
            }
            _ = pending(agent.next_pending()) => {
                agent.on_pending();
                publish(&mut agent);
            }
            Some(batch) = recv_batch(&mut verdicts) => {
                agent.on_verdicts(batch);
                agent.on_pending();
                publish(&mut agent);
            }
            Some(event) = next_pod(&mut pods) => {
                let looks = agent.on_pod_event(event);
                if let Some(locator) = &mut locator {
                    for look in looks {
                        match look {
                            agent::Look::For(uid) => {
                                if let Err(e) = locator.want(&uid) {
                                    tracing::warn!("pod uid {uid}: {e:#}");
                                }
                            }
                            agent::Look::Stop(uid) => locator.forget(&uid),
                        }
                    }
                }
                publish(&mut agent);
            }
            event = next_sandbox(&mut locator) => {
                agent.on_sandbox(event);
                publish(&mut agent);
            }
            Some(cookie) = exit_rx.recv() => {
                agent.on_exit(cookie);
                publish(&mut agent);
            }
            _ = tick.tick() => {
                if let Err(e) = agent.tick() {
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
    agent.remove_state();
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
    tracing::info!(
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

/// Every verdict waiting, so namespaces found together load together.
async fn recv_batch(
    rx: &mut mpsc::UnboundedReceiver<crate::discovery::inspector::Verdict>,
) -> Option<Vec<crate::discovery::inspector::Verdict>> {
    let mut batch = Vec::new();
    (rx.recv_many(&mut batch, 4096).await > 0).then_some(batch)
}

/// The Pod watch, on a task of its own (its events queue for this loop,
/// bounded), and the sandbox locator, whose inotify this loop polls.
async fn start_kube(
    k: &crate::config::settings::KubeSettings,
) -> Result<(
    mpsc::Receiver<kube::watch::PodEvent>,
    kube::sandbox::Locator,
)> {
    let selector = kube::watch::Selector {
        node: kube::watch::node(k.node.as_deref())
            .map_err(|e| Fatal::Environment(format!("--kube: {e:#}")))?,
        labels: k.labels.clone(),
        namespaces: k.namespaces.clone(),
    };
    let cgroup2 = crate::sys::cgroup::cgroup2_mount()
        .map_err(|e| Fatal::Environment(format!("--kube: {e:#}")))?;
    let locator = kube::sandbox::Locator::new(&cgroup2, k.cgroup_root.as_deref())
        .map_err(|e| Fatal::Environment(format!("watching pod cgroups: {e:#}")))?;
    let client = kube::watch::client(k.kubeconfig.as_deref())
        .await
        .map_err(|e| Fatal::Environment(format!("{e:#}")))?;
    tracing::info!(
        "watching pods on node {} with labels {:?}{}",
        selector.node,
        selector.labels,
        if selector.namespaces.is_empty() {
            String::new()
        } else {
            format!(" in namespaces {}", selector.namespaces.join(","))
        }
    );
    let (tx, rx) = mpsc::channel(POD_EVENTS);
    tokio::spawn(kube::watch::run(client, selector, tx));
    Ok((rx, locator))
}

async fn next_pod(
    rx: &mut Option<mpsc::Receiver<kube::watch::PodEvent>>,
) -> Option<kube::watch::PodEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_sandbox(locator: &mut Option<kube::sandbox::Locator>) -> kube::sandbox::LocatorEvent {
    match locator {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever.
async fn pending(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Readiness and flow records learn of a change at once, not at the next tick.
fn publish(agent: &mut Agent) {
    if let Err(e) = agent.publish_if_changed() {
        tracing::error!("publishing the served namespaces: {e:#}");
    }
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
