//! The loop of `run`: every source of change (bind events, inspector
//! verdicts, pod and sandbox events, namespace witnesses' exits, the tick)
//! handed to the agent, until SIGTERM or SIGINT.

use tokio::{signal::unix::Signal, sync::mpsc};

use super::Running;
use crate::{
    agent::{self, Agent},
    discovery::{inspector::Verdict, kube},
};

/// The tick of explicit-path checks, grace periods, the resync slice and the
/// pin watch.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// What the agent logs on SIGHUP: the settings are read once, at the start.
pub const SIGHUP_IGNORED: &str = "SIGHUP ignored: restart to apply config changes";

/// SIGTERM and SIGINT end the loop; SIGHUP is logged (its default action
/// would end the process).
pub(super) struct Signals {
    pub term: Signal,
    pub int: Signal,
    pub hup: Signal,
}

/// The loop's inputs besides the tick.
pub(super) struct Events {
    pub signals: Signals,
    pub listen: mpsc::Receiver<Vec<redirector_common::ListenEvent>>,
    pub verdicts: mpsc::UnboundedReceiver<Verdict>,
    pub pods: Option<mpsc::Receiver<kube::watch::PodEvent>>,
    pub locator: Option<kube::sandbox::Locator>,
    pub exits: mpsc::UnboundedReceiver<u64>,
}

pub(super) async fn serve(running: &mut Running) {
    let Running {
        agent,
        events,
        ring,
        ..
    } = running;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = events.signals.term.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = events.signals.int.recv() => { tracing::info!("SIGINT received"); break; }
            _ = events.signals.hup.recv() => tracing::warn!("{SIGHUP_IGNORED}"),
            Some(batch) = events.listen.recv() => {
                agent.on_listen(&batch);
                agent.on_pending();
                publish(agent);
            }
            _ = pending(agent.next_pending()) => {
                agent.on_pending();
                publish(agent);
            }
            Some(batch) = recv_batch(&mut events.verdicts) => {
                agent.on_verdicts(batch);
                agent.on_pending();
                publish(agent);
            }
            Some(event) = next_pod(&mut events.pods) => {
                let looks = agent.on_pod_event(event);
                if let Some(locator) = &mut events.locator {
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
                publish(agent);
            }
            event = next_sandbox(&mut events.locator) => {
                agent.on_sandbox(event);
                publish(agent);
            }
            Some(cookie) = events.exits.recv() => {
                agent.on_exit(cookie);
                publish(agent);
            }
            _ = tick.tick() => {
                if let Err(e) = agent.tick() {
                    tracing::error!("updating served namespaces: {e:#}");
                }
                if let Some(ring) = ring {
                    ring.update(crate::ring::AgentView::of(
                        &agent.datapath,
                        &agent.settings.redirects,
                    ));
                }
            }
        }
    }
}

/// Every verdict waiting, so namespaces found together load together.
pub(super) async fn recv_batch(rx: &mut mpsc::UnboundedReceiver<Verdict>) -> Option<Vec<Verdict>> {
    let mut batch = Vec::new();
    (rx.recv_many(&mut batch, 4096).await > 0).then_some(batch)
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
