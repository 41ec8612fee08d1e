//! `redirector run`: resolve the settings, attach, keep the set of served
//! namespaces current (explicit ones that vanish, discovered ones that come and
//! go), serve until a signal, then detach (or, with `--pin`, leave it running).
//!
//! Stdout carries flow records only (the default flow log); what the agent says
//! about itself (`attached ...`, `metrics on http://...`, `ready: ...`, the exit
//! summary `counters: ...`) is logged (`tracing`, on stderr, text or JSON per
//! --log-format), so a pipe of stdout is a clean stream of records.
//!
//! The phases, one file each after the arguments: `start` (checks, then the
//! datapath, telemetry, flow records, the agent and its first pass), `serve`
//! (the loop, until a signal), and the stop here.

pub mod args;
mod serve;
mod start;

use std::sync::Arc;

use anyhow::Result;
use redirector_common::Counter;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    agent::Agent, bpf::pins::PIN_ROOT, config::settings::Settings, flows::sub, telemetry::Telemetry,
};

pub use serve::SIGHUP_IGNORED;

/// What runs between the start and the stop.
struct Running {
    agent: Agent,
    telemetry: Arc<Telemetry>,
    events: serve::Events,
    ring: Option<crate::ring::Monitor>,
    flows: Flows,
}

/// The flow record reader and `redirector flows`' socket.
struct Flows {
    stop: watch::Sender<bool>,
    reader: JoinHandle<Result<u64>>,
    server: Option<sub::Server>,
}

pub async fn run(s: Settings, dry_run: bool) -> Result<()> {
    if dry_run {
        println!("{}", serde_json::to_string_pretty(&s.describe())?);
        return Ok(());
    }
    let mut running = start::start(s).await?;
    serve::serve(&mut running).await;
    stop(running).await;
    Ok(())
}

/// Detaches (unless pinned), drains the last flow records and logs the
/// summary.
async fn stop(running: Running) {
    let Running {
        mut agent,
        telemetry,
        flows,
        ..
    } = running;
    agent.remove_state();
    let pinned = agent.settings.pin;
    if !pinned {
        agent.datapath.restore_namespaces();
    }
    drop(agent);
    // Unpinned programs are gone now: drain what they wrote, then report.
    let _ = flows.stop.send(true);
    let delivered = match flows.reader.await {
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
    if let Some(server) = flows.server {
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
}
