//! The ring-aware check: reads Tempo's live-store ring (dskit's ring status page,
//! as JSON) and, for every live-store whose address belongs to a network
//! namespace on this node, says whether redirector serves that namespace,
//! whether the port the ring advertises is one it redirects, and whether the
//! live-store's listener is registered; with the fix for each problem.
//!
//! `redirector check --tempo-ring URL` judges by the pinned state (what
//! `redirector status` reads); `redirector run --tempo-ring URL` judges by the
//! agent's own state, on a thread of its own every `tempo_ring_interval` of
//! its settings (`--tempo-ring-interval`, `REDIRECTOR_TEMPO_RING_INTERVAL` or
//! redirector.yaml; `DEFAULT_INTERVAL_SECS` when none sets it), and exports
//! the result as metrics.
//!
//! One job a file, in the order the data flows: `fetch` reads the ring page,
//! `local` finds this node's namespaces and their addresses, `source` says
//! what redirector does in each, `verdict` judges every live-store of this
//! node, and `monitor` repeats that for the agent, with its metrics. This
//! module returns data: the commands print it and register the metrics.

mod fetch;
mod local;
mod monitor;
mod source;
mod verdict;

use anyhow::Result;

pub use fetch::{fetch, parse_page, RingPage, RingUrl, Shard, MAX_RING_BYTES};
pub use local::{node_namespaces, NodeNetns};
pub use monitor::{Monitor, RingMetrics, DEFAULT_INTERVAL_SECS};
pub use source::{AgentView, NsState, Source};
pub use verdict::{evaluate, Aspect, Finding, LiveStore, Outcome, Report};

use crate::bpf::pins::PinLayout;
use source::Pinned;

/// `redirector check --tempo-ring URL`: the report, or why the ring could not be read.
pub fn check(url: &RingUrl) -> Result<Report> {
    let page = fetch(url).map_err(anyhow::Error::msg)?;
    let mut pinned = Pinned::read(&PinLayout::default())?;
    let namespaces = node_namespaces();
    Ok(evaluate(url, &page, &namespaces, &mut pinned))
}
