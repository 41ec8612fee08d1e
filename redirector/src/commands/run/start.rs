//! The start of `run`: what must hold before anything is loaded, then the
//! datapath, telemetry, flow records, the agent and its first pass, and the
//! ring check, in the order each needs the one before.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use super::{serve, Flows, Running};
use crate::{
    agent::{self, Agent},
    bpf::{datapath::Datapath, pins::PinLayout, sockops::Scope},
    config::settings::{KubeSettings, Settings},
    discovery::{
        inspector::{Inspector, Policy},
        kube,
    },
    error::{usage, Fatal},
    flows::{
        log::Recorder,
        reader::{self, FlowOut},
        sub,
    },
    sys::{self, netns::Netns},
    telemetry::{self, Telemetry},
};

/// How long startup waits for the first scan's verdicts before `ready`.
const STARTUP_SCAN: std::time::Duration = std::time::Duration::from_secs(3);
/// Bind-event batches queued for the loop.
const LISTEN_BATCHES: usize = 64;
/// Pod events queued for the loop (the watch waits when it is full).
const POD_EVENTS: usize = 256;

/// The flow log, opened, and its format.
type Output = (FlowOut, crate::flows::log::FlowFormat);

/// What must hold before anything is opened, loaded or attached: each failure
/// is one line and leaves nothing behind.
fn preflight(s: &Settings) -> Result<Output> {
    for path in &s.netns {
        if !path.exists() {
            return Err(usage(format!(
                "network namespace {} does not exist",
                path.display()
            )));
        }
    }
    sys::require_capabilities()?;
    // A kernel below the minimum gets one line naming what it lacks (exit 3).
    crate::bpf::probe::require()?;
    reader::open_output(s.flow_log.as_deref(), s.flow_format)
}

pub(super) async fn start(s: Settings) -> Result<Running> {
    let (flow_out, flow_format) = preflight(&s)?;
    // Signals first: a SIGTERM that arrives while attaching still ends cleanly.
    let signals = serve::Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    let namespaces = s
        .netns
        .iter()
        .map(|p| Netns::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    // --kube: before anything is loaded, so a missing ServiceAccount, node
    // name or pod cgroup root stops the start with one line and nothing left.
    let (pods, locator) = match &s.kube {
        Some(k) => {
            let (pods, locator) = start_kube(k).await?;
            (Some(pods), Some(locator))
        }
        None => (None, None),
    };
    let datapath = load(&s)?;

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
    let (listen_tx, listen) = mpsc::channel(LISTEN_BATCHES);
    if datapath.listen_events.is_ok() {
        agent::spawn_listen_events(handles.listen_events, listen_tx)?;
    }
    let (exit_tx, exits) = mpsc::unbounded_channel();
    let hub = Arc::new(sub::Hub::new(
        sub::Hub::capacity_for_ring(s.flow_ring_bytes),
        telemetry.flow_subscriber_lost.clone(),
        telemetry.flow_subscribers.clone(),
    ));
    // Subscribers are a convenience: a socket that cannot be created costs a
    // warning, never the redirects.
    let server = match sub::Server::start(&s.flows_socket, hub.clone()) {
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
    let (stop, stop_rx) = watch::channel(false);
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
                Some(batch) = serve::recv_batch(&mut verdicts) => agent.on_verdicts(batch),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
    first_pass(&mut agent)?;
    let ring = start_ring(&agent, &telemetry)?;
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
    Ok(Running {
        agent,
        telemetry,
        events: serve::Events {
            signals,
            listen,
            verdicts,
            pods,
            locator,
            exits,
        },
        ring,
        flows: Flows {
            stop,
            reader,
            server,
        },
    })
}

/// Loads (or adopts) the programs and maps, and says where they run.
fn load(s: &Settings) -> Result<Datapath> {
    let datapath = Datapath::load(
        s.flow_ring_bytes,
        s.flow_update_interval,
        s.pin.then(PinLayout::default),
        s.keep_mptcp,
        s.sock_ops_cgroup,
        &s.listen_ports(),
    )?;
    match datapath.sock_ops.scope {
        Scope::Root => {
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
        Scope::Pod => tracing::info!(
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
    Ok(datapath)
}

/// The first tick, then the pinned state made this agent's alone.
fn first_pass(agent: &mut Agent) -> Result<()> {
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
    agent.publish()
}

/// The ring check runs on a thread of its own (a slow Tempo never holds up
/// the loop) and sees what the agent serves through `AgentView`.
fn start_ring(agent: &Agent, telemetry: &Telemetry) -> Result<Option<crate::ring::Monitor>> {
    let Some(url) = agent.settings.tempo_ring.clone() else {
        return Ok(None);
    };
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
    Ok(Some(monitor))
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

/// The Pod watch, on a task of its own (its events queue for this loop,
/// bounded), and the sandbox locator, whose inotify this loop polls.
async fn start_kube(
    k: &KubeSettings,
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
